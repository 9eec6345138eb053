"""Figures against a known truth (simulations): FSC vs the true map, orientation errors."""

from __future__ import annotations

import numpy as np

from .. import fourier
from ..euler import angular_distance, euler_to_matrix
from .model import fsc, resolution_shell


def fsc_maps(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """FSC between two real-space maps of one box, shells 0..N/2."""
    n = a.shape[0]
    return fsc(fourier.fft3_centered(a), fourier.fft3_centered(b), fourier.shell_index_3d(n),
               n // 2 + 1)


def fsc_resolution(curve: np.ndarray, box: int, pixel_size: float,
                   threshold: float = 0.143, interpolate: bool = False) -> float:
    """Resolution in Å where an FSC curve drops below threshold: the last shell before it
    (RELION's rule), or with interpolate=True the frequency where the curve crosses the
    threshold, linearly interpolated between the two shells around the first crossing."""
    if not interpolate:
        return float(box * pixel_size / resolution_shell(curve, threshold))
    below = np.nonzero(curve[1:] < threshold)[0]
    if below.size == 0:
        return float(box * pixel_size / (curve.size - 1))
    s = int(below[0]) + 1  # first shell below
    if s == 1:
        return float(box * pixel_size / 1.0)
    f0, f1 = curve[s - 1], curve[s]
    x = (s - 1) + (f0 - threshold) / (f0 - f1)
    return float(box * pixel_size / x)


def angular_errors(angles: np.ndarray, true_angles: np.ndarray, sym: str = "C1"
                   ) -> np.ndarray:
    """Rotation angle (degrees) between estimated and true poses, (n, 3) Euler each; with a
    point group, to the nearest of the true pose's equivalent poses (a pose refined with
    symmetry lies in one asymmetric unit; `symmetry.angular_distance`)."""
    a = euler_to_matrix(angles[:, 0], angles[:, 1], angles[:, 2])
    b = euler_to_matrix(true_angles[:, 0], true_angles[:, 1], true_angles[:, 2])
    if str(sym).upper() == "C1":
        return angular_distance(a, b)
    from ..symmetry import angular_distance as symmetric_distance

    return symmetric_distance(a, b, sym)


def bayes_accuracy(map_a: np.ndarray, map_b: np.ndarray, angles: np.ndarray,
                   origins_px: np.ndarray, ctf, pixel_size: float, noise_sigma: float
                   ) -> np.ndarray:
    """Per image, the best possible probability of telling two known maps apart from its
    image at its true pose (equal priors, white Gaussian noise of std. dev. noise_sigma per
    pixel): Phi(d / (2 sigma)), d = ||P_A - P_B|| of the two noiseless CTF-modulated
    projections. The mean over images is the Bayes-optimal classification accuracy."""
    from math import erf, sqrt

    from ..simulate import project_images

    pa = project_images(map_a, angles, origins_px, ctf, pixel_size)
    pb = project_images(map_b, angles, origins_px, ctf, pixel_size)
    d = np.sqrt(((pa.astype(np.float64) - pb) ** 2).sum(axis=(1, 2)))
    z = d / (2.0 * noise_sigma)
    return np.array([0.5 * (1.0 + erf(v / sqrt(2.0))) for v in z])
