"""The validation pass: a model's loss terms on a dataset, with fixed noise.

`fit` validates with it after every epoch, and `vaelab.evaluation.evaluate` reports it on the test split (it
is re-exported there as `vaelab.evaluation.loss_terms`). It lives in the training layer because the loop needs
it: the evaluation layer sits above training and the loop must not reach up.
"""

from __future__ import annotations

import torch

from vaelab.config import PRECISIONS
from vaelab.errors import ConfigError
from vaelab.training.runtime import Meter, autocast, choose_precision, keep_freed_memory

EVAL_SEED = 1234  # fixed noise for stochastic terms, so evaluating twice gives the same numbers


def loss_terms(model, data, *, batch_size: int = 512, binarize: bool = False, seed: int = EVAL_SEED,
               per_sample: bool = False, dist=None, precision: str = "fp32") -> dict:
    """Mean (or, with per_sample=True, per-sample) loss terms of `model` on `data` (an ArrayDataset).

    Uses the model's own loss from the registry, in eval mode, under inference_mode, with a fixed seed for
    the posterior sample and the binarization, without touching the caller's random state. With `dist`
    (a training.distributed.Dist under torchrun) each rank evaluates its share and the means are global.
    precision="bf16" runs the forward pass as bf16 training does (autocast; the loss in fp32): what `fit`
    validates a bf16 run with; "auto" chooses by the device's instructions alone (runtime.choose_precision;
    training also times a step). The default fp32 is what `evaluate` reports.
    """
    if precision not in PRECISIONS:
        raise ConfigError(f"precision={precision!r} is unknown; choose one of {list(PRECISIONS)}", "evaluation")
    if precision == "auto":
        precision = choose_precision(next(model.parameters()).device)[0]

    keep_freed_memory()  # no page faults per batch (see there): each batch reuses the last one's freed memory

    was_training = model.training
    model.eval()
    meter, parts = Meter(), []
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.random.fork_rng(devices=[]), torch.inference_mode():
        torch.manual_seed(seed)
        for start in range(0, len(data), batch_size):
            idx = torch.arange(start, min(start + batch_size, len(data)))
            if dist is not None:
                idx = dist.shard(idx)
            device = next(model.parameters()).device
            x = data.batch(idx, binarize=binarize, generator=gen).to(device)
            cond = data.labels(idx) if model.capabilities.conditional else None
            cond = None if cond is None else cond.to(device)  # unlabelled data: a semi-supervised model hides y
            with autocast(precision, x):
                out = model(x, cond)
            terms = model.loss(x, out.float())
            if per_sample:
                parts.append({k: v.clone() for k, v in terms.items()})
            else:
                meter.add(terms)
    model.train(was_training)
    if per_sample:
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]} if parts else {}
    return meter.reduce(dist).means() if dist is not None else meter.means()


__all__ = ["EVAL_SEED", "loss_terms"]
