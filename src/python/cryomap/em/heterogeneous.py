"""Heterogeneous refinement's schedule (`cryomap hetero_refine`; docs/method.md,
"Heterogeneous refinement"): K classes with per-class poses first form on joined class maps
(both half-sets meet the same maps, regularised as class3d's), then each half-set meets only
its own half's class maps (gold standard per class). `em.classify.class_iteration` runs both
phases on the one engine; this module decides when the second starts and how its half maps
begin."""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from ..fourier import initial_lowpass

if TYPE_CHECKING:
    from .classify import ClassOptions, ClassState

#: Heterogeneous refinement: the half-sets meet the joined class maps until fewer than
#: JOINED_SETTLED of the particles change class (after the first iteration) or the searches
#: are local, at most for JOINED_SHARE of the iterations.
JOINED_SETTLED = 0.02
JOINED_SHARE = 0.5
#: ... and their maps are regularised as class3d's (tau2 from each map's power), with
#: RELION's Class3D default T = 4: an FSC of two halves aligned to the same maps is inflated
JOINED_TAU2_FUDGE = 4.0


def gold_standard_phase(state: ClassState, options: ClassOptions) -> bool:
    """Whether heterogeneous refinement's half-sets meet only their own half's maps."""
    return options.heterogeneous and state.halves_split_at is not None


def classes_formed(state: ClassState, options: ClassOptions, changed: float) -> bool:
    """Whether heterogeneous refinement's joined phase ends with this iteration."""
    return ((state.iteration > 1 and changed < JOINED_SETTLED) or state.schedule.local
            or state.iteration >= max(1, int(JOINED_SHARE * options.iterations)))


def split_half_maps(state: ClassState, options: ClassOptions, pixel_size: float) -> str:
    """From the next iteration on, each half-set meets only its own half's class maps, which
    restart from the joined class maps low-passed to the resolution to which the classes'
    differences were supported (`difference_shell`; --ini_high without it): the classes keep
    what tells them apart, and beyond it the two halves share nothing, as a refinement's
    halves start from one low-passed reference. Returns the log's words."""
    box = state.references.shape[-1]
    resolution = options.ini_high if state.difference_shell is None else min(
        options.ini_high, box * pixel_size / max(int(state.difference_shell.max()), 1))
    low = np.stack([initial_lowpass(m, resolution, pixel_size) for m in state.references])
    state.half_references[:] = low[None]
    state.halves_split_at = state.iteration
    state.difference_shell = None  # each class's FSC regularises it from here
    return (f"; classes formed: from here each half-set meets only its own half's class maps, "
            f"restarted from the classes low-passed to {resolution:.1f} Å")
