"""The initial-model job: K maps from the particles alone (`em.initial_model`), with the job
base's checks before output, `--continue` and atomic writes.

Outputs in `outdir` (RELION's InitialModel layout): per iteration `run_itNNN_classNNN.mrc`,
`run_itNNN_model.star`, `run_itNNN_data.star` and `run_itNNN_state.npz` (only the last two
state files are kept: each holds the running sums); at the end `run_classNNN.mrc`,
`run_model.star`, `run_data.star`, `run_central_sections.png` (the three central sections of
every class) and `run.log`. The log says that the hand is unknown and how to flip it, and gives
the `cryomap refine` command that starts from the result.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np

from ..em.initial_model import (
    InitialModelOptions,
    InitialModelState,
    Problem,
    initial_model_iteration,
    initial_state,
    sums_radius,
)
from ..em.model import ssnr_from_fsc
from ..em.noise import NoiseModel
from ..em.options import max_memory_bytes
from ..halves import random_subsets
from ..io.atomic import atomic_path
from ..particles import ParticleSet, load_particles
from . import output
from .base import (
    Job,
    MemoryPlan,
    check_particles_for_em,
    find_resume_point,
    iteration_root,
    plan_job_memory,
)
from .base import saved_run as base_saved_run
from .classify import check_classes
from .refine import image_source, require_ctf

#: Line of run.log about the hand of the result.
HANDEDNESS_NOTE = ("handedness: projections cannot tell a map from its mirror image, so the "
                   "initial model has the right hand or its mirror by chance; check it against "
                   "a known feature (e.g. alpha-helices are right-handed at high resolution) "
                   "and, if needed, write the mirror image with: cryomap flip_hand --i {map} "
                   "--o {flipped}")


class InitialModelJob(Job):
    """Ab-initio K-class initial model by stochastic mini-batch EM."""

    kind = "initial_model"
    state_class = InitialModelState

    def __init__(self, particles: ParticleSet, star: str | Path, outdir: str | Path,
                 options: InitialModelOptions, resume: bool = False,
                 echo: Callable[[str], None] | None = print,
                 memory: MemoryPlan | None = None) -> None:
        super().__init__(outdir, resume, echo)
        self.particles, self.star = particles, Path(star)
        self.options = options
        self.memory = memory
        cache = None if memory is None else (memory.parts.get("image cache", 0)
                                             if memory.cache else 0)
        self.problem = Problem(image_source(particles, options, cache), options,
                               particles.origins_px())

    def initial_state(self) -> InitialModelState:
        o, p = self.options, self.particles
        rng = np.random.default_rng(o.seed)
        noise = NoiseModel.from_images(self.problem.source, o.noise_model == "pixel")
        # pseudo half-sets (RELION's grad_pseudo_halfsets): rlnRandomSubset if given
        subset = random_subsets(p, rng, log=self.notes.append)
        if o.sym != "C1":
            from ..symmetry import point_group

            self.notes.append(f"symmetry {o.sym} ({point_group(o.sym).order} operators): "
                              f"orientations searched in its asymmetric unit, sums summed "
                              f"over the group")
        return initial_state(self.problem, noise.sigma2, subset, rng)

    def description(self) -> dict:
        return {"i": str(self.star.resolve()), "ref": None, "options": asdict(self.options)}

    def header(self) -> str:
        o, p = self.options, self.particles
        ini, fin = o.subset_sizes(p.n_particles)
        return (f"cryomap initial_model: {p.n_particles} particles, box {p.box}, "
                f"{p.pixel_size:.3f} Å/px, K = {o.n_classes}, {o.iterations} iterations "
                f"(mini-batches of {ini} to {fin} particles, {o.ini_high:g} to {o.fin_high:g} "
                f"Å, then one pass over all), options {json.dumps(asdict(o))}")

    def finished(self, state: InitialModelState) -> bool:
        return state.iteration >= self.options.iterations

    def iterate(self, state: InitialModelState) -> str:
        step = self.problem.step(state.iteration + 1)
        bar = self.progress_bar(step.batch, f"iteration {state.iteration + 1}")
        s = initial_model_iteration(state, self.problem, bar.update if bar else None)
        if bar is not None:
            bar.close()
        t = s.timings
        dist = " ".join(f"{d:.3f}" for d in s.distribution)
        res = " ".join(f"{r:.1f}" for r in s.pseudo_resolution)
        split = "".join(f", class {k + 1} re-seeded from class {b + 1}"
                        for k, b in s.reseeded)
        return (f"iteration {s.iteration:3d}{' (all particles)' if s.final else ''}: "
                f"batch {s.batch}, r_max {s.r_max} px ({s.resolution_target:.1f} Å), "
                f"HEALPix order {s.healpix_order}, step {s.eta:.2f}; pseudo half-set "
                f"FSC 0.5 [{res}] Å, classes [{dist}]{split}, <Pmax> {s.average_pmax:.3f}, "
                f"{s.mean_samples:.0f} samples/image; E-step {t.get('estep', 0):.1f} s, "
                f"project {t.get('project', 0):.1f}, sums {t.get('sums', 0):.1f}, "
                f"back-project {t.get('backproject', 0):.1f}, reconstruct "
                f"{t.get('reconstruct', 0):.1f}")

    # -- outputs ---------------------------------------------------------------------------

    def _write_maps(self, root: Path, state: InitialModelState) -> list[str]:
        return output.write_class_volumes(root, state.references, self.particles.pixel_size)

    def _write_tables(self, root: Path, state: InitialModelState, names: list[str]) -> None:
        o, p = self.options, self.particles
        box, pix = p.box, p.pixel_size
        n = box // 2 + 1
        k = state.n_classes
        fsc = state.fsc if state.fsc is not None else np.zeros((k, n))
        from ..resolution import resolution_shell

        noise = NoiseModel(state.sigma2)
        figures = output.ModelFigures(
            box=box, pixel_size=pix, class_names=names, class_distribution=state.distribution,
            class_resolution_shell=np.maximum([resolution_shell(f, 0.5) for f in fsc], 1),
            current_size=2 * state.r_max,
            ssnr=np.stack([ssnr_from_fsc(f, o.tau2_fudge) for f in fsc]),
            tau2=state.tau2 if state.tau2 is not None else np.zeros((k, n)),
            sigma2=np.stack([noise.shell_spectrum(g) for g in range(noise.n_groups)]),
            log_likelihood=float(state.log_likelihood.sum()),
            average_pmax=float(state.max_prob.mean()), pad=o.pad, interp=o.interp,
            tau2_fudge=o.tau2_fudge, fsc=fsc)
        output.write_model_star(Path(f"{root}_model.star"), output.model_blocks(figures))
        table = output.particle_table(p, state, pix, class_number=state.class_number + 1,
                                      subset=state.subset)
        output.write_data_star(Path(f"{root}_data.star"), p, table)

    def write_iteration(self, root: Path, state: InitialModelState) -> None:
        self._write_tables(root, state, self._write_maps(root, state))
        # the running sums make state files large: keep the last two (the resume point and
        # the one before it, in case the newest is damaged)
        old = iteration_root(self.outdir, state.iteration - 2)
        Path(f"{old}_state.npz").unlink(missing_ok=True)

    def write_final(self, state: InitialModelState) -> None:
        root = self.outdir / "run"
        names = self._write_maps(root, state)
        self._write_tables(root, state, names)
        plot_central_sections(self.outdir / "run_central_sections.png", state.references,
                              state.distribution, self.particles.pixel_size)
        first = self.outdir / names[0]
        self.log(HANDEDNESS_NOTE.format(map=first, flipped=first.with_name(
            first.stem + "_flipped.mrc")))
        sizes = np.bincount(state.class_number, minlength=state.n_classes)
        self.log(f"final classes (particles): {' '.join(str(int(s)) for s in sizes)}; maps "
                 f"{', '.join(names)} in {self.outdir}")
        d = self.options.particle_diameter
        self.log(f"refine with: cryomap refine --i {self.star} --ref {first} --o Refine3D/job001"
                 f"{f' --particle_diameter {d:g}' if d is not None else ''} --ini_high "
                 f"{self.options.ini_high:g}"
                 f"{f' --sym {self.options.sym}' if self.options.sym != 'C1' else ''}")


def plot_central_sections(path: Path, maps: np.ndarray, distribution: np.ndarray,
                          pixel_size: float) -> None:
    """PNG: for every class, its central xy, xz and yz sections (one row per class, titled
    with its share of the particles), written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = maps.shape[0]
    c = maps.shape[-1] // 2
    fig, axes = plt.subplots(k, 3, figsize=(6.0, 2.1 * k), squeeze=False)
    for i in range(k):
        v = maps[i]
        for j, (name, sec) in enumerate((("xy", v[c]), ("xz", v[:, c]), ("yz", v[:, :, c]))):
            ax = axes[i, j]
            ax.imshow(sec, cmap="gray", origin="lower")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_title(f"class {i + 1} ({100 * distribution[i]:.0f}%): {name}", fontsize=7)
    fig.suptitle(f"central sections ({pixel_size:g} Å/px)", fontsize=8)
    fig.tight_layout(pad=0.5)
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)


def initial_model(star: str | Path, outdir: str | Path, options: InitialModelOptions,
                  resume: bool = False, echo: Callable[[str], None] | None = print,
                  angpix: float | None = None, max_memory: float | None = None
                  ) -> InitialModelState:
    """Run (or, with resume=True, continue) an ab-initio initial model; returns the final
    state. Everything is checked before anything is written in `outdir`; max_memory in
    GiB."""
    options.validate()
    budget = max_memory_bytes(max_memory)
    Job.check_output(outdir, resume)
    particles = load_particles(star, angpix=angpix, log=None)
    try:
        check_classes(options.n_classes, particles, star)
        require_ctf(particles, star, options.use_ctf)
        check_particles_for_em(particles, options)
        options = options.for_box(particles.box, particles.pixel_size)
        start = (find_resume_point(outdir, InitialModelState, particles.n_particles)
                 if resume else None)
        plan, options = plan_job_memory(particles, options, budget, initial_model_memory,
                                        box=particles.box)
        job = InitialModelJob(particles, star, outdir, options, resume, echo, plan)
        job.notes.extend(particles.notes)
        return job.run(start)
    finally:
        particles.close()


def initial_model_memory(particles: ParticleSet, options: InitialModelOptions,
                         batch_memory: int | None = None) -> dict[str, int]:
    """Estimated peak memory by part (the final iteration: finest grid, all particles),
    without the image cache; the running sums of both pseudo half-sets besides."""
    from .. import projector
    from .._kernels import core
    from ..em.memory import batch_size, estimate_memory
    from ..em.search import Search
    from ..sampling import PoseSampling

    o = options
    bm = o.batch_memory if batch_memory is None else int(batch_memory)
    box, pix, n = particles.box, particles.pixel_size, particles.n_particles
    o = o.for_box(box, pix)
    problem = Problem(_Geometry(box, pix), o, np.zeros((n, 2)))  # geometry only
    step = problem.step(o.iterations)
    sampling = PoseSampling.create(3, step.healpix_order, o.psi_step, o.offset_step,
                                   o.offset_range, 0.0, None, symmetry=o.sym)
    search = Search(sampling, o.oversampling, step.radius, problem.diameter)
    k = o.n_classes
    bsize = batch_size(search, k, bm)
    parts = estimate_memory(n, box, pix, k, search, 3, o.pad, bsize, bm, core.max_threads(), 0)
    m = projector.reference_radius(box, o.pad, sums_radius(o, box, pix))
    grid = (2 * m + 1) ** 2 * (m + 1)
    parts["running sums"] = 2 * k * grid * 12 * 2  # D (complex64) + W (float32), and a copy
    parts["maps"] = parts.get("maps", 0) + 3 * k * box**3 * 8
    return parts


class _Geometry:
    """The box and pixel size of a particle set, where a Problem needs no images."""

    def __init__(self, box: int, pixel_size: float) -> None:
        self.box, self.pixel_size = box, pixel_size


__all__ = ["InitialModelJob", "initial_model", "saved_run", "plot_central_sections",
           "initial_model_memory", "HANDEDNESS_NOTE"]


def saved_run(outdir: str | Path) -> dict:
    """job.json of the initial model in outdir, its options as InitialModelOptions
    (`base.saved_run`)."""
    return base_saved_run(outdir, "initial model", ("initial_model",), InitialModelOptions)
