"""Networks of your own: build_model(..., encoder=, decoder=) with any nn.Module pair, checked on a zero batch,
recorded in config.json so that the model saves and reloads, and never imported from a file without trust_code."""

import json
import math
import os
import subprocess
import sys

import pytest
import torch

import vaelab
from vaelab.errors import CheckpointError, ConfigError
from vaelab.models import MODELS, build_model, from_pretrained

NETS = '''
import math

from torch import nn

from vaelab.models.networks import recordable


@recordable
class Encoder(nn.Module):
    """Records its arguments through @recordable."""

    def __init__(self, input_shape, width, out, norm=False):
        super().__init__()
        layers = [nn.Flatten(), nn.Linear(math.prod(input_shape), width)]
        if norm:
            layers.append(nn.BatchNorm1d(width))
        self.body = nn.Sequential(*layers, nn.Tanh(), nn.Linear(width, out))

    def forward(self, x):
        return self.body(x)


class Decoder(nn.Module):
    """Records its arguments itself, as init_kwargs."""

    def __init__(self, latent_dim, width, output_shape):
        super().__init__()
        self.init_kwargs = {"latent_dim": latent_dim, "width": width, "output_shape": list(output_shape)}
        self.body = nn.Sequential(nn.Linear(latent_dim, width), nn.Tanh(), nn.Linear(width, math.prod(output_shape)),
                                  nn.Unflatten(1, tuple(output_shape)))

    def forward(self, z):
        return self.body(z)


class Plain(nn.Module):
    """Records nothing: works in memory, cannot be saved."""

    def __init__(self, latent_dim, output_shape):
        super().__init__()
        self.shape = tuple(output_shape)
        self.linear = nn.Linear(latent_dim, math.prod(output_shape))

    def forward(self, z):
        return self.linear(z).view(-1, *self.shape)
'''

SHAPE = (1, 8, 8)  # the bundled digits
LATENT = 4


def _forget(prefix: str) -> None:
    for name in [n for n in sys.modules if n == prefix or n.startswith(prefix + ".")]:
        del sys.modules[name]


@pytest.fixture
def nets(tmp_path, monkeypatch):
    """The module mynets.nets, written to a temporary package on sys.path."""
    root = tmp_path / "pkgs"
    (root / "mynets").mkdir(parents=True)
    (root / "mynets" / "__init__.py").write_text("")
    (root / "mynets" / "nets.py").write_text(NETS)
    monkeypatch.syspath_prepend(str(root))
    _forget("mynets")
    import mynets.nets

    yield mynets.nets
    _forget("mynets")


@pytest.fixture(scope="module")
def digits():
    return vaelab.load_dataset("digits")


def _pair(nets, k: int):
    """An encoder given as an instance (@recordable) and a decoder as a (class, kwargs) pair."""
    return dict(encoder=nets.Encoder(SHAPE, 32, k * LATENT),
                decoder=(nets.Decoder, {"latent_dim": LATENT, "width": 32, "output_shape": SHAPE}))


@pytest.mark.parametrize("name,k", [("vae", 2), ("ae", 1)])
def test_train_save_and_reload_gives_the_same_outputs(nets, digits, tmp_path, name, k):
    torch.manual_seed(0)
    model = build_model(name, latent_dim=LATENT, input_shape=digits.train.sample_shape, **_pair(nets, k))
    assert isinstance(model.encoder, nets.Encoder) and isinstance(model.decoder, nets.Decoder)
    assert model.arch == "custom" and model.latent_shape == (LATENT,)
    history = vaelab.fit(model, digits.train, digits.test, epochs=1, batch_size=256, progress=False)
    assert len(history) == 1 and all(math.isfinite(v) for v in history[0].values() if isinstance(v, float))

    model.save_pretrained(tmp_path / "saved")
    cfg = json.loads((tmp_path / "saved" / "config.json").read_text())
    assert cfg["model"]["networks"] == {
        "encoder": {"class": "mynets.nets:Encoder", "kwargs": {"input_shape": [1, 8, 8], "width": 32, "out": k * LATENT}},
        "decoder": {"class": "mynets.nets:Decoder", "kwargs": {"latent_dim": LATENT, "width": 32,
                                                               "output_shape": [1, 8, 8]}}}
    assert {key.split(".")[0] for key in model.state_dict()} == {"encoder", "decoder"}

    with pytest.raises(CheckpointError, match=r"mynets\.nets:Decoder and mynets\.nets:Encoder.*trust_code=True"):
        from_pretrained(tmp_path / "saved")
    same = vaelab.from_pretrained(tmp_path / "saved", trust_code=True)
    assert type(same) is type(model) and same.config == model.config
    x = digits.test.batch(slice(0, 16))
    model.eval()
    assert torch.equal(same.embed(x), model.embed(x))
    assert torch.equal(same.reconstruct(x), model.reconstruct(x))
    # the Python spellings of loading all take the opt-in
    assert torch.equal(type(model).from_pretrained(tmp_path / "saved", trust_code=True).reconstruct(x),
                       model.reconstruct(x))
    # and the config alone rebuilds the networks (fresh weights) when trusted
    rebuilt = build_model(model.config, trust_code=True)
    assert isinstance(rebuilt.encoder, nets.Encoder) and rebuilt.config == model.config


def test_shape_mismatches_name_the_module_and_both_shapes(nets):
    with pytest.raises(ConfigError) as e:
        build_model("vae", latent_dim=LATENT, input_shape=SHAPE, encoder=nets.Encoder(SHAPE, 32, 10),
                    decoder=nets.Decoder(LATENT, 32, SHAPE))
    assert ("the encoder mynets.nets:Encoder returned shape (2, 10) for a zero batch of shape (2, 1, 8, 8); "
            "model 'vae' expects shape (2, 8) (2 x latent_dim 4: the mean and log-variance halves)") in str(e.value)

    with pytest.raises(ConfigError) as e:  # the AE's encoder emits the code itself
        build_model("ae", latent_dim=LATENT, input_shape=SHAPE, encoder=nets.Encoder(SHAPE, 32, 2 * LATENT),
                    decoder=nets.Decoder(LATENT, 32, SHAPE))
    assert "returned shape (2, 8)" in str(e.value) and "model 'ae' expects shape (2, 4)" in str(e.value)

    with pytest.raises(ConfigError) as e:
        build_model("vae", latent_dim=LATENT, input_shape=SHAPE, encoder=nets.Encoder(SHAPE, 32, 2 * LATENT),
                    decoder=nets.Decoder(LATENT, 32, (1, 8, 7)))
    assert "the decoder mynets.nets:Decoder returned shape (2, 1, 8, 7)" in str(e.value)
    assert "expects shape (2, 1, 8, 8)" in str(e.value)

    with pytest.raises(ConfigError, match=r"the decoder mynets\.nets:Decoder failed on a zero batch of shape "
                                          r"\(2, 4\): RuntimeError: .*expects it to return shape \(2, 1, 8, 8\)"):
        build_model("vae", latent_dim=LATENT, input_shape=SHAPE, encoder=nets.Encoder(SHAPE, 32, 2 * LATENT),
                    decoder=nets.Decoder(LATENT + 1, 32, SHAPE))

    with pytest.raises(ConfigError, match="pass both encoder= and decoder="):
        build_model("vae", latent_dim=LATENT, input_shape=SHAPE, encoder=nets.Encoder(SHAPE, 32, 2 * LATENT))
    with pytest.raises(ConfigError, match=r"constructor arguments must be JSON values"):
        build_model("vae", latent_dim=LATENT, input_shape=SHAPE, encoder=nets.Encoder(SHAPE, 32, 2 * LATENT),
                    decoder=(nets.Decoder, {"latent_dim": LATENT, "width": torch.nn.ReLU(), "output_shape": SHAPE}))


def test_the_dry_pass_leaves_the_networks_as_it_found_them(nets):
    enc = nets.Encoder(SHAPE, 32, 2 * LATENT, norm=True)
    norm = enc.body[2]
    dec = nets.Decoder(LATENT, 32, SHAPE)
    before = {k: v.clone() for k, v in enc.state_dict().items()}
    rng = torch.get_rng_state()
    model = build_model("vae", latent_dim=LATENT, input_shape=SHAPE, encoder=enc, decoder=dec)
    assert model.encoder is enc and enc.training and norm.training
    assert all(torch.equal(before[k], v) for k, v in enc.state_dict().items())  # no batch-norm statistics moved
    assert torch.equal(torch.get_rng_state(), rng)
    assert model.config.networks["encoder"]["kwargs"] == {"input_shape": [1, 8, 8], "width": 32, "out": 8,
                                                          "norm": True}


def test_conditional_networks_take_the_condition_concatenated(nets):
    model = build_model("cvae", latent_dim=LATENT, input_shape=SHAPE, condition_dim=10,
                        encoder=nets.Encoder((11, 8, 8), 32, 2 * LATENT),
                        decoder=nets.Decoder(LATENT + 10, 32, SHAPE))
    assert model.sample(3, condition=torch.tensor([1, 2, 3])).shape == (3, *SHAPE)
    with pytest.raises(ConfigError, match=r"its input is z with 10 condition features"):
        build_model("cvae", latent_dim=LATENT, input_shape=SHAPE, condition_dim=10,
                    encoder=nets.Encoder((11, 8, 8), 32, 2 * LATENT), decoder=nets.Decoder(LATENT, 32, SHAPE))


def test_models_with_networks_of_their_own_refuse(nets, tmp_path):
    own = sorted(name for name in MODELS if not MODELS[name].cls.custom_networks)
    assert {"vqvae", "m2", "hvae"} <= set(own)
    for name in own:
        with pytest.raises(ConfigError, match=f"model '{name}' builds its own networks"):
            build_model(name, latent_dim=LATENT, input_shape=SHAPE,
                        condition_dim=10 if MODELS[name].cls.capabilities.conditional else 0,
                        **_pair(nets, 2))
    # a config.json that pairs such a model with networks is refused before anything is imported
    model = build_model("vae", latent_dim=LATENT, input_shape=SHAPE, **_pair(nets, 2))
    model.save_pretrained(tmp_path / "saved")
    path = tmp_path / "saved" / "config.json"
    cfg = json.loads(path.read_text())
    cfg["model"]["model"] = "hvae"
    path.write_text(json.dumps(cfg))
    _forget("mynets")
    with pytest.raises(CheckpointError, match="model='hvae' builds its own networks"):
        from_pretrained(tmp_path / "saved", trust_code=True)
    assert "mynets" not in sys.modules


def test_a_network_that_records_nothing_works_but_does_not_save(nets, tmp_path):
    model = build_model("vae", latent_dim=LATENT, input_shape=SHAPE, encoder=nets.Encoder(SHAPE, 32, 2 * LATENT),
                        decoder=nets.Plain(LATENT, SHAPE))
    assert model.reconstruct(torch.rand(2, *SHAPE)).shape == (2, *SHAPE)
    with pytest.raises(ConfigError) as e:
        model.save_pretrained(tmp_path / "saved")
    text = str(e.value)
    assert "the decoder mynets.nets:Plain cannot be re-created" in text
    assert "@vaelab.models.networks.recordable" in text and "init_kwargs" in text and "(MyEncoder, {" in text
    assert not (tmp_path / "saved").exists()


# --------------------------------------------------------------------------------------- hostile files


def _hostile(tmp_path, digits, nets, monkeypatch):
    """A run directory whose config.json names evil_mod (on sys.path and PYTHONPATH), whose import writes a
    marker file; evil_mod holds the same networks, so that a trusted load succeeds."""
    marker = tmp_path / "imported-evil-mod"
    evil = tmp_path / "evil"
    evil.mkdir()
    (evil / "evil_mod.py").write_text(f"open({str(marker)!r}, 'w').write('evil_mod ran')\n" + NETS)
    monkeypatch.syspath_prepend(str(evil))  # an import would find it: only the refusal keeps it out

    torch.manual_seed(0)
    model = build_model("vae", latent_dim=LATENT, input_shape=SHAPE, **_pair(nets, 2))
    run = tmp_path / "run"
    vaelab.fit(model, digits.train, digits.test, epochs=1, batch_size=256, progress=False, out=run,
               run_info={"data": {"dataset": "digits", "data_dir": None, "binarize": False}})
    path = run / "config.json"
    path.write_text(path.read_text().replace("mynets.nets:", "evil_mod:"))
    assert '"evil_mod:Encoder"' in path.read_text()
    _forget("evil_mod")
    return run, marker, evil


def test_a_config_naming_a_module_outside_vaelab_is_not_imported_without_trust(tmp_path, digits, nets, monkeypatch):
    run, marker, _ = _hostile(tmp_path, digits, nets, monkeypatch)
    for load in (vaelab.from_pretrained, type(build_model("vae", input_shape=SHAPE)).from_pretrained):
        with pytest.raises(CheckpointError) as e:
            load(run)
        text = str(e.value)
        assert "evil_mod:Decoder and evil_mod:Encoder" in text and "outside vaelab" in text
        assert "trust_code=True" in text and "--trust-code" in text
        assert not marker.exists() and "evil_mod" not in sys.modules
    with pytest.raises(ConfigError, match="evil_mod:Encoder.*trust_code=True"):  # nor from a config in Python
        build_model(vaelab.ModelConfig.from_dict(json.loads((run / "config.json").read_text())["model"]))
    assert not marker.exists() and "evil_mod" not in sys.modules

    try:
        model = vaelab.from_pretrained(run, trust_code=True)  # the opt-in imports it
        assert marker.exists() and type(model.encoder).__module__ == "evil_mod"
    finally:
        _forget("evil_mod")


def test_a_class_that_is_no_module_is_never_called(tmp_path, nets):
    model = build_model("vae", latent_dim=LATENT, input_shape=SHAPE, **_pair(nets, 2))
    model.save_pretrained(tmp_path / "saved")
    path = tmp_path / "saved" / "config.json"
    cfg = json.loads(path.read_text())
    cfg["model"]["networks"]["encoder"] = {"class": "os:system", "kwargs": {"command": "touch pwned"}}
    path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="os:system is not an nn.Module subclass"):
        from_pretrained(tmp_path / "saved", trust_code=True)
    cfg["model"]["networks"]["encoder"] = {"class": "vaelab.cli:main", "kwargs": {}}  # inside vaelab: no opt-in
    path.write_text(json.dumps(cfg))
    with pytest.raises(CheckpointError, match="vaelab.cli:main is not an nn.Module subclass"):
        from_pretrained(tmp_path / "saved", trust_code=True)


def test_the_cli_refuses_without_trust_code_and_loads_with_it(tmp_path, digits, nets, monkeypatch):
    run, marker, evil = _hostile(tmp_path, digits, nets, monkeypatch)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(evil), os.environ.get("PYTHONPATH", "")])}
    commands = {"evaluate": ["evaluate", str(run)],  # every command that opens a run takes --trust-code
                "detect": ["detect", str(run), "--data", "digits", "--normal-label", "3", "--out",
                           str(tmp_path / "detect")],
                "train --resume": ["train", "--out", str(run), "--resume", "--epochs", "2", "--no-progress",
                                   "--no-pictures"]}

    def vaelab_cli(argv, *flags):
        return subprocess.run([sys.executable, "-m", "vaelab", *argv, *flags], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=300)

    for name, argv in commands.items():
        refused = vaelab_cli(argv)
        assert refused.returncode != 0, (name, refused.stdout)
        assert "Traceback" not in refused.stderr, (name, refused.stderr)
        assert "vaelab: error:" in refused.stderr and "evil_mod:Encoder" in refused.stderr, (name, refused.stderr)
        assert "--trust-code" in refused.stderr, (name, refused.stderr)
        assert not marker.exists(), name

    for name, argv in commands.items():
        trusted = vaelab_cli(argv, "--trust-code")
        assert trusted.returncode == 0, (name, trusted.stderr)
        assert marker.exists(), name


def test_networks_is_no_cli_flag():
    from vaelab.cli import NOT_FLAGS

    assert "networks" in NOT_FLAGS
