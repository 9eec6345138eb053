"""3D classification (RELION's Class3D): K maps, marginalising over class, orientation and shift.

No half-set split; classes start from the reference low-passed to --ini_high, each with its own
random low-resolution perturbation (seeded), so that they can diverge; the class prior, σ², the
maps and their τ² are updated every iteration (`classify.run_class_iteration`).

Outputs in `outdir`: per iteration `run_itNNN_classNNN.mrc`, `run_itNNN_model.star`
(rlnClassDistribution, per-class SSNR, τ² and resolution), `run_itNNN_data.star` (rlnClassNumber
1-based, best pose) and `run_itNNN_state.npz` (--continue); at the end `run_classNNN.mrc`,
`run_model.star`, `run_data.star`, and `run.log`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from ..io.mrc import read_map
from ..particles import load_particles
from .classify import ClassOptions, ClassState, check_classes, run_classification
from .data import ImageSource
from .output import write_volume
from .refine3d import lowpass
from .refine_job import check_reference, last_iteration


def perturbed_references(reference: np.ndarray, pixel_size: float, resolution: float,
                         n_classes: int, strength: float, rng: np.random.Generator
                         ) -> np.ndarray:
    """K copies of the reference low-passed to `resolution` Å, each plus an independent random
    field low-passed the same way with `strength` × the low-passed map's standard deviation
    (K = 1: the low-passed reference unchanged). Returns (K, N, N, N) float64."""
    low = lowpass(np.asarray(reference, np.float64), pixel_size, resolution)
    if n_classes == 1 or strength == 0:
        return np.repeat(low[None], n_classes, axis=0)
    out = np.empty((n_classes,) + low.shape)
    for k in range(n_classes):
        noise = lowpass(rng.standard_normal(low.shape), pixel_size, resolution)
        out[k] = low + strength * low.std() / max(noise.std(), 1e-30) * noise
    return out


def write_maps(root: Path, state: ClassState, pixel_size: float) -> list[str]:
    """`<root>_classNNN.mrc` for every class; returns the names for rlnReferenceImage."""
    names = []
    for k, volume in enumerate(state.references):
        path = Path(f"{root}_class{k + 1:03d}.mrc")
        write_volume(path, volume, pixel_size)
        names.append(path.name)
    return names


def classify3d(star: str | Path, reference_path: str | Path, outdir: str | Path,
               options: ClassOptions, resume: bool = False,
               echo: Callable[[str], None] | None = print) -> ClassState:
    """Run (or, with resume=True, continue) a 3D classification; returns the final state."""
    if options.ndim != 3:
        raise ValueError("classify3d: options.ndim must be 3")
    particles = load_particles(star)
    check_classes(options.n_classes, particles, star)
    reference = None
    if not (resume and last_iteration(Path(outdir)) is not None):
        reference, ref_pixel = read_map(reference_path)
        check_reference(reference, ref_pixel, particles, reference_path)

    def initialise(source: ImageSource, sigma2: np.ndarray, seed_class: np.ndarray,
                   rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
        refs = perturbed_references(reference, source.pixel_size, options.ini_high,
                                    options.n_classes, options.perturbation, rng)
        return refs, seed_class

    return run_classification(particles, star, reference_path, outdir, options, initialise,
                              write_maps, resume, echo)
