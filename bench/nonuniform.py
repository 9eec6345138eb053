"""Non-uniform refinement benchmark: a rigid core, a domain that moves from particle to
particle and a lumpy belt that differs in every particle (docs/method.md, "Non-uniform
refinement").

The set (asymmetric, box 96, 1.6 Å/px: Nyquist 3.2 Å): the core is `atoms.globular` at
size 0.7 (about 340 residues, 75 Å across; B 30 Å²); a smaller globular domain (size 0.4)
sits above it along +z, turned in each variant about a hinge between them by a random
rotation of `--hinge` degrees (std); the belt is `--blobs` Gaussian lumps (σ 3 Å, peak
`--belt_peak` of the core's) at random in an equatorial ring 38-50 Å from the axis,
|z| < 8 Å, drawn anew in each variant. Each particle is one of `--variants` variants, SNR
`--snr`, CTF, shifts.

Printed: the core's FSC 0.5 against its truth inside a soft core mask for the true-pose
reconstruction (the oracle), for `refine` and for `refine --nu` (same data, same start: the
variants' mean low-passed to 40 Å), with each run's median angular error and seconds per
iteration.

    python bench/nonuniform.py --out /tmp/nu --n 3000
"""

from __future__ import annotations

import argparse
import re
import time
from pathlib import Path

import numpy as np

from cryomap import atoms
from cryomap._kernels import set_threads
from cryomap.cli.main import main as cryomap
from cryomap.em.validation import angular_errors
from cryomap.fourier import lowpass_map
from cryomap.io.mrc import read_map, write_map
from cryomap.io.star import read_star
from cryomap.masks import soft_sphere
from cryomap.resolution import fsc_maps, resolution_angstrom
from cryomap.simulate import simulate_particles, write_simulation

BOX, PIX, BFACTOR = 96, 1.6, 30.0


def _rotation(axis: np.ndarray, degrees: float) -> np.ndarray:
    a = axis / np.linalg.norm(axis)
    k = np.array([[0, -a[2], a[1]], [a[2], 0, -a[0]], [-a[1], a[0], 0]])
    t = np.radians(degrees)
    return np.eye(3) + np.sin(t) * k + (1 - np.cos(t)) * k @ k


def _belt(rng: np.random.Generator, n_blobs: int, peak: float) -> np.ndarray:
    """Gaussian lumps in an equatorial ring (box grid, z y x)."""
    c = np.arange(BOX) - BOX // 2
    z, y, x = np.meshgrid(c, c, c, indexing="ij")
    out = np.zeros((BOX,) * 3)
    r = rng.uniform(38.0, 50.0, n_blobs) / PIX
    phi = rng.uniform(0, 2 * np.pi, n_blobs)
    zc = rng.uniform(-8.0, 8.0, n_blobs) / PIX
    s2 = 2 * (3.0 / PIX) ** 2
    for ri, pi, zi in zip(r, phi, zc, strict=True):
        out += np.exp(-((x - ri * np.cos(pi)) ** 2 + (y - ri * np.sin(pi)) ** 2
                        + (z - zi) ** 2) / s2)
    return peak * out


def make_set(out: Path, n: int, n_variants: int, hinge: float, n_blobs: int, snr: float,
             seed: int, belt_peak: float = 0.33) -> tuple[np.ndarray, np.ndarray]:
    """Write the simulation into out/sim and the start map; return (core truth, core mask)."""
    rng = np.random.default_rng(seed)
    core_atoms = atoms.globular(seed=0, size=0.7)
    domain_atoms = atoms.globular(seed=1, size=0.4)
    top = core_atoms.xyz[:, 2].max()
    domain_atoms = domain_atoms.moved(np.eye(3), np.array([0.0, 0.0, top + 16.0]))
    hinge_point = np.array([0.0, 0.0, top])
    core = atoms.density_map(core_atoms, BOX, PIX, BFACTOR).astype(np.float64)
    variants = []
    for _ in range(n_variants):
        axis = rng.normal(size=3)
        turn = _rotation(axis, rng.normal(0.0, hinge))
        moved = domain_atoms.moved(np.eye(3), -hinge_point).moved(turn, hinge_point)
        domain = atoms.density_map(moved, BOX, PIX, BFACTOR).astype(np.float64)
        variants.append((core + domain + _belt(rng, n_blobs, belt_peak)).astype(np.float32))
    sim = simulate_particles(variants, PIX, n, snr=snr, seed=seed, max_shift_px=3.0)
    write_simulation(out / "sim", *sim, pixel_size=PIX)
    start = lowpass_map(np.mean(variants, axis=0).astype(np.float64), 40.0, PIX)
    write_map(out / "start.mrc", start.astype(np.float32), PIX)
    # the core's soft mask: its density low-passed to 15 Å above 5 % of its peak, + 3 px edge
    smooth = lowpass_map(core, 15.0, PIX)
    hard = smooth > 0.05 * smooth.max()
    dist = np.fft.ifftn(np.fft.fftn(hard.astype(float))
                        * np.fft.fftn(np.fft.ifftshift(soft_sphere(BOX, 2.0, 3.0, 3)))).real
    mask = np.clip(dist, 0.0, 1.0)
    return core, mask


def _image_number(table):
    """The image's number in its stack (rlnImageName n@stack): the same particle's key in
    truth.star and in a run's data file, whose stack paths may be written differently."""
    return table["rlnImageName"].str.split("@").str[0].astype(int)


def core_resolution(volume: np.ndarray, core: np.ndarray, mask: np.ndarray) -> float:
    """FSC 0.5 (Å) of the map against the core's truth, both inside the core mask."""
    return resolution_angstrom(fsc_maps(np.asarray(volume, np.float64) * mask, core * mask),
                               BOX, PIX, 0.5, interpolate=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--n", type=int, default=3000)
    p.add_argument("--variants", type=int, default=40)
    p.add_argument("--hinge", type=float, default=8.0, help="degrees (std)")
    p.add_argument("--blobs", type=int, default=40)
    p.add_argument("--belt_peak", type=float, default=0.33,
                   help="each belt lump's peak density, relative to the core's peak")
    p.add_argument("--snr", type=float, default=0.1)
    p.add_argument("--seed", type=int, default=5)
    p.add_argument("--j", type=int, default=2)
    p.add_argument("--modes", nargs="+", default=["oracle", "homogeneous", "nu"])
    args = p.parse_args()
    set_threads(args.j)
    core, mask = make_set(args.out, args.n, args.variants, args.hinge, args.blobs, args.snr,
                          args.seed, args.belt_peak)
    print(f"non-uniform benchmark: {args.n} particles of {args.variants} variants, box {BOX}, "
          f"{PIX} Å/px, SNR {args.snr}, hinge {args.hinge}°, {args.blobs} belt lumps of "
          f"{args.belt_peak:g}",
          flush=True)
    sim = args.out / "sim"
    truth = read_star(sim / "truth.star")["particles"]
    common = ["--particle_diameter", "150", "--ini_high", "40", "--ctf", "--j", str(args.j)]
    for mode in args.modes:
        t0 = time.perf_counter()
        if mode == "oracle":
            target = args.out / "oracle.mrc"
            cryomap(["reconstruct", "--i", str(sim / "truth.star"), "--o", str(target),
                     "--ctf", "--j", str(args.j)])
            res = core_resolution(read_map(target)[0], core, mask)
            print(f"  oracle (true poses): core {res:.3f} Å ({time.perf_counter() - t0:.0f} s)",
                  flush=True)
            continue
        run = args.out / mode
        if not (run / "run_class001.mrc").exists():  # a finished run is evaluated again
            cryomap(["refine", "--i", str(sim / "particles.star"), "--ref",
                     str(args.out / "start.mrc"), "--o", str(run)] + common
                    + (["--nu"] if mode == "nu" else []))
        wall = time.perf_counter() - t0
        data = read_star(run / "run_data.star")["particles"]
        cols = ["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]
        rows = truth.set_index(_image_number(truth)).loc[_image_number(data)]
        err = angular_errors(data[cols].to_numpy(), rows[cols].to_numpy(), "C1")
        log = (run / "run.log").read_text()
        seconds = [float(x) for x in re.findall(r"\((\d+\.\d) s\)$", log, re.M)]
        n_it = len(seconds)
        res = core_resolution(read_map(run / "run_class001.mrc")[0], core, mask)
        print(f"  refine {mode}: core {res:.3f} Å, median angular error {np.median(err):.2f}°, "
              f"{n_it} iterations, median {np.median(seconds):.0f} s per iteration ({wall:.0f} s "
              f"this call)", flush=True)


if __name__ == "__main__":
    main()
