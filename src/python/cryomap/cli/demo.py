"""`cryomap demo`: phantom -> simulated particles -> refinement from a wrong start."""

from __future__ import annotations

import argparse
import shutil
import time
from pathlib import Path

import numpy as np

from ..errors import InputError
from .options import check_run_memory, seed_arg

COMMAND = "demo"
HELP = "simulate particles of the built-in phantom and refine them (no input files)"
DESCRIPTION = """\
The whole method on built-in data: the phantom (an asymmetric test molecule, scaled to fill
the particle mask) is projected at random poses with CTF and noise; an auto-refinement starts
from a deliberately wrong reference (the phantom low-passed to 40 A plus a random
low-frequency perturbation); outputs are written in
RELION's layout with run_fsc.png and sections.png (central sections of truth vs result). Prints
the final half-map resolution and the resolution of the FSC against the ground truth.

example:
  cryomap demo --o demo                       # 1000 particles, box 48, about a minute
  cryomap demo --o demo --n 500 --iter 4      # quicker: four iterations
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--o", default="demo", help="output folder (default demo)")
    p.add_argument("--box", type=int, default=48, help="box size (px)")
    p.add_argument("--angpix", type=float, default=3.5, help="pixel size (A)")
    p.add_argument("--n", type=int, default=1000, help="number of particles")
    p.add_argument("--snr", type=float, default=0.1, help="signal-to-noise ratio of the images")
    p.add_argument("--iter", type=int, default=None,
                   help="a fixed number of refinement iterations (default: until converged)")
    p.add_argument("--healpix_order", "--healpix-order", type=int, default=2,
                   help="HEALPix order of the orientation search")
    p.add_argument("--ini_high", "--ini-high", type=float, default=40.0,
                   help="resolution of the wrong start (A)")
    p.add_argument("--j", "--threads", dest="threads", type=int, default=None,
                   help="OpenMP threads")
    p.add_argument("--seed", type=seed_arg, default=0, help="random seed")


def wrong_start(volume: np.ndarray, pixel_size: float, resolution: float,
                rng: np.random.Generator, strength: float = 0.5) -> np.ndarray:
    """The map low-passed to `resolution` plus a random field low-passed the same way, with
    `strength` times the low-passed map's standard deviation."""
    from ..fourier import initial_lowpass

    low = initial_lowpass(volume, resolution, pixel_size)
    noise = initial_lowpass(rng.standard_normal(volume.shape), resolution, pixel_size)
    return low + strength * low.std() / noise.std() * noise


def save_sections(path: Path, truth: np.ndarray, result: np.ndarray) -> None:
    """PNG of the three central sections of truth (top) and result (bottom)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..io.atomic import atomic_path

    c = truth.shape[0] // 2
    fig, axes = plt.subplots(2, 3, figsize=(9, 6))
    for row, (vol, name) in enumerate(((truth, "truth"), (result, "refined"))):
        for col, (sec, label) in enumerate(((vol[c], "z"), (vol[:, c], "y"), (vol[:, :, c], "x"))):
            ax = axes[row, col]
            ax.imshow(sec, cmap="gray", origin="lower")
            ax.set_title(f"{name}, central {label} section")
            ax.axis("off")
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    from .._kernels import set_threads
    from ..em.refine import RefineOptions
    from ..em.validation import angular_errors
    from ..io.atomic import check_output_dir, make_output_dir, remove_stale_temps
    from ..io.mrc import check_pixel_size, read_map, write_map
    from ..io.star import read_star
    from ..jobs.output import plot_fsc
    from ..jobs.refine import refine
    from ..particles import output_stack_name
    from ..phantom import RIBOSOME_SCALE, make_phantom
    from ..resolution import fsc_maps, resolution_angstrom
    from ..simulate import STACK_NAME, simulate_particles, write_simulation

    # every option checked before the simulation is written
    out = Path(args.o)
    check_output_dir(out, "--o")
    if not 16 <= args.box <= 512:
        raise InputError(f"--box {args.box}: expected 16..512 px")
    check_pixel_size(args.angpix, "--angpix")
    if args.n < 2:
        raise InputError(f"--n {args.n}: expected at least 2 particles (two half-sets)")
    if not (np.isfinite(args.snr) and args.snr > 0):
        raise InputError(f"--snr {args.snr}: expected a finite signal-to-noise ratio > 0")
    if args.threads is not None and args.threads < 1:
        raise InputError(f"--j {args.threads}: expected at least 1 thread")
    diameter = 0.8 * args.box * args.angpix
    options = RefineOptions(iterations=args.iter, healpix_order=args.healpix_order,
                            offset_range=3.0, offset_step=1.0, ini_high=args.ini_high,
                            particle_diameter=diameter, seed=args.seed)
    options.validate()
    options.validate_for(args.box, args.angpix)
    check_run_memory({"images": 2 * args.n * args.box**2 * 4, "maps": 100 * args.box**3})
    set_threads(args.threads)
    make_output_dir(out, "--o")
    remove_stale_temps(out)
    t0 = time.perf_counter()
    # the built-in molecule scaled to fill the particle mask (a ribosome at 256 Å)
    truth = make_phantom(args.box, args.angpix, seed=args.seed,
                         scale=RIBOSOME_SCALE * diameter / 256.0)
    sim = simulate_particles(truth, args.angpix, args.n, snr=args.snr, seed=args.seed,
                             max_shift_px=2.0,
                             stack_name=output_stack_name(out / "particles" / STACK_NAME))
    write_simulation(out / "particles", *sim, pixel_size=args.angpix, truth_maps=truth)
    start = wrong_start(truth.astype(np.float64), args.angpix, args.ini_high,
                        np.random.default_rng(args.seed + 1))
    write_map(out / "initial_reference.mrc", start.astype(np.float32), args.angpix)
    print(f"simulated {args.n} particles (box {args.box}, {args.angpix} A/px, SNR {args.snr}) "
          f"in {time.perf_counter() - t0:.1f} s; refining from a {args.ini_high:.0f} A start")
    if (out / "refine").exists():  # the demo owns this folder: start it afresh
        shutil.rmtree(out / "refine")
    state = refine(out / "particles" / "particles.star", out / "initial_reference.mrc",
                   out / "refine", options)
    result, _ = read_map(out / "refine" / "run_class001.mrc")
    curve = fsc_maps(result.astype(np.float64), truth.astype(np.float64))
    res_truth = resolution_angstrom(curve, args.box, args.angpix, 0.143)
    res_truth05 = resolution_angstrom(curve, args.box, args.angpix, 0.5, interpolate=True)
    res_half = state.history[-1].resolution
    truth_df = read_star(out / "particles" / "truth.star")["particles"]
    true_angles = truth_df[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy()
    err = angular_errors(state.angles, true_angles)
    plot_fsc(out / "refine" / "run_fsc.png", state.fsc, args.box, args.angpix, res_half,
             fsc_truth=curve)
    save_sections(out / "sections.png", truth, result)
    print(f"final resolution {res_half:.1f} A (half-map FSC 0.143); FSC vs ground truth "
          f"{res_truth:.1f} A (0.143), {res_truth05:.1f} A (0.5); median orientation error "
          f"{np.median(err):.1f} deg after {len(state.history)} iterations; "
          f"total {time.perf_counter() - t0:.0f} s; outputs in {out}")
    return 0
