"""Ab-initio initial model: K maps from particle images alone, by stochastic (online) EM on
the MAP objective of refinement and classification (docs/initial_model.md).

Start: for each class, a reconstruction of a random subset of particles at random poses (a
featureless blob of the right size and scale) plus a random low-passed perturbation, so that
the classes differ and no start is symmetric.

Each iteration t (a mini-batch, RELION's VDAM and cryoSPARC's ab-initio schedule):

1. a random mini-batch of B_t particles goes through one engine pass (`engine.run_pass`):
   posteriors over class x orientation x translation on a global HEALPix grid with adaptive
   oversampling, at the Fourier radius of this iteration's resolution;
2. its M-step sums (D = sum g CTF X / sigma2, W = sum g CTF^2 / sigma2, per class and per
   pseudo half-set) update running sums with exponential forgetting:
   S <- (1 - eta_t) S + S_batch (online EM: the running sums stand for the last ~B/eta
   particles, each summed against the map of its time);
3. the maps are the MAP reconstruction of the running sums with RELION's tau2 rule
   (`BackProjector.reconstruct`), tau2 from the FSC of the two pseudo half-sets (random halves
   of the particles, aligned against the same map: RELION's grad_pseudo_halfsets) times
   --tau2_fudge; sigma2 and the class distribution follow the same forgetting;
   translations are searched (flat prior) around each particle's input origin;
4. each map is moved to its centre of mass (the sums with it), since nothing else fixes
   the position of a map made from nothing.

The resolution grows from --ini_high to --grad_fin_resol and the batch from
--grad_ini_subset to --grad_fin_subset over the middle of the run (RELION's ini/fin
fractions), while the forgetting eta falls from --grad_ini_stepsize to --grad_stepsize;
the HEALPix order follows the resolution. The last iteration is a plain EM iteration over
all particles (every particle's pose and class against the final maps, and the maps from all
of them).

Why online EM on the sums rather than a gradient step on the map: the M-step stays the exact
MAP reconstruction of refinement (the tau2 prior enters as it does there), the step size is a
forgetting factor on data (no scale to tune against the map's units), and the map at every
step is the regularised average of the recent particles, not a blend of noisy averages.
Handedness cannot be told from projections: the map is right- or left-handed by chance
(`flip_hand`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from .. import fourier, projector
from ..masks import soft_sphere
from ..resolution import resolution_shell
from ..sampling import PoseSampling, angular_step
from .classify import center_of_mass_shift
from .data import Work
from .engine import PassResult
from .iteration import (
    EMState,
    merge_timings,
    normalise_amplitudes,
    pass_amplitudes,
    store_estimates,
)
from .memory import batch_size
from .model import state_from_saved
from .noise import NoiseModel
from .options import MAX_HEALPIX_ORDER, EMOptions, bad_option
from .refine import final_maps, half_set_fsc, mask_radius_px
from .search import Search


@dataclass
class InitialModelOptions(EMOptions):
    """Options of an ab-initio run: the shared E/M ones with RELION's initial-model defaults
    (--healpix_order 1, --offset_range 6, --offset_step 2, --tau2_fudge 4) and the schedule's
    (RELION's --grad_* names)."""

    healpix_order: int = 1
    offset_range: float = 6.0
    offset_step: float = 2.0
    tau2_fudge: float = 4.0
    ini_high: float = 35.0  # Å: resolution of the first phase (RELION's --grad_ini_resol)
    iterations: int = 100  # --iter: mini-batches, the final full iteration included
    n_classes: int = 1  # --K
    # Å: resolution of the last phase (RELION's --grad_fin_resol); None: 18 Å, or the finest
    # the box holds if that is coarser (`for_box`)
    fin_high: float | None = None
    ini_subset: int | None = None  # --grad_ini_subset (None: RELION's rule from n)
    fin_subset: int | None = None  # --grad_fin_subset (None: RELION's rule from n)
    ini_frac: float = 0.3  # --grad_ini_frac: share of iterations at the initial settings
    fin_frac: float = 0.2  # --grad_fin_frac: share at the final settings
    ini_stepsize: float = 0.9  # --grad_ini_stepsize: forgetting eta of the first phase
    stepsize: float = 0.5  # --grad_stepsize: forgetting eta of the last phase
    perturbation: float = 1.0  # start: random perturbation, in units of the blob's std
    # a class holding less than reseed_fraction/K of the mass in the first half of the run
    # takes half of the largest class's sums and particles (0: never)
    reseed_fraction: float = 0.2
    # amplitude correction off by default: the early maps are blobs that measure no
    # particle's contrast (cryoSPARC's ab-initio has none either); --scale turns it on
    scale: bool = False

    def validate(self) -> None:
        """Every option in range (InputError naming the option and the range)."""
        super().validate()
        if self.iterations < 2:
            raise bad_option("iter", self.iterations, "at least 2 iterations (mini-batches and "
                                                      "the final full one)")
        if self.n_classes < 1:
            raise bad_option("K", self.n_classes, "at least 1 class")
        if self.fin_high is None:
            pass
        elif not (np.isfinite(self.fin_high) and self.fin_high > 0):
            raise bad_option("grad_fin_resol", self.fin_high, "a resolution > 0 Å")
        elif self.fin_high > self.ini_high:
            raise bad_option("grad_fin_resol", self.fin_high,
                             f"a resolution <= --ini_high ({self.ini_high:g} Å)")
        for name, value in (("grad_ini_subset", self.ini_subset),
                            ("grad_fin_subset", self.fin_subset)):
            if value is not None and value < 1:
                raise bad_option(name, value, "at least 1 particle")
        if self.ini_subset is not None and self.fin_subset is not None \
                and self.fin_subset < self.ini_subset:
            raise bad_option("grad_fin_subset", self.fin_subset,
                             f"at least --grad_ini_subset ({self.ini_subset})")
        for name, value in (("grad_ini_frac", self.ini_frac), ("grad_fin_frac", self.fin_frac)):
            if not (np.isfinite(value) and 0 <= value < 1):
                raise bad_option(name, value, "a fraction in [0, 1)")
        if not self.ini_frac + self.fin_frac <= 1:
            raise bad_option("grad_fin_frac", self.fin_frac,
                             f"a fraction <= 1 - --grad_ini_frac ({1 - self.ini_frac:g})")
        for name, value in (("grad_ini_stepsize", self.ini_stepsize),
                            ("grad_stepsize", self.stepsize)):
            if not (np.isfinite(value) and 0 < value <= 1):
                raise bad_option(name, value, "a step size in (0, 1]")
        if not (np.isfinite(self.perturbation) and self.perturbation >= 0):
            raise bad_option("init_perturbation", self.perturbation, "a strength >= 0")
        if not (np.isfinite(self.reseed_fraction) and 0 <= self.reseed_fraction < 1):
            raise bad_option("reseed_fraction", self.reseed_fraction, "a fraction in [0, 1)")

    @staticmethod
    def finest(box: int, pixel_size: float) -> float:
        """The finest resolution (Å) a schedule may reach in this box: Nyquist less one
        shell."""
        return 2.0 * pixel_size * (box / 2) / (box / 2 - 1)

    def for_box(self, box: int, pixel_size: float) -> InitialModelOptions:
        """These options with the default final resolution made concrete: 18 Å, or the finest
        the box holds (and at most --ini_high)."""
        from dataclasses import replace

        if self.fin_high is not None:
            return self
        fin = min(max(18.0, self.finest(box, pixel_size)), self.ini_high)
        return replace(self, fin_high=float(fin))

    def validate_for(self, box: int, pixel_size: float) -> None:
        """The particle-dependent checks of every E/M run, and resolutions the box holds."""
        super().validate_for(box, pixel_size)
        nyquist = 2.0 * pixel_size
        for name, value in (("ini_high", self.ini_high), ("grad_fin_resol", self.fin_high)):
            if value is not None and value < nyquist * (box / 2) / (box / 2 - 1):
                raise bad_option(name, f"{value:g}", f"a resolution >= "
                                 f"{nyquist * (box / 2) / (box / 2 - 1):.3g} Å (the box's "
                                 f"Nyquist frequency, {nyquist:g} Å, less one shell)")

    def subset_sizes(self, n_particles: int) -> tuple[int, int]:
        """(initial, final) mini-batch sizes: the options', else RELION's initial-model rule
        (0.5 % and 10 % of the particles, at least 200 and 1000, at most 5000 and 50000);
        never more than the particles."""
        ini = self.ini_subset if self.ini_subset is not None else int(
            max(min(0.005 * n_particles, 5000), 200))
        fin = self.fin_subset if self.fin_subset is not None else int(
            max(min(0.1 * n_particles, 50000), 1000))
        return min(ini, n_particles), min(max(fin, ini), n_particles)


@dataclass
class Step:
    """What the schedule prescribes for one mini-batch iteration."""

    batch: int  # particles in the mini-batch
    resolution: float  # Å
    radius: int  # Fourier radius (px)
    eta: float  # forgetting: share of the running sums replaced
    healpix_order: int  # level-0 HEALPix order
    final: bool  # the last iteration: all particles, plain EM


def schedule(options: InitialModelOptions, n_particles: int, box: int, pixel_size: float,
             diameter: float, iteration: int) -> Step:
    """The settings of iteration `iteration` (1-based): the initial ones for the first
    --grad_ini_frac of the run, the final ones for the last --grad_fin_frac, linear in
    between (batch size, spatial frequency and forgetting)."""
    o = options
    total = o.iterations - 1  # the mini-batch iterations (the last one is the full pass)
    n_ini = int(round(total * o.ini_frac))
    n_fin = int(round(total * o.fin_frac))
    between = max(total - n_ini - n_fin, 0)
    i = iteration - 1
    if i < n_ini:
        p = 0.0
    elif i >= n_ini + between:
        p = 1.0
    else:
        p = (i - n_ini + 1) / (between + 1)
    final = iteration >= o.iterations
    if final:
        p = 1.0
    ini, fin = o.subset_sizes(n_particles)
    batch = n_particles if final else int(round(ini + p * (fin - ini)))
    freq = (1.0 - p) / o.ini_high + p / o.fin_high  # linear in spatial frequency
    resolution = 1.0 / freq
    radius = int(min(max(2, round(box * pixel_size / resolution)), box // 2 - 1))
    eta = 1.0 if final else o.ini_stepsize + p * (o.stepsize - o.ini_stepsize)
    order = healpix_order_for(box * pixel_size / radius, o, diameter)
    return Step(batch, float(resolution), radius, float(eta), order, final)


def healpix_order_for(resolution: float, options: EMOptions, diameter: float) -> int:
    """The coarsest HEALPix order (at least --healpix_order) whose oversampled angular step
    resolves `resolution` Å at the particle's edge (the step that moves the edge of a particle
    of `diameter` Å by at most resolution x 1.2: RELION's coarse-size rule, inverted)."""
    o = options
    top = MAX_HEALPIX_ORDER - o.oversampling
    for order in range(o.healpix_order, top + 1):
        moved = angular_step(order + o.oversampling) / 360.0 * np.pi * diameter
        if moved / 1.2 <= resolution:
            return order
    return max(o.healpix_order, top)


@dataclass
class InitialModelIteration:
    """The figures of one initial-model iteration: run.log's line, the history."""

    iteration: int
    final: bool  # the last pass, over all particles
    batch: int  # particles in the mini-batch
    resolution_target: float  # Å, this iteration's
    r_max: int  # px
    healpix_order: int
    eta: float  # step size: the share of the running sums the batch replaces
    pseudo_resolution: list[float]  # Å, each class's FSC 0.5 of its pseudo half-sets
    distribution: list[float]
    average_pmax: float
    mean_samples: float
    centred_px: list[float]  # how far each class was moved to the box centre
    reseeded: list
    seconds: float
    cpu_seconds: float
    timings: dict[str, float]


@dataclass
class InitialModelState(EMState):
    """Everything an iteration needs and produces (saved after each iteration)."""

    references: np.ndarray  # (K, N, N, N) current maps
    data: np.ndarray  # (2, K, 2M+1, 2M+1, M+1) complex64 running D per pseudo half-set
    weight: np.ndarray  # (2, K, 2M+1, 2M+1, M+1) float32 running W
    mass: np.ndarray  # (K,) running class mass
    subset: np.ndarray  # (n,) pseudo half-set 1 or 2
    class_number: np.ndarray  # (n,) 0-based
    seen: np.ndarray  # (n,) last iteration a particle was in a batch (0: never)
    fsc: np.ndarray | None = None  # (K, N//2+1) pseudo half-set FSC
    tau2: np.ndarray | None = None  # (K, N//2+1)
    assigned: np.ndarray | None = None  # (n,) class a particle is restricted to next, or -1
    history: list[InitialModelIteration] = field(default_factory=list)

    @property
    def n_classes(self) -> int:
        return int(self.references.shape[0])

    @property
    def distribution(self) -> np.ndarray:
        """Class prior pi_k from the running masses."""
        total = float(self.mass.sum())
        k = self.n_classes
        return self.mass / total if total > 0 else np.full(k, 1.0 / k)

    @classmethod
    def from_saved(cls, values: dict) -> InitialModelState:
        values = dict(values, history=[InitialModelIteration(**h)
                                       for h in values.get("history", [])])
        return state_from_saved(cls, values, ints=("iteration", "r_max"))


@dataclass
class Problem(Work):
    """What the iterations work on and is not state: the images, options and geometry."""

    options: InitialModelOptions
    input_origins: np.ndarray  # (n, 2) px: the centre of every translation search

    @property
    def mask_radius(self) -> float:
        return mask_radius_px(self.options, self.box, self.pixel_size)

    @property
    def diameter(self) -> float:
        return 2.0 * self.mask_radius * self.pixel_size

    @property
    def n_particles(self) -> int:
        return int(self.input_origins.shape[0])

    def step(self, iteration: int) -> Step:
        return schedule(self.options, self.n_particles, self.box, self.pixel_size,
                        self.diameter, iteration)


# -- sums on the full grid ---------------------------------------------------------------


def sums_radius(options: InitialModelOptions, box: int, pixel_size: float) -> int:
    """Fourier radius (px) of the running sums: the largest radius of the schedule (its
    final resolution), so that the sums and their reconstructions stay no larger than any
    pass needs."""
    return schedule(options, 1, box, pixel_size, 0.0, options.iterations).radius


def _embed(small: np.ndarray, big_shape: tuple[int, ...]) -> np.ndarray:
    """A centred half-volume placed in the middle of a larger centred one (zeros around)."""
    m_small, m_big = small.shape[-1] - 1, big_shape[-1] - 1
    off = m_big - m_small
    out = np.zeros(big_shape, small.dtype)
    out[off:off + small.shape[0], off:off + small.shape[1], :small.shape[2]] = small
    return out


def _backprojector(data: np.ndarray, weight: np.ndarray, box: int,
                   options: EMOptions, radius: int) -> projector.BackProjector:
    """A finished back-projector holding the given running sums (Fourier radius `radius`)."""
    bp = projector.BackProjector(box, options.pad, radius, options.interp, 3)
    if bp.data.shape != data.shape:
        raise ValueError("initial model: running sums on a different grid")
    bp.data, bp.weight = data.astype(np.complex64), weight.astype(np.float32)
    bp._folded = True
    bp.symmetry = options.sym
    return bp


def shift_sums(data: np.ndarray, shift: np.ndarray, box: int, pad: int) -> np.ndarray:
    """Running D sums (centred padded half-volume) of a map moved by `shift` (x, y, z) px:
    each coefficient times exp(-2 pi i k.s / N), k = q / pad (docs/conventions.md)."""
    m = data.shape[-1] - 1
    q = np.arange(-m, m + 1, dtype=np.float64)
    kz, ky, kx = q[:, None, None], q[None, :, None], np.arange(m + 1.0)[None, None, :]
    sx, sy, sz = (float(v) for v in shift)
    phase = np.exp(-2j * np.pi * (kx * sx + ky * sy + kz * sz) / (pad * box))
    return (data * phase).astype(data.dtype)


# -- start -----------------------------------------------------------------------------------


def initial_state(problem: Problem, sigma2: np.ndarray, subset: np.ndarray,
                  rng: np.random.Generator) -> InitialModelState:
    """The start: for each class, the particles of a random subset (the initial mini-batch
    size, disjoint between classes where the particles allow) back-projected at random poses
    into running sums (both pseudo half-sets), and the map from them plus a random field
    low-passed to --ini_high (--init_perturbation times the blob's std), different per
    class."""
    from ..simulate import random_rotations

    o, source = problem.options, problem.source
    box, pix, n = problem.box, problem.pixel_size, problem.n_particles
    k_cls = o.n_classes
    step = problem.step(1)
    m = projector.reference_radius(box, o.pad, sums_radius(o, box, pix))
    shape = (2 * m + 1, 2 * m + 1, m + 1)
    data = np.zeros((2, k_cls) + shape, np.complex64)
    weight = np.zeros((2, k_cls) + shape, np.float32)
    noise = NoiseModel(sigma2, o.noise_model == "pixel")
    order = rng.permutation(n)
    per_class = max(2, min(step.batch, n // k_cls if n >= 2 * k_cls else n))
    sampling = PoseSampling.create(3, o.healpix_order, o.psi_step, o.offset_step,
                                   o.offset_range, 0.0, None, symmetry=o.sym)
    search = Search(sampling, 0, step.radius, problem.diameter, fixed_poses=True)
    sphere = soft_sphere(box, problem.mask_radius, o.mask_edge, 3)
    references = np.zeros((k_cls, box, box, box))
    dummy = [projector.prepare_reference(np.zeros((box,) * 3), o.pad, o.interp, step.radius)]
    for k in range(k_cls):
        start = (k * per_class) % n
        members = np.sort(np.take(order, np.arange(start, start + per_class), mode="wrap"))
        members = np.unique(members)
        rot = random_rotations(members.size, rng)
        for h in (1, 2):
            sel = members[subset[members] == h]
            if sel.size == 0:
                continue
            res = source.ranks.run_pass(source, sel, dummy, search, noise,
                                        rot[subset[members] == h], problem.input_origins[sel])
            bp = res.backprojectors[0]
            data[h - 1, k] = _embed(bp.data, shape)
            weight[h - 1, k] = _embed(bp.weight, shape)
    state = InitialModelState(
        iteration=0, references=references, data=data, weight=weight,
        mass=np.full(k_cls, 1.0 / k_cls), sigma2=np.asarray(sigma2, np.float64).copy(),
        subset=np.asarray(subset, np.int64), angles=np.zeros((n, 3)),
        origins_px=np.array(problem.input_origins, np.float64),
        class_number=np.zeros(n, np.int64), max_prob=np.zeros(n),
        n_significant=np.zeros(n, np.int64), log_likelihood=np.zeros(n),
        amplitude=np.ones(n), seen=np.zeros(n, np.int64), r_max=step.radius)
    _maps_from_sums(state, problem, step.radius)
    for k in range(k_cls):
        blob = state.references[k]
        field_ = fourier.lowpass_map(rng.standard_normal((box,) * 3), o.ini_high, pix)
        scale = o.perturbation * blob[sphere > 0.5].std() / max(field_.std(), 1e-30)
        state.references[k] = blob + scale * field_ * sphere
    return state


# -- one iteration ---------------------------------------------------------------------------


def _maps_from_sums(state: InitialModelState, problem: Problem, radius: int) -> None:
    """Each class's map from its running sums: tau2 from the pseudo half-sets' FSC (times
    --tau2_fudge), the map from both halves together (refinement's final-map rule), zero
    beyond `radius`."""
    o, box = problem.options, problem.box
    k_cls = state.n_classes
    n_shells = box // 2 + 1
    state.fsc = np.zeros((k_cls, n_shells))
    state.tau2 = np.zeros((k_cls, n_shells))
    for k in range(k_cls):
        bps = [_backprojector(state.data[h, k], state.weight[h, k], box, o,
                              sums_radius(o, box, problem.pixel_size)) for h in (0, 1)]
        if not all(bp.weight.any() for bp in bps):
            state.references[k] = 0.0
            continue
        state.fsc[k], state.tau2[k] = half_set_fsc(bps, o, radius, box)
        state.references[k] = final_maps(bps, state.fsc[k], o, radius, box, halves=False)[0]


def _centre_classes(state: InitialModelState, problem: Problem) -> list[float]:
    """Move each map's centre of mass (positive density) to the box centre, at most
    --offset_range px per iteration, with its running sums; shifts below 1 px are left (they
    would only make the map jitter). Returns the shift length per class (px)."""
    o, box = problem.options, problem.box
    moved = []
    for k in range(state.n_classes):
        com = center_of_mass_shift(state.references[k])
        length = float(np.linalg.norm(com))
        if length < 1.0:
            moved.append(0.0)
            continue
        shift = -com * min(1.0, o.offset_range / length)
        for h in (0, 1):
            state.data[h, k] = shift_sums(state.data[h, k], shift, box, o.pad)
        moved.append(float(np.linalg.norm(shift)))
    return moved


def _reseed(state: InitialModelState, options: InitialModelOptions,
            rng: np.random.Generator) -> list[tuple[int, int]]:
    """A class whose share of the running mass fell below reseed_fraction/K takes half of the
    largest class's sums, and the next mini-batch's particles are each restricted to one of
    the two at random, so that the two diverge (a starved class is otherwise lost for good:
    the fewer particles a class has, the more its map is shrunk by the prior, and the worse
    it fits). Returns the (re-seeded, split) class pairs."""
    k_cls = state.n_classes
    if k_cls < 2 or options.reseed_fraction <= 0:
        return []
    dist = state.distribution
    pairs = []
    used: set[int] = set()
    for k in [int(c) for c in np.argsort(dist) if dist[c] < options.reseed_fraction / k_cls]:
        candidates = [int(c) for c in np.argsort(-state.mass) if c != k and c not in used]
        if not candidates or k in used:
            continue
        big = candidates[0]
        for arr in (state.data, state.weight):
            arr[:, big] *= 0.5
            arr[:, k] = arr[:, big]
        state.mass[big] *= 0.5
        state.mass[k] = state.mass[big]
        state.references[k] = state.references[big]
        used.update((k, big))
        pairs.append((k, big))
    if pairs:
        n = state.class_number.size
        state.assigned = np.full(n, -1, np.int64)
        for k, big in pairs:
            split = rng.random(n) < 0.5
            state.assigned[split] = k
            state.assigned[~split] = np.where(state.assigned[~split] < 0, big,
                                              state.assigned[~split])
    return pairs


def initial_model_iteration(state: InitialModelState, problem: Problem,
                            progress: Callable[[int], None] | None = None
                            ) -> InitialModelIteration:
    """One mini-batch (or the final full) iteration; updates `state` in place and returns the
    iteration's figures."""
    o, source = problem.options, problem.source
    box, pix, n = problem.box, problem.pixel_size, problem.n_particles
    t_start, cpu_start = time.perf_counter(), time.process_time()
    it = state.iteration + 1
    step = problem.step(it)
    rng = np.random.default_rng([o.seed, it, 41])
    k_cls = state.n_classes
    batch = np.arange(n) if step.batch >= n else np.sort(rng.choice(n, step.batch,
                                                                      replace=False))
    psi0 = o.psi_step if o.psi_step is not None else angular_step(o.healpix_order)
    sampling = PoseSampling.create(3, step.healpix_order,
                                   psi0 / 2 ** (step.healpix_order - o.healpix_order),
                                   o.offset_step, o.offset_range, o.perturb, rng,
                                   symmetry=o.sym)
    image_class = None
    if state.assigned is not None:
        image_class = state.assigned[batch]
        state.assigned = None
    search = Search(sampling, o.oversampling, step.radius, problem.diameter,
                    class_prior=state.distribution, adaptive_fraction=o.adaptive_fraction,
                    force_max=o.force_max, image_class=image_class)
    noise = NoiseModel(state.sigma2, o.noise_model == "pixel")
    sphere = soft_sphere(box, problem.mask_radius, o.mask_edge, 3)
    refs = [projector.prepare_reference(v * sphere, o.pad, o.interp, step.radius)
            for v in state.references]

    bsize = batch_size(search, k_cls, o.batch_memory)
    results: list[PassResult] = []
    for h in (1, 2):
        rows = np.flatnonzero(state.subset[batch] == h)
        members = batch[rows]
        if members.size == 0:
            results.append(None)
            continue
        sub_search = search
        if image_class is not None:
            from dataclasses import replace

            sub_search = replace(search, image_class=image_class[rows])
        prev = np.tile(np.eye(3), (members.size, 1, 1))
        res = source.ranks.run_pass(source, members, refs, sub_search, noise, prev,
                                    problem.input_origins[members], batch_size=bsize,
                                    slice_memory=o.batch_memory, progress=progress,
                                    amplitudes=pass_amplitudes(state, members, o.scale))
        store_estimates(state, members, res.estimates)
        state.class_number[members] = res.estimates.best_class
        state.seen[members] = it
        results.append(res)
    if o.scale:
        normalise_amplitudes(state)
    t_pass = time.perf_counter()
    done = [r for r in results if r is not None]
    # online EM: the running sums forget a share eta and take the batch's sums
    keep = 1.0 - step.eta
    shape = state.data.shape[2:]
    batch_mass = sum(r.class_mass for r in done)
    state.mass = keep * state.mass + batch_mass
    for h, res in enumerate(results):
        state.data[h] *= keep
        state.weight[h] *= keep
        if res is None:
            continue
        for k, bp in enumerate(res.backprojectors):
            state.data[h, k] += _embed(bp.data, shape)
            state.weight[h, k] += _embed(bp.weight, shape)
    # sigma2: the batch's estimate blended in with the same step
    mask = fourier.pixel_mask(box, step.radius)
    batch_noise = NoiseModel(state.sigma2.copy(), o.noise_model == "pixel")
    batch_noise.update(sum(r.residual for r in done), sum(r.count for r in done), mask)
    state.sigma2 = keep * state.sigma2 + step.eta * batch_noise.sigma2
    _maps_from_sums(state, problem, step.radius)
    moved = [0.0] * k_cls
    if not step.final:
        moved = _centre_classes(state, problem)
        if any(moved):
            _maps_from_sums(state, problem, step.radius)
    reseeded = [] if step.final or it > o.iterations // 2 else _reseed(
        state, o, np.random.default_rng([o.seed, it, 43]))
    state.iteration = it
    state.r_max = step.radius
    shells = np.maximum([resolution_shell(f, 0.5) for f in state.fsc], 1)
    timings = merge_timings(done, time.perf_counter() - t_pass)
    stats = InitialModelIteration(
        iteration=it, final=bool(step.final), batch=int(batch.size),
        resolution_target=step.resolution, r_max=int(step.radius),
        healpix_order=int(step.healpix_order), eta=step.eta,
        pseudo_resolution=[float(box * pix / s) for s in shells],
        distribution=[float(d) for d in state.distribution],
        average_pmax=float(np.mean(np.concatenate([r.estimates.max_prob for r in done]))),
        mean_samples=float(np.mean(np.concatenate([r.estimates.n_samples for r in done]))),
        centred_px=moved, reseeded=reseeded, seconds=time.perf_counter() - t_start,
        cpu_seconds=time.process_time() - cpu_start, timings=timings)
    state.history.append(stats)
    return stats
