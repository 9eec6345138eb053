"""Reference preparation and Fourier-slice projection / back-projection (docs/conventions.md,
"Projection").

A map of box N is zero-padded to pN, pre-corrected for the interpolation kernel's real-space
attenuation (gridding correction), transformed with `fourier.fft3_centered` and rescaled so that
a central slice equals the N^-2-normalised 2D FT of the map's sum-projection (relion_project's
intensity scale). The padded FT is cropped to the centred half-volume the kernels read; a
reference pixel k of the image grid sits at p * A^T k in it.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from functools import lru_cache

import numpy as np

from . import fourier
from ._kernels import core

INTERP = {"nearest": 0, "linear": 1}


def _interp_code(interp: str) -> int:
    try:
        return INTERP[interp]
    except KeyError:
        raise ValueError(f"interp: expected one of {sorted(INTERP)}, got {interp!r}") from None


def padded_size(box: int, pad: int) -> int:
    """Padded box p*N."""
    if pad < 1:
        raise ValueError("pad: expected >= 1")
    return box * pad


@lru_cache(maxsize=4)
def gridding_correction(box: int, pad: int, interp: str, ndim: int = 3) -> np.ndarray:
    """Real-space attenuation of the interpolation kernel on a box-sized grid (centred).

    Trilinear interpolation on the pN grid multiplies the map by sinc^2(pi r / (pN)); nearest
    neighbour by sinc(pi r / (pN)). Maps are divided by this before projection and after
    reconstruction (RELION's griddingCorrect).
    """
    c = np.arange(box) - fourier.origin(box)
    grids = np.meshgrid(*([c] * ndim), indexing="ij")
    r = np.sqrt(sum(g.astype(np.float64) ** 2 for g in grids))
    out = gridding_kernel(r / (pad * box), interp)
    out.flags.writeable = False  # cached: shared by every caller
    return out


def gridding_kernel(x: np.ndarray, interp: str) -> np.ndarray:
    """The attenuation at distance x (in units of the padded box) from the centre: sinc^2(x)
    for trilinear interpolation, sinc(x) for nearest neighbour (numpy's sinc(x) =
    sin(pi x)/(pi x))."""
    s = np.sinc(x)
    return s * s if interp == "linear" else s


def _embed(x: np.ndarray, n_pad: int) -> np.ndarray:
    """Zero-pad a centred box so that its origin floor(N/2) lands on floor(pN/2)."""
    n = x.shape[-1]
    off = fourier.origin(n_pad) - fourier.origin(n)
    out = np.zeros((n_pad,) * x.ndim, dtype=np.float64)
    out[tuple(slice(off, off + n) for _ in range(x.ndim))] = x
    return out


def _crop(x: np.ndarray, n: int) -> np.ndarray:
    off = fourier.origin(x.shape[-1]) - fourier.origin(n)
    return x[tuple(slice(off, off + n) for _ in range(x.ndim))]


@dataclass(frozen=True)
class Reference:
    """A reference in the kernels' layout: centred half-volume (3D) or half-plane (2D)."""

    data: np.ndarray  # (2m+1, 2m+1, m+1) or (1, 2m+1, m+1) complex64
    box: int
    pad: int
    interp: str

    @property
    def ndim(self) -> int:
        return 2 if self.data.shape[0] == 1 else 3


def reference_radius(box: int, pad: int, r_max: float | None) -> int:
    """Centred crop radius m on the padded grid covering image shells up to r_max."""
    r = box // 2 if r_max is None else min(float(r_max), box / 2)
    # pixels of shell r reach |k| < r + 1/2; +2 keeps their trilinear footprint inside the
    # array (the kernels' bounds-check-free path), zeros beyond the padded box's Nyquist
    return int(np.ceil(pad * (r + 0.5))) + 2


def prepare_reference(volume: np.ndarray, pad: int = 2, interp: str = "linear",
                      r_max: float | None = None) -> Reference:
    """Fourier reference of a real map (N, N, N) or 2D image (N, N) for projection."""
    volume = np.asarray(volume, dtype=np.float64)
    ndim = volume.ndim
    if ndim not in (2, 3) or any(s != volume.shape[0] for s in volume.shape):
        raise ValueError(f"expected a square image or cubic map, got shape {volume.shape}")
    n = volume.shape[0]
    _interp_code(interp)
    n_pad = padded_size(n, pad)
    corrected = volume / gridding_correction(n, pad, interp, ndim)
    m = reference_radius(n, pad, r_max)
    if ndim == 3:
        # single precision, as the reference is kept (complex64); the padded FFT pruned to
        # the box and the kept frequencies
        centred = fourier.padded_centred_ft(corrected, n_pad, m) * np.float32(
            float(n_pad) ** 3 / float(n) ** 2)
    else:
        ft = fourier.fft2_centered(_embed(corrected, n_pad)) * (float(n_pad) ** 2
                                                                / float(n) ** 2)
        centred = fourier.to_centred(ft, m)
    return Reference(nyquist_sphere(centred, n, pad), n, pad, interp)


def nyquist_sphere(centred: np.ndarray, box: int, pad: int) -> np.ndarray:
    """The centred padded FT with every voxel beyond the box's Nyquist sphere set to zero:
    RELION's projector keeps r^2 <= round(pad * (N // 2))^2 only (docs/conventions.md,
    "Projection"), so interpolation near |k| = N/2 reads the same values as relion_project."""
    m = centred.shape[-1] - 1
    k = np.arange(-m, m + 1, dtype=np.float64)
    kz = k[:, None, None] if centred.shape[0] > 1 else np.zeros((1, 1, 1))
    r2 = kz**2 + k[None, :, None] ** 2 + np.arange(m + 1, dtype=np.float64)[None, None, :] ** 2
    limit = float(np.round(pad * (box // 2))) ** 2
    centred[r2 > limit] = 0
    return centred


def project(reference: Reference, rotations: np.ndarray, coords: np.ndarray) -> np.ndarray:
    """Central slices (R, J) complex64 of a reference at rotations (R, 3, 3) (RELION A
    matrices) for image pixels coords (J, 2) (kx, ky), in N^-2-normalised image FT units."""
    return core.project(reference.data, np.ascontiguousarray(rotations, dtype=np.float64),
                        np.ascontiguousarray(coords, dtype=np.float32), float(reference.pad),
                        _interp_code(reference.interp))


def empty_sums(box: int, pad: int, r_max: float | None, ndim: int = 3
               ) -> tuple[np.ndarray, np.ndarray]:
    """Zeroed back-projection accumulators (data complex64, weight float32), centred layout."""
    m = reference_radius(box, pad, r_max)
    shape = (1 if ndim == 2 else 2 * m + 1, 2 * m + 1, m + 1)
    return np.zeros(shape, np.complex64), np.zeros(shape, np.float32)


def backproject(data: np.ndarray, weight: np.ndarray, slices: np.ndarray,
                slice_weights: np.ndarray, rotations: np.ndarray, coords: np.ndarray,
                pad: int, interp: str) -> None:
    """Accumulate slices (R, J) and their weights into data/weight in place (adjoint of
    project, same interpolation). data/weight may be stacks (C, ...) of C copies: up to C
    threads then accumulate at once, each into its own copy (their sum is the result); a
    single volume is accumulated by one thread."""
    core.backproject(data, weight, np.ascontiguousarray(slices, dtype=np.complex64),
                     np.ascontiguousarray(slice_weights, dtype=np.float32),
                     np.ascontiguousarray(rotations, dtype=np.float64),
                     np.ascontiguousarray(coords, dtype=np.float32), float(pad),
                     _interp_code(interp))


def map_from_reference_ft(centred: np.ndarray, box: int, pad: int, interp: str) -> np.ndarray:
    """Real-space map (or 2D image) of box N from a reconstructed centred padded FT.

    Back to real space, window to N, and divide by the gridding correction to undo the
    attenuation of back-projection's interpolation (RELION's reconstruct). Note that
    prepare_reference divides by it too, so this is not prepare_reference's inverse.
    """
    n_pad = padded_size(box, pad)
    # single precision: the sums are float32 already, and the padded FFT is the iteration's
    # largest (float64 would cost 3x the time and twice the memory)
    if centred.shape[0] == 1:
        full = fourier.from_centred(centred, n_pad, np.complex64)
        x = fourier.ifft2_centered(full, n_pad) * (float(box) ** 2 / float(n_pad) ** 2)
        return _crop(x, box) / gridding_correction(box, pad, interp, 2)
    # the window alone, pruned: the padded volume is never formed
    x = fourier.centred_ft_to_box(centred, n_pad, box) * (float(box) ** 2 / float(n_pad) ** 3)
    return x / gridding_correction(box, pad, interp, 3)


def shift_images(images_ft: np.ndarray, coords: np.ndarray, shifts: np.ndarray,
                 box: int) -> np.ndarray:
    """Translate masked image FTs (B, J) by shifts (B, 2) pixels: X(k) exp(-2 pi i k.s / N)
    (RELION's sign: an image is translated by +origin before comparison; docs/conventions.md,
    "Shifts")."""
    return core.phase_shift(np.ascontiguousarray(images_ft, dtype=np.complex64),
                            np.ascontiguousarray(coords, dtype=np.float32),
                            np.ascontiguousarray(shifts, dtype=np.float64), int(box))


class BackProjector:
    """Posterior-weighted sums of data and weight on the centred padded Fourier grid, and the
    map they give (RELION's BackProjector): D = sum g CTF X / sigma2 and W = sum g CTF^2 / sigma2
    (the numerator and denominator of docs/method.md eq. (13)), accumulated slice by slice.

    One regularisation rule serves refinement, classification and known-pose reconstruction
    (`reconstruct`).
    """

    def __init__(self, box: int, pad: int = 2, r_max: float | None = None,
                 interp: str = "linear", ndim: int = 3) -> None:
        self.box, self.pad, self.interp, self.ndim = int(box), int(pad), interp, int(ndim)
        self.r_max = box // 2 if r_max is None else float(r_max)
        self._data, self._weight = empty_sums(box, pad, self.r_max, ndim)
        # one accumulator per thread while slices are added (`add_slices`), summed into
        # data/weight when these are read: the kernel's threads never share a voxel
        self._copies: tuple[np.ndarray, np.ndarray] | None = None
        self._folded = False
        self.symmetry = "C1"  # the point group the sums were summed over (symmetrise)

    def _gather(self) -> None:
        """Sum the per-thread accumulators into data and weight (fixed order)."""
        if self._copies is not None:
            d, w = self._copies
            self._copies = None
            self._data = self._data + d.sum(axis=0)
            self._weight = self._weight + w.sum(axis=0)

    @property
    def data(self) -> np.ndarray:
        """D on the centred padded grid (complex64)."""
        self._gather()
        return self._data

    @data.setter
    def data(self, value: np.ndarray) -> None:
        self._gather()
        self._data = value

    @property
    def weight(self) -> np.ndarray:
        """W on the centred padded grid (float32)."""
        self._gather()
        return self._weight

    @weight.setter
    def weight(self, value: np.ndarray) -> None:
        self._gather()
        self._weight = value

    def add_slices(self, data_slices: np.ndarray, weight_slices: np.ndarray,
                   rotations: np.ndarray, coords: np.ndarray) -> None:
        """Back-project slice sums (R, J) at rotations (R, 3, 3) for image pixels coords."""
        if self._folded:
            raise RuntimeError("BackProjector: sums already finished; start a new one")
        if self._copies is None:
            shape = (max(1, core.max_threads()),) + self._data.shape
            self._copies = (np.zeros(shape, np.complex64), np.zeros(shape, np.float32))
        backproject(self._copies[0], self._copies[1], data_slices, weight_slices, rotations,
                    coords, self.pad, self.interp)

    def finish(self) -> BackProjector:
        """Fold the redundant kx = 0 plane (Hermitian symmetry); call once, after all slices."""
        if not self._folded:
            self.data = fourier.symmetrize_kx0_plane(self.data)
            self.weight = fourier.symmetrize_kx0_plane(self.weight)
            self._folded = True
        return self

    def symmetrise(self, name: str) -> BackProjector:
        """Sum the data and weight over a point group's operators (RELION symmetrises the
        BackProjector before reconstruct; `symmetry.symmetrize_sums`): sums of slices searched
        over one asymmetric unit then stand for a search over all directions. After `finish`
        (the Hermitian fold), once; voxels up to round(r_max * pad) on the padded grid, as
        RELION. C1 does nothing. Returns self."""
        from .symmetry import point_group, symmetrize_sums

        g = point_group(name)
        if g.order == 1:
            return self
        if self.ndim != 3:
            raise ValueError(f"BackProjector.symmetrise: {g.name} needs 3D sums")
        if not self._folded:
            raise RuntimeError("BackProjector.symmetrise: call finish() first (the kx = 0 "
                               "plane must be folded)")
        if self.symmetry != "C1":
            raise RuntimeError(f"BackProjector.symmetrise: already summed over "
                               f"{self.symmetry}")
        m = self.data.shape[2] - 1
        radius = min(round(self.r_max * self.pad), m - 1)
        self.data, self.weight = symmetrize_sums(self.data, self.weight, g, radius)
        self.symmetry = g.name
        return self

    def cropped(self, r_max: float) -> BackProjector:
        """The sums up to radius r_max (box px) on the smallest centred grid that holds them
        (the same voxels; a reconstruction to r_max reads nothing beyond). Self is left as it
        is; where its grid is already that small, the two share their sums."""
        self._gather()
        m = reference_radius(self.box, self.pad, r_max)
        full = self.data.shape[-1] - 1
        out = copy.copy(self)
        if m < full:
            c = slice(full - m, full + m + 1)
            rows = slice(None) if self.ndim == 2 else c
            out._data = np.ascontiguousarray(self.data[rows, c, : m + 1])
            out._weight = np.ascontiguousarray(self.weight[rows, c, : m + 1])
            out.r_max = min(float(r_max), self.r_max)
        return out

    def add(self, other: BackProjector) -> None:
        """Add another back-projector's sums (same grid) into this one."""
        if other.data.shape != self.data.shape:
            raise ValueError("BackProjector.add: different grids")
        self.data = self.data + other.data
        self.weight = self.weight + other.weight

    @classmethod
    def pooled(cls, bps: list[BackProjector]) -> BackProjector:
        """One back-projector holding the sums of several on the same grid (e.g. two
        half-sets'); the inputs are left as they are."""
        bps[0]._gather()
        out = copy.copy(bps[0])
        for bp in bps[1:]:
            out.add(bp)
        return out

    def shells(self) -> np.ndarray:
        """Shell index (unpadded Fourier px) of every voxel: round(|q| / p)."""
        return padded_shells(self.data.shape, self.pad)

    def reconstruct_ft(self, tau2: np.ndarray, tau2_fudge: float = 1.0,
                       r_max: float | None = None, minres_map: int = 5) -> np.ndarray:
        """The regularised map on the padded grid (centred layout), RELION's reconstruct:
        V = D / max(W', <W'>_shell / 1000) with W' = W + 1/(p^d T tau2) (docs/method.md
        eq. (20), RELION's form of eq. (14)); where tau2 is 0 the term is 1/(0.001 W) (almost
        no regularisation), below shell `minres_map` no term is added, and beyond r_max V = 0.

        tau2: per shell (N//2+1,) or per voxel (the grid's shape; then no floor). The C++
        kernel `core.regularised_average` (its NumPy reference: tests/reference_kernels.py).
        """
        r_max = self.r_max if r_max is None else float(r_max)
        tau2 = np.asarray(tau2, np.float64)
        if tau2.ndim == 1:  # one value per shell 0..N/2 (the last one beyond)
            n_shells = self.box // 2 + 1
            tau2 = tau2[np.minimum(np.arange(n_shells), tau2.size - 1)]
        return core.regularised_average(self.data, self.weight, np.ascontiguousarray(tau2),
                                        float(self.pad), self.ndim, float(tau2_fudge), r_max,
                                        int(minres_map))

    def reconstruct(self, tau2: np.ndarray, tau2_fudge: float = 1.0,
                    r_max: float | None = None, minres_map: int = 5) -> np.ndarray:
        """The regularised map in real space, box N (see reconstruct_ft)."""
        return map_from_reference_ft(self.reconstruct_ft(tau2, tau2_fudge, r_max, minres_map),
                                     self.box, self.pad, self.interp)

    def shell_mean_weight(self) -> np.ndarray:
        """Mean of W over each shell (N//2+1,): RELION's sigma2 of the reconstruction is
        1 / (p^d <W>)."""
        return shell_mean_sums(self.weight.astype(np.float64), self.shells(), self.box // 2 + 1)


def _padded_r2(shape: tuple[int, ...]) -> np.ndarray:
    nz, ny, nx = shape
    kz = np.arange(nz) - nz // 2
    ky = np.arange(ny) - ny // 2
    kx = np.arange(nx)
    return (kz[:, None, None] ** 2 + ky[None, :, None] ** 2 + kx[None, None, :] ** 2).astype(
        np.float64)


def padded_shells(shape: tuple[int, int, int], pad: int) -> np.ndarray:
    """Shell index (unpadded Fourier px) of each voxel of a centred padded half-volume of the
    given shape: round(|q| / p)."""
    return fourier.shell_index(np.sqrt(_padded_r2(shape)) / pad)


def shell_mean_sums(values: np.ndarray, shells: np.ndarray, n_shells: int) -> np.ndarray:
    """Mean of values over each shell index 0..n_shells-1 (0 for empty shells; indices beyond
    are dropped)."""
    keep = shells < n_shells
    s = np.bincount(shells[keep].ravel(), weights=values[keep].ravel(), minlength=n_shells)
    c = np.bincount(shells[keep].ravel(), minlength=n_shells)
    return np.where(c > 0, s / np.maximum(c, 1), 0.0)
