"""The package import: `import cryomap` is light (the API loads on first use, so the CLI's
--help and scripts that only need a submodule do not pay for pandas and the kernels), and
the API names resolve, `cryomap.simulate` staying the API function once the submodule of that
name is loaded."""

from __future__ import annotations

import subprocess
import sys


def _run(code: str) -> str:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          check=True).stdout.strip()


def test_import_loads_neither_pandas_nor_the_kernels():
    # measured 0.01 s against 0.66 s when the API was imported eagerly (pandas 0.45 s)
    out = _run("import sys, cryomap; print(sorted(m for m in ('pandas', 'numpy', "
               "'cryomap.api', 'cryomap._kernels') if m in sys.modules))")
    assert out == "[]"


def test_api_names_resolve_and_simulate_stays_the_function():
    out = _run("import cryomap\n"
               "from cryomap.simulate import simulate_particles\n"
               "import cryomap.simulate\n"
               "names = [n for n in cryomap.__all__ if n != '__version__']\n"
               "missing = [n for n in names if getattr(cryomap, n, None) is None]\n"
               "print(missing, callable(cryomap.simulate), type(cryomap.simulate).__name__,"
               " set(names) <= set(dir(cryomap)))")
    assert out == "[] True function True"


def test_unknown_attribute_is_an_attribute_error():
    out = _run("import cryomap\n"
               "try:\n    cryomap.no_such_name\nexcept AttributeError as e:\n    print(e)")
    assert out == "module 'cryomap' has no attribute 'no_such_name'"
