"""RELION's auto-sampling schedule (`em.refine.AutoSampling.update`, docs/method.md eq. (29)),
worked by hand: the counters, the step to a finer order, the translations that follow it, the
switch to local searches and convergence."""

from __future__ import annotations

import numpy as np
import pytest

from cryomap.em.refine import MIN_OFFSET_STEP, AutoSampling, RefineOptions
from cryomap.sampling import angular_step

PIX, RADIUS = 1.5, 50.0  # Å/px; particle radius in px
OPTIONS = RefineOptions(healpix_order=2, oversampling=1, auto_local_healpix_order=4)


def _update(s: AutoSampling, shell: int, rot: float, off: float, acc_rot: float = 5.0,
            acc_trans: float = 1.0):
    return s.update(shell, rot, off, acc_rot, acc_trans, OPTIONS, PIX, RADIUS)


def test_resolution_gain_or_large_changes_keep_the_sampling():
    s = AutoSampling(order=2, offset_step=2.0, offset_range=6.0)
    assert _update(s, 10, 1.0, 0.1) is None  # resolution grew: no change
    assert (s.best_shell, s.iter_wo_resolution_gain, s.iter_wo_large_changes) == (10, 0, 1)
    # an orientation change over 40 % of the oversampled step (7.5 deg) that is still 3 %
    # below the smallest so far is large: no change of sampling
    s = AutoSampling(order=2, offset_step=2.0, offset_range=6.0, best_shell=10)
    assert _update(s, 10, 0.41 * 7.5, 0.1) is None and s.iter_wo_large_changes == 0
    assert s.order == 2
    # the same change again is not 3 % smaller than the smallest: it counts as small
    assert _update(s, 10, 0.41 * 7.5, 0.1) is not None and s.order == 3


def test_finer_order_and_translations_by_equation_29():
    s = AutoSampling(order=2, offset_step=2.0, offset_range=6.0, best_shell=10)
    message = _update(s, 10, 1.0, 0.3, acc_rot=5.0, acc_trans=1.0)
    assert s.order == 3 and message.startswith("sampling: HEALPix order 3")
    # oversampled step: min(1.5 Å / pix = 1 px, 0.75 * 1 px, edge) floored at 0.1 px, x2
    edge = np.deg2rad(angular_step(3 + 1)) * RADIUS  # 3.27 px
    fine = max(min(1.5 / PIX, 0.75 * 1.0, edge), MIN_OFFSET_STEP)
    assert s.offset_step == pytest.approx(2 * fine)  # 1.5 px
    # range: max(min(5 * 0.3, 1.3 * 6), 1.5 * step) = 2.25, not above 4 steps
    assert s.offset_range == pytest.approx(2.25)
    assert not s.local and s.iter_wo_resolution_gain == 0 and s.iter_wo_large_changes == 0
    assert s.smallest_orientation_change == 999.0


def test_the_edge_rule_makes_high_orders_fine_in_translation():
    s = AutoSampling(order=5, offset_step=1.0, offset_range=1.5, best_shell=40)
    _update(s, 40, 0.1, 0.05, acc_rot=1.0, acc_trans=2.0)
    edge = np.deg2rad(angular_step(6 + 1)) * RADIUS  # 0.41 px, below 1 px and 1.5 px
    assert s.order == 6 and s.offset_step == pytest.approx(2 * edge)
    assert s.local and s.sigma_ang == pytest.approx(2.0 * angular_step(7))


def test_converges_once_the_step_is_below_the_accuracy():
    s = AutoSampling(order=4, offset_step=1.0, offset_range=2.0, best_shell=30)
    # oversampled step 1.875 deg < 0.75 * 3 deg: fine enough, and nothing changes: converged
    assert _update(s, 30, 0.1, 0.01, acc_rot=3.0) is None
    assert s.fine_enough and s.converged and s.order == 4
    s = AutoSampling(order=4, offset_step=1.0, offset_range=2.0, best_shell=30)
    _update(s, 30, 0.1, 0.01, acc_rot=2.0)  # 1.875 >= 1.5: one order finer instead
    assert s.order == 5 and not s.converged
