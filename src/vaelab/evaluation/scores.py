"""Per-sample anomaly scores of a trained model (higher = more anomalous), and their AUROC.

  recon   reconstruction error: the registry loss's reconstruction NLL of the decoded posterior mean (nats)
  elbo    negative ELBO: the registry loss's -elbo with K posterior samples (reconstruction + KL, nats)
  iwae    importance-sampled negative log-likelihood -log p(x) ~ -log 1/K sum_k w_k (Burda et al. 2015)
  latent  squared Mahalanobis distance of the posterior mean to the training codes (Ledoit-Wolf covariance)
  gmm     negative log-density of the posterior mean under a Gaussian mixture fitted to the training codes
          (full covariances; the number of components, 1..8, chosen by BIC on the training codes)
  zrecon  reconstruction error with a noise scale per feature fitted on normal data: the Gaussian negative
          log-likelihood sum_j (r_j^2 / v_j + log 2 pi v_j) / 2 of the residual r = x - reconstruction, where v_j
          is feature j's mean squared residual on the training rows, shrunk 10% towards the mean over features
          (`residual_variance`); a feature the model always reconstructs well (a border pixel) then counts
          more when it is wrong than one that is always noisy
  combined  recon and gmm, each standardised by its median and interquartile range on held-out normal data,
          then added: a row is anomalous when it reconstructs badly, sits in an empty region of the code
          space, or both

and, for a detector, `auto`: the score type that best tells held-out normal rows from pseudo-anomalies made
of them (`choose_score`: each pseudo-anomaly is a held-out row with half of it, a contiguous block of
columns or image rows, taken from another held-out row). Only normal data is used: no labels, no test rows.

The scores are evaluation of a trained model, so they sit in the evaluation layer: the scikit-learn estimators
(vaelab.sklearn) and the anomaly task (vaelab.anomaly: the one-class protocol and the `detect` command) both take
them from here. vaelab.anomaly re-exports every name, and its docstring says which score works best where.

This module imports nothing heavy at the top (numpy, torch and scikit-learn inside the functions): the CLI
builds the `detect` and `one-class` parsers from SCORES and SCORE_HELP when answering `vaelab --help`.
"""

from __future__ import annotations

from vaelab.errors import ConfigError

SCORES = ("recon", "elbo", "iwae", "latent", "gmm", "zrecon", "combined")
AUTO = "auto"  # a detector's choice among the scores, made on held-out normal data (choose_score)
SCORE_CHOICES = (*SCORES, AUTO)
SCORE_HELP = {
    "recon": "reconstruction error of the decoded posterior mean (nats)",
    "elbo": "negative ELBO, reconstruction + KL, K posterior samples (nats; VAEs)",
    "iwae": "importance-sampled negative log-likelihood with K samples (nats; VAEs)",
    "latent": "squared Mahalanobis distance of the posterior mean to the training codes",
    "gmm": "negative log-density of the posterior mean under a Gaussian mixture of the training codes (BIC)",
    "zrecon": "reconstruction error with a per-feature noise scale fitted on the training rows (nats)",
    "combined": "recon + gmm, each standardised (median, IQR) on held-out normal data",
    AUTO: "the score that best separates held-out normal rows from pseudo-anomalies made of them",
}
SAMPLED = ("elbo", "iwae")  # scores that need a Gaussian posterior and a prior
FITTED = ("latent", "gmm", "zrecon", "combined")  # scores that need statistics of normal data (see anomaly_scores)
# iwae is no candidate: K decoder passes per row, and never better than elbo where measured
AUTO_CANDIDATES = ("recon", "elbo", "latent", "gmm", "zrecon", "combined")
MAX_COMPONENTS = 8  # the largest Gaussian mixture BIC may choose for the gmm score
RESIDUAL_SHRINK = 0.1  # zrecon: each feature's residual variance moves this far towards the mean over features


def score_problems(model_name: str, score: str) -> list[str]:
    """Why `score` cannot be computed for the registered model `model_name` (empty when it can)."""
    from vaelab.models import MODELS

    if score not in SCORE_CHOICES:
        return [f"score type {score!r} is unknown; choose one of {list(SCORE_CHOICES)}"]
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


def _residuals(model, x):
    """x - reconstruction (the likelihood's mean at the posterior mean), flattened: (B, D) in x's dtype."""
    return (x - model.reconstruct(x)).flatten(1)


def residual_variance(model, data, *, shrink: float = RESIDUAL_SHRINK, batch_size: int = 512):
    """Each feature's noise variance for the zrecon score, from normal rows `data` (an ArrayDataset):
    v_j = (1 - shrink) m_j + shrink mean_k m_k, where m_j is the mean squared residual of feature j
    (x_j - reconstruction_j) over the rows. The shrinkage keeps a feature that is reconstructed exactly on every
    training row (m_j = 0) at a finite variance. Returns float64 numpy (D,), D = the features of one row."""
    import numpy as np
    import torch

    if not (isinstance(shrink, (int, float)) and 0 < shrink <= 1):
        raise ConfigError(f"shrink={shrink!r} must be a number in (0, 1]: how far each feature's residual "
                          "variance moves towards the mean over features", "residual_variance")
    dtype = next(model.parameters()).dtype
    total, n = None, 0
    with torch.inference_mode():
        for start in range(0, len(data), batch_size):
            r = _residuals(model, data.batch(slice(start, start + batch_size)).to(dtype)).double()
            total = (r ** 2).sum(0) if total is None else total + (r ** 2).sum(0)
            n += len(r)
    if not n:
        raise ConfigError("residual_variance needs at least one row of normal data", "residual_variance")
    return shrink_variance((total / n).numpy(), shrink)


def shrink_variance(variance, shrink: float = RESIDUAL_SHRINK):
    """Per-feature variances moved the fraction `shrink` towards their mean: (1 - shrink) v_j + shrink mean(v), so
    a feature that never varies keeps a finite, positive variance; all ones when every variance is 0 (then no
    feature can be told from another, and each counts alike). Any shape; float64 numpy of that shape."""
    import numpy as np

    v = np.asarray(variance, dtype=np.float64)
    out = (1.0 - shrink) * v + shrink * v.mean()
    return out if out.min() > 0 else np.ones_like(out)


def residual_nll(residuals, variance):
    """The zrecon score of residuals (B, D) (a torch tensor) under N(0, diag(variance)): (B,) float64, nats."""
    import math

    import torch

    v = torch.as_tensor(variance, dtype=torch.float64)
    return 0.5 * ((residuals.double() ** 2) / v).sum(1) + 0.5 * float(torch.log(2 * math.pi * v).sum())


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


def fit_latent_mixture(codes, *, max_components: int = MAX_COMPONENTS, seed: int = 0) -> dict:
    """A Gaussian mixture with full covariances fitted to codes (N, d), its number of components chosen by
    BIC (Schwarz 1978) among 1..max_components (at most N // 2): {"weights" (K,), "means" (K, d),
    "covariances" (K, d, d), "bic": {k: BIC}}. Each covariance gets 1e-4 of the codes' mean variance added to
    its diagonal, so that a collapsed latent dimension keeps a finite density."""
    import numpy as np

    codes = np.asarray(codes, dtype=np.float64)
    n, d = codes.shape
    if n < 2:
        mean = codes.mean(0) if n else np.zeros(d)
        return {"weights": np.ones(1), "means": mean[None], "covariances": np.eye(d)[None], "bic": {}}
    from sklearn.mixture import GaussianMixture

    reg = 1e-4 * max(float(codes.var(0).mean()), 1e-12)
    best, bic = None, {}
    for k in range(1, max(1, min(int(max_components), n // 2)) + 1):
        gm = GaussianMixture(k, covariance_type="full", reg_covar=reg, n_init=1, max_iter=200,
                             random_state=int(seed)).fit(codes)
        bic[k] = float(gm.bic(codes))
        if best is None or bic[k] < bic[best.n_components]:
            best = gm
    return {"weights": best.weights_.copy(), "means": best.means_.copy(), "covariances": best.covariances_.copy(),
            "bic": bic}


def mixture_log_density(codes, mixture: dict):
    """log p(z) of codes (N, d) under a Gaussian mixture {"weights", "means", "covariances"}: float64 (N,).
    log N(z; m, S) = -(d log 2 pi + log det S + (z - m)^T S^-1 (z - m)) / 2, through the Cholesky factor of S;
    each row on its own (no batch statistics)."""
    import numpy as np
    from scipy.linalg import solve_triangular
    from scipy.special import logsumexp

    z = np.asarray(codes, dtype=np.float64)
    d = z.shape[1]
    parts = []
    for w, m, cov in zip(mixture["weights"], mixture["means"], mixture["covariances"]):
        chol = np.linalg.cholesky(np.asarray(cov, dtype=np.float64))
        white = solve_triangular(chol, (z - m).T, lower=True)  # (d, N): L^-1 (z - m)
        log_det = 2.0 * np.log(np.diag(chol)).sum()
        parts.append(np.log(w) - 0.5 * (d * np.log(2 * np.pi) + log_det + (white ** 2).sum(0)))
    return logsumexp(np.stack(parts), axis=0)


def robust_standardization(values) -> tuple[float, float]:
    """(median, IQR / 1.349) of a score on normal data: the centre and scale of a standardisation that a few
    anomalies among the normal rows barely move (IQR / 1.349 is the standard deviation for a Gaussian)."""
    import numpy as np

    v = np.asarray(values, dtype=np.float64)
    q1, med, q3 = np.percentile(v, [25, 50, 75])
    scale = (q3 - q1) / 1.349
    if not scale > 0:
        scale = float(v.std()) or 1.0  # a score that is constant on most rows
    return float(med), float(scale)


def combination_statistics(found: dict) -> dict:
    """The standardisation of each part of the combined score from its values on held-out normal data:
    found["recon"], found["gmm"] -> {"recon": [centre, scale], "gmm": [centre, scale]}."""
    return {k: list(robust_standardization(found[k])) for k in ("recon", "gmm")}


def fit_score_statistics(model, train, held_out=None, *, seed: int = 0) -> dict:
    """Everything the fitted scores need besides the model, as anomaly_scores' keywords: the training codes'
    statistics ("latent") and Gaussian mixture ("gmm", "combined"), each feature's residual variance on the
    training rows ("zrecon"), and the standardisation of "combined" on `held_out` normal rows (None: the
    training rows themselves). Returns {"latent_stats", "mixture", "residual_var", "combination"}."""
    codes = latent_codes(model, train)
    mixture = fit_latent_mixture(codes, seed=seed)
    parts = anomaly_scores(model, train if held_out is None else held_out, ("recon", "gmm"), mixture=mixture)
    return {"latent_stats": latent_statistics(codes), "mixture": mixture,
            "residual_var": residual_variance(model, train), "combination": combination_statistics(parts)}


def _request_problems(model, data, kinds, n_samples, latent_stats, mixture, combination, residual_var) -> list:
    """What keeps anomaly_scores from computing `kinds`: unknown or unsupported kinds, missing statistics."""
    import numpy as np

    problems = [p for k in kinds for p in score_problems(model.config.model, k)]
    if AUTO in kinds:
        problems.append("score type 'auto' is a detector's choice among the scores; ask for one of "
                        f"{list(SCORES)} here, or use AnomalyDetector(score_type='auto')")
    if "latent" in kinds and latent_stats is None:
        problems.append("score type 'latent' needs the training codes' statistics: latent_stats=(mean, "
                        "precision) from latent_statistics(latent_codes(model, train))")
    if ("gmm" in kinds or "combined" in kinds) and mixture is None:
        problems.append("score types 'gmm' and 'combined' need a Gaussian mixture of the training codes: "
                        "mixture=fit_latent_mixture(latent_codes(model, train))")
    if "zrecon" in kinds:
        if residual_var is None:
            problems.append("score type 'zrecon' needs each feature's residual variance on normal data: "
                            "residual_var=residual_variance(model, train)")
        elif len(residual_var) != int(np.prod(data.sample_shape)):
            problems.append(f"residual_var holds {len(residual_var)} variances, but the rows of {data.name!r} have "
                            f"{int(np.prod(data.sample_shape))} features; fit it on data of this shape")
    if "combined" in kinds and combination is None:
        problems.append("score type 'combined' needs the standardisation of its parts on held-out normal data: "
                        "combination=combination_statistics(anomaly_scores(model, held_out, ('recon', 'gmm'), "
                        "mixture=...))")
    if not (isinstance(n_samples, int) and n_samples >= 1):
        problems.append(f"n_samples={n_samples!r} must be a positive integer (posterior samples per row)")
    return problems


def anomaly_scores(model, data, kinds=("elbo",), *, n_samples: int = 16, seed: int = 0, batch_size: int = 512,
                   latent_stats=None, mixture=None, combination=None, residual_var=None) -> dict:
    """Anomaly scores (higher = more anomalous) of every row of `data` (an ArrayDataset), one float64 numpy
    array (N,) per requested kind in `kinds` (see SCORES). One pass over the data serves all kinds.

    `latent_stats` = (mean, precision) of the training codes (from `latent_statistics`) is needed for
    "latent", `mixture` (from `fit_latent_mixture`) for "gmm" and "combined", `combination` (from
    `combination_statistics`) for "combined", and `residual_var` (from `residual_variance`) for "zrecon". The
    reconstruction term is the negative log-likelihood of the model's own likelihood, and the sampled scores use
    its own importance weights (both stochastic layers of an hvae), so every registered model is scored the way
    it was trained.
    """
    import numpy as np
    import torch

    from vaelab.losses import recon_nll

    kinds = tuple(kinds)
    problems = _request_problems(model, data, kinds, n_samples, latent_stats, mixture, combination, residual_var)
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
    wanted = kinds
    kinds = tuple(dict.fromkeys(kinds + (("recon", "gmm") if "combined" in kinds else ())))
    parts: dict[str, list] = {k: [] for k in kinds if k != "combined"}
    with torch.inference_mode():
        for start in range(0, len(data), step):
            x = data.batch(slice(start, start + step)).to(dtype)  # (B, *sample_shape)
            if "recon" in kinds:
                parts["recon"].append(recon_nll(x, model.reconstruct_raw(x), model.likelihood))
            if "zrecon" in kinds:
                parts["zrecon"].append(residual_nll(_residuals(model, x), residual_var))
            if sampled:
                bounds = model.anomaly_bounds(x, eps)  # the model's own ELBO and IWAE bound, (B,) each
                for k in ("elbo", "iwae"):
                    if k in kinds:
                        parts[k].append(-bounds[k])
            if "latent" in kinds or "gmm" in kinds:
                codes = model.encode(x).mean.flatten(1).double().numpy()  # (B, latent_size)
                if "latent" in kinds:
                    parts["latent"].append(torch.from_numpy(mahalanobis(codes, *latent_stats)))
                if "gmm" in kinds:
                    parts["gmm"].append(torch.from_numpy(-mixture_log_density(codes, mixture)))
    model.train(was_training)
    out = {k: (torch.cat(v).double().numpy() if v else np.zeros(0)) for k, v in parts.items()}
    if "combined" in kinds:
        out["combined"] = sum((out[k] - c) / s for k, (c, s) in combination.items())
    return {k: out[k] for k in wanted}


def pseudo_anomalies(data, seed: int = 0):
    """Pseudo-anomalies made of normal rows (an ArrayDataset of float rows, same shape as `data`): row i keeps
    one half of itself and takes the other half from row i + 1 (cyclically, after a seeded shuffle): a
    contiguous block of half the columns, or of half the image rows, at a random offset. Each part looks
    normal on its own; only the whole is not, which is what a detector of unseen anomalies must see."""
    import torch

    from vaelab.data import ArrayDataset

    n = len(data)
    g = torch.Generator().manual_seed(int(seed))
    x = data.to_float()  # (N, D) or (N, C, H, W), in the model's units
    perm = torch.randperm(n, generator=g)
    partner_of = torch.empty_like(perm)
    partner_of[perm] = torch.roll(perm, -1)  # a cycle through every row: never a row with itself (n > 1)
    partner = x[partner_of]
    out = x.clone()
    axis = 2 if data.is_image else 1  # image rows, or columns
    size = x.shape[axis]
    half = max(1, size // 2)
    starts = torch.randint(0, size - half + 1, (n,), generator=g)
    for i in range(n):
        block = slice(int(starts[i]), int(starts[i]) + half)
        if data.is_image:
            out[i, :, block] = partner[i, :, block]
        else:
            out[i, block] = partner[i, block]
    return ArrayDataset(out, None, 1.0, None, f"{data.name} pseudo-anomalies")


def choose_score(model, held_out, candidates, *, seed: int = 0, **fitted) -> tuple[str, dict]:
    """The `auto` score type: among `candidates`, the one whose AUROC for held-out normal rows against
    pseudo-anomalies made of them (`pseudo_anomalies`) is highest; ties go to the earlier candidate.
    `fitted` are anomaly_scores' keywords (n_samples, latent_stats, mixture, combination).
    Returns (the chosen score type, {candidate: AUROC})."""
    import numpy as np

    fake = pseudo_anomalies(held_out, seed)
    normal = anomaly_scores(model, held_out, tuple(candidates), seed=seed, **fitted)
    odd = anomaly_scores(model, fake, tuple(candidates), seed=seed, **fitted)
    is_odd = np.r_[np.zeros(len(held_out), bool), np.ones(len(fake), bool)]
    table = {k: round(auroc(np.r_[normal[k], odd[k]], is_odd), 6) for k in candidates}
    return max(candidates, key=lambda k: table[k]), table


def auroc(anomaly_score, is_anomaly) -> float:
    """Area under the ROC curve of `anomaly_score` for the positives `is_anomaly`, in [0, 1]."""
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(is_anomaly, anomaly_score))


__all__ = ["SCORES", "SCORE_CHOICES", "SCORE_HELP", "SAMPLED", "FITTED", "AUTO", "AUTO_CANDIDATES",
           "score_problems", "latent_codes", "residual_variance", "shrink_variance", "residual_nll",
           "latent_statistics", "mahalanobis", "fit_latent_mixture",
           "mixture_log_density", "robust_standardization", "combination_statistics", "fit_score_statistics",
           "anomaly_scores",
           "pseudo_anomalies", "choose_score", "auroc"]
