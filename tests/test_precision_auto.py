"""--precision auto: bf16 where the device computes it natively, fp32 elsewhere; the choice is printed once,
written into config.json, and trains exactly as the same precision asked for by name."""

import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vaelab.config import TrainConfig
from vaelab.data import load_dataset
from vaelab.models import build_model
from vaelab.training import fit, loop
from vaelab.training.runtime import (BF16_GAIN, WARMUP_STEPS, autocast, choose_precision, cpu_flags, pick_measured,
                                     time_precisions)
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


@pytest.mark.parametrize("name", ["seed-vae", "vqvae", "factorvae"])
def test_auto_trains_exactly_as_its_choice_and_says_so(digits, tmp_path, capsys, step_times, name):
    """Whatever auto chooses (by instructions, then by a measured step where bf16 is native), the run is bit for
    bit the run of that precision asked for by name: the measurement leaves no trace (a VQ-VAE's codebook and
    counts, a FactorVAE's discriminator and its optimizer included)."""
    init = build_model(name, input_shape=digits.train.sample_shape).state_dict()
    runs = {}
    for precision in ("auto", None):
        if precision is None:  # the precision auto chose, by name
            precision = json.loads((tmp_path / "auto" / "config.json").read_text())["precision_auto"]["chose"]
        model = build_model(name, input_shape=digits.train.sample_shape)
        model.load_state_dict(init)
        runs[precision] = (model, fit(model, digits.train, digits.test, epochs=1, batch_size=128, progress=False,
                                      seed=5, precision=precision, out=tmp_path / precision))
    chosen = next(k for k in runs if k != "auto")
    (auto, h_auto), (named, h_named) = runs["auto"], runs[chosen]
    assert [{k: v for k, v in r.items() if k != "time_s"} for r in h_auto] == \
        [{k: v for k, v in r.items() if k != "time_s"} for r in h_named]
    assert all(torch.equal(a, b) for a, b in zip(auto.state_dict().values(), named.state_dict().values()))
    note = json.loads((tmp_path / "auto" / "config.json").read_text())["precision_auto"]
    err = capsys.readouterr().err
    assert err.count("--precision auto") == 1 and f"vaelab: --precision auto: {chosen} ({note['why']})" in err
    cfg = json.loads((tmp_path / "auto" / "config.json").read_text())
    assert cfg["train"]["precision"] == chosen
    capable, why = choose_precision(CPU)
    if capable == "fp32":  # no native bf16: fp32 without measuring
        assert note == {"chose": "fp32", "why": why}
    else:  # measured: the choice follows the rule on the times it records
        assert set(note["step_ms"]) == {"fp32", "bf16"} and note["why"].startswith(why + ", ")
        assert note["chose"] == pick_measured({k: v / 1e3 for k, v in note["step_ms"].items()}, why)[0]
    assert "precision_auto" not in json.loads((tmp_path / chosen / "config.json").read_text())
    # the validation pass's "auto" goes by the instructions alone
    assert loss_terms(auto, digits.test, precision="auto") == loss_terms(auto, digits.test, precision=capable)


def test_the_measured_choice_takes_bf16_only_when_clearly_faster():
    why = "the CPU computes bf16 natively (avx512_bf16)"
    assert pick_measured({"fp32": 0.020, "bf16": 0.010}, why) == (
        "bf16", "the CPU computes bf16 natively (avx512_bf16), and a training step took 10 ms in bf16 against "
                "20 ms in fp32")
    assert pick_measured({"fp32": 0.020, "bf16": 0.018}, why)[0] == "bf16"  # exactly 90%
    assert pick_measured({"fp32": 0.0204, "bf16": 0.0283}, why) == (
        "fp32", "the CPU computes bf16 natively (avx512_bf16), but a training step took 28.3 ms in bf16 against "
                "20.4 ms in fp32: bf16 is chosen only at 90% of fp32's step time or less")
    assert pick_measured({"fp32": 0.020, "bf16": 0.0181}, why)[0] == "fp32"  # a 9.5% gain is within the noise
    assert BF16_GAIN == 0.9


@pytest.mark.parametrize("name", ["vqvae", "factorvae", "seed-vae"])
def test_timing_the_two_precisions_leaves_no_trace(digits, name):
    """Parameters, buffers (a VQ-VAE's k-means initialization, EMA codebook and non-persistent code counts
    included), gradients and the random stream are as they were before the timed steps."""
    model = build_model(name, input_shape=digits.train.sample_shape)
    model.train()
    x = digits.train.batch(torch.arange(64))
    before = {n: t.clone() for n, t in list(model.named_parameters()) + list(model.named_buffers())}
    calls = []

    def step(precision):
        calls.append(precision)
        with autocast(precision, x):
            out = model(x)
        model.loss(x, out.float())["loss"].mean().backward()

    torch.manual_seed(7)
    expected_next = torch.rand(3)
    torch.manual_seed(7)
    step_s = time_precisions(step, model, CPU, rounds=2)
    assert torch.equal(torch.rand(3), expected_next)
    # a warm-up each, then alternating samples, each of the steps the warm-up's time says last TIMED_SECONDS
    # (warm-ups bf16 x 2, fp32 x 2; round 1 fp32 x n, bf16 x m; round 2 bf16 x m, fp32 x n)
    runs = [(p, len(list(g))) for p, g in itertools.groupby(calls)]
    assert [p for p, _ in runs] == ["bf16", "fp32", "bf16", "fp32"] and WARMUP_STEPS == 2
    n, m = runs[3][1], runs[2][1] // 2
    assert calls == ["bf16"] * 2 + ["fp32"] * (2 + n) + ["bf16"] * (2 * m) + ["fp32"] * n and 1 <= min(n, m) <= 100
    assert set(step_s) == {"fp32", "bf16"} and all(v > 0 for v in step_s.values())
    after = dict(list(model.named_parameters()) + list(model.named_buffers()))
    assert before.keys() == after.keys() and all(torch.equal(before[n], after[n]) for n in before)
    assert all(p.grad is None for p in model.parameters())


def test_a_resumed_run_keeps_the_precision_auto_chose(digits, tmp_path, capsys):
    model = build_model("seed-vae", input_shape=digits.train.sample_shape)
    fit(model, digits.train, digits.test, epochs=1, batch_size=128, progress=False, precision="auto",
        out=tmp_path / "run")
    first = json.loads((tmp_path / "run" / "config.json").read_text())["precision_auto"]
    capsys.readouterr()
    for epochs in (2, 3):  # resumed twice: the record stays the first choice's, its reason not grown
        model = build_model("seed-vae", input_shape=digits.train.sample_shape)
        fit(model, digits.train, digits.test, epochs=epochs, batch_size=128, progress=False, precision="auto",
            out=tmp_path / "run", resume=True)
        cfg = json.loads((tmp_path / "run" / "config.json").read_text())
        assert cfg["train"]["precision"] == first["chose"]
        assert cfg["precision_auto"] == first
        err = capsys.readouterr().err
        assert f"vaelab: --precision auto: {first['chose']} ({first['why']}) (chosen when the run began)\n" in err


@pytest.fixture
def step_times(tmp_path, monkeypatch):
    """A cache folder of the test's own and an empty memory of measurements: the file of kept step times."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setattr(loop, "_MEASURED", {})
    return tmp_path / "cache" / "vaelab" / "precision-choices.json"


def _auto_note(digits, out):
    model = build_model("seed-vae", input_shape=digits.train.sample_shape)
    fit(model, digits.train, digits.test, epochs=1, batch_size=128, progress=False, precision="auto", out=out)
    return json.loads((out / "config.json").read_text())["precision_auto"]


needs_native_bf16 = pytest.mark.skipif(choose_precision(CPU)[0] == "fp32",
                                       reason="this CPU has no native bf16: auto takes fp32 without measuring")


@needs_native_bf16
def test_a_later_run_on_this_machine_chooses_by_the_kept_step_times(digits, tmp_path, step_times, capsys):
    first = _auto_note(digits, tmp_path / "first")
    table = json.loads(step_times.read_text())
    (key, entry), = table.items()
    assert set(entry) == {"fp32", "bf16", "measured", "what"} and entry["what"] == \
        f"vae, batch 128, {torch.get_num_threads()} thread{'s' * (torch.get_num_threads() != 1)}, 1 process"
    assert first["step_ms"] == {k: round(1e3 * entry[k], 3) for k in ("fp32", "bf16")}
    assert "kept in" not in first["why"]  # measured in this run
    # a later process (this one's memory emptied) chooses by the kept times, whatever a new timing would say
    table[key] = {**entry, "fp32": 0.02, "bf16": 0.01}
    step_times.write_text(json.dumps(table))
    loop._MEASURED.clear()
    capsys.readouterr()
    second = _auto_note(digits, tmp_path / "second")
    assert f"vaelab: --precision auto: bf16 ({second['why']})\n" in capsys.readouterr().err  # nothing after it
    assert second["chose"] == "bf16" and second["step_ms"] == {"fp32": 20.0, "bf16": 10.0}
    assert second["why"].endswith(f"took 10 ms in bf16 against 20 ms in fp32 (measured on this machine at "
                                  f"{entry['measured']}, kept in {step_times})")
    # a malformed file keeps nothing: measured afresh, and the file replaced by a good one
    step_times.write_text("{not json")
    loop._MEASURED.clear()
    third = _auto_note(digits, tmp_path / "third")
    assert "kept in" not in third["why"] and list(json.loads(step_times.read_text())) == [key]


@needs_native_bf16
def test_a_cache_folder_that_cannot_be_written_keeps_the_choice_for_the_process(digits, tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("a file where the cache folder would be")
    monkeypatch.setenv("XDG_CACHE_HOME", str(blocker))
    monkeypatch.setattr(loop, "_MEASURED", {})
    first = _auto_note(digits, tmp_path / "first")
    assert first["chose"] in ("fp32", "bf16") and blocker.read_text().startswith("a file")
    assert _auto_note(digits, tmp_path / "second") == first  # this process's measurement, not a new one


def test_the_cli_prints_the_choice_once_and_refuses_an_unknown_precision(tmp_path):
    env = {"PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin",
           "XDG_CACHE_HOME": str(tmp_path / "cache")}
    notes = []
    for run in ("run", "again"):  # the second process chooses by the step times the first kept
        p = subprocess.run([sys.executable, "-m", "vaelab", "train", "--precision", "auto", "--epochs", "1",
                            "--out", str(tmp_path / run), "--no-pictures", "--no-progress"],
                           capture_output=True, text=True, timeout=300, env=env)
        assert p.returncode == 0, p.stderr
        cfg = json.loads((tmp_path / run / "config.json").read_text())
        chosen, why = cfg["precision_auto"]["chose"], cfg["precision_auto"]["why"]
        assert p.stderr.count(f"vaelab: --precision auto: {chosen} ({why})") == 1
        assert cfg["train"]["precision"] == chosen
        notes.append(cfg["precision_auto"])
    assert notes[1]["chose"] == notes[0]["chose"] and notes[1].get("step_ms") == notes[0].get("step_ms")
    if "step_ms" in notes[0]:
        assert f"kept in {tmp_path / 'cache' / 'vaelab' / 'precision-choices.json'})" in notes[1]["why"]
    p = subprocess.run([sys.executable, "-m", "vaelab", "train", "--precision", "fp16", "--epochs", "1",
                        "--out", str(tmp_path / "bad")], capture_output=True, text=True, timeout=300, env=env)
    assert p.returncode != 0 and "Traceback" not in p.stderr
    assert "precision='fp16' is unknown; choose one of ['fp32', 'bf16', 'auto']" in p.stderr
    assert not (tmp_path / "bad").exists()


def test_the_default_is_auto_and_estimators_train_in_fp32():
    from vaelab.sklearn import AnomalyDetector, VAETransformer
    from vaelab.timeseries import SeriesDetector

    assert TrainConfig().precision == "auto"
    # an estimator fits alike for the same random_state on every machine: fp32, never a timing
    assert VAETransformer()._train_settings(False)["precision"] == "fp32"
    assert AnomalyDetector()._train_settings(True)["precision"] == "fp32"
    assert SeriesDetector()._config(2, 100)[1].precision == "fp32"


DDP_WORKER = """
import json, os, sys
import torch
from safetensors.torch import save_file
from vaelab.data import load_dataset
from vaelab.models import build_model
from vaelab.training import fit

out = sys.argv[1]
torch.manual_seed(0)
digits = load_dataset("digits")
model = build_model(model="vqvae", channels=(8, 16), latent_dim=4, codebook_size=32, vq_restart_after=2,
                    input_shape=digits.train.sample_shape)
fit(model, digits.train, digits.test, epochs=1, batch_size=100, seed=3, progress=False, precision="auto",
    out=f"{out}/run")
save_file({k: v.contiguous() for k, v in model.state_dict().items()}, f"{out}/rank{os.environ['RANK']}.safetensors")
"""


@pytest.mark.slow
@needs_native_bf16
def test_under_torchrun_the_ranks_time_alike_and_choose_one_precision(tmp_path):
    """A VQ-VAE's forward pass gathers the global batch from every rank (k-means, restarts): the timed steps must
    be as many on each rank, or the run hangs; both ranks then train in the one precision rank 0 records."""
    from safetensors.torch import load_file

    (tmp_path / "worker.py").write_text(DDP_WORKER)
    env = {"PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1", "PATH": "/usr/bin:/bin",
           "XDG_CACHE_HOME": str(tmp_path / "cache")}
    p = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                        str(tmp_path / "worker.py"), str(tmp_path)], capture_output=True, text=True, timeout=300,
                       env=env)
    assert p.returncode == 0, p.stdout + p.stderr
    note = json.loads((tmp_path / "run" / "config.json").read_text())["precision_auto"]
    assert set(note["step_ms"]) == {"fp32", "bf16"} and p.stderr.count("vaelab: --precision auto: ") == 1
    kept = json.loads((tmp_path / "cache" / "vaelab" / "precision-choices.json").read_text())
    assert [e["what"] for e in kept.values()] == ["vqvae, batch 100, 1 thread, 2 processes"]
    a, b = load_file(str(tmp_path / "rank0.safetensors")), load_file(str(tmp_path / "rank1.safetensors"))
    assert all(torch.equal(a[k], b[k]) for k in a)  # one model on both ranks: the same precision's steps
