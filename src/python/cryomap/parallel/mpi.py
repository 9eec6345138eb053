"""One rank of a parallel run under mpirun (mpi4py); imported only there (docs/mpi.md).

How a run is split:

- particles: rank r of N owns the contiguous block of particle rows [n r / N, n (r+1) / N);
  its `RankImageSource` caches (or streams) those images only and reads no others (the few
  that every rank needs at once are read by their owners and exchanged, `gather_images`).
  A pass over some particles (a half-set, all of them) runs on each rank over the ones it
  owns, which is a contiguous block of the pass's (sorted) index list;
- reductions: every rank's `PassResult` is reduced in rank order. The sums (back-projector
  data and weight, residual power, counts, class masses, offset sums) are added element by
  element as rank 0's + rank 1's + ... in float64 (a reduce-scatter by `Alltoallv`, each rank
  adding one slice of every array, then an `Allgatherv`), so the result is the same on every
  rank and does not depend on the MPI library's reduction algorithm; the per-particle tables
  are gathered whole. Every rank then holds the same `PassResult` and runs the same M-step, so
  the state stays identical on all ranks (checked after every iteration by a digest; rank 0's
  is sent to the others if not). Half-sets stay apart: each pass reduces its own sums;
- outputs: rank 0 alone writes files and run.log (`parallel.Ranks.writes_outputs`); the other ranks'
  standard output is discarded;
- failures: an exception on any rank prints one line naming the rank and calls MPI_Abort;
  a rank that dies is named by its supervisor (`launch`); ranks meet before every reduction
  with a deadline (`rendezvous`), so a rank that hangs is named too instead of the job hanging.

`CRYOMAP_MPI_FAULT=RANK:PASS:MODE` (MODE raise, exit, kill or hang) makes rank RANK fail in its
PASS-th pass, after computing and before the reduction: a hook for the tests of failures
(MODE kill: SIGKILL, as the out-of-memory killer).
`CRYOMAP_MPI_TIMEOUT` (seconds) replaces the rendezvous deadline's default.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import json
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable

import numpy as np

from .. import parallel
from ..em.data import ImageSource, cache_size
from .launch import REPORT_ENV

#: A rendezvous waits at least this long (s) for the other ranks: longer than any plausible
#: imbalance of a pass (the deadline also grows with the work done since the last one).
MIN_WAIT = 600.0
#: ... and at least this many times the work this rank did since the last rendezvous.
WAIT_FACTOR = 5.0
#: The per-iteration figures (bytes reduced, gathered, exchanged; seconds).
EMPTY_STATS = {"sums": 0, "tables": 0, "images": 0, "reduce": 0.0, "wait": 0.0,
               "passes": 0.0}
#: Elements reduced per Alltoallv/Allgatherv round (bounds the receive buffers: 128 MiB).
SEGMENT = 16 << 20
#: A rank other than 0 that refuses its input waits this long (s) before printing, so that
#: when every rank refuses the same input, rank 0's line is the only one.
INPUT_ERROR_GRACE = 2.0


class _Report:
    """The pipe to this rank's supervisor: "done" or "error" (see `launch`)."""

    def __init__(self) -> None:
        fd = os.environ.get(REPORT_ENV, "")
        self.fd = int(fd) if fd.isdigit() else None

    def __call__(self, what: str) -> None:
        if self.fd is None:
            return
        try:
            os.write(self.fd, (what + "\n").encode())
            os.close(self.fd)
        except OSError:
            pass
        self.fd = None


def peak_memory() -> int:
    """This process's peak resident memory in bytes (Linux: VmHWM; elsewhere getrusage's
    ru_maxrss, which macOS gives in bytes)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    import resource

    return int(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)


def _mpi_type(dtype: np.dtype):
    from mpi4py import MPI

    return {np.dtype(np.float32): MPI.FLOAT, np.dtype(np.float64): MPI.DOUBLE}[np.dtype(dtype)]


class MPIContext(parallel.Ranks):
    """The ranks of a run: particle shares, deterministic reductions, rendezvous with
    deadlines, the per-iteration checks and figures."""

    def __init__(self, comm, command: str = "cryomap", report: _Report | None = None) -> None:
        from mpi4py import MPI

        self.comm = comm
        self.ctl = comm.Dup()  # rendezvous messages, apart from the data's collectives
        self.rank, self.size = comm.Get_rank(), comm.Get_size()
        self.command = command
        self.report = report or _Report()
        self.hosts = comm.allgather(MPI.Get_processor_name())
        node = comm.Split_type(MPI.COMM_TYPE_SHARED)
        self.local_size = node.Get_size()
        node.Free()
        timeout = os.environ.get("CRYOMAP_MPI_TIMEOUT", "")
        self.timeout = float(timeout) if timeout else None
        self.fault = self._parse_fault(os.environ.get("CRYOMAP_MPI_FAULT", ""))
        self.passes = 0
        self._sequence = 0
        self._last = time.monotonic()
        self.stats = dict(EMPTY_STATS)

    # -- shares ----------------------------------------------------------------------------

    def bounds(self, n: int) -> np.ndarray:
        """(size + 1,) first particle row of each rank's block, and n."""
        return np.array([n * r // self.size for r in range(self.size + 1)], np.int64)

    def share(self, n: int) -> np.ndarray:
        """The particle rows this rank owns among n."""
        b = self.bounds(n)
        return np.arange(b[self.rank], b[self.rank + 1], dtype=np.int64)

    def owner(self, indices: np.ndarray, n: int) -> np.ndarray:
        """The rank owning each particle row."""
        return np.searchsorted(self.bounds(n), np.asarray(indices, np.int64), side="right") - 1

    def owns(self, indices: np.ndarray, n: int) -> np.ndarray:
        """Whether this rank owns each particle row."""
        return self.owner(indices, n) == self.rank

    def own(self, indices: np.ndarray, n_particles: int) -> np.ndarray:
        """`parallel.Ranks.own`: the particles among `indices` that this rank reads."""
        return self.owns(indices, n_particles)

    def local_images(self, n_particles: int) -> int:
        """`parallel.Ranks.local_images`: the size of this rank's share."""
        return int(self.share(n_particles).size)

    def expected_accuracy(self, reference, source, *args, **kwargs) -> tuple[float, float]:
        """`accuracy.expected_accuracy`, called alike by every rank (the M-step is the same on
        each): each rank reads its own particles' images among those drawn and they are
        exchanged, so that no rank reads another's."""
        from ..em.accuracy import expected_accuracy

        if not hasattr(source, "shared_reads"):
            return expected_accuracy(reference, source, *args, **kwargs)
        with source.shared_reads():
            return expected_accuracy(reference, source, *args, **kwargs)

    def image_source(self, particles, mask_radius_px: float, mask_edge_px: float,
                     use_ctf: bool, cache_bytes: int | None) -> RankImageSource:
        """This rank's ImageSource (cache_bytes None: its share of the default budget)."""
        if cache_bytes is None:
            from ..em.options import default_max_memory

            cache_bytes = default_max_memory() // 2 // self.local_size
        return RankImageSource(particles, mask_radius_px, mask_edge_px, use_ctf, cache_bytes,
                               self.share(particles.n_particles), self)

    # -- meeting points ----------------------------------------------------------------------

    def rendezvous(self, what: str) -> float:
        """Wait until every rank has arrived here; returns the seconds waited. A rank missing
        after the deadline (CRYOMAP_MPI_TIMEOUT, else the larger of MIN_WAIT and WAIT_FACTOR x
        the work since the last rendezvous) is named in one line and the job aborted."""
        from mpi4py import MPI

        t0 = time.monotonic()
        work = t0 - self._last
        limit = self.timeout if self.timeout is not None else max(MIN_WAIT, WAIT_FACTOR * work)
        self._sequence += 1
        tag = self._sequence % 30000 + 1
        if self.size > 1:
            if self.rank == 0:
                tokens = [np.zeros(1, np.int32) for _ in range(self.size - 1)]
                reqs = [self.ctl.Irecv(tokens[r - 1], source=r, tag=tag)
                        for r in range(1, self.size)]
                done = self._poll(reqs, t0 + limit)
                if not all(done):
                    missing = [r + 1 for r, ok in enumerate(done) if not ok]
                    self.abort(f"rank{'s' if len(missing) > 1 else ''} "
                               f"{', '.join(map(str, missing))} did not reach {what} within "
                               f"{limit:.0f} s (stuck, or lost without mpirun noticing)", 1)
                go = np.ones(1, np.int32)
                MPI.Request.Waitall([self.ctl.Isend(go, dest=r, tag=tag)
                                     for r in range(1, self.size)])
            else:
                token, go = np.full(1, self.rank, np.int32), np.zeros(1, np.int32)
                reqs = [self.ctl.Isend(token, dest=0, tag=tag),
                        self.ctl.Irecv(go, source=0, tag=tag)]
                # rank 0 decides first; this deadline only matters when rank 0 is the one lost
                if not all(self._poll(reqs, t0 + limit + 60.0)):
                    self.abort(f"rank 0 did not reach {what} within {limit + 60:.0f} s (stuck, "
                               f"or lost without mpirun noticing)", 1)
        self._last = time.monotonic()
        return self._last - t0

    @staticmethod
    def _poll(requests: list, deadline: float) -> list[bool]:
        """Test the requests until all are complete or the deadline passes, sleeping in
        between (a waiting rank leaves its cores to the others)."""
        done = [False] * len(requests)
        pause = 0.0005
        while True:
            for i, req in enumerate(requests):
                if not done[i]:
                    done[i] = bool(req.Test())
            if all(done) or time.monotonic() > deadline:
                return done
            time.sleep(pause)
            pause = min(2 * pause, 0.05)

    # -- reductions --------------------------------------------------------------------------

    def allreduce(self, x: np.ndarray) -> None:
        """Replace a contiguous float32/float64 array, on every rank, by its sum over the
        ranks taken in rank order in float64 (x_0 + x_1 + ... then rounded to x's type).
        Each rank adds one slice of the array (reduce-scatter by Alltoallv), then the slices
        are gathered (Allgatherv): every rank sends and receives about twice the array."""
        if self.size == 1 or x.size == 0:
            return
        if not x.flags.c_contiguous:
            raise ValueError("allreduce: expected a contiguous array")
        flat = x.reshape(-1)
        kind = _mpi_type(flat.dtype)
        for start in range(0, flat.size, SEGMENT):
            seg = flat[start:start + SEGMENT]
            m = seg.size
            cuts = np.array([m * r // self.size for r in range(self.size + 1)], np.int64)
            counts, displs = np.diff(cuts), cuts[:-1]
            c = int(counts[self.rank])
            parts = np.empty((self.size, c), flat.dtype)
            self.comm.Alltoallv([seg, (counts, displs), kind],
                                [parts, ([c] * self.size, [c * r for r in range(self.size)]),
                                 kind])
            acc = parts[0].astype(np.float64)
            for r in range(1, self.size):
                acc += parts[r]
            self.comm.Allgatherv([acc.astype(flat.dtype), c, kind],
                                 [seg, (counts, displs), kind])
        self.stats["sums"] += x.nbytes

    def allgather_rows(self, local: np.ndarray, counts: np.ndarray, what: str = "tables"
                       ) -> np.ndarray:
        """Rows of every rank (rank r holds counts[r]) concatenated in rank order; their bytes
        are counted in stats[what]."""
        from mpi4py import MPI

        local = np.ascontiguousarray(local)
        out = np.empty((int(counts.sum()),) + local.shape[1:], local.dtype)
        row = local.dtype.itemsize * int(np.prod(local.shape[1:], dtype=np.int64))
        if row == 0 or out.shape[0] == 0:
            return out
        kind = MPI.BYTE.Create_contiguous(row).Commit()
        try:
            displs = np.concatenate([[0], np.cumsum(counts)[:-1]])
            self.comm.Allgatherv([local, int(local.shape[0]), kind],
                                 [out, (counts, displs), kind])
        finally:
            kind.Free()
        self.stats[what] += out.nbytes
        return out

    def sum_backprojectors(self, backprojectors: list) -> None:
        """Each back-projector's data and weight summed over the ranks in rank order."""
        self.rendezvous("the sums of the initial references")
        t0 = time.perf_counter()
        for bp in backprojectors:
            bp.data = np.ascontiguousarray(bp.data)
            bp.weight = np.ascontiguousarray(bp.weight)
            self.allreduce(bp.data.view(np.float32))
            self.allreduce(bp.weight)
        self.stats["reduce"] += time.perf_counter() - t0

    def gather_images(self, source: RankImageSource, idx: np.ndarray) -> np.ndarray:
        """Collective: every rank asks for the same particles `idx`; each reads its own among
        them and every rank gets all (B, N, N//2+1) masked FTs, in `idx`'s order."""
        idx = np.asarray(idx, np.int64)
        owner = self.owner(idx, source.particles.n_particles)
        counts = np.bincount(owner, minlength=self.size).astype(np.int64)
        order = np.argsort(owner, kind="stable")  # rows in rank order
        self.stats["wait"] += self.rendezvous("an exchange of images")
        local = source.local_planes(idx[owner == self.rank])
        t0 = time.perf_counter()
        out = np.empty((idx.size,) + local.shape[1:], local.dtype)
        out[order] = self.allgather_rows(local, counts, "images")
        self.stats["reduce"] += time.perf_counter() - t0
        return out

    # -- the pass ----------------------------------------------------------------------------

    def run_pass(self, source: ImageSource, indices: np.ndarray, references: list,
                 search, noise, previous_rotations: np.ndarray, previous_origins: np.ndarray,
                 offset_prior: np.ndarray | None = None, batch_size: int = 256,
                 slice_memory: int = 512 << 20, progress=None, amplitudes=None):
        """`engine.run_pass` (the same parameters) over this rank's particles of the pass,
        reduced over the ranks: returns on every rank the PassResult of the whole pass
        (estimates in the pass's order, sums of all images). The per-image arguments
        (indices, previous poses, the offset prior, the amplitudes, the search's image_class)
        are cut to this
        rank's images; no progress bar per rank."""
        from ..em import engine

        indices = np.asarray(indices)
        owner = self.owner(indices, source.particles.n_particles)
        mine = np.flatnonzero(owner == self.rank)
        if search.image_class is not None:
            search = dataclasses.replace(search,
                                         image_class=np.asarray(search.image_class)[mine])
        self.passes += 1
        t0 = time.perf_counter()
        local = engine.run_pass(
            source, indices[mine], references, search, noise,
            np.asarray(previous_rotations)[mine], np.asarray(previous_origins)[mine],
            None if offset_prior is None else np.asarray(offset_prior)[mine],
            batch_size=batch_size, slice_memory=slice_memory, progress=None,
            amplitudes=None if amplitudes is None else np.asarray(amplitudes)[mine])
        self.stats["passes"] += time.perf_counter() - t0
        self._inject_fault()
        wait = self.rendezvous(f"the reduction of pass {self.passes}")
        t0 = time.perf_counter()
        result = self._reduce(local, owner)
        took = time.perf_counter() - t0
        self.stats["reduce"] += took
        self.stats["wait"] += wait
        result.timings["reduce"] = took
        result.timings["wait"] = wait
        return result

    def _reduce(self, local, owner: np.ndarray):
        """The whole pass's PassResult from every rank's (see the module docstring)."""
        est = local.estimates
        counts = np.bincount(owner, minlength=self.size).astype(np.int64)
        order = np.argsort(owner, kind="stable")  # pass rows in rank order
        values = {}
        for f in dataclasses.fields(est):
            part = getattr(est, f.name)
            full = np.empty((owner.size,) + part.shape[1:], part.dtype)
            full[order] = self.allgather_rows(part, counts)
            values[f.name] = full
        for bp in local.backprojectors:
            bp.data = np.ascontiguousarray(bp.data)
            bp.weight = np.ascontiguousarray(bp.weight)
            self.allreduce(bp.data.view(np.float32))
            self.allreduce(bp.weight)
        small = np.concatenate([local.residual.ravel(), local.count.ravel(),
                                local.class_mass.ravel(), [local.offset_sq]])
        self.allreduce(small)
        r, c, k = local.residual.size, local.count.size, local.class_mass.size
        timings = self.comm.allgather(local.timings)
        return dataclasses.replace(
            local, estimates=type(est)(**values),
            residual=small[:r].reshape(local.residual.shape),
            count=small[r:r + c].reshape(local.count.shape),
            class_mass=small[r + c:r + c + k].reshape(local.class_mass.shape),
            offset_sq=float(small[-1]),
            # the slowest rank's times: what the pass took in wall-clock terms
            timings={key: max(t.get(key, 0.0) for t in timings) for key in timings[0]})

    @staticmethod
    def _parse_fault(text: str) -> tuple[int, int, str] | None:
        parts = text.split(":")
        if len(parts) != 3 or not (parts[0].isdigit() and parts[1].isdigit()):
            return None
        return int(parts[0]), int(parts[1]), parts[2]

    def _inject_fault(self) -> None:
        """The tests' failure hook (CRYOMAP_MPI_FAULT, module docstring)."""
        if self.fault is None or self.fault[:2] != (self.rank, self.passes):
            return
        mode = self.fault[2]
        if mode == "exit":
            os._exit(3)
        if mode == "kill":  # as the system's out-of-memory killer does
            os.kill(os.getpid(), signal.SIGKILL)
        if mode == "hang":
            time.sleep(3600)
        raise RuntimeError(f"injected failure in pass {self.passes} (CRYOMAP_MPI_FAULT)")

    # -- per iteration -------------------------------------------------------------------

    def notes(self) -> list[str]:
        """run.log lines at the start of a run."""
        from mpi4py import MPI

        from .._kernels import core

        nodes = sorted(set(self.hosts))
        where = ", ".join(nodes[:4]) + (", ..." if len(nodes) > 4 else "")
        return [f"MPI: {self.size} ranks on {len(nodes)} node(s) ({where}), "
                f"{core.max_threads()} thread(s) per rank, {MPI.Get_library_version().split()[0]}"
                f" {'.'.join(map(str, MPI.Get_version()))}; each rank reads its own block of "
                f"the particles, rank 0 writes (docs/mpi.md)"]

    def after_iteration(self, state: object) -> list[str]:
        """Collective: the state digest check and the iteration's MPI figures."""
        lines = []
        self.rendezvous("the end of the iteration")
        digests = self.comm.allgather(state_digest(state))
        if len(set(digests)) > 1:
            differ = [r for r, d in enumerate(digests) if d != digests[0]]
            fresh = self.comm.bcast(state if self.rank == 0 else None, root=0)
            for f in dataclasses.fields(state):
                setattr(state, f.name, getattr(fresh, f.name))
            lines.append(f"MPI: rank(s) {', '.join(map(str, differ))} computed a state "
                         f"different from rank 0's (different CPUs or libraries?); rank 0's "
                         f"was sent to every rank")
        peaks = np.array(self.comm.allgather(peak_memory())) / 2**30
        stats = self.comm.allgather(dict(self.stats))
        sums = stats[0]["sums"] / 2**20
        tables = stats[0]["tables"] / 2**20
        reduce = max(s["reduce"] for s in stats)
        wait = max(s["wait"] for s in stats)
        passes = max(s["passes"] for s in stats)
        if self.size <= 8:
            memory = " ".join(f"{p:.2f}" for p in peaks) + " GiB (ranks 0.." \
                     f"{self.size - 1})"
        else:
            memory = (f"max {peaks.max():.2f} GiB (rank {int(peaks.argmax())}), median "
                      f"{np.median(peaks):.2f}, min {peaks.min():.2f}")
        images = stats[0]["images"] / 2**20
        lines.append(f"MPI: peak memory (VmHWM) {memory}; reduced {sums:.1f} MiB of sums, "
                     f"gathered {tables:.2f} MiB of particle tables and {images:.2f} MiB of "
                     f"shared images in {reduce:.2f} s; waited {wait:.2f} s for the slowest rank; "
                     f"its engine passes took {passes:.2f} s")
        self.stats = dict(EMPTY_STATS)
        return lines

    # -- ending ------------------------------------------------------------------------------

    def finish(self) -> None:
        """Every rank at the end of the run (rank 0 has written its outputs)."""
        self.rendezvous("the end of the run")

    def abort(self, message: str, code: int) -> None:
        """One line naming this rank, then MPI_Abort: mpirun stops every rank."""
        print(f"cryomap {self.command}: error: rank {self.rank} of {self.size} "
              f"({self.hosts[self.rank]}): {message}", file=sys.stderr, flush=True)
        self.report("error")
        self.comm.Abort(code)
        os._exit(code)  # pragma: no cover - Abort does not return

    def fail(self, error: BaseException) -> None:
        """An exception on this rank: its one line (as `cli.main` words it), then abort."""
        from ..errors import InputError, one_line

        code = 2
        if isinstance(error, InputError):
            message = str(error)
            if self.rank != 0:  # every rank may refuse the same input: let rank 0 speak
                time.sleep(INPUT_ERROR_GRACE)
        elif isinstance(error, OSError):
            where = f"{error.filename}: " if error.filename else ""
            message = f"{where}{error.strerror or error}"
        elif isinstance(error, MemoryError):
            message = ("out of memory; lower --max_memory (it sizes the batches) or the "
                       "sampling, or run fewer ranks per node")
        elif isinstance(error, KeyboardInterrupt):
            message, code = "interrupted", 130
        elif isinstance(error, SystemExit):
            message, code = f"exited (code {error.code}) before the run finished", 1
        else:
            message, code = f"{type(error).__name__}: {error}", 1
        if os.environ.get("CRYOMAP_MPI_TRACEBACK"):
            traceback.print_exception(error, file=sys.stderr)
        self.abort(one_line(message), code)


def state_digest(state: object) -> str:
    """A digest of a job state's arrays and settings (not its history, which holds each
    rank's own timings)."""
    h = hashlib.blake2b(digest_size=16)
    for f in dataclasses.fields(state):
        value = getattr(state, f.name)
        if f.name == "history":
            continue
        if isinstance(value, np.ndarray):
            h.update(f.name.encode())
            h.update(np.ascontiguousarray(value).view(np.uint8).reshape(-1).data)
        elif dataclasses.is_dataclass(value):
            h.update(json.dumps(dataclasses.asdict(value), sort_keys=True).encode())
        else:
            h.update(repr(value).encode())
    return h.hexdigest()


class RankImageSource(ImageSource):
    """The ImageSource of one rank: it reads the images of its own particles (`share`) and no
    others. They are cached in memory when they fit `cache_bytes`, else read from the stacks
    batch by batch. The few images that every rank needs at once (the pose-accuracy estimate's
    at most 200 per iteration, `shared_reads`; the read chunks that straddle two ranks' blocks
    in the noise statistics) are read by their owners and exchanged (`MPIContext.gather_images`).
    Asking for another rank's image outside those is a programming error (RuntimeError)."""

    def __init__(self, particles, mask_radius_px: float, mask_edge_px: float, use_ctf: bool,
                 cache_bytes: int, share: np.ndarray, context: MPIContext) -> None:
        super().__init__(particles, mask_radius_px, mask_edge_px, use_ctf, cache_bytes=-1,
                         ranks=context)
        self.share = np.asarray(share, np.int64)
        self.context = context
        self.shared = 0  # > 0: inside `shared_reads` (every rank asks for the same images)
        self._slot = np.full(particles.n_particles, -1, np.int64)
        self._slot[self.share] = np.arange(self.share.size)
        self._own: np.ndarray | None = None
        if cache_size(self.share.size, self.box) <= cache_bytes:
            self._own = np.empty((self.share.size, self.box, self.box // 2 + 1), np.complex64)
            for start in range(0, self.share.size, self.chunk):
                self._own[start:start + self.chunk] = self._read(
                    self.share[start:start + self.chunk])

    @property
    def cached(self) -> bool:
        """Whether this rank's images are held in memory (else streamed)."""
        return self._own is not None

    def _read(self, idx: np.ndarray) -> np.ndarray:
        """Images from the stacks: this rank's own particles only."""
        idx = np.asarray(idx)
        if idx.size and np.any(self._slot[idx] < 0):
            raise RuntimeError(f"rank {self.context.rank} was asked for images of particles it "
                               f"does not own (e.g. row {int(idx[self._slot[idx] < 0][0])}); "
                               f"only the parallel hooks may share images (docs/mpi.md)")
        return super()._read(idx)

    def local_planes(self, idx: np.ndarray) -> np.ndarray:
        """(B, N, N//2+1) masked FTs of this rank's own particles `idx` (cache or stacks)."""
        idx = np.asarray(idx)
        if self._own is None:
            return self._read(idx)
        slot = self._slot[idx]
        if np.any(slot < 0):
            return self._read(idx)  # raises: not this rank's
        return self._own[slot]

    def half_planes(self, idx: np.ndarray) -> np.ndarray:
        """(B, N, N//2+1) masked image FTs: this rank's own, or inside `shared_reads` any
        (a collective call then: every rank asks for the same `idx`)."""
        if self.shared:
            return self.context.gather_images(self, idx)
        return self.local_planes(idx)

    @contextlib.contextmanager
    def shared_reads(self):
        """While open, `half_planes` is collective: every rank asks for the same images, each
        reads its own among them and they are exchanged."""
        self.shared += 1
        try:
            yield self
        finally:
            self.shared -= 1

    def power_statistics(self, group_count: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """As ImageSource's, over every rank's images (this rank's sums, reduced).

        The single-process sums go over read chunks of `chunk` particles, each summed in
        float32 (then added in float64). This rank sums the very same chunks (those starting
        in its block; the images of one that runs past its block's end come from their owners,
        `gather_images`), so each chunk sum is the same float32 number; only the float64 sum of
        the chunk sums is taken in another order."""
        shape = (group_count, self.box, self.box // 2 + 1)
        power = np.zeros(shape)
        total = np.zeros(shape, np.complex128)
        count = np.zeros(group_count)
        ctx = self.context
        n = self.particles.n_particles
        ctx.rendezvous("the images' noise statistics")
        # chunks spanning several ranks' blocks: gathered by every rank, kept by the first owner
        straddling = {}
        for start in range(0, n, self.chunk):
            idx = np.arange(start, min(start + self.chunk, n), dtype=np.int64)
            owners = ctx.owner(idx[[0, -1]], n)
            if owners[0] != owners[1]:
                ft = ctx.gather_images(self, idx)
                if owners[0] == ctx.rank:
                    straddling[start] = ft
        lo, hi = (int(self.share[0]), int(self.share[-1]) + 1) if self.share.size else (0, 0)
        first = -(-lo // self.chunk) * self.chunk
        for start in range(first, hi, self.chunk):
            idx = np.arange(start, min(start + self.chunk, n), dtype=np.int64)
            ft = straddling[start] if start in straddling else self.local_planes(idx)
            for g in np.unique(self.groups[idx]):
                sel = self.groups[idx] == g
                power[g] += (np.abs(ft[sel]) ** 2).sum(axis=0)
                total[g] += ft[sel].sum(axis=0)
                count[g] += sel.sum()
        for a in (power, total.view(np.float64), count):
            ctx.allreduce(a)
        return power, total, count


def _default_threads(local_ranks: int) -> int:
    """OpenMP threads of a rank when --j is not given: its CPUs (affinity) shared with the
    other ranks on its node when the launcher did not bind them."""
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    cpus = cpus or 1
    if cpus == (os.cpu_count() or cpus):  # not bound: every rank sees the whole node
        return max(1, cpus // max(1, local_ranks))
    return cpus


def run_worker(argv: list[str], build_parser: Callable[[], argparse.ArgumentParser]) -> int:
    """Run `cryomap argv` as this rank (parsed by `build_parser`'s parser, run by the parsed
    command): MPI started, the parallel hooks installed, any error one line and MPI_Abort.
    Returns the exit status."""
    report = _Report()
    command = argv[0] if argv else "cryomap"
    try:
        from mpi4py import MPI
    except ImportError as e:
        if parallel.launcher_rank() in (0, None):
            print(f"cryomap {command}: error: mpi4py cannot start MPI ({e}); see docs/mpi.md",
                  file=sys.stderr, flush=True)
        report("error")
        return 2
    comm = MPI.COMM_WORLD
    expected = parallel.launcher_size()
    if expected is not None and expected != comm.Get_size():
        # each process is alone in its own world: mpi4py's MPI is not this mpirun's
        if parallel.launcher_rank() in (0, None):
            print(f"cryomap {command}: error: mpirun started {expected} processes but MPI "
                  f"({MPI.Get_library_version().split(chr(10))[0].strip()}) sees "
                  f"{comm.Get_size()}: mpi4py uses another MPI library than this mpirun; "
                  f"use the mpirun of that library or an mpi4py built for this one "
                  f"(docs/mpi.md)", file=sys.stderr, flush=True)
        report("error")
        return 2
    ctx = MPIContext(comm, command, report)

    def hook(kind, value, tb) -> None:  # an exception no handler below saw
        ctx.fail(value)

    sys.excepthook = hook
    threading.excepthook = lambda a: ctx.fail(a.exc_value)
    quiet = open(os.devnull, "w")  # kept open for the whole run
    if ctx.rank != 0:  # the same lines as rank 0's
        sys.stdout = quiet
    try:
        saved, sys.stderr = sys.stderr, (quiet if ctx.rank != 0 else sys.stderr)
        try:
            args = build_parser().parse_args(argv)
        finally:
            sys.stderr = saved
    except SystemExit as e:  # --help, or an option argparse refused (rank 0 said which)
        code = e.code if isinstance(e.code, int) else 2
        report("done" if code == 0 else "error")
        return code
    try:
        if getattr(args, "threads", "absent") is None and "OMP_NUM_THREADS" not in os.environ:
            args.threads = _default_threads(ctx.local_size)
        if getattr(args, "max_memory", "absent") is None:  # a budget per rank, not per node
            from ..em.options import default_max_memory

            args.max_memory = default_max_memory() / ctx.local_size / 2**30
        args._ranks = ctx  # the command hands it to its job (parallel.Ranks)
        code = int(args._run(args) or 0)
        ctx.finish()
    except BaseException as e:  # every failure ends the whole job
        ctx.fail(e)
        raise  # pragma: no cover - fail() does not return
    report("done")
    return code
