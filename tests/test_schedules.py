"""β schedules are pure functions of the step, checked at their breakpoints; corruption for denoising."""

import pytest
import torch

from vaelab.training.corruption import corrupt
from vaelab.training.schedules import beta_at, capacity_at


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
