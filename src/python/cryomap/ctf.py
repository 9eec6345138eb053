"""RELION's CTF and optical aberrations (docs/conventions.md, "CTF" and "Aberrations").

CTF(s) = -scale * exp(-B |s'|^2 / 4) * sin(gamma(s')),
gamma = -pi lambda (U u^2 + V v^2) + (pi/2) Cs lambda^3 |s'|^4 - phase_shift - asin(Q0)
        + sum_j even_j Z_j(s'),
with s' = M s (M = rlnMagMat, identity when absent), (u, v) = s' rotated by the astigmatism
angle and Z_j RELION's even Zernike polynomials of s' in 1/A. Positive defocus is underfocus,
so without phase shift CTF(0) = +Q0 * scale (particles are white).

Antisymmetric aberrations do not change |CTF|: they multiply the predicted image by
exp(i phi(s')), phi = sum_j odd_j Z_j(s') - 2 pi Cs lambda^2 |s'|^2 (s'.tau) (tau = beam tilt
in radians). `CtfParams.phase_factor` returns that factor; the engine multiplies the
projected reference by it (RELION: ObservationModel::predictObservation), i.e.
X ~ CTF * phase_factor * Proj(V).

`CTF_RANGES` holds the values cryomap accepts for each CTF field (one place, used by every
reader and command before anything is computed or written).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields, replace

import numpy as np

from .errors import InputError


def electron_wavelength(voltage_kv: np.ndarray | float) -> np.ndarray:
    """Relativistic electron wavelength in Angstrom for an accelerating voltage in kV."""
    v = np.asarray(voltage_kv, dtype=np.float64) * 1e3
    return 12.2643247 / np.sqrt(v * (1.0 + 0.978466e-6 * v))


# -- accepted values ----------------------------------------------------------------------------


@dataclass(frozen=True)
class ValueRange:
    """An accepted interval (non-finite values are always refused)."""

    lo: float = -math.inf
    hi: float = math.inf
    lo_open: bool = False
    hi_open: bool = False
    unit: str = ""
    note: str = ""

    def bad(self, values: np.ndarray) -> np.ndarray:
        """Boolean mask of the values outside the range (NaN and inf included)."""
        v = np.asarray(values, dtype=np.float64)
        with np.errstate(invalid="ignore"):
            ok = np.isfinite(v)
            ok &= (v > self.lo) if self.lo_open else (v >= self.lo)
            ok &= (v < self.hi) if self.hi_open else (v <= self.hi)
        return ~ok

    def text(self) -> str:
        """What is expected, for an error message."""
        unit = f" {self.unit}" if self.unit else ""
        if math.isinf(self.lo) and math.isinf(self.hi):
            out = f"a finite number{' (' + self.unit + ')' if self.unit else ''}"
        elif math.isinf(self.hi):
            out = f"{'>' if self.lo_open else '>='} {self.lo:g}{unit}"
        elif math.isinf(self.lo):
            out = f"{'<' if self.hi_open else '<='} {self.hi:g}{unit}"
        else:
            out = (f"{'(' if self.lo_open else '['}{self.lo:g}, {self.hi:g}"
                   f"{')' if self.hi_open else ']'}{unit}")
        return out + (f" ({self.note})" if self.note else "")


_FINITE = ValueRange()

#: Accepted values of the CTF-related STAR fields. RELION refuses Q0 outside [0, 1]; cryomap
#: also refuses Q0 = 1 (no phase contrast) and defocus <= 0 (RELION takes any value).
CTF_RANGES: dict[str, ValueRange] = {
    "rlnVoltage": ValueRange(10.0, 3000.0, unit="kV"),
    "rlnSphericalAberration": ValueRange(-100.0, 100.0, unit="mm"),
    "rlnAmplitudeContrast": ValueRange(0.0, 1.0, hi_open=True, note="a fraction"),
    "rlnDefocusU": ValueRange(0.0, lo_open=True, unit="A", note="positive = underfocus"),
    "rlnDefocusV": ValueRange(0.0, lo_open=True, unit="A", note="positive = underfocus"),
    "rlnDefocusAngle": ValueRange(unit="deg"),
    "rlnPhaseShift": ValueRange(unit="deg"),
    "rlnCtfBfactor": ValueRange(unit="A^2"),
    "rlnCtfScalefactor": ValueRange(0.0, lo_open=True),
    "rlnBeamTiltX": ValueRange(unit="mrad"),
    "rlnBeamTiltY": ValueRange(unit="mrad"),
    "rlnMagMat00": _FINITE, "rlnMagMat01": _FINITE, "rlnMagMat10": _FINITE,
    "rlnMagMat11": _FINITE,
}

#: CtfParams field -> STAR label (for messages about CtfParams built in Python).
FIELD_LABELS = {
    "defocus_u": "rlnDefocusU", "defocus_v": "rlnDefocusV", "defocus_angle": "rlnDefocusAngle",
    "voltage": "rlnVoltage", "cs": "rlnSphericalAberration",
    "amplitude_contrast": "rlnAmplitudeContrast", "phase_shift": "rlnPhaseShift",
    "bfactor": "rlnCtfBfactor", "scale": "rlnCtfScalefactor",
}


def check_values(label: str, values: np.ndarray, where: str,
                 rows: np.ndarray | None = None) -> None:
    """InputError "<where>, row r: <label> = v; expected <range>" for the first value of
    `values` outside CTF_RANGES[label] (rows: 0-based row numbers of the values)."""
    bad = CTF_RANGES[label].bad(values)
    if np.any(bad):
        i = int(np.argmax(bad))
        r = i if rows is None else int(np.asarray(rows)[i])
        v = np.asarray(values, dtype=np.float64).ravel()[i]
        raise InputError(f"{where}, row {r + 1}: {label} = {v:g}; expected "
                         f"{CTF_RANGES[label].text()}")


def check_ctf_params(params: CtfParams, where: str = "CTF parameters") -> None:
    """Check every value of `params` against CTF_RANGES (InputError on the first bad one)."""
    n = len(params)
    for name, label in FIELD_LABELS.items():
        v = np.broadcast_to(np.asarray(getattr(params, name), dtype=np.float64), (n,))
        check_values(label, v, where)
    for name in ("even_zernike", "odd_zernike", "beam_tilt", "mag_matrix"):
        v = getattr(params, name)
        if v is not None and not np.all(np.isfinite(v)):
            raise InputError(f"{where}: {name} holds NaN/inf; expected finite values")
    if params.mag_matrix is not None:
        det = np.linalg.det(np.asarray(params.mag_matrix, dtype=np.float64))
        if np.any(det <= 0):
            raise InputError(f"{where}: magnification matrix with determinant "
                             f"{float(det.ravel()[np.argmax(det.ravel() <= 0)]):g}; expected a "
                             f"matrix close to the identity (determinant > 0)")


# -- Zernike polynomials (RELION's jaz/math/Zernike) --------------------------------------------


def even_zernike_index(i: int) -> tuple[int, int]:
    """(m, n) of the i-th even coefficient (rlnEvenZernike): n = 2k, m = -n, -n+2, ..., n
    for k = 0, 1, 2, ... (i = 0: Z(0,0); 1..3: Z(-2,2), Z(0,2), Z(2,2); 4..8: n = 4)."""
    k = math.isqrt(i)
    return 2 * (i - k * k - k), 2 * k


def odd_zernike_index(i: int) -> tuple[int, int]:
    """(m, n) of the i-th odd coefficient (rlnOddZernike): n = 2k+1, m = -n, -n+2, ..., n
    (i = 0, 1: Z(-1,1), Z(1,1); 2..5: Z(-3,3), Z(-1,3), Z(1,3), Z(3,3); ...)."""
    k = (math.isqrt(1 + 4 * i) - 1) // 2
    n = 2 * k + 1
    return 2 * (i - (k * k + k)) - n, n


def zernike_radial(m: int, n: int, rho: np.ndarray) -> np.ndarray:
    """Radial polynomial R_n^|m|(rho) (unnormalised: R_n^m(1) = 1), 0 when n - |m| is odd."""
    m = abs(m)
    if m > n:
        raise ValueError(f"Zernike: |m| = {m} > n = {n}")
    rho = np.asarray(rho, dtype=np.float64)
    out = np.zeros_like(rho)
    if (n - m) % 2:
        return out
    for k in range((n - m) // 2 + 1):
        c = ((-1) ** k * math.factorial(n - k)
             / (math.factorial(k) * math.factorial((n + m) // 2 - k)
                * math.factorial((n - m) // 2 - k)))
        out = out + c * rho ** (n - 2 * k)
    return out


def zernike(m: int, n: int, x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """RELION's Z(m, n) at Cartesian (x, y): R_n^|m|(r) cos(m phi) for m >= 0, R_n^|m|(r)
    sin(|m| phi) for m < 0, r = |(x, y)|, phi = atan2(y, x). The radius is not normalised to
    a unit disc: RELION evaluates it at spatial frequencies in 1/A."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    r = np.hypot(x, y)
    phi = np.arctan2(y, x)  # atan2(0, 0) = 0, as RELION's Z_cart at the origin
    rad = zernike_radial(m, n, r)
    return rad * (np.cos(m * phi) if m >= 0 else np.sin(-m * phi))


def zernike_sum(coeffs: np.ndarray, sx: np.ndarray, sy: np.ndarray, odd: bool) -> np.ndarray:
    """sum_j coeffs[b, j] Z_j(sx, sy) with RELION's even or odd ordering.

    coeffs: (B, K). sx, sy: frequencies (1/A) with a leading image axis of size B or 1,
    e.g. (1, J) for one grid shared by all images or (B, J) for one grid per image.
    Returns (B, ...).
    """
    c = np.asarray(coeffs, dtype=np.float64)
    c = c.reshape(-1, c.shape[-1]) if c.ndim else c.reshape(1, 1)
    sx, sy = np.asarray(sx, dtype=np.float64), np.asarray(sy, dtype=np.float64)
    shape = np.broadcast_shapes(sx.shape, sy.shape, (c.shape[0],) + (1,) * (sx.ndim - 1))
    index = odd_zernike_index if odd else even_zernike_index
    out = np.zeros(shape)
    for j in range(c.shape[1]):
        cj = c[:, j]
        if not np.any(cj):
            continue
        m, n = index(j)
        out = out + cj.reshape((-1,) + (1,) * (out.ndim - 1)) * zernike(m, n, sx, sy)
    return out


def beam_tilt_odd_zernike(tilt_x_mrad: np.ndarray, tilt_y_mrad: np.ndarray, cs_mm: np.ndarray,
                          voltage_kv: np.ndarray) -> np.ndarray:
    """Beam tilt as odd Zernike coefficients (B, 6), as RELION folds rlnBeamTiltX/Y into
    rlnOddZernike (TiltHelper::insertTilt): the phase -2 pi Cs lambda^2 |s|^2 (s.tau) equals
    3 c (x^2 + y^2)(tx x + ty y) written with Z(1,3) = (3 r^2 - 2) x and Z(1,1) = x (and y)."""
    lam = electron_wavelength(voltage_kv)
    scale = np.asarray(cs_mm, dtype=np.float64) * 1e7 * 2e-3 * np.pi * lam * lam
    z3x = -scale * np.asarray(tilt_x_mrad, dtype=np.float64) / 3.0
    z3y = -scale * np.asarray(tilt_y_mrad, dtype=np.float64) / 3.0
    out = np.zeros(np.broadcast_shapes(z3x.shape, z3y.shape) + (6,))
    out[..., 0] = 2.0 * z3y  # Z(-1,1) = y
    out[..., 1] = 2.0 * z3x  # Z(1,1) = x
    out[..., 3] = z3y  # Z(-1,3) = (3r^2-2) y
    out[..., 4] = z3x  # Z(1,3) = (3r^2-2) x
    return out


def beam_tilt_phase(sx: np.ndarray, sy: np.ndarray, tilt_x_mrad: float | np.ndarray,
                    tilt_y_mrad: float | np.ndarray, cs_mm: float | np.ndarray,
                    voltage_kv: float | np.ndarray) -> np.ndarray:
    """Phase (radians) of beam tilt tau = (tx, ty) mrad at spatial frequency (sx, sy) 1/A:
    -2 pi Cs lambda^2 |s|^2 (s . tau) (RELION 3.1+ sign, through its odd Zernike terms).

    Multiplying an image FT by exp(i phase) translates each frequency component s by
    +Cs lambda^2 |s|^2 tau (A) in real space: the coma of a tilted beam."""
    lam = electron_wavelength(voltage_kv)
    cs = np.asarray(cs_mm, dtype=np.float64) * 1e7
    tx = np.asarray(tilt_x_mrad, dtype=np.float64) * 1e-3
    ty = np.asarray(tilt_y_mrad, dtype=np.float64) * 1e-3
    s2 = sx * sx + sy * sy
    return -2.0 * np.pi * cs * lam * lam * s2 * (sx * tx + sy * ty)


def magnified_rotations(rotations: np.ndarray, mag_matrix: np.ndarray | None = None,
                        grid_scale: float = 1.0) -> np.ndarray:
    """Matrices B to give the projection kernels (which sample the reference at B^T k) so
    that image pixel k samples the reference at grid_scale * A^T M k.

    RELION projects with A' = M^-1 A / grid_scale (ObservationModel::applyAnisoMag,
    applyScaleDifference) and samples at A'^-1 k; for a rotation A that is
    B = grid_scale * M3^T A with M3 = [[M, 0], [0, 1]]. grid_scale = (N_ref pix_ref) /
    (N_img pix_img) (fourier.grid_scale) maps an optics group's grid onto the reference's.
    rotations (..., 3, 3); mag_matrix (2, 2) or (..., 2, 2) or None.
    """
    a = np.asarray(rotations, dtype=np.float64)
    if mag_matrix is None:
        return a * float(grid_scale)
    m = np.asarray(mag_matrix, dtype=np.float64)
    m3 = np.zeros(m.shape[:-2] + (3, 3))
    m3[..., :2, :2] = m
    m3[..., 2, 2] = 1.0
    return float(grid_scale) * np.einsum("...ji,...jk->...ik", m3, a)


# -- per-image parameters -----------------------------------------------------------------------


@dataclass
class CtfParams:
    """Per-image CTF parameters (arrays of length B; scalars broadcast).

    Units as in RELION STAR files: defocus in Angstrom (+ = underfocus), angles in degrees,
    voltage in kV, Cs in mm, B-factor in A^2. Optional aberrations (None = absent):
    even_zernike (B, Ke) and odd_zernike (B, Ko) in radians per RELION's polynomials of
    the spatial frequency in 1/A, beam_tilt (B, 2) (x, y) in mrad, mag_matrix (B, 2, 2).
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
    even_zernike: np.ndarray | None = None
    odd_zernike: np.ndarray | None = None
    beam_tilt: np.ndarray | None = None
    mag_matrix: np.ndarray | None = None

    def __post_init__(self) -> None:
        q0 = np.asarray(self.amplitude_contrast, dtype=np.float64)
        if np.any((q0 < 0) | (q0 > 1)):
            raise ValueError("amplitude contrast: expected a fraction in [0, 1]")

    def __len__(self) -> int:
        return int(np.asarray(self.defocus_u).size)

    @property
    def has_phase_aberrations(self) -> bool:
        """True when phase_factor is not identically 1 (odd Zernike or beam tilt present)."""
        return any(v is not None and np.any(np.asarray(v) != 0)
                   for v in (self.odd_zernike, self.beam_tilt))

    def subset(self, idx: slice | np.ndarray) -> CtfParams:
        """The parameters of images idx (scalar fields stay scalars)."""
        n = len(self)
        values = {}
        for f in fields(self):
            v = getattr(self, f.name)
            if v is None:
                continue
            a = np.asarray(v, dtype=np.float64)
            if f.name in ("even_zernike", "odd_zernike", "beam_tilt", "mag_matrix"):
                values[f.name] = a[idx]
            else:
                values[f.name] = np.broadcast_to(a, (n,))[idx] if a.ndim else a
        return replace(self, **values)

    def _frequencies(self, kx: np.ndarray, ky: np.ndarray, box: int,
                     pixel_size: float | np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Spatial frequencies (B, *kx.shape) in 1/A after the magnification matrix."""
        kx = np.asarray(kx, dtype=np.float64)
        extra = (1,) * kx.ndim
        pix = np.asarray(pixel_size, dtype=np.float64).reshape((-1,) + extra)
        sx = kx[None] / (box * pix)
        sy = np.asarray(ky, dtype=np.float64)[None] / (box * pix)
        if self.mag_matrix is not None:
            m = np.asarray(self.mag_matrix, dtype=np.float64).reshape(-1, 2, 2)
            m = m.reshape(m.shape[:1] + extra + (2, 2))
            # RELION (CTF::getCTF, getPhaseCorrection): s' = M s.
            sx, sy = m[..., 0, 0] * sx + m[..., 0, 1] * sy, m[..., 1, 0] * sx + m[..., 1, 1] * sy
        return sx, sy

    def gamma(self, kx: np.ndarray, ky: np.ndarray, box: int,
              pixel_size: float | np.ndarray) -> np.ndarray:
        """RELION's gamma (radians) at integer frequencies (kx, ky) of a box: (B, *kx.shape),
        including the magnification matrix and the even Zernike terms."""
        sx, sy = self._frequencies(kx, ky, box, pixel_size)
        extra = (1,) * (sx.ndim - 1)

        def col(v: np.ndarray | float) -> np.ndarray:
            # (B,) -> (B, 1, ..., 1) so it broadcasts against the frequency grid
            return np.asarray(v, dtype=np.float64).reshape((-1,) + extra)

        lam = electron_wavelength(col(self.voltage))
        cs = col(self.cs) * 1e7
        q0 = col(self.amplitude_contrast)
        az = np.deg2rad(col(self.defocus_angle))
        u = sx * np.cos(az) + sy * np.sin(az)
        v = -sx * np.sin(az) + sy * np.cos(az)
        s2 = sx * sx + sy * sy
        g = (-np.pi * lam * (col(self.defocus_u) * u * u + col(self.defocus_v) * v * v)
             + 0.5 * np.pi * cs * lam**3 * s2 * s2
             - np.deg2rad(col(self.phase_shift)) - np.arcsin(q0))
        if self.even_zernike is not None:
            g = g + zernike_sum(np.asarray(self.even_zernike).reshape(len(self), -1), sx, sy,
                                odd=False)
        return g

    def evaluate(self, kx: np.ndarray, ky: np.ndarray, box: int,
                 pixel_size: float | np.ndarray) -> np.ndarray:
        """CTF of every image at integer frequencies (kx, ky) of a box: (B, *kx.shape) float64.

        The spatial frequency is s = k / (box * pixel_size) 1/A (pixel_size a scalar or one
        per image), then s' = M s with the magnification matrix; even Zernike terms are
        added to gamma.
        """
        sx, sy = self._frequencies(kx, ky, box, pixel_size)
        extra = (1,) * (sx.ndim - 1)
        s2 = sx * sx + sy * sy
        b = np.asarray(self.bfactor, dtype=np.float64).reshape((-1,) + extra)
        sc = np.asarray(self.scale, dtype=np.float64).reshape((-1,) + extra)
        ctf = -np.sin(self.gamma(kx, ky, box, pixel_size)) * np.exp(-b / 4.0 * s2) * sc
        # RELION floors |CTF| at 1e-8 and keeps the sign.
        tiny = np.abs(ctf) < 1e-8
        return np.where(tiny, np.where(ctf < 0, -1e-8, 1e-8), ctf)

    def odd_phase(self, kx: np.ndarray, ky: np.ndarray, box: int,
                  pixel_size: float | np.ndarray) -> np.ndarray:
        """Antisymmetric aberration phase (radians), (B, *kx.shape): odd Zernike terms plus
        beam tilt, at the magnified frequency s' = M s (RELION: getPhaseCorrection)."""
        sx, sy = self._frequencies(kx, ky, box, pixel_size)
        phase = np.zeros(np.broadcast_shapes(sx.shape, (len(self),) + (1,) * (sx.ndim - 1)))
        if self.odd_zernike is not None:
            phase = phase + zernike_sum(np.asarray(self.odd_zernike).reshape(len(self), -1),
                                        sx, sy, odd=True)
        if self.beam_tilt is not None:
            n, extra = len(self), (1,) * (sx.ndim - 1)

            def col(v: np.ndarray | float) -> np.ndarray:
                return np.broadcast_to(np.asarray(v, np.float64), (n,)).reshape((-1,) + extra)

            t = np.asarray(self.beam_tilt, dtype=np.float64).reshape(-1, 2)
            phase = phase + beam_tilt_phase(sx, sy, col(t[:, 0]), col(t[:, 1]), col(self.cs),
                                            col(self.voltage))
        return phase

    def phase_factor(self, kx: np.ndarray, ky: np.ndarray, box: int,
                     pixel_size: float | np.ndarray) -> np.ndarray:
        """exp(i * odd_phase): complex128 (B, *kx.shape). The engine multiplies the projected
        reference by it (with the CTF): X ~ CTF * phase_factor * Proj(V)."""
        return np.exp(1j * self.odd_phase(kx, ky, box, pixel_size))
