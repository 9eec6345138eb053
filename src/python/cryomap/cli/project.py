"""`cryomap project`: project a map at the poses of a STAR file, like relion_project."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from ..ctf import CTF_RANGES, check_values
from ..errors import InputError
from ..io.star import numeric_column
from .options import check_run_memory, seed_arg

COMMAND = "project"
HELP = "project a map at the poses of a STAR file (like relion_project)"
DESCRIPTION = """\
Make one projection per particle row of --ang (rlnAngleRot/Tilt/Psi in degrees, optional
rlnOriginXAngst/YAngst; missing origins are 0), as relion_project does: Fourier central slice
(sum-projection scale), multiplied by the CTF with --ctf (rlnDefocusU/V/Angle per row; voltage,
Cs and Q0 from the optics table or the row; Q0 0.1 when absent), shifted by -origin. The pixel
size is the map's (or --angpix, which also serves maps without one); an optics table's
rlnImagePixelSize must agree within 0.001 A. Images are placed as relion_project places them:
for an odd box the centre of the map lands on pixel (N+1)/2, one pixel further along +x and
+y than floor(N/2) (docs/conventions.md, "Grids"). Every row is checked before anything is
written.
Writes the stack --o (.mrcs; a name without .mrcs is a root, as for relion_project) and, next
to it, a STAR file (same name, .star) with the input rows and rlnImageName pointing into the
stack (by its path from the working folder, as RELION writes image paths).

example:
  cryomap project --i map.mrc --ang truth.star --o proj.mrcs --ctf
  cryomap project --i map.mrc --ang poses.star --o noisy.mrcs --ctf --add_noise --snr 0.05
"""

_ANGLES = ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")
_CTF_OPTICS = ("rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast")
_PIX_TOL = 1e-3


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of `cryomap project` (relion_project's spellings)."""
    p.add_argument("--i", required=True, metavar="MAP", help="map to project (MRC)")
    p.add_argument("--ang", required=True, metavar="STAR",
                   help="STAR file with the poses (one image per row)")
    p.add_argument("--o", required=True, metavar="STACK",
                   help="output stack (.mrcs; or a root name as for relion_project); the "
                        "STAR file goes next to it")
    p.add_argument("--angpix", type=float, metavar="A", default=None,
                   help="pixel size of the map (A); default: from the map header")
    p.add_argument("--ctf", action="store_true", help="apply the CTF of each row")
    p.add_argument("--add_noise", "--add-noise", dest="add_noise", action="store_true",
                   help="add white Gaussian noise (variance = signal variance / --snr)")
    p.add_argument("--snr", type=float, default=0.1, help="signal-to-noise ratio with "
                                                          "--add_noise")
    p.add_argument("--seed", "--random_seed", type=seed_arg, default=0, help="noise random seed")
    p.add_argument("--pad", type=int, choices=(1, 2), default=2, help="padding factor")
    p.add_argument("--interp", choices=("nearest", "linear"), default="linear",
                   help="Fourier-space interpolation")


def read_pose_table(path: Path) -> tuple[pd.DataFrame | None, pd.DataFrame]:
    """(optics table or None, particle rows) of a pose STAR file: RELION 3.1+ (data_optics +
    data_particles) or a single loop (RELION 3.0 / plain pose list)."""
    from ..io.star import read_star

    blocks = read_star(path)
    loops = {k: v for k, v in blocks.items() if isinstance(v, pd.DataFrame)}
    optics = loops.get("optics")
    if "particles" in loops:
        rows = loops["particles"]
    else:
        others = [v for k, v in loops.items() if k != "optics"]
        if not others:
            raise InputError(f"{path}: no particle table (blocks: "
                             f"{', '.join('data_' + k for k in blocks)}); expected "
                             f"data_particles or a loop with rlnAngleRot/Tilt/Psi")
        rows = others[0]
    if len(rows) == 0:
        raise InputError(f"{path}: the particle table is empty; expected one row per image")
    return optics, rows.reset_index(drop=True)


def _numeric(df: pd.DataFrame, label: str, path: Path, block: str) -> np.ndarray:
    """A numeric column (InputError naming the file, row and field if absent, not numbers,
    not finite, or outside its range for CTF fields)."""
    if label not in df.columns:
        raise InputError(f"{path}: {block} has no {label} column")
    vals = numeric_column(df, label, f"{path}: {block}")
    if label in CTF_RANGES:
        check_values(label, vals, f"{path}: {block}")
    return vals


def _group_index(optics: pd.DataFrame | None, rows: pd.DataFrame, path: Path) -> np.ndarray:
    """0-based optics-table row of each particle (rlnOpticsGroup numbers rows 1..N)."""
    n = len(rows)
    if optics is None or "rlnOpticsGroup" not in rows.columns:
        return np.zeros(n, dtype=np.int64)
    g = _numeric(rows, "rlnOpticsGroup", path, "data_particles")
    bad = (g < 1) | (g > len(optics)) | (g != np.round(g))
    if np.any(bad):
        row = int(np.argmax(bad))
        raise InputError(f"{path}: rlnOpticsGroup {g[row]:g} in row {row + 1}; expected "
                         f"1..{len(optics)} (a row of data_optics)")
    return g.astype(np.int64) - 1


def _per_row(label: str, optics: pd.DataFrame | None, rows: pd.DataFrame,
             group: np.ndarray, path: Path, default: float | None = None) -> np.ndarray:
    """A value per row, from the particle table or else the row's optics group."""
    if label in rows.columns:
        return _numeric(rows, label, path, "data_particles")
    if optics is not None and label in optics.columns:
        return _numeric(optics, label, path, "data_optics")[group]
    if default is not None:
        return np.full(len(rows), float(default))
    raise InputError(f"{path}: no {label} column in data_particles or data_optics; expected "
                     f"it with --ctf")


def ctf_from_rows(optics: pd.DataFrame | None, rows: pd.DataFrame, group: np.ndarray,
                  path: Path):
    """CtfParams of the rows (RELION defaults: V = U, angle 0, B 0, scale 1, no phase shift)."""
    from ..ctf import CtfParams
    from ..particles import AMPLITUDE_CONTRAST_DEFAULT

    du = _per_row("rlnDefocusU", optics, rows, group, path)
    q0 = _per_row("rlnAmplitudeContrast", optics, rows, group, path,
                  default=AMPLITUDE_CONTRAST_DEFAULT)
    return CtfParams(
        defocus_u=du,
        defocus_v=(_numeric(rows, "rlnDefocusV", path, "data_particles")
                   if "rlnDefocusV" in rows.columns else du.copy()),
        defocus_angle=_per_row("rlnDefocusAngle", optics, rows, group, path, default=0.0),
        voltage=_per_row("rlnVoltage", optics, rows, group, path),
        cs=_per_row("rlnSphericalAberration", optics, rows, group, path),
        amplitude_contrast=q0,
        phase_shift=_per_row("rlnPhaseShift", optics, rows, group, path, default=0.0),
        bfactor=_per_row("rlnCtfBfactor", optics, rows, group, path, default=0.0),
        scale=_per_row("rlnCtfScalefactor", optics, rows, group, path, default=1.0),
    )


def _check_pixel_size(optics: pd.DataFrame | None, rows: pd.DataFrame, group: np.ndarray,
                      pix: float, box: int, path: Path, map_path: str) -> None:
    """The STAR file's pixel size and box (where given) must match the map's."""
    for label, block, table, idx in (("rlnImagePixelSize", "data_optics", optics, group),
                                     ("rlnPixelSize", "data_particles", rows, None)):
        if table is None or label not in table.columns:
            continue
        vals = _numeric(table, label, path, block)
        vals = vals[idx] if idx is not None else vals
        bad = np.abs(vals - pix) > _PIX_TOL
        if np.any(bad):
            raise InputError(f"{path}: {block} {label} = {vals[np.argmax(bad)]:g} A differs "
                             f"from the pixel size of {map_path} ({pix:g} A) by more than "
                             f"0.001 A; expected the same pixel size (or set --angpix)")
    if optics is not None and "rlnImageSize" in optics.columns:
        sizes = _numeric(optics, "rlnImageSize", path, "data_optics")[group]
        if np.any(sizes != box):
            raise InputError(f"{path}: data_optics rlnImageSize = "
                             f"{sizes[np.argmax(sizes != box)]:g} differs from the box of "
                             f"{map_path} ({box}); expected the same box size")


def _to_relion31(rows: pd.DataFrame, pix: float, box: int, path: Path
                 ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Optics table and particle rows in the 3.1 layout for a pose file without data_optics:
    per-row voltage/Cs/Q0 (RELION 3.0) move to one optics group, origins in px -> A."""
    from ..particles import make_optics_table

    kw = {}
    for label, key in zip(_CTF_OPTICS, ("voltage", "cs", "amplitude_contrast"), strict=True):
        if label in rows.columns:
            vals = np.unique(_numeric(rows, label, path, "data_particles"))
            if vals.size > 1:
                raise InputError(f"{path}: {label} takes {vals.size} values and there is no "
                                 f"data_optics; expected one value (or a RELION 3.1 file)")
            kw[key] = float(vals[0])
    optics = make_optics_table(pix, box, **kw)
    rows = rows.copy()
    for old, new in (("rlnOriginX", "rlnOriginXAngst"), ("rlnOriginY", "rlnOriginYAngst")):
        if old in rows.columns and new not in rows.columns:
            rows[new] = _numeric(rows, old, path, "data_particles") * pix
    rows = rows.drop(columns=[c for c in _CTF_OPTICS + ("rlnPixelSize", "rlnMagnification",
                                                        "rlnDetectorPixelSize", "rlnOriginX",
                                                        "rlnOriginY")
                              if c in rows.columns])
    rows["rlnOpticsGroup"] = 1
    return optics, rows


def run(args: argparse.Namespace) -> int:
    """Project the map and write the stack and its STAR file."""
    from ..io.atomic import check_output_file, remove_stale_temps
    from ..io.mrc import read_map, write_stack
    from ..particles import output_stack_name, write_particles
    from ..simulate import project_images

    ang_path = Path(args.ang)
    out = Path(args.o)
    # relion_project takes an output root: accept "root", "root.mrcs" or "root.star"
    if out.suffix == ".star":
        out = out.with_suffix(".mrcs")
    elif out.suffix != ".mrcs":
        out = out.with_name(out.name + ".mrcs")
    if args.add_noise and not (args.snr > 0 and np.isfinite(args.snr)):
        raise InputError(f"--snr {args.snr}: expected a finite value > 0 with --add_noise")
    star_out = out.with_suffix(".star")
    check_output_file(out, "--o")
    check_output_file(star_out, "--o")
    # --angpix first: it must serve maps whose header has no pixel size.
    vol, pix = read_map(args.i, angpix=args.angpix)
    if vol.ndim != 3:
        raise InputError(f"{args.i}: a 2D image; expected a cubic 3D map")
    box = vol.shape[0]

    optics, rows = read_pose_table(ang_path)
    group = _group_index(optics, rows, ang_path)
    _check_pixel_size(optics, rows, group, pix, box, ang_path, args.i)
    angles = np.stack([_numeric(rows, c, ang_path, "data_particles") for c in _ANGLES], axis=1)
    origins = np.zeros((len(rows), 2))
    for j, (label, old) in enumerate((("rlnOriginXAngst", "rlnOriginX"),
                                      ("rlnOriginYAngst", "rlnOriginY"))):
        if label in rows.columns:
            origins[:, j] = _numeric(rows, label, ang_path, "data_particles") / pix
        elif old in rows.columns:  # RELION 3.0: pixels
            origins[:, j] = _numeric(rows, old, ang_path, "data_particles")
    ctf = ctf_from_rows(optics, rows, group, ang_path) if args.ctf else None
    # the projections (float32) and the stack's copy while it is written; the padded map
    check_run_memory({"images": 2 * len(rows) * box * box * 4, "map": 100 * box**3})

    images = project_images(vol, angles, origins, ctf, pix, pad=args.pad, interp=args.interp,
                            image_origin="relion_project")
    if args.add_noise:
        signal_var = float(np.mean(np.var(images, axis=(1, 2), dtype=np.float64)))
        rng = np.random.default_rng(args.seed)
        images = (images + rng.normal(scale=np.sqrt(signal_var / args.snr),
                                      size=images.shape)).astype(np.float32)

    # The STAR file lists the stack as RELION does: its path from the working folder.
    rows = rows.copy()
    name = output_stack_name(out)
    rows["rlnImageName"] = [f"{i + 1:06d}@{name}" for i in range(len(rows))]
    if optics is None:
        optics, rows = _to_relion31(rows, pix, box, ang_path)
    else:
        optics = optics.copy()
        optics["rlnImagePixelSize"] = pix
        optics["rlnImageSize"] = box
        if "rlnImageDimensionality" not in optics.columns:
            optics["rlnImageDimensionality"] = 2
    for path in (out, star_out):
        remove_stale_temps(path.parent, path.name)
    write_stack(out, images, pix)
    write_particles(star_out, optics, rows)
    noise = f", noise snr {args.snr:g}" if args.add_noise else ""
    print(f"wrote {out} ({len(images)} images, {box} px, {pix:g} A/px, ctf "
          f"{'on' if args.ctf else 'off'}{noise})")
    print(f"wrote {star_out}")
    return 0
