"""cryomap.particles: RELION 3.1 / 3.0 particle files, image resolution, CTF, origins, errors."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

from cryomap.ctf import CtfParams
from cryomap.errors import InputError
from cryomap.halves import random_subsets
from cryomap.io.mrc import write_stack
from cryomap.io.star import read_star
from cryomap.particles import (
    ParticleSet,
    load_particles,
    make_optics_table,
    write_particles,
)

BOX = 8


def relion_block(name: str, labels: list[str], rows: list[list]) -> str:
    """One loop block as RELION writes it (`# version 30001`, `_rlnX #i` labels)."""
    out = ["", "# version 30001", "", f"data_{name}", "", "loop_ "]
    out += [f"_{label} #{i} " for i, label in enumerate(labels, 1)]
    out += [" ".join(f"{v!s:>12}" for v in row) + " " for row in rows]
    out += [" ", ""]
    return "\n".join(out)


OPTICS_LABELS = ["rlnOpticsGroupName", "rlnOpticsGroup", "rlnVoltage", "rlnSphericalAberration",
                 "rlnAmplitudeContrast", "rlnImagePixelSize", "rlnImageSize",
                 "rlnImageDimensionality"]
# Two groups, same pixel size and box, different microscope settings.
OPTICS_ROWS = [["opticsGroup1", 1, "300.000000", "2.700000", "0.100000", "1.250000", BOX, 2],
               ["opticsGroup2", 2, "200.000000", "0.010000", "0.070000", "1.250000", BOX, 2]]
PARTICLE_LABELS = ["rlnImageName", "rlnMicrographName", "rlnOpticsGroup", "rlnDefocusU",
                   "rlnDefocusV", "rlnDefocusAngle", "rlnPhaseShift", "rlnAngleRot",
                   "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst",
                   "rlnFooBar"]
PARTICLE_ROWS = [
    ["000001@Extract/a.mrcs", "mic1.mrc", 1, "10000.0", "9000.0", "10.0", "0.0", "10.0",
     "20.0", "30.0", "2.500000", "-1.250000", "7"],
    ["000003@Extract/a.mrcs", "mic1.mrc", 2, "11000.0", "10500.0", "20.0", "90.0", "-10.0",
     "90.0", "180.0", "0.000000", "3.750000", "8"],
    ["000002@Extract/b.mrcs", "mic2.mrc", 1, "12000.0", "11900.0", "30.0", "0.0", "0.0",
     "45.0", "-90.0", "-5.000000", "0.625000", "9"],
    ["000001@Extract/b.mrcs", "mic2.mrc", 2, "13000.0", "12000.0", "40.0", "45.0", "5.0",
     "135.0", "0.0", "1.250000", "0.000000", "10"],
]


def _stack_images(seed: int, n: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, BOX, BOX)).astype(np.float32)


@pytest.fixture
def project(tmp_path):
    """A small project: Extract/a.mrcs (3 images), Extract/b.mrcs (2), particles.star."""
    (tmp_path / "Extract").mkdir()
    a, b = _stack_images(1, 3), _stack_images(2, 2)
    write_stack(tmp_path / "Extract" / "a.mrcs", a, 1.25)
    write_stack(tmp_path / "Extract" / "b.mrcs", b, 1.25)
    star = tmp_path / "particles.star"
    star.write_text(relion_block("optics", OPTICS_LABELS, OPTICS_ROWS)
                    + relion_block("particles", PARTICLE_LABELS, PARTICLE_ROWS))
    # images of the 4 particles, in table order
    expected = np.stack([a[0], a[2], b[1], b[0]])
    return star, expected


def test_load_relion31(project, tmp_path, monkeypatch):
    star, expected = project
    monkeypatch.chdir(tmp_path.parent)  # paths resolve from the STAR folder, not the cwd
    ps = load_particles(star)
    assert ps.n_particles == 4
    assert ps.box == BOX
    assert ps.pixel_size == pytest.approx(1.25)
    assert ps.optics_group_index().tolist() == [0, 1, 0, 1]
    assert list(ps.particles.columns) == PARTICLE_LABELS  # unknown rlnFooBar kept
    assert ps.has_ctf
    np.testing.assert_array_equal(ps.read_images([0, 1, 2, 3]), expected)
    ps.close()


def test_read_images_subset_in_requested_order(project):
    star, expected = project
    with load_particles(star) as ps:
        got = ps.read_images([3, 0, 2, 0])
        assert got.dtype == np.float32 and got.shape == (4, BOX, BOX)
        np.testing.assert_array_equal(got, expected[[3, 0, 2, 0]])
        assert ps.read_images([]).shape == (0, BOX, BOX)
        assert len(ps._stacks) == 2  # each stack opened once, then cached


def test_stack_cache_is_bounded(project):
    star, expected = project
    ps = load_particles(star)
    ps.max_open_stacks = 1
    for _ in range(2):
        np.testing.assert_array_equal(ps.read_images([2, 1, 3, 0]), expected[[2, 1, 3, 0]])
        assert len(ps._stacks) == 1
    ps.close()
    assert len(ps._stacks) == 0


def test_stacks_relative_to_working_folder_as_relion(project, tmp_path, monkeypatch):
    # RELION job outputs sit in Refine3D/jobNNN/ with paths relative to the project folder,
    # which is RELION's working folder.
    star, expected = project
    job = tmp_path / "Refine3D" / "job010"
    job.mkdir(parents=True)
    (job / "run_data.star").write_text(star.read_text())
    monkeypatch.chdir(tmp_path)
    with load_particles(job / "run_data.star") as ps:
        np.testing.assert_array_equal(ps.read_images([2]), expected[[2]])
        assert ps.image_paths([0]) == [tmp_path / "Extract" / "a.mrcs"]


def test_stacks_never_searched_in_other_ancestor_folders(project, tmp_path, monkeypatch):
    # Outside the project folder, the STAR file's parents are not searched (a same-named
    # stack elsewhere must not be picked up silently).
    star, _ = project
    job = tmp_path / "Refine3D" / "job010"
    job.mkdir(parents=True)
    (job / "run_data.star").write_text(star.read_text())
    monkeypatch.chdir(job)
    with load_particles(job / "run_data.star") as ps:
        assert ps.image_paths([0]) == [None]
        with pytest.raises(InputError, match=r"stack Extract/a\.mrcs not found \(looked for "
                                             r".*job010/Extract/a\.mrcs"):
            ps.read_images([0])


def test_ambiguous_stack_is_an_error(project, tmp_path, monkeypatch):
    star, expected = project
    other = tmp_path / "elsewhere"
    (other / "Extract").mkdir(parents=True)
    write_stack(other / "Extract" / "a.mrcs", _stack_images(9, 3), 1.25)
    monkeypatch.chdir(other)
    with pytest.raises(InputError, match=r"stack Extract/a\.mrcs is ambiguous: .*elsewhere/"
                                         r"Extract/a\.mrcs and .*Extract/a\.mrcs"):
        load_particles(star).read_images([0])
    # the same file reached both ways is not ambiguous
    monkeypatch.chdir(tmp_path)
    np.testing.assert_array_equal(load_particles(star).read_images([0]), expected[[0]])


def test_ctf_params_per_optics_group(project):
    star, _ = project
    ps = load_particles(star)
    ctf = ps.ctf_params()
    assert isinstance(ctf, CtfParams) and len(ctf) == 4
    np.testing.assert_allclose(ctf.voltage, [300, 200, 300, 200])
    np.testing.assert_allclose(ctf.cs, [2.7, 0.01, 2.7, 0.01])
    np.testing.assert_allclose(ctf.amplitude_contrast, [0.1, 0.07, 0.1, 0.07])
    np.testing.assert_allclose(ctf.defocus_u, [10000, 11000, 12000, 13000])
    np.testing.assert_allclose(ctf.defocus_v, [9000, 10500, 11900, 12000])
    np.testing.assert_allclose(ctf.defocus_angle, [10, 20, 30, 40])
    np.testing.assert_allclose(ctf.phase_shift, [0, 90, 0, 45])
    np.testing.assert_allclose(ctf.bfactor, 0.0)  # absent -> defaults
    np.testing.assert_allclose(ctf.scale, 1.0)
    sub = ps.ctf_params([3, 0])
    np.testing.assert_allclose(sub.voltage, [200, 300])
    np.testing.assert_allclose(sub.defocus_u, [13000, 10000])


def test_ctf_optional_columns(project):
    star, _ = project
    ps = load_particles(star)
    ps.particles["rlnCtfBfactor"] = [10.0, 20.0, 30.0, 40.0]
    ps.particles["rlnCtfScalefactor"] = [1.0, 0.5, 0.25, 2.0]
    ctf = ps.ctf_params([1, 2])
    np.testing.assert_allclose(ctf.bfactor, [20, 30])
    np.testing.assert_allclose(ctf.scale, [0.5, 0.25])


def test_origins_and_angles(project):
    star, _ = project
    ps = load_particles(star)
    o = ps.origins_px()
    assert o.dtype == np.float64 and o.shape == (4, 2)
    np.testing.assert_allclose(o, [[2.0, -1.0], [0.0, 3.0], [-4.0, 0.5], [1.0, 0.0]])
    np.testing.assert_allclose(ps.origins_px([2]), [[-4.0, 0.5]])
    a = ps.angles([1, 2])
    np.testing.assert_allclose(a, [[-10, 90, 180], [0, 45, -90]])
    bare = ParticleSet(ps.optics, ps.particles.drop(
        columns=["rlnOriginXAngst", "rlnOriginYAngst", "rlnAngleRot", "rlnAngleTilt",
                 "rlnAnglePsi"]), star)
    np.testing.assert_array_equal(bare.origins_px(), np.zeros((4, 2)))
    np.testing.assert_array_equal(bare.angles(), np.zeros((4, 3)))


def test_origins_use_each_groups_pixel_size(project):
    star, _ = project
    ps = load_particles(star)
    ps.optics.loc[1, "rlnImagePixelSize"] = 2.5
    np.testing.assert_allclose(ps.origins_px()[:, 1], [-1.0, 1.5, 0.5, 0.0])
    np.testing.assert_allclose(ps.origins_px(pixel_size=2.0)[:, 1], [-0.625, 1.875, 0.3125,
                                                                      0.0])
    with pytest.raises(InputError, match="different rlnImagePixelSize.*reference_grid"):
        _ = ps.pixel_size
    assert ps.reference_grid == (ps.boxes[0], 1.25) and ps.mixed_grids


def test_batches(project):
    star, _ = project
    ps = load_particles(star)
    assert [b.tolist() for b in ps.batches(3)] == [[0, 1, 2], [3]]
    assert [b.tolist() for b in ps.batches(10)] == [[0, 1, 2, 3]]
    with pytest.raises(ValueError):
        list(ps.batches(0))


def test_write_particles_round_trip(project, tmp_path):
    star, expected = project
    ps = load_particles(star)
    out = tmp_path / "out.star"
    write_particles(out, ps.optics, ps.particles)
    text = out.read_text()
    assert text.index("data_optics") < text.index("data_particles")
    assert "_rlnFooBar #13" in text
    back = load_particles(out)
    pd.testing.assert_frame_equal(back.particles, ps.particles)
    pd.testing.assert_frame_equal(back.optics, ps.optics)
    np.testing.assert_array_equal(back.read_images([1]), expected[[1]])


def test_make_optics_table():
    t = make_optics_table(1.5, 64, voltage=200, cs=1.4, amplitude_contrast=0.07, name="g")
    assert list(t.columns) == ["rlnOpticsGroupName", "rlnOpticsGroup", "rlnVoltage",
                               "rlnSphericalAberration", "rlnAmplitudeContrast",
                               "rlnImagePixelSize", "rlnImageSize", "rlnImageDimensionality"]
    assert t.iloc[0].tolist() == ["g", 1, 200.0, 1.4, 0.07, 1.5, 64, 2]


# -- RELION 3.0 files ------------------------------------------------------------------------


def test_load_relion30_detector_pixel_size(tmp_path):
    imgs = _stack_images(3, 2)
    write_stack(tmp_path / "parts.mrcs", imgs, 1.0)  # stack header pixel size is ignored
    labels = ["rlnImageName", "rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast",
              "rlnMagnification", "rlnDetectorPixelSize", "rlnDefocusU", "rlnDefocusV",
              "rlnDefocusAngle", "rlnOriginX", "rlnOriginY", "rlnBarBaz"]
    rows = [["1@parts.mrcs", "300", "2.7", "0.1", "10000", "14", "15000", "14000", "5",
             "2.0", "-1.0", "1"],
            ["2@parts.mrcs", "300", "2.7", "0.1", "10000", "14", "16000", "15000", "6",
             "0.5", "0.0", "2"]]
    text = relion_block("", labels, rows).replace("# version 30001\n", "")
    (tmp_path / "old.star").write_text(text)
    ps = load_particles(tmp_path / "old.star")
    assert ps.n_particles == 2
    assert ps.pixel_size == pytest.approx(14.0)  # 14 um * 10000 / 10000
    assert ps.box == BOX  # from the stack header
    assert len(ps.optics) == 1
    assert ps.optics["rlnVoltage"].iloc[0] == 300
    assert ps.optics_group_index().tolist() == [0, 0]
    # origins converted px -> Angstrom, legacy optics columns moved out of the particles
    np.testing.assert_allclose(ps.particles["rlnOriginXAngst"], [28.0, 7.0])
    np.testing.assert_allclose(ps.origins_px(), [[2.0, -1.0], [0.5, 0.0]])
    for gone in ("rlnOriginX", "rlnVoltage", "rlnMagnification", "rlnDetectorPixelSize"):
        assert gone not in ps.particles.columns
    assert "rlnBarBaz" in ps.particles.columns
    np.testing.assert_allclose(ps.ctf_params().cs, [2.7, 2.7])
    np.testing.assert_array_equal(ps.read_images([1, 0]), imgs[[1, 0]])
    # and it is written back as a 3.1 file
    write_particles(tmp_path / "new.star", ps.optics, ps.particles)
    assert list(read_star(tmp_path / "new.star")) == ["optics", "particles"]


def test_load_relion30_one_group_per_microscope_setting(tmp_path):
    write_stack(tmp_path / "s.mrcs", _stack_images(4, 3), 1.0)
    labels = ["rlnImageName", "rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast",
              "rlnPixelSize", "rlnDefocusU"]
    rows = [["1@s.mrcs", "300", "2.7", "0.1", "1.1", "10000"],
            ["2@s.mrcs", "200", "2.7", "0.1", "1.1", "10000"],
            ["3@s.mrcs", "300", "2.7", "0.1", "1.1", "10000"]]
    (tmp_path / "images.star").write_text(relion_block("images", labels, rows))
    ps = load_particles(tmp_path / "images.star")
    assert ps.optics["rlnVoltage"].tolist() == [300, 200]
    assert ps.optics["rlnOpticsGroup"].tolist() == [1, 2]
    assert ps.optics_group_index().tolist() == [0, 1, 0]
    assert ps.pixel_size == pytest.approx(1.1)
    np.testing.assert_allclose(ps.ctf_params().voltage, [300, 200, 300])


# -- errors -------------------------------------------------------------------------------------


def _write_star(tmp_path, optics_labels, optics_rows, part_labels, part_rows, name="bad.star"):
    path = tmp_path / name
    text = ""
    if optics_labels is not None:
        text += relion_block("optics", optics_labels, optics_rows)
    text += relion_block("particles", part_labels, part_rows)
    path.write_text(text)
    return path


def test_error_missing_file(tmp_path):
    with pytest.raises(InputError, match=r"none\.star: file not found"):
        load_particles(tmp_path / "none.star")


def test_error_no_particles_block(tmp_path):
    path = tmp_path / "optics_only.star"
    path.write_text(relion_block("optics", OPTICS_LABELS, OPTICS_ROWS))
    with pytest.raises(InputError, match=r"optics_only\.star: no data_particles block"):
        load_particles(path)
    path = tmp_path / "list_only.star"
    path.write_text("data_general\n\n_rlnFinalResolution 3.2\n\n")
    with pytest.raises(InputError, match=r"list_only\.star: no particles block"):
        load_particles(path)


def test_error_missing_image_name(tmp_path):
    path = _write_star(tmp_path, OPTICS_LABELS, OPTICS_ROWS, ["rlnOpticsGroup"], [[1]])
    with pytest.raises(InputError, match=r"bad\.star: data_particles has no rlnImageName"):
        load_particles(path)
    path30 = tmp_path / "old.star"
    path30.write_text(relion_block("", ["rlnDefocusU"], [["1000"]]))
    with pytest.raises(InputError, match=r"old\.star: data_ has no rlnImageName"):
        load_particles(path30)


@pytest.mark.parametrize("field", ["rlnImagePixelSize", "rlnVoltage",
                                   "rlnSphericalAberration"])
def test_error_missing_optics_field(project, tmp_path, field):
    star, _ = project
    blocks = read_star(star)
    col = OPTICS_LABELS.index(field)
    labels = [x for x in OPTICS_LABELS if x != field]
    rows = [[v for i, v in enumerate(r) if i != col] for r in OPTICS_ROWS]
    path = _write_star(tmp_path, labels, rows, PARTICLE_LABELS,
                       blocks["particles"].values.tolist())
    with pytest.raises(InputError, match=rf"bad\.star: data_optics has no {field} column"):
        load_particles(path)


def test_error_empty_particle_table(tmp_path):
    path = _write_star(tmp_path, OPTICS_LABELS, OPTICS_ROWS, ["rlnImageName"], [])
    with pytest.raises(InputError, match=r"no particles in .*bad\.star"):
        load_particles(path)


def test_error_bad_pixel_size_value(tmp_path):
    rows = [r[:5] + ["0.000000"] + r[6:] for r in OPTICS_ROWS]
    path = _write_star(tmp_path, OPTICS_LABELS, rows, ["rlnImageName", "rlnOpticsGroup"],
                       [["1@x.mrcs", 1]])
    with pytest.raises(InputError, match=r"bad\.star: data_optics, row 1: rlnImagePixelSize "
                                         r"= 0: expected a pixel size in 0\.1\.\.100 A"):
        load_particles(path)


def test_error_inconsistent_pixel_size_relion30(tmp_path):
    path = _write_star(tmp_path, None, None,
                       ["rlnImageName", "rlnPixelSize", "rlnDetectorPixelSize",
                        "rlnMagnification"],
                       [["1@x.mrcs", "1.0", "14", "10000"]])
    with pytest.raises(InputError, match=r"bad\.star: inconsistent pixel size in row 1"):
        load_particles(path)
    path = _write_star(tmp_path, None, None, ["rlnImageName", "rlnVoltage"],
                       [["1@x.mrcs", "300"]], name="nopix.star")
    with pytest.raises(InputError, match=r"nopix\.star: .*no pixel size; expected rlnPixelSize"):
        load_particles(path)


def test_error_groups_with_different_boxes(project):
    star, _ = project
    ps = load_particles(star)
    ps.optics.loc[1, "rlnImageSize"] = 16
    with pytest.raises(InputError, match=r"particles\.star: optics groups have different "
                                         r"rlnImageSize \(8, 16\).*reference_grid"):
        _ = ps.box


def test_error_bad_optics_group(tmp_path):
    path = _write_star(tmp_path, OPTICS_LABELS, OPTICS_ROWS, ["rlnImageName", "rlnOpticsGroup"],
                       [["1@x.mrcs", 1], ["2@x.mrcs", 3]])
    with pytest.raises(InputError, match=r"bad\.star: rlnOpticsGroup 3 of particle 2 .*1\.\.2"):
        load_particles(path)


def test_error_missing_stack(project, tmp_path):
    star, _ = project
    (tmp_path / "Extract" / "b.mrcs").unlink()
    ps = load_particles(star)
    ps.read_images([0, 1])  # a.mrcs is still there
    with pytest.raises(InputError, match=r"particles\.star: particle 3 \(rlnImageName "
                                         r"000002@Extract/b\.mrcs\): stack Extract/b\.mrcs "
                                         r"not found"):
        ps.read_images([0, 2])
    assert ps.image_paths([0, 2]) == [tmp_path / "Extract" / "a.mrcs", None]


def test_error_image_index_out_of_range(project, tmp_path):
    star, _ = project
    write_stack(tmp_path / "Extract" / "b.mrcs", _stack_images(5, 1), 1.25)  # now 1 image
    ps = load_particles(star)
    with pytest.raises(InputError, match=r"particles\.star: particle 3 .*image 2 out of range; "
                                         r"stack .*b\.mrcs has images 1\.\.1"):
        ps.read_images([2])
    np.testing.assert_array_equal(ps.read_images([3]), _stack_images(5, 1))


@pytest.mark.filterwarnings("ignore:Data array contains NaN")
def test_error_nan_pixels(project, tmp_path):
    star, _ = project
    imgs = _stack_images(2, 2)
    imgs[1, 3, 3] = np.nan
    write_stack(tmp_path / "Extract" / "b.mrcs", imgs, 1.25)
    ps = load_particles(star)
    ps.read_images([3])  # image 1 of b.mrcs is fine
    with pytest.raises(InputError, match=r"particles\.star: .*b\.mrcs: image 2 .*NaN"):
        ps.read_images([2])


def test_error_box_mismatch(project, tmp_path):
    star, _ = project
    write_stack(tmp_path / "Extract" / "b.mrcs", np.zeros((2, 16, 16), np.float32), 1.25)
    ps = load_particles(star)
    with pytest.raises(InputError, match=r"particles\.star: stack .*b\.mrcs .*has 16 px images; "
                                         r"expected rlnImageSize = 8"):
        ps.read_images([3])


def test_error_bad_image_name(project):
    star, _ = project
    ps = load_particles(star)
    ps.particles.loc[1, "rlnImageName"] = "0@Extract/a.mrcs"
    with pytest.raises(InputError, match=r"rlnImageName '0@Extract/a\.mrcs' of particle 2"):
        ps.read_images([0])


# -- RELION defaults, per-group optics, checks ----------------------------------------------------


def _drop_optics_column(star, tmp_path, label, name="p.star"):
    blocks = read_star(star)
    out = tmp_path / name
    write_particles(out, blocks["optics"].drop(columns=[label]), blocks["particles"])
    return out


def test_missing_image_size_comes_from_the_stacks(project, tmp_path):
    star, expected = project
    notes = []
    ps = load_particles(_drop_optics_column(star, tmp_path, "rlnImageSize"), log=notes.append)
    assert ps.boxes.tolist() == [BOX, BOX]
    assert any("box size 8, 8 px from the image stacks" in n for n in notes)
    np.testing.assert_array_equal(ps.read_images([0, 3]), expected[[0, 3]])


def test_image_size_checked_against_the_stack_at_load(project, tmp_path):
    star, _ = project
    blocks = read_star(star)
    blocks["optics"]["rlnImageSize"] = [BOX, 300]
    write_particles(tmp_path / "bad.star", blocks["optics"], blocks["particles"])
    with pytest.raises(InputError, match=r"bad\.star: stack .*a\.mrcs \(particle 2\) has 8 x 8 "
                                         r"px images; expected rlnImageSize = 300 of optics "
                                         r"group 2"):
        load_particles(tmp_path / "bad.star")
    ps = load_particles(tmp_path / "bad.star", check_stacks=False)  # e.g. for cryomap info
    with pytest.raises(InputError, match="particles 1 and 2 have different boxes"):
        ps.read_images([0, 1])


def test_missing_amplitude_contrast_is_relion_import_default(project, tmp_path):
    star, _ = project
    notes = []
    ps = load_particles(_drop_optics_column(star, tmp_path, "rlnAmplitudeContrast"),
                        log=notes.append)
    np.testing.assert_allclose(ps.ctf_params().amplitude_contrast, 0.1)
    assert notes == [f"{tmp_path / 'p.star'}: no rlnAmplitudeContrast; using 0.1 "
                     f"(relion_import's default)"]
    assert ps.notes == notes


def test_pixel_size_from_detector_or_angpix(project, tmp_path):
    star, expected = project
    path = _drop_optics_column(star, tmp_path, "rlnImagePixelSize")
    with pytest.raises(InputError, match=r"p\.star: data_optics has no rlnImagePixelSize "
                                         r"column.*or give --angpix"):
        load_particles(path)
    ps = load_particles(path, angpix=1.3, log=None)
    np.testing.assert_allclose(ps.pixel_sizes, [1.3, 1.3])
    np.testing.assert_allclose(ps.origins_px([0]), [[2.5 / 1.3, -1.25 / 1.3]])
    blocks = read_star(path)
    blocks["optics"]["rlnDetectorPixelSize"] = [5.0, 5.0]
    blocks["optics"]["rlnMagnification"] = [40000.0, 25000.0]
    write_particles(tmp_path / "det.star", blocks["optics"], blocks["particles"])
    ps = load_particles(tmp_path / "det.star", log=None)
    np.testing.assert_allclose(ps.pixel_sizes, [1.25, 2.0])
    # --angpix replaces a pixel size that is there, with a note
    notes = []
    ps = load_particles(star, angpix=1.0, log=notes.append)
    assert ps.pixel_size == 1.0 and "replaced by --angpix 1" in notes[0]
    for bad in (0.0, -1.0, 1e28):
        with pytest.raises(InputError, match=r"--angpix = .*expected a pixel size in 0\.1"):
            load_particles(star, angpix=bad)


def test_groups_with_different_pixel_sizes_and_boxes(project, tmp_path):
    star, expected = project
    # group 2 (particles 2 and 4) gets its own 16 px stack at 1.24 A, as in a merged data set
    blocks = read_star(star)
    big = _stack_images(7, 2).repeat(2, axis=1).repeat(2, axis=2)
    write_stack(tmp_path / "Extract" / "c.mrcs", big, 1.24)
    parts = blocks["particles"].copy()
    parts.loc[[1, 3], "rlnImageName"] = ["000002@Extract/c.mrcs", "000001@Extract/c.mrcs"]
    optics = blocks["optics"].copy()
    optics["rlnImagePixelSize"] = [1.25, 1.24]
    optics["rlnImageSize"] = [BOX, 16]
    write_particles(tmp_path / "merged.star", optics, parts)
    ps = load_particles(tmp_path / "merged.star")
    np.testing.assert_allclose(ps.pixel_sizes, [1.25, 1.24])
    assert ps.boxes.tolist() == [BOX, 16]
    np.testing.assert_allclose(ps.particle_pixel_sizes(), [1.25, 1.24, 1.25, 1.24])
    assert ps.particle_boxes([3, 0]).tolist() == [16, BOX]
    np.testing.assert_allclose(ps.origins_px([1])[0], [0.0, 3.75 / 1.24])
    np.testing.assert_array_equal(ps.read_images([1, 3]), big[[1, 0]])
    np.testing.assert_array_equal(ps.read_images([2, 0]), expected[[2, 0]])
    for prop in ("pixel_size", "box"):
        with pytest.raises(InputError, match=r"optics groups have different .*expected one"):
            getattr(ps, prop)


def test_ctf_values_checked_at_load(project, tmp_path):
    star, _ = project
    cases = [("optics", "rlnVoltage", [300.0, 0.0],
              r"data_optics, row 2: rlnVoltage = 0; expected \[10, 3000\] kV"),
             ("optics", "rlnAmplitudeContrast", [0.1, 1.5],
              r"data_optics, row 2: rlnAmplitudeContrast = 1\.5; expected \[0, 1\)"),
             ("particles", "rlnDefocusU", [10000.0, -5.0, 1.0, 1.0],
              r"data_particles, row 2: rlnDefocusU = -5; expected > 0 A \(positive = "
              r"underfocus\)"),
             ("particles", "rlnDefocusV", [1.0, 1.0, 0.0, 1.0],
              r"data_particles, row 3: rlnDefocusV = 0; expected > 0"),
             ("particles", "rlnCtfScalefactor", [1.0, 1.0, 1.0, 0.0],
              r"row 4: rlnCtfScalefactor = 0; expected > 0"),
             ("particles", "rlnAngleTilt", [1.0, np.nan, 1.0, 1.0],
              r"data_particles, row 2: rlnAngleTilt = nan; expected a finite number"),
             ("particles", "rlnOriginXAngst", ["1", "1", "x1", "1"],
              r"data_particles, row 3: rlnOriginXAngst = 'x1' is not a number"),
             ("particles", "rlnOpticsGroup", [1, 2, 3, 1],
              r"rlnOpticsGroup 3 of particle 3 is not valid; expected 1\.\.2")]
    for block, label, values, pattern in cases:
        blocks = read_star(star)
        blocks[block] = blocks[block].copy()
        blocks[block][label] = values
        write_particles(tmp_path / "c.star", blocks["optics"], blocks["particles"])
        with pytest.raises(InputError, match=r"c\.star: .*" + pattern):
            load_particles(tmp_path / "c.star")


def test_ctf_params_rechecks_edited_values(project):
    star, _ = project
    ps = load_particles(star)
    ps.particles["rlnDefocusU"] = [1.0, 1.0, -1.0, 1.0]
    ps.ctf_params([0, 1])  # only the rows asked for are used (and checked)
    with pytest.raises(InputError, match="row 3: rlnDefocusU = -1"):
        ps.ctf_params([2])


def test_duplicate_label_is_an_error(project, tmp_path):
    star, _ = project
    text = star.read_text().replace("_rlnFooBar #13", "_rlnDefocusU #13")
    (tmp_path / "dup.star").write_text(text)
    with pytest.raises(InputError, match=r"dup\.star"):
        load_particles(tmp_path / "dup.star")


def test_aberrations_read_per_optics_group(project, tmp_path):
    star, _ = project
    blocks = read_star(star)
    optics = blocks["optics"].copy()
    optics["rlnBeamTiltX"] = [0.5, -1.0]
    optics["rlnBeamTiltY"] = [0.25, 0.0]
    optics["rlnOddZernike"] = ["[1.5,-2,30]", "[0,0]"]
    optics["rlnEvenZernike"] = ["[0.1,0,0,40]", "[]"]
    optics["rlnMagMat00"] = [1.01, 1.0]
    optics["rlnMagMat01"] = [0.01, 0.0]
    optics["rlnMagMat10"] = [-0.01, 0.0]
    optics["rlnMagMat11"] = [0.99, 1.0]
    write_particles(tmp_path / "ab.star", optics, blocks["particles"])
    text = (tmp_path / "ab.star").read_text()
    assert "[1.5,-2,30]" in text  # vectors written back as RELION writes them
    ps = load_particles(tmp_path / "ab.star")
    ctf = ps.ctf_params([0, 1])
    np.testing.assert_allclose(ctf.beam_tilt, [[0.5, 0.25], [-1.0, 0.0]])
    np.testing.assert_allclose(ctf.odd_zernike, [[1.5, -2.0, 30.0], [0, 0, 0]])
    np.testing.assert_allclose(ctf.even_zernike, [[0.1, 0, 0, 40.0], [0, 0, 0, 0]])
    np.testing.assert_allclose(ctf.mag_matrix, [[[1.01, 0.01], [-0.01, 0.99]], np.eye(2)])
    # evaluate/phase_factor use them: group 1 differs from the same particle without them
    plain = CtfParams(ctf.defocus_u, ctf.defocus_v, ctf.defocus_angle, ctf.voltage, ctf.cs,
                      ctf.amplitude_contrast, ctf.phase_shift)
    kx, ky = np.arange(4.0), np.arange(4.0)
    assert not np.allclose(ctf.evaluate(kx, ky, BOX, 1.25)[0], plain.evaluate(kx, ky, BOX,
                                                                               1.25)[0])
    assert ctf.has_phase_aberrations
    blocks = read_star(tmp_path / "ab.star")
    blocks["optics"]["rlnOddZernike"] = ["[1,x]", "[]"]
    write_particles(tmp_path / "bad.star", blocks["optics"], blocks["particles"])
    with pytest.raises(InputError, match=r"data_optics, row 1: rlnOddZernike = '\[1,x\]'; "
                                         r"expected a list of numbers"):
        load_particles(tmp_path / "bad.star")


# -- half sets ----------------------------------------------------------------------------------


def _with_subsets(ps, values):
    parts = ps.particles.copy()
    if values is None:
        parts = parts.drop(columns=["rlnRandomSubset"], errors="ignore")
    else:
        parts["rlnRandomSubset"] = values
    return ParticleSet(ps.optics, parts, ps.star_path)


def test_random_subsets_kept_when_valid(project):
    star, _ = project
    ps = _with_subsets(load_particles(star), [2, 1, 1, 2])
    logged = []
    s = random_subsets(ps, np.random.default_rng(0), log=logged.append)
    assert s.tolist() == [2, 1, 1, 2] and s.dtype == np.int64 and logged == []


@pytest.mark.parametrize("values, reason", [(None, "no rlnRandomSubset column"),
                                            ([0, 0, 0, 0], "is 0 for every particle")])
def test_random_subsets_split_when_absent_or_all_zero(project, values, reason):
    star, _ = project
    ps = _with_subsets(load_particles(star), values)
    logged = []
    s = random_subsets(ps, np.random.default_rng(3), log=logged.append)
    assert sorted(s.tolist()) == [1, 1, 2, 2]
    assert len(logged) == 1 and reason in logged[0] and "split at random" in logged[0]
    again = random_subsets(ps, np.random.default_rng(3), log=None)
    assert again.tolist() == s.tolist()  # seeded


@pytest.mark.parametrize("values, pattern", [
    ([1, 2, 3, 1], r"row 3: rlnRandomSubset = 3; expected 1 or 2"),
    ([1, 0, 2, 1], r"row 2: rlnRandomSubset = 0 while other particles have 1 or 2"),
    ([1, 1, 1, 1], r"rlnRandomSubset is 1 for every particle; expected both half sets"),
    ([2, 2, 2, 2], r"rlnRandomSubset is 2 for every particle"),
    (["1", "2", "a", "1"], r"row 3: rlnRandomSubset = 'a' is not a number"),
])
def test_random_subsets_invalid_like_relion(project, values, pattern):
    # RELION stops with an error in these cases (divideParticlesInRandomHalves); with
    # resplit_invalid the particles are split again, with a log line saying why.
    star, _ = project
    ps = _with_subsets(load_particles(star), values)
    with pytest.raises(InputError, match=r"particles\.star: data_particles.*" + pattern):
        random_subsets(ps, np.random.default_rng(0))
    if "not a number" in pattern:
        return
    logged = []
    s = random_subsets(ps, np.random.default_rng(0), log=logged.append, resplit_invalid=True)
    assert sorted(s.tolist()) == [1, 1, 2, 2]
    assert len(logged) == 1 and "split at random" in logged[0]


def test_particles_from_images_save_and_reload(tmp_path, monkeypatch):
    from cryomap.particles import MEMORY_STACK, particles_from_images

    rng = np.random.default_rng(0)
    imgs = rng.normal(size=(5, 12, 12)).astype(np.float32)
    table = pd.DataFrame({"rlnDefocusU": np.full(5, 15000.0), "rlnAngleRot": np.arange(5.0)})
    ps = particles_from_images(imgs, 2.5, table)
    assert ps.n_particles == 5 and ps.reference_grid == (12, 2.5)
    assert ps.particles["rlnImageName"][0] == f"000001@{MEMORY_STACK}"
    np.testing.assert_array_equal(ps.read_images([3, 1]), imgs[[3, 1]])
    assert ps.image_paths([0]) == [None]
    monkeypatch.chdir(tmp_path)
    (tmp_path / "Import").mkdir()
    star = ps.save("Import/particles.star")
    assert read_star(star)["particles"]["rlnImageName"][4] == "000005@Import/particles.mrcs"
    back = load_particles(star)
    np.testing.assert_array_equal(back.read_images(None), imgs)
    np.testing.assert_allclose(back.angles()[:, 0], np.arange(5.0))
    with pytest.raises(InputError, match=r"table: 4 rows for 5 images"):
        particles_from_images(imgs, 2.5, table.iloc[:4])
    with pytest.raises(InputError, match=r"shape \(5, 12, 11\)"):
        particles_from_images(imgs[:, :, :11], 2.5)
