"""The public Python API (cryomap.*): runs in memory write nothing and give the command
line's numbers; particles in memory with an output folder chain like files; bad input is one
clear error; Volume's operations are the owning modules' ones."""

import numpy as np
import pytest

import cryomap
from cryomap.cli.main import main
from cryomap.fourier import lowpass_map
from cryomap.io.mrc import read_map
from cryomap.io.star import read_star
from cryomap.postprocess import fsc_maps
from cryomap.simulate import project_images

BOX, PIX = 24, 8.0
FAST = dict(iterations=2, healpix_order=1, offset_range=1, offset_step=1)
FAST_ARGS = ["--iter", "2", "--healpix_order", "1", "--offset_range", "1", "--offset_step",
             "1"]


@pytest.fixture(scope="module")
def sim():
    cryomap.set_threads(2)
    truth = cryomap.Volume.phantom(BOX, PIX)
    return cryomap.simulate(truth, n=80, snr=1.0, max_shift=1, seed=3)


@pytest.fixture(scope="module")
def start(sim):
    return sim.truth_map.lowpass(40.0)


def test_refine_in_memory_writes_nothing_and_matches_the_command_line(sim, start, tmp_path,
                                                                      monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = cryomap.refine(sim.particles, start, echo=None, **FAST)
    assert list(tmp_path.iterdir()) == []
    assert isinstance(result.map, cryomap.Volume) and result.map.shape == (BOX,) * 3
    assert result.map.pixel_size == PIX and result.outdir is None
    assert len(result.particles) == 80 and result.iterations == 2
    # the same particles from files, through `cryomap refine`: the same map, bit for bit
    (tmp_path / "in").mkdir()
    star = sim.particles.save(tmp_path / "in" / "particles.star")
    start.save(tmp_path / "start.mrc")
    assert main(["refine", "--i", str(star), "--ref", "start.mrc", "--o", "R", "--j", "2"]
                + FAST_ARGS) == 0
    cli_map, pix = read_map(tmp_path / "R" / "run_class001.mrc")
    assert pix == PIX
    from_file = cryomap.refine(str(star), start, echo=None, **FAST)
    np.testing.assert_array_equal(cli_map, from_file.map.asnumpy())
    table = read_star(tmp_path / "R" / "run_data.star")["particles"]
    np.testing.assert_allclose(table["rlnAngleRot"], from_file.particles["rlnAngleRot"],
                               atol=1e-5)
    # in memory: the same up to the CTF values' rounding in the STAR file's text
    np.testing.assert_allclose(result.map.asnumpy(), cli_map,
                               atol=1e-5 * np.abs(cli_map).max())
    np.testing.assert_allclose(result.particles["rlnAngleRot"], table["rlnAngleRot"],
                               atol=1e-3)


def test_refine_in_memory_particles_into_a_folder_chains(sim, start, tmp_path, monkeypatch):
    """Particles in memory with an output folder: saved there first, so that run_data.star
    and --continue refer to real files; the result reads the same as in memory."""
    monkeypatch.chdir(tmp_path)
    result = cryomap.refine(sim.particles, start, "Refine3D/job001", echo=None, **FAST)
    out = tmp_path / "Refine3D" / "job001"
    assert (out / "particles.star").is_file() and (out / "particles.mrcs").is_file()
    assert result.outdir == out.relative_to(tmp_path)
    again = cryomap.read_particles(out / "run_data.star")
    np.testing.assert_array_equal(again.read_images([0, 79]), sim.particles.read_images([0, 79]))
    assert main(["refine", "--o", "Refine3D/job001", "--continue"]) == 0  # finished: no-op
    rec = cryomap.reconstruct(out / "run_data.star", "rec.mrc", ctf=True, echo=None)
    assert (tmp_path / "rec.mrc").is_file() and rec.paths[0].name == "rec.mrc"
    # measured 32.0 Å (shell 6 of 24 px at 8 Å/px); margin one shell (38.4 Å)
    assert rec.map.fsc(sim.truth_map).resolution(0.5) < 40.0


def test_classify_in_memory(sim, start, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    classes = cryomap.classify3d(sim.particles, start, n_classes=2, echo=None, **FAST)
    assert len(classes.maps) == 2 and all(m.ndim == 3 for m in classes.maps)
    assert classes.distribution.sum() == pytest.approx(1.0)
    assert set(classes.particles["rlnClassNumber"]) <= {1, 2}
    assert classes.class_sizes.sum() == 80
    averages = cryomap.classify2d(sim.particles, n_classes=3, iterations=1, offset_range=1,
                                  offset_step=1, echo=None)
    assert len(averages.maps) == 3 and averages.maps[0].shape == (BOX, BOX)
    assert list(tmp_path.iterdir()) == []


def test_reconstruct_in_memory_subset(sim):
    """Known poses, half-set 1 only: the in-memory images of that half are used."""
    particles = sim.truth_particles
    particles.particles["rlnRandomSubset"] = np.arange(80) % 2 + 1
    full = cryomap.reconstruct(particles, ctf=True, echo=None)
    half = cryomap.reconstruct(particles, ctf=True, subset=1, echo=None)
    assert full.half_maps is not None and half.half_maps is None
    assert full.n_particles == 80 and half.n_particles == 40
    assert len(half.particles) == 40 and set(half.particles["rlnRandomSubset"]) == {1}
    np.testing.assert_array_equal(full.particles["rlnRandomSubset"], np.arange(80) % 2 + 1)
    # measured 32.0 Å with half the particles; margin one shell (38.4 Å)
    assert half.map.fsc(sim.truth_map).resolution(0.5) < 40.0


def test_bad_input_is_one_clear_error(sim, start, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    big = cryomap.Volume(np.zeros((BOX + 2,) * 3, np.float32), PIX)
    with pytest.raises(cryomap.InputError, match="box"):
        cryomap.refine(sim.particles, big, echo=None, **FAST)
    with pytest.raises(cryomap.InputError, match="healpix_order"):
        cryomap.refine(sim.particles, start, echo=None, healpix_order=99)
    with pytest.raises(TypeError, match="unknown option"):
        cryomap.refine(sim.particles, start, echo=None, healpix=2)
    with pytest.raises(TypeError, match="Volume"):
        cryomap.refine(sim.particles, start.asnumpy(), echo=None)
    with pytest.raises(cryomap.InputError, match="continue"):
        cryomap.refine(sim.particles, start, resume=True, echo=None)
    with pytest.raises(cryomap.InputError, match="angpix"):
        cryomap.refine(sim.particles, start, angpix=2.0, echo=None)
    # particles in memory are saved into an output folder only once the inputs are checked
    with pytest.raises(cryomap.InputError, match="box"):
        cryomap.refine(sim.particles, big, "Refine3D/job001", echo=None, **FAST)
    with pytest.raises(cryomap.InputError, match="K"):
        cryomap.classify3d(sim.particles, start, "Class3D/job001", n_classes=81, echo=None)
    with pytest.raises(cryomap.InputError, match="ref"):
        cryomap.classify3d(sim.particles, None, "Class3D/job001", echo=None)
    assert list(tmp_path.iterdir()) == []


def test_volume_operations_are_the_modules(tmp_path, sim):
    truth = sim.truth_map
    path = truth.save(tmp_path / "t.mrc")
    again = cryomap.Volume.read(path)
    np.testing.assert_array_equal(again.asnumpy(), truth.asnumpy())
    assert again.pixel_size == PIX and np.asarray(again).shape == (BOX,) * 3
    np.testing.assert_allclose(truth.lowpass(30.0).asnumpy(),
                               lowpass_map(truth.asnumpy(), 30.0, PIX), atol=1e-6)
    fsc = truth.fsc(truth.lowpass(30.0))
    np.testing.assert_allclose(fsc.curve, fsc_maps(truth.asnumpy().astype(np.float64),
                                                   truth.lowpass(30.0).asnumpy()
                                                   .astype(np.float64)))
    # the 30 Å filter's raised-cosine edge (shell 6.4) leaves FSC 0.68 at shell 7, 0.21 at 8:
    # RELION's rule gives shell 7 exactly (27.4 Å)
    assert fsc.resolution(0.5) == pytest.approx(BOX * PIX / 7)
    assert truth.fsc(truth).resolution(0.143) == pytest.approx(2 * PIX)  # Nyquist
    angles = np.array([[0.0, 0.0, 0.0], [30.0, 60.0, 90.0]])
    np.testing.assert_array_equal(truth.project(angles),
                                  project_images(truth.asnumpy(), angles))
    with pytest.raises(ValueError):
        cryomap.Volume(np.zeros((4, 5, 6)), 1.0)
    with pytest.raises(ValueError):
        cryomap.Volume(np.zeros((4, 4, 4)), 0.0)
