"""What every registered model shares: the posterior objects, the output record, and the base class."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn


class DiagonalGaussian:
    """q(z|x) = N(mean, diag(exp(logvar))). Owns sampling and its KL to the standard-normal prior.

    clamp=(low, high) bounds logvar (ModelConfig.logvar_min / logvar_max): values inside are kept bit for bit;
    beyond, exp(logvar) would overflow (past ±88 in fp32) and turn the KL and the samples into Inf/NaN.
    """

    def __init__(self, mean: torch.Tensor, logvar: torch.Tensor, clamp: tuple[float, float] | None = None):
        self.mean = mean  # (B, *latent_shape)
        self.logvar = logvar if clamp is None else logvar.clamp(*clamp)

    @property
    def std(self) -> torch.Tensor:
        return torch.exp(0.5 * self.logvar)

    def sample(self, generator: torch.Generator | None = None, n: int | None = None) -> torch.Tensor:
        """z ~ q(z|x): (B, *latent), or (n, B, *latent) when n is given."""
        # reparameterization trick: z = mean + std * eps keeps z differentiable in (mean, logvar)
        shape = self.mean.shape if n is None else (n, *self.mean.shape)
        eps = torch.randn(shape, generator=generator, dtype=self.mean.dtype, device=self.mean.device)
        return self.mean + self.std * eps

    def float(self) -> DiagonalGaussian:
        return DiagonalGaussian(self.mean.float(), self.logvar.float())

    def kl(self) -> torch.Tensor:
        from vaelab.losses import kl_standard_normal

        return kl_standard_normal(self.mean, self.logvar)  # (B,)


class PointMass:
    """The 'posterior' of a deterministic autoencoder: all mass on the code. Same interface, zero KL."""

    def __init__(self, z: torch.Tensor):
        self.mean = z

    def sample(self, generator: torch.Generator | None = None, n: int | None = None) -> torch.Tensor:
        return self.mean if n is None else self.mean.expand(n, *self.mean.shape)

    def float(self) -> PointMass:
        return PointMass(self.mean.float())

    def kl(self) -> torch.Tensor:
        return torch.zeros(self.mean.shape[0], dtype=self.mean.dtype, device=self.mean.device)


@dataclass
class ModelOutput:
    """The one record every model's forward returns."""

    # the decoder's raw output, shaped like x: logits (Bernoulli) or mean (Gaussian); with K posterior
    # samples (forward(..., n_samples=K > 1)) recon is (K, B, ...) and z is (K, B, *latent_shape)
    recon: torch.Tensor
    z: torch.Tensor  # (B, *latent_shape) the code that was decoded
    posterior: DiagonalGaussian | PointMass

    def float(self) -> ModelOutput:
        """The record in fp32: after a bf16 (mixed-precision) forward, losses are computed in fp32."""
        return ModelOutput(recon=self.recon.float(), z=self.z.float(), posterior=self.posterior.float())


class Autoencoder(nn.Module):
    """Base class of registered models: an encoder network, a decoder network and a likelihood.

    Subclasses set `has_prior` and implement `encode`. `decode` returns the likelihood's mean (pixel
    probabilities for Bernoulli), `decode_raw` the decoder's raw output (logits) that losses consume.
    Conditional models (`conditional = True`) take a `condition` everywhere: integer class labels (B,) or
    float vectors (B, condition_dim); unconditional ones refuse one.
    """

    has_prior = False  # True where z ~ N(0, I) makes sense, so `sample` works
    conditional = False  # True where encode/decode take a condition (the conditional VAE)

    def __init__(self, config):
        super().__init__()
        from vaelab.models.nets import build_networks

        self.config = config
        self.encoder, self.decoder, self.latent_shape = build_networks(config, self.encoder_outputs)

    encoder_outputs = 1  # how many latent-shaped tensors the encoder's head emits (2 = mean and log-variance)

    def encode(self, x: torch.Tensor, condition: torch.Tensor | None = None) -> DiagonalGaussian | PointMass:
        raise NotImplementedError

    def decode_raw(self, z: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        self._check_condition(condition)
        return self.decoder(z)

    def decode(self, z: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        raw = self.decode_raw(z, condition)
        return torch.sigmoid(raw) if self.config.likelihood == "bernoulli" else raw

    def forward(self, x: torch.Tensor, condition: torch.Tensor | None = None, n_samples: int = 1) -> ModelOutput:
        posterior = self.encode(x, condition)
        # a VAE samples z here in training and evaluation alike, so evaluation reports the objective it
        # trains on (the tutorial's test loss); deterministic use goes through reconstruct() / embed()
        if n_samples == 1:
            z = posterior.sample()
            return ModelOutput(recon=self.decode_raw(z, condition), z=z, posterior=posterior)
        z = posterior.sample(n=n_samples)  # (K, B, *latent): K importance samples per input (IWAE)
        cond = None if condition is None else condition.expand(n_samples, *condition.shape).flatten(0, 1)
        recon = self.decode_raw(z.flatten(0, 1), cond)
        return ModelOutput(recon=recon.view(n_samples, *x.shape), z=z, posterior=posterior)

    def importance_sampler(self, x: torch.Tensor, condition: torch.Tensor | None = None):
        """(noise shape per sample, log_weights) for importance sampling from q(z|x): log_weights(eps) maps
        standard-normal noise (K, B, *noise shape) to the log importance weights log p(x, z_k) - log q(z_k|x),
        (K, B), of the samples z_k it makes. A model with more stochastic layers overrides it (models/hvae.py)."""
        from vaelab.errors import VaelabError
        from vaelab.losses import log_importance_weights

        post = self.encode(x, condition)
        if not hasattr(post, "logvar"):
            raise VaelabError(f"the importance-sampled likelihood needs a model with a stochastic encoder (a VAE); "
                              f"model {self.config.model!r} has a deterministic one")

        def log_weights(eps: torch.Tensor) -> torch.Tensor:
            k = eps.shape[0]
            z = post.mean + post.std * eps  # (K, B, *latent)
            cond = None if condition is None else condition.expand(k, *condition.shape).flatten(0, 1)
            recon = self.decode_raw(z.flatten(0, 1), cond).view(k, *x.shape)  # (K, B, *x)
            return log_importance_weights(x, recon, z, post.mean, post.logvar, self.config.likelihood,
                                          self.config.gaussian_sigma)

        return tuple(post.mean.shape[1:]), log_weights

    def _gaussian(self, h: torch.Tensor, dim: int = 1) -> DiagonalGaussian:
        """The Gaussian whose mean and log-variance are the two halves of `h` along `dim`, log-variance clamped to
        the config's bounds."""
        mean, logvar = h.chunk(2, dim=dim)
        return DiagonalGaussian(mean, logvar, clamp=(self.config.logvar_min, self.config.logvar_max))

    def _check_condition(self, condition) -> None:
        if condition is not None and not self.conditional:
            from vaelab.errors import VaelabError

            raise VaelabError(f"model {self.config.model!r} takes no condition; use a conditional model "
                              "(--model cvae) to condition on labels")

    @torch.inference_mode()
    def embed(self, x: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        """Latent means (the features a user extracts), (B, *latent_shape)."""
        return self.encode(x, condition).mean

    @torch.inference_mode()
    def reconstruct(self, x: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        """Decode the posterior mean: the deterministic reconstruction, in data space."""
        raw = self.reconstruct_raw(x, condition)
        return torch.sigmoid(raw) if self.config.likelihood == "bernoulli" else raw

    def reconstruct_raw(self, x: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        """The decoder's raw output (logits for Bernoulli) at the posterior mean: what the reconstruction error
        scores."""
        return self.decode_raw(self.encode(x, condition).mean, condition)

    @torch.inference_mode()
    def sample(self, n: int, generator: torch.Generator | None = None,
               condition: torch.Tensor | None = None) -> torch.Tensor:
        """n draws from the prior, decoded to data space (likelihood means). A conditional model takes a
        condition: one label / vector for all n, or n of them."""
        if not self.has_prior:
            from vaelab.errors import VaelabError

            raise VaelabError(
                f"model {self.config.model!r} has no prior to sample from; train a VAE "
                "(e.g. --model vae or --preset seed-vae) to generate new samples")
        z = torch.randn((n, *self.latent_shape), generator=generator, device=self._device())
        if condition is not None:
            condition = torch.as_tensor(condition, device=self._device())
            if condition.dim() == 0 or (condition.dim() == 1 and condition.is_floating_point()):
                condition = condition.expand(n, *condition.shape)  # one condition for all n samples
        return self.decode(z, condition)

    def _device(self) -> torch.device:
        return next(self.parameters()).device

    @property
    def latent_size(self) -> int:
        n = 1
        for s in self.latent_shape:
            n *= s
        return n

    def save_pretrained(self, directory) -> None:
        """Write config.json + model.safetensors into `directory` (atomically); reload with from_pretrained."""
        from vaelab.training.checkpoint import save_pretrained

        save_pretrained(self, directory)

    @classmethod
    def from_pretrained(cls, directory) -> "Autoencoder":
        from vaelab.training.checkpoint import load_pretrained

        return load_pretrained(directory)
