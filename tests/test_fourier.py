"""Pins cryomap.fourier to RELION's grid/FFT conventions (docs/conventions.md "Grids").

Every expected value here is computed independently of the module (brute-force DFTs, explicit
enumerations), so a change of convention in fourier.py makes a test fail.
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from cryomap import fourier as F

SIZES = [8, 9, 16, 17]


def relion_round(x: float) -> int:
    """RELION's ROUND macro (macros.h): half away from zero."""
    return int(math.floor(x + 0.5)) if x > 0 else int(math.ceil(x - 0.5))


def ky_of_row(i: int, n: int) -> int:
    """FFTW row -> ky (docs/conventions.md "Grids"): i if i <= N/2 else i - N."""
    return i if i <= n // 2 else i - n


def brute_dft2(img: np.ndarray) -> np.ndarray:
    """Half-plane F[i, j] = N^-2 sum_r x[r] exp(-2 pi i k.(r - c)/N), c = floor(N/2), x = last
    axis; written out from the definition, with no FFT."""
    n = img.shape[0]
    c = n // 2
    r = np.arange(n) - c
    out = np.zeros((n, n // 2 + 1), dtype=complex)
    for i in range(n):
        ky = ky_of_row(i, n)
        for kx in range(n // 2 + 1):
            ph = np.exp(-2j * np.pi * (ky * r[:, None] + kx * r[None, :]) / n)
            out[i, kx] = (img * ph).sum() / n**2
    return out


# --------------------------------------------------------------------------- origin, layout


@pytest.mark.parametrize("n, c", [(1, 0), (2, 1), (8, 4), (9, 4), (64, 32), (65, 32)])
def test_origin_is_floor_half(n, c):
    assert F.origin(n) == c


@pytest.mark.parametrize("n", SIZES)
def test_freq_1d_and_half_plane_layout(n):
    f = F.freq_1d(n)
    assert f.tolist() == [ky_of_row(i, n) for i in range(n)]
    if n % 2 == 0:
        assert f[n // 2] == n // 2  # Nyquist row is +N/2, as in RELION
        assert (f == -(n // 2)).sum() == 0
    ky, kx = F.half_plane_freqs(n)
    assert ky.shape == kx.shape == (n, n // 2 + 1)
    assert kx[0].tolist() == list(range(n // 2 + 1))
    assert ky[:, 0].tolist() == [ky_of_row(i, n) for i in range(n)]
    kz3, ky3, kx3 = F.half_volume_freqs(n)
    assert kz3.shape == (n, n, n // 2 + 1)
    assert kz3[:, 0, 0].tolist() == f.tolist()
    assert ky3[0, :, 0].tolist() == f.tolist()
    assert kx3[0, 0].tolist() == list(range(n // 2 + 1))


@pytest.mark.parametrize("n", SIZES)
def test_fft2_matches_brute_force_dft(n):
    img = np.random.default_rng(n).normal(size=(n, n))
    ft = F.fft2_centered(img)
    assert ft.shape == (n, n // 2 + 1)
    np.testing.assert_allclose(ft, brute_dft2(img), rtol=0, atol=5e-15)  # measured 2.4e-16; 21x


@pytest.mark.parametrize("n", SIZES)
def test_fft2_of_delta_at_origin_is_constant(n):
    img = np.zeros((n, n))
    img[F.origin(n), F.origin(n)] = 1.0
    ft = F.fft2_centered(img)
    # measured 0; the bound allows float64 rounding (values 1/N^2 <= 0.016)
    np.testing.assert_allclose(ft, np.full(ft.shape, 1.0 / n**2), rtol=0, atol=1e-15)


@pytest.mark.parametrize("n", SIZES)
@pytest.mark.parametrize("dx, dy", [(1, 0), (0, 1), (3, -2), (-1, 2)])
def test_fft2_of_shifted_delta_has_linear_phase(n, dx, dy):
    c = F.origin(n)
    img = np.zeros((n, n))
    img[c + dy, c + dx] = 1.0  # x = last array axis
    ft = F.fft2_centered(img)
    ky, kx = F.half_plane_freqs(n)
    expected = np.exp(-2j * np.pi * (kx * dx + ky * dy) / n) / n**2
    np.testing.assert_allclose(ft, expected, rtol=0, atol=5e-16)  # measured 2.8e-17 (float64); 18x


@pytest.mark.parametrize("n", [8, 9])
def test_fft3_of_shifted_delta(n):
    c = F.origin(n)
    vol = np.zeros((n, n, n))
    dx, dy, dz = 1, -2, 3
    vol[c + dz, c + dy, c + dx] = 1.0  # [z, y, x]
    ft = F.fft3_centered(vol)
    assert ft.shape == (n, n, n // 2 + 1)
    kz, ky, kx = F.half_volume_freqs(n)
    expected = np.exp(-2j * np.pi * (kx * dx + ky * dy + kz * dz) / n) / n**3
    np.testing.assert_allclose(ft, expected, rtol=0, atol=1e-16)  # measured 5.2e-18 (float64); 19x


def test_fft2_rejects_non_square():
    with pytest.raises(ValueError):
        F.fft2_centered(np.zeros((8, 9)))


@pytest.mark.parametrize("n", SIZES)
def test_fft2_round_trip_and_batch(n):
    imgs = np.random.default_rng(1).normal(size=(3, n, n))
    ft = F.fft2_centered(imgs)
    assert ft.shape == (3, n, n // 2 + 1)
    # measured 0; 1e-15 allows a few ulp (a batched FFT may vectorise differently)
    np.testing.assert_allclose(ft[1], F.fft2_centered(imgs[1]), rtol=0, atol=1e-15)
    # measured 1.8e-15 (float64 rounding); 17x margin
    np.testing.assert_allclose(F.ifft2_centered(ft, n), imgs, rtol=0, atol=3e-14)


@pytest.mark.parametrize("n", SIZES)
def test_fft3_round_trip(n):
    vol = np.random.default_rng(2).normal(size=(n, n, n))
    # measured 2.2e-15 (float64 rounding); 14x margin
    np.testing.assert_allclose(F.ifft3_centered(F.fft3_centered(vol), n), vol, rtol=0, atol=3e-14)


@pytest.mark.parametrize("n", SIZES)
def test_parseval_with_hermitian_weights(n):
    img = np.random.default_rng(3).normal(size=(n, n))
    ft = F.fft2_centered(img)
    w = F.hermitian_weights_2d(n)
    # N^-2-normalised FT: sum over the full plane of |F|^2 = sum |x|^2 / N^2; measured 3.7e-16
    # relative (float64 rounding); 14x margin
    np.testing.assert_allclose((w * np.abs(ft) ** 2).sum(), (img**2).sum() / n**2, rtol=5e-15)
    # weight 1 exactly on the self-mate columns (kx = 0, and kx = N/2 for even N)
    assert np.all(w[:, 0] == 1)
    assert np.all(w[:, -1] == (1 if n % 2 == 0 else 2))
    assert np.all(w[:, 1:-1] == 2)


# --------------------------------------------------------------------------- shells


@pytest.mark.parametrize("n", [8, 9, 16])
def test_shell_index_grids_are_round_abs_k(n):
    s2 = F.shell_index_2d(n)
    for i in range(n):
        for kx in range(n // 2 + 1):
            assert s2[i, kx] == relion_round(math.hypot(kx, ky_of_row(i, n)))
    s3 = F.shell_index_3d(n)
    f = [ky_of_row(i, n) for i in range(n)]
    for a in range(n):
        for b in range(n):
            for kx in range(n // 2 + 1):
                assert s3[a, b, kx] == relion_round(math.sqrt(f[a] ** 2 + f[b] ** 2 + kx**2))


def test_shell_index_rounds_half_away_from_zero():
    """RELION's ROUND is floor(x + 0.5) for x > 0, so a radius of exactly 2.5 is shell 3.

    Half-integer radii do occur: the padded-grid shell is ROUND(|q| / p) in RELION's
    BackProjector::reconstruct, and cryomap's em.mstep.padded_shells uses shell_index(|q|/p)
    (|q| = 5, p = 2 -> 2.5). np.rint rounds half to even (2.5 -> 2, 3.5 -> 4).
    """
    r = np.array([0.0, 0.49, 0.5, 1.5, 2.5, 3.5, 4.5, 10.5])
    expected = [relion_round(x) for x in r]
    assert expected == [0, 0, 1, 2, 3, 4, 5, 11]
    assert F.shell_index(r).tolist() == expected


def test_resolution_angstrom():
    res = F.resolution_angstrom(np.array([0, 1, 4, 32]), 64, 1.5)
    # measured 0 against the default rtol 1e-7 (here and the approx below: 1e-6)
    np.testing.assert_allclose(res, [999.0, 96.0, 24.0, 3.0])
    assert float(F.resolution_angstrom(0, 100, 1.0)) == 999.0
    assert float(F.resolution_angstrom(5, 100, 1.2)) == pytest.approx(24.0)


# --------------------------------------------------------------------------- centred layout


@pytest.mark.parametrize("n, m", [(8, 3), (9, 4), (16, 5)])
def test_to_centred_2d_values_and_round_trip(n, m):
    ft = F.fft2_centered(np.random.default_rng(4).normal(size=(n, n)))
    c = F.to_centred(ft, m)
    assert c.shape == (1, 2 * m + 1, m + 1)
    assert c.dtype == np.complex64
    # measured 4.9e-8 relative (complex64 rounding of the double FT); 20x margin
    for ky in range(-m, m + 1):
        for kx in range(m + 1):
            assert c[0, ky + m, kx] == pytest.approx(ft[ky % n, kx], rel=1e-6, abs=1e-9)
    back = F.from_centred(c, n)
    assert back.shape == (n, n // 2 + 1)
    ky, kx = F.half_plane_freqs(n)
    inside = (np.abs(ky) <= m) & (kx <= m)
    np.testing.assert_allclose(back, np.where(inside, ft, 0), atol=1e-7)  # measured 7.1e-9; 14x
    np.testing.assert_array_equal(F.to_centred(back, m), c)


@pytest.mark.parametrize("n, m", [(8, 3), (9, 4)])
def test_to_centred_3d_values_and_round_trip(n, m):
    ft = F.fft3_centered(np.random.default_rng(5).normal(size=(n, n, n)))
    c = F.to_centred(ft, m)
    assert c.shape == (2 * m + 1, 2 * m + 1, m + 1)
    kz, ky, kx = np.meshgrid(np.arange(-m, m + 1), np.arange(-m, m + 1), np.arange(m + 1),
                             indexing="ij")
    # measured 5.4e-8 relative, 3.0e-9 absolute (complex64 rounding); margins 18x and 33x
    np.testing.assert_allclose(c, ft[kz % n, ky % n, kx], rtol=1e-6, atol=1e-9)
    back = F.from_centred(c, n)
    fz, fy, fx = F.half_volume_freqs(n)
    inside = (np.abs(fz) <= m) & (np.abs(fy) <= m) & (fx <= m)
    np.testing.assert_allclose(back, np.where(inside, ft, 0), atol=1e-7)  # as above
    np.testing.assert_array_equal(F.to_centred(back, m), c)


@pytest.mark.parametrize("n, m", [(8, 3), (9, 4), (64, 31)])
def test_max_centred_radius_excludes_nyquist(n, m):
    assert F.max_centred_radius(n) == m
    # a larger crop is zero beyond what the box holds (the kernels' margin), and maps back
    rng = np.random.default_rng(n)
    ft = rng.normal(size=(n, n, n // 2 + 1)) + 1j * rng.normal(size=(n, n, n // 2 + 1))
    big = F.to_centred(ft, m + 2)
    np.testing.assert_array_equal(big[2:-2, 2:-2, : m + 1], F.to_centred(ft, m))
    assert not big[:2].any() and not big[:, :, m + 1:].any()
    np.testing.assert_array_equal(F.from_centred(big, n), F.from_centred(F.to_centred(ft, m), n))


def test_symmetrize_kx0_plane_is_hermitian_sum():
    rng = np.random.default_rng(6)
    m = 4
    shape = (2 * m + 1, 2 * m + 1, m + 1)
    data = rng.normal(size=shape) + 1j * rng.normal(size=shape)
    out = F.symmetrize_kx0_plane(data)
    plane = out[:, :, 0]
    # Hermitian: H(kz, ky) = conj(H(-kz, -ky)); index (kz + m, ky + m). Here and below:
    # measured 0 (the same float64 sums; the bounds allow rounding)
    np.testing.assert_allclose(plane, np.conj(plane[::-1, ::-1]), rtol=0, atol=1e-14)
    # value: P(k) + conj(P(-k)) (RELION's enforceHermitianSymmetry)
    for kz in range(-m, m + 1):
        for ky in range(-m, m + 1):
            expect = data[kz + m, ky + m, 0] + np.conj(data[-kz + m, -ky + m, 0])
            assert out[kz + m, ky + m, 0] == pytest.approx(expect)
    # DC becomes 2 Re
    assert out[m, m, 0] == pytest.approx(2 * data[m, m, 0].real)
    np.testing.assert_array_equal(out[:, :, 1:], data[:, :, 1:])
    assert out is not data and np.array_equal(data, data.copy())  # input untouched

    weight = rng.random(shape)
    w = F.symmetrize_kx0_plane(weight)
    assert not np.iscomplexobj(w)
    np.testing.assert_allclose(w[:, :, 0], weight[:, :, 0] + weight[::-1, ::-1, 0])  # measured 0
    np.testing.assert_array_equal(w[:, :, 1:], weight[:, :, 1:])


def test_symmetrize_kx0_plane_2d_layout():
    rng = np.random.default_rng(7)
    c = rng.normal(size=(1, 7, 4)) + 1j * rng.normal(size=(1, 7, 4))
    out = F.symmetrize_kx0_plane(c)
    col = out[0, :, 0]
    np.testing.assert_allclose(col, np.conj(col[::-1]), rtol=0, atol=1e-14)  # measured 0


# --------------------------------------------------------------------------- pixel mask


def brute_mask_pixels(n: int, r: int) -> list[tuple[int, int]]:
    """(kx, ky) of the half plane with 0 < ROUND|k| <= r, not (kx == 0 and ky < 0), in row-major
    (ky row, kx) order: RELION's Mresol rule (ml_optimiser.cpp)."""
    out = []
    for i in range(n):
        ky = ky_of_row(i, n)
        for kx in range(n // 2 + 1):
            s = relion_round(math.hypot(kx, ky))
            if 0 < s <= r and not (kx == 0 and ky < 0):
                out.append((kx, ky))
    return out


@pytest.mark.parametrize("n, r", [(8, 2), (8, 4), (9, 4), (16, 5), (16, 8), (17, 8), (32, 11)])
def test_pixel_mask_matches_brute_force(n, r):
    pm = F.pixel_mask(n, r)
    ref = brute_mask_pixels(n, r)
    assert pm.box == n and pm.r_max == r
    assert pm.n_pixels == len(ref)
    got = [(int(a), int(b)) for a, b in pm.coords]
    assert got == ref
    assert pm.coords.dtype == np.float32
    assert pm.shell.tolist() == [relion_round(math.hypot(a, b)) for a, b in ref]
    # flat_index points at the right pixel of the (n, n//2+1) half plane
    ky, kx = F.half_plane_freqs(n)
    np.testing.assert_array_equal(kx.ravel()[pm.flat_index], pm.coords[:, 0])
    np.testing.assert_array_equal(ky.ravel()[pm.flat_index], pm.coords[:, 1])
    assert (0, 0) not in got
    assert not any(a == 0 and b < 0 for a, b in got)


def test_pixel_mask_known_counts_and_capping():
    # shells 1..2 of a big box: round|k| <= 2 means |k|^2 <= 6 -> 21 full-plane points,
    # minus DC = 20, halved by Friedel symmetry = 10
    assert F.pixel_mask(64, 2).n_pixels == 10
    assert F.pixel_mask(64, 1).n_pixels == 4  # (1,0), (0,1), (1,1), (1,-1)
    # r_max is floored and capped at box//2
    assert F.pixel_mask(16, 3.7).r_max == 3
    assert F.pixel_mask(16, 3.7).n_pixels == F.pixel_mask(16, 3).n_pixels
    assert F.pixel_mask(16, 100).r_max == 8
    assert F.pixel_mask(16, 100).n_pixels == F.pixel_mask(16, 8).n_pixels


@pytest.mark.parametrize("n, r", [(16, 5), (16, 7), (17, 8), (9, 4), (32, 15)])
def test_pixel_mask_each_independent_pixel_once(n, r):
    """Away from Nyquist, the mask and its Friedel mates tile the band exactly once."""
    got = {(int(a), int(b)) for a, b in F.pixel_mask(n, r).coords}
    mates = {(-a, -b) for a, b in got}
    assert not got & mates
    band = {(a, b) for a in range(-n, n + 1) for b in range(-n, n + 1)
            if 0 < relion_round(math.hypot(a, b)) <= r}
    assert got | mates == band


def test_pixel_mask_nyquist_column_of_even_box_at_full_radius():
    """At r_max = N/2 of an even box the kx = N/2 column keeps both ky and -ky, which are
    aliases of one Friedel pair (F(N/2, -ky) = conj F(N/2, ky)). RELION's Mresol does the same
    (it only drops the ky < 0 half of kx = 0), so this pins the RELION behaviour: these are the
    only pixels whose Friedel mate is also in the mask."""
    n = 16
    keys = {(int(a) % n, int(b) % n) for a, b in F.pixel_mask(n, n // 2).coords}
    dup = sorted(((a, b) for a, b in keys if (-a % n, -b % n) in keys and (-a % n, -b % n)
                  != (a, b)))
    assert dup == [(8, 1), (8, 2), (8, 14), (8, 15)]  # (8, +-1), (8, +-2)
    # self-mates (real coefficients) are kept once: (0, N/2), (N/2, 0)
    assert (0, 8) in keys and (8, 0) in keys


@pytest.mark.parametrize("n, r", [(16, 5), (16, 8), (17, 8), (17, 3), (32, 12)])
def test_gather_scatter_round_trip_band_limits_the_image(n, r):
    rng = np.random.default_rng(8)
    img = rng.normal(size=(n, n)) + 3.0  # non-zero mean: DC must be dropped
    ft = F.fft2_centered(img)
    pm = F.pixel_mask(n, r)
    vals = pm.gather(ft)
    assert vals.shape == (pm.n_pixels,) and vals.dtype == np.complex64
    # measured 5.8e-8 relative (complex64 rounding); 17x margin
    np.testing.assert_allclose(vals, ft.ravel()[pm.flat_index], rtol=1e-6, atol=1e-9)

    full = pm.scatter(vals)
    assert full.shape == (n, n // 2 + 1)
    ky, kx = F.half_plane_freqs(n)
    shells = F.shell_index_2d(n)
    band = (shells > 0) & (shells <= r)  # whole half plane incl. kx=0, ky<0; DC excluded
    ref_ft = np.where(band, ft, 0)
    # scatter fills the kx = 0, ky < 0 Friedel mates and leaves DC at zero; measured 5.4e-9
    # (5.8e-8 relative, complex64 rounding)
    np.testing.assert_allclose(full, ref_ft, rtol=1e-6, atol=1e-7)
    assert full[0, 0] == 0
    col = full[:, 0]
    np.testing.assert_allclose(col[(-F.freq_1d(n)) % n], np.conj(col), atol=1e-7)  # measured 0

    rec = F.ifft2_centered(full, n)
    ref = F.ifft2_centered(ref_ft, n)
    np.testing.assert_allclose(rec, ref, atol=1e-5)  # measured 3.8e-7 (float32); 27x margin
    assert abs(rec.mean()) < 3e-7  # DC removed: measured 1.5e-8 (float32 rounding); 20x
    if r < n // 2:
        # same thing by a full-plane complex FFT, band |k| rounded in 1..r (no Nyquist here)
        full_plane = np.fft.fft2(np.fft.ifftshift(img))
        rad = np.hypot(F.freq_1d(n)[None, :], F.freq_1d(n)[:, None])
        fband = (np.floor(rad + 0.5) > 0) & (np.floor(rad + 0.5) <= r)
        direct = np.fft.fftshift(np.fft.ifft2(np.where(fband, full_plane, 0)))
        assert np.abs(direct.imag).max() < 5e-15  # measured 3.1e-16 (float64); 16x margin
        np.testing.assert_allclose(rec, direct.real, atol=1e-5)  # measured 2.4e-7; 42x


def test_gather_scatter_batched():
    n, r = 12, 5
    imgs = np.random.default_rng(9).normal(size=(2, 3, n, n))
    ft = F.fft2_centered(imgs)
    pm = F.pixel_mask(n, r)
    vals = pm.gather(ft)
    assert vals.shape == (2, 3, pm.n_pixels)
    # batched against one at a time: measured 0 (default rtol 1e-7)
    np.testing.assert_allclose(vals[1, 2], pm.gather(ft[1, 2]))
    full = pm.scatter(vals)
    assert full.shape == (2, 3, n, n // 2 + 1)
    np.testing.assert_allclose(full[0, 1], pm.scatter(vals[0, 1]))


@pytest.mark.parametrize("n_pad,box,m", [(16, 8, 7), (17, 8, 9), (18, 9, 5), (20, 20, 9),
                                         (32, 16, 17), (33, 11, 4)])
def test_pruned_padded_transforms_equal_the_full_ones(n_pad, box, m):
    # padded_centred_ft: the box zero-padded (origin on origin), the full 3D FFT, the centred
    # crop; centred_ft_to_box: the centred FT placed in the full grid, the full inverse FFT,
    # shifted, the central window. Single precision both ways; measured at most 2.2e-7 and
    # 1.8e-7 of the maxima (float32 rounding of other sums); margins 4.5x and 5x
    rng = np.random.default_rng(7)
    vol = rng.standard_normal((box,) * 3)
    padded = np.zeros((n_pad,) * 3)
    off = F.origin(n_pad) - F.origin(box)
    padded[off:off + box, off:off + box, off:off + box] = vol
    want = F.to_centred(F.fft3_centered(padded), m)
    got = F.padded_centred_ft(vol, n_pad, m)
    assert got.shape == want.shape == (2 * m + 1, 2 * m + 1, m + 1)
    assert got.dtype == np.complex64
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-6 * np.abs(want).max())
    centred = (rng.standard_normal(want.shape) + 1j * rng.standard_normal(want.shape))
    full = F.ifft3_centered(F.from_centred(centred, n_pad), n_pad)
    window = full[off:off + box, off:off + box, off:off + box]
    back = F.centred_ft_to_box(centred.astype(np.complex64), n_pad, box)
    assert back.shape == (box,) * 3 and back.dtype == np.float32
    np.testing.assert_allclose(back, window, rtol=0, atol=1e-6 * np.abs(window).max())
