"""Pins cryomap.euler to RELION's ZYZ Euler convention (docs/conventions.md "Euler angles")."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from cryomap.euler import angular_distance, euler_to_matrix, matrix_to_euler, projection_direction


def random_angles(n: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return np.stack([rng.uniform(-180, 180, n), rng.uniform(0, 180, n),
                     rng.uniform(-180, 180, n)], axis=1)


def relion_matrix(rot: float, tilt: float, psi: float) -> np.ndarray:
    """Euler_angles2matrix of euler.cpp, written out element by element (docs/conventions.md
    "Euler angles")."""
    a, b, g = (math.radians(x) for x in (rot, tilt, psi))
    ca, sa, cb, sb, cg, sg = (math.cos(a), math.sin(a), math.cos(b), math.sin(b), math.cos(g),
                              math.sin(g))
    return np.array([
        [cg * cb * ca - sg * sa, cg * cb * sa + sg * ca, -cg * sb],
        [-sg * cb * ca - cg * sa, -sg * cb * sa + cg * ca, sg * sb],
        [sb * ca, sb * sa, cb],
    ])


def test_matches_scipy_zyz_transposed_vectorised():
    ang = random_angles(500)
    m = euler_to_matrix(ang[:, 0], ang[:, 1], ang[:, 2])
    assert m.shape == (500, 3, 3) and m.dtype == np.float64
    ref = Rotation.from_euler("ZYZ", ang, degrees=True).as_matrix().transpose(0, 2, 1)
    np.testing.assert_allclose(m, ref, rtol=0, atol=1e-14)  # measured 4.4e-16 (float64); 22x


def test_matches_explicit_relion_matrix():
    for rot, tilt, psi in random_angles(20, seed=1):
        # measured 0; the bound allows float64 rounding
        np.testing.assert_allclose(euler_to_matrix(rot, tilt, psi), relion_matrix(rot, tilt, psi),
                                   rtol=0, atol=1e-14)


def test_hand_computed_case():
    # rot = 90, tilt = 90, psi = 0: ca=0, sa=1, cb=0, sb=1, cg=1, sg=0
    expected = np.array([[0.0, 0.0, -1.0],
                         [-1.0, 0.0, 0.0],
                         [0.0, 1.0, 0.0]])
    # measured 6.1e-17 (cos 90 degrees in float64) and 0 below; 16x margin
    np.testing.assert_allclose(euler_to_matrix(90, 90, 0), expected, rtol=0, atol=1e-15)
    # rot = 0, tilt = 0, psi = 30: in-plane rotation, A = Rz(-30)
    c, s = math.cos(math.radians(30)), math.sin(math.radians(30))
    np.testing.assert_allclose(euler_to_matrix(0, 0, 30),
                               [[c, s, 0], [-s, c, 0], [0, 0, 1]], rtol=0, atol=1e-15)
    # rot = 30, tilt = 60, psi = 45 by hand: A[0, 2] = -cos45 sin60, A[2, 0] = sin60 cos30
    # measured 2.2e-16 relative at most (float64 rounding); 22x margin
    m = euler_to_matrix(30, 60, 45)
    assert m[0, 2] == pytest.approx(-math.sqrt(0.5) * math.sqrt(3) / 2, rel=5e-15)
    assert m[1, 2] == pytest.approx(math.sqrt(0.5) * math.sqrt(3) / 2, rel=5e-15)
    assert m[2, 0] == pytest.approx(0.75, rel=5e-15)
    assert m[2, 1] == pytest.approx(math.sqrt(3) / 4, rel=5e-15)
    assert m[2, 2] == pytest.approx(0.5, rel=5e-15)


def test_broadcasting_shapes():
    assert euler_to_matrix(0.0, 0.0, 0.0).shape == (3, 3)
    # measured 0 here and below (default rtol 1e-7)
    np.testing.assert_allclose(euler_to_matrix(0.0, 0.0, 0.0), np.eye(3))
    m = euler_to_matrix(10.0, 20.0, np.array([0.0, 10.0, 20.0, 30.0]))
    assert m.shape == (4, 3, 3)
    np.testing.assert_allclose(m[2], euler_to_matrix(10, 20, 20))
    assert euler_to_matrix(np.zeros((2, 5)), 1.0, 2.0).shape == (2, 5, 3, 3)


def test_orthonormal_det_plus_one():
    ang = random_angles(200, seed=2)
    m = euler_to_matrix(ang[:, 0], ang[:, 1], ang[:, 2])
    # measured 4.4e-16 for both (float64 rounding); 22x margin
    np.testing.assert_allclose(m @ m.transpose(0, 2, 1), np.broadcast_to(np.eye(3), m.shape),
                               rtol=0, atol=1e-14)
    np.testing.assert_allclose(np.linalg.det(m), 1.0, rtol=0, atol=1e-14)


def test_row3_is_projection_direction():
    ang = random_angles(200, seed=3)
    m = euler_to_matrix(ang[:, 0], ang[:, 1], ang[:, 2])
    d = projection_direction(ang[:, 0], ang[:, 1])
    assert d.shape == (200, 3)
    np.testing.assert_allclose(m[:, 2, :], d, rtol=0, atol=1e-14)  # measured 0
    # explicit: (sin t cos r, sin t sin r, cos t); A maps the direction onto +z. Measured
    # 2.2e-16 relative (22x margin), then 2.2e-16 absolute (22x)
    np.testing.assert_allclose(projection_direction(30, 60),
                               [math.sqrt(3) / 2 * math.sqrt(3) / 2, math.sqrt(3) / 4, 0.5],
                               rtol=5e-15)
    np.testing.assert_allclose(m @ d[..., None], np.broadcast_to([[0], [0], [1]], (200, 3, 1)),
                               rtol=0, atol=5e-15)


def test_matrix_to_euler_inverts_regular():
    ang = random_angles(300, seed=4)
    m = euler_to_matrix(ang[:, 0], ang[:, 1], ang[:, 2])
    rot, tilt, psi = matrix_to_euler(m)
    assert rot.shape == tilt.shape == psi.shape == (300,)
    # measured 4.4e-16 (float64 rounding); 22x margin
    np.testing.assert_allclose(euler_to_matrix(rot, tilt, psi), m, rtol=0, atol=1e-14)
    # away from the poles the angles themselves come back (tilt in [0, 180]): measured
    # 2.8e-14 degrees; 18x margin
    np.testing.assert_allclose(rot, ang[:, 0], rtol=0, atol=5e-13)
    np.testing.assert_allclose(tilt, ang[:, 1], rtol=0, atol=5e-13)
    np.testing.assert_allclose(psi, ang[:, 2], rtol=0, atol=5e-13)


def test_matrix_to_euler_negative_tilt_representation():
    # (rot, -tilt, psi) is the same rotation as (rot + 180, tilt, psi + 180)
    m = euler_to_matrix(20.0, -50.0, 70.0)
    rot, tilt, psi = matrix_to_euler(m)
    assert 0 <= float(tilt) <= 180
    assert float(tilt) == pytest.approx(50.0)  # measured 0
    # measured 1.7e-16 (float64 rounding); 30x margin
    np.testing.assert_allclose(euler_to_matrix(rot, tilt, psi), m, rtol=0, atol=5e-15)


@pytest.mark.parametrize("rot, psi", [(0.0, 30.0), (40.0, 30.0), (-100.0, 170.0), (0.0, 0.0),
                                      (75.0, -20.0)])
def test_matrix_to_euler_degenerate_tilt_0(rot, psi):
    m = euler_to_matrix(rot, 0.0, psi)
    r, t, p = matrix_to_euler(m)
    assert float(r) == 0.0 and float(t) == 0.0  # RELION: rot = 0, all in-plane angle in psi
    # measured 1.1e-16 (45x margin) and 0 degrees (1e-12 allows float64 rounding of angles up
    # to 180 degrees, ~3e-14)
    np.testing.assert_allclose(euler_to_matrix(r, t, p), m, rtol=0, atol=5e-15)
    assert (float(p) - (rot + psi) + 180) % 360 - 180 == pytest.approx(0, abs=1e-12)


@pytest.mark.parametrize("rot, psi", [(0.0, 30.0), (40.0, 30.0), (-100.0, 170.0), (0.0, 0.0),
                                      (75.0, -20.0)])
def test_matrix_to_euler_degenerate_tilt_180(rot, psi):
    """RELION's Euler_matrix2angles, A22 < 0 branch: rot = 0, tilt = 180,
    psi = atan2(A10, -A00) (= psi - rot, since A00 = -cos(psi - rot), A10 = sin(psi - rot))."""
    m = euler_to_matrix(rot, 180.0, psi)
    r, t, p = matrix_to_euler(m)
    assert float(r) == 0.0 and float(t) == 180.0
    expected_psi = math.degrees(math.atan2(m[1, 0], -m[0, 0]))
    # measured 0 degrees and 1.4e-16; bounds as above (36x)
    assert (float(p) - expected_psi + 180) % 360 - 180 == pytest.approx(0, abs=1e-12)
    np.testing.assert_allclose(euler_to_matrix(r, t, p), m, rtol=0, atol=5e-15)


def test_matrix_to_euler_near_degenerate_and_vectorised_mix():
    ang = np.array([[10.0, 1e-7, 20.0], [10.0, 180.0 - 1e-7, 20.0], [10.0, 0.0, 20.0],
                    [10.0, 180.0, 20.0], [10.0, 90.0, 20.0]])
    m = euler_to_matrix(ang[:, 0], ang[:, 1], ang[:, 2])
    r, t, p = matrix_to_euler(m)
    # measured 1.75e-9 = sin(1e-7 degrees): the near-pole tilts come back as 0 and 180;
    # margin 26%
    np.testing.assert_allclose(euler_to_matrix(r, t, p), m, rtol=0, atol=2.2e-9)


def test_angular_distance():
    a = euler_to_matrix(0, 0, 0)
    # measured 0 at 0 and 180 degrees, where arccos turns float64 rounding into ~1e-6 degrees;
    # 7.1e-16 and 1.2e-16 relative at 30 and 120 degrees (28x margin)
    assert float(angular_distance(a, a)) == pytest.approx(0.0, abs=1e-6)
    assert float(angular_distance(a, euler_to_matrix(0, 0, 30))) == pytest.approx(30.0, rel=2e-14)
    assert float(angular_distance(a, euler_to_matrix(0, 120, 0))) == pytest.approx(120.0,
                                                                                  rel=2e-14)
    assert float(angular_distance(a, euler_to_matrix(0, 180, 0))) == pytest.approx(180.0)
    # vectorised, symmetric, and equal to the rotation angle of a^T b
    ang = random_angles(50, seed=5)
    ang2 = random_angles(50, seed=6)
    ma = euler_to_matrix(ang[:, 0], ang[:, 1], ang[:, 2])
    mb = euler_to_matrix(ang2[:, 0], ang2[:, 1], ang2[:, 2])
    d = angular_distance(ma, mb)
    assert d.shape == (50,)
    # measured 0 (1e-9 degrees allows arccos rounding), then 8.5e-14 degrees against scipy
    # (23x margin) and 7.5e-14 for the in-plane composition (27x)
    np.testing.assert_allclose(d, angular_distance(mb, ma), rtol=0, atol=1e-9)
    rel = Rotation.from_matrix(ma.transpose(0, 2, 1) @ mb).magnitude()
    np.testing.assert_allclose(d, np.degrees(rel), rtol=0, atol=2e-12)
    # composing with an in-plane rotation of theta gives distance theta
    theta = 17.0
    np.testing.assert_allclose(angular_distance(ma, euler_to_matrix(0, 0, theta) @ ma), theta,
                               rtol=0, atol=2e-12)
