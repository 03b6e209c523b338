"""Losses as pure functions of (batch, model output, weights).

Every function returns a dict of per-sample tensors of shape (B,); the key "loss" is the objective that
training minimises (the loop takes its batch mean). Reconstruction terms are negative log-likelihoods in
nats summed over the dimensions of one sample, so "loss" of a VAE is the negative ELBO per image
(the tutorial's 784*BCE + KL on MNIST). "bce" and "mse" are per-pixel means for comparison with Keras.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

if TYPE_CHECKING:  # losses judge model outputs but must not import the models (they import the losses)
    from vaelab.models.base import ModelOutput
    from vaelab.models.hvae import HVAEOutput
    from vaelab.models.m2 import M2Output

LOG_2PI = math.log(2 * math.pi)


def _flat(t: torch.Tensor) -> torch.Tensor:
    return t.reshape(t.shape[0], -1)  # (B, D)


def bernoulli_nll(x: torch.Tensor, logits: torch.Tensor) -> torch.Tensor:
    """-log p(x | logits) summed over dims, (B,). x may be any value in [0, 1] (the usual BCE)."""
    return _flat(F.binary_cross_entropy_with_logits(logits, x, reduction="none")).sum(1)


def gaussian_nll(x: torch.Tensor, mean: torch.Tensor, sigma: float) -> torch.Tensor:
    """-log N(x | mean, sigma^2 I) summed over dims, (B,)."""
    d = x[0].numel()
    sq = _flat((x - mean) ** 2).sum(1)
    return 0.5 * sq / sigma**2 + d * (math.log(sigma) + 0.5 * LOG_2PI)


def recon_nll(x: torch.Tensor, recon: torch.Tensor, likelihood: str, sigma: float = 1.0) -> torch.Tensor:
    if likelihood == "bernoulli":
        return bernoulli_nll(x, recon)
    return gaussian_nll(x, recon, sigma)


def kl_standard_normal(mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """KL( N(mean, exp(logvar)) || N(0, I) ) summed over latent dims, (B,). Closed form."""
    return _flat(0.5 * (mean.pow(2) + logvar.exp() - 1.0 - logvar)).sum(1)


def pixel_metrics(x: torch.Tensor, recon: torch.Tensor, likelihood: str) -> dict[str, torch.Tensor]:
    """Per-pixel mean BCE (of the decoded probabilities) and MSE, per sample: comparable across models."""
    with torch.no_grad():
        mean = torch.sigmoid(recon) if likelihood == "bernoulli" else recon
        mse = _flat((x - mean) ** 2).mean(1)
        if likelihood == "bernoulli":
            bce = _flat(F.binary_cross_entropy_with_logits(recon, x, reduction="none")).mean(1)
        else:
            p = mean.clamp(1e-7, 1 - 1e-7)
            bce = _flat(F.binary_cross_entropy(p, x.clamp(0, 1), reduction="none")).mean(1)
    return {"bce": bce, "mse": mse}


def autoencoder_loss(x, out: ModelOutput, *, likelihood: str = "bernoulli", sigma: float = 1.0,
                     target: torch.Tensor | None = None, **_) -> dict[str, torch.Tensor]:
    """Reconstruction NLL of a deterministic autoencoder. `target` is the clean input (denoising)."""
    target = x if target is None else target
    recon = recon_nll(target, out.recon, likelihood, sigma)
    return {"loss": recon, "recon": recon, **pixel_metrics(target, out.recon, likelihood)}


def log_normal_diag(z: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor) -> torch.Tensor:
    """log N(z | mean, diag(exp(logvar))) summed over the latent dims. mean and logvar are (B, *latent);
    z may carry extra leading sample dims, (K, B, *latent) -> (K, B)."""
    latent_dims = mean.dim() - 1
    return (-0.5 * (LOG_2PI + logvar + (z - mean) ** 2 * torch.exp(-logvar))).flatten(-latent_dims).sum(-1)


def log_importance_weights(x: torch.Tensor, recon: torch.Tensor, z: torch.Tensor, mean: torch.Tensor,
                           logvar: torch.Tensor, likelihood: str, sigma: float = 1.0) -> torch.Tensor:
    """log w_k = log p(x|z_k) + log p(z_k) - log q(z_k|x) for K samples: recon (K, B, ...), z (K, B, ...)
    -> (K, B). The building block of the IWAE bound and of the importance-sampled log-likelihood."""
    k = z.shape[0]
    log_px_z = -recon_nll(x.expand(k, *x.shape).flatten(0, 1), recon.flatten(0, 1), likelihood, sigma)
    log_px_z = log_px_z.view(k, -1)
    log_pz = log_normal_diag(z, torch.zeros_like(mean), torch.zeros_like(logvar))
    log_qz = log_normal_diag(z, mean, logvar)
    return log_px_z + log_pz - log_qz


def iwae_bound(log_w: torch.Tensor) -> torch.Tensor:
    """log (1/K) sum_k w_k, computed stably with log-sum-exp: (K, B) -> (B,). K=1 gives the ELBO estimate."""
    return torch.logsumexp(log_w, dim=0) - math.log(log_w.shape[0])


def vae_loss(x, out: ModelOutput, *, likelihood: str = "bernoulli", sigma: float = 1.0, beta: float = 1.0,
             target: torch.Tensor | None = None, capacity: float | None = None, free_bits: float = 0.0,
             **_) -> dict[str, torch.Tensor]:
    """Negative ELBO with a β weight on the KL: recon + β·KL (β=1: the plain VAE).

    - capacity C (Burgess et al. 2018): recon + β·|KL − C| instead.
    - free_bits λ (Kingma et al. 2016): each latent dimension's batch-mean KL below λ nats counts as λ and
      gets no gradient, so the optimizer cannot buy reconstruction by closing those dimensions.
    - K > 1 posterior samples (out.recon is (K, B, ...), out.z is (K, B, ...)): the IWAE bound of Burda et
      al. 2015 replaces the ELBO; `recon` is then the mean over the K samples.
    """
    target = x if target is None else target
    post = out.posterior
    kl = post.kl()
    if out.recon.dim() == target.dim() + 1:  # K importance samples
        log_w = log_importance_weights(target, out.recon, out.z, post.mean, post.logvar, likelihood, sigma)
        bound = iwae_bound(log_w)
        k = out.recon.shape[0]
        recon = recon_nll(target.expand(k, *target.shape).flatten(0, 1), out.recon.flatten(0, 1),
                          likelihood, sigma).view(k, -1).mean(0)
        return {"loss": -bound, "recon": recon, "kl": kl, "elbo": -(recon + kl), "iwae": bound,
                **pixel_metrics(target, out.recon[0], likelihood)}
    recon = recon_nll(target, out.recon, likelihood, sigma)
    penalty = kl
    if free_bits > 0:
        kl_dims = 0.5 * (post.mean.pow(2) + post.logvar.exp() - 1.0 - post.logvar).flatten(1)  # (B, D)
        active = (kl_dims.detach().mean(0) >= free_bits).to(kl_dims.dtype)  # (D,)
        penalty = (kl_dims * active).sum(1) + free_bits * (1 - active).sum()
    if capacity is not None:
        penalty = (penalty - capacity).abs()
    return {"loss": recon + beta * penalty, "recon": recon, "kl": kl, "elbo": -(recon + kl),
            **pixel_metrics(target, out.recon, likelihood)}


def _log_normal(z: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor | None = None) -> torch.Tensor:
    """log N(z | mean, diag(exp(logvar))) over the last dim of vectors, broadcasting the leading ones (N(0, I)
    when mean is 0 and logvar None)."""
    sq = (z - mean) ** 2
    if logvar is None:
        return (-0.5 * (LOG_2PI + sq)).sum(-1)
    return (-0.5 * (LOG_2PI + logvar + sq * torch.exp(-logvar))).sum(-1)


def hvae_log_parts(x: torch.Tensor, out: HVAEOutput, likelihood: str, sigma: float = 1.0) -> dict[str, torch.Tensor]:
    """The log-densities of a two-layer VAE's samples, (K, B) each: log p(x|z1), log p(z1|z2), log p(z2),
    log q(z1|x), log q(z2|z1). out.recon is (K, B, ...); z1, z2 and the Gaussians over them carry the same
    leading (K, B) (q(z1|x) only (B, ...): it is shared by the K samples)."""
    k = out.recon.shape[0]
    log_px = -recon_nll(x.expand(k, *x.shape).flatten(0, 1), out.recon.flatten(0, 1), likelihood, sigma).view(k, -1)
    q1, q2, p1 = out.posterior, out.top, out.prior1
    return {"log_px": log_px, "log_p1": _log_normal(out.z1, p1.mean, p1.logvar), "log_p2": _log_normal(out.z, 0.0),
            "log_q1": _log_normal(out.z1, q1.mean, q1.logvar), "log_q2": _log_normal(out.z, q2.mean, q2.logvar)}


def hvae_log_weights(x: torch.Tensor, out: HVAEOutput, likelihood: str, sigma: float = 1.0) -> torch.Tensor:
    """log w_k = log p(x, z1_k, z2_k) - log q(z1_k, z2_k | x), (K, B): the IWAE bound's and the importance-sampled
    likelihood's building block for the two-layer model."""
    return _joint_minus_proposal(hvae_log_parts(x, out, likelihood, sigma))


def _joint_minus_proposal(t: dict[str, torch.Tensor]) -> torch.Tensor:
    return t["log_px"] + t["log_p1"] + t["log_p2"] - t["log_q1"] - t["log_q2"]


def hvae_loss(x, out: HVAEOutput, *, likelihood: str = "bernoulli", sigma: float = 1.0, beta: float = 1.0,
              target: torch.Tensor | None = None, **_) -> dict[str, torch.Tensor]:
    """The two-stochastic-layer VAE (models/hvae.py): p(z2) p(z1|z2) p(x|z1) with q(z1|x) q(z2|z1), per sample.

    - one sample: the negative ELBO recon + β·KL, with KL = E_q[log q(z1|x) - log p(z1|z2)] + KL(q(z2|z1) || N(0, I)),
      the first term by its one-sample estimate and the second in closed form (it has one given z1);
    - K > 1 samples (out.recon is (K, B, ...)): the IWAE bound -log (1/K) Σ_k w_k (Burda et al. 2015, whose
      two-layer MNIST model this is); `recon` and `kl` are then the means of their one-sample estimates. A β < 1
      (`--kl-schedule linear`: a warm-up) weights log p(z1, z2) - log q(z1, z2 | x) in every log w_k by β; without
      a warm-up the top layer of a wide model closes in the first epoch (its KL stays below 0.004 nats).
    """
    target = x if target is None else target
    single = out.recon.dim() == target.dim()
    if single:  # the K = 1 record: give it its leading sample dim
        out = out.unsqueezed()
    t = hvae_log_parts(target, out, likelihood, sigma)
    recon = -t["log_px"].mean(0)
    pixels = pixel_metrics(target, out.recon[0], likelihood)
    if single:
        q2 = out.top
        kl_top = kl_standard_normal(q2.mean[0], q2.logvar[0])
        kl = (t["log_q1"] - t["log_p1"])[0] + kl_top
        return {"loss": recon + beta * kl, "recon": recon, "kl": kl, "kl_top": kl_top, "elbo": -(recon + kl),
                **pixels}
    bound = iwae_bound(_joint_minus_proposal(t))
    kl_k = t["log_q1"] + t["log_q2"] - t["log_p1"] - t["log_p2"]  # (K, B)
    kl = kl_k.mean(0)
    # β < 1 (a KL warm-up) tempers each weight's prior-over-posterior part: log p(x|z1) - β·kl_k; β = 1 is the bound
    loss = -bound if beta == 1 else -iwae_bound(t["log_px"] - beta * kl_k)
    return {"loss": loss, "recon": recon, "kl": kl, "elbo": -(recon + kl), "iwae": bound, **pixels}


hvae_loss.tempers_iwae = True  # the training loop lets β and its warm-up schedule act on the IWAE bound


def m2_loss(x, out: M2Output, *, likelihood: str = "bernoulli", sigma: float = 1.0, beta: float = 1.0,
            alpha: float = 0.1, target: torch.Tensor | None = None, **_) -> dict[str, torch.Tensor]:
    """The semi-supervised objective of M2 (Kingma et al. 2014, https://arxiv.org/abs/1406.5298, eqs. 6-9),
    per sample, with -ELBO(x, y) = L(x, y) = recon + KL - log p(y) and p(y) uniform over the K classes:

        labelled (x, y):   L(x, y) + alpha * (-log q(y|x))
        hidden label:      U(x) = sum_y q(y|x) L(x, y) - H(q(y|x))

    `out` (models.m2.M2Output) holds the decoding of every (sample, class) pair these need: a labelled sample's
    once with its label, a hidden-label sample's once per class, with `pair_row` naming each pair's sample and
    `pair_label` its class. The sum over classes is then one weighted scatter-add over the pairs (index_add),
    not a loop over classes. `alpha` is the per-sample weight; the training loop derives it from the config's
    alpha in the paper's units (data/semisupervised.py). `beta` weights the KL as in vae_loss; with K > 1
    posterior samples per pair the IWAE bound replaces each pair's ELBO.

    Terms (B,): loss; elbo (the bound on log p(x, y), or on log p(x) for a hidden label); recon, kl, bce, mse
    (q-weighted over the classes for a hidden label); entropy of q(y|x); classifier_nll (-log q(y|x)) and error
    (1 when argmax q(y|x) is not y) of the labelled samples, scaled by B / (labelled samples in the batch) and 0
    for hidden labels, so that a batch's mean is the mean over its labelled samples: on a fully labelled split
    they are the plain per-sample values and the mean of `error` is the classifier's error rate.
    """
    target = x if target is None else target
    labels, row, cls = out.labels, out.pair_row, out.pair_label  # (B,) with -1 = hidden; (P,), (P,)
    log_q = F.log_softmax(out.class_logits, dim=1)  # (B, K) log q(y|x)
    q = log_q.exp()
    b, k = log_q.shape
    hidden = labels < 0
    post = out.posterior
    kl = post.kl()  # (P,)
    xt = target[row]  # (P, ...) each pair's image
    if out.recon.dim() == target.dim() + 1:  # K importance samples per pair: (K, P, ...)
        n = out.recon.shape[0]
        log_w = log_importance_weights(xt, out.recon, out.z, post.mean, post.logvar, likelihood, sigma)
        objective = -iwae_bound(log_w)
        recon = recon_nll(xt.expand(n, *xt.shape).flatten(0, 1), out.recon.flatten(0, 1), likelihood,
                          sigma).view(n, -1).mean(0)
        first = out.recon[0]
    else:
        recon = recon_nll(xt, out.recon, likelihood, sigma)
        objective = recon + beta * kl
        first = out.recon
    log_py = -math.log(k)
    # each pair's weight in its sample's sum: 1 for a labelled sample's pair, q(y|x) for a hidden label's
    weight = torch.where(hidden[row], q[row, cls], torch.ones_like(kl))  # (P,)

    def per_sample(v: torch.Tensor) -> torch.Tensor:  # (P,) -> (B,), the weighted sum over a sample's pairs
        return torch.zeros(b, dtype=v.dtype, device=v.device).index_add(0, row, weight * v)

    entropy = -(q * log_q).sum(1)  # H(q(y|x))
    h = torch.where(hidden, entropy, 0.0)
    nll_y = torch.where(hidden, 0.0, -log_q.gather(1, labels.clamp(min=0)[:, None])[:, 0])
    scale = b / (~hidden).sum().clamp(min=1)  # reported terms: a batch's mean = its labelled samples' mean
    wrong = (out.class_logits.argmax(1) != labels) & ~hidden
    pixels = pixel_metrics(xt, first, likelihood)
    return {"loss": per_sample(objective) - log_py - h + alpha * nll_y, "recon": per_sample(recon),
            "kl": per_sample(kl), "elbo": -per_sample(recon + kl) + log_py + h, "bce": per_sample(pixels["bce"]),
            "mse": per_sample(pixels["mse"]), "entropy": entropy, "classifier_nll": nll_y.detach() * scale,
            "error": wrong.to(kl.dtype) * scale}


def vqvae_loss(x, out: ModelOutput, *, likelihood: str = "bernoulli", sigma: float = 1.0, commitment: float = 0.25,
               target: torch.Tensor | None = None, **_) -> dict[str, torch.Tensor]:
    """The VQ-VAE objective of van den Oord et al. 2017 (eq. 3), per sample:

        recon + ||sg(z_e) - e||^2 + β ||z_e - sg(e)||^2        (β = `commitment`, sg = stop-gradient)

    with the squared distances summed over the code grid, as recon is summed over the pixels. `out.posterior`
    carries the encoder's output `z_e` and the chosen codes e as its `mean`; `out.recon` decoded the
    straight-through code, so the reconstruction's gradient reaches the encoder. The codebook term has a
    gradient only when the codebook is a parameter (vq_ema=False); under EMA updates the quantizer moves the
    codebook and the term is a constant, kept so that "loss" is the same quantity in both modes.
    "commitment" reports ||z_e - e||^2 without β.
    """
    target = x if target is None else target
    z_e, codes = out.posterior.z_e, out.posterior.mean  # (B, D, *grid) each
    recon = recon_nll(target, out.recon, likelihood, sigma)
    commit = _flat((z_e - codes.detach()) ** 2).sum(1)  # pulls the encoder to its codes
    codebook = _flat((z_e.detach() - codes) ** 2).sum(1)  # pulls the codes to the encoder (same value)
    return {"loss": recon + codebook + commitment * commit, "recon": recon, "commitment": commit,
            **pixel_metrics(target, out.recon, likelihood)}
