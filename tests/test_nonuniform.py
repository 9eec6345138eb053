"""Non-uniform refinement's regulariser (`em.nonuniform`, `refine --nu`): the FSC of twice
the data, each half filtered to the local resolution its own two folds support (known by
construction here), and the refinement option end to end."""

from __future__ import annotations

import numpy as np
import pytest

from cryomap.em import nonuniform
from cryomap.em.refine import RefineOptions

N, PIX = 64, 2.5
D_FINE, D_COARSE = 7.5, 15.0  # Å: where each quarter's local FSC crosses 0.143
SNR0 = 60.0  # quarter map signal-to-noise power at s = 0
SSNR_T = 0.143 / (1 - 0.143)  # an FSC of 0.143


def quarters(seed: int = 0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(quarter 1, quarter 2, truth): one white random field with the envelope
    exp(-B s^2 / 4), B giving each quarter's local SSNR SNR0 exp(-B s^2 / 2) = SSNR_T at D
    (D_FINE for x below the centre, D_COARSE above), plus independent white noise."""
    rng = np.random.default_rng(seed)
    ft = np.fft.rfftn(rng.standard_normal((N,) * 3))
    f, fr = np.fft.fftfreq(N, d=PIX), np.fft.rfftfreq(N, d=PIX)
    s2 = f[:, None, None] ** 2 + f[None, :, None] ** 2 + fr[None, None, :] ** 2

    def region(d: float) -> np.ndarray:
        b = 2 * d * d * np.log(SNR0 / SSNR_T)
        return np.fft.irfftn(ft * np.exp(-b * s2 / 4), s=(N,) * 3, axes=(0, 1, 2))

    t = 0.5 + 0.5 * np.tanh((np.arange(N) - N // 2) / 2.0)
    truth = (1 - t) * region(D_FINE) + t * region(D_COARSE)
    sigma = np.sqrt(1.0 / SNR0)
    return (truth + sigma * rng.standard_normal(truth.shape),
            truth + sigma * rng.standard_normal(truth.shape), truth)


def half_resolution(d: float) -> float:
    """Where the half (both quarters, SSNR twice theirs) crosses FSC 0.143: SNR0 2
    exp(-B s^2 / 2) = SSNR_T with B from d."""
    return d * np.sqrt(np.log(SNR0 / SSNR_T) / np.log(2 * SNR0 / SSNR_T))


def test_half_fsc_is_that_of_twice_the_data():
    ssnr = np.array([0.0, 0.05, 0.2, 1.0, 5.0, 100.0])
    quarter = ssnr / (1 + ssnr)
    expected = 2 * ssnr / (1 + 2 * ssnr)
    np.testing.assert_allclose(nonuniform.half_fsc(quarter), expected, rtol=0, atol=1e-12)
    assert np.all(nonuniform.half_fsc(np.array([-0.3, 1.2])) == [0.0, 1.0])


def test_folds_are_fixed_and_balanced():
    a, b = nonuniform.fold_of_particles(2000, 3), nonuniform.fold_of_particles(2000, 3)
    assert np.array_equal(a, b) and set(np.unique(a)) == {1, 2}
    assert abs(np.mean(a == 1) - 0.5) < 0.04  # binomial sd 0.011 (3.5 sd); measured 0.000
    assert not np.array_equal(a, nonuniform.fold_of_particles(2000, 4))


@pytest.fixture(scope="module")
def filtered():
    q1, q2, truth = quarters()
    volume = 0.5 * (q1 + q2)  # the half's map
    return nonuniform.filter_half(volume, np.stack([q1, q2]), PIX, mask_radius_px=26.0,
                                  threads=2), volume, truth


def test_each_region_gets_the_resolution_of_its_half(filtered):
    nu, _, _ = filtered
    loc = nu.local_resolution
    x = np.arange(N)[None, None, :] - N // 2
    for d, region in ((D_FINE, x <= -12), (D_COARSE, x >= 12)):
        known = loc[region.repeat(N, 0).repeat(N, 1) & (loc > 0)]
        median = float(np.median(known))
        expect = half_resolution(d)
        shell = expect ** 2 / (N * PIX)  # one Fourier shell in Å there
        print(f"\nregion of quarter resolution {d} Å: half {expect:.2f} Å expected, local "
              f"median {median:.2f} Å ({(median - expect) / shell:+.2f} shell)")
        # measured +0.59 (fine) and -0.16 (coarse) shells; margin: one shell (1.7x)
        assert abs(median - expect) <= shell


def test_filter_keeps_detail_only_where_resolved(filtered):
    """Power of the filtered half map between the two regions' resolutions (12-9 Å) relative
    to the unfiltered one, in a ball in each region; and voxels no window reaches are left
    as they were."""
    nu, volume, _ = filtered
    f, fr = np.fft.fftfreq(N, d=PIX), np.fft.rfftfreq(N, d=PIX)
    s = np.sqrt(f[:, None, None] ** 2 + f[None, :, None] ** 2 + fr[None, None, :] ** 2)
    band = (s > 1 / 12.0) & (s < 1 / 9.0)
    z, y, x = np.meshgrid(*[np.arange(N) - N // 2] * 3, indexing="ij")
    kept = []
    for cx in (-16, 16):
        ball = np.sqrt(z**2 + y**2 + (x - cx) ** 2) <= 8
        power = [np.sum(np.abs(np.fft.rfftn(v * ball))[band] ** 2) for v in (nu.volume, volume)]
        kept.append(power[0] / power[1])
    print(f"\n12-9 Å power kept: {kept[0]:.2f} where resolved to "
          f"{half_resolution(D_FINE):.1f} Å, {kept[1]:.2f} where {half_resolution(D_COARSE):.1f}")
    assert kept[0] > 0.8 and kept[1] < 0.25  # measured 0.99 and 0.15; margin 1.7x
    untouched = nu.local_resolution == 0
    assert untouched.any() and np.array_equal(nu.volume[untouched], volume[untouched])


def test_the_option_reaches_the_refinement():
    assert RefineOptions().nu is False and RefineOptions(nu=True).nu is True


def test_refine_nu_end_to_end():
    """`refine --nu` on a small set: every iteration before the last filters both halves
    (the log line), the half maps stay those of the unfiltered sums, and the map recovers
    the truth about as well as the homogeneous refinement of the same data."""
    import cryomap

    truth = cryomap.Volume.phantom(box=32, pixel_size=6.0)
    sim = cryomap.simulate(truth, n=300, snr=0.3, seed=2)
    lines: list[str] = []
    results = {}
    for nu in (False, True):
        results[nu] = cryomap.refine(sim.particles, truth.lowpass(40), particle_diameter=170,
                                     ini_high=40, healpix_order=1, iterations=3, nu=nu,
                                     threads=2, echo=lines.append if nu else None)
    filtered = [line for line in lines if "non-uniform filter: local resolution" in line]
    assert len(filtered) == 2, lines  # iterations 1 and 2; the last reconstructs only
    res = {nu: r.map.fsc(truth).resolution(0.5) for nu, r in results.items()}
    print(f"\nFSC 0.5 vs truth: homogeneous {res[False]:.1f} Å, --nu {res[True]:.1f} Å")
    # a uniform phantom: no better, no worse; measured 27.4 and 27.4 Å; margin 10 %
    assert res[True] <= 1.10 * res[False]
