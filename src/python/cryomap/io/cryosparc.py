"""cryoSPARC particle files (`.cs`) read as RELION particle tables (docs/conventions.md,
"cryoSPARC files").

A `.cs` file is a NumPy structured array (np.save format), one record per particle, with
fields named `<group>/<field>`. The fields read and their RELION equivalents:

  blob/path, blob/idx (0-based)       rlnImageName = f"{idx + 1}@{path}" (a leading ">" of
                                      exported files is dropped)
  blob/psize_A, blob/shape [ny, nx]   rlnImagePixelSize, rlnImageSize (optics table)
  ctf/accel_kv, ctf/cs_mm,            rlnVoltage, rlnSphericalAberration,
  ctf/amp_contrast                    rlnAmplitudeContrast (optics table)
  ctf/df1_A, ctf/df2_A                rlnDefocusU, rlnDefocusV
  ctf/df_angle_rad, ctf/phase_shift_rad   rlnDefocusAngle, rlnPhaseShift (degrees)
  ctf/scale, ctf/bfactor              rlnCtfScalefactor, rlnCtfBfactor
  ctf/exp_group_id                    one optics group per distinct (exposure group, pixel
                                      size, box, voltage, Cs, Q0)
  alignments3D/pose (axis-angle, rad) rlnAngleRot/Tilt/Psi: RELION's A = R(pose)^T, where
                                      R(v) is the right-handed rotation by |v| about v
  alignments3D/shift (px)             rlnOriginX/YAngst = shift * alignments3D/psize_A
                                      (blob/psize_A when absent); same sign
  alignments3D/split (0/1)            rlnRandomSubset (1/2)
  alignments3D/class (0-based)        rlnClassNumber (1-based)
  alignments3D/class_posterior        rlnMaxValueProbDistribution
  alignments2D/pose (rad), /shift     rlnAnglePsi, rlnOriginX/YAngst when there is no 3D pose
  location/micrograph_path            rlnMicrographName

The pose and shift conventions are those of the two public converters, pyem (csparc2star)
and cryoDRGN (parse_pose_csparc), which agree: both take the shift with the sign of
rlnOriginX/Y, and both use the transpose of the Rodrigues rotation of `pose` as RELION's
Euler matrix. Higher-order aberrations (ctf/tilt_A, ctf/trefoil_A, ctf/tetra_A,
ctf/anisomag, ctf/shift_A) and blob/sign are not converted (a note is logged when they are
non-zero).

Each conversion is owned here, by a table or a pair of inverse functions shared with the
writer (io.cryosparc_export, `cryomap export`): PARTICLE_FIELDS, OPTICS_FIELDS,
ALIGNMENT_FIELDS with to_relion / to_cryosparc, and rotvec_to_relion_euler /
relion_euler_to_rotvec.

Blob paths are relative to the cryoSPARC project folder: give it as `project_dir`. Without
it, a relative path is looked up relative to the working folder, then to the `.cs` file's
folder and then to the folder above it (cryoSPARC writes `<project>/<job>/<file>.cs`).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import InputError
from ..euler import euler_to_matrix, matrix_to_euler
from .mrc import check_pixel_size

__all__ = ["read_cs", "cs_to_relion", "load_cryosparc", "rotvec_to_matrix",
           "matrix_to_rotvec", "rotvec_to_relion_euler", "relion_euler_to_rotvec",
           "PARTICLE_FIELDS", "OPTICS_FIELDS", "ALIGNMENT_FIELDS", "to_relion", "to_cryosparc"]

PathLike = str | os.PathLike

_ABERRATION_FIELDS = ("ctf/tilt_A", "ctf/trefoil_A", "ctf/tetra_A", "ctf/anisomag",
                      "ctf/shift_A")

# Units of the one-to-one fields: "same" (no conversion), "radians" (RELION: degrees) and
# "index" (cryoSPARC 0-based, RELION 1-based).
#: Per-particle CTF fields -> (RELION particle label, unit).
PARTICLE_FIELDS = {
    "ctf/df1_A": ("rlnDefocusU", "same"),
    "ctf/df2_A": ("rlnDefocusV", "same"),
    "ctf/df_angle_rad": ("rlnDefocusAngle", "radians"),
    "ctf/phase_shift_rad": ("rlnPhaseShift", "radians"),
    "ctf/scale": ("rlnCtfScalefactor", "same"),
    "ctf/bfactor": ("rlnCtfBfactor", "same"),
}
#: CTF fields stored per particle by cryoSPARC and per optics group by RELION.
OPTICS_FIELDS = {
    "ctf/accel_kv": ("rlnVoltage", "same"),
    "ctf/cs_mm": ("rlnSphericalAberration", "same"),
    "ctf/amp_contrast": ("rlnAmplitudeContrast", "same"),
}
#: alignments3D/<name> and alignments2D/<name> fields besides pose and shift.
ALIGNMENT_FIELDS = {
    "split": ("rlnRandomSubset", "index"),
    "class_posterior": ("rlnMaxValueProbDistribution", "same"),
    "class": ("rlnClassNumber", "index"),
}


def to_relion(unit: str, values: np.ndarray) -> np.ndarray:
    """cryoSPARC values of a field of `unit` (PARTICLE_FIELDS, ...) in RELION's units."""
    v = np.asarray(values, np.float64)
    if unit == "radians":
        return np.rad2deg(v)
    if unit == "index":
        return v.astype(np.int64) + 1
    return v


def to_cryosparc(unit: str, values: np.ndarray) -> np.ndarray:
    """RELION values of a label of `unit` in cryoSPARC's units: the inverse of to_relion."""
    v = np.asarray(values, np.float64)
    if unit == "radians":
        return np.deg2rad(v)
    if unit == "index":
        return v.astype(np.int64) - 1
    return v


def read_cs(path: PathLike) -> np.ndarray:
    """The structured array of a `.cs` file (np.load, no pickles); InputError otherwise."""
    path = Path(path)
    if not path.exists():
        raise InputError(f"{path}: file not found")
    if not path.is_file():
        raise InputError(f"{path}: not a regular file")
    try:
        arr = np.load(path, allow_pickle=False)
    except Exception as e:  # np.load raises ValueError, OSError, EOFError, ... on bad files
        detail = " ".join(str(e).split())
        raise InputError(f"{path}: not a cryoSPARC .cs file ({type(e).__name__}: {detail})"
                         ) from None
    if not isinstance(arr, np.ndarray) or arr.dtype.names is None or arr.ndim != 1:
        raise InputError(f"{path}: not a cryoSPARC .cs file (expected a 1D structured "
                         f"array of particle records)")
    return arr


def rotvec_to_matrix(v: np.ndarray) -> np.ndarray:
    """Rodrigues: the right-handed rotation by angle |v| (radians) about axis v, (..., 3, 3)
    (equal to scipy's Rotation.from_rotvec(v).as_matrix())."""
    v = np.asarray(v, dtype=np.float64)
    theta = np.linalg.norm(v, axis=-1)
    safe = np.where(theta > 0, theta, 1.0)
    k = v / safe[..., None]
    kx, ky, kz = k[..., 0], k[..., 1], k[..., 2]
    zero = np.zeros_like(kx)
    kmat = np.stack([np.stack([zero, -kz, ky], -1), np.stack([kz, zero, -kx], -1),
                     np.stack([-ky, kx, zero], -1)], -2)
    s = np.sin(theta)[..., None, None]
    c = (1.0 - np.cos(theta))[..., None, None]
    return np.eye(3) + s * kmat + c * (kmat @ kmat)


def matrix_to_rotvec(m: np.ndarray) -> np.ndarray:
    """Inverse of rotvec_to_matrix: the axis-angle vector (..., 3), angle in [0, pi], of
    rotation matrices (..., 3, 3) (equal to scipy's Rotation.from_matrix(m).as_rotvec(),
    up to the sign of v at angle pi). Through the unit quaternion, taken from the largest
    of its four candidate components, which stays accurate near angle pi."""
    m = np.asarray(m, dtype=np.float64)
    tr = np.trace(m, axis1=-2, axis2=-1)
    diag = np.diagonal(m, axis1=-2, axis2=-1)
    choice = np.argmax(np.concatenate([diag, tr[..., None]], axis=-1), axis=-1)
    # (x, y, z, w) unnormalised: from w when the trace is largest ...
    q = np.stack([m[..., 2, 1] - m[..., 1, 2], m[..., 0, 2] - m[..., 2, 0],
                  m[..., 1, 0] - m[..., 0, 1], 1.0 + tr], axis=-1)
    for i in range(3):  # ... else from the largest of x, y, z
        j, k = (i + 1) % 3, (i + 2) % 3
        qi = np.empty_like(q)
        qi[..., i] = 1.0 - tr + 2.0 * m[..., i, i]
        qi[..., j] = m[..., j, i] + m[..., i, j]
        qi[..., k] = m[..., k, i] + m[..., i, k]
        qi[..., 3] = m[..., k, j] - m[..., j, k]
        q = np.where((choice == i)[..., None], qi, q)
    q = q / np.linalg.norm(q, axis=-1, keepdims=True)
    q = np.where(q[..., 3:] < 0, -q, q)  # w >= 0: angle in [0, pi]
    s = np.linalg.norm(q[..., :3], axis=-1)  # sin(angle / 2)
    angle = 2.0 * np.arctan2(s, q[..., 3])
    # angle / sin(angle / 2), with its series near 0
    scale = np.where(s > 1e-8, angle / np.where(s > 1e-8, s, 1.0), 2.0 + angle**2 / 12.0)
    return q[..., :3] * scale[..., None]


def rotvec_to_relion_euler(pose: np.ndarray) -> np.ndarray:
    """cryoSPARC alignments3D/pose (n, 3) -> RELION (rot, tilt, psi) in degrees, (n, 3):
    RELION's A = R(pose)^T (docs/conventions.md, "cryoSPARC files")."""
    a = np.swapaxes(rotvec_to_matrix(np.asarray(pose, np.float64).reshape(-1, 3)), -1, -2)
    return np.stack(matrix_to_euler(a), axis=1)


def relion_euler_to_rotvec(angles: np.ndarray) -> np.ndarray:
    """RELION (rot, tilt, psi) in degrees (n, 3) -> cryoSPARC alignments3D/pose (n, 3): the
    inverse of rotvec_to_relion_euler, pose = rotvec(A^T)."""
    ang = np.asarray(angles, np.float64).reshape(-1, 3)
    a = euler_to_matrix(ang[:, 0], ang[:, 1], ang[:, 2])
    return matrix_to_rotvec(np.swapaxes(a, -1, -2))


def _field(cs: np.ndarray, name: str) -> np.ndarray:
    return np.asarray(cs[name])


def _numbers(cs: np.ndarray, name: str, where: str, shape: tuple[int, ...] = ()
             ) -> np.ndarray:
    """A numeric field as float64 (n, *shape), finite, or InputError naming the record."""
    a = _field(cs, name)
    if a.dtype.kind not in "iuf" or a.shape[1:] != shape:
        raise InputError(f"{where}: field {name} has type {a.dtype} and shape {a.shape[1:]}; "
                         f"expected numbers of shape {shape}")
    a = a.astype(np.float64)
    bad = ~np.isfinite(a).reshape(len(a), -1).all(axis=1)
    if np.any(bad):
        r = int(np.argmax(bad))
        raise InputError(f"{where}, record {r + 1}: {name} = {a[r]}; expected finite numbers")
    return a


def _text(cs: np.ndarray, name: str) -> np.ndarray:
    a = _field(cs, name)
    if a.dtype.kind == "S":
        return np.char.decode(a, "utf-8", errors="replace").astype(str)
    return a.astype(str)


def cs_to_relion(cs: np.ndarray, where: str, angpix: float | None = None,
                 notes: list[str] | None = None) -> tuple[pd.DataFrame, pd.DataFrame]:
    """(optics, particles) RELION 3.1 tables of a cryoSPARC particle array (see the module
    docstring for the mapping). `where` names the file in messages; `notes` collects what
    was not converted."""
    notes = [] if notes is None else notes
    names = set(cs.dtype.names or ())
    n = len(cs)
    if n == 0:
        raise InputError(f"{where}: no particles (0 records)")
    for f in ("blob/path", "blob/idx"):
        if f not in names:
            raise InputError(f"{where}: no {f} field; expected a particle .cs file "
                             f"(blob/path, blob/idx: the particle images)")
    paths = pd.Series(_text(cs, "blob/path")).str.strip()
    paths = paths.where(~paths.str.startswith(">"), paths.str[1:])
    idx = _numbers(cs, "blob/idx", where)
    bad = (idx < 0) | (idx != np.round(idx)) | (paths == "").to_numpy()
    if np.any(bad):
        r = int(np.argmax(bad))
        raise InputError(f"{where}, record {r + 1}: blob/idx = {idx[r]:g}, blob/path = "
                         f"{paths.iloc[r]!r}; expected a 0-based image index and a path")
    parts: dict[str, object] = {
        "rlnImageName": [f"{int(i) + 1:06d}@{p}" for i, p in zip(idx, paths, strict=True)]}
    if "location/micrograph_path" in names:
        parts["rlnMicrographName"] = _text(cs, "location/micrograph_path")

    # pixel size and box
    if angpix is not None:
        pix = np.full(n, float(angpix))
    elif "blob/psize_A" in names:
        pix = _numbers(cs, "blob/psize_A", where)
        for r in np.flatnonzero((pix < 0.1) | (pix > 100))[:1]:
            check_pixel_size(pix[r], f"{where}, record {r + 1}: blob/psize_A")
    else:
        raise InputError(f"{where}: no blob/psize_A field; expected the pixel size, or give "
                         f"--angpix")
    if "blob/shape" in names:
        shape = _numbers(cs, "blob/shape", where, (2,))
        bad = (shape[:, 0] != shape[:, 1]) | (shape[:, 0] < 1)
        if np.any(bad):
            r = int(np.argmax(bad))
            raise InputError(f"{where}, record {r + 1}: blob/shape = {shape[r].astype(int)}; "
                             f"expected square images")
        box = shape[:, 0].astype(np.int64)
    else:
        box = np.zeros(n, np.int64)  # filled from the stack headers by the caller

    # CTF
    has_ctf = "ctf/df1_A" in names
    optics_vals: dict[str, np.ndarray] = {}
    if has_ctf:
        for f, (label, unit) in PARTICLE_FIELDS.items():
            if f in names:
                parts[label] = to_relion(unit, _numbers(cs, f, where))
        for f, (label, unit) in OPTICS_FIELDS.items():
            if f not in names:
                raise InputError(f"{where}: no {f} field; expected it with the CTF (ctf/df1_A)")
            optics_vals[label] = to_relion(unit, _numbers(cs, f, where))
        for f in _ABERRATION_FIELDS:
            if f in names and np.any(_numbers(cs, f, where, _field(cs, f).shape[1:]) != 0):
                notes.append(f"{where}: {f} is non-zero and not converted (cryomap reads "
                             f"only the CTF fields listed in docs/conventions.md)")
    exp_group = (_numbers(cs, "ctf/exp_group_id", where) if "ctf/exp_group_id" in names
                 else np.zeros(n))

    parts.update(_alignments(cs, where, pix))

    # optics groups: one per distinct (exposure group, pixel size, box, kV, Cs, Q0)
    keys = pd.DataFrame({"exp": exp_group, "pix": np.round(pix, 6), "box": box,
                         **optics_vals})
    group = keys.groupby(list(keys.columns), sort=False).ngroup().to_numpy()
    n_groups = int(group.max()) + 1
    first = np.array([int(np.argmax(group == g)) for g in range(n_groups)])
    optics = pd.DataFrame({
        "rlnOpticsGroupName": [f"opticsGroup{g + 1}" for g in range(n_groups)],
        "rlnOpticsGroup": np.arange(1, n_groups + 1),
    })
    for label, v in optics_vals.items():
        optics[label] = v[first]
    optics["rlnImagePixelSize"] = np.round(pix[first], 6)
    optics["rlnImageSize"] = box[first]
    optics["rlnImageDimensionality"] = 2
    parts["rlnOpticsGroup"] = group + 1
    particles = pd.DataFrame(parts, index=pd.RangeIndex(n))
    return optics, particles


def _alignments(cs: np.ndarray, where: str, pix: np.ndarray) -> dict[str, np.ndarray]:
    """RELION's pose, origin, class and half-set columns of the alignments3D (else
    alignments2D) fields, where present; shifts in px of alignments's psize_A (else `pix`)."""
    names = set(cs.dtype.names or ())
    parts: dict[str, np.ndarray] = {}
    if "alignments3D/pose" in names:
        ang = rotvec_to_relion_euler(_numbers(cs, "alignments3D/pose", where, (3,)))
        prefix = "alignments3D/"
        parts.update(rlnAngleRot=ang[:, 0], rlnAngleTilt=ang[:, 1], rlnAnglePsi=ang[:, 2])
    elif "alignments2D/pose" in names:
        prefix = "alignments2D/"
        parts["rlnAnglePsi"] = to_relion("radians", _numbers(cs, "alignments2D/pose", where))
    else:
        return parts
    if prefix + "shift" in names:
        shift_pix = (_numbers(cs, prefix + "psize_A", where) if prefix + "psize_A" in names
                     else pix)
        sh = _numbers(cs, prefix + "shift", where, (2,))
        parts["rlnOriginXAngst"] = sh[:, 0] * shift_pix
        parts["rlnOriginYAngst"] = sh[:, 1] * shift_pix
    if prefix + "split" in names:
        split = _numbers(cs, prefix + "split", where)
        bad = ~np.isin(split, (0.0, 1.0))
        if np.any(bad):
            r = int(np.argmax(bad))
            raise InputError(f"{where}, record {r + 1}: {prefix}split = {split[r]:g}; "
                             f"expected 0 or 1")
    for name, (label, unit) in ALIGNMENT_FIELDS.items():
        if prefix + name in names:
            parts[label] = to_relion(unit, _numbers(cs, prefix + name, where))
    return parts


def cs_search_dirs(cs_path: PathLike, project_dir: PathLike | None = None) -> list[Path]:
    """Folders blob paths are looked up in: project_dir alone when given, else the working
    folder, the .cs file's folder and the folder above it."""
    if project_dir is not None:
        d = Path(project_dir)
        if not d.is_dir():
            raise InputError(f"{d}: cryoSPARC project folder not found (--cs_project_dir)")
        return [d.absolute()]
    folder = Path(cs_path).absolute().parent
    return list(dict.fromkeys([Path.cwd(), folder, folder.parent]))


def load_cryosparc(path: PathLike, project_dir: PathLike | None = None,
                   angpix: float | None = None,
                   log: Callable[[str], None] | None = print):
    """A ParticleSet of a cryoSPARC `.cs` particle file (use particles.load_particles, which
    dispatches on the suffix). project_dir: the cryoSPARC project folder the blob paths are
    relative to (see cs_search_dirs)."""
    from ..particles import ParticleSet, _check_loaded
    from .relion import stack_box

    path = Path(path)
    cs = read_cs(path)
    notes: list[str] = []
    optics, particles = cs_to_relion(cs, str(path), angpix=angpix, notes=notes)
    dirs = cs_search_dirs(path, project_dir)
    if np.any(optics["rlnImageSize"].to_numpy() == 0):
        groups = particles["rlnOpticsGroup"].to_numpy() - 1
        optics["rlnImageSize"] = [
            stack_box(path, particles["rlnImageName"], int(np.argmax(groups == g)), dirs,
                       "no blob/shape field to give the box size")
            for g in range(len(optics))]
    ps = ParticleSet(optics=optics, particles=particles, star_path=path, search_dirs=dirs,
                     notes=notes)
    _check_loaded(ps)
    if log is not None:
        for note in notes:
            log(note)
    return ps
