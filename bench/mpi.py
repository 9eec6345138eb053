"""Runs split across MPI ranks (docs/mpi.md): time per iteration with 1 rank x 2 threads against
2 ranks x 1 thread, the bytes the ranks reduce per iteration and the time it takes, and a model
of time per iteration against the number of nodes for 10^6 particles at box 256 (not a test).

    python bench/mpi.py                        # 2,000 and 20,000 particles, box 64
    python bench/mpi.py --sizes 2000           # the small set only (about 3 minutes)
    python bench/mpi.py --sizes 2000 20000 --keep --dir /scratch/cryomap_bench_mpi

Each set is simulated once (bench/memory.py's `make_set`: SNR 0.1, CTF, random shifts), then
refined for --iter iterations from the truth low-passed to 40 Å, (a) `cryomap refine --j 2`
and (b) `mpirun -n 2 cryomap refine --j 1`. The figures come from the runs' run.log: each
iteration's wall time and parts (E-step, ..., reconstruct), and under mpirun the bytes reduced
(back-projector sums), gathered (per-particle tables) and exchanged (shared images) per
iteration with the time these took. Time per iteration is the median over the iterations
before the final one (the final one runs at the full image size and is reported apart).

The model (printed at the end) takes from the largest set's 2-rank run the compute per
particle per iteration on one core (E-step, projections, sums, back-projection, candidate
bookkeeping and reads), and the fixed part of an iteration that every rank repeats (the
M-step: reconstruction, FSC, noise; it does not shrink with more ranks), and scales them to
box 256 (compute per particle with the searched pixels, r_max^2; fixed part with the padded
grid, box^3). The reduced bytes at box 256 are those of the two half-sets' back-projectors at
the given r_max (exactly as `projector.empty_sums` sizes them); the particle tables with the
measured bytes per particle. Communication is modelled as the reduction's two phases
(reduce-scatter, then all-gather: each node sends and receives 2 V (N-1)/N bytes) over a link
of --bandwidth GB/s plus --latency per message, and the all-gather of the tables.
"""

from __future__ import annotations

import argparse
import os
import re
import resource
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from cryomap.em.refine import lowpass
from cryomap.io.mrc import read_map, write_map
from cryomap.projector import reference_radius

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory import make_set  # noqa: E402  (bench/memory.py: simulated set in chunks)

ITERATION = re.compile(r"^iteration\s+(\d+)( \(final\))?:.*?r_max\s+(\d+) px.*; (E-step .*) "
                       r"\((\d+\.\d+) s\)$")
PART = re.compile(r"([A-Za-z-]+) (\d+\.\d+)(?: s)?")
MPI_LINE = re.compile(r"^MPI: peak memory \(VmHWM\) (.*?) GiB.*?reduced (\d+\.\d+) MiB of sums, "
                      r"gathered (\d+\.\d+) MiB of particle tables and (\d+\.\d+) MiB of shared "
                      r"images in (\d+\.\d+) s; waited (\d+\.\d+) s")
#: Parts of an iteration that grow with the particles of a rank; the rest is the M-step.
PER_PARTICLE = ("E-step", "project", "sums", "back-project", "candidates", "io")


def mpirun() -> str:
    """The mpirun of the environment's MPI (the `mpich` wheel's is next to python)."""
    path = os.pathsep.join([str(Path(sys.executable).parent), os.environ.get("PATH", "")])
    for name in ("mpirun", "mpiexec"):
        found = shutil.which(name, path=path)
        if found:
            return found
    raise SystemExit("no mpirun/mpiexec found: pip install 'cryomap[mpi]' (docs/mpi.md)")


def parse_log(text: str) -> list[dict]:
    """Per iteration: number, final?, r_max, wall time, parts (s) and the MPI figures."""
    rows: list[dict] = []
    for line in text.splitlines():
        m = ITERATION.match(line)
        if m:
            parts = {k: float(v) for k, v in PART.findall(m.group(4))}
            rows.append({"iteration": int(m.group(1)), "final": bool(m.group(2)),
                         "r_max": int(m.group(3)), "wall": float(m.group(5)), "parts": parts})
            continue
        m = MPI_LINE.match(line)
        if m and rows:
            rows[-1]["mpi"] = {"peaks": [float(p) for p in m.group(1).split()
                                         if re.match(r"^\d", p)],
                               "sums": float(m.group(2)), "tables": float(m.group(3)),
                               "images": float(m.group(4)), "reduce": float(m.group(5)),
                               "wait": float(m.group(6))}
    return rows


def run(cmd: list[str], out: Path) -> tuple[list[dict], float, float, tuple[float, float]]:
    """Run a refinement; its iterations (parse_log), wall and CPU time (all processes) and the
    load average before and after."""
    load0 = os.getloadavg()[0]
    print("  " + " ".join(cmd), flush=True)
    t0 = time.monotonic()
    cpu0 = resource.getrusage(resource.RUSAGE_CHILDREN)
    done = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.monotonic() - t0
    cpu1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    cpu = cpu1.ru_utime + cpu1.ru_stime - cpu0.ru_utime - cpu0.ru_stime
    if done.returncode != 0:
        raise SystemExit(f"failed ({done.returncode}):\n{done.stderr[-3000:]}")
    return parse_log((out / "run.log").read_text()), wall, cpu, (load0, os.getloadavg()[0])


def summarise(rows: list[dict]) -> dict:
    """Median time per iteration (before the final one) and its per-particle part."""
    body = [r for r in rows if not r["final"]] or rows
    per_particle = [sum(r["parts"].get(k, 0.0) for k in PER_PARTICLE) for r in body]
    out = {"median": statistics.median(r["wall"] for r in body),
           "final": next((r["wall"] for r in rows if r["final"]), float("nan")),
           "per_particle": statistics.median(per_particle),
           "fixed": statistics.median(r["wall"] - p
                                      for r, p in zip(body, per_particle, strict=True)),
           "r_max": statistics.median(r["r_max"] for r in body),
           "walls": [r["wall"] for r in rows]}
    mpi = [r["mpi"] for r in body if "mpi" in r]
    if mpi:
        for key in ("sums", "tables", "images", "reduce", "wait"):
            out[key] = statistics.median(m[key] for m in mpi)
        out["peaks"] = [max(m["peaks"][i] for m in mpi) for i in range(len(mpi[0]["peaks"]))]
    return out


def model(m: dict, n_particles: int, box_measured: int, cores: int, bandwidth: float,
          latency: float, r_max_fraction: float, pad: int = 2) -> None:
    """Print time per iteration against nodes (module docstring)."""
    box = 256
    r_meas, r_new = m["r_max"], r_max_fraction * box
    # one core's compute per particle (2 ranks x 1 thread: each rank did n/2 particles)
    core_s = m["per_particle_core_s"] * (r_new / r_meas) ** 2
    fixed = m["fixed"] * (box / box_measured) ** 3
    mm = reference_radius(box, pad, r_new)
    sums = 2 * (2 * mm + 1) ** 2 * (mm + 1) * (8 + 4)  # two halves: complex64 + float32
    tables = m["table_bytes_per_particle"] * n_particles
    images = m["image_bytes"] * (box / box_measured) ** 2  # the same number of shared images
    print(f"\nModel: {n_particles:.0e} particles, box {box}, r_max {r_new:.0f} px (searched "
          f"pixels x{(r_new / r_meas) ** 2:.0f} of the measured r_max {r_meas:.0f}), 1 rank of "
          f"{cores} cores per node, links of {bandwidth:g} GB/s and {latency * 1e6:.0f} us")
    print(f"  compute {core_s * 1e3:.2f} core-ms per particle per iteration (measured "
          f"{m['per_particle_core_s'] * 1e3:.2f} at box {box_measured}, r_max {r_meas:.0f}); "
          f"M-step repeated on every rank {fixed:.0f} s (measured {m['fixed']:.2f} s x "
          f"{(box / box_measured) ** 3:.0f}); reduced per iteration {sums / 2**30:.2f} GiB "
          f"of sums + {tables / 2**20:.0f} MiB of particle tables + {images / 2**20:.0f} MiB of "
          f"shared images")
    print(f"  {'nodes':>6} {'compute s':>10} {'reduce s':>9} {'M-step s':>9} {'s/iter':>9} "
          f"{'speed-up':>9} {'efficiency':>10}")
    t1 = None
    knee = None
    for nodes in [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]:
        compute = core_s * n_particles / (nodes * cores)
        share = (nodes - 1) / nodes
        reduce = (2 * sums * share + (tables + images) * share) / (bandwidth * 1e9) + \
            2 * (nodes - 1) * latency * max(1, int(np.ceil(sums / 4 / (16 << 20))))
        total = compute + reduce + fixed
        t1 = t1 or total
        eff = t1 / (nodes * total)
        if knee is None and compute < reduce + fixed:
            knee = nodes
        print(f"  {nodes:>6} {compute:>10.1f} {reduce:>9.2f} {fixed:>9.1f} {total:>9.1f} "
              f"{t1 / total:>9.1f} {eff:>10.0%}")
    limit = reduce + fixed
    print(f"  It stops scaling where the per-node compute falls to the part no node count "
          f"shrinks: the M-step every rank repeats ({fixed:.0f} s) plus the reduction "
          f"({2 * sums / (bandwidth * 1e9):.1f} s for the sums, about constant in N) = "
          f"{limit:.0f} s/iteration at best; compute falls below it from "
          f"{knee if knee else '>1024'} nodes (about {core_s * n_particles / cores / limit:.0f} "
          f"nodes for equal parts). Both parts are wall times measured on the same loaded "
          f"machine, so the node count where they meet depends little on the load.")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[2000, 20000], help="particles")
    p.add_argument("--box", type=int, default=64)
    p.add_argument("--angpix", type=float, default=4.0)
    p.add_argument("--iter", type=int, default=3, help="iterations per run (last one final)")
    p.add_argument("--healpix_order", type=int, default=1)
    p.add_argument("--dir", type=Path, default=Path("/tmp/cryomap_bench_mpi"))
    p.add_argument("--keep", action="store_true", help="keep the sets and runs")
    p.add_argument("--model_particles", type=float, default=1e6)
    p.add_argument("--cores", type=int, default=32, help="cores per node in the model")
    p.add_argument("--bandwidth", type=float, default=10.0, help="GB/s per node in the model")
    p.add_argument("--latency", type=float, default=5e-6, help="s per message in the model")
    p.add_argument("--r_max_fraction", type=float, default=0.5,
                   help="r_max / box in the model (0.5: the final, full-size iteration)")
    a = p.parse_args(argv)
    diameter = 0.8 * a.box * a.angpix
    print(f"cryomap MPI benchmark: box {a.box}, {a.angpix} Å/px, healpix order "
          f"{a.healpix_order}, {a.iter} iterations; {os.cpu_count()} CPUs, load average "
          f"{os.getloadavg()[0]:.1f} at start; {mpirun()}")
    results = {}
    for n in a.sizes:
        folder = a.dir / f"n{n}"
        if not (folder / "particles.star").exists():
            print(f"simulating {n} particles in {folder}", flush=True)
            make_set(folder, n, a.box, a.angpix, 0.1, seed=1)
        start = folder / "start.mrc"
        truth, _ = read_map(folder / "ref.mrc")
        write_map(start, lowpass(truth.astype(np.float64), a.angpix, 40.0).astype(np.float32),
                  a.angpix)
        common = ["refine", "--i", str(folder / "particles.star"), "--ref", str(start),
                  "--iter", str(a.iter), "--healpix_order", str(a.healpix_order),
                  "--particle_diameter", f"{diameter:g}", "--ini_high", "40"]
        runs = {}
        for label, ranks, threads in (("1 rank x 2 threads", 1, 2), ("2 ranks x 1 thread", 2, 1)):
            out = folder / f"run_{ranks}x{threads}"
            shutil.rmtree(out, ignore_errors=True)
            launcher = [sys.executable] if ranks == 1 else [mpirun(), "-n", str(ranks),
                                                             sys.executable]
            rows, wall, cpu, load = run(launcher + ["-m", "cryomap", *common, "--o", str(out),
                                               "--j", str(threads)], out)
            runs[label] = {**summarise(rows), "run_wall": wall, "cpu": cpu, "load": load}
        results[n] = runs
        one, two = runs["1 rank x 2 threads"], runs["2 ranks x 1 thread"]
        print(f"\n{n} particles, box {a.box}:")
        for label, r in runs.items():
            print(f"  {label}: {r['median']:.2f} s/iteration (median of the non-final; "
                  f"iterations {', '.join(f'{w:.1f}' for w in r['walls'])} s; final "
                  f"{r['final']:.1f} s); per-particle parts {r['per_particle']:.2f} s, fixed "
                  f"{r['fixed']:.2f} s; whole run {r['run_wall']:.0f} s wall, "
                  f"{r['cpu']:.0f} s CPU; load average {r['load'][0]:.1f} -> {r['load'][1]:.1f}")
        print(f"  2 ranks x 1 thread / 1 rank x 2 threads: {two['median'] / one['median']:.2f} "
              f"x the time per iteration")
        total = two["sums"] + two["tables"] + two["images"]
        print(f"  per iteration: reduced {two['sums']:.1f} MiB of sums, gathered "
              f"{two['tables']:.2f} MiB of particle tables and {two['images']:.2f} MiB of shared "
              f"images ({total:.1f} MiB) in {two['reduce']:.3f} s "
              f"({total / 2**10 / max(two['reduce'], 1e-9):.2f} GiB/s on this node); waited "
              f"{two['wait']:.2f} s for the slower rank; peak memory per rank "
              f"{' '.join(f'{p:.2f}' for p in two['peaks'])} GiB")
    n = max(results)
    two = results[n]["2 ranks x 1 thread"]
    # the fixed part without the communication, which the model adds for N nodes
    fixed = max(0.0, two["fixed"] - two["reduce"] - two["wait"])
    measured = {"per_particle_core_s": two["per_particle"] / (n / 2), "fixed": fixed,
                "r_max": two["r_max"], "table_bytes_per_particle": two["tables"] * 2**20 / n,
                "image_bytes": two["images"] * 2**20}
    model(measured, int(a.model_particles), a.box, a.cores, a.bandwidth, a.latency,
          a.r_max_fraction)
    if not a.keep:
        shutil.rmtree(a.dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
