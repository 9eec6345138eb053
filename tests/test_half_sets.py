"""An invalid or one-sided rlnRandomSubset is split again at random, with a log line, by every
command that needs two half-sets: refine, class3d --split_halves and reconstruct
(em.refine.split_halves; docs/conventions.md, "Half sets")."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cryomap.cli.main import main
from cryomap.io.star import read_star, write_star

BOX, PIX, N = 24, 7.0, 60
FAST = ["--healpix_order", "1", "--offset_range", "1", "--offset_step", "1",
        "--ini_high", "40", "--particle_diameter", "140", "--j", "2"]


@pytest.fixture(scope="module")
def sim(phantom_set) -> Path:
    return phantom_set("halves", BOX, PIX, N, seed=4)


def _with_subsets(sim: Path, name: str, values) -> str:
    blocks = read_star(sim / "truth.star")
    blocks["particles"]["rlnRandomSubset"] = values
    write_star(sim / name, blocks)
    return str(sim / name)


def _halves(star: Path) -> np.ndarray:
    return read_star(star)["particles"]["rlnRandomSubset"].to_numpy()


def test_refine_resplits_a_one_sided_set(sim, tmp_path):
    star = _with_subsets(sim, "ones.star", np.ones(N, int))
    out = tmp_path / "r"
    assert main(["refine", "--i", star, "--ref", str(sim / "ref.mrc"), "--o", str(out),
                 "--iter", "1"] + FAST) == 0
    log = (out / "run.log").read_text()
    assert "rlnRandomSubset is 1 for every particle" in log and "split at random" in log
    halves = _halves(out / "run_data.star")
    assert sorted(np.bincount(halves)[1:].tolist()) == [N // 2, N - N // 2]


@pytest.mark.parametrize("values, reason", [
    ([3] + [1, 2] * ((N - 1) // 2) + [1], "row 1: rlnRandomSubset = 3"),
    ([0] + [1, 2] * ((N - 1) // 2) + [1], "row 1: rlnRandomSubset = 0 while other"),
])
def test_reconstruct_resplits_invalid_values(sim, tmp_path, capsys, values, reason):
    star = _with_subsets(sim, "bad.star", values)
    assert main(["reconstruct", "--i", star, "--o", str(tmp_path / "m.mrc")]) == 0
    out = capsys.readouterr().out
    assert reason in out and "split at random" in out
    assert (tmp_path / "m_half1.mrc").exists() and (tmp_path / "m_half2.mrc").exists()


def test_class3d_split_halves_resplits_a_one_sided_set(sim, tmp_path):
    from cryomap.em.classify import ClassOptions
    from cryomap.jobs.classify import classify3d

    star = _with_subsets(sim, "twos.star", np.full(N, 2))
    out = tmp_path / "c"
    options = ClassOptions(iterations=1, n_classes=2, healpix_order=1, offset_range=1.0,
                           offset_step=1.0, ini_high=40.0, particle_diameter=140.0,
                           split_halves=True, tau2_fudge=1.0, class_temperature=1.0)
    state = classify3d(star, sim / "ref.mrc", out, options, echo=None)
    log = (out / "run.log").read_text()
    assert "rlnRandomSubset is 2 for every particle" in log and "split at random" in log
    assert sorted(np.bincount(state.subset)[1:].tolist()) == [N // 2, N - N // 2]


def test_valid_subsets_are_kept(sim, tmp_path):
    values = np.arange(N) % 2 + 1
    star = _with_subsets(sim, "valid.star", values)
    out = tmp_path / "r"
    assert main(["refine", "--i", star, "--ref", str(sim / "ref.mrc"), "--o", str(out),
                 "--iter", "1"] + FAST) == 0
    assert "split at random" not in (out / "run.log").read_text()
    np.testing.assert_array_equal(_halves(out / "run_data.star"), values)
