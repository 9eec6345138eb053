"""The end of an E/M iteration, shared by refine, classify and initial_model: a pass's
per-particle estimates into the job's state, the origin prior's width (RELION's M-step), the
timings of the passes, and the rotations of the saved poses."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np

from ..euler import euler_to_matrix
from .engine import PassResult, PoseEstimates

#: RELION's minimum variance of the origin prior (--min_sigma2_offset, Å^2).
MIN_SIGMA2_OFFSET = 2.0


@dataclass
class EMState:
    """What every job's state holds (refine's, classify's and initial_model's add their
    maps and schedule): the iteration, the noise model, the E-step radius and each
    particle's best pose and statistics. Saved after every iteration (jobs.base.save_state)."""

    iteration: int
    sigma2: np.ndarray  # (groups, N, N//2+1)
    r_max: int  # px, the next E-step's Fourier radius
    angles: np.ndarray  # (n, 3) the best pose's Euler angles (degrees)
    origins_px: np.ndarray  # (n, 2)
    max_prob: np.ndarray  # (n,) rlnMaxValueProbDistribution
    n_significant: np.ndarray  # (n,) rlnNrOfSignificantSamples
    log_likelihood: np.ndarray  # (n,) rlnLogLikeliContribution
    amplitude: np.ndarray  # (n,) a_i of the image model X = a_i CTF P V + noise (eq. (30))


#: The range amplitudes are kept in, relative to their mean (an image that fits its
#: prediction with a negative or vanishing scale is junk, not a particle of another contrast).
AMPLITUDE_RANGE = (0.05, 20.0)


def store_estimates(state: EMState, members: np.ndarray, e: PoseEstimates) -> None:
    """The pose, Pmax, significant samples, log-likelihood and amplitude of a pass's images
    into a job state's per-particle arrays (rows `members`); class posteriors and spreads,
    kept by some jobs only, are stored by the job."""
    state.angles[members] = e.angles
    state.origins_px[members] = e.origins
    state.max_prob[members] = e.max_prob
    state.n_significant[members] = e.n_significant
    state.log_likelihood[members] = e.log_likelihood
    state.amplitude[members] = e.amplitude


def pass_amplitudes(state: EMState, members: np.ndarray, correct: bool) -> np.ndarray | None:
    """The amplitudes a pass over `members` uses and re-estimates (`engine.run_pass`), or
    None without the amplitude correction (a_i = 1)."""
    return state.amplitude[members] if correct else None


def normalise_amplitudes(state: EMState) -> None:
    """Amplitudes to mean 1 (the map carries the overall scale: a_i and V trade a common
    factor), each within AMPLITUDE_RANGE (docs/method.md eq. (30))."""
    a = np.clip(state.amplitude, *AMPLITUDE_RANGE)
    a = np.clip(a / a.mean(), *AMPLITUDE_RANGE)
    state.amplitude = a / a.mean()


def offset_sigma(offset_sq: float, n_images: float, pixel_size: float) -> float:
    """The origin prior's std. dev. (px) from the passes' summed posterior-expected squared
    offsets from the prior centre (docs/method.md eq. (19); two coordinates per image), no
    smaller than RELION's floor MIN_SIGMA2_OFFSET."""
    sigma2 = offset_sq / (2.0 * max(float(n_images), 1.0))
    return float(np.sqrt(max(sigma2, MIN_SIGMA2_OFFSET / pixel_size**2)))


def merge_timings(results: Iterable[PassResult], reconstruct_seconds: float
                  ) -> dict[str, float]:
    """Seconds by stage summed over the passes, and the M-step's reconstruction."""
    timings: dict[str, float] = {}
    for r in results:
        for key, v in r.timings.items():
            timings[key] = timings.get(key, 0.0) + v
    timings["reconstruct"] = reconstruct_seconds
    return timings


def rotations(angles: np.ndarray) -> np.ndarray:
    """(n, 3, 3) matrices A of (n, 3) Euler angles (rot, tilt, psi; degrees)."""
    return euler_to_matrix(angles[:, 0], angles[:, 1], angles[:, 2])
