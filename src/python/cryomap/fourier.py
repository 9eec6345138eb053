"""Fourier-grid conventions (RELION's; docs/conventions.md, "Grids"). The one owner of them.

- Real-space origin (rotation centre) is the 0-based index floor(N/2) on every axis, for
  maps and for particle images. relion_project writes odd-N images one pixel further along
  +x and +y (origin at index ceil(N/2)); `project_image_origin` and `ifft2_at_origin` write
  images that way where relion_project's output is to be matched (docs/conventions.md).
- Forward transforms are normalised by the number of real samples and put the phase origin
  at that centre: F(k) = N^-d sum_r x[r] exp(-2 pi i k.(r - c)/N).
- Half-plane ("rfft") layout: images are (N, N//2+1) arrays indexed [ky row, kx]; volumes are
  (N, N, N//2+1) indexed [kz, ky, kx]. Row i holds ky = i for i <= N/2, else i - N (the Nyquist
  row of an even box is +N/2, as in RELION).
- Shell index of a frequency is round(|k|); spatial frequency is |k| / (N * pixel_size) 1/A.
- The kernels read references from a "centred half-volume" of shape (2m+1, 2m+1, m+1) indexed
  [kz + m, ky + m, kx] (2D: (1, 2m+1, m+1)), cropped to |k| components <= m.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import scipy.fft


def origin(n: int) -> int:
    """Index of the real-space origin of an axis of length n (RELION: floor(n/2))."""
    return n // 2


def freq_1d(n: int) -> np.ndarray:
    """Integer frequency of each index of a full FFT axis (Nyquist of an even n is +n/2)."""
    i = np.arange(n)
    return np.where(i <= n // 2, i, i - n)


def half_plane_freqs(n: int) -> tuple[np.ndarray, np.ndarray]:
    """(ky, kx) integer frequency grids of the (n, n//2+1) half-plane layout."""
    ky, kx = np.meshgrid(freq_1d(n), np.arange(n // 2 + 1), indexing="ij")
    return ky, kx


def half_volume_freqs(n: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(kz, ky, kx) integer frequency grids of the (n, n, n//2+1) half-volume layout."""
    f = freq_1d(n)
    return np.meshgrid(f, f, np.arange(n // 2 + 1), indexing="ij")


def half_volume_radius(n: int) -> np.ndarray:
    """|k| (in shells) of each voxel of the (n, n, n//2+1) half-volume."""
    kz, ky, kx = half_volume_freqs(n)
    return np.sqrt(kx * kx + ky * ky + kz * kz, dtype=np.float64)


def shell_index(radius: np.ndarray) -> np.ndarray:
    """Resolution-shell index round(|k|) of frequency radii (RELION's ires).

    Halves round up as RELION's ROUND macro does (np.rint would round 2.5 to 2).
    """
    return np.floor(np.asarray(radius) + 0.5).astype(np.int64)


def shell_index_2d(n: int) -> np.ndarray:
    """Shell index of each pixel of the (n, n//2+1) half-plane."""
    ky, kx = half_plane_freqs(n)
    return shell_index(np.hypot(kx, ky))


def shell_index_3d(n: int) -> np.ndarray:
    """Shell index of each voxel of the (n, n, n//2+1) half-volume."""
    return shell_index(half_volume_radius(n))


def shell_sums(values: np.ndarray, shells: np.ndarray, n_shells: int) -> np.ndarray:
    """Sum of values over each shell index 0..n_shells-1 (indices beyond are dropped)."""
    keep = shells < n_shells
    return np.bincount(shells[keep].ravel(), weights=values[keep].ravel(), minlength=n_shells)


def hermitian_weights_2d(n: int) -> np.ndarray:
    """How many full-plane pixels each half-plane pixel stands for (1 or 2).

    Sum over the half plane of w * |F|^2 equals the sum over the full plane (Parseval).
    """
    w = np.full((n, n // 2 + 1), 2.0)
    w[:, 0] = 1.0
    if n % 2 == 0:
        w[:, n // 2] = 1.0
    return w


def resolution_angstrom(shell: np.ndarray | float, n: int, pixel_size: float) -> np.ndarray:
    """Resolution in Angstrom of a shell index (999 at shell 0, as RELION writes it)."""
    s = np.asarray(shell, dtype=float)
    with np.errstate(divide="ignore"):
        res = np.where(s > 0, n * pixel_size / np.where(s > 0, s, 1.0), 999.0)
    return res


def fft_workers() -> int:
    """Threads of the FFTs here: the kernels' (--j, `cryomap.set_threads`). scipy's FFTs
    split a transform's independent 1D passes over them (the result does not depend on the
    count) and keep single precision single (numpy's took 8 times as long for a padded
    256^3 float32 map, 2 cores)."""
    from ._kernels import core

    return max(1, int(core.max_threads()))


def fft2_centered(images: np.ndarray) -> np.ndarray:
    """Half-plane FT of real image(s) (..., N, N), N^-2-normalised, origin at floor(N/2)."""
    n = images.shape[-1]
    if images.shape[-2] != n:
        raise ValueError(f"expected square images, got {images.shape[-2:]}")
    x = np.fft.ifftshift(images, axes=(-2, -1))
    return scipy.fft.rfft2(x, axes=(-2, -1), workers=fft_workers()) / float(n * n)


def ifft2_centered(ft: np.ndarray, n: int) -> np.ndarray:
    """Inverse of fft2_centered for box size n."""
    x = scipy.fft.irfft2(ft * float(n * n), s=(n, n), axes=(-2, -1), workers=fft_workers())
    return np.fft.fftshift(x, axes=(-2, -1))


def fft3_centered(volume: np.ndarray) -> np.ndarray:
    """Half-volume FT of a real cube (N, N, N), N^-3-normalised, origin at floor(N/2)."""
    n = volume.shape[-1]
    x = np.fft.ifftshift(volume, axes=(-3, -2, -1))
    return scipy.fft.rfftn(x, axes=(-3, -2, -1), workers=fft_workers()) / float(n**3)


def ifft3_centered(ft: np.ndarray, n: int) -> np.ndarray:
    """Inverse of fft3_centered for box size n."""
    x = scipy.fft.irfftn(ft * float(n**3), s=(n, n, n), axes=(-3, -2, -1),
                         workers=fft_workers())
    return np.fft.fftshift(x, axes=(-3, -2, -1))


def max_centred_radius(n: int) -> int:
    """Largest m for which a centred half-volume cropped from an n-grid holds no Nyquist."""
    return (n - 1) // 2


def to_centred(ft: np.ndarray, m: int) -> np.ndarray:
    """Crop a half-plane (n, n//2+1) or half-volume (n, n, n//2+1) FT to the centred layout.

    Returns (1, 2m+1, m+1) for 2D input and (2m+1, 2m+1, m+1) for 3D input, complex64.
    Frequencies beyond what the box holds (m > max_centred_radius(n)) are zero, so that the
    kernels' interpolation footprint never leaves the array.
    """
    n = ft.shape[-2]
    if ft.ndim not in (2, 3):
        raise ValueError("expected a 2D half-plane or 3D half-volume")
    m0 = min(m, max_centred_radius(n))
    idx = np.arange(-m0, m0 + 1) % n
    if ft.ndim == 2:
        inner = ft[idx][:, : m0 + 1][None]
        out = np.zeros((1, 2 * m + 1, m + 1), np.complex64)
        out[0, m - m0:m + m0 + 1, : m0 + 1] = inner[0]
    else:
        inner = ft[np.ix_(idx, idx, np.arange(m0 + 1))]
        out = np.zeros((2 * m + 1, 2 * m + 1, m + 1), np.complex64)
        out[m - m0:m + m0 + 1, m - m0:m + m0 + 1, : m0 + 1] = inner
    return np.ascontiguousarray(out, dtype=np.complex64)


def from_centred(centred: np.ndarray, n: int, dtype=np.complex128) -> np.ndarray:
    """Place a centred half-volume (or (1, 2m+1, m+1) half-plane) into the rfft layout of box n.

    Frequencies outside the centred crop are zero; those beyond max_centred_radius(n) are
    dropped. Returns (n, n//2+1) for 2D input, of `dtype` (complex64: single-precision FFTs).
    """
    m = centred.shape[-1] - 1
    m0 = min(m, max_centred_radius(n))
    idx = np.arange(-m0, m0 + 1) % n
    c = slice(m - m0, m + m0 + 1)
    if centred.shape[0] == 1:
        out = np.zeros((n, n // 2 + 1), dtype=dtype)
        out[idx, : m0 + 1] = centred[0][c, : m0 + 1]
        return out
    out = np.zeros((n, n, n // 2 + 1), dtype=dtype)
    out[np.ix_(idx, idx, np.arange(m0 + 1))] = centred[c, c, : m0 + 1]
    return out


def padded_centred_ft(volume: np.ndarray, n_pad: int, m: int) -> np.ndarray:
    """to_centred(fft3_centered(V), m) of the cube V (N, N, N) zero-padded to n_pad with its
    origin on the padded one (projector's padding), complex64, computed axis by axis: each
    1D transform runs over the lines that the box or the kept frequencies hold only (x over
    N^2 lines, y over N (m+1), z over (2m+1)(m+1)), about half the work of the padded FFT
    at pad 2 and no padded array. Single precision."""
    n = volume.shape[-1]
    m0 = min(m, max_centred_radius(n_pad))
    k = np.arange(-m0, m0 + 1)
    w = fft_workers()
    # sum_r V[r] exp(-2 pi i k (r - o) / n_pad): the transform from index 0, then the shift
    # of the origin o = floor(N/2), one axis at a time
    shift = np.exp(2j * np.pi * np.arange(-m0, m0 + 1) * origin(n) / n_pad).astype(np.complex64)
    x = scipy.fft.rfft(np.asarray(volume, np.float32), n=n_pad, axis=2, workers=w)[..., :m0 + 1]
    x *= shift[m0:]
    x = scipy.fft.fft(x, n=n_pad, axis=1, workers=w)[:, k % n_pad]
    x *= shift[:, None]
    x = scipy.fft.fft(x, n=n_pad, axis=0, workers=w)[k % n_pad]
    x *= shift[:, None, None] / np.float32(n_pad) ** 3
    out = np.zeros((2 * m + 1, 2 * m + 1, m + 1), np.complex64)
    out[m - m0:m + m0 + 1, m - m0:m + m0 + 1, : m0 + 1] = x
    return out


def centred_ft_to_box(centred: np.ndarray, n_pad: int, box: int) -> np.ndarray:
    """The centred box^3 window of ifft3_centered(from_centred(centred, n_pad), n_pad): the
    map (box N, on the padded grid's origin) whose padded FT is given, computed
    axis by axis: z over the (2m+1)(m+1) lines the FT holds, y over box (m+1), x (real
    output) over box^2, each keeping only the window's samples (about half the work of the
    padded inverse FFT at pad 2). Single precision."""
    m = centred.shape[-1] - 1
    m0 = min(m, max_centred_radius(n_pad))
    c = slice(m - m0, m + m0 + 1)
    k = np.arange(-m0, m0 + 1) % n_pad
    j = (np.arange(box) - origin(box)) % n_pad  # the window's voxels, unshifted
    w = fft_workers()
    buf = np.zeros((n_pad, 2 * m0 + 1, m0 + 1), np.complex64)
    buf[k] = centred[c, c, : m0 + 1]
    x = scipy.fft.ifft(buf, axis=0, norm="forward", workers=w)[j]
    buf = np.zeros((box, n_pad, m0 + 1), np.complex64)
    buf[:, k] = x
    x = scipy.fft.ifft(buf, axis=1, norm="forward", workers=w)[:, j]
    return scipy.fft.irfft(x, n=n_pad, axis=2, norm="forward", workers=w)[..., j]


def symmetrize_kx0_plane(centred: np.ndarray) -> np.ndarray:
    """Fold the redundant kx = 0 plane of a back-projected centred half-volume.

    Values splatted at (kz, ky, 0) and at (-kz, -ky, 0) describe one Friedel pair; summing each
    with the conjugate of its mate (RELION's enforceHermitianSymmetry) makes the plane
    Hermitian. Works on complex (data) and real (weight) arrays; returns a new array.
    """
    out = centred.copy()
    plane = centred[:, :, 0]
    mate = plane[::-1, ::-1]
    out[:, :, 0] = plane + (np.conj(mate) if np.iscomplexobj(plane) else mate)
    return out


@dataclass(frozen=True)
class PixelMask:
    """Half-plane pixels inside a radius: the pixel set J every kernel works on.

    Holds pixels with 0 < round(|k|) <= r_max, the DC term and the redundant ky < 0 half of
    the kx = 0 column excluded (RELION's Mresol rule, docs/conventions.md "Grids"), so below Nyquist
    each independent complex Fourier coefficient appears exactly once (an even box at
    r_max = N/2 keeps RELION's duplicate pairs in the kx = N/2 column).
    """

    box: int
    r_max: int
    flat_index: np.ndarray  # (J,) index into the flattened (box, box//2+1) half-plane
    coords: np.ndarray  # (J, 2) float32 (kx, ky)
    shell: np.ndarray  # (J,) int64 shell index round(|k|)

    @property
    def n_pixels(self) -> int:
        return int(self.flat_index.size)

    def gather(self, ft: np.ndarray) -> np.ndarray:
        """(..., box, box//2+1) half-plane FT(s) -> (..., J) complex64 masked pixels."""
        flat = ft.reshape(ft.shape[:-2] + (-1,))
        return np.ascontiguousarray(flat[..., self.flat_index], dtype=np.complex64)

    def scatter(self, values: np.ndarray) -> np.ndarray:
        """(..., J) pixel values -> (..., box, box//2+1) half-plane, zeros elsewhere.

        The ky < 0 half of the kx = 0 column is filled with Friedel mates so the result is the
        FT of a real image.
        """
        shape = values.shape[:-1] + (self.box * (self.box // 2 + 1),)
        out = np.zeros(shape, dtype=np.result_type(values.dtype, np.complex64))
        out[..., self.flat_index] = values
        out = out.reshape(values.shape[:-1] + (self.box, self.box // 2 + 1))
        col = out[..., :, 0]
        ky = freq_1d(self.box)
        neg = np.nonzero(ky < 0)[0]
        col[..., neg] = np.conj(col[..., (-ky[neg]) % self.box])
        return out


def pixel_mask(box: int, r_max: float) -> PixelMask:
    """The PixelMask of a box for shells 1..r_max (r_max is capped at box//2)."""
    ky, kx = half_plane_freqs(box)
    shell = shell_index(np.hypot(kx, ky))
    r = min(int(np.floor(r_max)), box // 2)
    keep = (shell > 0) & (shell <= r) & ~((kx == 0) & (ky < 0))
    flat = np.flatnonzero(keep)
    coords = np.stack([kx.ravel()[flat], ky.ravel()[flat]], axis=1).astype(np.float32)
    return PixelMask(box, r, flat, np.ascontiguousarray(coords), shell.ravel()[flat])


# -- images written like relion_project ---------------------------------------------------------


def project_image_origin(n: int) -> int:
    """Index of the real-space origin in the images relion_project writes: ceil(n/2).

    relion_project inverse-transforms the projection (origin at index 0) and then calls
    CenterFFT(image, false), a cyclic shift by -floor(n/2), which moves index 0 to
    n - floor(n/2) = ceil(n/2). That is floor(n/2) for even n (the usual centre) and one
    pixel more for odd n. Maps and particle images are read with the origin at floor(n/2).
    """
    return n - n // 2


def ifft2_at_origin(ft: np.ndarray, n: int, origin_index: int) -> np.ndarray:
    """Inverse of fft2_centered for box n, with the real-space origin placed at index
    `origin_index` on both axes instead of floor(n/2) (a cyclic shift of the result)."""
    x = scipy.fft.irfft2(ft * float(n * n), s=(n, n), axes=(-2, -1), workers=fft_workers())
    return np.roll(x, (origin_index, origin_index), axis=(-2, -1))


# -- optics groups with other boxes / pixel sizes ---------------------------------------------


def grid_scale(n_img: int, pix_img: float, n_ref: int, pix_ref: float) -> float:
    """(n_ref pix_ref) / (n_img pix_img): an image pixel k sits at grid_scale * k on the
    reference's Fourier grid (both are the same spatial frequency k / (n_img pix_img))."""
    return (float(n_ref) * float(pix_ref)) / (float(n_img) * float(pix_img))


def _half_plane_sample(ft: np.ndarray, n: int, kx: np.ndarray, ky: np.ndarray) -> np.ndarray:
    """Bilinear samples of half-plane FT(s) (..., n, n//2+1) at real (kx, ky); kx < 0 via the
    Friedel mate; zero where any corner lies beyond the stored grid (|k| > n/2)."""
    sign = np.where(kx < 0, -1.0, 1.0)
    kx, ky = kx * sign, ky * sign
    x0, y0 = np.floor(kx).astype(np.int64), np.floor(ky).astype(np.int64)
    fx, fy = kx - x0, ky - y0
    half = n // 2
    out = np.zeros(ft.shape[:-2] + kx.shape, dtype=np.complex128)
    for dx, dy, w in ((0, 0, (1 - fx) * (1 - fy)), (1, 0, fx * (1 - fy)),
                      (0, 1, (1 - fx) * fy), (1, 1, fx * fy)):
        xi, yi = x0 + dx, y0 + dy
        # Corner (xi, yi) with xi possibly < 0 after the mate above: use its own mate.
        mate = xi < 0
        xs, ys = np.where(mate, -xi, xi), np.where(mate, -yi, yi)
        ok = (xs <= half) & (np.abs(ys) <= half) & (w > 0)
        if n % 2 == 0:
            ok &= ys != -half  # -n/2 is stored as the +n/2 row
        rows = np.where(ok, ys % n, 0)
        cols = np.where(ok, xs, 0)
        v = ft[..., rows, cols]
        v = np.where(mate, np.conj(v), v)
        out += np.where(ok, w * v, 0.0)
    return np.where(sign < 0, np.conj(out), out)


def resample_half_plane(ft: np.ndarray, n1: int, pix1: float, n2: int, pix2: float,
                        rtol: float = 1e-6) -> np.ndarray:
    """Bring half-plane FT(s) of an image of box n1, pixel pix1 onto the grid of box n2,
    pixel pix2: output pixel k2 holds the input at the same spatial frequency
    s = k2 / (n2 pix2), i.e. at k1 = k2 * (n1 pix1) / (n2 pix2) of the input grid.

    ft: (..., n1, n1//2+1) -> (..., n2, n2//2+1) complex128.

    - Same physical box (n1 pix1 = n2 pix2 within rtol): RELION's Fourier cropping
      (windowFourierTransform) or zero-padding. Values are copied; frequencies beyond the
      input's Nyquist are zero; the input's Nyquist row (ky = +n1/2 of an even n1) is
      copied to +n1/2 only.
    - Otherwise k1 is not an integer: the input is oversampled twice (its real-space image
      zero-padded to 2 n1, as RELION pads references) and interpolated bilinearly, and the
      values are multiplied by ((n1 pix1) / (n2 pix2))^2, so that the result is the
      N^-2-normalised FT of the same particle (zero outside its box) sampled at the new
      pixels; a frequency beyond the input's Nyquist is zero. RELION itself leaves the
      images alone and scales the projection matrix by grid_scale instead (the same
      frequencies, interpolated in the reference).
    """
    ft = np.asarray(ft)
    if ft.shape[-2:] != (n1, n1 // 2 + 1):
        raise ValueError(f"resample_half_plane: expected (..., {n1}, {n1 // 2 + 1}), got "
                         f"{ft.shape}")
    if min(n1, n2) < 1 or not (pix1 > 0 and pix2 > 0):
        raise ValueError("resample_half_plane: boxes and pixel sizes must be positive")
    ratio = (n1 * pix1) / (n2 * pix2)
    ky2, kx2 = half_plane_freqs(n2)
    half1 = n1 // 2
    if abs(ratio - 1.0) <= rtol:
        out = np.zeros(ft.shape[:-2] + (n2, n2 // 2 + 1), dtype=np.complex128)
        ok = (kx2 <= half1) & (np.abs(ky2) <= half1)
        if n1 % 2 == 0:
            ok &= ky2 != -half1  # the input stores -n1/2 as +n1/2 only
        out[..., ok] = ft[..., ky2[ok] % n1, kx2[ok]]
        return out
    # Twice oversampled input: zero-pad the real-space image (origin kept at the centre).
    m = 2 * n1
    x = ifft2_centered(ft, n1)
    padded = np.zeros(x.shape[:-2] + (m, m))
    off = origin(m) - origin(n1)
    padded[..., off:off + n1, off:off + n1] = x
    fine = fft2_centered(padded) * 4.0  # back to the n1^-2 normalisation
    kx1, ky1 = kx2 * ratio, ky2 * ratio
    out = _half_plane_sample(fine, m, 2.0 * kx1, 2.0 * ky1) * ratio**2
    inside = (np.abs(kx1) <= half1) & (np.abs(ky1) <= half1)
    return np.where(inside, out, 0.0)


def lowpass_weights(n: int, shell: float, edge_width: int = 2, ndim: int = 3,
                    radius: np.ndarray | None = None) -> np.ndarray:
    """RELION's raised-cosine low-pass filter on the half grid ((n, n//2+1) or (n, n, n//2+1)).

    1 below shell - w/2, 0 above shell + w/2, ½ + ½cos(π(|k| - lo)/(hi - lo)) in between, with
    w = edge_width shells (integer halving as RELION: w = 2 gives a 2-shell edge), lo =
    max(0, shell - w//2), hi = shell + w//2 (fftw.cpp lowPassFilterMap; docs/postprocess.md).
    radius: |k| on that grid when the caller has it (filters at many shells).
    """
    if radius is not None:
        r = radius
    elif ndim == 3:
        r = half_volume_radius(n)
    elif ndim == 2:
        ky, kx = half_plane_freqs(n)
        r = np.hypot(kx, ky).astype(np.float64)
    else:
        raise ValueError(f"ndim: expected 2 or 3, got {ndim}")
    half = int(edge_width) // 2
    lo = max(0.0, float(shell) - half)
    hi = float(shell) + half
    w = (r <= lo).astype(np.float64)
    if hi <= lo:  # no edge: a hard cut at the shell
        return w
    edge = (r > lo) & (r < hi)  # 1 below, 0 above: the cosine only on the edge
    w[edge] = 0.5 + 0.5 * np.cos(np.pi * (r[edge] - lo) / (hi - lo))
    return w


def initial_lowpass(volume: np.ndarray, resolution: float, pixel_size: float,
                    edge_width: float = 2.0) -> np.ndarray:
    """A map low-passed as RELION filters a refinement's initial reference
    (initialLowPassFilterReferences): a raised cosine through 1/2 at the unrounded radius
    N * pixel_size / resolution, `edge_width` shells wide. `lowpass_map` is RELION's other
    filter, whose edge sits at the rounded shell."""
    v = np.asarray(volume, dtype=np.float64)
    n = v.shape[0]
    r = half_volume_radius(n)
    t = np.clip((r - n * pixel_size / resolution) / edge_width + 0.5, 0.0, 1.0)
    return ifft3_centered(fft3_centered(v) * (0.5 + 0.5 * np.cos(np.pi * t)), n)


def lowpass_map(volume: np.ndarray, resolution: float, pixel_size: float,
                edge_width: int = 2) -> np.ndarray:
    """A cubic map (or square image) low-pass filtered at `resolution` Å with RELION's
    raised-cosine edge: filter shell round(N * pixel_size / resolution) (lowpass_weights)."""
    v = np.asarray(volume, dtype=np.float64)
    n = v.shape[-1]
    shell = np.floor(n * pixel_size / resolution + 0.5)
    if v.ndim == 3:
        return ifft3_centered(fft3_centered(v) * lowpass_weights(n, shell, edge_width, 3), n)
    if v.ndim == 2:
        return ifft2_centered(fft2_centered(v) * lowpass_weights(n, shell, edge_width, 2), n)
    raise ValueError(f"expected a square image or a cubic map, got shape {v.shape}")
