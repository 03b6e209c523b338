"""Evaluation: the loss terms of a model on a dataset (the test split by default)."""

from __future__ import annotations

import torch

EVAL_SEED = 1234  # fixed noise for stochastic terms, so evaluating twice gives the same numbers


def loss_terms(model, data, *, batch_size: int = 512, binarize: bool = False, seed: int = EVAL_SEED,
               per_sample: bool = False) -> dict:
    """Mean (or, with per_sample=True, per-sample) loss terms of `model` on `data` (an ArrayDataset).

    Uses the model's own loss from the registry, in eval mode, under inference_mode, with a fixed seed for
    the posterior sample and the binarization, without touching the caller's random state.
    """
    from vaelab.models import MODELS
    from vaelab.training.loop import Meter, loss_weights

    loss_fn = MODELS[model.config.model].loss
    weights = loss_weights(model)
    was_training = model.training
    model.eval()
    meter, parts = Meter(), []
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.random.fork_rng(devices=[]), torch.inference_mode():
        torch.manual_seed(seed)
        for start in range(0, len(data), batch_size):
            idx = torch.arange(start, min(start + batch_size, len(data)))
            x = data.batch(idx, binarize=binarize, generator=gen)
            cond = data.labels(idx) if model.conditional else None
            terms = loss_fn(x, model(x, cond), **weights)
            if per_sample:
                parts.append({k: v.clone() for k, v in terms.items()})
            else:
                meter.add(terms)
    model.train(was_training)
    if per_sample:
        return {k: torch.cat([p[k] for p in parts]) for k in parts[0]} if parts else {}
    return meter.means()


def evaluate(model, data, *, batch_size: int = 512, binarize: bool = False, seed: int = EVAL_SEED) -> dict:
    """The test-split report: every loss term (mean per sample) plus the number of samples.

    Keys: `loss` (the training objective per sample; for a VAE the negative ELBO in nats = the tutorial's
    784*BCE + KL on MNIST), `recon` (reconstruction NLL per sample, nats), `kl` (VAEs), `elbo`, and the
    per-pixel means `bce` and `mse`.
    """
    out = loss_terms(model, data, batch_size=batch_size, binarize=binarize, seed=seed)
    out["n"] = len(data)
    return out


__all__ = ["loss_terms", "evaluate"]
