"""Soft spherical masks (RELION's raised-cosine edge; docs/postprocess.md) and solvent masks made
from a map (relion_mask_create's algorithm, docs/postprocess.md)."""

from __future__ import annotations

import numpy as np

from .fourier import lowpass_map, origin


def soft_sphere(box: int, radius: float, edge: float = 5.0, ndim: int = 2) -> np.ndarray:
    """1 inside `radius` px of the centre floor(N/2), 0 beyond radius + edge, raised cosine
    ½ + ½cos(π(r − R)/edge) in between. Returns float64 (box,)*ndim."""
    c2 = (np.arange(box) - origin(box)).astype(np.float64) ** 2
    r2 = c2
    for axis in range(1, ndim):  # broadcast: no grids of coordinates
        r2 = r2[..., None] + c2.reshape((1,) * axis + (box,))
    r = np.sqrt(r2)
    out = (r <= radius).astype(np.float64)
    if edge > 0:
        band = (r > radius) & (r < radius + edge)  # the cosine only where it is neither 1 nor 0
        out[band] = 0.5 + 0.5 * np.cos(np.pi * ((r[band] - radius) / edge))
    return out


def apply_soft_mask(images: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """Mask images (..., N, N) towards their background: the mean outside the mask is taken as
    background and blended in with the mask's soft edge (RELION's --zero_mask is background 0;
    here the background level is the images' own outside mean, then zero)."""
    outside = mask < 1e-3
    if not outside.any():  # the mask fills the box: no background to measure
        return images * mask
    bg = images[..., outside].mean(axis=-1)[..., None, None]
    return (images - bg) * mask


def distance_transform(features: np.ndarray, max_distance: float | None = None) -> np.ndarray:
    """Exact Euclidean distance (px) from every voxel to the nearest True voxel of `features`
    (0 on them), for 1D-3D arrays; voxels outside the array are not features.

    Separable squared-distance transform, one pass per axis, each pass the lower envelope
    min_j ((i - j)^2 + g(j)) over offsets |i - j| <= D. With D = ceil(max_distance) every
    distance <= max_distance is exact and larger ones come out as inf (a nearest feature within
    max_distance has every coordinate offset within D); max_distance None is the whole array.
    Returns float64; inf where no feature is near enough (or none exists).
    """
    f = np.asarray(features, dtype=bool)
    if f.ndim == 0:
        raise ValueError("distance_transform: expected an array with at least one axis")
    reach = max(f.shape) - 1 if max_distance is None else int(np.ceil(max_distance))
    reach = max(0, min(reach, max(f.shape) - 1))
    dist = np.full(f.shape, np.inf)
    if not f.any():
        return dist
    # Only the features' bounding box grown by the reach can hold a finite distance.
    where = np.nonzero(f)
    box = tuple(slice(max(0, int(w.min()) - reach), int(w.max()) + reach + 1) for w in where)
    sub = f[box]
    # float32 holds the integer squared distances exactly (< 2^24 for boxes up to 2000 px).
    d2 = np.where(sub, np.float32(0.0), np.float32(np.inf))
    for axis in range(f.ndim):
        # The pass axis first and contiguous: every shifted minimum is then a block operation.
        src = np.ascontiguousarray(np.moveaxis(d2, axis, 0))
        out = src.copy()
        for o in range(1, min(reach, src.shape[0] - 1) + 1):
            o2 = np.float32(o * o)
            np.minimum(out[o:], src[:-o] + o2, out=out[o:])
            np.minimum(out[:-o], src[o:] + o2, out=out[:-o])
        d2 = np.moveaxis(out, 0, axis)
    dist[box] = np.sqrt(d2.astype(np.float64))
    if max_distance is not None:
        dist[dist > max_distance] = np.inf
    return dist


def make_mask(volume: np.ndarray, threshold: float, extend: float = 0.0,
              soft_edge: float = 0.0, lowpass: float = 0.0,
              pixel_size: float | None = None) -> np.ndarray:
    """A solvent mask from a map, as relion_mask_create makes it.

    1. Optionally low-pass the map at `lowpass` Å (> 0; needs pixel_size), RELION's raised
       cosine edge of 2 shells (fourier.lowpass_map).
    2. Binary mask: voxels with value >= threshold.
    3. extend > 0 px: add every voxel closer than `extend` to the mask (Euclidean distance to the
       nearest mask voxel < extend); extend < 0: remove every mask voxel closer than |extend| to
       a voxel outside it.
    4. soft_edge > 0 px: voxels outside at distance d < soft_edge from the mask get
       ½ + ½cos(π d / soft_edge) (1 next to the mask falling to 0 at soft_edge px), others 0.

    Returns float64 values in [0, 1], the map's shape. Raises ValueError for soft_edge < 0 or
    a lowpass without pixel size.
    """
    v = np.asarray(volume, dtype=np.float64)
    if soft_edge < 0:
        raise ValueError(f"soft_edge: expected >= 0 px, got {soft_edge}")
    if lowpass > 0:
        if pixel_size is None or not pixel_size > 0:
            raise ValueError("lowpass: needs a positive pixel_size")
        v = lowpass_map(v, lowpass, pixel_size)
    binary = v >= threshold
    if extend > 0:
        binary |= distance_transform(binary, extend) < extend
    elif extend < 0:
        binary &= ~(distance_transform(~binary, -extend) < -extend)
    mask = binary.astype(np.float64)
    if soft_edge > 0:
        d = distance_transform(binary, soft_edge)
        edge = ~binary & (d < soft_edge)
        mask[edge] = 0.5 + 0.5 * np.cos(np.pi * d[edge] / soft_edge)
    return mask


def check_mask(mask: np.ndarray, shape: tuple[int, ...], name: str = "mask",
               allow_empty: bool = False) -> None:
    """InputError unless `mask` has the map's shape and values in [0, 1] (RELION's tolerance
    1e-6) with some value >= 0.5 (not required with allow_empty: e.g. subtract's mask, where
    all zeros subtracts the whole map). `name` (a file or option) starts the message."""
    from .errors import InputError

    m = np.asarray(mask)
    if m.shape != tuple(shape):
        raise InputError(f"{name}: mask box {m.shape} differs from the map's {tuple(shape)}; "
                         f"expected a mask of the same box")
    lo, hi = float(m.min()), float(m.max())
    if lo < -1e-6 or hi > 1.0 + 1e-6:
        raise InputError(f"{name}: mask values {lo:.6g}..{hi:.6g}; expected values in [0, 1] "
                         f"(1 = molecule, 0 = solvent)")
    if hi < 0.5 and not allow_empty:
        raise InputError(f"{name}: no mask value reaches 0.5 (max {hi:.6g}); expected a mask "
                         f"with 1 on the molecule")


def solvent_flatten(volume: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """RELION's solvent flattening of a reference (--solvent_mask with --flatten_solvent):
    the map times the mask, so the solvent becomes 0. RELION applies it to the reconstructed
    references every iteration but the last (the final maps stay unmasked). Check the mask
    first with check_mask."""
    return np.asarray(volume, dtype=np.float64) * np.asarray(mask, dtype=np.float64)
