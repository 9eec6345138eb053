"""Pins masks.make_mask / distance_transform (relion_mask_create's algorithm), the RELION
low-pass filter in fourier, and `cryomap mask`."""

from __future__ import annotations

import mrcfile
import numpy as np
import pytest
from scipy import ndimage

from cryomap import fourier
from cryomap.cli.main import main
from cryomap.errors import InputError
from cryomap.io.mrc import read_map, write_map
from cryomap.masks import check_mask, distance_transform, make_mask, solvent_flatten


def radius_grid(n: int) -> np.ndarray:
    c = np.arange(n) - n // 2
    z, y, x = np.meshgrid(c, c, c, indexing="ij")
    return np.sqrt(x * x + y * y + z * z)


# --- distance transform ----------------------------------------------------------------------

@pytest.mark.parametrize("shape", [(40, 40, 40), (17, 23, 31), (30, 30), (50,)])
def test_distance_transform_matches_scipy(shape):
    rng = np.random.default_rng(sum(shape))
    features = rng.uniform(size=shape) < 0.003
    features.flat[7] = True
    ref = ndimage.distance_transform_edt(~features)  # distance to the nearest zero of input
    # measured 0.0 here and below (square roots of the same whole numbers); 1e-12 for rounding
    np.testing.assert_allclose(distance_transform(features), ref, atol=1e-12)
    capped = distance_transform(features, 4.5)
    near = ref <= 4.5
    np.testing.assert_allclose(capped[near], ref[near], atol=1e-12)
    assert np.isinf(capped[~near]).all()


def test_distance_transform_of_a_blob_and_of_nothing():
    f = radius_grid(32) <= 6
    ref = ndimage.distance_transform_edt(~f)
    np.testing.assert_allclose(distance_transform(f, 8), np.where(ref <= 8, ref, np.inf))
    assert np.isinf(distance_transform(np.zeros((8, 8, 8), bool))).all()


# --- make_mask -------------------------------------------------------------------------------

def test_threshold_is_at_or_above_the_value():
    v = np.arange(27, dtype=float).reshape(3, 3, 3)
    m = make_mask(v, 13.0)
    np.testing.assert_array_equal(m, (v >= 13.0).astype(float))  # RELION: >= threshold


@pytest.mark.parametrize("r, extend", [(6.0, 3.0), (5.0, 4.5), (10.0, 5.0), (8.0, -3.0),
                                       (10.0, -4.5)])
def test_a_sphere_grown_by_e_has_radius_r_plus_e(r, extend):
    rad = radius_grid(40)
    m = make_mask(np.where(rad <= r, 1.0, 0.0), 0.5, extend=extend)
    assert set(np.unique(m)) <= {0.0, 1.0}
    # The radius of the sphere of the same volume is r + e within half a pixel (measured -0.47
    # for r 6, e 3: a voxel joins only if closer than e, RELION's strict test, and lattice
    # distances are often whole numbers) ...
    r_eq = (3 * m.sum() / (4 * np.pi)) ** (1 / 3)
    assert abs(r_eq - (r + extend)) <= 0.5
    # ... and the boundary lies within 0.8 px of it everywhere (measured: from r + e - 0.69
    # (r 6, e 3) to r + e + 0.20 (r 8, e -3); 15 % margin).
    assert (m[rad < r + extend - 0.8] == 1).all() and (m[rad > r + extend + 0.8] == 0).all()


def test_extension_is_exactly_distance_below_e():
    rng = np.random.default_rng(0)
    binary = rng.uniform(size=(24, 24, 24)) < 0.01
    d = ndimage.distance_transform_edt(~binary)
    m = make_mask(binary.astype(float), 0.5, extend=2.5)
    np.testing.assert_array_equal(m == 1, d < 2.5)  # RELION: r^2 < extend^2
    shrunk = make_mask((d < 5).astype(float), 0.5, extend=-2.0)
    d_out = ndimage.distance_transform_edt(d < 5)  # distance to the nearest outside voxel
    np.testing.assert_array_equal(shrunk == 1, (d < 5) & ~(d_out < 2.0))


@pytest.mark.parametrize("width", [3.0, 6.0, 7.5])
def test_soft_edge_is_a_raised_cosine_of_the_distance(width):
    rad = radius_grid(40)
    binary = rad <= 7
    m = make_mask(binary.astype(float), 0.5, soft_edge=width)
    d = ndimage.distance_transform_edt(~binary)
    expected = np.where(binary, 1.0, np.where(d < width, 0.5 + 0.5 * np.cos(np.pi * d / width),
                                              0.0))
    np.testing.assert_allclose(m, expected, atol=1e-12)  # measured 0.0; 1e-12 for rounding
    # shape: 1 on the mask, the cosine's value at a distance, 0 from `width` px on
    edge = ~binary & (d > 0) & (d < width)
    assert ((m[edge] > 0) & (m[edge] < 1)).all()
    assert (m[d >= width] == 0).all() and (m[binary] == 1).all()
    one = np.flatnonzero((d == 1.0).ravel())[0]
    assert m.ravel()[one] == pytest.approx(0.5 + 0.5 * np.cos(np.pi / width))


def test_lowpass_before_thresholding():
    n, pix = 32, 2.0
    rng = np.random.default_rng(1)
    v = np.where(radius_grid(n) <= 8, 1.0, 0.0) + rng.normal(scale=0.3, size=(n, n, n))
    noisy = make_mask(v, 0.5)
    smooth = make_mask(v, 0.5, lowpass=12.0, pixel_size=pix)
    lp = fourier.lowpass_map(v, 12.0, pix)
    np.testing.assert_array_equal(smooth, (lp >= 0.5).astype(float))
    # the filtered mask is one compact blob; the unfiltered one has noise speckles outside
    # measured 1171 unfiltered blobs; 15 % margin
    assert ndimage.label(smooth)[1] == 1 and ndimage.label(noisy)[1] > 1000
    with pytest.raises(ValueError, match="pixel_size"):
        make_mask(v, 0.5, lowpass=12.0)
    with pytest.raises(ValueError, match="soft_edge"):
        make_mask(v, 0.5, soft_edge=-1.0)


def test_lowpass_weights_are_relions_raised_cosine():
    n = 32
    w = fourier.lowpass_weights(n, 10, edge_width=2)
    kz, ky, kx = fourier.half_volume_freqs(n)
    r = np.sqrt(kx**2 + ky**2 + kz**2)
    np.testing.assert_array_equal(w[r <= 9], 1.0)
    np.testing.assert_array_equal(w[r >= 11], 0.0)
    edge = (r > 9) & (r < 11)
    np.testing.assert_allclose(w[edge], 0.5 + 0.5 * np.cos(np.pi * (r[edge] - 9) / 2))
    assert w[(kx == 10) & (ky == 0) & (kz == 0)][0] == pytest.approx(0.5)


def test_solvent_mask_check_and_flattening():
    rad = radius_grid(16)
    mask = make_mask((rad <= 4).astype(float), 0.5, soft_edge=3)
    check_mask(mask, (16, 16, 16), "mask.mrc")
    v = np.random.default_rng(0).normal(size=(16, 16, 16))
    flat = solvent_flatten(v, mask)
    np.testing.assert_array_equal(flat, v * mask)  # RELION: reference x mask, solvent -> 0
    assert (flat[mask == 0] == 0).all() and (flat[mask == 1] == v[mask == 1]).all()
    for bad, needle in ((mask[:8], "mask box"), (mask * 1.1, "mask values"),
                        (mask - 0.5, "mask values"), (mask * 0.3, "reaches 0.5")):
        with pytest.raises(InputError, match=needle) as e:
            check_mask(bad, (16, 16, 16), "mask.mrc")
        assert str(e.value).startswith("mask.mrc: ") and "\n" not in str(e.value)


# --- CLI -------------------------------------------------------------------------------------

def _write_blob(path, n=32, pix=2.5, r=7.0):
    vol = np.exp(-0.5 * (radius_grid(n) / r) ** 2)
    write_map(path, vol, pix)
    return vol


def test_cli_writes_the_mask_with_the_pixel_size(tmp_path, capsys):
    src = tmp_path / "map.mrc"
    vol = _write_blob(src)
    out = tmp_path / "mask.mrc"
    rc = main(["mask", "--i", str(src), "--o", str(out), "--ini_threshold", "0.5",
               "--extend_inimask", "2", "--width_soft_edge", "4"])
    assert rc == 0
    mask, pix = read_map(out)
    assert pix == pytest.approx(2.5)
    with mrcfile.open(out) as m:
        assert m.data.dtype == np.float32 and m.header.mode == 2
    # float32 file: measured 2.4e-8 (float32 rounds values <= 1 by at most 3e-8)
    np.testing.assert_allclose(mask, make_mask(vol, 0.5, 2.0, 4.0), atol=1e-7)
    assert mask.min() == 0.0 and mask.max() == 1.0
    assert "wrote" in capsys.readouterr().out
    # --angpix overrides the header
    out2 = tmp_path / "mask2.mrc"
    assert main(["mask", "--i", str(src), "--o", str(out2), "--ini_threshold", "0.5",
                 "--angpix", "1.25", "--lowpass", "10"]) == 0
    assert read_map(out2)[1] == pytest.approx(1.25)


@pytest.mark.parametrize("args, needle", [
    (["--i", "{d}/missing.mrc"], "missing.mrc: file not found"),
    (["--ini_threshold", "5"], "empty mask"),
    (["--width_soft_edge", "-2"], "--width_soft_edge -2"),
    (["--extend_inimask", "-20", "--ini_threshold", "0.5"], "half the box"),
    (["--lowpass", "3"], "--lowpass 3"),
    (["--o", "{d}/no/such/folder/mask.mrc"], "does not exist"),
])
def test_cli_bad_input_one_line_exit_2_nothing_written(tmp_path, capsys, args, needle):
    src = tmp_path / "map.mrc"
    _write_blob(src)
    argv = ["mask", "--i", str(src), "--o", str(tmp_path / "mask.mrc")]
    for a in args:
        a = a.format(d=tmp_path)
        argv.append(a)
    # later options win in argparse: the bad value replaces the good one
    rc = main(argv)
    err = capsys.readouterr().err
    assert rc == 2
    assert needle in err and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "mask.mrc").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["map.mrc"]
