"""`cryomap select`: a subset of particles (RELION's Select job)."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import InputError
from .options import job_particle_diameter

COMMAND = "select"
HELP = "write a subset of particles: by class, by a column's value, or the good 2D classes"
DESCRIPTION = """\
Write the particles of --i that pass every selection given, as a RELION particle file:
  --classes K ...          the particles of these classes (rlnClassNumber, 1-based);
  --select LABEL --minval A --maxval B
                           those whose column LABEL lies within [A, B] (as relion_star_handler);
  --auto                   the particles of the 2D classes that hold a centred particle at
                           good resolution: each class of the classification (its
                           <root>_model.star and class averages beside --i) is judged by its
                           resolution against the best class's, whether its average's signal
                           lies centred within the particle, and its size; within the kept
                           classes, particles whose amplitude (rlnCtfScalefactor) is below
                           half the median, or whose log-likelihood
                           (rlnLogLikeliContribution) lies more than 2.5 robust standard
                           deviations below the median, are dropped too (docs/running.md).
What was kept and dropped, and why, is printed.

examples:
  cryomap select --i Class2D/job001/run_data.star --o Select/job001/particles.star --auto
  cryomap select --i Class2D/job001/run_data.star --o Select/job002/particles.star \\
      --classes 1 4 7
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--i", required=True, help="particles (RELION STAR), e.g. a "
                                              "classification's run_data.star")
    p.add_argument("--o", required=True, help="output particle file (STAR)")
    p.add_argument("--classes", type=int, nargs="+", default=None, metavar="K",
                   help="keep the particles of these classes (rlnClassNumber)")
    p.add_argument("--select", dest="column", default=None, metavar="LABEL",
                   help="keep the particles whose column LABEL is within --minval, --maxval")
    p.add_argument("--minval", type=float, default=None, help="lowest value kept (--select)")
    p.add_argument("--maxval", type=float, default=None, help="highest value kept (--select)")
    p.add_argument("--auto", action="store_true",
                   help="keep the 2D classes that hold a centred particle at good resolution")
    p.add_argument("--particle_diameter", type=float, default=None, metavar="A",
                   help="--auto: the particle's diameter (Å); default: the classification's "
                        "(its job.json), else 80%% of the box")


def _check(args: argparse.Namespace) -> None:
    if args.classes is None and args.column is None and not args.auto:
        raise InputError("nothing to select by: give --classes, --select or --auto")
    if (args.minval is not None or args.maxval is not None) and args.column is None:
        raise InputError("--minval/--maxval: give the column with --select LABEL")
    if args.column is not None and args.minval is None and args.maxval is None:
        raise InputError(f"--select {args.column}: give --minval and/or --maxval")
    if args.minval is not None and args.maxval is not None and args.minval > args.maxval:
        raise InputError(f"--minval {args.minval:g} > --maxval {args.maxval:g}")
    if args.classes is not None and min(args.classes) < 1:
        raise InputError(f"--classes {min(args.classes)}: classes are numbered from 1")


def run(args: argparse.Namespace) -> int:
    from ..io.atomic import check_output_dir, make_output_dir
    from ..io.star import read_star
    from ..particles import write_particles
    from ..select import (
        MAX_LIKELIHOOD_DEVIATION,
        MIN_AMPLITUDE,
        amplitude_outliers,
        likelihood_outliers,
        rank_classes,
        select_rows,
    )

    _check(args)
    star, out = Path(args.i), Path(args.o)
    diameter = job_particle_diameter(args.particle_diameter, star)
    if star.resolve() == out.resolve():
        raise InputError(f"--o {out}: the same file as --i; expected a new file")
    if out.is_dir():
        raise InputError(f"--o {out}: is a folder; expected a file name")
    check_output_dir(out.parent, "--o")  # created (RELION's Select/jobNNN/) once all is checked
    blocks = read_star(star)
    particles = blocks.get("particles")
    optics = blocks.get("optics")
    if not isinstance(particles, pd.DataFrame) or not isinstance(optics, pd.DataFrame):
        raise InputError(f"{star}: no data_optics and data_particles tables; expected a "
                         f"RELION 3.1 particle file")
    keep = select_rows(particles, str(star), args.classes, args.column, args.minval,
                       args.maxval)
    lines = []
    if args.auto:
        if "rlnClassNumber" not in particles:
            raise InputError(f"{star}: no rlnClassNumber column; --auto needs a "
                             f"classification's data file")
        box = int(optics["rlnImageSize"].iloc[0])
        pix = float(optics["rlnImagePixelSize"].iloc[0])
        radius = 0.5 * diameter / pix if diameter else 0.4 * box
        ranks = rank_classes(star, particles, radius)
        good = [r.number for r in ranks if r.keep]
        in_good = np.isin(particles["rlnClassNumber"].to_numpy(np.int64), good)
        faint = amplitude_outliers(particles) & in_good
        unexplained = likelihood_outliers(particles) & in_good & ~faint
        keep &= in_good & ~faint & ~unexplained
        lines = [f"class {r.number:3d}: {r.particles:6d} particles, {r.reason}" for r in ranks]
        lines.append(f"dropped {int(faint.sum())} particle(s) of the kept classes whose "
                     f"amplitude (rlnCtfScalefactor) is below {MIN_AMPLITUDE:g} x the median")
        lines.append(f"dropped {int(unexplained.sum())} more whose log-likelihood "
                     f"(rlnLogLikeliContribution) is over {MAX_LIKELIHOOD_DEVIATION:g} robust "
                     f"standard deviations below the median")
    if not keep.any():
        raise InputError(f"{star}: no particle passes the selection; nothing written")
    for line in lines:
        print(line)
    make_output_dir(out.parent, "--o")
    write_particles(out, optics, particles[keep].reset_index(drop=True))
    print(f"kept {int(keep.sum())} of {len(particles)} particles; wrote {out}")
    return 0
