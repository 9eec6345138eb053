"""`cryomap symmetry_expand`: one copy of each particle per symmetry operator (RELION's
relion_particle_symmetry_expand)."""

from __future__ import annotations

import argparse
from pathlib import Path

COMMAND = "symmetry_expand"
HELP = "one copy of each particle per operator of a point group (as " \
       "relion_particle_symmetry_expand)"
DESCRIPTION = """\
Write every particle of --i once per operator R of the point group --sym, with the pose A·R
(A: the particle's Euler matrix), as relion_particle_symmetry_expand does: the copies of a
symmetric map's particle project identically, so the expanded set reconstructed without
symmetry gives the map the original set gives with --sym, and each copy can then be
classified or refined locally on its own asymmetric unit (e.g. with a mask on one subunit).
The copies of a particle follow each other, the first being the row as it was; only
rlnAngleRot/Tilt/Psi change, every other column (rlnImageName, origins, rlnRandomSubset, priors,
unknown labels) is copied. Keep rlnRandomSubset in the input: copies of one image in both half
sets would make the half-set FSC too optimistic. See docs/particles.md.

example:
  cryomap symmetry_expand --i Refine3D/job020/run_data.star --o expanded.star --sym D2
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--i", required=True, metavar="STAR",
                   help="particles with poses (RELION 3.1+ STAR), e.g. a refinement's "
                        "run_data.star")
    p.add_argument("--o", required=True, metavar="STAR", help="output particle file (STAR)")
    p.add_argument("--sym", required=True,
                   help="point group (RELION's names: C<n>, D<n>, T, O, I, I1..I4)")


def run(args: argparse.Namespace) -> int:
    from ..io.atomic import make_output_dir
    from ..starops import check_output, expand_symmetry, read_tables, write_all
    from ..symmetry import point_group

    group = point_group(args.sym, "--sym")
    src, out = Path(args.i), Path(args.o)
    check_output(out, [src])
    tables = read_tables(src)
    expanded = expand_symmetry(tables.particles, group.name, str(src))
    if "rlnRandomSubset" not in expanded.columns:
        print(f"note: {src} has no rlnRandomSubset: a later refinement may put copies of one "
              f"image in both half sets (docs/particles.md)")
    make_output_dir(out.parent, "--o")
    write_all([(out, tables.with_particles(expanded))])
    print(f"{len(tables.particles)} particles x {group.order} operators of {group.name} = "
          f"{len(expanded)} rows; wrote {out}")
    return 0
