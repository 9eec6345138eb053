"""Pins cryomap.postprocess (relion_postprocess) on half maps whose FSC is known analytically,
and `cryomap postprocess`."""

from __future__ import annotations

import numpy as np
import pytest

from cryomap import fourier
from cryomap import postprocess as pp
from cryomap.cli.main import main
from cryomap.io.mrc import read_map, write_map
from cryomap.io.star import read_star
from cryomap.masks import make_mask
from cryomap.phantom import make_phantom

BOX, PIX = 48, 3.5
TARGET = 20  # shell where the true unmasked FSC is 0.143


def shell_stats(ft: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Mean |F|^2 per shell 0..N/2 and the number of half-grid voxels in it."""
    n = ft.shape[0]
    shells = fourier.shell_index_3d(n)
    keep = shells <= n // 2
    count = np.bincount(shells[keep], minlength=n // 2 + 1)
    power = np.bincount(shells[keep], weights=np.abs(ft[keep]) ** 2, minlength=n // 2 + 1)
    return power / count, count


@pytest.fixture(scope="module")
def case():
    """The phantom plus independent white noise in each half. With S(s) the map's mean shell
    power and N = sigma^2 / N^3 the noise's (N^-3-normalised FT), the true FSC is S/(S + N);
    sigma is chosen so that it is exactly 0.143 at shell TARGET. Masking multiplies the noise
    variance by the mask squared, so the masked FSC is S/(S + N mean(mask^2))."""
    vol = make_phantom(BOX, PIX).astype(np.float64)
    s_power, count = shell_stats(fourier.fft3_centered(vol))
    noise = s_power[TARGET] * (1 - 0.143) / 0.143
    sigma = np.sqrt(noise * BOX**3)
    rng = np.random.default_rng(11)
    h1 = vol + rng.normal(scale=sigma, size=vol.shape)
    h2 = vol + rng.normal(scale=sigma, size=vol.shape)
    mask = make_mask(vol, 0.05, extend=3, soft_edge=5)
    result = pp.postprocess(h1, h2, mask, PIX, pp.PostprocessOptions(auto_bfac=True))
    return {
        "vol": vol, "h1": h1, "h2": h2, "mask": mask, "count": count, "r": result,
        "true": s_power / (s_power + noise),
        "true_masked": s_power / (s_power + noise * np.mean(mask**2)),
    }


def sampling_error(fsc: np.ndarray, count: np.ndarray) -> np.ndarray:
    """Standard error of an FSC estimate from `count` complex samples: (1 - FSC^2)/sqrt(n)."""
    return (1.0 - fsc**2) / np.sqrt(count)


def test_unmasked_fsc_matches_the_analytic_curve(case):
    r, true = case["r"], case["true"]
    se = sampling_error(true, case["count"])
    assert r.fsc_unmasked[0] == 1.0
    # measured: at most 0.92 standard errors off (shell 19), 0.86 beyond the 1e-3; margin 0.14
    assert (np.abs(r.fsc_unmasked[1:] - true[1:]) <= se[1:] + 1e-3).all()
    # the measured curve crosses 0.143 within a shell of the analytic one (measured: the same
    # shell, 20; one shell is the rule's resolution)
    assert abs(pp.resolution_shell(r.fsc_unmasked) - pp.resolution_shell(true)) <= 1


def test_masked_fsc_and_final_resolution_match_the_analytic_model(case):
    r, tm = case["r"], case["true_masked"]
    se = sampling_error(tm, case["count"])
    # the mask's soft edge also trims some faint signal: 0.03 on top of the sampling error
    # (measured: at most 0.69 standard errors beyond the 0.03, 0.042 off at shell 21; margin
    # 0.31 standard errors)
    assert (np.abs(r.fsc_masked[1:] - tm[1:]) <= se[1:] + 0.03).all()
    analytic = pp.resolution_shell(tm)
    assert analytic > pp.resolution_shell(case["true"])  # masking does help here
    assert abs(r.resolution_shell - analytic) <= 1  # measured 0 (both shell 21); one shell
    assert r.final_resolution == pytest.approx(BOX * PIX / r.resolution_shell)
    assert not r.warnings


def test_corrected_fsc_definition_and_phase_randomised_fsc(case):
    r = case["r"]
    r0 = r.randomise_shell
    # randomisation starts where the unmasked FSC first drops below 0.8
    assert r.fsc_unmasked[r0] < 0.8 and (r.fsc_unmasked[1:r0] >= 0.8).all()
    assert r.randomise_from == pytest.approx(BOX * PIX / r0)
    # corrected = masked up to two shells beyond the randomisation shell, then the formula
    np.testing.assert_array_equal(r.fsc_corrected[: r0 + 2], r.fsc_masked[: r0 + 2])
    m, n = r.fsc_masked[r0 + 2:], r.fsc_random_masked[r0 + 2:]
    np.testing.assert_allclose(r.fsc_corrected[r0 + 2:], (m - n) / (1 - n))
    # well below r0 the randomised maps are the maps: same masked FSC; well beyond, ~0
    np.testing.assert_allclose(r.fsc_random_masked[1: r0 - 2], r.fsc_masked[1: r0 - 2],
                               atol=2e-5)  # measured 8.9e-6
    far = np.arange(r0 + 4, BOX // 2 + 1)
    # measured: at most 1.96 / sqrt(count); 10 % margin
    assert (np.abs(r.fsc_random_masked[far]) <= 2.2 / np.sqrt(case["count"][far])).all()


def test_randomise_phases_keeps_amplitudes_and_low_shells():
    rng = np.random.default_rng(0)
    v = rng.normal(size=(24, 24, 24))
    out = pp.randomise_phases(v, 6, seed=3)
    assert out.dtype == np.float64 and out.shape == v.shape
    a, b = fourier.fft3_centered(v), fourier.fft3_centered(out)
    # float rounding (|a| up to 0.025): measured 2.1e-17 and 1.8e-17
    np.testing.assert_allclose(np.abs(b), np.abs(a), atol=1e-15)
    kz, ky, kx = fourier.half_volume_freqs(24)
    r2 = kx**2 + ky**2 + kz**2
    np.testing.assert_allclose(b[r2 < 36], a[r2 < 36], atol=1e-15)
    beyond = r2 >= 36
    assert np.mean(np.abs(np.angle(b[beyond] / a[beyond])) > 0.1) > 0.95  # measured 0.973
    np.testing.assert_array_equal(pp.randomise_phases(v, 6, seed=3), out)
    assert not np.allclose(pp.randomise_phases(v, 6, seed=4), out)


def test_bfactor_fit_recovers_a_known_blur_with_relions_sign():
    # Unit amplitudes with random phases, blurred by exp(-B s^2/4): ln|F| = -B s^2/4, so the
    # fitted slope is -B/4 and B_fit = 4 slope = -B: the B that sharpens it back (RELION writes
    # this negative value as rlnBfactorUsedForSharpening). Fit from 10 A to 3.2 A (the Nyquist
    # shell at 3.0 A is half cut by the sphere |k| <= N/2). Measured: -100.01.
    n, pix = 48, 1.5
    ft = fourier.fft3_centered(np.random.default_rng(0).normal(size=(n, n, n)))
    ft /= np.abs(ft)
    blurred = pp.apply_bfactor(ft, 100.0, pix)
    assert np.abs(blurred).max() <= 1.0 + 1e-15  # positive B damps (measured 1 - 1.1e-16)
    fit = pp.fit_bfactor(pp.guinier_plot(blurred, pix), 10.0, 3.2)
    assert fit.bfactor == pytest.approx(-100.0, rel=1e-4)  # measured -100.0059
    assert fit.n_points == 15 and fit.correlation > 0.9999  # measured 1 - 1.5e-5
    # sharpening with the fitted B flattens the Guinier plot again
    flat = pp.guinier_plot(pp.apply_bfactor(blurred, fit.bfactor, pix), pix)
    assert abs(pp.fit_bfactor(flat, 10.0, 3.2).bfactor) < 0.01  # measured 0.0059
    # and B then -B is the identity up to Nyquist, 0 beyond
    kz, ky, kx = fourier.half_volume_freqs(n)
    inside = kx**2 + ky**2 + kz**2 <= (n // 2) ** 2
    back = pp.apply_bfactor(blurred, -100.0, pix)
    np.testing.assert_allclose(back[inside], ft[inside], atol=1e-14)  # measured 2.5e-16
    assert (back[~inside] == 0).all()


def test_sharpening_pipeline_on_the_analytic_case(case):
    r = case["r"]
    # the auto-B line is a least-squares fit of the FSC-weighted Guinier plot from 10 A to the
    # final resolution (checked with numpy's polyfit)
    g = r.guinier_weighted
    res = BOX * PIX / np.maximum(np.arange(g.s2.size), 1e-9)
    use = (res <= 10.0) & (res >= r.final_resolution)
    slope, intercept = np.polyfit(g.s2[use], g.ln_amplitude[use], 1)
    assert r.fit.slope == pytest.approx(slope) and r.fit.intercept == pytest.approx(intercept)
    assert r.bfactor == pytest.approx(4 * slope) and r.bfactor < 0
    # FSC weighting: sqrt(2F/(1+F)) of the corrected FSC per shell on the average of the halves
    avg = fourier.fft3_centered(0.5 * (case["h1"] + case["h2"]))
    weighted = pp.fsc_weighting(avg, r.fsc_corrected)
    np.testing.assert_allclose(pp.guinier_plot(weighted, PIX).ln_amplitude, g.ln_amplitude)
    f = np.clip(r.fsc_corrected, 0, None)
    shells = fourier.shell_index_3d(BOX)
    i = 10
    ratio = np.abs(weighted[shells == i]) / np.abs(avg[shells == i])
    np.testing.assert_allclose(ratio, np.sqrt(2 * f[i] / (1 + f[i])))
    # low-pass at the final resolution: nothing beyond one shell past it
    out = fourier.fft3_centered(r.sharpened)
    kz, ky, kx = fourier.half_volume_freqs(BOX)
    rad = np.sqrt(kx**2 + ky**2 + kz**2)
    assert r.low_pass_applied == pytest.approx(r.final_resolution)
    # float rounding (|out| up to 0.011): measured 1.8e-18
    assert np.abs(out[rad > r.resolution_shell + 1 + 1e-9]).max() < 1e-16
    np.testing.assert_allclose(r.sharpened_masked, r.sharpened * case["mask"])


def test_options_change_the_result_as_relion(case):
    h1, h2, mask = case["h1"], case["h2"], case["mask"]
    adhoc = pp.postprocess(h1, h2, mask, PIX, pp.PostprocessOptions(adhoc_bfac=-500.0,
                                                                    low_pass=0.0))
    assert adhoc.bfactor == -500.0 and adhoc.fit is None and adhoc.low_pass_applied == 0.0
    plain = pp.postprocess(h1, h2, mask, PIX, pp.PostprocessOptions(low_pass=0.0))
    assert plain.bfactor == 0.0
    ratio = (np.abs(fourier.fft3_centered(adhoc.sharpened))
             / np.maximum(np.abs(fourier.fft3_centered(plain.sharpened)), 1e-30))
    kz, ky, kx = fourier.half_volume_freqs(BOX)
    s2 = (kx**2 + ky**2 + kz**2) / (BOX * PIX) ** 2
    sel = (s2 > 0) & (s2 < (8 / (BOX * PIX)) ** 2)
    # measured 1.2e-14
    np.testing.assert_allclose(ratio[sel], np.exp(500.0 / 4 * s2[sel]), rtol=1e-12)
    with pytest.raises(pp.InputError, match="one of the two"):
        pp.postprocess(h1, h2, mask, PIX, pp.PostprocessOptions(auto_bfac=True, adhoc_bfac=-1))
    with pytest.raises(pp.InputError, match="never drops"):
        pp.postprocess(h1, h1, mask, PIX)


# --- CLI -------------------------------------------------------------------------------------

@pytest.fixture()
def job(tmp_path, case):
    write_map(tmp_path / "run_half1_class001_unfil.mrc", case["h1"], PIX)
    write_map(tmp_path / "run_half2_class001_unfil.mrc", case["h2"], PIX)
    write_map(tmp_path / "mask.mrc", case["mask"], PIX)
    return tmp_path


def test_cli_writes_all_outputs_with_relions_labels(job, case, capsys):
    out = job / "PostProcess" / "job001"
    rc = main(["postprocess", "--i", str(job / "run_half1_class001_unfil.mrc"),
               "--mask", str(job / "mask.mrc"), "--o", str(out), "--auto_bfac"])
    assert rc == 0
    assert sorted(p.name for p in out.iterdir()) == [
        "postprocess.mrc", "postprocess.star", "postprocess_fsc.png",
        "postprocess_guinier.png", "postprocess_masked.mrc"]
    for png in ("postprocess_fsc.png", "postprocess_guinier.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    sharp, pix = read_map(out / "postprocess.mrc")
    masked, pix2 = read_map(out / "postprocess_masked.mrc")
    assert pix == pytest.approx(PIX) and pix2 == pytest.approx(PIX)
    r = case["r"]
    # float32 files: measured 1.03e-6 of the maximum
    np.testing.assert_allclose(sharp, r.sharpened, atol=1e-5 * np.abs(r.sharpened).max())
    star = read_star(out / "postprocess.star")
    assert list(star) == ["general", "fsc", "guinier"]
    g = star["general"]
    assert list(g) == ["rlnFinalResolution", "rlnBfactorUsedForSharpening",
                       "rlnUnfilteredMapHalf1", "rlnUnfilteredMapHalf2", "rlnPostprocessedMap",
                       "rlnParticleBoxFractionSolventMask", "rlnMaskName", "rlnRandomiseFrom",
                       "rlnPostprocessedMapMasked", "rlnFittedSlopeGuinierPlot",
                       "rlnFittedInterceptGuinierPlot", "rlnCorrelationFitGuinierPlot"]
    assert g["rlnFinalResolution"] == pytest.approx(BOX * PIX / r.resolution_shell)
    assert g["rlnBfactorUsedForSharpening"] == pytest.approx(4 * g["rlnFittedSlopeGuinierPlot"])
    assert g["rlnUnfilteredMapHalf2"].endswith("run_half2_class001_unfil.mrc")  # half1->half2
    assert g["rlnRandomiseFrom"] == pytest.approx(BOX * PIX / r.randomise_shell)
    fsc = star["fsc"]
    assert list(fsc.columns) == [
        "rlnSpectralIndex", "rlnResolution", "rlnAngstromResolution",
        "rlnFourierShellCorrelationCorrected", "rlnFourierShellCorrelationParticleMaskFraction",
        "rlnFourierShellCorrelationUnmaskedMaps", "rlnFourierShellCorrelationMaskedMaps",
        "rlnCorrectedFourierShellCorrelationPhaseRandomizedMaskedMaps"]
    assert len(fsc) == BOX // 2 + 1
    np.testing.assert_allclose(fsc["rlnAngstromResolution"][1:],
                               BOX * PIX / np.arange(1, BOX // 2 + 1))
    assert fsc["rlnAngstromResolution"][0] == 999.0
    # the CLI read the half maps back as float32: equal to the in-memory run within 2e-5
    # (measured 1.24e-6)
    np.testing.assert_allclose(fsc["rlnFourierShellCorrelationCorrected"], r.fsc_corrected,
                               atol=2e-5)
    assert list(star["guinier"].columns) == [
        "rlnResolutionSquared", "rlnLogAmplitudesOriginal", "rlnLogAmplitudesWeighted",
        "rlnLogAmplitudesSharpened", "rlnLogAmplitudesIntercept"]
    assert "final resolution" in capsys.readouterr().out


def _bad_inputs(job):
    """(argv tail, expected text) pairs of bad inputs, after writing the bad files."""
    write_map(job / "other_half1.mrc", np.zeros((40, 40, 40)), PIX)
    write_map(job / "other_half2.mrc", np.zeros((40, 40, 40)), PIX)
    h1 = read_map(job / "run_half1_class001_unfil.mrc")[0]
    write_map(job / "pix_half1.mrc", h1, PIX)
    write_map(job / "pix_half2.mrc", h1, 2.0)
    write_map(job / "box_half1.mrc", h1, PIX)
    write_map(job / "box_half2.mrc", h1[:40, :40, :40], PIX)
    write_map(job / "lone_half1.mrc", h1, PIX)
    write_map(job / "small_mask.mrc", np.ones((40, 40, 40)), PIX)
    write_map(job / "bad_mask.mrc", 1.5 * read_map(job / "mask.mrc")[0], PIX)
    write_map(job / "nohalf.mrc", h1, PIX)
    good = str(job / "run_half1_class001_unfil.mrc")
    mask = str(job / "mask.mrc")
    return [
        (["--i", str(job / "box_half1.mrc"), "--mask", mask], "box_half2.mrc: box"),
        (["--i", str(job / "pix_half1.mrc"), "--mask", mask], "pix_half2.mrc: pixel size"),
        (["--i", good, "--mask", str(job / "small_mask.mrc")], "small_mask.mrc: mask box"),
        (["--i", good, "--mask", str(job / "bad_mask.mrc")], "bad_mask.mrc: mask values"),
        (["--i", str(job / "lone_half1.mrc"), "--mask", mask], "lone_half2.mrc: second half"),
        (["--i", str(job / "nohalf.mrc"), "--mask", mask], "neither 'half1' nor 'half2'"),
        (["--i", good, "--mask", mask, "--auto_bfac", "--adhoc_bfac", "-100"], "--adhoc_bfac"),
        (["--i", good, "--mask", mask, "--randomize_at_fsc", "1.5"], "--randomize_at_fsc"),
        (["--i", good, "--i2", str(job / "missing.mrc"), "--mask", mask], "missing.mrc"),
    ]


def test_cli_bad_input_one_line_exit_2_nothing_written(job, capsys):
    for tail, needle in _bad_inputs(job):
        before = sorted(p.name for p in job.iterdir())
        out = job / "PP"
        rc = main(["postprocess", "--o", str(out)] + tail)
        err = capsys.readouterr().err
        assert rc == 2, tail
        assert needle in err and err.count("\n") == 1 and "Traceback" not in err, err
        assert not out.exists()
        assert sorted(p.name for p in job.iterdir()) == before
