"""Pins cryomap.sampling to RELION's HealpixSampling (docs/conventions.md "Pose sampling")."""

from __future__ import annotations

import math

import healpy
import numpy as np
import pytest

from cryomap.euler import euler_to_matrix, projection_direction
from cryomap.sampling import (
    angular_step,
    healpix_directions,
    healpix_nside,
    orientations_2d,
    orientations_3d,
    psi_angles,
    translations,
)


@pytest.mark.parametrize("order", [0, 1, 2, 3, 4])
def test_healpix_counts_and_nside(order):
    assert healpix_nside(order) == 2**order
    rot, tilt = healpix_directions(order)
    assert rot.shape == tilt.shape == (12 * 4**order,)


def test_healpix_negative_order_raises():
    with pytest.raises(ValueError):
        healpix_nside(-1)


@pytest.mark.parametrize("order, step", [(0, 60.0), (1, 30.0), (2, 15.0), (3, 7.5), (4, 3.75)])
def test_angular_step(order, step):
    assert angular_step(order) == pytest.approx(step, abs=1e-12)  # measured 0


@pytest.mark.parametrize("order", [0, 1, 2, 3])
def test_directions_are_nest_pixel_centres(order):
    nside = 2**order
    rot, tilt = healpix_directions(order)
    assert np.all((rot >= -180) & (rot <= 180))
    assert np.all((tilt >= 0) & (tilt <= 180))
    ipix = np.arange(12 * nside * nside)
    vec = np.stack(healpy.pix2vec(nside, ipix, nest=True), axis=1)
    # measured 6.7e-16 (float64 rounding); 15x margin
    np.testing.assert_allclose(projection_direction(rot, tilt), vec, rtol=0, atol=1e-14)
    # tilt = acos(z) exactly as RELION's getDirectionFromHealPix: measured 2.8e-14 degrees;
    # 18x margin
    np.testing.assert_allclose(tilt, np.degrees(np.arccos(vec[:, 2])), rtol=0, atol=5e-13)
    # NEST, not RING, order (they differ from order 1 on; measured: by up to 1.99)
    if order >= 1:
        ring = np.stack(healpy.pix2vec(nside, ipix, nest=False), axis=1)
        assert not np.allclose(projection_direction(rot, tilt), ring)


def test_directions_order0_explicit():
    # NEST pixel 0 of Nside 1: z = 2/3, phi = 45 deg (the approx here: measured 0)
    rot, tilt = healpix_directions(0)
    assert rot[0] == pytest.approx(45.0)
    assert tilt[0] == pytest.approx(math.degrees(math.acos(2 / 3)))
    # phi in (180, 360) is wrapped to negative rot
    assert (rot < 0).any()
    assert rot[3] == pytest.approx(-45.0)  # pixel 3: phi = 315 deg


def test_psi_angles_15():
    psi = psi_angles(15.0)
    assert psi.size == 24
    # measured 0 against the default rtol 1e-7 (and approx's 1e-6)
    np.testing.assert_allclose(psi, np.arange(24) * 15.0)
    assert psi[0] == 0.0 and psi[-1] == pytest.approx(345.0)


def test_psi_angles_non_divisible_step():
    psi = psi_angles(7.0)
    assert psi.size == math.ceil(360 / 7) == 52
    np.testing.assert_allclose(np.diff(psi), 360.0 / 52, rtol=1e-13)  # measured 5.6e-15; 18x
    np.testing.assert_allclose(psi, np.arange(52) * (360.0 / 52))  # measured 0
    assert psi_angles(10.0).size == 36
    assert psi_angles(7.5).size == 48
    assert psi_angles(360.0).tolist() == [0.0]
    assert psi_angles(400.0).tolist() == [0.0]
    assert psi_angles(360.0 / 52).size == 52


def test_psi_step_must_be_positive():
    with pytest.raises(ValueError):
        psi_angles(0.0)


def brute_translations(rng: float, step: float) -> set[tuple[float, float]]:
    """RELION setTranslations (2D): (i*step, j*step), |i|, |j| <= ceil(range/step), kept if
    x^2 + y^2 <= range^2."""
    n = math.ceil(rng / step)
    return {(i * step, j * step) for i in range(-n, n + 1) for j in range(-n, n + 1)
            if (i * step) ** 2 + (j * step) ** 2 <= rng * rng}


@pytest.mark.parametrize("rng, step, count", [(6.0, 2.0, 29), (5.0, 2.0, 21), (0.0, 2.0, 1),
                                              (1.0, 2.0, 1), (5.0, 1.0, 81), (3.0, 1.5, 13),
                                              (4.0, 1.0, 49)])
def test_translations_match_brute_force(rng, step, count):
    t = translations(rng, step)
    assert t.shape == (count, 2)
    got = {(float(x), float(y)) for x, y in t}
    assert len(got) == count  # no duplicates
    assert got == brute_translations(rng, step)
    assert (0.0, 0.0) in got
    # (x, y) columns; the grid is symmetric so check one point with x != y
    if count > 1:
        assert (step, 0.0) in got and (0.0, step) in got


def test_translations_points_on_the_circle_are_kept():
    got = {(float(x), float(y)) for x, y in translations(5.0, 1.0)}
    assert {(3.0, 4.0), (4.0, -3.0), (-5.0, 0.0), (0.0, 5.0)} <= got
    assert (4.0, 4.0) not in got


def test_translations_bad_input():
    with pytest.raises(ValueError):
        translations(6.0, 0.0)
    with pytest.raises(ValueError):
        translations(-1.0, 2.0)


def test_orientations_3d_order2():
    """Order 2 (RELION's default, 15 deg): 12 * 4^2 = 192 directions x 24 psi = 4608.
    (768 directions is order 3, 7.5 deg.)"""
    g = orientations_3d(2)
    assert len(g) == 192 * 24 == 4608
    assert g.angles.shape == (4608, 3)
    assert g.matrices.shape == (4608, 3, 3)
    rot, tilt = healpix_directions(2)
    psi = psi_angles(15.0)
    # direction-major: index = idir * n_psi + ipsi; measured 0 (default rtol 1e-7)
    np.testing.assert_array_equal(g.angles[:24, 0], rot[0])
    np.testing.assert_array_equal(g.angles[24 * 5: 24 * 6, 1], tilt[5])
    np.testing.assert_allclose(g.angles[24 * 7: 24 * 8, 2], psi)
    np.testing.assert_allclose(g.angles.reshape(192, 24, 3)[:, 0, :2],
                               np.stack([rot, tilt], axis=1))
    np.testing.assert_allclose(
        g.matrices, euler_to_matrix(g.angles[:, 0], g.angles[:, 1], g.angles[:, 2]), atol=0)


def test_orientations_3d_custom_psi_step():
    g = orientations_3d(1, psi_step=7.0)
    assert len(g) == 48 * 52
    # measured 2.2e-16 relative (one ulp); 22x margin
    np.testing.assert_allclose(np.unique(g.angles[:, 2]), np.arange(52) * 360.0 / 52, rtol=5e-15)
    g3 = orientations_3d(3)
    assert len(g3) == 768 * 48


def test_orientations_2d():
    g = orientations_2d()
    assert len(g) == 36
    # measured 0 (default rtol 1e-7), up to the last check
    np.testing.assert_allclose(g.angles[:, :2], 0.0)
    np.testing.assert_allclose(g.angles[:, 2], np.arange(36) * 10.0)
    np.testing.assert_allclose(g.matrices, euler_to_matrix(0.0, 0.0, g.angles[:, 2]))
    # Euler(0, 0, psi) = in-plane rotation by -psi: upper-left 2x2 is [[c, s], [-s, c]]
    c, s = math.cos(math.radians(10)), math.sin(math.radians(10))
    np.testing.assert_allclose(g.matrices[1], [[c, s, 0], [-s, c, 0], [0, 0, 1]], rtol=0,
                               atol=1e-15)  # measured 0; ~9 ulp for math.cos against np.cos
    g7 = orientations_2d(7.0)
    assert len(g7) == 52
    # measured 2.2e-16 relative (one ulp); 22x margin
    np.testing.assert_allclose(g7.angles[:, 2], np.arange(52) * 360.0 / 52, rtol=5e-15)
