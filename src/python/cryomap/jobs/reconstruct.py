"""The known-pose reconstruction job (RELION's relion_reconstruct): inputs checked, the map
from the particles' own poses on the refinement's reconstruction path
(`em.reconstruct.reconstruct_known_poses`), outputs written together.

Regularisation (docs/symmetry.md, "cryomap reconstruct"):

- both half-sets (no --subset): the particles' rlnRandomSubset (or a random equal split when
  it is absent or unusable, as refinement) gives two half maps; tau2 comes from their FSC and
  the map from all particles with tau2 of the joined halves, sqrt(2 FSC / (1 + FSC)), exactly
  as the final map of a refinement. The unfiltered half maps are written next to it
  (`<o>_half1.mrc`, `<o>_half2.mrc`) for `cryomap postprocess`.
- one half-set (--subset 1 or 2): no second half exists to measure the FSC against, so the
  chosen subset is split at random into two quarter sets and tau2 comes from their FSC,
  joined as above. The regularisation then uses only the chosen subset's particles, so the
  map stays independent of the other half (the reason for --subset), and it is the same
  Wiener-like rule as with both halves instead of RELION's unregularised average.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from ..em.reconstruct import reconstruct_known_poses
from ..em.refine import RefineOptions, RefineState, split_halves
from ..errors import InputError
from ..io.atomic import atomic_path
from ..io.mrc import write_map
from ..parallel import SINGLE, Ranks
from ..particles import ParticleSet
from .base import aberration_notes, grid_notes
from .refine import image_source, require_ctf

#: The pose columns a known-pose reconstruction needs (origins default to 0, as RELION).
POSE_COLUMNS = ("rlnAngleRot", "rlnAngleTilt", "rlnAnglePsi")


@dataclass
class ReconstructResult:
    """What `reconstruct` wrote and measured."""

    paths: list[Path]  # the map, then the half maps (both halves only); [] in memory
    n_particles: int
    resolution: float  # Å, FSC 0.143 of the half-sets used for tau2
    state: RefineState
    pixel_size: float = 0.0  # Å
    # the particles used (their input rows); with both half-sets, rlnRandomSubset is the
    # half-set each particle was reconstructed in
    table: pd.DataFrame | None = None


def half_map_paths(output: Path) -> tuple[Path, Path]:
    """`<o>_half1.mrc` and `<o>_half2.mrc` next to the map (RELION's half-map naming)."""
    return (output.with_name(f"{output.stem}_half1{output.suffix}"),
            output.with_name(f"{output.stem}_half2{output.suffix}"))


def check_output(output: str | Path) -> Path:
    """--o: an .mrc file in an existing folder (InputError otherwise)."""
    out = Path(output)
    if out.suffix.lower() != ".mrc":
        raise InputError(f"--o {output}: expected a map file name ending in .mrc")
    if not out.parent.is_dir():
        raise InputError(f"--o {output}: output folder {out.parent} does not exist")
    return out


def check_poses(particles: ParticleSet, star: str | Path) -> None:
    """The particles carry the three Euler angles (InputError naming the missing ones)."""
    missing = [c for c in POSE_COLUMNS if c not in particles.particles.columns]
    if missing:
        raise InputError(f"{star}: no {', '.join(missing)} column(s); a known-pose "
                         f"reconstruction needs the particles' poses (e.g. a refinement's "
                         f"run_data.star)")


def rows_subset(particles: ParticleSet, rows: np.ndarray) -> ParticleSet:
    """The particles of `rows` (their input order) as a new set."""
    df = particles.particles
    return ParticleSet(optics=particles.optics, particles=df.iloc[rows].reset_index(drop=True),
                       star_path=particles.star_path, max_open_stacks=particles.max_open_stacks,
                       search_dirs=particles.search_dirs, notes=list(particles.notes),
                       images=None if particles.images is None else particles.images[rows])


def select_subset(particles: ParticleSet, star: str | Path, subset: int) -> ParticleSet:
    """The particles whose rlnRandomSubset is `subset` (RELION's --subset), as a new set."""
    df = particles.particles
    if "rlnRandomSubset" not in df.columns:
        raise InputError(f"{star}: no rlnRandomSubset column; --subset {subset} needs the "
                         f"particles' half-sets")
    values = np.asarray(df["rlnRandomSubset"].to_numpy(), np.float64)
    rows = np.flatnonzero(values == subset)
    if rows.size == 0:
        raise InputError(f"{star}: no particle has rlnRandomSubset {subset}; expected a "
                         f"non-empty --subset")
    return rows_subset(particles, rows)


def class_rows(particles: ParticleSet, star: str | Path) -> dict[int, np.ndarray]:
    """Rows of each class (rlnClassNumber, 1-based) that has at least two particles (two
    half-sets); InputError without the column or with a value that is not a class number."""
    df = particles.particles
    if "rlnClassNumber" not in df.columns:
        raise InputError(f"{star}: no rlnClassNumber column; --classes needs the particles' "
                         f"classes (e.g. a class3d run_data.star)")
    values = pd.to_numeric(df["rlnClassNumber"], errors="coerce").to_numpy(np.float64)
    bad = ~(np.isfinite(values) & (values >= 1) & (values == np.round(values)))
    if bad.any():
        row = int(np.argmax(bad))
        raise InputError(f"{star}: rlnClassNumber of particle {row + 1} is "
                         f"{df['rlnClassNumber'].iloc[row]}; expected a class number >= 1")
    rows = {int(k): np.flatnonzero(values == k) for k in np.unique(values)}
    return {k: r for k, r in rows.items() if r.size >= 2}


def class_map_path(output: Path, k: int) -> Path:
    """`<o>_class001.mrc`: class k's map (RELION's class naming)."""
    return output.with_name(f"{output.stem}_class{k:03d}{output.suffix}")


def _halves(particles: ParticleSet, star: str | Path, subset: int | None,
            rng: np.random.Generator, echo) -> tuple[ParticleSet, np.ndarray]:
    """The particles used and their half-sets: one rlnRandomSubset split at random into two
    (subset), or the particles' own half-sets (module docstring)."""
    if subset is not None:
        chosen = select_subset(particles, star, subset)
        if chosen.n_particles < 2:
            raise InputError(f"{star}: --subset {subset} holds {chosen.n_particles} "
                             f"particle; expected at least 2")
        halves = np.ones(chosen.n_particles, np.int64)
        halves[rng.permutation(chosen.n_particles)[: chosen.n_particles // 2]] = 2
        return chosen, halves
    if particles.n_particles < 2:
        raise InputError(f"{star}: {particles.n_particles} particle; expected at "
                         f"least 2 (two half-sets)")
    return particles, split_halves(particles, rng, log=echo)


def _write_maps(paths: list[Path], maps: list[np.ndarray], pix: float) -> None:
    """Every map or none (each written to a temporary name, all renamed at the end)."""
    with contextlib.ExitStack() as stack:
        for path, volume in zip(paths, maps, strict=True):
            tmp = stack.enter_context(atomic_path(path, suffix=".mrc"))
            write_map(tmp, np.asarray(volume, np.float32), pix)


def reconstruct(star: str | Path | ParticleSet, output: str | Path | None, sym: str = "C1",
                use_ctf: bool = False,
                subset: int | None = None, angpix: float | None = None,
                maxres: float | None = None, seed: int = 0,
                echo: Callable[[str], None] | None = print,
                ranks: Ranks | None = None, classes: bool = False
                ) -> ReconstructResult | dict[int, ReconstructResult]:
    """relion_reconstruct on cryomap's refinement path: the map of the particles in `star`
    at their poses (rlnAngleRot/Tilt/Psi, rlnOriginX/YAngst), CTF-corrected with use_ctf,
    summed over the point group `sym`, up to `maxres` Å (default Nyquist), from the half-set
    `subset` (1 or 2) only or from both (module docstring). Every input is checked before
    anything is written (InputError, one line); the maps are written together, atomically.
    star: a particle file or a ParticleSet; output None: nothing written (the Python API).
    ranks: the processes that run it (`parallel.Ranks`; None: this one alone).
    classes: one map per class of rlnClassNumber (`<o>_class001.mrc`, with its half maps)
    from the particles assigned to it (RELION's files keep only each particle's most
    probable class); returns {class: result}.
    """
    from ..em.options import check_symmetry
    from .refine import particle_input

    out = None if output is None else check_output(output)
    sym = check_symmetry(sym, healpix_order=2)
    if subset is not None and subset not in (1, 2):
        raise InputError(f"--subset {subset}: expected 1 or 2")
    if classes and subset is not None:
        raise InputError("--classes with --subset: expected one of them (a class map is "
                         "made from both half-sets of its particles)")
    if maxres is not None and not (np.isfinite(maxres) and maxres > 0):
        raise InputError(f"--maxres {maxres}: expected a resolution > 0 Å")
    from_file = not isinstance(star, ParticleSet)
    particles, star = particle_input(star, angpix)
    try:
        if from_file and echo is not None:  # RELION defaults applied on reading
            for note in particles.notes:
                echo(note)
        check_poses(particles, star)
        require_ctf(particles, star, use_ctf)
        box, pix = particles.grid_box, particles.grid_pixel_size
        r_max = None
        if maxres is not None:
            if maxres < 2.0 * pix:
                raise InputError(f"--maxres {maxres:g}: beyond Nyquist ({2.0 * pix:g} Å at "
                                 f"{pix:g} Å/px); expected >= {2.0 * pix:g} Å")
            r_max = min(int(np.ceil(box * pix / maxres)), box // 2)
        groups = {0: particles} if not classes else {
            k: rows_subset(particles, rows) for k, rows in class_rows(particles, star).items()}
        if not groups:
            raise InputError(f"{star}: no class holds two particles; expected at least one")
        options = RefineOptions(use_ctf=use_ctf, sym=sym, seed=seed)
        if echo is not None:
            for line in grid_notes(particles) + aberration_notes(particles, use_ctf):
                echo(line)
        ranks = ranks or SINGLE
        results = {k: _known_pose_maps(ps, star, subset, options, r_max, seed, echo, ranks)
                   for k, ps in groups.items()}
        paths, maps = [], []
        for k, (state, _) in results.items():
            target = out if not classes or out is None else class_map_path(out, k)
            maps.append(state.final_maps[0])
            if subset is None:
                maps += [state.final_maps[1], state.final_maps[2]]
            if target is not None:
                paths += [target] + (list(half_map_paths(target)) if subset is None else [])
        if out is not None and ranks.writes_outputs:  # under mpirun rank 0 alone writes
            _write_maps(paths, maps, pix)
        per_map = 1 if subset is not None else 3
        done = {}
        for i, (k, (state, table)) in enumerate(results.items()):
            res = float(state.history[-1].resolution)
            n = len(table)
            if echo is not None:
                what = (f"subset {subset} ({n} particles; tau2 from the FSC of two random "
                        f"halves of it)" if subset is not None else
                        f"{n} particles, half-set FSC 0.143 at {res:.2f} Å")
                name = f"class {k}: " if classes else ""
                mine = paths[i * per_map:(i + 1) * per_map]
                echo(f"cryomap reconstruct: {name}{what}, symmetry {sym}"
                     + ("; wrote " + ", ".join(str(p) for p in mine) if mine else ""))
            done[k] = ReconstructResult(paths[i * per_map:(i + 1) * per_map], n, res, state,
                                        pix, table)
        if classes and echo is not None:
            present = pd.to_numeric(particles.particles["rlnClassNumber"]).astype(int)
            skipped = sorted(set(present.tolist()) - set(done))
            if skipped:
                echo(f"cryomap reconstruct: no map for class(es) "
                     f"{', '.join(map(str, skipped))} (fewer than two particles)")
        return done if classes else done[0]
    finally:
        particles.close()


def _known_pose_maps(particles: ParticleSet, star: str | Path, subset: int | None,
                     options: RefineOptions, r_max: int | None, seed: int, echo,
                     ranks: Ranks) -> tuple[RefineState, pd.DataFrame]:
    """The reconstruction state of one set of particles and the table of those used (with
    their half-sets when both are used)."""
    rng = np.random.default_rng(seed)
    chosen, halves = _halves(particles, star, subset, rng, echo)
    try:
        source = image_source(chosen, options, ranks=ranks)
        state = reconstruct_known_poses(source, chosen.angles(),
                                        chosen.origins_px(pixel_size=chosen.grid_pixel_size),
                                        halves, options, r_max=r_max)
        table = chosen.particles.copy()
    finally:
        if chosen is not particles:
            chosen.close()
    if subset is None:
        table["rlnRandomSubset"] = halves
    return state, table
