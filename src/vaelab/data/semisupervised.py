"""Semi-supervised training data: keep N labels of a labelled training set, hide the others, and put both kinds
into every batch.

    keep = select_labels(train.y, 100, seed=0)           # 10 indices per class, the same for the same seed
    batches = MixedBatches(train.y, keep, batch_size=128)
    batches.labels                                       # (N,) the labels the model sees: -1 where hidden
    order = batches.epoch_order(generator)               # the epoch's global batches, back to back

An epoch is one pass over the unlabelled samples. Each global batch holds `n_unlabelled` of them and
`n_labelled` labelled ones (at least `share` of the batch: TrainConfig.labelled_share, a quarter by default),
cycled through the (small) labelled set in a fresh order each pass, so every optimizer step sees labelled
samples (Kingma et al. 2014 spread the labelled set over the minibatches of an epoch; with 100 labels and
hundreds of steps an epoch, we oversample it instead). `classifier_weight` turns the paper's α (in units of the
training set's size) into the per-sample weight of the classification loss that gives the same objective in
expectation under this sampling.
"""

from __future__ import annotations

import math

import torch

from vaelab.config import LABELLED_SHARE
from vaelab.errors import ConfigError, DataError


def select_labels(y: torch.Tensor, n: int, seed: int, num_classes: int | None = None) -> torch.Tensor:
    """The sorted indices of `n` samples whose labels are kept, balanced over the classes: n // K of each class,
    and one more for n % K classes drawn with the seed. The same (y, n, seed) gives the same indices."""
    if not (isinstance(n, int) and not isinstance(n, bool) and n >= 1):
        raise ConfigError(f"labels={n!r} must be a positive integer (how many training labels to keep)")
    if y is None:
        raise DataError(f"labels={n} keeps {n} labels of the training set, but it has none; use a labelled "
                        "dataset (digits, mnist, fashion-mnist, or files with labels)")
    y = y.long()
    k = int(num_classes) if num_classes else int(y.max()) + 1
    if n < k:
        raise DataError(f"labels={n} cannot be balanced over the {k} classes of the training set: keep at least "
                        f"one label per class, labels >= {k}")
    if n > len(y):
        raise DataError(f"labels={n} is more than the {len(y)} samples of the training set; keep at most "
                        f"{len(y)} (or 0 to keep every label)")
    gen = torch.Generator().manual_seed(int(seed))
    quota = torch.full((k,), n // k, dtype=torch.long)
    quota[torch.randperm(k, generator=gen)[: n % k]] += 1  # the remainder, to distinct random classes
    counts = torch.bincount(y, minlength=k)
    short = [c for c in range(k) if quota[c] > counts[c]]
    if short:
        c = short[0]
        raise DataError(f"labels={n} needs {int(quota[c])} labelled samples of class {c}, but the training set holds "
                        f"{int(counts[c])}; keep fewer labels (labels <= {int(counts.min()) * k} keeps every class "
                        "balanced)")
    # a random order, grouped by class (stable sort): the first quota[c] of class c's group are kept
    perm = torch.randperm(len(y), generator=gen)
    grouped = perm[torch.argsort(y[perm], stable=True)]
    starts = torch.cumsum(counts, 0) - counts  # where each class's group begins
    rank = torch.arange(len(y)) - starts[y[grouped]]  # position within its class's group
    return grouped[rank < quota[y[grouped]]].sort().values


class MixedBatches:
    """The global batches of a semi-supervised epoch (see the module's docstring)."""

    def __init__(self, y: torch.Tensor, labelled: torch.Tensor, batch_size: int, share: float = LABELLED_SHARE):
        n = len(y)
        keep = torch.zeros(n, dtype=torch.bool)
        keep[labelled] = True
        self.labels = torch.where(keep, y.long(), -1)  # (N,) what the model sees: -1 = hidden
        self.labelled = keep.nonzero()[:, 0]
        self.unlabelled = (~keep).nonzero()[:, 0]
        if len(self.unlabelled) and batch_size < 2:
            raise ConfigError(f"batch_size={batch_size}: a semi-supervised batch holds labelled and unlabelled "
                              "samples, so it needs at least 2")
        n_l, n_u = len(self.labelled), len(self.unlabelled)
        # at least `share` of a batch, and at least the labelled set's own share of the data
        b_l = max(1, round(batch_size * max(share, n_l / n)))
        self.n_labelled = min(b_l, batch_size - 1)
        self.n_unlabelled = batch_size - self.n_labelled
        self.steps = math.ceil(n_u / self.n_unlabelled)
        self.epoch_length = n_u + self.steps * self.n_labelled  # indices in one epoch's order

    def epoch_order(self, generator: torch.Generator) -> torch.Tensor:
        """One epoch's global batches back to back, (epoch_length,): batch i is order[i*B:(i+1)*B], its first
        n_unlabelled entries unlabelled samples (the last batch: the rest of them) and then n_labelled
        labelled ones."""
        u = self.unlabelled[torch.randperm(len(self.unlabelled), generator=generator)]
        need = self.steps * self.n_labelled
        passes = math.ceil(need / len(self.labelled))
        lab = torch.cat([self.labelled[torch.randperm(len(self.labelled), generator=generator)]
                         for _ in range(passes)])[:need]
        parts = [t for pair in zip(u.split(self.n_unlabelled), lab.split(self.n_labelled)) for t in pair]
        return torch.cat(parts)

    def uniform_order(self, generator: torch.Generator) -> torch.Tensor:
        """An epoch of as many batches as `epoch_order`'s, (epoch_length,), drawn uniformly: permutations of all
        the training samples back to back, cut at epoch_length, so each is seen as often as any other (for a
        stage that learns without labels, where the mixed batches would show the few labelled samples far more
        often than the rest)."""
        n = len(self.labels)
        passes = math.ceil(self.epoch_length / n)
        return torch.cat([torch.randperm(n, generator=generator) for _ in range(passes)])[:self.epoch_length]

    def classifier_weight(self, alpha: float) -> float:
        """The per-sample weight of -log q(y|x) on labelled samples for the paper's α = alpha * N.

        Kingma et al.'s objective is  sum_l L(x, y) + sum_u U(x) + alpha * N * mean_l[-log q(y|x)]. An epoch
        here visits each unlabelled sample once and, per unlabelled sample, n_labelled / n_unlabelled labelled
        ones, so its summed loss matches the paper's classification term when the per-sample weight is
        alpha * (N / N_u) * (n_unlabelled / n_labelled). (The labelled samples' own -ELBO is oversampled by the
        same factor: more weight on the few labelled images' likelihood, which the paper's objective leaves
        free.)"""
        n_u, n = len(self.unlabelled), len(self.labels)
        return alpha * (n / n_u) * (self.n_unlabelled / self.n_labelled)

    def labelled_bound_weight(self) -> float:
        """The per-sample weight of a labelled sample's -ELBO L(x, y) that makes an epoch count the labelled set's
        bounds once, as Kingma et al.'s sum_l L(x, y) + sum_u U(x): an epoch visits labelled samples
        steps * n_labelled times, so the weight is N_l / (steps * n_labelled) (100 of MNIST's 60,000 labelled, 13
        of a batch of 128: 100 / (521 * 13) = 0.0148)."""
        return len(self.labelled) / (self.steps * self.n_labelled)


def mixed_batches(model, train, labels: int, seed: int, batch_size: int,
                  share: float = LABELLED_SHARE) -> MixedBatches | None:
    """The semi-supervised plan of a training run with `labels` kept labels, at least `share` of every batch
    labelled (None for labels=0: every label is kept and batches are plain permutations). Checks that the model
    learns from partly labelled data."""
    if not labels:
        return None
    if not model.capabilities.semi_supervised:
        raise ConfigError(f"labels={labels} keeps {labels} labels and hides the rest, but model "
                          f"{model.config.model!r} cannot learn from unlabelled samples; use --model m2 (the "
                          "semi-supervised VAE) or leave --labels at 0")
    if train.y is None:
        raise DataError(f"labels={labels} keeps {labels} labels of the training set, but it has none; use a "
                        "labelled dataset")
    keep = select_labels(train.y, labels, seed, train.num_classes)
    if len(keep) == len(train):
        return None  # every label kept: nothing is hidden
    return MixedBatches(train.y, keep, batch_size, share)
