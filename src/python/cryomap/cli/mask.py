"""`cryomap mask`: a soft solvent mask from a map (relion_mask_create's options)."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from ..errors import InputError

COMMAND = "mask"
HELP = "make a soft solvent mask from a map (as relion_mask_create)"
DESCRIPTION = """\
Make a mask for post-processing or refinement from a map, as relion_mask_create does:
optionally low-pass the map (--lowpass), take the voxels at or above --ini_threshold, grow the
binary mask by --extend_inimask px (negative values shrink it) and add a raised-cosine soft
edge of --width_soft_edge px (1 next to the binary mask, ½ + ½cos(π d / width) at distance d,
0 from `width` px on). Distances are exact Euclidean distances between voxel centres.
Pick the threshold by looking at the (low-passed) map: it should just enclose the molecule.
See docs/postprocess.md.

example:
  cryomap mask --i run_class001.mrc --o mask.mrc --lowpass 15 --ini_threshold 0.02 \\
      --extend_inimask 3 --width_soft_edge 6
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of `cryomap mask` (relion_mask_create's names)."""
    p.add_argument("--i", dest="input", required=True, metavar="MAP",
                   help="input map to threshold (MRC)")
    p.add_argument("--o", dest="output", required=True, metavar="MASK",
                   help="output mask (MRC, values in [0, 1])")
    p.add_argument("--ini_threshold", type=float, default=0.01, metavar="VALUE",
                   help="density at or above which a voxel is in the initial binary mask "
                        "(default: %(default)s)")
    p.add_argument("--extend_inimask", type=float, default=0.0, metavar="PX",
                   help="grow the binary mask by this many pixels; negative values shrink it "
                        "(default: %(default)s)")
    p.add_argument("--width_soft_edge", type=float, default=0.0, metavar="PX",
                   help="width of the raised-cosine soft edge in pixels "
                        "(default: %(default)s, a hard edge)")
    p.add_argument("--lowpass", type=float, default=-1.0, metavar="A",
                   help="low-pass the input map to this resolution (A) before thresholding; "
                        "<= 0: no filter (default: %(default)s)")
    p.add_argument("--angpix", type=float, default=-1.0, metavar="A",
                   help="pixel size (A) for --lowpass and the output header; <= 0: the input "
                        "header's (default: %(default)s)")
    p.add_argument("--invert", action="store_true",
                   help="write 1 - mask (mask the solvent instead of the molecule)")


def run(args: argparse.Namespace) -> int:
    """Check the options, read the map, make the mask and write it (nothing on error)."""
    from ..io.atomic import check_output_file, remove_stale_temps
    from ..io.mrc import check_pixel_size, read_map, write_map
    from ..masks import make_mask

    for label, value in (("--ini_threshold", args.ini_threshold),
                         ("--extend_inimask", args.extend_inimask),
                         ("--width_soft_edge", args.width_soft_edge),
                         ("--lowpass", args.lowpass), ("--angpix", args.angpix)):
        if not np.isfinite(value):
            raise InputError(f"{label} {value}: expected a finite number")
    if args.width_soft_edge < 0:
        raise InputError(f"--width_soft_edge {args.width_soft_edge:g}: expected >= 0 px")
    src, out = Path(args.input), Path(args.output)
    check_output_file(out, "--o")
    vol, header_pix = read_map(src)
    if vol.ndim != 3:
        raise InputError(f"{src}: map shape {vol.shape} is a 2D image; expected a 3D map")
    pix = check_pixel_size(args.angpix, "--angpix") if args.angpix > 0 else header_pix
    if args.lowpass > 0 and args.lowpass < 2 * pix:
        raise InputError(f"--lowpass {args.lowpass:g}: beyond Nyquist of {src} "
                         f"({2 * pix:g} A at {pix:g} A/px); expected >= {2 * pix:g} A or <= 0")
    half_box = vol.shape[0] / 2
    if abs(args.extend_inimask) >= half_box or args.width_soft_edge >= half_box:
        raise InputError(f"--extend_inimask {args.extend_inimask:g} / --width_soft_edge "
                         f"{args.width_soft_edge:g}: expected less than half the box "
                         f"({half_box:g} px) of {src}")

    lowpass = args.lowpass if args.lowpass > 0 else 0.0
    mask = make_mask(vol, args.ini_threshold, extend=args.extend_inimask,
                     soft_edge=args.width_soft_edge, lowpass=lowpass, pixel_size=pix)
    if not np.any(mask >= 1.0):
        vmax = float(vol.max())
        what = "map maximum" + (f" ({vmax:.6g} before low-pass)" if lowpass else f" {vmax:.6g}")
        why = ("no voxel reaches it" if args.extend_inimask >= 0 else
               f"the binary mask vanishes when shrunk by {-args.extend_inimask:g} px")
        raise InputError(f"{src}: --ini_threshold {args.ini_threshold:g} gives an empty mask "
                         f"({why}); expected a threshold below the {what}")
    if args.invert:
        mask = 1.0 - mask
    remove_stale_temps(out.parent, out.name)
    write_map(out, mask.astype(np.float32), pix)
    inside = float(np.mean(mask >= 0.5 if not args.invert else mask < 0.5))
    print(f"wrote {out} ({vol.shape[0]}^3 px, {pix:g} A/px): {100 * inside:.1f}% of the box "
          f"at >= 0.5, threshold {args.ini_threshold:g}, extend {args.extend_inimask:g} px, "
          f"soft edge {args.width_soft_edge:g} px"
          + (f", low-pass {lowpass:g} A" if lowpass else ""))
    return 0
