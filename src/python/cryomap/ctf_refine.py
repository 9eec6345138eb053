"""Per-particle defocus refinement (`cryomap ctf_refine`, RELION's relion_ctf_refine
--fit_defocus; docs/method.md eq. (31)).

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
"""

from __future__ import annotations

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


@dataclass
class DefocusFit:
    """The fit of every particle: the defocus change (Å) and the drop of the score
    (sum |X - CTF A|² / sigma2 / 2, i.e. minus the log-likelihood) it brings."""

    delta: np.ndarray  # (n,) Å, added to rlnDefocusU and rlnDefocusV
    gain: np.ndarray  # (n,) >= 0
    variance: np.ndarray  # (n,) Å², of each particle's own estimate (the score's curvature)


def _scores(params, deltas: np.ndarray, kx: np.ndarray, ky: np.ndarray, box: int,
            pixel_size: float, p: np.ndarray, q: np.ndarray) -> np.ndarray:
    """(B, G) score of each image's defocus changed by deltas[b, g]: sum_j C² Q - 2 C P with
    P = Re(conj(A) X) / sigma2 and Q = |A|² / sigma2 (each (B, J))."""
    b, g = deltas.shape
    rows = np.repeat(np.arange(b), g)
    sub = params.subset(rows)
    shifted = replace(sub, defocus_u=np.asarray(sub.defocus_u) + deltas.ravel(),
                      defocus_v=np.asarray(sub.defocus_v) + deltas.ravel())
    c = shifted.evaluate(kx, ky, box, pixel_size).reshape(b, g, -1)
    return np.einsum("bgj,bj->bg", c * c, q) - 2.0 * np.einsum("bgj,bj->bg", c, p)


def fit_defocus(particles: ParticleSet, half_maps: tuple[np.ndarray, np.ndarray],
                subset: np.ndarray, mask_radius_px: float, r_min: int, r_max: int,
                search_range: float = 2000.0, coarse_step: float = 50.0,
                fine_step: float = 5.0) -> DefocusFit:
    """The defocus change of every particle (module docstring) at its pose (rlnAngle*,
    rlnOrigin*Angst), against half map `subset[i]` (1 or 2), over the shells r_min..r_max."""
    source = ImageSource(particles, mask_radius_px, 5.0, use_ctf=True)
    box, pix = source.box, source.pixel_size
    mask = fourier.pixel_mask(box, r_max)
    use = np.flatnonzero(mask.shell >= r_min)
    coords = mask.coords[use]
    kx, ky = coords[:, 0].astype(np.float64), coords[:, 1].astype(np.float64)
    noise = NoiseModel.from_images(source)
    refs = [projector.prepare_reference(m, 2, "linear", r_max) for m in half_maps]
    angles = particles.angles()
    origins = particles.origins_px(pixel_size=pix)
    coarse = np.arange(-search_range, search_range + coarse_step / 2, coarse_step)
    fine = np.arange(-coarse_step, coarse_step + fine_step / 2, fine_step)
    n = particles.n_particles
    delta, gain, variance = np.zeros(n), np.zeros(n), np.full(n, np.inf)
    keys = source.magnification_keys(np.arange(n))
    for key in np.unique(keys):  # a batch holds one magnification class (ImageSource.batch)
        members = np.flatnonzero(keys == key)
        for start in range(0, members.size, BATCH):
            idx = members[start:start + BATCH]
            batch = source.batch(idx, mask, origins[idx])
            # the batch is translated by rint(origin): the rest of the origin here
            rest = origins[idx] - np.rint(origins[idx])
            x = projector.shift_images(batch.images, mask.coords, rest, box)[:, use]
            rot = euler_to_matrix(angles[idx, 0], angles[idx, 1], angles[idx, 2])
            if batch.magnification is not None:  # the map sampled at A^T M k
                rot = magnified_rotations(rot, batch.magnification)
            a = np.empty_like(x)
            for h in (1, 2):
                sel = np.flatnonzero(subset[idx] == h)
                if sel.size:
                    a[sel] = projector.project(refs[h - 1], rot[sel], coords)
            w = noise.inv_sigma2(batch.group, mask)[:, use].astype(np.float64)
            fit = _fit_batch(particles.ctf_params(idx), (kx, ky, box, pix),
                             w * (np.conj(a) * x).real, w * np.abs(a) ** 2, coarse, fine)
            delta[idx], gain[idx], variance[idx] = fit
    return DefocusFit(delta, gain, variance)


def _fit_batch(params, grid_args: tuple, p: np.ndarray, q: np.ndarray, coarse: np.ndarray,
               fine: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(delta, gain, variance) of a batch: the coarse grid's best point, then the fine grid
    around it; the variance from the score's curvature there."""
    b = p.shape[0]
    zero = _scores(params, np.zeros((b, 1)), *grid_args, p, q)[:, 0]
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
    return grid[rows, k], np.maximum(zero - s[rows, k], 0.0) / 2.0, variance
