"""Shared fixtures: the small phantom particle sets that several test files run on."""

from __future__ import annotations

from pathlib import Path

import pytest

from cryomap.io.mrc import write_map
from cryomap.phantom import make_phantom
from cryomap.simulate import simulate_particles, write_simulation


@pytest.fixture(scope="session")
def phantom_set(tmp_path_factory):
    """make(name, box, pix, n, seed, snr=1.0, max_shift_px=1.0) -> a folder with the phantom's
    simulated particles (particles.star, particles.mrcs, truth.star) and the phantom itself
    as ref.mrc."""

    def make(name: str, box: int, pix: float, n: int, seed: int, snr: float = 1.0,
             max_shift_px: float = 1.0) -> Path:
        out = tmp_path_factory.mktemp(name)
        truth = make_phantom(box, pix)
        write_simulation(out, *simulate_particles(truth, pix, n, snr=snr, seed=seed,
                                                  max_shift_px=max_shift_px), pixel_size=pix)
        write_map(out / "ref.mrc", truth, pix)
        return out

    return make
