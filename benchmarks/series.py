"""Anomalies in a multivariate time series (issue 24, part 3): vaelab's window detectors against window baselines
on a generated sensor log with injected anomalies of known position and shape.

    python benchmarks/series.py                     # seeds 0 1 2 (about a minute a seed on one thread)
    python benchmarks/series.py --seeds 0 --threads 1
    pip install --no-deps sktime==1.2.0             # for the real series (its data files only; never imported)

Data (vaelab.timeseries.synthetic_series): three coupled periodic channels with noise; the detectors fit on 4,000
rows of normal operation (train seed 10 s) and score a 2,000-row log (seed 10 s + 1) holding four anomalies,
labelled row by row: a 5-row spike on one channel, a 60-row level shift on another, an 80-row frequency change
on the third, and a 60-row stretch of the first running backwards.

Contenders, all on the same windows (64 rows every 4), the same per-timestamp folding (the mean over the windows
that cover a row) and the same threshold (the 99% quantile of the scores of the held-out last 20% of the training
series):
  vaelab ae / vae   SeriesDetector with its defaults (a 1-D conv autoencoder of latent 8, 64-row windows; the
                    score is the reconstruction error, per row)
  vaelab ae 4       the same with a code of 4 (a narrower bottleneck reconstructs less of an anomaly; chosen on
                    a validation log of other seeds, 50 and 51: AP 92 against 82 for latent 8)
  iforest           scikit-learn's IsolationForest on the flattened windows (one score per window)
  knn               the mean distance to the 5 nearest training windows (flattened)
  zscore            no windows: a row's largest |z| over the channels (the per-channel rule a dashboard uses)

Real series (when sktime is installed: two labelled anomaly series it ships as package data,
sktime/datasets/data/*/*.csv, BSD-3; their folder names say where they come from, which sktime does not document):
  mitdb   7,500 rows of one ECG channel ("mitdb": the MIT-BIH arrhythmia database), one labelled stretch of 352
          rows (6936..7287); fit on rows 0..4999 (all normal), score rows 5000..7499. Windows of 256 rows (a bit
          more than one heartbeat) every 16.
  yahoo   1,000 hourly rows of one metric ("yahoo": Yahoo's S5 anomaly set), 7 labelled single-row anomalies
          (the first at row 431); fit on rows 0..419 (all normal), score rows 420..999. Windows of 32 rows (a bit
          more than a day) every row.
The window is fixed by that rule (a little more than one cycle of the signal), not tuned on the labels; the
detectors are the same, 3 seeds for the random ones.

Per detector: AUROC and average precision of the per-timestamp score against the row labels, the fraction of
each anomaly's rows flagged at the threshold, the fraction of rows flagged more than a window away from every
anomaly (false alarms), fit and score seconds. Prints the table, writes benchmarks/results/series.json.
"""

from __future__ import annotations

import argparse
import platform
import statistics
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

import torch  # noqa: E402
from sklearn.metrics import average_precision_score, roc_auc_score  # noqa: E402

from vaelab.io import atomic_write_json  # noqa: E402
from vaelab.timeseries import (INJECTED, SeriesDetector, fold_windows, synthetic_series, window_starts,  # noqa: E402
                               windows)

WINDOW, STRIDE, FPR, HELD = 64, 4, 0.01, 0.2
# real series: (folder and file in sktime's package data, training rows, window, stride)
REAL = {"mitdb": ("mitdb/mitdb.csv", 5000, 256, 16), "yahoo": ("yahoo/yahoo.csv", 420, 32, 1)}


def folded(window_scores: np.ndarray, starts: np.ndarray, rows: int, window: int) -> np.ndarray:
    """Per-row scores from per-window ones: the mean over the windows that cover each row (SeriesDetector's
    folding, vaelab.timeseries.fold_windows)."""
    total, count = torch.zeros(rows, dtype=torch.float64), torch.zeros(rows, dtype=torch.float64)
    fold_windows(torch.from_numpy(np.repeat(window_scores[:, None], window, axis=1)), starts, total, count)
    return (total / count).numpy()


class WindowBaseline:
    """A detector of flattened windows (fit on the training part, threshold on the held-out part, like
    SeriesDetector), with score_timestamps(values) -> (T,)."""

    def __init__(self, kind: str, seed: int, window: int = WINDOW, stride: int = STRIDE):
        self.kind, self.seed, self.window, self.stride = kind, seed, window, stride

    def _windows(self, z: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        starts = window_starts(len(z), self.window, self.stride)
        return windows(torch.from_numpy(z), self.window, starts).reshape(len(starts), -1).numpy(), starts

    def fit(self, values: np.ndarray):
        n_train = len(values) - int(round(len(values) * HELD))
        self.mean, self.std = values[:n_train].mean(0), np.where(values[:n_train].std(0) > 0, values[:n_train].std(0), 1)
        train, _ = self._windows((values[:n_train] - self.mean) / self.std)
        if self.kind == "iforest":
            from sklearn.ensemble import IsolationForest

            self.model = IsolationForest(random_state=self.seed).fit(train)
        elif self.kind == "knn":
            from sklearn.neighbors import NearestNeighbors

            self.model = NearestNeighbors(n_neighbors=5).fit(train)
        self.threshold_ = float(np.quantile(self.score_timestamps(values[n_train:]), 1 - FPR))
        return self

    def score_timestamps(self, values: np.ndarray) -> np.ndarray:
        z = (values - self.mean) / self.std
        if self.kind == "zscore":
            return np.abs(z).max(axis=1)
        w, starts = self._windows(z)
        s = -self.model.score_samples(w) if self.kind == "iforest" else self.model.kneighbors(w)[0].mean(axis=1)
        return folded(s, starts, len(values), self.window)


def measure(name: str, make, train, log, window: int = WINDOW) -> dict:
    t0 = time.perf_counter()
    det = make().fit(train.values)
    t_fit = time.perf_counter() - t0
    t0 = time.perf_counter()
    score = det.score_timestamps(log.values)
    t_score = time.perf_counter() - t0
    flagged = score > det.threshold_
    out = {"detector": name, "auroc": round(100 * roc_auc_score(log.labels, score), 2),
           "ap": round(100 * average_precision_score(log.labels, score), 2), "fit_s": round(t_fit, 2),
           "score_s": round(t_score, 2), "flagged_anomalous": int(flagged[log.labels == 1].sum()),
           "flagged_normal": int(flagged[log.labels == 0].sum())}
    if log.name.startswith("synthetic"):
        far = np.ones(len(log), dtype=bool)
        for first, n, _, _ in INJECTED:
            far[max(0, first - window):first + n + window] = False
        out["found"] = {kind: round(float(flagged[first:first + n].mean()), 3) for first, n, _, kind in INJECTED}
        out["false_alarms"] = round(float(flagged[far].mean()), 4)
    return out


def real_series() -> dict:
    """{name: (train Series, scored Series, window, stride)} of the REAL series, or {} without sktime."""
    import importlib.util

    from vaelab.timeseries import Series, read_series

    spec = importlib.util.find_spec("sktime")  # finds the package's folder without importing it
    if spec is None or spec.origin is None:
        return {}
    out = {}
    for name, (path, n_train, window, stride) in REAL.items():
        s = read_series(Path(spec.origin).parent / "datasets" / "data" / path)
        out[name] = (Series(s.values[:n_train], s.columns, name=name),
                     Series(s.values[n_train:], s.columns, labels=s.labels[n_train:], name=name), window, stride)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--seeds", type=lambda t: [int(v) for v in t.split(",")], default=[0, 1, 2])
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--no-real", action="store_true", help="skip the real series (sktime's package data)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "series.json"))
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    contenders = {
        "vaelab ae": lambda s: (lambda: SeriesDetector(WINDOW, STRIDE, fpr=FPR, validation_fraction=HELD,
                                                       random_state=s, threads=args.threads)),
        "vaelab vae": lambda s: (lambda: SeriesDetector(WINDOW, STRIDE, model="vae", fpr=FPR,
                                                        validation_fraction=HELD, random_state=s,
                                                        threads=args.threads)),
        "vaelab ae 4": lambda s: (lambda: SeriesDetector(WINDOW, STRIDE, latent_dim=4, fpr=FPR,
                                                         validation_fraction=HELD, random_state=s,
                                                         threads=args.threads)),
        "iforest": lambda s: (lambda: WindowBaseline("iforest", s)),
        "knn": lambda s: (lambda: WindowBaseline("knn", s)),
        "zscore": lambda s: (lambda: WindowBaseline("zscore", s)),
    }
    rows = []
    real = {} if args.no_real else real_series()
    for name, (train, log, w, st) in real.items():
        for seed in args.seeds:
            for det, make in {
                    "vaelab ae": lambda: SeriesDetector(w, st, fpr=FPR, validation_fraction=HELD, random_state=seed,
                                                        threads=args.threads),
                    "iforest": lambda: WindowBaseline("iforest", seed, w, st),
                    "knn": lambda: WindowBaseline("knn", seed, w, st),
                    "zscore": lambda: WindowBaseline("zscore", seed, w, st)}.items():
                if det in ("knn", "zscore") and seed != args.seeds[0]:
                    continue  # deterministic: once
                r = {"data": name, "seed": seed, **measure(det, make, train, log, w)}
                rows.append(r)
                print(f"{name} seed {seed} {det:11s} AUROC {r['auroc']:6.2f}  AP {r['ap']:6.2f}  flagged "
                      f"{r['flagged_anomalous']} of {int(log.labels.sum())} anomalous rows, {r['flagged_normal']} "
                      f"of {int((log.labels == 0).sum())} normal  fit {r['fit_s']:.1f} s", flush=True)
    for seed in args.seeds:
        train = synthetic_series(4000, 10 * seed)
        log = synthetic_series(2000, 10 * seed + 1, INJECTED)
        for name, make in contenders.items():
            r = {"data": "synthetic", "seed": seed, **measure(name, make(seed), train, log)}
            rows.append(r)
            print(f"seed {seed} {name:12s} AUROC {r['auroc']:6.2f}  AP {r['ap']:6.2f}  found "
                  + " ".join(f"{v:.2f}" for v in r["found"].values())
                  + f"  false alarms {r['false_alarms']:.4f}  fit {r['fit_s']:.1f} s", flush=True)
    summary = {}
    for name in contenders:
        mine = [r for r in rows if r["detector"] == name and r["data"] == "synthetic"]
        summary[name] = {k: round(statistics.mean(r[k] for r in mine), 4 if k == "false_alarms" else 2)
                         for k in ("auroc", "ap", "false_alarms", "fit_s")}
        summary[name]["found"] = {kind: round(statistics.mean(r["found"][kind] for r in mine), 3)
                                  for _, _, _, kind in INJECTED}
    print(f"\nmean over seeds {args.seeds} (found: fraction of each anomaly's rows flagged; false alarms: rows flagged "
          "more than a window from every anomaly)")
    print(f"{'detector':12s} {'AUROC':>6s} {'AP':>6s} " + " ".join(f"{k[:12]:>12s}" for _, _, _, k in INJECTED)
          + f" {'false alarms':>12s} {'fit s':>6s}")
    for name, s in summary.items():
        print(f"{name:12s} {s['auroc']:6.2f} {s['ap']:6.2f} " + " ".join(f"{v:12.2f}" for v in s["found"].values())
              + f" {s['false_alarms']:12.4f} {s['fit_s']:6.1f}")
    real_summary = {}
    for name in real:
        for det in ("vaelab ae", "iforest", "knn", "zscore"):
            mine = [r for r in rows if r["data"] == name and r["detector"] == det]
            real_summary.setdefault(name, {})[det] = {k: round(statistics.mean(r[k] for r in mine), 2)
                                                      for k in ("auroc", "ap", "flagged_anomalous", "flagged_normal")}
    if real:
        print("\nreal series, mean over seeds (AUROC / AP; rows flagged: anomalous, normal)")
        for name, table in real_summary.items():
            print(f"  {name}: " + "; ".join(f"{d} {v['auroc']:.2f} / {v['ap']:.2f} ({v['flagged_anomalous']:g}, "
                                             f"{v['flagged_normal']:g})" for d, v in table.items()))
    atomic_write_json(args.out, {"real": {k: {"source": f"sktime 1.2.0 package data, {REAL[k][0]}",
                                              "train_rows": REAL[k][1], "window": REAL[k][2], "stride": REAL[k][3]}
                                          for k in real}, "real_summary": real_summary,
                                 "window": WINDOW, "stride": STRIDE, "fpr": FPR, "held_out": HELD,
                                 "anomalies": [list(a) for a in INJECTED], "seeds": args.seeds,
                                 "threads": args.threads, "torch": torch.__version__, "machine": platform.processor()
                                 or platform.machine(), "rows": rows, "summary": summary})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
