"""`InMemoryParticleSet`: a particle set whose images are a numpy array instead of MRC stacks,
so that a pipeline can stay in memory (docs/api.md).

It is a `particles.ParticleSet` (the same optics and particle tables, RELION's labels, the
same checks), with `read_images` taken from the array. `save` writes it as a RELION particle
file and stack, so that it can be handed to the command line.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import InputError
from .particles import Indices, ParticleSet, _check_loaded, make_optics_table, write_particles

__all__ = ["InMemoryParticleSet", "MEMORY_STACK"]

PathLike = str | os.PathLike

#: Stack name the in-memory images are given in rlnImageName (`n@particles.mrcs`); `save`
#: writes the stack under this name next to the STAR file.
MEMORY_STACK = "particles.mrcs"
#: What error messages name as the "file" of in-memory particles.
MEMORY_NAME = "<in-memory particles>"


@dataclass(eq=False)
class InMemoryParticleSet(ParticleSet):
    """A ParticleSet whose images are `images` (n, N, N) float32, row i of the particle table
    being image i. Build one with `from_arrays`."""

    images: np.ndarray | None = field(default=None, repr=False)

    @classmethod
    def from_arrays(cls, images: np.ndarray, pixel_size: float,
                    table: pd.DataFrame | None = None, optics: pd.DataFrame | None = None,
                    voltage: float = 300.0, cs: float = 2.7,
                    amplitude_contrast: float = 0.1) -> InMemoryParticleSet:
        """Particles from images (n, N, N) and an optional per-particle table (RELION labels:
        rlnDefocusU/V/Angle for the CTF, rlnAngleRot/Tilt/Psi and rlnOriginX/YAngst for poses,
        rlnRandomSubset for half-sets, ...; one row per image, in order). `optics`: a RELION
        optics table; default one group of `pixel_size`, the images' box and the given
        voltage (kV), Cs (mm) and amplitude contrast. Every value is checked as when a file is
        read (InputError, one line)."""
        imgs = np.asarray(images)
        if imgs.ndim != 3 or imgs.shape[1] != imgs.shape[2] or imgs.shape[0] < 1:
            raise InputError(f"{MEMORY_NAME}: images of shape {imgs.shape}; expected "
                             f"(n, N, N) square images, n >= 1")
        if not np.all(np.isfinite(imgs)):
            raise InputError(f"{MEMORY_NAME}: NaN/Inf pixels in the images; expected finite "
                             f"values")
        n, box = imgs.shape[0], imgs.shape[1]
        if optics is None:
            optics = make_optics_table(pixel_size, box, voltage, cs, amplitude_contrast)
        table = pd.DataFrame(index=pd.RangeIndex(n)) if table is None \
            else table.reset_index(drop=True).copy()
        if len(table) != n:
            raise InputError(f"{MEMORY_NAME}: {len(table)} table rows for {n} images; "
                             f"expected one row per image")
        table["rlnImageName"] = [f"{i + 1:06d}@{MEMORY_STACK}" for i in range(n)]
        if "rlnOpticsGroup" not in table.columns:
            table["rlnOpticsGroup"] = 1
        ps = cls(optics=optics.reset_index(drop=True).copy(), particles=table,
                 star_path=Path(MEMORY_NAME), search_dirs=[],
                 images=np.ascontiguousarray(imgs, dtype=np.float32))
        _check_loaded(ps)
        boxes = ps.boxes
        if np.any(boxes != box):
            raise InputError(f"{MEMORY_NAME}: data_optics rlnImageSize "
                             f"{', '.join(map(str, boxes))} but the images are {box} px; "
                             f"expected the images' box")
        return ps

    def read_images(self, indices: Indices) -> np.ndarray:
        """Images of the particles at `indices`, in that order: float32 (n, N, N)."""
        return self.images[self._rows(indices)]

    def image_paths(self, indices: Indices = None) -> list[Path | None]:
        """No files: None for every particle."""
        return [None] * self._rows(indices).size

    def select(self, rows: np.ndarray) -> InMemoryParticleSet:
        """The particles at `rows` (0-based), as a new in-memory set."""
        rows = self._rows(rows)
        return InMemoryParticleSet(optics=self.optics, particles=self.particles.iloc[rows]
                                   .reset_index(drop=True), star_path=self.star_path,
                                   search_dirs=[], notes=list(self.notes),
                                   images=self.images[rows])

    def save(self, path: PathLike) -> Path:
        """Write the particles as a RELION 3.1 STAR file `path` and their images as the stack
        `particles.mrcs` next to it (rlnImageName names the stack as seen from the working
        folder, as RELION writes it). Returns the STAR file's path."""
        from .io.mrc import write_stack

        path = Path(path)
        stack = path.parent / MEMORY_STACK
        try:
            name = stack.absolute().relative_to(Path.cwd())
        except ValueError:  # outside the working folder: an absolute path
            name = stack.absolute()
        table = self.particles.copy()
        table["rlnImageName"] = [f"{i + 1:06d}@{name}" for i in range(self.n_particles)]
        path.parent.mkdir(parents=True, exist_ok=True)
        write_stack(stack, self.images, self.pixel_size)
        write_particles(path, self.optics, table)
        return path
