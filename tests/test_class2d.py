"""`cryomap class2d`: 2D classification of particles from a few projection directions of two
phantoms, end to end through the command line, plus the class-posterior algebra.

Figures (pytest -s prints them): membership recovered (best label permutation), correlation of
each class average with the clean projection of its view after the best in-plane rotation and
translation (and with the best other view, for contrast), and what --hard_last does to the class
posteriors.
"""

from __future__ import annotations

import itertools

import mrcfile
import numpy as np
import pandas as pd
import pytest
from scipy.ndimage import rotate

from cryomap.cli.main import main
from cryomap.ctf import CtfParams
from cryomap.em.classify import center_image, center_of_mass_shift, equal_split
from cryomap.em.engine import m_step_weights
from cryomap.io.mrc import write_map, write_stack
from cryomap.io.star import read_star
from cryomap.particles import make_optics_table
from cryomap.phantom import make_phantom_variant
from cryomap.simulate import project_images, write_simulation

BOX, PIX = 40, 5.0
# (phantom variant, rot, tilt): two views of the full molecule and two of the one without its
# head (VARIANTS 0 and 3); every image at a random in-plane angle and shift, with CTF and noise
VIEWS = ((0, 0.0, 0.0), (0, 30.0, 90.0), (3, 0.0, 0.0), (3, 30.0, 90.0))
N, SNR, ITERATIONS = 1000, 0.1, 15


def simulate_views(out, n: int = N, snr: float = SNR, seed: int = 0):
    """Images of VIEWS in equal expected proportions; returns (true class (n,), clean
    projections (K, N, N))."""
    rng = np.random.default_rng(seed)
    maps = {v: make_phantom_variant(v, BOX, PIX) for v in {w[0] for w in VIEWS}}
    cls = rng.integers(0, len(VIEWS), n)
    psi = rng.uniform(0, 360, n)
    r, phi = 2.0 * np.sqrt(rng.uniform(size=n)), rng.uniform(0, 2 * np.pi, n)
    origins = np.stack([r * np.cos(phi), r * np.sin(phi)], axis=1)
    df = rng.uniform(10000, 25000, n)
    ang = rng.uniform(0, 180, n)
    images = np.empty((n, BOX, BOX), np.float32)
    clean = []
    for c, (v, rot, tilt) in enumerate(VIEWS):
        idx = np.flatnonzero(cls == c)
        angles = np.stack([np.full(idx.size, rot), np.full(idx.size, tilt), psi[idx]], axis=1)
        ctf = CtfParams(defocus_u=df[idx] + 100, defocus_v=df[idx] - 100,
                        defocus_angle=ang[idx])
        images[idx] = project_images(maps[v], angles, origins[idx], ctf, PIX)
        clean.append(project_images(maps[v], np.array([[rot, tilt, 0.0]]))[0])
    sigma = np.sqrt(np.mean(np.var(images, axis=(1, 2))) / snr)
    images += rng.normal(scale=sigma, size=images.shape).astype(np.float32)
    particles = pd.DataFrame({
        "rlnImageName": [f"{i + 1:06d}@particles.mrcs" for i in range(n)],
        "rlnMicrographName": "sim.mrc", "rlnDefocusU": df + 100, "rlnDefocusV": df - 100,
        "rlnDefocusAngle": ang, "rlnOpticsGroup": 1})
    truth = particles.copy()
    truth["rlnClassNumber"] = cls + 1
    write_simulation(out, images, make_optics_table(PIX, BOX), particles, truth, PIX)
    return cls, np.array(clean)


def best_alignment_correlation(image: np.ndarray, reference: np.ndarray,
                               step: float = 2.0) -> float:
    """Largest normalised correlation of image with the reference rotated in-plane (every
    `step` degrees) and translated (all circular shifts)."""
    a = image - image.mean()
    fa = np.fft.rfft2(a)
    best = -1.0
    for angle in np.arange(0.0, 360.0, step):
        r = rotate(reference, angle, reshape=False, order=1)
        r = r - r.mean()
        cc = np.fft.irfft2(fa * np.conj(np.fft.rfft2(r)), s=a.shape)
        best = max(best, float(cc.max() / np.sqrt((a * a).sum() * (r * r).sum())))
    return best


def membership(found: np.ndarray, truth: np.ndarray, k: int) -> tuple[float, tuple]:
    """Fraction of particles in their true class under the best relabelling (K! labels)."""
    perm = max(itertools.permutations(range(k)),
               key=lambda p: np.mean(np.asarray(p)[found] == truth))
    return float(np.mean(np.asarray(perm)[found] == truth)), perm


def _error_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    """Simulate, then classify with --K 4 --hard_last --center_classes."""
    root = tmp_path_factory.mktemp("class2d")
    cls, clean = simulate_views(root / "sim")
    out = root / "run"
    rc = main(["class2d", "--i", str(root / "sim" / "particles.star"), "--o", str(out),
               "--K", "4", "--iter", str(ITERATIONS), "--psi_step", "10", "--offset_range", "3",
               "--offset_step", "1", "--tau2_fudge", "2", "--particle_diameter", "180",
               "--hard_last", "--center_classes", "--j", "2"])
    assert rc == 0
    return root, out, cls, clean


def test_classes_match_views_and_membership(run):
    root, out, cls, clean = run
    data = read_star(out / "run_data.star")["particles"]
    found = data["rlnClassNumber"].to_numpy() - 1
    assert found.min() >= 0 and found.max() <= 3
    frac, perm = membership(found, cls, 4)
    averages = mrcfile.open(out / "run_classes.mrcs").data
    dist = read_star(out / "run_model.star")["model_classes"]["rlnClassDistribution"]
    true_fr = np.bincount(cls, minlength=4) / cls.size
    print(f"\nclass2d: {N} particles, 4 views (2 phantoms), SNR {SNR}, {ITERATIONS} iterations: "
          f"membership {100 * frac:.1f}%")
    corr = []
    for k in range(4):
        v = perm[k]
        own = best_alignment_correlation(averages[k], clean[v])
        other = max(best_alignment_correlation(averages[k], clean[w]) for w in range(4)
                    if w != v)
        corr.append(own)
        print(f"  class {k + 1} = view {v + 1}: correlation {own:.3f} with its clean projection "
              f"(best other view {other:.3f}); fraction {dist[k]:.3f} (true {true_fr[v]:.3f})")
    assert frac >= 0.95  # measured 98.8 %
    assert min(corr) >= 0.97  # measured 0.985 (the other views: at most 0.967)


def test_hard_last_leaves_one_class_per_particle(run):
    _, out, _, _ = run
    last = np.load(out / f"run_it{ITERATIONS:03d}_state.npz")["class_prob"]
    before = np.load(out / f"run_it{ITERATIONS - 1:03d}_state.npz")["class_prob"]
    soft = np.mean(before.max(axis=1) < 0.999)
    print(f"\n--hard_last: class probability < 0.999 for {100 * soft:.1f}% of the particles in "
          f"iteration {ITERATIONS - 1}, {100 * np.mean(last.max(axis=1) < 1.0):.1f}% in the "
          f"last; nonzero classes per particle in the last: {np.unique((last > 0).sum(1))}")
    assert np.all(last.max(axis=1) == 1.0)
    assert np.all((last > 0).sum(axis=1) == 1)
    # the marginalised iteration before was not already hard (measured 4.7 %; 15 % margin)
    assert soft > 0.04


def test_outputs_in_relion_layout(run):
    _, out, _, _ = run
    for it in (1, ITERATIONS):
        for suffix in ("classes.mrcs", "model.star", "data.star", "state.npz"):
            assert (out / f"run_it{it:03d}_{suffix}").exists()
    for name in ("run_classes.mrcs", "run_model.star", "run_data.star", "run_classes.png",
                 "run.log", "job.json"):
        assert (out / name).exists()
    with mrcfile.open(out / "run_classes.mrcs") as m:
        assert m.data.shape == (4, BOX, BOX) and m.is_image_stack()
        assert float(m.voxel_size.x) == pytest.approx(PIX)
    model = read_star(out / "run_model.star")
    classes = model["model_classes"]
    assert list(classes["rlnReferenceImage"]) == [f"{k:06d}@run_classes.mrcs"
                                                  for k in range(1, 5)]
    assert classes["rlnClassDistribution"].sum() == pytest.approx(1.0)
    assert np.all(classes["rlnEstimatedResolution"] > 2 * PIX)  # Nyquist; measured 20.0-22.2 Å
    assert int(model["model_general"]["rlnReferenceDimensionality"]) == 2
    assert int(model["model_general"]["rlnNrClasses"]) == 4
    assert "rlnSsnrMap" in model["model_class_1"] and "rlnSigma2Noise" in \
        model["model_optics_group_1"]
    data = read_star(out / "run_data.star")["particles"]
    for col in ("rlnClassNumber", "rlnAnglePsi", "rlnOriginXAngst", "rlnOriginYAngst",
                "rlnMaxValueProbDistribution"):
        assert col in data
    assert "rlnAngleRot" not in data  # 2D poses are in-plane only
    assert data["rlnMaxValueProbDistribution"].between(0, 1).all()


def test_center_classes_keeps_averages_centred(run):
    _, out, _, _ = run
    averages = mrcfile.open(out / "run_classes.mrcs").data.astype(np.float64)
    off = [float(np.hypot(*center_of_mass_shift(a))) for a in averages]
    print(f"\n--center_classes: centre-of-mass offsets {np.round(off, 2)} px")
    assert max(off) < 0.5  # measured 0.0 px; the requirement: centred within half a pixel


def test_continue_resumes_like_an_uninterrupted_run(tmp_path):
    cls, _ = simulate_views(tmp_path / "sim", n=200, snr=0.3, seed=3)
    star = str(tmp_path / "sim" / "particles.star")
    args = ["--K", "2", "--psi_step", "20", "--offset_range", "1", "--offset_step", "1",
            "--particle_diameter", "180"]
    assert main(["class2d", "--i", star, "--o", str(tmp_path / "a"), "--iter", "3"] + args) == 0
    assert main(["class2d", "--i", star, "--o", str(tmp_path / "b"), "--iter", "2"] + args) == 0
    assert main(["class2d", "--o", str(tmp_path / "b"), "--continue", "--iter", "3"]) == 0
    a = mrcfile.open(tmp_path / "a" / "run_classes.mrcs").data
    b = mrcfile.open(tmp_path / "b" / "run_classes.mrcs").data
    # measured 0.0 (bit for bit); 1e-5 of the maximum leaves room for thread-order rounding
    np.testing.assert_allclose(b, a, rtol=0, atol=1e-5 * np.abs(a).max())
    da = read_star(tmp_path / "a" / "run_data.star")["particles"]
    db = read_star(tmp_path / "b" / "run_data.star")["particles"]
    assert (da["rlnClassNumber"] == db["rlnClassNumber"]).all()
    assert "continuing from iteration 2" in (tmp_path / "b" / "run.log").read_text()


@pytest.fixture(scope="module")
def small(tmp_path_factory):
    root = tmp_path_factory.mktemp("class2d_bad")
    simulate_views(root / "sim", n=12, snr=1.0, seed=1)
    return root


@pytest.mark.parametrize("case", ["K0", "Kn", "box", "pixel", "3d", "count"])
def test_bad_input_is_one_line_error(small, case, capsys):
    star = str(small / "sim" / "particles.star")
    ref = small / f"ref_{case}.mrc"
    extra = []
    if case == "K0":
        extra = ["--K", "0"]
    elif case == "Kn":
        extra = ["--K", "13"]
    else:
        if case == "box":
            write_map(ref, np.zeros((BOX + 2, BOX + 2), np.float32), PIX)
        elif case == "pixel":
            write_map(ref, np.zeros((BOX, BOX), np.float32), PIX * 1.1)
        elif case == "3d":
            write_map(ref, np.zeros((BOX, BOX, BOX), np.float32), PIX)
        else:
            ref = small / "refs.mrcs"
            write_stack(ref, np.zeros((3, BOX, BOX), np.float32), PIX)
        extra = ["--K", "2", "--ref", str(ref)]
    rc = main(["class2d", "--i", star, "--o", str(small / case), "--iter", "1"] + extra)
    line = _error_line(capsys)
    print(f"\n{case}: {line}")
    assert rc == 2 and line.startswith("cryomap class2d: error:")
    expected = {"K0": "at least 1 class", "Kn": "more classes than the 12 particles",
                "box": "box 42 does not match", "pixel": "pixel size 5.5000",
                "3d": "a 3D map", "count": "3 references for --K 2"}[case]
    assert expected in line


# -- the class-posterior algebra -------------------------------------------------------------


def _random_weights(rng, b=6, t=3, k=4, r=5):
    w = rng.random((b, t, k, r)) ** 8  # peaked, like posteriors
    return w / w.sum(axis=(1, 2, 3), keepdims=True)


def _sparse(w):
    """(image, shift, class, pose, weight) entries of a dense (B, T, K, R) array."""
    b, t, k, r = np.nonzero(w)
    return b, t, k, r, w[b, t, k, r]


def _masses(img, cls, w, n, k):
    out = np.zeros((n, k))
    np.add.at(out, (img, cls), w)
    return out


def test_m_step_weights():
    rng = np.random.default_rng(0)
    dense = _random_weights(rng)
    img, t, cls, r, w = _sparse(dense)
    masses = _masses(img, cls, w, 6, 4)
    # float rounding in this test: measured at most 4.4e-16 (absolute and relative)
    np.testing.assert_allclose(masses.sum(1), 1, atol=1e-14)
    np.testing.assert_array_equal(m_step_weights(img, cls, w, 6, 4), w)
    hard = m_step_weights(img, cls, w, 6, 4, hard=True)
    best = masses.argmax(1)
    for i in range(6):  # only the most probable class, its pose posterior unchanged
        mine = img == i
        assert np.all(hard[mine & (cls != best[i])] == 0)
        sel = mine & (cls == best[i])
        np.testing.assert_allclose(hard[sel], w[sel] / w[sel].sum(), rtol=1e-14)
    fm = m_step_weights(img, cls, w, 6, 4, force_max=True)
    np.testing.assert_allclose(_masses(img, cls, fm, 6, 4), masses, rtol=1e-14)  # marginalised
    for i in range(6):
        for k in range(4):  # one pose per class: its best
            sel = (img == i) & (cls == k)
            assert (fm[sel] > 0).sum() == 1 and np.argmax(fm[sel]) == np.argmax(w[sel])
    both = m_step_weights(img, cls, w, 6, 4, force_max=True, hard=True)
    assert np.all(np.bincount(img[both > 0], minlength=6) == 1)
    np.testing.assert_allclose(np.bincount(img, weights=both, minlength=6), 1)
    # a class temperature flattens the class posterior, keeps the poses' relative weights
    warm = m_step_weights(img, cls, w, 6, 4, temperature=2.0)
    expect = np.sqrt(masses) / np.sqrt(masses).sum(1, keepdims=True)
    np.testing.assert_allclose(_masses(img, cls, warm, 6, 4), expect, rtol=1e-14)
    sel = (img == 0) & (cls == 1)
    np.testing.assert_allclose(warm[sel] / warm[sel].sum(), w[sel] / w[sel].sum(), rtol=1e-14)


def test_equal_split():
    s = equal_split(103, 4, np.random.default_rng(1))
    assert set(np.bincount(s)) <= {25, 26} and s.size == 103


def test_center_image_moves_centre_of_mass():
    c = np.arange(32) - 16
    y, x = np.meshgrid(c, c, indexing="ij")
    blob = np.exp(-((x - 3.0) ** 2 + (y + 2.0) ** 2) / 8.0)
    assert np.allclose(center_of_mass_shift(blob), [3.0, -2.0], atol=2e-8)  # measured 1.8e-9
    # measured 8.1e-14
    assert np.allclose(center_of_mass_shift(center_image(blob)), [0, 0], atol=1e-12)
