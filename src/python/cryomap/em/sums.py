"""M-step sums from the posterior weights (numerator and denominator of docs/method.md
eqs. (13)-(14), and the sum of eq. (15)), by the C++ kernel `core.maximization_sums`.

With Y_it(j) = CTF_ij X_ij(t) inv_sigma2_ij and W_ij = CTF_ij^2 inv_sigma2_ij:

    data_slices[r, j]   += sum_{i,t} g(i,t,r) Y_it(j)
    weight_slices[r, j] += sum_{i,t} g(i,t,r) W_ij
    residual_power[i, s] = sum_{t,r} g(i,t,r) sum_{j: shell_j = s} |X_ij(t) - CTF_ij A_rj|^2

The slice sums are back-projected afterwards (`projector.backproject`). The residual power is
over ALL pixels j, whatever inv_sigma2 (so that pixels excluded from alignment still get a
noise estimate), and is not divided by sigma2 or by the pixel count: σ² per shell is
sum_i residual_power[i, s] / (2 * sum_i sum_{t,r} g * Npix(s)) (docs/method.md eq. (23)).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .._kernels import core
from .estep import KernelInputs

METHODS = {"auto": 0, "gemm": 1, "sparse": 2}


@dataclass
class SliceSums:
    """Accumulators of the M-step sums over R slices of J pixels, updated in place by
    `maximization_sums`: data (R, J) complex64 and weight (R, J) float32, both
    C-contiguous; pixel_shell (J,) the bin of each pixel in [0, n_shells) for the residual
    power (shell index, or the pixel index itself for a per-pixel noise model)."""

    data: np.ndarray
    weight: np.ndarray
    pixel_shell: np.ndarray
    n_shells: int

    @classmethod
    def empty(cls, n_rot: int, n_pixels: int, pixel_shell: np.ndarray,
              n_shells: int) -> SliceSums:
        """Zeroed accumulators."""
        return cls(np.zeros((n_rot, n_pixels), np.complex64),
                   np.zeros((n_rot, n_pixels), np.float32),
                   np.ascontiguousarray(pixel_shell, dtype=np.int64), int(n_shells))

    def arrays(self) -> tuple:
        """The kernels' trailing arguments: pixel_shell, n_shells, data, weight."""
        return (np.ascontiguousarray(self.pixel_shell, dtype=np.int64), int(self.n_shells),
                self.data, self.weight)


def _method_code(method: str) -> int:
    try:
        return METHODS[method]
    except KeyError:
        raise ValueError(f"method: expected one of {sorted(METHODS)}, got {method!r}") from None


def maximization_sums(inputs: KernelInputs, weights: np.ndarray, sums: SliceSums, *,
                      method: str = "auto") -> np.ndarray:
    """Accumulate the posterior-weighted slice sums in place and return the residual power.

    Args:
        inputs: the images, CTF, 1/sigma2, slices, shifts, box and pixel coords.
        weights: (B, T, R) posterior weights (float32), e.g. `Posterior.weights`.
        sums: the accumulators, updated in place.
        method: "gemm" (GEMMs over the orientations and rows with any weight), "sparse" (a
            loop over the nonzero weights) or "auto" (chosen by cost; sparse when the weights
            are few, as after convergence).

    Returns:
        residual_power (B, n_shells) float64.
    """
    return core.maximization_sums(*inputs.arrays(),
                                  np.ascontiguousarray(weights, dtype=np.float32),
                                  *sums.arrays(), _method_code(method))


def maximization_sums_sparse(inputs: KernelInputs, image_index: np.ndarray,
                             shift_index: np.ndarray, slice_index: np.ndarray,
                             weights: np.ndarray, sums: SliceSums, *,
                             method: str = "auto") -> np.ndarray:
    """`maximization_sums` with the weights given as a sparse list: weights[e] of image
    image_index[e] at translation shift_index[e] and slice slice_index[e] (each triple at most
    once; zeros are ignored). Returns residual_power (B, n_shells)."""
    return core.maximization_sums_coo(
        *inputs.arrays(),
        np.ascontiguousarray(image_index, dtype=np.int64),
        np.ascontiguousarray(shift_index, dtype=np.int64),
        np.ascontiguousarray(slice_index, dtype=np.int64),
        np.ascontiguousarray(weights, dtype=np.float32), *sums.arrays(), _method_code(method))
