"""Options shared by every E/M job (RELION's names and defaults), checked in one place, and
the memory a run may use (--max_memory)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import projector
from ..errors import InputError

#: Finest HEALPix order a search may reach (RELION's grids stop at 8 as well in practice).
MAX_HEALPIX_ORDER = 8


#: Share of the memory available at the start that a run may use by default.
DEFAULT_MEMORY_SHARE = 0.8


def bad_option(name: str, value, expected: str) -> InputError:
    """The one-line error for an option out of range."""
    return InputError(f"--{name} {value}: expected {expected}")


def _meminfo(field: str) -> int | None:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def _cgroup_headroom() -> int | None:
    """Bytes this process's cgroup (v2) may still take, or None without a limit."""
    try:
        cg = Path("/proc/self/cgroup").read_text().strip().splitlines()[0].split(":", 2)[2]
        base = Path("/sys/fs/cgroup") / cg.lstrip("/")
        limit = (base / "memory.max").read_text().strip()
        if limit == "max":
            return None
        return max(0, int(limit) - int((base / "memory.current").read_text()))
    except (OSError, ValueError, IndexError):
        return None


def available_memory() -> int:
    """Bytes of memory available to a run now: MemAvailable, or the cgroup's headroom where
    that is smaller (8 GiB when neither is known)."""
    sizes = [v for v in (_meminfo("MemAvailable"), _cgroup_headroom()) if v is not None]
    return min(sizes) if sizes else 8 << 30


def default_max_memory() -> int:
    """The default memory budget of a run (bytes): DEFAULT_MEMORY_SHARE of what is available."""
    return int(DEFAULT_MEMORY_SHARE * available_memory())


def max_memory_bytes(max_memory_gib: float | None) -> int:
    """--max_memory (GiB; None: the default share of the available memory) in bytes."""
    if max_memory_gib is None:
        return default_max_memory()
    if not (np.isfinite(max_memory_gib) and max_memory_gib > 0):
        raise bad_option("max_memory", max_memory_gib, "a size > 0 GiB")
    return int(max_memory_gib * 2**30)


@dataclass
class EMOptions:
    """Sampling, model and run options of refine, class3d and class2d."""

    healpix_order: int = 2
    auto_local_healpix_order: int = 4  # the schedule's searches are local from this order
    oversampling: int = 1
    psi_step: float | None = None  # degrees; default: the HEALPix step (3D), 10 (2D)
    offset_range: float = 6.0  # px
    offset_step: float = 2.0  # px
    offset_sigma: float = 10.0  # Å, initial std. dev. of the origin prior (RELION's --offset)
    sigma_ang: float | None = None  # degrees: local searches around the input poses
    ini_high: float = 40.0  # Å
    particle_diameter: float | None = None  # Å; default (N - 5)·pix
    mask_edge: float = 5.0  # px
    tau2_fudge: float = 1.0
    pad: int = 2
    interp: str = "linear"
    force_max: bool = False
    adaptive_fraction: float = 0.999
    noise_model: str = "shell"  # "shell" (RELION) or "pixel" (eq. (15) per pixel)
    incr_size: int = 10
    use_ctf: bool = True
    perturb: float = 0.5
    seed: int = 0
    batch_memory: int = 512 << 20  # bytes for one batch's posterior and slice arrays
    sym: str = "C1"  # point group (RELION's --sym; docs/symmetry.md)
    scale: bool = True  # per-particle amplitude correction (RELION's --scale; eq. (30))

    def validate(self) -> None:
        """Every option in range: InputError naming the option and the expected range."""
        o = self
        if not 0 <= o.healpix_order <= MAX_HEALPIX_ORDER:
            raise bad_option("healpix_order", o.healpix_order, f"0..{MAX_HEALPIX_ORDER}")
        if not 0 <= o.auto_local_healpix_order <= MAX_HEALPIX_ORDER + 1:
            raise bad_option("auto_local_healpix_order", o.auto_local_healpix_order,
                             f"0..{MAX_HEALPIX_ORDER + 1}")
        if not 0 <= o.oversampling <= 3:
            raise bad_option("oversampling", o.oversampling, "0..3")
        if o.healpix_order + o.oversampling > MAX_HEALPIX_ORDER + 1:
            raise bad_option("oversampling", o.oversampling,
                             f"healpix_order + oversampling <= {MAX_HEALPIX_ORDER + 1}")
        if o.psi_step is not None and not (np.isfinite(o.psi_step) and 0 < o.psi_step <= 360):
            raise bad_option("psi_step", o.psi_step, "a step in (0, 360] degrees")
        if not (np.isfinite(o.offset_range) and o.offset_range >= 0):
            raise bad_option("offset_range", o.offset_range, "a range >= 0 px")
        if not (np.isfinite(o.offset_step) and o.offset_step > 0):
            raise bad_option("offset_step", o.offset_step, "a step > 0 px")
        if o.offset_range / o.offset_step > 100:
            raise bad_option("offset_range", o.offset_range,
                             f"at most 100 steps of {o.offset_step:g} px")
        if not (np.isfinite(o.offset_sigma) and o.offset_sigma > 0):
            raise bad_option("offset_sigma", o.offset_sigma, "a standard deviation > 0 Å")
        if o.sigma_ang is not None and not (np.isfinite(o.sigma_ang) and 0 < o.sigma_ang <= 180):
            raise bad_option("sigma_ang", o.sigma_ang, "a standard deviation in (0, 180] degrees")
        if not (np.isfinite(o.ini_high) and o.ini_high > 0):
            raise bad_option("ini_high", o.ini_high, "a resolution > 0 Å")
        if o.particle_diameter is not None and not (np.isfinite(o.particle_diameter)
                                                    and o.particle_diameter > 0):
            raise bad_option("particle_diameter", o.particle_diameter, "a diameter > 0 Å")
        if not (np.isfinite(o.mask_edge) and o.mask_edge >= 0):
            raise bad_option("maskedge", o.mask_edge, "a width >= 0 px")
        if not (np.isfinite(o.tau2_fudge) and o.tau2_fudge > 0):
            raise bad_option("tau2_fudge", o.tau2_fudge, "a regularisation parameter > 0")
        if o.pad not in (1, 2):
            raise bad_option("pad", o.pad, "1 or 2")
        if o.interp not in projector.INTERP:
            raise bad_option("interp", o.interp, f"one of {sorted(projector.INTERP)}")
        if not (np.isfinite(o.adaptive_fraction) and 0 < o.adaptive_fraction <= 1):
            raise bad_option("adaptive_fraction", o.adaptive_fraction, "a fraction in (0, 1]")
        if o.noise_model not in ("shell", "pixel"):
            raise bad_option("noise-model", o.noise_model, "shell or pixel")
        if o.incr_size < 1:
            raise bad_option("incr_size", o.incr_size, "at least 1 shell")
        if not (np.isfinite(o.perturb) and 0 <= o.perturb <= 1):
            raise bad_option("perturb", o.perturb, "a fraction of a step in [0, 1]")
        if o.batch_memory < 1 << 20:
            raise bad_option("batch_memory", o.batch_memory, "at least 1 MiB")
        check_symmetry(o.sym, o.healpix_order, getattr(o, "ndim", 3))
        if not 0 <= o.seed < 2**63:
            raise bad_option("seed", o.seed, "a random seed >= 0")

    def validate_for(self, box: int, pixel_size: float) -> None:
        """The options that depend on the particles' box (px) and pixel size (Å), checked
        once the particles are loaded: the mask fits the box, translations stay inside it."""
        o = self
        size = box * pixel_size
        if o.particle_diameter is not None and not (
                2 * pixel_size <= o.particle_diameter <= size):
            raise bad_option("particle_diameter", f"{o.particle_diameter:g}",
                             f"a diameter of {2 * pixel_size:g}..{size:g} Å (2 px up to the "
                             f"box, {box} px of {pixel_size:g} Å)")
        if not o.mask_edge < box / 2:
            raise bad_option("maskedge", f"{o.mask_edge:g}", f"a width < {box / 2:g} px (half "
                             f"the box)")
        if o.particle_diameter is None and (box - 5) / 2.0 - o.mask_edge < 1:
            raise bad_option("maskedge", f"{o.mask_edge:g}",
                             f"a width < {(box - 7) / 2:g} px (the default mask, (box - 5)/2 - "
                             f"edge px, must be >= 1 px), or give --particle_diameter")
        if not o.offset_range <= box / 2:
            raise bad_option("offset_range", f"{o.offset_range:g}",
                             f"a range <= {box / 2:g} px (half the box)")


def check_symmetry(name: str, healpix_order: int, ndim: int = 3) -> str:
    """The canonical name of a --sym group (InputError, one line, if unknown, if a 2D run
    asks for one, or if an icosahedral group meets a HEALPix order below 2, where its
    asymmetric unit holds no direction)."""
    from ..symmetry import point_group

    g = point_group(name, "--sym")
    if g.order > 1 and ndim == 2:
        raise bad_option("sym", name, "C1 for 2D classification (no point-group symmetry)")
    if g.family == "I" and healpix_order < 2:
        raise InputError(f"--sym {name} with --healpix_order {healpix_order}: icosahedral "
                         f"symmetry needs --healpix_order 2 or more (its asymmetric unit holds "
                         f"no direction at coarser orders)")
    return g.name
