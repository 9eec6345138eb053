"""Local resolution by local FSC between two half maps (RELION's relion_postprocess --locres;
docs/locres.md).

1. `sample_points`: centres on a cubic grid of spacing `step_px` through the box centre
   floor(N/2), closer to it than N/2 - window radius (RELION's sphere) and, with a mask,
   inside it (every grid cell holding a mask voxel >= 0.5).
2. `local_fsc`: at each centre, both half maps times a soft spherical window (flat to the
   radius, raised-cosine edge; `masks.soft_sphere`), their FSC (`resolution.fsc`), and the FSC
   of the same window over half maps whose phases are randomised beyond `randomize_at` Å
   (`postprocess.randomise_phases`); the window's own correlation is removed as RELION does
   (`postprocess.corrected_fsc`, Chen et al. 2013).
3. `LocalFSC.resolutions`: per window, the resolution where the corrected FSC drops below the
   threshold (`resolution.resolution_angstrom`, the package's convention), capped at
   `min_resolution` Å.
4. `local_resolution`: every voxel gets the weighted mean of the nearby windows' 1/resolution
   (RELION averages in frequency), weights those of RELION's default window of the sampling
   (flat to step/2, raised cosine to 3 step/2), so every voxel of a sampled cell is covered
   whatever the FSC window; 0 where no window reaches or the mask is 0.
5. `filter_to_local_resolution`: a map low-passed per voxel to its local resolution, blended
   from a ladder of maps low-passed at whole shells (`fourier.lowpass_weights`).

The LocalFSC curves are the shared machinery: a non-uniform-refinement regulariser can take
them (or `local_resolution`) per region without the command line.
"""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import scipy.fft

from . import fourier
from .errors import InputError
from .masks import check_mask, soft_sphere
from .postprocess import corrected_fsc, randomise_phases
from .resolution import FSC_THRESHOLD, fsc, resolution_angstrom

#: RELION's defaults (Å): --locres_sampling, --locres_randomize_at, --locres_minres.
DEFAULT_SAMPLING = 25.0
DEFAULT_RANDOMIZE_AT = 25.0
DEFAULT_MIN_RESOLUTION = 50.0


@dataclass(frozen=True)
class LocalFSC:
    """FSC curves of windowed half maps, one per sample point, shells 0..N/2."""

    box: int
    pixel_size: float
    centres: np.ndarray  # (K, 3) voxel indices (z, y, x) of the window centres
    fsc: np.ndarray  # (K, N//2+1) corrected FSC (RELION's fsc_true)
    fsc_masked: np.ndarray  # (K, N//2+1) FSC of the windowed half maps
    fsc_random: np.ndarray  # (K, N//2+1) the same with phases randomised beyond the shell
    radius_px: float  # window: flat to this radius ...
    edge_px: float  # ... then a raised cosine this wide
    step_px: int  # grid spacing of the centres
    randomise_shell: int  # phases randomised from this shell on

    def resolutions(self, threshold: float = FSC_THRESHOLD,
                    min_resolution: float = DEFAULT_MIN_RESOLUTION) -> np.ndarray:
        """Per window, the resolution (Å) where the corrected FSC drops below `threshold`
        (`resolution.resolution_angstrom`), no coarser than `min_resolution` (RELION's
        --locres_minres)."""
        res = [resolution_angstrom(c, self.box, self.pixel_size, threshold) for c in self.fsc]
        return np.minimum(np.asarray(res, dtype=np.float64), float(min_resolution))


def _check_maps(half1: np.ndarray, half2: np.ndarray, mask: np.ndarray | None) -> None:
    if half1.ndim != 3 or len(set(half1.shape)) != 1:
        raise InputError(f"half1: map shape {half1.shape}; expected a cubic 3D map")
    if half2.shape != half1.shape:
        raise InputError(f"half2: box {half2.shape} differs from half1's {half1.shape}; "
                         f"expected two half maps of one box")
    if mask is not None:
        check_mask(mask, half1.shape, "mask")


def _check_geometry(box: int, radius_px: float, edge_px: float, step_px: int) -> None:
    if not (np.isfinite(radius_px) and 0 < radius_px < box / 2):
        raise InputError(f"window radius {radius_px:g} px: expected > 0 and less than half "
                         f"the box ({box / 2:g} px)")
    if not (np.isfinite(edge_px) and edge_px >= 0):
        raise InputError(f"window edge {edge_px:g} px: expected >= 0")
    if int(step_px) != step_px or step_px < 1:
        raise InputError(f"step {step_px} px: expected a whole number >= 1")


def _patch_slices(box: int, centre, half: int) -> tuple[tuple[slice, ...], tuple[slice, ...]]:
    """Slices of a box and of a (2 half + 1)^3 patch centred on `centre`, clipped to the box."""
    dst, src = [], []
    for c in centre:
        lo, hi = int(c) - half, int(c) + half + 1
        dst.append(slice(max(lo, 0), min(hi, box)))
        src.append(slice(max(lo, 0) - lo, min(hi, box) - lo))
    return tuple(dst), tuple(src)


def _sphere_patch(radius_px: float, edge_px: float) -> tuple[np.ndarray, int]:
    """`masks.soft_sphere` on the smallest odd cube that holds it, and its half width."""
    half = int(np.ceil(radius_px + edge_px)) + 1
    return soft_sphere(2 * half + 1, radius_px, edge_px, ndim=3), half


def window(box: int, centre, radius_px: float, edge_px: float) -> np.ndarray:
    """The soft spherical window (`masks.soft_sphere`: 1 to radius_px, raised cosine to
    radius_px + edge_px, 0 beyond) centred on voxel `centre` (z, y, x) of a box^3 grid."""
    patch, half = _sphere_patch(radius_px, edge_px)
    out = np.zeros((box,) * 3)
    dst, src = _patch_slices(box, centre, half)
    out[dst] = patch[src]
    return out


def grid_axis(box: int, step_px: int) -> np.ndarray:
    """Voxel indices of the sample grid on one axis: floor(N/2) + j step inside the box."""
    o = fourier.origin(box)
    return np.arange(o - (o // step_px) * step_px, box, step_px)


def sample_points(box: int, step_px: int, radius_px: float,
                  mask: np.ndarray | None = None) -> np.ndarray:
    """Window centres (K, 3) (z, y, x) on the grid of `grid_axis`: the grid points closer to
    the box centre than N/2 - radius_px (RELION's sphere: the flat part of every window lies
    inside the box) and, with a mask, whose cell (the voxels nearer to them than to any other
    grid point, per axis) holds a mask voxel >= 0.5."""
    ax = grid_axis(box, step_px)
    zz, yy, xx = np.meshgrid(ax, ax, ax, indexing="ij")
    pts = np.stack([zz.ravel(), yy.ravel(), xx.ravel()], axis=1)
    o = fourier.origin(box)
    keep = np.sqrt(((pts - o) ** 2).sum(axis=1)) < box / 2 - radius_px
    if mask is not None:
        # Nearest grid point of every voxel, per axis (clipped to the points inside the box).
        nearest = np.clip(np.floor((np.arange(box) - ax[0]) / step_px + 0.5).astype(np.int64), 0,
                          ax.size - 1)
        z, y, x = np.nonzero(np.asarray(mask) >= 0.5)
        cell = (nearest[z] * ax.size + nearest[y]) * ax.size + nearest[x]
        keep &= np.bincount(cell, minlength=ax.size ** 3) > 0
    return pts[keep]


def local_fsc(half1: np.ndarray, half2: np.ndarray, pixel_size: float, window_radius_px: float,
              step_px: int, mask: np.ndarray | None = None, *, edge_px: float | None = None,
              randomize_at: float = DEFAULT_RANDOMIZE_AT, seed: int = 0,
              threads: int = 1, compact: bool = False,
              centres: np.ndarray | None = None) -> LocalFSC:
    """Local FSC curves of two half maps (module docstring, steps 1-2).

    window_radius_px: flat radius of the soft window; edge_px its raised-cosine edge
    (default step_px, RELION's --locres_edgwidth default); randomize_at: phases of both halves
    are randomised from shell int(N pixel / randomize_at) on (RELION's
    --locres_randomize_at); threads: windows computed concurrently (the FFTs release
    the GIL); compact: each windowed patch is transformed at the smallest even size that
    holds it rather than at the box (RELION's), and its curves are interpolated linearly in
    frequency to the box's shells. The patch fits, so its transform is the box's sampled
    more coarsely, with the same information; 8 times faster at a 64-px box of 5 Å/px,
    6 times at 128 px of 1.5 Å/px (non-uniform refinement's filter, every iteration);
    centres: (K, 3) voxel indices (z, y, x) of the windows to compute, instead of
    `sample_points(N, step_px, radius, mask)` (e.g. some of them). Raises InputError for
    maps of different boxes, a bad mask or geometry.
    """
    h1 = np.asarray(half1, dtype=np.float64)
    h2 = np.asarray(half2, dtype=np.float64)
    _check_maps(h1, h2, mask)
    n = h1.shape[0]
    edge = float(step_px if edge_px is None else edge_px)
    _check_geometry(n, float(window_radius_px), edge, step_px)
    rshell = int(n * pixel_size / randomize_at)
    if not 1 <= rshell <= n // 2:
        raise InputError(f"randomize_at {randomize_at:g} A: shell {rshell}; expected "
                         f"{2 * pixel_size:g}..{n * pixel_size:g} A (shells 1..{n // 2})")
    if centres is None:
        centres = sample_points(n, int(step_px), float(window_radius_px), mask)
    centres = np.asarray(centres, dtype=np.int64).reshape(-1, 3)
    r1 = randomise_phases(h1, rshell, seed=seed)
    r2 = randomise_phases(h2, rshell, seed=seed + 1)
    n_shells = n // 2 + 1
    patch, half = _sphere_patch(float(window_radius_px), edge)
    m = min(n, patch.shape[0] + patch.shape[0] % 2) if compact else n
    shells = fourier.shell_index_3d(m)
    at_box_shells = np.arange(n_shells) * (m / n)  # box shell j is frequency j / n

    def one(centre: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        dst, src = _patch_slices(n, centre, half)
        w = patch[src]
        curves = []
        for a, b in ((h1, h2), (r1, r2)):
            # The FT of the windowed patch zero-padded to N^3 (numpy transforms axis by axis,
            # the first passes over the patch's rows only) is that of the windowed map moved
            # by one shift, the same for both maps: their FSC (shell sums of F1 F2* and
            # |F|^2) is unchanged. Any size m that holds the patch samples the same transform
            # (compact: more coarsely).
            fa = scipy.fft.rfftn(a[dst] * w, s=(m, m, m), axes=(0, 1, 2))
            fb = scipy.fft.rfftn(b[dst] * w, s=(m, m, m), axes=(0, 1, 2))
            curve = fsc(fa, fb, shells, m // 2 + 1)
            curves.append(curve if m == n else
                          np.interp(at_box_shells, np.arange(m // 2 + 1), curve))
        return curves[0], curves[1]

    with ThreadPoolExecutor(max_workers=max(1, int(threads))) as pool:
        results = list(pool.map(one, centres))
    masked = np.array([m for m, _ in results]).reshape(len(centres), n_shells)
    rand = np.array([r for _, r in results]).reshape(len(centres), n_shells)
    true = np.array([corrected_fsc(m, r, rshell) for m, r in zip(masked, rand, strict=True)])
    return LocalFSC(box=n, pixel_size=float(pixel_size), centres=centres,
                    fsc=true.reshape(len(centres), n_shells), fsc_masked=masked,
                    fsc_random=rand, radius_px=float(window_radius_px), edge_px=edge,
                    step_px=int(step_px), randomise_shell=rshell)


def interpolate_samples(centres: np.ndarray, values: np.ndarray, box: int, step_px: int
                        ) -> tuple[np.ndarray, np.ndarray]:
    """Weighted mean of per-sample `values` at every voxel, and the sum of weights (0 where
    no sample reaches). Weights: RELION's default local-resolution window of the sampling,
    flat to step/2 and a raised cosine to 3 step/2 (`window`), so neighbouring samples
    blend smoothly and every voxel within sqrt(3)/2 step of a sample has weight >= 0.6."""
    patch, half = _sphere_patch(0.5 * step_px, float(step_px))
    # Samples at one voxel (a point group's copies of a grid) share one patch: sum v, count.
    unique, which = np.unique(np.asarray(centres, dtype=np.int64).reshape(-1, 3), axis=0,
                              return_inverse=True)
    which = which.ravel()
    sums = np.bincount(which, weights=np.asarray(values, dtype=np.float64).ravel(),
                       minlength=len(unique))
    counts = np.bincount(which, minlength=len(unique)).astype(np.float64)
    num = np.zeros((box,) * 3)
    den = np.zeros((box,) * 3)
    for c, v, k in zip(unique, sums, counts, strict=True):
        dst, src = _patch_slices(box, c, half)
        num[dst] += v * patch[src]
        den[dst] += k * patch[src]
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)
    return mean, den


def local_resolution(lfsc: LocalFSC, threshold: float = FSC_THRESHOLD,
                     min_resolution: float = DEFAULT_MIN_RESOLUTION,
                     mask: np.ndarray | None = None) -> np.ndarray:
    """Local resolution (Å) at every voxel (module docstring, steps 3-4): the windows'
    resolutions averaged in frequency (1/Å) with `interpolate_samples`; 0 where no window
    reaches and, with a mask, where the mask is 0 (< 1e-6)."""
    res = lfsc.resolutions(threshold, min_resolution)
    freq, weight = interpolate_samples(lfsc.centres, 1.0 / res, lfsc.box, lfsc.step_px)
    out = np.where(weight > 0, 1.0 / np.where(freq > 0, freq, 1.0), 0.0)
    if mask is not None:
        out[np.asarray(mask) < 1e-6] = 0.0
    return out


def filter_to_local_resolution(volume: np.ndarray, locres: np.ndarray, pixel_size: float,
                               edge_width: int = 2, threads: int = 1,
                               single: bool = False) -> np.ndarray:
    """The map low-passed at every voxel to its local resolution (Å; <= 0: no estimate, the
    voxel is 0). Voxel v with fractional shell f = N pixel / locres(v) takes
    (1 - t) L_s + t L_{s+1}, s = floor(f), t = f - s, where L_s is the map low-passed at
    whole shell s with RELION's raised-cosine edge (`fourier.lowpass_weights`); `threads`
    of them computed at once, in single precision with `single` (about 3x faster; float32
    rounding, 1e-7 of the map)."""
    v = np.asarray(volume, dtype=np.float64)
    loc = np.asarray(locres, dtype=np.float64)
    n = v.shape[0]
    if loc.shape != v.shape:
        raise InputError(f"locres: shape {loc.shape} differs from the map's {v.shape}")
    known = np.flatnonzero(loc > 0)
    out = np.zeros_like(v)
    if not known.size:
        return out
    f = np.clip(n * pixel_size / loc.ravel()[known], 0.0, n // 2)
    # the known voxels in order of their shell: those of shell s are one run
    order = np.argsort(f, kind="stable")
    known, f = known[order], f[order]
    lo = np.floor(f).astype(np.int64)
    t = f - lo
    # each known voxel's index in the unshifted inverse FFT (`fourier.ifft3_centered` shifts
    # the origin to floor(N/2)): only those voxels are read from each low-pass
    raw = np.fft.fftshift(np.arange(n**3).reshape(v.shape)).ravel()[known]
    ft = (fourier.fft3_centered(v) * float(n**3)).astype(
        np.complex64 if single else np.complex128)
    radius = fourier.half_volume_radius(n)
    values = np.zeros(known.size)
    present = np.unique(lo)
    shells = np.union1d(present, present + 1).tolist()  # voxel of shell s reads s and s + 1
    starts = np.searchsorted(lo, np.arange(n // 2 + 3))  # shell s: starts[s]:starts[s + 1]

    def lowpassed(s: int) -> np.ndarray:
        lowpass = fourier.lowpass_weights(n, s, edge_width, radius=radius).astype(ft.real.dtype)
        return scipy.fft.irfftn(ft * lowpass, s=(n, n, n), axes=(0, 1, 2)).ravel()

    k = max(1, int(threads))
    with ThreadPoolExecutor(max_workers=k) as pool:  # the FFTs release the GIL
        for i in range(0, len(shells), k):  # k maps in memory at a time
            for s, x in zip(shells[i:i + k], pool.map(lowpassed, shells[i:i + k]),
                            strict=True):
                below = slice(starts[s], starts[s + 1])
                above = slice(starts[s - 1], starts[s]) if s > 0 else slice(0, 0)
                values[below] += (1.0 - t[below]) * x[raw[below]]
                values[above] += t[above] * x[raw[above]]
    out.flat[known] = values
    return out


def histogram(locres: np.ndarray, where: np.ndarray, max_bins: int = 10
              ) -> tuple[np.ndarray, np.ndarray]:
    """(edges Å, counts) of the local resolutions at the voxels `where` (and > 0), in bins of
    a round width (0.1, 0.2, 0.5, 1, 2, 5, ... Å) chosen for at most max_bins bins."""
    vals = np.asarray(locres)[np.asarray(where) & (np.asarray(locres) > 0)]
    if vals.size == 0:
        return np.zeros(0), np.zeros(0, dtype=np.int64)
    lo, hi = float(vals.min()), float(vals.max())
    for width in (0.1, 0.2, 0.5, 1, 2, 5, 10, 20, 50, 100, 200, 500, 1000):
        start = np.floor(lo / width) * width
        count = int(np.floor((hi - start) / width)) + 1  # [start, start + count width) holds hi
        if count <= max_bins:
            break
    edges = start + width * np.arange(count + 1)
    counts, _ = np.histogram(vals, bins=edges)
    return edges, counts
