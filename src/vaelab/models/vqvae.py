"""The VQ-VAE (van den Oord et al. 2017, "Neural Discrete Representation Learning",
https://arxiv.org/abs/1711.00937): an encoder's output map, quantized to the nearest of K learned codes, decoded.

    x -> encoder -> z_e (B, D, h, w) -> quantizer -> codes e (B, D, h, w), indices (B, h, w) -> decoder -> x'

D is `latent_dim`, K is `codebook_size`; for MNIST with channels (32, 64) the grid is 7x7. Training minimises
recon + ||sg(z_e) - e||^2 + β||z_e - sg(e)||^2 (losses.vqvae_loss); the decoder's gradient reaches the encoder
through the straight-through estimator. The codebook itself moves by EMA (see models/quantizer.py).

A VQ-VAE has no fixed prior to sample codes from: `vaelab train-prior RUN` fits an autoregressive prior over the
code grids of the training set (models/prior.py) and stores it in the model (config.json + model.safetensors),
after which `sample` draws code grids from it and decodes them.
"""

from __future__ import annotations

import torch
from torch import nn

from vaelab.errors import VaelabError
from vaelab.losses import vqvae_loss
from vaelab.models.base import Autoencoder, ModelOutput, PointMass
from vaelab.models.nets import _init_like_keras, build_networks
from vaelab.models.quantizer import VectorQuantizer, usage_metrics
from vaelab.models.registry import register


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
    """x + Conv1x1(ReLU(Conv3x3(ReLU(x)))), the paper's residual block (with half the channels inside)."""

    def __init__(self, channels: int):
        super().__init__()
        self.net = nn.Sequential(nn.ReLU(), nn.Conv2d(channels, channels // 2 or 1, 3, padding=1), nn.ReLU(),
                                 nn.Conv2d(channels // 2 or 1, channels, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.net(x)


def conv_networks(config, blocks: int = 2) -> tuple[nn.Module, nn.Module, tuple[int, ...]]:
    """The paper's encoder and decoder, scaled by `channels`: one stride-2 3x3 conv per entry (each halves H
    and W, rounding up, as in models/nets.py), a 3x3 conv, `blocks` residual blocks and a 1x1 conv to D;
    the decoder mirrors it with transposed convs that restore the exact input size (odd sizes too)."""
    c_in, h, w = config.input_shape
    chans, d = list(config.channels), config.latent_dim
    sizes = [(h, w)]
    for _ in chans:
        sizes.append(((sizes[-1][0] + 1) // 2, (sizes[-1][1] + 1) // 2))
    enc: list[nn.Module] = []
    prev = c_in
    for c in chans:  # (B, prev, H, W) -> (B, c, ceil(H/2), ceil(W/2))
        enc += [nn.Conv2d(prev, c, 3, stride=2, padding=1), nn.ReLU()]
        prev = c
    enc += [nn.Conv2d(prev, prev, 3, padding=1)] + [ResidualBlock(prev) for _ in range(blocks)]
    enc += [nn.ReLU(), nn.Conv2d(prev, d, 1)]  # (B, D, h, w): z_e, unbounded, for the quantizer

    dec: list[nn.Module] = [nn.Conv2d(d, prev, 3, padding=1)] + [ResidualBlock(prev) for _ in range(blocks)]
    dec.append(nn.ReLU())
    for i, c in enumerate(reversed(chans)):  # each transposed conv doubles the size back exactly
        target = sizes[len(chans) - 1 - i]
        pad = (1 - target[0] % 2, 1 - target[1] % 2)
        dec += [nn.ConvTranspose2d(prev, c, 3, stride=2, padding=1, output_padding=pad), nn.ReLU()]
        prev = c
    dec.append(nn.Conv2d(prev, c_in, 3, padding=1))  # the output layer: logits or means, no activation
    encoder, decoder = nn.Sequential(*enc), nn.Sequential(*dec)
    # Glorot weights and zero biases, as the other models: with PyTorch's default init the activations start
    # so small that the biases decide the sign, and a residual block's narrow ReLU can start dead
    _init_like_keras(encoder)
    _init_like_keras(decoder)
    # channels-last weights: NHWC convolutions, the fastest layout for oneDNN's CPU kernels (as models/nets.py)
    encoder.to(memory_format=torch.channels_last)
    decoder.to(memory_format=torch.channels_last)
    return encoder, decoder, (d, *sizes[-1])


@register("vqvae", loss=vqvae_loss,
          description="VQ-VAE: a grid of discrete codes (EMA codebook, k-means init, dead-code restarts); "
                      "generates after `vaelab train-prior` fits its autoregressive prior.")
class VQVAE(Autoencoder):
    """Images get the paper's conv networks (arch auto/conv) and a (latent_dim, H/2^n, W/2^n) code grid; arch
    mlp (and vector data) gets the MLP of models/nets.py and one code of latent_dim values per sample."""

    has_prior = False  # no N(0, I) prior: sampling goes through the learned code prior (see `sample`)
    quantized = True  # the config's codebook_size / vq_* / prior_* fields apply
    archs = ("auto", "conv", "mlp")

    def __init__(self, config):
        # the networks differ from the other models' (a spatial code grid), so build_networks is not used
        nn.Module.__init__(self)
        self.config = config
        if config.resolved_arch == "mlp":

            self.encoder, self.decoder, _ = build_networks(config, 1)
            self.latent_shape = (config.latent_dim, 1, 1)  # a 1x1 grid: one code per sample
        else:
            self.encoder, self.decoder, self.latent_shape = conv_networks(config)
        self.quantizer = VectorQuantizer(config.codebook_size, config.latent_dim, ema=config.vq_ema,
                                         kmeans_init=config.vq_kmeans_init, restart_after=config.vq_restart_after)
        self.prior = None
        if config.prior_layers:
            from vaelab.models.prior import CodePrior

            self.prior = CodePrior(config.codebook_size, self.latent_shape[1:], config.prior_channels,
                                   config.prior_layers, config.prior_classes)

    @property
    def grid(self) -> tuple[int, int]:
        return tuple(self.latent_shape[1:])

    @property
    def can_sample(self) -> bool:
        return self.prior is not None

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
        return self.decoder(z if self.config.resolved_arch != "mlp" else z.flatten(1))

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

    @torch.inference_mode()
    def encode_indices(self, x: torch.Tensor) -> torch.Tensor:
        """The code indices of x, (B, h, w) int64; decode_indices maps them back to reconstructions."""
        return self.quantizer(self._encode_map(x), update=False)[1]

    @torch.inference_mode()
    def decode_indices(self, indices: torch.Tensor) -> torch.Tensor:
        """Decode code indices (B, h, w) to data space: exactly `reconstruct(x)` for indices of x."""
        return self.decode(self.quantizer.lookup(indices.to(self._device())))

    # ----------------------------------------------------------------------------------------- sampling

    @torch.inference_mode()
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
        k = self.config.prior_classes
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


@torch.inference_mode()
def codebook_usage(model: VQVAE, data, batch_size: int = 512) -> dict:
    """Code-usage metrics of `model` on `data` (an ArrayDataset): perplexity of the codes' frequencies (K when
    all are used equally), `codes_used` (fraction of the K codes chosen at least once) and `dead_codes`."""
    counts = torch.zeros(model.config.codebook_size, dtype=torch.float64)
    device = model._device()
    for start in range(0, len(data), batch_size):
        idx = torch.arange(start, min(start + batch_size, len(data)))
        indices = model.encode_indices(data.batch(idx).to(device))
        counts += torch.bincount(indices.flatten().cpu(), minlength=len(counts)).double()
    return usage_metrics(counts)
