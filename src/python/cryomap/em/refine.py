"""3D auto-refinement (RELION's auto-refine): a schedule of E/M passes over two independent
half-sets, with the pose sampling made finer as the map improves.

Each iteration, for each half-set: its current map is the reference of one engine pass
(`engine.run_pass`, K = 1) over the half's particles; then sigma2 (docs/method.md eq. (15),
pooled over both halves), the half-set FSC, tau2 from the FSC and both half maps (eq. (14)).

The sampling schedule (`AutoSampling`, RELION's updateAngularSampling and checkConvergence):
- start at --healpix_order with global searches and adaptive oversampling;
- when the resolution has stopped improving and the best poses have stopped changing, raise
  the HEALPix order by one (finer translations too); from --auto_local_healpix_order on, search
  locally around each particle's previous pose with a Gaussian prior (sigma = 2 oversampled
  steps, RELION's rule);
- when the sampling is finer than the data can resolve (the angular step below 0.75 of the
  posterior's accuracy) and neither resolution nor poses change, the run has converged: one
  final iteration at the full image size, then the map from both halves together.
A global search at an order above the starting one starts at the starting order's grid and
follows each particle's significant samples down (adaptive oversampling over several levels),
so it costs about as much as the coarse search.

With a point group (--sym) every pass searches the asymmetric unit's directions only and its
sums are summed over the group (docs/symmetry.md). With a solvent mask (--solvent_mask) the
references are multiplied by it instead of the spherical mask (RELION's solvent flattening),
and with --solvent_correct_fsc the half-set FSC behind tau2 and the resolution is the
phase-randomisation-corrected FSC of the masked unregularised half maps.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from .. import fourier, postprocess, projector
from .._kernels import core
from ..euler import angular_distance, euler_to_matrix
from ..halves import random_subsets
from ..masks import soft_sphere
from ..particles import ParticleSet
from ..resolution import FSC_THRESHOLD, first_shell_below, fsc_maps, resolution_shell
from ..sampling import PoseSampling, angular_step
from . import nonuniform
from .data import Work
from .engine import PassResult
from .iteration import (
    EMState,
    merge_timings,
    normalise_amplitudes,
    offset_sigma,
    pass_amplitudes,
    rotations,
    store_estimates,
)
from .memory import batch_size
from .model import next_r_max, state_from_saved, tau2_from_fsc
from .noise import NoiseModel
from .options import MAX_HEALPIX_ORDER, EMOptions, bad_option
from .search import Search

#: Finest translational step (px, after oversampling) the schedule goes down to.
MIN_OFFSET_STEP = 0.1


@dataclass
class RefineOptions(EMOptions):
    """Options of a refinement: the shared ones (RELION's defaults) and the schedule's."""

    iterations: int | None = None  # None: auto-refine until converged; N: exactly N
    prior_model: str = "fsc"  # "fsc" (RELION) or "voxel" (eq. (16) per voxel)
    max_iterations: int = 40  # auto-refine gives up converging after this many
    fixed_poses: bool = False  # known poses: reconstruct, no alignment
    solvent_mask: str | None = None  # MRC path: references times it (RELION's --solvent_mask)
    solvent_correct_fsc: bool = False  # half-set FSC corrected for the mask (phase randomised)
    nu: bool = False  # non-uniform refinement: each half map filtered to its local resolution

    def validate(self) -> None:
        """Every option in range (InputError naming the option and the range)."""
        super().validate()
        if self.solvent_correct_fsc and self.solvent_mask is None:
            raise bad_option("solvent_correct_fsc", "", "a mask given with --solvent_mask")
        if self.iterations is not None and self.iterations < 1:
            raise bad_option("iter", self.iterations, "at least 1 iteration")
        if self.prior_model not in ("fsc", "voxel"):
            raise bad_option("prior-model", self.prior_model, "fsc or voxel")
        if self.max_iterations < 1:
            raise bad_option("max_iterations", self.max_iterations, "at least 1")


def level0_order(options: EMOptions, order: int) -> int:
    """The HEALPix order of level 0 of a global search at `order`: the finest order up to
    `order` whose grid (the asymmetric unit's, with --sym) holds no more orientations than an
    asymmetric particle's starting grid (--healpix_order, C1), and at least --healpix_order.
    The levels below follow the significant samples down to `order`, so an asymmetric
    particle's global search costs about its coarse search; a point group's smaller unit buys
    a finer level 0 for the same cost, which its pseudo-symmetric low-resolution views need
    (a cage is almost a sphere at the coarse radius)."""
    start = options.healpix_order
    psi0 = options.psi_step if options.psi_step is not None else angular_step(start)
    if order <= start or options.sym.upper() == "C1":
        return min(start, order)
    budget = PoseSampling.create(3, start, psi0, 1.0, 0.0).n_orientations(0)
    level0 = start
    while level0 < order and PoseSampling.create(
            3, level0 + 1, psi0 / 2 ** (level0 + 1 - start), 1.0, 0.0,
            symmetry=options.sym).n_orientations(0) <= budget:
        level0 += 1
    return level0


@dataclass
class AutoSampling:
    """The state of RELION's auto-sampling schedule (see the module docstring)."""

    order: int  # current HEALPix order (before oversampling)
    offset_step: float  # px, before oversampling
    offset_range: float  # px
    sigma_ang: float | None = None  # degrees: local searches when set
    best_shell: int = 0  # best resolution so far (shell of SSNR = 1)
    iter_wo_resolution_gain: int = 0
    iter_wo_large_changes: int = 0
    smallest_orientation_change: float = 999.0
    smallest_offset_change: float = 999.0
    fine_enough: bool = False
    converged: bool = False
    final_done: bool = False

    @property
    def local(self) -> bool:
        return self.sigma_ang is not None

    def sampling(self, options: EMOptions, iteration: int) -> tuple[PoseSampling, int]:
        """This iteration's grid (perturbed by a seeded draw) and its number of levels below
        level 0 (`level0_order`)."""
        rng = np.random.default_rng([options.seed, iteration, 17])
        start = options.healpix_order
        psi0 = options.psi_step if options.psi_step is not None else angular_step(start)
        level0 = self.order if self.local else level0_order(options, self.order)
        levels = self.order - level0 + options.oversampling
        psi_step = psi0 / 2 ** (level0 - start) if level0 >= start else psi0
        sampling = PoseSampling.create(3, level0, psi_step, self.offset_step, self.offset_range,
                                       options.perturb, rng, symmetry=options.sym)
        return sampling, levels

    def search(self, options: RefineOptions, iteration: int, radius: int, diameter: float,
               offset_sigma: float | None, fixed_poses: bool = False,
               recon_radius: int | None = None) -> Search:
        """The engine's search for an iteration of a refinement: the E-step out to `radius`,
        the M-step sums out to `recon_radius` (None: radius)."""
        sampling, levels = self.sampling(options, iteration)
        return Search(sampling, levels, radius, diameter, local_sigma=self.sigma_ang,
                      fixed_poses=fixed_poses, offset_sigma=offset_sigma,
                      adaptive_fraction=options.adaptive_fraction,
                      force_max=options.force_max, recon_radius=recon_radius)

    def fine_step(self, options: EMOptions) -> float:
        """The angular step after oversampling (degrees)."""
        return angular_step(self.order + options.oversampling)

    def update(self, shell: int, orientation_change: float, offset_change: float,
               accuracy_rot: float, accuracy_trans: float, options: EMOptions,
               pixel_size: float, particle_radius: float) -> str | None:
        """After an iteration: count iterations without resolution gain (`shell`, the
        half-map FSC's 0.143 shell) and without large pose changes (RELION's 3 % / 40 %
        rule), then make the sampling finer or declare convergence. particle_radius (px)
        ties the translational step to the angular one (`_finer`). Returns a log line when
        the sampling changes."""
        if shell > self.best_shell:
            self.best_shell, self.iter_wo_resolution_gain = shell, 0
        else:
            self.iter_wo_resolution_gain += 1
        step = self.fine_step(options)
        offset_fine = self.offset_step / 2**options.oversampling
        small_orient = (orientation_change / step < 0.40
                        or 1.03 * orientation_change >= self.smallest_orientation_change)
        small_offset = (offset_change / offset_fine < 0.40
                        or 1.03 * offset_change >= self.smallest_offset_change)
        if small_orient and small_offset:
            self.iter_wo_large_changes += 1
        else:
            self.iter_wo_large_changes = 0
        self.smallest_orientation_change = min(self.smallest_orientation_change,
                                               orientation_change)
        self.smallest_offset_change = min(self.smallest_offset_change, offset_change)
        message = None
        if self.iter_wo_resolution_gain >= 1 and self.iter_wo_large_changes >= 1:
            if step < 0.75 * accuracy_rot or self.order + 1 > MAX_HEALPIX_ORDER - \
                    options.oversampling + 1:
                self.fine_enough = True
            else:
                message = self._finer(offset_change, accuracy_trans, options, pixel_size,
                                      particle_radius)
        if self.fine_enough and self.iter_wo_resolution_gain >= 1 \
                and self.iter_wo_large_changes >= 1:
            self.converged = True
        return message

    def _finer(self, offset_change: float, accuracy_trans: float, options: EMOptions,
               pixel_size: float, particle_radius: float) -> str:
        """One HEALPix order up; translations from the observed accuracy and changes
        (RELION's rules, in px), the oversampled step also no coarser than the distance the
        particle's edge moves by one oversampled angular step, down to MIN_OFFSET_STEP: a
        pose is then as fine in translation as in rotation."""
        over = 2**options.oversampling
        edge = np.deg2rad(angular_step(self.order + 1 + options.oversampling)) * particle_radius
        # RELION: at most 1.5 Å, 3/4 of the accuracy (oversampled step)
        fine = max(min(1.5 / pixel_size, 0.75 * accuracy_trans, edge), MIN_OFFSET_STEP)
        new_step = fine * over
        new_range = min(5.0 * offset_change, 1.3 * self.offset_range)
        new_range = max(new_range, 1.5 * new_step)
        if new_range > 4.0 * new_step:
            new_range /= 2.0
        if new_range > 4.0 * new_step:
            new_step = new_range / 4.0
        if new_step > self.offset_step:  # never coarser than before
            new_step, new_range = self.offset_step, self.offset_range
        self.order += 1
        self.offset_step, self.offset_range = float(new_step), float(new_range)
        if self.order >= options.auto_local_healpix_order:
            self.sigma_ang = 2.0 * self.fine_step(options)
        self.iter_wo_resolution_gain = self.iter_wo_large_changes = 0
        self.smallest_orientation_change = self.smallest_offset_change = 999.0
        return (f"sampling: HEALPix order {self.order} ({angular_step(self.order):.2f} deg, "
                f"{self.fine_step(options):.2f} oversampled), offsets {self.offset_step:.2f} px "
                f"({self.offset_step / over:.2f} oversampled) in {self.offset_range:.2f} px, "
                + (f"local searches (sigma {self.sigma_ang:.2f} deg)" if self.local
                   else "global searches"))


@dataclass
class RefineIteration:
    """The figures of one refine iteration: run.log's line, model.star, the history."""

    iteration: int
    r_max: int  # px, the E-step's Fourier radius
    recon_radius: int  # px, the radius of the sums, half maps and FSC
    final: bool
    stage: str  # the sampling, in words
    local: bool
    healpix_order: int
    levels: int  # oversampled levels below level 0
    resolution_shell: int  # the half maps' FSC 0.143 shell (>= 1)
    resolution: float  # Å, of resolution_shell
    resolution_05: float  # Å, at FSC 0.5
    fsc_mask: str  # what the FSC was computed in
    log_likelihood: float
    average_pmax: float
    mean_n_significant: float
    mean_samples: float  # final-level samples scored per image
    orientations_level0: int
    orientation_change: float  # degrees, mean
    offset_change: float  # px, RMS
    accuracy_rot: float  # degrees (eq. (27))
    accuracy_trans: float  # px
    offset_step: float  # px, after oversampling
    offset_sigma_angst: float
    seconds: float
    timings: dict[str, float]  # seconds by stage (`iteration.merge_timings`)
    message: str | None  # the schedule's line when the sampling changed


@dataclass
class RefineState(EMState):
    """Everything an iteration needs and produces (saved after each iteration)."""

    volumes: np.ndarray  # (2, N, N, N) the half maps (current references)
    subset: np.ndarray  # (n,) 1 or 2
    angular_spread: np.ndarray  # (n,) degrees
    offset_spread: np.ndarray  # (n,) px
    offset_sigma: float  # px, std. dev. of the origin prior
    schedule: AutoSampling
    fsc: np.ndarray | None = None
    tau2: np.ndarray | None = None
    final_maps: np.ndarray | None = None  # (3, N, N, N) combined, half 1, half 2 (unfiltered)
    history: list[RefineIteration] = field(default_factory=list)

    @classmethod
    def from_saved(cls, values: dict) -> RefineState:
        values = dict(values, schedule=AutoSampling(**values["schedule"]),
                      history=[RefineIteration(**h) for h in values.get("history", [])])
        return state_from_saved(cls, values, ints=("iteration", "r_max"),
                                floats=("offset_sigma",))


# -- one iteration -------------------------------------------------------------------------


@dataclass
class Refinement(Work):
    """The data and options an iteration works on (what is not state)."""

    options: RefineOptions
    mask_radius: float  # px, particle mask
    solvent_mask: np.ndarray | None = None  # (N, N, N) in [0, 1], masks.check_mask'ed
    r_limit: int | None = None  # px, the largest Fourier radius of any pass (None: N/2)

    @property
    def diameter(self) -> float:
        return 2.0 * self.mask_radius * self.pixel_size


def reference_mask(refinement: Refinement) -> np.ndarray:
    """What the references are multiplied by before each pass: the solvent mask (RELION's
    solvent flattening) or the soft sphere of the particle diameter."""
    if refinement.solvent_mask is not None:
        return refinement.solvent_mask
    o = refinement.options
    return soft_sphere(refinement.box, refinement.mask_radius, o.mask_edge, 3)


def mask_radius_px(options: RefineOptions, box: int, pix: float) -> float:
    """Particle mask radius in px: diameter/2, default (N - 5)/2 - edge (RELION's default)."""
    if options.particle_diameter is None:
        return (box - 5) / 2.0 - options.mask_edge
    return options.particle_diameter / (2.0 * pix)


def split_halves(particles: ParticleSet, rng: np.random.Generator,
                 log: Callable[[str], None] | None = None) -> np.ndarray:
    """Half-sets (n,) 1/2 of a refinement, class3d --split_halves or a reconstruction: the
    particles' rlnRandomSubset when valid with both halves non-empty, else a random equal
    split with a line through `log` saying why (`halves.random_subsets` with
    resplit_invalid; docs/conventions.md, "Half sets")."""
    return random_subsets(particles, rng, log=log, resplit_invalid=True)


def initial_state(refinement: Refinement, reference: np.ndarray, angles: np.ndarray,
                  origins_px: np.ndarray, subset: np.ndarray) -> RefineState:
    """The reference low-passed to --ini_high in both halves, sigma2 from the images' power,
    the given poses (n, 3) degrees and origins (n, 2) px, half-sets (n,) 1/2."""
    o = refinement.options
    box, pix = refinement.box, refinement.pixel_size
    n = angles.shape[0]
    ref = fourier.initial_lowpass(np.asarray(reference, np.float64), o.ini_high, pix)
    r0 = int(np.ceil(box * pix / o.ini_high))
    noise = NoiseModel.from_images(refinement.source, o.noise_model == "pixel")
    schedule = AutoSampling(order=o.healpix_order, offset_step=o.offset_step,
                            offset_range=o.offset_range, sigma_ang=o.sigma_ang)
    if o.sigma_ang is None and o.healpix_order >= o.auto_local_healpix_order \
            and not o.fixed_poses:
        schedule.sigma_ang = 2.0 * schedule.fine_step(o)
    return RefineState(
        iteration=0, volumes=np.stack([ref, ref.copy()]), sigma2=noise.sigma2,
        subset=np.asarray(subset, np.int64), angles=np.array(angles, np.float64),
        origins_px=np.array(origins_px, np.float64), max_prob=np.zeros(n),
        n_significant=np.zeros(n, np.int64), log_likelihood=np.zeros(n),
        amplitude=np.ones(n), angular_spread=np.zeros(n), offset_spread=np.zeros(n),
        r_max=min(next_r_max(r0, box, o.incr_size), box // 2 - 1),
        offset_sigma=o.offset_sigma / pix, schedule=schedule)


def recon_radius(radius: int, box: int, fixed_poses: bool = False) -> int:
    """Fourier radius (px) of an iteration's M-step sums, half maps and FSC: twice the E-step
    radius, up to Nyquist (at known poses Nyquist). Beyond the E-step radius no pose was
    fitted to the data, so the FSC there is the data's; twice the radius is room for the
    resolution to double in one iteration, and the next radius (its shell + --incr_size)
    then grows with it: the radius can never hold the resolution down."""
    return box // 2 if fixed_poses else min(box // 2, 2 * int(radius))


def refine_iteration(state: RefineState, refinement: Refinement,
                     progress: Callable[[int], None] | None = None) -> RefineIteration:
    """One E/M iteration over both half-sets; updates `state` in place and returns the
    iteration's figures (also appended to state.history).

    The E-step searches out to state.r_max; the M-step sums, the half maps and their FSC go
    further (`recon_radius`, within --maxres's r_limit), so the resolution is measured where
    the data reach, and the next E-step radius is that resolution's shell plus --incr_size."""
    o, source = refinement.options, refinement.source
    box, pix = refinement.box, refinement.pixel_size
    t_start = time.perf_counter()
    sched = state.schedule
    final = sched.converged or (o.iterations is not None and state.iteration + 1 >= o.iterations)
    radius = box // 2 if final else state.r_max
    recon = recon_radius(radius, box, o.fixed_poses)
    if refinement.r_limit is not None:
        radius, recon = min(radius, refinement.r_limit), min(recon, refinement.r_limit)
    search = sched.search(o, state.iteration + 1, radius, refinement.diameter,
                          state.offset_sigma, o.fixed_poses, recon_radius=recon)
    noise = NoiseModel(state.sigma2, o.noise_model == "pixel")
    sphere = reference_mask(refinement)
    previous = rotations(state.angles)
    prev_origins = state.origins_px.copy()
    results: list[PassResult] = []
    bsize = batch_size(search, 1, o.batch_memory)
    # with --nu each half's two folds are summed apart (one pass each): two quarter maps;
    # the last iteration is not filtered
    folds = nonuniform.fold_of_particles(state.subset.size, o.seed) if o.nu and not final \
        else np.ones(state.subset.size, np.int64)
    for h in (1, 2):
        ref = projector.prepare_reference(state.volumes[h - 1] * sphere, o.pad, o.interp,
                                          radius)
        for fold in np.unique(folds):
            members = np.flatnonzero((state.subset == h) & (folds == fold))
            res = source.ranks.run_pass(source, members, [ref], search, noise,
                                        previous[members], prev_origins[members],
                                        batch_size=bsize, slice_memory=o.batch_memory,
                                        progress=progress,
                                        amplitudes=pass_amplitudes(state, members, o.scale))
            store_estimates(state, members, res.estimates)
            state.angular_spread[members] = res.estimates.angular_spread
            state.offset_spread[members] = res.estimates.offset_spread
            results.append(res)
    if o.scale:
        normalise_amplitudes(state)
    t_pass = time.perf_counter()
    # eq. (15): sigma2 pooled over both halves; the origin prior's width (RELION's M-step)
    noise.update(sum(r.residual for r in results), sum(r.count for r in results),
                 fourier.pixel_mask(box, recon), max_shell=radius)
    state.sigma2 = noise.sigma2
    if not o.fixed_poses:
        state.offset_sigma = offset_sigma(sum(r.offset_sq for r in results),
                                          sum(float(r.count.sum()) for r in results), pix)
    # half-set FSC, tau2, half maps (eqs. (14), (16))
    per_half = len(results) // 2
    fold_bps = [[r.backprojectors[0] for r in results[h * per_half:(h + 1) * per_half]]
                for h in (0, 1)]
    bps = [group[0] if len(group) == 1 else projector.BackProjector.pooled(group)
           for group in fold_bps]
    gold = gold_standard(bps, o, recon, box,
                         refinement.solvent_mask if o.solvent_correct_fsc else None,
                         seed=int(np.random.default_rng([o.seed, state.iteration + 1, 31])
                                  .integers(2**31)))
    state.fsc, state.tau2 = gold.fsc, gold.tau2
    for h, bp in enumerate(bps):
        t2 = state.tau2
        if o.prior_model == "voxel":
            t2 = voxel_tau2(state.volumes[h] * sphere, bp, o)
        state.volumes[h] = bp.reconstruct(t2, o.tau2_fudge, recon) * _edge(box)
    nu_message = nonuniform_references(state, fold_bps, recon, refinement) \
        if o.nu and not final else None
    # pose changes and accuracies
    orientation_change = float(np.mean(pose_change(previous, rotations(state.angles), o.sym)))
    offset_change = float(np.sqrt(np.mean((state.origins_px - prev_origins) ** 2)))
    accuracy_rot, accuracy_trans = pose_accuracy(state, refinement, radius, noise)
    ires = max(resolution_shell(state.fsc, FSC_THRESHOLD), 1)
    ires05 = max(resolution_shell(state.fsc, 0.5), 1)
    state.iteration += 1
    stage = (f"order {sched.order} ({angular_step(sched.order):.2f} deg, "
             f"{sched.fine_step(o):.2f} oversampled), offsets {sched.offset_step:.2f} px "
             f"({sched.offset_step / 2**o.oversampling:.2f} oversampled) in "
             f"{sched.offset_range:.2f} px, " + (f"local (sigma {sched.sigma_ang:.2f} deg)"
                                                 if sched.local else "global"))
    message = None
    if final:
        state.final_maps = final_maps(bps, state.fsc, o, recon, box, unfiltered=gold.halves)
        sched.final_done = True
    elif not o.fixed_poses:
        message = sched.update(ires, orientation_change, offset_change, accuracy_rot,
                               accuracy_trans, o, pix, refinement.mask_radius)
        if state.iteration >= o.max_iterations and o.iterations is None:
            sched.converged = True
    if nu_message:
        message = nu_message if message is None else f"{message}; {nu_message}"
    state.r_max = min(next_r_max(ires, box, o.incr_size), box // 2 - 1)
    timings = merge_timings(results, time.perf_counter() - t_pass)
    samples = np.concatenate([r.estimates.n_samples for r in results])
    stats = RefineIteration(
        iteration=state.iteration, r_max=int(radius), recon_radius=int(recon),
        final=bool(final), stage=stage,
        local=bool(sched.local and not final or search.local_sigma),
        healpix_order=int(search.sampling.healpix_order), levels=int(search.levels),
        resolution_shell=int(ires), resolution=float(box * pix / ires),
        resolution_05=float(box * pix / ires05), fsc_mask=gold.mask,
        log_likelihood=float(state.log_likelihood.sum()),
        average_pmax=float(state.max_prob.mean()),
        mean_n_significant=float(state.n_significant.mean()),
        mean_samples=float(samples.mean()),
        orientations_level0=int(search.sampling.n_orientations(0)),
        orientation_change=orientation_change, offset_change=offset_change,
        accuracy_rot=accuracy_rot, accuracy_trans=accuracy_trans,
        offset_step=float(sched.offset_step / 2**o.oversampling),
        offset_sigma_angst=state.offset_sigma * pix,
        seconds=time.perf_counter() - t_start, timings=timings, message=message)
    state.history.append(stats)
    return stats


def nonuniform_references(state: RefineState, fold_bps: list[list[projector.BackProjector]],
                          recon: int, refinement: Refinement) -> str:
    """`refine --nu`: each half's regularised map low-passed to the local resolution of its
    own two folds' quarter maps (`em.nonuniform`); returns the log's line."""
    spans = []
    for h in (0, 1):
        quarters = unfiltered_halves(fold_bps[h], recon, refinement.box)
        nu = nonuniform.filter_half(state.volumes[h], quarters, refinement.pixel_size,
                                    refinement.mask_radius, threads=core.max_threads(),
                                    sym=refinement.options.sym,
                                    solvent_mask=refinement.solvent_mask)
        state.volumes[h] = nu.volume
        spans.append(nu.percentiles())
    lo, mid, hi = np.mean(spans, axis=0)
    return (f"non-uniform filter: local resolution {lo:.1f} / {mid:.1f} / {hi:.1f} Å "
            f"(10th / 50th / 90th percentile)")


def pose_accuracy(state: RefineState, refinement: Refinement, radius: int,
                  noise: NoiseModel, n_per_half: int = 100) -> tuple[float, float]:
    """RELION's expected accuracies (degrees, px) of up to n_per_half particles of each half
    against its new map, averaged (see em/accuracy.py)."""
    o = refinement.options
    rng = np.random.default_rng([o.seed, state.iteration, 29])
    sphere = reference_mask(refinement)
    acc = []
    for h in (1, 2):
        members = np.flatnonzero(state.subset == h)
        pick = np.sort(rng.choice(members, min(n_per_half, members.size), replace=False))
        ref = projector.prepare_reference(state.volumes[h - 1] * sphere, o.pad, o.interp,
                                          radius)
        rot = euler_to_matrix(state.angles[pick, 0], state.angles[pick, 1],
                              state.angles[pick, 2])
        source = refinement.source
        acc.append(source.ranks.expected_accuracy(ref, source, pick, rot, noise, radius, rng))
    return float(np.mean([a[0] for a in acc])), float(np.mean([a[1] for a in acc]))


def _edge(box: int, ndim: int = 3) -> np.ndarray:
    """The soft edge RELION gives a reconstruction at radius N/2."""
    return soft_sphere(box, box / 2.0 - 1.0, 1.0, ndim)


def pose_change(a: np.ndarray, b: np.ndarray, sym: str = "C1") -> np.ndarray:
    """Angle (degrees) between poses a and b (n, 3, 3), up to the point group: a pose that
    moved to a symmetry copy of itself has not changed."""
    if sym.upper() == "C1":
        return angular_distance(a, b)
    from ..symmetry import angular_distance as symmetric_distance

    return symmetric_distance(a, b, sym)


@dataclass
class GoldStandard:
    """The half maps of an iteration and what they measure: the unfiltered half maps (D/W,
    RELION's floor only, as `final_maps` writes them), their FSC (solvent-corrected with a
    mask), tau2 from it (docs/method.md eq. (21)), and which mask the FSC used."""

    halves: np.ndarray  # (2, N, N, N) unfiltered half maps
    fsc: np.ndarray  # (N//2+1,) per shell
    tau2: np.ndarray  # (N//2+1,) per shell, 0 beyond the reconstruction radius
    mask: str  # "no mask" or "solvent mask (phase-randomisation corrected)"


def unfiltered_halves(bps: list[projector.BackProjector], r_max: int, box: int) -> np.ndarray:
    """(2, N, N, N) the half maps with no prior term (tau2 -> infinity, RELION's floor only)
    out to r_max, with the reconstruction's soft edge: run_half{1,2}_class001_unfil.mrc."""
    inf = np.full(box // 2 + 1, np.inf)
    edge = _edge(box, bps[0].ndim)
    return np.stack([bp.reconstruct(inf, 1.0, r_max, minres_map=box) * edge for bp in bps])


def gold_standard(bps: list[projector.BackProjector], options: RefineOptions, r_max: int,
                  box: int, solvent_mask: np.ndarray | None = None, seed: int = 0
                  ) -> GoldStandard:
    """The unfiltered half maps of two half-sets' sums out to r_max, the FSC between them
    (`resolution.fsc_maps`; with a solvent mask RELION's --solvent_correct_fsc,
    `solvent_corrected_fsc`, `seed` drawing the random phases), and tau2 from it. The FSC is
    that of the maps written as run_half*_unfil.mrc, so the resolution reported is theirs."""
    h1, h2 = bps
    halves = unfiltered_halves(bps, r_max, box)
    if solvent_mask is None:
        curve, mask = fsc_maps(halves[0], halves[1]), "no mask"
    else:
        curve = solvent_corrected_fsc(halves, solvent_mask, seed)
        mask = "solvent mask, phase-randomisation corrected"
    curve[r_max + 1:] = 0.0
    w_mean = 0.5 * (h1.shell_mean_weight() + h2.shell_mean_weight())
    tau2 = tau2_from_fsc(curve, w_mean, options.pad, options.tau2_fudge, h1.ndim)
    tau2[r_max + 1:] = 0.0
    return GoldStandard(halves, curve, tau2, mask)


def half_set_fsc(bps: list[projector.BackProjector], options: RefineOptions, r_max: int,
                 box: int, solvent_mask: np.ndarray | None = None, seed: int = 0
                 ) -> tuple[np.ndarray, np.ndarray]:
    """(FSC, tau2) of `gold_standard`."""
    gold = gold_standard(bps, options, r_max, box, solvent_mask, seed)
    return gold.fsc, gold.tau2


def solvent_corrected_fsc(halves: np.ndarray, mask: np.ndarray, seed: int = 0,
                          randomize_at_fsc: float = 0.8) -> np.ndarray:
    """RELION's solvent-corrected gold-standard FSC during refinement
    (reconstructUnregularisedMapAndCalculateSolventCorrectedFSC) of the unfiltered half maps
    (2, N, N, N): their FSC unmasked and masked, the masked FSC of the halves with phases
    randomised beyond the first shell where the unmasked FSC drops below 0.8, and
    (FSC_masked - FSC_random) / (1 - FSC_random) from two shells beyond it (0 where the random
    one is the larger), `postprocess`'s pieces. If the unmasked FSC never drops below 0.8, the
    unmasked FSC. Shells 0..N/2."""
    h1, h2 = halves
    unmasked = fsc_maps(h1, h2)
    shell = first_shell_below(unmasked, randomize_at_fsc)
    if shell < 1:
        return unmasked
    masked = fsc_maps(h1 * mask, h2 * mask)
    random = fsc_maps(postprocess.randomise_phases(h1, shell, seed) * mask,
                      postprocess.randomise_phases(h2, shell, seed + 1) * mask)
    curve = postprocess.corrected_fsc(masked, random, shell)
    far = np.arange(curve.size) >= shell + 2
    curve[far & (random > masked)] = 0.0
    return curve


def voxel_tau2(volume: np.ndarray, bp: projector.BackProjector,
               options: RefineOptions) -> np.ndarray:
    """docs/method.md eq. (16) per voxel: tau2 = |V|^2 / 2 of the current map on the
    back-projector's grid (the seed's literal prior model)."""
    ref = projector.prepare_reference(volume, options.pad, options.interp, bp.r_max)
    if ref.data.shape != bp.data.shape:
        raise ValueError("voxel_tau2: reference and back-projector grids differ")
    return (np.abs(ref.data.astype(np.complex128)) ** 2 / 2.0) / (
        options.pad**3 * options.tau2_fudge)


def final_maps(bps: list[projector.BackProjector], fsc_curve: np.ndarray,
               options: RefineOptions, r_max: int, box: int, halves: bool = True,
               unfiltered: np.ndarray | None = None) -> np.ndarray:
    """(combined, half 1, half 2): the map from both halves' sums together with tau2 from the
    FSC of the joined halves F' = sqrt(2F/(1+F)), and the unfiltered half maps (RELION's
    run_class001.mrc and run_half{1,2}_class001_unfil.mrc; `unfiltered_halves` unless given
    as `unfiltered` (2, N, N, N)); with halves=False the combined map alone, (1, N, N, N)."""
    both = projector.BackProjector.pooled(bps)
    f = np.clip(fsc_curve, 0.0, 1.0)
    joined = np.sqrt(2 * f / (1 + f))
    tau2 = tau2_from_fsc(joined, both.shell_mean_weight(), options.pad, options.tau2_fudge,
                         both.ndim)
    tau2[r_max + 1:] = 0.0
    combined = both.reconstruct(tau2, options.tau2_fudge, r_max) * _edge(box, both.ndim)
    if not halves:
        return combined[None]
    if unfiltered is None:
        unfiltered = unfiltered_halves(bps, r_max, box)
    return np.concatenate([combined[None], unfiltered])
