"""`cryomap class2d`: 2D classification by EM, marginalising over class, in-plane angle and
shift (RELION's Class2D; option names as RELION's)."""

from __future__ import annotations

import argparse

from .class3d import add_class_arguments, run_classification

COMMAND = "class2d"
HELP = "2D classification (class averages) by EM with class marginalisation"
DESCRIPTION = """\
Sort particles into K 2D class averages by Bayesian MAP expectation-maximisation (RELION's
Class2D): posteriors over class x in-plane angle (--psi_step, default 10 degrees) x shift, one
average per class updated as V = D/(W + 1/tau2) with tau2 from the average's power, the class
distribution and noise spectra updated every iteration. Classes start as averages of random
subsets of the particles at random in-plane angles (--seed), unless --ref gives them (an image
for all classes, or a .mrcs stack with one image per class). See docs/method.md.
Outputs in --o, RELION's layout: run_itNNN_classes.mrcs (class k is k@file),
run_itNNN_model.star (rlnClassDistribution, rlnEstimatedResolution per class),
run_itNNN_data.star (rlnClassNumber, rlnAnglePsi, rlnOriginX/YAngst), and at the end
run_classes.mrcs, run_model.star, run_data.star, run_classes.png (the averages sorted by class
size) and run.log. Defaults as RELION's GUI: --K 50, --iter 25, --tau2_fudge 2.

example:
  cryomap class2d --i particles.star --o Class2D/job001 --K 50 --particle_diameter 250 \\
      --psi_step 10 --offset_range 5 --offset_step 1 --iter 25 --center_classes
  cryomap class2d --o Class2D/job001 --continue      # resume after the last finished iteration
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_class_arguments(p, 2)
    p.add_argument("--center_classes", "--center-classes", dest="center_classes",
                   action="store_true",
                   help="keep the averages centred: move each one's centre of mass to the box "
                        "centre every iteration")
    p.add_argument("--subset_size", "--subset-size", type=int, default=None,
                   help="particles averaged per initial class (default: all, split K ways)")


def run(args: argparse.Namespace) -> int:
    """Run or continue the classification (`class3d.run_classification`)."""
    return run_classification(args, 2)
