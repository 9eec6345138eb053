"""Loads the C++ core: the fastest build the CPU runs (AVX-512, else AVX2+FMA, else the
portable one), chosen from the CPU's feature flags at import.

CRYOMAP_SIMD=baseline|avx2|avx512 caps the choice (for testing and comparison).
"""

from __future__ import annotations

import os
from types import ModuleType

# x86-64 feature flags (as /proc/cpuinfo spells them) each build needs
_FEATURES = {
    "avx512": {"avx512f", "avx512cd", "avx512bw", "avx512dq", "avx512vl", "avx2", "fma"},
    "avx2": {"avx2", "fma"},
}
_ORDER = ("avx512", "avx2", "baseline")


def cpu_flags() -> set[str]:
    """The CPU's feature flags (empty where /proc/cpuinfo is not available)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def candidate_builds(flags: set[str], cap: str = "auto") -> list[str]:
    """The builds to try, fastest first: those whose features the CPU has, at most `cap`
    (auto, avx512, avx2 or baseline); the portable build last."""
    allowed = _ORDER[_ORDER.index(cap):] if cap in _ORDER else _ORDER
    return [n for n in allowed if n == "baseline" or _FEATURES[n] <= flags]


def _load() -> ModuleType:
    for name in candidate_builds(cpu_flags(), os.environ.get("CRYOMAP_SIMD", "auto")):
        try:
            if name == "avx512":
                from . import _core_avx512 as mod
            elif name == "avx2":
                from . import _core_avx2 as mod
            else:
                from . import _core as mod
            return mod
        except ImportError:
            continue
    raise ImportError("cryomap: no build of the C++ core could be imported")


core = _load()


def set_threads(n: int | None) -> None:
    """Set the number of OpenMP threads the kernels use (None leaves the default)."""
    if n is not None:
        core.set_threads(int(n))
