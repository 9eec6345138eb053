"""cryomap.io.cryosparc: .cs particle files as RELION particle tables.

The arrays are synthetic, with the field names, types and shapes of cryoSPARC particle files
(as in public .cs files, e.g. cryoDRGN's tests/data). The pose convention is pinned against
an independent conversion: scipy's Rotation.from_rotvec(pose) must equal
Rotation.from_euler('ZYZ', [rot, tilt, psi]) (i.e. RELION's A = R(pose)^T), the convention of
both public converters (pyem csparc2star, cryoDRGN parse_pose_csparc).
"""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from cryomap.cli.main import main
from cryomap.errors import InputError
from cryomap.euler import euler_to_matrix
from cryomap.io.cryosparc import cs_to_relion, read_cs, rotvec_to_matrix, rotvec_to_relion_euler
from cryomap.io.mrc import write_stack
from cryomap.particles import load_particles, write_particles

CS_DTYPE = [("uid", "<u8"), ("blob/path", "S40"), ("blob/idx", "<u4"),
            ("blob/shape", "<u4", (2,)), ("blob/psize_A", "<f4"), ("blob/sign", "<f4"),
            ("ctf/type", "S9"), ("ctf/exp_group_id", "<u4"), ("ctf/accel_kv", "<f4"),
            ("ctf/cs_mm", "<f4"), ("ctf/amp_contrast", "<f4"), ("ctf/df1_A", "<f4"),
            ("ctf/df2_A", "<f4"), ("ctf/df_angle_rad", "<f4"), ("ctf/phase_shift_rad", "<f4"),
            ("ctf/scale", "<f4"), ("ctf/scale_const", "<f4"), ("ctf/bfactor", "<f4"),
            ("ctf/tilt_A", "<f4", (2,)), ("ctf/anisomag", "<f4", (4,)),
            ("alignments3D/split", "<u4"), ("alignments3D/shift", "<f4", (2,)),
            ("alignments3D/pose", "<f4", (3,)), ("alignments3D/psize_A", "<f4"),
            ("alignments3D/class", "<u4")]
BOX = 8


def make_cs(n: int = 6, seed: int = 0, path: bytes = b"J3/extract/mic_particles.mrc"
            ) -> np.ndarray:
    rng = np.random.default_rng(seed)
    cs = np.zeros(n, dtype=CS_DTYPE)
    cs["uid"] = rng.integers(1, 2**62, n)
    cs["blob/path"] = path
    cs["blob/idx"] = np.arange(n)[::-1]
    cs["blob/shape"] = BOX
    cs["blob/psize_A"] = 1.5
    cs["blob/sign"] = -1.0
    cs["ctf/type"] = b"imported"
    cs["ctf/exp_group_id"] = [0, 0, 1, 1, 0, 1][:n]
    cs["ctf/accel_kv"] = 300.0
    cs["ctf/cs_mm"] = 2.7
    cs["ctf/amp_contrast"] = 0.07
    cs["ctf/df1_A"] = rng.uniform(10000, 20000, n)
    cs["ctf/df2_A"] = cs["ctf/df1_A"] - 300
    cs["ctf/df_angle_rad"] = rng.uniform(-np.pi, np.pi, n)
    cs["ctf/phase_shift_rad"] = rng.uniform(0, 1, n)
    cs["ctf/scale"] = 1.0
    cs["ctf/bfactor"] = rng.uniform(-20, 20, n)
    cs["alignments3D/split"] = np.arange(n) % 2
    cs["alignments3D/shift"] = rng.uniform(-3, 3, (n, 2))
    axis = rng.normal(size=(n, 3))
    axis /= np.linalg.norm(axis, axis=1, keepdims=True)
    cs["alignments3D/pose"] = axis * rng.uniform(0.1, 3.1, (n, 1))
    cs["alignments3D/psize_A"] = 1.5
    cs["alignments3D/class"] = 0
    return cs


def test_rodrigues_matches_scipy():
    v = np.random.default_rng(1).normal(size=(20, 3))
    np.testing.assert_allclose(rotvec_to_matrix(v), Rotation.from_rotvec(v).as_matrix(),
                               atol=1e-14)  # float rounding: measured 3.3e-16
    np.testing.assert_allclose(rotvec_to_matrix(np.zeros(3)), np.eye(3))


def test_pose_is_the_transpose_of_relions_matrix():
    pose = make_cs(6)["alignments3D/pose"].astype(np.float64)
    ang = rotvec_to_relion_euler(pose)
    # independent: scipy's ZYZ (intrinsic) composition of RELION's angles is R(pose)
    # float rounding through the angles: measured 3.3e-16 here and below
    np.testing.assert_allclose(Rotation.from_euler("ZYZ", ang, degrees=True).as_matrix(),
                               Rotation.from_rotvec(pose).as_matrix(), atol=1e-13)
    # and RELION's A (euler.py) is its transpose, not itself (measured 1.69 apart at most)
    a = euler_to_matrix(ang[:, 0], ang[:, 1], ang[:, 2])
    r = Rotation.from_rotvec(pose).as_matrix()
    np.testing.assert_allclose(a, np.swapaxes(r, 1, 2), atol=1e-13)
    assert not np.allclose(a, r, atol=1.5)


def test_fields_converted_to_relion_conventions():
    cs = make_cs(6)
    notes = []
    optics, parts = cs_to_relion(cs, "x.cs", notes=notes)
    assert parts["rlnImageName"].tolist()[:2] == ["000006@J3/extract/mic_particles.mrc",
                                                  "000005@J3/extract/mic_particles.mrc"]
    np.testing.assert_allclose(parts["rlnDefocusU"], cs["ctf/df1_A"])
    np.testing.assert_allclose(parts["rlnDefocusV"], cs["ctf/df2_A"])
    np.testing.assert_allclose(parts["rlnDefocusAngle"], np.rad2deg(cs["ctf/df_angle_rad"]))
    np.testing.assert_allclose(parts["rlnPhaseShift"], np.rad2deg(cs["ctf/phase_shift_rad"]))
    np.testing.assert_allclose(parts["rlnCtfBfactor"], cs["ctf/bfactor"])
    np.testing.assert_allclose(parts["rlnCtfScalefactor"], 1.0)
    # shifts: px in the alignment's pixel size, same sign as rlnOriginX/Y
    np.testing.assert_allclose(parts[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy(),
                               cs["alignments3D/shift"].astype(np.float64) * 1.5,
                               rtol=1e-12)  # measured 0.0
    assert parts["rlnRandomSubset"].tolist() == [1, 2, 1, 2, 1, 2]
    assert parts["rlnClassNumber"].tolist() == [1] * 6
    # optics: one group per exposure group (same microscope and pixel size here)
    assert parts["rlnOpticsGroup"].tolist() == [1, 1, 2, 2, 1, 2]
    assert optics["rlnImageSize"].tolist() == [BOX, BOX]
    np.testing.assert_allclose(optics["rlnImagePixelSize"], 1.5)
    # float32 in the file: measured 4.3e-9 (float32 rounds by at most 6e-8)
    np.testing.assert_allclose(optics["rlnAmplitudeContrast"], 0.07, rtol=1e-7)
    assert notes == []
    cs["ctf/tilt_A"][0] = [0.1, 0.0]
    cs_to_relion(cs, "x.cs", notes=notes)
    assert len(notes) == 1 and "ctf/tilt_A is non-zero and not converted" in notes[0]


def _project(tmp_path, cs, name="J3_particles.cs"):
    proj = tmp_path / "CS-project"
    (proj / "J3" / "extract").mkdir(parents=True)
    imgs = np.random.default_rng(5).normal(size=(len(cs), BOX, BOX)).astype(np.float32)
    write_stack(proj / "J3" / "extract" / "mic_particles.mrc", imgs, 1.5)
    path = proj / "J3" / name
    with open(path, "wb") as f:  # cryoSPARC writes .cs with np.save into an open file
        np.save(f, cs)
    return proj, path, imgs


def test_load_particles_dispatches_on_suffix_and_reads_images(tmp_path, monkeypatch):
    cs = make_cs(6)
    proj, path, imgs = _project(tmp_path, cs)
    monkeypatch.chdir(tmp_path)
    ps = load_particles(path, project_dir=proj)
    assert ps.n_particles == 6 and ps.box == BOX and ps.pixel_size == pytest.approx(1.5)
    np.testing.assert_array_equal(ps.read_images([0, 5]), imgs[[5, 0]])  # blob/idx 0-based
    # without project_dir: the folder above the .cs file (cryoSPARC's <project>/<job>/)
    ps2 = load_particles(path)
    np.testing.assert_array_equal(ps2.read_images([1]), imgs[[4]])
    # and the set can be written as a RELION STAR file with the same poses
    write_particles(tmp_path / "from_cs.star", ps.optics, ps.particles)
    monkeypatch.chdir(proj)  # RELION paths are relative to the project folder
    back = load_particles(tmp_path / "from_cs.star")
    # 12 significant digits in the STAR file: measured 4.0e-10 (at most 5e-10 below 180 deg)
    np.testing.assert_allclose(back.angles(), ps.angles(), atol=1e-9)
    np.testing.assert_array_equal(back.read_images([2]), imgs[[3]])


def test_exported_paths_and_missing_project_dir(tmp_path):
    cs = make_cs(2, path=b">J3/extract/mic_particles.mrc")
    proj, path, imgs = _project(tmp_path, cs)
    ps = load_particles(path, project_dir=proj)
    assert ps.particles["rlnImageName"][0] == "000002@J3/extract/mic_particles.mrc"
    with pytest.raises(InputError, match=r"nowhere: cryoSPARC project folder not found"):
        load_particles(path, project_dir=tmp_path / "nowhere")


@pytest.mark.parametrize("edit, pattern", [
    (lambda cs: cs[[n for n in cs.dtype.names if n != "blob/path"]],
     r"no blob/path field; expected a particle \.cs file"),
    (lambda cs: cs.__setitem__("alignments3D/split", [0, 2, 0]) or cs,
     r"record 2: alignments3D/split = 2; expected 0 or 1"),
    (lambda cs: cs.__setitem__("ctf/accel_kv", [300, 0, 300]) or cs,
     r"data_optics, row 2: rlnVoltage = 0; expected \[10, 3000\] kV"),
    (lambda cs: cs.__setitem__("ctf/df1_A", [1e4, np.nan, 1e4]) or cs,
     r"record 2: ctf/df1_A = nan; expected finite numbers"),
    (lambda cs: cs.__setitem__("blob/psize_A", [1.5, 1e-30, 1.5]) or cs,
     r"record 2: blob/psize_A = 1e-30: expected a pixel size in 0\.1\.\.100 A"),
])
def test_bad_cs_files(tmp_path, edit, pattern):
    cs = edit(make_cs(3))
    proj, path, _ = _project(tmp_path, cs)
    with pytest.raises(InputError, match=pattern):
        load_particles(path, project_dir=proj)


def test_not_a_cs_file(tmp_path):
    (tmp_path / "junk.cs").write_bytes(b"\x93NUMPY garbage" * 10)
    with pytest.raises(InputError, match=r"junk\.cs: not a cryoSPARC \.cs file"):
        read_cs(tmp_path / "junk.cs")
    np.save(tmp_path / "plain.npy", np.zeros(4))
    (tmp_path / "plain.npy").rename(tmp_path / "plain.cs")
    with pytest.raises(InputError, match=r"plain\.cs: not a cryoSPARC \.cs file \(expected a "
                                         r"1D structured array"):
        read_cs(tmp_path / "plain.cs")


def test_info_summarises_cs(tmp_path, capsys):
    proj, path, _ = _project(tmp_path, make_cs(6))
    assert main(["info", "--i", str(path), "--cs_project_dir", str(proj)]) == 0
    out = capsys.readouterr().out
    assert "cryoSPARC file" in out and "records: 6" in out
    assert "alignments3D/pose" in out
    assert "particles: 6" in out and "optics groups: 2" in out
    assert "pixel 1.5000 A, box 8, 300 kV" in out
    assert "rlnRandomSubset: 1: 3, 2: 3" in out
    assert "stack found at" in out and "(6 images of 8 x 8 px)" in out
