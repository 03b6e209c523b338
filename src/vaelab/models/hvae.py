"""A VAE with two stochastic layers: the two-layer model of Burda, Grosse and Salakhutdinov (2015), "Importance
Weighted Autoencoders", https://arxiv.org/abs/1509.00519, section 5, with networks of any size.

Generative model: z2 ~ N(0, I), z1 ~ p(z1 | z2) = N(mu(z2), sigma^2(z2)), x ~ p(x | z1) (the decoder).
Inference, bottom-up: q(z1 | x) (the encoder) and q(z2 | z1). The second layer gives the prior over z1 a learned,
non-Gaussian shape, the first route the IWAE paper takes below 84 nats on MNIST (85.33 as a VAE, 83.89 with the
IWAE bound at K=5, against 86.76 and 85.54 for one layer).

The networks: the encoder and decoder between x and z1 are the VAE's (`arch` mlp or conv, `hidden`, `latent_dim`
= the size of z1); q(z2 | z1) and p(z1 | z2) are MLPs with `hidden2` layers and ReLU (none: linear maps),
`latent2_dim` = the size of z2 (0: half of latent_dim). The model's latent, what `sample`, `manifold`,
`interpolate` and `traverse` walk, is the top layer z2, the one with the N(0, I) prior: `decode(z2)` decodes the
mean of p(z1 | z2), `sample` draws z1 as well (ancestral sampling). `encode(x)` is q(z2 | z1) at z1 = the mean of
q(z1 | x), the top layer's code along the posterior's mean path; `reconstruct` decodes the mean of q(z1 | x). The
losses use the exact two-layer densities (losses.hvae_loss), and so does the importance-sampled likelihood
(`importance_sampler`).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from vaelab.losses import hvae_loss, hvae_log_weights
from vaelab.models.base import Autoencoder, DiagonalGaussian, ModelOutput
from vaelab.models.nets import _dense, _init_like_keras
from vaelab.models.registry import register


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


def _mlp(sizes: list[int], out: int) -> nn.Sequential:
    net = nn.Sequential(*_dense(sizes), nn.Linear(sizes[-1], out))
    _init_like_keras(net)
    return net


@register("hvae", loss=hvae_loss,
          description="VAE with two stochastic layers (Burda et al.'s): p(z2) p(z1|z2) p(x|z1), q(z1|x) q(z2|z1); "
                      "--latent2-dim and --hidden2 set the top layer; train the IWAE bound with --iw-samples K.")
class HVAE(Autoencoder):
    has_prior = True
    encoder_outputs = 2  # q(z1 | x): mean and log-variance

    def __init__(self, config):
        super().__init__(config)
        l1, h = config.latent_dim, list(config.hidden2)
        l2 = config.latent2_dim or max(1, l1 // 2)
        self.up = _mlp([l1, *h], 2 * l2)  # q(z2 | z1)
        self.down = _mlp([l2, *h[::-1]], 2 * l1)  # p(z1 | z2)
        self.latent_shape = (l2,)  # the top layer: the prior's, what sampling and latent walks use
        self.bottom_shape = (l1,)

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
        recon = self.decoder(z1.reshape(-1, z1.shape[-1])).view(*z1.shape[:-1], *shape)
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
            return hvae_log_weights(x, out, self.config.likelihood, self.config.gaussian_sigma)

        return (l1 + self.latent_shape[0],), log_weights

    def reconstruct_raw(self, x, condition=None):
        """The decoding of q(z1 | x)'s mean: the reconstruction goes through the bottom layer only."""
        return self.decoder(self.encode_bottom(x, condition).mean)

    @torch.inference_mode()
    def sample(self, n, generator=None, condition=None):
        """n ancestral draws: z2 ~ N(0, I), z1 ~ p(z1 | z2), decoded to the likelihood's mean."""
        self._check_condition(condition)
        z2 = torch.randn((n, *self.latent_shape), generator=generator, device=self._device())
        raw = self.decoder(self._gaussian_of(self.down, z2).sample(generator=generator))
        return torch.sigmoid(raw) if self.config.likelihood == "bernoulli" else raw
