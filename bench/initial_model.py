"""Ab-initio initial model benchmark (issue 14's "done when" figure).

Simulates a ribosome-sized phantom (full preset: box 64, 5 Å/px, 5000 particles, SNR 0.1,
astigmatic CTF, shifts up to 3 px) and, for each of --seeds random seeds:

1. `cryomap initial_model` from random maps (K = 1): its FSC-0.5 resolution against the truth
   after aligning it to the truth in the better of the two hands (the hand of an ab-initio map
   is unknown), and its wall time;
2. `cryomap refine` started from that initial model (as it came out, either hand): the final
   map's FSC-0.5 against the truth (aligned, better hand), and its wall time.

Once, besides: `cryomap refine` started from the truth low-passed to 40 Å (the same run as
bench/refine.py) and the true-pose reconstruction (the best any method can do on this set).
Seeds run in parallel processes (--jobs), each with --threads OpenMP threads; the reference
refinement runs at the same time in one more process (so --jobs 5 --threads 3 uses 18
threads). Prints one table; --out keeps the runs and
writes results.json.

    python bench/initial_model.py --jobs 5 --threads 3  # full preset, 16 cores: ~5-6 min
                                                        #   (estimated, see below)
    python bench/initial_model.py --quick               # box 32, 10 Å/px, 1000 particles, 2 seeds
    python bench/initial_model.py --seeds 1 --n 2000 --jobs 1 --threads 2

Estimate of the full preset, from CPU seconds measured on a 2-core machine: one initial model
(40 iterations, 5000 particles) takes about 85 CPU-s, one refinement of the set about 30 CPU-s
per iteration (12-15 iterations), a 64-px map alignment about 25 CPU-s; with 3 threads per
process that is about 4-5 minutes per seed, all seeds and the reference refinement at once.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path

import numpy as np

PRESETS = {
    # box, Å/px, particles, seeds, iterations, final resolution (Å)
    "full": dict(box=64, angpix=5.0, n=5000, seeds=5, iter=40, fin_high=20.0),
    "quick": dict(box=32, angpix=10.0, n=1000, seeds=2, iter=24, fin_high=25.0),
}
#: The issue's target: initial model FSC-0.5 vs truth (either hand) at least this good.
TARGET = 40.0


def diameter_of(box: int, pix: float) -> float:
    return 0.8 * box * pix


def simulate(root: Path, box: int, pix: float, n: int, snr: float, seed: int) -> None:
    """The particle set (particles.star, truth.star), truth.mrc and start.mrc (truth
    low-passed to 40 Å)."""
    from cryomap.fourier import initial_lowpass
    from cryomap.io.mrc import write_map
    from cryomap.phantom import RIBOSOME_SCALE, make_phantom
    from cryomap.simulate import simulate_particles, write_simulation

    truth = make_phantom(box, pix, scale=RIBOSOME_SCALE * diameter_of(box, pix) / 256.0)
    sim = simulate_particles(truth, pix, n, snr=snr, seed=seed, max_shift_px=3.0,
                             astigmatism=1000.0)
    write_simulation(root, *sim, pixel_size=pix, truth_maps=truth)
    write_map(root / "truth.mrc", truth, pix)
    write_map(root / "start.mrc", initial_lowpass(truth.astype(np.float64), 40.0, pix)
              .astype(np.float32), pix)


def resolution_vs_truth(volume: np.ndarray, truth: np.ndarray, pix: float,
                        align: bool) -> tuple[float, bool]:
    """FSC-0.5 resolution (Å, interpolated) of a map against the truth; with align=True after
    moving it onto the truth in the better hand. Returns (resolution, mirrored)."""
    from cryomap.em.validation import align_maps
    from cryomap.resolution import fsc_maps, resolution_angstrom

    volume = np.asarray(volume, np.float64)
    mirrored = False
    if align:
        a = align_maps(volume, truth, pix, resolution=max(2.5 * pix, 20.0), mirror=True)
        volume, mirrored = a.aligned, a.mirrored
    box = truth.shape[0]
    return resolution_angstrom(fsc_maps(volume, truth), box, pix, 0.5, interpolate=True), mirrored


def _refine_options(box: int, pix: float):
    from cryomap.em.refine import RefineOptions

    return RefineOptions(particle_diameter=diameter_of(box, pix), ini_high=40.0,
                         offset_range=5, offset_step=2)


def run_seed(root: str, seed: int, cfg: dict, threads: int, refine_too: bool) -> dict:
    """Initial model with `seed`, then a refinement from it."""
    from cryomap._kernels import set_threads
    from cryomap.em.initial_model import InitialModelOptions
    from cryomap.io.mrc import read_map
    from cryomap.jobs.initial_model import initial_model
    from cryomap.jobs.refine import refine

    set_threads(threads)
    root_p = Path(root)
    truth, pix = read_map(root_p / "truth.mrc")
    truth = truth.astype(np.float64)
    box = truth.shape[0]
    out = root_p / f"initial_model_seed{seed}"
    options = InitialModelOptions(particle_diameter=diameter_of(box, pix), seed=seed,
                                  iterations=cfg["iter"], fin_high=cfg["fin_high"],
                                  offset_range=4, offset_step=2)
    t0 = time.perf_counter()
    state = initial_model(root_p / "particles.star", out, options, echo=None)
    wall_init = time.perf_counter() - t0
    res_init, mirrored = resolution_vs_truth(state.references[0], truth, pix, align=True)
    result = {"seed": seed, "initial_resolution": res_init, "initial_mirrored": mirrored,
              "initial_wall": wall_init, "iterations": len(state.history),
              "initial_seconds_per_iteration": [h.seconds for h in state.history],
              "initial_cpu_seconds": float(sum(h.cpu_seconds for h in state.history))}
    if refine_too:
        t0 = time.perf_counter()
        rs = refine(root_p / "particles.star", out / "run_class001.mrc",
                    root_p / f"refine_seed{seed}", _refine_options(box, pix), echo=None)
        result["refine_wall"] = time.perf_counter() - t0
        result["refine_resolution"], result["refine_mirrored"] = resolution_vs_truth(
            rs.final_maps[0], truth, pix, align=True)
        result["refine_iterations"] = len(rs.history)
        result["refine_half_set"] = float(rs.history[-1].resolution)
    return result


def run_reference(root: str, threads: int) -> dict:
    """Refinement from the truth low-passed to 40 Å, and the true-pose reconstruction."""
    from cryomap._kernels import set_threads
    from cryomap.em.data import ImageSource
    from cryomap.em.reconstruct import reconstruct_known_poses
    from cryomap.em.refine import mask_radius_px
    from cryomap.io.mrc import read_map
    from cryomap.io.star import read_star
    from cryomap.jobs.refine import refine
    from cryomap.particles import load_particles

    set_threads(threads)
    root_p = Path(root)
    truth, pix = read_map(root_p / "truth.mrc")
    truth = truth.astype(np.float64)
    box = truth.shape[0]
    options = _refine_options(box, pix)
    t0 = time.perf_counter()
    rs = refine(root_p / "particles.star", root_p / "start.mrc", root_p / "refine_truth",
                options, echo=None)
    wall = time.perf_counter() - t0
    res, _ = resolution_vs_truth(rs.final_maps[0], truth, pix, align=False)
    df = read_star(root_p / "truth.star")["particles"]
    angles = df[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy()
    origins = df[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy() / pix
    particles = load_particles(root_p / "particles.star")
    source = ImageSource(particles, mask_radius_px(options, box, pix), options.mask_edge)
    oracle = reconstruct_known_poses(source, angles, origins, rs.subset, options)
    particles.close()
    res_oracle, _ = resolution_vs_truth(oracle.final_maps[0], truth, pix, align=False)
    return {"refine_resolution": res, "refine_wall": wall, "refine_iterations": len(rs.history),
            "refine_half_set": float(rs.history[-1].resolution), "oracle": res_oracle}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the small preset (box 32, 10 Å/px)")
    p.add_argument("--seeds", type=int, default=None, help="number of seeds (1, 2, ...)")
    p.add_argument("--n", type=int, default=None, help="particles")
    p.add_argument("--box", type=int, default=None, help="box (px)")
    p.add_argument("--angpix", type=float, default=None, help="pixel size (Å)")
    p.add_argument("--iter", type=int, default=None, help="initial-model iterations")
    p.add_argument("--fin_high", type=float, default=None,
                   help="initial model's final resolution (Å)")
    p.add_argument("--snr", type=float, default=0.1)
    p.add_argument("--threads", type=int, default=1, help="OpenMP threads per process")
    p.add_argument("--jobs", type=int, default=1, help="parallel processes for the seeds "
                   "(the reference refinement runs in one more process at the same time)")
    p.add_argument("--no-refine", dest="refine", action="store_false",
                   help="initial models only (no refinements)")
    p.add_argument("--out", help="keep the runs in this folder (default: a temporary one)")
    args = p.parse_args()
    cfg = dict(PRESETS["quick" if args.quick else "full"])
    for key in ("box", "angpix", "n", "seeds", "iter", "fin_high"):
        if getattr(args, key) is not None:
            cfg[key] = getattr(args, key)
    box, pix = cfg["box"], cfg["angpix"]
    if args.out:
        root = Path(args.out)
        if root.exists():
            shutil.rmtree(root)
        root.mkdir(parents=True)
    else:
        root = Path(tempfile.mkdtemp(prefix="cryomap_bench_abi_"))
    print(f"cryomap initial_model benchmark: box {box}, {pix:g} Å/px, {cfg['n']} particles, "
          f"SNR {args.snr:g}, CTF; {cfg['seeds']} seeds, {cfg['iter']} iterations to "
          f"{cfg['fin_high']:g} Å; {args.jobs} processes x {args.threads} threads", flush=True)
    t_all = time.perf_counter()
    simulate(root, box, pix, cfg["n"], args.snr, seed=1)
    print(f"simulated in {time.perf_counter() - t_all:.1f} s", flush=True)
    seeds = list(range(1, cfg["seeds"] + 1))
    # each process's BLAS and OpenMP pools at --threads (the children inherit the variables)
    for var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
        os.environ[var] = str(args.threads)
    ctx = mp.get_context("spawn")  # no fork after OpenMP has started
    results = []
    # the seeds in --jobs processes; the reference refinement in one more, at the same time
    with ProcessPoolExecutor(max_workers=args.jobs, mp_context=ctx) as pool, \
            ProcessPoolExecutor(max_workers=1, mp_context=ctx) as extra:
        ref = extra.submit(run_reference, str(root), args.threads) if args.refine else None
        futures = [pool.submit(run_seed, str(root), s, cfg, args.threads, args.refine)
                   for s in seeds]
        for f in as_completed(futures):
            r = f.result()
            results.append(r)
            print(f"seed {r['seed']} done after {time.perf_counter() - t_all:.0f} s: "
                  f"{json.dumps({k: v for k, v in r.items() if 'per_iteration' not in k})}",
                  flush=True)
        reference = ref.result() if ref is not None else None
    results.sort(key=lambda r: r["seed"])
    total = time.perf_counter() - t_all

    print(f"\n{'seed':>4} {'initial FSC0.5':>15} {'hand':>8} {'init wall':>10} {'s/iter':>7}"
          + (f" {'refined FSC0.5':>15} {'refine wall':>12} {'iters':>6}" if args.refine
             else ""))
    for r in results:
        line = (f"{r['seed']:>4} {r['initial_resolution']:>13.1f} Å "
                f"{'mirror' if r['initial_mirrored'] else 'same':>8} {r['initial_wall']:>9.0f}s "
                f"{np.median(r['initial_seconds_per_iteration']):>6.1f}s")
        if args.refine:
            line += (f" {r['refine_resolution']:>13.1f} Å {r['refine_wall']:>11.0f}s "
                     f"{r['refine_iterations']:>6}")
        print(line)
    good = sum(r["initial_resolution"] <= TARGET for r in results)
    print(f"initial models at <= {TARGET:g} Å (FSC 0.5 vs truth, either hand): {good} of "
          f"{len(results)}")
    if reference is not None:
        print(f"refinement from the truth low-passed to 40 Å: {reference['refine_resolution']:.1f}"
              f" Å (FSC 0.5 vs truth), {reference['refine_wall']:.0f} s, "
              f"{reference['refine_iterations']} iterations; true-pose reconstruction "
              f"{reference['oracle']:.1f} Å")
        ratios = [r["refine_resolution"] / reference["refine_resolution"] for r in results]
        print("refined from the initial model / from the truth (resolution ratio): "
              + " ".join(f"{x:.3f}" for x in ratios))
    cpu = sum(r["initial_cpu_seconds"] for r in results) / len(results)
    print(f"initial model CPU time (all threads) per seed: {cpu:.0f} s")
    print(f"total wall time {total:.0f} s")
    (root / "results.json").write_text(json.dumps(
        {"config": cfg, "snr": args.snr, "threads": args.threads, "jobs": args.jobs,
         "seeds": results, "reference": reference, "total_wall": total}, indent=1))
    if not args.out:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
