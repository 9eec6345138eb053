"""The built-in phantom: deterministic, positive, inside the box, chiral, box-independent."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from scipy.ndimage import map_coordinates
from scipy.spatial.transform import Rotation

from cryomap.phantom import (
    DOMAINS,
    VARIANTS,
    atom_model,
    make_phantom,
    make_phantom_variant,
)


def _grid(n: int) -> np.ndarray:
    """(3, n^3) voxel coordinates (x, y, z) relative to the origin floor(n/2)."""
    c = np.arange(n) - n // 2
    z, y, x = np.meshgrid(c, c, c, indexing="ij")
    return np.stack([x.ravel(), y.ravel(), z.ravel()]).astype(np.float64)


def _moments(v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Centre of mass (x, y, z) px from the origin and the second-moment matrix (px^2)."""
    p = _grid(v.shape[0])
    w = v.ravel().astype(np.float64)
    com = p @ w / w.sum()
    q = p - com[:, None]
    return com, (q * w) @ q.T / w.sum()


def _resample(v: np.ndarray, rot: np.ndarray, src_centre: np.ndarray,
              dst_centre: np.ndarray) -> np.ndarray:
    """out(r) = v(rot^T (r - dst_centre) + src_centre), trilinear, coordinates (x, y, z) px."""
    n = v.shape[0]
    q = rot.T @ (_grid(n) - dst_centre[:, None]) + src_centre[:, None]
    return map_coordinates(v, q[::-1] + n // 2, order=1).reshape(v.shape)


def _corr(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.corrcoef(a.ravel(), b.ravel())[0, 1])


def _best_proper_alignment(a: np.ndarray, b: np.ndarray) -> float:
    """Best correlation of b rotated (proper rotations only) onto a, candidate rotations from
    matching principal axes (4 sign choices with det +1)."""
    ca, ma = _moments(a)
    cb, mb = _moments(b)
    ea, eb = np.linalg.eigh(ma)[1], np.linalg.eigh(mb)[1]
    best = -1.0
    for s in itertools.product((1, -1), repeat=3):
        rot = ea @ np.diag(s) @ eb.T
        if np.linalg.det(rot) > 0:
            best = max(best, _corr(a, _resample(b, rot, cb, ca)))
    return best


def _mirror(v: np.ndarray, axis: int) -> np.ndarray:
    """Mirror image through the plane of the origin floor(N/2) normal to an array axis."""
    return np.roll(np.flip(v, axis), 1 - v.shape[axis] % 2, axis=axis)


def test_deterministic_positive_and_scaled():
    a = make_phantom(32, 6.0, seed=0)
    b = make_phantom(32, 6.0, seed=0)
    c = make_phantom(32, 6.0, seed=1)
    assert a.dtype == np.float32 and a.shape == (32, 32, 32)
    assert np.array_equal(a, b)
    # another seed places the atoms differently: measured 0.9887; margin 0.0013
    assert _corr(a, c) < 0.99
    assert a.min() >= 0.0 and a.max() == pytest.approx(1.0)  # measured 0
    # a solid molecule, not a few specks: a few % of the box above 20% of the maximum
    # (measured 2.0%; margins 25%)
    assert 0.015 < np.mean(a > 0.2) < 0.025


# Coarse pixels widen the atoms (>= 1.5 px), so a little more density spills outward.
# Measured 4.9e-5, 1.01e-3 and 3.2e-3 outside; margins 19-24%.
@pytest.mark.parametrize("box,pix,tol", [(64, 3.0, 6e-5), (41, 4.7, 1.2e-3), (32, 6.0, 4e-3)])
def test_fits_in_box_and_centred(box, pix, tol):
    v = make_phantom(box, pix).astype(np.float64)
    r = np.linalg.norm(_grid(box), axis=0).reshape(v.shape)
    outside = v[r > 0.35 * box].sum() / v.sum()
    assert outside < tol, f"{outside:.2e} of the density outside 0.7 of the box diameter"
    com, _ = _moments(v)
    # centre of mass at the origin floor(N/2): measured 4.1e-9 px (float32 maps); 24x margin
    assert np.all(np.abs(com) < 1e-7), com


def test_same_molecule_in_angstrom_for_any_box():
    # Same atom width (4.5 A) on both grids: the same function sampled twice.
    a = make_phantom(64, 3.0).astype(np.float64)
    b = make_phantom(96, 2.0).astype(np.float64)
    _, ma = _moments(a)
    _, mb = _moments(b)
    # second moments in A^2: measured 3.6e-8 relative (float32 maps); 27x margin
    assert np.allclose(ma * 9.0, mb * 4.0, rtol=1e-6)
    # integrated density: measured 1.32e-4 relative (each map is scaled to its sampled
    # maximum); margin 29%
    assert a.sum() * 27.0 == pytest.approx(b.sum() * 8.0, rel=1.7e-4)


def test_mirror_image_differs():
    v = make_phantom(40, 4.8).astype(np.float64)
    for axis in range(3):
        assert _corr(v, _mirror(v, axis)) < 0.8  # measured 0.56-0.745; margin 0.055
    # Control: the alignment finds a rotated copy of the map ...
    rot = Rotation.from_euler("zyz", [30, 70, -110], degrees=True).as_matrix()
    rotated = _resample(v, rot, np.zeros(3), np.zeros(3))
    assert _best_proper_alignment(v, rotated) > 0.998  # measured 0.99896; margin 0.001
    # ... but no proper rotation brings the mirror image onto it (measured 0.909; margin 0.04).
    assert _best_proper_alignment(v, _mirror(v, 2)) < 0.95


def test_variants_distinct_but_related():
    base = make_phantom(32, 6.0)
    assert np.array_equal(make_phantom_variant(0, 32, 6.0), base)
    maps = [make_phantom_variant(k, 32, 6.0) for k in range(len(VARIANTS))]
    for k in range(1, len(VARIANTS)):
        c = _corr(base, maps[k])
        assert 0.8 < c < 0.995, (k, c)  # measured 0.912-0.988; margins 0.11 and 0.007
        assert maps[k].min() >= 0
    # dropping a domain removes exactly that domain's atoms (same frame and scale)
    _, dom = atom_model(0)
    xyz_drop, dom_drop = atom_model(0, drop_domain=DOMAINS.index("knob"))
    assert len(xyz_drop) == np.sum(dom != DOMAINS.index("knob"))
    knob = make_phantom(32, 6.0, drop_domain=[0, 1, 2])
    assert np.allclose(maps[1] + knob, base, rtol=0, atol=1e-6)  # measured 6e-8 (float32); 17x
    with pytest.raises(ValueError, match="domain"):
        make_phantom(32, 6.0, drop_domain=7)
