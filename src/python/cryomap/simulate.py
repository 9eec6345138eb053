"""Simulated particle images: Fourier central-slice projection, CTF, shifts and noise.

Projection follows relion_project (docs/conventions.md, "Projection", "Shifts", "CTF"): the
image FT at pixel k is the
reference FT at A^T k (sum-projection scale), multiplied by the CTF, then the projection is
shifted by -origin, so the particle centre lies at pixel (floor(N/2) - ox, floor(N/2) - oy)
of the image (x = last axis, y = row). Frequencies with |k| > N/2 are zero, as in RELION's
projector. With image_origin="relion_project", odd-N images are written one pixel further
along +x and +y, exactly as relion_project writes them (fourier.project_image_origin).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import pandas as pd

from . import fourier
from .ctf import CtfParams, check_ctf_params, magnified_rotations
from .euler import euler_to_matrix, matrix_to_euler
from .imperfections import (
    JUNK_KINDS,
    Imperfections,
    amplitudes,
    apply_ctf,
    coloured_noise,
    draw_defocus,
    junk_images,
)
from .io.mrc import write_map, write_stack
from .particles import make_optics_table, write_particles
from .projector import Reference, prepare_reference, project, shift_images

PathLike = str | os.PathLike

#: Name of the image stack written by write_simulation (rlnImageName points into it).
STACK_NAME = "particles.mrcs"

# Bound on the complex values held per batch (~32 MB as complex64, plus FFT temporaries).
_BATCH_VALUES = 1 << 22


def default_batch(box: int) -> int:
    """Images projected per batch so that memory stays bounded (~100 MB) for any n."""
    return max(1, _BATCH_VALUES // (box * box))


def projection_pixels(box: int) -> tuple[np.ndarray, np.ndarray]:
    """Flat indices into the (box, box//2+1) half-plane and (kx, ky) float32 coords (J, 2) of
    every pixel projected: the whole half plane, DC included, inside |k| <= box/2 (RELION's
    r_max = ori_size/2). The kx = 0, ky < 0 pixels are projected too (they are the Friedel
    mates of ky > 0, which the Hermitian projector reproduces exactly)."""
    ky, kx = fourier.half_plane_freqs(box)
    keep = kx * kx + ky * ky <= (box / 2.0) ** 2
    flat = np.flatnonzero(keep)
    coords = np.stack([kx.ravel()[flat], ky.ravel()[flat]], axis=1).astype(np.float32)
    return flat, np.ascontiguousarray(coords)


def _ctf_subset(ctf: CtfParams, idx: slice | np.ndarray, n: int) -> CtfParams:
    """The CtfParams of images idx out of n (scalar fields broadcast)."""
    return ctf.subset(idx)


def _aberrations(n: int, beam_tilt, odd_zernike, even_zernike, mag_matrix) -> dict:
    """CtfParams aberration fields, one row per image (only those given)."""
    out: dict[str, np.ndarray] = {}
    for name, value, shape in (("beam_tilt", beam_tilt, (2,)), ("odd_zernike", odd_zernike, None),
                               ("even_zernike", even_zernike, None),
                               ("mag_matrix", mag_matrix, (2, 2))):
        if value is None:
            continue
        v = np.asarray(value, np.float64)
        if (shape is not None and v.shape != shape) or (shape is None and v.ndim != 1) \
                or not np.all(np.isfinite(v)):
            raise ValueError(f"{name}: expected finite values of shape "
                             f"{shape or '(K,)'}, got {v.shape}")
        out[name] = np.broadcast_to(v, (n,) + v.shape).copy()
    return out


def _optics_aberrations(optics: pd.DataFrame, aberrations: dict) -> None:
    """Write the aberrations into a one-group optics table, with RELION 3.1's labels."""
    def vector(v: np.ndarray) -> str:
        return "[" + ",".join(f"{x:.10g}" for x in v) + "]"

    if "beam_tilt" in aberrations:
        optics["rlnBeamTiltX"], optics["rlnBeamTiltY"] = aberrations["beam_tilt"][0]
    for name, label in (("odd_zernike", "rlnOddZernike"), ("even_zernike", "rlnEvenZernike")):
        if name in aberrations:
            optics[label] = vector(aberrations[name][0])
    if "mag_matrix" in aberrations:
        m = aberrations["mag_matrix"][0]
        for (i, j) in ((0, 0), (0, 1), (1, 0), (1, 1)):
            optics[f"rlnMagMat{i}{j}"] = m[i, j]


#: Where project_images puts the real-space origin of the images it writes.
IMAGE_ORIGINS = ("floor", "relion_project")


def project_images(volume: np.ndarray | Reference, angles_deg: np.ndarray,
                   origins_px: np.ndarray | None = None, ctf: CtfParams | None = None,
                   pixel_size: float | None = None, pad: int = 2, interp: str = "linear",
                   batch: int | None = None, image_origin: str = "floor") -> np.ndarray:
    """Projections of a map, as relion_project makes them: float32 (n, N, N).

    Parameters
    ----------
    volume : cubic map (N, N, N) (z, y, x), or a Reference from projector.prepare_reference.
    angles_deg : (n, 3) RELION (rot, tilt, psi) in degrees.
    origins_px : (n, 2) (rlnOriginX, rlnOriginY) in pixels (None = 0). The image is the
        projection shifted by -origin: the particle centre lands at (N/2 - ox, N/2 - oy).
    ctf : per-image CtfParams (length n) multiplying the projection's FT, or None. With
        aberrations the image is RELION's prediction (ObservationModel::predictObservation):
        CTF(M s) (even Zernike terms included) times exp(i phi_odd(M s)) (odd Zernike terms,
        beam tilt) times the projection sampled at A^T M k (docs/conventions.md,
        "Aberrations").
    pixel_size : A/px, needed with ctf.
    pad, interp : projector padding factor and interpolation ("linear" or "nearest").
    batch : images per batch (memory bound); default from default_batch.
    image_origin : "floor" (default): the map's centre voxel floor(N/2) projects to pixel
        floor(N/2), the origin cryomap reads particle images with; "relion_project": to
        pixel ceil(N/2), where relion_project puts it (differs for odd N only; see
        fourier.project_image_origin and docs/conventions.md, "Grids").

    Scale: with no CTF the image is the map's sum-projection along the viewing direction
    (P(x, y) = sum_z V(A^T (x, y, z)), docs/conventions.md "Projection"), band-limited to
    |k| <= N/2.
    """
    ref = volume if isinstance(volume, Reference) else prepare_reference(
        np.asarray(volume), pad=pad, interp=interp)
    if ref.ndim != 3:
        raise ValueError("project_images: expected a 3D map")
    n_box = ref.box
    angles = np.asarray(angles_deg, dtype=np.float64).reshape(-1, 3)
    n = angles.shape[0]
    if origins_px is None:
        origins = np.zeros((n, 2))
    else:
        origins = np.asarray(origins_px, dtype=np.float64).reshape(-1, 2)
        if origins.shape[0] != n:
            raise ValueError(f"origins_px: expected {n} rows, got {origins.shape[0]}")
    if image_origin not in IMAGE_ORIGINS:
        raise ValueError(f"image_origin: expected one of {IMAGE_ORIGINS}, got {image_origin!r}")
    if ctf is not None:
        if pixel_size is None or not pixel_size > 0:
            raise ValueError("project_images: a positive pixel_size is needed with a CTF")
        if len(ctf) not in (1, n):
            raise ValueError(f"ctf: expected {n} images, got {len(ctf)}")
        check_ctf_params(ctf, "project_images: CTF parameters")
    origin_index = (fourier.project_image_origin(n_box) if image_origin == "relion_project"
                    else fourier.origin(n_box))
    batch = default_batch(n_box) if batch is None else max(1, int(batch))

    flat, coords = projection_pixels(n_box)
    kx, ky = coords[:, 0].astype(np.float64), coords[:, 1].astype(np.float64)
    out = np.empty((n, n_box, n_box), dtype=np.float32)
    half = n_box * (n_box // 2 + 1)
    for start in range(0, n, batch):
        sl = slice(start, min(start + batch, n))
        b = sl.stop - sl.start
        rot = euler_to_matrix(angles[sl, 0], angles[sl, 1], angles[sl, 2])
        sub = None if ctf is None else (ctf if len(ctf) == 1 else _ctf_subset(ctf, sl, n))
        if sub is not None and sub.mag_matrix is not None:
            # anisotropic magnification: the map sampled at A^T M k
            mag = np.broadcast_to(np.asarray(sub.mag_matrix, np.float64).reshape(-1, 2, 2),
                                  (b, 2, 2))
            rot = magnified_rotations(rot, mag)
        slices = project(ref, rot, coords)
        if sub is not None:
            model = sub.evaluate(kx, ky, n_box, float(pixel_size))
            if sub.has_phase_aberrations:  # odd Zernike terms and beam tilt
                model = model * sub.phase_factor(kx, ky, n_box, float(pixel_size))
            slices = (slices * model).astype(np.complex64)
        # Observation = projection translated by -origin (RELION translates the image by
        # +origin to align it with the reference projection).
        if np.any(origins[sl]):
            slices = shift_images(slices, coords, -origins[sl], n_box)
        ft = np.zeros((b, half), dtype=np.complex128)
        ft[:, flat] = slices
        out[sl] = fourier.ifft2_at_origin(ft.reshape(b, n_box, n_box // 2 + 1), n_box,
                                          origin_index)
    return out


def random_rotations(n: int, rng: np.random.Generator) -> np.ndarray:
    """n rotation matrices uniform on SO(3) (normalised Gaussian quaternions), (n, 3, 3)."""
    q = rng.normal(size=(n, 4))
    q /= np.linalg.norm(q, axis=1, keepdims=True)
    w, x, y, z = q.T
    return np.stack([
        np.stack([1 - 2 * (y * y + z * z), 2 * (x * y - z * w), 2 * (x * z + y * w)], -1),
        np.stack([2 * (x * y + z * w), 1 - 2 * (x * x + z * z), 2 * (y * z - x * w)], -1),
        np.stack([2 * (x * z - y * w), 2 * (y * z + x * w), 1 - 2 * (x * x + y * y)], -1),
    ], axis=1)


def _as_volumes(volume: np.ndarray | Sequence[np.ndarray]) -> list[np.ndarray]:
    vols = [np.asarray(volume)] if np.ndim(volume) == 3 else [np.asarray(v) for v in volume]
    if not vols:
        raise ValueError("simulate_particles: expected at least one map")
    box = vols[0].shape[0]
    for v in vols:
        if v.ndim != 3 or any(s != box for s in v.shape):
            raise ValueError(f"simulate_particles: expected cubic maps of one box size, got "
                             f"shape {v.shape}")
    return vols


def simulate_particles(volume: np.ndarray | Sequence[np.ndarray], pixel_size: float, n: int,
                       snr: float | None = 0.1,
                       defocus_range: tuple[float, float] = (10000.0, 25000.0),
                       astigmatism: float = 500.0, max_shift_px: float = 3.0, seed: int = 0,
                       voltage: float = 300.0, cs: float = 2.7,
                       amplitude_contrast: float = 0.1, bfactor: float = 0.0,
                       ctf: bool = True, class_fractions: Sequence[float] | None = None,
                       pad: int = 2, interp: str = "linear", stack_name: str = STACK_NAME,
                       beam_tilt: Sequence[float] | None = None,
                       odd_zernike: Sequence[float] | None = None,
                       even_zernike: Sequence[float] | None = None,
                       mag_matrix: np.ndarray | None = None,
                       imperfections: Imperfections | None = None,
                       ) -> tuple[np.ndarray, pd.DataFrame, pd.DataFrame, pd.DataFrame]:
    """Simulate n particle images of a map (or of several maps, one per class).

    Draws, per image: a rotation uniform on SO(3), an origin uniform in the disc of radius
    max_shift_px, a mean defocus uniform in defocus_range (A, underfocus), an astigmatism
    U - V uniform in [0, astigmatism] A with a uniform angle in [0, 180) degrees, and (with
    several maps) a class with probabilities class_fractions (default equal). The image is
    project_images' CTF-modulated projection plus white Gaussian noise of variance
    signal_variance / snr, where signal_variance is the mean over the n clean (CTF-modulated)
    images of their pixel variance over the WHOLE box. snr=None (or inf) adds no noise.

    stack_name is the stack path written into rlnImageName. cryomap, like RELION, looks it up
    relative to the working folder and then (cryomap only) relative to the STAR file's folder,
    so for a RELION run from the parent folder use e.g. "sim/particles.mrcs".

    Aberrations (with ctf=True), the same for every image and written to the optics table as
    RELION 3.1 does: beam_tilt (x, y) mrad (rlnBeamTiltX/Y), odd_zernike and even_zernike
    coefficients in radians (rlnOddZernike, rlnEvenZernike; RELION's order, ctf.py) and the
    2x2 mag_matrix (rlnMagMat00/01/10/11); see project_images for the forward model.

    imperfections: what real data has (`imperfections.Imperfections`, docs/simulate.md):
    particles_df then carries what a user's STAR file would, truth_df the true CTF values
    (rlnCtfScalefactor the amplitude) and rlnClassNumber 0 for junk.

    Each quantity has its own random stream derived from seed, so snr=None with the same seed
    returns exactly the clean images of a noisy simulation.

    Returns (images float32 (n, N, N), optics_df, particles_df, truth_df):
    - optics_df: one optics group (RELION 3.1 optics table).
    - particles_df: rlnImageName (`000001@<stack_name>`), rlnMicrographName (one name for all:
      one micrograph group), CTF columns
      (rlnDefocusU/V/Angle, rlnCtfBfactor, rlnPhaseShift; omitted with ctf=False) and
      rlnOpticsGroup. Poses are unknowns and are not in it.
    - truth_df: particles_df plus rlnAngleRot/Tilt/Psi, rlnOriginXAngst/YAngst and
      rlnClassNumber (1-based).
    """
    vols = _as_volumes(volume)
    box = vols[0].shape[0]
    if n < 1:
        raise ValueError(f"n: expected >= 1 images, got {n}")
    if snr is not None and not snr > 0:
        raise ValueError(f"snr: expected > 0 (or None for no noise), got {snr}")
    lo, hi = (float(d) for d in defocus_range)
    if not 0 < lo <= hi:
        raise ValueError(f"defocus range: expected 0 < min <= max A, got {defocus_range}")
    k = len(vols)
    fr = np.full(k, 1.0 / k) if class_fractions is None else np.asarray(class_fractions, float)
    if fr.shape != (k,) or np.any(fr < 0) or not fr.sum() > 0:
        raise ValueError(f"class fractions: expected {k} non-negative values")

    imp = Imperfections() if imperfections is None else imperfections
    imp.validate()
    rng_pose, rng_shift, rng_ctf, rng_class, rng_noise, rng_amp, rng_junk = (
        np.random.default_rng(s) for s in np.random.SeedSequence(seed).spawn(7))
    rot, tilt, psi = matrix_to_euler(random_rotations(n, rng_pose))
    angles = np.stack([rot, tilt, psi], axis=1)
    r = max_shift_px * np.sqrt(rng_shift.uniform(size=n))  # uniform in the disc
    phi = rng_shift.uniform(0, 2 * np.pi, size=n)
    origins = np.stack([r * np.cos(phi), r * np.sin(phi)], axis=1)
    df = draw_defocus(n, (lo, hi), astigmatism, imp, rng_ctf)
    aberrations = _aberrations(n, beam_tilt, odd_zernike, even_zernike, mag_matrix)
    if aberrations and not ctf:
        raise ValueError("aberrations: expected ctf=True (they are part of the CTF model)")
    ctf_params = CtfParams(defocus_u=df.true_u, defocus_v=df.true_v, defocus_angle=df.angle,
                           voltage=voltage, cs=cs, amplitude_contrast=amplitude_contrast,
                           bfactor=bfactor + imp.signal_bfactor, **aberrations)
    check_ctf_params(ctf_params, "simulate_particles: CTF parameters")
    classes = rng_class.choice(k, size=n, p=fr / fr.sum()) if k > 1 else np.zeros(n, int)

    images = np.empty((n, box, box), dtype=np.float32)
    for c, vol in enumerate(vols):
        idx = np.flatnonzero(classes == c)
        if idx.size == 0:
            continue
        sub = _ctf_subset(ctf_params, idx, n) if ctf else None
        images[idx] = project_images(vol, angles[idx], origins[idx], sub, pixel_size,
                                     pad=pad, interp=interp)
    amplitude, signal_var = _amplitudes_and_junk(images, vols, classes,
                                                 ctf_params if ctf else None, pixel_size, imp,
                                                 (rng_amp, rng_junk), pad, interp)
    if snr is not None and np.isfinite(snr):
        _add_noise(images, np.sqrt(signal_var / snr), imp.noise_colour, rng_noise)

    optics_df = make_optics_table(pixel_size, box, voltage=voltage, cs=cs,
                                  amplitude_contrast=amplitude_contrast)
    _optics_aberrations(optics_df, aberrations)
    cols: dict[str, object] = {
        "rlnImageName": [f"{i + 1:06d}@{stack_name}" for i in range(n)],
        "rlnMicrographName": ([f"micrograph{m + 1:05d}.mrc" for m in df.micrograph]
                              if imp.n_micrographs else "simulated.mrc"),
    }
    if ctf:
        cols.update(rlnDefocusU=df.written_u, rlnDefocusV=df.written_v,
                    rlnDefocusAngle=df.written_angle,
                    rlnCtfBfactor=np.full(n, float(bfactor)), rlnPhaseShift=np.zeros(n))
    cols["rlnOpticsGroup"] = np.ones(n, dtype=np.int64)
    particles_df = pd.DataFrame(cols, index=pd.RangeIndex(n))
    truth_df = particles_df.copy()
    truth_df["rlnAngleRot"] = angles[:, 0]
    truth_df["rlnAngleTilt"] = angles[:, 1]
    truth_df["rlnAnglePsi"] = angles[:, 2]
    truth_df["rlnOriginXAngst"] = origins[:, 0] * pixel_size
    truth_df["rlnOriginYAngst"] = origins[:, 1] * pixel_size
    truth_df["rlnClassNumber"] = classes.astype(np.int64) + 1
    if ctf and imp.any:  # the true CTF where the written one differs
        truth_df["rlnDefocusU"], truth_df["rlnDefocusV"] = df.true_u, df.true_v
        truth_df["rlnDefocusAngle"] = df.angle
        truth_df["rlnCtfBfactor"] = ctf_params.bfactor
        truth_df["rlnCtfScalefactor"] = amplitude
    return images, optics_df, particles_df, truth_df


def _amplitudes_and_junk(images: np.ndarray, vols: list[np.ndarray], classes: np.ndarray,
                         ctf: CtfParams | None, pixel_size: float, imp: Imperfections,
                         rngs: tuple[np.random.Generator, np.random.Generator], pad: int,
                         interp: str) -> tuple[np.ndarray, float]:
    """Scale the clean images by their amplitudes and replace the junk picks (class -1), in
    place; returns the amplitudes and the particles' mean signal variance (junk left out),
    which sets the noise."""
    n = images.shape[0]
    amplitude = amplitudes(n, imp.amplitude_spread, rngs[0])
    if imp.amplitude_spread > 0:
        images *= amplitude[:, None, None].astype(np.float32)
    junk = rngs[1].random(n) < imp.junk_fraction
    good = ~junk if np.any(~junk) else np.ones(n, bool)
    signal_var = float(np.mean(np.var(images[good], axis=(1, 2), dtype=np.float64)))
    if np.any(junk):
        images[junk] = _junk(vols, np.flatnonzero(junk), ctf, pixel_size,
                             np.sqrt(signal_var), rngs[1], pad, interp)
        classes[junk] = -1
    return amplitude, signal_var


def _add_noise(images: np.ndarray, sigma: float, colour: float,
               rng: np.random.Generator) -> None:
    """Add Gaussian noise of standard deviation sigma (coloured: `imperfections.noise_filter`)
    in place, a bounded batch at a time."""
    n, box = images.shape[0], images.shape[-1]
    for start in range(0, n, default_batch(box)):
        sl = slice(start, min(start + default_batch(box), n))
        noise = coloured_noise(images[sl].shape, sigma, colour, rng)
        images[sl] = (images[sl] + noise).astype(np.float32)


def _junk(vols: list[np.ndarray], idx: np.ndarray, ctf: CtfParams | None, pixel_size: float,
          scale: float, rng: np.random.Generator, pad: int, interp: str) -> np.ndarray:
    """Junk images for the picks idx (`imperfections.JUNK_KINDS`) through their CTFs, each
    with a standard deviation of `scale` (the particles' signal) times a factor in
    [0.5, 2]."""
    box = vols[0].shape[0]
    kinds = rng.integers(0, len(JUNK_KINDS), size=idx.size)
    agg = np.flatnonzero(np.asarray(JUNK_KINDS)[kinds] == "aggregate")
    copies = np.zeros((idx.size, box, box))
    for i in agg:  # 3 to 6 copies of a particle, overlapping, at random poses
        k = int(rng.integers(3, 7))
        rot, tilt, psi = matrix_to_euler(random_rotations(k, rng))
        offsets = rng.uniform(-box / 6, box / 6, size=(k, 2))
        vol = vols[int(rng.integers(len(vols)))]
        copies[i] = project_images(vol, np.stack([rot, tilt, psi], 1), offsets,
                                   pad=pad, interp=interp).sum(axis=0)
    out = junk_images(kinds, box, copies, rng)
    if ctf is not None:  # imaged like the particles, then as strong as they are
        out = apply_ctf(out, ctf.subset(idx), pixel_size)
        sd = out.std(axis=(1, 2), keepdims=True)
        out = np.divide(out, sd, out=np.zeros_like(out), where=sd > 0)
    out *= scale * rng.uniform(0.5, 2.0, size=(idx.size, 1, 1))
    return out.astype(np.float32)


def write_simulation(outdir: PathLike, images: np.ndarray, optics_df: pd.DataFrame,
                     particles_df: pd.DataFrame, truth_df: pd.DataFrame, pixel_size: float,
                     truth_maps: np.ndarray | Sequence[np.ndarray] | None = None,
                     ) -> dict[str, Path]:
    """Write a simulation into outdir (created if needed): the image stack, particles.star
    (RELION 3.1 optics + particles tables), truth.star (the same plus true poses and classes)
    and, if given, the truth map(s): truth_map.mrc for one map, truth_map_classNNN.mrc for
    several. Every file is written atomically. Returns {label: path} of what was written.

    The stack is written as outdir/<file name of the stack in rlnImageName> (particles.mrcs
    by default); rlnImageName is written unchanged, so a name with a folder (see
    simulate_particles' stack_name) can point from another working folder to the stack.
    """
    stacks = particles_df["rlnImageName"].astype(str).str.partition("@")[2].unique()
    if len(stacks) != 1 or len(particles_df) != len(images):
        raise ValueError("write_simulation: expected one stack name in rlnImageName and one "
                         "row per image")
    out = Path(outdir)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    written["stack"] = out / Path(stacks[0]).name
    write_stack(written["stack"], images, pixel_size)
    written["particles"] = out / "particles.star"
    write_particles(written["particles"], optics_df, particles_df)
    written["truth"] = out / "truth.star"
    write_particles(written["truth"], optics_df, truth_df)
    if truth_maps is not None:
        maps = [truth_maps] if np.ndim(truth_maps) == 3 else list(truth_maps)
        for i, m in enumerate(maps):
            name = "truth_map.mrc" if len(maps) == 1 else f"truth_map_class{i + 1:03d}.mrc"
            written[name] = out / name
            write_map(written[name], m, pixel_size)
    return written
