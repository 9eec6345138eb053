"""cryomap.io.star: faithful RELION STAR round trips, RELION's layout, atomic writes, errors."""

from __future__ import annotations

import math
import pathlib

import numpy as np
import pandas as pd
import pytest

from cryomap.errors import InputError
from cryomap.io.star import read_star, write_star


def relion_block(name: str, labels: list[str], rows: list[list[str]]) -> str:
    """One loop block exactly as RELION 3.1 writes it (MetaDataTable::write): trailing spaces
    after `loop_` and each label, right-aligned values, a whitespace-only line at the end."""
    out = ["", "# version 30001", "", f"data_{name}", "", "loop_ "]
    out += [f"_{label} #{i} " for i, label in enumerate(labels, 1)]
    out += [" ".join(f"{v:>12}" for v in row) + " " for row in rows]
    out += [" ", ""]
    return "\n".join(out)


# A RELION 3.1 particle file with an unknown label and a quoted string with a space.
RELION31 = relion_block(
    "optics",
    ["rlnOpticsGroupName", "rlnOpticsGroup", "rlnMicrographOriginalPixelSize", "rlnVoltage",
     "rlnSphericalAberration", "rlnAmplitudeContrast", "rlnImagePixelSize", "rlnImageSize",
     "rlnImageDimensionality"],
    [["opticsGroup1", "1", "0.885000", "300.000000", "2.700000", "0.100000", "1.770000",
      "16", "2"]],
) + relion_block(
    "particles",
    ["rlnCoordinateX", "rlnCoordinateY", "rlnImageName", "rlnMicrographName", "rlnOpticsGroup",
     "rlnDefocusU", "rlnDefocusV", "rlnDefocusAngle", "rlnFooBar", "rlnAngleRot",
     "rlnOriginXAngst", "rlnRandomSubset"],
    [["1022.000000", "711.000000", "000001@Extract/job007/mics/m1.mrcs",
      '"MotionCorr/job002/mic one.mrc"', "1", "24539.519531", "24128.394531", "37.950000",
      "1.000000e-08", "-12.5", "1.770000", "1"],
     ["860.000000", "1144.000000", "000002@Extract/job007/mics/m1.mrcs",
      "MotionCorr/job002/0001", "1", "25003.000000", "24872.000000", "37.950000", "7.500000",
      "170.25", "-3.540000", "2"]],
)


def _write(tmp_path, text, name="in.star"):
    path = tmp_path / name
    path.write_text(text)
    return path


def test_read_relion31(tmp_path):
    blocks = read_star(_write(tmp_path, RELION31))
    assert list(blocks) == ["optics", "particles"]
    optics, parts = blocks["optics"], blocks["particles"]
    assert len(optics) == 1 and len(parts) == 2
    assert optics["rlnImageSize"].iloc[0] == 16
    assert optics["rlnImagePixelSize"].iloc[0] == pytest.approx(1.77)  # measured 0 (parsed)
    assert parts["rlnImageName"].tolist() == ["000001@Extract/job007/mics/m1.mrcs",
                                              "000002@Extract/job007/mics/m1.mrcs"]
    # quoted string with a space; all-digit string label stays a string
    assert parts["rlnMicrographName"].tolist() == ["MotionCorr/job002/mic one.mrc",
                                                   "MotionCorr/job002/0001"]
    assert parts["rlnFooBar"].tolist() == [1e-8, 7.5]
    assert parts["rlnDefocusU"].iloc[0] == 24539.519531
    assert parts["rlnRandomSubset"].tolist() == [1, 2]


def test_round_trip_keeps_all_columns_and_values(tmp_path):
    src = read_star(_write(tmp_path, RELION31))
    out = tmp_path / "out.star"
    write_star(out, src)
    back = read_star(out)
    assert list(back) == list(src)
    for name in src:
        assert list(back[name].columns) == list(src[name].columns)
        pd.testing.assert_frame_equal(back[name], src[name])
    # tiny values are not rounded away (starfile's default '%.6f' would write 0.000000)
    assert back["particles"]["rlnFooBar"].iloc[0] == 1e-8


def test_written_layout_is_relions(tmp_path):
    out = tmp_path / "out.star"
    write_star(out, read_star(_write(tmp_path, RELION31)))
    text = out.read_text()
    lines = text.splitlines()
    assert lines[:8] == ["", "# version 30001", "", "data_optics", "", "loop_",
                         "_rlnOpticsGroupName #1", "_rlnOpticsGroup #2"]
    assert text.count("# version 30001") == 2
    assert text.index("data_optics") < text.index("data_particles")
    assert "_rlnFooBar #9\n" in text
    assert "_rlnRandomSubset #12\n" in text
    assert '"MotionCorr/job002/mic one.mrc"' in text  # quoted: it contains a space
    assert "starfile" not in text  # no foreign banner
    # each loop ends with an empty line (RELION stops reading a loop there)
    particle_rows = [ln for ln in lines if "@Extract" in ln]
    assert len(particle_rows) == 2
    after = lines[lines.index(particle_rows[-1]) + 1]
    assert after.strip() == ""
    assert "1e-08" in particle_rows[0].split()  # exact, not 0.000000


def test_list_block_round_trip(tmp_path):
    blocks = {
        "general": {"rlnFinalResolution": 3.2, "rlnBfactorUsedForSharpening": -80.5,
                    "rlnNrClasses": np.int64(3), "rlnMaskName": "Mask/job001/my mask.mrc",
                    "rlnPixelSize": np.float64(1.06), "rlnEmpty": ""},
        "fsc": pd.DataFrame({"rlnSpectralIndex": [0, 1, 2],
                             "rlnFourierShellCorrelation": [1.0, 0.99, 0.5]}),
    }
    path = tmp_path / "post.star"
    write_star(path, blocks)
    text = path.read_text()
    assert "\n_rlnMaskName" in text and '"Mask/job001/my mask.mrc"' in text
    back = read_star(path)
    assert back["general"] == {"rlnFinalResolution": 3.2, "rlnBfactorUsedForSharpening": -80.5,
                               "rlnNrClasses": 3, "rlnMaskName": "Mask/job001/my mask.mrc",
                               "rlnPixelSize": 1.06, "rlnEmpty": ""}
    pd.testing.assert_frame_equal(back["fsc"], blocks["fsc"])


def test_float32_nan_and_empty_loop(tmp_path):
    df = pd.DataFrame({"rlnA": np.array([0.1, 2.5], dtype=np.float32),
                       "rlnB": [np.nan, 1.0]})
    empty = pd.DataFrame({"rlnC": pd.Series([], dtype=np.float64)})
    path = tmp_path / "x.star"
    write_star(path, {"a": df, "empty": empty})
    text = path.read_text()
    assert "0.1\t" in text and "0.10000000149" not in text
    assert "nan" in text and "<NA>" not in text
    back = read_star(path)
    assert back["a"]["rlnA"].tolist() == [0.1, 2.5]
    assert math.isnan(back["a"]["rlnB"].iloc[0])
    assert len(back["empty"]) == 0 and list(back["empty"].columns) == ["rlnC"]


def test_relion30_unnamed_block(tmp_path):
    text = ("\ndata_\n\nloop_\n_rlnImageName #1\n_rlnVoltage #2\n"
            "1@s.mrcs 300\n2@s.mrcs 300\n\n")
    blocks = read_star(_write(tmp_path, text))
    assert list(blocks) == [""]
    assert blocks[""]["rlnVoltage"].tolist() == [300, 300]


def test_write_is_atomic(tmp_path, monkeypatch):
    path = tmp_path / "p.star"
    write_star(path, {"a": pd.DataFrame({"rlnX": [1, 2]})})
    before = path.read_text()

    real = pathlib.Path.write_text

    def failing_write_text(self, data, *args, **kwargs):
        real(self, data[: len(data) // 2])  # half written...
        raise OSError("disk full")  # ...then the write fails

    monkeypatch.setattr(pathlib.Path, "write_text", failing_write_text)
    # an OS error while writing is one line naming the file (InputError), not a traceback
    with pytest.raises(InputError, match=r"p\.star: cannot write \(disk full\)"):
        write_star(path, {"a": pd.DataFrame({"rlnX": [7, 8, 9]})})
    monkeypatch.undo()
    assert path.read_text() == before
    assert [p.name for p in tmp_path.iterdir()] == ["p.star"]  # temp file removed


def test_missing_file(tmp_path):
    with pytest.raises(InputError, match=r"nope\.star: file not found"):
        read_star(tmp_path / "nope.star")


def test_not_a_star_file(tmp_path):
    path = tmp_path / "junk.star"
    path.write_bytes(b"\x00\x01binary\xff\xfe" * 50)
    with pytest.raises(InputError, match=r"junk\.star: not a STAR file \(no data_ block"):
        read_star(path)


def test_unparsable_block(tmp_path):
    # a list block line with two values: starfile cannot split it into label + value
    path = _write(tmp_path, "data_general\n\n_rlnA 1 2\n")
    with pytest.raises(InputError, match=r"in\.star: cannot parse as a STAR file"):
        read_star(path)
    # a data_ block with neither loop_ nor labels
    path = _write(tmp_path, "data_general\n\n", name="empty_block.star")
    with pytest.raises(InputError, match=r"empty_block\.star: cannot parse as a STAR file"):
        read_star(path)


def test_bad_block_type(tmp_path):
    with pytest.raises(ValueError, match="data_x"):
        write_star(tmp_path / "x.star", {"x": [1, 2, 3]})


def test_float_formatting_keeps_type_and_relion_precision(tmp_path):
    df = pd.DataFrame({"rlnVoltage": [300.0, 200.0], "rlnX": [1.0 / 3.0, 24539.519531],
                       "rlnN": [1, 2]})
    path = tmp_path / "f.star"
    write_star(path, {"a": df, "general": {"rlnPixelSize": 2.0, "rlnTau2FudgeFactor": 4}})
    text = path.read_text()
    assert "300.0\t" in text  # integral floats stay floats on re-reading
    assert "0.333333333333\t" in text  # 12 significant digits, not 17
    assert "_rlnPixelSize\t\t\t2.0\n" in text
    back = read_star(path)
    assert back["a"]["rlnVoltage"].dtype == np.float64
    assert back["a"]["rlnN"].dtype == np.int64
    assert back["a"]["rlnX"].iloc[1] == 24539.519531
    assert back["general"] == {"rlnPixelSize": 2.0, "rlnTau2FudgeFactor": 4}
    assert isinstance(back["general"]["rlnPixelSize"], float)


def test_numeric_column_names_row_and_field():
    from cryomap.io.star import numeric_column

    df = pd.DataFrame({"rlnDefocusU": ["100.5", " 2e3", "abc", "7"],
                       "rlnAngleRot": [1.0, np.inf, 2.0, 3.0],
                       "rlnX": ["1", "nan", "-inf", "4"]})
    with pytest.raises(InputError, match=r"^f\.star: data_particles, row 3: rlnDefocusU = "
                                         r"'abc' is not a number; expected a number$"):
        numeric_column(df, "rlnDefocusU", "f.star: data_particles")
    np.testing.assert_array_equal(numeric_column(df.iloc[[0, 1, 3]], "rlnDefocusU", "w"),
                                  [100.5, 2000.0, 7.0])
    with pytest.raises(InputError, match=r"row 2: rlnAngleRot = inf; expected a finite"):
        numeric_column(df, "rlnAngleRot", "w")
    with pytest.raises(InputError, match=r"row 2: rlnX = nan; expected a finite"):
        numeric_column(df, "rlnX", "w")
    got = numeric_column(df, "rlnX", "w", finite=False)
    assert np.isnan(got[1]) and got[2] == -np.inf and got[3] == 4.0
    dup = pd.DataFrame([[1, 2]], columns=["rlnA", "rlnA"])
    with pytest.raises(InputError, match="label rlnA appears 2 times"):
        numeric_column(dup, "rlnA", "w")


def test_text_in_numeric_column_read_from_file(tmp_path):
    from cryomap.io.star import numeric_column

    text = relion_block("particles", ["rlnImageName", "rlnDefocusU"],
                        [["1@s.mrcs", "10000"], ["2@s.mrcs", "1O000"]])
    df = read_star(_write(tmp_path, text))["particles"]
    with pytest.raises(InputError, match=r"row 2: rlnDefocusU = '1O000' is not a number"):
        numeric_column(df, "rlnDefocusU", "in.star: data_particles")


def test_as_table_reads_list_blocks_as_one_row():
    from cryomap.io.star import as_table

    t = as_table({"rlnVoltage": 300.0, "rlnImageSize": 64})
    assert list(t.columns) == ["rlnVoltage", "rlnImageSize"] and len(t) == 1
    df = pd.DataFrame({"a": [1]})
    assert as_table(df) is df


def test_corrected_file_is_read_again_after_a_failed_read(tmp_path):
    # starfile caches lines (linecache) and keeps them after a parse error
    path = tmp_path / "x.star"
    path.write_text("\n# version 30001\n\ndata_optics\n\nl")
    with pytest.raises(InputError):
        read_star(path)
    path.write_text(relion_block("optics", ["rlnVoltage"], [["300.0"]]))
    assert read_star(path)["optics"]["rlnVoltage"].tolist() == [300.0]
