"""`cryomap locres`: local resolution by local FSC between two half maps (RELION's
relion_postprocess --locres; docs/locres.md)."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

import numpy as np

from ..errors import InputError
from .options import seed_arg

COMMAND = "locres"
HELP = "local resolution map by local FSC of two half maps (as relion_postprocess --locres)"
DESCRIPTION = """\
Estimate the local resolution of a reconstruction from its two unfiltered half maps, as
relion_postprocess --locres does: at points on a grid of spacing --locres_sampling (inside
--mask, or without one in a sphere of the box), both halves are multiplied by a soft
spherical window (flat to --locres_window, raised cosine --locres_edgwidth wide), the FSC of
the windowed halves is corrected for the window's own correlation (phases randomised beyond
--locres_randomize_at) and the resolution is read where it drops below --fsc_threshold.
The sample values are blended smoothly to every voxel. Outputs in the --o folder:
relion_locres.mrc (local resolution, A, per voxel; 0 where not estimated),
relion_locres_filtered.mrc (the average of the halves, each voxel low-passed to its local
resolution), locres_sections.png (central sections coloured by local resolution); a
histogram of the local resolutions inside the mask is printed. See docs/locres.md.

example:
  cryomap locres --half1 Refine3D/job001/run_half1_class001_unfil.mrc \\
      --half2 Refine3D/job001/run_half2_class001_unfil.mrc --mask mask.mrc --o Locres/job001
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of `cryomap locres` (relion_postprocess's --locres_* names)."""
    p.add_argument("--half1", required=True, metavar="MAP",
                   help="unfiltered half map 1 (MRC), e.g. run_half1_class001_unfil.mrc")
    p.add_argument("--half2", required=True, metavar="MAP",
                   help="unfiltered half map 2 (MRC), same box and pixel size")
    p.add_argument("--o", dest="output", required=True, metavar="DIR",
                   help="output folder (created if missing)")
    p.add_argument("--mask", default=None, metavar="MAP",
                   help="solvent mask (MRC, values in [0, 1]): windows are placed where it is "
                        ">= 0.5 and the map is 0 where it is 0; none: windows in a sphere "
                        "of the box, as RELION")
    p.add_argument("--angpix", type=float, default=-1.0, metavar="A",
                   help="pixel size (A); <= 0: half map 1's header")
    p.add_argument("--locres_sampling", "--locres-sampling", type=float, default=25.0,
                   metavar="A", help="spacing of the window centres (A)")
    p.add_argument("--locres_window", "--locres-window", "--locres_maskrad",
                   "--locres-maskrad", dest="locres_window", type=float, default=None,
                   metavar="A", help="radius of the flat part of the soft spherical window "
                                     "(A); none: half the sampling (RELION's)")
    p.add_argument("--locres_edgwidth", "--locres-edgwidth", type=float, default=None,
                   metavar="A", help="width of the window's raised-cosine edge (A); none: the "
                                     "sampling (RELION's)")
    p.add_argument("--locres_randomize_at", "--locres-randomize-at", type=float, default=25.0,
                   metavar="A", help="randomise phases from this resolution (A) to measure "
                                     "the correlation the window itself creates")
    p.add_argument("--locres_minres", "--locres-minres", type=float, default=50.0,
                   metavar="A", help="coarsest local resolution reported (A)")
    p.add_argument("--fsc_threshold", "--fsc-threshold", type=float, default=0.143,
                   metavar="FSC", help="FSC threshold of the local resolution")
    p.add_argument("--random_seed", "--random-seed", type=seed_arg, default=0,
                   help="seed of the phase randomisation")
    p.add_argument("--j", "--threads", dest="threads", type=int, default=None,
                   help="threads computing windows; none: all cores")


def _finite(label: str, value: float | None) -> None:
    if value is not None and not np.isfinite(value):
        raise InputError(f"{label} {value}: expected a finite number")


def _check_options(args: argparse.Namespace) -> None:
    """Every option on its own, before any file is read."""
    for label, value in (("--angpix", args.angpix), ("--locres_sampling", args.locres_sampling),
                         ("--locres_window", args.locres_window),
                         ("--locres_edgwidth", args.locres_edgwidth),
                         ("--locres_randomize_at", args.locres_randomize_at),
                         ("--locres_minres", args.locres_minres),
                         ("--fsc_threshold", args.fsc_threshold)):
        _finite(label, value)
    if args.locres_sampling <= 0:
        raise InputError(f"--locres_sampling {args.locres_sampling:g}: expected a positive "
                         f"spacing (A)")
    if args.locres_window is not None and args.locres_window <= 0:
        raise InputError(f"--locres_window {args.locres_window:g}: expected a positive radius "
                         f"(A)")
    if args.locres_edgwidth is not None and args.locres_edgwidth < 0:
        raise InputError(f"--locres_edgwidth {args.locres_edgwidth:g}: expected a width >= 0 "
                         f"(A)")
    if args.locres_randomize_at <= 0:
        raise InputError(f"--locres_randomize_at {args.locres_randomize_at:g}: expected a "
                         f"positive resolution (A)")
    if args.locres_minres <= 0:
        raise InputError(f"--locres_minres {args.locres_minres:g}: expected a positive "
                         f"resolution (A)")
    if not 0.0 < args.fsc_threshold < 1.0:
        raise InputError(f"--fsc_threshold {args.fsc_threshold:g}: expected a value in (0, 1)")
    if args.threads is not None and args.threads < 1:
        raise InputError(f"--j {args.threads}: expected at least 1 thread")


def _geometry(args: argparse.Namespace, box: int, pix: float) -> tuple[int, float, float, int]:
    """(step px, window radius px, edge px, randomisation shell), checked against the box."""
    step = int(np.floor(args.locres_sampling / pix + 0.5))
    if step < 1:
        raise InputError(f"--locres_sampling {args.locres_sampling:g}: under half a pixel "
                         f"({pix:g} A); expected >= {pix:g} A")
    window = 0.5 * args.locres_sampling if args.locres_window is None else args.locres_window
    edge = args.locres_sampling if args.locres_edgwidth is None else args.locres_edgwidth
    if window >= box * pix / 2:
        raise InputError(f"--locres_window {window:g}: the window (diameter {2 * window:g} A) "
                         f"is not smaller than the box ({box * pix:g} A); expected a radius "
                         f"< {box * pix / 2:g} A")
    rshell = int(box * pix / args.locres_randomize_at)
    if not 1 <= rshell <= box // 2:
        raise InputError(f"--locres_randomize_at {args.locres_randomize_at:g}: outside the "
                         f"box's shells; expected {2 * pix:g}..{box * pix:g} A")
    return step, window / pix, edge / pix, rshell


def _read_inputs(args: argparse.Namespace):
    """Half maps, mask (or None) and pixel size, every consistency checked."""
    from ..io.mrc import read_half_maps, read_map
    from ..masks import check_mask

    h1_path, h2_path = Path(args.half1), Path(args.half2)
    h1, h2, pix = read_half_maps(h1_path, h2_path, args.angpix,
                                 (f"--half1 {h1_path}", f"--half2 {h2_path}"))
    mask, notes = None, []
    if args.mask is not None:
        mask_path = Path(args.mask)
        mask, pix_mask = read_map(mask_path)
        check_mask(mask, h1.shape, f"--mask {mask_path}")
        if abs(pix_mask - pix) > 1e-3:
            notes.append(f"{mask_path}: header pixel size {pix_mask:g} A differs from the half "
                         f"maps' {pix:g} A (the mask is used voxel for voxel)")
    return h1, h2, mask, pix, notes


def plot_sections(path: Path, volume: np.ndarray, locres: np.ndarray) -> None:
    """The three central sections of `volume` in grey, overlaid with the local resolution
    (jet, blue = fine; clear where 0), PNG written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..io.atomic import atomic_path

    c = volume.shape[0] // 2
    known = locres[locres > 0]
    lo, hi = (float(known.min()), float(known.max())) if known.size else (0.0, 1.0)
    fig, axes = plt.subplots(1, 3, figsize=(12, 4.4))
    for ax, (title, sec) in zip(axes, (("z = centre (x, y)", np.s_[c, :, :]),
                                       ("y = centre (x, z)", np.s_[:, c, :]),
                                       ("x = centre (y, z)", np.s_[:, :, c])), strict=True):
        ax.imshow(volume[sec], cmap="gray", origin="lower")
        loc = np.ma.masked_less_equal(locres[sec], 0.0)
        im = ax.imshow(loc, cmap="jet", vmin=lo, vmax=max(hi, lo + 1e-6), alpha=0.55,
                       origin="lower")
        ax.set_title(title, fontsize=9)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.colorbar(im, ax=axes, shrink=0.85, label="local resolution (Å)")
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=90, format="png")
    plt.close(fig)


def run(args: argparse.Namespace) -> int:
    """Check every input, compute, then write the outputs (nothing is written on error)."""
    from .. import locres as lr
    from ..io.atomic import check_output_dir, make_output_dir, remove_stale_temps
    from ..io.mrc import write_map

    _check_options(args)
    out = Path(args.output)
    check_output_dir(out, "--o")
    h1, h2, mask, pix, notes = _read_inputs(args)
    n = h1.shape[0]
    step, radius_px, edge_px, _ = _geometry(args, n, pix)
    if mask is not None and not len(lr.sample_points(n, step, radius_px, mask)):
        raise InputError(f"--mask {args.mask}: no voxel >= 0.5 near a window centre (within "
                         f"{n / 2 - radius_px:g} px of the box centre); expected a mask on the "
                         f"particle")
    threads = args.threads or os.cpu_count() or 1

    lf = lr.local_fsc(h1, h2, pix, radius_px, step, mask, edge_px=edge_px,
                      randomize_at=args.locres_randomize_at, seed=args.random_seed,
                      threads=threads)
    locres = lr.local_resolution(lf, args.fsc_threshold, args.locres_minres, mask)
    average = 0.5 * (h1.astype(np.float64) + h2)
    filtered = lr.filter_to_local_resolution(average, locres, pix, threads=threads)

    make_output_dir(out, "--o")
    remove_stale_temps(out)
    write_map(out / "relion_locres.mrc", locres.astype(np.float32), pix)
    write_map(out / "relion_locres_filtered.mrc", filtered.astype(np.float32), pix)
    try:
        import matplotlib  # noqa: F401

        plot_sections(out / "locres_sections.png", average, locres)
        png = ", locres_sections.png"
    except ImportError:
        notes.append("matplotlib is not installed: locres_sections.png not written")
        png = ""

    for line in notes:
        print(f"warning: {line}")
    inside = (mask >= 0.5) if mask is not None else (locres > 0)
    where = "voxels with mask >= 0.5" if mask is not None else "voxels estimated"
    vals = locres[inside & (locres > 0)]
    print(f"local resolution in {len(lf.centres)} windows: sampling {args.locres_sampling:g} A "
          f"({step} px), window radius {radius_px * pix:g} A + {edge_px * pix:g} A edge, "
          f"phases randomised from {n * pix / lf.randomise_shell:.2f} A, FSC threshold "
          f"{args.fsc_threshold:g}")
    if vals.size:
        print(f"local resolution ({where}): median {np.median(vals):.2f} A, range "
              f"{vals.min():.2f}-{vals.max():.2f} A")
        edges, counts = lr.histogram(locres, inside)
        print("histogram: " + " | ".join(f"{a:g}-{b:g} A: {k}" for a, b, k in
                                         zip(edges[:-1], edges[1:], counts, strict=True)))
    missed = int(np.count_nonzero(inside & (locres <= 0)))
    if missed:
        print(f"warning: {missed} voxels with mask >= 0.5 are beyond every window (0 in "
              f"relion_locres.mrc): the mask reaches outside the sphere of radius N/2 - "
              f"window radius where windows are placed")
    print(f"wrote {out}/relion_locres.mrc, relion_locres_filtered.mrc{png}")
    return 0
