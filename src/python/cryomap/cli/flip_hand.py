"""`cryomap flip_hand`: the mirror image of a map (the other hand)."""

from __future__ import annotations

import argparse

import numpy as np

from ..errors import InputError

COMMAND = "flip_hand"
HELP = "write the mirror image of a map (the other hand)"
DESCRIPTION = """\
Write the mirror image of a 3D map: the map reflected through the plane z = floor(N/2) (its
z axis reversed about the box centre, which stays where it is). Projections
cannot tell a map from its mirror image, so an initial model made from the particles alone has
either hand; flip it when a known feature (e.g. right-handed alpha-helices) says it is wrong,
before refining. Refining the flipped map gives the mirror-image poses.

example:
  cryomap flip_hand --i InitialModel/job001/run_class001.mrc --o initial_flipped.mrc
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--i", required=True, help="input map (MRC)")
    p.add_argument("--o", required=True, help="output map (MRC)")


def mirror(volume: np.ndarray) -> np.ndarray:
    """The map reflected through the plane z = floor(N/2): out[z] = in[(2 floor(N/2) - z)],
    taken as 0 where that falls outside the box (z = 0 of an even box)."""
    v = np.asarray(volume)
    n = v.shape[0]
    c = n // 2
    out = np.zeros_like(v)
    z = np.arange(n)
    src = 2 * c - z
    ok = (src >= 0) & (src < n)
    out[z[ok]] = v[src[ok]]
    return out


def run(args: argparse.Namespace) -> int:
    from pathlib import Path

    from ..io.atomic import check_output_file
    from ..io.mrc import read_map, write_map

    src, out = Path(args.i), Path(args.o)
    if src.resolve() == out.resolve():
        raise InputError(f"--o {out}: the same file as --i; expected a new file")
    check_output_file(out, "--o")
    vol, pix = read_map(src)
    if vol.ndim != 3 or vol.shape[0] < 2:
        raise InputError(f"{src}: map shape {vol.shape}; expected a 3D map")
    write_map(out, mirror(vol).astype(np.float32), pix)
    print(f"mirror image of {src} written to {out}")
    return 0
