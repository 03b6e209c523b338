"""Per-sample anomaly scores of a trained model (higher = more anomalous), and their AUROC.

  recon   reconstruction error: the registry loss's reconstruction NLL of the decoded posterior mean (nats)
  elbo    negative ELBO: the registry loss's -elbo with K posterior samples (reconstruction + KL, nats)
  iwae    importance-sampled negative log-likelihood -log p(x) ~ -log 1/K sum_k w_k (Burda et al. 2015)
  latent  squared Mahalanobis distance of the posterior mean to the training codes (Ledoit-Wolf covariance)

The scores are evaluation of a trained model, so they sit in the evaluation layer: the scikit-learn estimators
(vaelab.sklearn) and the anomaly task (vaelab.anomaly: the one-class protocol and the `detect` command) both take
them from here. vaelab.anomaly re-exports every name, and its docstring says which score works best where.

This module imports nothing heavy at the top (numpy, torch and scikit-learn inside the functions): the CLI
builds the `detect` and `one-class` parsers from SCORES and SCORE_HELP when answering `vaelab --help`.
"""

from __future__ import annotations

from vaelab.errors import ConfigError

SCORES = ("recon", "elbo", "iwae", "latent")
SCORE_HELP = {
    "recon": "reconstruction error of the decoded posterior mean (nats)",
    "elbo": "negative ELBO, reconstruction + KL, K posterior samples (nats; VAEs)",
    "iwae": "importance-sampled negative log-likelihood with K samples (nats; VAEs)",
    "latent": "squared Mahalanobis distance of the posterior mean to the training codes",
}
SAMPLED = ("elbo", "iwae")  # scores that need a Gaussian posterior and a prior


def score_problems(model_name: str, score: str) -> list[str]:
    """Why `score` cannot be computed for the registered model `model_name` (empty when it can)."""
    from vaelab.models import MODELS

    if score not in SCORES:
        return [f"score type {score!r} is unknown; choose one of {list(SCORES)}"]
    spec = MODELS.get(model_name)
    if score in SAMPLED and spec is not None and not spec.cls.capabilities.stochastic:
        return [f"score type {score!r} needs a model with a posterior and a prior (a VAE), but model "
                f"{model_name!r} has none; use 'recon' or 'latent', or the model 'vae'"]
    return []


def latent_codes(model, data, *, batch_size: int = 512):
    """Posterior means of every row of `data` (an ArrayDataset), flattened: float64 numpy (N, latent_size)."""
    import numpy as np
    import torch

    dtype = next(model.parameters()).dtype
    out = []
    with torch.inference_mode():
        for start in range(0, len(data), batch_size):
            x = data.batch(slice(start, start + batch_size)).to(dtype)
            out.append(model.encode(x).mean.flatten(1).double().numpy())
    return np.concatenate(out) if out else np.zeros((0, model.latent_size))


def latent_statistics(codes):
    """(mean, precision) of training codes (N, d) for the Mahalanobis score. The covariance is shrunk towards
    a scaled identity (Ledoit & Wolf 2004) so that it stays invertible with few rows or collapsed dims."""
    import numpy as np

    d = codes.shape[1]
    mean = codes.mean(0) if len(codes) else np.zeros(d)
    if len(codes) < 2:
        return mean, np.eye(d)
    from sklearn.covariance import LedoitWolf

    cov = LedoitWolf(assume_centered=False).fit(codes).covariance_
    cov += 1e-9 * max(np.trace(cov) / d, 1e-12) * np.eye(d)  # a collapsed code (all rows equal) stays finite
    return mean, np.linalg.pinv(cov, hermitian=True)


def mahalanobis(codes, mean, precision):
    """Squared Mahalanobis distances (N,) of codes (N, d)."""
    diff = codes - mean
    return ((diff @ precision) * diff).sum(1)


def anomaly_scores(model, data, kinds=("elbo",), *, n_samples: int = 16, seed: int = 0, batch_size: int = 512,
                   latent_stats=None) -> dict:
    """Anomaly scores (higher = more anomalous) of every row of `data` (an ArrayDataset), one float64 numpy
    array (N,) per requested kind in `kinds` (see SCORES). One pass over the data serves all kinds.

    `latent_stats` = (mean, precision) of the training codes (from `latent_statistics`) is needed for
    "latent". The reconstruction term is the negative log-likelihood of the model's own likelihood, and the
    sampled scores use its own importance weights (both stochastic layers of an hvae), so every registered model
    is scored the way it was trained.
    """
    import numpy as np
    import torch

    from vaelab.losses import recon_nll

    kinds = tuple(kinds)
    problems = [p for k in kinds for p in score_problems(model.config.model, k)]
    if "latent" in kinds and latent_stats is None:
        problems.append("score type 'latent' needs the training codes' statistics: latent_stats=(mean, "
                        "precision) from latent_statistics(latent_codes(model, train))")
    if not (isinstance(n_samples, int) and n_samples >= 1):
        problems.append(f"n_samples={n_samples!r} must be a positive integer (posterior samples per row)")
    if problems:
        raise ConfigError(problems, "anomaly scores")

    dtype = next(model.parameters()).dtype
    was_training = model.training
    model.eval()
    sampled = any(k in SAMPLED for k in kinds)
    # common random numbers: the same K draws for every row, so a row's score depends on that row alone
    eps = torch.randn((n_samples, *model.noise_shape), generator=torch.Generator().manual_seed(int(seed)),
                      dtype=torch.float64).to(dtype) if sampled else None  # (K, *noise shape)
    step = max(1, batch_size // n_samples) if sampled else batch_size
    parts: dict[str, list] = {k: [] for k in kinds}
    with torch.inference_mode():
        for start in range(0, len(data), step):
            x = data.batch(slice(start, start + step)).to(dtype)  # (B, *sample_shape)
            if "recon" in kinds:
                parts["recon"].append(recon_nll(x, model.reconstruct_raw(x), model.likelihood))
            if sampled:
                bounds = model.anomaly_bounds(x, eps)  # the model's own ELBO and IWAE bound, (B,) each
                for k in ("elbo", "iwae"):
                    if k in kinds:
                        parts[k].append(-bounds[k])
            if "latent" in kinds:
                post = model.encode(x)
                parts["latent"].append(torch.from_numpy(
                    mahalanobis(post.mean.flatten(1).double().numpy(), *latent_stats)))
    model.train(was_training)
    return {k: (torch.cat(v).double().numpy() if v else np.zeros(0)) for k, v in parts.items()}


def auroc(anomaly_score, is_anomaly) -> float:
    """Area under the ROC curve of `anomaly_score` for the positives `is_anomaly`, in [0, 1]."""
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(is_anomaly, anomaly_score))


__all__ = ["SCORES", "SCORE_HELP", "SAMPLED", "score_problems", "latent_codes", "latent_statistics",
           "mahalanobis", "anomaly_scores", "auroc"]
