"""--precision auto: bf16 where the device computes it natively, fp32 elsewhere; the choice is printed once,
written into config.json, and trains exactly as the same precision asked for by name."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vaelab.config import TrainConfig
from vaelab.data import load_dataset
from vaelab.models import build_model
from vaelab.training import fit
from vaelab.training.runtime import choose_precision, cpu_flags
from vaelab.training.validation import loss_terms

REPO = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def test_the_cpu_choice_follows_its_bf16_instructions():
    assert choose_precision(CPU, {"avx512f", "avx512_bf16"}) == (
        "bf16", "the CPU computes bf16 natively (avx512_bf16)")
    assert choose_precision(CPU, {"amx_bf16", "amx_tile", "avx512_bf16"}) == (
        "bf16", "the CPU computes bf16 natively (amx_bf16, avx512_bf16)")
    # AVX-512 alone converts bf16 to fp32 and back: slower than fp32, so not chosen
    assert choose_precision(CPU, {"avx512f", "avx2", "fma"}) == (
        "fp32", "the CPU has no native bf16 (neither avx512_bf16 nor amx_bf16)")
    assert choose_precision(CPU, set()) == ("fp32", "the CPU has no native bf16 (neither avx512_bf16 nor amx_bf16)")
    assert choose_precision(torch.device("mps")) == ("fp32", "bf16 is not chosen automatically on mps")


def test_cpu_flags_are_this_machines():
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").is_file() else ""
    line = next((l for l in text.splitlines() if l.startswith("flags")), None)
    assert cpu_flags() == (set(line.split(":", 1)[1].split()) if line else set())


def test_auto_trains_exactly_as_its_choice_and_says_so(digits, tmp_path, capsys):
    chosen, why = choose_precision(CPU)
    init = build_model("seed-vae", input_shape=digits.train.sample_shape).state_dict()
    runs = {}
    for precision in ("auto", chosen):
        model = build_model("seed-vae", input_shape=digits.train.sample_shape)
        model.load_state_dict(init)
        runs[precision] = (model, fit(model, digits.train, digits.test, epochs=1, batch_size=128, progress=False,
                                      seed=5, precision=precision, out=tmp_path / precision))
    (auto, h_auto), (named, h_named) = runs["auto"], runs[chosen]
    assert [{k: v for k, v in r.items() if k != "time_s"} for r in h_auto] == \
        [{k: v for k, v in r.items() if k != "time_s"} for r in h_named]
    assert all(torch.equal(a, b) for a, b in zip(auto.state_dict().values(), named.state_dict().values()))
    assert capsys.readouterr().err.count("--precision auto") == 1
    cfg = json.loads((tmp_path / "auto" / "config.json").read_text())
    assert cfg["train"]["precision"] == chosen
    assert cfg["precision_auto"] == {"chose": chosen, "why": why}
    assert "precision_auto" not in json.loads((tmp_path / chosen / "config.json").read_text())
    # the validation pass chooses the same way
    assert loss_terms(auto, digits.test, precision="auto") == loss_terms(auto, digits.test, precision=chosen)


def test_the_cli_prints_the_choice_once_and_refuses_an_unknown_precision(tmp_path):
    chosen, why = choose_precision(CPU)
    env = {"PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin"}
    p = subprocess.run([sys.executable, "-m", "vaelab", "train", "--precision", "auto", "--epochs", "1",
                        "--out", str(tmp_path / "run"), "--no-pictures", "--no-progress"],
                       capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode == 0, p.stderr
    assert p.stderr.count(f"vaelab: --precision auto: {chosen} ({why})") == 1
    assert json.loads((tmp_path / "run" / "config.json").read_text())["train"]["precision"] == chosen
    p = subprocess.run([sys.executable, "-m", "vaelab", "train", "--precision", "fp16", "--epochs", "1",
                        "--out", str(tmp_path / "bad")], capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert "precision='fp16' is unknown; choose one of ['fp32', 'bf16', 'auto']" in p.stderr
    assert not (tmp_path / "bad").exists()


def test_the_default_stays_fp32():
    assert TrainConfig().precision == "fp32"
