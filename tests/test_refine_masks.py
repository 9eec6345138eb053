"""Solvent masks in refinement (RELION's --solvent_mask, --solvent_correct_fsc), the
post-processing command printed at the end, and the refine options checked before anything is
written (--sym, the mask's box and values)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from cryomap import fourier, projector
from cryomap import postprocess as pp
from cryomap.cli.main import main
from cryomap.em.data import ImageSource
from cryomap.em.refine import (
    Refinement,
    RefineOptions,
    half_set_fsc,
    initial_state,
    mask_radius_px,
    refine_iteration,
    solvent_corrected_fsc,
    unfiltered_halves,
)
from cryomap.io.mrc import write_map
from cryomap.masks import make_mask, soft_sphere
from cryomap.particles import load_particles
from cryomap.phantom import make_phantom
from cryomap.resolution import first_shell_below, fsc_maps, resolution_shell
from cryomap.simulate import random_rotations, simulate_particles, write_simulation

BOX, PIX = 24, 7.0
FAST = ["--healpix_order", "1", "--offset_range", "1", "--offset_step", "1",
        "--ini_high", "40", "--j", "2"]


@pytest.fixture(scope="module")
def sim(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("refine_masks")
    truth = make_phantom(BOX, PIX)
    write_simulation(out, *simulate_particles(truth, PIX, 60, snr=1.0, seed=2, max_shift_px=1),
                     pixel_size=PIX)
    write_map(out / "ref.mrc", truth, PIX)
    mask = make_mask(truth, 0.05 * float(truth.max()), extend=1, soft_edge=3)
    write_map(out / "mask.mrc", mask.astype(np.float32), PIX)
    write_map(out / "big_mask.mrc", np.ones((BOX + 2,) * 3, np.float32), PIX)
    write_map(out / "bad_mask.mrc", (2.0 * mask).astype(np.float32), PIX)
    return out


def _noisy_backprojectors(volume: np.ndarray, rng: np.random.Generator
                          ) -> list[projector.BackProjector]:
    """Two half-sets of 300 noisy central slices of a map (white noise, weights 1)."""
    box = volume.shape[0]
    ref = projector.prepare_reference(volume, 2, "linear")
    mask = fourier.pixel_mask(box, box // 2)
    bps = []
    for _ in range(2):
        rot = random_rotations(300, rng)
        slices = projector.project(ref, rot, mask.coords)
        sigma = 1.5 * float(np.abs(slices).mean())
        noise = rng.normal(size=slices.shape) + 1j * rng.normal(size=slices.shape)
        bp = projector.BackProjector(box, 2, box // 2)
        bp.add_slices((slices + sigma * noise).astype(np.complex64),
                      np.ones(slices.shape, np.float32), rot, mask.coords)
        bps.append(bp.finish())
    return bps


def test_solvent_corrected_fsc():
    """The masked, phase-randomisation-corrected FSC of the unfiltered half maps: as
    relion_postprocess's pieces compute it (randomised from the first shell below 0.8, the
    correction from two shells on, 0 where the random FSC is the larger), and higher than the
    unmasked FSC with a tight mask (the mask removes the solvent's noise)."""
    box, pix = 32, 6.0
    volume = make_phantom(box, pix)
    bps = _noisy_backprojectors(volume, np.random.default_rng(0))
    mask = make_mask(volume, 0.02 * float(volume.max()), extend=2, soft_edge=3)
    options = RefineOptions()
    plain, _ = half_set_fsc(bps, options, box // 2, box)
    corrected, tau2 = half_set_fsc(bps, options, box // 2, box, mask, seed=4)
    halves = unfiltered_halves(bps, box // 2, box)
    np.testing.assert_array_equal(corrected, solvent_corrected_fsc(halves, mask, 4))
    mid = (plain > 0.2) & (plain < 0.9)
    # measured: at least 0.184 higher (2 shells); 13 % margin
    assert mid.any() and np.all(corrected[mid] > plain[mid] + 0.16)
    # the steep drop at shell 8-9 (measured) is where both cross 0.143 (measured: both at 8)
    assert resolution_shell(corrected, 0.143) >= resolution_shell(plain, 0.143)
    h1, h2 = halves
    shell = first_shell_below(fsc_maps(h1, h2), 0.8)
    masked = fsc_maps(h1 * mask, h2 * mask)
    random = fsc_maps(pp.randomise_phases(h1, shell, 4) * mask,
                      pp.randomise_phases(h2, shell, 5) * mask)
    expect = pp.corrected_fsc(masked, random, shell)
    expect[(np.arange(expect.size) >= shell + 2) & (random > masked)] = 0.0
    np.testing.assert_allclose(corrected, expect, atol=1e-12)  # measured 0.0; for rounding
    assert np.all(tau2[1:box // 2] >= 0)


def test_solvent_mask_replaces_the_spherical_mask(sim):
    """A solvent mask equal to the spherical mask gives the same iteration bit for bit (the
    mask takes the sphere's place on the references); a tighter one changes it."""
    particles = load_particles(sim / "particles.star")
    options = RefineOptions(healpix_order=1, offset_range=1, offset_step=1, iterations=2)
    radius = mask_radius_px(options, BOX, PIX)
    source = ImageSource(particles, radius, options.mask_edge)
    reference = make_phantom(BOX, PIX)
    sphere = soft_sphere(BOX, radius, options.mask_edge, 3)
    tight = soft_sphere(BOX, 0.5 * radius, options.mask_edge, 3)
    volumes = []
    for solvent in (None, sphere, tight):
        refinement = Refinement(source, options, radius, solvent)
        state = initial_state(refinement, reference, particles.angles(),
                              particles.origins_px(), np.arange(60) % 2 + 1)
        refine_iteration(state, refinement)
        volumes.append(state.volumes.copy())
    particles.close()
    np.testing.assert_array_equal(volumes[1], volumes[0])
    # measured 0.163 of the maximum; 14 % margin
    assert np.abs(volumes[2] - volumes[0]).max() > 0.14 * np.abs(volumes[0]).max()


def test_refine_with_solvent_mask_prints_the_postprocess_command(sim, tmp_path, capsys):
    out = tmp_path / "Refine3D" / "job007"
    args = ["refine", "--i", str(sim / "particles.star"), "--ref", str(sim / "ref.mrc"),
            "--o", str(out), "--iter", "2", "--sym", "c2", "--solvent_mask",
            str(sim / "mask.mrc"), "--solvent_correct_fsc"] + FAST
    assert main(args) == 0
    printed = capsys.readouterr().out
    command = (f"cryomap postprocess --i {out / 'run_half1_class001_unfil.mrc'} --mask "
               f"{(sim / 'mask.mrc').resolve()} --o PostProcess/job007")
    assert command in printed and command in (out / "run.log").read_text()
    job = json.loads((out / "job.json").read_text())
    assert job["options"]["sym"] == "C2" and job["options"]["solvent_correct_fsc"]
    assert job["options"]["solvent_mask"] == str((sim / "mask.mrc").resolve())


def test_refine_without_mask_suggests_one(sim, tmp_path, capsys):
    out = tmp_path / "r"
    assert main(["refine", "--i", str(sim / "particles.star"), "--ref", str(sim / "ref.mrc"),
                 "--o", str(out), "--iter", "1"] + FAST) == 0
    printed = capsys.readouterr().out
    assert f"cryomap mask --i {out / 'run_class001.mrc'}" in printed
    assert "--mask <mask.mrc> --o PostProcess/r" in printed


@pytest.mark.parametrize("extra, words", [
    (["--sym", "X3"], ["--sym", "unknown symmetry group"]),
    (["--sym", "I1"], ["--sym I1", "--healpix_order 1", "icosahedral"]),
    (["--solvent_mask", "big_mask.mrc"], ["big_mask.mrc", "box"]),
    (["--solvent_mask", "bad_mask.mrc"], ["bad_mask.mrc", "[0, 1]"]),
    (["--solvent_mask", "missing.mrc"], ["missing.mrc"]),
    (["--solvent_correct_fsc"], ["--solvent_correct_fsc", "--solvent_mask"]),
])
def test_bad_refine_input_writes_nothing(sim, tmp_path, capsys, extra, words):
    extra = [str(sim / e) if e.endswith(".mrc") else e for e in extra]
    out = tmp_path / "o"
    code = main(["refine", "--i", str(sim / "particles.star"), "--ref", str(sim / "ref.mrc"),
                 "--o", str(out)] + FAST + extra)
    err = capsys.readouterr().err.strip()
    assert code == 2 and "Traceback" not in err and len(err.splitlines()) == 1, err
    assert all(w in err for w in words), err
    assert not out.exists()
