"""`cryomap refine`: 3D auto-refinement with gold-standard half-sets (RELION's option names)."""

from __future__ import annotations

import argparse

from ..em.refine3d import RefineOptions
from ..errors import InputError

COMMAND = "refine"
HELP = "3D refinement by MAP-EM with gold-standard half-sets"
DESCRIPTION = """\
Refine a 3D map and particle poses by Bayesian MAP expectation-maximisation (RELION's
auto-refine method): posteriors over HEALPix orientations x in-plane angles x shifts, map update
V = D/(W + 1/tau2), noise and prior spectra updated every iteration, FSC between half-sets.
Outputs go to --o in RELION's layout (run_itNNN_half1_class001.mrc, run_itNNN_model.star,
run_itNNN_data.star, run_class001.mrc, run_model.star, run_data.star, run_fsc.png, run.log).

example:
  cryomap refine --i particles.star --ref initial.mrc --o Refine3D/job001 \\
      --particle_diameter 180 --ini_high 40 --healpix_order 2 --offset_range 6 --iter 10
  cryomap refine --o Refine3D/job001 --continue      # resume after the last finished iteration
"""


def add_refine_arguments(p: argparse.ArgumentParser) -> None:
    """Options shared by refine and the classification commands (RELION's spellings, with
    dash-style aliases)."""
    d = RefineOptions()
    p.add_argument("--i", required=False, help="particles STAR file (RELION 3.0 or 3.1+)")
    p.add_argument("--o", required=True, help="output folder")
    p.add_argument("--ref", help="initial reference map (MRC); box and pixel size as particles")
    p.add_argument("--iter", type=int, default=d.iterations, help="number of iterations")
    p.add_argument("--healpix_order", "--healpix-order", type=int, default=d.healpix_order,
                   help="HEALPix order of the orientation grid (2 = 15 degrees)")
    p.add_argument("--psi_step", "--psi-step", type=float, default=None,
                   help="in-plane angular step in degrees (default: the HEALPix step)")
    p.add_argument("--offset_range", "--offset-range", type=float, default=d.offset_range,
                   help="translation search range (px)")
    p.add_argument("--offset_step", "--offset-step", type=float, default=d.offset_step,
                   help="translation search step (px)")
    p.add_argument("--offset_sigma", "--offset-sigma", type=float, default=None,
                   help="std. dev. of the Gaussian prior on origins (A); default flat")
    p.add_argument("--ini_high", "--ini-high", type=float, default=d.ini_high,
                   help="low-pass the initial reference to this resolution (A)")
    p.add_argument("--particle_diameter", "--particle-diameter", type=float, default=None,
                   help="particle mask diameter (A); default (box - 5) px")
    p.add_argument("--tau2_fudge", "--tau2-fudge", type=float, default=d.tau2_fudge,
                   help="regularisation parameter T")
    p.add_argument("--pad", type=int, choices=(1, 2), default=d.pad, help="padding factor")
    p.add_argument("--interp", choices=("nearest", "linear"), default=d.interp,
                   help="Fourier-space interpolation")
    p.add_argument("--force-max", "--force_max", action="store_true",
                   help="take the best pose instead of marginalising over poses")
    p.add_argument("--adaptive_fraction", "--adaptive-fraction", type=float,
                   default=d.significant_fraction,
                   help="posterior mass kept per particle (significant samples)")
    p.add_argument("--noise-model", choices=("shell", "pixel"), default=d.noise_model,
                   help="sigma2 pooled per resolution shell (RELION) or per pixel (seed eq. 15)")
    p.add_argument("--prior-model", choices=("fsc", "voxel"), default=d.prior_model,
                   help="tau2 from the half-map FSC (RELION) or per voxel (seed eq. 16)")
    p.add_argument("--sym", default="C1", help="point-group symmetry (only C1 so far)")
    p.add_argument("--ctf", action="store_true", default=True,
                   help="correct for the CTF (default; RELION's flag, accepted for scripts)")
    p.add_argument("--no-ctf", "--no_ctf", dest="ctf", action="store_false",
                   help="data without CTF (no defocus columns needed)")
    p.add_argument("--j", "--threads", dest="threads", type=int, default=None,
                   help="OpenMP threads (default: all cores)")
    p.add_argument("--seed", "--random_seed", type=int, default=d.seed,
                   help="random seed (half-set split)")
    p.add_argument("--continue", dest="resume", action="store_true",
                   help="continue the run in --o from its last finished iteration")


def options_from_args(args: argparse.Namespace) -> RefineOptions:
    """RefineOptions from parsed arguments (errors as InputError)."""
    if args.sym.upper() != "C1":
        raise InputError(f"--sym {args.sym}: only C1 is implemented so far")
    try:
        return RefineOptions(
            iterations=args.iter, healpix_order=args.healpix_order, psi_step=args.psi_step,
            offset_range=args.offset_range, offset_step=args.offset_step,
            offset_sigma=args.offset_sigma, ini_high=args.ini_high,
            particle_diameter=args.particle_diameter, tau2_fudge=args.tau2_fudge,
            pad=args.pad, interp=args.interp, force_max=args.force_max,
            significant_fraction=args.adaptive_fraction, noise_model=args.noise_model,
            prior_model=args.prior_model, use_ctf=args.ctf, seed=args.seed)
    except ValueError as e:
        raise InputError(str(e)) from None


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_refine_arguments(p)


def run(args: argparse.Namespace) -> int:
    from .._kernels import set_threads
    from ..em.refine_job import refine, saved_job

    set_threads(args.threads)
    if args.resume and args.i is None:
        star, ref, options = saved_job(args.o)
        options.iterations = max(options.iterations, args.iter)
        refine(star, ref, args.o, options, resume=True)
        return 0
    if args.i is None or args.ref is None:
        raise InputError("--i (particles STAR) and --ref (initial map) are required")
    refine(args.i, args.ref, args.o, options_from_args(args), resume=args.resume)
    return 0
