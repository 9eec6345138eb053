"""Auto-refine benchmark: accuracy against the best possible reconstruction, and cost by stage.

Accuracy (default): simulates a set, auto-refines it from the truth low-passed to 40 Å with
cryomap's defaults and prints

- the FSC-0.5 resolution (interpolated) of the final map and of each half map against the
  truth, and of the true-pose reconstruction on the same path (the oracle), with their ratios;
- the resolution the log reports against the FSC-0.143 crossing of the written unfiltered half
  maps (they must agree within a shell);
- the median and 90th-percentile orientation errors and the median translation error;
- the wall time of the whole run and seconds per iteration at each sampling stage.

    python bench/refine.py                      # low resolution: ribosome-sized phantom, box 64
    python bench/refine.py --molecule octahedral --box 128 --angpix 1.5 --n 3000 --snr 0.01 \\
        --bfactor 50 --sym O --diameter 150     # high resolution, point group O
    python bench/refine.py --molecule globular --box 128 --angpix 1.5 --n 5000 --snr 0.05 \\
        --bfactor 50 --diameter 150             # high resolution, asymmetric

Cost (--cost BOX [BOX ...]): for each box, the octahedral pseudo-atomic molecule at a pixel
size that keeps it (192 Å across the box), --n particles at their true poses slightly
perturbed, one iteration of each stage of an auto-refine (a global search at HEALPix order 3,
local searches at orders 5 and 7, the final iteration at Nyquist), each in a fresh process:
seconds by part (E-step, projection, M-step sums, back-projection, candidate lists,
reconstruction and FSC), the peak resident memory, and the run's memory estimate.

    python bench/refine.py --cost 64 128 192 256 --n 500
    python bench/refine.py --cost 128 --n 1500 --nu    # also each stage with refine --nu
"""

from __future__ import annotations

import argparse
import itertools
import json
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from cryomap import atoms
from cryomap._kernels import core, set_threads
from cryomap.em.data import ImageSource
from cryomap.em.reconstruct import reconstruct_known_poses
from cryomap.em.refine import RefineOptions, mask_radius_px
from cryomap.em.validation import angular_errors
from cryomap.fourier import initial_lowpass
from cryomap.io.mrc import read_map, write_map
from cryomap.jobs.refine import refine
from cryomap.particles import load_particles
from cryomap.phantom import RIBOSOME_SCALE, make_phantom
from cryomap.resolution import fsc_maps, resolution_angstrom, resolution_shell
from cryomap.simulate import simulate_particles, write_simulation

PARTS = ("estep", "project", "sums", "backproject", "candidates", "reconstruct")


def truth_map(molecule: str, box: int, pix: float, bfactor: float, seed: int) -> np.ndarray:
    """The simulated structure: the ribosome-sized phantom (filling 0.8 of the box) or a
    pseudo-atomic molecule (`atoms.MOLECULES`) at a B-factor."""
    if molecule == "phantom":
        return make_phantom(box, pix, scale=RIBOSOME_SCALE * 0.8 * box * pix / 256.0)
    return atoms.molecule_map(molecule, box, pix, bfactor, seed)


def simulate(out: Path, truth: np.ndarray, pix: float, n: int, snr: float, seed: int,
             max_shift: float) -> np.ndarray:
    """particles.star, truth.star and start.mrc (the truth low-passed to 40 Å) in `out`;
    returns the true poses table."""
    sim = simulate_particles(truth, pix, n, snr=snr, seed=seed, max_shift_px=max_shift,
                             defocus_range=(8000.0, 25000.0), astigmatism=1000.0)
    write_simulation(out, *sim, pixel_size=pix, truth_maps=truth)
    write_map(out / "start.mrc",
              initial_lowpass(truth.astype(np.float64), 40.0, pix).astype(np.float32), pix)
    return sim[3]


def accuracy(args: argparse.Namespace) -> None:
    box, pix = args.box, args.angpix
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="cryomap_bench_"))
    if (root / "refine").exists():
        shutil.rmtree(root / "refine")
    print(f"cryomap refine benchmark: build {core.simd}, {core.max_threads()} threads; "
          f"{args.molecule}, box {box}, {pix} Å/px, {args.n} particles, SNR {args.snr}, "
          f"B {args.bfactor} Å^2, symmetry {args.sym}"
          f"{', --nu' if args.nu else ''}", flush=True)
    truth = truth_map(args.molecule, box, pix, args.bfactor, args.seed).astype(np.float64)
    diameter = args.diameter or 0.8 * box * pix
    truth_df = simulate(root, truth, pix, args.n, args.snr, args.seed, args.max_shift)
    options = RefineOptions(particle_diameter=diameter, ini_high=40.0, sym=args.sym,
                            nu=args.nu)
    t0 = time.perf_counter()
    state = refine(root / "particles.star", root / "start.mrc", root / "refine", options,
                   echo=None)
    wall = time.perf_counter() - t0
    out = root / "refine"
    refined, _ = read_map(out / "run_class001.mrc")
    halves = [read_map(out / f"run_half{h}_class001_unfil.mrc")[0] for h in (1, 2)]
    angles = truth_df[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy()
    origins = truth_df[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy() / pix
    source = ImageSource(load_particles(root / "particles.star"),
                         mask_radius_px(options, box, pix), options.mask_edge)
    oracle = reconstruct_known_poses(source, angles, origins, state.subset, options)

    def res(v):
        return resolution_angstrom(fsc_maps(v, truth), box, pix, 0.5, interpolate=True)

    r_final, r_oracle = res(refined), res(oracle.final_maps[0])
    print(f"\nfinal map vs truth (FSC 0.5): {r_final:.2f} Å; true-pose reconstruction "
          f"{r_oracle:.2f} Å; ratio {r_final / r_oracle:.3f}")
    for h in (1, 2):
        a, b = res(halves[h - 1]), res(oracle.final_maps[h])
        print(f"half map {h}: {a:.2f} Å vs {b:.2f} Å; ratio {a / b:.3f}")
    written = resolution_shell(fsc_maps(*halves), 0.143)
    logged = state.history[-1].resolution_shell
    print(f"log: {state.history[-1].resolution:.2f} Å (shell {logged}); written unfiltered "
          f"half maps: FSC 0.143 at shell {written} ({box * pix / max(written, 1):.2f} Å)")
    err = angular_errors(state.angles, angles, args.sym)
    shift = np.linalg.norm(state.origins_px - origins, axis=1)
    print(f"orientation error: median {np.median(err):.2f} deg, 90th percentile "
          f"{np.percentile(err, 90):.2f} deg; translation error median {np.median(shift):.2f} "
          f"px ({np.median(shift) * pix:.2f} Å)")
    print(f"\nwall time of the whole auto-refine: {wall:.1f} s, {len(state.history)} "
          f"iterations")
    stages: dict[str, list] = {}
    for h in state.history:
        stages.setdefault("final iteration" if h.final else h.stage, []).append(h)
    for key, its in stages.items():
        parts = {k: np.mean([h.timings.get(k, 0.0) for h in its]) for k in PARTS}
        print(f"  {key}: {len(its)} iterations, {np.mean([h.seconds for h in its]):.1f} s "
              f"each (" + ", ".join(f"{k} {v:.1f}" for k, v in parts.items()) + ")")
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)


# -- cost by stage ---------------------------------------------------------------------------

#: (name, HEALPix order, local, E-step radius as a fraction of Nyquist, final iteration)
STAGES = (("global, order 3", 3, False, 0.5, False), ("local, order 5", 5, True, 0.8, False),
          ("local, order 7", 7, True, 0.9, False), ("final (order 5)", 5, True, 1.0, True))


def cost_box(box: int, n: int, seed: int, max_memory: float | None, nu: bool = False) -> dict:
    """One iteration of each stage at one box (run in its own process: its peak RSS); with
    `nu`, each stage also with refine --nu from the same state (stage name + " --nu")."""
    from cryomap.em.refine import AutoSampling, Refinement, initial_state, refine_iteration
    from cryomap.euler import euler_to_matrix, matrix_to_euler
    from cryomap.jobs.base import plan_memory
    from cryomap.jobs.refine import refine_memory
    from cryomap.sampling import angular_step, random_rotation

    pix = 1.5 * 128 / box
    diameter = 150.0
    root = Path(tempfile.mkdtemp(prefix="cryomap_cost_"))
    truth = truth_map("octahedral", box, pix, 50.0, seed)
    truth_df = simulate(root, truth, pix, n, 0.05, seed, 4.0)
    particles = load_particles(root / "particles.star")
    out: dict = {"box": box, "pixel_size": pix, "stages": {}}
    for (name, order, local, frac, final), use_nu in itertools.product(
            STAGES, (False, True) if nu else (False,)):
        options = RefineOptions(particle_diameter=diameter, sym="O", healpix_order=2,
                                iterations=1 if final else None, nu=use_nu)
        budget = int((max_memory or 16.0) * 2**30)
        plan = plan_memory(lambda bm, o=options: refine_memory(particles, o, bm), n, box,
                           budget, options.batch_memory, n)
        source = ImageSource(particles, mask_radius_px(options, box, pix), options.mask_edge,
                             cache_bytes=plan.parts.get("image cache", 0))
        refinement = Refinement(source, options, mask_radius_px(options, box, pix))
        # true poses, turned by a fraction of the stage's step: a run that reached this stage
        rng = np.random.default_rng(seed)
        angles = truth_df[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy()
        origins = truth_df[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy() / pix
        state = initial_state(refinement, truth, angles, origins, np.arange(n) % 2 + 1)
        a = euler_to_matrix(angles[:, 0], angles[:, 1], angles[:, 2])
        small = np.array([random_rotation(rng, 0.5 * angular_step(order)) for _ in range(n)])
        state.angles = np.stack(matrix_to_euler(a @ small), 1)
        state.volumes[:] = truth
        state.r_max = max(2, int(frac * (box // 2)) - (1 if frac < 1 else 0))
        step = 1.5 / pix
        state.schedule = AutoSampling(order=order, offset_step=2 * step, offset_range=3 * step,
                                      sigma_ang=2.0 * angular_step(order + 1) if local else None)
        t0 = time.perf_counter()
        stats = refine_iteration(state, refinement)
        out["stages"][name + (" --nu" if use_nu else "")] = {
                               "seconds": time.perf_counter() - t0,
                               **{k: stats.timings.get(k, 0.0) for k in PARTS},
                               "samples": stats.mean_samples, "r_max": stats.r_max}
        out["estimate_gib"] = max(out.get("estimate_gib", 0.0), plan.total / 2**30)
    out["peak_rss_gib"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    particles.close()
    shutil.rmtree(root, ignore_errors=True)
    return out


def cost(args: argparse.Namespace) -> None:
    print(f"cryomap refine cost by stage: build {core.simd}, {core.max_threads()} threads, "
          f"{args.n} particles per box (octahedral pseudo-atomic molecule, 192 Å box)",
          flush=True)
    rows = []
    for box in args.cost:
        cmd = [sys.executable, __file__, "--cost-one", str(box), "--n", str(args.n),
               "--seed", str(args.seed)] + (["--j", str(args.j)] if args.j else []) + (
            ["--max_memory", str(args.max_memory)] if args.max_memory else []) + (
            ["--nu"] if args.nu else [])
        done = subprocess.run(cmd, capture_output=True, text=True, check=True)
        rows.append(json.loads(done.stdout.strip().splitlines()[-1]))
    head = f"{'box':>4} {'stage':<22} {'s/iter':>7} " + " ".join(f"{p[:8]:>8}" for p in PARTS)
    print(head + f" {'samples':>8} {'r_max':>5}" + ("  --nu / without" if args.nu else ""))
    for row in rows:
        for name, st in row["stages"].items():
            plain = row["stages"].get(name.removesuffix(" --nu"), st)
            ratio = f"  {st['seconds'] / plain['seconds']:.2f}" if name.endswith("--nu") else ""
            print(f"{row['box']:>4} {name:<22} {st['seconds']:>7.1f} "
                  + " ".join(f"{st[p]:>8.1f}" for p in PARTS)
                  + f" {st['samples']:>8.0f} {st['r_max']:>5}{ratio}")
        print(f"{row['box']:>4} peak RSS {row['peak_rss_gib']:.2f} GiB, estimated "
              f"{row['estimate_gib']:.2f} GiB ({row['pixel_size']:.3f} Å/px)", flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--molecule", default="phantom", choices=["phantom", *atoms.MOLECULES])
    p.add_argument("--box", type=int, default=64)
    p.add_argument("--angpix", type=float, default=5.0)
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--snr", type=float, default=0.1)
    p.add_argument("--bfactor", type=float, default=0.0, help="Å^2 (pseudo-atomic molecules)")
    p.add_argument("--sym", default="C1")
    p.add_argument("--diameter", type=float, default=None, help="Å (default 0.8 of the box)")
    p.add_argument("--max-shift", dest="max_shift", type=float, default=3.0, help="px")
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--j", type=int, default=None, help="threads")
    p.add_argument("--keep", help="keep the run in this folder")
    p.add_argument("--nu", action="store_true",
                   help="non-uniform refinement (refine --nu): on uniform data it should "
                        "equal the homogeneous run")
    p.add_argument("--cost", type=int, nargs="+", metavar="BOX",
                   help="cost by stage at these boxes instead of the accuracy run")
    p.add_argument("--cost-one", dest="cost_one", type=int, help=argparse.SUPPRESS)
    p.add_argument("--max_memory", type=float, default=None, help="GiB, for the cost runs")
    args = p.parse_args()
    set_threads(args.j)
    if args.cost_one:
        print(json.dumps(cost_box(args.cost_one, args.n, args.seed, args.max_memory,
                                  args.nu)))
    elif args.cost:
        cost(args)
    else:
        accuracy(args)


if __name__ == "__main__":
    main()
