"""A run trained on a GPU, opened on a machine without one (issue 23): its config.json records device "cuda" (and
the precision chosen there); evaluate and sample run on the CPU, resuming says to pass --device cpu and then
continues there. The checkpoints are safetensors, which store no device, so their tensors load on any machine."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vaelab.errors import ConfigError
from vaelab.training.distributed import resolve_device

REPO = Path(__file__).resolve().parents[1]
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a CUDA GPU")


def vaelab(*argv, cwd):
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    return subprocess.run([sys.executable, "-m", "vaelab", *map(str, argv)], cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


@NO_CUDA
def test_asking_for_cuda_without_one_names_the_way_out():
    with pytest.raises(ConfigError) as e:
        resolve_device("cuda")
    assert e.value.problems == [
        f"device='cuda' asks for a CUDA GPU, but torch {torch.__version__} sees none on this machine "
        "(torch.cuda.is_available() is False); use --device cpu (or auto): a run trained on a GPU resumes, evaluates "
        "and samples on a CPU"]
    assert resolve_device("auto") == torch.device("cpu") and resolve_device("cpu") == torch.device("cpu")


@NO_CUDA
def test_a_gpu_run_evaluates_samples_and_resumes_on_a_cpu(tmp_path):
    run = tmp_path / "run"
    done = vaelab("train", "--epochs", 1, "--threads", 1, "--no-pictures", "--out", run, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    cfg = json.loads((run / "config.json").read_text())
    cfg["train"].update(device="cuda", precision="bf16")  # as `vaelab train --device cuda` on a GPU writes them
    (run / "config.json").write_text(json.dumps(cfg))

    evaluated = vaelab("evaluate", run, cwd=tmp_path)
    assert evaluated.returncode == 0, evaluated.stderr
    assert json.loads((run / "evaluation.json").read_text())["loss"] > 0
    sampled = vaelab("sample", run, "--n", 4, "--out", tmp_path / "samples.png", cwd=tmp_path)
    assert sampled.returncode == 0, sampled.stderr
    assert (tmp_path / "samples.png").read_bytes()[:4] == b"\x89PNG"

    refused = vaelab("train", "--resume", "--out", run, "--epochs", 2, cwd=tmp_path)
    assert refused.returncode != 0 and "Traceback" not in refused.stderr
    assert "device='cuda' asks for a CUDA GPU" in refused.stderr and "use --device cpu" in refused.stderr
    assert len((run / "metrics.jsonl").read_text().splitlines()) == 1  # nothing trained, nothing rewritten

    resumed = vaelab("train", "--resume", "--out", run, "--epochs", 2, "--device", "cpu", "--threads", 1, cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert [json.loads(r)["epoch"] for r in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]
    assert json.loads((run / "config.json").read_text())["train"]["device"] == "cpu"
