"""Runs survive hard kills, bad numbers and bad files: real subprocesses killed with SIGKILL (at an epoch's
end, inside an epoch after a step checkpoint, mid-checkpoint-write), then resumed to the uninterrupted run's
exact weights; non-finite gradients stop a run before the weights move; a full disk or a read-only run
directory is a clear error that leaves the last checkpoint intact; fuzzed checkpoint files only ever raise
CheckpointError."""

from __future__ import annotations

import functools
import hashlib
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file

from vaelab.data import load_dataset
from vaelab.errors import CheckpointError, TrainingError
from vaelab.models import build_model, from_pretrained
from vaelab.training import fit
from vaelab.training.checkpoint import load_checkpoint

REPO = Path(__file__).resolve().parents[1]
# digits with batch 16: ~100 steps an epoch, long enough to be killed in the middle of one
TRAIN = ["train", "--preset", "seed-vae", "--dataset", "digits", "--batch-size", "16", "--no-progress",
         "--no-pictures", "--seed", "7"]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src")] + [p for p in [env.get("PYTHONPATH")] if p])
    return env


def _run(*args, code: str | None = None):
    argv = [sys.executable, "-c", code, *args] if code else [sys.executable, "-m", "vaelab", *args]
    return subprocess.Popen(argv, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait_for(predicate, proc, timeout=120.0):
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if predicate():
            return
        if proc.poll() is not None:
            out, err = proc.communicate()
            raise AssertionError(f"process ended early ({proc.returncode}):\n{out}\n{err}")
        time.sleep(0.02)
    proc.kill()
    raise AssertionError("timed out")


def _epochs_done(run: Path) -> int:
    try:
        return len((run / "metrics.jsonl").read_text().splitlines())
    except FileNotFoundError:
        return 0


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("rel") / "full"
    proc = _run(*TRAIN, "--epochs", "3", "--out", str(out))
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    return load_file(str(out / "model.safetensors"))


def _assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a), "weights differ from the uninterrupted run"


def test_sigkill_mid_epoch_then_resume_equals_uninterrupted(tmp_path, uninterrupted):
    out = tmp_path / "killed"
    proc = _run(*TRAIN, "--epochs", "3", "--out", str(out))
    _wait_for(lambda: _epochs_done(out) >= 1, proc)
    time.sleep(0.3)  # into the second epoch
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert _epochs_done(out) < 3, "the run finished before it was killed; the test proves nothing"
    resumed = subprocess.run([sys.executable, "-m", "vaelab", *TRAIN, "--epochs", "3", "--out", str(out),
                              "--resume"], env=_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    _assert_same(load_file(str(out / "model.safetensors")), uninterrupted)


# The child replaces os.replace with a version that, for the checkpoint of epoch 2, writes a marker and
# sleeps before renaming: the new checkpoint is complete in its temporary file but not yet in place when
# SIGKILL arrives. Nothing in vaelab is changed for the test.
SLOW_RENAME = """
import os, sys, time
marker = sys.argv[1]
real_replace = os.replace
calls = {"n": 0}
def slow_replace(src, dst, *a, **k):
    if str(dst).endswith("checkpoint.safetensors"):
        calls["n"] += 1
        if calls["n"] == 2:
            open(marker, "w").close()
            time.sleep(60)
    return real_replace(src, dst, *a, **k)
os.replace = slow_replace
from vaelab.cli import main
sys.exit(main(sys.argv[2:]))
"""


def test_sigkill_mid_checkpoint_write_keeps_the_previous_checkpoint(tmp_path, uninterrupted):
    out, marker = tmp_path / "killed", tmp_path / "writing"
    proc = _run(str(marker), *TRAIN, "--epochs", "3", "--out", str(out), code=SLOW_RENAME)
    _wait_for(marker.exists, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    # the epoch-1 checkpoint is intact and loadable
    model = build_model("seed-vae", input_shape=(1, 8, 8))
    state, _ = load_checkpoint(out / "checkpoint.safetensors", model, torch.optim.Adam(model.parameters()))
    assert state["epoch"] == 1
    resumed = subprocess.run([sys.executable, "-m", "vaelab", *TRAIN, "--epochs", "3", "--out", str(out),
                              "--resume"], env=_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    _assert_same(load_file(str(out / "model.safetensors")), uninterrupted)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory) -> Path:
    d = tmp_path_factory.mktemp("pre") / "m"
    build_model("seed-vae", input_shape=(1, 8, 8)).save_pretrained(d)
    return d


@settings(max_examples=int(os.environ.get("VAELAB_FUZZ_EXAMPLES", "60")), deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_fuzzed_weights_only_raise_checkpoint_error(pretrained, tmp_path_factory, data):
    good = (pretrained / "model.safetensors").read_bytes()
    kind = data.draw(st.sampled_from(["random", "truncate", "flip"]))
    if kind == "random":
        blob = data.draw(st.binary(max_size=4096))
    elif kind == "truncate":
        blob = good[:data.draw(st.integers(0, len(good) - 1))]
    else:
        blob = bytearray(good)
        for _ in range(data.draw(st.integers(1, 8))):
            i = data.draw(st.integers(0, len(blob) - 1))  # header or tensor data: both are checked
            blob[i] ^= 1 << data.draw(st.integers(0, 7))
        blob = bytes(blob)
    d = tmp_path_factory.mktemp("fz")
    (d / "config.json").write_bytes((pretrained / "config.json").read_bytes())
    (d / "model.safetensors").write_bytes(blob)
    if blob == good:
        return
    with pytest.raises(CheckpointError):  # every change is caught: by the parser or by the SHA-256
        from_pretrained(d)


@settings(max_examples=int(os.environ.get("VAELAB_FUZZ_EXAMPLES", "60")), deadline=None)
@given(blob=st.binary(max_size=2048))
def test_fuzzed_config_only_raises_checkpoint_error(pretrained, tmp_path_factory, blob):
    d = tmp_path_factory.mktemp("fzc")
    (d / "config.json").write_bytes(blob)
    (d / "model.safetensors").write_bytes((pretrained / "model.safetensors").read_bytes())
    with pytest.raises(CheckpointError):
        from_pretrained(d)



# ------------------------------------------------------------------------------------ inside an epoch


# Everything that draws random numbers or depends on the step: dynamic binarization and masking noise (the
# data generator), the reparameterization noise (torch's RNG), a KL warm-up still rising when the run is
# killed (the β schedule's step), and early stopping's best weights.
TRAIN_MID = TRAIN + ["--epochs", "2", "--binarize", "--noise", "masking", "--noise-level", "0.1",
                     "--kl-schedule", "linear", "--kl-warmup", "1.5", "--early-stopping", "2"]
STEPS_PER_EPOCH = 102  # the digits training split (1,617 images) at batch 16

# The child replaces os.replace with a version that, once the nth checkpoint is complete and in place, writes
# a marker and holds still, so SIGKILL lands right after a known checkpoint. Nothing in vaelab is changed.
PAUSE_AFTER_CHECKPOINT = """
import os, sys, time
marker, nth = sys.argv[1], int(sys.argv[2])
real_replace = os.replace
calls = {"n": 0}
def replace_then_pause(src, dst, *a, **k):
    real_replace(src, dst, *a, **k)
    if str(dst).endswith("checkpoint.safetensors"):
        calls["n"] += 1
        if calls["n"] == nth:
            open(marker, "w").close()
            time.sleep(60)
os.replace = replace_then_pause
from vaelab.cli import main
sys.exit(main(sys.argv[3:]))
"""


def _metrics(run: Path) -> list[dict]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return [{k: v for k, v in r.items() if k != "time_s"} for r in rows]


@pytest.fixture(scope="module")
def uninterrupted_mid(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("rel") / "full"
    proc = _run(*TRAIN_MID, "--out", str(out))  # no step checkpoints: writing them must not change the run
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    return out


def test_sigkill_after_a_step_checkpoint_resumes_inside_the_epoch_exactly(tmp_path, uninterrupted_mid):
    out, marker = tmp_path / "killed", tmp_path / "written"
    # checkpoints at steps 25, 50, 75, 100, the end of epoch 1 (102), 125, 150: the 7th is step 48 of epoch 2
    proc = _run(str(marker), "7", *TRAIN_MID, "--checkpoint-every", "25", "--out", str(out),
                code=PAUSE_AFTER_CHECKPOINT)
    _wait_for(marker.exists, proc)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    model = build_model("seed-vae", input_shape=(1, 8, 8))
    state, saved = load_checkpoint(out / "checkpoint.safetensors", model, torch.optim.Adam(model.parameters()))
    assert (state["epoch"], state["step"], state["position"]["epoch_step"]) == (1, 150, 150 - STEPS_PER_EPOCH)
    assert {"rng.torch", "rng.data", "meter.sums", "meter.count"} <= set(saved)
    assert int(saved["meter.count"][0, 0]) == 48 * 16  # the epoch's samples so far, summed into its metrics
    resumed = subprocess.run([sys.executable, "-m", "vaelab", *TRAIN_MID, "--out", str(out), "--resume"],
                             env=_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    full = load_file(str(uninterrupted_mid / "model.safetensors"))
    _assert_same(load_file(str(out / "model.safetensors")), full)
    assert _metrics(out) == _metrics(uninterrupted_mid)  # epoch 2's metrics include the steps before the kill


class Crash(Exception):
    """Raised by a forward pre-hook at a chosen forward pass: the process dies there, as after a kill."""


def _crash_at(n: int):
    calls = {"n": 0}

    def hook(module, args):
        calls["n"] += 1
        if calls["n"] == n:
            raise Crash(f"forward pass {n}")

    return hook


VQ = dict(model="vqvae", channels=(8, 16), latent_dim=4, codebook_size=16, vq_restart_after=3)


def test_vqvae_resumed_inside_an_epoch_has_the_uninterrupted_codebook(tmp_path):
    digits = load_dataset("digits")
    kw = dict(epochs=2, batch_size=32, progress=False, seed=3, checkpoint_every=10)  # 51 steps an epoch

    def build(seed=0):
        torch.manual_seed(seed)
        return build_model(input_shape=digits.train.sample_shape, **VQ)

    straight = build()
    history = fit(straight, digits.train, None, out=tmp_path / "a", **kw)
    crashed = build()
    crashed.register_forward_pre_hook(_crash_at(75))  # step 75; the last checkpoint is step 70 (epoch 2, 19)
    with pytest.raises(Crash):
        fit(crashed, digits.train, None, out=tmp_path / "b", **kw)
    saved = load_file(str(tmp_path / "b" / "checkpoint.safetensors"))
    # the codebook's EMA statistics and dead-code counters are weights of the checkpoint; the code counts of
    # the running epoch (non-persistent buffers, for its usage metrics) travel beside them
    assert {"model.quantizer.codebook", "model.quantizer.cluster_size", "model.quantizer.embed_sum",
            "model.quantizer.unused_steps", "model.quantizer.initialized"} <= set(saved)
    assert int(saved["buffers.quantizer.counts"].sum()) == 19 * 32 * 2 * 2  # 19 batches of 32 2x2 code grids

    resumed = build(seed=123)  # other initial weights: everything comes from the checkpoint
    resumed_history = fit(resumed, digits.train, None, out=tmp_path / "b", resume=True, **kw)
    a, b = straight.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys()
    for k in a:  # weights and every buffer: codebook, EMA counts and sums, dead-code counters
        assert torch.equal(a[k], b[k]), k
    strip = lambda rows: [{k: v for k, v in r.items() if k != "time_s"} for r in rows]  # noqa: E731
    assert strip(resumed_history) == strip(history)  # perplexity, codes used and restarts of epoch 2 too
    assert history[-1]["train_code_restarts"] > 0  # restarts drew from torch's RNG after the resume point


def test_early_stopping_keeps_its_best_weights_across_a_resume(tmp_path):
    from vaelab.data import ArrayDataset

    digits = load_dataset("digits")
    # validating on inverted digits (light background), which the model fits worse the more it learns the
    # dark-background training images: epoch 1 stays the best, so its weights must survive to the end
    inverted = ArrayDataset(1.0 - digits.test.to_float(), scale=1.0)
    kw = dict(epochs=3, batch_size=64, progress=False, early_stopping=5, checkpoint_every=10)  # 26 steps/epoch

    def build():
        torch.manual_seed(0)
        return build_model("seed-vae", input_shape=digits.train.sample_shape)

    straight = build()
    history = fit(straight, digits.train, inverted, out=tmp_path / "a", **kw)
    assert min(r["val_loss"] for r in history) == history[0]["val_loss"] < history[-1]["val_loss"]
    crashed = build()
    crashed.register_forward_pre_hook(_crash_at(65))  # the last checkpoint: step 60, inside epoch 3
    with pytest.raises(Crash):
        fit(crashed, digits.train, inverted, out=tmp_path / "b", **kw)
    resumed = fit(build(), digits.train, inverted, out=tmp_path / "b", resume=True, **kw)
    assert len(resumed) == 3
    _assert_same(load_file(str(tmp_path / "b" / "model.safetensors")),
                 load_file(str(tmp_path / "a" / "model.safetensors")))  # epoch 1's weights, restored at the end


def test_a_step_checkpoint_continues_its_epoch_only_with_the_same_batches(tmp_path):
    digits = load_dataset("digits")
    model = build_model("seed-vae", input_shape=digits.train.sample_shape)
    model.register_forward_pre_hook(_crash_at(12))
    with pytest.raises(Crash):  # 26 steps an epoch; the checkpoint of step 10 is inside epoch 1
        fit(model, digits.train, None, epochs=2, batch_size=64, progress=False, out=tmp_path, checkpoint_every=5)
    fresh = build_model("seed-vae", input_shape=digits.train.sample_shape)
    with pytest.raises(TrainingError, match=r"after step 10 of an epoch.*batch_size=64 then, 32 now.*"
                                            r"resume with --batch-size 64"):
        fit(fresh, digits.train, None, epochs=2, batch_size=32, progress=False, out=tmp_path, resume=True)


def test_impossible_reliability_settings_are_reported_together():
    from vaelab.config import ModelConfig, TrainConfig
    from vaelab.errors import ConfigError

    with pytest.raises(ConfigError, match=r"checkpoint_every=-1 must be an integer >= 0"):
        TrainConfig(checkpoint_every=-1).validate()
    problems = ModelConfig(logvar_min=5.0, logvar_max=1.0, latent_dim=0).problems()
    assert any("logvar_min=5.0, logvar_max=1.0" in p and "logvar_min < logvar_max" in p for p in problems)
    assert any("latent_dim=0" in p for p in problems)
    assert any("logvar_max=inf" in p for p in ModelConfig(logvar_max=math.inf).problems())


def test_resume_may_change_the_logvar_clamp_but_not_the_architecture(tmp_path):
    out = tmp_path / "run"
    args = [*TRAIN, "--batch-size", "128", "--out", str(out)]
    first = subprocess.run([sys.executable, "-m", "vaelab", *args, "--epochs", "1"], env=_env(),
                           capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    refused = subprocess.run([sys.executable, "-m", "vaelab", *args, "--epochs", "2", "--resume", "--latent-dim",
                              "3"], env=_env(), capture_output=True, text=True, timeout=300)
    assert refused.returncode == 1 and "latent_dim=3" in refused.stderr, refused.stderr
    resumed = subprocess.run([sys.executable, "-m", "vaelab", *args, "--epochs", "2", "--resume", "--logvar-max",
                              "10"], env=_env(), capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((out / "config.json").read_text())["model"]["logvar_max"] == 10.0
    assert from_pretrained(out).config.logvar_max == 10.0


# --------------------------------------------------------------------------------------- bad numbers


@pytest.mark.parametrize("poison, grad_clip, message", [
    (math.nan, 0.0, r"non-finite gradient at epoch 2, step 30: NaN/Inf in the gradient of 1 parameter\(s\) "
                    r"\(decoder\.0\.weight\), with a finite loss"),
    (math.inf, 1.0, r"non-finite gradient at epoch 2, step 30: .*\(decoder\.0\.weight\)"),
    (3e38, 0.0, r"gradient norm overflow at epoch 2, step 30: every gradient entry is finite"),
])
def test_a_nonfinite_gradient_stops_the_run_before_the_weights_move(tmp_path, poison, grad_clip, message):
    digits = load_dataset("digits")
    torch.manual_seed(0)
    model = build_model("seed-vae", input_shape=digits.train.sample_shape)
    weight = dict(model.named_parameters())["decoder.0.weight"]
    seen = {}

    def poison_step_30(grad):  # a tensor hook: the gradient of this weight, as backward computes it
        seen["n"] = seen.get("n", 0) + 1
        if seen["n"] != 30:
            return grad
        seen["weight"] = weight.detach().clone()
        seen["checkpoint"] = (tmp_path / "checkpoint.safetensors").read_bytes()  # epoch 1's
        return torch.full_like(grad, poison)

    weight.register_hook(poison_step_30)
    with pytest.raises(TrainingError, match=message + r".*last good checkpoint is kept.*--lr.*--grad-clip"
                                                      r".*--logvar-max"):
        # 26 steps an epoch at batch 64: step 30 is in epoch 2, after the epoch-1 checkpoint
        fit(model, digits.train, None, epochs=2, batch_size=64, progress=False, out=tmp_path,
            grad_clip=grad_clip)
    assert torch.equal(weight.detach(), seen["weight"])  # the optimizer never stepped on the bad gradient
    assert (tmp_path / "checkpoint.safetensors").read_bytes() == seen["checkpoint"]


def test_logvar_is_clamped_beyond_its_bounds_and_untouched_inside():
    model = build_model("seed-vae", input_shape=(1, 8, 8))
    assert (model.config.logvar_min, model.config.logvar_max) == (-30.0, 20.0)
    head = model.encoder[-1]  # Linear(16, 2 * latent): (mean, log-variance) = its bias when its weight is 0
    x = torch.rand(3, 1, 8, 8)

    def logvar_for(raw: list[float]) -> torch.Tensor:
        with torch.no_grad():
            head.weight.zero_()
            head.bias.copy_(torch.tensor([0.0, 0.0, *raw]))
        return model.encode(x).logvar

    inside = [-29.999998, 19.999998]  # float32 neighbours of the bounds (and all between) pass bit for bit
    assert torch.equal(logvar_for(inside), torch.tensor(inside).expand(3, 2))
    assert torch.equal(logvar_for([-0.123, 4.5]), torch.tensor([-0.123, 4.5]).expand(3, 2))
    assert torch.equal(logvar_for([-31.5, 200.0]), torch.tensor([-30.0, 20.0]).expand(3, 2))
    # unclamped, log σ² = 200 makes exp(log σ²) and so the KL Inf; clamped, the KL is its closed form at 20
    kl = model(x).posterior.kl()
    expected = 0.5 * ((math.exp(-30) - 1 + 30) + (math.exp(20) - 1 - 20))
    assert torch.isfinite(kl).all() and kl[0].item() == pytest.approx(expected, rel=1e-6)

    tight = build_model("seed-vae", input_shape=(1, 8, 8), logvar_min=-1.0, logvar_max=0.5)
    tight.load_state_dict(model.state_dict())
    with torch.no_grad():
        tight.encoder[-1].bias.copy_(torch.tensor([0.0, 0.0, -3.0, 0.25]))
    assert torch.equal(tight.encode(x).logvar, torch.tensor([[-1.0, 0.25]] * 3))


# ---------------------------------------------------------------------------------- under torchrun (DDP)


DDP_WORKER = """
import os, sys
import torch
from vaelab.data import ArrayDataset, load_dataset
from vaelab.errors import TrainingError
from vaelab.models import build_model
from vaelab.training import fit

out, mode = sys.argv[1], sys.argv[2]
torch.manual_seed(0)
train = load_dataset("digits").train
model = build_model("seed-vae", input_shape=train.sample_shape)
# 17 steps an epoch; batches of 99 split 50/49, so the ranks draw different amounts of noise and their RNG
# states part. Checkpoints at steps 4, 8, 12, 16, 17 (the epoch's end), 20, ...
# fp32: the crash counts forward passes, and precision auto's timed steps would be some of them
kw = dict(epochs=2, batch_size=99, progress=False, out=out, seed=5, binarize=True, checkpoint_every=4, precision="fp32")
if mode == "nan":  # one image holds a NaN: the loss of the one rank whose shard has it is NaN
    x = train.to_float().clone()
    x[700, 0, 3, 3] = float("nan")
    try:
        fit(model, ArrayDataset(x, scale=1.0), None, **{**kw, "binarize": False})
    except TrainingError as e:  # one write of the whole line: the two ranks share the pipe, and a line
        # printed as text + newline in two writes could merge with the other rank's
        os.write(1, f"rank {os.environ['RANK']} stopped: {e}\\n".encode())
        sys.exit(3)
    sys.exit(0)
if mode == "crash":  # every rank dies at the same forward pass (step 23), as under a kill of the job
    calls = [0]
    def crash(module, args):
        calls[0] += 1
        if calls[0] == 23:
            os._exit(9)
    model.register_forward_pre_hook(crash)
fit(model, train, None, resume=mode == "resume", **kw)
"""


def _torchrun(tmp_path: Path, out: Path, mode: str) -> subprocess.CompletedProcess:
    script = tmp_path / "ddp_worker.py"
    script.write_text(DDP_WORKER)
    env = _env()
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           str(script), str(out), mode], env=env, capture_output=True, text=True, timeout=300)


def test_under_ddp_a_nonfinite_loss_on_one_rank_stops_every_rank_at_the_same_step(tmp_path):
    proc = _torchrun(tmp_path, tmp_path / "run", "nan")  # a hang here would end in the timeout
    assert proc.returncode != 0
    stopped = sorted(line for line in proc.stdout.splitlines() if " stopped: " in line)
    assert [line.split(" stopped: ")[0] for line in stopped] == ["rank 0", "rank 1"], proc.stdout + proc.stderr
    steps = {line.split(" at ")[1].split(":")[0].split(" (")[0] for line in stopped}
    assert len(steps) == 1, stopped  # the same epoch and step on both
    # the rank holding the NaN image names the loss; the other sees the all-reduced gradient turn NaN
    assert any("non-finite loss" in line for line in stopped), stopped
    assert any("non-finite gradient" in line for line in stopped), stopped


def test_under_ddp_a_run_killed_after_a_step_checkpoint_resumes_exactly(tmp_path):
    straight, crashed = tmp_path / "straight", tmp_path / "crashed"
    assert _torchrun(tmp_path, straight, "straight").returncode == 0
    proc = _torchrun(tmp_path, crashed, "crash")
    assert proc.returncode != 0
    model = build_model("seed-vae", input_shape=(1, 8, 8))
    optimizer = torch.optim.Adam(model.parameters())
    state, saved = load_checkpoint(crashed / "checkpoint.safetensors", model, optimizer)
    assert (state["step"], state["position"]["epoch_step"], state["position"]["world"]) == (20, 3, 2)
    assert saved["rng.torch"].shape[0] == 2 and saved["rng.data"].shape[0] == 2  # each rank's own RNG states
    assert not torch.equal(saved["rng.torch"][0], saved["rng.torch"][1])
    assert not torch.equal(saved["rng.data"][0], saved["rng.data"][1])
    proc = _torchrun(tmp_path, crashed, "resume")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    _assert_same(load_file(str(crashed / "model.safetensors")), load_file(str(straight / "model.safetensors")))
    assert _metrics(crashed) == _metrics(straight)


# ------------------------------------------------------------------------- a full disk, a read-only run


@functools.cache
def _namespaces_available() -> bool:
    """Whether `unshare` gives this user a private mount namespace (root, or unprivileged user namespaces):
    there a tmpfs of a few hundred kB is a real full disk, and a read-only bind mount a real read-only
    directory (for root too, which file permissions do not stop)."""
    if shutil.which("unshare") is None:
        return False
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /tmp"],
                           capture_output=True)
    return probe.returncode == 0


needs_namespaces = pytest.mark.skipif(not _namespaces_available(),
                                      reason="needs `unshare -rm` (root or unprivileged user namespaces)")

# Runs inside `unshare -rm` (its own mount namespace): trains epoch 1 on a tmpfs, shrinks the tmpfs to what is
# written plus half a checkpoint, resumes for epoch 2 (whose checkpoint's temporary file cannot fit), and
# copies the run directory out before the namespace, and its tmpfs, go away.
DISK_FULL = """
import hashlib, json, os, shutil, subprocess, sys
out, keep, argv = sys.argv[1], sys.argv[2], sys.argv[3:]
subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", out], check=True)
first = subprocess.run([sys.executable, "-m", "vaelab", *argv, "--epochs", "1", "--out", out])
pages = lambda n: -(-n // 4096) * 4096  # tmpfs counts whole pages
used = sum(pages(os.path.getsize(os.path.join(out, f))) for f in os.listdir(out))
checkpoint = os.path.join(out, "checkpoint.safetensors")
digest = hashlib.sha256(open(checkpoint, "rb").read()).hexdigest()
subprocess.run(["mount", "-o", f"remount,size={used + os.path.getsize(checkpoint) // 2}", out], check=True)
second = subprocess.run([sys.executable, "-m", "vaelab", *argv, "--epochs", "2", "--resume", "--out", out],
                        capture_output=True, text=True)
shutil.copytree(out, keep)
print(json.dumps({"first": first.returncode, "second": second.returncode, "stderr": second.stderr,
                  "sha256": digest}))
"""


@needs_namespaces
def test_a_full_disk_is_a_clear_error_and_the_last_checkpoint_survives(tmp_path):
    out, keep = tmp_path / "tmpfs", tmp_path / "kept"
    out.mkdir()
    proc = subprocess.run(["unshare", "-rm", sys.executable, "-c", DISK_FULL, str(out), str(keep),
                           *TRAIN, "--batch-size", "128"], env=_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.splitlines()[-1])
    assert (result["first"], result["second"]) == (0, 1), result["stderr"]
    err = result["stderr"]
    assert "vaelab: error: cannot write" in err and "checkpoint.safetensors" in err, err
    assert "No space left on device" in err and "previous version" in err and "free disk space" in err, err
    assert "Traceback" not in err
    checkpoint = keep / "checkpoint.safetensors"
    assert hashlib.sha256(checkpoint.read_bytes()).hexdigest() == result["sha256"]  # untouched, byte for byte
    assert not [p.name for p in keep.iterdir() if p.name.endswith(".tmp")]  # the partial file was removed
    model = build_model("seed-vae", input_shape=(1, 8, 8))
    state, _ = load_checkpoint(checkpoint, model, torch.optim.Adam(model.parameters()))
    assert state["epoch"] == 1


def _read_only(out: Path) -> list[str]:
    """The argv prefix that runs a command with `out` read-only: a read-only bind mount in a private mount
    namespace (it stops root too), else, for a user other than root, the directory's permissions."""
    if _namespaces_available():
        script = 'mount --bind "$0" "$0" && mount -o remount,bind,ro "$0" "$0" && shift && exec "$@"'
        return ["unshare", "-rm", "sh", "-c", script, str(out), "--"]
    if os.geteuid() == 0:
        pytest.skip("root ignores file permissions and `unshare -rm` is not available")
    out.chmod(0o555)
    return []


def test_a_read_only_run_directory_is_a_clear_error_and_the_checkpoint_survives(tmp_path):
    out = tmp_path / "run"
    first = subprocess.run([sys.executable, "-m", "vaelab", *TRAIN, "--batch-size", "128", "--epochs", "1",
                            "--out", str(out)], env=_env(), capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    before = (out / "checkpoint.safetensors").read_bytes()
    try:
        proc = subprocess.run([*_read_only(out), sys.executable, "-m", "vaelab", *TRAIN, "--batch-size", "128",
                               "--epochs", "2", "--resume", "--out", str(out)],
                              env=_env(), capture_output=True, text=True, timeout=300)
    finally:
        out.chmod(0o755)
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert "vaelab: error: cannot write" in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
    assert "Read-only file system" in proc.stderr or "Permission denied" in proc.stderr, proc.stderr
    assert "writable" in proc.stderr or "another output directory" in proc.stderr, proc.stderr
    assert (out / "checkpoint.safetensors").read_bytes() == before
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.safetensors", "config.json", "evaluation.json",
                                                     "metrics.jsonl", "model.safetensors"]
