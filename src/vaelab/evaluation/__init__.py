"""Evaluation: the loss terms of a model on a dataset (the test split by default)."""

from __future__ import annotations

import torch

EVAL_SEED = 1234  # fixed noise for stochastic terms, so evaluating twice gives the same numbers


def loss_terms(model, data, *, batch_size: int = 512, binarize: bool = False, seed: int = EVAL_SEED,
               per_sample: bool = False, dist=None, precision: str = "fp32") -> dict:
    """Mean (or, with per_sample=True, per-sample) loss terms of `model` on `data` (an ArrayDataset).

    Uses the model's own loss from the registry, in eval mode, under inference_mode, with a fixed seed for
    the posterior sample and the binarization, without touching the caller's random state. With `dist`
    (a training.distributed.Dist under torchrun) each rank evaluates its share and the means are global.
    precision="bf16" runs the forward pass as bf16 training does (autocast; the loss in fp32): what `fit`
    validates a bf16 run with. The default fp32 is what `evaluate` reports.
    """
    from vaelab.config import PRECISIONS
    from vaelab.errors import ConfigError
    from vaelab.training.loop import Meter, autocast, keep_freed_memory

    if precision not in PRECISIONS:
        raise ConfigError(f"precision={precision!r} is unknown; choose one of {list(PRECISIONS)}", "evaluation")

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
            cond = data.labels(idx).to(device) if model.capabilities.conditional else None
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


def evaluate(model, data, *, batch_size: int = 512, binarize: bool = False, seed: int = EVAL_SEED,
             nll_samples: int = 0, train_data=None, latent: bool = True) -> dict:
    """The test-split report, one flat dict of numbers (JSON-ready).

    - loss terms, mean per sample: `loss` (the training objective; for a VAE the negative ELBO in nats =
      the tutorial's 784*BCE + KL on MNIST), `recon` (reconstruction NLL, nats), `kl`, `elbo`, and the
      per-pixel means `bce`, `mse`; `elbo_bits_per_dim`; `psnr` (dB, of the posterior-mean reconstruction);
    - `nll`, `nll_se`, `nll_bits_per_dim` with nll_samples = K > 0: the importance-sampled -log p(x);
    - latent health (VAEs, latent=True): `kl_per_dim`, `active_units`, and `warning` on posterior collapse;
      for two stochastic layers (hvae) these are the top layer's, and `bottom_active_units` counts z1's;
    - with labelled data and `train_data` given: `linear_probe_accuracy` and `knn5_accuracy` on the latents;
    - a model with a classifier (m2) on labelled data: its `accuracy` and `error` (the fraction misclassified);
    - a VQ-VAE's code usage: `perplexity` of the chosen codes, `codes_used` (fraction of the codebook) and
      `dead_codes` (codes no sample chose).
    """
    import math

    from vaelab.evaluation.metrics import latent_health, layer_stats, posterior_stats, probe_accuracy, psnr

    out = loss_terms(model, data, batch_size=batch_size, binarize=binarize, seed=seed)
    if "error" in out:  # a model with a classifier q(y|x) (m2): judged on the labels of `data`
        if data.y is None:
            out.pop("error"), out.pop("classifier_nll", None)  # no labels to judge it by
        else:
            out["accuracy"] = 1.0 - out["error"]
    out["n"] = len(data)
    dims = math.prod(data.sample_shape)
    if "elbo" in out:
        out["elbo_bits_per_dim"] = -out["elbo"] / (dims * math.log(2))
    if data.is_image:
        values = []
        with torch.inference_mode():
            for start in range(0, len(data), batch_size):
                idx = torch.arange(start, min(start + batch_size, len(data)))
                x = data.batch(idx)
                cond = data.labels(idx) if model.capabilities.conditional else None
                values.append(psnr(x, model.reconstruct(x, cond)))
        out["psnr"] = float(torch.cat(values).clamp(max=100.0).mean())
    if nll_samples:
        from vaelab.evaluation.nll import importance_nll

        out.update(importance_nll(model, data, n_samples=nll_samples, binarize=binarize, seed=seed))
    if latent and model.capabilities.stochastic:
        layers = layer_stats(model, data, batch_size)  # {layer: (means, logvars)}; "" is the model's latent
        means = layers[""][0]
        out.update(latent_health(*layers[""]))
        for name, stats in layers.items():  # more stochastic layers (an hvae's bottom one): their KL is not to N(0, I)
            if name:
                health = latent_health(*stats)
                out[f"{name}_active_units"], out[f"{name}_latent_dims"] = health["active_units"], health["latent_dims"]
        if train_data is not None and data.y is not None and train_data.y is not None:
            z_train, _ = posterior_stats(model, train_data, batch_size)
            out.update(probe_accuracy(z_train.numpy(), train_data.y.numpy(), means.numpy(), data.y.numpy()))
    out.update(model.data_metrics(data, batch_size))  # the model's own (a VQ-VAE's code usage)
    return out


__all__ = ["loss_terms", "evaluate"]
