"""Non-uniform refinement's regulariser (`refine --nu`; docs/method.md, "Non-uniform
refinement"): each half map is low-passed region by region to the resolution its own data
support there.

One global tau2 per shell over-smooths a rigid core and under-smooths what is disordered or
moves (a micelle, a flexible domain); the noise left in those regions then pulls the
alignment of the whole particle. Here, every iteration, each half-set's particles are split
into two fixed folds whose sums are back-projected apart (the engine's passes), so each half
has two independent quarter maps. Their local FSC (`locres.local_fsc`, soft spherical windows
on a grid inside the particle mask), turned into the FSC the whole half would have,
F_half = 2 F / (1 + F) (two folds' worth of data, as the FSC of joined halves), gives a local
resolution at FSC 0.143 per window, blended to every voxel (`locres.local_resolution`). The
half's regularised map is then low-passed voxel by voxel to it
(`locres.filter_to_local_resolution`) and is the next E-step's reference.

Each half's filter comes from that half's particles alone, so the two halves stay
independent and their FSC stays a gold-standard measure.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from .. import locres
from ..masks import soft_sphere

#: Window spacing (Å) of the local FSC, RELION's --locres_sampling default.
SAMPLING_ANGSTROM = 25.0
#: No region is filtered coarser than this (Å).
MIN_RESOLUTION = 50.0


@dataclass(frozen=True)
class NonUniformFilter:
    """One half's local filter: the filtered map and the local resolution (Å per voxel, 0
    where no window reaches; those voxels keep the regularised map)."""

    volume: np.ndarray
    local_resolution: np.ndarray

    def percentiles(self, q: tuple[float, ...] = (10.0, 50.0, 90.0)) -> np.ndarray:
        """Percentiles (Å) of the local resolution where it was estimated."""
        known = self.local_resolution[self.local_resolution > 0]
        return np.percentile(known, q) if known.size else np.full(len(q), np.nan)


def fold_of_particles(n: int, seed: int) -> np.ndarray:
    """(n,) 1 or 2: the fold of each particle within its half-set (fixed for a run)."""
    return np.random.default_rng([int(seed), 4711]).integers(1, 3, size=n)


def half_fsc(quarter_fsc: np.ndarray) -> np.ndarray:
    """The FSC of maps from twice the data, from that of two independent quarter maps
    (F' = 2F / (1 + F), clipped to [0, 1])."""
    f = np.clip(quarter_fsc, 0.0, 1.0)
    return 2.0 * f / (1.0 + f)


def filter_half(volume: np.ndarray, quarters: np.ndarray, pixel_size: float,
                mask_radius_px: float, threads: int = 1) -> NonUniformFilter:
    """The half's regularised map `volume` low-passed to the local resolution of its two
    quarter maps (2, N, N, N), within the particle mask (module docstring)."""
    box = volume.shape[0]
    step = max(2, int(round(SAMPLING_ANGSTROM / pixel_size)))
    radius = 0.5 * step  # RELION's default window: flat to half the sampling ...
    sphere = soft_sphere(box, mask_radius_px, 0.0, 3)  # windows centred inside it
    lfsc = locres.local_fsc(quarters[0], quarters[1], pixel_size, radius, step, mask=sphere,
                            edge_px=float(step), threads=threads)
    lfsc = replace(lfsc, fsc=half_fsc(lfsc.fsc))
    resolution = locres.local_resolution(lfsc, min_resolution=MIN_RESOLUTION)
    filtered = locres.filter_to_local_resolution(volume, resolution, pixel_size)
    return NonUniformFilter(np.where(resolution > 0, filtered, volume), resolution)
