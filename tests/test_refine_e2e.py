"""End to end: refine simulated particles of a known map from a wrong start and compare with
the truth and with a reconstruction from the true poses (the oracle)."""

from pathlib import Path

import numpy as np
import pytest

from cryomap.cli.demo import wrong_start
from cryomap.em.data import ImageSource
from cryomap.em.reconstruct import reconstruct_known_poses
from cryomap.em.refine3d import RefineOptions
from cryomap.em.refine_job import refine
from cryomap.em.validation import angular_errors, fsc_maps, fsc_resolution
from cryomap.io.mrc import read_map, write_map
from cryomap.io.star import read_star
from cryomap.particles import load_particles
from cryomap.phantom import make_phantom
from cryomap.sampling import angular_step
from cryomap.simulate import simulate_particles, write_simulation

BOX, PIX, N, SNR = 48, 3.5, 1000, 0.1


@pytest.fixture(scope="module")
def simulation(tmp_path_factory) -> tuple[Path, np.ndarray, object]:
    out = tmp_path_factory.mktemp("e2e")
    truth = make_phantom(BOX, PIX)
    sim = simulate_particles(truth, PIX, N, snr=SNR, seed=1, max_shift_px=2.0)
    write_simulation(out, *sim, pixel_size=PIX)
    start = wrong_start(truth.astype(np.float64), PIX, 40.0, np.random.default_rng(5))
    write_map(out / "start.mrc", start.astype(np.float32), PIX)
    return out, truth.astype(np.float64), sim[3]


def test_refinement_recovers_the_map_and_poses(simulation):
    out, truth, truth_df = simulation
    options = RefineOptions(iterations=6, healpix_order=2, offset_range=3, offset_step=1,
                            particle_diameter=0.8 * BOX * PIX, ini_high=40.0, seed=0)
    state = refine(out / "particles.star", out / "start.mrc", out / "refine", options,
                   echo=None)
    refined, pix = read_map(out / "refine" / "run_class001.mrc")
    assert pix == pytest.approx(PIX)
    res_refined = fsc_resolution(fsc_maps(refined.astype(np.float64), truth), BOX, PIX)
    true_angles = truth_df[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy()
    true_origins = truth_df[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy() / PIX

    # Oracle: the same particles and half-sets reconstructed at their true poses.
    particles = load_particles(out / "particles.star")
    source = ImageSource(particles, 0.4 * BOX, options.mask_edge)
    oracle, _, _ = reconstruct_known_poses(source, true_angles, true_origins, state.subset,
                                           options)
    res_oracle = fsc_resolution(fsc_maps(oracle, truth), BOX, PIX)
    errors = angular_errors(state.angles, true_angles)
    # Negative control: the same check against the mirror image of the truth must fail.
    res_mirror = fsc_resolution(fsc_maps(refined.astype(np.float64), truth[::-1]), BOX, PIX)
    print(f"\nrefined vs truth {res_refined:.1f} A, oracle {res_oracle:.1f} A, mirror "
          f"{res_mirror:.1f} A, median orientation error {np.median(errors):.1f} deg, "
          f"half-map resolution {state.history[-1].resolution:.1f} A")
    assert res_refined <= 1.3 * res_oracle
    assert np.median(errors) < angular_step(options.healpix_order)
    assert res_mirror > 1.3 * res_oracle

    # RELION-layout outputs with the per-particle labels
    data = read_star(out / "refine" / "run_data.star")
    assert {"optics", "particles"} <= set(data)
    cols = set(data["particles"].columns)
    for label in ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst",
                  "rlnOriginYAngst", "rlnMaxValueProbDistribution",
                  "rlnNrOfSignificantSamples", "rlnLogLikeliContribution", "rlnRandomSubset",
                  "rlnDefocusU", "rlnImageName"):
        assert label in cols
    model = read_star(out / "refine" / "run_model.star")
    fsc_col = model["model_class_1"]["rlnGoldStandardFsc"].to_numpy()
    assert fsc_col[0] == 1.0 and fsc_col.size == BOX // 2 + 1
    for name in ("run_fsc.png", "run.log", "run_it001_half1_class001.mrc",
                 "run_it001_half2_class001.mrc", "run_it001_model.star", "run_it001_data.star"):
        assert (out / "refine" / name).exists(), name
