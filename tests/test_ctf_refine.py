"""`cryomap ctf_refine` (cryomap.ctf_refine, docs/method.md eq. (31)): the score against a
direct NumPy sum, recovery of known defocus errors, the command and its bad inputs."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from cryomap import atoms
from cryomap.ctf import CtfParams
from cryomap.ctf_refine import _scores, fit_defocus
from cryomap.imperfections import Imperfections
from cryomap.io.mrc import write_map
from cryomap.io.star import read_star
from cryomap.particles import load_particles, write_particles
from cryomap.simulate import simulate_particles, write_simulation

BOX, PIX = 64, 2.0


def cryomap(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "cryomap", *args], cwd=cwd,
                          capture_output=True, text=True)


@pytest.fixture(scope="module")
def refined(tmp_path_factory) -> Path:
    """A refinement's outputs as ctf_refine reads them: run_data.star with the true poses, the
    written (erroneous) defocus and half-sets, and the true map as both unfiltered half maps;
    truth.star beside it."""
    d = tmp_path_factory.mktemp("ctf")
    truth = atoms.molecule_map("octahedral", BOX, PIX, 50.0)
    sim = simulate_particles(truth, PIX, 80, snr=0.5, seed=4, max_shift_px=2.0,
                             defocus_range=(8000.0, 20000.0), astigmatism=800.0,
                             imperfections=Imperfections(ctf_error=300.0))
    write_simulation(d, *sim, pixel_size=PIX)
    _, optics, written, true = sim
    table = written.copy()
    for col in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst",
                "rlnOriginYAngst"):
        table[col] = true[col]
    table["rlnRandomSubset"] = np.arange(len(table)) % 2 + 1
    write_particles(d / "run_data.star", optics, table)
    for h in (1, 2):
        write_map(d / f"run_half{h}_class001_unfil.mrc", truth, PIX)
    return d


def test_score_is_the_weighted_squared_difference() -> None:
    """_scores(Δ) = sum_j |X - C(Δ) A|² / sigma2 minus a constant of Δ."""
    rng = np.random.default_rng(1)
    kx, ky = rng.integers(-20, 21, 50).astype(float), rng.integers(0, 21, 50).astype(float)
    a = rng.normal(size=(2, 50)) + 1j * rng.normal(size=(2, 50))
    x = rng.normal(size=(2, 50)) + 1j * rng.normal(size=(2, 50))
    w = rng.uniform(0.5, 2.0, size=(2, 50))
    params = CtfParams(defocus_u=np.array([12000.0, 15000.0]),
                       defocus_v=np.array([11500.0, 14000.0]),
                       defocus_angle=np.array([20.0, 70.0]))
    deltas = np.array([[-300.0, 0.0, 250.0], [100.0, 0.0, -50.0]])
    got = _scores(params, deltas, kx, ky, BOX, PIX, w * (np.conj(a) * x).real,
                  w * np.abs(a) ** 2)
    for b in range(2):
        for g in range(3):
            c = CtfParams(defocus_u=params.defocus_u[b:b + 1] + deltas[b, g],
                          defocus_v=params.defocus_v[b:b + 1] + deltas[b, g],
                          defocus_angle=params.defocus_angle[b:b + 1]).evaluate(
                              kx, ky, BOX, PIX)[0]
            want = np.sum(w[b] * np.abs(x[b] - c * a[b]) ** 2) - np.sum(w[b] * np.abs(x[b]) ** 2)
            # float rounding: measured 1.2e-15 at most
            assert got[b, g] == pytest.approx(want, rel=1e-13)


def test_fit_recovers_the_defocus(refined: Path) -> None:
    particles = load_particles(refined / "run_data.star")
    truth = read_star(refined / "truth.star")["particles"]
    truth_map = np.asarray(atoms.molecule_map("octahedral", BOX, PIX, 50.0), np.float64)
    maps = (truth_map, truth_map)
    subset = particles.particles["rlnRandomSubset"].to_numpy()
    fit = fit_defocus(particles, maps, subset, 30.0, 4, BOX // 2 - 1)
    particles.close()
    before = particles.particles["rlnDefocusU"].to_numpy() - truth["rlnDefocusU"].to_numpy()
    after = before + fit.delta
    rms_before, rms_after = np.sqrt(np.mean(before**2)), np.sqrt(np.mean(after**2))
    # measured 316.7 -> 32.8 Å (0.104) at SNR 0.5 with the true map
    assert rms_after < 0.15 * rms_before, (rms_before, rms_after)
    assert np.all(fit.gain >= 0)


def test_cli_writes_relion_names(refined: Path, tmp_path: Path) -> None:
    r = cryomap("ctf_refine", "--i", str(refined / "run_data.star"), "--o",
                str(tmp_path / "CtfRefine" / "job001"), "--particle_diameter", "130",
                cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    out = tmp_path / "CtfRefine" / "job001"
    new = read_star(out / "particles_ctf_refine.star")["particles"]
    old = read_star(refined / "run_data.star")["particles"]
    change_u = new["rlnDefocusU"] - old["rlnDefocusU"]
    np.testing.assert_allclose(change_u, new["rlnDefocusV"] - old["rlnDefocusV"])
    assert np.abs(change_u).max() > 0
    assert (out / "ctf_refine.log").read_text().startswith("cryomap ctf_refine: 80 particles")
    assert (out / "defocus_change.png").stat().st_size > 0


def _bad_star(refined: Path, tmp_path: Path, drop: str) -> Path:
    blocks = read_star(refined / "run_data.star")
    d = tmp_path / "bad"
    d.mkdir(exist_ok=True)
    write_particles(d / "run_data.star", blocks["optics"],
                    blocks["particles"].drop(columns=[c for c in blocks["particles"]
                                                      if c.startswith(drop)]))
    for h in (1, 2):
        (d / f"run_half{h}_class001_unfil.mrc").write_bytes(
            (refined / f"run_half{h}_class001_unfil.mrc").read_bytes())
    return d / "run_data.star"


@pytest.mark.parametrize("case", ["no-defocus", "no-subset", "half-map-box", "no-half-maps"])
def test_cli_bad_input(refined: Path, tmp_path: Path, case: str) -> None:
    if case == "no-defocus":
        star, words = _bad_star(refined, tmp_path, "rlnDefocus"), ("rlnDefocusU",)
    elif case == "no-subset":
        star, words = _bad_star(refined, tmp_path, "rlnRandomSubset"), ("rlnRandomSubset",)
    elif case == "half-map-box":
        star = _bad_star(refined, tmp_path, "rlnNothing")
        write_map(star.parent / "run_half2_class001_unfil.mrc", np.zeros((32,) * 3, np.float32),
                  PIX)
        words = ("run_half2_class001_unfil.mrc", "32 px", "box 64")
    else:
        star = _bad_star(refined, tmp_path, "rlnNothing")
        (star.parent / "run_half1_class001_unfil.mrc").unlink()
        words = ("run_half1_class001_unfil.mrc",)
    r = cryomap("ctf_refine", "--i", str(star), "--o", str(tmp_path / "out"), cwd=tmp_path)
    assert r.returncode == 2 and r.stdout == ""
    line = r.stderr.strip()
    assert "\n" not in line and "Traceback" not in line
    for w in words:
        assert w in line, line
    assert not (tmp_path / "out").exists()
