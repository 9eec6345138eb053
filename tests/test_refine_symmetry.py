"""End to end with point-group symmetry (docs/symmetry.md): particles of a ribosome-sized
phantom made C4- or D2-symmetric, refined with --sym and with C1 on the same data and the same
schedule. With the group the refinement searches 1/|G| of the orientations, reaches at least
C1's resolution against the truth and the true-pose reconstruction's with the group, and its
map is symmetric to float precision. Local searches and 3D classification use the group too."""

from __future__ import annotations

import time

import numpy as np
import pytest

from cryomap import symmetry
from cryomap.em.classify import ClassOptions
from cryomap.em.data import ImageSource
from cryomap.em.reconstruct import reconstruct_known_poses
from cryomap.em.refine import RefineOptions, mask_radius_px
from cryomap.em.validation import angular_errors
from cryomap.euler import euler_to_matrix
from cryomap.fourier import initial_lowpass
from cryomap.io.mrc import read_map, write_map
from cryomap.io.star import read_star, write_star
from cryomap.jobs.classify import classify3d
from cryomap.jobs.refine import refine
from cryomap.particles import load_particles
from cryomap.phantom import RIBOSOME_SCALE, make_phantom
from cryomap.resolution import fsc_maps, resolution_angstrom
from cryomap.simulate import simulate_particles, write_simulation

BOX, PIX, N, SNR = 32, 7.0, 300, 0.2
DIAMETER = 0.8 * BOX * PIX
# One schedule for both runs: 4 global iterations at HEALPix order 2, then the final one.
SCHEDULE = dict(particle_diameter=DIAMETER, ini_high=40.0, offset_range=2.0, offset_step=2.0,
                iterations=5)
# The symmetric refinement's FSC-0.5 resolution against the truth may be at most this much
# worse than the true-pose reconstruction with the group (measured 1.051 for C4, 1.012 for
# D2, with the amplitude correction on).
ORACLE_RATIO = 1.08


def _resolution(volume: np.ndarray, truth: np.ndarray) -> float:
    return resolution_angstrom(fsc_maps(np.asarray(volume, np.float64), truth), BOX, PIX, 0.5,
                          interpolate=True)


def _symmetry_error(volume: np.ndarray, sym: str) -> float:
    """Largest |V(R^T x) - V(x)| over the group's operators, relative to max |V|."""
    v = np.asarray(volume, np.float64)
    return max(float(np.abs(symmetry.rotate_volume(v, r) - v).max())
               for r in symmetry.operators(sym)[1:]) / float(np.abs(v).max())


def _true_poses(truth_df):
    return (truth_df[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy(),
            truth_df[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy() / PIX)


_RUNS: dict[str, dict] = {}  # per group, made once for the module's tests


@pytest.fixture(scope="module", params=["C4", "D2"])
def runs(request, tmp_path_factory):
    return _runs(request.param, tmp_path_factory)


def _runs(sym: str, tmp_path_factory) -> dict:
    """The group's data set, its refinements with the group and with C1, and the true-pose
    reconstruction with the group."""
    if sym in _RUNS:
        return _RUNS[sym]
    out = tmp_path_factory.mktemp(f"sym_{sym}")
    truth = symmetry.symmetrize_volume(
        make_phantom(BOX, PIX, scale=RIBOSOME_SCALE * DIAMETER / 256), sym)
    sim = simulate_particles(truth.astype(np.float32), PIX, N, snr=SNR, seed=1,
                             max_shift_px=2.0)
    write_simulation(out, *sim, pixel_size=PIX)
    write_map(out / "start.mrc", initial_lowpass(truth, 40.0, PIX).astype(np.float32), PIX)
    result = {"sym": sym, "out": out, "truth": truth, "truth_df": sim[3]}
    for s in (sym, "C1"):
        t0 = time.perf_counter()
        state = refine(out / "particles.star", out / "start.mrc", out / s,
                       RefineOptions(**SCHEDULE, sym=s), echo=None)
        result[s] = (state, time.perf_counter() - t0)
    angles, origins = _true_poses(sim[3])
    options = RefineOptions(particle_diameter=DIAMETER, sym=sym)
    particles = load_particles(out / "particles.star")
    source = ImageSource(particles, mask_radius_px(options, BOX, PIX), options.mask_edge)
    result["oracle"] = reconstruct_known_poses(source, angles, origins,
                                               result[sym][0].subset, options)
    particles.close()
    _RUNS[sym] = result
    return result


def test_symmetric_refinement_reaches_c1_with_fewer_orientations(runs):
    sym, out, truth = runs["sym"], runs["out"], runs["truth"]
    (st_sym, t_sym), (st_c1, t_c1) = runs[sym], runs["C1"]
    m_sym, _ = read_map(out / sym / "run_class001.mrc")
    m_c1, _ = read_map(out / "C1" / "run_class001.mrc")
    r_sym, r_c1 = _resolution(m_sym, truth), _resolution(m_c1, truth)
    r_oracle = _resolution(runs["oracle"].final_maps[0], truth)
    n_sym = st_sym.history[0].orientations_level0
    n_c1 = st_c1.history[0].orientations_level0
    samples = [np.mean([h.mean_samples for h in s.history]) for s in (st_sym, st_c1)]
    true_angles, _ = _true_poses(runs["truth_df"])
    errors = angular_errors(st_sym.angles, true_angles, sym)
    print(f"\n{sym}: {r_sym:.2f} Å (FSC 0.5 vs truth), C1 {r_c1:.2f} Å, true poses with {sym} "
          f"{r_oracle:.2f} Å; level-0 orientations {n_sym} vs {n_c1}; samples/image "
          f"{samples[0]:.0f} vs {samples[1]:.0f}; median error {np.median(errors):.1f} deg "
          f"(up to symmetry); symmetry error {_symmetry_error(m_sym, sym):.1e} "
          f"(C1 map {_symmetry_error(m_c1, sym):.1e}); {t_sym:.1f} s vs {t_c1:.1f} s")
    order = symmetry.point_group(sym).order
    assert n_sym * order == n_c1  # C4 and D2 map the HEALPix grid onto itself
    assert samples[0] < samples[1]  # measured 1281 vs 4834 (C4), 4379 vs 6266 (D2)
    # measured 27.59 vs 29.79 Å (C4: 0.926), 26.52 vs 29.69 Å (D2: 0.893)
    assert r_sym <= r_c1
    assert r_sym <= ORACLE_RATIO * r_oracle
    assert np.median(errors) < 10.0  # measured 9.0 deg (C4), 7.8 deg (D2)
    # the plain error is meaningless here: the poses landed in one asymmetric unit (measured
    # 91.7 deg (C4), 174.3 deg (D2); 13 % margin below C4's)
    assert np.median(angular_errors(st_sym.angles, true_angles)) > 80.0


def test_symmetric_map_is_symmetric_to_float_precision(runs):
    sym, out = runs["sym"], runs["out"]
    for name in ("run_class001.mrc", "run_half1_class001_unfil.mrc",
                 "run_it001_half2_class001.mrc"):
        volume, _ = read_map(out / sym / name)
        # float32 maps: measured 1.5e-7 to 1.8e-7 (C4 and D2)
        assert _symmetry_error(volume, sym) <= 1e-6, name
    # the check can fail: C1's map of the same data is symmetric only up to the noise
    # (measured 0.073 (C4), 0.071 (D2); 15 % margin)
    c1, _ = read_map(out / "C1" / "run_class001.mrc")
    assert _symmetry_error(c1, sym) > 0.06
    log = (out / sym / "run.log").read_text()
    assert f"symmetry {sym}" in log and "post-process with: cryomap postprocess --i" in log


def test_local_searches_find_poses_given_as_other_symmetry_copies(tmp_path_factory, tmp_path):
    """Input poses moved to random symmetry copies (outside the asymmetric unit for most) and
    perturbed by a few degrees: local searches around every copy bring them back."""
    runs = _runs("C4", tmp_path_factory)
    sym, out = runs["sym"], runs["out"]
    rng = np.random.default_rng(3)
    df = runs["truth_df"].copy()
    true_angles, _ = _true_poses(df)
    ops = symmetry.operators(sym)
    start = euler_to_matrix(*true_angles.T) @ ops[rng.integers(0, len(ops), N)]
    from cryomap.euler import matrix_to_euler
    from cryomap.sampling import random_rotation

    start = np.stack([a @ random_rotation(rng, 3.0) for a in start])
    rot, tilt, psi = matrix_to_euler(start)
    df["rlnAngleRot"], df["rlnAngleTilt"], df["rlnAnglePsi"] = rot, tilt, psi
    blocks = read_star(out / "truth.star")
    blocks["particles"] = df
    write_star(out / "start_poses.star", blocks)
    options = RefineOptions(particle_diameter=DIAMETER, ini_high=20.0, offset_range=1.0,
                            offset_step=1.0, healpix_order=3, sigma_ang=2.0, iterations=2,
                            sym=sym)
    state = refine(out / "start_poses.star", out / sym / "run_class001.mrc", tmp_path / "local",
                   options, echo=None)
    assert all(h.local for h in state.history)
    errors = angular_errors(state.angles, true_angles, sym)
    moved = np.median(angular_errors(state.angles, np.stack([rot, tilt, psi], 1)))
    print(f"\nlocal {sym}: error median {np.median(errors):.2f} deg, 95th percentile "
          f"{np.percentile(errors, 95):.2f} deg from starts 3 deg off (global search: 9 deg); "
          f"median plain change {moved:.1f} deg; {state.history[-1].mean_samples:.0f} "
          f"samples/image")
    # within the data's accuracy of the truth, every particle (a window without the copies
    # would hold no orientation of the unit for 3/4 of them)
    # measured: median 3.70 deg, 95th percentile 6.96 deg
    assert np.median(errors) < 4.5 and np.percentile(errors, 95) < 8.0
    # measured 89.9 deg: most poses were found around a copy in the asymmetric unit
    assert moved > 45.0


def test_class3d_maps_are_symmetric(tmp_path_factory, tmp_path):
    runs = _runs("D2", tmp_path_factory)
    sym, out = runs["sym"], runs["out"]
    options = ClassOptions(n_classes=2, iterations=2, healpix_order=1, offset_range=2.0,
                           offset_step=2.0, particle_diameter=DIAMETER, sym=sym,
                           tau2_fudge=1.0, class_temperature=1.0)
    state = classify3d(out / "particles.star", out / "start.mrc", tmp_path / "cls", options,
                       echo=None)
    assert state.history[-1].mean_samples > 0  # measured 3190
    for k in range(2):
        volume, _ = read_map(tmp_path / "cls" / f"run_class{k + 1:03d}.mrc")
        assert _symmetry_error(volume, sym) <= 1e-6  # float32 maps: measured 2.6e-7, 1.8e-7
