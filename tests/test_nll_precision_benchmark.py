"""benchmarks/nll_precision.py (issue 23) on digits: a real seed VAE trained through the CLI, the K=5000 likelihood of
the same test images with fp32 and bf16 decodings, the bf16 run of the split, and a rerun that reuses the model."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def _bench(*args) -> subprocess.CompletedProcess:
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "nll_precision.py"), *map(str, args)],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    return done


@pytest.mark.slow
def test_the_same_images_and_samples_in_both_precisions(tmp_path):
    run, out = tmp_path / "seed-vae", tmp_path / "nll.json"
    common = ("--dataset", "digits", "--run", run, "--epochs", 2, "--threads", 1, "--out", out)
    first = _bench(*common, "--compare-images", 6, "--full-images", 9)
    assert f"training the seed VAE into {run}" in first.stdout
    r = json.loads(out.read_text())
    c = r["compare"]
    assert (r["dataset"], r["trained_epochs"], r["nll_samples"], c["images"]) == ("digits", 2, 5000, 6)
    assert (c["fp32"]["nll_precision"], c["bf16"]["nll_precision"]) == ("fp32", "bf16")
    assert c["fp32"]["n"] == c["bf16"]["n"] == 6 and "nll_per_sample" not in c["fp32"]
    # bf16 ran (the estimates differ) and moved each image's estimate by rounding only
    assert 0 < c["diff_abs_max"] < 0.1 and abs(c["diff_mean"]) <= c["diff_abs_max"]
    assert c["bf16"]["nll"] - c["fp32"]["nll"] == pytest.approx(c["diff_mean"], abs=1e-9)
    full = r["full"]
    assert full["n"] == 9 and full["nll_precision"] == "bf16" and full["passes_per_s"] > 0
    assert f"bf16 - fp32 on the same images and samples: {c['diff_mean']:+.4f}" in first.stdout
    again = _bench(*common, "--compare-images", 6, "--full-images", 0,  # the model is there: no training
                   "--paths-images", 4, "--paths-rounds", 2)
    assert "training the seed VAE" not in again.stdout and "full" not in json.loads(out.read_text())
    r = json.loads(out.read_text())
    assert r["compare"]["diff_mean"] == c["diff_mean"]  # the same estimate, rerun
    # the two bf16 decoding paths, alternated: both ran twice, on the same samples, apart by rounding only
    p = r["paths"]
    assert (p["images"], p["rounds"]) == (4, 2) and len(p["speedup_per_round"]) == 2
    assert all(len(rates) == 2 and min(rates) > 0 for rates in p["passes_per_s"].values())
    assert p["diff_abs_max"] < 0.1 and p["nll"]["sub_pixel"] - p["nll"]["onednn"] == pytest.approx(p["diff_mean"])
    assert "bf16 decoding paths on the first 4 images, alternated 2 times" in again.stdout
