"""`cryomap reconstruct`: a map from particles at known poses (RELION's relion_reconstruct)."""

from __future__ import annotations

import argparse

COMMAND = "reconstruct"
HELP = "reconstruct a map from particles at their known poses (as relion_reconstruct)"
DESCRIPTION = """\
Reconstruct a 3D map from particle images at the poses in their STAR file (rlnAngleRot/Tilt/Psi,
rlnOriginX/YAngst; origins default to 0), as relion_reconstruct does, on the same
back-projection and regularisation path as `cryomap refine`: sigma2 estimated from the images
and re-estimated once against a first reconstruction, the map V = D/(W + 1/tau2) with tau2 from
the FSC between the two half-sets (rlnRandomSubset, or a random split), summed over the point
group of --sym. Outputs: the map (--o) and the unfiltered half maps <o>_half1.mrc and
<o>_half2.mrc; with --subset 1|2 only the particles of that half-set are used (tau2 from the
FSC of two random halves of it) and only --o is written. Unlike relion_reconstruct the map is
regularised. See docs/symmetry.md.

With --classes, one map per class (rlnClassNumber, e.g. of a class3d run_data.star) from the
particles assigned to it: <o>_class001.mrc with <o>_class001_half1/2.mrc, and so on. RELION's
data files keep only each particle's most probable class, so the assignment is hard.

example:
  cryomap reconstruct --i Refine3D/job001/run_data.star --o rec.mrc --ctf --sym C1
  cryomap reconstruct --i run_data.star --o half1.mrc --ctf --sym D2 --subset 1 --maxres 4
  cryomap reconstruct --i Class3D/job003/run_it025_data.star --o rec.mrc --ctf --classes
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of `cryomap reconstruct` (relion_reconstruct's names)."""
    p.add_argument("--i", required=True, metavar="STAR",
                   help="particles with poses: RELION STAR file (e.g. run_data.star)")
    p.add_argument("--o", required=True, metavar="MAP", help="output map (.mrc)")
    p.add_argument("--ctf", dest="use_ctf", action="store_true",
                   help="correct for the CTF (needs defocus columns; off by default, as "
                        "relion_reconstruct)")
    p.add_argument("--sym", default="C1",
                   help="point-group symmetry (RELION's names; docs/symmetry.md)")
    p.add_argument("--subset", type=int, default=None,
                   help="only the particles with this rlnRandomSubset (1 or 2)")
    p.add_argument("--angpix", type=float, default=None,
                   help="pixel size (Å) replacing the file's (needed when it has none)")
    p.add_argument("--maxres", type=float, default=None,
                   help="highest resolution (Å) used (default: Nyquist)")
    p.add_argument("--classes", action="store_true",
                   help="one map per class of rlnClassNumber (<o>_class001.mrc and its half "
                        "maps, ...) from the particles assigned to it")
    p.add_argument("--j", "--threads", dest="threads", type=int, default=None,
                   help="OpenMP threads (default: all cores)")


def run(args: argparse.Namespace) -> int:
    """Reconstruct through the Python API's `cryomap.reconstruct`."""
    from ..api import reconstruct
    from ..errors import InputError

    if args.threads is not None and args.threads < 1:
        raise InputError(f"--j {args.threads}: expected at least 1 thread")
    reconstruct(args.i, args.o, sym=args.sym, ctf=args.use_ctf, subset=args.subset,
                angpix=args.angpix, maxres=args.maxres, threads=args.threads, ranks=args._ranks,
                classes=args.classes)
    return 0
