"""The variational autoencoder (Kingma & Welling 2014); β-VAE is this model with beta != 1."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vaelab.config import is_nonneg
from vaelab.losses import (Likelihood, Shaping, iwae_bound, kl_standard_normal_dims, log_importance_weights,
                           pixel_metrics, recon_nll, recon_nll_samples)
from vaelab.models.base import Autoencoder, Capabilities, ModelOutput, ModelSettings
from vaelab.models.registry import register


@dataclass(frozen=True)
class VAESettings(ModelSettings):
    beta: float = field(default=1.0, metadata={"help": "weight of the KL term (a beta-VAE when != 1)"})

    def problems(self, config) -> list[str]:
        if not is_nonneg(self.beta):
            return [f"beta={self.beta!r} must be a finite number >= 0"]
        return []


def vae_loss(x, out: ModelOutput, *, likelihood: Likelihood | str = "bernoulli", sigma: float = 1.0, beta: float = 1.0,
             target: torch.Tensor | None = None, capacity: float | None = None,
             free_bits: float = 0.0) -> dict[str, torch.Tensor]:
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
        recon = recon_nll_samples(target, out.recon, likelihood, sigma).mean(0)
        return {"loss": -bound, "recon": recon, "kl": kl, "elbo": -(recon + kl), "iwae": bound,
                **pixel_metrics(target, out.recon[0], likelihood)}
    recon = recon_nll(target, out.recon, likelihood, sigma)
    penalty = kl
    if free_bits > 0:
        kl_dims = kl_standard_normal_dims(post.mean, post.logvar).flatten(1)  # (B, D)
        active = (kl_dims.detach().mean(0) >= free_bits).to(kl_dims.dtype)  # (D,)
        penalty = (kl_dims * active).sum(1) + free_bits * (1 - active).sum()
    if capacity is not None:
        penalty = (penalty - capacity).abs()
    return {"loss": recon + beta * penalty, "recon": recon, "kl": kl, "elbo": -(recon + kl),
            **pixel_metrics(target, out.recon, likelihood)}


@register("vae", description="Variational autoencoder: Gaussian posterior, N(0, I) prior, loss recon + beta*KL.")
class VAE(Autoencoder):
    Settings = VAESettings
    capabilities = Capabilities(stochastic=True, samples=True)
    objective = staticmethod(vae_loss)
    loss_options = frozenset({"kl_schedule", "capacity", "free_bits", "iw_samples"})
    encoder_outputs = 2  # mean and log-variance

    def loss_weights(self, shaping: Shaping) -> dict:
        w = {**super().loss_weights(shaping), "beta": self.settings.beta * shaping.kl_scale}
        if shaping.capacity is not None:
            w["capacity"] = shaping.capacity
        if shaping.free_bits:
            w["free_bits"] = shaping.free_bits
        return w

    def training_problems(self, train) -> list[str]:
        out = super().training_problems(train)
        if train.iw_samples > 1 and self.settings.beta != 1 and "beta" not in self.iwae_options:
            # the IWAE bound has no separate KL term to weight: refuse what it would silently ignore
            out.insert(0, f"beta={self.settings.beta!r} does not apply to the IWAE bound "
                          f"(iw_samples={train.iw_samples}); drop it or train the ELBO (iw_samples=1)")
        return out

    def encode(self, x, condition=None):
        self._check_condition(condition)
        h = self.encoder(x)  # (B, 2 * latent_dim) or (B, 2 * C, h, w)
        return self._gaussian(h)
