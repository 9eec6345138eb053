"""Fuzzing the readers: mutated STAR, MRC map and MRC stack files either load (and then the
data are self-consistent: shapes, finite values, checked CTF) or raise InputError. Any other
exception is a failure. Seeded; a few hundred cases in a few seconds."""

from __future__ import annotations

import struct

import numpy as np
import pandas as pd
import pytest

from cryomap.cli.main import main
from cryomap.errors import InputError
from cryomap.halves import random_subsets
from cryomap.io.mrc import PIXEL_SIZE_RANGE, open_stack, read_map, write_map, write_stack
from cryomap.io.star import read_star
from cryomap.particles import load_particles, make_optics_table, write_particles

BOX = 8
N_IMAGES = 4
SEED = 20240601

TOKENS = ["abc", "nan", "inf", "-inf", '""', "1e400", "-0", "0", "-1", "1e-40", "2",
          "99999999999999999999", "[1,2]", "@@", "0@s.mrcs", "5@s.mrcs", "1@", "x y", "#",
          "data_", "loop_", "_rlnX", "3.5", "1@../s.mrcs", "1@s.mrc"]


@pytest.fixture(scope="module")
def valid(tmp_path_factory):
    """A valid particle STAR file, its stack and a map."""
    d = tmp_path_factory.mktemp("fuzz")
    rng = np.random.default_rng(0)
    write_stack(d / "s.mrcs", rng.normal(size=(N_IMAGES, BOX, BOX)).astype(np.float32), 1.5)
    write_map(d / "m.mrc", rng.normal(size=(BOX, BOX, BOX)).astype(np.float32), 1.5)
    optics = make_optics_table(1.5, BOX)
    optics.loc[1] = ["opticsGroup2", 2, 200.0, 2.0, 0.07, 1.5, BOX, 2]
    parts = pd.DataFrame({
        "rlnImageName": [f"{i + 1}@s.mrcs" for i in range(N_IMAGES)],
        "rlnOpticsGroup": [1, 2, 1, 2],
        "rlnDefocusU": [12000.0, 15000.0, 9000.0, 20000.0],
        "rlnDefocusV": [11000.0, 14500.0, 8900.0, 19000.0],
        "rlnDefocusAngle": [10.0, -20.0, 30.0, 0.0],
        "rlnAngleRot": [0.0, 30.0, -60.0, 120.0],
        "rlnAngleTilt": [10.0, 90.0, 45.0, 170.0],
        "rlnAnglePsi": [0.0, 15.0, -15.0, 100.0],
        "rlnOriginXAngst": [1.5, -3.0, 0.0, 0.75],
        "rlnOriginYAngst": [0.0, 1.5, -1.5, 3.0],
        "rlnRandomSubset": [1, 2, 1, 2],
    })
    write_particles(d / "p.star", optics, parts)
    return d


# -- mutations ----------------------------------------------------------------------------------


def _mutate_star(text: str, rng: np.random.Generator) -> str:
    lines = text.split("\n")
    op = int(rng.integers(12))
    data_rows = [i for i, ln in enumerate(lines)
                 if ln.strip() and not ln.lstrip().startswith(("_", "#", "data_", "loop_"))]
    labels = [i for i, ln in enumerate(lines) if ln.startswith("_")]
    if op == 0:  # byte flips
        raw = bytearray(text.encode())
        for pos in rng.integers(0, len(raw), int(rng.integers(1, 6))):
            raw[pos] = int(rng.integers(0, 256))
        return raw.decode("latin-1")
    if op == 1:  # truncation
        return text[: int(rng.integers(0, len(text)))]
    if op in (2, 3):  # a value replaced by something else
        i = int(rng.choice(data_rows))
        toks = lines[i].split()
        toks[int(rng.integers(len(toks)))] = str(rng.choice(TOKENS))
        lines[i] = " ".join(toks)
    elif op == 4:  # two columns swapped (label lines exchanged)
        a, b = rng.choice(labels, 2, replace=False)
        lines[a], lines[b] = lines[b], lines[a]
    elif op == 5:
        del lines[int(rng.integers(len(lines)))]
    elif op == 6:
        i = int(rng.integers(len(lines)))
        lines.insert(i, lines[i])
    elif op == 7:  # empty a block
        block = str(rng.choice(["data_optics", "data_particles"]))
        start = lines.index(block)
        lines = lines[:start] + [ln for j, ln in enumerate(lines)
                                 if j >= start and (j not in data_rows or
                                                    any(lines[k].startswith("data_")
                                                        for k in range(start + 1, j)))]
    elif op == 8:  # drop the optics block (a RELION 3.0-looking file)
        start, end = lines.index("data_optics"), lines.index("data_particles")
        lines = lines[:start - 2] + lines[end:]
    elif op == 9:  # a label removed (rows have one value too many)
        del lines[int(rng.choice(labels))]
    elif op == 10:  # a whole column's values replaced
        i = int(rng.choice(labels))
        col = sum(1 for j in labels if j < i and
                  not any(lines[k].startswith("data_") for k in range(j, i)))
        tok = str(rng.choice(TOKENS))
        for r in data_rows:
            toks = lines[r].split()
            if col < len(toks) and r > i:
                toks[col] = tok
                lines[r] = " ".join(toks)
    else:  # a numeric value made extreme
        i = int(rng.choice(data_rows))
        toks = lines[i].split()
        k = int(rng.integers(len(toks)))
        toks[k] = str(rng.choice(["1e308", "-1e308", "1e-320", "0.0", "-5000", "4e9"]))
        lines[i] = " ".join(toks)
    return "\n".join(lines)


_HEADER_INTS = {"nx": 0, "ny": 4, "nz": 8, "mode": 12, "mx": 28, "nsymbt": 92}
_INT_VALUES = [0, -1, 1, 2, 3, 4, 7, 8, 9, 12, 101, 65535, 65536, 2**31 - 1, -2**31, 1000]
_FLOAT_VALUES = [0.0, -1.0, np.nan, np.inf, 1e-32, 1e28, 12.0, 0.8, 800.0]


def _mutate_mrc(raw: bytes, rng: np.random.Generator) -> bytes:
    b = bytearray(raw)
    op = int(rng.integers(6))
    if op == 0:  # byte flips, mostly in the header
        for _ in range(int(rng.integers(1, 5))):
            pos = int(rng.integers(0, 1024 if rng.random() < 0.8 else len(b)))
            b[pos] = int(rng.integers(0, 256))
    elif op == 1:
        b = b[: int(rng.integers(0, len(b)))]
    elif op in (2, 3):  # a header field set to an edge value
        name = str(rng.choice(list(_HEADER_INTS)))
        struct.pack_into("<i", b, _HEADER_INTS[name], int(rng.choice(_INT_VALUES)))
    elif op == 4:  # cell dimensions
        struct.pack_into("<f", b, 40 + 4 * int(rng.integers(3)), float(rng.choice(_FLOAT_VALUES)))
    else:  # NaN / inf voxels
        pos = 1024 + 4 * int(rng.integers(0, (len(b) - 1024) // 4))
        struct.pack_into("<f", b, pos, float(rng.choice([np.nan, np.inf, -np.inf])))
    return bytes(b)


# -- what "loads" must mean ---------------------------------------------------------------------


def _check_particles(path, tmp):
    ps = load_particles(path, log=None)
    assert ps.n_particles >= 1 and len(ps.optics) >= 1
    g = ps.optics_group_index()
    assert g.shape == (ps.n_particles,) and g.min() >= 0 and g.max() < len(ps.optics)
    pix, boxes = ps.pixel_sizes, ps.boxes
    assert np.all((pix >= PIXEL_SIZE_RANGE[0]) & (pix <= PIXEL_SIZE_RANGE[1]))
    assert np.all(boxes >= 1)
    assert np.all(np.isfinite(ps.angles())) and np.all(np.isfinite(ps.origins_px()))
    for gi in np.unique(g):
        idx = np.flatnonzero(g == gi)
        imgs = ps.read_images(idx)
        assert imgs.shape == (idx.size, boxes[gi], boxes[gi]) and imgs.dtype == np.float32
        assert np.all(np.isfinite(imgs))
        if ps.has_ctf:
            ctf = ps.ctf_params(idx)
            ky, kx = np.meshgrid(np.arange(-3, 4), np.arange(4), indexing="ij")
            vals = ctf.evaluate(kx, ky, int(boxes[gi]), float(pix[gi]))
            assert vals.shape == (idx.size,) + kx.shape and np.all(np.isfinite(vals))
    try:
        s = random_subsets(ps, np.random.default_rng(0), log=None)
        assert set(np.unique(s)) <= {1, 2}
    except InputError:
        pass
    ps.close()


def _check_map(path):
    data, pix = read_map(path)
    assert data.dtype == np.float32 and np.all(np.isfinite(data))
    assert data.ndim in (2, 3) and len(set(data.shape)) == 1
    assert PIXEL_SIZE_RANGE[0] <= pix <= PIXEL_SIZE_RANGE[1]


def _check_stack(path):
    with open_stack(path) as st:
        imgs = st.read(np.arange(st.n_images))
        assert imgs.shape == (st.n_images, st.box, st.box) and np.all(np.isfinite(imgs))


def _run(case, fn, *args):
    """fn(*args) must succeed or raise InputError with a one-line message naming a file."""
    try:
        fn(*args)
        return "loaded"
    except InputError as e:
        msg = str(e)
        assert "\n" not in msg, f"case {case}: multi-line message {msg!r}"
        return "refused"
    except Exception as e:  # the point of the test: report the case that escaped
        raise AssertionError(f"case {case}: {type(e).__name__} escaped: {e}") from e


def test_fuzz_star_files(valid, tmp_path):
    rng = np.random.default_rng(SEED)
    text = (valid / "p.star").read_text()
    (tmp_path / "s.mrcs").write_bytes((valid / "s.mrcs").read_bytes())
    outcomes = {"loaded": 0, "refused": 0}
    for case in range(180):
        path = tmp_path / "f.star"
        path.write_bytes(_mutate_star(text, rng).encode("latin-1", errors="replace"))
        outcomes[_run(case, _check_particles, path, tmp_path)] += 1
        outcomes[_run(case, read_star, path)] += 0
    # both outcomes happen, so the mutations are neither all harmless nor all fatal: measured
    # 45 loaded and 135 refused of 180; margins two binomial standard errors (2 x 5.8)
    assert outcomes["loaded"] > 33 and outcomes["refused"] > 123, outcomes


def test_fuzz_map_and_stack_files(valid, tmp_path):
    rng = np.random.default_rng(SEED + 1)
    outcomes = {"loaded": 0, "refused": 0}
    star_text = (valid / "p.star").read_text()
    (tmp_path / "p.star").write_text(star_text)
    for case in range(240):
        kind = ("m.mrc", "s.mrcs")[case % 2]
        raw = _mutate_mrc((valid / kind).read_bytes(), rng)
        path = tmp_path / kind
        path.write_bytes(raw)
        if kind == "m.mrc":
            outcomes[_run(case, _check_map, path)] += 1
            outcomes[_run(case, _check_stack, path)] += 0  # a map is also a stack of sections
        else:
            outcomes[_run(case, _check_stack, path)] += 1
            # the same stack behind a valid STAR file
            outcomes[_run(case, _check_particles, tmp_path / "p.star", tmp_path)] += 0
    # measured 91 loaded and 149 refused of 240; margins two binomial standard errors (2 x 7.5)
    assert outcomes["loaded"] > 76 and outcomes["refused"] > 134, outcomes


def test_fuzz_info_command(valid, tmp_path, capsys):
    # the CLI turns every refused file into one line and exit code 2, never a traceback
    rng = np.random.default_rng(SEED + 2)
    (tmp_path / "s.mrcs").write_bytes((valid / "s.mrcs").read_bytes())
    text = (valid / "p.star").read_text()
    for case in range(60):
        if case % 2:
            path = tmp_path / "f.star"
            path.write_bytes(_mutate_star(text, rng).encode("latin-1", errors="replace"))
        else:
            path = tmp_path / "f.mrcs"
            path.write_bytes(_mutate_mrc((valid / "s.mrcs").read_bytes(), rng))
        try:
            rc = main(["info", "--i", str(path)])
        except Exception as e:
            raise AssertionError(f"case {case}: {type(e).__name__} escaped: {e}") from e
        err = capsys.readouterr().err
        assert rc in (0, 2), case
        if rc == 2:
            assert err.count("\n") == 1 and err.startswith("cryomap info: error: "), err
