"""Gold-standard half-sets of a particle set (RELION's rlnRandomSubset rules;
docs/conventions.md, "Half sets")."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from .errors import InputError
from .io.star import numeric_column
from .particles import ParticleSet

Log = Callable[[str], None] | None


def random_subsets(particles: ParticleSet, rng: np.random.Generator, log: Log = print,
                   resplit_invalid: bool = False) -> np.ndarray:
    """Half-set (1 or 2) of every particle: int64 (n_particles,).

    As RELION (exp_model.cpp: divideParticlesInRandomHalves): rlnRandomSubset is used when
    every value is 1 or 2 and both halves are non-empty; when the column is absent or all 0,
    the particles are split at random (with a log line). RELION stops with an error for a
    value other than 0/1/2, for 0 mixed with non-0 and for an empty half; cryomap raises
    InputError in those cases, or, with resplit_invalid=True (what the jobs use,
    em.refine.split_halves), logs why and re-splits. A value that is not a number is always
    an InputError.
    The random split is an exact half (n//2 particles in half 2), where RELION draws each
    particle's half independently.
    """
    n = particles.n_particles
    where = particles._where("data_particles")

    def split(reason: str) -> np.ndarray:
        s = np.ones(n, np.int64)
        s[rng.permutation(n)[: n // 2]] = 2
        if log is not None:
            log(f"{particles.star_path}: {reason}; particles split at random into two halves "
                f"({int(np.sum(s == 1))} + {int(np.sum(s == 2))})")
        return s

    if n < 2:
        raise InputError(f"{where}: {n} particle(s); expected at least 2 for two half sets")
    if "rlnRandomSubset" not in particles.particles.columns:
        return split("no rlnRandomSubset column")
    vals = numeric_column(particles.particles, "rlnRandomSubset", where, finite=False)
    problem = None
    if np.all(vals == 0):
        return split("rlnRandomSubset is 0 for every particle")
    bad = ~np.isin(vals, (0.0, 1.0, 2.0))
    if np.any(bad):
        r = int(np.argmax(bad))
        problem = (f"{where}, row {r + 1}: rlnRandomSubset = {vals[r]:g}; expected 1 or 2 "
                   f"(or 0 for every particle)")
    elif np.any(vals == 0):
        r = int(np.argmax(vals == 0))
        problem = (f"{where}, row {r + 1}: rlnRandomSubset = 0 while other particles have "
                   f"1 or 2; expected all 0 or all 1/2")
    elif np.all(vals == vals[0]):
        problem = (f"{where}: rlnRandomSubset is {vals[0]:g} for every particle; expected "
                   f"both half sets 1 and 2 to be non-empty")
    if problem is None:
        return vals.astype(np.int64)
    if not resplit_invalid:
        raise InputError(problem)
    return split(problem.split(": ", 1)[1] if ": " in problem else problem)
