"""Loads the C++ core: the AVX2+FMA build where the CPU has it, else the portable one."""

from __future__ import annotations

import os
from types import ModuleType


def _cpu_has_avx2_fma() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    flags = set(line.split(":", 1)[1].split())
                    return {"avx2", "fma"} <= flags
    except OSError:
        pass
    return False


def _load() -> ModuleType:
    # CRYOMAP_SIMD=baseline forces the portable build (for testing and comparison).
    if os.environ.get("CRYOMAP_SIMD", "auto") != "baseline" and _cpu_has_avx2_fma():
        try:
            from . import _core_avx2

            return _core_avx2
        except ImportError:
            pass
    from . import _core

    return _core


core = _load()


def set_threads(n: int | None) -> None:
    """Set the number of OpenMP threads the kernels use (None leaves the default)."""
    if n is not None:
        core.set_threads(int(n))
