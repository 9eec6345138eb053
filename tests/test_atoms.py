"""Pseudo-atomic test molecules (cryomap.atoms): protein-like geometry, exact point-group
symmetry, and density maps that equal the analytic sum of Gaussian atoms out to Nyquist."""

import numpy as np
import pytest

from cryomap import atoms, fourier
from cryomap.resolution import fsc_maps
from cryomap.symmetry import symmetrize_volume


def _analytic_map(a: atoms.Atoms, box: int, pix: float, bfactor: float) -> np.ndarray:
    """The same Gaussians summed in Fourier space (no sampling of real space at all):
    F(q) = sum_a w_a exp(-B q^2 / 4) exp(-2 pi i q . x_a), q in 1/Å, on the box's grid."""
    kz, ky, kx = fourier.half_volume_freqs(box)
    q = np.stack([kx, ky, kz], -1).reshape(-1, 3) / (box * pix)
    ft = np.zeros(q.shape[0], np.complex128)
    for x, w in zip(a.xyz, a.weight, strict=True):
        ft += w * np.exp(-2j * np.pi * (q @ x))
    ft *= np.exp(-(atoms.ATOM_B + bfactor) * (q * q).sum(1) / 4.0)
    return fourier.ifft3_centered(ft.reshape(kz.shape), box)


def test_density_map_is_the_analytic_sum_out_to_nyquist():
    """A few atoms anywhere in the box: the rendered map (oversampled, Fourier-cropped)
    correlates with the analytic one at every shell up to Nyquist (no aliasing), at B 0 and
    50 (the oversampling adapts to the atom width)."""
    rng = np.random.default_rng(0)
    a = atoms.Atoms(rng.uniform(-12.0, 12.0, (6, 3)), rng.uniform(0.5, 1.5, 6))
    for bfactor, pix in ((0.0, 1.0), (50.0, 1.5)):
        box = 32
        got = atoms.density_map(a, box, pix, bfactor).astype(np.float64)
        expect = _analytic_map(a, box, pix, bfactor)
        curve = fsc_maps(got, expect)
        # measured: 1 - 4.3e-9 or closer at every shell below Nyquist; 23x margin on the deficit
        assert curve[1:box // 2].min() > 1.0 - 1e-7, (bfactor, curve.min())


def test_helix_geometry():
    """An ideal alpha helix: backbone bonds of 1.2-1.5 Å, CA-CA 3.8 Å, 1.5 Å rise per
    residue along the axis, about 7.5 heavy atoms per residue with the side chains."""
    rng = np.random.default_rng(1)
    n = 40
    h = atoms.helix(n, (0.0, 0.0, 0.0), (0.0, 0.0, 1.0), rng)
    ca = h.xyz[n:2 * n]  # N, CA, C, O blocks, then side chains
    d = np.linalg.norm(np.diff(ca, axis=0), axis=1)
    np.testing.assert_allclose(d, 3.8, atol=0.035)  # measured 0.030 Å; margin 17%
    # measured 0; the bound allows float64 rounding of z up to 60 Å
    np.testing.assert_allclose(np.diff(ca[:, 2]), atoms.HELIX_RISE, rtol=0, atol=1e-12)
    n_atoms, ca_atoms, c_atoms = h.xyz[:n], ca, h.xyz[2 * n:3 * n]
    for a, b in ((n_atoms, ca_atoms), (ca_atoms, c_atoms)):
        # measured 0.016 Å (N-CA 1.486 Å, CA-C 1.462 Å); margin 28%
        assert np.all(np.abs(np.linalg.norm(a - b, axis=1) - 1.47) < 0.02)
    assert 7.0 < h.n_atoms / n < 9.0  # measured 8.03; margins 12-13%


def test_octahedral_shell_is_exactly_symmetric_and_clash_free_between_subunits():
    a = atoms.octahedral_shell(0, radius=32.0, helix_residues=16)
    assert a.n_atoms % 24 == 0
    unit = a.xyz[: a.n_atoms // 24]
    others = a.xyz[a.n_atoms // 24:]
    d2 = ((unit[:, None, :] - others[None, :, :]) ** 2).sum(-1)
    assert np.sqrt(d2.min()) >= 3.0  # clash-free by definition: measured 3.16 Å
    v = atoms.density_map(a, 48, 2.5, 30.0).astype(np.float64)
    # measured: correlation 1 - 2.6e-5 with its O average (interpolation of the rotations);
    # margin 3.8x on the deficit
    assert np.corrcoef(v.ravel(), symmetrize_volume(v, "O").ravel())[0, 1] > 0.9999


def test_globular_is_chiral_and_protein_sized():
    g = atoms.globular(0)
    assert 8000 < g.n_atoms < 11000  # about 1000 residues: measured 9291; margins 14-18%
    r = np.linalg.norm(g.xyz, axis=1)
    assert r.max() < 70.0  # measured 65.6 Å; margin 7%
    np.testing.assert_allclose(g.xyz.mean(0), 0.0, atol=3e-13)  # measured 1.6e-14 Å; 18x
    v = atoms.density_map(g, 48, 3.0, 50.0).astype(np.float64)
    # measured 0.35-0.5 for the mirror image (any of its three axis flips) against 1; the two
    # flips here: 0.413 at most; margin 21%
    assert max(np.corrcoef(v.ravel(), v[::-1].ravel())[0, 1],
               np.corrcoef(v.ravel(), v[:, ::-1].ravel())[0, 1]) < 0.5


def test_bfactor_attenuates_the_transform_as_exp_minus_b_q2_over_4():
    """Between two B-factors each Fourier component is scaled by exp(-dB q^2 / 4) (up to the
    maps' max-scaling): the B-factor is applied to every atom exactly."""
    a = atoms.octahedral_shell(0, radius=32.0, helix_residues=16)
    box, pix = 48, 2.5
    ft = [fourier.fft3_centered(atoms.density_map(a, box, pix, b).astype(np.float64))
          for b in (20.0, 60.0)]
    kz, ky, kx = fourier.half_volume_freqs(box)
    q2 = (kx**2 + ky**2 + kz**2) / (box * pix) ** 2
    strong = (np.abs(ft[0]) > 1e-3 * np.abs(ft[0]).max()) & (q2 < (0.5 / pix) ** 2)
    ratio = ft[1][strong] / ft[0][strong] / np.exp(-40.0 * q2[strong] / 4.0)
    ratio /= np.median(ratio.real)
    # measured: within 6.5e-5 of 1 (float32 maps); margin 1.5x
    np.testing.assert_allclose(ratio, 1.0, atol=1e-4)


def test_molecule_map_checks_its_name():
    with pytest.raises(ValueError, match="molecule"):
        atoms.molecule_map("ribosome", 32, 3.0)
