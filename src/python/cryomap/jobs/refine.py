"""The refinement job: inputs checked, the auto-refine schedule run, RELION-layout outputs.

Outputs in `outdir`: per iteration `run_itNNN_half{1,2}_class001.mrc`, `run_itNNN_model.star`,
`run_itNNN_data.star` and `run_itNNN_state.npz` (exact state for --continue); at the end
`run_class001.mrc` (both halves together), `run_half{1,2}_class001_unfil.mrc`,
`run_model.star`, `run_data.star`, `run_fsc.png` and `run.log`; the last log line is the
`cryomap postprocess` command for the two unfiltered half maps.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path

import numpy as np
import pandas as pd

from ..em.data import ImageSource
from ..em.model import ssnr_from_fsc
from ..em.options import max_memory_bytes
from ..em.refine import (
    Refinement,
    RefineOptions,
    RefineState,
    initial_state,
    mask_radius_px,
    refine_iteration,
    split_halves,
)
from ..errors import InputError
from ..io.mrc import read_map
from ..masks import check_mask
from ..parallel import SINGLE, Ranks
from ..particles import ParticleSet, load_particles
from ..projector import reference_radius
from .base import (
    Job,
    MemoryPlan,
    aberration_notes,
    check_particles_for_em,
    find_resume_point,
    grid_notes,
    iteration_root,
    plan_job_memory,
)
from .base import saved_run as base_saved_run
from .output import (
    ModelFigures,
    model_blocks,
    particle_table,
    plot_fsc,
    write_data_star,
    write_model_star,
    write_volume,
)

PIXEL_TOLERANCE = 0.001  # Å, as RELION


def check_reference(reference: np.ndarray, ref_pixel: float, particles: ParticleSet,
                    ref_path: str | Path) -> None:
    """The reference's box and pixel size must match the particles."""
    if reference.ndim != 3:
        raise InputError(f"{ref_path}: expected a 3D map, got {reference.ndim} dimensions")
    if reference.shape[0] != particles.grid_box:
        raise InputError(f"{ref_path}: box {reference.shape[0]} does not match the particles' "
                         f"rlnImageSize {particles.grid_box}")
    if abs(ref_pixel - particles.grid_pixel_size) > PIXEL_TOLERANCE:
        raise InputError(f"{ref_path}: pixel size {ref_pixel:.4f} Å does not match the "
                         f"particles' rlnImagePixelSize {particles.grid_pixel_size:.4f} Å")


def require_ctf(particles: ParticleSet, star: str | Path, use_ctf: bool) -> None:
    """CTF correction needs defocus columns (one clear line otherwise)."""
    if use_ctf and not particles.has_ctf:
        raise InputError(f"{star}: no CTF columns (rlnDefocusU, rlnDefocusV); "
                         "use --no-ctf for CTF-free data")


def read_solvent_mask(path: str | Path | None, particles: ParticleSet) -> np.ndarray | None:
    """The --solvent_mask map (float64), checked: the particles' box, values in [0, 1]
    (`masks.check_mask`; InputError naming the file otherwise). None without a mask."""
    if path is None:
        return None
    mask, _ = read_map(path)
    if mask.ndim != 3:
        raise InputError(f"--solvent_mask {path}: expected a 3D map, got {mask.ndim} "
                         f"dimensions")
    check_mask(mask, (particles.grid_box,) * 3, f"--solvent_mask {path}")
    return np.clip(np.asarray(mask, np.float64), 0.0, 1.0)


def postprocess_command(outdir: Path, mask: str | Path | None) -> str:
    """The `cryomap postprocess` command for a finished refinement in outdir (RELION's next
    step), with its solvent mask or a placeholder."""
    name = outdir.name or "job001"
    return (f"cryomap postprocess --i {outdir / 'run_half1_class001_unfil.mrc'} --mask "
            f"{mask if mask is not None else '<mask.mrc>'} --o PostProcess/{name} --auto_bfac")


def image_source(particles: ParticleSet, options, cache_bytes: int | None = None,
                 ranks: Ranks = SINGLE) -> ImageSource:
    """The particles' masked FTs for a job (cached when they fit `cache_bytes`); under mpirun
    only this rank's particles' (`ranks`)."""
    return ranks.image_source(
        particles, mask_radius_px(options, particles.grid_box, particles.grid_pixel_size),
        options.mask_edge, options.use_ctf, cache_bytes)


class RefineJob(Job):
    """Auto-refinement of one map against two half-sets of particles."""

    kind = "refine"
    state_class = RefineState

    def __init__(self, particles: ParticleSet, star: str | Path, reference: np.ndarray | None,
                 reference_path: str | Path | None, outdir: str | Path,
                 options: RefineOptions, resume: bool = False,
                 echo: Callable[[str], None] | None = print,
                 memory: MemoryPlan | None = None,
                 solvent_mask: np.ndarray | None = None, ranks: Ranks = SINGLE) -> None:
        super().__init__(outdir, resume, echo, ranks)
        self.particles, self.star = particles, Path(star)
        self.notes += grid_notes(particles)
        self.notes += aberration_notes(particles, options.use_ctf)
        self.reference, self.reference_path = reference, reference_path
        self.options = options
        self.memory = memory
        cache = None if memory is None else (memory.parts.get("image cache", 0)
                                             if memory.cache else 0)
        self.refinement = Refinement(image_source(particles, options, cache, ranks), options,
                                     mask_radius_px(options, particles.grid_box,
                                                    particles.grid_pixel_size), solvent_mask)

    def initial_state(self) -> RefineState:
        o, p = self.options, self.particles
        rng = np.random.default_rng(o.seed)
        # rlnRandomSubset when valid, else a random split with a log line saying why
        subsets = split_halves(p, rng, log=self.notes.append)
        state = initial_state(self.refinement, self.reference, p.angles(),
                              p.origins_px(pixel_size=p.grid_pixel_size), subsets)
        if o.sym != "C1":
            from ..symmetry import point_group

            self.notes.append(f"symmetry {o.sym} ({point_group(o.sym).order} operators): "
                              f"orientations searched in its asymmetric unit, sums summed "
                              f"over the group")
        return state

    def description(self) -> dict:
        return {"i": str(self.star.resolve()),
                "ref": saved_reference(self.reference_path),
                "options": asdict(self.options)}

    def header(self) -> str:
        p = self.particles
        return (f"cryomap refine: {p.n_particles} particles, box {p.grid_box}, "
                f"{p.grid_pixel_size:.3f} Å/px, options {json.dumps(asdict(self.options))}")

    def finished(self, state: RefineState) -> bool:
        return state.schedule.final_done

    def iterate(self, state: RefineState) -> str:
        bar = self.progress_bar(self.particles.n_particles, f"iteration {state.iteration + 1}")
        s = refine_iteration(state, self.refinement, bar.update if bar is not None else None)
        if bar is not None:
            bar.close()
        t = s.timings
        if s.message:
            self.log(s.message)
        return (f"iteration {s.iteration:3d}{' (final)' if s.final else ''}: {s.stage}, "
                f"{s.mean_samples:.0f} samples/image ({s.orientations_level0} orientations "
                f"at level 0); r_max {s.r_max} px, resolution "
                f"{s.resolution:.2f} Å (FSC 0.143 of the unfiltered half maps out to "
                f"{s.recon_radius} px, {s.fsc_mask}), {s.resolution_05:.2f} Å (0.5); "
                f"changes {s.orientation_change:.2f} deg, {s.offset_change:.2f} px; "
                f"accuracy {s.accuracy_rot:.2f} deg, {s.accuracy_trans:.2f} px; <Pmax> "
                f"{s.average_pmax:.3f}, <nsig> {s.mean_n_significant:.0f}; E-step "
                f"{t.get('estep', 0):.1f} s, project {t.get('project', 0):.1f}, sums "
                f"{t.get('sums', 0):.1f}, back-project {t.get('backproject', 0):.1f}, "
                f"candidates {t.get('candidates', 0):.1f}, reconstruct "
                f"{t.get('reconstruct', 0):.1f}")

    def _figures(self, state: RefineState, names: list[str]) -> ModelFigures:
        o, p = self.options, self.particles
        box, pix = p.grid_box, p.grid_pixel_size
        last = state.history[-1] if state.history else None
        n = box // 2 + 1
        fsc = state.fsc if state.fsc is not None else np.zeros(n)
        from ..em.noise import NoiseModel

        noise = NoiseModel(state.sigma2)
        return ModelFigures(
            box=box, pixel_size=pix, class_names=names, class_distribution=np.ones(1),
            class_resolution_shell=np.array([last.resolution_shell if last else 1]),
            current_size=2 * int(last.r_max if last else state.r_max),
            ssnr=ssnr_from_fsc(fsc, o.tau2_fudge)[None],
            tau2=(state.tau2 if state.tau2 is not None else np.zeros(n))[None],
            sigma2=np.stack([noise.shell_spectrum(g) for g in range(noise.n_groups)]),
            log_likelihood=float(state.log_likelihood.sum()),
            average_pmax=float(state.max_prob.mean()), pad=o.pad, interp=o.interp,
            tau2_fudge=o.tau2_fudge, offset_sigma=state.offset_sigma * pix, fsc=fsc[None],
            # RELION's 999 before any accuracy was measured
            accuracy_rotations=float(last.accuracy_rot if last else 999.0),
            accuracy_translations=float(last.accuracy_trans if last else 999.0) * pix)

    def _data_table(self, state: RefineState):
        return refine_table(self.particles, state)

    def write_iteration(self, root: Path, state: RefineState) -> None:
        pix = self.particles.grid_pixel_size
        for h in (0, 1):
            write_volume(Path(f"{root}_half{h + 1}_class001.mrc"), state.volumes[h], pix)
        write_model_star(Path(f"{root}_model.star"),
                         model_blocks(self._figures(state, [f"{root.name}_half1_class001.mrc"])))
        write_data_star(Path(f"{root}_data.star"), self.particles, self._data_table(state))

    def write_final(self, state: RefineState) -> None:
        pix = self.particles.grid_pixel_size
        out = self.outdir
        maps = state.final_maps
        write_volume(out / "run_class001.mrc", maps[0], pix)
        write_volume(out / "run_half1_class001_unfil.mrc", maps[1], pix)
        write_volume(out / "run_half2_class001_unfil.mrc", maps[2], pix)
        write_model_star(out / "run_model.star",
                         model_blocks(self._figures(state, ["run_class001.mrc"])))
        write_data_star(out / "run_data.star", self.particles, self._data_table(state))
        last = state.history[-1] if state.history else None
        res = last.resolution if last else float("nan")
        plot_fsc(out / "run_fsc.png", state.fsc, self.particles.grid_box, pix, res)
        mask = last.fsc_mask if last else "no mask"
        self.log(f"final resolution {res:.2f} Å (FSC 0.143 of run_half1_class001_unfil.mrc "
                 f"and run_half2_class001_unfil.mrc, {mask}); map {out / 'run_class001.mrc'}")
        if self.options.solvent_mask is None:
            self.log(f"make a solvent mask, e.g. cryomap mask --i {out / 'run_class001.mrc'} "
                     f"--o {out / 'mask.mrc'} --lowpass 15 --ini_threshold <threshold> "
                     f"--extend_inimask 3 --width_soft_edge 6")
        self.log(f"post-process with: {postprocess_command(out, self.options.solvent_mask)}")


def particle_input(star: str | Path | ParticleSet, angpix: float | None = None
                   ) -> tuple[ParticleSet, Path]:
    """(particle set, the name messages and job.json give it) of a job's --i: a particle file
    (read and checked, `load_particles`) or a ParticleSet already in hand (the Python API;
    `angpix` must then be None)."""
    if isinstance(star, ParticleSet):
        if angpix is not None:
            raise InputError("--angpix: only for particles read from a file")
        return star, star.star_path
    return load_particles(star, angpix=angpix, log=None), Path(star)


def reference_input(reference) -> tuple[np.ndarray, float, str]:
    """(map, pixel size, name) of a --ref: an MRC path, or a map in hand (anything with
    `.data` and `.pixel_size`, e.g. a cryomap.Volume)."""
    if hasattr(reference, "data") and hasattr(reference, "pixel_size"):
        return np.asarray(reference.data), float(reference.pixel_size), "--ref (in memory)"
    data, pix = read_map(reference)
    return data, pix, str(reference)


def refine_table(particles: ParticleSet, state: RefineState) -> pd.DataFrame:
    """The particle table of a refinement (run_data.star's data_particles): the input
    columns, the best pose, rlnRandomSubset and the statistics."""
    return particle_table(particles, state, particles.grid_pixel_size, subset=state.subset)


def refine(star: str | Path | ParticleSet, reference_path, outdir: str | Path | None,
           options: RefineOptions, resume: bool = False,
           echo: Callable[[str], None] | None = print, angpix: float | None = None,
           max_memory: float | None = None, ranks: Ranks | None = None) -> RefineState:
    """Run (or, with resume=True, continue) a 3D refinement; returns the final state.
    Everything is checked before anything is written in `outdir`. max_memory: the memory
    budget in GiB (None: the default share of the available memory). ranks: the processes
    that run it (`parallel.Ranks`; None: this one alone).

    star: a particle file or a ParticleSet; reference_path: an MRC path or a map in hand
    (`reference_input`); outdir None: run in memory, no file written (`Job`)."""
    options.validate()
    budget = max_memory_bytes(max_memory)
    Job.check_output(outdir, resume)
    particles, star = particle_input(star, angpix)
    try:
        require_ctf(particles, star, options.use_ctf)
        check_particles_for_em(particles, options)
        start = (find_resume_point(outdir, RefineState, particles.n_particles)
                 if resume else None)
        reference = None
        if start is None or start.state is None:
            if reference_path is None:
                raise InputError("--ref: an initial map is required")
            reference, ref_pixel, ref_name = reference_input(reference_path)
            check_reference(reference, ref_pixel, particles, ref_name)
        solvent_mask = read_solvent_mask(options.solvent_mask, particles)
        if options.solvent_mask is not None:  # job.json: found again by --continue anywhere
            options = replace(options, solvent_mask=str(Path(options.solvent_mask).resolve()))
        ranks = ranks or SINGLE
        plan, options = plan_job_memory(particles, options, budget, refine_memory, ranks)
        job = RefineJob(particles, star, reference, reference_path, outdir, options, resume,
                        echo, plan, solvent_mask, ranks)
        job.notes.extend(particles.notes)
        return job.run(start)
    finally:
        particles.close()


def saved_reference(reference) -> str | None:
    """job.json's "ref": the absolute path of a file reference, None for none or a map in
    memory (a continued run never needs it: it starts from its saved state)."""
    if reference is None or hasattr(reference, "data"):
        return None
    return str(Path(reference).resolve())


def refine_memory(particles: ParticleSet, options: RefineOptions,
                  batch_memory: int | None = None) -> dict[str, int]:
    """Estimated peak memory of a refinement by part (its first stage at the full radius;
    local searches from the start when --healpix_order reaches --auto_local_healpix_order),
    without the image cache."""
    from .._kernels import core
    from ..em.memory import batch_size, estimate_memory
    from ..em.refine import AutoSampling

    bm = options.batch_memory if batch_memory is None else int(batch_memory)
    box, pix = particles.grid_box, particles.grid_pixel_size
    sigma_ang = options.sigma_ang
    sched = AutoSampling(options.healpix_order, options.offset_step, options.offset_range,
                         sigma_ang)
    if sigma_ang is None and options.healpix_order >= options.auto_local_healpix_order \
            and not options.fixed_poses:
        sched.sigma_ang = 2.0 * sched.fine_step(options)
    search = sched.search(options, 1, box // 2, 2 * mask_radius_px(options, box, pix) * pix,
                          None, options.fixed_poses)
    bsize = batch_size(search, 1, bm)
    parts = estimate_memory(particles.n_particles, box, pix, 1, search, 3, options.pad, bsize,
                            bm, core.max_threads(), 0)
    # the two half maps, their references and the final maps (3 maps), in float64
    parts["maps"] = parts.get("maps", 0) + 5 * box**3 * 8
    if options.nu:
        # --nu keeps each half's two folds' sums besides their pooled ones (four more
        # back-projectors) and makes the filter's maps (quarter maps, their phase-randomised
        # copies, the low-pass ladder, the local resolution): 16 maps in float64 at most
        m = reference_radius(box, options.pad, box // 2)
        parts["non-uniform filter"] = 4 * (2 * m + 1) ** 2 * (m + 1) * 12 + 16 * box**3 * 8
    return parts


def saved_job(outdir: str | Path) -> tuple[str, str | None, RefineOptions]:
    """(particles STAR, reference, options) of the run in outdir, for --continue."""
    job = saved_run(outdir)
    return job["i"], job["ref"], job["options"]


__all__ = ["RefineJob", "refine", "refine_table", "particle_input", "reference_input",
           "saved_reference", "saved_job", "saved_run", "check_reference", "require_ctf",
           "image_source", "iteration_root", "read_solvent_mask", "postprocess_command"]


def saved_run(outdir: str | Path) -> dict:
    """job.json of the refinement in outdir, its options as RefineOptions (`base.saved_run`)."""
    return base_saved_run(outdir, "refinement", ("refine",), RefineOptions)
