"""Anomaly-detection quality: the one-class MNIST table, and a tabular set with a known outlier fraction.

    python benchmarks/anomaly.py                          # both parts, every MNIST class (minutes)
    python benchmarks/anomaly.py --classes 3,8 --epochs 10
    python benchmarks/anomaly.py --skip-mnist             # the tabular part only (seconds)

One-class protocol (Ruff et al. 2018): train on one class of the MNIST training split, score the whole test
split, AUROC (%) with the other nine classes as anomalies; one column per anomaly score type, computed from
the same trained model. Deep SVDD reports a mean of 94.8 under this protocol.

Tabular: rows near a 4-D curved manifold in 30 dimensions, of which a known 5% are corrupted by replacing a
few of their columns with the values of other rows: every column keeps its marginal distribution, only the
dependencies between columns break (what a per-column or density-in-the-box method cannot see). The
detectors train on the contaminated rows (unsupervised, contamination=0.05); IsolationForest and LOF
(scikit-learn) are the baselines. Also the fit time of the transformers on a 1000 x 50 array.

Prints the tables and writes benchmarks/results/anomaly.json. Run it niced on a shared machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from vaelab.anomaly import SCORES, format_table, one_class  # noqa: E402
from vaelab.training.checkpoint import atomic_write_json  # noqa: E402

# The one-class settings: an MLP VAE (hidden 256, latent 16) with a Gaussian likelihood (sigma 0.1) on [0, 1]
# pixels, 30 epochs. Measured alternatives (mean AUROC of elbo, all classes): Bernoulli likelihood 92.1; hidden
# (512, 256) 97.0; 60 epochs 97.2; a conv VAE is 5-10x slower on CPU and was not better on the hard classes 2
# and 8. These are pinned as the settings this benchmark's JSON was measured with: raw pixels, and latent 8 for
# the table, were AnomalyDetector's defaults then (benchmarks/anomaly_vs_pyod.py later chose standardized pixels
# and latent 2 for tables; `vaelab one-class --pixels raw` is this setting).
ONE_CLASS = dict(arch="mlp", hidden=(256,), latent_dim=16, likelihood="gaussian", gaussian_sigma=0.1, epochs=30,
                 standardize_pixels=False)
TABULAR_LATENT = 8


def tabular_data(n=5000, d=30, k=4, frac=0.05, n_corrupted=3, noise=0.1, seed=0):
    """(X, is_outlier): rows near a k-D curved manifold; a fraction `frac` with `n_corrupted` columns
    replaced by the values of random other rows (marginals unchanged, dependencies broken)."""
    rng = np.random.RandomState(seed)
    x = np.tanh(rng.randn(n, k) @ rng.randn(k, 16)) @ (rng.randn(16, d) / 4) + noise * rng.randn(n, d)
    bad = np.zeros(n, bool)
    bad[rng.choice(n, int(round(frac * n)), replace=False)] = True
    for i in np.flatnonzero(bad):
        cols = rng.choice(d, n_corrupted, replace=False)
        x[i, cols] = x[rng.randint(n, size=n_corrupted), cols]
    return x, bad


def run_tabular(threads: int) -> dict:
    from sklearn.ensemble import IsolationForest
    from sklearn.metrics import roc_auc_score
    from sklearn.neighbors import LocalOutlierFactor

    from vaelab.sklearn import AnomalyDetector, AutoencoderTransformer, VAETransformer

    x, bad = tabular_data()
    frac = float(bad.mean())
    rows = {}

    def record(name, anomaly_score, flagged, seconds):
        rows[name] = {"auroc": round(100 * roc_auc_score(bad, anomaly_score), 2),
                      "precision_at_contamination": round(float(bad[flagged].mean()), 3),
                      "recall_at_contamination": round(float(flagged[bad].mean()), 3),
                      "fit_s": round(seconds, 2)}

    for model in ("vae", "ae"):
        for score in SCORES:
            if model == "ae" and score in ("elbo", "iwae"):
                continue
            t0 = time.perf_counter()
            det = AnomalyDetector(model=model, score_type=score, contamination=frac, threads=threads,
                                  latent_dim=TABULAR_LATENT).fit(x)
            seconds = time.perf_counter() - t0
            record(f"{model} {score}", -det.score_samples(x), det.predict(x) == -1, seconds)
    t0 = time.perf_counter()
    iso = IsolationForest(contamination=frac, random_state=0).fit(x)
    record("IsolationForest", -iso.score_samples(x), iso.predict(x) == -1, time.perf_counter() - t0)
    t0 = time.perf_counter()
    lof = LocalOutlierFactor(contamination=frac)
    flagged = lof.fit_predict(x) == -1
    record("LocalOutlierFactor", -lof.negative_outlier_factor_, flagged, time.perf_counter() - t0)

    rng = np.random.RandomState(1)
    wide = np.tanh(rng.randn(1000, 5) @ rng.randn(5, 50)) + 0.1 * rng.randn(1000, 50)
    speed = {}
    for cls in (AutoencoderTransformer, VAETransformer):
        t0 = time.perf_counter()
        cls().fit(wide).transform(wide)
        speed[cls.__name__] = round(time.perf_counter() - t0, 2)
    return {"data": {"rows": len(x), "columns": x.shape[1], "outlier_fraction": frac,
                     "corruption": "3 of 30 columns replaced by other rows' values"},
            "detectors": rows, "transformer_fit_transform_s_1000x50": speed}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--classes", default=None, help="comma-separated normal classes [default all ten]")
    p.add_argument("--epochs", type=int, default=ONE_CLASS["epochs"])
    p.add_argument("--data-dir", default=os.environ.get("VAELAB_DATA") or str(REPO.parent / "shared" / "data"))
    p.add_argument("--threads", type=int, default=1, help="torch threads [default 1: fastest on a shared CPU]")
    p.add_argument("--skip-mnist", action="store_true")
    p.add_argument("--skip-tabular", action="store_true")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "anomaly.json"))
    args = p.parse_args(argv)

    import torch

    torch.set_num_threads(args.threads)
    result = {"machine": {"python": platform.python_version(), "torch": torch.__version__,
                          "cpus": os.cpu_count(), "threads": args.threads}}
    if not args.skip_tabular:
        t0 = time.perf_counter()
        tab = run_tabular(args.threads)
        result["tabular"] = tab
        print(f"tabular: {tab['data']['rows']} rows x {tab['data']['columns']} columns, "
              f"{100 * tab['data']['outlier_fraction']:.0f}% outliers ({tab['data']['corruption']}); "
              f"{time.perf_counter() - t0:.0f} s")
        print(f"  {'detector':20s} {'AUROC':>6s} {'precision':>9s} {'recall':>6s} {'fit s':>6s}")
        for name, r in tab["detectors"].items():
            print(f"  {name:20s} {r['auroc']:6.2f} {r['precision_at_contamination']:9.3f} "
                  f"{r['recall_at_contamination']:6.3f} {r['fit_s']:6.2f}")
        print("  fit+transform of a 1000x50 array (s): "
              + ", ".join(f"{k} {v}" for k, v in tab["transformer_fit_transform_s_1000x50"].items()))
    if not args.skip_mnist:
        classes = None if args.classes is None else [int(c) for c in args.classes.split(",")]
        settings = {**ONE_CLASS, "epochs": args.epochs}
        t0 = time.perf_counter()
        table = one_class("mnist", classes, "vae", data_dir=args.data_dir, threads=args.threads,
                          log=lambda s: print("  " + s, flush=True), **settings)
        table["seconds"] = round(time.perf_counter() - t0, 1)
        result["one_class_mnist"] = table
        print(f"\none-class MNIST, AUROC (%), VAE {settings}, {table['seconds']:.0f} s:")
        print(format_table(table))
    atomic_write_json(args.out, result)
    print(f"\nwrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
