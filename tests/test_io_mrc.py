"""cryomap.io.mrc: header conventions, memory-mapped stacks, atomic writes, input errors."""

from __future__ import annotations

import mrcfile
import numpy as np
import pytest

from cryomap.errors import InputError
from cryomap.io import mrc
from cryomap.io.mrc import open_stack, read_map, write_map, write_stack


def _ramp(shape: tuple[int, ...]) -> np.ndarray:
    return np.arange(np.prod(shape), dtype=np.float32).reshape(shape) * 0.25 - 3.0


def test_map_round_trip_and_header(tmp_path):
    vol = _ramp((8, 8, 8))
    vol[1, 2, 3] = 42.0  # z=1, y=2, x=3: checks axis order survives
    path = tmp_path / "map.mrc"
    write_map(path, vol, 1.37)

    data, pix = read_map(path)
    assert data.dtype == np.float32
    assert data.shape == (8, 8, 8)
    np.testing.assert_array_equal(data, vol)
    # the header stores float32 cell lengths (half an ulp: 6e-8 relative): measured 3.5e-9
    # relative here and for the cell below; bound 2e-7
    assert pix == pytest.approx(1.37, rel=2e-7)

    with mrcfile.open(path) as m:
        h = m.header
        assert int(h.mode) == 2
        assert (int(h.mapc), int(h.mapr), int(h.maps)) == (1, 2, 3)
        assert (int(h.nx), int(h.ny), int(h.nz)) == (8, 8, 8)
        assert (int(h.mx), int(h.my), int(h.mz)) == (8, 8, 8)
        assert float(h.cella.x) == pytest.approx(8 * 1.37, rel=2e-7)
        assert float(h.cella.z) == pytest.approx(8 * 1.37, rel=2e-7)
        assert float(h.origin.x) == 0.0 and int(h.nxstart) == 0
        assert float(m.data[1, 2, 3]) == 42.0  # x fastest in the file


def test_image_round_trip_2d(tmp_path):
    img = _ramp((6, 6))
    write_map(tmp_path / "img.mrc", img, 2.5)
    data, pix = read_map(tmp_path / "img.mrc")
    assert data.shape == (6, 6)
    np.testing.assert_array_equal(data, img)
    assert pix == pytest.approx(2.5)  # measured 0 (exact in float32)


def test_read_map_converts_int_modes(tmp_path):
    path = tmp_path / "int16.mrc"
    with mrcfile.new(path) as m:
        m.set_data(np.arange(64, dtype=np.int16).reshape(4, 4, 4))
        m.voxel_size = 1.0
    data, _ = read_map(path)
    assert data.dtype == np.float32
    assert data[3, 3, 3] == 63.0


def test_stack_round_trip_header_and_subset_in_requested_order(tmp_path):
    imgs = _ramp((7, 8, 8))
    path = tmp_path / "parts.mrcs"
    write_stack(path, imgs, 1.1)
    with mrcfile.open(path) as m:
        assert m.is_image_stack()
        assert int(m.header.mode) == 2
        assert int(m.header.nz) == 7
        # float32 cell lengths: measured 2.2e-8 relative (here and for the pixel size below);
        # bound 2e-7 (9x; half a float32 ulp is 6e-8)
        assert float(m.header.cella.x) == pytest.approx(8 * 1.1, rel=2e-7)

    with open_stack(path) as st:
        assert st.n_images == 7
        assert st.box == 8
        assert st.pixel_size == pytest.approx(1.1, rel=2e-7)
        assert isinstance(st._data, np.memmap)  # memory-mapped, not loaded
        got = st.read([5, 0, 5, 2])
        assert got.dtype == np.float32
        assert got.shape == (4, 8, 8)
        np.testing.assert_array_equal(got, imgs[[5, 0, 5, 2]])
        assert st.read([]).shape == (0, 8, 8)


def test_stack_single_2d_image_is_stack_of_one(tmp_path):
    img = _ramp((4, 4))
    write_map(tmp_path / "one.mrc", img, 1.0)
    with open_stack(tmp_path / "one.mrc") as st:
        assert st.n_images == 1
        np.testing.assert_array_equal(st.read([0])[0], img)


def test_stack_index_out_of_range_names_file_and_range(tmp_path):
    write_stack(tmp_path / "s.mrcs", _ramp((3, 4, 4)), 1.0)
    with open_stack(tmp_path / "s.mrcs") as st:
        with pytest.raises(InputError, match=r"s\.mrcs.*index 3.*0\.\.2"):
            st.read([0, 3])
        with pytest.raises(InputError, match="index -1"):
            st.read([-1])


@pytest.mark.filterwarnings("ignore:Data array contains NaN")
def test_stack_nan_image_is_an_error(tmp_path):
    imgs = _ramp((3, 4, 4))
    imgs[1, 2, 2] = np.nan
    write_stack(tmp_path / "nan.mrcs", imgs, 1.0)
    with open_stack(tmp_path / "nan.mrcs") as st:
        np.testing.assert_array_equal(st.read([0, 2]), imgs[[0, 2]])
        with pytest.raises(InputError, match=r"nan\.mrcs: image 2 .*NaN"):
            st.read([1])


def test_stack_with_zero_pixel_size_is_readable(tmp_path):
    # Stacks often lack a pixel size; the STAR optics table provides it.
    path = tmp_path / "nopix.mrcs"
    with mrcfile.new(path) as m:
        m.set_data(_ramp((2, 4, 4)))
        m.set_image_stack()
        m.voxel_size = 0.0
    with open_stack(path) as st:
        assert st.pixel_size == 0.0
        assert st.n_images == 2


def test_write_is_atomic_old_file_survives_failure(tmp_path, monkeypatch):
    path = tmp_path / "map.mrc"
    old = _ramp((4, 4, 4))
    write_map(path, old, 1.0)
    before = path.read_bytes()

    real_set_data = mrcfile.mrcfile.MrcFile.set_data

    def exploding_set_data(self, data):
        real_set_data(self, data[:1])  # something is written to disk...
        self.flush()
        raise OSError("disk full")  # ...then the write fails

    monkeypatch.setattr(mrcfile.mrcfile.MrcFile, "set_data", exploding_set_data)
    # an OS error while writing is one line naming the file (InputError), not a traceback
    with pytest.raises(InputError, match=r"map\.mrc: cannot write \(disk full\)"):
        write_map(path, np.ones((4, 4, 4), np.float32), 2.0)
    with pytest.raises(InputError, match="disk full"):
        write_stack(tmp_path / "new.mrcs", np.ones((2, 4, 4), np.float32), 2.0)
    monkeypatch.undo()

    assert path.read_bytes() == before
    data, pix = read_map(path)
    np.testing.assert_array_equal(data, old)
    assert pix == 1.0
    assert not (tmp_path / "new.mrcs").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["map.mrc"]  # no temp files left


def test_write_replaces_existing_file_with_normal_permissions(tmp_path):
    path = tmp_path / "m.mrc"
    write_map(path, np.zeros((4, 4, 4)), 1.0)
    write_map(path, np.ones((4, 4, 4)), 3.0)
    data, pix = read_map(path)
    assert data.mean() == 1.0 and pix == 3.0
    assert path.stat().st_mode & 0o044  # readable by others (mkstemp would give 0600)


def test_atomic_path_needs_existing_folder(tmp_path):
    with pytest.raises(InputError, match="output folder"):
        write_map(tmp_path / "nope" / "m.mrc", np.zeros((4, 4, 4)), 1.0)


@pytest.mark.parametrize("reader", [read_map, open_stack])
def test_missing_file(tmp_path, reader):
    with pytest.raises(InputError, match=r"missing\.mrc: file not found"):
        reader(tmp_path / "missing.mrc")


@pytest.mark.parametrize("reader", [read_map, open_stack])
def test_not_an_mrc_file(tmp_path, reader):
    path = tmp_path / "text.mrc"
    path.write_text("this is not an MRC file\n" * 100)
    with pytest.raises(InputError, match=r"text\.mrc: not a readable MRC file"):
        reader(path)
    (tmp_path / "short.mrc").write_bytes(b"MRC")
    with pytest.raises(InputError, match=r"short\.mrc: not a readable MRC file"):
        reader(tmp_path / "short.mrc")


def test_pixel_size_missing(tmp_path):
    path = tmp_path / "nopix.mrc"
    with mrcfile.new(path) as m:
        m.set_data(np.zeros((4, 4, 4), np.float32))  # cell stays 0
    with pytest.raises(InputError, match=r"nopix\.mrc: pixel size missing in header"):
        read_map(path)


def test_non_cubic_map(tmp_path):
    path = tmp_path / "box.mrc"
    with mrcfile.new(path) as m:
        m.set_data(np.zeros((4, 6, 6), np.float32))
        m.voxel_size = 1.0
    with pytest.raises(InputError, match=r"box\.mrc: map shape \(4, 6, 6\).*cubic"):
        read_map(path)


def test_non_square_stack(tmp_path):
    path = tmp_path / "rect.mrcs"
    with mrcfile.new(path) as m:
        m.set_data(np.zeros((2, 4, 6), np.float32))
        m.set_image_stack()
    with pytest.raises(InputError, match=r"rect\.mrcs: images are 6 x 4 px"):
        open_stack(path)


@pytest.mark.filterwarnings("ignore:Data array contains NaN")
def test_nan_voxels(tmp_path):
    vol = np.zeros((4, 4, 4), np.float32)
    vol[0, 0, 0] = np.inf
    vol[1, 1, 1] = np.nan
    write_map(tmp_path / "nan.mrc", vol, 1.0)
    with pytest.raises(InputError, match=r"nan\.mrc: 2 NaN/Inf values in map"):
        read_map(tmp_path / "nan.mrc")


def test_closed_stack_refuses_reads(tmp_path):
    write_stack(tmp_path / "s.mrcs", _ramp((2, 4, 4)), 1.0)
    st = mrc.open_stack(tmp_path / "s.mrcs")
    st.close()
    st.close()  # idempotent
    with pytest.raises(ValueError, match="closed"):
        st.read([0])


@pytest.mark.parametrize("reader", [read_map, open_stack])
def test_truncated_file(tmp_path, reader):
    path = tmp_path / "cut.mrcs"
    write_stack(path, _ramp((4, 8, 8)), 1.0)
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size - 100)
    with pytest.raises(InputError, match=r"cut\.mrcs: not a readable MRC file"):
        reader(path)


# -- headers read as RELION reads them (rwMRC.h) -------------------------------------------------


def raw_mrc(data: np.ndarray, mode: int, cell_a: float = 0.0, mx: int | None = None,
            order: str = "<", map_id: bytes = b"MAP ", nsymbt: int = 0,
            dims: tuple[int, int, int] | None = None) -> bytes:
    """An MRC file built field by field (independently of mrcfile and of the reader)."""
    import struct

    nz, ny, nx = data.shape if dims is None else dims
    head = bytearray(1024)
    struct.pack_into(order + "4i", head, 0, nx, ny, nz, mode)
    mx = nx if mx is None else mx
    struct.pack_into(order + "3i", head, 28, mx, ny, nz)
    struct.pack_into(order + "3f", head, 40, cell_a, cell_a, cell_a)
    struct.pack_into(order + "3i", head, 64, 1, 2, 3)
    struct.pack_into(order + "i", head, 92, nsymbt)
    head[208:212] = map_id
    return bytes(head) + b"\x07" * nsymbt + data.astype(data.dtype.newbyteorder(order)).tobytes()


@pytest.mark.parametrize("mode, dtype", [(0, np.int8), (1, np.int16), (2, np.float32),
                                         (6, np.uint16), (12, np.float16)])
@pytest.mark.parametrize("order", ["<", ">"])
def test_reads_relion_modes_both_byte_orders_without_map_id(tmp_path, mode, dtype, order):
    data = (np.arange(3 * 4 * 4) % 50).astype(dtype).reshape(3, 4, 4)
    path = tmp_path / "s.mrcs"
    path.write_bytes(raw_mrc(data, mode, cell_a=4 * 1.5, order=order, map_id=b"\0\0\0\0"))
    with open_stack(path) as st:
        assert st.shape == (3, 4, 4) and st.pixel_size == pytest.approx(1.5)  # measured 0
        np.testing.assert_array_equal(st.read([2, 0]), data[[2, 0]].astype(np.float32))


def test_extended_header_is_skipped(tmp_path):
    data = np.arange(2 * 4 * 4, dtype=np.float32).reshape(2, 4, 4)
    path = tmp_path / "ext.mrcs"
    path.write_bytes(raw_mrc(data, 2, nsymbt=96))
    with open_stack(path) as st:
        np.testing.assert_array_equal(st.read([0, 1]), data)


@pytest.mark.parametrize("mode, why", [(3, "complex"), (4, "complex"), (101, "SerialEM 4-bit"),
                                       (5, "unsupported"), (-2, "unsupported")])
def test_unsupported_modes(tmp_path, mode, why):
    path = tmp_path / "m.mrc"
    path.write_bytes(raw_mrc(np.zeros((2, 4, 4), np.float32), mode))
    with pytest.raises(InputError, match=rf"m\.mrc: not a readable MRC file \(header mode = "
                                         rf"{mode} \({why}.*expected one of 0, 1, 2, 6, 12"):
        open_stack(path)


@pytest.mark.parametrize("dims, field", [((0, 4, 4), "nz = 0"), ((2, -4, 4), "ny = -4"),
                                         ((2, 4, -3), "nx = -3")])
def test_non_positive_dimensions(tmp_path, dims, field):
    path = tmp_path / "d.mrc"
    path.write_bytes(raw_mrc(np.zeros((2, 4, 4), np.float32), 2, dims=dims))
    for reader in (read_map, open_stack):
        with pytest.raises(InputError, match=rf"d\.mrc: not a readable MRC file \(header "
                                             rf"{field}; expected >= 1\)"):
            reader(path)
    # |nx| > 65535 makes RELION (and cryomap) read the header as big-endian: still refused
    path.write_bytes(raw_mrc(np.zeros((2, 4, 4), np.float32), 2, dims=(2, 4, -2**31)))
    with pytest.raises(InputError, match=r"d\.mrc: not a readable MRC file"):
        open_stack(path)


def test_negative_extended_header(tmp_path):
    path = tmp_path / "n.mrc"
    raw = bytearray(raw_mrc(np.zeros((2, 4, 4), np.float32), 2))
    raw[92:96] = (-8).to_bytes(4, "little", signed=True)
    path.write_bytes(bytes(raw))
    with pytest.raises(InputError, match=r"header nsymbt = -8; expected >= 0"):
        open_stack(path)


def test_short_stack_is_an_error_not_fewer_images(tmp_path):
    data = np.zeros((5, 4, 4), np.float32)
    path = tmp_path / "short.mrcs"
    path.write_bytes(raw_mrc(data, 2)[:-1])  # one byte short
    with pytest.raises(InputError, match=r"short\.mrcs: not a readable MRC file \(header "
                                         r"nx\*ny\*nz = 4\*4\*5 voxels .* need 1344 bytes; "
                                         r"the file has 1343\)"):
        open_stack(path)
    # extra bytes at the end are ignored, as RELION ignores them
    path.write_bytes(raw_mrc(data, 2) + b"\0" * 10)
    with open_stack(path) as st:
        assert st.n_images == 5


@pytest.mark.parametrize("pix", [1e-32, 0.05, 150.0, 1e28])
def test_map_pixel_size_outside_range_needs_override(tmp_path, pix):
    vol = np.zeros((4, 4, 4), np.float32)
    path = tmp_path / "p.mrc"
    path.write_bytes(raw_mrc(vol, 2, cell_a=4 * pix))
    with pytest.raises(InputError, match=r"p\.mrc: header pixel size .*expected a pixel size "
                                         r"in 0\.1\.\.100 A"):
        read_map(path)
    data, got = read_map(path, angpix=1.7)
    assert got == 1.7 and data.shape == (4, 4, 4)
    with open_stack(path) as st:  # a stack's header pixel size is only informative
        assert st.pixel_size == 0.0


def test_map_without_pixel_size_reads_with_angpix(tmp_path):
    path = tmp_path / "nopix.mrc"
    path.write_bytes(raw_mrc(np.ones((4, 4, 4), np.float32), 2, cell_a=0.0))
    with pytest.raises(InputError, match="pixel size missing in header.*give --angpix"):
        read_map(path)
    assert read_map(path, angpix=2.0)[1] == 2.0
    for bad in (0.0, -1.0, float("nan"), 1e6):
        with pytest.raises(InputError, match=r"--angpix = .*expected a pixel size in"):
            read_map(path, angpix=bad)


def test_multi_image_mrc_and_rectangular_tilt_series(tmp_path):
    # a 7-image stack named .mrc without pixel size, and a non-square tilt series
    seven = np.random.default_rng(0).normal(size=(7, 6, 6)).astype(np.float32)
    (tmp_path / "seven.mrc").write_bytes(raw_mrc(seven, 2, map_id=b"\0\0\0\0"))
    with open_stack(tmp_path / "seven.mrc") as st:
        assert st.n_images == 7 and st.pixel_size == 0.0
        np.testing.assert_array_equal(st.read(np.arange(7)), seven)
    tilt = np.arange(3 * 4 * 6, dtype=np.int16).reshape(3, 4, 6)
    (tmp_path / "ts.st").write_bytes(raw_mrc(tilt, 1, cell_a=6 * 2.0))
    with pytest.raises(InputError, match=r"images are 6 x 4 px; expected square"):
        open_stack(tmp_path / "ts.st")
    with open_stack(tmp_path / "ts.st", require_square=False) as st:
        assert st.shape == (3, 4, 6)
        np.testing.assert_array_equal(st.read([1]), tilt[[1]].astype(np.float32))


def test_folder_is_not_an_mrc_file(tmp_path):
    (tmp_path / "folder.mrc").mkdir()
    for reader in (read_map, open_stack):
        with pytest.raises(InputError, match=r"folder\.mrc: not a regular file"):
            reader(tmp_path / "folder.mrc")


def test_unreadable_file_is_an_input_error(tmp_path):
    import os

    path = tmp_path / "locked.mrc"
    write_map(path, np.zeros((4, 4, 4)), 1.0)
    os.chmod(path, 0)
    try:
        if os.access(path, os.R_OK):  # running as root: permissions do not apply
            pytest.skip("file permissions are not enforced for this user")
        for reader in (read_map, open_stack):
            with pytest.raises(InputError, match=r"locked\.mrc: cannot read the file"):
                reader(path)
    finally:
        os.chmod(path, 0o644)
