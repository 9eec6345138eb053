"""Bounded memory: the memory plan (batch memory and image cache from --max_memory), images
streamed from disk giving the same numbers as cached ones, and streamed stacks leaving no
pages resident."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from cryomap import fourier
from cryomap.em import data as data_module
from cryomap.em.data import ImageSource, cache_size, read_chunk
from cryomap.errors import InputError
from cryomap.io.mrc import open_stack, read_map, write_stack
from cryomap.jobs import base
from cryomap.jobs.base import MIN_BATCH_MEMORY, plan_memory
from cryomap.particles import load_particles

BOX, PIX, N = 24, 7.0, 30
MiB = 1 << 20


@pytest.fixture(scope="module")
def sim(phantom_set) -> Path:
    return phantom_set("memory", BOX, PIX, N, seed=6)


def _estimate(batch_memory: int) -> dict[str, int]:
    """A stand-in for em.memory.estimate_memory: 3 x batch memory plus 100 MiB fixed."""
    return {"fixed": 100 * MiB, "candidate slices": 3 * batch_memory, "images": 123}


def test_plan_caches_when_everything_fits():
    n, box = 1000, 64
    plan = plan_memory(_estimate, n, box, 8 << 30, 512 * MiB)
    assert plan.cache and plan.batch_memory == 512 * MiB
    assert plan.parts["image cache"] == cache_size(n, box)
    assert "images" not in plan.parts  # the engine's own guess is replaced by the plan's
    assert plan.total <= plan.budget


def test_plan_gives_batch_memory_for_the_cache_then_streams():
    n, box = 20000, 128  # a 2.5 GiB cache
    fixed = base.RUNTIME_BYTES + n * base.PER_PARTICLE_BYTES + 100 * MiB
    cache = cache_size(n, box)
    # room for the cache with 128 MiB batches, not with 512 MiB ones
    plan = plan_memory(_estimate, n, box, fixed + cache + 3 * 128 * MiB + MiB, 512 * MiB)
    assert plan.cache and plan.batch_memory == 128 * MiB and plan.total <= plan.budget
    # no room for the cache even at 64 MiB batches: stream, with the largest batches that fit
    budget = fixed + 3 * 256 * MiB + read_chunk(box) * box * box * 48 + MiB
    plan = plan_memory(_estimate, n, box, budget, 512 * MiB)
    assert not plan.cache and plan.batch_memory == 256 * MiB
    assert "image reads" in plan.parts and plan.total <= budget


def test_plan_refuses_what_cannot_fit_in_one_line():
    with pytest.raises(InputError, match=r"--max_memory: the run needs about .* GiB") as e:
        plan_memory(_estimate, 1000, 64, 200 * MiB, 512 * MiB)
    assert "\n" not in str(e.value)
    # the plan went down to the smallest batch memory before refusing
    budget = base.RUNTIME_BYTES + 1000 * base.PER_PARTICLE_BYTES + 100 * MiB \
        + 3 * MIN_BATCH_MEMORY + read_chunk(64) * 64 * 64 * 48
    assert plan_memory(_estimate, 1000, 64, budget, 512 * MiB).batch_memory == MIN_BATCH_MEMORY


def test_streamed_images_equal_cached_ones(sim):
    p = load_particles(sim / "particles.star", log=None)
    cached = ImageSource(p, 8.0, 3.0, cache_bytes=1 << 30)
    streamed = ImageSource(p, 8.0, 3.0, cache_bytes=0)
    assert cached.cached and not streamed.cached
    mask = fourier.pixel_mask(BOX, BOX // 2 - 1)
    idx = np.array([7, 3, 29, 0, 11])
    origins = np.random.default_rng(0).uniform(-2, 2, (idx.size, 2))
    a, b = cached.batch(idx, mask, origins), streamed.batch(idx, mask, origins)
    assert np.array_equal(a.images, b.images) and np.array_equal(a.ctf, b.ctf)
    for x, y in zip(cached.power_statistics(1), streamed.power_statistics(1), strict=True):
        assert np.array_equal(x, y)
    p.close()


def test_streamed_refinement_equals_cached_refinement(sim, tmp_path, monkeypatch):
    """A budget just too small for the image cache makes the run stream its images; with the
    same batch memory the result is the cached run's, bit for bit."""
    from cryomap.em.refine import RefineOptions
    from cryomap.jobs.refine import refine, refine_memory

    # small fixed parts and one image read at a time, so that a tiny set can be made not to
    # fit (streaming costs the read buffers: a cache smaller than them is always taken)
    monkeypatch.setattr(base, "RUNTIME_BYTES", 0)
    monkeypatch.setattr(base, "PER_PARTICLE_BYTES", 0)
    monkeypatch.setattr(data_module, "read_chunk", lambda box: 1)
    options = RefineOptions(healpix_order=1, offset_range=1, offset_step=1, iterations=2,
                            batch_memory=MIN_BATCH_MEMORY)
    p = load_particles(sim / "particles.star", log=None)
    parts = sum(v for k, v in refine_memory(p, options).items() if k != "images")
    reads = BOX * BOX * 48
    cache = cache_size(N, BOX)
    assert cache > reads
    p.close()
    runs = {}
    for name, budget in (("cached", parts + cache + reads), ("streamed", parts + reads)):
        out = tmp_path / name
        refine(sim / "particles.star", sim / "ref.mrc", out, options, echo=None,
               max_memory=budget / 2**30)
        runs[name] = read_map(out / "run_class001.mrc")[0]
        log = (out / "run.log").read_text()
        assert ("images cached in memory" in log) == (name == "cached"), log
        assert "batch memory 16 MiB" in log
    assert np.array_equal(runs["cached"], runs["streamed"])


def test_nu_estimate_counts_the_fold_sums_and_the_filter(sim):
    """refine --nu keeps four more back-projectors' sums (each half's two folds besides the
    pooled ones): the estimate holds them, and nothing else changes."""
    from cryomap.em.refine import RefineOptions
    from cryomap.jobs.refine import refine_memory
    from cryomap.projector import reference_radius

    p = load_particles(sim / "particles.star", log=None)
    plain = refine_memory(p, RefineOptions(healpix_order=1))
    nu = refine_memory(p, RefineOptions(healpix_order=1, nu=True))
    p.close()
    assert {k: v for k, v in nu.items() if k != "non-uniform filter"} == plain
    m = reference_radius(BOX, 2, BOX // 2)
    assert nu["non-uniform filter"] >= 4 * (2 * m + 1) ** 2 * (m + 1) * 12


def _rss_file_kib() -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("RssFile:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


@pytest.mark.skipif(_rss_file_kib() is None, reason="needs /proc/self/status RssFile")
def test_reading_a_stack_leaves_no_pages_resident(tmp_path):
    """Reading every image of a 64 MiB stack (memory-mapped) through Stack.read keeps the
    file's pages out of this process's resident memory: a stack larger than the budget
    streams without filling the RSS."""
    n, box = 1024, 128
    rng = np.random.default_rng(0)
    write_stack(tmp_path / "s.mrcs", rng.normal(size=(n, box, box)).astype(np.float32), 1.0)
    with open_stack(tmp_path / "s.mrcs") as st:
        first = st.read([0])
        start = _rss_file_kib()
        total = 0.0
        for i in range(0, n, 64):
            total += float(st.read(np.arange(i, i + 64)).sum())
        grown = _rss_file_kib() - start
    assert np.isfinite(total) and first.shape == (1, box, box)
    # measured -60 KiB (each read drops its pages); bound 4 MiB, the size of one read of 64
    # images, so a release that lags one read behind fails too
    assert grown < 4 * 1024, f"{grown} KiB of the 64 MiB stack stayed resident"


def test_batch_size_keeps_the_level0_weights_within_the_batch_memory():
    """em.memory.batch_size, the one rule of refine, classify and initial_model: 4 bytes per
    image, translation, class and level-0 orientation (LOCAL_WINDOW for a local or
    fixed-pose search), between 8 and 2048 images."""
    from cryomap.em.engine import Search
    from cryomap.em.memory import LOCAL_WINDOW, batch_size
    from cryomap.sampling import PoseSampling

    s = PoseSampling.create(3, 2, 15.0, 2.0, 6.0)  # 4608 orientations, 29 translations
    n_t, n_r = s.translations().shape[0], s.n_orientations(0)
    glob, local = Search(s, 1, 10, 100.0), Search(s, 1, 10, 100.0, local_sigma=3.0)
    assert batch_size(glob, 2, 512 * MiB) == 512 * MiB // (4 * n_t * 2 * n_r)
    assert batch_size(local, 1, 512 * MiB) == min(2048, 512 * MiB // (4 * n_t * LOCAL_WINDOW))
    assert batch_size(glob, 50, MiB) == 8 and batch_size(glob, 1, 1 << 40) == 2048
