"""Figures against a known truth (simulations): orientation errors, the best possible
classification, map alignment. The FSC against the truth is `cryomap.resolution`'s."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import fourier
from ..euler import angular_distance, euler_to_matrix


def angular_errors(angles: np.ndarray, true_angles: np.ndarray, sym: str = "C1"
                   ) -> np.ndarray:
    """Rotation angle (degrees) between estimated and true poses, (n, 3) Euler each; with a
    point group, to the nearest of the true pose's equivalent poses (a pose refined with
    symmetry lies in one asymmetric unit; `symmetry.angular_distance`)."""
    a = euler_to_matrix(angles[:, 0], angles[:, 1], angles[:, 2])
    b = euler_to_matrix(true_angles[:, 0], true_angles[:, 1], true_angles[:, 2])
    if str(sym).upper() == "C1":
        return angular_distance(a, b)
    from ..symmetry import angular_distance as symmetric_distance

    return symmetric_distance(a, b, sym)


def bayes_accuracy(map_a: np.ndarray, map_b: np.ndarray, angles: np.ndarray,
                   origins_px: np.ndarray, ctf, pixel_size: float, noise_sigma: float
                   ) -> np.ndarray:
    """Per image, the best possible probability of telling two known maps apart from its
    image at its true pose (equal priors, white Gaussian noise of std. dev. noise_sigma per
    pixel): Phi(d / (2 sigma)), d = ||P_A - P_B|| of the two noiseless CTF-modulated
    projections. The mean over images is the Bayes-optimal classification accuracy."""
    from math import erf, sqrt

    from ..simulate import project_images

    pa = project_images(map_a, angles, origins_px, ctf, pixel_size)
    pb = project_images(map_b, angles, origins_px, ctf, pixel_size)
    d = np.sqrt(((pa.astype(np.float64) - pb) ** 2).sum(axis=(1, 2)))
    z = d / (2.0 * noise_sigma)
    return np.array([0.5 * (1.0 + erf(v / sqrt(2.0))) for v in z])


def two_class_set(out, box: int, pixel_size: float, n: int, share: float, snr: float,
                  seed: int, max_shift_px: float) -> tuple[np.ndarray, np.ndarray, float]:
    """Simulate a two-class set in folder `out` (`two_map_set`): class A a ribosome-sized
    phantom filling 0.8 of the box, class B the same with a compact piece holding `share` of
    its mass removed. Returns (true class (n,) 0/1, best possible accuracy per image
    (bayes_accuracy), particle diameter in Å)."""
    from ..phantom import RIBOSOME_SCALE, make_phantom

    diameter = 0.8 * box * pixel_size
    scale = RIBOSOME_SCALE * diameter / 256.0
    a = make_phantom(box, pixel_size, scale=scale)
    b = make_phantom(box, pixel_size, scale=scale, remove_share=share)
    truth, best = two_map_set(out, a, b, pixel_size, n, snr, seed, max_shift_px)
    return truth, best, diameter


def two_map_set(out, a: np.ndarray, b: np.ndarray, pixel_size: float, n: int, snr: float,
                seed: int, max_shift_px: float) -> tuple[np.ndarray, np.ndarray]:
    """Simulate particles of two maps, about half each, in folder `out` (`class_map_set`).
    Returns (true class (n,) 0/1, best possible accuracy per image (bayes_accuracy))."""
    return class_map_set(out, [a, b], pixel_size, n, snr, seed, max_shift_px)


def class_map_set(out, maps: list[np.ndarray], pixel_size: float, n: int, snr: float,
                  seed: int, max_shift_px: float) -> tuple[np.ndarray, np.ndarray]:
    """Simulate particles of K maps, about n/K each, in folder `out`
    (`simulate.write_simulation`'s files, and reference.mrc: the first map low-passed to
    40 Å). Returns (true class (n,) 0-based, best possible accuracy per image): for two maps
    the probability of `bayes_accuracy`; for more, whether the Bayes rule at the true poses
    (the nearest noiseless projection, white noise) classifies the image itself rightly,
    whose mean estimates the best possible accuracy without bias."""
    from ..ctf import CtfParams
    from ..fourier import initial_lowpass
    from ..io.mrc import write_map
    from ..simulate import project_images, simulate_particles, write_simulation

    sim = simulate_particles(maps, pixel_size, n, snr=snr, seed=seed,
                             max_shift_px=max_shift_px)
    clean = simulate_particles(maps, pixel_size, n, snr=None, seed=seed,
                               max_shift_px=max_shift_px)[0]
    sigma = float(np.sqrt(np.mean(np.var(clean, axis=(1, 2), dtype=np.float64)) / snr))
    write_simulation(out, *sim, pixel_size=pixel_size)
    write_map(out / "reference.mrc",
              initial_lowpass(maps[0].astype(np.float64), 40.0, pixel_size)
              .astype(np.float32), pixel_size)
    df = sim[3]
    angles = df[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy()
    origins = df[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy() / pixel_size
    ctf = CtfParams(defocus_u=df["rlnDefocusU"].to_numpy(),
                    defocus_v=df["rlnDefocusV"].to_numpy(),
                    defocus_angle=df["rlnDefocusAngle"].to_numpy())
    truth = df["rlnClassNumber"].to_numpy() - 1
    if len(maps) == 2:
        return truth, bayes_accuracy(maps[0], maps[1], angles, origins, ctf, pixel_size,
                                     sigma)
    images = sim[0].astype(np.float64)
    distance = np.stack([((images - project_images(m, angles, origins, ctf, pixel_size))
                          ** 2).sum(axis=(1, 2)) for m in maps], axis=1)
    return truth, (np.argmin(distance, axis=1) == truth).astype(np.float64)


# -- map alignment ---------------------------------------------------------------------------


@dataclass
class Alignment:
    """A map moved onto a reference: aligned(x) = moving'(R^T (x - t)), where moving' is the
    moving map or, when `mirrored`, its mirror image moving[::-1] (z flipped)."""

    aligned: np.ndarray  # (N, N, N) the moved map, full resolution
    rotation: np.ndarray  # (3, 3) R, acting on (x, y, z) about the centre floor(N/2)
    shift: np.ndarray  # (3,) t, (x, y, z) px
    correlation: float  # normalised correlation with the reference (up to the resolution)
    mirrored: bool


def _resample(volume: np.ndarray, n_new: int) -> np.ndarray:
    """A cube Fourier-cropped or zero-padded to n_new voxels a side (origin floor(n/2))."""
    n = volume.shape[0]
    m = min(n, n_new) // 2 - 1
    centred = fourier.to_centred(fourier.fft3_centered(np.asarray(volume, np.float64)), m)
    return fourier.ifft3_centered(fourier.from_centred(centred, n_new), n_new)


def _shifted(volume: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """The map moved by `shift` (x, y, z) px (Fourier phase)."""
    n = volume.shape[0]
    kz, ky, kx = fourier.half_volume_freqs(n)
    sx, sy, sz = (float(s) for s in shift)
    ft = fourier.fft3_centered(volume) * np.exp(-2j * np.pi * (kx * sx + ky * sy + kz * sz) / n)
    return fourier.ifft3_centered(ft, n)


def _centre_of_mass(volume: np.ndarray, pixel_size: float, resolution: float) -> np.ndarray:
    """(x, y, z) px of the centre of mass of the positive density of the low-passed map,
    relative to the centre floor(N/2)."""
    from .classify import center_of_mass_shift

    return center_of_mass_shift(fourier.lowpass_map(volume, resolution, pixel_size))


def _axis_rotation(axis: np.ndarray, degrees: float) -> np.ndarray:
    """Active rotation by `degrees` about `axis` (Rodrigues)."""
    k = np.asarray(axis, np.float64) / np.linalg.norm(axis)
    t = np.deg2rad(degrees)
    kx = np.array([[0.0, -k[2], k[1]], [k[2], 0.0, -k[0]], [-k[1], k[0], 0.0]])
    return np.eye(3) + np.sin(t) * kx + (1.0 - np.cos(t)) * kx @ kx


def _neighbourhood(step: float) -> np.ndarray:
    """The identity and rotations by +-step degrees about x, y, z and the products of two of
    them about different axes (19 rotations): a local search's candidates."""
    singles = [_axis_rotation(a, s) for a in np.eye(3) for s in (-step, step)]
    out = [np.eye(3)] + singles
    out += [singles[i] @ singles[j] for i in range(6) for j in range(i + 1, 6) if i // 2 != j // 2]
    return np.array(out)


def _section_rotations(n: int) -> np.ndarray:
    """n rotations whose viewing directions spread evenly over a hemisphere (Fibonacci
    lattice): central sections that sample a map's Fourier transform all round."""
    from ..euler import euler_to_matrix

    i = np.arange(n) + 0.5
    tilt = np.rad2deg(np.arccos(1.0 - i / n))  # z >= 0: a section and its opposite coincide
    rot = np.rad2deg(np.pi * (1.0 + 5**0.5) * i) % 360.0
    return euler_to_matrix(rot, tilt, np.zeros(n))


class _SectionScorer:
    """Correlation of a reference map with a moving one turned by R and moved by t, from
    central sections of the two (Fourier slice theorem): sum over sections s and pixels k of
    Re conj(Ref(Q_s^T k)) exp(-2 pi i k.(Q_s t)_xy / N) Mov(R^T Q_s^T k), normalised, up to
    the Fourier radius of `resolution`. Sections are projected by the engine's kernel."""

    def __init__(self, reference: np.ndarray, moving: np.ndarray, pixel_size: float,
                 resolution: float, n_sections: int) -> None:
        from .. import projector

        n = reference.shape[0]
        self.box = n
        radius = max(2, int(round(n * pixel_size / resolution)))
        mask = fourier.pixel_mask(n, min(radius, n // 2 - 1))
        keep = mask.shell >= 1  # the mean (shell 0) says nothing about the pose
        self.coords = np.ascontiguousarray(mask.coords[keep])
        self.sections = _section_rotations(n_sections)
        self.ref_pr = projector.prepare_reference(reference, 2, "linear", radius)
        self.mov_pr = projector.prepare_reference(moving, 2, "linear", radius)
        ref = projector.project(self.ref_pr, self.sections, self.coords).astype(np.complex128)
        self.ref_conj = np.conj(ref)  # (S, J)
        self.ref_norm = float(np.sqrt((np.abs(ref) ** 2).sum()))

    def __call__(self, rotations: np.ndarray, shifts: np.ndarray) -> np.ndarray:
        """(R, T) normalised correlations for rotations (R, 3, 3) and shifts (T, 3) px."""
        from .. import projector

        s, j = self.ref_conj.shape
        r = rotations.shape[0]
        # rows: rotation r, then section s (one matrix product for all)
        combined = np.einsum("sab,rbc->rsac", self.sections, rotations).reshape(-1, 3, 3)
        mov = projector.project(self.mov_pr, combined, self.coords).reshape(r, s * j)
        norm = np.sqrt(np.einsum("ij,ij->i", mov.real, mov.real, dtype=np.float64)
                       + np.einsum("ij,ij->i", mov.imag, mov.imag, dtype=np.float64))
        norm *= self.ref_norm
        # in-plane part of each shift seen by each section: (Q_s t)_xy
        inplane = np.einsum("sab,tb->sta", self.sections[:, :2, :], shifts)  # (S, T, 2)
        phase = np.exp(-2j * np.pi * np.einsum("ja,sta->sjt", self.coords.astype(np.float64),
                                                inplane) / self.box)  # (S, J, T)
        weights = (self.ref_conj[:, :, None] * phase).astype(np.complex64).reshape(s * j, -1)
        cc = (mov.astype(np.complex64) @ weights).real.astype(np.float64)  # (R, T)
        return cc / np.maximum(norm, 1e-300)[:, None]


def transform_map(volume: np.ndarray, rotation: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """The map turned by `rotation` about its centre floor(N/2) and then moved by `shift`
    (x, y, z) px: out(x) = V(R^T (x - t)). The rotation interpolates trilinearly on a grid
    upsampled twice in Fourier space (so it hardly blurs), the shift is a Fourier phase."""
    from ..symmetry import rotate_volume

    v = np.asarray(volume, np.float64)
    n = v.shape[0]
    if not np.allclose(rotation, np.eye(3)):
        v = _resample(rotate_volume(_resample(v, 2 * n), rotation), n)
    return _shifted(v, np.asarray(shift, np.float64))


def align_maps(moving: np.ndarray, reference: np.ndarray, pixel_size: float,
               resolution: float = 25.0, healpix_order: int = 2, mirror: bool = False,
               n_sections: int = 64, refine_steps: tuple[float, ...] = (4.0, 2.0, 1.0, 0.5)
               ) -> Alignment:
    """Move `moving` onto `reference` (same box and pixel size): the rotation and translation
    that maximise the correlation of the two maps up to `resolution` Å.

    Both maps' centres of mass (positive density, low-passed) are first brought to the box
    centre; then a global search over a HEALPix grid of rotations (`healpix_order`: 7.5
    degrees at 2) and hill-climbing on ever finer rotations (`refine_steps`, degrees) and
    translations (half a pixel down to 1/16), scored on `n_sections` central sections of the
    two maps' Fourier transforms (the engine's projector); the map itself is then moved at
    full resolution (`transform_map`). With mirror=True the mirror image moving[::-1] is
    aligned as well and the better of the two hands returned (projections do not determine
    handedness, so an ab-initio map may come out as either)."""
    from ..sampling import orientations_3d

    moving = np.asarray(moving, np.float64)
    reference = np.asarray(reference, np.float64)
    if moving.shape != reference.shape or moving.ndim != 3 or len(set(moving.shape)) != 1:
        raise ValueError(f"align_maps: expected two cubic maps of one box, got {moving.shape} "
                         f"and {reference.shape}")
    c_ref = _centre_of_mass(reference, pixel_size, resolution)
    ref_c = _shifted(reference, -c_ref)
    grid = orientations_3d(healpix_order).matrices
    zero = np.zeros((1, 3))
    best = None
    for mirrored in ([False, True] if mirror else [False]):
        vol = moving[::-1].copy() if mirrored else moving
        c_mov = _centre_of_mass(vol, pixel_size, resolution)
        score = _SectionScorer(ref_c, _shifted(vol, -c_mov), pixel_size, resolution,
                               n_sections)
        values = np.concatenate([score(grid[i:i + 512], zero)[:, 0]
                                 for i in range(0, grid.shape[0], 512)])
        i = int(np.argmax(values))
        rot, shift, value = grid[i], np.zeros(3), float(values[i])
        t_step = 1.0
        for step in refine_steps:  # hill-climb on ever finer neighbourhoods
            rots = _neighbourhood(step)
            offs = t_step * np.stack(np.meshgrid(*([np.arange(-1.0, 2.0)] * 3),
                                                 indexing="ij"), -1).reshape(-1, 3)
            for _ in range(20):
                cand_r = np.einsum("nab,bc->nac", rots, rot)
                cc = score(cand_r, shift + offs)
                a, b = np.unravel_index(int(np.argmax(cc)), cc.shape)
                if cc[a, b] <= value + 1e-12:
                    break
                rot, shift, value = cand_r[a], shift + offs[b], float(cc[a, b])
            t_step /= 2.0
        if best is None or value > best[0]:
            best = (value, rot, c_ref + shift - rot @ c_mov, mirrored)
    value, rot, shift, mirrored = best
    vol = moving[::-1].copy() if mirrored else moving
    return Alignment(transform_map(vol, rot, shift), rot, shift, float(value), bool(mirrored))
