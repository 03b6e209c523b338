"""The VQ-VAE's code prior (models/prior.py's gated PixelCNN) as a model of the one training loop.

`vaelab train-prior` (vaelab/prior.py) trains it with `vaelab.training.fit` on a dataset of codes
(data/arrays.CodeDataset: the VQ-VAE's code grids as (N, 1, h, w) int64, with the images' labels), then hands
its network to the VQ-VAE (`set_prior`), which saves it with its own weights. The model's side of the loop's
contract:

    input x           (B, 1, h, w) int64 code indices in [0, K); condition: (B,) class labels when conditional
    forward(x, c)     -> PriorOutput, the logits (B, K, h, w) of p(k_i | k_<i, c) at every grid position
    loss(x, out)      -> {"loss": -log p(k | c) per grid in nats, "bits_per_code": the same per code in bits}

config.input_shape is (1, h, w), config.condition_dim the number of classes (0: unconditional), and the settings
codebook_size, prior_layers and prior_channels (the names the VQ-VAE keeps them under).

It is not in the model registry: a registered model is an autoencoder of data (its forward reconstructs x, it
embeds and decodes, every command trains it on a dataset by name), and a code prior is none of these; it is built
by vaelab.prior for a VQ-VAE's codes only.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from vaelab.config import ModelConfig, is_int
from vaelab.errors import ConfigError, VaelabError
from vaelab.losses import Shaping
from vaelab.models.base import Autoencoder, Capabilities, ModelSettings, settings_problems
from vaelab.models.prior import CodePrior


@dataclass(frozen=True)
class CodePriorSettings(ModelSettings):
    codebook_size: int = field(default=512, metadata={"help": "the number of codes K", "flag": False})
    prior_layers: int = field(default=8, metadata={"help": "gated PixelCNN layers", "flag": False})
    prior_channels: int = field(default=32, metadata={"help": "channels of each layer", "flag": False})

    def problems(self, config) -> list[str]:
        low = {"codebook_size": 2, "prior_layers": 1, "prior_channels": 1}
        return [f"{name}={getattr(self, name)!r} must be an integer >= {n}" for name, n in low.items()
                if not is_int(getattr(self, name)) or getattr(self, name) < n]


@dataclass
class PriorOutput:
    """What the code prior's forward returns: the logits (B, K, h, w) of every grid position's code."""

    logits: torch.Tensor

    def float(self) -> PriorOutput:
        return PriorOutput(self.logits.float())


def code_prior_loss(x: torch.Tensor, out: PriorOutput, *, target: torch.Tensor | None = None) -> dict:
    """The negative log-likelihood of each code grid (B, 1, h, w) under the prior: "loss" in nats per grid (what
    maximum likelihood minimises), "bits_per_code" the same divided by the h*w codes and ln 2."""
    codes = (x if target is None else target).flatten(0, 1)  # (B, h, w)
    nll = F.cross_entropy(out.logits, codes, reduction="none").flatten(1).sum(1)  # (B,)
    return {"loss": nll, "bits_per_code": nll / (math.prod(codes.shape[1:]) * math.log(2))}


class CodePriorModel(Autoencoder):
    """A gated PixelCNN prior over (1, h, w) grids of K codes, as the training loop trains models (see the module
    docstring). `prior` is the network (a models/prior.CodePrior), the module a VQ-VAE attaches."""

    Settings = CodePriorSettings
    capabilities = Capabilities()  # an instance with classes is conditional (__init__)
    objective = staticmethod(code_prior_loss)
    archs = ("auto",)
    custom_networks = False

    def __init__(self, config: ModelConfig):
        nn.Module.__init__(self)
        problems = type(self).config_problems(config)
        if problems:
            raise ConfigError(problems, "code prior configuration")
        self.config = config
        s = self.settings
        self.prior = CodePrior(s.codebook_size, config.input_shape[1:], s.prior_channels, s.prior_layers,
                               config.condition_dim)
        self.capabilities = Capabilities(conditional=config.condition_dim > 0)

    @classmethod
    def for_codes(cls, codebook_size: int, grid: tuple[int, int], *, layers: int, channels: int,
                  classes: int = 0) -> CodePriorModel:
        """A fresh prior over (h, w) = `grid` maps of `codebook_size` codes, conditioned on `classes` classes."""
        return cls(ModelConfig(model="code-prior", input_shape=(1, *grid), condition_dim=classes,
                               codebook_size=codebook_size, prior_layers=layers, prior_channels=channels))

    @classmethod
    def config_problems(cls, config: ModelConfig) -> list[str]:
        out = settings_problems(cls, config)
        shape = config.input_shape
        if not (isinstance(shape, tuple) and len(shape) == 3 and shape[0] == 1 and all(is_int(s) and s >= 1
                                                                                      for s in shape)):
            out.append(f"input_shape={shape!r} must be (1, h, w): one channel of code indices on an h x w grid")
        if not is_int(config.condition_dim) or config.condition_dim < 0:
            out.append(f"condition_dim={config.condition_dim!r} must be the number of classes (0: unconditional)")
        if config.arch not in cls.archs or config.networks is not None:
            out.append("a code prior is a gated PixelCNN: it takes no arch and no networks of your own")
        return out

    def loss_weights(self, shaping: Shaping) -> dict:
        return {}

    def training_problems(self, train) -> list[str]:
        """The base's refusals, and the options that act on pixel intensities: its data are code indices."""
        out = super().training_problems(train)
        if train.binarize:
            out.append("binarize=True does not apply to a code prior: its data are code indices; drop it")
        if train.noise != "none" and train.noise_level:
            out.append(f"noise={train.noise!r} does not apply to a code prior: its data are code indices; drop it")
        return out

    def forward(self, x: torch.Tensor, condition: torch.Tensor | None = None, n_samples: int = 1) -> PriorOutput:
        if n_samples != 1:
            raise VaelabError(f"a code prior has no latent to sample: n_samples must be 1, got {n_samples}")
        if (condition is not None) != self.capabilities.conditional:
            raise VaelabError(f"this code prior is conditioned on {self.config.condition_dim} classes and needs "
                              "their labels" if condition is None else
                              "this code prior is unconditional and takes no labels")
        return PriorOutput(self.prior(x.flatten(0, 1), condition))
