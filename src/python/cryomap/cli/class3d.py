"""`cryomap class3d`: 3D classification by EM, marginalising over class, orientation and shift
(RELION's Class3D; option names as RELION's)."""

from __future__ import annotations

import argparse

from ..em.classify import SCHEDULES, ClassOptions
from ..errors import InputError
from .options import (
    add_em_arguments,
    continued_run,
    options_from_args,
    run_settings,
)

COMMAND = "class3d"
HELP = "3D classification by EM with class marginalisation"
DESCRIPTION = """\
Sort particles into K 3D classes by Bayesian MAP expectation-maximisation (RELION's Class3D):
posteriors over class x HEALPix orientation x in-plane angle x shift, one map per class updated
as V = D/(W + 1/tau2) with tau2 from the class map's power, the class distribution, noise
spectra and Fourier radius (from the best class's SSNR) updated every iteration; no half-set
split. Classes start from the reference low-passed to --ini_high, each with its own random
perturbation, and in the first iteration each particle stays in a random class (RELION's
seeds); --ref may instead list K maps in a STAR file (rlnReferenceImage), used as they are.
--skip_align classifies at the poses in --i (e.g. a refinement's run_data.star).
Beyond RELION, for subtle differences (docs/method.md): each class differs only up to the
resolution where its difference is supported (--class_difference_fsc; at fixed poses
--class_difference_fsc_fixed) and only where in the map it is (--class_difference_window), the class
posterior is softened early on (--class_temperature 4, annealed to 1), and where the classes
have not formed after 30% of the iterations the poses are refined against one consensus map
and the classes told apart at those poses (--schedule adaptive, the default).
Outputs in --o, RELION's layout: run_itNNN_classNNN.mrc, run_itNNN_model.star
(rlnClassDistribution), run_itNNN_data.star (rlnClassNumber); run_classNNN.mrc, run_model.star,
run_data.star and run.log at the end. Defaults as RELION's GUI (--K 4, --iter 25,
--tau2_fudge 4), and --class_temperature 4.

example:
  cryomap class3d --i particles.star --ref consensus.mrc --o Class3D/job001 --K 4 \\
      --particle_diameter 250 --ini_high 40 --iter 25
  cryomap class3d --o Class3D/job001 --continue      # resume after the last finished iteration
"""


def add_class_arguments(p: argparse.ArgumentParser, ndim: int,
                        d: ClassOptions | None = None) -> None:
    """The shared options plus those of classification, with class{ndim}d's defaults
    (`ClassOptions.defaults`) or `d`'s."""
    d = ClassOptions.defaults(ndim) if d is None else d
    add_em_arguments(p, d, exclude=() if ndim == 3 else ("sym",))  # 2D: no point group
    p.add_argument("--K", dest="n_classes", type=int, default=d.n_classes,
                   help="number of classes")
    p.add_argument("--iter", dest="iterations", type=int, default=None,
                   help=f"number of iterations (default {d.iterations}; with --continue, the "
                        "saved run's)")
    p.add_argument("--hard_last", "--hard-last", dest="hard_last", action="store_true",
                   help="hard classification in the last iteration: each particle contributes "
                        "only to its most probable class")
    p.add_argument("--class_temperature", "--class-temperature", dest="class_temperature",
                   type=float, default=d.class_temperature,
                   help="class-similarity control: the class posterior is raised to 1/T in the "
                        "M-step, T falling from this value to 1 over the first half of the "
                        "iterations (after the classes are seeded); keeps a particle's own "
                        "noise from freezing it in its seed class; 1: plain EM, as RELION; "
                        "cryoSPARC's class similarity s is T = 1/(1 - s) (docs/method.md) "
                        f"(default {d.class_temperature:g})")
    if not d.heterogeneous:  # heterogeneous refinement always has half-sets
        p.add_argument("--split_halves", "--split-halves", dest="split_halves",
                       action="store_true", default=d.split_halves,
                       help="gold-standard classes: each half-set is classified against the "
                            "other half's class maps, each map regularised by its half-set FSC")
    p.add_argument("--strict_highres_exp", "--strict-highres-exp", dest="highres_limit",
                   type=float, default=None,
                   help="never use frequencies beyond this resolution (Å) in the E-step")
    p.add_argument("--reseed_fraction", "--reseed-fraction", type=float,
                   default=d.reseed_fraction,
                   help="re-seed a class holding less than this fraction of 1/K of the "
                        "particles (first half of the iterations) from half of the largest "
                        "class; 0: never (as RELION)")


def class_options(args: argparse.Namespace, ndim: int,
                  d: ClassOptions | None = None) -> ClassOptions:
    """ClassOptions from parsed arguments over the command's defaults `d` (class{ndim}d's
    when None); InputError on bad values."""
    d = ClassOptions.defaults(ndim) if d is None else d
    extra = {"ndim": ndim, "heterogeneous": d.heterogeneous}
    if "schedule" not in vars(args):  # class2d, hetero_refine: the command's own
        extra["schedule"] = d.schedule
    if args.iterations is None:
        extra["iterations"] = d.iterations
    return options_from_args(ClassOptions, args, **extra)


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_class_arguments(p, 3)
    p.add_argument("--skip_align", "--skip-align", dest="skip_align", action="store_true",
                   help="classify without alignment: every particle at its pose in --i")
    p.add_argument("--schedule", choices=SCHEDULES, default=ClassOptions.schedule,
                   help="adaptive: RELION's Class3D (each class's poses searched from the "
                        "first iteration) until the classes form, then each class's poses "
                        "searched on refinement's sampling schedule (finer HEALPix orders, "
                        "then local); if they have not formed after 30%% of the iterations "
                        "(at least 6; subtle differences), the consensus schedule from there "
                        "on, its last step local searches per class around the consensus "
                        "poses. consensus: the poses refined against one "
                        "consensus map on refinement's sampling schedule, then the classes "
                        "seeded and classified at those poses until settled, then each "
                        "class's poses searched again. classic: RELION's Class3D throughout "
                        "(docs/method.md, \"Classification schedules\")")
    p.add_argument("--auto_sampling", "--auto-sampling", dest="schedule",
                   action="store_const", const="consensus", default=argparse.SUPPRESS,
                   help="the same as --schedule consensus")
    p.add_argument("--no-auto_sampling", "--no-auto-sampling", dest="schedule",
                   action="store_const", const="classic", default=argparse.SUPPRESS,
                   help="the same as --schedule classic")
    p.add_argument("--class_difference_fsc", "--class-difference-fsc", dest="difference_fsc",
                   type=float, default=ClassOptions.difference_fsc,
                   help="each class differs only up to the resolution where the half-set FSC "
                        "of its difference from the consensus reaches this; beyond it the "
                        "class is the consensus map (keeps noise at high resolution from "
                        "deciding classes; docs/method.md). 0: off, as RELION")
    p.add_argument("--class_difference_fsc_fixed", "--class-difference-fsc-fixed",
                   dest="difference_fsc_fixed", type=float,
                   default=ClassOptions.difference_fsc_fixed,
                   help="with --class_difference_fsc, the threshold at fixed poses "
                        "(--skip_align, the fixed-pose phase of the schedules) and in the "
                        "local searches per class after it, where the differences are also "
                        "weighted by where they are supported (docs/method.md)")
    p.add_argument("--class_difference_window", "--class-difference-window",
                   dest="difference_window", type=float,
                   default=ClassOptions.difference_window,
                   help="with --class_difference_fsc, the classes differ from the consensus "
                        "only where the two half-sets' differences agree: their local "
                        "correlation in a Gaussian window of this many times the differences' "
                        "resolution weights each voxel's difference (docs/method.md). 0: off")
    p.add_argument("--init_perturbation", "--init-perturbation", dest="perturbation",
                   type=float, default=ClassOptions.defaults(3).perturbation,
                   help="random low-resolution perturbation of each initial class, in units "
                        "of the low-passed reference's standard deviation")


def run_classification(args: argparse.Namespace, ndim: int,
                       d: ClassOptions | None = None) -> int:
    """Run or continue a classification (class3d, class2d, or hetero_refine with `d` its
    defaults) through the Python API's `cryomap.classify3d` / `cryomap.classify2d`."""
    from ..api import classify2d, classify3d
    from ..jobs.classify import saved_run

    d = ClassOptions.defaults(ndim) if d is None else d
    if args.resume and args.i is None:
        job, threads, memory = continued_run(args, saved_run)
        options, i, ref, kw = job["options"], job["i"], job["ref"], {"resume": True}
        if (options.ndim, options.heterogeneous) != (ndim, d.heterogeneous):
            use = ("class2d" if options.ndim == 2 else
                   "hetero_refine" if options.heterogeneous else "class3d")
            raise InputError(f"{args.o}: the run there is a {use} run; continue it with "
                             f"cryomap {use}")
    else:
        if args.i is None or (ndim == 3 and args.ref is None):
            raise InputError("--i (particles) and --ref (initial map) are required"
                             if ndim == 3 else "--i (particles) is required")
        options, i, ref = class_options(args, ndim, d), args.i, args.ref
        threads, memory = run_settings(args)
        kw = {"resume": args.resume, "angpix": args.angpix}
    common = {"options": options, "max_memory": memory, "threads": threads,
              "ranks": args._ranks, **kw}
    if ndim == 3:
        classify3d(i, ref, args.o, **common)
    else:
        classify2d(i, args.o, reference=ref, **common)
    return 0


def run(args: argparse.Namespace) -> int:
    """Run or continue the classification (`run_classification`)."""
    return run_classification(args, 3)
