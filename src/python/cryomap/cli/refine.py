"""`cryomap refine`: 3D auto-refinement with gold-standard half-sets (RELION's option names)."""

from __future__ import annotations

import argparse

from ..em.refine import RefineOptions
from ..errors import InputError
from .options import (
    add_em_arguments,
    continued_run,
    options_from_args,
    run_settings,
)

COMMAND = "refine"
HELP = "3D auto-refinement by MAP-EM with gold-standard half-sets"
DESCRIPTION = """\
Refine a 3D map and the particle poses by Bayesian MAP expectation-maximisation (RELION's
auto-refine): posteriors over HEALPix orientations x in-plane angles x shifts with adaptive
oversampling, the map updated as V = D/(W + 1/tau2), noise and prior spectra every iteration,
FSC between independent half-sets. The sampling becomes finer as the map improves (local
searches from --auto_local_healpix_order on); when neither resolution nor poses change at the
finest useful sampling, one last iteration at the full image size gives the final map. See
docs/method.md.
Outputs in --o, RELION's layout: run_itNNN_half{1,2}_class001.mrc, run_itNNN_model.star,
run_itNNN_data.star; run_class001.mrc, run_half{1,2}_class001_unfil.mrc, run_model.star,
run_data.star, run_fsc.png, run.log. With --sym, orientations are searched in the group's
asymmetric unit and the maps summed over the group (docs/symmetry.md). At the end the
`cryomap postprocess` command for the half maps is printed (docs/postprocess.md).

example:
  cryomap refine --i particles.star --ref initial.mrc --o Refine3D/job001 \\
      --particle_diameter 250 --ini_high 40
  cryomap refine --i Refine3D/job001/run_data.star --ref Refine3D/job001/run_class001.mrc \\
      --o Refine3D/job002 --healpix_order 4 --sigma_ang 2     # local refinement
  cryomap refine --i particles.star --ref initial.mrc --o Refine3D/job003 --sym D2 \
      --solvent_mask mask.mrc --solvent_correct_fsc
  cryomap refine --o Refine3D/job001 --continue      # resume after the last finished iteration
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    d = RefineOptions()
    add_em_arguments(p, d)
    p.add_argument("--iter", dest="iterations", type=int, default=None,
                   help="a fixed number of iterations (default: until converged)")
    p.add_argument("--auto_local_healpix_order", "--auto-local-healpix-order", type=int,
                   default=d.auto_local_healpix_order,
                   help="HEALPix order from which the searches are local")
    p.add_argument("--prior_model", "--prior-model", dest="prior_model",
                   default=d.prior_model,
                   help="tau2 from the half-map FSC (fsc, RELION) or per voxel (voxel)")
    p.add_argument("--solvent_mask", "--solvent-mask", default=None, metavar="MASK",
                   help="solvent mask (MRC, the particles' box, values in [0, 1]): the "
                        "references are multiplied by it every iteration (RELION's solvent "
                        "flattening), instead of the spherical mask")
    p.add_argument("--nu", action="store_true",
                   help="non-uniform refinement: each iteration, each half map is low-passed "
                        "region by region to the local resolution that its own particles "
                        "support (docs/method.md, \"Non-uniform refinement\")")
    p.add_argument("--solvent_correct_fsc", "--solvent-correct-fsc", action="store_true",
                   help="with --solvent_mask: the half-set FSC behind tau2 and the resolution "
                        "is the masked FSC corrected by phase randomisation (as "
                        "relion_postprocess)")


def run(args: argparse.Namespace) -> int:
    """Run or continue the refinement through the Python API's `cryomap.refine`."""
    from ..api import refine
    from ..jobs.refine import saved_run

    if args.resume and args.i is None:
        job, threads, memory = continued_run(args, saved_run)
        options = job["options"]
        refine(job["i"], job["ref"], args.o, options=options, resume=True,
               max_memory=memory, threads=threads, ranks=args._ranks)
        return 0
    if args.i is None or args.ref is None:
        raise InputError("--i (particles) and --ref (initial map) are required")
    options = options_from_args(RefineOptions, args)
    threads, memory = run_settings(args)
    refine(args.i, args.ref, args.o, options=options, resume=args.resume,
           angpix=args.angpix, max_memory=memory, threads=threads, ranks=args._ranks)
    return 0
