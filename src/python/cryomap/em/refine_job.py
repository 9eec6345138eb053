"""The refinement job: inputs checked, iterations run, RELION-layout outputs written, resume.

Outputs in `outdir` (CONVENTIONS §9): per iteration `run_itNNN_half{1,2}_class001.mrc`,
`run_itNNN_model.star`, `run_itNNN_data.star`, `run_itNNN_state.npz` (exact state for
--continue); at the end `run_class001.mrc`, `run_model.star`, `run_data.star`, `run_fsc.png`
and `run.log`.
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..io.atomic import atomic_path
from ..io.mrc import read_map
from ..particles import ParticleSet, load_particles
from ..sampling import orientations_3d
from .data import ImageSource
from .output import (
    iteration_root,
    model_blocks,
    particle_table,
    plot_fsc,
    write_data_star,
    write_model_star,
    write_text_atomic,
    write_volume,
)
from .refine3d import (
    HalfState,
    RefineOptions,
    RefineState,
    combined_map,
    initial_state,
    run_iteration,
)

PIXEL_TOLERANCE = 0.001  # Å, as RELION (§11)


def check_reference(reference: np.ndarray, ref_pixel: float, particles: ParticleSet,
                    ref_path: str | Path) -> None:
    """The reference's box and pixel size must match the particles (§11)."""
    if reference.ndim != 3:
        raise InputError(f"{ref_path}: expected a 3D map, got {reference.ndim} dimensions")
    if reference.shape[0] != particles.box:
        raise InputError(f"{ref_path}: box {reference.shape[0]} does not match the particles' "
                         f"rlnImageSize {particles.box}")
    if abs(ref_pixel - particles.pixel_size) > PIXEL_TOLERANCE:
        raise InputError(f"{ref_path}: pixel size {ref_pixel:.4f} Å does not match the "
                         f"particles' rlnImagePixelSize {particles.pixel_size:.4f} Å")


def _save_state(path: Path, state: RefineState) -> None:
    arrays = {
        "sigma2": state.sigma2, "subset": state.subset, "angles": state.angles,
        "origins_px": state.origins_px, "max_prob": state.max_prob,
        "n_significant": state.n_significant, "log_likelihood": state.log_likelihood,
        "fsc": state.fsc, "tau2": state.tau2,
        "scalars": np.array([state.r_max, state.iteration]),
        "history": np.array(json.dumps([asdict(h) for h in state.history])),
    }
    for h, half in enumerate(state.half):
        for name in ("volume", "data", "weight", "volume_ft"):
            arrays[f"half{h + 1}_{name}"] = getattr(half, name)
    with atomic_path(path, suffix=".npz") as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **{k: v for k, v in arrays.items() if v is not None})


def _load_state(path: Path, options: RefineOptions) -> RefineState:
    from .refine3d import IterationStats

    z = np.load(path)
    half = []
    for h in (1, 2):
        half.append(HalfState(*(z[f"half{h}_{n}"] if f"half{h}_{n}" in z else None
                                for n in ("volume", "data", "weight", "volume_ft"))))
    state = RefineState(options=options, half=half, sigma2=z["sigma2"], r_max=int(z["scalars"][0]),
                        subset=z["subset"], angles=z["angles"], origins_px=z["origins_px"],
                        max_prob=z["max_prob"], n_significant=z["n_significant"],
                        log_likelihood=z["log_likelihood"],
                        fsc=z["fsc"] if "fsc" in z else None,
                        tau2=z["tau2"] if "tau2" in z else None,
                        iteration=int(z["scalars"][1]))
    state.history = [IterationStats(**d) for d in json.loads(str(z["history"]))]
    return state


def saved_job(outdir: str | Path) -> tuple[str, str, RefineOptions]:
    """(particles STAR, reference, options) of the run in outdir, for --continue."""
    path = Path(outdir) / "job.json"
    if not path.exists():
        raise InputError(f"{path}: no refinement to continue here (job.json missing)")
    job = json.loads(path.read_text())
    return job["i"], job["ref"], RefineOptions(**job["options"])


def open_output(outdir: str | Path, resume: bool) -> Path:
    """Create the output folder; a fresh run refuses a folder that already holds a run, so a
    later --continue can never resume from a stale one."""
    outdir = Path(outdir)
    outdir.mkdir(parents=True, exist_ok=True)
    if not resume and last_iteration(outdir) is not None:
        raise InputError(f"{outdir}: already holds a run (run_itNNN_state.npz); use --continue "
                         "to resume it or choose another --o")
    return outdir


def last_iteration(outdir: Path) -> int | None:
    """Number of the last finished iteration in an output folder (its state file exists)."""
    its = [int(m.group(1)) for p in outdir.glob("run_it*_state.npz")
           if (m := re.match(r"run_it(\d{3})_state\.npz$", p.name))]
    return max(its) if its else None


class Log:
    """run.log plus console lines."""

    def __init__(self, path: Path, echo: Callable[[str], None] | None = print) -> None:
        self.path, self.echo = path, echo
        self.lines: list[str] = path.read_text().splitlines() if path.exists() else []

    def __call__(self, line: str) -> None:
        self.lines.append(line)
        write_text_atomic(self.path, "\n".join(self.lines) + "\n")
        if self.echo is not None:
            self.echo(line)


def _progress_bar(total: int, desc: str):
    """tqdm on a terminal, nothing otherwise (plain log lines carry the progress)."""
    if not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="ptcl", leave=False)


def refine(star: str | Path, reference_path: str | Path, outdir: str | Path,
           options: RefineOptions, resume: bool = False,
           echo: Callable[[str], None] | None = print,
           stop_after_no_improvement: int = 3) -> RefineState:
    """Run (or, with resume=True, continue) a 3D refinement; returns the final state."""
    outdir = open_output(outdir, resume)
    log = Log(outdir / "run.log", echo)
    particles = load_particles(star)
    require_ctf(particles, star, options)
    reference, ref_pixel = read_map(reference_path)
    check_reference(reference, ref_pixel, particles, reference_path)
    box, pix = particles.box, particles.pixel_size
    source, t_io = image_source(particles, options)
    last = last_iteration(outdir) if resume else None
    if last is not None:
        state = _load_state(outdir / f"run_it{last:03d}_state.npz", options)
        log(f"continuing from iteration {last} in {outdir}")
    else:
        state = initial_state(particles, reference, source, options)
        write_text_atomic(outdir / "job.json", json.dumps(
            {"i": str(Path(star).resolve()), "ref": str(Path(reference_path).resolve()),
             "options": asdict(options)}, indent=1))
        log(f"cryomap refine: {particles.n_particles} particles, box {box}, {pix:.3f} Å/px, "
            f"{len(orientations_3d(options.healpix_order, options.psi_step))} orientations, "
            f"options {json.dumps(asdict(options))}")
    log(f"images read and transformed in {t_io:.1f} s")
    best, stale = None, 0
    for h in state.history:
        if best is None or h.resolution < best - 1e-6:
            best, stale = h.resolution, 0
        else:
            stale += 1
    while state.iteration < options.iterations:
        bar = _progress_bar(particles.n_particles, f"iteration {state.iteration + 1}")
        stats = run_iteration(state, source, bar.update if bar is not None else None)
        if bar is not None:
            bar.close()
        _write_iteration(outdir, state, particles, box, pix)
        t = stats.timings
        log(f"iteration {stats.iteration:3d}: r_max {stats.r_max:3d} px, resolution "
            f"{stats.resolution:.2f} Å (FSC 0.143), {stats.resolution_05:.2f} Å (0.5), "
            f"objective {stats.objective:.6e} (log-lik {stats.log_likelihood:.6e}), "
            f"<Pmax> {stats.average_pmax:.3f}, <nsig> {stats.mean_n_significant:.1f}, "
            f"{stats.seconds:.1f} s (E-step {t.get('estep', 0):.1f}, sums "
            f"{t.get('sums', 0):.1f}, project {t.get('project', 0):.1f}, back-project "
            f"{t.get('backproject', 0):.1f}, reconstruct {t.get('reconstruct', 0):.1f}, "
            f"batches {t.get('io', 0):.1f})")
        if best is None or stats.resolution < best - 1e-6:
            best, stale = stats.resolution, 0
        else:
            stale += 1
        if stale >= stop_after_no_improvement:
            log(f"resolution has not improved for {stale} iterations: stopping")
            break
    final = combined_map(state.half, state.fsc, options, state.r_max, box)
    write_volume(outdir / "run_class001.mrc", final, pix)
    write_model_star(outdir / "run_model.star",
                     model_blocks(state, box, pix, ["run_class001.mrc"]))
    write_data_star(outdir / "run_data.star", particles, particle_table(particles, state, pix))
    res = state.history[-1].resolution if state.history else float("nan")
    plot_fsc(outdir / "run_fsc.png", state.fsc, box, pix, res)
    log(f"final resolution {res:.2f} Å (half-map FSC 0.143); map {outdir / 'run_class001.mrc'}")
    particles.close()
    return state


def require_ctf(particles: ParticleSet, star: str | Path, options: RefineOptions) -> None:
    """CTF correction needs defocus columns (one clear line otherwise)."""
    if options.use_ctf and not particles.has_ctf:
        raise InputError(f"{star}: no CTF columns (rlnDefocusU, rlnDefocusV); "
                         "use --no-ctf for CTF-free data")


def image_source(particles: ParticleSet, options: RefineOptions) -> tuple[ImageSource, float]:
    """The particles' masked FTs for a job, and the seconds spent reading them."""
    t0 = time.perf_counter()
    source = ImageSource(particles, mask_radius_px(options, particles.box, particles.pixel_size),
                         options.mask_edge, options.use_ctf)
    return source, time.perf_counter() - t0


def mask_radius_px(options: RefineOptions, box: int, pix: float) -> float:
    """Particle mask radius in px: diameter/2, default (N - 5)/2 - edge (RELION's default)."""
    if options.particle_diameter is None:
        return (box - 5) / 2.0 - options.mask_edge
    return options.particle_diameter / (2.0 * pix)


def _write_iteration(outdir: Path, state: RefineState, particles: ParticleSet, box: int,
                     pix: float) -> None:
    root = iteration_root(outdir, state.iteration)
    for h, half in enumerate(state.half):
        write_volume(Path(f"{root}_half{h + 1}_class001.mrc"), half.volume, pix)
    write_model_star(Path(f"{root}_model.star"),
                     model_blocks(state, box, pix, [f"{root.name}_half1_class001.mrc"]))
    write_data_star(Path(f"{root}_data.star"), particles, particle_table(particles, state, pix))
    _save_state(Path(f"{root}_state.npz"), state)
