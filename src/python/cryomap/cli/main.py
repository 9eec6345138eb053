"""`cryomap` command line: one module per subcommand in this package.

A subcommand module defines COMMAND (its name), HELP (one line), DESCRIPTION (help text with
an example), add_arguments(parser) and run(args) -> int. Every input error is printed as one
line, `cryomap COMMAND: error: ...`, and exits with code 2, without a traceback: options that
argparse refuses, cryomap.errors.InputError (a value out of range, a bad file, an output
folder that cannot be written), and as a last resort any OSError or MemoryError.
"""

from __future__ import annotations

import argparse
import importlib
import pkgutil
import sys

from .. import parallel
from ..errors import InputError, one_line


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


class Parser(argparse.ArgumentParser):
    """argparse with one-line errors, like every other input error of cryomap (no usage
    block: it can run to dozens of lines and bury the message)."""

    def error(self, message: str):
        self.exit(2, f"{self.prog}: error: {message} (see {self.prog} --help)\n")

    def parse_known_args(self, args=None, namespace=None):
        """Options in RELION's underscore spelling, with hyphens accepted for every one of
        them (--particle-diameter = --particle_diameter; docs/running.md)."""
        words = sys.argv[1:] if args is None else list(args)
        return super().parse_known_args([self._canonical(w) for w in words], namespace)

    def _canonical(self, word: str) -> str:
        """The spelling this parser knows of an option word `--a-b[=value]` (unchanged when
        it knows it as given, or knows no underscore form of it)."""
        if not word.startswith("--"):
            return word
        name, eq, value = word.partition("=")
        known = self._option_string_actions
        underscored = "--" + name[2:].replace("-", "_")
        if name in known or underscored not in known:
            return word
        return underscored + eq + value


def build_parser() -> argparse.ArgumentParser:
    """The top-level parser with every subcommand."""
    from .. import __version__

    parser = Parser(
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
        if mod.COMMAND in parallel.MPI_COMMANDS:
            p.add_argument("--mpi", action="store_true",
                           help="run as one rank of an MPI job (implied under mpirun; "
                                "docs/mpi.md)")
            p.set_defaults(_ranks=parallel.SINGLE)  # mpi.run_worker sets its MPIContext
        p.set_defaults(_run=mod.run, _parser=p)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `cryomap` console script."""
    words = sys.argv[1:] if argv is None else list(argv)
    if parallel.requested(words):  # one rank of a parallel run (docs/mpi.md)
        from ..parallel.launch import launch

        code = launch(words, build_parser)
        if code is not None:
            return code
    try:
        args = build_parser().parse_args(argv)
    except SystemExit as e:  # --help, --version, or a refused option (one line printed)
        return e.code if isinstance(e.code, int) else 2
    try:
        return int(args._run(args) or 0)
    except InputError as e:
        print(f"cryomap {args.command}: error: {one_line(str(e))}", file=sys.stderr)
        return 2
    except OSError as e:  # a file the checks could not foresee (e.g. removed meanwhile)
        where = f"{e.filename}: " if e.filename else ""
        print(f"cryomap {args.command}: error: {where}{e.strerror or e}", file=sys.stderr)
        return 2
    except MemoryError:
        print(f"cryomap {args.command}: error: out of memory; lower --max_memory (it sizes "
              f"the batches) or the sampling, or free memory", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"cryomap {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
