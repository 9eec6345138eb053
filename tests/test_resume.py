"""--continue on damaged and finished runs: a corrupt last iteration falls back to the one
before (said in run.log) and still gives the uninterrupted run's map bit for bit; damaged
states only, or a state of another layout, stop with one line (never a silent restart);
temporary
files of interrupted writes are removed; a finished run is left alone; the thread count of
the first start is kept; a state of another particle set is refused."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from cryomap.cli.main import main
from cryomap.io.atomic import stale_temps
from cryomap.io.mrc import read_map, write_map
from cryomap.jobs.base import STATE_SCHEMA
from cryomap.phantom import make_phantom
from cryomap.simulate import simulate_particles, write_simulation

BOX, PIX, N = 24, 7.0, 30
FAST = ["--healpix_order", "1", "--offset_range", "1", "--offset_step", "1", "--iter", "3"]
FINAL = ("run_class001.mrc", "run_half1_class001_unfil.mrc", "run_half2_class001_unfil.mrc",
         "run_model.star", "run_data.star", "run_fsc.png")


@pytest.fixture(scope="module")
def finished(tmp_path_factory) -> Path:
    """A finished 3-iteration refinement (--j 1) and its inputs."""
    d = tmp_path_factory.mktemp("resume")
    truth = make_phantom(BOX, PIX)
    write_simulation(d, *simulate_particles(truth, PIX, N, snr=1.0, seed=4, max_shift_px=1),
                     pixel_size=PIX)
    write_map(d / "ref.mrc", truth, PIX)
    assert main(["refine", "--i", str(d / "particles.star"), "--ref", str(d / "ref.mrc"),
                 "--o", str(d / "run"), "--j", "1"] + FAST) == 0
    return d


def interrupted(finished: Path, dst: Path, after: int) -> Path:
    """A copy of the finished run as a kill right after iteration `after` would leave it."""
    shutil.copytree(finished / "run", dst)
    for name in FINAL:
        (dst / name).unlink()
    for p in dst.glob("run_it*"):
        if int(p.name[6:9]) > after:
            p.unlink()
    job = json.loads((dst / "job.json").read_text())
    del job["finished"]
    (dst / "job.json").write_text(json.dumps(job))
    return dst


def same_map(a: Path, b: Path) -> bool:
    return np.array_equal(read_map(a / "run_class001.mrc")[0], read_map(b / "run_class001.mrc")[0])


def test_corrupt_last_state_falls_back_to_the_one_before(finished, tmp_path):
    run = interrupted(finished, tmp_path / "run", after=2)
    state = run / "run_it002_state.npz"
    state.write_bytes(state.read_bytes()[: state.stat().st_size // 2])  # truncated
    assert main(["refine", "--o", str(run), "--continue"]) == 0
    log = (run / "run.log").read_text()
    assert "run_it002_state.npz: the saved state is unreadable" in log
    assert "continuing from iteration 1" in log
    assert same_map(run, finished / "run")


def test_empty_last_state_falls_back_and_says_so(finished, tmp_path, capsys):
    run = interrupted(finished, tmp_path / "run", after=3)
    (run / "run_it003_state.npz").write_bytes(b"")  # a disk that filled up
    (run / "run_it003_data.star").write_bytes(b"")
    capsys.readouterr()
    assert main(["refine", "--o", str(run), "--continue"]) == 0
    out = capsys.readouterr().out
    assert "run_it003_state.npz: the saved state is unreadable" in out
    assert "continuing from iteration 2" in out
    assert same_map(run, finished / "run")


def _damaged_run_is_refused(run: Path, capsys, words: list[str]) -> None:
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    capsys.readouterr()
    assert main(["refine", "--o", str(run), "--continue"]) == 2
    captured = capsys.readouterr()
    assert len(captured.err.splitlines()) == 1 and "Traceback" not in captured.err
    assert all(w in captured.err for w in words), captured.err
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before  # nothing written


def test_all_states_damaged_stops_instead_of_starting_again(finished, tmp_path, capsys):
    run = interrupted(finished, tmp_path / "run", after=2)
    (run / "run_it001_state.npz").write_bytes(b"PK\x03\x04 not a zip")
    state = run / "run_it002_state.npz"
    state.write_bytes(state.read_bytes()[:100])  # truncated
    _damaged_run_is_refused(run, capsys, ["no intact iteration state", "run_it001_state.npz",
                                          "run_it002_state.npz", "another --o"])


def _with_schema(path: Path, schema: dict | None) -> None:
    with np.load(path) as z:
        arrays = {k: z[k] for k in z.files if k != "__schema__"}
    if schema is not None:
        arrays["__schema__"] = np.array(json.dumps(schema))
    with open(path, "wb") as fh:
        np.savez(fh, **arrays)


@pytest.mark.parametrize("schema", [None, {"state": "RefineState", "version": 99},
                                    {"state": "ClassState", "version": 1}])
def test_state_of_another_layout_stops(finished, tmp_path, capsys, schema):
    """A state written by another cryomap version (or no schema recorded, as before it was)
    or by another job is refused with one line, not misread and not skipped."""
    run = interrupted(finished, tmp_path / "run", after=2)
    for it in (1, 2):
        _with_schema(run / f"run_it{it:03d}_state.npz", schema)
    _damaged_run_is_refused(run, capsys, ["run_it002_state.npz", "another layout",
                                          f"'version': {STATE_SCHEMA}"])


def test_stopped_during_the_first_iteration_starts_again_and_says_so(finished, tmp_path,
                                                                      capsys):
    run = interrupted(finished, tmp_path / "run", after=0)
    capsys.readouterr()
    assert main(["refine", "--o", str(run), "--continue"]) == 0
    assert "no iteration had finished; starting from the beginning" in capsys.readouterr().out
    assert same_map(run, finished / "run")


def test_stale_temp_files_are_removed_and_logged(finished, tmp_path):
    run = interrupted(finished, tmp_path / "run", after=2)
    leftovers = [run / ".run_it003_half1_class001.mrc.a1b2c3d4.tmp",
                 run / ".run_it003_state.npz.zz_9Yx01.npz.tmp"]
    for p in leftovers:
        p.write_bytes(b"half a file")
    keep = run / ".hidden_user_file"  # not the pattern of an atomic write: left alone
    keep.write_text("mine")
    assert sorted(stale_temps(run)) == sorted(leftovers)
    assert main(["refine", "--o", str(run), "--continue"]) == 0
    assert stale_temps(run) == [] and keep.exists()
    log = (run / "run.log").read_text()
    assert "removed 2 temporary file(s) of interrupted writes" in log
    assert same_map(run, finished / "run")


def test_continue_keeps_the_first_starts_thread_count(finished, tmp_path):
    """The first start ran with --j 1; a continue without --j uses 1 thread again (the thread
    count changes sums in the last bits), not all cores."""
    run = interrupted(finished, tmp_path / "run", after=1)
    assert json.loads((run / "job.json").read_text())["threads"] == 1
    assert main(["refine", "--o", str(run), "--continue"]) == 0
    assert same_map(run, finished / "run")


def test_continue_after_the_final_iteration_only_writes_the_final_outputs(finished, tmp_path):
    """Killed while writing the final outputs: the continue writes them, runs nothing."""
    run = interrupted(finished, tmp_path / "run", after=3)
    assert main(["refine", "--o", str(run), "--continue"]) == 0
    assert not (run / "run_it004_state.npz").exists()
    assert same_map(run, finished / "run")
    assert json.loads((run / "job.json").read_text())["finished"] == 3


def test_finished_run_is_left_unchanged(finished, tmp_path, capsys):
    run = tmp_path / "run"
    shutil.copytree(finished / "run", run)
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    capsys.readouterr()
    assert main(["refine", "--o", str(run), "--continue", "--iter", "5"]) == 0
    assert "finished at iteration 3; nothing to do" in capsys.readouterr().out
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before


def test_state_of_another_particle_set_is_refused(finished, tmp_path, capsys):
    run = interrupted(finished, tmp_path / "run", after=1)
    other = tmp_path / "other"
    truth = make_phantom(BOX, PIX)
    write_simulation(other, *simulate_particles(truth, PIX, N + 2, snr=1.0, seed=5),
                     pixel_size=PIX)
    job = json.loads((run / "job.json").read_text())
    job["i"] = str(other / "particles.star")
    (run / "job.json").write_text(json.dumps(job))
    before = sorted(p.name for p in run.iterdir())
    capsys.readouterr()
    assert main(["refine", "--o", str(run), "--continue"]) == 2
    err = capsys.readouterr().err
    assert "run_it001_state.npz" in err and f"{N} particles" in err and len(err.splitlines()) == 1
    assert sorted(p.name for p in run.iterdir()) == before
