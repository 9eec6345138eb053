"""`cryomap info`: summarise a particle file (STAR or cryoSPARC .cs) or an MRC file."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import InputError
from ..io.mrc import check_pixel_size, open_stack, read_header
from ..io.star import read_star
from ..particles import ParticleSet, _resolve_stack, load_particles, stack_search_dirs

COMMAND = "info"
HELP = "summarise a STAR or cryoSPARC .cs file, an MRC map or an MRC image stack"
DESCRIPTION = """\
Print a summary of a file.

  .star        blocks and their sizes; for particle files also the number of particles,
               the optics groups (pixel size, box, voltage, Cs, Q0), the columns present,
               the ranges of angles, origins and defoci, the RELION defaults applied, and
               whether the image stacks of the first and last particle exist (with their
               real box, flagged when it differs from rlnImageSize).
  .cs          the same for a cryoSPARC particle file (blob paths are relative to the
               cryoSPARC project folder: --cs_project_dir).
  .mrc/.mrcs   shape, mode, pixel size, min/max/mean/std (also .map, .rec, .st, .ali; a
               file with several sections of unequal size is summarised as a stack).

Image paths in a STAR file are found as RELION finds them: relative to the working folder
(RELION's project folder), then relative to the STAR file's folder (docs/conventions.md).

Example:
  cryomap info --i Refine3D/job012/run_data.star
  cryomap info --i run_class001.mrc
  cryomap info --i P3/J42/J42_particles.cs --cs_project_dir P3
"""

_MRC_SUFFIXES = {".mrc", ".map", ".rec", ".mrcs", ".st", ".ali"}
_STACK_SUFFIXES = {".mrcs", ".st", ".ali"}
# Statistics read at most this many bytes (a sample of the first sections) so that info
# stays fast on files larger than RAM.
_STATS_BYTES = 512 * 2**20


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Options of `cryomap info`."""
    parser.add_argument("--i", dest="input", required=True, metavar="FILE",
                        help="a .star, .cs, .mrc or .mrcs file")
    parser.add_argument("--angpix", type=float, default=None, metavar="A",
                        help="pixel size (A) to use where the file has none (or a wrong one)")
    parser.add_argument("--cs_project_dir", "--cs-project-dir", dest="cs_project_dir",
                        default=None, metavar="DIR",
                        help="cryoSPARC project folder that .cs blob paths are relative to")


def _range(values: np.ndarray) -> str:
    return f"{np.min(values):.6g} .. {np.max(values):.6g}"


def _particle_lines(ps: ParticleSet, notes: list[str]) -> list[str]:
    out = [f"particles: {ps.n_particles}", f"optics groups: {ps.n_groups}"]
    group = ps.optics_group_index()
    pix, boxes = ps.pixel_sizes, ps.boxes
    for g, row in ps.optics.iterrows():
        desc = [f"  {int(g) + 1}"]
        if "rlnOpticsGroupName" in ps.optics:
            desc.append(str(row["rlnOpticsGroupName"]))
        desc.append(f"pixel {pix[g]:.4f} A")
        desc.append(f"box {boxes[g]}")
        for label, unit in (("rlnVoltage", "kV"), ("rlnSphericalAberration", "mm Cs"),
                            ("rlnAmplitudeContrast", "Q0")):
            if label in ps.optics:
                desc.append(f"{float(row[label]):g} {unit}")
        desc.append(f"{int(np.count_nonzero(group == g))} particles")
        out.append(", ".join(desc))
    ab = ps.aberrations()
    present = [k for k, v in ab.items() if v is not None]
    if present:
        out.append("aberrations in the optics table: " + ", ".join(present))
    out += [f"note: {n}" for n in notes]
    out.append("particle columns: " + " ".join(ps.particles.columns))

    p = ps.particles
    out += _column_lines(p)

    # Do the images resolve, and do the stacks hold images of the stated box?
    rows = [0, ps.n_particles - 1]
    paths = ps.image_paths(rows)
    for what, row, pth in zip(("first", "last"), rows, paths, strict=True):
        name = p["rlnImageName"].iloc[row]
        if pth is None:
            out.append(f"images: {what} particle {name}: STACK NOT FOUND (looked in "
                       f"{', '.join(str(d) for d in ps.search_dirs)})")
            continue
        try:
            h = read_header(pth)
        except InputError as e:  # info reports; reading the images would stop here
            out.append(f"images: {what} particle {name}: STACK UNREADABLE: {e}")
            continue
        box = int(boxes[group[row]])
        line = (f"images: {what} particle {name}: stack found at {pth} ({h.nz} images of "
                f"{h.nx} x {h.ny} px)")
        if (h.nx, h.ny) != (box, box):
            line += (f"; MISMATCH: rlnImageSize of optics group {group[row] + 1} is {box} px, "
                     f"the stack's images are {h.nx} x {h.ny} px")
        out.append(line)
    return out


def _star_info(path: Path, angpix: float | None) -> list[str]:
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
    notes: list[str] = []
    try:
        with load_particles(path, angpix=angpix, log=notes.append, check_stacks=False) as ps:
            out += _particle_lines(ps, notes) + _stack_lines(ps.particles, path)
    except InputError as e:
        # a file a job would refuse (e.g. RELION 3.0 metadata whose stacks are elsewhere, so
        # that nothing gives the box size, or a value out of range): info still summarises
        # the metadata, after the reason a job would stop
        tables = [b for b in blocks.values()
                  if isinstance(b, pd.DataFrame) and "rlnImageName" in b.columns]
        if not tables:
            raise
        table = tables[0]
        out.append(f"note: jobs would refuse this file: {e}")
        out.append("the metadata alone:")
        out += _metadata_lines(table, path)
    return out


def _column_lines(p: pd.DataFrame) -> list[str]:
    """Ranges of the pose and CTF columns and counts of the class and half-set columns."""
    out = []
    for label in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst",
                  "rlnOriginYAngst", "rlnOriginX", "rlnOriginY", "rlnDefocusU",
                  "rlnDefocusV", "rlnDefocusAngle"):
        if label in p.columns:
            vals = pd.to_numeric(p[label], errors="coerce").to_numpy(dtype=np.float64)
            out.append(f"  {label}: {_range(vals)}" if np.isfinite(vals).any()
                       else f"  {label}: no numeric values")
    for label in ("rlnClassNumber", "rlnRandomSubset"):
        if label in p.columns:
            counts = p[label].value_counts().sort_index()
            out.append(f"  {label}: " + ", ".join(f"{k}: {v}" for k, v in counts.items()))
    return out


def _metadata_lines(p: pd.DataFrame, path: Path) -> list[str]:
    """What a particle table says without its images: counts, columns, ranges, and which of
    the stacks it names exist (looked up as load_particles does)."""
    return ([f"particles: {len(p)}", "particle columns: " + " ".join(p.columns)]
            + _column_lines(p) + _stack_lines(p, path))


def _stack_lines(p: pd.DataFrame, path: Path) -> list[str]:
    """How many of the stacks that rlnImageName names exist (looked up as load_particles
    does), and the first missing ones."""
    out = []
    names = p["rlnImageName"].astype(str).str.strip()
    stacks = pd.unique(names.str.split("@", n=1).str[-1]) if len(names) else []
    dirs = stack_search_dirs(path)
    missing = []
    for name in stacks:
        try:
            found = _resolve_stack(str(name), dirs, str(path))
        except InputError:
            found = None
        if found is None:
            missing.append(str(name))
    out.append(f"stacks: {len(stacks)} named, {len(stacks) - len(missing)} found, "
               f"{len(missing)} missing (looked in {', '.join(str(d) for d in dirs)})")
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more"
                                         if len(missing) > 5 else "")
        out.append(f"  missing: {shown}")
    return out


def _cs_info(path: Path, angpix: float | None, project_dir: str | None) -> list[str]:
    from ..io.cryosparc import read_cs

    cs = read_cs(path)
    out = [f"cryoSPARC file {path}", f"records: {len(cs)}",
           "fields: " + " ".join(cs.dtype.names or ())]
    notes: list[str] = []
    with load_particles(path, angpix=angpix, project_dir=project_dir, log=notes.append,
                        check_stacks=False) as ps:
        out.append("as RELION columns:")
        out += _particle_lines(ps, notes)
    return out


def _stats(data: np.ndarray) -> str:
    d = np.asarray(data, dtype=np.float64)
    return (f"min {d.min():.6g}, max {d.max():.6g}, mean {d.mean():.6g}, "
            f"std {d.std():.6g}")


def _mrc_info(path: Path, angpix: float | None) -> list[str]:
    h = read_header(path)
    if angpix is not None:
        pix_text = (f"{angpix:.4f} A (--angpix; header: "
                    f"{f'{h.pixel_size:.4f} A' if h.pixel_size else 'not set'})")
    else:
        pix_text = (f"{h.pixel_size:.4f} A" if h.pixel_size > 0
                    else "not set in header (give --angpix)")
    is_stack = (path.suffix.lower() in _STACK_SUFFIXES
                or (h.nz > 1 and not h.nz == h.ny == h.nx))
    mode = f"mode {h.mode} ({np.dtype(h.dtype).name})"
    with open_stack(path, require_square=False) as st:
        if is_stack:
            out = [f"MRC stack {path}", f"images: {h.nz}",
                   f"shape (n, y, x): ({h.nz}, {h.ny}, {h.nx}), {mode}",
                   f"pixel size: {pix_text}"]
            n_read = max(1, min(h.nz, _STATS_BYTES // (4 * h.nx * h.ny)))
            data = st.read(np.arange(n_read))
            where = "" if n_read == h.nz else f" (first {n_read} images)"
            out.append(f"values{where}: {_stats(data)}")
            return out
        n_read = max(1, min(h.nz, _STATS_BYTES // (4 * h.nx * h.ny)))
        data = st.read(np.arange(n_read))
    kind = "map" if h.nz > 1 else "image"
    shape = f"(z, y, x): ({h.nz}, {h.ny}, {h.nx})" if h.nz > 1 else f"(y, x): ({h.ny}, {h.nx})"
    out = [f"MRC {kind} {path}", f"shape {shape}, {mode}", f"pixel size: {pix_text}"]
    pix = angpix if angpix is not None else h.pixel_size
    if pix > 0:
        out.append(f"box size: {h.nx * pix:.2f} A")
    where = "" if n_read == h.nz else f" (first {n_read} sections)"
    out.append(f"values{where}: {_stats(data)}")
    return out


def run(args: argparse.Namespace) -> int:
    """Print the summary of args.input; InputError for a missing or unsupported file."""
    path = Path(args.input)
    if not path.exists():
        raise InputError(f"{path}: file not found")
    angpix = None if args.angpix is None else check_pixel_size(args.angpix, "--angpix")
    suffix = path.suffix.lower()
    if suffix == ".star":
        lines = _star_info(path, angpix)
    elif suffix == ".cs":
        lines = _cs_info(path, angpix, args.cs_project_dir)
    elif suffix in _MRC_SUFFIXES:
        lines = _mrc_info(path, angpix)
    else:
        raise InputError(f"{path}: unknown file type {suffix or '(no suffix)'!r}; expected "
                         f".star, .cs, .mrc or .mrcs")
    print("\n".join(lines))
    return 0
