"""Every option of the E/M commands reaches the code: given a value other than its default, it
changes the options the command runs with (or the run settings); an argument that maps to no
option is a programming error, not silently dropped; `--continue` refuses options it would
ignore; RELION's underscore spelling is the one --help shows."""

from __future__ import annotations

import argparse

import pytest

from cryomap.cli.class3d import class_options
from cryomap.cli.main import build_parser, main
from cryomap.cli.options import (
    CONTINUE_ARGUMENTS,
    RUN_ARGUMENTS,
    options_from_args,
    run_settings,
)
from cryomap.em.initial_model import InitialModelOptions
from cryomap.em.refine import RefineOptions

COMMANDS = ("refine", "class3d", "class2d", "initial_model")

#: A value other than the default for each option that takes one (by destination).
VALUES = {
    "healpix_order": "3", "oversampling": "2", "psi_step": "5", "offset_range": "4",
    "offset_step": "1", "offset_sigma": "5", "sigma_ang": "3", "ini_high": "30",
    "particle_diameter": "100", "mask_edge": "3", "tau2_fudge": "3", "pad": "1",
    "interp": "nearest", "adaptive_fraction": "0.99", "noise_model": "pixel", "incr_size": "5",
    "perturb": "0.25", "sym": "C2", "seed": "7", "iterations": "3",
    "auto_local_healpix_order": "5", "prior_model": "voxel", "solvent_mask": "mask.mrc",
    "n_classes": "3", "class_temperature": "2", "difference_fsc": "0.5", "perturbation": "0.3",
    "difference_fsc_fixed": "0.2",
    "difference_window": "1",
    "reseed_fraction": "0.15", "highres_limit": "10", "subset_size": "10", "fin_high": "20",
    "ini_subset": "300", "fin_subset": "2000", "ini_frac": "0.25", "fin_frac": "0.3",
    "ini_stepsize": "0.4", "stepsize": "0.6", "threads": "1", "max_memory": "2",
    "schedule": "classic",
}
SKIP = {"i", "o", "ref", "angpix", "resume", "mpi", "help"}  # inputs, read by the jobs
NEEDS = {"solvent_correct_fsc": ["--solvent_mask", "mask.mrc"]}  # options that need another


def _options(command: str, args: argparse.Namespace):
    """The options the command's run() builds (the same calls)."""
    if command == "refine":
        return options_from_args(RefineOptions, args)
    if command in ("class3d", "class2d"):
        return class_options(args, 3 if command == "class3d" else 2)
    extra = {} if args.iterations is not None else {
        "iterations": InitialModelOptions.iterations}
    return options_from_args(InitialModelOptions, args, **extra)


def _subparser(command: str) -> argparse.ArgumentParser:
    commands = next(a for a in build_parser()._actions
                    if isinstance(a, argparse._SubParsersAction))
    return commands.choices[command]


def _cases():
    for command in COMMANDS:
        for action in _subparser(command)._actions:
            if action.option_strings and action.dest not in SKIP:
                yield command, action


@pytest.mark.parametrize("command,action", list(_cases()),
                         ids=lambda v: v if isinstance(v, str) else v.option_strings[0])
def test_each_option_reaches_the_options(command, action):
    parser = build_parser()
    base = [command, "--o", "x", "--i", "p.star"]
    if action.nargs == 0:  # a flag: give the one that is not the default
        flag = next(s for s in action.option_strings if not s.startswith("--no")) \
            if isinstance(action, argparse.BooleanOptionalAction) and not action.default \
            else action.option_strings[0]
        if isinstance(action, argparse.BooleanOptionalAction) and action.default:
            flag = "--no-" + action.option_strings[0][2:]
        words = [flag]
    else:
        words = [action.option_strings[0], VALUES[action.dest]]
    base += NEEDS.get(action.dest, [])
    default = _options(command, parser.parse_args(base))
    args = parser.parse_args(base + words)
    if action.dest in ("threads", "max_memory"):  # run settings, not options
        assert run_settings(args) != run_settings(parser.parse_args(base))
        return
    if action.dest == "use_ctf" and action.const is True:  # --ctf: the default, and undoes
        assert _options(command, parser.parse_args(base + ["--no_ctf", "--ctf"])).use_ctf
        assert not _options(command, parser.parse_args(base + ["--ctf", "--no_ctf"])).use_ctf
        return
    got = _options(command, args)
    assert getattr(got, action.dest) != getattr(default, action.dest), words


def test_every_argument_is_an_option_or_a_run_argument():
    for command in COMMANDS:
        args = build_parser().parse_args([command, "--o", "x"])
        if command != "refine":
            continue
        args.healpix_ordr = 3  # a mistyped destination
        with pytest.raises(TypeError, match="healpix_ordr reach no option"):
            options_from_args(RefineOptions, args)
    assert CONTINUE_ARGUMENTS <= RUN_ARGUMENTS | {"iterations"}


def _all_commands() -> list[str]:
    commands = next(a for a in build_parser()._actions
                    if isinstance(a, argparse._SubParsersAction))
    return sorted(commands.choices)


def test_underscore_spelling_is_canonical():
    for command in _all_commands():
        for action in _subparser(command)._actions:
            first = action.option_strings[0] if action.option_strings else ""
            assert "-" not in first[2:] or first.startswith("--no-"), (command, first)


def test_every_option_accepts_its_hyphen_spelling():
    # RELION spells options with underscores; --a-b is accepted for every --a_b (and
    # --a-b=value too): either an explicit alias or the parser's rewriting to --a_b
    checked = 0
    for command in _all_commands():
        parser = _subparser(command)
        known = parser._option_string_actions
        for name, action in list(known.items()):
            if "_" not in name[2:]:
                continue
            hyphen = "--" + name[2:].replace("_", "-")
            assert hyphen in known and known[hyphen] is action \
                or parser._canonical(hyphen) == name, (command, name)
            assert parser._canonical(hyphen + "=7") in (name + "=7", hyphen + "=7")
            checked += 1
    assert checked > 100, checked  # measured 125 option words in 15 commands; margin 1.25x


def test_hyphen_spelling_parses_like_underscore():
    parser = build_parser()
    base = ["refine", "--i", "p.star", "--o", "out", "--ref", "r.mrc"]
    a = parser.parse_args(base + ["--particle_diameter", "150", "--ini_high=40"])
    b = parser.parse_args(base + ["--particle-diameter", "150", "--ini-high=40"])
    assert vars(a) == vars(b) and a.particle_diameter == 150 and a.ini_high == 40


@pytest.mark.parametrize("command", COMMANDS)
def test_continue_refuses_options_it_would_ignore(command, tmp_path, capsys):
    run = tmp_path / "run"
    assert main([command, "--o", str(run), "--continue", "--healpix_order", "3",
                 "--no_ctf"]) == 2
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1
    assert "--healpix_order" in err and "--no_ctf" in err and "job.json" in err
    assert not run.exists()
    # --iter, --j and --max_memory are the continue's own: no refusal (there is no run here)
    assert main([command, "--o", str(run), "--continue", "--iter", "5", "--j", "1",
                 "--max_memory", "4"]) == 2
    assert "cannot change" not in capsys.readouterr().err
