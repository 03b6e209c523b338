"""Losses as pure functions of (batch, model output, weights).

Every function returns a dict of per-sample tensors of shape (B,); the key "loss" is the objective that
training minimises (the loop takes its batch mean). Reconstruction terms are negative log-likelihoods in
nats summed over the dimensions of one sample, so "loss" of a VAE is the negative ELBO per image
(the tutorial's 784*BCE + KL on MNIST). "bce" and "mse" are per-pixel means for comparison with Keras.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:  # losses judge model outputs but must not import the models (they import the losses)
    from vaelab.models.base import ModelOutput

LOG_2PI = math.log(2 * math.pi)


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1)  # (B, D)


def bernoulli_nll(x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """-log p(x | logits) summed over dims, (B,). x may be any value in [0, 1] (the usual BCE)."""
    return _flat(F.binary_cross_entropy_with_logits(logits, x, reduction="none")).sum(1)


def gaussian_nll(x: torch.Tensor, mean: torch.Tensor, sigma: float) -> torch.Tensor:
    """-log N(x | mean, sigma^2 I) summed over dims, (B,)."""
    d = x[0].numel()
    sq = _flat((x - mean) ** 2).sum(1)
    return 0.5 * sq / sigma**2 + d * (math.log(sigma) + 0.5 * LOG_2PI)


def recon_nll(x: torch.Tensor, recon: torch.Tensor, likelihood: str, sigma: float = 1.0) -> torch.Tensor:
    if likelihood == "bernoulli":
        return bernoulli_nll(x, recon)
    return gaussian_nll(x, recon, sigma)


def kl_standard_normal(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL( N(mean, exp(logvar)) || N(0, I) ) summed over latent dims, (B,). Closed form."""
    return _flat(0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar)).sum(1)


def pixel_metrics(x: torch.Tensor, recon: torch.Tensor, likelihood: str) -> dict[str, torch.Tensor]:
    """Per-pixel mean BCE (of the decoded probabilities) and MSE, per sample: comparable across models."""
    with torch.no_grad():
        mean = torch.sigmoid(recon) if likelihood == "bernoulli" else recon
        mse = _flat((x - mean) ** 2).mean(1)
        if likelihood == "bernoulli":
            bce = _flat(F.binary_cross_entropy_with_logits(recon, x, reduction="none")).mean(1)
        else:
            p = mean.clamp(1e-7, 1 - 1e-7)
            bce = _flat(F.binary_cross_entropy(p, x.clamp(0, 1), reduction="none")).mean(1)
    return {"bce": bce, "mse": mse}


def autoencoder_loss(x, out: ModelOutput, *, likelihood: str = "bernoulli", sigma: float = 1.0,
                     target: torch.Tensor | None = None, **_) -> dict[str, torch.Tensor]:
    """Reconstruction NLL of a deterministic autoencoder. `target` is the clean input (denoising)."""
    target = x if target is None else target
    recon = recon_nll(target, out.recon, likelihood, sigma)
    return {"loss": recon, "recon": recon, **pixel_metrics(target, out.recon, likelihood)}


def log_normal_diag(z: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """log N(z | mean, diag(exp(logvar))) summed over the latent dims. mean and logvar are (B, *latent);
    z may carry extra leading sample dims, (K, B, *latent) -> (K, B)."""
    latent_dims = mean.dim() - 1
    return (-0.5 * (LOG_2PI + logvar + (z - mean) ** 2 * torch.exp(-logvar))).flatten(-latent_dims).sum(-1)


def log_importance_weights(x: torch.Tensor, recon: torch.Tensor, z: torch.Tensor, mean: torch.Tensor,
                           logvar: torch.Tensor, likelihood: str, sigma: float = 1.0) -> torch.Tensor:
    """log w_k = log p(x|z_k) + log p(z_k) - log q(z_k|x) for K samples: recon (K, B, ...), z (K, B, ...)
    -> (K, B). The building block of the IWAE bound and of the importance-sampled log-likelihood."""
    k = z.shape[0]
    log_px_z = -recon_nll(x.expand(k, *x.shape).flatten(0, 1), recon.flatten(0, 1), likelihood, sigma)
    log_px_z = log_px_z.view(k, -1)
    log_pz = log_normal_diag(z, torch.zeros_like(mean), torch.zeros_like(logvar))
    log_qz = log_normal_diag(z, mean, logvar)
    return log_px_z + log_pz - log_qz


def iwae_bound(log_w: torch.Tensor) -> torch.Tensor:
    """log (1/K) sum_k w_k, computed stably with log-sum-exp: (K, B) -> (B,). K=1 gives the ELBO estimate."""
    return torch.logsumexp(log_w, dim=0) - math.log(log_w.shape[0])


def vae_loss(x, out: ModelOutput, *, likelihood: str = "bernoulli", sigma: float = 1.0, beta: float = 1.0,
             target: torch.Tensor | None = None, capacity: float | None = None, free_bits: float = 0.0,
             **_) -> dict[str, torch.Tensor]:
    """Negative ELBO with a β weight on the KL: recon + β·KL (β=1: the plain VAE).

    - capacity C (Burgess et al. 2018): recon + β·|KL − C| instead.
    - free_bits λ (Kingma et al. 2016): each latent dimension's batch-mean KL below λ nats counts as λ and
      gets no gradient, so the optimizer cannot buy reconstruction by closing those dimensions.
    - K > 1 posterior samples (out.recon is (K, B, ...), out.z is (K, B, ...)): the IWAE bound of Burda et
      al. 2015 replaces the ELBO; `recon` is then the mean over the K samples.
    """
    target = x if target is None else target
    post = out.posterior
    kl = post.kl()
    if out.recon.dim() == target.dim() + 1:  # K importance samples
        log_w = log_importance_weights(target, out.recon, out.z, post.mean, post.logvar, likelihood, sigma)
        bound = iwae_bound(log_w)
        k = out.recon.shape[0]
        recon = recon_nll(target.expand(k, *target.shape).flatten(0, 1), out.recon.flatten(0, 1),
                          likelihood, sigma).view(k, -1).mean(0)
        return {"loss": -bound, "recon": recon, "kl": kl, "elbo": -(recon + kl), "iwae": bound,
                **pixel_metrics(target, out.recon[0], likelihood)}
    recon = recon_nll(target, out.recon, likelihood, sigma)
    penalty = kl
    if free_bits > 0:
        kl_dims = 0.5 * (post.mean.pow(2) + post.logvar.exp() - 1.0 - post.logvar).flatten(1)  # (B, D)
        active = (kl_dims.detach().mean(0) >= free_bits).to(kl_dims.dtype)  # (D,)
        penalty = (kl_dims * active).sum(1) + free_bits * (1 - active).sum()
    if capacity is not None:
        penalty = (penalty - capacity).abs()
    return {"loss": recon + beta * penalty, "recon": recon, "kl": kl, "elbo": -(recon + kl),
            **pixel_metrics(target, out.recon, likelihood)}


def vqvae_loss(x, out: ModelOutput, *, likelihood: str = "bernoulli", sigma: float = 1.0, commitment: float = 0.25,
               target: torch.Tensor | None = None, **_) -> dict[str, torch.Tensor]:
    """The VQ-VAE objective of van den Oord et al. 2017 (eq. 3), per sample:

        recon + ||sg(z_e) - e||^2 + β ||z_e - sg(e)||^2        (β = `commitment`, sg = stop-gradient)

    with the squared distances summed over the code grid, as recon is summed over the pixels. `out.posterior`
    carries the encoder's output `z_e` and the chosen codes e as its `mean`; `out.recon` decoded the
    straight-through code, so the reconstruction's gradient reaches the encoder. The codebook term has a
    gradient only when the codebook is a parameter (vq_ema=False); under EMA updates the quantizer moves the
    codebook and the term is a constant, kept so that "loss" is the same quantity in both modes.
    "commitment" reports ||z_e - e||^2 without β.
    """
    target = x if target is None else target
    z_e, codes = out.posterior.z_e, out.posterior.mean  # (B, D, *grid) each
    recon = recon_nll(target, out.recon, likelihood, sigma)
    commit = _flat((z_e - codes.detach()) ** 2).sum(1)  # pulls the encoder to its codes
    codebook = _flat((z_e.detach() - codes) ** 2).sum(1)  # pulls the codes to the encoder (same value)
    return {"loss": recon + codebook + commitment * commit, "recon": recon, "commitment": commit,
            **pixel_metrics(target, out.recon, likelihood)}
