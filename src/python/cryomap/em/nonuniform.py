"""Non-uniform refinement's regulariser (`refine --nu`; docs/method.md, "Non-uniform
refinement"): each half map is low-passed region by region to the resolution its own data
support there.

One global tau2 per shell over-smooths a rigid core and under-smooths what is disordered or
moves (a micelle, a flexible domain); the noise left in those regions then pulls the
alignment of the whole particle. Here, every iteration, each half-set's particles are split
into two fixed folds whose sums are back-projected apart (the engine's passes), so each half
has two independent quarter maps. Their local FSC (`locres.local_fsc`, soft spherical
windows on a grid inside the particle mask, each transformed at its own small size:
`compact`), turned into the FSC the whole half would have,
F_half = 2 F / (1 + F) (two folds' worth of data, as the FSC of joined halves), gives a local
resolution at FSC 0.143 per window, blended to every voxel (`locres.local_resolution`). The
half's regularised map is then low-passed voxel by voxel to it
(`locres.filter_to_local_resolution`) and is the next E-step's reference.

Each half's filter comes from that half's particles alone, so the two halves stay
independent and their FSC stays a gold-standard measure.

With a point group (--sym) the local FSC is computed at one window per symmetry orbit
(`orbit_representatives`), and every window stands at its symmetry copies (the same local
FSC there) before the blend, so the local resolution, and with it the filtered map, has the
group's symmetry: the quarter maps are symmetric, but the windows' randomised phases and a
grid of centres that is not the group's would otherwise filter symmetry copies apart. With a
solvent mask (--solvent_mask) the windows are centred inside it instead of inside the
particle sphere (RELION's locres: the mask picks the sample points), so solvent windows do
not pull the particle's edge coarser; both masks bound the centres only, the quarter maps
are not masked.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np

from .. import fourier, locres
from ..masks import soft_sphere
from ..symmetry import operators

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


def _copies(centres: np.ndarray, ops: np.ndarray, box: int) -> np.ndarray:
    """(K, g, 3) voxel indices (z, y, x) of R c about the box centre for each centre c (K, 3)
    (z, y, x) and operator R, rounded to the voxel."""
    o = fourier.origin(box)
    xyz = centres[:, ::-1].astype(np.float64) - o
    return np.rint(np.einsum("gij,kj->kgi", ops, xyz)[..., ::-1] + o).astype(np.int64)


def symmetry_copies(lfsc: locres.LocalFSC, sym: str) -> locres.LocalFSC:
    """The local FSC with every window repeated at its copies R c about the box centre (R
    over the point group's operators, centres rounded to the voxel: exact for operators that
    permute the grid, such as Cn's and Dn's 2- and 4-folds about the axes), each with its
    curves. Blended (`locres.local_resolution`) they give a symmetric field: the union of
    copies is the same set after any operator. C1: unchanged."""
    ops = operators(sym)
    if len(ops) == 1:
        return lfsc
    copies = _copies(lfsc.centres, ops, lfsc.box).transpose(1, 0, 2)  # (g, K, 3)
    g = len(ops)
    return replace(lfsc, centres=copies.reshape(-1, 3), fsc=np.tile(lfsc.fsc, (g, 1)),
                   fsc_masked=np.tile(lfsc.fsc_masked, (g, 1)),
                   fsc_random=np.tile(lfsc.fsc_random, (g, 1)))


def orbit_representatives(centres: np.ndarray, sym: str, box: int) -> np.ndarray:
    """One centre (K, 3) (z, y, x) per symmetry orbit among `centres`: a centre is kept unless
    an earlier kept one has it among its copies R c (rounded to the voxel, as
    `symmetry_copies`). The quarter maps are symmetric, so a window's local FSC at a copy is
    its own (up to the randomised phases): computing one window per orbit and placing it at
    all its copies (`symmetry_copies`) costs 1/|G| of them all for groups whose operators
    permute the grid (O: 24 times fewer windows). C1: all of them."""
    ops = operators(sym)
    if len(ops) == 1:
        return centres
    copies = _copies(centres, ops, box)
    index = {tuple(c): i for i, c in enumerate(centres.tolist())}
    covered = np.zeros(len(centres), bool)
    keep = []
    for i in range(len(centres)):
        if covered[i]:
            continue
        keep.append(i)
        for c in copies[i].tolist():
            j = index.get(tuple(c))
            if j is not None:
                covered[j] = True
    return centres[keep]


def filter_half(volume: np.ndarray, quarters: np.ndarray, pixel_size: float,
                mask_radius_px: float, threads: int = 1, *, sym: str = "C1",
                solvent_mask: np.ndarray | None = None) -> NonUniformFilter:
    """The half's regularised map `volume` low-passed to the local resolution of its two
    quarter maps (2, N, N, N): windows centred inside the particle mask, or inside
    `solvent_mask` (N, N, N) when given, and symmetric under the point group `sym` (module
    docstring)."""
    box = volume.shape[0]
    step = max(2, int(round(SAMPLING_ANGSTROM / pixel_size)))
    radius = 0.5 * step  # RELION's default window: flat to half the sampling ...
    centres_in = (soft_sphere(box, mask_radius_px, 0.0, 3) if solvent_mask is None
                  else solvent_mask)
    centres = orbit_representatives(locres.sample_points(box, step, radius, centres_in), sym,
                                    box)
    lfsc = locres.local_fsc(quarters[0], quarters[1], pixel_size, radius, step,
                            mask=centres_in, edge_px=float(step), threads=threads,
                            compact=True, centres=centres)
    lfsc = symmetry_copies(replace(lfsc, fsc=half_fsc(lfsc.fsc)), sym)
    resolution = locres.local_resolution(lfsc, min_resolution=MIN_RESOLUTION)
    filtered = locres.filter_to_local_resolution(volume, resolution, pixel_size,
                                                 threads=threads, single=True)
    return NonUniformFilter(np.where(resolution > 0, filtered, volume), resolution)
