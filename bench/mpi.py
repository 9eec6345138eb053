"""Runs split across MPI ranks (docs/mpi.md): time per iteration with 1 rank x 2 threads against
2 ranks x 1 thread, the bytes the ranks reduce per iteration and the time it takes, and a model
of time per iteration against the number of nodes for 10^6 particles at box 256 (not a test).

    python bench/mpi.py                        # 2,000 and 20,000 particles, box 64
    python bench/mpi.py --sizes 2000           # the small set only (about 3 minutes)
    python bench/mpi.py --sizes 2000 20000 --keep --dir /scratch/cryomap_bench_mpi
    python bench/mpi.py --keep --reuse --cores 64     # the model again from the kept runs

Each set is simulated once (bench/memory.py's `make_set`: SNR 0.1, CTF, random shifts), then
refined for --iter iterations from the truth low-passed to 40 Å, (a) `cryomap refine --j 2`
and (b) `mpirun -n 2 cryomap refine --j 1`. The figures come from the runs' run.log: each
iteration's wall time and parts (E-step, ..., reconstruct), and under mpirun the bytes reduced
(back-projector sums), gathered (per-particle tables) and exchanged (shared images) per
iteration with the time these took. Time per iteration is the median over the iterations
before the final one (the final one runs at the full image size and is reported apart).

The model (printed at the end), t(N) = c P / (N cores) + s P + F + reduce(N), takes from
the 2-rank runs: c, one core's compute per particle per iteration (the slowest rank's engine
passes, run.log's MPI line, on the largest set), scaled to box 256 with the searched pixels
(r_max^2); s and F, a straight-line fit over the set sizes of the rest of an iteration (wall
time less the passes, reductions and waits): per-particle work that every rank repeats or
rank 0 does alone (the M-step's per-particle tables, writing the STAR and state files), and
the M-step on the padded grid that every rank repeats (reconstruction, FSC, noise), scaled
with box^3. Neither shrinks with more ranks. The reduced bytes at box 256 are those of the
two half-sets' back-projectors at the given r_max (as `projector.empty_sums` sizes them); the
particle tables with the measured bytes per particle. Communication is modelled as the
reduction's two phases (reduce-scatter, then all-gather: each node sends and receives
2 V (N-1)/N bytes) over a link of --bandwidth GB/s plus --latency per message, and the
all-gather of the tables and shared images.
"""

from __future__ import annotations

import argparse
import json
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

from cryomap.fourier import initial_lowpass
from cryomap.io.mrc import read_map, write_map
from cryomap.projector import reference_radius

sys.path.insert(0, str(Path(__file__).resolve().parent))
from memory import make_set  # noqa: E402  (bench/memory.py: simulated set in chunks)

ITERATION = re.compile(r"^iteration\s+(\d+)( \(final\))?:.*?r_max\s+(\d+) px.*; (E-step .*) "
                       r"\((\d+\.\d+) s\)$")
PART = re.compile(r"([A-Za-z-]+) (\d+\.\d+)(?: s)?")
MPI_LINE = re.compile(r"^MPI: peak memory \(VmHWM\) (.*?) GiB.*?reduced (\d+\.\d+) MiB of sums, "
                      r"gathered (\d+\.\d+) MiB of particle tables and (\d+\.\d+) MiB of shared "
                      r"images in (\d+\.\d+) s; waited (\d+\.\d+) s for the slowest rank; its "
                      r"engine passes took (\d+\.\d+) s")
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
                               "wait": float(m.group(6)), "passes": float(m.group(7))}
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
        for key in ("sums", "tables", "images", "reduce", "wait", "passes"):
            out[key] = statistics.median(m[key] for m in mpi)
        out["peaks"] = [max(m["peaks"][i] for m in mpi) for i in range(len(mpi[0]["peaks"]))]
    return out


def model(m: dict, n_particles: int, box_measured: int, cores: int, bandwidth: float,
          latency: float, r_max_fraction: float, pad: int = 2) -> None:
    """Print time per iteration against nodes (module docstring):
    t(N) = c P / (N cores) + s P + F + reduce(N)."""
    box = 256
    r_meas, r_new = m["r_max"], r_max_fraction * box
    core_s = m["per_particle_core_s"] * (r_new / r_meas) ** 2  # c, split over the ranks
    serial = m["serial_per_particle"] * n_particles  # s P, every rank (or rank 0) alike
    fixed = m["fixed"] * (box / box_measured) ** 3  # F, the M-step on the padded grid
    mm = reference_radius(box, pad, r_new)
    sums = 2 * (2 * mm + 1) ** 2 * (mm + 1) * (8 + 4)  # two halves: complex64 + float32
    tables = m["table_bytes_per_particle"] * n_particles
    images = m["image_bytes"] * (box / box_measured) ** 2  # the same number of shared images
    print(f"\nModel: {n_particles:.0e} particles, box {box}, r_max {r_new:.0f} px (searched "
          f"pixels x{(r_new / r_meas) ** 2:.0f} of the measured r_max {r_meas:.0f}), 1 rank of "
          f"{cores} cores per node, links of {bandwidth:g} GB/s and {latency * 1e6:.0f} us")
    print(f"  c = {core_s * 1e3:.1f} core-ms per particle per iteration, split over the ranks "
          f"(measured {m['per_particle_core_s'] * 1e3:.2f} at box {box_measured}); s = "
          f"{m['serial_per_particle'] * 1e3:.2f} ms per particle that no rank count shrinks "
          f"({m['serial_note']}); F = {fixed:.0f} s of M-step on every rank (measured "
          f"{m['fixed']:.2f} s x {(box / box_measured) ** 3:.0f}); reduced per iteration "
          f"{sums / 2**30:.2f} GiB of sums + {tables / 2**20:.0f} MiB of particle tables + "
          f"{images / 2**20:.0f} MiB of shared images")
    print(f"  {'nodes':>6} {'compute s':>10} {'serial s':>9} {'M-step s':>9} {'reduce s':>9} "
          f"{'s/iter':>9} {'speed-up':>9} {'efficiency':>10}")
    t1 = None
    knee = None
    for nodes in [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024]:
        compute = core_s * n_particles / (nodes * cores)
        share = (nodes - 1) / nodes
        reduce = (2 * sums * share + (tables + images) * share) / (bandwidth * 1e9) + \
            2 * (nodes - 1) * latency * max(1, int(np.ceil(sums / 4 / (16 << 20))))
        total = compute + serial + fixed + reduce
        t1 = t1 or total
        if knee is None and t1 / (nodes * total) < 0.5:
            knee = nodes
        print(f"  {nodes:>6} {compute:>10.1f} {serial:>9.1f} {fixed:>9.1f} {reduce:>9.2f} "
              f"{total:>9.1f} {t1 / total:>9.1f} {t1 / (nodes * total):>10.0%}")
    floor = serial + fixed + reduce
    print(f"  It stops scaling where the compute per node falls to the part no node count "
          f"shrinks: s P = {serial:.0f} s (per-particle work every rank repeats or rank 0 does "
          f"alone) + F = {fixed:.0f} s (the M-step every rank repeats) + the reduction "
          f"({2 * sums / (bandwidth * 1e9):.1f} s for the sums, about constant in N): "
          f"{floor:.0f} s/iteration at best, at most {t1 / floor:.0f}x one node; efficiency "
          f"falls below 50% from {knee if knee else '>1024'} nodes (compute equals that floor "
          f"at {core_s * n_particles / cores / floor:.0f} nodes). The reduction itself is not "
          f"the limit. Both sides are wall times measured on the same (loaded) machine, so "
          f"where they meet depends little on the load.")


def fit(results: dict) -> dict:
    """The model's inputs from the 2-rank runs: one core's compute per particle (the slowest
    rank's engine passes per iteration on the largest set, each rank holding n/2 particles),
    and a fit over the set sizes of the rest of an iteration (its wall time less the passes,
    the reductions and the waits): serial s per particle + fixed F."""
    sizes = sorted(results)
    two = {n: results[n]["2 ranks x 1 thread"] for n in sizes}
    rest = {n: max(0.0, r["median"] - r["passes"] - r["reduce"] - r["wait"])
            for n, r in two.items()}
    if len(sizes) > 1:
        serial = max(0.0, (rest[sizes[-1]] - rest[sizes[0]]) / (sizes[-1] - sizes[0]))
        fixed = max(0.0, rest[sizes[0]] - serial * sizes[0])
        note = (f"fit of the rest of an iteration, {rest[sizes[0]]:.2f} s at {sizes[0]} and "
                f"{rest[sizes[-1]]:.2f} s at {sizes[-1]} particles")
    else:
        serial, fixed = 0.0, rest[sizes[0]]
        note = "one set measured: taken as 0; run two sizes to measure it"
    n, big = sizes[-1], two[sizes[-1]]
    return {"per_particle_core_s": big["passes"] / (n / 2), "fixed": fixed,
            "serial_per_particle": serial, "serial_note": note, "r_max": big["r_max"],
            "table_bytes_per_particle": big["tables"] * 2**20 / n,
            "image_bytes": big["images"] * 2**20}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[2000, 20000], help="particles")
    p.add_argument("--box", type=int, default=64)
    p.add_argument("--angpix", type=float, default=4.0)
    p.add_argument("--iter", type=int, default=3, help="iterations per run (last one final)")
    p.add_argument("--healpix_order", type=int, default=1)
    p.add_argument("--dir", type=Path, default=Path("/tmp/cryomap_bench_mpi"))
    p.add_argument("--keep", action="store_true", help="keep the sets and runs")
    p.add_argument("--reuse", action="store_true",
                   help="take the figures of runs kept (--keep) by an earlier call")
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
        write_map(start, initial_lowpass(truth.astype(np.float64), 40.0,
                                         a.angpix).astype(np.float32),
                  a.angpix)
        common = ["refine", "--i", str(folder / "particles.star"), "--ref", str(start),
                  "--iter", str(a.iter), "--healpix_order", str(a.healpix_order),
                  "--particle_diameter", f"{diameter:g}", "--ini_high", "40"]
        runs = {}
        for label, ranks, threads in (("1 rank x 2 threads", 1, 2), ("2 ranks x 1 thread", 2, 1)):
            out = folder / f"run_{ranks}x{threads}"
            saved = out / "bench.json"
            if a.reuse and saved.exists():  # a kept run of an earlier call: its figures
                print(f"  reusing {out}", flush=True)
                figures = json.loads(saved.read_text())
                runs[label] = {**summarise(parse_log((out / "run.log").read_text())),
                               **figures}
                continue
            shutil.rmtree(out, ignore_errors=True)
            launcher = [sys.executable] if ranks == 1 else [mpirun(), "-n", str(ranks),
                                                             sys.executable]
            rows, wall, cpu, load = run(launcher + ["-m", "cryomap", *common, "--o", str(out),
                                               "--j", str(threads)], out)
            figures = {"run_wall": wall, "cpu": cpu, "load": load}
            saved.write_text(json.dumps(figures))
            runs[label] = {**summarise(rows), **figures}
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
    model(fit(results), int(a.model_particles), a.box, a.cores, a.bandwidth, a.latency,
          a.r_max_fraction)
    if not a.keep:
        shutil.rmtree(a.dir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
