"""β-TCVAE: Chen, Li, Grosse and Duvenaud (2018), "Isolating Sources of Disentanglement in Variational
Autoencoders", https://arxiv.org/abs/1802.04942; the authors' code: https://github.com/rtqichen/beta-tcvae.

The VAE's KL term, averaged over the data, splits into three parts (the paper's "ELBO TC-decomposition"), with
q(z) = (1/N) Σ_n q(z|x_n) the aggregate posterior of the N training samples and q(z_d) its marginals:

    E_n[KL(q(z|x_n) || p(z))] = I_q(z; n)  +  KL(q(z) || Π_d q(z_d))  +  Σ_d KL(q(z_d) || p(z_d))
                                index-code MI    total correlation (TC)     dimension-wise KL

β-TCVAE weights each: loss = recon + α·MI + β·TC + γ·dw-KL. The paper's β-TCVAE keeps α = γ = 1 and raises β
alone; the default β = 6 is the authors' README command (`vae_quant.py --dataset shapes --beta 6 --tcvae`, on
dSprites) and disentangling-vae's default. α = β = γ = b is a β-VAE with weight b on a sampled KL.

q(z) needs the whole training set; it is estimated on the minibatch. For the sample z_i ~ q(z|x_i) of the i-th
of B samples, with weights w_ij:

    log q(z_i)   ≈ logsumexp_j [log w_ij + log q(z_i | x_j)]
    log q(z_id)  ≈ logsumexp_j [log w_ij + log q(z_id | x_j)]                 (each latent dimension d)

- minibatch-weighted sampling (estimator="mws", the paper's estimator, the default): w_ij = 1/(N·B);
- minibatch-stratified sampling (estimator="mss", the paper's appendix): w_ii = 1/N for the sample's own
  posterior, w_ij = (N - B + 1)/(N·(B - 1)) for one other (the next row, cyclically), 1/(B - 1) for the other
  B - 2; each row sums to 1. (The authors' published code writes these weights down a column instead of the
  diagonal, a stride slip: rtqichen/beta-tcvae pull request #1; this is the layout their derivation means.)

Then, per sample, MI = log q(z|x) - log q(z), TC = log q(z) - Σ_d log q(z_d), dw-KL = Σ_d log q(z_d) - log p(z);
their sum is log q(z|x) - log p(z) whatever the estimator, so with α = β = γ = 1 the loss is the VAE's negative
ELBO with its KL sampled at z (tests/test_disentangling_models.py checks this). Each term is reported (`mi`,
`tc`, `dw_kl`) next to the closed-form `kl` and the `elbo`.

Reading the numbers: MWS's weights sum to 1/N, not 1, so its log q(z) is the batch average
log((1/B) Σ_j q(z_i|x_j)) minus log N. Its MI, TC and dw-KL therefore carry the constant offsets +log N,
+(D - 1)·log N and -D·log N (D latent dimensions): they move no gradient, but a collapsed posterior (q(z|x) = p(z)
for every x) reads MI = log N, TC = (D - 1)·log N, dw-KL = -D·log N where all three are 0. MSS's weights sum to 1
and read 0, 0, 0 there; use it to compare the terms' values.

N is the training set's size, which the training loop passes in `Shaping.dataset_size`. Without it (0: the
validation pass and `vaelab evaluate`, which shape no loss) the batch stands for the whole data: N = B, the same
formulas with the same estimator. So validation numbers of mi, tc, dw_kl and loss are comparable with each other
across epochs, not with the training ones (N enters as log N); recon, kl and elbo do not depend on N.

A batch of one has no other sample to estimate q(z) with: both estimators then give log q(z) = log q(z|x) - log N.
Under DDP each process estimates q(z) on its own share of the global batch (B is the per-process batch).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch

from vaelab.config import is_nonneg
from vaelab.errors import VaelabError
from vaelab.losses import Likelihood, Shaping, log_normal_diag, pixel_metrics, recon_nll
from vaelab.models.base import Autoencoder, Capabilities, ModelOutput, ModelSettings
from vaelab.models.registry import register
from vaelab.models.vae import vae_loss

ESTIMATORS = ("mws", "mss")  # minibatch-weighted sampling, minibatch-stratified sampling


@dataclass(frozen=True)
class BTCVAESettings(ModelSettings):
    alpha: float = field(default=1.0, metadata={
        "help": "weight α of the index-code mutual information I(z; x) (the paper keeps 1)"})
    beta: float = field(default=6.0, metadata={
        "help": "weight β of the total correlation KL(q(z) || prod_d q(z_d)) (6: the authors' dSprites "
                "command)"})
    gamma: float = field(default=1.0, metadata={
        "help": "weight γ of the dimension-wise KL sum_d KL(q(z_d) || p(z_d)) (the paper keeps 1)"})
    estimator: str = field(default="mws", metadata={"choices": ESTIMATORS,
        "help": "how q(z) is estimated on a minibatch: mws (minibatch-weighted sampling, the paper's) "
                "or mss (minibatch-stratified sampling)"})

    def problems(self, config) -> list[str]:
        out = [f"{name}={getattr(self, name)!r} must be a finite number >= 0"
               for name in ("alpha", "beta", "gamma") if not is_nonneg(getattr(self, name))]
        if self.estimator not in ESTIMATORS:
            out.append(f"estimator={self.estimator!r} is unknown; choose 'mws' (minibatch-weighted sampling) or "
                       "'mss' (minibatch-stratified sampling)")
        return out


def log_batch_weights(batch: int, dataset_size: int, estimator: str) -> torch.Tensor:
    """log w_ij, (B, B) float64: the weight of q(z_i | x_j) in the minibatch estimate of q(z_i) (module doc).
    dataset_size 0 means the batch is the whole data (N = B)."""
    if estimator not in ESTIMATORS:
        raise VaelabError(f"estimator={estimator!r} is unknown; choose 'mws' or 'mss'")
    n = dataset_size or batch
    if n < batch:
        raise VaelabError(f"dataset_size={dataset_size} is smaller than the batch ({batch} samples); the batch is "
                          "drawn from the data, so pass the size of the training set (0: the batch is all of it)")
    if estimator == "mws" or batch == 1:
        return torch.full((batch, batch), -(math.log(n) + math.log(batch)), dtype=torch.float64)
    m = batch - 1  # the other samples of the batch
    w = torch.full((batch, batch), 1.0 / m, dtype=torch.float64)
    rows = torch.arange(batch)
    w[rows, (rows + 1) % batch] = (n - m) / (n * m)  # the stratum of the rest of the data
    w[rows, rows] = 1.0 / n  # the sample's own posterior
    return w.log()


def kl_decomposition(z: torch.Tensor, mean: torch.Tensor, logvar: torch.Tensor, dataset_size: int = 0,
                     estimator: str = "mws") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(MI, TC, dimension-wise KL) of each sample, (B,) each, from the samples z ~ q(z|x) and the posteriors'
    mean and logvar, (B, *latent) each: the β-TCVAE decomposition of log q(z|x) - log p(z) (module doc)."""
    z, mean, logvar = z.flatten(1), mean.flatten(1), logvar.flatten(1)  # (B, D)
    # log q(z_id | x_j) for every pair (i, j) and dimension d, (B, B, D): a trailing event dim of one
    pairs = log_normal_diag(z[:, None, :, None], mean[None, :, :, None], logvar[None, :, :, None], event_dims=1)
    log_w = log_batch_weights(len(z), dataset_size, estimator).to(pairs)  # (B, B)
    log_qz_x = pairs.diagonal(dim1=0, dim2=1).sum(0)  # log q(z_i | x_i), (B,)
    log_qz = torch.logsumexp(log_w + pairs.sum(2), dim=1)  # log q(z_i), (B,)
    log_prod_qzd = torch.logsumexp(log_w[:, :, None] + pairs, dim=1).sum(1)  # Σ_d log q(z_id), (B,)
    log_pz = log_normal_diag(z, event_dims=1)  # log N(z_i | 0, I), (B,)
    return log_qz_x - log_qz, log_qz - log_prod_qzd, log_prod_qzd - log_pz


def btcvae_loss(x, out: ModelOutput, *, likelihood: Likelihood | str = "bernoulli",
                sigma: float = 1.0, alpha: float = 1.0,
                beta: float = 6.0, gamma: float = 1.0, estimator: str = "mws", dataset_size: int = 0,
                target: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """recon + α·MI + β·TC + γ·dw-KL per sample (module doc), with the ELBO's terms.

    K > 1 posterior samples (out.recon (K, B, ...)) come only from the likelihood bounds (anomaly scores; the
    model does not train the IWAE bound): they get the VAE's terms, the ELBO and the IWAE bound."""
    target = x if target is None else target
    if out.recon.dim() == target.dim() + 1:
        return vae_loss(x, out, likelihood=likelihood, sigma=sigma, target=target)
    post = out.posterior
    recon = recon_nll(target, out.recon, likelihood, sigma)
    mi, tc, dw_kl = kl_decomposition(out.z, post.mean, post.logvar, dataset_size, estimator)
    kl = post.kl()
    return {"loss": recon + alpha * mi + beta * tc + gamma * dw_kl, "recon": recon, "kl": kl,
            "elbo": -(recon + kl), "mi": mi, "tc": tc, "dw_kl": dw_kl,
            **pixel_metrics(target, out.recon, likelihood)}


@register("btcvae", description="beta-TCVAE (Chen et al. 2018): the VAE's KL split into index-code mutual "
                                "information, total correlation and dimension-wise KL, weighted --alpha (1), "
                                "--beta (6) and --gamma (1), estimated on each minibatch (--estimator mws or mss).")
class BTCVAE(Autoencoder):
    Settings = BTCVAESettings
    capabilities = Capabilities(stochastic=True, samples=True)
    objective = staticmethod(btcvae_loss)
    term_meanings = {"mi": "index-code mutual information I(z; n) per sample (minibatch estimate), nats",
                     "tc": "total correlation KL(q(z) || prod_d q(z_d)) per sample (minibatch estimate), nats",
                     "dw_kl": "dimension-wise KL sum_d KL(q(z_d) || p(z_d)) per sample (minibatch estimate), nats"}
    # the KL schedule scales α, β and γ together (the three parts of the KL); capacity and free bits are the
    # VAE's, on a KL this loss does not take whole; the IWAE bound has no decomposition
    loss_options = frozenset({"kl_schedule"})
    encoder_outputs = 2  # mean and log-variance

    def loss_weights(self, shaping: Shaping) -> dict:
        s, scale = self.settings, shaping.kl_scale
        return {**super().loss_weights(shaping), "alpha": s.alpha * scale, "beta": s.beta * scale,
                "gamma": s.gamma * scale, "estimator": s.estimator, "dataset_size": shaping.dataset_size}

    def training_problems(self, train) -> list[str]:
        if train.iw_samples == 1:
            return super().training_problems(train)
        # a more precise reason than the base's
        return [f"iw_samples={train.iw_samples} does not apply to model {self.config.model!r}: its mutual "
                "information, total correlation and dimension-wise KL are estimated from one posterior sample per "
                "input, not from the IWAE bound; drop it (iw_samples=1)",
                *super().training_problems(train.replace(iw_samples=1))]

    def encode(self, x, condition=None):
        self._check_condition(condition)
        return self._gaussian(self.encoder(x))  # (B, 2 * latent_dim) or (B, 2 * C, h, w) -> mean, logvar
