"""`cryomap hetero_refine`: heterogeneous refinement (cryoSPARC's job of that name): K classes
refined at once, each with gold-standard half-sets, class membership marginalised."""

from __future__ import annotations

import argparse

from ..em.classify import ClassOptions
from .class3d import add_class_arguments, run_classification

COMMAND = "hetero_refine"
HELP = "heterogeneous refinement: K classes, gold-standard half-sets per class"
#: The command's defaults (`ClassOptions.defaults`): as class3d, with refinement's
#: regularisation (--tau2_fudge 1) and plain EM over the classes (--class_temperature 1).
DEFAULTS = ClassOptions.defaults(3, heterogeneous=True)
DESCRIPTION = f"""\
Refine K 3D classes at once (cryoSPARC's Heterogeneous Refinement; docs/method.md,
"Heterogeneous refinement"). The particles are split into two half-sets once (RELION's
rlnRandomSubset, kept when the input has it); each half is aligned and classified against its
own half's class maps only, so every class has two independent half maps whose FSC sets its
resolution and regularises it (tau2 from the FSC, as refine). Poses are searched per class, the
class membership is marginalised (--force_hard_class: each particle in its best class only),
and the sampling follows refinement's schedule (finer HEALPix orders down to local searches)
from the first iteration. Classes start from --ref: one map (each class a random perturbation
of it low-passed to --ini_high, and in the first iteration each particle stays in a random
class) or a STAR file listing K maps (rlnReferenceImage), e.g. an ab-initio run's classes.
Outputs in --o, RELION's layout: run_classNNN.mrc, run_half{{1,2}}_classNNN_unfil.mrc,
run_model.star (rlnClassDistribution, rlnGoldStandardFsc per class), run_data.star
(rlnClassNumber, rlnRandomSubset, the poses), per-iteration files and run.log. Each class feeds
refine directly: select it with cryomap star --classes, refine from its map (the half-sets
carry over).
Defaults: --K 4, --iter {DEFAULTS.iterations}, --tau2_fudge 1, --class_temperature 1.

example:
  cryomap hetero_refine --i particles.star --ref InitialModel/job001/classes.star \\
      --o HeteroRefine/job001 --K 3 --particle_diameter 250 --ini_high 30
  cryomap star --i HeteroRefine/job001/run_data.star --classes 2 --o class2.star
  cryomap refine --i class2.star --ref HeteroRefine/job001/run_class002.mrc \\
      --o Refine3D/job002 --particle_diameter 250 --ini_high 15
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_class_arguments(p, 3, DEFAULTS)
    p.add_argument("--force_hard_class", "--force-hard-class", dest="force_hard_class",
                   action="store_true",
                   help="hard class assignment in every iteration: each particle contributes "
                        "to its most probable class only (cryoSPARC's force hard "
                        "classification)")
    p.add_argument("--init_perturbation", "--init-perturbation", dest="perturbation",
                   type=float, default=DEFAULTS.perturbation,
                   help="random low-resolution perturbation of each initial class (from one "
                        "--ref map), in units of the low-passed reference's standard deviation")


def run(args: argparse.Namespace) -> int:
    """Run or continue the heterogeneous refinement (`class3d.run_classification`)."""
    return run_classification(args, 3, DEFAULTS)
