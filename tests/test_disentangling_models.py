"""The disentangling objectives, β-TCVAE (models/btcvae.py) and DIP-VAE (models/dipvae.py), against the same
quantities written out again here in numpy: the minibatch estimates of the mutual information, the total
correlation and the dimension-wise KL with their weights, and the DIP covariance penalties. Then what the rest
of vaelab needs of them: the training loop's dataset size and KL schedule, the evaluation path without a
dataset size, the refused options, the settings' errors, one epoch through `vaelab.fit`, and the command line.
"""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import vaelab
from vaelab.config import TrainConfig
from vaelab.errors import ConfigError, VaelabError
from vaelab.losses import NO_SHAPING, Shaping
from vaelab.models import build_model
from vaelab.models.base import DiagonalGaussian, ModelOutput
from vaelab.models.btcvae import btcvae_loss, kl_decomposition, log_batch_weights
from vaelab.models.dipvae import dipvae_loss
from vaelab.models.vae import vae_loss
from vaelab.training.loop import shaping_at

REPO = Path(__file__).resolve().parents[1]
TINY = {"arch": "mlp", "latent_dim": 3, "hidden": (8,), "input_shape": (6,)}


# ------------------------------------------------------------------------------------- numpy, written out


def np_logsumexp(a: np.ndarray, axis: int) -> np.ndarray:
    top = a.max(axis=axis, keepdims=True)
    return (top + np.log(np.exp(a - top).sum(axis=axis, keepdims=True))).squeeze(axis)


def np_log_normal(z, mean, logvar) -> np.ndarray:
    """log N(z | mean, exp(logvar)) of each coordinate (no sum)."""
    return -0.5 * (np.log(2 * np.pi) + logvar + (z - mean) ** 2 / np.exp(logvar))


def np_weights(b: int, n: int, estimator: str) -> np.ndarray:
    """w_ij of Chen et al.'s estimators, entry by entry; n = 0: the batch is the data (n = b)."""
    n = n or b
    if estimator == "mws" or b == 1:
        return np.full((b, b), 1.0 / (n * b))
    w = np.empty((b, b))
    for i in range(b):
        for j in range(b):
            if j == i:
                w[i, j] = 1.0 / n  # the sample's own posterior
            elif j == (i + 1) % b:
                w[i, j] = (n - b + 1) / (n * (b - 1))  # the stratum of the data outside the batch
            else:
                w[i, j] = 1.0 / (b - 1)
    return w


def np_decomposition(z, mean, logvar, n: int, estimator: str):
    """(MI, TC, dimension-wise KL) per sample: log q(z|x) - log q(z), log q(z) - sum_d log q(z_d),
    sum_d log q(z_d) - log p(z), with q(z) and q(z_d) as weighted sums over the batch."""
    pairs = np_log_normal(z[:, None, :], mean[None], logvar[None])  # (B, B, D): log q(z_id | x_j)
    log_w = np.log(np_weights(len(z), n, estimator))
    log_qz_x = np_log_normal(z, mean, logvar).sum(1)
    log_qz = np_logsumexp(log_w + pairs.sum(2), axis=1)
    log_prod = np_logsumexp(log_w[:, :, None] + pairs, axis=1).sum(1)
    log_pz = np_log_normal(z, 0.0, 0.0).sum(1)
    return log_qz_x - log_qz, log_qz - log_prod, log_prod - log_pz


def np_bernoulli_nll(x, logits) -> np.ndarray:
    return (np.logaddexp(0, logits) - x * logits).sum(1)


def np_dip(mean, logvar, variant: str) -> tuple[float, float]:
    """(sum of squared off-diagonal entries, sum of squared (diagonal - 1)) of DIP-VAE's covariance."""
    cov = np.cov(mean, rowvar=False, bias=True)
    if variant == "ii":
        cov = cov + np.diag(np.exp(logvar).mean(0))
    d = np.diag(cov)
    return float((cov ** 2).sum() - (d ** 2).sum()), float(((d - 1) ** 2).sum())


def fixed_batch(b: int = 5, d: int = 3, pixels: int = 6, seed: int = 0):
    """A batch of posteriors, samples, inputs and decoder logits, float64: (numpy arrays, ModelOutput, x)."""
    rng = np.random.default_rng(seed)
    mean, logvar = rng.normal(size=(b, d)), rng.normal(scale=0.5, size=(b, d)) - 1.0
    z = mean + np.exp(0.5 * logvar) * rng.normal(size=(b, d))
    x, logits = rng.random((b, pixels)), rng.normal(size=(b, pixels))
    t = lambda a: torch.tensor(a, dtype=torch.float64)  # noqa: E731
    out = ModelOutput(recon=t(logits), z=t(z), posterior=DiagonalGaussian(t(mean), t(logvar)))
    return (z, mean, logvar, x, logits), out, t(x)


def tiny(name: str, **settings):
    torch.manual_seed(0)
    return build_model(model=name, **TINY, **settings)


def tiny_batch(b: int = 12) -> torch.Tensor:
    return torch.rand((b, 6), generator=torch.Generator().manual_seed(1))


# ----------------------------------------------------------------------------------------------- β-TCVAE


@pytest.mark.parametrize("estimator", ["mws", "mss"])
@pytest.mark.parametrize("dataset_size", [0, 12, 1797])
def test_unit_weights_telescope_to_the_sampled_negative_elbo(estimator, dataset_size):
    """α = β = γ = 1: MI + TC + dw-KL = log q(z|x) - log p(z) at the same z, whatever the estimator and N, so
    the loss is recon + log q(z|x) - log p(z) (single sample)."""
    model = tiny("btcvae", alpha=1.0, beta=1.0, gamma=1.0, estimator=estimator)
    x = tiny_batch()
    out = model(x)
    terms = model.loss(x, out, shaping=Shaping(dataset_size=dataset_size))
    post = out.posterior
    z, mean, logvar = (t.detach().double().numpy() for t in (out.z, post.mean, post.logvar))
    expected = (np_bernoulli_nll(x.double().numpy(), out.recon.detach().double().numpy())
                + np_log_normal(z, mean, logvar).sum(1) - np_log_normal(z, 0.0, 0.0).sum(1))
    np.testing.assert_allclose(terms["loss"].detach().double().numpy(), expected, rtol=0, atol=1e-5)
    assert not torch.allclose(terms["tc"], torch.zeros(len(x)))  # the terms themselves are not trivial


@pytest.mark.parametrize("estimator", ["mws", "mss"])
@pytest.mark.parametrize("dataset_size", [0, 5, 1000])
def test_terms_equal_the_numpy_estimates(estimator, dataset_size):
    """MI, TC and dimension-wise KL of a fixed batch, and the loss recon + α·MI + β·TC + γ·dw-KL, against
    numpy's log-sum-exp over the batch with the estimator's weights (MWS: log(N·M))."""
    (z, mean, logvar, x, logits), out, xt = fixed_batch()
    terms = btcvae_loss(xt, out, alpha=0.5, beta=6.0, gamma=2.0, estimator=estimator, dataset_size=dataset_size)
    mi, tc, dw_kl = np_decomposition(z, mean, logvar, dataset_size, estimator)
    for name, value in (("mi", mi), ("tc", tc), ("dw_kl", dw_kl)):
        np.testing.assert_allclose(terms[name].numpy(), value, rtol=1e-12, atol=1e-12, err_msg=name)
    recon = np_bernoulli_nll(x, logits)
    np.testing.assert_allclose(terms["recon"].numpy(), recon, rtol=1e-12)
    np.testing.assert_allclose(terms["loss"].numpy(), recon + 0.5 * mi + 6.0 * tc + 2.0 * dw_kl, rtol=1e-12)
    kl = 0.5 * (mean ** 2 + np.exp(logvar) - 1 - logvar).sum(1)  # the closed form, reported beside
    np.testing.assert_allclose(terms["kl"].numpy(), kl, rtol=1e-12)
    np.testing.assert_allclose(terms["elbo"].numpy(), -(recon + kl), rtol=1e-12)


def test_mws_uses_the_weight_one_over_n_m():
    """Minibatch-weighted sampling: log q(z_i) = logsumexp_j log q(z_i | x_j) - log(N·M)."""
    (z, mean, logvar, _, _), out, xt = fixed_batch()
    n, m = 1000, len(z)
    pairs = np_log_normal(z[:, None, :], mean[None], logvar[None]).sum(2)
    log_qz = np_logsumexp(pairs, axis=1) - math.log(n * m)
    mi = btcvae_loss(xt, out, estimator="mws", dataset_size=n)["mi"].numpy()
    np.testing.assert_allclose(mi, np_log_normal(z, mean, logvar).sum(1) - log_qz, rtol=1e-12)


@pytest.mark.parametrize("dataset_size", [0, 1000])
def test_a_collapsed_posterior_shows_the_mws_offsets(dataset_size):
    """q(z|x) = p(z) for every x: MI, TC and dw-KL are all 0. MSS reads 0; MWS, whose weights sum to 1/N, reads
    the constant offsets log N, (D - 1)·log N and -D·log N (N = B without a dataset size)."""
    b, d = 6, 4
    z = torch.randn((b, d), generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    zeros = torch.zeros((b, d), dtype=torch.float64)
    log_n = math.log(dataset_size or b)
    expected = {"mws": (log_n, (d - 1) * log_n, -d * log_n), "mss": (0.0, 0.0, 0.0)}
    for estimator, values in expected.items():
        for term, value in zip(kl_decomposition(z, zeros, zeros, dataset_size, estimator), values):
            torch.testing.assert_close(term, torch.full((b,), value, dtype=torch.float64), rtol=0, atol=1e-12)


@pytest.mark.parametrize("b,n", [(2, 2), (2, 10), (5, 5), (7, 1000), (64, 737280)])
def test_mss_weights_sum_to_one(b, n):
    """Minibatch-stratified sampling: every row (and column) of weights sums to 1; 1/N on the diagonal, the
    stratum weight (N - M + 1)/(N(M - 1)) once per row, 1/(M - 1) elsewhere."""
    w = log_batch_weights(b, n, "mss").exp()
    ones = torch.ones(b, dtype=torch.float64)
    torch.testing.assert_close(w.sum(1), ones, rtol=0, atol=1e-12)
    torch.testing.assert_close(w.sum(0), ones, rtol=0, atol=1e-12)
    np.testing.assert_allclose(w.numpy(), np_weights(b, n, "mss"), rtol=1e-12)
    np.testing.assert_allclose(torch.diagonal(w).numpy(), 1.0 / n, rtol=1e-12)


def test_mws_weights_and_a_batch_of_one():
    """MWS rows sum to 1/N (the paper's biased weight); a batch of one has no other sample: both estimators
    give the weight 1/N to the sample's own posterior."""
    torch.testing.assert_close(log_batch_weights(8, 100, "mws").exp().sum(1),
                               torch.full((8,), 0.01, dtype=torch.float64))
    for estimator in ("mws", "mss"):
        assert torch.allclose(log_batch_weights(1, 50, estimator), torch.tensor([[-math.log(50)]], dtype=torch.float64))


def test_without_a_dataset_size_the_batch_is_the_data():
    """Evaluation passes no dataset size (NO_SHAPING: 0): the batch stands for the data (N = B), the terms stay
    finite; a batch of one then has MI = TC = 0 and dw-KL = log q(z|x) - log p(z). A dataset smaller than the
    batch is an error."""
    model = tiny("btcvae")
    x = tiny_batch(10)
    torch.manual_seed(3)
    out = model(x)
    zero, same = model.loss(x, out), model.loss(x, out, shaping=Shaping(dataset_size=10))
    for k in ("loss", "mi", "tc", "dw_kl"):
        assert torch.isfinite(zero[k]).all() and torch.equal(zero[k], same[k]), k
    one = model.loss(x[:1], model(x[:1]))
    assert torch.isfinite(one["loss"]).all()
    torch.testing.assert_close(one["mi"], torch.zeros(1), rtol=0, atol=1e-6)
    torch.testing.assert_close(one["tc"], torch.zeros(1), rtol=0, atol=1e-6)
    with pytest.raises(VaelabError) as e:
        model.loss(x, out, shaping=Shaping(dataset_size=5))
    assert str(e.value) == ("dataset_size=5 is smaller than the batch (10 samples); the batch is drawn from the data, "
                            "so pass the size of the training set (0: the batch is all of it)")


def test_the_loop_gives_the_dataset_size_and_the_kl_schedule_scales_all_three_weights():
    assert shaping_at(TrainConfig(), step=0, steps_per_epoch=13, dataset_size=1617).dataset_size == 1617
    model = tiny("btcvae", alpha=0.5, beta=6.0, gamma=2.0, estimator="mss")
    weights = model.loss_weights(Shaping(kl_scale=0.25, dataset_size=100))
    assert weights.pop("likelihood").name == "bernoulli"
    assert weights == {"sigma": 1.0, "alpha": 0.125, "beta": 1.5, "gamma": 0.5, "estimator": "mss",
                       "dataset_size": 100}
    x = tiny_batch()
    out = model(x)
    off = model.loss(x, out, shaping=Shaping(kl_scale=0.0, dataset_size=100))
    assert torch.equal(off["loss"], off["recon"])  # a warm-up's first step: the reconstruction alone
    assert model.training_problems(TrainConfig(kl_schedule="linear", kl_warmup=2.0)) == []


def test_btcvae_refuses_the_options_it_does_not_honour():
    model = tiny("btcvae")
    assert model.training_problems(TrainConfig(capacity=5.0, free_bits=0.5)) == [
        "capacity=5.0 does not apply to model 'btcvae': its loss (btcvae_loss) does not use it; drop it",
        "free_bits=0.5 does not apply to model 'btcvae': its loss (btcvae_loss) does not use it; drop it"]
    assert model.training_problems(TrainConfig(iw_samples=5, kl_schedule="linear", kl_warmup=1.0)) == [
        "iw_samples=5 does not apply to model 'btcvae': its mutual information, total correlation and "
        "dimension-wise KL are estimated from one posterior sample per input, not from the IWAE bound; drop it "
        "(iw_samples=1)"]


def test_btcvae_k_samples_give_the_vae_bounds():
    """Anomaly scores ask any stochastic model for its ELBO and IWAE bound from K samples: the VAE's."""
    model = tiny("btcvae")
    x = tiny_batch()
    eps = torch.randn((4, 3), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        bounds = model.anomaly_bounds(x, eps)
        post = model.encode(x)
        z = post.mean + post.std * eps[:, None]
        raw = model.decode_raw(z.flatten(0, 1)).unflatten(0, (4, len(x)))
        expected = vae_loss(x, ModelOutput(raw, z, post))
    assert torch.equal(bounds["elbo"], expected["elbo"]) and torch.equal(bounds["iwae"], expected["iwae"])


def test_bad_btcvae_settings_are_reported_together():
    with pytest.raises(ConfigError) as e:
        build_model(model="btcvae", alpha=-1.0, beta=math.inf, gamma="1", estimator="MWS", **TINY)
    assert e.value.problems == [
        "alpha=-1.0 must be a finite number >= 0", "beta=inf must be a finite number >= 0",
        "gamma='1' must be a finite number >= 0",
        "estimator='MWS' is unknown; choose 'mws' (minibatch-weighted sampling) or 'mss' (minibatch-stratified "
        "sampling)"]


# ----------------------------------------------------------------------------------------------- DIP-VAE


@pytest.mark.parametrize("variant", ["i", "ii"])
def test_dip_penalties_equal_the_numpy_covariance(variant):
    """dip_od = sum of the squared off-diagonal entries, dip_d = sum of squared (diagonal - 1), of Cov[μ] (i) or
    Cov[μ] + E[diag σ²] (ii) over the batch; loss = the VAE's + λ_od·dip_od + λ_d·dip_d on every sample, so its
    batch mean is the batch objective."""
    (_, mean, logvar, _, _), out, xt = fixed_batch(b=7, d=4)
    terms = dipvae_loss(xt, out, variant=variant, lambda_od=3.0, lambda_d=7.0)
    off, on = np_dip(mean, logvar, variant)
    np.testing.assert_allclose(terms["dip_od"].numpy(), np.full(7, off), rtol=1e-12)
    np.testing.assert_allclose(terms["dip_d"].numpy(), np.full(7, on), rtol=1e-12)
    base = vae_loss(xt, out)
    np.testing.assert_allclose(terms["loss"].numpy(), base["loss"].numpy() + 3.0 * off + 7.0 * on, rtol=1e-12)
    assert float(terms["loss"].mean()) == pytest.approx(float(base["loss"].mean()) + 3.0 * off + 7.0 * on, rel=1e-12)
    assert off > 0 and on > 0


def test_dip_penalty_is_zero_at_the_identity():
    """Means whose batch covariance is I (any offset): no DIP-VAE-I penalty; means with covariance 0.36·I and
    variances 0.64: no DIP-VAE-II penalty. The loss is then the VAE's."""
    t = lambda a: torch.tensor(a, dtype=torch.float64)  # noqa: E731
    corners = np.array([[1.0, 1.0], [1.0, -1.0], [-1.0, 1.0], [-1.0, -1.0]])
    x, logits = t(np.full((4, 3), 0.5)), t(np.zeros((4, 3)))
    for variant, mean, logvar in (("i", corners + [3.0, -2.0], np.full((4, 2), -0.3)),
                                  ("ii", 0.6 * corners + [1.0, 0.5], np.full((4, 2), math.log(0.64)))):
        out = ModelOutput(recon=logits, z=t(mean), posterior=DiagonalGaussian(t(mean), t(logvar)))
        terms = dipvae_loss(x, out, variant=variant, lambda_od=10.0, lambda_d=100.0)
        assert float(terms["dip_od"].abs().max()) < 1e-12 and float(terms["dip_d"].abs().max()) < 1e-12, variant
        np.testing.assert_allclose(terms["loss"].numpy(), vae_loss(x, out)["loss"].numpy(), rtol=1e-12)


def test_dip_lambda_d_follows_the_papers_rule_unless_set():
    weights = lambda **s: tiny("dipvae", **s).loss_weights(NO_SHAPING)  # noqa: E731
    assert weights(lambda_od=2.0)["lambda_d"] == 20.0  # DIP-VAE-I: 10·λ_od
    assert weights(variant="ii", lambda_od=2.0)["lambda_d"] == 2.0  # DIP-VAE-II: λ_od
    assert weights(variant="ii", lambda_od=2.0, lambda_d=0.5)["lambda_d"] == 0.5
    assert tiny("dipvae").config.settings == {"variant": "i", "lambda_od": 10.0, "lambda_d": None}


def test_dip_honours_the_vaes_kl_shaping_and_the_iwae_bound():
    """The -ELBO part is vae_loss's: KL schedule, capacity, free bits; with K samples the IWAE bound."""
    model = tiny("dipvae", variant="ii", lambda_od=3.0)
    x = tiny_batch()
    torch.manual_seed(4)
    out = model(x)
    shaping = Shaping(kl_scale=0.5, capacity=2.0, free_bits=0.1)
    terms = model.loss(x, out, shaping=shaping)
    base = vae_loss(x, out, beta=0.5, capacity=2.0, free_bits=0.1)
    penalty = 3.0 * terms["dip_od"] + 3.0 * terms["dip_d"]
    torch.testing.assert_close(terms["loss"], base["loss"] + penalty)
    torch.manual_seed(4)
    out_k = model(x, n_samples=3)
    terms_k = model.loss(x, out_k)
    torch.testing.assert_close(terms_k["loss"], -terms_k["iwae"] + 3.0 * terms_k["dip_od"] + 3.0 * terms_k["dip_d"])
    assert model.training_problems(TrainConfig(capacity=5.0, free_bits=0.5, iw_samples=1)) == []
    assert model.training_problems(TrainConfig(iw_samples=5)) == []


def test_bad_dipvae_settings_are_reported_together():
    with pytest.raises(ConfigError) as e:
        build_model(model="dipvae", variant="I", lambda_od=-1.0, lambda_d=math.nan, **TINY)
    assert e.value.problems == [
        "variant='I' is unknown; choose 'i' (DIP-VAE-I: the covariance of the encoder means) or 'ii' (DIP-VAE-II: "
        "the covariance of the aggregate posterior)",
        "lambda_od=-1.0 must be a finite number >= 0",
        "lambda_d=nan must be a finite number >= 0, or unset (None) for the paper's rule"]


# ------------------------------------------------------------------------------------- training, the CLI


@pytest.fixture(scope="module")
def digits():
    return vaelab.load_dataset("digits")


@pytest.mark.parametrize("name,settings,terms", [("btcvae", {"estimator": "mss"}, ("mi", "tc", "dw_kl")),
                                                 ("dipvae", {"variant": "ii"}, ("dip_od", "dip_d"))])
def test_one_epoch_on_digits(digits, tmp_path, name, settings, terms):
    torch.manual_seed(0)
    model = vaelab.build_model(model=name, arch="mlp", latent_dim=4, hidden=(32,),
                               input_shape=digits.train.sample_shape, **settings)
    history = vaelab.fit(model, digits.train, digits.test, epochs=1, batch_size=128, progress=False,
                         out=tmp_path / "run")
    row = history[0]
    for term in (*terms, "loss", "kl", "elbo"):
        assert math.isfinite(row[f"train_{term}"]) and math.isfinite(row[f"val_{term}"]), term
    again = vaelab.from_pretrained(tmp_path / "run")
    assert type(again) is type(model) and again.settings == model.settings


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), *filter(None, [os.environ.get("PYTHONPATH")])])
    return env


def _vaelab(*args, cwd) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, "-m", "vaelab", *args], cwd=cwd, env=_env(), capture_output=True,
                          text=True, timeout=300)
    assert done.returncode == 0, f"vaelab {' '.join(args)}: exit {done.returncode}\n{done.stdout[-2000:]}\n" \
                                 f"{done.stderr[-4000:]}"
    return done


def test_cli_trains_and_evaluates_a_btcvae(tmp_path):
    """`vaelab train --model btcvae` takes the model's own flags, saves them, and `vaelab evaluate` reports the
    decomposed terms of the run."""
    _vaelab("train", "--model", "btcvae", "--dataset", "digits", "--epochs", "1", "--beta", "4", "--estimator",
            "mss", "--no-progress", "--no-pictures", "--out", "run", cwd=tmp_path)
    run = tmp_path / "run"
    config = json.loads((run / "config.json").read_text())
    assert config["model"]["model"] == "btcvae"
    assert config["model"]["settings"] == {"alpha": 1.0, "beta": 4.0, "gamma": 1.0, "estimator": "mss"}
    first = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert {"train_mi", "train_tc", "train_dw_kl", "val_tc"} <= set(first)
    _vaelab("evaluate", "run", cwd=tmp_path)
    report = json.loads((run / "evaluation.json").read_text())
    assert all(math.isfinite(report[k]) for k in ("loss", "mi", "tc", "dw_kl", "kl", "elbo"))
