"""`Volume`: a map (or a 2D image) with its pixel size, the object the Python API passes maps
around as (docs/api.md).

Conventions as everywhere in cryomap (docs/conventions.md): arrays are (z, y, x), the centre
voxel is floor(N/2), projections follow relion_project.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["Volume", "FSC"]

PathLike = str | os.PathLike


@dataclass
class FSC:
    """A Fourier shell correlation curve: `curve[s]` for shells s = 0..N/2 (shell s is the
    resolution N * pixel_size / s Å)."""

    curve: np.ndarray
    box: int
    pixel_size: float

    @property
    def resolution_angstrom(self) -> np.ndarray:
        """Resolution (Å) of each shell (inf for shell 0)."""
        s = np.arange(self.curve.size, dtype=np.float64)
        with np.errstate(divide="ignore"):
            return self.box * self.pixel_size / s

    def resolution(self, threshold: float = 0.143) -> float:
        """Resolution (Å) of the last shell before the curve first drops below `threshold`
        (RELION's rule, resolution.resolution_angstrom, as refinement reports it): 0.143 for two
        half maps, 0.5 against a known map."""
        from .resolution import resolution_angstrom

        return resolution_angstrom(self.curve, self.box, self.pixel_size, threshold)


@dataclass
class Volume:
    """A cubic map (N, N, N) in (z, y, x) order, or a square image (N, N), with its pixel
    size in Å.

    Build one from an array (`Volume(array, pixel_size)`), a file (`Volume.read`), or the
    built-in test molecule (`Volume.phantom`). Results of `refine`, `classify3d`, `classify2d`,
    `reconstruct` and `simulate` hold their maps as Volumes.
    """

    data: np.ndarray
    pixel_size: float

    def __post_init__(self) -> None:
        self.data = np.asarray(self.data)
        if self.data.ndim not in (2, 3) or len(set(self.data.shape)) != 1:
            raise ValueError(f"Volume: expected a cubic map or a square image, got shape "
                             f"{self.data.shape}")
        self.pixel_size = float(self.pixel_size)
        if not (np.isfinite(self.pixel_size) and self.pixel_size > 0):
            raise ValueError(f"Volume: pixel size {self.pixel_size}: expected > 0 Å")

    # -- construction and files ---------------------------------------------------------------

    @classmethod
    def read(cls, path: PathLike, angpix: float | None = None) -> Volume:
        """A map or image from an MRC file; `angpix` replaces (or supplies) the header's pixel
        size. Raises cryomap.errors.InputError naming the file for anything unreadable."""
        from .io.mrc import read_map

        data, pix = read_map(path, angpix=angpix)
        return cls(data, pix)

    @classmethod
    def phantom(cls, box: int = 64, pixel_size: float = 3.0, seed: int = 0,
                variant: int = 0, scale: float = 1.0) -> Volume:
        """The built-in chiral test molecule (`cryomap.phantom`): variant 0 is the full
        molecule, 1-3 related maps for classification; scale 2.1 is ribosome-sized."""
        from .phantom import make_phantom_variant

        return cls(make_phantom_variant(variant, box, pixel_size, seed, scale), pixel_size)

    def save(self, path: PathLike) -> Path:
        """Write the map as float32 MRC with its pixel size (atomically); returns the path."""
        from .io.mrc import write_map

        write_map(path, self.data, self.pixel_size)
        return Path(path)

    write = save

    # -- access -------------------------------------------------------------------------------

    def asnumpy(self) -> np.ndarray:
        """The voxels as a numpy array (the array itself, not a copy)."""
        return self.data

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        return self.data if dtype is None else self.data.astype(dtype)

    @property
    def box(self) -> int:
        """Box size in pixels."""
        return int(self.data.shape[0])

    @property
    def ndim(self) -> int:
        """3 for a map, 2 for an image."""
        return int(self.data.ndim)

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.data.shape)

    def __repr__(self) -> str:
        return (f"Volume(box={self.box}, ndim={self.ndim}, pixel_size={self.pixel_size:g} Å, "
                f"dtype={self.data.dtype})")

    # -- operations ---------------------------------------------------------------------------

    def lowpass(self, resolution: float, edge_width: int = 2) -> Volume:
        """The map low-pass filtered at `resolution` Å with RELION's raised-cosine edge of
        `edge_width` shells (fourier.lowpass_map)."""
        from .fourier import lowpass_map

        if not (np.isfinite(resolution) and resolution > 0):
            raise ValueError(f"lowpass: resolution {resolution}: expected > 0 Å")
        out = lowpass_map(self.data, resolution, self.pixel_size, edge_width)
        return Volume(out.astype(np.float32), self.pixel_size)

    def fsc(self, other: Volume | np.ndarray) -> FSC:
        """Fourier shell correlation with another map of the same box (resolution.fsc_maps);
        `.resolution(0.143)` for half maps, `.resolution(0.5)` against a known map."""
        from .resolution import fsc_maps

        other_data = other.data if isinstance(other, Volume) else np.asarray(other)
        if self.ndim != 3 or other_data.shape != self.data.shape:
            raise ValueError(f"fsc: expected two cubic maps of one box, got {self.shape} and "
                             f"{other_data.shape}")
        curve = fsc_maps(np.asarray(self.data, np.float64), np.asarray(other_data, np.float64))
        return FSC(curve, self.box, self.pixel_size)

    def project(self, angles: np.ndarray, origins_px: np.ndarray | None = None,
                ctf=None, pad: int = 2, interp: str = "linear") -> np.ndarray:
        """Projections as relion_project makes them: float32 (n, N, N) for Euler angles
        (n, 3) (rot, tilt, psi, degrees), origins (n, 2) px, an optional ctf.CtfParams
        (simulate.project_images)."""
        from .simulate import project_images

        if self.ndim != 3:
            raise ValueError("project: expected a 3D map")
        return project_images(np.asarray(self.data, np.float32), np.asarray(angles, float),
                              origins_px, ctf, self.pixel_size if ctf is not None else None,
                              pad=pad, interp=interp)
