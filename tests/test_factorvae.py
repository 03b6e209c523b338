"""FactorVAE (models/factorvae.py) and the loop's networks with optimizers of their own (models.base.Auxiliary).

The TC term is the discriminator's logit difference, the permutation shuffles each dimension on its own, the
discriminator's loss is the cross-entropy written out by hand; the two optimizers own disjoint parameters and one
loop step is exactly a step of each; a run resumed from an epoch's end, from a step checkpoint inside an epoch or
after SIGKILL ends bit for bit as the uninterrupted one (both networks, both optimizers, the history); the CLI
trains, evaluates and samples a FactorVAE run; under torchrun the discriminator stays the same on every rank.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

from test_reliability import PAUSE_AFTER_CHECKPOINT
from vaelab.config import TrainConfig
from vaelab.data import ArrayDataset, load_dataset
from vaelab.errors import CheckpointError, ConfigError
from vaelab.models import build_model, from_pretrained
from vaelab.models.base import ModelOutput
from vaelab.models.factorvae import DISCRIMINATOR_BETAS, DISCRIMINATOR_LR, discriminator_loss, permute_dims
from vaelab.models.vae import vae_loss
from vaelab.training import fit
from vaelab.training.checkpoint import load_checkpoint, save_checkpoint
from vaelab.training.loop import epoch_seed, make_optimizers

REPO = Path(__file__).resolve().parents[1]
TINY = dict(model="factorvae", latent_dim=4, channels=(4, 8), hidden=(16,), disc_width=32, disc_layers=2)


def _model(shape=(1, 8, 8), seed=0, **kw):
    torch.manual_seed(seed)
    return build_model(input_shape=shape, **{**TINY, **kw})


def _vae_params(model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if not n.startswith("discriminator.")}


def _disc_params(model) -> dict[str, torch.nn.Parameter]:
    return {n: p for n, p in model.named_parameters() if n.startswith("discriminator.")}


def _by_hand_logits(model, z: torch.Tensor) -> torch.Tensor:
    """The discriminator written out: (Linear, LeakyReLU 0.2) per hidden layer, then a Linear to two logits."""
    d = model.discriminator
    h = z
    for layer in d.hidden:
        h = h @ layer.weight.T + layer.bias
        h = torch.where(h > 0, h, 0.2 * h)
    return h @ d.head.weight.T + d.head.bias


# ------------------------------------------------------------------------------------------- the terms


def test_the_tc_term_is_the_discriminators_logit_difference():
    model = _model(gamma=7.5).double()
    x = torch.rand((6, 1, 8, 8), generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    out = model(x)
    terms = model.loss(x, out)
    logits = _by_hand_logits(model, out.z)  # (6, 2)
    p_real = torch.softmax(logits, dim=1)[:, 0]  # D(z)
    tc = logits[:, 0] - logits[:, 1]
    torch.testing.assert_close(tc, torch.log(p_real / (1 - p_real)))  # the log density ratio of the paper
    torch.testing.assert_close(terms["tc"], tc)
    vae = vae_loss(x, out, likelihood="bernoulli", sigma=1.0, beta=1.0)
    torch.testing.assert_close(terms["loss"], vae["loss"] + 7.5 * tc)
    for k in ("recon", "kl", "elbo"):
        assert torch.equal(terms[k], vae[k])


def test_permute_dims_shuffles_each_dimension_by_its_own_permutation():
    z = torch.arange(15, dtype=torch.float32).view(5, 3)  # row i, column j holds 3i + j
    out = permute_dims(z, torch.Generator().manual_seed(0))
    keys = torch.rand((5, 3), generator=torch.Generator().manual_seed(0))  # what permute_dims draws
    expected = torch.empty_like(z)
    for j in range(3):  # column j's rows in the order of its keys
        rows = sorted(range(5), key=lambda i: float(keys[i, j]))
        expected[:, j] = torch.tensor([z[i, j] for i in rows])
    assert torch.equal(out, expected)
    assert torch.equal(out.sort(dim=0).values, z)  # each column keeps its values
    sources = (out - torch.arange(3)) / 3  # the row each entry came from
    assert len({tuple(sources[:, j].tolist()) for j in range(3)}) == 3  # three different permutations
    torch.manual_seed(3)
    a = permute_dims(z)
    torch.manual_seed(3)
    assert torch.equal(permute_dims(z), a)  # without a generator: torch's RNG, which checkpoints restore


def test_the_permutations_of_two_dimensions_are_uniform_and_independent():
    """Over 3600 draws of a 3x2 batch, each of the 36 (column 0, column 1) permutation pairs comes up about 100
    times: each column's permutation is uniform and the two are independent."""
    z = torch.tensor([[0.0, 0.0], [1.0, 1.0], [2.0, 2.0]])
    g = torch.Generator().manual_seed(0)
    counts: dict[tuple, int] = {}
    for _ in range(3600):
        out = permute_dims(z, g)
        key = (tuple(out[:, 0].tolist()), tuple(out[:, 1].tolist()))
        counts[key] = counts.get(key, 0) + 1
    assert len(counts) == 36
    chi2 = sum((c - 100) ** 2 / 100 for c in counts.values())
    assert chi2 < 70, chi2  # 35 degrees of freedom: P(chi2 > 70) < 1e-3


def test_the_discriminator_loss_is_the_cross_entropy_by_hand():
    logits = torch.tensor([[2.0, -1.0], [0.3, 0.5], [-1.0, 1.5], [0.0, 0.0], [4.0, 1.0], [-2.0, 3.0]])
    terms = discriminator_loss(logits, n_real=3)
    d = torch.sigmoid(logits[:, 0] - logits[:, 1])  # D(z): the probability of "drawn from q(z)"
    by_hand = torch.cat([-torch.log(d[:3]), -torch.log(1 - d[3:])])
    torch.testing.assert_close(terms["loss"], by_hand)
    # right where D says "real" (D > 1/2) on the first three rows and "permuted" on the others; a tie counts
    # as "real" (argmax's first index)
    assert terms["accuracy"].tolist() == [1.0, 0.0, 0.0, 0.0, 0.0, 1.0]


@pytest.mark.parametrize("batch", [6, 5, 1])
def test_the_discriminator_sees_the_first_half_as_drawn_and_the_rest_permuted(batch):
    model = _model()
    x = torch.rand((batch, 1, 8, 8), generator=torch.Generator().manual_seed(1))
    out = model(x)
    torch.manual_seed(4)
    terms = model.auxiliary_loss("discriminator", out)
    n_real = batch // 2
    z = out.z.detach()
    torch.manual_seed(4)
    fake = permute_dims(z[n_real:])
    logits = _by_hand_logits(model, torch.cat([z[:n_real], fake]))
    expected = discriminator_loss(logits, n_real)
    torch.testing.assert_close(terms["loss"], expected["loss"])
    assert terms["loss"].shape == terms["accuracy"].shape == (batch,)
    torch.testing.assert_close(terms["loss"][:n_real], -F.logsigmoid(logits[:n_real, 0] - logits[:n_real, 1]))


def _trained_tc_estimate(cov: torch.Tensor, steps: int = 2000) -> float:
    """The TC term's mean over 100,000 fresh codes z ~ N(0, cov), after the model's own discriminator step
    (auxiliary_loss: half the batch drawn, half permuted; the paper's Adam betas) trained it on batches of 512."""
    model = _model(latent_dim=len(cov), disc_width=64, disc_layers=2)
    chol = torch.linalg.cholesky(cov)
    g = torch.Generator().manual_seed(100)
    opt = torch.optim.Adam(model.discriminator.parameters(), lr=1e-3, betas=DISCRIMINATOR_BETAS)
    for _ in range(steps):
        z = torch.randn((512, len(cov)), generator=g) @ chol.T
        terms = model.auxiliary_loss("discriminator", ModelOutput(recon=z, z=z, posterior=None))
        opt.zero_grad()
        terms["loss"].mean().backward()
        opt.step()
    with torch.no_grad():
        logits = model.discriminator(torch.randn((100_000, len(cov)), generator=g) @ chol.T)
    return float((logits[:, 0] - logits[:, 1]).mean())


def test_a_trained_discriminator_estimates_the_total_correlation_of_a_gaussian():
    """The density-ratio trick end to end: for codes from N(0, Σ) the total correlation has the closed form
    TC = ½ (Σ_j log Σ_jj − log det Σ), in nats; the discriminator trained by the model's own step estimates it
    (a finite critic falls a little short of the optimum, never far), and gives 0 for independent codes."""
    cov = torch.tensor([[1.0, 0.8, 0.0], [0.8, 1.0, 0.3], [0.0, 0.3, 1.0]])
    exact = 0.5 * float(cov.diag().log().sum() - torch.logdet(cov))
    assert exact == pytest.approx(0.6547, abs=1e-4)
    assert _trained_tc_estimate(cov) == pytest.approx(exact, abs=0.08)
    assert _trained_tc_estimate(torch.eye(3)) == pytest.approx(0.0, abs=0.02)


# ------------------------------------------------------------------------------------ the two optimizers


def test_the_two_optimizers_own_disjoint_parameters_and_gradients():
    model = _model()
    main, aux = make_optimizers(model, 1e-3)
    assert list(aux) == ["discriminator"]
    disc = aux["discriminator"]
    ids = lambda opt: [id(p) for g in opt.param_groups for p in g["params"]]  # noqa: E731
    assert ids(main) == [id(p) for p in _vae_params(model).values()]  # D is left out, the rest in order
    assert ids(disc) == [id(p) for p in _disc_params(model).values()]
    assert disc.param_groups[0]["lr"] == DISCRIMINATOR_LR == 1e-4 and main.param_groups[0]["lr"] == 1e-3
    assert disc.param_groups[0]["betas"] == DISCRIMINATOR_BETAS == (0.5, 0.9)
    # the setting reaches D's optimizer only
    main, aux = make_optimizers(_model(disc_lr=3e-3), 1e-3)
    assert aux["discriminator"].param_groups[0]["lr"] == 3e-3 and main.param_groups[0]["lr"] == 1e-3

    x = torch.rand((8, 1, 8, 8), generator=torch.Generator().manual_seed(1))
    out = model(x)
    model.loss(x, out)["loss"].sum().backward()  # the VAE's loss: D is held fixed
    assert all(p.grad is None for p in _disc_params(model).values())
    assert all(p.grad is not None for p in _vae_params(model).values())
    model.zero_grad(set_to_none=True)
    model.auxiliary_loss("discriminator", out)["loss"].sum().backward()  # D's loss: the codes are data
    assert all(p.grad is None for p in _vae_params(model).values())
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in _disc_params(model).values())


def test_one_loop_step_is_a_step_of_each_optimizer_on_its_own_loss():
    """fit on one batch (one step) against the step written out: the VAE's Adam on its loss, then D's Adam on
    D's loss at the same codes. Same arithmetic in the same order: equal bit for bit."""
    data = ArrayDataset(torch.rand((16, 1, 8, 8), generator=torch.Generator().manual_seed(2)), scale=1.0)
    trained, by_hand = _model(), _model()
    fit(trained, data, None, epochs=1, batch_size=16, progress=False, seed=3, precision="fp32")  # the by-hand step's

    main, aux = make_optimizers(by_hand, 1e-3)
    torch.manual_seed(epoch_seed(3, 0))
    order = torch.randperm(16, generator=torch.Generator().manual_seed(epoch_seed(3, 0) + 1))
    x = data.batch(order)
    out = by_hand(x)
    main.zero_grad(set_to_none=True)
    (by_hand.loss(x, out)["loss"].sum() / 16).backward()
    main.step()
    d_loss = by_hand.auxiliary_loss("discriminator", out)["loss"].sum() / 16
    aux["discriminator"].zero_grad(set_to_none=True)
    d_loss.backward()
    aux["discriminator"].step()
    for k, v in by_hand.state_dict().items():
        assert torch.equal(trained.state_dict()[k], v), k
    start = _model().state_dict()
    assert all(not torch.equal(start[k], v) for k, v in by_hand.state_dict().items())  # every tensor moved


def test_the_history_reports_the_tc_estimate_and_the_discriminators_accuracy():
    digits = load_dataset("digits")
    model = _model(digits.train.sample_shape)
    history = fit(model, digits.train, digits.test, epochs=2, batch_size=128, progress=False)
    for row in history:
        assert {"train_tc", "train_discriminator_loss", "train_discriminator_accuracy", "val_tc"} <= set(row)
        assert 0.0 <= row["train_discriminator_accuracy"] <= 1.0
        assert all(isinstance(v, (int, float)) and v == v for v in row.values())


def test_the_iwae_objective_and_bad_settings_are_refused():
    model = _model()
    with pytest.raises(ConfigError, match=r"iw_samples=5 does not apply to model 'factorvae': its total-correl"):
        fit(model, ArrayDataset(torch.rand(8, 1, 8, 8), scale=1.0), None, epochs=1, iw_samples=5, progress=False)
    assert "deterministic" not in " ".join(model.training_problems(TrainConfig(iw_samples=5)))
    with pytest.raises(ConfigError) as e:
        _model(gamma=-1.0, disc_width=0, disc_layers=1.5, disc_lr=float("nan"))
    msg = str(e.value)
    assert "4 problems" in msg and "gamma=-1.0" in msg and "disc_width=0" in msg and "disc_layers=1.5" in msg
    assert "disc_lr=nan must be a finite number > 0 (the discriminator's learning rate; the paper: 1e-4)" in msg


def test_the_discriminator_is_saved_with_the_model(tmp_path):
    model = _model()
    model.save_pretrained(tmp_path / "m")
    saved = load_file(str(tmp_path / "m" / "model.safetensors"))
    assert {"discriminator.head.weight", "discriminator.hidden.0.weight", "discriminator.hidden.1.bias"} <= set(saved)
    loaded = from_pretrained(tmp_path / "m")
    assert loaded.settings == model.settings
    for k, v in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k


# --------------------------------------------------------------------------------------------- resume


class Crash(Exception):
    """Raised by a forward pre-hook at a chosen forward pass: the run dies there, as after a kill."""


def _crash_at(n: int):
    calls = {"n": 0}

    def hook(module, args):
        calls["n"] += 1
        if calls["n"] == n:
            raise Crash(f"forward pass {n}")

    return hook


def _strip(rows: list[dict]) -> list[dict]:
    return [{k: v for k, v in r.items() if k != "time_s"} for r in rows]


def _metrics(run: Path) -> list[dict]:
    return _strip([json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()])


def _assert_same_checkpoints(a: Path, b: Path) -> None:
    """Every tensor of two final checkpoints: both networks' weights, both optimizers' moments, the RNG state."""
    ta, tb = load_file(str(a)), load_file(str(b))
    assert ta.keys() == tb.keys()
    assert any(k.startswith("aux_optim.discriminator.") for k in ta) and any(k.startswith("optim.") for k in ta)
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k


KW = dict(epochs=2, batch_size=64, progress=False, seed=3)  # digits: 26 steps an epoch


def test_resume_at_an_epochs_end_equals_the_uninterrupted_run(tmp_path):
    digits = load_dataset("digits")
    shape = digits.train.sample_shape
    straight = fit(_model(shape), digits.train, None, out=tmp_path / "a", **KW)
    fit(_model(shape), digits.train, None, out=tmp_path / "b", **{**KW, "epochs": 1})
    resumed = _model(shape, seed=123)  # other initial weights: everything comes from the checkpoint
    history = fit(resumed, digits.train, None, out=tmp_path / "b", resume=True, **KW)
    assert _strip(history) == _strip(straight)
    _assert_same_checkpoints(tmp_path / "a" / "checkpoint.safetensors", tmp_path / "b" / "checkpoint.safetensors")
    a, b = load_file(str(tmp_path / "a" / "model.safetensors")), load_file(str(tmp_path / "b" / "model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_resume_from_a_step_checkpoint_inside_an_epoch_equals_the_uninterrupted_run(tmp_path):
    digits = load_dataset("digits")
    shape = digits.train.sample_shape
    kw = {**KW, "checkpoint_every": 10}
    straight_model = _model(shape)
    straight = fit(straight_model, digits.train, None, out=tmp_path / "a", **kw)
    crashed = _model(shape)
    crashed.register_forward_pre_hook(_crash_at(35))  # the last checkpoint: step 30, step 4 of epoch 2
    with pytest.raises(Crash):
        fit(crashed, digits.train, None, out=tmp_path / "b", **kw)
    probe = _model(shape)
    main, aux = make_optimizers(probe, 1e-3)
    state, _ = load_checkpoint(tmp_path / "b" / "checkpoint.safetensors", probe, main, auxiliary=aux)
    assert state["step"] == 30 and state["position"]["epoch_step"] == 4
    assert "discriminator_accuracy" in state["position"]["meter_keys"]  # D's partial sums of the epoch travel too
    saved = load_file(str(tmp_path / "b" / "checkpoint.safetensors"))
    assert {k.split(".")[1] for k in saved if k.startswith("aux_optim.")} == {"discriminator"}
    resumed = _model(shape, seed=123)
    history = fit(resumed, digits.train, None, out=tmp_path / "b", resume=True, **kw)
    assert _strip(history) == _strip(straight)
    for k, v in straight_model.state_dict().items():  # the VAE and the discriminator
        assert torch.equal(resumed.state_dict()[k], v), k
    _assert_same_checkpoints(tmp_path / "a" / "checkpoint.safetensors", tmp_path / "b" / "checkpoint.safetensors")


def test_a_checkpoint_without_the_discriminators_optimizer_is_refused(tmp_path):
    """A checkpoint of a run whose model had no discriminator cannot continue a FactorVAE exactly."""
    model = _model()
    main, aux = make_optimizers(model, 1e-3)
    save_checkpoint(tmp_path / "c.safetensors", model, main, {"epoch": 1, "step": 3, "history": []})
    with pytest.raises(CheckpointError, match=r"no state of the optimizer of auxiliary network 'discriminator'"):
        load_checkpoint(tmp_path / "c.safetensors", model, main, auxiliary=aux)


# ------------------------------------------------------------------------ the command line, SIGKILL, DDP


def _env() -> dict:
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src"), *filter(None, [os.environ.get("PYTHONPATH")])])
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    return env


def _vaelab(*args, cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run([sys.executable, "-m", "vaelab", *map(str, args)], cwd=cwd, env=_env(),
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, f"{args}: exit {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-4000:]}"
    return proc


CLI = ["--model", "factorvae", "--dataset", "digits", "--latent-dim", "4", "--channels", "8,16",
       "--disc-width", "64", "--disc-layers", "3", "--disc-lr", "2e-4", "--gamma", "5", "--no-progress", "--seed", "2"]


@pytest.mark.slow  # three CLI runs in real processes: most of the time goes to starting them
def test_the_cli_trains_evaluates_and_samples_a_factorvae_run(tmp_path):
    _vaelab("train", *CLI, "--epochs", "1", "--no-pictures", "--out", "run", cwd=tmp_path)
    run = tmp_path / "run"
    config = json.loads((run / "config.json").read_text())
    assert config["model"]["model"] == "factorvae"
    assert config["model"]["settings"] == {"beta": 1.0, "gamma": 5.0, "disc_width": 64, "disc_layers": 3,
                                                "disc_lr": 2e-4}
    row = json.loads((run / "metrics.jsonl").read_text().splitlines()[0])
    assert {"train_tc", "train_discriminator_accuracy", "val_tc"} <= set(row)
    proc = _vaelab("evaluate", "run", "--out", "ev.json", cwd=tmp_path)
    assert "loss" in proc.stdout
    ev = json.loads((tmp_path / "ev.json").read_text())
    assert ev["n"] == 180 and ev["loss"] == ev["loss"] and "tc" in ev
    _vaelab("sample", "run", "--n", "16", "--seed", "1", "--out", "s.png", cwd=tmp_path)
    assert (tmp_path / "s.png").stat().st_size > 0


@pytest.mark.slow  # three CLI runs in real processes: most of the time goes to starting them
def test_sigkill_after_a_step_checkpoint_resumes_exactly(tmp_path):
    """CLI runs of 2 epochs (26 steps each at batch 64), one killed after its 4th checkpoint (steps 10, 20, 26 =
    epoch 1's end, 30), then resumed: the same weights of both networks, optimizer states and metrics."""
    train = ["train", *CLI, "--epochs", "2", "--batch-size", "64", "--no-pictures"]
    straight = subprocess.Popen([sys.executable, "-m", "vaelab", *train, "--out", str(tmp_path / "a")],
                                env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    marker, killed = tmp_path / "written", tmp_path / "b"
    proc = subprocess.Popen([sys.executable, "-c", PAUSE_AFTER_CHECKPOINT, str(marker), "4", *train,
                             "--checkpoint-every", "10", "--out", str(killed)],
                            env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        for _ in range(3000):
            if marker.exists() or proc.poll() is not None:
                break
            time.sleep(0.05)
        assert marker.exists(), proc.communicate()[1][-4000:] if proc.poll() is not None else "timed out"
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        _, err = straight.communicate(timeout=300)
        assert straight.returncode == 0, err[-4000:]
    finally:
        for p in (proc, straight):
            if p.poll() is None:
                p.kill()
    assert len((killed / "metrics.jsonl").read_text().splitlines()) == 1
    _vaelab(*train, "--checkpoint-every", "10", "--out", str(killed), "--resume", cwd=tmp_path)
    _assert_same_checkpoints(tmp_path / "a" / "checkpoint.safetensors", killed / "checkpoint.safetensors")
    assert _metrics(killed) == _metrics(tmp_path / "a")


DDP_WORKER = """
import os, sys
import torch
from safetensors.torch import save_file
from vaelab.models import build_model
from vaelab.data import load_dataset
from vaelab.training import fit

out = sys.argv[1]
torch.manual_seed(int(os.environ["RANK"]))  # different initial weights per rank: the loop starts all from rank 0's
train = load_dataset("digits").train
model = build_model(model="factorvae", latent_dim=4, channels=(8, 8), hidden=(16,), disc_width=32, disc_layers=2,
                    input_shape=train.sample_shape)
start = {k: v.clone() for k, v in model.state_dict().items() if k.startswith("discriminator.")}
# batches of 99 split 50/49 between the ranks: each rank's halves differ in size
fit(model, train, None, epochs=1, batch_size=99, progress=False, out=out, seed=5)
save_file({**{k: v.contiguous() for k, v in model.state_dict().items()}, **{"start." + k: v for k, v in start.items()}},
          os.path.join(out, f"rank{os.environ['RANK']}.safetensors"))
"""


@pytest.mark.slow  # torchrun and two ranks joining a process group take most of the time
def test_under_ddp_the_discriminator_is_the_same_on_every_rank(tmp_path):
    script = tmp_path / "worker.py"
    script.write_text(DDP_WORKER)
    out = tmp_path / "run"
    out.mkdir()
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           str(script), str(out)], env=_env(), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    r0, r1 = load_file(str(out / "rank0.safetensors")), load_file(str(out / "rank1.safetensors"))
    assert not torch.equal(r0["start.discriminator.head.weight"], r1["start.discriminator.head.weight"])
    for k in r0:
        if not k.startswith("start."):
            assert torch.equal(r0[k], r1[k]), k  # every weight, the discriminator's included
    assert not torch.equal(r0["discriminator.head.weight"], r0["start.discriminator.head.weight"])
    history = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert 0.0 <= history[0]["train_discriminator_accuracy"] <= 1.0
