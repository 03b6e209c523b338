"""The variational autoencoder (Kingma & Welling 2014); β-VAE is this model with beta != 1."""

from vaelab.losses import vae_loss
from vaelab.models.base import Autoencoder
from vaelab.models.registry import register


@register("vae", loss=vae_loss,
          description="Variational autoencoder: Gaussian posterior, N(0, I) prior, loss recon + beta*KL.")
class VAE(Autoencoder):
    has_prior = True
    encoder_outputs = 2  # mean and log-variance

    def encode(self, x, condition=None):
        self._check_condition(condition)
        h = self.encoder(x)  # (B, 2 * latent_dim) or (B, 2 * C, h, w)
        return self._gaussian(h)
