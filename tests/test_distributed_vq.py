"""The VQ-VAE under DDP for real: `torchrun` with 2 CPU processes (gloo).

Its codebook is not a parameter that DDP keeps in step: the quantizer all-reduces the EMA statistics and runs
k-means and dead-code restarts on the gathered global batch (models/quantizer.py). These tests check that both
ranks end with the same codebook and EMA buffers, that two processes move it as one process does on the same
global batch, and that `resume` restores every rank.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from vaelab.models.quantizer import VectorQuantizer

REPO = Path(__file__).resolve().parents[1]
# k-means init on, restarts after 2 unused steps: on digits' 2x2 grids of 100-image batches, 32 codes leave some
# unused, so restarts happen in both epochs (the test checks they did). 1,617 images in batches of 100 end on
# a batch of 17, split 9/8: the ranks' shards differ in size there.
WORKER = """
import json, os, sys
import torch
import torch.distributed as dist
from safetensors.torch import save_file
from vaelab.data import load_dataset
from vaelab.models import build_model
from vaelab.models.quantizer import VectorQuantizer
from vaelab.training import fit

out, epochs, resume = sys.argv[1], int(sys.argv[2]), sys.argv[3] == "resume"
rank, world = int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1"))
if world > 1 and not resume:
    # (a) the quantizer alone: 9 samples, split 5/4, each rank updating on its shard (k-means, EMA, restarts;
    # the data moves away step by step, so codes left behind go unused and are restarted)
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    x = torch.randn(9, 3, 2, 2)
    q = VectorQuantizer(16, 3, restart_after=1).train()
    for step in range(4):  # the data moves away step by step: codes left behind die and are restarted
        q(x[rank::world] + 5.0 * step)
    save_file({k: v.contiguous() for k, v in q.state_dict().items()}, f"{out}/quantizer{rank}.safetensors")
    json.dump(q.usage(), open(f"{out}/quantizer_usage{rank}.json", "w"))
# (b) a VQ-VAE trained by the one loop (DDP under torchrun)
torch.manual_seed(0)
digits = load_dataset("digits")
model = build_model(model="vqvae", channels=(8, 16), latent_dim=4, codebook_size=32, vq_restart_after=2,
                    input_shape=digits.train.sample_shape)
# fp32: the same arithmetic in both worlds (auto may choose differently for a rank's half batch)
history = fit(model, digits.train, digits.test, epochs=epochs, batch_size=100, seed=3, progress=False, precision="fp32",
              out=f"{out}/run", resume=resume)
save_file({k: v.contiguous() for k, v in model.state_dict().items()}, f"{out}/rank{rank}.safetensors")
json.dump(history, open(f"{out}/history{rank}.json", "w"))
"""
QUANTIZER_STATE = ("codebook", "cluster_size", "embed_sum", "unused_steps", "initialized")


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src")] + [p for p in [env.get("PYTHONPATH")] if p])
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def _launch(out: Path, nproc: int, epochs: int, resume: bool = False) -> Path:
    out.mkdir(parents=True, exist_ok=True)
    script = out / "worker.py"
    script.write_text(WORKER)
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"] \
        if nproc > 1 else [sys.executable]
    proc = subprocess.run([*launcher, str(script), str(out), str(epochs), "resume" if resume else "fresh"],
                          env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return out


def _weights(out: Path, rank: int) -> dict[str, torch.Tensor]:
    return load_file(str(out / f"rank{rank}.safetensors"))


def _history(out: Path, rank: int) -> list[dict]:
    """The metrics rows fit returned on `rank`, less their timings."""
    rows = json.loads((out / f"history{rank}.json").read_text())
    return [{k: v for k, v in r.items() if k != "time_s"} for r in rows]


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> Path:
    """2 epochs on 2 processes, uninterrupted (with the quantizer-alone part (a))."""
    return _launch(tmp_path_factory.mktemp("ddp_vq") / "two", 2, 2)


def test_the_quantizer_alone_moves_on_two_shards_as_on_the_whole_batch(two_ranks):
    a, b = (load_file(str(two_ranks / f"quantizer{r}.safetensors")) for r in (0, 1))
    for k in a:
        assert torch.equal(a[k], b[k]), f"quantizer.{k} differs between the ranks"
    usage = [json.loads((two_ranks / f"quantizer_usage{r}.json").read_text()) for r in (0, 1)]
    assert usage[0] == usage[1] and usage[0]["code_restarts"] > 0, usage
    # one process, the same RNG stream, the whole batch: k-means on all 9 samples, the EMA of all of them, the
    # restarts drawn from all of them (in the one-process order the ranks gather them back into)
    torch.manual_seed(0)
    x = torch.randn(9, 3, 2, 2)
    ref = VectorQuantizer(16, 3, restart_after=1).train()
    for step in range(4):
        ref(x + 5.0 * step)
    assert ref.usage()["code_restarts"] == usage[0]["code_restarts"]
    for k, v in ref.state_dict().items():
        if v.is_floating_point():
            torch.testing.assert_close(a[k], v, rtol=1e-5, atol=1e-6, msg=k)
        else:
            assert torch.equal(a[k], v), k


def test_two_ranks_hold_the_same_codebook_and_train_as_one_process(two_ranks, tmp_path):
    a, b = _weights(two_ranks, 0), _weights(two_ranks, 1)
    assert {f"quantizer.{k}" for k in QUANTIZER_STATE} <= set(a)
    for k in a:  # codebook, EMA buffers, restart counters and every weight: bit for bit
        assert torch.equal(a[k], b[k]), f"{k} differs between the ranks"
    rows = _history(two_ranks, 0)
    assert rows == _history(two_ranks, 1)
    assert all(r["train_code_restarts"] > 0 for r in rows), [r["train_code_restarts"] for r in rows]
    assert all({"train_perplexity", "train_codes_used", "train_dead_codes"} <= set(r) for r in rows)
    # the same global batch on one process: the same training up to float rounding (DDP adds the gradient
    # halves in another order, and each rank's convolutions see half the batch)
    one = _weights(_launch(tmp_path / "one", 1, 2), 0)
    assert one.keys() == a.keys()
    for k in a:
        if a[k].is_floating_point():
            torch.testing.assert_close(a[k], one[k], rtol=1e-4, atol=1e-5, msg=k)
        else:
            assert torch.equal(a[k], one[k]), k
    ref = _history(tmp_path / "one", 0)
    for row, r in zip(rows, ref):
        assert row["train_code_restarts"] == r["train_code_restarts"]
        assert row["train_loss"] == pytest.approx(r["train_loss"], rel=1e-4)
        assert row["val_loss"] == pytest.approx(r["val_loss"], rel=1e-4)


def test_resume_under_torchrun_restores_every_rank(two_ranks, tmp_path):
    out = _launch(tmp_path / "resumed", 2, 1)
    first = _weights(out, 1)
    _launch(out, 2, 2, resume=True)
    assert len(_history(out, 1)) == 2
    for rank in (0, 1):  # each rank continues exactly where the uninterrupted run was after its first epoch
        resumed, straight = _weights(out, rank), _weights(two_ranks, rank)
        for k in straight:
            assert torch.equal(resumed[k], straight[k]), f"rank {rank}: {k} differs from the uninterrupted run"
        assert _history(out, rank) == _history(two_ranks, rank)
    assert not torch.equal(first["quantizer.codebook"], _weights(out, 1)["quantizer.codebook"])  # it trained on
