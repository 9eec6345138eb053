"""Soft spherical masks (RELION's raised-cosine edge, CONVENTIONS §7)."""

from __future__ import annotations

import numpy as np

from .fourier import origin


def soft_sphere(box: int, radius: float, edge: float = 5.0, ndim: int = 2) -> np.ndarray:
    """1 inside `radius` px of the centre floor(N/2), 0 beyond radius + edge, raised cosine
    ½ + ½cos(π(r − R)/edge) in between. Returns float64 (box,)*ndim."""
    c = np.arange(box) - origin(box)
    grids = np.meshgrid(*([c] * ndim), indexing="ij")
    r = np.sqrt(sum(g.astype(np.float64) ** 2 for g in grids))
    if edge <= 0:
        return (r <= radius).astype(np.float64)
    t = np.clip((r - radius) / edge, 0.0, 1.0)
    return 0.5 + 0.5 * np.cos(np.pi * t)


def apply_soft_mask(images: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Mask images (..., N, N) towards their background: the mean outside the mask is taken as
    background and blended in with the mask's soft edge (RELION's --zero_mask is background 0;
    here the background level is the images' own outside mean, then zero)."""
    outside = mask < 1e-3
    if not outside.any():  # the mask fills the box: no background to measure
        return images * mask
    bg = images[..., outside].mean(axis=-1)[..., None, None]
    return (images - bg) * mask
