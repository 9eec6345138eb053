"""`cryomap ctf_refine`: per-particle defocus from a refinement (relion_ctf_refine)."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from ..errors import InputError
from .options import job_particle_diameter

COMMAND = "ctf_refine"
HELP = ("refine each particle's defocus (and each micrograph's astigmatism) against its "
        "half-set's map (relion_ctf_refine)")
DESCRIPTION = """\
Fit each particle's defocus at its refined pose against the map of its own half-set (the
unfiltered half maps beside --i, so the gold standard holds): the change that best fits the
image between --minres and the half maps' resolution is added to rlnDefocusU and rlnDefocusV
(docs/method.md eq. (31)). With --fit_astigmatism each micrograph's astigmatism
(rlnMicrographName groups the particles) is fitted too, within --astigmatism_range per
component, and each particle's defocus again after it (eq. (32)). Writes
<o>/particles_ctf_refine.star (RELION's name), a log of the fitted values and a histogram of
the changes. A refinement from the new file gains what the better CTF allows.

Not fitted yet: beam tilt, trefoil and anisotropic magnification.

example:
  cryomap ctf_refine --i Refine3D/job001/run_data.star --o CtfRefine/job001
  cryomap ctf_refine --i Refine3D/job001/run_data.star --o CtfRefine/job002 --fit_astigmatism
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--i", required=True,
                   help="a refinement's run_data.star; its run_half1/2_class001_unfil.mrc "
                        "must lie beside it")
    p.add_argument("--o", required=True, help="output folder (e.g. CtfRefine/job001)")
    p.add_argument("--defocus_range", type=float, default=2000.0, metavar="A",
                   help="largest defocus change searched (Å)")
    p.add_argument("--fit_astigmatism", action="store_true",
                   help="fit each micrograph's astigmatism too (needs rlnMicrographName)")
    p.add_argument("--astigmatism_range", type=float, default=500.0, metavar="A",
                   help="largest change of each astigmatism component searched (Å), with "
                        "--fit_astigmatism")
    p.add_argument("--minres", type=float, default=30.0, metavar="A",
                   help="lowest resolution used in the fit (Å)")
    p.add_argument("--particle_diameter", type=float, default=None, metavar="A",
                   help="mask diameter (Å); default: the refinement's (its job.json)")
    p.add_argument("--j", "--threads", dest="threads", type=int, default=None,
                   help="OpenMP threads (default: all cores)")


def half_map_paths(star: Path) -> tuple[Path, Path]:
    """The unfiltered half maps of the refinement whose data file is `star`."""
    if not star.name.endswith("_data.star"):
        raise InputError(f"--i {star}: expected a refinement's <root>_data.star")
    root = star.name[: -len("_data.star")]
    return tuple(star.with_name(f"{root}_half{h}_class001_unfil.mrc") for h in (1, 2))


def run(args: argparse.Namespace) -> int:
    from ..api import set_threads
    from ..ctf_refine import fit_defocus
    from ..io.atomic import check_output_dir, make_output_dir
    from ..io.mrc import read_map
    from ..jobs.base import write_text_atomic
    from ..particles import load_particles, write_particles
    from ..resolution import fsc_maps, resolution_shell

    star, out = Path(args.i), Path(args.o)
    if not (np.isfinite(args.defocus_range) and 0 < args.defocus_range <= 20000):
        raise InputError(f"--defocus_range {args.defocus_range}: expected (0, 20000] Å")
    if not (np.isfinite(args.astigmatism_range) and 0 < args.astigmatism_range <= 5000):
        raise InputError(f"--astigmatism_range {args.astigmatism_range}: expected (0, 5000] Å")
    if args.threads is not None and args.threads < 1:
        raise InputError(f"--j {args.threads}: expected at least 1 thread")
    check_output_dir(out, "--o")
    diameter = job_particle_diameter(args.particle_diameter, star)
    halves = half_map_paths(star)
    particles = load_particles(star)
    try:
        if not particles.has_ctf:
            raise InputError(f"{star}: no rlnDefocusU column; expected the particles' CTF "
                             f"(rlnDefocusU/V, rlnDefocusAngle)")
        table = particles.particles
        for col in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnRandomSubset"):
            if col not in table:
                raise InputError(f"{star}: no {col} column; expected a refinement's "
                                 f"run_data.star (poses and half-sets)")
        if args.fit_astigmatism and "rlnMicrographName" not in table:
            raise InputError(f"{star}: no rlnMicrographName column; --fit_astigmatism fits "
                             f"one astigmatism per micrograph")
        subset = table["rlnRandomSubset"].to_numpy(np.int64)
        if not np.isin(subset, (1, 2)).all():
            raise InputError(f"{star}: rlnRandomSubset must be 1 or 2 in every row")
        box, pix = particles.grid_box, particles.grid_pixel_size
        maps = []
        for path in halves:
            volume, vpix = read_map(path)
            if volume.shape != (box,) * 3 or abs(vpix - pix) > 1e-3 * pix:
                raise InputError(f"{path}: {volume.shape[0]} px of {vpix:g} Å; expected the "
                                 f"particles' box {box} px of {pix:g} Å")
            maps.append(np.asarray(volume, np.float64))
        if not (np.isfinite(args.minres) and args.minres > 2 * pix):
            raise InputError(f"--minres {args.minres}: expected a resolution > Nyquist "
                             f"({2 * pix:g} Å)")
        r_max = max(resolution_shell(fsc_maps(*maps)), 2)
        r_min = min(int(np.ceil(box * pix / args.minres)), r_max - 1)
        radius = 0.5 * diameter / pix if diameter else box / 2 - 3
        set_threads(args.threads)
        fit = fit_defocus(particles, (maps[0], maps[1]), subset, radius, r_min, r_max,
                          search_range=args.defocus_range,
                          astigmatism_range=args.astigmatism_range if args.fit_astigmatism
                          else 0.0)
        delta = fit.delta
        new = table.copy()
        new["rlnDefocusU"], new["rlnDefocusV"] = fit.defocus_u, fit.defocus_v
        if args.fit_astigmatism:
            new["rlnDefocusAngle"] = fit.defocus_angle
        make_output_dir(out, "--o")
        out_star = out / "particles_ctf_refine.star"
        write_particles(out_star, particles.optics, new)
        lines = [f"cryomap ctf_refine: {particles.n_particles} particles of {star}, fitted "
                 f"between {box * pix / r_min:.1f} and {box * pix / r_max:.1f} Å "
                 f"(shells {r_min}..{r_max})",
                 f"defocus change: mean {delta.mean():.1f} Å, RMS "
                 f"{np.sqrt(np.mean(delta ** 2)):.1f} Å, range {delta.min():.0f} .. "
                 f"{delta.max():.0f} Å; each particle's own estimate: median precision "
                 f"{np.sqrt(np.median(fit.variance)):.0f} Å, at the search's edge "
                 f"{int(np.sum(np.abs(fit.delta) >= args.defocus_range))}"]
        if args.fit_astigmatism:
            change = fit.astigmatism_change
            lines.append(f"astigmatism change |(δc, δs)| per particle's micrograph: median "
                         f"{np.median(change):.0f} Å, largest {change.max():.0f} Å")
        write_text_atomic(out / "ctf_refine.log", "\n".join(lines) + "\n")
        _plot(out / "defocus_change.png", delta)
    finally:
        particles.close()
    for line in lines:
        print(line)
    print(f"wrote {out_star}")
    return 0


def _plot(path: Path, delta: np.ndarray) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..io.atomic import atomic_path

    fig, ax = plt.subplots(figsize=(5, 3.5))
    ax.hist(delta, bins=50)
    ax.set_xlabel("defocus change (Å)")
    ax.set_ylabel("particles")
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)
