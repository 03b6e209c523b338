"""DIP-VAE: Kumar, Sattigeri and Balakrishnan (2018), "Variational Inference of Disentangled Latent Concepts from
Unlabeled Observations", ICLR 2018, https://arxiv.org/abs/1711.00848.

A VAE whose aggregate posterior q(z) = E_x[q(z|x)] is pulled toward the factorised prior N(0, I) by matching
moments: a covariance C of the codes is pushed toward the identity,

    loss = -ELBO + λ_od · Σ_{i≠j} C_ij²  +  λ_d · Σ_i (C_ii - 1)²

- DIP-VAE-I  (variant "i"):  C = Cov_x[μ(x)], the covariance of the encoder means;
- DIP-VAE-II (variant "ii"): C = Cov_q(z)[z] = Cov_x[μ(x)] + E_x[diag σ²(x)], the aggregate posterior's
  covariance (the law of total covariance).

The expectations over x are taken over the batch (the covariance with 1/B, as in disentanglement_lib). Defaults:
λ_od = 10, and λ_d = 10·λ_od for DIP-VAE-I, λ_d = λ_od for DIP-VAE-II: the rule for λ_d that Locatello et al.
(2019) and disentanglement_lib take from the paper (they sweep λ_od over 1, 2, 5, 10, 20, 50). lambda_d unset
(None) applies the rule, so --variant ii alone or a new --lambda-od moves λ_d with it; a number overrides it.

The penalty is a statistic of the batch, one number: the per-sample "loss" carries it whole on every sample, so
the batch mean of "loss" (what the training loop minimises) is the batch objective -ELBO + penalty; `dip_od` and
`dip_d` report the two sums, unweighted, the same on every sample of a batch. Under DDP each process computes the
covariance on its own share of the global batch, and the gradients average those per-process penalties
(weighted by their shares' sizes): the penalty of a global batch B split over W processes is that of W batches
of B/W. The validation pass and `vaelab evaluate` compute it on each evaluation batch, as they do the loss.

The -ELBO part is the VAE's (models/vae.py vae_loss), so DIP-VAE honours the VAE's training options: the KL
schedule, capacity, free bits, and the IWAE bound (iw_samples > 1, the penalty added to -IWAE).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vaelab.config import is_nonneg
from vaelab.errors import VaelabError
from vaelab.losses import Likelihood, Shaping
from vaelab.models.base import Autoencoder, Capabilities, ModelOutput, ModelSettings
from vaelab.models.registry import register
from vaelab.models.vae import vae_loss

VARIANTS = ("i", "ii")  # DIP-VAE-I (the encoder means' covariance), DIP-VAE-II (the aggregate posterior's)
DIAGONAL_FACTOR = {"i": 10.0, "ii": 1.0}  # λ_d / λ_od of each variant (module doc)


@dataclass(frozen=True)
class DIPVAESettings(ModelSettings):
    variant: str = field(default="i", metadata={"choices": VARIANTS,
        "help": "i (DIP-VAE-I: the covariance of the encoder means) or ii (DIP-VAE-II: of the aggregate "
                "posterior, means' covariance + mean variance) is pushed toward the identity"})
    lambda_od: float = field(default=10.0, metadata={
        "help": "weight λ_od of the squared off-diagonal covariances"})
    lambda_d: float | None = field(default=None, metadata={
        "help": "weight λ_d of the squared distances of the variances from 1 (unset: the paper's "
                "10 * lambda_od for variant i, lambda_od for ii)"})

    def problems(self, config) -> list[str]:
        out = []
        if self.variant not in VARIANTS:
            out.append(f"variant={self.variant!r} is unknown; choose 'i' (DIP-VAE-I: the covariance of the encoder "
                       "means) or 'ii' (DIP-VAE-II: the covariance of the aggregate posterior)")
        if not is_nonneg(self.lambda_od):
            out.append(f"lambda_od={self.lambda_od!r} must be a finite number >= 0")
        if self.lambda_d is not None and not is_nonneg(self.lambda_d):
            out.append(f"lambda_d={self.lambda_d!r} must be a finite number >= 0, or unset (None) for the "
                       "paper's rule")
        return out

    @property
    def diagonal_weight(self) -> float:
        """λ_d: the setting, or the paper's rule for the variant when it is unset."""
        return self.lambda_d if self.lambda_d is not None else DIAGONAL_FACTOR[self.variant] * self.lambda_od


def dip_covariance(mean: torch.Tensor, logvar: torch.Tensor, variant: str) -> torch.Tensor:
    """The batch's covariance C (D, D) that DIP-VAE pushes toward I (module doc); mean, logvar (B, *latent)."""
    if variant not in VARIANTS:
        raise VaelabError(f"variant={variant!r} is unknown; choose 'i' or 'ii'")
    mu = mean.flatten(1)  # (B, D)
    centred = mu - mu.mean(0)
    cov = centred.T @ centred / len(mu)  # Cov_x[μ(x)], (D, D)
    if variant == "ii":
        cov = cov + torch.diag(logvar.flatten(1).exp().mean(0))  # + E_x[diag σ²(x)]
    return cov


def dipvae_loss(x, out: ModelOutput, *, likelihood: Likelihood | str = "bernoulli",
                sigma: float = 1.0, beta: float = 1.0,
                capacity: float | None = None, free_bits: float = 0.0, variant: str = "i", lambda_od: float = 10.0,
                lambda_d: float = 100.0, target: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The VAE's loss (vae_loss: beta, capacity and free_bits are the training loop's KL shaping) plus the DIP
    penalty λ_od·dip_od + λ_d·dip_d of the batch, on every sample (module doc)."""
    terms = vae_loss(x, out, likelihood=likelihood, sigma=sigma, beta=beta, target=target, capacity=capacity,
                     free_bits=free_bits)
    post = out.posterior
    cov = dip_covariance(post.mean, post.logvar, variant)
    diag = torch.diagonal(cov)
    off_diagonal = (cov - torch.diag(diag)).pow(2).sum()  # Σ_{i≠j} C_ij²
    on_diagonal = (diag - 1).pow(2).sum()  # Σ_i (C_ii - 1)²
    batch = len(post.mean)
    return {**terms, "loss": terms["loss"] + lambda_od * off_diagonal + lambda_d * on_diagonal,
            "dip_od": off_diagonal.expand(batch), "dip_d": on_diagonal.expand(batch)}


@register("dipvae", description="DIP-VAE (Kumar et al. 2018): the VAE plus a penalty pushing a covariance to the "
                                "identity, of the encoder means (--variant i) or of the aggregate posterior (ii), "
                                "weights --lambda-od (10) and --lambda-d (10x or 1x lambda-od).")
class DIPVAE(Autoencoder):
    Settings = DIPVAESettings
    capabilities = Capabilities(stochastic=True, samples=True)
    objective = staticmethod(dipvae_loss)
    term_meanings = {"dip_od": "sum of the squared off-diagonal entries of the batch covariance DIP-VAE pushes to I",
                     "dip_d": "sum of the squared distances of that covariance's diagonal from 1"}
    loss_options = frozenset({"kl_schedule", "capacity", "free_bits", "iw_samples"})  # the VAE's, through vae_loss
    encoder_outputs = 2  # mean and log-variance

    def loss_weights(self, shaping: Shaping) -> dict:
        s = self.settings
        w = {**super().loss_weights(shaping), "beta": shaping.kl_scale, "variant": s.variant,
             "lambda_od": s.lambda_od, "lambda_d": s.diagonal_weight}
        if shaping.capacity is not None:
            w["capacity"] = shaping.capacity
        if shaping.free_bits:
            w["free_bits"] = shaping.free_bits
        return w

    def encode(self, x, condition=None):
        self._check_condition(condition)
        return self._gaussian(self.encoder(x))  # (B, 2 * latent_dim) or (B, 2 * C, h, w) -> mean, logvar
