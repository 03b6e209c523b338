"""The importance-sampled likelihood where log p(x) is known exactly: probabilistic PCA.

p(z) = N(0, I), p(x|z) = N(W z + mu, s^2 I)  =>  p(x) = N(mu, W W^T + s^2 I). A linear VAE (mlp arch with no
hidden layer, Gaussian likelihood with sigma = s) whose decoder is (W, mu) has exactly this marginal.
"""

import math

import pytest
import torch
from torch.distributions import MultivariateNormal

from vaelab.data import ArrayDataset
from vaelab.evaluation.nll import importance_nll, log_likelihood
from vaelab.models import build_model

D, L, S = 6, 2, 0.5


def _ppca(posterior_scale: float):
    torch.manual_seed(0)
    model = build_model(model="vae", arch="mlp", hidden=(), latent_dim=L, likelihood="gaussian",
                        gaussian_sigma=S, input_shape=(D,)).double().eval()
    w = torch.linalg.qr(torch.randn(D, L, dtype=torch.float64))[0] * torch.tensor([2.0, 1.0],
                                                                                    dtype=torch.float64)
    mu = torch.linspace(-1, 1, D, dtype=torch.float64)
    # W has orthogonal columns, so the exact posterior is diagonal: M = W^T W + s^2 I,
    # mean = M^-1 W^T (x - mu), covariance s^2 M^-1
    m = w.T @ w + S**2 * torch.eye(L, dtype=torch.float64)
    m_inv = torch.linalg.inv(m)
    enc, dec = model.encoder[-1], model.decoder[0]
    with torch.no_grad():
        dec.weight.copy_(w)
        dec.bias.copy_(mu)
        enc.weight.zero_()
        enc.bias.zero_()
        enc.weight[:L] = m_inv @ w.T
        enc.bias[:L] = -(m_inv @ w.T @ mu)
        # log-variance: exact, or widened by posterior_scale^2 to make q imperfect
        enc.bias[L:] = torch.log(S**2 * torch.diagonal(m_inv) * posterior_scale**2)
    exact = MultivariateNormal(mu, w @ w.T + S**2 * torch.eye(D, dtype=torch.float64))
    x = exact.sample((20,))
    return model, x, exact.log_prob(x)


def test_exact_posterior_gives_the_exact_likelihood_with_one_sample():
    model, x, truth = _ppca(posterior_scale=1.0)
    est = log_likelihood(model, x, n_samples=1, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(est, truth)


def test_estimate_converges_to_the_closed_form_as_k_grows():
    model, x, truth = _ppca(posterior_scale=1.8)
    errors = []
    for k in (1, 10, 100, 5000):
        est = log_likelihood(model, x, n_samples=k, generator=torch.Generator().manual_seed(1), chunk=700)
        errors.append(float((truth - est).abs().mean()))
        # a lower bound in expectation: on average over the 20 points the estimate sits below the truth
        assert float(est.mean()) <= float(truth.mean()) + 0.02  # (+ Monte Carlo noise)
    assert errors[0] > errors[1] > errors[2] > errors[3]
    assert errors[3] < 0.01


def test_chunking_does_not_change_the_estimate():
    model, x, _ = _ppca(posterior_scale=1.5)
    a = log_likelihood(model, x, n_samples=64, generator=torch.Generator().manual_seed(2), chunk=64)
    b = log_likelihood(model, x, n_samples=64, generator=torch.Generator().manual_seed(2), chunk=64)
    torch.testing.assert_close(a, b)


def test_dataset_report():
    model, x, truth = _ppca(posterior_scale=1.0)
    model = model.float()
    out = importance_nll(model, ArrayDataset(x.float(), scale=1.0), n_samples=3, batch_size=7)
    assert out["n"] == 20 and out["nll_samples"] == 3
    assert out["nll"] == pytest.approx(float(-truth.mean()), abs=1e-3)
    assert out["nll_bits_per_dim"] == pytest.approx(out["nll"] / (D * math.log(2)))
    assert out["nll_se"] == pytest.approx(float((-truth).std() / math.sqrt(20)), abs=1e-3)
