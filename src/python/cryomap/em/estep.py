"""E-step: the posterior over (shift, orientation) poses of each image (docs/method.md
eq. (17)).

The work is done by the C++ kernel `core.expectation` (two float32 GEMMs per tile, log-sum-exp
in float64). Notation as in docs/method.md eqs. (2), (4): for image i, Fourier pixel j,
shift t, slice r,

    diff2(i,t,r) = sum_j |X_ij(t) - CTF_ij A_rj|^2 inv_sigma2_ij / 2,
    g(i,t,r) ∝ exp(-diff2 + log_prior_rot[r] + log_prior_shift[i,t]),

with X_ij(t) = X_ij exp(-2 pi i (kx_j t_x + ky_j t_y) / N) (RELION's shift sign,
docs/conventions.md "Shifts").
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from .. import fourier
from .._kernels import core


@dataclass
class Posterior:
    """Per-batch E-step result (B images, T shifts, R orientations)."""

    weights: np.ndarray  # (B, T, R) float32 posterior; sums to 1 per image
    best_r: np.ndarray  # (B,) int64 orientation of the largest weight
    best_t: np.ndarray  # (B,) int64 shift of the largest weight
    max_prob: np.ndarray  # (B,) float64 largest normalised weight (rlnMaxValueProbDistribution)
    n_significant: np.ndarray  # (B,) int64 number of nonzero weights kept
    log_marginal: np.ndarray  # (B,) float64 log p(X_i) incl. Gaussian normalisation
    min_diff2: np.ndarray  # (B,) float64 smallest diff2 among poses with finite priors


@lru_cache(maxsize=64)
def _mask_coords(box: int, n_pixels: int) -> np.ndarray:
    for r in range(box // 2 + 1):
        m = fourier.pixel_mask(box, r)
        if m.n_pixels == n_pixels:
            return m.coords
        if m.n_pixels > n_pixels:
            break
    raise ValueError(
        f"coords: {n_pixels} pixels is not the size of fourier.pixel_mask({box}, r) for any r; "
        "pass coords=(J, 2) explicitly")


def pixel_coords(box: int, n_pixels: int, coords: np.ndarray | None = None) -> np.ndarray:
    """(J, 2) float32 (kx, ky) of the pixels: `coords` if given, else those of the
    `fourier.pixel_mask(box, r)` with J pixels (ValueError if no radius gives J)."""
    if coords is None:
        coords = _mask_coords(int(box), int(n_pixels))
    coords = np.ascontiguousarray(coords, dtype=np.float32)
    if coords.shape != (n_pixels, 2):
        raise ValueError(f"coords: expected shape ({n_pixels}, 2), got {coords.shape}")
    return coords


@dataclass(frozen=True)
class KernelInputs:
    """The terms every E- and M-step kernel starts with (docs/method.md eqs. (2), (4)).

    images: (B, J) masked image FTs; ctf and inv_sigma2: (B, J) (1/sigma2 >= 0; 0 leaves a
    pixel out); slices: (R, J) projected references, classes concatenated along R; shifts:
    (T, 2) translations in pixels, applied to the images; box: the image box N (the
    phase-shift denominator); coords: (J, 2) (kx, ky) of the pixels, default those of the
    `fourier.pixel_mask(box, r)` with J pixels.
    """

    images: np.ndarray
    ctf: np.ndarray
    inv_sigma2: np.ndarray
    slices: np.ndarray
    shifts: np.ndarray
    box: int
    coords: np.ndarray | None = None

    def arrays(self) -> tuple:
        """The kernels' leading arguments in their dtypes: images complex64, ctf and
        inv_sigma2 float32, slices complex64, coords (J, 2) float32, shifts float64, box
        (ValueError on images that are not (B, J))."""
        images = np.ascontiguousarray(self.images, dtype=np.complex64)
        if images.ndim != 2:
            raise ValueError(f"images: expected 2 dimensions (B, J), got shape {images.shape}")
        return (images, np.ascontiguousarray(self.ctf, dtype=np.float32),
                np.ascontiguousarray(self.inv_sigma2, dtype=np.float32),
                np.ascontiguousarray(self.slices, dtype=np.complex64),
                pixel_coords(self.box, images.shape[1], self.coords),
                np.ascontiguousarray(self.shifts, dtype=np.float64), int(self.box))


def expectation(
    inputs: KernelInputs,
    log_prior_rot: np.ndarray | None = None,
    log_prior_shift: np.ndarray | None = None,
    significant_fraction: float = 0.999,
    *,
    block_rows: int = 0,
    block_cols: int = 0,
    slice_class: np.ndarray | None = None,
    min_class_mass: float = 0.0,
) -> Posterior:
    """Posterior over poses of a batch of images.

    Args:
        inputs: the images, CTF, 1/sigma2, slices, shifts, box and pixel coords.
        log_prior_rot: (R,) log prior per orientation; default 0. -inf excludes one.
        log_prior_shift: (B, T) (or (T,), broadcast) log prior per image and shift; default 0.
        significant_fraction: keep per image the smallest set of largest weights holding this
            fraction of the total (renormalised); 1.0 keeps all (dense).
        block_rows, block_cols: GEMM tile sizes (0 = automatic), for tuning only.
        slice_class: (R,) class of each slice; with several classes the significant set is
            chosen within each class (of its own mass), and a class holding less than
            min_class_mass of the image's posterior is dropped, so that a class that loses at
            a coarse level is still refined when it is plausible.

    Returns:
        A Posterior. log_marginal = log sum_{t,r} exp(-diff2 + priors)
        + sum_j [inv_sigma2_ij > 0] log(inv_sigma2_ij / (2 pi)) (complex-Gaussian
        normalisation; RELION's rlnLogLikeliContribution).

    Precision: the pose-dependent part of diff2 comes from float32 GEMMs (relative error
    ~1e-7 of sum_j |CTF A X| / sigma2, i.e. ~1e-4 absolute for diff2 terms of ~1e3); the
    per-image constants, maxima and log-sum-exp are float64. Weights below e^-87 of the best
    pose are 0 (float32 normal range) and do not count in n_significant.

    Memory: the (B, T, R) float32 weights plus O(B J + T J) and O(tile) scratch per thread;
    the engine sizes batches for it (`em.memory.batch_size`).
    """
    args = inputs.arrays()
    images, slices, shifts = args[0], args[3], args[5]
    n_img = images.shape[0]
    n_rot = slices.shape[0] if slices.ndim == 2 else 0
    n_shift = shifts.shape[0] if shifts.ndim == 2 else 0
    if log_prior_rot is None:
        log_prior_rot = np.zeros(n_rot)
    if log_prior_shift is None:
        log_prior_shift = np.zeros((n_img, n_shift))
    lps = np.asarray(log_prior_shift, dtype=np.float64)
    if lps.ndim == 1:
        lps = np.broadcast_to(lps, (n_img, lps.shape[0]))
    out = core.expectation(
        *args,
        np.ascontiguousarray(log_prior_rot, dtype=np.float64),
        np.ascontiguousarray(lps),
        float(significant_fraction),
        int(block_rows),
        int(block_cols),
        _groups(slice_class),
        float(min_class_mass),
    )
    return Posterior(**out)


def _groups(slice_class: np.ndarray | None) -> np.ndarray:
    if slice_class is None:
        return np.zeros(0, np.int64)
    return np.ascontiguousarray(slice_class, dtype=np.int64)


@dataclass
class SubsetPosterior:
    """E-step result over per-image pose subsets (see `expectation_subsets`)."""

    weights: np.ndarray  # (sum_i T_i R_i,) float32; image i's (T_i, R_i) block at block_ptr[i]
    block_ptr: np.ndarray  # (B+1,) int64
    best_r: np.ndarray  # (B,) int64 index into the slices
    best_t: np.ndarray  # (B,) int64 index into the shifts
    max_prob: np.ndarray  # (B,) float64
    n_significant: np.ndarray  # (B,) int64
    log_marginal: np.ndarray  # (B,) float64
    min_diff2: np.ndarray  # (B,) float64

    def block(self, i: int, n_shifts: int) -> np.ndarray:
        """Image i's weights as a (T_i, R_i) array."""
        w = self.weights[self.block_ptr[i]:self.block_ptr[i + 1]]
        return w.reshape(n_shifts, -1)


def expectation_subsets(
    inputs: KernelInputs,
    rot_ptr: np.ndarray,
    rot_index: np.ndarray,
    rot_log_prior: np.ndarray,
    shift_ptr: np.ndarray,
    shift_index: np.ndarray,
    shift_log_prior: np.ndarray,
    significant_fraction: float = 0.999,
    *,
    slice_class: np.ndarray | None = None,
    min_class_mass: float = 0.0,
) -> SubsetPosterior:
    """Posterior over per-image pose subsets (docs/method.md eq. (17)).

    Image i is scored against the product of its orientations
    slices[rot_index[rot_ptr[i]:rot_ptr[i+1]]] (each with its log prior rot_log_prior[...])
    and its translations shifts[shift_index[shift_ptr[i]:shift_ptr[i+1]]] (each with
    shift_log_prior[...]), by one matrix product per image. Everything else (diff2, pruning,
    log marginal, precision, per-class pruning) as `expectation`. The lists are int64 CSR
    arrays; a prior of -inf excludes a candidate; every image needs at least one allowed pose.
    """
    out = core.expectation_subsets(
        *inputs.arrays(),
        np.ascontiguousarray(rot_ptr, dtype=np.int64),
        np.ascontiguousarray(rot_index, dtype=np.int64),
        np.ascontiguousarray(rot_log_prior, dtype=np.float64),
        np.ascontiguousarray(shift_ptr, dtype=np.int64),
        np.ascontiguousarray(shift_index, dtype=np.int64),
        np.ascontiguousarray(shift_log_prior, dtype=np.float64),
        float(significant_fraction), _groups(slice_class), float(min_class_mass))
    return SubsetPosterior(**out)
