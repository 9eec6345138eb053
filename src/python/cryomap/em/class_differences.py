"""The class-difference limits of 3D classification (docs/method.md, "What keeps subtle
classes from collapsing"): each class differs from the consensus only up to the Fourier
shell where the half-set FSC of its difference is supported (beyond it the class is the
consensus map), and only where in the map the two half-sets' differences agree."""

from __future__ import annotations

import numpy as np
from scipy import ndimage

from .. import fourier, projector
from ..resolution import fsc


def difference_fsc(half_bps: list[list[projector.BackProjector]], n_shells: int
                   ) -> np.ndarray:
    """(K, n_shells) per class, the FSC between the two half-sets' weighted differences from
    their consensus, E_k = D_k - W_k (sum_j D_j / sum_j W_j): zero where the class maps equal
    the consensus map, whatever the noise."""
    diffs = []
    for bps in half_bps:
        d = sum(bp.data.astype(np.complex128) for bp in bps)
        w = sum(bp.weight.astype(np.float64) for bp in bps)
        mean = np.where(w > 0, d / np.where(w > 0, w, 1.0), 0.0)
        diffs.append([bp.data - bp.weight * mean for bp in bps])
    shells = half_bps[0][0].shells()
    return np.array([fsc(a, b, shells, n_shells) for a, b in zip(*diffs, strict=True)])


def extend_difference_shell(shell: int, curve: np.ndarray, threshold: float,
                            radius: int) -> int:
    """The shell up to which the classes may differ, moved out over the shells just beyond it
    whose differences' FSC reaches `threshold`. Only the shells beyond it are tested: there the
    class maps were equal, so no particle's class depended on its own noise, and the two halves'
    differences are independent."""
    s = shell
    while s + 1 <= min(radius, curve.size - 1) and curve[s + 1] >= threshold:
        s += 1
    return s


def extend_difference_shells(shells: np.ndarray, curves: np.ndarray, threshold: float,
                             radius: int, per_class: bool) -> np.ndarray:
    """(K,) the classes' shells after an M-step (`curves`: (K, n_shells), difference_fsc).
    per_class: each moves out on its own difference's FSC (K = 3 with a large and a subtle
    difference: the subtle class's stays where its own difference is supported); otherwise
    one shell for all, moved out on the largest FSC of any class (where poses are searched:
    measured, shells per class there let the globular K = 3 set's classes form early and
    be aligned per class, 94.4 % against 96.0 %)."""
    if per_class:
        return np.array([extend_difference_shell(int(s), c, threshold, radius)
                         for s, c in zip(shells, curves, strict=True)], np.int64)
    one = extend_difference_shell(int(np.max(shells)), curves.max(axis=0), threshold, radius)
    return np.full(len(shells), one, np.int64)


def limit_differences(maps: np.ndarray, consensus_map: np.ndarray, shells: np.ndarray
                      ) -> np.ndarray:
    """Each class map k equal to the consensus beyond Fourier shell `shells[k]`: consensus +
    (map - consensus) with the shells beyond it removed (a sharp edge, so that beyond it the
    class does not differ from the consensus at all). Measured: weighting the shells kept by
    the Wiener factor of the differences' FSC was no better (3 % share: 92.2 % against
    92.4 %)."""
    n = consensus_map.shape[0]
    index = fourier.shell_index_3d(n)
    return np.stack([consensus_map + fourier.ifft3_centered(
        fourier.fft3_centered(m - consensus_map) * (index <= s), n)
        for m, s in zip(maps, np.broadcast_to(shells, (len(maps),)), strict=True)])


def difference_weights(half_bps: list[list[projector.BackProjector]], tau2: np.ndarray,
                       tau2_fudge: float, distribution: np.ndarray, shells: np.ndarray,
                       window: float, minres_map: int) -> np.ndarray:
    """(K, N, N, N) in [0, 1]: where in the map each class's difference from the consensus
    is supported. Per half-set h and class k, the difference E_k^h = V_k^h - C^h of the
    regularised maps up to the class's Fourier shell `shells[k]` (the consensus C^h weighted
    by `distribution`). rho, the local correlation of the two halves' differences,
    clip(G * (E^1 E^2) / G * ((E^1^2 + E^2^2) / 2), 0, 1) with G a Gaussian of standard
    deviation `window` times the differences' resolution (N / shell px), is their local
    signal share; the weight is that of both halves together, 2 rho / (1 + rho) (as a
    full-set FSC from a half-set one), G from the class's own shell. Where the classes
    differ the two halves agree (weight near 1); elsewhere their differences are
    independent noise (near 0), which would otherwise decide the class of particles as much
    as the real difference does.

    The differences hold no frequency beyond the largest shell, so they are computed on a
    coarse grid (4 shell + 8 voxels across the box, which holds their products) and the local
    sums are interpolated onto the map's grid."""
    box, pad, interp = half_bps[0][0].box, half_bps[0][0].pad, half_bps[0][0].interp
    shells = [int(s) for s in np.broadcast_to(shells, (len(half_bps[0]),))]
    top = max(shells)
    coarse = min(box, 4 * top + 8)  # even; holds E^1 E^2 (to shell 2 top)
    # the gridding correction at the coarse voxels (as projector.map_from_reference_ft's)
    t = (np.arange(coarse) - fourier.origin(coarse)) * (box / coarse)
    r = np.sqrt(t[:, None, None] ** 2 + t[None, :, None] ** 2 + t[None, None, :] ** 2)
    correction = projector.gridding_kernel(r / (pad * box), interp).astype(np.float32)
    halves = []
    for bps in half_bps:
        bps = [bp.cropped(top) for bp in bps]  # a reconstruction to `top` reads no more
        pooled = projector.BackProjector.pooled(bps)
        consensus = {s: pooled.reconstruct_ft(distribution @ tau2, tau2_fudge, s, minres_map)
                     for s in set(shells)}
        halves.append([_coarse_map(bp.reconstruct_ft(t2, tau2_fudge, s, minres_map)
                                   - consensus[s], pad * coarse, coarse) / correction
                       for bp, t2, s in zip(bps, tau2, shells, strict=True)])
    up = _interpolation_matrix(box, coarse)
    weights = []
    for a, b, s in zip(*halves, shells, strict=True):
        a, b = a.astype(np.float64), b.astype(np.float64)
        sigma = window * coarse / max(s, 1)  # coarse voxels
        # the smooth local sums are interpolated, not their ratio
        agree, power = (_upsample(ndimage.gaussian_filter(x, sigma, mode="constant"), up)
                        for x in (a * b, 0.5 * (a * a + b * b)))
        rho = np.clip(agree / np.maximum(power, np.finfo(np.float64).tiny), 0.0, 1.0)
        weights.append(2.0 * rho / (1.0 + rho))
    return np.stack(weights)


def _coarse_map(centred: np.ndarray, n: int, coarse: int) -> np.ndarray:
    """The central coarse^3 voxels of the inverse transform on an n-grid (n = pad * coarse:
    the padded box, coarsely sampled) of a centred padded FT that n holds; up to scale and
    the gridding correction, as projector.map_from_reference_ft's map. Single precision."""
    return fourier.centred_ft_to_box(centred, n, coarse)


def _interpolation_matrix(box: int, coarse: int) -> np.ndarray:
    """(N, coarse) linear interpolation from the coarse grid to the map's along one axis
    (centre on centre; beyond the coarse grid's last voxel its value)."""
    t = np.clip((np.arange(box) - fourier.origin(box)) * (coarse / box)
                + fourier.origin(coarse), 0.0, coarse - 1.0)
    lo = np.minimum(np.floor(t).astype(np.int64), coarse - 2)
    frac = t - lo
    out = np.zeros((box, coarse))
    out[np.arange(box), lo] = 1.0 - frac
    out[np.arange(box), lo + 1] = frac
    return out


def _upsample(x: np.ndarray, up: np.ndarray) -> np.ndarray:
    """Trilinear interpolation of a coarse volume onto the map's grid: one matrix per axis."""
    x = np.tensordot(up, x, axes=(1, 0))  # (N, c, c)
    x = np.tensordot(x, up, axes=(2, 1))  # (N, c, N)
    return np.ascontiguousarray(np.tensordot(x, up, axes=(1, 1)).transpose(0, 2, 1))
