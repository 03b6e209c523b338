"""The formulas every model's loss is built from, each written once: likelihoods, the Gaussian KL and
log-density, importance weights and the IWAE bound; and `Shaping`, what the training loop adds to a loss.

A model's own loss lives in its own file (vaelab/models/): a pure function of (batch, model output, weights)
that returns a dict of per-sample tensors of shape (B,); the key "loss" is the objective that training
minimises (the loop takes its batch mean). Reconstruction terms are negative log-likelihoods in nats summed
over the dimensions of one sample, so "loss" of a VAE is the negative ELBO per image (the tutorial's 784*BCE +
KL on MNIST). "bce" and "mse" are per-pixel means for comparison with Keras.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, ClassVar

import torch
import torch.nn.functional as F

LOG_2PI = math.log(2 * math.pi)


def flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1)  # (B, D)


def bernoulli_nll(x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """-log p(x | logits) summed over dims, (B,). x may be any value in [0, 1] (the usual BCE)."""
    return flat(F.binary_cross_entropy_with_logits(logits, x, reduction="none")).sum(1)


def gaussian_nll(x: torch.Tensor, mean: torch.Tensor, sigma: float) -> torch.Tensor:
    """-log N(x | mean, sigma^2 I) summed over dims, (B,)."""
    d = x[0].numel()
    sq = flat((x - mean) ** 2).sum(1)
    return 0.5 * sq / sigma**2 + d * (math.log(sigma) + 0.5 * LOG_2PI)


# ------------------------------------------------------------------------------------------- likelihoods
#
# A likelihood p(x | raw) turns the decoder's raw output into a distribution over the data. The decoder emits
# `params_per_channel` values per data channel, parameter-major: (B, P*C, H, W) for images, (B, P*D) for vectors,
# read as (B, P, C, H, W) / (B, P, D). Bernoulli, Gaussian and continuous Bernoulli take one (P = 1: raw is
# shaped like x); the discretized Gaussian two (mean, log-scale); the logistic mixture 3K (K mixture logits, K
# means, K log-scales).

PIXEL_LEVELS = 256  # 8-bit data: x = k / 255, k = 0 .. 255
_HALF_BIN = 0.5 / (PIXEL_LEVELS - 1)  # half the width of one 8-bit bin on [0, 1]
# bounds of a discretized likelihood's log-scale on [0, 1]: exp(-9) is 1/30 of a bin (one bin then holds all
# the mass, so the bound costs no likelihood), exp(9) is 8,000 times the data's range (flat); beyond them exp()
# of the log-scale and the bin edges' arguments would overflow to inf/0 and the gradients to NaN
LOG_SCALE_MIN, LOG_SCALE_MAX = -9.0, 9.0


def _log1mexp(d: torch.Tensor) -> torch.Tensor:
    """log(1 - exp(d)) for d < 0, accurate for every d (Maechler 2012: expm1 near 0, log1p far from it)."""
    return torch.where(d > -math.log(2), torch.log(-torch.expm1(d)), torch.log1p(-torch.exp(d)))


def _bin_edges(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(is the lowest bin, is the highest bin) of x = k/255: their bins take the tails below 0 and above 1."""
    return x < _HALF_BIN, x > 1 - _HALF_BIN


def discretized_logistic_log_prob(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """log P(bin of x) of a logistic(mean, exp(log_scale)) discretized to the 256 bins of [0, 1] (x = k/255),
    elementwise. Bin k covers [x - 1/510, x + 1/510]; bin 0 takes (-inf, 1/510], bin 255 [1 - 1/510, inf)
    (Salimans et al. 2017, PixelCNN++ eq. 2).

    The interior bins use the identity sigmoid(b) - sigmoid(a) = sigmoid(b) sigmoid(-a) (1 - exp(a - b)), so
    log P = logsigmoid(b) + logsigmoid(-a) + log(-expm1(a - b)): every term is exact in floating point, at any
    distance from the mean and any scale. (PixelCNN++ subtracts the two CDFs and falls back to the mid-bin
    density where the difference underflows; the identity needs no fallback.)"""
    log_scale = log_scale.clamp(LOG_SCALE_MIN, LOG_SCALE_MAX)
    inv = torch.exp(-log_scale)
    a = (x - _HALF_BIN - mean) * inv  # the bin's lower edge, standardized
    b = (x + _HALF_BIN - mean) * inv
    interior = F.logsigmoid(b) + F.logsigmoid(-a) + torch.log(-torch.expm1(-2 * _HALF_BIN * inv))
    low, high = _bin_edges(x)
    return torch.where(low, F.logsigmoid(b), torch.where(high, F.logsigmoid(-a), interior))


def discretized_gaussian_log_prob(x: torch.Tensor, mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """log P(bin of x) of N(mean, exp(log_scale)^2) discretized to the 256 bins of [0, 1] (x = k/255), elementwise;
    bins as discretized_logistic_log_prob's (the lowest and highest take the tails).

    Interior bins: Phi(b) - Phi(a) is taken on the side of the mean's tail that keeps it accurate (Phi(-a) -
    Phi(-b) above the mean), as log Phi(hi) + log(1 - exp(log Phi(lo) - log Phi(hi))) with log_ndtr, exact far in
    the tails. Where the bin holds a tiny fraction of the CDF (a wide Gaussian: the two logs nearly equal), the
    mid-bin density times the bin width takes over, accurate to O(width^2) there (PixelCNN++'s fallback)."""
    log_scale = log_scale.clamp(LOG_SCALE_MIN, LOG_SCALE_MAX)
    inv = torch.exp(-log_scale)
    a = (x - _HALF_BIN - mean) * inv
    b = (x + _HALF_BIN - mean) * inv
    above = (a + b) > 0  # the bin lies above the mean: use the upper tail
    hi = torch.where(above, -a, b)
    lo = torch.where(above, -b, a)
    log_hi = torch.special.log_ndtr(hi)
    d = torch.special.log_ndtr(lo) - log_hi  # < 0
    exact = log_hi + _log1mexp(d.clamp(max=-1e-3))
    mid = (x - mean) * inv
    midbin = -0.5 * (LOG_2PI + mid**2) + torch.log(2 * _HALF_BIN * inv)
    interior = torch.where(d < -1e-3, exact, midbin)
    low, high = _bin_edges(x)
    return torch.where(low, torch.special.log_ndtr(b), torch.where(high, torch.special.log_ndtr(-a), interior))


def censored_logistic_mean(mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """E[clip(X, 0, 1)] of X ~ logistic(mean, exp(log_scale)): the integral of P(X > t) over [0, 1],
    s (softplus(mean/s) - softplus((mean - 1)/s)), elementwise."""
    s = torch.exp(log_scale.clamp(LOG_SCALE_MIN, LOG_SCALE_MAX))
    return s * (F.softplus(mean / s) - F.softplus((mean - 1) / s))


def censored_gaussian_mean(mean: torch.Tensor, log_scale: torch.Tensor) -> torch.Tensor:
    """E[clip(X, 0, 1)] of X ~ N(mean, exp(log_scale)^2): sigma (g(mean/sigma) - g((mean - 1)/sigma)) with
    g(z) = z Phi(z) + phi(z), the integral of Phi; elementwise."""
    sigma = torch.exp(log_scale.clamp(LOG_SCALE_MIN, LOG_SCALE_MAX))

    def g(z):
        return z * torch.special.ndtr(z) + torch.exp(-0.5 * z * z - 0.5 * LOG_2PI)

    return sigma * (g(mean / sigma) - g((mean - 1) / sigma))


def _quantize(x: torch.Tensor) -> torch.Tensor:
    return torch.round(x.clamp(0, 1) * (PIXEL_LEVELS - 1)) / (PIXEL_LEVELS - 1)


def _series_radius(u: torch.Tensor) -> float:
    # below it the continuous Bernoulli's Taylor series replace the closed forms: in float32 up to |u| = 1/2
    # (the series' next terms < 4e-8, the closed forms' cancellation 1e-6 at |u| = 0.05); in float64 the closed
    # forms are accurate to 1e-13 down to |u| = 0.01, where the series are exact to 1e-20
    return 0.01 if u.dtype == torch.float64 else 0.5


def continuous_bernoulli_log_norm(logits: torch.Tensor) -> torch.Tensor:
    """log C(lambda) of the continuous Bernoulli with lambda = sigmoid(logits) (Loaiza-Ganem & Cunningham 2019):
    C = 2 artanh(1 - 2 lambda) / (1 - 2 lambda), which in logits l is l / tanh(l/2) = 2 u coth u (u = l/2). Near
    lambda = 1/2 (|u| < 1/2) its Taylor series log1p(u^2/3 - u^4/45 + 2u^6/945 - u^8/4725) (next term < 3e-8)
    replaces the 0/0; elsewhere log|l| - log tanh|u| is accurate. (In float64 the series takes |u| < 0.01 only,
    where it is exact to 1e-20.)"""
    u = 0.5 * logits
    small = u.abs() < _series_radius(u)
    u2 = torch.where(small, u, torch.zeros_like(u)) ** 2
    series = torch.log1p(u2 * (1 / 3 + u2 * (-1 / 45 + u2 * (2 / 945 - u2 / 4725))))
    big = torch.where(small, torch.ones_like(u), u.abs())
    direct = torch.log(2 * big) - torch.log(torch.tanh(big))
    return math.log(2) + torch.where(small, series, direct - math.log(2))


def continuous_bernoulli_mean(logits: torch.Tensor) -> torch.Tensor:
    """E[x] of the continuous Bernoulli: lambda/(2 lambda - 1) + 1/(2 artanh(1 - 2 lambda)) = 1/2 + L(u)/2 with
    u = l/2 and L(u) = coth u - 1/u (Langevin's function; its series u/3 - u^3/45 + 2u^5/945 - u^7/4725 near 0,
    where coth u - 1/u cancels)."""
    u = 0.5 * logits
    small = u.abs() < _series_radius(u)
    us = torch.where(small, u, torch.zeros_like(u))
    u2 = us**2
    series = us * (1 / 3 + u2 * (-1 / 45 + u2 * (2 / 945 - u2 / 4725)))
    ub = torch.where(small, torch.ones_like(u), u)
    direct = 1 / torch.tanh(ub) - 1 / ub
    return 0.5 + 0.5 * torch.where(small, series, direct)


class Likelihood:
    """p(x | raw): what the decoder's raw output means. One object per kind, built from a ModelConfig by
    `likelihood_of`; losses, reconstructions, samples and bits/dim all ask it.

    params_per_channel: decoder outputs per data channel (P). discrete: the data must be 8-bit (x = k/255) and
    the NLL is that of the integer pixels (bits/dim exact). continuous: a density of x (on [0, 1] or the reals),
    not a probability: its bits/dim on 8-bit data takes the log 256 per dim of the dequantized convention."""

    name: ClassVar[str]
    params_per_channel: ClassVar[int] = 1
    discrete: ClassVar[bool] = False
    continuous: ClassVar[bool] = True
    mean_meaning: str = "the likelihood's mean"  # what `mean` returns, in words (export.json says it)

    def raw_shape(self, shape: tuple[int, ...]) -> tuple[int, ...]:
        """The decoder's raw output per sample for data of `shape` (C, H, W) or (D,)."""
        return (self.params_per_channel * shape[0], *shape[1:])

    def params(self, raw: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """The P parameter tensors of raw (B, P*C, ...), each (B, C, ...)."""
        # contiguous first: a conv decoder's channels-last output would make each parameter a strided view, which
        # the elementwise ops below walk several times slower
        return tuple(raw.contiguous().unflatten(1, (self.params_per_channel, -1)).unbind(1))

    def log_prob(self, x: torch.Tensor, raw: torch.Tensor) -> torch.Tensor:
        """log p(x_i | raw) of every dimension, shaped like x."""
        raise NotImplementedError

    def nll(self, x: torch.Tensor, raw: torch.Tensor) -> torch.Tensor:
        """-log p(x | raw) summed over the dims of a sample, nats, (B,)."""
        return -flat(self.log_prob(x, raw)).sum(1)

    def mean(self, raw: torch.Tensor) -> torch.Tensor:
        """E[x | raw], in data space, shaped like x: the reconstruction. A discretized likelihood gives the mean of
        its continuous distribution censored to [0, 1], E[clip(X, 0, 1)], in closed form: the 8-bit variable is
        that one rounded to the nearest level, so the two means differ by less than half a level (1/510), and
        by less than 2e-5 where the scale spans two levels or more (the rounding errors cancel); summing the 256
        levels would cost 255 CDF evaluations per sub-pixel and component."""
        raise NotImplementedError

    def sample(self, raw: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """One draw x ~ p(x | raw), shaped like x."""
        raise NotImplementedError

    def bce(self, x: torch.Tensor, raw: torch.Tensor, mean: torch.Tensor | None = None) -> torch.Tensor:
        """Per-pixel mean binary cross-entropy of the mean (a number comparable across likelihoods), (B,); `mean`:
        self.mean(raw) when the caller has it already."""
        p = (self.mean(raw) if mean is None else mean).clamp(1e-7, 1 - 1e-7)
        return flat(F.binary_cross_entropy(p, x.clamp(0, 1), reduction="none")).mean(1)

    def data_problems(self, x: torch.Tensor, what: str = "the data") -> list[str]:
        """Why this likelihood cannot model the values of x (empty when it can)."""
        return []

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"


class Bernoulli(Likelihood):
    """Independent Bernoulli per dimension, raw = logits: the binary cross-entropy (x may be grey, in [0, 1]:
    then not a normalized likelihood of x)."""

    name = "bernoulli"
    continuous = False
    mean_meaning = "pixel probabilities in [0, 1] (the sigmoid of the Bernoulli decoder's logits)"

    def log_prob(self, x, raw):
        return -F.binary_cross_entropy_with_logits(raw, x, reduction="none")

    def nll(self, x, raw):
        return bernoulli_nll(x, raw)

    def mean(self, raw):
        return torch.sigmoid(raw)

    def sample(self, raw, generator=None):
        return torch.bernoulli(torch.sigmoid(raw), generator=generator)

    def bce(self, x, raw, mean=None):
        return flat(F.binary_cross_entropy_with_logits(raw, x, reduction="none")).mean(1)  # from the logits


class Gaussian(Likelihood):
    """N(x | raw, sigma^2 I) with a fixed sigma: raw is the mean (squared error)."""

    name = "gaussian"

    def __init__(self, sigma: float = 1.0):
        self.sigma = float(sigma)
        self.mean_meaning = f"the mean of the Gaussian likelihood (its standard deviation is {self.sigma:g})"

    def log_prob(self, x, raw):
        return -0.5 * ((x - raw) / self.sigma) ** 2 - (math.log(self.sigma) + 0.5 * LOG_2PI)

    def nll(self, x, raw):
        return gaussian_nll(x, raw, self.sigma)

    def mean(self, raw):
        return raw

    def sample(self, raw, generator=None):
        return raw + self.sigma * torch.randn(raw.shape, generator=generator, dtype=raw.dtype, device=raw.device)

    def __repr__(self):
        return f"Gaussian(sigma={self.sigma:g})"


class LearnedGaussian(Likelihood):
    """N(x | mean, exp(log_scale)^2) per dimension with a learned mean and log-scale: a density on the reals (the
    likelihood of real-valued data, such as M1+M2's codes z1). The log-scale is clamped to [-9, 9], as the
    discretized likelihoods'."""

    name = "gaussian-learned"
    mean_meaning = "the mean of the Gaussian likelihood (its standard deviation is learned per dimension)"
    params_per_channel = 2

    def log_prob(self, x, raw):
        mean, log_scale = self.params(raw)
        return log_normal_elementwise(x, mean, 2 * log_scale.clamp(LOG_SCALE_MIN, LOG_SCALE_MAX))

    def mean(self, raw):
        return self.params(raw)[0]

    def sample(self, raw, generator=None):
        mean, log_scale = self.params(raw)
        eps = torch.randn(mean.shape, generator=generator, dtype=mean.dtype, device=mean.device)
        return mean + torch.exp(log_scale.clamp(LOG_SCALE_MIN, LOG_SCALE_MAX)) * eps


def _unit_problems(x: torch.Tensor, name: str, what: str) -> list[str]:
    lo, hi = (float(x.min()), float(x.max())) if x.numel() else (0.0, 0.0)
    if lo < 0 or hi > 1:
        return [f"likelihood {name!r} models data in [0, 1], but {what} spans [{lo:g}, {hi:g}]; use "
                "likelihood 'gaussian' for unbounded data"]
    return []


class ContinuousBernoulli(Likelihood):
    """The continuous Bernoulli (Loaiza-Ganem & Cunningham 2019): p(x | lambda) = C(lambda) lambda^x
    (1 - lambda)^(1 - x) on [0, 1], raw = logit(lambda). A proper density for grey pixels, unlike the BCE."""

    name = "continuous-bernoulli"
    mean_meaning = "the mean of the continuous Bernoulli, in [0, 1] (not its parameter lambda)"

    def log_prob(self, x, raw):
        return -F.binary_cross_entropy_with_logits(raw, x, reduction="none") + continuous_bernoulli_log_norm(raw)

    def mean(self, raw):
        return continuous_bernoulli_mean(raw)

    def sample(self, raw, generator=None):
        # inverse CDF: F(x) = (lambda^x (1-lambda)^(1-x) + lambda - 1) / (2 lambda - 1), so with r = lambda/(1-lambda)
        # = e^l: x = log1p(u expm1(l)) / l; taken for l <= 0 (expm1 in (-1, 0]) and mirrored (x -> 1 - x, l -> -l)
        u = torch.rand(raw.shape, generator=generator, dtype=raw.dtype, device=raw.device)
        neg = -raw.abs()
        tiny = neg > -1e-4
        safe = torch.where(tiny, -torch.ones_like(neg), neg)
        x = torch.where(tiny, u, torch.log1p(u * torch.expm1(safe)) / safe)
        return torch.where(raw > 0, 1 - x, x)

    def data_problems(self, x, what="the data"):
        return _unit_problems(x, self.name, what)


def _eight_bit_problems(x: torch.Tensor, name: str, what: str) -> list[str]:
    problems = _unit_problems(x, name, what)
    if problems:
        return problems
    k = x * (PIXEL_LEVELS - 1)
    off = float((k - k.round()).abs().max()) if x.numel() else 0.0
    if off > 1e-3:
        return [f"likelihood {name!r} models 8-bit pixels (x = k/255, k = 0..255), but {what} holds values "
                f"{off:.3g} bins away from them (e.g. digits' 17 grey levels); use 8-bit data (images, uint8 "
                "arrays) or a continuous likelihood (continuous-bernoulli, gaussian)"]
    return []


class DiscretizedGaussian(Likelihood):
    """N(mean, exp(log_scale)^2) per sub-pixel with a learned mean and log-scale, discretized to the 256 bins of
    8-bit data (the tails go to bins 0 and 255): a probability of the integer pixels."""

    name = "discretized-gaussian"
    mean_meaning = "the mean of the Gaussian censored to [0, 1] (within half a pixel level of the 8-bit mean)"
    params_per_channel = 2
    discrete = True
    continuous = False

    def log_prob(self, x, raw):
        mean, log_scale = self.params(raw)
        return discretized_gaussian_log_prob(x, mean, log_scale)

    def mean(self, raw):
        return censored_gaussian_mean(*self.params(raw))

    def sample(self, raw, generator=None):
        mean, log_scale = self.params(raw)
        eps = torch.randn(mean.shape, generator=generator, dtype=mean.dtype, device=mean.device)
        return _quantize(mean + torch.exp(log_scale.clamp(LOG_SCALE_MIN, LOG_SCALE_MAX)) * eps)

    def data_problems(self, x, what="the data"):
        return _eight_bit_problems(x, self.name, what)


class DiscretizedLogistic(Likelihood):
    """A mixture of K logistics per sub-pixel, discretized to the 256 bins of 8-bit data (PixelCNN++, Salimans et
    al. 2017, without its channel coupling: each sub-pixel has its own mixture). raw holds, per data channel, the K
    mixture logits, the K means and the K log-scales."""

    name = "discretized-logistic"
    mean_meaning = ("the mean of the logistic mixture censored to [0, 1] (within half a pixel level of the "
                    "8-bit mean)")
    discrete = True
    continuous = False

    def __init__(self, mixtures: int = 5):
        self.mixtures = int(mixtures)

    @property
    def params_per_channel(self) -> int:  # type: ignore[override]
        return 3 * self.mixtures

    def components(self, raw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(log mixture weights, means, log-scales), each (B, K, C, ...)."""
        p = raw.contiguous().unflatten(1, (3, self.mixtures, -1))  # contiguous: see Likelihood.params
        return torch.log_softmax(p[:, 0], dim=1), p[:, 1], p[:, 2]

    def log_prob(self, x, raw):
        log_w, mean, log_scale = self.components(raw)
        return torch.logsumexp(log_w + discretized_logistic_log_prob(x[:, None], mean, log_scale), dim=1)

    def mean(self, raw):
        log_w, mean, log_scale = self.components(raw)
        return (log_w.exp() * censored_logistic_mean(mean, log_scale)).sum(1)

    def sample(self, raw, generator=None):
        log_w, mean, log_scale = self.components(raw)
        g = -torch.log(-torch.log(torch.rand(log_w.shape, generator=generator, dtype=raw.dtype,
                                             device=raw.device).clamp(1e-12, 1 - 1e-7)))
        pick = F.one_hot((log_w + g).argmax(1), self.mixtures).movedim(-1, 1).to(raw.dtype)  # Gumbel-max
        m = (pick * mean).sum(1)
        s = torch.exp((pick * log_scale.clamp(LOG_SCALE_MIN, LOG_SCALE_MAX)).sum(1))
        u = torch.rand(m.shape, generator=generator, dtype=raw.dtype, device=raw.device).clamp(1e-6, 1 - 1e-6)
        return _quantize(m + s * (torch.log(u) - torch.log1p(-u)))

    def data_problems(self, x, what="the data"):
        return _eight_bit_problems(x, self.name, what)

    def __repr__(self):
        return f"DiscretizedLogistic(mixtures={self.mixtures})"


# name -> how to build it from the ModelConfig fields that configure it (gaussian_sigma, mixtures)
LIKELIHOOD_KINDS: dict[str, Callable[..., Likelihood]] = {
    "bernoulli": lambda sigma, mixtures: Bernoulli(),
    "gaussian": lambda sigma, mixtures: Gaussian(sigma),
    "continuous-bernoulli": lambda sigma, mixtures: ContinuousBernoulli(),
    "discretized-gaussian": lambda sigma, mixtures: DiscretizedGaussian(),
    "gaussian-learned": lambda sigma, mixtures: LearnedGaussian(),
    "discretized-logistic": lambda sigma, mixtures: DiscretizedLogistic(mixtures),
}


def make_likelihood(name: str | Likelihood, sigma: float = 1.0, mixtures: int = 5) -> Likelihood:
    """The likelihood object of `name` (an object passes through)."""
    if isinstance(name, Likelihood):
        return name
    return LIKELIHOOD_KINDS[name](sigma, mixtures)


def likelihood_of(config) -> Likelihood:
    """The likelihood a ModelConfig asks for."""
    return make_likelihood(config.likelihood, config.gaussian_sigma, config.mixtures)


def recon_nll(x: torch.Tensor, recon: torch.Tensor, likelihood: str | Likelihood,
              sigma: float = 1.0) -> torch.Tensor:
    """-log p(x | recon) summed over dims, (B,): recon is the decoder's raw output, scored in x's precision
    (a bf16 decoding from an autocast region is widened first, so the likelihood's sums stay fp32)."""
    if recon.is_floating_point() and recon.dtype != x.dtype and x.is_floating_point():
        recon = recon.to(x.dtype)
    return make_likelihood(likelihood, sigma).nll(x, recon)


def recon_nll_samples(x: torch.Tensor, recon: torch.Tensor, likelihood: str | Likelihood,
                      sigma: float = 1.0) -> torch.Tensor:
    """-log p(x | recon_k) of K decodings of each x: x (B, ...), recon (K, B, ...) -> (K, B)."""
    k = recon.shape[0]
    return recon_nll(x.expand(k, *x.shape).flatten(0, 1), recon.flatten(0, 1), likelihood, sigma).view(k, -1)


def kl_standard_normal_dims(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL( N(mean, exp(logvar)) || N(0, 1) ) of each latent dimension, shaped like mean. Closed form."""
    return 0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar)


def kl_standard_normal(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL( N(mean, exp(logvar)) || N(0, I) ) summed over latent dims, (B,). Closed form."""
    return flat(kl_standard_normal_dims(mean, logvar)).sum(1)


def pixel_metrics(x: torch.Tensor, recon: torch.Tensor, likelihood: str | Likelihood) -> dict[str, torch.Tensor]:
    """Per-pixel mean BCE (of the decoded probabilities) and MSE, per sample: comparable across models."""
    lik = make_likelihood(likelihood)
    with torch.no_grad():
        # the mean once: a logistic mixture's censored mean costs more than its NLL, and the training step pays it
        mean = lik.mean(recon)
        mse = flat((x - mean) ** 2).mean(1)
        bce = lik.bce(x, recon, mean=mean)
    return {"bce": bce, "mse": mse}


def log_normal_diag(z: torch.Tensor, mean: torch.Tensor | float = 0.0, logvar: torch.Tensor | None = None,
                    event_dims: int | None = None) -> torch.Tensor:
    """log N(z | mean, diag(exp(logvar))) summed over the latent dims; N(0, I) when logvar is None (and mean 0).

    `event_dims` trailing dims make one latent; by default all of mean's but its first (the batch dim), so mean
    and logvar (B, *latent) score z (B, *latent) or (K, B, *latent) -> (B,) or (K, B). Vectors with any leading
    dims take event_dims=1."""
    if event_dims is None:
        event_dims = mean.dim() - 1
    return log_normal_elementwise(z, mean, logvar).flatten(-event_dims).sum(-1)


def log_normal_elementwise(z: torch.Tensor, mean: torch.Tensor | float = 0.0,
                          logvar: torch.Tensor | None = None) -> torch.Tensor:
    """log N(z_i | mean_i, exp(logvar_i)) of every element (logvar None: unit variance), broadcast."""
    sq = (z - mean) ** 2
    if logvar is None:
        return -0.5 * (LOG_2PI + sq)
    return -0.5 * (LOG_2PI + logvar + sq * torch.exp(-logvar))


def log_importance_weights(x: torch.Tensor, recon: torch.Tensor, z: torch.Tensor, mean: torch.Tensor,
                           logvar: torch.Tensor, likelihood: str | Likelihood, sigma: float = 1.0,
                           event_dims: int | None = None) -> torch.Tensor:
    """log w_k = log p(x|z_k) + log p(z_k) - log q(z_k|x) for K samples: recon (K, B, ...), z (K, B, ...)
    -> (K, B). The building block of the IWAE bound and of the importance-sampled log-likelihood. q's mean and
    logvar are (B, *latent), or (K, B, *latent) with `event_dims` = the latent's dims where q differs by draw."""
    dims = mean.dim() - 1 if event_dims is None else event_dims
    log_px_z = -recon_nll_samples(x, recon, likelihood, sigma)
    log_pz = log_normal_diag(z, event_dims=dims)
    log_qz = log_normal_diag(z, mean, logvar, event_dims=dims)
    return log_px_z + log_pz - log_qz


def iwae_bound(log_w: torch.Tensor) -> torch.Tensor:
    """log (1/K) sum_k w_k, computed stably with log-sum-exp: (K, B) -> (B,). K=1 gives the ELBO estimate."""
    return torch.logsumexp(log_w, dim=0) - math.log(log_w.shape[0])


@dataclass(frozen=True)
class Shaping:
    """What the training loop adds to a model's own loss settings at one optimizer step. A model declares which
    of these its loss honours (Autoencoder.training_problems refuses the others); evaluation uses the default.

    kl_scale: the KL schedule's factor on the model's β (a warm-up or cyclical annealing), in [0, 1].
    capacity: Burgess et al.'s target KL C at this step, in nats; None = off.
    free_bits: nats per latent dimension below which the KL is not penalised; 0 = off.
    label_weight: maps the model's classifier weight (M2's α, in the paper's units) to the per-sample weight of
        this batch mix of labelled and hidden-label samples (data/semisupervised.py); identity without hidden
        labels.
    dataset_size: samples in the training set (estimators that need it, such as minibatch-weighted sampling).
    labelled_bound: the weight of a labelled sample's -ELBO among hidden-label ones (TrainConfig.labelled_bound;
        1 = every visit counts fully).
    """

    kl_scale: float = 1.0
    capacity: float | None = None
    free_bits: float = 0.0
    label_weight: Callable[[float], float] | None = None
    dataset_size: int = 0
    labelled_bound: float = 1.0

    def classifier_weight(self, alpha: float) -> float:
        return alpha if self.label_weight is None else self.label_weight(alpha)


NO_SHAPING = Shaping()
