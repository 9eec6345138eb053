"""`cryomap postprocess`: mask-corrected FSC, resolution and a sharpened map from two half maps
(RELION's relion_postprocess and its option names)."""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import pandas as pd

from ..errors import InputError
from .options import seed_arg

COMMAND = "postprocess"
HELP = "gold-standard resolution and a sharpened map from two half maps (as relion_postprocess)"
DESCRIPTION = """\
Post-process the two unfiltered half maps of a refinement, as relion_postprocess does: FSC of
the unmasked and of the masked half maps, FSC of masked half maps whose phases were randomised
beyond the resolution where the unmasked FSC drops below --randomize_at_fsc, the mask-corrected
FSC and the final resolution (last shell before it drops below 0.143); then the average of the
halves, weighted by sqrt(2 FSC/(1 + FSC)), sharpened by a B-factor (--auto_bfac: fitted to the
Guinier plot; or --adhoc_bfac) and low-passed. Outputs in the --o folder: postprocess.mrc,
postprocess_masked.mrc, postprocess.star (RELION's labels), postprocess_fsc.png,
postprocess_guinier.png. Make the mask with `cryomap mask`. See docs/postprocess.md.

Unlike relion_postprocess, --o is the output folder (as for `cryomap refine`), --low_pass
defaults to the final resolution, and --autob_highres 0 means the final resolution.

example:
  cryomap postprocess --i Refine3D/job001/run_half1_class001_unfil.mrc \\
      --mask mask.mrc --o PostProcess/job001 --auto_bfac
"""


def add_arguments(p: argparse.ArgumentParser) -> None:
    """Options of `cryomap postprocess` (relion_postprocess's names)."""
    p.add_argument("--i", dest="half1", required=True, metavar="MAP",
                   help="unfiltered half map 1 (MRC), e.g. run_half1_class001_unfil.mrc")
    p.add_argument("--i2", dest="half2", default=None, metavar="MAP",
                   help="half map 2 (default: --i with half1 replaced by half2)")
    p.add_argument("--mask", required=True, metavar="MAP",
                   help="solvent mask (MRC, values in [0, 1], 1 = molecule)")
    p.add_argument("--o", dest="output", required=True, metavar="DIR",
                   help="output folder (created if missing)")
    p.add_argument("--angpix", type=float, default=-1.0, metavar="A",
                   help="pixel size (A); <= 0: half map 1's header (default: %(default)s)")
    p.add_argument("--auto_bfac", action="store_true",
                   help="fit the sharpening B-factor to the Guinier plot (Rosenthal & "
                        "Henderson 2003)")
    p.add_argument("--autob_lowres", type=float, default=10.0, metavar="A",
                   help="lowest resolution (A) in the B-factor fit (default: %(default)s)")
    p.add_argument("--autob_highres", type=float, default=0.0, metavar="A",
                   help="highest resolution (A) in the B-factor fit; 0: the final resolution "
                        "(default: %(default)s)")
    p.add_argument("--adhoc_bfac", type=float, default=0.0, metavar="A2",
                   help="sharpen with this B-factor (A^2, negative sharpens) instead of "
                        "fitting (default: %(default)s, no sharpening)")
    p.add_argument("--low_pass", type=float, default=-1.0, metavar="A",
                   help="low-pass the sharpened map at this resolution (A); negative: at the "
                        "final resolution; 0: no filter (default: %(default)s)")
    p.add_argument("--randomize_at_fsc", type=float, default=0.8, metavar="FSC",
                   help="randomise phases beyond the resolution where the unmasked FSC "
                        "first drops below this (default: %(default)s)")
    p.add_argument("--force_mask", action="store_true",
                   help="use the mask-corrected FSC even where the unmasked FSC is better")
    p.add_argument("--random_seed", type=seed_arg, default=0,
                   help="seed of the phase randomisation (default: %(default)s)")


def other_half(path: Path) -> Path:
    """RELION's rule: half1 -> half2 (or half2 -> half1) in the file name, every occurrence."""
    name = path.name
    if "half1" in name:
        return path.with_name(name.replace("half1", "half2"))
    if "half2" in name:
        return path.with_name(name.replace("half2", "half1"))
    raise InputError(f"--i {path}: the name contains neither 'half1' nor 'half2'; expected a "
                     f"half-map name, or the second half map given with --i2")


def _check_options(args: argparse.Namespace) -> None:
    for label, value in (("--angpix", args.angpix), ("--autob_lowres", args.autob_lowres),
                         ("--autob_highres", args.autob_highres),
                         ("--adhoc_bfac", args.adhoc_bfac), ("--low_pass", args.low_pass),
                         ("--randomize_at_fsc", args.randomize_at_fsc)):
        if not np.isfinite(value):
            raise InputError(f"{label} {value}: expected a finite number")
    if not 0.0 < args.randomize_at_fsc < 1.0:
        raise InputError(f"--randomize_at_fsc {args.randomize_at_fsc:g}: expected a value in "
                         f"(0, 1)")
    if args.autob_lowres <= 0 or args.autob_highres < 0:
        raise InputError(f"--autob_lowres {args.autob_lowres:g} / --autob_highres "
                         f"{args.autob_highres:g}: expected a positive low and a non-negative "
                         f"high resolution limit (A)")
    if args.autob_highres > 0 and args.autob_highres >= args.autob_lowres:
        raise InputError(f"--autob_highres {args.autob_highres:g}: expected a finer "
                         f"resolution than --autob_lowres {args.autob_lowres:g} A")
    if args.auto_bfac and args.adhoc_bfac != 0:
        raise InputError(f"--adhoc_bfac {args.adhoc_bfac:g} with --auto_bfac: expected one of "
                         f"the two")


def _star_blocks(r, names: dict[str, str], auto_bfac: bool) -> dict:
    """postprocess.star in RELION's layout (postprocessing.cpp: writeOutput)."""
    from .. import fourier

    general = {
        "rlnFinalResolution": float(r.final_resolution),
        "rlnBfactorUsedForSharpening": float(r.bfactor),
        "rlnUnfilteredMapHalf1": names["half1"],
        "rlnUnfilteredMapHalf2": names["half2"],
        "rlnPostprocessedMap": names["map"],
        "rlnParticleBoxFractionSolventMask": float(r.fraction_solvent_mask),
        "rlnMaskName": names["mask"],
        "rlnRandomiseFrom": float(r.randomise_from),
        "rlnPostprocessedMapMasked": names["masked"],
    }
    if auto_bfac and r.fit is not None:
        general["rlnFittedSlopeGuinierPlot"] = float(r.fit.slope)
        general["rlnFittedInterceptGuinierPlot"] = float(r.fit.intercept)
        general["rlnCorrelationFitGuinierPlot"] = float(r.fit.correlation)
    shells = np.arange(r.fsc_corrected.size)
    res_a = fourier.resolution_angstrom(shells, r.box, r.pixel_size)
    fsc = pd.DataFrame({
        "rlnSpectralIndex": shells,
        "rlnResolution": 1.0 / res_a,  # RELION writes 1/999 at shell 0
        "rlnAngstromResolution": res_a,
        "rlnFourierShellCorrelationCorrected": r.fsc_corrected,
        "rlnFourierShellCorrelationParticleMaskFraction": r.fsc_part_fracmask,
        "rlnFourierShellCorrelationUnmaskedMaps": r.fsc_unmasked,
        "rlnFourierShellCorrelationMaskedMaps": r.fsc_masked,
        "rlnCorrectedFourierShellCorrelationPhaseRandomizedMaskedMaps": r.fsc_random_masked,
    })
    guinier = {
        "rlnResolutionSquared": r.guinier_original.s2,
        "rlnLogAmplitudesOriginal": r.guinier_original.ln_amplitude,
        "rlnLogAmplitudesWeighted": r.guinier_weighted.ln_amplitude,
    }
    if r.bfactor != 0:
        guinier["rlnLogAmplitudesSharpened"] = r.guinier_sharpened.ln_amplitude
    if auto_bfac and r.fit is not None:
        guinier["rlnLogAmplitudesIntercept"] = np.full(r.guinier_original.s2.size,
                                                       r.fit.intercept)
    return {"general": general, "fsc": fsc, "guinier": pd.DataFrame(guinier)}


def _save_png(fig, path: Path) -> None:
    import matplotlib.pyplot as plt

    from ..io.atomic import atomic_path

    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)


def _angstrom_ticks(ax, s_max: float) -> None:
    """Ticks at round resolutions (A), placed on the 1/A axis."""
    candidates = np.array([100, 50, 30, 20, 15, 10, 8, 6, 5, 4, 3.5, 3, 2.5, 2, 1.5, 1.2, 1])
    ticks = candidates[(1.0 / candidates <= s_max * 1.001) & (1.0 / candidates > 0)]
    if ticks.size > 8:  # keep the labels readable
        ticks = ticks[np.linspace(0, ticks.size - 1, 8).round().astype(int)]
    ax.set_xticks(1.0 / ticks)
    ax.set_xticklabels([f"{t:g}" for t in ticks])


def plot_fsc(path: Path, r) -> None:
    """The four FSC curves against resolution, with the 0.143 line (PNG, atomic)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = np.arange(r.fsc_corrected.size) / (r.box * r.pixel_size)
    fig, ax = plt.subplots(figsize=(7, 4.5))
    ax.plot(s[1:], r.fsc_corrected[1:], "k-", lw=2, label="corrected")
    ax.plot(s[1:], r.fsc_unmasked[1:], "g-", label="unmasked maps")
    ax.plot(s[1:], r.fsc_masked[1:], "b-", label="masked maps")
    ax.plot(s[1:], r.fsc_random_masked[1:], "r-", label="phase-randomised masked maps")
    ax.axhline(0.143, color="gray", ls="--", lw=0.8)
    ax.axvline(1.0 / r.final_resolution, color="gray", ls=":", lw=0.8)
    ax.set_ylim(-0.1, 1.05)
    ax.set_xlim(0, s[-1])
    _angstrom_ticks(ax, s[-1])
    ax.set_xlabel("resolution (Å)")
    ax.set_ylabel("Fourier shell correlation")
    ax.set_title(f"Final resolution {r.final_resolution:.2f} Å (FSC = 0.143)")
    ax.legend(loc="lower left", fontsize=8)
    fig.tight_layout()
    _save_png(fig, path)


def plot_guinier(path: Path, r) -> None:
    """ln(mean amplitude) against s^2 before and after weighting and sharpening (PNG, atomic)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for g, style, label in ((r.guinier_original, "k-", "original"),
                            (r.guinier_weighted, "b-", "FSC-weighted"),
                            (r.guinier_sharpened, "r-", f"sharpened (B = {r.bfactor:.0f} Å²)")):
        ok = g.ln_amplitude > -99
        if label.startswith("sharpened") and r.bfactor == 0:
            continue
        ax.plot(g.s2[ok], g.ln_amplitude[ok], style, label=label)
    if r.fit is not None:
        x = r.guinier_weighted.s2
        ax.plot(x, r.fit.intercept + r.fit.slope * x, "b:", lw=1, label="fit")
    ax.set_xlabel("resolution² (1/Å²)")
    ax.set_ylabel("ln(amplitude)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    _save_png(fig, path)


def run(args: argparse.Namespace) -> int:
    """Check every input, compute, then write the outputs (nothing is written on error)."""
    from ..io.atomic import check_output_dir, make_output_dir, remove_stale_temps
    from ..io.mrc import read_half_maps, read_map, write_map
    from ..io.star import write_star
    from ..masks import check_mask
    from ..postprocess import PostprocessOptions, postprocess

    _check_options(args)
    h1_path = Path(args.half1)
    h2_path = Path(args.half2) if args.half2 else other_half(h1_path)
    mask_path = Path(args.mask)
    out = Path(args.output)
    check_output_dir(out, "--o")
    if h1_path.exists() and not h2_path.exists():
        raise InputError(f"{h2_path}: second half map not found (derived from --i by "
                         f"half1 -> half2); give it with --i2")
    h1, h2, pix = read_half_maps(h1_path, h2_path, args.angpix)
    mask, pix_mask = read_map(mask_path)
    check_mask(mask, h1.shape, str(mask_path))
    if args.low_pass > 0 and args.low_pass < 2 * pix:
        raise InputError(f"--low_pass {args.low_pass:g}: beyond Nyquist ({2 * pix:g} A); "
                         f"expected >= {2 * pix:g} A, 0 or negative")
    notes = []
    if abs(pix_mask - pix) > 1e-3:
        notes.append(f"{mask_path}: header pixel size {pix_mask:g} A differs from the half "
                     f"maps' {pix:g} A (the mask is used voxel for voxel)")

    opts = PostprocessOptions(auto_bfac=args.auto_bfac, autob_lowres=args.autob_lowres,
                              autob_highres=args.autob_highres, adhoc_bfac=args.adhoc_bfac,
                              low_pass=args.low_pass, randomize_at_fsc=args.randomize_at_fsc,
                              force_mask=args.force_mask, seed=args.random_seed)
    try:
        r = postprocess(h1, h2, mask, pix, opts)
    except InputError as e:
        raise InputError(f"{h1_path}: {e}") from None

    make_output_dir(out, "--o")
    remove_stale_temps(out)
    names = {"half1": str(h1_path), "half2": str(h2_path), "mask": str(mask_path),
             "map": str(out / "postprocess.mrc"), "masked": str(out / "postprocess_masked.mrc")}
    write_map(out / "postprocess.mrc", r.sharpened.astype(np.float32), pix)
    write_map(out / "postprocess_masked.mrc", r.sharpened_masked.astype(np.float32), pix)
    write_star(out / "postprocess.star", _star_blocks(r, names, args.auto_bfac))
    plot_fsc(out / "postprocess_fsc.png", r)
    plot_guinier(out / "postprocess_guinier.png", r)

    for w in notes + r.warnings:
        print(f"warning: {w}")
    bfac = (f"B-factor {r.bfactor:.1f} A^2" + (" (fitted)" if args.auto_bfac else "")
            if r.bfactor else "no sharpening (B = 0)")
    lp = f"low-pass {r.low_pass_applied:.2f} A" if r.low_pass_applied else "no low-pass"
    print(f"final resolution {r.final_resolution:.2f} A (shell {r.resolution_shell} of "
          f"{r.box // 2}); phases randomised from {r.randomise_from:.2f} A; {bfac}; {lp}")
    print(f"wrote {out}/postprocess.mrc, postprocess_masked.mrc, postprocess.star, "
          f"postprocess_fsc.png, postprocess_guinier.png")
    return 0
