"""vaelab's anomaly detectors against PyOD's, on the same train/test splits of real data.

    pip install -c constraints.txt --no-deps pyod numba llvmlite      # the bench extra, beside torch 2.13.0
    python benchmarks/anomaly_vs_pyod.py                               # the documented quick protocol
    python benchmarks/anomaly_vs_pyod.py --full                        # every class, every training row
    python benchmarks/anomaly_vs_pyod.py --datasets wbc,wine --seeds 1 # a subset

Detectors (PyOD's at their default settings, as a user runs them; random ones seeded):
  vaelab          AnomalyDetector as `vaelab one-class` runs it, at its defaults: an MLP VAE (hidden 256 for
                  images, 64 for tables; latent 16 / min(2, D/2)), Gaussian likelihood, pixels and columns
                  standardized, 20% of the rows held out to standardize the parts of its default score
                  combined. The other vaelab-<score> columns are the other scores of the same trained model.
  vaelab-auto     AnomalyDetector(score_type="auto"): 20% of the training rows held out, the score chosen
                  on them against pseudo-anomalies made of them (never on test labels).
  ECOD, IForest, KNN, LOF, OCSVM, COPOD, AutoEncoder, VAE: pyod.models.*, defaults.

Data (all offline): images are flattened for PyOD, pixels in [0, 1]; tables are standardised with the
training rows' mean and deviation for PyOD (vaelab standardises them itself).
  wbc             scikit-learn's breast cancer: every benign row and a seeded subsample of malignant ones
                  making 10% of the set (the WBC protocol of ODDS); a seeded stratified 60/40 split;
                  unsupervised: the detectors train on the contaminated 60%, are scored on the 40%.
  digits, wine    scikit-learn's sets, one-vs-rest: a seeded stratified 70/30 split; each class in turn is
                  normal: train on its rows of the 70%, score the whole 30% (the other classes are anomalies).
  emoji           ../shared/data/emoji, each of its 9 categories in turn as normal: train on that category's
                  train/ images, score all 190 test/ images.
  mnist, fashion-mnist  one-class (Ruff et al. 2018). Quick protocol (to fit a two-core CPU's time budget):
                  normal classes 0, 4, 8 (--classes), 1000 training images of the class (a seeded
                  subsample), a fixed seeded 2000 of the 10,000 test images. --full: every class, every
                  training image of it, all test images.

3 seeds (vaelab, IForest, AutoEncoder and VAE are retrained per seed; on wbc, digits and wine the seed also
draws the split, so every detector sees 3 splits). Reports per dataset the mean AUROC and average precision
(%, anomalies positive) over classes and seeds, mean fit and score seconds, and each detector's mean rank
(by AUROC, rank 1 best) over the image sets, the tabular sets and all. Writes
benchmarks/results/anomaly-vs-pyod.json and prints the tables. Parts run in separate processes merge into one
file with --merge a.json b.json (the summary is recomputed from their runs). --keep-from OLD.json with
--detectors vaelab,vaelab-auto reruns vaelab's detectors only and carries PyOD's results over from OLD.json,
task by task (the splits are seeded, so the rows are the same).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
import warnings
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from vaelab.io import atomic_write_json  # noqa: E402

IMAGE_SETS = ("emoji", "mnist", "fashion-mnist")
TABULAR_SETS = ("wbc", "digits", "wine")
PYOD = ("ECOD", "IForest", "KNN", "LOF", "OCSVM", "COPOD", "AutoEncoder", "VAE")
VAELAB_SCORES = ("combined", "elbo", "recon", "latent", "gmm", "zrecon")  # first: the default detector's score
RANDOM = ("IForest", "AutoEncoder", "VAE")  # PyOD detectors whose training draws random numbers


# ============================================================================================ data


class Task:
    """One train/test split: train rows (unlabelled), test rows, which test rows are anomalies."""

    def __init__(self, dataset: str, name: str, train, test, is_anomaly: np.ndarray, image: bool):
        self.dataset, self.name, self.train, self.test = dataset, name, train, test
        self.is_anomaly, self.image = is_anomaly.astype(bool), image


def _stratified(y: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(y))
    return train_test_split(idx, test_size=test_fraction, stratify=y, random_state=seed)


def tabular_tasks(name: str, seed: int) -> list[Task]:
    from sklearn.datasets import load_breast_cancer, load_digits, load_wine

    if name == "wbc":
        d = load_breast_cancer()
        benign, malignant = np.flatnonzero(d.target == 1), np.flatnonzero(d.target == 0)
        rng = np.random.RandomState(seed)
        n_bad = round(len(benign) / 9)  # 10% of the set
        keep = np.r_[benign, rng.choice(malignant, n_bad, replace=False)]
        x, bad = d.data[keep], np.r_[np.zeros(len(benign), bool), np.ones(n_bad, bool)]
        tr, te = _stratified(bad, 0.4, seed)
        return [Task(name, "malignant", x[tr], x[te], bad[te], False)]
    d = {"digits": load_digits, "wine": load_wine}[name]()
    x, y = d.data.astype(np.float64), d.target
    tr, te = _stratified(y, 0.3, seed)
    return [Task(name, str(c), x[tr][y[tr] == c], x[te], y[te] != c, False) for c in np.unique(y)]


def image_tasks(name: str, data_dir: str, full: bool, classes=(0, 4, 8), seed_split: int = 0) -> list[Task]:
    import torch

    from vaelab.data import load_dataset

    data = load_dataset(str(Path(data_dir) / "emoji") if name == "emoji" else name, data_dir, progress=False)
    train, test = data.train, data.test
    classes = range(train.num_classes) if (full or name == "emoji") else classes
    if not full and name != "emoji":
        pick = np.random.RandomState(seed_split).permutation(len(test))[:2000]
        test = test.subset(torch.from_numpy(np.sort(pick)))
    y_train, y_test = train.y.numpy(), test.y.numpy()
    tasks = []
    for c in classes:
        rows = np.flatnonzero(y_train == c)
        if not full and name != "emoji":
            rows = np.sort(np.random.RandomState(seed_split + c).permutation(rows)[:1000])
        label = train.classes[c] if train.classes else str(c)
        tasks.append(Task(name, label, train.subset(torch.from_numpy(rows)), test, y_test != c, True))
    return tasks


def _flat(data) -> np.ndarray:
    """An image ArrayDataset as PyOD takes it: (N, C*H*W) float pixels in [0, 1]."""
    return data.to_float().flatten(1).double().numpy()


# ======================================================================================= detectors


def pyod_detector(name: str, seed: int):
    from pyod.models import auto_encoder, copod, ecod, iforest, knn, lof, ocsvm, vae

    return {"ECOD": lambda: ecod.ECOD(), "IForest": lambda: iforest.IForest(random_state=seed),
            "KNN": lambda: knn.KNN(), "LOF": lambda: lof.LOF(), "OCSVM": lambda: ocsvm.OCSVM(),
            "COPOD": lambda: copod.COPOD(),
            "AutoEncoder": lambda: auto_encoder.AutoEncoder(random_state=seed, verbose=0),
            "VAE": lambda: vae.VAE(random_state=seed, verbose=0)}[name]()


def run_task(task: Task, seed: int, detectors: list[str], threads: int, first_seed: bool) -> dict:
    """{detector: {"auroc", "ap", "fit_s", "score_s"}} on one task and seed."""
    from sklearn.metrics import average_precision_score, roc_auc_score

    from vaelab.sklearn import AnomalyDetector

    out = {}

    def record(name, score, fit_s, score_s, **extra):
        out[name] = {"auroc": 100 * roc_auc_score(task.is_anomaly, score),
                     "ap": 100 * average_precision_score(task.is_anomaly, score),
                     "fit_s": fit_s, "score_s": score_s, **extra}

    base = dict(arch="mlp", random_state=seed, threads=threads)
    if "vaelab" in detectors:
        t0 = time.perf_counter()
        det = AnomalyDetector(**base).fit(task.train)
        t1 = time.perf_counter()
        found = det.anomaly_scores(task.test, kinds=VAELAB_SCORES)
        t2 = time.perf_counter()
        for k in VAELAB_SCORES:
            record("vaelab" if k == det.score_type else f"vaelab-{k}", found[k], t1 - t0, t2 - t1)
    if "vaelab-auto" in detectors:
        t0 = time.perf_counter()
        det = AnomalyDetector(score_type="auto", **base).fit(task.train)
        t1 = time.perf_counter()
        score = -det.score_samples(task.test)
        record("vaelab-auto", score, t1 - t0, time.perf_counter() - t1, choice=det.auto_choice_)

    if task.image:
        x_train, x_test = _flat(task.train), _flat(task.test)
    else:  # PyOD's detectors get standardised columns (the training rows' statistics), as a careful user does
        mean, std = task.train.mean(0), task.train.std(0)
        std[std == 0] = 1.0
        x_train, x_test = (task.train - mean) / std, (task.test - mean) / std
    for name in PYOD:
        if name not in detectors or (name not in RANDOM and not first_seed and task.image):
            continue  # deterministic on a fixed split: once
        model = pyod_detector(name, seed)
        t0 = time.perf_counter()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model.fit(x_train)
            t1 = time.perf_counter()
            score = model.decision_function(x_test)  # higher = more anomalous
        record(name, score, t1 - t0, time.perf_counter() - t1)
    return out


# ========================================================================================= summary


def summarize(runs: list[dict], datasets: list[str]) -> dict:
    """Per dataset and detector: mean AUROC, AP, fit and score seconds over classes and seeds; the ranks."""
    per: dict = {}
    for r in runs:
        for det, m in r["detectors"].items():
            per.setdefault(r["dataset"], {}).setdefault(det, []).append(m)
    table = {ds: {det: {k: round(float(np.mean([m[k] for m in ms])), 2 if k in ("auroc", "ap") else 3)
                        for k in ("auroc", "ap", "fit_s", "score_s")} | {"runs": len(ms)}
                  for det, ms in dets.items()}
             for ds, dets in per.items()}
    ranks: dict = {}
    for ds, dets in table.items():
        order = sorted(dets, key=lambda d: -dets[d]["auroc"])
        values = [dets[d]["auroc"] for d in order]
        for d in order:  # ties share the mean of their ranks
            tied = [i + 1 for i, v in enumerate(values) if v == dets[d]["auroc"]]
            ranks.setdefault(d, {})[ds] = float(np.mean(tied))
    mean_rank = {}
    for group, members in (("images", IMAGE_SETS), ("tabular", TABULAR_SETS), ("all", IMAGE_SETS + TABULAR_SETS)):
        present = [ds for ds in members if ds in table]
        if present:
            mean_rank[group] = {d: round(float(np.mean([ranks[d][ds] for ds in present if ds in ranks[d]])), 2)
                                for d in ranks}
    return {"per_dataset": table, "ranks": ranks, "mean_rank": mean_rank}


def format_tables(summary: dict) -> str:
    table, mean_rank = summary["per_dataset"], summary["mean_rank"]
    datasets = list(table)
    dets = sorted({d for t in table.values() for d in t},
                  key=lambda d: mean_rank.get("all", {}).get(d, 99))
    lines = ["AUROC % / average precision % (mean over classes and seeds); mean rank by AUROC",
             "detector".ljust(16) + "".join(f"{ds:>16s}" for ds in datasets)
             + "".join(f"{'rank ' + g:>14s}" for g in mean_rank)]
    for d in dets:
        cells = [f"{table[ds][d]['auroc']:6.1f} / {table[ds][d]['ap']:5.1f}" if d in table[ds] else "-"
                 for ds in datasets]
        lines.append(d.ljust(16) + "".join(f"{c:>16s}" for c in cells)
                     + "".join(f"{mean_rank[g].get(d, float('nan')):14.2f}" for g in mean_rank))
    lines += ["", "fit s / score s per task (mean)",
              "detector".ljust(16) + "".join(f"{ds:>16s}" for ds in datasets)]
    for d in dets:
        cells = [f"{table[ds][d]['fit_s']:6.2f} / {table[ds][d]['score_s']:5.2f}" if d in table[ds] else "-"
                 for ds in datasets]
        lines.append(d.ljust(16) + "".join(f"{c:>16s}" for c in cells))
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--datasets", default=",".join(TABULAR_SETS + IMAGE_SETS),
                   help=f"comma-separated, of {', '.join(TABULAR_SETS + IMAGE_SETS)} [default all]")
    p.add_argument("--detectors", default=",".join(("vaelab", "vaelab-auto") + PYOD))
    p.add_argument("--seeds", type=int, default=3, help="[default 3]")
    p.add_argument("--full", action="store_true", help="MNIST and Fashion-MNIST: every class, all rows")
    p.add_argument("--classes", default="0,4,8", help="MNIST and Fashion-MNIST normal classes [default 0,4,8]")
    p.add_argument("--merge", nargs="+", metavar="JSON", default=None,
                   help="instead of running: merge the runs of these result files into --out")
    p.add_argument("--keep-from", metavar="JSON", default=None,
                   help="take the detectors not run now (--detectors) from this earlier result file, task by task "
                        "(same dataset, normal class and seed: the splits are seeded, so they are the same rows)")
    p.add_argument("--data-dir", default=os.environ.get("VAELAB_DATA") or str(REPO.parent / "shared" / "data"))
    p.add_argument("--threads", type=int, default=1, help="torch threads [default 1: fastest on a shared CPU]")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "anomaly-vs-pyod.json"))
    args = p.parse_args(argv)

    if args.merge:
        parts = [json.loads(Path(f).read_text()) for f in args.merge]
        runs = [r for part in parts for r in part["runs"]]
        datasets = [d for part in parts for d in part["protocol"]["datasets"]]
        summary = summarize(runs, datasets)
        result = {"machine": parts[0]["machine"], "protocol": {**parts[0]["protocol"], "datasets": datasets,
                                                               "parts": [part["protocol"] for part in parts]},
                  "seconds": round(sum(part["seconds"] for part in parts), 1), **summary, "runs": runs}
        print(format_tables(summary))
        atomic_write_json(args.out, result)
        print(f"\nwrote {args.out}")
        return 0

    import pyod
    import torch

    torch.set_num_threads(args.threads)  # PyOD's AutoEncoder and VAE run on the same torch
    datasets = [d.strip() for d in args.datasets.split(",") if d.strip()]
    unknown = [d for d in datasets if d not in TABULAR_SETS + IMAGE_SETS]
    if unknown:
        p.error(f"unknown dataset(s) {unknown}; choose among {list(TABULAR_SETS + IMAGE_SETS)}")
    detectors = [d.strip() for d in args.detectors.split(",") if d.strip()]
    classes = [int(c) for c in args.classes.split(",")]
    kept = {}
    if args.keep_from:
        for r in json.loads(Path(args.keep_from).read_text())["runs"]:
            kept[(r["dataset"], r["normal"], r["seed"])] = {d: m for d, m in r["detectors"].items()
                                                           if d.split("-")[0] != "vaelab" and d not in detectors}
    runs, t_start = [], time.perf_counter()
    for ds in datasets:
        fixed = None if ds in TABULAR_SETS else image_tasks(ds, args.data_dir, args.full, classes)
        for seed in range(args.seeds):
            tasks = fixed if fixed is not None else tabular_tasks(ds, seed)
            for task in tasks:
                t0 = time.perf_counter()
                found = run_task(task, seed, detectors, args.threads, seed == 0)
                found.update(kept.get((ds, task.name, seed), {}))
                runs.append({"dataset": ds, "normal": task.name, "seed": seed, "n_train": len(task.train),
                             "n_test": len(task.is_anomaly), "anomalies": int(task.is_anomaly.sum()),
                             "detectors": {d: {k: (round(v, 4) if isinstance(v, float) else v)
                                               for k, v in m.items()} for d, m in found.items()}})
                best = max(found, key=lambda d: found[d]["auroc"])
                print(f"{ds} normal={task.name} seed={seed}: vaelab {found.get('vaelab', {}).get('auroc', 0):.1f}"
                      f" auto {found.get('vaelab-auto', {}).get('auroc', 0):.1f}"
                      f" ({found.get('vaelab-auto', {}).get('choice')}), best {best} {found[best]['auroc']:.1f}"
                      f" [{time.perf_counter() - t0:.0f} s, {time.perf_counter() - t_start:.0f} s total]",
                      flush=True)
    summary = summarize(runs, datasets)
    result = {"machine": {"python": platform.python_version(), "torch": torch.__version__, "pyod": pyod.__version__,
                          "cpus": os.cpu_count(), "threads": args.threads},
              "protocol": {"datasets": datasets, "seeds": args.seeds, "full": args.full,
                           "kept_from": args.keep_from and {
                               "file": Path(args.keep_from).name,
                               "detectors": sorted({d for v in kept.values() for d in v})},
                           "quick": None if args.full else f"mnist/fashion-mnist: classes {args.classes}; 1000 "
                                                           "training images per class; 2000 test images"},
              "seconds": round(time.perf_counter() - t_start, 1), **summary, "runs": runs}
    print("\n" + format_tables(summary))
    atomic_write_json(args.out, result)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
