"""The deterministic autoencoder (dense, convolutional; denoising through the training options)."""

from __future__ import annotations

import torch

from vaelab.losses import Likelihood, pixel_metrics, recon_nll
from vaelab.models.base import Autoencoder, Capabilities, ModelOutput, PointMass
from vaelab.models.registry import register


def autoencoder_loss(x, out: ModelOutput, *, likelihood: Likelihood | str = "bernoulli", sigma: float = 1.0,
                     target: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """Reconstruction NLL of a deterministic autoencoder. `target` is the clean input (denoising)."""
    target = x if target is None else target
    recon = recon_nll(target, out.recon, likelihood, sigma)
    return {"loss": recon, "recon": recon, **pixel_metrics(target, out.recon, likelihood)}


@register("ae", description="Deterministic autoencoder: reconstruction loss only (conv or MLP).")
class AE(Autoencoder):
    capabilities = Capabilities()
    objective = staticmethod(autoencoder_loss)
    encoder_outputs = 1

    def encode(self, x, condition=None):
        self._check_condition(condition)
        return PointMass(self.encoder(x))
