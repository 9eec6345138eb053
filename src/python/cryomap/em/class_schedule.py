"""class3d's schedules beyond RELION's (docs/method.md, "Classification schedules"): when the
consensus schedule seeds the classes and ends their fixed-pose phase, and when the adaptive
schedule decides between staying classic and the consensus. `em.classify.class_iteration`
runs every phase on the one engine; this module decides the phases."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from .refine import AutoSampling

if TYPE_CHECKING:
    from .classify import ClassOptions, ClassState


def starting_schedule(options: ClassOptions) -> AutoSampling:
    """The sampling schedule at its start: --healpix_order and the offsets given, global
    searches (local from the start when --sigma_ang is given or the order is already at
    auto_local_healpix_order)."""
    schedule = AutoSampling(order=options.healpix_order, offset_step=options.offset_step,
                            offset_range=options.offset_range, sigma_ang=options.sigma_ang)
    if options.sigma_ang is None and options.healpix_order >= options.auto_local_healpix_order:
        schedule.sigma_ang = 2.0 * schedule.fine_step(options)
    return schedule


#: The classes are seeded when the consensus searches become local, or at the latest after
#: this share of the iterations the consensus schedule has (so that the classes have the rest).
CONSENSUS_SHARE = 0.4
#: The adaptive schedule: the classes formed when fewer than this share of the particles
#: changed class in an iteration (measured, classic schedule: a class without its head
#: 12 % and then 7 % by the 5th and 6th iteration, 2 % after; a 3 % mass difference at SNR
#: 0.1, where classic stays at chance, 29-43 % in every iteration)...
FORMED_CHANGED = 0.15
#: Once they formed, each class's poses are searched to the end on refinement's sampling
#: schedule (finer HEALPix orders, then local searches; measured on that set: 99.0 % against
#: 98.5 % on the one --healpix_order grid; refining them and then telling the classes apart
#: at fixed poses, 98.8 %). If they have not formed after PROBE_SHARE of the iterations (at
#: least PROBE_MIN), the consensus schedule takes the rest: the consensus until it converges
#: (as an auto-refine would stop) or ALIGN_SHARE of the rest have passed, then the classes at
#: the consensus poses for FIXED_MIN iterations, then each class's poses searched locally
#: around them to the end (`local_per_class`). (No per-class searches from the coarse grid
#: after them: a class that cannot be aligned to the consensus has formed in the classic
#: start. Measured, 3 % set: 90.0 % when the classes settled at the consensus poses,
#: 88.4-89.5 % in per-class searches from the coarse grid after them; seeded once the
#: searches were local, 89.0 %, once the consensus converged, 91.2 %.)
PROBE_SHARE = 0.3
PROBE_MIN = 6
ALIGN_SHARE = 0.6
#: E/M passes per iteration at fixed poses (at most; fewer once settled).
FIXED_INNER = 5
#: The fixed-pose phase ends when fewer than this fraction of the images change class (after
#: FIXED_MIN iterations) ...
FIXED_SETTLED = 0.002
FIXED_MIN = 5
#: ... or after at most this share of the iterations left at the seeding. Measured (48 px,
#: 8 % share): per-class pose searches after too few fixed-pose iterations cost 5 points of
#: accuracy, so by default the poses stay fixed until the classes settle.
#: (The adaptive schedule: after FIXED_MIN iterations, local searches per class to the end:
#: `local_per_class`.)
FIXED_SHARE = 1.0


def fixed_phase_over(state: ClassState, options: ClassOptions, changed: float) -> bool:
    """Whether the fixed-pose phase after the seeding ends with this iteration (`changed`:
    the fraction of the images whose class changed in it). The adaptive schedule's: after
    FIXED_MIN iterations where the consensus's searches had become local (then
    `local_per_class`), never where they had not."""
    done = state.iteration - state.seeded_at
    if options.probes_classes:
        return state.schedule.local and done >= FIXED_MIN
    left = options.iterations - state.seeded_at
    return ((done >= FIXED_MIN and changed < FIXED_SETTLED)
            or done >= max(1, int(FIXED_SHARE * left)))


def local_per_class(state: ClassState) -> bool:
    """Whether this is the adaptive schedule's last phase: after the classes were told apart
    at the consensus poses, each class's poses searched locally around them on the
    consensus's last sampling (marginalised, as every search), against the localised class
    maps (`ClassState.e_step_references`). Measured (bench/classify.py's globular K = 3
    set, four seedings): 96.6 % on average against 95.6 % at fixed poses to the end (best
    possible 98.6 %); no change on the phantom's 3 % set (docs/method.md, "Classification
    schedules")."""
    return state.consensus_from is not None and state.fixed_done


def probe_step(state: ClassState, options: ClassOptions, changed: float) -> str | None:
    """The adaptive schedule's decision after an iteration of its classic start: classic to
    the end once the classes formed (few particles change class, every class holds particles);
    the consensus schedule from here if they have not formed within PROBE_SHARE of the
    iterations, at least PROBE_MIN (the consensus map: the classes' maps weighted by their
    share). None: no decision yet."""
    k = state.n_classes
    filled = float(state.distribution.min()) >= options.reseed_fraction / k
    if state.iteration >= 2 and changed < FORMED_CHANGED and filled:
        # each class's poses searched to the end, on refinement's sampling schedule (finer
        # HEALPix orders, then local searches) instead of the one --healpix_order grid
        state.probe_done = True
        state.schedule = starting_schedule(options)
        state.seeded_at, state.fixed_done = 0, True
        return (f"classes formed ({100 * changed:.1f}% changed class): each class's poses "
                "searched to the end, the sampling growing finer as in refinement")
    if state.iteration < max(PROBE_MIN, int(PROBE_SHARE * options.iterations)):
        return None
    state.probe_done = True
    state.consensus_from = state.iteration
    state.schedule = starting_schedule(options)
    state.references[:] = np.tensordot(state.distribution, state.references, axes=1)[None]
    state.localised = None
    return (f"classes not formed in {state.iteration} iterations ({100 * changed:.1f}% "
            "changed class): poses refined against one consensus map, then the classes "
            "seeded and told apart at those poses")
