"""Plain NumPy reference implementations of the C++ kernels, written from the definitions
(docs/conventions.md "Projection", "Shifts"; docs/method.md eqs. (4), (13)-(15), (17)) with
explicit loops over images i, shifts t, orientations r (and samples j where a kernel works
per sample), in float64.

Also `make_problem`: random E-/M-step inputs with realistic magnitudes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from cryomap import fourier

# --------------------------------------------------------------------------------------------
# Projection, back-projection, phase shift


def _sample_point(kx: float, ky: float, rot: np.ndarray, scale: float) -> tuple[np.ndarray, bool]:
    """Reference-grid point q = scale * A^T (kx, ky, 0) (float32, as the kernels store it) and
    whether it reads the Friedel mate (q_x < 0)."""
    q = np.array([scale * (rot[0, 0] * kx + rot[1, 0] * ky),
                  scale * (rot[0, 1] * kx + rot[1, 1] * ky),
                  scale * (rot[0, 2] * kx + rot[1, 2] * ky)], dtype=np.float32)
    if q[0] < 0:
        return -q, True
    return q, False


def _lround(x: float) -> int:
    """C's lround: round half away from zero."""
    return int(math.copysign(math.floor(abs(x) + 0.5), x))


def footprint(q: np.ndarray, shape: tuple[int, int, int], interp: str
              ) -> list[tuple[tuple[int, int, int], float]]:
    """Voxels (z, y, x) of the centred half-volume of `shape` touched by point q = (qx, qy, qz)
    (qx >= 0) and their interpolation weights; out-of-grid voxels are dropped."""
    nz, ny, nx = shape
    cz, cy = nz // 2, ny // 2
    qx, qy, qz = (float(v) for v in q)
    out = []
    if interp == "nearest":
        x, y, z = _lround(qx), _lround(qy) + cy, _lround(qz) + cz
        if x < nx and 0 <= y < ny and 0 <= z < nz:
            out.append(((z, y, x), 1.0))
        return out
    x0, y0, z0 = math.floor(qx), math.floor(qy), math.floor(qz)
    dx, dy, dz = qx - x0, qy - y0, qz - z0
    for oz in (0, 1):
        for oy in (0, 1):
            for ox in (0, 1):
                w = (dx if ox else 1 - dx) * (dy if oy else 1 - dy) * (dz if oz else 1 - dz)
                x, y, z = x0 + ox, y0 + oy + cy, z0 + oz + cz
                if w == 0 or x >= nx or not (0 <= y < ny) or not (0 <= z < nz):
                    continue
                out.append(((z, y, x), w))
    return out


def project_ref(volume: np.ndarray, rotations: np.ndarray, coords: np.ndarray, scale: float,
                interp: str) -> np.ndarray:
    """slices[r, j] = V(scale * A_r^T (kx_j, ky_j, 0)) with Friedel symmetry for q_x < 0."""
    n_rot, n_pix = rotations.shape[0], coords.shape[0]
    out = np.zeros((n_rot, n_pix), np.complex128)
    for r in range(n_rot):
        for j in range(n_pix):
            q, conj = _sample_point(coords[j, 0], coords[j, 1], rotations[r], scale)
            val = sum(w * complex(volume[v]) for v, w in footprint(q, volume.shape, interp))
            out[r, j] = np.conj(val) if conj else val
    return out


def backproject_ref(data: np.ndarray, weight: np.ndarray, slices: np.ndarray,
                    slice_weights: np.ndarray, rotations: np.ndarray, coords: np.ndarray,
                    scale: float, interp: str) -> None:
    """Adjoint of project_ref, accumulated in place into data (complex) and weight (real)."""
    for r in range(rotations.shape[0]):
        for j in range(coords.shape[0]):
            q, conj = _sample_point(coords[j, 0], coords[j, 1], rotations[r], scale)
            val = np.conj(slices[r, j]) if conj else slices[r, j]
            for v, w in footprint(q, data.shape, interp):
                data[v] += w * val
                weight[v] += w * slice_weights[r, j]


def phase_factors_ref(coords: np.ndarray, shift: np.ndarray, box: int) -> np.ndarray:
    """exp(-2 pi i (kx t_x + ky t_y) / N) for each pixel (docs/conventions.md "Shifts")."""
    k = coords.astype(np.float64)
    return np.exp(-2j * np.pi * (k[:, 0] * shift[0] + k[:, 1] * shift[1]) / box)


def phase_shift_ref(images: np.ndarray, coords: np.ndarray, shifts: np.ndarray,
                    box: int) -> np.ndarray:
    """out[b, j] = images[b, j] exp(-2 pi i (kx_j s_b,x + ky_j s_b,y) / N)."""
    out = np.zeros(images.shape, np.complex128)
    for b in range(images.shape[0]):
        for j in range(images.shape[1]):
            ph = -2.0 * np.pi * (coords[j, 0] * shifts[b, 0] + coords[j, 1] * shifts[b, 1]) / box
            out[b, j] = images[b, j] * np.exp(1j * ph)
    return out


# --------------------------------------------------------------------------------------------
# E-step and M-step sums


def diff2_ref(images: np.ndarray, ctf: np.ndarray, inv_sigma2: np.ndarray, slices: np.ndarray,
              coords: np.ndarray, shifts: np.ndarray, box: int) -> np.ndarray:
    """diff2[i, t, r] = sum_j |X_ij(t) - CTF_ij A_rj|^2 inv_sigma2_ij / 2 (docs/method.md
    eq. (4))."""
    n_img, n_shift, n_rot = images.shape[0], shifts.shape[0], slices.shape[0]
    x = images.astype(np.complex128)
    a = slices.astype(np.complex128)
    out = np.zeros((n_img, n_shift, n_rot))
    for i in range(n_img):
        for t in range(n_shift):
            xt = x[i] * phase_factors_ref(coords, shifts[t], box)
            for r in range(n_rot):
                d = xt - ctf[i].astype(np.float64) * a[r]
                out[i, t, r] = 0.5 * np.sum((d.real**2 + d.imag**2) * inv_sigma2[i])
    return out


def prune_ref(w: np.ndarray, fraction: float) -> tuple[np.ndarray, int]:
    """Keep the smallest set of largest values of w (ties: lower flat index first) whose sum
    reaches fraction * total; zero the rest. Returns (kept values, their count)."""
    flat = w.ravel()
    order = np.argsort(-flat, kind="stable")
    cum = np.cumsum(flat[order])
    reached = np.nonzero(cum >= fraction * flat.sum())[0]
    n = int(reached[0]) + 1 if reached.size else flat.size
    out = np.zeros_like(flat)
    out[order[:n]] = flat[order[:n]]
    return out.reshape(w.shape), n


def expectation_ref(images: np.ndarray, ctf: np.ndarray, inv_sigma2: np.ndarray,
                    slices: np.ndarray, coords: np.ndarray, shifts: np.ndarray, box: int,
                    log_prior_rot: np.ndarray, log_prior_shift: np.ndarray,
                    significant_fraction: float) -> dict:
    """Posterior (docs/method.md eq. (17)) and per-image statistics, as returned by
    core.expectation."""
    d2 = diff2_ref(images, ctf, inv_sigma2, slices, coords, shifts, box)
    n_img, n_shift, n_rot = d2.shape
    res = {k: np.zeros(n_img, np.int64) for k in ("best_r", "best_t", "n_significant")}
    res.update({k: np.zeros(n_img) for k in ("max_prob", "log_marginal", "min_diff2")})
    res["weights"] = np.zeros(d2.shape)
    for i in range(n_img):
        logw = np.zeros((n_shift, n_rot))
        for t in range(n_shift):
            for r in range(n_rot):
                logw[t, r] = -d2[i, t, r] + log_prior_rot[r] + log_prior_shift[i, t]
        m = logw.max()
        w = np.exp(logw - m)
        w[logw - m < -87.0] = 0.0  # the kernel flushes weights below e^-87 of the best to 0
        total = w.sum()
        s2 = inv_sigma2[i].astype(np.float64)
        res["log_marginal"][i] = m + np.log(total) + np.sum(np.log(s2[s2 > 0] / (2 * np.pi)))
        if significant_fraction < 1.0:
            w, n = prune_ref(w, significant_fraction)
        else:
            n = int(np.count_nonzero(w))
        w /= w.sum()
        res["weights"][i] = w
        res["n_significant"][i] = n
        res["max_prob"][i] = w.max()
        res["best_t"][i], res["best_r"][i] = np.unravel_index(np.argmax(logw), logw.shape)
        allowed = np.isfinite(log_prior_shift[i])[:, None] & np.isfinite(log_prior_rot)[None, :]
        res["min_diff2"][i] = d2[i][allowed].min()
    return res


def maximization_sums_ref(images: np.ndarray, ctf: np.ndarray, inv_sigma2: np.ndarray,
                          slices: np.ndarray, coords: np.ndarray, shifts: np.ndarray, box: int,
                          weights: np.ndarray, pixel_shell: np.ndarray, n_shells: int
                          ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(data_slices, weight_slices, residual_power) of docs/method.md eqs. (13)-(15) (see
    em/sums.py)."""
    n_img, n_shift, n_rot = weights.shape
    x = images.astype(np.complex128)
    a = slices.astype(np.complex128)
    f = ctf.astype(np.float64)
    s2 = inv_sigma2.astype(np.float64)
    data = np.zeros(slices.shape, np.complex128)
    wsum = np.zeros(slices.shape)
    resid = np.zeros((n_img, n_shells))
    for i in range(n_img):
        for t in range(n_shift):
            xt = x[i] * phase_factors_ref(coords, shifts[t], box)
            for r in range(n_rot):
                g = float(weights[i, t, r])
                if g == 0.0:
                    continue
                data[r] += g * f[i] * xt * s2[i]
                wsum[r] += g * f[i] ** 2 * s2[i]
                d = xt - f[i] * a[r]
                np.add.at(resid[i], pixel_shell, g * (d.real**2 + d.imag**2))
    return data, wsum, resid


# --------------------------------------------------------------------------------------------
# Test problems


@dataclass
class Problem:
    images: np.ndarray  # (B, J) complex64
    ctf: np.ndarray  # (B, J) float32
    inv_sigma2: np.ndarray  # (B, J) float32
    slices: np.ndarray  # (R, J) complex64
    coords: np.ndarray  # (J, 2) float32
    shifts: np.ndarray  # (T, 2) float64
    box: int
    shell: np.ndarray  # (J,) int64

    def args(self) -> tuple:
        """Positional arguments of core.expectation / core.maximization_sums up to box."""
        return (self.images, self.ctf, self.inv_sigma2, self.slices, self.coords, self.shifts,
                self.box)


def make_problem(rng: np.random.Generator, n_img: int, n_shift: int, n_rot: int, n_pix: int,
                 box: int, gap: float = 2.0, radius: int | None = None) -> Problem:
    """Images = CTF * (a slice, shifted) + noise, with slices on a smooth closed curve so that
    neighbouring orientations are similar, and inv_sigma2 scaled so that the median gap between
    the best and second-best diff2 of an image is `gap` (posteriors neither flat nor one-hot).
    Pixels are the first J of fourier.pixel_mask(box, radius or box // 2)."""
    mask = fourier.pixel_mask(box, box // 2 if radius is None else radius)
    if n_pix > mask.n_pixels:
        raise ValueError(f"J = {n_pix} exceeds the {mask.n_pixels} pixels of box {box}")
    coords = np.ascontiguousarray(mask.coords[:n_pix])
    shell = np.ascontiguousarray(mask.shell[:n_pix])
    amp = 1.0 / (1.0 + shell)  # decaying spectrum
    basis = (rng.normal(size=(3, n_pix)) + 1j * rng.normal(size=(3, n_pix))) * amp
    theta = 2 * np.pi * (np.arange(n_rot) + rng.uniform()) / max(n_rot, 1)
    slices = (basis[0] + np.cos(theta)[:, None] * basis[1] + np.sin(theta)[:, None] * basis[2])
    shifts = rng.uniform(-2.5, 2.5, size=(n_shift, 2))
    ctf = np.cos(0.3 * shell * (1 + rng.uniform(0, 0.5, size=(n_img, 1)))) * 0.9 + 0.1 * (
        rng.uniform(size=(n_img, 1)))
    true_r = rng.integers(0, n_rot, n_img)
    true_t = rng.integers(0, n_shift, n_img)
    sigma = 0.3 * amp * rng.uniform(0.7, 1.3, size=(n_img, n_pix))
    images = np.empty((n_img, n_pix), np.complex128)
    for i in range(n_img):
        clean = ctf[i] * slices[true_r[i]] / phase_factors_ref(coords, shifts[true_t[i]], box)
        noise = sigma[i] * (rng.normal(size=n_pix) + 1j * rng.normal(size=n_pix))
        images[i] = clean + noise
    inv_s2 = 1.0 / sigma**2
    p = Problem(images.astype(np.complex64), ctf.astype(np.float32), inv_s2.astype(np.float32),
                slices.astype(np.complex64), coords, shifts, box, shell.astype(np.int64))
    if n_shift * n_rot > 1:
        d2 = diff2_ref(*p.args()).reshape(n_img, -1)
        d2.sort(axis=1)
        median_gap = float(np.median(d2[:, 1] - d2[:, 0]))
        if median_gap > 0:
            p.inv_sigma2 = (p.inv_sigma2 * (gap / median_gap)).astype(np.float32)
    return p


def regularised_average_ref(data: np.ndarray, weight: np.ndarray, tau2: np.ndarray, pad: int,
                            ndim: int, tau2_fudge: float, r_max: float,
                            minres_map: int) -> np.ndarray:
    """RELION's reconstruct on the centred padded grid, as NumPy arrays (the reference of
    core.regularised_average): V = D / max(W', <W'>_shell / 1000), W' = W + 1/(p^d T tau2) at
    shells round(|q|/p) >= minres_map (1/(0.001 W) where tau2 is 0), the mean over floor shells
    floor(|q|/p) capped at r_max - 1 inside |q| < round(r_max p), V = 0 outside; tau2 per
    shell (n,) or per voxel (no floor)."""
    nz, ny, nx = data.shape
    kz = np.arange(nz) - nz // 2
    ky = np.arange(ny) - ny // 2
    kx = np.arange(nx)
    r = np.sqrt((kz[:, None, None] ** 2 + ky[None, :, None] ** 2 + kx[None, None, :] ** 2)
                .astype(np.float64))
    shells = np.floor(r / pad + 0.5).astype(np.int64)
    inside = r < round(r_max * pad)
    w = weight.astype(np.float64)
    t2 = tau2[np.minimum(shells, tau2.size - 1)] if tau2.ndim == 1 else tau2
    with np.errstate(divide="ignore", invalid="ignore"):
        inv_tau2 = np.where(t2 > 0, 1.0 / (pad**ndim * tau2_fudge * np.where(t2 > 0, t2, 1.0)),
                            np.where(w > 1e-20, 1.0 / (0.001 * np.where(w > 1e-20, w, 1.0)),
                                     0.0))
    w = np.where(shells >= minres_map, w + inv_tau2, w)
    if tau2.ndim == 1:
        n_shells = tau2.size
        fs = np.minimum(np.floor(r / pad), max(int(r_max) - 1, 0)).astype(np.int64)
        sel = inside & (fs < n_shells)
        total = np.bincount(fs[sel], weights=w[sel], minlength=n_shells)
        count = np.bincount(fs[sel], minlength=n_shells)
        mean = np.where(count > 0, total / np.maximum(count, 1), 0.0)
        w = np.maximum(w, mean[np.minimum(fs, n_shells - 1)] / 1000.0)
    out = np.where(inside & (w > 0), data / np.where(w > 0, w, 1.0), 0.0)
    return out.astype(np.complex64)
