"""Runs survive hard kills and bad files: real subprocesses killed with SIGKILL, then resumed; fuzzed
checkpoint files only ever raise CheckpointError."""

from __future__ import annotations

import os
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

from vaelab.errors import CheckpointError
from vaelab.models import build_model, from_pretrained
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
