"""The job base shared by refine, class3d and class2d: the output folder, run.log, iteration
files, the saved state for `--continue`, and the loop that runs iterations until the schedule
says it is done.

A job writes, per iteration, `run_itNNN_*` files (the subclass's maps and tables) and
`run_itNNN_state.npz` (everything the next iteration needs, so that a continued run is the
same as an uninterrupted one), and at the end the `run_*` files. Every file is written
atomically.
"""

from __future__ import annotations

import json
import re
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, fields, is_dataclass
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..io.atomic import atomic_path

STATE_PATTERN = re.compile(r"run_it(\d{3})_state\.npz$")


def iteration_root(outdir: Path, iteration: int | None) -> Path:
    """`run_itNNN` for an iteration, `run` for the final outputs."""
    return outdir / ("run" if iteration is None else f"run_it{iteration:03d}")


def last_iteration(outdir: Path) -> int | None:
    """Number of the last finished iteration in an output folder (its state file exists)."""
    its = [int(m.group(1)) for p in Path(outdir).glob("run_it*_state.npz")
           if (m := STATE_PATTERN.match(p.name))]
    return max(its) if its else None


def write_text_atomic(path: Path, text: str) -> None:
    """Write a text file atomically (temp file in the same folder, then rename)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


class Log:
    """run.log plus console lines."""

    def __init__(self, path: Path, echo: Callable[[str], None] | None = print) -> None:
        self.path, self.echo = path, echo
        self.lines: list[str] = path.read_text().splitlines() if path.exists() else []

    def __call__(self, line: str) -> None:
        self.lines.append(line)
        write_text_atomic(self.path, "\n".join(self.lines) + "\n")
        if self.echo is not None:
            self.echo(line)


def progress_bar(total: int, desc: str):
    """tqdm on a terminal, nothing otherwise (the log lines carry the progress)."""
    if not sys.stderr.isatty():
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="ptcl", leave=False)


# -- state files ---------------------------------------------------------------------------


def save_state(path: Path, state) -> None:
    """A dataclass state to an .npz, atomically: numpy fields as arrays, the rest (numbers,
    strings, lists, dicts and lists of dataclasses) as one JSON document."""
    arrays, other = {}, {}
    for f in fields(state):
        value = getattr(state, f.name)
        if isinstance(value, np.ndarray):
            arrays[f.name] = value
        elif f.name != "options":
            other[f.name] = _jsonable(value)
    arrays["__json__"] = np.array(json.dumps(other))
    with atomic_path(path, suffix=".npz") as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)


def load_state(path: Path, cls, **extra):
    """The state saved by save_state, as `cls(**fields, **extra)`; list-of-dataclass fields
    are rebuilt by `cls.from_saved` when it exists."""
    try:
        with np.load(path) as z:
            values = {k: z[k] for k in z.files if k != "__json__"}
            other = json.loads(str(z["__json__"]))
    except (OSError, ValueError, KeyError, EOFError) as e:
        raise InputError(f"{path}: the saved state is unreadable ({e})") from None
    values.update(other)
    values.update(extra)
    if hasattr(cls, "from_saved"):
        return cls.from_saved(values)
    return cls(**values)


def _jsonable(value):
    if is_dataclass(value):
        return _jsonable(asdict(value))
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def check_memory(parts: dict[str, int], max_memory_gib: float | None) -> int:
    """Refuse (InputError, one line) a run whose estimated peak memory (`parts`, bytes) is
    over --max_memory (GiB; default 80 % of the available memory). Returns the estimate."""
    from ..em.engine import available_memory

    total = int(sum(parts.values()))
    limit = 0.8 * available_memory() if max_memory_gib is None else max_memory_gib * 2**30
    if max_memory_gib is not None and not (np.isfinite(max_memory_gib) and max_memory_gib > 0):
        raise InputError(f"--max_memory {max_memory_gib}: expected a size > 0 GiB")
    if total > limit:
        big = max(parts, key=parts.get)
        raise InputError(f"--max_memory: the run needs about {total / 2**30:.1f} GiB (largest "
                         f"part: {big}, {parts[big] / 2**30:.1f} GiB) but "
                         f"{limit / 2**30:.1f} GiB are allowed; use a lower --healpix_order, "
                         f"a smaller --offset_range or raise --max_memory")
    return total


# -- the job -------------------------------------------------------------------------------


class Job:
    """Runs iterations of a schedule in an output folder; subclasses supply the work.

    Subclasses implement: `kind` (job.json's kind), `initial_state()`, `state_class`,
    `iterate(state) -> str` (one iteration; returns its log line), `finished(state) -> bool`,
    `write_iteration(root, state)` and `write_final(state)`.
    """

    kind = "job"
    state_class: type

    def __init__(self, outdir: str | Path, resume: bool = False,
                 echo: Callable[[str], None] | None = print) -> None:
        self.outdir = Path(outdir)
        self.resume = resume
        self.echo = echo
        self.log: Log | None = None

    # -- folder ----------------------------------------------------------------------------

    def open(self) -> None:
        """Create the output folder and log. A fresh run refuses a folder that already holds
        a run, so that a later --continue can never resume from a stale one."""
        try:
            self.outdir.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise InputError(f"--o {self.outdir}: cannot create the output folder "
                             f"({e.strerror})") from None
        if not self.resume and last_iteration(self.outdir) is not None:
            raise InputError(f"{self.outdir}: already holds a run (run_itNNN_state.npz); use "
                             "--continue to resume it or choose another --o")
        self.log = Log(self.outdir / "run.log", self.echo)

    def write_job_file(self, description: dict) -> None:
        """job.json: what --continue needs to restart the run."""
        write_text_atomic(self.outdir / "job.json",
                          json.dumps({"kind": self.kind, **description}, indent=1))

    # -- to implement ----------------------------------------------------------------------

    def initial_state(self):  # pragma: no cover - abstract
        raise NotImplementedError

    def iterate(self, state) -> str:  # pragma: no cover - abstract
        raise NotImplementedError

    def finished(self, state) -> bool:  # pragma: no cover - abstract
        raise NotImplementedError

    def write_iteration(self, root: Path, state) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def write_final(self, state) -> None:  # pragma: no cover - abstract
        raise NotImplementedError

    def state_extra(self) -> dict:
        """Fields of the state not saved in the state file (e.g. the options)."""
        return {}

    # -- the loop --------------------------------------------------------------------------

    def run(self):
        """Start or continue the run; returns the final state."""
        if self.log is None:
            self.open()
        last = last_iteration(self.outdir) if self.resume else None
        if last is not None:
            state = load_state(self.outdir / f"run_it{last:03d}_state.npz", self.state_class,
                               **self.state_extra())
            self.log(f"continuing from iteration {last} in {self.outdir}")
        else:
            state = self.initial_state()
        while not self.finished(state):
            t0 = time.perf_counter()
            line = self.iterate(state)
            root = iteration_root(self.outdir, state.iteration)
            self.write_iteration(root, state)
            save_state(Path(f"{root}_state.npz"), state)
            self.log(f"{line} ({time.perf_counter() - t0:.1f} s)")
        self.write_final(state)
        return state
