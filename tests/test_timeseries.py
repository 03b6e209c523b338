"""Anomalies in multivariate time series through sliding windows (vaelab.timeseries, `vaelab series`): reading a
CSV of time-indexed rows and its errors, the windows, the 1-D conv networks, the per-timestamp score against its
definition, and detection of injected anomalies of known position and shape on a generated series."""

from __future__ import annotations

import datetime
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from vaelab.config import ModelConfig
from vaelab.errors import CheckpointError, ConfigError, DataError
from vaelab.models import build_model
from vaelab.timeseries import (INJECTED, SYNTHETIC_COLUMNS, Series, SeriesDetector, read_series, synthetic_series,
                               window_starts, windows)

REPO = Path(__file__).resolve().parents[1]
COLUMNS = list(SYNTHETIC_COLUMNS)


def normal_series(rows: int, seed: int) -> np.ndarray:
    return synthetic_series(rows, seed).values


def write_csv(path: Path, x: np.ndarray, labels=None) -> Path:
    t0 = datetime.datetime(2026, 1, 1)
    lines = ["timestamp," + ",".join(COLUMNS) + (",label" if labels is not None else "")]
    for i, row in enumerate(x):
        lines.append((t0 + datetime.timedelta(minutes=i)).isoformat() + "," + ",".join(f"{v:.6f}" for v in row)
                     + (f",{labels[i]}" if labels is not None else ""))
    path.write_text("\n".join(lines) + "\n")
    return path


@pytest.fixture(scope="module")
def fitted():
    """A detector fitted on 4,000 rows of normal operation, and a 2,000-row log with the INJECTED anomalies."""
    train = Series(normal_series(4000, 0), COLUMNS)
    log = synthetic_series(2000, 1, INJECTED)
    det = SeriesDetector(window=64, stride=4, epochs=100, threads=1).fit(train)
    return det, train, log


# ================================================================================================ reading


def test_read_csv_time_label_and_channels(tmp_path):
    x = normal_series(10, 0)
    s = read_series(write_csv(tmp_path / "a.csv", x, labels=[0] * 9 + [1]))
    assert s.columns == COLUMNS
    assert s.times[0] == "2026-01-01T00:00:00" and s.times[-1] == "2026-01-01T00:09:00"
    assert s.labels.tolist() == [0] * 9 + [1]
    np.testing.assert_allclose(s.values, np.round(x, 6), atol=1e-12)
    assert s.name == "a"
    # no header, no time column: every column is a channel
    (tmp_path / "b.csv").write_text("1,2\n3,4\n5,6\n")
    s = read_series(tmp_path / "b.csv")
    assert s.columns == ["x0", "x1"] and s.times is None and s.values.tolist() == [[1, 2], [3, 4], [5, 6]]
    # a numeric time column named by --time-column
    (tmp_path / "c.csv").write_text("a,sec,b\n1,10,2\n3,20,4\n")
    s = read_series(tmp_path / "c.csv", time_column="sec")
    assert s.columns == ["a", "b"] and s.times == ["10", "20"]
    # an .npy array and a numpy array
    np.save(tmp_path / "d.npy", x)
    np.testing.assert_array_equal(read_series(tmp_path / "d.npy").values, x)
    assert read_series(np.arange(5.0)).values.shape == (5, 1)


@pytest.mark.parametrize("text, message", [
    ("time,a,b\n1,1,2\n2,,4\n", "c.csv line 3, column 'a': an empty field; every value column must hold numbers"),
    ("time,a,b\n1,1,2\n2,3,high\n", "c.csv line 3, column 'b': 'high', not a number"),
    ("time,a,b\n1,1,2\n2,3,nan\n", "c.csv line 3, column 'b': nan is not a finite number; fill or drop missing "
                                   "values first (1 such entries in all"),
    ("time,a,b\n1,1,2\n2,3\n", "c.csv line 3: 2 fields where the first row has 3"),
    ("time,a,b\n1,1,2\n1,3,4\n", "c.csv line 3: time '1' does not come after the previous row's '1'; sort the rows"),
    ("time,a,b\n2026-01-02,1,2\n2026-01-01,3,4\n", "line 3: time '2026-01-01' does not come after the previous "
                                                   "row's '2026-01-02'"),
    ("time,a,label\n1,1,0\n2,3,2\n", "c.csv line 3: label '2' must be 0 (normal) or 1 (anomalous)"),
    ("time,label\n1,0\n2,1\n", "c.csv has no value columns besides its time and label columns"),
    ("time,a\n", "holds a header and no rows"),
])
def test_read_csv_errors_name_the_line_and_column(tmp_path, text, message):
    (tmp_path / "c.csv").write_text(text)
    with pytest.raises(DataError) as e:
        read_series(tmp_path / "c.csv")
    assert message in str(e.value)


def test_read_other_errors(tmp_path):
    with pytest.raises(DataError, match="series file '.*nope.csv' does not exist"):
        read_series(tmp_path / "nope.csv")
    (tmp_path / "bad.npy").write_bytes(b"\x93NUMPY garbage")
    with pytest.raises(DataError, match="is not a readable .npy array"):
        read_series(tmp_path / "bad.npy")
    with pytest.raises(DataError, match=r"a series has shape \(T, C\).*got shape \(2, 3, 4\)"):
        read_series(np.zeros((2, 3, 4)))
    with pytest.raises(DataError, match="time column 'when' is not a column of c.csv; its columns are"):
        (tmp_path / "c.csv").write_text("a,b\n1,2\n")
        read_series(tmp_path / "c.csv", time_column="when")


def test_synthetic_series_injects_where_it_says():
    clean, s = synthetic_series(2000, 1), synthetic_series(2000, 1, INJECTED)
    changed = ~np.isclose(s.values, clean.values, rtol=0, atol=1e-9)
    assert not changed[s.labels == 0].any()  # nothing changes outside the labelled rows
    for first, n, c, kind in INJECTED:  # only the anomaly's channel changes (a period-30 and a period-120 cosine
        assert changed[first:first + n, c].mean() >= 0.95, kind  # meet at 4 rows in 80)
        assert not np.delete(changed[first:first + n], c, axis=1).any(), kind
    np.testing.assert_allclose(s.values[500:505, 0] - clean.values[500:505, 0], 1.5)
    np.testing.assert_array_equal(s.values[1700:1760, 0], clean.values[1700:1760, 0][::-1])
    with pytest.raises(DataError, match="anomaly kind 'drift' is unknown"):
        synthetic_series(100, 0, [(0, 5, 0, "drift")])


# ================================================================================================ windows


def test_window_starts_cover_every_row():
    assert window_starts(10, 4, 3).tolist() == [0, 3, 6]
    assert window_starts(11, 4, 3).tolist() == [0, 3, 6, 7]
    assert window_starts(4, 4, 2).tolist() == [0]
    with pytest.raises(DataError, match="the series has 3 rows, fewer than one window of 4"):
        window_starts(3, 4, 1)
    v = torch.arange(30.0).reshape(10, 3)
    w = windows(v, 4, np.array([0, 6]))
    assert w.shape == (2, 3, 4)
    assert torch.equal(w[1], v[6:10].t())


@pytest.mark.parametrize("length", [64, 50, 33])
@pytest.mark.parametrize("model", ["ae", "vae"])
def test_conv_networks_take_series_windows(model, length):
    m = build_model(ModelConfig(model=model, input_shape=(3, length), latent_dim=4, channels=(8, 16), hidden=(32,),
                                likelihood="gaussian"))
    assert isinstance(m.encoder[0], torch.nn.Conv1d)  # arch auto is conv: 1-D convs along time
    x = torch.randn(5, 3, length)
    assert m.reconstruct(x).shape == (5, 3, length)
    assert m.encode(x).mean.shape == (5, 4)


def test_conv_series_shape_errors():
    for arch in ("conv-pool", "resnet"):
        with pytest.raises(ConfigError, match=f"arch='{arch}' needs image input"):
            build_model(ModelConfig(model="vae", input_shape=(3, 64), arch=arch))
    with pytest.raises(ConfigError) as e:
        build_model(ModelConfig(model="vae", input_shape=(3, 3), channels=(8, 8, 8)))
    assert e.value.problems == ["input_shape=(3, 3) is too short for 3 downsampling layers of arch='conv' (each "
                                "halves the length L=3); use a longer window, fewer channels entries or arch='mlp'"]


# =============================================================================================== scoring


def test_timestamp_score_is_the_mean_over_covering_windows(fitted):
    """score_timestamps against its definition, written out: each window's Gaussian reconstruction NLL at every
    (channel, step), summed over the channels, averaged per row over the windows that cover it."""
    det, _, log = fitted
    part = Series(log.values[:300], COLUMNS)
    per = det.score_timestamps(part, per_channel=True)
    z = torch.from_numpy((part.values - det.mean_) / det.scale_).float()
    sums, counts = np.zeros((300, 3)), np.zeros(300)
    sigma = det.gaussian_sigma
    with torch.no_grad():
        for s in window_starts(300, 64, 4):
            x = z[s:s + 64].t()[None]
            x_hat = det.model_.reconstruct(x)[0]
            err = 0.5 * ((x[0] - x_hat) / sigma) ** 2 + np.log(sigma) + 0.5 * np.log(2 * np.pi)
            sums[s:s + 64] += err.t().double().numpy()
            counts[s:s + 64] += 1
    np.testing.assert_allclose(per, sums / counts[:, None], rtol=1e-5, atol=1e-4)
    np.testing.assert_allclose(det.score_timestamps(part), per.sum(axis=1), rtol=1e-12)


def test_injected_anomalies_are_found(fitted):
    """Every injected anomaly (a spike, a level shift, a frequency change, a time-reversed stretch) is flagged
    over most of its rows and blamed on its channel; rows more than a window away from every anomaly are
    flagged at about the held-out rate."""
    from sklearn.metrics import roc_auc_score

    det, _, log = fitted
    score = det.score_timestamps(log)
    assert roc_auc_score(log.labels, score) > 0.95
    flagged = score > det.threshold_
    segments = det.segments(log)
    for first, n, c, kind in INJECTED:
        assert flagged[first:first + n].mean() > 0.6, kind
        inside = [s for s in segments if s["first"] <= first + n - 1 and s["last"] >= first]
        top = max(inside, key=lambda s: s["peak"])
        assert top["channel"] == COLUMNS[c], kind
    far = np.ones(len(log), dtype=bool)
    for first, n, _, _ in INJECTED:
        far[max(0, first - 64):first + n + 64] = False
    assert flagged[far].mean() < 0.04
    spike = next(s for s in segments if s["first"] <= 502 <= s["last"])
    assert spike["peak"] == pytest.approx(score[500:505].max())


def test_threshold_is_the_held_out_quantile(fitted):
    det, train, _ = fitted
    held = det.score_timestamps(Series(train.values[3200:], COLUMNS))
    assert det.threshold_ == pytest.approx(float(np.quantile(held, 0.99)), rel=1e-6)


def test_save_load_round_trip_and_errors(fitted, tmp_path):
    det, _, log = fitted
    det.save(tmp_path / "det")
    back = SeriesDetector.load(tmp_path / "det")
    assert back.threshold_ == det.threshold_ and back.columns_ == COLUMNS and back.stride_ == 4
    np.testing.assert_array_equal(back.score_timestamps(log), det.score_timestamps(log))
    with pytest.raises(DataError, match=r"has 2 channels \['x0', 'x1'\]; this detector was fitted on 3"):
        det.score_timestamps(np.zeros((100, 2)))
    cfg = json.loads((tmp_path / "det" / "config.json").read_text())
    del cfg["series"]["threshold"]
    (tmp_path / "det" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="has no valid 'series' section"):
        SeriesDetector.load(tmp_path / "det")
    with pytest.raises(ConfigError, match="not fitted yet"):
        SeriesDetector().score_timestamps(log)


def test_fit_errors():
    with pytest.raises(ConfigError) as e:
        SeriesDetector(window=1, fpr=2).fit(np.zeros((500, 2)))
    assert e.value.problems == ["window=1 must be an integer >= 2 (rows per window)",
                                "fpr=2 must be a number in (0, 1): the false-positive rate on held-out normal rows"]
    with pytest.raises(ConfigError, match="stride=80 is larger than window=64"):
        SeriesDetector(window=64, stride=80).fit(np.zeros((500, 2)))
    with pytest.raises(DataError, match="the training series array has 200 rows: its first 160 train the model and "
                                        "its last 40 set the threshold"):
        SeriesDetector(window=64).fit(np.random.default_rng(0).standard_normal((200, 2)))


def test_several_training_series_never_share_a_window():
    """Two runs of normal operation: windows come from within each run (none straddles the join), the
    standardization is over both training parts, and the threshold is the quantile of both held-out ends."""
    a, b = synthetic_series(1000, 3), synthetic_series(700, 4)
    b.values = b.values[:, [0, 1, 2]] * 2.0 + 1.0  # another operating point
    det = SeriesDetector(window=32, stride=8, epochs=3, threads=1).fit([a, b])
    assert det.n_windows_ == (800 - 32) // 8 + 1 + (560 - 32) // 8 + 1
    train = np.concatenate([a.values[:800], b.values[:560]])
    np.testing.assert_allclose(det.mean_, train.mean(axis=0))
    np.testing.assert_allclose(det.scale_, train.std(axis=0))
    held = np.concatenate([det.score_timestamps(Series(a.values[800:], COLUMNS)),
                           det.score_timestamps(Series(b.values[560:], COLUMNS))])
    assert det.threshold_ == pytest.approx(float(np.quantile(held, 0.99)), rel=1e-6)
    c = Series(a.values[:, :2], ["pressure", "flow"], name="two")
    with pytest.raises(DataError, match=r"two has the channels \['pressure', 'flow'\], synthetic-3 has "):
        SeriesDetector(window=32, epochs=1).fit([a, c])
    with pytest.raises(DataError, match="got an empty list of training series"):
        SeriesDetector().fit([])


# ==================================================================================================== CLI


def vaelab(*argv, cwd=None):
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    return subprocess.run([sys.executable, "-m", "vaelab", *map(str, argv)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def test_cli_train_score_and_reuse(tmp_path):
    write_csv(tmp_path / "normal.csv", normal_series(3000, 0))
    log = synthetic_series(2000, 1, INJECTED)
    write_csv(tmp_path / "log.csv", log.values, log.labels)
    labels = log.labels
    proc = vaelab("series", "--train", tmp_path / "normal.csv", "--data", tmp_path / "log.csv", "--window", 48,
                  "--stride", 8, "--epochs", 60, "--threads", 1, "--out", tmp_path / "pump")
    assert proc.returncode == 0, proc.stderr
    out = tmp_path / "pump" / "detect-log"
    summary = json.loads((out / "detect.json").read_text())
    assert summary["rows"] == 2000 and summary["window"] == 48 and summary["stride"] == 8
    assert summary["auroc"] > 90 and summary["anomalies_labelled"] == int(labels.sum())
    lines = (out / "scores.csv").read_text().splitlines()
    assert lines[0] == "time,score,score_pressure,score_flow,score_temp,flagged,label"
    assert len(lines) == 2001 and lines[1].startswith("2026-01-01T00:00:00,")
    assert sum(int(r.split(",")[5]) for r in lines[1:]) == summary["flagged"]
    assert (out / "series.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "segments.csv").read_text().splitlines()[0] == "first,last,start,end,rows,peak,peak_at,channel"
    assert f"AUROC {summary['auroc']:.2f}%" in proc.stdout
    # the saved detector scores the same series to the same numbers
    again = vaelab("series", "--detector", tmp_path / "pump", "--data", tmp_path / "log.csv", "--out", tmp_path / "re")
    assert again.returncode == 0, again.stderr
    assert (tmp_path / "re" / "scores.csv").read_text() == (out / "scores.csv").read_text()
    # --contamination: the fraction of the scored rows with the highest scores (2000 rows: 100)
    top = vaelab("series", "--detector", tmp_path / "pump", "--data", tmp_path / "log.csv", "--contamination", 0.05,
                 "--out", tmp_path / "top")
    assert top.returncode == 0, top.stderr
    flagged = json.loads((tmp_path / "top" / "detect.json").read_text())
    assert flagged["flagged"] == 100 and flagged["threshold_from"] == "--contamination 0.05"
    # `vaelab detect` points to the command that scores series
    wrong = vaelab("detect", tmp_path / "pump", "--data", tmp_path / "log.csv")
    assert wrong.returncode != 0 and "Traceback" not in wrong.stderr
    assert f"is a time-series detector (written by `vaelab series`); score a series with it by `vaelab series " \
           f"--detector {tmp_path / 'pump'} --data {tmp_path / 'log.csv'}`" in wrong.stderr


def test_cli_errors_exit_cleanly(tmp_path):
    (tmp_path / "bad.csv").write_text("time,a\n1,1\n2,oops\n")
    proc = vaelab("series", "--train", tmp_path / "bad.csv", "--out", tmp_path / "x")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "bad.csv line 3, column 'a': 'oops', not a number" in proc.stderr
    proc = vaelab("series", "--detector", tmp_path)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert "--detector scores a series: give it with --data CSV" in proc.stderr
    proc = vaelab("series", "--train", tmp_path / "bad.csv", "--contamination", 0.1)
    assert proc.returncode != 0 and "--contamination flags rows of the series to score: give it with --data CSV" \
        in proc.stderr
    proc = vaelab("series", "--detector", tmp_path / "none", "--data", tmp_path / "bad.csv")
    assert "--detector '" in proc.stderr and "does not exist" in proc.stderr and "Traceback" not in proc.stderr
