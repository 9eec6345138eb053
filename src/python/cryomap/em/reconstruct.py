"""Reconstruction from known poses (RELION's relion_reconstruct), on the refinement's path.

Each particle is back-projected at its given pose (the engine's fixed-pose search: one
candidate, weight 1), per half-set; sigma2 is re-estimated once from the residuals against the
first reconstruction, and the final map comes from both halves with tau2 from their FSC, as
at the end of a refinement. With a point group (options.sym) the sums are summed over it,
as in refinement. It is the oracle of the end-to-end tests: the best map that the true poses
allow on the same reconstruction path, and the engine of `cryomap reconstruct`.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from .data import ImageSource
from .refine import Refinement, RefineOptions, RefineState, initial_state, refine_iteration


def reconstruct_known_poses(source: ImageSource, angles: np.ndarray, origins_px: np.ndarray,
                            subset: np.ndarray, options: RefineOptions,
                            mask_radius: float | None = None, iterations: int = 2,
                            r_max: int | None = None) -> RefineState:
    """Maps from particles at known poses (angles (n, 3) degrees, origins (n, 2) px) and
    half-sets (n,) 1/2 (0: left out). Returns the final refinement state: `final_maps` holds
    the combined map and the two unfiltered half maps, `volumes` the regularised half maps,
    `fsc` the half-set FSC. r_max (px): the largest Fourier radius used (default N/2)."""
    # the CTF as the STAR file gives it (rlnCtfScalefactor included), as relion_reconstruct
    opts = replace(options, fixed_poses=True, iterations=iterations, scale=False)
    radius = source.mask_radius if mask_radius is None else mask_radius
    refinement = Refinement(source, opts, radius, r_limit=r_max)
    box = source.box
    state = initial_state(refinement, np.zeros((box,) * 3), angles, origins_px, subset)
    state.r_max = box // 2 - 1
    for _ in range(iterations):
        refine_iteration(state, refinement)
    return state
