"""Heterogeneous refinement against its oracle: per class, the FSC 0.5 of the class map
against that class's truth, next to the true-pose, true-class reconstruction of the same
particles (`cryomap reconstruct --classes` of truth.star).

Two kinds of set (`em.validation.two_map_set`: --n particles, about half in each class, SNR
--snr, CTF, shifts up to 3 px):
- `--kind phantom` (box 64, 3 Å/px): class A a ribosome-sized phantom filling 0.8 of the box,
  class B the same with a compact piece holding --share of its mass removed;
- `--kind atoms` (box 96, 1.6 Å/px, Nyquist 3.2 Å, B-factor 30): a globular protein of about
  340 residues with a smaller domain (about 120 residues) on top; in class B that domain is
  swung by --swing degrees about its hinge (a conformational change).
hetero_refine starts from A low-passed to 40 Å (each class a random perturbation of it, as
the command does from one map). Printed: the accuracy of the class assignment (best
relabelling) against the Bayes-optimal accuracy, the proportions, and per class the oracle's
and hetero_refine's FSC 0.5 vs truth (also after a rigid fit of the class map to its truth:
a class's frame is only fixed by its start) and their ratio; the time.

    python bench/hetero_refine.py --out /tmp/het                     # phantom, share 0.15
    python bench/hetero_refine.py --out /tmp/het_atoms --kind atoms
    python bench/hetero_refine.py --out /tmp/het --share 0.08 --extra --force_hard_class
"""

from __future__ import annotations

import argparse
import itertools
import re
import time
from pathlib import Path

import numpy as np

from cryomap import atoms
from cryomap.cli.main import main as cryomap_main
from cryomap.em.validation import align_maps, two_map_set
from cryomap.io.mrc import read_map
from cryomap.io.star import read_star
from cryomap.phantom import RIBOSOME_SCALE, make_phantom
from cryomap.resolution import fsc_maps, resolution_angstrom


def cryomap(argv: list[str]) -> None:
    rc = cryomap_main(argv)
    if rc:
        raise SystemExit(f"cryomap {' '.join(argv)}: exit {rc}")


def resolution(path: Path, truth: np.ndarray, box: int, pix: float) -> float:
    """FSC 0.5 (Å) of the map at `path` against `truth`."""
    return resolution_angstrom(fsc_maps(read_map(path)[0].astype(np.float64), truth), box, pix,
                               0.5, interpolate=True)


def phantom_pair(share: float, box: int = 64, pix: float = 3.0
                 ) -> tuple[list[np.ndarray], int, float, float]:
    """(the two truths, box, pixel size, particle diameter Å) of the phantom set."""
    diameter = 0.8 * box * pix
    scale = RIBOSOME_SCALE * diameter / 256.0
    return ([make_phantom(box, pix, scale=scale),
             make_phantom(box, pix, scale=scale, remove_share=share)], box, pix, diameter)


def atoms_pair(swing: float, box: int = 96, pix: float = 1.6, bfactor: float = 30.0
               ) -> tuple[list[np.ndarray], int, float, float]:
    """(the two truths, box, pixel size, particle diameter Å) of the atomic-model set: core +
    domain, and core + the domain swung by `swing` degrees about the x axis at its hinge."""
    core = atoms.globular(seed=0, size=0.7)
    domain = atoms.globular(seed=1, size=0.4)
    top = core.xyz[:, 2].max()
    domain = domain.moved(np.eye(3), np.array([0.0, 0.0, top + 16.0]))
    hinge = np.array([0.0, 0.0, top])
    t = np.radians(swing)
    turn = np.array([[1.0, 0.0, 0.0], [0.0, np.cos(t), -np.sin(t)],
                     [0.0, np.sin(t), np.cos(t)]])
    swung = domain.moved(np.eye(3), -hinge).moved(turn, hinge)
    maps = [atoms.density_map(atoms.Atoms.join([core, d]), box, pix, bfactor).astype(np.float64)
            for d in (domain, swung)]
    return maps, box, pix, 150.0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--kind", choices=["phantom", "atoms"], default="phantom")
    p.add_argument("--swing", type=float, default=30.0, help="atoms: degrees")
    p.add_argument("--n", type=int, default=2000)
    p.add_argument("--share", type=float, default=0.15)
    p.add_argument("--snr", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--j", type=int, default=2)
    p.add_argument("--extra", nargs=argparse.REMAINDER, default=[],
                   help="options added to hetero_refine's command (last)")
    args = p.parse_args()
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    sim = out / "sim"
    sim.mkdir(exist_ok=True)
    truths, box, pix, diameter = (phantom_pair(args.share) if args.kind == "phantom"
                                  else atoms_pair(args.swing))
    truth_class, best = two_map_set(sim, truths[0], truths[1], pix, args.n, args.snr,
                                    args.seed, max_shift_px=3.0)
    what = f"share {args.share:.0%}" if args.kind == "phantom" else f"swing {args.swing:g}°"
    print(f"hetero_refine benchmark ({args.kind}): {args.n} particles, box {box}, {pix} Å/px, "
          f"{what}, SNR {args.snr}; best possible accuracy {100 * best.mean():.1f}%, "
          f"true proportions {np.round(np.bincount(truth_class) / truth_class.size, 3)}",
          flush=True)
    t0 = time.perf_counter()
    cryomap(["reconstruct", "--i", str(sim / "truth.star"), "--o", str(out / "oracle.mrc"),
             "--ctf", "--classes", "--j", str(args.j)])
    oracle = [resolution(out / f"oracle_class{k + 1:03d}.mrc", truths[k], box, pix)
              for k in range(2)]
    print(f"  oracle (true poses and classes): {oracle[0]:.2f} / {oracle[1]:.2f} Å "
          f"({time.perf_counter() - t0:.0f} s)", flush=True)
    run = out / "hetero"
    t0 = time.perf_counter()
    if not (run / "run_class001.mrc").exists():  # a finished run is evaluated again
        cryomap(["hetero_refine", "--i", str(sim / "particles.star"), "--ref",
                 str(sim / "reference.mrc"), "--o", str(run), "--K", "2", "--ini_high", "40",
                 "--particle_diameter", f"{diameter:g}", "--ctf", "--j", str(args.j)]
                + args.extra)
    wall = time.perf_counter() - t0
    data = read_star(run / "run_data.star")["particles"]
    found = data["rlnClassNumber"].to_numpy() - 1
    perm = max(itertools.permutations(range(2)),
               key=lambda q: np.mean(np.asarray(q)[found] == truth_class))
    acc = float(np.mean(np.asarray(perm)[found] == truth_class))
    share_found = np.bincount(np.asarray(perm)[found], minlength=2) / found.size
    maps = {perm[k]: run / f"run_class{k + 1:03d}.mrc" for k in range(2)}
    res = [resolution(maps[k], truths[k], box, pix) for k in range(2)]
    # a class's frame is only fixed by its start: also scored after a rigid fit to its truth
    fits = [align_maps(read_map(maps[k])[0], truths[k], pix, resolution=15.0)
            for k in range(2)]
    res_fit = [resolution_angstrom(fsc_maps(f.aligned, t), box, pix, 0.5, interpolate=True)
               for f, t in zip(fits, truths, strict=True)]
    log = (run / "run.log").read_text()
    seconds = [float(x) for x in re.findall(r"\((\d+\.\d) s\)$", log, re.M)]
    print(f"  hetero_refine: accuracy {100 * acc:.1f}% (best possible {100 * best.mean():.1f}%), "
          f"proportions {np.round(share_found, 3)}", flush=True)
    for k in range(2):
        turn = np.degrees(np.arccos(np.clip((np.trace(fits[k].rotation) - 1) / 2, -1, 1)))
        print(f"    class {'AB'[k]}: {res[k]:.2f} Å vs oracle {oracle[k]:.2f} Å "
              f"({res[k] / oracle[k]:.3f}x); after a rigid fit to its truth ({turn:.1f}°, "
              f"{np.linalg.norm(fits[k].shift):.2f} px) {res_fit[k]:.2f} Å "
              f"({res_fit[k] / oracle[k]:.3f}x)", flush=True)
    print(f"  {len(seconds)} iterations, median {np.median(seconds):.0f} s per iteration, "
          f"{wall:.0f} s this call", flush=True)


if __name__ == "__main__":
    main()
