"""In-memory datasets: `ArrayDataset`, `PackedImageDataset`, `DataSplits`, and the helpers that split and
standardize them.

Images are kept compact (uint8, N x C x H x W) and turned into float32 in [0, 1] one batch at a time,
so a 60,000-image set costs 47 MB rather than 188 MB. Binary images can stay bit-packed (`PackedImageDataset`:
one bit a pixel, 737,280 dSprites images in 377 MB) and are unpacked one batch at a time.

Any dataset may carry ground-truth factors of variation: `factors`, a float64 tensor (N, F) of factor values
(one row per sample), and `factor_names` (F names, or None). Every subset and split keeps them in step with
the samples; the disentanglement metrics read them.
"""

from __future__ import annotations

import copy
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from vaelab.errors import DataError


def check_factors(factors, factor_names, n: int, name: str) -> tuple[torch.Tensor | None, list[str] | None]:
    """`factors` as a float64 tensor (n, F) and `factor_names` as a list of F strings (or None), checked: a
    DataError names what is wrong. Factors are values (e.g. a scale of 0.5..1); class-like factors are 0..k-1."""
    if factors is None:
        if factor_names is not None:
            raise DataError(f"dataset {name!r}: factor_names {list(factor_names)!r} given without factors")
        return None, None
    if not isinstance(factors, torch.Tensor):
        try:
            factors = torch.as_tensor(np.asarray(factors, dtype=np.float64))
        except (TypeError, ValueError) as e:
            raise DataError(f"dataset {name!r}: factors must be numbers, an array (N, F); got "
                            f"{type(factors).__name__} ({e})") from None
    if factors.ndim != 2 or len(factors) != n:
        raise DataError(f"dataset {name!r}: factors have shape {tuple(factors.shape)}; expected ({n}, F): one row "
                        "of F factor values per sample")
    if factors.is_complex():
        raise DataError(f"dataset {name!r}: factors have dtype {factors.dtype}; expected real numbers")
    factors = factors.detach().to(device="cpu", dtype=torch.float64)
    bad = ~torch.isfinite(factors)
    if bad.any():
        row, col = (int(i) for i in bad.nonzero()[0])
        raise DataError(f"dataset {name!r}: factor {col} of sample {row} is {float(factors[row, col])}; every "
                        "factor value must be a finite number")
    if factor_names is not None:
        names = [str(v) for v in factor_names]
        if len(names) != factors.shape[1]:
            raise DataError(f"dataset {name!r}: {len(names)} factor names {names!r} for {factors.shape[1]} factors "
                            "(columns); expected one name per column")
        if len(set(names)) != len(names) or not all(names):
            raise DataError(f"dataset {name!r}: factor names {names!r} must be distinct and non-empty")
        factor_names = names
    return factors, factor_names


class ArrayDataset:
    """In-memory dataset. Images: x is uint8 (N, C, H, W) (compact), scale=255 (or 16 for sklearn digits).
    Tabular: x is float32 (N, D), scale=1.0. Windows of a multivariate series: x is float32 (N, C, L) (C channels,
    L time steps; often a strided view of one series, see vaelab.timeseries), scale=1.0. Optional ground-truth factors: float64 (N, F) and their names."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor | None = None, scale: float = 255.0,
                 classes: list[str] | None = None, name: str = "", *, factors=None,
                 factor_names: list[str] | None = None):
        # These checks guard against programming mistakes in loaders and callers; DataError keeps
        # them catchable the same way as every other data problem.
        if not isinstance(x, torch.Tensor):
            raise DataError(f"ArrayDataset {name!r}: x must be a torch.Tensor, got {type(x).__name__}")
        if x.ndim not in (2, 3, 4):
            raise DataError(f"ArrayDataset {name!r}: x has shape {tuple(x.shape)}; expected (N, D) "
                            "for tabular data, (N, C, L) for windows of a series or (N, C, H, W) for images")
        if y is not None:
            if not isinstance(y, torch.Tensor) or y.ndim != 1 or len(y) != len(x):
                shape = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
                raise DataError(f"ArrayDataset {name!r}: y has shape {shape}; expected ({len(x)},) "
                                "class indices, one per sample")
            if y.dtype != torch.int64:
                y = y.to(torch.int64)
        if not scale > 0:
            raise DataError(f"ArrayDataset {name!r}: scale must be > 0, got {scale}")
        self.x = x
        self.y = y
        self.scale = float(scale)
        self.classes = list(classes) if classes is not None else None
        self.name = name
        self.factors, self.factor_names = check_factors(factors, factor_names, len(x), name)

    def __len__(self) -> int:
        return len(self.x)

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(name={self.name!r}, n={len(self)}, sample_shape={self.sample_shape}, "
                f"dtype={self.x.dtype}, scale={self.scale:g}, {self._describe_labels()})")

    def _describe_labels(self) -> str:
        labels = "unlabelled" if self.y is None else f"{self.num_classes} classes"
        if self.factors is not None:
            k = self.factors.shape[1]
            labels += f", factors {', '.join(self.factor_names)}" if self.factor_names else \
                f", {k} factor{'' if k == 1 else 's'}"
        return labels

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    @property
    def is_image(self) -> bool:
        return self.x.ndim == 4

    @property
    def is_sequence(self) -> bool:
        """Windows of a series, (C, L) samples."""
        return self.x.ndim == 3

    @property
    def num_classes(self) -> int | None:
        if self.classes is not None:
            return len(self.classes)
        if self.y is not None and len(self.y) > 0:
            return int(self.y.max()) + 1
        return None

    def batch(self, idx: torch.Tensor | slice, binarize: bool = False,
              generator: torch.Generator | None = None) -> torch.Tensor:
        """float32 batch, scaled to [0,1] for images (x[idx].float() / scale); with binarize=True a
        dynamic binarization torch.bernoulli(p, generator=generator) (fresh each call)."""
        return self.scaled(self.x[idx], binarize, generator)

    def scaled(self, raw: torch.Tensor, binarize: bool = False,
               generator: torch.Generator | None = None) -> torch.Tensor:
        """Stored samples `raw` (e.g. uint8 pixels) as batch() returns them: float32 / scale, binarized if asked."""
        p = raw.float()
        if self.scale != 1.0:
            p = p / self.scale
        if binarize:
            # Tabular data is not scaled to [0, 1]; bernoulli would fail with an obscure message.
            lo, hi = (float(p.min()), float(p.max())) if p.numel() else (0.0, 0.0)
            if lo < 0.0 or hi > 1.0:
                raise DataError(f"dataset {self.name!r}: binarize=True needs values in [0, 1], but this "
                                f"batch spans [{lo:g}, {hi:g}]; turn binarization off for this data")
            p = torch.bernoulli(p, generator=generator)
        return p

    def batches(self, indices: list, binarize: bool = False,
                generator: torch.Generator | None = None) -> Iterator[torch.Tensor]:
        """batch(i, binarize, generator) for each index tensor i of `indices`, in order, each made when asked for
        (so `generator` is drawn from in the order of the calls). A dataset read from files decodes ahead."""
        for idx in indices:
            yield self.batch(idx, binarize, generator)

    def labels(self, idx) -> torch.Tensor | None:
        return None if self.y is None else self.y[idx]

    def factors_of(self, idx) -> torch.Tensor | None:
        """The factor values of the samples `idx` (float64 (B, F)), or None without factors."""
        return None if self.factors is None else self.factors[idx]

    def subset(self, idx) -> "ArrayDataset":
        return ArrayDataset(self.x[idx], None if self.y is None else self.y[idx], self.scale,
                            self.classes, self.name, **self._factors_kw(idx))

    def with_factors(self, factors, factor_names: list[str] | None = None) -> "ArrayDataset":
        """A copy (sharing the samples) whose ground-truth factors are `factors` (N, F), checked; None removes them."""
        out = copy.copy(self)
        out.factors, out.factor_names = check_factors(factors, factor_names, len(self), self.name)
        return out

    def _factors_kw(self, idx) -> dict:
        """The factor keywords of a subset `idx` (for subset())."""
        return {"factors": self.factors_of(idx), "factor_names": self.factor_names}

    def to_float(self) -> torch.Tensor:
        """The whole set as float32, scaled (for small sets and evaluation)."""
        return self.batch(slice(None))


class CodeDataset(ArrayDataset):
    """In-memory integer samples that stay integers: x is int64 (N, C, H, W) or (N, D), e.g. grids of code
    indices (N, 1, h, w) of a VQ-VAE, on which its code prior trains. `batch` returns them as they are (int64,
    unscaled); they cannot be binarized. Labels, classes and everything else are an ArrayDataset's."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor | None = None, classes: list[str] | None = None,
                 name: str = "", *, factors=None, factor_names: list[str] | None = None):
        if isinstance(x, torch.Tensor) and (x.is_floating_point() or x.is_complex() or x.dtype == torch.bool):
            raise DataError(f"CodeDataset {name!r}: x must hold integers (code indices), got dtype {x.dtype}")
        super().__init__(x.to(torch.int64) if isinstance(x, torch.Tensor) else x, y, 1.0, classes, name,
                         factors=factors, factor_names=factor_names)

    def batch(self, idx: torch.Tensor | slice, binarize: bool = False,
              generator: torch.Generator | None = None) -> torch.Tensor:
        """int64 batch x[idx], unscaled."""
        if binarize:
            raise DataError(f"dataset {self.name!r} holds integer codes: binarize=True applies to intensities in "
                            "[0, 1]; turn binarization off for this data")
        return self.x[idx]

    def subset(self, idx) -> "CodeDataset":
        return CodeDataset(self.x[idx], None if self.y is None else self.y[idx], self.classes, self.name,
                           **self._factors_kw(idx))

    def to_float(self) -> torch.Tensor:
        return self.x.float()


class PackedImageDataset(ArrayDataset):
    """Binary images kept bit-packed, one bit a pixel, and unpacked one batch at a time: the 737,280 dSprites
    images of 64x64 pixels take 377 MB so, rather than 3 GB as uint8 or 12 GB as float32.

    bits: uint8 numpy array (M, ceil(C*H*W / 8)); row i is np.packbits(image_i.reshape(-1)) (pixel 0 is the top
    bit of byte 0). rows: which rows of `bits` this dataset holds, in order (int64 (N,)), or None for all of them;
    subsets and splits share `bits` and keep their own rows. batch() returns float32 0.0/1.0 (scale 1). There is
    no `x` tensor: reading `x` raises a DataError that says to use batch().
    """

    max_float_bytes = 2 ** 31  # to_float() refuses to make a float32 copy larger than this (2 GiB)

    def __init__(self, bits: np.ndarray, sample_shape: tuple[int, ...], y: torch.Tensor | None = None,
                 classes: list[str] | None = None, name: str = "", *, rows: np.ndarray | None = None,
                 factors=None, factor_names: list[str] | None = None):
        if not isinstance(bits, np.ndarray) or bits.dtype != np.uint8 or bits.ndim != 2:
            what = f"{bits.dtype} array of shape {bits.shape}" if isinstance(bits, np.ndarray) else type(bits).__name__
            raise DataError(f"PackedImageDataset {name!r}: bits must be a uint8 numpy array (N, bytes per image), "
                            f"got a {what}")
        shape = tuple(int(v) for v in sample_shape)
        if len(shape) != 3 or min(shape) < 1:
            raise DataError(f"PackedImageDataset {name!r}: sample_shape {shape} must be (C, H, W)")
        need = -(-int(np.prod(shape)) // 8)
        if bits.shape[1] != need:
            raise DataError(f"PackedImageDataset {name!r}: rows of {bits.shape[1]} bytes cannot hold images of shape "
                            f"{shape}; expected {need} bytes (one bit a pixel)")
        if rows is not None:
            rows = np.asarray(rows)
            if rows.ndim != 1 or (rows.size and (rows.dtype.kind not in "iu" or rows.min() < 0
                                                 or rows.max() >= len(bits))):
                raise DataError(f"PackedImageDataset {name!r}: rows must be indices 0..{len(bits) - 1} (1-D)")
            rows = rows.astype(np.int64, copy=False)
        n = len(bits) if rows is None else len(rows)
        if y is not None:
            if not isinstance(y, torch.Tensor) or y.ndim != 1 or len(y) != n:
                found = tuple(y.shape) if isinstance(y, torch.Tensor) else type(y).__name__
                raise DataError(f"PackedImageDataset {name!r}: y has shape {found}; expected ({n},) class indices, "
                                "one per sample")
            y = y.to(torch.int64)
        self._bits, self._rows, self._shape = bits, rows, shape
        self.y = y
        self.scale = 1.0
        self.classes = list(classes) if classes is not None else None
        self.name = name
        self.factors, self.factor_names = check_factors(factors, factor_names, n, name)

    @property
    def x(self):
        raise DataError(f"dataset {self.name!r} keeps its {len(self):,} images bit-packed and has no `x` tensor; "
                        "read samples with batch(idx) (float32 0/1, one batch at a time), or subset(idx).to_float() "
                        "for a few")

    @property
    def bits(self) -> np.ndarray:
        """This dataset's images, packed (N, bytes per image) uint8 (a copy where it is a subset)."""
        return self._bits if self._rows is None else self._bits[self._rows]

    def __len__(self) -> int:
        return len(self._bits) if self._rows is None else len(self._rows)

    def __repr__(self) -> str:
        return (f"PackedImageDataset(name={self.name!r}, n={len(self)}, sample_shape={self.sample_shape}, "
                f"1 bit a pixel, {self._describe_labels()})")

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return self._shape

    @property
    def is_image(self) -> bool:
        return True

    @staticmethod
    def _index(idx):
        """`idx` (a tensor, slice, list, array or int) as a numpy index."""
        if isinstance(idx, torch.Tensor):
            return idx.cpu().numpy()
        if isinstance(idx, (list, tuple)):
            return np.asarray(idx, dtype=np.int64)
        return idx

    def _select(self, idx):
        """The rows of `bits` that hold the samples `idx`."""
        idx = self._index(idx)
        return idx if self._rows is None else self._rows[idx]

    def batch(self, idx: torch.Tensor | slice, binarize: bool = False,
              generator: torch.Generator | None = None) -> torch.Tensor:
        """float32 batch of 0.0/1.0 pixels, (B, C, H, W) (an int idx: one (C, H, W) sample); binarize=True draws
        torch.bernoulli of it as ArrayDataset does (the pixels are 0 or 1 already, so they stay as they are)."""
        packed = self._bits[self._select(idx)]  # (B, bytes) or (bytes,)
        pixels = np.unpackbits(packed, axis=-1, count=int(np.prod(self._shape)))
        p = torch.from_numpy(pixels).to(torch.float32).reshape(*packed.shape[:-1], *self._shape)
        if binarize:
            p = torch.bernoulli(p, generator=generator)
        return p

    def subset(self, idx) -> "PackedImageDataset":
        held = self._rows if self._rows is not None else np.arange(len(self), dtype=np.int64)
        rows = np.atleast_1d(held[self._index(idx)])
        return PackedImageDataset(self._bits, self._shape, None if self.y is None else self.y[idx], self.classes,
                                  self.name, rows=rows, **self._factors_kw(idx))

    def to_float(self) -> torch.Tensor:
        size = len(self) * int(np.prod(self._shape)) * 4
        if size > self.max_float_bytes:
            raise DataError(f"dataset {self.name!r} keeps its {len(self):,} images bit-packed; as one float32 tensor "
                            f"they would take {size / 2 ** 30:.1f} GiB: read them in batches with batch(idx), or "
                            "take a subset(idx) first")
        return self.batch(slice(None))


@dataclass
class DataSplits:
    """A dataset's train and test splits. source_index: where vaelab split one dataset itself (split()), the
    positions of the train and test samples in that dataset (int64 tensors), so that per-sample data given in the
    source's order (a --factors file) can follow them; None where the data came with its own splits."""
    name: str
    train: ArrayDataset
    test: ArrayDataset
    source_index: tuple[torch.Tensor, torch.Tensor] | None = None

    def __post_init__(self):
        # A model is built from train's shape and evaluated on test: they must agree.
        if self.train.sample_shape != self.test.sample_shape:
            raise DataError(f"dataset {self.name!r}: train samples have shape {self.train.sample_shape} "
                            f"but test samples have shape {self.test.sample_shape}; both splits must "
                            "hold samples of one shape")


def split(ds: ArrayDataset, test_fraction: float, seed: int, source: str = "") -> DataSplits:
    """Split one dataset into train/test by a seeded permutation (the same seed gives the same split)."""
    source = source or ds.name
    if not 0.0 < test_fraction < 1.0:
        raise DataError(f"{source}: test_fraction is {test_fraction}; expected a number strictly between "
                        "0 and 1 (e.g. 0.1), or give explicit train/test splits")
    n = len(ds)
    if n < 2:
        raise DataError(f"{source}: holds {n} sample(s); at least 2 are needed to make a train and a "
                        "test split")
    n_test = min(max(round(n * test_fraction), 1), n - 1)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed)))
    # Sorted so each split keeps the file's order (reproducible and easier to inspect).
    test_idx, _ = perm[:n_test].sort()
    train_idx, _ = perm[n_test:].sort()
    return DataSplits(ds.name, ds.subset(train_idx), ds.subset(test_idx), source_index=(train_idx, test_idx))


def standardize(train, test):
    """Standardize tabular data with the train split's statistics: returns (train, test, mean, std).

    Accepts two tensors (N, D) or two ArrayDatasets (returned as new float32 ArrayDatasets, scale 1).
    Constant columns get std 1 so they become 0 rather than NaN.
    """
    as_datasets = isinstance(train, ArrayDataset)
    a = train.to_float() if as_datasets else train.float()
    b = test.to_float() if isinstance(test, ArrayDataset) else test.float()
    mean = a.mean(dim=0)
    std = a.std(dim=0, unbiased=False)
    std = torch.where(std > 0, std, torch.ones_like(std))
    a, b = (a - mean) / std, (b - mean) / std
    if as_datasets:
        a = ArrayDataset(a, train.y, 1.0, train.classes, train.name, factors=train.factors,
                         factor_names=train.factor_names)
        b = ArrayDataset(b, test.y, 1.0, test.classes, test.name, factors=test.factors,
                         factor_names=test.factor_names)
    return a, b, mean, std
