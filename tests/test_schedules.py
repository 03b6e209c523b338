"""β schedules are pure functions of the step, checked at their breakpoints; corruption for denoising."""

import pytest
import torch

from vaelab.training.corruption import corrupt
from vaelab.config import TrainConfig
from vaelab.data import load_dataset
from vaelab.errors import ConfigError
from vaelab.models import build_model
from vaelab.training import fit
from vaelab.training.schedules import beta_at, capacity_at, lr_at


def test_constant():
    assert [beta_at(s, beta=4.0) for s in (0, 10, 10**6)] == [4.0, 4.0, 4.0]


def test_linear_warmup_breakpoints():
    b = [beta_at(s, beta=2.0, schedule="linear", warmup_steps=100) for s in (0, 50, 100, 101, 5000)]
    assert b == [0.0, 1.0, 2.0, 2.0, 2.0]
    assert beta_at(0, beta=2.0, schedule="linear", warmup_steps=0) == 2.0


def test_cyclical_breakpoints():
    f = lambda s: beta_at(s, beta=1.0, schedule="cyclical", cycle_steps=100, ratio=0.5)  # noqa: E731
    assert [f(s) for s in (0, 25, 50, 99, 100, 125, 150)] == [0.0, 0.5, 1.0, 1.0, 0.0, 0.5, 1.0]


def test_capacity_breakpoints():
    assert [capacity_at(s, capacity_max=25.0, capacity_steps=1000) for s in (0, 500, 1000, 9999)] == \
        [0.0, 12.5, 25.0, 25.0]


def test_unknown_schedule():
    with pytest.raises(ValueError, match="unknown KL schedule 'cosine'"):
        beta_at(0, beta=1.0, schedule="cosine")


def test_cosine_learning_rate_breakpoints():
    f = lambda s: lr_at(s, lr=1e-3, schedule="cosine", total_steps=100, lr_min=1e-5)  # noqa: E731
    assert f(0) == 1e-3 and f(100) == 1e-5 and f(250) == 1e-5
    assert f(50) == pytest.approx((1e-3 + 1e-5) / 2, rel=1e-12)
    assert f(25) == pytest.approx(1e-5 + (1e-3 - 1e-5) * (1 + 2 ** -0.5) / 2, rel=1e-12)
    assert lr_at(77, lr=3e-4) == 3e-4  # constant
    with pytest.raises(ValueError, match="unknown learning-rate schedule 'step'"):
        lr_at(0, lr=1.0, schedule="step", total_steps=10)


def test_cosine_schedule_drives_the_optimizer():
    data = load_dataset("digits").train.subset(torch.arange(200))
    cfg = TrainConfig(epochs=2, batch_size=50, lr=1e-2, progress=False)

    def run(**kw):
        torch.manual_seed(0)
        model = build_model(model="vae", input_shape=data.sample_shape, arch="mlp", hidden=(16,), latent_dim=2)
        fit(model, data, None, cfg.replace(**kw))
        return model.state_dict()["encoder.1.weight"]

    constant = run()
    assert torch.equal(run(lr_schedule="cosine", lr_min=1e-2), constant)  # a flat cosine is the constant rate
    assert not torch.equal(run(lr_schedule="cosine", lr_min=1e-4), constant)


def test_learning_rate_schedule_validation():
    with pytest.raises(ConfigError) as e:
        TrainConfig(lr=1e-3, lr_schedule="step", lr_min=0.1).validate()
    assert "lr_schedule='step' is unknown; choose one of ['constant', 'cosine']" in str(e.value)
    assert "lr_min=0.1 must be a number >= 0 and <= lr=0.001" in str(e.value)


def test_corruptions():
    g = torch.Generator().manual_seed(0)
    x = torch.full((1000, 10), 0.5)
    assert corrupt(x, "none", 0.5) is x
    n = corrupt(x, "gaussian", 0.5, g)
    assert abs(float((n - x).std()) - 0.5) < 0.02
    m = corrupt(x, "masking", 0.3, g)
    assert abs(float((m == 0).float().mean()) - 0.3) < 0.02 and set(m.unique().tolist()) == {0.0, 0.5}
    sp = corrupt(x, "salt-pepper", 0.2, g)
    assert abs(float((sp == 0).float().mean()) - 0.1) < 0.02
    assert abs(float((sp == 1).float().mean()) - 0.1) < 0.02
