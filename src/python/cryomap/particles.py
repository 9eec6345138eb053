"""Particle sets: RELION particle STAR files, cryoSPARC .cs files and their image stacks.

Conventions are in docs/conventions.md ("Particle files", "Image paths", "Optics groups",
"RELION defaults applied", "Half sets").

A `ParticleSet` holds the optics table and the particle table, both as pandas DataFrames with
RELION's labels as column names (no leading underscore), and reads particle images lazily
from memory-mapped stacks.

- rlnImageName is `n@stack.mrcs` with n 1-based (no `@`: a single-image file). A relative
  stack path is looked up where RELION looks: relative to the working folder (RELION's
  project folder) first, then relative to the STAR file's folder. No other folder is
  searched; when both candidates exist and are different files the name is ambiguous (error).
- rlnOpticsGroup (1-based) is a row number in the optics table: groups are numbered 1..N in
  row order, as RELION does (obs_model.cpp: getOpticsGroup).
- Optics groups may differ in pixel size and box: `pixel_sizes` / `boxes` (per group) and
  `particle_pixel_sizes` / `particle_boxes` (per particle); `pixel_size` / `box` are the
  single value shared by all groups and raise when the groups differ.
- Origins are rlnOriginX/YAngst in Angstrom; `origins_px` divides by the particle's optics
  group pixel size.
- RELION 3.0 files (no data_optics) are converted as RELION does on reading: one optics group
  per distinct (voltage, Cs, Q0, pixel size), rlnOriginX/Y (px) -> rlnOriginX/YAngst.
- Every value a computation uses is checked when the file is loaded (and CTF values again in
  `ctf_params`), so that bad input is reported in one line before anything is written.
"""

from __future__ import annotations

import os
import re
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .ctf import CtfParams, check_values
from .errors import InputError
from .io.mrc import Stack, check_pixel_size, open_stack, read_header
from .io.star import numeric_column, write_star

__all__ = ["ParticleSet", "load_particles", "write_particles", "make_optics_table",
           "check_ctf", "stack_search_dirs", "output_stack_name",
           "particles_from_images", "AMPLITUDE_CONTRAST_DEFAULT", "MEMORY_STACK"]

PathLike = str | os.PathLike
Indices = Sequence[int] | np.ndarray | None
Log = Callable[[str], None] | None

#: Optics-table labels needed when the particles carry CTF parameters (ctf.cpp).
CTF_OPTICS = ("rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast")
#: Per-particle CTF labels (with the defaults RELION uses when they are absent).
CTF_PARTICLE_DEFAULTS = {"rlnDefocusAngle": 0.0, "rlnPhaseShift": 0.0, "rlnCtfBfactor": 0.0,
                         "rlnCtfScalefactor": 1.0}
#: Q0 used when a file has CTF parameters but no rlnAmplitudeContrast: relion_import's and
#: the RELION GUI's default (apps/import.cpp --Q0, pipeline_jobs.cpp). RELION itself reads a
#: missing Q0 as 0 (ctf.cpp: CTF::read) and refinement refuses the file (setValuesByGroup).
AMPLITUDE_CONTRAST_DEFAULT = 0.1
#: Particle labels that RELION 3.0 stored per particle and 3.1 moved to the optics table.
_LEGACY_OPTICS = ("rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast",
                  "rlnPixelSize", "rlnDetectorPixelSize", "rlnMagnification",
                  "rlnBeamTiltX", "rlnBeamTiltY")
_MAG_LABELS = ("rlnMagMat00", "rlnMagMat01", "rlnMagMat10", "rlnMagMat11")
# Absolute tolerance (A) for "same pixel size" (RELION compares pixel sizes to 0.001 A).
_PIX_TOL = 1e-3
#: Stack name in rlnImageName of particles whose images are held in memory
#: (`particles_from_images`); `ParticleSet.save` writes them to a real stack.
MEMORY_STACK = "<memory>"


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


def _parse_image_names(names: pd.Series, where: str) -> tuple[np.ndarray, np.ndarray,
                                                              list[str]]:
    """rlnImageName values -> (0-based image index, code into file list, file list)."""
    s = names.astype(str).str.strip()
    parts = s.str.partition("@")
    has_at = parts[1] == "@"
    num_txt = parts[0].where(has_at, "1")
    files = parts[2].where(has_at, parts[0])
    nums = pd.to_numeric(num_txt, errors="coerce")
    bad = (nums.isna() | (nums < 1) | (nums != np.floor(nums)) | (nums > 2**31)
           | (files == ""))
    if bad.any():
        row = int(np.argmax(bad.to_numpy()))
        raise InputError(f"{where}: rlnImageName {s.iloc[row]!r} of particle {row + 1} is "
                         f"not valid; expected n@stack.mrcs with n >= 1")
    codes, uniques = pd.factorize(files, sort=False)
    return (nums.to_numpy(dtype=np.int64) - 1, codes.astype(np.int64),
            [str(u) for u in uniques])


# -- image paths ------------------------------------------------------------------------------


def stack_search_dirs(star_path: PathLike, cwd: PathLike | None = None) -> list[Path]:
    """Folders a relative stack name in a STAR file is looked up in, in order: the working
    folder (RELION's project folder), then the STAR file's folder (absolute(), not resolve():
    a symlinked STAR file is relative to where the link is)."""
    work = Path.cwd() if cwd is None else Path(cwd).absolute()
    return list(dict.fromkeys([work, Path(star_path).absolute().parent]))


def _same_file(a: Path, b: Path) -> bool:
    try:
        return os.path.samefile(a, b)
    except OSError:
        return False


def output_stack_name(path: PathLike, cwd: PathLike | None = None) -> str:
    """The name an output STAR file gives the stack `path`: relative to the working folder
    when the stack lies below it (RELION's project-relative paths), absolute otherwise, so
    that a later job run from the same folder finds it (docs/conventions.md, "Image paths")."""
    work = Path.cwd() if cwd is None else Path(cwd).absolute()
    p = work / Path(path)  # an absolute path stays as it is
    try:
        rel = p.relative_to(work)
        if ".." not in rel.parts:
            return rel.as_posix()
    except ValueError:
        pass
    real = p.resolve()  # e.g. a path through "..": compare the real locations
    try:
        return real.relative_to(work.resolve()).as_posix()
    except ValueError:
        return str(real)


def _resolve_stack(name: str, search_dirs: Sequence[Path], where: str) -> Path | None:
    """The existing file `name` refers to, or None; InputError when two different files
    match (an ambiguous relative name)."""
    def is_file(c: Path) -> bool:
        try:
            return c.is_file()
        except (OSError, ValueError):  # e.g. a NUL byte or a name too long for the system
            raise InputError(f"{where}: stack name {name!r} is not a valid path") from None

    p = Path(name)
    if p.is_absolute():
        return p if is_file(p) else None
    found = [d / p for d in search_dirs if is_file(d / p)]
    if not found:
        return None
    for other in found[1:]:
        if not _same_file(found[0], other):
            raise InputError(f"{where}: stack {name} is ambiguous: {found[0]} and {other} "
                             f"are different files; expected one match (run from the "
                             f"project folder, or use absolute paths)")
    return found[0]


def _missing_stack_error(where: str, row: int, image_name: str, stack: str,
                         search_dirs: Sequence[Path]) -> InputError:
    looked = " and ".join(str(d / stack) for d in search_dirs) if not Path(stack).is_absolute() \
        else stack
    return InputError(f"{where}: particle {row + 1} (rlnImageName {image_name}): stack "
                      f"{stack} not found (looked for {looked})")


# -- strict column access -----------------------------------------------------------------------


def _vector(text: object, where: str, label: str) -> np.ndarray:
    """A RELION vector value "[a,b,c]" (also without brackets) as float64."""
    s = str(text).strip()
    if s.startswith("[") and s.endswith("]"):
        s = s[1:-1]
    s = s.strip()
    if not s:
        return np.zeros(0)
    try:
        vals = np.array([float(t) for t in re.split(r"[,\s]+", s) if t], dtype=np.float64)
    except ValueError:
        raise InputError(f"{where}: {label} = {str(text)!r}; expected a list of numbers "
                         f"[a,b,...]") from None
    if not np.all(np.isfinite(vals)):
        raise InputError(f"{where}: {label} = {str(text)!r}; expected finite numbers")
    return vals


@dataclass(eq=False)  # DataFrames have no single truth value: compare by identity
class ParticleSet:
    """Particles of a RELION 3.1+ file: optics table, particle table and image access.

    Build one with `load_particles`; `star_path` names the file in messages and, with
    `search_dirs` (default: the current folder, then the STAR file's folder), locates the
    stacks. Per-particle methods take 0-based row positions in `particles` (None = all).
    Open stacks are cached (at most `max_open_stacks` at a time); call `close()` when done.
    `notes` lists the RELION defaults applied on loading (one line each). `images`, when set
    (`particles_from_images`), holds the images in memory, (n, box, box) in table order:
    they are read from it instead of stacks, and `save` writes them to a stack.
    """

    optics: pd.DataFrame
    particles: pd.DataFrame
    star_path: Path
    max_open_stacks: int = 64
    search_dirs: list[Path] | None = None
    notes: list[str] = field(default_factory=list)
    images: np.ndarray | None = field(default=None, repr=False)
    _stacks: OrderedDict = field(default_factory=OrderedDict, init=False, repr=False)
    _refs: tuple | None = field(default=None, init=False, repr=False)
    _paths: dict = field(default_factory=dict, init=False, repr=False)

    def __post_init__(self) -> None:
        self.star_path = Path(self.star_path)
        if self.search_dirs is None:
            self.search_dirs = stack_search_dirs(self.star_path)
        self.search_dirs = [Path(d) for d in self.search_dirs]
        # Positional indexing everywhere: drop any index the caller's DataFrames carry.
        self.optics = self.optics.reset_index(drop=True)
        self.particles = self.particles.reset_index(drop=True)
        self._group = self._compute_group_index()
        if self.images is not None:
            self.images = np.asarray(self.images, np.float32)
            n = self.n_particles
            if self.images.ndim != 3 or self.images.shape[0] != n:
                raise InputError(f"{self.star_path}: {self.images.shape} images for {n} "
                                 f"particles; expected ({n}, box, box)")

    # -- tables -------------------------------------------------------------------------------

    @property
    def n_particles(self) -> int:
        """Number of particles (rows of the particle table)."""
        return len(self.particles)

    @property
    def n_groups(self) -> int:
        """Number of optics groups (rows of the optics table)."""
        return len(self.optics)

    def _where(self, block: str) -> str:
        return f"{self.star_path}: {block}"

    def _optics_numbers(self, label: str, what: str) -> np.ndarray:
        if label not in self.optics.columns:
            raise InputError(f"{self.star_path}: data_optics has no {label} column; expected "
                             f"the {what} of each optics group")
        return numeric_column(self.optics, label, self._where("data_optics"))

    @property
    def pixel_sizes(self) -> np.ndarray:
        """Pixel size (A) of each optics group: float64 (n_groups,) (rlnImagePixelSize)."""
        return self._optics_numbers("rlnImagePixelSize", "pixel size")

    @property
    def boxes(self) -> np.ndarray:
        """Image size (px) of each optics group: int64 (n_groups,) (rlnImageSize)."""
        return np.round(self._optics_numbers("rlnImageSize", "image size")).astype(np.int64)

    def _single(self, values: np.ndarray, label: str, what: str, tol: float) -> float:
        if not np.allclose(values, values[0], rtol=0, atol=tol * max(1.0, abs(values[0]))):
            raise InputError(f"{self.star_path}: optics groups have different {label} "
                             f"({', '.join(f'{v:g}' for v in values)}); expected one {what} "
                             f"for all particles here (E/M jobs work on optics group 1's "
                             f"grid, `reference_grid`)")
        return float(values[0])

    @property
    def box(self) -> int:
        """Image size in pixels shared by all optics groups (InputError if they differ; see
        `boxes` for per-group values)."""
        return int(round(self._single(self.boxes.astype(np.float64), "rlnImageSize",
                                      "image size", 0.0)))

    @property
    def pixel_size(self) -> float:
        """Pixel size (A) shared by all optics groups (InputError if they differ by more than
        0.001 A; see `pixel_sizes` for per-group values)."""
        return self._single(self.pixel_sizes, "rlnImagePixelSize", "pixel size", _PIX_TOL)

    @property
    def reference_grid(self) -> tuple[int, float]:
        """(box, pixel size) of optics group 1: the grid refinement and classification work
        on (RELION's: the reference must match it); other groups' images are brought onto
        it (docs/conventions.md, "Optics groups")."""
        return int(self.boxes[0]), float(self.pixel_sizes[0])

    @property
    def grid_box(self) -> int:
        """Box (px) of `reference_grid`: optics group 1's."""
        return int(self.boxes[0])

    @property
    def grid_pixel_size(self) -> float:
        """Pixel size (Å) of `reference_grid`: optics group 1's."""
        return float(self.pixel_sizes[0])

    @property
    def mixed_grids(self) -> bool:
        """True when optics groups differ in box or (by more than 0.001 Å) pixel size."""
        box, pix = self.reference_grid
        return bool(np.any(self.boxes != box)
                    or np.any(np.abs(self.pixel_sizes - pix) > _PIX_TOL))

    def particle_pixel_sizes(self, indices: Indices = None) -> np.ndarray:
        """Pixel size (A) of each particle's optics group: float64 (n,)."""
        return self.pixel_sizes[self._group[self._rows(indices)]]

    def particle_boxes(self, indices: Indices = None) -> np.ndarray:
        """Image size (px) of each particle's optics group: int64 (n,)."""
        return self.boxes[self._group[self._rows(indices)]]

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
        col = self.particles["rlnOpticsGroup"]
        if isinstance(col, pd.DataFrame):
            raise InputError(f"{self.star_path}: data_particles has rlnOpticsGroup "
                             f"{col.shape[1]} times; expected once")
        g = pd.to_numeric(col, errors="coerce").to_numpy(dtype=np.float64)
        bad = ~np.isfinite(g) | (g < 1) | (g > n_opt) | (g != np.round(g))
        if np.any(bad):
            row = int(np.argmax(bad))
            raise InputError(f"{self.star_path}: rlnOpticsGroup "
                             f"{_show(col.iloc[row])} of particle "
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
        """Per-particle numbers (strictly parsed, finite) or `default` when absent."""
        if label not in self.particles.columns:
            return np.full(rows.size, default, dtype=np.float64)
        return numeric_column(self.particles, label, self._where("data_particles"), rows=rows)

    def _group_column(self, label: str, rows: np.ndarray) -> np.ndarray:
        if label not in self.optics.columns:
            if label == "rlnAmplitudeContrast":
                return np.full(rows.size, AMPLITUDE_CONTRAST_DEFAULT)
            raise InputError(f"{self.star_path}: data_optics has no {label} column; expected "
                             f"it for every optics group")
        return numeric_column(self.optics, label, self._where("data_optics"))[self._group[rows]]

    # -- aberrations (per optics group) ---------------------------------------------------------

    def _group_vectors(self, label: str) -> np.ndarray | None:
        """(n_groups, K) zero-padded coefficients of a vector label, or None when absent."""
        if label not in self.optics.columns:
            return None
        vecs = [_vector(v, f"{self.star_path}: data_optics, row {g + 1}", label)
                for g, v in enumerate(self.optics[label])]
        k = max((v.size for v in vecs), default=0)
        out = np.zeros((len(vecs), k))
        for g, v in enumerate(vecs):
            out[g, : v.size] = v
        return out

    def aberrations(self) -> dict[str, np.ndarray | None]:
        """Per optics group: 'even_zernike' (G, Ke), 'odd_zernike' (G, Ko), 'beam_tilt'
        (G, 2) mrad and 'mag_matrix' (G, 2, 2); None for what the optics table lacks."""
        where = self._where("data_optics")
        tilt = None
        if "rlnBeamTiltX" in self.optics.columns or "rlnBeamTiltY" in self.optics.columns:
            tilt = np.zeros((self.n_groups, 2))
            for j, label in enumerate(("rlnBeamTiltX", "rlnBeamTiltY")):
                if label in self.optics.columns:
                    tilt[:, j] = numeric_column(self.optics, label, where)
        mag = None
        if any(lab in self.optics.columns for lab in _MAG_LABELS):
            mag = np.tile(np.eye(2), (self.n_groups, 1, 1))
            for (i, j), label in zip(((0, 0), (0, 1), (1, 0), (1, 1)), _MAG_LABELS,
                                     strict=True):
                if label in self.optics.columns:
                    mag[:, i, j] = numeric_column(self.optics, label, where)
        return {"even_zernike": self._group_vectors("rlnEvenZernike"),
                "odd_zernike": self._group_vectors("rlnOddZernike"),
                "beam_tilt": tilt, "mag_matrix": mag}

    def ctf_params(self, indices: Indices = None) -> CtfParams:
        """CTF parameters of the particles: voltage, Cs, Q0 and aberrations from each
        particle's optics group, defocus U/V/angle, phase shift, B-factor and scale per
        particle (defaults: V = U, angle 0, phase shift 0, B 0, scale 1). Values are checked
        (check_ctf) first."""
        rows = self._rows(indices)
        if not self.has_ctf:
            raise InputError(f"{self.star_path}: data_particles has no rlnDefocusU column; "
                             f"expected CTF parameters (rlnDefocusU/V, rlnDefocusAngle)")
        check_ctf(self, rows)
        du = self._column("rlnDefocusU", rows, 0.0)
        dv = self._column("rlnDefocusV", rows, 0.0) if "rlnDefocusV" in self.particles else du
        ab = self.aberrations()
        g = self._group[rows]
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
            **{k: (None if v is None else v[g]) for k, v in ab.items()},
        )

    def origins_angst(self, indices: Indices = None) -> np.ndarray:
        """(n, 2) float64 origins (x, y) in Å: rlnOriginX/YAngst (0 where absent)."""
        rows = self._rows(indices)
        return np.stack([self._column("rlnOriginXAngst", rows, 0.0),
                         self._column("rlnOriginYAngst", rows, 0.0)], axis=1)

    def origins_px(self, indices: Indices = None, pixel_size: float | None = None
                   ) -> np.ndarray:
        """(n, 2) float64 origins (x, y) in pixels: rlnOriginX/YAngst / the particle's optics
        group pixel size, or / `pixel_size` (e.g. the reference grid's) when given."""
        rows = self._rows(indices)
        pix = (self.pixel_sizes[self._group[rows]] if pixel_size is None
               else np.full(rows.size, float(pixel_size)))
        return self.origins_angst(rows) / pix[:, None]

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
            self._refs = _parse_image_names(self.particles["rlnImageName"],
                                            str(self.star_path))
        return self._refs

    def image_paths(self, indices: Indices = None) -> list[Path | None]:
        """Resolved stack file of each particle (None where the file does not exist or the
        images are in memory)."""
        rows = self._rows(indices)
        if self.images is not None:
            return [None] * rows.size
        _, codes, files = self._image_refs()
        return [self._stack_path(int(c), files) for c in codes[rows]]

    def output_image_names(self, indices: Indices = None, cwd: PathLike | None = None
                           ) -> list[str]:
        """rlnImageName of each particle as output STAR files write it: `n@stack` with the
        stack's path relative to the working folder when it lies below it, absolute
        otherwise (`output_stack_name`), so that the file can be read from the working
        folder by cryomap or RELION. A stack that is not found keeps its input name."""
        rows = self._rows(indices)
        names = self.particles["rlnImageName"]
        if self.images is not None:
            return [str(names.iloc[r]) for r in rows]
        nums, codes, files = self._image_refs()
        out_name: dict[int, str | None] = {}
        result = []
        for r in rows:
            c = int(codes[r])
            if c not in out_name:
                path = self._stack_path(c, files)
                out_name[c] = None if path is None else output_stack_name(path, cwd)
            stack = out_name[c]
            result.append(str(names.iloc[r]).strip() if stack is None
                          else f"{nums[r] + 1:06d}@{stack}")
        return result

    def save(self, star_path: PathLike, stack_path: PathLike | None = None) -> Path:
        """Write the particles as a RELION 3.1 STAR file (atomically); in-memory images are
        first written to `stack_path` (default: the STAR file's name with `.mrcs`). Image
        names are written valid from the working folder (`output_image_names`). Returns the
        STAR file's path."""
        from .io.mrc import write_stack

        star = Path(star_path)
        table = self.particles.copy()
        if self.images is not None:
            stack = star.with_suffix(".mrcs") if stack_path is None else Path(stack_path)
            pix = self.pixel_sizes
            write_stack(stack, self.images, float(pix[0]))
            name = output_stack_name(stack)
            table["rlnImageName"] = [f"{i + 1:06d}@{name}" for i in range(self.n_particles)]
        else:
            table["rlnImageName"] = self.output_image_names()
        write_particles(star, self.optics, table)
        return star

    def _stack_path(self, code: int, files: list[str]) -> Path | None:
        if code not in self._paths:
            self._paths[code] = _resolve_stack(files[code], self.search_dirs,
                                               str(self.star_path))
        return self._paths[code]

    def _open(self, code: int, row: int) -> Stack:
        st = self._stacks.get(code)
        if st is not None:
            self._stacks.move_to_end(code)
            return st
        _, _, files = self._image_refs()
        path = self._stack_path(code, files)
        if path is None:
            raise _missing_stack_error(str(self.star_path), row,
                                       str(self.particles["rlnImageName"].iloc[row]),
                                       files[code], self.search_dirs)
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

        The particles must share one box (their optics groups' rlnImageSize); read groups of
        different boxes separately. Each stack is memory-mapped once and only the requested
        images are read. Raises InputError (naming the STAR file, the particle and the
        stack) for a missing stack, an image number beyond the stack, a stack whose box
        differs from rlnImageSize, or NaN/Inf pixels.
        """
        rows = self._rows(indices)
        if rows.size == 0:
            return np.empty((0, self.boxes[0], self.boxes[0]), dtype=np.float32)
        if self.images is not None:
            return self.images[rows]
        boxes = self.boxes[self._group[rows]]
        if np.any(boxes != boxes[0]):
            r = int(rows[np.argmax(boxes != boxes[0])])
            raise InputError(f"{self.star_path}: particles {rows[0] + 1} and {r + 1} have "
                             f"different boxes ({boxes[0]} and {self.boxes[self._group[r]]} "
                             f"px); expected one box per read (read each optics group "
                             f"separately)")
        box = int(boxes[0])
        out = np.empty((rows.size, box, box), dtype=np.float32)
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


# -- checks -------------------------------------------------------------------------------------


def check_ctf(particles: ParticleSet, indices: Indices = None) -> None:
    """Check the CTF values of the particles (all when indices is None) against
    ctf.CTF_RANGES: voltage, Cs, Q0, beam tilt and magnification matrix per optics group;
    defocus U/V, angle, phase shift, B-factor and scale per particle.

    Defocus <= 0 is refused: RELION's sign convention makes positive defocus underfocus and
    cryomap, unlike RELION, takes zero or overfocus as an input error. Raises InputError
    naming the file, block, row, field and range.
    """
    ps = particles
    rows = ps._rows(indices)
    opt_where = ps._where("data_optics")
    used = np.unique(ps._group[rows])
    for label in CTF_OPTICS + ("rlnBeamTiltX", "rlnBeamTiltY") + _MAG_LABELS:
        if label in ps.optics.columns:
            check_values(label, numeric_column(ps.optics, label, opt_where)[used], opt_where,
                         rows=used)
        elif label in CTF_OPTICS[:2]:
            raise InputError(f"{ps.star_path}: data_optics has no {label} column; expected "
                             f"it (CTF parameters)")
    ab = ps.aberrations()
    if ab["mag_matrix"] is not None:
        det = np.linalg.det(ab["mag_matrix"][used])
        if np.any(det <= 0):
            g = int(used[np.argmax(det <= 0)])
            raise InputError(f"{opt_where}, row {g + 1}: rlnMagMat00/01/10/11 has determinant "
                             f"{det[np.argmax(det <= 0)]:g}; expected > 0 (a matrix close to "
                             f"the identity)")
    part_where = ps._where("data_particles")
    for label in ("rlnDefocusU", "rlnDefocusV") + tuple(CTF_PARTICLE_DEFAULTS):
        if label in ps.particles.columns:
            vals = numeric_column(ps.particles, label, part_where, rows=rows)
            check_values(label, vals, part_where, rows=rows)


def _check_loaded(ps: ParticleSet) -> None:
    """Every number a computation will use, checked once when the file is loaded."""
    opt_where = ps._where("data_optics")
    pix = ps.pixel_sizes
    for g, p in enumerate(pix):
        check_pixel_size(p, f"{opt_where}, row {g + 1}: rlnImagePixelSize")
    boxes = ps._optics_numbers("rlnImageSize", "image size")
    bad = (boxes < 1) | (boxes != np.round(boxes))
    if np.any(bad):
        g = int(np.argmax(bad))
        raise InputError(f"{opt_where}, row {g + 1}: rlnImageSize = {boxes[g]:g}; expected a "
                         f"whole number of pixels >= 1")
    part_where = ps._where("data_particles")
    for label in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst",
                  "rlnOriginYAngst"):
        if label in ps.particles.columns:
            numeric_column(ps.particles, label, part_where)
    # Parsed, not cached: callers may still edit the table before reading images.
    _parse_image_names(ps.particles["rlnImageName"], str(ps.star_path))
    ps.aberrations()
    if ps.has_ctf:
        check_ctf(ps)


# -- loading ----------------------------------------------------------------------------------


def check_stack_boxes(ps: ParticleSet) -> None:
    """The first particle's stack of each optics group (when it exists) must have the
    group's rlnImageSize."""
    groups = ps.optics_group_index()
    boxes = ps.boxes
    _, codes, files = ps._image_refs()
    for g in range(ps.n_groups):
        members = np.flatnonzero(groups == g)
        if members.size == 0:
            continue
        path = ps._stack_path(int(codes[members[0]]), files)
        if path is None:
            continue  # reported when the images are read
        h = read_header(path)
        if (h.nx, h.ny) != (boxes[g], boxes[g]):
            raise InputError(f"{ps.star_path}: stack {path} (particle {members[0] + 1}) has "
                             f"{h.nx} x {h.ny} px images; expected rlnImageSize = {boxes[g]} "
                             f"of optics group {g + 1}")


def load_particles(star_path: PathLike, angpix: float | None = None,
                   project_dir: PathLike | None = None, log: Log = print,
                   check_stacks: bool = True) -> ParticleSet:
    """Read a particle file: RELION STAR (3.1+: data_optics + data_particles; 3.0: a single
    particle table, converted to the 3.1 layout) or cryoSPARC `.cs` (by suffix).

    angpix: pixel size (A) that replaces the file's (--angpix); needed when the file has
        none. RELION's defaults are applied where a field is missing (docs/conventions.md,
        "RELION defaults applied"): rlnImageSize from the stack headers, rlnImagePixelSize
        from rlnDetectorPixelSize * 10000 / rlnMagnification, rlnAmplitudeContrast 0.1;
        each is reported through `log` (None: silent) and kept in `ParticleSet.notes`.
    project_dir: for `.cs` files, the cryoSPARC project folder the blob paths are relative
        to (see io.cryosparc). STAR image paths are relative to the working folder, then to
        the STAR file's folder.
    check_stacks: compare each optics group's box with its first existing stack (header
        only) and raise InputError on a mismatch.

    Raises InputError (one line naming the file, row, field and expected range) for anything
    RELION would refuse and for values cryomap cannot compute with (see check_ctf).
    """
    path = Path(star_path)
    if angpix is not None:
        angpix = check_pixel_size(angpix, "--angpix")
    if path.suffix.lower() == ".cs":
        from .io.cryosparc import load_cryosparc

        ps = load_cryosparc(path, project_dir=project_dir, angpix=angpix, log=log)
    else:
        from .io.relion import load_star

        ps = load_star(path, angpix, log)
    if check_stacks:
        check_stack_boxes(ps)
        # Parsed names and resolved paths are re-derived on first use: callers may still
        # edit the particle table before reading images.
        ps._refs, ps._paths = None, {}
    return ps


def write_particles(path: PathLike, optics: pd.DataFrame, particles: pd.DataFrame) -> None:
    """Write a RELION 3.1 particle file (data_optics then data_particles), atomically."""
    write_star(path, {"optics": optics, "particles": particles})



def particles_from_images(images: np.ndarray, pixel_size: float,
                          table: pd.DataFrame | None = None,
                          optics: pd.DataFrame | None = None, voltage: float = 300.0,
                          cs: float = 2.7, amplitude_contrast: float = 0.1) -> ParticleSet:
    """A particle set held in memory: `images` (n, box, box) and a RELION particle table
    (`table`: one row per image with RELION's labels, e.g. rlnDefocusU/V/Angle, angles,
    rlnOriginX/YAngst; None: no columns). The optics table is `optics`, or one optics group
    with `pixel_size` (Å), the images' box and the given voltage (kV), Cs (mm) and Q0.
    rlnImageName is set to `n@<memory>`. Values are checked as `load_particles` checks a
    file's (InputError). `ParticleSet.save` writes the set to a STAR file and a stack."""
    imgs = np.asarray(images, np.float32)
    if imgs.ndim == 2:
        imgs = imgs[None]
    if imgs.ndim != 3 or imgs.shape[1] != imgs.shape[2] or imgs.shape[0] < 1:
        raise InputError(f"images: shape {imgs.shape}; expected (n, box, box) square images")
    if not np.all(np.isfinite(imgs)):
        raise InputError("images: NaN or infinite pixels; expected finite values")
    n, box = imgs.shape[0], imgs.shape[1]
    pixel_size = check_pixel_size(pixel_size, "pixel_size")
    df = pd.DataFrame(index=pd.RangeIndex(n)) if table is None else \
        pd.DataFrame(table).reset_index(drop=True).copy()
    if len(df) != n:
        raise InputError(f"table: {len(df)} rows for {n} images; expected one row per image")
    df["rlnImageName"] = [f"{i + 1:06d}@{MEMORY_STACK}" for i in range(n)]
    if optics is None:
        optics = make_optics_table(pixel_size, box, voltage, cs, amplitude_contrast)
    if "rlnOpticsGroup" not in df.columns:
        df["rlnOpticsGroup"] = 1
    ps = ParticleSet(optics=pd.DataFrame(optics), particles=df,
                     star_path=Path(MEMORY_STACK), search_dirs=[], images=imgs)
    if np.any(ps.boxes != box):
        raise InputError(f"optics: rlnImageSize {', '.join(map(str, ps.boxes))}; expected the "
                         f"images' box {box} for every optics group")
    _check_loaded(ps)
    return ps
