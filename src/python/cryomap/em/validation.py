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
                   threshold: float = 0.143) -> float:
    """Resolution in Å where an FSC curve drops below threshold (RELION's rule)."""
    return float(box * pixel_size / resolution_shell(curve, threshold))


def angular_errors(angles: np.ndarray, true_angles: np.ndarray) -> np.ndarray:
    """Rotation angle (degrees) between estimated and true poses, (n, 3) Euler each."""
    a = euler_to_matrix(angles[:, 0], angles[:, 1], angles[:, 2])
    b = euler_to_matrix(true_angles[:, 0], true_angles[:, 1], true_angles[:, 2])
    return angular_distance(a, b)
