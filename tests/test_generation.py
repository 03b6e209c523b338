"""Generation and latent walks (vaelab.generation) on tiny untrained models: shapes, grids, end points."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vaelab.config import ModelConfig
from vaelab.data import ArrayDataset
from vaelab.errors import VaelabError
from vaelab.generation import (encode_dataset, grid_latents, interpolate, lerp, manifold_axes, manifold_grid,
                               prior_samples, reconstruction_pairs, slerp)
from vaelab.models import build_model

SHAPE = (1, 6, 6)


def tiny(model="vae", latent_dim=2, arch="mlp", **kw):
    torch.manual_seed(0)
    cfg = ModelConfig(model=model, arch=arch, latent_dim=latent_dim, hidden=(8,), channels=(4, 4), **kw)
    return build_model(cfg, input_shape=SHAPE)


def images(n, seed=0):
    return torch.rand((n, *SHAPE), generator=torch.Generator().manual_seed(seed))


def dataset(n=20):
    x = (images(n) * 255).to(torch.uint8)
    return ArrayDataset(x, torch.arange(n) % 3, classes=["a", "b", "c"], name="toy")


# ------------------------------------------------------------------------------------------ the manifold


def test_manifold_grid_is_the_tutorials_15x15_over_minus4_4():
    model = tiny()
    grid = manifold_grid(model)  # n=15, limit=4
    assert grid.shape == (225, *SHAPE)
    assert ((grid >= 0) & (grid <= 1)).all()  # Bernoulli means

    axes = manifold_axes(model)
    z = grid_latents(axes)
    assert z.shape == (225, 2)
    # row by row from the top left: x grows to the right, y shrinks downwards (the picture's y points up)
    assert z[0].tolist() == [-4.0, 4.0]
    assert z[14].tolist() == [4.0, 4.0]
    assert z[210].tolist() == [-4.0, -4.0]
    assert z[224].tolist() == [4.0, -4.0]
    assert z[7 * 15 + 7].tolist() == [0.0, 0.0]
    # each image decodes its grid point
    torch.testing.assert_close(grid, model.decode(z))


def test_manifold_of_a_larger_latent_varies_two_dims_and_keeps_the_rest_at_zero():
    model = tiny(latent_dim=5)
    axes = manifold_axes(model, n=4, limit=2.0, dims=(3, 1))
    z = grid_latents(axes)
    assert z.shape == (16, 5)
    assert torch.all(z[:, [0, 2, 4]] == 0)
    assert z[:, 3].min() == -2 and z[:, 3].max() == 2 and z[0, 3] == -2 and z[0, 1] == 2
    assert manifold_grid(model, n=4, limit=2.0, dims=(3, 1)).shape == (16, *SHAPE)


def test_autoencoder_manifold_spans_the_data_latents():
    model = tiny(model="ae", latent_dim=3)
    rng = np.random.default_rng(0)
    latents = rng.normal([10.0, -5.0, 2.0], [1.0, 3.0, 0.5], size=(1000, 3)).astype(np.float32)
    axes = manifold_axes(model, n=5, dims=(0, 1), data_latents=latents)
    assert axes.xs[0] == pytest.approx(np.percentile(latents[:, 0], 1), rel=1e-5)
    assert axes.xs[-1] == pytest.approx(np.percentile(latents[:, 0], 99), rel=1e-5)
    assert axes.ys[0] == pytest.approx(np.percentile(latents[:, 1], 99), rel=1e-5)
    z = grid_latents(axes)
    assert torch.allclose(z[:, 2], torch.tensor(latents[:, 2].mean()))  # the others sit at the data's mean
    assert manifold_grid(model, n=5, data_latents=latents).shape == (25, *SHAPE)
    with pytest.raises(VaelabError, match="data_latents"):
        manifold_grid(model, n=5)


def test_manifold_needs_a_vector_latent_of_two_or_more_dims():
    conv_pool = tiny(model="ae", arch="conv-pool")
    assert len(conv_pool.latent_shape) == 3
    with pytest.raises(VaelabError, match="vector latent"):
        manifold_grid(conv_pool, data_latents=np.zeros((4, conv_pool.latent_size)))
    with pytest.raises(VaelabError, match="only 1"):
        manifold_grid(tiny(latent_dim=1))
    with pytest.raises(VaelabError, match="dims"):
        manifold_grid(tiny(latent_dim=3), dims=(1, 1))
    with pytest.raises(VaelabError, match="dims"):
        manifold_grid(tiny(latent_dim=3), dims=(0, 3))


# ------------------------------------------------------------------------------------------ interpolation


def test_slerp_of_orthogonal_unit_vectors_stays_on_the_unit_circle():
    a, b = torch.tensor([[1.0, 0.0, 0.0]]), torch.tensor([[0.0, 1.0, 0.0]])
    t = torch.linspace(0, 1, 5)
    path = slerp(a, b, t)  # (1, 5, 3)
    assert path.shape == (1, 5, 3)
    torch.testing.assert_close(path.norm(dim=-1), torch.ones(1, 5))
    torch.testing.assert_close(path[0, 2], torch.tensor([1.0, 1.0, 0.0]) / math.sqrt(2))  # t = 0.5
    torch.testing.assert_close(path[0, 0], a[0])
    torch.testing.assert_close(path[0, -1], b[0])
    assert lerp(a, b, t)[0, 2].norm() == pytest.approx(math.sqrt(0.5))  # a straight line cuts inside


def test_slerp_of_parallel_vectors_falls_back_to_a_line():
    a, b = torch.tensor([[1.0, 2.0]]), torch.tensor([[2.0, 4.0]])
    t = torch.linspace(0, 1, 3)
    torch.testing.assert_close(slerp(a, b, t), lerp(a, b, t))
    assert torch.isfinite(slerp(torch.zeros(1, 2), b, t)).all()


@pytest.mark.parametrize("method", ["linear", "slerp"])
@pytest.mark.parametrize("kind, arch", [("vae", "mlp"), ("ae", "conv-pool")])
def test_interpolation_starts_and_ends_at_the_two_posterior_means(method, kind, arch):
    model = tiny(model=kind, arch=arch)
    xa, xb = images(3, seed=1), images(3, seed=2)
    frames = interpolate(model, xa, xb, steps=6, method=method)
    assert frames.shape == (3, 6, *SHAPE)
    with torch.inference_mode():
        first, last = model.decode(model.encode(xa).mean), model.decode(model.encode(xb).mean)
    torch.testing.assert_close(frames[:, 0], first, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(frames[:, -1], last, atol=1e-6, rtol=1e-5)
    single = interpolate(model, xa[0], xb[0], steps=4, method=method)  # one pair in, one row out
    assert single.shape == (4, *SHAPE)
    torch.testing.assert_close(single[0], first[0], atol=1e-6, rtol=1e-5)


def test_interpolation_rejects_bad_arguments():
    model = tiny()
    x = images(2)
    with pytest.raises(VaelabError, match="method"):
        interpolate(model, x, x, method="cubic")
    with pytest.raises(VaelabError, match="steps"):
        interpolate(model, x, x, steps=1)
    with pytest.raises(VaelabError, match="must both be"):
        interpolate(model, x, images(3))


# ------------------------------------------------------------------------------------------ the rest


def test_encode_dataset_returns_flat_posterior_means():
    data = dataset(20)
    z = encode_dataset(tiny(latent_dim=3), data, batch_size=7)  # batches of 7, 7, 6
    assert z.shape == (20, 3) and z.dtype == np.float32
    model = tiny(latent_dim=3)
    with torch.inference_mode():
        expected = model.encode(data.to_float()).mean.numpy()
    np.testing.assert_allclose(z, expected, rtol=1e-5, atol=1e-6)
    spatial = tiny(model="ae", arch="conv-pool")
    assert encode_dataset(spatial, data).shape == (20, spatial.latent_size)  # (C, h, w) flattened


def test_prior_samples_are_seeded_and_need_a_prior():
    model = tiny()
    a, b = prior_samples(model, 5, seed=1), prior_samples(model, 5, seed=1)
    assert a.shape == (5, *SHAPE) and torch.equal(a, b)
    assert not torch.equal(a, prior_samples(model, 5, seed=2))
    with pytest.raises(VaelabError, match="no prior"):
        prior_samples(tiny(model="ae"), 5)


def test_reconstruction_pairs_decode_the_posterior_mean():
    model = tiny()
    x = images(4)
    orig, recon = reconstruction_pairs(model, x)
    assert torch.equal(orig, x) and recon.shape == x.shape
    torch.testing.assert_close(recon, reconstruction_pairs(model, x)[1])  # deterministic: no sampling
    assert model.training  # the caller's mode is kept
