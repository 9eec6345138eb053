"""RELION particle STAR files: reading (3.1+, and 3.0 converted as RELION does on reading),
the defaults RELION applies where a field is missing, and the checks of the tables
(docs/conventions.md, "Particle files", "RELION defaults applied"). `particles.load_particles`
is the entry point; the particle-set model is `particles.ParticleSet`."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import InputError
from ..particles import (
    _LEGACY_OPTICS,
    _PIX_TOL,
    AMPLITUDE_CONTRAST_DEFAULT,
    CTF_OPTICS,
    Log,
    ParticleSet,
    _check_loaded,
    _parse_image_names,
    _resolve_stack,
    _show,
    stack_search_dirs,
)
from .mrc import PIXEL_SIZE_RANGE, check_pixel_size, read_header
from .star import as_table, numeric_column, read_star


def _require(df: pd.DataFrame, labels: Sequence[str], star_path: Path, block: str,
             why: str) -> None:
    for label in labels:
        if label not in df.columns:
            raise InputError(f"{star_path}: {block} has no {label} column; expected it "
                             f"({why})")


def _check_duplicates(df: pd.DataFrame, star_path: Path, block: str) -> None:
    dup = df.columns[df.columns.duplicated()]
    if len(dup):
        raise InputError(f"{star_path}: {block} has the label {dup[0]} more than once; "
                         f"expected each label once")


def _detector_pixel_size(df: pd.DataFrame, where: str) -> np.ndarray | None:
    """rlnDetectorPixelSize (um) * 10000 / rlnMagnification, or None when either is absent
    (star_converter.cpp: unifyPixelSize)."""
    if not ("rlnDetectorPixelSize" in df.columns and "rlnMagnification" in df.columns):
        return None
    det = numeric_column(df, "rlnDetectorPixelSize", where)
    mag = numeric_column(df, "rlnMagnification", where)
    for label, v in (("rlnDetectorPixelSize", det), ("rlnMagnification", mag)):
        if np.any(v <= 0):
            r = int(np.argmax(v <= 0))
            raise InputError(f"{where}, row {r + 1}: {label} = {v[r]:g}; expected > 0")
    return det * 1e4 / mag


def stack_box(star_path: Path, names: pd.Series, row: int, search_dirs: Sequence[Path],
               why: str) -> int:
    """Box of the stack of particle `row` (header only)."""
    _, codes, files = _parse_image_names(names, str(star_path))
    name = files[codes[row]]
    path = _resolve_stack(name, search_dirs, str(star_path))
    if path is None:
        raise InputError(f"{star_path}: {why}, and stack {name} of particle {row + 1} was not "
                         f"found (looked for "
                         f"{' and '.join(str(d / name) for d in search_dirs)})")
    h = read_header(path)
    if h.nx != h.ny:
        raise InputError(f"{path}: images are {h.nx} x {h.ny} px; expected square images")
    return h.nx


def _convert_30(particles: pd.DataFrame, star_path: Path, block: str,
                angpix: float | None, search_dirs: Sequence[Path], notes: list[str]
                ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """RELION 3.0 particle table -> (optics, particles) in the 3.1 layout
    (star_converter.cpp: convert_3p0_particlesTo_3p1)."""
    p = particles.copy()
    cols = p.columns
    where = f"{star_path}: {block}"
    pix_det = _detector_pixel_size(p, where)
    if angpix is not None:
        pix = np.full(len(p), float(angpix))
    elif "rlnPixelSize" in cols:
        pix = numeric_column(p, "rlnPixelSize", where)
        if pix_det is not None:
            bad = np.abs(pix - pix_det) > _PIX_TOL
            if np.any(bad):
                row = int(np.argmax(bad))
                raise InputError(f"{star_path}: inconsistent pixel size in row {row + 1}: "
                                 f"rlnPixelSize = {pix[row]:g} but rlnDetectorPixelSize * "
                                 f"10000 / rlnMagnification = {pix_det[row]:g}")
    elif pix_det is not None:
        pix = pix_det
    else:
        raise InputError(f"{star_path}: {block} (RELION 3.0 file, no data_optics) has no "
                         f"pixel size; expected rlnPixelSize or rlnDetectorPixelSize and "
                         f"rlnMagnification, or give --angpix")
    bad = ~((pix >= PIXEL_SIZE_RANGE[0]) & (pix <= PIXEL_SIZE_RANGE[1]))
    if np.any(bad):
        r = int(np.argmax(bad))
        check_pixel_size(pix[r], f"{where}, row {r + 1}: pixel size")
    pix = np.round(pix, 6)

    if "rlnDefocusU" in cols:
        _require(p, CTF_OPTICS[:2], star_path, block, "CTF parameters of a RELION 3.0 file")
        if "rlnAmplitudeContrast" not in cols:
            p["rlnAmplitudeContrast"] = AMPLITUDE_CONTRAST_DEFAULT
            notes.append(f"{star_path}: no rlnAmplitudeContrast; using "
                         f"{AMPLITUDE_CONTRAST_DEFAULT:g} (relion_import's default)")
    group_cols = [c for c in CTF_OPTICS + ("rlnBeamTiltX", "rlnBeamTiltY")
                  if c in p.columns]
    # One optics group per distinct (voltage, Cs, Q0, beam tilt, pixel size), numbered in
    # order of first appearance.
    keys = pd.DataFrame({c: numeric_column(p, c, where) for c in group_cols})
    keys["pix"] = pix
    group = keys.groupby(list(keys.columns), sort=False).ngroup().to_numpy() + 1
    n_groups = int(group.max())
    first = [int(np.argmax(group == g)) for g in range(1, n_groups + 1)]

    optics = pd.DataFrame({
        "rlnOpticsGroupName": [f"opticsGroup{g}" for g in range(1, n_groups + 1)],
        "rlnOpticsGroup": np.arange(1, n_groups + 1),
    })
    for c in group_cols:
        optics[c] = keys[c].to_numpy()[first]
    optics["rlnImagePixelSize"] = pix[first]
    # The box size of each group comes from the header of its first particle's stack.
    optics["rlnImageSize"] = np.asarray(
        [stack_box(star_path, p["rlnImageName"], row, search_dirs,
                    "no data_optics (RELION 3.0 file) to give the box size") for row in first],
        dtype=np.int64)
    optics["rlnImageDimensionality"] = 2

    # Origins were in pixels in 3.0; 3.1 stores Angstrom.
    for old, new in (("rlnOriginX", "rlnOriginXAngst"), ("rlnOriginY", "rlnOriginYAngst"),
                     ("rlnOriginXPrior", "rlnOriginXPriorAngst"),
                     ("rlnOriginYPrior", "rlnOriginYPriorAngst")):
        if old in p.columns and new not in p.columns:
            pos = p.columns.get_loc(old)
            vals = numeric_column(p, old, where) * pix
            p = p.drop(columns=[old])
            p.insert(pos, new, vals)
    p = p.drop(columns=[c for c in _LEGACY_OPTICS if c in p.columns])
    p["rlnOpticsGroup"] = group.astype(np.int64)
    return optics, p


def _complete_optics(optics: pd.DataFrame, particles: pd.DataFrame, star_path: Path,
                     angpix: float | None, search_dirs: Sequence[Path], notes: list[str]
                     ) -> pd.DataFrame:
    """Fill in what a 3.1 optics table may lack where RELION has a default (docs/
    conventions.md, "RELION defaults applied")."""
    optics = optics.copy()
    where = f"{star_path}: data_optics"
    if angpix is not None:
        if "rlnImagePixelSize" in optics.columns:
            old = numeric_column(optics, "rlnImagePixelSize", where, finite=False)
            if np.any(np.abs(old - angpix) > _PIX_TOL):
                notes.append(f"{star_path}: rlnImagePixelSize "
                             f"({', '.join(f'{v:g}' for v in old)}) replaced by --angpix "
                             f"{angpix:g}")
        optics["rlnImagePixelSize"] = float(angpix)
    elif "rlnImagePixelSize" not in optics.columns:
        det = _detector_pixel_size(optics, where)
        if det is None:
            raise InputError(f"{star_path}: data_optics has no rlnImagePixelSize column; "
                             f"expected the pixel size of each optics group (or "
                             f"rlnDetectorPixelSize and rlnMagnification), or give --angpix")
        optics["rlnImagePixelSize"] = np.round(det, 6)
        notes.append(f"{star_path}: rlnImagePixelSize = rlnDetectorPixelSize * 10000 / "
                     f"rlnMagnification ({', '.join(f'{v:g}' for v in det)} A)")

    if "rlnImageSize" not in optics.columns:
        groups = _group_numbers(particles, len(optics), star_path)
        boxes = []
        for g in range(len(optics)):
            members = np.flatnonzero(groups == g)
            if members.size == 0:
                boxes.append(0)
                continue
            boxes.append(stack_box(star_path, particles["rlnImageName"], int(members[0]),
                                    search_dirs, "data_optics has no rlnImageSize column"))
        if 0 in boxes:  # groups without particles: any box of the others
            known = [b for b in boxes if b]
            boxes = [b or known[0] for b in boxes]
        optics["rlnImageSize"] = np.asarray(boxes, dtype=np.int64)
        notes.append(f"{star_path}: no rlnImageSize; box size "
                     f"{', '.join(map(str, boxes))} px from the image stacks")
    if "rlnDefocusU" in particles.columns and "rlnAmplitudeContrast" not in optics.columns:
        optics["rlnAmplitudeContrast"] = AMPLITUDE_CONTRAST_DEFAULT
        notes.append(f"{star_path}: no rlnAmplitudeContrast; using "
                     f"{AMPLITUDE_CONTRAST_DEFAULT:g} (relion_import's default)")
    return optics


def _group_numbers(particles: pd.DataFrame, n_opt: int, star_path: Path) -> np.ndarray:
    """0-based optics group of every particle (validated as in ParticleSet)."""
    if "rlnOpticsGroup" not in particles.columns:
        return np.zeros(len(particles), np.int64)
    g = pd.to_numeric(particles["rlnOpticsGroup"], errors="coerce").to_numpy(np.float64)
    bad = ~np.isfinite(g) | (g < 1) | (g > n_opt) | (g != np.round(g))
    if np.any(bad):
        row = int(np.argmax(bad))
        raise InputError(f"{star_path}: rlnOpticsGroup "
                         f"{_show(particles['rlnOpticsGroup'].iloc[row])} of particle "
                         f"{row + 1} is not valid; expected 1..{n_opt} (a row of data_optics)")
    return g.astype(np.int64) - 1


def load_star(path: Path, angpix: float | None, log: Log) -> ParticleSet:
    """A RELION particle STAR file (3.1+, or 3.0 converted) as a checked ParticleSet; the
    defaults applied are reported through `log` and kept in `ParticleSet.notes`."""
    blocks = read_star(path)
    loops = {k: as_table(v) for k, v in blocks.items()
             if isinstance(v, pd.DataFrame) or (k in ("optics", "particles") and v)}
    search_dirs = stack_search_dirs(path)
    notes: list[str] = []
    for name, table in loops.items():
        _check_duplicates(table, path, f"data_{name}")
    if "optics" in loops:
        if "particles" not in loops:
            raise InputError(f"{path}: no data_particles block (blocks: "
                             f"{', '.join('data_' + k for k in blocks)}); expected a particle "
                             f"table after data_optics")
        optics, particles = loops["optics"], loops["particles"]
        if len(particles) == 0:
            raise InputError(f"{path}: no particles in {path} (data_particles is empty)")
        _require(particles, ["rlnImageName"], path, "data_particles",
                 "n@stack.mrcs image references")
        if len(optics) == 0:
            raise InputError(f"{path}: data_optics has no rows; expected at least one optics "
                             f"group")
        optics = _complete_optics(optics, particles, path, angpix, search_dirs, notes)
    else:
        # RELION 3.0: the first loop with image names (usually data_ or data_images).
        cands = [k for k, v in loops.items() if "rlnImageName" in v.columns] or list(loops)
        if not cands:
            raise InputError(f"{path}: no particles block; expected data_optics + "
                             f"data_particles (RELION 3.1+) or a particle loop (RELION 3.0)")
        name = cands[0]
        block = f"data_{name}"
        particles = loops[name]
        if len(particles) == 0:
            raise InputError(f"{path}: no particles in {path} ({block} is empty)")
        _require(particles, ["rlnImageName"], path, block, "n@stack.mrcs image references")
        optics, particles = _convert_30(particles, path, block, angpix, search_dirs, notes)
    ps = ParticleSet(optics=optics, particles=particles, star_path=path,
                     search_dirs=search_dirs, notes=notes)
    if "rlnDefocusU" in ps.particles.columns:
        for label in CTF_OPTICS[:2]:
            if label not in ps.optics.columns:
                raise InputError(f"{path}: data_optics has no {label} column; expected it "
                                 f"(CTF parameters)")
    _check_loaded(ps)
    if log is not None:
        for note in notes:
            log(note)
    return ps
