"""Datasets for vaelab: built-in ones (digits, mnist, fashion-mnist, cifar10, svhn, celeba, dsprites) and the user's
own files.

`load_dataset(name)` returns train/test `DataSplits` of compact in-memory `ArrayDataset`s (celeba: 64x64 crops
memory-mapped from a cache file, with its 40 attributes as ground-truth factors; dsprites: bit-packed
`PackedImageDataset`s with ground-truth factors; a large image folder: `LazyImageDataset`s that decode their files
one batch at a time). `attach_factors(splits, FILE)` adds the factors of a file.
"""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import torch

from vaelab.data.arrays import ArrayDataset, DataSplits, PackedImageDataset, split, standardize
from vaelab.data.images import LAZY_BYTES, LazyImageDataset
from vaelab.data.factors import attach_factors, load_factors
from vaelab.data.idx import read_idx
from vaelab.data.sources import DOWNLOADED, SYSTEM_DIRS, cache_dir, default_data_dirs, load_idx_dataset
from vaelab.errors import DataError

DATASETS: tuple[str, ...] = ("digits", "mnist", "fashion-mnist", "cifar10", "svhn", "celeba", "dsprites")
FILE_KINDS = ("a .npy file", "a .npz file (x[, y] or x_train/y_train/x_test/y_test)",
              "a folder of PNG/JPEG images (optionally one sub-folder per class, or train/ and test/)",
              "a .csv file of numbers")

__all__ = ["ArrayDataset", "DataSplits", "LAZY_BYTES", "LazyImageDataset", "PackedImageDataset", "DATASETS",
           "PIXEL_OPTIONS", "SYSTEM_DIRS", "attach_factors", "cache_dir", "default_data_dirs", "load_dataset", "load_factors", "read_idx",
           "standardize", "pixel_options"]

PIXEL_OPTIONS = ("image_size", "background")  # load_dataset's keywords that make an image folder's pixels


def pixel_options(saved: dict | None, dataset=None) -> dict:
    """load_dataset's keywords that made the pixels of a run's data (its config.json's "data" section), to read
    `dataset` the way the run did: {} unless `dataset` is the run's own. Without `dataset`: the keywords for any
    image folder the run's model is given (new images to score), which must come out the size it takes."""
    saved = saved or {}
    if dataset is not None and str(dataset) != str(saved.get("dataset")):
        return {}
    return {k: saved[k] for k in PIXEL_OPTIONS if saved.get(k) is not None}


def load_dataset(name: str | os.PathLike, data_dir: str | os.PathLike | None = None, *, download: bool = True,
                 test_fraction: float = 0.1, seed: int = 0, progress: bool = True, image_size: int | None = None,
                 background: str | None = None, lazy: bool | None = None, workers: int = 0,
                 cache: bool = False) -> DataSplits:
    """Load a built-in dataset by name, or the user's data from a path, as train/test splits.

    Built-in names win over a file of the same name in the current folder (write ./mnist for that).
    Data without explicit splits is split by a permutation seeded with `seed`, `test_fraction` to test.
    dsprites is generated into the user cache the first time (in seconds; `data_dir` does not apply).

    Image folders only: `image_size` N resizes each image's short side to N and centre-crops N x N (needed when
    the files differ in size); `background` ('white', 'black' or '#rrggbb'; default white) is what transparent
    pixels are composited on; `lazy` decodes the files one batch at a time instead of all up front (None: lazily
    with workers or a cache, or when the decoded pixels would take more than 1 GiB), with `workers` DataLoader
    worker processes, and `cache=True` keeps the decoded pixels in a uint8 .npy file in the user cache that later
    epochs read.
    """
    folder_options = {"image_size": image_size, "background": background, "lazy": lazy, "workers": workers,
                      "cache": cache}
    given = [k for k, v in folder_options.items() if v not in (None, 0, False)]
    key = str(name).strip().lower().replace("_", "-") if isinstance(name, str) else None
    path = Path(name).expanduser()
    if given and (key in DATASETS or not path.is_dir()):
        raise DataError(f"{', '.join(f'{k}={folder_options[k]!r}' for k in given)}: options of image folders, but "
                        f"dataset {str(name)!r} is not a folder of images; leave them out for this data")
    if key in DOWNLOADED:
        return load_idx_dataset(key, data_dir, download=download, progress=progress)
    if key == "digits":
        return _digits(test_fraction, seed)
    if key == "dsprites":
        from vaelab.data.dsprites import load_dsprites

        return load_dsprites(test_fraction, seed)

    if not path.exists():
        raise DataError(f"unknown dataset {str(name)!r}: not a built-in name ({', '.join(DATASETS)}) and no "
                        f"such file or folder. Expected a built-in name or a path to "
                        f"{'; '.join(FILE_KINDS)}")
    from vaelab.data import files

    label = path.stem or path.name
    suffix = path.suffix.lower()
    if path.is_dir():
        loaded = files.load_image_folder(path, label, **folder_options)
    elif suffix == ".npy":
        loaded = files.load_npy(path, label)
    elif suffix == ".npz":
        loaded = files.load_npz(path, label)
    elif suffix == ".csv":
        loaded = files.load_csv(path, label)
    else:
        raise DataError(f"{path}: unsupported kind of file {suffix or '(no suffix)'!r}; expected "
                        f"{'; '.join(FILE_KINDS)}")
    if isinstance(loaded, tuple):  # explicit train/test splits in the data itself
        return DataSplits(label, *loaded)
    return split(loaded, test_fraction, seed, source=str(path))


def _digits(test_fraction: float, seed: int) -> DataSplits:
    from sklearn.datasets import load_digits

    d = load_digits()  # ships inside scikit-learn: no download
    x = torch.from_numpy(d.images.astype(np.uint8)).unsqueeze(1)  # values 0..16
    y = torch.from_numpy(d.target.astype(np.int64))
    ds = ArrayDataset(x, y, scale=16.0, classes=[str(i) for i in range(10)], name="digits")
    return split(ds, test_fraction, seed, source="digits")
