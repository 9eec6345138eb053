"""README's command-line chain runs, in order, from an empty project folder: each command is
parsed from the README and run with smaller sizes (the substitutions below), so that the
README cannot drift from what the commands accept and the jobs chain (every job reads the
files of the jobs before it, by the paths the README gives)."""

import re
import shlex
from pathlib import Path

import pytest

from cryomap.cli.main import main

README = Path(__file__).resolve().parents[1] / "README.md"

#: README value -> test value (each must occur in the README: a renamed option fails here).
SMALLER = [("--box 64", "--box 32"), ("--angpix 3.0", "--angpix 6.0"), ("--n 2000", "--n 200"),
           ("--healpix_order 2", "--healpix_order 1"), ("--iter 25", "--iter 2"),
           ("--K 50", "--K 4"),
           ("--auto_bfac", "--adhoc_bfac -100")]  # the small run is worse than 10 Å
#: Extra options of the E/M commands in the test (few iterations, a small search).
FAST = {"initial_model": "--iter 6 --j 2",
        "refine": "--iter 2 --offset_range 2 --offset_step 1 --j 2",
        "class3d": "--healpix_order 1 --offset_range 2 --offset_step 1 --j 2",
        "class2d": "--offset_range 2 --offset_step 1 --j 2",
        "reconstruct": "--j 2"}


def readme_chain(heading: str = "## Command-line examples") -> list[str]:
    """The commands of the first bash block under `heading` in the README, one per entry
    (continuation lines joined, comments dropped)."""
    text = README.read_text()
    section = text[text.index(heading):]
    block = re.search(r"```bash\n(.*?)```", section, re.S).group(1)
    joined = re.sub(r"\\\n\s*", " ", block)
    commands = []
    for line in joined.splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            commands.append(line)
    return commands


def test_readme_chain_is_complete():
    """The chain makes its own inputs and covers the main steps (names as in the README)."""
    commands = readme_chain()
    verbs = [shlex.split(c)[1] for c in commands]
    for verb in ("phantom", "simulate", "initial_model", "refine", "mask", "postprocess",
                 "reconstruct", "class3d", "class2d"):
        assert verb in verbs, verb
    assert verbs.index("phantom") < verbs.index("simulate") < verbs.index("initial_model") \
        < verbs.index("refine") < verbs.index("mask") < verbs.index("postprocess")
    # particles -> initial_model -> refine: no outside map
    refine = commands[verbs.index("refine")]
    assert "--ref InitialModel/job001/run_class001.mrc" in refine
    class3d = commands[verbs.index("class3d")]
    sim = [c for c in commands if " --variants " in c and c.split()[1] == "simulate"]
    assert sim, "class3d needs data of several structures (simulate --variants K)"
    out = shlex.split(sim[0])[shlex.split(sim[0]).index("--o") + 1]
    assert f"--i {out}/particles.star" in class3d


def test_readme_chain_runs_in_order(tmp_path, monkeypatch, capsys):
    """Both chains: the examples, then the pipeline for data as users have it (which reads
    the examples' initial model and mask)."""
    commands = readme_chain() + readme_chain("## Data as users have it")
    text = "\n".join(commands)
    for old, _ in SMALLER:
        assert old in text, f"README no longer has {old!r}: update SMALLER"
    monkeypatch.chdir(tmp_path)
    for command in commands:
        for old, new in SMALLER:
            command = command.replace(old, new)
        argv = shlex.split(command)
        assert argv[0] == "cryomap"
        if "--i" in argv and argv[1] in FAST:
            argv += FAST[argv[1]].split()
        code = main(argv[1:])
        err = capsys.readouterr().err
        assert code == 0, f"{command}: exit {code}: {err}"
    for path in ("phantom.mrc", "initial.mrc", "sim/particles.star", "proj.mrcs",
                 "Refine3D/job001/run_class001.mrc", "mask.mrc", "rec.mrc",
                 "Class3D/job001/run_data.star", "Class2D/job001/run_classes.mrcs",
                 "Select/job001/particles.star", "CtfRefine/job001/particles_ctf_refine.star",
                 "Refine3D/job003/run_class001.mrc"):
        assert (tmp_path / path).is_file(), path
    assert any((tmp_path / "PostProcess/job001").glob("*.mrc"))
    assert any((tmp_path / "PostProcess/job002").glob("*.mrc"))


def test_users_pipeline_in_order():
    """The README's pipeline for real data, in RELION's order: simulate with imperfections,
    class2d, select, refine, ctf_refine, refine, postprocess."""
    verbs = [shlex.split(c)[1] for c in readme_chain("## Data as users have it")]
    assert verbs == ["simulate", "class2d", "select", "refine", "ctf_refine", "refine",
                     "postprocess"]


if __name__ == "__main__":  # pragma: no cover
    pytest.main([__file__, "-q"])


def test_round_trip_commands_parse():
    """README's round-trip block names real commands and options (parsed, not run: their
    inputs are a user's project)."""
    from cryomap.cli.main import build_parser

    commands = readme_chain("## Round trips with RELION and cryoSPARC")
    verbs = [shlex.split(c)[1] for c in commands]
    for verb in ("star", "symmetry_expand", "subtract", "export", "info", "reconstruct"):
        assert verb in verbs, verb
    parser = build_parser()
    for command in commands:
        parser.parse_args(shlex.split(command)[1:])
