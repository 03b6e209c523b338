"""`vaelab series`: anomaly detection on a multivariate time series through sliding windows (vaelab.timeseries).
Building the parser imports nothing heavy."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from vaelab.cli.common import fraction, int_list, print_written, sub
from vaelab.errors import VaelabError

_FORMATTER = argparse.RawDescriptionHelpFormatter


def _positive(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}")
    return v


def add_series_parser(subparsers) -> argparse.ArgumentParser:
    """The `vaelab series` sub-command (imports nothing heavy)."""
    p = sub(subparsers, "series", """
        Anomalies in a multivariate time series (a sensor log): an autoencoder of its sliding windows, 1-D
        convolutions along time, scores every timestamp. --train fits a detector on a stretch of normal
        operation and saves it into --out; --detector reuses a saved one. --data is the series to score.

        A series is a CSV with one row per timestamp and one column per channel (or an .npy array (T, C)); a
        first column named time/timestamp/date (or holding dates) is the time index (or --time-column); a
        'label' column (0/1) marks known anomalies, used for the AUROC and the picture only.

        A timestamp's score is the mean, over the windows that cover it, of their reconstruction error at
        that row (summed over the channels). The threshold comes from the end of the training series, held
        out from training: --fpr of its rows lie above it (or give --threshold).

        Writes into --out (the detector: config.json, model.safetensors) and --out/detect-<data name>:
          scores.csv      time, score, one score column per channel, flagged (1/0)[, label]
          segments.csv    the flagged stretches: first/last row and time, rows, peak score, the channel to blame
          series.png      the channels over the score, flagged rows in red
          detect.json     threshold, counts, segments and, with labels, the AUROC""", """
        examples:
          vaelab series --train normal.csv --window 64 --stride 8 --out runs/pump
          vaelab series --detector runs/pump --data week-12.csv""",
          _FORMATTER)
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--train", metavar="CSV", nargs="+", help="normal operation to fit a detector on (several "
                        "files: several runs, no window crosses from one to the next)")
    source.add_argument("--detector", metavar="DIR", help="a detector saved by an earlier `vaelab series --train`")
    p.add_argument("--data", metavar="CSV", default=None,
                   help="the series to score [required with --detector; optional with --train]")
    p.add_argument("--time-column", metavar="NAME", default=None,
                   help="the column holding the time of each row [default: a first column named time, timestamp, "
                        "date, ... or holding dates; none otherwise]")
    p.add_argument("--window", type=_positive, default=64, metavar="W", help="rows per window [default 64]")
    p.add_argument("--stride", type=_positive, default=None, metavar="S",
                   help="rows between window starts, for training and scoring [default W/4]")
    p.add_argument("--model", default="ae", metavar="NAME", help="a registered model: ae or vae [default ae]")
    _add_model_flags(p)
    group = p.add_mutually_exclusive_group()
    group.add_argument("--fpr", type=fraction, default=None, metavar="F",
                       help="with --train: the threshold flags a fraction F of the held-out normal rows "
                            "[default 0.01]")
    group.add_argument("--threshold", type=float, default=None, metavar="T",
                       help="flag rows whose score exceeds T [default: the detector's]")
    group.add_argument("--contamination", type=fraction, default=None, metavar="C",
                       help="flag the fraction C of the rows of --data with the highest scores (where the level "
                            "drifts from the training series', a held-out threshold flags too much)")
    p.add_argument("--validation-fraction", type=fraction, default=0.2, metavar="F",
                   help="the end of the training series held out to set the threshold [default 0.2]")
    p.add_argument("--seed", type=int, default=0, metavar="N", help="[default 0]")
    p.add_argument("--threads", type=_positive, default=None, metavar="N", help="torch CPU threads [default torch's]")
    p.add_argument("--out", metavar="DIR", default=None,
                   help="the detector's folder with --train [default runs/series-<train name>]; with --detector, "
                        "where the scores go [default DIR/detect-<data name>]")
    p.set_defaults(func=run_series)
    return p


def _add_model_flags(p) -> None:
    p.add_argument("--latent-dim", type=_positive, default=8, metavar="N", help="[default 8]")
    p.add_argument("--channels", type=int_list, default=(32, 64), metavar="LIST",
                   help="widths of the 1-D conv layers, each halving the length [default 32,64]")
    p.add_argument("--hidden", type=int_list, default=(128,), metavar="LIST", help="dense layers [default 128]")
    p.add_argument("--epochs", type=_positive, default=None, metavar="N",
                   help="[default: about 3000 optimizer steps, 20 to 300 epochs]")
    p.add_argument("--batch-size", type=_positive, default=64, metavar="N", help="[default 64]")
    p.add_argument("--lr", type=float, default=1e-3, help="[default 1e-3]")


def run_series(args) -> int:
    import numpy as np

    from vaelab.timeseries import read_series

    given = [f for f, v in (("--threshold", args.threshold), ("--contamination", args.contamination)) if v is not None]
    if given and args.data is None:
        raise VaelabError(f"{given[0]} flags rows of the series to score: give it with --data CSV")
    det, folder, out = _detector(args)
    if out is None:
        return 0
    data = read_series(args.data, time_column=args.time_column)
    per = det.score_timestamps(data, per_channel=True)
    score = per.sum(axis=1)
    if args.threshold is not None:
        threshold, how = args.threshold, "--threshold"
    elif args.contamination is not None:
        threshold = float(np.quantile(score, 1.0 - args.contamination))
        how = f"--contamination {args.contamination:g}"
    else:
        threshold, how = det.threshold_, "the detector (held-out normal rows)"
    flagged = score > threshold
    segments = det.segments(data, per, threshold)
    summary = {"detector": str(folder), "data": str(args.data), "rows": len(data), "channels": det.columns_,
               "window": det.window, "stride": det.stride_, "threshold": threshold,
               "threshold_from": how,
               "flagged": int(flagged.sum()), "segments": segments}
    if data.labels is not None and 0 < data.labels.sum() < len(data):
        from vaelab.evaluation.scores import auroc

        summary["auroc"] = round(100 * auroc(score, data.labels == 1), 2)
        summary["anomalies_labelled"] = int(data.labels.sum())
    written = _write(out, data, det, score, per, flagged, segments, threshold, summary)
    print(f"scored {len(data)} rows of {args.data}; threshold {threshold:.6g}; flagged {int(flagged.sum())} rows "
          f"({100 * flagged.mean():.2f}%) in {len(segments)} stretches")
    for s in sorted(segments, key=lambda s: -s["peak"])[:5]:
        print(f"  rows {s['first']}..{s['last']} ({s['start']} .. {s['end']}): peak {s['peak']:.4g} at "
              f"{s['peak_at']}, mostly {s['channel']}")
    if "auroc" in summary:
        print(f"AUROC {summary['auroc']:.2f}% against the labels ({summary['anomalies_labelled']} anomalous rows)")
    print_written(written)
    return 0 if np.isfinite(score).all() else 1


def _detector(args):
    """(detector, its folder, the folder for the scores of --data or None): loaded with --detector, else fitted
    on --train and saved."""
    from vaelab.timeseries import SeriesDetector, read_series

    if args.detector is not None:
        if args.data is None:
            raise VaelabError("--detector scores a series: give it with --data CSV")
        if args.fpr is not None:
            raise VaelabError("--fpr sets the threshold when a detector is fitted (--train); with --detector give "
                              "--threshold T or --contamination C, or fit again")
        folder = Path(args.detector)
        if not folder.is_dir():
            what = "is a file, not a directory" if folder.exists() else "does not exist"
            raise VaelabError(f"--detector {args.detector!r} {what}; give the --out folder of `vaelab series --train`")
        det = SeriesDetector.load(folder)
        return det, folder, Path(args.out) if args.out else folder / f"detect-{Path(args.data).stem}"
    train = [read_series(path, time_column=args.time_column) for path in args.train]
    folder = Path(args.out or os.path.join("runs", f"series-{Path(args.train[0]).stem}"))
    det = SeriesDetector(window=args.window, stride=args.stride, model=args.model, latent_dim=args.latent_dim,
                         channels=args.channels, hidden=args.hidden, epochs=args.epochs, batch_size=args.batch_size,
                         lr=args.lr, fpr=args.fpr if args.fpr is not None else 0.01,
                         validation_fraction=args.validation_fraction, random_state=args.seed, threads=args.threads)
    print(f"fitting on {', '.join(args.train)}: {sum(map(len, train))} rows, {len(train[0].columns)} channels "
          f"{train[0].columns}; windows of {det.window} rows every {det.stride_}", flush=True)
    det.fit(train)
    det.save(folder)
    last = det.history_[-1]
    print(f"trained {last['epoch']} epochs ({last['step']} steps) on {det.n_windows_} windows: train loss "
          f"{last['train_loss']:.4g}")
    print(f"threshold {det.threshold_:.6g}: {100 * det.fpr:g}% of the held-out rows (the last "
          f"{100 * det.validation_fraction:g}% of each training series) lie above it")
    print(f"wrote the detector: {folder}")
    return det, folder, None if args.data is None else folder / f"detect-{Path(args.data).stem}"


def _write(out: Path, data, det, score, per, flagged, segments, threshold, summary) -> list[str]:
    import csv
    import io

    from vaelab.io import atomic_write_json, atomic_write_text
    from vaelab.plotting import save_series

    out.mkdir(parents=True, exist_ok=True)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["time", "score", *[f"score_{c}" for c in det.columns_], "flagged"]
               + (["label"] if data.labels is not None else []))
    for i in range(len(data)):
        w.writerow([data.time_of(i), f"{score[i]:.6g}", *[f"{v:.6g}" for v in per[i]], int(flagged[i])]
                   + ([int(data.labels[i])] if data.labels is not None else []))
    atomic_write_text(out / "scores.csv", buf.getvalue())
    buf = io.StringIO()
    keys = ["first", "last", "start", "end", "rows", "peak", "peak_at", "channel"]
    w = csv.DictWriter(buf, keys, lineterminator="\n")
    w.writeheader()
    w.writerows(segments)
    atomic_write_text(out / "segments.csv", buf.getvalue())
    picture = save_series(data.values, data.columns, score, threshold, out / "series.png", labels=data.labels,
                          title=f"{data.name}: anomaly scores, windows of {det.window} rows")
    atomic_write_json(out / "detect.json", summary)
    return [str(out / "scores.csv"), str(out / "segments.csv"), picture, str(out / "detect.json")]
