"""Kill and continue: a refinement (auto-refine, so the convergence decision is part of what
must survive) and a 3D classification are started in a subprocess, SIGKILLed at seeded random
times (during iterations and writes alike), continued with --continue each time, and their
final outputs compared bit for bit with an uninterrupted run's."""

from __future__ import annotations

import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from cryomap.cli.main import main
from cryomap.io.atomic import stale_temps
from cryomap.io.mrc import read_map
from cryomap.io.star import read_star

BOX, PIX, N = 24, 7.0, 40
SEED = 20240917
KILLS = 3  # SIGKILLs per run before it is let finish


@pytest.fixture(scope="module")
def sim(phantom_set) -> Path:
    return phantom_set("kill", BOX, PIX, N, seed=3)


def _cmd(command: str, sim: Path, out: Path) -> list[str]:
    common = ["--i", str(sim / "particles.star"), "--ref", str(sim / "ref.mrc"), "--o", str(out),
              "--healpix_order", "1", "--offset_range", "1", "--offset_step", "1", "--j", "2"]
    if command == "refine":  # no --iter: auto-refine until converged
        return ["refine"] + common
    return ["class3d"] + common + ["--K", "2", "--iter", "8", "--tau2_fudge", "4",
                                   "--particle_diameter", "120"]


def _states(out: Path) -> int:
    return len(list(out.glob("run_it*_state.npz"))) if out.exists() else 0


def _run_with_kills(args: list[str], out: Path, n_iter: int, per_iter: float,
                    rng: np.random.Generator) -> int:
    """Start `cryomap args`, SIGKILL it at random points, continue it (or, when it was killed
    before job.json existed, start it again) until it finishes. A kill comes a random time
    (up to 1.5 iterations) after a random number of further iterations were saved, so it
    lands anywhere in an iteration or its writes. Returns the kills that hit a running
    process."""
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    hits = 0
    for attempt in range(KILLS + 1):
        if (out / "job.json").exists():
            cmd = [sys.executable, "-m", "cryomap", args[0], "--o", str(out), "--continue"]
        else:
            cmd = [sys.executable, "-m", "cryomap"] + args
        proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                env=env)
        if attempt < KILLS:
            left = max(1, n_iter - _states(out))
            # the first kill after at least one saved iteration: a continue must resume
            wait_for = _states(out) + int(rng.integers(1 if attempt == 0 else 0, left))
            while proc.poll() is None and _states(out) < wait_for:
                time.sleep(0.005)
            deadline = time.monotonic() + rng.uniform(0.0, 1.5) * per_iter
            while proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.005)
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                hits += 1
        _, err = proc.communicate(timeout=300)
        if proc.returncode == 0:
            break
        assert proc.returncode == -signal.SIGKILL, err.decode()
    assert proc.returncode == 0
    return hits


def _assert_same_outputs(a: Path, b: Path) -> None:
    maps = sorted(p.name for p in a.glob("run_*.mrc"))
    assert maps and maps == sorted(p.name for p in b.glob("run_*.mrc"))
    for name in maps:
        assert np.array_equal(read_map(a / name)[0], read_map(b / name)[0]), name
    for name in ("run_data.star", "run_model.star"):
        ta, tb = read_star(a / name), read_star(b / name)
        assert ta.keys() == tb.keys(), name
        for block in ta:
            if isinstance(ta[block], pd.DataFrame):
                pd.testing.assert_frame_equal(ta[block], tb[block], check_exact=True)
            else:
                assert ta[block] == tb[block], (name, block)


@pytest.mark.parametrize("command", ["refine", "class3d"])
def test_killed_and_continued_run_equals_uninterrupted_run(sim, tmp_path, command):
    rng = np.random.default_rng([SEED, len(command)])
    ref, out = tmp_path / "uninterrupted", tmp_path / "killed"
    t0 = time.monotonic()
    assert main(_cmd(command, sim, ref)) == 0
    n_iter = _states(ref)
    per_iter = (time.monotonic() - t0) / n_iter
    hits = _run_with_kills(_cmd(command, sim, out), out, n_iter, per_iter, rng)
    assert hits >= 1  # at least one kill landed in a running process
    # and a continue resumed from a saved iteration
    assert re.search(r"continuing from iteration [1-9]", (out / "run.log").read_text())
    _assert_same_outputs(ref, out)
    assert stale_temps(out) == []  # temporary files of killed writes were cleaned up
    # a finished run is left alone by --continue
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert main([command, "--o", str(out), "--continue"]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before
