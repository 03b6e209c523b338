"""Models: one registry (`MODELS`), one way to build (`build_model`), one way to load (`from_pretrained`).

A model is one file in this folder (its settings, networks, loss, capabilities and metrics) plus its
`@register` line; a model outside vaelab registers through the `vaelab.models` entry-point group
(models/registry.py).
"""

from __future__ import annotations

from vaelab.config import MODEL_CHECKS, PRESETS, ModelConfig, get_preset
from vaelab.errors import ConfigError
from vaelab.models.base import Autoencoder, Capabilities, DiagonalGaussian, ModelOutput, ModelSettings, PointMass
from vaelab.models.pretrained import complete_settings
from vaelab.models.registry import MODELS, ModelSpec, check_config, load_pretrained, register
from vaelab.models import ae, cvae, hvae, m2, vae, vqvae  # noqa: F401,E402  (registers the models)
from vaelab.models import btcvae  # noqa: F401,E402  (beta-TCVAE)
from vaelab.models import dipvae  # noqa: F401,E402  (DIP-VAE)
from vaelab.models import factorvae  # noqa: F401,E402  (FactorVAE)
from vaelab.models import adgm  # noqa: F401,E402  (ADGM, SDGM)
from vaelab.models import m1m2  # noqa: F401,E402  (M1+M2)

if check_config not in MODEL_CHECKS:
    MODEL_CHECKS.append(check_config)  # ModelConfig.validate now knows the registered models


def build_model(config=None, *, input_shape=None, encoder=None, decoder=None, trust_code: bool = False,
                **overrides) -> Autoencoder:
    """Build a registered model from a ModelConfig, a preset name, or keyword overrides.

        build_model("seed-vae", input_shape=(1, 28, 28))
        build_model(ModelConfig(model="ae", arch="mlp", latent_dim=8), input_shape=(64,))
        build_model(model="vae", latent_dim=16, beta=4, input_shape=(1, 28, 28))
        build_model("vae", encoder=(MyEncoder, {"width": 64}), decoder=(MyDecoder, {"width": 64}),
                    latent_dim=8, input_shape=(1, 8, 8))

    A model name (a registered one that is not a preset) works as the first argument too. encoder= / decoder=
    are networks of your own (models/networks.py says their shapes): nn.Module instances, or (class, kwargs)
    pairs that vaelab constructs and records so that the model saves and reloads. A config whose `networks`
    names classes outside vaelab imports their module only with trust_code=True (importing runs its code).
    """
    if config is None:
        config = ModelConfig()
    elif isinstance(config, str):
        if config not in PRESETS and config in MODELS:  # a model's name (the preset wins: "m2" is both)
            config = ModelConfig(model=config)
        else:
            config = get_preset(config).model
    if input_shape is not None:
        overrides["input_shape"] = tuple(int(s) for s in input_shape)
    if overrides:
        config = config.replace(**overrides)
    if config.input_shape is None:
        raise ConfigError("input_shape is not set; pass input_shape=(C, H, W) or (D,), "
                          "or build the model from a dataset with vaelab.fit", "model configuration")
    config.validate()
    cls = MODELS[config.model].cls
    networks = {}
    if encoder is not None or decoder is not None:
        from vaelab.models.networks import from_arguments

        networks["encoder"], networks["decoder"], specs = from_arguments(cls, config, encoder, decoder)
        config = config.replace(networks=specs)
    elif config.networks is not None:
        from vaelab.models.networks import check_capable, instantiate

        check_capable(cls, config)
        networks["encoder"], networks["decoder"] = instantiate(config.networks, trust_code)
    return cls(complete_settings(cls, config), **networks)


def from_pretrained(directory, *, trust_code: bool = False) -> Autoencoder:
    """Load a model saved by save_pretrained, or the final model of a run directory. trust_code=True lets a
    model with networks of its own import their module when it lies outside vaelab (importing runs its code):
    only for files you trust."""
    return load_pretrained(directory, trust_code=trust_code)


def with_settings(model: Autoencoder, *, trust_code: bool = False, **changes) -> Autoencoder:
    """The trained `model` with some of its settings changed, those that leave its weights as they are (how M2
    classifies, posterior_samples): built afresh from its config with the changes, given its weights and its mode.
    A change that is not a setting of the model, or that would change its weights' shapes, is a ConfigError."""
    config = model.config.replace(settings={**model.config.settings, **changes})
    other = build_model(config, trust_code=trust_code)
    try:
        other.load_state_dict(model.state_dict())
    except RuntimeError as err:
        raise ConfigError(f"{', '.join(f'{k}={v!r}' for k, v in changes.items())} changes the weights of model "
                          f"{model.config.model!r}, so a trained model cannot take it: train anew with it "
                          f"({str(err).splitlines()[0]})") from None
    first = next(model.parameters())
    return other.to(device=first.device, dtype=first.dtype).train(model.training)


def list_models() -> list[ModelSpec]:
    """The registered models (built-in and entry-point plugins), sorted by name."""
    return [MODELS[k] for k in sorted(MODELS)]


__all__ = ["MODELS", "ModelSpec", "register", "Autoencoder", "Capabilities", "DiagonalGaussian", "ModelSettings",
           "PointMass", "ModelOutput", "build_model", "from_pretrained", "list_models", "with_settings"]
