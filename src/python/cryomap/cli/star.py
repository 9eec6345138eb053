"""`cryomap star`: subsets, merges and splits of particle files (RELION's
relion_star_handler --select / --combine / --split)."""

from __future__ import annotations

import argparse
import glob
import secrets
from pathlib import Path

from ..errors import InputError

COMMAND = "star"
HELP = "subset, merge or split particle STAR files (as relion_star_handler)"
DESCRIPTION = """\
Work on RELION 3.1+ particle files (data_optics + data_particles) without reading their images;
every column is kept. One of three modes, with relion_star_handler's options:
  subset:  --select LABEL --minval A --maxval B   rows whose LABEL lies within [A, B] (either
           bound may be left out), and/or --classes K,...  rows of these rlnClassNumber;
  merge:   --combine FILE FILE ...  (or RELION's --combine --i "a.star b.star"; wildcards
           allowed): optics groups renumbered (same name and optics: joined; a name taken by
           other optics: made unique), every file must have the same particle columns;
           --check_duplicates LABEL reports repeated values of LABEL;
  split:   --split --nr_split N and/or --size_split M  into <o>_split1.star, <o>_split2.star,
           ...; --random_order shuffles first (--random_seed S repeats a shuffle).
Details and what differs from RELION: docs/particles.md.

examples:
  cryomap star --i Class3D/job010/run_it025_data.star --o Select/job011/particles.star \\
      --select rlnClassNumber --minval 2 --maxval 3
  cryomap star --i run_data.star --o good.star --classes 1,3
  cryomap star --combine Extract/job005/particles.star Extract/job006/particles.star \\
      --o Join/job007/particles.star
  cryomap star --i particles.star --o subsets/particles.star --split --nr_split 3 \\
      --random_order --random_seed 7
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--i", default=None, metavar="STAR",
                   help="input particle file (with --combine: file names separated by spaces)")
    p.add_argument("--o", required=True, metavar="STAR",
                   help="output particle file (with --split: the name the parts are named after)")
    p.add_argument("--select", dest="column", default=None, metavar="LABEL",
                   help="keep the rows whose LABEL lies within --minval, --maxval")
    p.add_argument("--minval", type=float, default=None, help="lowest value kept (--select)")
    p.add_argument("--maxval", type=float, default=None, help="highest value kept (--select)")
    p.add_argument("--classes", nargs="+", default=None, metavar="K",
                   help="keep the rows of these classes (rlnClassNumber), e.g. 1,3 or 1 3")
    p.add_argument("--combine", nargs="*", default=None, metavar="STAR",
                   help="merge these particle files (and those of --i)")
    p.add_argument("--check_duplicates", "--check-duplicates", default=None, metavar="LABEL",
                   help="--combine: report the rows that repeat a value of LABEL "
                        "(e.g. rlnImageName)")
    p.add_argument("--split", action="store_true", help="split --i into parts")
    p.add_argument("--nr_split", "--nr-split", type=int, default=None, metavar="N",
                   help="--split: into N parts of equal size (+-1)")
    p.add_argument("--size_split", "--size-split", type=int, default=None, metavar="M",
                   help="--split: into parts of M rows (with --nr_split: N parts of M rows)")
    p.add_argument("--random_order", "--random-order", action="store_true",
                   help="--split: shuffle the rows first")
    p.add_argument("--random_seed", "--random-seed", type=int, default=-1, metavar="S",
                   help="--random_order: the shuffle's seed (-1: a new one, printed)")


def _classes(words: list[str] | None) -> list[int] | None:
    """--classes 1,3 or --classes 1 3 -> [1, 3]."""
    if words is None:
        return None
    items = [t for w in words for t in w.split(",") if t.strip()]
    try:
        classes = [int(t) for t in items]
    except ValueError:
        raise InputError(f"--classes {' '.join(words)}: expected class numbers such as 1,3"
                         ) from None
    if not classes or min(classes) < 1:
        raise InputError(f"--classes {' '.join(words)}: classes are numbered from 1")
    return classes


def _mode(args: argparse.Namespace) -> str:
    """Which mode the options ask for; InputError when none, or more than one."""
    modes = [m for m, on in (("subset", args.column is not None or args.classes is not None),
                             ("merge", args.combine is not None), ("split", args.split)) if on]
    if len(modes) != 1:
        raise InputError("give one of --select/--classes (subset), --combine (merge) or "
                         "--split (split)" + (f"; got {' and '.join(modes)}" if modes else ""))
    mode = modes[0]
    if mode != "subset" and (args.minval is not None or args.maxval is not None):
        raise InputError("--minval/--maxval: only with --select LABEL")
    if mode != "merge" and args.check_duplicates is not None:
        raise InputError("--check_duplicates: only with --combine")
    if mode != "split":
        for name in ("nr_split", "size_split"):
            if getattr(args, name) is not None:
                raise InputError(f"--{name}: only with --split")
        if args.random_order:
            raise InputError("--random_order: only with --split")
    if args.random_seed != -1 and not args.random_order:
        raise InputError(f"--random_seed {args.random_seed}: only with --random_order")
    if args.random_seed < -1:
        raise InputError(f"--random_seed {args.random_seed}: expected >= 0 (or -1: a new seed)")
    if mode == "subset":
        if (args.minval is not None or args.maxval is not None) and args.column is None:
            raise InputError("--minval/--maxval: give the column with --select LABEL")
        if args.column is not None and args.minval is None and args.maxval is None:
            raise InputError(f"--select {args.column}: give --minval and/or --maxval")
        if args.minval is not None and args.maxval is not None and args.minval > args.maxval:
            raise InputError(f"--minval {args.minval:g} > --maxval {args.maxval:g}; expected "
                             f"--minval <= --maxval")
    if mode != "merge" and args.i is None:
        raise InputError("--i: the input particle file is required")
    return mode


def _merge_inputs(args: argparse.Namespace) -> list[Path]:
    """The files of --combine and --i, wildcards expanded (in sorted order, as RELION)."""
    words = (args.i.split() if args.i else []) + list(args.combine)
    paths: list[Path] = []
    for w in words:
        if glob.has_magic(w):
            found = sorted(glob.glob(w))
            if not found:
                raise InputError(f"--combine {w}: matches no file")
            paths += [Path(f) for f in found]
        else:
            paths.append(Path(w))
    if len(paths) < 2:
        raise InputError(f"--combine: {len(paths)} file(s) given; expected two or more to merge")
    return paths


def _subset(args: argparse.Namespace, out: Path) -> list[tuple[Path, dict]]:
    from ..select import select_rows
    from ..starops import read_tables

    classes = _classes(args.classes)
    src = read_tables(args.i)
    keep = select_rows(src.particles, str(src.path), classes, args.column, args.minval,
                       args.maxval)
    if not keep.any():
        raise InputError(f"{src.path}: no particle passes the selection; nothing written")
    print(f"kept {int(keep.sum())} of {len(keep)} particles")
    return [(out, src.with_particles(src.particles[keep]))]


def _merge(args: argparse.Namespace, out: Path) -> list[tuple[Path, dict]]:
    from ..starops import check_output, combine, duplicate_count, read_tables

    paths = _merge_inputs(args)
    check_output(out, paths)
    files = [read_tables(p, "--combine") for p in paths]
    optics, particles, notes = combine(files)
    if args.check_duplicates is not None:
        if args.check_duplicates not in particles.columns:
            raise InputError(f"--check_duplicates {args.check_duplicates}: no such column in "
                             f"the merged particles")
        n = duplicate_count(particles, args.check_duplicates)
        notes.append(f"{n} row(s) repeat an earlier row's {args.check_duplicates}")
    others = sorted({k for f in files for k in f.blocks if k not in ("optics", "particles")})
    if others:
        notes.append(f"block(s) {', '.join('data_' + k for k in others)} not merged (only "
                     f"data_optics and data_particles are written)")
    for note in notes:
        print(note)
    print(f"merged {len(particles)} particles of {len(files)} files in {len(optics)} optics "
          f"group(s)")
    return [(out, {"optics": optics, "particles": particles})]


def _split(args: argparse.Namespace, out: Path) -> list[tuple[Path, dict]]:
    from ..starops import check_output, read_tables, split_indices, split_names

    nr, size = args.nr_split, args.size_split
    if nr is None and size is None:
        raise InputError("--split: give --nr_split N and/or --size_split M")
    src = read_tables(args.i)
    n = len(src.particles)
    if size is None and not 2 <= nr <= n:
        raise InputError(f"--nr_split {nr}: expected 2..{n} (the number of particles in "
                         f"{src.path})")
    if nr is None and not 1 <= size < n:
        raise InputError(f"--size_split {size}: expected 1..{n - 1} ({n} particles in "
                         f"{src.path})")
    if nr is not None and size is not None and not (nr >= 1 and size >= 1 and nr * size <= n):
        raise InputError(f"--nr_split {nr} --size_split {size}: expected both >= 1 and "
                         f"nr_split x size_split <= {n} (the particles in {src.path})")
    seed = None
    if args.random_order:
        seed = args.random_seed if args.random_seed >= 0 else secrets.randbelow(2**31)
        print(f"random order of --random_seed {seed}")
    parts = split_indices(n, nr, size, seed)
    names = split_names(out, len(parts))
    for name in names:
        check_output(name, [src.path])
    for name, rows in zip(names, parts, strict=True):
        print(f"{name}: {len(rows)} particles")
    return [(name, src.with_particles(src.particles.iloc[rows]))
            for name, rows in zip(names, parts, strict=True)]


def _first_part(out: Path) -> Path:
    """The first part's name of a split: what --o must allow before the input is read."""
    from ..starops import split_names

    return split_names(out, 1)[0]


def run(args: argparse.Namespace) -> int:
    from ..io.atomic import make_output_dir
    from ..starops import check_output, write_all

    mode = _mode(args)
    out = Path(args.o)
    if out.is_dir():
        raise InputError(f"--o {out}: is a folder; expected a file name")
    if mode != "merge":
        check_output(out if mode == "subset" else _first_part(out), [Path(args.i)])
    outputs = {"subset": _subset, "merge": _merge, "split": _split}[mode](args, out)
    make_output_dir(out.parent, "--o")
    write_all(outputs)
    for path, _ in outputs:
        print(f"wrote {path}")
    return 0
