"""`cryomap star` (relion_star_handler's --select, --combine, --split) on metadata-only
particle files (no stacks): subsets equal a pandas filter, merges renumber optics groups and
keep every column, splits partition the rows, and bad input is one line with nothing written."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cryomap.cli.main import main
from cryomap.io.star import read_star, write_star
from cryomap.particles import make_optics_table

N = 10


def _particles(n: int, seed: int, stack: str = "p.mrcs") -> pd.DataFrame:
    rng = np.random.default_rng(seed)
    return pd.DataFrame({
        "rlnImageName": [f"{i + 1:06d}@{stack}" for i in range(n)],
        "rlnDefocusU": rng.uniform(10000, 20000, n).round(2),
        "rlnClassNumber": np.arange(n) % 3 + 1,
        "rlnOpticsGroup": np.ones(n, np.int64),
        "rlnGroupNumber": np.ones(n, np.int64),
        "rlnMyUnknownLabel": [f"tag{i}" for i in range(n)],  # not a RELION label: kept
    })


def _write(path: Path, optics: pd.DataFrame, particles: pd.DataFrame) -> Path:
    write_star(path, {"optics": optics, "particles": particles})
    return path


@pytest.fixture
def star(tmp_path) -> Path:
    """A particle file whose stack does not exist (the tools never read images)."""
    return _write(tmp_path / "in.star", make_optics_table(1.0, 64), _particles(N, 1))


def _files(root: Path) -> dict[Path, float]:
    return {p: p.stat().st_mtime_ns for p in root.rglob("*")}


def test_select_keeps_the_rows_a_pandas_filter_keeps(star, tmp_path):
    df = read_star(star)["particles"]
    lo, hi = np.percentile(df["rlnDefocusU"], [30, 70])
    assert main(["star", "--i", str(star), "--o", str(tmp_path / "sel" / "o.star"),
                 "--select", "rlnDefocusU", "--minval", str(lo), "--maxval", str(hi)]) == 0
    got = read_star(tmp_path / "sel" / "o.star")
    expect = df[(df["rlnDefocusU"] >= lo) & (df["rlnDefocusU"] <= hi)].reset_index(drop=True)
    assert 0 < len(expect) < N
    pd.testing.assert_frame_equal(got["particles"], expect)
    pd.testing.assert_frame_equal(got["optics"], read_star(star)["optics"])
    assert main(["star", "--i", str(star), "--o", str(tmp_path / "c.star"),
                 "--classes", "1,3"]) == 0
    got = read_star(tmp_path / "c.star")["particles"]
    expect = df[df["rlnClassNumber"].isin([1, 3])].reset_index(drop=True)
    pd.testing.assert_frame_equal(got, expect)


def test_combine_renumbers_optics_groups_and_keeps_every_column(tmp_path, capsys):
    a_optics = make_optics_table(1.0, 64)
    b_optics = make_optics_table(1.3, 64, voltage=200.0)  # also named opticsGroup1
    b_optics["rlnBeamTiltX"], b_optics["rlnBeamTiltY"] = 0.5, -0.25
    a = _write(tmp_path / "a.star", a_optics, _particles(N, 1, "a.mrcs"))
    b = _write(tmp_path / "b.star", b_optics, _particles(7, 2, "b.mrcs"))
    # the first half of a again, optics unchanged: joined to a's group, as RELION joins
    c = _write(tmp_path / "c.star", a_optics, _particles(N, 1, "a.mrcs").iloc[:4])
    out = tmp_path / "merged.star"
    assert main(["star", "--combine", str(a), str(b), str(c), "--o", str(out),
                 "--check_duplicates", "rlnImageName"]) == 0
    printed = capsys.readouterr().out
    assert "renamed opticsGroup1_2" in printed and "4 row(s) repeat" in printed
    merged = read_star(out)
    optics, particles = merged["optics"], merged["particles"]
    assert list(optics["rlnOpticsGroupName"]) == ["opticsGroup1", "opticsGroup1_2"]
    assert list(optics["rlnOpticsGroup"]) == [1, 2]
    assert list(optics["rlnImagePixelSize"]) == [1.0, 1.3]
    # RELION's defaults where a lacked the beam tilt: 0
    assert list(optics["rlnBeamTiltX"]) == [0.0, 0.5] and list(optics["rlnBeamTiltY"]) == \
        [0.0, -0.25]
    assert len(particles) == N + 7 + 4
    stacks = particles["rlnImageName"].str.partition("@")[2]
    assert (particles["rlnOpticsGroup"][stacks == "a.mrcs"] == 1).all()
    assert (particles["rlnOpticsGroup"][stacks == "b.mrcs"] == 2).all()
    assert "rlnGroupNumber" not in particles  # RELION drops it: the numbers collide
    inputs = pd.concat([read_star(p)["particles"] for p in (a, b, c)], ignore_index=True)
    for column in ("rlnImageName", "rlnDefocusU", "rlnClassNumber", "rlnMyUnknownLabel"):
        pd.testing.assert_series_equal(particles[column], inputs[column])


def test_split_partitions_the_rows(star, tmp_path):
    ids = list(read_star(star)["particles"]["rlnMyUnknownLabel"])

    def split(folder: str, *extra: str) -> list[list[str]]:
        out = tmp_path / folder / "part.star"
        assert main(["star", "--i", str(star), "--o", str(out), "--split", *extra]) == 0
        names = sorted(out.parent.glob("part_split*.star"))
        assert [p.name for p in names] == [f"part_split{k}.star" for k in
                                           range(1, len(names) + 1)]
        return [list(read_star(p)["particles"]["rlnMyUnknownLabel"]) for p in names]

    plain = split("plain", "--nr_split", "3")
    assert [len(p) for p in plain] == [4, 3, 3]  # sizes differ by at most one
    assert sum(plain, []) == ids  # in file order without --random_order
    shuffled = split("s7", "--nr_split", "3", "--random_order", "--random_seed", "7")
    assert sorted(sum(shuffled, [])) == sorted(ids) and sum(shuffled, []) != ids
    assert split("s7b", "--nr_split", "3", "--random_order", "--random_seed", "7") == shuffled
    assert split("s8", "--nr_split", "3", "--random_order", "--random_seed", "8") != shuffled
    sized = split("sized", "--size_split", "4")
    assert [len(p) for p in sized] == [4, 4, 2] and sum(sized, []) == ids
    assert split("both", "--nr_split", "2", "--size_split", "3") == [ids[:3], ids[3:6]]


def _bad_cases(star: Path, tmp: Path) -> list[tuple[list[str], list[str]]]:
    """(arguments, words the message must hold)."""
    out = str(tmp / "out" / "o.star")
    (tmp / "a_file").write_text("x")
    legacy = tmp / "legacy.star"  # RELION 3.0: one table, no data_optics
    write_star(legacy, {"": _particles(N, 1)})
    other = _write(tmp / "other.star", make_optics_table(1.0, 64),
                   _particles(N, 3).drop(columns="rlnMyUnknownLabel"))
    no_q0 = _write(tmp / "no_q0.star", make_optics_table(1.0, 64).drop(
        columns="rlnAmplitudeContrast"), _particles(N, 3))
    i = ["--i", str(star)]
    return [
        (["star", *i, "--o", out, "--select", "rlnNoSuchLabel", "--minval", "1"],
         ["rlnNoSuchLabel"]),
        (["star", *i, "--o", out, "--classes", "2,5"], ["5", "hold no particle"]),
        (["star", *i, "--o", out, "--select", "rlnDefocusU", "--minval", "3", "--maxval", "2"],
         ["--minval 3 > --maxval 2"]),
        (["star", *i, "--o", out, "--split", "--nr_split", "1"], ["--nr_split 1", "2..10"]),
        (["star", *i, "--o", out, "--split", "--nr_split", "11"], ["--nr_split 11", "2..10"]),
        (["star", *i, "--o", out, "--split", "--size_split", "4", "--nr_split", "3"],
         ["nr_split x size_split <= 10"]),
        (["star", *i, "--o", str(tmp / "a_file" / "o.star"), "--classes", "1"],
         ["--o", "a_file", "not a folder"]),
        (["star", *i, "--o", str(tmp / "a_file" / "o.star"), "--split", "--nr_split", "2"],
         ["--o", "a_file", "not a folder"]),
        (["star", *i, "--o", str(star), "--classes", "1"], ["the same file"]),
        (["star", "--i", str(legacy), "--o", out, "--classes", "1"], ["no data_optics"]),
        (["star", "--combine", str(star), str(other), "--o", out],
         ["other.star", "rlnMyUnknownLabel"]),
        (["star", "--combine", str(star), str(no_q0), "--o", out],
         ["no_q0.star", "rlnAmplitudeContrast", "no default"]),
        (["star", "--combine", str(star), "--o", out], ["expected two or more"]),
        (["star", *i, "--o", out], ["give one of"]),
        (["star", *i, "--o", out, "--classes", "1", "--split", "--nr_split", "2"],
         ["subset and split"]),
        (["star", *i, "--o", out, "--split", "--nr_split", "2", "--random_seed", "3"],
         ["only with --random_order"]),
    ]


def test_bad_input_is_one_line_and_writes_nothing(star, tmp_path, capsys):
    for argv, words in _bad_cases(star, tmp_path):
        before = _files(tmp_path)
        capsys.readouterr()
        assert main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("cryomap star: error: "), err
        assert "Traceback" not in err
        for word in words:
            assert word in err, (word, err)
        assert _files(tmp_path) == before, argv  # nothing written, --o's folder not made
