"""Realistic imperfections of `simulate_particles` (cryomap.imperfections)."""

from __future__ import annotations

import numpy as np
import pytest

from cryomap import fourier
from cryomap.imperfections import Imperfections, noise_filter
from cryomap.simulate import simulate_particles
from cryomap.volume import Volume

PIX = 4.0


@pytest.fixture(scope="module")
def volume() -> np.ndarray:
    return Volume.phantom(32, PIX, 0, 0, 1.0).data


def test_defaults_are_the_ideal_simulation(volume) -> None:
    ideal = simulate_particles(volume, PIX, 50, snr=0.1, seed=3)
    same = simulate_particles(volume, PIX, 50, snr=0.1, seed=3, imperfections=Imperfections())
    np.testing.assert_array_equal(ideal[0], same[0])
    assert ideal[3].equals(same[3])


def test_micrographs_heights_and_estimation_error(volume) -> None:
    imp = Imperfections(n_micrographs=40, ice_thickness=600.0, ctf_error=150.0)
    _, _, written, truth = simulate_particles(volume, PIX, 2000, snr=None, seed=1,
                                              imperfections=imp)
    assert written["rlnMicrographName"].nunique() == 40
    # one written defocus per micrograph (the estimate), one true defocus per particle
    per_mic = written.groupby("rlnMicrographName")["rlnDefocusU"].nunique()
    assert per_mic.max() == 1
    error = truth["rlnDefocusU"] - written["rlnDefocusU"]
    np.testing.assert_allclose(error, truth["rlnDefocusV"] - written["rlnDefocusV"])
    # height uniform in +-300 Å: within a micrograph the spread is the height's alone
    within = error - error.groupby(written["rlnMicrographName"]).transform("mean")
    # measured 0.986 of 600/sqrt(12); 2000 draws scatter by ~2 %, margin 5 %
    assert within.std() == pytest.approx(600.0 / np.sqrt(12), rel=0.05)
    assert np.abs(within).max() <= 600.0  # measured 358; 600 Å: the heights' range, a hard bound
    # the micrographs' errors: 40 draws of N(0, 150 Å)
    mic_error = (error - within).groupby(written["rlnMicrographName"]).first()
    assert 100.0 < mic_error.std() < 200.0  # measured 161 Å; the chi-square 99.9 % range


def test_amplitude_scales_each_clean_image(volume) -> None:
    plain = simulate_particles(volume, PIX, 300, snr=None, seed=2)
    imp = Imperfections(amplitude_spread=0.3)
    images, _, written, truth = simulate_particles(volume, PIX, 300, snr=None, seed=2,
                                                   imperfections=imp)
    a = truth["rlnCtfScalefactor"].to_numpy()
    # float32 images: measured 1.1e-7 relative (7.9e-7 absolute, values up to 10.2)
    np.testing.assert_allclose(images, plain[0] * a[:, None, None], rtol=2e-6, atol=1e-7)
    assert "rlnCtfScalefactor" not in written  # the user's STAR does not know it
    assert np.log(a).std() == pytest.approx(0.3, rel=0.1)  # measured 0.288; sd error ~4 %
    assert a.mean() == pytest.approx(1.0, abs=0.05)  # measured 0.975; sd error ~1.8 %


def test_junk_picks(volume) -> None:
    imp = Imperfections(junk_fraction=0.25)
    images, _, _, truth = simulate_particles(volume, PIX, 800, snr=None, seed=4,
                                             imperfections=imp)
    plain = simulate_particles(volume, PIX, 800, snr=None, seed=4)[0]
    junk = truth["rlnClassNumber"].to_numpy() == 0
    assert junk.mean() == pytest.approx(0.25, abs=0.05)  # measured 0.233; 800 draws: sd 1.5 %
    np.testing.assert_array_equal(images[~junk], plain[~junk])
    # junk is not the particle: it correlates with the particle's image no better than chance
    cc = [np.corrcoef(images[i].ravel(), plain[i].ravel())[0, 1] for i in np.flatnonzero(junk)
          if images[i].any()]
    assert np.median(np.abs(cc)) < 0.2  # measured 0.083 (the same CTF in both)
    # its signal is as strong as the particles' (sd times 0.5 to 2: variance x 0.25 to 4)
    var_junk = images[junk].var(axis=(1, 2))
    var_good = images[~junk].var(axis=(1, 2)).mean()
    assert 1.0 * var_good < np.median(var_junk[var_junk > 0]) < 2.5 * var_good  # measured 1.75
    assert np.mean(var_junk == 0) == pytest.approx(0.25, abs=0.1)  # "empty": measured 0.21


def test_coloured_noise_spectrum(volume) -> None:
    imp = Imperfections(noise_colour=8.0)
    clean = simulate_particles(volume, PIX, 400, snr=None, seed=5, ctf=False)[0]
    noise = simulate_particles(volume, PIX, 400, snr=0.1, seed=5, imperfections=imp,
                               ctf=False)[0] - clean
    white = simulate_particles(volume, PIX, 400, snr=0.1, seed=5, ctf=False)[0] - clean
    n = noise.shape[-1]
    shells = fourier.shell_index_2d(n)
    power = fourier.shell_sums(np.mean(np.abs(fourier.fft2_centered(noise)) ** 2, 0), shells,
                               n // 2 + 1)
    psd = power / fourier.shell_sums(np.ones(shells.shape), shells, n // 2 + 1)
    filt = noise_filter(n, 8.0)[0] ** 2  # ky = 0 row: the PSD at |k| = kx
    ratio = psd[1:3].mean() / psd[12:15].mean()
    want = filt[1:3].mean() / filt[12:15].mean()
    assert ratio == pytest.approx(want, rel=0.1)  # measured 4.18 against 4.36; margin 10 %
    # the noise variance is that of white noise at the same SNR (the filter keeps it)
    assert noise.var() == pytest.approx(white.var(), rel=0.02)  # measured 1.001


@pytest.mark.parametrize("field, value", [("n_micrographs", -1), ("ice_thickness", -5.0),
                                          ("ctf_error", np.nan), ("amplitude_spread", 3.0),
                                          ("junk_fraction", 1.0), ("noise_colour", 0.0),
                                          ("signal_bfactor", -1.0)])
def test_bad_values_name_the_field(volume, field, value) -> None:
    with pytest.raises(ValueError, match=field):
        simulate_particles(volume, PIX, 5, imperfections=Imperfections(**{field: value}))
