"""`vaelab detect` and `vaelab one-class`: their parsers, and the commands that read the rows, threshold the
scores, write the files and print the results. The scores, the one-class protocol and the pictures are in
vaelab.anomaly (building these parsers imports nothing heavy)."""

from __future__ import annotations

import argparse
import os
import textwrap
from pathlib import Path

from vaelab.anomaly import (AUTO, DETECTOR_KEY, ONE_CLASS_DATASETS, SAMPLED, SCORE_CHOICES, SCORE_HELP, SCORES,
                            auroc, format_table, one_class, save_histogram, save_roc, score_problems)
from vaelab.cli.common import add_trust_code, fraction, print_written, sub
from vaelab.errors import ConfigError, DataError, VaelabError


# the help of these two commands keeps argparse's own layout (their text is laid out by hand)
_FORMATTER = argparse.RawDescriptionHelpFormatter


_SCORE_LINES = "\n        ".join(f"  {k:7s} {v}" for k, v in SCORE_HELP.items())


def add_detect_parser(subparsers) -> argparse.ArgumentParser:
    """The `vaelab detect` sub-command (imports nothing heavy)."""
    p = sub(subparsers, "detect", f"""
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
          vaelab detect runs/vae-rows --data new.csv --score iwae --samples 64 --fpr 0.01""", _FORMATTER)
    p.add_argument("run", metavar="RUN", help="a detector or run directory (config.json + model.safetensors)")
    p.add_argument("--data", metavar="NAME_OR_PATH", required=True,
                   help="rows to score: a .csv/.npy/.npz file or an image folder (all rows, in order), or a "
                        "built-in dataset name (its test split)")
    p.add_argument("--data-dir", metavar="DIR", default=None, help="folder holding the built-in datasets")
    p.add_argument("--score", choices=SCORE_CHOICES, default=None,
                   help="anomaly score [default: the detector's, else elbo for a VAE and recon otherwise]; "
                        "auto: the detector's own choice (a detector fitted with score auto)")
    p.add_argument("--samples", type=int, default=None, metavar="K",
                   help="posterior samples per row for elbo/iwae [default: the detector's, else 16]")
    group = p.add_mutually_exclusive_group()
    group.add_argument("--threshold", type=float, default=None, metavar="T",
                       help="flag rows whose anomaly score exceeds T")
    group.add_argument("--contamination", type=fraction, default=None, metavar="C",
                       help="flag the fraction C of the rows of --data with the highest scores")
    group.add_argument("--fpr", type=fraction, default=None, metavar="F",
                       help="threshold at the false-positive rate F on held-out normal data (plain runs)")
    p.add_argument("--normal-label", default=None, metavar="LABEL",
                   help="with labels other than 0/1: the label (index or class name) of normal rows "
                        "[default: the detector's normal class]")
    p.add_argument("--out", metavar="DIR", default=None, help="output folder [default RUN/detect-<data>]")
    add_trust_code(p)
    p.set_defaults(func=run_detect)
    return p


def add_one_class_parser(subparsers) -> argparse.ArgumentParser:
    """The `vaelab one-class` sub-command (imports nothing heavy)."""
    p = sub(subparsers, "one-class", """
        The one-class protocol of Ruff et al. 2018: train a detector on one class of the training split,
        score the whole test split (the other classes are the anomalies), and report the AUROC (%) of every
        anomaly score type. Without --normal-class, every class in turn, then the mean.

        --dataset is a built-in labelled dataset (mnist, fashion-mnist, digits) or any labelled data vaelab
        reads: an image folder with one sub-folder per class (with or without train/ and test/), an .npz with
        y (or x_train/y_train/x_test/y_test), a .csv with a label column. Without explicit splits, a seeded
        10% of the rows is the test split.

        Writes into --out: one-class.json (the table) and class-K/ (the detector of each class, usable by
        `vaelab detect class-K --data ...`).""", """
        examples:
          vaelab one-class --dataset mnist --normal-class 3 --model vae --out runs/oc3
          vaelab one-class --dataset fashion-mnist --epochs 20 --out runs/oc-fashion
          vaelab one-class --dataset ../shared/data/emoji --normal-class flags --arch conv --score auto""",
          _FORMATTER)
    p.add_argument("--dataset", default="mnist", metavar="NAME_OR_PATH",
                   help=f"a labelled dataset: {', '.join(ONE_CLASS_DATASETS)}, a folder of class sub-folders, "
                        "an .npz or .csv with labels [default mnist]")
    p.add_argument("--data-dir", metavar="DIR", default=None, help="folder holding the dataset files")
    p.add_argument("--normal-class", default=None, metavar="K",
                   help="the normal class, by index or name [default: every class in turn]")
    p.add_argument("--model", default="vae", metavar="NAME", help="a registered model [default vae]")
    p.add_argument("--score", choices=SCORE_CHOICES, default=None,
                   help="the detectors' threshold score [default combined]; the table "
                        "reports every score the model supports (and auto when it is chosen here)")
    p.add_argument("--arch", default="mlp", choices=("mlp", "conv", "conv-pool"),
                   help="[default mlp: on MNIST as good as conv for reconstruction scores, at a fifth of the CPU "
                        "time; conv gives the better latent score]")
    p.add_argument("--latent-dim", type=int, default=None, metavar="N", help="[default 16]")
    p.add_argument("--epochs", type=int, default=None, metavar="N", help="[default 30]")
    p.add_argument("--pixels", choices=("standardized", "raw"), default=None,
                   help="images: standardize each pixel by the normal class's mean and deviation, or keep them "
                        "in [0, 1] [default: AnomalyDetector's standardize_pixels]")
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
    scores = [s for s in SCORES if vae or s not in SAMPLED] + ([AUTO] if args.score == AUTO else [])
    first = args.score or "combined"  # the detectors' threshold score (AnomalyDetector's default), then the others
    if first not in scores:
        raise ConfigError(score_problems(args.model, first), "one-class settings")
    scores = [first] + [s for s in scores if s != first]  # auto, when asked, comes first: it is then fitted
    params = {"arch": args.arch, "n_samples": args.samples, "random_state": args.seed, "threads": args.threads}
    if args.latent_dim is not None:
        params["latent_dim"] = args.latent_dim
    if args.epochs is not None:
        params["epochs"] = args.epochs
    if args.pixels is not None:
        params["standardize_pixels"] = args.pixels == "standardized"
    out = Path(args.out or os.path.join("runs", f"one-class-{Path(str(args.dataset)).stem or 'data'}"))
    which = "every class" if args.normal_class is None else f"class {args.normal_class}"
    print(f"one-class {args.dataset}, {which}, model {args.model} ({args.arch}) -> {out}", flush=True)
    table = one_class(args.dataset, args.normal_class, args.model, data_dir=args.data_dir, out=out,
                      scores=tuple(scores), progress=True, log=lambda s: print(s, flush=True), **params)
    print(f"\nAUROC (%) on the {args.dataset} test split, normal class vs the rest:")
    print(textwrap.indent(format_table(table), "  "))
    print(f"\nwrote: {out / 'one-class.json'} and the detectors in {out}/class-K")
    return 0


def run_detect(args) -> int:
    from vaelab.io import read_config

    run = Path(args.run)
    if not run.is_dir():
        what = "is a file, not a directory" if run.exists() else "does not exist"
        raise VaelabError(f"RUN {args.run!r} {what}; give a detector directory (vaelab one-class --out "
                          "DIR/class-K) or the --out directory of a `vaelab train` run")
    if args.samples is not None and args.samples < 1:
        raise VaelabError(f"--samples must be a positive integer, got {args.samples}")
    cfg = read_config(run)
    if "series" in cfg:  # vaelab.timeseries.SERIES_KEY (importing it here would load torch)
        raise VaelabError(f"RUN {args.run!r} is a time-series detector (written by `vaelab series`); score a series "
                          f"with it by `vaelab series --detector {args.run} --data {args.data}`")
    rows, header = _read_rows(args.data, args.data_dir, cfg.get("data"))

    saved = DETECTOR_KEY in cfg
    det = _saved_detector(run, cfg, args) if saved else _detector_for_run(run, cfg, args, rows)
    if tuple(rows.sample_shape) != tuple(det.model_.config.input_shape):
        raise DataError(f"--data {args.data!r} holds rows of shape {tuple(rows.sample_shape)}, but the model in "
                        f"{args.run!r} takes {tuple(det.model_.config.input_shape)}; score data like its "
                        "training data")

    score = -det.score_samples(rows)  # anomaly score, higher = more anomalous
    threshold, how = _threshold(args, det, score, saved)
    flagged = score > threshold
    is_anomaly, labels = _anomaly_labels(rows, args.normal_label, cfg)
    out = Path(args.out) if args.out else run / f"detect-{Path(str(args.data)).stem}"
    summary = {"run": str(run), "data": str(args.data), "score": det.score_type, "n_samples": det.n_samples,
               "threshold": threshold, "threshold_from": how, "rows": int(len(score)),
               "flagged": int(flagged.sum())}
    written = _write_detect(out, rows, header, det, args.data, score, flagged, labels, is_anomaly, summary)

    print(f"scored {len(score)} rows of {args.data} with {det.score_type}; threshold {threshold:.6g} ({how})")
    print(f"flagged {int(flagged.sum())} rows ({100 * flagged.mean():.2f}%)")
    if "auroc" in summary:
        print(f"AUROC {summary['auroc']:.2f}% against the labels ({summary['anomalies_labelled']} anomalies)")
    print_written(written)
    return 0


def _saved_detector(run: Path, cfg: dict, args):
    """The detector saved in `run` (by one-class or AnomalyDetector.save), with --score and --samples applied."""
    from vaelab.sklearn import AnomalyDetector

    det = AnomalyDetector.load(run, trust_code=args.trust_code)
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
    return det


def _threshold(args, det, score, saved: bool) -> tuple[float, str]:
    """(threshold, where it came from): --threshold, --contamination, else the detector's own."""
    import numpy as np

    if args.threshold is not None:
        return float(args.threshold), "--threshold"
    if args.contamination is not None:
        return (float(np.quantile(score, 1 - args.contamination)),
                f"--contamination {args.contamination:g} of the scored rows")
    how = ("the detector's saved threshold" if saved
           else f"false-positive rate {args.fpr or 0.05:g} on the run's held-out test split")
    return -float(det.offset_), how


def _write_detect(out: Path, rows, header, det, data, score, flagged, labels, is_anomaly, summary: dict) -> list:
    """scores.csv, flagged.csv, histogram.png, roc.png (with labels of both kinds) and detect.json; completes
    `summary` with the AUROC and the counts against the labels."""
    from vaelab.io import atomic_write_json, atomic_write_text

    lines = ["row,anomaly_score,flagged" + (",label" if labels is not None else "")]
    for i, (s, f) in enumerate(zip(score, flagged)):
        lines.append(f"{i},{s:.9g},{int(f)}" + (f",{labels[i]}" if labels is not None else ""))
    atomic_write_text(out / "scores.csv", "\n".join(lines) + "\n")
    atomic_write_text(out / "flagged.csv", _flagged_csv(rows, header, score, flagged, labels))
    name = f"{det.model_.config.model} {det.score_type} on {Path(str(data)).name}"
    written = [out / "scores.csv", out / "flagged.csv",
               save_histogram(score, summary["threshold"], out / "histogram.png", is_anomaly,
                              title=f"Anomaly scores: {name}")]
    if is_anomaly is not None:
        if 0 < is_anomaly.sum() < len(is_anomaly):
            summary["auroc"] = round(100 * auroc(score, is_anomaly), 3)
            written.append(save_roc(score, is_anomaly, out / "roc.png", title=f"ROC: {name}"))
        summary.update({"anomalies_labelled": int(is_anomaly.sum()),
                        "true_positives": int((flagged & is_anomaly).sum()),
                        "false_positives": int((flagged & ~is_anomaly).sum())})
    atomic_write_json(out / "detect.json", summary)
    written.append(out / "detect.json")
    return written


def _saved_score(cfg: dict) -> str:
    return cfg[DETECTOR_KEY]["params"]["score_type"]


def _detector_for_run(run: Path, cfg: dict, args, rows):
    """A detector around the model of a plain `vaelab train` run. Its latent statistics come from the run's
    training split, and its threshold (unless --threshold or --contamination) from a false-positive rate on
    the run's test split: held-out data of the kind the model was trained on."""
    from vaelab.data import load_dataset, pixel_options
    from vaelab.models import MODELS
    from vaelab.sklearn import AnomalyDetector

    model_name = (cfg.get("model") or {}).get("model")
    score = args.score or ("elbo" if model_name in MODELS and MODELS[model_name].cls.capabilities.stochastic else "recon")
    det = AnomalyDetector(pretrained=str(run), score_type=score, n_samples=args.samples or 16,
                          trust_code=args.trust_code)
    needs_threshold = args.threshold is None and args.contamination is None
    dataset = (cfg.get("data") or {}).get("dataset")
    if not dataset:
        if needs_threshold:
            raise VaelabError(f"{run / 'config.json'} names no training dataset, whose held-out split would set "
                              "the threshold; give --contamination or --threshold")
        return det.fit(rows)  # the latent statistics of the scored rows themselves
    data_dir = args.data_dir if args.data_dir is not None else (cfg.get("data") or {}).get("data_dir")
    data = load_dataset(dataset, data_dir, progress=True, **pixel_options(cfg.get("data"), dataset))
    det.fit(_first(data.train, 10000))
    if needs_threshold:
        det.calibrate(_first(data.test, 10000), fpr=args.fpr or 0.05)
    return det


def _first(ds, n: int):
    import torch

    if len(ds) <= n:
        return ds
    return ds.subset(torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))[:n].sort().values)


def _read_rows(data: str, data_dir, saved_data: dict | None = None):
    """(ArrayDataset of every row in file order, column names or None) of a file, a folder, or a built-in
    dataset name (its test split). An image folder is read as the run read its own (saved_data: its config.json's
    data section; --image-size, --background)."""
    from vaelab.data import DATASETS, load_dataset, pixel_options
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
        loaded = files.load_image_folder(path, path.name, **pixel_options(saved_data))
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
