"""2D classification (RELION's Class2D): K class averages, marginalising over class, in-plane
angle ψ (--psi_step, default 10°) and shift.

The 2D case of `classify`: a class average is a 2D reference whose "slices" are its in-plane
rotations A = Euler(0, 0, ψ) (CONVENTIONS §2), so the E-step, M-step sums, back-projection and
map update are the refinement's kernels with p² for p³. Classes start as averages of random
subsets of the images, each image at a random in-plane angle (seeded), unless --ref gives them.

Outputs in `outdir`: per iteration `run_itNNN_classes.mrcs` (class k is `k@file`),
`run_itNNN_model.star` (rlnClassDistribution, rlnEstimatedResolution per class),
`run_itNNN_data.star` (rlnClassNumber, rlnAnglePsi, rlnOriginX/YAngst,
rlnMaxValueProbDistribution) and `run_itNNN_state.npz` (--continue); at the end `run_classes.mrcs`,
`run_model.star`, `run_data.star`, `run_classes.png` (the averages sorted by class size, labelled
with size and resolution) and `run.log`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np

from .. import fourier, projector
from ..errors import InputError
from ..euler import euler_to_matrix
from ..io.atomic import atomic_path
from ..io.mrc import open_stack, read_map, write_stack
from ..particles import ParticleSet, load_particles
from .classify import ClassOptions, ClassState, check_classes, run_classification
from .data import ImageSource
from .mstep import padded_shells, regularised_ratio
from .refine_job import PIXEL_TOLERANCE, last_iteration


def read_references_2d(path: str | Path, particles: ParticleSet, n_classes: int
                       ) -> np.ndarray:
    """2D references for --ref: an image (`.mrc`, used for every class) or a stack (`.mrcs`,
    one image per class). Box and pixel size must match the particles. Returns (K, N, N)."""
    path = Path(path)
    if path.suffix == ".mrcs":
        with open_stack(path) as stack:
            images, pix = stack.read(np.arange(stack.n_images)), stack.pixel_size
    else:
        data, pix = read_map(path)
        if data.ndim == 3:
            raise InputError(f"{path}: a 3D map; 2D classification needs 2D references (an "
                             f"image, or a .mrcs stack with one image per class)")
        images = data[None]
    if images.shape[-1] != particles.box:
        raise InputError(f"{path}: box {images.shape[-1]} does not match the particles' "
                         f"rlnImageSize {particles.box}")
    if abs(pix - particles.pixel_size) > PIXEL_TOLERANCE:
        raise InputError(f"{path}: pixel size {pix:.4f} Å does not match the particles' "
                         f"rlnImagePixelSize {particles.pixel_size:.4f} Å")
    if images.shape[0] == 1:
        return np.repeat(images.astype(np.float64), n_classes, axis=0)
    if images.shape[0] != n_classes:
        raise InputError(f"{path}: {images.shape[0]} references for --K {n_classes}; expected "
                         f"one image or {n_classes}")
    return images.astype(np.float64)


def random_subset_averages(source: ImageSource, sigma2: np.ndarray, subsets: np.ndarray,
                           rng: np.random.Generator, pad: int = 2, interp: str = "linear",
                           subset_size: int | None = None) -> np.ndarray:
    """Initial class averages: class k is the average of the images with subsets == k (at most
    `subset_size` of them, chosen at random), each back-projected at a random in-plane angle,
    CTF-weighted (Σ CTF·X/σ² / Σ CTF²/σ², CONVENTIONS §5). Returns (K, N, N) float64."""
    box = source.box
    mask = fourier.pixel_mask(box, box // 2 - 1)
    nx = box // 2 + 1
    rows, cols = mask.flat_index // nx, mask.flat_index % nx
    n_classes = int(subsets.max()) + 1
    origins = source.particles.origins_px()
    n_shells = box // 2 + 1
    out = np.empty((n_classes, box, box))
    for k in range(n_classes):
        idx = np.flatnonzero(subsets == k)
        if subset_size is not None and idx.size > subset_size:
            idx = np.sort(rng.choice(idx, subset_size, replace=False))
        batch = source.batch(idx, mask, origins)
        inv_s2 = 1.0 / sigma2[batch.group][:, rows, cols]
        rot = euler_to_matrix(0.0, 0.0, rng.uniform(0.0, 360.0, idx.size))
        data, weight = projector.empty_sums(box, pad, mask.r_max, ndim=2)
        projector.backproject(data, weight, batch.ctf * batch.images * inv_s2,
                              batch.ctf**2 * inv_s2, rot, mask.coords, pad, interp)
        data = fourier.symmetrize_kx0_plane(data)
        weight = fourier.symmetrize_kx0_plane(weight)
        # plain average D/W inside the searched radius (no prior yet); τ² → ∞ there
        tau2 = np.where(np.arange(n_shells) <= mask.r_max, 1e30, 0.0)
        ft = regularised_ratio(data, weight, tau2, pad, 1.0, padded_shells(data.shape, pad),
                               n_shells)
        out[k] = projector.map_from_reference_ft(ft, box, pad, interp)
    return out


def write_maps(root: Path, state: ClassState, pixel_size: float) -> list[str]:
    """`<root>_classes.mrcs` (all averages); returns `k@<file>` names for rlnReferenceImage."""
    path = Path(f"{root}_classes.mrcs")
    write_stack(path, state.references, pixel_size)
    return [f"{k + 1:06d}@{path.name}" for k in range(state.n_classes)]


def plot_gallery(path: Path, state: ClassState, pixel_size: float, columns: int = 10) -> None:
    """PNG of the class averages sorted by class size (largest first), each labelled with its
    number, particle count, fraction and resolution (written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    k = state.n_classes
    sizes = np.bincount(state.class_number, minlength=k)
    order = np.lexsort((-state.distribution, -sizes))
    box = state.references.shape[-1]
    res = (box * pixel_size / np.asarray(state.class_resolution_shell, float)
           if state.class_resolution_shell is not None else np.full(k, np.nan))
    ncol = min(columns, k)
    nrow = int(np.ceil(k / ncol))
    fig, axes = plt.subplots(nrow, ncol, figsize=(1.8 * ncol, 2.2 * nrow), squeeze=False)
    for ax in axes.ravel():
        ax.axis("off")
    for i, c in enumerate(order):
        ax = axes.ravel()[i]
        ax.imshow(state.references[c], cmap="gray", origin="lower")
        ax.set_title(f"class {c + 1}: {sizes[c]} ptcls\n{100 * state.distribution[c]:.1f}%, "
                     f"{res[c]:.1f} Å", fontsize=7)
    fig.tight_layout(pad=0.6)
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=90, format="png", bbox_inches="tight")
    plt.close(fig)


def _finish(outdir: Path, state: ClassState, particles: ParticleSet) -> None:
    plot_gallery(outdir / "run_classes.png", state, particles.pixel_size)


def classify2d(star: str | Path, outdir: str | Path, options: ClassOptions,
               reference_path: str | Path | None = None, resume: bool = False,
               echo: Callable[[str], None] | None = print) -> ClassState:
    """Run (or, with resume=True, continue) a 2D classification; returns the final state."""
    if options.ndim != 2:
        raise ValueError("classify2d: options.ndim must be 2")
    particles = load_particles(star)
    check_classes(options.n_classes, particles, star)
    references = None
    if reference_path is not None and not (resume and last_iteration(Path(outdir)) is not None):
        references = read_references_2d(reference_path, particles, options.n_classes)

    def initialise(source: ImageSource, sigma2: np.ndarray, seed_class: np.ndarray,
                   rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray | None]:
        if references is not None:  # one per class: no seeds (several copies: seeds)
            distinct = len({r.tobytes() for r in references}) > 1
            return references, None if distinct else seed_class
        averages = random_subset_averages(source, sigma2, seed_class, rng, options.pad,
                                          options.interp, options.subset_size)
        return averages, seed_class

    return run_classification(particles, star, reference_path, outdir, options, initialise,
                              write_maps, resume, echo, finish=_finish)
