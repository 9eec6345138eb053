"""The public Python API (exported by `import cryomap`; docs/api.md).

Every function takes objects in memory (`Volume`, a particle set) or file paths, and returns
a result object with the maps as `Volume`s and the per-particle table as a pandas DataFrame
(RELION's labels). The command line (`cryomap refine`, `class3d`, `class2d`, `reconstruct`)
goes through these same functions. Without an output folder (`outdir=None`, the default) a
run is done in memory and writes no file; with one, it writes RELION's layout there, exactly
as the command line does.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields, replace
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import InputError
from .parallel import Ranks
from .particles import ParticleSet, particles_from_images
from .volume import FSC, Volume

__all__ = ["set_threads", "get_threads", "read_particles", "particles_from_images",
           "simulate", "refine", "classify3d", "classify2d", "hetero_refine", "reconstruct",
           "SimulationResult", "RefineResult", "ClassifyResult", "ReconstructResult"]

PathLike = str | os.PathLike
Echo = Callable[[str], None] | None
Particles = ParticleSet | PathLike
Reference = Volume | PathLike

#: Defaults of 3D and 2D classification where they differ from ClassOptions' (RELION's GUI).


# -- threads and particles ---------------------------------------------------------------------


def set_threads(n: int | None) -> None:
    """Number of OpenMP threads of the C++ kernels for what follows (None: leave as is;
    the default is all cores, or OMP_NUM_THREADS)."""
    from ._kernels import set_threads as _set

    if n is not None and (isinstance(n, bool) or not isinstance(n, (int, np.integer))
                          or n < 1):
        raise ValueError(f"set_threads: expected at least 1 thread, got {n!r}")
    _set(n)


def get_threads() -> int:
    """Number of OpenMP threads the kernels use now."""
    from ._kernels import core

    return int(core.max_threads())


def read_particles(path: PathLike, angpix: float | None = None) -> ParticleSet:
    """A particle file as a ParticleSet: RELION STAR (3.0 or 3.1+) or cryoSPARC `.cs`, images
    read lazily from their stacks (`particles.load_particles`). `angpix` supplies or replaces
    the pixel size. For images already in memory use `particles_from_images`."""
    from .particles import load_particles

    return load_particles(path, angpix=angpix, log=None)


def _particles(particles: Particles, angpix: float | None) -> ParticleSet:
    if isinstance(particles, ParticleSet):
        if angpix is not None:
            raise InputError("--angpix: only for particles read from a file")
        return particles
    if isinstance(particles, (str, os.PathLike)):
        return read_particles(particles, angpix)
    raise TypeError(f"particles: expected a ParticleSet or a file path, got "
                    f"{type(particles).__name__}")


def _check_reference(reference) -> None:
    if reference is None or isinstance(reference, (Volume, str, os.PathLike)):
        return
    if isinstance(reference, (list, tuple)) and all(isinstance(r, Volume) for r in reference):
        return
    raise TypeError(f"reference: expected a Volume, a list of Volumes or a file path, got "
                    f"{type(reference).__name__} (wrap an array as Volume(array, pixel_size))")


def _options(cls, options, values: dict):
    """An options dataclass: `options` (or cls()) with `values` replacing fields; validated
    (InputError) and the symmetry name made canonical."""
    names = {f.name for f in fields(cls)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise TypeError(f"unknown option(s) {', '.join(unknown)}; expected some of "
                        f"{', '.join(sorted(names))}")
    base = cls() if options is None else replace(options)
    out = replace(base, **values)
    out.validate()
    from .symmetry import point_group

    out.sym = point_group(out.sym).name
    return out


def _check_inputs(kind: str, particles: ParticleSet, options, reference, resume: bool
                  ) -> None:
    """The checks the job makes of its inputs (jobs/), made before particles in memory are
    saved into the output folder, so that refused input leaves nothing behind."""
    from .jobs.base import check_particles_for_em
    from .jobs.classify import check_classes, read_references_2d, read_references_3d
    from .jobs.refine import check_reference, read_solvent_mask, reference_input, require_ctf

    require_ctf(particles, particles.star_path, options.use_ctf)
    if kind != "refine":
        check_classes(options.n_classes, particles, particles.star_path)
    check_particles_for_em(particles, options)
    if kind == "refine":
        read_solvent_mask(options.solvent_mask, particles)
    if resume:  # the reference is not needed to continue a run
        return
    if reference is None and kind != "class2d":
        raise InputError("--ref: an initial map is required")
    if kind == "refine":
        data, pix, name = reference_input(reference)
        check_reference(data, pix, particles, name)
    elif kind in ("class3d", "hetero_refine"):
        read_references_3d(reference, particles, options.n_classes)
    elif reference is not None:
        read_references_2d(reference, particles, options.n_classes)


def _prepare_output(outdir: PathLike | None, resume: bool, particles: ParticleSet,
                    kind: str, options, reference) -> ParticleSet | Path:
    """Particles in memory with an output folder are written there first (particles.star and
    particles.mrcs), once the inputs are checked, so that job.json, run_data.star and
    --continue refer to real files; the run then reads them back. Otherwise the particles as
    given."""
    if outdir is None or particles.images is None:
        return particles
    from .io.atomic import make_output_dir
    from .jobs.base import Job

    Job.check_output(outdir, resume)
    _check_inputs(kind, particles, options, reference, resume)
    make_output_dir(outdir, "--o")
    return particles.save(Path(outdir) / "particles.star")  # and particles.mrcs


# -- simulate ---------------------------------------------------------------------------------


@dataclass
class SimulationResult:
    """Simulated particles: `particles` (a ParticleSet in memory without poses: the input of
    refine / classify), `truth` (the particle table plus the true rlnAngleRot/Tilt/Psi,
    rlnOriginX/YAngst and rlnClassNumber), `maps` (the map of each class) and, with an output
    folder, the files written (`paths`)."""

    particles: ParticleSet
    truth: pd.DataFrame
    maps: list[Volume]
    paths: dict[str, Path]

    @property
    def truth_map(self) -> Volume:
        """The map of class 1."""
        return self.maps[0]

    @property
    def truth_particles(self) -> ParticleSet:
        """The same images with the true poses and classes (for `reconstruct`: the best map
        the poses allow)."""
        return particles_from_images(self.particles.images, self.particles.grid_pixel_size,
                                     self.truth.drop(columns=["rlnImageName"]),
                                     self.particles.optics)


def simulate(maps: Volume | Sequence[Volume] | None = None, n: int = 1000,
             snr: float | None = 0.1, *, box: int = 64, pixel_size: float = 3.0,
             variants: int = 1, scale: float = 1.0, seed: int = 0, max_shift: float = 3.0,
             defocus_range: tuple[float, float] = (10000.0, 25000.0),
             astigmatism: float = 500.0, bfactor: float = 0.0, ctf: bool = True,
             voltage: float = 300.0, cs: float = 2.7, amplitude_contrast: float = 0.1,
             class_fractions: Sequence[float] | None = None,
             outdir: PathLike | None = None, imperfections=None) -> SimulationResult:
    """Simulate n particle images (simulate.simulate_particles): random orientations uniform
    on SO(3), origins within `max_shift` px, astigmatic CTF with a mean defocus uniform in
    `defocus_range` Å, white Gaussian noise at `snr` (None: no noise).

    maps: the map(s) to project (one class each, one box); None: the built-in phantom at
    `box` px of `pixel_size` Å (`scale` 2.1: ribosome-sized), its variants 0..variants-1 as
    classes. outdir: also write particles.star, particles.mrcs, truth.star and the maps there
    (as `cryomap simulate`). imperfections: a `cryomap.imperfections.Imperfections` (defocus
    per micrograph, heights, CTF-estimation error, amplitude spread, junk, coloured noise;
    docs/simulate.md); the true values are in `.truth`.
    """
    from .particles import output_stack_name
    from .simulate import STACK_NAME, simulate_particles, write_simulation

    if maps is None:
        vols = [Volume.phantom(box, pixel_size, seed, k, scale) for k in range(variants)]
    else:
        vols = [maps] if isinstance(maps, Volume) else list(maps)
        if not vols or not all(isinstance(v, Volume) and v.ndim == 3 for v in vols):
            raise TypeError("simulate: maps must be a 3D Volume or a list of them")
        pixel_size = vols[0].pixel_size
    pix = float(pixel_size)
    stack_name = STACK_NAME
    if outdir is not None:  # rlnImageName as RELION writes it: from the working folder
        stack_name = output_stack_name(Path(outdir) / STACK_NAME)
    images, optics, table, truth = simulate_particles(
        [np.asarray(v.data, np.float32) for v in vols], pix, n, snr=snr,
        defocus_range=defocus_range, astigmatism=astigmatism, max_shift_px=max_shift,
        seed=seed, voltage=voltage, cs=cs, amplitude_contrast=amplitude_contrast,
        bfactor=bfactor, ctf=ctf, class_fractions=class_fractions, stack_name=stack_name,
        imperfections=imperfections)
    paths: dict[str, Path] = {}
    if outdir is not None:
        paths = write_simulation(outdir, images, optics, table, truth, pix,
                                 truth_maps=[v.data for v in vols])
    particles = particles_from_images(images, pix, table.drop(columns=["rlnImageName"]),
                                      optics)
    return SimulationResult(particles, truth, vols, paths)


# -- refine -----------------------------------------------------------------------------------


@dataclass
class RefineResult:
    """A finished 3D refinement: the final `map` (both half-sets, regularised, RELION's
    run_class001.mrc), the unfiltered `half_maps`, the half-set `fsc` and its `resolution`
    (Å, FSC 0.143), the per-particle table `particles` (best poses, rlnRandomSubset,
    rlnMaxValueProbDistribution, ...), `outdir` (None in memory) and the final `state`."""

    map: Volume
    half_maps: tuple[Volume, Volume]
    fsc: FSC
    resolution: float
    particles: pd.DataFrame
    iterations: int
    outdir: Path | None
    state: object


def refine(particles: Particles, reference: Reference | None = None,
           outdir: PathLike | None = None, *, options=None, resume: bool = False,
           angpix: float | None = None, max_memory: float | None = None,
           threads: int | None = None, echo: Echo = print, ranks: Ranks | None = None,
           **option_values) -> RefineResult:
    """3D auto-refinement by MAP-EM with gold-standard half-sets (RELION's auto-refine;
    `cryomap refine`; docs/method.md).

    particles: a ParticleSet (read_particles, particles_from_images, simulate(...).particles)
        or a particle file path.
    reference: the initial map, a Volume or an MRC path (same box and pixel size as the
        particles); not needed to continue a run (resume=True).
    outdir: output folder (RELION's layout, as the command line); None: run in memory,
        no file written. Particles in memory are first saved there as particles.star/.mrcs.
    options: an em.refine.RefineOptions; option_values replace its fields, e.g.
        healpix_order=2, ini_high=40, particle_diameter=180, sym="C1", iterations=None
        (auto-refine until converged), use_ctf=True, seed=0 (the command's options, with
        underscores; `cryomap refine --help` lists them with their defaults).
    resume: continue the run in outdir from its last finished iteration.
    angpix: pixel size (Å) for a particle file that lacks one.
    max_memory: memory budget (GiB; default 80% of the available).
    threads: OpenMP threads (set_threads); echo: where the log lines go (None: silent).
    ranks: the processes that run the job (a parallel.Ranks; None: this one alone; under
        mpirun, `cryomap.parallel.mpi` passes its MPIContext).

    Raises cryomap.errors.InputError (one line) for any bad input, before any file is
    written.
    """
    from .em.refine import RefineOptions
    from .jobs.refine import refine as run_refine
    from .jobs.refine import refine_table

    opts = _options(RefineOptions, options, option_values)
    _check_reference(reference)
    set_threads(threads)
    ps = _particles(particles, angpix)
    source = _prepare_output(outdir, resume, ps, "refine", opts, reference)
    state = run_refine(source, reference, outdir, opts, resume=resume, echo=echo,
                       max_memory=max_memory, ranks=ranks)
    if not isinstance(source, ParticleSet):
        ps = read_particles(source)
    pix = ps.grid_pixel_size
    maps = state.final_maps
    fsc = FSC(np.asarray(state.fsc, np.float64), ps.grid_box, pix)
    return RefineResult(
        map=Volume(np.asarray(maps[0], np.float32), pix),
        half_maps=(Volume(np.asarray(maps[1], np.float32), pix),
                   Volume(np.asarray(maps[2], np.float32), pix)),
        fsc=fsc, resolution=float(state.history[-1].resolution) if state.history
        else fsc.resolution(),
        particles=refine_table(ps, state), iterations=int(state.iteration),
        outdir=None if outdir is None else Path(outdir), state=state)


# -- classification ---------------------------------------------------------------------------


@dataclass
class ClassifyResult:
    """A finished classification: the class `maps` (3D Volumes, or 2D images as Volumes),
    their `distribution` (the class prior, sums to 1), the per-particle table `particles`
    (rlnClassNumber 1-based, best pose, statistics), `outdir` (None in memory) and the final
    `state`."""

    maps: list[Volume]
    distribution: np.ndarray
    particles: pd.DataFrame
    iterations: int
    outdir: Path | None
    state: object

    @property
    def class_sizes(self) -> np.ndarray:
        """Particles whose most probable class is k, for k = 1..K (index k - 1)."""
        k = len(self.maps)
        return np.bincount(self.particles["rlnClassNumber"].to_numpy() - 1, minlength=k)


def _classify(ndim: int, particles: Particles, reference, outdir, options, resume: bool,
              angpix, max_memory, threads, echo: Echo, ranks: Ranks | None,
              option_values: dict, heterogeneous: bool = False) -> ClassifyResult:
    from .em.classify import ClassOptions
    from .jobs.classify import class_table
    from .jobs.classify import classify2d as run_2d
    from .jobs.classify import classify3d as run_3d

    if "ndim" in option_values or (options is not None and options.ndim != ndim):
        raise ValueError(f"classify{ndim}d: options.ndim must be {ndim}")
    opts = _options(ClassOptions, options or ClassOptions.defaults(ndim, heterogeneous),
                    option_values)
    _check_reference(reference)
    set_threads(threads)
    ps = _particles(particles, angpix)
    kind = "hetero_refine" if opts.heterogeneous else f"class{ndim}d"
    source = _prepare_output(outdir, resume, ps, kind, opts, reference)
    if ndim == 3:
        state = run_3d(source, reference, outdir, opts, resume=resume, echo=echo,
                       max_memory=max_memory, ranks=ranks)
    else:
        state = run_2d(source, outdir, opts, reference, resume=resume, echo=echo,
                       max_memory=max_memory, ranks=ranks)
    if not isinstance(source, ParticleSet):
        ps = read_particles(source)
    pix = ps.grid_pixel_size
    return ClassifyResult(
        maps=[Volume(np.asarray(r, np.float32), pix) for r in state.references],
        distribution=np.asarray(state.distribution, np.float64),
        particles=class_table(ps, state, opts), iterations=int(state.iteration),
        outdir=None if outdir is None else Path(outdir), state=state)


def classify3d(particles: Particles, reference: Reference | Sequence[Volume] | None = None,
               outdir: PathLike | None = None, *, options=None, resume: bool = False,
               angpix: float | None = None, max_memory: float | None = None,
               threads: int | None = None, echo: Echo = print, ranks: Ranks | None = None,
               **option_values) -> ClassifyResult:
    """3D classification into K classes by MAP-EM (RELION's Class3D; `cryomap class3d`;
    docs/method.md).

    reference: one map (every class starts from it, low-passed to ini_high and perturbed),
    a list of K maps, or an MRC / STAR path as on the command line. option_values replace
    fields of em.classify.ClassOptions (defaults as `cryomap class3d`: n_classes=4,
    tau2_fudge=4, class_temperature=4, iterations=25), e.g. n_classes=2, iterations=10,
    healpix_order=2. Other arguments as `refine`.
    """
    return _classify(3, particles, reference, outdir, options, resume, angpix, max_memory,
                     threads, echo, ranks, option_values)


def hetero_refine(particles: Particles, reference: Reference | Sequence[Volume] | None = None,
                  outdir: PathLike | None = None, *, options=None, resume: bool = False,
                  angpix: float | None = None, max_memory: float | None = None,
                  threads: int | None = None, echo: Echo = print, ranks: Ranks | None = None,
                  **option_values) -> ClassifyResult:
    """Heterogeneous refinement of K classes with gold-standard half-sets per class
    (cryoSPARC's job; `cryomap hetero_refine`; docs/method.md, "Heterogeneous refinement").
    Arguments as `classify3d`; defaults as the command (`ClassOptions.defaults(3,
    heterogeneous=True)`: tau2_fudge=1, class_temperature=1, iterations=20). The result's
    `state.half_unfiltered` (2, K, N, N, N) holds each class's half maps, `state.class_fsc`
    their FSC."""
    return _classify(3, particles, reference, outdir, options, resume, angpix, max_memory,
                     threads, echo, ranks, option_values, heterogeneous=True)


def classify2d(particles: Particles, outdir: PathLike | None = None, *,
               reference: Reference | Sequence[Volume] | None = None, options=None,
               resume: bool = False, angpix: float | None = None,
               max_memory: float | None = None, threads: int | None = None,
               echo: Echo = print, ranks: Ranks | None = None,
               **option_values) -> ClassifyResult:
    """2D classification into K class averages (RELION's Class2D; `cryomap class2d`).

    reference: None (averages of random subsets), an image or a list of K images (2D
    Volumes), or a file as on the command line. option_values replace fields of
    em.classify.ClassOptions (defaults as `cryomap class2d`: n_classes=50, tau2_fudge=2,
    psi_step=10, iterations=25). Other arguments as `refine`.
    """
    return _classify(2, particles, reference, outdir, options, resume, angpix, max_memory,
                     threads, echo, ranks, option_values)


# -- reconstruct ------------------------------------------------------------------------------


@dataclass
class ReconstructResult:
    """A map from particles at known poses: `map` (regularised, from both half-sets or the
    chosen one), the unfiltered `half_maps` (both half-sets only, else None), the half-set
    `fsc` and `resolution` (Å, FSC 0.143), the per-particle table `particles` (the particles
    used; with both half-sets, rlnRandomSubset is the half each went into) and the files
    written (`paths`, [] in memory)."""

    map: Volume
    half_maps: tuple[Volume, Volume] | None
    fsc: FSC
    resolution: float
    n_particles: int
    particles: pd.DataFrame
    paths: list[Path]
    state: object


def reconstruct(particles: Particles, output: PathLike | None = None, *, sym: str = "C1",
                ctf: bool = False, subset: int | None = None, angpix: float | None = None,
                maxres: float | None = None, seed: int = 0, threads: int | None = None,
                echo: Echo = print, ranks: Ranks | None = None, classes: bool = False
                ) -> ReconstructResult | dict[int, ReconstructResult]:
    """The map of particles at their poses (rlnAngleRot/Tilt/Psi, rlnOriginX/YAngst), as
    relion_reconstruct, on the refinement's regularised path (`cryomap reconstruct`;
    jobs.reconstruct). ctf: correct for the CTF (off by default, as relion_reconstruct);
    subset: only the particles of half-set 1 or 2; maxres: highest resolution used (Å).
    output: an .mrc path (plus <name>_half1/2.mrc) or None (nothing written); ranks as
    `refine`. classes: one map per class of rlnClassNumber (`<name>_class001.mrc` ...),
    returned as {class number: result}."""
    from .jobs.reconstruct import reconstruct as run_reconstruct

    if not isinstance(particles, (ParticleSet, str, os.PathLike)):
        raise TypeError(f"particles: expected a ParticleSet or a file path, got "
                        f"{type(particles).__name__}")
    set_threads(threads)
    r = run_reconstruct(particles, output, angpix=angpix, sym=sym, use_ctf=ctf,
                        subset=subset, maxres=maxres, seed=seed, echo=echo, ranks=ranks,
                        classes=classes)
    if classes:
        return {k: _reconstruct_result(one, subset) for k, one in r.items()}
    return _reconstruct_result(r, subset)


def _reconstruct_result(r, subset: int | None) -> ReconstructResult:
    """The API's typed result of one jobs.reconstruct result."""
    pix = r.pixel_size
    maps = r.state.final_maps
    return ReconstructResult(
        map=Volume(np.asarray(maps[0], np.float32), pix),
        half_maps=None if subset is not None else (
            Volume(np.asarray(maps[1], np.float32), pix),
            Volume(np.asarray(maps[2], np.float32), pix)),
        fsc=FSC(np.asarray(r.state.fsc, np.float64), int(maps.shape[-1]), pix),
        resolution=r.resolution, n_particles=r.n_particles, particles=r.table, paths=r.paths,
        state=r.state)
