"""The two-stochastic-layer VAE where log p(x) is known exactly: a linear-Gaussian hierarchy.

p(z2) = N(0, I), p(z1|z2) = N(A z2 + a, c I), p(x|z1) = N(W z1 + b, s^2 I)  =>  p(x) = N(W a + b, W S1 W^T + s^2 I)
with S1 = A A^T + c I. With A = diag(alpha) padded by a zero row and W with orthogonal columns, the true posterior
p(z1, z2 | x) = p(z1 | x) p(z2 | z1) has diagonal Gaussian factors, linear in x and z1: an HVAE with linear networks
(hidden=(), hidden2=(), Gaussian likelihood with sigma = s) represents it exactly, and its importance weights are
then all log p(x).
"""

import math

import pytest
import torch
from torch.distributions import MultivariateNormal, Normal

from vaelab.config import ModelConfig
from vaelab.data import ArrayDataset, load_dataset
from vaelab.errors import ConfigError
from vaelab.evaluation import evaluate
from vaelab.evaluation.nll import log_likelihood
from vaelab.models.hvae import hvae_log_weights, hvae_loss
from vaelab.models import build_model, from_pretrained
from vaelab.training import fit

D, L1, L2, S, C = 6, 3, 2, 0.5, 0.3
ALPHA = torch.tensor([1.5, 0.8], dtype=torch.float64)


def _linear_hierarchy(posterior_scale: float = 1.0):
    torch.manual_seed(0)
    model = build_model(model="hvae", arch="mlp", hidden=(), hidden2=(), latent_dim=L1, latent2_dim=L2,
                        likelihood="gaussian", gaussian_sigma=S, input_shape=(D,)).double().eval()
    f64 = dict(dtype=torch.float64)
    a_mat = torch.zeros(L1, L2, **f64)
    a_mat[0, 0], a_mat[1, 1] = ALPHA
    a_vec = torch.tensor([0.2, -0.4, 0.1], **f64)
    w = torch.linalg.qr(torch.randn(D, L1, **f64))[0] * torch.tensor([2.0, 1.0, 0.5], **f64)
    b = torch.linspace(-1, 1, D, **f64)
    s1 = a_mat @ a_mat.T + C * torch.eye(L1, **f64)  # Cov(z1), diagonal
    s1_inv = torch.linalg.inv(s1)
    precision = s1_inv + w.T @ w / S**2  # of p(z1 | x), diagonal
    cov1 = torch.linalg.inv(precision)
    enc, up, down, dec = model.encoder[-1], model.up[0], model.down[0], model.decoder[0]
    with torch.no_grad():
        for layer in (enc, up, down):
            layer.weight.zero_()
        dec.weight.copy_(w)
        dec.bias.copy_(b)
        enc.weight[:L1] = cov1 @ w.T / S**2  # mean of p(z1 | x)
        enc.bias[:L1] = cov1 @ (s1_inv @ a_vec - w.T @ b / S**2)
        enc.bias[L1:] = torch.log(torch.diagonal(cov1) * posterior_scale**2)
        gain = ALPHA / (ALPHA**2 + C)  # p(z2 | z1) = N(A^T S1^-1 (z1 - a), I - A^T S1^-1 A)
        up.weight[:L2, :L2] = torch.diag(gain)
        up.bias[:L2] = -gain * a_vec[:L2]
        up.bias[L2:] = torch.log(C / (ALPHA**2 + C))
        down.weight[:L1] = a_mat
        down.bias[:L1] = a_vec
        down.bias[L1:] = math.log(C)
    exact = MultivariateNormal(w @ a_vec + b, w @ s1 @ w.T + S**2 * torch.eye(D, **f64))
    x = exact.sample((20,))
    return model, x, exact.log_prob(x)


def test_exact_posterior_gives_the_exact_likelihood_with_one_sample():
    model, x, truth = _linear_hierarchy()
    est = log_likelihood(model, x, n_samples=1, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(est, truth)
    # and the IWAE bound at any K is then log p(x) too: every weight is p(x)
    torch.manual_seed(1)
    torch.testing.assert_close(-hvae_loss(x, model(x, n_samples=7), likelihood="gaussian", sigma=S)["loss"], truth)


def test_estimate_converges_to_the_closed_form_as_k_grows():
    model, x, truth = _linear_hierarchy(posterior_scale=1.2)
    errors = []
    for k in (1, 10, 100, 3000):
        est = log_likelihood(model, x, n_samples=k, generator=torch.Generator().manual_seed(1), chunk=500)
        errors.append(float((truth - est).abs().mean()))
        assert float(est.mean()) <= float(truth.mean()) + 0.02  # a lower bound in expectation
    assert errors[0] > errors[1] > errors[2] > errors[3]
    assert errors[3] < 0.01


def test_chunking_does_not_change_the_estimate():
    model, x, _ = _linear_hierarchy(posterior_scale=1.5)
    a = log_likelihood(model, x, n_samples=40, generator=torch.Generator().manual_seed(2), chunk=40)
    for chunk in (1, 7, None):
        b = log_likelihood(model, x, n_samples=40, generator=torch.Generator().manual_seed(2), chunk=chunk)
        torch.testing.assert_close(a, b, rtol=0, atol=1e-12)


def test_loss_terms_are_the_two_layer_densities():
    model, x, _ = _linear_hierarchy(posterior_scale=1.3)
    torch.manual_seed(3)
    out = model(x)  # one sample
    terms = hvae_loss(x, out, likelihood="gaussian", sigma=S, beta=0.5)
    q1, top, p1 = out.posterior, out.top, out.prior1
    normal = lambda m, lv: Normal(m, (0.5 * lv).exp())  # noqa: E731
    recon = -Normal(out.recon, S).log_prob(x).sum(1)
    kl_top = torch.distributions.kl_divergence(normal(top.mean, top.logvar), Normal(0.0, 1.0)).sum(1)
    kl = normal(q1.mean, q1.logvar).log_prob(out.z1).sum(1) - normal(p1.mean, p1.logvar).log_prob(out.z1).sum(1) \
        + kl_top
    torch.testing.assert_close(terms["recon"], recon)
    torch.testing.assert_close(terms["kl"], kl)
    torch.testing.assert_close(terms["kl_top"], kl_top)
    torch.testing.assert_close(terms["loss"], recon + 0.5 * kl)
    torch.testing.assert_close(terms["elbo"], -(recon + kl))
    # K samples: the bound is the log-mean-exp of the weights, each weight the five densities
    out = model(x, n_samples=4)
    log_w = (Normal(out.recon, S).log_prob(x).sum(-1) + normal(p1m := out.prior1.mean, out.prior1.logvar)
             .log_prob(out.z1).sum(-1) + Normal(0.0, 1.0).log_prob(out.z).sum(-1)
             - normal(q1.mean, q1.logvar).log_prob(out.z1).sum(-1)
             - normal(out.top.mean, out.top.logvar).log_prob(out.z).sum(-1))
    assert p1m.shape == (4, 20, L1)
    torch.testing.assert_close(hvae_log_weights(x, out, "gaussian", S), log_w)
    terms = hvae_loss(x, out, likelihood="gaussian", sigma=S)
    torch.testing.assert_close(terms["iwae"], torch.logsumexp(log_w, 0) - math.log(4))
    torch.testing.assert_close(terms["loss"], -terms["iwae"])
    torch.testing.assert_close(terms["elbo"], log_w.mean(0))
    # β < 1 (a warm-up) tempers the prior-over-posterior part of every weight; the reported bound stays the IWAE's
    log_px = Normal(out.recon, S).log_prob(x).sum(-1)
    tempered = hvae_loss(x, out, likelihood="gaussian", sigma=S, beta=0.25)
    torch.testing.assert_close(tempered["loss"], -(torch.logsumexp(log_px + 0.25 * (log_w - log_px), 0) - math.log(4)))
    torch.testing.assert_close(tempered["iwae"], terms["iwae"])


def test_config_defaults_and_errors():
    model = build_model(model="hvae", arch="mlp", latent_dim=9, input_shape=(5,))
    assert model.latent_shape == (4,) and model.bottom_shape == (9,)  # latent2_dim 0: half of latent_dim
    assert model.sample(3, generator=torch.Generator().manual_seed(0)).shape == (3, 5)
    with pytest.raises(ConfigError, match=r"latent2_dim=4 is not a setting of model 'vae'; its settings are \['beta'\]"):
        ModelConfig(model="vae", latent2_dim=4).validate()
    with pytest.raises(ConfigError, match="model='hvae' needs a vector latent z1"):
        ModelConfig(model="hvae", arch="conv-pool").validate()
    with pytest.raises(ConfigError, match=r"latent2_dim=-1 must be an integer >= 0"):
        ModelConfig(model="hvae", latent2_dim=-1).validate()
    with pytest.raises(ConfigError, match=r"hidden2=\[0\] must be a list of positive integers"):
        ModelConfig(model="hvae", hidden2=(0,)).validate()


def test_iwae_training_on_digits_round_trips_and_scores(tmp_path):
    digits = load_dataset("digits")
    torch.manual_seed(0)
    model = build_model(model="hvae", arch="mlp", hidden=(64,), latent_dim=8, latent2_dim=4, hidden2=(32,),
                        input_shape=digits.train.sample_shape)
    history = fit(model, digits.train, digits.test, epochs=3, batch_size=64, progress=False, iw_samples=3,
                  binarize=True, kl_schedule="linear", kl_warmup=1, out=tmp_path / "run")  # β warms the bound up
    assert history[-1]["train_iwae"] > history[0]["train_iwae"]
    assert all(h["train_iwae"] >= h["train_elbo"] for h in history)  # the IWAE bound lies above the ELBO
    loaded = from_pretrained(tmp_path / "run")
    x = digits.test.batch(slice(0, 10), binarize=True, generator=torch.Generator().manual_seed(0))
    a = log_likelihood(model.eval(), x, 50, generator=torch.Generator().manual_seed(4))
    b = log_likelihood(loaded, x, 50, generator=torch.Generator().manual_seed(4))
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    report = evaluate(loaded, digits.test, nll_samples=20, binarize=True)
    # the likelihood estimate (K=20) is tighter than the one-sample ELBO, and both are finite
    assert math.isfinite(report["nll"]) and report["nll"] < -report["elbo"]
    assert report["latent_dims"] == 4 and report["bottom_latent_dims"] == 8 and loaded.reconstruct(x).shape == x.shape
    with torch.inference_mode():
        z1_means = loaded.encode_bottom(digits.test.batch(torch.arange(len(digits.test)))).mean
    assert report["bottom_active_units"] == int((z1_means.var(0) > 0.01).sum())


def test_anomaly_scores_use_both_layers():
    from vaelab.anomaly import anomaly_scores

    model, x, truth = _linear_hierarchy()
    data = ArrayDataset(x.float(), scale=1.0)
    model = model.float()
    scores = anomaly_scores(model, data, ("elbo", "iwae", "recon"), n_samples=4)
    # exact posterior: every weight is p(x), so both sampled scores are -log p(x)
    torch.testing.assert_close(torch.from_numpy(scores["iwae"]), -truth, rtol=0, atol=1e-4)
    torch.testing.assert_close(torch.from_numpy(scores["elbo"]), -truth, rtol=0, atol=1e-4)
    recon = -Normal(model.reconstruct_raw(data.batch(slice(0, 20))).double(), S).log_prob(x).sum(1)
    torch.testing.assert_close(torch.from_numpy(scores["recon"]), recon, rtol=0, atol=1e-4)


def test_kl_shaping_options_its_loss_does_not_use_are_refused():
    digits = load_dataset("digits")
    model = build_model(model="hvae", arch="mlp", hidden=(8,), latent_dim=4, input_shape=digits.train.sample_shape)
    with pytest.raises(ConfigError, match=r"(?s)capacity=3.0 does not apply to model 'hvae': its loss \(hvae_loss\) "
                                          r"does not use it; drop it.*free_bits=0.5 does not apply"):
        fit(model, digits.train, None, epochs=1, free_bits=0.5, capacity=3.0, progress=False)
