"""Metrics beyond the loss terms: PSNR, SSIM, bits/dim, latent health, and the quality of the latents as features."""

from __future__ import annotations

import math

import numpy as np
import torch

from vaelab.errors import DataError
from vaelab.losses import kl_standard_normal_dims


def psnr(x: torch.Tensor, x_hat: torch.Tensor, peak: float = 1.0) -> torch.Tensor:
    """Peak signal-to-noise ratio per sample in dB, (B,): 10 log10(peak^2 / MSE). Identical images give inf."""
    mse = ((x - x_hat) ** 2).reshape(x.shape[0], -1).mean(1)
    return 10.0 * torch.log10(peak**2 / mse)


def _gaussian_window(sigma: float = 1.5, truncate: float = 3.5, dtype=torch.float64) -> torch.Tensor:
    """The normalized 1-D Gaussian of Wang et al. 2004's SSIM, radius int(truncate * sigma + 0.5) (11 taps at
    sigma 1.5: scikit-image's window for gaussian_weights=True)."""
    radius = int(truncate * sigma + 0.5)
    t = torch.arange(-radius, radius + 1, dtype=dtype)
    g = torch.exp(-0.5 * (t / sigma) ** 2)
    return g / g.sum()


def ssim(x: torch.Tensor, y: torch.Tensor, data_range: float = 1.0, sigma: float = 1.5, k1: float = 0.01,
         k2: float = 0.03) -> torch.Tensor:
    """Structural similarity per image, (B,), of images x, y (B, C, H, W) (Wang et al. 2004): local means,
    variances and covariance under a Gaussian window (sigma 1.5), SSIM = (2 mu_x mu_y + C1)(2 cov + C2) /
    ((mu_x^2 + mu_y^2 + C1)(var_x + var_y + C2)) with C1 = (k1 L)^2, C2 = (k2 L)^2, averaged over the pixels whose
    window lies inside the image, then over the channels. The protocol of scikit-image's
    structural_similarity(gaussian_weights=True, sigma=1.5, use_sample_covariance=False, data_range=L), computed
    in float64. Images smaller than the window (11 px) get a window cut to their size."""
    if x.shape != y.shape or x.dim() != 4:
        raise ValueError(f"ssim takes two image batches (B, C, H, W) of the same shape, got {tuple(x.shape)} and "
                         f"{tuple(y.shape)}")
    x, y = x.double(), y.double()
    b, c, h, w = x.shape
    g = _gaussian_window(sigma).to(x.device)
    if len(g) > min(h, w):  # a small image (digits' 8x8): the window's centre taps, renormalized
        cut = (len(g) - min(h, w) + 1) // 2
        g = g[cut:len(g) - cut]
        g = g / g.sum()
    kernel = (g[:, None] * g[None, :]).expand(c, 1, len(g), len(g))  # (C, 1, k, k), one per channel

    def blur(t):  # only the positions whose window fits (skimage crops its padded borders away the same)
        return torch.nn.functional.conv2d(t, kernel, groups=c)

    mu_x, mu_y = blur(x), blur(y)
    var_x = blur(x * x) - mu_x**2
    var_y = blur(y * y) - mu_y**2
    cov = blur(x * y) - mu_x * mu_y
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    s = ((2 * mu_x * mu_y + c1) * (2 * cov + c2)) / ((mu_x**2 + mu_y**2 + c1) * (var_x + var_y + c2))
    return s.mean(dim=(2, 3)).mean(1)


def bits_convention(likelihood, probe: torch.Tensor, binarized: bool = False) -> tuple[str, float]:
    """How bits/dim is reported for a model's likelihood on data like `probe`: (the convention in words, nats
    added per dimension to the negative log-likelihood before the division by D ln 2).

    - a discretized likelihood (8-bit data): exact, the likelihood is a probability of the integer pixels;
    - a Bernoulli likelihood on binary data: exact, a probability of the binary pixels;
    - a continuous likelihood (a density on [0, 1]) on 8-bit data: the dequantized convention of the literature,
      -log2 p of the density moved to the [0, 256) pixel scale: (nats + D ln 256) / (D ln 2). The density is taken
      at the pixel values k/255 (no uniform dequantization noise), so it is comparable, not a bound;
    - otherwise (a density of other data, the BCE of grey pixels) the plain nats / (D ln 2), not comparable with
      the 8-bit figures of the literature."""
    values = probe.double()
    binary = binarized or bool(((values == 0) | (values == 1)).all())
    k = values * 255
    eight_bit = bool(values.numel()) and float(values.min()) >= 0 and float(values.max()) <= 1 and \
        float((k - k.round()).abs().max()) < 1e-3
    if likelihood.discrete:
        return "exact: -log2 P(8-bit pixels) per sub-pixel", 0.0
    if binary and not likelihood.continuous:
        return "exact: -log2 P(binary pixels) per pixel", 0.0
    if likelihood.continuous and eight_bit:
        return ("dequantized density of 8-bit pixels: (nats + D ln 256) / (D ln 2), D sub-pixels; the density at "
                "the pixel values, comparable with the literature's continuous models"), math.log(256)
    if not likelihood.continuous:
        return ("cross-entropy of grey pixels / (D ln 2): not a likelihood of the data, not comparable; train "
                "a discretized or continuous likelihood for bits/dim"), 0.0
    return "density of x / (D ln 2): not 8-bit data, not comparable with 8-bit results", 0.0


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


def class_confusion(model, data, batch_size: int = 1000, seed: int = 0) -> dict:
    """How a model with a classifier (`classify`) errs on labelled data: `confusion`, the counts with rows the true
    class and columns the predicted one (the most probable class of model.classify), `class_error`, each class's
    fraction misclassified (None for a class with no sample), and `most_confused`, the three largest off-diagonal
    counts as {"true", "predicted", "count"}. A hidden label (-1) is not counted. A classifier that draws samples
    (posterior_samples K) draws them from `seed` without touching the caller's random state, so a report is the
    same every time."""
    labels, predicted, classes = data.y.long(), [], 0
    was_training = model.training
    model.eval()
    with torch.random.fork_rng(devices=[]), torch.inference_mode():
        torch.manual_seed(seed)
        for start in range(0, len(data), batch_size):
            probs = model.classify(data.batch(torch.arange(start, min(start + batch_size, len(data)))))
            predicted.append(probs.argmax(1).cpu())
            classes = probs.shape[1]
    model.train(was_training)
    if len(labels) and int(labels.max()) >= classes:
        raise DataError(f"label {int(labels.max())} is outside the model's {classes} classes (0 to {classes - 1}): "
                         "evaluate on data labelled as the model was trained")
    judged = labels >= 0  # a hidden label (-1) is not judged, as the loss's `error` leaves it out
    counts = torch.zeros(classes, classes, dtype=torch.long)
    truth, guess = labels[judged], torch.cat(predicted)[judged]
    counts.index_put_((truth, guess), torch.ones_like(truth), accumulate=True)
    rows = counts.tolist()
    errors = [None if sum(row) == 0 else (sum(row) - row[c]) / sum(row) for c, row in enumerate(rows)]
    off = counts.clone().fill_diagonal_(0).flatten()
    top = [i for i in off.argsort(descending=True, stable=True)[:3].tolist() if off[i] > 0]
    return {"confusion": rows, "class_error": errors,
            "most_confused": [{"true": i // classes, "predicted": i % classes, "count": int(off[i])} for i in top]}


def bits_per_dim(nats: float, dims: int) -> float:
    return nats / (dims * math.log(2))
