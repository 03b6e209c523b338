"""benchmarks/gpu.py, the GPU check of issue 23, dry-run on the CPU: every section runs and writes its part of gpu.json
(no GPU is needed here; on a GPU machine the same script runs with --device cuda). The real MNIST files, a subset."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("VAELAB_TEST_DATA") or REPO.parent / "shared" / "data")


@pytest.mark.slow
@pytest.mark.long
@pytest.mark.skipif(not (DATA / "mnist").is_dir(), reason=f"MNIST files not in {DATA}")
def test_the_gpu_script_runs_every_section_on_a_cpu(tmp_path):
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / "gpu.py"), "--out", str(tmp_path), "--device", "cpu",
                           "--data-dir", str(DATA), "--train-images", "600", "--epochs", "2",
                           "--sections", "env,fixture,speed,torchrun"], capture_output=True, text=True, timeout=600,
                          env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert done.returncode == 0, done.stderr
    report = json.loads((tmp_path / "gpu.json").read_text())
    assert not [name for name in ("env", "fixture", "speed", "torchrun") if "error" in report[name]], report
    assert set(report["env"]["matmul_peak_tflops"]) == {"bf16", "fp32"}
    # the fixture: a run directory with everything evaluate/resume read, trained with --precision auto
    with tarfile.open(tmp_path / "cuda-run.tar.gz") as tar:
        assert sorted(tar.getnames()) == sorted(f"cuda-run/{n}" for n in (
            "config.json", "metrics.jsonl", "checkpoint.safetensors", "model.safetensors", "evaluation.json"))
    fixture = report["fixture"]
    assert fixture["config_train"]["device"] == "cpu" and fixture["precision_auto"]["chose"] in ("bf16", "fp32")
    assert abs(fixture["evaluation_json"]["loss"] - fixture["loss_terms_on_device"]["loss"]) < 1e-3
    # speed: 3 presets x 2 precisions x (vaelab, plain loop), vaelab's rows compared with the plain loop's
    rows = report["speed"]["rows"]
    assert [(r["preset"], r["precision"], r["run"]) for r in rows] == [
        (p, prec, run) for p in ("seed-conv-ae", "seed-vae", "mnist-vae") for prec in ("fp32", "bf16")
        for run in ("vaelab", "plain PyTorch loop")]
    assert all(r["images_per_s"] > 0 and len(r["epoch_s"]) == 2 and r["peak_fraction"] > 0 for r in rows)
    assert all(r["vs_plain_loop"] > 0 for r in rows if r["run"] == "vaelab")
    assert report["speed"]["images_per_epoch"] == 600 + 100
    # torchrun: one process, trained, then evaluated again (on the CPU) to the same loss
    ddp = report["torchrun"]
    assert ddp["train"]["rc"] == 0 and ddp["evaluate_on_cpu"]["rc"] == 0
    assert ddp["evaluation_json_on_cpu"]["loss"] == pytest.approx(ddp["evaluation_json"]["loss"], rel=1e-6)
