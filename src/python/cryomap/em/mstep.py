"""M-step: the map update from back-projected sums (seed eq. 14) and its regularisation.

The back-projected sums live on the centred padded half-volume (see `fourier`):
D = Σ g·CTF·X/σ², W = Σ g·CTF²/σ² (CONVENTIONS §5). The map is V = D / (W + 1/(p³·T·τ²))
(seed eq. 14 with RELION's padding and τ²-fudge factors, CONVENTIONS §6).
"""

from __future__ import annotations

import numpy as np

from .. import fourier
from .model import shell_sums


def padded_shells(shape: tuple[int, int, int], pad: int) -> np.ndarray:
    """Shell index (in units of the unpadded box's Fourier pixels) of each voxel of a centred
    padded half-volume of the given shape: round(|q| / p)."""
    nz, ny, nx = shape
    kz = np.arange(nz) - nz // 2
    ky = np.arange(ny) - ny // 2
    kx = np.arange(nx)
    r = np.sqrt(kz[:, None, None] ** 2 + ky[None, :, None] ** 2 + kx[None, None, :] ** 2)
    return fourier.shell_index(r / pad)


def shell_mean(values: np.ndarray, shells: np.ndarray, n_shells: int) -> np.ndarray:
    """Mean of values over each shell (0 for empty shells)."""
    s = shell_sums(values, shells, n_shells)
    c = shell_sums(np.ones(values.shape), shells, n_shells)
    return np.where(c > 0, s / np.maximum(c, 1), 0.0)


def regularised_ratio(data: np.ndarray, weight: np.ndarray, tau2: np.ndarray, pad: int,
                      tau2_fudge: float, shells: np.ndarray, n_shells: int) -> np.ndarray:
    """V = D / max(W', ⟨W'⟩_shell/1000), W' = W + 1/(p³·T·τ²) (seed eq. 14; RELION's
    reconstruct).

    tau2 is either per shell (n_shells,) or per voxel (same shape as data; then no floor).
    Voxels with τ² = 0 or beyond the last shell get V = 0 (no prior support there).
    """
    t2 = tau2[np.minimum(shells, n_shells - 1)] if tau2.ndim == 1 else tau2
    inside = (shells < n_shells) & (t2 > 0)
    with np.errstate(divide="ignore"):
        w = weight + np.where(inside, 1.0 / (pad**3 * tau2_fudge * np.where(inside, t2, 1.0)),
                              0.0)
    if tau2.ndim == 1:
        # RELION's guard against tiny denominators; with a per-voxel τ² a few near-zero τ²
        # would inflate the shell mean, so the seed's eq. 14 is applied as written there.
        floor = shell_mean(w, shells, n_shells)[np.minimum(shells, n_shells - 1)] / 1000.0
        denom = np.maximum(w, floor)
    else:
        denom = w
    out = np.where(inside & (denom > 0), data / np.where(denom > 0, denom, 1.0), 0.0)
    return out.astype(np.complex64)


def unregularised_average(data: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """D / W where W > 0 (for the half-map FSC, RELION's getDownsampledAverage)."""
    return np.where(weight > 0, data / np.where(weight > 0, weight, 1.0), 0.0)


def tau2_per_voxel(volume_ft: np.ndarray) -> np.ndarray:
    """Seed eq. 16 per voxel: τ²_l = |V_l|² / 2 (variance of each of Re and Im)."""
    return (np.abs(volume_ft) ** 2 / 2.0).astype(np.float64)
