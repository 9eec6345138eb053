"""Model-state pieces of the EM: τ² from FSC, the E-step radius, σ², map update, masks (the FSC
and the resolution rule: test_resolution.py)."""

import numpy as np
import pytest

from cryomap import fourier, projector
from cryomap.em import model
from cryomap.masks import soft_sphere


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
    # measured 0.0079 at most (4000 seeded images); 15 % margin
    np.testing.assert_allclose(s2[1:n // 2], sigma**2 / (2 * n * n), rtol=0.009)


def _relion_reconstruct(data, weight, tau2, pad, t_fudge, r_max, minres, ndim=3):
    """RELION's BackProjector::reconstruct rule written as a loop over voxels."""
    nz, ny, nx = data.shape
    out = np.zeros(data.shape, complex)
    wprime = np.zeros(data.shape)
    max_r2 = round(r_max * pad) ** 2
    inside = np.zeros(data.shape, bool)
    for z in range(nz):
        for y in range(ny):
            for x in range(nx):
                kz, ky = z - nz // 2, y - ny // 2
                r2 = kz * kz + ky * ky + x * x
                w = float(weight[z, y, x])
                if r2 < max_r2:
                    inside[z, y, x] = True
                    ires = int(np.floor(np.sqrt(r2) / pad + 0.5))
                    t2 = tau2[min(ires, tau2.size - 1)]
                    if t2 > 0:
                        inv = 1.0 / (pad**ndim * t_fudge * t2)
                    else:
                        inv = 1.0 / (0.001 * w) if w > 1e-20 else 0.0
                    if ires >= minres:
                        w += inv
                wprime[z, y, x] = w
    # floor at 1/1000 of the mean weight of the shell floor(|q| / p) (capped at r_max - 1)
    sums, counts = np.zeros(r_max), np.zeros(r_max)
    for idx in zip(*np.nonzero(inside), strict=True):
        z, y, x = idx
        r = np.sqrt((z - nz // 2) ** 2 + (y - ny // 2) ** 2 + x * x)
        f = min(int(np.floor(r / pad)), r_max - 1)
        sums[f] += wprime[idx]
        counts[f] += 1
    for idx in zip(*np.nonzero(inside), strict=True):
        z, y, x = idx
        r = np.sqrt((z - nz // 2) ** 2 + (y - ny // 2) ** 2 + x * x)
        f = min(int(np.floor(r / pad)), r_max - 1)
        w = max(wprime[idx], sums[f] / counts[f] / 1000.0)
        out[idx] = data[idx] / w if w > 0 else 0.0
    return out


@pytest.mark.parametrize("pad", [1, 2])
def test_backprojector_reconstruct_follows_relion(pad):
    """docs/method.md eq. (20) (eq. (14) with RELION's rules): 1/(p^3 T tau2) added from
    shell minres_map on, 1/(0.001 W) where tau2 is 0, the 1/1000 shell-mean floor, nothing
    beyond r_max."""
    rng = np.random.default_rng(3)
    box, r_max = 8, 3
    bp = projector.BackProjector(box, pad, r_max)
    shape = bp.data.shape
    bp.data = (rng.standard_normal(shape) + 1j * rng.standard_normal(shape)).astype(np.complex64)
    bp.weight = rng.uniform(0, 2, shape).astype(np.float32) * (rng.random(shape) > 0.1)
    bp._folded = True
    tau2 = np.array([5.0, 2.0, 0.0, 0.5, 0.25])  # shell 2 without prior support
    got = bp.reconstruct_ft(tau2, 2.0, r_max, minres_map=1)
    want = _relion_reconstruct(bp.data, bp.weight, tau2, pad, 2.0, r_max, 1)
    # float32 sums: measured 5.8e-8 relative at most (both pads, here and below), ~17x
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
    assert np.any(got != 0) and np.all(got[np.sqrt(projector._padded_r2(shape)) >= r_max * pad]
                                       == 0)
    # per-voxel tau2 (eq. (16) option): no floor
    t2v = rng.uniform(0.5, 2, shape)
    got_v = bp.reconstruct_ft(t2v, 1.0, r_max, minres_map=0)
    inside = np.sqrt(projector._padded_r2(shape)) < round(r_max * pad)
    w = bp.weight + 1.0 / (pad**3 * t2v)
    np.testing.assert_allclose(got_v, np.where(inside, bp.data / w, 0), rtol=1e-6, atol=1e-7)


def test_padded_shells_units_of_the_unpadded_box():
    s = projector.padded_shells((21, 21, 11), 2)
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
