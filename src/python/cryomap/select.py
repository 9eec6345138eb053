"""Subsets of particles (`cryomap select`, RELION's Select job; docs/running.md): by class
numbers, by a threshold on any column, or by ranking 2D classes by what they hold.

The ranking (`rank_classes`) reads a classification's `<root>_model.star` (beside its
`<root>_data.star`) and its class averages, and keeps a class when

- its resolution (rlnEstimatedResolution) is within RESOLUTION_FACTOR of the best class's
  (the best among classes holding at least MIN_SHARE of the particles): junk averages to no
  consistent detail;
- its average holds a centred particle: at least CENTRED_ENERGY of the average's variance
  lies within the particle's radius, and the centre of that energy is within CENTRE_OFFSET
  of the box (an edge, an aggregate or an off-centre pick spreads over the box);
- it holds at least MIN_SHARE of the particles.

Within the kept classes a particle is dropped too when

- its amplitude (rlnCtfScalefactor, as the amplitude correction writes it, docs/method.md
  eq. (30)) is below MIN_AMPLITUDE times the median: an image that fits its class only when
  scaled down is not that particle;
- its log-likelihood (rlnLogLikeliContribution, minus the residual Σ|X − a CTF A|²/σ² up to a
  constant) lies more than MAX_LIKELIHOOD_DEVIATION robust standard deviations (1.4826 × the
  median absolute deviation) below the median: signal that no class explains (an aggregate,
  an edge, ice) leaves a residual above the noise. At SNR 0.05 the classes do not gather
  such junk in classes of its own (docs/running.md has the figures).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .errors import InputError
from .io.mrc import open_stack
from .io.star import read_star

#: A class within this factor of the best class's resolution can be kept.
RESOLUTION_FACTOR = 1.5
#: Share of the class average's variance (about the outer ring's mean) inside the particle
#: radius for a centred particle.
CENTRED_ENERGY = 0.6
#: Largest distance of the average's energy centre from the box centre, in boxes.
CENTRE_OFFSET = 0.1
#: Classes with fewer than this share of the particles are dropped (and do not set the best
#: resolution).
MIN_SHARE = 0.005
#: Particles whose amplitude is below this fraction of the median are dropped by --auto.
MIN_AMPLITUDE = 0.5
#: Particles whose log-likelihood is this many robust standard deviations below the median
#: are dropped by --auto (measured on a 3300-pick, 10 %-junk set: 2.5 keeps 6.9 % of the
#: junk and drops 2.6 % of the particles; 3.0 keeps 9.8 % and drops 1.3 %).
MAX_LIKELIHOOD_DEVIATION = 2.5


@dataclass
class ClassRank:
    """One class of a classification, as `rank_classes` judged it."""

    number: int  # 1-based rlnClassNumber
    particles: int
    resolution: float  # Å
    centred_energy: float  # share of the average's variance within the particle radius
    centre_offset: float  # distance of its energy centre from the box centre, in boxes
    keep: bool
    reason: str


def model_path(data_star: Path) -> Path:
    """The model file of a classification's data file: `<root>_model.star` beside it."""
    name = data_star.name
    if not name.endswith("_data.star"):
        raise InputError(f"--i {data_star}: --auto expects a classification's "
                         f"<root>_data.star (its <root>_model.star beside it)")
    return data_star.with_name(name[: -len("_data.star")] + "_model.star")


def _class_table(model: Path) -> pd.DataFrame:
    blocks = read_star(model)
    table = blocks.get("model_classes")
    if not isinstance(table, pd.DataFrame) or "rlnReferenceImage" not in table:
        raise InputError(f"{model}: no model_classes table with rlnReferenceImage; expected "
                         f"the model file of a classification")
    return table


def _average(reference: str, folder: Path) -> np.ndarray:
    """A class average from rlnReferenceImage (`index@stack`, relative to the model's
    folder or the working folder)."""
    index, at, stack = reference.partition("@")
    if not at:
        raise InputError(f"rlnReferenceImage {reference}: not a 2D class average (index@stack);"
                         f" --auto ranks 2D classes, use --classes for 3D ones")
    path = Path(stack)
    if not path.is_absolute() and not path.exists():
        path = folder / path.name
    with open_stack(path) as stack:
        i = int(index) - 1 if index.isdigit() else -1
        if not 0 <= i < stack.n_images:
            raise InputError(f"rlnReferenceImage {reference}: {path} holds "
                             f"{stack.n_images} image(s)")
        return np.asarray(stack.read(i), np.float64).reshape(stack.box, stack.box)


def centring(average: np.ndarray, radius_px: float) -> tuple[float, float]:
    """(share of the average's variance within radius_px of the centre, distance of the
    energy centre from the centre in boxes), the variance taken about the mean of the ring
    outside the radius (the solvent)."""
    n = average.shape[0]
    y, x = np.mgrid[:n, :n] - n // 2
    r = np.hypot(x, y)
    inside = r <= radius_px
    outer = ~inside & (r < n / 2)
    background = average[outer].mean() if outer.any() else average.mean()
    energy = (average - background) ** 2
    disc = r < n / 2
    total = energy[disc].sum()
    if total <= 0:
        return 0.0, 1.0
    share = float(energy[inside].sum() / total)
    cy = float((energy[disc] * y[disc]).sum() / total)
    cx = float((energy[disc] * x[disc]).sum() / total)
    return share, float(np.hypot(cx, cy) / n)


def rank_classes(data_star: Path, particles: pd.DataFrame, radius_px: float
                 ) -> list[ClassRank]:
    """Judge every class of the classification whose data file is `data_star` (module
    docstring); radius_px: the particle's radius in pixels of the class averages."""
    model = model_path(data_star)
    table = _class_table(model)
    counts = np.bincount(particles["rlnClassNumber"].to_numpy(np.int64),
                         minlength=len(table) + 1)[1:]
    n = max(int(counts.sum()), 1)
    res = table["rlnEstimatedResolution"].to_numpy(np.float64) \
        if "rlnEstimatedResolution" in table else np.full(len(table), np.inf)
    big = counts >= MIN_SHARE * n
    best = float(np.min(res[big])) if big.any() else float(np.min(res))
    ranks = []
    for k, ref in enumerate(table["rlnReferenceImage"].astype(str)):
        share, offset = centring(_average(ref, model.parent), radius_px)
        reasons = []
        if counts[k] < MIN_SHARE * n:
            reasons.append(f"{counts[k]} particles (< {100 * MIN_SHARE:g} %)")
        if not res[k] <= RESOLUTION_FACTOR * best:
            reasons.append(f"resolution {res[k]:.1f} Å > {RESOLUTION_FACTOR:g} x the best "
                           f"({best:.1f} Å)")
        if share < CENTRED_ENERGY:
            reasons.append(f"{100 * share:.0f} % of its signal within the particle "
                           f"(< {100 * CENTRED_ENERGY:.0f} %)")
        if offset > CENTRE_OFFSET:
            reasons.append(f"off-centre by {offset:.2f} box")
        reason = ("dropped: " + "; ".join(reasons) if reasons
                  else f"kept: a centred particle at {res[k]:.1f} Å")
        ranks.append(ClassRank(k + 1, int(counts[k]), float(res[k]), share, offset,
                               not reasons, reason))
    return ranks


def select_rows(particles: pd.DataFrame, source: str, classes: list[int] | None = None,
                column: str | None = None, minimum: float | None = None,
                maximum: float | None = None) -> np.ndarray:
    """(n,) bool: the rows in `classes` (rlnClassNumber) and with `column` within
    [minimum, maximum] (either bound may be None). InputError (one line, naming `source`)
    for a missing column or a class the file does not hold."""
    keep = np.ones(len(particles), bool)
    if classes is not None:
        if "rlnClassNumber" not in particles:
            raise InputError(f"{source}: no rlnClassNumber column; --classes needs a "
                             f"classification's data file")
        have = particles["rlnClassNumber"].to_numpy(np.int64)
        missing = sorted(set(classes) - set(np.unique(have).tolist()))
        if missing:
            raise InputError(f"{source}: class(es) {', '.join(map(str, missing))} hold no "
                             f"particle; classes in the file: {int(have.min())}.."
                             f"{int(have.max())}")
        keep &= np.isin(have, classes)
    if column is not None:
        if column not in particles:
            raise InputError(f"{source}: no column {column}")
        values = pd.to_numeric(particles[column], errors="coerce").to_numpy(np.float64)
        if np.isnan(values).any():
            raise InputError(f"{source}: {column} is not numeric in every row")
        if minimum is not None:
            keep &= values >= minimum
        if maximum is not None:
            keep &= values <= maximum
    return keep


def amplitude_outliers(particles: pd.DataFrame) -> np.ndarray:
    """(n,) bool: the particles whose rlnCtfScalefactor is below MIN_AMPLITUDE times the
    median (none without the column)."""
    if "rlnCtfScalefactor" not in particles:
        return np.zeros(len(particles), bool)
    a = pd.to_numeric(particles["rlnCtfScalefactor"], errors="coerce").to_numpy(np.float64)
    median = np.nanmedian(a) if np.isfinite(a).any() else np.nan
    if not median > 0:
        return np.zeros(len(particles), bool)
    return ~(a >= MIN_AMPLITUDE * median)


def likelihood_outliers(particles: pd.DataFrame) -> np.ndarray:
    """(n,) bool: the particles whose rlnLogLikeliContribution lies more than
    MAX_LIKELIHOOD_DEVIATION robust standard deviations below the median (none without the
    column or with no spread)."""
    if "rlnLogLikeliContribution" not in particles:
        return np.zeros(len(particles), bool)
    ll = pd.to_numeric(particles["rlnLogLikeliContribution"],
                       errors="coerce").to_numpy(np.float64)
    finite = np.isfinite(ll)
    if not finite.any():
        return np.zeros(len(particles), bool)
    median = np.median(ll[finite])
    scale = 1.4826 * np.median(np.abs(ll[finite] - median))  # the MAD of a Gaussian's sigma
    if not scale > 0:
        return np.zeros(len(particles), bool)
    return ~(ll >= median - MAX_LIKELIHOOD_DEVIATION * scale)
