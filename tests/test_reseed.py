"""Re-seeding of classes that lost their particles (`em.classify.reseed_empty_classes`,
docs/method.md section 7): an almost empty class takes half of the largest class, by hand."""

from __future__ import annotations

import numpy as np

from cryomap.em.classify import ClassOptions, ClassState, reseed_empty_classes


def _state(distribution, class_number) -> ClassState:
    k, n = len(distribution), len(class_number)
    refs = np.stack([np.full((4, 4), float(c)) for c in range(k)])
    return ClassState(iteration=3, sigma2=np.ones((1, 4, 3)), r_max=2,
                      angles=np.zeros((n, 3)), origins_px=np.zeros((n, 2)),
                      max_prob=np.ones(n), n_significant=np.ones(n, np.int64),
                      log_likelihood=np.zeros(n), amplitude=np.ones(n), references=refs,
                      distribution=np.asarray(distribution, float),
                      class_number=np.asarray(class_number, np.int64),
                      class_prob=np.zeros((n, k)), offset_sigma=1.0)


def test_an_empty_class_takes_half_of_the_largest():
    # class 2 holds 1 % (< 0.1 / 3 of the particles): it takes half of class 0, the largest
    number = np.array([0] * 6 + [1] * 3 + [2] * 1)
    state = _state([0.60, 0.39, 0.01], number)
    pairs = reseed_empty_classes(state, ClassOptions(n_classes=3, reseed_fraction=0.1),
                                 np.random.default_rng(0))
    assert pairs == [(2, 0)]
    np.testing.assert_array_equal(state.references[2], state.references[0])
    np.testing.assert_allclose(state.distribution, np.array([0.30, 0.39, 0.30]) / 0.99)
    # class 0's six particles are split 3 / 3 between classes 0 and 2 for the next iteration;
    # the others are free
    a = state.assigned
    assert sorted(a[:6].tolist()) == [0, 0, 0, 2, 2, 2] and np.all(a[6:] == -1)


def test_nothing_to_reseed_or_turned_off():
    number = np.array([0] * 5 + [1] * 5)
    state = _state([0.5, 0.5], number)
    assert reseed_empty_classes(state, ClassOptions(n_classes=2), np.random.default_rng(0)) \
        == [] and state.assigned is None
    state = _state([0.99, 0.01], number)
    assert reseed_empty_classes(state, ClassOptions(n_classes=2, reseed_fraction=0.0),
                                np.random.default_rng(0)) == []
    assert state.assigned is None
