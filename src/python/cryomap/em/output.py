"""Refinement outputs in RELION's layout and labels (CONVENTIONS §8, §9, §11)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from .. import fourier
from ..io.atomic import atomic_path
from ..io.mrc import write_map
from ..io.star import write_star
from ..particles import ParticleSet, write_particles


def iteration_root(outdir: Path, iteration: int | None) -> Path:
    """`run_itNNN` for an iteration, `run` for the final outputs."""
    return outdir / ("run" if iteration is None else f"run_it{iteration:03d}")


def model_blocks(state, box: int, pixel_size: float, class_names: list[str],
                 class_distribution: np.ndarray | None = None) -> dict:
    """The blocks of `<root>_model.star` (RELION's MlModel::write, §9)."""
    o = state.options
    n_shells = box // 2 + 1
    shells = np.arange(n_shells)
    res = shells / (box * pixel_size)
    ires = state.history[-1].resolution_shell if state.history else 1
    fsc_curve = state.fsc if state.fsc is not None else np.zeros(n_shells)
    tau2 = state.tau2 if state.tau2 is not None else np.zeros(n_shells)
    ssnr = o.tau2_fudge * np.clip(fsc_curve, 0.001, 0.999) / (1 - np.clip(fsc_curve, 0.001,
                                                                            0.999))
    k = len(class_names)
    dist = np.full(k, 1.0 / k) if class_distribution is None else class_distribution
    general = {
        "rlnReferenceDimensionality": 3,
        "rlnDataDimensionality": 2,
        "rlnOriginalImageSize": box,
        # RELION writes rlnCurrentResolution in Å (§11)
        "rlnCurrentResolution": float(fourier.resolution_angstrom(ires, box, pixel_size)),
        "rlnCurrentImageSize": 2 * int(state.r_max),
        "rlnPaddingFactor": o.pad,
        "rlnIsHelix": 0,
        "rlnFourierSpaceInterpolator": 1 if o.interp == "linear" else 0,
        "rlnPixelSize": pixel_size,
        "rlnNrClasses": k,
        "rlnNrBodies": 1,
        "rlnNrGroups": 1,
        "rlnNrOpticsGroups": state.sigma2.shape[0],
        "rlnTau2FudgeFactor": o.tau2_fudge,
        "rlnLogLikelihood": float(state.log_likelihood.sum()),
        "rlnAveragePmax": float(state.max_prob.mean()),
    }
    blocks: dict = {"model_general": general}
    blocks["model_classes"] = pd.DataFrame({
        "rlnReferenceImage": class_names,
        "rlnClassDistribution": dist,
        "rlnEstimatedResolution": [general["rlnCurrentResolution"]] * k,
    })
    for c in range(k):
        blocks[f"model_class_{c + 1}"] = pd.DataFrame({
            "rlnSpectralIndex": shells,
            "rlnResolution": res,
            "rlnAngstromResolution": fourier.resolution_angstrom(shells, box, pixel_size),
            "rlnSsnrMap": ssnr,
            "rlnGoldStandardFsc": fsc_curve,
            "rlnReferenceTau2": tau2,
        })
    shells2 = fourier.shell_index_2d(box)
    for g in range(state.sigma2.shape[0]):
        s2 = np.array([state.sigma2[g][shells2 == s].mean() if np.any(shells2 == s) else 0.0
                       for s in shells])
        keep = s2 > 0
        blocks[f"model_optics_group_{g + 1}"] = pd.DataFrame({
            "rlnSpectralIndex": shells[keep],
            "rlnResolution": res[keep],
            "rlnSigma2Noise": s2[keep],
        })
    return blocks


def particle_table(particles: ParticleSet, state, pixel_size: float,
                   class_number: np.ndarray | None = None) -> pd.DataFrame:
    """Input particle rows (all columns kept) with the refined pose and statistics."""
    df = particles.particles.copy()
    df["rlnAngleRot"] = state.angles[:, 0]
    df["rlnAngleTilt"] = state.angles[:, 1]
    df["rlnAnglePsi"] = state.angles[:, 2]
    df["rlnOriginXAngst"] = state.origins_px[:, 0] * pixel_size
    df["rlnOriginYAngst"] = state.origins_px[:, 1] * pixel_size
    if class_number is not None:
        df["rlnClassNumber"] = class_number
    df["rlnMaxValueProbDistribution"] = state.max_prob
    df["rlnNrOfSignificantSamples"] = state.n_significant
    df["rlnLogLikeliContribution"] = state.log_likelihood
    if getattr(state, "subset", None) is not None:
        df["rlnRandomSubset"] = state.subset
    return df


def write_data_star(path: Path, particles: ParticleSet, table: pd.DataFrame) -> None:
    """`<root>_data.star`: data_optics + data_particles."""
    write_particles(path, particles.optics, table)


def write_model_star(path: Path, blocks: dict) -> None:
    """`<root>_model.star`."""
    write_star(path, blocks)


def write_volume(path: Path, volume: np.ndarray, pixel_size: float) -> None:
    """An MRC map, atomically."""
    write_map(path, np.asarray(volume, np.float32), pixel_size)


def write_text_atomic(path: Path, text: str) -> None:
    """Write a text file atomically (temp file in the same folder, then rename)."""
    with atomic_path(path) as tmp:
        tmp.write_text(text)


def plot_fsc(path: Path, fsc_curve: np.ndarray, box: int, pixel_size: float,
             resolution: float, fsc_truth: np.ndarray | None = None) -> None:
    """FSC curve against resolution with the 0.143 line (PNG, written atomically)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    s = np.arange(fsc_curve.size) / (box * pixel_size)
    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(s[1:], fsc_curve[1:], label=f"half maps ({resolution:.1f} Å at 0.143)")
    if fsc_truth is not None:
        ax.plot(s[1:], fsc_truth[1:], label="vs ground truth")
    ax.axhline(0.143, color="k", ls="--", lw=0.8)
    ax.axhline(0.5, color="gray", ls=":", lw=0.8)
    ax.set_xlabel("spatial frequency (1/Å)")
    ax.set_ylabel("FSC")
    ax.set_ylim(-0.1, 1.05)
    ax.legend()
    fig.tight_layout()
    with atomic_path(path, suffix=".png") as tmp:
        fig.savefig(tmp, dpi=100, format="png")
    plt.close(fig)
