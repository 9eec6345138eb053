"""Expected accuracy of the pose assignment (RELION's calculateExpectedAngularErrors).

For a subset of particles at their current best poses: the smallest rotation (about one of
rot, tilt or psi, drawn per particle) and the smallest translation (along x or y) that change
the particle's CTF-modulated projection by enough to make the moved pose 100 times less
likely than the best one:

    sum_j CTF_j^2 |F1_j - F2_j|^2 / (2 sigma2_j) > ln(100),

averaged over the subset. It depends on the signal (map, CTF, noise spectrum), not on how
finely the poses were sampled, so the sampling schedule can compare its step with it.
"""

from __future__ import annotations

import numpy as np

from .. import fourier, projector
from ..euler import euler_to_matrix, matrix_to_euler
from .data import ImageSource
from .noise import NoiseModel

LOG_100 = 4.60517  # the likelihood ratio 0.01 of RELION's accuracy


def _error_steps(limit: float, steps: list[tuple[float, float]]) -> np.ndarray:
    """Cumulative errors taking RELION's growing steps: `steps` are (below, step) pairs."""
    out, e = [], 0.0
    while True:
        step = next(s for below, s in steps if e < below)
        e += step
        if e > limit:
            break
        out.append(e)
    return np.array(out)


ANGLE_ERRORS = _error_steps(30.0, [(0.2, 0.05), (1.0, 0.1), (2.0, 0.2), (5.0, 0.5),
                                   (10.0, 1.0), (20.0, 2.0), (np.inf, 5.0)])
SHIFT_ERRORS = _error_steps(10.0, [(1.0, 0.1), (2.0, 0.2), (5.0, 0.5), (10.0, 1.0),
                                   (np.inf, 2.0)])


def expected_accuracy(reference: projector.Reference, source: ImageSource, indices: np.ndarray,
                      rotations: np.ndarray, noise: NoiseModel, r_max: int,
                      rng: np.random.Generator) -> tuple[float, float]:
    """(rotational accuracy in degrees, translational accuracy in px), means over the images
    `indices` at their best rotations (len(indices), 3, 3)."""
    if indices.size == 0:
        return 999.0, 999.0
    box = source.box
    mask = fourier.pixel_mask(box, r_max)
    batch = source.batch(indices, mask, np.zeros((indices.size, 2)))
    # CTF^2 / (2 sigma2) per pixel
    wgt = batch.ctf.astype(np.float64) ** 2 * noise.inv_sigma2(batch.group, mask) / 2.0
    f1 = projector.project(reference, rotations, mask.coords)
    n, n_err = indices.size, ANGLE_ERRORS.size
    # angles: one of rot, tilt, psi per particle, increased by every error
    euler = np.stack(matrix_to_euler(rotations), axis=1)
    axis = rng.integers(0, 3, size=n)
    moved = np.repeat(euler[:, None, :], n_err, axis=1)
    moved[np.arange(n), :, axis] += ANGLE_ERRORS[None, :]
    moved = moved.reshape(-1, 3)
    f2 = projector.project(reference, euler_to_matrix(moved[:, 0], moved[:, 1], moved[:, 2]),
                           mask.coords).reshape(n, n_err, -1)
    snr = (np.abs(f1[:, None, :] - f2) ** 2 * wgt[:, None, :]).sum(-1)
    acc_rot = _first_above(snr, ANGLE_ERRORS)
    # translations: along x or y; |F1 - F2|^2 = |F1|^2 |1 - exp(-2 pi i k.s / N)|^2
    xy = rng.integers(0, 2, size=n)
    k = mask.coords[:, 0][None, :] * (xy[:, None] == 0) + mask.coords[:, 1][None, :] * (
        xy[:, None] == 1)
    phase = 2 * np.pi * k[:, None, :] * SHIFT_ERRORS[None, :, None] / box
    snr_t = ((np.abs(f1) ** 2 * wgt)[:, None, :] * 2.0 * (1.0 - np.cos(phase))).sum(-1)
    acc_trans = _first_above(snr_t, SHIFT_ERRORS)
    return float(acc_rot.mean()), float(acc_trans.mean())


def _first_above(snr: np.ndarray, errors: np.ndarray) -> np.ndarray:
    """Per row, the first error whose snr exceeds ln(100) (the largest error if none)."""
    above = snr > LOG_100
    first = np.where(above.any(1), above.argmax(1), errors.size - 1)
    return errors[first]
