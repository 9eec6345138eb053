"""Per-particle defocus and per-micrograph astigmatism refinement (`cryomap ctf_refine`,
RELION's relion_ctf_refine --fit_defocus; docs/method.md eqs. (31), (32)).

Each particle is compared, at its refined pose, with the projection of its own half-set's
map (so the gold standard holds): the defocus change Δ (added to rlnDefocusU and
rlnDefocusV, the astigmatism kept) minimises

    Σ_j |X_j − CTF_j(Δ) A_j|² / σ²_j,     j over the pixels between --minres and the
                                          half maps' FSC-0.143 resolution,

searched on a coarse grid over ±range and then on a fine grid around the best point.
σ² is the images' noise power per shell (`em.noise.NoiseModel.from_images`). The curvature
of the score at the best point gives each estimate's variance (reported, not used: pooling
the particles of a micrograph by these variances did worse than each particle alone on our
test sets, the curvature being a poor per-particle error at low SNR).

With an astigmatism range, the astigmatism is fitted per micrograph (rlnMicrographName): the
defocus along direction θ is D + c cos 2θ + s sin 2θ, and the change (δc, δs) shared by the
micrograph's particles minimises the sum of their scores (eq. (32)), searched on a coarse and
then a fine square grid; each particle's Δ is fitted before and again after it.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, replace

import numpy as np

from . import fourier, projector
from .ctf import magnified_rotations
from .em.data import ImageSource
from .em.noise import NoiseModel
from .euler import euler_to_matrix
from .particles import ParticleSet

#: Images scored together (memory: batch x grid x pixels float64).
BATCH = 16
#: Images whose correlations are held at once when no micrograph groups them.
GROUP = 256
#: Steps (Å) of the astigmatism search: coarse over ±range, then fine over ±1 coarse step.
ASTIGMATISM_COARSE_STEP = 100.0
ASTIGMATISM_FINE_STEP = 20.0


@dataclass
class DefocusFit:
    """The fit of every particle: its new CTF defocus, the change of the mean defocus (Å) and
    the drop of the score (sum |X - CTF A|² / sigma2 / 2, i.e. minus the log-likelihood) it
    brings."""

    delta: np.ndarray  # (n,) Å, change of the mean defocus (U + V) / 2
    gain: np.ndarray  # (n,) >= 0
    variance: np.ndarray  # (n,) Å², of each particle's own estimate (the score's curvature)
    defocus_u: np.ndarray  # (n,) Å, the new rlnDefocusU
    defocus_v: np.ndarray  # (n,) Å, the new rlnDefocusV
    defocus_angle: np.ndarray  # (n,) degrees, the new rlnDefocusAngle
    astigmatism_change: np.ndarray  # (n,) Å, |(δc, δs)| of the particle's micrograph


def _with_mean_change(params, delta: np.ndarray):
    """params with delta (same length) added to defocus U and V."""
    return replace(params, defocus_u=np.asarray(params.defocus_u) + delta,
                   defocus_v=np.asarray(params.defocus_v) + delta)


def _with_astigmatism_change(params, dc: np.ndarray, ds: np.ndarray):
    """params (length B) repeated for every (dc[g], ds[g]) (length B * G, image-major): the
    astigmatism components c = r cos 2φ, s = r sin 2φ (r = (U - V) / 2, φ the angle) changed,
    the mean defocus kept (eq. (32))."""
    u, v = np.asarray(params.defocus_u, np.float64), np.asarray(params.defocus_v, np.float64)
    phi = np.deg2rad(np.asarray(params.defocus_angle, np.float64))
    mean, r = 0.5 * (u + v), 0.5 * (u - v)
    c = (r * np.cos(2 * phi))[:, None] + np.asarray(dc)[None, :]
    s = (r * np.sin(2 * phi))[:, None] + np.asarray(ds)[None, :]
    r_new = np.hypot(c, s).ravel()
    angle = np.rad2deg(0.5 * np.arctan2(s, c)).ravel()
    rows = np.repeat(np.arange(len(params)), np.size(dc))
    sub = params.subset(rows)
    return replace(sub, defocus_u=mean[rows] + r_new, defocus_v=mean[rows] - r_new,
                   defocus_angle=angle)


def _scores(params, deltas: np.ndarray, kx: np.ndarray, ky: np.ndarray, box: int,
            pixel_size: float, p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """(B, G) score of each image's defocus changed by deltas[b, g]: sum_j C² Q - 2 C P with
    P = Re(conj(A) X) / sigma2 and Q = |A|² / sigma2 (each (B, J))."""
    b, g = deltas.shape
    rows = np.repeat(np.arange(b), g)
    shifted = _with_mean_change(params.subset(rows), deltas.ravel())
    return _score_of(shifted, b, g, kx, ky, box, pixel_size, p, q)


def _score_of(params, b: int, g: int, kx: np.ndarray, ky: np.ndarray, box: int,
              pixel_size: float, p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """(B, G) score sum_j C² Q - 2 C P of params (length B * G, image-major)."""
    c = params.evaluate(kx, ky, box, pixel_size).reshape(b, g, -1)
    return np.einsum("bgj,bj->bg", c * c, q) - 2.0 * np.einsum("bgj,bj->bg", c, p)


def fit_defocus(particles: ParticleSet, half_maps: tuple[np.ndarray, np.ndarray],
                subset: np.ndarray, mask_radius_px: float, r_min: int, r_max: int,
                search_range: float = 2000.0, coarse_step: float = 50.0,
                fine_step: float = 5.0, astigmatism_range: float = 0.0) -> DefocusFit:
    """The defocus change of every particle (module docstring) at its pose (rlnAngle*,
    rlnOrigin*Angst), against half map `subset[i]` (1 or 2), over the shells r_min..r_max;
    with astigmatism_range > 0 (Å) also each micrograph's astigmatism change within
    ±astigmatism_range per component (needs rlnMicrographName)."""
    source = ImageSource(particles, mask_radius_px, 5.0, use_ctf=True)
    box, pix = source.box, source.pixel_size
    mask = fourier.pixel_mask(box, r_max)
    use = np.flatnonzero(mask.shell >= r_min)
    coords = mask.coords[use]
    grid_args = (coords[:, 0].astype(np.float64), coords[:, 1].astype(np.float64), box, pix)
    data = _Correlations(source, mask, use, particles, subset,
                         [projector.prepare_reference(m, 2, "linear", r_max)
                          for m in half_maps])
    coarse = np.arange(-search_range, search_range + coarse_step / 2, coarse_step)
    fine = np.arange(-coarse_step, coarse_step + fine_step / 2, fine_step)
    n = particles.n_particles
    params_all = particles.ctf_params(np.arange(n))
    u, v = np.array(params_all.defocus_u, np.float64), np.array(params_all.defocus_v, np.float64)
    angle = np.array(np.broadcast_to(params_all.defocus_angle, (n,)), np.float64)
    gain, variance, astig = np.zeros(n), np.full(n, np.inf), np.zeros(n)
    for members in _groups(source, particles, astigmatism_range > 0):
        p, q = data.compute(members)
        params = params_all.subset(members)
        start = _total_score(params, grid_args, p, q)
        delta, variance[members] = _fit_rows(params, grid_args, p, q, coarse, fine)
        if astigmatism_range > 0:
            params = _with_mean_change(params, delta)
            dc, ds = _fit_astigmatism(params, grid_args, p, q, astigmatism_range)
            params = _with_astigmatism_change(params, np.array([dc]), np.array([ds]))
            astig[members] = np.hypot(dc, ds)
            delta, variance[members] = _fit_rows(params, grid_args, p, q, coarse, fine)
        params = _with_mean_change(params, delta)
        u[members], v[members] = params.defocus_u, params.defocus_v
        angle[members] = params.defocus_angle
        gain[members] = np.maximum(start - _total_score(params, grid_args, p, q), 0.0) / 2.0
    mean_change = 0.5 * (u + v) - 0.5 * (np.asarray(params_all.defocus_u)
                                         + np.asarray(params_all.defocus_v))
    return DefocusFit(mean_change, gain, variance, u, v, angle, astig)


class _Correlations:
    """P = Re(conj(A) X) / sigma2 and Q = |A|² / sigma2 of particles at their poses, A the
    projection of their own half-set's map (the sufficient statistics of every score).
    `batches` and `project` give the per-image pieces to other fits (ctf_aberrations)."""

    def __init__(self, source: ImageSource, mask, use: np.ndarray, particles: ParticleSet,
                 subset: np.ndarray, refs: list) -> None:
        self.source, self.mask, self.use, self.subset, self.refs = (source, mask, use, subset,
                                                                    refs)
        self.coords = mask.coords[use]
        self.noise = NoiseModel.from_images(source)
        self.angles = particles.angles()
        self.origins = particles.origins_px(pixel_size=source.pixel_size)

    def batches(self, idx: np.ndarray) -> Iterator[tuple]:
        """Per BATCH images of idx (one magnification class): (rows, batch, x, rot, w) with
        rows the slice of idx, batch the ImageSource.Batch (its ctf over all mask pixels),
        x (B, J) the images at the used pixels, fully translated by their origins, rot
        (B, 3, 3) the poses' A matrices (not magnified) and w (B, J) float64 1/sigma2."""
        for start in range(0, idx.size, BATCH):
            part = idx[start:start + BATCH]
            origins = self.origins[part]
            batch = self.source.batch(part, self.mask, origins)
            # the batch is translated by rint(origin): the rest of the origin here
            x = projector.shift_images(batch.images, self.mask.coords,
                                       origins - np.rint(origins), self.source.box)[:, self.use]
            a = self.angles[part]
            rot = euler_to_matrix(a[:, 0], a[:, 1], a[:, 2])
            w = self.noise.inv_sigma2(batch.group, self.mask)[:, self.use].astype(np.float64)
            yield slice(start, start + part.size), batch, x, rot, w

    def project(self, part: np.ndarray, rot: np.ndarray, coords: np.ndarray | None = None
                ) -> np.ndarray:
        """(B, J) projections of images `part` (rows of the particle table) at rot, each
        from its own half-set's map, at `coords` (default: the used pixels)."""
        coords = self.coords if coords is None else coords
        proj = np.empty((part.size, coords.shape[0]), np.complex64)
        for h in (1, 2):
            sel = np.flatnonzero(self.subset[part] == h)
            if sel.size:
                proj[sel] = projector.project(self.refs[h - 1], rot[sel], coords)
        return proj

    def compute(self, idx: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """(P, Q), each (len(idx), J) float64, for images idx of one magnification class."""
        out_p = np.empty((idx.size, self.use.size))
        out_q = np.empty_like(out_p)
        for rows, batch, x, rot, w in self.batches(idx):
            if batch.magnification is not None:  # the map sampled at A^T M k
                rot = magnified_rotations(rot, batch.magnification)
            proj = self.project(batch.indices, rot)
            out_p[rows] = w * (np.conj(proj) * x).real
            out_q[rows] = w * np.abs(proj) ** 2
        return out_p, out_q


def _groups(source: ImageSource, particles: ParticleSet, by_micrograph: bool
            ) -> list[np.ndarray]:
    """Index arrays of particles scored together: one magnification class each (as
    ImageSource.batch needs), split by micrograph when the astigmatism is fitted, else into
    chunks of GROUP (memory: 2 x chunk x pixels float64)."""
    n = particles.n_particles
    keys = source.magnification_keys(np.arange(n))
    if by_micrograph:
        names = particles.particles["rlnMicrographName"].astype(str).to_numpy()
        _, mic = np.unique(names, return_inverse=True)
        keys = keys.astype(np.int64) * (mic.max() + 1) + mic
    groups = [np.flatnonzero(keys == k) for k in np.unique(keys)]
    if by_micrograph:
        return groups
    return [g[i:i + GROUP] for g in groups for i in range(0, g.size, GROUP)]


def _total_score(params, grid_args: tuple, p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """(B,) score of each image at its parameters."""
    return _score_of(params, p.shape[0], 1, *grid_args, p, q)[:, 0]


def _fit_rows(params, grid_args: tuple, p: np.ndarray, q: np.ndarray, coarse: np.ndarray,
              fine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(delta, variance) of every image, in batches of BATCH (`_fit_batch`)."""
    n = p.shape[0]
    delta, variance = np.zeros(n), np.zeros(n)
    for start in range(0, n, BATCH):
        rows = np.arange(start, min(start + BATCH, n))
        d, var = _fit_batch(params.subset(rows), grid_args, p[rows], q[rows], coarse, fine)
        delta[rows], variance[rows] = d, var
    return delta, variance


def _fit_astigmatism(params, grid_args: tuple, p: np.ndarray, q: np.ndarray,
                     search_range: float) -> tuple[float, float]:
    """(δc, δs) minimising the summed score of one micrograph's images (eq. (32)): a
    square grid of ASTIGMATISM_COARSE_STEP over ±search_range, then of
    ASTIGMATISM_FINE_STEP around the best point."""
    def best(centre: tuple[float, float], half: float, step: float) -> tuple[float, float]:
        axis = np.arange(-half, half + step / 2, step)
        dc, ds = (a.ravel() for a in np.meshgrid(centre[0] + axis, centre[1] + axis))
        total = np.zeros(dc.size)
        for start in range(0, p.shape[0], BATCH):
            rows = np.arange(start, min(start + BATCH, p.shape[0]))
            changed = _with_astigmatism_change(params.subset(rows), dc, ds)
            total += _score_of(changed, rows.size, dc.size, *grid_args, p[rows],
                               q[rows]).sum(axis=0)
        k = int(np.argmin(total))
        return float(dc[k]), float(ds[k])

    coarse = best((0.0, 0.0), search_range, ASTIGMATISM_COARSE_STEP)
    return best(coarse, ASTIGMATISM_COARSE_STEP, ASTIGMATISM_FINE_STEP)


def _fit_batch(params, grid_args: tuple, p: np.ndarray, q: np.ndarray, coarse: np.ndarray,
               fine: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(delta, variance) of a batch: the coarse grid's best point, then the fine grid around
    it; the variance from the score's curvature there."""
    b = p.shape[0]
    s = _scores(params, np.broadcast_to(coarse, (b, coarse.size)), *grid_args, p, q)
    grid = coarse[np.argmin(s, axis=1)][:, None] + fine[None, :]
    s = _scores(params, grid, *grid_args, p, q)
    k = np.argmin(s, axis=1)
    rows = np.arange(b)
    # the log-likelihood is -score / 2: its curvature is the estimate's precision
    c = np.clip(k, 1, fine.size - 2)
    step = fine[1] - fine[0]
    curvature = (s[rows, c + 1] - 2.0 * s[rows, c] + s[rows, c - 1]) / (2.0 * step**2)
    variance = np.where(curvature > 0, 1.0 / np.where(curvature > 0, curvature, 1.0), np.inf)
    return grid[rows, k], variance
