"""Anomaly detection on multivariate time series through sliding windows (a sensor log, a machine's metrics).

    from vaelab.timeseries import SeriesDetector, read_series
    det = SeriesDetector(window=64, stride=8).fit("normal.csv")   # a stretch of normal operation
    log = read_series("log.csv")
    score = det.score_timestamps(log)          # (T,) anomaly score of every timestamp, higher = more anomalous
    flagged = det.predict(log)                 # (T,) bool: score above the detector's threshold
    det.segments(log)                          # the flagged stretches: first/last row, peak, the channel to blame
    det.save("runs/sensor"); SeriesDetector.load("runs/sensor")

The series is a CSV of time-indexed rows (one column per channel, and optionally a time column and a 0/1 `label`
column marking known anomalous rows), an .npy array (T, C), a numpy array, or a pandas DataFrame. Each channel is
standardized with the mean and standard deviation of the training series. The model (a registered autoencoder,
"ae" by default, or "vae") learns windows of `window` consecutive rows, taken every `stride` rows, with 1-D
convolutions along time (arch conv on input of shape (C, window)).

Scores: a window's error at each of its (channel, step) entries is the Gaussian reconstruction NLL of the
decoded posterior mean (0.5 (x - x̂)² / σ² in standardized units, plus a constant per entry); a timestamp's score
is the mean, over the windows that cover it, of that error summed over the channels (`per_channel=True` keeps
the channels apart, to see which sensor misbehaves). Windows start every `stride` rows, and one more ends at the
last row, so every timestamp is covered at least once.

The threshold: the model trains on the first 1 - validation_fraction of the training series; the rest, held out
(later in time, never seen in training), is scored, and the threshold is its (1 - fpr) quantile, so about a
fraction fpr of normal timestamps is flagged.
"""

from __future__ import annotations

import csv
import math
import numbers
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sklearn.base import BaseEstimator

from vaelab.errors import CheckpointError, ConfigError, DataError
from vaelab.plotting import spans

SERIES_KEY = "series"  # the section of a detector's config.json that holds the fitted series detector
TIME_NAMES = ("time", "timestamp", "date", "datetime", "ts", "t")  # a first column so named is the time index
LABEL_COLUMN = "label"  # a column so named holds known anomalies, 1 per anomalous row (0 for normal)


# ================================================================================================ reading


@dataclass
class Series:
    """A multivariate series: values float64 (T, C), one column name per channel, the time of each row as text
    (None: the row numbers), and optional labels int64 (T,), 1 where a row is a known anomaly."""
    values: np.ndarray
    columns: list[str]
    times: list[str] | None = None
    labels: np.ndarray | None = None
    name: str = "series"

    def __len__(self) -> int:
        return len(self.values)

    def time_of(self, i: int) -> str:
        return self.times[i] if self.times is not None else str(i)


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _check_values(values: np.ndarray, columns: list[str], name: str, first_line: int | None = None) -> None:
    bad = ~np.isfinite(values)
    if bad.any():
        row, col = (int(i) for i in np.argwhere(bad)[0])
        where = f"line {row + first_line}" if first_line is not None else f"row {row}"
        raise DataError(f"{name} {where}, column {columns[col]!r}: {values[row, col]} is not a finite number; fill "
                        f"or drop missing values first ({int(bad.sum())} such entries in all; vaelab does not guess "
                        "them)")


def _check_times(times: list[str], name: str, first_line: int) -> None:
    """Rows must come in time order: numbers or ISO dates that increase (other time texts are taken as given)."""
    nums = [_number(t) for t in times]
    if all(v is not None for v in nums):
        keys = nums
    else:
        try:
            keys = [np.datetime64(t) for t in times]
        except ValueError:
            return
    for i in range(1, len(keys)):
        if not keys[i] > keys[i - 1]:
            raise DataError(f"{name} line {i + first_line}: time {times[i]!r} does not come after the previous "
                            f"row's {times[i - 1]!r}; sort the rows by time (and drop repeated timestamps)")


def _labels(raw, name: str, where) -> np.ndarray:
    labels = np.asarray(raw, dtype=np.float64)
    bad = ~np.isin(labels, (0.0, 1.0))
    if bad.any():
        i = int(np.argwhere(bad)[0][0])
        raise DataError(f"{name} {where(i)}: label {raw[i]!r} must be 0 (normal) or 1 (anomalous)")
    return labels.astype(np.int64)


def _read_csv(path: Path, time_column) -> Series:
    name = path.name
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = [r for r in csv.reader(f) if r and any(c.strip() for c in r)]
    except UnicodeDecodeError as e:
        raise DataError(f"{path} is not a text CSV file ({e}); give a CSV of time-indexed rows") from None
    if not rows:
        raise DataError(f"{path} holds no rows; give a CSV with one row per timestamp")
    header = [c.strip() for c in rows[0]]
    has_header = any(_number(c) is None for c in header)
    body = rows[1:] if has_header else rows
    first_line = 2 if has_header else 1
    width = len(rows[0])
    names = header if has_header else [f"x{i}" for i in range(width)]
    for i, r in enumerate(body):
        if len(r) != width:
            raise DataError(f"{name} line {i + first_line}: {len(r)} fields where the first row has {width}; every "
                            "row needs one value per column")
    if not body:
        raise DataError(f"{path} holds a header and no rows; give at least one row per timestamp")
    if time_column is not None:
        if isinstance(time_column, int) or str(time_column).isdigit():
            t = int(time_column)
            if not 0 <= t < width:
                raise DataError(f"time column {time_column!r} is not a column of {name} (it has {width} columns)")
        elif str(time_column) in names:
            t = names.index(str(time_column))
        else:
            raise DataError(f"time column {time_column!r} is not a column of {name}; its columns are {names}")
    elif names[0].lower() in TIME_NAMES or _number(body[0][0].strip()) is None:
        t = 0  # a first column named like a time, or one that holds no number (a date)
    else:
        t = None
    lab = names.index(LABEL_COLUMN) if has_header and LABEL_COLUMN in names and names.index(LABEL_COLUMN) != t else None
    channels = [j for j in range(width) if j not in (t, lab)]
    if not channels:
        raise DataError(f"{name} has no value columns besides its time and label columns; give at least one channel")
    values = np.empty((len(body), len(channels)), dtype=np.float64)
    for i, r in enumerate(body):
        for k, j in enumerate(channels):
            v = _number(r[j].strip())
            if v is None:
                what = "an empty field" if not r[j].strip() else f"{r[j].strip()!r}, not a number"
                raise DataError(f"{name} line {i + first_line}, column {names[j]!r}: {what}; every value column "
                                "must hold numbers (fill or drop missing values first; name a time column with "
                                "--time-column)")
            values[i, k] = v
    _check_values(values, [names[j] for j in channels], name, first_line)
    times = [r[t].strip() for r in body] if t is not None else None
    if times is not None:
        _check_times(times, name, first_line)
    labels = None
    if lab is not None:
        labels = _labels([r[lab].strip() for r in body], name, lambda i: f"line {i + first_line}")
    return Series(values, [names[j] for j in channels], times, labels, path.stem)


def read_series(source, *, time_column=None) -> Series:
    """A Series from a CSV path (a header row names the columns; a first column named time/timestamp/date/...
    or holding dates is the time index, or name it with `time_column`; a `label` column holds known 0/1
    anomalies), an .npy path or a numpy array (T, C) or (T,), a pandas DataFrame (its index is the time), or a
    Series (returned as it is). Values must be finite numbers; rows must come in time order."""
    if isinstance(source, Series):
        return source
    if isinstance(source, (str, os.PathLike)):
        path = Path(source)
        if not path.is_file():
            raise DataError(f"series file {os.fspath(source)!r} does not exist; give a .csv of time-indexed rows "
                            "or an .npy array (T, C)")
        if path.suffix.lower() == ".npy":
            try:
                arr = np.load(path, allow_pickle=False)
            except (ValueError, OSError, EOFError) as e:
                raise DataError(f"{path} is not a readable .npy array ({e})") from None
            return _from_array(arr, path.stem)
        if path.suffix.lower() not in (".csv", ".txt", ".tsv"):
            raise DataError(f"series file {path.name!r}: expected a .csv of time-indexed rows or an .npy array (T, C)")
        return _read_csv(path, time_column)
    if hasattr(source, "to_numpy") and hasattr(source, "columns"):  # a pandas DataFrame
        columns = [str(c) for c in source.columns]
        labels = None
        if LABEL_COLUMN in columns:
            labels = _labels(list(source[LABEL_COLUMN]), "DataFrame", lambda i: f"row {i}")
            source = source.drop(columns=[LABEL_COLUMN])
            columns = [str(c) for c in source.columns]
        out = _from_array(source.to_numpy(dtype=np.float64), "DataFrame", columns)
        out.times = [str(t) for t in source.index]
        out.labels = labels
        return out
    return _from_array(source, "array")


def _from_array(arr, name: str, columns: list[str] | None = None) -> Series:
    a = arr.detach().cpu().numpy() if isinstance(arr, torch.Tensor) else np.asarray(arr)
    if a.dtype.kind not in "biuf":
        raise DataError(f"{name}: a series needs numbers, got dtype {a.dtype}")
    if a.ndim == 1:
        a = a[:, None]
    if a.ndim != 2 or a.shape[0] < 1 or a.shape[1] < 1:
        raise DataError(f"{name}: a series has shape (T, C), one row per timestamp and one column per channel; got "
                        f"shape {a.shape}")
    values = a.astype(np.float64)
    columns = columns or [f"x{i}" for i in range(values.shape[1])]
    _check_values(values, columns, name)
    return Series(values, columns, None, None, name)


# ================================================================================================ windows


def window_starts(length: int, window: int, stride: int) -> np.ndarray:
    """The first row of each window: 0, stride, 2 stride, ..., and length - window when the last of those
    stops short of the end, so that every row is covered."""
    if length < window:
        raise DataError(f"the series has {length} rows, fewer than one window of {window}; give a longer series or "
                        "a shorter --window")
    starts = np.arange(0, length - window + 1, stride, dtype=np.int64)
    if starts[-1] != length - window:
        starts = np.append(starts, length - window)
    return starts


def windows(values: torch.Tensor, window: int, starts: np.ndarray) -> torch.Tensor:
    """The windows (N, C, window) of values (T, C) that start at `starts`: rows starts[n] .. starts[n]+window-1."""
    steps = torch.as_tensor(starts)[:, None] + torch.arange(window)
    return values[steps].transpose(1, 2)


def fold_windows(per_step: torch.Tensor, starts, total: torch.Tensor, count: torch.Tensor) -> None:
    """Add windows' values at each of their steps, per_step (N, window, ...), to the rows they cover: total[t] +=
    every value at row t, count[t] += the number of windows covering t (both float64, updated in place; the mean
    over the covering windows is total / count)."""
    rows = (torch.as_tensor(starts)[:, None] + torch.arange(per_step.shape[1])).reshape(-1)
    total.index_add_(0, rows, per_step.reshape(len(rows), *per_step.shape[2:]).to(total.dtype))
    count.index_add_(0, rows, torch.ones(len(rows), dtype=count.dtype))


# ============================================================================================ synthetic


# The anomalies synthetic_series injects: (first row, rows, channel, kind), in a series of at least 1,800 rows
INJECTED = ((500, 5, 0, "spike"), (900, 60, 1, "level shift"), (1400, 80, 2, "frequency change"),
            (1700, 60, 0, "time reversal"))
SYNTHETIC_COLUMNS = ("pressure", "flow", "temp")


def synthetic_series(rows: int, seed: int, anomalies=()) -> Series:
    """A generated sensor log to try a detector on (tests and benchmarks/series.py use it): three coupled
    periodic channels (periods of 50, 80 and 120 rows) with Gaussian noise of standard deviation 0.1, and the
    `anomalies` (entries of INJECTED: (first row, rows, channel, kind)) injected, labelled 1 row by row:
      spike             +1.5 on the channel
      level shift       +1.0 on the channel
      frequency change  the channel's period becomes 30 rows (its noise kept)
      time reversal     the channel's stretch runs backwards
    """
    rng = np.random.default_rng(seed)
    t = np.arange(rows)
    clean = np.stack([np.sin(2 * np.pi * t / 50), np.sin(2 * np.pi * t / 80 + 1) + 0.5 * np.sin(2 * np.pi * t / 50),
                      np.cos(2 * np.pi * t / 120)], 1)
    x = clean + 0.1 * rng.standard_normal(clean.shape)
    labels = np.zeros(rows, dtype=np.int64)
    for first, n, c, kind in anomalies:
        if first + n > rows:
            raise DataError(f"anomaly {kind!r} at rows {first}..{first + n - 1} does not fit in {rows} rows")
        at = slice(first, first + n)
        if kind == "spike":
            x[at, c] += 1.5
        elif kind == "level shift":
            x[at, c] += 1.0
        elif kind == "frequency change":
            x[at, c] += np.cos(2 * np.pi * t[at] / 30) - clean[at, c]
        elif kind == "time reversal":
            x[at, c] = x[at, c][::-1].copy()
        else:
            raise DataError(f"anomaly kind {kind!r} is unknown; choose one of spike, level shift, frequency "
                            "change, time reversal")
        labels[at] = 1
    return Series(x, list(SYNTHETIC_COLUMNS), None, labels if anomalies else None, f"synthetic-{seed}")


# =============================================================================================== detector


def _is_series_list(X) -> bool:
    """Whether X is several series (a list or tuple of paths, Series, arrays or DataFrames), not one array."""
    return isinstance(X, (list, tuple)) and all(
        isinstance(x, (str, os.PathLike, Series, np.ndarray, torch.Tensor)) or hasattr(x, "to_numpy") for x in X)


def _is_int(v, low: int = 1) -> bool:
    return isinstance(v, numbers.Integral) and not isinstance(v, bool) and v >= low


class SeriesDetector(BaseEstimator):
    """Anomaly scores for every timestamp of a multivariate series, from an autoencoder of its sliding windows
    (see the module docstring).

    Parameters
      window, stride    rows per window and rows between window starts [64; stride None: window // 4]
      model             a registered model: "ae" (reconstruction error), "vae", ... ["ae"]
      latent_dim, channels, hidden   the network: 1-D convs of `channels` (each halves the length), dense
                        layers `hidden`, a code of latent_dim [8, (32, 64), (128,)]
      gaussian_sigma    the Gaussian likelihood's σ in standardized units [0.1; it weighs the KL of a VAE]
      epochs, batch_size, lr   training [None: enough epochs for about 3000 optimizer steps, 20 to 300; 64;
                        1e-3]
      fpr               the false-positive rate the threshold aims at on held-out normal rows [0.01]
      validation_fraction   the end of the training series held out to set the threshold [0.2]
      random_state, threads, verbose
    Fitted: model_, mean_, scale_ (per channel), columns_, threshold_, n_windows_ (training windows), history_.
    """

    def __init__(self, window=64, stride=None, *, model="ae", latent_dim=8, channels=(32, 64), hidden=(128,),
                 gaussian_sigma=0.1, epochs=None, batch_size=64, lr=1e-3, fpr=0.01, validation_fraction=0.2,
                 random_state=0, threads=None, verbose=False):
        self.window = window
        self.stride = stride
        self.model = model
        self.latent_dim = latent_dim
        self.channels = channels
        self.hidden = hidden
        self.gaussian_sigma = gaussian_sigma
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.fpr = fpr
        self.validation_fraction = validation_fraction
        self.random_state = random_state
        self.threads = threads
        self.verbose = verbose

    @property
    def stride_(self) -> int:
        return self.stride if self.stride is not None else max(1, self.window // 4)

    def problems(self) -> list[str]:
        out = []
        if not _is_int(self.window, 2):
            out.append(f"window={self.window!r} must be an integer >= 2 (rows per window)")
        if self.stride is not None and not _is_int(self.stride):
            out.append(f"stride={self.stride!r} must be a positive integer (rows between window starts) or None")
        elif self.stride is not None and _is_int(self.window, 2) and self.stride > self.window:
            out.append(f"stride={self.stride} is larger than window={self.window}: rows between windows would be "
                       "neither learned nor scored; use a stride <= the window")
        if not (isinstance(self.fpr, numbers.Real) and 0 < self.fpr < 1):
            out.append(f"fpr={self.fpr!r} must be a number in (0, 1): the false-positive rate on held-out normal "
                       "rows")
        if not (isinstance(self.validation_fraction, numbers.Real) and 0 < self.validation_fraction < 1):
            out.append(f"validation_fraction={self.validation_fraction!r} must be in (0, 1): the end of the "
                       "training series held out to set the threshold")
        return out

    # ------------------------------------------------------------------------------------------ fitting

    def epochs_for(self, n_windows: int) -> int:
        """The epochs of training on n_windows windows: `epochs`, or with None about 3000 optimizer steps
        (between 20 and 300 epochs)."""
        if self.epochs is not None:
            return self.epochs
        steps = max(1, math.ceil(n_windows / self.batch_size)) if _is_int(self.batch_size) else 1
        return min(300, max(20, math.ceil(3000 / steps)))

    def _config(self, n_channels: int, n_windows: int = 1):
        from vaelab.config import ModelConfig, TrainConfig

        tup = (lambda v: tuple(v) if isinstance(v, (list, tuple)) else v)
        model = ModelConfig(model=self.model, arch="conv", input_shape=(n_channels, self.window),
                            latent_dim=self.latent_dim, channels=tup(self.channels), hidden=tup(self.hidden),
                            likelihood="gaussian", gaussian_sigma=self.gaussian_sigma)
        train = TrainConfig(epochs=self.epochs_for(n_windows), batch_size=self.batch_size, lr=self.lr,
                            seed=int(self.random_state or 0), progress=bool(self.verbose),
                            precision="fp32")  # the same fit for the same random_state everywhere (sklearn.py)
        return model, train

    def fit(self, X, y=None) -> SeriesDetector:
        """Learn the windows of the normal series X (anything read_series reads, or a list of such series: several
        runs of normal operation, whose windows never cross from one to the next), then set the threshold on the
        held-out end of each. Returns self."""
        from vaelab.data.arrays import ArrayDataset
        from vaelab.models import build_model
        from vaelab.sklearn import torch_threads
        from vaelab.training import fit

        problems = self.problems()
        if problems:
            raise ConfigError(problems, "SeriesDetector parameters")
        parts = [read_series(x) for x in X] if _is_series_list(X) else [read_series(X)]
        if not parts:
            raise DataError("got an empty list of training series; give at least one series of normal operation")
        w, s = self.window, self.stride_
        cut = [len(p) - int(round(len(p) * self.validation_fraction)) for p in parts]  # rows that train
        for p, n in zip(parts, cut):
            if p.columns != parts[0].columns:
                raise DataError(f"{p.name} has the channels {p.columns}, {parts[0].name} has {parts[0].columns}; "
                                "every training series needs the same columns in the same order")
            if n < w or len(p) - n < w:
                least = math.ceil(w / min(self.validation_fraction, 1 - self.validation_fraction))
                raise DataError(f"the training series {p.name} has {len(p)} rows: its first {n} train the model and "
                                f"its last {len(p) - n} set the threshold, and each part needs at least one window "
                                f"of {w} rows; give at least {least} rows of normal operation or a shorter window")
        n_windows = sum((n - w) // s + 1 for n in cut)
        model_cfg, train_cfg = self._config(len(parts[0].columns), n_windows)
        problems = model_cfg.problems() + train_cfg.problems()
        if problems:
            raise ConfigError(problems, "SeriesDetector parameters")
        train_rows = np.concatenate([p.values[:n] for p, n in zip(parts, cut)])
        self.mean_ = train_rows.mean(axis=0)
        std = train_rows.std(axis=0)
        self.scale_ = np.where(std > 0, std, 1.0)  # a constant channel: centred, not scaled
        self.columns_ = list(parts[0].columns)
        z = [torch.from_numpy((p.values - self.mean_) / self.scale_).float() for p in parts]
        # (N, C, w) windows every s rows of each training part: a view of one series (no copies), else their union
        views = [t[:n].t().unfold(1, w, s).permute(1, 0, 2) for t, n in zip(z, cut)]
        data = ArrayDataset(views[0] if len(views) == 1 else torch.cat(views), None, 1.0,
                            name=f"{parts[0].name} windows")
        self.n_windows_ = len(data)
        with torch_threads(self.threads), torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(self.random_state or 0))
            self.model_ = build_model(model_cfg)
            self.history_ = fit(self.model_, data, None, train_cfg)
            self.model_.eval()
            held = np.concatenate([self._timestamp_scores(t[n:]).sum(axis=1) for t, n in zip(z, cut)])
        self.threshold_ = float(np.quantile(held, 1.0 - self.fpr))
        return self

    # ------------------------------------------------------------------------------------------ scoring

    def _check_fitted(self) -> None:
        if not hasattr(self, "model_"):
            raise ConfigError("this SeriesDetector is not fitted yet; call fit(normal_series) first, or load one "
                              "with SeriesDetector.load(directory)", "SeriesDetector")

    def _standardized(self, series: Series) -> torch.Tensor:
        c = series.values.shape[1]
        if c != len(self.columns_):
            raise DataError(f"{series.name} has {c} channels {series.columns}; this detector was fitted on "
                            f"{len(self.columns_)}: {self.columns_}. Score a series with the training series' "
                            "columns, in the same order")
        return torch.from_numpy((series.values - self.mean_) / self.scale_).float()

    @torch.no_grad()
    def _timestamp_scores(self, z: torch.Tensor, batch: int = 512) -> np.ndarray:
        """(T, C) float64: each timestamp's error per channel, averaged over the windows that cover it."""
        w = self.window
        starts = window_starts(len(z), w, self.stride_)
        total = torch.zeros(len(z), z.shape[1], dtype=torch.float64)
        count = torch.zeros(len(z), dtype=torch.float64)
        for i in range(0, len(starts), batch):
            part = starts[i:i + batch]
            x = windows(z, w, part)
            err = -self.model_.likelihood.log_prob(x, self.model_.reconstruct_raw(x))  # (B, C, w)
            fold_windows(err.transpose(1, 2), part, total, count)
        return (total / count[:, None]).numpy()

    def score_timestamps(self, X, *, per_channel: bool = False) -> np.ndarray:
        """The anomaly score of every timestamp of X (higher = more anomalous), float64 (T,); per_channel=True:
        (T, C), each channel's part (they sum to the score)."""
        self._check_fitted()
        series = read_series(X)
        from vaelab.sklearn import torch_threads

        with torch_threads(self.threads):
            found = self._timestamp_scores(self._standardized(series))
        return found if per_channel else found.sum(axis=1)

    def predict(self, X) -> np.ndarray:
        """bool (T,): True where a timestamp's score exceeds threshold_."""
        return self.score_timestamps(X) > self.threshold_

    def segments(self, X, scores: np.ndarray | None = None, threshold: float | None = None) -> list[dict]:
        """The flagged stretches of X, in time order: {"first", "last" (row indices), "start", "end" (their
        times), "rows", "peak" (the highest score), "peak_at" (its time), "channel" (the channel with the
        largest part of the score summed over the stretch)}. `scores` (per channel, (T, C)) and `threshold`
        default to the detector's."""
        series = read_series(X)
        per = scores if scores is not None else self.score_timestamps(series, per_channel=True)
        total = per.sum(axis=1)
        flagged = total > (self.threshold_ if threshold is None else threshold)
        out = []
        for a, b in spans(flagged):
            peak = a + int(np.argmax(total[a:b]))
            out.append({"first": int(a), "last": int(b - 1), "start": series.time_of(int(a)),
                        "end": series.time_of(int(b - 1)), "rows": int(b - a), "peak": float(total[peak]),
                        "peak_at": series.time_of(peak),
                        "channel": self.columns_[int(np.argmax(per[a:b].sum(axis=0)))]})
        return out

    # ------------------------------------------------------------------------------------- save / load

    def save(self, directory) -> None:
        """The model and the fitted detector into a directory: config.json + model.safetensors."""
        from vaelab.models.pretrained import save_pretrained

        self._check_fitted()
        params = {k: list(v) if isinstance(v, tuple) else v for k, v in self.get_params().items()}
        state = {"params": params, "mean": self.mean_.tolist(), "scale": self.scale_.tolist(),
                 "columns": self.columns_, "threshold": self.threshold_}
        save_pretrained(self.model_, directory, extra={SERIES_KEY: state})

    @classmethod
    def load(cls, directory) -> SeriesDetector:
        """A fitted detector from a directory written by `save` (or `vaelab series --out`)."""
        from vaelab.io import read_config
        from vaelab.models import from_pretrained

        state = read_config(directory).get(SERIES_KEY)
        try:
            det = cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in state["params"].items()})
            det.mean_ = np.asarray(state["mean"], dtype=np.float64)
            det.scale_ = np.asarray(state["scale"], dtype=np.float64)
            det.columns_ = [str(c) for c in state["columns"]]
            det.threshold_ = float(state["threshold"])
            if not (det.mean_.shape == det.scale_.shape == (len(det.columns_),)):
                raise ValueError("mean, scale and columns differ in length")
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{directory}/config.json has no valid '{SERIES_KEY}' section ({e}); it was not "
                                  "written by SeriesDetector.save or `vaelab series`") from None
        model = from_pretrained(directory)
        if tuple(model.config.input_shape) != (len(det.columns_), det.window):
            raise CheckpointError(f"{directory}: the model takes windows of shape {tuple(model.config.input_shape)}, "
                                  f"but the detector's section says {len(det.columns_)} channels of {det.window} "
                                  "rows; the files do not belong together")
        det.model_ = model.eval()
        det.history_ = []
        return det


__all__ = ["Series", "SeriesDetector", "read_series", "window_starts", "windows", "fold_windows", "synthetic_series",
           "INJECTED", "SERIES_KEY"]
