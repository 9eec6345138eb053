"""`cryomap export` / cryomap.io.cryosparc_export: RELION STAR -> cryoSPARC .cs.

Checked against independent expectations: cryoSPARC's own reader (cryosparc-tools'
Dataset.load, where installed), scipy's rotations for the pose convention (RELION's A =
R(pose)^T, docs/conventions.md "cryoSPARC files"), plain NumPy unit conversions, and the
values of the STAR file after a round trip through cryomap's reader (io.cryosparc).
"""

from __future__ import annotations

import re

import numpy as np
import pandas as pd
import pytest
from scipy.spatial.transform import Rotation

from cryomap.cli.main import main
from cryomap.euler import euler_to_matrix
from cryomap.io.cryosparc import cs_to_relion, matrix_to_rotvec, read_cs
from cryomap.io.star import read_star
from cryomap.particles import write_particles

N = 12
# Two optics groups with different microscopes and pixel sizes.
OPTICS = pd.DataFrame({
    "rlnOpticsGroupName": ["opticsGroup1", "opticsGroup2"], "rlnOpticsGroup": [1, 2],
    "rlnVoltage": [300.0, 200.0], "rlnSphericalAberration": [2.7, 1.4],
    "rlnAmplitudeContrast": [0.1, 0.07], "rlnImagePixelSize": [1.06, 0.6575],
    "rlnImageSize": [64, 96], "rlnImageDimensionality": [2, 2]})

# the fields and types of cryoSPARC particle files (cryosparc-tools' T20S test particles,
# cryoSPARC refinement outputs); string fields are fixed-length bytes in the file
FIELDS_3D = [
    ("uid", "<u8"), ("blob/path", "S"), ("blob/idx", "<u4"), ("blob/shape", "<u4", (2,)),
    ("blob/psize_A", "<f4"), ("blob/sign", "<f4"), ("ctf/type", "S"),
    ("ctf/exp_group_id", "<u4"), ("ctf/accel_kv", "<f4"), ("ctf/cs_mm", "<f4"),
    ("ctf/amp_contrast", "<f4"), ("ctf/df1_A", "<f4"), ("ctf/df2_A", "<f4"),
    ("ctf/df_angle_rad", "<f4"), ("ctf/phase_shift_rad", "<f4"), ("ctf/scale", "<f4"),
    ("ctf/bfactor", "<f4"), ("alignments3D/split", "<u4"),
    ("alignments3D/shift", "<f4", (2,)), ("alignments3D/pose", "<f4", (3,)),
    ("alignments3D/psize_A", "<f4"), ("alignments3D/class_posterior", "<f4"),
    ("alignments3D/class", "<u4"), ("location/micrograph_path", "S")]


def make_particles(n: int = N, seed: int = 0, two_d: bool = False) -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    df = pd.DataFrame({
        "rlnImageName": [f"{i % 5 + 1:06d}@Extract/job004/mic{i // 5}.mrcs" for i in range(n)],
        "rlnMicrographName": [f"MotionCorr/job002/mic{i // 5}.mrc" for i in range(n)],
        "rlnOpticsGroup": [1 + (i % 3 == 2) for i in range(n)],
        "rlnDefocusU": rng.uniform(9000, 25000, n),
        "rlnDefocusV": rng.uniform(9000, 25000, n),
        "rlnDefocusAngle": rng.uniform(-180, 180, n),
        "rlnPhaseShift": rng.uniform(0, 90, n),
        "rlnCtfBfactor": rng.uniform(-50, 0, n),
        "rlnCtfScalefactor": rng.uniform(0.5, 1.0, n),
        "rlnAnglePsi": rng.uniform(-180, 180, n),
        "rlnOriginXAngst": rng.uniform(-8, 8, n),
        "rlnOriginYAngst": rng.uniform(-8, 8, n),
        "rlnClassNumber": rng.integers(1, 5, n),
        "rlnMaxValueProbDistribution": rng.uniform(0, 1, n),
        "rlnLogLikeliContribution": rng.normal(size=n),  # no cryoSPARC field: left out
    })
    if not two_d:
        rot = rng.uniform(-180, 180, n)
        tilt = rng.uniform(0, 180, n)
        # degenerate tilts, and a rotation by ~180 degrees (pose |v| ~ pi)
        tilt[:2] = [0.0, 180.0]
        rot[2], tilt[2], df.loc[2, "rlnAnglePsi"] = 90.0, 90.0, 90.0
        df.insert(9, "rlnAngleRot", rot)
        df.insert(10, "rlnAngleTilt", tilt)
        df.insert(14, "rlnRandomSubset", [1 + i % 2 for i in range(n)])
    return df


def _export(tmp_path, parts: pd.DataFrame, optics: pd.DataFrame = OPTICS):
    star = tmp_path / "run_data.star"
    write_particles(star, optics, parts)
    out = tmp_path / "Export" / "particles.cs"
    assert main(["export", "--i", str(star), "--o", str(out)]) == 0
    return star, out


def _image_refs(names) -> tuple[np.ndarray, list[str]]:
    """RELION's "n@path" split by hand: (0-based index, path)."""
    parts = [str(s).split("@", 1) for s in names]
    return np.array([int(i) - 1 for i, _ in parts]), [p for _, p in parts]


def test_matrix_to_rotvec_matches_scipy():
    rng = np.random.default_rng(3)
    r = Rotation.random(200, random_state=4)
    v = r.as_rotvec()
    v[:3] = [[np.pi, 0, 0], [0, 0, np.pi - 1e-9], [1e-12, 0, 0]]  # angle pi and ~0
    near_pi = np.pi - rng.uniform(0, 1e-6, 7)
    v[3:10] *= (near_pi / np.linalg.norm(v[3:10], axis=1))[:, None]
    m = Rotation.from_rotvec(v).as_matrix()
    back = matrix_to_rotvec(m)
    # compared as rotations (v and -v are the same rotation at angle pi):
    # float rounding: measured 6.7e-16; margin 150x
    np.testing.assert_allclose(Rotation.from_rotvec(back).as_matrix(), m, atol=1e-13)
    assert np.all(np.linalg.norm(back, axis=1) <= np.pi + 1e-12)
    # away from angle pi the vector itself is unique: measured 6.7e-16; margin 150x
    far = np.linalg.norm(v, axis=1) < 3.0
    np.testing.assert_allclose(back[far], v[far], atol=1e-13)


def test_cryosparc_tools_reads_the_file(tmp_path, capsys):
    dataset = pytest.importorskip(
        "cryosparc.dataset", reason="cryosparc-tools (cryoSPARC's own .cs reader) not "
                                    "installed; pip install cryosparc-tools")
    parts = make_particles()
    star, out = _export(tmp_path, parts)
    assert "rlnLogLikeliContribution" in capsys.readouterr().out  # listed as left out
    ds = dataset.Dataset.load(out)
    assert len(ds) == N
    names = [f[0] for f in ds.descr()]
    assert names == [f[0] for f in FIELDS_3D]
    raw = np.load(out, allow_pickle=False)  # the types in the file itself
    for f in FIELDS_3D:
        dt = raw.dtype[f[0]]
        assert (dt.base.kind == "S") if f[1] == "S" else (dt.base.str == f[1]), f
        assert dt.shape == (f[2] if len(f) > 2 else ()), f
    assert len(np.unique(ds["uid"])) == N and ds["uid"].dtype == np.uint64

    idx, paths = _image_refs(parts["rlnImageName"])
    np.testing.assert_array_equal(ds["blob/idx"], idx)
    assert list(ds["blob/path"]) == paths
    assert list(ds["location/micrograph_path"]) == list(parts["rlnMicrographName"])
    g = parts["rlnOpticsGroup"].to_numpy() - 1
    pix = OPTICS["rlnImagePixelSize"].to_numpy()[g]
    np.testing.assert_array_equal(ds["blob/shape"], np.stack([OPTICS["rlnImageSize"][g]] * 2, 1))
    np.testing.assert_array_equal(ds["ctf/exp_group_id"], g + 1)
    np.testing.assert_array_equal(ds["blob/sign"], 1.0)  # RELION particles are white
    # float32 storage: relative rounding at most 6e-8 (measured 5.4e-8); margin 2x
    f32 = dict(rtol=1.2e-7, atol=0)
    np.testing.assert_allclose(ds["blob/psize_A"], pix, **f32)
    np.testing.assert_allclose(ds["alignments3D/psize_A"], pix, **f32)
    np.testing.assert_allclose(ds["ctf/accel_kv"], OPTICS["rlnVoltage"][g], **f32)
    np.testing.assert_allclose(ds["ctf/cs_mm"], OPTICS["rlnSphericalAberration"][g], **f32)
    np.testing.assert_allclose(ds["ctf/amp_contrast"], OPTICS["rlnAmplitudeContrast"][g], **f32)
    np.testing.assert_allclose(ds["ctf/df1_A"], parts["rlnDefocusU"], **f32)
    np.testing.assert_allclose(ds["ctf/df2_A"], parts["rlnDefocusV"], **f32)
    np.testing.assert_allclose(ds["ctf/df_angle_rad"], parts["rlnDefocusAngle"] * np.pi / 180,
                               **f32)
    np.testing.assert_allclose(ds["ctf/phase_shift_rad"], parts["rlnPhaseShift"] * np.pi / 180,
                               **f32)
    np.testing.assert_allclose(ds["ctf/scale"], parts["rlnCtfScalefactor"], **f32)
    np.testing.assert_allclose(ds["ctf/bfactor"], parts["rlnCtfBfactor"], **f32)
    assert set(ds["ctf/type"]) == {"imported"}
    # shifts: px of the pixel size, same sign as rlnOriginX/YAngst
    # float32 rounding of px and psize: measured 9.0e-8 relative; margin 3x
    shift_a = ds["alignments3D/shift"].astype(np.float64) * ds["alignments3D/psize_A"][:, None]
    np.testing.assert_allclose(shift_a, parts[["rlnOriginXAngst", "rlnOriginYAngst"]],
                               rtol=3e-7, atol=0)
    # poses, converted back independently: scipy's R(pose) is RELION's A^T
    r = Rotation.from_rotvec(ds["alignments3D/pose"].astype(np.float64)).as_matrix()
    a = euler_to_matrix(parts["rlnAngleRot"], parts["rlnAngleTilt"], parts["rlnAnglePsi"])
    # float32 pose (|v| <= pi, here up to pi itself): measured 9.4e-8; margin 3x
    np.testing.assert_allclose(r, np.swapaxes(a, 1, 2), atol=3e-7)
    np.testing.assert_array_equal(ds["alignments3D/split"], parts["rlnRandomSubset"] - 1)
    np.testing.assert_array_equal(ds["alignments3D/class"], parts["rlnClassNumber"] - 1)
    np.testing.assert_allclose(ds["alignments3D/class_posterior"],
                               parts["rlnMaxValueProbDistribution"], **f32)


def _read_back(out) -> tuple[pd.DataFrame, pd.DataFrame]:
    notes: list[str] = []
    optics, parts = cs_to_relion(read_cs(out), str(out), notes=notes)
    assert notes == []
    return optics, parts


def test_round_trip_keeps_every_converted_value(tmp_path):
    parts = make_particles(seed=1)
    star, out = _export(tmp_path, parts)
    optics_b, back = _read_back(out)
    assert len(back) == N
    idx, paths = _image_refs(parts["rlnImageName"])
    idx_b, paths_b = _image_refs(back["rlnImageName"])
    np.testing.assert_array_equal(idx_b, idx)
    assert paths_b == paths
    assert back["rlnMicrographName"].tolist() == parts["rlnMicrographName"].tolist()
    # optics: same per-particle microscope values and the same partition into groups
    g = parts["rlnOpticsGroup"].to_numpy() - 1
    gb = back["rlnOpticsGroup"].to_numpy() - 1
    assert len(optics_b) == 2 and len(set(zip(g, gb, strict=True))) == 2
    for label in ("rlnVoltage", "rlnSphericalAberration", "rlnAmplitudeContrast",
                  "rlnImagePixelSize", "rlnImageSize"):
        # float32 (the reader rounds the pixel size to 6 decimals, as written): measured
        # 1.8e-8 relative; bound 6e-8, margin 2x
        np.testing.assert_allclose(optics_b[label].to_numpy()[gb], OPTICS[label].to_numpy()[g],
                                   rtol=2e-7, atol=0, err_msg=label)
    f32 = dict(rtol=1.2e-7, atol=0)  # float32 rounding: measured 5.4e-8; margin 2x
    for label in ("rlnDefocusU", "rlnDefocusV", "rlnCtfBfactor", "rlnCtfScalefactor",
                  "rlnMaxValueProbDistribution"):
        np.testing.assert_allclose(back[label], parts[label], **f32, err_msg=label)
    # radians in float32, back to degrees: measured 5.7e-6 deg; margin 3.5x
    for label in ("rlnDefocusAngle", "rlnPhaseShift"):
        np.testing.assert_allclose(back[label], parts[label], rtol=0, atol=2e-5, err_msg=label)
    # px in float32 times the float32 pixel size: measured 1.0e-7 relative; margin 4x
    for label in ("rlnOriginXAngst", "rlnOriginYAngst"):
        np.testing.assert_allclose(back[label], parts[label], rtol=4e-7, atol=0)
    for label in ("rlnRandomSubset", "rlnClassNumber"):
        assert back[label].tolist() == parts[label].tolist(), label
    # angles as rotation matrices (Euler angles are not unique, e.g. at tilt 0 and 180)
    a = euler_to_matrix(parts["rlnAngleRot"], parts["rlnAngleTilt"], parts["rlnAnglePsi"])
    ab = euler_to_matrix(back["rlnAngleRot"], back["rlnAngleTilt"], back["rlnAnglePsi"])
    np.testing.assert_allclose(ab, a, atol=3.5e-7)  # float32 pose: measured 1.1e-7; margin 3x
    assert "rlnLogLikeliContribution" not in back


def test_round_trip_2d_alignments(tmp_path):
    parts = make_particles(seed=2, two_d=True)
    _, out = _export(tmp_path, parts)
    raw = np.load(out, allow_pickle=False)
    assert not any(f.startswith("alignments3D/") for f in raw.dtype.names)
    assert raw.dtype["alignments2D/pose"].shape == ()  # one in-plane angle (rad)
    assert "alignments2D/split" not in raw.dtype.names  # no rlnRandomSubset in the STAR
    np.testing.assert_allclose(raw["alignments2D/pose"], np.deg2rad(parts["rlnAnglePsi"]),
                               rtol=1.2e-7)  # float32: measured 3.7e-8; margin 3x
    _, back = _read_back(out)
    assert "rlnAngleRot" not in back and "rlnRandomSubset" not in back
    d = (back["rlnAnglePsi"] - parts["rlnAnglePsi"] + 180) % 360 - 180
    np.testing.assert_allclose(d, 0, atol=1e-5)  # float32 radians: measured 2.7e-6 deg; 3.5x
    assert back["rlnClassNumber"].tolist() == parts["rlnClassNumber"].tolist()
    # float32 px and pixel size: measured 8.5e-8 relative; margin 3.5x
    np.testing.assert_allclose(back["rlnOriginXAngst"], parts["rlnOriginXAngst"], rtol=3e-7)


def _bad(tmp_path, capsys, argv, pattern):
    before = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*"))
    assert main(["export", *argv]) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and err.startswith("cryomap export: error: "), err
    assert re.search(pattern, err), err
    assert sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("*")) == before


@pytest.mark.parametrize("label, value, pattern", [
    ("rlnAngleTilt", np.nan, r"data_particles, row 4: rlnAngleTilt = nan; expected a finite"),
    ("rlnOriginXAngst", np.inf, r"row 4: rlnOriginXAngst = inf; expected a finite"),
    ("rlnOriginYAngst", 1e300, r"particle 4: alignments3D/shift = .*float32's range"),
    ("rlnDefocusU", np.nan, r"row 4: rlnDefocusU = nan"),
    ("rlnMaxValueProbDistribution", np.nan,
     r"row 4: rlnMaxValueProbDistribution = nan; expected a finite number"),
    ("rlnMaxValueProbDistribution", 1.5,
     r"row 4: rlnMaxValueProbDistribution = 1\.5; expected a number in \[0, 1\]"),
    ("rlnRandomSubset", 3, r"row 4: rlnRandomSubset = 3; expected a whole number in \[1, 2\]"),
    ("rlnClassNumber", 0, r"row 4: rlnClassNumber = 0; expected a whole number in \[1, "),
])
def test_bad_values(tmp_path, capsys, label, value, pattern):
    parts = make_particles()
    parts[label] = parts[label].astype(np.float64)
    parts.loc[3, label] = value
    write_particles(tmp_path / "in.star", OPTICS, parts)
    _bad(tmp_path, capsys, ["--i", str(tmp_path / "in.star"),
                            "--o", str(tmp_path / "Export" / "p.cs")], pattern)


def test_bad_inputs(tmp_path, capsys):
    star = tmp_path / "in.star"
    write_particles(star, OPTICS, make_particles())
    out = str(tmp_path / "Export" / "p.cs")
    _bad(tmp_path, capsys, ["--i", str(tmp_path / "none.star"), "--o", out],
         r"none\.star: file not found")
    no_names = tmp_path / "no_names.star"
    write_particles(no_names, OPTICS, make_particles().drop(columns="rlnImageName"))
    _bad(tmp_path, capsys, ["--i", str(no_names), "--o", out],
         r"no_names\.star: data_particles has no rlnImageName column")
    _bad(tmp_path, capsys, ["--i", str(star), "--o", str(tmp_path / "p.star")],
         r"--o .*p\.star: expected a file name ending in \.cs")
    _bad(tmp_path, capsys, ["--i", str(star), "--o", str(star) + "/p.cs"],
         r"--o .*in\.star: exists and is not a folder")
    (tmp_path / "dir.cs").mkdir()
    _bad(tmp_path, capsys, ["--i", str(star), "--o", str(tmp_path / "dir.cs")],
         r"--o .*dir\.cs: is a folder; expected a file name")
    _bad(tmp_path, capsys, ["--i", str(tmp_path / "dir.cs"), "--o", out],
         r"--i .*dir\.cs: a cryoSPARC file; expected a RELION particle STAR file")
    assert read_star(star)  # the input is untouched and still readable


def test_unwritable_output_leaves_nothing(tmp_path, capsys, monkeypatch):
    """A write that fails (disk full, no permission) leaves no file and no temporary."""
    star = tmp_path / "in.star"
    write_particles(star, OPTICS, make_particles())

    def fail(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "save", fail)
    _bad(tmp_path, capsys, ["--i", str(star), "--o", str(tmp_path / "p.cs")],
         r"p\.cs: cannot write \(No space left on device\)")
