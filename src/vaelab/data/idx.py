"""Reading IDX files (the MNIST format), raw or gzip-compressed, without trusting their headers.

Layout: two zero bytes, a dtype code, the number of dimensions, one big-endian uint32 per dimension,
then the data. A corrupt header can claim any size, so the claimed size is checked against what the
file can actually hold before anything of that size is allocated.
"""

from __future__ import annotations

import gzip
import math
import os
import struct
import zlib

import numpy as np

from vaelab.errors import DataError

# IDX type code -> numpy dtype (data is big-endian).
IDX_DTYPES = {
    0x08: np.dtype(np.uint8),
    0x09: np.dtype(np.int8),
    0x0B: np.dtype(">i2"),
    0x0C: np.dtype(">i4"),
    0x0D: np.dtype(">f4"),
    0x0E: np.dtype(">f8"),
}
GZIP_MAGIC = b"\x1f\x8b"
# Deflate cannot expand data by more than 1032:1, so a header claiming more than this times the
# .gz file's size is a lie we can reject without decompressing anything.
MAX_DEFLATE_RATIO = 1032
_CHUNK = 1 << 20

_GZIP_ERRORS = (EOFError, zlib.error, gzip.BadGzipFile, OSError)


def read_idx(path, expected_dtype=None) -> np.ndarray:
    """Read an IDX file (``.gz`` or raw, told apart by content) into a native-endian numpy array."""
    path = os.fspath(path)
    try:
        with open(path, "rb") as f:
            is_gzip = f.read(2) == GZIP_MAGIC
        file_size = os.path.getsize(path)
    except OSError as e:
        raise DataError(f"{path}: cannot read the file ({e.strerror or e}); check that it exists and "
                        "is readable") from e
    if is_gzip:
        try:
            with gzip.open(path, "rb") as f:
                return _read(f, path, expected_dtype, file_size, compressed=True)
        except _GZIP_ERRORS as e:
            raise DataError(f"{path}: the gzip data is corrupt or truncated ({type(e).__name__}: {e}); "
                            "expected a complete gzip-compressed IDX file. Delete it and download it "
                            "again") from e
    with open(path, "rb") as f:
        return _read(f, path, expected_dtype, file_size, compressed=False)


def _read_exact(f, n: int) -> bytearray:
    """Read up to n bytes in bounded chunks (memory grows only with data that really exists)."""
    parts = []
    left = n
    while left > 0:
        chunk = f.read(min(left, _CHUNK))
        if not chunk:
            break
        parts.append(chunk)
        left -= len(chunk)
    return bytearray().join(parts)


def _read(f, path, expected_dtype, file_size, compressed) -> np.ndarray:
    head = _read_exact(f, 4)
    if len(head) < 4 or head[0] != 0 or head[1] != 0:
        raise DataError(f"{path}: not an IDX file: the first bytes are {bytes(head[:4]).hex(' ')}, expected "
                        "00 00 <type> <ndim>. Check that this is the right (uncorrupted) file")
    code, ndim = head[2], head[3]
    if code not in IDX_DTYPES:
        known = ", ".join(f"0x{c:02X}" for c in IDX_DTYPES)
        raise DataError(f"{path}: unknown IDX data type code 0x{code:02X}; expected one of {known}. "
                        "The file is corrupt or not an IDX file")
    if not 1 <= ndim <= 4:
        raise DataError(f"{path}: IDX header says {ndim} dimensions; expected 1 to 4. The file is corrupt")
    dims_raw = _read_exact(f, 4 * ndim)
    if len(dims_raw) < 4 * ndim:
        raise DataError(f"{path}: the file ends inside its IDX header (expected {4 + 4 * ndim} header "
                        "bytes); it is truncated. Download it again")
    shape = struct.unpack(f">{ndim}I", dims_raw)
    dtype = IDX_DTYPES[code]
    if expected_dtype is not None and dtype.newbyteorder("=") != np.dtype(expected_dtype):
        raise DataError(f"{path}: IDX data type is {dtype.newbyteorder('=')} but {np.dtype(expected_dtype)} "
                        "was expected. Is this the right file?")
    nbytes = math.prod(shape) * dtype.itemsize  # Python ints: no overflow
    header = 4 + 4 * ndim
    if math.prod(d for d in shape if d) * dtype.itemsize >= 2**62:
        # numpy cannot even describe such an array (not even an empty one with a 0 dimension).
        raise DataError(f"{path}: IDX header claims an impossible shape {shape}; the file is corrupt")

    # Check the claim against what the file can hold before allocating anything of that size.
    if not compressed and nbytes != file_size - header:
        raise DataError(f"{path}: IDX header claims shape {shape} ({nbytes} data bytes) but the file holds "
                        f"{file_size - header} data bytes; it is truncated or corrupt. Download it again")
    if compressed and nbytes > MAX_DEFLATE_RATIO * file_size:
        raise DataError(f"{path}: IDX header claims shape {shape} ({nbytes} data bytes), more than a "
                        f"{file_size}-byte gzip file can hold; the file is corrupt. Download it again")

    # At most nbytes + 1 bytes are decompressed: the extra byte tells us there is trailing garbage.
    data = _read_exact(f, nbytes + 1) if compressed else _read_exact(f, nbytes)
    if len(data) != nbytes:
        what = "more" if len(data) > nbytes else f"only {len(data)}"
        raise DataError(f"{path}: IDX header claims shape {shape} ({nbytes} data bytes) but the file "
                        f"holds {what} data bytes; it is truncated or corrupt. Download it again")
    arr = np.frombuffer(data, dtype=dtype).reshape(shape)
    if dtype.byteorder == ">":
        arr = arr.astype(dtype.newbyteorder("="))
    return arr
