"""A VAE with two stochastic layers: the two-layer model of Burda, Grosse and Salakhutdinov (2015), "Importance
Weighted Autoencoders", https://arxiv.org/abs/1509.00519, section 5, with networks of any size.

Generative model: z2 ~ N(0, I), z1 ~ p(z1 | z2) = N(mu(z2), sigma^2(z2)), x ~ p(x | z1) (the decoder).
Inference, bottom-up: q(z1 | x) (the encoder) and q(z2 | z1). The second layer gives the prior over z1 a learned,
non-Gaussian shape, the first route the IWAE paper takes below 84 nats on MNIST (85.33 as a VAE, 83.89 with the
IWAE bound at K=5, against 86.76 and 85.54 for one layer).

The networks: the encoder and decoder between x and z1 are the VAE's (`arch` mlp, conv or resnet, `hidden`,
`latent_dim` = the size of z1); q(z2 | z1) and p(z1 | z2) are MLPs with `hidden2` layers and ReLU (none: linear maps),
`latent2_dim` = the size of z2 (0: half of latent_dim). The model's latent, what `sample`, `manifold`,
`interpolate` and `traverse` walk, is the top layer z2, the one with the N(0, I) prior: `decode(z2)` decodes the
mean of p(z1 | z2), `sample` draws z1 as well (ancestral sampling). `encode(x)` is q(z2 | z1) at z1 = the mean of
q(z1 | x), the top layer's code along the posterior's mean path; `reconstruct` decodes the mean of q(z1 | x). The
losses use the exact two-layer densities (losses.hvae_loss), and so does the importance-sampled likelihood
(`importance_sampler`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from vaelab.config import is_int, is_nonneg
from vaelab.losses import (Likelihood, Shaping, iwae_bound, kl_standard_normal, log_normal_diag, pixel_metrics,
                           recon_nll_samples)
from vaelab.models.base import Autoencoder, Capabilities, DiagonalGaussian, ModelOutput, ModelSettings
from vaelab.models.nets import _dense, _init_like_keras, activation
from vaelab.models.registry import register


@dataclass(frozen=True)
class HVAESettings(ModelSettings):
    beta: float = field(default=1.0, metadata={"help": "weight of the KL term (a beta-VAE when != 1; with "
                                                       "--iw-samples K it tempers each importance weight)"})
    latent2_dim: int = field(default=0, metadata={
        "help": "size of the second (top) stochastic layer z2, the one with the N(0, I) prior (0 = half of "
                "--latent-dim)"})
    hidden2: tuple[int, ...] = field(default=(), metadata={
        "help": "dense layer sizes of q(z2|z1) and p(z1|z2), comma-separated (e.g. 256,256; '' for linear maps)"})

    def problems(self, config) -> list[str]:
        out = []
        if not is_nonneg(self.beta):
            out.append(f"beta={self.beta!r} must be a finite number >= 0")
        if not is_int(self.latent2_dim) or self.latent2_dim < 0:
            out.append(f"latent2_dim={self.latent2_dim!r} must be an integer >= 0 (the size of the hierarchical "
                       "VAE's second stochastic layer)")
        if not all(is_int(v) and v >= 1 for v in self.hidden2):
            out.append(f"hidden2={list(self.hidden2)!r} must be a list of positive integers")
        if config.arch == "conv-pool":
            out.append("model='hvae' needs a vector latent z1: use arch 'mlp' or 'conv', not 'conv-pool'")
        return out


@dataclass
class HVAEOutput(ModelOutput):
    """The record of `HVAE.forward`: recon decodes z1; `z` is z2 and `posterior` q(z1 | x). With K samples, recon,
    z, z1, top and prior1 lead with K; the posterior q(z1 | x) is shared."""

    z1: torch.Tensor  # (B, L1) or (K, B, L1)
    top: DiagonalGaussian  # q(z2 | z1), over each sample of z1
    prior1: DiagonalGaussian  # p(z1 | z2), over each sample of z2

    def float(self) -> HVAEOutput:
        return HVAEOutput(recon=self.recon.float(), z=self.z.float(), posterior=self.posterior.float(),
                          z1=self.z1.float(), top=self.top.float(), prior1=self.prior1.float())

    def unsqueezed(self) -> HVAEOutput:
        """The one-sample record with a leading sample dim of 1 (as a K = 1 draw)."""
        g = lambda d: DiagonalGaussian(d.mean[None], d.logvar[None])  # noqa: E731
        return HVAEOutput(recon=self.recon[None], z=self.z[None], posterior=self.posterior, z1=self.z1[None],
                          top=g(self.top), prior1=g(self.prior1))


def hvae_log_parts(x: torch.Tensor, out: HVAEOutput, likelihood: Likelihood | str,
                   sigma: float = 1.0) -> dict[str, torch.Tensor]:
    """The log-densities of a two-layer VAE's samples, (K, B) each: log p(x|z1), log p(z1|z2), log p(z2),
    log q(z1|x), log q(z2|z1). out.recon is (K, B, ...); z1, z2 and the Gaussians over them carry the same
    leading (K, B) (q(z1|x) only (B, ...): it is shared by the K samples)."""
    log_px = -recon_nll_samples(x, out.recon, likelihood, sigma)
    q1, q2, p1 = out.posterior, out.top, out.prior1
    return {"log_px": log_px, "log_p1": log_normal_diag(out.z1, p1.mean, p1.logvar, event_dims=1),
            "log_p2": log_normal_diag(out.z, event_dims=1),
            "log_q1": log_normal_diag(out.z1, q1.mean, q1.logvar, event_dims=1),
            "log_q2": log_normal_diag(out.z, q2.mean, q2.logvar, event_dims=1)}


def hvae_log_weights(x: torch.Tensor, out: HVAEOutput, likelihood: Likelihood | str,
                     sigma: float = 1.0) -> torch.Tensor:
    """log w_k = log p(x, z1_k, z2_k) - log q(z1_k, z2_k | x), (K, B): the IWAE bound's and the importance-sampled
    likelihood's building block for the two-layer model."""
    return _joint_minus_proposal(hvae_log_parts(x, out, likelihood, sigma))


def _joint_minus_proposal(t: dict[str, torch.Tensor]) -> torch.Tensor:
    return t["log_px"] + t["log_p1"] + t["log_p2"] - t["log_q1"] - t["log_q2"]


def hvae_loss(x, out: HVAEOutput, *, likelihood: Likelihood | str = "bernoulli", sigma: float = 1.0, beta: float = 1.0,
              target: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The two-stochastic-layer VAE (the model below): p(z2) p(z1|z2) p(x|z1) with q(z1|x) q(z2|z1), per sample.

    - one sample: the negative ELBO recon + β·KL, with KL = E_q[log q(z1|x) - log p(z1|z2)] + KL(q(z2|z1) || N(0, I)),
      the first term by its one-sample estimate and the second in closed form (it has one given z1);
    - K > 1 samples (out.recon is (K, B, ...)): the IWAE bound -log (1/K) Σ_k w_k (Burda et al. 2015, whose
      two-layer MNIST model this is); `recon` and `kl` are then the means of their one-sample estimates. A β < 1
      (`--kl-schedule linear`: a warm-up) weights log p(z1, z2) - log q(z1, z2 | x) in every log w_k by β; without
      a warm-up the top layer of a wide model closes in the first epoch (its KL stays below 0.004 nats).
    """
    target = x if target is None else target
    single = out.recon.dim() == target.dim()
    if single:  # the K = 1 record: give it its leading sample dim
        out = out.unsqueezed()
    t = hvae_log_parts(target, out, likelihood, sigma)
    recon = -t["log_px"].mean(0)
    pixels = pixel_metrics(target, out.recon[0], likelihood)
    if single:
        q2 = out.top
        kl_top = kl_standard_normal(q2.mean[0], q2.logvar[0])
        kl = (t["log_q1"] - t["log_p1"])[0] + kl_top
        return {"loss": recon + beta * kl, "recon": recon, "kl": kl, "kl_top": kl_top, "elbo": -(recon + kl),
                **pixels}
    bound = iwae_bound(_joint_minus_proposal(t))
    kl_k = t["log_q1"] + t["log_q2"] - t["log_p1"] - t["log_p2"]  # (K, B)
    kl = kl_k.mean(0)
    # β < 1 (a KL warm-up) tempers each weight's prior-over-posterior part: log p(x|z1) - β·kl_k; β = 1 is the bound
    loss = -bound if beta == 1 else -iwae_bound(t["log_px"] - beta * kl_k)
    return {"loss": loss, "recon": recon, "kl": kl, "elbo": -(recon + kl), "iwae": bound, **pixels}



def _mlp(sizes: list[int], out: int, act: type[nn.Module]) -> nn.Sequential:
    net = nn.Sequential(*_dense(sizes, act), nn.Linear(sizes[-1], out))
    _init_like_keras(net)
    return net


@register("hvae", description="VAE with two stochastic layers (Burda et al.'s): p(z2) p(z1|z2) p(x|z1), q(z1|x) "
                              "q(z2|z1); --latent2-dim and --hidden2 set the top layer; train the IWAE bound with "
                              "--iw-samples K.")
class HVAE(Autoencoder):
    Settings = HVAESettings
    capabilities = Capabilities(stochastic=True, samples=True)
    objective = staticmethod(hvae_loss)
    loss_options = frozenset({"kl_schedule", "iw_samples"})
    iwae_options = frozenset({"kl_schedule", "beta"})  # β and its warm-up temper the importance weights
    encoder_outputs = 2  # q(z1 | x): mean and log-variance
    custom_networks = False  # its networks between the layers (up, down) are its own

    def __init__(self, config):
        super().__init__(config)
        l1, h = config.latent_dim, list(self.settings.hidden2)
        l2 = self.settings.latent2_dim or max(1, l1 // 2)
        act = activation(config)
        self.up = _mlp([l1, *h], 2 * l2, act)  # q(z2 | z1)
        self.down = _mlp([l2, *h[::-1]], 2 * l1, act)  # p(z1 | z2)
        self.latent_shape = (l2,)  # the top layer: the prior's, what sampling and latent walks use
        self.bottom_shape = (l1,)

    def loss_weights(self, shaping: Shaping) -> dict:
        return {**super().loss_weights(shaping), "beta": self.settings.beta * shaping.kl_scale}

    def posteriors(self, x, condition=None) -> dict[str, DiagonalGaussian]:
        """The top layer q(z2 | z1) (at z1 = the mean of q(z1 | x)) and the bottom one, q(z1 | x)."""
        return {"": self.encode(x, condition), "bottom": self.encode_bottom(x, condition)}

    @property
    def noise_shape(self) -> tuple[int, ...]:
        return (self.bottom_shape[0] + self.latent_shape[0],)  # both layers' noise, z1's first

    def anomaly_bounds(self, x, eps):
        """The bounds from both layers' importance weights (the exact two-layer densities)."""
        noise_shape, log_weights = self.importance_sampler(x)
        log_w = log_weights(eps[:, None].expand(-1, len(x), *noise_shape))  # (K, B), the same draws for every row
        return {"elbo": log_w.mean(0), "iwae": iwae_bound(log_w)}

    def _gaussian_of(self, net: nn.Module, z: torch.Tensor) -> DiagonalGaussian:
        """A Gaussian from `net` on z of any leading dims (..., L)."""
        return self._gaussian(net(z.reshape(-1, z.shape[-1])).view(*z.shape[:-1], -1), dim=-1)

    def encode_bottom(self, x: torch.Tensor, condition: torch.Tensor | None = None) -> DiagonalGaussian:
        """q(z1 | x)."""
        self._check_condition(condition)
        return self._gaussian(self.encoder(x))

    def encode(self, x, condition=None):
        return self._gaussian_of(self.up, self.encode_bottom(x, condition).mean)

    def decode_raw(self, z, condition=None):
        self._check_condition(condition)
        return self.decoder(self._gaussian_of(self.down, z).mean)

    def _chain(self, q1: DiagonalGaussian, eps1: torch.Tensor, eps2: torch.Tensor, shape) -> HVAEOutput:
        """The samples z1 = mean + std * eps1 of q(z1|x), z2 of q(z2|z1) from eps2, p(z1|z2) and the decoding of
        z1, for noise of any leading dims (..., B, L)."""
        z1 = q1.mean + q1.std * eps1
        top = self._gaussian_of(self.up, z1)
        z2 = top.mean + top.std * eps2
        prior1 = self._gaussian_of(self.down, z2)
        recon = self.decoder(z1.reshape(-1, z1.shape[-1]))
        recon = recon.view(*z1.shape[:-1], *recon.shape[1:])  # (..., B, *raw)
        return HVAEOutput(recon=recon, z=z2, posterior=q1, z1=z1, top=top, prior1=prior1)

    def forward(self, x, condition=None, n_samples: int = 1) -> HVAEOutput:
        q1 = self.encode_bottom(x, condition)
        lead = () if n_samples == 1 else (n_samples,)
        eps1 = torch.randn((*lead, *q1.mean.shape), dtype=q1.mean.dtype, device=x.device)
        eps2 = torch.randn((*lead, len(x), *self.latent_shape), dtype=q1.mean.dtype, device=x.device)
        return self._chain(q1, eps1, eps2, x.shape[1:])

    def importance_sampler(self, x: torch.Tensor, condition: torch.Tensor | None = None):
        """(noise shape per sample, log_weights): log_weights(eps) maps standard-normal noise (K, B, L1 + L2),
        one block per layer, to the log importance weights (K, B) of the samples it makes."""
        q1 = self.encode_bottom(x, condition)
        l1 = self.bottom_shape[0]

        def log_weights(eps: torch.Tensor) -> torch.Tensor:
            out = self._chain(q1, eps[..., :l1], eps[..., l1:], x.shape[1:])  # (K, B, ...) records
            return hvae_log_weights(x, out, self.likelihood)

        return (l1 + self.latent_shape[0],), log_weights

    def reconstruct_raw(self, x, condition=None):
        """The decoding of q(z1 | x)'s mean: the reconstruction goes through the bottom layer only."""
        return self.decoder(self.encode_bottom(x, condition).mean)

    @torch.no_grad()
    def sample(self, n, generator=None, condition=None):
        """n ancestral draws: z2 ~ N(0, I), z1 ~ p(z1 | z2), decoded to the likelihood's mean."""
        self._check_condition(condition)
        z2 = torch.randn((n, *self.latent_shape), generator=generator, device=self._device())
        raw = self.decoder(self._gaussian_of(self.down, z2).sample(generator=generator))
        return self.mean_of(raw)
