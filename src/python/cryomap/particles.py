"""Particle sets: RELION particle STAR files and their image stacks (CONVENTIONS.md 3, 4, 8, 9).

A `ParticleSet` holds the optics table and the particle table of a RELION 3.1+ file, both as
pandas DataFrames with RELION's labels as column names (no leading underscore), and reads
particle images lazily from memory-mapped stacks.

- rlnImageName is `n@stack.mrcs` with n 1-based (no `@`: a single-image file). A relative
  stack path is looked up relative to the STAR file's folder first; if it is not there, relative
  to the current directory and then to each parent folder of the STAR file (RELION writes paths
  relative to its project folder, which is usually two levels above `Refine3D/job012/*.star`).
- rlnOpticsGroup (1-based) is a row number in the optics table: groups are numbered 1..N in
  row order, as RELION does (obs_model.cpp: getOpticsGroup).
- Origins are rlnOriginX/YAngst in Angstrom; `origins_px` divides by the particle's optics
  group pixel size.
- RELION 3.0 files (no data_optics) are converted as RELION does on reading: one optics group
  per distinct (voltage, Cs, Q0, pixel size), rlnOriginX/Y (px) -> rlnOriginX/YAngst.
"""

from __future__ import annotations

import os
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .ctf import CtfParams
from .errors import InputError
from .io.mrc import Stack, open_stack
from .io.star import read_star, write_star

__all__ = ["ParticleSet", "load_particles", "write_particles", "make_optics_table"]

PathLike = str | os.PathLike
Indices = Sequence[int] | np.ndarray | None

#: Optics-table labels every particle file needs (obs_model.cpp: getBoxSize, getPixelSize).
REQUIRED_OPTICS = ("rlnImagePixelSize", "rlnImageSize")
#: Optics-table labels needed when the particles carry CTF parameters (ctf.cpp).
CTF_OPTICS = ("rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast")
#: Particle labels that RELION 3.0 stored per particle and 3.1 moved to the optics table.
_LEGACY_OPTICS = ("rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast",
                  "rlnPixelSize", "rlnDetectorPixelSize", "rlnMagnification")
# Relative tolerance for "same pixel size" (RELION compares pixel sizes to 0.001 A).
_PIX_TOL = 1e-3


def make_optics_table(pixel_size: float, box: int, voltage: float = 300.0, cs: float = 2.7,
                      amplitude_contrast: float = 0.1,
                      name: str = "opticsGroup1") -> pd.DataFrame:
    """A one-row RELION optics table (optics group 1) for 2D particle images."""
    return pd.DataFrame({
        "rlnOpticsGroupName": [str(name)],
        "rlnOpticsGroup": [1],
        "rlnVoltage": [float(voltage)],
        "rlnSphericalAberration": [float(cs)],
        "rlnAmplitudeContrast": [float(amplitude_contrast)],
        "rlnImagePixelSize": [float(pixel_size)],
        "rlnImageSize": [int(box)],
        "rlnImageDimensionality": [2],
    })


def _show(value: object) -> str:
    """A STAR value for an error message: strings quoted, numbers plain (not np.int64(3))."""
    return repr(value) if isinstance(value, str) else str(value)


def _parse_image_names(names: pd.Series, star_path: Path) -> tuple[np.ndarray, np.ndarray,
                                                                   list[str]]:
    """rlnImageName values -> (0-based image index, code into file list, file list)."""
    s = names.astype(str).str.strip()
    parts = s.str.partition("@")
    has_at = parts[1] == "@"
    num_txt = parts[0].where(has_at, "1")
    files = parts[2].where(has_at, parts[0])
    nums = pd.to_numeric(num_txt, errors="coerce")
    bad = nums.isna() | (nums < 1) | (nums != np.floor(nums)) | (files == "")
    if bad.any():
        row = int(np.argmax(bad.to_numpy()))
        raise InputError(f"{star_path}: rlnImageName {s.iloc[row]!r} of particle {row + 1} is "
                         f"not valid; expected n@stack.mrcs with n >= 1")
    codes, uniques = pd.factorize(files, sort=False)
    return (nums.to_numpy(dtype=np.int64) - 1, codes.astype(np.int64),
            [str(u) for u in uniques])


def _stack_candidates(star_path: Path, name: str) -> list[Path]:
    """Where a stack named in a STAR file may be, in the order they are tried."""
    p = Path(name)
    if p.is_absolute():
        return [p]
    # absolute(), not resolve(): a symlinked STAR file is relative to where the link is.
    folder = star_path.absolute().parent
    cands = [folder / p, Path.cwd() / p] + [anc / p for anc in folder.parents]
    return list(dict.fromkeys(cands))  # drop duplicates, keep the order


def _resolve_stack(star_path: Path, name: str) -> Path | None:
    """Path of an existing stack file named `name` in `star_path`, or None."""
    for c in _stack_candidates(star_path, name):
        if c.is_file():
            return c
    return None


def _missing_stack_error(star_path: Path, row: int, image_name: str, stack: str) -> InputError:
    where = star_path.absolute().parent / stack
    return InputError(f"{star_path}: particle {row + 1} (rlnImageName {image_name}): stack "
                      f"{stack} not found (looked for {where}, and relative to the current "
                      f"folder and the STAR file's parent folders)")


@dataclass(eq=False)  # DataFrames have no single truth value: compare by identity
class ParticleSet:
    """Particles of a RELION 3.1+ STAR file: optics table, particle table and image access.

    Build one with `load_particles`; `star_path` is the file the image paths are relative to.
    Per-particle methods take 0-based row positions in `particles` (None = all particles).
    Open stacks are cached (at most `max_open_stacks` at a time); call `close()` when done.
    """

    optics: pd.DataFrame
    particles: pd.DataFrame
    star_path: Path
    max_open_stacks: int = 64
    _stacks: OrderedDict = field(default_factory=OrderedDict, init=False, repr=False)
    _refs: tuple | None = field(default=None, init=False, repr=False)
    _paths: dict = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        self.star_path = Path(self.star_path)
        # Positional indexing everywhere: drop any index the caller's DataFrames carry.
        self.optics = self.optics.reset_index(drop=True)
        self.particles = self.particles.reset_index(drop=True)
        self._group = self._compute_group_index()

    # -- tables -------------------------------------------------------------------------------

    @property
    def n_particles(self) -> int:
        """Number of particles (rows of the particle table)."""
        return len(self.particles)

    def _optics_value(self, label: str, what: str) -> float:
        """The single value of an optics label shared by all groups (error if they differ)."""
        if label not in self.optics.columns:
            raise InputError(f"{self.star_path}: data_optics has no {label} column; expected "
                             f"the {what} of each optics group")
        vals = self.optics[label].to_numpy(dtype=np.float64)
        if not np.allclose(vals, vals[0], rtol=0, atol=_PIX_TOL * max(1.0, abs(vals[0]))):
            raise InputError(f"{self.star_path}: optics groups have different {label} "
                             f"({', '.join(f'{v:g}' for v in vals)}); several {what}s in one "
                             f"particle set are not supported yet")
        return float(vals[0])

    @property
    def box(self) -> int:
        """Image size in pixels (rlnImageSize; all optics groups must agree)."""
        return int(round(self._optics_value("rlnImageSize", "image size")))

    @property
    def pixel_size(self) -> float:
        """Pixel size in Angstrom (rlnImagePixelSize; all optics groups must agree)."""
        return self._optics_value("rlnImagePixelSize", "pixel size")

    @property
    def has_ctf(self) -> bool:
        """True when the particles carry CTF parameters (rlnDefocusU present)."""
        return "rlnDefocusU" in self.particles.columns

    def _compute_group_index(self) -> np.ndarray:
        n_opt = len(self.optics)
        if n_opt == 0:
            raise InputError(f"{self.star_path}: data_optics has no rows; expected at least "
                             f"one optics group")
        if "rlnOpticsGroup" not in self.particles.columns:
            if n_opt == 1:
                return np.zeros(self.n_particles, dtype=np.int64)
            raise InputError(f"{self.star_path}: data_particles has no rlnOpticsGroup column; "
                             f"expected one with {n_opt} optics groups")
        g = pd.to_numeric(self.particles["rlnOpticsGroup"], errors="coerce").to_numpy(
            dtype=np.float64)
        bad = ~np.isfinite(g) | (g < 1) | (g > n_opt) | (g != np.round(g))
        if np.any(bad):
            row = int(np.argmax(bad))
            raise InputError(f"{self.star_path}: rlnOpticsGroup "
                             f"{_show(self.particles['rlnOpticsGroup'].iloc[row])} of particle "
                             f"{row + 1} is not valid; expected 1..{n_opt} (a row of "
                             f"data_optics)")
        return g.astype(np.int64) - 1

    def optics_group_index(self) -> np.ndarray:
        """0-based optics group (row of `optics`) of every particle: int64 (n_particles,)."""
        return self._group.copy()

    def _rows(self, indices: Indices) -> np.ndarray:
        if indices is None:
            return np.arange(self.n_particles, dtype=np.int64)
        idx = np.atleast_1d(np.asarray(indices))
        if idx.size == 0:
            return idx.astype(np.int64)
        if idx.dtype.kind not in "iu":
            raise TypeError(f"particle indices must be integers, got {idx.dtype}")
        idx = idx.astype(np.int64, copy=False)
        if idx.min() < 0 or idx.max() >= self.n_particles:
            raise IndexError(f"particle index out of range 0..{self.n_particles - 1} "
                             f"({self.star_path})")
        return idx

    def _column(self, label: str, rows: np.ndarray, default: float) -> np.ndarray:
        if label not in self.particles.columns:
            return np.full(rows.size, default, dtype=np.float64)
        return self.particles[label].to_numpy(dtype=np.float64)[rows]

    def _group_column(self, label: str, rows: np.ndarray) -> np.ndarray:
        if label not in self.optics.columns:
            raise InputError(f"{self.star_path}: data_optics has no {label} column; expected "
                             f"it for every optics group")
        return self.optics[label].to_numpy(dtype=np.float64)[self._group[rows]]

    def ctf_params(self, indices: Indices = None) -> CtfParams:
        """CTF parameters of the particles: voltage, Cs, Q0 from each particle's optics group,
        defocus U/V/angle, phase shift, B-factor and scale per particle (defaults: V = U,
        angle 0, phase shift 0, B 0, scale 1)."""
        rows = self._rows(indices)
        if not self.has_ctf:
            raise InputError(f"{self.star_path}: data_particles has no rlnDefocusU column; "
                             f"expected CTF parameters (rlnDefocusU/V, rlnDefocusAngle)")
        du = self._column("rlnDefocusU", rows, 0.0)
        dv = self._column("rlnDefocusV", rows, 0.0) if "rlnDefocusV" in self.particles else du
        return CtfParams(
            defocus_u=du,
            defocus_v=dv.copy(),
            defocus_angle=self._column("rlnDefocusAngle", rows, 0.0),
            voltage=self._group_column("rlnVoltage", rows),
            cs=self._group_column("rlnSphericalAberration", rows),
            amplitude_contrast=self._group_column("rlnAmplitudeContrast", rows),
            phase_shift=self._column("rlnPhaseShift", rows, 0.0),
            bfactor=self._column("rlnCtfBfactor", rows, 0.0),
            scale=self._column("rlnCtfScalefactor", rows, 1.0),
        )

    def origins_px(self, indices: Indices = None) -> np.ndarray:
        """(n, 2) float64 origins (x, y) in pixels: rlnOriginX/YAngst / group pixel size."""
        rows = self._rows(indices)
        pix = self._group_column("rlnImagePixelSize", rows)
        ox = self._column("rlnOriginXAngst", rows, 0.0)
        oy = self._column("rlnOriginYAngst", rows, 0.0)
        return np.stack([ox / pix, oy / pix], axis=1)

    def angles(self, indices: Indices = None) -> np.ndarray:
        """(n, 3) float64 Euler angles (rot, tilt, psi) in degrees (0 where absent)."""
        rows = self._rows(indices)
        return np.stack([self._column(c, rows, 0.0)
                         for c in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")], axis=1)

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        """Consecutive particle index arrays of at most `batch_size` particles."""
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        for start in range(0, self.n_particles, batch_size):
            yield np.arange(start, min(start + batch_size, self.n_particles), dtype=np.int64)

    # -- images -------------------------------------------------------------------------------

    def _image_refs(self) -> tuple[np.ndarray, np.ndarray, list[str]]:
        if self._refs is None:
            if "rlnImageName" not in self.particles.columns:
                raise InputError(f"{self.star_path}: data_particles has no rlnImageName "
                                 f"column; expected n@stack.mrcs image references")
            self._refs = _parse_image_names(self.particles["rlnImageName"], self.star_path)
        return self._refs

    def image_paths(self, indices: Indices = None) -> list[Path | None]:
        """Resolved stack file of each particle (None where the file does not exist)."""
        rows = self._rows(indices)
        _, codes, files = self._image_refs()
        return [self._stack_path(int(c), files) for c in codes[rows]]

    def _stack_path(self, code: int, files: list[str]) -> Path | None:
        if code not in self._paths:
            self._paths[code] = _resolve_stack(self.star_path, files[code])
        return self._paths[code]

    def _open(self, code: int, row: int) -> Stack:
        st = self._stacks.get(code)
        if st is not None:
            self._stacks.move_to_end(code)
            return st
        _, _, files = self._image_refs()
        path = self._stack_path(code, files)
        if path is None:
            raise _missing_stack_error(self.star_path, row,
                                       str(self.particles["rlnImageName"].iloc[row]),
                                       files[code])
        st = open_stack(path)
        self._stacks[code] = st
        # Bounded cache: a data set can have one stack per micrograph (thousands of files),
        # more than the open-file limit.
        while len(self._stacks) > max(1, self.max_open_stacks):
            _, old = self._stacks.popitem(last=False)
            old.close()
        return st

    def read_images(self, indices: Indices) -> np.ndarray:
        """Images of the particles at `indices`, in that order: float32 (n, box, box).

        Each stack is memory-mapped once and only the requested images are read. Raises
        InputError (naming the STAR file, the particle and the stack) for a missing stack, an
        image number beyond the stack, a stack whose box differs from rlnImageSize, or NaN/Inf
        pixels.
        """
        rows = self._rows(indices)
        box = self.box
        out = np.empty((rows.size, box, box), dtype=np.float32)
        if rows.size == 0:
            return out
        nums, codes, files = self._image_refs()
        sel_codes = codes[rows]
        names = self.particles["rlnImageName"]
        for code in pd.unique(sel_codes):
            where = np.nonzero(sel_codes == code)[0]
            prow = rows[where]
            st = self._open(int(code), int(prow[0]))
            if st.box != box:
                raise InputError(f"{self.star_path}: stack {st.path} (particle {prow[0] + 1}) "
                                 f"has {st.box} px images; expected rlnImageSize = {box}")
            img = nums[prow]
            over = img >= st.n_images
            if np.any(over):
                r = int(prow[np.argmax(over)])
                raise InputError(f"{self.star_path}: particle {r + 1} rlnImageName "
                                 f"{names.iloc[r]}: image {nums[r] + 1} out of range; stack "
                                 f"{st.path} has images 1..{st.n_images}")
            try:
                out[where] = st.read(img)
            except InputError as e:
                raise InputError(f"{self.star_path}: particle images: {e}") from None
        return out

    def close(self) -> None:
        """Close every open stack (they are reopened on demand)."""
        while self._stacks:
            _, st = self._stacks.popitem()
            st.close()

    def __enter__(self) -> ParticleSet:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:  # interpreter shutdown: nothing useful to do
            pass


# -- loading ----------------------------------------------------------------------------------


def _require(df: pd.DataFrame, labels: Sequence[str], star_path: Path, block: str,
             why: str) -> None:
    for label in labels:
        if label not in df.columns:
            raise InputError(f"{star_path}: {block} has no {label} column; expected it "
                             f"({why})")


def _check_positive(df: pd.DataFrame, label: str, star_path: Path, block: str) -> None:
    vals = pd.to_numeric(df[label], errors="coerce").to_numpy(dtype=np.float64)
    bad = ~np.isfinite(vals) | (vals <= 0)
    if np.any(bad):
        row = int(np.argmax(bad))
        raise InputError(f"{star_path}: {block} {label} = {_show(df[label].iloc[row])} in row "
                         f"{row + 1}; expected a positive number")


def _convert_30(particles: pd.DataFrame, star_path: Path, block: str
                ) -> tuple[pd.DataFrame, pd.DataFrame]:
    """RELION 3.0 particle table -> (optics, particles) in the 3.1 layout
    (star_converter.cpp: convert_3p0_particlesTo_3p1)."""
    p = particles.copy()
    cols = p.columns
    has_det = "rlnDetectorPixelSize" in cols and "rlnMagnification" in cols
    if "rlnPixelSize" in cols:
        _check_positive(p, "rlnPixelSize", star_path, block)
        pix = p["rlnPixelSize"].to_numpy(dtype=np.float64)
        if has_det:
            _check_positive(p, "rlnDetectorPixelSize", star_path, block)
            _check_positive(p, "rlnMagnification", star_path, block)
            pix2 = (p["rlnDetectorPixelSize"].to_numpy(dtype=np.float64) * 1e4
                    / p["rlnMagnification"].to_numpy(dtype=np.float64))
            bad = np.abs(pix - pix2) > _PIX_TOL
            if np.any(bad):
                row = int(np.argmax(bad))
                raise InputError(f"{star_path}: inconsistent pixel size in row {row + 1}: "
                                 f"rlnPixelSize = {pix[row]:g} but rlnDetectorPixelSize * "
                                 f"10000 / rlnMagnification = {pix2[row]:g}")
    elif has_det:
        _check_positive(p, "rlnDetectorPixelSize", star_path, block)
        _check_positive(p, "rlnMagnification", star_path, block)
        pix = (p["rlnDetectorPixelSize"].to_numpy(dtype=np.float64) * 1e4
               / p["rlnMagnification"].to_numpy(dtype=np.float64))
    else:
        raise InputError(f"{star_path}: {block} (RELION 3.0 file, no data_optics) has no "
                         f"pixel size; expected rlnPixelSize or rlnDetectorPixelSize and "
                         f"rlnMagnification")
    pix = np.round(pix, 6)

    ctf_cols = [c for c in CTF_OPTICS if c in cols]
    if "rlnDefocusU" in cols:
        _require(p, CTF_OPTICS, star_path, block, "CTF parameters of a RELION 3.0 file")
    # One optics group per distinct (voltage, Cs, Q0, pixel size), numbered in order of
    # first appearance.
    keys = pd.DataFrame({c: p[c].to_numpy(dtype=np.float64) for c in ctf_cols})
    keys["pix"] = pix
    group = keys.groupby(list(keys.columns), sort=False).ngroup().to_numpy() + 1
    n_groups = int(group.max())
    first = [int(np.argmax(group == g)) for g in range(1, n_groups + 1)]

    optics = pd.DataFrame({
        "rlnOpticsGroupName": [f"opticsGroup{g}" for g in range(1, n_groups + 1)],
        "rlnOpticsGroup": np.arange(1, n_groups + 1),
    })
    for c in ctf_cols:
        optics[c] = keys[c].to_numpy()[first]
    optics["rlnImagePixelSize"] = pix[first]

    # The box size of each group comes from the header of its first particle's stack.
    _, codes, files = _parse_image_names(p["rlnImageName"], star_path)
    boxes = []
    for row in first:
        path = _resolve_stack(star_path, files[codes[row]])
        if path is None:
            raise _missing_stack_error(star_path, row, str(p["rlnImageName"].iloc[row]),
                                       files[codes[row]])
        with open_stack(path) as st:
            boxes.append(st.box)
    optics["rlnImageSize"] = np.asarray(boxes, dtype=np.int64)
    optics["rlnImageDimensionality"] = 2

    # Origins were in pixels in 3.0; 3.1 stores Angstrom.
    for old, new in (("rlnOriginX", "rlnOriginXAngst"), ("rlnOriginY", "rlnOriginYAngst"),
                     ("rlnOriginXPrior", "rlnOriginXPriorAngst"),
                     ("rlnOriginYPrior", "rlnOriginYPriorAngst")):
        if old in p.columns and new not in p.columns:
            pos = p.columns.get_loc(old)
            vals = p[old].to_numpy(dtype=np.float64) * pix
            p = p.drop(columns=[old])
            p.insert(pos, new, vals)
    p = p.drop(columns=[c for c in _LEGACY_OPTICS if c in p.columns])
    p["rlnOpticsGroup"] = group.astype(np.int64)
    return optics, p


def load_particles(star_path: PathLike) -> ParticleSet:
    """Read a RELION particle STAR file (3.1+: data_optics + data_particles; or 3.0: a single
    particle table, converted to the 3.1 layout).

    Raises InputError for a missing file, no particle table, no rlnImageName column, missing
    optics fields (rlnImagePixelSize, rlnImageSize; rlnVoltage, rlnSphericalAberration,
    rlnAmplitudeContrast when rlnDefocusU is present), an empty particle table, invalid
    rlnOpticsGroup values or an inconsistent pixel size.
    """
    path = Path(star_path)
    blocks = read_star(path)
    loops = {k: v for k, v in blocks.items() if isinstance(v, pd.DataFrame)}
    if "optics" in loops:
        if "particles" not in loops:
            raise InputError(f"{path}: no data_particles block (blocks: "
                             f"{', '.join('data_' + k for k in blocks)}); expected a particle "
                             f"table after data_optics")
        optics, particles = loops["optics"], loops["particles"]
        block = "data_particles"
        if len(particles) == 0:
            raise InputError(f"{path}: no particles in {path} (data_particles is empty)")
        _require(particles, ["rlnImageName"], path, block, "n@stack.mrcs image references")
        _require(optics, REQUIRED_OPTICS, path, "data_optics", "RELION 3.1 optics table")
        if "rlnDefocusU" in particles.columns:
            _require(optics, CTF_OPTICS, path, "data_optics", "CTF parameters")
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
        optics, particles = _convert_30(particles, path, block)
    for label in REQUIRED_OPTICS:
        _check_positive(optics, label, path, "data_optics")
    return ParticleSet(optics=optics, particles=particles, star_path=path)


def write_particles(path: PathLike, optics: pd.DataFrame, particles: pd.DataFrame) -> None:
    """Write a RELION 3.1 particle file (data_optics then data_particles), atomically."""
    write_star(path, {"optics": optics, "particles": particles})
