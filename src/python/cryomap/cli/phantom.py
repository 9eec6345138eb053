"""`cryomap phantom`: write the built-in chiral test map."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from ..errors import InputError
from .options import check_run_memory, seed_arg

COMMAND = "phantom"
HELP = "write the built-in protein-like chiral test map"
DESCRIPTION = """\
Write the built-in test molecule (four domains of Gaussian atoms: a twisted body, a head, a
helix-bundle arm and a knob; clearly chiral, positive density, maximum 1) as an MRC map.
The molecule has a fixed size in Angstrom (~130 A across): box * angpix should be >= ~192 A.
--variant K writes a related map (0 = full, 1 = no knob, 2 = arm moved, 3 = no head) in the
same frame, for classification tests. --lowpass A writes it low-pass filtered at A Å
(RELION's raised-cosine edge): a featureless initial model for refine and class3d.

example:
  cryomap phantom --o phantom.mrc --box 64 --angpix 3.0 --seed 0
  cryomap phantom --o initial.mrc --box 64 --angpix 3.0 --lowpass 60   # an initial model
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of `cryomap phantom`."""
    p.add_argument("--o", required=True, metavar="MAP", help="output map (MRC)")
    p.add_argument("--box", type=int, metavar="PX", default=64, help="box size (px)")
    p.add_argument("--angpix", type=float, metavar="A", default=3.0, help="pixel size (A)")
    p.add_argument("--seed", type=seed_arg, default=0, help="random seed of the atom placement")
    p.add_argument("--variant", type=int, default=0,
                   help="0 = full molecule, 1-3 = variants for classification tests")
    p.add_argument("--lowpass", type=float, default=None, metavar="A",
                   help="low-pass filter the map at this resolution (Å), e.g. for an initial "
                        "model; none: not filtered")


def run(args: argparse.Namespace) -> int:
    """Write the phantom map."""
    from ..io.atomic import check_output_file, remove_stale_temps
    from ..io.mrc import check_pixel_size, write_map
    from ..phantom import VARIANTS, make_phantom_variant

    if args.box < 8:
        raise InputError(f"--box {args.box}: expected >= 8 px")
    check_pixel_size(args.angpix, "--angpix")
    if not 0 <= args.variant < len(VARIANTS):
        raise InputError(f"--variant {args.variant}: expected 0..{len(VARIANTS) - 1}")
    if args.lowpass is not None and not (np.isfinite(args.lowpass)
                                         and args.lowpass >= 2 * args.angpix):
        raise InputError(f"--lowpass {args.lowpass:g}: expected a resolution >= "
                         f"{2 * args.angpix:g} Å (Nyquist at --angpix {args.angpix:g})")
    out = Path(args.o)
    check_output_file(out, "--o")
    check_run_memory({"map": 100 * args.box**3}, "use a smaller --box")
    vol = make_phantom_variant(args.variant, args.box, args.angpix, args.seed)
    if args.lowpass is not None:
        from ..volume import Volume

        vol = Volume(vol, args.angpix).lowpass(args.lowpass).asnumpy()
    remove_stale_temps(out.parent, out.name)
    write_map(out, vol, args.angpix)
    low = "" if args.lowpass is None else f", low-passed at {args.lowpass:g} A"
    print(f"wrote {out} ({args.box}^3 px, {args.angpix:g} A/px, variant {args.variant}, "
          f"seed {args.seed}{low})")
    return 0
