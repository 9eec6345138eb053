"""`cryomap reconstruct` (relion_reconstruct on the refinement's path): the same maps as
`em.reconstruct.reconstruct_known_poses`, the truth recovered as far as the half-set FSC
says, --sym and --subset, and bad input refused with one line before anything is written."""

from __future__ import annotations

import re
from pathlib import Path

import numpy as np
import pytest

from cryomap import symmetry
from cryomap.cli.main import main
from cryomap.em.data import ImageSource
from cryomap.em.reconstruct import reconstruct_known_poses
from cryomap.em.refine import RefineOptions, mask_radius_px
from cryomap.io.mrc import read_map
from cryomap.io.star import read_star, write_star
from cryomap.particles import load_particles
from cryomap.phantom import make_phantom
from cryomap.resolution import fsc_maps, resolution_angstrom
from cryomap.simulate import simulate_particles, write_simulation

BOX, PIX, N = 32, 6.0, 240


@pytest.fixture(scope="module")
def sim(tmp_path_factory) -> tuple[Path, np.ndarray]:
    """A C4-symmetric phantom's particles with their true poses and alternating half-sets."""
    out = tmp_path_factory.mktemp("reconstruct")
    truth = symmetry.symmetrize_volume(make_phantom(BOX, PIX), "C4")
    images, optics, particles, truth_df = simulate_particles(
        truth.astype(np.float32), PIX, N, snr=0.3, seed=4, max_shift_px=2.0)
    write_simulation(out, images, optics, particles, truth_df, pixel_size=PIX)
    blocks = read_star(out / "truth.star")
    blocks["particles"]["rlnRandomSubset"] = np.arange(N) % 2 + 1
    write_star(out / "poses.star", blocks)
    return out, truth


def _run(*args: str) -> int:
    return main(["reconstruct", *args, "--j", "2"])


def _resolution(volume: np.ndarray, truth: np.ndarray, threshold: float = 0.5) -> float:
    return resolution_angstrom(fsc_maps(np.asarray(volume, np.float64), truth), BOX, PIX, threshold,
                          interpolate=True)


def test_maps_are_reconstruct_known_poses_and_recover_the_truth(sim, tmp_path, capsys):
    out, truth = sim
    assert _run("--i", str(out / "poses.star"), "--o", str(tmp_path / "rec.mrc"), "--ctf") == 0
    logged = re.search(r"half-set FSC 0.143 at ([0-9.]+) Å", capsys.readouterr().out)
    assert logged is not None
    maps = [read_map(tmp_path / name)[0] for name in ("rec.mrc", "rec_half1.mrc",
                                                      "rec_half2.mrc")]
    # the logged resolution is the FSC 0.143 of the written half maps (to the log's 0.01 Å:
    # rounding by 0.005 at most, 0.001 for the float; measured 0.0: 24.00 Å both)
    written = resolution_angstrom(fsc_maps(maps[1], maps[2]), BOX, PIX)
    assert float(logged.group(1)) == pytest.approx(written, abs=0.006)
    assert read_map(tmp_path / "rec.mrc")[1] == pytest.approx(PIX)
    particles = load_particles(out / "poses.star")
    options = RefineOptions(use_ctf=True)
    source = ImageSource(particles, mask_radius_px(options, BOX, PIX), options.mask_edge)
    state = reconstruct_known_poses(source, particles.angles(), particles.origins_px(),
                                    np.arange(N) % 2 + 1, options)
    particles.close()
    # float32 files: measured 3.6e-8 of the maximum
    for got, expect in zip(maps, state.final_maps, strict=True):
        np.testing.assert_allclose(got, expect, atol=1e-6 * np.abs(expect).max())
    # the combined map's FSC against the truth reaches 0.5 where the half-set FSC reaches
    # 0.143 (sqrt(2F / (1 + F)) = 0.5 at F = 0.143), within a shell or so
    r_truth = _resolution(maps[0], truth)
    r_halves = resolution_angstrom(state.fsc, BOX, PIX, 0.143, interpolate=True)
    shuffled = _resolution(maps[0], truth[::-1])  # negative control: a mirrored truth
    print(f"\nreconstruct: {r_truth:.2f} Å vs truth (FSC 0.5), half-set FSC 0.143 at "
          f"{r_halves:.2f} Å; against the mirrored truth {shuffled:.1f} Å")
    assert abs(r_truth / r_halves - 1.0) < 0.06  # measured 23.18 / 23.67 Å: 0.021
    assert shuffled > 1.5 * r_truth  # measured 43.6 Å: 1.88x


def test_symmetry_and_maxres(sim, tmp_path):
    out, truth = sim
    star = str(out / "poses.star")
    assert _run("--i", star, "--o", str(tmp_path / "c1.mrc"), "--ctf") == 0
    assert _run("--i", star, "--o", str(tmp_path / "c4.mrc"), "--ctf", "--sym", "c4") == 0
    assert _run("--i", star, "--o", str(tmp_path / "low.mrc"), "--ctf", "--maxres", "40") == 0
    c1, c4, low = (read_map(tmp_path / f"{n}.mrc")[0].astype(np.float64)
                   for n in ("c1", "c4", "low"))
    errors = [max(np.abs(symmetry.rotate_volume(v, r) - v).max()
                  for r in symmetry.operators("C4")[1:]) / np.abs(v).max() for v in (c1, c4)]
    r_c1, r_c4 = _resolution(c1, truth), _resolution(c4, truth)
    print(f"\nreconstruct C4 {r_c4:.2f} Å, C1 {r_c1:.2f} Å; symmetry error {errors[1]:.1e} "
          f"(C1 {errors[0]:.1e})")
    # float32 maps: measured 1.5e-7 with C4; C1's map 0.037 (13 % margin)
    assert errors[1] <= 1e-6 and errors[0] > 0.032
    assert r_c4 < r_c1  # four times the data (measured 22.07 against 23.18 Å)
    # --maxres 40 Å uses shells up to ceil(N pix / 40) = 5 only: the map's FSC against the
    # truth ends there, where the full map's goes on
    edge = BOX * PIX / (np.ceil(BOX * PIX / 40.0) + 1.5)
    r_low = _resolution(low, truth)
    print(f"--maxres 40: {r_low:.2f} Å vs truth (without: {r_c1:.2f} Å)")
    assert r_c1 < edge < r_low  # measured 23.18 < 29.54 < 36.70 Å


def test_subset_uses_only_its_particles(sim, tmp_path, capsys):
    """--subset 1 reads only rlnRandomSubset 1: scrambling the poses of subset 2 changes
    nothing; only --o is written."""
    out, truth = sim
    blocks = read_star(out / "poses.star")
    df = blocks["particles"]
    two = df["rlnRandomSubset"].to_numpy() == 2
    df.loc[two, "rlnAnglePsi"] = np.random.default_rng(0).uniform(-180, 180, two.sum())
    write_star(out / "scrambled.star", blocks)
    a, b = tmp_path / "a" / "half1.mrc", tmp_path / "b" / "half1.mrc"
    a.parent.mkdir(), b.parent.mkdir()
    assert _run("--i", str(out / "poses.star"), "--o", str(a), "--ctf", "--subset", "1") == 0
    assert f"subset 1 ({N // 2} particles" in capsys.readouterr().out
    assert _run("--i", str(out / "scrambled.star"), "--o", str(b), "--ctf", "--subset", "1") == 0
    np.testing.assert_array_equal(read_map(a)[0], read_map(b)[0])
    assert sorted(p.name for p in a.parent.iterdir()) == ["half1.mrc"]
    # half the particles: a worse map than from all of them, but a map of the molecule
    assert _run("--i", str(out / "poses.star"), "--o", str(tmp_path / "all.mrc"), "--ctf") == 0
    r_sub = _resolution(read_map(a)[0], truth)
    r_all = _resolution(read_map(tmp_path / "all.mrc")[0], truth)
    print(f"\n--subset 1: {r_sub:.2f} Å vs truth, all particles {r_all:.2f} Å")
    assert r_all < r_sub < 1.15 * r_all  # measured 24.43 / 23.18 Å: 1.054


@pytest.mark.parametrize("star, extra, words", [
    ("particles.star", [], ["particles.star", "rlnAngleRot"]),
    ("poses.star", ["--subset", "3"], ["--subset 3", "1 or 2"]),
    ("truth.star", ["--subset", "1"], ["rlnRandomSubset"]),
    ("one_half.star", ["--subset", "2"], ["rlnRandomSubset 2", "non-empty"]),
    ("poses.star", ["--sym", "C3h"], ["--sym", "mirror"]),
    ("poses.star", ["--maxres", "5"], ["--maxres 5", "Nyquist"]),
    ("poses.star", ["--maxres", "-1"], ["--maxres -1"]),
    ("noctf.star", ["--ctf"], ["noctf.star", "rlnDefocusU"]),
    ("poses.star", ["--j", "0"], ["--j 0"]),
])
def test_bad_input_writes_nothing(sim, tmp_path, capsys, star, extra, words):
    out, _ = sim
    blocks = read_star(out / "poses.star")
    if star == "one_half.star":
        blocks["particles"]["rlnRandomSubset"] = 1
        write_star(out / star, blocks)
    if star == "noctf.star":
        blocks["particles"] = blocks["particles"].drop(
            columns=["rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle"])
        write_star(out / star, blocks)
    target = tmp_path / "map.mrc"
    code = main(["reconstruct", "--i", str(out / star), "--o", str(target)] + extra)
    err = capsys.readouterr().err.strip()
    assert code == 2 and "Traceback" not in err and len(err.splitlines()) == 1, err
    assert all(w in err for w in words), err
    assert list(tmp_path.iterdir()) == []


def test_output_folder_must_exist(sim, tmp_path, capsys):
    out, _ = sim
    code = _run("--i", str(out / "poses.star"), "--o", str(tmp_path / "no" / "map.mrc"))
    assert code == 2 and "does not exist" in capsys.readouterr().err


def test_classes_write_one_map_per_class(sim, tmp_path, capsys):
    # --classes: each class's maps are those of a plain reconstruction of its rows alone
    # (a pandas filter of the STAR file); a class of one particle gets no map, and says so
    out, _ = sim
    blocks = read_star(out / "poses.star")
    classes = np.where(np.arange(N) < 150, 1, 2)
    classes[7] = 3
    blocks["particles"]["rlnClassNumber"] = classes
    write_star(out / "classes.star", blocks)  # next to the stack it names
    assert _run("--i", str(out / "classes.star"), "--o", str(tmp_path / "rec.mrc"),
                "--ctf", "--classes") == 0
    log = capsys.readouterr().out
    assert "class 1: 149 particles" in log and "class 2: 90 particles" in log
    assert "no map for class(es) 3 (fewer than two particles)" in log
    assert not (tmp_path / "rec.mrc").exists() and not (tmp_path / "rec_class003.mrc").exists()
    for k in (1, 2):
        one = {**blocks, "particles": blocks["particles"][classes == k]}
        write_star(out / f"only{k}.star", one)
        assert _run("--i", str(out / f"only{k}.star"), "--o",
                    str(tmp_path / f"only{k}.mrc"), "--ctf") == 0
        for suffix in ("", "_half1", "_half2"):
            got = read_map(tmp_path / f"rec_class{k:03d}{suffix}.mrc")[0]
            expect = read_map(tmp_path / f"only{k}{suffix}.mrc")[0]
            # the same computation on the same rows: measured 0.0
            np.testing.assert_allclose(got, expect, rtol=0, atol=1e-6 * np.abs(expect).max())


@pytest.mark.parametrize("extra, column, words", [
    (["--classes"], None, ["no rlnClassNumber column", "--classes"]),
    (["--classes", "--subset", "1"], 1, ["--classes with --subset"]),
    (["--classes"], 0, ["rlnClassNumber of particle 1 is 0", "expected a class number >= 1"]),
])
def test_classes_bad_input_writes_nothing(sim, tmp_path, capsys, extra, column, words):
    out, _ = sim
    blocks = read_star(out / "poses.star")
    if column is None:
        blocks["particles"] = blocks["particles"].drop(columns="rlnClassNumber")
    else:
        blocks["particles"]["rlnClassNumber"] = column
    star = out / f"bad_{tmp_path.name}.star"  # next to the stack it names
    write_star(star, blocks)
    (tmp_path / "o").mkdir()
    code = main(["reconstruct", "--i", str(star), "--o", str(tmp_path / "o" / "m.mrc")] + extra)
    err = capsys.readouterr().err.strip()
    assert code == 2 and "Traceback" not in err and len(err.splitlines()) == 1, err
    assert all(w in err for w in words), err
    assert list((tmp_path / "o").iterdir()) == []
