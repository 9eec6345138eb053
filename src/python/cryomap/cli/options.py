"""Command-line options shared by refine, class3d and class2d (RELION's spellings, with
dash-style aliases), and their conversion to the options dataclasses."""

from __future__ import annotations

import argparse
from collections.abc import Callable
from dataclasses import fields

import numpy as np

from ..em.options import EMOptions
from ..errors import InputError


def seed_arg(text: str) -> int:
    """argparse type of a random seed: a whole number >= 0 (numpy's seeds)."""
    try:
        value = int(text)
    except ValueError:
        value = -1
    if not 0 <= value < 2**63:
        raise argparse.ArgumentTypeError(f"expected a random seed (a whole number >= 0), got "
                                         f"{text!r}")
    return value


def check_run_memory(parts: dict[str, int], hint: str = "use fewer or smaller images"
                     ) -> int:
    """Refuse (one line) a command whose estimated peak memory (`parts`, bytes) is over the
    default budget (a share of the memory available; em.options.default_max_memory)."""
    from ..em.options import DEFAULT_MEMORY_SHARE, default_max_memory
    from ..jobs.base import RUNTIME_BYTES, check_memory

    return check_memory({"runtime": RUNTIME_BYTES, **parts}, default_max_memory(), hint,
                        option=f"memory ({100 * DEFAULT_MEMORY_SHARE:.0f}% of the available)")


def add_em_arguments(p: argparse.ArgumentParser, defaults: EMOptions,
                     exclude: tuple[str, ...] = ()) -> None:
    """Inputs, outputs, sampling, model and run options of every E/M command, less those
    whose destination is in `exclude` (options a command would accept and ignore). RELION's
    underscore spelling first (the one --help shows), the dash spelling an alias."""
    d = defaults

    def add(*names: str, **kwargs) -> None:
        dest = kwargs.get("dest", names[0].lstrip("-").replace("-", "_"))
        if dest not in exclude:
            p.add_argument(*names, **kwargs)

    add("--i", help="particles: RELION STAR file (3.0 or 3.1+) or cryoSPARC .cs")
    add("--o", required=True, help="output folder")
    add("--ref", help="initial reference (MRC); box and pixel size as the particles")
    add("--angpix", type=float, default=None,
        help="pixel size (Å) of particles whose files lack one")
    add("--healpix_order", "--healpix-order", type=int, default=d.healpix_order,
        help="HEALPix order of the orientation grid (2 = 15 degrees)")
    add("--oversampling", type=int, default=d.oversampling,
        help="adaptive oversampling: levels of finer samples around the "
             "significant ones (RELION's --oversampling)")
    add("--psi_step", "--psi-step", type=float, default=d.psi_step,
        help="in-plane angular step in degrees (default: the HEALPix step in 3D, "
             "10 in 2D)")
    add("--offset_range", "--offset-range", type=float, default=d.offset_range,
        help="translation search range (px)")
    add("--offset_step", "--offset-step", type=float, default=d.offset_step,
        help="translation search step (px)")
    add("--offset", "--offset_sigma", "--offset-sigma", dest="offset_sigma",
        type=float, default=d.offset_sigma,
        help="initial std. dev. of the Gaussian prior on origins (Å), learned "
             "every iteration as RELION does")
    add("--sigma_ang", "--sigma-ang", type=float, default=d.sigma_ang,
        help="local searches: std. dev. (degrees) of the Gaussian prior around each "
             "particle's input pose (searched to 3 sigma)")
    add("--ini_high", "--ini-high", type=float, default=d.ini_high,
        help="low-pass the initial reference to this resolution (Å)")
    add("--particle_diameter", "--particle-diameter", type=float, default=None,
        help="particle mask diameter (Å); default (box - 5) px")
    add("--maskedge", dest="mask_edge", type=float, default=d.mask_edge,
        help="width of the mask's soft edge (px)")
    add("--tau2_fudge", "--tau2-fudge", type=float, default=d.tau2_fudge,
        help="regularisation parameter T")
    add("--pad", type=int, default=d.pad, help="padding factor (1 or 2)")
    add("--interp", default=d.interp, help="Fourier interpolation: nearest, linear")
    add("--force_max", "--force-max", dest="force_max", action="store_true",
        help="take the best pose instead of marginalising over poses")
    add("--adaptive_fraction", "--adaptive-fraction", type=float,
        default=d.adaptive_fraction,
        help="posterior mass kept per particle (significant samples)")
    add("--noise_model", "--noise-model", dest="noise_model", default=d.noise_model,
        help="sigma2 per resolution shell (shell, RELION) or per pixel (pixel)")
    add("--incr_size", "--incr-size", type=int, default=d.incr_size,
        help="Fourier shells beyond the current resolution used in the E-step")
    add("--perturb", type=float, default=d.perturb,
        help="random offset of the sampling grids each iteration, in steps")
    add("--sym", default="C1",
        help="point-group symmetry (RELION's names: C<n>, D<n>, T, O, I, I1-I4; "
             "docs/symmetry.md)")
    add("--ctf", dest="use_ctf", action="store_true", default=True,
        help="correct for the CTF (the default; RELION's flag)")
    add("--no_ctf", "--no-ctf", dest="use_ctf", action="store_false",
        help="data without CTF (no defocus columns needed)")
    add("--scale", dest="scale", action=argparse.BooleanOptionalAction, default=d.scale,
        help="per-particle amplitude correction: each image's scale a_i is estimated every "
             "iteration and written as rlnCtfScalefactor (RELION's --scale; "
             "docs/method.md eq. (30)); --no-scale: a_i = 1")
    add("--j", "--threads", dest="threads", type=int, default=None,
        help="OpenMP threads (default: all cores)")
    add("--max_memory", "--max-memory", type=float, default=None,
        help="memory budget (GiB): batches and the image cache are sized to fit it "
             "and a run whose estimated peak exceeds it is refused before it starts "
             "(default: 80%% of the memory available; with --continue, the run's)")
    add("--seed", "--random_seed", type=seed_arg, default=d.seed,
        help="random seed")
    add("--continue", dest="resume", action="store_true",
        help="continue the run in --o from its last finished iteration")


def run_settings(args: argparse.Namespace, saved: dict | None = None
                 ) -> tuple[int | None, float | None]:
    """(threads, max_memory GiB) of a run: the command line's, else (with --continue) those
    the run recorded in job.json, so that a continued run computes as the first part did
    (the thread count changes sums in the last bits). Checked: InputError, one line."""
    threads, memory = args.threads, args.max_memory
    where = "--j"
    if threads is None and saved is not None and saved.get("threads") is not None:
        threads, where = saved["threads"], "job.json threads"
    if threads is not None and (not isinstance(threads, int) or isinstance(threads, bool)
                                or threads < 1):
        raise InputError(f"{where} {threads}: expected at least 1 thread")
    where = "--max_memory"
    if memory is None and saved is not None and saved.get("max_memory") is not None:
        memory, where = saved["max_memory"], "job.json max_memory"
    if memory is not None and not (isinstance(memory, (int, float))
                                   and not isinstance(memory, bool)
                                   and np.isfinite(memory) and memory > 0):
        raise InputError(f"{where} {memory}: expected a size > 0 GiB")
    return threads, (None if memory is None else float(memory))


#: Arguments an E/M command reads itself, not through its options dataclass.
RUN_ARGUMENTS = frozenset({"i", "o", "ref", "angpix", "threads", "max_memory", "resume", "mpi",
                           "command"})
#: What `--continue` without `--i` takes from the command line; the rest is the run's own
#: (job.json).
CONTINUE_ARGUMENTS = frozenset({"o", "resume", "iterations", "threads", "max_memory", "mpi",
                                "command"})


def options_from_args(cls: type, args: argparse.Namespace, **extra):
    """An options dataclass from parsed arguments: every field that the arguments name, plus
    `extra`; validated (InputError on a value out of range). An argument that is neither a
    field nor one of RUN_ARGUMENTS is a programming error (TypeError), never dropped."""
    run_settings(args)
    names = {f.name for f in fields(cls)}
    stray = sorted(k for k in vars(args) if not k.startswith("_") and k not in names
                   and k not in RUN_ARGUMENTS and k not in extra)
    if stray:
        raise TypeError(f"{cls.__name__}: argument(s) {', '.join(stray)} reach no option")
    values = {k: v for k, v in vars(args).items() if k in names}
    values.update(extra)
    options = cls(**values)
    options.validate()
    from ..symmetry import point_group  # imports healpy: only when a command runs

    options.sym = point_group(options.sym).name  # canonical spelling in job.json and logs
    return options


def given_options(args: argparse.Namespace, parser: argparse.ArgumentParser) -> dict[str, str]:
    """dest -> the option string of each option the command line gave a value other than its
    default (the spelling of the flag that set it, where several share a dest)."""
    actions = [a for a in parser._actions if a.option_strings and a.dest != "help"]
    defaults: dict = {}
    for a in actions:  # a dest's default: its first action's that is not SUPPRESS
        if a.default is not argparse.SUPPRESS:
            defaults.setdefault(a.dest, a.default)
    out: dict[str, str] = {}
    for action in actions:
        if not hasattr(args, action.dest):
            continue
        value = getattr(args, action.dest)
        if action.dest in defaults and value == defaults[action.dest]:
            continue
        if action.dest not in out or getattr(action, "const", None) == value:
            out[action.dest] = action.option_strings[0]
    return out


def refuse_continue_changes(args: argparse.Namespace) -> None:
    """`--continue` without `--i` continues with the run's own options (job.json): any other
    option given is refused with one line instead of being dropped silently."""
    given = {d: o for d, o in given_options(args, args._parser).items()
             if d not in CONTINUE_ARGUMENTS}
    if given:
        raise InputError(f"--continue: {', '.join(sorted(given.values()))} cannot change the run "
                         f"in {args.o}: it continues with its own options (job.json); only "
                         f"--iter, --j and --max_memory may be given")


def continued_run(args: argparse.Namespace, saved_run: Callable[[str], dict]
                  ) -> tuple[dict, int | None, float | None]:
    """`--continue` without `--i`: the run's job.json (`saved_run(--o)`, its options with
    --iter applied), threads and memory budget (`run_settings`); other options refused
    (`refuse_continue_changes`)."""
    refuse_continue_changes(args)
    job = saved_run(args.o)
    if args.iterations is not None:
        job["options"].iterations = args.iterations
        job["options"].validate()
    threads, memory = run_settings(args, job)
    return job, threads, memory


def job_particle_diameter(value: float | None, star) -> float | None:
    """--particle_diameter (Å) of a command that reads a job's outputs: the value given
    (InputError unless > 0), else the job's own (its job.json beside `star`, read by
    `jobs.base.read_job_file`), else None."""
    from pathlib import Path

    from ..jobs.base import read_job_file

    if value is not None:
        if not (np.isfinite(value) and value > 0):
            raise InputError(f"--particle_diameter {value}: expected a diameter > 0 Å")
        return float(value)
    try:
        saved = read_job_file(Path(star).parent, "job")["options"].get("particle_diameter")
    except InputError:  # no readable job file: the command's default
        return None
    return float(saved) if isinstance(saved, (int, float)) and saved > 0 else None
