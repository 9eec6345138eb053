"""Memory of a pass: how many images a batch holds (`batch_size`) and what a run's parts
take (`estimate_memory`, the figures the memory plan of jobs.base fits into --max_memory;
docs/running.md, "Memory")."""

from __future__ import annotations

import numpy as np

from .. import projector
from .search import Search

#: Orientations per image assumed for a local (or fixed-pose) search when sizing batches: its
#: windows hold a few thousand samples at most.
LOCAL_WINDOW = 4096


def batch_size(search: Search, n_classes: int, memory: int) -> int:
    """Images per batch (8 to 2048) so that a batch's dense level-0 weights (4 bytes per
    image, translation, class and orientation) stay within `memory` bytes."""
    global0 = search.local_sigma is None and not search.fixed_poses
    n_orient = search.sampling.n_orientations(0) if global0 else LOCAL_WINDOW
    per_image = 4 * max(1, search.sampling.translations().shape[0]) * n_classes * n_orient
    return int(max(8, min(2048, memory // max(per_image, 1))))


def estimate_memory(n_particles: int, box: int, pixel_size: float, n_classes: int,
                    search: Search, ndim: int, pad: int, batch_size: int, slice_memory: int,
                    threads: int, cache_bytes: int) -> dict[str, int]:
    """Estimated peak bytes of a pass, by part: the cached image transforms, the level-0
    slices of a global search, one batch's dense level-0 weights, the candidate slices of the
    levels below (bounded by slice_memory), the back-projectors and reconstruction."""
    s = search.sampling
    n_half = box * (box // 2 + 1)
    images = n_particles * n_half * 8
    cached = images if images <= cache_bytes else 0
    j = int(np.pi * search.sums_radius**2 / 2) + 1
    parts = {"images": cached}
    global0 = not (search.fixed_poses or search.local_sigma is not None)
    n_t = s.translations().shape[0]
    if global0:
        r0 = search.level_radius(0, box, pixel_size)
        j0 = int(np.pi * min(r0, search.radius) ** 2 / 2) + 1
        n_slices = n_classes * s.n_orientations(0)
        parts["level-0 slices"] = n_slices * (j0 * 8 + 72) * (2 if search.levels == 0 else 1)
        parts["level-0 weights"] = min(batch_size, n_particles) * n_t * n_slices * 4
    else:
        parts["level-0 weights"] = min(batch_size, n_particles) * n_t * LOCAL_WINDOW * 4
    parts["candidate slices"] = 3 * slice_memory if search.levels else 0
    parts["batch images"] = min(batch_size, n_particles) * j * 20
    m = projector.reference_radius(box, pad, search.sums_radius)
    grid = (1 if ndim == 2 else 2 * m + 1) * (2 * m + 1) * (m + 1)
    # the sums (one copy per thread while slices are added) and the reconstruction's
    # temporaries on the padded grid (80 bytes a voxel: measured peaks at box 192 and 256,
    # bench/refine.py --cost, were 10.7 and 8.6 bytes a voxel over 64)
    parts["back-projectors"] = n_classes * grid * 12 * (1 + max(threads - 1, 0)) + grid * 80
    parts["maps"] = n_classes * 2 * box**ndim * 8
    return parts
