"""`cryomap subtract` (relion_particle_subtract): particles simulated from a known map at
known poses, CTFs (rlnCtfScalefactor included) and white Gaussian noise of known variance;
subtracting the whole map leaves the noise, subtracting outside a mask leaves the masked
map's projection plus the noise, re-centring puts the mask's centre at the box centre, and
bad input writes nothing."""

from __future__ import annotations

from pathlib import Path

import mrcfile
import numpy as np
import pandas as pd
import pytest
from scipy.spatial.transform import Rotation

from cryomap.cli.main import main
from cryomap.ctf import CtfParams
from cryomap.io.mrc import write_map, write_stack
from cryomap.io.star import read_star, write_star
from cryomap.particles import make_optics_table, write_particles
from cryomap.simulate import project_images

BOX, PIX, N = 40, 3.0, 64
SIGMA = 1.0  # noise standard deviation (pixel units of the images)
C = BOX // 2  # the box centre floor(N/2)
BLOB_B = (10, -7, 6)  # (x, y, z) px from the centre: the part the mask keeps


def _grid() -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(x, y, z) voxel coordinates from the centre, each (z, y, x)-indexed."""
    z, y, x = np.meshgrid(*([np.arange(BOX) - C] * 3), indexing="ij")
    return x, y, z


def _blob(centre, sigma: float, amp: float) -> np.ndarray:
    x, y, z = _grid()
    r2 = (x - centre[0]) ** 2 + (y - centre[1]) ** 2 + (z - centre[2]) ** 2
    return amp * np.exp(-r2 / (2 * sigma**2))


def _volume() -> np.ndarray:
    """An elongated centred body (blob A) plus a small off-centre one (blob B)."""
    x, y, z = _grid()
    body = 2.0 * np.exp(-(x**2 / 18 + y**2 / 8 + z**2 / 12) / 2)
    return (body + _blob(BLOB_B, 2.0, 3.0)).astype(np.float32)


def _sphere_mask(centre, radius: float = 5.0, edge: float = 2.0) -> np.ndarray:
    """1 within `radius` of centre, a cosine edge of `edge` px, 0 beyond: symmetric about
    the voxel `centre`, so its centre of mass is exactly there."""
    x, y, z = _grid()
    r = np.sqrt((x - centre[0]) ** 2 + (y - centre[1]) ** 2 + (z - centre[2]) ** 2)
    m = np.where(r <= radius, 1.0, 0.5 + 0.5 * np.cos(np.pi * (r - radius) / edge))
    return np.where(r >= radius + edge, 0.0, m).astype(np.float32)


def _simulate(folder: Path, ctf: bool, max_shift: float, seed: int) -> dict:
    """Write map.mrc, particles.mrcs/.star (and the masks) in `folder`; returns the truth:
    angles, origins (px), CtfParams (or None), noise and clean images."""
    rng = np.random.default_rng(seed)
    vol = _volume()
    angles = np.column_stack([rng.uniform(-180, 180, N), np.degrees(np.arccos(
        rng.uniform(-1, 1, N))), rng.uniform(-180, 180, N)])
    origins = rng.uniform(-max_shift, max_shift, (N, 2))
    table = pd.DataFrame({"rlnAngleRot": angles[:, 0], "rlnAngleTilt": angles[:, 1],
                          "rlnAnglePsi": angles[:, 2],
                          "rlnOriginXAngst": origins[:, 0] * PIX,
                          "rlnOriginYAngst": origins[:, 1] * PIX,
                          "rlnOriginXPriorAngst": origins[:, 0] * PIX,
                          "rlnMicrographName": [f"mic{i % 5}.mrc" for i in range(N)],
                          "rlnRandomSubset": 1 + np.arange(N) % 2})
    params = None
    if ctf:
        du = rng.uniform(8000, 20000, N)
        params = CtfParams(defocus_u=du, defocus_v=du - rng.uniform(0, 600, N),
                           defocus_angle=rng.uniform(0, 180, N), voltage=300.0, cs=2.7,
                           amplitude_contrast=0.1, scale=rng.uniform(0.5, 1.5, N))
        table["rlnDefocusU"], table["rlnDefocusV"] = params.defocus_u, params.defocus_v
        table["rlnDefocusAngle"] = params.defocus_angle
        table["rlnCtfScalefactor"] = params.scale
    clean = project_images(vol, angles, origins, params, PIX)
    noise = rng.normal(0.0, SIGMA, clean.shape).astype(np.float32)
    write_stack(folder / "particles.mrcs", clean + noise, PIX)
    table["rlnImageName"] = [f"{i + 1:06d}@{folder / 'particles.mrcs'}" for i in range(N)]
    table["rlnOpticsGroup"] = 1
    write_particles(folder / "particles.star", make_optics_table(PIX, BOX), table)
    write_map(folder / "map.mrc", vol, PIX)
    write_map(folder / "zero_mask.mrc", np.zeros_like(vol), PIX)
    write_map(folder / "mask_b.mrc", _sphere_mask(BLOB_B), PIX)
    return {"vol": vol, "angles": angles, "origins": origins, "ctf": params, "noise": noise,
            "clean": clean}


@pytest.fixture(scope="module")
def sim(tmp_path_factory):
    folder = tmp_path_factory.mktemp("subtract_ctf")
    return folder, _simulate(folder, ctf=True, max_shift=2.0, seed=11)


def _run(folder: Path, out: Path, mask: str, *extra: str) -> tuple[np.ndarray, dict]:
    argv = ["subtract", "--i", str(folder / "particles.star"), "--data",
            str(folder / "map.mrc"), "--mask", str(folder / mask), "--o", str(out), *extra]
    assert main(argv) == 0
    with mrcfile.open(out / "particles_subtracted.mrcs") as m:
        images = np.array(m.data)
        assert m.voxel_size.x == pytest.approx(PIX)
    return images, read_star(out / "particles_subtracted.star")


def _correlation(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Per-image Pearson correlation of two (n, N, N) stacks."""
    a = a - a.mean(axis=(1, 2), keepdims=True)
    b = b - b.mean(axis=(1, 2), keepdims=True)
    return (a * b).sum(axis=(1, 2)) / np.sqrt((a * a).sum(axis=(1, 2)) * (b * b).sum(axis=(1, 2)))


def test_subtracting_the_whole_map_leaves_the_noise(sim, tmp_path):
    folder, truth = sim
    images, blocks = _run(folder, tmp_path / "job", "zero_mask.mrc")
    assert images.shape == (N, BOX, BOX) and images.dtype == np.float32
    # per-pixel variance over 64 x 1600 pixels: the noise's (sampling error 0.44%)
    var = float(np.var(images, dtype=np.float64))
    assert var == pytest.approx(SIGMA**2, rel=0.02)  # measured 1.0018; margin 2% (4.5 SE)
    # the signal is gone: mean correlation with the clean projections ~0 ...
    corr = _correlation(images, truth["clean"])
    assert abs(corr.mean()) < 0.02  # measured 7e-5 (SE 0.003); margin ~6 SE
    # ... where the input images had it (control; measured 0.73)
    assert _correlation(truth["clean"] + truth["noise"], truth["clean"]).mean() > 0.5
    # and what is left is the very noise that was added
    assert np.abs(images - truth["noise"]).max() < 1e-4 * SIGMA  # measured 1e-6; margin 100x
    # the STAR file: every input row and column, the new stack and the original images
    inp = read_star(folder / "particles.star")["particles"]
    out = blocks["particles"]
    assert len(out) == N
    assert set(inp.columns) | {"rlnImageOriginalName"} == set(out.columns)
    assert list(out["rlnImageOriginalName"]) == list(inp["rlnImageName"])
    assert out["rlnImageName"].iloc[3].startswith("000004@")
    assert out["rlnImageName"].iloc[3].endswith("job/particles_subtracted.mrcs")
    for label in ("rlnAngleRot", "rlnOriginXAngst", "rlnCtfScalefactor", "rlnMicrographName",
                  "rlnRandomSubset", "rlnOriginXPriorAngst"):
        assert list(out[label]) == list(inp[label]), label
    assert int(blocks["optics"]["rlnImageSize"].iloc[0]) == BOX


def test_subtracting_outside_a_mask_leaves_the_masked_projection(sim, tmp_path):
    folder, truth = sim
    images, _ = _run(folder, tmp_path / "job", "mask_b.mrc")
    mask = _sphere_mask(BLOB_B)
    # independent prediction: the masked map projected at the same poses and CTFs
    kept = project_images(truth["vol"] * mask, truth["angles"], truth["origins"],
                          truth["ctf"], PIX)
    residual = images - kept
    var = float(np.var(residual, dtype=np.float64))
    assert var == pytest.approx(SIGMA**2, rel=0.02)  # measured 1.0018; margin 2% (4.5 SE)
    assert np.abs(residual - truth["noise"]).max() < 1e-4 * SIGMA  # measured 2e-6; margin 60x
    # the kept signal is there (its power a sizeable part of the image's; measured 0.68, the
    # whole map's 1.57) and the subtracted images follow it (measured correlation 0.60)
    assert float(np.var(kept)) > 0.3 * SIGMA**2
    assert _correlation(images, kept).mean() > 0.4


def _rotation_matrices(angles: np.ndarray) -> np.ndarray:
    """RELION's A from scipy (docs/conventions.md, "Euler angles"), not cryomap.euler."""
    return Rotation.from_euler("ZYZ", angles, degrees=True).as_matrix().transpose(0, 2, 1)


def test_recentring_on_the_mask_with_ctf(sim, tmp_path):
    """With the new origins, the images are the masked map moved to the box centre
    (rolled by -c), projected at the same angles and CTFs: the residual is the noise."""
    folder, truth = sim
    images, blocks = _run(folder, tmp_path / "job", "mask_b.mrc", "--recenter_on_mask")
    parts = blocks["particles"]
    new = np.column_stack([parts["rlnOriginXAngst"], parts["rlnOriginYAngst"]]) / PIX
    assert np.abs(new).max() <= 0.5 + 1e-9  # the sub-pixel rest only
    assert "rlnOriginXPriorAngst" not in parts.columns  # priors refer to the old centre
    # whole-pixel translations, computed here from scipy's rotation matrices
    c = np.array(BLOB_B, np.float64)
    shift = np.floor(truth["origins"] - (_rotation_matrices(truth["angles"]) @ c)[:, :2]
                     + 0.5)
    # measured 1e-10 px (the STAR file's digits); margin 1e4x
    assert np.allclose(truth["origins"] - (_rotation_matrices(truth["angles"]) @ c)[:, :2]
                       - shift, new, rtol=0, atol=1e-6)
    centred = np.roll(truth["vol"] * _sphere_mask(BLOB_B), (-BLOB_B[2], -BLOB_B[1],
                                                            -BLOB_B[0]), axis=(0, 1, 2))
    pred = project_images(centred, truth["angles"], new, truth["ctf"], PIX)
    noise = np.stack([np.roll(e, (int(t[1]), int(t[0])), axis=(0, 1))
                      for e, t in zip(truth["noise"], shift, strict=True)])
    # interpolation differs between projecting a moved map and moving its projection
    rms = float(np.sqrt(np.mean((images - pred - noise) ** 2)))
    assert rms < 0.06 * SIGMA  # measured 0.026; margin 2.3x
    var = float(np.var(images - pred, dtype=np.float64))
    assert var == pytest.approx(SIGMA**2, rel=0.02)  # measured 1.0024; margin 2% (4.5 SE)
    # control: half a pixel off in x and the error is 7x larger (measured 0.19)
    off = project_images(centred, truth["angles"], new + [0.5, 0.0], truth["ctf"], PIX)
    assert float(np.sqrt(np.mean((images - off - noise) ** 2))) > 3 * rms
    # --center_x/y/z at the mask's centre of mass (exactly BLOB_B) does the same
    same, _ = _run(folder, tmp_path / "job2", "mask_b.mrc", "--center_x", str(BLOB_B[0]),
                   "--center_y", str(BLOB_B[1]), "--center_z", str(BLOB_B[2]))
    assert np.array_equal(same, images)
    # --new_box crops after re-centring: the centred window of the full-box images
    small, blocks = _run(folder, tmp_path / "job3", "mask_b.mrc", "--recenter_on_mask",
                         "--new_box", "24")
    assert np.array_equal(small, images[:, C - 12:C + 12, C - 12:C + 12])
    assert int(blocks["optics"]["rlnImageSize"].iloc[0]) == 24
    assert np.allclose(blocks["particles"]["rlnOriginXAngst"], parts["rlnOriginXAngst"])


def test_recentred_average_is_centred(tmp_path):
    """No CTF (positive images): the average subtracted image's centre of mass is the box
    centre and its peak is there; without re-centring the kept blob lies 13.6 px from the
    centre in 3D, wherever each view projects it, and the average is a faint smear."""
    folder = tmp_path / "sim"
    folder.mkdir()
    _simulate(folder, ctf=False, max_shift=3.0, seed=5)
    images, _ = _run(folder, tmp_path / "job", "mask_b.mrc", "--recenter_on_mask")
    plain, _ = _run(folder, tmp_path / "job0", "mask_b.mrc")

    def centre_of_mass(avg: np.ndarray) -> np.ndarray:
        y, x = np.meshgrid(np.arange(BOX) - C, np.arange(BOX) - C, indexing="ij")
        return np.array([(avg * x).sum(), (avg * y).sum()]) / avg.sum()

    avg = images.mean(axis=0)
    # noise alone moves it by ~0.15 px (SE: 0.125 x sqrt(sum x^2) / blob mass)
    assert np.hypot(*centre_of_mass(avg)) < 0.6  # measured 0.14 px; margin 4x
    assert np.unravel_index(np.argmax(avg), avg.shape) == (C, C)
    # control: the same particles not re-centred (peak measured 1.3 against 14.8)
    assert plain.mean(axis=0).max() < 0.2 * avg.max()


# -- bad input ----------------------------------------------------------------------------------


def _edit_star(folder: Path, dest: Path, edit) -> Path:
    blocks = read_star(folder / "particles.star")
    edit(blocks)
    write_star(dest, blocks)
    return dest


def _bad_cases():
    def drop_psi(b):
        b["particles"] = b["particles"].drop(columns=["rlnAnglePsi"])

    def no_ctf(b):
        b["particles"] = b["particles"].drop(columns=["rlnDefocusU", "rlnDefocusV",
                                                      "rlnDefocusAngle", "rlnCtfScalefactor"])

    def image_beyond_stack(b):
        name = b["particles"]["rlnImageName"].iloc[-1]
        b["particles"].loc[N - 1, "rlnImageName"] = "000999@" + name.split("@", 1)[1]

    def missing_stack(b):
        b["particles"].loc[2, "rlnImageName"] = "000001@nowhere/missing.mrcs"

    def star(edit):
        return lambda f, t: {"--i": str(_edit_star(f, t / "bad.star", edit))}

    def map_file(data, pix, name="--data"):
        def make(f, t):
            path = t / "bad.mrc"
            write_map(path, data, pix)
            return {name: str(path)}
        return make

    vol = _volume()
    return [
        ("map-box", lambda f, t: {**map_file(vol[:32, :32, :32], PIX)(f, t),
                                  "--mask": str(_zero_mask(t, 32))}, ("rlnImageSize = 40",)),
        ("map-pixel", lambda f, t: {**map_file(vol, 3.5)(f, t),
                                    "--mask": str(_zero_mask(t, BOX, 3.5))},
         ("rlnImagePixelSize = 3",)),
        ("mask-box", map_file(np.zeros((32, 32, 32), np.float32), PIX, "--mask"),
         ("mask box",)),
        ("mask-values", map_file(np.full((BOX,) * 3, 1.5, np.float32), PIX, "--mask"),
         ("[0, 1]",)),
        ("mask-pixel", map_file(np.zeros((BOX,) * 3, np.float32), 4.0, "--mask"),
         ("mask pixel size",)),
        ("pose-missing", star(drop_psi), ("rlnAnglePsi",)),
        ("ctf-missing", lambda f, t: {**star(no_ctf)(f, t), "--ctf": None}, ("rlnDefocusU",)),
        ("stack-missing", star(missing_stack), ("not found",)),
        ("image-beyond-stack", star(image_beyond_stack), ("out of range",)),
        ("new-box-odd", lambda f, t: {"--new_box": "25"}, ("--new_box 25",)),
        ("new-box-large", lambda f, t: {"--new_box": "48"}, ("--new_box 48",)),
        ("recentre-empty-mask", lambda f, t: {"--mask": str(f / "zero_mask.mrc"),
                                              "--recenter_on_mask": None}, ("empty",)),
        ("center-partial", lambda f, t: {"--center_x": "3"}, ("--center_x/y/z",)),
        ("output-is-a-file", lambda f, t: {"--o": str(_a_file(t))}, ("--o", "not a folder")),
    ]


def _zero_mask(folder: Path, box: int, pix: float = PIX) -> Path:
    path = folder / "zero.mrc"
    write_map(path, np.zeros((box,) * 3, np.float32), pix)
    return path


def _a_file(folder: Path) -> Path:
    path = folder / "taken"
    path.write_text("x")
    return path


_CASES = _bad_cases()


@pytest.mark.parametrize("case", _CASES, ids=[c[0] for c in _CASES])
def test_bad_input_is_one_line_and_writes_nothing(sim, tmp_path, capsys, case):
    folder, _ = sim
    _, make, words = case
    out = tmp_path / "Subtract" / "job001"
    opts = {"--i": str(folder / "particles.star"), "--data": str(folder / "map.mrc"),
            "--mask": str(folder / "mask_b.mrc"), "--o": str(out)}
    opts.update(make(folder, tmp_path))
    argv = ["subtract"] + [w for k, v in opts.items() for w in ((k,) if v is None else (k, v))]
    before = {p for root in (folder, tmp_path) for p in root.rglob("*")}
    capsys.readouterr()
    assert main(argv) == 2
    captured = capsys.readouterr()
    assert "Traceback" not in captured.err
    err = captured.err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("cryomap subtract: error: "), err
    for word in words:
        assert word in err, (word, err)
    assert {p for root in (folder, tmp_path) for p in root.rglob("*")} == before
