"""A built-in, protein-like, chiral test map made of Gaussian "atoms".

The molecule is defined in Angstrom, independent of the box: four domains of different sizes
(a large ellipsoidal body, a smaller globular domain, an off-axis three-helix bundle arm and a
small knob), the body itself screw-twisted, arranged without any mirror symmetry, so its
handedness is visible: at 3 A/px the mirror image correlates 0.80 with the map after the best
principal-axis superposition (0.91 at 4.8 A/px), against > 0.99 for a rotated copy. Atom centres
lie within 56 A of the centre of mass; at 3 A/px 99.99% of the density lies within 67 A, so the
molecule fits in 0.7 of the box diameter whenever box * pixel_size >= ~192 A (e.g. 64 px at
3 A; at 32 px x 6 A the wider atoms leave 0.3% of the density outside).

Maps are (z, y, x) float32 arrays with the molecule's centre of mass at the origin floor(N/2)
(docs/conventions.md, "Grids"). Variants for classification tests drop or move single domains while
keeping the frame (centring) and intensity scale of the full molecule.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from . import fourier

#: Domain names, in index order (use the index with drop_domain / domain_shift).
DOMAINS = ("body", "head", "arm", "knob")

_BASE_SIGMA_A = 4.5  # atom blur (A); widened to >= 1.5 px on coarse grids
_MIN_SIGMA_PX = 1.5
_SIZE_SCALE = 0.93  # overall size: keeps the blurred density within 0.7 of a 192 A box
_ATOM_SPACING_A = 5.0  # ~ one atom per (5 A)^3 gives a solid, protein-like density
#: scale of make_phantom giving a ribosome-sized molecule (about 250 A across)
RIBOSOME_SCALE = 2.1


@dataclass(frozen=True)
class _Domain:
    centre: tuple[float, float, float]  # (x, y, z) A, before centring on the centre of mass
    n_atoms: int
    points: np.ndarray  # (n, 3) atom centres (x, y, z) A relative to centre


def _ellipsoid_points(rng: np.random.Generator, semi_axes: Sequence[float],
                      rotation: np.ndarray) -> np.ndarray:
    """Random points filling an ellipsoid at ~ one per (_ATOM_SPACING_A)^3 of its volume."""
    a = np.asarray(semi_axes, dtype=np.float64)
    n = max(8, int(round(4.0 / 3.0 * np.pi * np.prod(a) / _ATOM_SPACING_A**3)))
    u = rng.normal(size=(n, 3))
    u /= np.linalg.norm(u, axis=1, keepdims=True)
    r = rng.uniform(size=(n, 1)) ** (1.0 / 3.0)  # uniform in the ball
    return (u * r * a) @ rotation.T


def _rotation_about(axis: Sequence[float], angle_deg: float) -> np.ndarray:
    """Active right-handed rotation matrix about an axis (Rodrigues)."""
    k = np.asarray(axis, dtype=np.float64)
    k = k / np.linalg.norm(k)
    t = np.deg2rad(angle_deg)
    kx = np.array([[0, -k[2], k[1]], [k[2], 0, -k[0]], [-k[1], k[0], 0]])
    return np.eye(3) + np.sin(t) * kx + (1 - np.cos(t)) * kx @ kx


def _helix_bundle(rng: np.random.Generator, length: float, direction: Sequence[float]
                  ) -> np.ndarray:
    """Three right-handed alpha-helix-like paths (Calpha-like spacing) twisted into a
    left-handed supercoil along `direction`: an elongated, intrinsically chiral arm."""
    d = np.asarray(direction, dtype=np.float64)
    d /= np.linalg.norm(d)
    # orthonormal frame (e1, e2, d)
    e1 = np.cross(d, [0.0, 0.0, 1.0] if abs(d[2]) < 0.9 else [1.0, 0.0, 0.0])
    e1 /= np.linalg.norm(e1)
    e2 = np.cross(d, e1)
    pts = []
    n_res = int(length / 1.5)  # 1.5 A rise per residue
    t = np.arange(n_res) * 1.5 - length / 2
    for h in range(3):
        phase = 2 * np.pi * h / 3
        sc = phase - 2 * np.pi * t / 90.0  # supercoil: left-handed, 90 A pitch
        cx, cy = 6.5 * np.cos(sc), 6.5 * np.sin(sc)
        hel = np.deg2rad(100.0) * np.arange(n_res) + phase  # 3.6 residues per turn
        hx, hy = cx + 2.3 * np.cos(hel), cy + 2.3 * np.sin(hel)
        pts.append(hx[:, None] * e1 + hy[:, None] * e2 + t[:, None] * d)
    p = np.concatenate(pts)
    return p + rng.normal(scale=0.3, size=p.shape)


def _twist(points: np.ndarray, degrees_per_a: float) -> np.ndarray:
    """Rotate each point about z by an angle proportional to its z: a chiral (screw) warp."""
    t = np.deg2rad(degrees_per_a) * points[:, 2]
    c, s = np.cos(t), np.sin(t)
    x, y = points[:, 0], points[:, 1]
    return np.stack([c * x - s * y, s * x + c * y, points[:, 2]], axis=1)


def _domains(seed: int) -> list[_Domain]:
    """The four domains in A (x, y, z), deterministic for a seed."""
    rng = np.random.default_rng(seed)
    specs = []
    # body: flattened ellipsoid, screw-twisted along its long axis (itself chiral)
    body = _ellipsoid_points(rng, (26.0, 10.0, 34.0), np.eye(3))
    body = _twist(body, 3.5) @ _rotation_about((1.0, 2.0, 0.5), 70.0).T
    specs.append(((-8.0, -6.0, -4.0), body))
    head = _ellipsoid_points(rng, (17.0, 15.0, 14.0), _rotation_about((0, 1, 1), 40.0))
    specs.append(((22.0, 24.0, 12.0), head))
    arm_dir = np.array([0.35, -0.55, 0.76])
    arm_dir /= np.linalg.norm(arm_dir)
    arm = _helix_bundle(rng, 50.0, arm_dir)
    specs.append((tuple(np.array([6.0, -14.0, 6.0]) + 25.0 * arm_dir), arm))
    knob = _ellipsoid_points(rng, (12.0, 11.0, 9.0), np.eye(3))
    specs.append(((-30.0, 18.0, -22.0), knob))
    return [_Domain(tuple(float(c) for c in cen), len(p), p) for cen, p in specs]


def atom_model(seed: int = 0, drop_domain: int | Sequence[int] | None = None,
               domain_shift: Mapping[int, Sequence[float]] | None = None, scale: float = 1.0,
               remove_share: float = 0.0) -> tuple[np.ndarray, np.ndarray]:
    """Atom centres (n, 3) as (x, y, z) in A relative to the full molecule's centre of mass,
    and each atom's domain index (n,). Variants drop domains or move them by (dx, dy, dz) A
    (before `scale`, which enlarges the whole molecule), or lose a compact piece holding
    `remove_share` of the atoms (of the mass): the atoms nearest to the surface atom farthest
    along (1, 1, 0.5), as when a subunit or a ligand-bound domain is absent."""
    doms = _domains(seed)
    xyz = np.concatenate([np.asarray(d.centre) + d.points for d in doms])
    dom = np.concatenate([np.full(d.n_atoms, i) for i, d in enumerate(doms)])
    # frame (centre of mass) of the full molecule, shared by all variants
    xyz = (xyz - xyz.mean(axis=0)) * _SIZE_SCALE
    if domain_shift:
        for k, s in domain_shift.items():
            _check_domain(k)
            xyz[dom == k] += np.asarray(s, dtype=np.float64)
    if drop_domain is not None:
        drop = [drop_domain] if np.isscalar(drop_domain) else list(drop_domain)
        for k in drop:
            _check_domain(int(k))
        keep = ~np.isin(dom, drop)
        xyz, dom = xyz[keep], dom[keep]
    if remove_share:
        if not 0 < remove_share < 1:
            raise ValueError(f"remove_share: expected a fraction in (0, 1), got {remove_share}")
        anchor = xyz[np.argmax(xyz @ np.array([1.0, 1.0, 0.5]))]
        k = int(round(remove_share * len(xyz)))
        keep = np.ones(len(xyz), bool)
        keep[np.argsort(((xyz - anchor) ** 2).sum(1), kind="stable")[:k]] = False
        xyz, dom = xyz[keep], dom[keep]
    return xyz * float(scale), dom


def _check_domain(k: int) -> None:
    if not 0 <= int(k) < len(DOMAINS):
        raise ValueError(f"domain: expected an index 0..{len(DOMAINS) - 1} "
                         f"({', '.join(DOMAINS)}), got {k}")


def atom_sigma(pixel_size: float) -> float:
    """Gaussian atom width (A) used on a grid of this pixel size: >= 1.5 px so the map is
    band-limited well below Nyquist (no aliasing)."""
    return max(_BASE_SIGMA_A, _MIN_SIGMA_PX * float(pixel_size))


def render_atoms(xyz: np.ndarray, box: int, pixel_size: float, sigma: float,
                 chunk: int = 64) -> np.ndarray:
    """Sum of unit-height Gaussians at (x, y, z) A positions on a (box,)*3 grid, (z, y, x),
    origin floor(box/2). Separable: each atom is an outer product of three 1D profiles."""
    c = (np.arange(box) - fourier.origin(box)) * float(pixel_size)
    out = np.zeros((box * box, box), dtype=np.float64)
    inv = -0.5 / sigma**2
    for i in range(0, len(xyz), chunk):
        p = xyz[i:i + chunk]
        gx = np.exp(inv * (c[None, :] - p[:, 0:1]) ** 2)
        gy = np.exp(inv * (c[None, :] - p[:, 1:2]) ** 2)
        gz = np.exp(inv * (c[None, :] - p[:, 2:3]) ** 2)
        zy = (gz[:, :, None] * gy[:, None, :]).reshape(len(p), box * box)
        out += zy.T @ gx
    return out.reshape(box, box, box)


def make_phantom(box: int = 64, pixel_size: float = 3.0, seed: int = 0,
                 drop_domain: int | Sequence[int] | None = None,
                 domain_shift: Mapping[int, Sequence[float]] | None = None,
                 scale: float = 1.0, remove_share: float = 0.0) -> np.ndarray:
    """The built-in chiral test molecule on a (box, box, box) grid, (z, y, x) float32.

    Parameters
    ----------
    box, pixel_size : grid size (px) and sampling (A/px). The molecule has a fixed size in A.
    seed : atom placement; the same seed gives the same map.
    drop_domain : index (or indices) into DOMAINS of domains to leave out (variants).
    domain_shift : {domain index: (dx, dy, dz) A} moves of single domains (variants).
    scale : size factor of the molecule (RIBOSOME_SCALE: about 250 A across, a ribosome's
        size; the atoms keep their width).
    remove_share : a compact piece holding this share of the mass removed (see atom_model).

    Density is positive and scaled so the full molecule's maximum is 1 (variants keep that
    scale, and the full molecule's centring, so they are directly comparable).
    """
    if box < 8:
        raise ValueError(f"box: expected >= 8 px, got {box}")
    if not pixel_size > 0:
        raise ValueError(f"pixel size: expected > 0 A, got {pixel_size}")
    sigma = atom_sigma(pixel_size)
    # Coarse grids widen the atoms; keep each atom's integrated mass fixed.
    amp = (_BASE_SIGMA_A / sigma) ** 3
    if not scale > 0:
        raise ValueError(f"scale: expected > 0, got {scale}")
    full_xyz, _ = atom_model(seed, scale=scale)
    full = render_atoms(full_xyz, box, pixel_size, sigma) * amp
    norm = 1.0 / full.max()
    if drop_domain is None and not domain_shift and not remove_share:
        vol = full
    else:
        xyz, _ = atom_model(seed, drop_domain, domain_shift, scale, remove_share)
        vol = render_atoms(xyz, box, pixel_size, sigma) * amp
    return (vol * norm).astype(np.float32)


#: Built-in variants for classification tests: keyword arguments of make_phantom.
VARIANTS: tuple[dict, ...] = (
    {},                                   # 0: full molecule
    {"drop_domain": 3},                   # 1: without the knob
    {"domain_shift": {2: (-12.0, 10.0, -6.0)}},  # 2: arm swung by ~17 A
    {"drop_domain": 1},                   # 3: without the head
)


def make_phantom_variant(variant: int, box: int = 64, pixel_size: float = 3.0,
                         seed: int = 0, scale: float = 1.0) -> np.ndarray:
    """Variant `variant` (index into VARIANTS) of the phantom: distinct but related maps in
    the same frame and scale, for classification tests. Variant 0 is make_phantom itself."""
    if not 0 <= variant < len(VARIANTS):
        raise ValueError(f"variant: expected 0..{len(VARIANTS) - 1}, got {variant}")
    return make_phantom(box, pixel_size, seed, scale=scale, **VARIANTS[variant])
