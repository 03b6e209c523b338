"""ModelConfig.activation: the nonlinearity of the hidden layers of vaelab's own networks (relu by default;
softplus as Kingma et al. 2014's M1+M2, tanh as Kingma & Welling 2014's MNIST VAE, elu)."""

from __future__ import annotations

import json

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from test_cli import FAST, assert_clean_error, vaelab
from vaelab.config import ACTIVATIONS, ModelConfig
from vaelab.errors import ConfigError
from vaelab.models import build_model, from_pretrained
from vaelab.models.nets import ACTIVATION_LAYERS

FUNCTIONS = {"relu": F.relu, "softplus": F.softplus, "tanh": torch.tanh, "elu": F.elu}
# every model family that builds vaelab's own networks: (model, its keywords, input shape)
FAMILIES = [
    ("vae", dict(arch="mlp"), (1, 8, 8)),
    ("vae", dict(arch="conv", channels=(4, 8)), (1, 8, 8)),
    ("ae", dict(arch="conv-pool", channels=(4, 8)), (1, 8, 8)),
    ("vae", dict(arch="conv", channels=(4,)), (2, 16)),  # windows of a series: 1-D convs
    ("cvae", dict(arch="conv", channels=(4,), condition_dim=3), (1, 8, 8)),
    ("hvae", dict(arch="mlp", latent2_dim=2, hidden2=(8,)), (1, 8, 8)),
    ("m2", dict(condition_dim=3), (1, 8, 8)),
    ("m1m2", dict(arch="mlp", condition_dim=3, m2_hidden=(8,), m2_latent=2), (1, 8, 8)),
    ("adgm", dict(condition_dim=3, aux_dim=2), (1, 8, 8)),
    ("sdgm", dict(condition_dim=3, aux_dim=2), (1, 8, 8)),
    ("vqvae", dict(channels=(4,), codebook_size=8), (1, 8, 8)),
    ("vqvae", dict(arch="mlp", codebook_size=8), (1, 8, 8)),
]


def test_every_name_has_its_layer():
    assert tuple(ACTIVATION_LAYERS) == ACTIVATIONS == ("relu", "softplus", "tanh", "elu")
    x = torch.linspace(-3, 3, 61)
    for name in ACTIVATIONS:
        assert torch.equal(ACTIVATION_LAYERS[name]()(x), FUNCTIONS[name](x)), name


def _layer_kinds(model) -> set[type]:
    return {type(m) for m in model.modules()}


@pytest.mark.parametrize("model,kw,shape", FAMILIES, ids=[f"{m}-{kw.get('arch', 'auto')}-{len(s)}d"
                                                         for m, kw, s in FAMILIES])
def test_each_family_takes_the_activation_everywhere(model, kw, shape):
    default = build_model(ModelConfig(model=model, latent_dim=2, hidden=(8,), **kw), input_shape=shape)
    kinds = _layer_kinds(default)
    assert nn.ReLU in kinds and not kinds & {nn.Softplus, nn.Tanh, nn.ELU}
    for name in ("softplus", "tanh"):
        built = build_model(ModelConfig(model=model, latent_dim=2, hidden=(8,), activation=name, **kw),
                            input_shape=shape)
        kinds = _layer_kinds(built)
        assert ACTIVATION_LAYERS[name] in kinds and nn.ReLU not in kinds, (name, kinds)
        # the same weights as the ReLU network: the activation is no parameter
        assert [p.shape for p in built.parameters()] == [p.shape for p in default.parameters()]


def test_an_mlp_vae_computes_the_activation_exactly():
    torch.manual_seed(0)
    model = build_model(ModelConfig(model="vae", arch="mlp", hidden=(16, 8), latent_dim=3, activation="softplus"),
                        input_shape=(1, 4, 4)).eval()
    x = torch.rand(5, 1, 4, 4)
    lin = [m for m in model.encoder.modules() if isinstance(m, nn.Linear)]
    h = x.flatten(1)
    for layer in lin[:-1]:
        h = F.softplus(F.linear(h, layer.weight, layer.bias))
    expected = F.linear(h, lin[-1].weight, lin[-1].bias)
    assert torch.equal(model.encoder(x).flatten(1), expected)


@pytest.mark.parametrize("name", ACTIVATIONS)
def test_conv_pool_applies_it_after_the_pool_exactly(name):
    # arch conv-pool applies the activation after the 2x2 max-pool, equal to before it because every
    # activation offered is non-decreasing: values and gradients
    torch.manual_seed(1)
    x1 = torch.randn(2, 3, 7, 5, requires_grad=True)
    x2 = x1.detach().clone().requires_grad_(True)
    pool = nn.MaxPool2d(2, ceil_mode=True)
    act = ACTIVATION_LAYERS[name]()
    a, b = act(pool(x1)), pool(act(x2))
    assert torch.equal(a, b)
    w = torch.randn_like(a)
    (a * w).sum().backward()
    (b * w).sum().backward()
    assert torch.equal(x1.grad, x2.grad)


def test_bad_activations_are_refused_with_the_way_out():
    with pytest.raises(ConfigError, match=r"activation='gelu' is unknown; choose one of \['relu', 'softplus', "
                                          r"'tanh', 'elu'\]"):
        ModelConfig(model="vae", activation="gelu").validate()
    with pytest.raises(ConfigError, match="activation='tanh' does not apply to arch 'resnet', whose blocks use "
                                          "SiLU after GroupNorm; use arch 'conv' or 'mlp'"):
        build_model(ModelConfig(model="vae", arch="resnet", channels=(16, 32), activation="tanh"),
                    input_shape=(3, 16, 16))
    with pytest.raises(ConfigError, match="does not apply to arch 'resnet'"):
        build_model(ModelConfig(model="m2", arch="resnet", channels=(16,), condition_dim=3, activation="elu"),
                    input_shape=(3, 16, 16))
    own = {part: {"class": f"mypkg.nets:{part.title()}", "kwargs": {}} for part in ("encoder", "decoder")}
    problems = ModelConfig(model="vae", networks=own, activation="softplus", input_shape=(1, 8, 8)).problems()
    assert any("networks of your own (encoder= / decoder=) choose their own nonlinearity: leave activation at "
               "'relu'" in p for p in problems), problems


def test_cli_trains_saves_and_reloads_the_activation(tmp_path):
    out = tmp_path / "run"
    vaelab("train", "--model", "vae", "--arch", "mlp", "--hidden", 16, "--latent-dim", 2, "--activation",
           "softplus", "--epochs", 1, "--out", out, *FAST, check=0)
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["model"]["activation"] == "softplus"
    model = from_pretrained(out)
    assert nn.Softplus in _layer_kinds(model) and nn.ReLU not in _layer_kinds(model)
    # a run written before the field existed (no "activation" in its config) loads with ReLU, its weights intact
    del cfg["model"]["activation"]
    (out / "config.json").write_text(json.dumps(cfg))
    old = from_pretrained(out)
    assert old.config.activation == "relu" and nn.ReLU in _layer_kinds(old)
    assert all(torch.equal(a, b) for a, b in zip(old.state_dict().values(), model.state_dict().values()))


def test_cli_refuses_an_unknown_activation(tmp_path):
    proc = vaelab("train", "--model", "vae", "--activation", "gelu", "--epochs", 1, "--out", tmp_path / "r", *FAST)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "argument --activation: invalid choice: 'gelu'" in proc.stderr
    proc = vaelab("train", "--model", "vae", "--arch", "resnet", "--channels", "8", "--activation", "tanh",
                  "--epochs", 1, "--out", tmp_path / "r", *FAST)
    assert_clean_error(proc, "activation='tanh' does not apply to arch 'resnet'")
    assert not (tmp_path / "r").exists()
