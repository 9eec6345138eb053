"""Point-group symmetry in the pose grid and the back-projector (docs/symmetry.md): level 0
restricted to the asymmetric unit, children and parents through it, local windows around every
symmetry copy of the previous pose, BackProjector.symmetrise against back-projecting every
copy, and the --sym checks."""

from __future__ import annotations

import healpy
import numpy as np
import pytest

from cryomap import fourier, projector, symmetry
from cryomap.em.classify import ClassOptions
from cryomap.em.options import EMOptions
from cryomap.errors import InputError
from cryomap.euler import angular_distance
from cryomap.sampling import PoseSampling, angular_step, healpix_directions
from cryomap.simulate import random_rotations


def _grid(order: int, sym: str, perturb: float = 0.0, seed: int = 0) -> PoseSampling:
    return PoseSampling.create(3, order, None, 1.0, 1.0, perturb, np.random.default_rng(seed),
                               symmetry=sym)


@pytest.mark.parametrize("sym, order", [("C4", 2), ("D2", 1), ("D7", 2), ("O", 2), ("I2", 2),
                                        ("T", 3)])
def test_level0_enumerates_the_asymmetric_unit(sym, order):
    s = _grid(order, sym)
    unit = symmetry.asymmetric_unit_directions(order, sym)
    np.testing.assert_array_equal(s.directions, unit)
    assert s.n_orientations(0) == unit.size * s.n_psi
    keys = np.arange(s.n_orientations(0))
    m = s.matrices(keys, 0)  # unperturbed: the kept pixels' directions x every psi
    d_unit = np.stack(healpy.pix2vec(1 << order, np.repeat(unit, s.n_psi), nest=True), 1)
    # measured 6.1e-16 (float64 rounding); 16x margin
    np.testing.assert_allclose(m[:, 2, :], d_unit, rtol=0, atol=1e-14)
    psi = s.angles(keys[:s.n_psi], 0)[:, 2]  # the first direction's in-plane angles, in order
    # measured 5.7e-14 degrees (float64 rounding); 18x margin
    np.testing.assert_allclose(np.mod(np.diff(psi), 360.0), 360.0 / s.n_psi, rtol=0, atol=1e-12)
    rot, tilt = healpix_directions(order)
    assert rot[unit].size == unit.size == len(set(unit.tolist()))


def test_c1_grid_is_unchanged():
    s = _grid(2, "C1")
    assert s.directions is None and s.operators() is None
    assert s.n_orientations(0) == 12 * 16 * s.n_psi


@pytest.mark.parametrize("sym", ["C4", "D3", "O"])
def test_children_and_parents_through_the_unit(sym):
    s = _grid(2, sym, perturb=0.5)
    keys = np.arange(s.n_orientations(0))
    child = s.children(keys, 0)
    n1 = s.n_psi_at(1)
    pix = s.directions[keys // s.n_psi]
    np.testing.assert_array_equal(child // n1 // 4, np.repeat(pix[:, None], 8, 1))
    np.testing.assert_array_equal(s.parents(child.ravel(), 1), np.repeat(keys, 8))
    # a child's direction lies within one coarse step of its parent's: measured at most 7.19
    # degrees, 0.48 of the step (D3, perturbed); bound 0.6 steps (margin 25%)
    d0 = np.repeat(s.matrices(keys, 0)[:, 2], 8, 0)
    d1 = s.matrices(child.ravel(), 1)[:, 2]
    assert np.rad2deg(np.arccos(np.clip((d0 * d1).sum(1), -1, 1))).max() < 0.6 * angular_step(2)
    with pytest.raises(ValueError):  # a level-1 key outside the unit has no level-0 parent
        outside = np.setdiff1d(np.arange(12 * 64), np.repeat(s.directions, 4) * 4
                               + np.tile(np.arange(4), s.directions.size))[:1]
        s.parents(outside * n1, 1)


@pytest.mark.parametrize("sym", ["C4", "D2", "O"])
def test_symmetry_copies_of_the_unit_cover_rotations_as_the_full_grid(sym):
    """Every rotation has a grid orientation near one of its symmetry copies, as near as the
    full C1 grid's nearest (perturbed grids included: the seam is covered)."""
    rng = np.random.default_rng(5)
    poses = random_rotations(300, rng)
    for perturb in (0.0, 0.5):
        full, unit = _grid(2, "C1", perturb, 1), _grid(2, sym, perturb, 1)
        mf = full.matrices(np.arange(full.n_orientations(0)), 0)
        mu = unit.matrices(np.arange(unit.n_orientations(0)), 0)
        # nearest grid orientation: largest trace of P G^T (over copies P R for the unit)
        tr_f = np.einsum("pij,gij->pg", poses, mf).max(1)
        copies = np.einsum("pij,rjk->prik", poses, symmetry.operators(sym))
        tr_u = np.einsum("prij,gij->prg", copies, mu).max((1, 2))
        near_f = np.rad2deg(np.arccos(np.clip((tr_f - 1) / 2, -1, 1)))
        near_u = np.rad2deg(np.arccos(np.clip((tr_u - 1) / 2, -1, 1)))
        # measured ratios at most 1.077 (maximum) and 1.005 (median), both O perturbed; margins
        # 7% and 9%
        assert near_u.max() <= 1.15 * near_f.max()
        assert np.median(near_u) <= 1.1 * np.median(near_f)
    # 1/order of the orientations: exactly for groups that map the HEALPix grid onto itself,
    # up to the unit's border for O (7 of 192 directions at order 2; docs/symmetry.md;
    # measured 12.5% more; margin 2.5 points)
    order = symmetry.point_group(sym).order
    exact = sym in ("C4", "D2")
    assert unit.n_orientations(0) * order == pytest.approx(full.n_orientations(0),
                                                           rel=0 if exact else 0.15)


@pytest.mark.parametrize("sym", ["C1", "C4", "D2", "T"])
def test_local_windows_match_brute_force_over_symmetry_copies(sym):
    """local_orientations = every level-0 orientation whose angle to the nearest symmetry copy
    of the previous pose is within 3 sigma, with -theta^2/(2 sigma^2); previous poses anywhere
    on the sphere (most outside the asymmetric unit)."""
    s = _grid(3, sym, perturb=0.5, seed=2)
    sigma = 4.0
    prev = random_rotations(12, np.random.default_rng(7))
    ptr, keys, prior = s.local_orientations(prev, sigma)
    allk = np.arange(s.n_orientations(0))
    grid = s.matrices(allk, 0)
    for i in range(prev.shape[0]):
        theta = symmetry.angular_distance(grid, np.repeat(prev[i:i + 1], allk.size, 0), sym)
        expect = np.flatnonzero(theta <= 3 * sigma)
        got = keys[ptr[i]:ptr[i + 1]]
        order = np.argsort(got)
        np.testing.assert_array_equal(got[order], expect)
        # measured 1.4e-13 (float64 rounding, values up to 4.5); 21x margin
        np.testing.assert_allclose(prior[ptr[i]:ptr[i + 1]][order],
                                   -theta[expect] ** 2 / (2 * sigma**2), rtol=0, atol=3e-12)
        assert expect.size > 0


@pytest.mark.parametrize("sym, order", [("D2", 1), ("I2", 2)])
def test_local_window_falls_back_to_the_nearest_orientation(sym, order):
    """A window smaller than the grid step holds the nearest orientation (up to symmetry);
    I2 at order 2 keeps 2 directions, so for some poses no kept direction lies within a step
    of any copy."""
    s = _grid(order, sym, perturb=0.5)
    prev = random_rotations(60, np.random.default_rng(3))
    ptr, keys, _ = s.local_orientations(prev, sigma=0.1)
    assert np.all(np.diff(ptr) == 1)
    grid = s.matrices(np.arange(s.n_orientations(0)), 0)
    for i in range(prev.shape[0]):
        theta = symmetry.angular_distance(grid, np.repeat(prev[i:i + 1], grid.shape[0], 0),
                                          sym)
        # measured 0 (the same angle); 1e-9 degrees allows arccos rounding near 0 (~1e-11)
        assert theta[keys[ptr[i]]] == pytest.approx(theta.min(), abs=1e-9)


def test_rotation_angle_is_the_distance_to_the_nearest_copy():
    rng = np.random.default_rng(4)
    a, p = random_rotations(50, rng), random_rotations(50, rng)
    s = _grid(1, "O")
    ops = symmetry.operators("O")
    brute = np.min([angular_distance(a, p @ r) for r in ops], axis=0)
    # measured 7.5e-14 and 6.4e-14 degrees (float64 rounding through arccos); 27x margin
    np.testing.assert_allclose(s.rotation_angle(a, p), brute, rtol=0, atol=2e-12)
    np.testing.assert_allclose(s.rotation_angle(a, p @ ops[5]), brute, rtol=0, atol=2e-12)
    # measured 0 (default rtol 1e-7)
    np.testing.assert_allclose(_grid(1, "C1").rotation_angle(a, p), angular_distance(a, p))


def test_grids_that_cannot_be_made():
    with pytest.raises(ValueError, match="no HEALPix direction"):
        _grid(1, "I2")
    with pytest.raises(ValueError, match="3D"):
        PoseSampling.create(2, 0, 10.0, 1.0, 1.0, symmetry="C2")


# -- BackProjector.symmetrise ---------------------------------------------------------------


@pytest.mark.parametrize("sym", ["C4", "D2", "O"])
def test_symmetrised_sums_equal_back_projecting_every_copy(sym):
    """For groups that permute the grid, summing the sums over the group is exactly the
    back-projection of every slice at every equivalent pose A R."""
    rng = np.random.default_rng(0)
    box, r = 16, 7
    mask = fourier.pixel_mask(box, r)
    poses = random_rotations(5, rng)
    slices = (rng.normal(size=(5, mask.n_pixels))
              + 1j * rng.normal(size=(5, mask.n_pixels))).astype(np.complex64)
    weights = rng.uniform(0.5, 1.0, size=(5, mask.n_pixels)).astype(np.float32)
    ops = symmetry.operators(sym)
    a = projector.BackProjector(box, 2, r)
    a.add_slices(slices, weights, poses, mask.coords)
    a.finish().symmetrise(sym)
    b = projector.BackProjector(box, 2, r)
    copies = np.einsum("nij,rjk->nrik", poses, ops).reshape(-1, 3, 3)
    b.add_slices(np.repeat(slices, len(ops), 0), np.repeat(weights, len(ops), 0), copies,
                 mask.coords)
    b.finish()
    inside = np.sqrt(projector._padded_r2(a.data.shape)) <= 2 * r
    # float32 sums in another order: measured 1.8e-7 and 3.0e-7 of the maxima (O); margins
    # 5.5x and 3.3x
    assert np.abs(a.data - b.data)[inside].max() <= 1e-6 * np.abs(b.data).max()
    assert np.abs(a.weight - b.weight)[inside].max() <= 1e-6 * b.weight.max()
    assert a.symmetry == symmetry.point_group(sym).name


def test_symmetrise_checks():
    bp = projector.BackProjector(8, 2, 3)
    with pytest.raises(RuntimeError, match="finish"):
        bp.symmetrise("C2")
    bp.finish()
    before = bp.data.copy()
    assert bp.symmetrise("c1") is bp and np.array_equal(bp.data, before)
    bp.symmetrise("C2")
    with pytest.raises(RuntimeError, match="already"):
        bp.symmetrise("C2")
    with pytest.raises(ValueError, match="3D"):
        projector.BackProjector(8, 2, 3, ndim=2).finish().symmetrise("C2")


# -- --sym checks ---------------------------------------------------------------------------


@pytest.mark.parametrize("options, words", [
    (EMOptions(sym="Q7"), ["--sym", "unknown"]),
    (EMOptions(sym="C3v"), ["--sym", "mirror"]),
    (EMOptions(sym="I", healpix_order=1), ["--healpix_order", "icosahedral"]),
    (EMOptions(sym="I3", healpix_order=0), ["--healpix_order 0"]),
    (ClassOptions(ndim=2, sym="C2"), ["--sym", "2D"]),
])
def test_bad_symmetry_options(options, words):
    with pytest.raises(InputError) as e:
        options.validate()
    msg = str(e.value)
    assert "\n" not in msg and all(w in msg for w in words), msg


def test_good_symmetry_options():
    EMOptions(sym="i1", healpix_order=2).validate()
    EMOptions(sym="d7").validate()
    ClassOptions(ndim=2).validate()


def test_angular_errors_up_to_symmetry():
    from cryomap.em.validation import angular_errors
    from cryomap.euler import matrix_to_euler

    rng = np.random.default_rng(6)
    truth = random_rotations(40, rng)
    ops = symmetry.operators("D3")
    copies = truth @ ops[rng.integers(1, len(ops), 40)]  # another equivalent pose each
    t_angles = np.stack(matrix_to_euler(truth), 1)
    c_angles = np.stack(matrix_to_euler(copies), 1)
    # measured 1.7e-6 degrees (arccos of a trace within rounding of 3); 12x margin
    assert angular_errors(c_angles, t_angles, "D3").max() < 2e-5
    assert angular_errors(c_angles, t_angles).min() > 119.0  # 120 or 180 degrees apart
