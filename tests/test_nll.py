"""The importance-sampled likelihood where log p(x) is known exactly: probabilistic PCA.

p(z) = N(0, I), p(x|z) = N(W z + mu, s^2 I)  =>  p(x) = N(mu, W W^T + s^2 I). A linear VAE (mlp arch with no
hidden layer, Gaussian likelihood with sigma = s) whose decoder is (W, mu) has exactly this marginal.
"""

import math

import pytest
import torch
from torch.distributions import MultivariateNormal

from vaelab.cli import evaluate as evaluate_cli
from vaelab.data import ArrayDataset
from vaelab.errors import VaelabError
from vaelab.evaluation.nll import NLL_PRECISIONS, _chunk_size, _decoder_width, importance_nll, log_likelihood
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
    for chunk in (1, 5, 63, None):  # None: the decoder-width rule
        b = log_likelihood(model, x, n_samples=64, generator=torch.Generator().manual_seed(2), chunk=chunk)
        # the same samples; only the grouping of the log-sum-exp differs (float64 rounding)
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)
    c = log_likelihood(model, x, n_samples=64, generator=torch.Generator().manual_seed(3), chunk=64)
    assert (a - c).abs().max() > 1e-3  # another seed, other samples


def test_decode_calls_are_sized_by_the_decoders_widest_layer():
    conv = build_model("seed-vae", input_shape=(1, 28, 28)).eval()  # widest: 32 x 28 x 28 after the last ConvT
    mlp = build_model(model="vae", arch="mlp", hidden=(512, 512), latent_dim=32, input_shape=(1, 28, 28)).eval()
    z = torch.zeros(100, 2)
    assert _decoder_width(conv, z, None) == 32 * 28 * 28
    assert _decoder_width(mlp, torch.zeros(100, 32), None) == 784
    assert _chunk_size(100, 32 * 28 * 28) == 2 and _chunk_size(100, 784) == 80  # 6 Mi values per decode call
    assert _chunk_size(100_000, 784) == 1 and _chunk_size(1, 1) == 10_000


def test_dataset_report():
    model, x, truth = _ppca(posterior_scale=1.0)
    model = model.float()
    out = importance_nll(model, ArrayDataset(x.float(), scale=1.0), n_samples=3, batch_size=7)
    assert out["n"] == 20 and out["nll_samples"] == 3
    assert out["nll"] == pytest.approx(float(-truth.mean()), abs=1e-3)
    assert out["nll_bits_per_dim"] == pytest.approx(out["nll"] / (D * math.log(2)))
    assert out["nll_se"] == pytest.approx(float((-truth).std() / math.sqrt(20)), abs=1e-3)


def test_bf16_decodings_shift_the_estimate_by_their_rounding_only():
    # precision="bf16" decodes under bf16 autocast (8-bit mantissa: the linear decoder's means move by about 2^-9
    # of their size); the encoder, the likelihood's sums and the log-sum-exp stay fp32, so the exact posterior's
    # estimate stays within that rounding of the closed form, and the fp32 estimate is untouched by the option
    model, x, truth = _ppca(posterior_scale=1.0)
    model, x = model.float(), x.float()
    fp32 = log_likelihood(model, x, n_samples=8, generator=torch.Generator().manual_seed(4))
    bf16 = log_likelihood(model, x, n_samples=8, generator=torch.Generator().manual_seed(4), precision="bf16")
    assert fp32.dtype == bf16.dtype == torch.float32
    torch.testing.assert_close(fp32.double(), truth, atol=1e-4, rtol=0)
    gap = (bf16.double() - truth).abs()
    assert 1e-4 < float(gap.max()) < 0.1  # bf16 ran (it differs) and its shift is rounding-sized
    assert float((bf16.double() - truth).mean().abs()) < 0.02  # no systematic shift over the 20 points


def test_nll_precision_is_checked_and_recorded():
    model, x, _ = _ppca(posterior_scale=1.0)
    data = ArrayDataset(x.float(), scale=1.0)
    with pytest.raises(VaelabError, match=r"precision='fp16' is not a precision of the likelihood; choose one of "
                                          r"fp32, bf16"):
        importance_nll(model.float(), data, n_samples=2, precision="fp16")
    out = importance_nll(model.float(), data, n_samples=2, precision="bf16")
    assert out["nll_precision"] == "bf16" and out["n"] == 20
    assert importance_nll(model.float(), data, n_samples=2)["nll_precision"] == "fp32"
    assert NLL_PRECISIONS == evaluate_cli.NLL_PRECISIONS  # the CLI's copy (kept torch-free for --help)


def test_per_sample_values_are_the_reports():
    model, x, truth = _ppca(posterior_scale=1.0)
    data = ArrayDataset(x.float(), scale=1.0)
    out = importance_nll(model.float(), data, n_samples=3, batch_size=7, per_sample=True)
    each = out["nll_per_sample"]
    assert each.shape == (20,) and each.dtype == torch.float64
    torch.testing.assert_close(each, -truth, atol=1e-4, rtol=0)  # the exact posterior: each sample's own -log p(x)
    assert float(each.mean()) == out["nll"] and float(each.std() / math.sqrt(20)) == pytest.approx(out["nll_se"])
    assert "nll_per_sample" not in importance_nll(model.float(), data, n_samples=3, batch_size=7)


@pytest.mark.parametrize("name", ["vae", "hvae", "cvae", "m1m2"])
def test_bf16_decodings_in_every_importance_sampler(name):
    # the models with importance samplers of their own (two stochastic layers; M1's codes scored by M2) and the
    # conditional VAE: their bf16 estimates come back in fp32, near the fp32 ones (untrained nets on digits)
    from vaelab.data import load_dataset

    data = load_dataset("digits").test
    idx = torch.arange(16)
    x, y = data.batch(idx), data.labels(idx)
    torch.manual_seed(0)
    kw = {"condition_dim": 10} if name in ("cvae", "m1m2") else {}
    model = build_model(model=name, input_shape=data.sample_shape, **kw).eval()
    cond = y if kw else None
    fp32 = log_likelihood(model, x, 20, torch.Generator().manual_seed(0), condition=cond)
    bf16 = log_likelihood(model, x, 20, torch.Generator().manual_seed(0), condition=cond, precision="bf16")
    assert fp32.dtype == bf16.dtype == torch.float32 and bf16.shape == (16,)
    gap = float((fp32 - bf16).abs().max())
    assert 0 < gap < 0.25, gap
