"""Particle images prepared for the kernels: soft-masked, Fourier-transformed, CTF'd.

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

    def select(self, rows: np.ndarray) -> Batch:
        """The images `rows` of the batch."""
        if rows.size == self.indices.size:
            return self
        return Batch(self.indices[rows], self.images[rows], self.ctf[rows], self.group[rows])


class ImageSource:
    """Masked particle FTs for a ParticleSet, cached in memory when they fit `cache_bytes`
    (None: half of the default memory budget, `options.default_max_memory`), else read from
    the stacks batch by batch."""

    def __init__(self, particles: ParticleSet, mask_radius_px: float, mask_edge_px: float = 5.0,
                 use_ctf: bool = True, cache_bytes: int | None = None) -> None:
        self.particles = particles
        self.box = particles.box
        self.pixel_size = particles.pixel_size
        self.use_ctf = use_ctf
        self.mask_radius = mask_radius_px
        self.mask_edge = mask_edge_px
        self.mask = soft_sphere(self.box, mask_radius_px, mask_edge_px, ndim=2)
        self.groups = particles.optics_group_index()
        self.chunk = read_chunk(self.box)
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

    def _read(self, idx: np.ndarray) -> np.ndarray:
        imgs = self.particles.read_images(idx).astype(np.float64)
        return fourier.fft2_centered(apply_soft_mask(imgs, self.mask)).astype(np.complex64)

    def half_planes(self, idx: np.ndarray) -> np.ndarray:
        """(B, N, N//2+1) masked image FTs."""
        return self._cache[idx] if self._cache is not None else self._read(idx)

    def batch(self, idx: np.ndarray, mask: fourier.PixelMask,
              origins_px: np.ndarray) -> Batch:
        """Gather the pixels of `mask`, translate each image by its rounded origin
        (origins_px (len(idx), 2); the sampled translations are searched around it,
        docs/conventions.md "Shifts"), evaluate CTFs. Images are read `chunk` at a time, so
        only the (B, J) result grows with the batch."""
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
                ctf[part] = self.particles.ctf_params(idx[part]).evaluate(
                    mask.coords[:, 0], mask.coords[:, 1], self.box, self.pixel_size)
        return Batch(idx, x, ctf, self.groups[idx])

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
