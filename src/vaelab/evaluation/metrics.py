"""Metrics beyond the loss terms: PSNR, latent health, and the quality of the latents as features."""

from __future__ import annotations

import math

import numpy as np
import torch

from vaelab.losses import kl_standard_normal_dims


def psnr(x: torch.Tensor, x_hat: torch.Tensor, peak: float = 1.0) -> torch.Tensor:
    """Peak signal-to-noise ratio per sample in dB, (B,): 10 log10(peak^2 / MSE). Identical images give inf."""
    mse = ((x - x_hat) ** 2).reshape(x.shape[0], -1).mean(1)
    return 10.0 * torch.log10(peak**2 / mse)


def posterior_stats(model, data, batch_size: int = 1000) -> tuple[torch.Tensor, torch.Tensor]:
    """Posterior means and log-variances of the model's latent over a dataset, flattened: (N, latent_size) each."""
    return layer_stats(model, data, batch_size)[""]


@torch.inference_mode()
def layer_stats(model, data, batch_size: int = 1000) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Posterior means and log-variances over a dataset, flattened, (N, size) each, for each stochastic layer of
    a model with a stochastic encoder (model.posteriors: "" is its latent)."""
    parts: dict[str, tuple[list, list]] = {}
    model.eval()
    for start in range(0, len(data), batch_size):
        idx = torch.arange(start, min(start + batch_size, len(data)))
        cond = data.labels(idx) if model.capabilities.conditional else None
        for name, post in model.posteriors(data.batch(idx), cond).items():
            means, logvars = parts.setdefault(name, ([], []))
            means.append(post.mean.flatten(1))
            logvars.append(post.logvar.flatten(1))
    return {name: (torch.cat(m), torch.cat(v)) for name, (m, v) in parts.items()}


def latent_health(means: torch.Tensor, logvars: torch.Tensor, threshold: float = 0.01) -> dict:
    """KL per latent dimension (mean over data, nats), active units (Burda et al. 2015: dimension u is active
    when Cov_x(E_q[z_u]) > 0.01), and a posterior-collapse warning when no dimension is active or the KL is
    near zero."""
    kl_dims = kl_standard_normal_dims(means, logvars).mean(0)  # (D,)
    activity = means.var(0, unbiased=True) if len(means) > 1 else torch.zeros(means.shape[1])
    active = int((activity > threshold).sum())
    out = {"kl_per_dim": [round(float(v), 6) for v in kl_dims], "activity_per_dim":
           [round(float(v), 6) for v in activity], "active_units": active, "latent_dims": int(means.shape[1])}
    total_kl = float(kl_dims.sum())
    if active == 0 or total_kl < 0.1:
        out["warning"] = (f"posterior collapse: {active} of {means.shape[1]} latent dimensions are active and the "
                          f"KL is {total_kl:.3g} nats; the decoder ignores z. Try KL warm-up "
                          "(--kl-schedule linear), free bits, a smaller beta or a weaker decoder")
    return out


def probe_accuracy(z_train: np.ndarray, y_train: np.ndarray, z_test: np.ndarray, y_test: np.ndarray,
                   k: int = 5, max_train: int = 20000, seed: int = 0) -> dict:
    """Accuracy of a linear probe (logistic regression on standardized latents) and of k-NN on the
    latents: how linearly separable / locally consistent the classes are in latent space."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.neighbors import KNeighborsClassifier
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    if len(z_train) > max_train:  # the probes' cost grows with N; a random subset keeps evaluation fast
        idx = np.random.default_rng(seed).choice(len(z_train), max_train, replace=False)
        z_train, y_train = z_train[idx], y_train[idx]
    linear = make_pipeline(StandardScaler(), LogisticRegression(max_iter=1000))
    linear.fit(z_train, y_train)
    knn = KNeighborsClassifier(n_neighbors=k).fit(z_train, y_train)
    return {"linear_probe_accuracy": float(linear.score(z_test, y_test)),
            f"knn{k}_accuracy": float(knn.score(z_test, y_test))}


def bits_per_dim(nats: float, dims: int) -> float:
    return nats / (dims * math.log(2))
