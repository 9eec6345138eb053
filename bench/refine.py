"""Auto-refine benchmark: accuracy against the best possible reconstruction and speed.

Simulates a ribosome-sized phantom (default: box 64, 5 Å/px, 2000 particles, SNR 0.1,
astigmatic CTF, shifts up to 3 px), auto-refines it from the truth low-passed to 40 Å with
cryomap's defaults, and prints:

- the FSC-0.5 resolution (interpolated) of the final map and of each half map against the
  truth, and of the true-pose reconstruction on the same path (the oracle), with their ratios;
- the median and 90th-percentile orientation errors;
- the wall time of the whole run, and seconds per iteration at each sampling stage;
- the fine pass's rate: the subset E-step kernel's GFLOP/s on a block shape the fine passes
  use, against NumPy's float32 matrix product on the same shapes, measured in the same run
  (medians of --repeats runs).

    python bench/refine.py                    # the full-size set (several minutes)
    python bench/refine.py --box 40 --n 800   # the test suite's set
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np

from cryomap._kernels import core, set_threads
from cryomap.em.data import ImageSource
from cryomap.em.estep import expectation_subsets
from cryomap.em.reconstruct import reconstruct_known_poses
from cryomap.em.refine import RefineOptions, lowpass, mask_radius_px
from cryomap.em.validation import angular_errors, fsc_maps, fsc_resolution
from cryomap.io.mrc import read_map, write_map
from cryomap.jobs.refine import refine
from cryomap.particles import load_particles
from cryomap.phantom import RIBOSOME_SCALE, make_phantom
from cryomap.simulate import simulate_particles, write_simulation


def simulate(out: Path, box: int, pix: float, n: int, snr: float, seed: int):
    diameter = 0.8 * box * pix
    truth = make_phantom(box, pix, scale=RIBOSOME_SCALE * diameter / 256.0)
    sim = simulate_particles(truth, pix, n, snr=snr, seed=seed, max_shift_px=3.0,
                             astigmatism=1000.0)
    write_simulation(out, *sim, pixel_size=pix, truth_maps=truth)
    write_map(out / "start.mrc", lowpass(truth.astype(np.float64), pix, 40.0).astype(np.float32),
              pix)
    return truth.astype(np.float64), sim[3], diameter


def fine_pass_rate(j: int, t: int, r: int, images: int, repeats: int) -> dict:
    """GFLOP/s of the subset E-step on `images` images, each with t translations x r
    orientations of j pixels (its own slices: the fine passes' shape), and of NumPy's sgemm
    on the same (t x 2j) (2j x r) products."""
    rng = np.random.default_rng(0)
    box = 2 * int(np.ceil(np.sqrt(2 * j / np.pi))) + 4
    from cryomap import fourier

    mask = fourier.pixel_mask(box, box // 2)
    coords = mask.coords[:j]
    x = (rng.normal(size=(images, j)) + 1j * rng.normal(size=(images, j))).astype(np.complex64)
    ctf = rng.uniform(-1, 1, (images, j)).astype(np.float32)
    s2 = np.full((images, j), 0.01, np.float32)
    slices = (rng.normal(size=(images * r, j)) + 1j * rng.normal(size=(images * r, j))).astype(
        np.complex64)
    shifts = rng.uniform(-1, 1, (t * images, 2))
    rot_ptr = np.arange(images + 1) * r
    shift_ptr = np.arange(images + 1) * t
    args = (x, ctf, s2, slices, shifts, box, rot_ptr, np.arange(images * r),
            np.zeros(images * r), shift_ptr, np.arange(images * t), np.zeros(images * t), 0.999)
    flops = images * t * r * 8.0 * j  # the cross-term GEMMs (real, interleaved complex)
    kernel, numpy_t = [], []
    a = rng.normal(size=(t, 2 * j)).astype(np.float32)
    b = rng.normal(size=(2 * j, r)).astype(np.float32)
    for _ in range(repeats):
        t0 = time.perf_counter()
        expectation_subsets(*args, coords=coords)
        kernel.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for _ in range(images):
            a @ b
        numpy_t.append(time.perf_counter() - t0)
    k, m = float(np.median(kernel)), float(np.median(numpy_t))
    return {"kernel_gflops": flops / k / 1e9, "numpy_gflops": flops / m / 1e9,
            "ratio": m / k}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--box", type=int, default=64)
    p.add_argument("--angpix", type=float, default=5.0)
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--snr", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--j", type=int, default=None, help="threads")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--keep", help="keep the run in this folder")
    args = p.parse_args()
    set_threads(args.j)
    box, pix = args.box, args.angpix
    root = Path(args.keep) if args.keep else Path(tempfile.mkdtemp(prefix="cryomap_bench_"))
    if (root / "refine").exists():
        shutil.rmtree(root / "refine")
    print(f"cryomap refine benchmark: build {core.simd}, {core.max_threads()} threads; box "
          f"{box}, {pix} Å/px, {args.n} particles, SNR {args.snr}", flush=True)
    truth, truth_df, diameter = simulate(root, box, pix, args.n, args.snr, args.seed)
    options = RefineOptions(particle_diameter=diameter, ini_high=40.0, offset_range=5,
                            offset_step=2)
    t0 = time.perf_counter()
    state = refine(root / "particles.star", root / "start.mrc", root / "refine", options,
                   echo=None)
    wall = time.perf_counter() - t0
    refined, _ = read_map(root / "refine" / "run_class001.mrc")
    angles = truth_df[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy()
    origins = truth_df[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy() / pix
    source = ImageSource(load_particles(root / "particles.star"),
                         mask_radius_px(options, box, pix), options.mask_edge)
    oracle = reconstruct_known_poses(source, angles, origins, state.subset, options)

    def res(v):
        return fsc_resolution(fsc_maps(np.asarray(v, np.float64), truth), box, pix, 0.5,
                              interpolate=True)

    r_final, r_oracle = res(refined), res(oracle.final_maps[0])
    print(f"\nfinal map vs truth (FSC 0.5): {r_final:.2f} Å; true-pose reconstruction "
          f"{r_oracle:.2f} Å; ratio {r_final / r_oracle:.3f}")
    for h in (1, 2):
        a, b = res(state.final_maps[h]), res(oracle.final_maps[h])
        print(f"half map {h}: {a:.2f} Å vs {b:.2f} Å; ratio {a / b:.3f}")
    err = angular_errors(state.angles, angles)
    print(f"orientation error: median {np.median(err):.2f} deg, 90th percentile "
          f"{np.percentile(err, 90):.2f} deg")
    print(f"\nwall time of the whole auto-refine: {wall:.1f} s, {len(state.history)} "
          f"iterations")
    stages: dict[str, list[dict]] = {}
    for h in state.history:
        key = "final iteration" if h["final"] else h["stage"]
        stages.setdefault(key, []).append(h)
    for key, its in stages.items():
        parts = {k: np.mean([h["timings"].get(k, 0.0) for h in its])
                 for k in ("estep", "project", "sums", "backproject", "candidates")}
        print(f"  {key}: {len(its)} iterations, {np.mean([h['seconds'] for h in its]):.1f} s "
              f"each (" + ", ".join(f"{k} {v:.1f}" for k, v in parts.items()) + ")")
    samples = [h["mean_samples"] for h in state.history if not h["final"]]
    print(f"  samples scored per image per iteration: {np.round(samples).astype(int)}")
    j = int(np.pi * (state.history[-2]["r_max"] if len(state.history) > 1 else box // 4) ** 2
            / 2)
    rate = fine_pass_rate(j, 16, 160, 64, args.repeats)
    print(f"\nfine pass (64 images x 16 translations x 160 orientations, J = {j}): "
          f"{rate['kernel_gflops']:.1f} GFLOP/s; NumPy sgemm on the same products "
          f"{rate['numpy_gflops']:.1f} GFLOP/s; ratio {rate['ratio']:.2f}")
    if not args.keep:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
