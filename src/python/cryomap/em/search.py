"""`Search`: how an engine pass searches poses and weighs them (docs/method.md section 6)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..sampling import PoseSampling, coarse_radius


@dataclass
class Search:
    """How a pass searches poses and how it weighs them.

    sampling: the pose grid of this iteration (level 0 and its children).
    oversampling: number of levels below level 0 (0: the coarse grid alone).
    radius: Fourier radius (px) of the final level (the current resolution's radius).
    recon_radius: Fourier radius (px) of the M-step sums and the back-projection (None: radius).
        Beyond the E-step's radius the sums hold data that no pose was fitted to, so the
        half-set FSC there measures the resolution the data reach, not the search's limit.
    particle_diameter: Å, for the coarse radius of levels above the final one.
    local_sigma: degrees; a local search around each image's previous pose with this sigma
        (search to 3 sigma), None for a global search.
    fixed_poses: score each image at its previous pose only (classification without
        alignment); the translation is its previous origin.
    offset_sigma: px, std. dev. of the Gaussian prior on each image's origin around
        `offset_prior` (None: flat prior over the searched translations).
    class_prior: (K,) prior probability of each class.
    adaptive_fraction: posterior mass kept per image at every level (RELION's 0.999).
    force_max: the M-step uses only each class's best pose (with the class's mass).
    hard_class: the M-step uses only each image's most probable class.
    class_temperature: class posterior raised to 1/T before the M-step (1: plain posterior).
    image_class: (n,) for each image of the pass the one class it may take, or -1 (any); e.g.
        RELION's random seeds of the first classification iteration.
    max_significant: an image with more significant samples than this at level 0 is not
        oversampled (its posterior is too broad for finer samples to matter); cryomap's use
        of RELION's --maxsig, which RELION instead applies by keeping the most significant.
    min_class_mass: with several classes, every level above the final one keeps the
        significant samples of each class holding at least this share of an image's
        posterior (RELION keeps the most significant of all classes together, so a class
        that loses on the coarse grid is never refined).
    """

    sampling: PoseSampling
    oversampling: int
    radius: int
    particle_diameter: float
    local_sigma: float | None = None
    fixed_poses: bool = False
    offset_sigma: float | None = None
    class_prior: np.ndarray | None = None
    adaptive_fraction: float = 0.999
    force_max: bool = False
    hard_class: bool = False
    class_temperature: float = 1.0
    image_class: np.ndarray | None = None  # (n,) per pass image: its only class, -1 for any
    max_significant: int = 200
    min_class_mass: float = 1e-6
    recon_radius: int | None = None

    @property
    def sums_radius(self) -> int:
        """Fourier radius (px) of the M-step sums: recon_radius, never below radius."""
        return self.radius if self.recon_radius is None else max(self.radius,
                                                                 int(self.recon_radius))

    @property
    def levels(self) -> int:
        """Index of the final level."""
        return 0 if self.fixed_poses else int(self.oversampling)

    def level_radius(self, level: int, box: int, pixel_size: float) -> int:
        """Fourier radius of a level: the final one at `radius`; the ones above at the radius
        their angular step resolves (never above `radius`)."""
        if level >= self.levels:
            return self.radius
        r = coarse_radius(self.sampling.angular_step(level), self.particle_diameter, box,
                          pixel_size, self.sampling.ndim)
        return max(1, min(self.radius, r))
