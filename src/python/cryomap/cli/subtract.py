"""`cryomap subtract`: signal subtraction from particle images (relion_particle_subtract)."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from ..errors import InputError

COMMAND = "subtract"
HELP = "subtract the signal outside a mask from particle images (like relion_particle_subtract)"
DESCRIPTION = """\
For every particle of --i (a refinement's run_data.star: rlnAngleRot/Tilt/Psi and
rlnOriginX/YAngst), subtract from its image the projection of the map --data times
(1 - --mask), at the particle's pose, origin and CTF (rlnCtfScalefactor and the optics
group's aberrations included), as refinement predicts it: what remains is the signal inside
the mask, plus the noise. The mask (on the map's grid, values in [0, 1]) marks what to KEEP;
an all-zero mask subtracts the whole map.
--recenter_on_mask (or --center_x/y/z, pixels from the map's centre) moves the mask's centre
of mass (the given point) to the centre of each image: the image is translated by whole
pixels and rlnOriginX/YAngst keep the sub-pixel rest, as RELION does. --new_box then crops
the images (centred). The map and every optics group must have the same box and pixel
size (0.001 A). Everything is checked before anything is written.
Writes <--o>/particles_subtracted.mrcs and <--o>/particles_subtracted.star: the input's rows
and columns, rlnImageName pointing into the new stack and rlnImageOriginalName the input's
image (docs/subtract.md).

example:
  cryomap subtract --i Refine3D/job010/run_data.star --data Refine3D/job010/run_class001.mrc \\
      --mask focus_mask.mrc --o Subtract/job011 --recenter_on_mask --new_box 128
"""

# the options of the 3D point to re-centre on (RELION's --center_x/y/z)
_CENTER_OPTIONS = ("center_x", "center_y", "center_z")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of `cryomap subtract` (relion_particle_subtract's spellings)."""
    p.add_argument("--i", required=True, metavar="STAR",
                   help="particles with their poses (a refinement's run_data.star)")
    p.add_argument("--data", required=True, metavar="MAP",
                   help="the map the poses refer to (MRC; e.g. the refinement's "
                        "run_class001.mrc)")
    p.add_argument("--mask", required=True, metavar="MASK",
                   help="mask of the density to keep (MRC, the map's grid, values in [0, 1])")
    p.add_argument("--o", required=True, metavar="DIR",
                   help="output folder (e.g. Subtract/job001)")
    p.add_argument("--recenter_on_mask", "--recenter-on-mask", action="store_true",
                   help="centre the subtracted particles on the projections of the mask's "
                        "centre of mass")
    for axis in ("x", "y", "z"):
        p.add_argument(f"--center_{axis}", f"--center-{axis}", type=float, default=None,
                       metavar="PX", help=f"{axis} (pixels from the map's centre) of the "
                                          f"3D point to centre the particles on (give all "
                                          f"three)")
    p.add_argument("--new_box", "--new-box", type=int, default=None, metavar="N",
                   help="crop the subtracted images to this even box (px), after re-centring")
    ctf = p.add_mutually_exclusive_group()
    ctf.add_argument("--ctf", dest="ctf", action="store_true", default=None,
                     help="apply each particle's CTF (default: when the input has "
                          "rlnDefocusU)")
    ctf.add_argument("--no_ctf", "--no-ctf", dest="ctf", action="store_false",
                     help="project without CTF")
    p.add_argument("--angpix", type=float, default=None, metavar="A",
                   help="pixel size of --data and --mask when their headers have none")


def _centre(args: argparse.Namespace, mask: np.ndarray) -> np.ndarray | None:
    """The 3D point (x, y, z) px to re-centre on, or None."""
    from ..subtract import mask_centre

    given = [getattr(args, k) for k in _CENTER_OPTIONS]
    if args.recenter_on_mask:
        if any(v is not None for v in given):
            raise InputError("--recenter_on_mask and --center_x/y/z: give one of them")
        return mask_centre(mask, args.mask)
    if all(v is None for v in given):
        return None
    if any(v is None for v in given):
        raise InputError("--center_x/y/z: give all three (pixels from the map's centre)")
    point = np.array(given, dtype=np.float64)
    if not np.all(np.isfinite(point)):
        raise InputError(f"--center_x/y/z {' '.join(f'{v:g}' for v in point)}: expected "
                         f"finite numbers (pixels from the map's centre)")
    return point


def _read_mask(path: str, angpix: float | None, pix: float) -> np.ndarray:
    """The mask; its pixel size (header, or the map's when the header has none) must be the
    map's within 0.001 A."""
    from ..io.mrc import read_header, read_map

    header_pix = read_header(path).pixel_size
    mask, mpix = read_map(path, angpix=angpix if angpix is not None or header_pix > 0
                          else pix)
    if abs(mpix - pix) > 1e-3:
        raise InputError(f"{path}: mask pixel size {mpix:g} A; expected the map's "
                         f"({pix:g} A, within 0.001 A)")
    return mask


def run(args: argparse.Namespace) -> int:
    """Check every input, then subtract and write the stack and its STAR file."""
    from ..io.atomic import check_output_dir, make_output_dir, remove_stale_temps
    from ..io.mrc import read_map
    from ..masks import check_mask
    from ..particles import load_particles
    from ..simulate import default_batch
    from ..subtract import (
        STACK_NAME,
        STAR_NAME,
        SubtractSettings,
        check_new_box,
        check_particles,
        subtract_particles,
    )
    from .options import check_run_memory

    out = Path(args.o)
    check_output_dir(out, "--o")
    for name in (STACK_NAME, STAR_NAME):
        if (out / name).is_dir():
            raise InputError(f"--o {out}: {out / name} is a folder; expected room for the "
                             f"output file")
    vol, pix = read_map(args.data, angpix=args.angpix)
    if vol.ndim != 3:
        raise InputError(f"{args.data}: a 2D image; expected a cubic 3D map")
    box = vol.shape[0]
    mask = _read_mask(args.mask, args.angpix, pix)
    check_mask(mask, vol.shape, args.mask, allow_empty=True)  # all zeros: subtract it all
    check_new_box(args.new_box, box)
    centre = _centre(args, mask)

    ps = load_particles(args.i)
    with ps:
        use_ctf = ps.has_ctf if args.ctf is None else bool(args.ctf)
        check_particles(ps, box, pix, args.data, use_ctf)
        stack = (out / STACK_NAME).resolve()
        if any(p is not None and p.resolve() == stack for p in ps.image_paths()):
            raise InputError(f"--o {out}: {stack} is the input's stack; expected another "
                             f"output folder")
        batch = default_batch(box)
        # the padded reference and its transform; one batch of images and projections
        check_run_memory({"map": 100 * box**3, "batch": 8 * batch * box * box * 8})
        made = _missing_dirs(out)
        make_output_dir(out, "--o")
        remove_stale_temps(out, STACK_NAME)
        remove_stale_temps(out, STAR_NAME)
        settings = SubtractSettings(centre=centre, new_box=args.new_box, use_ctf=use_ctf)
        try:
            stack, star = subtract_particles(ps, vol, mask, pix, out, settings, batch)
        except BaseException:
            for d in made:  # a bad image met while reading: leave nothing behind
                _remove_if_empty(d)
            raise
    where = "" if centre is None else (f", re-centred on ({centre[0]:.2f}, {centre[1]:.2f}, "
                                       f"{centre[2]:.2f}) px")
    print(f"wrote {stack} ({ps.n_particles} images, {args.new_box or box} px, ctf "
          f"{'on' if use_ctf else 'off'}{where})")
    print(f"wrote {star}")
    return 0


def _missing_dirs(folder: Path) -> list[Path]:
    """The folders that creating `folder` makes: it and its missing parents, deepest first."""
    out = []
    for d in (folder.absolute(), *folder.absolute().parents):
        if d.exists():
            break
        out.append(d)
    return out


def _remove_if_empty(folder: Path) -> None:
    try:
        folder.rmdir()
    except OSError:  # not empty (or gone): leave it
        pass
