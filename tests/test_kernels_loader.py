"""The choice of the C++ core's build from the CPU's features (AVX-512, AVX2, portable)."""

import importlib
import os

from cryomap._kernels import candidate_builds, core, cpu_flags

ZEN4 = {"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl", "avx2", "fma", "sse4_2"}


def test_fastest_supported_build_first():
    assert candidate_builds(ZEN4) == ["avx512", "avx2", "baseline"]
    assert candidate_builds({"avx2", "fma"}) == ["avx2", "baseline"]
    assert candidate_builds({"avx512f", "avx2", "fma"}) == ["avx2", "baseline"]  # no BW/DQ/VL
    assert candidate_builds({"sse2"}) == ["baseline"]
    assert candidate_builds(set()) == ["baseline"]


def test_cap_from_the_environment_variable():
    assert candidate_builds(ZEN4, "avx2") == ["avx2", "baseline"]
    assert candidate_builds(ZEN4, "baseline") == ["baseline"]
    assert candidate_builds({"avx2", "fma"}, "avx512") == ["avx2", "baseline"]


def test_loaded_build_is_the_first_importable_candidate():
    names = {"avx512": "_core_avx512", "avx2": "_core_avx2", "baseline": "_core"}
    for name in candidate_builds(cpu_flags(), os.environ.get("CRYOMAP_SIMD", "auto")):
        try:
            module = importlib.import_module(f"cryomap.{names[name]}")
        except ImportError:
            continue
        assert core is module
        break
    else:
        raise AssertionError("no build importable")
