"""Every loss against its closed form, on small hand-made tensors (float64 for exactness)."""

import math

import pytest
import torch
from torch.distributions import Normal, kl_divergence

from vaelab.losses import bernoulli_nll, gaussian_nll, kl_standard_normal, pixel_metrics
from vaelab.models.ae import autoencoder_loss
from vaelab.models.vae import vae_loss
from vaelab.models.base import DiagonalGaussian, ModelOutput, PointMass


def test_bernoulli_nll_is_the_binary_cross_entropy_sum():
    x = torch.tensor([[0.0, 1.0, 0.25], [1.0, 1.0, 0.0]], dtype=torch.float64)
    logits = torch.tensor([[0.3, -1.2, 2.0], [0.0, 4.0, -3.0]], dtype=torch.float64)
    p = torch.sigmoid(logits)
    by_hand = -(x * torch.log(p) + (1 - x) * torch.log(1 - p)).sum(1)
    torch.testing.assert_close(bernoulli_nll(x, logits), by_hand)
    # a logit of 0 is p = 1/2: -log(1/2) per pixel
    assert bernoulli_nll(torch.ones(1, 4), torch.zeros(1, 4)).item() == pytest.approx(4 * math.log(2))


def test_bernoulli_nll_is_stable_at_extreme_logits():
    out = bernoulli_nll(torch.tensor([[1.0, 0.0]]), torch.tensor([[200.0, -200.0]]))
    assert torch.isfinite(out).all() and out.item() == pytest.approx(0.0, abs=1e-30)


def test_gaussian_nll_matches_normal_log_prob():
    x = torch.randn(3, 2, 2, dtype=torch.float64)
    mean = torch.randn(3, 2, 2, dtype=torch.float64)
    for sigma in (1.0, 0.1, 2.5):
        expected = -Normal(mean, sigma).log_prob(x).reshape(3, -1).sum(1)
        torch.testing.assert_close(gaussian_nll(x, mean, sigma), expected)


def test_kl_standard_normal_closed_form():
    mean = torch.tensor([[0.0, 1.0], [-2.0, 0.5]], dtype=torch.float64)
    logvar = torch.tensor([[0.0, 0.0], [math.log(4.0), -1.0]], dtype=torch.float64)
    expected = kl_divergence(Normal(mean, torch.exp(0.5 * logvar)), Normal(0.0, 1.0)).sum(1)
    torch.testing.assert_close(kl_standard_normal(mean, logvar), expected)
    # by hand: N(1, 1) vs N(0, 1) is 1/2; N(0, 1) vs itself is 0
    assert kl_standard_normal(torch.tensor([[0.0, 1.0]]), torch.zeros(1, 2)).item() == 0.5
    assert kl_standard_normal(torch.zeros(1, 5), torch.zeros(1, 5)).item() == 0.0


def test_kl_of_spatial_latents_sums_over_all_latent_dims():
    mean = torch.ones(2, 3, 4, 4)
    assert kl_standard_normal(mean, torch.zeros_like(mean)).tolist() == [24.0, 24.0]


def _output(x, logits, mean=None, logvar=None):
    post = PointMass(torch.zeros(x.shape[0], 2)) if mean is None else DiagonalGaussian(mean, logvar)
    return ModelOutput(recon=logits, z=post.mean, posterior=post)


def test_vae_loss_is_recon_plus_beta_kl_and_the_tutorial_objective():
    torch.manual_seed(0)
    x = torch.rand(4, 1, 28, 28, dtype=torch.float64)
    logits = torch.randn(4, 1, 28, 28, dtype=torch.float64)
    mean, logvar = torch.randn(4, 2, dtype=torch.float64), torch.randn(4, 2, dtype=torch.float64)
    out = _output(x, logits, mean, logvar)
    terms = vae_loss(x, out)
    kl = kl_standard_normal(mean, logvar)
    torch.testing.assert_close(terms["kl"], kl)
    torch.testing.assert_close(terms["loss"], terms["recon"] + kl)
    torch.testing.assert_close(terms["elbo"], -terms["loss"])
    # the tutorial's loss: 784 * (per-pixel mean BCE) + KL
    torch.testing.assert_close(terms["loss"], 784 * terms["bce"] + kl)
    beta4 = vae_loss(x, out, beta=4.0)
    torch.testing.assert_close(beta4["loss"], terms["recon"] + 4.0 * kl)
    torch.testing.assert_close(beta4["recon"], terms["recon"])


def test_autoencoder_loss_and_pixel_metrics():
    x = torch.tensor([[[[0.0, 1.0], [1.0, 0.5]]]], dtype=torch.float64)
    logits = torch.zeros_like(x)  # p = 0.5 everywhere
    terms = autoencoder_loss(x, _output(x, logits))
    assert terms["recon"].item() == pytest.approx(4 * math.log(2))
    assert terms["bce"].item() == pytest.approx(math.log(2))
    assert terms["mse"].item() == pytest.approx((0.25 + 0.25 + 0.25 + 0.0) / 4)
    torch.testing.assert_close(terms["loss"], terms["recon"])


def test_gaussian_likelihood_terms():
    x = torch.tensor([[1.0, 2.0]], dtype=torch.float64)
    mean = torch.tensor([[0.0, 2.0]], dtype=torch.float64)
    terms = autoencoder_loss(x, _output(x, mean), likelihood="gaussian", sigma=1.0)
    assert terms["recon"].item() == pytest.approx(0.5 + math.log(2 * math.pi))
    assert terms["mse"].item() == pytest.approx(0.5)


def test_denoising_target_is_the_clean_input():
    clean = torch.full((1, 4), 1.0)
    noisy = torch.zeros(1, 4)
    logits = torch.full((1, 4), 10.0)  # predicts ~1: right for the clean target, wrong for the noisy input
    t_clean = autoencoder_loss(noisy, _output(noisy, logits), target=clean)
    t_noisy = autoencoder_loss(noisy, _output(noisy, logits))
    assert t_clean["recon"].item() < 1e-3 < t_noisy["recon"].item()


def test_pixel_metrics_for_probabilities_under_gaussian():
    x = torch.tensor([[0.0, 1.0]])
    m = pixel_metrics(x, torch.tensor([[0.5, 0.5]]), "gaussian")
    assert m["bce"].item() == pytest.approx(math.log(2), rel=1e-6)
    assert m["mse"].item() == pytest.approx(0.25)


def test_log_normal_diag_matches_torch_distributions():
    from vaelab.losses import log_normal_diag

    mean, logvar = torch.randn(3, 4, dtype=torch.float64), torch.randn(3, 4, dtype=torch.float64)
    z = torch.randn(5, 3, 4, dtype=torch.float64)
    expected = Normal(mean, torch.exp(0.5 * logvar)).log_prob(z).sum(-1)
    torch.testing.assert_close(log_normal_diag(z, mean, logvar), expected)


def _k_samples(x, k, gen):
    mean, logvar = torch.randn(2, 3, dtype=torch.float64), torch.randn(2, 3, dtype=torch.float64) * 0.3
    post = DiagonalGaussian(mean, logvar)
    z = torch.stack([post.sample(gen) for _ in range(k)])  # (K, B, D)
    w = torch.randn(3, 6, dtype=torch.float64)
    recon = z @ w  # a fixed linear 'decoder': (K, B, 6)
    return post, z, recon


def test_iwae_bound_with_one_sample_is_the_monte_carlo_elbo():
    from vaelab.losses import iwae_bound, log_importance_weights, log_normal_diag

    gen = torch.Generator().manual_seed(0)
    x = torch.rand(2, 6, dtype=torch.float64)
    post, z, recon = _k_samples(x, 1, gen)
    bound = iwae_bound(log_importance_weights(x, recon, z, post.mean, post.logvar, "bernoulli"))
    elbo = -bernoulli_nll(x, recon[0]) + log_normal_diag(z[0], torch.zeros(2, 3, dtype=torch.float64),
                                                         torch.zeros(2, 3, dtype=torch.float64)) \
        - log_normal_diag(z[0], post.mean, post.logvar)
    torch.testing.assert_close(bound, elbo)


def test_iwae_bound_is_at_least_the_elbo_on_the_same_samples():
    from vaelab.losses import iwae_bound, log_importance_weights

    gen = torch.Generator().manual_seed(1)
    x = torch.rand(2, 6, dtype=torch.float64)
    post, z, recon = _k_samples(x, 50, gen)
    log_w = log_importance_weights(x, recon, z, post.mean, post.logvar, "bernoulli")
    assert (iwae_bound(log_w) >= log_w.mean(0)).all()  # Jensen: log mean exp >= mean log
    assert (iwae_bound(log_w) > log_w.mean(0) + 1e-6).all()


def test_vae_loss_with_k_samples_is_the_negative_iwae_bound():
    from vaelab.losses import iwae_bound, log_importance_weights

    gen = torch.Generator().manual_seed(2)
    x = torch.rand(2, 6, dtype=torch.float64)
    post, z, recon = _k_samples(x, 5, gen)
    terms = vae_loss(x, ModelOutput(recon=recon, z=z, posterior=post))
    expected = -iwae_bound(log_importance_weights(x, recon, z, post.mean, post.logvar, "bernoulli"))
    torch.testing.assert_close(terms["loss"], expected)
    assert terms["recon"].shape == (2,)


def test_capacity_and_free_bits():
    x = torch.rand(2, 4, dtype=torch.float64)
    logits = torch.zeros(2, 4, dtype=torch.float64)
    mean = torch.tensor([[1.0, 0.0], [1.0, 0.0]], dtype=torch.float64)  # KL per dim: 0.5 and 0
    post = DiagonalGaussian(mean, torch.zeros_like(mean))
    out = ModelOutput(recon=logits, z=mean, posterior=post)
    base = vae_loss(x, out)
    cap = vae_loss(x, out, beta=2.0, capacity=3.0)
    torch.testing.assert_close(cap["loss"], base["recon"] + 2.0 * (0.5 - 3.0) * -1)
    fb = vae_loss(x, out, free_bits=0.25)  # dim 0 (0.5 >= 0.25) counts as is; dim 1 (0 < 0.25) counts 0.25
    torch.testing.assert_close(fb["loss"], base["recon"] + 0.5 + 0.25)
    torch.testing.assert_close(fb["kl"], base["kl"])
