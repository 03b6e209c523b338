"""The test-split report of a trained model: `evaluate` (re-exported as `vaelab.evaluation.evaluate`)."""

from __future__ import annotations

import math

import torch

from vaelab.evaluation.metrics import (bits_convention, class_confusion, latent_health, layer_stats, posterior_stats,
                                      probe_accuracy, psnr, ssim)
from vaelab.evaluation.nll import importance_nll
from vaelab.training.validation import EVAL_SEED, loss_terms


def evaluate(model, data, *, batch_size: int = 512, binarize: bool = False, seed: int = EVAL_SEED,
             nll_samples: int = 0, nll_precision: str = "fp32", train_data=None, latent: bool = True) -> dict:
    """The test-split report, one flat dict of numbers (JSON-ready).

    - loss terms, mean per sample: `loss` (the training objective; for a VAE the negative ELBO in nats =
      the tutorial's 784*BCE + KL on MNIST), `recon` (reconstruction NLL, nats), `kl`, `elbo`, and the
      per-pixel means `bce`, `mse`; `psnr` (dB) and `ssim` of the posterior-mean reconstruction (images);
    - `nll`, `nll_se`, `nll_bits_per_dim` with nll_samples = K > 0: the importance-sampled -log p(x), its K
      decodings in `nll_precision` (fp32, or bf16 when asked: evaluation/nll.py);
    - `elbo_bits_per_dim`, `nll_bits_per_dim` and `bits_per_dim` (the NLL's with K > 0, else the ELBO's): bits
      per sub-pixel as the literature reports them, `bits_per_dim_convention` says how (metrics.bits_convention:
      exact for the discretized likelihoods on 8-bit data, + ln 256 per dim for a density of 8-bit pixels);
    - latent health (VAEs, latent=True): `kl_per_dim`, `active_units`, and `warning` on posterior collapse;
      for two stochastic layers (hvae) these are the top layer's, and `bottom_active_units` counts z1's;
    - with labelled data and `train_data` given: `linear_probe_accuracy` and `knn5_accuracy` on the latents;
    - a model with a classifier (m2) on labelled data: its `accuracy` and `error` (the fraction misclassified),
      and where it errs: `confusion` (rows the true class, columns the predicted), `class_error` and
      `most_confused` (metrics.class_confusion);
    - a VQ-VAE's code usage: `perplexity` of the chosen codes, `codes_used` (fraction of the codebook) and
      `dead_codes` (codes no sample chose).
    """
    out = loss_terms(model, data, batch_size=batch_size, binarize=binarize, seed=seed)
    if "error" in out:  # a model with a classifier q(y|x) (m2): judged on the labels of `data`
        if data.y is None:
            out.pop("error"), out.pop("classifier_nll", None)  # no labels to judge it by
        else:
            out["accuracy"] = 1.0 - out["error"]
            out.update(class_confusion(model, data, batch_size, seed))
    out["n"] = len(data)
    dims = math.prod(data.sample_shape)
    convention, offset = bits_convention(model.likelihood, data.batch(torch.arange(min(len(data), 1024))), binarize)
    to_bits = 1.0 / (dims * math.log(2))
    if "elbo" in out:
        out["elbo_bits_per_dim"] = (-out["elbo"] + dims * offset) * to_bits
    if data.is_image:
        values, similarity = [], []
        with torch.inference_mode():
            for start in range(0, len(data), batch_size):
                idx = torch.arange(start, min(start + batch_size, len(data)))
                x = data.batch(idx)
                cond = data.labels(idx) if model.capabilities.conditional else None
                x_hat = model.reconstruct(x, cond)
                values.append(psnr(x, x_hat))
                similarity.append(ssim(x, x_hat))
        out["psnr"] = float(torch.cat(values).clamp(max=100.0).mean())
        out["ssim"] = float(torch.cat(similarity).mean())
    if nll_samples:
        out.update(importance_nll(model, data, n_samples=nll_samples, binarize=binarize, seed=seed,
                                  precision=nll_precision))
        out["nll_bits_per_dim"] = (out["nll"] + dims * offset) * to_bits
    best = out.get("nll_bits_per_dim", out.get("elbo_bits_per_dim"))
    if best is not None:
        out["bits_per_dim"] = best
        out["bits_per_dim_convention"] = convention
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


__all__ = ["evaluate"]
