"""What real particle images have and an ideal simulation lacks (docs/simulate.md):
per-micrograph defocus with particle heights in the ice, CTF-estimation errors (defocus,
astigmatism and its angle), a spread of
particle amplitudes, junk picks, coloured noise and a signal envelope that the STAR file does
not know. `simulate.simulate_particles(..., imperfections=Imperfections(...))` applies them;
each is off by default.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import fourier
from .ctf import CtfParams

#: Kinds of junk pick, drawn with equal probability: an empty spot (noise only), ice (a smooth
#: random blob), a carbon edge (a soft step across the box) and an aggregate (several copies of
#: the particle, overlapping).
JUNK_KINDS = ("empty", "ice", "edge", "aggregate")


@dataclass(frozen=True)
class Imperfections:
    """Realistic imperfections of a simulation (every field off by default).

    n_micrographs: particles are drawn on this many micrographs, each with its own defocus,
        astigmatism and angle (0: every particle its own, the ideal simulation).
    ice_thickness: Å; each particle sits at a height uniform in ±thickness/2, which adds to
        its micrograph's defocus (the STAR file has the micrograph's value).
    ctf_error: Å; standard deviation of the error of the written defocus (one error per
        micrograph, as per-micrograph CTF estimation).
    astig_error: Å; standard deviation of the error of the written astigmatism U - V (one
        error per micrograph, or per particle without micrographs). The written U - V is
        clipped to >= 0 (U >= V stays) and to <= the written mean defocus (V > 0 stays).
    astig_angle_error: degrees; standard deviation of the error of the written astigmatism
        angle (per micrograph likewise), the written angle wrapped into [0, 180).
    amplitude_spread: standard deviation of log a_i, the particle's amplitude (log-normal,
        mean 1; ice thickness and contrast vary from particle to particle). truth.star has a_i
        as rlnCtfScalefactor.
    junk_fraction: fraction of the picks that are junk (JUNK_KINDS), class 0 in truth.star.
    noise_colour: noise power at the lowest frequencies over that at Nyquist (1: white):
        PSD(r) ∝ 1 + (noise_colour - 1) exp(-r / (N/16)), r in Fourier pixels.
    signal_bfactor: Å²; an envelope exp(-B s²/4) on the signal that the STAR file does not
        carry (rlnCtfBfactor stays the nominal value; truth.star has the sum).
    """

    n_micrographs: int = 0
    ice_thickness: float = 0.0
    ctf_error: float = 0.0
    astig_error: float = 0.0
    astig_angle_error: float = 0.0
    amplitude_spread: float = 0.0
    junk_fraction: float = 0.0
    noise_colour: float = 1.0
    signal_bfactor: float = 0.0

    def validate(self) -> None:
        """ValueError naming the field and its range."""
        checks = (
            ("n_micrographs", self.n_micrographs >= 0, ">= 0"),
            ("ice_thickness", self.ice_thickness >= 0, ">= 0 Å"),
            ("ctf_error", self.ctf_error >= 0, ">= 0 Å"),
            ("astig_error", self.astig_error >= 0, ">= 0 Å"),
            ("astig_angle_error", self.astig_angle_error >= 0, ">= 0 degrees"),
            ("amplitude_spread", 0 <= self.amplitude_spread <= 2, "in [0, 2]"),
            ("junk_fraction", 0 <= self.junk_fraction < 1, "in [0, 1)"),
            ("noise_colour", self.noise_colour > 0, "> 0"),
            ("signal_bfactor", self.signal_bfactor >= 0, ">= 0 Å²"),
        )
        for name, ok, expected in checks:
            value = getattr(self, name)
            if not (np.isfinite(value) and ok):
                raise ValueError(f"{name}: expected {expected}, got {value}")
        if int(self.n_micrographs) != self.n_micrographs:
            raise ValueError(f"n_micrographs: expected a whole number, got {self.n_micrographs}")

    @property
    def any(self) -> bool:
        """Whether any imperfection is on."""
        return self != Imperfections()


@dataclass
class Defocus:
    """Per-particle defocus (Å): the true values and those a CTF estimation writes."""

    micrograph: np.ndarray  # (n,) int, micrograph of each particle
    true_u: np.ndarray
    true_v: np.ndarray
    written_u: np.ndarray
    written_v: np.ndarray
    angle: np.ndarray  # degrees, the true astigmatism angle
    written_angle: np.ndarray  # degrees, the estimated one


def draw_defocus(n: int, defocus_range: tuple[float, float], astigmatism: float,
                 imperfections: Imperfections, rng: np.random.Generator) -> Defocus:
    """Defocus of n particles. Without micrographs each particle draws its own mean defocus
    uniform in defocus_range and astigmatism U - V uniform in [0, astigmatism] at a uniform
    angle (the ideal simulation's draws, in the same order); with n_micrographs each
    micrograph draws them and its particles share them. Heights and the estimation errors are
    then added (`Imperfections`). The astigmatism errors are drawn last and only when they
    are on, so that without them the draws are those of the simulation without them."""
    lo, hi = defocus_range
    m = int(imperfections.n_micrographs)
    if m == 0:
        mean_df = rng.uniform(lo, hi, size=n)
        astig = rng.uniform(0, astigmatism, size=n)
        angle = rng.uniform(0, 180, size=n)
        mic = np.arange(n)
    else:
        mic = rng.integers(0, m, size=n)
        mean_df = rng.uniform(lo, hi, size=m)[mic]
        astig = rng.uniform(0, astigmatism, size=m)[mic]
        angle = rng.uniform(0, 180, size=m)[mic]
    height = rng.uniform(-0.5, 0.5, size=n) * imperfections.ice_thickness
    error = rng.normal(0.0, 1.0, size=mic.max() + 1)[mic] * imperfections.ctf_error
    true_mean = mean_df + height
    written_mean = mean_df + error
    written_astig, written_angle = astig, angle
    per_mic = mic.max() + 1
    if imperfections.astig_error > 0:
        written_astig = astig + rng.normal(0.0, 1.0, size=per_mic)[mic] * imperfections.astig_error
        # an estimate keeps U >= V > 0: the magnitude is clipped into [0, written mean]
        written_astig = np.minimum(np.maximum(written_astig, 0.0), np.maximum(written_mean, 0.0))
    if imperfections.astig_angle_error > 0:
        angle_error = rng.normal(0.0, 1.0, size=per_mic)[mic] * imperfections.astig_angle_error
        written_angle = np.mod(angle + angle_error, 180.0)
    return Defocus(mic, true_mean + astig / 2, true_mean - astig / 2,
                   written_mean + written_astig / 2, written_mean - written_astig / 2, angle,
                   written_angle)


def amplitudes(n: int, spread: float, rng: np.random.Generator) -> np.ndarray:
    """(n,) log-normal amplitudes with mean 1 and standard deviation of the log `spread`."""
    return np.exp(rng.normal(-0.5 * spread * spread, spread, size=n)) if spread > 0 \
        else np.ones(n)


def apply_ctf(images: np.ndarray, ctf: CtfParams, pixel_size: float) -> np.ndarray:
    """Real-space images (b, N, N) multiplied in Fourier space by their CTFs (b rows)."""
    box = images.shape[-1]
    ky, kx = fourier.half_plane_freqs(box)
    ft = fourier.fft2_centered(images)
    model = ctf.evaluate(kx.ravel().astype(np.float64), ky.ravel().astype(np.float64), box,
                         pixel_size)
    ft = ft * model.reshape(ft.shape)
    return fourier.ifft2_centered(ft, box)


def junk_images(kinds: np.ndarray, box: int, aggregate: np.ndarray | None,
                rng: np.random.Generator) -> np.ndarray:
    """Junk signals before the CTF (b, N, N) of the given JUNK_KINDS indices, each of unit
    variance (empty ones zero). `aggregate`: (b, N, N) images for the "aggregate" kind (sums of
    projections made by the caller), normalised here."""
    out = np.zeros((kinds.size, box, box))
    y, x = np.mgrid[:box, :box] - box / 2.0
    ky, kx = fourier.half_plane_freqs(box)
    smooth = np.exp(-(kx * kx + ky * ky) / (2.0 * (box / 24.0) ** 2))
    for i, kind in enumerate(kinds):
        name = JUNK_KINDS[kind]
        if name == "ice":
            ft = fourier.fft2_centered(rng.normal(size=(1, box, box))) * smooth
            img = fourier.ifft2_centered(ft, box)[0]
        elif name == "edge":
            phi = rng.uniform(0, 2 * np.pi)
            d = x * np.cos(phi) + y * np.sin(phi) - rng.uniform(-box / 4, box / 4)
            img = np.tanh(d / rng.uniform(1.0, 4.0))
        elif name == "aggregate" and aggregate is not None:
            img = aggregate[i]
        else:
            continue
        img = img - img.mean()
        sd = img.std()
        out[i] = img / sd if sd > 0 else 0.0
    return out


def noise_filter(box: int, colour: float) -> np.ndarray:
    """(N, N//2+1) amplitude filter of coloured noise: sqrt of PSD(r) = 1 + (colour - 1)
    exp(-r / (N/16)), normalised so that the noise variance is unchanged."""
    ky, kx = fourier.half_plane_freqs(box)
    psd = 1.0 + (colour - 1.0) * np.exp(-np.hypot(kx, ky) / (box / 16.0))
    weights = fourier.hermitian_weights_2d(box)
    return np.sqrt(psd / (np.sum(psd * weights) / np.sum(weights)))


def coloured_noise(shape: tuple[int, int, int], sigma: float, colour: float,
                   rng: np.random.Generator) -> np.ndarray:
    """Gaussian noise of variance sigma² per pixel (on average over the pixels), white for
    colour 1, else with the spectrum of `noise_filter`."""
    noise = rng.normal(scale=sigma, size=shape)
    if colour == 1.0:
        return noise
    ft = fourier.fft2_centered(noise) * noise_filter(shape[-1], colour)
    return fourier.ifft2_centered(ft, shape[-1])
