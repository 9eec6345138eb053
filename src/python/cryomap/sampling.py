"""Pose sampling: HEALPix directions, in-plane angles, shifts (docs/conventions.md, "Pose
sampling")."""

from __future__ import annotations

import functools
from dataclasses import dataclass, field

import numpy as np

from .euler import euler_to_matrix, matrix_to_euler


def _healpy():
    """healpy, imported on first use (it takes about a second to import)."""
    import healpy

    return healpy


def healpix_nside(order: int) -> int:
    """Nside of a HEALPix order (2^order)."""
    if order < 0:
        raise ValueError("healpix order: expected >= 0")
    return 1 << order


def angular_step(order: int) -> float:
    """RELION's angular step in degrees for a HEALPix order: 360 / (6 * 2^order)."""
    return 360.0 / (6 * healpix_nside(order))


def healpix_directions(order: int) -> tuple[np.ndarray, np.ndarray]:
    """(rot, tilt) in degrees of the 12 * Nside^2 NEST pixel centres of an order.

    rot = phi normalised to [-180, 180], tilt = theta in [0, 180].
    """
    nside = healpix_nside(order)
    theta, phi = _healpy().pix2ang(nside, np.arange(12 * nside * nside), nest=True)
    rot = np.rad2deg(phi)
    rot = np.where(rot > 180.0, rot - 360.0, rot)
    return rot, np.rad2deg(theta)


def psi_angles(step: float) -> np.ndarray:
    """In-plane angles: n = ceil(360/step), psi_j = j * 360/n degrees (RELION's rule)."""
    if step <= 0:
        raise ValueError("psi step: expected > 0 degrees")
    n = int(np.ceil(360.0 / step - 1e-9))
    return np.arange(n) * (360.0 / n)


def translations(offset_range: float, offset_step: float) -> np.ndarray:
    """Translation grid in pixels: (i*step, j*step) with |i|,|j| <= ceil(range/step), kept
    inside the circle of radius range (RELION's setTranslations). Returns (T, 2) float64."""
    if offset_step <= 0 or offset_range < 0:
        raise ValueError("offset range/step: expected range >= 0 and step > 0")
    n = int(np.ceil(offset_range / offset_step - 1e-9))
    i = np.arange(-n, n + 1) * offset_step
    x, y = np.meshgrid(i, i, indexing="xy")
    keep = x * x + y * y <= offset_range**2 + 1e-9
    return np.stack([x[keep], y[keep]], axis=1)


@dataclass(frozen=True)
class OrientationGrid:
    """A list of orientations: Euler angles (R, 3) in degrees and their matrices (R, 3, 3)."""

    angles: np.ndarray
    matrices: np.ndarray

    def __len__(self) -> int:
        return int(self.angles.shape[0])


def orientations_3d(healpix_order: int, psi_step: float | None = None) -> OrientationGrid:
    """All HEALPix directions x in-plane angles of an order (psi step defaults to the
    angular step). Ordered direction-major."""
    rot, tilt = healpix_directions(healpix_order)
    psi = psi_angles(angular_step(healpix_order) if psi_step is None else psi_step)
    angles = np.stack(
        [np.repeat(rot, psi.size), np.repeat(tilt, psi.size), np.tile(psi, rot.size)], axis=1
    )
    return OrientationGrid(angles, euler_to_matrix(angles[:, 0], angles[:, 1], angles[:, 2]))


def orientations_2d(psi_step: float = 10.0) -> OrientationGrid:
    """In-plane orientations for 2D classification: Euler(0, 0, psi)."""
    psi = psi_angles(psi_step)
    angles = np.stack([np.zeros_like(psi), np.zeros_like(psi), psi], axis=1)
    return OrientationGrid(angles, euler_to_matrix(0.0, 0.0, psi))


def random_rotation(rng: np.random.Generator, degrees: float) -> np.ndarray:
    """A rotation by `degrees` about an axis drawn uniformly on the sphere (Rodrigues)."""
    axis = rng.normal(size=3)
    axis /= np.linalg.norm(axis)
    k = np.array([[0.0, -axis[2], axis[1]], [axis[2], 0.0, -axis[0]], [-axis[1], axis[0], 0.0]])
    t = np.deg2rad(degrees)
    return np.eye(3) + np.sin(t) * k + (1.0 - np.cos(t)) * k @ k


@dataclass(frozen=True)
class PoseSampling:
    """A hierarchical pose grid: RELION's HEALPix sampling with adaptive oversampling.

    Level 0 is the coarse grid. In 3D an orientation of level l is a HEALPix NEST pixel of order
    `healpix_order + l` and one of `n_psi * 2**l` in-plane angles, with the integer key
    pixel * n_psi * 2**l + psi_index; in 2D (`ndim` 2) the key is the in-plane index alone. Level
    l + 1 splits each orientation into its 4 HEALPix children (NEST pixels 4p..4p+3) and 2
    in-plane children at psi -+ step_l / 4 (RELION's oversampled orientations). Translations lie
    on a square grid of `offset_step` px inside `offset_range` px; the oversampled ones split a
    translation into 2 x 2 children at -+ offset_step / 4 per axis.

    The whole grid is randomly perturbed each iteration (RELION's --perturb): every orientation
    A becomes A @ `rotation` (a rotation of the whole set, so the grid stays uniform), 2D
    in-plane angles move by `psi_offset` degrees, translations by `offset_shift` px.

    Point-group symmetry (3D, `symmetry` other than C1; docs/symmetry.md): level 0 holds only
    the HEALPix directions of the group's asymmetric unit (`directions`, RELION's
    removeSymmetryEquivalentPoints) x all in-plane angles, and its keys enumerate only those:
    key = i * n_psi + psi_index with `directions[i]` the pixel. The levels below keep the usual
    keys (NEST children of the kept pixels), so their key space is the whole sphere's. The
    perturbation rotates the kept set like the full one (A @ `rotation`, as RELION), so its
    symmetry copies tile the sphere up to a seam of at most the perturbation. Local searches
    and the local prior look at every symmetry copy A R of the previous pose and take the
    nearest (`rotation_angle`; RELION's selectOrientationsWithNonZeroPriorProbability): a
    pose near a border of the unit keeps its whole window, part of it found around a copy.
    """

    ndim: int
    healpix_order: int
    n_psi: int
    offset_step: float
    offset_range: float
    rotation: np.ndarray = field(default_factory=lambda: np.eye(3))
    psi_offset: float = 0.0
    offset_shift: np.ndarray = field(default_factory=lambda: np.zeros(2))
    symmetry: str = "C1"  # canonical point-group name (symmetry.point_group)
    directions: np.ndarray | None = None  # level-0 HEALPix pixels kept, ascending; None: all

    @staticmethod
    def create(ndim: int, healpix_order: int, psi_step: float | None, offset_step: float,
               offset_range: float, perturb: float = 0.0,
               rng: np.random.Generator | None = None, symmetry: str = "C1") -> PoseSampling:
        """The grid of an order (3D) and in-plane step (default: the order's angular step in
        3D, 10 degrees in 2D), perturbed by a random fraction (up to +-perturb) of its steps.
        With a point group (3D only) level 0 is restricted to its asymmetric unit; ValueError
        if that holds no direction at this order (icosahedral groups below order 2)."""
        if ndim not in (2, 3):
            raise ValueError("ndim: expected 2 or 3")
        name, directions = "C1", None
        if str(symmetry).upper() != "C1":
            from .symmetry import point_group

            g = point_group(symmetry)
            if ndim != 3:
                raise ValueError(f"symmetry {g.name}: only 3D grids have point-group symmetry")
            name = g.name
            if g.order > 1:
                directions = asymmetric_unit_pixels(int(healpix_order), name)
                if directions.size == 0:
                    raise ValueError(f"symmetry {name}: the asymmetric unit holds no HEALPix "
                                     f"direction at order {healpix_order}")
        step = psi_step if psi_step is not None else (
            angular_step(healpix_order) if ndim == 3 else 10.0)
        n_psi = psi_angles(step).size
        translations(offset_range, offset_step)  # validates the translation grid
        rotation, psi_offset, offset_shift = np.eye(3), 0.0, np.zeros(2)
        if perturb > 0 and rng is not None:
            if ndim == 3:
                rotation = random_rotation(rng, perturb * angular_step(healpix_order)
                                           * rng.uniform(-1.0, 1.0))
            else:
                psi_offset = perturb * (360.0 / n_psi) * rng.uniform(-1.0, 1.0)
            if offset_range > 0:
                offset_shift = perturb * offset_step * rng.uniform(-1.0, 1.0, size=2)
        return PoseSampling(ndim, int(healpix_order) if ndim == 3 else 0, int(n_psi),
                            float(offset_step), float(offset_range), rotation,
                            float(psi_offset), offset_shift, name, directions)

    # -- orientations -----------------------------------------------------------------------

    @property
    def restricted(self) -> bool:
        """True when level 0 holds only an asymmetric unit's directions."""
        return self.directions is not None

    def operators(self) -> np.ndarray | None:
        """The point group's rotation matrices (order, 3, 3), None for C1."""
        if self.symmetry == "C1":
            return None
        from .symmetry import operators

        return operators(self.symmetry)

    def n_psi_at(self, level: int) -> int:
        """In-plane angles per direction at a level."""
        return self.n_psi << level

    def n_orientations(self, level: int = 0) -> int:
        """Number of orientations of level 0 (the asymmetric unit's with symmetry); for the
        levels below, the size of their key space (all directions of the finer order)."""
        if self.ndim == 3 and level == 0 and self.restricted:
            return int(self.directions.size) * self.n_psi
        n_dir = 12 * 4 ** (self.healpix_order + level) if self.ndim == 3 else 1
        return n_dir * self.n_psi_at(level)

    def _pixels(self, keys: np.ndarray, level: int) -> np.ndarray:
        """HEALPix pixel (order healpix_order + level) of 3D orientation keys."""
        pix = np.asarray(keys, np.int64) // self.n_psi_at(level)
        return self.directions[pix] if level == 0 and self.restricted else pix

    def allowed_pixels(self, level: int) -> np.ndarray:
        """The HEALPix pixels (NEST, order healpix_order + level, ascending) a level may hold:
        the asymmetric unit's and their descendants, or all of them without symmetry."""
        n_pix = 12 * 4 ** (self.healpix_order + level)
        if not self.restricted:
            return np.arange(n_pix, dtype=np.int64)
        sub = 4**level
        return (self.directions[:, None] * sub + np.arange(sub)[None, :]).ravel()

    def angular_step(self, level: int = 0) -> float:
        """Angular step in degrees at a level (the HEALPix step in 3D, the psi step in 2D)."""
        if self.ndim == 3:
            return angular_step(self.healpix_order + level)
        return 360.0 / self.n_psi_at(level)

    def psi_values(self, index: np.ndarray, level: int) -> np.ndarray:
        """In-plane angle (degrees, before perturbation) of psi indices of a level: j * step at
        level 0; children of psi at -+ step/4 of their parent at the levels below."""
        step0 = 360.0 / self.n_psi
        index = np.asarray(index, np.float64)
        if level == 0:
            return index * step0
        return (index + 0.5) * (step0 / 2**level) - step0 / 2.0

    def children(self, keys: np.ndarray, level: int) -> np.ndarray:
        """(n, 8) keys at level + 1 of the children of keys at `level` ((n, 2) in 2D)."""
        keys = np.asarray(keys, np.int64)
        psi_children = np.arange(2)
        if self.ndim == 2:
            return 2 * keys[:, None] + psi_children[None, :]
        n_psi = self.n_psi_at(level)
        pix, q = self._pixels(keys, level), keys % n_psi
        child_pix = 4 * pix[:, None, None] + np.arange(4)[None, :, None]
        child_q = 2 * q[:, None, None] + psi_children[None, None, :]
        return (child_pix * (2 * n_psi) + child_q).reshape(keys.size, 8)

    def parents(self, keys: np.ndarray, level: int) -> np.ndarray:
        """Keys at level - 1 of the parents of keys at `level` (>= 1)."""
        keys = np.asarray(keys, np.int64)
        if self.ndim == 2:
            return keys // 2
        n_psi = self.n_psi_at(level)
        pix = keys // n_psi // 4
        if level == 1 and self.restricted:
            pos = np.searchsorted(self.directions, pix)
            if np.any(pos >= self.directions.size) or np.any(
                    self.directions[np.minimum(pos, self.directions.size - 1)] != pix):
                raise ValueError("parents: a key's parent is outside the asymmetric unit")
            pix = pos
        return pix * (n_psi // 2) + (keys % n_psi) // 2

    def _unperturbed_angles(self, keys: np.ndarray, level: int) -> np.ndarray:
        keys = np.asarray(keys, np.int64)
        if self.ndim == 2:
            zeros = np.zeros(keys.size)
            return np.stack([zeros, zeros, self.psi_values(keys, level) + self.psi_offset], 1)
        n_psi = self.n_psi_at(level)
        nside = 1 << (self.healpix_order + level)
        theta, phi = _healpy().pix2ang(nside, self._pixels(keys, level), nest=True)
        rot = np.rad2deg(phi)
        rot = np.where(rot > 180.0, rot - 360.0, rot)
        return np.stack([rot, np.rad2deg(theta), self.psi_values(keys % n_psi, level)], 1)

    def matrices(self, keys: np.ndarray, level: int) -> np.ndarray:
        """(n, 3, 3) RELION A matrices of orientation keys, perturbation included."""
        a = self._unperturbed_angles(keys, level)
        m = euler_to_matrix(a[:, 0], a[:, 1], a[:, 2])
        return m if self.ndim == 2 else m @ self.rotation

    def angles(self, keys: np.ndarray, level: int) -> np.ndarray:
        """(n, 3) Euler angles (rot, tilt, psi) in degrees of orientation keys (perturbed)."""
        if self.ndim == 2:
            a = self._unperturbed_angles(keys, level)
            a[:, 2] = np.mod(a[:, 2] + 180.0, 360.0) - 180.0
            return a
        return np.stack(matrix_to_euler(self.matrices(keys, level)), axis=1)

    def local_orientations(self, previous: np.ndarray, sigma: float, level: int = 0,
                           sigma_cutoff: float = 3.0
                           ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Per image, the orientations of a level within sigma_cutoff * sigma degrees of its
        previous orientation (RELION's local searches), with the Gaussian log prior
        -theta^2 / (2 sigma^2) on the rotation angle theta between the two (an isotropic prior
        on rotations; RELION puts sigma on rot, tilt and psi separately). With symmetry, theta
        is the angle to the nearest symmetry copy A R of the previous pose, and the window
        holds the grid's orientations around every copy (see the class docstring).

        previous: (B, 3, 3) previous A matrices (3D) or (B,) previous psi in degrees (2D).
        Returns CSR lists (ptr (B+1,), keys, log_prior), each image with at least its nearest
        orientation.
        """
        if not sigma > 0:
            raise ValueError("sigma: expected > 0 degrees")
        limit = sigma_cutoff * sigma
        keys_out, prior_out, counts = [], [], []
        if self.ndim == 2:
            step = self.angular_step(level)
            psi = self.psi_values(np.arange(self.n_psi_at(level)), level) + self.psi_offset
            for prev in np.atleast_1d(np.asarray(previous, np.float64)):
                d = np.abs(np.mod(psi - prev + 180.0, 360.0) - 180.0)
                k = np.flatnonzero(d <= max(limit, 0.5 * step))
                keys_out.append(k)
                prior_out.append(-(d[k] ** 2) / (2 * sigma**2))
                counts.append(k.size)
            return _csr(counts, keys_out, prior_out)
        previous = np.asarray(previous, np.float64).reshape(-1, 3, 3)
        ops = self.operators()
        copies = previous[:, None] if ops is None else np.einsum("bij,gjk->bgik", previous,
                                                                 ops)
        # every direction within the limit of a copy, plus one pixel of margin
        order = self.healpix_order + level
        radius = np.deg2rad(limit + angular_step(order))
        n_dir = _level_directions(self, level)[0].size
        chunk = int(max(1, min(256, _WINDOW_DOTS // max(1, copies.shape[1] * n_dir))))
        counts, keys_out, prior_out = [], [], []
        for s in range(0, previous.shape[0], chunk):
            part = copies[s:s + chunk]
            keys, theta, image = self._windows(part, level, radius, limit)
            inside = theta <= limit
            bounds = np.searchsorted(image, np.arange(part.shape[0] + 1))
            for b in range(part.shape[0]):
                sel = slice(bounds[b], bounds[b + 1])
                k, t, keep = keys[sel], theta[sel], inside[sel]
                if not keep.any():  # sampling coarser than the window: the nearest one
                    if k.size == 0:
                        k, t = self._nearest(part[b], level)
                    keep = t == t.min()
                keys_out.append(k[keep])
                prior_out.append(-(t[keep] ** 2) / (2 * sigma**2))
                counts.append(int(keep.sum()))
        return _csr(counts, keys_out, prior_out)

    def _windows(self, copies: np.ndarray, level: int, radius: float, limit: float
                 ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The level's orientations within `limit` degrees of a copy of each image's pose
        (copies (B, G, 3, 3): the poses' symmetry copies A R), among those whose direction
        lies within `radius` (radians) of one, or where none is, the nearest of those: their
        keys, the rotation angle (degrees) to the nearest copy, and the image, sorted by image
        and key (each key once per image)."""
        n_copies = copies.shape[1]
        n_psi = self.n_psi_at(level)
        nside = 1 << (self.healpix_order + level)
        pixels, dirs, key_of = _level_directions(self, level)
        # grid direction a3 (unperturbed) ~ Q d, since rows transform as a3 Q = d
        centres = copies[:, :, 2, :] @ self.rotation.T  # (B, G, 3)
        near = (centres.reshape(-1, 3) @ dirs.T) >= np.cos(radius)
        flat, p_idx = np.nonzero(near)
        if flat.size == 0:
            return np.zeros(0, np.int64), np.zeros(0), np.zeros(0, np.int64)
        b_idx, g_idx = np.divmod(flat, n_copies)
        # angle between A' = Rz(-psi) A0 Q and the copy P: tr(Rz(-psi) M) with M = A0 Q P^T
        theta_pix, phi_pix = _healpy().pix2ang(nside, pixels[p_idx], nest=True)
        a0 = euler_to_matrix(np.rad2deg(phi_pix), np.rad2deg(theta_pix), 0.0)
        m = a0 @ self.rotation @ np.swapaxes(copies[b_idx, g_idx], 1, 2)
        psi = np.deg2rad(self.psi_values(np.arange(n_psi), level))
        c, sn = np.cos(psi), np.sin(psi)
        tr = (c[None, :] * (m[:, 0, 0] + m[:, 1, 1])[:, None]
              + sn[None, :] * (m[:, 1, 0] - m[:, 0, 1])[:, None] + m[:, 2, 2][:, None])
        # within the limit (tr >= 1 + 2 cos(limit)), or an image's nearest orientations
        # where none is; the pairs (b_idx) are in ascending image order
        inside = tr >= 1.0 + 2.0 * np.cos(np.deg2rad(limit))
        starts = np.flatnonzero(np.r_[True, b_idx[1:] != b_idx[:-1]])
        best = np.maximum.reduceat(tr.max(1), starts)
        has = np.maximum.reduceat(inside.any(1), starts)
        group = np.repeat(np.arange(starts.size), np.diff(np.r_[starts, b_idx.size]))
        keep = inside | (~has[group][:, None] & (tr == best[group][:, None]))
        pair, q = np.nonzero(keep)
        theta = np.rad2deg(np.arccos(np.clip((tr[pair, q] - 1.0) / 2.0, -1.0, 1.0)))
        image = b_idx[pair]
        keys = key_of[p_idx[pair]] * n_psi + q
        srt = np.lexsort((theta, keys, image))  # per (image, key) the nearest copy first
        keys, theta, image = keys[srt], theta[srt], image[srt]
        first = np.r_[True, (keys[1:] != keys[:-1]) | (image[1:] != image[:-1])]
        return keys[first], theta[first], image[first]

    def _nearest(self, copies: np.ndarray, level: int) -> tuple[np.ndarray, np.ndarray]:
        """(keys, angles) of the orientations of the level's directions nearest to any copy
        (G, 3, 3) of a pose, for a pose near none (sparse corners of an asymmetric unit): the
        nearest orientation is at most half a psi step further than the nearest direction."""
        pixels, dirs, _ = _level_directions(self, level)
        dots = ((copies[:, 2, :] @ self.rotation.T) @ dirs.T).max(0)
        dist = np.rad2deg(np.arccos(np.clip(dots, -1.0, 1.0)))
        close = dist <= dist.min() + 360.0 / self.n_psi_at(level)
        radius = np.deg2rad(dist[close].max()) + 1e-9
        keys, theta, _ = self._windows(copies[None], level, radius, 0.0)
        return keys, theta

    def rotation_angle(self, rotations: np.ndarray, previous: np.ndarray) -> np.ndarray:
        """(n,) angle in degrees between rotations (n, 3, 3) and previous (n, 3, 3): of the
        rotation between them, or with symmetry between each rotation and the nearest
        symmetry copy previous @ R (the local searches' prior)."""
        ops = self.operators()
        if ops is None:
            tr = np.einsum("nij,nij->n", rotations, previous)
            return np.rad2deg(np.arccos(np.clip((tr - 1.0) / 2.0, -1.0, 1.0)))
        from .symmetry import angular_distance

        return angular_distance(rotations, previous, self.symmetry)

    # -- translations -----------------------------------------------------------------------

    def translations(self, oversampled: bool = False) -> np.ndarray:
        """(T, 2) translations in px (perturbed): the coarse grid, or its 2 x 2 children per
        translation (child key 4 t + c at -+ step/4 in x (c & 1) and y (c >> 1))."""
        coarse = translations(self.offset_range, self.offset_step) + self.offset_shift
        if not oversampled:
            return coarse
        d = np.array([[-1, -1], [1, -1], [-1, 1], [1, 1]], np.float64) * self.offset_step / 4
        return (coarse[:, None, :] + d[None]).reshape(-1, 2)


@functools.lru_cache(maxsize=32)
def _asymmetric_unit_cached(order: int, name: str) -> np.ndarray:
    from .symmetry import asymmetric_unit_directions

    out = asymmetric_unit_directions(order, name)
    out.setflags(write=False)
    return out


def asymmetric_unit_pixels(order: int, name: str) -> np.ndarray:
    """The HEALPix pixels (NEST, ascending, read-only) of a point group's asymmetric unit at
    an order (`symmetry.asymmetric_unit_directions`, cached: it takes up to seconds)."""
    from .symmetry import point_group

    return _asymmetric_unit_cached(int(order), point_group(name).name)


#: Dot products of (pose copies x directions) computed at once while finding windows.
_WINDOW_DOTS = 1 << 22


def _level_directions(s: PoseSampling, level: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The level's allowed HEALPix pixels (ascending), their unit vectors (P, 3), and each
    one's key part (its index among level 0's kept pixels with symmetry, else the pixel)."""
    return _directions_cached(s.healpix_order + level, level == 0 and s.restricted,
                              s.symmetry, int(s.healpix_order))


@functools.lru_cache(maxsize=16)
def _directions_cached(order: int, restricted0: bool, symmetry: str, order0: int
                       ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    nside = 1 << order
    if symmetry == "C1":
        pixels = np.arange(12 * nside * nside, dtype=np.int64)
    else:
        sub = 4 ** (order - order0)
        unit = asymmetric_unit_pixels(order0, symmetry)
        pixels = (unit[:, None] * sub + np.arange(sub)[None, :]).ravel()
    dirs = np.stack(_healpy().pix2vec(nside, pixels, nest=True), axis=1)
    key_of = np.arange(pixels.size, dtype=np.int64) if restricted0 else pixels
    for a in (pixels, dirs, key_of):
        a.flags.writeable = False
    return pixels, dirs, key_of


def _csr(counts: list[int], keys: list[np.ndarray], prior: list[np.ndarray]
         ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    ptr = np.zeros(len(counts) + 1, np.int64)
    ptr[1:] = np.cumsum(counts)
    if not keys:
        return ptr, np.zeros(0, np.int64), np.zeros(0)
    return ptr, np.concatenate(keys).astype(np.int64), np.concatenate(prior).astype(np.float64)


def coarse_radius(angular_step_deg: float, particle_diameter: float, box: int,
                  pixel_size: float, ndim: int = 3) -> int:
    """Fourier radius (px) of a pass whose samples are angular_step_deg apart: the resolution
    at which the particle's edge moves by a sample, with RELION's safety factor (1.2 in 3D,
    1.5 in 2D); RELION's coarse image size of adaptive oversampling."""
    moved = angular_step_deg / 360.0 * np.pi * particle_diameter
    resolution = moved / (1.2 if ndim == 3 else 1.5)
    return int(np.ceil(box * pixel_size / resolution))
