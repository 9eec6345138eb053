"""Runs split across processes under `mpirun` (docs/mpi.md).

This module is always importable and imports nothing beyond the standard library: it detects
a launch by mpirun and holds the hooks that the jobs call. Without mpirun every hook is the
single-process behaviour. Under mpirun, `launch` (no mpi4py) supervises the rank and
`mpi` (mpi4py) runs it; only then is `_context` set, by `mpi.run_worker`.

The hooks (each one line where it is called):

- `run_pass`: `engine.run_pass`, or this rank's share of the pass with its sums reduced over
  the ranks in rank order (`em/refine.py`, `em/classify.py`);
- `expected_accuracy`: `accuracy.expected_accuracy`, or under mpirun the same with the images
  read by their owners and exchanged (`em/refine.py`, `em/classify.py`);
- `image_source`: an `ImageSource`, or one over this rank's particles only (`jobs/refine.py`);
- `local_images`: the number of images this process caches, for the memory plan;
- `own`: which of some particles this rank reads, `sum_backprojectors`: their sums added over
  the ranks (the initial 2D class averages, `jobs/classify.py`);
- `writes_outputs`: whether this process writes files and logs (rank 0);
- `notes`, `after_iteration`: run.log lines (ranks, per-rank peak memory, reductions).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:  # pragma: no cover
    import numpy as np

    from ..em.data import ImageSource
    from ..em.engine import PassResult, Search
    from ..em.noise import NoiseModel
    from ..particles import ParticleSet
    from .mpi import MPIContext

#: Environment variables that a launcher sets in the processes it starts: Open MPI, MPICH's and
#: Intel MPI's hydra (PMI), PMIx launchers (Open MPI 5, srun --mpi=pmix), MPICH's local count.
LAUNCHER_VARIABLES = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS")
#: Variables holding the number of processes, in the order they are trusted.
SIZE_VARIABLES = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE")
#: Variables holding this process's rank.
RANK_VARIABLES = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK")
#: The commands that run split across ranks.
MPI_COMMANDS = ("refine", "class3d", "class2d", "reconstruct")

_context: MPIContext | None = None


def _first_number(names: tuple[str, ...], environ: dict[str, str] | None) -> int | None:
    """The first of the variables `names` that holds a whole number (None: none does)."""
    env = os.environ if environ is None else environ
    for name in names:
        value = env.get(name, "")
        if value.isdigit():
            return int(value)
    return None


def launcher_size(environ: dict[str, str] | None = None) -> int | None:
    """Number of processes the launcher started (None: not said, or not launched)."""
    return _first_number(SIZE_VARIABLES, environ)


def launcher_rank(environ: dict[str, str] | None = None) -> int | None:
    """This process's rank as the launcher set it (None: not said)."""
    return _first_number(RANK_VARIABLES, environ)


def launched_by_mpirun(environ: dict[str, str] | None = None) -> bool:
    """Whether this process is one of several started by mpirun (or srun with PMI/PMIx):
    a launcher variable is set and the number of processes is not 1."""
    env = os.environ if environ is None else environ
    if not any(name in env for name in LAUNCHER_VARIABLES):
        return False
    return launcher_size(env) != 1


def requested(argv: list[str]) -> bool:
    """Whether a command line runs as one rank of a parallel job: launched by mpirun, or
    `--mpi` given to a command that can."""
    if launched_by_mpirun():
        return True
    return bool(argv) and argv[0] in MPI_COMMANDS and "--mpi" in argv


def context() -> MPIContext | None:
    """The running MPI context (None: a single process)."""
    return _context


def writes_outputs() -> bool:
    """Whether this process writes outputs and logs: always, except ranks other than 0."""
    return _context is None or _context.rank == 0


def run_pass(source: ImageSource, indices: np.ndarray, references: list, search: Search,
             noise: NoiseModel, previous_rotations: np.ndarray, previous_origins: np.ndarray,
             offset_prior: np.ndarray | None = None, batch_size: int = 256,
             slice_memory: int = 512 << 20, progress: Callable[[int], None] | None = None
             ) -> PassResult:
    """`engine.run_pass` (the same parameters), or under mpirun the same pass split across
    the ranks (each runs its own particles, the results are reduced in rank order and every
    rank gets the whole)."""
    if _context is None:
        from ..em.engine import run_pass as local

        runner = local
    else:
        runner = _context.run_pass
    return runner(source, indices, references, search, noise, previous_rotations,
                  previous_origins, offset_prior, batch_size=batch_size,
                  slice_memory=slice_memory, progress=progress)


def expected_accuracy(reference: Any, source: ImageSource, *args: Any, **kwargs: Any
                      ) -> tuple[float, float]:
    """`accuracy.expected_accuracy`; under mpirun (every rank calls it alike, the M-step being
    the same on every rank) each rank reads its own particles' images among those drawn and
    they are exchanged, so that no rank reads another's."""
    from ..em.accuracy import expected_accuracy as local

    if _context is None or not hasattr(source, "shared_reads"):
        return local(reference, source, *args, **kwargs)
    with source.shared_reads():
        return local(reference, source, *args, **kwargs)


def image_source(particles: ParticleSet, mask_radius_px: float, mask_edge_px: float,
                 use_ctf: bool, cache_bytes: int | None) -> ImageSource:
    """An `ImageSource`, or under mpirun one that caches and reads this rank's particles only
    (`mpi.RankImageSource`)."""
    if _context is None:
        from ..em.data import ImageSource

        return ImageSource(particles, mask_radius_px, mask_edge_px, use_ctf, cache_bytes)
    return _context.image_source(particles, mask_radius_px, mask_edge_px, use_ctf, cache_bytes)


def local_images(n_particles: int) -> int:
    """How many of n particles' images this process holds (all of them without mpirun)."""
    return n_particles if _context is None else int(_context.share(n_particles).size)


def own(indices: np.ndarray, n_particles: int) -> np.ndarray:
    """(len(indices),) bool: the particles among `indices` whose images this process reads."""
    import numpy as np

    idx = np.asarray(indices)
    if _context is None:
        return np.ones(idx.shape, bool)
    return _context.owns(idx, n_particles)


def sum_backprojectors(backprojectors: list) -> None:
    """Add each back-projector's data and weight over the ranks, in rank order (in place);
    nothing without mpirun."""
    if _context is not None:
        _context.sum_backprojectors(backprojectors)


def notes() -> list[str]:
    """run.log lines about the parallel run (none without mpirun)."""
    return [] if _context is None else _context.notes()


def after_iteration(state: object) -> list[str]:
    """After an iteration: under mpirun, check that every rank holds the same state (rank 0's
    is sent to the others if not) and return run.log lines with per-rank peak memory and the
    reductions' size and time. Collective: every rank calls it. Nothing without mpirun."""
    return [] if _context is None else _context.after_iteration(state)
