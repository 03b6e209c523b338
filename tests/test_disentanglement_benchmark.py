"""benchmarks/disentanglement.py (issue 19) on a tiny budget: two processes with their own result files, a rerun
that skips the finished run, and --merge joining both into one file and table. Real dSprites (generated into the
user cache), real training, real metrics."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TINY = ["--seeds", "0", "--train-images", "256", "--eval-images", "1000", "--dci-train", "200", "--dci-test", "100",
        "--threads", "1"]


def _bench(*args: str) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "disentanglement.py"), *args],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    return done


@pytest.mark.slow
@pytest.mark.long
def test_two_processes_merge_into_one_table_and_a_rerun_skips_finished_runs(tmp_path):
    a, b, merged = tmp_path / "a.json", tmp_path / "b.json", tmp_path / "merged.json"
    first = _bench("--models", "vae", *TINY, "--out", str(a))
    assert "vae, seed 0 ..." in first.stdout
    _bench("--models", "btcvae", *TINY, "--out", str(b))
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
