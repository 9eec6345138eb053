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
import zipfile
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields, is_dataclass, replace
from pathlib import Path

import numpy as np

from ..errors import InputError
from ..io.atomic import atomic_path, check_output_dir, make_output_dir, remove_stale_temps
from ..parallel import SINGLE, Ranks

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
    """run.log plus console lines (path None: the lines are kept in memory only)."""

    def __init__(self, path: Path | None, echo: Callable[[str], None] | None = print) -> None:
        self.path, self.echo = path, echo
        self.lines: list[str] = (path.read_text().splitlines()
                                 if path is not None and path.exists() else [])

    def __call__(self, line: str) -> None:
        self.lines.append(line)
        if self.path is not None:
            write_text_atomic(self.path, "\n".join(self.lines) + "\n")
        if self.echo is not None:
            self.echo(line)


def progress_bar(total: int, desc: str, ranks: Ranks = SINGLE):
    """tqdm on a terminal, nothing otherwise (the log lines carry the progress) or under
    mpirun (no bar per rank)."""
    if not sys.stderr.isatty() or ranks.size > 1:
        return None
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="ptcl", leave=False)


# -- state files ---------------------------------------------------------------------------


#: Version of the state-file layout; a file of another version is refused, never misread.
STATE_SCHEMA = 2


class DamagedState(InputError):
    """A state file that cannot be read back (truncated, empty, not an .npz)."""


def state_schema(cls) -> dict:
    """What a state file of `cls` records about its layout (`STATE_SCHEMA`)."""
    return {"state": cls.__name__, "version": STATE_SCHEMA}


def save_state(path: Path, state) -> None:
    """A dataclass state to an .npz, atomically: numpy fields as arrays, the rest (numbers,
    strings, lists, dicts and lists of dataclasses) as one JSON document, and the layout's
    schema (`state_schema`)."""
    arrays, other = {}, {}
    for f in fields(state):
        value = getattr(state, f.name)
        if isinstance(value, np.ndarray):
            arrays[f.name] = value
        elif f.name != "options":
            other[f.name] = _jsonable(value)
    arrays["__json__"] = np.array(json.dumps(other))
    arrays["__schema__"] = np.array(json.dumps(state_schema(type(state))))
    with atomic_path(path, suffix=".npz") as tmp:
        with open(tmp, "wb") as fh:
            np.savez(fh, **arrays)


def load_state(path: Path, cls, **extra):
    """The state saved by save_state, as `cls(**fields, **extra)`; list-of-dataclass fields
    are rebuilt by `cls.from_saved` when it exists.

    A file that does not read back raises `DamagedState`; one of another layout (another
    cryomap version or job, or none recorded) an `InputError`. Errors while rebuilding the
    state from a file of the right layout are bugs and are not caught."""
    try:
        with np.load(path) as z:
            values = {k: z[k] for k in z.files if k not in ("__json__", "__schema__")}
            other = json.loads(str(z["__json__"]))
            schema = json.loads(str(z["__schema__"])) if "__schema__" in z.files else None
    except (OSError, ValueError, KeyError, EOFError, zipfile.BadZipFile) as e:
        raise DamagedState(f"{path}: the saved state is unreadable "
                           f"({type(e).__name__}: {e})") from None
    if schema != state_schema(cls):
        raise InputError(f"{path}: a saved state of another layout ({schema or 'none recorded'}"
                         f"; this cryomap reads {state_schema(cls)}): continue the run with "
                         f"the cryomap that wrote it, or start a new one in another --o")
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


# -- memory ------------------------------------------------------------------------------

#: Resident memory of the interpreter with numpy, pandas, healpy, matplotlib and the kernels.
RUNTIME_BYTES = 256 << 20
#: Per particle: the particle table (pandas, image names as strings), the state's per-image
#: arrays and the data.star text written each iteration.
PER_PARTICLE_BYTES = 3072
#: Smallest batch memory a plan goes down to before it refuses the run.
MIN_BATCH_MEMORY = 16 << 20
#: The cache is bought with smaller batches down to this batch memory at most.
CACHE_BATCH_MEMORY = 64 << 20


@dataclass
class MemoryPlan:
    """How a run uses its memory budget: the batch memory (options.batch_memory) that sizes
    batches and candidate-slice groups, whether the image FTs are cached, and the estimated
    peak by part (bytes)."""

    budget: int
    batch_memory: int
    cache: bool
    parts: dict[str, int]

    @property
    def total(self) -> int:
        """Estimated peak bytes."""
        return int(sum(self.parts.values()))

    def describe(self) -> str:
        """One line for run.log."""
        big = sorted(self.parts.items(), key=lambda kv: -kv[1])[:3]
        return (f"memory: estimated peak {self.total / 2**30:.2f} GiB of a "
                f"{self.budget / 2**30:.2f} GiB budget (--max_memory); batch memory "
                f"{self.batch_memory >> 20} MiB; images "
                f"{'cached in memory' if self.cache else 'read from disk every iteration'}; "
                f"largest parts: " + ", ".join(f"{k} {v / 2**30:.2f} GiB" for k, v in big))


EM_HINT = "use a lower --healpix_order, a smaller --offset_range or raise --max_memory"


def check_memory(parts: dict[str, int], budget: int, hint: str = EM_HINT,
                 option: str = "--max_memory") -> int:
    """Refuse (InputError, one line) a run whose estimated peak memory (`parts`, bytes) is
    over the budget (bytes); `hint` says what to change. Returns the estimate."""
    total = int(sum(parts.values()))
    if total > budget:
        big = max(parts, key=parts.get)
        raise InputError(f"{option}: the run needs about {total / 2**30:.2f} GiB (largest "
                         f"part: {big}, {parts[big] / 2**30:.2f} GiB) but "
                         f"{budget / 2**30:.2f} GiB are allowed; {hint}")
    return total


def plan_memory(estimate: Callable[[int], dict[str, int]], n_particles: int, box: int,
                budget: int, batch_memory: int, n_images: int | None = None) -> MemoryPlan:
    """Fit a run into `budget` bytes. `estimate(batch_memory)` gives the engine's parts
    without the image cache (`em.memory.estimate_memory`); the runtime, the per-particle tables,
    the image reads and (if chosen) the cache are added here. The batch memory is halved from
    `batch_memory` until the run fits (powers of two, so that nearby budgets give the same
    batches and so the same numbers); the images are cached when they fit as well (giving up
    batch memory down to CACHE_BATCH_MEMORY for it), else streamed from disk. InputError
    when even MIN_BATCH_MEMORY does not fit. n_images: the images this process would cache
    (default n_particles; under mpirun a rank's share, `parallel.Ranks.local_images`)."""
    from ..em.data import cache_size, read_chunk

    fixed = {"runtime": RUNTIME_BYTES, "particle tables": n_particles * PER_PARTICLE_BYTES}
    images = cache_size(n_particles if n_images is None else n_images, box)
    reads = read_chunk(box) * box * box * 48  # float32 + float64 images, complex128 FTs
    candidates = []
    bm = int(batch_memory)
    while True:
        candidates.append(bm)
        if bm <= MIN_BATCH_MEMORY:
            break
        bm = max(MIN_BATCH_MEMORY, bm // 2)
    plans = []
    for bm in candidates:
        parts = {**fixed, **{k: v for k, v in estimate(bm).items() if k != "images"}}
        plans.append((bm, parts))
        if sum(parts.values()) + images <= budget and (bm >= CACHE_BATCH_MEMORY
                                                       or bm == candidates[0]):
            return MemoryPlan(budget, bm, True, {**parts, "image cache": images})
    for bm, parts in plans:
        parts = {**parts, "image reads": reads}
        if sum(parts.values()) <= budget:
            return MemoryPlan(budget, bm, False, parts)
    check_memory(plans[-1][1] | {"image reads": reads}, budget)
    raise AssertionError("unreachable")  # pragma: no cover


# -- particles -------------------------------------------------------------------------------


def grid_notes(particles) -> list[str]:
    """Log lines for optics groups on another grid than optics group 1's (the reference's):
    their images are brought onto it by Fourier cropping/padding (em.data.ImageSource)."""
    if not particles.mixed_grids:
        return []
    box, pix = particles.reference_grid
    others = ", ".join(f"group {g + 1}: {int(b)} px of {p:g} Å"
                       for g, (b, p) in enumerate(zip(particles.boxes, particles.pixel_sizes,
                                                      strict=True)) if g)
    return [f"optics groups on other grids ({others}) brought onto optics group 1's "
            f"{box} px of {pix:g} Å by Fourier cropping/padding; σ² per optics group"]


_ABERRATION_NAMES = {"beam_tilt": "beam tilt", "odd_zernike": "odd Zernike",
                     "even_zernike": "even Zernike", "mag_matrix": "magnification matrix"}


def aberration_notes(particles, use_ctf: bool) -> list[str]:
    """Log lines for the aberrations in the optics table: applied in the forward model with
    the CTF (em.data.ImageSource, em.engine; docs/conventions.md, "Aberrations"), or not
    applied when the CTF is off."""
    if not particles.has_ctf and use_ctf:
        return []
    found = [name for name, v in particles.aberrations().items()
             if v is not None and np.any(v != (np.eye(2) if name == "mag_matrix" else 0))]
    if not found:
        return []
    what = ", ".join(_ABERRATION_NAMES[n] for n in found)
    if not use_ctf:
        return [f"aberrations in the optics table ({what}) not applied: no CTF correction"]
    ab = particles.aberrations()
    parts = []
    for name in found:
        v = ab[name]
        if name == "beam_tilt":
            parts.append("beam tilt " + "; ".join(f"group {g + 1} ({t[0]:g}, {t[1]:g}) mrad"
                                                  for g, t in enumerate(v)))
        elif name == "mag_matrix":
            parts.append("magnification matrix " + "; ".join(
                f"group {g + 1} [{m[0, 0]:g} {m[0, 1]:g}; {m[1, 0]:g} {m[1, 1]:g}]"
                for g, m in enumerate(v)))
        else:
            parts.append(f"{_ABERRATION_NAMES[name]} ({v.shape[1]} coefficients)")
    return ["aberrations applied in the forward model, per optics group (RELION 3.1+): "
            + ", ".join(parts)]


def check_particles_for_em(particles, options) -> None:
    """The per-particle values an E/M run uses beyond what loading checked, and the options
    that depend on the particles (box, pixel size); InputError naming the file, the row, the
    field and the range."""
    box, pix = particles.reference_grid
    options.validate_for(box, pix)
    # origins against each particle's own box (optics groups may differ in box and pixel)
    origins = particles.origins_px()
    half = particles.particle_boxes() / 2
    far = np.abs(origins).max(axis=1) > half
    if np.any(far):
        r = int(np.argmax(far))
        label = "rlnOriginXAngst" if abs(origins[r, 0]) > half[r] else "rlnOriginYAngst"
        own_pix = float(particles.particle_pixel_sizes([r])[0])
        value = origins[r, 0 if label.startswith("rlnOriginX") else 1] * own_pix
        raise InputError(f"{particles.star_path}: data_particles, row {r + 1}: {label} = "
                         f"{value:g}; expected |origin| <= {half[r] * own_pix:g} Å (half the "
                         f"box, {int(2 * half[r])} px of {own_pix:g} Å)")


# -- resuming --------------------------------------------------------------------------------


@dataclass
class ResumePoint:
    """Where a continued run starts: the last readable state (None: from the start), the
    lines to log about how it was found, and whether the run had already finished."""

    iteration: int
    state: object | None
    notes: list[str] = field(default_factory=list)
    finished: bool = False


def read_job_file(outdir: str | Path, what: str) -> dict:
    """job.json of the run in outdir (one InputError line when missing, truncated or not a
    JSON object); `what` names the kind of run in the message."""
    path = Path(outdir) / "job.json"
    if not path.is_file():
        raise InputError(f"{path}: no {what} to continue here (job.json missing)")
    try:
        job = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise InputError(f"{path}: not a readable {what} job file ({e})") from None
    if not isinstance(job, dict) or not isinstance(job.get("options"), dict) \
            or not isinstance(job.get("i"), str):
        raise InputError(f"{path}: not a readable {what} job file (expected a JSON object "
                         f"with kind, i, ref and options)")
    return job


def plan_job_memory(particles, options, budget: int, estimate: Callable,
                    ranks: Ranks = SINGLE, box: int | None = None
                    ) -> tuple[MemoryPlan, object]:
    """The memory plan of a job (`plan_memory` over `estimate(particles, options,
    batch_memory)`, the images this process caches under MPI) and the options with the
    plan's batch memory."""
    n = particles.n_particles
    plan = plan_memory(lambda bm: estimate(particles, options, bm), n,
                       particles.grid_box if box is None else box, budget,
                       options.batch_memory, ranks.local_images(n))
    return plan, replace(options, batch_memory=plan.batch_memory)


def saved_run(outdir: str | Path, what: str, kinds: tuple[str, ...], options_cls) -> dict:
    """job.json of the run in outdir (`what`: its kind in words) with its options as
    `options_cls` (validated); one InputError line when it is missing, truncated, of another
    kind than `kinds` or has options this version cannot read."""
    path = Path(outdir) / "job.json"
    job = read_job_file(outdir, what)
    if job.get("kind") not in kinds:
        article = "an" if what[0] in "aeiou" else "a"
        raise InputError(f"{path}: the run in {outdir} is not {article} {what} "
                         f"(kind {job.get('kind')!r})")
    try:
        job["options"] = options_cls(**job["options"])
        job["options"].validate()
    except (TypeError, ValueError) as e:
        raise InputError(f"{path}: not a readable {what} job file ({e})") from None
    return job


def find_resume_point(outdir: str | Path, state_class, n_particles: int | None = None,
                      **extra) -> ResumePoint:
    """The last iteration of the run in outdir whose state file reads back; a damaged one
    (truncated, empty, corrupt) is skipped for the one before, with a note. A state of
    another layout, or damaged states only, stop the run (InputError): a continue never
    starts again silently. No state file at all (stopped during its first iteration):
    iteration 0 (state None), with a note. `n_particles`: refuse a state of another
    particle set."""
    notes: list[str] = []
    its = sorted((int(m.group(1)) for p in Path(outdir).glob("run_it*_state.npz")
                  if (m := STATE_PATTERN.match(p.name))), reverse=True)
    for it in its:
        path = Path(outdir) / f"run_it{it:03d}_state.npz"
        try:
            state = load_state(path, state_class, **extra)
        except DamagedState as e:
            notes.append(f"{e}; continuing from the iteration before")
            continue
        n = getattr(state, "angles", np.zeros((0, 3))).shape[0]
        if n_particles is not None and n != n_particles:
            raise InputError(f"{path}: the saved state has {n} particles but the particle "
                             f"file has {n_particles}; expected the run's own particles")
        job = Path(outdir) / "job.json"
        finished = False
        if job.is_file():
            try:
                finished = json.loads(job.read_text()).get("finished") == it
            except (OSError, UnicodeDecodeError, ValueError, AttributeError):
                finished = False
        return ResumePoint(it, state, notes, finished)
    if its:
        raise InputError(f"{outdir}: no intact iteration state (run_it{its[-1]:03d}_state.npz "
                         f"to run_it{its[0]:03d}_state.npz are all damaged); nothing to "
                         f"continue from: start a new run in another --o")
    notes.append(f"{outdir}: no iteration had finished; starting from the beginning")
    return ResumePoint(0, None, notes)


# -- the job -------------------------------------------------------------------------------


class Job:
    """Runs iterations of a schedule in an output folder; subclasses supply the work.

    Subclasses implement: `kind` (job.json's kind), `initial_state()` (computation only:
    nothing is written before every input has been read), `description()` (job.json's
    content), `header()` (run.log's first line), `state_class`, `iterate(state) -> str` (one
    iteration; returns its log line), `finished(state) -> bool`, `write_iteration(root,
    state)` and `write_final(state)`.

    The output folder is created only once the initial state (or the state to continue
    from) is in hand, so that a run refused for its inputs leaves nothing behind. A run's
    job.json records what --continue needs (inputs, options, threads, memory budget) and,
    once the final outputs are written, the iteration the run finished at.

    outdir None runs in memory (the Python API without an output folder): the same
    iterations, with the log lines echoed and kept in `log.lines`, and no file written.
    """

    kind = "job"
    state_class: type

    def __init__(self, outdir: str | Path | None, resume: bool = False,
                 echo: Callable[[str], None] | None = print, ranks: Ranks = SINGLE) -> None:
        if outdir is None and resume:
            raise InputError("--continue: needs the output folder of the run to continue")
        self.outdir = None if outdir is None else Path(outdir)
        self.resume = resume
        self.echo = echo
        self.ranks = ranks  # under mpirun every rank computes, rank 0 alone writes
        self.log: Log | None = None
        self.memory: MemoryPlan | None = None
        self.notes: list[str] = []  # lines for run.log once it is open

    # -- folder ----------------------------------------------------------------------------

    @staticmethod
    def check_output(outdir: str | Path | None, resume: bool) -> None:
        """Before any work: --o is (or can be made) a writable folder, and a fresh run does
        not go into a folder that already holds a run (so that a later --continue can never
        resume from a stale one). None (a run in memory): nothing to check."""
        if outdir is None:
            if resume:
                raise InputError("--continue: needs the output folder of the run to continue")
            return
        check_output_dir(outdir, "--o")
        if not resume and last_iteration(Path(outdir)) is not None:
            raise InputError(f"{outdir}: already holds a run (run_itNNN_state.npz); use "
                             "--continue to resume it or choose another --o")

    def progress_bar(self, total: int, desc: str):
        """A progress bar for this job's processes (`progress_bar`)."""
        return progress_bar(total, desc, self.ranks)

    def open(self) -> None:
        """Create the output folder and run.log; remove the temporary files of writes that an
        interrupted run left behind. In memory: a log without a file."""
        if self.outdir is None:
            self.log = Log(None, self.echo)
            return
        make_output_dir(self.outdir, "--o")
        removed = remove_stale_temps(self.outdir)
        try:
            self.log = Log(self.outdir / "run.log", self.echo)
        except (OSError, UnicodeDecodeError) as e:
            raise InputError(f"{self.outdir / 'run.log'}: cannot read the log ({e})") from None
        if removed:
            self.log(f"removed {len(removed)} temporary file(s) of interrupted writes: "
                     + ", ".join(p.name for p in removed))

    def job_info(self) -> dict:
        """Run settings recorded in job.json besides the inputs and options."""
        from .._kernels import core

        info = {"threads": int(core.max_threads())}
        if self.memory is not None:
            info["max_memory"] = self.memory.budget / 2**30  # GiB, exact: budget is an int
        return info

    def write_job_file(self, description: dict, **extra) -> None:
        """job.json: what --continue needs to restart the run."""
        if self.outdir is None:
            return
        write_text_atomic(self.outdir / "job.json",
                          json.dumps({"kind": self.kind, **description, **self.job_info(),
                                      **extra}, indent=1))

    def _mark_finished(self, iteration: int) -> None:
        """Record in job.json that the final outputs are complete."""
        if self.outdir is None:
            return
        path = self.outdir / "job.json"
        job = json.loads(path.read_text())
        job["finished"] = int(iteration)
        write_text_atomic(path, json.dumps(job, indent=1))

    # -- to implement ----------------------------------------------------------------------

    def initial_state(self):  # pragma: no cover - abstract
        raise NotImplementedError

    def description(self) -> dict:  # pragma: no cover - abstract
        raise NotImplementedError

    def header(self) -> str:  # pragma: no cover - abstract
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

    def run(self, start: ResumePoint | None = None):
        """Start or continue the run; returns the final state. `start`: where to continue
        (default: found in the folder when resuming). A finished run is left unchanged."""
        self.check_output(self.outdir, self.resume)
        if self.resume and start is None:
            start = find_resume_point(self.outdir, self.state_class, **self.state_extra())
        if start is not None and start.state is not None and start.finished \
                and self.finished(start.state):
            if self.echo is not None:
                self.echo(f"{self.outdir}: the run finished at iteration {start.iteration}; "
                          f"nothing to do (its final outputs are unchanged)")
            return start.state
        fresh = start is None or start.state is None
        state = self.initial_state() if fresh else start.state
        writer = self.ranks.writes_outputs  # docs/mpi.md
        if writer:
            self.open()
        else:
            self.log = lambda line: None
        for line in (start.notes if start is not None else []) + self.notes + self.ranks.notes():
            self.log(line)
        if fresh:
            if writer:
                self.write_job_file(self.description())
            self.log(self.header())
        else:
            self.log(f"continuing from iteration {start.iteration} in {self.outdir}")
        if self.memory is not None:
            self.log(self.memory.describe())
        while not self.finished(state):
            t0 = time.perf_counter()
            line = self.iterate(state)
            mpi_lines = self.ranks.after_iteration(state)  # ranks' memory, reductions
            if writer and self.outdir is not None:
                root = iteration_root(self.outdir, state.iteration)
                self.write_iteration(root, state)
                save_state(Path(f"{root}_state.npz"), state)
            self.log(f"{line} ({time.perf_counter() - t0:.1f} s)")
            for note in mpi_lines:
                self.log(note)
        if writer and self.outdir is not None:
            self.write_final(state)
            self._mark_finished(state.iteration)
        return state
