"""The deterministic autoencoder (dense, convolutional; denoising through the training options)."""

from vaelab.losses import autoencoder_loss
from vaelab.models.base import Autoencoder, PointMass
from vaelab.models.registry import register


@register("ae", loss=autoencoder_loss,
          description="Deterministic autoencoder: reconstruction loss only (conv or MLP).")
class AE(Autoencoder):
    has_prior = False
    encoder_outputs = 1

    def encode(self, x, condition=None):
        self._check_condition(condition)
        return PointMass(self.encoder(x))
