"""MRC maps and image stacks (CONVENTIONS.md section 11). The one owner of the MRC format.

- Arrays are float32, indexed (z, y, x) for volumes, (y, x) for images and (n, y, x) for stacks
  (x fastest, as in the file).
- The pixel size is the header voxel size along x (RELION: cell a / mx); a map without one is
  an error. Origin / nxstart are ignored on reading and written as 0: the centre of a box is
  always index floor(N/2).
- Written files are mode 2 (float32), mapc/mapr/maps = 1/2/3, cell = pixel size * sampling
  (mrcfile's defaults plus the voxel size). `.mrcs` stacks carry mrcfile's image-stack
  header (ispg 0, mz 1). Every write goes to a temporary file in the target folder first and
  then replaces the target, so an interrupted write never leaves a truncated map behind.
"""

from __future__ import annotations

import os
import warnings
from collections.abc import Sequence
from pathlib import Path

import mrcfile
import numpy as np

from ..errors import InputError
from .atomic import atomic_path

__all__ = ["Stack", "open_stack", "read_map", "write_map", "write_stack", "atomic_path"]

PathLike = str | os.PathLike


def _check_exists(path: Path) -> None:
    if not path.exists():
        raise InputError(f"{path}: file not found")
    if not path.is_file():
        raise InputError(f"{path}: not a regular file")


def _open_mrc(path: Path, mmap: bool):
    """Open an MRC file read-only; any format problem becomes an InputError naming the file."""
    _check_exists(path)
    opener = mrcfile.mmap if mmap else mrcfile.open
    try:
        with warnings.catch_warnings():
            # mrcfile warns (rather than fails) on minor header oddities; those are harmless
            # for reading the data, and the checks that matter are done below.
            warnings.simplefilter("ignore", RuntimeWarning)
            return opener(str(path), mode="r", permissive=False)
    except (ValueError, OSError, EOFError) as e:
        raise InputError(f"{path}: not a readable MRC file ({e})") from None


def _pixel_size(mrc, path: Path, required: bool) -> float:
    """Header pixel size (voxel_size.x = cell a / mx); 0.0 when absent and not required."""
    try:
        pix = float(mrc.voxel_size.x)
    except (ZeroDivisionError, FloatingPointError):  # mx == 0
        pix = 0.0
    if not np.isfinite(pix) or pix <= 0:
        if required:
            raise InputError(f"{path}: pixel size missing in header (cell a / mx = {pix}); "
                             f"expected a positive voxel size")
        return 0.0
    return pix


def _check_finite(data: np.ndarray, path: Path, what: str) -> None:
    if data.dtype.kind == "f" and not np.all(np.isfinite(data)):
        n_bad = int(np.count_nonzero(~np.isfinite(data)))
        raise InputError(f"{path}: {n_bad} NaN/Inf values in {what}; expected finite values")


def read_map(path: PathLike) -> tuple[np.ndarray, float]:
    """Read a cubic map (or square 2D image) and its pixel size.

    Returns (data, pixel_size): float32 (z, y, x) or (y, x) array and Angstrom per pixel.
    Raises InputError for a missing/non-MRC file, a missing pixel size, a non-cubic/non-square
    map or NaN/Inf voxels.
    """
    path = Path(path)
    with _open_mrc(path, mmap=False) as mrc:
        pix = _pixel_size(mrc, path, required=True)
        data = np.asarray(mrc.data, dtype=np.float32)
    if data.ndim == 3 and data.shape[0] == 1:
        data = data[0]  # a 2D image written as a one-image stack
    if data.ndim not in (2, 3) or len(set(data.shape)) != 1:
        kind = "cubic map" if data.ndim == 3 else "square image"
        raise InputError(f"{path}: map shape {tuple(data.shape)} (z, y, x) is not supported; "
                         f"expected a {kind} (equal box size on every axis)")
    _check_finite(data, path, "map")
    return np.ascontiguousarray(data), pix


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
    (as RELION does for `n@file`). Use `open_stack` to create one.
    """

    def __init__(self, path: PathLike) -> None:
        self.path = Path(path)
        self._mrc = _open_mrc(self.path, mmap=True)
        try:
            data = self._mrc.data
            if data is None or data.ndim not in (2, 3):
                shape = None if data is None else data.shape
                raise InputError(f"{self.path}: no image data (shape {shape}); "
                                 f"expected a 2D image or an image stack")
            self._data = data[None] if data.ndim == 2 else data
            ny, nx = self._data.shape[1:]
            if ny != nx:
                raise InputError(f"{self.path}: images are {nx} x {ny} px; expected square "
                                 f"images")
            # Stacks often carry no (or a wrong) pixel size; callers take it from the STAR
            # optics table, so 0.0 here means "not in header" rather than an error.
            self.pixel_size: float = _pixel_size(self._mrc, self.path, required=False)
        except BaseException:
            self._mrc.close()
            raise

    @property
    def n_images(self) -> int:
        """Number of images in the stack."""
        return int(self._data.shape[0])

    @property
    def box(self) -> int:
        """Image size in pixels (images are square)."""
        return int(self._data.shape[-1])

    def read(self, indices: Sequence[int] | np.ndarray | int) -> np.ndarray:
        """Images at 0-based `indices`, in that order: float32 (len(indices), box, box).

        Raises InputError naming the file if an index is out of range or an image holds
        NaN/Inf values.
        """
        if self._mrc is None:
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
        if idx.size == 0:
            return np.empty((0, self.box, self.box), dtype=np.float32)
        # Read each needed image once, in file order (sequential access on the memmap), then
        # scatter into the requested order.
        uniq, inverse = np.unique(idx, return_inverse=True)
        block = np.asarray(self._data[uniq], dtype=np.float32)
        if not np.all(np.isfinite(block)):
            bad_img = int(uniq[~np.all(np.isfinite(block), axis=(1, 2))][0])
            raise InputError(f"{self.path}: image {bad_img + 1} (1-based) contains NaN/Inf "
                             f"pixels; expected finite values")
        return np.ascontiguousarray(block[inverse.reshape(-1)])

    def close(self) -> None:
        """Release the memory map and the file handle."""
        if self._mrc is not None:
            self._data = None
            self._mrc.close()
            self._mrc = None

    def __enter__(self) -> Stack:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return (f"Stack({str(self.path)!r}, n_images={self.n_images if self._mrc else '?'}, "
                f"box={self.box if self._mrc else '?'})")


def open_stack(path: PathLike) -> Stack:
    """Open an MRC image stack memory-mapped read-only (works for stacks larger than RAM)."""
    return Stack(path)
