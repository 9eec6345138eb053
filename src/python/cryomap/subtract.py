"""Signal subtraction from particle images, as RELION's relion_particle_subtract
(particle_subtractor.cpp: subtractOneParticle); docs/subtract.md.

Each particle image X_i becomes X_i - P_i(V (1 - m)): the projection of the map V times the
complement of the mask m (the signal OUTSIDE the mask), at the particle's pose, CTF and
origin, computed by `simulate.project_images` (the forward model refinement fits,
docs/conventions.md "Projection", "Shifts", "CTF"), so what remains is the masked region's
signal plus the noise. Images are read, subtracted and written one batch at a time.

Re-centring (RELION's do_center): a 3D point c (pixels from the map's centre floor(N/2), x
first; e.g. the mask's centre of mass) lands in image i at (floor(N/2) - o_i) + (B_i c)_xy,
B_i the matrix whose transpose samples the map (`ctf.magnified_rotations`; the Euler matrix
A_i without a magnification matrix). The residual r_i = o_i - (B_i c)_xy is split into a
whole-pixel part t_i = round(r_i) (halves up, RELION's ROUND), by which the image is
translated (cyclically, no interpolation), and the sub-pixel rest r_i - t_i (|.| <= 0.5 px),
written as the new rlnOriginX/YAngst: the point c is then the particle's centre.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd

from . import fourier
from .ctf import magnified_rotations
from .errors import InputError
from .euler import euler_to_matrix
from .io.atomic import atomic_path
from .particles import ParticleSet, output_stack_name, write_particles
from .projector import prepare_reference
from .simulate import default_batch, project_images

PathLike = str | os.PathLike
Log = Callable[[str], None] | None

#: Names of the outputs in the --o folder (relion_particle_subtract's STAR name).
STACK_NAME = "particles_subtracted.mrcs"
STAR_NAME = "particles_subtracted.star"
#: Pose labels every particle needs (origins default to 0 when absent).
POSE_LABELS = ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")
#: Particle labels dropped after re-centring (RELION deactivates them: the priors refer to
#: the old centre).
ORIGIN_PRIORS = ("rlnOriginXPriorAngst", "rlnOriginYPriorAngst")
# Two pixel sizes are the same within 0.001 A (RELION's and particles.py's rule).
_PIX_TOL = 1e-3


@dataclass(frozen=True)
class SubtractSettings:
    """What `subtract_particles` does besides subtracting.

    centre: (x, y, z) pixels from the map's centre to re-centre on (None: no re-centring).
    new_box: crop the written images to this box, centred (None: keep the box).
    use_ctf: multiply the projections by each particle's CTF (with its aberrations).
    pad, interp: the projector's padding factor and interpolation (refinement's defaults).
    """

    centre: np.ndarray | None = None
    new_box: int | None = None
    use_ctf: bool = True
    pad: int = 2
    interp: str = "linear"


# -- checks ---------------------------------------------------------------------------------


def check_particles(ps: ParticleSet, box: int, pixel_size: float, map_name: str,
                    use_ctf: bool) -> None:
    """InputError unless every optics group has the map's box and pixel size, every particle
    has a pose, the CTF is there when asked for, and every stack exists with that box."""
    from .io.mrc import read_header

    where = str(ps.star_path)
    for g, (b, p) in enumerate(zip(ps.boxes, ps.pixel_sizes, strict=True)):
        if b != box:
            raise InputError(f"{where}: data_optics row {g + 1} rlnImageSize = {b}; expected "
                             f"the box of {map_name} ({box} px)")
        if abs(p - pixel_size) > _PIX_TOL:
            raise InputError(f"{where}: data_optics row {g + 1} rlnImagePixelSize = {p:g} A; "
                             f"expected the pixel size of {map_name} ({pixel_size:g} A, within "
                             f"0.001 A)")
    missing = [c for c in POSE_LABELS if c not in ps.particles.columns]
    if missing:
        raise InputError(f"{where}: data_particles has no {', '.join(missing)}; expected the "
                         f"poses of a refinement (rlnAngleRot/Tilt/Psi, rlnOriginX/YAngst)")
    if use_ctf and not ps.has_ctf:
        raise InputError(f"--ctf: {where}: data_particles has no rlnDefocusU column; "
                         f"expected CTF parameters (rlnDefocusU/V, rlnDefocusAngle), or "
                         f"--no_ctf")
    if use_ctf:
        ps.ctf_params()  # checks every CTF value (InputError naming row and field)
    paths = ps.image_paths()
    for row, path in enumerate(paths):
        if path is None:
            name = ps.particles["rlnImageName"].iloc[row]
            raise InputError(f"{where}: particle {row + 1} (rlnImageName {name}): stack not "
                             f"found (looked in {', '.join(map(str, ps.search_dirs))})")
    for path in dict.fromkeys(paths):
        h = read_header(path)
        if (h.nx, h.ny) != (box, box):
            raise InputError(f"{where}: stack {path} has {h.nx} x {h.ny} px images; expected "
                             f"rlnImageSize = {box}")


def check_new_box(new_box: int | None, box: int) -> None:
    """--new_box: an even box of 2 .. the particles' box (RELION writes even boxes)."""
    if new_box is None:
        return
    if not (2 <= new_box <= box) or new_box % 2:
        raise InputError(f"--new_box {new_box}: expected an even box of 2..{box} px (the "
                         f"particles' box)")


# -- the pieces -------------------------------------------------------------------------------


def mask_centre(mask: np.ndarray, name: str) -> np.ndarray:
    """Centre of mass (x, y, z) of a mask in pixels from the box centre floor(N/2) (RELION's
    centerOfMass on a setXmippOrigin'd mask); InputError for a mask that sums to 0."""
    m = np.asarray(mask, dtype=np.float64)
    total = m.sum()
    if not total > 0:
        raise InputError(f"{name}: the mask is empty (sums to {total:g}); expected a mask "
                         f"with some value > 0 to re-centre on")
    idx = np.arange(m.shape[0], dtype=np.float64) - fourier.origin(m.shape[0])
    z = np.einsum("zyx,z->", m, idx) / total
    y = np.einsum("zyx,y->", m, idx) / total
    x = np.einsum("zyx,x->", m, idx) / total
    return np.array([x, y, z])


def projected_points(angles_deg: np.ndarray, point: np.ndarray,
                     mag_matrix: np.ndarray | None = None) -> np.ndarray:
    """(n, 2) image position (x, y), from the projection's centre, of the 3D point (x, y, z)
    px: (B point)_xy, B = magnified_rotations(A, M), since the image samples the map at
    B^T k (simulate.project_images)."""
    a = np.asarray(angles_deg, dtype=np.float64).reshape(-1, 3)
    rot = euler_to_matrix(a[:, 0], a[:, 1], a[:, 2])
    if mag_matrix is not None:
        rot = magnified_rotations(rot, np.asarray(mag_matrix, np.float64).reshape(-1, 2, 2))
    return (rot @ np.asarray(point, dtype=np.float64))[:, :2]


def recentre_offsets(origins_px: np.ndarray, projected: np.ndarray
                     ) -> tuple[np.ndarray, np.ndarray]:
    """(whole-pixel translation t (n, 2) int, new origins (n, 2) px) for images whose centre
    moves to the projected point: r = origin - projected, t = round(r) (halves up), new
    origin r - t (RELION: my_residual_offset, selfROUND, selfTranslate)."""
    r = np.asarray(origins_px, np.float64) - np.asarray(projected, np.float64)
    t = np.floor(r + 0.5)
    return t.astype(np.int64), r - t


def translate_images(images: np.ndarray, shifts: np.ndarray) -> np.ndarray:
    """Images (n, N, N) translated cyclically by whole pixels shifts (n, 2) (x, y):
    out[y, x] = in[y - ty, x - tx] (RELION's selfTranslate with WRAP)."""
    out = np.empty_like(images)
    for i, (tx, ty) in enumerate(np.asarray(shifts, np.int64)):
        out[i] = np.roll(images[i], (int(ty), int(tx)), axis=(0, 1))
    return out


def crop_images(images: np.ndarray, box: int) -> np.ndarray:
    """The centred box x box window of images (n, N, N): the centre floor(N/2) goes to
    floor(box/2) (RELION's window(FIRST_XMIPP_INDEX, LAST_XMIPP_INDEX))."""
    n = images.shape[-1]
    start = fourier.origin(n) - fourier.origin(box)
    return images[:, start:start + box, start:start + box]


def subtract_batch(images: np.ndarray, reference, angles_deg: np.ndarray,
                   origins_px: np.ndarray, ctf, pixel_size: float) -> np.ndarray:
    """images - their predicted signal: project_images of the (prepared) reference at the
    poses, origins and CTFs (None: no CTF), images read with the origin at floor(N/2)."""
    pred = project_images(reference, angles_deg, origins_px, ctf, pixel_size,
                          batch=len(images))
    return (np.asarray(images, np.float64) - pred).astype(np.float32)


# -- the run ----------------------------------------------------------------------------------


@contextmanager
def _stack_writer(path: Path, n: int, box: int, pixel_size: float) -> Iterator[np.ndarray]:
    """A float32 (n, box, box) array memory-mapped onto a new MRC stack, filled by the
    caller batch by batch and moved onto `path` only when the block ends without error.
    The header is the one io.mrc.write_stack writes (mode 2, image stack, voxel size,
    origin 0)."""
    with atomic_path(path) as tmp:
        with mrcfile.new_mmap(str(tmp), shape=(n, box, box), mrc_mode=2,
                              overwrite=True) as mrc:
            mrc.set_image_stack()
            mrc.voxel_size = float(pixel_size)
            mrc.header.origin = (0.0, 0.0, 0.0)
            yield mrc.data


def output_tables(ps: ParticleSet, stack: Path, new_origins_px: np.ndarray | None,
                  pixel_size: float, new_box: int | None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(optics, particles) of the output STAR file: every input column kept,
    rlnImageOriginalName = the input image, rlnImageName into `stack`; re-centred origins
    (Å) replace rlnOriginX/YAngst and the origin priors are dropped; rlnImageSize = new_box."""
    optics = ps.optics.copy()
    rows = ps.particles.copy()
    rows["rlnImageOriginalName"] = ps.output_image_names()
    name = output_stack_name(stack)
    rows["rlnImageName"] = [f"{i + 1:06d}@{name}" for i in range(len(rows))]
    if new_origins_px is not None:
        rows["rlnOriginXAngst"] = new_origins_px[:, 0] * pixel_size
        rows["rlnOriginYAngst"] = new_origins_px[:, 1] * pixel_size
        rows = rows.drop(columns=[c for c in ORIGIN_PRIORS if c in rows.columns])
    if new_box is not None:
        optics["rlnImageSize"] = int(new_box)
    return optics, rows


def subtract_particles(ps: ParticleSet, volume: np.ndarray, mask: np.ndarray,
                       pixel_size: float, out_dir: PathLike,
                       settings: SubtractSettings = SubtractSettings(),
                       batch: int | None = None, log: Log = print) -> tuple[Path, Path]:
    """Subtract the projections of volume x (1 - mask) from the particles' images and write
    out_dir/particles_subtracted.mrcs and .star (atomically; out_dir must exist). The
    particles and map must have passed `check_particles` / `masks.check_mask` (allow_empty).
    Returns (stack path, STAR path)."""
    out_dir = Path(out_dir)
    stack, star = out_dir / STACK_NAME, out_dir / STAR_NAME
    box = int(volume.shape[0])
    out_box = box if settings.new_box is None else int(settings.new_box)
    outside = np.asarray(volume, np.float64) * (1.0 - np.asarray(mask, np.float64))
    ref = prepare_reference(outside, pad=settings.pad, interp=settings.interp)
    batch = default_batch(box) if batch is None else max(1, int(batch))
    n = ps.n_particles
    new_origins = np.zeros((n, 2)) if settings.centre is not None else None
    with _stack_writer(stack, n, out_box, pixel_size) as out:
        for idx in ps.batches(batch):
            angles = ps.angles(idx)
            origins = ps.origins_px(idx)
            ctf = ps.ctf_params(idx) if settings.use_ctf else None
            imgs = subtract_batch(ps.read_images(idx), ref, angles, origins, ctf, pixel_size)
            if settings.centre is not None:
                mag = None if ctf is None else ctf.mag_matrix
                shifts, new_origins[idx] = recentre_offsets(
                    origins, projected_points(angles, settings.centre, mag))
                imgs = translate_images(imgs, shifts)
            out[idx] = crop_images(imgs, out_box)
            if log is not None and (idx[-1] + 1 == n or (idx[0] // batch) % 20 == 19):
                log(f"subtracted {idx[-1] + 1} of {n} particles")
    write_particles(star, *output_tables(ps, stack, new_origins, pixel_size,
                                         settings.new_box))
    return stack, star
