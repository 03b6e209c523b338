"""What every registered model shares: the posterior objects, the output record, the capabilities a model
declares, the base of its own settings, and the base class.

Code outside a model never asks for a model by name: it asks `model.capabilities` what the model can do, and
calls the hooks declared here (`loss`, `training_problems`, `epoch_metrics`, `data_metrics`, `posteriors`,
`anomaly_bounds`, `auxiliaries`), which every model has.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, ClassVar

import torch
from torch import nn

from vaelab.config import ARCHS, ModelConfig
from vaelab.errors import CheckpointError, VaelabError
from vaelab.losses import (NO_SHAPING, Likelihood, Shaping, kl_standard_normal, likelihood_of,
                           log_importance_weights)


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

    # the decoder's raw output (B, P*C, ...), P = the likelihood's params_per_channel (shaped like x for P = 1):
    # logits (Bernoulli), mean (Gaussian), a logistic mixture's parameters, ...; with K posterior
    # samples (forward(..., n_samples=K > 1)) recon is (K, B, ...) and z is (K, B, *latent_shape)
    recon: torch.Tensor
    z: torch.Tensor  # (B, *latent_shape) the code that was decoded
    posterior: DiagonalGaussian | PointMass

    def float(self) -> ModelOutput:
        """The record in fp32: after a bf16 (mixed-precision) forward, losses are computed in fp32."""
        return ModelOutput(recon=self.recon.float(), z=self.z.float(), posterior=self.posterior.float())


@dataclass(frozen=True)
class Capabilities:
    """What a model can do; the loop, evaluation, anomaly scoring, generation and the CLI ask these, never a name.

    stochastic:      q(z|x) is a DiagonalGaussian (mean, logvar): KL terms, the ELBO, the IWAE bound, the
                     importance-sampled likelihood, ELBO anomaly scores, latent health.
    samples:         `sample(n)` draws new data from a prior over the latent.
    conditional:     encode / decode take a condition (class labels or vectors); training needs labelled data.
    semi_supervised: learns from samples whose label is hidden (-1): `--labels N` keeps N labels.
    discrete:        the latent is a grid of codebook indices: `encode_indices`, `decode_indices`, a code prior.
    """

    stochastic: bool = False
    samples: bool = False
    conditional: bool = False
    semi_supervised: bool = False
    discrete: bool = False


@dataclass(frozen=True)
class Auxiliary:
    """A network a model trains beside itself with an Adam optimizer of its own (a FactorVAE's discriminator).

    `module` is a submodule of the model, so its weights are the model's (saved, loaded and resumed with it);
    the model's optimizer leaves its parameters out. After every optimizer step of the model, the training loop
    steps this one on `model.auxiliary_loss(name, out)` (a constant learning rate: the loop's lr schedule and
    gradient clipping act on the model's optimizer only), and keeps its state in every checkpoint."""

    module: nn.Module
    lr: float
    betas: tuple[float, float] = (0.9, 0.999)


@dataclass(frozen=True)
class ModelSettings:
    """Base of a model's own settings: a small frozen dataclass in the model's file, one field per setting.

    Each field's metadata may carry `help` (the flag's help text) and `flag=False` (set by a command, not by
    hand). `problems` reports every impossible value at once."""

    def problems(self, config: ModelConfig) -> list[str]:
        return []

    def to_dict(self) -> dict:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}


@dataclass(frozen=True)
class NoSettings(ModelSettings):
    """A model without settings of its own."""


class Autoencoder(nn.Module):
    """Base class of registered models: an encoder network, a decoder network and a likelihood.

    A model's file declares, on its class: `Settings` (its own settings, a ModelSettings dataclass),
    `capabilities`, `objective` (its loss, a pure function) with `loss_weights` (the keywords it takes from the
    settings and the loop's Shaping), `loss_options` (the TrainConfig options its loss honours), and `archs`
    (the networks it can be built with). `decode` returns the likelihood's mean (pixel probabilities for
    Bernoulli), `decode_raw` the decoder's raw output (logits) that losses consume. Conditional models take a
    `condition` everywhere: integer class labels (B,) or float vectors (B, condition_dim); the others refuse one.
    """

    Settings: ClassVar[type[ModelSettings]] = NoSettings
    capabilities: Capabilities = Capabilities()
    objective: ClassVar[Callable]  # the loss: (x, out, *, target, **loss_weights) -> dict of (B,) terms
    # TrainConfig options the loss honours ("kl_schedule", "capacity", "free_bits", "iw_samples"); the loop
    # refuses the others. `iwae_options`: those that still apply when training the IWAE bound (iw_samples > 1)
    loss_options: ClassVar[frozenset[str]] = frozenset()
    iwae_options: ClassVar[frozenset[str]] = frozenset()
    # what the model's own loss terms mean (the CLI's tables print it beside the shared terms'), by term name
    term_meanings: ClassVar[dict[str, str]] = {}
    archs: ClassVar[tuple[str, ...]] = ARCHS  # the `arch` values this model can be built with
    default_arch: ClassVar[str | None] = None  # what arch "auto" means; None: conv for images, mlp for vectors
    encoder_outputs: ClassVar[int] = 1  # latent-shaped tensors the encoder's head emits (2 = mean, log-variance)
    # whether the model takes networks of the user's own (build_model's encoder= / decoder=, config.networks;
    # models/networks.py) in place of models/nets.py's: those whose pair comes from this __init__. A subclass that
    # builds its own networks sets False; one that overrides __init__ passes encoder= / decoder= on to it
    custom_networks: ClassVar[bool] = True
    # whether a training step may leave some of the model's parameters without a gradient (a model trained in
    # stages, models/m1m2.py): under DDP the loop then looks for them in each step's graph (find_unused_parameters)
    partial_gradients: ClassVar[bool] = False
    registry_name: ClassVar[str]

    def __init__(self, config: ModelConfig, *, encoder: nn.Module | None = None, decoder: nn.Module | None = None):
        super().__init__()
        self.config = config
        if encoder is None and decoder is None and config.networks is None:
            from vaelab.models.nets import build_networks

            self.encoder, self.decoder, self.latent_shape = build_networks(config, self.encoder_outputs, self.arch)
        else:  # the user's own (checked on a zero batch); the config records them, so the model saves
            from vaelab.models.networks import own_networks

            self.config, self.encoder, self.decoder, self.latent_shape = own_networks(type(self), config, encoder,
                                                                                      decoder)

    # ------------------------------------------------------------------------------ settings and loss

    @property
    def settings(self) -> ModelSettings:
        """The model's own settings (its `Settings`), read from config.settings."""
        cached = self.__dict__.get("_settings")
        if cached is None or cached[0] is not self.config:
            cached = (self.config, self.Settings(**self.config.settings))
            self.__dict__["_settings"] = cached
        return cached[1]

    @property
    def arch(self) -> str:
        """The network this model is built with ("auto" resolved; "custom" for networks of the user's own)."""
        return "custom" if self.config.networks is not None else resolve_arch(type(self), self.config)

    def loss_weights(self, shaping: Shaping) -> dict:
        """The keywords of `objective` besides (x, out, target): from the config, the settings and `shaping`."""
        return {"likelihood": self.likelihood, "sigma": self.config.gaussian_sigma}

    @property
    def likelihood(self) -> Likelihood:
        """p(x | decoder output): the object that scores, averages and samples the decoder's raw output."""
        return likelihood_of(self.config)

    def loss(self, x: torch.Tensor, out: ModelOutput, *, target: torch.Tensor | None = None,
             shaping: Shaping = NO_SHAPING) -> dict[str, torch.Tensor]:
        """Per-sample loss terms, (B,) each; "loss" is what training minimises. `x` is the input the model saw,
        `target` the clean one (denoising; default x)."""
        return type(self).objective(x, out, target=target, **self.loss_weights(shaping))

    def training_problems(self, train) -> list[str]:
        """Why this model cannot train with the TrainConfig `train` (empty when it can): options its loss would
        silently ignore are refused."""
        out = []
        iwae = train.iw_samples > 1
        name = self.config.model
        if iwae and "iw_samples" not in self.loss_options:
            out.append(f"iw_samples={train.iw_samples} needs a model with a stochastic encoder (a VAE); model "
                       f"{name!r} is deterministic" if not self.capabilities.stochastic else
                       f"iw_samples={train.iw_samples} does not apply to model {name!r}: its loss "
                       f"({self.objective.__name__}) has no importance-weighted form; train the ELBO (iw_samples=1)")
        for option, value, off in (("kl_schedule", train.kl_schedule, "constant"), ("capacity", train.capacity, 0.0),
                                   ("free_bits", train.free_bits, 0.0),
                                   ("labelled_bound", train.labelled_bound, "batch")):
            if value == off:
                continue
            if option not in self.loss_options:
                out.append(f"{option}={value!r} does not apply to model {name!r}: its loss "
                           f"({self.objective.__name__}) does not use it; drop it")
            elif iwae and option not in self.iwae_options:
                out.append(f"{option}={value!r} does not apply to the IWAE bound (iw_samples={train.iw_samples}); "
                           "drop it or train the ELBO (iw_samples=1)")
        return out

    @classmethod
    def config_problems(cls, config: ModelConfig) -> list[str]:
        """This model's checks of a config whose common fields are valid: its settings, arch, condition, shape."""
        out = settings_problems(cls, config)
        if config.arch not in cls.archs:
            out.append(f"model={config.model!r} supports arch {' / '.join(cls.archs)}, not arch={config.arch!r}")
        conditional = cls.capabilities.conditional
        if conditional and config.condition_dim < 1:
            out.append(f"model={config.model!r} is conditional: condition_dim must be >= 1 (the number of "
                       "classes, set from labelled data; train it on a dataset with labels)")
        if not conditional and config.condition_dim:
            out.append(f"condition_dim={config.condition_dim} is set but model={config.model!r} takes no "
                       "condition; use a conditional model (model='cvae')")
        if config.networks is not None and not cls.custom_networks:
            out.append(f"model={config.model!r} builds its own networks; it takes no encoder= / decoder= "
                       "(config networks)")
        if config.input_shape is not None and config.arch in cls.archs and config.networks is None:
            out.extend(shape_problems(config, resolve_arch(cls, config)))
        out.extend(activation_problems(cls, config))
        return out

    @classmethod
    def config_for_training(cls, config: ModelConfig) -> tuple[ModelConfig, str | None]:
        """The config a saved model trains further with, and a note on what that voids (None: nothing)."""
        return config, None

    # ---------------------------------------------------------------------------------------- hooks

    def start_epoch(self, epoch: int) -> None:
        """Called by the training loop before training epoch `epoch` (0-based), a resumed one included: a model
        trained in stages picks its stage here (models/m1m2.py). Nothing by default."""

    def mixes_labels(self, epoch: int) -> bool:
        """With hidden labels (--labels N), whether epoch `epoch` trains on the mixed batches (a share of every
        batch labelled, data.semisupervised.MixedBatches.epoch_order); False: on as many batches drawn uniformly
        from all the training samples (uniform_order), for a stage that learns without labels (models/m1m2.py).
        True by default."""
        return True

    def schedule_span(self, epoch: int, epochs: int) -> tuple[int, int]:
        """The epochs [first, last) over which the learning-rate schedule (--lr-schedule) of epoch `epoch` runs,
        of a run of `epochs`: the whole run by default; a model trained in stages may restart it at each stage
        (models/m1m2.py)."""
        return 0, epochs

    def epoch_metrics(self) -> dict:
        """The model's own numbers of the training epoch that just ended (the loop adds them as train_*)."""
        return {}

    def data_metrics(self, data, batch_size: int = 512) -> dict:
        """The model's own numbers on a dataset (evaluate adds them to its report)."""
        return {}

    def auxiliaries(self) -> dict[str, Auxiliary]:
        """Networks trained beside the model by optimizers of their own, by name (a FactorVAE's discriminator);
        none by default. Each one's loss is `auxiliary_loss`."""
        return {}

    def auxiliary_loss(self, name: str, out: ModelOutput) -> dict[str, torch.Tensor]:
        """Per-sample terms, (B,) each, of auxiliary network `name` at the output `out` of the training step that
        has just updated the model (computed before that update; use it detached). "loss" is what the network's
        optimizer minimises; the loop reports every term as train_<name>_<term>."""
        raise NotImplementedError(f"model {self.config.model!r} declares no auxiliary network {name!r}")

    def posteriors(self, x: torch.Tensor, condition: torch.Tensor | None = None) -> dict[str, DiagonalGaussian]:
        """The Gaussian posterior of each stochastic layer, by name: "" for the model's latent (the one with
        the N(0, I) prior), others (an hvae's "bottom") named. Latent health is reported for each."""
        return {"": self.encode(x, condition)}

    @property
    def noise_shape(self) -> tuple[int, ...]:
        """The shape of the standard-normal noise that makes one posterior sample (see importance_sampler)."""
        return tuple(self.latent_shape)

    def anomaly_bounds(self, x: torch.Tensor, eps: torch.Tensor) -> dict[str, torch.Tensor]:
        """The ELBO and the IWAE bound of every row of x, (B,) each, from the noise eps (K, *noise_shape), the
        same K draws for every row (common random numbers): a row's bounds depend on that row alone."""
        post = self.encode(x)
        z = post.mean + post.std * eps[:, None]  # (K, B, *latent)
        raw = self.decode_raw(z.flatten(0, 1)).unflatten(0, (len(eps), len(x)))  # (K, B, *sample)
        terms = self.loss(x, ModelOutput(raw, z, post))
        return {"elbo": terms["elbo"], "iwae": terms["iwae"]}

    # ------------------------------------------------------------------------------------- the model

    def encode(self, x: torch.Tensor, condition: torch.Tensor | None = None) -> DiagonalGaussian | PointMass:
        raise NotImplementedError

    def decode_raw(self, z: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        self._check_condition(condition)
        return self.decoder(z)

    def decode(self, z: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        return self.mean_of(self.decode_raw(z, condition))

    def mean_of(self, raw: torch.Tensor) -> torch.Tensor:
        """The likelihood's mean from the decoder's raw output (B, P*C, ...): probabilities for Bernoulli logits."""
        return self.likelihood.mean(raw)

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
        return ModelOutput(recon=recon.unflatten(0, (n_samples, x.shape[0])), z=z, posterior=posterior)

    def importance_sampler(self, x: torch.Tensor, condition: torch.Tensor | None = None):
        """(noise shape per sample, log_weights) for importance sampling from q(z|x): log_weights(eps) maps
        standard-normal noise (K, B, *noise shape) to the log importance weights log p(x, z_k) - log q(z_k|x),
        (K, B), of the samples z_k it makes. A model with more stochastic layers overrides it (models/hvae.py)."""
        if not self.capabilities.stochastic:
            raise VaelabError(f"the importance-sampled likelihood needs a model with a stochastic encoder (a VAE); "
                              f"model {self.config.model!r} has a deterministic one")
        post = self.encode(x, condition)

        def log_weights(eps: torch.Tensor) -> torch.Tensor:
            k = eps.shape[0]
            z = post.mean + post.std * eps  # (K, B, *latent)
            cond = None if condition is None else condition.expand(k, *condition.shape).flatten(0, 1)
            recon = self.decode_raw(z.flatten(0, 1), cond).unflatten(0, (k, x.shape[0]))  # (K, B, *raw)
            return log_importance_weights(x, recon, z, post.mean, post.logvar, self.likelihood)

        return tuple(post.mean.shape[1:]), log_weights

    def _gaussian(self, h: torch.Tensor, dim: int = 1) -> DiagonalGaussian:
        """The Gaussian whose mean and log-variance are the two halves of `h` along `dim`, log-variance clamped to
        the config's bounds."""
        mean, logvar = h.chunk(2, dim=dim)
        return DiagonalGaussian(mean, logvar, clamp=(self.config.logvar_min, self.config.logvar_max))

    def _check_condition(self, condition) -> None:
        if condition is not None and not self.capabilities.conditional:
            raise VaelabError(f"model {self.config.model!r} takes no condition; use a conditional model "
                              "(--model cvae) to condition on labels")

    # The user-facing calls below run under no_grad, not inference_mode: what they return must feed any other
    # call, decode(embed(x)) included, and inference tensors cannot enter a graph that autograd records.
    @torch.no_grad()
    def embed(self, x: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        """Latent means (the features a user extracts), (B, *latent_shape)."""
        return self.encode(x, condition).mean

    @torch.no_grad()
    def reconstruct(self, x: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        """Decode the posterior mean: the deterministic reconstruction, in data space."""
        return self.mean_of(self.reconstruct_raw(x, condition))

    def reconstruct_raw(self, x: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        """The decoder's raw output (logits for Bernoulli) at the posterior mean: what the reconstruction error
        scores."""
        return self.decode_raw(self.encode(x, condition).mean, condition)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None,
               condition: torch.Tensor | None = None) -> torch.Tensor:
        """n draws from the prior N(0, I), decoded to data space (likelihood means). A conditional model takes a
        condition: one label / vector for all n, or n of them."""
        if not self.capabilities.samples:
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
        from vaelab.models.pretrained import save_pretrained

        save_pretrained(self, directory)

    @classmethod
    def from_pretrained(cls, directory, *, trust_code: bool = False) -> "Autoencoder":
        """The model of this class saved in `directory` (vaelab.from_pretrained loads any model). trust_code=True
        lets it import the module of networks of its own that live outside vaelab (importing runs that module's
        code): only for files you trust."""
        from vaelab.io import CONFIG_FILE, read_config
        from vaelab.models.pretrained import load_as

        saved = (read_config(directory).get("model") or {}).get("model")
        if saved != getattr(cls, "registry_name", None):
            raise CheckpointError(f"{str(Path(directory) / CONFIG_FILE)!r} holds a model {saved!r}, not "
                                  f"{getattr(cls, 'registry_name', cls.__name__)!r}; load it with "
                                  "vaelab.from_pretrained(directory)")
        return load_as(cls, directory, trust_code=trust_code)


def resolve_arch(cls: type[Autoencoder], config: ModelConfig) -> str:
    """What config.arch means for model class `cls`: "auto" is the model's default_arch, else conv for images
    and windows of a series (1-D convolutions), and mlp for vectors."""
    if config.arch != "auto":
        return config.arch
    return cls.default_arch or ("conv" if config.is_image or config.is_sequence else "mlp")


def activation_problems(cls: type[Autoencoder], config: ModelConfig) -> list[str]:
    """Why config.activation cannot apply: it sets the hidden layers of vaelab's own conv, conv-pool and mlp
    networks (and the models' MLPs), not the residual networks (SiLU after GroupNorm) nor the user's own."""
    if config.activation == "relu":
        return []
    if config.networks is not None:
        return [f"activation={config.activation!r} applies to vaelab's own networks; networks of your own "
                "(encoder= / decoder=) choose their own nonlinearity: leave activation at 'relu'"]
    if config.arch in cls.archs and resolve_arch(cls, config) == "resnet":
        return [f"activation={config.activation!r} does not apply to arch 'resnet', whose blocks use SiLU after "
                "GroupNorm; use arch 'conv' or 'mlp' for another activation, or leave it at 'relu'"]
    return []


def settings_problems(cls: type[Autoencoder], config: ModelConfig) -> list[str]:
    """Unknown keys in config.settings, and what the model's Settings say of the values."""
    names = [f.name for f in dataclasses.fields(cls.Settings)]
    unknown = sorted(set(config.settings) - set(names))
    if unknown:
        return [f"{k}={config.settings[k]!r} is not a setting of model {config.model!r}; its settings are "
                f"{names or 'none'}" for k in unknown]
    return cls.Settings(**config.settings).problems(config)


def shape_problems(config: ModelConfig, arch: str) -> list[str]:
    """Why the conv networks of `arch` cannot take config.input_shape (empty when they can)."""
    shape = config.input_shape
    if arch == "resnet":
        from vaelab.models import resnet

        return resnet.problems(config)
    if arch == "conv" and len(shape) == 2:  # windows of a series (C, L): 1-D convs along time
        n = len(config.channels)
        if shape[1] < 2 ** (n - 1) + 1 and n > 1:
            return [f"input_shape={shape!r} is too short for {n} downsampling layers of arch='conv' (each halves "
                    f"the length L={shape[1]}); use a longer window, fewer channels entries or arch='mlp'"]
    elif arch in ("conv", "conv-pool"):
        if len(shape) != 3:
            series = " (windows of a series, (C, L), take arch 'conv')" if len(shape) == 2 else ""
            return [f"arch={arch!r} needs image input (C, H, W), got input_shape={shape!r}; use arch='mlp'{series}"]
        # every stride-2 conv / 2x2 pool halves the size (rounding up); it must stay >= 1 pixel and
        # the architecture must not reduce an image below 2x2 before its last layer
        h, w = shape[1:]
        n = len(config.channels)
        if min(h, w) < 2 ** (n - 1) + 1 and n > 1:
            return [f"input_shape={shape!r} is too small for {n} downsampling layers of arch={arch!r} "
                    f"(each halves H and W); use fewer channels entries or arch='mlp'"]
    return []
