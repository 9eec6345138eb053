"""RELION particle tables written as cryoSPARC particle files (`.cs`): the inverse of the
reader io.cryosparc (docs/conventions.md, "cryoSPARC files"), with its conversions
(PARTICLE_FIELDS, OPTICS_FIELDS, ALIGNMENT_FIELDS, to_cryosparc, relion_euler_to_rotvec).

The file is what cryoSPARC and cryosparc-tools (`Dataset.load`) read: a 1D NumPy structured
array saved with np.save into an open file (so that no `.npy` is appended to the name), one
record per particle, with cryoSPARC's field names and types (float32 numbers, uint32 indices,
fixed-length byte strings, uint64 uid). Fields written, in this order:

  uid                                  random unique uint64, as cryoSPARC draws them
  blob/path, blob/idx                  rlnImageName "n@path": path as written, idx = n - 1
  blob/shape, blob/psize_A             [box, box], pixel size of the optics group
  blob/sign                            +1 (RELION particles are white)
  ctf/type, ctf/exp_group_id           "imported", rlnOpticsGroup      } only with
  ctf/accel_kv, cs_mm, amp_contrast    the optics group's values       } rlnDefocusU
  ctf/df1_A, df2_A, df_angle_rad,      rlnDefocusU/V, rlnDefocusAngle, }
  ctf/phase_shift_rad, scale, bfactor  rlnPhaseShift, rlnCtfScalefactor, rlnCtfBfactor
  alignments3D/ (rlnAngleRot or rlnAngleTilt present; alignments2D/ with rlnAnglePsi alone):
    split                              rlnRandomSubset - 1 (when present)
    shift, pose, psize_A               rlnOriginX/YAngst / pixel size; pose (A = R(pose)^T;
                                       2D: psi in radians); the pixel size
    class_posterior, class             rlnMaxValueProbDistribution, rlnClassNumber - 1
                                       (when present)
  location/micrograph_path             rlnMicrographName (when present)

RELION's defaults fill absent CTF labels (angle, phase shift and B-factor 0, scale 1, Q0
0.1). Every other label is left out, and listed in a note.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ..errors import InputError
from .atomic import atomic_path
from .cryosparc import (
    ALIGNMENT_FIELDS,
    OPTICS_FIELDS,
    PARTICLE_FIELDS,
    relion_euler_to_rotvec,
    to_cryosparc,
)
from .star import numeric_column

if TYPE_CHECKING:
    from ..particles import ParticleSet

__all__ = ["particles_to_cs", "write_cs", "export_cryosparc", "CS_SUFFIX"]

PathLike = str | os.PathLike

#: Suffix of cryoSPARC particle files.
CS_SUFFIX = ".cs"
#: RELION labels -> the CtfParams attribute (ParticleSet.ctf_params) that holds them.
_CTF_ATTRIBUTES = {"rlnDefocusU": "defocus_u", "rlnDefocusV": "defocus_v",
                   "rlnDefocusAngle": "defocus_angle", "rlnPhaseShift": "phase_shift",
                   "rlnCtfScalefactor": "scale", "rlnCtfBfactor": "bfactor",
                   "rlnVoltage": "voltage", "rlnSphericalAberration": "cs",
                   "rlnAmplitudeContrast": "amplitude_contrast"}
#: Ranges of the ALIGNMENT_FIELDS labels (RELION's units); indices are whole numbers.
_ALIGNMENT_RANGES = {"rlnRandomSubset": (1, 2), "rlnClassNumber": (1, 2**32),
                     "rlnMaxValueProbDistribution": (0.0, 1.0)}
#: Optics labels whose values are written (per particle).
_OPTICS_WRITTEN = {"rlnOpticsGroup", "rlnImagePixelSize", "rlnImageSize",
                   "rlnImageDimensionality"} | {lab for lab, _ in OPTICS_FIELDS.values()}

Column = tuple[str, str, np.ndarray]  # (field, dtype, values (n, ...))


def _bytes(values) -> tuple[str, np.ndarray]:
    """Text as UTF-8 fixed-length bytes (np.save writes no Python objects): (dtype, array)."""
    b = [str(v).encode("utf-8") for v in values]
    dt = f"S{max(1, max((len(x) for x in b), default=1))}"
    return dt, np.array(b, dtype=dt)


def _uids(n: int, rng: np.random.Generator) -> np.ndarray:
    """n distinct random uint64 uids (cryoSPARC draws them at random over 0..2^64)."""
    uids = rng.integers(0, 2**64, n, dtype=np.uint64)
    while True:
        _, first = np.unique(uids, return_index=True)
        if first.size == n:
            return uids
        dup = np.setdiff1d(np.arange(n), first)
        uids[dup] = rng.integers(0, 2**64, dup.size, dtype=np.uint64)


def _checked(ps: ParticleSet, label: str) -> np.ndarray:
    """An ALIGNMENT_FIELDS label's values, finite and within _ALIGNMENT_RANGES."""
    where = f"{ps.star_path}: data_particles"
    v = numeric_column(ps.particles, label, where)
    lo, hi = _ALIGNMENT_RANGES[label]
    bad = (v < lo) | (v > hi)
    if isinstance(lo, int):
        bad |= v != np.round(v)
    if np.any(bad):
        r = int(np.argmax(bad))
        kind = "a whole number" if isinstance(lo, int) else "a number"
        raise InputError(f"{where}, row {r + 1}: {label} = {v[r]:g}; expected {kind} in "
                         f"[{lo:g}, {hi:g}]")
    return v


def _alignments(ps: ParticleSet) -> tuple[list[Column], set[str]]:
    """alignments3D/ (or alignments2D/) columns and the RELION labels they hold."""
    labels = set(ps.particles.columns)
    three_d = bool(labels & {"rlnAngleRot", "rlnAngleTilt"})
    if not three_d and "rlnAnglePsi" not in labels:
        return [], set()
    prefix = "alignments3D/" if three_d else "alignments2D/"
    ang = ps.angles()
    if three_d:
        pose: Column = (prefix + "pose", "<f4", relion_euler_to_rotvec(ang))
    else:
        pose = (prefix + "pose", "<f4", to_cryosparc("radians", ang[:, 2]))
    extra = {name: (label, unit) for name, (label, unit) in ALIGNMENT_FIELDS.items()
             if label in labels}
    cols: list[Column] = []
    if "split" in extra:
        label, unit = extra.pop("split")
        cols.append((prefix + "split", "<u4", to_cryosparc(unit, _checked(ps, label))))
    cols += [(prefix + "shift", "<f4", ps.origins_px()), pose,
             (prefix + "psize_A", "<f4", ps.particle_pixel_sizes())]
    for name, (label, unit) in extra.items():  # class_posterior, class
        dt = "<u4" if unit == "index" else "<f4"
        cols.append((prefix + name, dt, to_cryosparc(unit, _checked(ps, label))))
    used = {"rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi", "rlnOriginXAngst",
            "rlnOriginYAngst"} | {lab for lab, _ in ALIGNMENT_FIELDS.values()}
    return cols, used & labels


def particles_to_cs(ps: ParticleSet, rng: np.random.Generator | None = None
                    ) -> tuple[np.ndarray, list[str]]:
    """(structured array, notes) of a ParticleSet (particles.load_particles): the cryoSPARC
    records of its particles (see the module docstring) and one note per table listing the
    labels not written. Every value is checked first (InputError naming file, row, label).
    rng: draws the uids (default: fresh entropy, as cryoSPARC)."""
    from ..particles import _parse_image_names

    rng = np.random.default_rng() if rng is None else rng
    n = ps.n_particles
    labels = set(ps.particles.columns)
    idx, codes, files = _parse_image_names(ps.particles["rlnImageName"], str(ps.star_path))
    path_dt, paths = _bytes(np.asarray(files, dtype=object)[codes])
    box = ps.particle_boxes()
    cols: list[Column] = [
        ("uid", "<u8", _uids(n, rng)),
        ("blob/path", path_dt, paths),
        ("blob/idx", "<u4", idx),
        ("blob/shape", "<u4", np.stack([box, box], axis=1)),
        ("blob/psize_A", "<f4", ps.particle_pixel_sizes()),
        ("blob/sign", "<f4", np.ones(n)),
    ]
    written = {"rlnImageName", "rlnOpticsGroup"}
    if ps.has_ctf:
        ctf = ps.ctf_params()  # checked, RELION's defaults for absent labels
        type_dt, ctf_type = _bytes(["imported"] * n)
        cols += [("ctf/type", type_dt, ctf_type),
                 ("ctf/exp_group_id", "<u4", ps.optics_group_index() + 1)]
        for f, (label, unit) in {**OPTICS_FIELDS, **PARTICLE_FIELDS}.items():
            v = np.broadcast_to(getattr(ctf, _CTF_ATTRIBUTES[label]), (n,))
            cols.append((f, "<f4", to_cryosparc(unit, v)))
        written |= {lab for lab, _ in PARTICLE_FIELDS.values()}
    align, used = _alignments(ps)
    cols += align
    written |= used
    if "rlnMicrographName" in labels:
        mic_dt, mics = _bytes(ps.particles["rlnMicrographName"])
        cols.append(("location/micrograph_path", mic_dt, mics))
        written.add("rlnMicrographName")
    arr = _records(cols, n, str(ps.star_path))
    notes = []
    for block, left in (("data_particles", sorted(labels - written)),
                        ("data_optics", sorted(set(ps.optics.columns) - _OPTICS_WRITTEN))):
        if left:
            notes.append(f"{ps.star_path}: {block} labels left out (no cryoSPARC field is "
                         f"written for them; docs/conventions.md): {', '.join(left)}")
    return arr, notes


def _records(cols: list[Column], n: int, where: str) -> np.ndarray:
    """The structured array of the columns; InputError for a number float32 cannot hold."""
    dtype = [(f, dt, v.shape[1:]) if np.ndim(v) > 1 else (f, dt) for f, dt, v in cols]
    arr = np.zeros(n, dtype=dtype)
    for f, dt, v in cols:
        if dt == "<f4":
            with np.errstate(over="ignore"):
                v32 = np.asarray(v, np.float64).astype(np.float32)
            bad = ~np.isfinite(v32).reshape(n, -1).all(axis=1)
            if np.any(bad):
                r = int(np.argmax(bad))
                raise InputError(f"{where}: particle {r + 1}: {f} = {np.asarray(v)[r]}; "
                                 f"expected finite numbers within float32's range")
            v = v32
        arr[f] = v
    return arr


def write_cs(path: PathLike, records: np.ndarray) -> Path:
    """Write a `.cs` file atomically: np.save format into the open file (np.save given a
    name would append `.npy`), no pickled objects."""
    path = Path(path)
    with atomic_path(path) as tmp, open(tmp, "wb") as f:
        np.save(f, records, allow_pickle=False)
    return path


def export_cryosparc(star: PathLike, out: PathLike,
                     log: Callable[[str], None] | None = print,
                     rng: np.random.Generator | None = None) -> np.ndarray:
    """Read the RELION particle file `star` (particles.load_particles; its stacks need not
    exist) and write its particles to the cryoSPARC file `out` (a name ending in .cs; its
    folder is created once everything is checked); the notes (defaults applied, labels left
    out) go to `log`. Returns the records written. Nothing is written when the input is bad
    (InputError)."""
    from ..particles import load_particles
    from .atomic import make_output_dir

    star, out = Path(star), Path(out)
    if out.suffix.lower() != CS_SUFFIX:
        raise InputError(f"{out}: expected a file name ending in {CS_SUFFIX} (cryoSPARC "
                         f"particle file)")
    if star.suffix.lower() == CS_SUFFIX:
        raise InputError(f"{star}: a cryoSPARC file; expected a RELION particle STAR file")
    ps = load_particles(star, log=log, check_stacks=False)
    records, notes = particles_to_cs(ps, rng)
    make_output_dir(out.parent, "output folder")
    write_cs(out, records)
    if log is not None:
        for note in notes:
            log(note)
    return records
