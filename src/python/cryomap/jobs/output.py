"""Job outputs in RELION's layout and labels (docs/conventions.md, "STAR files")."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .. import fourier
from ..em.iteration import EMState
from ..io.atomic import atomic_path
from ..io.mrc import write_map
from ..io.star import write_star
from ..particles import ParticleSet, write_particles


@dataclass
class ModelFigures:
    """What `<root>_model.star` reports (RELION's MlModel::write). Per-class arrays are
    (K, N//2+1); sigma2 is (groups, N//2+1) per shell."""

    box: int
    pixel_size: float
    class_names: list[str]
    class_distribution: np.ndarray  # (K,)
    class_resolution_shell: np.ndarray  # (K,)
    current_size: int  # 2 r_max
    ssnr: np.ndarray
    tau2: np.ndarray
    sigma2: np.ndarray
    log_likelihood: float
    average_pmax: float
    pad: int = 2
    interp: str = "linear"
    tau2_fudge: float = 1.0
    ref_dim: int = 3
    offset_sigma: float = 0.0  # Å
    fsc: np.ndarray | None = None  # (K, N//2+1) gold-standard FSC (refinement)
    accuracy_rotations: float = 999.0  # degrees
    accuracy_translations: float = 999.0  # Å


def model_blocks(m: ModelFigures) -> dict:
    """The blocks of `<root>_model.star`."""
    n_shells = m.box // 2 + 1
    shells = np.arange(n_shells)
    res = shells / (m.box * m.pixel_size)
    k = len(m.class_names)
    class_res = fourier.resolution_angstrom(np.asarray(m.class_resolution_shell), m.box,
                                            m.pixel_size)
    general = {
        "rlnReferenceDimensionality": m.ref_dim,
        "rlnDataDimensionality": 2,
        "rlnOriginalImageSize": m.box,
        # RELION writes rlnCurrentResolution in Å
        "rlnCurrentResolution": float(np.min(class_res)),
        "rlnCurrentImageSize": int(m.current_size),
        "rlnPaddingFactor": m.pad,
        "rlnIsHelix": 0,
        "rlnFourierSpaceInterpolator": 1 if m.interp == "linear" else 0,
        "rlnPixelSize": m.pixel_size,
        "rlnNrClasses": k,
        "rlnNrBodies": 1,
        "rlnNrGroups": 1,
        "rlnNrOpticsGroups": int(m.sigma2.shape[0]),
        "rlnTau2FudgeFactor": m.tau2_fudge,
        "rlnSigmaOffsetsAngst": float(m.offset_sigma),
        "rlnLogLikelihood": float(m.log_likelihood),
        "rlnAveragePmax": float(m.average_pmax),
    }
    blocks: dict = {"model_general": general}
    blocks["model_classes"] = pd.DataFrame({
        "rlnReferenceImage": m.class_names,
        "rlnClassDistribution": np.asarray(m.class_distribution, np.float64),
        "rlnAccuracyRotations": np.full(k, float(m.accuracy_rotations)),
        "rlnAccuracyTranslationsAngst": np.full(k, float(m.accuracy_translations)),
        "rlnEstimatedResolution": class_res,
    })
    for c in range(k):
        table = {
            "rlnSpectralIndex": shells,
            "rlnResolution": res,
            "rlnAngstromResolution": fourier.resolution_angstrom(shells, m.box, m.pixel_size),
            "rlnSsnrMap": m.ssnr[c],
        }
        if m.fsc is not None:
            table["rlnGoldStandardFsc"] = m.fsc[c]
        table["rlnReferenceTau2"] = m.tau2[c]
        blocks[f"model_class_{c + 1}"] = pd.DataFrame(table)
    for g in range(m.sigma2.shape[0]):
        keep = m.sigma2[g] > 0
        blocks[f"model_optics_group_{g + 1}"] = pd.DataFrame({
            "rlnSpectralIndex": shells[keep],
            "rlnResolution": res[keep],
            "rlnSigma2Noise": m.sigma2[g][keep],
        })
    return blocks


def particle_table(particles: ParticleSet, state: EMState, pixel_size: float,
                   class_number: np.ndarray | None = None,
                   subset: np.ndarray | None = None) -> pd.DataFrame:
    """Input particle rows (all columns kept) with the state's estimated pose, statistics
    and, where the amplitude correction changed them, the amplitudes: rlnCtfScalefactor is
    the input's (1 if none) times a_i, so that the next job reads the corrected CTF
    (docs/method.md eq. (30))."""
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
    if np.any(state.amplitude != 1.0):
        scale = df["rlnCtfScalefactor"].to_numpy(np.float64) \
            if "rlnCtfScalefactor" in df.columns else 1.0
        df["rlnCtfScalefactor"] = scale * state.amplitude
    if subset is not None:
        df["rlnRandomSubset"] = subset
    return df


def write_data_star(path: Path, particles: ParticleSet, table: pd.DataFrame) -> None:
    """`<root>_data.star`: data_optics + data_particles (`table`: one row per particle, in
    the particle set's order). rlnImageName is rewritten as RELION writes it: the stack path
    valid from the working folder (`ParticleSet.output_image_names`; docs/conventions.md,
    "Image paths"), so that the next job, run from the same folder, reads this file."""
    table = table.copy()
    table["rlnImageName"] = particles.output_image_names()
    write_particles(path, particles.optics, table)


def write_model_star(path: Path, blocks: dict) -> None:
    """`<root>_model.star`."""
    write_star(path, blocks)


def write_volume(path: Path, volume: np.ndarray, pixel_size: float) -> None:
    """An MRC map, atomically."""
    write_map(path, np.asarray(volume, np.float32), pixel_size)


def write_class_volumes(root: str | Path, volumes, pixel_size: float) -> list[str]:
    """One map per class, `{root}_class001.mrc`, ... (RELION's names); returns the file names
    for rlnReferenceImage."""
    names = []
    for k, volume in enumerate(volumes):
        path = Path(f"{root}_class{k + 1:03d}.mrc")
        write_volume(path, volume, pixel_size)
        names.append(path.name)
    return names


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
