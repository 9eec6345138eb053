"""`cryomap symmetry_expand` (relion_particle_symmetry_expand): each copy's pose is A·R_k
(checked with an Euler matrix built here from RELION's definition), and the expanded set
reconstructed without symmetry gives the map the original set gives with --sym."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cryomap import symmetry
from cryomap.cli.main import main
from cryomap.euler import matrix_to_euler
from cryomap.io.mrc import read_map
from cryomap.io.star import read_star, write_star
from cryomap.phantom import make_phantom
from cryomap.resolution import fsc_maps
from cryomap.simulate import simulate_particles, write_simulation

BOX, PIX, N = 32, 6.0, 40


def _euler(rot: np.ndarray, tilt: np.ndarray, psi: np.ndarray) -> np.ndarray:
    """RELION's A = (Rz(rot) Ry(tilt) Rz(psi))^T with active right-handed rotations
    (euler.cpp: Euler_angles2matrix), (n, 3, 3)."""
    def rz(a):
        c, s, o, z = np.cos(a), np.sin(a), np.ones_like(a), np.zeros_like(a)
        return np.stack([np.stack([c, -s, z], -1), np.stack([s, c, z], -1),
                         np.stack([z, z, o], -1)], -2)

    def ry(a):
        c, s, o, z = np.cos(a), np.sin(a), np.ones_like(a), np.zeros_like(a)
        return np.stack([np.stack([c, z, s], -1), np.stack([z, o, z], -1),
                         np.stack([-s, z, c], -1)], -2)

    r, t, p = (np.deg2rad(np.asarray(x, float)) for x in (rot, tilt, psi))
    return np.swapaxes(rz(r) @ ry(t) @ rz(p), -1, -2)


@pytest.fixture(scope="module")
def sim(tmp_path_factory) -> Path:
    """A D2-symmetric phantom's particles at their true poses, alternating half sets, and a
    label cryomap does not know."""
    out = tmp_path_factory.mktemp("expand")
    truth = symmetry.symmetrize_volume(make_phantom(BOX, PIX), "D2")
    write_simulation(out, *simulate_particles(truth.astype(np.float32), PIX, N, snr=1.0,
                                              seed=5, max_shift_px=1.0), pixel_size=PIX)
    blocks = read_star(out / "truth.star")
    blocks["particles"]["rlnRandomSubset"] = np.arange(N) % 2 + 1
    blocks["particles"]["rlnMyUnknownLabel"] = [f"tag{i}" for i in range(N)]
    write_star(out / "poses.star", blocks)
    return out


@pytest.mark.parametrize("sym", ["D2", "O"])  # O: operators that are not their own inverse
def test_copies_are_the_poses_times_each_operator(sim, tmp_path, sym):
    out = tmp_path / "expanded.star"
    assert main(["symmetry_expand", "--i", str(sim / "poses.star"), "--o", str(out),
                 "--sym", sym]) == 0
    src, got = read_star(sim / "poses.star"), read_star(out)
    ops = symmetry.operators(sym)
    k = len(ops)
    p, e = src["particles"], got["particles"]
    assert len(e) == N * k
    pd.testing.assert_frame_equal(got["optics"], src["optics"])
    # every column but the angles is the original row's, copies of a particle together
    same = e.drop(columns=["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"])
    expect = p.drop(columns=["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]).iloc[
        np.repeat(np.arange(N), k)].reset_index(drop=True)
    pd.testing.assert_frame_equal(same, expect)
    # the first copy is the row as it was
    pd.testing.assert_frame_equal(e.iloc[::k].reset_index(drop=True), p)
    a = _euler(p["rlnAngleRot"], p["rlnAngleTilt"], p["rlnAnglePsi"])
    copies = _euler(e["rlnAngleRot"], e["rlnAngleTilt"], e["rlnAnglePsi"]).reshape(N, k, 3, 3)
    expected = np.einsum("nij,kjl->nkil", a, ops)
    # angles written with 12 digits: measured 1.4e-11 (O), 1.2e-11 (D2); margin 700x
    np.testing.assert_allclose(copies, expected, atol=1e-8)
    gaps = np.linalg.norm(copies[:, :, None] - copies[:, None, :], axis=(-2, -1))
    off = ~np.eye(k, dtype=bool)
    # distinct: poses theta apart differ by 2 sqrt(2) sin(theta / 2) (Frobenius); the closest
    # operators are 90° apart in O (2.0, measured 2.0) and 180° in D2 (2.83); margin 4x
    assert gaps[:, off].min() > 0.5


def _reconstruct(star: Path, out: Path, sym: str) -> np.ndarray:
    assert main(["reconstruct", "--i", str(star), "--o", str(out), "--ctf", "--sym", sym,
                 "--j", "2"]) == 0
    return read_map(out)[0].astype(np.float64)


def test_expanded_set_without_symmetry_gives_the_symmetric_map(sim, tmp_path):
    """relion_reconstruct --sym D2 of the particles = --sym C1 of their expansion; the
    control: the same poses with the operators applied on the other side (R·A) do not."""
    expanded = sim / "expanded_d2.star"  # beside the stack its image names point to
    assert main(["symmetry_expand", "--i", str(sim / "poses.star"), "--o", str(expanded),
                 "--sym", "D2"]) == 0
    d2 = _reconstruct(sim / "poses.star", tmp_path / "d2.mrc", "D2")
    c1 = _reconstruct(expanded, tmp_path / "c1.mrc", "C1")
    blocks = read_star(expanded)
    p = blocks["particles"]
    a = _euler(p["rlnAngleRot"], p["rlnAngleTilt"], p["rlnAnglePsi"]).reshape(N, 4, 3, 3)[:, 0]
    wrong = np.einsum("kij,njl->nkil", symmetry.operators("D2"), a).reshape(-1, 3, 3)
    p["rlnAngleRot"], p["rlnAngleTilt"], p["rlnAnglePsi"] = matrix_to_euler(wrong)
    write_star(sim / "left_d2.star", blocks)
    left = _reconstruct(sim / "left_d2.star", tmp_path / "left.mrc", "C1")
    same, control = fsc_maps(c1, d2)[1:BOX // 2], fsc_maps(left, d2)[1:BOX // 2]
    print(f"\nFSC of the expanded C1 map with the D2 map: min {same.min():.4f}; with R·A "
          f"poses: min {control.min():.3f}")
    # measured 0.985 at the highest shell (--sym interpolates the symmetrised sums on the
    # grid, the copies are back-projected directly); margin 0.035
    assert same.min() > 0.95
    assert control.min() < 0.6  # measured 0.146; margin 4x


def test_bad_input_is_one_line_and_writes_nothing(sim, tmp_path, capsys):
    poses = str(sim / "poses.star")
    blocks = read_star(sim / "poses.star")
    blocks["particles"] = blocks["particles"].drop(columns="rlnAngleTilt")
    write_star(tmp_path / "no_tilt.star", blocks)
    (tmp_path / "a_file").write_text("x")
    out = str(tmp_path / "out" / "e.star")
    cases = [
        (["--i", poses, "--o", out, "--sym", "D7h"], ["--sym", "D7h", "mirror"]),
        (["--i", poses, "--o", out, "--sym", "X3"], ["--sym", "X3", "unknown symmetry"]),
        (["--i", poses, "--o", out, "--sym", "C1"], ["--sym C1", "nothing to expand"]),
        (["--i", str(tmp_path / "no_tilt.star"), "--o", out, "--sym", "D2"],
         ["no_tilt.star", "rlnAngleTilt"]),
        (["--i", poses, "--o", str(tmp_path / "a_file" / "e.star"), "--sym", "D2"],
         ["--o", "a_file", "not a folder"]),
        (["--i", str(tmp_path / "missing.star"), "--o", out, "--sym", "D2"],
         ["missing.star", "not found"]),
    ]
    for argv, words in cases:
        before = {p: p.stat().st_mtime_ns for p in [*tmp_path.rglob("*"), *sim.rglob("*")]}
        capsys.readouterr()
        assert main(["symmetry_expand", *argv]) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        assert err.startswith("cryomap symmetry_expand: error: "), err
        for word in words:
            assert word in err, (word, err)
        after = {p: p.stat().st_mtime_ns for p in [*tmp_path.rglob("*"), *sim.rglob("*")]}
        assert after == before, argv  # nothing written, --o's folder not made
