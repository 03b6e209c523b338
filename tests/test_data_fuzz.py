"""Fuzzing: any bytes written as an IDX, .npy, .npz or .csv file, or as the images of an image folder, either
load or raise DataError; an image header claiming a gigantic size is refused before its pixels are allocated."""

from __future__ import annotations

import gzip
import io
import os
import struct
import zlib

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

from vaelab.data import load_dataset, read_idx
from vaelab.errors import DataError

# VAELAB_FUZZ_EXAMPLES=5000 for a longer hunt; 50 keeps the suite fast.
FUZZ = settings(max_examples=int(os.environ.get("VAELAB_FUZZ_EXAMPLES", "50")), deadline=None,
                suppress_health_check=[HealthCheck.too_slow])


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    return tmp_path_factory.mktemp("fuzz")


def mutate(data: bytes, edits) -> bytes:
    buf = bytearray(data)
    for pos, val in edits:
        if buf:
            buf[pos % len(buf)] = val
    return bytes(buf)


edits = st.lists(st.tuples(st.integers(0, 10_000), st.integers(0, 255)), max_size=4)

# Plausible IDX: a valid-looking header (any code, ndim, dims) followed by a little data.
idx_like = st.builds(
    lambda code, dims, body: bytes([0, 0, code, len(dims)]) + struct.pack(f">{len(dims)}I", *dims) + body,
    st.sampled_from([0x08, 0x09, 0x0B, 0x0C, 0x0D, 0x0E, 0x01]),
    st.lists(st.integers(0, 2**32 - 1) | st.integers(0, 6), min_size=0, max_size=5),
    st.binary(max_size=300))


@FUZZ
@given(data=st.binary(max_size=400) | idx_like, gz=st.booleans(), cut=st.integers(0, 50))
def test_idx_fuzz(workdir, data, gz, cut):
    if gz:
        data = gzip.compress(data)
        data = data[: len(data) - cut] if cut < 20 else data
    path = workdir / ("f.idx.gz" if gz else "f.idx")
    path.write_bytes(data)
    try:
        arr = read_idx(path)
    except DataError as e:
        assert str(path) in str(e)
    else:
        assert isinstance(arr, np.ndarray) and arr.dtype.byteorder in "=|"


def npy_bytes(arr) -> bytes:
    buf = io.BytesIO()
    np.save(buf, arr)
    return buf.getvalue()


arrays = st.sampled_from([
    np.zeros((4, 3), np.float32), np.arange(24, dtype=np.uint8).reshape(2, 3, 4),
    np.ones((3, 2, 2, 3), np.float64) * 0.5, np.arange(6, dtype=">i4").reshape(3, 2), np.zeros(5)])


@FUZZ
@given(data=st.binary(max_size=300) | st.builds(lambda a, e: mutate(npy_bytes(a), e), arrays, edits))
def test_npy_fuzz(workdir, data):
    path = workdir / "f.npy"
    path.write_bytes(data)
    try:
        load_dataset(path)
    except DataError as e:
        assert str(path) in str(e)


def npz_bytes(arr, compressed) -> bytes:
    buf = io.BytesIO()
    (np.savez_compressed if compressed else np.savez)(buf, x=arr)
    return buf.getvalue()


@FUZZ
@given(arr=arrays, compressed=st.booleans(), e=edits)
def test_npz_fuzz(workdir, arr, compressed, e):
    path = workdir / "f.npz"
    path.write_bytes(mutate(npz_bytes(arr, compressed), e))
    try:
        load_dataset(path)
    except DataError as err:
        assert str(path) in str(err)


csv_text = st.lists(st.sampled_from(list("0123456789.,-+eE \n\r\"'ax") + ["nan", "inf", "label,", "1e999"]),
                    max_size=80).map("".join)


@FUZZ
@given(data=st.binary(max_size=200) | csv_text.map(str.encode))
def test_csv_fuzz(workdir, data):
    path = workdir / "f.csv"
    path.write_bytes(data)
    try:
        s = load_dataset(path)
    except DataError as e:
        assert str(path) in str(e)
    else:
        assert np.isfinite(s.train.x.numpy()).all()


# ------------------------------------------------------------------------------------------ image folders


def image_bytes(fmt: str, mode: str, size: tuple[int, int]) -> bytes:
    from PIL import Image

    buf = io.BytesIO()
    Image.new(mode, size, color=7 if mode in ("L", "P") else (7, 8, 9)).save(buf, format=fmt)
    return buf.getvalue()


IMAGES = [image_bytes("PNG", "L", (4, 4)), image_bytes("PNG", "RGB", (4, 4)), image_bytes("PNG", "P", (3, 5)),
          image_bytes("JPEG", "L", (4, 4)), image_bytes("JPEG", "RGB", (8, 8))]


def truncate(data: bytes, cut: int) -> bytes:
    return data[: len(data) - cut % (len(data) + 1)]


# one image file's bytes: noise, or a valid small PNG/JPEG with a few bytes overwritten and maybe cut short
image_file = (st.binary(max_size=600)
              | st.builds(lambda img, e, cut, cuts: truncate(mutate(img, e), cut) if cuts else mutate(img, e),
                          st.sampled_from(IMAGES), edits, st.integers(0, 400), st.booleans()))
image_name = st.sampled_from(["a.png", "b.jpg", "c.jpeg", "D.PNG"])


@FUZZ
@given(files=st.lists(st.tuples(st.sampled_from(["", "cat/", "dog/", "train/", "test/", "train/x/", "test/x/"]),
                                image_name, image_file), min_size=1, max_size=5))
def test_image_folder_fuzz(tmp_path_factory, files):
    folder = tmp_path_factory.mktemp("images")
    for sub, name, data in files:
        (folder / sub).mkdir(parents=True, exist_ok=True)
        (folder / sub / name).write_bytes(data)
    try:
        splits = load_dataset(folder)
    except DataError as e:
        event("DataError")
        assert str(folder) in str(e)
    else:  # what loads is uint8 (C, H, W) pixels, one size for all
        event("loaded")
        for part in (splits.train, splits.test):
            assert part.x.dtype == torch.uint8 and part.x.dim() == 4 and part.x.shape[1] in (1, 3)


def png(width: int, height: int, idat: bytes = b"") -> bytes:
    """A PNG file: 8-bit grayscale of the claimed size, with `idat` as its (zlib) pixel data."""
    def chunk(kind: bytes, body: bytes) -> bytes:
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))

    header = struct.pack(">IIBBBBB", width, height, 8, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


@pytest.mark.parametrize("side", [5000, 10_000, 2**31 - 1])
def test_decompression_bomb_is_refused_from_its_header(tmp_path, side):
    # 5000x5000: a real bomb (25 MB of zero pixels in a ~25 kB file) that decodes fine unless refused by size;
    # 10000x10000: Pillow only warns; 2^31-1 squared: Pillow's own DecompressionBombError, reported the same way
    rows = zlib.compress(bytes(side + 1) * side, 9) if side == 5000 else b""
    (tmp_path / "bomb.png").write_bytes(png(side, side, rows))
    with pytest.raises(DataError, match=rf"bomb.png: .*{side}x{side}.*Resize it|bomb.png: cannot read.*bomb"):
        load_dataset(tmp_path)


def test_bomb_check_lets_ordinary_images_through(tmp_path):
    side = 64
    (tmp_path / "ok.png").write_bytes(png(side, side, zlib.compress(bytes(side + 1) * side)))
    (tmp_path / "ok2.png").write_bytes(png(side, side, zlib.compress(bytes(side + 1) * side)))
    splits = load_dataset(tmp_path, test_fraction=0.5)
    assert tuple(splits.train.sample_shape) == (1, side, side)


def test_a_file_of_another_format_named_png_is_never_decoded(tmp_path):
    # Pillow picks a decoder by content: an EPS file would go to Ghostscript, a TIFF to libtiff. Only the PNG
    # and JPEG decoders are ever tried, so both are refused as what they are not.
    from PIL import Image

    (tmp_path / "a.png").write_bytes(b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 4 4\nshowpage\n")
    with pytest.raises(DataError, match="a.png: cannot read this image .*cannot identify image file"):
        load_dataset(tmp_path)
    (tmp_path / "a.png").unlink()
    Image.new("L", (4, 4)).save(tmp_path / "b.png", format="TIFF")
    with pytest.raises(DataError, match="b.png: cannot read this image"):
        load_dataset(tmp_path)
