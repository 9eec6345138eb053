"""The process mpirun starts for each rank: a small supervisor of the rank's worker.

Under mpirun, `cryomap refine ...` does not run the job itself: it starts the same command
again as a child (the worker, `cryomap.parallel.mpi.run_worker`, which initialises MPI and
computes) and waits for it, as `mpirun -n N sh -c 'cryomap ...'` would. The supervisor
exists for one reason: a worker that dies without a word (killed for memory, a crash in
native code, `os._exit`) cannot say so itself, and mpirun then stops the other ranks without
naming it (or, for some exit codes, silently). The supervisor sees the exit and prints one
line naming the rank, its host and the cause before passing the exit status on to mpirun,
which stops the job. A worker that reports its own error (and calls MPI_Abort) tells the
supervisor so through a pipe, so that the line is not printed twice.

This module does not import mpi4py (nor numpy): only the worker does.
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import subprocess
import sys
from collections.abc import Callable

from . import MPI_COMMANDS, launcher_rank, launcher_size

#: Set in the worker's environment: "run the job" rather than "supervise".
WORKER_ENV = "CRYOMAP_MPI_WORKER"
#: The file descriptor on which the worker reports "done" or "error" to its supervisor.
REPORT_ENV = "CRYOMAP_MPI_REPORT_FD"
#: Signals passed on to the worker (mpirun and batch systems stop jobs with these).
FORWARDED = ("SIGTERM", "SIGINT", "SIGHUP", "SIGUSR1", "SIGUSR2")


def _say(line: str, everyone: bool = False) -> None:
    """A line on stderr, from rank 0 only (every rank would print the same) unless
    `everyone`."""
    if everyone or launcher_rank() in (0, None):
        print(line, file=sys.stderr, flush=True)


def launch(argv: list[str], build_parser: Callable[[], argparse.ArgumentParser]
           ) -> int | None:
    """Run `cryomap argv` as one rank of a parallel job (`build_parser`: the command line's
    parser, whose commands the worker runs). Returns the exit status, or None when the
    command line is not a job (--help, --version, no command): it then runs as usual, in
    this process."""
    if os.environ.get(WORKER_ENV):
        from .mpi import run_worker

        return run_worker(argv, build_parser)
    command = argv[0] if argv else ""
    if not command or command.startswith("-"):
        return None
    if command not in MPI_COMMANDS:
        _say(f"cryomap {command}: error: `{command}` does not run under mpirun; only "
             f"{', '.join(MPI_COMMANDS)} do (docs/mpi.md)")
        return 2
    try:
        import mpi4py  # noqa: F401  (the package only: MPI itself starts in the worker)
    except ImportError:
        size = launcher_size()
        _say(f"cryomap {command}: error: started by mpirun"
             f"{f' ({size} processes)' if size else ''} but mpi4py is not installed; "
             f"install it with pip install 'cryomap[mpi]' (or the cluster's mpi4py), or run "
             f"without mpirun (docs/mpi.md)")
        return 2
    return supervise(argv)


def _die_with_parent() -> None:
    """In the worker, before exec: be killed when the supervisor dies (mpirun kills the
    supervisors of a stopped job; the workers must not outlive them). Linux only."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def supervise(argv: list[str]) -> int:
    """Start the worker for this rank, pass signals on to it, wait, and describe an exit that
    the worker did not report itself. Returns the exit status for mpirun."""
    command = argv[0]
    read_fd, write_fd = os.pipe()
    os.set_inheritable(write_fd, True)
    env = dict(os.environ, **{WORKER_ENV: "1", REPORT_ENV: str(write_fd)})
    parent = os.getpid()

    def child_setup() -> None:
        _die_with_parent()
        if os.getppid() != parent:  # the supervisor died before the line above
            os._exit(1)

    # close_fds=False: the launcher's own descriptors (e.g. MPICH's PMI_FD) reach the worker
    worker = subprocess.Popen([sys.executable, "-m", "cryomap", *argv], env=env,
                              close_fds=False, preexec_fn=child_setup)
    os.close(write_fd)
    stopped_by: list[int] = []

    def forward(signum: int, _frame) -> None:
        stopped_by.append(signum)
        try:
            worker.send_signal(signum)
        except OSError:
            pass

    for name in FORWARDED:
        if hasattr(signal, name):
            signal.signal(getattr(signal, name), forward)
    while True:
        try:
            code = worker.wait()
            break
        except KeyboardInterrupt:  # pragma: no cover - SIGINT is forwarded above
            continue
    with os.fdopen(read_fd, "r") as pipe:
        report = pipe.read()
    if code == 0 and "done" in report:
        return 0
    status = code if code > 0 else 128 - code if code < 0 else 1
    if "error" in report or stopped_by:
        return status  # the worker said why, or the job was stopped from outside
    rank = launcher_rank()
    if code < 0:
        try:
            name = signal.Signals(-code).name
        except ValueError:
            name = f"signal {-code}"
        what = f"killed by {name}" + (" (e.g. by the system for lack of memory)"
                                      if -code == signal.SIGKILL else "")
    elif code > 0:
        what = f"exited with code {code} without reporting an error"
    else:
        what = "exited before the run finished"
    _say(f"cryomap {command}: error: rank {rank if rank is not None else '?'} (pid "
         f"{worker.pid} on {socket.gethostname()}) ended unexpectedly: {what}; mpirun stops "
         f"the other ranks", everyone=True)
    return status
