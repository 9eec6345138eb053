"""Pins cryomap.ctf to RELION's CTF (docs/conventions.md "CTF"; ctf.cpp CTF::initialise,
ctf.h CTF::getCTF). The reference formulas are re-written here from the sheet."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.optimize import brentq

from cryomap.ctf import CtfParams, electron_wavelength


def ref_wavelength(kv: float) -> float:
    v = kv * 1e3
    return 12.2643247 / math.sqrt(v * (1 + 0.978466e-6 * v))


def ref_gamma(sx, sy, u_def, v_def, az_deg, kv, cs_mm, q0, phase_deg):
    """gamma(s) = -K1 (U u^2 + V v^2) + K2 |s|^4 - K5 - K3 (docs/conventions.md "CTF")."""
    lam = ref_wavelength(kv)
    k1 = math.pi * lam
    k2 = math.pi / 2 * cs_mm * 1e7 * lam**3
    k3 = math.atan(q0 / math.sqrt(1 - q0 * q0)) if q0 < 1 else math.pi / 2
    k5 = math.radians(phase_deg)
    az = math.radians(az_deg)
    u = sx * math.cos(az) + sy * math.sin(az)
    v = -sx * math.sin(az) + sy * math.cos(az)
    s2 = sx * sx + sy * sy
    return -k1 * (u_def * u * u + v_def * v * v) + k2 * s2 * s2 - k5 - k3


def ref_ctf_chi_form(sx, sy, u_def, v_def, az_deg, kv, cs_mm, q0, phase_deg, bfac, scale):
    """The equivalent 'chi' form of the sheet, with Delta f(theta) from the azimuth."""
    lam = ref_wavelength(kv)
    s2 = sx * sx + sy * sy
    theta = math.atan2(sy, sx)
    df = (u_def + v_def) / 2 + (u_def - v_def) / 2 * math.cos(2 * (theta - math.radians(az_deg)))
    chi = (math.pi * lam * df * s2 - math.pi / 2 * cs_mm * 1e7 * lam**3 * s2 * s2
           + math.radians(phase_deg))
    return scale * math.exp(-bfac * s2 / 4) * (math.sqrt(1 - q0 * q0) * math.sin(chi)
                                              + q0 * math.cos(chi))


def ctf1(**kw) -> CtfParams:
    base = dict(defocus_u=15000.0, defocus_v=15000.0, defocus_angle=0.0)
    base.update(kw)
    return CtfParams(**base)


def at(p: CtfParams, sx, sy, box=100, pix=1.0):
    """Evaluate at spatial frequencies (1/A) by passing k = s * box * pix."""
    kx = np.asarray(sx, float) * box * pix
    ky = np.asarray(sy, float) * box * pix
    return p.evaluate(kx, ky, box, pix)


def test_wavelength():
    # the literals are truncated to 6 decimals: measured 6.2e-7 and 4.9e-7; then measured 0
    # against the sheet's formula (float64)
    assert float(electron_wavelength(300)) == pytest.approx(0.019687, abs=1e-6)
    assert float(electron_wavelength(200)) == pytest.approx(0.025079, abs=1e-6)
    assert float(electron_wavelength(300)) == pytest.approx(ref_wavelength(300), rel=1e-14)
    np.testing.assert_allclose(electron_wavelength(np.array([100.0, 120.0, 300.0])),
                               [ref_wavelength(v) for v in (100, 120, 300)], rtol=1e-14)


@pytest.mark.parametrize("q0, scale", [(0.1, 1.0), (0.07, 1.0), (0.2, 0.5), (1.0, 2.0)])
def test_ctf_at_origin_is_plus_q0_scale(q0, scale):
    p = ctf1(amplitude_contrast=q0, scale=scale)
    c = p.evaluate(np.array([0.0]), np.array([0.0]), 64, 1.0)
    assert c.shape == (1, 1)
    assert c[0, 0] == pytest.approx(q0 * scale, rel=1e-12)  # measured 0 (float64)
    assert c[0, 0] > 0  # white particles


def test_ctf_at_origin_with_q0_zero_is_floored_positive():
    p = ctf1(amplitude_contrast=0.0)
    assert p.evaluate(np.array([0.0]), np.array([0.0]), 64, 1.0)[0, 0] == 1e-8


@pytest.mark.parametrize("q0", [0.0, 0.1, 0.3])
def test_phase_shift_90(q0):
    p = ctf1(amplitude_contrast=q0, phase_shift=90.0, scale=0.8)
    c0 = p.evaluate(np.array([0.0]), np.array([0.0]), 64, 1.0)[0, 0]
    # -sin(-pi/2 - asin q0) = cos(asin q0) = sqrt(1 - q0^2)
    assert c0 == pytest.approx(0.8 * math.sqrt(1 - q0 * q0), rel=1e-12)  # measured 0


@pytest.mark.parametrize("defocus, cs, kv, q0", [(15000.0, 2.7, 300.0, 0.1),
                                                 (8000.0, 2.0, 200.0, 0.07),
                                                 (25000.0, 0.01, 300.0, 0.1)])
def test_first_zero_matches_analytic_root(defocus, cs, kv, q0):
    def g(s):
        return ref_gamma(s, 0.0, defocus, defocus, 0.0, kv, cs, q0, 0.0)

    # gamma starts at -asin(q0) and decreases: the first zero of -sin(gamma) is gamma = -pi
    s_hi = math.sqrt(2.0 / (ref_wavelength(kv) * defocus))  # defocus term alone reaches -2pi
    s0 = brentq(lambda s: g(s) + math.pi, 1e-6, s_hi, xtol=1e-14)
    p = ctf1(defocus_u=defocus, defocus_v=defocus, cs=cs, voltage=kv, amplitude_contrast=q0)
    # isotropic: the zero lies on a circle, test along several directions
    for ang in (0.0, 0.7, 2.0):
        c = at(p, [s0 * math.cos(ang)], [s0 * math.sin(ang)])[0, 0]
        assert abs(c) <= 1e-8  # floored at 1e-8 exactly at the zero
        eps = 1e-6
        before = at(p, [(1 - eps) * s0 * math.cos(ang)], [(1 - eps) * s0 * math.sin(ang)])
        after = at(p, [(1 + eps) * s0 * math.cos(ang)], [(1 + eps) * s0 * math.sin(ang)])
        assert before[0, 0] > 0 > after[0, 0]
    # positive all the way from 0 to the first zero
    s = np.linspace(0, s0 * 0.999, 400)
    assert np.all(at(p, s, np.zeros_like(s)) > 0)
    # hand value for 15000 A, 300 kV, Q0 0.1: without Cs, s^2 = (1 - asin(0.1)/pi)/(lambda df)
    # -> 1/s = 17.465 A; Cs pushes the zero slightly outwards (17.455 A)
    if defocus == 15000.0 and kv == 300.0:
        # measured 17.4554 (0.0004 from the hand value's last digit)
        assert 1 / s0 == pytest.approx(17.455, abs=0.001)
        assert 1 / s0 < math.sqrt(0.0196876 * 15000 / (1 - math.asin(0.1) / math.pi))


def test_matches_sheet_formulas_on_a_grid():
    rng = np.random.default_rng(0)
    box, pix = 32, 1.3
    ky, kx = np.meshgrid(np.r_[0:17, -15:0], np.arange(17), indexing="ij")
    for _ in range(4):
        u_def = rng.uniform(5000, 30000)
        v_def = rng.uniform(5000, 30000)
        az, kv = rng.uniform(-180, 180), rng.choice([200.0, 300.0])
        cs, q0 = rng.uniform(0.0, 3.0), rng.uniform(0.0, 0.3)
        ph, bf, sc = rng.uniform(0, 120), rng.uniform(-50, 150), rng.uniform(0.5, 1.5)
        p = CtfParams(u_def, v_def, az, kv, cs, q0, ph, bf, sc)
        got = p.evaluate(kx, ky, box, pix)
        assert got.shape == (1,) + kx.shape
        for i, j in [(0, 1), (3, 5), (20, 7), (31, 16), (16, 0), (5, 0)]:
            sx, sy = kx[i, j] / (box * pix), ky[i, j] / (box * pix)
            gam = ref_gamma(sx, sy, u_def, v_def, az, kv, cs, q0, ph)
            ref1 = -math.sin(gam) * math.exp(-bf / 4 * (sx * sx + sy * sy)) * sc
            ref2 = ref_ctf_chi_form(sx, sy, u_def, v_def, az, kv, cs, q0, ph, bf, sc)
            # the two forms: measured 1.8e-13 (float64 rounding of gamma, up to ~100 rad);
            # the module against the sheet: measured 0
            assert ref1 == pytest.approx(ref2, abs=1e-12)
            assert got[0, i, j] == pytest.approx(ref1, abs=1e-12)


def test_astigmatism_u_along_angle_v_perpendicular():
    az = 30.0
    p = ctf1(defocus_u=20000.0, defocus_v=10000.0, defocus_angle=az)
    pu = ctf1(defocus_u=20000.0, defocus_v=20000.0)
    pv = ctf1(defocus_u=10000.0, defocus_v=10000.0)
    s = np.linspace(0.0, 0.3, 60)
    for theta, iso in ((az, pu), (az + 90, pv), (az + 180, pu), (az - 90, pv)):
        t = math.radians(theta)
        # measured 1.4e-14 (float64 rounding); 21x margin
        np.testing.assert_allclose(at(p, s * math.cos(t), s * math.sin(t)),
                                   at(iso, s, np.zeros_like(s)), rtol=0, atol=3e-13)
    # and U and V are not the same CTF: the angle matters (measured: they differ by up to 1.92)
    t = math.radians(az)
    assert not np.allclose(at(p, s * math.cos(t), s * math.sin(t)),
                           at(pv, s, np.zeros_like(s)), atol=1e-3)


def test_bfactor_envelope_and_scale():
    s = np.linspace(0.01, 0.4, 50)
    zero = np.zeros_like(s)
    base = at(ctf1(), s, zero)[0]
    # measured 2.8e-15 relative for the envelope (float64 rounding; 18x margin) and 0 for the
    # scale; atol: the 1e-8 floor may move a value near a zero by up to 2e-8
    for b in (50.0, 150.0, -30.0):
        np.testing.assert_allclose(at(ctf1(bfactor=b), s, zero)[0],
                                   base * np.exp(-b * s * s / 4), rtol=5e-14, atol=2e-8)
    for sc in (0.5, 2.0):
        np.testing.assert_allclose(at(ctf1(scale=sc), s, zero)[0], base * sc, rtol=5e-14,
                                   atol=2e-8)


def test_batch_equals_one_by_one():
    rng = np.random.default_rng(1)
    b = 5
    arrays = dict(
        defocus_u=rng.uniform(8000, 25000, b), defocus_v=rng.uniform(8000, 25000, b),
        defocus_angle=rng.uniform(-90, 90, b), voltage=np.array([300.0, 200.0, 300.0, 300, 120]),
        cs=rng.uniform(0, 3, b), amplitude_contrast=rng.uniform(0, 0.2, b),
        phase_shift=rng.uniform(0, 90, b), bfactor=rng.uniform(0, 100, b),
        scale=rng.uniform(0.5, 1.5, b))
    p = CtfParams(**arrays)
    assert len(p) == b
    ky, kx = np.meshgrid(np.r_[0:9, -7:0], np.arange(9), indexing="ij")
    allv = p.evaluate(kx, ky, 16, 1.1)
    assert allv.shape == (b, 16, 9)
    for i in range(b):
        one = CtfParams(**{k: float(v[i]) for k, v in arrays.items()})
        # measured 0 (the same float64 arithmetic); the bounds allow rounding
        np.testing.assert_allclose(allv[i], one.evaluate(kx, ky, 16, 1.1)[0], rtol=1e-13,
                                   atol=1e-15)
    # scalars broadcast against per-image arrays
    mixed = CtfParams(arrays["defocus_u"], arrays["defocus_v"], arrays["defocus_angle"])
    assert mixed.evaluate(kx, ky, 16, 1.1).shape == (b, 16, 9)
    np.testing.assert_allclose(  # measured 0 (default rtol 1e-7)
        mixed.evaluate(kx, ky, 16, 1.1)[2],
        CtfParams(float(arrays["defocus_u"][2]), float(arrays["defocus_v"][2]),
                  float(arrays["defocus_angle"][2])).evaluate(kx, ky, 16, 1.1)[0])


@pytest.mark.parametrize("q0", [-0.01, 1.01, np.array([0.1, 1.5]), np.array([-0.2, 0.1])])
def test_amplitude_contrast_outside_unit_interval_raises(q0):
    with pytest.raises(ValueError):
        ctf1(amplitude_contrast=q0)


def test_amplitude_contrast_bounds_accepted():
    ctf1(amplitude_contrast=0.0)
    ctf1(amplitude_contrast=1.0)


def test_floor_keeps_sign():
    # a tiny scale puts every value below 1e-8 in magnitude: all become +-1e-8 with the sign
    # of the unscaled CTF (RELION: retval = SGN(retval) * 1e-8, SGN(0) = +1)
    s = np.linspace(0.05, 0.3, 200)
    zero = np.zeros_like(s)
    big = at(ctf1(), s, zero)[0]
    tiny = at(ctf1(scale=1e-12), s, zero)[0]
    assert np.all(np.abs(tiny) == 1e-8)
    np.testing.assert_array_equal(np.sign(tiny), np.sign(big))
    assert (big > 0).any() and (big < 0).any()
    # negative scale: values keep their (now flipped) sign
    neg = at(ctf1(scale=-1e-12), s, zero)[0]
    np.testing.assert_array_equal(np.sign(neg), -np.sign(big))
    # values at or above the floor are untouched
    ok = np.abs(big) >= 1e-8
    np.testing.assert_allclose(big[ok], [
        -math.sin(ref_gamma(x, 0, 15000, 15000, 0, 300, 2.7, 0.1, 0)) for x in s[ok]],
        rtol=0, atol=3e-13)  # measured 1.4e-14 (float64 rounding); 21x margin
