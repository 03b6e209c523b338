"""Generation and latent-space walks: pure tensor functions of a trained model.

Every function runs in inference mode and returns tensors in data space (the likelihood's mean: pixel
probabilities in [0, 1] for a Bernoulli decoder). Drawing them is `vaelab.plotting`'s job.

    pairs = reconstruction_pairs(model, x)            # (originals, reconstructions), each (B, C, H, W)
    imgs  = prior_samples(model, 64, seed=0)          # (64, C, H, W), VAEs only
    grid  = manifold_grid(model, n=15, limit=4.0)     # (225, C, H, W), the Keras tutorial's latent grid
    walk  = interpolate(model, x_a, x_b, steps=10)    # (B, 10, C, H, W)
    rows  = traversal(model, x, dims=[3, 0, 1])       # (3, 11, C, H, W), one latent dimension per row
    z     = encode_dataset(model, data)               # (N, latent_size) numpy posterior means

Conditional models (`model.capabilities.conditional`, the CVAE) take a `condition` in every function: integer class
labels (B,) or float vectors (B, condition_dim), one per input; a single label (an int) stands for all of
them. `class_grid(model, n)` draws n samples of every class, one row per class; `analogies(model, x)` draws
each input's style as every class.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np
import torch

from vaelab.errors import VaelabError

INTERPOLATIONS = ("linear", "slerp")


def _device(model) -> torch.device:
    return next(model.parameters()).device


def _condition(model, condition, n: int) -> torch.Tensor | None:
    """The condition of n inputs: None for unconditional models; an int label, a (n,) tensor of labels, or
    float vectors (condition_dim,) / (n, condition_dim), as a tensor on the model's device."""
    if condition is None:
        if model.capabilities.conditional:
            k = model.config.condition_dim
            raise VaelabError(f"model {model.config.model!r} is conditional: pass a condition (class labels in "
                              f"[0, {k}) or vectors of {k} values)")
        return None
    if not model.capabilities.conditional:
        raise VaelabError(f"model {model.config.model!r} takes no condition; use a conditional model "
                          "(--model cvae) to condition on labels")
    c = torch.as_tensor(condition, device=_device(model))
    if c.dim() == 0 or (c.dim() == 1 and c.is_floating_point()):  # labels are integers: a float row is a vector
        c = c.expand(n, *c.shape)  # one label / vector for all n inputs
    if len(c) != n:
        raise VaelabError(f"{len(c)} conditions for {n} inputs; give one per input, or a single one for all")
    return c


def _repeat(c: torch.Tensor | None, times: int) -> torch.Tensor | None:
    """Each row of c repeated `times` times in a row: (B, ...) -> (B * times, ...)."""
    return None if c is None else c.repeat_interleave(times, dim=0)


@torch.inference_mode()
def reconstruction_pairs(model, x: torch.Tensor, condition=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(x, reconstruction of x): the decoded posterior mean of each input, shaped like x (B, *sample_shape).
    A conditional model encodes and decodes each input with its condition (e.g. its label)."""
    was_training = model.training
    model.eval()
    x = x.to(_device(model))
    recon = model.reconstruct(x, _condition(model, condition, len(x)))
    model.train(was_training)
    return x, recon


def _need_prior(model) -> None:
    if not model.capabilities.samples:
        raise VaelabError(
            f"model {model.config.model!r} has no prior to sample from: a plain autoencoder's codes follow no "
            "known distribution. Train a VAE (e.g. `vaelab train --preset seed-vae`) to generate new samples")


@torch.inference_mode()
def prior_samples(model, n: int, seed: int = 0, condition=None) -> torch.Tensor:
    """n draws z ~ N(0, I) decoded to data space, (n, *sample_shape). The same seed gives the same images.
    A conditional model needs a condition: one label (int) for all n samples, or n of them."""
    _need_prior(model)
    if not (isinstance(n, int) and n >= 1):
        raise VaelabError(f"the number of samples must be a positive integer, got {n!r}")
    cond = _condition(model, condition, n)
    gen = torch.Generator(device=_device(model)).manual_seed(int(seed))
    was_training = model.training
    model.eval()
    out = model.sample(n, generator=gen, condition=cond)
    model.train(was_training)
    return out


@torch.inference_mode()
def class_grid(model, n: int = 10, seed: int = 0, classes=None) -> torch.Tensor:
    """n prior samples of every class of a conditional model, (K * n, *sample_shape), one class after the
    other (row k of an n-wide grid is class classes[k]; default all condition_dim classes).

    Column j decodes the same z_j in every row, so only the condition changes down a column: the model's
    latent then shows as a style (slant, stroke width) shared across the classes.
    """
    _need_prior(model)
    if not model.capabilities.conditional:
        raise VaelabError(f"model {model.config.model!r} is not conditional: a class grid needs a model trained "
                          "with labels (--model cvae); use prior_samples for unconditional samples")
    if not (isinstance(n, int) and n >= 1):
        raise VaelabError(f"the number of samples per class must be a positive integer, got {n!r}")
    k = model.config.condition_dim
    labels = torch.arange(k) if classes is None else torch.as_tensor(classes, dtype=torch.long).reshape(-1)
    if len(labels) == 0 or labels.min() < 0 or labels.max() >= k:
        raise VaelabError(f"classes={labels.tolist()} must be class indices in [0, {k})")
    dev = _device(model)
    gen = torch.Generator(device=dev).manual_seed(int(seed))
    z = torch.randn((n, *model.latent_shape), generator=gen, device=dev)  # one z per column
    was_training = model.training
    model.eval()
    out = model.decode(z.repeat(len(labels), *([1] * (z.dim() - 1))), labels.to(dev).repeat_interleave(n))
    model.train(was_training)
    return out


@torch.inference_mode()
def analogies(model, x: torch.Tensor, condition=None, classes=None) -> torch.Tensor:
    """Each input's style decoded as every class (Kingma et al. 2014, fig. 1): z fixed at the posterior mean of
    x under its own label, the label varied. (B, K, *sample_shape): row b is input b drawn as class classes[k]
    in column k (default all condition_dim classes). A semi-supervised model (m2) takes no condition and then
    encodes each input with its classifier's most probable class."""
    _need_prior(model)
    if not model.capabilities.conditional:
        raise VaelabError(f"model {model.config.model!r} is not conditional: analogies vary the class label of a "
                          "model trained with labels (--model cvae or m2)")
    k = model.config.condition_dim
    labels = torch.arange(k) if classes is None else torch.as_tensor(classes, dtype=torch.long).reshape(-1)
    if len(labels) == 0 or labels.min() < 0 or labels.max() >= k:
        raise VaelabError(f"classes={labels.tolist()} must be class indices in [0, {k})")
    dev = _device(model)
    x = x.to(dev)
    semi = model.capabilities.semi_supervised
    cond = None if condition is None and semi else _condition(model, condition, len(x))
    was_training = model.training
    model.eval()
    z = model.encode(x, cond).mean  # (B, *latent): the style
    n = len(labels)
    out = model.decode(z.repeat_interleave(n, dim=0), labels.to(dev).repeat(len(x)))  # (B * n, ...)
    model.train(was_training)
    return out.reshape(len(x), n, *x.shape[1:])


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
            f"(arch={model.arch!r}) has a spatial latent of shape {shape}; train a model with "
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

    if model.capabilities.samples:
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
                  data_latents: np.ndarray | None = None, condition=None) -> torch.Tensor:
    """Decode an n x n grid of latent vectors, (n*n, *sample_shape), row by row from the top left.

    A VAE: z[dims[0]], z[dims[1]] each run over [-limit, limit] (the Keras tutorial's 15x15 grid over
    [-4, 4]^2 for its 2-D latent); the other coordinates stay at 0, the prior's mean.
    An autoencoder (no prior): the two coordinates span the 1st..99th percentile of `data_latents`
    (N, latent_dim) and the others sit at the data latents' mean.
    Needs a vector latent. `manifold_axes` gives the coordinates (for axis ticks). A conditional model
    decodes the whole grid with one condition (e.g. `condition=3`: the manifold of class 3).
    """
    axes = manifold_axes(model, n, limit, dims, data_latents)
    z = grid_latents(axes).to(_device(model))
    cond = _condition(model, condition, len(z))
    was_training = model.training
    model.eval()
    out = model.decode(z, cond)
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
def interpolate(model, x_a: torch.Tensor, x_b: torch.Tensor, steps: int = 10, method: str = "linear",
                condition_a=None, condition_b=None) -> torch.Tensor:
    """Decode `steps` points on the latent path from x_a's posterior mean to x_b's.

    x_a, x_b: batches (B, *sample_shape) -> (B, steps, *sample_shape); single samples (*sample_shape) ->
    (steps, *sample_shape). The first and last frames decode the two posterior means themselves, so they
    are the two inputs' reconstructions.
    method: "linear" (a straight line) or "slerp" (a great circle, which keeps the walk at the typical
    radius of a high-dimensional Gaussian prior rather than cutting through its low-density middle).

    A conditional model encodes x_a with condition_a and x_b with condition_b (default: condition_a), and
    the condition travels with z: its one-hot (or vector) form moves linearly from condition_a to
    condition_b along the path. Both end frames are then true reconstructions, and a walk between a 3 and
    an 8 morphs the class as well as the style; pass condition_b=condition_a to keep one class throughout.
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
    b = len(x_a)
    ca = _condition(model, condition_a, b)
    cb = ca if condition_b is None else _condition(model, condition_b, b)
    was_training = model.training
    model.eval()
    dev = _device(model)
    za = model.encode(x_a.to(dev), ca).mean.flatten(1)  # (B, L)
    zb = model.encode(x_b.to(dev), cb).mean.flatten(1)
    t = torch.linspace(0.0, 1.0, steps, device=dev, dtype=za.dtype)
    path = (slerp if method == "slerp" else lerp)(za, zb, t)  # (B, steps, L)
    cond = None
    if ca is not None:  # the condition's vector form moves with z: (B, steps, condition_dim)
        cond = lerp(model.condition_vector(ca).to(za.dtype), model.condition_vector(cb).to(za.dtype), t)
        cond = cond.reshape(b * steps, -1)
    frames = model.decode(path.reshape(b * steps, *model.latent_shape), cond)
    model.train(was_training)
    frames = frames.reshape(b, steps, *sample_shape)
    return frames[0] if single else frames


# ------------------------------------------------------------------------------------------ traversals


def traversal_order(model, data, batch_size: int = 1000) -> tuple[list[int], list[float]]:
    """(latent dimensions sorted by their mean KL on `data`, most informative first; the KL of every
    dimension in nats). The KL of dimension d is the data average of KL(q(z_d|x) || N(0, 1)): near 0 for
    a dimension the model does not use (the decoder ignores it), large for the ones that carry the data."""
    from vaelab.evaluation.metrics import latent_health, posterior_stats

    _need_vector_latent(model, "a latent traversal")
    if not model.capabilities.stochastic:
        raise VaelabError(f"latent traversals sort the dimensions by their posterior's KL to the prior N(0, I), but "
                          f"model {model.config.model!r} has a deterministic encoder, no stochastic posterior; train a VAE "
                          "(--model vae)")
    _need_labels(model, data)
    if len(data) == 0:
        raise VaelabError("the dataset is empty: no posterior to measure the KL of each dimension on")
    was_training = model.training
    means, logvars = posterior_stats(model, data, batch_size)
    model.train(was_training)
    kl = latent_health(means, logvars)["kl_per_dim"]
    order = sorted(range(len(kl)), key=lambda d: (-kl[d], d))
    return order, kl


@torch.inference_mode()
def traversal(model, x: torch.Tensor, dims=None, limit: float = 3.0, steps: int = 11,
              condition=None) -> torch.Tensor:
    """Latent traversals of one input x (*sample_shape): row r sweeps z[dims[r]] over `steps` values
    evenly spaced in [-limit, limit] while every other coordinate stays at x's posterior mean:
    (len(dims), steps, *sample_shape). dims default to all dimensions in order (see `traversal_order`
    for the informative-first order of β-VAE papers, Higgins et al. 2017). The values are absolute
    coordinates in the units of the N(0, I) prior, so the same columns mean the same z in every row.
    """
    _need_vector_latent(model, "a latent traversal")
    latent_dim = model.latent_shape[0]
    dims = list(range(latent_dim)) if dims is None else [int(d) for d in dims]
    if not dims or not all(0 <= d < latent_dim for d in dims):
        raise VaelabError(f"dims={dims!r} must be latent dimensions in 0..{latent_dim - 1}")
    if not (isinstance(steps, int) and steps >= 2):
        raise VaelabError(f"steps={steps!r} must be an integer >= 2")
    if not (np.isfinite(limit) and limit > 0):
        raise VaelabError(f"limit={limit!r} must be a positive number (the sweep spans [-limit, limit])")
    sample_shape = tuple(model.config.input_shape)
    if tuple(x.shape) != sample_shape:
        raise VaelabError(f"x has shape {tuple(x.shape)}; expected one sample of shape {sample_shape}")
    dev = _device(model)
    cond = _condition(model, condition, 1)
    was_training = model.training
    model.eval()
    mean = model.encode(x[None].to(dev), cond).mean[0]  # (L,)
    values = torch.linspace(-limit, limit, steps, device=dev, dtype=mean.dtype)
    z = mean.repeat(len(dims), steps, 1)  # (R, steps, L)
    for r, d in enumerate(dims):
        z[r, :, d] = values
    cond_all = None if cond is None else cond.expand(len(dims) * steps, *cond.shape[1:])
    frames = model.decode(z.reshape(-1, latent_dim), cond_all)
    model.train(was_training)
    return frames.reshape(len(dims), steps, *sample_shape)


def _need_vector_latent(model, what: str) -> None:
    shape = tuple(model.latent_shape)
    if len(shape) != 1:
        raise VaelabError(
            f"{what} needs a vector latent, but model {model.config.model!r} "
            f"(arch={model.arch!r}) has a spatial latent of shape {shape}; train a model with "
            "a dense latent (--arch conv or --arch mlp)")


def _need_labels(model, data) -> None:
    if model.capabilities.conditional and data.y is None:
        raise VaelabError(f"model {model.config.model!r} is conditional and encodes each sample with its label, "
                          f"but dataset {data.name!r} has no labels; use the labelled dataset it was trained on")


# ------------------------------------------------------------------------------------------ encoding


@torch.inference_mode()
def encode_dataset(model, data, batch_size: int = 512) -> np.ndarray:
    """Posterior means of every sample of `data` (an ArrayDataset), flattened per sample: (N, latent_size).
    A conditional model encodes each sample with its label."""
    if not (isinstance(batch_size, int) and batch_size >= 1):
        raise VaelabError(f"batch_size={batch_size!r} must be a positive integer")
    _need_labels(model, data)
    was_training = model.training
    model.eval()
    dev = _device(model)
    parts = []
    for start in range(0, len(data), batch_size):
        idx = torch.arange(start, min(start + batch_size, len(data)))
        cond = data.labels(idx).to(dev) if model.capabilities.conditional else None
        parts.append(model.embed(data.batch(idx).to(dev), cond).flatten(1).float().cpu())
    model.train(was_training)
    if not parts:
        return np.zeros((0, model.latent_size), dtype=np.float32)
    return torch.cat(parts).numpy()


__all__ = ["INTERPOLATIONS", "GridAxes", "reconstruction_pairs", "prior_samples", "class_grid", "analogies",
           "manifold_axes", "grid_latents", "manifold_grid", "slerp", "lerp", "interpolate", "traversal_order",
           "traversal", "encode_dataset"]
