"""Per-optics-group aberrations for `cryomap ctf_refine` (RELION's relion_ctf_refine
--fit_beamtilt and --fit_aniso; docs/method.md eqs. (33), (34)).

Odd aberrations (beam tilt, trefoil, ...). Per optics group, over its particles (each at its
pose against the projection A of its own half-set's map, the images corrected by the group's
current odd phase, C the current CTF with its even part and the particle's scale),

    S(k) = Σ_i conj(C_i A_i) X_i / σ²,   W(k) = Σ_i |C_i A_i|² / σ²,

RELION's per-pixel sums (TiltHelper::updateTiltShift). The change δφ(k) = Σ_j c_j Z_j(M k)
of the odd phase minimises Σ_k W |exp(i δφ) − S / W|² (RELION's TiltHelper::optimiseOddZernike),
i.e. maximises Σ_k |S| cos(δφ − arg S): a weighted linear fit of arg S as the start, then
Newton steps, first over the lower half of the frequencies and then over all (the phase is
small at low frequency, so the start is not wrapped). The new total (the group's rlnOddZernike
plus its beam tilt folded in, `ctf.beam_tilt_odd_zernike`, plus c) is written as RELION 3.1+
does (TiltHelper::extractTilt): the Z(±1,3) terms as rlnBeamTiltX/Y, the rest as rlnOddZernike
(its Z(±1,3) zero), so that reading both back gives the total once.

Anisotropic magnification. Per optics group the 2x2 matrix M (the reference sampled at A^T M k)
minimises Σ |X − C A(M k)|² / σ² with the CTF held as it is in the image (RELION's
MagnificationHelper): A(M k) is linearised in M, A((M + δM) k) ≈ A(M k) + Σ_ab ∂_a A(M k)
k_b δM_ab (∂A by central differences), the 4x4 normal equations summed over the group's
particles are solved, and this is repeated MAG_ITERATIONS times. As RELION does by default
(without --keep_astig), each particle's defocus is then rewritten for the new M so that its
CTF in the image stays the same (MagnificationHelper::adaptAstigmatism).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pandas as pd

from . import fourier, projector
from .ctf import CtfParams, beam_tilt_odd_zernike, magnified_rotations, odd_zernike_index
from .ctf_refine import _Correlations
from .em.data import ImageSource
from .particles import ParticleSet

#: Accepted --odd_aberr_max_n: the highest radial order n of the odd Zernike polynomials.
ODD_MAX_N = (1, 3, 5, 7)
#: Newton steps of the odd-phase fit per frequency range (it stops earlier when converged).
NEWTON_STEPS = 30
#: Linearise-and-solve rounds of the magnification fit.
MAG_ITERATIONS = 3
#: Half step (image pixels) of the central differences of the projection.
GRADIENT_STEP = 0.5
#: Shells below Nyquist the magnification fit leaves out.
MAG_EDGE = 2
_MAG_LABELS = ("rlnMagMat00", "rlnMagMat01", "rlnMagMat10", "rlnMagMat11")


@dataclass
class OddFit:
    """The odd-aberration fit of one optics group (0-based `group`)."""

    group: int
    n_particles: int
    indices: np.ndarray  # (K,) fitted polynomials, RELION's odd order (ctf.odd_zernike_index)
    change: np.ndarray  # (K,) radians, the fitted change of their coefficients
    beam_tilt: np.ndarray  # (2,) mrad, rlnBeamTiltX/Y to write
    odd_zernike: np.ndarray  # rlnOddZernike to write (Z(±1,3) zero: they are the tilt)
    coords: np.ndarray  # (J, 2) the pixels fitted (kx, ky) on the reference's grid
    box: int
    measured: np.ndarray  # (J,) arg S: the phase the images show, relative to the old model
    fitted: np.ndarray  # (J,) the fitted change of the phase there

    def change_tilt(self, cs: float, voltage: float) -> np.ndarray:
        """(2,) mrad: the beam tilt of the fitted change alone (its Z(±1,3) terms)."""
        full = np.zeros(max(6, int(self.indices.max()) + 1))
        full[self.indices] = self.change
        return extract_beam_tilt(full, cs, voltage)[0]


@dataclass
class MagFit:
    """The magnification fit of one optics group (0-based `group`)."""

    group: int
    n_particles: int
    start: np.ndarray  # (2, 2) the group's matrix before (identity when none)
    matrix: np.ndarray  # (2, 2) the fitted rlnMagMat

    @property
    def anisotropy(self) -> float:
        """Difference of the singular values of the fitted matrix (RELION's printout)."""
        sv = np.linalg.svd(self.matrix, compute_uv=False)
        return float(sv[0] - sv[1])

    @property
    def mean(self) -> float:
        """Mean of the singular values: the scale of the pixel size."""
        return float(np.linalg.svd(self.matrix, compute_uv=False).mean())


def odd_coefficient_count(max_n: int) -> int:
    """Number of odd Zernike polynomials with n <= max_n (RELION's numberOfOddCoeffs)."""
    return (max_n + 1) * (max_n + 3) // 4


def odd_basis_indices(max_n: int) -> np.ndarray:
    """Indices (RELION's odd order) of the polynomials fitted for --odd_aberr_max_n: all with
    n <= max_n; max_n = 1 is beam tilt alone, as RELION's fit below 3: Z(±1,1), Z(±1,3)."""
    if max_n not in ODD_MAX_N:
        raise ValueError(f"odd_aberr_max_n: expected one of {ODD_MAX_N}, got {max_n}")
    return np.array([0, 1, 3, 4]) if max_n == 1 else np.arange(odd_coefficient_count(max_n))


def odd_basis(indices: np.ndarray, coords: np.ndarray, box: int, pixel_size: float,
              mag_matrix: np.ndarray | None) -> np.ndarray:
    """(K, J) odd Zernike polynomials `indices` at pixels coords (J, 2) of a box, at the
    magnified frequency M s as the forward model has them (CtfParams.odd_phase)."""
    k = len(indices)
    unit = np.eye(int(max(indices)) + 1)[np.asarray(indices)]
    params = CtfParams(defocus_u=np.ones(k), defocus_v=np.ones(k), defocus_angle=np.zeros(k),
                       odd_zernike=unit,
                       mag_matrix=None if mag_matrix is None
                       else np.broadcast_to(mag_matrix, (k, 2, 2)))
    return params.odd_phase(coords[:, 0], coords[:, 1], box, pixel_size)


def extract_beam_tilt(coeffs: np.ndarray, cs: float, voltage: float
                      ) -> tuple[np.ndarray, np.ndarray]:
    """(tilt (2,) mrad, rest): odd coefficients (length >= 6) split as RELION's
    TiltHelper::extractTilt, the inverse of beam_tilt_odd_zernike: the tilt whose Z(±1,3)
    terms they hold, and the coefficients less that tilt's (Z(±1,3) then zero)."""
    c = np.asarray(coeffs, np.float64)
    per_mrad = beam_tilt_odd_zernike(1.0, 1.0, cs, voltage)  # linear in the tilt
    tilt = np.array([c[4] / per_mrad[4], c[3] / per_mrad[3]])
    rest = c.copy()
    rest[:6] -= beam_tilt_odd_zernike(tilt[0], tilt[1], cs, voltage)
    rest[3] = rest[4] = 0.0  # exactly, as RELION writes them
    return tilt, rest


def _wrap(phase: np.ndarray) -> np.ndarray:
    return np.angle(np.exp(1j * phase))


def _weighted_lsq(basis: np.ndarray, weight: np.ndarray, y: np.ndarray) -> np.ndarray:
    """c minimising Σ w (c·B − y)², columns scaled (the polynomials differ by orders of
    magnitude at frequencies in 1/Å)."""
    sw = np.sqrt(weight)
    design = (basis * sw).T
    scale = np.linalg.norm(design, axis=0)
    scale[scale == 0] = 1.0
    sol = np.linalg.lstsq(design / scale, sw * y, rcond=None)[0]
    return sol / scale


def _newton(c: np.ndarray, basis: np.ndarray, weight: np.ndarray, theta: np.ndarray,
            steps: int) -> np.ndarray:
    """Newton steps on f(c) = Σ w (1 − cos(c·B − θ)), each halved until f decreases; the
    Gauss-Newton matrix where the Hessian is not positive definite."""
    def f(x: np.ndarray) -> float:
        return float(np.sum(weight * (1.0 - np.cos(x @ basis - theta))))

    scale = np.sqrt((basis**2 * weight).sum(axis=1))
    scale[scale == 0] = 1.0
    bs = basis / scale[:, None]  # the same columns scaled
    value = f(c)
    for _ in range(steps):
        r = c @ basis - theta
        grad = bs @ (weight * np.sin(r))
        try:
            hess = (bs * (weight * np.cos(r))) @ bs.T
            np.linalg.cholesky(hess)
        except np.linalg.LinAlgError:
            hess = (bs * weight) @ bs.T
        step = -np.linalg.solve(hess, grad) / scale
        t = 1.0
        for _ in range(20):
            new = f(c + t * step)
            if new <= value:
                break
            t *= 0.5
        else:
            return c
        c, done = c + t * step, value - new <= 1e-12 * max(value, 1e-300)
        value = new
        if done:
            break
    return c


def fit_odd_phase(s: np.ndarray, basis: np.ndarray, shell: np.ndarray,
                  steps: int = NEWTON_STEPS) -> np.ndarray:
    """(K,) coefficients c maximising Σ_k |S_k| cos(Σ_j c_j B_jk − arg S_k) (module
    docstring): over shells <= half the largest, then 3/4 and all, each a weighted linear
    fit of the remaining (wrapped) phase and Newton steps."""
    weight, theta = np.abs(s), np.angle(s)
    c = np.zeros(basis.shape[0])
    top = float(shell.max())
    for limit in (0.5 * top, 0.75 * top, top):
        sel = shell <= limit
        if not np.any(weight[sel] > 0):
            continue
        b, w, th = basis[:, sel], weight[sel], theta[sel]
        c = c + _weighted_lsq(b, w, _wrap(th - c @ b))
        c = _newton(c, b, w, th, steps)
    return c


def _correlations(particles: ParticleSet, half_maps: tuple[np.ndarray, np.ndarray],
                  subset: np.ndarray, mask_radius_px: float, r_min: int, r_max: int
                  ) -> _Correlations:
    """The per-image statistics of fit_defocus over shells r_min..r_max (the references
    two shells wider: the magnification fit samples them at M k)."""
    source = ImageSource(particles, mask_radius_px, 5.0, use_ctf=True)
    mask = fourier.pixel_mask(source.box, r_max)
    use = np.flatnonzero(mask.shell >= r_min)
    refs = [projector.prepare_reference(m, 2, "linear", r_max + 2) for m in half_maps]
    return _Correlations(source, mask, use, particles, subset, refs)


def _group_members(particles: ParticleSet) -> list[tuple[int, np.ndarray]]:
    groups = particles.optics_group_index()
    return [(int(g), np.flatnonzero(groups == g)) for g in np.unique(groups)]


def _total_odd(params: CtfParams, length: int) -> np.ndarray:
    """The group's odd coefficients (length `length`) with its beam tilt folded in."""
    total = np.zeros(length)
    if params.odd_zernike is not None:
        old = np.asarray(params.odd_zernike, np.float64).reshape(-1)
        total[:old.size] += old
    if params.beam_tilt is not None:
        t = np.asarray(params.beam_tilt, np.float64).reshape(-1)
        total[:6] += beam_tilt_odd_zernike(t[0], t[1], float(np.ravel(params.cs)[0]),
                                           float(np.ravel(params.voltage)[0]))
    return total


def fit_odd_aberrations(particles: ParticleSet, half_maps: tuple[np.ndarray, np.ndarray],
                        subset: np.ndarray, mask_radius_px: float, r_min: int, r_max: int,
                        max_n: int = 3) -> list[OddFit]:
    """The odd aberrations of every optics group (module docstring), polynomials up to
    order max_n (ODD_MAX_N), against half map `subset[i]` (1 or 2) over shells
    r_min..r_max."""
    indices = odd_basis_indices(max_n)
    data = _correlations(particles, half_maps, subset, mask_radius_px, r_min, r_max)
    box, pix = data.source.box, data.source.pixel_size
    shell = data.mask.shell[data.use]
    fits = []
    for g, members in _group_members(particles):
        s = np.zeros(data.use.size, np.complex128)
        for _, batch, x, rot, w in data.batches(members):
            if batch.magnification is not None:
                rot = magnified_rotations(rot, batch.magnification)
            model = batch.ctf[:, data.use].astype(np.float64) * data.project(batch.indices, rot)
            s += np.sum(w * np.conj(model) * x, axis=0)
        params = particles.ctf_params(members[:1])
        mag = None if params.mag_matrix is None else np.asarray(params.mag_matrix)[0]
        basis = odd_basis(indices, data.coords, box, pix, mag)
        change = fit_odd_phase(s, basis, shell)
        old = 0 if params.odd_zernike is None else np.asarray(params.odd_zernike).shape[-1]
        total = _total_odd(params, max(6, old, int(indices.max()) + 1))
        total[indices] += change
        cs, kv = float(np.ravel(params.cs)[0]), float(np.ravel(params.voltage)[0])
        tilt, rest = extract_beam_tilt(total, cs, kv)
        keep = max(old, 2 if max_n == 1 else odd_coefficient_count(max_n))
        fits.append(OddFit(g, members.size, indices, change, tilt, rest[:keep], data.coords,
                           box, np.angle(s), change @ basis))
    return fits


def fit_magnification(particles: ParticleSet, half_maps: tuple[np.ndarray, np.ndarray],
                      subset: np.ndarray, mask_radius_px: float, r_min: int, r_max: int,
                      iterations: int = MAG_ITERATIONS) -> list[MagFit]:
    """The magnification matrix of every optics group (module docstring), against half map
    `subset[i]` (1 or 2) over shells r_min..r_max, the last MAG_EDGE shells below Nyquist
    left out (the map is zero beyond it: M k and the differences would leave it)."""
    box = particles.grid_box
    data = _correlations(particles, half_maps, subset, mask_radius_px, r_min,
                         max(r_min + 1, min(r_max, box // 2 - MAG_EDGE)))
    k = data.coords.astype(np.float64)
    fits = []
    for g, members in _group_members(particles):
        params = particles.ctf_params(members[:1])
        start = np.eye(2) if params.mag_matrix is None else np.asarray(params.mag_matrix)[0]
        m = start.copy()
        for _ in range(iterations):
            normal, rhs = np.zeros((4, 4)), np.zeros(4)
            for _, batch, x, rot, w in data.batches(members):
                ctf = batch.ctf[:, data.use].astype(np.float64)
                q = k @ m.T  # the map is sampled at A^T (M k)

                def proj(dq: tuple[float, float], rot=rot, batch=batch, q=q) -> np.ndarray:
                    return data.project(batch.indices, rot, q + np.array(dq)).astype(
                        np.complex128)

                h = GRADIENT_STEP
                grad = [(proj((h, 0.0)) - proj((-h, 0.0))) / (2 * h),
                        (proj((0.0, h)) - proj((0.0, -h))) / (2 * h)]
                resid = x - ctf * proj((0.0, 0.0))
                # d(model)/d M_ab = C ∂_a A(M k) k_b, ordered M00, M01, M10, M11
                jac = np.stack([ctf * grad[a] * k[:, b] for a in (0, 1) for b in (0, 1)])
                normal += np.einsum("ibj,kbj->ik", np.conj(jac) * w, jac).real
                rhs += np.einsum("ibj,bj->i", np.conj(jac) * w, resid).real
            m = m + np.linalg.solve(normal, rhs).reshape(2, 2)
        fits.append(MagFit(g, members.size, start, m))
    return fits


def transform_defocus(u: np.ndarray, v: np.ndarray, angle_deg: np.ndarray, t: np.ndarray
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(U, V, angle) whose defocus form D' = T^T D T, D the form of (u, v, angle): the CTF at
    M1 s with the new values equals the CTF at M0 s with the old ones for T = M0 M1^-1
    (RELION's adaptAstigmatism). D = [[m + c, s], [s, m − c]], (c, s) = (U − V)/2 (cos 2φ,
    sin 2φ), m = (U + V)/2, as ctf_refine's astigmatism components (eq. (32))."""
    u, v = np.asarray(u, np.float64), np.asarray(v, np.float64)
    phi = np.deg2rad(np.asarray(angle_deg, np.float64))
    mean, r = 0.5 * (u + v), 0.5 * (u - v)
    c, s = r * np.cos(2 * phi), r * np.sin(2 * phi)
    d = np.stack([np.stack([mean + c, s], -1), np.stack([s, mean - c], -1)], -2)
    d = np.einsum("ji,njk,kl->nil", t, d, t)
    mean, c, s = 0.5 * (d[:, 0, 0] + d[:, 1, 1]), 0.5 * (d[:, 0, 0] - d[:, 1, 1]), d[:, 0, 1]
    r = np.hypot(c, s)
    return mean + r, mean - r, np.rad2deg(0.5 * np.arctan2(s, c))


def _vector_text(values: np.ndarray) -> str:
    """A RELION vector value "[a,b,c]"."""
    return "[" + ",".join(f"{x:.10g}" for x in values) + "]"


def with_odd_aberrations(optics: pd.DataFrame, fits: list[OddFit]) -> pd.DataFrame:
    """The optics table with each fitted group's rlnBeamTiltX/Y and rlnOddZernike (groups
    not fitted keep theirs: 0 and [] where the columns are new)."""
    out = optics.copy()
    for label in ("rlnBeamTiltX", "rlnBeamTiltY"):
        if label not in out:
            out[label] = 0.0
    if "rlnOddZernike" not in out:
        out["rlnOddZernike"] = "[]"
    out["rlnOddZernike"] = out["rlnOddZernike"].astype(object)
    for fit in fits:
        out.loc[fit.group, "rlnBeamTiltX"] = fit.beam_tilt[0]
        out.loc[fit.group, "rlnBeamTiltY"] = fit.beam_tilt[1]
        out.loc[fit.group, "rlnOddZernike"] = _vector_text(fit.odd_zernike)
    return out


def with_magnification(optics: pd.DataFrame, table: pd.DataFrame, groups: np.ndarray,
                       fits: list[MagFit]) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(optics, particles): each fitted group's rlnMagMat00..11 (the identity for groups
    without any) and its particles' defocus rewritten for the new matrix
    (`transform_defocus`)."""
    optics, table = optics.copy(), table.copy()
    for i, label in enumerate(_MAG_LABELS):
        if label not in optics:
            optics[label] = float(np.eye(2).ravel()[i])
    u = table["rlnDefocusU"].to_numpy(np.float64).copy()
    v = (table["rlnDefocusV"].to_numpy(np.float64) if "rlnDefocusV" in table else u).copy()
    angle = (table["rlnDefocusAngle"].to_numpy(np.float64) if "rlnDefocusAngle" in table
             else np.zeros(u.size)).copy()
    for fit in fits:
        for i, label in enumerate(_MAG_LABELS):
            optics.loc[fit.group, label] = fit.matrix.ravel()[i]
        rows = np.flatnonzero(groups == fit.group)
        t = fit.start @ np.linalg.inv(fit.matrix)
        u[rows], v[rows], angle[rows] = transform_defocus(u[rows], v[rows], angle[rows], t)
    table["rlnDefocusU"], table["rlnDefocusV"], table["rlnDefocusAngle"] = u, v, angle
    return optics, table


def coefficient_names(indices: np.ndarray) -> list[str]:
    """'Z(m,n)' of each odd index, for the log."""
    return [f"Z({m},{n})" for m, n in (odd_zernike_index(int(i)) for i in indices)]
