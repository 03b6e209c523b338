"""The likelihoods of losses.py against closed forms and the laws a distribution keeps: the 256 bins of a
discretized likelihood hold all the mass, the continuous Bernoulli's density integrates to 1, each mean is the
distribution's mean, gradients stay finite at the edges and at extreme scales; every registered model trains with
each likelihood, and `evaluate` reports bits/dim as nll / (D ln 2) (+ ln 256 per dim for a density of 8-bit data)."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import mpmath
import numpy as np
import pytest
import torch
from scipy import integrate

from vaelab.config import ModelConfig, TrainConfig
from vaelab.data import ArrayDataset, split
from vaelab.errors import ConfigError, DataError
from vaelab.evaluation import evaluate
from vaelab.evaluation.metrics import ssim
from vaelab.losses import (LIKELIHOOD_KINDS, ContinuousBernoulli, DiscretizedLogistic, continuous_bernoulli_log_norm,
                           continuous_bernoulli_mean, discretized_gaussian_log_prob, discretized_logistic_log_prob,
                           make_likelihood)
from vaelab.models import MODELS, build_model
from vaelab.training import fit

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("VAELAB_TEST_DATA") or REPO.parent / "shared" / "data")
LEVELS = torch.arange(256, dtype=torch.float64) / 255  # every 8-bit pixel value on [0, 1]
MEANS = [-3.0, -0.2, 0.0, 1 / 255, 0.37, 0.5, 1.0, 1.2, 4.0]
LOG_SCALES = [-40.0, -9.0, -6.0, -3.0, -1.0, 0.0, 2.0, 9.0, 40.0]  # beyond the clamp [-9, 9] too
NEW = ["continuous-bernoulli", "discretized-gaussian", "discretized-logistic"]


def _grid(dtype):
    m, s = torch.meshgrid(torch.tensor(MEANS, dtype=dtype), torch.tensor(LOG_SCALES, dtype=dtype), indexing="ij")
    return m.reshape(-1), s.reshape(-1)  # (P,) parameter pairs


def _all_bins(log_prob, mean, log_scale):
    """log P(k) for every bin k and parameter pair: (P, 256)."""
    x = LEVELS.to(mean.dtype)[None, :].expand(len(mean), -1)
    return log_prob(x, mean[:, None].expand_as(x), log_scale[:, None].expand_as(x))


# ------------------------------------------------------------------------------------- the discretized ones


@pytest.mark.parametrize("log_prob", [discretized_gaussian_log_prob, discretized_logistic_log_prob],
                         ids=["gaussian", "logistic"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
def test_bins_sum_to_one(log_prob, dtype):
    mean, log_scale = _grid(dtype)
    total = _all_bins(log_prob, mean, log_scale).double().exp().sum(1)
    assert torch.allclose(total, torch.ones_like(total), atol=1e-5, rtol=0), total


def test_mixture_bins_sum_to_one():
    g = torch.Generator().manual_seed(0)
    lik = DiscretizedLogistic(mixtures=4)
    raw = torch.randn(6, 12, 1, 1, generator=g) * 3  # (B, 3K*C, 1, 1): logits, means, log-scales, C = 1
    raw[:, 4:8] = raw[:, 4:8] * 0.5 + 0.5  # means around the data
    raw[0, 8:] = -30.0  # extreme scales: as narrow and
    raw[1, 8:] = 30.0  # as wide as the clamp allows
    x = LEVELS.float().view(256, 1, 1, 1)
    total = torch.stack([lik.log_prob(x, r.expand(256, -1, -1, -1)).exp().double().sum() for r in raw])
    assert torch.allclose(total, torch.ones(6, dtype=torch.float64), atol=1e-5, rtol=0)


def _normal_cdf(t):
    return mpmath.erfc(-t / mpmath.sqrt(2)) / 2


def _logistic_cdf(t):
    return 1 / (1 + mpmath.exp(-t))


@pytest.mark.parametrize("log_prob, cdf", [(discretized_gaussian_log_prob, _normal_cdf),
                                           (discretized_logistic_log_prob, _logistic_cdf)],
                         ids=["gaussian", "logistic"])
def test_bins_are_cdf_differences(log_prob, cdf):
    """Against the CDF differences in 50-digit arithmetic, the tails included: bin 0 is F(1/510), bin 255 is
    1 - F(1 - 1/510), bin k the difference over [k - 1/2, k + 1/2] / 255."""
    mpmath.mp.dps = 50
    mean, log_scale = _grid(torch.float64)
    keep = (log_scale > -9) & (log_scale < 9)  # inside the clamp: the exact distribution
    mean, log_scale = mean[keep], log_scale[keep]
    got = _all_bins(log_prob, mean, log_scale)
    for i, (m, s) in enumerate(zip(mean.tolist(), log_scale.tolist())):
        scale = mpmath.exp(mpmath.mpf(s))
        for k in (0, 1, 7, 64, 128, 200, 254, 255):
            lo = -mpmath.inf if k == 0 else (mpmath.mpf(k) - 0.5) / 255
            hi = mpmath.inf if k == 255 else (mpmath.mpf(k) + 0.5) / 255
            # P = F(hi) - F(lo) = S(lo) - S(hi) with S(t) = F(-t): the side without cancellation
            a, b = (lo - m) / scale, (hi - m) / scale
            if k < 255 and (k == 0 or a + b < 0):
                p = cdf(b) - (cdf(a) if k else 0)
            else:
                p = cdf(-a) - (cdf(-b) if k < 255 else 0)
            want = float(mpmath.log(p))
            assert got[i, k].item() == pytest.approx(want, rel=1e-6, abs=1e-6), (m, s, k)


def test_discretized_gaussian_matches_torch_distributions():
    g = torch.Generator().manual_seed(1)
    mean = torch.rand(500, generator=g, dtype=torch.float64) * 1.4 - 0.2
    log_scale = torch.rand(500, generator=g, dtype=torch.float64) * 5 - 5
    x = torch.randint(0, 256, (500,), generator=g).double() / 255
    normal = torch.distributions.Normal(mean, log_scale.exp())
    lo = torch.where(x < 1e-9, torch.zeros_like(x), normal.cdf(x - 0.5 / 255))
    hi = torch.where(x > 1 - 1e-9, torch.ones_like(x), normal.cdf(x + 0.5 / 255))
    p = hi - lo
    ok = p > 1e-6  # where the plain difference still has digits to compare
    got = discretized_gaussian_log_prob(x, mean, log_scale).exp()
    assert ok.sum() > 200
    assert torch.allclose(got[ok], p[ok], rtol=1e-7, atol=0)


def test_logistic_mixture_of_one_is_the_closed_form():
    """K = 1: the mixture is one logistic; its bins are sigmoid differences, sigmoid((x +- 1/510 - mu) / s)."""
    g = torch.Generator().manual_seed(2)
    mean = torch.rand(2, 1, 4, 4, generator=g, dtype=torch.float64)
    log_scale = torch.rand(2, 1, 4, 4, generator=g, dtype=torch.float64) * 3 - 4  # no bin underflows
    raw = torch.cat([torch.randn(2, 1, 4, 4, generator=g, dtype=torch.float64), mean, log_scale], 1)
    x = torch.randint(0, 256, (2, 1, 4, 4), generator=g).double() / 255
    s = log_scale.exp()
    up = torch.where(x > 1 - 1e-9, torch.ones_like(x), torch.sigmoid((x + 0.5 / 255 - mean) / s))
    down = torch.where(x < 1e-9, torch.zeros_like(x), torch.sigmoid((x - 0.5 / 255 - mean) / s))
    want = torch.log(up - down).flatten(1).sum(1)
    got = -DiscretizedLogistic(mixtures=1).nll(x, raw)
    assert torch.allclose(got, want, rtol=1e-10, atol=1e-9)


@pytest.mark.parametrize("name", ["discretized-gaussian", "discretized-logistic"])
def test_gradients_finite_at_the_edges_and_extreme_scales(name):
    lik = make_likelihood(name, mixtures=2)
    p = lik.params_per_channel
    mean, log_scale = _grid(torch.float32)
    n = len(mean)
    for k in (0, 255, 1, 254):
        x = torch.full((n, 1), k / 255)
        if name == "discretized-gaussian":
            raw = torch.stack([mean, log_scale], 1)
        else:  # two components with the same parameters, logits 0 and 3
            raw = torch.stack([torch.zeros(n), torch.full((n,), 3.0), mean, mean, log_scale, log_scale], 1)
        raw = raw.view(n, p).requires_grad_(True)
        nll = lik.nll(x, raw)
        nll.sum().backward()
        assert torch.isfinite(nll).all() and torch.isfinite(raw.grad).all(), (k, nll, raw.grad)


# ---------------------------------------------------------------------------------- continuous Bernoulli

LAMBDAS = [1e-4, 0.3, 0.5, 0.5 - 1e-6, 0.5 + 1e-6, 0.9999]


def _logit(lam: float) -> torch.Tensor:
    return torch.tensor(math.log(lam) - math.log1p(-lam), dtype=torch.float64)


@pytest.mark.parametrize("lam", LAMBDAS)
def test_continuous_bernoulli_integrates_to_one(lam):
    lik, raw = ContinuousBernoulli(), _logit(lam).view(1, 1)

    def density(x):
        return float(lik.log_prob(torch.tensor([[x]], dtype=torch.float64), raw).exp())

    total, err = integrate.quad(density, 0, 1, epsabs=1e-12, epsrel=1e-12)
    assert total == pytest.approx(1.0, abs=1e-9)
    mean, _ = integrate.quad(lambda x: x * density(x), 0, 1, epsabs=1e-12, epsrel=1e-12)
    assert float(continuous_bernoulli_mean(raw)) == pytest.approx(mean, abs=1e-9)


@pytest.mark.parametrize("lam", [1e-6, 0.01, 0.2, 0.4, 0.45, 0.49, 0.51, 0.7, 0.999])
def test_continuous_bernoulli_normaliser_is_the_closed_form(lam):
    closed = math.log(2 * math.atanh(1 - 2 * lam) / (1 - 2 * lam))
    assert float(continuous_bernoulli_log_norm(_logit(lam))) == pytest.approx(closed, rel=1e-12, abs=1e-12)
    # float32 keeps it near lambda = 1/2, where the closed form is 0/0 (the Taylor series' side of the switch too)
    assert float(continuous_bernoulli_log_norm(_logit(lam).float())) == pytest.approx(closed, abs=2e-6)


def test_continuous_bernoulli_at_one_half_and_its_gradients():
    l = torch.tensor([-80.0, -1.0, -1e-3, -1e-7, 0.0, 1e-7, 1e-3, 1.0, 80.0], requires_grad=True)
    log_c = continuous_bernoulli_log_norm(l)
    assert float(log_c[4].detach()) == pytest.approx(math.log(2), abs=1e-7)  # C(1/2) = 2
    lik = ContinuousBernoulli()
    x = torch.tensor([0.0, 1.0, 0.5, 0.0, 1.0, 0.3, 0.0, 1.0, 0.0])
    (lik.nll(x[None], l[None]).sum() + lik.mean(l).sum()).backward()
    assert torch.isfinite(l.grad).all()


# ----------------------------------------------------------------------------------------- every likelihood


@pytest.mark.parametrize("name", sorted(LIKELIHOOD_KINDS))
def test_means_and_samples(name):
    """mean(raw) is the distribution's mean (the closed forms; for a discretized one the censored mean, within half a
    level of the 8-bit mean, the sum over the 256 bins); samples average to the mean, and a discretized one samples
    8-bit values."""
    g = torch.Generator().manual_seed(3)
    lik = make_likelihood(name, sigma=0.3, mixtures=3)
    p = lik.params_per_channel
    raw = torch.randn(1, p * 6, generator=g)  # 6 dimensions
    if lik.discrete:  # means inside the data's range, scales from a quarter of a level to the whole range
        params = raw.view(1, p, 6)
        n = p // 2 if name == "discretized-gaussian" else p // 3  # means (and log-scales) per dimension
        first = 0 if name == "discretized-gaussian" else n  # the logistic mixture's logits come first
        params[:, first:first + n] = torch.rand(1, n, 6, generator=g) * 1.2 - 0.1
        params[:, p - n:] = torch.rand(1, n, 6, generator=g) * 7 - 7
        raw = params.reshape(1, p * 6)
        x = LEVELS.float().view(256, 1)
        probs = torch.stack([lik.log_prob(x, params[:, :, j].expand(256, -1)).exp()[:, 0] for j in range(6)], 1)
        want = (probs * LEVELS.float()[:, None]).sum(0)  # sum_k k/255 P(k), (6,)
        assert torch.allclose(probs.sum(0), torch.ones(6), atol=1e-5)
    else:
        want = {"bernoulli": torch.sigmoid(raw[0]), "gaussian": raw[0], "gaussian-learned": raw[0, :6],
                "continuous-bernoulli": continuous_bernoulli_mean(raw[0])}[name]
    mean = lik.mean(raw)
    assert mean.shape == (1, 6)
    assert torch.allclose(mean[0], want, atol=0.5 / 255 if lik.discrete else 2e-6)
    draws = lik.sample(raw.expand(40000, -1), generator=g)
    assert draws.shape == (40000, 6)
    se = draws.std(0) / math.sqrt(len(draws))
    assert ((draws.mean(0) - want).abs() < 5 * se + 1e-6).all(), (draws.mean(0), want, se)
    if lik.discrete:
        k = draws * 255
        assert torch.equal(k, k.round()) and draws.min() >= 0 and draws.max() <= 1


def test_the_learned_gaussian_is_the_normal_density_with_its_own_scale_per_dimension():
    """raw holds the means, then the log standard deviations (clamped to [-9, 9]); the NLL sums the dimensions."""
    g = torch.Generator().manual_seed(5)
    lik = make_likelihood("gaussian-learned")
    mean, log_scale = torch.randn(3, 4, generator=g, dtype=torch.float64), torch.randn(3, 4, generator=g,
                                                                                     dtype=torch.float64)
    log_scale[0, 0] = 12.0  # past the clamp: scored as 9
    x = torch.randn(3, 4, generator=g, dtype=torch.float64) * 3
    raw = torch.cat([mean, log_scale], 1)
    want = torch.distributions.Normal(mean, log_scale.clamp(-9, 9).exp()).log_prob(x)
    assert torch.allclose(lik.log_prob(x, raw), want, rtol=0, atol=1e-12)
    assert torch.allclose(lik.nll(x, raw), -want.sum(1), rtol=0, atol=1e-12)
    assert lik.raw_shape((4,)) == (8,) and lik.continuous and not lik.discrete


@pytest.mark.parametrize("name", ["discretized-gaussian", "discretized-logistic"])
def test_discretized_means_are_the_censored_means(name):
    """The closed forms equal the integral of P(X > t) over [0, 1] (numerical quadrature), and lie within half a
    level of the 8-bit mean, within 2e-5 of it where the scale spans two levels or more."""
    lik = make_likelihood(name, mixtures=1)
    mean, log_scale = _grid(torch.float64)
    keep = (log_scale > -9) & (log_scale < 9)
    mean, log_scale = mean[keep], log_scale[keep]
    raw = (torch.stack([mean, log_scale], 1) if name == "discretized-gaussian" else
           torch.stack([torch.zeros_like(mean), mean, log_scale], 1))
    got = lik.mean(raw)  # (P, 1): one dimension per parameter pair
    logs = _all_bins(discretized_gaussian_log_prob if name == "discretized-gaussian" else
                     discretized_logistic_log_prob, mean, log_scale)
    eight_bit = (logs.exp() * LEVELS).sum(1)
    for i, (m, s) in enumerate(zip(mean.tolist(), log_scale.tolist())):
        scale = math.exp(s)
        if name == "discretized-gaussian":
            def tail(t):
                return 0.5 * math.erfc((t - m) / (scale * math.sqrt(2)))
        else:
            def tail(t):
                return 1 / (1 + math.exp(min((t - m) / scale, 700)))
        want, _ = integrate.quad(tail, 0, 1, points=[min(max(m, 0), 1)], epsabs=1e-13, limit=200)
        assert float(got[i, 0]) == pytest.approx(want, abs=1e-9), (m, s)
        assert abs(float(got[i, 0]) - float(eight_bit[i])) < (2e-5 if scale >= 2 / 255 else 0.5 / 255), (m, s)


def _tiny(name, shape, likelihood, **kw):
    cond = {"condition_dim": 3} if MODELS[name].cls.capabilities.conditional else {}
    return build_model(model=name, input_shape=shape, channels=(4, 8), hidden=(16,), latent_dim=3,
                       likelihood=likelihood, mixtures=2, **cond, **kw)


@pytest.mark.parametrize("likelihood", NEW)
@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_model_takes_every_likelihood(name, likelihood):
    """The decoder emits P values per channel; decode / reconstruct / sample stay in data space; the loss, the
    K-sample loss and a training step are finite."""
    shape = (3, 8, 8)
    model = _tiny(name, shape, likelihood)
    p = model.likelihood.params_per_channel
    x = torch.randint(0, 256, (4, *shape), generator=torch.Generator().manual_seed(0)).float() / 255
    c = torch.arange(4) % 3 if model.capabilities.conditional else None
    out = model(x, c)
    assert out.recon.shape == (4, p * 3, 8, 8)
    terms = model.loss(x, out)
    assert torch.isfinite(terms["loss"]).all()
    terms["loss"].mean().backward()
    assert all(torch.isfinite(q.grad).all() for q in model.parameters() if q.grad is not None)
    recon = model.reconstruct(x, c)
    assert recon.shape == x.shape and recon.min() >= -1e-6 and recon.max() <= 1 + 1e-6
    if model.capabilities.stochastic:
        out = model(x, c, n_samples=3)
        assert out.recon.shape == (3, 4, p * 3, 8, 8)
        assert torch.isfinite(model.loss(x, out)["loss"]).all()
    if model.capabilities.samples:
        assert model.sample(2, condition=torch.tensor([0, 1]) if c is not None else None).shape == (2, *shape)


def test_mixtures_is_validated_and_shapes_the_decoder():
    with pytest.raises(ConfigError, match="mixtures=0 must be a positive integer"):
        ModelConfig(model="vae", mixtures=0).validate()
    with pytest.raises(ConfigError, match="likelihood='logistic' is unknown"):
        ModelConfig(model="vae", likelihood="logistic").validate()
    for k in (1, 4):
        model = build_model(model="vae", input_shape=(3, 8, 8), likelihood="discretized-logistic", mixtures=k,
                            channels=(4,), hidden=(8,), latent_dim=2)
        assert model(torch.zeros(2, 3, 8, 8)).recon.shape == (2, 3 * k * 3, 8, 8)


# ------------------------------------------------------------------------------ training and bits per dim


def _digits_8bit() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    d = load_digits()
    x = np.round(d.images * (255 / 16)).astype(np.uint8)[:, None]  # (N, 1, 8, 8), 17 levels spread over 0..255
    return x, d.target


@pytest.fixture(scope="module")
def digits_8bit():
    x, y = _digits_8bit()
    ds = ArrayDataset(torch.from_numpy(x), torch.from_numpy(y), scale=255.0, name="digits-8bit")
    return split(ds, 0.2, 0, source="digits-8bit")


@pytest.mark.parametrize("likelihood", sorted(LIKELIHOOD_KINDS))
def test_training_lowers_the_loss_and_bits_per_dim(digits_8bit, likelihood):
    torch.manual_seed(0)
    model = build_model(model="vae", input_shape=(1, 8, 8), arch="mlp", hidden=(64,), latent_dim=4,
                        likelihood=likelihood, mixtures=2, gaussian_sigma=0.2)
    history = fit(model, digits_8bit.train, digits_8bit.test,
                  TrainConfig(epochs=2, batch_size=64, lr=3e-3, seed=0, progress=False))
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    report = evaluate(model, digits_8bit.test, nll_samples=8, latent=False)
    d = 64
    offset = d * math.log(256) if make_likelihood(likelihood).continuous else 0.0
    assert report["nll_bits_per_dim"] == pytest.approx((report["nll"] + offset) / (d * math.log(2)), rel=1e-9)
    assert report["elbo_bits_per_dim"] == pytest.approx((-report["elbo"] + offset) / (d * math.log(2)), rel=1e-9)
    assert report["bits_per_dim"] == report["nll_bits_per_dim"]
    assert report["nll"] <= -report["elbo"] + 1e-3  # the K-sample bound is at least as tight as the ELBO
    assert 0 < report["ssim"] <= 1
    if make_likelihood(likelihood).discrete:
        assert report["bits_per_dim_convention"].startswith("exact")
        assert 0 < report["bits_per_dim"] < 8  # a probability of 8-bit pixels: below the uniform 8 bits
    elif make_likelihood(likelihood).continuous:
        assert report["bits_per_dim_convention"].startswith("dequantized")


def test_discretized_likelihood_refuses_data_that_is_not_8_bit():
    from vaelab.data import load_dataset

    data = load_dataset("digits")  # 17 grey levels, k/16: not k/255
    model = build_model(model="vae", input_shape=(1, 8, 8), likelihood="discretized-gaussian", latent_dim=2)
    with pytest.raises(DataError, match="likelihood 'discretized-gaussian' models 8-bit pixels"):
        fit(model, data.train, None, TrainConfig(epochs=1, progress=False))


def test_cli_likelihood_and_mixtures_reach_the_model(tmp_path, digits_8bit):
    x, y = _digits_8bit()
    np.save(tmp_path / "digits8.npy", x)
    run = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    vaelab = [sys.executable, "-m", "vaelab"]
    train = subprocess.run([*vaelab, "train", "--dataset", str(tmp_path / "digits8.npy"), "--model", "vae",
                            "--arch", "mlp", "--hidden", "32", "--latent-dim", "2",
                            "--likelihood", "discretized-logistic", "--mixtures", "3", "--epochs", "1",
                            "--no-pictures", "--out", str(run)], capture_output=True, text=True, env=env)
    assert train.returncode == 0, train.stderr
    config = json.loads((run / "config.json").read_text())["model"]
    assert (config["likelihood"], config["mixtures"]) == ("discretized-logistic", 3)
    ev = subprocess.run([*vaelab, "evaluate", str(run), "--nll-samples", "4"], capture_output=True, text=True,
                        env=env)
    assert ev.returncode == 0, ev.stderr
    report = json.loads((run / "evaluation.json").read_text())
    assert report["bits_per_dim"] == pytest.approx(report["nll"] / (64 * math.log(2)), rel=1e-9)
    assert "bits/dim: exact: -log2 P(8-bit pixels) per sub-pixel" in ev.stdout
    assert "ssim" in ev.stdout
    # digits as shipped (17 grey levels) are refused by a discretized likelihood, with the way out
    bad = subprocess.run([*vaelab, "train", "--likelihood", "discretized-gaussian", "--epochs", "1",
                          "--no-pictures", "--out", str(tmp_path / "bad")], capture_output=True, text=True, env=env)
    assert bad.returncode != 0 and "Traceback" not in bad.stderr
    assert "models 8-bit pixels" in bad.stderr and "continuous-bernoulli" in bad.stderr


# ---------------------------------------------------------------------------------------------------- SSIM


def _images(folder: Path, n: int) -> np.ndarray:
    from PIL import Image

    files = sorted(folder.rglob("*.png"))[:n]
    out = []
    for f in files:
        img = Image.open(f).convert("RGBA")
        white = Image.new("RGBA", img.size, (255, 255, 255, 255))
        out.append(np.asarray(Image.alpha_composite(white, img).convert("RGB"), dtype=np.float64) / 255)
    return np.stack(out).transpose(0, 3, 1, 2)  # (N, 3, H, W)


def _mnist(n: int) -> np.ndarray:
    from vaelab.data import load_dataset

    try:
        data = load_dataset("mnist", DATA, download=False)
    except Exception as e:  # noqa: BLE001 - the files are absent on this machine
        pytest.skip(f"real MNIST is absent from {DATA} ({e}); set VAELAB_TEST_DATA")
    return data.test.batch(torch.arange(n)).double().numpy()


def _check_against_skimage(x: np.ndarray, y: np.ndarray) -> None:
    from skimage.metrics import structural_similarity

    got = ssim(torch.from_numpy(x), torch.from_numpy(y)).numpy()
    want = [structural_similarity(a, b, gaussian_weights=True, sigma=1.5, use_sample_covariance=False,
                                  data_range=1.0, channel_axis=0) for a, b in zip(x, y)]
    assert np.allclose(got, want, atol=1e-5, rtol=0), (got, want)
    assert len(set(np.round(want, 3))) > 1  # the pairs differ: the check is not of one constant


def test_ssim_matches_scikit_image_on_mnist():
    x = _mnist(12)
    rng = np.random.default_rng(0)
    noisy = np.clip(x + rng.normal(0, 0.1, x.shape), 0, 1)
    _check_against_skimage(x[:6], noisy[:6])
    _check_against_skimage(x[:6], x[6:12])  # different digits
    assert np.allclose(ssim(torch.from_numpy(x), torch.from_numpy(x)).numpy(), 1.0)


def test_ssim_matches_scikit_image_on_colour_emoji():
    folder = DATA / "emoji" / "test"
    if not folder.is_dir():
        pytest.skip(f"the emoji images are absent from {folder}; set VAELAB_TEST_DATA")
    x = _images(folder, 8)
    blurred = (x + np.roll(x, 1, axis=2) + np.roll(x, 1, axis=3)) / 3
    _check_against_skimage(x[:4], blurred[:4])
    _check_against_skimage(x[:4], x[4:8])
