"""Command-line options shared by refine, class3d and class2d (RELION's spellings, with
dash-style aliases), and their conversion to the options dataclasses."""

from __future__ import annotations

import argparse
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


def add_em_arguments(p: argparse.ArgumentParser, defaults: EMOptions) -> None:
    """Inputs, outputs, sampling, model and run options of every E/M command."""
    d = defaults
    p.add_argument("--i", help="particles: RELION STAR file (3.0 or 3.1+) or cryoSPARC .cs")
    p.add_argument("--o", required=True, help="output folder")
    p.add_argument("--ref", help="initial reference (MRC); box and pixel size as the particles")
    p.add_argument("--angpix", type=float, default=None,
                   help="pixel size (Å) of particles whose files lack one")
    p.add_argument("--healpix_order", "--healpix-order", type=int, default=d.healpix_order,
                   help="HEALPix order of the orientation grid (2 = 15 degrees)")
    p.add_argument("--oversampling", type=int, default=d.oversampling,
                   help="adaptive oversampling: levels of finer samples around the "
                        "significant ones (RELION's --oversampling)")
    p.add_argument("--psi_step", "--psi-step", type=float, default=d.psi_step,
                   help="in-plane angular step in degrees (default: the HEALPix step in 3D, "
                        "10 in 2D)")
    p.add_argument("--offset_range", "--offset-range", type=float, default=d.offset_range,
                   help="translation search range (px)")
    p.add_argument("--offset_step", "--offset-step", type=float, default=d.offset_step,
                   help="translation search step (px)")
    p.add_argument("--offset", "--offset_sigma", "--offset-sigma", dest="offset_sigma",
                   type=float, default=d.offset_sigma,
                   help="initial std. dev. of the Gaussian prior on origins (Å), learned "
                        "every iteration as RELION does")
    p.add_argument("--sigma_ang", "--sigma-ang", type=float, default=d.sigma_ang,
                   help="local searches: std. dev. (degrees) of the Gaussian prior around each "
                        "particle's input pose (searched to 3 sigma)")
    p.add_argument("--ini_high", "--ini-high", type=float, default=d.ini_high,
                   help="low-pass the initial reference to this resolution (Å)")
    p.add_argument("--particle_diameter", "--particle-diameter", type=float, default=None,
                   help="particle mask diameter (Å); default (box - 5) px")
    p.add_argument("--maskedge", dest="mask_edge", type=float, default=d.mask_edge,
                   help="width of the mask's soft edge (px)")
    p.add_argument("--tau2_fudge", "--tau2-fudge", type=float, default=d.tau2_fudge,
                   help="regularisation parameter T")
    p.add_argument("--pad", type=int, default=d.pad, help="padding factor (1 or 2)")
    p.add_argument("--interp", default=d.interp, help="Fourier interpolation: nearest, linear")
    p.add_argument("--force-max", "--force_max", dest="force_max", action="store_true",
                   help="take the best pose instead of marginalising over poses")
    p.add_argument("--adaptive_fraction", "--adaptive-fraction", type=float,
                   default=d.adaptive_fraction,
                   help="posterior mass kept per particle (significant samples)")
    p.add_argument("--noise-model", "--noise_model", dest="noise_model", default=d.noise_model,
                   help="sigma2 per resolution shell (shell, RELION) or per pixel (pixel)")
    p.add_argument("--incr_size", "--incr-size", type=int, default=d.incr_size,
                   help="Fourier shells beyond the current resolution used in the E-step")
    p.add_argument("--perturb", type=float, default=d.perturb,
                   help="random offset of the sampling grids each iteration, in steps")
    p.add_argument("--sym", default="C1",
                   help="point-group symmetry (RELION's names: C<n>, D<n>, T, O, I, I1-I4; "
                        "docs/symmetry.md)")
    p.add_argument("--ctf", action="store_true", default=True,
                   help="correct for the CTF (the default; RELION's flag, accepted)")
    p.add_argument("--no-ctf", "--no_ctf", dest="use_ctf", action="store_false",
                   help="data without CTF (no defocus columns needed)")
    p.add_argument("--j", "--threads", dest="threads", type=int, default=None,
                   help="OpenMP threads (default: all cores)")
    p.add_argument("--max_memory", "--max-memory", type=float, default=None,
                   help="memory budget (GiB): batches and the image cache are sized to fit it "
                        "and a run whose estimated peak exceeds it is refused before it starts "
                        "(default: 80%% of the memory available; with --continue, the run's)")
    p.add_argument("--seed", "--random_seed", type=seed_arg, default=d.seed,
                   help="random seed")
    p.add_argument("--continue", dest="resume", action="store_true",
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


def options_from_args(cls: type, args: argparse.Namespace, **extra):
    """An options dataclass from parsed arguments: every field that the arguments name, plus
    `extra`; validated (InputError on a value out of range)."""
    run_settings(args)
    names = {f.name for f in fields(cls)}
    values = {k: v for k, v in vars(args).items() if k in names}
    values.update(extra)
    options = cls(**values)
    options.validate()
    from ..symmetry import point_group  # imports healpy: only when a command runs

    options.sym = point_group(options.sym).name  # canonical spelling in job.json and logs
    return options
