"""benchmarks/m2.py --merge (issue 25): label draws trained by separate processes joined into one result file. The
inputs are the committed result file of M1+M2's three 100-label draws, split into one file per draw as three
processes would have written them, and the real script run as a subprocess."""

from __future__ import annotations

import copy
import json
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DRAWS = REPO / "benchmarks" / "results" / "m1m2-100-labelled-share-0.1.json"


def _merge(*args) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(REPO / "benchmarks" / "m2.py"), "--merge", *map(str, args)],
                          capture_output=True, text=True, timeout=120)


def _split(tmp_path: Path) -> list[Path]:
    whole = json.loads(DRAWS.read_text())
    files = []
    for run in whole["runs"]:
        part = {"recipe": whole["recipe"], "machine": whole["machine"], "runs": [run]}
        files.append(tmp_path / f"s{run['seed']}.json")
        files[-1].write_text(json.dumps(part))
    return files


def test_merge_joins_draws_and_keeps_a_repeated_run_once(tmp_path):
    s0, s1, s2 = _split(tmp_path)
    out = tmp_path / "merged.json"
    done = _merge(s0, s1, s2, s1, "--out", out)
    assert done.returncode == 0, done.stderr
    merged, whole = json.loads(out.read_text()), json.loads(DRAWS.read_text())
    assert merged["runs"] == whole["runs"] and merged["recipe"] == whole["recipe"]
    assert merged["merged"] == [str(s0), str(s1), str(s2), str(s1)] and merged["machines"] == [whole["machine"]]
    (row,) = merged["summary"]
    errors = [0.0463, 0.0473, 0.0422]
    assert (row["model"], row["labels"], row["seeds"]) == ("m1m2", 100, 3)
    assert row["mean_error"] == statistics.mean(errors) and row["std_error"] == statistics.stdev(errors)
    assert row["max_error"] == 0.0473 and row["target"] == 0.0333 and row["met"] is False
    assert "4.53%" in done.stdout and "<= 3.33%: NOT met" in done.stdout
    assert f"wrote {out} (3 runs from 4 files)" in done.stdout


def test_merge_refuses_another_recipe_or_protocol_and_writes_nothing(tmp_path):
    s0, s1, _ = _split(tmp_path)
    other = json.loads(s1.read_text())
    longer = copy.deepcopy(other)
    longer["recipe"]["models"]["m1m2"]["train"]["epochs"] = 200
    longer["recipe"]["models"]["m1m2"]["model"]["latent_dim"] = 64
    s1.write_text(json.dumps(longer))
    out = tmp_path / "merged.json"
    done = _merge(s0, s1, "--out", out)
    assert done.returncode == 2 and "Traceback" not in done.stderr
    assert done.stderr.strip() == (f"m2.py: {s1}: its recipe of 'm1m2' differs from the first file's in "
                                   "model.latent_dim, train.epochs; merge only runs of one recipe")
    validation = copy.deepcopy(other)
    validation["recipe"]["protocol"] = "validation: the last 10,000 training images"
    s1.write_text(json.dumps(validation))
    done = _merge(s0, s1, "--out", out)
    assert done.returncode == 2 and done.stderr.strip() == (
        f"m2.py: {s1}: its protocol is 'validation: the last 10,000 training images' where {s0} has 'test'; "
        "merge only runs made the same way")
    assert not out.exists()


def test_merge_names_a_file_that_is_no_result(tmp_path):
    s0, *_ = _split(tmp_path)
    truncated, other = tmp_path / "truncated.json", tmp_path / "other.json"
    truncated.write_text(s0.read_text()[:100])
    other.write_text(json.dumps({"runs": []}))
    out = tmp_path / "merged.json"
    done = _merge(s0, truncated, "--out", out)
    assert done.returncode == 2 and done.stderr.startswith(f"m2.py: {truncated}: cannot read it as a result file of "
                                                           "benchmarks/m2.py (")
    done = _merge(s0, other, "--out", out)
    assert done.returncode == 2 and done.stderr.strip() == (
        f"m2.py: {other}: has no 'recipe'; expected a result file written by benchmarks/m2.py --out")
    assert not out.exists()


def test_posterior_rejudging_reports_where_each_classifier_errs_as_evaluate_does(tmp_path):
    """benchmarks/m2_posterior.py --confusion on a real (small) m2 run: by q(y|x) and by the posterior with 2
    samples, the same errors and confusion matrices as `vaelab evaluate` reports at the script's batch size; with
    --elbo the ELBO of the training images with labels hidden and with them."""
    import importlib.util

    import torch

    from vaelab import from_pretrained
    from vaelab.data import ArrayDataset, load_dataset
    from vaelab.evaluation import evaluate, loss_terms
    from vaelab.models import build_model, with_settings
    from vaelab.training import fit

    spec = importlib.util.spec_from_file_location("m2_posterior", REPO / "benchmarks" / "m2_posterior.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    digits = load_dataset("digits")
    torch.manual_seed(0)
    model = build_model(model="m2", condition_dim=10, hidden=(32,), latent_dim=4, input_shape=digits.train.sample_shape)
    fit(model, digits.train, digits.test, epochs=2, batch_size=64, labels=50, progress=False, out=tmp_path / "run")
    row = script.judge(tmp_path / "run", digits.test, [0, 2], confusion=True, train=digits.train)
    trained = from_pretrained(tmp_path / "run")
    hidden = ArrayDataset(digits.train.x, None, digits.train.scale)  # the same images, every label hidden
    assert row["train_elbo"] == {"unlabelled": round(loss_terms(trained, hidden, batch_size=256)["elbo"], 3),
                                 "labelled": round(loss_terms(trained, digits.train, batch_size=256)["elbo"], 3)}
    for k in (0, 2):
        reported = evaluate(with_settings(trained, posterior_samples=k), digits.test, batch_size=256)
        assert row["confusion"][k] == {key: reported[key] for key in ("confusion", "class_error", "most_confused")}
        assert row["errors"][k] == round(reported["error"], 5)


def test_a_benchmark_run_records_its_data_as_vaelab_train_does(tmp_path):
    """A run of benchmarks/m2.py names its dataset and data folder in config.json, so `vaelab evaluate RUN`
    needs no --dataset (trained here on digits, one epoch of a small recipe, to keep it fast)."""
    import argparse
    import importlib.util

    from vaelab.data import load_dataset

    spec = importlib.util.spec_from_file_location("m2_bench", REPO / "benchmarks" / "m2.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    digits = load_dataset("digits")
    model_cfg, train_cfg = script.recipe_of("m2", {"hidden": [16], "latent_dim": 2, "batch_size": 64}, 1)
    args = argparse.Namespace(threads=1, precision="fp32", data_dir=str(tmp_path / "data"))
    row = script.train_model("m2", digits.train, digits.test, model_cfg, train_cfg, 50, 0, args, tmp_path / "run")
    cfg = json.loads((tmp_path / "run" / "config.json").read_text())
    assert cfg["data"] == {"dataset": "mnist", "data_dir": str((tmp_path / "data").resolve()), "binarize": False}
    assert cfg["preset"] == "m2" and row["epochs"] == 1 and cfg["train"]["labels"] == 50
