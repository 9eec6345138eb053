"""Bad input, command by command: every case exits with code 2 and one stderr line
`cryomap <command>: error: ...` naming what is wrong, without a traceback, and writes nothing:
no file appears anywhere under the test's folders and --o is not even created.

Cases cover options (ranges, types, combinations), per-particle values of STAR files, image
and map files, output locations and --continue on damaged runs, for refine, class3d, class2d,
project, simulate, info, mask, postprocess, reconstruct, phantom and demo."""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from cryomap.cli.main import main
from cryomap.io.mrc import write_map
from cryomap.io.star import read_star, write_star
from cryomap.phantom import make_phantom
from cryomap.simulate import simulate_particles, write_simulation

BOX, PIX, N = 16, 8.0, 12


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    """A tiny simulated set with its reference, 2D references, half maps and a mask."""
    d = tmp_path_factory.mktemp("bad_inputs")
    truth = make_phantom(BOX, PIX)
    write_simulation(d, *simulate_particles(truth, PIX, N, snr=1.0, seed=1, max_shift_px=1),
                     pixel_size=PIX)
    write_map(d / "ref.mrc", truth, PIX)
    rng = np.random.default_rng(0)
    for h in (1, 2):
        noisy = truth + 0.3 * truth.std() * rng.standard_normal(truth.shape)
        write_map(d / f"run_half{h}_class001_unfil.mrc", noisy.astype(np.float32), PIX)
    write_map(d / "mask.mrc", (truth > truth.mean()).astype(np.float32), PIX)
    write_map(d / "image.mrc", truth[BOX // 2], PIX)  # a 2D image
    return d


# -- helpers that make a bad file ------------------------------------------------------------


def star_with(data: Path, name: str, edit: Callable[[dict], None],
              source: str = "particles.star") -> str:
    """`source` (particles.star, or truth.star with poses) edited by `edit(blocks)`, written
    next to the stack as NAME.star."""
    blocks = read_star(data / source)
    edit(blocks)
    path = data / f"{name}.star"
    write_star(path, blocks)
    return str(path)


def set_value(block: str, label: str, value, row: int = 0) -> Callable[[dict], None]:
    def edit(blocks: dict) -> None:
        df = blocks[block]
        if label not in df.columns:
            df[label] = 0.0
        if isinstance(value, str):
            df[label] = df[label].astype(object)
        df.loc[row, label] = value
    return edit


def map_file(data: Path, name: str, volume: np.ndarray, pix: float = PIX) -> str:
    write_map(data / name, volume.astype(np.float32), pix)
    return str(data / name)


def patched_mrc(data: Path, name: str, source: str, offset: int, fmt: str, value) -> str:
    """A copy of the MRC file `source` with one header field overwritten."""
    raw = bytearray((data / source).read_bytes())
    struct.pack_into(fmt, raw, offset, value)
    (data / name).write_bytes(bytes(raw))
    return str(data / name)


def truncated(data: Path, name: str, source: str, keep: int) -> str:
    raw = (data / source).read_bytes()
    (data / name).write_bytes(raw[:keep])
    return str(data / name)


def negative_nx_stack(data: Path) -> str:
    """A STAR file whose first particle is in a stack with nx = -16 in its header."""
    patched_mrc(data, "negnx.mrcs", "particles.mrcs", 0, "<i", -16)
    return star_with(data, "negnx", set_value("particles", "rlnImageName", "1@negnx.mrcs"))


def star_in_subfolder(data: Path) -> str:
    """particles.star copied into a subfolder: its stack name now resolves nowhere (a stack
    is looked up in the working folder and the STAR file's folder, never in a parent)."""
    (data / "sub").mkdir(exist_ok=True)
    (data / "sub" / "particles.star").write_text((data / "particles.star").read_text())
    return str(data / "sub" / "particles.star")


def damaged_run(data: Path, out: Path, job_text: str | None) -> None:
    """--o holding a run whose job.json is `job_text` (None: no job.json)."""
    out.mkdir()
    if job_text is not None:
        (out / "job.json").write_text(job_text)


# -- the cases -----------------------------------------------------------------------------
# Each case: (id, function(data, out) -> argv, words the error line must contain). `out` is a
# folder that does not exist (unless the case makes it).

FAST = ["--healpix_order", "1", "--offset_range", "1", "--offset_step", "1", "--j", "1",
        "--particle_diameter", "96"]


def refine(d: Path, out: Path, *extra: str, star: str | None = None) -> list[str]:
    return ["refine", "--i", star or str(d / "particles.star"), "--ref", str(d / "ref.mrc"),
            "--o", str(out), "--iter", "1"] + FAST + list(extra)


def class3d(d: Path, out: Path, *extra: str, star: str | None = None) -> list[str]:
    return ["class3d", "--i", star or str(d / "particles.star"), "--ref", str(d / "ref.mrc"),
            "--o", str(out), "--K", "2", "--iter", "1"] + FAST + list(extra)


def hetero_refine(d: Path, out: Path, *extra: str) -> list[str]:
    return ["hetero_refine"] + class3d(d, out, *extra)[1:]


def class2d(d: Path, out: Path, *extra: str, star: str | None = None) -> list[str]:
    return ["class2d", "--i", star or str(d / "particles.star"), "--o", str(out), "--K", "2",
            "--iter", "1", "--offset_range", "1", "--offset_step", "1", "--j", "1",
            "--particle_diameter", "96"] + list(extra)


def initial_model(d: Path, out: Path, *extra: str, star: str | None = None) -> list[str]:
    return ["initial_model", "--i", star or str(d / "particles.star"), "--o", str(out),
            "--iter", "2"] + FAST + list(extra)


def flip_hand(d: Path, out: Path, *extra: str, volume: str | None = None) -> list[str]:
    return ["flip_hand", "--i", volume or str(d / "ref.mrc"), "--o", str(out / "flipped.mrc")
            ] + list(extra)


def project(d: Path, out: Path, *extra: str, ang: str | None = None,
            volume: str | None = None) -> list[str]:
    return ["project", "--i", volume or str(d / "ref.mrc"), "--ang", ang or str(d / "truth.star"),
            "--o", str(out / "proj.mrcs")] + list(extra)


def simulate(d: Path, out: Path, *extra: str) -> list[str]:
    return ["simulate", "--o", str(out), "--n", "4", "--box", "16"] + list(extra)


def mask(d: Path, out: Path, *extra: str, volume: str | None = None) -> list[str]:
    return ["mask", "--i", volume or str(d / "ref.mrc"), "--o", str(out / "mask.mrc"),
            "--ini_threshold", "0.01"] + list(extra)


def postprocess(d: Path, out: Path, *extra: str, half1: str | None = None,
                mask_path: str | None = None) -> list[str]:
    return ["postprocess", "--i", half1 or str(d / "run_half1_class001_unfil.mrc"), "--mask",
            mask_path or str(d / "mask.mrc"), "--o", str(out)] + list(extra)


CASES: list[tuple[str, Callable[[Path, Path], list[str]], tuple[str, ...]]] = [
    # refine: options
    ("refine-iter-0", lambda d, o: refine(d, o, "--iter", "0"), ("--iter 0", "at least 1")),
    ("refine-offset-range-negative", lambda d, o: refine(d, o, "--offset_range", "-1"),
     ("--offset_range", ">= 0")),
    ("refine-offset-range-beyond-box", lambda d, o: refine(d, o, "--offset_range", "20"),
     ("--offset_range", "half the box")),
    ("refine-offset-step-0", lambda d, o: refine(d, o, "--offset_step", "0"),
     ("--offset_step", "> 0")),
    ("refine-psi-step-0", lambda d, o: refine(d, o, "--psi_step", "0"), ("--psi_step",)),
    ("refine-healpix-negative", lambda d, o: refine(d, o, "--healpix_order", "-1"),
     ("--healpix_order -1", "0..8")),
    ("refine-healpix-9", lambda d, o: refine(d, o, "--healpix_order", "9"),
     ("--healpix_order 9",)),
    ("refine-healpix-text", lambda d, o: refine(d, o, "--healpix_order", "two"),
     ("--healpix_order", "invalid int")),
    ("refine-ini-high-0", lambda d, o: refine(d, o, "--ini_high", "0"), ("--ini_high",)),
    ("refine-threads-0", lambda d, o: refine(d, o, "--j", "0"), ("--j 0", "thread")),
    ("refine-adaptive-fraction-0", lambda d, o: refine(d, o, "--adaptive_fraction", "0"),
     ("--adaptive_fraction",)),
    ("refine-adaptive-fraction-2", lambda d, o: refine(d, o, "--adaptive_fraction", "2"),
     ("--adaptive_fraction", "(0, 1]")),
    ("refine-tau2-fudge-0", lambda d, o: refine(d, o, "--tau2_fudge", "0"), ("--tau2_fudge",)),
    ("refine-tau2-fudge-negative", lambda d, o: refine(d, o, "--tau2_fudge", "-2"),
     ("--tau2_fudge",)),
    ("refine-particle-diameter-0", lambda d, o: refine(d, o, "--particle_diameter", "0"),
     ("--particle_diameter",)),
    ("refine-particle-diameter-beyond-box",
     lambda d, o: refine(d, o, "--particle_diameter", "5000"), ("--particle_diameter", "box")),
    ("refine-maskedge-beyond-box", lambda d, o: refine(d, o, "--maskedge", "9"),
     ("--maskedge",)),
    ("refine-offset-sigma-nan", lambda d, o: refine(d, o, "--offset", "nan"), ("--offset",)),
    ("refine-seed-negative", lambda d, o: refine(d, o, "--seed", "-1"), ("--seed", ">= 0")),
    ("refine-max-memory-0", lambda d, o: refine(d, o, "--max_memory", "0"),
     ("--max_memory", "> 0")),
    ("refine-over-memory-budget", lambda d, o: refine(d, o, "--max_memory", "0.01"),
     ("--max_memory", "GiB")),
    ("refine-no-reference", lambda d, o: ["refine", "--i", str(d / "particles.star"), "--o",
                                          str(o)], ("--ref",)),
    ("refine-angpix-absurd", lambda d, o: refine(d, o, "--angpix", "1e5"), ("--angpix",)),
    # refine: per-particle values and files
    ("refine-voltage-0", lambda d, o: refine(d, o, star=star_with(
        d, "v0", set_value("optics", "rlnVoltage", 0.0))), ("v0.star", "rlnVoltage", "row 1")),
    ("refine-voltage-negative", lambda d, o: refine(d, o, star=star_with(
        d, "vneg", set_value("optics", "rlnVoltage", -300.0))), ("vneg.star", "rlnVoltage")),
    ("refine-defocus-nan", lambda d, o: refine(d, o, star=star_with(
        d, "dnan", set_value("particles", "rlnDefocusU", np.nan, 3))),
     ("dnan.star", "rlnDefocusU", "row 4")),
    ("refine-defocus-0", lambda d, o: refine(d, o, star=star_with(
        d, "d0", set_value("particles", "rlnDefocusV", 0.0, 2))), ("d0.star", "rlnDefocusV")),
    ("refine-amplitude-contrast-1.5", lambda d, o: refine(d, o, star=star_with(
        d, "q0", set_value("optics", "rlnAmplitudeContrast", 1.5))),
     ("q0.star", "rlnAmplitudeContrast")),
    ("refine-text-in-numeric-column", lambda d, o: refine(d, o, star=star_with(
        d, "text", set_value("particles", "rlnDefocusU", "abc", 5))),
     ("text.star", "rlnDefocusU", "not a number")),
    ("refine-pixel-size-absurd", lambda d, o: refine(d, o, star=star_with(
        d, "pix", set_value("optics", "rlnImagePixelSize", 500.0))),
     ("pix.star", "rlnImagePixelSize")),
    ("refine-origin-beyond-box", lambda d, o: refine(d, o, star=star_with(
        d, "origin", set_value("particles", "rlnOriginXAngst", 1e4, 1))),
     ("origin.star", "rlnOriginXAngst", "row 2")),
    ("refine-image-number-beyond-stack", lambda d, o: refine(d, o, star=star_with(
        d, "imgnum", set_value("particles", "rlnImageName", "000099@particles.mrcs", 0))),
     ("imgnum.star", "out of range")),
    # a value 3 or a one-sided split is re-split with a log line (test_half_sets.py); a value
    # that is not a number is an input error
    ("refine-random-subset-text", lambda d, o: refine(d, o, star=star_with(
        d, "subset", lambda b: b["particles"].__setitem__(
            "rlnRandomSubset", ["x"] + [1, 2] * ((N - 1) // 2) + [1] * ((N - 1) % 2)))),
     ("subset.star", "rlnRandomSubset", "not a number")),
    ("refine-stack-only-in-parent-folder", lambda d, o: refine(d, o, star=star_in_subfolder(d)),
     ("particles.mrcs", "not found")),
    ("refine-stack-negative-nx", lambda d, o: refine(d, o, star=negative_nx_stack(d)),
     ("negnx.mrcs", "nx")),
    ("refine-reference-truncated", lambda d, o: refine(d, o)[:4] + [truncated(
        d, "short.mrc", "ref.mrc", 2000)] + refine(d, o)[5:], ("short.mrc", "bytes")),
    ("refine-reference-nan", lambda d, o: refine(d, o)[:4] + [map_file(
        d, "nan.mrc", np.full((BOX,) * 3, np.nan))] + refine(d, o)[5:], ("nan.mrc", "NaN")),
    # refine: output folder and --continue
    ("refine-o-is-a-file", lambda d, o: refine(d, d / "particles.star"),
     ("--o", "not a folder")),
    ("refine-o-under-a-file", lambda d, o: refine(d, d / "ref.mrc" / "sub"),
     ("--o", "not a folder")),
    ("refine-continue-without-run", lambda d, o: ["refine", "--o", str(o), "--continue"],
     ("job.json",)),
    ("refine-continue-truncated-job", lambda d, o: damaged_run(d, o, '{"kind": "refine", "i') or
     ["refine", "--o", str(o), "--continue"], ("job.json", "not a readable")),
    ("refine-continue-job-not-an-object", lambda d, o: damaged_run(d, o, "[1, 2]") or
     ["refine", "--o", str(o), "--continue"], ("job.json",)),
    ("refine-continue-job-bad-option", lambda d, o: damaged_run(d, o, json.dumps(
        {"kind": "refine", "i": "x.star", "ref": None, "options": {"healpix_order": -3}})) or
     ["refine", "--o", str(o), "--continue"], ("job.json", "healpix_order")),
    ("refine-continue-class3d-run", lambda d, o: damaged_run(d, o, json.dumps(
        {"kind": "class3d", "i": "x.star", "ref": None, "options": {}})) or
     ["refine", "--o", str(o), "--continue"], ("not a refinement",)),
    # class3d / class2d
    ("class3d-K-0", lambda d, o: class3d(d, o, "--K", "0"), ("--K 0",)),
    ("class3d-K-more-than-particles", lambda d, o: class3d(d, o, "--K", "50"), ("--K 50",)),
    ("class3d-iter-0", lambda d, o: class3d(d, o, "--iter", "0"), ("--iter 0",)),
    ("class3d-perturbation-negative", lambda d, o: class3d(d, o, "--init_perturbation", "-1"),
     ("--init_perturbation",)),
    ("class3d-difference-fsc-1", lambda d, o: class3d(d, o, "--class_difference_fsc", "1"),
     ("--class_difference_fsc", "[0, 1)")),
    ("class3d-difference-window-negative", lambda d, o: class3d(
        d, o, "--class_difference_window", "-1"), ("--class_difference_window", "[0, 10]")),
    ("class3d-class-temperature-below-1", lambda d, o: class3d(
        d, o, "--class_temperature", "0.5"), ("--class_temperature", ">= 1")),
    ("class3d-reference-2d", lambda d, o: class3d(d, o)[:4] + [str(d / "image.mrc")]
     + class3d(d, o)[5:], ("image.mrc", "3D")),
    ("class3d-cs-missing", lambda d, o: class3d(d, o, star=star_with(
        d, "nocs", lambda b: b.__setitem__("optics", b["optics"].drop(
            columns=["rlnSphericalAberration"])))), ("nocs.star", "rlnSphericalAberration")),
    ("hetero_refine-K-0", lambda d, o: hetero_refine(d, o, "--K", "0"), ("--K 0",)),
    ("hetero_refine-tau2-fudge-0", lambda d, o: hetero_refine(d, o, "--tau2_fudge", "0"),
     ("--tau2_fudge",)),
    ("hetero_refine-reference-2d", lambda d, o: hetero_refine(d, o)[:4] + [str(d / "image.mrc")]
     + hetero_refine(d, o)[5:], ("image.mrc", "3D")),
    ("class2d-subset-size-0", lambda d, o: class2d(d, o, "--subset_size", "0"),
     ("--subset_size",)),
    ("class2d-psi-step-0", lambda d, o: class2d(d, o, "--psi_step", "0"), ("--psi_step",)),
    ("class2d-reseed-fraction-1", lambda d, o: class2d(d, o, "--reseed_fraction", "1"),
     ("--reseed_fraction",)),
    ("class2d-highres-0", lambda d, o: class2d(d, o, "--strict_highres_exp", "0"),
     ("--strict_highres_exp",)),
    ("class2d-reference-wrong-box", lambda d, o: class2d(d, o, "--ref", map_file(
        d, "img8.mrc", np.zeros((8, 8)))), ("img8.mrc", "box")),
    # initial_model / flip_hand
    ("initial_model-K-0", lambda d, o: initial_model(d, o, "--K", "0"), ("--K 0",)),
    ("initial_model-K-more-than-particles", lambda d, o: initial_model(d, o, "--K", "50"),
     ("--K 50",)),
    ("initial_model-iter-1", lambda d, o: initial_model(d, o, "--iter", "1"), ("--iter 1",)),
    ("initial_model-fin-above-ini", lambda d, o: initial_model(
        d, o, "--ini_high", "35", "--grad_fin_resol", "50"), ("--grad_fin_resol 50",)),
    ("initial_model-fin-beyond-nyquist", lambda d, o: initial_model(
        d, o, "--grad_fin_resol", "10"), ("--grad_fin_resol 10", "Nyquist")),
    ("initial_model-subset-0", lambda d, o: initial_model(d, o, "--grad_ini_subset", "0"),
     ("--grad_ini_subset 0",)),
    ("initial_model-subsets-decreasing", lambda d, o: initial_model(
        d, o, "--grad_ini_subset", "10", "--grad_fin_subset", "5"), ("--grad_fin_subset 5",)),
    ("initial_model-stepsize-0", lambda d, o: initial_model(d, o, "--grad_stepsize", "0"),
     ("--grad_stepsize 0",)),
    ("initial_model-fractions-above-1", lambda d, o: initial_model(
        d, o, "--grad_ini_frac", "0.8", "--grad_fin_frac", "0.5"), ("--grad_fin_frac",)),
    ("initial_model-perturbation-negative", lambda d, o: initial_model(
        d, o, "--init_perturbation", "-1"), ("--init_perturbation",)),
    ("initial_model-reference-given", lambda d, o: initial_model(
        d, o, "--ref", str(d / "ref.mrc")), ("--ref", "no reference")),
    ("initial_model-sym-unknown", lambda d, o: initial_model(d, o, "--sym", "Q3"),
     ("--sym",)),
    ("initial_model-diameter-too-large", lambda d, o: initial_model(
        d, o, "--particle_diameter", "5000"), ("--particle_diameter 5000",)),
    ("initial_model-cs-missing", lambda d, o: initial_model(d, o, star=star_with(
        d, "nocs_im", lambda b: b.__setitem__("optics", b["optics"].drop(
            columns=["rlnSphericalAberration"])))), ("nocs_im.star", "rlnSphericalAberration")),
    ("initial_model-continue-without-run", lambda d, o: ["initial_model", "--o", str(o),
                                                         "--continue"], ("job.json",)),
    ("initial_model-continue-refine-run", lambda d, o: damaged_run(d, o, json.dumps(
        {"kind": "refine", "i": "x.star", "ref": None, "options": {}})) or
     ["initial_model", "--o", str(o), "--continue"], ("not an initial model",)),
    ("initial_model-continue-bad-option", lambda d, o: damaged_run(d, o, json.dumps(
        {"kind": "initial_model", "i": "x.star", "ref": None,
         "options": {"stepsize": 2}})) or ["initial_model", "--o", str(o), "--continue"],
     ("job.json", "grad_stepsize")),
    ("flip_hand-input-missing", lambda d, o: flip_hand(d, d, volume=str(d / "nope.mrc")),
     ("nope.mrc",)),
    ("flip_hand-input-2d", lambda d, o: flip_hand(d, d, volume=str(d / "image.mrc")),
     ("image.mrc", "3D")),
    ("flip_hand-output-is-input", lambda d, o: ["flip_hand", "--i", str(d / "ref.mrc"), "--o",
                                                str(d / "ref.mrc")], ("--o", "same file")),
    ("flip_hand-output-folder-missing", lambda d, o: flip_hand(d, o), ("--o",)),
    # project
    ("project-angle-nan", lambda d, o: project(d, d, ang=star_with(
        d, "angnan", set_value("particles", "rlnAngleTilt", np.nan, 2), "truth.star")),
     ("angnan.star", "rlnAngleTilt")),
    ("project-voltage-0-with-ctf", lambda d, o: project(d, d, "--ctf", ang=star_with(
        d, "pv0", set_value("optics", "rlnVoltage", 0.0), "truth.star")),
     ("pv0.star", "rlnVoltage")),
    ("project-output-folder-missing", lambda d, o: project(d, o), ("--o", "does not exist")),
    ("project-snr-0-with-noise", lambda d, o: project(d, d, "--add-noise", "--snr", "0"),
     ("--snr",)),
    ("project-seed-negative", lambda d, o: project(d, d, "--seed", "-2"), ("--seed",)),
    ("project-map-2d", lambda d, o: project(d, d, volume=str(d / "image.mrc")),
     ("image.mrc", "3D")),
    # simulate
    ("simulate-n-0", lambda d, o: simulate(d, o, "--n", "0"), ("--n 0",)),
    ("simulate-voltage-0", lambda d, o: simulate(d, o, "--voltage", "0"), ("--voltage",)),
    ("simulate-amplitude-contrast-1.5", lambda d, o: simulate(d, o, "--Q0", "1.5"),
     ("--Q0",)),
    ("simulate-defocus-nan", lambda d, o: simulate(d, o, "--defocus-min", "nan"),
     ("--defocus_min",)),
    ("simulate-angpix-absurd", lambda d, o: simulate(d, o, "--angpix", "1e-5"),
     ("--angpix",)),
    ("simulate-box-4", lambda d, o: simulate(d, o, "--box", "4"), ("--box 4",)),
    ("simulate-box-too-large-for-memory", lambda d, o: simulate(d, o, "--box", "100000"),
     ("memory", "GiB")),
    ("simulate-max-shift-beyond-box", lambda d, o: simulate(d, o, "--max-shift", "100"),
     ("--max_shift",)),
    ("simulate-o-is-a-file", lambda d, o: simulate(d, d / "ref.mrc"), ("--o", "not a folder")),
    ("simulate-junk-fraction-1", lambda d, o: simulate(d, o, "--junk_fraction", "1"),
     ("--junk_fraction", "[0, 1)")),
    ("simulate-ice-thickness-negative",
     lambda d, o: simulate(d, o, "--ice_thickness", "-10"), ("--ice_thickness", ">= 0")),
    ("simulate-noise-colour-0", lambda d, o: simulate(d, o, "--noise_colour", "0"),
     ("--noise_colour",)),
    # ctf_refine
    ("ctf_refine-not-a-refinement", lambda d, o: [
        "ctf_refine", "--i", str(d / "particles.star"), "--o", str(o / "ctf")],
     ("particles.star", "_data.star")),
    ("ctf_refine-defocus-range-0", lambda d, o: [
        "ctf_refine", "--i", str(d / "particles.star"), "--o", str(o / "ctf"),
        "--defocus_range", "0"], ("--defocus_range",)),
    # select
    ("select-classes-without-class-column", lambda d, o: [
        "select", "--i", str(d / "particles.star"), "--o", str(o / "s.star"), "--classes", "1"],
     ("particles.star", "rlnClassNumber")),
    ("select-nothing-to-select-by", lambda d, o: [
        "select", "--i", str(d / "particles.star"), "--o", str(o / "s.star")],
     ("--classes", "--auto")),
    ("select-missing-column", lambda d, o: [
        "select", "--i", str(d / "particles.star"), "--o", str(o / "s.star"), "--select",
        "rlnNope", "--minval", "0"], ("particles.star", "rlnNope")),
    ("select-auto-without-classes", lambda d, o: [
        "select", "--i", str(d / "particles.star"), "--o", str(o / "s.star"), "--auto"],
     ("particles.star", "rlnClassNumber")),
    # info
    ("info-missing-file", lambda d, o: ["info", "--i", str(d / "nope.star")], ("nope.star",)),
    ("info-mrc-negative-nx", lambda d, o: ["info", "--i", patched_mrc(
        d, "negmap.mrc", "ref.mrc", 0, "<i", -5)], ("negmap.mrc", "nx")),
    ("info-mrc-shorter-than-header-says", lambda d, o: ["info", "--i", truncated(
        d, "cut.mrcs", "particles.mrcs", 1024 + 100)], ("cut.mrcs", "bytes")),
    # mask
    ("mask-soft-edge-negative", lambda d, o: mask(d, d, "--width_soft_edge", "-1"),
     ("--width_soft_edge",)),
    ("mask-lowpass-beyond-nyquist", lambda d, o: mask(d, d, "--lowpass", "3"),
     ("--lowpass", "Nyquist")),
    ("mask-threshold-above-map", lambda d, o: mask(d, d, "--ini_threshold", "1e9"),
     ("--ini_threshold", "empty")),
    ("mask-output-folder-missing", lambda d, o: mask(d, o), ("--o", "does not exist")),
    ("mask-input-2d", lambda d, o: mask(d, d, volume=str(d / "image.mrc")), ("image.mrc",)),
    # postprocess
    ("postprocess-randomize-at-fsc-1.5", lambda d, o: postprocess(
        d, o, "--randomize_at_fsc", "1.5"), ("--randomize_at_fsc",)),
    ("postprocess-autob-lowres-0", lambda d, o: postprocess(d, o, "--autob_lowres", "0"),
     ("--autob_lowres",)),
    ("postprocess-mask-out-of-range", lambda d, o: postprocess(d, o, mask_path=map_file(
        d, "mask2.mrc", np.full((BOX,) * 3, 2.0))), ("mask2.mrc",)),
    ("postprocess-half-maps-differ", lambda d, o: postprocess(d, o, "--i2", map_file(
        d, "small_half2.mrc", np.zeros((8, 8, 8)))), ("small_half2.mrc", "box")),
    ("postprocess-o-is-a-file", lambda d, o: postprocess(d, d / "ref.mrc"),
     ("--o", "not a folder")),
    ("postprocess-angpix-absurd", lambda d, o: postprocess(d, o, "--angpix", "1e-4"),
     ("--angpix",)),
    # reconstruct
    ("reconstruct-no-poses", lambda d, o: ["reconstruct", "--i", str(d / "particles.star"),
                                           "--o", str(d / "rec.mrc")],
     ("particles.star", "rlnAngleRot")),
    ("reconstruct-subset-3", lambda d, o: ["reconstruct", "--i", str(d / "truth.star"), "--o",
                                           str(d / "rec.mrc"), "--subset", "3"],
     ("--subset 3",)),
    ("reconstruct-sym-unknown", lambda d, o: ["reconstruct", "--i", str(d / "truth.star"),
                                              "--o", str(d / "rec.mrc"), "--sym", "X7"],
     ("--sym",)),
    ("reconstruct-output-folder-missing", lambda d, o: ["reconstruct", "--i",
                                                        str(d / "truth.star"), "--o",
                                                        str(o / "rec.mrc")],
     ("does not exist",)),
    # export, star, symmetry_expand, subtract
    ("export-out-not-cs", lambda d, o: ["export", "--i", str(d / "truth.star"), "--o",
                                        str(o / "p.star")], ("--o", ".cs")),
    ("star-class-missing", lambda d, o: ["star", "--i", str(d / "truth.star"), "--o",
                                         str(o / "s.star"), "--classes", "99"], ("99",)),
    ("star-nr-split-1", lambda d, o: ["star", "--i", str(d / "truth.star"), "--o",
                                      str(o / "s.star"), "--split", "--nr_split", "1"],
     ("--nr_split",)),
    ("symmetry_expand-sym-unknown", lambda d, o: ["symmetry_expand", "--i",
                                                  str(d / "truth.star"), "--o",
                                                  str(o / "x.star"), "--sym", "X3"],
     ("--sym",)),
    ("subtract-new-box-odd", lambda d, o: [
        "subtract", "--i", str(d / "truth.star"), "--data", str(d / "ref.mrc"), "--mask",
        map_file(d, "submask.mrc", np.zeros((BOX,) * 3)), "--o", str(o), "--new_box", "25"],
     ("--new_box 25",)),
    ("locres-half-maps-differ", lambda d, o: [
        "locres", "--half1", str(d / "ref.mrc"), "--half2",
        map_file(d, "small_half.mrc", np.zeros((8, 8, 8))), "--o", str(o)],
     ("small_half.mrc",)),
    # phantom, demo
    ("phantom-box-4", lambda d, o: ["phantom", "--o", str(d / "ph.mrc"), "--box", "4"],
     ("--box 4",)),
    ("phantom-variant-99", lambda d, o: ["phantom", "--o", str(d / "ph.mrc"), "--variant",
                                         "99"], ("--variant 99",)),
    ("phantom-box-too-large-for-memory", lambda d, o: ["phantom", "--o", str(d / "ph.mrc"),
                                                       "--box", "100000"], ("memory",)),
    ("demo-box-4", lambda d, o: ["demo", "--o", str(o), "--box", "4"], ("--box 4",)),
    ("demo-n-1", lambda d, o: ["demo", "--o", str(o), "--n", "1"], ("--n 1",)),
    ("demo-healpix-negative", lambda d, o: ["demo", "--o", str(o), "--healpix_order", "-1"],
     ("--healpix_order",)),
]


def _files(*roots: Path) -> set[Path]:
    return {p for r in roots if r.exists() for p in r.rglob("*")}


@pytest.mark.filterwarnings("ignore:Data array contains NaN")
@pytest.mark.parametrize("case", CASES, ids=[c[0] for c in CASES])
def test_bad_input_is_one_line_and_writes_nothing(data, tmp_path, capsys, case):
    _, make_args, words = case
    out = tmp_path / "out"
    argv = make_args(data, out)  # makes the case's bad files (and a damaged run)
    out_existed = out.exists()
    before = _files(data, tmp_path)
    capsys.readouterr()
    assert main(argv) == 2
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert "Traceback" not in captured.err + captured.out
    assert len(err.splitlines()) == 1, err
    assert err.startswith(f"cryomap {argv[0]}: error: "), err
    for word in words:
        assert word in err, (word, err)
    assert _files(data, tmp_path) == before  # nothing written anywhere
    assert out.exists() == out_existed  # --o not created


def test_cases_cover_every_command():
    """Every subcommand has bad-input cases here, and there are at least 40 kinds."""
    from cryomap.cli.main import _subcommand_modules

    covered = {case_id.split("-")[0] for case_id, _, _ in CASES}
    assert {m.COMMAND for m in _subcommand_modules()} <= covered
    assert len(CASES) >= 40


def test_the_same_commands_succeed_on_good_input(data, tmp_path):
    """The control: the unmodified inputs run (so the cases above fail for their one bad
    value, not for the fixture)."""
    assert main(refine(data, tmp_path / "r")) == 0
    assert (tmp_path / "r" / "run_class001.mrc").exists()
    assert main(simulate(data, tmp_path / "s")) == 0
    assert main(project(data, tmp_path)) == 0
    assert main(mask(data, tmp_path)) == 0
    assert main(initial_model(data, tmp_path / "im")) == 0
    assert (tmp_path / "im" / "run_class001.mrc").exists()
    assert main(flip_hand(data, tmp_path)) == 0
