"""The noise model: sigma2 per optics group, per resolution shell (RELION) or per pixel.

sigma2 is the variance of each of Re and Im of an N^-2-normalised Fourier coefficient of the
noise (docs/method.md eq. (3)), so the E-step exponent is |X - CTF A|^2 / (2 sigma2).
"""

from __future__ import annotations

import numpy as np

from .. import fourier
from .data import ImageSource
from .model import initial_sigma2


class NoiseModel:
    """sigma2 (groups, N, N//2+1) on the half-plane of each optics group's images.

    per_pixel=False pools the expected residual power over each shell (RELION); True keeps it
    per pixel (docs/method.md eq. (15) literally).
    """

    def __init__(self, sigma2: np.ndarray, per_pixel: bool = False) -> None:
        self.sigma2 = np.asarray(sigma2, np.float64)
        self.per_pixel = bool(per_pixel)

    @property
    def box(self) -> int:
        return int(self.sigma2.shape[1])

    @property
    def n_groups(self) -> int:
        return int(self.sigma2.shape[0])

    @classmethod
    def from_images(cls, source: ImageSource, per_pixel: bool = False) -> NoiseModel:
        """RELION's initial estimate from the images' power: (mean |X|^2 - |mean X|^2) / 2,
        averaged over each shell unless per_pixel."""
        box = source.box
        n_groups = int(source.groups.max()) + 1
        power, total, count = source.power_statistics(n_groups)
        shells2 = fourier.shell_index_2d(box)
        n_shells = box // 2 + 1
        sigma2 = np.empty((n_groups, box, box // 2 + 1))
        for g in range(n_groups):
            mean = total[g] / max(count[g], 1)
            if per_pixel:
                sigma2[g] = (power[g] / max(count[g], 1) - np.abs(mean) ** 2) / 2.0
            else:
                s = initial_sigma2(power[g], mean, max(int(count[g]), 1), shells2, n_shells)
                sigma2[g] = s[np.minimum(shells2, n_shells - 1)]
        return cls(np.maximum(sigma2, 1e-12 * max(sigma2.max(), 1e-30)), per_pixel)

    def inv_sigma2(self, groups: np.ndarray, mask: fourier.PixelMask) -> np.ndarray:
        """1/sigma2 (B, J) float32 at the mask's pixels for images of the given optics groups;
        a pixel without a noise estimate (sigma2 <= 0) gets 0, i.e. is left out."""
        nx = mask.box // 2 + 1
        s2 = self.sigma2[np.asarray(groups)][:, mask.flat_index // nx, mask.flat_index % nx]
        return np.ascontiguousarray(np.where(s2 > 0, 1.0 / np.where(s2 > 0, s2, 1.0), 0.0),
                                    dtype=np.float32)

    def bins(self, mask: fourier.PixelMask) -> tuple[np.ndarray, int]:
        """(bin of each mask pixel, number of bins) in which residual power is summed."""
        if self.per_pixel:
            return np.arange(mask.n_pixels, dtype=np.int64), mask.n_pixels
        return mask.shell.astype(np.int64), mask.box // 2 + 1

    def bin_shells(self, mask: fourier.PixelMask) -> np.ndarray:
        """(bins,) the shell of each residual bin (`bins`)."""
        if self.per_pixel:
            return mask.shell.astype(np.int64)
        return np.arange(mask.box // 2 + 1)

    def update(self, residual: np.ndarray, count: np.ndarray, mask: fourier.PixelMask,
               max_shell: int | None = None) -> None:
        """docs/method.md eq. (15), pooled as RELION does: sigma2 = sum g |X - CTF A|^2 /
        (2 n Npix) per shell and optics group (per pixel: Npix = 1). residual (groups, bins)
        from the M-step sums over the mask's pixels, count (groups,) images. Shells beyond the
        mask, or beyond max_shell (the E-step's radius: the residual holds no projection
        there), keep their value (RELION updates sigma2 within the current size only)."""
        nx = mask.box // 2 + 1
        limit = mask.r_max if max_shell is None else min(int(max_shell), mask.r_max)
        keep = mask.shell <= limit
        rows, cols = mask.flat_index[keep] // nx, mask.flat_index[keep] % nx
        shells2 = fourier.shell_index_2d(mask.box)
        npix = np.bincount(mask.shell[keep], minlength=residual.shape[1])
        for g in range(self.n_groups):
            if count[g] == 0:
                continue
            # keep 1/sigma2 finite in float32 (a pixel with no residual would get sigma2 = 0)
            floor = 1e-12 * self.sigma2[g].max()
            if self.per_pixel:
                self.sigma2[g, rows, cols] = np.maximum(residual[g][keep] / (2.0 * count[g]),
                                                        floor)
                continue
            for s in np.nonzero(npix)[0]:
                self.sigma2[g][shells2 == s] = max(residual[g, s] / (2.0 * count[g] * npix[s]),
                                                   floor)

    def shell_spectrum(self, group: int) -> np.ndarray:
        """Mean sigma2 over each shell (N//2+1,) of a group (the model.star table)."""
        shells2 = fourier.shell_index_2d(self.box)
        n = self.box // 2 + 1
        s = np.bincount(shells2.ravel(), weights=self.sigma2[group].ravel(), minlength=n)[:n]
        c = np.bincount(shells2.ravel(), minlength=n)[:n]
        return np.where(c > 0, s / np.maximum(c, 1), 0.0)
