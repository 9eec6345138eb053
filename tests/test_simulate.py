"""Simulated projections: central-slice theorem, shift and CTF sign, noise level, outputs."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.ndimage import map_coordinates

from cryomap.ctf import CtfParams
from cryomap.euler import euler_to_matrix
from cryomap.particles import load_particles
from cryomap.phantom import make_phantom, make_phantom_variant
from cryomap.simulate import (
    project_images,
    random_rotations,
    simulate_particles,
    write_simulation,
)

RNG = np.random.default_rng(1)
ANGLES = np.stack([RNG.uniform(-180, 180, 5), np.rad2deg(np.arccos(RNG.uniform(-1, 1, 5))),
                   RNG.uniform(-180, 180, 5)], axis=1)


def real_space_projection(vol: np.ndarray, angles: np.ndarray, transpose: bool = True
                          ) -> np.ndarray:
    """P(x, y) = sum_z V(A^T (x, y, z)) (docs/conventions.md "Projection"), cubic-spline resampling,
    origin floor(N/2), arrays (z, y, x). transpose=False uses A instead (a wrong convention,
    to show the comparison can fail)."""
    n = vol.shape[0]
    c = np.arange(n) - n // 2
    z, y, x = np.meshgrid(c, c, c, indexing="ij")
    p = np.stack([x.ravel(), y.ravel(), z.ravel()]).astype(np.float64)
    a = euler_to_matrix(*angles)
    q = (a.T if transpose else a) @ p
    vals = map_coordinates(vol.astype(np.float64), q[::-1] + n // 2, order=3, mode="constant")
    return vals.reshape(n, n, n).sum(axis=0)


def rel_err(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-image relative L2 error ||a - b|| / ||b||."""
    return np.linalg.norm(a - b, axis=(-2, -1)) / np.linalg.norm(b, axis=(-2, -1))


@pytest.fixture(scope="module", params=[(32, 6.0), (33, 6.0)], ids=["even32", "odd33"])
def phantom_and_projections(request):
    box, pix = request.param
    vol = make_phantom(box, pix)
    return vol, np.array([real_space_projection(vol, a) for a in ANGLES])


def test_central_slice_linear(phantom_and_projections):
    vol, ref = phantom_and_projections
    proj = project_images(vol, ANGLES, interp="linear", pad=2)
    assert proj.dtype == np.float32 and proj.shape == ref.shape
    err = rel_err(proj, ref)
    # measured: max 1.3% (box 32), 1.2% (box 33)
    assert err.max() < 0.02, err
    # Sum-projection scale: the integral is 2.4% high: the map is pre-divided by sinc^2 for
    # the average attenuation of trilinear interpolation, but DC is sampled on a grid point
    # (no attenuation), so it comes out inflated, as in RELION. Measured 2.51% (box 32), 2.35%
    # (box 33); margin 0.3 points.
    ratio = proj.sum(axis=(1, 2)) / ref.sum(axis=(1, 2))
    assert np.allclose(ratio, 1.0, atol=0.028), ratio


def test_central_slice_nearest(phantom_and_projections):
    vol, ref = phantom_and_projections
    err = rel_err(project_images(vol, ANGLES, interp="nearest", pad=2), ref)
    assert err.max() < 0.15, err  # measured: max 11% (nearest neighbour is crude)


def test_central_slice_detects_wrong_convention(phantom_and_projections):
    vol, ref = phantom_and_projections
    wrong = np.array([real_space_projection(vol, a, transpose=False) for a in ANGLES[:2]])
    # a chiral map: using A instead of A^T gives a projection far outside the tolerance
    # (measured 0.149 and 0.574, both boxes; 13 % margin)
    assert rel_err(project_images(vol, ANGLES[:2]), wrong).min() > 0.13


def test_batching_does_not_change_result():
    vol = make_phantom(32, 6.0)
    origins = RNG.uniform(-3, 3, size=(5, 2))
    ctf = CtfParams(defocus_u=np.linspace(1e4, 2e4, 5), defocus_v=np.linspace(1e4, 2e4, 5) - 200,
                    defocus_angle=np.linspace(0, 150, 5))
    a = project_images(vol, ANGLES, origins, ctf, 6.0)
    b = project_images(vol, ANGLES, origins, ctf, 6.0, batch=2)
    assert np.array_equal(a, b)


def test_shift_convention_puts_centre_at_half_box_minus_origin():
    n = 32
    c = np.arange(n) - n // 2
    z, y, x = np.meshgrid(c, c, c, indexing="ij")
    blob = np.exp(-(x * x + y * y + z * z) / (2 * 1.5**2))
    origins = np.array([[3.0, -5.0], [-2.5, 1.5], [0.0, 0.0], [-4.25, -3.5]])
    angles = np.array([[10, 40, 70], [0, 0, 0], [-60, 120, 5], [100, 80, -30]])
    imgs = project_images(blob, angles, origins)
    yy, xx = np.indices((n, n))
    for img, (ox, oy) in zip(imgs, origins, strict=True):
        # Trilinear Fourier interpolation leaves a faint floor (~1e-5 of the peak per pixel)
        # over the whole image that pulls the centre of mass toward the box centre: drop it.
        # Measured error then at most 0.0026 px (x of the fourth); 15 % margin.
        w = np.clip(img - 0.02 * img.max(), 0, None)
        com_x, com_y = (w * xx).sum() / w.sum(), (w * yy).sum() / w.sum()
        assert com_x == pytest.approx(n / 2 - ox, abs=0.003)  # x = last axis
        assert com_y == pytest.approx(n / 2 - oy, abs=0.003)  # y = row


def test_ctf_sign_particles_are_white():
    vol = make_phantom(32, 6.0)
    ctf = CtfParams(defocus_u=np.array([15000.0, 25000.0]), defocus_v=np.array([14800.0, 24500]),
                    defocus_angle=np.array([30.0, 100.0]), amplitude_contrast=0.1)
    plain = project_images(vol, ANGLES[:2])
    with_ctf = project_images(vol, ANGLES[:2], None, ctf, 6.0)
    # DC term: CTF(0) = +Q0, so the image integral is +0.1 x the projection's.
    ratio = with_ctf.sum(axis=(1, 2)) / plain.sum(axis=(1, 2))
    assert np.allclose(ratio, 0.1, rtol=1e-5), ratio  # float32 images: measured 1.2e-7
    # Low frequencies (where -sin(gamma) is still > 0) look like the particle: positive.
    low = CtfParams(defocus_u=np.array([5000.0]), defocus_v=np.array([5000.0]),
                    defocus_angle=np.array([0.0]), bfactor=2000.0)
    img = project_images(vol, ANGLES[:1], None, low, 6.0)[0]
    centre = img[8:24, 8:24]
    # measured correlation 0.977; 8 % margin
    assert centre.sum() > 0 and np.corrcoef(img.ravel(), plain[0].ravel())[0, 1] > 0.9


def test_random_rotations_uniform():
    rot = random_rotations(4000, np.random.default_rng(0))
    assert np.allclose(rot @ np.swapaxes(rot, 1, 2), np.eye(3), atol=1e-13)  # measured 1.8e-15
    assert np.allclose(np.linalg.det(rot), 1.0)
    # Uniform on SO(3): each column uniform on the sphere (mean 0, z^2 mean 1/3), and the
    # rotation angle has density (1 - cos w)/pi, mean pi/2 + 2/pi. Measured over the columns:
    # mean at most 0.0113 off, z^2 mean 0.0078 off; the angle's mean 0.00093 off (4000 draws,
    # seeded); margins about 15 %.
    for col in range(3):
        d = rot[:, :, col]
        assert np.all(np.abs(d.mean(axis=0)) < 0.013)
        assert np.allclose((d * d).mean(axis=0), 1 / 3, atol=0.009)
    w = np.arccos(np.clip((np.trace(rot, axis1=1, axis2=2) - 1) / 2, -1, 1))
    assert w.mean() == pytest.approx(np.pi / 2 + 2 / np.pi, abs=0.0011)


def test_simulate_snr_and_clean_reproducibility():
    vol = make_phantom(32, 6.0)
    noisy, _, p1, t1 = simulate_particles(vol, 6.0, 150, snr=0.1, seed=3)
    clean, _, p2, t2 = simulate_particles(vol, 6.0, 150, snr=None, seed=3)
    assert t1.equals(t2) and p1.equals(p2)
    noise = noisy.astype(np.float64) - clean
    signal_var = np.mean(np.var(clean, axis=(1, 2), dtype=np.float64))
    measured = signal_var / noise.var()
    assert measured == pytest.approx(0.1, rel=0.0025)  # measured 0.10020 (rel 0.0020)
    assert abs(noise.mean()) < 0.0033 * noise.std()  # measured 0.00286; 15 % margin
    # images are the projections at the true poses (truth table is self-consistent)
    ctf = CtfParams(t1.rlnDefocusU.to_numpy(), t1.rlnDefocusV.to_numpy(),
                    t1.rlnDefocusAngle.to_numpy())
    angles = t1[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy()
    origins = t1[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy() / 6.0
    again = project_images(vol, angles[:10], origins[:10], ctf=CtfParams(
        ctf.defocus_u[:10], ctf.defocus_v[:10], ctf.defocus_angle[:10]), pixel_size=6.0)
    # measured 0.0 (the same images bit for bit); 1e-6 leaves room for float32 rounding
    assert np.abs(again - clean[:10]).max() < 1e-6 * np.abs(clean).max()


def test_simulate_tables():
    vol = make_phantom(32, 6.0)
    imgs, optics, parts, truth = simulate_particles(
        vol, 6.0, 300, defocus_range=(12000, 20000), astigmatism=400, max_shift_px=2.5,
        seed=5)
    assert imgs.shape == (300, 32, 32) and imgs.dtype == np.float32
    assert optics.loc[0, "rlnImagePixelSize"] == 6.0 and optics.loc[0, "rlnImageSize"] == 32
    assert parts.loc[0, "rlnImageName"] == "000001@particles.mrcs"
    assert parts.loc[299, "rlnImageName"] == "000300@particles.mrcs"
    assert not any(c in parts for c in ("rlnAngleRot", "rlnOriginXAngst", "rlnClassNumber"))
    u, v = truth.rlnDefocusU.to_numpy(), truth.rlnDefocusV.to_numpy()
    # largest astigmatism drawn: measured 399.4 Å; 5 % margin
    assert np.all(u >= v) and np.all(u - v <= 400) and (u - v).max() > 380
    assert np.all(((u + v) / 2 >= 12000) & ((u + v) / 2 <= 20000))
    shift = np.hypot(truth.rlnOriginXAngst, truth.rlnOriginYAngst) / 6.0
    assert shift.max() <= 2.5 and shift.max() > 2.4  # largest: measured 2.4996 px; 4 % margin
    assert np.all((truth.rlnAngleTilt >= 0) & (truth.rlnAngleTilt <= 180))
    # tilt of uniform rotations: cos(tilt) uniform on [-1, 1] (mean: measured 0.0197; 15 %
    # margin)
    assert abs(np.cos(np.deg2rad(truth.rlnAngleTilt)).mean()) < 0.023
    assert set(truth.rlnClassNumber) == {1}
    # no CTF: no CTF columns
    _, _, p_noctf, _ = simulate_particles(vol, 6.0, 3, ctf=False, seed=5)
    assert "rlnDefocusU" not in p_noctf


def test_simulate_classes():
    maps = [make_phantom_variant(k, 32, 6.0) for k in (0, 3)]
    imgs, _, _, truth = simulate_particles(maps, 6.0, 40, snr=None, ctf=False,
                                           class_fractions=[0.25, 0.75], seed=2)
    cls = truth.rlnClassNumber.to_numpy()
    assert set(cls) == {1, 2} and np.sum(cls == 2) > np.sum(cls == 1)
    angles = truth[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy()
    origins = truth[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy() / 6.0
    for k in (1, 2):
        idx = np.flatnonzero(cls == k)
        ref = project_images(maps[k - 1], angles[idx], origins[idx])
        # measured 0.0 (the same projections); 1e-5: float32 rounding of values up to 11
        assert np.allclose(imgs[idx], ref, atol=1e-5)


def test_write_simulation_round_trip(tmp_path):
    vol = make_phantom(32, 6.0)
    imgs, optics, parts, truth = simulate_particles(vol, 6.0, 12, seed=1)
    written = write_simulation(tmp_path / "sim", imgs, optics, parts, truth, 6.0, vol)
    assert sorted(p.name for p in written.values()) == [
        "particles.mrcs", "particles.star", "truth.star", "truth_map.mrc"]
    ps = load_particles(tmp_path / "sim" / "particles.star")
    assert ps.n_particles == 12 and ps.box == 32 and ps.pixel_size == 6.0
    assert np.array_equal(ps.read_images(np.arange(12)), imgs)
    assert np.allclose(ps.ctf_params().defocus_u, truth.rlnDefocusU)
    ts = load_particles(tmp_path / "sim" / "truth.star")
    assert np.allclose(ts.angles(), truth[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]])
    assert np.allclose(ts.origins_px() * 6.0, truth[["rlnOriginXAngst", "rlnOriginYAngst"]])
