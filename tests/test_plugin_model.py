"""A model from outside vaelab, registered only through the entry-point group `vaelab.models`, works in every
command like a built-in one.

The test writes a small out-of-tree package, vaelab-wae (a WAE-MMD, Tolstikhin et al. 2018), with the
pyproject.toml a user would write, and "installs" it the way an installer leaves a package: its code on the path
next to a `vaelab_wae-0.1.dist-info/` folder holding METADATA and the entry_points.txt of that pyproject's
`[project.entry-points."vaelab.models"]` table (importlib.metadata finds entry points through such folders on
sys.path). Every check runs in a fresh interpreter with that folder on PYTHONPATH, so this process's registry
never sees the plugin: the real CLI (`vaelab models / train / evaluate / sample / detect`) and the Python API.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

try:
    import tomllib
except ModuleNotFoundError:  # Python 3.10: vaelab depends on tomli there
    import tomli as tomllib

REPO = Path(__file__).resolve().parents[1]

PYPROJECT = """\
[build-system]
requires = ["setuptools>=68"]
build-backend = "setuptools.build_meta"

[project]
name = "vaelab-wae"
version = "0.1"
dependencies = ["vaelab"]

[project.entry-points."vaelab.models"]
wae = "vaelab_wae.model:WAE"
"""

# WAE-MMD (Tolstikhin et al. 2018, https://arxiv.org/abs/1711.01558): a deterministic encoder, the prior N(0, I),
# loss recon + lambda * MMD(q(z), p(z)) with the inverse multiquadratic kernel k(a, b) = C / (C + |a - b|^2),
# C = 2 * d * s (s: the prior's variance, the paper's choice)
WAE_SOURCE = '''\
"""Wasserstein autoencoder, WAE-MMD (Tolstikhin et al. 2018), as an out-of-tree vaelab model."""
from dataclasses import dataclass, field

import torch

from vaelab.losses import recon_nll
from vaelab.models import Autoencoder, Capabilities, ModelSettings, PointMass


@dataclass(frozen=True)
class WAESettings(ModelSettings):
    mmd_weight: float = field(default=10.0, metadata={"help": "weight lambda of the MMD penalty"})
    kernel_scale: float = field(default=1.0, metadata={"help": "s in the kernel's C = 2 * latent_dim * s"})

    def problems(self, config):
        out = []
        if not self.mmd_weight >= 0:
            out.append(f"mmd_weight={self.mmd_weight!r} must be >= 0")
        if not self.kernel_scale > 0:
            out.append(f"kernel_scale={self.kernel_scale!r} must be > 0")
        return out


def mmd_imq(z, p, scale):
    """Unbiased estimate of MMD^2 between the rows of z and of p (n, d) under the inverse multiquadratic kernel."""
    n, c = len(z), 2.0 * z.shape[1] * scale
    k = lambda a, b: c / (c + torch.cdist(a, b) ** 2)  # noqa: E731
    off_diagonal = 1 - torch.eye(n, dtype=z.dtype, device=z.device)
    return ((k(z, z) + k(p, p)) * off_diagonal).sum() / (n * (n - 1)) - 2 * k(z, p).mean()


def wae_loss(x, out, *, likelihood="bernoulli", sigma=1.0, mmd_weight=10.0, kernel_scale=1.0, target=None):
    """recon + mmd_weight * MMD(codes, N(0, I) draws); the MMD is a batch quantity, shared by every sample."""
    target = x if target is None else target
    recon = recon_nll(target, out.recon, likelihood, sigma)
    z = out.z.flatten(1)
    mmd = mmd_imq(z, torch.randn_like(z), kernel_scale) if len(z) > 1 else z.new_zeros(())
    return {"loss": recon + mmd_weight * mmd, "recon": recon, "mmd": mmd.expand(len(z))}


class WAE(Autoencoder):
    """Wasserstein autoencoder (WAE-MMD): deterministic codes matched to N(0, I) by an MMD penalty."""

    Settings = WAESettings
    capabilities = Capabilities(stochastic=False, samples=True)
    objective = staticmethod(wae_loss)

    def loss_weights(self, shaping):
        s = self.settings
        return {**super().loss_weights(shaping), "mmd_weight": s.mmd_weight, "kernel_scale": s.kernel_scale}

    def encode(self, x, condition=None):
        self._check_condition(condition)
        return PointMass(self.encoder(x))
'''

SMALL = ("--dataset", "digits", "--arch", "mlp", "--latent-dim", "2", "--hidden", "32", "--no-progress")


def _install(site: Path, project: Path, dist: str, version: str) -> None:
    """What an installer leaves for `project`: a dist-info folder in `site` with METADATA and the entry points of
    the project's pyproject.toml."""
    meta = tomllib.loads((project / "pyproject.toml").read_text())["project"]
    info = site / f"{dist}-{version}.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {meta['name']}\nVersion: {meta['version']}\n")
    lines = []
    for group, entries in meta["entry-points"].items():
        lines += [f"[{group}]"] + [f"{name} = {value}" for name, value in entries.items()] + [""]
    (info / "entry_points.txt").write_text("\n".join(lines))


@pytest.fixture(scope="module")
def plugin(tmp_path_factory) -> Path:
    """The project folder of vaelab-wae, installed in place (it is its own site folder): put it on the path."""
    project = tmp_path_factory.mktemp("vaelab-wae")
    (project / "pyproject.toml").write_text(PYPROJECT)
    (project / "vaelab_wae").mkdir()
    (project / "vaelab_wae" / "__init__.py").write_text("")
    (project / "vaelab_wae" / "model.py").write_text(WAE_SOURCE)
    _install(project, project, "vaelab_wae", "0.1")
    return project


def _env(*paths: Path) -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), *map(str, paths)])
    return env


def run(args, paths, cwd, *, check: int | None = 0, timeout: int = 300) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, *map(str, args)], check=False, cwd=cwd, env=_env(*paths),
                          capture_output=True, text=True, timeout=timeout)
    if check is not None:
        assert proc.returncode == check, (f"{' '.join(map(str, args))} exited {proc.returncode}, not {check}\n"
                                          f"stdout:\n{proc.stdout[-3000:]}\nstderr:\n{proc.stderr[-6000:]}")
    return proc


def vaelab(*args, paths, cwd, check: int | None = 0) -> subprocess.CompletedProcess:
    return run(["-m", "vaelab", *args], paths, cwd, check=check)


@pytest.fixture(scope="module")
def trained(plugin, tmp_path_factory) -> Path:
    """One run of the plugin model, trained by the real CLI: `vaelab train --model wae ...`."""
    cwd = tmp_path_factory.mktemp("wae-runs")
    vaelab("train", "--model", "wae", *SMALL, "--epochs", "2", "--mmd-weight", "5", "--out", "RUN",
           paths=[plugin], cwd=cwd)
    return cwd / "RUN"


# ---------------------------------------------------------------------------------------------- the CLI


def test_models_lists_the_plugin_with_its_source(plugin, tmp_path):
    out = vaelab("models", paths=[plugin], cwd=tmp_path).stdout
    assert "wae" in out.split() and "Wasserstein autoencoder (WAE-MMD)" in out
    for builtin in ("ae", "vae", "cvae", "vqvae", "hvae", "m2"):
        assert builtin in out.split()
    # without the package on the path the name is unknown, and the error lists the registered models
    proc = vaelab("train", "--model", "wae", *SMALL, "--epochs", "1", "--out", "X", paths=[], cwd=tmp_path,
                  check=None)
    assert proc.returncode != 0 and "wae" in proc.stderr and "vae" in proc.stderr
    assert not (tmp_path / "X" / "model.safetensors").exists()


def test_train_has_a_flag_per_plugin_setting(plugin, tmp_path):
    out = vaelab("train", "--help", paths=[plugin], cwd=tmp_path).stdout
    assert "--mmd-weight" in out and "--kernel-scale" in out and "weight lambda of the MMD penalty" in out


def test_train_writes_a_run_with_the_plugin_settings(trained):
    for name in ("config.json", "metrics.jsonl", "checkpoint.safetensors", "model.safetensors", "evaluation.json",
                 "reconstructions.png", "samples.png"):
        assert (trained / name).is_file(), f"{name} missing from {sorted(p.name for p in trained.iterdir())}"
    model = json.loads((trained / "config.json").read_text())["model"]
    assert model["model"] == "wae" and model["latent_dim"] == 2 and model["hidden"] == [32]
    assert model["settings"] == {"mmd_weight": 5.0, "kernel_scale": 1.0}
    epochs = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    assert [e["epoch"] for e in epochs] == [1, 2]
    assert all(e["train_mmd"] == e["train_mmd"] and e["train_loss"] > e["train_recon"] for e in epochs)


def test_evaluate(plugin, trained, tmp_path):
    (trained / "evaluation.json").unlink()
    proc = vaelab("evaluate", trained, paths=[plugin], cwd=tmp_path)
    report = json.loads((trained / "evaluation.json").read_text())
    assert report["n"] == 180 and {"loss", "recon", "mmd"} <= set(report), report
    assert report["loss"] > report["recon"] > 0 and "mmd" in proc.stdout


def test_sample(plugin, trained, tmp_path):
    out = tmp_path / "s.png"
    vaelab("sample", trained, "--n", "4", "--out", out, paths=[plugin], cwd=tmp_path)
    assert out.is_file() and out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_detect(plugin, trained, tmp_path):
    out = tmp_path / "det"
    vaelab("detect", trained, "--data", "digits", "--normal-label", "3", "--out", out, paths=[plugin],
           cwd=tmp_path)
    for name in ("scores.csv", "flagged.csv", "histogram.png", "roc.png", "detect.json"):
        assert (out / name).is_file(), name
    rows = (out / "scores.csv").read_text().splitlines()
    assert len(rows) == 1 + 180  # a header and the 180 rows of digits' test split
    report = json.loads((out / "detect.json").read_text())
    assert report["score"] == "recon" and report["rows"] == 180 and 0.0 <= report["auroc"] <= 100.0, report
    # a score the model cannot give is refused by capability, naming the model
    proc = vaelab("detect", trained, "--data", "digits", "--normal-label", "3", "--score", "elbo", "--out",
                  tmp_path / "elbo", paths=[plugin], cwd=tmp_path, check=1)
    assert "wae" in proc.stderr and "Traceback" not in proc.stderr


# ------------------------------------------------------------------------------------------ the Python API

API_SCRIPT = textwrap.dedent("""
    import json, sys
    import torch
    import vaelab
    from vaelab.data import load_dataset
    from vaelab.models import MODELS
    from vaelab.models.registry import model_class

    spec = MODELS["wae"]
    assert spec.source == "vaelab-wae", spec
    assert spec.cls is model_class("wae") and spec.cls.__module__ == "vaelab_wae.model"
    assert "wae" in [s.name for s in vaelab.list_models()]
    data = load_dataset("digits")
    model = vaelab.build_model(model="wae", arch="mlp", latent_dim=2, hidden=(32,), mmd_weight=3.0,
                               input_shape=data.train.sample_shape)
    assert type(model).__name__ == "WAE" and model.settings.mmd_weight == 3.0
    assert model.capabilities.samples and not model.capabilities.stochastic
    history = vaelab.fit(model, data.train, data.test, epochs=1, out="api-run", progress=False)
    report = vaelab.evaluate(model, data.test)
    assert {"loss", "recon", "mmd"} <= set(report), report
    assert tuple(model.sample(3).shape) == (3, 1, 8, 8)
    same = vaelab.from_pretrained("api-run")
    assert type(same).__name__ == "WAE" and same.settings == model.settings
    x = data.test.batch(slice(0, 5))
    assert torch.equal(same.embed(x), model.embed(x))
    # its setting reaches its loss, and its pure objective refuses a keyword it does not know
    losses = []
    for weight in (3.0, 0.0):
        torch.manual_seed(0)
        m = vaelab.build_model(model="wae", arch="mlp", latent_dim=2, hidden=(32,), mmd_weight=weight,
                               input_shape=(1, 8, 8)).eval()
        torch.manual_seed(1)
        losses.append(m.loss(x, m(x))["loss"])
    assert not torch.equal(*losses), losses
    try:
        type(m).objective(x, m(x), not_a_weight=1.0)
    except TypeError:
        pass
    else:
        raise AssertionError("the objective took an unknown keyword")
    try:
        vaelab.build_model(model="wae", mmd_weight=-1.0, input_shape=(1, 8, 8))
    except vaelab.ConfigError as e:
        assert "mmd_weight=-1.0" in str(e), e
    else:
        raise AssertionError("a negative mmd_weight was accepted")
    print(json.dumps({"epochs": len(history), "loss": report["loss"]}))
""")


def test_python_api(plugin, tmp_path):
    """build_model / fit / evaluate / sample / from_pretrained, in a fresh interpreter that has the plugin."""
    proc = run(["-c", API_SCRIPT], [plugin], tmp_path)
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["epochs"] == 1 and result["loss"] > 0
    assert (tmp_path / "api-run" / "model.safetensors").is_file()


# -------------------------------------------------------------------------------------- a broken plugin


@pytest.fixture
def broken(tmp_path) -> Path:
    """An installed package whose entry point names a function, not a model class."""
    bad = tmp_path / "bad-plugin"
    bad.mkdir()
    (bad / "pyproject.toml").write_text('[project]\nname = "bad-plugin"\nversion = "0.1"\n\n'
                                        '[project.entry-points."vaelab.models"]\n'
                                        'notamodel = "vaelab_wae.model:wae_loss"\n')
    _install(bad, bad, "bad_plugin", "0.1")
    return bad


def test_models_names_a_broken_plugin(plugin, broken, tmp_path):
    proc = vaelab("models", paths=[plugin, broken], cwd=tmp_path, check=1)
    assert "notamodel" in proc.stderr and "Autoencoder" in proc.stderr and "Traceback" not in proc.stderr


def test_a_broken_plugin_names_itself_and_the_other_models_work_on(plugin, broken, tmp_path):
    proc = vaelab("train", "--model", "notamodel", *SMALL, "--epochs", "1", "--out", "X", paths=[plugin, broken],
                  cwd=tmp_path, check=None)
    assert proc.returncode == 1 and "notamodel" in proc.stderr and "Autoencoder" in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stderr
    proc = vaelab("train", "--model", "vae", *SMALL, "--epochs", "1", "--out", "X", paths=[plugin, broken],
                  cwd=tmp_path, check=None)
    assert proc.returncode == 0, proc.stderr
    assert "vaelab: warning: entry point notamodel" in proc.stderr and "Traceback" not in proc.stderr
