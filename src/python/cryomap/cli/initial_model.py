"""`cryomap initial_model`: K ab-initio maps from the particles alone (RELION's InitialModel,
option names as RELION's)."""

from __future__ import annotations

import argparse

from .._kernels import set_threads
from ..em.initial_model import InitialModelOptions
from ..errors import InputError
from .options import (
    add_em_arguments,
    continued_run,
    options_from_args,
    run_settings,
)

COMMAND = "initial_model"
HELP = "ab-initio initial model(s) from the particles alone, by stochastic mini-batch EM"
DESCRIPTION = """\
Make K initial 3D maps from the particles alone, with no reference (RELION's InitialModel,
cryoSPARC's ab initio). The classes start from random maps (particles back-projected at random
poses plus a random low-resolution field); each iteration takes a random mini-batch of
particles through the same E/M engine as refine and class3d (posteriors over class x HEALPix
orientation x in-plane angle x shift on a coarse grid, at the current resolution) and updates
running M-step sums with a step size (stochastic EM); the maps are the MAP reconstructions of
those sums with tau2 from the FSC of two pseudo half-sets (times --tau2_fudge). Resolution
(--ini_high to --grad_fin_resol), mini-batch size (--grad_ini_subset to --grad_fin_subset) and
the HEALPix order grow over the iterations; the last iteration is one pass over all particles.
See docs/initial_model.md.
Projections cannot tell a map from its mirror image: the result has either hand, and run.log
says how to flip it (cryomap flip_hand).
Outputs in --o, RELION's layout: run_itNNN_classNNN.mrc, run_itNNN_model.star,
run_itNNN_data.star; run_classNNN.mrc, run_model.star, run_data.star,
run_central_sections.png and run.log at the end. The map is a --ref for cryomap refine.

example:
  cryomap initial_model --i particles.star --o InitialModel/job001 --particle_diameter 250
  cryomap initial_model --i particles.star --o InitialModel/job002 --K 3 --sym C1 --iter 150
  cryomap initial_model --o InitialModel/job001 --continue   # resume after the last iteration
  cryomap refine --i particles.star --ref InitialModel/job001/run_class001.mrc \\
      --o Refine3D/job001 --particle_diameter 250
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = InitialModelOptions()
    # no reference, local searches, origin prior or E-step radius rule: the schedule sets them
    add_em_arguments(p, d, exclude=("ref", "sigma_ang", "offset_sigma", "incr_size"))
    for action in p._actions:  # the shared options' help, as this command uses them
        if action.dest == "ini_high":
            action.help = "resolution of the first iterations (Å; RELION's --grad_ini_resol)"
    p.add_argument("--ref", help=argparse.SUPPRESS)  # refused in run(): no reference here
    p.add_argument("--K", dest="n_classes", type=int, default=d.n_classes,
                   help="number of classes")
    p.add_argument("--iter", dest="iterations", type=int, default=None,
                   help=f"number of iterations: mini-batches, then one pass over all particles "
                        f"(default {d.iterations}; with --continue, the saved run's)")
    p.add_argument("--grad_ini_resol", dest="ini_high", type=float, default=argparse.SUPPRESS,
                   help=f"resolution of the first iterations (Å; the same as --ini_high, "
                        f"default {d.ini_high:g})")
    p.add_argument("--grad_fin_resol", "--fin_high", dest="fin_high", type=float,
                   default=None, help="resolution of the last iterations (Å; default 18, or "
                   "the finest the box holds)")
    p.add_argument("--grad_ini_subset", dest="ini_subset", type=int, default=None,
                   help="mini-batch size of the first iterations (default: 0.5%% of the "
                        "particles, 200 to 5000)")
    p.add_argument("--grad_fin_subset", dest="fin_subset", type=int, default=None,
                   help="mini-batch size of the last iterations (default: 10%% of the "
                        "particles, 1000 to 50000)")
    p.add_argument("--grad_ini_frac", dest="ini_frac", type=float, default=d.ini_frac,
                   help="share of the iterations at the initial resolution and batch size")
    p.add_argument("--grad_fin_frac", dest="fin_frac", type=float, default=d.fin_frac,
                   help="share of the iterations at the final resolution and batch size")
    p.add_argument("--grad_ini_stepsize", dest="ini_stepsize", type=float,
                   default=d.ini_stepsize,
                   help="step size of the first iterations: share of the running sums that a "
                        "mini-batch replaces, in (0, 1]")
    p.add_argument("--grad_stepsize", dest="stepsize", type=float, default=d.stepsize,
                   help="step size of the last iterations, in (0, 1]")
    p.add_argument("--init_perturbation", "--init-perturbation", dest="perturbation",
                   type=float, default=d.perturbation,
                   help="random low-resolution field added to each starting map, in units of "
                        "the map's standard deviation")
    p.add_argument("--reseed_fraction", "--reseed-fraction", type=float,
                   default=d.reseed_fraction,
                   help="re-seed a class holding less than this fraction of 1/K of the "
                        "particles (first half of the run) from half of the largest class; "
                        "0: never")


def run(args: argparse.Namespace) -> int:
    from ..jobs.initial_model import initial_model, saved_run

    if args.ref is not None:
        raise InputError(f"--ref {args.ref}: initial_model makes its maps from the particles "
                         f"alone; expected no reference (use it with refine or class3d)")
    if args.resume and args.i is None:
        job, threads, memory = continued_run(args, saved_run)
        options = job["options"]
        set_threads(threads)
        initial_model(job["i"], args.o, options, resume=True, max_memory=memory)
        return 0
    if args.i is None:
        raise InputError("--i (particles) is required")
    extra = {}
    if args.iterations is None:
        extra["iterations"] = InitialModelOptions.iterations
    options = options_from_args(InitialModelOptions, args, **extra)
    threads, memory = run_settings(args)
    set_threads(threads)
    initial_model(args.i, args.o, options, resume=args.resume, angpix=args.angpix,
                  max_memory=memory)
    return 0
