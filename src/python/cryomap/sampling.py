"""Pose sampling: HEALPix directions, in-plane angles, shifts (docs/conventions.md, "Pose
sampling")."""

from __future__ import annotations

from dataclasses import dataclass

import healpy
import numpy as np

from .euler import euler_to_matrix


def healpix_nside(order: int) -> int:
    """Nside of a HEALPix order (2^order)."""
    if order < 0:
        raise ValueError("healpix order: expected >= 0")
    return 1 << order


def angular_step(order: int) -> float:
    """RELION's angular step in degrees for a HEALPix order: 360 / (6 * 2^order)."""
    return 360.0 / (6 * healpix_nside(order))


def healpix_directions(order: int) -> tuple[np.ndarray, np.ndarray]:
    """(rot, tilt) in degrees of the 12 * Nside^2 NEST pixel centres of an order.

    rot = phi normalised to [-180, 180], tilt = theta in [0, 180].
    """
    nside = healpix_nside(order)
    theta, phi = healpy.pix2ang(nside, np.arange(healpy.nside2npix(nside)), nest=True)
    rot = np.rad2deg(phi)
    rot = np.where(rot > 180.0, rot - 360.0, rot)
    return rot, np.rad2deg(theta)


def psi_angles(step: float) -> np.ndarray:
    """In-plane angles: n = ceil(360/step), psi_j = j * 360/n degrees (RELION's rule)."""
    if step <= 0:
        raise ValueError("psi step: expected > 0 degrees")
    n = int(np.ceil(360.0 / step - 1e-9))
    return np.arange(n) * (360.0 / n)


def translations(offset_range: float, offset_step: float) -> np.ndarray:
    """Translation grid in pixels: (i*step, j*step) with |i|,|j| <= ceil(range/step), kept
    inside the circle of radius range (RELION's setTranslations). Returns (T, 2) float64."""
    if offset_step <= 0 or offset_range < 0:
        raise ValueError("offset range/step: expected range >= 0 and step > 0")
    n = int(np.ceil(offset_range / offset_step - 1e-9))
    i = np.arange(-n, n + 1) * offset_step
    x, y = np.meshgrid(i, i, indexing="xy")
    keep = x * x + y * y <= offset_range**2 + 1e-9
    return np.stack([x[keep], y[keep]], axis=1)


@dataclass(frozen=True)
class OrientationGrid:
    """A list of orientations: Euler angles (R, 3) in degrees and their matrices (R, 3, 3)."""

    angles: np.ndarray
    matrices: np.ndarray

    def __len__(self) -> int:
        return int(self.angles.shape[0])


def orientations_3d(healpix_order: int, psi_step: float | None = None) -> OrientationGrid:
    """All HEALPix directions x in-plane angles of an order (psi step defaults to the
    angular step). Ordered direction-major."""
    rot, tilt = healpix_directions(healpix_order)
    psi = psi_angles(angular_step(healpix_order) if psi_step is None else psi_step)
    angles = np.stack(
        [np.repeat(rot, psi.size), np.repeat(tilt, psi.size), np.tile(psi, rot.size)], axis=1
    )
    return OrientationGrid(angles, euler_to_matrix(angles[:, 0], angles[:, 1], angles[:, 2]))


def orientations_2d(psi_step: float = 10.0) -> OrientationGrid:
    """In-plane orientations for 2D classification: Euler(0, 0, psi)."""
    psi = psi_angles(psi_step)
    angles = np.stack([np.zeros_like(psi), np.zeros_like(psi), psi], axis=1)
    return OrientationGrid(angles, euler_to_matrix(0.0, 0.0, psi))
