"""Models: one registry (`MODELS`), one way to build (`build_model`), one way to load (`from_pretrained`).

A model is one file in this folder (its settings, networks, loss, capabilities and metrics) plus its
`@register` line; a model outside vaelab registers through the `vaelab.models` entry-point group
(models/registry.py).
"""

from __future__ import annotations

from vaelab.config import MODEL_CHECKS, ModelConfig, get_preset
from vaelab.errors import ConfigError
from vaelab.models.base import (Autoencoder, Capabilities, DiagonalGaussian, ModelOutput, ModelSettings, PointMass,
                                check_config, full_settings)
from vaelab.models.registry import MODELS, ModelSpec, register
from vaelab.models import ae, cvae, hvae, m2, vae, vqvae  # noqa: F401,E402  (registers the models)

if check_config not in MODEL_CHECKS:
    MODEL_CHECKS.append(check_config)  # ModelConfig.validate now knows the registered models


def build_model(config=None, *, input_shape=None, **overrides) -> Autoencoder:
    """Build a registered model from a ModelConfig, a preset name, or keyword overrides.

        build_model("seed-vae", input_shape=(1, 28, 28))
        build_model(ModelConfig(model="ae", arch="mlp", latent_dim=8), input_shape=(64,))
        build_model(model="vae", latent_dim=16, beta=4, input_shape=(1, 28, 28))
    """
    if config is None:
        config = ModelConfig()
    elif isinstance(config, str):
        config = get_preset(config).model
    if input_shape is not None:
        overrides["input_shape"] = tuple(int(s) for s in input_shape)
    if overrides:
        config = config.replace(**overrides)
    if config.input_shape is None:
        raise ConfigError("input_shape is not set; pass input_shape=(C, H, W) or (D,), "
                          "or build the model from a dataset with vaelab.fit", "model configuration")
    config.validate()
    return MODELS[config.model].cls(full_settings(config))


def from_pretrained(directory) -> Autoencoder:
    """Load a model saved by save_pretrained, or the final model of a run directory."""
    from vaelab.models.pretrained import load_pretrained

    return load_pretrained(directory)


def list_models() -> list[ModelSpec]:
    return [MODELS[k] for k in sorted(MODELS)]


__all__ = ["MODELS", "ModelSpec", "register", "Autoencoder", "Capabilities", "DiagonalGaussian", "ModelSettings",
           "PointMass", "ModelOutput", "build_model", "from_pretrained", "list_models"]
