"""The contract every registered model keeps, run over the whole registry and several input shapes."""

import pytest
import torch

from vaelab.config import PRESETS, ModelConfig
from vaelab.data import ArrayDataset
from vaelab.errors import ConfigError, VaelabError
from vaelab.evaluation import loss_terms
from vaelab.models import MODELS, build_model, from_pretrained
from vaelab.training import fit

SHAPES = [(1, 28, 28), (1, 8, 8), (3, 32, 32), (1, 7, 15), (12,)]
TINY = dict(channels=(4, 8), hidden=(16,), latent_dim=3)


N_CLASSES = 3


def _data(shape, n=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % N_CLASSES
    if len(shape) == 3:
        return ArrayDataset(torch.randint(0, 256, (n, *shape), dtype=torch.uint8, generator=g), y)
    return ArrayDataset(torch.rand(n, *shape, generator=g), y, scale=1.0)


def _build(name, shape, **kw):
    """A registered model from its default config (tiny widths); conditional ones get N_CLASSES classes."""
    cond = {"condition_dim": N_CLASSES} if MODELS[name].cls.capabilities.conditional else {}
    return build_model(model=name, input_shape=shape, **TINY, **cond, **kw)


def _cond(model, n):
    return torch.arange(n) % N_CLASSES if model.capabilities.conditional else None


def _weights(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_forward_shapes(name, shape):
    model = _build(name, shape)
    x, c = _data(shape).batch(slice(0, 5)), _cond(model, 5)
    out = model(x, c)
    assert out.recon.shape == x.shape
    assert out.z.shape == (5, *model.latent_shape)
    assert model.embed(x, c).shape == (5, *model.latent_shape)
    assert model.decode(out.z, c).shape == x.shape
    terms = model.loss(x, out)
    assert all(v.shape == (5,) for v in terms.values())
    if model.capabilities.stochastic:  # K importance samples: (K, B, ...) outputs, the IWAE bound per sample
        out = model(x, c, n_samples=4)
        assert out.recon.shape == (4, *x.shape) and out.z.shape == (4, 5, *model.latent_shape)
        assert model.loss(x, out)["loss"].shape == (5,)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_train_step_changes_weights_and_evaluation_does_not(name, tmp_path):
    torch.manual_seed(0)
    model = _build(name, (1, 8, 8))
    data = _data((1, 8, 8), n=32)
    before = _weights(model)
    fit(model, data, None, epochs=1, batch_size=32, progress=False)
    after = _weights(model)
    assert all(not torch.equal(before[k], after[k]) for k in before), "every tensor should have moved"
    loss_terms(model, data)
    model.reconstruct(data.batch(slice(0, 4)), _cond(model, 4))
    assert all(torch.equal(after[k], v) for k, v in _weights(model).items())


@pytest.mark.parametrize("name", sorted(MODELS))
def test_save_and_reload_give_identical_outputs(name, tmp_path):
    model = _build(name, (1, 8, 8))
    model.save_pretrained(tmp_path / "m")
    loaded = from_pretrained(tmp_path / "m")
    assert type(loaded) is type(model) and loaded.config == model.config
    x, c = _data((1, 8, 8)).batch(slice(0, 4)), _cond(model, 4)
    torch.testing.assert_close(loaded.reconstruct(x, c), model.eval().reconstruct(x, c), rtol=0, atol=0)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_what_the_user_facing_calls_return_feeds_any_other_call(name):
    """embed / reconstruct / sample return ordinary tensors (no_grad, not inference_mode), so decode(embed(x))
    and a gradient through the decoder at an embedded point work."""
    model = _build(name, (1, 8, 8)).eval()
    x, c = _data((1, 8, 8)).batch(slice(0, 4)), _cond(model, 4)
    z = model.embed(x, c)
    assert not z.is_inference() and not z.requires_grad
    assert not model.reconstruct(x, c).is_inference()
    z = z.clone().requires_grad_(True)
    model.decode(z, c).sum().backward()
    assert z.grad is not None and torch.isfinite(z.grad).all()


@pytest.mark.parametrize("name", sorted(MODELS))
def test_sampling(name):
    model = _build(name, (1, 8, 8))
    if model.capabilities.stochastic:
        c = _cond(model, 6)
        s = model.sample(6, generator=torch.Generator().manual_seed(0), condition=c)
        assert s.shape == (6, 1, 8, 8) and 0 <= s.min() and s.max() <= 1
        s2 = model.sample(6, generator=torch.Generator().manual_seed(0), condition=c)
        assert torch.equal(s, s2)
    else:
        with pytest.raises(VaelabError, match="no prior"):
            model.sample(6)


def test_seed_presets_match_the_tutorials_keras_models_layer_for_layer():
    vae = build_model("seed-vae", input_shape=(1, 28, 28))
    ae = build_model("seed-conv-ae", input_shape=(1, 28, 28))
    # parameter counts of the Keras models (model.count_params()): 69,076 + 65,089 and 12,193
    assert sum(p.numel() for p in vae.encoder.parameters()) == 69076
    assert sum(p.numel() for p in vae.decoder.parameters()) == 65089
    assert sum(p.numel() for p in ae.parameters()) == 12193
    assert vae.latent_shape == (2,) and ae.latent_shape == (16, 7, 7)
    kinds = [type(m).__name__ for m in vae.decoder]
    assert kinds == ["Linear", "ReLU", "Unflatten", "ConvTranspose2d", "ReLU", "ConvTranspose2d", "ReLU",
                     "ConvTranspose2d"]
    assert PRESETS["seed-conv-ae"].train.batch_size == 256 and PRESETS["seed-vae"].train.batch_size == 128


def test_spatial_sizes_adapt_to_other_inputs():
    assert build_model("seed-vae", input_shape=(1, 8, 8)).encoder(torch.rand(2, 1, 8, 8)).shape == (2, 4)
    assert build_model("seed-conv-ae", input_shape=(3, 32, 32)).latent_shape == (16, 8, 8)


def test_impossible_configs_are_reported_together():
    with pytest.raises(ConfigError) as e:
        build_model(model="gan", latent_dim=-1, likelihood="poisson", input_shape=(1, 28, 28))
    msg = str(e.value)
    assert "3 problems" in msg and "'gan'" in msg and "latent_dim=-1" in msg and "'poisson'" in msg


def test_an_image_too_small_for_the_architecture_is_refused():
    with pytest.raises(ConfigError, match=r"too small for 3 downsampling layers"):
        build_model(model="vae", channels=(8, 8, 8), input_shape=(1, 3, 3))
    with pytest.raises(ConfigError, match="needs image input"):
        build_model(model="vae", arch="conv", input_shape=(10,))


def test_build_needs_an_input_shape():
    with pytest.raises(ConfigError, match="input_shape is not set"):
        build_model(ModelConfig())


def test_conditional_vae_needs_and_uses_its_condition():
    model = _build("cvae", (1, 8, 8))
    x = _data((1, 8, 8)).batch(slice(0, 2))
    with pytest.raises(VaelabError, match="needs a condition"):
        model(x)
    with pytest.raises(VaelabError, match=r"class indices in \[0, 3\)"):
        model(x, torch.tensor([0, 3]))
    z = torch.zeros(2, 3)
    a, b = model.decode(z, torch.tensor([0, 0])), model.decode(z, torch.tensor([0, 1]))
    assert torch.equal(a[0], b[0]) and not torch.equal(a[1], b[1])  # the label changes the decoding
    # one-hot labels and the equivalent float vectors are the same condition
    torch.testing.assert_close(model.decode(z, torch.eye(3)[[0, 1]]), b)
    with pytest.raises(VaelabError, match="takes no condition"):
        _build("vae", (1, 8, 8))(x, torch.tensor([0, 1]))


def test_conditional_model_without_labels_is_refused():
    from vaelab.errors import DataError

    model = _build("cvae", (1, 8, 8))
    unlabelled = ArrayDataset(torch.zeros(4, 1, 8, 8, dtype=torch.uint8))
    with pytest.raises(DataError, match="needs labelled data"):
        fit(model, unlabelled, None, epochs=1, progress=False)
