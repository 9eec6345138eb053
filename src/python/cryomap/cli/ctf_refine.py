"""`cryomap ctf_refine`: per-particle defocus and per-optics-group aberrations from a
refinement (relion_ctf_refine)."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from ..errors import InputError
from .options import job_particle_diameter

COMMAND = "ctf_refine"
HELP = ("refine each particle's defocus (and each micrograph's astigmatism, each optics "
        "group's beam tilt, trefoil and magnification) against its half-set's map "
        "(relion_ctf_refine)")
DESCRIPTION = """\
Fit each particle's defocus at its refined pose against the map of its own half-set (the
unfiltered half maps beside --i, so the gold standard holds): the change that best fits the
image between --minres and the half maps' resolution is added to rlnDefocusU and rlnDefocusV
(docs/method.md eq. (31)). With --fit_astigmatism each micrograph's astigmatism
(rlnMicrographName groups the particles) is fitted too, within --astigmatism_range per
component, and each particle's defocus again after it (eq. (32)).

Per optics group, before the defocus: with --fit_aniso the 2x2 magnification matrix
(rlnMagMat00..11; each particle's defocus is rewritten so that its CTF in the image stays
the same, as RELION does; eq. (34)); with --fit_beamtilt the antisymmetric aberrations, odd
Zernike polynomials up to order --odd_aberr_max_n (3: beam tilt and trefoil; 1: beam tilt
alone), written as RELION 3.1+ does: the beam tilt as rlnBeamTiltX/Y (mrad), the rest as
rlnOddZernike (eq. (33)). The defocus is then fitted with the new optics.

Writes <o>/particles_ctf_refine.star (RELION's name), a log of the fitted values, a histogram
of the defocus changes and, with --fit_beamtilt, per optics group the measured and the
fitted phase over the frequency plane (beamtilt_delta-phase_optics-group_<g>.png). A
refinement from the new file gains what the better CTF allows.

example:
  cryomap ctf_refine --i Refine3D/job001/run_data.star --o CtfRefine/job001
  cryomap ctf_refine --i Refine3D/job001/run_data.star --o CtfRefine/job002 --fit_astigmatism
  cryomap ctf_refine --i Refine3D/job001/run_data.star --o CtfRefine/job003 --fit_beamtilt
  cryomap ctf_refine --i Refine3D/job001/run_data.star --o CtfRefine/job004 --fit_aniso
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
    p.add_argument("--fit_beamtilt", "--fit-beamtilt", action="store_true",
                   help="fit each optics group's beam tilt and odd aberrations (trefoil, ...)")
    p.add_argument("--odd_aberr_max_n", "--odd-aberr-max-n", type=int, default=3, metavar="N",
                   help="highest order of the odd Zernike polynomials fitted with "
                        "--fit_beamtilt: 1 (beam tilt alone), 3 (and trefoil), 5 or 7 (the "
                        "phase fits, but the tilt read from it is no longer the beam tilt)")
    p.add_argument("--fit_aniso", "--fit-aniso", action="store_true",
                   help="fit each optics group's anisotropic magnification matrix")
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
    from ..ctf_aberrations import ODD_MAX_N
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
    if args.odd_aberr_max_n not in ODD_MAX_N:
        raise InputError(f"--odd_aberr_max_n {args.odd_aberr_max_n}: expected an odd order "
                         f"1, 3, 5 or 7")
    if args.threads is not None and args.threads < 1:
        raise InputError(f"--j {args.threads}: expected at least 1 thread")
    check_output_dir(out, "--o")
    diameter = job_particle_diameter(args.particle_diameter, star)
    halves = half_map_paths(star)
    particles = load_particles(star)
    sets = [particles]
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
        work, odd, mag = _fit_optics(args, particles, (maps[0], maps[1]), subset, radius,
                                     r_min, r_max, sets)
        fit = fit_defocus(work, (maps[0], maps[1]), subset, radius, r_min, r_max,
                          search_range=args.defocus_range,
                          astigmatism_range=args.astigmatism_range if args.fit_astigmatism
                          else 0.0)
        delta = fit.delta
        new = work.particles.copy()
        new["rlnDefocusU"], new["rlnDefocusV"] = fit.defocus_u, fit.defocus_v
        if args.fit_astigmatism:
            new["rlnDefocusAngle"] = fit.defocus_angle
        make_output_dir(out, "--o")
        out_star = out / "particles_ctf_refine.star"
        write_particles(out_star, work.optics, new)
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
        lines += _optics_lines(particles, mag, odd)
        write_text_atomic(out / "ctf_refine.log", "\n".join(lines) + "\n")
        _plot(out / "defocus_change.png", delta)
        for o in odd:
            _plot_phase(out / f"beamtilt_delta-phase_optics-group_{o.group + 1}.png", o)
    finally:
        for opened in sets:
            opened.close()
    for line in lines:
        print(line)
    print(f"wrote {out_star}")
    return 0


def _fit_optics(args: argparse.Namespace, particles, maps: tuple, subset: np.ndarray,
                radius: float, r_min: int, r_max: int, opened: list) -> tuple:
    """(particles with the fitted optics, odd fits, magnification fits): --fit_aniso first
    (it rewrites the defocus), then --fit_beamtilt with the new matrix (eqs. (33), (34)).
    Each new particle set is appended to `opened` (the caller closes them)."""
    from dataclasses import replace

    from ..ctf_aberrations import (
        fit_magnification,
        fit_odd_aberrations,
        with_magnification,
        with_odd_aberrations,
    )

    work, odd, mag = particles, [], []
    if args.fit_aniso:
        mag = fit_magnification(work, maps, subset, radius, r_min, r_max)
        optics, table = with_magnification(work.optics, work.particles,
                                           work.optics_group_index(), mag)
        work = replace(work, optics=optics, particles=table)
        opened.append(work)
    if args.fit_beamtilt:
        odd = fit_odd_aberrations(work, maps, subset, radius, r_min, r_max,
                                  args.odd_aberr_max_n)
        work = replace(work, optics=with_odd_aberrations(work.optics, odd))
        opened.append(work)
    return work, odd, mag


def _optics_lines(particles, mag: list, odd: list) -> list[str]:
    """The log's lines of the fitted optics, one or two per group and fit."""
    from ..ctf_aberrations import coefficient_names

    optics = particles.optics
    lines = []

    def name(g: int) -> str:
        label = (f" ({optics['rlnOpticsGroupName'].iloc[g]})"
                 if "rlnOpticsGroupName" in optics else "")
        return f"optics group {g + 1}{label}"

    for m in mag:
        lines.append(f"{name(m.group)}: magnification matrix [[{m.matrix[0, 0]:.5f}, "
                     f"{m.matrix[0, 1]:.5f}], [{m.matrix[1, 0]:.5f}, {m.matrix[1, 1]:.5f}]] "
                     f"from {m.n_particles} particles (was [[{m.start[0, 0]:.5f}, "
                     f"{m.start[0, 1]:.5f}], [{m.start[1, 0]:.5f}, {m.start[1, 1]:.5f}]]): "
                     f"anisotropy {100 * m.anisotropy:.2f} %, mean scale {m.mean:.5f}; its "
                     f"particles' defocus rewritten for it")
        if abs(m.mean - 1.0) > 0.005:
            lines.append(f"  warning: the mean scale differs from 1 by "
                         f"{100 * (m.mean - 1):.2f} %: the pixel size of the map changes")
    for o in odd:
        row = particles.ctf_params(np.flatnonzero(particles.optics_group_index() == o.group)[:1])
        cs, kv = float(np.ravel(row.cs)[0]), float(np.ravel(row.voltage)[0])
        change = ", ".join(f"{n} {c:.4g}" for n, c in zip(coefficient_names(o.indices),
                                                          o.change, strict=True))
        tilt = o.change_tilt(cs, kv)
        lines.append(f"{name(o.group)}: odd aberrations from {o.n_particles} particles, change "
                     f"(rad, 1/Å polynomials) {change}; its beam tilt ({tilt[0]:.3f}, "
                     f"{tilt[1]:.3f}) mrad")
        lines.append(f"  written: rlnBeamTiltX/Y ({o.beam_tilt[0]:.3f}, {o.beam_tilt[1]:.3f}) "
                     f"mrad, rlnOddZernike [" + ", ".join(f"{c:.4g}" for c in o.odd_zernike)
                     + "]")
    return lines


def _plot_phase(path: Path, fit) -> None:
    """The measured phase arg S and the fitted one over the frequency plane (both halves:
    the phase is odd), if matplotlib is there."""
    try:
        import matplotlib
    except ImportError:
        return
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..io.atomic import atomic_path

    c = fit.box // 2
    kx, ky = fit.coords[:, 0].astype(int), fit.coords[:, 1].astype(int)
    fig, axes = plt.subplots(1, 2, figsize=(8, 4))
    for ax, values, title in ((axes[0], fit.measured, "measured"),
                              (axes[1], np.angle(np.exp(1j * fit.fitted)), "fitted")):
        img = np.full((fit.box, fit.box), np.nan)
        img[(ky + c) % fit.box, (kx + c) % fit.box] = values
        img[(c - ky) % fit.box, (c - kx) % fit.box] = -values
        ax.imshow(img, cmap="twilight", vmin=-np.pi, vmax=np.pi, origin="lower",
                  extent=(-c - 0.5, fit.box - c - 0.5, -c - 0.5, fit.box - c - 0.5))
        ax.set_title(f"{title} phase change (rad), optics group {fit.group + 1}", fontsize=9)
        ax.set_xlabel("kx (px)")
        ax.set_ylabel("ky (px)")
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)


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
