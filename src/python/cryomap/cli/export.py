"""`cryomap export`: a RELION particle file written as a cryoSPARC particle file (.cs)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import InputError

COMMAND = "export"
HELP = "write RELION particles (STAR) as a cryoSPARC particle file (.cs)"
DESCRIPTION = """\
Write the particles of --i (a RELION particle STAR file, e.g. a refinement's or a
classification's run_data.star) as a cryoSPARC particle file --o (.cs), which cryoSPARC and
cryosparc-tools (Dataset.load) read, and which cryomap reads back as the same particles.

Written: the image references (blob/path, blob/idx: rlnImageName), box and pixel size, the
CTF (ctf/*: defocus, astigmatism angle, phase shift, scale, B-factor, voltage, Cs, Q0, the
optics group as exposure group), the pose and shift (alignments3D/*, or alignments2D/* when
the file has rlnAnglePsi alone), the half set (split), the class and rlnMaxValueProbDistribution
(class_posterior), and rlnMicrographName (location/micrograph_path). Conventions and the
labels left out: docs/conventions.md, "cryoSPARC files". Image paths are written as the STAR
file gives them (relative to the RELION project folder); no image is copied.

example:
  cryomap export --i Refine3D/job010/run_data.star --o Export/job011/particles.cs
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--i", required=True, help="particles (RELION STAR file)")
    p.add_argument("--o", required=True, help="output cryoSPARC particle file (.cs)")


def run(args: argparse.Namespace) -> int:
    from ..io.atomic import check_output_dir
    from ..io.cryosparc_export import CS_SUFFIX, export_cryosparc

    star, out = Path(args.i), Path(args.o)
    if out.suffix.lower() != CS_SUFFIX:
        raise InputError(f"--o {out}: expected a file name ending in {CS_SUFFIX} (a "
                         f"cryoSPARC particle file)")
    if star.suffix.lower() == CS_SUFFIX:
        raise InputError(f"--i {star}: a cryoSPARC file; expected a RELION particle STAR "
                         f"file")
    if out.is_dir():
        raise InputError(f"--o {out}: is a folder; expected a file name")
    check_output_dir(out.parent, "--o")  # created once the particles are checked
    records = export_cryosparc(star, out)
    print(f"wrote {len(records)} particles ({len(records.dtype.names)} fields) to {out}")
    return 0
