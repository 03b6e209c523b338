"""Experiment tracking (`vaelab train --tracker`), against the real things: an MLflow tracking server started
here on a free 127.0.0.1 port with a SQLite store, read back with MLflow's own client; TensorBoard's event files
read back with TensorBoard's EventAccumulator. Runs are tiny digits runs through the CLI: a subprocess where it is
SIGKILLed or paused, in-process (vaelab.cli.main, the same code without the start-up) elsewhere."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from test_reliability import PAUSE_AFTER_CHECKPOINT, _env, _wait_for

from vaelab.cli import main
from vaelab.errors import ConfigError

TRAIN = ("train", "--no-progress", "--dataset", "digits", "--seed", "3")


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _flat(d: dict, prefix: str = "") -> dict[str, str]:
    """config.json as MLflow params, by the documented rule: dotted keys, strings as they are, the rest JSON."""
    out = {}
    for k, v in d.items():
        if isinstance(v, dict) and v:
            out.update(_flat(v, f"{prefix}{k}."))
        else:
            out[prefix + k] = v if isinstance(v, str) else json.dumps(v)
    return out


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


# The child pauses right after its first checkpoint is in place (before that epoch reaches the tracker), until
# the test creates the file `go`. Nothing in vaelab is changed.
PAUSE_UNTIL_GO = """
import os, sys, time
marker, go = sys.argv[1], sys.argv[2]
real_replace = os.replace
def replace_then_wait(src, dst, *a, **k):
    real_replace(src, dst, *a, **k)
    if str(dst).endswith("checkpoint.safetensors") and not os.path.exists(marker):
        open(marker, "w").close()
        while not os.path.exists(go):
            time.sleep(0.02)
os.replace = replace_then_wait
from vaelab.cli import main
sys.exit(main(sys.argv[3:]))
"""


class Server:
    def __init__(self, uri: str, proc: subprocess.Popen):
        self.uri, self.proc = uri, proc


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory):
    """`mlflow server` on a free port, a SQLite store and a local artifact folder (a Server: uri, proc)."""
    root = tmp_path_factory.mktemp("mlflow")
    port = _free_port()
    # one worker and no job runner: what a test needs, and half the start-up time
    env = dict(os.environ, MLFLOW_SERVER_ENABLE_JOB_EXECUTION="false")
    with open(root / "server.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server", "--backend-store-uri",
                                 f"sqlite:///{root / 'mlflow.db'}", "--artifacts-destination", str(root / "artifacts"),
                                 "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                                stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    uri, t0 = f"http://127.0.0.1:{port}", time.monotonic()
    try:
        while True:
            try:
                with urllib.request.urlopen(uri + "/health", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() - t0 > 180:
                raise AssertionError(f"mlflow server did not start:\n{(root / 'server.log').read_text()}")
            time.sleep(0.2)
        print(f"mlflow server up in {time.monotonic() - t0:.1f} s")
        yield Server(uri, proc)
    finally:
        os.killpg(proc.pid, signal.SIGTERM)  # the server and its uvicorn worker
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="module")
def killed_and_resumed(mlflow_server, tmp_path_factory) -> dict:
    """A tracked run SIGKILLed right after epoch 2's checkpoint (before epoch 2 reached MLflow), then resumed
    with --epochs 4 and no --tracker (the run's tracking.json says MLflow): its MLflow state at the kill, and
    the run directory at the end."""
    from mlflow import MlflowClient

    tmp = tmp_path_factory.mktemp("tracked")
    out, marker = tmp / "run", tmp / "paused"
    child = subprocess.Popen([sys.executable, "-c", PAUSE_AFTER_CHECKPOINT, str(marker), "2", *TRAIN, "--epochs", "3",
                              "--no-pictures", "--tracker", "mlflow", "--mlflow-uri", mlflow_server.uri,
                              "--mlflow-experiment", "vaelab-tests", "--out", str(out)],
                             env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(marker.exists, child, timeout=300)
    child.send_signal(signal.SIGKILL)
    child.wait()
    first = json.loads((out / "tracking.json").read_text())
    client = MlflowClient(mlflow_server.uri)
    at_kill = client.get_run(first["run_id"])
    steps_at_kill = [m.step for m in client.get_metric_history(first["run_id"], "train_loss")]
    assert main([*TRAIN, "--resume", "--epochs", "4", "--out", str(out)]) == 0  # in-process: a CLI run is cheaper
    return {"out": out, "first": first, "client": client, "status_at_kill": at_kill.info.status,
            "steps_at_kill": steps_at_kill}


@pytest.mark.slow  # the MLflow server's start-up alone is ~20 s
def test_a_resumed_run_continues_the_same_mlflow_run_with_each_epoch_once(killed_and_resumed, mlflow_server):
    k = killed_and_resumed
    out, client, run_id = k["out"], k["client"], k["first"]["run_id"]
    assert k["status_at_kill"] == "RUNNING" and k["steps_at_kill"] == [1]  # killed before epoch 2 was logged
    assert json.loads((out / "tracking.json").read_text()) == k["first"]  # the same MLflow run, on
    assert k["first"]["tracking_uri"] == mlflow_server.uri
    experiment = client.get_experiment_by_name("vaelab-tests")
    runs = client.search_runs([experiment.experiment_id])
    assert [r.info.run_id for r in runs] == [run_id]  # ... and no second one
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED" and run.info.run_name == "run"
    rows = _rows(out)
    assert [r["epoch"] for r in rows] == [1, 2, 3, 4]
    for key in rows[0]:  # every metric, each epoch once, the exact float metrics.jsonl holds
        if key == "epoch":
            continue
        history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, key))
        assert history == [(r["epoch"], float(r[key])) for r in rows], key
    assert set(run.data.metrics) == set(rows[0]) - {"epoch"}


@pytest.mark.slow  # the MLflow server's start-up alone is ~20 s
def test_mlflow_params_are_the_run_settings_and_a_resume_records_what_changed(killed_and_resumed):
    k = killed_and_resumed
    run = k["client"].get_run(k["first"]["run_id"])
    config = json.loads((k["out"] / "config.json").read_text())
    expected = _flat(config)
    assert expected["train.epochs"] == "4" and expected["train.lr"] == "0.001" and expected["model.model"] == "vae"
    expected["train.epochs"] = "3"  # MLflow's params never change: the first start's value stays ...
    assert run.data.params == expected
    resumed = {k: v for k, v in run.data.tags.items() if k.startswith("resumed.")}
    assert resumed == {"resumed.train.epochs": "4"}  # ... and the resumed run's new value is a tag


@pytest.mark.slow  # the MLflow server's start-up alone is ~20 s
def test_mlflow_artifacts_are_the_pictures_and_the_model_byte_for_byte(killed_and_resumed, tmp_path):
    k = killed_and_resumed
    out, client, run_id = k["out"], k["client"], k["first"]["run_id"]
    pngs = sorted(p.name for p in out.glob("*.png"))
    assert pngs == ["interpolation.png", "latents.png", "manifold.png", "reconstructions.png", "samples.png"]
    expected = {f"pictures/{n}": out / n for n in pngs}
    expected.update({"model/model.safetensors": out / "model.safetensors", "model/config.json": out / "config.json",
                     "evaluation.json": out / "evaluation.json"})
    listed = {a.path for folder in ("", "pictures", "model") for a in client.list_artifacts(run_id, folder or None)
              if not a.is_dir}
    assert listed == set(expected)
    local = Path(client.download_artifacts(run_id, "", str(tmp_path)))
    for path, source in expected.items():
        assert (local / path).read_bytes() == source.read_bytes(), path


@pytest.mark.slow
def test_a_server_down_mid_run_costs_the_run_nothing_and_a_resume_catches_up(mlflow_server, tmp_path, capsys):
    from mlflow import MlflowClient

    out, marker, go = tmp_path / "run", tmp_path / "paused", tmp_path / "go"
    env = dict(_env(), MLFLOW_HTTP_REQUEST_TIMEOUT="2", MLFLOW_HTTP_REQUEST_MAX_RETRIES="0")
    child = subprocess.Popen([sys.executable, "-c", PAUSE_UNTIL_GO, str(marker), str(go), *TRAIN, "--epochs", "2",
                              "--no-pictures", "--tracker", "mlflow", "--mlflow-uri", mlflow_server.uri,
                              "--out", str(out)], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    _wait_for(marker.exists, child, timeout=300)
    os.killpg(mlflow_server.proc.pid, signal.SIGSTOP)  # the server stops answering (its port still accepts)
    try:
        go.touch()
        _, stderr = child.communicate(timeout=300)
    finally:
        os.killpg(mlflow_server.proc.pid, signal.SIGCONT)
    assert child.returncode == 0, stderr
    assert "vaelab: warning: MLflow logging failed" in stderr and "training goes on without MLflow" in stderr
    assert [r["epoch"] for r in _rows(out)] == [1, 2] and (out / "model.safetensors").is_file()
    run_id = json.loads((out / "tracking.json").read_text())["run_id"]
    client = MlflowClient(mlflow_server.uri)
    assert client.get_metric_history(run_id, "train_loss") == []
    # with the server back, a resume with nothing left to train gives the MLflow run what it missed
    assert main([*TRAIN, "--resume", "--no-pictures", "--out", str(out)]) == 0
    assert sorted((m.step, m.value) for m in client.get_metric_history(run_id, "train_loss")) == \
        [(r["epoch"], r["train_loss"]) for r in _rows(out)]
    assert client.get_run(run_id).info.status == "FINISHED"
    assert {a.path for a in client.list_artifacts(run_id, "model")} == {"model/model.safetensors", "model/config.json"}
    # a run id the server does not hold (its database was reset, say) is an error before anything is trained
    record = json.loads((out / "tracking.json").read_text())
    (out / "tracking.json").write_text(json.dumps({**record, "run_id": "0" * 32}))
    capsys.readouterr()
    assert main([*TRAIN, "--resume", "--no-pictures", "--epochs", "3", "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"vaelab: error: invalid tracker: the run's MLflow run '{'0' * 32}'"), err
    assert "cannot be continued on" in err and "Traceback" not in err
    assert len(_rows(out)) == 2 and json.loads((out / "config.json").read_text())["train"]["epochs"] == 2


def test_an_unreachable_mlflow_server_fails_before_training(tmp_path, capsys):
    port = _free_port()  # nothing listens there
    out = tmp_path / "run"
    assert main([*TRAIN, "--epochs", "1", "--tracker", "mlflow", "--mlflow-uri", f"http://127.0.0.1:{port}",
                 "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"vaelab: error: invalid tracker: the MLflow tracking server 'http://127.0.0.1:{port}' "
                          "cannot be reached"), err
    assert "--mlflow-uri" in err and "Traceback" not in err
    assert not out.exists()  # checked before the data loads: not a file written


def test_a_tracker_with_its_package_missing_names_the_extra(monkeypatch):
    from vaelab.training.tracking import make_tracker

    monkeypatch.setitem(sys.modules, "mlflow", None)  # what `import mlflow` meets when it is not installed
    with pytest.raises(ConfigError, match=r'pip install "vaelab\[mlflow\]"'):
        make_tracker("mlflow")
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ConfigError, match=r'pip install "vaelab\[tensorboard\]"'):
        make_tracker("tensorboard")
    with pytest.raises(ConfigError, match="tracker 'wandb' is not one of tensorboard, mlflow"):
        make_tracker("wandb")


def test_fit_refuses_a_tracker_without_a_run_directory():
    from vaelab.data import load_dataset
    from vaelab.models import build_model
    from vaelab.training import fit

    data = load_dataset("digits")
    model = build_model("seed-vae", input_shape=data.train.sample_shape)
    with pytest.raises(ConfigError, match=r"give fit a run directory \(out=...\)"):
        fit(model, data.train, epochs=1, progress=False, tracker="tensorboard")


def _scalars(log_dir: Path) -> dict[str, list[tuple[int, float]]]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def test_tensorboard_logs_only_when_asked_and_a_resume_logs_each_epoch_once(tmp_path, capsys):
    plain, tracked = tmp_path / "plain", tmp_path / "tracked"
    quick = (*TRAIN, "--no-pictures", "--threads", "1")
    assert main([*quick, "--epochs", "1", "--out", str(plain)]) == 0
    assert sorted(p.name for p in plain.iterdir()) == ["checkpoint.safetensors", "config.json", "evaluation.json",
                                                       "metrics.jsonl", "model.safetensors"]  # no tensorboard/
    assert "tracked in" not in capsys.readouterr().out
    assert main([*quick, "--epochs", "1", "--tracker", "tensorboard", "--out", str(tracked)]) == 0
    assert f"tracked in TensorBoard: tensorboard --logdir {tracked / 'tensorboard'}\n" in capsys.readouterr().out
    assert json.loads((tracked / "tracking.json").read_text()) == {"tracker": "tensorboard", "log_dir": "tensorboard"}
    assert main([*quick, "--epochs", "3", "--resume", "--out", str(tracked)]) == 0  # the run's tracker goes on
    rows = _rows(tracked)
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    scalars = _scalars(tracked / "tensorboard")
    keys = [k for k in rows[0] if k != "epoch"]
    assert sorted(scalars) == sorted(k.replace("_", "/", 1) for k in keys)
    for key in keys:  # TensorBoard keeps float32: each epoch once, metrics.jsonl's value rounded to float32
        assert scalars[key.replace("_", "/", 1)] == [(r["epoch"], float(np.float32(r[key]))) for r in rows], key
    # --tracker none stops it: a resumed run logs nothing more
    assert main([*quick, "--epochs", "4", "--resume", "--tracker", "none", "--out", str(tracked)]) == 0
    assert [s for s, _ in _scalars(tracked / "tensorboard")["train/loss"]] == [1, 2, 3]
