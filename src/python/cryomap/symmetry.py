"""Point-group symmetry with RELION's group names and axis conventions (docs/symmetry.md).

Groups (names case-insensitive, as RELION's `--sym`): C<n> and D<n> (n = 1..99), T, O, I (the
same as I2) and the icosahedral settings I1, I2, I3, I4. Only proper rotation groups are
accepted: the groups with mirrors or an inversion centre (Ci, Cs, C<n>v, C<n>h, S<n>, D<n>v,
D<n>h, Td, Th, Oh, Ih, I<k>h) cannot describe a chiral molecule and are refused.

Axes, in the map's (x, y, z) frame (x = fastest array index, origin at voxel floor(N/2)):

- C<n>: n-fold axis on z.
- D<n>: n-fold on z, a 2-fold on x (and, for even n, also on y).
- T: a 3-fold on z and a 2-fold on (0, sqrt(2/3), sqrt(1/3)) in the yz plane.
- O: 4-folds on x, y and z; 3-folds on (+-1, +-1, +-1).
- I2 (= I, Crowther's setting): 2-folds on x, y and z; a 5-fold on (1, 0, phi) and a 3-fold
  on (0, 1/phi, phi) (normalised; phi = golden ratio).
- I1: I2 turned by 90 degrees about y (2-folds still on x, y, z; 5-fold on (phi, 0, -1)).
- I3: a 5-fold on z and a 2-fold on (-1, 0, phi) in the xz plane.
- I4: a 5-fold on z and a 2-fold on (1, 0, phi) in the xz plane (I3 turned by 180 degrees
  about z).

How the operators act. `operators(name)` returns rotation matrices R (active, right-handed,
acting on column vectors (x, y, z) in Angstrom or pixels about the map centre). A map V with the
symmetry satisfies V(R x) = V(x) for every R (the set is a group, so also for every R^T).
In cryomap's Euler convention (`euler.py`: A = Euler(rot, tilt, psi) rotates the reference
into the image, an image pixel k samples the reference at A^T k) the poses A and A R give the
same projection of a symmetric map for every R, so projection directions d (row 3 of A) and
R^T d are equivalent; `asymmetric_unit_directions` keeps one of each equivalent set of
HEALPix directions, following RELION's choice of the asymmetric unit.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import healpy
import numpy as np

from . import fourier
from .errors import InputError
from .euler import euler_to_matrix, projection_direction
from .sampling import OrientationGrid, angular_step, healpix_directions, healpix_nside, psi_angles

__all__ = [
    "PointGroup", "point_group", "operators", "equivalent_rotations", "angular_distance",
    "asymmetric_unit_directions", "asymmetric_unit_orientations", "rotate_volume",
    "symmetrize_volume", "symmetrize_sums",
]

_PHI = (1.0 + 5.0**0.5) / 2.0

#: What the error message lists as accepted names.
ACCEPTED = "C<n> or D<n> (n = 1..99), T, O, I (= I2), I1, I2, I3, I4"

_IMPROPER = re.compile(r"^(CI|CS|C\d{1,2}[HV]|S\d{1,2}|D\d{1,2}[HV]|TD|TH|OH|IH|I[1-5]H|I5)$")


@dataclass(frozen=True)
class PointGroup:
    """A parsed symmetry name.

    family is "C", "D", "T", "O" or "I"; n is the n of C<n>/D<n>, the setting 1..4 of I (I = I2)
    and 0 for T and O. name is the canonical (upper-case) spelling, e.g. "C4", "I2".
    """

    name: str
    family: str
    n: int

    @property
    def order(self) -> int:
        """Number of operators: n (C<n>), 2n (D<n>), 12 (T), 24 (O), 60 (I)."""
        return {"C": self.n, "D": 2 * self.n, "T": 12, "O": 24, "I": 60}[self.family]


def point_group(name: str | PointGroup, option: str = "--sym") -> PointGroup:
    """Parse a RELION symmetry name (case-insensitive); InputError naming `option` if unknown.

    "I" and "I2" are the same group (canonical name "I2"); "C1" is the trivial group.
    """
    if isinstance(name, PointGroup):
        return name
    text = str(name).strip().upper()
    m = re.fullmatch(r"([CD])(\d{1,2})", text)
    if m and int(m.group(2)) >= 1:
        return PointGroup(f"{m.group(1)}{int(m.group(2))}", m.group(1), int(m.group(2)))
    if text in ("T", "O"):
        return PointGroup(text, text, 0)
    if text == "I":
        return PointGroup("I2", "I", 2)
    if re.fullmatch(r"I[1-4]", text):
        return PointGroup(text, "I", int(text[1]))
    if _IMPROPER.match(text):
        why = ("I5 is not implemented (nor in RELION)" if text.startswith("I5") else
               "it contains mirror or inversion operations, which a chiral molecule cannot have")
        raise InputError(f"{option} {name!r}: symmetry group not supported ({why}); expected "
                         f"one of {ACCEPTED}")
    raise InputError(f"{option} {name!r}: unknown symmetry group; expected one of {ACCEPTED}")


def _unit(v: tuple[float, float, float]) -> np.ndarray:
    a = np.asarray(v, dtype=np.float64)
    return a / np.linalg.norm(a)


def _rotation(axis: np.ndarray, degrees: float) -> np.ndarray:
    """Active right-handed rotation by `degrees` about the unit vector `axis` (Rodrigues)."""
    t = np.deg2rad(degrees)
    k = np.array([[0.0, -axis[2], axis[1]], [axis[2], 0.0, -axis[0]],
                  [-axis[1], axis[0], 0.0]])
    return np.eye(3) + np.sin(t) * k + (1.0 - np.cos(t)) * (k @ k)


def _conjugate(q: np.ndarray, ops: np.ndarray) -> np.ndarray:
    """The group turned by the rotation q: {q R q^T}."""
    return np.einsum("ij,rjk,lk->ril", q, ops, q)


def _defining_axes(g: PointGroup) -> list[tuple[int, np.ndarray]]:
    """(fold, unit axis) pairs generating C, D, T, O and the I2 setting (RELION's axes)."""
    z, x = np.array([0.0, 0.0, 1.0]), np.array([1.0, 0.0, 0.0])
    if g.family == "C":
        return [(g.n, z)] if g.n > 1 else []
    if g.family == "D":
        return ([(g.n, z)] if g.n > 1 else []) + [(2, x)]
    if g.family == "T":
        return [(3, z), (2, _unit((0.0, np.sqrt(2.0 / 3.0), np.sqrt(1.0 / 3.0))))]
    if g.family == "O":
        return [(3, _unit((1.0, 1.0, 1.0))), (4, z)]
    return [(2, z), (5, _unit((1.0, 0.0, _PHI))), (3, _unit((0.0, 1.0 / _PHI, _PHI)))]


#: Angle between a 5-fold and its nearest 2-fold, atan(1/phi) = 31.7175 degrees.
_FIVE_TWO_DEG = float(np.rad2deg(np.arctan(1.0 / _PHI)))
_Y = np.array([0.0, 1.0, 0.0])

#: The other icosahedral settings are I2 turned about y by these angles (degrees).
_I_SETTING_TURN = {1: 90.0, 2: 0.0, 3: -_FIVE_TWO_DEG, 4: _FIVE_TWO_DEG}
#: ... and RELION's asymmetric unit of each setting is I2's turned by these (I1: the other way
#: round, equally valid as I2 holds the 180-degree turn about y).
_I_REGION_TURN = {1: -90.0, 2: 0.0, 3: -_FIVE_TWO_DEG, 4: _FIVE_TWO_DEG}


def _close(gens: list[np.ndarray]) -> np.ndarray:
    """All products of the generators (breadth first, identity first), duplicates removed."""
    group = [np.eye(3)]
    frontier = [np.eye(3)]
    while frontier:
        new = []
        for a in frontier:
            for g in gens:
                c = g @ a
                if not any(np.abs(c - b).max() < 1e-6 for b in group):
                    group.append(c)
                    new.append(c)
        frontier = new
        if len(group) > 240:  # no finite rotation group of ours is this large
            raise RuntimeError("symmetry generators do not close into a finite group")
    out = np.array(group)
    # Polar decomposition removes the rounding the products accumulated.
    u, _, vt = np.linalg.svd(out)
    out = u @ vt
    out[np.abs(out) < 1e-14] = 0.0
    return out


@functools.lru_cache(maxsize=64)
def _operators_cached(canonical: str) -> np.ndarray:
    g = point_group(canonical)
    ops = _close([_rotation(axis, 360.0 / fold) for fold, axis in _defining_axes(g)])
    if g.family == "I" and g.n != 2:
        ops = _conjugate(_rotation(_Y, _I_SETTING_TURN[g.n]), ops)
    ops.setflags(write=False)
    return ops


def operators(name: str | PointGroup) -> np.ndarray:
    """The group's rotation matrices, (order, 3, 3) float64, identity first.

    Each R acts on column vectors (x, y, z) about the map centre; a symmetric map satisfies
    V(R x) = V(x). Same set as RELION's symmetry operators of the name (module docstring).
    """
    return _operators_cached(point_group(name).name).copy()


def equivalent_rotations(matrices: np.ndarray, name: str | PointGroup) -> np.ndarray:
    """Poses equivalent to RELION Euler matrices A (..., 3, 3) under the group: A @ R for every
    operator R, shape (..., order, 3, 3). A symmetric map projects identically at all of them."""
    a = np.asarray(matrices, dtype=np.float64)
    return np.einsum("...ij,rjk->...rik", a, operators(name))


def angular_distance(a: np.ndarray, b: np.ndarray, name: str | PointGroup) -> np.ndarray:
    """Angle in degrees between poses a and b (..., 3, 3) up to the group: the smallest
    rotation angle between a and any equivalent pose b @ R (`equivalent_rotations`). The
    angular error of a pose estimated under symmetry; for C1 `euler.angular_distance`."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    # tr(a (b R)^T) = sum_ij a_ij (b R)_ij, the largest over R is the nearest copy
    tr = np.einsum("...ij,...ik,rkj->...r", a, b, operators(name)).max(axis=-1)
    return np.rad2deg(np.arccos(np.clip((tr - 1.0) / 2.0, -1.0, 1.0)))


# --- asymmetric unit of projection directions ---------------------------------------------

# Above this many directions after the geometric cut RELION skips the removal of duplicates on
# the borders of the asymmetric unit (healpix_sampling.cpp: removeSymmetryEquivalentPoints).
_SEAM_LIMIT = 4000
_TOL = 1e-9  # degrees / dot products: border points count as inside despite rounding


def _planes_inside(dirs: np.ndarray, normals: list[np.ndarray]) -> np.ndarray:
    return np.all([dirs @ (n / np.linalg.norm(n)) >= -_TOL for n in normals], axis=0)


def _geometric_region(g: PointGroup, rot: np.ndarray, tilt: np.ndarray,
                      dirs: np.ndarray) -> np.ndarray:
    """RELION's asymmetric unit of directions per group (borders included): a rot wedge and/or
    a spherical triangle bounded by great circles (given by their normals)."""
    def rot_in(lo: float, hi: float) -> np.ndarray:
        return (rot >= lo - _TOL) & (rot <= hi + _TOL)

    upper = tilt <= 90.0 + _TOL
    if g.family == "C":
        return rot_in(-180.0 / g.n, 180.0 / g.n)
    if g.family == "D":
        return upper if g.n == 1 else upper & rot_in(90.0 - 180.0 / g.n, 90.0 + 180.0 / g.n)
    s2, s3, s6 = np.sqrt(2.0), np.sqrt(3.0), np.sqrt(6.0)
    if g.family == "T":
        # triangle: normals of the planes through the 3-folds bounding one face
        normals = [np.array([-1.0, 0.0, 0.0]), np.array([s2 / 3, s6 / 9, 4 / (3 * s3)]),
                   np.array([s2 / 3, s6 / 3, 0.0])]
        return rot_in(90.0, 150.0) & _planes_inside(dirs, normals)
    if g.family == "O":
        normals = [np.array([0.0, -1.0, 1.0]), np.array([1.0, 1.0, 0.0]),
                   np.array([-1.0, 1.0, 0.0])]
        return rot_in(45.0, 135.0) & upper & _planes_inside(dirs, normals)
    # Icosahedral: a triangle of two 5-folds and a 3-fold of I2 (normals point inwards), turned
    # with the setting. I4 uses another of I2's triangles (the one with z <= 0 before turning).
    p = _PHI
    if g.n == 4:
        tri = [np.array([0.0, 0.0, -1.0]), np.array([-0.5 / p, 0.5, p / 2]),
               np.array([-0.5 / p, -0.5, p / 2])]
    else:
        tri = [np.array([0.0, 1.0, 0.0]), np.array([-0.5, -p / 2, 0.5 / p]),
               np.array([0.5, -p / 2, 0.5 / p])]
    turn = _rotation(_Y, _I_REGION_TURN[g.n])
    return _planes_inside(dirs, [turn @ v for v in tri])


def _remove_seam_duplicates(dirs: np.ndarray, ops: np.ndarray, max_angle: float
                            ) -> np.ndarray:
    """Greedy pass in index order: keep a direction unless some operator maps an already kept
    one to within max_angle (radians) of it. Returns a boolean keep mask."""
    n = dirs.shape[0]
    cos_max = np.cos(max_angle)
    partners: list[list[int]] = [[] for _ in range(n)]
    chunk = max(1, 2_000_000 // max(n, 1))
    for r in ops:
        rotated = dirs @ r  # row k = (R^T d_k)^T
        for s in range(0, n, chunk):
            close = rotated[s:s + chunk] @ dirs.T > cos_max  # [k, i]
            ks, is_ = np.nonzero(close)
            ks = ks + s
            for k, i in zip(ks[ks < is_].tolist(), is_[ks < is_].tolist(), strict=True):
                partners[i].append(k)
    keep = np.ones(n, dtype=bool)
    for i in range(n):
        if partners[i] and keep[partners[i]].any():
            keep[i] = False
    return keep


def asymmetric_unit_directions(order: int, name: str | PointGroup) -> np.ndarray:
    """Indices into `sampling.healpix_directions(order)` of the directions RELION keeps for a
    group: those inside the group's asymmetric unit (borders included), then, when fewer than
    4000 remain, without the ones that an operator maps to within half the HEALPix maximum
    pixel radius of a direction kept earlier (NEST index order). int64, ascending.

    The counts per order are listed in docs/symmetry.md (about 12*4^order / group order, plus
    part of the border).
    """
    g = point_group(name)
    rot, tilt = healpix_directions(order)
    dirs = projection_direction(rot, tilt)
    idx = np.flatnonzero(_geometric_region(g, rot, tilt, dirs))
    if idx.size < _SEAM_LIMIT:
        max_angle = 0.5 * healpy.max_pixrad(healpix_nside(order))
        idx = idx[_remove_seam_duplicates(dirs[idx], operators(g), max_angle)]
    return idx.astype(np.int64)


def asymmetric_unit_orientations(order: int, name: str | PointGroup,
                                 psi_step: float | None = None) -> OrientationGrid:
    """`sampling.orientations_3d` restricted to the asymmetric unit's directions: the kept
    HEALPix directions x all in-plane angles (psi step defaults to the angular step),
    direction-major, in the order of `asymmetric_unit_directions`."""
    rot, tilt = healpix_directions(order)
    keep = asymmetric_unit_directions(order, name)
    psi = psi_angles(angular_step(order) if psi_step is None else psi_step)
    rot, tilt = rot[keep], tilt[keep]
    angles = np.stack(
        [np.repeat(rot, psi.size), np.repeat(tilt, psi.size), np.tile(psi, rot.size)], axis=1)
    return OrientationGrid(angles, euler_to_matrix(angles[:, 0], angles[:, 1], angles[:, 2]))


# --- maps and back-projection sums --------------------------------------------------------

_CHUNK = 8192  # points per vectorised step: the gathers stay in cache (measured optimum)


def _is_grid_permutation(r: np.ndarray) -> bool:
    """True if R maps the integer grid onto itself (entries 0 or +-1): no interpolation."""
    return bool(np.all(np.abs(r - np.round(r)) < 1e-9))


def _trilinear_terms(p: np.ndarray, strides: tuple[int, int, int]
                     ) -> tuple[np.ndarray, np.ndarray]:
    """Flat indices (8, n) and weights (8, n) of the trilinear footprints of points p (3, n)
    given as (x, y, z) array indices; strides are the flat strides of x, y and z."""
    b = np.floor(p)
    f = p - b
    g = 1.0 - f
    b = b.astype(np.int64)
    lin = b[0] * strides[0] + b[1] * strides[1] + b[2] * strides[2]
    wx, wy, wz = np.stack([g[0], f[0]]), np.stack([g[1], f[1]]), np.stack([g[2], f[2]])
    w = (wz[:, None, None, :] * wy[None, :, None, :] * wx[None, None, :, :]).reshape(8, -1)
    offs = np.array([dz * strides[2] + dy * strides[1] + dx * strides[0]
                     for dz in (0, 1) for dy in (0, 1) for dx in (0, 1)], dtype=np.int64)
    return lin[None, :] + offs[:, None], w


def rotate_volume(volume: np.ndarray, matrix: np.ndarray) -> np.ndarray:
    """The map turned by the rotation `matrix` about its centre floor(N/2): out(x) = V(R^T x),
    so density at x moves to R x. Trilinear interpolation, 0 outside the box; (z, y, x) cube
    in, float64 out."""
    v = np.asarray(volume, dtype=np.float64)
    n = v.shape[0]
    if v.ndim != 3 or v.shape != (n, n, n):
        raise ValueError(f"expected a cubic (z, y, x) map, got shape {v.shape}")
    r = np.asarray(matrix, dtype=np.float64)
    c = fourier.origin(n)
    # Two zero layers on every side: clipped far-away points then read only zeros.
    padded = np.zeros((n + 4,) * 3)
    padded[2:-2, 2:-2, 2:-2] = v
    flat = padded.reshape(-1)
    strides = (1, n + 4, (n + 4) ** 2)
    zz, yy, xx = np.meshgrid(*([np.arange(n, dtype=np.float64) - c] * 3), indexing="ij")
    pts = np.stack([xx.ravel(), yy.ravel(), zz.ravel()])
    out = np.empty(pts.shape[1])
    for s in range(0, pts.shape[1], _CHUNK):
        q = np.clip(r.T @ pts[:, s:s + _CHUNK] + (c + 2), 0.0, n + 2.0)
        if _is_grid_permutation(r):
            qi = np.rint(q).astype(np.int64)
            out[s:s + _CHUNK] = flat[qi[0] * strides[0] + qi[1] * strides[1]
                                     + qi[2] * strides[2]]
            continue
        idx, w = _trilinear_terms(q, strides)
        out[s:s + _CHUNK] = (np.take(flat, idx) * w).sum(axis=0)
    return out.reshape(v.shape)


def symmetrize_volume(volume: np.ndarray, name: str | PointGroup) -> np.ndarray:
    """Average of the map over the group's operators, (1/|G|) sum_R V(R x): real space,
    trilinear interpolation about the centre floor(N/2), 0 beyond the box (RELION's
    symmetriseMap without wrapping). Returns float64 (z, y, x).
    """
    ops = operators(name)
    v = np.asarray(volume, dtype=np.float64)
    out = v.copy()  # identity, no interpolation
    for r in ops[1:]:
        out += rotate_volume(v, r)
    return out / len(ops)


def _check_hermitian_plane(data: np.ndarray, weight: np.ndarray) -> None:
    plane, wplane = data[:, :, 0], weight[:, :, 0]
    scale = max(float(np.abs(plane).max()), 1e-30)
    wscale = max(float(np.abs(wplane).max()), 1e-30)
    if (np.abs(plane - np.conj(plane[::-1, ::-1])).max() > 1e-5 * scale
            or np.abs(wplane - wplane[::-1, ::-1]).max() > 1e-5 * wscale):
        raise ValueError("symmetrize_sums: the kx = 0 plane is not Hermitian; fold it first "
                         "(fourier.symmetrize_kx0_plane), as RELION does before symmetrising")


def symmetrize_sums(data: np.ndarray, weight: np.ndarray, name: str | PointGroup,
                    radius: float | None = None) -> tuple[np.ndarray, np.ndarray]:
    """Back-projection sums summed over the group's operators (RELION's
    BackProjector::applyPointGroupSymmetry).

    data (complex) and weight (real) are centred padded half-volumes (2m+1, 2m+1, m+1) indexed
    [kz + m, ky + m, kx] (`projector.empty_sums`), kx >= 0, the kx = 0 plane already folded to
    be Hermitian (`fourier.symmetrize_kx0_plane`). For each voxel k with |k| <= radius (padded
    grid units; default m - 1, the largest radius whose trilinear footprint stays inside the
    array; RELION uses round(r_max * pad)) the result is sum_R S(R k), S read by trilinear
    interpolation (exactly, without interpolation, for operators that permute the grid), a
    point with negative kx read as the conjugate of its Friedel mate. Voxels beyond the radius
    keep their input values (as in RELION). A group of grid permutations may be summed factor
    by factor (`transversal_chain`), the same sums in fewer passes. The sums are not divided
    by the group order:
    back-projected over the asymmetric unit and summed here they stand for a search over all
    directions. Returns new arrays of the input dtypes.

    The C++ kernel `core.symmetrise_sums` (tests/test_symmetry.py holds its loop reference).
    """
    g = point_group(name)
    data = np.asarray(data)
    weight = np.asarray(weight)
    if (data.shape != weight.shape or data.ndim != 3 or data.shape[0] != data.shape[1]
            or data.shape[0] != 2 * data.shape[2] - 1):
        raise ValueError(f"symmetrize_sums: expected data and weight of one shape (2m+1, 2m+1, "
                         f"m+1), got {data.shape} and {weight.shape}")
    m = data.shape[2] - 1
    r = float(m - 1) if radius is None else float(radius)
    if r > m - 1:
        raise ValueError(f"symmetrize_sums: radius {radius} too large for the centred "
                         f"half-volume of radius {m}; expected <= {m - 1}")
    ops = operators(g)
    if len(ops) == 1:
        return data.copy(), weight.copy()
    _check_hermitian_plane(data, weight)

    # the C++ kernel in the input's precision: complex64/float32 (the engine's sums) or
    # complex128/float64
    single = data.dtype == np.complex64
    dtypes = (np.complex64, np.float32) if single else (np.complex128, np.float64)
    # a group of grid permutations is summed factor by factor (exact), where the passes saved
    # outweigh a step's copy of the arrays (about 3 passes, measured): O's 23 passes take 5
    # in 4 steps (0.47 -> 0.22 s at box 128, pad 2, 2 threads); D4's 7 would take 3 in 3
    steps = [ops[1:]]
    chain = transversal_chain(ops)
    if chain is not None and (len(ops) - 1) - sum(len(t) - 1 for t in chain) > 3 * (
            len(chain) - 1):
        steps = [t[1:] for t in chain]
    out_d, out_w = _core().symmetrise_sums(np.ascontiguousarray(data, dtypes[0]),
                                           np.ascontiguousarray(weight, dtypes[1]),
                                           np.ascontiguousarray(np.concatenate(steps),
                                                                np.float64),
                                           r, [len(step) for step in steps])
    return out_d.astype(data.dtype, copy=False), out_w.astype(weight.dtype, copy=False)


def transversal_chain(ops: np.ndarray) -> list[np.ndarray] | None:
    """Factors T_k, ..., T_1 of a group of grid permutations (`_is_grid_permutation`), each
    (t, 3, 3) with the identity first, such that every operator is exactly one product
    t_k ... t_1: the sum over the group, sum_g S(g k), is then k steps of sums over a factor,
    S <- S + sum_{t != 1} S(t k), T_k's first (sum_{t_k} ... sum_{t_1} S(t_k ... t_1 k)). The
    factors are transversals of a chain of subgroups, each step adding the operator that gives
    the smallest subgroup: O's 23 passes over the sums become 5 (indices 2, 2, 2, 3), exact as
    no point is interpolated. None where an operator interpolates or `ops` is not a group."""
    if len(ops) < 3 or not all(_is_grid_permutation(r) for r in ops):
        return None
    elems = [np.rint(r).astype(np.int64) for r in ops]
    known = {e.tobytes() for e in elems}
    current = [np.eye(3, dtype=np.int64)]
    factors = []
    while len(current) < len(elems):
        have = {c.tobytes() for c in current}
        subgroups = [_close_int(current + [g]) for g in elems if g.tobytes() not in have]
        bigger = min(subgroups, key=len)
        if not {h.tobytes() for h in bigger} <= known:
            return None  # not closed: not a group
        # left coset representatives t with bigger = t * current (one each)
        reps, covered = [], set()
        for h in bigger:
            if h.tobytes() not in covered:
                reps.append(h)
                covered |= {(h @ c).tobytes() for c in current}
        factors.append(np.array(reps, np.float64))
        current = bigger
    return factors[::-1]


def _close_int(gens: list[np.ndarray]) -> list[np.ndarray]:
    """The group the integer matrices generate (identity first): `_close` for signed
    permutations, hashed exactly, as transversal_chain runs at every symmetrisation (5 ms for
    O; `_close`'s tolerant comparisons took 19 times as long per closure)."""
    group = {np.eye(3, dtype=np.int64).tobytes(): np.eye(3, dtype=np.int64)}
    frontier = list(group.values())
    while frontier:
        new = []
        for a in frontier:
            for g in gens:
                c = g @ a
                if c.tobytes() not in group:
                    group[c.tobytes()] = c
                    new.append(c)
        frontier = new
    return list(group.values())


def _core():
    from ._kernels import core

    return core
