"""Runs split across processes under `mpirun` (docs/mpi.md).

This module is always importable and imports nothing beyond the standard library: it detects
a launch by mpirun and defines `Ranks`, the processes that run a job. A `Ranks` is handed to
the job (`ranks=` of the jobs and of the API; `mpi.run_worker` passes its `MPIContext`) and
travels with the job's `ImageSource` (`source.ranks`) to the EM schedules; nothing is global.
`SINGLE`, the base class, is one process alone; `mpi.MPIContext` overrides every method:

- `run_pass`: `engine.run_pass`, or this rank's share of the pass with its sums reduced over
  the ranks in rank order (`em/refine.py`, `em/classify.py`, `em/initial_model.py`);
- `expected_accuracy`: `accuracy.expected_accuracy`, or the same with the images read by
  their owners and exchanged;
- `image_source`: an `ImageSource`, or one over this rank's particles only;
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
    from ..em.engine import PassResult
    from ..em.noise import NoiseModel
    from ..em.search import Search
    from ..particles import ParticleSet

#: Environment variables that a launcher sets in the processes it starts: Open MPI, MPICH's and
#: Intel MPI's hydra (PMI), PMIx launchers (Open MPI 5, srun --mpi=pmix), MPICH's local count.
LAUNCHER_VARIABLES = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE", "PMIX_RANK", "MPI_LOCALNRANKS")
#: Variables holding the number of processes, in the order they are trusted.
SIZE_VARIABLES = ("OMPI_COMM_WORLD_SIZE", "PMI_SIZE")
#: Variables holding this process's rank.
RANK_VARIABLES = ("OMPI_COMM_WORLD_RANK", "PMI_RANK", "PMIX_RANK")
#: The commands that run split across ranks.
MPI_COMMANDS = ("refine", "class3d", "class2d", "hetero_refine", "reconstruct")

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


class Ranks:
    """The processes that run a job. This base class is one process alone, every method the
    single-process behaviour; `mpi.MPIContext` is the same interface over the ranks of an
    mpirun."""

    rank = 0
    size = 1

    @property
    def writes_outputs(self) -> bool:
        """Whether this process writes outputs and logs (rank 0)."""
        return self.rank == 0

    def run_pass(self, source: ImageSource, indices: np.ndarray, references: list,
                 search: Search, noise: NoiseModel, previous_rotations: np.ndarray,
                 previous_origins: np.ndarray, offset_prior: np.ndarray | None = None,
                 batch_size: int = 256, slice_memory: int = 512 << 20,
                 progress: Callable[[int], None] | None = None,
                 amplitudes: np.ndarray | None = None) -> PassResult:
        """`engine.run_pass` (the same parameters) over the whole pass."""
        from ..em.engine import run_pass

        return run_pass(source, indices, references, search, noise, previous_rotations,
                        previous_origins, offset_prior, batch_size=batch_size,
                        slice_memory=slice_memory, progress=progress, amplitudes=amplitudes)

    def expected_accuracy(self, reference: Any, source: ImageSource, *args: Any,
                          **kwargs: Any) -> tuple[float, float]:
        """`accuracy.expected_accuracy` (the same parameters)."""
        from ..em.accuracy import expected_accuracy

        return expected_accuracy(reference, source, *args, **kwargs)

    def image_source(self, particles: ParticleSet, mask_radius_px: float, mask_edge_px: float,
                     use_ctf: bool, cache_bytes: int | None) -> ImageSource:
        """The `ImageSource` of the particles that this process reads."""
        from ..em.data import ImageSource

        return ImageSource(particles, mask_radius_px, mask_edge_px, use_ctf, cache_bytes,
                           ranks=self)

    def local_images(self, n_particles: int) -> int:
        """How many of n particles' images this process holds."""
        return n_particles

    def own(self, indices: np.ndarray, n_particles: int) -> np.ndarray:
        """(len(indices),) bool: the particles among `indices` whose images this process
        reads."""
        import numpy as np

        return np.ones(np.shape(indices), bool)

    def sum_backprojectors(self, backprojectors: list) -> None:
        """Add each back-projector's data and weight over the processes (in place)."""

    def notes(self) -> list[str]:
        """run.log lines about the processes of the run."""
        return []

    def after_iteration(self, state: object) -> list[str]:
        """run.log lines after an iteration (collective: every process calls it)."""
        return []


#: One process alone.
SINGLE = Ranks()
