"""`cryomap select` (cryomap.select): by class, by a column, and --auto's ranking of 2D
classes, on a synthetic classification and end to end on a class2d run with junk picks."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cryomap.errors import InputError
from cryomap.io.mrc import write_stack
from cryomap.io.star import read_star, write_star
from cryomap.particles import make_optics_table, write_particles
from cryomap.select import (
    MAX_LIKELIHOOD_DEVIATION,
    centring,
    likelihood_outliers,
    rank_classes,
    select_rows,
)

BOX, PIX = 48, 4.0


def cryomap(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cryomap", *args], cwd=cwd,
                          capture_output=True, text=True)


def _blob(cx: float = 0.0, cy: float = 0.0, sigma: float = 5.0) -> np.ndarray:
    y, x = np.mgrid[:BOX, :BOX] - BOX // 2
    return np.exp(-((x - cx) ** 2 + (y - cy) ** 2) / (2 * sigma**2))


def _edge() -> np.ndarray:
    x = np.mgrid[:BOX, :BOX][1] - BOX // 2
    return np.tanh((x - 5.0) / 2.0)


@pytest.fixture
def classification(tmp_path: Path) -> Path:
    """A 2D classification's outputs: four classes (a centred particle, a carbon edge, an
    off-centre blob, a centred particle at poor resolution) and six particles per class."""
    averages = np.stack([_blob(), _edge(), _blob(12.0, 0.0), _blob(sigma=4.0)])
    write_stack(tmp_path / "run_it010_classes.mrcs", averages.astype(np.float32), PIX)
    classes = pd.DataFrame({
        "rlnReferenceImage": [f"{k:06d}@run_it010_classes.mrcs" for k in range(1, 5)],
        "rlnClassDistribution": [0.25] * 4,
        "rlnEstimatedResolution": [12.0, 13.0, 12.5, 30.0]})
    write_star(tmp_path / "run_it010_model.star", {"model_classes": classes})
    particles = pd.DataFrame({
        "rlnImageName": [f"{i + 1:06d}@particles.mrcs" for i in range(24)],
        "rlnClassNumber": np.repeat([1, 2, 3, 4], 6),
        "rlnMaxValueProbDistribution": np.linspace(0.1, 0.9, 24),
        "rlnOpticsGroup": 1})
    write_particles(tmp_path / "run_it010_data.star", make_optics_table(PIX, BOX), particles)
    return tmp_path


def test_centring_measures_where_the_signal_is() -> None:
    share, offset = centring(_blob(), 15.0)
    # measured share 1 - 8.7e-5 (10x margin on the shortfall), offset 2.4e-19 (float rounding)
    assert share > 0.999 and offset < 1e-15
    share, offset = centring(_blob(14.0, 0.0), 15.0)
    assert 0.2 < offset < 14.0 / BOX  # measured 0.258: the ring's mean takes part of the blob
    share, _ = centring(_edge(), 15.0)
    assert share < 0.4  # measured 0.348 (15 % margin): a step spreads over the whole box


def test_likelihood_outliers_are_robust_low_deviations() -> None:
    """Drop exactly the rows more than MAX_LIKELIHOOD_DEVIATION robust standard deviations
    (1.4826 x MAD) below the median; high values, a missing column and no spread drop
    nothing."""
    ll = np.array([100.0, 101.0, 99.0, 102.0, 98.0, 100.5, 99.5, 150.0, 0.0, 95.0])
    median = np.median(ll)
    scale = 1.4826 * np.median(np.abs(ll - median))
    want = ll < median - MAX_LIKELIHOOD_DEVIATION * scale
    assert want.tolist() == [False] * 8 + [True, False]  # 0.0 only; 95 is 2.1 sigma below
    got = likelihood_outliers(pd.DataFrame({"rlnLogLikeliContribution": ll}))
    assert got.tolist() == want.tolist()
    assert not likelihood_outliers(pd.DataFrame({"rlnX": ll})).any()
    assert not likelihood_outliers(pd.DataFrame({"rlnLogLikeliContribution": [5.0] * 4})).any()


def test_rank_classes(classification: Path) -> None:
    star = classification / "run_it010_data.star"
    particles = read_star(star)["particles"]
    ranks = rank_classes(star, particles, radius_px=15.0)
    assert [r.keep for r in ranks] == [True, False, False, False]
    assert "within the particle" in ranks[1].reason
    assert "off-centre" in ranks[2].reason
    assert "resolution 30.0" in ranks[3].reason


def test_select_rows_by_class_and_column(classification: Path) -> None:
    particles = read_star(classification / "run_it010_data.star")["particles"]
    keep = select_rows(particles, "f.star", classes=[1, 3])
    np.testing.assert_array_equal(np.flatnonzero(keep), np.r_[0:6, 12:18])
    keep = select_rows(particles, "f.star", column="rlnMaxValueProbDistribution", minimum=0.5)
    assert keep.sum() == np.count_nonzero(np.linspace(0.1, 0.9, 24) >= 0.5)
    with pytest.raises(InputError, match="f.star: class.*7"):
        select_rows(particles, "f.star", classes=[7])
    with pytest.raises(InputError, match="no column rlnNope"):
        select_rows(particles, "f.star", column="rlnNope", minimum=0.0)


def test_cli_select_auto_and_classes(classification: Path) -> None:
    r = cryomap("select", "--i", "run_it010_data.star", "--o", "sel/particles.star", "--auto",
                "--particle_diameter", "120", cwd=classification)
    assert r.returncode == 0, r.stderr
    assert "class   2:      6 particles, dropped" in r.stdout
    kept = read_star(classification / "sel" / "particles.star")["particles"]
    assert set(kept["rlnClassNumber"]) == {1} and len(kept) == 6
    r = cryomap("select", "--i", "run_it010_data.star", "--o", "two.star", "--classes", "2",
                "4", cwd=classification)
    assert r.returncode == 0, r.stderr
    assert len(read_star(classification / "two.star")["particles"]) == 12


@pytest.mark.parametrize("extra, words", [
    (("--classes", "9"), ("run_it010_data.star", "9")),
    (("--select", "rlnNope", "--minval", "1"), ("rlnNope",)),
    ((), ("--classes", "--auto")),
    (("--minval", "2"), ("--select",)),
])
def test_cli_select_bad_input(classification: Path, extra, words) -> None:
    r = cryomap("select", "--i", "run_it010_data.star", "--o", "bad.star", *extra,
                cwd=classification)
    assert r.returncode == 2 and r.stdout == ""
    line = r.stderr.strip()
    assert "\n" not in line and "Traceback" not in line
    for w in words:
        assert w in line
    assert not (classification / "bad.star").exists()


def test_auto_on_a_class2d_run_with_junk(tmp_path: Path) -> None:
    """600 picks of which a fifth are junk (box 48, SNR 0.3), eight 2D classes: --auto drops
    most junk and keeps the particles."""
    assert cryomap("simulate", "--o", "sim", "--n", "600", "--box", str(BOX), "--angpix",
                   str(PIX), "--snr", "0.3", "--junk_fraction", "0.2", "--seed", "2",
                   cwd=tmp_path).returncode == 0
    r = cryomap("class2d", "--i", "sim/particles.star", "--o", "c2d", "--K", "8", "--iter",
                "15", "--particle_diameter", "150", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    r = cryomap("select", "--i", "c2d/run_it015_data.star", "--o", "sel.star", "--auto",
                cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    truth = read_star(tmp_path / "sim" / "truth.star")["particles"]
    kept = set(read_star(tmp_path / "sel.star")["particles"]["rlnImageName"])
    junk = truth["rlnClassNumber"].to_numpy() == 0
    in_kept = truth["rlnImageName"].isin(kept).to_numpy()
    # measured 0.088 (10 of 113 junk picks; 0.21 without the log-likelihood test); margin
    # 2 picks
    assert in_kept[junk].mean() <= 0.11
    assert (~in_kept[~junk]).mean() <= 0.02  # measured 0.006 (3 of 487); margin 7 particles
