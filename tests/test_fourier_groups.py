"""cryomap.fourier additions: optics groups with other boxes / pixel sizes (resample_half_plane,
grid_scale) and the image origin relion_project writes (project_image_origin)."""

from __future__ import annotations

import numpy as np
import pytest

from cryomap import fourier


def _waves(n: int, pix: float, length: float, waves) -> np.ndarray:
    """Sum of cosines a*cos(2 pi k.(r - c)/L + phi) sampled on an n-box of pixel pix, with
    r - c in Angstrom measured from pixel floor(n/2) and k in cycles per L Angstrom."""
    c = (np.arange(n) - n // 2) * pix
    y, x = np.meshgrid(c, c, indexing="ij")
    img = np.zeros((n, n))
    for a, kx, ky, phi in waves:
        img += a * np.cos(2 * np.pi * (kx * x + ky * y) / length + phi)
    return img


WAVES = [(1.0, 0, 0, 0.0), (0.7, 3, -5, 0.4), (0.5, -12, 7, 1.1), (0.3, 20, 17, -0.6),
         (0.2, 0, -25, 0.2), (0.25, 28, 0, 2.0)]


def test_same_physical_box_is_exact_crop_and_pad():
    # 64 px at 1.25 A and 80 px at 1.0 A both span 80 A: every frequency below both Nyquists
    # is on both grids, and the N^-2-normalised coefficients of a cosine do not depend on N.
    img64 = _waves(64, 1.25, 80.0, WAVES)
    img80 = _waves(80, 1.0, 80.0, WAVES)
    ft64, ft80 = fourier.fft2_centered(img64), fourier.fft2_centered(img80)
    # measured 2.2e-16 here and below (float64 rounding); 22x margin
    np.testing.assert_allclose(fourier.resample_half_plane(ft64, 64, 1.25, 80, 1.0), ft80,
                               rtol=0, atol=5e-15)
    # cropping drops what lies beyond the smaller Nyquist (|k| = 35 > 32) and keeps the rest
    extra = WAVES + [(0.4, 35, -3, 0.3)]
    got = fourier.resample_half_plane(fourier.fft2_centered(_waves(80, 1.0, 80.0, extra)),
                                      80, 1.0, 64, 1.25)
    np.testing.assert_allclose(got, ft64, rtol=0, atol=5e-15)
    # a constant image keeps its value (measured 0; the bound allows FFT rounding)
    const = fourier.resample_half_plane(fourier.fft2_centered(np.full((64, 64), 3.0)), 64,
                                        1.25, 80, 1.0)
    np.testing.assert_allclose(fourier.ifft2_centered(const, 80), 3.0, rtol=0, atol=1e-13)


def test_pad_then_crop_round_trip_odd_and_even():
    rng = np.random.default_rng(1)
    for n1, n2 in ((33, 48), (48, 33), (40, 64)):
        img = rng.normal(size=(3, n1, n1))
        ft = fourier.fft2_centered(img)
        pix2 = n1 * 1.0 / n2
        there = fourier.resample_half_plane(ft, n1, 1.0, n2, pix2)
        back = fourier.resample_half_plane(there, n2, pix2, n1, 1.0)
        keep = np.abs(fourier.half_plane_freqs(n1)[0]) < min(n1, n2) / 2
        keep &= fourier.half_plane_freqs(n1)[1] < min(n1, n2) / 2
        np.testing.assert_allclose(back[:, keep], ft[:, keep], rtol=0, atol=1e-12)  # measured 0


def _gaussian_ft(n: int, pix: float, sigma: float) -> np.ndarray:
    """fft2_centered of a centred Gaussian blob exp(-r^2 / 2 sigma^2) (r in A) on n, pix."""
    c = (np.arange(n) - n // 2) * pix
    y, x = np.meshgrid(c, c, indexing="ij")
    return fourier.fft2_centered(np.exp(-(x * x + y * y) / (2 * sigma * sigma)))


@pytest.mark.parametrize("n1, pix1, n2, pix2", [(64, 1.24, 64, 1.25), (64, 1.25, 64, 1.24),
                                                (60, 1.3, 72, 1.1)])
def test_other_pixel_size_matches_the_particle_sampled_at_the_new_pixels(n1, pix1, n2, pix2):
    # A particle (a blob well inside both boxes) imaged at pix1 and at pix2: the resampled FT
    # is the second image's FT (frequencies mapped k1/(n1 pix1) -> k2/(n2 pix2), amplitudes
    # scaled by the box areas); without the area factor it would be off by ~1.6-4%.
    sigma = 4.0
    got = fourier.resample_half_plane(_gaussian_ft(n1, pix1, sigma), n1, pix1, n2, pix2)
    want = _gaussian_ft(n2, pix2, sigma)
    # measured 8.4e-4 of the maximum (the blob's tail resampled); margin 19%
    assert np.abs(got - want).max() < 1e-3 * np.abs(want).max()
    ratio = (n1 * pix1) / (n2 * pix2)
    # the sampled blob's DC is 2 pi sigma^2 / area on both grids (aliasing ~exp(-200)):
    # measured 2.2e-16 (float64 rounding); 22x margin
    assert abs(got[0, 0] / want[0, 0] - 1) < 5e-15
    # the test distinguishes the area factor (measured at least 0.0159)
    assert abs(ratio**2 - 1) > 0.015


def test_grid_scale():
    # measured 0 against approx's default rel 1e-6 (all three)
    assert fourier.grid_scale(64, 1.25, 80, 1.0) == pytest.approx(1.0)
    assert fourier.grid_scale(64, 1.24, 64, 1.25) == pytest.approx(1.25 / 1.24)
    # image pixel k is the frequency k / (n_img pix_img) = k * grid_scale / (n_ref pix_ref)
    k = 7.0
    g = fourier.grid_scale(100, 1.1, 128, 0.9)
    assert k / (100 * 1.1) == pytest.approx(k * g / (128 * 0.9))


def test_resample_rejects_wrong_shape():
    with pytest.raises(ValueError, match="expected"):
        fourier.resample_half_plane(np.zeros((8, 4)), 8, 1.0, 8, 1.0)


# -- where relion_project puts the image origin -------------------------------------------------


@pytest.mark.parametrize("n, c", [(8, 4), (9, 5), (64, 32), (65, 33)])
def test_project_image_origin(n, c):
    assert fourier.project_image_origin(n) == c


@pytest.mark.parametrize("n", [8, 9, 64, 65])
def test_ifft2_at_origin_is_relion_centerfft_backward(n):
    # relion_project: inverse FFT (origin at index 0), then CenterFFT(img, false), which for
    # each axis moves element j to (j - floor(n/2)) mod n. Written out with explicit indices.
    rng = np.random.default_rng(n)
    ft = fourier.fft2_centered(rng.normal(size=(n, n)))
    raw = np.fft.irfft2(ft * n * n, s=(n, n))  # origin at index 0
    relion = np.empty_like(raw)
    for i in range(n):
        for j in range(n):
            relion[(i - n // 2) % n, (j - n // 2) % n] = raw[i, j]
    got = fourier.ifft2_at_origin(ft, n, fourier.project_image_origin(n))
    # measured 1.1e-15 (float64 FFTs, values up to 3.9); 18x margin
    np.testing.assert_allclose(got, relion, rtol=0, atol=2e-14)
    # floor(n/2) placement is fourier.ifft2_centered; the two agree for even n only (measured:
    # equal for even n, up to 5.06 apart for odd n)
    same = np.allclose(fourier.ifft2_at_origin(ft, n, n // 2), got)
    assert same == (n % 2 == 0)
    np.testing.assert_allclose(fourier.ifft2_at_origin(ft, n, n // 2),
                               fourier.ifft2_centered(ft, n), rtol=0, atol=1e-12)  # measured 0
