"""The docs in the repository: docs/api.md's examples run as doctests, docs/method.md's
function map names real functions and its equation numbers match the code's citations,
`help(cryomap)` shows the API, and nothing cites files outside the repository."""

import doctest
import importlib
import pydoc
import re
from pathlib import Path

import pytest

import cryomap

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"


def fenced_blocks(text: str, language: str) -> list[str]:
    """The ```language blocks of a markdown text."""
    return re.findall(rf"^```{language}\n(.*?)^```", text, re.S | re.M)


def test_api_doc_examples_run(tmp_path, monkeypatch):
    """docs/api.md: simulate, refine in memory, the map as numpy with its pixel size, FSC
    against the truth close to the known-pose reconstruction's (the best possible)."""
    monkeypatch.chdir(tmp_path)
    blocks = fenced_blocks((DOCS / "api.md").read_text(), "pycon")
    assert len(blocks) >= 2
    test = doctest.DocTestParser().get_doctest("\n".join(blocks), {}, "docs/api.md",
                                               str(DOCS / "api.md"), 0)
    assert len(test.examples) >= 15
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS)
    runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} examples failed"


def _resolve(name: str):
    """cryomap.<name> as an object: the longest importable module prefix, then attributes."""
    parts = name.split(".")
    for i in range(len(parts), -1, -1):
        try:
            obj = importlib.import_module(".".join(["cryomap", *parts[:i]]))
        except ImportError:
            continue
        for part in parts[i:]:
            obj = getattr(obj, part)
        return obj
    raise AssertionError(name)


def test_method_function_map_names_real_functions():
    text = (DOCS / "method.md").read_text()
    table = text[text.index("## 8. Function map"):]
    names = re.findall(r"`([A-Za-z_][\w.]*)`", table)
    checked = 0
    for name in names:
        if name.endswith((".cpp", ".hpp")):
            assert (ROOT / "src" / "cpp" / name).is_file(), name
        elif name.startswith("core."):
            from cryomap._kernels import core

            assert hasattr(core, name.split(".", 1)[1]), name
        elif "." in name or name in cryomap.__all__:
            assert _resolve(name) is not None, name
        else:
            continue
        checked += 1
    assert checked >= 30


def _equations() -> set[str]:
    text = (DOCS / "method.md").read_text()
    return set(re.findall(r"\((\d+)\)\s*$", text, re.M))


def test_code_citations_of_method_md_exist():
    """Every "docs/method.md eq. (N)" (also "eqs. (N)-(M)", "(N), (M)") in src/ and tests/
    names an equation that docs/method.md numbers."""
    numbered = _equations()
    assert {str(n) for n in range(1, 30)} <= numbered
    cited = set()
    for path in list((ROOT / "src").rglob("*.py")) + list((ROOT / "src").rglob("*.[ch]pp")) \
            + list((ROOT / "tests").glob("*.py")):
        text = " ".join(path.read_text().split())
        for m in re.finditer(r"docs/method\.md,? eqs?\. ((?:\(\d+\)[-, and]*)+)", text):
            cited |= set(re.findall(r"\((\d+)\)", m.group(1)))
    assert cited, "no citation found"
    assert cited <= numbered, sorted(cited - numbered)
    assert {"14", "15", "16", "17"} <= cited


@pytest.mark.parametrize("pattern", [r"seed eq", r"CONVENTIONS", r"\.\./shared", r"§"])
def test_no_citations_outside_the_repository(pattern):
    paths = [ROOT / "README.md", *DOCS.glob("*.md"), *(ROOT / "src").rglob("*.py"),
             *(ROOT / "src").rglob("*.[ch]pp")]
    hits = [f"{p.relative_to(ROOT)}:{i + 1}" for p in paths
            for i, line in enumerate(p.read_text().splitlines()) if re.search(pattern, line)]
    assert not hits, hits


def test_help_shows_the_api():
    text = pydoc.render_doc(cryomap, renderer=pydoc.plaintext)
    for name in ("class Volume", "refine(particles", "classify3d(particles",
                 "classify2d(particles", "reconstruct(particles", "simulate(maps",
                 "set_threads(n", "read_particles(path", "particles_from_images(images",
                 "class RefineResult", "class ParticleSet"):
        assert name in text, name
    description = text[: text.index("PACKAGE CONTENTS")]
    assert "refine(" in description and "Volume" in description
    assert set(cryomap.__all__) >= {"Volume", "ParticleSet", "refine", "classify3d",
                                    "classify2d", "reconstruct", "simulate", "set_threads"}


def test_simulate_stays_the_api_function():
    """cryomap.simulate is the API function even after the module of the same name is used."""
    from cryomap.simulate import project_images  # noqa: F401

    assert callable(cryomap.simulate) and cryomap.simulate.__module__ == "cryomap.api"


def test_set_threads_round_trip():
    before = cryomap.get_threads()
    try:
        cryomap.set_threads(1)
        assert cryomap.get_threads() == 1
    finally:
        cryomap.set_threads(before)
    with pytest.raises(ValueError):
        cryomap.set_threads(0)
