"""Every model setting reaches the place where it acts.

For every registered model and every field of its Settings, the test builds the model twice with the same torch
seed, once with the field perturbed to another valid value, and asserts that the two differ where the field
acts: in the weights (state-dict keys, shapes or values), in the loss of the same batch under the same seed, or,
for settings that act while training (the VQ-VAE's codebook updates), in the weights after a training step. A
setting that is accepted, saved and then ignored (the bug of `vq_commitment`, which once never reached the
loss) fails here. Also: each model's pure `objective` refuses a keyword it does not know.
"""

from __future__ import annotations

import dataclasses
import inspect
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vaelab.losses import NO_SHAPING
from vaelab.models import MODELS, build_model

REPO = Path(__file__).resolve().parents[1]
SHAPE = (1, 8, 8)
TINY = {"input_shape": SHAPE, "latent_dim": 4, "channels": (4, 8), "hidden": (16,)}
CLASSES = 3  # condition_dim of the conditional models
BASE_SETTINGS = {"codebook_size": 64}  # a small codebook, more codes than a batch has vectors (restarts)
# settings that act only when another is set: the code prior's shape needs a prior
NEEDS = {"prior_channels": {"prior_layers": 1}, "prior_classes": {"prior_layers": 1}, "m1_batches": {"m1_epochs": 1},
         "lr_span": {"m1_epochs": 1}, "code_dims": {"m1_epochs": 1}}
# the perturbed value of each built-in setting; a setting not listed gets one from its default's type (_other)
PERTURBED = {"beta": 2.5, "alpha": 0.7, "latent2_dim": 3, "hidden2": (8,), "codebook_size": 72,
             "vq_commitment": 1.0, "vq_ema": False, "vq_kmeans_init": False, "vq_restart_after": 1,
             "prior_layers": 2, "prior_channels": 8, "prior_classes": 3, "estimator": "mss", "variant": "ii",
             "lambda_d": 3.0, "m1_batches": "mixed", "lr_span": "stage",
             "code_dims": "active"}


def _fields(name: str) -> list[dataclasses.Field]:
    return list(dataclasses.fields(MODELS[name].cls.Settings))


CASES = [(name, f.name) for name in sorted(MODELS) for f in _fields(name)]


def _other(field: dataclasses.Field, value):
    """A valid value other than `value` for a setting the PERTURBED table does not know."""
    if field.name in PERTURBED:
        return PERTURBED[field.name]
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value * 2 + 0.5
    if isinstance(value, tuple) and all(isinstance(v, int) for v in value):
        return (*value, 8)
    pytest.fail(f"setting {field.name}={value!r}: add a perturbed value to PERTURBED in {__file__}")


def _base(name: str, field: str | None = None) -> dict:
    cls = MODELS[name].cls
    names = {f.name for f in _fields(name)}
    out = dict(TINY, model=name, **{k: v for k, v in BASE_SETTINGS.items() if k in names})
    if cls.capabilities.conditional:
        out["condition_dim"] = CLASSES
    out.update(NEEDS.get(field, {}))
    return out


def _build(overrides: dict):
    torch.manual_seed(0)
    return build_model(**overrides)


def _batch(model) -> tuple[torch.Tensor, torch.Tensor | None]:
    g = torch.Generator().manual_seed(1)
    x = torch.rand((8, *SHAPE), generator=g)
    cond = None
    if model.capabilities.conditional:
        cond = torch.arange(8) % CLASSES
        if model.capabilities.semi_supervised:
            cond[[3, 5]] = -1  # two hidden labels: both halves of a semi-supervised loss act
    return x, cond


def _loss(model, x, cond) -> torch.Tensor:
    torch.manual_seed(2)
    return model.loss(x, model(x, cond))["loss"]


def _state_differs(a, b) -> str | None:
    sa, sb = a.state_dict(), b.state_dict()
    if sa.keys() != sb.keys():
        return f"state-dict keys {sorted(set(sa) ^ set(sb))}"
    for k in sa:
        if sa[k].shape != sb[k].shape:
            return f"the shape of {k}"
        if not torch.equal(sa[k], sb[k]):
            return f"the values of {k}"
    return None


def _train_steps(model, x, cond, steps: int = 2) -> None:
    """Training-mode forwards with gradients, each followed by an SGD step: what moves a VQ-VAE's codebook. The
    loop's first epoch begins with start_epoch(0): what picks a staged model's stage (m1m2's m1_epochs)."""
    model.start_epoch(0)
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-2)
    with torch.enable_grad():
        for step in range(steps):
            torch.manual_seed(10 + step)
            opt.zero_grad()
            model.loss(x, model(x, cond))["loss"].mean().backward()
            opt.step()


def where_it_reaches(name: str, field: str, value) -> str | None:
    """Where setting `field` = `value` makes model `name` differ from its base (None: nowhere)."""
    base = _base(name, field)
    a, b = _build(base), _build({**base, field: value})
    assert getattr(b.settings, field) == value and getattr(a.settings, field) != value
    found = _state_differs(a, b)
    if found:
        return f"weights: {found}"
    x, cond = _batch(a)
    a.eval(), b.eval()
    with torch.no_grad():
        la, lb = _loss(a, x, cond), _loss(b, x, cond)
    if not torch.equal(la, lb):
        return "loss"
    if a.capabilities.semi_supervised:  # how a trained model classifies (posterior_samples)
        torch.manual_seed(2)
        pa = a.classify(x)
        torch.manual_seed(2)
        if not torch.equal(pa, b.classify(x)):
            return "what it classifies by (classify)"
    _train_steps(a, x, cond), _train_steps(b, x, cond)
    found = _state_differs(a, b)
    if found:
        return f"weights after training steps: {found}"
    # what the loop asks the model for its batches (m1m2's m1_batches: the batches of M1's stage)
    if a.mixes_labels(0) != b.mixes_labels(0):
        return "the loop's batches (mixes_labels)"
    # the optimizers of the networks it trains beside itself (factorvae's disc_lr)
    optimizers = lambda m: {k: (aux.lr, aux.betas) for k, aux in m.auxiliaries().items()}  # noqa: E731
    if optimizers(a) != optimizers(b):
        return "the loop's auxiliary optimizers (auxiliaries)"
    # and the span of its learning-rate schedule (m1m2's lr_span)
    return "the loop's schedule (schedule_span)" if a.schedule_span(1, 3) != b.schedule_span(1, 3) else None


@pytest.mark.parametrize("name,field", CASES, ids=[f"{m}-{f}" for m, f in CASES])
def test_every_setting_reaches_the_model(name, field):
    f = next(f for f in _fields(name) if f.name == field)
    start = _base(name, field).get(field, f.default)
    value = _other(f, start)
    assert value != start
    where = where_it_reaches(name, field, value)
    assert where, (f"model {name!r}: setting {field}={value!r} (against {start!r}) changes neither the weights, the "
                   "loss of a batch, nor the weights after training steps: it never reaches the model")


def test_the_cases_cover_the_builtin_settings():
    """The parametrization sees every built-in model's settings (a guard against an empty CASES)."""
    assert {"beta", "alpha", "latent2_dim", "hidden2", "codebook_size", "vq_commitment", "vq_ema", "vq_kmeans_init",
            "vq_restart_after", "prior_layers", "prior_channels", "prior_classes"} <= {f for _, f in CASES}
    assert {"ae", "vae", "cvae", "hvae", "m2", "vqvae"} <= set(MODELS)


# ------------------------------------------------------------------------- settings that act while training


def _codebook_after_training(field: str, value) -> tuple[torch.Tensor, torch.Tensor]:
    base = _base("vqvae", field)
    a, b = _build(base), _build({**base, field: value})
    x, _ = _batch(a)
    _train_steps(a, x, None), _train_steps(b, x, None)
    return a.quantizer.codebook.detach(), b.quantizer.codebook.detach()


@pytest.mark.parametrize("field,value", [("vq_ema", False), ("vq_kmeans_init", False), ("vq_restart_after", 1)])
def test_vq_training_settings_move_the_codebook_differently(field, value):
    """The quantizer settings act in its training-mode update: after the same training steps from the same
    start, the codebooks differ (not merely a flag in the state dict)."""
    ca, cb = _codebook_after_training(field, value)
    assert ca.shape == cb.shape and not torch.equal(ca, cb), field


def test_vq_restart_after_restarts_codes():
    base = _base("vqvae")
    counts = {}
    for after in (0, 1):
        model = _build({**base, "vq_restart_after": after})
        _train_steps(model, _batch(model)[0], None)
        counts[after] = model.quantizer.usage()["code_restarts"]
    assert counts[0] == 0 and counts[1] > 0, counts


def test_prior_settings_shape_the_code_prior():
    base = _base("vqvae")
    assert _build(base).prior is None and not _build(base).capabilities.samples
    small = _build({**base, "prior_layers": 1, "prior_channels": 8})
    bigger = _build({**base, "prior_layers": 2, "prior_channels": 12, "prior_classes": 3})
    assert small.capabilities.samples and len(small.prior.layers) == 1 and small.prior.embed.weight.shape == (64, 8)
    assert len(bigger.prior.layers) == 2 and bigger.prior.embed.weight.shape == (64, 12)
    assert small.prior.classes == 0 and small.prior.layers[0].condition is None
    assert bigger.prior.classes == 3 and bigger.prior.layers[0].condition.num_embeddings == 3


# ------------------------------------------------------------------------------- vq_commitment, regression


def test_vq_commitment_weights_the_commitment_term():
    """vq_commitment=1.0 against 0.25: the loss moves by exactly 0.75 times the commitment term."""
    base = _base("vqvae")
    a, b = _build({**base, "vq_commitment": 0.25}), _build({**base, "vq_commitment": 1.0})
    x, _ = _batch(a)
    a.eval(), b.eval()
    with torch.no_grad():
        torch.manual_seed(2)
        ta = a.loss(x, a(x))
        torch.manual_seed(2)
        tb = b.loss(x, b(x))
    assert torch.equal(ta["commitment"], tb["commitment"]) and bool((ta["commitment"] > 0).all())
    assert not torch.equal(ta["loss"], tb["loss"])
    torch.testing.assert_close(tb["loss"] - ta["loss"], 0.75 * ta["commitment"])


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), *filter(None, [os.environ.get("PYTHONPATH")])])
    return env


def test_vq_commitment_from_the_cli(tmp_path):
    """`vaelab train --model vqvae --vq-commitment 1.0` saves 1.0 and trains another loss than the default 0.25,
    same seed (both runs at once)."""
    common = ["--model", "vqvae", "--dataset", "digits", "--epochs", "1", "--seed", "0", "--codebook-size", "16",
              "--latent-dim", "4", "--channels", "8,16", "--no-progress", "--no-pictures"]
    runs = {0.25: [], 1.0: ["--vq-commitment", "1.0"]}
    procs = {c: subprocess.Popen([sys.executable, "-m", "vaelab", "train", *common, *extra, "--out", f"run-{c}"],
                                 cwd=tmp_path, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for c, extra in runs.items()}
    first = {}
    for c, proc in procs.items():
        out, err = proc.communicate(timeout=300)
        assert proc.returncode == 0, f"commitment {c}: exit {proc.returncode}\n{out[-2000:]}\n{err[-4000:]}"
        run = tmp_path / f"run-{c}"
        config = json.loads((run / "config.json").read_text())
        assert config["model"]["settings"]["vq_commitment"] == c, config["model"]["settings"]
        first[c] = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert first[0.25]["epoch"] == first[1.0]["epoch"] == 1
    assert first[1.0]["train_loss"] != first[0.25]["train_loss"], first


# ------------------------------------------------------------------------------------ pure objectives


@pytest.mark.parametrize("name", sorted(MODELS))
def test_objective_refuses_an_unknown_keyword(name):
    """A model's loss is a pure function of named keywords: a misspelt or forgotten weight is a TypeError, never
    silently dropped by a **kwargs."""
    cls = MODELS[name].cls
    model = _build(_base(name))
    x, cond = _batch(model)
    out = model(x, cond)
    weights = model.loss_weights(NO_SHAPING)
    params = inspect.signature(cls.objective).parameters
    assert not any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()), cls.objective
    assert set(weights) <= set(params), sorted(set(weights) - set(params))
    terms = cls.objective(x, out, target=None, **weights)
    assert terms["loss"].shape == (len(x),)
    with pytest.raises(TypeError):
        cls.objective(x, out, target=None, **weights, not_a_weight=1.0)
