"""Experiment trackers: what `fit` tells TensorBoard or an MLflow tracking server about a run.

A tracker is asked for (`vaelab train --tracker mlflow`, `fit(..., tracker="mlflow")`); nothing is logged
otherwise. `fit` starts it (the run's settings as params, on a resumed run the epochs the tracker has not
seen yet), logs every epoch's metrics row with the epoch as the step, and the final model's files; the CLI
adds the pictures and ends it. Only the process that writes the run's files (rank 0 under torchrun) logs.

The run directory's tracking.json says which tracker the run uses (and its MLflow run id), so that a
resumed run continues the same MLflow run, and TensorBoard's event files, without being told again.

Failures: a tracker that cannot start (package missing, server unreachable, run id unknown) is a ConfigError
before the first epoch; one that fails later warns once and goes quiet, while training and the run's own
files go on: a tracking server going down never costs the run.
"""

from __future__ import annotations

import json
import math
import os
import socket
import sys
import time
from pathlib import Path
from urllib.parse import urlparse

from vaelab.errors import ConfigError
from vaelab.io import atomic_write_json

TRACKERS = ("tensorboard", "mlflow")
TRACKING_FILE = "tracking.json"  # which tracker the run uses, and its MLflow run id
TENSORBOARD_DIR = "tensorboard"  # TensorBoard's event files, inside the run directory
MLFLOW_DEFAULT_EXPERIMENT = "Default"  # MLflow's own default experiment


class Tracker:
    """The interface `fit` and the CLI talk to. Subclasses implement `_start`, `_log_epoch`, `_log_files`
    and `_end`; the public methods add what every tracker shares: nothing is logged before `start` (so the
    processes that write no files log nothing), and a failure after `start` warns once and silences the
    tracker instead of ending the run. A tracker is a context manager: its `with` block ends it, FAILED when
    the block raised (KILLED on Ctrl-C)."""

    name = "tracker"

    def __init__(self):
        self.started, self.failed = False, False

    def check(self) -> None:
        """Raise a ConfigError now if the tracker could not start (its package is missing, its server is
        unreachable), so a run fails before it spends any time training."""

    def start(self, run_dir: Path, params: dict, history: list[dict], resumed: bool) -> None:
        """Open the run in `run_dir`: `params` are its settings (nested dicts, flattened here), `history` the
        rows of the epochs done so far (a resumed run's), logged where the tracker lacks them."""
        self.check()
        self._start(Path(run_dir), flatten(params), history, resumed)
        self.started = True

    def log_epoch(self, row: dict) -> None:
        """One epoch's row of metrics (as metrics.jsonl has it), at step row['epoch']."""
        self._guarded(self._log_epoch, row)

    def log_files(self, paths, folder: str | None = None) -> None:
        """Files to keep with the tracked run (the pictures, the model), under `folder`."""
        self._guarded(self._log_files, [Path(p) for p in paths], folder)

    def end(self, status: str = "FINISHED") -> None:
        """Close the run: FINISHED, FAILED or KILLED."""
        self._guarded(self._end, status)
        self.started = False

    def where(self) -> str:
        """Where the tracked run can be looked at (once started)."""
        return ""

    def __enter__(self):
        return self

    def __exit__(self, kind, error, tb):
        self.end("FINISHED" if kind is None else "KILLED" if issubclass(kind, KeyboardInterrupt) else "FAILED")

    def _guarded(self, method, *args) -> None:
        if not self.started or self.failed:
            return
        try:
            method(*args)
        except Exception as e:  # noqa: BLE001 (whatever the tracker raises, it must not end the training run)
            self.failed = True
            print(f"vaelab: warning: {self.name} logging failed ({type(e).__name__}: {e}); training goes on "
                  f"without {self.name} and the run directory's own files stay complete "
                  f"(metrics.jsonl, checkpoint, model); resuming the run later, once {self.name} works again, "
                  "logs what it missed", file=sys.stderr, flush=True)

    def _start(self, run_dir: Path, params: dict[str, str], history: list[dict], resumed: bool) -> None:
        raise NotImplementedError

    def _log_epoch(self, row: dict) -> None:
        raise NotImplementedError

    def _log_files(self, paths: list[Path], folder: str | None) -> None:
        pass

    def _end(self, status: str) -> None:
        pass


class TensorBoardTracker(Tracker):
    """Event files in <run>/tensorboard: a scalar per metric (train_loss as train/loss, ...) at step = epoch,
    the settings as a text. A resumed run purges what the earlier process logged and logs its history again,
    so each epoch is there once whatever was logged before a crash. Files are not logged (they are in the run
    directory already)."""

    name = "TensorBoard"

    def __init__(self):
        super().__init__()
        self.writer, self.log_dir = None, None

    def where(self) -> str:
        return f"tensorboard --logdir {self.log_dir}"

    def check(self) -> None:
        _import("torch.utils.tensorboard", "tensorboard")

    def _start(self, run_dir, params, history, resumed):
        from torch.utils.tensorboard import SummaryWriter

        # purge_step=1: TensorBoard hides every epoch written before (by a resumed run's earlier process, or an
        # overwritten run), and the history is logged again below
        self.log_dir = run_dir / TENSORBOARD_DIR
        self.writer = SummaryWriter(log_dir=str(self.log_dir), purge_step=1)
        if not resumed:
            self.writer.add_text("settings", "\n".join(f"    {k} = {v}" for k, v in params.items()), 0)
        _write_tracking(run_dir, {"tracker": "tensorboard", "log_dir": TENSORBOARD_DIR})
        for row in history:
            self._log_epoch(row)

    def _log_epoch(self, row):
        for k, v in _metrics(row).items():
            self.writer.add_scalar(k.replace("_", "/", 1), v, row["epoch"])
        self.writer.flush()

    def _end(self, status):
        if self.writer is not None:
            self.writer.close()
            self.writer = None


class MLflowTracker(Tracker):
    """An MLflow run on a tracking server (or a local store): the settings as params, every epoch's metrics
    at step = epoch, files as artifacts. `uri` and `experiment` default to MLFLOW_TRACKING_URI and
    MLFLOW_EXPERIMENT_NAME (then MLflow's own defaults). A resumed run (`resumed=True` with a tracking.json
    of MLflow) continues the MLflow run recorded there, on the server recorded there unless `uri` is given:
    params it lacks are added, changed ones (say a raised --epochs) are set as tags resumed.<param>, since
    MLflow's params never change; epochs it lacks are logged."""

    name = "MLflow"

    def __init__(self, uri: str | None = None, experiment: str | None = None):
        super().__init__()
        self.uri, self.experiment = uri, experiment
        self.client, self.run_id = None, None

    def where(self) -> str:
        return f"run {self.run_id} at {self.client.tracking_uri if self.client else self.uri}"

    def check(self) -> None:
        _import("mlflow", "mlflow")
        uri = self.uri or os.environ.get("MLFLOW_TRACKING_URI")
        if uri:
            _check_reachable(uri)

    def _start(self, run_dir, params, history, resumed):
        from mlflow import MlflowClient
        from mlflow.exceptions import MlflowException

        saved = read_tracking(run_dir) if resumed else None
        saved = saved if saved and saved.get("tracker") == "mlflow" else None
        if saved and not self.uri:  # the run id belongs to the server that made it
            self.uri = saved.get("tracking_uri")
        uri = self.uri or os.environ.get("MLFLOW_TRACKING_URI") or None
        if uri:
            _check_reachable(uri)
        self.client = MlflowClient(tracking_uri=uri)
        where = f"MLflow tracking server {self.client.tracking_uri!r}"
        try:
            if saved:
                run = self.client.get_run(saved["run_id"])
                self.run_id = run.info.run_id
                self.client.update_run(self.run_id, status="RUNNING")
                logged = run.data.params
            else:
                name = self.experiment or os.environ.get("MLFLOW_EXPERIMENT_NAME") or MLFLOW_DEFAULT_EXPERIMENT
                experiment = self.client.get_experiment_by_name(name)
                experiment_id = experiment.experiment_id if experiment else self.client.create_experiment(name)
                run = self.client.create_run(experiment_id, run_name=run_dir.resolve().name,
                                             tags={"vaelab.run_dir": str(run_dir.resolve())})
                self.run_id, logged = run.info.run_id, {}
                _write_tracking(run_dir, {"tracker": "mlflow", "tracking_uri": self.client.tracking_uri,
                                          "experiment_id": experiment_id, "run_id": self.run_id})
            self._log_params(params, logged)
            if history:  # a resumed run: the epochs the MLflow run lacks (those a crash or an untracked run left out)
                key = next(iter(_metrics(history[0])))
                seen = {m.step for m in self.client.get_metric_history(self.run_id, key)}
                for row in history:
                    if row["epoch"] not in seen:
                        self._log_epoch(row)
        except MlflowException as e:
            if saved:
                raise ConfigError(
                    f"the run's MLflow run {saved['run_id']!r} (recorded in {str(run_dir / TRACKING_FILE)!r}) "
                    f"cannot be continued on {where}: {e.message}; pass the --mlflow-uri of the server that holds "
                    "it, or resume with --tracker none", "tracker") from None
            raise ConfigError(f"{where} refused the run: {e.message}", "tracker") from None

    def _log_params(self, params: dict[str, str], logged: dict[str, str]) -> None:
        """The params the MLflow run lacks; a changed one as a tag resumed.<param> (params never change)."""
        from mlflow.entities import Param, RunTag

        new = [Param(k, v) for k, v in params.items() if k not in logged]
        changed = [RunTag(f"resumed.{k}", v) for k, v in params.items() if k in logged and logged[k] != v]
        for i in range(0, max(len(new), len(changed)), 100):  # MLflow takes 100 params a call
            self.client.log_batch(self.run_id, params=new[i:i + 100], tags=changed[i:i + 100])

    def _log_epoch(self, row):
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, v, now, row["epoch"])
                                                    for k, v in _metrics(row).items()])

    def _log_files(self, paths, folder):
        for p in paths:
            self.client.log_artifact(self.run_id, str(p), artifact_path=folder)

    def _end(self, status):
        self.client.set_terminated(self.run_id, status=status)


def make_tracker(name: str | None, *, mlflow_uri: str | None = None,
                 mlflow_experiment: str | None = None) -> Tracker | None:
    """The tracker called `name` ('tensorboard', 'mlflow'; None or 'none' for none), checked (ConfigError
    if it could not start)."""
    if name is None or name == "none":
        return None
    if name not in TRACKERS:
        raise ConfigError(f"tracker {name!r} is not one of {', '.join(TRACKERS)}; choose one of them, or none",
                          "tracker")
    tracker = TensorBoardTracker() if name == "tensorboard" else MLflowTracker(mlflow_uri, mlflow_experiment)
    tracker.check()
    return tracker


def read_tracking(run_dir) -> dict | None:
    """The run directory's tracking.json (which tracker the run uses), or None."""
    path = Path(run_dir) / TRACKING_FILE
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as e:
        raise ConfigError(f"{str(path)!r} cannot be read ({e}); delete it to start tracking afresh", "tracker") \
            from None


def flatten(params: dict, prefix: str = "") -> dict[str, str]:
    """Nested settings as MLflow params: dotted keys ('train.lr'), strings as they are, every other value as
    JSON (so json.loads gives it back: 0.001, true, [32, 64], null)."""
    flat = {}
    for k, v in params.items():
        if isinstance(v, dict) and v:
            flat.update(flatten(v, f"{prefix}{k}."))
        else:
            flat[prefix + k] = v if isinstance(v, str) else json.dumps(v)
    return flat


def _metrics(row: dict) -> dict[str, float]:
    """A metrics row's numbers but the epoch (the step they are logged at)."""
    return {k: float(v) for k, v in row.items() if k != "epoch" and isinstance(v, (int, float))
            and not isinstance(v, bool) and math.isfinite(v)}


def _write_tracking(run_dir: Path, record: dict) -> None:
    atomic_write_json(run_dir / TRACKING_FILE, record)


def _import(module: str, extra: str) -> None:
    import importlib

    try:
        importlib.import_module(module)
    except ImportError as e:
        raise ConfigError(f"the {extra} tracker needs the {extra} package, which cannot be imported ({e}); "
                          f'install it with: pip install "vaelab[{extra}]"', "tracker") from None


def _check_reachable(uri: str, timeout: float = 5.0) -> None:
    """A ConfigError unless an http(s) tracking server answers at `uri` (a local store is not checked)."""
    parts = urlparse(uri)
    if parts.scheme not in ("http", "https"):
        return
    port = parts.port or (443 if parts.scheme == "https" else 80)
    try:
        socket.create_connection((parts.hostname, port), timeout=timeout).close()
    except OSError as e:
        raise ConfigError(f"the MLflow tracking server {uri!r} cannot be reached ({e}); start it (mlflow server "
                          "...), or give the right --mlflow-uri (or MLFLOW_TRACKING_URI), or train without "
                          "--tracker mlflow", "tracker") from None
