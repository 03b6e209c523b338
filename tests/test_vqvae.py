"""The VQ-VAE: its quantizer, loss, codebook health, code round trips, the code prior and its command line.

Distributed codebooks (torchrun) are tested in tests/test_distributed_vq.py.

The contract every registered model keeps (tests/test_models.py) covers the VQ-VAE too; these tests check what
is special to it, with closed forms where there are some.
"""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vaelab.data import ArrayDataset, load_dataset
from vaelab.errors import ConfigError, VaelabError
from vaelab.models.vqvae import vqvae_loss
from vaelab.models import ModelOutput, build_model, from_pretrained
from vaelab.models.quantizer import VectorQuantizer, kmeans, usage_metrics
from vaelab.models.vqvae import CodePosterior, codebook_usage
from vaelab.training import fit

REPO = Path(__file__).resolve().parents[1]
TINY = dict(model="vqvae", channels=(4, 8), latent_dim=3, codebook_size=16)


def _data(n=64, shape=(1, 8, 8), seed=0, classes=3):
    g = torch.Generator().manual_seed(seed)
    return ArrayDataset(torch.randint(0, 256, (n, *shape), dtype=torch.uint8, generator=g), torch.arange(n) % classes)


def _state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


# ------------------------------------------------------------------------------------------- the quantizer


def test_quantizer_picks_the_nearest_code_in_fp32_even_under_bf16_autocast():
    torch.manual_seed(0)
    q = VectorQuantizer(32, 4, kmeans_init=False).eval()
    q.codebook.normal_()
    z_e = torch.randn(5, 4, 3, 3)
    codes, idx = q(z_e)
    flat = z_e.movedim(1, -1).reshape(-1, 4)
    assert torch.equal(idx.flatten(), torch.cdist(flat, q.codebook).argmin(1))  # brute force
    assert torch.equal(codes, q.codebook[idx].movedim(-1, 1)) and codes.shape == z_e.shape
    with torch.autocast("cpu", dtype=torch.bfloat16):  # a bf16 input is compared against the fp32 codebook
        codes16, idx16 = q(z_e.bfloat16())
    assert codes16.dtype == torch.float32 and q.codebook.dtype == torch.float32
    assert torch.equal(idx16, q(z_e.bfloat16().float())[1])


def test_ema_update_matches_its_closed_form():
    q = VectorQuantizer(3, 2, decay=0.9, eps=1e-5, kmeans_init=False, restart_after=0).train()
    q.codebook.copy_(torch.tensor([[0.0, 0.0], [10.0, 0.0], [0.0, 10.0]]))
    q.embed_sum.copy_(q.codebook * 2.0)
    q.cluster_size.fill_(2.0)
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [9.0, 1.0]])  # two points for code 0, one for code 1, none for 2
    q(x[:, :, None, None])
    n = torch.tensor([0.9 * 2 + 0.1 * 2, 0.9 * 2 + 0.1 * 1, 0.9 * 2])
    m = torch.tensor([[0.1 * 1.0, 0.1 * 1.0], [18.0 + 0.9, 0.1], [0.0, 18.0]])
    torch.testing.assert_close(q.cluster_size, n)
    torch.testing.assert_close(q.embed_sum, m)
    smoothed = (n + 1e-5) / (n.sum() + 3e-5) * n.sum()  # Laplace smoothing keeps the total count
    torch.testing.assert_close(q.codebook, m / smoothed[:, None])
    assert q.unused_steps.tolist() == [0, 0, 1]
    assert torch.equal(q.counts, torch.tensor([2.0, 1.0, 0.0], dtype=torch.float64))


def test_first_training_batch_initializes_the_codebook_by_kmeans():
    torch.manual_seed(0)
    q = VectorQuantizer(4, 2, restart_after=0).train()
    x = torch.cat([torch.randn(40, 2) * 0.05 + torch.tensor(c) for c in ([0, 0], [3, 0], [0, 3], [3, 3])])
    assert not q.initialized
    q(x[:, :, None, None])
    assert q.initialized
    # every code is a fixed point of Lloyd's algorithm on the batch: the mean of the points nearest to it
    # (the EMA step that follows the initialization leaves a fixed point where it is)
    assign = torch.cdist(x, q.codebook).argmin(1)
    for k in assign.unique():
        torch.testing.assert_close(q.codebook[k], x[assign == k].mean(0), rtol=0, atol=1e-4)
    centroids, counts = kmeans(x, 4)
    assert counts.sum() == len(x)
    before = _state(q)
    q(x[:, :, None, None], update=False)  # a reading call changes nothing
    assert all(torch.equal(before[k], v) for k, v in q.state_dict().items())


def test_a_code_unused_for_n_steps_is_restarted_on_an_encoder_output():
    torch.manual_seed(0)
    q = VectorQuantizer(3, 2, kmeans_init=False, restart_after=3).train()
    q.codebook.copy_(torch.tensor([[0.0, 0.0], [1.0, 1.0], [100.0, 100.0]]))  # code 2: far from everything
    q.embed_sum.copy_(q.codebook)
    x = torch.rand(20, 2)[:, :, None, None]
    for step in range(3):
        assert q.unused_steps[2] == step
        q(x)
    assert q.unused_steps[2] == 0 and q.usage()["code_restarts"] == 1
    assert (q.codebook[2] == x.flatten(1)).all(1).any(), "the restarted code is one of the batch's outputs"


def test_without_kmeans_and_restarts_codes_collapse_and_with_them_they_do_not():
    digits = load_dataset("digits")
    used = {}
    for fixes in (False, True):
        torch.manual_seed(0)
        model = build_model(model="vqvae", channels=(16, 32), latent_dim=8, codebook_size=32,
                            vq_kmeans_init=fixes, vq_restart_after=10 if fixes else 0,
                            input_shape=digits.train.sample_shape)
        fit(model, digits.train, None, epochs=5, batch_size=64, progress=False)
        used[fixes] = codebook_usage(model, digits.test)
    # measured: 100% of the codes used (perplexity 23) with the fixes, 6% (perplexity 1.9) without
    assert used[True]["codes_used"] >= 0.9 and used[False]["codes_used"] <= 0.25, used
    assert used[True]["perplexity"] > 5 * used[False]["perplexity"], used


def test_usage_metrics():
    assert usage_metrics(torch.tensor([5.0, 5.0, 5.0, 5.0])) == pytest.approx(
        {"perplexity": 4.0, "codes_used": 1.0, "dead_codes": 0})
    assert usage_metrics(torch.tensor([7.0, 0.0, 0.0, 0.0])) == pytest.approx(
        {"perplexity": 1.0, "codes_used": 0.25, "dead_codes": 3})


# ---------------------------------------------------------------------------------------------- the loss


def test_vqvae_loss_is_the_papers_objective_with_gradients_on_the_right_terms():
    x = torch.rand(2, 1, 2, 2)
    recon = torch.zeros(2, 1, 2, 2, requires_grad=True)
    z_e = torch.randn(2, 3, 2, 2, requires_grad=True)
    codes = torch.randn(2, 3, 2, 2, requires_grad=True)  # as if gathered from a codebook parameter
    out = ModelOutput(recon=recon, z=codes, posterior=CodePosterior(codes, z_e, None))
    terms = vqvae_loss(x, out, likelihood="bernoulli", commitment=0.25)
    d = ((z_e - codes) ** 2).flatten(1).sum(1)
    recon_nll = torch.nn.functional.binary_cross_entropy_with_logits(recon, x, reduction="none").flatten(1).sum(1)
    torch.testing.assert_close(terms["commitment"], d)
    torch.testing.assert_close(terms["loss"], recon_nll + 1.25 * d)  # recon + codebook + β commitment
    assert set(terms) == {"loss", "recon", "commitment", "bce", "mse"}
    terms["loss"].sum().backward()
    torch.testing.assert_close(z_e.grad, 2 * 0.25 * (z_e - codes).detach())  # commitment: β pulls the encoder
    torch.testing.assert_close(codes.grad, 2 * (codes - z_e).detach())  # codebook loss: pulls the codes


def test_straight_through_gradient_reaches_the_encoder_and_ema_codebook_gets_none():
    torch.manual_seed(0)
    model = build_model(input_shape=(1, 8, 8), **TINY).train()
    out = model(_data(4).batch(slice(0, 4)))
    grad_z, = torch.autograd.grad(out.recon.sum(), out.z, retain_graph=True)
    grad_ze, = torch.autograd.grad(out.recon.sum(), out.posterior.z_e)
    torch.testing.assert_close(grad_ze, grad_z)  # the decoder's gradient, copied to z_e unchanged
    assert not model.quantizer.codebook.requires_grad  # a buffer: the EMA moves it


# ------------------------------------------------------------ training options, evaluation, persistence


@pytest.mark.parametrize("ema,kmeans_init,restart", list(itertools.product([True, False], repeat=3)))
def test_every_option_combination_trains_and_evaluation_leaves_it_alone(ema, kmeans_init, restart, tmp_path):
    torch.manual_seed(0)
    model = build_model(input_shape=(1, 8, 8), vq_ema=ema, vq_kmeans_init=kmeans_init,
                        vq_restart_after=2 if restart else 0, **TINY)
    data = _data()
    codebook = model.quantizer.codebook.detach().clone()
    history = fit(model, data, data, epochs=2, batch_size=16, progress=False)
    assert all(torch.isfinite(torch.tensor(r["train_loss"])) for r in history)
    assert not torch.equal(codebook, model.quantizer.codebook)  # EMA, k-means, restarts or the codebook loss
    assert model.quantizer.codebook.dtype == torch.float32
    after = _state(model)
    model.train()  # even in training mode, inference-mode calls read the codebook and change nothing
    model.reconstruct(data.batch(slice(0, 8)))
    model.encode_indices(data.batch(slice(0, 8)))
    model.eval()
    codebook_usage(model, data)
    assert all(torch.equal(after[k], v) for k, v in _state(model).items())


def test_codebook_state_is_saved_reloaded_and_resumed_exactly(tmp_path):
    data = _data()
    torch.manual_seed(0)
    straight = build_model(input_shape=(1, 8, 8), vq_restart_after=2, **TINY)
    fit(straight, data, None, epochs=3, batch_size=16, progress=False, out=tmp_path / "a")
    torch.manual_seed(0)
    resumed = build_model(input_shape=(1, 8, 8), vq_restart_after=2, **TINY)
    fit(resumed, data, None, epochs=1, batch_size=16, progress=False, out=tmp_path / "b")
    fit(resumed, data, None, epochs=3, batch_size=16, progress=False, out=tmp_path / "b", resume=True)
    a, b = _state(straight), _state(resumed)
    assert {"quantizer.codebook", "quantizer.cluster_size", "quantizer.embed_sum", "quantizer.unused_steps",
            "quantizer.initialized"} <= set(a)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    loaded = from_pretrained(tmp_path / "a")
    for k, v in _state(loaded).items():
        assert torch.equal(v, a[k]), k


def test_bf16_training_keeps_the_codebook_in_fp32():
    torch.manual_seed(0)
    model = build_model(input_shape=(1, 8, 8), **TINY)
    fit(model, _data(), None, epochs=1, batch_size=16, progress=False, precision="bf16")
    q = model.quantizer
    assert q.codebook.dtype == q.embed_sum.dtype == q.cluster_size.dtype == torch.float32
    assert torch.isfinite(q.codebook).all()


def test_indices_round_trip_exactly():
    torch.manual_seed(0)
    model = build_model(input_shape=(1, 8, 8), **TINY)
    data = _data()
    fit(model, data, None, epochs=1, batch_size=16, progress=False)
    x = data.batch(slice(0, 8))
    idx = model.encode_indices(x)
    assert idx.shape == (8, *model.grid) and idx.dtype == torch.int64
    assert torch.equal(model.decode_indices(idx), model.reconstruct(x))
    assert torch.equal(model.encode_indices(x), idx)
    distinct = model.quantizer.codebook.unique(dim=0).shape[0] == model.config.codebook_size
    if distinct:  # the codes of indices quantize back to the same indices
        assert torch.equal(model.quantizer(model.quantizer.lookup(idx), update=False)[1], idx)


def test_vector_data_gets_one_code_per_sample():
    model = build_model(model="vqvae", hidden=(16,), latent_dim=4, codebook_size=8, input_shape=(12,))
    data = ArrayDataset(torch.rand(32, 12), scale=1.0)
    fit(model, data, None, epochs=1, batch_size=16, progress=False)
    assert model.latent_shape == (4, 1, 1) and model.encode_indices(data.batch(slice(0, 5))).shape == (5, 1, 1)


def test_invalid_settings_are_reported_together():
    with pytest.raises(ConfigError) as e:
        build_model(model="vqvae", codebook_size=1, vq_commitment=-1.0, vq_restart_after=-5, arch="conv-pool",
                    input_shape=(1, 8, 8))
    msg = str(e.value)
    assert "4 problems" in msg and "codebook_size=1" in msg and "vq_commitment=-1.0" in msg
    assert "vq_restart_after=-5" in msg and "arch='conv-pool'" in msg
    with pytest.raises(ConfigError, match="prior_layers"):
        build_model(model="ae", prior_layers=4, input_shape=(1, 8, 8))


# ------------------------------------------------------------------------------------------- the prior


def test_prior_is_causal_in_raster_order():
    from vaelab.models.prior import CodePrior

    torch.manual_seed(0)
    prior = CodePrior(5, (4, 4), channels=8, layers=3, classes=2).eval()
    idx = torch.randint(5, (1, 4, 4))
    base = prior(idx, torch.tensor([1]))
    for q in range(16):  # changing the code at position q changes no prediction at positions <= q
        changed = idx.clone()
        changed.view(-1)[q] = (changed.view(-1)[q] + 1) % 5
        diff = (prior(changed, torch.tensor([1])) - base).abs().amax(1).flatten()  # (16,)
        assert (diff[:q + 1] == 0).all(), q
        if q < 15:
            assert diff[q + 1:].max() > 0  # and the later positions do see it
    assert not torch.equal(prior(idx, torch.tensor([0])), base)  # the label conditions every position


def test_sampling_needs_the_prior_and_then_generates(tmp_path):
    from vaelab.prior import fit_prior

    torch.manual_seed(0)
    model = build_model(input_shape=(1, 8, 8), **TINY)
    data = _data()
    fit(model, data, None, epochs=1, batch_size=16, progress=False)
    with pytest.raises(VaelabError, match="vaelab train-prior"):
        model.sample(4)
    history = fit_prior(model, data, data, epochs=2, layers=2, channels=8, batch_size=16)
    assert [r["epoch"] for r in history] == [1, 2] and history[-1]["test_bits_per_code"] > 0
    assert model.settings.prior_classes == 3 and model.capabilities.samples
    g = lambda: torch.Generator().manual_seed(0)  # noqa: E731
    s = model.sample(6, generator=g())
    assert s.shape == (6, 1, 8, 8) and 0 <= s.min() and s.max() <= 1
    assert torch.equal(s, model.sample(6, generator=g()))
    threes = model.sample(6, generator=g(), condition=2)
    with pytest.raises(VaelabError, match=r"class indices in \[0, 3\)"):
        model.sample(2, condition=torch.tensor([0, 3]))
    model.save_pretrained(tmp_path / "m")  # the prior travels in config.json + model.safetensors
    loaded = from_pretrained(tmp_path / "m")
    assert loaded.config == model.config and loaded.prior is not None
    assert torch.equal(loaded.sample(6, generator=g(), condition=2), threes)


def test_train_prior_on_a_run_directory(tmp_path):
    from vaelab.prior import train_prior

    digits = load_dataset("digits")
    torch.manual_seed(0)
    model = build_model(model="vqvae", channels=(8, 16), latent_dim=4, codebook_size=16,
                        input_shape=digits.train.sample_shape)
    run = tmp_path / "run"
    fit(model, digits.train, None, epochs=1, batch_size=128, progress=False, out=run,
        run_info={"data": {"dataset": "digits", "data_dir": None}})
    history = train_prior(run, epochs=1, layers=2, channels=8, progress=False)
    assert "test_bits_per_code" in history[0]
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["model"]["settings"]["prior_layers"] == 2 and cfg["model"]["settings"]["prior_classes"] == 10
    assert cfg["prior"]["epochs"] == 1 and cfg["prior"]["classes"] == [str(i) for i in range(10)]
    assert (run / "prior_metrics.jsonl").is_file()
    assert from_pretrained(run).sample(3, condition=7).shape == (3, 1, 8, 8)


def test_train_prior_parser_does_not_import_torch():
    code = ("import argparse, sys; from vaelab.cli.prior import add_train_prior_parser; "
            "p = argparse.ArgumentParser(); add_train_prior_parser(p.add_subparsers()); "
            "a = p.parse_args(['train-prior', 'runs/vq', '--epochs', '3']); "
            "assert a.epochs == 3 and a.func.__name__ == 'run_train_prior'; "
            "assert 'torch' not in sys.modules, 'torch imported'")
    env = {"PYTHONPATH": str(REPO / "src"), "PATH": ""}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)


# ----------------------------------------------------------------------------------------- code usage


def test_metrics_rows_carry_each_epochs_code_usage(tmp_path):
    torch.manual_seed(0)
    model = build_model(input_shape=(1, 8, 8), vq_restart_after=2, **TINY)
    data = _data()  # 64 samples: 4 steps of 16 per epoch
    chosen = []  # the code indices of every training step, read off the quantizer's output

    def record(module, inputs, output):
        if module.training and torch.is_grad_enabled():  # not the validation passes
            chosen.append(output[1].flatten())

    model.quantizer.register_forward_hook(record)
    history = fit(model, data, data, epochs=2, batch_size=16, progress=False, out=tmp_path / "run")
    assert len(chosen) == 8
    for row, steps in zip(history, (chosen[:4], chosen[4:])):  # each epoch counts its own steps only
        expected = usage_metrics(torch.bincount(torch.cat(steps), minlength=16))
        assert row["train_perplexity"] == pytest.approx(expected["perplexity"])
        assert row["train_codes_used"] == pytest.approx(expected["codes_used"])
        assert row["train_dead_codes"] == expected["dead_codes"]
        assert isinstance(row["train_code_restarts"], int) and row["train_code_restarts"] >= 0
    saved = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["train_perplexity"] for r in saved] == [r["train_perplexity"] for r in history]


def test_evaluate_reports_code_usage_of_the_split():
    from vaelab.evaluation import evaluate

    torch.manual_seed(0)
    model = build_model(input_shape=(1, 8, 8), **TINY)
    data = _data()
    fit(model, data, None, epochs=1, batch_size=16, progress=False)
    report = evaluate(model, data)
    used = model.encode_indices(data.batch(slice(0, len(data)))).unique()
    assert report["dead_codes"] == 16 - len(used)
    assert report["codes_used"] == pytest.approx(len(used) / 16)
    assert 1.0 <= report["perplexity"] <= len(used)  # exp(entropy) of len(used) codes
    assert report == {**report, **codebook_usage(model, data)}
    vae = build_model(model="vae", arch="mlp", hidden=(8,), latent_dim=2, input_shape=(1, 8, 8))
    assert not {"perplexity", "codes_used", "dead_codes"} & set(evaluate(vae, data))


# --------------------------------------------------------------------------------------- the command line


def _vaelab(capsys, *args) -> tuple[int, str, str]:
    """`vaelab ARGS` in this process: (exit status, stdout, stderr)."""
    from vaelab.cli import main

    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.fixture(scope="module")
def vq_run(tmp_path_factory) -> Path:
    """A tiny VQ-VAE run directory on digits (1 epoch, 2x2 code grids), as `vaelab train` leaves it."""
    digits = load_dataset("digits")
    torch.manual_seed(0)
    model = build_model(model="vqvae", channels=(8, 16), latent_dim=4, codebook_size=16,
                        input_shape=digits.train.sample_shape)
    run = tmp_path_factory.mktemp("vq") / "run"
    fit(model, digits.train, None, epochs=1, batch_size=128, progress=False, out=run,
        run_info={"data": {"dataset": "digits", "data_dir": None}})
    return run


def _copy(run: Path, to: Path) -> Path:
    import shutil

    return Path(shutil.copytree(run, to))


def test_cli_train_prior_then_sample_with_labels_resume_and_retrain(tmp_path, capsys):
    run = tmp_path / "vq"
    code, _, err = _vaelab(capsys, "train", "--model", "vqvae", "--channels", "8,16", "--latent-dim", 4,
                           "--codebook-size", 16, "--dataset", "digits", "--epochs", 1, "--no-progress",
                           "--no-pictures", "--out", run)
    assert code == 0, err
    row = json.loads((run / "metrics.jsonl").read_text())
    assert {"train_perplexity", "train_codes_used", "train_dead_codes", "train_code_restarts"} <= set(row)
    report = json.loads((run / "evaluation.json").read_text())
    assert report["dead_codes"] == round(16 * (1 - report["codes_used"])) and report["perplexity"] >= 1

    code, _, err = _vaelab(capsys, "sample", run)  # no prior yet: say how to get one
    assert code == 1 and err.startswith("vaelab: error: ") and f"`vaelab train-prior {run}`" in err

    code, out, err = _vaelab(capsys, "train-prior", run, "--epochs", 1, "--layers", 2, "--channels", 8,
                             "--no-progress")
    assert code == 0, err
    assert "epoch 1: train" in out and f"vaelab sample {run}" in out
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["model"]["settings"]["prior_layers"] == 2 and cfg["model"]["settings"]["prior_classes"] == 10  # digits are labelled
    assert (run / "prior_checkpoint.safetensors").is_file() and not list(run.glob(".*.tmp"))

    code, out, err = _vaelab(capsys, "sample", run, "--n", 12, "--label", 3, "--out", tmp_path / "threes.png")
    assert code == 0, err
    from PIL import Image

    with Image.open(tmp_path / "threes.png") as im:
        assert im.format == "PNG"
    code, _, err = _vaelab(capsys, "sample", run, "--n", 4, "--label", 10)
    assert code == 1 and "--label 10 is out of range: the prior has 10 classes" in err
    code, _, err = _vaelab(capsys, "sample", run, "--n", 4)  # classes in order
    assert code == 0 and (run / "samples.png").is_file()

    code, _, err = _vaelab(capsys, "train-prior", run, "--epochs", 2, "--no-progress")  # keeps what it has
    assert code == 1 and "already has a code prior (1 epoch)" in err and "--resume" in err
    code, _, err = _vaelab(capsys, "train-prior", run, "--epochs", 2, "--resume", "--layers", 3, "--no-progress")
    assert code == 1 and "layers=3: the prior was fitted with layers=2" in err
    code, _, err = _vaelab(capsys, "train-prior", run, "--epochs", 2, "--resume", "--no-progress")
    assert code == 0, err
    assert len((run / "prior_metrics.jsonl").read_text().splitlines()) == 2

    # training the VQ-VAE further moves its codes: it continues without the prior, and says so
    code, _, err = _vaelab(capsys, "train", "--resume", "--out", run, "--epochs", 2, "--no-progress",
                           "--no-pictures")
    assert code == 0 and "continues without its code prior" in err
    assert json.loads((run / "config.json").read_text())["model"]["settings"]["prior_layers"] == 0
    code, _, err = _vaelab(capsys, "sample", run)
    assert code == 1 and f"`vaelab train-prior {run}`" in err
    code, _, err = _vaelab(capsys, "train-prior", run, "--epochs", 2, "--resume", "--no-progress")
    assert code == 1 and "belongs to earlier VQ-VAE weights" in err
    code, _, err = _vaelab(capsys, "train-prior", run, "--epochs", 1, "--layers", 2, "--channels", 8,
                           "--no-progress")  # a stale prior is no reason to refuse a new one
    assert code == 0, err


def test_train_prior_resumes_exactly(vq_run, tmp_path):
    from safetensors.torch import load_file

    from vaelab.prior import train_prior

    straight, resumed = _copy(vq_run, tmp_path / "a"), _copy(vq_run, tmp_path / "b")
    small = dict(layers=2, channels=8, batch_size=64, progress=False)
    train_prior(straight, epochs=2, **small)
    train_prior(resumed, epochs=1, **small)
    history = train_prior(resumed, epochs=2, resume=True, progress=False)  # the saved settings
    assert [r["epoch"] for r in history] == [1, 2]
    a, b = load_file(str(straight / "model.safetensors")), load_file(str(resumed / "model.safetensors"))
    assert any(k.startswith("prior.") for k in a) and a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    bits = lambda run: [json.loads(line)["test_bits_per_code"]  # noqa: E731
                        for line in (run / "prior_metrics.jsonl").read_text().splitlines()]
    assert bits(straight) == bits(resumed)
    with pytest.raises(VaelabError, match="already has 2 epochs"):
        train_prior(resumed, epochs=2, resume=True, progress=False)


def test_train_prior_resumes_inside_an_epoch_exactly(vq_run, tmp_path, monkeypatch):
    """The prior's fit is the training loop's: with step checkpoints, a fit stopped inside an epoch resumes there
    (RNG states, the epoch's partial sums) and ends as the uninterrupted fit, weights and metrics alike."""
    from safetensors.torch import load_file

    import vaelab.training.loop as loop
    from vaelab.prior import train_prior

    straight, stopped = _copy(vq_run, tmp_path / "a"), _copy(vq_run, tmp_path / "b")
    small = dict(layers=2, channels=8, batch_size=64, progress=False)  # 26 steps per epoch on digits
    train_prior(straight, epochs=2, **small)
    real, written = loop.save_checkpoint, []

    def save_then_stop(path, *args, **kwargs):  # checkpoints at steps 10, 20, 26 (epoch 1's end), 30: stop there
        real(path, *args, **kwargs)
        written.append(Path(path).name)
        if len(written) == 4:
            raise KeyboardInterrupt

    monkeypatch.setattr(loop, "save_checkpoint", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        train_prior(stopped, epochs=2, checkpoint_every=10, **small)
    monkeypatch.setattr(loop, "save_checkpoint", real)
    assert written == ["prior_checkpoint.safetensors"] * 4  # the run's own checkpoint.safetensors is untouched
    assert len((stopped / "prior_metrics.jsonl").read_text().splitlines()) == 1
    train_prior(stopped, epochs=2, resume=True, progress=False)
    a, b = load_file(str(straight / "model.safetensors")), load_file(str(stopped / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    rows = lambda run: [{k: v for k, v in json.loads(line).items() if k != "time_s"}  # noqa: E731
                        for line in (run / "prior_metrics.jsonl").read_text().splitlines()]
    assert rows(straight) == rows(stopped) and len(rows(stopped)) == 2
    assert (stopped / "checkpoint.safetensors").read_bytes() == (vq_run / "checkpoint.safetensors").read_bytes()


def test_fit_prior_is_the_training_loop_on_a_dataset_of_codes(vq_run, tmp_path):
    """fit_prior = vaelab.training.fit of the code-prior model on the VQ-VAE's codes, nothing besides: the same
    weights bit for bit; the codes stay int64; the checkpoint is the loop's, with the prior's settings."""
    from vaelab.config import TrainConfig
    from vaelab.models.code_prior import CodePriorModel
    from vaelab.prior import code_dataset, fit_prior, prior_history

    digits = load_dataset("digits")
    model = from_pretrained(vq_run)
    history = fit_prior(model, digits.train, digits.test, epochs=2, layers=2, channels=8, batch_size=64,
                        checkpoint=tmp_path / "prior.safetensors")
    codes, test_codes = code_dataset(model, digits.train, 10), code_dataset(model, digits.test, 10)
    x = codes.batch(torch.arange(5), generator=torch.Generator())
    assert x.dtype == torch.int64 and x.shape == (5, 1, *model.grid) and torch.equal(codes.labels(slice(0, 5)),
                                                                                      digits.train.y[:5])
    torch.manual_seed(0)
    direct = CodePriorModel.for_codes(16, model.grid, layers=2, channels=8, classes=10)
    rows = fit(direct, codes, test_codes, TrainConfig(epochs=2, batch_size=64, progress=False))
    assert prior_history(rows) == [{**r, "time_s": h["time_s"]} for r, h in zip(history, rows)]
    assert all(torch.equal(a, b) for a, b in zip(model.prior.state_dict().values(), direct.prior.state_dict().values()))
    from vaelab.training.checkpoint import load_checkpoint

    state, _ = load_checkpoint(tmp_path / "prior.safetensors", direct, torch.optim.Adam(direct.parameters()))
    assert (state["epoch"], state["step"]) == (2, 2 * 26) and state["run_info"]["settings"]["classes"] == 10
    assert sorted(p.name for p in tmp_path.iterdir()) == ["prior.safetensors"]  # nothing but the checkpoint


def test_code_prior_model_keeps_to_codes():
    """The code data stay integers and refuse binarization; the prior model refuses the options that act on
    pixel intensities, and its loss is the negative log-likelihood of each grid, in nats and bits per code."""
    from vaelab.config import TrainConfig
    from vaelab.data.arrays import CodeDataset
    from vaelab.errors import DataError
    from vaelab.models.code_prior import CodePriorModel

    codes = CodeDataset(torch.randint(16, (6, 1, 3, 3)), torch.arange(6) % 2)
    assert torch.equal(codes.batch(slice(0, 6)), codes.x) and isinstance(codes.subset([0, 2]), CodeDataset)
    with pytest.raises(DataError, match="integer codes"):
        codes.batch(slice(0, 2), binarize=True)
    with pytest.raises(DataError, match="must hold integers"):
        CodeDataset(torch.rand(4, 1, 3, 3))
    torch.manual_seed(0)
    prior = CodePriorModel.for_codes(16, (3, 3), layers=1, channels=4, classes=2)
    assert prior.capabilities.conditional and not CodePriorModel.for_codes(16, (3, 3), layers=1,
                                                                           channels=4).capabilities.conditional
    problems = prior.training_problems(TrainConfig(binarize=True, noise="masking", noise_level=0.1, iw_samples=2))
    assert len(problems) == 3 and all("code prior" in p or "deterministic" in p for p in problems), problems
    x, c = codes.batch(slice(0, 6)), codes.labels(slice(0, 6))
    with pytest.raises(VaelabError, match="conditioned on 2 classes and needs their labels"):
        prior(x)
    terms = prior.loss(x, prior(x, c))
    torch.testing.assert_close(terms["loss"], -prior.prior.log_prob(x[:, 0], c))
    torch.testing.assert_close(terms["bits_per_code"], terms["loss"] / (9 * math.log(2)))


def test_a_first_release_prior_checkpoint_is_refitted_not_resumed(tmp_path):
    """The first release fitted the prior in a loop of its own; its prior_checkpoint.safetensors cannot be continued
    by the training loop: --resume says so and how to refit, and --overwrite refits. Its prior still samples."""
    from vaelab.prior import train_prior

    run = _copy(REPO / "tests" / "fixtures" / "v1" / "vqvae", tmp_path / "run")
    assert from_pretrained(run).sample(2, condition=3).shape == (2, 1, 8, 8)
    with pytest.raises(VaelabError, match=r"written by the first release of vaelab.*refit it with --overwrite"):
        train_prior(run, epochs=2, resume=True, progress=False)
    with pytest.raises(VaelabError, match=r"already has a code prior \(1 epoch\), fitted by the first release.*"
                                          "--overwrite"):
        train_prior(run, epochs=1, progress=False)
    history = train_prior(run, epochs=1, layers=2, channels=8, overwrite=True, progress=False)
    assert [r["epoch"] for r in history] == [1] and math.isfinite(history[0]["test_bits_per_code"])
    history = train_prior(run, epochs=2, resume=True, progress=False)  # and the new fit resumes
    assert [r["epoch"] for r in history] == [1, 2]


def test_cli_encode_indices_round_trip_exactly(vq_run, tmp_path, capsys):
    import numpy as np

    run = _copy(vq_run, tmp_path / "run")
    code, out, err = _vaelab(capsys, "encode", run, "--indices")
    assert code == 0, err
    codes, labels = np.load(run / "codes.npy"), np.load(run / "codes.labels.npy")
    test = load_dataset("digits").test
    model = from_pretrained(run)
    assert codes.dtype == np.int64 and codes.shape == (len(test), *model.grid) and labels.shape == (len(test),)
    assert codes.min() >= 0 and codes.max() < model.config.codebook_size
    x = test.batch(slice(0, len(test)))
    assert torch.equal(model.decode_indices(torch.from_numpy(codes)), model.reconstruct(x))  # bit for bit
    code, _, err = _vaelab(capsys, "encode", run, "--indices", "--split", "all", "--out", tmp_path / "all.npy")
    assert code == 0 and np.load(tmp_path / "all.npy").shape[0] == len(load_dataset("digits").train) + len(test)

    vae = tmp_path / "vae"
    code, _, err = _vaelab(capsys, "train", "--model", "vae", "--arch", "mlp", "--hidden", 8, "--latent-dim", 2,
                           "--dataset", "digits", "--epochs", 1, "--no-progress", "--no-pictures", "--out", vae)
    assert code == 0, err
    code, _, err = _vaelab(capsys, "encode", vae, "--indices")
    assert code == 1 and "--indices writes the discrete codes of a VQ-VAE" in err and "'vae'" in err
