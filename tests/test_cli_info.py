"""`cryomap info`: summaries of STAR files, maps and stacks; bad input -> one line, exit 2."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cryomap.cli.main import main
from cryomap.io.mrc import write_map, write_stack
from cryomap.particles import make_optics_table, write_particles


@pytest.fixture
def particles_star(tmp_path):
    imgs = np.arange(3 * 8 * 8, dtype=np.float32).reshape(3, 8, 8)
    write_stack(tmp_path / "stack.mrcs", imgs, 1.5)
    parts = pd.DataFrame({
        "rlnImageName": ["000001@stack.mrcs", "000002@stack.mrcs", "000003@stack.mrcs"],
        "rlnOpticsGroup": [1, 1, 1],
        "rlnDefocusU": [10000.0, 15000.0, 20000.0],
        "rlnDefocusV": [9000.0, 14000.0, 19000.0],
        "rlnAngleRot": [-170.0, 0.0, 35.5],
        "rlnOriginXAngst": [-3.0, 0.0, 4.5],
        "rlnRandomSubset": [1, 2, 1],
    })
    path = tmp_path / "particles.star"
    write_particles(path, make_optics_table(1.5, 8, voltage=200), parts)
    return path


def test_info_particles(particles_star, capsys):
    assert main(["info", "--i", str(particles_star)]) == 0
    out = capsys.readouterr().out
    assert "data_optics: loop, 1 rows x 8 columns" in out
    assert "data_particles: loop, 3 rows x 7 columns" in out
    assert "particles: 3" in out
    assert "optics groups: 1" in out
    assert "pixel 1.5000 A, box 8, 200 kV" in out
    assert "rlnAngleRot: -170 .. 35.5" in out
    assert "rlnOriginXAngst: -3 .. 4.5" in out
    assert "rlnDefocusU: 10000 .. 20000" in out
    assert "rlnRandomSubset: 1: 2, 2: 1" in out
    assert "particle columns: rlnImageName rlnOpticsGroup" in out
    assert f"first particle 000001@stack.mrcs: stack found at {particles_star.parent}" in out
    assert "last particle 000003@stack.mrcs: stack found" in out


def test_info_particles_missing_stack(particles_star, capsys):
    (particles_star.parent / "stack.mrcs").unlink()
    assert main(["info", "--i", str(particles_star)]) == 0
    assert "STACK NOT FOUND" in capsys.readouterr().out


def test_info_list_star(tmp_path, capsys):
    path = tmp_path / "post.star"
    path.write_text("data_general\n\n_rlnFinalResolution 3.2\n_rlnMaskName \"m a.mrc\"\n\n")
    assert main(["info", "--i", str(path)]) == 0
    out = capsys.readouterr().out
    assert "data_general: list, 2 labels" in out
    assert "rlnFinalResolution = 3.2" in out
    assert "particles:" not in out


def test_info_map(tmp_path, capsys):
    vol = np.zeros((8, 8, 8), np.float32)
    vol[4, 4, 4] = 512.0
    write_map(tmp_path / "m.mrc", vol, 2.0)
    assert main(["info", "--i", str(tmp_path / "m.mrc")]) == 0
    out = capsys.readouterr().out
    assert "MRC map" in out
    assert "shape (z, y, x): (8, 8, 8)" in out
    assert "pixel size: 2.0000 A" in out
    assert "min 0, max 512, mean 1, std" in out


def test_info_stack(tmp_path, capsys):
    imgs = np.stack([np.full((4, 4), v, np.float32) for v in (1.0, 3.0)])
    write_stack(tmp_path / "s.mrcs", imgs, 1.25)
    assert main(["info", "--i", str(tmp_path / "s.mrcs")]) == 0
    out = capsys.readouterr().out
    assert "images: 2" in out
    assert "pixel size: 1.2500 A" in out
    assert "min 1, max 3, mean 2, std 1" in out


def _assert_one_line_error(capsys, pattern: str) -> None:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    assert err.count("\n") == 1, err
    assert err.startswith("cryomap info: error: ")
    assert pattern in err


@pytest.mark.parametrize("name, content, pattern", [
    ("missing.star", None, "missing.star: file not found"),
    ("junk.star", b"\x00\x01\x02 nothing here", "junk.star: not a STAR file"),
    ("junk.mrc", b"not an mrc" * 200, "junk.mrc: not a readable MRC file"),
    ("junk.mrcs", b"not an mrc" * 200, "junk.mrcs: not a readable MRC file"),
    ("notes.txt", b"hello", "notes.txt: unknown file type '.txt'"),
    ("noimg.star", b"data_particles\n\nloop_\n_rlnDefocusU #1\n1000\n\n",
     "noimg.star: data_particles has no rlnImageName"),
])
def test_info_bad_input(tmp_path, capsys, name, content, pattern):
    path = tmp_path / name
    if content is not None:
        path.write_bytes(content)
    assert main(["info", "--i", str(path)]) == 2
    _assert_one_line_error(capsys, pattern)


def test_info_bad_particle_file(tmp_path, capsys):
    path = tmp_path / "p.star"
    opt = make_optics_table(1.0, 8).drop(columns=["rlnImageSize"])
    write_particles(path, opt, pd.DataFrame({"rlnImageName": ["1@s.mrcs"]}))
    # info summarises what it can and says why a job would refuse the file
    assert main(["info", "--i", str(path)]) == 0
    out = capsys.readouterr().out
    assert "note: jobs would refuse this file: " in out
    assert "p.star: data_optics has no rlnImageSize column" in out
    assert "particles: 1" in out and "stacks: 1 named, 0 found, 1 missing" in out


def test_info_flags_stack_box_mismatch(tmp_path, capsys):
    # an optics table claiming 300 px for a 30 px stack
    write_stack(tmp_path / "s.mrcs", np.zeros((2, 30, 30), np.float32), 1.0)
    parts = pd.DataFrame({"rlnImageName": ["1@s.mrcs", "2@s.mrcs"]})
    write_particles(tmp_path / "p.star", make_optics_table(1.0, 300), parts)
    assert main(["info", "--i", str(tmp_path / "p.star")]) == 0
    out = capsys.readouterr().out
    assert "box 300" in out
    assert ("first particle 1@s.mrcs: stack found at " in out
            and "(2 images of 30 x 30 px); MISMATCH: rlnImageSize of optics group 1 is 300 px, "
                "the stack's images are 30 x 30 px" in out)


def test_info_angpix_for_files_without_pixel_size(tmp_path, capsys):
    write_stack(tmp_path / "s.mrcs", np.ones((2, 8, 8), np.float32), 1.0)
    opt = make_optics_table(1.0, 8).drop(columns=["rlnImagePixelSize"])
    write_particles(tmp_path / "p.star", opt, pd.DataFrame({"rlnImageName": ["1@s.mrcs"]}))
    assert main(["info", "--i", str(tmp_path / "p.star")]) == 0
    assert "no rlnImagePixelSize column" in capsys.readouterr().out
    assert main(["info", "--i", str(tmp_path / "p.star"), "--angpix", "1.7"]) == 0
    assert "pixel 1.7000 A, box 8" in capsys.readouterr().out
    assert main(["info", "--i", str(tmp_path / "p.star"), "--angpix", "0"]) == 2
    _assert_one_line_error(capsys, "--angpix = 0: expected a pixel size in 0.1..100 A")


def test_info_multi_image_mrc_without_pixel_size(tmp_path, capsys):
    import mrcfile

    path = tmp_path / "seven.mrc"
    with mrcfile.new(path) as m:
        m.set_data(np.arange(7 * 6 * 6, dtype=np.float32).reshape(7, 6, 6))
    assert main(["info", "--i", str(path)]) == 0
    out = capsys.readouterr().out
    assert "MRC stack" in out and "images: 7" in out
    assert "shape (n, y, x): (7, 6, 6), mode 2 (float32)" in out
    assert "pixel size: not set in header (give --angpix)" in out
    cube = tmp_path / "cube.mrc"
    with mrcfile.new(cube) as m:
        m.set_data(np.zeros((6, 6, 6), np.float32))
    assert main(["info", "--i", str(cube), "--angpix", "2"]) == 0
    out = capsys.readouterr().out
    assert "MRC map" in out and "pixel size: 2.0000 A (--angpix; header: not set)" in out
    assert "box size: 12.00 A" in out


def test_info_reports_an_unreadable_stack(particles_star, capsys):
    (particles_star.parent / "stack.mrcs").write_bytes(b"\0" * 500)
    assert main(["info", "--i", str(particles_star)]) == 0
    out = capsys.readouterr().out
    assert "first particle 000001@stack.mrcs: STACK UNREADABLE: " in out
    assert "500 bytes; an MRC header needs 1024" in out


def test_info_summarises_relion30_metadata_without_its_stacks(tmp_path, capsys, monkeypatch):
    # a RELION 3.0 refinement's data file whose images are elsewhere: no data_optics, so the
    # box can only come from the stacks; info summarises the metadata and names what is missing
    monkeypatch.chdir(tmp_path)
    write_stack(tmp_path / "here.mrcs", np.zeros((1, 8, 8), np.float32), 1.0)
    rows = ["1@Particles/mic1.mrcs 10000 9800 30 10 20 30 1.5 -2 1 1",
            "2@Particles/mic1.mrcs 12000 11800 35 40 50 60 0.5 2 2 2",
            "1@Particles/mic2.mrcs 15000 14800 40 70 80 90 -1 0 2 1",
            "1@here.mrcs 11000 10800 45 5 6 7 0 0 1 2"]
    labels = ["rlnImageName", "rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle", "rlnAngleRot",
              "rlnAngleTilt", "rlnAnglePsi", "rlnOriginX", "rlnOriginY", "rlnClassNumber",
              "rlnRandomSubset"]
    text = "\ndata_\n\nloop_\n" + "".join(f"_{lab} #{i + 1}\n" for i, lab in enumerate(labels))
    (tmp_path / "r30.star").write_text(text + "\n".join(rows) + "\n")
    assert main(["info", "--i", "r30.star"]) == 0
    out = capsys.readouterr().out
    assert "note: jobs would refuse this file: " in out and "no data_optics" in out
    assert "the metadata alone:" in out
    assert "particles: 4" in out
    assert "rlnDefocusU: 10000 .. 15000" in out
    assert "rlnAngleTilt: 6 .. 80" in out
    assert "rlnOriginX: -1 .. 1.5" in out
    assert "rlnClassNumber: 1: 2, 2: 2" in out
    assert "stacks: 3 named, 1 found, 2 missing" in out
    assert "missing: Particles/mic1.mrcs, Particles/mic2.mrcs" in out


def test_info_counts_missing_stacks_of_a_particle_file(particles_star, capsys):
    assert main(["info", "--i", str(particles_star)]) == 0
    assert "stacks: 1 named, 1 found, 0 missing" in capsys.readouterr().out
