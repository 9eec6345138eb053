"""3D auto-refinement by MAP-EM with gold-standard half-sets (seed eqs. 14-17, RELION practice).

Each iteration, for each half-set independently: project the half's reference at every
orientation, compute posteriors over (translation, orientation) for every particle (E-step,
seed eq. 17), accumulate the weighted slice sums, back-project them once, and update the map
(seed eq. 14), the noise spectra (eq. 15) and the prior spectra (eq. 16, from the half-map FSC
by default). The next iteration's Fourier radius follows the resolution (RELION's rule).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from .. import fourier, projector
from ..masks import soft_sphere
from ..particles import ParticleSet
from ..sampling import OrientationGrid, orientations_3d, translations
from .data import Batch, ImageSource
from .estep import Posterior, choose_batch_size, expectation
from .model import (
    fsc,
    initial_sigma2,
    next_r_max,
    resolution_shell,
    ssnr_from_fsc,
    tau2_from_fsc,
)
from .mstep import padded_shells, regularised_ratio, shell_mean, tau2_per_voxel
from .mstep import unregularised_average as unreg
from .sums import maximization_sums


@dataclass
class RefineOptions:
    """Options of a refinement (RELION's defaults where RELION has one)."""

    iterations: int = 10
    healpix_order: int = 2
    psi_step: float | None = None  # degrees; default = angular step of the order
    offset_range: float = 6.0  # px
    offset_step: float = 2.0  # px
    offset_sigma: float | None = None  # Å; None = flat prior over the search range
    ini_high: float = 40.0  # Å
    particle_diameter: float | None = None  # Å; default (N - 5)·pix
    mask_edge: float = 5.0  # px
    tau2_fudge: float = 1.0
    pad: int = 2
    interp: str = "linear"
    force_max: bool = False
    significant_fraction: float = 0.999
    noise_model: str = "shell"  # "shell" (RELION) or "pixel" (seed eq. 15 per pixel)
    prior_model: str = "fsc"  # "fsc" (RELION) or "voxel" (seed eq. 16 per voxel)
    incr_size: int = 10
    use_ctf: bool = True
    seed: int = 0
    batch_memory: int = 256 << 20

    def __post_init__(self) -> None:
        if self.noise_model not in ("shell", "pixel"):
            raise ValueError("noise model: expected 'shell' or 'pixel'")
        if self.prior_model not in ("fsc", "voxel"):
            raise ValueError("prior model: expected 'fsc' or 'voxel'")
        if self.pad not in (1, 2):
            raise ValueError("pad: expected 1 or 2")
        if self.interp not in projector.INTERP:
            raise ValueError(f"interp: expected one of {sorted(projector.INTERP)}")


@dataclass
class HalfState:
    """Per half-set state carried between iterations."""

    volume: np.ndarray  # real-space map (N, N, N)
    data: np.ndarray | None = None  # back-projected D (centred padded half-volume)
    weight: np.ndarray | None = None  # back-projected W
    volume_ft: np.ndarray | None = None  # regularised FT (for the voxel prior model)


@dataclass
class IterationStats:
    """Figures logged per iteration."""

    iteration: int
    r_max: int
    resolution_shell: int
    resolution: float  # Å, FSC 0.143
    resolution_05: float  # Å, FSC 0.5
    log_likelihood: float
    log_prior: float
    objective: float
    average_pmax: float
    mean_n_significant: float
    seconds: float
    timings: dict = field(default_factory=dict)


@dataclass
class RefineState:
    """Everything a refinement iteration needs and produces."""

    options: RefineOptions
    half: list[HalfState]
    sigma2: np.ndarray  # (groups, N, N//2+1) noise variance per half-plane pixel
    r_max: int
    subset: np.ndarray  # (n,) 1 or 2
    angles: np.ndarray  # (n, 3) current best Euler angles
    origins_px: np.ndarray  # (n, 2) current origins (px)
    max_prob: np.ndarray
    n_significant: np.ndarray
    log_likelihood: np.ndarray
    fsc: np.ndarray | None = None
    tau2: np.ndarray | None = None  # per shell, N-grid units
    iteration: int = 0
    history: list[IterationStats] = field(default_factory=list)


def lowpass(volume: np.ndarray, pixel_size: float, resolution: float,
            width_shells: float = 2.0) -> np.ndarray:
    """Low-pass a map to `resolution` Å with a raised-cosine edge of `width_shells`."""
    n = volume.shape[0]
    ft = fourier.fft3_centered(volume)
    kz, ky, kx = fourier.half_volume_freqs(n)
    r = np.sqrt(kx * kx + ky * ky + kz * kz)
    cut = n * pixel_size / resolution
    t = np.clip((r - cut) / width_shells + 0.5, 0, 1)
    return fourier.ifft3_centered(ft * (0.5 + 0.5 * np.cos(np.pi * t)), n)


def split_halves(particles: ParticleSet, rng: np.random.Generator) -> np.ndarray:
    """rlnRandomSubset if present for every particle, else a random equal split (§10)."""
    df = particles.particles
    if "rlnRandomSubset" in df.columns:
        s = df["rlnRandomSubset"].to_numpy().astype(int)
        if np.all(np.isin(s, (1, 2))):
            return s
    n = particles.n_particles
    s = np.ones(n, int)
    s[rng.permutation(n)[: n // 2]] = 2
    return s


def initial_noise(source: ImageSource, noise_model: str = "shell") -> np.ndarray:
    """σ² (groups, N, N//2+1) from the images' power spectra (RELION's initial estimate, §5),
    averaged over shells (noise_model 'shell') or kept per pixel ('pixel')."""
    box = source.box
    n_groups = int(source.groups.max()) + 1
    power, total, count = source.power_statistics(n_groups)
    shells2 = fourier.shell_index_2d(box)
    n_shells = box // 2 + 1
    sigma2 = np.empty((n_groups, box, box // 2 + 1))
    for g in range(n_groups):
        mean = total[g] / max(count[g], 1)
        if noise_model == "shell":
            s = initial_sigma2(power[g], mean, int(count[g]), shells2, n_shells)
            sigma2[g] = s[np.minimum(shells2, n_shells - 1)]
        else:
            sigma2[g] = (power[g] / max(count[g], 1) - np.abs(mean) ** 2) / 2.0
    return np.maximum(sigma2, 1e-12 * max(sigma2.max(), 1e-30))


def initial_state(particles: ParticleSet, reference: np.ndarray, source: ImageSource,
                  options: RefineOptions) -> RefineState:
    """Low-passed reference in both halves, σ² from the images' power, random half-sets."""
    rng = np.random.default_rng(options.seed)
    n, box, pix = particles.n_particles, particles.box, particles.pixel_size
    ref = lowpass(reference.astype(np.float64), pix, options.ini_high)
    r0 = int(np.ceil(box * pix / options.ini_high))
    return RefineState(
        options=options,
        half=[HalfState(ref.copy()), HalfState(ref.copy())],
        sigma2=initial_noise(source, options.noise_model),
        r_max=min(next_r_max(r0, box, options.incr_size), box // 2 - 1),
        subset=split_halves(particles, rng),
        angles=particles.angles(),
        origins_px=particles.origins_px(),
        max_prob=np.zeros(n),
        n_significant=np.zeros(n, int),
        log_likelihood=np.zeros(n),
    )


def shift_log_prior(origins: np.ndarray, shifts: np.ndarray, sigma_px: float | None
                     ) -> np.ndarray:
    """log prior of each sampled total origin round(o_i) + t: Gaussian around 0 (§7)."""
    if sigma_px is None:
        return np.zeros((origins.shape[0], shifts.shape[0]))
    total = np.rint(origins)[:, None, :] + shifts[None, :, :]
    return -(total**2).sum(-1) / (2.0 * sigma_px**2)


def inv_sigma2(state: RefineState, batch: Batch, mask: fourier.PixelMask) -> np.ndarray:
    """1/σ² (B, J) float32 of a batch's images at the mask's pixels, from their optics groups'
    noise spectra; a pixel with no noise estimate (σ² <= 0) gets 0, i.e. is left out."""
    nx = mask.box // 2 + 1
    s2 = state.sigma2[batch.group][:, mask.flat_index // nx, mask.flat_index % nx]
    return np.where(s2 > 0, 1.0 / np.where(s2 > 0, s2, 1.0), 0.0).astype(np.float32)


def _force_max(post: Posterior) -> np.ndarray:
    w = np.zeros_like(post.weights)
    w[np.arange(w.shape[0]), post.best_t, post.best_r] = 1.0
    return w


def expectation_maximisation_half(
    state: RefineState, source: ImageSource, h: int, grid: OrientationGrid,
    shifts: np.ndarray, mask: fourier.PixelMask,
    progress: Callable[[int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray, dict]:
    """E-step and M-step sums for half-set h (0 or 1) with its masked current map as the
    reference. Returns the residual power per (group, shell-or-pixel), the image count per
    group, and timings."""
    o = state.options
    reference = projector.prepare_reference(
        state.half[h].volume * soft_sphere(source.box, source.mask_radius, source.mask_edge, 3),
        o.pad, o.interp, mask.r_max)
    return accumulate_half(state, source, h, reference, grid, shifts, mask, progress)


def accumulate_half(
    state: RefineState, source: ImageSource, h: int, reference: projector.Reference,
    grid: OrientationGrid, shifts: np.ndarray, mask: fourier.PixelMask,
    progress: Callable[[int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray, dict]:
    """Posteriors (seed eq. 17) of half-set h's particles against a Fourier reference, the
    weighted slice sums back-projected into state.half[h].data/weight (numerator and
    denominator of seed eq. 14), and the expected residual power of seed eq. 15."""
    o = state.options
    t0 = time.perf_counter()
    slices = projector.project(reference, grid.matrices, mask.coords)
    timings = {"project": time.perf_counter() - t0, "estep": 0.0, "sums": 0.0, "io": 0.0}
    data_slices = np.zeros(slices.shape, np.complex64)
    weight_slices = np.zeros(slices.shape, np.float32)
    n_groups = state.sigma2.shape[0]
    per_pixel = o.noise_model == "pixel"
    n_bins = mask.n_pixels if per_pixel else mask.box // 2 + 1
    pixel_bin = (np.arange(mask.n_pixels) if per_pixel else mask.shell).astype(np.int64)
    resid = np.zeros((n_groups, n_bins))
    count = np.zeros(n_groups)
    members = np.nonzero(state.subset == h + 1)[0]
    bsize = choose_batch_size(shifts.shape[0], len(grid), o.batch_memory)
    sigma_px = None if o.offset_sigma is None else o.offset_sigma / source.pixel_size
    for start in range(0, members.size, bsize):
        idx = members[start:start + bsize]
        t1 = time.perf_counter()
        batch = source.batch(idx, mask, state.origins_px)
        inv_s2 = inv_sigma2(state, batch, mask)
        t2 = time.perf_counter()
        post = expectation(batch.images, batch.ctf, inv_s2, slices, shifts, source.box,
                           None, shift_log_prior(state.origins_px[idx], shifts, sigma_px),
                           o.significant_fraction, coords=mask.coords)
        t3 = time.perf_counter()
        weights = _force_max(post) if o.force_max else post.weights
        rp = maximization_sums(batch.images, batch.ctf, inv_s2, slices, shifts, source.box,
                               weights, pixel_bin, n_bins, data_slices, weight_slices,
                               coords=mask.coords)
        t4 = time.perf_counter()
        np.add.at(resid, batch.group, rp)
        np.add.at(count, batch.group, 1)
        state.angles[idx] = grid.angles[post.best_r]
        state.origins_px[idx] = np.rint(state.origins_px[idx]) + shifts[post.best_t]
        state.max_prob[idx] = post.max_prob
        state.n_significant[idx] = post.n_significant
        state.log_likelihood[idx] = post.log_marginal
        timings["io"] += t2 - t1
        timings["estep"] += t3 - t2
        timings["sums"] += t4 - t3
        if progress is not None:
            progress(idx.size)
    t5 = time.perf_counter()
    data = np.zeros(reference.data.shape, np.complex64)
    weight = np.zeros(reference.data.shape, np.float32)
    projector.backproject(data, weight, data_slices, weight_slices, grid.matrices, mask.coords,
                          o.pad, o.interp)
    state.half[h].data = fourier.symmetrize_kx0_plane(data)
    state.half[h].weight = fourier.symmetrize_kx0_plane(weight)
    timings["backproject"] = time.perf_counter() - t5
    return resid, count, timings


def update_noise(state: RefineState, resid: np.ndarray, count: np.ndarray,
                 mask: fourier.PixelMask) -> None:
    """Seed eq. 15 pooled as RELION does (§5): σ² = Σ g|X − CTF·A|² / (2·n·Npix), per shell
    and optics group (or per pixel with noise_model='pixel'); shells beyond r_max keep their
    previous values."""
    nx = mask.box // 2 + 1
    rows, cols = mask.flat_index // nx, mask.flat_index % nx
    for g in range(state.sigma2.shape[0]):
        if count[g] == 0:
            continue
        # keep 1/σ² finite in float32 (a pixel with no residual would otherwise get σ² = 0)
        floor = 1e-12 * state.sigma2[g].max()
        if state.options.noise_model == "pixel":
            state.sigma2[g, rows, cols] = np.maximum(resid[g] / (2.0 * count[g]), floor)
        else:
            npix = np.bincount(mask.shell, minlength=resid.shape[1])
            shells2 = fourier.shell_index_2d(mask.box)
            for s in np.nonzero(npix)[0]:
                state.sigma2[g][shells2 == s] = max(resid[g, s] / (2.0 * count[g] * npix[s]),
                                                    floor)


def half_set_fsc(half: list[HalfState], options: RefineOptions, r_max: int, box: int
                 ) -> tuple[np.ndarray, np.ndarray]:
    """FSC between the unregularised half averages D/W (shells beyond r_max set to 0: they
    were not searched) and τ² from it (§6). Returns (fsc, tau2), both per shell."""
    h1, h2 = half
    shells = padded_shells(h1.data.shape, options.pad)
    n_shells = box // 2 + 1
    curve = fsc(unreg(h1.data, h1.weight), unreg(h2.data, h2.weight), shells, n_shells)
    curve[r_max + 1:] = 0.0
    w_mean = 0.5 * (shell_mean(h1.weight, shells, n_shells)
                    + shell_mean(h2.weight, shells, n_shells))
    tau2 = tau2_from_fsc(curve, w_mean, options.pad, options.tau2_fudge)
    tau2[r_max + 1:] = 0.0
    return curve, tau2


def reconstruct_half_maps(half: list[HalfState], tau2: np.ndarray, options: RefineOptions,
                          box: int) -> None:
    """Each half's map by seed eq. 14 (in place: volume_ft and volume)."""
    for h in half:
        shells = padded_shells(h.data.shape, options.pad)
        if options.prior_model == "voxel" and h.volume_ft is not None \
                and h.volume_ft.shape == h.data.shape:
            t2 = tau2_per_voxel(h.volume_ft)
        else:
            t2 = tau2
        h.volume_ft = regularised_ratio(h.data, h.weight, t2, options.pad, options.tau2_fudge,
                                        shells, box // 2 + 1)
        vol = projector.map_from_reference_ft(h.volume_ft, box, options.pad, options.interp)
        h.volume = vol * soft_sphere(box, box / 2.0 - 1.0, 1.0, 3)


def reconstruct_halves(state: RefineState, box: int) -> None:
    """Half-set FSC, τ², and both half maps (seed eqs. 14 and 16)."""
    state.fsc, state.tau2 = half_set_fsc(state.half, state.options, state.r_max, box)
    reconstruct_half_maps(state.half, state.tau2, state.options, box)


def log_prior(state: RefineState) -> float:
    """log P(V) of both half maps under the Gaussian prior with the current τ² (per complex
    coefficient, variance τ² per component): Σ −|V|²/(2τ²) − log(2πτ²)."""
    o = state.options
    total = 0.0
    for half in state.half:
        if half.volume_ft is None or state.tau2 is None:
            continue
        shells = padded_shells(half.volume_ft.shape, o.pad)
        t2 = state.tau2[np.minimum(shells, state.tau2.size - 1)] * o.tau2_fudge * o.pad**3
        ok = (shells < state.tau2.size) & (t2 > 0)
        v2 = np.abs(half.volume_ft[ok]) ** 2
        total += float(np.sum(-v2 / (2 * t2[ok]) - np.log(2 * np.pi * t2[ok])))
    return total


def run_iteration(state: RefineState, source: ImageSource,
                  progress: Callable[[int], None] | None = None) -> IterationStats:
    """One EM iteration over both half-sets; updates `state` in place."""
    o = state.options
    t0 = time.perf_counter()
    box, pix = source.box, source.pixel_size
    mask = fourier.pixel_mask(box, state.r_max)
    grid = orientations_3d(o.healpix_order, o.psi_step)
    shifts = translations(o.offset_range, o.offset_step)
    resid_total, count_total, timings = None, None, {}
    for h in (0, 1):
        resid, count, t = expectation_maximisation_half(state, source, h, grid, shifts, mask,
                                                        progress)
        resid_total = resid if resid_total is None else resid_total + resid
        count_total = count if count_total is None else count_total + count
        for k, v in t.items():
            timings[k] = timings.get(k, 0.0) + v
    t1 = time.perf_counter()
    update_noise(state, resid_total, count_total, mask)
    reconstruct_halves(state, box)
    timings["reconstruct"] = time.perf_counter() - t1
    ires = resolution_shell(state.fsc, 0.143)
    ires05 = resolution_shell(state.fsc, 0.5)
    state.iteration += 1
    state.r_max = min(next_r_max(resolution_shell(ssnr_from_fsc(state.fsc, o.tau2_fudge), 1.0),
                                 box, o.incr_size), box // 2 - 1)
    ll = float(state.log_likelihood.sum())
    lp = log_prior(state)
    stats = IterationStats(
        iteration=state.iteration, r_max=int(mask.r_max), resolution_shell=ires,
        resolution=float(box * pix / ires), resolution_05=float(box * pix / ires05),
        log_likelihood=ll, log_prior=lp, objective=ll + lp,
        average_pmax=float(state.max_prob.mean()),
        mean_n_significant=float(state.n_significant.mean()),
        seconds=time.perf_counter() - t0, timings=timings)
    state.history.append(stats)
    return stats


def combined_map(half: list[HalfState], fsc_curve: np.ndarray, options: RefineOptions,
                 r_max: int, box: int) -> np.ndarray:
    """The final map from both halves' sums together (seed eq. 14 with all particles), τ² from
    the FSC of the joined halves F' = √(2F/(1+F)) (§6)."""
    h1, h2 = half
    shells = padded_shells(h1.data.shape, options.pad)
    n_shells = box // 2 + 1
    f = np.clip(fsc_curve, 0.0, 1.0)
    joined = np.sqrt(2 * f / (1 + f))
    w = h1.weight + h2.weight
    tau2 = tau2_from_fsc(joined, shell_mean(w, shells, n_shells), options.pad,
                         options.tau2_fudge)
    tau2[r_max + 1:] = 0.0
    ft = regularised_ratio(h1.data + h2.data, w, tau2, options.pad, options.tau2_fudge, shells,
                           n_shells)
    vol = projector.map_from_reference_ft(ft, box, options.pad, options.interp)
    return vol * soft_sphere(box, box / 2.0 - 1.0, 1.0, 3)
