"""Model-state pieces of the EM: FSC, resolution rule, τ² from FSC, map update, masks."""

import numpy as np
import pytest

from cryomap import fourier
from cryomap.em import model, mstep
from cryomap.masks import soft_sphere


def test_fsc_identical_and_independent():
    rng = np.random.default_rng(1)
    n = 24
    a = fourier.fft3_centered(rng.standard_normal((n, n, n)))
    b = fourier.fft3_centered(rng.standard_normal((n, n, n)))
    shells = fourier.shell_index_3d(n)
    same = model.fsc(a, 3.0 * a, shells, n // 2 + 1)
    np.testing.assert_allclose(same, 1.0, atol=1e-12)
    indep = model.fsc(a, b, shells, n // 2 + 1)
    assert indep[0] == 1.0
    # independent noise: |FSC| ~ 1/sqrt(#voxels in shell); shells >= 4 hold > 100 voxels
    assert np.all(np.abs(indep[4:]) < 0.35)
    anti = model.fsc(a, -a, shells, n // 2 + 1)
    np.testing.assert_allclose(anti[1:], -1.0, atol=1e-12)


def test_resolution_shell_rule():
    curve = np.array([1.0, 0.99, 0.9, 0.6, 0.3, 0.1, 0.2, 0.05])
    # last shell before the first drop below the threshold
    assert model.resolution_shell(curve, 0.143) == 4
    assert model.resolution_shell(curve, 0.5) == 3
    assert model.resolution_shell(np.ones(6), 0.143) == 5
    assert model.resolution_shell(np.array([1.0, 0.0, 0.0]), 0.143) == 1


def test_tau2_from_fsc_matches_relion_formula():
    f = np.array([1.0, 0.9, 0.5, 0.1, 0.0])
    w = np.array([0.0, 2.0, 4.0, 8.0, 1.0])
    pad, t = 2, 3.0
    got = model.tau2_from_fsc(f, w, pad, t)
    fc = np.clip(f, 0.001, 0.999)
    want = np.where(w > 0, t * fc / (1 - fc) / (pad**3 * np.where(w > 0, w, 1)), 0)
    np.testing.assert_allclose(got, want)
    # the regularised map update is then a Wiener filter with SSNR = T²F/(1-F) per shell
    assert got[2] == pytest.approx(3.0 * 1.0 / (8 * 4.0))


def test_next_r_max_relion_rule():
    assert model.next_r_max(5, 64, 10) == 15
    assert model.next_r_max(40, 64, 10) == 32  # capped at the box


def test_initial_sigma2_is_half_the_variance_per_component():
    rng = np.random.default_rng(2)
    n, b = 16, 4000
    sigma = 0.7
    imgs = rng.normal(scale=sigma, size=(b, n, n))
    ft = fourier.fft2_centered(imgs)
    shells = fourier.shell_index_2d(n)
    s2 = model.initial_sigma2((np.abs(ft) ** 2).sum(0), ft.mean(0), b, shells, n // 2 + 1)
    # white noise of variance σ² per pixel: each of Re, Im of an N^-2-normalised coefficient
    # has variance σ²/(2N²)
    np.testing.assert_allclose(s2[1:n // 2], sigma**2 / (2 * n * n), rtol=0.05)


def test_regularised_ratio_is_seed_eq14():
    rng = np.random.default_rng(3)
    shape = (9, 9, 5)
    data = (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(np.complex64)
    weight = rng.uniform(1, 2, shape).astype(np.float32)
    shells = mstep.padded_shells(shape, 1)
    tau2 = np.array([5.0, 2.0, 1.0, 0.5, 0.25])
    got = mstep.regularised_ratio(data, weight, tau2, 1, 1.0, shells, 5)
    inside = shells < 5
    t2 = tau2[np.minimum(shells, 4)]
    want = np.where(inside, data / (weight + 1.0 / t2), 0)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    # per-voxel τ² (seed eq. 16 option)
    t2v = rng.uniform(0.5, 2, shape)
    got_v = mstep.regularised_ratio(data, weight, t2v, 1, 1.0, shells, 5)
    np.testing.assert_allclose(got_v, np.where(inside, data / (weight + 1 / t2v), 0), rtol=1e-5)


def test_padded_shells_units_of_the_unpadded_box():
    s = mstep.padded_shells((21, 21, 11), 2)
    # centred layout: index (10, 10, x) is (kz, ky) = 0; |q| = 2 -> shell 1, |q| = 5 -> 3
    assert s[10, 10, 0] == 0
    assert s[10, 10, 2] == 1
    assert s[10, 10, 5] == 3


@pytest.mark.parametrize("box", [32, 33])
def test_soft_sphere_profile(box):
    m = soft_sphere(box, 8.0, 4.0, ndim=2)
    c = box // 2
    assert m[c, c] == 1.0
    assert m[c, c + 8] == 1.0
    assert m[c, c + 10] == pytest.approx(0.5)
    assert m[c, c + 12] == 0.0
    assert np.all(np.diff(m[c, c:]) <= 0)
