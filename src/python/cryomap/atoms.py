"""Pseudo-atomic test molecules and their density maps: maps with detail out to Nyquist at
any pixel size (docs/conventions.md, "Test maps").

A molecule is built from ideal alpha helices, atom by atom: backbone N, CA, C, O on the
helix's standard cylinder, a CB and a short random side chain per residue (about 7.5 heavy
atoms per residue, as in proteins). Two molecules are built in:

- `octahedral_shell`: 24 copies of a four-helix-bundle subunit on a 50 Å sphere, point group
  O (a ferritin-like cage, about 130 Å across);
- `globular`: helices packed without clashes into a chiral, three-lobed envelope (C1, about
  110 Å across).

`density_map` renders atoms as Gaussians whose width is an electron form factor's falloff
(ATOM_B) plus a B-factor, on a grid oversampled so that no frequency aliases, then crops the
Fourier transform to the requested box: the map holds the molecule's detail out to Nyquist,
attenuated only by the B-factor.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from . import fourier

#: Gaussian falloff (Å^2) standing in for a light atom's electron form factor
#: f(q) ~ exp(-ATOM_B q^2 / 4), q = 1/d: half height near 2 Å.
ATOM_B = 11.0
#: Rise (Å) and twist (degrees) per residue of an ideal alpha helix.
HELIX_RISE, HELIX_TWIST = 1.5, 100.0
#: Cylindrical coordinates (radius Å, phase degrees, height Å) of the backbone atoms of a
#: residue relative to its CA's phase, in an ideal alpha helix.
_BACKBONE = {"N": (1.55, -28.0, -0.90), "CA": (2.30, 0.0, 0.0), "C": (1.60, 26.0, 0.95),
             "O": (1.80, 33.0, 2.10)}
#: Mean number of side-chain atoms beyond CB (proteins: about 2.8).
_SIDE_CHAIN_ATOMS = 2.8


@dataclass
class Atoms:
    """Atom positions (n, 3) as (x, y, z) in Å about the molecule's centre, and each atom's
    scattering weight (n,)."""

    xyz: np.ndarray
    weight: np.ndarray

    @property
    def n_atoms(self) -> int:
        return int(self.xyz.shape[0])

    def moved(self, rotation: np.ndarray, shift: np.ndarray | None = None) -> Atoms:
        """The atoms turned by `rotation` (3, 3) about the origin, then moved by `shift`."""
        xyz = self.xyz @ np.asarray(rotation, np.float64).T
        if shift is not None:
            xyz = xyz + np.asarray(shift, np.float64)
        return Atoms(xyz, self.weight.copy())

    @staticmethod
    def join(parts: list[Atoms]) -> Atoms:
        return Atoms(np.concatenate([p.xyz for p in parts]),
                     np.concatenate([p.weight for p in parts]))


def _frame(direction: np.ndarray) -> np.ndarray:
    """(3, 3) rows e1, e2, d: an orthonormal frame whose third axis is `direction`."""
    d = np.asarray(direction, np.float64)
    d = d / np.linalg.norm(d)
    e1 = np.cross(d, [0.0, 0.0, 1.0] if abs(d[2]) < 0.9 else [1.0, 0.0, 0.0])
    e1 /= np.linalg.norm(e1)
    return np.stack([e1, np.cross(d, e1), d])


def helix(n_residues: int, centre, direction, rng: np.random.Generator,
          phase: float = 0.0) -> Atoms:
    """An ideal alpha helix of n_residues along `direction`, centred at `centre` (Å): backbone,
    CB and a random side chain per residue pointing away from the axis."""
    k = np.arange(n_residues)
    z0 = (k - (n_residues - 1) / 2.0) * HELIX_RISE
    phi0 = np.deg2rad(HELIX_TWIST * k + phase)
    pts = []
    for r, dphi, dz in _BACKBONE.values():
        p = phi0 + np.deg2rad(dphi)
        pts.append(np.stack([r * np.cos(p), r * np.sin(p), z0 + dz], 1))
    # CB 1.5 Å out from CA, then a random walk of 1.5 Å steps leaning outwards
    cb_phi = phi0 - np.deg2rad(5.0)
    cb = np.stack([3.5 * np.cos(cb_phi), 3.5 * np.sin(cb_phi), z0 - 0.75], 1)
    pts.append(cb)
    n_side = rng.poisson(_SIDE_CHAIN_ATOMS, n_residues)
    outward = np.stack([np.cos(cb_phi), np.sin(cb_phi), np.zeros(n_residues)], 1)
    for i in np.flatnonzero(n_side):
        p, walk = cb[i], []
        for _ in range(min(int(n_side[i]), 6)):
            step = outward[i] + 0.8 * rng.normal(size=3)
            p = p + 1.5 * step / np.linalg.norm(step)
            walk.append(p)
        pts.append(np.array(walk))
    xyz = np.concatenate(pts) @ _frame(direction) + np.asarray(centre, np.float64)
    return Atoms(xyz, np.ones(xyz.shape[0]))


def four_helix_bundle(rng: np.random.Generator, n_residues: int = 26) -> Atoms:
    """A subunit: four antiparallel helices along x on a 10 Å square, and a short fifth helix
    across one end (about 120 residues)."""
    parts = []
    for j, (y, z) in enumerate(((-5.0, -5.0), (5.0, -5.0), (5.0, 5.0), (-5.0, 5.0))):
        d = (1.0, 0.0, 0.0) if j % 2 == 0 else (-1.0, 0.0, 0.0)
        parts.append(helix(n_residues, (0.0, y, z), d, rng, phase=40.0 * j))
    end = (n_residues - 1) / 2.0 * HELIX_RISE + 7.0
    parts.append(helix(12, (end, 0.0, 2.0), (0.0, 0.6, 0.8), rng))
    return Atoms.join(parts)


def _remove_clashes(unit: Atoms, copies: list[np.ndarray], min_distance: float) -> Atoms:
    """The unit without its atoms closer than min_distance to any atom of the other copies
    (rotation matrices; the first is the unit itself and is skipped)."""
    keep = np.ones(unit.n_atoms, bool)
    for rot in copies[1:]:
        other = unit.xyz @ rot.T
        for s in range(0, unit.n_atoms, 512):
            d2 = ((unit.xyz[s:s + 512, None, :] - other[None, :, :]) ** 2).sum(-1)
            keep[s:s + 512] &= d2.min(1) >= min_distance**2
    return Atoms(unit.xyz[keep], unit.weight[keep])


def octahedral_shell(seed: int = 0, radius: float = 52.0, helix_residues: int = 26) -> Atoms:
    """24 four-helix-bundle subunits (helices of `helix_residues`) related by the octahedral
    group O, their centres on a sphere of `radius` Å, lying flat on it (a ferritin-like cage,
    about 140 Å across at the defaults); atoms that would clash with another subunit are left
    out of every subunit alike, so the cage is exactly O-symmetric."""
    from .symmetry import operators

    rng = np.random.default_rng(seed)
    unit = four_helix_bundle(rng, helix_residues)
    # a general direction of the asymmetric unit; the bundle's axis tangent to the sphere
    centre = np.array([0.35, 0.35, 0.92])
    centre /= np.linalg.norm(centre)
    frame = _frame(centre)  # rows e1, e2 tangent; the bundle's x axis along e1 turned
    turn = np.deg2rad(135.0)
    e1 = np.cos(turn) * frame[0] + np.sin(turn) * frame[1]
    e2 = np.cross(centre, e1)
    placement = np.stack([e1, e2, centre], 1)  # bundle (x, y, z) -> (e1, e2, radial)
    unit = unit.moved(placement, radius * centre)
    ops = list(operators("O"))
    unit = _remove_clashes(unit, ops, 3.0)
    return Atoms.join([unit.moved(r) for r in ops])


def _runs(inside: np.ndarray, min_length: int, max_length: int, gap: int) -> list[range]:
    """Index ranges of the True runs of `inside`, each cut into pieces of at most max_length
    separated by `gap` (loops), pieces shorter than min_length dropped."""
    out, i, n = [], 0, inside.size
    while i < n:
        if not inside[i]:
            i += 1
            continue
        j = i
        while j < n and inside[j]:
            j += 1
        s = i
        while j - s >= min_length:
            e = min(j, s + max_length)
            if e - s >= min_length:
                out.append(range(s, e))
            s = e + gap
        i = j
    return out


def globular(seed: int = 0, size: float = 1.0) -> Atoms:
    """An asymmetric (C1) molecule of three unequal, offset lobes (chiral: no mirror
    symmetry), about 110 Å across at size 1 (about 1000 residues). Each lobe is a bundle of
    antiparallel helices along its own random axis on a hexagonal lattice of 10 Å (helices
    of 6-30 residues, loops between them left out)."""
    rng = np.random.default_rng(seed)
    lobes = [(np.array([-10.0, -6.0, -4.0]), np.array([36.0, 26.0, 30.0])),
             (np.array([26.0, 22.0, 14.0]), np.array([22.0, 19.0, 18.0])),
             (np.array([-18.0, 26.0, -26.0]), np.array([16.0, 14.0, 18.0]))]
    lobes = [(c * size, a * size) for c, a in lobes]
    parts = []
    for k, (c, a) in enumerate(lobes):
        q = np.linalg.qr(rng.normal(size=(3, 3)))[0]  # the bundle's frame
        e1, e2, d = q[:, 0], q[:, 1], q[:, 2]
        reach = int(np.ceil(a.max() / 8.0)) + 1
        t = np.arange(-a.max(), a.max() + HELIX_RISE, HELIX_RISE)
        for i in range(-reach, reach + 1):
            for j in range(-reach, reach + 1):
                p0 = c + (10.0 * i + 5.0 * j) * e1 + 8.66 * j * e2
                line = p0 + t[:, None] * d
                inside = (((line - c) / a) ** 2).sum(1) <= 1.0
                for c2, a2 in lobes[:k]:  # earlier lobes keep their space
                    inside &= (((line - c2) / a2) ** 2).sum(1) > 1.0
                sign = 1.0 if (i + j) % 2 == 0 else -1.0
                for run in _runs(inside, 6, 30, 3):
                    mid = line[run].mean(0)
                    parts.append(helix(len(run), mid, sign * d, rng,
                                       phase=float(rng.uniform(0, 360))))
    atoms = Atoms.join(parts)
    atoms.xyz -= (atoms.xyz * atoms.weight[:, None]).sum(0) / atoms.weight.sum()
    return atoms


def _splat(xyz_px: np.ndarray, weight: np.ndarray, n: int, sigma_px: float,
           chunk: int = 4096) -> np.ndarray:
    """Sum of normalised 3D Gaussians (std. dev. sigma_px) at voxel coordinates (x, y, z) on
    an (n, n, n) grid (z, y, x), each truncated at 4 sigma; separable per atom."""
    w = int(np.ceil(4.0 * sigma_px))
    offs = np.arange(-w, w + 1)
    norm = 1.0 / (np.sqrt(2.0 * np.pi) * sigma_px)
    out = np.zeros(n**3)
    for s in range(0, xyz_px.shape[0], chunk):
        p = xyz_px[s:s + chunk]
        base = np.floor(p).astype(np.int64)
        # (atoms, 2w+1) 1D profiles and indices along x, y, z
        g = [norm * np.exp(-0.5 * ((offs[None, :] - (p[:, a:a + 1] - base[:, a:a + 1]))
                                   / sigma_px) ** 2) for a in range(3)]
        idx = [base[:, a:a + 1] + offs[None, :] for a in range(3)]
        val = (weight[s:s + chunk, None, None, None] * g[2][:, :, None, None]
               * g[1][:, None, :, None] * g[0][:, None, None, :])
        flat = ((idx[2][:, :, None, None] * n + idx[1][:, None, :, None]) * n
                + idx[0][:, None, None, :])
        ok = ((idx[2][:, :, None, None] >= 0) & (idx[2][:, :, None, None] < n)
              & (idx[1][:, None, :, None] >= 0) & (idx[1][:, None, :, None] < n)
              & (idx[0][:, None, None, :] >= 0) & (idx[0][:, None, None, :] < n))
        out += np.bincount(flat[ok], val[ok], minlength=n**3)
    return out.reshape(n, n, n)


def density_map(atoms: Atoms, box: int, pixel_size: float, bfactor: float = 0.0) -> np.ndarray:
    """The molecule's density on a (box,)*3 grid (z, y, x), float32, centre at floor(box/2):
    each atom a Gaussian of B = ATOM_B + bfactor (Å^2; std. dev. sqrt(B / 8 pi^2) Å), drawn
    on a grid fine enough that the Gaussians are at least 1.2 fine pixels wide (no aliasing),
    then Fourier-cropped to the box (`fourier.to_centred`). Scaled to a maximum of 1."""
    if box < 8:
        raise ValueError(f"box: expected >= 8 px, got {box}")
    if not (pixel_size > 0 and bfactor >= 0):
        raise ValueError(f"expected pixel_size > 0 and bfactor >= 0, got {pixel_size}, "
                         f"{bfactor}")
    sigma = np.sqrt((ATOM_B + bfactor) / (8.0 * np.pi**2))
    over = max(1, int(np.ceil(1.2 * pixel_size / sigma)))
    n_fine = box * over
    fine_pix = pixel_size / over
    xyz_px = atoms.xyz / fine_pix + fourier.origin(n_fine)
    fine = _splat(xyz_px, atoms.weight, n_fine, sigma / fine_pix)
    if over > 1:
        centred = fourier.to_centred(fourier.fft3_centered(fine), box // 2)
        vol = fourier.ifft3_centered(fourier.from_centred(centred, box), box)
    else:
        vol = fine
    return (vol / vol.max()).astype(np.float32)


#: The built-in molecules by name (their point group, builder).
MOLECULES = {"octahedral": ("O", octahedral_shell), "globular": ("C1", globular)}


def molecule_map(name: str, box: int, pixel_size: float, bfactor: float = 0.0,
                 seed: int = 0) -> np.ndarray:
    """The density map of a built-in molecule (MOLECULES) at a B-factor (`density_map`)."""
    try:
        build = MOLECULES[name][1]
    except KeyError:
        raise ValueError(f"molecule: expected one of {sorted(MOLECULES)}, got {name!r}") \
            from None
    return density_map(build(seed), box, pixel_size, bfactor)
