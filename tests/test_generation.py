"""Generation and latent walks (vaelab.generation) on tiny untrained models: shapes, grids, end points,
conditional models, traversals."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vaelab.config import ModelConfig
from vaelab.data import ArrayDataset
from vaelab.errors import VaelabError
from vaelab.generation import (class_grid, encode_dataset, grid_latents, interpolate, lerp, manifold_axes,
                               manifold_grid, prior_samples, reconstruction_pairs, slerp, traversal,
                               traversal_order)
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


# ------------------------------------------------------------------------------------------ conditional models


def cvae(latent_dim=2, arch="mlp"):
    return tiny(model="cvae", latent_dim=latent_dim, arch=arch, condition_dim=3)


def test_class_grid_has_one_row_per_class_and_one_z_per_column():
    model = cvae()
    grid = class_grid(model, n=4, seed=5)
    assert grid.shape == (3 * 4, *SHAPE)
    z = torch.randn((4, 2), generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        for k in range(3):  # row k: the same four z decoded with label k
            torch.testing.assert_close(grid[4 * k:4 * (k + 1)], model.decode(z, torch.full((4,), k)))
    assert not torch.equal(grid[:4], grid[4:8])  # the label changes the images
    assert class_grid(model, n=2, classes=[2]).shape == (2, *SHAPE)
    with pytest.raises(VaelabError, match="not conditional"):
        class_grid(tiny(), n=2)
    with pytest.raises(VaelabError, match=r"\[0, 3\)"):
        class_grid(model, n=2, classes=[3])


def test_conditional_samples_take_one_label_or_one_per_sample():
    model = cvae()
    threes = prior_samples(model, 5, seed=1, condition=2)
    assert threes.shape == (5, *SHAPE)
    torch.testing.assert_close(threes, prior_samples(model, 5, seed=1, condition=torch.full((5,), 2)))
    one_hot = prior_samples(model, 5, seed=1, condition=torch.tensor([0.0, 0.0, 1.0]))  # a vector for all
    torch.testing.assert_close(threes, one_hot)
    with pytest.raises(VaelabError, match="conditional"):
        prior_samples(model, 5)
    with pytest.raises(VaelabError, match="takes no condition"):
        prior_samples(tiny(), 5, condition=1)
    with pytest.raises(VaelabError, match="3 conditions for 5"):
        prior_samples(model, 5, condition=torch.tensor([0, 1, 2]))


def test_conditional_reconstruction_manifold_and_encoding_use_the_labels():
    model = cvae()
    data = dataset(9)
    x, y = data.to_float(), data.y
    with torch.inference_mode():
        expected = model.decode(model.encode(x, y).mean, y)
    torch.testing.assert_close(reconstruction_pairs(model, x, y)[1], expected)
    np.testing.assert_allclose(encode_dataset(model, data), model.embed(x, y).numpy(), rtol=1e-5, atol=1e-6)
    grid = manifold_grid(model, n=3, condition=1)
    torch.testing.assert_close(grid, model.decode(grid_latents(manifold_axes(model, n=3)), torch.ones(9).long()))
    unlabelled = ArrayDataset(data.x)
    with pytest.raises(VaelabError, match="no labels"):
        encode_dataset(model, unlabelled)


@pytest.mark.parametrize("method", ["linear", "slerp"])
def test_conditional_interpolation_ends_at_both_reconstructions(method):
    model = cvae()
    xa, xb = images(3, seed=1), images(3, seed=2)
    ya, yb = torch.tensor([0, 1, 2]), torch.tensor([2, 0, 1])
    frames = interpolate(model, xa, xb, steps=5, method=method, condition_a=ya, condition_b=yb)
    assert frames.shape == (3, 5, *SHAPE)
    with torch.inference_mode():
        torch.testing.assert_close(frames[:, 0], model.reconstruct(xa, ya), atol=1e-6, rtol=1e-5)
        torch.testing.assert_close(frames[:, -1], model.reconstruct(xb, yb), atol=1e-6, rtol=1e-5)
        # the middle frame decodes the halfway z with the halfway one-hot label
        za, zb = model.encode(xa, ya).mean, model.encode(xb, yb).mean
        half = model.condition_vector(ya) / 2 + model.condition_vector(yb) / 2
        if method == "linear":
            torch.testing.assert_close(frames[:, 2], model.decode((za + zb) / 2, half), atol=1e-6, rtol=1e-5)
    same = interpolate(model, xa, xb, steps=3, method=method, condition_a=ya)  # one class throughout
    with torch.inference_mode():
        torch.testing.assert_close(same[:, -1], model.decode(model.encode(xb, ya).mean, ya), atol=1e-6,
                                   rtol=1e-5)


# ------------------------------------------------------------------------------------------ traversals


def test_traversal_sweeps_one_dimension_per_row_from_the_posterior_mean():
    model = tiny(latent_dim=4)
    x = images(1)[0]
    frames = traversal(model, x, dims=[2, 0], limit=2.0, steps=5)
    assert frames.shape == (2, 5, *SHAPE)
    with torch.inference_mode():
        mean = model.encode(x[None]).mean[0]
        for r, d in enumerate([2, 0]):
            z = mean.repeat(5, 1)
            z[:, d] = torch.linspace(-2, 2, 5)
            torch.testing.assert_close(frames[r], model.decode(z))
    assert traversal(model, x).shape == (4, 11, *SHAPE)  # every dimension, 11 steps over [-3, 3]
    labelled = traversal(cvae(latent_dim=3), x, condition=1, steps=3)
    assert labelled.shape == (3, 3, *SHAPE)


def test_traversal_order_puts_the_dimensions_with_most_kl_first():
    from vaelab.evaluation.metrics import latent_health, posterior_stats

    model = tiny(latent_dim=4)
    with torch.no_grad():  # make dimension 3 informative: its posterior mean scales with the input
        model.encoder[-1].weight[3] *= 40
    data = dataset(20)
    order, kl = traversal_order(model, data)
    assert sorted(order) == [0, 1, 2, 3] and order[0] == 3
    assert [kl[d] for d in order] == sorted(kl, reverse=True)
    assert model.training  # the caller's mode is kept
    assert kl == latent_health(*posterior_stats(model, data))["kl_per_dim"]


def test_traversal_needs_a_vae_with_a_vector_latent():
    x = images(1)[0]
    with pytest.raises(VaelabError, match="vector latent"):
        traversal(tiny(arch="conv-pool"), x)
    with pytest.raises(VaelabError, match="model 'ae' has a deterministic encoder, no stochastic posterior"):
        traversal_order(tiny(model="ae"), dataset())
    with pytest.raises(VaelabError, match="dims"):
        traversal(tiny(latent_dim=2), x, dims=[2])
    with pytest.raises(VaelabError, match="limit"):
        traversal(tiny(), x, limit=0)
    with pytest.raises(VaelabError, match="one sample"):
        traversal(tiny(), images(2))
