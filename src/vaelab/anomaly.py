"""Anomaly detection: per-sample anomaly scores, the one-class protocol, and the `detect` / `one-class` commands.

    from vaelab.anomaly import AnomalyDetector
    det = AnomalyDetector(model="vae", score_type="elbo", contamination=0.05).fit(X_normal)
    det.predict(X)            # +1 normal, -1 anomaly (scikit-learn's convention)
    det.score_samples(X)      # higher = more normal

    table = one_class("mnist", normal_class=3, model="vae", out="runs/oc3")   # AUROC per score type

Four anomaly scores (higher = more anomalous), each a function of one trained model:

  recon   reconstruction error: the registry loss's reconstruction NLL of the decoded posterior mean (nats)
  elbo    negative ELBO: the registry loss's -elbo with K posterior samples (reconstruction + KL, nats)
  iwae    importance-sampled negative log-likelihood -log p(x) ~ -log 1/K sum_k w_k (Burda et al. 2015)
  latent  squared Mahalanobis distance of the posterior mean to the training codes (Ledoit-Wolf covariance)

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

`AnomalyDetector` is a scikit-learn estimator and lives in `vaelab.sklearn` with the other estimators; it is
re-exported here lazily, because this module must import nothing heavy: the CLI builds its `detect` and
`one-class` parsers from it when answering `vaelab --help`.
"""

from __future__ import annotations

import argparse
import os
import textwrap
from pathlib import Path

from vaelab.errors import ConfigError, DataError, VaelabError

SCORES = ("recon", "elbo", "iwae", "latent")
SCORE_HELP = {
    "recon": "reconstruction error of the decoded posterior mean (nats)",
    "elbo": "negative ELBO, reconstruction + KL, K posterior samples (nats; VAEs)",
    "iwae": "importance-sampled negative log-likelihood with K samples (nats; VAEs)",
    "latent": "squared Mahalanobis distance of the posterior mean to the training codes",
}
SAMPLED = ("elbo", "iwae")  # scores that need a Gaussian posterior and a prior
ONE_CLASS_DATASETS = ("mnist", "fashion-mnist")
DETECTOR_KEY = "detector"  # the section of a run's config.json that holds a fitted detector

__all__ = ["SCORES", "AnomalyDetector", "anomaly_scores", "latent_codes", "latent_statistics", "one_class",
           "add_detect_parser", "run_detect", "add_one_class_parser", "run_one_class"]


def __getattr__(name):
    if name == "AnomalyDetector":
        from vaelab.sklearn import AnomalyDetector

        return AnomalyDetector
    raise AttributeError(f"module 'vaelab.anomaly' has no attribute {name!r}")


# ============================================================================================ the scores


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
                parts["recon"].append(recon_nll(x, model.reconstruct_raw(x), model.config.likelihood,
                                                model.config.gaussian_sigma))
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


# ==================================================================================== one-class protocol


def one_class(dataset: str = "mnist", normal_class=None, model: str = "vae", *, data_dir=None,
              out=None, scores=SCORES, progress: bool = False, log=print, **params) -> dict:
    """The one-class protocol of Ruff et al. 2018: for each normal class, train a detector on that class of the
    training split, score the whole test split, and report the AUROC (in %) with the other classes as
    anomalies, for every score type in `scores`.

    `normal_class` is a class index or a list of them (None: every class). `params` are AnomalyDetector
    parameters (epochs=..., latent_dim=..., arch="mlp", ...). With `out`, each class's detector is saved
    to out/class-K (usable by `vaelab detect`) and the table to out/one-class.json.
    Returns {"dataset", "model", "params", "scores", "classes": {K: {score: AUROC, ...}}, "mean": {...}}.
    """
    import time

    import numpy as np

    from vaelab.data import load_dataset
    from vaelab.sklearn import AnomalyDetector
    from vaelab.training.checkpoint import atomic_write_json

    name = str(dataset).strip().lower().replace("_", "-")
    if name not in ONE_CLASS_DATASETS:
        raise ConfigError(f"dataset={dataset!r} has no one-class protocol here; choose one of "
                          f"{list(ONE_CLASS_DATASETS)}", "one-class settings")
    data = load_dataset(name, data_dir, progress=progress)
    n_classes = data.train.num_classes
    classes = list(range(n_classes)) if normal_class is None else (
        [normal_class] if isinstance(normal_class, int) else list(normal_class))
    problems = [f"normal_class={c!r} is not a class of {name}; choose 0..{n_classes - 1}" for c in classes
                if not (isinstance(c, int) and 0 <= c < n_classes)]
    problems += [p for s in scores for p in score_problems(model, s)]
    if problems:
        raise ConfigError(problems, "one-class settings")

    labels = data.test.y.numpy()
    table: dict = {"dataset": name, "model": model, "params": {}, "scores": list(scores), "classes": {}}
    for c in classes:
        t0 = time.perf_counter()
        train = data.train.subset((data.train.y == c).nonzero().squeeze(1))
        det = AnomalyDetector(model=model, score_type=scores[0], **params).fit(train)
        t_fit = time.perf_counter() - t0
        found = det.anomaly_scores(data.test, kinds=scores)
        row = {s: round(100 * auroc(found[s], labels != c), 2) for s in scores}
        row.update({"n_train": len(train), "fit_s": round(t_fit, 1),
                    "score_s": round(time.perf_counter() - t0 - t_fit, 1)})
        table["classes"][str(c)] = row
        table["params"] = {k: list(v) if isinstance(v, tuple) else v for k, v in det.get_params().items()}
        if log is not None:
            log(f"class {c}: " + "  ".join(f"{s} {row[s]:.2f}" for s in scores)
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

    from vaelab.training.checkpoint import atomic_write_bytes

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


# ================================================================================================= CLI


def _fraction(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1, got {text!r}") from None
    if not 0.0 < v < 1.0:
        raise argparse.ArgumentTypeError(f"expected a number strictly between 0 and 1, got {text!r}")
    return v


def _sub(subparsers, name: str, summary: str, description: str, epilog: str):
    return subparsers.add_parser(name, help=summary, description=textwrap.dedent(description).strip(),
                                 epilog=textwrap.dedent(epilog).strip(),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)


_SCORE_LINES = "\n        ".join(f"  {k:7s} {v}" for k, v in SCORE_HELP.items())


def add_detect_parser(subparsers) -> argparse.ArgumentParser:
    """The `vaelab detect` sub-command (imports nothing heavy)."""
    p = _sub(subparsers, "detect", "score rows for anomalies and flag the anomalous ones", f"""
        Score every row of --data with the model of RUN and flag the anomalous ones. RUN is a detector saved by
        `vaelab one-class` or AnomalyDetector.save (its threshold and standardization are reused), or any
        `vaelab train` run directory.

        Writes into --out (default RUN/detect-<data name>):
          scores.csv      row, anomaly_score (higher = more anomalous), flagged (1/0)[, label]
          flagged.csv     the flagged rows (with their columns for tabular data)
          histogram.png   the score histogram with the threshold marked
          roc.png         the ROC curve (only when the data has labels)
          detect.json     threshold, counts, and the AUROC (with labels)

        The threshold, first match wins: --threshold; --contamination (flag that fraction of the rows of
        --data); --fpr (a false-positive rate on held-out normal data: the test split of the dataset a plain
        `vaelab train` run was trained on); the detector's saved threshold; --fpr 0.05 for a plain run.

        Labels (a 'label' column of a CSV, y of an .npz, class folders): with labels 0/1, 1 marks an anomaly
        (PyOD's convention); otherwise rows whose label differs from --normal-label are anomalies.

        scores (--score; higher = more anomalous):
        {_SCORE_LINES}""", """
        examples:
          vaelab detect runs/oc3/class-3 --data mnist
          vaelab detect runs/ae-rows --data rows.csv --contamination 0.02
          vaelab detect runs/vae-rows --data new.csv --score iwae --samples 64 --fpr 0.01""")
    p.add_argument("run", metavar="RUN", help="a detector or run directory (config.json + model.safetensors)")
    p.add_argument("--data", metavar="NAME_OR_PATH", required=True,
                   help="rows to score: a .csv/.npy/.npz file or an image folder (all rows, in order), or a "
                        "built-in dataset name (its test split)")
    p.add_argument("--data-dir", metavar="DIR", default=None, help="folder holding the built-in datasets")
    p.add_argument("--score", choices=SCORES, default=None,
                   help="anomaly score [default: the detector's, else elbo for a VAE and recon otherwise]")
    p.add_argument("--samples", type=int, default=None, metavar="K",
                   help="posterior samples per row for elbo/iwae [default: the detector's, else 16]")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--threshold", type=float, default=None, metavar="T",
                       help="flag rows whose anomaly score exceeds T")
    group.add_argument("--contamination", type=_fraction, default=None, metavar="C",
                       help="flag the fraction C of the rows of --data with the highest scores")
    group.add_argument("--fpr", type=_fraction, default=None, metavar="F",
                       help="threshold at the false-positive rate F on held-out normal data (plain runs)")
    p.add_argument("--normal-label", default=None, metavar="LABEL",
                   help="with labels other than 0/1: the label (index or class name) of normal rows "
                        "[default: the detector's normal class]")
    p.add_argument("--out", metavar="DIR", default=None, help="output folder [default RUN/detect-<data>]")
    p.set_defaults(func=run_detect)
    return p


def add_one_class_parser(subparsers) -> argparse.ArgumentParser:
    """The `vaelab one-class` sub-command (imports nothing heavy)."""
    p = _sub(subparsers, "one-class", "the one-class anomaly protocol on MNIST / Fashion-MNIST (AUROC)", """
        The one-class protocol of Ruff et al. 2018: train a detector on one class of the training split,
        score the whole test split (the other classes are the anomalies), and report the AUROC (%) of every
        anomaly score type. Without --normal-class, every class in turn, then the mean.

        Writes into --out: one-class.json (the table) and class-K/ (the detector of each class, usable by
        `vaelab detect class-K --data ...`).""", """
        examples:
          vaelab one-class --dataset mnist --normal-class 3 --model vae --out runs/oc3
          vaelab one-class --dataset fashion-mnist --epochs 20 --out runs/oc-fashion""")
    p.add_argument("--dataset", choices=ONE_CLASS_DATASETS, default="mnist", help="[default mnist]")
    p.add_argument("--data-dir", metavar="DIR", default=None, help="folder holding the dataset files")
    p.add_argument("--normal-class", type=int, default=None, metavar="K",
                   help="the normal class [default: every class in turn]")
    p.add_argument("--model", default="vae", metavar="NAME", help="a registered model [default vae]")
    p.add_argument("--score", choices=SCORES, default=None,
                   help="the detectors' threshold score [default elbo for a VAE, recon otherwise]; the table "
                        "reports every score the model supports")
    p.add_argument("--arch", default="mlp", choices=("mlp", "conv", "conv-pool"),
                   help="[default mlp: on MNIST as good as conv for reconstruction scores, at a fifth of the CPU "
                        "time; conv gives the better latent score]")
    p.add_argument("--latent-dim", type=int, default=None, metavar="N", help="[default 16]")
    p.add_argument("--epochs", type=int, default=None, metavar="N", help="[default 30]")
    p.add_argument("--samples", type=int, default=16, metavar="K",
                   help="posterior samples per row for elbo/iwae [default 16]")
    p.add_argument("--seed", type=int, default=0, metavar="N", help="[default 0]")
    p.add_argument("--threads", type=int, default=None, metavar="N", help="torch CPU threads [default torch's]")
    p.add_argument("--out", metavar="DIR", default=None, help="output folder [default runs/one-class-<dataset>]")
    p.set_defaults(func=run_one_class)
    return p


def run_one_class(args) -> int:
    from vaelab.models import MODELS

    if args.model not in MODELS:
        raise ConfigError(f"model={args.model!r} is not a registered model; choose one of {sorted(MODELS)}",
                          "one-class settings")
    vae = MODELS[args.model].cls.capabilities.stochastic
    scores = [s for s in SCORES if vae or s not in SAMPLED]
    first = args.score or ("elbo" if vae else "recon")  # the detectors' threshold score, then the others
    if first not in scores:
        raise ConfigError(score_problems(args.model, first), "one-class settings")
    scores = [first] + [s for s in scores if s != first]
    params = {"arch": args.arch, "n_samples": args.samples, "random_state": args.seed, "threads": args.threads}
    if args.latent_dim is not None:
        params["latent_dim"] = args.latent_dim
    if args.epochs is not None:
        params["epochs"] = args.epochs
    out = Path(args.out or os.path.join("runs", f"one-class-{args.dataset}"))
    which = "every class" if args.normal_class is None else f"class {args.normal_class}"
    print(f"one-class {args.dataset}, {which}, model {args.model} ({args.arch}) -> {out}", flush=True)
    table = one_class(args.dataset, args.normal_class, args.model, data_dir=args.data_dir, out=out,
                      scores=tuple(scores), progress=True, log=lambda s: print(s, flush=True), **params)
    print(f"\nAUROC (%) on the {args.dataset} test split, normal class vs the rest:")
    print(textwrap.indent(format_table(table), "  "))
    print(f"\nwrote: {out / 'one-class.json'} and the detectors in {out}/class-K")
    return 0


def run_detect(args) -> int:
    import numpy as np

    from vaelab.sklearn import AnomalyDetector
    from vaelab.training.checkpoint import atomic_write_json, atomic_write_text, read_config

    run = Path(args.run)
    if not run.is_dir():
        what = "is a file, not a directory" if run.exists() else "does not exist"
        raise VaelabError(f"RUN {args.run!r} {what}; give a detector directory (vaelab one-class --out "
                          "DIR/class-K) or the --out directory of a `vaelab train` run")
    if args.samples is not None and args.samples < 1:
        raise VaelabError(f"--samples must be a positive integer, got {args.samples}")
    cfg = read_config(run)
    rows, header = _read_rows(args.data, args.data_dir)

    saved = DETECTOR_KEY in cfg
    if saved:
        det = AnomalyDetector.load(run)
        changes = {}
        if args.score is not None and args.score != det.score_type:
            changes["score_type"] = args.score
        if args.samples is not None and args.samples != det.n_samples:
            changes["n_samples"] = args.samples
        det.set_params(**changes)
        if changes and args.threshold is None and args.contamination is None:
            raise VaelabError(f"the detector in {args.run!r} was calibrated for score={_saved_score(cfg)!r} with "
                              f"K={cfg[DETECTOR_KEY]['params']['n_samples']}; with other settings give "
                              "--contamination or --threshold")
        if args.fpr is not None:
            raise VaelabError(f"the detector in {args.run!r} set its threshold when it was fitted; override it "
                              "with --contamination or --threshold (--fpr needs the held-out normal data of a "
                              "plain run)")
    else:
        det = _detector_for_run(run, cfg, args, rows)
    if tuple(rows.sample_shape) != tuple(det.model_.config.input_shape):
        raise DataError(f"--data {args.data!r} holds rows of shape {tuple(rows.sample_shape)}, but the model in "
                        f"{args.run!r} takes {tuple(det.model_.config.input_shape)}; score data like its "
                        "training data")

    score = -det.score_samples(rows)  # anomaly score, higher = more anomalous
    if args.threshold is not None:
        threshold, how = float(args.threshold), "--threshold"
    elif args.contamination is not None:
        threshold = float(np.quantile(score, 1 - args.contamination))
        how = f"--contamination {args.contamination:g} of the scored rows"
    else:
        threshold = -float(det.offset_)
        how = ("the detector's saved threshold" if saved
               else f"false-positive rate {args.fpr or 0.05:g} on the run's held-out test split")
    flagged = score > threshold

    is_anomaly, labels = _anomaly_labels(rows, args.normal_label, cfg)
    out = Path(args.out) if args.out else run / f"detect-{Path(str(args.data)).stem}"
    lines = ["row,anomaly_score,flagged" + (",label" if labels is not None else "")]
    for i, (s, f) in enumerate(zip(score, flagged)):
        lines.append(f"{i},{s:.9g},{int(f)}" + (f",{labels[i]}" if labels is not None else ""))
    atomic_write_text(out / "scores.csv", "\n".join(lines) + "\n")
    atomic_write_text(out / "flagged.csv", _flagged_csv(rows, header, score, flagged, labels))
    name = f"{det.model_.config.model} {det.score_type} on {Path(str(args.data)).name}"
    written = [out / "scores.csv", out / "flagged.csv",
               save_histogram(score, threshold, out / "histogram.png", is_anomaly,
                              title=f"Anomaly scores: {name}")]
    summary = {"run": str(run), "data": str(args.data), "score": det.score_type, "n_samples": det.n_samples,
               "threshold": threshold, "threshold_from": how, "rows": int(len(score)),
               "flagged": int(flagged.sum())}
    if is_anomaly is not None:
        if 0 < is_anomaly.sum() < len(is_anomaly):
            summary["auroc"] = round(100 * auroc(score, is_anomaly), 3)
            written.append(save_roc(score, is_anomaly, out / "roc.png", title=f"ROC: {name}"))
        summary.update({"anomalies_labelled": int(is_anomaly.sum()),
                        "true_positives": int((flagged & is_anomaly).sum()),
                        "false_positives": int((flagged & ~is_anomaly).sum())})
    atomic_write_json(out / "detect.json", summary)
    written.append(out / "detect.json")

    print(f"scored {len(score)} rows of {args.data} with {det.score_type}; threshold {threshold:.6g} ({how})")
    print(f"flagged {int(flagged.sum())} rows ({100 * flagged.mean():.2f}%)")
    if "auroc" in summary:
        print(f"AUROC {summary['auroc']:.2f}% against the labels ({summary['anomalies_labelled']} anomalies)")
    print("wrote:")
    for path in written:
        print(f"  {path}")
    return 0


def _saved_score(cfg: dict) -> str:
    return cfg[DETECTOR_KEY]["params"]["score_type"]


def _detector_for_run(run: Path, cfg: dict, args, rows):
    """A detector around the model of a plain `vaelab train` run. Its latent statistics come from the run's
    training split, and its threshold (unless --threshold or --contamination) from a false-positive rate on
    the run's test split: held-out data of the kind the model was trained on."""
    from vaelab.data import load_dataset
    from vaelab.models import MODELS
    from vaelab.sklearn import AnomalyDetector

    model_name = (cfg.get("model") or {}).get("model")
    score = args.score or ("elbo" if model_name in MODELS and MODELS[model_name].cls.capabilities.stochastic else "recon")
    det = AnomalyDetector(pretrained=str(run), score_type=score, n_samples=args.samples or 16)
    needs_threshold = args.threshold is None and args.contamination is None
    dataset = (cfg.get("data") or {}).get("dataset")
    if not dataset:
        if needs_threshold:
            raise VaelabError(f"{run / 'config.json'} names no training dataset, whose held-out split would set "
                              "the threshold; give --contamination or --threshold")
        return det.fit(rows)  # the latent statistics of the scored rows themselves
    data_dir = args.data_dir if args.data_dir is not None else (cfg.get("data") or {}).get("data_dir")
    data = load_dataset(dataset, data_dir, progress=True)
    det.fit(_first(data.train, 10000))
    if needs_threshold:
        det.calibrate(_first(data.test, 10000), fpr=args.fpr or 0.05)
    return det


def _first(ds, n: int):
    import torch

    if len(ds) <= n:
        return ds
    return ds.subset(torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))[:n].sort().values)


def _read_rows(data: str, data_dir):
    """(ArrayDataset of every row in file order, column names or None) of a file, a folder, or a built-in
    dataset name (its test split)."""
    from vaelab.data import DATASETS, load_dataset
    from vaelab.data import files

    key = str(data).strip().lower().replace("_", "-")
    if key in DATASETS:
        return load_dataset(key, data_dir, progress=True).test, None
    path = Path(data).expanduser()
    if not path.exists():
        raise DataError(f"--data {data!r}: no such file or folder, and not a built-in dataset "
                        f"({', '.join(DATASETS)}); expected a .csv, .npy or .npz file or an image folder")
    suffix = path.suffix.lower()
    header = None
    if path.is_dir():
        loaded = files.load_image_folder(path, path.name)
    elif suffix == ".csv":
        loaded = files.load_csv(path, path.stem)
        header = _csv_header(path)
    elif suffix == ".npy":
        loaded = files.load_npy(path, path.stem)
    elif suffix == ".npz":
        loaded = files.load_npz(path, path.stem)
    else:
        raise DataError(f"--data {data!r}: unsupported kind of file {suffix or '(no suffix)'!r}; expected a "
                        ".csv, .npy or .npz file or an image folder")
    if isinstance(loaded, tuple):  # explicit train/test splits: score the test rows
        loaded = loaded[1]
    return loaded, header


def _csv_header(path: Path):
    import csv

    with open(path, newline="", encoding="utf-8-sig") as f:
        first = next(csv.reader(f), [])
    try:
        [float(c) for c in first]
        return None
    except ValueError:
        return [c.strip() for c in first if c.strip().lower() not in ("label", "y")]


def _anomaly_labels(rows, normal_label, cfg: dict):
    """(is_anomaly bool array or None, printable labels or None) of the scored rows."""
    import numpy as np

    if rows.y is None:
        if normal_label is not None:
            raise DataError("--normal-label was given but --data has no labels (a 'label' column, y in an .npz, "
                            "or class folders)")
        return None, None
    y = rows.y.numpy()
    names = rows.classes
    printable = [names[i] for i in y] if names else [int(v) for v in y]
    if normal_label is None:
        normal_label = (cfg.get(DETECTOR_KEY) or {}).get("normal_class")
    if normal_label is None:
        if set(np.unique(y)) <= {0, 1} and not names:
            return y == 1, printable  # PyOD's convention: 1 marks an outlier
        raise DataError(f"--data has labels {sorted(set(printable))[:10]}; say which one marks normal rows with "
                        "--normal-label")
    text = str(normal_label)
    if names and text in names:
        normal = names.index(text)
    else:
        try:
            normal = int(text)
        except ValueError:
            raise DataError(f"--normal-label {text!r} is not one of the labels "
                            f"{names or sorted(set(printable))}") from None
    return y != normal, printable


def _flagged_csv(rows, header, score, flagged, labels) -> str:
    import numpy as np

    idx = np.flatnonzero(flagged)
    idx = idx[np.argsort(-score[idx], kind="stable")]  # most anomalous first
    tabular = not rows.is_image
    cols = ["row", "anomaly_score"] + (["label"] if labels is not None else [])
    if tabular:
        cols += header if header and len(header) == rows.sample_shape[0] else \
            [f"x{j}" for j in range(rows.sample_shape[0])]
    lines = [",".join(cols)]
    x = rows.to_float().numpy() if tabular and len(idx) else None
    for i in idx:
        cells = [str(int(i)), f"{score[i]:.9g}"] + ([str(labels[i])] if labels is not None else [])
        if tabular:
            cells += [f"{v:.9g}" for v in x[i]]
        lines.append(",".join(cells))
    return "\n".join(lines) + "\n"
