"""Peak memory of a refinement against its --max_memory budget, on a particle set larger than
the budget (not a test). Prints a report.

    python bench/memory.py                          # 100,000 particles, box 128, 4 GiB budget
    python bench/memory.py --n 20000 --max_memory 2 --keep

Steps: (1) check the free disk and shrink the set to what fits (said in the report);
(2) simulate the set in chunks into one MRC stack (written chunk by chunk through a memory
map, never whole in memory) plus its STAR file and a reference map; (3) run
`cryomap refine --healpix_order 1 --max_memory M` (auto-refine) in a child process, sample
its resident memory (VmRSS) while it runs, and stop it once its first iteration is saved
(run_it001_state.npz; `--iter 1` would make that iteration the final one, at the full image
size, which is not the memory profile of a refinement's iterations); (4) report the
child's peak RSS (its VmHWM, read just before it is stopped, and getrusage's ru_maxrss of the
children), the run's own estimate (run.log's "memory:" line), whether the images were cached
or streamed, and the wall time; (5) delete the set (unless --keep).

The set is simulated in a child process of its own: a child's ru_maxrss starts from its
parent's RSS at fork (Linux copies the high-water mark), and the simulation's memory map of
the stack would otherwise count as the refinement's.
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import mrcfile
import pandas as pd

from cryomap.io.mrc import write_map
from cryomap.particles import write_particles
from cryomap.phantom import make_phantom
from cryomap.simulate import simulate_particles

CHUNK = 5000  # images simulated and written at a time


def free_bytes(path: Path) -> int:
    """Free bytes on the filesystem of `path` (its nearest existing parent)."""
    p = path.absolute()
    while not p.exists():
        p = p.parent
    st = os.statvfs(p)
    return st.f_bavail * st.f_frsize


def make_set(folder: Path, n: int, box: int, pixel_size: float, snr: float, seed: int) -> Path:
    """Simulate n particles in chunks into folder/particles.mrcs (+ .star, ref.mrc)."""
    folder.mkdir(parents=True, exist_ok=True)
    truth = make_phantom(box, pixel_size, seed=seed)
    write_map(folder / "ref.mrc", truth, pixel_size)
    stack = folder / "particles.mrcs"
    tables, optics = [], None
    with mrcfile.new_mmap(str(stack), shape=(n, box, box), mrc_mode=2, overwrite=True) as m:
        m.set_image_stack()
        m.voxel_size = pixel_size
        for start in range(0, n, CHUNK):
            k = min(CHUNK, n - start)
            images, optics, parts, _ = simulate_particles(truth, pixel_size, k, snr=snr,
                                                          seed=seed + 1 + start // CHUNK)
            m.data[start:start + k] = images
            parts["rlnImageName"] = [f"{start + i + 1:06d}@{stack.name}" for i in range(k)]
            tables.append(parts)
            m.flush()
            print(f"  simulated {start + k}/{n}", flush=True)
    write_particles(folder / "particles.star", optics, pd.concat(tables, ignore_index=True))
    return folder / "particles.star"


def _status(pid: int, field: str) -> int | None:
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError):
        pass
    return None


def run_refine(star: Path, ref: Path, out: Path, max_memory: float, threads: int
               ) -> dict:
    """Auto-refine in a child until its first iteration is saved; the child's peak RSS
    (VmHWM, and ru_maxrss from wait4 on that child alone) and samples of its VmRSS."""
    cmd = [sys.executable, "-m", "cryomap", "refine", "--i", str(star), "--ref", str(ref),
           "--o", str(out), "--healpix_order", "1", "--max_memory", str(max_memory), "--j",
           str(threads)]
    print("  " + " ".join(cmd[1:]), flush=True)
    log = out.parent / "refine.out"
    t0 = time.monotonic()
    samples: list[tuple[float, int]] = []
    hwm = 0
    with open(log, "w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT)
        while True:
            pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
            if pid:
                break
            rss = _status(proc.pid, "VmRSS")
            if rss is not None:
                samples.append((time.monotonic() - t0, rss))
            hwm = max(hwm, _status(proc.pid, "VmHWM") or 0)
            if (out / "run_it001_state.npz").exists():  # one iteration done: stop it
                hwm = max(hwm, _status(proc.pid, "VmHWM") or 0)
                proc.terminate()
                pid, status, usage = os.wait4(proc.pid, 0)
                break
            time.sleep(0.5)
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
    wall = time.monotonic() - t0
    done = (out / "run_it001_state.npz").exists()
    return {"returncode": 0 if done else proc.returncode, "output": log.read_text(),
            "wall": wall, "peak": usage.ru_maxrss * 1024, "hwm": hwm, "samples": samples}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n", type=int, default=100_000, help="particles")
    p.add_argument("--box", type=int, default=128, help="box (px)")
    p.add_argument("--angpix", type=float, default=2.0, help="pixel size (Å)")
    p.add_argument("--snr", type=float, default=0.1)
    p.add_argument("--max_memory", type=float, default=4.0, help="budget (GiB)")
    p.add_argument("--j", type=int, default=os.cpu_count() or 1, help="threads")
    p.add_argument("--dir", type=Path, default=Path("/tmp/cryomap_bench_memory"))
    p.add_argument("--keep", action="store_true", help="keep the simulated set")
    p.add_argument("--reuse", action="store_true",
                   help="use the set already in --dir (from a run with --keep)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--make-only", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.make_only:  # the child that simulates the set
        make_set(args.dir / "set", args.n, args.box, args.angpix, args.snr, args.seed)
        return 0

    image_bytes = args.box * args.box * 4
    n = args.n
    free = free_bytes(args.dir)
    fits = int((free - (2 << 30)) // (image_bytes + 600))  # stack + STAR, 2 GiB spare
    note = ""
    if fits < n:
        note = (f"the disk holds {free / 2**30:.1f} GiB free: {fits} particles instead of "
                f"{n}")
        n = max(1000, fits)
    print(f"free disk at {args.dir}: {free / 2**30:.1f} GiB; set: {n} particles, box "
          f"{args.box}, {n * image_bytes / 2**30:.2f} GiB of images" + (f" ({note})"
                                                                       if note else ""))
    star = args.dir / "set" / "particles.star"
    try:
        if args.reuse and star.exists():
            print(f"  reusing {star}", flush=True)
        else:
            if args.dir.exists():
                shutil.rmtree(args.dir)
            t0 = time.monotonic()
            subprocess.run([sys.executable, __file__, "--make-only", "--n", str(n), "--box",
                            str(args.box), "--angpix", str(args.angpix), "--snr", str(args.snr),
                            "--seed", str(args.seed), "--dir", str(args.dir)], check=True)
            print(f"  simulated in {time.monotonic() - t0:.0f} s", flush=True)
        r = run_refine(star, args.dir / "set" / "ref.mrc", args.dir / "refine",
                       args.max_memory, args.j)
        log = (args.dir / "refine" / "run.log")
        plan = [ln for ln in log.read_text().splitlines()
                if ln.startswith(("memory:", "iteration"))] if log.exists() else []
    finally:
        if not args.keep and args.dir.exists():
            shutil.rmtree(args.dir)
    budget = args.max_memory * 2**30
    print()
    print(f"particles             {n} x {args.box}^2 px ({n * image_bytes / 2**30:.2f} GiB "
          f"stack)" + (f"; {note}" if note else ""))
    print(f"budget (--max_memory) {budget / 2**30:.2f} GiB")
    print(f"first iteration saved {r['returncode'] == 0}")
    print(f"wall time             {r['wall']:.0f} s ({args.j} threads, start to the first "
          f"iteration's state)")
    print(f"peak RSS (VmHWM)      {r['hwm'] / 2**30:.2f} GiB = "
          f"{100 * r['hwm'] / budget:.0f}% of the budget")
    print(f"ru_maxrss (wait4)     {r['peak'] / 2**30:.2f} GiB")
    if r["samples"]:
        top = max(s for _, s in r["samples"])
        print(f"largest VmRSS sample  {top / 2**30:.2f} GiB ({len(r['samples'])} samples)")
    for line in plan:
        print(f"run.log               {line}")
    if r["returncode"] != 0:
        print(r["output"][-2000:])
    return 0 if r["returncode"] == 0 and max(r["hwm"], r["peak"]) <= budget else 1


if __name__ == "__main__":
    sys.exit(main())
