"""FactorVAE (Kim & Mnih 2018, "Disentangling by Factorising", https://arxiv.org/abs/1802.05983).

The VAE's loss plus γ times the total correlation of the aggregate posterior, TC = KL(q(z) || q̄(z)) with
q̄(z) = Π_j q(z_j), which no minibatch estimates in closed form. A discriminator D, trained beside the VAE, tells
codes drawn from q(z) (class 0) from codes whose dimensions were shuffled independently across a batch, which
are draws from q̄(z) (class 1). At its optimum D(z) = q(z) / (q(z) + q̄(z)), so (the density-ratio trick)

    TC = E_q(z)[log q(z) / q̄(z)] ≈ E_q(z)[log D(z) / (1 − D(z))] = E_q(z)[logit_0(z) − logit_1(z)],

with D(z) the softmax probability of class 0 (the paper's two-logit D). Per training step (paper, Algorithm 2):
1. the VAE steps on recon + β·KL + γ·TC(z) (β = 1 in the paper), with z ~ q(z|x) of the batch and D held
   fixed: its gradient moves the encoder only (`Discriminator.forward(frozen=True)`);
2. D steps on its cross-entropy with an Adam of its own (the paper's lr 1e-4, betas (0.5, 0.9)), through the
   training loop's hook for networks with optimizers of their own (models.base.Auxiliary). The paper trains the
   VAE at the same lr, 1e-4; a VAE trained faster outruns a D left at 1e-4, so `disc_lr` sets D's.

The paper draws a second batch for D's permuted codes, so that real and permuted codes come from independent
draws. Here the step's own batch is split in halves: its first ⌊B/2⌋ codes are D's real samples, and the
others, each dimension permuted across them, its permuted samples (the paper's D step at half its batch size,
with no second encoder pass and no change to the data order; disentanglement_lib instead permutes the same
codes it shows as real). The codes are those the VAE step used (computed before its update), detached.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from vaelab.config import is_int, is_nonneg, is_pos
from vaelab.losses import Likelihood, Shaping
from vaelab.models.base import Auxiliary, ModelOutput
from vaelab.models.registry import register
from vaelab.models.vae import VAE, VAESettings, vae_loss

# the discriminator's optimizer: Adam with the paper's settings (a constant lr: the loop's schedule is the VAE's);
# the lr is a setting, disc_lr, with the paper's value as its default
DISCRIMINATOR_LR = 1e-4
DISCRIMINATOR_BETAS = (0.5, 0.9)


@dataclass(frozen=True)
class FactorVAESettings(VAESettings):
    gamma: float = field(default=10.0, metadata={
        "help": "weight of the total-correlation penalty (the paper and Locatello et al. 2019 sweep 10, 20, 30, "
                "40, 50, 100)"})
    # the paper's width. 256 units cost a fifteenth of the arithmetic, but on the dSprites benchmark's seeds 0-2
    # (docs/results.md) they scored a lower DCI (0.051 against 0.079) and FactorVAE score; 256 is a setting
    disc_width: int = field(default=1000, metadata={
        "help": "units in each hidden layer of the discriminator (the paper's 1000)"})
    disc_layers: int = field(default=6, metadata={
        "help": "hidden layers of the discriminator, LeakyReLU(0.2) each (the paper: 6)"})
    disc_lr: float = field(default=DISCRIMINATOR_LR, metadata={
        "help": "the discriminator's Adam learning rate, constant (the paper: 1e-4, the same as its VAE's)"})

    def problems(self, config) -> list[str]:
        out = super().problems(config)
        if not is_nonneg(self.gamma):
            out.append(f"gamma={self.gamma!r} must be a finite number >= 0 (the weight of the total correlation)")
        for name in ("disc_width", "disc_layers"):
            value = getattr(self, name)
            if not is_int(value) or value < 1:
                out.append(f"{name}={value!r} must be an integer >= 1 (the paper's discriminator: 6 layers of "
                           "1000 units)")
        if not is_pos(self.disc_lr):
            out.append(f"disc_lr={self.disc_lr!r} must be a finite number > 0 (the discriminator's learning rate; "
                       "the paper: 1e-4)")
        return out


@dataclass
class FactorOutput(ModelOutput):
    """The VAE's record, and the discriminator's estimate of the total correlation at each code."""

    tc: torch.Tensor  # (B,) or (K, B): log D(z) / (1 − D(z)) = logit_0 − logit_1 at z, with D held fixed

    def float(self) -> FactorOutput:
        return FactorOutput(recon=self.recon.float(), z=self.z.float(), posterior=self.posterior.float(),
                            tc=self.tc.float())


def factorvae_loss(x, out: FactorOutput, *, likelihood: Likelihood | str = "bernoulli",
                   sigma: float = 1.0, beta: float = 1.0,
                   gamma: float = 10.0, target: torch.Tensor | None = None, capacity: float | None = None,
                   free_bits: float = 0.0) -> dict[str, torch.Tensor]:
    """The VAE's loss (models/vae.py vae_loss: recon + β·KL, and its capacity and free bits) plus γ·TC, TC the
    discriminator's log-ratio at each sample's code; `tc` is reported on its own.

    With K importance samples (out.recon (K, B, ...), as the IWAE bound of `vaelab evaluate` and anomaly scores
    ask for) the terms are the VAE's alone: the bound of the generative model, which has no TC term."""
    terms = vae_loss(x, out, likelihood=likelihood, sigma=sigma, beta=beta, target=target, capacity=capacity,
                     free_bits=free_bits)
    if out.recon.dim() == (x if target is None else target).dim() + 1:  # K importance samples
        return terms
    terms["loss"] = terms["loss"] + gamma * out.tc
    terms["tc"] = out.tc
    return terms


def permute_dims(z: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Each column of z (B, D) shuffled across the batch by a permutation of its own, drawn independently: rows
    of the result are draws from the product of the batch's marginals (the paper's Algorithm 1)."""
    order = torch.rand(z.shape, generator=generator, device=z.device).argsort(dim=0, stable=True)  # (B, D)
    return z.gather(0, order)


def discriminator_loss(logits: torch.Tensor, n_real: int) -> dict[str, torch.Tensor]:
    """Per-row terms, (B,) each, of the discriminator on logits (B, 2) whose first `n_real` rows are codes drawn
    from q(z) (class 0) and the rest permuted codes (class 1): "loss" is the cross-entropy, −log D(z) on the
    first rows and −log(1 − D(z)) on the others (D(z) = softmax(logits)[0]), "accuracy" 1 where D is right."""
    labels = (torch.arange(len(logits), device=logits.device) >= n_real).long()
    return {"loss": F.cross_entropy(logits, labels, reduction="none"),
            "accuracy": (logits.argmax(1) == labels).to(logits.dtype)}


class Discriminator(nn.Module):
    """D: codes (..., D) -> two logits (..., 2), [drawn from q(z), drawn from the product of its marginals]: an MLP
    of `layers` hidden layers of `width` units with LeakyReLU(0.2) (the paper's 6 of 1000 by
    default) and PyTorch's default initialization."""

    def __init__(self, d: int, width: int, layers: int):
        super().__init__()
        sizes = [d] + [width] * layers
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        self.head = nn.Linear(sizes[-1], 2)

    def forward(self, z: torch.Tensor, frozen: bool = False) -> torch.Tensor:
        """The logits (..., 2). frozen=True uses the weights as constants: gradients reach z, never D (the VAE's
        step, which must not train its own critic)."""
        h = z
        for layer in (*self.hidden, self.head):
            w, b = (layer.weight.detach(), layer.bias.detach()) if frozen else (layer.weight, layer.bias)
            h = F.linear(h, w, b)
            if layer is not self.head:
                h = F.leaky_relu(h, 0.2)
        return h


@register("factorvae", description="FactorVAE (Kim & Mnih 2018): a VAE whose loss adds gamma times the total "
                                   "correlation of its codes, estimated by a discriminator trained beside it.")
class FactorVAE(VAE):
    Settings = FactorVAESettings
    objective = staticmethod(factorvae_loss)
    term_meanings = {"tc": "total correlation per sample, the discriminator's log D(z) / (1 - D(z)), nats",
                     "discriminator_loss": "the discriminator's cross-entropy (log 2 = 0.693 at chance)",
                     "discriminator_accuracy": "fraction of codes the discriminator tells right (0.5 at chance)"}
    # the TC penalty is an ELBO-side term with no IWAE form: training the IWAE bound is refused
    loss_options = VAE.loss_options - {"iw_samples"}

    def __init__(self, config, *, encoder: nn.Module | None = None, decoder: nn.Module | None = None):
        super().__init__(config, encoder=encoder, decoder=decoder)
        settings = self.settings
        # built after the VAE's networks: a FactorVAE and a VAE from the same seed start with the same VAE
        self.discriminator = Discriminator(self.latent_size, settings.disc_width, settings.disc_layers)

    def loss_weights(self, shaping: Shaping) -> dict:
        return {**super().loss_weights(shaping), "gamma": self.settings.gamma}

    def training_problems(self, train) -> list[str]:
        if train.iw_samples > 1:  # a more precise reason than the base's
            return [f"iw_samples={train.iw_samples} does not apply to model {self.config.model!r}: its total-"
                    "correlation penalty has no IWAE form; train the ELBO (iw_samples=1)",
                    *super().training_problems(train.replace(iw_samples=1))]
        return super().training_problems(train)

    def forward(self, x, condition=None, n_samples: int = 1) -> FactorOutput:
        out = super().forward(x, condition, n_samples)
        codes = out.z.flatten(out.z.dim() - len(self.latent_shape))  # (B, D) or (K, B, D)
        logits = self.discriminator(codes, frozen=True)
        return FactorOutput(recon=out.recon, z=out.z, posterior=out.posterior, tc=logits[..., 0] - logits[..., 1])

    def auxiliaries(self) -> dict[str, Auxiliary]:
        return {"discriminator": Auxiliary(self.discriminator, lr=self.settings.disc_lr, betas=DISCRIMINATOR_BETAS)}

    def auxiliary_loss(self, name: str, out: ModelOutput) -> dict[str, torch.Tensor]:
        """The discriminator's terms on the step's codes: the first half as drawn, the second half permuted."""
        if name != "discriminator":
            return super().auxiliary_loss(name, out)
        z = out.z.detach().flatten(1)  # (B, D)
        n_real = len(z) // 2
        logits = self.discriminator(torch.cat([z[:n_real], permute_dims(z[n_real:])]))  # (B, 2)
        return discriminator_loss(logits, n_real)
