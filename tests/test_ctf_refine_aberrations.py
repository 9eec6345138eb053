"""Per-optics-group aberrations in `cryomap ctf_refine` (cryomap.ctf_aberrations,
docs/method.md eqs. (33), (34)): beam tilt and trefoil (--fit_beamtilt) and anisotropic
magnification (--fit_aniso) recovered from data simulated with known values, a control without
aberrations, the written STAR read back (its phase, not its coefficient labels, against the
truth's), the residual against the images, the phase fit and the tilt extraction against
explicit polynomials, and the options' bad input."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cryomap import atoms
from cryomap.cli.main import main
from cryomap.ctf import CtfParams
from cryomap.ctf_aberrations import extract_beam_tilt, fit_odd_aberrations, fit_odd_phase
from cryomap.io.mrc import write_map
from cryomap.io.star import read_star
from cryomap.particles import load_particles, write_particles
from cryomap.simulate import project_images, simulate_particles, write_simulation

BOX, PIX, KV, CS = 64, 2.0, 300.0, 2.7
TILT = (1.0, -0.6)  # mrad
TREFOIL = 40.0  # rad, Z(3,3) of the frequency in 1/Å: 0.6 rad at Nyquist (4 Å)
ODD = np.array([0.0, 0.0, 0.0, 0.0, 0.0, TREFOIL])
ANGLE = 0.5  # rad: the axes of the magnification
M_TRUE = (np.array([[np.cos(ANGLE), -np.sin(ANGLE)], [np.sin(ANGLE), np.cos(ANGLE)]])
          @ np.diag([1.0075, 0.9925])
          @ np.array([[np.cos(ANGLE), np.sin(ANGLE)], [-np.sin(ANGLE), np.cos(ANGLE)]]))
ABERRATION_LABELS = ("rlnBeamTiltX", "rlnBeamTiltY", "rlnOddZernike", "rlnMagMat00",
                     "rlnMagMat01", "rlnMagMat10", "rlnMagMat11")

# RELION's odd polynomials of (x, y) in 1/Å, written out (r² = x² + y²), ordered as
# rlnOddZernike: Z(-1,1), Z(1,1), Z(-3,3), Z(-1,3), Z(1,3), Z(3,3).
ODD_POLYNOMIALS = [
    lambda x, y: y, lambda x, y: x, lambda x, y: 3 * x * x * y - y**3,
    lambda x, y: (3 * (x * x + y * y) - 2) * y, lambda x, y: (3 * (x * x + y * y) - 2) * x,
    lambda x, y: x**3 - 3 * x * y * y,
]


def odd_phase(coeffs, x, y) -> np.ndarray:
    return sum(c * z(x, y) for c, z in zip(coeffs, ODD_POLYNOMIALS, strict=False))


def tilt_phase(tilt, x, y, kv=KV, cs=CS) -> np.ndarray:
    """-2 pi Cs lambda² |s|² (s . tau), lambda the relativistic wavelength (Å)."""
    v = kv * 1e3
    lam = 12.2643247 / np.sqrt(v * (1 + 0.978466e-6 * v))
    return -2 * np.pi * cs * 1e7 * lam**2 * (x * x + y * y) * (x * tilt[0] + y * tilt[1]) * 1e-3


def defocus_form(u, v, angle_deg) -> np.ndarray:
    """(n, 2, 2) D with s^T D s = U (s.e_u)² + V (s.e_v)², e_u at the angle."""
    a = np.deg2rad(np.asarray(angle_deg, float))
    e_u = np.stack([np.cos(a), np.sin(a)], -1)
    e_v = np.stack([-np.sin(a), np.cos(a)], -1)
    return (np.asarray(u, float)[:, None, None] * e_u[:, :, None] * e_u[:, None, :]
            + np.asarray(v, float)[:, None, None] * e_v[:, :, None] * e_v[:, None, :])


def values_of_form(d: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(U, V, angle) of symmetric forms (eigenvalues, U the larger)."""
    w, vec = np.linalg.eigh(d)
    return w[:, 1], w[:, 0], np.rad2deg(np.arctan2(vec[:, 1, 1], vec[:, 0, 1]))


def _refinement(d: Path, truth: np.ndarray, n: int, seed: int, **aberrations):
    """A refinement's run_data.star at the true poses with the aberration columns removed
    (the data have them, the STAR does not), the truth as both half maps."""
    d.mkdir()
    sim = simulate_particles(truth, PIX, n, snr=1.0, seed=seed, max_shift_px=2.0,
                             defocus_range=(8000.0, 20000.0), astigmatism=800.0,
                             stack_name=str(d / "particles.mrcs"), **aberrations)
    write_simulation(d, *sim, pixel_size=PIX)
    images, optics, _, true = sim
    table = true.copy()
    table["rlnRandomSubset"] = np.arange(n) % 2 + 1
    if "mag_matrix" in aberrations:  # the CTF the micrographs show: D at M s, as s^T M^T D M s
        m = np.asarray(aberrations["mag_matrix"])
        form = np.einsum("ji,njk,kl->nil", m, defocus_form(
            table["rlnDefocusU"], table["rlnDefocusV"], table["rlnDefocusAngle"]), m)
        table["rlnDefocusU"], table["rlnDefocusV"], table["rlnDefocusAngle"] = (
            values_of_form(form))
    write_particles(d / "run_data.star",
                    optics.drop(columns=[c for c in ABERRATION_LABELS if c in optics]), table)
    for h in (1, 2):
        write_map(d / f"run_half{h}_class001_unfil.mrc", truth, PIX)
    return images, true


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """Data with beam tilt and trefoil ('odd', ctf_refine --fit_beamtilt run on it), without
    ('none') and with a 1.5 % anisotropic magnification ('mag', --fit_aniso run on it)."""
    root = tmp_path_factory.mktemp("aberrations")
    truth = atoms.molecule_map("globular", BOX, PIX, 50.0)
    out = {"root": root, "truth": truth}
    out["odd"] = _refinement(root / "odd", truth, 300, 1, beam_tilt=TILT, odd_zernike=ODD)
    out["none"] = _refinement(root / "none", truth, 300, 2)
    out["mag"] = _refinement(root / "mag", truth, 150, 3, mag_matrix=M_TRUE)
    for case, option in (("odd", "--fit_beamtilt"), ("mag", "--fit_aniso")):
        assert main(["ctf_refine", "--i", str(root / case / "run_data.star"), "--o",
                     str(root / case / "CtfRefine"), "--particle_diameter", "120",
                     "--defocus_range", "100", option]) == 0
    return out


def _written_optics(runs: dict, case: str):
    return load_particles(runs["root"] / case / "CtfRefine" / "particles_ctf_refine.star")


def test_beam_tilt_and_trefoil_recovered(runs: dict) -> None:
    optics = read_star(runs["root"] / "odd" / "CtfRefine" / "particles_ctf_refine.star")[
        "optics"].iloc[0]
    tilt = np.array([optics["rlnBeamTiltX"], optics["rlnBeamTiltY"]])
    odd = np.array([float(v) for v in optics["rlnOddZernike"].strip("[]").split(",")])
    # measured errors 0.015, 0.006 mrad (seeds 11, 21 of the simulation: 0.020 at most);
    # margin 3x
    np.testing.assert_allclose(tilt, TILT, atol=0.06)
    # measured Z(3,3) 40.47-40.78 and Z(-3,3) 0.2-0.5 over 3 seeds (0.8 at most); margin 2.5x
    assert odd[5] == pytest.approx(TREFOIL, abs=2.0) and abs(odd[2]) < 2.0
    assert odd[3] == odd[4] == 0.0  # the Z(±1,3) terms are the beam tilt (RELION's layout)
    log = (runs["root"] / "odd" / "CtfRefine" / "ctf_refine.log").read_text()
    assert "rlnBeamTiltX/Y (" in log and "mrad" in log and "Z(3,3)" in log
    assert (runs["root"] / "odd" / "CtfRefine"
            / "beamtilt_delta-phase_optics-group_1.png").stat().st_size > 0


def test_written_star_has_the_true_phase(runs: dict) -> None:
    """Read back, the optics give the truth's odd phase over the fitted frequencies (beam tilt
    and rlnOddZernike together, each counted once)."""
    ky, kx = np.mgrid[-31:32, 0:32].reshape(2, -1).astype(float)
    keep = (np.hypot(kx, ky) >= 5) & (np.hypot(kx, ky) <= 31)
    kx, ky = kx[keep], ky[keep]
    particles = _written_optics(runs, "odd")
    got = particles.ctf_params([0]).odd_phase(kx, ky, BOX, PIX)[0]
    particles.close()
    x, y = kx / (BOX * PIX), ky / (BOX * PIX)
    want = tilt_phase(TILT, x, y) + odd_phase(ODD, x, y)
    err = got - want
    # measured RMS 0.0048 rad, largest 0.019 rad over 3 seeds (the truth's phase reaches
    # 1.5 rad); margin 3x
    assert np.sqrt(np.mean(err**2)) < 0.015 and np.abs(err).max() < 0.06
    assert np.abs(want).max() > 1.0


def test_fitted_optics_lower_the_residual(runs: dict) -> None:
    """Σ|X − prediction|² over the images (the simulator's forward model): with the fitted
    optics the excess over the true optics' residual is a small part of the zero optics'."""
    images, true = runs["odd"]
    particles = load_particles(runs["root"] / "odd" / "run_data.star")
    params = particles.ctf_params()
    particles.close()
    written = _written_optics(runs, "odd")
    fitted = written.ctf_params()
    written.close()
    angles = true[["rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi"]].to_numpy()
    origins = true[["rlnOriginXAngst", "rlnOriginYAngst"]].to_numpy() / PIX
    n = len(params)

    def residual(beam_tilt, odd_zernike) -> float:
        p = CtfParams(params.defocus_u, params.defocus_v, params.defocus_angle, KV, CS,
                      params.amplitude_contrast, beam_tilt=beam_tilt, odd_zernike=odd_zernike)
        pred = project_images(runs["truth"], angles, origins, ctf=p, pixel_size=PIX)
        return float(np.sum((images.astype(np.float64) - pred) ** 2))

    noise = residual(np.tile(TILT, (n, 1)), np.tile(ODD, (n, 1)))
    zero = residual(None, None) - noise
    excess = residual(fitted.beam_tilt, fitted.odd_zernike) - noise
    # measured: the zero optics add 3.1 % to the noise's residual; the fitted ones
    # -9e-5 .. 6e-6 of that (below the truth's: they fit some noise) over 3 seeds; margin 50x
    assert zero > 0.02 * noise and excess < 0.005 * zero, (excess, zero, noise)


def test_control_without_aberrations_fits_about_zero(runs: dict) -> None:
    particles = load_particles(runs["root"] / "none" / "run_data.star")
    truth = np.asarray(runs["truth"], np.float64)
    subset = particles.particles["rlnRandomSubset"].to_numpy()
    (fit,) = fit_odd_aberrations(particles, (truth, truth), subset, 30.0, 5, 31, 3)
    particles.close()
    # measured |tilt| 0.017 mrad and |trefoil| 0.8 at most over 3 seeds; margin 3x, 2.5x
    np.testing.assert_allclose(fit.beam_tilt, 0.0, atol=0.06)
    assert np.abs(fit.odd_zernike[[2, 5]]).max() < 2.0


def test_anisotropic_magnification_recovered(runs: dict) -> None:
    """--fit_aniso: the written matrix against the truth, and the defocus rewritten for it
    gives back the true astigmatism (the STAR held it as the micrographs show it)."""
    particles = _written_optics(runs, "mag")
    matrix = particles.aberrations()["mag_matrix"][0]
    table = particles.particles
    particles.close()
    # measured largest element error 1.9e-4 .. 4.6e-4 over 3 seeds, anisotropy 0.01487 ..
    # 0.01536 (true 0.015); margin 3x
    np.testing.assert_allclose(matrix, M_TRUE, atol=1.5e-3)
    sv = np.linalg.svd(matrix, compute_uv=False)
    assert sv[0] - sv[1] == pytest.approx(0.015, abs=1.1e-3)
    _, true = runs["mag"]
    start = read_star(runs["root"] / "mag" / "run_data.star")["particles"]

    def astigmatism(t) -> np.ndarray:
        d = defocus_form(t["rlnDefocusU"], t["rlnDefocusV"], t["rlnDefocusAngle"])
        return np.stack([0.5 * (d[:, 0, 0] - d[:, 1, 1]), d[:, 0, 1]], -1)

    before = np.sqrt(np.mean((astigmatism(start) - astigmatism(true)) ** 2))
    after = np.sqrt(np.mean((astigmatism(table) - astigmatism(true)) ** 2))
    # measured 151-158 -> 2.3-6.4 Å RMS per component over 3 seeds; margin 2.3x
    assert before > 100 and after < 15, (before, after)


def test_phase_fit_recovers_wrapped_phase() -> None:
    """Noise-free S = W exp(i φ), φ up to 4 rad at the edge (wrapped): the fit gives φ's
    coefficients, for N = 3 and for the beam-tilt-only basis of N = 1."""
    ky, kx = np.mgrid[-31:32, 0:32].reshape(2, -1).astype(float)
    r = np.hypot(kx, ky)
    keep = (r >= 3) & (r <= 31) & ~((kx == 0) & (ky < 0))
    x, y = kx[keep] / (BOX * PIX), ky[keep] / (BOX * PIX)
    basis = np.stack([z(x, y) for z in ODD_POLYNOMIALS])
    weight = np.random.default_rng(0).uniform(0.5, 2.0, x.size)
    for indices, coeffs in (([0, 1, 2, 3, 4, 5], [90.6, -111.6, 25.0, 43.8, -54.8, 70.0]),
                            ([0, 1, 3, 4], [90.6, -111.6, 43.8, -54.8])):
        phase = np.asarray(coeffs) @ basis[indices]
        assert np.abs(phase).max() > 3.5
        got = fit_odd_phase(weight * np.exp(1j * phase), basis[indices], r[keep])
        # measured 4e-12 at most (float rounding); margin 1e4
        np.testing.assert_allclose(got, coeffs, rtol=0, atol=1e-7)


def test_tilt_extraction_keeps_the_phase() -> None:
    """extract_beam_tilt: the tilt's closed-form phase plus the rest's polynomials is the
    total's, with the rest's Z(±1,3) zero (RELION's TiltHelper::extractTilt)."""
    total = np.array([5.0, -3.0, 2.0, 13.0, -22.0, 40.0])
    tilt, rest = extract_beam_tilt(total, CS, KV)
    x, y = np.random.default_rng(1).uniform(-0.25, 0.25, (2, 200))
    # measured 3e-15 rad (float rounding); margin 300x
    np.testing.assert_allclose(tilt_phase(tilt, x, y) + odd_phase(rest, x, y),
                               odd_phase(total, x, y), rtol=0, atol=1e-12)
    assert rest[3] == rest[4] == 0.0 and np.all(np.abs(tilt) > 0.5)


@pytest.mark.parametrize("value", ["0", "2", "9", "-1"])
def test_bad_odd_order(runs: dict, tmp_path: Path, capsys, value: str) -> None:
    out = tmp_path / "out"
    rc = main(["ctf_refine", "--i", str(runs["root"] / "none" / "run_data.star"), "--o",
               str(out), "--fit_beamtilt", "--odd_aberr_max_n", value])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "\n" not in err and "Traceback" not in err
    assert err.startswith("cryomap ctf_refine: error: --odd_aberr_max_n") and "1, 3, 5 or 7" in err
    assert not out.exists()
