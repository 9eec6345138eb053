"""Benchmark of the C++ kernels on realistic problem sizes (not a test). Prints a table.

    python bench/kernels.py                # SIMD build chosen at import, then the baseline build
    python bench/kernels.py --no-baseline  # only the build chosen at import
    CRYOMAP_SIMD=baseline python bench/kernels.py --no-baseline

For each shape: median wall time of `--repeats` runs of projection (R slices), the E-step
(pruned at 0.999, and dense), the M-step sums (dense weights, and the pruned posterior =
the realistic sparse case, by each method), back-projection (R slices); E-step GFLOP/s counting
4 B T R J flops, against NumPy's float32 matmul of the same GEMM shape
((B T x 2J) @ (2J x R)) timed in the same run. The data: a smooth random map (Gaussian
blobs), projected at HEALPix order 2 x 24 psi = 4608 orientations; images are CTF-modulated
slices at random poses plus Gaussian noise (per-shell SNR `--snr` * 800 / J, which gives a
converged-looking posterior: median ~10-50 significant poses per image).
"""

from __future__ import annotations

import argparse
import os
import platform
import resource
import subprocess
import sys
import time
from collections.abc import Callable

import numpy as np

from cryomap import fourier, projector, sampling
from cryomap._kernels import core
from cryomap.ctf import CtfParams
from cryomap.em import estep, sums

# (B, T, R, box, r_max): J = pixels of fourier.pixel_mask(box, r_max) (798 and 2978)
SHAPES = [(128, 21, 4608, 64, 22), (64, 9, 4608, 96, 43)]
SHIFT_GRID = {21: (5.0, 2.0), 9: (3.0, 2.0)}  # T -> (range, step) px giving T translations
PIXEL_SIZE = 1.5


def _timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def median_time(fn: Callable[[], object], repeats: int,
                setup: Callable[[], None] | None = None) -> float:
    """Median wall time of fn() over `repeats` runs (setup() untimed before each)."""
    times = []
    for _ in range(repeats):
        if setup is not None:
            setup()
        times.append(_timed(fn))
    return float(np.median(times))


def paired_median_times(fn_a: Callable[[], object], fn_b: Callable[[], object],
                        repeats: int) -> tuple[float, float]:
    """Median wall times of fn_a and fn_b run alternately, so that both see the same load
    (the ratio stays meaningful on a shared machine)."""
    ta, tb = [], []
    for _ in range(repeats):
        ta.append(_timed(fn_a))
        tb.append(_timed(fn_b))
    return float(np.median(ta)), float(np.median(tb))


def blob_map(box: int, rng: np.random.Generator, n_blobs: int = 40) -> np.ndarray:
    """A smooth random map: Gaussian blobs inside a sphere of radius box/4."""
    c = np.arange(box) - box // 2
    z, y, x = np.meshgrid(c, c, c, indexing="ij", sparse=True)
    v = np.zeros((box, box, box), np.float32)
    for _ in range(n_blobs):
        p = rng.uniform(-box / 4, box / 4, 3)
        s = rng.uniform(1.0, 2.5)
        v += np.exp(-((x - p[0]) ** 2 + (y - p[1]) ** 2 + (z - p[2]) ** 2) / (2 * s * s)
                    ).astype(np.float32)
    return v


class Problem:
    """Reference, poses, and noisy CTF-modulated images for one benchmark shape."""

    def __init__(self, n_img: int, n_shift: int, box: int, r_max: int, snr: float,
                 seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.box = box
        self.mask = fourier.pixel_mask(box, r_max)
        self.coords = self.mask.coords
        self.grid = sampling.orientations_3d(2)  # 192 directions x 24 psi = 4608
        self.shifts = sampling.translations(*SHIFT_GRID[n_shift])
        assert self.shifts.shape[0] == n_shift
        self.reference = projector.prepare_reference(blob_map(box, rng), pad=2,
                                                     interp="linear", r_max=r_max)
        self.slices = projector.project(self.reference, self.grid.matrices, self.coords)
        n_pix = self.coords.shape[0]
        defocus = rng.uniform(8000, 25000, n_img)
        params = CtfParams(defocus, defocus * rng.uniform(0.95, 1.05, n_img),
                           rng.uniform(0, 180, n_img))
        self.ctf = params.evaluate(self.coords[:, 0], self.coords[:, 1], box,
                                   PIXEL_SIZE).astype(np.float32)
        true_r = rng.integers(0, len(self.grid), n_img)
        true_t = rng.integers(0, n_shift, n_img)
        k = self.coords.astype(np.float64)
        phase = np.exp(2j * np.pi * (k @ self.shifts[true_t].T).T / box)  # shift by -t
        clean = self.ctf * self.slices[true_r] * phase
        # noise variance per shell = signal power per shell / snr (per Re/Im component: /2)
        power = np.bincount(self.mask.shell, np.mean(np.abs(clean) ** 2, axis=0))
        count = np.maximum(np.bincount(self.mask.shell), 1)
        sigma2 = np.maximum(power / count / snr / 2, 1e-30)[self.mask.shell]
        noise = rng.normal(size=(2, n_img, n_pix)) * np.sqrt(sigma2)
        self.images = (clean + noise[0] + 1j * noise[1]).astype(np.complex64)
        self.inv_sigma2 = np.tile((1.0 / sigma2).astype(np.float32), (n_img, 1))
        self.n_shells = box // 2 + 1

    def expectation(self, fraction: float) -> estep.Posterior:
        return estep.expectation(self.inputs(), significant_fraction=fraction)

    def inputs(self) -> estep.KernelInputs:
        return estep.KernelInputs(self.images, self.ctf, self.inv_sigma2, self.slices,
                                  self.shifts, self.box, self.coords)


def bench_shape(n_img: int, n_shift: int, n_rot: int, box: int, r_max: int, snr: float,
                repeats: int) -> list[tuple[str, float, str]]:
    """Rows (kernel, seconds, note) for one shape."""
    # the same SNR summed over the pixels for every J (per-pixel SNR snr * 800 / J), so that
    # posteriors are similarly peaked
    p = Problem(n_img, n_shift, box, r_max, snr * 800 / fourier.pixel_mask(box, r_max).n_pixels)
    assert len(p.grid) == n_rot
    n_pix = p.coords.shape[0]
    rows: list[tuple[str, float, str]] = []
    flops = 4.0 * n_img * n_shift * n_rot * n_pix

    t_proj = median_time(lambda: projector.project(p.reference, p.grid.matrices, p.coords),
                         repeats)
    rows.append(("project (R slices)", t_proj, f"{n_rot} x {n_pix} px"))

    post = p.expectation(0.999)
    rng = np.random.default_rng(1)
    a = rng.standard_normal((n_img * n_shift, 2 * n_pix), dtype=np.float32)
    b = rng.standard_normal((2 * n_pix, n_rot), dtype=np.float32)
    t_e, t_np = paired_median_times(lambda: p.expectation(0.999), lambda: a @ b, repeats)
    nsig = np.median(post.n_significant)
    rows.append(("expectation (0.999)", t_e,
                 f"{flops / t_e / 1e9:.1f} GFLOP/s; median n_significant {nsig:.0f}, "
                 f"max_prob {np.median(post.max_prob):.2f}"))
    t_ed = median_time(lambda: p.expectation(1.0), repeats)
    rows.append(("expectation (dense)", t_ed, f"{flops / t_ed / 1e9:.1f} GFLOP/s"))

    rows.append(("numpy sgemm (BT x 2J)@(2J x R)", t_np,
                 f"{flops / t_np / 1e9:.1f} GFLOP/s (run alternately with the E-step)"))
    rows.append(("  E-step / numpy rate", t_np / t_e, "ratio (target >= 0.5)"))

    acc: dict[str, sums.SliceSums] = {}

    def fresh() -> None:
        acc["sums"] = sums.SliceSums.empty(n_rot, n_pix, p.mask.shell, p.n_shells)

    def msums(weights: np.ndarray, method: str) -> Callable[[], object]:
        return lambda: sums.maximization_sums(p.inputs(), weights, acc["sums"], method=method)

    # dense: every weight nonzero (an early, flat posterior); values do not matter for speed
    flat = rng.uniform(0.5, 1.0, post.weights.shape).astype(np.float32)
    flat /= flat.sum(axis=(1, 2), keepdims=True)
    t_md = median_time(msums(flat, "auto"), repeats, fresh)
    rows.append(("maximization_sums dense (auto=gemm)", t_md,
                 f"{2 * flops / t_md / 1e9:.1f} GFLOP/s (8 BTRJ flops)"))
    nnz = int(np.count_nonzero(post.weights))
    for method in ("auto", "sparse", "gemm"):
        t = median_time(msums(post.weights, method), repeats, fresh)
        rows.append((f"maximization_sums pruned ({method})", t,
                     f"{nnz} nonzero weights ({nnz / n_img:.0f}/image)"))

    data, weight = projector.empty_sums(box, 2, r_max)

    def bp() -> None:
        projector.backproject(data, weight, acc["d"], acc["w"], p.grid.matrices, p.coords, 2,
                              "linear")

    fresh()
    msums(flat, "auto")()  # every slice nonzero, as after a whole iteration's batches
    t_bp = median_time(bp, repeats)
    rows.append(("backproject (R slices)", t_bp, f"into {data.shape} half-volume"))
    rows.append(("  (project + backproject) / E-step", (t_proj + t_bp) / t_e,
                 "ratio (target <= 0.10)"))
    return rows


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5, help="runs per timing (median)")
    ap.add_argument("--snr", type=float, default=0.02,
                    help="per-pixel SNR of the images at J=800 (scaled by 800/J)")
    ap.add_argument("--no-baseline", action="store_true",
                    help="do not also run the portable build (CRYOMAP_SIMD=baseline)")
    ap.add_argument("--shape", type=int, choices=range(len(SHAPES)), action="append",
                    help="index of a shape to run (default: all)")
    args = ap.parse_args(argv)
    shapes = [SHAPES[i] for i in args.shape] if args.shape else SHAPES

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name"))
    except (OSError, StopIteration):
        pass
    print(f"cryomap kernels: module simd={core.simd}, OpenMP threads={core.max_threads()}, "
          f"cpu={cpu}, numpy {np.__version__}")
    print(f"load average before: {' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    for n_img, n_shift, n_rot, box, r_max in shapes:
        n_pix = fourier.pixel_mask(box, r_max).n_pixels
        print(f"\nB={n_img} T={n_shift} R={n_rot} J={n_pix} (box {box}, r_max {r_max}), "
              f"median of {args.repeats}")
        print(f"  {'kernel':40s} {'time':>10s}  note")
        for name, value, note in bench_shape(n_img, n_shift, n_rot, box, r_max, args.snr,
                                             args.repeats):
            shown = f"{value:10.3f}" if name.startswith("  ") else f"{value * 1e3:8.1f} ms"
            print(f"  {name:40s} {shown}  {note}")
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\npeak RSS {peak:.0f} MiB; load average after: "
          f"{' '.join(f'{x:.2f}' for x in os.getloadavg())}")
    sys.stdout.flush()
    if not args.no_baseline and core.simd != "baseline":
        print("\n=== portable build (CRYOMAP_SIMD=baseline) ===", flush=True)
        cmd = [sys.executable, __file__, "--no-baseline", "--repeats", str(args.repeats),
               "--snr", str(args.snr)]
        for i in args.shape or []:
            cmd += ["--shape", str(i)]
        subprocess.run(cmd, env={**os.environ, "CRYOMAP_SIMD": "baseline"}, check=True)


if __name__ == "__main__":
    main()
