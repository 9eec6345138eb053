"""`cryomap info`: summarise a STAR particle file or an MRC map / image stack."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import InputError
from ..io.mrc import open_stack, read_map
from ..io.star import read_star
from ..particles import load_particles

COMMAND = "info"
HELP = "summarise a STAR file, an MRC map or an MRC image stack"
DESCRIPTION = """\
Print a summary of a file.

  .star        blocks and their sizes; for particle files also the number of particles,
               the optics groups (pixel size, box, voltage, Cs, Q0), the columns present,
               the ranges of angles, origins and defoci, and whether the image stacks of the
               first and last particle exist.
  .mrc/.mrcs   shape, pixel size, min/max/mean/std (for stacks also the number of images).

Example:
  cryomap info --i Refine3D/job012/run_data.star
  cryomap info --i run_class001.mrc
"""

_MAP_SUFFIXES = {".mrc", ".map", ".rec"}
_STACK_SUFFIXES = {".mrcs", ".st"}
# Stack statistics read at most this many bytes (a sample of the first images) so that info
# stays fast on stacks larger than RAM.
_STATS_BYTES = 512 * 2**20


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `cryomap info`."""
    parser.add_argument("--i", dest="input", required=True, metavar="FILE",
                        help="a .star, .mrc or .mrcs file")


def _range(values: np.ndarray) -> str:
    return f"{np.min(values):.6g} .. {np.max(values):.6g}"


def _star_info(path: Path) -> list[str]:
    blocks = read_star(path)
    out = [f"STAR file {path}", f"blocks: {len(blocks)}"]
    for name, block in blocks.items():
        if isinstance(block, pd.DataFrame):
            out.append(f"  data_{name}: loop, {len(block)} rows x {block.shape[1]} columns")
        else:
            out.append(f"  data_{name}: list, {len(block)} labels")
            out += [f"    {k} = {v}" for k, v in list(block.items())[:20]]
    is_particles = "optics" in blocks or "particles" in blocks or any(
        isinstance(b, pd.DataFrame) and "rlnImageName" in b.columns for b in blocks.values())
    if not is_particles:
        return out

    ps = load_particles(path)
    out.append(f"particles: {ps.n_particles}")
    out.append(f"optics groups: {len(ps.optics)}")
    group = ps.optics_group_index()
    for g, row in ps.optics.iterrows():
        desc = [f"  {int(g) + 1}"]
        if "rlnOpticsGroupName" in ps.optics:
            desc.append(str(row["rlnOpticsGroupName"]))
        desc.append(f"pixel {float(row['rlnImagePixelSize']):.4f} A")
        desc.append(f"box {int(row['rlnImageSize'])}")
        for label, unit in (("rlnVoltage", "kV"), ("rlnSphericalAberration", "mm Cs"),
                            ("rlnAmplitudeContrast", "Q0")):
            if label in ps.optics:
                desc.append(f"{float(row[label]):g} {unit}")
        desc.append(f"{int(np.count_nonzero(group == g))} particles")
        out.append(", ".join(desc))
    out.append("particle columns: " + " ".join(ps.particles.columns))

    p = ps.particles
    for label in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst",
                  "rlnOriginYAngst", "rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle"):
        if label in p.columns:
            vals = pd.to_numeric(p[label], errors="coerce").to_numpy(dtype=np.float64)
            out.append(f"  {label}: {_range(vals)}")
    for label in ("rlnClassNumber", "rlnRandomSubset"):
        if label in p.columns:
            counts = p[label].value_counts().sort_index()
            out.append(f"  {label}: " + ", ".join(f"{k}: {v}" for k, v in counts.items()))

    # Do the images resolve? Check the stacks of the first and the last particle.
    paths = ps.image_paths([0, ps.n_particles - 1])
    for what, row, pth in (("first", 0, paths[0]), ("last", ps.n_particles - 1, paths[1])):
        name = p["rlnImageName"].iloc[row]
        out.append(f"images: {what} particle {name}: "
                   + (f"stack found at {pth}" if pth is not None else "STACK NOT FOUND"))
    ps.close()
    return out


def _stats(data: np.ndarray) -> str:
    d = np.asarray(data, dtype=np.float64)
    return (f"min {d.min():.6g}, max {d.max():.6g}, mean {d.mean():.6g}, "
            f"std {d.std():.6g}")


def _stack_info(path: Path) -> list[str]:
    with open_stack(path) as st:
        out = [f"MRC stack {path}", f"images: {st.n_images}",
               f"shape (n, y, x): ({st.n_images}, {st.box}, {st.box})",
               "pixel size: " + (f"{st.pixel_size:.4f} A" if st.pixel_size > 0
                                 else "not set in header")]
        n_read = max(1, min(st.n_images, _STATS_BYTES // (4 * st.box * st.box)))
        data = st.read(np.arange(n_read))
        where = "" if n_read == st.n_images else f" (first {n_read} images)"
        out.append(f"values{where}: {_stats(data)}")
    return out


def _map_info(path: Path) -> list[str]:
    data, pix = read_map(path)
    kind = "map" if data.ndim == 3 else "image"
    axes = "(z, y, x)" if data.ndim == 3 else "(y, x)"
    return [f"MRC {kind} {path}", f"shape {axes}: {data.shape}", f"pixel size: {pix:.4f} A",
            f"box size: {data.shape[0] * pix:.2f} A", f"values: {_stats(data)}"]


def run(args: argparse.Namespace) -> int:
    """Print the summary of args.input; InputError for a missing or unsupported file."""
    path = Path(args.input)
    if not path.exists():
        raise InputError(f"{path}: file not found")
    suffix = path.suffix.lower()
    if suffix == ".star":
        lines = _star_info(path)
    elif suffix in _STACK_SUFFIXES:
        lines = _stack_info(path)
    elif suffix in _MAP_SUFFIXES:
        lines = _map_info(path)
    else:
        raise InputError(f"{path}: unknown file type {suffix or '(no suffix)'!r}; expected "
                         f".star, .mrc or .mrcs")
    print("\n".join(lines))
    return 0
