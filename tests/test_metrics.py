"""Metrics against hand-computed values on tiny inputs."""

import math

import numpy as np
import pytest
import torch

from vaelab.data.arrays import ArrayDataset
from vaelab.errors import DataError
from vaelab.evaluation.metrics import bits_per_dim, class_confusion, latent_health, probe_accuracy, psnr


def test_psnr_by_hand():
    x = torch.zeros(2, 1, 2, 2)
    x_hat = torch.stack([torch.full((1, 2, 2), 0.1), torch.tensor([[[0.0, 0.0], [0.0, 0.2]]])])
    # MSE 0.01 -> 20 dB; MSE 0.04/4 = 0.01 -> 20 dB
    torch.testing.assert_close(psnr(x, x_hat), torch.tensor([20.0, 20.0]))
    assert psnr(x, x).isinf().all()


def test_latent_health_by_hand():
    means = torch.tensor([[1.0, 0.0], [-1.0, 0.0], [1.0, 0.0], [-1.0, 0.0]])
    logvars = torch.zeros(4, 2)
    h = latent_health(means, logvars)
    assert h["kl_per_dim"] == [0.5, 0.0]
    assert h["activity_per_dim"] == pytest.approx([4 / 3, 0.0])
    assert h["active_units"] == 1 and "warning" not in h


def test_collapse_warning():
    h = latent_health(torch.zeros(10, 3), torch.zeros(10, 3))
    assert h["active_units"] == 0 and "posterior collapse" in h["warning"]


def test_probes_separate_separable_latents():
    rng = np.random.default_rng(0)
    y = rng.integers(0, 3, 300)
    z = np.eye(3)[y] * 5 + rng.normal(0, 0.1, (300, 3))
    out = probe_accuracy(z[:200], y[:200], z[200:], y[200:])
    assert out == {"linear_probe_accuracy": 1.0, "knn5_accuracy": 1.0}


def test_bits_per_dim():
    assert bits_per_dim(784 * math.log(2), 784) == pytest.approx(1.0)


def test_evaluate_report_on_a_trained_model():
    from vaelab.data import load_dataset
    from vaelab.evaluation import evaluate
    from vaelab.models import build_model
    from vaelab.training import fit

    torch.manual_seed(0)
    digits = load_dataset("digits")
    model = build_model("seed-vae", input_shape=(1, 8, 8))
    fit(model, digits.train, None, epochs=3, batch_size=64, progress=False)
    r = evaluate(model, digits.test, nll_samples=20, train_data=digits.train)
    assert r["n"] == len(digits.test) == 180
    assert r["elbo_bits_per_dim"] == pytest.approx(-r["elbo"] / (64 * math.log(2)))
    assert 0 < r["psnr"] < 100 and len(r["kl_per_dim"]) == 2
    # the importance-sampled likelihood is at least the ELBO (its bound with K = 1), up to noise
    assert r["nll"] <= r["loss"] + 0.5
    assert 0.1 <= r["linear_probe_accuracy"] <= 1 and 0.1 <= r["knn5_accuracy"] <= 1


class _ReadsItsAnswer(torch.nn.Module):
    """A classifier of 4 classes whose every answer is known: the class written in the input's first feature."""

    def classify(self, x):
        return torch.nn.functional.one_hot(x[:, 0].long(), 4).float()


def test_class_confusion_by_hand():
    predicted = [0, 0, 1, 1, 1, 2, 0, 0, 1, 3]
    truth = [0, 0, 0, 1, 1, 2, 2, 2, 2, -1]  # no sample of class 3; the last one's label hidden, not judged
    data = ArrayDataset(torch.tensor([[p, 0.5] for p in predicted]), torch.tensor(truth), scale=1.0)
    out = class_confusion(_ReadsItsAnswer(), data, batch_size=4)
    assert out["confusion"] == [[2, 1, 0, 0], [0, 2, 0, 0], [2, 1, 1, 0], [0, 0, 0, 0]]
    assert out["class_error"] == [1 / 3, 0.0, 3 / 4, None]
    assert out["most_confused"] == [{"true": 2, "predicted": 0, "count": 2}, {"true": 0, "predicted": 1, "count": 1},
                                    {"true": 2, "predicted": 1, "count": 1}]
    unlabelled_as_trained = ArrayDataset(torch.zeros(2, 2), torch.tensor([1, 4]), scale=1.0)
    with pytest.raises(DataError, match=r"^label 4 is outside the model's 4 classes \(0 to 3\): evaluate on data "
                                        r"labelled as the model was trained$"):
        class_confusion(_ReadsItsAnswer(), unlabelled_as_trained)
