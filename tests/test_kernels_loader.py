"""The choice of the C++ core's build from the CPU's features (AVX-512, AVX2, portable)."""

import os
import subprocess
import sys

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


NAMES = {"avx512": "_core_avx512", "avx2": "_core_avx2", "baseline": "_core"}


def test_loaded_build_is_the_fastest_the_cpu_supports():
    # `pip install .` compiles every build on x86-64, so the loader must have taken the first
    # candidate: a build that failed to compile or import shows here
    expected = candidate_builds(cpu_flags(), os.environ.get("CRYOMAP_SIMD", "auto"))[0]
    assert core.__name__ == f"cryomap.{NAMES[expected]}"


def test_the_environment_variable_caps_the_loaded_build():
    code = "from cryomap._kernels import core; print(core.__name__, core.simd)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True, env={**os.environ, "CRYOMAP_SIMD": "baseline"}).stdout
    assert out.split()[0] == "cryomap._core"
