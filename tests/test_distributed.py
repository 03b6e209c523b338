"""DDP for real: `torchrun` with 2 CPU processes (gloo) against one process with the same global batch."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]

WORKER = """
import sys
import torch
from vaelab.data import load_dataset
from vaelab.models import build_model
from vaelab.training import fit

preset, out, epochs = sys.argv[1], sys.argv[2], int(sys.argv[3])
torch.manual_seed(0)  # the same initial weights everywhere (DDP also broadcasts rank 0's)
digits = load_dataset("digits")
model = build_model(preset, input_shape=digits.train.sample_shape)
fit(model, digits.train, digits.test, epochs=epochs, batch_size=100, progress=False, out=out, seed=5,
    precision="fp32")  # the same arithmetic in both worlds (auto may choose differently for a rank's half batch)
"""


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src")] + [p for p in [env.get("PYTHONPATH")] if p])
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def _train(tmp_path: Path, name: str, preset: str, nproc: int) -> Path:
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    out = tmp_path / name
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"] \
        if nproc > 1 else [sys.executable]
    proc = subprocess.run([*launcher, str(script), preset, str(out), "2"], env=_env(), capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out


@pytest.mark.parametrize("preset", ["seed-conv-ae"])
def test_two_processes_train_the_same_weights_as_one(tmp_path, preset):
    one = _train(tmp_path, "one", preset, 1)
    two = _train(tmp_path, "two", preset, 2)
    a, b = load_file(str(one / "model.safetensors")), load_file(str(two / "model.safetensors"))
    assert a.keys() == b.keys()
    for k in a:  # the gradient sums are added in another order: equal up to float rounding
        torch.testing.assert_close(b[k], a[k], rtol=1e-4, atol=1e-5)
    # rank 0 alone wrote the run directory: one checkpoint, no stray temporary files
    assert sorted(p.name for p in two.iterdir()) == ["checkpoint.safetensors", "config.json", "metrics.jsonl",
                                                     "model.safetensors"]
    # validation metrics were reduced over both ranks' shares of the test set
    import json

    rows = [json.loads(line) for line in (two / "metrics.jsonl").read_text().splitlines()]
    ref = [json.loads(line) for line in (one / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["val_loss"] == pytest.approx(ref[-1]["val_loss"], rel=1e-4)
    assert rows[-1]["train_loss"] == pytest.approx(ref[-1]["train_loss"], rel=1e-4)


def test_the_cli_under_torchrun(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           "-m", "vaelab", "train", "--preset", "seed-conv-ae", "--dataset", "digits", "--epochs",
                           "1", "--batch-size", "64", "--precision", "auto", "--no-progress", "--out", str(out)],
                          env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert proc.stdout.count("on 2 processes (global batch 64)") == 1  # rank 0 alone reports
    assert proc.stdout.count("test split of digits") == 1
    assert (out / "reconstructions.png").is_file() and (out / "evaluation.json").is_file()
    # precision auto: the ranks time their shards, choose one precision from the summed times, and
    # rank 0 alone says so and records it
    import json

    cfg = json.loads((out / "config.json").read_text())
    chosen = cfg["precision_auto"]["chose"]
    assert cfg["train"]["precision"] == chosen in ("fp32", "bf16")
    assert proc.stderr.count("vaelab: --precision auto: ") == 1, proc.stderr


LEAVER = """
import atexit, os, sys
import torch.distributed as dist
from vaelab.training.distributed import Dist

dist.init_process_group("gloo")  # the caller's own group, made before vaelab sees it


@atexit.register  # registered first, so it runs after vaelab's own exit handler
def _report():
    with open(os.path.join(sys.argv[1], f"rank{os.environ['RANK']}.txt"), "w") as f:
        f.write(str(dist.is_initialized()))


d = Dist.from_env()
assert (d.rank, d.world) == (int(os.environ["RANK"]), 2)
"""


def test_a_group_the_caller_created_is_left_at_exit(tmp_path):
    """A gloo rank exiting with its connections open can abort (SIGABRT) when its peer closes first: vaelab
    leaves the group at exit also when the caller created it (it failed CI once as a torchrun worker did)."""
    script = tmp_path / "leaver.py"
    script.write_text(LEAVER)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           str(script), str(tmp_path)], env=_env(), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert [(tmp_path / f"rank{r}.txt").read_text() for r in (0, 1)] == ["False", "False"]
