"""Classification benchmark: 3D classification against the Bayes-optimal accuracy, and 2D
classification of many views.

class3d: for each share s, a two-class set of a ribosome-sized phantom (box 64, 5 Å/px,
2000 particles, SNR 0.1, CTF, shifts up to 3 px): class A is the phantom, class B the phantom
with a compact piece holding s of its mass removed. Printed per share: the best possible
accuracy (from the true poses and maps: the mean over images of Phi(||P_A - P_B|| / 2 sigma)),
then for each --modes: class3d's accuracy from one map (A low-passed to 40 Å) with the
defaults (`classic`: RELION's Class3D schedule) or with `--auto_sampling` (`auto`), and
`--skip_align --tau2_fudge 1` at the true poses (`skip`), all else at class3d's defaults
(--tau2_fudge 4, --class_temperature 4, --class_difference_fsc 0.143); the class proportions
against the truth, and the time. `--extra` adds options to every mode (the last value given
wins, e.g. `--extra --tau2_fudge 1`).

class2d: K = 10 on 10 views (5 of each of two phantoms), SNR 0.05, 5000 particles: the
membership, each average's correlation with its clean projection, seconds per iteration.

    python bench/classify.py                       # everything (long)
    python bench/classify.py --shares 0.08 --modes auto skip --skip-2d
    python bench/classify.py --only-2d
"""

from __future__ import annotations

import argparse
import itertools
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np
import pandas as pd

from cryomap._kernels import core, set_threads
from cryomap.cli.class3d import class_options
from cryomap.cli.main import build_parser
from cryomap.ctf import CtfParams
from cryomap.em.classify import ClassOptions
from cryomap.em.validation import two_class_set
from cryomap.jobs.classify import classify2d, classify3d
from cryomap.particles import make_optics_table
from cryomap.phantom import RIBOSOME_SCALE, make_phantom_variant
from cryomap.simulate import project_images, write_simulation


def class3d_options(argv: list[str]) -> ClassOptions:
    """The options `cryomap class3d ARGV` would run with."""
    args = build_parser().parse_args(["class3d", "--i", "-", "--o", "-"] + argv)
    return class_options(args, 3)


def accuracy(found: np.ndarray, truth: np.ndarray, k: int) -> tuple[float, tuple]:
    """Fraction in the true class under the best relabelling."""
    perm = max(itertools.permutations(range(k)),
               key=lambda p: np.mean(np.asarray(p)[found] == truth))
    return float(np.mean(np.asarray(perm)[found] == truth)), perm


def run_class3d(args) -> None:
    for share in args.shares:
        root = Path(tempfile.mkdtemp(prefix="cryomap_cls3d_"))
        truth, best, diameter = two_class_set(root, args.box, args.angpix, args.n, share,
                                              args.snr, args.seed, max_shift_px=3.0)
        true_fr = np.bincount(truth, minlength=2) / truth.size
        print(f"\nshare {share:.0%}: best possible accuracy {100 * best.mean():.1f}%, true "
              f"proportions {np.round(true_fr, 3)}", flush=True)
        modes = {"classic": ("from one map, defaults (RELION's Class3D)", "particles.star",
                             []),
                 "auto": ("from one map, --auto_sampling", "particles.star",
                          ["--auto_sampling"]),
                 "skip": ("--skip_align at the true poses, --tau2_fudge 1", "truth.star",
                          ["--skip_align", "--tau2_fudge", "1"])}
        for mode in args.modes:
            label, star, mode_args = modes[mode]
            # the command line, everything else at class3d's defaults
            options = class3d_options(
                ["--K", "2", "--iter", str(args.iter), "--ini_high", "40",
                 "--particle_diameter", f"{diameter:g}", "--healpix_order", "2",
                 "--offset_range", "5", "--offset_step", "2"]
                + mode_args + args.extra)
            t0 = time.perf_counter()
            state = classify3d(root / star, root / "reference.mrc", root / f"run_{mode}",
                               options, echo=None)
            wall = time.perf_counter() - t0
            acc, perm = accuracy(state.class_number, truth, 2)
            dist = state.distribution[list(np.argsort(perm))]
            print(f"  class3d {label}: accuracy {100 * acc:.1f}% (best possible "
                  f"{100 * best.mean():.1f}%), proportions {np.round(dist, 3)} (error "
                  f"{np.abs(dist - true_fr).max():.3f}), {wall:.0f} s, "
                  f"{wall / args.iter:.1f} s per iteration", flush=True)
        shutil.rmtree(root, ignore_errors=True)


def views_set(out: Path, box: int, pix: float, n: int, snr: float, seed: int):
    """n images of 10 views (5 each of two phantoms), random in-plane angles and shifts."""
    rng = np.random.default_rng(seed)
    diameter = 0.8 * box * pix
    scale = RIBOSOME_SCALE * diameter / 256.0
    maps = [make_phantom_variant(v, box, pix, scale=scale) for v in (0, 3)]
    views = [(m, rot, tilt) for m in (0, 1)
             for rot, tilt in ((0, 0), (30, 90), (90, 45), (150, 120), (240, 70))]
    cls = rng.integers(0, len(views), n)
    psi = rng.uniform(0, 360, n)
    r, phi = 3.0 * np.sqrt(rng.uniform(size=n)), rng.uniform(0, 2 * np.pi, n)
    origins = np.stack([r * np.cos(phi), r * np.sin(phi)], axis=1)
    df = rng.uniform(10000, 25000, n)
    ang = rng.uniform(0, 180, n)
    images = np.empty((n, box, box), np.float32)
    clean = []
    for c, (m, rot, tilt) in enumerate(views):
        idx = np.flatnonzero(cls == c)
        angles = np.stack([np.full(idx.size, rot), np.full(idx.size, tilt), psi[idx]], 1)
        ctf = CtfParams(defocus_u=df[idx] + 200, defocus_v=df[idx] - 200,
                        defocus_angle=ang[idx])
        images[idx] = project_images(maps[m], angles, origins[idx], ctf, pix)
        clean.append(project_images(maps[m], np.array([[rot, tilt, 0.0]]))[0])
    sigma = np.sqrt(np.mean(np.var(images, axis=(1, 2))) / snr)
    images += rng.normal(scale=sigma, size=images.shape).astype(np.float32)
    particles = pd.DataFrame({
        "rlnImageName": [f"{i + 1:06d}@particles.mrcs" for i in range(n)],
        "rlnMicrographName": "sim.mrc", "rlnDefocusU": df + 200, "rlnDefocusV": df - 200,
        "rlnDefocusAngle": ang, "rlnOpticsGroup": 1})
    truth = particles.copy()
    truth["rlnClassNumber"] = cls + 1
    write_simulation(out, images, make_optics_table(pix, box), particles, truth, pix)
    return cls, np.array(clean), diameter


def aligned_correlation(image: np.ndarray, reference: np.ndarray, step: float = 2.0) -> float:
    """Largest normalised correlation over in-plane rotations and circular shifts."""
    from scipy.ndimage import rotate

    a = image - image.mean()
    fa = np.fft.rfft2(a)
    best = -1.0
    for angle in np.arange(0.0, 360.0, step):
        r = rotate(reference, angle, reshape=False, order=1)
        r = r - r.mean()
        cc = np.fft.irfft2(fa * np.conj(np.fft.rfft2(r)), s=a.shape)
        best = max(best, float(cc.max() / np.sqrt((a * a).sum() * (r * r).sum())))
    return best


def run_class2d(args) -> None:
    root = Path(tempfile.mkdtemp(prefix="cryomap_cls2d_"))
    truth, clean, diameter = views_set(root, args.box, args.angpix, args.n2d, 0.05, args.seed)
    options = ClassOptions.defaults(2, n_classes=10, iterations=args.iter2d,
                                    particle_diameter=diameter, offset_range=5, offset_step=1)
    t0 = time.perf_counter()
    state = classify2d(root / "particles.star", root / "run", options, echo=None)
    wall = time.perf_counter() - t0
    found = state.class_number
    # greedy relabelling (10! is too many): each class to the view most of its members show
    perm = [int(np.bincount(truth[found == k], minlength=10).argmax()) if np.any(found == k)
            else -1 for k in range(10)]
    acc = float(np.mean(np.asarray(perm)[found] == truth))
    corr = [aligned_correlation(state.references[k], clean[perm[k]]) if perm[k] >= 0
            else float("nan") for k in range(10)]
    print(f"\nclass2d K = 10, 10 views of two phantoms, SNR 0.05, {args.n2d} particles: "
          f"membership {100 * acc:.1f}%; correlation of the averages with their clean views "
          f"min {np.nanmin(corr):.3f}, mean {np.nanmean(corr):.3f}; "
          f"{wall / args.iter2d:.1f} s per iteration ({wall:.0f} s)", flush=True)
    shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--box", type=int, default=64)
    p.add_argument("--angpix", type=float, default=5.0)
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--snr", type=float, default=0.1)
    p.add_argument("--shares", type=float, nargs="+", default=[0.03, 0.08, 0.15])
    p.add_argument("--iter", type=int, default=25)
    p.add_argument("--n2d", type=int, default=5000)
    p.add_argument("--iter2d", type=int, default=25)
    p.add_argument("--seed", type=int, default=2)
    p.add_argument("--j", type=int, default=None, help="threads")
    p.add_argument("--skip-2d", action="store_true")
    p.add_argument("--modes", nargs="+", choices=["classic", "auto", "skip"],
                   default=["classic", "auto", "skip"])
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                   help="further class3d options, e.g. --extra --tau2_fudge 4")
    p.add_argument("--only-2d", action="store_true")
    args = p.parse_args()
    set_threads(args.j)
    print(f"cryomap classification benchmark: build {core.simd}, {core.max_threads()} threads",
          flush=True)
    if not args.only_2d:
        run_class3d(args)
    if not args.skip_2d:
        run_class2d(args)


if __name__ == "__main__":
    main()
