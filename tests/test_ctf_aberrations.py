"""cryomap.ctf aberrations and value checks, each against an independent formula:
Zernike polynomials against an explicit polynomial table (RELION's ordering), beam tilt as a
real-space translation of each frequency, even Zernike terms against equivalent CTF
parameters, the magnification matrix against transformed frequencies, and RELION's
projection-matrix rule against a matrix inverse."""

from __future__ import annotations

import numpy as np
import pytest

from cryomap import fourier
from cryomap.ctf import (
    CTF_RANGES,
    CtfParams,
    beam_tilt_odd_zernike,
    beam_tilt_phase,
    check_ctf_params,
    electron_wavelength,
    even_zernike_index,
    magnified_rotations,
    odd_zernike_index,
    zernike,
    zernike_sum,
)
from cryomap.errors import InputError
from cryomap.euler import euler_to_matrix

# RELION's orderings (jaz/math/Zernike: evenIndexToMN, oddIndexToMN) as explicit (m, n) and
# the Cartesian polynomials, written out by hand (r^2 = x^2 + y^2).
EVEN = [
    ((0, 0), lambda x, y: np.ones_like(x)),
    ((-2, 2), lambda x, y: 2 * x * y),
    ((0, 2), lambda x, y: 2 * (x * x + y * y) - 1),
    ((2, 2), lambda x, y: x * x - y * y),
    ((-4, 4), lambda x, y: 4 * x**3 * y - 4 * x * y**3),
    ((-2, 4), lambda x, y: (4 * (x * x + y * y) - 3) * 2 * x * y),
    ((0, 4), lambda x, y: 6 * (x * x + y * y) ** 2 - 6 * (x * x + y * y) + 1),
    ((2, 4), lambda x, y: (4 * (x * x + y * y) - 3) * (x * x - y * y)),
    ((4, 4), lambda x, y: x**4 - 6 * x * x * y * y + y**4),
]
ODD = [
    ((-1, 1), lambda x, y: y),
    ((1, 1), lambda x, y: x),
    ((-3, 3), lambda x, y: 3 * x * x * y - y**3),
    ((-1, 3), lambda x, y: (3 * (x * x + y * y) - 2) * y),
    ((1, 3), lambda x, y: (3 * (x * x + y * y) - 2) * x),
    ((3, 3), lambda x, y: x**3 - 3 * x * y * y),
    ((-5, 5), lambda x, y: 5 * x**4 * y - 10 * x * x * y**3 + y**5),
    ((-3, 5), lambda x, y: (5 * (x * x + y * y) - 4) * (3 * x * x * y - y**3)),
    ((-1, 5), lambda x, y: (10 * (x * x + y * y) ** 2 - 12 * (x * x + y * y) + 3) * y),
    ((1, 5), lambda x, y: (10 * (x * x + y * y) ** 2 - 12 * (x * x + y * y) + 3) * x),
]


@pytest.mark.parametrize("table, index", [(EVEN, even_zernike_index), (ODD, odd_zernike_index)],
                         ids=["even", "odd"])
def test_zernike_ordering_and_polynomials(table, index):
    rng = np.random.default_rng(0)
    x, y = rng.uniform(-1.3, 1.3, size=(2, 200))
    # measured 2.8e-14 and 2.5e-14 (float64 rounding, values up to 80); 35x margin
    for i, ((m, n), poly) in enumerate(table):
        assert index(i) == (m, n)
        np.testing.assert_allclose(zernike(m, n, x, y), poly(x, y), rtol=0, atol=1e-12)
    coeffs = rng.normal(size=(1, len(table)))
    want = sum(c * poly(x, y) for c, (_, poly) in zip(coeffs[0], table, strict=True))
    np.testing.assert_allclose(zernike_sum(coeffs, x[None], y[None], odd=table is ODD)[0], want,
                               rtol=0, atol=1e-12)


def test_zernike_at_origin_uses_phi_zero():
    assert zernike(0, 0, 0.0, 0.0) == 1.0
    assert zernike(2, 2, 0.0, 0.0) == 0.0 and zernike(0, 2, 0.0, 0.0) == -1.0


def test_beam_tilt_through_zernike_equals_closed_form():
    # RELION folds rlnBeamTiltX/Y into odd Zernike coefficients (TiltHelper::insertTilt);
    # evaluating those must give -2 pi Cs lambda^2 |s|^2 (s . tau).
    rng = np.random.default_rng(1)
    sx, sy = rng.uniform(-0.4, 0.4, size=(2, 300))
    tx, ty, cs, kv = 0.8, -1.3, 2.7, 300.0
    coeffs = beam_tilt_odd_zernike(np.array([tx]), np.array([ty]), np.array([cs]),
                                   np.array([kv]))
    via_zernike = zernike_sum(coeffs, sx[None], sy[None], odd=True)[0]
    lam = 12.2643247 / np.sqrt(300e3 * (1 + 0.978466e-6 * 300e3))
    closed = -2 * np.pi * (cs * 1e7) * lam**2 * (sx * sx + sy * sy) * (sx * tx + sy * ty) * 1e-3
    # measured 7.1e-15 and 3.6e-15 (float64 rounding, values up to 17); 14x and 28x margins
    np.testing.assert_allclose(via_zernike, closed, rtol=0, atol=1e-13)
    np.testing.assert_allclose(beam_tilt_phase(sx, sy, tx, ty, cs, kv), closed, rtol=0, atol=1e-13)


def _grating(n: int, kx: int, ky: int, shift_px=(0.0, 0.0)) -> np.ndarray:
    """cos(2 pi k.(r - c - shift)/n) on an n-box, r - c from pixel floor(n/2)."""
    c = np.arange(n) - n // 2
    y, x = np.meshgrid(c, c, indexing="ij")
    return np.cos(2 * np.pi * (kx * (x - shift_px[0]) + ky * (y - shift_px[1])) / n)


@pytest.mark.parametrize("k", [(5, 0), (3, -4), (-6, 9)])
def test_beam_tilt_moves_each_frequency_by_cs_lambda2_s2_tau(k):
    # Coma of a tilted beam: the component of frequency s is translated in real space by
    # d(s) = Cs lambda^2 |s|^2 tau. Multiplying the image FT by phase_factor must do that.
    n, pix = 64, 1.0
    tau = np.array([1.5, -2.0])  # mrad
    ctf = CtfParams(defocus_u=[1e4], defocus_v=[1e4], defocus_angle=[0.0], voltage=300.0,
                    cs=2.7, beam_tilt=tau[None])
    ky_grid, kx_grid = fourier.half_plane_freqs(n)
    factor = ctf.phase_factor(kx_grid, ky_grid, n, pix)[0]
    moved = fourier.ifft2_centered(fourier.fft2_centered(_grating(n, *k)) * factor, n)
    s = np.array(k) / (n * pix)
    d_angstrom = 2.7e7 * electron_wavelength(300.0) ** 2 * (s @ s) * tau * 1e-3
    # measured 7.8e-15 (float64 FFTs); 26x margin
    np.testing.assert_allclose(moved, _grating(n, *k, shift_px=d_angstrom / pix), rtol=0,
                               atol=2e-13)
    # a visible shift, so the test can fail: measured at least 0.128 A; margin 22%
    assert np.abs(d_angstrom).max() > 0.1


def test_odd_zernike_phase_factor():
    rng = np.random.default_rng(2)
    odd = rng.normal(size=(2, 6)) * [[30, 30, 400, 400, 400, 400]]
    ctf = CtfParams(defocus_u=[1e4, 2e4], defocus_v=[1e4, 2e4], defocus_angle=[0.0, 0.0],
                    odd_zernike=odd)
    kx, ky = np.array([0.0, 3.0, -7.0, 10.0]), np.array([1.0, -2.0, 5.0, 0.0])
    got = ctf.phase_factor(kx, ky, 48, 1.3)
    sx, sy = kx / (48 * 1.3), ky / (48 * 1.3)
    for b in range(2):
        phase = sum(c * poly(sx, sy) for c, (_, poly) in zip(odd[b], ODD, strict=False))
        # measured 2.9e-14 (float64 rounding of phases up to ~100 rad); 18x margin
        np.testing.assert_allclose(got[b], np.exp(1j * phase), rtol=0, atol=5e-13)
    assert ctf.has_phase_aberrations
    assert not CtfParams(defocus_u=[1.0], defocus_v=[1.0], defocus_angle=[0.0]
                         ).has_phase_aberrations


def test_even_zernike_equals_equivalent_ctf_parameters():
    kx, ky = np.meshgrid(np.arange(0, 33.0), np.arange(-32.0, 33.0))
    lam = electron_wavelength(300.0)
    base = dict(defocus_u=[15000.0], defocus_v=[14000.0], defocus_angle=[0.0], voltage=300.0,
                cs=2.7, amplitude_contrast=0.1)
    # Z(0,0) = 1: a constant added to gamma is a phase shift of -c
    c0 = 0.3
    a = CtfParams(**base, even_zernike=np.array([[c0]])).evaluate(kx, ky, 64, 1.1)
    b = CtfParams(**base, phase_shift=-np.rad2deg(c0)).evaluate(kx, ky, 64, 1.1)
    np.testing.assert_allclose(a, b, rtol=0, atol=2e-13)  # measured 8.2e-15 (float64); 24x
    # Z(2,2) = x^2 - y^2 (s in 1/A): astigmatism, U -= c/(pi lambda), V += c/(pi lambda)
    c3 = 2000.0
    a = CtfParams(**base, even_zernike=np.array([[0, 0, 0, c3]])).evaluate(kx, ky, 64, 1.1)
    shifted = dict(base, defocus_u=[15000.0 - c3 / (np.pi * lam)],
                   defocus_v=[14000.0 + c3 / (np.pi * lam)])
    # measured 3.2e-13 (float64 rounding of the shifted defoci); the bound 1e-12 + 1e-7 |value|
    np.testing.assert_allclose(a, CtfParams(**shifted).evaluate(kx, ky, 64, 1.1), atol=1e-12)


def test_magnification_evaluates_ctf_at_m_times_s():
    m = np.array([[1.02, 0.013], [-0.008, 0.975]])
    ctf = dict(defocus_u=[15000.0], defocus_v=[13000.0], defocus_angle=[30.0], bfactor=50.0,
               even_zernike=np.array([[0, 0, 0.4, 0, 0, 0, 90.0]]))
    kx, ky = np.meshgrid(np.arange(0, 33.0), np.arange(-32.0, 33.0))
    got = CtfParams(**ctf, mag_matrix=m[None]).evaluate(kx, ky, 64, 1.0)
    want = CtfParams(**ctf).evaluate(m[0, 0] * kx + m[0, 1] * ky, m[1, 0] * kx + m[1, 1] * ky,
                                     64, 1.0)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)  # measured 0 (both here)
    odd = dict(ctf, odd_zernike=np.array([[1.0, -2.0, 300.0]]), beam_tilt=np.array([[0.5, 1]]))
    got = CtfParams(**odd, mag_matrix=m[None]).phase_factor(kx, ky, 64, 1.0)
    want = CtfParams(**odd).phase_factor(m[0, 0] * kx + m[0, 1] * ky,
                                         m[1, 0] * kx + m[1, 1] * ky, 64, 1.0)
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-12)


def test_magnified_rotations_follow_relion_projection_matrix():
    # RELION: A' = M3^-1 A / grid_scale, sampled at inverse(A') k. The kernels sample at B^T k.
    a = euler_to_matrix([20.0, -70.0], [35.0, 120.0], [5.0, 200.0])
    m = np.array([[1.01, 0.02], [-0.015, 0.99]])
    m3 = np.eye(3)
    m3[:2, :2] = m
    g = 64 * 1.25 / (60 * 1.3)
    b = magnified_rotations(a, m, grid_scale=g)
    k = np.array([3.0, -7.0, 0.0])
    for i in range(2):
        relion = np.linalg.inv(np.linalg.inv(m3) @ a[i] / g) @ k
        # measured 8.9e-16 (float64 rounding, values up to 6.3); 22x margin
        np.testing.assert_allclose(b[i].T @ k, relion, rtol=0, atol=2e-14)
    np.testing.assert_allclose(magnified_rotations(a), a)  # measured 0 (default rtol 1e-7)


def test_per_image_pixel_sizes():
    ctf = CtfParams(defocus_u=[1e4, 1e4], defocus_v=[1e4, 1e4], defocus_angle=[0.0, 0.0])
    kx, ky = np.arange(10.0), np.zeros(10)
    both = ctf.evaluate(kx, ky, 64, np.array([1.0, 1.3]))
    # measured 0 (default rtol 1e-7)
    np.testing.assert_allclose(both[1], ctf.subset([1]).evaluate(kx, ky, 64, 1.3)[0])
    np.testing.assert_allclose(both[0], ctf.subset([0]).evaluate(kx, ky, 64, 1.0)[0])


@pytest.mark.parametrize("field, value, label", [
    ("voltage", 0.0, "rlnVoltage"), ("voltage", -300.0, "rlnVoltage"),
    ("voltage", 5000.0, "rlnVoltage"), ("cs", np.nan, "rlnSphericalAberration"),
    ("cs", 150.0, "rlnSphericalAberration"), ("defocus_u", 0.0, "rlnDefocusU"),
    ("defocus_v", -100.0, "rlnDefocusV"), ("defocus_angle", np.inf, "rlnDefocusAngle"),
    ("bfactor", np.nan, "rlnCtfBfactor"), ("scale", 0.0, "rlnCtfScalefactor"),
    ("phase_shift", np.inf, "rlnPhaseShift"), ("amplitude_contrast", 1.0,
                                               "rlnAmplitudeContrast"),
])
def test_check_ctf_params_names_field_and_range(field, value, label):
    good = dict(defocus_u=[1e4, 1e4], defocus_v=[1e4, 1e4], defocus_angle=[0.0, 0.0])
    params = CtfParams(**good)
    setattr(params, field, np.array([1.0, value]) if field in good else value)
    if field in good:
        getattr(params, field)[0] = good[field][0]
    row = "row 2" if field in good else "row 1"
    with pytest.raises(InputError, match=rf"^where, {row}: {label} = .*; expected "
                                         rf"{__import__('re').escape(CTF_RANGES[label].text())}"
                                         rf"$"):
        check_ctf_params(params, "where")
    check_ctf_params(CtfParams(**good))


def test_ranges_text():
    assert CTF_RANGES["rlnVoltage"].text() == "[10, 3000] kV"
    assert CTF_RANGES["rlnAmplitudeContrast"].text() == "[0, 1) (a fraction)"
    assert CTF_RANGES["rlnDefocusU"].text() == "> 0 A (positive = underfocus)"
    assert CTF_RANGES["rlnCtfBfactor"].text() == "a finite number (A^2)"
