"""Anomaly detection: per-sample anomaly scores, the one-class protocol, and the pictures of `vaelab detect`.

    from vaelab.anomaly import AnomalyDetector
    det = AnomalyDetector(model="vae", score_type="elbo", contamination=0.05).fit(X_normal)
    det.predict(X)            # +1 normal, -1 anomaly (scikit-learn's convention)
    det.score_samples(X)      # higher = more normal

    table = one_class("mnist", normal_class=3, model="vae", out="runs/oc3")   # AUROC per score type

Seven anomaly scores (higher = more anomalous), each a function of one trained model, and a detector's choice:

  recon   reconstruction error: the registry loss's reconstruction NLL of the decoded posterior mean (nats)
  elbo    negative ELBO: the registry loss's -elbo with K posterior samples (reconstruction + KL, nats)
  iwae    importance-sampled negative log-likelihood -log p(x) ~ -log 1/K sum_k w_k (Burda et al. 2015)
  latent  squared Mahalanobis distance of the posterior mean to the training codes (Ledoit-Wolf covariance)
  gmm     -log density of the posterior mean under a Gaussian mixture of the training codes (K by BIC)
  zrecon  reconstruction error with one noise variance per feature, fitted on the training rows (nats)
  combined  recon + gmm, each standardised by its median and IQR on held-out normal data
  auto    (a detector's) the score that best separates held-out normal rows from pseudo-anomalies made of
          them: half of a row replaced by the same half of another (vaelab.evaluation.scores.choose_score)

Which works best where (benchmarks/anomaly.py; AUROC %):
- Images, MNIST one-class, MLP VAE with a Gaussian likelihood: recon 97.0 = elbo 97.0 > iwae 96.8 >> latent
  75.0 (Fashion-MNIST: elbo 91.4, recon 91.3, iwae 91.2, latent 84.6). A Bernoulli likelihood costs five points
  (elbo 92.1): images with little ink (a "1") get a low cross-entropy whatever the normal class. The latent
  score needs a conv encoder to be useful (about 88 on the hard classes 2 and 8, still below recon).
- Tables whose anomalies break the dependencies between columns (not their ranges): recon (AE 98.2, VAE
  97.9) ~ elbo ~ iwae (97.7) >> latent (~50: a corrupted row still gets an ordinary code); LOF 95.2,
  IsolationForest 60.2.
- iwae costs K decoder passes per row and has not beaten elbo anywhere measured: it matters where the
  likelihood itself is wanted. recon is the cheapest and works for every model.

The sampled scores use common random numbers: one fixed set of K standard-normal draws eps_k shared by every
row, z_k = mean + std * eps_k. So a row's score depends on that row alone (not on its batch or position), and
scoring twice gives the same numbers, which scikit-learn's estimator checks demand.

Where things live (the layers, checked by import-linter: see pyproject.toml): the scores are evaluation of a
trained model, in `vaelab.evaluation.scores` (re-exported here); `AnomalyDetector` is a scikit-learn estimator
on those scores, in `vaelab.sklearn` with the other estimators. This module, the anomaly task (the one-class
protocol and the pictures of the `detect` and `one-class` commands, whose parsers and printing are in
vaelab.cli.anomaly), sits above both. It re-exports `AnomalyDetector` lazily and imports nothing heavy at the
top, because the CLI imports it when it builds the `detect` and `one-class` parsers.
"""

from __future__ import annotations

import os
from pathlib import Path

from vaelab.errors import ConfigError
from vaelab.evaluation.scores import (AUTO, SAMPLED, SCORE_CHOICES, SCORE_HELP, SCORES,  # noqa: F401
                                      anomaly_scores, auroc, latent_codes, latent_statistics, mahalanobis,
                                      score_problems)

# the built-in labelled datasets; any labelled file or folder that vaelab reads works too (see one_class)
ONE_CLASS_DATASETS = ("mnist", "fashion-mnist", "digits")
DETECTOR_KEY = "detector"  # the section of a run's config.json that holds a fitted detector

__all__ = ["SCORES", "AnomalyDetector", "anomaly_scores", "auroc", "latent_codes", "latent_statistics", "one_class",
           "format_table", "save_histogram", "save_roc"]


def __getattr__(name):
    if name == "AnomalyDetector":
        from vaelab.sklearn import AnomalyDetector

        return AnomalyDetector
    raise AttributeError(f"module 'vaelab.anomaly' has no attribute {name!r}")


# ==================================================================================== one-class protocol


def one_class_data(dataset, data_dir=None, *, progress: bool = False):
    """The train/test splits of a labelled dataset for the one-class protocol: a built-in name (mnist,
    fashion-mnist, digits) or anything `vaelab.data.load_dataset` reads with labels (an image folder with one
    sub-folder per class, with or without train/ and test/; an .npz with y, or y_train and y_test; a .csv with
    a label column). Data without explicit splits is split 90/10 by load_dataset's seeded permutation."""
    from vaelab.data import load_dataset

    name = str(dataset).strip()
    key = name.lower().replace("_", "-")
    data = load_dataset(key if key in ONE_CLASS_DATASETS else name, data_dir, progress=progress)
    if data.train.y is None or data.test.y is None:
        raise ConfigError(f"dataset={name!r} has no labels, so no class can be the normal one; give a labelled "
                          "dataset: an image folder with one sub-folder per class, an .npz with y (or y_train "
                          "and y_test), a .csv with a label column, or one of "
                          f"{list(ONE_CLASS_DATASETS)}", "one-class settings")
    return data


def class_index(value, classes: list[str] | None, n_classes: int) -> int | None:
    """The index of a normal class given as an index or a class name (None when it is neither)."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value if 0 <= value < n_classes else None
    text = str(value).strip()
    if classes and text in classes:
        return classes.index(text)
    try:
        k = int(text)
    except ValueError:
        return None
    return k if 0 <= k < n_classes else None


def one_class(dataset: str = "mnist", normal_class=None, model: str = "vae", *, data_dir=None,
              out=None, scores=SCORES, progress: bool = False, log=print, **params) -> dict:
    """The one-class protocol of Ruff et al. 2018: for each normal class, train a detector on that class of the
    training split, score the whole test split, and report the AUROC (in %) with the other classes as
    anomalies, for every score type in `scores` ("auto" included: the detector then chooses on held-out rows
    of the normal class).

    `dataset` is a built-in name or a labelled file or folder (see `one_class_data`). `normal_class` is a
    class index or name, or a list of them (None: every class). `params` are AnomalyDetector parameters
    (epochs=..., latent_dim=..., arch="mlp", ...). With `out`, each class's detector is saved to out/class-K
    (usable by `vaelab detect`) and the table to out/one-class.json.
    Returns {"dataset", "model", "params", "scores", "class_names", "classes": {K: {score: AUROC, ...}},
    "mean": {...}}.
    """
    import time

    import numpy as np

    from vaelab.sklearn import AnomalyDetector
    from vaelab.io import atomic_write_json

    data = one_class_data(dataset, data_dir, progress=progress)
    name = str(dataset).strip()
    n_classes = max(data.train.num_classes, data.test.num_classes)
    names = data.train.classes
    given = list(range(n_classes)) if normal_class is None else (
        list(normal_class) if isinstance(normal_class, (list, tuple)) else [normal_class])
    classes = [class_index(c, names, n_classes) for c in given]
    choices = f"{names}" if names else f"0..{n_classes - 1}"
    problems = [f"normal_class={g!r} is not a class of {name}; choose one of {choices}"
                for g, c in zip(given, classes) if c is None]
    problems += [p for s in scores for p in score_problems(model, s)]
    if problems:
        raise ConfigError(problems, "one-class settings")
    empty = [c for c in classes if not bool((data.train.y == c).any())]
    if empty:
        raise ConfigError([f"normal class {names[c] if names else c!r} has no rows in the training split of "
                           f"{name}; choose a class with training rows" for c in empty], "one-class settings")

    labels = data.test.y.numpy()
    one_sided = [c for c in classes if (labels != c).all() or (labels == c).all()]
    if one_sided:
        raise ConfigError([f"the test split of {name} holds {'no' if (labels != c).all() else 'only'} rows of "
                           f"class {names[c] if names else c!r}, so no AUROC can be computed; give a test split "
                           "with rows of the normal class and of others" for c in one_sided], "one-class settings")
    table: dict = {"dataset": name, "model": model, "params": {}, "scores": list(scores),
                   "class_names": names, "classes": {}}
    for c in classes:
        t0 = time.perf_counter()
        train = data.train.subset((data.train.y == c).nonzero().squeeze(1))
        first = AUTO if AUTO in scores else scores[0]  # an auto column needs the detector's own choice
        det = AnomalyDetector(model=model, score_type=first, **params).fit(train)
        t_fit = time.perf_counter() - t0
        found = det.anomaly_scores(data.test, kinds=scores)
        row = {s: round(100 * auroc(found[s], labels != c), 2) for s in scores}
        row.update({"n_train": len(train), "fit_s": round(t_fit, 1),
                    "score_s": round(time.perf_counter() - t0 - t_fit, 1)})
        if det.auto_choice_ is not None:
            row["auto_choice"] = det.auto_choice_
        table["classes"][str(c)] = row
        table["params"] = {k: list(v) if isinstance(v, tuple) else v for k, v in det.get_params().items()}
        if log is not None:
            log(f"class {c}{f' ({names[c]})' if names else ''}: " + "  ".join(f"{s} {row[s]:.2f}" for s in scores)
                + f"  ({len(train)} train rows, fit {t_fit:.0f} s)")
        if out is not None:
            det.save(Path(out) / f"class-{c}", normal_class=c)
    table["mean"] = {s: round(float(np.mean([r[s] for r in table["classes"].values()])), 2) for s in scores}
    if out is not None:
        atomic_write_json(Path(out) / "one-class.json", table)
    return table


def format_table(table: dict) -> str:
    """The one-class table as aligned text: one row per normal class, one column per score, then the mean."""
    scores = table["scores"]
    rows = [["class", *scores]]
    for c, r in table["classes"].items():
        rows.append([c, *(f"{r[s]:.2f}" for s in scores)])
    rows.append(["mean", *(f"{table['mean'][s]:.2f}" for s in scores)])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in rows)


# ============================================================================================ pictures


def _figure(width_in: float, height_in: float):
    import matplotlib

    matplotlib.use("Agg", force=False)  # file-only rendering; never opens a window
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_in, height_in), dpi=100)
    FigureCanvasAgg(fig)
    return fig


def _save_png(fig, path) -> str:
    import io

    from vaelab.io import atomic_write_bytes

    buf = io.BytesIO()
    fig.savefig(buf, format="png", bbox_inches="tight", facecolor="white")
    atomic_write_bytes(path, buf.getvalue())
    return os.fspath(path)


def save_histogram(score, threshold, path, is_anomaly=None, title: str = "Anomaly scores") -> str:
    """Histogram of anomaly scores with the threshold as a vertical line (split by label when given)."""
    import numpy as np

    fig = _figure(6.4, 4.0)
    ax = fig.add_subplot()
    bins = np.histogram_bin_edges(np.append(score, threshold), bins=min(60, max(10, len(score) // 20)))
    if is_anomaly is None:
        ax.hist(score, bins=bins, color="tab:blue", alpha=0.8, label="rows")
    else:
        ax.hist(score[~is_anomaly], bins=bins, color="tab:blue", alpha=0.6, label="normal (label)")
        ax.hist(score[is_anomaly], bins=bins, color="tab:red", alpha=0.6, label="anomalous (label)")
    ax.axvline(threshold, color="black", linestyle="--", label=f"threshold {threshold:.4g}")
    ax.set_xlabel("anomaly score (higher = more anomalous)")
    ax.set_ylabel("rows")
    ax.set_title(title)
    ax.legend()
    return _save_png(fig, path)


def save_roc(score, is_anomaly, path, title: str = "ROC") -> str:
    from sklearn.metrics import roc_curve

    fpr, tpr, _ = roc_curve(is_anomaly, score)
    fig = _figure(4.8, 4.8)
    ax = fig.add_subplot()
    ax.plot(fpr, tpr, color="tab:red", label=f"AUROC {100 * auroc(score, is_anomaly):.2f}")
    ax.plot([0, 1], [0, 1], color="gray", linestyle=":", label="chance")
    ax.set_xlabel("false-positive rate")
    ax.set_ylabel("true-positive rate")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.01)
    ax.set_title(title)
    ax.legend(loc="lower right")
    return _save_png(fig, path)
