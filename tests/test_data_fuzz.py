"""Fuzzing: any bytes written as an IDX, .npy, .npz or .csv file either load or raise DataError."""

from __future__ import annotations

import gzip
import io
import os
import struct

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
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
