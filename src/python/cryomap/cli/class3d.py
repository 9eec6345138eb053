"""`cryomap class3d`: 3D classification by EM, marginalising over class, orientation and shift
(RELION's Class3D; option names as RELION's)."""

from __future__ import annotations

import argparse
from dataclasses import asdict

from ..em.classify import ClassOptions
from ..errors import InputError
from .refine import add_refine_arguments, options_from_args

COMMAND = "class3d"
DEFAULT_ITERATIONS = 25  # RELION's GUI default for Class2D and Class3D
HELP = "3D classification by EM with class marginalisation"
DESCRIPTION = """\
Sort particles into K 3D classes by Bayesian MAP expectation-maximisation (RELION's Class3D):
posteriors over class x HEALPix orientation x in-plane angle x shift, one map per class updated
as V = D/(W + 1/tau2) with tau2 from the class map's power, the class distribution, noise spectra
and Fourier radius (from the best class's SSNR) updated every iteration; no half-set split.
Classes start from the reference low-passed to --ini_high, each with its own random perturbation,
and in the first iteration each particle stays in a random class (RELION's seeds).
Outputs go to --o in RELION's layout (run_itNNN_classNNN.mrc, run_itNNN_model.star with
rlnClassDistribution, run_itNNN_data.star with rlnClassNumber; run_classNNN.mrc, run_model.star,
run_data.star and run.log at the end). Defaults as RELION's GUI: --K 4, --iter 25,
--tau2_fudge 4.

example:
  cryomap class3d --i particles.star --ref consensus.mrc --o Class3D/job001 --K 4 \\
      --particle_diameter 180 --ini_high 40 --healpix_order 2 --iter 25
  cryomap class3d --o Class3D/job001 --continue      # resume after the last finished iteration
"""


def add_class_arguments(p: argparse.ArgumentParser, n_classes: int, tau2_fudge: float) -> None:
    """The refinement's options plus those of classification (RELION's spellings, with
    dash-style aliases)."""
    add_refine_arguments(p)
    d = ClassOptions()
    p.add_argument("--K", type=int, default=n_classes, help="number of classes")
    p.add_argument("--hard-last", "--hard_last", dest="hard_last", action="store_true",
                   help="hard classification in the last iteration: each particle contributes "
                        "only to its most probable class")
    p.add_argument("--strict_highres_exp", "--strict-highres-exp", type=float, default=None,
                   help="never use frequencies beyond this resolution (A) in the E-step")
    p.add_argument("--perturb", type=float, default=d.perturb,
                   help="random offset of the sampling grids each iteration, in steps")
    p.add_argument("--reseed_fraction", "--reseed-fraction", type=float,
                   default=d.reseed_fraction,
                   help="re-seed a class holding less than this fraction of 1/K of the "
                        "particles (first half of the iterations) from half of the largest "
                        "class; 0: never (as RELION)")
    # --iter: 25 for a new run; with --continue, the saved run's unless given
    p.set_defaults(iter=None, tau2_fudge=tau2_fudge)


def class_options_from_args(args: argparse.Namespace, ndim: int, **extra) -> ClassOptions:
    """ClassOptions from parsed arguments (errors as InputError)."""
    if args.iter is None:
        args.iter = DEFAULT_ITERATIONS
    base = options_from_args(args)
    try:
        return ClassOptions(**asdict(base), n_classes=args.K, ndim=ndim,
                            hard_last=args.hard_last, highres_limit=args.strict_highres_exp,
                            perturb=args.perturb, reseed_fraction=args.reseed_fraction, **extra)
    except ValueError as e:
        raise InputError(str(e)) from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_class_arguments(p, n_classes=4, tau2_fudge=4.0)
    p.add_argument("--init_perturbation", "--init-perturbation", type=float,
                   default=ClassOptions().perturbation,
                   help="random low-resolution perturbation of each initial class, in units "
                        "of the low-passed reference's standard deviation")


def run(args: argparse.Namespace) -> int:
    from .._kernels import set_threads
    from ..em.class3d import classify3d
    from ..em.classify import saved_job

    set_threads(args.threads)
    if args.resume and args.i is None:
        star, ref, options = saved_job(args.o)
        if options.ndim != 3:
            raise InputError(f"{args.o}: the run there is a 2D classification; use class2d")
        options.iterations = max(options.iterations, args.iter or 0)
        classify3d(star, ref, args.o, options, resume=True)
        return 0
    if args.i is None or args.ref is None:
        raise InputError("--i (particles STAR) and --ref (initial map) are required")
    options = class_options_from_args(args, 3, perturbation=args.init_perturbation)
    classify3d(args.i, args.ref, args.o, options, resume=args.resume)
    return 0
