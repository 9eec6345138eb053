"""End to end at high resolution: an O-symmetric pseudo-atomic cage (cryomap.atoms) with
detail out to Nyquist (4 Å at 2 Å/px), a B-factor of 100 Å², CTF and SNR 0.05, auto-refined
with the default schedule from a 20 Å low-pass, against the true-pose reconstruction on the
same path (the oracle). The resolution must not lock below what the data hold, and what the
log reports must be what the written half maps give."""

from __future__ import annotations

import numpy as np
import pytest

from cryomap import atoms
from cryomap.em.data import ImageSource
from cryomap.em.reconstruct import reconstruct_known_poses
from cryomap.em.refine import RefineOptions, mask_radius_px
from cryomap.fourier import initial_lowpass
from cryomap.io.mrc import read_map, write_map
from cryomap.io.star import read_star
from cryomap.jobs.refine import refine
from cryomap.particles import load_particles
from cryomap.resolution import fsc_maps, resolution_angstrom, resolution_shell
from cryomap.sampling import angular_step
from cryomap.simulate import simulate_particles, write_simulation

BOX, PIX, N, SNR, BFACTOR = 48, 2.0, 300, 0.05, 100.0
DIAMETER = 92.0  # Å: the cage (radius 28 Å, helices of 12 residues) is 85 Å across
# The final map's FSC-0.5 resolution against the truth over the oracle's (measured 1.105;
# the old radius rule that cut the FSC at the E-step radius gave 1.41 on this set), and the
# unfiltered half maps' over the oracle's halves (measured 1.124 and 1.115).
ORACLE_RATIO = 1.16
HALF_RATIO = 1.18


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    out = tmp_path_factory.mktemp("highres")
    truth = atoms.density_map(atoms.octahedral_shell(0, 28.0, 12), BOX, PIX, BFACTOR)
    sim = simulate_particles(truth, PIX, N, snr=SNR, seed=3, max_shift_px=2.0,
                             defocus_range=(8000.0, 25000.0), astigmatism=1000.0)
    write_simulation(out, *sim, pixel_size=PIX)
    write_map(out / "start.mrc",
              initial_lowpass(truth.astype(np.float64), 20.0, PIX).astype(np.float32), PIX)
    options = RefineOptions(particle_diameter=DIAMETER, ini_high=20.0, sym="O")
    state = refine(out / "particles.star", out / "start.mrc", out / "refine", options,
                   echo=None)
    df = sim[3]
    angles = df[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy()
    origins = df[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy() / PIX
    source = ImageSource(load_particles(out / "particles.star"),
                         mask_radius_px(options, BOX, PIX), options.mask_edge)
    oracle = reconstruct_known_poses(source, angles, origins, state.subset, options)
    return out / "refine", truth.astype(np.float64), state, oracle, options


def _resolution(volume: np.ndarray, truth: np.ndarray) -> float:
    return resolution_angstrom(fsc_maps(volume, truth), BOX, PIX, 0.5, interpolate=True)


def test_high_resolution_map_against_the_oracle(run):
    out, truth, state, oracle, _ = run
    assert 2 * PIX <= 4.0  # Nyquist of the test
    refined, _ = read_map(out / "run_class001.mrc")
    r_map, r_oracle = _resolution(refined, truth), _resolution(oracle.final_maps[0], truth)
    halves = [_resolution(state.final_maps[h], truth) / _resolution(oracle.final_maps[h], truth)
              for h in (1, 2)]
    print(f"\nfinal map {r_map:.2f} Å, oracle {r_oracle:.2f} Å: ratio {r_map / r_oracle:.3f}; "
          f"half maps {halves[0]:.3f}, {halves[1]:.3f}; {len(state.history)} iterations")
    assert r_oracle < 4.5  # the data hold detail close to Nyquist (measured 4.10 Å; 10 % margin)
    assert r_map <= ORACLE_RATIO * r_oracle
    assert max(halves) <= HALF_RATIO


def test_reported_resolution_is_that_of_the_written_half_maps(run):
    out, _, state, _, _ = run
    halves = [read_map(out / f"run_half{h}_class001_unfil.mrc")[0] for h in (1, 2)]
    written = resolution_shell(fsc_maps(*halves), 0.143)
    last = state.history[-1]
    assert abs(last.resolution_shell - written) <= 1  # measured 0 (both shell 21); one shell
    model = read_star(out / "run_model.star")
    assert float(model["model_general"]["rlnCurrentResolution"]) == pytest.approx(
        last.resolution)
    assert f"final resolution {last.resolution:.2f} Å" in (out / "run.log").read_text()


def test_the_radius_follows_the_resolution(run):
    """Each iteration's half-map FSC goes on beyond its E-step radius (to twice it, within
    N/2): the resolution there is the data's, not the search's. Each next radius is that
    resolution's shell + incr_size."""
    out, _, state, _, options = run
    hist = state.history
    first = hist[0]
    assert first.recon_radius == min(2 * first.r_max, BOX // 2) > first.r_max
    fsc = read_star(out / "run_it001_model.star")["model_class_1"]["rlnGoldStandardFsc"]
    fsc = fsc.to_numpy()
    beyond = fsc[first.r_max + 1:first.recon_radius + 1]
    assert np.count_nonzero(beyond) == beyond.size  # measured, not cut at the radius
    assert not np.any(fsc[first.recon_radius + 1:])
    for before, h in zip(hist[:-2], hist[1:-1], strict=True):
        assert h.r_max == min(before.resolution_shell + options.incr_size, BOX // 2 - 1)
        assert h.recon_radius == min(2 * h.r_max, BOX // 2)


def test_translations_as_fine_as_rotations(run):
    """Each finer order's oversampled offset step is at most the distance the particle's
    edge moves by one oversampled angular step (down to 0.1 px)."""
    _, _, state, _, options = run
    radius = mask_radius_px(options, BOX, PIX)
    later = [h for h in state.history if h.healpix_order + h.levels > 3]
    assert later
    for h in later:
        order = int(h.stage.split()[1])
        edge = np.deg2rad(angular_step(order + options.oversampling)) * radius
        # a rule, not an estimate (measured steps 0.52-0.66 px against 0.75-1.51 px); 1e-9 is
        # float slack for a step equal to the bound
        assert h.offset_step <= max(edge, 0.1) + 1e-9
