"""`cryomap phantom`: write the built-in chiral test map."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import InputError

COMMAND = "phantom"
HELP = "write the built-in protein-like chiral test map"
DESCRIPTION = """\
Write the built-in test molecule (four domains of Gaussian atoms: a twisted body, a head, a
helix-bundle arm and a knob; clearly chiral, positive density, maximum 1) as an MRC map.
The molecule has a fixed size in Angstrom (~130 A across): box * angpix should be >= ~192 A.
--variant K writes a related map (0 = full, 1 = no knob, 2 = arm moved, 3 = no head) in the
same frame, for classification tests.

example:
  cryomap phantom --o phantom.mrc --box 64 --angpix 3.0 --seed 0
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of `cryomap phantom`."""
    p.add_argument("--o", required=True, metavar="MAP", help="output map (MRC)")
    p.add_argument("--box", type=int, metavar="PX", default=64, help="box size (px)")
    p.add_argument("--angpix", type=float, metavar="A", default=3.0, help="pixel size (A)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the atom placement")
    p.add_argument("--variant", type=int, default=0,
                   help="0 = full molecule, 1-3 = variants for classification tests")


def run(args: argparse.Namespace) -> int:
    """Write the phantom map."""
    from ..io.mrc import write_map
    from ..phantom import VARIANTS, make_phantom_variant

    if args.box < 8:
        raise InputError(f"--box {args.box}: expected >= 8 px")
    if not args.angpix > 0:
        raise InputError(f"--angpix {args.angpix}: expected a positive pixel size (A)")
    if not 0 <= args.variant < len(VARIANTS):
        raise InputError(f"--variant {args.variant}: expected 0..{len(VARIANTS) - 1}")
    vol = make_phantom_variant(args.variant, args.box, args.angpix, args.seed)
    out = Path(args.o)
    write_map(out, vol, args.angpix)
    print(f"wrote {out} ({args.box}^3 px, {args.angpix:g} A/px, variant {args.variant}, "
          f"seed {args.seed})")
    return 0
