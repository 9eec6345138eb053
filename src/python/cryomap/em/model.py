"""Model state between EM iterations: noise spectra σ², prior spectra τ² from the FSC, and the
E-step radius that follows the resolution.

Conventions (docs/method.md eqs. (3), (21), (22)): σ² is the variance of each of Re and Im of an
N^-2-normalised Fourier coefficient, one spectrum per optics group indexed by shell
round(|k|); τ² likewise for the map. The FSC and resolution are `cryomap.resolution`'s.
"""

from __future__ import annotations

from dataclasses import fields

import numpy as np

from ..fourier import shell_sums


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
