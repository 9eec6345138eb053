"""Model state between EM iterations: noise spectra σ², prior spectra τ², FSC and resolution.

Conventions (docs/method.md eqs. (3), (21), (22)): σ² is the variance of each of Re and Im of an
N^-2-normalised Fourier coefficient, one spectrum per optics group indexed by shell
round(|k|); τ² likewise for the map; FSC per shell with FSC(0) = 1.
"""

from __future__ import annotations

from dataclasses import fields

import numpy as np


def state_from_saved(cls, values: dict, ints: tuple[str, ...] = (),
                     floats: tuple[str, ...] = ()):
    """A state dataclass from its saved values (jobs/base.save_state): the named scalars made
    int or float again (those saved as None stay None), names the class lacks dropped."""
    values = dict(values)
    for names, kind in ((ints, int), (floats, float)):
        for name in names:
            if values.get(name) is not None:
                values[name] = kind(values[name])
    known = {f.name for f in fields(cls)}
    return cls(**{k: v for k, v in values.items() if k in known})


def shell_sums(values: np.ndarray, shells: np.ndarray, n_shells: int) -> np.ndarray:
    """Sum of values over each shell index 0..n_shells-1 (indices beyond are dropped)."""
    keep = shells < n_shells
    return np.bincount(shells[keep].ravel(), weights=values[keep].ravel(), minlength=n_shells)


def fsc(ft1: np.ndarray, ft2: np.ndarray, shells: np.ndarray, n_shells: int) -> np.ndarray:
    """Fourier shell correlation of two half-grid FTs with per-element shell indices."""
    num = shell_sums(np.real(ft1 * np.conj(ft2)), shells, n_shells)
    d1 = shell_sums(np.abs(ft1) ** 2, shells, n_shells)
    d2 = shell_sums(np.abs(ft2) ** 2, shells, n_shells)
    with np.errstate(invalid="ignore", divide="ignore"):
        out = num / np.sqrt(d1 * d2)
    out = np.nan_to_num(out, nan=0.0)
    out[0] = 1.0
    return out


def resolution_shell(fsc_curve: np.ndarray, threshold: float) -> int:
    """Last shell before the FSC first drops below threshold (RELION's rule, docs/method.md
    eq. (22)); >= 1."""
    below = np.nonzero(fsc_curve[1:] < threshold)[0]
    last = (below[0] if below.size else fsc_curve.size - 1)  # index in fsc[1:] = shell - 1
    return max(int(last), 1)


def initial_sigma2(power_sum: np.ndarray, mean_ft: np.ndarray, n_images: int,
                   shells: np.ndarray, n_shells: int) -> np.ndarray:
    """σ² per shell from images' power spectra: (mean |X|² − |mean X|²)/2 averaged over each
    shell (RELION's initial noise estimate, docs/method.md eq. (24)). power_sum is Σ_i |X_i|²,
    mean_ft is mean X."""
    per_pixel = (power_sum / n_images - np.abs(mean_ft) ** 2) / 2.0
    counts = shell_sums(np.ones_like(per_pixel), shells, n_shells)
    s = shell_sums(per_pixel, shells, n_shells)
    return s / np.maximum(counts, 1)


def tau2_from_fsc(fsc_curve: np.ndarray, weight_shell_mean: np.ndarray, pad: int,
                  tau2_fudge: float, ndim: int = 3) -> np.ndarray:
    """tau2 per shell from the half-map FSC (RELION auto-refine; docs/method.md eq. (21)).

    F is clipped to [0.001, 0.999]; sigma2_rec = 1/<p^d W>_shell; tau2 = T F/(1-F) sigma2_rec.
    """
    f = np.clip(fsc_curve, 0.001, 0.999)
    with np.errstate(divide="ignore"):
        sigma2_rec = np.where(weight_shell_mean > 0, 1.0 / (pad**ndim * weight_shell_mean), 0.0)
    return tau2_fudge * f / (1.0 - f) * sigma2_rec


def ssnr_from_fsc(fsc_curve: np.ndarray, tau2_fudge: float) -> np.ndarray:
    """SSNR = T·F/(1−F) with F clipped as in tau2_from_fsc."""
    f = np.clip(fsc_curve, 0.001, 0.999)
    return tau2_fudge * f / (1.0 - f)


def next_r_max(resolution_shell_index: int, box: int, incr_size: int = 10) -> int:
    """Next iteration's pixel radius: current_size = 2·(ires + incr_size), capped at box
    (RELION's updateImageSizeAndResolutionPointers); r_max = current_size/2."""
    current_size = min(2 * (resolution_shell_index + incr_size), box)
    return current_size // 2
