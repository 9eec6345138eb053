"""Classification by EM with marginalisation over class and pose, shared by 2D and 3D.

The seed's EM (expectation over the hidden class k, pose φ and shift t of every image, then a
regularised map update per class) on the refinement's kernels: classes are just more "slices".
The K references' projections are concatenated along the orientation axis
(R = K × n_orientations) and log π_k enters as the orientation prior, so one E-step call gives
the posterior over (t, k, φ); class k's M-step sums are the k-th row block of the slice sums,
and its posterior mass per image is the sum of its block.

RELION practice for classification (CONVENTIONS §5, §6): no half-set split; τ²_k per shell is
the shell mean of |F_ref,k|²/2 of the reference as projected (computed when the projector is
built, so it regularises the M-step of the same iteration); SSNR_k = shell mean of
p^d·T·τ²_k·W_k, and the resolution of class k is the last shell with SSNR_k > 1; the next
Fourier radius follows the best class. 2D references are images rotated in-plane
(A = Euler(0, 0, ψ)), with p² in place of p³ (RELION's oversampling correction).

Options from the seed: `force_max` (maximise over poses and shifts within each class instead of
marginalising) and `hard_last` ("hard classify for last iteration": each image contributes only
to its most probable class in the last iteration).

What keeps the classes apart (measured on the tests' simulations, see tests/test_class*.py):
- RELION's seed generation: in the first iteration each image stays in one random class (an
  equal division), so every class starts from as many images as the others. A class with
  fewer images is shrunk more by its prior (and its τ², from its own shrunk map, shrinks too),
  so it fits every image worse and empties: winner takes all.
- RELION's --perturb: the orientation and translation grids are offset at random each
  iteration. On a fixed coarse grid two classes can differ by a fraction of the angular step
  and split the particles by orientation instead of by structure.
- RELION's --minres_map: shells below 5 get no prior term, which also limits the shrinkage.
- cryomap's re-seeding (`reseed_fraction`, 0 turns it off): in the first half of the
  iterations a class left with almost no images takes half of the largest class, seeded as in
  the first iteration.

This module also runs a classification job (inputs, iterations, outputs, --continue); the 2D and
3D drivers (`class2d`, `class3d`) supply the initial references and the map writers.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from .. import fourier, projector
from ..errors import InputError
from ..euler import euler_to_matrix, matrix_to_euler
from ..io.atomic import atomic_path
from ..masks import soft_sphere
from ..particles import ParticleSet
from ..sampling import (
    OrientationGrid,
    angular_step,
    orientations_2d,
    orientations_3d,
    translations,
)
from .data import ImageSource
from .estep import choose_batch_size, expectation
from .model import next_r_max, resolution_shell
from .mstep import padded_shells, regularised_ratio, shell_mean
from .output import (
    iteration_root,
    model_blocks,
    particle_table,
    write_data_star,
    write_model_star,
    write_text_atomic,
)
from .refine3d import RefineOptions, initial_noise, inv_sigma2, shift_log_prior, update_noise
from .refine_job import Log, image_source, last_iteration, open_output, require_ctf
from .sums import maximization_sums

# Floor of a class prior: a class that loses every image stays (nearly) empty rather than
# turning log π into -inf (the E-step kernel refuses images with every pose excluded).
MIN_CLASS_PRIOR = 1e-30
# Shells below this are reconstructed without the prior term (RELION's --minres_map default,
# backprojector.cpp: reconstruct "Only for (ires >= minres_map) add Wiener-filter like term")
MINRES_MAP = 5


@dataclass
class ClassOptions(RefineOptions):
    """Options of a classification: the refinement's (RELION's defaults) plus the classes."""

    n_classes: int = 2  # --K
    ndim: int = 3  # reference dimensionality: 3 (class3d) or 2 (class2d)
    hard_last: bool = False  # hard class assignment in the last iteration
    center_classes: bool = False  # 2D: move each average's centre of mass to the box centre
    perturbation: float = 0.5  # 3D: initial perturbation, in units of the reference's std
    subset_size: int | None = None  # 2D: images averaged per initial class (None: n/K)
    # a class below reseed_fraction/K of the images in the first half of the iterations is
    # re-seeded by splitting the largest class (0: never, as RELION)
    reseed_fraction: float = 0.1
    # Å: never use frequencies beyond this in the E-step (RELION's --strict_highres_exp);
    # None: the radius follows the resolution only
    highres_limit: float | None = None
    # random offset of the orientation and translation grids each iteration, in steps
    # (RELION's --perturb): classes cannot settle on different offsets of one fixed grid
    perturb: float = 0.5

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.ndim not in (2, 3):
            raise ValueError("ndim: expected 2 or 3")
        if self.n_classes < 1:
            raise ValueError(f"--K {self.n_classes}: expected at least 1 class")


@dataclass
class ClassIterationStats:
    """Figures logged per iteration."""

    iteration: int
    r_max: int
    resolution_shell: int  # best class
    resolution: float  # Å, best class (SSNR = 1)
    class_resolution: list  # Å per class
    distribution: list  # π_k after the iteration
    changed_fraction: float  # images whose best class changed
    log_likelihood: float
    average_pmax: float
    mean_n_significant: float
    hard: bool
    reseeded: list  # (empty class, split class) pairs, 0-based
    seconds: float
    timings: dict = field(default_factory=dict)


@dataclass
class ClassState:
    """Everything a classification iteration needs and produces."""

    options: ClassOptions
    references: np.ndarray  # (K, N, N) images or (K, N, N, N) maps, real space
    distribution: np.ndarray  # (K,) class prior π_k
    sigma2: np.ndarray  # (groups, N, N//2+1) noise variance per half-plane pixel
    r_max: int
    angles: np.ndarray  # (n, 3) best pose's Euler angles
    origins_px: np.ndarray  # (n, 2)
    class_number: np.ndarray  # (n,) 0-based most probable class
    class_prob: np.ndarray  # (n, K) posterior class probabilities (as used in the M-step)
    max_prob: np.ndarray  # (n,) largest normalised weight
    n_significant: np.ndarray
    log_likelihood: np.ndarray
    class_tau2: np.ndarray | None = None  # (K, N//2+1) τ² of the last M-step
    class_ssnr: np.ndarray | None = None  # (K, N//2+1)
    class_resolution_shell: np.ndarray | None = None  # (K,)
    # (n,) the class each image is restricted to in the next iteration (-1: free), or None
    assigned: np.ndarray | None = None
    iteration: int = 0
    history: list[ClassIterationStats] = field(default_factory=list)
    # single-map figures of refinement's model_blocks: none in classification
    fsc: None = None
    tau2: None = None

    @property
    def n_classes(self) -> int:
        return int(self.references.shape[0])


# -- class posterior algebra ---------------------------------------------------------------


def class_log_prior(distribution: np.ndarray, n_orientations: int) -> np.ndarray:
    """log π_k repeated over each class's orientation block: (K · n_orientations,)."""
    pi = np.maximum(np.asarray(distribution, np.float64), MIN_CLASS_PRIOR)
    return np.repeat(np.log(pi / pi.sum()), n_orientations)


def class_masses(weights: np.ndarray, n_classes: int) -> np.ndarray:
    """Posterior probability of each class per image, (B, K): the weights (B, T, K·R) summed
    over shifts and orientations of each class block."""
    b, t, r = weights.shape
    return weights.reshape(b, t, n_classes, r // n_classes).sum(axis=(1, 3), dtype=np.float64)


def adjust_weights(weights: np.ndarray, n_classes: int, force_max: bool = False,
                   hard: bool = False) -> np.ndarray:
    """The weights the M-step uses, (B, T, K·R) float32.

    hard: each image keeps only its most probable class (renormalised within it): maximising
    over class, marginalising over pose (the seed's "hard classify for last iteration").
    force_max: within each class, the class's whole mass sits on its best (shift, orientation):
    maximising over pose, marginalising over class (the seed's "force max over poses/shifts").
    Both: one weight 1 at the best pose of the best class.
    """
    if not (force_max or hard):
        return weights
    b, t, r = weights.shape
    n = r // n_classes
    w4 = weights.reshape(b, t, n_classes, n).astype(np.float32)
    masses = w4.sum(axis=(1, 3), dtype=np.float64)
    if hard:
        best = masses.argmax(axis=1)
        keep = np.zeros_like(masses)
        keep[np.arange(b), best] = 1.0 / np.maximum(masses[np.arange(b), best], 1e-300)
        w4 = w4 * keep[:, None, :, None].astype(np.float32)
        masses = (keep > 0).astype(np.float64)
    if force_max:
        per_class = w4.transpose(0, 2, 1, 3).reshape(b, n_classes, t * n)
        arg = per_class.argmax(axis=2)
        out = np.zeros_like(per_class)
        bi, ki = np.meshgrid(np.arange(b), np.arange(n_classes), indexing="ij")
        out[bi, ki, arg] = masses
        w4 = out.reshape(b, n_classes, t, n).transpose(0, 2, 1, 3)
    return np.ascontiguousarray(w4.reshape(b, t, r), dtype=np.float32)


def best_poses(weights: np.ndarray, n_classes: int
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per image: (class probabilities (B, K), most probable class (B,), best shift index and
    best orientation index (within the class) of that class, largest weight (B,))."""
    b, t, r = weights.shape
    n = r // n_classes
    w4 = weights.reshape(b, t, n_classes, n)
    masses = class_masses(weights, n_classes)
    masses /= np.maximum(masses.sum(axis=1, keepdims=True), 1e-300)  # float32 sums: exact 1
    k = masses.argmax(axis=1)
    within = w4[np.arange(b), :, k, :].reshape(b, t * n)  # (B, T·R) of the best class
    flat = within.argmax(axis=1)
    return masses, k, flat // n, flat % n, weights.reshape(b, -1).max(axis=1).astype(np.float64)


# -- per-class M-step ----------------------------------------------------------------------


def reference_tau2(reference: projector.Reference, n_shells: int) -> np.ndarray:
    """τ² per shell of a prepared reference: shell mean of |F|²/2 (RELION computes it with the
    projector, from the same padded, gridding-corrected FT, CONVENTIONS §6)."""
    shells = padded_shells(reference.data.shape, reference.pad)
    return shell_mean(np.abs(reference.data.astype(np.complex128)) ** 2 / 2.0, shells, n_shells)


def _prior_term(weight: np.ndarray, tau2: np.ndarray, shells: np.ndarray, pad: int,
                tau2_fudge: float, ndim: int) -> np.ndarray:
    """RELION's 1/τ² term per voxel of the padded grid: 1/(p^d·T·τ²), and where τ² = 0 (shells
    the reference had no power in, e.g. beyond last iteration's radius) 1/(0.001·W), so those
    shells are reconstructed almost unregularised and the resolution can grow
    [backprojector.cpp: reconstruct]."""
    t2 = tau2[np.minimum(shells, tau2.size - 1)]
    with np.errstate(divide="ignore"):
        return np.where(t2 > 0, 1.0 / (pad**ndim * tau2_fudge * np.where(t2 > 0, t2, 1.0)),
                        np.where(weight > 0, 1.0 / (0.001 * np.where(weight > 0, weight, 1.0)),
                                 0.0))


def reconstruct_class(data: np.ndarray, weight: np.ndarray, tau2: np.ndarray, pad: int,
                      tau2_fudge: float, interp: str, box: int, r_max: int, ndim: int
                      ) -> tuple[np.ndarray, np.ndarray]:
    """One class's map (seed eq. 14 with the class's τ²) and its SSNR per shell.

    data/weight: back-projected sums (centred padded half-volume, or (1, 2m+1, m+1) for 2D).
    Returns (real-space image/map (N,)*ndim, SSNR (N//2+1,)).
    """
    n_shells = box // 2 + 1
    shells = padded_shells(data.shape, pad)
    within = shells <= r_max
    prior = np.where(within, _prior_term(weight, tau2, shells, pad, tau2_fudge, ndim), 0.0)
    # regularised_ratio adds 1/(p³·T·τ²): pass the τ² that makes that term equal `prior`
    # (and a huge one, i.e. no prior term, below MINRES_MAP)
    applied = np.where(shells >= MINRES_MAP, prior, 0.0)
    with np.errstate(divide="ignore"):
        t2_voxel = np.where(applied > 0, 1.0 / (pad**3 * tau2_fudge
                                                * np.where(applied > 0, applied, 1.0)),
                            np.where(within, 1e30, 0.0))
    ft = regularised_ratio(data, weight, t2_voxel, pad, tau2_fudge, shells, n_shells)
    with np.errstate(divide="ignore", invalid="ignore"):
        evidence = np.where(prior > 0, weight / np.where(prior > 0, prior, 1.0), 0.0)
    ssnr = shell_mean(np.where(within, evidence, 0.0), np.where(within, shells, n_shells),
                      n_shells)
    ssnr[r_max + 1:] = 0.0
    image = projector.map_from_reference_ft(ft, box, pad, interp)
    return image * soft_sphere(box, box / 2.0 - 1.0, 1.0, ndim), ssnr


def center_of_mass_shift(image: np.ndarray) -> np.ndarray:
    """(x, y[, z]) position of the centre of mass of the positive density relative to the box
    centre floor(N/2), in px (zero for an image without positive density)."""
    pos = np.clip(image, 0.0, None)
    total = pos.sum()
    if not total > 0:
        return np.zeros(image.ndim)
    c = np.arange(image.shape[0]) - fourier.origin(image.shape[0])
    axes = range(image.ndim)
    com = [float((pos.sum(axis=tuple(a for a in axes if a != ax)) * c).sum() / total)
           for ax in axes]
    return np.array(com[::-1])  # arrays are (.., y, x): report x first


def center_image(image: np.ndarray) -> np.ndarray:
    """A 2D image translated (Fourier interpolation) so that its positive density's centre of
    mass is at the box centre (RELION's --center_classes)."""
    n = image.shape[0]
    sx, sy = center_of_mass_shift(image)
    ky, kx = fourier.half_plane_freqs(n)
    ft = fourier.fft2_centered(image) * np.exp(2j * np.pi * (kx * sx + ky * sy) / n)
    return fourier.ifft2_centered(ft, n)


# -- one iteration -------------------------------------------------------------------------


def orientation_grid(options: ClassOptions) -> OrientationGrid:
    """In-plane angles (2D, --psi_step, default 10°) or HEALPix × in-plane angles (3D)."""
    if options.ndim == 2:
        return orientations_2d(psi_step_2d(options))
    return orientations_3d(options.healpix_order, options.psi_step)


def psi_step_2d(options: ClassOptions) -> float:
    """--psi_step, 10° by default in 2D (RELION)."""
    return 10.0 if options.psi_step is None else float(options.psi_step)


def perturbed_sampling(options: ClassOptions, iteration: int
                       ) -> tuple[OrientationGrid, np.ndarray]:
    """This iteration's orientations and shifts (px): the grids offset by a random fraction
    (up to ±perturb) of their steps, the same for all images (RELION's
    resetRandomlyPerturbedSampling). 3D: every orientation A becomes A·Q, Q a rotation about a
    random axis (a rotation of the whole grid, which stays uniform); 2D: psi offset. Seeded by
    (seed, iteration), so a continued run samples as an uninterrupted one."""
    grid = orientation_grid(options)
    shifts = translations(options.offset_range, options.offset_step)
    f = options.perturb
    if f <= 0:
        return grid, shifts
    rng = np.random.default_rng([options.seed, iteration, 1])
    if options.ndim == 2:
        angles = grid.angles.copy()
        angles[:, 2] += f * psi_step_2d(options) * rng.uniform(-1.0, 1.0)
    else:
        step = angular_step(options.healpix_order)
        axis = rng.normal(size=3)
        q = rotation_about(axis / np.linalg.norm(axis), f * step * rng.uniform(-1.0, 1.0))
        angles = np.stack(matrix_to_euler(grid.matrices @ q), axis=1)
    if options.offset_range > 0:  # no search, no offset
        shifts = shifts + f * options.offset_step * rng.uniform(-1.0, 1.0, size=2)
    return OrientationGrid(angles, euler_to_matrix(angles[:, 0], angles[:, 1], angles[:, 2])
                           ), shifts


def rotation_about(axis: np.ndarray, degrees: float) -> np.ndarray:
    """Active right-handed rotation matrix about a unit axis (Rodrigues)."""
    k = np.array([[0.0, -axis[2], axis[1]], [axis[2], 0.0, -axis[0]], [-axis[1], axis[0], 0.0]])
    t = np.deg2rad(degrees)
    return np.eye(3) + np.sin(t) * k + (1.0 - np.cos(t)) * k @ k


def prepare_references(state: ClassState, source: ImageSource, mask: fourier.PixelMask
                       ) -> tuple[list[projector.Reference], np.ndarray]:
    """Each class's reference, masked by the particle mask, in the projector's layout, and its
    τ² per shell (K, N//2+1)."""
    o = state.options
    sphere = soft_sphere(source.box, source.mask_radius, source.mask_edge, o.ndim)
    refs, tau2 = [], []
    for ref in state.references:
        prepared = projector.prepare_reference(ref * sphere, o.pad, o.interp, mask.r_max)
        refs.append(prepared)
        tau2.append(reference_tau2(prepared, source.box // 2 + 1))
    return refs, np.array(tau2)


def _posterior(images: np.ndarray, ctf: np.ndarray, inv_s2: np.ndarray, slices: np.ndarray,
               shifts: np.ndarray, box: int, log_prior_rot: np.ndarray,
               log_prior_shift: np.ndarray, fraction: float, n_classes: int,
               assigned: np.ndarray | None, coords: np.ndarray
               ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(weights (B, T, K·R), n_significant, log_marginal) of a batch; with `assigned` (B,) an
    image with assigned class k >= 0 has a posterior over the poses of class k only (zero
    elsewhere), one with -1 over all classes."""
    if assigned is None or np.all(assigned < 0):
        post = expectation(images, ctf, inv_s2, slices, shifts, box, log_prior_rot,
                           log_prior_shift, fraction, coords=coords)
        return post.weights, post.n_significant, post.log_marginal
    b, n = images.shape[0], slices.shape[0] // n_classes
    weights = np.zeros((b, shifts.shape[0], slices.shape[0]), np.float32)
    n_sig, log_marginal = np.zeros(b, np.int64), np.zeros(b)
    for k in np.unique(assigned):
        sel = np.flatnonzero(assigned == k)
        block = slice(None) if k < 0 else slice(k * n, (k + 1) * n)
        post = expectation(images[sel], ctf[sel], inv_s2[sel], slices[block], shifts, box,
                           log_prior_rot[block], log_prior_shift[sel], fraction,
                           coords=coords)
        weights[sel, :, block] = post.weights
        n_sig[sel], log_marginal[sel] = post.n_significant, post.log_marginal
    return weights, n_sig, log_marginal


def expectation_maximisation_classes(
    state: ClassState, source: ImageSource, references: list[projector.Reference],
    grid: OrientationGrid, shifts: np.ndarray, mask: fourier.PixelMask, hard: bool = False,
    assigned: np.ndarray | None = None, progress: Callable[[int], None] | None = None,
) -> tuple[list[tuple[np.ndarray, np.ndarray]], np.ndarray, np.ndarray, np.ndarray, dict]:
    """E-step over (shift, class, orientation) and the M-step sums of every class, for all
    particles. Updates the per-particle fields of `state`. `assigned` (n,) restricts images to
    one class (>= 0) or leaves them free (-1), see `_posterior`.

    Returns ([(D_k, W_k)] back-projected per class, residual power per (group, bin), image
    count per group, summed class probabilities (K,), timings). With K = 1 this is
    refine3d.expectation_maximisation_half over all particles.
    """
    o = state.options
    k_cls, n_orient = len(references), len(grid)
    t0 = time.perf_counter()
    slices = np.concatenate([projector.project(r, grid.matrices, mask.coords)
                             for r in references])
    log_prior_rot = class_log_prior(state.distribution, n_orient)
    timings = {"project": time.perf_counter() - t0, "estep": 0.0, "sums": 0.0, "io": 0.0,
               "weights": 0.0}
    data_slices = np.zeros(slices.shape, np.complex64)
    weight_slices = np.zeros(slices.shape, np.float32)
    n_groups = state.sigma2.shape[0]
    per_pixel = o.noise_model == "pixel"
    n_bins = mask.n_pixels if per_pixel else mask.box // 2 + 1
    pixel_bin = (np.arange(mask.n_pixels) if per_pixel else mask.shell).astype(np.int64)
    resid = np.zeros((n_groups, n_bins))
    count = np.zeros(n_groups)
    mass = np.zeros(k_cls)
    n = source.particles.n_particles
    bsize = choose_batch_size(shifts.shape[0], slices.shape[0], o.batch_memory)
    sigma_px = None if o.offset_sigma is None else o.offset_sigma / source.pixel_size
    for start in range(0, n, bsize):
        idx = np.arange(start, min(start + bsize, n))
        t1 = time.perf_counter()
        batch = source.batch(idx, mask, state.origins_px)
        inv_s2 = inv_sigma2(state, batch, mask)
        t2 = time.perf_counter()
        raw, n_sig, log_marginal = _posterior(
            batch.images, batch.ctf, inv_s2, slices, shifts, source.box, log_prior_rot,
            shift_log_prior(state.origins_px[idx], shifts, sigma_px), o.significant_fraction,
            k_cls, None if assigned is None else assigned[idx], mask.coords)
        t3 = time.perf_counter()
        weights = adjust_weights(raw, k_cls, o.force_max, hard)
        probs, best_k, best_t, best_r, max_prob = best_poses(weights, k_cls)
        t4 = time.perf_counter()
        rp = maximization_sums(batch.images, batch.ctf, inv_s2, slices, shifts, source.box,
                               weights, pixel_bin, n_bins, data_slices, weight_slices,
                               coords=mask.coords)
        t5 = time.perf_counter()
        np.add.at(resid, batch.group, rp)
        np.add.at(count, batch.group, 1)
        mass += probs.sum(axis=0)
        state.class_prob[idx] = probs
        state.class_number[idx] = best_k
        state.angles[idx] = grid.angles[best_r]
        state.origins_px[idx] = np.rint(state.origins_px[idx]) + shifts[best_t]
        state.max_prob[idx] = max_prob
        state.n_significant[idx] = n_sig
        state.log_likelihood[idx] = log_marginal
        timings["io"] += t2 - t1
        timings["estep"] += t3 - t2
        timings["weights"] += t4 - t3
        timings["sums"] += t5 - t4
        if progress is not None:
            progress(idx.size)
    t6 = time.perf_counter()
    sums = []
    for k in range(k_cls):
        block = slice(k * n_orient, (k + 1) * n_orient)
        data, weight = projector.empty_sums(source.box, o.pad, mask.r_max, o.ndim)
        projector.backproject(data, weight, data_slices[block], weight_slices[block],
                              grid.matrices, mask.coords, o.pad, o.interp)
        sums.append((fourier.symmetrize_kx0_plane(data), fourier.symmetrize_kx0_plane(weight)))
    timings["backproject"] = time.perf_counter() - t6
    return sums, resid, count, mass, timings


def run_class_iteration(state: ClassState, source: ImageSource, hard: bool = False,
                        progress: Callable[[int], None] | None = None) -> ClassIterationStats:
    """One EM iteration over all particles and classes; updates `state` in place."""
    o = state.options
    t0 = time.perf_counter()
    box, pix = source.box, source.pixel_size
    mask = fourier.pixel_mask(box, state.r_max)
    grid, shifts = perturbed_sampling(o, state.iteration)
    previous = state.class_number.copy() if state.iteration > 0 else None
    refs, tau2 = prepare_references(state, source, mask)
    # RELION's seed generation: in the first iteration each image stays in a random class
    # (equal division), so that all classes start from equally many images; likewise the two
    # halves of a class split by reseed_empty_classes
    assigned, state.assigned = state.assigned, None
    sums, resid, count, mass, timings = expectation_maximisation_classes(
        state, source, refs, grid, shifts, mask, hard, assigned, progress)
    t1 = time.perf_counter()
    update_noise(state, resid, count, mask)
    state.distribution = mass / max(mass.sum(), 1e-300)
    n_shells = box // 2 + 1
    ssnr = np.zeros((state.n_classes, n_shells))
    for k, (data, weight) in enumerate(sums):
        image, ssnr[k] = reconstruct_class(data, weight, tau2[k], o.pad, o.tau2_fudge, o.interp,
                                           box, mask.r_max, o.ndim)
        if o.center_classes and o.ndim == 2:
            image = center_image(image)
        state.references[k] = image
    timings["reconstruct"] = time.perf_counter() - t1
    state.class_tau2, state.class_ssnr = tau2, ssnr
    shells = np.array([resolution_shell(s, 1.0) for s in ssnr])
    state.class_resolution_shell = shells
    best = int(shells.max())
    state.iteration += 1
    state.r_max = next_radius(best, box, pix, o)
    reseeded = [] if hard or state.iteration > o.iterations // 2 else reseed_empty_classes(
        state, np.random.default_rng([o.seed, state.iteration]))
    stats = ClassIterationStats(
        iteration=state.iteration, r_max=int(mask.r_max), resolution_shell=best,
        resolution=float(box * pix / best),
        class_resolution=[float(box * pix / s) for s in shells],
        distribution=[float(d) for d in state.distribution],
        changed_fraction=float(np.mean(previous != state.class_number))
        if previous is not None else 1.0,
        log_likelihood=float(state.log_likelihood.sum()),
        average_pmax=float(state.max_prob.mean()),
        mean_n_significant=float(state.n_significant.mean()), hard=bool(hard),
        reseeded=reseeded,
        seconds=time.perf_counter() - t0, timings=timings)
    state.history.append(stats)
    return stats


def reseed_empty_classes(state: ClassState, rng: np.random.Generator) -> list[tuple[int, int]]:
    """Give every class holding less than reseed_fraction/K of the images half of the largest
    remaining class: it takes that class's reference, and each image of the class is restricted
    to one of the two (random halves) in the next iteration, as in the first. Without this a
    class that loses its images early stays empty for good: the more images a class has, the
    less its average is shrunk by the prior, and the better it fits every image. Returns the
    (re-seeded, split) class pairs."""
    o, k_cls = state.options, state.n_classes
    if k_cls < 2 or o.reseed_fraction <= 0:
        return []
    empty = [int(k) for k in np.argsort(state.distribution)
             if state.distribution[k] < o.reseed_fraction / k_cls]
    assigned = np.full(state.class_number.size, -1, np.int64)
    dist = state.distribution.copy()
    used = set(empty)
    pairs = []
    for k in empty:
        candidates = [c for c in np.argsort(-dist) if c not in used]
        if not candidates:
            break
        big = int(candidates[0])
        members = rng.permutation(np.flatnonzero(state.class_number == big))
        if members.size < 2:
            break
        assigned[members[: members.size // 2]] = k
        assigned[members[members.size // 2:]] = big
        state.references[k] = state.references[big]
        dist[k] = dist[big] = dist[big] / 2.0
        used.add(big)
        pairs.append((k, big))
    if pairs:
        state.distribution = dist / dist.sum()
        state.assigned = assigned
    return pairs


# -- state, inputs, job --------------------------------------------------------------------


def next_radius(resolution_shell_index: int, box: int, pixel_size: float,
                options: ClassOptions) -> int:
    """The next iteration's Fourier radius: RELION's rule (model.next_r_max) below N/2 - 1 and
    below --strict_highres_exp."""
    r = min(next_r_max(resolution_shell_index, box, options.incr_size), box // 2 - 1)
    if options.highres_limit is not None:
        r = min(r, max(1, int(box * pixel_size / options.highres_limit)))
    return r


def initial_r_max(box: int, pixel_size: float, options: ClassOptions) -> int:
    """First iteration's radius from --ini_high, as refinement (refine3d.initial_state)."""
    return next_radius(int(np.ceil(box * pixel_size / options.ini_high)), box, pixel_size,
                       options)


def equal_split(n: int, n_classes: int, rng: np.random.Generator) -> np.ndarray:
    """A random class per image, (n,) 0-based, the classes equally large (±1): RELION's
    divide_equally over a random order."""
    return (np.arange(n) * n_classes // n)[rng.permutation(n)]


def initial_state(particles: ParticleSet, references: np.ndarray, sigma2: np.ndarray,
                  options: ClassOptions, seed_class: np.ndarray | None = None) -> ClassState:
    """Uniform class prior, the given references, poses from the input file; `seed_class`
    (n,) is each image's class in the first iteration (None: marginalised from the start)."""
    n, k = particles.n_particles, references.shape[0]
    return ClassState(
        assigned=None if seed_class is None or k == 1 else np.asarray(seed_class, np.int64),
        options=options, references=np.asarray(references, np.float64),
        distribution=np.full(k, 1.0 / k), sigma2=sigma2,
        r_max=initial_r_max(particles.box, particles.pixel_size, options),
        angles=particles.angles(), origins_px=particles.origins_px(),
        class_number=np.zeros(n, np.int64), class_prob=np.full((n, k), 1.0 / k),
        max_prob=np.zeros(n), n_significant=np.zeros(n, np.int64), log_likelihood=np.zeros(n))


def check_classes(n_classes: int, particles: ParticleSet, star: str | Path) -> None:
    """1 <= K <= number of particles."""
    if n_classes < 1:
        raise InputError(f"--K {n_classes}: expected at least 1 class")
    if n_classes > particles.n_particles:
        raise InputError(f"--K {n_classes}: more classes than the {particles.n_particles} "
                         f"particles in {star}")


_ARRAYS = ("references", "distribution", "sigma2", "angles", "origins_px", "class_number",
           "class_prob", "max_prob", "n_significant", "log_likelihood", "class_tau2",
           "class_ssnr", "class_resolution_shell", "assigned")


def save_state(path: Path, state: ClassState) -> None:
    """The exact state after an iteration (for --continue), atomically."""
    arrays = {name: getattr(state, name) for name in _ARRAYS}
    arrays["scalars"] = np.array([state.r_max, state.iteration])
    arrays["history"] = np.array(json.dumps([asdict(h) for h in state.history]))
    with atomic_path(path, suffix=".npz") as tmp:
        with open(tmp, "wb") as f:
            np.savez(f, **{k: v for k, v in arrays.items() if v is not None})


def load_state(path: Path, options: ClassOptions) -> ClassState:
    """A state written by save_state."""
    z = np.load(path)
    values = {name: z[name] for name in _ARRAYS if name in z}
    state = ClassState(options=options, r_max=int(z["scalars"][0]),
                       iteration=int(z["scalars"][1]), **values)
    state.history = [ClassIterationStats(**d) for d in json.loads(str(z["history"]))]
    return state


def saved_job(outdir: str | Path) -> tuple[str, str | None, ClassOptions]:
    """(particles STAR, reference or None, options) of the classification in outdir."""
    path = Path(outdir) / "job.json"
    if not path.exists():
        raise InputError(f"{path}: no classification to continue here (job.json missing)")
    job = json.loads(path.read_text())
    if "class" not in job.get("kind", ""):
        raise InputError(f"{path}: the run in {outdir} is not a classification")
    return job["i"], job["ref"], ClassOptions(**job["options"])


def class_model_blocks(state: ClassState, box: int, pixel_size: float,
                       class_names: list[str]) -> dict:
    """`<root>_model.star` blocks: refinement's layout (output.model_blocks) with the figures
    of each class (distribution, SSNR, τ², resolution) and the reference dimensionality."""
    blocks = model_blocks(state, box, pixel_size, class_names, state.distribution)
    blocks["model_general"]["rlnReferenceDimensionality"] = state.options.ndim
    if state.class_ssnr is None:
        return blocks
    res = fourier.resolution_angstrom(state.class_resolution_shell, box, pixel_size)
    blocks["model_classes"]["rlnEstimatedResolution"] = res
    for k in range(state.n_classes):
        table = blocks[f"model_class_{k + 1}"]
        table["rlnSsnrMap"] = state.class_ssnr[k]
        table["rlnReferenceTau2"] = state.class_tau2[k]
    return blocks


def write_tables(root: Path, state: ClassState, particles: ParticleSet, class_names: list[str]
                 ) -> None:
    """`<root>_model.star` and `<root>_data.star` (rlnClassNumber 1-based, CONVENTIONS §8)."""
    box, pix = particles.box, particles.pixel_size
    write_model_star(Path(f"{root}_model.star"), class_model_blocks(state, box, pix,
                                                                    class_names))
    table = particle_table(particles, state, pix, state.class_number + 1)
    if state.options.ndim == 2:  # 2D poses are in-plane only: keep any input rot/tilt
        for col in ("rlnAngleRot", "rlnAngleTilt"):
            if col in particles.particles.columns:
                table[col] = particles.particles[col].to_numpy()
            else:
                table = table.drop(columns=col)
    write_data_star(Path(f"{root}_data.star"), particles, table)


#: write_maps(root, state, pixel_size) -> class names for rlnReferenceImage
MapWriter = Callable[[Path, ClassState, float], list[str]]
#: initialise(source, sigma2, seed_class, rng) -> ((K, N, N[, N]) initial references, the
#: first iteration's class per image or None); seed_class is a random equal division
Initialiser = Callable[[ImageSource, np.ndarray, np.ndarray, np.random.Generator],
                       tuple[np.ndarray, np.ndarray | None]]


def run_classification(particles: ParticleSet, star: str | Path, reference: str | Path | None,
                       outdir: str | Path, options: ClassOptions, initialise: Initialiser,
                       write_maps: MapWriter, resume: bool = False,
                       echo: Callable[[str], None] | None = print,
                       finish: Callable[[Path, ClassState, ParticleSet], None] | None = None,
                       ) -> ClassState:
    """Run (or continue) a classification job and write its outputs in RELION's layout.

    Per iteration: maps by `write_maps(root, ...)`, `run_itNNN_model.star`, `run_itNNN_data.star`
    and `run_itNNN_state.npz` (for --continue); at the end the same under `run_` (and whatever
    `finish` adds). The last iteration is hard when options.hard_last.
    """
    outdir = open_output(outdir, resume)
    kind = "class2d" if options.ndim == 2 else "class3d"
    log = Log(outdir / "run.log", echo)
    check_classes(options.n_classes, particles, star)
    require_ctf(particles, star, options)
    box, pix = particles.box, particles.pixel_size
    source, t_io = image_source(particles, options)
    last = last_iteration(outdir) if resume else None
    if last is not None:
        state = load_state(outdir / f"run_it{last:03d}_state.npz", options)
        log(f"continuing from iteration {last} in {outdir}")
    else:
        rng = np.random.default_rng(options.seed)
        sigma2 = initial_noise(source, options.noise_model)
        seed_class = equal_split(particles.n_particles, options.n_classes, rng)
        references, seed_class = initialise(source, sigma2, seed_class, rng)
        state = initial_state(particles, references, sigma2, options, seed_class)
        write_text_atomic(outdir / "job.json", json.dumps(
            {"kind": kind, "i": str(Path(star).resolve()),
             "ref": None if reference is None else str(Path(reference).resolve()),
             "options": asdict(options)}, indent=1))
        log(f"cryomap {kind}: {particles.n_particles} particles, box {box}, {pix:.3f} Å/px, "
            f"K = {options.n_classes}, {len(orientation_grid(options))} orientations per "
            f"class, {len(translations(options.offset_range, options.offset_step))} shifts, "
            f"options {json.dumps(asdict(options))}")
    log(f"images read and transformed in {t_io:.1f} s")
    while state.iteration < options.iterations:
        hard = options.hard_last and state.iteration + 1 == options.iterations
        stats = run_class_iteration(state, source, hard)
        root = iteration_root(outdir, state.iteration)
        write_tables(root, state, particles, write_maps(root, state, pix))
        save_state(Path(f"{root}_state.npz"), state)
        t = stats.timings
        dist = " ".join(f"{d:.3f}" for d in stats.distribution)
        split = "".join(f", class {k + 1} re-seeded from class {b + 1}"
                        for k, b in stats.reseeded)
        log(f"iteration {stats.iteration:3d}{' (hard)' if hard else ''}: r_max {stats.r_max:3d} "
            f"px, best class {stats.resolution:.1f} Å (SSNR 1), classes [{dist}]{split}, changed "
            f"{100 * stats.changed_fraction:.1f}%, log-lik {stats.log_likelihood:.6e}, <Pmax> "
            f"{stats.average_pmax:.3f}, <nsig> {stats.mean_n_significant:.1f}, "
            f"{stats.seconds:.1f} s (E-step {t.get('estep', 0):.1f}, sums "
            f"{t.get('sums', 0):.1f}, weights {t.get('weights', 0):.1f}, project "
            f"{t.get('project', 0):.1f}, back-project {t.get('backproject', 0):.1f}, "
            f"reconstruct {t.get('reconstruct', 0):.1f}, batches {t.get('io', 0):.1f})")
    root = iteration_root(outdir, None)
    write_tables(root, state, particles, write_maps(root, state, pix))
    if finish is not None:
        finish(outdir, state, particles)
    sizes = np.bincount(state.class_number, minlength=state.n_classes)
    log(f"final classes (particles): {' '.join(str(int(s)) for s in sizes)}; outputs in "
        f"{outdir}")
    particles.close()
    return state
