"""Particle images prepared for the kernels: soft-masked, Fourier-transformed, CTF'd.

All images are brought onto one Fourier grid, the reference's (box and pixel size of optics
group 1 unless given): a group with another box or pixel size is masked on its own grid
(the same mask radius in Å), transformed, and Fourier-cropped, padded or resampled onto the
reference's grid (`fourier.resample_half_plane`); its CTF is evaluated at the same spatial
frequencies (docs/conventions.md, "Optics groups"). Antisymmetric aberrations (beam tilt,
odd Zernike terms) are removed from the images: each is multiplied by the conjugate of its
phase factor, |X - CTF P A|^2 = |conj(P) X - CTF A|^2 since |P| = 1 (docs/conventions.md,
"Aberrations"). Anisotropic magnification is per optics group: `magnification_keys` and
`Batch.magnification` tell the engine which matrix to sample the reference with.

The masked half-plane FTs are cached in memory when they fit the budget the caller gives
(`cache_bytes`, from the run's --max_memory), so later iterations cost no I/O; otherwise each
batch is read again from the stacks, a few images at a time (`read_chunk`), so that a stack
larger than the memory budget streams through a bounded working set. Both ways give the same
numbers bit for bit.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from .. import fourier
from ..masks import apply_soft_mask, soft_sphere
from ..parallel import SINGLE, Ranks
from ..particles import ParticleSet
from ..projector import shift_images
from .options import default_max_memory

#: Bytes of transient arrays (float64 images, complex128 FTs) one read chunk may take.
READ_CHUNK_BYTES = 32 << 20


def read_chunk(box: int) -> int:
    """Images read and transformed at a time: a function of the box only (never of the memory
    budget), so that sums over chunks are the same whatever the budget."""
    return int(max(1, min(256, READ_CHUNK_BYTES // (32 * box * box))))


def cache_size(n_particles: int, box: int) -> int:
    """Bytes of the in-memory cache of `n_particles` masked half-plane FTs."""
    return int(n_particles) * box * (box // 2 + 1) * 8


@dataclass
class Batch:
    """One batch of particles in the kernels' layout (J masked Fourier pixels)."""

    indices: np.ndarray  # (B,) particle rows
    images: np.ndarray  # (B, J) complex64, translated by the rounded prior origin
    ctf: np.ndarray  # (B, J) float32 (ones without CTF)
    group: np.ndarray  # (B,) 0-based optics group
    # (2, 2) anisotropic magnification shared by the batch's images (None: none); the
    # reference is sampled at A^T M k (ctf.magnified_rotations)
    magnification: np.ndarray | None = None

    def select(self, rows: np.ndarray) -> Batch:
        """The images `rows` of the batch."""
        if rows.size == self.indices.size:
            return self
        return Batch(self.indices[rows], self.images[rows], self.ctf[rows], self.group[rows],
                     self.magnification)


class ImageSource:
    """Masked particle FTs for a ParticleSet on one grid (`box`, `pixel_size`; default
    optics group 1's), cached in memory when they fit `cache_bytes` (None: half of the
    default memory budget, `options.default_max_memory`), else read from the stacks batch
    by batch. mask_radius_px and mask_edge_px are in pixels of that grid. `ranks`: the
    processes that run the passes over these images (`parallel.Ranks`; default this one
    alone)."""

    def __init__(self, particles: ParticleSet, mask_radius_px: float, mask_edge_px: float = 5.0,
                 use_ctf: bool = True, cache_bytes: int | None = None,
                 box: int | None = None, pixel_size: float | None = None,
                 ranks: Ranks = SINGLE) -> None:
        self.particles = particles
        self.ranks = ranks
        grid_box, grid_pix = particles.reference_grid
        self.box = grid_box if box is None else int(box)
        self.pixel_size = grid_pix if pixel_size is None else float(pixel_size)
        self.use_ctf = use_ctf
        self.mask_radius = mask_radius_px
        self.mask_edge = mask_edge_px
        self.mask = soft_sphere(self.box, mask_radius_px, mask_edge_px, ndim=2)
        self.groups = particles.optics_group_index()
        self._group_box = particles.boxes
        self._group_pix = particles.pixel_sizes
        # groups on another grid: their own mask (same radius and edge in Å)
        self._masks: dict[int, np.ndarray] = {}
        for g in range(particles.n_groups):
            if not self._same_grid(g):
                f = self.pixel_size / self._group_pix[g]
                self._masks[g] = soft_sphere(int(self._group_box[g]), mask_radius_px * f,
                                             mask_edge_px * f, ndim=2)
        self.chunk = read_chunk(max(self.box, int(self._group_box.max())))
        self._mag_keys, self._mag_matrices = self._magnification_classes()
        if cache_bytes is None:
            cache_bytes = default_max_memory() // 2
        self._cache: np.ndarray | None = None
        if cache_size(particles.n_particles, self.box) <= cache_bytes:
            self._cache = np.empty((particles.n_particles, self.box, self.box // 2 + 1),
                                   np.complex64)
            for idx in particles.batches(self.chunk):
                self._cache[idx] = self._read(idx)

    @property
    def cached(self) -> bool:
        """Whether the images are held in memory (else streamed from the stacks)."""
        return self._cache is not None

    def _same_grid(self, group: int) -> bool:
        return (int(self._group_box[group]) == self.box
                and abs(float(self._group_pix[group]) - self.pixel_size)
                <= 1e-9 * self.pixel_size)

    def _magnification_classes(self) -> tuple[np.ndarray, list[np.ndarray | None]]:
        """Per particle the index of its optics group's magnification matrix among the
        distinct ones (0: none or the identity), and the matrices (entry 0 None)."""
        keys = np.zeros(self.particles.n_particles, np.int64)
        matrices: list[np.ndarray | None] = [None]
        if not (self.use_ctf and self.particles.has_ctf):
            return keys, matrices
        mag = self.particles.aberrations()["mag_matrix"]
        if mag is None:
            return keys, matrices
        group_key = np.zeros(self.particles.n_groups, np.int64)
        for g, m in enumerate(mag):
            if np.array_equal(m, np.eye(2)):
                continue
            for j, other in enumerate(matrices[1:], start=1):
                if np.array_equal(m, other):
                    group_key[g] = j
                    break
            else:
                matrices.append(np.array(m, np.float64))
                group_key[g] = len(matrices) - 1
        return group_key[self.groups], matrices

    def magnification_keys(self, idx: np.ndarray) -> np.ndarray:
        """(len(idx),) magnification class of each particle (0: none); a batch must hold one
        class only (the engine orders its batches so)."""
        return self._mag_keys[np.asarray(idx)]

    def _read(self, idx: np.ndarray) -> np.ndarray:
        """Masked FTs of particles idx on the source's grid (B, N, N//2+1) complex64."""
        idx = np.asarray(idx)
        groups = self.groups[idx]
        if all(self._same_grid(g) for g in np.unique(groups)):
            imgs = self.particles.read_images(idx).astype(np.float64)
            return fourier.fft2_centered(apply_soft_mask(imgs, self.mask)).astype(np.complex64)
        out = np.empty((idx.size, self.box, self.box // 2 + 1), np.complex64)
        for g in np.unique(groups):  # one box per read
            sel = np.flatnonzero(groups == g)
            imgs = self.particles.read_images(idx[sel]).astype(np.float64)
            if self._same_grid(g):
                out[sel] = fourier.fft2_centered(apply_soft_mask(imgs, self.mask))
                continue
            ft = fourier.fft2_centered(apply_soft_mask(imgs, self._masks[g]))
            out[sel] = fourier.resample_half_plane(ft, int(self._group_box[g]),
                                                   float(self._group_pix[g]), self.box,
                                                   self.pixel_size)
        return out

    def half_planes(self, idx: np.ndarray) -> np.ndarray:
        """(B, N, N//2+1) masked image FTs."""
        return self._cache[idx] if self._cache is not None else self._read(idx)

    def batch(self, idx: np.ndarray, mask: fourier.PixelMask,
              origins_px: np.ndarray) -> Batch:
        """Gather the pixels of `mask`, translate each image by its rounded origin
        (origins_px (len(idx), 2) in pixels of the source's grid; the sampled translations
        are searched around it, docs/conventions.md "Shifts"), remove the antisymmetric
        aberrations' phase and evaluate CTFs. Images are read `chunk` at a time, so only the
        (B, J) result grows with the batch. The particles must share one magnification
        class (`magnification_keys`)."""
        idx = np.asarray(idx)
        x = np.empty((idx.size, mask.n_pixels), np.complex64)
        for start in range(0, idx.size, self.chunk):
            part = slice(start, start + self.chunk)
            x[part] = mask.gather(self.half_planes(idx[part]))
        x = shift_images(x, mask.coords, np.rint(origins_px), self.box)
        ctf = np.ones((idx.size, mask.n_pixels), np.float32)
        if self.use_ctf:  # evaluated per chunk too: its float64 temporaries are (chunk, J)
            for start in range(0, idx.size, self.chunk):
                part = slice(start, start + self.chunk)
                params = self.particles.ctf_params(idx[part])
                kx, ky = mask.coords[:, 0], mask.coords[:, 1]
                ctf[part] = params.evaluate(kx, ky, self.box, self.pixel_size)
                if params.has_phase_aberrations:
                    x[part] *= np.conj(params.phase_factor(kx, ky, self.box, self.pixel_size)
                                       ).astype(np.complex64)
        keys = np.unique(self._mag_keys[idx]) if idx.size else np.zeros(1, np.int64)
        if keys.size > 1:
            raise ValueError("ImageSource.batch: particles of different magnification classes "
                             "in one batch")
        return Batch(idx, x, ctf, self.groups[idx], self._mag_matrices[int(keys[0])])

    def power_statistics(self, group_count: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per optics group: Σ|X|², Σ X (half-plane) and image count, for initial σ²."""
        shape = (group_count, self.box, self.box // 2 + 1)
        power = np.zeros(shape)
        total = np.zeros(shape, np.complex128)
        count = np.zeros(group_count)
        for idx in self.particles.batches(self.chunk):
            ft = self.half_planes(idx)
            for g in np.unique(self.groups[idx]):
                sel = self.groups[idx] == g
                power[g] += (np.abs(ft[sel]) ** 2).sum(axis=0)
                total[g] += ft[sel].sum(axis=0)
                count[g] += sel.sum()
        return power, total, count


@dataclass
class Work:
    """What a job's iterations work on and is not state: an ImageSource (its box and pixel
    size); refine's `Refinement` and initial_model's `Problem` add their options."""

    source: ImageSource

    @property
    def box(self) -> int:
        return self.source.box

    @property
    def pixel_size(self) -> float:
        return self.source.pixel_size
