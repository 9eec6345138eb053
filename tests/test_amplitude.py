"""Per-particle amplitude correction (docs/method.md eq. (30)): the engine's estimate against
a NumPy least-squares fit, and a refinement on particles of spread contrast."""

from __future__ import annotations

import numpy as np
import pytest

import cryomap
from cryomap import fourier, projector
from cryomap.ctf import CtfParams
from cryomap.em.data import ImageSource
from cryomap.em.engine import Search, run_pass
from cryomap.em.noise import NoiseModel
from cryomap.euler import euler_to_matrix
from cryomap.imperfections import Imperfections
from cryomap.particles import particles_from_images
from cryomap.phantom import make_phantom
from cryomap.resolution import fsc_maps, resolution_angstrom
from cryomap.sampling import PoseSampling
from cryomap.simulate import simulate_particles

BOX, PIX = 32, 6.0


@pytest.fixture(scope="module")
def spread_set():
    """400 phantom particles (SNR 0.3) whose amplitudes spread by 30 % (log-normal)."""
    truth = make_phantom(BOX, PIX)
    images, optics, table, true = simulate_particles(
        truth, PIX, 400, snr=0.3, seed=7, max_shift_px=1.0,
        imperfections=Imperfections(amplitude_spread=0.3))
    return truth, images, optics, table, true


def test_engine_amplitude_is_the_least_squares_fit() -> None:
    """At fixed (true) poses the pass's a_i is the a_i it was given times
    sum Re(conj(CTF A) X)/s2 / sum |CTF A|^2/s2 over the E-step's pixels, with the CTF it used
    (a_i included): the NumPy least-squares fit with the STAR's CTF."""
    truth = make_phantom(BOX, PIX)
    n = 40
    images, optics, table, true = simulate_particles(
        truth, PIX, n, snr=0.3, seed=3, max_shift_px=0.0,
        imperfections=Imperfections(amplitude_spread=0.3))
    ps = particles_from_images(images, PIX, table.drop(columns=["rlnImageName"]), optics)
    source = ImageSource(ps, BOX / 2 - 2, 3.0)
    radius = 10
    angles = true[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy()
    rot = euler_to_matrix(angles[:, 0], angles[:, 1], angles[:, 2])
    ref = projector.prepare_reference(truth, 2, "linear", radius)
    noise = NoiseModel.from_images(source)
    search = Search(PoseSampling.create(3, 1, 30.0, 1.0, 0.0), 0, radius, 150.0,
                    fixed_poses=True)
    given = np.linspace(0.5, 1.5, n)
    res = run_pass(source, np.arange(n), [ref], search, noise, rot, np.zeros((n, 2)),
                   amplitudes=given)
    mask = fourier.pixel_mask(BOX, radius)
    batch = source.batch(np.arange(n), mask, np.zeros((n, 2)))
    pred = projector.project(ref, rot, mask.coords) * batch.ctf
    w = noise.inv_sigma2(batch.group, mask)
    want = np.sum(w * (np.conj(pred) * batch.images).real, 1) / np.sum(w * np.abs(pred) ** 2, 1)
    # float32 sums: measured 2.1e-7; ~50x for another summation order
    np.testing.assert_allclose(res.estimates.amplitude, want, rtol=1e-5)
    a_true = true["rlnCtfScalefactor"].to_numpy()
    assert np.corrcoef(want, a_true)[0, 1] > 0.93  # measured 0.96


def test_refine_recovers_the_amplitudes(spread_set) -> None:
    truth, images, optics, table, true = spread_set
    ps = particles_from_images(images, PIX, table.drop(columns=["rlnImageName"]), optics)
    reference = cryomap.Volume(fourier.lowpass_map(truth, 30.0, PIX), PIX)
    common = dict(iterations=4, healpix_order=2, particle_diameter=150.0, ini_high=30.0,
                  offset_range=2, offset_step=1, echo=None)
    on = cryomap.refine(ps, reference, **common)
    off = cryomap.refine(ps, reference, scale=False, **common)
    a_true = true["rlnCtfScalefactor"].to_numpy()
    a = on.particles["rlnCtfScalefactor"].to_numpy()
    assert "rlnCtfScalefactor" not in off.particles or \
        np.all(off.particles["rlnCtfScalefactor"] == 1.0)
    r = np.corrcoef(a, a_true)[0, 1]
    assert r > 0.93, r  # measured 0.965
    assert a.mean() == pytest.approx(1.0, abs=1e-12)  # normalised: measured 0.0

    def res(v):
        return resolution_angstrom(fsc_maps(np.asarray(v.data, np.float64), truth), BOX, PIX,
                                   0.5, interpolate=True)

    # measured 23.03 Å against 23.81 Å without the correction (0.967)
    assert res(on.map) <= res(off.map) * 0.99


def test_ctf_params_scale_multiplies_the_ctf() -> None:
    """rlnCtfScalefactor, where run_data.star puts the amplitudes, scales the CTF linearly."""
    kx, ky = np.array([3.0, 5.0]), np.array([1.0, -2.0])
    one = CtfParams(defocus_u=np.array([15000.0]), defocus_v=np.array([14000.0]),
                    defocus_angle=np.array([30.0]))
    two = CtfParams(defocus_u=np.array([15000.0]), defocus_v=np.array([14000.0]),
                    defocus_angle=np.array([30.0]), scale=np.array([0.7]))
    np.testing.assert_allclose(two.evaluate(kx, ky, BOX, PIX),
                               0.7 * one.evaluate(kx, ky, BOX, PIX))
