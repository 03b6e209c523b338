"""In-memory datasets: `ArrayDataset`, `DataSplits`, and the helpers that split and standardize them.

Images are kept compact (uint8, N x C x H x W) and turned into float32 in [0, 1] one batch at a time,
so a 60,000-image set costs 47 MB rather than 188 MB.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from vaelab.errors import DataError


class ArrayDataset:
    """In-memory dataset. Images: x is uint8 (N, C, H, W) (compact), scale=255 (or 16 for sklearn digits).
    Tabular: x is float32 (N, D), scale=1.0."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor | None = None, scale: float = 255.0,
                 classes: list[str] | None = None, name: str = ""):
        # These checks guard against programming mistakes in loaders and callers; DataError keeps
        # them catchable the same way as every other data problem.
        if not isinstance(x, torch.Tensor):
            raise DataError(f"ArrayDataset {name!r}: x must be a torch.Tensor, got {type(x).__name__}")
        if x.ndim not in (2, 4):
            raise DataError(f"ArrayDataset {name!r}: x has shape {tuple(x.shape)}; expected (N, D) "
                            "for tabular data or (N, C, H, W) for images")
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

    def __len__(self) -> int:
        return len(self.x)

    def __repr__(self) -> str:
        labels = "unlabelled" if self.y is None else f"{self.num_classes} classes"
        return (f"ArrayDataset(name={self.name!r}, n={len(self)}, sample_shape={self.sample_shape}, "
                f"dtype={self.x.dtype}, scale={self.scale:g}, {labels})")

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return tuple(self.x.shape[1:])

    @property
    def is_image(self) -> bool:
        return self.x.ndim == 4

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
        p = self.x[idx].float()
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

    def labels(self, idx) -> torch.Tensor | None:
        return None if self.y is None else self.y[idx]

    def subset(self, idx) -> "ArrayDataset":
        return ArrayDataset(self.x[idx], None if self.y is None else self.y[idx], self.scale,
                            self.classes, self.name)

    def to_float(self) -> torch.Tensor:
        """The whole set as float32, scaled (for small sets and evaluation)."""
        return self.batch(slice(None))


class CodeDataset(ArrayDataset):
    """In-memory integer samples that stay integers: x is int64 (N, C, H, W) or (N, D), e.g. grids of code
    indices (N, 1, h, w) of a VQ-VAE, on which its code prior trains. `batch` returns them as they are (int64,
    unscaled); they cannot be binarized. Labels, classes and everything else are an ArrayDataset's."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor | None = None, classes: list[str] | None = None,
                 name: str = ""):
        if isinstance(x, torch.Tensor) and (x.is_floating_point() or x.is_complex() or x.dtype == torch.bool):
            raise DataError(f"CodeDataset {name!r}: x must hold integers (code indices), got dtype {x.dtype}")
        super().__init__(x.to(torch.int64) if isinstance(x, torch.Tensor) else x, y, 1.0, classes, name)

    def batch(self, idx: torch.Tensor | slice, binarize: bool = False,
              generator: torch.Generator | None = None) -> torch.Tensor:
        """int64 batch x[idx], unscaled."""
        if binarize:
            raise DataError(f"dataset {self.name!r} holds integer codes: binarize=True applies to intensities in "
                            "[0, 1]; turn binarization off for this data")
        return self.x[idx]

    def subset(self, idx) -> "CodeDataset":
        return CodeDataset(self.x[idx], None if self.y is None else self.y[idx], self.classes, self.name)

    def to_float(self) -> torch.Tensor:
        return self.x.float()


@dataclass
class DataSplits:
    name: str
    train: ArrayDataset
    test: ArrayDataset

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
    return DataSplits(ds.name, ds.subset(train_idx), ds.subset(test_idx))


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
        a = ArrayDataset(a, train.y, 1.0, train.classes, train.name)
        b = ArrayDataset(b, test.y, 1.0, test.classes, test.name)
    return a, b, mean, std
