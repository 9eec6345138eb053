"""Post-processing of two unfiltered half maps (RELION's relion_postprocess, docs/postprocess.md).

Steps, each a function here:

1. The FSC (`resolution.fsc`) of the unmasked half maps, and of the half maps times the
   solvent mask.
2. `randomise_phases` of both halves beyond the first shell where the unmasked FSC drops below
   `randomize_at_fsc` (0.8), then masked: the FSC of these is the correlation the mask alone
   creates. `corrected_fsc` = (FSC_masked − FSC_random) / (1 − FSC_random) from two shells
   beyond that shell on, FSC_masked before (Chen et al. 2013, as RELION).
3. `resolution.resolution_shell`: the last shell before the corrected FSC first drops below 0.143.
4. The average of the two unmasked halves is weighted per shell by sqrt(2 FSC / (1 + FSC))
   (`fsc_weighting`, Rosenthal & Henderson 2003), sharpened by exp(−B s²/4) (`apply_bfactor`)
   with B from a straight-line fit to its Guinier plot (`guinier_plot`, `fit_bfactor`; B =
   4 × slope, negative for a map whose amplitudes fall off) or given, and low-passed with a
   raised-cosine edge (`fourier.lowpass_weights`).

Fourier conventions are those of `fourier`: shells round(|k|), 0..N/2, over the half grid.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import scipy.fft

from . import fourier
from .errors import InputError
from .masks import check_mask
from .resolution import first_shell_below, fsc, fsc_maps, resolution_shell


def randomise_phases(volume: np.ndarray, shell: int, seed: int = 0) -> np.ndarray:
    """The map with the phases of its Fourier components at |k| >= shell replaced by uniform
    random ones (amplitudes kept; the phases of the FT of real white noise, so Friedel pairs
    stay conjugate and the result is real). Deterministic for a seed."""
    v = np.asarray(volume, dtype=np.float64)
    n = v.shape[0]
    ft = fourier.fft3_centered(v)
    kz, ky, kx = fourier.half_volume_freqs(n)
    beyond = kx * kx + ky * ky + kz * kz >= shell * shell
    noise = scipy.fft.rfftn(np.random.default_rng(seed).standard_normal(v.shape),
                            workers=fourier.fft_workers())
    phase = np.exp(1j * np.angle(noise))
    ft = np.where(beyond, np.abs(ft) * phase, ft)
    return fourier.ifft3_centered(ft, n)


def corrected_fsc(fsc_masked: np.ndarray, fsc_random: np.ndarray, randomise_shell: int
                  ) -> np.ndarray:
    """Mask-corrected FSC: FSC_masked below randomise_shell + 2 (RELION moves the switch two
    shells out, away from artefacts at the randomisation edge), (FSC_m − FSC_r)/(1 − FSC_r)
    from there on."""
    out = np.asarray(fsc_masked, dtype=np.float64).copy()
    i = np.arange(out.size)
    far = i >= randomise_shell + 2
    with np.errstate(divide="ignore", invalid="ignore"):
        out[far] = (fsc_masked[far] - fsc_random[far]) / (1.0 - fsc_random[far])
    return out


def fsc_weighting(ft: np.ndarray, curve: np.ndarray) -> np.ndarray:
    """Multiply each shell by sqrt(2F/(1+F)) (0 where F <= 0); shells from the first with
    F < 0.0001 on, and voxels beyond n/2, are set to 0 (RELION's applyFscWeighting)."""
    n = ft.shape[0]
    shells = fourier.shell_index_3d(n)
    low = np.nonzero(curve < 1e-4)[0]
    last = (int(low[0]) - 1) if low.size else curve.size - 1
    f = np.clip(curve[: last + 1], 0.0, None)
    w = np.zeros(curve.size)
    w[: last + 1] = np.sqrt(2.0 * f / (1.0 + f))
    factor = np.where(shells <= last, w[np.minimum(shells, curve.size - 1)], 0.0)
    return ft * factor


def apply_bfactor(ft: np.ndarray, bfactor: float, pixel_size: float) -> np.ndarray:
    """Multiply by exp(−B s²/4), s = |k|/(N·pixel) in 1/Å, up to Nyquist; 0 beyond (RELION's
    applyBFactorToMap). B < 0 sharpens; B > 0 blurs."""
    n = ft.shape[0]
    kz, ky, kx = fourier.half_volume_freqs(n)
    s2 = (kx * kx + ky * ky + kz * kz) / (n * pixel_size) ** 2
    nyq2 = 1.0 / (2.0 * pixel_size) ** 2
    return np.where(s2 <= nyq2 + 1e-12, ft * np.exp(-0.25 * bfactor * s2), 0.0)


@dataclass(frozen=True)
class Guinier:
    """ln of the mean amplitude per shell 0..N/2 against s² (1/Å²); -99 where it is 0."""

    s2: np.ndarray
    ln_amplitude: np.ndarray


def guinier_plot(ft: np.ndarray, pixel_size: float) -> Guinier:
    """Guinier plot of a half-volume FT: x = (i/(N·pixel))², y = ln(mean |F| of shell i),
    shells i = 0..N/2 (round(|k|))."""
    n = ft.shape[0]
    shells = fourier.shell_index_3d(n)
    keep = shells <= n // 2
    total = np.bincount(shells[keep], weights=np.abs(ft[keep]), minlength=n // 2 + 1)
    count = np.bincount(shells[keep], minlength=n // 2 + 1)
    with np.errstate(divide="ignore", invalid="ignore"):
        y = np.where(total > 0, np.log(total / np.maximum(count, 1)), -99.0)
    i = np.arange(n // 2 + 1)
    return Guinier((i / (n * pixel_size)) ** 2, y)


@dataclass(frozen=True)
class GuinierFit:
    """Straight line y = slope·x + intercept through the Guinier points used; B = 4·slope."""

    slope: float
    intercept: float
    correlation: float  # squared correlation coefficient of the points used (RELION's)
    n_points: int

    @property
    def bfactor(self) -> float:
        return 4.0 * self.slope


def fit_bfactor(guinier: Guinier, lowres: float, highres: float) -> GuinierFit:
    """Least-squares line through the Guinier points with resolution between lowres and
    highres Å (both included; y = -99 points skipped). B = 4 × slope (Å²): a map whose
    amplitudes fall as exp(−B0 s²/4) gives B = −B0, the B that sharpens it back."""
    x, y = guinier.s2, guinier.ln_amplitude
    with np.errstate(divide="ignore"):
        res = np.where(x > 0, 1.0 / np.sqrt(np.where(x > 0, x, 1.0)), np.inf)
    use = (res <= lowres) & (res >= highres) & (y > -99.0)
    k = int(np.count_nonzero(use))
    if k < 2:
        return GuinierFit(0.0, 0.0, 0.0, k)
    xs, ys = x[use], y[use]
    sxx = np.sum((xs - xs.mean()) ** 2)
    syy = np.sum((ys - ys.mean()) ** 2)
    sxy = np.sum((xs - xs.mean()) * (ys - ys.mean()))
    slope = sxy / sxx if sxx > 0 else 0.0
    corr = sxy * sxy / (sxx * syy) if sxx > 0 and syy > 0 else 0.0
    return GuinierFit(float(slope), float(ys.mean() - slope * xs.mean()), float(corr), k)


@dataclass(frozen=True)
class PostprocessOptions:
    """RELION's postprocess options (names as on the command line; docs/postprocess.md)."""

    auto_bfac: bool = False
    autob_lowres: float = 10.0  # Å
    autob_highres: float = 0.0  # Å; 0 = the final resolution
    adhoc_bfac: float = 0.0  # Å²; used when not auto_bfac
    low_pass: float = -1.0  # Å; > 0 that resolution, < 0 the final resolution, 0 none
    randomize_at_fsc: float = 0.8
    force_mask: bool = False
    seed: int = 0


@dataclass
class PostprocessResult:
    """Everything relion_postprocess reports: curves per shell 0..N/2, resolution, B-factor,
    Guinier plots and the sharpened maps."""

    box: int
    pixel_size: float
    fsc_unmasked: np.ndarray
    fsc_masked: np.ndarray
    fsc_random_masked: np.ndarray
    fsc_corrected: np.ndarray
    fsc_part_fracmask: np.ndarray
    fraction_solvent_mask: float
    randomise_shell: int
    resolution_shell: int
    bfactor: float
    fit: GuinierFit | None
    guinier_original: Guinier
    guinier_weighted: Guinier
    guinier_sharpened: Guinier
    low_pass_applied: float  # Å, 0 if none
    sharpened: np.ndarray
    sharpened_masked: np.ndarray
    warnings: list[str] = field(default_factory=list)

    @property
    def final_resolution(self) -> float:
        """N·pixel / resolution shell (Å)."""
        return self.box * self.pixel_size / max(self.resolution_shell, 1)

    @property
    def randomise_from(self) -> float:
        """Resolution (Å) from which phases were randomised."""
        return self.box * self.pixel_size / self.randomise_shell


def check_inputs(half1: np.ndarray, half2: np.ndarray, mask: np.ndarray,
                 names: tuple[str, str, str] = ("half1", "half2", "mask")) -> None:
    """InputError unless the halves are cubic maps of one box and the mask has that box and
    values in [0, 1] (masks.check_mask)."""
    if half1.ndim != 3 or len(set(half1.shape)) != 1:
        raise InputError(f"{names[0]}: map shape {half1.shape}; expected a cubic 3D map")
    if half2.shape != half1.shape:
        raise InputError(f"{names[1]}: box {half2.shape[0]} px differs from {names[0]} "
                         f"({half1.shape[0]} px); expected two half maps of one box")
    check_mask(mask, half1.shape, names[2])


def postprocess(half1: np.ndarray, half2: np.ndarray, mask: np.ndarray, pixel_size: float,
                options: PostprocessOptions | None = None) -> PostprocessResult:
    """relion_postprocess on two unfiltered half maps and a solvent mask (module docstring).

    Raises InputError for inconsistent inputs (check_inputs), an FSC that never drops below
    randomize_at_fsc, or an automatic B-factor fit with fewer than 2 Guinier points.
    """
    o = options or PostprocessOptions()
    h1 = np.asarray(half1, dtype=np.float64)
    h2 = np.asarray(half2, dtype=np.float64)
    m = np.asarray(mask, dtype=np.float64)
    check_inputs(h1, h2, m)
    if o.auto_bfac and o.adhoc_bfac != 0:
        raise InputError(f"--adhoc_bfac {o.adhoc_bfac:g} with --auto_bfac: expected one of the "
                         f"two")
    n = h1.shape[0]
    warnings: list[str] = []

    ft1, ft2 = fourier.fft3_centered(h1), fourier.fft3_centered(h2)
    fsc_unmasked = fsc(ft1, ft2)
    fsc_masked = fsc_maps(h1 * m, h2 * m)
    r0 = first_shell_below(fsc_unmasked, o.randomize_at_fsc)
    if r0 < 1:
        raise InputError(f"--randomize_at_fsc {o.randomize_at_fsc:g}: the unmasked FSC never "
                         f"drops below it; expected half maps that differ by noise")
    rand1 = randomise_phases(h1, r0, seed=o.seed)
    rand2 = randomise_phases(h2, r0, seed=o.seed + 1)
    fsc_random = fsc_maps(rand1 * m, rand2 * m)
    if fsc_random[0] <= 0:
        fsc_random[0] = 1.0
    fsc_true = corrected_fsc(fsc_masked, fsc_random, r0)
    res_i = resolution_shell(fsc_true)
    unmasked_i = resolution_shell(fsc_unmasked)
    if unmasked_i > res_i and not o.force_mask:
        warnings.append(f"the unmasked FSC extends beyond the mask-corrected one (shell "
                        f"{unmasked_i} > {res_i}); the unmasked FSC is used (check the mask, "
                        f"or force it with --force_mask)")
        fsc_true, res_i = fsc_unmasked.copy(), unmasked_i
    elif fsc_random[max(res_i, 0)] > 0.1:
        warnings.append(f"the phase-randomised masked FSC is {fsc_random[res_i]:.2f} (> 0.10) "
                        f"at the final resolution: a softer mask would give a safer estimate")
    if res_i < 1:
        warnings.append("the FSC drops below 0.143 at shell 1: no resolution")
    resolution = n * pixel_size / max(res_i, 1)

    # Solvent fraction (cisTEM-like part_FSC, reported as RELION does).
    inside = float(np.mean(m > 0.5))
    frac = 0.476 / inside
    fsc_part = frac * fsc_unmasked / (1.0 + (frac - 1.0) * fsc_unmasked)

    ft = 0.5 * (ft1 + ft2)
    g_in = guinier_plot(ft, pixel_size)
    ft = fsc_weighting(ft, fsc_true)
    g_w = guinier_plot(ft, pixel_size)
    fit = None
    bfactor = 0.0
    if o.auto_bfac:
        highres = o.autob_highres if o.autob_highres > 0 else resolution
        fit = fit_bfactor(g_w, o.autob_lowres, highres)
        if fit.n_points < 2:
            raise InputError(f"--auto_bfac: {fit.n_points} Guinier point(s) between "
                             f"--autob_lowres {o.autob_lowres:g} A and {highres:.3g} A; expected "
                             f"at least 2 (use --adhoc_bfac for maps worse than ~10 A)")
        bfactor = fit.bfactor
    elif o.adhoc_bfac != 0:
        bfactor = float(o.adhoc_bfac)
        if bfactor > 0:
            warnings.append(f"--adhoc_bfac {bfactor:g} is positive: it blurs the map (negative "
                            f"values sharpen)")
    if bfactor != 0:
        ft = apply_bfactor(ft, bfactor, pixel_size)
    g_s = guinier_plot(ft, pixel_size)
    applied = 0.0
    if o.low_pass != 0:
        applied = o.low_pass if o.low_pass > 0 else resolution
        shell = np.floor(n * pixel_size / applied + 0.5)
        ft = ft * fourier.lowpass_weights(n, shell, 2)
    sharpened = fourier.ifft3_centered(ft, n)
    return PostprocessResult(
        box=n, pixel_size=float(pixel_size), fsc_unmasked=fsc_unmasked, fsc_masked=fsc_masked,
        fsc_random_masked=fsc_random, fsc_corrected=fsc_true, fsc_part_fracmask=fsc_part,
        fraction_solvent_mask=frac, randomise_shell=r0, resolution_shell=res_i,
        bfactor=float(bfactor), fit=fit, guinier_original=g_in, guinier_weighted=g_w,
        guinier_sharpened=g_s, low_pass_applied=float(applied), sharpened=sharpened,
        sharpened_masked=sharpened * m, warnings=warnings)
