"""The user's own data: .npy / .npz arrays, folders of images, and .csv tables.

Each loader returns either one ArrayDataset (to be split by the caller) or a (train, test) pair when
the data comes with explicit splits. Every problem is a DataError naming the file.
"""

from __future__ import annotations

import csv
import math
import os
import warnings
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch

from vaelab.errors import DataError
from vaelab.data.arrays import ArrayDataset
from vaelab.data.images import IMAGE_SUFFIXES, images_dataset, scan

LABEL_COLUMNS = ("label", "y")

# ---------------------------------------------------------------------------------------- arrays


def arrays_to_dataset(x: np.ndarray, y: np.ndarray | None, source: str, name: str = "",
                      classes: list[str] | None = None) -> ArrayDataset:
    """Turn a numeric array (and optional labels) into an ArrayDataset, inferring images vs tabular."""
    if x.dtype.kind not in "biuf":
        raise DataError(f"{source}: x has dtype {x.dtype}; expected a numeric array (integers or floats)")
    if x.ndim not in (2, 3, 4) or x.shape[0] == 0 or 0 in x.shape:
        raise DataError(f"{source}: x has shape {x.shape}; expected (N, D) tabular data, (N, H, W) or "
                        "(N, H, W, C) / (N, C, H, W) images, with N > 0 and no empty dimension")
    if x.dtype.kind == "f":
        bad = ~np.isfinite(x)
        if bad.any():
            first = np.unravel_index(int(np.argmax(bad)), x.shape)
            raise DataError(f"{source}: x holds {int(bad.sum())} NaN/Inf value(s), the first at index "
                            f"{tuple(int(i) for i in first)} (sample {int(first[0])}); expected finite "
                            "numbers. Drop or replace those samples first")
    n = x.shape[0]
    labels = None if y is None else _labels(y, n, source)

    if x.ndim == 2:  # tabular: raw values, the caller standardizes
        with np.errstate(over="ignore"):  # overflow is reported below, by file name
            x32 = np.ascontiguousarray(x, dtype=np.float32)
        if not np.isfinite(x32).all():
            raise DataError(f"{source}: holds values beyond float32's range (about 3.4e38); expected "
                            "smaller numbers. Rescale those columns first")
        return ArrayDataset(torch.from_numpy(x32), labels, 1.0, classes, name)
    if x.ndim == 3:
        x = x[:, None]
    elif x.shape[1] not in (1, 3, 4):
        # Channels-first is kept as is (torch's layout); otherwise the last axis must be channels.
        if x.shape[3] not in (1, 3, 4):
            raise DataError(f"{source}: image array has shape {x.shape}; expected 1, 3 or 4 channels as "
                            "(N, H, W, C) or (N, C, H, W)")
        x = x.transpose(0, 3, 1, 2)
    x = np.ascontiguousarray(x)
    if x.dtype == np.bool_:
        return ArrayDataset(torch.from_numpy(x.astype(np.uint8)), labels, 1.0, classes, name)
    lo, hi = x.min(), x.max()
    if x.dtype.kind == "f":
        if lo < 0 or hi > 1:
            raise DataError(f"{source}: float images span [{lo:g}, {hi:g}]; expected values in [0, 1]. "
                            "Scale them first (e.g. divide 0-255 pixels by 255) or store them as uint8")
        return ArrayDataset(torch.from_numpy(x.astype(np.float32)), labels, 1.0, classes, name)
    if lo < 0 or hi > 255:
        raise DataError(f"{source}: integer images span [{lo}, {hi}]; expected pixel values 0-255 "
                        "(store 8-bit images as uint8, or other data as floats in [0, 1])")
    return ArrayDataset(torch.from_numpy(x.astype(np.uint8)), labels, 255.0, classes, name)


def _labels(y: np.ndarray, n: int, source: str) -> torch.Tensor:
    if y.ndim != 1 or len(y) != n:
        raise DataError(f"{source}: y has shape {y.shape}; expected ({n},), one class index per sample")
    if y.dtype.kind == "f":
        if not np.isfinite(y).all() or (y != np.round(y)).any():
            raise DataError(f"{source}: y holds non-integer values; expected class indices 0, 1, 2, ...")
    elif y.dtype.kind not in "biu":
        raise DataError(f"{source}: y has dtype {y.dtype}; expected integer class indices")
    if y.min() < 0 or y.max() >= 2**31:
        raise DataError(f"{source}: y spans [{y.min()}, {y.max()}]; expected class indices 0, 1, 2, ...")
    return torch.from_numpy(y.astype(np.int64))


def _read_npy(f, available: int, source: str) -> np.ndarray:
    """Read one .npy stream: header parsed by numpy, size checked before allocating, never unpickled."""
    fmt = np.lib.format
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # numpy warns about "Python 2" headers it then rejects
            version = fmt.read_magic(f)
            readers = {(1, 0): fmt.read_array_header_1_0, (2, 0): fmt.read_array_header_2_0}
            if version not in readers:
                raise ValueError(f"unsupported .npy format version {version}")
            shape, fortran, dtype = readers[version](f)
        start = f.tell()
    except Exception as e:
        # numpy parses the header text with ast/tokenize, whose errors vary (ValueError, SyntaxError,
        # tokenize.TokenError, ...); whatever it raises, the header is unreadable.
        raise DataError(f"{source}: not a readable .npy array ({type(e).__name__}: {e}); expected a file "
                        "written by numpy.save") from e
    if dtype.hasobject:
        raise DataError(f"{source}: holds Python objects (dtype {dtype}), which only pickle can load; "
                        "vaelab never unpickles data (it can run arbitrary code). Save a numeric array "
                        "instead, e.g. np.save(path, x.astype(np.float32))")
    if dtype.kind not in "biuf" or dtype.fields is not None:
        raise DataError(f"{source}: has dtype {dtype}; expected a plain numeric array (integers or floats)")
    if any(d < 0 for d in shape) or math.prod(d for d in shape if d) * dtype.itemsize >= 2**62:
        raise DataError(f"{source}: header claims an impossible shape {shape}; the file is corrupt")
    nbytes = math.prod(shape) * dtype.itemsize
    if nbytes != available - start:
        raise DataError(f"{source}: header claims shape {shape} ({nbytes} bytes of {dtype}) but the file "
                        f"holds {available - start} data bytes; it is truncated or corrupt. Save it again")
    buf = bytearray(nbytes)
    if f.readinto(buf) != nbytes:
        raise DataError(f"{source}: the file ended early; it is truncated. Save it again")
    arr = np.frombuffer(buf, dtype=dtype).reshape(shape, order="F" if fortran else "C")
    return np.ascontiguousarray(arr, dtype=dtype.newbyteorder("="))


def read_npy(path: Path) -> np.ndarray:
    with open(path, "rb") as f:
        return _read_npy(f, os.fstat(f.fileno()).st_size, str(path))


def read_npz(path: Path) -> dict[str, np.ndarray]:
    out = {}
    try:
        with zipfile.ZipFile(path) as zf:
            for info in zf.infolist():
                if info.filename.endswith(".npy"):
                    with zf.open(info) as f:
                        out[info.filename[:-4]] = _read_npy(f, info.file_size, f"{path} (array {info.filename})")
    except (zipfile.BadZipFile, zipfile.LargeZipFile, zlib.error, NotImplementedError, RuntimeError,
            EOFError, OSError, ValueError) as e:
        if isinstance(e, DataError):
            raise
        raise DataError(f"{path}: not a readable .npz archive ({type(e).__name__}: {e}); expected a file "
                        "written by numpy.savez") from e
    return out


def load_npy(path: Path, name: str) -> ArrayDataset:
    return arrays_to_dataset(read_npy(path), None, str(path), name)


def load_npz(path: Path, name: str):
    arrays = read_npz(path)
    keys = sorted(arrays)
    if "x_train" in arrays or "x_test" in arrays:
        if "x_train" not in arrays or "x_test" not in arrays or ("y_train" in arrays) != ("y_test" in arrays):
            raise DataError(f"{path}: has arrays {keys}; explicit splits need x_train and x_test (and "
                            "either both y_train and y_test or neither)")
        train = arrays_to_dataset(arrays["x_train"], arrays.get("y_train"), f"{path} (x_train)", name)
        test = arrays_to_dataset(arrays["x_test"], arrays.get("y_test"), f"{path} (x_test)", name)
        if train.sample_shape != test.sample_shape or train.x.dtype != test.x.dtype:
            raise DataError(f"{path}: x_train samples are {train.sample_shape} {train.x.dtype} but x_test "
                            f"samples are {test.sample_shape} {test.x.dtype}; both must match")
        return train, test
    if "x" not in arrays:
        raise DataError(f"{path}: has arrays {keys}; expected 'x' (and optionally 'y'), or x_train/"
                        "y_train/x_test/y_test for explicit splits")
    return arrays_to_dataset(arrays["x"], arrays.get("y"), str(path), name)


# ---------------------------------------------------------------------------------------- images


def load_image_folder(folder: Path, name: str, *, image_size: int | None = None, background=None,
                      lazy: bool | None = None, workers: int = 0, cache: bool = False):
    """A folder of images; class sub-folders give labels; train/ and test/ sub-folders give splits. Every file's
    header is read first (sizes, grey or colour); the pixels are decoded into memory, or lazily (data.images)."""
    subdirs = _subdirs(folder)
    if {"train", "test"} <= {d.name for d in subdirs}:
        train_files, train_y, classes = _image_set(folder / "train", None)
        test_files, test_y, _ = _image_set(folder / "test", classes)
        if (train_y is None) != (test_y is None):
            raise DataError(f"{folder}: only one of train/ and test/ has class sub-folders; expected both "
                            "(labelled) or neither (unlabelled)")
        files = scan(train_files + test_files, image_size, background)  # one size and mode for both splits
        whole = images_dataset(files, None if train_y is None else torch.cat([train_y, test_y]), classes, name,
                               lazy=lazy, workers=workers, cache=cache)
        n = len(train_files)
        return whole.subset(slice(0, n)), whole.subset(slice(n, None))  # views of the pixels, not copies
    paths, y, classes = _image_set(folder, None)
    return images_dataset(scan(paths, image_size, background), y, classes, name, lazy=lazy, workers=workers,
                          cache=cache)


def _subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _images_in(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir()
                  if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES)


def _image_set(folder: Path, classes: list[str] | None) -> tuple[list[Path], torch.Tensor | None, list[str] | None]:
    """The image files of a folder (loose, or one sub-folder per class), their labels and the classes."""
    subdirs = _subdirs(folder)
    loose = _images_in(folder)
    if subdirs and loose:
        raise DataError(f"{folder}: holds both images (e.g. {loose[0].name}) and sub-folders (e.g. "
                        f"{subdirs[0].name}/); expected either only images (unlabelled) or only one "
                        "sub-folder per class")
    if not subdirs:
        if not loose:
            raise DataError(f"{folder}: no images found; expected PNG or JPEG files "
                            f"({', '.join(IMAGE_SUFFIXES)}), or one sub-folder of them per class")
        return loose, None, None

    found = [d.name for d in subdirs]
    if classes is None:
        classes = found
    elif not set(found) <= set(classes):
        extra = sorted(set(found) - set(classes))
        raise DataError(f"{folder}: has class folder(s) {extra} that the train split lacks; expected "
                        f"classes among {classes}")
    files, labels = [], []
    for d in subdirs:
        images = _images_in(d)
        if not images:
            raise DataError(f"{d}: class folder without images; expected PNG or JPEG files in it. "
                            "Add images or remove the folder")
        files += images
        labels += [classes.index(d.name)] * len(images)
    return files, torch.tensor(labels, dtype=torch.int64), classes


# ---------------------------------------------------------------------------------------- csv


def load_csv(path: Path, name: str) -> ArrayDataset:
    """Numeric columns; an optional header row; a 'label' / 'y' column (by header) becomes labels."""
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = [(reader_line, row) for reader_line, row in _rows(csv.reader(f))]
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: is not UTF-8 text ({e}); expected a CSV file of numbers") from e
    except csv.Error as e:
        raise DataError(f"{path}: is not a readable CSV file ({e}); expected comma-separated numbers") from e
    if not rows:
        raise DataError(f"{path}: is empty; expected rows of comma-separated numbers")

    header = None
    first = rows[0][1]
    if all(not _is_number(c) for c in first):
        header = [c.strip() for c in first]
        rows = rows[1:]
    if not rows:
        raise DataError(f"{path}: has a header but no data rows; expected rows of comma-separated numbers")
    width = len(header) if header is not None else len(rows[0][1])
    label_col = None
    if header is not None:
        hits = [i for i, h in enumerate(header) if h.lower() in LABEL_COLUMNS]
        label_col = hits[0] if hits else None
    if width - (label_col is not None) < 1:
        raise DataError(f"{path}: has no feature columns; expected at least one numeric column besides labels")

    def col_name(j):
        return f"column {j + 1}" + (f" ({header[j]!r})" if header is not None else "")

    values = np.empty((len(rows), width), dtype=np.float64)
    raw_labels = []
    for i, (line, row) in enumerate(rows):
        if len(row) != width:
            raise DataError(f"{path}: row {line} has {len(row)} cells; expected {width} like "
                            f"{'the header' if header is not None else 'the first row'}. Fix the ragged row")
        for j, cell in enumerate(row):
            if j == label_col:
                raw_labels.append(cell.strip())
                continue
            try:
                v = float(cell)
            except ValueError:
                what = "is empty" if not cell.strip() else f"holds {cell.strip()[:40]!r}"
                raise DataError(f"{path}: row {line}, {col_name(j)} {what}; expected a number. Fix or "
                                "drop that row") from None
            if not math.isfinite(v):
                raise DataError(f"{path}: row {line}, {col_name(j)} holds {cell.strip()!r}; expected a "
                                "finite number. Fix or drop that row")
            values[i, j] = v
    x = np.delete(values, label_col, axis=1) if label_col is not None else values
    if label_col is None:
        return arrays_to_dataset(x, None, str(path), name)
    y, classes = _csv_labels(raw_labels, [line for line, _ in rows], path, col_name(label_col))
    return arrays_to_dataset(x, y, str(path), name, classes)


def _rows(reader):
    for row in reader:
        if row and not (len(row) == 1 and not row[0].strip()):  # blank lines are not samples
            yield reader.line_num, row


def _is_number(cell: str) -> bool:
    try:
        float(cell)
        return True
    except ValueError:
        return False


def _csv_labels(cells, lines, path, column):
    """Integer labels are class indices; text labels become classes (sorted names)."""
    if all(_is_number(c) for c in cells):
        y = np.array([float(c) for c in cells])
        bad = np.flatnonzero(~np.isfinite(y) | (y != np.round(y)) | (y < 0))
        if bad.size:
            raise DataError(f"{path}: row {lines[bad[0]]}, {column} holds {cells[bad[0]]!r}; expected a "
                            "class index 0, 1, 2, ... (or class names as text)")
        return y.astype(np.int64), None
    empty = [i for i, c in enumerate(cells) if not c]
    if empty:
        raise DataError(f"{path}: row {lines[empty[0]]}, {column} is empty; expected a label")
    classes = sorted(set(cells))
    index = {c: i for i, c in enumerate(classes)}
    return np.array([index[c] for c in cells], dtype=np.int64), classes
