"""The formulas every model's loss is built from, each written once: likelihoods, the Gaussian KL and
log-density, importance weights and the IWAE bound; and `Shaping`, what the training loop adds to a loss.

A model's own loss lives in its own file (vaelab/models/): a pure function of (batch, model output, weights)
that returns a dict of per-sample tensors of shape (B,); the key "loss" is the objective that training
minimises (the loop takes its batch mean). Reconstruction terms are negative log-likelihoods in nats summed
over the dimensions of one sample, so "loss" of a VAE is the negative ELBO per image (the tutorial's 784*BCE +
KL on MNIST). "bce" and "mse" are per-pixel means for comparison with Keras.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
import torch.nn.functional as F

LOG_2PI = math.log(2 * math.pi)


def flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1)  # (B, D)


def bernoulli_nll(x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """-log p(x | logits) summed over dims, (B,). x may be any value in [0, 1] (the usual BCE)."""
    return flat(F.binary_cross_entropy_with_logits(logits, x, reduction="none")).sum(1)


def gaussian_nll(x: torch.Tensor, mean: torch.Tensor, sigma: float) -> torch.Tensor:
    """-log N(x | mean, sigma^2 I) summed over dims, (B,)."""
    d = x[0].numel()
    sq = flat((x - mean) ** 2).sum(1)
    return 0.5 * sq / sigma**2 + d * (math.log(sigma) + 0.5 * LOG_2PI)


def recon_nll(x: torch.Tensor, recon: torch.Tensor, likelihood: str, sigma: float = 1.0) -> torch.Tensor:
    if likelihood == "bernoulli":
        return bernoulli_nll(x, recon)
    return gaussian_nll(x, recon, sigma)


def recon_nll_samples(x: torch.Tensor, recon: torch.Tensor, likelihood: str, sigma: float = 1.0) -> torch.Tensor:
    """-log p(x | recon_k) of K decodings of each x: x (B, ...), recon (K, B, ...) -> (K, B)."""
    k = recon.shape[0]
    return recon_nll(x.expand(k, *x.shape).flatten(0, 1), recon.flatten(0, 1), likelihood, sigma).view(k, -1)


def kl_standard_normal_dims(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL( N(mean, exp(logvar)) || N(0, 1) ) of each latent dimension, shaped like mean. Closed form."""
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar)


def kl_standard_normal(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL( N(mean, exp(logvar)) || N(0, I) ) summed over latent dims, (B,). Closed form."""
    return flat(kl_standard_normal_dims(mean, logvar)).sum(1)


def pixel_metrics(x: torch.Tensor, recon: torch.Tensor, likelihood: str) -> dict[str, torch.Tensor]:
    """Per-pixel mean BCE (of the decoded probabilities) and MSE, per sample: comparable across models."""
    with torch.no_grad():
        mean = torch.sigmoid(recon) if likelihood == "bernoulli" else recon
        mse = flat((x - mean) ** 2).mean(1)
        if likelihood == "bernoulli":
            bce = flat(F.binary_cross_entropy_with_logits(recon, x, reduction="none")).mean(1)
        else:
            p = mean.clamp(1e-7, 1 - 1e-7)
            bce = flat(F.binary_cross_entropy(p, x.clamp(0, 1), reduction="none")).mean(1)
    return {"bce": bce, "mse": mse}


def log_normal_diag(z: torch.Tensor, mean: torch.Tensor | float = 0.0, logvar: torch.Tensor | None = None,
                    event_dims: int | None = None) -> torch.Tensor:
    """log N(z | mean, diag(exp(logvar))) summed over the latent dims; N(0, I) when logvar is None (and mean 0).

    `event_dims` trailing dims make one latent; by default all of mean's but its first (the batch dim), so mean
    and logvar (B, *latent) score z (B, *latent) or (K, B, *latent) -> (B,) or (K, B). Vectors with any leading
    dims take event_dims=1."""
    if event_dims is None:
        event_dims = mean.dim() - 1
    sq = (z - mean) ** 2
    if logvar is None:
        density = -0.5 * (LOG_2PI + sq)
    else:
        density = -0.5 * (LOG_2PI + logvar + sq * torch.exp(-logvar))
    return density.flatten(-event_dims).sum(-1)


def log_importance_weights(x: torch.Tensor, recon: torch.Tensor, z: torch.Tensor, mean: torch.Tensor,
                           logvar: torch.Tensor, likelihood: str, sigma: float = 1.0) -> torch.Tensor:
    """log w_k = log p(x|z_k) + log p(z_k) - log q(z_k|x) for K samples: recon (K, B, ...), z (K, B, ...)
    -> (K, B). The building block of the IWAE bound and of the importance-sampled log-likelihood."""
    log_px_z = -recon_nll_samples(x, recon, likelihood, sigma)
    log_pz = log_normal_diag(z, event_dims=mean.dim() - 1)
    log_qz = log_normal_diag(z, mean, logvar)
    return log_px_z + log_pz - log_qz


def iwae_bound(log_w: torch.Tensor) -> torch.Tensor:
    """log (1/K) sum_k w_k, computed stably with log-sum-exp: (K, B) -> (B,). K=1 gives the ELBO estimate."""
    return torch.logsumexp(log_w, dim=0) - math.log(log_w.shape[0])


@dataclass(frozen=True)
class Shaping:
    """What the training loop adds to a model's own loss settings at one optimizer step. A model declares which
    of these its loss honours (Autoencoder.training_problems refuses the others); evaluation uses the default.

    kl_scale: the KL schedule's factor on the model's β (a warm-up or cyclical annealing), in [0, 1].
    capacity: Burgess et al.'s target KL C at this step, in nats; None = off.
    free_bits: nats per latent dimension below which the KL is not penalised; 0 = off.
    label_weight: maps the model's classifier weight (M2's α, in the paper's units) to the per-sample weight of
        this batch mix of labelled and hidden-label samples (data/semisupervised.py); identity without hidden
        labels.
    dataset_size: samples in the training set (estimators that need it, such as minibatch-weighted sampling).
    """

    kl_scale: float = 1.0
    capacity: float | None = None
    free_bits: float = 0.0
    label_weight: Callable[[float], float] | None = None
    dataset_size: int = 0

    def classifier_weight(self, alpha: float) -> float:
        return alpha if self.label_weight is None else self.label_weight(alpha)


NO_SHAPING = Shaping()
