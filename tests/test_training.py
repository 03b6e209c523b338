"""The one training loop: reproducibility, resume, early stopping, the NaN guard, run-directory files."""

import json

import pytest
import torch
from safetensors.torch import load_file

from vaelab.data import ArrayDataset, load_dataset
from vaelab.errors import CheckpointError, DataError, TrainingError
from vaelab.models import build_model, from_pretrained
from vaelab.training import fit


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


def _model(digits, preset="seed-vae"):
    return build_model(preset, input_shape=digits.train.sample_shape)


def test_run_directory_holds_everything(digits, tmp_path):
    torch.manual_seed(0)
    history = fit(_model(digits), digits.train, digits.test, epochs=2, batch_size=64, progress=False,
                  out=tmp_path)
    assert [r["epoch"] for r in history] == [1, 2]
    assert {"train_loss", "train_kl", "val_loss", "val_recon", "val_kl", "time_s"} <= set(history[0])
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert rows == json.loads(json.dumps(history))
    cfg = json.loads((tmp_path / "config.json").read_text())
    assert cfg["train"]["epochs"] == 2 and cfg["model"]["latent_dim"] == 2
    assert (tmp_path / "checkpoint.safetensors").is_file()
    assert from_pretrained(tmp_path).config == _model(digits).config


def test_the_loss_goes_down_on_real_data(digits):
    torch.manual_seed(0)
    h = fit(_model(digits), digits.train, digits.test, epochs=5, batch_size=64, progress=False)
    assert h[-1]["val_loss"] < h[0]["val_loss"] < h[0]["train_loss"]


def test_same_seed_same_weights(digits):
    a, b = _model(digits), _model(digits)
    b.load_state_dict(a.state_dict())
    fit(a, digits.train, None, epochs=1, batch_size=100, progress=False, seed=3)
    fit(b, digits.train, None, epochs=1, batch_size=100, progress=False, seed=3)
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


@pytest.mark.parametrize("preset", ["seed-vae", "seed-conv-ae"])
def test_resume_gives_the_uninterrupted_result(digits, tmp_path, preset):
    init = _model(digits, preset).state_dict()
    full = _model(digits, preset)
    full.load_state_dict(init)
    fit(full, digits.train, digits.test, epochs=3, batch_size=128, progress=False, out=tmp_path / "full")

    part = _model(digits, preset)
    part.load_state_dict(init)
    fit(part, digits.train, digits.test, epochs=1, batch_size=128, progress=False, out=tmp_path / "part")
    resumed = _model(digits, preset)  # a fresh process would start from a fresh model
    history = fit(resumed, digits.train, digits.test, epochs=3, batch_size=128, progress=False,
                  out=tmp_path / "part", resume=True)
    assert [r["epoch"] for r in history] == [1, 2, 3]
    a = load_file(tmp_path / "full" / "model.safetensors")
    b = load_file(tmp_path / "part" / "model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_without_a_checkpoint_is_a_clear_error(digits, tmp_path):
    with pytest.raises(CheckpointError, match="cannot resume.*not found"):
        fit(_model(digits), digits.train, None, epochs=1, out=tmp_path, resume=True, progress=False)


def test_early_stopping_keeps_the_best_weights(digits):
    torch.manual_seed(0)
    # a learning rate this high makes the validation loss get worse after the first epochs
    h = fit(_model(digits), digits.train, digits.test, epochs=30, batch_size=64, lr=0.05, early_stopping=2,
            progress=False)
    assert len(h) < 30
    best = min(r["val_loss"] for r in h)
    assert h[-1]["val_loss"] > best and h[-3]["val_loss"] == best


def test_nonfinite_loss_stops_with_step_and_advice(digits, tmp_path):
    x = digits.train.to_float().clone()
    x[5, 0, 0, 0] = float("nan")
    bad = ArrayDataset(x, scale=1.0)
    with pytest.raises(TrainingError, match=r"non-finite loss at epoch 1, step \d+ .*--lr.*--grad-clip"):
        fit(_model(digits), bad, None, epochs=1, batch_size=64, progress=False)


def test_data_that_does_not_fit_the_model(digits):
    model = build_model("seed-vae", input_shape=(1, 28, 28))
    with pytest.raises(DataError, match=r"sample shape \(1, 8, 8\) does not match the model's input_shape"):
        fit(model, digits.train, None, epochs=1, progress=False)


def test_kl_warmup_weights_the_kl_below_one_during_warmup(digits):
    torch.manual_seed(0)
    h = fit(_model(digits), digits.train, None, epochs=3, batch_size=64, kl_schedule="linear", kl_warmup=2,
            progress=False)
    # epoch 1 averages beta over [0, 0.5), epoch 3 has beta = 1: loss = recon + beta * kl
    assert h[0]["train_loss"] < h[0]["train_recon"] + 0.6 * h[0]["train_kl"]
    assert h[2]["train_loss"] == pytest.approx(h[2]["train_recon"] + h[2]["train_kl"], rel=1e-5)


def test_iwae_objective_trains(digits):
    torch.manual_seed(0)
    h = fit(_model(digits), digits.train, digits.test, epochs=3, batch_size=64, iw_samples=5, progress=False)
    assert "train_iwae" in h[0] and h[-1]["val_loss"] < h[0]["val_loss"]
    # the IWAE bound is tighter than the ELBO: -loss >= elbo on average
    assert -h[-1]["train_loss"] >= h[-1]["train_elbo"]


def test_denoising_trains_on_corrupted_inputs_against_clean_targets(digits):
    torch.manual_seed(0)
    model = _model(digits, "seed-conv-ae")
    h = fit(model, digits.train, digits.test, epochs=2, batch_size=64, noise="gaussian", noise_level=0.5,
            progress=False)
    # the training terms compare the reconstruction of the noisy input with the clean image
    assert h[-1]["train_mse"] < 0.25


def test_impossible_training_values_are_reported_together(digits):
    from vaelab.errors import ConfigError

    with pytest.raises(ConfigError) as e:
        fit(_model(digits), digits.train, None, epochs=0, batch_size=0, noise="pink", kl_schedule="linear",
            iw_samples=0, progress=False)
    msg = str(e.value)
    for needle in ("5 problems", "epochs=0", "batch_size=0", "noise='pink'", "needs kl_warmup > 0",
                   "iw_samples=0"):
        assert needle in msg


def test_iwae_refuses_the_kl_weights_it_would_ignore(digits):
    from vaelab.errors import ConfigError

    model = build_model("seed-vae", input_shape=(1, 8, 8), beta=4.0)
    with pytest.raises(ConfigError, match=r"(?s)2 problems.*beta=4.0 does not apply.*free_bits=0.5"):
        fit(model, digits.train, None, epochs=1, iw_samples=5, free_bits=0.5, progress=False)


def test_adam_is_fused_where_torch_has_the_kernel_and_its_state_loads_either_way():
    from vaelab.training.loop import make_adam

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 2)
    fused = make_adam(model.parameters(), 1e-3)
    assert fused.defaults["fused"] is True  # the CPU kernel exists in every torch this project pins
    model(torch.randn(8, 4)).square().sum().backward()
    fused.step()
    plain = torch.optim.Adam(model.parameters(), lr=1e-3, foreach=True)
    plain.load_state_dict(fused.state_dict())  # checkpoints written either way resume either way
    assert torch.equal(plain.state[model.weight]["exp_avg"], fused.state[model.weight]["exp_avg"])
