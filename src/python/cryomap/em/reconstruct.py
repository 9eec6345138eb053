"""Reconstruction from known poses (RELION's relion_reconstruct): one M-step with each particle
at its given pose, per half-set, then the same FSC-regularised map update as refinement.

Used as the oracle in end-to-end tests (the best a refinement of the same particles can do)
and to make a map from a refined data.star.
"""

from __future__ import annotations

import numpy as np

from .. import fourier, projector
from ..euler import euler_to_matrix
from .data import ImageSource
from .refine3d import (
    HalfState,
    RefineOptions,
    combined_map,
    half_set_fsc,
    initial_noise,
    reconstruct_half_maps,
)


def reconstruct_known_poses(source: ImageSource, angles: np.ndarray, origins_px: np.ndarray,
                            subset: np.ndarray, options: RefineOptions,
                            r_max: int | None = None, batch_size: int = 256,
                            ) -> tuple[np.ndarray, list[HalfState], np.ndarray]:
    """(combined map, half states with their maps, half-set FSC) from particles at known poses.

    Each image X is translated by its origin and back-projected at its rotation as
    CTF·X/σ² with weight CTF²/σ² (CONVENTIONS §5), σ² from the images' power spectra.
    """
    box = source.box
    r_max = box // 2 - 1 if r_max is None else r_max
    mask = fourier.pixel_mask(box, r_max)
    nx = box // 2 + 1
    rows, cols = mask.flat_index // nx, mask.flat_index % nx
    sigma2 = initial_noise(source, options.noise_model)
    half = []
    for h in (1, 2):
        data, weight = projector.empty_sums(box, options.pad, r_max)
        members = np.nonzero(subset == h)[0]
        for start in range(0, members.size, batch_size):
            idx = members[start:start + batch_size]
            batch = source.batch(idx, mask, origins_px)
            # the batch is translated by the rounded origin; add the fractional rest
            x = projector.shift_images(batch.images, mask.coords,
                                       origins_px[idx] - np.rint(origins_px[idx]), box)
            inv_s2 = 1.0 / sigma2[batch.group][:, rows, cols]
            rot = euler_to_matrix(angles[idx, 0], angles[idx, 1], angles[idx, 2])
            projector.backproject(data, weight, batch.ctf * x * inv_s2,
                                  batch.ctf**2 * inv_s2, rot, mask.coords, options.pad,
                                  options.interp)
        half.append(HalfState(np.zeros((box,) * 3), fourier.symmetrize_kx0_plane(data),
                              fourier.symmetrize_kx0_plane(weight)))
    curve, tau2 = half_set_fsc(half, options, r_max, box)
    reconstruct_half_maps(half, tau2, options, box)
    return combined_map(half, curve, options, r_max, box), half, curve
