"""The one FSC and resolution rule (cryomap.resolution) that refinement, reconstruction,
postprocess and the validation against a truth all use."""

import numpy as np
import pytest

from cryomap import fourier, resolution


def test_fsc_identical_independent_and_opposite():
    rng = np.random.default_rng(1)
    n = 24
    a = fourier.fft3_centered(rng.standard_normal((n, n, n)))
    b = fourier.fft3_centered(rng.standard_normal((n, n, n)))
    same = resolution.fsc(a, 3.0 * a)
    np.testing.assert_allclose(same, 1.0, atol=1e-13)  # float rounding: measured 1.8e-15
    indep = resolution.fsc(a, b)
    assert indep[0] == 1.0  # the DC term: 1 when it comes out <= 0 (one sign of the mean)
    # independent noise: |FSC| ~ 1/sqrt(#voxels in shell); shells >= 4 hold > 100 voxels
    # (measured at most 0.064; 15 % margin)
    assert np.all(np.abs(indep[4:]) < 0.074)
    anti = resolution.fsc(a, -a)
    np.testing.assert_allclose(anti[1:], -1.0, atol=1e-14)  # measured 2.2e-16
    assert anti[0] == 1.0


def test_fsc_maps_against_a_direct_sum():
    """fsc_maps equals the definition summed shell by shell over the rfft half grid (voxels
    beyond N/2 left out), for maps and for images."""
    rng = np.random.default_rng(2)
    for shape in ((16, 16, 16), (20, 20)):
        x, y = rng.standard_normal(shape), rng.standard_normal(shape)
        y = 0.7 * x + y
        n = shape[0]
        fx = np.fft.rfftn(np.fft.ifftshift(x))
        fy = np.fft.rfftn(np.fft.ifftshift(y))
        grids = np.meshgrid(*[np.fft.fftfreq(n) * n] * (len(shape) - 1),
                            np.arange(n // 2 + 1), indexing="ij")
        shell = np.rint(np.sqrt(sum(g.astype(float) ** 2 for g in grids))).astype(int)
        expect = np.zeros(n // 2 + 1)
        for s in range(n // 2 + 1):
            k = shell == s
            expect[s] = (np.real(fx[k] * np.conj(fy[k])).sum()
                         / np.sqrt((np.abs(fx[k]) ** 2).sum() * (np.abs(fy[k]) ** 2).sum()))
        expect[0] = expect[0] if expect[0] > 0 else 1.0
        # float rounding: measured 5.6e-16 (3D), 2.2e-16 (2D)
        np.testing.assert_allclose(resolution.fsc_maps(x, y), expect, atol=1e-14)


def test_resolution_shell_rule():
    curve = np.array([1.0, 0.99, 0.9, 0.6, 0.3, 0.1, 0.2, 0.05])
    # last shell before the first drop below the threshold
    assert resolution.resolution_shell(curve, 0.143) == 4
    assert resolution.resolution_shell(curve, 0.5) == 3
    assert resolution.resolution_shell(np.ones(6), 0.143) == 5
    assert resolution.resolution_shell(np.array([1.0, 0.0, 0.0]), 0.143) == 0
    assert resolution.first_shell_below(curve, 0.143) == 5
    assert resolution.first_shell_below(np.ones(4), 0.5) == -1


def test_crossing_and_angstrom():
    curve = np.array([1.0, 0.99, 0.9, 0.6, 0.3, 0.1, 0.2, 0.05])
    # 0.143 between shells 4 (0.3) and 5 (0.1): 4 + (0.3 - 0.143) / 0.2
    assert resolution.crossing(curve, 0.143) == pytest.approx(4.785)
    assert resolution.resolution_angstrom(curve, 64, 2.0) == pytest.approx(128 / 4)
    assert resolution.resolution_angstrom(curve, 64, 2.0, interpolate=True) == pytest.approx(
        128 / 4.785)
    # nothing correlates: the box, not a division by zero
    assert resolution.resolution_angstrom(np.array([1.0, 0.0, 0.0]), 64, 2.0) == 128.0
    assert resolution.resolution_angstrom(np.array([1.0, 0.0, 0.0]), 64, 2.0,
                                          interpolate=True) == 128.0
