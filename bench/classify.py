"""Classification benchmark: 3D classification against the Bayes-optimal accuracy, and 2D
classification of many views.

class3d: for each share s, a two-class set (box 64, 5 Å/px, 2000 particles, SNR 0.1, CTF,
shifts up to 3 px) of a ribosome-sized structure (`--structure`): `phantom`, the package's
phantom filling 0.8 of the box, or `globular`, `atoms.globular` (three lobes of packed
helices) scaled to the same size; class A is the structure, class B the same with a compact
piece holding s of its mass removed. `--k3` adds a third class, A with a large piece removed
(the phantom's head; 15 % of the globular structure's mass, elsewhere), and runs K = 3.
Printed per share: the best possible accuracy (from the true poses and maps:
`validation.class_map_set`), then for each --modes class3d's accuracy from one map (A
low-passed to 40 Å) with the default command (`default`: the adaptive schedule),
`--schedule classic` (`classic`: RELION's Class3D), `--schedule consensus` (`auto`) or
`--skip_align --tau2_fudge 1` at the true poses (`skip`), all else at class3d's defaults
(--tau2_fudge 4, --class_temperature 4, --class_difference_fsc 0.143,
--class_difference_fsc_fixed 0.05); the class proportions
against the truth, the time, and for `default` the schedule it chose. `--extra` adds
options to every mode (the last value given wins, e.g. `--extra --tau2_fudge 1`).

class2d: K = 10 on 10 views (5 of each of two phantoms), SNR 0.05, 5000 particles: the
membership, each average's correlation with its clean projection, seconds per iteration.

    python bench/classify.py                       # everything (long)
    python bench/classify.py --shares 0.08 --modes default skip --skip-2d
    python bench/classify.py --structure globular --shares 0.03 --k3 --modes default --skip-2d
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

from cryomap import atoms
from cryomap._kernels import core, set_threads
from cryomap.cli.class3d import class_options
from cryomap.cli.main import build_parser
from cryomap.ctf import CtfParams
from cryomap.em.classify import ClassOptions
from cryomap.em.validation import class_map_set
from cryomap.jobs.classify import classify2d, classify3d
from cryomap.particles import make_optics_table
from cryomap.phantom import RIBOSOME_SCALE, make_phantom, make_phantom_variant
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


def globular_maps(box: int, pix: float, shares: list[float], seed: int = 0
                  ) -> list[np.ndarray]:
    """`atoms.globular` scaled to fill 0.8 of the box, and for each share the same with a
    compact piece holding that share of its atoms removed: the atoms nearest to the surface
    point furthest along a random direction (a new direction for each share)."""
    diameter = 0.8 * box * pix
    model = atoms.globular(seed=seed, size=0.9 * diameter / 110.0)
    rng = np.random.default_rng(seed + 100)
    maps = [atoms.density_map(model, box, pix, 50.0)]
    for share in shares:
        direction = rng.normal(size=3)
        site = model.xyz[np.argmax(model.xyz @ direction)]
        near = np.argsort(np.linalg.norm(model.xyz - site, axis=1))
        keep = np.sort(near[int(round(share * model.n_atoms)):])
        maps.append(atoms.density_map(atoms.Atoms(model.xyz[keep], model.weight[keep]), box,
                                      pix, 50.0))
    return maps


def class_maps(args, share: float) -> tuple[list[np.ndarray], float]:
    """The set's true maps (A, B and with --k3 the large difference) and diameter (Å)."""
    diameter = 0.8 * args.box * args.angpix
    if args.structure == "globular":
        return globular_maps(args.box, args.angpix, [share] + ([0.15] if args.k3 else []),
                             args.seed), diameter
    scale = RIBOSOME_SCALE * diameter / 256.0
    maps = [make_phantom(args.box, args.angpix, scale=scale),
            make_phantom(args.box, args.angpix, scale=scale, remove_share=share)]
    if args.k3:
        maps.append(make_phantom(args.box, args.angpix, scale=scale, drop_domain=1))
    return maps, diameter


MODES = {"default": ("the default command (adaptive schedule)", "particles.star", []),
         "classic": ("--schedule classic (RELION's Class3D)", "particles.star",
                     ["--schedule", "classic"]),
         "auto": ("--schedule consensus (--auto_sampling)", "particles.star",
                  ["--schedule", "consensus"]),
         "skip": ("--skip_align at the true poses, --tau2_fudge 1", "truth.star",
                  ["--skip_align", "--tau2_fudge", "1"])}


def run_class3d(args) -> None:
    for share in args.shares:
        root = Path(tempfile.mkdtemp(prefix="cryomap_cls3d_"))
        maps, diameter = class_maps(args, share)
        k = len(maps)
        truth, best = class_map_set(root, [m.astype(np.float64) for m in maps], args.angpix,
                                    args.n, args.snr, args.seed, max_shift_px=3.0)
        true_fr = np.bincount(truth, minlength=k) / truth.size
        print(f"\n{args.structure}, share {share:.0%}{', K = 3' if k == 3 else ''}: best "
              f"possible accuracy {100 * best.mean():.1f}%, true proportions "
              f"{np.round(true_fr, 3)}", flush=True)
        for mode in args.modes:
            label, star, mode_args = MODES[mode]
            # the command line, everything else at class3d's defaults
            options = class3d_options(
                ["--K", str(k), "--iter", str(args.iter), "--ini_high", "40",
                 "--particle_diameter", f"{diameter:g}", "--healpix_order", "2",
                 "--offset_range", "5", "--offset_step", "2"]
                + mode_args + args.extra)
            t0 = time.perf_counter()
            state = classify3d(root / star, root / "reference.mrc", root / f"run_{mode}",
                               options, echo=None)
            wall = time.perf_counter() - t0
            acc, perm = accuracy(state.class_number, truth, k)
            dist = state.distribution[list(np.argsort(perm))]
            chose = ("" if not options.probes_classes else
                     ", chose the consensus schedule" if state.consensus_from is not None
                     else ", classes formed: aligned per class" if state.probe_done
                     else ", undecided")
            print(f"  class3d {label}: accuracy {100 * acc:.1f}% (best possible "
                  f"{100 * best.mean():.1f}%), proportions {np.round(dist, 3)} (error "
                  f"{np.abs(dist - true_fr).max():.3f}), {wall:.0f} s, "
                  f"{wall / args.iter:.1f} s per iteration{chose}", flush=True)
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
    p.add_argument("--modes", nargs="+", choices=sorted(MODES),
                   default=["default", "classic", "auto", "skip"])
    p.add_argument("--structure", choices=["phantom", "globular"], default="phantom")
    p.add_argument("--k3", action="store_true",
                   help="a third class with a large piece removed (K = 3)")
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
