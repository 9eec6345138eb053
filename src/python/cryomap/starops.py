"""Particle-file operations on metadata only (docs/particles.md): subsets, merging and
splitting as RELION's relion_star_handler (`cryomap star`), and symmetry expansion as
relion_particle_symmetry_expand (`cryomap symmetry_expand`).

Everything here works on the STAR tables alone (cryomap.io.star.read_star), so files whose
images are elsewhere work too. Only RELION 3.1+ particle files (data_optics + data_particles)
are accepted; every column is kept, known or not, and so is every other block of the file
(except by a merge, which writes data_optics and data_particles only).
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import InputError
from .io.atomic import atomic_path, check_output_dir
from .io.star import as_table, numeric_column, read_star, write_star

__all__ = ["ParticleTables", "read_tables", "split_indices", "split_names", "combine",
           "duplicate_count", "expand_symmetry", "check_output", "write_all", "OPTICS_DEFAULTS"]

#: Values RELION gives an optics group that lacks these columns when files are combined
#: (star_handler.cpp: combine): no beam tilt, no anisotropic magnification, no Zernike
#: terms (6 odd, 9 even), CTF not premultiplied.
OPTICS_DEFAULTS = {
    "rlnBeamTiltX": 0.0, "rlnBeamTiltY": 0.0,
    "rlnMagMat00": 1.0, "rlnMagMat01": 0.0, "rlnMagMat10": 0.0, "rlnMagMat11": 1.0,
    "rlnOddZernike": "[" + ",".join(["0"] * 6) + "]",
    "rlnEvenZernike": "[" + ",".join(["0"] * 9) + "]",
    "rlnCtfDataAreCtfPremultiplied": 0,
}
#: RELION's pose labels, which symmetry expansion changes.
ANGLES = ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")
#: Copies whose pose matrices are computed at a time (about 70 MB of float64 3x3 matrices).
_EXPAND_BATCH = 1 << 20


@dataclass
class ParticleTables:
    """The blocks of a RELION 3.1+ particle file, in file order (block name -> table or
    list block); `optics` and `particles` are its two tables."""

    path: Path
    blocks: dict

    @property
    def optics(self) -> pd.DataFrame:
        return self.blocks["optics"]

    @property
    def particles(self) -> pd.DataFrame:
        return self.blocks["particles"]

    def with_particles(self, particles: pd.DataFrame) -> dict:
        """The file's blocks with data_particles replaced (the others as read)."""
        blocks = dict(self.blocks)
        blocks["particles"] = particles.reset_index(drop=True)
        return blocks


def read_tables(path: str | Path, option: str = "--i") -> ParticleTables:
    """Read a RELION 3.1+ particle file without its images; InputError (one line naming the
    file) for a RELION 3.0 file (no data_optics), an empty data_particles, a label given
    twice, or an rlnOpticsGroup that names no row of data_optics."""
    from .io.relion import _group_numbers

    path = Path(path)
    if not path.exists():
        raise InputError(f"{option} {path}: file not found")
    blocks = read_star(path)
    for name in ("optics", "particles"):
        if name not in blocks:
            hint = (" (a RELION 3.0 file? convert it first, e.g. with relion_convert_star)"
                    if name == "optics" else "")
            raise InputError(f"{path}: no data_{name} block{hint}; expected a RELION 3.1+ "
                             f"particle file (data_optics + data_particles)")
        blocks[name] = as_table(blocks[name])
        table = blocks[name]
        dup = table.columns[table.columns.duplicated()]
        if len(dup):
            raise InputError(f"{path}: data_{name} has the label {dup[0]} more than once; "
                             f"expected each label once")
    if len(blocks["optics"]) == 0:
        raise InputError(f"{path}: data_optics has no rows; expected at least one optics group")
    if len(blocks["particles"]) == 0:
        raise InputError(f"{path}: data_particles has no rows; expected particles")
    _group_numbers(blocks["particles"], len(blocks["optics"]), path)
    return ParticleTables(path, blocks)


# -- split --------------------------------------------------------------------------------------


def split_indices(n: int, nr_split: int | None, size_split: int | None,
                  seed: int | None) -> list[np.ndarray]:
    """Row positions of each part of a split of n rows (in the random order of `seed` when
    given, else in file order).

    nr_split alone: nr_split parts whose sizes differ by at most one (RELION cuts parts of
    ceil(n / nr_split) rows, which can leave the last short or empty). size_split alone:
    parts of size_split rows, the last holding the rest (as RELION). Both: nr_split parts of
    size_split rows, the rows after them not used (as RELION). The caller checks the ranges.
    """
    order = np.arange(n) if seed is None else np.random.default_rng(seed).permutation(n)
    if size_split is None:
        return [part for part in np.array_split(order, nr_split)]
    count = -(-n // size_split) if nr_split is None else nr_split
    return [order[i * size_split:(i + 1) * size_split] for i in range(count)]


def split_names(out: Path, count: int) -> list[Path]:
    """RELION's names of the parts (FileName::insertBeforeExtension("_split<k>")):
    out.star -> out_split1.star, ...; an --o without .star is a prefix: out -> out_split1.star."""
    stem = out.name[: -len(".star")] if out.name.endswith(".star") else out.name
    return [out.with_name(f"{stem}_split{k}.star") for k in range(1, count + 1)]


# -- merge --------------------------------------------------------------------------------------


def _same(a: object, b: object) -> bool:
    """Two table values equal: as numbers when both are numbers, else as text."""
    if isinstance(a, numbers.Number) and isinstance(b, numbers.Number):
        return float(a) == float(b)
    return str(a).strip() == str(b).strip()


def _complete_optics(files: Sequence[ParticleTables]) -> list[pd.DataFrame]:
    """Every file's optics table with the union of the optics columns: a column a file lacks
    is filled with RELION's default (OPTICS_DEFAULTS; rlnOpticsGroupName opticsGroup<row>,
    rlnOpticsGroup the row number), else InputError naming the file and the column."""
    union: list[str] = []
    owner: dict[str, Path] = {}
    for f in files:
        for c in f.optics.columns:
            if c not in owner:
                union.append(c)
                owner[c] = f.path
    tables = []
    for f in files:
        t = f.optics.copy()
        rows = np.arange(1, len(t) + 1)
        for c in union:
            if c in t.columns:
                continue
            if c in OPTICS_DEFAULTS:
                t[c] = OPTICS_DEFAULTS[c]
            elif c == "rlnOpticsGroupName":
                t[c] = [f"opticsGroup{g}" for g in rows]
            elif c == "rlnOpticsGroup":
                t[c] = rows
            else:
                raise InputError(f"--combine {f.path}: data_optics has no {c} column, which "
                                 f"{owner[c]} has, and RELION has no default for it; expected "
                                 f"{c} in every file's data_optics")
        if "rlnOpticsGroupName" not in t.columns:
            t["rlnOpticsGroupName"] = [f"opticsGroup{g}" for g in rows]
        tables.append(t[union])
    return tables


def _check_particle_columns(files: Sequence[ParticleTables]) -> list[str]:
    """The particle columns of the merge (the first file's order): every file must have the
    same ones (rlnOpticsGroup, which defaults to group 1, and rlnGroupNumber, dropped as
    RELION drops it, aside); else InputError naming the file and the column."""
    aside = {"rlnOpticsGroup", "rlnGroupNumber"}
    first = files[0]
    columns = [c for c in first.particles.columns if c not in aside]
    for f in files[1:]:
        have = [c for c in f.particles.columns if c not in aside]
        missing = [c for c in columns if c not in have]
        extra = [c for c in have if c not in columns]
        if missing:
            raise InputError(f"--combine {f.path}: data_particles has no {missing[0]} column, "
                             f"which {first.path} has; expected the same particle columns in "
                             f"every file")
        if extra:
            raise InputError(f"--combine {f.path}: data_particles has a {extra[0]} column, "
                             f"which {first.path} lacks; expected the same particle columns "
                             f"in every file")
    return columns


def combine(files: Sequence[ParticleTables]) -> tuple[pd.DataFrame, pd.DataFrame, list[str]]:
    """Merge particle files: (optics, particles, notes on what was done to the groups).

    Optics groups are the rows of the files' optics tables, numbered 1..N in the merged table
    in file order. A group with the same rlnOpticsGroupName and the same values in every
    column as one already merged is joined to it (RELION joins by name alone); a name already
    taken by different optics is made unique as <name>_<file number>. Each particle's
    rlnOpticsGroup points to its group's new row; rlnGroupNumber is dropped (RELION: the
    numbers of different files collide).
    """
    from .io.relion import _group_numbers

    columns = _check_particle_columns(files)
    optics_tables = _complete_optics(files)
    merged: list[pd.Series] = []
    notes: list[str] = []
    parts = []
    for k, (f, optics) in enumerate(zip(files, optics_tables, strict=True), start=1):
        new_row = np.empty(len(optics), np.int64)
        for g in range(len(optics)):
            row = optics.iloc[g].copy()
            name = str(row["rlnOpticsGroupName"])
            same = [j for j, m in enumerate(merged) if str(m["rlnOpticsGroupName"]) == name
                    and all(_same(row[c], m[c]) for c in optics.columns
                            if c not in ("rlnOpticsGroup", "rlnOpticsGroupName"))]
            if same:
                new_row[g] = same[0]
                if k > 1:
                    notes.append(f"{f.path}: optics group {g + 1} ({name}) joined to group "
                                 f"{same[0] + 1}: the same name and optics")
                continue
            taken = {str(m["rlnOpticsGroupName"]) for m in merged}
            unique, extra = name, 1
            while unique in taken:
                unique = f"{name}_{k}" if extra == 1 else f"{name}_{k}_{extra}"
                extra += 1
            if unique != name:
                notes.append(f"{f.path}: optics group {g + 1} named {name}, as a group with "
                             f"other optics; renamed {unique}")
            row["rlnOpticsGroupName"] = unique
            new_row[g] = len(merged)
            if new_row[g] != g:
                notes.append(f"{f.path}: optics group {g + 1} ({unique}) is group "
                             f"{new_row[g] + 1} of the merged file")
            merged.append(row)
        p = f.particles.copy()
        p["rlnOpticsGroup"] = new_row[_group_numbers(p, len(optics), f.path)] + 1
        parts.append(p[columns + ["rlnOpticsGroup"]])
    optics = pd.DataFrame(merged).reset_index(drop=True)
    optics["rlnOpticsGroup"] = np.arange(1, len(optics) + 1)
    order = list(files[0].particles.columns)
    order = [c for c in order if c != "rlnGroupNumber"]
    if "rlnOpticsGroup" not in order:
        order.append("rlnOpticsGroup")
    particles = pd.concat(parts, ignore_index=True)[order]
    if any("rlnGroupNumber" in f.particles.columns for f in files):
        notes.append("rlnGroupNumber dropped (the files' group numbers collide), as RELION does")
    return optics.infer_objects(), particles, notes


def duplicate_count(particles: pd.DataFrame, label: str) -> int:
    """How many rows repeat an earlier row's value of `label` (RELION's --check_duplicates)."""
    return int(particles[label].astype(str).duplicated().sum())


# -- symmetry expansion -------------------------------------------------------------------------


def expand_symmetry(particles: pd.DataFrame, sym: str, where: str) -> pd.DataFrame:
    """One copy of each particle per operator R_k of the point group `sym`
    (cryomap.symmetry.operators: identity first), with the pose A·R_k
    (symmetry.equivalent_rotations; RELION's relion_particle_symmetry_expand composes
    A' = A·R with A its Euler matrix), in RELION's order: the copies of particle 1, then of
    particle 2, ... The first copy is the row as it was; the others differ only in
    rlnAngleRot/Tilt/Psi. `where` names the file in messages."""
    from .euler import euler_to_matrix, matrix_to_euler
    from .symmetry import equivalent_rotations, operators

    order = len(operators(sym))
    if order == 1:
        raise InputError(f"--sym {sym}: a group of one operator; nothing to expand (expected a "
                         f"point group with symmetry, e.g. C2, D2, O)")
    for label in ANGLES:
        if label not in particles.columns:
            raise InputError(f"{where}: data_particles has no {label} column; expected the "
                             f"poses of a refinement (rlnAngleRot, rlnAngleTilt, rlnAnglePsi)")
    rot, tilt, psi = (numeric_column(particles, label, f"{where}: data_particles")
                      for label in ANGLES)
    n = len(particles)
    angles = np.empty((n, order, 3))
    step = max(1, _EXPAND_BATCH // order)  # bounds the (batch, order, 3, 3) matrices' memory
    for start in range(0, n, step):
        part = slice(start, start + step)
        poses = equivalent_rotations(euler_to_matrix(rot[part], tilt[part], psi[part]), sym)
        angles[part] = np.stack(matrix_to_euler(poses), axis=-1)
    angles[:, 0] = np.stack([rot, tilt, psi], axis=-1)  # the original row, not re-derived
    out = particles.iloc[np.repeat(np.arange(n), order)].reset_index(drop=True)
    for j, label in enumerate(ANGLES):
        out[label] = angles[..., j].reshape(-1)
    return out


# -- writing ------------------------------------------------------------------------------------


def check_output(out: Path, inputs: Sequence[Path], option: str = "--o") -> None:
    """Check, creating nothing, that `out` can be written: not a folder, none of `inputs`,
    and its folder exists or can be made (InputError, one line naming `option`)."""
    if out.is_dir():
        raise InputError(f"{option} {out}: is a folder; expected a file name")
    for src in inputs:
        if src.exists() and out.resolve() == src.resolve():
            raise InputError(f"{option} {out}: the same file as the input {src}; expected a "
                             f"new file")
    check_output_dir(out.parent, option)  # the caller creates it once every check has passed


def write_all(outputs: Sequence[tuple[Path, dict]]) -> None:
    """Write several STAR files together: each to a temporary file first, and only when all
    are written are they renamed onto their names (a failure leaves none of them)."""
    with ExitStack() as stack:
        temps = [stack.enter_context(atomic_path(path)) for path, _ in outputs]
        for tmp, (_, blocks) in zip(temps, outputs, strict=True):
            write_star(tmp, blocks)
