"""`cryomap phantom`, `cryomap simulate` and `cryomap project` end to end."""

from __future__ import annotations

import mrcfile
import numpy as np
import pandas as pd
import pytest

from cryomap.cli.main import main
from cryomap.io.mrc import read_map
from cryomap.io.star import read_star, write_star
from cryomap.particles import load_particles
from cryomap.simulate import project_images


@pytest.fixture(scope="module")
def clean_sim(tmp_path_factory):
    """A noise-free simulation with the built-in phantom (20 particles, 32 px, 6 A)."""
    out = tmp_path_factory.mktemp("cli") / "sim"
    rc = main(["simulate", "--o", str(out), "--n", "20", "--box", "32", "--angpix", "6",
               "--snr", "0", "--seed", "4"])
    assert rc == 0
    return out


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


def test_phantom_command(tmp_path, capsys):
    out = tmp_path / "ph.mrc"
    assert main(["phantom", "--o", str(out), "--box", "40", "--angpix", "4.8", "--seed",
                 "2"]) == 0
    vol, pix = read_map(out)
    assert vol.shape == (40, 40, 40) and pix == pytest.approx(4.8)
    assert vol.max() == pytest.approx(1.0) and vol.min() >= 0
    assert str(out) in capsys.readouterr().out


def test_simulate_writes_consistent_files(tmp_path, capsys):
    out = tmp_path / "s"
    assert main(["simulate", "--o", str(out), "--n", "20", "--box", "32", "--angpix",
                 "6"]) == 0
    printed = capsys.readouterr().out
    for name in ("particles.mrcs", "particles.star", "truth.star", "truth_map.mrc"):
        assert (out / name).is_file()
        assert name in printed
    with mrcfile.open(out / "particles.mrcs") as m:
        assert m.data.shape == (20, 32, 32)
        assert m.voxel_size.x == pytest.approx(6.0)
    parts, truth = read_star(out / "particles.star"), read_star(out / "truth.star")
    assert len(parts["particles"]) == 20 and len(truth["particles"]) == 20
    assert list(truth["particles"].rlnImageName) == list(parts["particles"].rlnImageName)
    assert "rlnAngleRot" in truth["particles"] and "rlnAngleRot" not in parts["particles"]
    assert parts["optics"].rlnImageSize[0] == 32
    ps = load_particles(out / "particles.star")
    assert ps.read_images([19]).shape == (1, 32, 32)


def test_project_reproduces_the_simulation(clean_sim, tmp_path, capsys):
    out = tmp_path / "proj.mrcs"
    assert main(["project", "--i", str(clean_sim / "truth_map.mrc"), "--ang",
                 str(clean_sim / "truth.star"), "--o", str(out), "--ctf"]) == 0
    with mrcfile.open(out) as m:
        proj = m.data.copy()
    with mrcfile.open(clean_sim / "particles.mrcs") as m:
        sim = m.data.copy()
    assert proj.shape == (20, 32, 32)  # one image per STAR row
    # the noise-free simulation is exactly these projections at the true poses (measured
    # 5.1e-11 of the maximum; 1e-6: a few float32 steps at the maximum)
    assert np.abs(proj - sim).max() < 1e-6 * np.abs(sim).max()
    # and the same as calling project_images directly with the STAR file's parameters
    truth = load_particles(clean_sim / "truth.star")
    vol, pix = read_map(clean_sim / "truth_map.mrc")
    direct = project_images(vol, truth.angles(), truth.origins_px(), truth.ctf_params(), pix)
    assert np.array_equal(proj, direct)
    # STAR file next to the stack: the input rows, images pointing into the stack by its
    # path from the working folder (absolute here: the output is outside it)
    star = load_particles(tmp_path / "proj.star")
    assert star.n_particles == 20
    assert star.particles.rlnImageName[0] == f"000001@{(tmp_path / 'proj.mrcs').resolve()}"
    assert np.allclose(star.angles(), truth.angles())
    assert np.array_equal(star.read_images(np.arange(20)), proj)


def test_project_ctf_option_changes_images(clean_sim, tmp_path):
    args = ["project", "--i", str(clean_sim / "truth_map.mrc"), "--ang",
            str(clean_sim / "truth.star")]
    assert main(args + ["--o", str(tmp_path / "a")]) == 0  # a root name, as relion_project
    assert (tmp_path / "a.star").is_file()
    assert main(args + ["--o", str(tmp_path / "b.mrcs"), "--ctf"]) == 0
    assert main(args + ["--o", str(tmp_path / "c.mrcs"), "--ctf", "--add-noise", "--snr",
                        "0.5", "--seed", "1"]) == 0
    a, b, c = (mrcfile.read(tmp_path / f"{k}.mrcs") for k in "abc")
    assert np.linalg.norm(a - b) > 0.7 * np.linalg.norm(a)  # measured 0.795; 12 % margin
    # CTF(0) = +Q0 = 0.1: image integrals scale by 0.1 (float32: measured 2.4e-7)
    assert np.allclose(b.sum(axis=(1, 2)), 0.1 * a.sum(axis=(1, 2)), rtol=1e-5)
    noise = c.astype(np.float64) - b
    # measured 0.5064 (rel 0.0127); 15 % margin
    assert np.mean(np.var(b, axis=(1, 2))) / noise.var() == pytest.approx(0.5, rel=0.015)


def test_project_plain_pose_list_without_optics(tmp_path):
    """A RELION 3.0-style loop with angles only (no origins, no optics) is accepted."""
    vol = np.zeros((24, 24, 24), np.float32)
    vol[12, 12, 12:16] = 1.0
    from cryomap.io.mrc import write_map

    write_map(tmp_path / "m.mrc", vol, 2.0)
    poses = pd.DataFrame({"rlnAngleRot": [0.0, 30.0, 60.0], "rlnAngleTilt": [0.0, 90.0, 45.0],
                          "rlnAnglePsi": [0.0, 0.0, 10.0]})
    write_star(tmp_path / "poses.star", {"": poses})
    assert main(["project", "--i", str(tmp_path / "m.mrc"), "--ang",
                 str(tmp_path / "poses.star"), "--o", str(tmp_path / "p.mrcs")]) == 0
    ps = load_particles(tmp_path / "p.star")
    assert ps.n_particles == 3 and ps.pixel_size == 2.0 and ps.box == 24
    imgs = ps.read_images([0, 1, 2])
    # measured 0.0; 1e-6: a few float32 steps at the maximum (2.0)
    assert np.allclose(imgs, project_images(vol, poses.to_numpy()), atol=1e-6)


def test_project_missing_angle_column(clean_sim, tmp_path, capsys):
    bad = tmp_path / "noangles.star"
    blocks = read_star(clean_sim / "truth.star")
    blocks["particles"] = blocks["particles"].drop(columns=["rlnAngleRot"])
    write_star(bad, blocks)
    rc = main(["project", "--i", str(clean_sim / "truth_map.mrc"), "--ang", str(bad), "--o",
               str(tmp_path / "x.mrcs")])
    assert rc == 2
    line = _error_line(capsys)
    assert str(bad) in line and "rlnAngleRot" in line
    assert not (tmp_path / "x.mrcs").exists()


def test_project_pixel_size_mismatch(clean_sim, tmp_path, capsys):
    from cryomap.io.mrc import write_map

    vol, _ = read_map(clean_sim / "truth_map.mrc")
    write_map(tmp_path / "m.mrc", vol, 6.01)
    rc = main(["project", "--i", str(tmp_path / "m.mrc"), "--ang",
               str(clean_sim / "truth.star"), "--o", str(tmp_path / "x.mrcs")])
    assert rc == 2
    line = _error_line(capsys)
    assert "rlnImagePixelSize" in line and "truth.star" in line
    # within 0.001 A is accepted
    write_map(tmp_path / "m2.mrc", vol, 6.0005)
    assert main(["project", "--i", str(tmp_path / "m2.mrc"), "--ang",
                 str(clean_sim / "truth.star"), "--o", str(tmp_path / "y.mrcs")]) == 0


def test_project_non_cubic_map(clean_sim, tmp_path, capsys):
    path = tmp_path / "flat.mrc"
    with mrcfile.new(path) as m:
        m.set_data(np.zeros((16, 32, 32), np.float32))
        m.voxel_size = 6.0
    rc = main(["project", "--i", str(path), "--ang", str(clean_sim / "truth.star"), "--o",
               str(tmp_path / "x.mrcs")])
    assert rc == 2
    assert str(path) in _error_line(capsys)


def test_simulate_bad_map_box(clean_sim, tmp_path, capsys):
    rc = main(["simulate", "--i", str(clean_sim / "truth_map.mrc"), "--o", str(tmp_path / "s"),
               "--n", "5", "--box", "64"])
    assert rc == 2
    assert "--box 64" in _error_line(capsys)


def test_project_angpix_serves_a_map_without_pixel_size(clean_sim, tmp_path):
    vol, _ = read_map(clean_sim / "truth_map.mrc")
    path = tmp_path / "nopix.mrc"
    with mrcfile.new(path) as m:
        m.set_data(vol)  # cell 0: no pixel size in the header
    args = ["project", "--i", str(path), "--ang", str(clean_sim / "truth.star")]
    assert main(args + ["--o", str(tmp_path / "a.mrcs")]) == 2
    assert main(args + ["--o", str(tmp_path / "b.mrcs"), "--angpix", "6"]) == 0
    with mrcfile.open(tmp_path / "b.mrcs") as m:
        assert m.voxel_size.x == pytest.approx(6.0)


@pytest.mark.parametrize("block, label, value, pattern", [
    ("optics", "rlnVoltage", 0.0, r"data_optics, row 1: rlnVoltage = 0; expected \[10, 3000\]"),
    ("optics", "rlnVoltage", -200.0, r"rlnVoltage = -200"),
    ("particles", "rlnDefocusU", -1000.0, r"data_particles, row 1: rlnDefocusU = -1000; "
                                          r"expected > 0 A"),
    ("particles", "rlnAngleTilt", "tilt", r"data_particles, row 1: rlnAngleTilt = 'tilt' is "
                                          r"not a number"),
])
def test_project_bad_values_write_nothing(clean_sim, tmp_path, capsys, block, label, value,
                                          pattern):
    blocks = read_star(clean_sim / "truth.star")
    blocks[block] = blocks[block].astype({label: object})
    blocks[block].loc[0, label] = value
    bad = tmp_path / "bad.star"
    write_star(bad, blocks)
    rc = main(["project", "--i", str(clean_sim / "truth_map.mrc"), "--ang", str(bad), "--o",
               str(tmp_path / "x.mrcs"), "--ctf"])
    assert rc == 2
    line = _error_line(capsys)
    assert str(bad) in line
    assert __import__("re").search(pattern, line), line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["bad.star"]


@pytest.mark.parametrize("n", [64, 65])
def test_project_places_the_map_centre_where_relion_project_does(tmp_path, n):
    # A compact blob at voxel floor(N/2): relion_project puts it at pixel (ceil(N/2),
    # ceil(N/2)) (inverse FFT, then CenterFFT(img, false)); for even N that is floor(N/2).
    c = np.arange(n) - n // 2
    z, y, x = np.meshgrid(c, c, c, indexing="ij")
    vol = np.exp(-(x * x + y * y + z * z) / (2 * 1.5**2)).astype(np.float32)
    from cryomap.io.mrc import write_map

    write_map(tmp_path / "dot.mrc", vol, 2.0)
    write_star(tmp_path / "pose.star", {"": pd.DataFrame(
        {"rlnAngleRot": [0.0, 40.0], "rlnAngleTilt": [0.0, 70.0], "rlnAnglePsi": [0.0, 15.0],
         "rlnOriginXAngst": [0.0, 2.0 * 3], "rlnOriginYAngst": [0.0, -2.0 * 2]})})
    assert main(["project", "--i", str(tmp_path / "dot.mrc"), "--ang",
                 str(tmp_path / "pose.star"), "--o", str(tmp_path / "p.mrcs")]) == 0
    img = mrcfile.read(tmp_path / "p.mrcs")
    centre = n - n // 2
    assert np.unravel_index(np.argmax(img[0]), img[0].shape) == (centre, centre)
    # an origin (ox, oy) = (3, -2) px moves the particle to (centre - ox, centre - oy)
    assert np.unravel_index(np.argmax(img[1]), img[1].shape) == (centre + 2, centre - 3)
    # the simulator keeps cryomap's reading convention (floor(N/2)); same images for even N
    sim = project_images(vol, [[0.0, 0.0, 0.0]])
    assert np.unravel_index(np.argmax(sim[0]), sim[0].shape) == (n // 2, n // 2)
    np.testing.assert_array_equal(
        img[:1], project_images(vol, [[0.0, 0.0, 0.0]], image_origin="relion_project"))
    assert np.array_equal(img[0], sim[0]) == (n % 2 == 0)


def test_simulate_bad_microscope_options_write_nothing(tmp_path, capsys):
    for opt, value, pattern in (("--voltage", "0", "--voltage 0: expected [10, 3000] kV"),
                                ("--cs", "nan", "--cs nan: expected [-100, 100] mm"),
                                ("--Q0", "1", "--Q0 1: expected [0, 1) (a fraction)"),
                                ("--angpix", "1e-32", "--angpix = 1e-32: expected a pixel "
                                                      "size in 0.1..100 A")):
        rc = main(["simulate", "--o", str(tmp_path / "s"), "--n", "3", "--box", "16", opt,
                   value])
        assert rc == 2
        assert pattern in _error_line(capsys)
    assert not (tmp_path / "s").exists()
