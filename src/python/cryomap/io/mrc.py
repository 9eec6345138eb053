"""MRC maps and image stacks (docs/conventions.md, "MRC files"). The one owner of the format.

Reading is done here, from the 1024-byte header, the way RELION reads MRC files
(rwMRC.h: readMRC, parseMRCHeader), so that every file RELION reads is read, and every
inconsistent file is refused with one line naming the file and the header field:

- The "MAP " identifier and the machine stamp are not required (RELION ignores them). Byte
  order is RELION's rule: the header is big-endian when |mode| or |nx| read as little-endian
  exceed 65535.
- Modes 0 (int8), 1 (int16), 2 (float32), 6 (uint16) and 12 (float16) are read. Modes 3/4
  (complex) and SerialEM's 4-bit mode 101 are refused, as is any other mode.
- nx, ny, nz must be >= 1, nsymbt >= 0, and 1024 + nsymbt + nx*ny*nz*bytes must not exceed the
  file size (a short `.mrcs` is an error, not a stack with fewer images). Extra bytes at the
  end are ignored, as RELION ignores them.
- The pixel size is cell a / mx (RELION's rule). Absent (mx = 0, a = 0, non-finite or
  negative) reads as 0.0; a map needs one in 0.1..100 A unless the caller overrides it.
- Origin, nxstart and mapc/mapr/maps are ignored: the centre of a box is always index
  floor(N/2) and x is the fastest axis.

Arrays are float32, indexed (z, y, x) for volumes, (y, x) for images and (n, y, x) for stacks.
Written files are mode 2 (float32), mapc/mapr/maps = 1/2/3, cell = pixel size * sampling,
`.mrcs` stacks with mrcfile's image-stack header (ispg 0, mz 1), origin 0. Every write goes
to a temporary file in the target folder first and then replaces the target.
"""

from __future__ import annotations

import mmap
import os
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import mrcfile
import numpy as np

from ..errors import InputError
from .atomic import atomic_path

__all__ = ["Stack", "open_stack", "read_map", "write_map", "write_stack", "atomic_path",
           "MrcHeader", "read_header", "check_pixel_size", "PIXEL_SIZE_RANGE", "MODES"]

PathLike = str | os.PathLike

#: Pixel sizes (Angstrom) accepted from headers, STAR files and --angpix.
PIXEL_SIZE_RANGE = (0.1, 100.0)

#: MRC modes read (RELION's parseMRCHeader; mode 0 is signed since RELION 3.1).
MODES = {0: "i1", 1: "i2", 2: "f4", 6: "u2", 12: "f2"}

_HEADER_BYTES = 1024
_SWAP_TRIGGER = 65535  # RELION's SWAPTRIG (image.h)


def check_pixel_size(value: float, what: str) -> float:
    """`value` as a float if it is a pixel size in PIXEL_SIZE_RANGE, else InputError naming
    `what` (e.g. "--angpix" or "x.star: data_optics row 1 rlnImagePixelSize")."""
    lo, hi = PIXEL_SIZE_RANGE
    try:
        pix = float(value)
    except (TypeError, ValueError):
        raise InputError(f"{what} = {value!r}: expected a pixel size in {lo:g}..{hi:g} A"
                         ) from None
    if not (np.isfinite(pix) and lo <= pix <= hi):
        raise InputError(f"{what} = {pix:g}: expected a pixel size in {lo:g}..{hi:g} A")
    return pix


@dataclass(frozen=True)
class MrcHeader:
    """The header fields cryomap uses (others are ignored, as RELION ignores them)."""

    path: Path
    nx: int
    ny: int
    nz: int
    mode: int
    nsymbt: int
    byte_order: str  # "<" or ">"
    pixel_size: float  # cell a / mx; 0.0 when absent or not positive
    file_size: int

    @property
    def dtype(self) -> np.dtype:
        """numpy dtype of the voxels, in the file's byte order."""
        return np.dtype(self.byte_order + MODES[self.mode])

    @property
    def data_offset(self) -> int:
        """Byte offset of the first voxel: 1024 + extended header."""
        return _HEADER_BYTES + self.nsymbt

    @property
    def shape(self) -> tuple[int, int, int]:
        """(nz, ny, nx)."""
        return (self.nz, self.ny, self.nx)


def _not_mrc(path: Path, detail: str) -> InputError:
    return InputError(f"{path}: not a readable MRC file ({detail})")


def _check_exists(path: Path) -> None:
    if not path.exists():
        raise InputError(f"{path}: file not found")
    if not path.is_file():
        raise InputError(f"{path}: not a regular file")


def read_header(path: PathLike) -> MrcHeader:
    """Parse and check the header of an MRC file (see the module docstring for the rules).

    Raises InputError, naming the file and the field, for anything RELION could not read.
    """
    path = Path(path)
    _check_exists(path)
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            raw = f.read(_HEADER_BYTES)
    except OSError as e:
        raise InputError(f"{path}: cannot read the file ({e.strerror or e})") from None
    if len(raw) < _HEADER_BYTES:
        raise _not_mrc(path, f"{len(raw)} bytes; an MRC header needs {_HEADER_BYTES}")
    order = "<"
    nx, mode = struct.unpack_from("<i", raw, 0)[0], struct.unpack_from("<i", raw, 12)[0]
    if abs(mode) > _SWAP_TRIGGER or abs(nx) > _SWAP_TRIGGER:
        order = ">"
    nx, ny, nz, mode = struct.unpack_from(order + "4i", raw, 0)
    mx = struct.unpack_from(order + "i", raw, 28)[0]
    cell_a = struct.unpack_from(order + "f", raw, 40)[0]
    nsymbt = struct.unpack_from(order + "i", raw, 92)[0]
    for name, v in (("nx", nx), ("ny", ny), ("nz", nz)):
        if v < 1:
            raise _not_mrc(path, f"header {name} = {v}; expected >= 1")
    if mode not in MODES:
        why = {3: "complex", 4: "complex", 101: "SerialEM 4-bit"}.get(mode, "unsupported")
        raise _not_mrc(path, f"header mode = {mode} ({why}); expected one of "
                             f"{', '.join(map(str, MODES))} (real-valued voxels)")
    if nsymbt < 0:
        raise _not_mrc(path, f"header nsymbt = {nsymbt}; expected >= 0")
    itemsize = np.dtype(MODES[mode]).itemsize
    need = _HEADER_BYTES + nsymbt + nx * ny * nz * itemsize  # Python ints: no overflow
    if need > size:
        raise _not_mrc(path, f"header nx*ny*nz = {nx}*{ny}*{nz} voxels of {itemsize} byte(s) "
                             f"(mode {mode}) after {_HEADER_BYTES}+{nsymbt} header bytes need "
                             f"{need} bytes; the file has {size}")
    pix = 0.0
    if mx > 0 and np.isfinite(cell_a) and cell_a > 0:
        pix = float(cell_a) / mx
    return MrcHeader(path, nx, ny, nz, mode, nsymbt, order, pix, size)


def _check_finite(data: np.ndarray, path: Path, what: str) -> None:
    if data.dtype.kind == "f" and not np.all(np.isfinite(data)):
        n_bad = int(np.count_nonzero(~np.isfinite(data)))
        raise InputError(f"{path}: {n_bad} NaN/Inf values in {what}; expected finite values")


def read_map(path: PathLike, angpix: float | None = None) -> tuple[np.ndarray, float]:
    """Read a cubic map (or a square 2D image) and its pixel size.

    Returns (data, pixel_size): a float32 (z, y, x) or (y, x) array and Angstrom per pixel.
    `angpix` (e.g. from --angpix) replaces the header's pixel size, which may then be absent.
    Raises InputError for a missing or unreadable file, a pixel size outside 0.1..100 A
    (absent from the header and not given), a non-cubic / non-square map, or NaN/Inf voxels.
    """
    path = Path(path)
    h = read_header(path)
    if angpix is not None:
        pix = check_pixel_size(angpix, "--angpix")
    elif h.pixel_size == 0.0:
        lo, hi = PIXEL_SIZE_RANGE
        raise InputError(f"{path}: pixel size missing in header (cell a / mx not positive); "
                         f"expected {lo:g}..{hi:g} A, or give --angpix")
    else:
        pix = check_pixel_size(h.pixel_size, f"{path}: header pixel size (cell a / mx)")
    if not (h.nz == 1 and h.ny == h.nx) and not (h.nz == h.ny == h.nx):
        kind = "square image" if h.nz == 1 else "cubic map"
        raise InputError(f"{path}: map shape ({h.nz}, {h.ny}, {h.nx}) (z, y, x) is not "
                         f"supported; expected a {kind} (equal box size on every axis)")
    count = h.nx * h.ny * h.nz
    try:
        data = np.fromfile(path, dtype=h.dtype, count=count, offset=h.data_offset)
    except (OSError, ValueError) as e:
        raise InputError(f"{path}: cannot read the voxels ({e})") from None
    data = data.astype(np.float32).reshape(h.shape)
    if h.nz == 1:
        data = data[0]  # a 2D image (or a one-image stack)
    _check_finite(data, path, "map")
    return np.ascontiguousarray(data), pix


def read_half_maps(path1: PathLike, path2: PathLike, angpix: float,
                   names: tuple[str, str] | None = None
                   ) -> tuple[np.ndarray, np.ndarray, float]:
    """Two half maps of one 3D box and pixel size, and that pixel size (`angpix` > 0
    replaces the headers'); InputError naming the file (`names`: how messages name them,
    default the paths) for a 2D image, boxes or pixel sizes that differ."""
    name1, name2 = names or (str(path1), str(path2))
    h1, pix1 = read_map(path1)
    h2, pix2 = read_map(path2)
    if h1.ndim != 3:
        raise InputError(f"{name1}: shape {h1.shape} is a 2D image; expected a 3D map")
    if h2.shape != h1.shape:
        raise InputError(f"{name2}: box {h2.shape} differs from {name1} {h1.shape}; "
                         f"expected two half maps of one box")
    if angpix <= 0 and abs(pix2 - pix1) > 1e-3:
        raise InputError(f"{name2}: pixel size {pix2:g} A differs from {name1} "
                         f"({pix1:g} A); expected half maps of one pixel size (or set --angpix)")
    return h1, h2, check_pixel_size(angpix, "--angpix") if angpix > 0 else pix1


def _write_mrc(path: Path, data: np.ndarray, pixel_size: float, stack: bool) -> None:
    pix = float(pixel_size)
    if not np.isfinite(pix) or pix <= 0:
        raise InputError(f"{path}: pixel size {pixel_size!r} is not valid; expected > 0")
    with atomic_path(path) as tmp:
        # overwrite=True: mkstemp has already created the (empty) temporary file.
        with mrcfile.new(str(tmp), overwrite=True) as mrc:
            mrc.set_data(data)
            if stack:
                mrc.set_image_stack()
            mrc.voxel_size = pix
            mrc.header.origin = (0.0, 0.0, 0.0)


def write_map(path: PathLike, data: np.ndarray, pixel_size: float) -> None:
    """Write a 3D map (z, y, x) or a 2D image (y, x) as float32 MRC (mode 2), atomically."""
    path = Path(path)
    arr = np.ascontiguousarray(np.asarray(data, dtype=np.float32))
    if arr.ndim not in (2, 3):
        raise ValueError(f"{path}: write_map expects a 2D or 3D array, got shape {arr.shape}")
    _write_mrc(path, arr, pixel_size, stack=False)


def write_stack(path: PathLike, images: np.ndarray, pixel_size: float) -> None:
    """Write images (n, y, x) as a float32 MRC image stack (`.mrcs`), atomically."""
    path = Path(path)
    arr = np.ascontiguousarray(np.asarray(images, dtype=np.float32))
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise ValueError(f"{path}: write_stack expects an (n, y, x) array, got shape {arr.shape}")
    _write_mrc(path, arr, pixel_size, stack=True)


class Stack:
    """A read-only, memory-mapped MRC image stack (only the images read are loaded).

    A 2D image file is a stack of one image; a 3D file is read as a stack of its z sections
    (as RELION does for `n@file`). Use `open_stack` to create one. With
    `require_square=False` rectangular images (e.g. a tilt series) are accepted; `box` then
    raises and `shape` gives (n, ny, nx).
    """

    def __init__(self, path: PathLike, require_square: bool = True) -> None:
        self.path = Path(path)
        self.header = read_header(self.path)
        h = self.header
        if require_square and h.ny != h.nx:
            raise InputError(f"{self.path}: images are {h.nx} x {h.ny} px; expected square "
                             f"images")
        # Stacks often carry no (or a wrong) pixel size; callers take it from the STAR
        # optics table, so 0.0 here means "not in the header (or outside 0.1..100 A)".
        lo, hi = PIXEL_SIZE_RANGE
        self.pixel_size: float = h.pixel_size if lo <= h.pixel_size <= hi else 0.0
        try:
            self._data: np.ndarray | None = np.memmap(self.path, dtype=h.dtype, mode="r",
                                                      offset=h.data_offset, shape=h.shape)
        except (OSError, ValueError) as e:
            raise InputError(f"{self.path}: cannot map the images ({e})") from None

    @property
    def n_images(self) -> int:
        """Number of images in the stack."""
        return self.header.nz

    @property
    def shape(self) -> tuple[int, int, int]:
        """(n_images, ny, nx)."""
        return self.header.shape

    @property
    def box(self) -> int:
        """Image size in pixels (images are square)."""
        if self.header.ny != self.header.nx:
            raise InputError(f"{self.path}: images are {self.header.nx} x {self.header.ny} "
                             f"px; expected square images")
        return self.header.nx

    def read(self, indices: Sequence[int] | np.ndarray | int) -> np.ndarray:
        """Images at 0-based `indices`, in that order: float32 (len(indices), ny, nx).

        Raises InputError naming the file if an index is out of range or an image holds
        NaN/Inf values.
        """
        if self._data is None:
            raise ValueError(f"{self.path}: stack is closed")
        idx = np.atleast_1d(np.asarray(indices))
        if idx.size and idx.dtype.kind not in "iu":
            raise InputError(f"{self.path}: image indices must be integers, got {idx.dtype}")
        idx = idx.astype(np.int64, copy=False)
        bad = (idx < 0) | (idx >= self.n_images)
        if np.any(bad):
            raise InputError(f"{self.path}: image index {int(idx[bad][0])} (0-based) out of "
                             f"range; expected 0..{self.n_images - 1} "
                             f"({self.n_images} images)")
        ny, nx = self.header.ny, self.header.nx
        if idx.size == 0:
            return np.empty((0, ny, nx), dtype=np.float32)
        # Read each needed image once, in file order (sequential access on the memmap), then
        # scatter into the requested order.
        uniq, inverse = np.unique(idx, return_inverse=True)
        block = np.array(self._data[uniq], dtype=np.float32)
        self._release(int(uniq[0]), int(uniq[-1]))
        if not np.all(np.isfinite(block)):
            bad_img = int(uniq[~np.all(np.isfinite(block), axis=(1, 2))][0])
            raise InputError(f"{self.path}: image {bad_img + 1} (1-based) contains NaN/Inf "
                             f"pixels; expected finite values")
        return np.ascontiguousarray(block[inverse.reshape(-1)])

    def _release(self, first: int, last: int) -> None:
        """Drop the mapped pages of images first..last from this process's resident memory.
        Pages of a mapped file that were read count in the RSS until dropped: a stack larger
        than the memory budget would otherwise fill the RSS while it streams (the pages stay
        in the page cache, so reading them again costs no disk access)."""
        mm = getattr(self._data, "_mmap", None)
        if mm is None or not hasattr(mm, "madvise"):
            return
        h = self.header
        image_bytes = h.nx * h.ny * h.dtype.itemsize
        # the mapping starts at the page-aligned offset below the data (numpy's memmap)
        base = h.data_offset - h.data_offset % mmap.ALLOCATIONGRANULARITY
        start = h.data_offset - base + first * image_bytes
        stop = h.data_offset - base + (last + 1) * image_bytes
        start -= start % mmap.PAGESIZE
        try:
            mm.madvise(mmap.MADV_DONTNEED, start, min(stop, len(mm)) - start)
        except (OSError, ValueError):  # not supported here: only the RSS figure suffers
            pass

    def close(self) -> None:
        """Release the memory map (the file is unmapped once no array refers to it)."""
        self._data = None

    def __enter__(self) -> Stack:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Stack({str(self.path)!r}, shape={self.shape})"


def open_stack(path: PathLike, require_square: bool = True) -> Stack:
    """Open an MRC image stack memory-mapped read-only (works for stacks larger than RAM)."""
    return Stack(path, require_square=require_square)
