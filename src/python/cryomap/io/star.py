"""RELION STAR files (docs/conventions.md, "STAR files"), read and written with `starfile`.

A STAR file is a dict of blocks, in file order: block name (the text after `data_`) -> a
pandas DataFrame (a `loop_` table) or a dict (a list block, `_rlnLabel value` lines). Labels
are stored without the leading underscore (`rlnImageName`). Unknown labels are kept.

What `starfile` (0.5.x) does for us, and what is added here:
- reading: loops, list blocks, quoted strings with spaces, `""` (empty string), comment lines
  and the column types (numeric columns become int64/float64, the rest strings). Added: the
  RELION labels that are strings by definition are never numericised (`rlnMicrographName
  0001` must stay "0001"), and a missing or unparsable file becomes an InputError.
- writing: `_rlnX #i` labels, one row per line, strings with spaces (and empty strings)
  double-quoted. Added: the `# version 30001` line RELION writes before each `data_` block
  (RELION uses it to recognise 3.1+ files), floats written with 12 significant digits
  (starfile's default '%.6f' would turn 1e-8 into 0.000000; 12 digits reproduce every value
  RELION writes, '%12.6f' or '%12.6e', exactly) and always with a '.' or exponent, so that
  they read back as floats; NaN written as `nan` (which RELION parses) instead of `<NA>`;
  and an atomic write.
Known starfile limitations (not worked around, as RELION never writes such files): a single
quote inside a value is read as a double quote, a `#` inside an unquoted loop value starts a
comment, and comment lines between the labels of a loop header end the header.
"""

from __future__ import annotations

import linecache
import os
from pathlib import Path

import numpy as np
import pandas as pd
import starfile

from ..errors import InputError
from .atomic import atomic_path

__all__ = ["read_star", "write_star", "STAR_VERSION", "STRING_LABELS", "as_table",
           "numeric_column"]

PathLike = str | os.PathLike

#: Version written in the `# version` comment before each block (RELION 3.1 / 4.0 format).
STAR_VERSION = 30001

#: RELION labels whose values are strings even when they look like numbers
#: (metadata_label.h: EMDL_STRING labels that appear in particle/micrograph/model files).
STRING_LABELS = [
    "rlnImageName", "rlnMicrographName", "rlnMicrographMovieName", "rlnOpticsGroupName",
    "rlnGroupName", "rlnCtfImage", "rlnReferenceImage", "rlnImageOriginalName",
    "rlnMicrographMetadata", "rlnMicrographGainName", "rlnMicrographDefectFile",
    "rlnMaskName", "rlnSolventMaskName", "rlnTomoName", "rlnTomoParticleName",
    "rlnCtfPowerSpectrum", "rlnMicrographNameNoDW", "rlnMtfFileName",
    # vectors, written by RELION as "[a,b,c]"
    "rlnOddZernike", "rlnEvenZernike",
]


def read_star(path: PathLike) -> dict[str, pd.DataFrame | dict]:
    """Read every block of a STAR file: {block name: DataFrame (loop) or dict (list block)}.

    Raises InputError if the file is missing, is not a STAR file (no `data_` block) or a
    block cannot be parsed.
    """
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: file not found")
    if not path.is_file():
        raise InputError(f"{path}: not a regular file")
    # starfile reads through linecache and clears it only after a successful parse: after a
    # failed read, a corrected file at the same path would be parsed from the stale lines.
    linecache.clearcache()
    try:
        blocks = starfile.read(path, always_dict=True, parse_as_string=STRING_LABELS)
    except Exception as e:
        # starfile / pandas raise many types (e.g. TypeError for a data_ block with neither
        # loop_ nor labels); all mean "unparsable".
        detail = " ".join(str(e).split())  # pandas' messages span lines; ours are one line
        raise InputError(f"{path}: cannot parse as a STAR file ({type(e).__name__}: {detail})"
                         ) from None
    if not blocks:
        raise InputError(f"{path}: not a STAR file (no data_ block found)")
    return {str(name): block for name, block in blocks.items()}


def as_table(block: pd.DataFrame | dict) -> pd.DataFrame:
    """A block as a table: a list block (`_rlnX value` lines) is a table of one row, as in
    RELION, where both spellings describe the same MetaDataTable."""
    if isinstance(block, pd.DataFrame):
        return block
    return pd.DataFrame({k: [v] for k, v in block.items()})


def numeric_column(df: pd.DataFrame, label: str, where: str, finite: bool = True,
                   rows: np.ndarray | None = None) -> np.ndarray:
    """Values of column `label` (only `rows`, 0-based positions, when given) as float64,
    parsed strictly.

    `where` names the file and block for messages (e.g. "run_data.star: data_particles").
    Raises InputError naming the first bad row (1-based) for text that is not a number and,
    with `finite`, for NaN/inf. Only the requested rows are parsed and checked, so that
    per-batch reads of a large table cost time in proportion to the batch.
    """
    col = df[label]
    if isinstance(col, pd.DataFrame):  # duplicated label
        raise InputError(f"{where}: label {label} appears {col.shape[1]} times; expected once")
    pos = np.arange(len(col)) if rows is None else np.asarray(rows, dtype=np.int64)
    if col.dtype.kind in "iuf":
        vals = col.to_numpy(dtype=np.float64)[pos]
        not_number = np.zeros(vals.shape, bool)
    else:
        text = (col if rows is None else col.iloc[pos]).astype(str).str.strip()
        vals = pd.to_numeric(text, errors="coerce").to_numpy(dtype=np.float64)
        # pd.to_numeric reads "nan"/"inf" as numbers; anything else that fails is text.
        not_number = np.isnan(vals) & ~text.str.lower().isin(["nan", "+nan", "-nan"]
                                                             ).to_numpy()
    if np.any(not_number):
        i = int(np.argmax(not_number))
        raise InputError(f"{where}, row {pos[i] + 1}: {label} = {col.iloc[pos[i]]!r} is not a "
                         f"number; expected a number")
    if finite and not np.all(np.isfinite(vals)):
        i = int(np.argmax(~np.isfinite(vals)))
        raise InputError(f"{where}, row {pos[i] + 1}: {label} = {vals[i]:g}; expected a finite "
                         f"number")
    return vals


def _format_float(x: float) -> str:
    """12 significant digits, always recognisable as a float ('300.0', not '300')."""
    text = f"{x:.12g}"
    return text if ("." in text or "e" in text or "n" in text) else text + ".0"


def _float32_to_float64(df: pd.DataFrame) -> pd.DataFrame:
    """float32 columns -> float64 holding the float32's shortest decimal (0.1f -> 0.1, not
    0.10000000149011612), so that they are written as short as they print."""
    cols = [c for c in df.columns if df[c].dtype == np.float32]
    if not cols:
        return df
    df = df.copy()
    for c in cols:
        df[c] = df[c].astype(str).astype(np.float64)
    return df


def _block_text(name: str, block: pd.DataFrame | dict) -> str:
    """One block in RELION's layout: blank, `# version`, blank, then starfile's text."""
    if isinstance(block, pd.DataFrame):
        block = _float32_to_float64(block)
        text = starfile.to_string({name: block}, float_format=_format_float, na_rep="nan")
    elif isinstance(block, dict):
        values = {k: (v.item() if isinstance(v, np.generic) else v) for k, v in block.items()}
        if any(isinstance(v, (list, tuple, np.ndarray, dict)) for v in values.values()):
            raise ValueError(f"list block data_{name}: values must be scalars")
        # starfile writes list values with str(); format floats as in loops.
        values = {k: (_format_float(v) if isinstance(v, float) else v)
                  for k, v in values.items()}
        text = starfile.to_string({name: values})
    else:
        raise ValueError(f"block data_{name}: expected a DataFrame or a dict, got "
                         f"{type(block).__name__}")
    # Drop starfile's "# Created by ..." banner and its leading blank lines.
    lines = text.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("data_"))
    body = "\n".join(lines[start:]).rstrip("\n")
    return f"\n# version {STAR_VERSION}\n\n{body}\n\n"


def write_star(path: PathLike, blocks: dict[str, pd.DataFrame | dict]) -> None:
    """Write blocks (name -> DataFrame for a loop, dict for a list block) atomically.

    Layout as RELION writes it: each block preceded by `# version 30001`, loop labels as
    `_rlnX #i`, strings with spaces double-quoted. Columns are written in DataFrame order.
    """
    path = Path(path)
    if not isinstance(blocks, dict) or not blocks:
        raise ValueError(f"{path}: write_star expects a non-empty dict of blocks")
    text = "".join(_block_text(str(name), block) for name, block in blocks.items())
    with atomic_path(path) as tmp:
        tmp.write_text(text)
