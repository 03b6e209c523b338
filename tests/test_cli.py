"""The `vaelab` command line, run as a user runs it: real subprocesses, real files, the digits dataset.

One run is trained once per module (seed-vae, 2 epochs) and every RUN-taking command is tried on it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
PNGS = ("reconstructions.png", "samples.png", "manifold.png", "interpolation.png", "latents.png")
FAST = ("--no-progress", "--dataset", "digits")


def vaelab(*args, cwd=None, check=None, python_flags=()) -> subprocess.CompletedProcess:
    """Run `python -m vaelab ARGS` with the checkout's src/ first on PYTHONPATH."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src")] + [p for p in [env.get("PYTHONPATH")] if p])
    # these models are tiny: one thread is fastest, and on a busy machine torch's spinning OpenMP
    # threads can make a step 50x slower than one thread (measured on 2 shared cores)
    env.setdefault("OMP_NUM_THREADS", "1")
    proc = subprocess.run([sys.executable, *python_flags, "-m", "vaelab", *map(str, args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=300)
    if check is not None:
        assert proc.returncode == check, f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc


def assert_png(path: Path, min_w: int = 100, min_h: int = 60) -> tuple[int, int]:
    assert path.is_file(), f"{path} was not written"
    with Image.open(path) as im:
        assert im.format == "PNG"
        im.verify()
    with Image.open(path) as im:
        w, h = im.size
    assert min_w <= w <= 4000 and min_h <= h <= 4000, f"{path.name} is {w}x{h} pixels"
    return w, h


def assert_clean_error(proc, *needles):
    assert proc.returncode == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    assert proc.stderr.startswith("vaelab: error: "), proc.stderr
    for needle in needles:
        assert needle in proc.stderr, f"{needle!r} not in {proc.stderr!r}"


def load_weights(run: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run / "model.safetensors"))


@pytest.fixture(scope="module")
def run(tmp_path_factory) -> Path:
    """seed-vae trained on digits for 2 epochs, with every picture."""
    out = tmp_path_factory.mktemp("cli") / "vae"
    vaelab("train", "--preset", "seed-vae", "--epochs", 2, "--out", out, *FAST, check=0)
    return out


# ------------------------------------------------------------------------------------------ start-up


HEAVY = ("torch", "numpy", "matplotlib", "sklearn")
# what `main(ARGV)` imported, run in a fresh interpreter: (exit status, heavy packages, vaelab.cli modules)
IMPORTED = """
import json, sys
from vaelab.cli import main
code = main(json.loads(sys.argv[1]))
mods = sorted(sys.modules)
print(json.dumps([code, sorted({m.split('.')[0] for m in mods if m.split('.')[0] in %r}),
                  [m for m in mods if m.startswith('vaelab.cli.')]]), file=sys.stderr)
""" % (HEAVY,)


def imported_by(*argv) -> tuple[int, list[str], list[str]]:
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    proc = subprocess.run([sys.executable, "-c", IMPORTED, json.dumps(list(argv))], env=env, capture_output=True,
                          text=True, timeout=120)
    return tuple(json.loads(proc.stderr.strip().splitlines()[-1]))


@pytest.mark.parametrize("argv", [["--help"], ["models", "--help"]] + [
    [command, "--help"] for command in ("evaluate", "reconstruct", "sample", "manifold", "interpolate", "traverse",
                                        "encode", "train-prior", "detect", "one-class", "series")])
def test_help_starts_without_torch(argv):
    proc = vaelab(*argv, python_flags=("-X", "importtime"), check=0)
    imported = {line.split("|")[-1].strip() for line in proc.stderr.splitlines() if line.startswith("import time")}
    assert "vaelab.cli" in imported
    heavy = sorted(m for m in imported if m.split(".")[0] in HEAVY)
    assert heavy == [], f"--help imported {heavy[:5]}"
    assert "usage: vaelab" in proc.stdout


@pytest.mark.parametrize("argv", [[], ["--help"], ["--version"], ["no-such-command"]])
def test_the_command_list_imports_no_command_module(argv):
    code, heavy, modules = imported_by(*argv)
    assert code == (2 if argv in ([], ["no-such-command"]) else 0)
    assert heavy == [] and modules == ["vaelab.cli.common"], (heavy, modules)


@pytest.mark.parametrize("command, module", [("sample", "pictures"), ("detect", "anomaly"),
                                             ("train-prior", "prior"), ("evaluate", "evaluate")])
def test_a_command_imports_its_own_module_only(command, module):
    code, heavy, modules = imported_by(command, "--help")
    assert code == 0 and heavy == []
    assert set(modules) - {"vaelab.cli.common", "vaelab.cli.drawing"} == {f"vaelab.cli.{module}"}, modules


def test_train_help_lists_every_models_own_settings():
    from vaelab.cli.train import _settings_fields

    text = vaelab("train", "--help", check=0).stdout
    assert "each model's own settings" in text
    for f in _settings_fields():
        assert "--" + f.name.replace("_", "-") in text, f.name


def test_the_command_list_matches_the_command_parsers():
    """Each command of the lazy top-level list builds a parser with a `func`, and `vaelab --help` gives it the
    one-line help the command module gives it (vaelab.cli.COMMANDS)."""
    import argparse

    from vaelab.cli import COMMANDS, build_parser

    lazy, eager = build_parser(), build_parser(lazy=False)
    subs = next(a for a in eager._actions if isinstance(a, argparse._SubParsersAction))
    assert list(subs.choices) == [name for name, _, _ in COMMANDS]
    assert [(c.dest, c.help) for c in subs._choices_actions] == [(name, text) for name, _, text in COMMANDS]
    assert lazy.format_help() == eager.format_help()
    for name, parser in subs.choices.items():
        assert callable(parser.get_default("func")), name
        assert parser.prog == f"vaelab {name}"


def test_no_cli_function_is_longer_than_60_lines():
    import ast

    long = []
    for path in sorted((REPO / "src" / "vaelab" / "cli").glob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                lines = node.end_lineno - node.lineno + 1
                if lines > 60:
                    long.append(f"{path.name}:{node.lineno} {node.name} ({lines} lines)")
    assert long == []


def test_nothing_outside_the_cli_imports_it():
    import ast

    importers = []
    for path in sorted((REPO / "src" / "vaelab").rglob("*.py")):
        rel = path.relative_to(REPO / "src" / "vaelab")
        if rel.parts[0] == "cli" or rel.name == "__main__.py":
            continue
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                [node.module or ""] if isinstance(node, ast.ImportFrom) else []
            importers += [f"{rel}: {n}" for n in names if n == "vaelab.cli" or n.startswith("vaelab.cli.")]
    assert importers == []


def test_train_help_has_a_flag_per_config_field():
    import dataclasses

    from vaelab.cli import NOT_FLAGS
    from vaelab.config import ModelConfig, TrainConfig

    text = vaelab("train", "--help", check=0).stdout
    for cls in (ModelConfig, TrainConfig):
        for f in dataclasses.fields(cls):
            flag = "--" + f.name.replace("_", "-")
            if f.name in NOT_FLAGS:  # set from the data (input_shape), or by `vaelab train-prior` (prior_*)
                assert flag not in text, f.name
            else:
                assert flag in text, f.name
    assert "--no-binarize" in text and "--no-progress" in text


def test_models_lists_models_and_presets():
    out = vaelab("models", check=0).stdout
    for name in ("ae", "vae", "seed-vae", "seed-conv-ae"):
        assert f"  {name} " in out


def test_usage_errors_exit_2():
    proc = vaelab("train", "--epochs", "many")
    assert proc.returncode == 2 and "invalid int value" in proc.stderr
    assert vaelab("no-such-command").returncode == 2


# ------------------------------------------------------------------------------------------ train


def test_train_writes_a_complete_run(run):
    for name in ("config.json", "metrics.jsonl", "checkpoint.safetensors", "model.safetensors",
                 "evaluation.json"):
        assert (run / name).is_file(), name
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["model"]["latent_dim"] == 2 and cfg["model"]["input_shape"] == [1, 8, 8]
    assert cfg["train"]["epochs"] == 2
    assert cfg["data"] == {"dataset": "digits", "data_dir": None, "binarize": False, "factors": None}
    assert cfg["preset"] == "seed-vae"
    lines = (run / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["epoch"] for line in lines] == [1, 2]
    ev = json.loads((run / "evaluation.json").read_text())
    assert {"loss", "recon", "kl", "bce", "mse"} <= set(ev) and ev["n"] == 180
    assert np.isfinite([ev[k] for k in ("loss", "recon", "kl", "bce", "mse")]).all()
    for name in PNGS:
        assert_png(run / name)


def test_evaluate_prints_a_table_and_writes_json(run, tmp_path):
    out = tmp_path / "ev.json"
    proc = vaelab("evaluate", run, "--out", out, check=0)
    assert "loss" in proc.stdout and "kl" in proc.stdout
    ev = json.loads(out.read_text())
    assert ev["split"] == "test" and ev["n"] == 180
    # the numbers agree with the ones train wrote (fixed evaluation seed)
    assert ev["loss"] == pytest.approx(json.loads((run / "evaluation.json").read_text())["loss"], rel=1e-5)
    vaelab("evaluate", run, "--split", "train", check=0)
    assert json.loads((run / "evaluation-train.json").read_text())["n"] == 1617


@pytest.mark.parametrize("command, default, extra", [
    ("reconstruct", "reconstructions.png", ["--n", 6]),
    ("sample", "samples.png", ["--n", 16, "--seed", 3]),
    ("manifold", "manifold.png", ["--n", 7, "--limit", 3]),
    ("interpolate", "interpolation.png", ["--steps", 5, "--pairs", 2, "--method", "slerp"]),
])
def test_picture_commands_write_their_png(run, command, default, extra):
    (run / default).unlink()  # drawn by train: the command must draw it again, in RUN by default
    proc = vaelab(command, run, *extra, check=0)
    assert str(run / default) in proc.stdout
    assert_png(run / default, min_w=60)


def test_picture_commands_take_an_output_file(run, tmp_path):
    out = tmp_path / "elsewhere" / "pic.png"
    vaelab("sample", run, "--out", out, check=0)
    assert_png(out)


def test_encode_writes_latents_labels_and_scatter(run, tmp_path):
    vaelab("encode", run, check=0)
    z = np.load(run / "latents.npy")
    assert z.shape == (180, 2) and z.dtype == np.float32
    assert np.load(run / "latents.labels.npy").shape == (180,)
    assert_png(run / "latents.png")
    out = tmp_path / "z.npy"
    vaelab("encode", run, "--split", "all", "--out", out, check=0)
    assert np.load(out).shape == (1797, 2)
    assert (tmp_path / "z.labels.npy").is_file() and (tmp_path / "z.png").is_file()


def test_sample_needs_a_prior(tmp_path):
    out = tmp_path / "ae"
    vaelab("train", "--preset", "seed-conv-ae", "--epochs", 1, "--out", out, *FAST, check=0)
    assert_png(out / "reconstructions.png")
    assert not (out / "samples.png").exists() and not (out / "manifold.png").exists()
    assert_clean_error(vaelab("sample", out), "no prior")
    assert_clean_error(vaelab("manifold", out), "vector latent")


def test_tabular_data_gets_only_the_latent_scatter(tmp_path):
    rng = np.random.default_rng(0)
    x = rng.normal(size=(200, 5))
    lines = ["a,b,c,d,e,label"] + [",".join(f"{v:.4f}" for v in row) + f",{i % 2}" for i, row in enumerate(x)]
    (tmp_path / "rows.csv").write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    vaelab("train", "--model", "vae", "--dataset", tmp_path / "rows.csv", "--likelihood", "gaussian",
           "--latent-dim", 3, "--epochs", 1, "--out", out, "--no-progress", check=0)
    assert sorted(p.name for p in out.glob("*.png")) == ["latents.png"]
    assert_clean_error(vaelab("reconstruct", out), "vectors of 5 numbers")
    vaelab("encode", out, check=0)
    assert np.load(out / "latents.npy").shape == (20, 3)


# ------------------------------------------------------------------------------------ config files


@pytest.mark.parametrize("suffix, text", [
    (".toml", 'latent-dim = 3\nepochs = 1\nchannels = [16, 32]\npictures = false\n'),
    (".yaml", "latent-dim: 3\nepochs: 1\nchannels: 16,32\nlr: 2e-3\npictures: false\n"),
])
def test_config_file_keys_mirror_the_flags(tmp_path, suffix, text):
    cfg_file = tmp_path / f"settings{suffix}"
    cfg_file.write_text(text)
    out = tmp_path / "run"
    vaelab("train", "--config", cfg_file, "--out", out, *FAST, check=0)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model"]["latent_dim"] == 3 and cfg["model"]["channels"] == [16, 32]
    assert cfg["model"]["hidden"] == [16]  # the rest still comes from the default preset, seed-vae
    assert cfg["train"]["epochs"] == 1
    assert not (out / "samples.png").exists()
    if suffix == ".yaml":
        assert cfg["train"]["lr"] == 2e-3


def test_flags_override_the_config_file(tmp_path):
    cfg_file = tmp_path / "settings.toml"
    cfg_file.write_text('latent-dim = 3\nepochs = 1\nmodel = "vae"\n')
    out = tmp_path / "run"
    vaelab("train", "--config", cfg_file, "--latent-dim", 4, "--no-pictures", "--out", out, *FAST, check=0)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model"]["latent_dim"] == 4
    assert cfg["preset"] is None and cfg["model"]["hidden"] == [256]  # --model alone: ModelConfig defaults


# ------------------------------------------------------------------------------------------ errors


def test_every_config_problem_is_reported_at_once(tmp_path):
    proc = vaelab("train", "--batch-size", 0, "--latent-dim", -1, "--out", tmp_path / "r", *FAST)
    assert_clean_error(proc, "batch_size=0", "latent_dim=-1")
    assert not (tmp_path / "r").exists()


def test_unknown_dataset_is_a_clean_error(tmp_path):
    assert_clean_error(vaelab("train", "--dataset", "no-such-data", "--out", tmp_path / "r", "--no-progress"),
                       "no-such-data")


def test_missing_run_directory_is_a_clean_error(tmp_path):
    for command in ("evaluate", "sample"):
        assert_clean_error(vaelab(command, tmp_path / "missing"), str(tmp_path / "missing"), "does not exist")


def test_unknown_config_key_is_a_clean_error(tmp_path):
    cfg_file = tmp_path / "bad.yaml"
    cfg_file.write_text("latent-dim: 3\nlatent-size: 4\nepoch: 2\n")
    assert_clean_error(vaelab("train", "--config", cfg_file, "--out", tmp_path / "r", *FAST),
                       "'latent_size'", "'epoch'")


def test_an_existing_run_is_not_overwritten_silently(run, tmp_path):
    before = (run / "model.safetensors").read_bytes()
    assert_clean_error(vaelab("train", "--epochs", 1, "--out", run, *FAST), "--resume", "--overwrite")
    assert (run / "model.safetensors").read_bytes() == before


def test_resume_refuses_contradicting_model_settings(run):
    assert_clean_error(vaelab("train", "--resume", "--out", run, "--latent-dim", 5, *FAST), "latent_dim=5")


def test_ctrl_c_exits_130_with_a_message(tmp_path, monkeypatch, capsys):
    import vaelab.training
    from vaelab.cli import main

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(vaelab.training, "fit", interrupted)
    assert main(["train", "--out", str(tmp_path / "r"), "--epochs", "1", *FAST]) == 130
    assert "vaelab: interrupted" in capsys.readouterr().err


# ------------------------------------------------------------------------------------------ resume


def test_resume_continues_exactly(tmp_path):
    common = ("--preset", "seed-vae", "--seed", 7, "--batch-size", 64, "--no-pictures", *FAST)
    vaelab("train", "--epochs", 1, "--out", tmp_path / "a", *common, check=0)
    proc = vaelab("train", "--resume", "--epochs", 2, "--out", tmp_path / "a", "--no-progress", check=0)
    assert "resuming" in proc.stdout
    vaelab("train", "--epochs", 2, "--out", tmp_path / "b", *common, check=0)

    resumed, fresh = load_weights(tmp_path / "a"), load_weights(tmp_path / "b")
    assert resumed.keys() == fresh.keys()
    import torch

    for k in fresh:
        assert torch.equal(resumed[k], fresh[k]), k
    lines = (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 2
    assert json.loads((tmp_path / "a" / "config.json").read_text())["train"]["epochs"] == 2


def test_evaluate_with_the_likelihood_and_probes(run, tmp_path):
    out = tmp_path / "ev.json"
    proc = vaelab("evaluate", run, "--nll-samples", 10, "--binarize", "dynamic", "--probes", "--out", out,
                  check=0)
    metrics = json.loads(out.read_text())["metrics"] if "metrics" in json.loads(out.read_text()) \
        else json.loads(out.read_text())
    flat = json.dumps(metrics)
    for key in ("nll", "nll_se", "linear_probe_accuracy", "knn5_accuracy", "active_units"):
        assert f'"{key}"' in flat, key
    assert "nll" in proc.stdout
    assert metrics["nll_precision"] == "fp32"  # the default: the likelihood stays fp32 unless asked


def test_evaluate_decodes_the_likelihood_in_bf16_when_asked(run, tmp_path):
    fp32, bf16 = tmp_path / "fp32.json", tmp_path / "bf16.json"
    vaelab("evaluate", run, "--nll-samples", 20, "--binarize", "dynamic", "--out", fp32, check=0)
    vaelab("evaluate", run, "--nll-samples", 20, "--binarize", "dynamic", "--nll-precision", "bf16", "--out", bf16,
           check=0)
    a, b = json.loads(fp32.read_text()), json.loads(bf16.read_text())
    assert (a["nll_precision"], b["nll_precision"]) == ("fp32", "bf16")
    assert b["nll"] != a["nll"] and b["nll"] == pytest.approx(a["nll"], abs=0.05)  # the same images and samples
    assert b["loss"] == a["loss"]  # only the likelihood's decodings change precision
    bad = vaelab("evaluate", run, "--nll-samples", 2, "--nll-precision", "fp16", check=2)
    assert "argument --nll-precision: invalid choice: 'fp16' (choose from" in bad.stderr
    assert "Traceback" not in bad.stderr
