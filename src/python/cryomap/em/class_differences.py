"""The class-difference limit of 3D classification (docs/method.md, "What keeps subtle
classes from collapsing"): the classes differ from their consensus only up to the Fourier
shell where the half-set FSC of their differences is supported; beyond it every class is the
consensus map."""

from __future__ import annotations

import numpy as np

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


def limit_differences(maps: np.ndarray, consensus_map: np.ndarray, shell: int) -> np.ndarray:
    """Each class map equal to the consensus beyond Fourier shell `shell`: consensus +
    (map - consensus) with the shells beyond `shell` removed (a sharp edge, so that beyond it
    no class differs from another at all). Measured: weighting the shells kept by the Wiener
    factor of the differences' FSC was no better (3 % share: 92.2 % against 92.4 %)."""
    n = consensus_map.shape[0]
    keep = fourier.shell_index_3d(n) <= shell
    return np.stack([consensus_map + fourier.ifft3_centered(
        fourier.fft3_centered(m - consensus_map) * keep, n) for m in maps])
