"""The E/M engine: one pass of particle images against K references (docs/method.md).

A pass computes, for every image, the posterior over its hidden variables (class k,
orientation, translation; docs/method.md eq. (17)) on a hierarchical pose grid
(`sampling.PoseSampling`) and accumulates the M-step sums of eqs. (14) and (15):

- level 0: every orientation of the coarse grid (a global search, one GEMM-shaped kernel call
  per batch), or each image's own window around its previous pose (a local search with a
  Gaussian prior on the rotation), or each image's given pose (fixed poses);
- levels 1..L (adaptive oversampling): each image's significant samples of the level above
  (the smallest set holding `adaptive_fraction` of its posterior) are split into their
  children; the last level also splits the significant translations. Each level is scored at
  the Fourier radius that its angular step resolves (RELION's coarse image size), the last at
  the full radius. Images of a batch share the projection of the union of their candidate
  orientations, and each image is scored against its own candidates by one matrix product;
- the final level's weights, pruned to `adaptive_fraction`, give the M-step sums: slice sums
  back-projected into one `projector.BackProjector` per class, and the residual power per
  optics group for sigma2.

Refinement (K = 1, one pass per half-set), 3D classification (K maps) and 2D classification
(K images, in-plane orientations only) are all schedules of passes (`em/refine.py`,
`em/classify.py`).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np

from .. import fourier, projector
from ..ctf import magnified_rotations
from ..euler import matrix_to_euler
from ..sampling import PoseSampling
from .data import Batch, ImageSource
from .estep import KernelInputs, expectation, expectation_subsets
from .noise import NoiseModel
from .search import Search
from .sums import SliceSums, maximization_sums, maximization_sums_sparse

# Floor of a class prior: an empty class keeps a finite log prior.
MIN_CLASS_PRIOR = 1e-30


@dataclass
class PoseEstimates:
    """Per-image results of a pass (rows follow the pass's image indices)."""

    class_prob: np.ndarray  # (n, K) posterior class probabilities (as used by the M-step)
    best_class: np.ndarray  # (n,) most probable class
    rotations: np.ndarray  # (n, 3, 3) A of the best pose of the best class
    angles: np.ndarray  # (n, 3) its Euler angles (degrees)
    origins: np.ndarray  # (n, 2) px, rint(previous origin) + best translation
    max_prob: np.ndarray  # (n,) largest posterior weight (rlnMaxValueProbDistribution)
    n_significant: np.ndarray  # (n,) significant samples at level 0 (rlnNrOfSignificantSamples)
    log_likelihood: np.ndarray  # (n,) log p(X | model) over the final level's samples
    angular_spread: np.ndarray  # (n,) degrees, posterior RMS rotation angle from the best pose
    offset_spread: np.ndarray  # (n,) px, posterior RMS distance from the best translation
    n_samples: np.ndarray  # (n,) final-level samples scored
    # (n,) the image's amplitude a_i (X = a_i CTF P V + noise): the pass's estimate at the
    # best pose with amplitudes given to run_pass, else 1 (docs/method.md eq. (30))
    amplitude: np.ndarray


@dataclass
class PassResult:
    """What a pass returns: estimates per image, sums per class, residual power per group."""

    estimates: PoseEstimates
    backprojectors: list[projector.BackProjector]
    # (groups, bins) sum over images of posterior-weighted |X - CTF A|^2 within the E-step
    # radius (bins beyond it are 0)
    residual: np.ndarray
    count: np.ndarray  # (groups,) images
    class_mass: np.ndarray  # (K,) summed class probabilities
    offset_sq: float  # sum over images of posterior-expected |origin - prior centre|^2 (px^2)
    timings: dict = field(default_factory=dict)


@dataclass
class _Level:
    """Candidates of one level for a batch, in the kernels' CSR layout."""

    level: int
    slice_class: np.ndarray  # (S,) class of each union slice
    slice_key: np.ndarray  # (S,) orientation key (level 0 with fixed poses: image row)
    rotations: np.ndarray  # (S, 3, 3)
    shifts: np.ndarray  # (T, 2) translation table, px
    # sparse weights after the level's E-step: image row, translation, slice, weight
    image: np.ndarray | None = None
    shift: np.ndarray | None = None
    slice: np.ndarray | None = None
    weight: np.ndarray | None = None
    slices: np.ndarray | None = None  # (S, J) projections at the level's radius
    log_marginal: np.ndarray | None = None  # (B,) log p(X_i) over the level's samples
    n_scored: np.ndarray | None = None  # (B,) samples scored per image
    magnification: np.ndarray | None = None  # (2, 2) of the batch's images, None: none

    @property
    def projection_matrices(self) -> np.ndarray:
        """(S, 3, 3) matrices the slices are projected and back-projected with: the
        rotations, or M^T A with the batch's magnification (ctf.magnified_rotations)."""
        if self.magnification is None:
            return self.rotations
        return magnified_rotations(self.rotations, self.magnification)


def run_pass(source: ImageSource, indices: np.ndarray, references: list[projector.Reference],
             search: Search, noise: NoiseModel, previous_rotations: np.ndarray,
             previous_origins: np.ndarray, offset_prior: np.ndarray | None = None,
             batch_size: int = 256, slice_memory: int = 512 << 20,
             progress: Callable[[int], None] | None = None,
             amplitudes: np.ndarray | None = None) -> PassResult:
    """E-step and M-step sums of the images `indices` against `references` (one per class).

    previous_rotations (n, 3, 3) and previous_origins (n, 2) px are the images' current poses
    (rows follow `indices`): translations are searched around rint(origin), local searches
    around the rotation. offset_prior (n, 2) px is the centre of the origin prior (default 0).
    amplitudes (n,): each image's current amplitude a_i, multiplying its CTF in the E-step,
    the sums and the noise estimate; the pass re-estimates it (`PoseEstimates.amplitude`).
    None: no amplitude correction (a_i = 1).
    batch_size images share level 0 (and the projection of its slices); below it, images are
    processed in groups whose candidate slices take at most about slice_memory bytes.
    """
    box, pix = source.box, source.pixel_size
    k_cls = len(references)
    ndim = references[0].ndim
    n = indices.size
    log_class = _log_class_prior(search, k_cls)
    centre = np.zeros((n, 2)) if offset_prior is None else np.asarray(offset_prior, np.float64)
    timings = {"project": 0.0, "estep": 0.0, "sums": 0.0, "backproject": 0.0, "io": 0.0,
               "candidates": 0.0}
    mask = fourier.pixel_mask(box, search.sums_radius)  # the E-step levels use its inner part
    bins, n_bins = noise.bins(mask)
    radii = [search.level_radius(lv, box, pix) for lv in range(search.levels + 1)]
    columns = [np.flatnonzero(mask.shell <= r) for r in radii]
    bps = [projector.BackProjector(box, references[0].pad, search.sums_radius,
                                   references[0].interp, ndim) for _ in range(k_cls)]
    residual = np.zeros((noise.n_groups, n_bins))
    count = np.zeros(noise.n_groups)
    class_mass = np.zeros(k_cls)
    offset_sq = 0.0
    est = _empty_estimates(n, k_cls)

    # A global level 0 is the same for every batch: project it once (per magnification
    # class, see _batches).
    global0 = not (search.fixed_poses or search.local_sigma is not None)
    level0_table, shared = None, None
    if global0:
        keys0 = np.arange(search.sampling.n_orientations(0), dtype=np.int64)
        rot0 = search.sampling.matrices(keys0, 0)
        coords0 = mask.coords[columns[0]]
    # The final level of a global search without oversampling is the same for every batch
    # too: its slice sums are accumulated over all batches and back-projected once.
    shared_final = global0 and search.levels == 0 and search.sums_radius == search.radius

    # candidate slices of the levels below level 0 held at once (slices, sums: ~24 B/pixel)
    max_slices = max(256, int(slice_memory // (24 * mask.n_pixels)))
    order = _batch_order(previous_rotations, search)
    table_key = None
    for rows, mag_key in _batches(order, source.magnification_keys(indices), batch_size):
        batch, inv_s2 = _read_batch(source, indices[rows], mask, previous_origins[rows],
                                    None if amplitudes is None else amplitudes[rows], noise,
                                    timings)
        if global0 and mag_key != table_key:  # [aberration hook] one table per class
            if shared_final and level0_table is not None:
                _flush_shared(bps, level0_table, shared, mask, timings)
            t0 = time.perf_counter()
            level0_table = _global_table(references, keys0, rot0, coords0, batch.magnification)
            timings["project"] += time.perf_counter() - t0
            table_key = mag_key
            if shared_final:
                shared = SliceSums.empty(*level0_table.slices.shape, bins, n_bins)
        level0 = _level_zero(batch, inv_s2, rows, references, search, level0_table,
                             previous_rotations, previous_origins, centre, log_class,
                             mask, columns[0], timings)
        n_sig0 = np.bincount(level0.image, minlength=rows.size)
        rp = np.zeros((rows.size, n_bins))
        # the levels below are per image: process them in groups of images whose candidate
        # slices fit the memory budget
        for chunk, oversample in _chunks(level0, search, max_slices):
            level, sub = _select_images(level0, chunk), batch.select(chunk)
            s2 = inv_s2[chunk]
            for lv in range(1, search.levels + 1 if oversample else 1):
                level = _refine_level(sub, s2, rows[chunk], references, search, level, lv,
                                      previous_rotations, previous_origins, centre,
                                      log_class, mask, columns[lv], timings)
            b_idx, s_idx, t_idx, w = _adjust_weights(level, k_cls, search, chunk.size)
            best = _store_estimates(est, rows[chunk], level, b_idx, s_idx, t_idx, w, k_cls,
                                    previous_origins, n_sig0[chunk])
            if amplitudes is not None:
                est.amplitude[rows[chunk]] = amplitudes[rows[chunk]] * _amplitude_ratio(
                    sub, s2, level, best, references, mask, columns[-1])
            class_mass += np.bincount(level.slice_class[s_idx], weights=w, minlength=k_cls)
            total = np.rint(previous_origins[rows[chunk]][b_idx]) + level.shifts[t_idx]
            offset_sq += float(np.sum(w * ((total - centre[rows[chunk]][b_idx]) ** 2).sum(1)))
            t0 = time.perf_counter()
            if shared_final:
                rp[chunk] = maximization_sums(
                    KernelInputs(sub.images, sub.ctf, s2, level0_table.slices, level.shifts,
                                 box, mask.coords),
                    _dense(b_idx, t_idx, s_idx, w, chunk.size, level.shifts.shape[0],
                           level0_table.slices.shape[0]),
                    shared)
                timings["sums"] += time.perf_counter() - t0
            else:
                rp[chunk] = _sums_and_backproject(sub, s2, level, b_idx, s_idx, t_idx, w, bps,
                                                  references, mask, columns[-1], bins, n_bins,
                                                  timings)
        np.add.at(residual, batch.group, rp)
        np.add.at(count, batch.group, 1)
        if progress is not None:
            progress(rows.size)
    if shared_final and level0_table is not None:
        _flush_shared(bps, level0_table, shared, mask, timings)
    t0 = time.perf_counter()
    for bp in bps:
        # [symmetry hook] level 0 covered one asymmetric unit: sum over the point group
        bp.finish().symmetrise(search.sampling.symmetry)
    timings["backproject"] += time.perf_counter() - t0
    # beyond the E-step radius the residual is the images' power alone: no noise estimate
    residual[:, noise.bin_shells(mask) > search.radius] = 0.0
    return PassResult(est, bps, residual, count, class_mass, offset_sq, timings)


def _read_batch(source: ImageSource, indices: np.ndarray, mask, origins: np.ndarray,
                amplitudes: np.ndarray | None, noise: NoiseModel, timings: dict
                ) -> tuple[Batch, np.ndarray]:
    """A batch's images and CTFs (each CTF times the image's amplitude, eq. (30)) and their
    1/sigma2."""
    t0 = time.perf_counter()
    batch = source.batch(indices, mask, origins)
    if amplitudes is not None:
        batch = replace(batch, ctf=batch.ctf * amplitudes[:, None].astype(np.float32))
    inv_s2 = noise.inv_sigma2(batch.group, mask)
    timings["io"] += time.perf_counter() - t0
    return batch, inv_s2


def _flush_shared(bps: list[projector.BackProjector], table, shared: SliceSums, mask,
                  timings: dict) -> None:
    """Back-project the slice sums that a global level 0 accumulated over its batches."""
    t0 = time.perf_counter()
    for k, bp in enumerate(bps):
        sel = np.flatnonzero(table.klass == k)
        bp.add_slices(shared.data[sel], shared.weight[sel], table.projection_matrices[sel],
                      mask.coords)
    timings["backproject"] += time.perf_counter() - t0


def _log_class_prior(search: Search, k_cls: int) -> np.ndarray:
    """log pi_k of the search's class prior (uniform without one), floored at
    MIN_CLASS_PRIOR and renormalised (docs/method.md eq. (17))."""
    prior = np.full(k_cls, 1.0 / k_cls) if search.class_prior is None else np.asarray(
        search.class_prior, np.float64)
    floored = np.maximum(prior, MIN_CLASS_PRIOR)
    return np.log(floored / floored.sum())


def _chunks(level0: _Level, search: Search, max_slices: int
            ) -> list[tuple[np.ndarray, bool]]:
    """Groups of the batch's images (indices into it), each with whether its images are
    oversampled: those whose level-0 posterior has more than `max_significant` significant
    samples are not (their coarse posterior is used as it is: it is too broad for finer
    samples to change it), the others in groups whose expected final-level slices (children of
    their distinct significant level-0 orientations) stay below max_slices."""
    b = level0.log_marginal.size
    if search.levels == 0:
        return [(np.arange(b), False)]
    n_sig = np.bincount(level0.image, minlength=b)
    broad = n_sig > search.max_significant
    out = [(np.flatnonzero(broad), False)] if broad.any() else []
    n_s = level0.slice_key.size
    pair = np.unique(level0.image.astype(np.int64) * n_s + level0.slice)
    per_image = np.bincount(pair // n_s, minlength=b) * (
        8 if search.sampling.ndim == 3 else 2) ** search.levels
    group, total = [], 0
    for i in np.flatnonzero(~broad):
        if group and total + per_image[i] > max_slices:
            out.append((np.array(group), True))
            group, total = [], 0
        group.append(i)
        total += per_image[i]
    if group:
        out.append((np.array(group), True))
    return out


def _select_images(level: _Level, chunk: np.ndarray) -> _Level:
    """The level's entries of the images `chunk` (indices into the batch), renumbered."""
    if chunk.size == level.log_marginal.size:
        return level
    renumber = np.full(level.log_marginal.size, -1, np.int64)
    renumber[chunk] = np.arange(chunk.size)
    keep = renumber[level.image] >= 0
    return _Level(level.level, level.slice_class, level.slice_key, level.rotations,
                  level.shifts, renumber[level.image[keep]], level.shift[keep],
                  level.slice[keep], level.weight[keep], level.slices,
                  level.log_marginal[chunk], level.n_scored[chunk], level.magnification)


def _sums_and_backproject(batch: Batch, inv_s2: np.ndarray, level: _Level, b_idx, s_idx,
                          t_idx, w, bps: list[projector.BackProjector],
                          references: list[projector.Reference], mask, inner, bins, n_bins,
                          timings) -> np.ndarray:
    """M-step sums over the final level's used slices, back-projected into each class's
    back-projector; returns the residual power (B, bins). Slices scored at a smaller radius
    (images that were not oversampled) are projected again at the E-step's radius (the mask
    columns `inner`); beyond it (sums out to recon_radius) the slices are zero: the data sums
    need no projection, and the residual there is not a noise estimate (`run_pass`)."""
    t0 = time.perf_counter()
    used, s_loc = np.unique(s_idx, return_inverse=True)
    if level.slices.shape[1] != inner.size:
        sub = _Level(level.level, level.slice_class[used], level.slice_key[used],
                     level.rotations[used], level.shifts, magnification=level.magnification)
        slices = _project_level(references, sub, mask.coords[inner])
        timings["project"] += time.perf_counter() - t0
        t0 = time.perf_counter()
    elif used.size == level.slices.shape[0]:
        slices = level.slices
    else:
        slices = level.slices[used]
    if inner.size != mask.n_pixels:
        full = np.zeros((slices.shape[0], mask.n_pixels), np.complex64)
        full[:, inner] = slices
        slices = full
    acc = SliceSums.empty(*slices.shape, bins, n_bins)
    rp = maximization_sums_sparse(
        KernelInputs(batch.images, batch.ctf, inv_s2, slices, level.shifts, mask.box,
                     mask.coords),
        b_idx, t_idx, s_loc, w, acc)
    t1 = time.perf_counter()
    timings["sums"] += t1 - t0
    cls = level.slice_class[used]
    rot = level.projection_matrices[used]
    for k, bp in enumerate(bps):
        sel = np.flatnonzero(cls == k)
        if sel.size == used.size:
            bp.add_slices(acc.data, acc.weight, rot, mask.coords)
        elif sel.size:
            bp.add_slices(acc.data[sel], acc.weight[sel], rot[sel], mask.coords)
    timings["backproject"] += time.perf_counter() - t1
    return rp


# -- levels --------------------------------------------------------------------------------


def _batch_order(previous_rotations: np.ndarray, search: Search) -> np.ndarray:
    """Order of the images in batches: for local searches by the HEALPix (NEST, order 3)
    pixel of their previous direction, so that a batch's windows overlap and share slices."""
    n = previous_rotations.shape[0]
    if search.local_sigma is None or search.sampling.ndim == 2:
        return np.arange(n)
    import healpy

    d = previous_rotations[:, 2, :]
    pix = healpy.vec2pix(8, d[:, 0], d[:, 1], d[:, 2], nest=True)
    return np.argsort(pix, kind="stable")


# [aberration hook] anisotropic magnification (docs/conventions.md, "Aberrations"): the
# reference is sampled at A^T M k for the images of an optics group with magnification M.
# Batches never mix magnification classes, so that a batch's images still share one table of
# slices (per-image matrices would give every image its own slices).


def _batches(order: np.ndarray, mag_keys: np.ndarray, batch_size: int
             ) -> list[tuple[np.ndarray, int]]:
    """(rows, magnification class) of each batch: runs of at most batch_size rows of
    `order`, one class each (mag_keys (n,) per row; a single class: plain runs of order)."""
    keys = np.asarray(mag_keys)[order]
    if not keys.any():
        return [(order[s:s + batch_size], 0) for s in range(0, order.size, batch_size)]
    out = []
    for k in np.unique(keys):
        sub = order[keys == k]
        out += [(sub[s:s + batch_size], int(k)) for s in range(0, sub.size, batch_size)]
    return out


@dataclass
class SliceTable:
    """The level-0 table of a global search: every class at every orientation."""

    klass: np.ndarray  # (S,) class of each slice
    keys: np.ndarray  # (S,) orientation key at level 0
    rotations: np.ndarray  # (S, 3, 3) A
    slices: np.ndarray  # (S, J0) projections at level 0's radius, sampled at A^T M k
    projection_matrices: np.ndarray  # (S, 3, 3) what was projected with: A, or A magnified


def _global_table(references: list[projector.Reference], keys0: np.ndarray, rot0: np.ndarray,
                  coords0: np.ndarray, magnification: np.ndarray | None) -> SliceTable:
    """The `SliceTable` of a global search (projection matrices magnified by M)."""
    k_cls = len(references)
    proj0 = rot0 if magnification is None else magnified_rotations(rot0, magnification)
    slices0 = np.concatenate([projector.project(ref, proj0, coords0) for ref in references])
    return SliceTable(np.repeat(np.arange(k_cls), keys0.size), np.tile(keys0, k_cls),
                      np.tile(rot0, (k_cls, 1, 1)), slices0, np.tile(proj0, (k_cls, 1, 1)))


def _shift_log_prior(origins: np.ndarray, shifts: np.ndarray, centre: np.ndarray,
                     sigma: float | None) -> np.ndarray:
    """(B, T) log prior of the total origins rint(o_i) + t under a Gaussian around centre_i."""
    if sigma is None:
        return np.zeros((origins.shape[0], shifts.shape[0]))
    total = np.rint(origins)[:, None, :] + shifts[None, :, :]
    return -((total - centre[:, None, :]) ** 2).sum(-1) / (2.0 * sigma**2)


def _level_zero(batch: Batch, inv_s2: np.ndarray, rows: np.ndarray,
                references: list[projector.Reference], search: Search, table, prev_rot,
                prev_origin, centre, log_class, mask, cols, timings) -> _Level:
    """Level 0: global (dense kernel over the shared grid), local windows or fixed poses."""
    s = search.sampling
    k_cls = len(references)
    b = rows.size
    x, ctf, w = batch.images[:, cols], batch.ctf[:, cols], inv_s2[:, cols]
    coords = mask.coords[cols]
    box = mask.box
    allowed = _allowed_classes(search, rows, k_cls)
    if table is not None:  # global: the dense kernel over the shared grid
        shifts = s.translations(oversampled=False)
        lps = _shift_log_prior(prev_origin[rows], shifts, centre[rows], search.offset_sigma)
        t0 = time.perf_counter()
        n_per = table.slices.shape[0] // k_cls
        parts = []  # images restricted to one class see only that class's block
        log_marg, scored = np.zeros(b), np.zeros(b, np.int64)
        for a in np.unique(allowed):
            sel = np.flatnonzero(allowed == a)
            block = slice(None) if a < 0 else slice(a * n_per, (a + 1) * n_per)
            offset = 0 if a < 0 else a * n_per
            post = expectation(KernelInputs(x[sel], ctf[sel], w[sel], table.slices[block],
                                            shifts, box, coords),
                               log_class[table.klass[block]], lps[sel],
                               search.adaptive_fraction,
                               **_class_pruning(search, table.klass[block], 0))
            bi, ti, si = np.nonzero(post.weights)
            parts.append((sel[bi], ti, si + offset, post.weights[bi, ti, si]))
            log_marg[sel] = post.log_marginal
            scored[sel] = shifts.shape[0] * post.weights.shape[2]
        timings["estep"] += time.perf_counter() - t0
        bi, ti, si, wv = (np.concatenate(z) for z in zip(*parts, strict=True))
        return _Level(0, table.klass, table.keys, table.rotations, shifts, bi, ti, si,
                      wv.astype(np.float64), table.slices, log_marg, scored,
                      batch.magnification)
    t0 = time.perf_counter()
    if search.fixed_poses:
        # one candidate per class: the image's pose; translation = the origin's fraction
        keys = np.repeat(np.arange(b, dtype=np.int64), k_cls)
        klass = np.tile(np.arange(k_cls), b)
        rotations = np.repeat(prev_rot[rows], k_cls, axis=0)
        rot_ptr = np.arange(b + 1, dtype=np.int64) * k_cls
        rot_index = np.arange(b * k_cls, dtype=np.int64)
        rot_prior = np.where((allowed[keys] < 0) | (allowed[keys] == klass), log_class[klass],
                             -np.inf)
        shifts = prev_origin[rows] - np.rint(prev_origin[rows])
        shift_ptr = np.arange(b + 1, dtype=np.int64)
        shift_index = np.arange(b, dtype=np.int64)
        shift_prior = np.zeros(b)
    else:  # local windows around the previous poses
        prev = prev_rot[rows] if s.ndim == 3 else _psi_of(prev_rot[rows])
        ptr, wkeys, wprior = s.local_orientations(prev, search.local_sigma, 0)
        per_img = np.diff(ptr)
        img_of = np.repeat(np.arange(b), per_img)
        # every class at every window orientation
        cand_img = np.repeat(img_of, k_cls)
        cand_cls = np.tile(np.arange(k_cls), wkeys.size)
        cand_key = np.repeat(wkeys, k_cls)
        cand_prior = np.repeat(wprior, k_cls) + log_class[cand_cls]
        ok = (allowed[cand_img] < 0) | (allowed[cand_img] == cand_cls)
        cand_img, cand_cls, cand_key, cand_prior = (cand_img[ok], cand_cls[ok], cand_key[ok],
                                                    cand_prior[ok])
        klass, keys, rotations, rot_ptr, rot_index, rot_prior = _union(
            s, 0, cand_img, cand_cls, cand_key, cand_prior, b)
        shifts = s.translations(oversampled=False)
        t_all = np.arange(shifts.shape[0], dtype=np.int64)
        shift_ptr = np.arange(b + 1, dtype=np.int64) * t_all.size
        shift_index = np.tile(t_all, b)
        shift_prior = _shift_log_prior(prev_origin[rows], shifts, centre[rows],
                                       search.offset_sigma).ravel()
    timings["candidates"] += time.perf_counter() - t0
    level = _Level(0, klass, keys, rotations, shifts, magnification=batch.magnification)
    t0 = time.perf_counter()
    slices = _project_level(references, level, coords)
    timings["project"] += time.perf_counter() - t0
    _score_subsets(level, x, ctf, w, slices, coords, box, rot_ptr, rot_index, rot_prior,
                   shift_ptr, shift_index, shift_prior, search, timings)
    return level


def _allowed_classes(search: Search, rows: np.ndarray, k_cls: int) -> np.ndarray:
    """(B,) the one class each image of the batch may take, -1 for any."""
    if search.image_class is None or k_cls == 1:
        return np.full(rows.size, -1, np.int64)
    return np.asarray(search.image_class, np.int64)[rows]


def _psi_of(rotations: np.ndarray) -> np.ndarray:
    """In-plane angle (degrees) of 2D poses A = Euler(0, 0, psi)."""
    return np.rad2deg(np.arctan2(-rotations[:, 1, 0], rotations[:, 0, 0]))


def _union(s: PoseSampling, level: int, cand_img: np.ndarray, cand_cls: np.ndarray,
           cand_key: np.ndarray, cand_prior: np.ndarray, n_img: int):
    """Per-image candidate (class, key) pairs -> the union slice table and CSR lists."""
    n_orient = s.n_orientations(level)
    code = cand_cls.astype(np.int64) * n_orient + cand_key
    uniq, inverse = np.unique(code, return_inverse=True)
    klass, keys = uniq // n_orient, uniq % n_orient
    order = np.lexsort((inverse, cand_img))
    rot_ptr = np.zeros(n_img + 1, np.int64)
    rot_ptr[1:] = np.cumsum(np.bincount(cand_img, minlength=n_img))
    return (klass, keys, s.matrices(keys, level), rot_ptr,
            inverse[order].astype(np.int64), cand_prior[order].astype(np.float64))


def _refine_level(batch, inv_s2, rows, references, search: Search, prev: _Level, lv: int,
                  prev_rot, prev_origin, centre, log_class, mask, cols, timings) -> _Level:
    """Level lv: children of each image's significant orientations of the level above, and
    (at the final level) of its significant translations."""
    s = search.sampling
    b = rows.size
    t0 = time.perf_counter()
    # distinct significant (image, slice) and (image, translation) pairs of the level above
    n_s = prev.slice_key.size
    pair = np.unique(prev.image.astype(np.int64) * n_s + prev.slice)
    p_img, p_slice = pair // n_s, pair % n_s
    child = s.children(prev.slice_key[p_slice], lv - 1)  # (P, c)
    n_child = child.shape[1]
    cand_img = np.repeat(p_img, n_child)
    cand_cls = np.repeat(prev.slice_class[p_slice], n_child)
    cand_key = child.ravel()
    klass, keys, rotations, rot_ptr, rot_index, _ = _union(
        s, lv, cand_img, cand_cls, cand_key, np.zeros(cand_img.size), b)
    # priors per candidate in CSR order: class prior, and the local Gaussian on the rotation
    img_sorted = np.repeat(np.arange(b), np.diff(rot_ptr))
    rot_prior = log_class[klass[rot_index]]
    if search.local_sigma is not None:
        prev_r = prev_rot[rows][img_sorted]
        if s.ndim == 3:  # [symmetry hook] angle to the nearest symmetry copy of the pose
            theta = s.rotation_angle(rotations[rot_index], prev_r)
        else:
            d = _psi_of(rotations[rot_index]) - _psi_of(prev_r)
            theta = np.abs(np.mod(d + 180.0, 360.0) - 180.0)
        rot_prior = rot_prior - theta**2 / (2.0 * search.local_sigma**2)
    # translations
    n_t = prev.shifts.shape[0]
    tpair = np.unique(prev.image.astype(np.int64) * n_t + prev.shift)
    t_img, t_idx = tpair // n_t, tpair % n_t
    final = lv == search.levels
    if final:
        shifts = s.translations(oversampled=True)
        t_child = (4 * t_idx[:, None] + np.arange(4)[None, :]).ravel()
        t_img = np.repeat(t_img, 4)
    else:
        shifts = prev.shifts
        t_child = t_idx
    shift_ptr = np.zeros(b + 1, np.int64)
    shift_ptr[1:] = np.cumsum(np.bincount(t_img, minlength=b))
    shift_prior = np.zeros(t_child.size)
    if search.offset_sigma is not None:
        total = np.rint(prev_origin[rows][t_img]) + shifts[t_child]
        shift_prior = -((total - centre[rows][t_img]) ** 2).sum(1) / (
            2.0 * search.offset_sigma**2)
    timings["candidates"] += time.perf_counter() - t0
    level = _Level(lv, klass, keys, rotations, shifts, magnification=batch.magnification)
    coords = mask.coords[cols]
    t0 = time.perf_counter()
    slices = _project_level(references, level, coords)
    timings["project"] += time.perf_counter() - t0
    _score_subsets(level, batch.images[:, cols], batch.ctf[:, cols], inv_s2[:, cols], slices,
                   coords, mask.box, rot_ptr, rot_index, rot_prior, shift_ptr,
                   t_child.astype(np.int64), shift_prior, search, timings)
    return level


def _project_level(references: list[projector.Reference], level: _Level,
                   coords: np.ndarray) -> np.ndarray:
    """Slices (S, J) of the level's union table, each from its class's reference."""
    matrices = level.projection_matrices
    if len(references) == 1:
        return projector.project(references[0], matrices, coords)
    out = np.empty((level.slice_key.size, coords.shape[0]), np.complex64)
    for k, ref in enumerate(references):
        sel = np.flatnonzero(level.slice_class == k)
        if sel.size:
            out[sel] = projector.project(ref, matrices[sel], coords)
    return out


def _class_pruning(search: Search, slice_class: np.ndarray, level: int) -> dict:
    """Per-class pruning above the final level when there are several classes."""
    if level >= search.levels or slice_class.size == 0 or slice_class.max() == 0:
        return {}
    return {"slice_class": slice_class, "min_class_mass": search.min_class_mass}


def _score_subsets(level: _Level, x, ctf, w, slices, coords, box, rot_ptr, rot_index,
                   rot_prior, shift_ptr, shift_index, shift_prior, search: Search,
                   timings) -> None:
    """Run the subset E-step and store the level's nonzero weights."""
    t0 = time.perf_counter()
    post = expectation_subsets(KernelInputs(x, ctf, w, slices, level.shifts, box, coords),
                               rot_ptr, rot_index, rot_prior, shift_ptr, shift_index,
                               shift_prior, search.adaptive_fraction,
                               **_class_pruning(search, level.slice_class, level.level))
    timings["estep"] += time.perf_counter() - t0
    weights, bp = post.weights, post.block_ptr
    n_r, n_t = np.diff(rot_ptr), np.diff(shift_ptr)
    nz = np.flatnonzero(weights)
    img = np.searchsorted(bp, nz, side="right") - 1
    local = nz - bp[img]
    t_loc, r_loc = local // n_r[img], local % n_r[img]
    level.image = img
    level.shift = shift_index[shift_ptr[img] + t_loc]
    level.slice = rot_index[rot_ptr[img] + r_loc]
    level.weight = weights[nz].astype(np.float64)
    level.slices = slices
    level.log_marginal = post.log_marginal
    level.n_scored = n_r * n_t


# -- M-step weights and estimates ------------------------------------------------------------


def _adjust_weights(level: _Level, k_cls: int, search: Search, b: int):
    """The final level's nonzero M-step weights (image, slice, shift, weight)."""
    w = m_step_weights(level.image, level.slice_class[level.slice], level.weight, b, k_cls,
                       search.force_max, search.hard_class, search.class_temperature)
    keep = w > 0
    return level.image[keep], level.slice[keep], level.shift[keep], w[keep]


def m_step_weights(image: np.ndarray, klass: np.ndarray, weight: np.ndarray, n_images: int,
                   n_classes: int, force_max: bool = False, hard: bool = False,
                   temperature: float = 1.0) -> np.ndarray:
    """The posterior weights as the M-step uses them (docs/method.md, "Maximisation").

    image, klass, weight: one entry per sample (image index, its class, its posterior
    weight, summing to 1 per image). temperature: the class posterior raised to 1/T and
    renormalised (poses within a class keep their relative weights). hard: each image keeps
    only its most probable class (the seed's hard classification). force_max: within each
    class, its whole mass on its best sample (maximising over poses, marginalising over
    classes). Returns the new weights, one per entry (zeros where dropped).
    """
    w = np.asarray(weight, np.float64).copy()
    mass = np.zeros((n_images, n_classes))
    np.add.at(mass, (image, klass), w)
    if temperature != 1.0 and n_classes > 1:
        tempered = np.power(np.maximum(mass, 1e-300), 1.0 / temperature) * (mass > 0)
        tempered /= np.maximum(tempered.sum(1, keepdims=True), 1e-300)
        w = w * tempered[image, klass] / np.maximum(mass[image, klass], 1e-300)
        mass = tempered
    if hard and n_classes > 1:
        best = mass.argmax(1)
        keep = klass == best[image]
        w = np.where(keep, w / np.maximum(mass[image, klass], 1e-300), 0.0)
        mass = np.zeros_like(mass)
        mass[np.arange(n_images), best] = 1.0
    if force_max:
        key = image.astype(np.int64) * n_classes + klass
        order = np.lexsort((-w, key))
        first = order[np.r_[True, key[order][1:] != key[order][:-1]]]
        w_new = np.zeros_like(w)
        w_new[first] = mass[image[first], klass[first]]
        w = w_new
    return w


def _dense(b_idx, t_idx, s_idx, w, n_b, n_t, n_s) -> np.ndarray:
    out = np.zeros((n_b, n_t, n_s), np.float32)
    out[b_idx, t_idx, s_idx] = w
    return out


def _empty_estimates(n: int, k_cls: int) -> PoseEstimates:
    return PoseEstimates(
        class_prob=np.zeros((n, k_cls)), best_class=np.zeros(n, np.int64),
        rotations=np.tile(np.eye(3), (n, 1, 1)), angles=np.zeros((n, 3)),
        origins=np.zeros((n, 2)), max_prob=np.zeros(n), n_significant=np.zeros(n, np.int64),
        log_likelihood=np.zeros(n), angular_spread=np.zeros(n), offset_spread=np.zeros(n),
        n_samples=np.zeros(n, np.int64), amplitude=np.ones(n))


def _store_estimates(est: PoseEstimates, rows, level: _Level, b_idx, s_idx, t_idx, w,
                     k_cls: int, prev_origin, n_sig0) -> tuple[np.ndarray, np.ndarray]:
    """Best class (by mass), best pose within it, spreads, for the batch's images; returns
    each image's best slice and best translation (indices into the level's)."""
    b = rows.size
    cls = level.slice_class[s_idx]
    mass = np.zeros((b, k_cls))
    np.add.at(mass, (b_idx, cls), w)
    mass /= np.maximum(mass.sum(1, keepdims=True), 1e-300)
    best_k = mass.argmax(1)
    # best pose: largest weight within the best class
    in_best = cls == best_k[b_idx]
    order = np.lexsort((-np.where(in_best, w, -1.0), b_idx))
    first = order[np.r_[True, b_idx[order][1:] != b_idx[order][:-1]]]
    best_slice = np.zeros(b, np.int64)
    best_shift = np.zeros(b, np.int64)
    best_slice[b_idx[first]] = s_idx[first]
    best_shift[b_idx[first]] = t_idx[first]
    rot = level.rotations[best_slice]
    est.class_prob[rows] = mass
    est.best_class[rows] = best_k
    est.rotations[rows] = rot
    est.angles[rows] = np.stack(matrix_to_euler(rot), axis=1)
    est.origins[rows] = np.rint(prev_origin[rows]) + level.shifts[best_shift]
    wmax = np.zeros(b)
    np.maximum.at(wmax, b_idx, w)
    est.max_prob[rows] = wmax
    est.n_significant[rows] = n_sig0
    # spreads around the best pose (posterior RMS)
    tr = np.einsum("nij,nij->n", level.rotations[s_idx], rot[b_idx])
    theta = np.rad2deg(np.arccos(np.clip((tr - 1.0) / 2.0, -1.0, 1.0)))
    wsum = np.maximum(np.bincount(b_idx, weights=w, minlength=b), 1e-300)
    est.angular_spread[rows] = np.sqrt(np.bincount(b_idx, weights=w * theta**2, minlength=b)
                                       / wsum)
    d2 = ((level.shifts[t_idx] - level.shifts[best_shift][b_idx]) ** 2).sum(1)
    est.offset_spread[rows] = np.sqrt(np.bincount(b_idx, weights=w * d2, minlength=b) / wsum)
    est.n_samples[rows] = level.n_scored
    est.log_likelihood[rows] = level.log_marginal
    return best_slice, best_shift


def _amplitude_ratio(batch: Batch, inv_s2: np.ndarray, level: _Level,
                     best: tuple[np.ndarray, np.ndarray], references: list[projector.Reference],
                     mask, inner: np.ndarray) -> np.ndarray:
    """(B,) the least-squares factor by which each image's prediction at its best pose
    (CTF A with the CTF the batch carries) must be scaled to fit the image, over the E-step
    radius and weighted by 1/sigma2 (docs/method.md eq. (30)):
    sum_j Re(conj(CTF A) X) / sigma2 / sum_j |CTF A|^2 / sigma2."""
    best_slice, best_shift = best
    if level.slices is not None and level.slices.shape[1] == inner.size:
        pred = level.slices[best_slice]
    else:  # slices scored at a coarser radius: project the best poses at the E-step's
        sub = _Level(level.level, level.slice_class[best_slice], level.slice_key[best_slice],
                     level.rotations[best_slice], level.shifts,
                     magnification=level.magnification)
        pred = _project_level(references, sub, mask.coords[inner])
    pred = pred * batch.ctf[:, inner]
    x = projector.shift_images(batch.images[:, inner], mask.coords[inner],
                               level.shifts[best_shift], mask.box)
    w = inv_s2[:, inner]
    num = np.sum(w * (pred.real * x.real + pred.imag * x.imag), axis=1, dtype=np.float64)
    den = np.sum(w * (pred.real ** 2 + pred.imag ** 2), axis=1, dtype=np.float64)
    # an image with no signal in reach (den 0) keeps its amplitude
    return np.where(den > 0, num / np.where(den > 0, den, 1.0), 1.0)
