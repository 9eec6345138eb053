"""RELION's ZYZ Euler angles (docs/conventions.md, "Euler angles"). The one owner of the convention.

A = Euler(rot, tilt, psi) rotates the reference into the observation: the image's Fourier
pixel k = (kx, ky, 0) samples the reference at A^T k; row 3 of A is the projection direction.
A = (Rz(rot) Ry(tilt) Rz(psi))^T with active right-handed Rz, Ry.
"""

from __future__ import annotations

import numpy as np

_EPS = 16 * np.finfo(np.float32).eps


def euler_to_matrix(rot: np.ndarray | float, tilt: np.ndarray | float,
                    psi: np.ndarray | float) -> np.ndarray:
    """RELION's Euler matrix A for angles in degrees; broadcasts, returns (..., 3, 3) float64."""
    a, b, g = (np.deg2rad(np.asarray(x, dtype=np.float64)) for x in (rot, tilt, psi))
    a, b, g = np.broadcast_arrays(a, b, g)
    ca, sa, cb, sb, cg, sg = np.cos(a), np.sin(a), np.cos(b), np.sin(b), np.cos(g), np.sin(g)
    m = np.empty(a.shape + (3, 3))
    m[..., 0, 0] = cg * cb * ca - sg * sa
    m[..., 0, 1] = cg * cb * sa + sg * ca
    m[..., 0, 2] = -cg * sb
    m[..., 1, 0] = -sg * cb * ca - cg * sa
    m[..., 1, 1] = -sg * cb * sa + cg * ca
    m[..., 1, 2] = sg * sb
    m[..., 2, 0] = sb * ca
    m[..., 2, 1] = sb * sa
    m[..., 2, 2] = cb
    return m


def matrix_to_euler(m: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Inverse of euler_to_matrix (RELION's Euler_matrix2angles): (rot, tilt, psi) degrees.

    tilt in [0, 180]; at tilt 0 or 180 rot is 0 and psi carries the in-plane angle.
    """
    m = np.asarray(m, dtype=np.float64)
    sb = np.hypot(m[..., 0, 2], m[..., 1, 2])
    regular = sb > _EPS
    psi = np.where(regular, np.arctan2(m[..., 1, 2], -m[..., 0, 2]), 0.0)
    rot = np.where(regular, np.arctan2(m[..., 2, 1], m[..., 2, 0]), 0.0)
    tilt = np.arctan2(sb, m[..., 2, 2])
    # Degenerate tilt: rot = 0 and all in-plane rotation in psi.
    tilt = np.where(regular, tilt, np.where(m[..., 2, 2] > 0, 0.0, np.pi))
    # RELION: psi = atan2(-A10, A00) at tilt 0, atan2(A10, -A00) at tilt 180.
    psi_deg = np.where(regular, psi, np.where(m[..., 2, 2] > 0,
                                              np.arctan2(-m[..., 1, 0], m[..., 0, 0]),
                                              np.arctan2(m[..., 1, 0], -m[..., 0, 0])))
    return np.rad2deg(rot), np.rad2deg(tilt), np.rad2deg(psi_deg)


def projection_direction(rot: np.ndarray | float, tilt: np.ndarray | float) -> np.ndarray:
    """Unit projection direction (row 3 of A): (sin t cos r, sin t sin r, cos t)."""
    r, t = np.deg2rad(np.asarray(rot, float)), np.deg2rad(np.asarray(tilt, float))
    return np.stack([np.sin(t) * np.cos(r), np.sin(t) * np.sin(r), np.cos(t)], axis=-1)


def angular_distance(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Angle in degrees of the rotation taking a to b ((..., 3, 3) each)."""
    tr = np.einsum("...ij,...ij->...", a, b)
    return np.rad2deg(np.arccos(np.clip((tr - 1.0) / 2.0, -1.0, 1.0)))
