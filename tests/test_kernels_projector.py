"""Projection kernels (core.project, core.backproject, core.phase_shift) against NumPy loops,
adjointness, and the central-slice theorem against real-space sum-projections."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from cryomap import euler, fourier, projector
from cryomap._kernels import core
from reference_kernels import (
    backproject_ref,
    phase_shift_ref,
    project_ref,
    regularised_average_ref,
)

INTERP = {"nearest": 0, "linear": 1}


def _volume(rng: np.random.Generator, m: int, ndim: int) -> np.ndarray:
    """Random centred half-volume (2m+1, 2m+1, m+1) or half-plane (1, 2m+1, m+1)."""
    shape = (2 * m + 1 if ndim == 3 else 1, 2 * m + 1, m + 1)
    return (rng.normal(size=shape) + 1j * rng.normal(size=shape)).astype(np.complex64)


def _rotations(rng: np.random.Generator, n: int, ndim: int) -> np.ndarray:
    if ndim == 2:  # 2D references: in-plane rotations only (RELION's Euler(0, 0, psi))
        return euler.euler_to_matrix(0.0, 0.0, rng.uniform(0, 360, n))
    m = Rotation.random(n, random_state=int(rng.integers(2**31))).as_matrix()
    return np.ascontiguousarray(m.transpose(0, 2, 1))


def _case(seed: int, box: int, ndim: int, n_rot: int, r_max: int, scale: float,
          inside: bool = False):
    """Pixels of a box (radius r_max), rotations, and a volume whose radius m makes some
    samples fall off the grid (r_max * scale > m), or, with inside=True, a volume large enough
    for every trilinear footprint (the kernels' bounds-check-free fast path)."""
    rng = np.random.default_rng(seed)
    coords = fourier.pixel_mask(box, r_max).coords
    m = int(np.ceil(r_max * scale)) + 2 if inside else int(r_max * scale) - 1
    return rng, coords, _rotations(rng, n_rot, ndim), _volume(rng, m, ndim)


def _close(actual: np.ndarray, desired: np.ndarray, rtol: float = 1e-5) -> None:
    """Equal within rtol of the largest desired value. The default, for the float32 kernels
    against the float64 loops: measured up to 1.2e-6 (8.5x margin; each call names its own)."""
    np.testing.assert_allclose(actual, desired, rtol=0, atol=rtol * float(np.abs(desired).max()))


CASES = [  # (box, ndim, R, r_max, scale[, every sample inside the grid])
    (15, 3, 5, 6, 2.0),
    (16, 3, 4, 7, 2.0),
    (16, 3, 1, 5, 1.0),
    (15, 2, 6, 7, 2.0),
    (16, 2, 1, 8, 1.0),
    (15, 3, 4, 6, 2.0, True),
    (16, 3, 3, 7, 1.0, True),
]


@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("interp", ["nearest", "linear"])
def test_project_matches_reference(case: int, interp: str) -> None:
    box, ndim, n_rot, r_max, scale, *inside = CASES[case]
    _, coords, rot, vol = _case(100 + case, box, ndim, n_rot, r_max, scale, *inside)
    out = core.project(vol, rot, coords, scale, INTERP[interp])
    assert out.dtype == np.complex64 and out.shape == (n_rot, coords.shape[0])
    _close(out, project_ref(vol, rot, coords, scale, interp))  # measured 8.2e-7; 12x margin


@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("interp", ["nearest", "linear"])
def test_backproject_matches_reference(case: int, interp: str) -> None:
    box, ndim, n_rot, r_max, scale, *inside = CASES[case]
    rng, coords, rot, vol = _case(200 + case, box, ndim, n_rot, r_max, scale, *inside)
    shape = (n_rot, coords.shape[0])
    s = (rng.normal(size=shape) + 1j * rng.normal(size=shape)).astype(np.complex64)
    sw = rng.uniform(size=shape).astype(np.float32)
    data0 = _volume(rng, vol.shape[2] - 1, ndim)
    weight0 = rng.uniform(size=vol.shape).astype(np.float32)
    data, weight = data0.copy(), weight0.copy()
    core.backproject(data, weight, s, sw, rot, coords, scale, INTERP[interp])
    rdata, rweight = data0.astype(np.complex128), weight0.astype(np.float64)
    backproject_ref(rdata, rweight, s, sw, rot, coords, scale, interp)
    _close(data, rdata)  # measured 9.5e-7; 10x margin
    _close(weight, rweight)  # measured 5.0e-7; 20x margin


@pytest.mark.parametrize("copies", [1, 2, 3])
@pytest.mark.parametrize("case", [0, 3, 5])
def test_backproject_into_copies_sums_to_the_reference(case: int, copies: int) -> None:
    """A stack of C accumulators (one per thread): the copies sum to the NumPy reference and
    each copy holds a disjoint share of the slices (threads never share one)."""
    box, ndim, n_rot, r_max, scale, *inside = CASES[case]
    rng, coords, rot, vol = _case(250 + case, box, ndim, 4 * n_rot, r_max, scale, *inside)
    shape = (rot.shape[0], coords.shape[0])
    s = (rng.normal(size=shape) + 1j * rng.normal(size=shape)).astype(np.complex64)
    sw = rng.uniform(size=shape).astype(np.float32)
    data = np.zeros((copies,) + vol.shape, np.complex64)
    weight = np.zeros((copies,) + vol.shape, np.float32)
    core.backproject(data, weight, s, sw, rot, coords, scale, INTERP["linear"])
    rdata, rweight = np.zeros(vol.shape, np.complex128), np.zeros(vol.shape)
    backproject_ref(rdata, rweight, s, sw, rot, coords, scale, "linear")
    _close(data.sum(0), rdata)  # measured 1.2e-6; 8.5x margin
    _close(weight.sum(0), rweight)  # measured 6.5e-7; 15x margin
    # every copy that holds anything holds a whole slice's sum: a copy equals the reference
    # back-projection of a subset of the slices (here: each is one of the contiguous blocks)
    filled = [c for c in range(copies) if np.any(weight[c])]
    assert filled and (core.max_threads() == 1 or len(filled) == min(copies,
                                                                     core.max_threads()))


def test_backproject_stack_checks() -> None:
    rng, coords, rot, vol = _case(260, 15, 3, 3, 6, 2.0, True)
    s = np.ones((3, coords.shape[0]), np.complex64)
    sw = np.ones((3, coords.shape[0]), np.float32)
    with pytest.raises(ValueError, match="weight"):
        core.backproject(np.zeros((2,) + vol.shape, np.complex64),
                         np.zeros((3,) + vol.shape, np.float32), s, sw, rot, coords, 2.0, 1)
    with pytest.raises(ValueError, match="dimensions"):
        core.backproject(np.zeros((1, 1) + vol.shape, np.complex64),
                         np.zeros((1, 1) + vol.shape, np.float32), s, sw, rot, coords, 2.0, 1)


@pytest.mark.parametrize("case", range(len(CASES)))
@pytest.mark.parametrize("interp", ["nearest", "linear"])
def test_backproject_is_adjoint_of_project(case: int, interp: str) -> None:
    box, ndim, n_rot, r_max, scale, *inside = CASES[case]
    rng, coords, rot, vol = _case(300 + case, box, ndim, n_rot + 5, r_max, scale, *inside)
    shape = (rot.shape[0], coords.shape[0])
    s = (rng.normal(size=shape) + 1j * rng.normal(size=shape)).astype(np.complex64)
    sw = rng.uniform(size=shape).astype(np.float32)
    data = np.zeros(vol.shape, np.complex64)
    weight = np.zeros(vol.shape, np.float32)
    core.backproject(data, weight, s, sw, rot, coords, scale, INTERP[interp])
    # <P v, s> = <v, P^T s> with the real inner product Re sum conj(a) b
    pv = core.project(vol, rot, coords, scale, INTERP[interp]).astype(np.complex128)
    lhs = np.real(np.vdot(pv, s.astype(np.complex128)))
    rhs = np.real(np.vdot(vol.astype(np.complex128), data.astype(np.complex128)))
    # measured 1.6e-7 of the scale (float32 sums); 12x margin
    assert abs(lhs - rhs) <= 2e-6 * (abs(lhs) + abs(rhs) + np.abs(pv).sum() * 1e-3)
    # weights: sum_{r,j} (P u)_{rj} sw_{rj} = sum_v u_v W_v for a real volume u
    u = rng.uniform(size=vol.shape)
    pu = core.project(u.astype(np.complex64), rot, coords, scale, INTERP[interp]).real
    lhs_w, rhs_w = float(np.sum(pu * sw)), float(np.sum(u * weight))
    assert abs(lhs_w - rhs_w) <= 2e-6 * abs(lhs_w)  # measured 1.2e-7 relative; 17x margin


def test_phase_shift_matches_reference() -> None:
    rng = np.random.default_rng(5)
    for box in (15, 16):
        coords = fourier.pixel_mask(box, box // 2).coords
        n_img = 4
        x = (rng.normal(size=(n_img, coords.shape[0])) + 1j * rng.normal(
            size=(n_img, coords.shape[0]))).astype(np.complex64)
        shifts = rng.uniform(-4, 4, (n_img, 2))
        # measured 7.7e-8 (float32 sin/cos); 26x margin
        _close(core.phase_shift(x, coords, shifts, box), phase_shift_ref(x, coords, shifts, box),
               rtol=2e-6)


def _blobs(n: int, rng: np.random.Generator) -> np.ndarray:
    """A smooth real map: a few Gaussian blobs near the centre, zero at the border."""
    c = np.arange(n) - n // 2
    z, y, x = np.meshgrid(c, c, c, indexing="ij")
    v = np.zeros((n, n, n))
    for _ in range(4):
        p = rng.uniform(-n / 6, n / 6, 3)
        v += rng.uniform(0.5, 1.5) * np.exp(-((x - p[0])**2 + (y - p[1])**2 + (z - p[2])**2)
                                            / (2 * 1.3**2))
    return v


def _sum_projection(v: np.ndarray, which: str) -> np.ndarray:
    """Real-space projection P[y, x] of a map v[z, y, x] (docs/conventions.md "Grids",
    "Projection").

    identity: A = I, P(x, y) = sum_z V(x, y, z)  ->  v.sum(axis=0).
    tilt90: A = Euler(0, 90, 0) = [[0,0,-1],[0,1,0],[1,0,0]], A^T (x, y, z) = (z, y, -x), so
    P(x, y) = sum_X V(X, y, -x): with Q[z, y] = v.sum(axis=2) and c = N//2,
    P[yi, xi] = Q[2c - xi, yi] (indices mod N; the map is zero at the border).
    """
    n = v.shape[0]
    if which == "identity":
        return v.sum(axis=0)
    q = v.sum(axis=2)
    idx = (2 * (n // 2) - np.arange(n)) % n
    return q[idx, :].T


ANGLES = {"identity": (0.0, 0.0, 0.0), "tilt90": (0.0, 90.0, 0.0)}


@pytest.mark.parametrize("box", [16, 15])
@pytest.mark.parametrize("which", ["identity", "tilt90"])
def test_central_slice_equals_ft_of_sum_projection(box: int, which: str) -> None:
    """Both rotations put every sample on a grid point, where interpolation is exact; the map
    is pre-multiplied by the gridding correction that prepare_reference divides out, so the
    slice must equal the 2D FT of the sum-projection to float32 precision (measured 1.4e-7 of
    the largest coefficient; bound 2e-6, a 14x margin)."""
    rng = np.random.default_rng(box)
    v = _blobs(box, rng)
    mask = fourier.pixel_mask(box, box // 2 - 1)
    rot = euler.euler_to_matrix(*ANGLES[which])[None]
    expected = mask.gather(fourier.fft2_centered(_sum_projection(v, which)))
    for interp in ("nearest", "linear"):
        corrected = v * projector.gridding_correction(box, 2, interp, 3)
        ref = projector.prepare_reference(corrected, pad=2, interp=interp)
        _close(projector.project(ref, rot, mask.coords)[0], expected, rtol=2e-6)
    # Without the pre-multiplication the slice differs only by the gridding correction (the
    # price of accuracy at off-grid samples; sinc^2(pi r / 2N) >= 0.86 over these blobs):
    # within 6% of the largest coefficient (measured 4.2-4.6%; margin 30%).
    ref = projector.prepare_reference(v, pad=2, interp="linear")
    _close(projector.project(ref, rot, mask.coords)[0], expected, rtol=0.06)


def test_thread_count_independence() -> None:
    rng, coords, rot, vol = _case(7, 16, 3, 60, 7, 2.0)
    shape = (rot.shape[0], coords.shape[0])
    s = (rng.normal(size=shape) + 1j * rng.normal(size=shape)).astype(np.complex64)
    sw = rng.uniform(size=shape).astype(np.float32)
    before = core.max_threads()
    out = {}
    try:
        for n in (1, 2):
            core.set_threads(n)
            data, weight = np.zeros(vol.shape, np.complex64), np.zeros(vol.shape, np.float32)
            core.backproject(data, weight, s, sw, rot, coords, 2.0, 1)
            out[n] = (core.project(vol, rot, coords, 2.0, 1), data, weight,
                      core.phase_shift(s[:5], coords, rng.uniform(-2, 2, (5, 2)) * 0, 16))
    finally:
        core.set_threads(before)
    np.testing.assert_array_equal(out[1][0], out[2][0])
    np.testing.assert_array_equal(out[1][3], out[2][3])
    # back-projection sums per-thread volumes: equal up to float32 rounding of the sum order
    # (measured 0)
    _close(out[1][1], out[2][1], rtol=1e-6)
    _close(out[1][2], out[2][2], rtol=1e-6)


def _project_args(rng: np.random.Generator) -> list:
    _, coords, rot, vol = _case(int(rng.integers(1000)), 16, 3, 3, 5, 2.0)
    return [vol, rot, coords, 2.0, 1]


@pytest.mark.parametrize(
    "index, bad, match",
    [
        (0, lambda a: a.astype(np.complex128), "volume_ft: expected dtype"),
        (0, lambda a: a[:-1], "volume_ft"),
        (1, lambda a: a[:, :2].copy(), "rotations: expected size"),
        (2, lambda a: a.astype(np.float64), "coords: expected dtype"),
        (2, lambda a: np.asfortranarray(a), "coords: expected a C-contiguous"),
        (3, lambda a: 0.0, "scale"),
        (4, lambda a: 2, "interp"),
    ],
)
def test_project_invalid_input_raises(index: int, bad, match: str) -> None:
    args = _project_args(np.random.default_rng(11))
    args[index] = bad(args[index])
    with pytest.raises(ValueError, match=match):
        core.project(*args)


def test_nan_and_shape_errors_raise() -> None:
    vol, rot, coords, scale, interp = _project_args(np.random.default_rng(13))
    bad = rot.copy()
    bad[0, 0, 0] = np.nan
    with pytest.raises(ValueError, match="rotations: contains NaN"):
        core.project(vol, bad, coords, scale, interp)
    s = np.zeros((rot.shape[0], coords.shape[0]), np.complex64)
    sw = np.zeros(s.shape, np.float32)
    data, weight = np.zeros(vol.shape, np.complex64), np.zeros(vol.shape, np.float32)
    s_nan = s.copy()
    s_nan[0, 0] = np.nan
    with pytest.raises(ValueError, match="slices: contains NaN"):
        core.backproject(data, weight, s_nan, sw, rot, coords, scale, interp)
    with pytest.raises(ValueError, match="slice_weights: expected size"):
        core.backproject(data, weight, s, sw[:, :-1].copy(), rot, coords, scale, interp)
    with pytest.raises(ValueError, match="weight: expected size"):
        core.backproject(data, weight[:, :, :-1].copy(), s, sw, rot, coords, scale, interp)
    with pytest.raises(ValueError, match="shifts: contains NaN"):
        core.phase_shift(s[:1], coords, np.array([[np.nan, 0.0]]), 16)
    with pytest.raises(ValueError, match="images: expected dtype"):
        core.phase_shift(s[:1].astype(np.complex128), coords, np.zeros((1, 2)), 16)


@pytest.mark.parametrize("interp", ["nearest", "linear"])
def test_magnified_matrices_match_reference(interp: str) -> None:
    # Anisotropic magnification (ctf.magnified_rotations) gives matrices that stretch image
    # frequencies: with a volume only just large enough for rotations, stretched samples fall
    # off the grid and must be bounds-checked (the fast path once wrote beyond the grid).
    from cryomap.ctf import magnified_rotations

    box, r_max, scale = 16, 7, 2.0
    rng, coords, rot, vol = _case(400, box, 3, 6, r_max, scale, True)
    mag = magnified_rotations(rot, np.array([[1.12, 0.03], [0.02, 0.95]]))
    # here and below: measured 8.4e-8, 9.6e-8 and 7.4e-8 (float32); margins 21-27x
    _close(core.project(vol, mag, coords, scale, INTERP[interp]),
           project_ref(vol, mag, coords, scale, interp), rtol=2e-6)
    shape = (mag.shape[0], coords.shape[0])
    s = (rng.normal(size=shape) + 1j * rng.normal(size=shape)).astype(np.complex64)
    sw = rng.uniform(size=shape).astype(np.float32)
    data, weight = np.zeros(vol.shape, np.complex64), np.zeros(vol.shape, np.float32)
    core.backproject(data, weight, s, sw, mag, coords, scale, INTERP[interp])
    rdata, rweight = np.zeros(vol.shape, np.complex128), np.zeros(vol.shape)
    backproject_ref(rdata, rweight, s, sw, mag, coords, scale, interp)
    _close(data, rdata, rtol=2e-6)
    _close(weight, rweight, rtol=2e-6)


@pytest.mark.parametrize("box, pad", [(16, 2), (17, 2), (16, 1)])
def test_reference_is_zero_beyond_the_nyquist_sphere_as_relion(box, pad):
    """RELION's projector keeps padded-grid voxels with r^2 <= round(pad * (N // 2))^2 only
    (computeFourierTransformMap); the corners of the padded cube are zero."""
    rng = np.random.default_rng(box + pad)
    ref = projector.prepare_reference(rng.normal(size=(box,) * 3), pad=pad)
    m = ref.data.shape[-1] - 1
    k = np.arange(-m, m + 1)
    r2 = k[:, None, None] ** 2 + k[None, :, None] ** 2 + np.arange(m + 1)[None, None, :] ** 2
    limit = round(pad * (box // 2)) ** 2
    assert np.all(ref.data[r2 > limit] == 0)
    inside = ref.data[(r2 <= limit) & (r2 > 0)]
    # nothing inside is lost: measured at least 0.9957 (1147 of 1152)
    assert np.count_nonzero(inside) > 0.99 * inside.size


@pytest.mark.parametrize("ndim, box, pad, r_max, minres", [(3, 16, 2, 8, 5), (3, 15, 2, 6.5, 2),
                                                          (3, 12, 1, 6, 0), (2, 16, 2, 8, 5)])
def test_regularised_average_matches_reference(ndim, box, pad, r_max, minres) -> None:
    """core.regularised_average (RELION's reconstruct) against the NumPy loop: per-shell tau2
    (zeros, infinities and finite values: no prior, none at all, a prior) with the 1/1000
    floor, and per-voxel tau2 without it."""
    rng = np.random.default_rng(box + minres)
    data0, _ = projector.empty_sums(box, pad, r_max, ndim)
    shape = data0.shape
    data = (rng.normal(size=shape) + 1j * rng.normal(size=shape)).astype(np.complex64)
    weight = rng.uniform(0, 2, shape).astype(np.float32)
    weight[rng.uniform(size=shape) < 0.2] = 0.0  # voxels no slice reached
    weight[rng.uniform(size=shape) < 0.05] = 1e-6  # tiny weights: the floor's case
    n = box // 2 + 1
    tau2 = rng.uniform(0.1, 3.0, n)
    tau2[n // 2] = 0.0
    tau2[-1] = np.inf
    for t2, fudge in ((tau2, 1.0), (tau2, 4.0), (np.full(n, np.inf), 1.0),
                      (rng.uniform(0.0, 2.0, shape), 2.0)):
        got = core.regularised_average(data, weight, np.ascontiguousarray(t2, np.float64),
                                       float(pad), ndim, fudge, float(r_max), minres)
        expect = regularised_average_ref(data, weight, np.asarray(t2, np.float64), pad, ndim,
                                         fudge, r_max, minres)
        _close(got, expect, 1e-6)  # measured 0; the bound allows float32 rounding
    with pytest.raises(ValueError, match="tau2"):
        core.regularised_average(data, weight, np.ones((2, 2, 2)), float(pad), ndim, 1.0,
                                 float(r_max), minres)


@pytest.mark.parametrize("r_max", [3.0, 7.5, 16.0])
def test_cropped_sums_reconstruct_the_same_voxels(r_max: float) -> None:
    """BackProjector.cropped: the sums up to r_max on a smaller grid reconstruct exactly the
    voxels of the full grid's reconstruction to r_max (the rest of which is zero)."""
    rng = np.random.default_rng(4)
    bp = projector.BackProjector(32)
    bp.weight = rng.uniform(0.5, 2.0, bp.weight.shape).astype(np.float32)
    bp.data = (rng.standard_normal(bp.data.shape)
               + 1j * rng.standard_normal(bp.data.shape)).astype(np.complex64)
    tau2 = rng.uniform(0.1, 1.0, 17)
    full = bp.reconstruct_ft(tau2, 2.0, r_max, 2)
    small = bp.cropped(r_max)
    part = small.reconstruct_ft(tau2, 2.0, r_max, 2)
    f, m = full.shape[-1] - 1, part.shape[-1] - 1
    c = slice(f - m, f + m + 1)
    assert np.array_equal(full[c, c, : m + 1], part)
    outside = np.ones(full.shape, bool)
    outside[c, c, : m + 1] = False
    assert not np.any(full[outside])
    assert bp.data.shape == projector.BackProjector(32).data.shape  # left as it was
