"""Generation and latent-space walks: pure tensor functions of a trained model.

Every function runs in inference mode and returns tensors in data space (the likelihood's mean: pixel
probabilities in [0, 1] for a Bernoulli decoder). Drawing them is `vaelab.plotting`'s job.

    pairs = reconstruction_pairs(model, x)            # (originals, reconstructions), each (B, C, H, W)
    imgs  = prior_samples(model, 64, seed=0)          # (64, C, H, W), VAEs only
    grid  = manifold_grid(model, n=15, limit=4.0)     # (225, C, H, W), the Keras tutorial's latent grid
    walk  = interpolate(model, x_a, x_b, steps=10)    # (B, 10, C, H, W)
    z     = encode_dataset(model, data)               # (N, latent_size) numpy posterior means
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from vaelab.errors import VaelabError

INTERPOLATIONS = ("linear", "slerp")


def _device(model) -> torch.device:
    return next(model.parameters()).device


@torch.inference_mode()
def reconstruction_pairs(model, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, reconstruction of x): the decoded posterior mean of each input, shaped like x (B, *sample_shape)."""
    was_training = model.training
    model.eval()
    x = x.to(_device(model))
    recon = model.reconstruct(x)
    model.train(was_training)
    return x, recon


@torch.inference_mode()
def prior_samples(model, n: int, seed: int = 0) -> torch.Tensor:
    """n draws z ~ N(0, I) decoded to data space, (n, *sample_shape). The same seed gives the same images."""
    if not model.has_prior:
        raise VaelabError(
            f"model {model.config.model!r} has no prior to sample from: a plain autoencoder's codes follow no "
            "known distribution. Train a VAE (e.g. `vaelab train --preset seed-vae`) to generate new samples")
    if not (isinstance(n, int) and n >= 1):
        raise VaelabError(f"the number of samples must be a positive integer, got {n!r}")
    gen = torch.Generator(device=_device(model)).manual_seed(int(seed))
    was_training = model.training
    model.eval()
    out = model.sample(n, generator=gen)
    model.train(was_training)
    return out


# ------------------------------------------------------------------------------------------ the manifold


class GridAxes(NamedTuple):
    """Where a manifold grid samples the latent space.

    Image (row i, column j) of the grid decodes `base` with z[dims[0]] = xs[j] and z[dims[1]] = ys[i].
    `ys` runs from high to low, so the picture's y axis points up, as in the Keras tutorial.
    """

    xs: np.ndarray  # (n,) values of z[dims[0]], left to right
    ys: np.ndarray  # (n,) values of z[dims[1]], top to bottom (descending)
    base: np.ndarray  # (latent_dim,) the latent vector the grid varies two coordinates of
    dims: tuple[int, int]


def manifold_axes(model, n: int = 15, limit: float = 4.0, dims=(0, 1),
                  data_latents: np.ndarray | None = None) -> GridAxes:
    """The coordinates of `manifold_grid` (see there)."""
    shape = tuple(model.latent_shape)
    if len(shape) != 1:
        raise VaelabError(
            f"a manifold grid needs a vector latent, but model {model.config.model!r} "
            f"(arch={model.config.resolved_arch!r}) has a spatial latent of shape {shape}; train a model with "
            "a dense latent (e.g. --arch conv or --arch mlp, --latent-dim 2) to walk its latent space this way")
    latent_dim = shape[0]
    if not (isinstance(n, int) and n >= 2):
        raise VaelabError(f"the grid size n must be an integer >= 2, got {n!r}")
    dims = tuple(int(d) for d in dims)
    if latent_dim < 2:
        raise VaelabError(f"a manifold grid varies two latent dimensions, but the model's latent has only "
                          f"{latent_dim}; train with --latent-dim 2 or more")
    if len(dims) != 2 or dims[0] == dims[1] or not all(0 <= d < latent_dim for d in dims):
        raise VaelabError(f"dims={dims!r} must be two different latent dimensions in 0..{latent_dim - 1}")

    if model.has_prior:
        # the prior N(0, I) puts almost all its mass within a few units of 0: a symmetric square
        if not (np.isfinite(limit) and limit > 0):
            raise VaelabError(f"limit={limit!r} must be a positive number (the grid spans [-limit, limit])")
        lo = np.array([-limit, -limit], dtype=np.float64)
        hi = -lo
        base = np.zeros(latent_dim, dtype=np.float32)
    else:
        # an autoencoder's codes have no known distribution: span where the data's codes actually lie
        if data_latents is None:
            raise VaelabError(
                f"model {model.config.model!r} has no prior, so the grid's range comes from the data: pass "
                "data_latents (the latents of a dataset, e.g. encode_dataset(model, data))")
        lat = np.asarray(data_latents, dtype=np.float64).reshape(len(data_latents), -1)
        if lat.shape[0] == 0 or lat.shape[1] != latent_dim:
            raise VaelabError(f"data_latents has shape {lat.shape}; expected (N >= 1, {latent_dim})")
        lo = np.percentile(lat[:, dims], 1, axis=0)
        hi = np.percentile(lat[:, dims], 99, axis=0)
        base = lat.mean(axis=0).astype(np.float32)
    xs = np.linspace(lo[0], hi[0], n).astype(np.float32)
    ys = np.linspace(lo[1], hi[1], n)[::-1].astype(np.float32)
    return GridAxes(xs, ys, base, dims)


def grid_latents(axes: GridAxes) -> torch.Tensor:
    """The (n*n, latent_dim) latent vectors of a grid, row by row (top row first, left to right)."""
    n_y, n_x = len(axes.ys), len(axes.xs)
    z = np.tile(axes.base, (n_y * n_x, 1))
    yy, xx = np.meshgrid(axes.ys, axes.xs, indexing="ij")  # (n_y, n_x) each
    z[:, axes.dims[0]] = xx.reshape(-1)
    z[:, axes.dims[1]] = yy.reshape(-1)
    return torch.from_numpy(z)


@torch.inference_mode()
def manifold_grid(model, n: int = 15, limit: float = 4.0, dims=(0, 1),
                  data_latents: np.ndarray | None = None) -> torch.Tensor:
    """Decode an n x n grid of latent vectors, (n*n, *sample_shape), row by row from the top left.

    A VAE: z[dims[0]], z[dims[1]] each run over [-limit, limit] (the Keras tutorial's 15x15 grid over
    [-4, 4]^2 for its 2-D latent); the other coordinates stay at 0, the prior's mean.
    An autoencoder (no prior): the two coordinates span the 1st..99th percentile of `data_latents`
    (N, latent_dim) and the others sit at the data latents' mean.
    Needs a vector latent. `manifold_axes` gives the coordinates (for axis ticks).
    """
    axes = manifold_axes(model, n, limit, dims, data_latents)
    was_training = model.training
    model.eval()
    out = model.decode(grid_latents(axes).to(_device(model)))
    model.train(was_training)
    return out


# ------------------------------------------------------------------------------------------ interpolation


def slerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation between rows of a and b (B, D) at fractions t (T,): (B, T, D).

    Follows the great circle between the two directions while interpolating the norms linearly along it
    (Shoemake 1985; for latent walks see White 2016, https://arxiv.org/abs/1609.04468). Pairs that are
    (nearly) parallel fall back to linear interpolation.
    """
    a_n = a / a.norm(dim=1, keepdim=True).clamp_min(1e-12)
    b_n = b / b.norm(dim=1, keepdim=True).clamp_min(1e-12)
    omega = torch.arccos((a_n * b_n).sum(1).clamp(-1.0, 1.0))[:, None]  # (B, 1) angle between a and b
    so = torch.sin(omega)
    t = t[None, :]  # (1, T)
    safe = so.abs() > 1e-6
    wa = torch.where(safe, torch.sin((1.0 - t) * omega) / torch.where(safe, so, 1.0), 1.0 - t)  # (B, T)
    wb = torch.where(safe, torch.sin(t * omega) / torch.where(safe, so, 1.0), t.expand_as(wa))
    return wa[..., None] * a[:, None, :] + wb[..., None] * b[:, None, :]


def lerp(a: torch.Tensor, b: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Linear interpolation between rows of a and b (B, D) at fractions t (T,): (B, T, D)."""
    t = t[None, :, None]
    return (1.0 - t) * a[:, None, :] + t * b[:, None, :]


@torch.inference_mode()
def interpolate(model, x_a: torch.Tensor, x_b: torch.Tensor, steps: int = 10,
                method: str = "linear") -> torch.Tensor:
    """Decode `steps` points on the latent path from x_a's posterior mean to x_b's.

    x_a, x_b: batches (B, *sample_shape) -> (B, steps, *sample_shape); single samples (*sample_shape) ->
    (steps, *sample_shape). The first and last frames decode the two posterior means themselves.
    method: "linear" (a straight line) or "slerp" (a great circle, which keeps the walk at the typical
    radius of a high-dimensional Gaussian prior rather than cutting through its low-density middle).
    """
    if method not in INTERPOLATIONS:
        raise VaelabError(f"method={method!r} is unknown; choose one of {list(INTERPOLATIONS)}")
    if not (isinstance(steps, int) and steps >= 2):
        raise VaelabError(f"steps={steps!r} must be an integer >= 2 (the two end points included)")
    sample_shape = tuple(model.config.input_shape)
    single = tuple(x_a.shape) == sample_shape
    if single:
        x_a, x_b = x_a[None], x_b[None]
    if tuple(x_a.shape) != tuple(x_b.shape) or tuple(x_a.shape[1:]) != sample_shape:
        raise VaelabError(f"x_a {tuple(x_a.shape)} and x_b {tuple(x_b.shape)} must both be (B, *{sample_shape}) "
                          f"or single samples {sample_shape}")
    was_training = model.training
    model.eval()
    dev = _device(model)
    za = model.encode(x_a.to(dev)).mean.flatten(1)  # (B, L)
    zb = model.encode(x_b.to(dev)).mean.flatten(1)
    t = torch.linspace(0.0, 1.0, steps, device=dev, dtype=za.dtype)
    path = (slerp if method == "slerp" else lerp)(za, zb, t)  # (B, steps, L)
    b = path.shape[0]
    frames = model.decode(path.reshape(b * steps, *model.latent_shape))
    model.train(was_training)
    frames = frames.reshape(b, steps, *sample_shape)
    return frames[0] if single else frames


# ------------------------------------------------------------------------------------------ encoding


@torch.inference_mode()
def encode_dataset(model, data, batch_size: int = 512) -> np.ndarray:
    """Posterior means of every sample of `data` (an ArrayDataset), flattened per sample: (N, latent_size)."""
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise VaelabError(f"batch_size={batch_size!r} must be a positive integer")
    was_training = model.training
    model.eval()
    dev = _device(model)
    parts = []
    for start in range(0, len(data), batch_size):
        idx = torch.arange(start, min(start + batch_size, len(data)))
        parts.append(model.embed(data.batch(idx).to(dev)).flatten(1).float().cpu())
    model.train(was_training)
    if not parts:
        return np.zeros((0, model.latent_size), dtype=np.float32)
    return torch.cat(parts).numpy()


__all__ = ["INTERPOLATIONS", "GridAxes", "reconstruction_pairs", "prior_samples", "manifold_axes",
           "grid_latents", "manifold_grid", "slerp", "lerp", "interpolate", "encode_dataset"]
