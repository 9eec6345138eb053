"""Fourier shell correlation and resolution: the one owner of the FSC, its thresholds and its
crossings (docs/method.md eq. (22)). Refinement, reconstruction, classification, postprocess
and the validation against a known truth all measure through these functions, so the same two
maps give the same number everywhere.

Conventions (RELION's getFSC): shell index round(|k|) over the rfft half grid, shells 0..N/2
(voxels beyond N/2 ignored); FSC(0) is set to 1 when it comes out <= 0 (the means of two maps
of one particle have one sign). A resolution is the last shell before the curve first drops
below the threshold (scanning from shell 1), in Å box * pixel / shell.
"""

from __future__ import annotations

import numpy as np

from . import fourier

#: The gold-standard threshold of the half-map FSC (Rosenthal & Henderson 2003).
FSC_THRESHOLD = 0.143


def fsc(ft1: np.ndarray, ft2: np.ndarray, shells: np.ndarray | None = None,
        n_shells: int | None = None) -> np.ndarray:
    """FSC of two Fourier transforms on one grid, per shell 0..n_shells-1. shells: the shell
    index of every element (default: that of the rfft half volume, or half plane for 2D
    input, of box ft1.shape[0]); n_shells default N//2 + 1."""
    if shells is None:
        n = ft1.shape[0]
        shells = fourier.shell_index_3d(n) if ft1.ndim == 3 else fourier.shell_index_2d(n)
        n_shells = n // 2 + 1 if n_shells is None else n_shells
    if n_shells is None:
        raise ValueError("fsc: n_shells is needed with explicit shells")
    num = fourier.shell_sums(np.real(ft1 * np.conj(ft2)), shells, n_shells)
    den = np.sqrt(fourier.shell_sums(np.abs(ft1) ** 2, shells, n_shells)
                  * fourier.shell_sums(np.abs(ft2) ** 2, shells, n_shells))
    with np.errstate(invalid="ignore", divide="ignore"):
        out = np.where(den > 0, num / np.where(den > 0, den, 1.0), 0.0)
    if out[0] <= 0:
        out[0] = 1.0
    return out


def fsc_maps(map1: np.ndarray, map2: np.ndarray) -> np.ndarray:
    """FSC of two real cubic maps (or square images) of one box, per shell 0..N/2."""
    ft = fourier.fft3_centered if np.ndim(map1) == 3 else fourier.fft2_centered
    return fsc(ft(np.asarray(map1, np.float64)), ft(np.asarray(map2, np.float64)))


def first_shell_below(curve: np.ndarray, threshold: float) -> int:
    """First shell >= 1 whose value is below threshold; -1 if none (RELION's search for the
    phase-randomisation shell)."""
    below = np.nonzero(np.asarray(curve)[1:] < threshold)[0]
    return int(below[0]) + 1 if below.size else -1


def resolution_shell(curve: np.ndarray, threshold: float = FSC_THRESHOLD) -> int:
    """The last shell before the curve first drops below threshold (scanning from shell 1;
    RELION's rule); 0 when shell 1 is already below, the last shell when it never drops."""
    first = first_shell_below(curve, threshold)
    return int(np.asarray(curve).size - 1) if first < 0 else first - 1


def crossing(curve: np.ndarray, threshold: float = FSC_THRESHOLD) -> float:
    """The frequency (fractional shell) where the curve first crosses the threshold, linearly
    interpolated between the two shells around the first drop; the last shell when it never
    drops, 0 when shell 1 is already below and shell 0 is too."""
    curve = np.asarray(curve, np.float64)
    first = first_shell_below(curve, threshold)
    if first < 0:
        return float(curve.size - 1)
    f0, f1 = curve[first - 1], curve[first]
    if f0 < threshold:
        return 0.0
    return float(first - 1 + (f0 - threshold) / (f0 - f1))


def resolution_angstrom(curve: np.ndarray, box: int, pixel_size: float,
                        threshold: float = FSC_THRESHOLD, interpolate: bool = False) -> float:
    """Resolution in Å of an FSC curve: box * pixel / shell at `resolution_shell` (the shell
    counted as 1 at least, i.e. the box size when nothing correlates), or with interpolate=True
    at the interpolated `crossing`."""
    shell = crossing(curve, threshold) if interpolate else resolution_shell(curve, threshold)
    return float(box * pixel_size / max(shell, 1.0))
