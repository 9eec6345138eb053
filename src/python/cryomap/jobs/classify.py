"""The classification jobs (class3d, class2d): inputs checked, initial references, iterations
of `em.classify`, RELION-layout outputs.

Outputs in `outdir`: per iteration the class maps (`run_itNNN_classNNN.mrc` in 3D,
`run_itNNN_classes.mrcs` in 2D), `run_itNNN_model.star` (rlnClassDistribution, per-class
SSNR, tau2 and resolution), `run_itNNN_data.star` (rlnClassNumber 1-based, best pose) and
`run_itNNN_state.npz` (--continue); at the end the same under `run_`, plus `run_classes.png`
(2D: the averages sorted by class size) and `run.log`.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from .. import fourier, projector
from ..em.classify import (
    ClassOptions,
    ClassState,
    class_iteration,
    equal_split,
)
from ..em.data import ImageSource
from ..em.noise import NoiseModel
from ..em.options import max_memory_bytes
from ..em.refine import split_halves
from ..errors import InputError
from ..euler import euler_to_matrix
from ..fourier import initial_lowpass
from ..io.atomic import atomic_path
from ..io.mrc import open_stack, read_map, write_stack
from ..io.star import read_star
from ..parallel import SINGLE, Ranks
from ..particles import ParticleSet
from .base import (
    Job,
    MemoryPlan,
    ResumePoint,
    aberration_notes,
    check_particles_for_em,
    find_resume_point,
    grid_notes,
    plan_job_memory,
)
from .base import saved_run as base_saved_run
from .output import (
    ModelFigures,
    model_blocks,
    particle_table,
    write_class_volumes,
    write_data_star,
    write_model_star,
    write_volume,
)
from .refine import (
    PIXEL_TOLERANCE,
    check_reference,
    image_source,
    particle_input,
    reference_input,
    require_ctf,
    saved_reference,
)


def check_classes(n_classes: int, particles: ParticleSet, star: str | Path) -> None:
    """1 <= K <= number of particles."""
    if n_classes < 1:
        raise InputError(f"--K {n_classes}: expected at least 1 class")
    if n_classes > particles.n_particles:
        raise InputError(f"--K {n_classes}: more classes than the {particles.n_particles} "
                         f"particles in {star}")


#: Images back-projected at a time for the initial 2D averages.
AVERAGE_GROUP = 1024

#: initialise(source, sigma2, seed_class, rng) -> ((K, N, N[, N]) initial references, the
#: first iteration's class per image or None); seed_class is a random equal division
Initialiser = Callable[[ImageSource, np.ndarray, np.ndarray, np.random.Generator],
                       tuple[np.ndarray, np.ndarray | None]]


class ClassifyJob(Job):
    """K classes in 2D or 3D."""

    state_class = ClassState

    def __init__(self, particles: ParticleSet, star: str | Path, reference_path, outdir,
                 options: ClassOptions, initialise: Initialiser | None, resume: bool = False,
                 echo: Callable[[str], None] | None = print,
                 memory: MemoryPlan | None = None, ranks: Ranks = SINGLE) -> None:
        super().__init__(outdir, resume, echo, ranks)
        self.kind = ("class2d" if options.ndim == 2 else
                     "hetero_refine" if options.heterogeneous else "class3d")
        self.particles, self.star, self.reference_path = particles, Path(star), reference_path
        self.options, self.initialise = options, initialise
        self.memory = memory
        cache = None if memory is None else (memory.parts.get("image cache", 0)
                                             if memory.cache else 0)
        self.source = image_source(particles, options, cache, ranks)
        self.notes += grid_notes(particles)
        self.notes += aberration_notes(particles, options.use_ctf)

    def initial_state(self) -> ClassState:
        o, p = self.options, self.particles
        rng = np.random.default_rng(o.seed)
        noise = NoiseModel.from_images(self.source, o.noise_model == "pixel")
        seed_class = equal_split(p.n_particles, o.n_classes, rng)
        references, seed_class = self.initialise(self.source, noise.sigma2, seed_class, rng)
        from ..em.classify import initial_state

        subset = split_halves(p, rng, log=self.notes.append) if o.half_sets else None
        return initial_state(self.source, o, references, p.angles(),
                             p.origins_px(pixel_size=p.grid_pixel_size), seed_class, subset)

    def description(self) -> dict:
        return {"i": str(self.star.resolve()),
                "ref": None if isinstance(self.reference_path, (list, tuple))
                else saved_reference(self.reference_path),
                "options": asdict(self.options)}

    def header(self) -> str:
        o, p = self.options, self.particles
        return (f"cryomap {self.kind}: {p.n_particles} particles, box {p.grid_box}, "
                f"{p.grid_pixel_size:.3f} Å/px, K = {o.n_classes}, options {json.dumps(asdict(o))}")

    def finished(self, state: ClassState) -> bool:
        return state.iteration >= self.options.iterations

    def iterate(self, state: ClassState) -> str:
        o = self.options
        hard = o.force_hard_class or (o.hard_last and state.iteration + 1 == o.iterations)
        bar = self.progress_bar(self.particles.n_particles, f"iteration {state.iteration + 1}")
        s = class_iteration(state, self.source, o, hard, bar.update if bar else None)
        if bar is not None:
            bar.close()
        t = s.timings
        dist = " ".join(f"{d:.3f}" for d in s.distribution)
        split = "".join(f", class {k + 1} re-seeded from class {b + 1}"
                        for k, b in s.reseeded)
        diff = ("" if s.difference_resolution is None
                else f", classes differ to {s.difference_resolution:.1f} Å")
        if s.message:
            self.log(s.message.lstrip("; "))
        # this iteration's maps came from half maps (their FSC) unless heterogeneous
        # refinement's half-sets met their own maps only after it
        split_at = state.halves_split_at
        gold = o.split_halves or (split_at is not None and split_at < s.iteration)
        measure = "FSC 0.143 of each class's half maps" if gold else "SSNR 1"
        res = (f"class resolutions {' '.join(f'{r:.1f}' for r in s.class_resolution)} Å "
               f"({measure}), {s.stage}" if o.half_sets
               else f"best class {s.resolution:.1f} Å (SSNR 1)")
        return (f"iteration {s.iteration:3d}{' (hard)' if hard else ''}: r_max {s.r_max:3d}"
                f" px, {res}{diff}, classes [{dist}]{split}, "
                f"changed {100 * s.changed_fraction:.1f}%, log-lik {s.log_likelihood:.6e}, "
                f"<Pmax> {s.average_pmax:.3f}, <nsig> {s.mean_n_significant:.1f}, "
                f"{s.mean_samples:.0f} samples/image; E-step {t.get('estep', 0):.1f} s, "
                f"project {t.get('project', 0):.1f}, sums {t.get('sums', 0):.1f}, back-project "
                f"{t.get('backproject', 0):.1f}, reconstruct {t.get('reconstruct', 0):.1f}")

    # -- outputs ---------------------------------------------------------------------------

    def write_maps(self, root: Path, state: ClassState) -> list[str]:
        """The class maps; returns the names for rlnReferenceImage."""
        pix = self.particles.grid_pixel_size
        if self.options.ndim == 2:
            path = Path(f"{root}_classes.mrcs")
            write_stack(path, state.references, pix)
            return [f"{k + 1:06d}@{path.name}" for k in range(state.n_classes)]
        return write_class_volumes(root, state.references, pix)

    def write_tables(self, root: Path, state: ClassState, names: list[str]) -> None:
        o, p = self.options, self.particles
        box, pix = p.grid_box, p.grid_pixel_size
        n = box // 2 + 1
        k = state.n_classes
        noise = NoiseModel(state.sigma2)
        figures = ModelFigures(
            box=box, pixel_size=pix, class_names=names, class_distribution=state.distribution,
            class_resolution_shell=state.class_resolution_shell
            if state.class_resolution_shell is not None else np.ones(k, np.int64),
            current_size=2 * state.r_max,
            ssnr=state.class_ssnr if state.class_ssnr is not None else np.zeros((k, n)),
            tau2=state.class_tau2 if state.class_tau2 is not None else np.zeros((k, n)),
            sigma2=np.stack([noise.shell_spectrum(g) for g in range(noise.n_groups)]),
            log_likelihood=float(state.log_likelihood.sum()),
            average_pmax=float(state.max_prob.mean()), pad=o.pad, interp=o.interp,
            tau2_fudge=o.tau2_fudge, ref_dim=o.ndim, offset_sigma=state.offset_sigma * pix,
            fsc=state.class_fsc)
        write_model_star(Path(f"{root}_model.star"), model_blocks(figures))
        write_data_star(Path(f"{root}_data.star"), p, class_table(p, state, o))

    def write_iteration(self, root: Path, state: ClassState) -> None:
        self.write_tables(root, state, self.write_maps(root, state))

    def write_final(self, state: ClassState) -> None:
        root = self.outdir / "run"
        self.write_tables(root, state, self.write_maps(root, state))
        if self.options.ndim == 2:
            plot_gallery(self.outdir / "run_classes.png", state, self.particles.grid_pixel_size)
        if self.options.ndim == 3 and state.half_unfiltered is not None:
            self.write_half_maps(state)
        elif self.options.heterogeneous:
            self.log("no gold-standard half maps: the run ended before its half-sets met "
                     "their own class maps; run more iterations (--continue --iter N)")
        sizes = np.bincount(state.class_number, minlength=state.n_classes)
        self.log(f"final classes (particles): {' '.join(str(int(s)) for s in sizes)}; outputs "
                 f"in {self.outdir}")

    def write_half_maps(self, state: ClassState) -> None:
        """Each class's unfiltered half maps, RELION's refinement names
        (run_half{1,2}_classNNN_unfil.mrc), and the resolution their FSC gives."""
        pix, box = self.particles.grid_pixel_size, self.particles.grid_box
        for k in range(state.n_classes):
            for h in (0, 1):
                write_volume(self.outdir / f"run_half{h + 1}_class{k + 1:03d}_unfil.mrc",
                             state.half_unfiltered[h, k], pix)
            shell = state.class_resolution_shell[k]  # FSC 0.143 of these half maps
            self.log(f"class {k + 1}: {100 * state.distribution[k]:.1f}% of the particles, "
                     f"{box * pix / shell:.2f} Å (FSC 0.143 of run_half1_class"
                     f"{k + 1:03d}_unfil.mrc and run_half2_class{k + 1:03d}_unfil.mrc)")


def class_table(particles: ParticleSet, state: ClassState, options: ClassOptions
                ) -> pd.DataFrame:
    """The particle table of a classification (run_data.star's data_particles): the input
    columns, rlnClassNumber (1-based), the best pose and the statistics."""
    table = particle_table(particles, state, particles.grid_pixel_size,
                           class_number=state.class_number + 1, subset=state.subset)
    if options.ndim == 2:  # 2D poses are in-plane only: keep any input rot/tilt
        for col in ("rlnAngleRot", "rlnAngleTilt"):
            if col in particles.particles.columns:
                table[col] = particles.particles[col].to_numpy()
            else:
                table = table.drop(columns=col)
    return table


# -- initial references ----------------------------------------------------------------------


def perturbed_references(reference: np.ndarray, pixel_size: float, resolution: float,
                         n_classes: int, strength: float, rng: np.random.Generator
                         ) -> np.ndarray:
    """K copies of the reference low-passed to `resolution` Å, each plus an independent random
    field low-passed the same way with `strength` x the low-passed map's standard deviation
    (K = 1: the low-passed reference unchanged). Returns (K, N, N, N) float64."""
    low = initial_lowpass(np.asarray(reference, np.float64), resolution, pixel_size)
    if n_classes == 1 or strength == 0:
        return np.repeat(low[None], n_classes, axis=0)
    out = np.empty((n_classes,) + low.shape)
    for k in range(n_classes):
        noise = initial_lowpass(rng.standard_normal(low.shape), resolution, pixel_size)
        out[k] = low + strength * low.std() / max(noise.std(), 1e-30) * noise
    return out


def read_references_3d(path, particles: ParticleSet, n_classes: int) -> list[np.ndarray]:
    """3D references for --ref: one map (RELION's single reference: every class starts from
    it) or a STAR file listing K maps in rlnReferenceImage (paths as image paths: relative to
    the working folder, then to the STAR file's folder); in memory (the Python API), a map
    or a list of K maps (`reference_input`). Each map's box and pixel size must match the
    particles."""
    if isinstance(path, (list, tuple)) or hasattr(path, "data"):
        refs = list(path) if isinstance(path, (list, tuple)) else [path]
        if len(refs) not in (1, n_classes):
            raise InputError(f"--ref: {len(refs)} reference maps for --K {n_classes}; "
                             f"expected 1 or {n_classes}")
        maps = []
        for ref in refs:
            data, pix, name = reference_input(ref)
            check_reference(data, pix, particles, name)
            maps.append(np.asarray(data, np.float64))
        return maps
    path = Path(path)
    if path.suffix != ".star":
        ref, pix = read_map(path)
        check_reference(ref, pix, particles, path)
        return [np.asarray(ref, np.float64)]
    table = read_star(path)
    loops = [b for b in table.values() if hasattr(b, "columns")
             and "rlnReferenceImage" in b.columns]
    if not loops:
        raise InputError(f"{path}: no rlnReferenceImage column; expected a STAR list of the "
                         f"K reference maps")
    names = [str(v) for v in loops[0]["rlnReferenceImage"]]
    if len(names) != n_classes:
        raise InputError(f"{path}: {len(names)} reference maps for --K {n_classes}; expected "
                         f"{n_classes}")
    maps = []
    for name in names:
        cands = [Path(name)] if Path(name).is_absolute() else [Path.cwd() / name,
                                                             path.absolute().parent / name]
        found = next((c for c in cands if c.is_file()), None)
        if found is None:
            raise InputError(f"{path}: rlnReferenceImage {name}: file not found (looked in the "
                             f"working folder and in {path.absolute().parent})")
        ref, pix = read_map(found)
        check_reference(ref, pix, particles, found)
        maps.append(np.asarray(ref, np.float64))
    return maps


def read_references_2d(path, particles: ParticleSet, n_classes: int) -> np.ndarray:
    """2D references for --ref: an image (`.mrc`, used for every class) or a stack (`.mrcs`,
    one image per class); in memory, an image or a list of K images with `.data` and
    `.pixel_size` (cryomap.Volume). Box and pixel size must match the particles. Returns
    (K, N, N)."""
    if isinstance(path, (list, tuple)) or hasattr(path, "data"):
        refs = list(path) if isinstance(path, (list, tuple)) else [path]
        images = np.stack([np.asarray(r.data, np.float64) for r in refs])
        pix = float(refs[0].pixel_size)
        path = Path("--ref (in memory)")
        if images.ndim != 3:
            raise InputError(f"{path}: expected 2D images for a 2D classification")
    elif Path(path).suffix == ".mrcs":
        path = Path(path)
        with open_stack(path) as stack:
            images, pix = stack.read(np.arange(stack.n_images)), stack.pixel_size
    else:
        path = Path(path)
        data, pix = read_map(path)
        if data.ndim == 3:
            raise InputError(f"{path}: a 3D map; 2D classification needs 2D references (an "
                             f"image, or a .mrcs stack with one image per class)")
        images = data[None]
    if images.shape[-1] != particles.grid_box:
        raise InputError(f"{path}: box {images.shape[-1]} does not match the particles' "
                         f"rlnImageSize {particles.grid_box}")
    if abs(pix - particles.grid_pixel_size) > PIXEL_TOLERANCE:
        raise InputError(f"{path}: pixel size {pix:.4f} Å does not match the particles' "
                         f"rlnImagePixelSize {particles.grid_pixel_size:.4f} Å")
    if images.shape[0] == 1:
        return np.repeat(images.astype(np.float64), n_classes, axis=0)
    if images.shape[0] != n_classes:
        raise InputError(f"{path}: {images.shape[0]} references for --K {n_classes}; expected "
                         f"one image or {n_classes}")
    return images.astype(np.float64)


def random_subset_averages(source: ImageSource, sigma2: np.ndarray, subsets: np.ndarray,
                           rng: np.random.Generator, pad: int = 2, interp: str = "linear",
                           subset_size: int | None = None) -> np.ndarray:
    """Initial class averages: class k is the average of the images with subsets == k (at most
    `subset_size` of them, chosen at random), each back-projected at a random in-plane angle,
    CTF-weighted (sum CTF X / sigma2 / sum CTF^2 / sigma2). Returns (K, N, N) float64."""
    box = source.box
    mask = fourier.pixel_mask(box, box // 2 - 1)
    noise = NoiseModel(sigma2)
    n_classes = int(subsets.max()) + 1
    origins = source.particles.origins_px(pixel_size=source.pixel_size)
    out = np.empty((n_classes, box, box))
    for k in range(n_classes):
        idx = np.flatnonzero(subsets == k)
        if subset_size is not None and idx.size > subset_size:
            idx = np.sort(rng.choice(idx, subset_size, replace=False))
        rot = euler_to_matrix(0.0, 0.0, rng.uniform(0.0, 360.0, idx.size))
        # under mpirun each rank adds its own images; the sums are added up below
        mine = source.ranks.own(idx, source.particles.n_particles)
        idx, rot = idx[mine], rot[mine]
        bp = projector.BackProjector(box, pad, mask.r_max, interp, ndim=2)
        # in groups of images: memory bounded whatever the number of particles
        for start in range(0, idx.size, AVERAGE_GROUP):
            part = slice(start, start + AVERAGE_GROUP)
            batch = source.batch(idx[part], mask, origins[idx[part]])
            inv_s2 = noise.inv_sigma2(batch.group, mask)
            bp.add_slices(batch.ctf * batch.images * inv_s2, batch.ctf**2 * inv_s2, rot[part],
                          mask.coords)
        source.ranks.sum_backprojectors([bp])
        bp.finish()
        # plain average D/W inside the searched radius (no prior term)
        out[k] = bp.reconstruct(np.full(box // 2 + 1, np.inf), 1.0, mask.r_max,
                                minres_map=box)
    return out


def plot_gallery(path: Path, state: ClassState, pixel_size: float, columns: int = 10) -> None:
    """PNG of the class averages sorted by class size (largest first), each labelled with its
    number, particle count, fraction and resolution (written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = state.n_classes
    sizes = np.bincount(state.class_number, minlength=k)
    order = np.lexsort((-state.distribution, -sizes))
    box = state.references.shape[-1]
    res = (box * pixel_size / np.asarray(state.class_resolution_shell, float)
           if state.class_resolution_shell is not None else np.full(k, np.nan))
    ncol = min(columns, k)
    nrow = int(np.ceil(k / ncol))
    fig, axes = plt.subplots(nrow, ncol, figsize=(1.8 * ncol, 2.2 * nrow), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for i, c in enumerate(order):
        ax = axes.ravel()[i]
        ax.imshow(state.references[c], cmap="gray", origin="lower")
        ax.set_title(f"class {c + 1}: {sizes[c]} ptcls\n{100 * state.distribution[c]:.1f}%, "
                     f"{res[c]:.1f} Å", fontsize=7)
    fig.tight_layout(pad=0.6)
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=90, format="png", bbox_inches="tight")
    plt.close(fig)


# -- the two commands -------------------------------------------------------------------------


def _prepare(star, outdir, options: ClassOptions, resume: bool, angpix: float | None,
             max_memory: float | None, read_references: Callable[[ParticleSet], Any]
             ) -> tuple[ParticleSet, Path, ResumePoint | None, int, Any]:
    """The checks shared by class3d and class2d, in order, before anything is written:
    options, output folder, particles (a file or a ParticleSet) and their per-particle values,
    the resume point, and the references (`read_references(particles)`, unless the run
    resumes from a saved state). Returns (particles, their name, resume point or None, memory
    budget in bytes, references or None)."""
    options.validate()
    budget = max_memory_bytes(max_memory)
    Job.check_output(outdir, resume)
    particles, star = particle_input(star, angpix)
    try:
        check_classes(options.n_classes, particles, star)
        require_ctf(particles, star, options.use_ctf)
        check_particles_for_em(particles, options)
        start = (find_resume_point(outdir, ClassState, particles.n_particles)
                 if resume else None)
        references = (read_references(particles)
                      if start is None or start.state is None else None)
    except BaseException:
        particles.close()
        raise
    return particles, star, start, budget, references


def _run(particles: ParticleSet, star, reference_path, outdir, options: ClassOptions,
         initialise, resume: bool, echo, start: ResumePoint | None, budget: int,
         ranks: Ranks | None) -> ClassState:
    try:
        ranks = ranks or SINGLE
        plan, options = plan_job_memory(particles, options, budget, class_memory, ranks)
        job = ClassifyJob(particles, star, reference_path, outdir, options, initialise, resume,
                          echo, plan, ranks)
        job.notes.extend(particles.notes)
        return job.run(start)
    finally:
        particles.close()


def classify3d(star: str | Path | ParticleSet, reference_path, outdir: str | Path | None,
               options: ClassOptions, resume: bool = False,
               echo: Callable[[str], None] | None = print, angpix: float | None = None,
               max_memory: float | None = None, ranks: Ranks | None = None) -> ClassState:
    """Run (or, with resume=True, continue) a 3D classification; returns the final state.
    Everything is checked before anything is written in `outdir`; max_memory in GiB; ranks:
    the processes that run it (`parallel.Ranks`; None: this one alone).
    star: a particle file or a ParticleSet; reference_path: an MRC path, a STAR list of K
    maps, or maps in memory (read_references_3d); outdir None: run in memory."""
    if options.ndim != 3:
        raise ValueError("classify3d: options.ndim must be 3")

    def read_references(particles: ParticleSet) -> list[np.ndarray]:
        if reference_path is None:
            raise InputError("--ref: an initial map is required")
        return read_references_3d(reference_path, particles, options.n_classes)

    particles, star, start, budget, references = _prepare(
        star, outdir, options, resume, angpix, max_memory, read_references)

    def initialise(source, sigma2, seed_class, rng):
        if len(references) > 1:  # K distinct maps: used as they are, no seeds
            return np.stack([initial_lowpass(r, options.ini_high, source.pixel_size)
                             for r in references]), None
        refs = perturbed_references(references[0], source.pixel_size, options.ini_high,
                                    options.n_classes, options.perturbation, rng)
        return refs, seed_class

    return _run(particles, star, reference_path, outdir, options, initialise, resume, echo,
                start, budget, ranks)


def classify2d(star: str | Path | ParticleSet, outdir: str | Path | None,
               options: ClassOptions, reference_path=None, resume: bool = False,
               echo: Callable[[str], None] | None = print, angpix: float | None = None,
               max_memory: float | None = None, ranks: Ranks | None = None) -> ClassState:
    """Run (or, with resume=True, continue) a 2D classification; returns the final state.
    Everything is checked before anything is written in `outdir`; max_memory in GiB; ranks
    as `classify3d`.
    star: a particle file or a ParticleSet; reference_path: None (averages of random
    subsets), an image or stack file, or images in memory; outdir None: run in memory."""
    if options.ndim != 2:
        raise ValueError("classify2d: options.ndim must be 2")

    def read_references(particles: ParticleSet) -> np.ndarray | None:
        if reference_path is None:
            return None
        return read_references_2d(reference_path, particles, options.n_classes)

    particles, star, start, budget, references = _prepare(
        star, outdir, options, resume, angpix, max_memory, read_references)

    def initialise(source, sigma2, seed_class, rng):
        if references is not None:  # one per class: no seeds (several copies: seeds)
            distinct = len({r.tobytes() for r in references}) > 1
            return references, None if distinct else seed_class
        averages = random_subset_averages(source, sigma2, seed_class, rng, options.pad,
                                          options.interp, options.subset_size)
        return averages, seed_class

    return _run(particles, star, reference_path, outdir, options, initialise, resume, echo,
                start, budget, ranks)


def class_memory(particles: ParticleSet, options: ClassOptions,
                 batch_memory: int | None = None) -> dict[str, int]:
    """Estimated peak memory of a classification by part, without the image cache."""
    from .._kernels import core
    from ..em.classify import class_search
    from ..em.memory import batch_size, estimate_memory
    from ..em.refine import mask_radius_px

    bm = options.batch_memory if batch_memory is None else int(batch_memory)
    box, pix = particles.grid_box, particles.grid_pixel_size
    k = options.n_classes
    search = class_search(options, 1, box // 2 - 1, 2 * mask_radius_px(options, box, pix) * pix)
    bsize = batch_size(search, k, bm)
    parts = estimate_memory(particles.n_particles, box, pix, k, search, options.ndim,
                            options.pad, bsize, bm, core.max_threads(), 0)
    # per class: reference, its prepared transform and the new map, float64
    parts["maps"] = parts.get("maps", 0) + 3 * k * box**options.ndim * 8
    return parts


def saved_job(outdir: str | Path) -> tuple[str, str | None, ClassOptions]:
    """(particles STAR, reference or None, options) of the classification in outdir."""
    job = saved_run(outdir)
    return job["i"], job["ref"], job["options"]


def saved_run(outdir: str | Path) -> dict:
    """job.json of the classification in outdir, its options as ClassOptions
    (`base.saved_run`)."""
    return base_saved_run(outdir, "classification", ("class3d", "class2d", "hetero_refine"),
                          ClassOptions)
