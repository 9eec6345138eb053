"""Pins cryomap.locres (local FSC, relion_postprocess --locres) on half maps whose local
resolution is known by construction, and `cryomap locres` (docs/locres.md)."""

from __future__ import annotations

import contextlib
import io
import re

import numpy as np
import pytest

from cryomap import locres
from cryomap.cli.main import main
from cryomap.io.mrc import read_map, write_map
from cryomap.postprocess import randomise_phases

N, PIX = 96, 2.0
D_FINE, D_COARSE = 6.0, 12.0  # Å: the known local resolutions of the two halves of the box
SNR0 = 60.0  # signal-to-noise power ratio at low frequency
SSNR_AT_THRESHOLD = 0.143 / (1 - 0.143)  # a half-map FSC = SSNR / (1 + SSNR) is 0.143 here


def s2_grid(n: int, pix: float) -> np.ndarray:
    """|s|^2 (1/Å^2) on numpy's rfftn grid."""
    f, fr = np.fft.fftfreq(n, d=pix), np.fft.rfftfreq(n, d=pix)
    return f[:, None, None] ** 2 + f[None, :, None] ** 2 + fr[None, None, :] ** 2


def shell_grid(n: int) -> np.ndarray:
    """round(|k|) (halves up) on numpy's rfftn grid."""
    f, fr = np.fft.fftfreq(n) * n, np.fft.rfftfreq(n) * n
    r = np.sqrt(f[:, None, None] ** 2 + f[None, :, None] ** 2 + fr[None, None, :] ** 2)
    return np.floor(r + 0.5).astype(int)


def soft_ball(n: int, centre, radius: float, edge: float) -> np.ndarray:
    """1 within radius of centre (z, y, x), raised cosine to 0 at radius + edge."""
    z, y, x = np.meshgrid(*[np.arange(n)] * 3, indexing="ij")
    r = np.sqrt((z - centre[0]) ** 2 + (y - centre[1]) ** 2 + (x - centre[2]) ** 2)
    return 0.5 + 0.5 * np.cos(np.pi * np.clip((r - radius) / edge, 0.0, 1.0))


def known_halves(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Two half maps = truth + independent white noise (power 1/SNR0 of the signal's at s=0).
    The truth is one white random field with a Gaussian envelope exp(-B s^2/4): B_fine for
    x < centre, B_coarse beyond (tanh blend over ~4 px). The local SSNR is SNR0 exp(-B s^2/2),
    so each half's local FSC crosses 0.143 exactly at its D (B = 2 D^2 ln(SNR0 / SSNR_0.143))."""
    rng = np.random.default_rng(seed)
    ft = np.fft.rfftn(rng.standard_normal((N,) * 3))
    s2 = s2_grid(N, PIX)

    def region(d: float) -> np.ndarray:
        b = 2 * d * d * np.log(SNR0 / SSNR_AT_THRESHOLD)
        return np.fft.irfftn(ft * np.exp(-b * s2 / 4), s=(N,) * 3, axes=(0, 1, 2))

    t = 0.5 + 0.5 * np.tanh((np.arange(N) - N // 2) / 2.0)
    truth = (1 - t) * region(D_FINE) + t * region(D_COARSE)
    sigma = np.sqrt(1.0 / SNR0)
    return (truth + sigma * rng.standard_normal(truth.shape),
            truth + sigma * rng.standard_normal(truth.shape))


def slab_mask() -> np.ndarray:
    """1 for |z - centre| <= 5 px, raised cosine to 0 at 11 px: windows in three planes
    (z = centre and centre +- 13 px, whose cells reach the voxels >= 0.5), a local
    resolution wherever the mask is > 0."""
    dz = np.abs(np.arange(N) - N // 2).astype(float)
    prof = 0.5 + 0.5 * np.cos(np.pi * np.clip((dz - 5.0) / 6.0, 0.0, 1.0))
    return np.broadcast_to(prof[:, None, None], (N,) * 3).copy()


@pytest.fixture(scope="module")
def job(tmp_path_factory):
    d = tmp_path_factory.mktemp("locres")
    h1, h2 = known_halves()
    write_map(d / "run_half1_class001_unfil.mrc", h1, PIX)
    write_map(d / "run_half2_class001_unfil.mrc", h2, PIX)
    write_map(d / "mask.mrc", slab_mask(), PIX)
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = main(["locres", "--half1", str(d / "run_half1_class001_unfil.mrc"),
                   "--half2", str(d / "run_half2_class001_unfil.mrc"), "--mask",
                   str(d / "mask.mrc"), "--o", str(d / "Locres"), "--j", "2"])
    assert rc == 0
    return {"dir": d, "out": d / "Locres", "stdout": out.getvalue(), "h1": h1, "h2": h2}


def test_recovers_the_known_local_resolution_of_each_region(job):
    loc, pix = read_map(job["out"] / "relion_locres.mrc")
    assert pix == pytest.approx(PIX) and loc.shape == (N,) * 3
    x = np.arange(N)[None, None, :] - N // 2
    inside = slab_mask() >= 0.5
    for d, region in ((D_FINE, x <= -20), (D_COARSE, x >= 20)):  # > one window from x = 0
        median = float(np.median(loc[inside & region & (loc > 0)]))
        shell = d * d / (N * PIX)  # one Fourier shell in Å at d
        # measured (this seed): 5.87 A (-0.70 shell) and 11.96 A (-0.05 shell); seeds 0-7 all
        # within 0.78 shell; margin 1.3x
        assert abs(median - d) <= shell, (d, median, shell)
    assert np.all(loc[slab_mask() == 0] == 0)  # no estimate outside the mask
    # every voxel in the mask within 40 px of the box's z axis is reached by a window (the
    # corners lie beyond RELION's sphere of centres, more than 1.5 steps from any)
    y, x = np.meshgrid(np.arange(N) - N // 2, np.arange(N) - N // 2, indexing="ij")
    assert np.all(loc[(slab_mask() > 0) & (np.hypot(y, x) <= 40)[None]] > 0)


def test_filtered_map_keeps_detail_only_where_resolved(job):
    """Power in the 10-7 Å band (finer than the coarse half's 12 Å, coarser than the fine
    half's 6 Å) of the filtered map relative to the plain average, in a small soft ball in
    each region: kept in the fine region, removed in the coarse one."""
    fil, _ = read_map(job["out"] / "relion_locres_filtered.mrc")
    avg = 0.5 * (job["h1"] + job["h2"])
    s2 = s2_grid(N, PIX)
    band = (s2 >= 1 / 10**2) & (s2 <= 1 / 7**2)

    def band_power(m: np.ndarray, centre) -> float:
        return float(np.sum(np.abs(np.fft.rfftn(m * soft_ball(N, centre, 6, 4))[band]) ** 2))

    o = N // 2
    fine = band_power(fil, (o, o, o - 20)) / band_power(avg, (o, o, o - 20))
    coarse = band_power(fil, (o, o, o + 20)) / band_power(avg, (o, o, o + 20))
    assert fine > 0.8  # measured 0.99; margin 1.2x
    # measured 0.06 (the small ball's spectrum spreads the power below 12 A into the band);
    # margin 3x
    assert coarse < 0.2


def test_cli_prints_the_histogram_and_writes_the_sections(job):
    text = job["stdout"]
    counts = [int(c) for c in re.findall(r"A: (\d+)", text.split("histogram:")[1])]
    loc, _ = read_map(job["out"] / "relion_locres.mrc")
    inside = slab_mask() >= 0.5
    assert sum(counts) == int(np.count_nonzero(inside & (loc > 0)))
    missed = int(np.count_nonzero(inside & (loc == 0)))  # the slab's corners
    assert missed > 0 and f"warning: {missed} voxels with mask >= 0.5" in text
    assert "median" in text and "windows" in text
    png = job["out"] / "locres_sections.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_local_fsc_is_the_fsc_of_the_windowed_maps():
    """Each window's curves equal a plain NumPy FSC of the maps times the soft window, and
    the corrected curve is RELION's (FSC_m - FSC_r)/(1 - FSC_r) from randomise shell + 2."""
    n, pix = 24, 3.0
    rng = np.random.default_rng(3)
    h1 = rng.standard_normal((n,) * 3)
    h2 = 0.7 * h1 + rng.standard_normal((n,) * 3)
    lf = locres.local_fsc(h1, h2, pix, 3.0, 6, edge_px=4.0, randomize_at=20.0, seed=5)
    rshell = int(n * pix / 20.0)
    assert lf.randomise_shell == rshell
    r1, r2 = randomise_phases(h1, rshell, seed=5), randomise_phases(h2, rshell, seed=6)
    shells = shell_grid(n)
    keep = shells <= n // 2

    def plain_fsc(a, b):
        fa, fb = np.fft.rfftn(a), np.fft.rfftn(b)
        num = np.bincount(shells[keep], np.real(fa * np.conj(fb))[keep])
        den = np.sqrt(np.bincount(shells[keep], np.abs(fa[keep]) ** 2)
                      * np.bincount(shells[keep], np.abs(fb[keep]) ** 2))
        return num / den

    assert len(lf.centres) > 4
    for k, c in enumerate(lf.centres):
        w = soft_ball(n, c, 3.0, 4.0)
        m, r = plain_fsc(h1 * w, h2 * w), plain_fsc(r1 * w, r2 * w)
        # measured 4e-15; margin 2500x
        np.testing.assert_allclose(lf.fsc_masked[k][1:], m[1:], atol=1e-11)
        np.testing.assert_allclose(lf.fsc_random[k][1:], r[1:], atol=1e-11)
        far = np.arange(m.size) >= rshell + 2
        with np.errstate(divide="ignore", invalid="ignore"):  # shells < rshell + 2: r = 1
            want = np.where(far, (m - r) / (1 - r), m)
        np.testing.assert_allclose(lf.fsc[k][1:], want[1:], atol=1e-9)  # measured 1e-14


def test_compact_local_fsc_samples_the_windowed_patch_more_coarsely():
    """compact=True: each window's curves are the plain FSC of the windowed patch (the
    smallest cube holding the window) transformed at the cube's even size m, linearly
    interpolated in frequency to the box's shells (box shell j is m-shell j m / N; shell 0
    is 1 when negative, as in `resolution.fsc`)."""
    n, pix, radius, edge = 32, 3.0, 3.0, 4.0
    rng = np.random.default_rng(4)
    h1 = rng.standard_normal((n,) * 3)
    h2 = 0.6 * h1 + rng.standard_normal((n,) * 3)
    lf = locres.local_fsc(h1, h2, pix, radius, 6, edge_px=edge, randomize_at=20.0, seed=5,
                          compact=True)
    half = int(np.ceil(radius + edge)) + 1
    m = 2 * half + 2  # the patch is 2 half + 1 wide; m is even
    shells = shell_grid(m)
    keep = shells <= m // 2
    assert len(lf.centres) > 4 and m < n
    for k, c in enumerate(lf.centres):
        w = soft_ball(n, c, radius, edge)
        lo = np.asarray(c) - half
        a, b = np.zeros((m,) * 3), np.zeros((m,) * 3)
        for dst, src in ((a, h1 * w), (b, h2 * w)):  # the patch, origin at lo, 0 off the box
            z, y, x = np.nonzero(w > 0)
            dst[z - lo[0], y - lo[1], x - lo[2]] = src[z, y, x]
        fa, fb = np.fft.rfftn(a), np.fft.rfftn(b)
        num = np.bincount(shells[keep], np.real(fa * np.conj(fb))[keep])
        den = np.sqrt(np.bincount(shells[keep], np.abs(fa[keep]) ** 2)
                      * np.bincount(shells[keep], np.abs(fb[keep]) ** 2))
        curve = num / den
        curve[0] = curve[0] if curve[0] > 0 else 1.0  # `resolution.fsc`'s shell 0
        want = np.interp(np.arange(n // 2 + 1) * m / n, np.arange(m // 2 + 1), curve)
        # measured 3e-16; margin 3e4x
        np.testing.assert_allclose(lf.fsc_masked[k][1:], want[1:], atol=1e-11)


def test_compact_local_fsc_recovers_each_region():
    """The compact transform (non-uniform refinement's) finds each region's known local
    resolution within one shell, as the box-sized one does."""
    h1, h2 = known_halves()
    lf = locres.local_fsc(h1, h2, PIX, 5.0, 13, mask=slab_mask(), threads=2, compact=True)
    loc = locres.local_resolution(lf, mask=slab_mask())
    x = np.arange(N)[None, None, :] - N // 2
    inside = slab_mask() >= 0.5
    for d, region in ((D_FINE, x <= -20), (D_COARSE, x >= 20)):
        median = float(np.median(loc[inside & region & (loc > 0)]))
        shell = d * d / (N * PIX)
        # measured (this seed): 5.88 A (-0.66 shell) and 11.73 A (-0.35 shell); seeds 0-7
        # all within 0.75 shell (the box-sized transform's: 0.78); margin 1.3x
        assert abs(median - d) <= shell, (d, median, shell)


def test_samples_at_one_voxel_blend_as_separate_samples():
    """interpolate_samples merges samples that share a voxel (a point group's copies); the
    result is the plain sum over every sample of its value times RELION's window."""
    n, step = 30, 5
    rng = np.random.default_rng(2)
    centres = rng.integers(0, n, size=(40, 3))
    centres = np.concatenate([centres, centres[:15], centres[:5]])
    values = rng.uniform(0.02, 0.2, len(centres))
    mean, weight = locres.interpolate_samples(centres, values, n, step)
    num, den = np.zeros((n,) * 3), np.zeros((n,) * 3)
    for c, v in zip(centres, values, strict=True):
        w = soft_ball(n, c, 0.5 * step, float(step))
        num += v * w
        den += w
    np.testing.assert_allclose(weight, den, atol=1e-12)  # measured 2e-15; margin 500x
    np.testing.assert_allclose(mean[den > 0], (num / np.where(den > 0, den, 1))[den > 0],
                               atol=1e-12)  # measured 1e-16


def test_sample_points_follow_relions_sphere_and_the_mask():
    n, step, radius = 40, 7, 5.0
    o = n // 2
    axis = np.arange(o % step, n, step)
    grid = np.stack(np.meshgrid(axis, axis, axis, indexing="ij"), -1).reshape(-1, 3)
    # RELION's sphere: centres closer to the box centre than N/2 - window radius
    sphere = {tuple(p) for p in grid[np.sqrt(((grid - o) ** 2).sum(1)) < n / 2 - radius]}
    assert {tuple(p) for p in locres.sample_points(n, step, radius)} == sphere
    # with a mask: also the grid point nearest (per axis) to some voxel >= 0.5
    mask = soft_ball(n, (14, 22, 25), 6.0, 3.0)
    vox = np.argwhere(mask >= 0.5)
    nearest = axis[np.abs(vox[:, :, None] - axis[None, None, :]).argmin(axis=2)]
    got = {tuple(p) for p in locres.sample_points(n, step, radius, mask)}
    assert got == sphere & set(map(tuple, nearest)) and len(got) >= 8


def test_filter_to_local_resolution_blends_whole_shell_low_passes():
    """Constant local resolution N pix / 8.25: 0.75 of the map low-passed at shell 8 plus
    0.25 at shell 9, each RELION's raised cosine (1 to s - 1, 0 from s + 1); 0 where the local
    resolution is 0."""
    n, pix = 32, 2.0
    v = np.random.default_rng(1).standard_normal((n,) * 3)
    r = np.sqrt(s2_grid(n, 1.0)) * n  # |k| in shells

    def lowpass(s):
        w = 0.5 + 0.5 * np.cos(np.pi * np.clip((r - (s - 1)) / 2.0, 0.0, 1.0))
        return np.fft.irfftn(np.fft.rfftn(v) * w, s=(n,) * 3, axes=(0, 1, 2))

    loc = np.full((n,) * 3, n * pix / 8.25)
    loc[:4] = 0.0
    got = locres.filter_to_local_resolution(v, loc, pix)
    want = 0.75 * lowpass(8) + 0.25 * lowpass(9)
    np.testing.assert_allclose(got[4:], want[4:], atol=1e-10)  # measured 2e-15
    assert np.all(got[:4] == 0)
    # single precision (non-uniform refinement's), on threads: float32 rounding
    fast = locres.filter_to_local_resolution(v, loc, pix, threads=2, single=True)
    scale = float(np.abs(want).max())
    np.testing.assert_allclose(fast[4:], want[4:], atol=2e-6 * scale)  # measured 1.1e-7; 18x
    assert np.all(fast[:4] == 0)


@pytest.fixture
def small(tmp_path):
    n, pix = 24, 2.0
    rng = np.random.default_rng(0)
    h = rng.standard_normal((n,) * 3)
    write_map(tmp_path / "h1.mrc", h, pix)
    write_map(tmp_path / "h2.mrc", h + rng.standard_normal(h.shape), pix)
    write_map(tmp_path / "box.mrc", h[:20, :20, :20], pix)
    write_map(tmp_path / "pix.mrc", h, 2.5)
    write_map(tmp_path / "mask_box.mrc", np.ones((20, 20, 20)), pix)
    write_map(tmp_path / "mask_values.mrc", np.full((n,) * 3, 1.5), pix)
    write_map(tmp_path / "mask.mrc", np.ones((n,) * 3), pix)
    corner = np.zeros((n,) * 3)
    corner[:2, :2, :2] = 1.0
    write_map(tmp_path / "mask_corner.mrc", corner, pix)
    return tmp_path


BAD = [
    (["--half2", "box.mrc"], "box (20, 20, 20) differs"),
    (["--half2", "pix.mrc"], "pixel size"),
    (["--mask", "mask_box.mrc"], "mask box"),
    (["--mask", "mask_values.mrc"], "mask values"),
    (["--mask", "mask_corner.mrc", "--locres_sampling", "6"], "no voxel >= 0.5 near a window"),
    (["--locres_sampling", "0"], "--locres_sampling"),
    (["--locres_sampling", "-5"], "--locres_sampling"),
    (["--locres_window", "0"], "--locres_window"),
    (["--locres_window", "24"], "not smaller than the box"),
    (["--locres_edgwidth", "-1"], "--locres_edgwidth"),
    (["--fsc_threshold", "0"], "--fsc_threshold"),
    (["--fsc_threshold", "1"], "--fsc_threshold"),
    (["--locres_randomize_at", "1"], "--locres_randomize_at"),
    (["--locres_minres", "0"], "--locres_minres"),
    (["--j", "0"], "--j"),
]


@pytest.mark.parametrize("tail, needle", BAD, ids=[" ".join(t) for t, _ in BAD])
def test_bad_input_one_line_exit_2_nothing_written(small, capsys, tail, needle):
    args = {"--half1": "h1.mrc", "--half2": "h2.mrc", "--mask": "mask.mrc"}
    extra = []
    for key, value in zip(tail[::2], tail[1::2], strict=True):
        if key in args:
            args[key] = value
        else:
            extra += [key, value]
    argv = ["locres", "--o", str(small / "out")]
    for key, value in args.items():
        argv += [key, str(small / value)]
    before = sorted(p.name for p in small.iterdir())
    rc = main(argv + extra)
    err = capsys.readouterr().err
    assert rc == 2
    assert err.startswith("cryomap locres: error:") and needle in err, err
    assert err.count("\n") == 1 and "Traceback" not in err
    assert not (small / "out").exists()
    assert sorted(p.name for p in small.iterdir()) == before
