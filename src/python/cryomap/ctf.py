"""RELION's CTF (CONVENTIONS.md section 4), vectorised over a batch of images.

CTF(s) = -scale * exp(-B s^2 / 4) * sin(gamma(s)),
gamma = -pi lambda (U u^2 + V v^2) + (pi/2) Cs lambda^3 |s|^4 - phase_shift - asin(Q0),
with (u, v) the frequency rotated by the astigmatism angle. Positive defocus is underfocus, so
without phase shift CTF(0) = +Q0 * scale (particles are white).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


def electron_wavelength(voltage_kv: np.ndarray | float) -> np.ndarray:
    """Relativistic electron wavelength in Angstrom for an accelerating voltage in kV."""
    v = np.asarray(voltage_kv, dtype=np.float64) * 1e3
    return 12.2643247 / np.sqrt(v * (1.0 + 0.978466e-6 * v))


@dataclass
class CtfParams:
    """Per-image CTF parameters (arrays of length B; scalars broadcast).

    Units as in RELION STAR files: defocus in Angstrom (+ = underfocus), angles in degrees,
    voltage in kV, Cs in mm, B-factor in A^2.
    """

    defocus_u: np.ndarray
    defocus_v: np.ndarray
    defocus_angle: np.ndarray
    voltage: np.ndarray | float = 300.0
    cs: np.ndarray | float = 2.7
    amplitude_contrast: np.ndarray | float = 0.1
    phase_shift: np.ndarray | float = 0.0
    bfactor: np.ndarray | float = 0.0
    scale: np.ndarray | float = 1.0

    def __post_init__(self) -> None:
        q0 = np.asarray(self.amplitude_contrast, dtype=np.float64)
        if np.any((q0 < 0) | (q0 > 1)):
            raise ValueError("amplitude contrast: expected a fraction in [0, 1]")

    def evaluate(self, kx: np.ndarray, ky: np.ndarray, box: int,
                 pixel_size: float) -> np.ndarray:
        """CTF of every image at integer frequencies (kx, ky) of a box: (B, *kx.shape) float64.

        The spatial frequency is s = k / (box * pixel_size) 1/A.
        """
        sx = np.asarray(kx, dtype=np.float64) / (box * pixel_size)
        sy = np.asarray(ky, dtype=np.float64) / (box * pixel_size)

        def col(v: np.ndarray | float) -> np.ndarray:
            # (B,) -> (B, 1, ..., 1) so it broadcasts against the frequency grid
            return np.asarray(v, dtype=np.float64).reshape((-1,) + (1,) * sx.ndim)

        lam = electron_wavelength(col(self.voltage))
        cs = col(self.cs) * 1e7
        q0 = col(self.amplitude_contrast)
        az = np.deg2rad(col(self.defocus_angle))
        u = sx * np.cos(az) + sy * np.sin(az)
        v = -sx * np.sin(az) + sy * np.cos(az)
        s2 = sx * sx + sy * sy
        gamma = (-np.pi * lam * (col(self.defocus_u) * u * u + col(self.defocus_v) * v * v)
                 + 0.5 * np.pi * cs * lam**3 * s2 * s2
                 - np.deg2rad(col(self.phase_shift)) - np.arcsin(q0))
        ctf = -np.sin(gamma) * np.exp(-col(self.bfactor) / 4.0 * s2) * col(self.scale)
        # RELION floors |CTF| at 1e-8 and keeps the sign.
        tiny = np.abs(ctf) < 1e-8
        return np.where(tiny, np.where(ctf < 0, -1e-8, 1e-8), ctf)

    def __len__(self) -> int:
        return int(np.asarray(self.defocus_u).size)
