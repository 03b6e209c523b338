"""The VQ-VAE (van den Oord et al. 2017, "Neural Discrete Representation Learning",
https://arxiv.org/abs/1711.00937): an encoder's output map, quantized to the nearest of K learned codes, decoded.

    x -> encoder -> z_e (B, D, h, w) -> quantizer -> codes e (B, D, h, w), indices (B, h, w) -> decoder -> x'

D is `latent_dim`, K is `codebook_size`; for MNIST with channels (32, 64) the grid is 7x7. Training minimises
recon + ||sg(z_e) - e||^2 + β||z_e - sg(e)||^2 (vqvae_loss); the decoder's gradient reaches the encoder
through the straight-through estimator. The codebook itself moves by EMA (see models/quantizer.py).

A VQ-VAE has no fixed prior to sample codes from: `vaelab train-prior RUN` fits an autoregressive prior over the
code grids of the training set (models/prior.py) and stores it in the model (config.json + model.safetensors),
after which `sample` draws code grids from it and decodes them.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import torch
from torch import nn

from vaelab.config import is_int, is_nonneg
from vaelab.errors import VaelabError
from vaelab.losses import Likelihood, Shaping, flat, likelihood_of, pixel_metrics, recon_nll
from vaelab.models.base import Autoencoder, Capabilities, ModelOutput, ModelSettings, PointMass
from vaelab.models import resnet
from vaelab.models.nets import _init_like_keras, activation, build_networks
from vaelab.models.quantizer import VectorQuantizer, usage_metrics
from vaelab.models.registry import register


@dataclass(frozen=True)
class VQVAESettings(ModelSettings):
    codebook_size: int = field(default=512, metadata={"help": "the number of codes K"})
    vq_commitment: float = field(default=0.25, metadata={
        "help": "weight β of the commitment loss β||z_e - sg(e)||^2 (the paper uses 0.25)"})
    vq_ema: bool = field(default=True, metadata={"help": "move the codebook by exponential moving averages "
                                                         "(--no-vq-ema: by the codebook loss)"})
    vq_kmeans_init: bool = field(default=True, metadata={"help": "start the codebook from k-means on the first "
                                                                 "training batch"})
    vq_restart_after: int = field(default=20, metadata={
        "help": "training steps a code may go unused before it is restarted on an encoder output (0 = never)"})
    # the autoregressive prior over the code grid, set by `vaelab train-prior` (see models/prior.py)
    prior_layers: int = field(default=0, metadata={"flag": False})  # 0 = no prior yet
    prior_channels: int = field(default=32, metadata={"flag": False})
    prior_classes: int = field(default=0, metadata={"flag": False})  # > 0: class-conditional over that many

    def problems(self, config) -> list[str]:
        out = []
        if not is_int(self.codebook_size) or self.codebook_size < 2:
            out.append(f"codebook_size={self.codebook_size!r} must be an integer >= 2 (the number of codes K)")
        if not is_nonneg(self.vq_commitment):
            out.append(f"vq_commitment={self.vq_commitment!r} must be a finite number >= 0 (the paper uses 0.25)")
        for name in ("vq_ema", "vq_kmeans_init"):
            if not isinstance(getattr(self, name), bool):
                out.append(f"{name}={getattr(self, name)!r} must be true or false")
        for name, low in (("vq_restart_after", 0), ("prior_layers", 0), ("prior_channels", 1), ("prior_classes", 0)):
            value = getattr(self, name)
            if not is_int(value) or value < low:
                out.append(f"{name}={value!r} must be an integer >= {low}")
        return out


def vqvae_loss(x, out: ModelOutput, *, likelihood: Likelihood | str = "bernoulli",
               sigma: float = 1.0, commitment: float = 0.25,
               target: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The VQ-VAE objective of van den Oord et al. 2017 (eq. 3), per sample:

        recon + ||sg(z_e) - e||^2 + β ||z_e - sg(e)||^2        (β = `commitment`, sg = stop-gradient)

    with the squared distances summed over the code grid, as recon is summed over the pixels. `out.posterior`
    carries the encoder's output `z_e` and the chosen codes e as its `mean`; `out.recon` decoded the
    straight-through code, so the reconstruction's gradient reaches the encoder. The codebook term has a
    gradient only when the codebook is a parameter (vq_ema=False); under EMA updates the quantizer moves the
    codebook and the term is a constant, kept so that "loss" is the same quantity in both modes.
    "commitment" reports ||z_e - e||^2 without β.
    """
    target = x if target is None else target
    z_e, codes = out.posterior.z_e, out.posterior.mean  # (B, D, *grid) each
    recon = recon_nll(target, out.recon, likelihood, sigma)
    commit = flat((z_e - codes.detach()) ** 2).sum(1)  # pulls the encoder to its codes
    codebook = flat((z_e.detach() - codes) ** 2).sum(1)  # pulls the codes to the encoder (same value)
    return {"loss": recon + codebook + commitment * commit, "recon": recon, "commitment": commit,
            **pixel_metrics(target, out.recon, likelihood)}


class CodePosterior(PointMass):
    """The 'posterior' of a VQ-VAE: all mass on the chosen codes, `mean` (B, D, *grid). It also carries the
    encoder's output `z_e` (the loss's commitment term compares the two) and the code `indices` (B, *grid).

    Carrying z_e here, rather than a commitment term in the output record, keeps the model computing and the
    loss judging: vqvae_loss derives both of the paper's distance terms from (z_e, e) alone."""

    def __init__(self, codes: torch.Tensor, z_e: torch.Tensor, indices: torch.Tensor):
        super().__init__(codes)
        self.z_e = z_e
        self.indices = indices

    def float(self) -> CodePosterior:
        return CodePosterior(self.mean.float(), self.z_e.float(), self.indices)


class ResidualBlock(nn.Module):
    """x + Conv1x1(ReLU(Conv3x3(ReLU(x)))), the paper's residual block (with half the channels inside; `act` in
    place of ReLU with the config's activation)."""

    def __init__(self, channels: int, act: type[nn.Module]):
        super().__init__()
        self.net = nn.Sequential(act(), nn.Conv2d(channels, channels // 2 or 1, 3, padding=1), act(),
                                 nn.Conv2d(channels // 2 or 1, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.net(x)


def conv_networks(config, blocks: int = 2) -> tuple[nn.Module, nn.Module, tuple[int, ...]]:
    """The paper's encoder and decoder, scaled by `channels`: one stride-2 3x3 conv per entry (each halves H
    and W, rounding up, as in models/nets.py), a 3x3 conv, `blocks` residual blocks and a 1x1 conv to D;
    the decoder mirrors it with transposed convs that restore the exact input size (odd sizes too)."""
    c_in, h, w = config.input_shape
    chans, d = list(config.channels), config.latent_dim
    act = activation(config)
    sizes = [(h, w)]
    for _ in chans:
        sizes.append(((sizes[-1][0] + 1) // 2, (sizes[-1][1] + 1) // 2))
    enc: list[nn.Module] = []
    prev = c_in
    for c in chans:  # (B, prev, H, W) -> (B, c, ceil(H/2), ceil(W/2))
        enc += [nn.Conv2d(prev, c, 3, stride=2, padding=1), act()]
        prev = c
    enc += [nn.Conv2d(prev, prev, 3, padding=1)] + [ResidualBlock(prev, act) for _ in range(blocks)]
    enc += [act(), nn.Conv2d(prev, d, 1)]  # (B, D, h, w): z_e, unbounded, for the quantizer

    dec: list[nn.Module] = [nn.Conv2d(d, prev, 3, padding=1)] + [ResidualBlock(prev, act) for _ in range(blocks)]
    dec.append(act())
    for i, c in enumerate(reversed(chans)):  # each transposed conv doubles the size back exactly
        target = sizes[len(chans) - 1 - i]
        pad = (1 - target[0] % 2, 1 - target[1] % 2)
        dec += [nn.ConvTranspose2d(prev, c, 3, stride=2, padding=1, output_padding=pad), act()]
        prev = c
    c_out = likelihood_of(config).raw_shape(config.input_shape)[0]  # the likelihood's parameters per pixel
    dec.append(nn.Conv2d(prev, c_out, 3, padding=1))  # the output layer: logits, means, ..., no activation
    encoder, decoder = nn.Sequential(*enc), nn.Sequential(*dec)
    # Glorot weights and zero biases, as the other models: with PyTorch's default init the activations start
    # so small that the biases decide the sign, and a residual block's narrow ReLU can start dead
    _init_like_keras(encoder)
    _init_like_keras(decoder)
    # channels-last weights: NHWC convolutions, the fastest layout for oneDNN's CPU kernels (as models/nets.py)
    encoder.to(memory_format=torch.channels_last)
    decoder.to(memory_format=torch.channels_last)
    return encoder, decoder, (d, *sizes[-1])


@register("vqvae", description="VQ-VAE: a grid of discrete codes (EMA codebook, k-means init, dead-code restarts); "
                      "generates after `vaelab train-prior` fits its autoregressive prior.")
class VQVAE(Autoencoder):
    """Images get the paper's conv networks (arch auto/conv) and a (latent_dim, H/2^n, W/2^n) code grid; arch
    resnet the residual networks of models/resnet.py with the same grid; arch mlp (and vector data) gets the MLP
    of models/nets.py and one code of latent_dim values per sample."""

    Settings = VQVAESettings
    # no N(0, I) prior: a VQ-VAE samples once `vaelab train-prior` has fitted its code prior (set_prior)
    capabilities = Capabilities(discrete=True)
    objective = staticmethod(vqvae_loss)
    archs = ("auto", "conv", "mlp", "resnet")
    custom_networks = False  # builds its own networks (a spatial code grid)

    def __init__(self, config):
        # the networks differ from the other models' (a spatial code grid), so build_networks is not used
        nn.Module.__init__(self)
        self.config = config
        s = self.settings
        if self.arch == "mlp":
            self.encoder, self.decoder, _ = build_networks(config, 1, "mlp")
            self.latent_shape = (config.latent_dim, 1, 1)  # a 1x1 grid: one code per sample
        elif self.arch == "resnet":
            self.encoder, self.decoder, self.latent_shape = resnet.build(config, 1, spatial=True)
        else:
            self.encoder, self.decoder, self.latent_shape = conv_networks(config)
        self.quantizer = VectorQuantizer(s.codebook_size, config.latent_dim, ema=s.vq_ema,
                                         kmeans_init=s.vq_kmeans_init, restart_after=s.vq_restart_after)
        prior = None
        if s.prior_layers:
            from vaelab.models.prior import CodePrior

            prior = CodePrior(s.codebook_size, self.latent_shape[1:], s.prior_channels, s.prior_layers,
                              s.prior_classes)
        self.set_prior(prior)

    @classmethod
    def config_for_training(cls, config):
        """Without the code prior: it fits the codes of these weights, and training moves them."""
        if not config.settings.get("prior_layers"):
            return config, None
        return config.replace(prior_layers=0, prior_classes=0), (
            "changes its codes, so it continues without its code prior; fit a new one afterwards with "
            "`vaelab train-prior RUN`")

    def set_prior(self, prior: nn.Module | None, config=None) -> None:
        """Attach a fitted code prior (models/prior.CodePrior; None detaches it), with the config that
        describes it; the model can then sample."""
        if config is not None:
            self.config = config
        self.prior = prior
        self.capabilities = replace(type(self).capabilities, samples=prior is not None)

    def loss_weights(self, shaping: Shaping) -> dict:
        return {**super().loss_weights(shaping), "commitment": self.settings.vq_commitment}

    @property
    def grid(self) -> tuple[int, int]:
        return tuple(self.latent_shape[1:])

    def _encode_map(self, x: torch.Tensor) -> torch.Tensor:
        z_e = self.encoder(x)
        return z_e if z_e.dim() == 4 else z_e[:, :, None, None]  # (B, D, h, w); the MLP's (B, D) as 1x1

    def encode(self, x: torch.Tensor, condition: torch.Tensor | None = None) -> CodePosterior:
        self._check_condition(condition)
        z_e = self._encode_map(x)
        # the codebook moves only in a training forward (training mode, gradients on): never under
        # evaluation, nor in reconstruct / embed / sample (inference mode) on a model left in training mode
        codes, indices = self.quantizer(z_e, update=self.training and torch.is_grad_enabled())
        return CodePosterior(codes, z_e, indices)

    def decode_raw(self, z: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        self._check_condition(condition)
        return self.decoder(z if self.arch != "mlp" else z.flatten(1))

    def forward(self, x: torch.Tensor, condition: torch.Tensor | None = None, n_samples: int = 1) -> ModelOutput:
        if n_samples != 1:
            raise VaelabError(f"a VQ-VAE's encoder is deterministic: n_samples must be 1, got {n_samples} "
                              "(importance-weighted training needs a VAE)")
        post = self.encode(x, condition)
        # straight-through estimator (paper section 3.1): the decoder sees the codes e, and its gradient with
        # respect to them is passed to z_e unchanged, since the nearest-code choice has no gradient
        z = post.z_e + (post.mean - post.z_e).detach()
        return ModelOutput(recon=self.decode_raw(z), z=z, posterior=post)

    # ----------------------------------------------------------------------------------- discrete codes

    @torch.no_grad()
    def encode_indices(self, x: torch.Tensor) -> torch.Tensor:
        """The code indices of x, (B, h, w) int64; decode_indices maps them back to reconstructions."""
        return self.quantizer(self._encode_map(x), update=False)[1]

    @torch.no_grad()
    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Decode code indices (B, h, w) to data space: exactly `reconstruct(x)` for indices of x."""
        return self.decode(self.quantizer.lookup(indices.to(self._device())))

    # ----------------------------------------------------------------------------------------- sampling

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None,
               condition: torch.Tensor | None = None) -> torch.Tensor:
        """n code grids drawn from the trained prior, decoded. A class-conditional prior takes a label (one for
        all n, or n of them); without one, each sample's class is drawn uniformly."""
        if self.prior is None:
            raise VaelabError(
                "model 'vqvae' has no prior to sample from yet: a VQ-VAE generates by drawing code grids from an "
                "autoregressive prior fitted to its codes. Run `vaelab train-prior RUN_DIR` on the training run "
                "(Python: vaelab.prior.train_prior(run_dir)), then sample")
        labels = self.prior_labels(condition, n, generator)
        return self.decode_indices(self.prior.sample(n, labels, generator))

    def prior_labels(self, condition, n: int, generator: torch.Generator | None = None) -> torch.Tensor | None:
        """The prior's labels for n samples: None for an unconditional prior; else (n,) class indices."""
        k = self.settings.prior_classes
        if not k:
            if condition is not None:
                raise VaelabError("this VQ-VAE's prior is unconditional and takes no label; train a "
                                  "class-conditional one with `vaelab train-prior RUN` on labelled data")
            return None
        device = self._device()
        if condition is None:
            gen_device = generator.device if generator is not None else device
            return torch.randint(k, (n,), generator=generator, device=gen_device).to(device)
        labels = torch.as_tensor(condition, device=device)
        if labels.is_floating_point() or labels.dim() > 1:
            raise VaelabError(f"the prior's condition is a class label in [0, {k}) (or n of them), got a tensor "
                              f"of shape {tuple(labels.shape)} and dtype {labels.dtype}")
        labels = labels.long().expand(n) if labels.dim() == 0 else labels.long()
        if len(labels) != n or (len(labels) and (labels.min() < 0 or labels.max() >= k)):
            raise VaelabError(f"labels for the prior must be {n} class indices in [0, {k}); got "
                              f"{labels.tolist()[:10]}")
        return labels

    # ------------------------------------------------------------------------------------------ metrics

    def epoch_metrics(self) -> dict:
        """Code usage over the training steps since the last call (the loop's epoch): perplexity, fraction of
        codes used, dead codes (used zero times) and restarts. Resets the count."""
        return self.quantizer.usage(reset=True)

    def data_metrics(self, data, batch_size: int = 512) -> dict:
        """How evenly `data` uses the codebook (see codebook_usage)."""
        return codebook_usage(self, data, batch_size)


@torch.inference_mode()
def codebook_usage(model: VQVAE, data, batch_size: int = 512) -> dict:
    """Code-usage metrics of `model` on `data` (an ArrayDataset): perplexity of the codes' frequencies (K when
    all are used equally), `codes_used` (fraction of the K codes chosen at least once) and `dead_codes`."""
    counts = torch.zeros(model.settings.codebook_size, dtype=torch.float64)
    device = model._device()
    for start in range(0, len(data), batch_size):
        idx = torch.arange(start, min(start + batch_size, len(data)))
        indices = model.encode_indices(data.batch(idx).to(device))
        counts += torch.bincount(indices.flatten().cpu(), minlength=len(counts)).double()
    return usage_metrics(counts)
