"""`cryomap simulate`: a simulated particle data set with known poses."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from ..ctf import CTF_RANGES
from ..errors import InputError
from ..imperfections import Imperfections
from ..io.mrc import check_pixel_size
from .options import check_run_memory, seed_arg

COMMAND = "simulate"
HELP = "simulate particle images of a map (or the built-in phantom) with known poses"
DESCRIPTION = """\
Simulate particle images: uniformly random orientations, random origins within --max_shift px,
per-image astigmatic defocus, CTF (unless --no-ctf) and white Gaussian noise with variance =
(mean per-image variance of the clean CTF-modulated images over the whole box) / --snr.
Writes DIR/particles.mrcs, DIR/particles.star (RELION 3.1: optics + particles, no poses) and
DIR/truth.star (the same plus rlnAngleRot/Tilt/Psi, rlnOriginX/YAngst, rlnClassNumber); with
the built-in phantom also DIR/truth_map.mrc (truth_map_classNNN.mrc with --variants).
Several --i maps (same box) give one class each.

example:
  cryomap simulate --o sim --n 1000 --snr 0.1 --box 64 --angpix 3.0 --seed 0
  cryomap simulate --i map.mrc --o sim --n 5000 --defocus_min 8000 --defocus_max 20000
  cryomap simulate --o sim3 --n 3000 --variants 3      # three classes of phantom variants
"""


#: The options of `imperfections.Imperfections` (its field names): type, default, metavar, help.
IMPERFECTION_OPTIONS = (
    ("n_micrographs", int, 0, "M", "draw the particles on M micrographs, each with its own "
                                   "defocus (0: every particle its own)"),
    ("ice_thickness", float, 0.0, "A", "particle heights uniform in +-thickness/2, added to "
                                       "the true defocus only"),
    ("ctf_error", float, 0.0, "A", "standard deviation of the error of the written defocus, "
                                   "one per micrograph"),
    ("astig_error", float, 0.0, "A", "standard deviation of the error of the written "
                                     "astigmatism U - V, one per micrograph (clipped to "
                                     "U >= V)"),
    ("astig_angle_error", float, 0.0, "DEG", "standard deviation of the error of the written "
                                             "astigmatism angle, one per micrograph"),
    ("amplitude_spread", float, 0.0, "SIGMA", "standard deviation of the log of each "
                                              "particle's amplitude (log-normal, mean 1)"),
    ("junk_fraction", float, 0.0, "F", "fraction of junk picks (empty, ice, carbon edge, "
                                       "aggregate)"),
    ("noise_colour", float, 1.0, "RATIO", "noise power at low frequency over that at "
                                          "Nyquist (1: white)"),
    ("signal_bfactor", float, 0.0, "A2", "B-factor envelope on the signal, not written to "
                                         "the STAR file"),
)


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of `cryomap simulate`."""
    p.add_argument("--o", required=True, metavar="DIR", help="output folder")
    p.add_argument("--i", nargs="+", default=None, metavar="MAP",
                   help="map(s) to project (MRC); default: the built-in phantom")
    p.add_argument("--n", type=int, default=1000, help="number of particles")
    p.add_argument("--snr", type=float, default=0.1,
                   help="signal-to-noise variance ratio (0 or negative: no noise)")
    p.add_argument("--box", type=int, metavar="PX", default=None,
                   help="box size for the phantom (default 64)")
    p.add_argument("--angpix", type=float, metavar="A", default=None,
                   help="pixel size (A); phantom default 3.0; with --i overrides the header")
    p.add_argument("--seed", type=seed_arg, default=0, help="random seed")
    p.add_argument("--max_shift", "--max-shift", type=float, default=3.0,
                   help="largest origin offset (px), uniform in the disc")
    p.add_argument("--defocus_min", "--defocus-min", type=float, default=10000.0,
                   help="smallest mean defocus (A, underfocus)")
    p.add_argument("--defocus_max", "--defocus-max", type=float, default=25000.0,
                   help="largest mean defocus (A)")
    p.add_argument("--astigmatism", type=float, default=500.0,
                   help="largest defocus difference U - V (A)")
    p.add_argument("--bfactor", type=float, default=0.0, help="CTF B-factor (A^2)")
    p.add_argument("--voltage", type=float, default=300.0, help="voltage (kV)")
    p.add_argument("--cs", type=float, default=2.7, help="spherical aberration (mm)")
    p.add_argument("--Q0", "--amplitude-contrast", dest="q0", type=float, default=0.1,
                   help="amplitude contrast (fraction)")
    p.add_argument("--no-ctf", "--no_ctf", dest="ctf", action="store_false",
                   help="no CTF (and no CTF columns in the STAR files)")
    p.add_argument("--variants", type=int, default=1,
                   help="with the phantom: number of classes (phantom variants 0..K-1)")
    g = p.add_argument_group("imperfections of real data (each off by default; "
                             "docs/simulate.md)")
    for name, kind, default, metavar, text in IMPERFECTION_OPTIONS:
        g.add_argument(f"--{name}", type=kind, default=default, metavar=metavar, help=text)


def _load_maps(args: argparse.Namespace) -> tuple[list[np.ndarray], float, bool]:
    """(maps, pixel size, whether the built-in phantom is used)."""
    from ..io.mrc import read_map
    from ..phantom import VARIANTS, make_phantom_variant

    if args.i is None:
        box = 64 if args.box is None else args.box
        pix = 3.0 if args.angpix is None else args.angpix
        if box < 8:
            raise InputError(f"--box {box}: expected >= 8 px")
        pix = check_pixel_size(pix, "--angpix")
        if not 1 <= args.variants <= len(VARIANTS):
            raise InputError(f"--variants {args.variants}: expected 1..{len(VARIANTS)}")
        return [make_phantom_variant(k, box, pix, args.seed) for k in range(args.variants)], \
            pix, True
    if args.variants != 1:
        raise InputError("--variants: only with the built-in phantom (no --i)")
    maps, pix = [], None
    for path in args.i:
        vol, p = read_map(path, angpix=args.angpix)
        if vol.ndim != 3:
            raise InputError(f"{path}: a 2D image; expected a 3D map")
        if maps and vol.shape != maps[0].shape:
            raise InputError(f"{path}: box {vol.shape[0]} differs from {args.i[0]} "
                             f"({maps[0].shape[0]}); expected maps of one box size")
        if pix is not None and abs(p - pix) > 1e-3 and args.angpix is None:
            raise InputError(f"{path}: pixel size {p:g} A differs from {args.i[0]} ({pix:g} A)"
                             f"; give --angpix to override the headers")
        pix = p if pix is None else pix
        maps.append(vol)
    if args.box is not None and args.box != maps[0].shape[0]:
        raise InputError(f"{args.i[0]}: box {maps[0].shape[0]} differs from --box {args.box}; "
                         f"resample the map or drop --box")
    return maps, float(pix), False


def _memory(n: int, box: int, n_maps: int) -> dict[str, int]:
    """Estimated peak bytes of a simulation: the images (float32, plus the stack's copy while
    it is written) and, per map, its padded projector and transforms."""
    return {"images": 2 * n * box * box * 4, "maps": n_maps * 100 * box**3}


def run(args: argparse.Namespace) -> int:
    """Simulate and write the data set."""
    from ..io.atomic import check_output_dir, make_output_dir, remove_stale_temps
    from ..particles import output_stack_name
    from ..simulate import STACK_NAME, simulate_particles, write_simulation

    check_output_dir(args.o, "--o")
    if args.box is not None and args.box < 8:
        raise InputError(f"--box {args.box}: expected >= 8 px")
    if args.n < 1:
        raise InputError(f"--n {args.n}: expected >= 1 particles")
    if not 0 < args.defocus_min <= args.defocus_max < np.inf:
        raise InputError(f"--defocus_min {args.defocus_min:g} / --defocus_max "
                         f"{args.defocus_max:g}: expected 0 < min <= max (A)")
    if not (0 <= args.max_shift < np.inf and 0 <= args.astigmatism < np.inf):
        raise InputError("--max_shift, --astigmatism: expected finite values >= 0")
    if np.isnan(args.snr):
        raise InputError("--snr nan: expected a number (0 or negative: no noise)")
    # The microscope options, checked against the same ranges as STAR files.
    for opt, label, value in (("--voltage", "rlnVoltage", args.voltage),
                              ("--cs", "rlnSphericalAberration", args.cs),
                              ("--Q0", "rlnAmplitudeContrast", args.q0),
                              ("--bfactor", "rlnCtfBfactor", args.bfactor)):
        if CTF_RANGES[label].bad(value):
            raise InputError(f"{opt} {value:g}: expected {CTF_RANGES[label].text()}")
    if args.ctf and not args.defocus_min > args.astigmatism / 2:
        raise InputError(f"--defocus_min {args.defocus_min:g} / --astigmatism "
                         f"{args.astigmatism:g}: expected defocus_min > astigmatism / 2 (so "
                         f"that every defocus V is positive)")
    if args.i is None:  # before the phantom is made: its size alone may be too large
        box = 64 if args.box is None else args.box
        check_run_memory(_memory(args.n, box, args.variants))
    maps, pix, phantom = _load_maps(args)
    check_run_memory(_memory(args.n, maps[0].shape[0], len(maps)))
    if args.max_shift > maps[0].shape[0] / 2:
        raise InputError(f"--max_shift {args.max_shift:g}: expected <= {maps[0].shape[0] / 2:g}"
                         f" px (half the box)")
    imperfections = Imperfections(**{o[0]: getattr(args, o[0]) for o in IMPERFECTION_OPTIONS})
    try:
        imperfections.validate()
    except ValueError as e:
        raise InputError(f"--{e}") from None
    snr = args.snr if args.snr > 0 else None
    # rlnImageName as RELION writes it: the stack's path from the working folder
    stack_name = output_stack_name(Path(args.o) / STACK_NAME)
    images, optics, particles, truth = simulate_particles(
        maps, pix, args.n, snr=snr, defocus_range=(args.defocus_min, args.defocus_max),
        astigmatism=args.astigmatism, max_shift_px=args.max_shift, seed=args.seed,
        voltage=args.voltage, cs=args.cs, amplitude_contrast=args.q0, bfactor=args.bfactor,
        ctf=args.ctf, stack_name=stack_name, imperfections=imperfections)
    make_output_dir(args.o, "--o")
    remove_stale_temps(args.o)
    written = write_simulation(args.o, images, optics, particles, truth, pix,
                               truth_maps=maps if phantom else None)
    box = maps[0].shape[0]
    print(f"simulated {args.n} particles ({box} px, {pix:g} A/px, {len(maps)} class(es), "
          f"snr {'none' if snr is None else f'{snr:g}'}, ctf {'on' if args.ctf else 'off'}, "
          f"seed {args.seed})")
    for path in written.values():
        print(f"wrote {path}")
    return 0
