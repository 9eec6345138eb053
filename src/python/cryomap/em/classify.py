"""Classification by EM with marginalisation over class and pose, 2D and 3D (RELION's Class2D
and Class3D): a schedule of engine passes (`engine.run_pass`) with K references.

Each iteration: one pass of all particles against the K class references (3D maps, or 2D
images whose "orientations" are in-plane rotations), with log pi_k as each class's prior;
then the class distribution pi, sigma2 (docs/method.md eq. (15)) and each class's map by eq.
(14) with RELION's classification prior: tau2_k per shell is the shell mean of |F_k|^2 / 2 of
the reference as projected (RELION computes it when building the projector), and the same
back-projector rule as refinement (`projector.BackProjector.reconstruct`). SSNR_k per shell
is the mean of p^d T tau2_k W_k; a class's resolution is its last shell with SSNR_k > 1, and
the next Fourier radius follows the best class.

What keeps classes apart (RELION practice, measured in tests/test_class*.py):
- seeds: in the first iteration each image stays in one random class (an equal division), so
  every class starts from as many images as the others;
- the sampling grid is randomly perturbed every iteration (--perturb), so classes cannot
  settle on different offsets of one fixed grid;
- cryomap's re-seeding (`reseed_fraction`; 0 turns it off): in the first half of the run a
  class left with almost no images takes half of the largest class, seeded as in the first
  iteration.

What lets subtle 3D classes emerge (cryomap's, docs/method.md "What keeps subtle classes from
collapsing"):
- the classes differ from the consensus only up to the shell where the half-set FSC of their
  differences is supported (`class_differences.limit_differences`); beyond it, noise decided
  the classes;
- where the classes do not form under per-class alignment, the adaptive schedule (class3d's
  default; `class_schedule.probe_step`) refines the poses against one consensus map and tells
  the classes apart at those poses;
- the class temperature (4 by default in class3d) keeps a particle's own noise in its class
  map from freezing it in its seed class;
- at fixed poses an iteration runs up to FIXED_INNER cheap E/M passes.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

import numpy as np

from .. import fourier, projector
from ..euler import euler_to_matrix
from ..masks import soft_sphere
from ..resolution import resolution_shell
from ..sampling import PoseSampling
from . import iteration
from .class_differences import (
    difference_fsc,
    difference_weights,
    extend_difference_shells,
    limit_differences,
)
from .class_schedule import (
    ALIGN_SHARE,
    CONSENSUS_SHARE,
    FIXED_INNER,
    FIXED_MIN,
    FIXED_SETTLED,
    fixed_phase_over,
    local_per_class,
    probe_step,
    starting_schedule,
)
from .data import ImageSource
from .engine import PassResult
from .heterogeneous import (
    JOINED_TAU2_FUDGE,
    classes_formed,
    gold_standard_phase,
    split_half_maps,
)
from .iteration import EMState, merge_timings, offset_sigma, rotations, store_estimates
from .memory import batch_size
from .model import next_r_max, ssnr_from_fsc, state_from_saved
from .noise import NoiseModel
from .options import EMOptions, bad_option
from .refine import AutoSampling, mask_radius_px, pose_change, recon_radius
from .search import Search

# Shells below this are reconstructed without the prior term (RELION's --minres_map).
MINRES_MAP = 5


#: class3d's schedules (`ClassOptions.schedule`)
SCHEDULES = ("adaptive", "consensus", "classic")


@dataclass
class ClassOptions(EMOptions):
    """Options of a classification: the shared ones and the classes'."""

    # class3d's defaults (RELION's Class3D); class2d's: `ClassOptions.defaults(2)`
    tau2_fudge: float = 4.0
    iterations: int = 25
    n_classes: int = 4  # --K
    ndim: int = 3  # reference dimensionality: 3 (class3d) or 2 (class2d)
    hard_last: bool = False  # hard class assignment in the last iteration
    center_classes: bool = False  # 2D: move each average's centre of mass to the box centre
    perturbation: float = 0.5  # 3D: initial perturbation, in units of the reference's std
    subset_size: int | None = None  # 2D: images averaged per initial class (None: n/K)
    # a class below reseed_fraction/K of the images in the first half of the iterations is
    # re-seeded by splitting the largest class (0: never, as RELION)
    reseed_fraction: float = 0.1
    # Å: never use frequencies beyond this in the E-step (RELION's --strict_highres_exp)
    highres_limit: float | None = None
    skip_align: bool = False  # poses from the input, only classes estimated (RELION's)
    # gold-standard classes: each half-set of particles is classified against the class maps
    # of the other half, and each class map is regularised by its own half-set FSC
    split_halves: bool = False
    # class-similarity control: the class posterior raised to 1/T before the M-step, T falling
    # geometrically from class_temperature to 1 over the first half of the iterations
    class_temperature: float = 4.0
    # 3D with alignment (docs/method.md, "Classification schedules"):
    # - "consensus" (--auto_sampling): the poses refined against one consensus map on
    #   refinement's schedule (finer HEALPix orders up to local searches), then the classes
    #   seeded and classified at those poses until settled, then each class's poses searched
    #   again. Best for subtle differences; a class that cannot be aligned to the consensus
    #   (a large piece missing) comes out blurred;
    # - "classic": RELION's Class3D, each class's poses searched from the first iteration;
    # - "adaptive" (class3d's default): classic until the classes form (fewer than
    #   FORMED_CHANGED of the particles change class), then each class's poses searched on
    #   refinement's sampling schedule; if they have not formed after PROBE_SHARE of the
    #   iterations, the consensus schedule from there, its last step local searches per
    #   class around the consensus poses (local_per_class). 2D classes are always classic
    schedule: str = "adaptive"
    # 3D: the classes differ only up to the resolution where their differences from the
    # consensus are supported (the half-set FSC of a difference stays >= this; one shell for
    # all where poses are searched, one per class where the maps are localised); beyond it
    # a class is the consensus map. 0: off (RELION)
    difference_fsc: float = 0.143
    # ... the threshold where the E-step compares with the localised maps (at fixed poses and
    # in the local searches per class after them), where noise at the extra shells is
    # weighted down where the classes do not differ
    difference_fsc_fixed: float = 0.05
    # 3D, with difference_fsc: ... and only where in the map the two half-sets' differences
    # agree (a local correlation in a Gaussian window of this many times the differences'
    # resolution; class_differences.difference_weights). 0: off
    difference_window: float = 0.5
    # heterogeneous refinement (cryoSPARC's; `cryomap hetero_refine`): gold-standard
    # half-sets per class, each half aligned and classified against its own half's class
    # maps (as refinement), on refinement's sampling schedule from the first iteration
    heterogeneous: bool = False
    force_hard_class: bool = False  # hard class assignment in every iteration

    @property
    def consensus_first(self) -> bool:
        """Whether the poses are refined against one consensus map from the start."""
        return self.schedule == "consensus"

    @property
    def probes_classes(self) -> bool:
        """Whether the run starts classic and decides on its schedule when the classes form
        or do not ("adaptive")."""
        return (self.schedule == "adaptive" and self.ndim == 3 and not self.skip_align
                and not self.heterogeneous)

    @property
    def half_sets(self) -> bool:
        """Whether the particles are split into two half-sets with a map per class each."""
        return self.split_halves or self.heterogeneous

    @classmethod
    def defaults(cls, ndim: int = 3, heterogeneous: bool = False, **values) -> ClassOptions:
        """The options of class3d (ndim 3: the dataclass defaults), class2d (ndim 2:
        RELION's Class2D, 50 classes, T = 2, in-plane step 10°, no class temperature) or
        hetero_refine (heterogeneous: refinement's T = 1 for the gold-standard phase, plain EM
        over the classes, 20 iterations), with `values` over them: what the command line and
        the Python API start from."""
        base = ({} if ndim == 3 else {"n_classes": 50, "tau2_fudge": 2.0, "psi_step": 10.0,
                                      "class_temperature": 1.0, "schedule": "classic"})
        if heterogeneous:  # its own schedule (refinement's sampling, gold-standard phase)
            base = {"heterogeneous": True, "tau2_fudge": 1.0, "class_temperature": 1.0,
                    "iterations": 20, "schedule": "classic"}
        return cls(**{**base, "ndim": ndim, **values})

    def validate(self) -> None:
        """Every option in range (InputError naming the option and the range)."""
        super().validate()
        if self.iterations < 1:
            raise bad_option("iter", self.iterations, "at least 1 iteration")
        if self.n_classes < 1:
            raise bad_option("K", self.n_classes, "at least 1 class")
        if self.ndim not in (2, 3):
            raise bad_option("ndim", self.ndim, "2 or 3")
        if not (np.isfinite(self.perturbation) and self.perturbation >= 0):
            raise bad_option("init_perturbation", self.perturbation, "a strength >= 0")
        if self.subset_size is not None and self.subset_size < 1:
            raise bad_option("subset_size", self.subset_size, "at least 1 particle")
        if not (np.isfinite(self.reseed_fraction) and 0 <= self.reseed_fraction < 1):
            raise bad_option("reseed_fraction", self.reseed_fraction, "a fraction in [0, 1)")
        if not (np.isfinite(self.class_temperature) and self.class_temperature >= 1):
            raise bad_option("class_temperature", self.class_temperature, "a temperature >= 1")
        if not (np.isfinite(self.difference_fsc) and 0 <= self.difference_fsc < 1):
            raise bad_option("class_difference_fsc", self.difference_fsc,
                             "an FSC threshold in [0, 1) (0: off)")
        if not (np.isfinite(self.difference_fsc_fixed) and 0 < self.difference_fsc_fixed < 1):
            raise bad_option("class_difference_fsc_fixed", self.difference_fsc_fixed,
                             "an FSC threshold in (0, 1)")
        if not (np.isfinite(self.difference_window) and 0 <= self.difference_window <= 10):
            raise bad_option("class_difference_window", self.difference_window,
                             "a window in [0, 10] times the differences' resolution (0: off)")
        if self.schedule not in SCHEDULES:
            raise bad_option("schedule", self.schedule, " or ".join(SCHEDULES))
        if self.heterogeneous and (self.ndim != 3 or self.skip_align):
            raise bad_option("heterogeneous", self.heterogeneous,
                             "3D classes with alignment (not with --skip_align)")
        if self.highres_limit is not None and not (np.isfinite(self.highres_limit)
                                                   and self.highres_limit > 0):
            raise bad_option("strict_highres_exp", self.highres_limit, "a resolution > 0 Å")


@dataclass
class ClassIteration:
    """The figures of one classification iteration: run.log's line, the history."""

    iteration: int
    r_max: int  # px, the E-step's Fourier radius
    resolution_shell: int  # the best class's (SSNR 1, or FSC 0.143 with split halves)
    resolution: float  # Å, of resolution_shell
    class_resolution: list[float]  # Å, each class's
    difference_resolution: float | None  # Å, how far the classes may differ (the finest
    # class's; None: off)
    distribution: list[float]  # the class prior
    changed_fraction: float  # particles whose best class changed
    log_likelihood: float
    average_pmax: float
    mean_n_significant: float
    mean_samples: float  # final-level samples scored per image
    hard: bool
    reseeded: list  # (class, from class) pairs re-seeded this iteration
    seconds: float
    timings: dict[str, float]  # seconds by stage (`iteration.merge_timings`)
    message: str | None  # the schedule's line when the sampling changed
    stage: str  # the sampling, in words


@dataclass
class ClassState(EMState):
    """Everything a classification iteration needs and produces (saved every iteration)."""

    references: np.ndarray  # (K, N, N) images or (K, N, N, N) maps, real space
    distribution: np.ndarray  # (K,) class prior pi_k
    class_number: np.ndarray  # (n,) 0-based most probable class
    class_prob: np.ndarray  # (n, K) posterior class probabilities (as used in the M-step)
    offset_sigma: float  # px
    class_tau2: np.ndarray | None = None  # (K, N//2+1)
    class_ssnr: np.ndarray | None = None  # (K, N//2+1)
    class_resolution_shell: np.ndarray | None = None  # (K,)
    # (n,) the class each image is restricted to in the next iteration (-1: free), or None
    assigned: np.ndarray | None = None
    subset: np.ndarray | None = None  # (n,) 1 or 2 with half-sets
    half_references: np.ndarray | None = None  # (2, K, ...) the half-sets' class maps
    # (2, K, ...) float32, the unfiltered half maps (D/W) whose FSC is class_fsc
    half_unfiltered: np.ndarray | None = None
    class_fsc: np.ndarray | None = None  # (K, N//2+1) half-set FSC per class
    schedule: AutoSampling | None = None  # with the consensus schedule
    # with the consensus schedule: the iteration after which the classes were seeded (None:
    # not yet; 0 where they are seeded from the start and their poses searched per class:
    # heterogeneous refinement, the adaptive schedule's formed classes), and whether the
    # fixed-pose phase that follows the seeding is over
    seeded_at: int | None = None
    fixed_done: bool = False
    # the adaptive schedule: whether its classic start is over, and the iteration after which
    # the consensus schedule took over (None: it did not; 0 with "consensus" from the start)
    probe_done: bool = False
    consensus_from: int | None = None
    # (K,) the Fourier shell up to which each class may differ from the consensus
    # (limit_differences); None: no limit
    difference_shell: np.ndarray | None = None
    # heterogeneous refinement: the iteration after which each half-set met only its own
    # half's class maps (None: not yet; until then both halves meet the joined class maps)
    halves_split_at: int | None = None
    # (K, ...) the class maps the E-step at fixed poses (and in the local searches per class
    # after them) compares the particles with: the references' differences weighted by where
    # they are supported
    # (ClassOptions.difference_window); None: the references
    localised: np.ndarray | None = None
    history: list[ClassIteration] = field(default_factory=list)

    @property
    def n_classes(self) -> int:
        return int(self.references.shape[0])

    @property
    def e_step_references(self) -> np.ndarray:
        """(K, ...) the class maps the next E-step at fixed poses (or in the local searches
        per class after them) compares the particles with."""
        return self.references if self.localised is None else self.localised

    @classmethod
    def from_saved(cls, values: dict) -> ClassState:
        values = dict(values, history=[ClassIteration(**h) for h in values.get("history", [])])
        if values.get("schedule") is not None:
            values["schedule"] = AutoSampling(**values["schedule"])
        return state_from_saved(cls, values,
                                ints=("iteration", "r_max", "seeded_at", "halves_split_at",
                                      "consensus_from"),
                                floats=("offset_sigma",))


def initial_state(source: ImageSource, options: ClassOptions, references: np.ndarray,
                  angles: np.ndarray, origins_px: np.ndarray,
                  seed_class: np.ndarray | None = None,
                  subset: np.ndarray | None = None) -> ClassState:
    """Uniform class prior, the given references, poses from the input; `seed_class` (n,) is
    each image's class in the first iteration (None: marginalised from the start); `subset`
    (n,) 1/2 the half-sets (with `ClassOptions.half_sets`)."""
    n, k = angles.shape[0], references.shape[0]
    noise = NoiseModel.from_images(source, options.noise_model == "pixel")
    halves = options.half_sets
    if halves and subset is None:
        raise ValueError("initial_state: half-set classes need the half-sets")
    schedule = None
    if (options.consensus_first or options.heterogeneous) and options.ndim == 3 \
            and not options.skip_align:
        schedule = starting_schedule(options)
    # heterogeneous refinement: no consensus phase and no fixed-pose phase, the classes'
    # poses are searched from the first iteration
    hetero = options.heterogeneous
    return ClassState(
        schedule=schedule, seeded_at=0 if hetero else None, fixed_done=hetero,
        probe_done=not options.probes_classes or k == 1,
        consensus_from=0 if schedule is not None and not hetero else None,
        difference_shell=np.full(k, int(np.ceil(source.box * source.pixel_size
                                                / options.ini_high)), np.int64)
        if difference_limited(options, k) else None,
        subset=np.asarray(subset, np.int64) if halves else None,
        half_references=np.stack([references, references]).astype(np.float64)
        if halves else None,
        iteration=0, references=np.asarray(references, np.float64),
        distribution=np.full(k, 1.0 / k), sigma2=noise.sigma2,
        r_max=initial_r_max(source.box, source.pixel_size, options),
        angles=np.array(angles, np.float64), origins_px=np.array(origins_px, np.float64),
        class_number=np.zeros(n, np.int64), class_prob=np.full((n, k), 1.0 / k),
        max_prob=np.zeros(n), n_significant=np.zeros(n, np.int64), log_likelihood=np.zeros(n),
        amplitude=np.ones(n), offset_sigma=options.offset_sigma / source.pixel_size,
        assigned=None if seed_class is None or k == 1 else np.asarray(seed_class, np.int64))


def next_radius(resolution_shell_index: int, box: int, pixel_size: float,
                options: ClassOptions) -> int:
    """The next iteration's Fourier radius: RELION's rule below N/2 - 1 and below
    --strict_highres_exp."""
    r = min(next_r_max(resolution_shell_index, box, options.incr_size), box // 2 - 1)
    if options.highres_limit is not None:
        r = min(r, max(1, int(box * pixel_size / options.highres_limit)))
    return r


def initial_r_max(box: int, pixel_size: float, options: ClassOptions) -> int:
    """First iteration's radius from --ini_high, as refinement."""
    return next_radius(int(np.ceil(box * pixel_size / options.ini_high)), box, pixel_size,
                       options)


def equal_split(n: int, n_classes: int, rng: np.random.Generator) -> np.ndarray:
    """A random class per image, (n,) 0-based, the classes equally large (+-1): RELION's
    divide_equally over a random order."""
    return (np.arange(n) * n_classes // n)[rng.permutation(n)]


def reference_tau2(reference: projector.Reference, n_shells: int) -> np.ndarray:
    """tau2 per shell of a prepared reference: shell mean of |F|^2 / 2 on its padded grid
    (RELION computes it with the projector, from the same padded, gridding-corrected FT)."""
    shells = projector.padded_shells(reference.data.shape, reference.pad)
    return projector.shell_mean_sums(np.abs(reference.data.astype(np.complex128)) ** 2 / 2.0,
                                     shells, n_shells)


def class_ssnr(bp: projector.BackProjector, tau2: np.ndarray, tau2_fudge: float,
               r_max: int) -> np.ndarray:
    """SSNR per shell of a class: the shell mean of W / (1 / (p^d T tau2)), 0 beyond r_max
    (RELION's data_vs_prior)."""
    shells = bp.shells()
    t2 = tau2[np.minimum(shells, tau2.size - 1)]
    ratio = bp.weight.astype(np.float64) * bp.pad**bp.ndim * tau2_fudge * t2
    n = bp.box // 2 + 1
    out = projector.shell_mean_sums(ratio, np.where(shells <= r_max, shells, n + 1), n)
    out[r_max + 1:] = 0.0
    return out


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
    return translate_image(image, center_of_mass_shift(image))


def translate_image(image: np.ndarray, shift: np.ndarray) -> np.ndarray:
    """A 2D image moved by -shift (x, y) px (Fourier interpolation)."""
    n = image.shape[0]
    sx, sy = shift
    ky, kx = fourier.half_plane_freqs(n)
    ft = fourier.fft2_centered(image) * np.exp(2j * np.pi * (kx * sx + ky * sy) / n)
    return fourier.ifft2_centered(ft, n)


def temperature(options: ClassOptions, iteration: int, start: int = 0) -> float:
    """The class temperature of an iteration (1-based): class_temperature at the first
    iteration after `start` (the seeding), falling geometrically to 1 over half of the
    iterations left after it, 1 after."""
    t0 = options.class_temperature
    span = max(1, (options.iterations - start) // 2)
    iteration -= start
    if t0 <= 1.0 or iteration > span:
        return 1.0
    return float(t0 ** (1.0 - (iteration - 1) / span))


def class_search(options: ClassOptions, iteration: int, radius: int, diameter: float,
                 hard: bool = False, offset_sigma: float | None = None,
                 class_prior: np.ndarray | None = None,
                 image_class: np.ndarray | None = None,
                 schedule: AutoSampling | None = None, fixed_poses: bool = False,
                 seeded_at: int = 0) -> Search:
    """The engine's search of an iteration (1-based): the grid perturbed by a seeded draw,
    the schedule's when there is one; `fixed_poses`: the input poses only (skip_align, or
    the fixed-pose phase after the seeding)."""
    if schedule is not None:
        sampling, levels = schedule.sampling(options, iteration)
        local = schedule.sigma_ang
    else:
        rng = np.random.default_rng([options.seed, iteration, 1])
        sampling = PoseSampling.create(options.ndim, options.healpix_order, options.psi_step,
                                       options.offset_step, options.offset_range,
                                       options.perturb, rng, symmetry=options.sym)
        levels, local = options.oversampling, options.sigma_ang
    return Search(sampling, levels, radius, diameter, local_sigma=local,
                  fixed_poses=options.skip_align or fixed_poses, offset_sigma=offset_sigma,
                  class_prior=class_prior, adaptive_fraction=options.adaptive_fraction,
                  force_max=options.force_max, hard_class=hard, image_class=image_class,
                  class_temperature=temperature(options, iteration, seeded_at))


@dataclass
class _ClassStep:
    """One class iteration's mode and fixed inputs (`class_iteration`)."""

    state: ClassState
    source: ImageSource
    options: ClassOptions
    search: Search
    noise: NoiseModel
    sphere: np.ndarray  # the particle mask the references are multiplied by
    radius: int  # the E-step's Fourier radius (px)
    recon: int  # the M-step sums' and maps' (px): beyond radius in the gold-standard phase
    mask_radius: float  # px
    consensus: bool  # poses refined against one map, every class's (before seeding)
    fixed: bool  # the fixed-pose phase of the sampling schedule
    localised: bool  # the E-step compares with the localised class maps (e_step_references)
    previous: np.ndarray  # (n, 3, 3) rotations at the start of the iteration
    batch: int
    progress: object = None


def _class_step(state: ClassState, source: ImageSource, o: ClassOptions, hard: bool,
                progress) -> _ClassStep:
    box, pix = source.box, source.pixel_size
    k_cls = state.n_classes
    mask_radius = mask_radius_px(o, box, pix)
    # with the sampling schedule, the poses are refined against one consensus map (every
    # class's) until the searches are local; only then are the classes seeded and told apart
    consensus = state.schedule is not None and state.seeded_at is None and k_cls > 1
    # then the classes are told apart at the consensus poses (classification without
    # alignment, near the Bayes limit at true poses: docs/method.md) until the assignments
    # settle, and only then are each class's poses searched again
    fixed = (state.schedule is not None and state.seeded_at is not None
             and not state.fixed_done)
    search = class_search(o, state.iteration + 1, state.r_max, 2.0 * mask_radius * pix, hard,
                          state.offset_sigma,
                          np.ones(1) if consensus else state.distribution,
                          None if consensus else state.assigned, state.schedule,
                          fixed_poses=fixed, seeded_at=state.seeded_at or 0)
    if not consensus:
        state.assigned = None
    recon = state.r_max
    if gold_standard_phase(state, o):  # the FSC measured beyond the E-step, as refinement's
        recon = recon_radius(state.r_max, box)
        search = dataclasses.replace(search, recon_radius=recon)
    return _ClassStep(state, source, o, search, NoiseModel(state.sigma2, o.noise_model == "pixel"),
                      soft_sphere(box, mask_radius, o.mask_edge, o.ndim), state.r_max, recon,
                      mask_radius, consensus, fixed,
                      search.fixed_poses or local_per_class(state), rotations(state.angles),
                      batch_size(search, k_cls, o.batch_memory), progress)


def _class_passes(step: _ClassStep) -> list[tuple[PassResult, list[projector.Reference]]]:
    """The E-step: one pass per group of particles with the references it is compared with
    (with half-sets: each half with its own or the other half's maps); estimates into the
    state."""
    state, o, n = step.state, step.options, step.state.angles.shape[0]

    def prepare(maps: np.ndarray) -> list[projector.Reference]:
        return [projector.prepare_reference(r * step.sphere, o.pad, o.interp, step.radius)
                for r in maps]

    if step.consensus:
        passes = [(np.arange(n), prepare(state.references[:1]))]
    elif o.heterogeneous and not gold_standard_phase(state, o):  # the classes form, joined
        refs = prepare(state.references)
        passes = [(np.flatnonzero(state.subset == h), refs) for h in (1, 2)]
    elif state.half_references is not None:
        # half h against its own half's maps (heterogeneous refinement: the gold standard)
        # or the other half's (--split_halves: no image meets a map it is in)
        own = o.heterogeneous
        passes = [(np.flatnonzero(state.subset == h),
                   prepare(state.half_references[h - 1 if own else 2 - h])) for h in (1, 2)]
    else:
        refs = prepare(state.e_step_references if step.localised else state.references)
        if state.difference_shell is not None:  # two half-sets for the differences' FSC
            halves = difference_halves(n, o.seed)
            passes = [(np.flatnonzero(halves == h), refs) for h in (1, 2)]
        else:
            passes = [(np.arange(n), refs)]
    results = []
    for members, refs in passes:
        res = step.source.ranks.run_pass(
            step.source, members, refs, step.search, step.noise, step.previous[members],
            state.origins_px[members], batch_size=step.batch, slice_memory=o.batch_memory,
            progress=step.progress,
            amplitudes=iteration.pass_amplitudes(state, members, o.scale))
        store_estimates(state, members, res.estimates)
        if not step.consensus:
            state.class_prob[members] = res.estimates.class_prob
            state.class_number[members] = res.estimates.best_class
        results.append((res, refs))
    if o.scale:
        iteration.normalise_amplitudes(state)
    return results


def _consensus_map(step: _ClassStep, results, edge: np.ndarray, n_shells: int):
    """M-step before the classes are seeded: one map, every class's."""
    state, o, k_cls = step.state, step.options, step.state.n_classes
    bp, ref = results[0][0].backprojectors[0], results[0][1][0]
    t2 = reference_tau2(ref, n_shells)
    state.references[:] = bp.reconstruct(t2, o.tau2_fudge, step.radius, MINRES_MAP) * edge
    state.localised = None
    if state.half_references is not None:
        state.half_references[:] = state.references[None]
    tau2 = np.repeat(t2[None], k_cls, axis=0)
    ssnr = np.repeat(class_ssnr(bp, t2, o.tau2_fudge, step.radius)[None], k_cls, axis=0)
    return tau2, ssnr, np.maximum([resolution_shell(x, 1.0) for x in ssnr], 1)


def _class_maps(step: _ClassStep, results, edge: np.ndarray, n_shells: int,
                tau2_fudge: float | None = None):
    """M-step of RELION's classification: each class's map with tau2 from its power
    (`tau2_fudge`, the options' when None); the differences from the consensus limited to
    where they are supported."""
    state, o, radius = step.state, step.options, step.radius
    fudge = o.tau2_fudge if tau2_fudge is None else tau2_fudge
    refs = results[0][1]
    half_bps = [r.backprojectors for r, _ in results]
    bps = [projector.BackProjector.pooled(list(group)) for group in zip(*half_bps, strict=True)]
    tau2 = np.array([reference_tau2(r, n_shells) for r in refs])
    ssnr = np.zeros((state.n_classes, n_shells))
    for k, bp in enumerate(bps):
        image = bp.reconstruct(tau2[k], fudge, radius, MINRES_MAP) * edge
        if o.center_classes and o.ndim == 2:
            image = center_image(image)
        state.references[k] = image
        ssnr[k] = class_ssnr(bp, tau2[k], fudge, radius)
    shells = np.maximum([resolution_shell(s, 1.0) for s in ssnr], 1)
    if state.difference_shell is not None:
        # per class at the lower threshold where the maps are localised, one for all else
        state.difference_shell = extend_difference_shells(
            state.difference_shell, difference_fsc(half_bps, n_shells),
            o.difference_fsc_fixed if step.localised else o.difference_fsc, radius,
            per_class=step.localised)
        consensus_map = projector.BackProjector.pooled(bps).reconstruct(
            state.distribution @ tau2, fudge, radius, MINRES_MAP) * edge
        # the sharp Fourier edge rings: keep the maps inside the same sphere
        state.references[:] = limit_differences(state.references, consensus_map,
                                                state.difference_shell) * edge
        state.localised = None
        if o.difference_window > 0 and step.localised:
            # the E-step's maps at fixed poses and in the local searches after them: the
            # differences only where the halves agree (not where poses are searched from a
            # coarse grid: a class map shrunk towards the consensus there aligns its particles
            # worse; measured on tests/test_class3d.py's headless class: correlation with its
            # truth 0.958 against 0.978)
            weights = difference_weights(half_bps, tau2, fudge, state.distribution,
                                         state.difference_shell, o.difference_window,
                                         MINRES_MAP)
            state.localised = (consensus_map + (state.references - consensus_map) * weights
                               ).astype(np.float32)  # saved with the state: half the size
    return tau2, ssnr, shells


def _class_m_step(step: _ClassStep, results) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """σ², the origin prior, the class distribution and the maps (updates the state);
    returns tau2, SSNR and the resolution shell of each class."""
    state, o = step.state, step.options
    box, pix = step.source.box, step.source.pixel_size
    n = state.angles.shape[0]
    mask = fourier.pixel_mask(box, step.recon)
    step.noise.update(sum(r.residual for r, _ in results), sum(r.count for r, _ in results),
                      mask, max_shell=step.radius)
    state.sigma2 = step.noise.sigma2
    if not (o.skip_align or step.fixed):
        state.offset_sigma = offset_sigma(sum(r.offset_sq for r, _ in results), n, pix)
    mass = sum(r.class_mass for r, _ in results)
    if not step.consensus:
        state.distribution = mass / max(mass.sum(), 1e-300)
    edge = soft_sphere(box, box / 2.0 - 1.0, 1.0, o.ndim)
    n_shells = box // 2 + 1
    if step.consensus:
        tau2, ssnr, shells = _consensus_map(step, results, edge, n_shells)
    elif o.heterogeneous and not gold_standard_phase(state, o):  # classes form as class3d's
        tau2, ssnr, shells = _class_maps(step, results, edge, n_shells, JOINED_TAU2_FUDGE)
    elif state.half_references is not None:
        tau2, ssnr, fsc_k = _gold_standard_maps(state, [r for r, _ in results], o, step.recon,
                                                box, edge)
        state.class_fsc = fsc_k
        shells = np.maximum([resolution_shell(f, 0.143) for f in fsc_k], 1)
    else:
        tau2, ssnr, shells = _class_maps(step, results, edge, n_shells)
    state.class_tau2, state.class_ssnr = tau2, ssnr
    state.class_resolution_shell = shells
    return tau2, ssnr, shells


def _schedule_step(step: _ClassStep, changed: float, previous_origins: np.ndarray,
                   best: int) -> str | None:
    """The sampling schedule after an iteration: finer sampling, the classes seeded once the
    consensus poses are good, the poses searched per class once the classes settled."""
    state, o, n = step.state, step.options, step.state.angles.shape[0]
    pix = step.source.pixel_size
    message = None
    orientation_change = float(np.mean(pose_change(step.previous, rotations(state.angles),
                                                   o.sym)))
    offset_change = float(np.sqrt(np.mean((state.origins_px - previous_origins) ** 2)))
    if not step.fixed:  # the sampling stays as it is while the poses are fixed
        acc_rot, acc_trans = class_pose_accuracy(state, step.source, o, step.radius,
                                                 step.noise, step.sphere)
        message = state.schedule.update(best, orientation_change, offset_change, acc_rot,
                                        acc_trans, o, pix, step.mask_radius)
    start = state.consensus_from or 0
    share = ALIGN_SHARE if o.probes_classes else CONSENSUS_SHARE
    # poses good enough to seed the classes: local searches (after the adaptive start: the
    # consensus converged, as an auto-refine would stop), or the phase's share is over
    ready = state.schedule.converged if o.probes_classes else state.schedule.local
    if step.consensus and (ready or state.iteration - start
                           >= max(1, int(share * (o.iterations - start)))):
        state.assigned = equal_split(n, state.n_classes, np.random.default_rng(
            [o.seed, state.iteration, 3]))
        state.seeded_at = state.iteration
        message = (message or "") + "; classes seeded (random equal split), poses fixed"
    elif o.heterogeneous and state.halves_split_at is None and classes_formed(
            state, o, changed):
        message = (message or "") + split_half_maps(state, o, step.source.pixel_size)
    elif step.fixed and fixed_phase_over(state, o, changed):
        state.fixed_done = True
        if o.probes_classes:  # the consensus's last sampling, per class (local_per_class)
            message = (message or "") + (f"; after {FIXED_MIN} iterations at the consensus "
                                         "poses, each class's poses searched locally around "
                                         "them")
        else:
            # each class's poses searched again from the coarse grid: a class unlike the
            # consensus (a large piece missing) may have been aligned wrongly to it
            state.schedule = starting_schedule(o)
            message = (message or "") + ("; classes settled: poses searched per class from "
                                         "the starting sampling")
    return message


def class_iteration(state: ClassState, source: ImageSource, options: ClassOptions,
                    hard: bool = False, progress=None) -> ClassIteration:
    """One EM iteration over all particles and classes; updates `state` in place and returns
    the iteration's figures.

    With split_halves, each half-set's particles are classified against the other half's
    class maps (so no particle is compared with a map it contributed to); in heterogeneous
    refinement against their own half's (the gold standard: the two halves never meet). With
    either, each class map is regularised by the FSC of its two half maps, as refinement
    regularises its map (tau2 from the FSC); otherwise by RELION's classification prior (tau2
    from the map's power)."""
    o = options
    t_start = time.perf_counter()
    box, pix = source.box, source.pixel_size
    step = _class_step(state, source, o, hard, progress)
    previous_class = state.class_number.copy()
    previous_origins = state.origins_px.copy()
    # at fixed poses (--skip_align, or the fixed-pose phase) a pass is cheap (one pose per
    # image), so an iteration runs up to FIXED_INNER of them: EM from random seeds needs many
    # passes to settle
    for inner in range(FIXED_INNER if step.fixed or (o.skip_align and state.n_classes > 1)
                       else 1):
        before = state.class_number.copy()
        if inner:  # the seeds' restriction holds for the first pass only
            step.search = dataclasses.replace(step.search, image_class=None,
                                              class_prior=state.distribution)
        results = _class_passes(step)
        t_pass = time.perf_counter()
        tau2, ssnr, shells = _class_m_step(step, results)
        if inner and float(np.mean(before != state.class_number)) < FIXED_SETTLED:
            break
    # the next radius from the best class's SSNR 1 shell, or in heterogeneous refinement's
    # gold-standard phase from its FSC 0.143 shell, as refinement's
    best = int(shells.max() if gold_standard_phase(state, o)
               else np.maximum([resolution_shell(s, 1.0) for s in ssnr], 1).max())
    state.iteration += 1
    state.r_max = next_radius(best, box, pix, o)
    changed = float(np.mean(previous_class != state.class_number))  # fraction of the images
    message = None if state.schedule is None else _schedule_step(
        step, changed, previous_origins, best)
    if not state.probe_done:
        message = probe_step(state, o, changed)
    reseeded = [] if hard or state.iteration > o.iterations // 2 else reseed_empty_classes(
        state, o, np.random.default_rng([o.seed, state.iteration]))
    timings = merge_timings((r for r, _ in results), time.perf_counter() - t_pass)
    samples = np.concatenate([r.estimates.n_samples for r, _ in results])
    stats = ClassIteration(
        iteration=state.iteration, r_max=int(step.radius),
        resolution_shell=int(shells.max()), resolution=float(box * pix / shells.max()),
        class_resolution=[float(box * pix / s) for s in shells],
        difference_resolution=None if state.difference_shell is None
        else float(box * pix / max(int(state.difference_shell.max()), 1)),
        distribution=[float(d) for d in state.distribution],
        changed_fraction=changed if state.iteration > 1 else 1.0,
        log_likelihood=float(state.log_likelihood.sum()),
        average_pmax=float(state.max_prob.mean()),
        mean_n_significant=float(state.n_significant.mean()),
        mean_samples=float(samples.mean()), hard=bool(hard), reseeded=reseeded,
        seconds=time.perf_counter() - t_start, timings=timings, message=message,
        stage=_stage(step.search) + (", consensus" if step.consensus else ""))
    state.history.append(stats)
    return stats


def difference_limited(options: ClassOptions, n_classes: int) -> bool:
    """Whether the classes' differences are limited in resolution (limit_differences):
    3D, more than one class, not with half-sets (their FSC regularises each class)."""
    return (options.ndim == 3 and n_classes > 1 and options.difference_fsc > 0
            and (options.heterogeneous or not options.half_sets))


def difference_halves(n: int, seed: int) -> np.ndarray:
    """(n,) 1/2: the fixed random half-sets whose class sums give the differences' FSC."""
    return equal_split(n, 2, np.random.default_rng([seed, 43])) + 1


def _stage(search: Search) -> str:
    """The sampling of a search, for the log."""
    s = search.sampling
    if s.ndim == 2:
        return f"psi step {s.angular_step(search.levels):.2f} deg"
    kind = ("fixed poses" if search.fixed_poses else
            f"local (sigma {search.local_sigma:.2f} deg)" if search.local_sigma is not None
            else "global")
    return (f"order {s.healpix_order}+{search.levels} ({s.angular_step(search.levels):.2f} "
            f"deg), offsets {s.offset_step:.2f} px in {s.offset_range:.2f} px, {kind}")


def class_pose_accuracy(state: ClassState, source: ImageSource, options: ClassOptions,
                        radius: int, noise: NoiseModel, sphere: np.ndarray,
                        n_images: int = 200) -> tuple[float, float]:
    """RELION's expected pose accuracies (degrees, px) of up to n_images particles of the
    largest class against its map (see em/accuracy.py)."""
    rng = np.random.default_rng([options.seed, state.iteration, 29])
    k = int(np.argmax(state.distribution))
    members = np.flatnonzero(state.class_number == k)
    if members.size == 0:
        return 999.0, 999.0
    pick = np.sort(rng.choice(members, min(n_images, members.size), replace=False))
    ref = projector.prepare_reference(state.references[k] * sphere, options.pad,
                                      options.interp, radius)
    rot = euler_to_matrix(state.angles[pick, 0], state.angles[pick, 1], state.angles[pick, 2])
    return source.ranks.expected_accuracy(ref, source, pick, rot, noise, radius, rng)


def _gold_standard_maps(state: ClassState, results, o: ClassOptions, radius: int, box: int,
                        edge: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per class: the half-set FSC, tau2 from it (as refinement), both half maps and the map
    from both halves together (the joined-halves rule). Returns (tau2, SSNR, FSC), each
    (K, N//2+1)."""
    from .refine import final_maps, gold_standard

    k_cls = state.n_classes
    n_shells = box // 2 + 1
    tau2, ssnr, curves = (np.zeros((k_cls, n_shells)) for _ in range(3))
    if state.half_unfiltered is None:
        state.half_unfiltered = np.zeros(state.half_references.shape, np.float32)
    for k in range(k_cls):
        bps = [results[0].backprojectors[k], results[1].backprojectors[k]]
        gold = gold_standard(bps, o, radius, box)
        curves[k], tau2[k] = gold.fsc, gold.tau2
        halves = [bps[h].reconstruct(tau2[k], o.tau2_fudge, radius) * edge for h in (0, 1)]
        combined = final_maps(bps, curves[k], o, radius, box, halves=False)[0]
        if o.center_classes and o.ndim == 2:  # the same move for the halves and the whole
            shift = center_of_mass_shift(combined)
            halves = [translate_image(m, shift) for m in halves]
            combined = translate_image(combined, shift)
        state.half_references[:, k] = halves
        state.half_unfiltered[:, k] = gold.halves
        state.references[k] = combined
        ssnr[k] = ssnr_from_fsc(curves[k], o.tau2_fudge)
        ssnr[k][radius + 1:] = 0.0
    return tau2, ssnr, curves


def reseed_empty_classes(state: ClassState, options: ClassOptions,
                         rng: np.random.Generator) -> list[tuple[int, int]]:
    """Give every class holding less than reseed_fraction/K of the images half of the largest
    remaining class: it takes that class's reference, and each image of the class is restricted
    to one of the two (random halves) in the next iteration, as in the first. Without this a
    class that loses its images early stays empty for good: the more images a class has, the
    less its average is shrunk by the prior, and the better it fits every image. Returns the
    (re-seeded, split) class pairs."""
    k_cls = state.n_classes
    if k_cls < 2 or options.reseed_fraction <= 0:
        return []
    empty = [int(k) for k in np.argsort(state.distribution)
             if state.distribution[k] < options.reseed_fraction / k_cls]
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
        if state.localised is not None:
            state.localised[k] = state.localised[big]
        if state.half_references is not None:
            state.half_references[:, k] = state.half_references[:, big]
        dist[k] = dist[big] = dist[big] / 2.0
        used.add(big)
        pairs.append((k, big))
    if pairs:
        state.distribution = dist / dist.sum()
        state.assigned = assigned
    return pairs
