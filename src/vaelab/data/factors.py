"""Ground-truth factors of variation from the user's files: `--factors FILE` for any dataset.

A factors file holds one row of F factor values per sample (numbers: a class-like factor as 0..k-1, a continuous
one as its value), in the data's order:
  - .npy: an array (N, F), or (N,) for one factor; the factors are then unnamed;
  - .csv: a header row of factor names, then N rows of numbers;
  - .npz: `factors` (N, F), or `factors_train` and `factors_test` (one row per sample of each split).
"The data's order": for a dataset with its own train and test splits (mnist, fashion-mnist, an .npz with
x_train/x_test, a folder with train/ and test/) the train samples, then the test samples; for data that vaelab
splits itself (digits, dsprites, one .npy/.npz/.csv file or image folder) the samples in the order of the
source, before the split: row i of the factors file belongs to sample i of the data file. Every problem is a
DataError that names the file, what it found and what was expected.
"""

from __future__ import annotations

import csv
import math
import os
from pathlib import Path

import numpy as np
import torch

from vaelab.data.arrays import DataSplits
from vaelab.data.files import read_npy, read_npz
from vaelab.errors import DataError

FACTOR_FILES = ("an .npy array (N, F)", "a .csv file with a header row of factor names",
                "an .npz with 'factors' (or 'factors_train' and 'factors_test')")


def load_factors(path: str | os.PathLike, n: int | None = None,
                 name: str = "the dataset") -> tuple[torch.Tensor, list[str] | None]:
    """The factors of an .npy or .csv file: (float64 tensor (N, F), the F names of a .csv header or None).
    n: the number of samples the file must cover (None: any); name: what they belong to, for the messages."""
    path = Path(path).expanduser()
    values, names = _read_table(path)
    if n is not None and len(values) != n:
        raise DataError(f"{path}: holds {len(values)} rows of factors, but {name} has {n} samples; expected one "
                        "row per sample")
    return torch.from_numpy(values), names


def _read_table(path: Path) -> tuple[np.ndarray, list[str] | None]:
    suffix = path.suffix.lower()
    if not path.is_file():
        raise DataError(f"{path}: no such factors file; expected {' or '.join(FACTOR_FILES[:2])}, one row of "
                        "factor values per sample")
    if suffix == ".npy":
        return _table(read_npy(path), str(path)), None
    if suffix == ".csv":
        return _read_csv(path)
    raise DataError(f"{path}: unsupported kind of factors file {suffix or '(no suffix)'!r}; expected "
                    f"{' or '.join(FACTOR_FILES)}")


def attach_factors(splits: DataSplits, path: str | os.PathLike) -> DataSplits:
    """`splits` with the factors of a file (see the module docstring for its layouts and row order) attached to
    its train and test splits."""
    path = Path(path).expanduser()
    n_train, n_test = len(splits.train), len(splits.test)
    what = f"dataset {splits.name!r} ({n_train} train + {n_test} test samples)"
    names = None
    if path.suffix.lower() == ".npz":
        if not path.is_file():
            raise DataError(f"{path}: no such factors file; expected {' or '.join(FACTOR_FILES)}")
        arrays = read_npz(path)
        if "factors_train" in arrays or "factors_test" in arrays:
            if "factors_train" not in arrays or "factors_test" not in arrays:
                raise DataError(f"{path}: has arrays {sorted(arrays)}; factors for each split need both "
                                "factors_train and factors_test")
            train = _table(arrays["factors_train"], f"{path} (factors_train)")
            test = _table(arrays["factors_test"], f"{path} (factors_test)")
            for part, values, n in (("factors_train", train, n_train), ("factors_test", test, n_test)):
                if len(values) != n:
                    raise DataError(f"{path}: {part} holds {len(values)} rows, but {what} has {n} samples in that "
                                    "split; expected one row per sample")
            if train.shape[1] != test.shape[1]:
                raise DataError(f"{path}: factors_train has {train.shape[1]} factors (columns) but factors_test "
                                f"has {test.shape[1]}; both splits need the same factors")
            return _attached(splits, torch.from_numpy(train), torch.from_numpy(test), None)
        if "factors" not in arrays:
            raise DataError(f"{path}: has arrays {sorted(arrays)}; expected 'factors' (one row per sample), or "
                            "'factors_train' and 'factors_test'")
        table = torch.from_numpy(_table(arrays["factors"], f"{path} (factors)"))
        if len(table) != n_train + n_test:
            raise DataError(f"{path}: factors holds {len(table)} rows, but {what} has {n_train + n_test} samples; "
                            f"expected one row per sample, {_order(splits)}")
    else:
        values, names = _read_table(path)
        table = torch.from_numpy(values)
        if len(table) != n_train + n_test:
            raise DataError(f"{path}: holds {len(table)} rows of factors, but {what} has {n_train + n_test} "
                            f"samples; expected one row per sample, {_order(splits)}")
    if splits.source_index is not None:  # vaelab split the data itself: the rows follow the source's order
        train_idx, test_idx = splits.source_index
        return _attached(splits, table[train_idx], table[test_idx], names)
    return _attached(splits, table[:n_train], table[n_train:], names)


def _order(splits: DataSplits) -> str:
    """The order of a factors file's rows for `splits`, as the messages say it."""
    if splits.source_index is not None:
        return "in the order of the data's samples before vaelab split them into train and test"
    return "the train samples first, then the test samples"


def _attached(splits: DataSplits, train: torch.Tensor, test: torch.Tensor, names) -> DataSplits:
    return DataSplits(splits.name, splits.train.with_factors(train, names), splits.test.with_factors(test, names),
                      splits.source_index)


def _table(values: np.ndarray, source: str) -> np.ndarray:
    """A factors array as float64 (N, F), checked: shape, numbers, finite."""
    if values.ndim == 1:
        values = values[:, None]  # one factor
    if values.ndim != 2:
        raise DataError(f"{source}: holds an array of shape {values.shape}; expected (N, F): one row of F factor "
                        "values per sample (or (N,) for a single factor)")
    if 0 in values.shape:
        raise DataError(f"{source}: holds an array of shape {values.shape}; expected at least one sample (row) and "
                        "one factor (column)")
    with np.errstate(over="ignore"):
        values = np.ascontiguousarray(values, dtype=np.float64)
    bad = ~np.isfinite(values)
    if bad.any():
        row, col = (int(i) for i in np.argwhere(bad)[0])
        raise DataError(f"{source}: row {row}, factor {col} is {values[row, col]}; expected finite numbers "
                        f"({int(bad.sum())} value(s) are not)")
    return values


def _read_csv(path: Path) -> tuple[np.ndarray, list[str]]:
    """A header row of factor names, then one row of numbers per sample."""
    rows = []  # (line number, cells), blank lines left out
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            for row in reader:
                if row and not (len(row) == 1 and not row[0].strip()):
                    rows.append((reader.line_num, row))
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: is not UTF-8 text ({e}); expected a CSV file of factor values") from None
    except csv.Error as e:
        raise DataError(f"{path}: is not a readable CSV file ({e}); expected comma-separated factor values") from None
    if not rows:
        raise DataError(f"{path}: is empty; expected a header row of factor names, then one row of factor values "
                        "per sample")
    names = [c.strip() for c in rows[0][1]]
    if all(_is_number(c) for c in names):
        raise DataError(f"{path}: the first row ({', '.join(names)}) holds numbers; expected a header row of factor "
                        "names (e.g. shape,scale), then one row of factor values per sample")
    if not all(names) or len(set(names)) != len(names):
        raise DataError(f"{path}: the header row ({', '.join(names)}) must name each factor once; expected distinct, "
                        "non-empty names")
    if len(rows) == 1:
        raise DataError(f"{path}: has a header row but no rows of factor values; expected one row per sample")
    values = np.empty((len(rows) - 1, len(names)), dtype=np.float64)
    for i, (line, row) in enumerate(rows[1:]):
        if len(row) != len(names):
            raise DataError(f"{path}: row {line} has {len(row)} cells; expected {len(names)}, one per factor named in "
                            "the header")
        for j, cell in enumerate(row):
            try:
                v = float(cell)
            except ValueError:
                what = "is empty" if not cell.strip() else f"holds {cell.strip()[:40]!r}"
                raise DataError(f"{path}: row {line}, factor {names[j]!r} {what}; expected a number") from None
            if not math.isfinite(v):
                raise DataError(f"{path}: row {line}, factor {names[j]!r} holds {cell.strip()!r}; expected a finite "
                                "number")
            values[i, j] = v
    return values, names


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


__all__ = ["FACTOR_FILES", "load_factors", "attach_factors"]
