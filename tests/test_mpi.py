"""Runs split across MPI ranks (`mpirun -n 2 cryomap ...`, docs/mpi.md).

Simulated particles of ribosome-sized phantoms (SNR 0.1, CTF, random shifts). Each check runs
the same command in one process and under `mpirun -n 2`: the maps must agree to 1e-5
relative and the per-particle poses and classes be identical. A rank that raises, is killed or
hangs must end the whole job with exit != 0 and one error line naming it, within 60 s; and a
run started with one number of processes continues with another.

Skipped only when mpi4py cannot be imported (`pip install '.[mpi]'`, which the README's test
command does); with mpi4py but no mpirun the tests fail.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("mpi4py", reason="mpi4py is not installed (pip install '.[mpi]'): the "
                                     "mpirun tests need it")

from cryomap.cli.main import main  # noqa: E402
from cryomap.fourier import initial_lowpass  # noqa: E402
from cryomap.io.mrc import read_map, write_map  # noqa: E402
from cryomap.io.star import read_star  # noqa: E402
from cryomap.phantom import RIBOSOME_SCALE, make_phantom, make_phantom_variant  # noqa: E402
from cryomap.simulate import simulate_particles, write_simulation  # noqa: E402

BOX, PIX, N, SNR = 24, 8.0, 160, 0.1
DIAMETER = 0.8 * BOX * PIX
SCALE = RIBOSOME_SCALE * DIAMETER / 256
MAP_TOLERANCE = 1e-5  # relative, max |difference| / max |map| (issue 13)
DEADLINE = 60.0  # s: a failing rank must have ended the job by then
POSE_COLUMNS = ["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst",
                "rlnOriginYAngst", "rlnClassNumber"]
COMMON = ["--particle_diameter", f"{DIAMETER:g}", "--ini_high", "40", "--offset_range", "2",
          "--offset_step", "1", "--healpix_order", "1"]


def _mpirun() -> str:
    """mpirun of the environment's MPI (the `mpich` wheel puts it next to python)."""
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    for name in ("mpirun", "mpiexec"):
        found = shutil.which(name, path=path)
        if found:
            return found
    pytest.fail("mpi4py is installed but no mpirun/mpiexec is on PATH (pip install '.[mpi]')")


def _run_mpi(args: list[str], ranks: int = 2, env: dict | None = None,
             timeout: float = 120.0) -> subprocess.CompletedProcess:
    """`mpirun -n ranks cryomap args` (one OpenMP thread per rank: two ranks on two cores)."""
    cmd = [_mpirun(), "-n", str(ranks), sys.executable, "-m", "cryomap", *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout,
                          env=dict(os.environ, **(env or {})))


@pytest.fixture(scope="module")
def sim(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("mpi")
    truth = make_phantom(BOX, PIX, scale=SCALE)
    write_simulation(out / "one", *simulate_particles(truth, PIX, N, snr=SNR, seed=5,
                                                       max_shift_px=2.0), pixel_size=PIX)
    write_map(out / "start.mrc",
              initial_lowpass(truth.astype(np.float64), 40.0, PIX).astype(np.float32),
              PIX)
    maps = [make_phantom_variant(v, BOX, PIX, scale=SCALE) for v in (0, 3)]
    write_simulation(out / "two", *simulate_particles(maps, PIX, N, snr=SNR, seed=6,
                                                       class_fractions=(0.6, 0.4),
                                                       max_shift_px=2.0), pixel_size=PIX)
    write_map(out / "mean.mrc", np.mean(maps, axis=0), PIX)
    return out


def _refine_args(sim: Path, out: Path, threads: int) -> list[str]:
    return ["refine", "--i", str(sim / "one" / "particles.star"), "--ref", str(sim / "start.mrc"),
            "--o", str(out), "--iter", "3", "--j", str(threads)] + COMMON


def _class3d_args(sim: Path, out: Path, threads: int) -> list[str]:
    return ["class3d", "--i", str(sim / "two" / "particles.star"), "--ref",
            str(sim / "mean.mrc"), "--o", str(out), "--K", "2", "--iter", "3", "--tau2_fudge",
            "4", "--j", str(threads)] + COMMON


@pytest.fixture(scope="module")
def single_refine(sim, tmp_path_factory) -> Path:
    """The one-process refinement every parallel one is compared with."""
    out = tmp_path_factory.mktemp("mpi_refine") / "one"
    assert main(_refine_args(sim, out, 2)) == 0
    return out


def _assert_agree(one: Path, many: Path, maps: list[str]) -> float:
    """Maps within MAP_TOLERANCE, poses and classes identical; returns the worst map figure."""
    worst = 0.0
    for name in maps:
        a = read_map(one / name)[0].astype(np.float64)
        b = read_map(many / name)[0].astype(np.float64)
        worst = max(worst, float(np.abs(a - b).max() / np.abs(a).max()))
    a, b = read_star(one / "run_data.star")["particles"], read_star(many / "run_data.star")[
        "particles"]
    assert list(a["rlnImageName"]) == list(b["rlnImageName"])
    for column in POSE_COLUMNS:
        if column in a:
            assert np.array_equal(a[column].to_numpy(), b[column].to_numpy()), column
    assert worst <= MAP_TOLERANCE, worst
    return worst


def _error_lines(stderr: str, command: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith(f"cryomap {command}: error")]


def test_refine_under_mpirun_agrees_with_one_process(sim, single_refine, tmp_path):
    out = tmp_path / "two_ranks"
    done = _run_mpi(_refine_args(sim, out, 1))
    assert done.returncode == 0, done.stderr
    worst = _assert_agree(single_refine, out, ["run_class001.mrc", "run_half1_class001_unfil.mrc",
                                               "run_half2_class001_unfil.mrc"])
    print(f"\nrefine, 2 ranks vs 1 process: maps agree to {worst:.1e} relative, poses identical")
    log = (out / "run.log").read_text()
    assert "MPI: 2 ranks" in log
    assert log.count("MPI: peak memory (VmHWM)") == 3  # one per iteration, rank 0 writes
    assert "Traceback" not in done.stderr


def test_class3d_under_mpirun_agrees_with_one_process(sim, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two_ranks"
    assert main(_class3d_args(sim, one, 2)) == 0
    done = _run_mpi(_class3d_args(sim, two, 1))
    assert done.returncode == 0, done.stderr
    worst = _assert_agree(one, two, ["run_it003_class001.mrc", "run_it003_class002.mrc"])
    print(f"\nclass3d, 2 ranks vs 1 process: maps agree to {worst:.1e} relative, poses and "
          f"classes identical")


@pytest.mark.parametrize("mode", ["raise", "kill", "hang"])
def test_a_failing_rank_ends_the_job_with_one_line(sim, tmp_path, mode):
    # rank 1 fails in its second pass (iteration 1's second half-set), before the reduction
    env = {"CRYOMAP_MPI_FAULT": f"1:2:{mode}"}
    if mode == "hang":  # the rendezvous deadline (default: at least 10 minutes)
        env["CRYOMAP_MPI_TIMEOUT"] = "8"

    def run(out: Path) -> subprocess.CompletedProcess:
        try:
            return _run_mpi(_refine_args(sim, out, 1), env=env, timeout=DEADLINE)
        except subprocess.TimeoutExpired:
            pytest.fail(f"a rank that failed ({mode}) did not end the job within "
                        f"{DEADLINE:.0f} s")

    t0 = time.monotonic()
    done = run(tmp_path / "out")
    if done.returncode != 0 and not done.stderr.strip():
        # once, in a full CI-like run, mpirun ended with no output at all (not reproduced
        # alone or in this file); a silent exit is retried once, in a fresh folder, so that
        # a launcher hiccup is told apart from a missing error line (which fails twice)
        print(f"\n{mode}: mpirun exit {done.returncode} with empty stderr (stdout "
              f"{done.stdout[-300:]!r}); retrying once")
        t0 = time.monotonic()
        done = run(tmp_path / "out_retry")
    took = time.monotonic() - t0
    assert done.returncode != 0
    lines = _error_lines(done.stderr, "refine")
    assert len(lines) == 1, done.stderr
    assert "rank 1" in lines[0], lines[0]
    expected = {"raise": "injected failure", "kill": "killed by SIGKILL",
                "hang": "did not reach the reduction of pass 2"}[mode]
    assert expected in lines[0], lines[0]
    assert "Traceback" not in done.stderr
    print(f"\n{mode}: exit {done.returncode} after {took:.1f} s: {lines[0]}")


def test_bad_input_under_mpirun_is_one_line_and_exit_2(sim, tmp_path):
    out = tmp_path / "never"
    args = _refine_args(sim, out, 1)
    args[args.index("--particle_diameter") + 1] = "5000"
    done = _run_mpi(args, timeout=DEADLINE)
    if not done.stderr.strip():
        # the launcher hiccup of test_a_failing_rank_ends_the_job_with_one_line (seen here
        # once in a full CI run: exit 2, no output at all): retried once, so that a missing
        # error line still fails twice
        print(f"\nmpirun exit {done.returncode} with empty stderr; retrying once")
        done = _run_mpi(args, timeout=DEADLINE)
    assert done.returncode == 2
    lines = _error_lines(done.stderr, "refine")
    assert len(lines) == 1 and "--particle_diameter 5000" in lines[0], done.stderr
    assert not out.exists()


def _states(out: Path) -> list[str]:
    return sorted(p.name for p in out.glob("run_it*_state.npz"))


MAPS = ["run_class001.mrc", "run_half1_class001_unfil.mrc", "run_half2_class001_unfil.mrc"]


def test_continue_on_one_process_a_run_started_on_two_ranks(sim, single_refine, tmp_path):
    out = tmp_path / "two_then_one"
    # rank 1 fails in its third pass: iteration 1 was saved, iteration 2 was not
    failed = _run_mpi(_refine_args(sim, out, 1), env={"CRYOMAP_MPI_FAULT": "1:3:raise"})
    assert failed.returncode != 0
    assert _states(out) == ["run_it001_state.npz"]
    assert main(["refine", "--o", str(out), "--continue"]) == 0
    assert "continuing from iteration 1" in (out / "run.log").read_text()
    _assert_agree(single_refine, out, MAPS)


def test_continue_on_two_ranks_a_run_started_in_one_process(sim, single_refine, tmp_path):
    out = tmp_path / "one_then_two"
    proc = subprocess.Popen([sys.executable, "-m", "cryomap"] + _refine_args(sim, out, 1),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while proc.poll() is None and not _states(out) and time.monotonic() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)  # after iteration 1's state file, before iteration 2's
    proc.wait()
    assert proc.returncode == -signal.SIGKILL and _states(out) == ["run_it001_state.npz"]
    done = _run_mpi(["refine", "--o", str(out), "--continue"])
    assert done.returncode == 0, done.stderr
    log = (out / "run.log").read_text()
    assert "continuing from iteration 1" in log and "MPI: 2 ranks" in log
    _assert_agree(single_refine, out, MAPS)


def test_without_mpirun_mpi4py_is_never_imported(tmp_path):
    code = ("import sys, cryomap.cli.main, cryomap.jobs.refine, cryomap.jobs.classify; "
            "cryomap.cli.main.build_parser(); print('mpi4py' in sys.modules)")
    env = {k: v for k, v in os.environ.items()
           if k not in ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS")}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"
