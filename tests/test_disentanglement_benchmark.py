"""benchmarks/disentanglement.py (issue 19) on a tiny budget: two processes with their own result files, a rerun
that skips the finished run, and --merge joining both into one file and table. Real dSprites (generated into the
user cache), real training, real metrics."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
TINY = ["--seeds", "0", "--train-images", "256", "--eval-images", "1000", "--dci-train", "200", "--dci-test", "100",
        "--threads", "1"]


def _bench(*args: str, rc: int = 0) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "disentanglement.py"), *args],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == rc, done.stderr
    return done


@pytest.mark.slow
@pytest.mark.long
def test_two_processes_merge_into_one_table_and_a_rerun_skips_finished_runs(tmp_path):
    a, b, merged = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "merged.json"
    first = _bench("--models", "vae", *TINY, "--out", str(a), "--save-dir", str(tmp_path / "models"))
    assert "vae, seed 0 ..." in first.stdout
    from vaelab import from_pretrained

    saved = from_pretrained(tmp_path / "models" / "vae-s0")  # the trained model, to score again without training
    assert saved.config.model == "vae" and saved.config.latent_dim == 10
    _bench("--models", "btcvae", *TINY, "--out", str(b), "--save-dir", str(tmp_path / "models"))
    again = _bench("--models", "vae", *TINY, "--out", str(a))
    assert "seed 0 ..." not in again.stdout and len(json.loads(a.read_text())["runs"]) == 1
    table = _bench("--merge", str(a), str(b), str(a), "--out", str(merged)).stdout
    result = json.loads(merged.read_text())
    assert [(r["model"], r["seed"]) for r in result["runs"]] == [("vae", 0), ("btcvae", 0)]
    assert result["merged"] == [str(a), str(b), str(a)]
    (protocol,) = result["summaries"]
    assert protocol["settings"]["train_images"] == 256 and protocol["settings"]["threads"] == 1
    rows = protocol["summary"]
    assert [(row["model"], row["seeds"], row["steps"]) for row in rows] == [("vae", 1, 4), ("btcvae", 1, 4)]
    for row, run in zip(rows, result["runs"]):
        assert row["mig"] == {"mean": run["scores"]["mig"], "std": 0.0}
    assert "train_images 256" in table and "1 x 256 img (4 steps)" in table
    assert [line.split()[0] for line in table.splitlines() if "x 256 img" in line] == ["vae", "btcvae"]

    # scoring the saved model again: under the same settings, the same report; under other DCI sizes a run of
    # its own protocol, its training record and the metrics DCI does not enter unchanged
    same, other = tmp_path / "same.json", tmp_path / "other.json"
    models = ["--saved-models", str(tmp_path / "models")]
    _bench("--rescore", str(a), *models, "--models", "vae", *TINY, "--out", str(same))
    trained = json.loads(a.read_text())["runs"][0]
    (again,) = json.loads(same.read_text())["runs"]
    assert again["scores"] == trained["scores"] and again["report"] == trained["report"]
    assert again["settings"] == trained["settings"] and again["rescored_from"] == str(a)
    # a recipe naming some settings (beta) matches the saved config that spells out all of them
    _bench("--rescore", str(b), *models, "--models", "btcvae", *TINY, "--out", str(same))
    trained_tc = json.loads(b.read_text())["runs"][0]
    assert trained_tc["config"]["model"]["settings"] == {"beta": 6.0}
    assert json.loads(same.read_text())["runs"][1]["report"] == trained_tc["report"]
    _bench("--rescore", str(a), *models, "--models", "vae", *TINY, "--dci-train", "300", "--out", str(other))
    (moved,) = json.loads(other.read_text())["runs"]
    assert moved["settings"] == {**trained["settings"], "dci_train": 300}
    assert moved["history"] == trained["history"] and moved["train_s"] == trained["train_s"]
    for k in ("mig", "sap", "factor_vae_score", "recon"):
        assert moved["scores"][k] == trained["scores"][k]
    assert moved["report"]["metrics"]["dci"]["protocol"]["num_train"] == 300
    # a missing saved model, and --rescore without --saved-models, are errors that say what to pass
    missing = _bench("--rescore", str(a), "--saved-models", str(tmp_path), "--models", "vae", *TINY,
                     "--out", str(tmp_path / "x.json"), rc=1)
    assert f"no saved model at {tmp_path / 'vae-s0'} for run vae seed 0" in missing.stderr
    assert "Traceback" not in missing.stderr and not (tmp_path / "x.json").exists()
    shutil.copytree(tmp_path / "models" / "vae-s0", tmp_path / "other" / "btcvae-s0")  # another model's files
    wrong = _bench("--rescore", str(b), "--saved-models", str(tmp_path / "other"), "--models", "btcvae", *TINY,
                   "--out", str(tmp_path / "x.json"), rc=1)
    assert (f"the model saved at {tmp_path / 'other' / 'btcvae-s0'} is not the recipe of run btcvae seed 0"
            in wrong.stderr)
    assert "Traceback" not in wrong.stderr and not (tmp_path / "x.json").exists()
    assert "--rescore needs --saved-models DIR" in _bench("--rescore", str(a), "--out", str(tmp_path / "x.json"),
                                                          rc=2).stderr


def _script():
    spec = importlib.util.spec_from_file_location("disentanglement_bench", REPO / "benchmarks" / "disentanglement.py")
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    return script


def test_the_metrics_see_every_factor_value_of_dsprites_in_proportion():
    """The pool of test images a run is scored on is a seeded random draw from the test split: every shape and
    scale appears, in about equal shares, and the pool is the same for every run. The split's first 20,000 images
    (the pool until 2026-12-07, `--eval-pool first`) are squares of the five smallest scales only."""
    from vaelab.data.arrays import ArrayDataset, split
    from vaelab.data.dsprites import FACTOR_SIZES, NUM_IMAGES, factor_indices

    script = _script()
    # the dSprites test split's image indices, by the rule load_dsprites follows (seed 0, a tenth to test)
    stand_in = ArrayDataset(torch.zeros(NUM_IMAGES, 1, dtype=torch.uint8), None, 1.0, name="dsprites")
    test_idx = split(stand_in, 0.1, 0).source_index[1]
    assert len(test_idx) == 73728
    pool = script.eval_pool(len(test_idx), 20000)
    assert torch.equal(pool, script.eval_pool(len(test_idx), 20000)) and len(pool.unique()) == 20000
    assert torch.equal(pool, pool.sort().values) and int(pool.max()) < len(test_idx)
    factors = factor_indices(test_idx[pool].numpy())  # (20000, 5): shape, scale, orientation, pos_x, pos_y
    for j, size in enumerate(FACTOR_SIZES):
        counts = np.bincount(factors[:, j], minlength=size)
        assert counts.min() > 0.8 * 20000 / size and counts.max() < 1.2 * 20000 / size, (j, counts)
    first = factor_indices(test_idx[script.eval_pool(len(test_idx), 20000, "first")].numpy())
    assert set(first[:, 0].tolist()) == {0} and set(first[:, 1].tolist()) == {0, 1, 2, 3, 4}
    assert script.eval_pool(100, 500).tolist() == list(range(100))  # a pool as large as the split is the split
    with pytest.raises(ValueError, match="eval pool rule 'last' is unknown"):
        script.eval_pool(100, 10, "last")
