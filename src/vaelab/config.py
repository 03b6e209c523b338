"""Small frozen configs, named presets, and config files (TOML/YAML) whose keys mirror the CLI flags.

Two dataclasses describe a run: `ModelConfig` (what is built; saved next to the weights) and `TrainConfig`
(how it is trained). Both validate once and report every problem together.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import re
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable

from vaelab.errors import ConfigError

FORMAT_VERSION = 2  # bumped when the saved config or weight layout changes; older versions are migrated on load
# version 1 kept every model's own settings (beta, alpha, codebook_size, ...) flat beside the common fields;
# version 2 keeps them in "settings", the fields of the model's own Settings (see training/checkpoint.migrate)

ARCHS = ("auto", "conv", "conv-pool", "mlp", "resnet")
# losses.LIKELIHOOD_KINDS builds each (the continuous ones on [0, 1] or the reals; the discretized ones on 8-bit data)
LIKELIHOODS = ("bernoulli", "gaussian", "continuous-bernoulli", "discretized-logistic", "discretized-gaussian",
               "gaussian-learned")
# the nonlinearity of the hidden layers of vaelab's own networks (arch conv, conv-pool and mlp, and the MLPs of the
# semi-supervised models; models/nets.py maps each name to its layer): relu as the tutorial's Keras models, softplus as
# Kingma et al. 2014's M1+M2, tanh as Kingma & Welling 2014's MNIST VAE, elu. Each is monotonic (non-decreasing), so
# arch conv-pool may apply it after the max-pool exactly.
ACTIVATIONS = ("relu", "softplus", "tanh", "elu")
PRECISIONS = ("fp32", "bf16", "auto")  # auto: bf16 where the device computes it natively (training/runtime.py)
# the training options' choices (the modules that implement them check that they know each one)
NOISES = ("none", "gaussian", "masking", "salt-pepper")
KL_SCHEDULES = ("constant", "linear", "cyclical")
LR_SCHEDULES = ("constant", "cosine")
# semi-supervised batches (data/semisupervised.py): the least share of labelled samples in each, by default. A quarter
# costs no more per epoch than a tenth (a labelled sample is one (x, y) pair, an unlabelled one K pairs) and, on MNIST
# with 100 labels, learned the classes a little faster in short runs (test error 20.5% vs 22.7% after 1,500 steps)
LABELLED_SHARE = 0.25
# semi-supervised: the weight of a labelled sample's -ELBO at each visit (data/semisupervised.py): 1 (batch), or
# what makes an epoch count each labelled sample's bound once, as Kingma et al.'s objective (paper)
LABELLED_BOUNDS = ("batch", "paper")

# Checks of a ModelConfig that need the model registry (is the model known, are its settings valid). The models
# layer installs them when it is imported (vaelab.models), so this module never imports a model: layers point one
# way. Each takes the config and whether its common fields are valid, and returns its problems.
MODEL_CHECKS: list[Callable[["ModelConfig", bool], list[str]]] = []


@dataclass(frozen=True, init=False)
class ModelConfig:
    """What to build: the settings every model shares, plus `settings`, the model's own (saved with the weights).

    `input_shape` is filled in from the data: (C, H, W) for images, (D,) for vectors. A model's own settings
    (beta of a VAE, alpha of M2, codebook_size of a VQ-VAE, ...) are the fields of its `Settings` dataclass, in
    its own file under vaelab/models; pass them as keywords, `ModelConfig(model="vae", beta=4)`, and read them
    back as `config.settings["beta"]` (or `model.settings.beta` on a built model).

    arch:
      - "conv":      stride-2 3x3 convs (`channels`), dense layers (`hidden`), a dense latent of `latent_dim`;
                     the decoder mirrors it with transposed convs (the tutorial's VAE is this with
                     channels=(32, 64), hidden=(16,), latent_dim=2). Windows of a series, input_shape (C, L):
                     the same with stride-2 1-D convs of width 3 along the time axis.
      - "conv-pool": 3x3 conv + 2x2 max-pool per entry of `channels`; the latent is the last feature map
                     (channels[-1], H/4, W/4); the decoder mirrors it with upsampling (the tutorial's AE).
      - "mlp":       dense layers (`hidden`) on the flattened input.
      - "resnet":    one level per entry of `channels` (its width): `blocks` residual blocks (GroupNorm, SiLU,
                     3x3 convs) and a 2x downsampling; dense layers (`hidden`) to a dense latent (a code grid
                     for the VQ-VAE); the decoder mirrors it with 2x upsampling (models/resnet.py).
      - "auto":      the model's own default: "conv" for images and series windows, "mlp" for vectors unless
                     the model says otherwise.
    """

    model: str = "vae"
    arch: str = "auto"
    input_shape: tuple[int, ...] | None = None
    latent_dim: int = 16
    channels: tuple[int, ...] = (32, 64)
    hidden: tuple[int, ...] = (256,)
    blocks: tuple[int, ...] = (2,)  # arch resnet: residual blocks per level (one entry: the same at every level)
    likelihood: str = "bernoulli"
    gaussian_sigma: float = 1.0  # fixed observation noise of the Gaussian likelihood
    mixtures: int = 5  # logistics per sub-pixel of the discretized-logistic likelihood
    # bounds of the Gaussian posterior's log σ² (VAE family): exp(20) ≈ 5e8 and exp(-30) ≈ 1e-13 lie far
    # outside what a healthy posterior uses and far inside float32's exp range (±88), so the clamp only acts
    # on a diverging run, where it keeps exp(log σ²) and the KL finite (the bounds of diffusers' VAEs)
    logvar_min: float = -30.0
    logvar_max: float = 20.0
    condition_dim: int = 0  # size of the condition (number of classes for labels); conditional models only
    activation: str = "relu"  # the hidden layers' nonlinearity (ACTIVATIONS); arch resnet keeps its SiLU
    # networks of the user's own in place of `arch`'s (models/networks.py): {"encoder": {"class":
    # "pkg.mod:Name", "kwargs": {...}}, "decoder": {...}}; None: the networks of `arch`
    networks: dict | None = field(default=None, hash=False)
    settings: dict = field(default_factory=dict, hash=False)  # the model's own settings, by name

    def __init__(self, model: str = "vae", arch: str = "auto", input_shape: tuple[int, ...] | None = None,
                 latent_dim: int = 16, channels: tuple[int, ...] = (32, 64), hidden: tuple[int, ...] = (256,),
                 blocks: tuple[int, ...] = (2,), likelihood: str = "bernoulli", gaussian_sigma: float = 1.0,
                 mixtures: int = 5, logvar_min: float = -30.0, logvar_max: float = 20.0, condition_dim: int = 0,
                 activation: str = "relu", networks: dict | None = None, settings: dict | None = None,
                 **model_settings):
        common = dict(model=model, arch=arch, input_shape=input_shape, latent_dim=latent_dim, channels=channels,
                      hidden=hidden, blocks=(blocks,) if type(blocks) is int else blocks, likelihood=likelihood,
                      gaussian_sigma=gaussian_sigma, mixtures=mixtures, logvar_min=logvar_min, logvar_max=logvar_max,
                      condition_dim=condition_dim, activation=activation)
        for k, v in common.items():
            object.__setattr__(self, k, tuple(v) if isinstance(v, list) else v)
        object.__setattr__(self, "networks", copy.deepcopy(networks))
        own = {**(settings or {}), **model_settings}
        object.__setattr__(self, "settings", {k: tuple(v) if isinstance(v, list) else v for k, v in own.items()})

    def __getattr__(self, name: str):
        # a model's own setting read as an attribute (config.beta): only those the config holds
        if name.startswith("__") or name == "settings":
            raise AttributeError(name)
        settings = self.__dict__.get("settings", {})
        if name in settings:
            return settings[name]
        raise AttributeError(f"ModelConfig has no field or setting {name!r}; model {self.model!r}'s own settings "
                             f"here are {sorted(settings)}")

    def problems(self) -> list[str]:
        out = []
        if not isinstance(self.model, str) or not self.model:
            out.append(f"model={self.model!r} must be the name of a registered model")
        if self.arch not in ARCHS:
            out.append(f"arch={self.arch!r} is unknown; choose one of {list(ARCHS)}")
        if self.likelihood not in LIKELIHOODS:
            out.append(f"likelihood={self.likelihood!r} is unknown; choose one of {list(LIKELIHOODS)}")
        if self.activation not in ACTIVATIONS:
            out.append(f"activation={self.activation!r} is unknown; choose one of {list(ACTIVATIONS)}")
        if not is_int(self.latent_dim) or self.latent_dim < 1:
            out.append(f"latent_dim={self.latent_dim!r} must be a positive integer")
        for name in ("channels", "hidden"):
            value = getattr(self, name)
            if not (isinstance(value, tuple) and all(is_int(v) and v >= 1 for v in value)):
                out.append(f"{name}={list(value)!r} must be a list of positive integers")
        if self.arch in ("conv", "conv-pool", "resnet") and not self.channels:
            out.append(f"arch={self.arch!r} needs at least one entry in channels")
        if not (isinstance(self.blocks, tuple) and self.blocks and all(is_int(v) and v >= 0 for v in self.blocks)):
            out.append(f"blocks={list(self.blocks) if isinstance(self.blocks, tuple) else self.blocks!r} must be a "
                       "list of integers >= 0 (residual blocks per level of arch 'resnet')")
        elif self.arch == "resnet" and len(self.blocks) not in (1, len(self.channels)):
            out.append(f"blocks={list(self.blocks)!r} must have one entry (the same at every level) or one per "
                       f"channels entry ({len(self.channels)}: channels={list(self.channels)!r})")
        if not is_pos(self.gaussian_sigma):
            out.append(f"gaussian_sigma={self.gaussian_sigma!r} must be a positive number")
        if not is_int(self.mixtures) or self.mixtures < 1:
            out.append(f"mixtures={self.mixtures!r} must be a positive integer (logistics per sub-pixel of the "
                       "discretized-logistic likelihood; PixelCNN++ used 10 on CIFAR-10)")
        bounds = (self.logvar_min, self.logvar_max)
        finite = all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in bounds)
        if not (finite and self.logvar_min < self.logvar_max):
            out.append(f"logvar_min={self.logvar_min!r}, logvar_max={self.logvar_max!r} must be finite numbers "
                       "with logvar_min < logvar_max (the clamp of log σ², default -30 and 20)")
        if not is_int(self.condition_dim) or self.condition_dim < 0:
            out.append(f"condition_dim={self.condition_dim!r} must be an integer >= 0")
        out.extend(networks_problems(self.networks))
        if self.input_shape is not None and not (
                isinstance(self.input_shape, tuple) and len(self.input_shape) in (1, 2, 3)
                and all(is_int(s) and s >= 1 for s in self.input_shape)):
            out.append(f"input_shape={self.input_shape!r} must be (C, H, W) for images, (C, L) for windows of a "
                       "series or (D,) for vectors, positive integers")
        common_ok = not out
        for check in MODEL_CHECKS:
            out.extend(check(self, common_ok))
        return out

    def validate(self) -> ModelConfig:
        problems = self.problems()
        if problems:
            raise ConfigError(problems, "model configuration")
        return self

    @property
    def is_image(self) -> bool:
        return self.input_shape is not None and len(self.input_shape) == 3

    @property
    def is_sequence(self) -> bool:
        """Windows of a series: input_shape (C, L)."""
        return isinstance(self.input_shape, tuple) and len(self.input_shape) == 2

    def replace(self, **changes) -> ModelConfig:
        """A copy with `changes`: common fields by name, the model's own settings by name (merged into
        `settings`), or `settings=` to replace them all."""
        kwargs = {f.name: getattr(self, f.name) for f in fields(self)}
        own = dict(changes.pop("settings", kwargs.pop("settings")))
        for k, v in changes.items():
            if k in kwargs:
                kwargs[k] = v
            else:
                own[k] = v
        return ModelConfig(**kwargs, settings=own)

    def to_dict(self) -> dict:
        out = {f.name: _jsonable(getattr(self, f.name)) for f in fields(self) if f.name != "settings"}
        out["networks"] = copy.deepcopy(self.networks)
        out["settings"] = {k: _jsonable(v) for k, v in self.settings.items()}
        return out

    @classmethod
    def from_dict(cls, d: dict) -> ModelConfig:
        d = dict(d)
        settings = d.pop("settings", {})
        if not isinstance(settings, dict):
            raise ConfigError(f"settings={settings!r} must be a table of the model's own settings",
                              "model configuration")
        names = {f.name for f in fields(cls)} - {"settings"}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ConfigError([f"unknown key {k!r}; known keys: {sorted(names)}, and the model's own in "
                               "'settings'" for k in unknown], "model configuration")
        return cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in d.items()}, settings=settings)


@dataclass(frozen=True)
class TrainConfig:
    """How to train: the one training loop reads only this."""

    epochs: int = 10
    batch_size: int = 128
    lr: float = 1e-3
    lr_schedule: str = "constant"  # constant | cosine (from lr down to lr_min over all the run's steps)
    lr_min: float = 0.0  # the cosine schedule's final learning rate
    seed: int = 0
    binarize: bool = False  # dynamic binarization: each batch is a fresh Bernoulli draw of the pixels
    early_stopping: int = 0  # patience in epochs on the validation loss; 0 = off
    checkpoint_every: int = 0  # also checkpoint every this many optimizer steps; 0 = at epoch ends only
    grad_clip: float = 0.0  # max global gradient norm; 0 = off
    threads: int = 0  # torch intra-op threads; 0 = all cores
    progress: bool = True
    noise: str = "none"  # input corruption for denoising: none | gaussian | masking | salt-pepper
    noise_level: float = 0.0  # σ of gaussian noise, or the fraction of entries masked / salted
    kl_schedule: str = "constant"  # constant | linear (warm-up) | cyclical
    kl_warmup: float = 0.0  # epochs of the linear warm-up, or the length of one cycle (cyclical)
    capacity: float = 0.0  # Burgess et al.: target KL C in nats reached after capacity_epochs; 0 = off
    capacity_epochs: float = 0.0
    free_bits: float = 0.0  # nats per latent dimension below which the KL is not penalised; 0 = off
    iw_samples: int = 1  # importance samples of the IWAE bound; 1 = the ELBO
    labels: int = 0  # semi-supervised (m2): keep this many labels, balanced over the classes; 0 = keep all
    labelled_share: float = LABELLED_SHARE  # semi-supervised: the least share of labelled samples in a batch
    labelled_bound: str = "batch"  # semi-supervised: the weight of a labelled sample's -ELBO (LABELLED_BOUNDS)
    # fp32 | bf16 (mixed precision: bf16 autocast forward, fp32 weights and losses) | auto: bf16 where the device
    # computes it natively and a measured training step is faster in it, else fp32 (training/loop.py)
    precision: str = "auto"
    device: str = "auto"  # auto (a GPU when there is one, else the CPU), cpu, cuda, cuda:N

    def problems(self) -> list[str]:
        out = []
        if not is_int(self.epochs) or self.epochs < 1:
            out.append(f"epochs={self.epochs!r} must be a positive integer")
        if not is_int(self.batch_size) or self.batch_size < 1:
            out.append(f"batch_size={self.batch_size!r} must be a positive integer")
        if not is_pos(self.lr):
            out.append(f"lr={self.lr!r} must be a positive number (Adam's learning rate, e.g. 1e-3)")
        if self.lr_schedule not in LR_SCHEDULES:
            out.append(f"lr_schedule={self.lr_schedule!r} is unknown; choose one of {list(LR_SCHEDULES)}")
        if not is_nonneg(self.lr_min) or (is_pos(self.lr) and self.lr_min > self.lr):
            out.append(f"lr_min={self.lr_min!r} must be a number >= 0 and <= lr={self.lr!r} (the cosine "
                       "schedule's final learning rate)")
        if not is_int(self.seed) or self.seed < 0:
            out.append(f"seed={self.seed!r} must be an integer >= 0")
        if not is_int(self.early_stopping) or self.early_stopping < 0:
            out.append(f"early_stopping={self.early_stopping!r} must be an integer >= 0 (patience in epochs)")
        if not is_int(self.checkpoint_every) or self.checkpoint_every < 0:
            out.append(f"checkpoint_every={self.checkpoint_every!r} must be an integer >= 0 (optimizer steps "
                       "between checkpoints; 0 = only at the end of each epoch)")
        if not (isinstance(self.grad_clip, (int, float)) and math.isfinite(self.grad_clip)
                and self.grad_clip >= 0):
            out.append(f"grad_clip={self.grad_clip!r} must be a number >= 0 (0 turns clipping off)")
        if not is_int(self.threads) or self.threads < 0:
            out.append(f"threads={self.threads!r} must be an integer >= 0 (0 = all cores)")
        if self.noise not in NOISES:
            out.append(f"noise={self.noise!r} is unknown; choose one of {list(NOISES)}")
        if not is_nonneg(self.noise_level) or (self.noise in ("masking", "salt-pepper") and self.noise_level > 1):
            out.append(f"noise_level={self.noise_level!r} must be >= 0 (and <= 1 for masking and salt-pepper)")
        if self.kl_schedule not in KL_SCHEDULES:
            out.append(f"kl_schedule={self.kl_schedule!r} is unknown; choose one of {list(KL_SCHEDULES)}")
        elif self.kl_schedule != "constant" and not (is_nonneg(self.kl_warmup) and self.kl_warmup > 0):
            out.append(f"kl_schedule={self.kl_schedule!r} needs kl_warmup > 0 (epochs of warm-up, or of one "
                       f"cycle), got {self.kl_warmup!r}")
        for name in ("kl_warmup", "capacity", "capacity_epochs", "free_bits"):
            if not is_nonneg(getattr(self, name)):
                out.append(f"{name}={getattr(self, name)!r} must be a finite number >= 0")
        if not (isinstance(self.device, str) and re.fullmatch(r"auto|cpu|cuda(:\d+)?|mps", self.device)):
            out.append(f"device={self.device!r} is unknown; use auto, cpu, cuda, cuda:N or mps")
        if not is_int(self.iw_samples) or self.iw_samples < 1:
            out.append(f"iw_samples={self.iw_samples!r} must be an integer >= 1 (1 = the plain ELBO)")
        if not is_int(self.labels) or self.labels < 0:
            out.append(f"labels={self.labels!r} must be an integer >= 0 (how many training labels to keep; "
                       "0 keeps them all)")
        if not (is_pos(self.labelled_share) and self.labelled_share < 1):
            out.append(f"labelled_share={self.labelled_share!r} must be a number between 0 and 1, both excluded (the "
                       "least share of labelled samples in a semi-supervised batch; e.g. 0.25, a quarter)")
        if self.labelled_bound not in LABELLED_BOUNDS:
            out.append(f"labelled_bound={self.labelled_bound!r} is unknown; choose one of {list(LABELLED_BOUNDS)} (the "
                       "weight of a labelled sample's -ELBO in a semi-supervised batch)")
        elif self.labelled_bound != "batch" and self.labels == 0:
            out.append(f"labelled_bound={self.labelled_bound!r} weighs the labelled samples among hidden-label ones, "
                       "but labels=0 keeps every label; set labels=N (--labels N) or drop it")
        if self.precision not in PRECISIONS:
            out.append(f"precision={self.precision!r} is unknown; choose one of {list(PRECISIONS)} (bf16 = "
                       "mixed precision, faster on CPUs with AVX-512 BF16 / AMX and on recent GPUs; auto = bf16 "
                       "where the device computes bf16 natively and a training step measures faster in it, else "
                       "fp32)")
        return out

    def validate(self) -> TrainConfig:
        problems = self.problems()
        if problems:
            raise ConfigError(problems, "training configuration")
        return self

    def replace(self, **changes) -> TrainConfig:
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict:
        return _to_jsonable(self)

    @classmethod
    def from_dict(cls, d: dict) -> TrainConfig:
        return _from_dict(cls, d, "training configuration")


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    model: ModelConfig
    train: TrainConfig = field(default_factory=TrainConfig)


PRESETS: dict[str, Preset] = {
    p.name: p
    for p in (
        Preset(
            "seed-conv-ae",
            "The tutorial's conv autoencoder: Conv(32)-MaxPool-Conv(16)-MaxPool (latent 16x7x7 on MNIST), "
            "mirrored with upsampling; sigmoid output, binary cross-entropy, Adam, batch 256.",
            ModelConfig(model="ae", arch="conv-pool", channels=(32, 16), likelihood="bernoulli"),
            TrainConfig(batch_size=256),
        ),
        Preset(
            "seed-vae",
            "The tutorial's conv VAE: Conv(32,s2)-Conv(64,s2)-Dense(16)-(mu, log var), latent 2; decoder "
            "Dense(7*7*64)-ConvT(64,s2)-ConvT(32,s2)-ConvT(1) sigmoid; loss 784*BCE + KL, Adam, batch 128.",
            ModelConfig(model="vae", arch="conv", channels=(32, 64), hidden=(16,), latent_dim=2,
                        likelihood="bernoulli"),
            TrainConfig(batch_size=128),
        ),
        Preset(
            "conv-ae-128",
            "A conv autoencoder with a 128-dim code (as the Keras blog's 4x4x8 one): Conv(32,s2)-Conv(64,s2)-"
            "Dense(128), mirrored with transposed convs; sigmoid output, binary cross-entropy, Adam, batch 128.",
            ModelConfig(model="ae", arch="conv", channels=(32, 64), hidden=(), latent_dim=128,
                        likelihood="bernoulli"),
            TrainConfig(batch_size=128),
        ),
        Preset(
            "mnist-vae",
            "A VAE for the literature's MNIST likelihood protocol: MLP 784-512-512-(latent 32)-512-512-784, "
            "Bernoulli, dynamically binarized inputs, Adam 1e-3 with cosine decay to 1e-5, batch 100, 230 "
            "epochs (30 minutes on 2 CPU cores); score it with `vaelab evaluate RUN --nll-samples 5000 "
            "--binarize dynamic`.",
            ModelConfig(model="vae", arch="mlp", hidden=(512, 512), latent_dim=32, likelihood="bernoulli"),
            TrainConfig(epochs=230, batch_size=100, binarize=True, lr_schedule="cosine", lr_min=1e-5),
        ),
        Preset(
            "mnist-hvae",
            "The longer likelihood recipe: the two-stochastic-layer VAE (model hvae) of the IWAE paper, wider: MLP "
            "784-512-512-(z1 64)-256-256-(z2 32) and back, Bernoulli, trained on the IWAE bound with K=5 importance "
            "samples after a 40-epoch linear warm-up of the weights' KL part (without it the top layer closes at "
            "once), dynamically binarized inputs, Adam 1e-3 with cosine decay to 1e-5, batch "
            "100, 400 epochs (13 s each on 2 CPU cores in bf16, which --precision auto takes where it measures faster: "
            "90 minutes); score it with `vaelab evaluate RUN "
            "--nll-samples 5000 --binarize dynamic`.",
            ModelConfig(model="hvae", arch="mlp", hidden=(512, 512), latent_dim=64, latent2_dim=32,
                        hidden2=(256, 256), likelihood="bernoulli"),
            TrainConfig(epochs=400, batch_size=100, binarize=True, lr_schedule="cosine", lr_min=1e-5, iw_samples=5,
                        kl_schedule="linear", kl_warmup=40),
        ),
        Preset(
            "resnet-32",
            "A VAE for 32x32 colour images (CIFAR-10, SVHN): residual networks (arch resnet) of 3 levels, widths "
            "64-128-256 with 2 GroupNorm/SiLU residual blocks each (32 -> 4 px), latent 128, the discretized "
            "logistic mixture likelihood of 8-bit pixels (5 logistics; bits/dim in `vaelab evaluate`), Adam 1e-3 "
            "with cosine decay to 1e-5, batch 64.",
            ModelConfig(model="vae", arch="resnet", channels=(64, 128, 256), blocks=(2,), hidden=(), latent_dim=128,
                        likelihood="discretized-logistic"),
            TrainConfig(epochs=50, batch_size=64, lr_schedule="cosine", lr_min=1e-5),
        ),
        Preset(
            "resnet-64",
            "A VAE for 64x64 colour images (emoji, CelebA): residual networks (arch resnet) of 4 levels, widths "
            "32-64-128-256 with 1 GroupNorm/SiLU residual block each (64 -> 4 px), latent 128, the discretized "
            "logistic mixture likelihood of 8-bit pixels (5 logistics; bits/dim in `vaelab evaluate`), Adam 1e-3 "
            "with cosine decay to 1e-5, batch 64.",
            ModelConfig(model="vae", arch="resnet", channels=(32, 64, 128, 256), blocks=(1,), hidden=(),
                        latent_dim=128, likelihood="discretized-logistic"),
            TrainConfig(epochs=50, batch_size=64, lr_schedule="cosine", lr_min=1e-5),
        ),
        Preset(
            "vqvae-resnet-64",
            "A VQ-VAE for 64x64 colour images: residual networks (arch resnet) of 2 levels, widths 64-128 with 2 "
            "GroupNorm/SiLU residual blocks each, a 16x16 grid of codes of 64 values from a codebook of 512 (EMA, "
            "k-means init, dead-code restarts), the discretized logistic mixture likelihood of 8-bit pixels, "
            "Adam 1e-3 with cosine decay to 1e-5, batch 64; `vaelab train-prior RUN` then fits its code prior.",
            ModelConfig(model="vqvae", arch="resnet", channels=(64, 128), blocks=(2,), latent_dim=64,
                        likelihood="discretized-logistic", codebook_size=512),
            TrainConfig(epochs=50, batch_size=64, lr_schedule="cosine", lr_min=1e-5),
        ),
        Preset(
            "m2",
            "Kingma et al.'s semi-supervised M2 (give it --labels N) with benchmarks/m2.py's recipe: MLPs of 500 "
            "units, latent 50, Bernoulli; beta 2 on the KL of z, so the decoder takes the class from y rather than "
            "from z; alpha 10 (the paper's 0.1 learns the classes far slower in a short budget); Adam 1e-3 with "
            "cosine decay to 1e-5, batch 128 (a quarter labelled), 40 epochs (25 s each on MNIST on one CPU "
            "thread with --precision bf16: 17 minutes; mean test error over 3 label draws: 8.7% with 100 labels, "
            "3.9% with 1000).",
            ModelConfig(model="m2", hidden=(500,), latent_dim=50, likelihood="bernoulli", beta=2.0, alpha=10.0),
            TrainConfig(epochs=40, batch_size=128, lr=1e-3, lr_schedule="cosine", lr_min=1e-5),
        ),
        Preset(
            "adgm",
            "Maaløe et al.'s auxiliary deep generative model (give it --labels N): MLPs of 2 x 500 units as in the "
            "paper, z and the auxiliary a of 100 each, Bernoulli; alpha 10 and beta 2 (on the KL terms of z and a), "
            "chosen on a validation split (benchmarks/m2.py --validation: the last 10,000 training images, 100 "
            "labels drawn from the first 50,000, 10 epochs, one draw): alpha 1 / 10 / 30 gave 23.1 / 13.7 / 13.6% "
            "validation error at beta 1, and beta 2 gave 11.3% against 14.7% after 5 epochs; Adam 1e-3 with cosine "
            "decay to 1e-5, batch 128 (a quarter labelled), 80 epochs, chosen on the same split: 4.64% validation "
            "error after 80 where a 40-epoch schedule ended at 6.92% (44-70 s an epoch on 50,000 MNIST images on "
            "one CPU thread with --precision bf16, about an hour in all; about 200 s an epoch in fp32 on a CPU "
            "without native bf16). MNIST test error: see docs/results.md#m1m2-adgm.",
            ModelConfig(model="adgm", hidden=(500, 500), latent_dim=100, aux_dim=100, likelihood="bernoulli",
                        alpha=10.0, beta=2.0),
            TrainConfig(epochs=80, batch_size=128, lr=1e-3, lr_schedule="cosine", lr_min=1e-5),
        ),
        Preset(
            "m1m2",
            "Kingma et al.'s M1+M2 (give it --labels N): M1, a VAE of the images (MLP 784-600-600, latent 50, "
            "Bernoulli), trains alone for the first 20 epochs on batches drawn uniformly from all training images; "
            "then M2 (MLPs of 500 units, latent 50, alpha 10) learns from M1's codes, drawn from q(z1|x) afresh "
            "each batch, for 100 more, on batches a tenth labelled; Adam 1e-3 with cosine decay to 1e-5 over the "
            "120 epochs, batch 128. Chosen on a validation split of the training images (benchmarks/m2.py "
            "--validation, 100 labels, seed 0): uniform M1 batches 6.5% against 9.5% mixed, alpha 10 against 1, "
            "M2's error still falling after 40 epochs and flat from about 100, a tenth of each batch labelled "
            "4.34% against a quarter's 5.47% (a twentieth, after a longer M1, and a half, each stopped early, "
            "stood above 17%); the trained model classifies by M2's posterior p(y|z1) from 20 importance samples "
            "per class, which erred 4.00% on that split where the classifier q(y|z1) erred 4.34% (5 samples "
            "4.10%); MNIST test error: see docs/results.md#m1m2-adgm.",
            ModelConfig(model="m1m2", arch="mlp", hidden=(600, 600), latent_dim=50, likelihood="bernoulli",
                        m2_hidden=(500,), m2_latent=50, alpha=10.0, m1_epochs=20, posterior_samples=20),
            TrainConfig(epochs=120, batch_size=128, lr=1e-3, lr_schedule="cosine", lr_min=1e-5, labelled_share=0.1),
        ),
    )
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise ConfigError(f"preset={name!r} is unknown; choose one of {sorted(PRESETS)}") from None


def load_config_file(path: str | Path) -> dict[str, Any]:
    """Read a TOML or YAML config file into a flat dict whose keys mirror the CLI flags.

    Dashes and underscores are interchangeable (`latent-dim` = `latent_dim`). Tables/sections named
    `model`, `train` or `data` are flattened into the top level, so both styles work.
    """
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist", "config file")
    text = path.read_text(encoding="utf-8")
    suffix = path.suffix.lower()
    try:
        if suffix == ".toml":
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib
            raw = tomllib.loads(text)
        elif suffix in (".yaml", ".yml"):
            import yaml

            raw = yaml.safe_load(text) or {}
        elif suffix == ".json":
            raw = json.loads(text)
        else:
            raise ConfigError(f"{str(path)!r}: unknown config format {suffix!r}; use .toml, .yaml/.yml or .json",
                              "config file")
    except ConfigError:
        raise
    except Exception as e:  # a parser's own error type differs per format; report it the same way
        raise ConfigError(f"{str(path)!r} could not be parsed: {e}", "config file") from None
    if not isinstance(raw, dict):
        raise ConfigError(f"{str(path)!r} must hold a table of keys, got {type(raw).__name__}", "config file")
    flat: dict[str, Any] = {}
    for key, value in raw.items():
        if key in ("model", "train", "data") and isinstance(value, dict):
            for k, v in value.items():
                flat[k.replace("-", "_")] = v
        else:
            flat[key.replace("-", "_")] = value
    return flat


# --------------------------------------------------------------------------------------------- helpers


def is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def is_nonneg(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v >= 0


def is_pos(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) and v > 0


def networks_problems(networks) -> list[str]:
    """What is wrong with a ModelConfig's `networks`: None, or {"encoder": spec, "decoder": spec}, each spec
    {"class": "package.module:Name", "kwargs": a table of keyword arguments, or None when unknown}."""
    if networks is None:
        return []
    if not isinstance(networks, dict) or set(networks) != {"encoder", "decoder"}:
        return [f"networks={networks!r} must be None or a table of two entries, 'encoder' and 'decoder'"]
    out = []
    for part in ("encoder", "decoder"):
        spec = networks[part]
        if not isinstance(spec, dict) or set(spec) != {"class", "kwargs"}:
            out.append(f"networks[{part!r}]={spec!r} must be a table of 'class' ('package.module:Name') and 'kwargs'")
            continue
        path = spec["class"]
        module, sep, name = path.partition(":") if isinstance(path, str) else ("", "", "")
        if not (sep and name and all(p.isidentifier() for p in module.split("."))):
            out.append(f"networks[{part!r}]['class']={path!r} must name a class as 'package.module:Name'")
        if spec["kwargs"] is not None and not isinstance(spec["kwargs"], dict):
            out.append(f"networks[{part!r}]['kwargs']={spec['kwargs']!r} must be a table of keyword arguments")
    return out


def _jsonable(v):
    return list(v) if isinstance(v, tuple) else v


def _to_jsonable(obj) -> dict:
    return {f.name: _jsonable(getattr(obj, f.name)) for f in fields(obj)}


def _from_dict(cls, d: dict, context: str):
    names = {f.name: f for f in fields(cls)}
    unknown = sorted(set(d) - set(names))
    if unknown:
        raise ConfigError([f"unknown key {k!r}; known keys: {sorted(names)}" for k in unknown], context)
    kwargs = {}
    for k, v in d.items():
        if isinstance(v, list):
            v = tuple(v)
        kwargs[k] = v
    return cls(**kwargs)
