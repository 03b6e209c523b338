"""`vaelab tune`: the search file's checks, every objective, pruning, best.toml that `vaelab train --config` takes,
the plots, and the study in SQLite surviving a kill -9 and shared by two processes (real subprocesses). Selection
happens on a validation split held out of the training split (the same rows in every trial and process); the test
split is measured once, for the best trial.

Everything trains small MLP VAEs on scikit-learn's digits with one thread.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

optuna = pytest.importorskip("optuna")

from vaelab.cli import main  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
FIXED = 'model = "vae"\narch = "mlp"\nhidden = [32]\nlatent-dim = 2\nthreads = 1\n'


def write_search(path: Path, space: str, fixed: str = FIXED, study: str = "") -> Path:
    path.write_text(f"[space]\n{space}\n[fixed]\n{fixed}\n[study]\n{study}\n", encoding="utf-8")
    return path


def tune(capsys, *args) -> tuple[int, str, str]:
    rc = main(["tune", *map(str, args)])
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def trials(out: Path, study: str = "tune") -> list:
    return optuna.load_study(study_name=study, storage=f"sqlite:///{out / 'study.db'}").get_trials()


def states(ts) -> dict:
    found: dict = {}
    for t in ts:
        found[t.state.name] = found.get(t.state.name, 0) + 1
    return found


def history(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text(encoding="utf-8").splitlines()]


def held_out(out: Path) -> dict:
    return json.loads((out / "validation.json").read_text(encoding="utf-8"))


def digest(index) -> str:
    import hashlib

    import torch

    return hashlib.sha256(torch.as_tensor(index, dtype=torch.int64).numpy().tobytes()).hexdigest()[:16]


def selection_data(out: Path):
    """digits as a trial saw it: (its training rows, the validation rows, the test split), from validation.json."""
    import torch

    from vaelab.data import load_dataset

    data = load_dataset("digits")
    held = torch.tensor(held_out(out)["validation_index"])
    rest = torch.tensor(sorted(set(range(len(data.train))) - set(held.tolist())))
    return data.train.subset(rest), data.train.subset(held), data.test


def env() -> dict:
    e = dict(os.environ)
    e["PYTHONPATH"] = os.pathsep.join([str(REPO / "src")] + [p for p in [e.get("PYTHONPATH")] if p])
    e["OMP_NUM_THREADS"] = "1"
    return e


# ================================================================================== the search file


def test_every_problem_of_a_search_file_is_named_at_once(tmp_path, capsys):
    path = write_search(tmp_path / "bad.toml",
                        'latnt_dim = {choices = [2, 4]}\n'
                        'lr = {low = 0.01, high = 0.001}\n'
                        'beta = {low = 0, high = 4, log = true}\n'
                        'arch = {low = 1, high = 2}\n'
                        'epochs = {low = 1.5, high = 3}\n'
                        'hidden = {choices = ["x"]}\n',
                        fixed='model = "vae"\nout = "somewhere"\nbatchsize = 64\n',
                        study='objective = "nl"\nn_trails = 3\n')
    rc, _, err = tune(capsys, path, "--out", tmp_path / "s")
    assert rc == 1 and "Traceback" not in err
    assert err.startswith("vaelab: error: invalid search file")
    for needle in ("[space] latnt_dim: not a `vaelab train` setting (did you mean 'latent_dim' or 'latent2_dim'",
                   "[space] lr: low = 0.01 must be below high = 0.001",
                   "[space] beta: log = true needs low > 0 (got low = 0)",
                   "[space] arch: arch is a str setting: give it as {choices = [...]}, not a range",
                   "[space] epochs: low = 1.5 must be an integer (epochs is an integer setting)",
                   "[space] hidden: choice 'x': hidden = 'x' must be a list of integers",
                   "[fixed] 'out' cannot be fixed",
                   "[fixed] 'batchsize' is not a `vaelab train` setting (did you mean 'batch_size' or 'm1_batches'?)",
                   "[study] objective = 'nl' is unknown (did you mean 'nll'?)",
                   "[study] 'n_trails' is not a study setting (did you mean 'n_trials'?)"):
        assert needle in err, f"{needle!r} not in:\n{err}"
    assert not (tmp_path / "s").exists()  # nothing is written before the file is right


def test_a_searched_value_train_refuses_fails_before_any_trial(tmp_path, capsys):
    path = write_search(tmp_path / "s.toml", "latent-dim = {low = 0, high = 4}",
                        fixed=FIXED.replace("latent-dim = 2\n", ""))
    rc, _, err = tune(capsys, path, "--out", tmp_path / "s")
    assert rc == 1
    assert "with latent_dim = 0: latent_dim=0" in err, err


def test_the_objective_must_fit_the_model(tmp_path, capsys):
    path = write_search(tmp_path / "s.toml", "lr = {low = 1e-3, high = 1e-2}", fixed='model = "ae"\narch = "mlp"\n',
                        study='objective = "nll"')
    rc, _, err = tune(capsys, path, "--out", tmp_path / "s")
    assert rc == 1
    assert "objective 'nll' needs a model with a stochastic posterior and a prior, but the search may train 'ae'" in err
    path = write_search(tmp_path / "s.toml", "lr = {low = 1e-3, high = 1e-2}", study='objective = "nll"\n'
                        'direction = "maximize"')
    rc, _, err = tune(capsys, path, "--out", tmp_path / "s")
    assert "direction = 'maximize' contradicts objective = 'nll', which is minimized" in err


@pytest.mark.parametrize("value", ["0", "0.6", "true", '"tset"', "-0.1"])
def test_the_validation_share_is_a_fraction_or_test(tmp_path, capsys, value):
    path = write_search(tmp_path / "s.toml", "lr = {low = 1e-3, high = 1e-2}", study=f"validation = {value}")
    rc, _, err = tune(capsys, path, "--out", tmp_path / "s")
    assert rc == 1 and "Traceback" not in err
    shown = {"true": "True", '"tset"': "'tset'"}.get(value, value)
    assert (f"[study] validation = {shown} must be a fraction of the training split in (0, 0.5] to hold out for "
            'validation (e.g. 0.1), or "test" to select on the test split (optimistic)') in err, err
    assert not (tmp_path / "s").exists()


def test_validation_test_selects_on_the_test_split_as_asked(tmp_path, capsys):
    from vaelab import from_pretrained
    from vaelab.data import load_dataset
    from vaelab.training.validation import loss_terms

    out = tmp_path / "study"
    path = write_search(tmp_path / "s.toml", "lr = {low = 1e-3, high = 1e-2, log = true}",
                        fixed=FIXED + "epochs = 1\n", study='validation = "test"\nn_trials = 1\npruner = "none"')
    rc, stdout, err = tune(capsys, path, "--out", out)
    assert rc == 0, err
    (t,) = trials(out)
    run = Path(t.user_attrs["run_dir"])
    data = load_dataset("digits")
    assert history(run)[0]["step"] == -(-1617 // 128)  # the whole training split
    precision = json.loads((run / "config.json").read_text())["train"]["precision"]  # what auto chose
    assert t.value == loss_terms(from_pretrained(run), data.test, batch_size=256, precision=precision)["loss"]
    summary = json.loads((out / "study.json").read_text())
    assert summary["best_value_split"] == "test" and summary["best_test_value"] == t.value
    assert summary["validation"]["split"] == "test" and not (out / "validation.json").exists()
    assert json.loads((run / "evaluation.json").read_text())["split"] == "test"
    assert "selecting on the test split (180 rows; validation = \"test\": the best value is optimistic)" in stdout
    assert f"test split: val_loss {t.value:.6g}  (the split it was selected on: optimistic)" in stdout


def test_a_study_cannot_be_continued_with_another_search(tmp_path, capsys):
    out = tmp_path / "s"
    path = write_search(tmp_path / "s.toml", "lr = {low = 1e-3, high = 1e-2, log = true}",
                        fixed=FIXED + "epochs = 1\n", study="n_trials = 1\npruner = \"none\"")
    assert tune(capsys, path, "--out", out)[0] == 0
    write_search(path, "lr = {low = 1e-4, high = 1e-2, log = true}", fixed=FIXED + "epochs = 1\n",
                 study="n_trials = 1\npruner = \"none\"")
    rc, _, err = tune(capsys, path, "--out", out)
    assert rc == 1 and "study 'tune' in 'sqlite:///" in err and "was started from a different search" in err
    assert len(trials(out)) == 1


def test_a_yaml_search_file_is_the_same_search_as_its_toml(tmp_path):
    from vaelab.cli.tune import TrainTrainer
    from vaelab.tune import read_spec

    toml = write_search(tmp_path / "s.toml", 'beta = {low = 0.5, high = 8, log = true}\nlatent-dim = {choices = [2, 8]}\n'
                        'hidden = {choices = [[16], [32, 16]]}', fixed='model = "vae"\narch = "mlp"\nthreads = 1',
                        study='objective = "nll"\npruner = "hyperband"')
    yaml = tmp_path / "s.yaml"
    yaml.write_text("space:\n  beta: {low: 0.5, high: 8, log: true}\n  latent_dim: {choices: [2, 8]}\n"
                    "  hidden: {choices: [[16], [32, 16]]}\n"
                    "fixed: {model: vae, arch: mlp, threads: 1}\n"
                    "study: {objective: nll, pruner: hyperband}\n", encoding="utf-8")
    trainer = TrainTrainer()
    a, b = read_spec(toml, trainer), read_spec(yaml, trainer)
    assert a.space == b.space and a.study == b.study and a.fixed == b.fixed
    assert a.space[2].choices == ((16,), (32, 16)) and a.space[2].labels == ["16", "32,16"]
    assert a.direction == "minimize" and a.prune_on == "val_elbo" and a.models == ("vae",)


# ==================================================================================== a whole search


def test_search_writes_best_settings_that_train_reproduces(tmp_path, capsys):
    out = tmp_path / "study"
    path = write_search(tmp_path / "s.toml",
                        'beta = {low = 0.5, high = 4, log = true}\n'
                        'hidden = {choices = [[16], [32, 16]]}\n'
                        'batch-size = {low = 32, high = 128, step = 32}\n'
                        'lr = {low = 1e-3, high = 1e-2, log = true}',
                        fixed='model = "vae"\narch = "mlp"\nlatent-dim = 3\nthreads = 1\nepochs = 2\n',
                        study='objective = "val_loss"\nn_trials = 3\npruner = "none"\nseed = 1')
    rc, stdout, err = tune(capsys, path, "--out", out)
    assert rc == 0, err
    summary = json.loads((out / "study.json").read_text())
    assert summary["states"] == {"COMPLETE": 3}
    # the validation split: 10 % of digits' 1617 training rows, each class giving its share, seeded by seed = 1
    split = held_out(out)
    index = split["validation_index"]
    assert (split["fraction"], split["seed"], split["of"], split["validation_rows"], split["train_rows"]) == \
        (0.1, 1, 1617, 162, 1455)
    assert len(index) == len(set(index)) == 162 and index == sorted(index) and 0 <= index[0] and index[-1] < 1617
    from vaelab.data import load_dataset
    from vaelab.tune import holdout

    labels = load_dataset("digits").train.y
    per_class = {c: int((labels == c).sum()) for c in range(10)}
    assert {c: sum(int(labels[i]) == c for i in index) for c in range(10)} == \
        {c: round(n * 0.1) for c, n in per_class.items()}
    assert holdout(load_dataset("digits").train, 0.1, 1)[1].tolist() == index  # recomputed: the same rows
    assert holdout(load_dataset("digits").train, 0.1, 2)[1].tolist() != index  # another seed, other rows
    for t in summary["trials"]:  # every trial trained on the other 1455 rows and validated on those 162
        recorded = json.loads((Path(t["run_dir"]) / "config.json").read_text())["tune"]["validation"]
        assert recorded == {k: v for k, v in split.items() if k not in ("validation_index", "dataset")}
        assert recorded["validation_sha256"] == digest(index)
        assert recorded["train_sha256"] == digest(sorted(set(range(1617)) - set(index)))
        assert history(Path(t["run_dir"]))[0]["step"] == -(-1455 // t["params"]["batch_size"])
    assert summary["validation"] == {k: v for k, v in split.items() if k != "validation_index"}
    assert [t["number"] for t in summary["trials"]] == [0, 1, 2]
    best = min(summary["trials"], key=lambda t: t["value"])
    assert summary["best_trial"] == best["number"] and summary["best_value"] == best["value"]
    # the objective is the run's own last validation loss, which is the saved model's loss on the held-out rows
    from vaelab import from_pretrained
    from vaelab.training.validation import loss_terms

    run = out / "trials" / f"trial-{best['number']:04d}"
    assert best["value"] == history(run)[-1]["val_loss"]
    bs = max(best["params"]["batch_size"], 256)
    _, validation, test = selection_data(out)
    model = from_pretrained(run)
    precision = json.loads((run / "config.json").read_text())["train"]["precision"]  # what auto chose: validated in it
    assert best["value"] == loss_terms(model, validation, batch_size=bs, precision=precision)["loss"]
    # the test split is measured once, for the best trial, and reported apart
    assert summary["best_value_split"] == "validation"
    assert summary["best_test_value"] == loss_terms(model, test, batch_size=bs, precision=precision)["loss"] \
        != best["value"]
    config = json.loads((run / "config.json").read_text())
    assert config["tune"]["trial"] == best["number"] and config["tune"]["objective"] == "val_loss"
    assert (run / "model.safetensors").is_file()
    evaluation = json.loads((run / "evaluation.json").read_text())
    # evaluation.json is in fp32 whatever the run trained (and validated) in
    assert evaluation["split"] == "validation" and evaluation["loss"] == (
        best["value"] if precision == "fp32" else loss_terms(model, validation, batch_size=bs)["loss"])
    assert f"best: val_loss {best['value']:.6g} on the validation split (trial {best['number']}:" in stdout
    assert f"best trial on the test split: val_loss {summary['best_test_value']:.6g}\n" in stdout
    assert len(re.findall(r"^  \d+ +complete +\d", stdout, re.M)) == 3  # the summary table
    assert "tune: 3 complete;" in stdout
    for png in ("optimization_history.png", "param_importances.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # best.toml is a config file `vaelab train` takes, and the run it trains has the best settings
    p = summary["best_params"]
    assert set(p) == {"beta", "hidden", "batch_size", "lr"} and p["batch_size"] in (32, 64, 96, 128)
    assert main(["train", "--config", str(out / "best.toml"), "--out", str(tmp_path / "best"), "--no-pictures"]) == 0
    trained = json.loads((tmp_path / "best" / "config.json").read_text())
    assert trained["model"]["settings"]["beta"] == p["beta"]
    assert trained["model"]["hidden"] == p["hidden"]
    assert trained["model"]["latent_dim"] == 3
    assert trained["train"]["lr"] == p["lr"] and trained["train"]["batch_size"] == p["batch_size"]
    assert trained["train"]["epochs"] == 2
    # it trains on the whole training split (the validation rows too) and validates on the test split
    assert history(tmp_path / "best")[0]["step"] == -(-1617 // p["batch_size"])
    assert "tune" not in trained
    # a finished study run again trains nothing more
    rc, stdout, _ = tune(capsys, path, "--out", out)
    assert rc == 0 and len(trials(out)) == 3 and "trial 0:" not in stdout


def test_bad_trials_are_pruned_on_their_per_epoch_numbers(tmp_path, capsys):
    out = tmp_path / "study"
    path = write_search(tmp_path / "s.toml", "lr = {choices = [0.01, 1e-06]}",
                        fixed=FIXED + "epochs = 4\n",
                        study='n_trials = 5\nsampler = "random"\nseed = 2\npruner_startup_trials = 1\n'
                              'pruner_warmup_epochs = 0\nprune_on = "val_elbo"')
    assert tune(capsys, path, "--out", out)[0] == 0
    ts = trials(out)
    assert len(ts) == 5
    first_good = next(t.number for t in ts if t.params["lr"] == 0.01)
    for t in ts:
        run = Path(t.user_attrs["run_dir"])
        rows = history(run)
        # what the pruner saw: the per-epoch validation -ELBO (val_loss minimized: ELBO negated), one per epoch
        assert t.intermediate_values == {i + 1: -r["val_elbo"] for i, r in enumerate(rows)}
        if t.params["lr"] == 1e-06 and t.number > first_good:  # worse than the median of the finished ones
            assert t.state.name == "PRUNED" and len(rows) == 1
        else:
            assert t.state.name == "COMPLETE" and len(rows) == 4
    assert states(ts).get("PRUNED", 0) >= 1
    summary = json.loads((out / "study.json").read_text())
    assert all(t["value"] is None for t in summary["trials"] if t["state"] == "PRUNED")


@pytest.mark.parametrize("objective", ["nll", "probe_accuracy", "auroc"])
def test_each_objective_is_the_task_measure_of_the_trial_run(tmp_path, capsys, objective):
    from vaelab import from_pretrained
    from vaelab.evaluation.metrics import probe_accuracy
    from vaelab.evaluation.nll import importance_nll
    from vaelab.evaluation.scores import anomaly_scores, auroc, latent_codes

    out = tmp_path / "study"
    path = write_search(tmp_path / "s.toml", "lr = {low = 1e-3, high = 1e-2, log = true}",
                        fixed=FIXED + "epochs = 2\n",
                        study=f'objective = "{objective}"\nn_trials = 1\nnll_samples = 8\nnormal_class = 3')
    assert tune(capsys, path, "--out", out)[0] == 0
    (t,) = trials(out)
    model = from_pretrained(t.user_attrs["run_dir"])
    train, validation, test = selection_data(out)  # the trial's training rows, the held-out rows, the test split
    assert len(train) == 1455 and len(validation) == 162 and len(test) == 180
    summary = json.loads((out / "study.json").read_text())
    assert summary["best_value"] == t.value and summary["best_value_split"] == "validation"
    if objective == "nll":
        assert t.value == importance_nll(model, validation, n_samples=8)["nll"]
        assert summary["best_test_value"] == importance_nll(model, test, n_samples=8)["nll"]
        study = optuna.load_study(study_name="tune", storage=f"sqlite:///{out / 'study.db'}")
        assert study.direction.name == "MINIMIZE"
    elif objective == "probe_accuracy":
        codes = latent_codes(model, train)
        expected = probe_accuracy(codes, train.y.numpy(), latent_codes(model, validation),
                                  validation.y.numpy())["linear_probe_accuracy"]
        assert t.value == expected and 0.1 < t.value <= 1.0  # above chance (10 classes)
        assert summary["best_test_value"] == probe_accuracy(codes, train.y.numpy(), latent_codes(model, test),
                                                            test.y.numpy())["linear_probe_accuracy"]
    else:  # trained on class 3 of the training rows alone: 1 epoch of (those rows) / batch steps
        rows = history(Path(t.user_attrs["run_dir"]))
        n3 = int((train.y == 3).sum())
        assert rows[0]["step"] == -(-n3 // 128)
        recorded = json.loads((Path(t.user_attrs["run_dir"]) / "config.json").read_text())["tune"]["validation"]
        assert recorded["trained_rows"] == n3 and recorded["validation_rows"] == 162
        scores = anomaly_scores(model, validation, ("elbo",))["elbo"]
        assert t.value == auroc(scores, validation.y.numpy() != 3) and t.value > 0.5
        test_scores = anomaly_scores(model, test, ("elbo",))["elbo"]
        assert summary["best_test_value"] == auroc(test_scores, test.y.numpy() != 3)


def test_diverging_trials_fail_and_the_search_stops_after_three_in_a_row(tmp_path, capsys):
    out = tmp_path / "study"
    path = write_search(tmp_path / "s.toml", "lr = {choices = [1e6]}", fixed=FIXED + "epochs = 2\n",
                        study="n_trials = 2")
    rc, stdout, err = tune(capsys, path, "--out", out)
    assert rc == 1 and "Traceback" not in err
    assert "vaelab: error: 3 trials of this process failed, the last with:" in err
    assert stdout.count("failed: ") == 3
    assert states(trials(out)) == {"FAIL": 3}


# ============================================================================== kill -9, two processes


KILL_SEARCH = ("lr = {low = 1e-3, high = 1e-2, log = true}", FIXED.replace("hidden = [32]", "hidden = [256, 128]")
               + "epochs = 30\n", 'n_trials = 3\npruner = "none"\nheartbeat = 1')


@pytest.mark.slow
def test_a_killed_search_resumes_and_retries_the_interrupted_trial_from_its_checkpoint(tmp_path):
    out = tmp_path / "study"
    path = write_search(tmp_path / "s.toml", *KILL_SEARCH)
    argv = [sys.executable, "-m", "vaelab", "tune", str(path), "--out", str(out)]
    proc = subprocess.Popen(argv, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = out / "trials" / "trial-0001" / "metrics.jsonl"
    deadline = time.monotonic() + 240
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 3):  # trial 1, past epoch 3
        assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    before = trials(out)
    assert [t.state.name for t in before] == ["COMPLETE", "RUNNING"]
    killed_at = len(history(out / "trials" / "trial-0001"))
    assert 3 <= killed_at < 30

    done = subprocess.run(argv, env=env(), capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr
    ts = trials(out)
    assert states(ts) == {"COMPLETE": 3, "FAIL": 1}  # exactly n_trials finished trials, the killed one failed
    assert ts[1].state.name == "FAIL"
    (retry,) = [t for t in ts if t.system_attrs.get("failed_trial") == 1]
    assert retry.state.name == "COMPLETE" and retry.params == ts[1].params
    # the retry continued the interrupted run from its checkpoint: one run of 30 consecutive epochs
    assert retry.user_attrs["run_dir"] == str(out / "trials" / "trial-0001")
    assert retry.user_attrs["resumed_from_epoch"] >= killed_at
    assert [r["epoch"] for r in history(out / "trials" / "trial-0001")] == list(range(1, 31))
    assert len({t.number for t in ts}) == len(ts)


@pytest.mark.slow
def test_two_processes_share_one_study(tmp_path):
    out = tmp_path / "study"
    space, fixed, _ = KILL_SEARCH
    path = write_search(tmp_path / "s.toml", space, fixed.replace("epochs = 30", "epochs = 12"),
                        'n_trials = 6\npruner = "none"\nheartbeat = 5')
    argv = [sys.executable, "-m", "vaelab", "tune", str(path), "--out", str(out)]
    procs = [subprocess.Popen(argv, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [p.communicate(timeout=400) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], results
    ts = trials(out)
    assert sorted(t.number for t in ts) == list(range(6))  # exactly n_trials, none twice, none surplus
    assert states(ts) == {"COMPLETE": 6}
    workers = {t.user_attrs["process"] for t in ts}
    assert workers == {f"{os.uname().nodename}:{p.pid}" for p in procs}  # both did some of the work
    assert len({t.user_attrs["run_dir"] for t in ts}) == 6
    for stdout, _ in results:  # each process ends with the whole study's summary
        assert "tune: 6 complete" in stdout
    # both processes drew the same validation split: every trial trained and validated on the same rows
    index = held_out(out)["validation_index"]
    recorded = [json.loads((Path(t.user_attrs["run_dir"]) / "config.json").read_text())["tune"]["validation"]
                for t in ts]
    assert {r["validation_sha256"] for r in recorded} == {digest(index)}
    assert {r["train_sha256"] for r in recorded} == {digest(sorted(set(range(1617)) - set(index)))}
    assert {(r["train_rows"], r["validation_rows"]) for r in recorded} == {(1455, 162)}
