"""`cryomap` command line: one module per subcommand in this package.

A subcommand module defines COMMAND (its name), HELP (one line), DESCRIPTION (help text with
an example), add_arguments(parser) and run(args) -> int. Input errors (cryomap.errors.
InputError) are printed as one line and exit with code 2, without a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from ..errors import InputError


def _subcommand_modules() -> list:
    from .. import cli

    mods = []
    for info in pkgutil.iter_modules(cli.__path__):
        if info.name.startswith("_") or info.name == "main":
            continue
        mod = importlib.import_module(f"{cli.__name__}.{info.name}")
        if hasattr(mod, "COMMAND"):
            mods.append(mod)
    return sorted(mods, key=lambda m: m.COMMAND)


class HelpFormatter(argparse.RawDescriptionHelpFormatter,
                    argparse.ArgumentDefaultsHelpFormatter):
    """The description as written, and every option's default in its help."""


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every subcommand."""
    from .. import __version__

    parser = argparse.ArgumentParser(
        prog="cryomap",
        description="Cryo-EM reconstruction by Bayesian MAP expectation-maximisation.",
    )
    parser.add_argument("--version", action="version", version=f"cryomap {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True
    for mod in _subcommand_modules():
        p = sub.add_parser(mod.COMMAND, help=mod.HELP, description=mod.DESCRIPTION,
                           formatter_class=HelpFormatter)
        mod.add_arguments(p)
        p.set_defaults(_run=mod.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `cryomap` console script."""
    args = build_parser().parse_args(argv)
    try:
        return int(args._run(args) or 0)
    except InputError as e:
        print(f"cryomap {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"cryomap {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
