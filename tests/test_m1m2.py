"""M1+M2 (Kingma et al. 2014): the objective against a hand-written loop over samples and classes, the stacked
bound, the two training stages of the one loop (which weights learn in each, resume across the boundary, DDP),
a real run on digits from 2 labels per class, the importance-sampled likelihood, and the CLI."""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from test_cli import FAST, assert_clean_error, assert_png, vaelab
from test_distributed import _env as torchrun_env
from vaelab.config import get_preset
from vaelab.data import load_dataset
from vaelab.errors import ConfigError, VaelabError
from vaelab.evaluation import evaluate
from vaelab.evaluation.nll import log_likelihood
from vaelab.losses import recon_nll
from vaelab.models import build_model, from_pretrained, with_settings
from vaelab.models.m1m2 import CODE_LIKELIHOOD, M1M2
from vaelab.models.m2 import m2_loss
from vaelab.training import fit
from vaelab.training.schedules import lr_at

K = 3  # classes of the tiny models


def _tiny(**kw) -> M1M2:
    torch.manual_seed(0)
    return build_model(model="m1m2", arch="mlp", input_shape=(1, 4, 4), condition_dim=K, hidden=(8,), latent_dim=3,
                       m2_hidden=(6,), m2_latent=2, alpha=0.7, beta=1.3, **kw).double()


def _batch():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(4, 1, 4, 4, generator=g, dtype=torch.float64)
    return x, torch.tensor([2, -1, 0, -1])  # two labelled samples, two with hidden labels


def _by_hand(model: M1M2, x, labels, out, alpha: float, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The loss and the stacked bound, one sample and one class at a time: M1's -ELBO of x_i at the forward's
    code z1_i, and Kingma et al.'s M2 objective (eqs. 6, 7, 9) of z1_i, each class's pair re-encoded and
    re-decoded on its own, reusing only the forward's noise."""
    m2 = out.m2
    eps = ((m2.z - m2.posterior.mean) / m2.posterior.std).detach()  # (P, L2)
    losses, bounds = [], []
    for i in range(len(x)):
        q1 = model.m1.encode(x[i:i + 1])
        z1 = out.m1.z[i:i + 1]  # (1, L1), drawn by the forward
        recon1 = recon_nll(x[i:i + 1], model.m1.decode_raw(z1), "bernoulli")[0]
        kl1 = 0.5 * (q1.mean**2 + q1.logvar.exp() - 1 - q1.logvar).sum()
        log_q1 = -0.5 * (((z1 - q1.mean) ** 2) / q1.logvar.exp() + q1.logvar + math.log(2 * math.pi)).sum()
        log_q = torch.log_softmax(model.m2.classifier(z1), dim=1)[0]

        def neg_elbo(y: int, weight_kl: float) -> torch.Tensor:  # recon + weight * KL - log p(y) of (z1_i, y)
            j = int(((m2.pair_row == i) & (m2.pair_label == y)).nonzero())
            post = model.m2.encode(z1, torch.tensor([y]))
            z2 = post.mean[0] + post.std[0] * eps[j]
            raw = model.m2.decode_raw(z2[None], torch.tensor([y]))
            mean, log_scale = raw[0, :3], raw[0, 3:]
            nll = -torch.distributions.Normal(mean, log_scale.clamp(-9, 9).exp()).log_prob(z1[0]).sum()
            kl2 = 0.5 * (post.mean[0]**2 + post.logvar[0].exp() - 1 - post.logvar[0]).sum()
            return nll + weight_kl * kl2 + math.log(K)

        if labels[i] >= 0:
            y = int(labels[i])
            m2_loss, m2_bound = neg_elbo(y, beta) - alpha * log_q[y], -neg_elbo(y, 1.0)
        else:
            q = log_q.exp()
            entropy = -(q * log_q).sum()
            m2_loss = sum(q[y] * neg_elbo(y, beta) for y in range(K)) - entropy
            m2_bound = -sum(q[y] * neg_elbo(y, 1.0) for y in range(K)) + entropy
        losses.append(recon1 + kl1 + m2_loss)
        bounds.append(-recon1 - log_q1 + m2_bound)
    return torch.stack(losses), torch.stack(bounds)


def test_the_objective_and_the_stacked_bound_equal_a_loop_over_samples_and_classes():
    model = _tiny()
    x, labels = _batch()
    torch.manual_seed(5)
    out = model(x, labels)  # never given an epoch: both models run
    assert out.m2 is not None and out.m2.pair_row.tolist() == [0, 2, 1, 3, 1, 3, 1, 3]
    terms = model.loss(x, out)  # alpha as given (no batch mix: the identity map)
    loss, bound = _by_hand(model, x, labels, out, alpha=0.7, beta=1.3)
    assert torch.allclose(terms["loss"], loss, rtol=0, atol=1e-10)
    assert torch.allclose(terms["elbo"], bound, rtol=0, atol=1e-10)
    assert set(terms) >= {"recon", "kl", "m2_recon", "m2_kl", "entropy", "classifier_nll", "error", "bce", "mse"}


def test_the_stages_train_m1_alone_then_m2_on_the_frozen_m1():
    model = _tiny(m1_epochs=2).train()
    x, labels = _batch()
    m1 = [p for n, p in model.named_parameters() if n.startswith("m1.")]
    m2 = [p for n, p in model.named_parameters() if n.startswith("m2.")]
    assert len(m1) + len(m2) == len(list(model.parameters()))
    for epoch, learns, still in ((0, m1, m2), (1, m1, m2), (2, m2, m1), (9, m2, m1)):
        model.zero_grad(set_to_none=True)
        model.start_epoch(epoch)
        out = model(x, labels)
        terms = model.loss(x, out)
        assert (out.m2 is None) == (epoch < 2)
        assert ("error" in terms) == (epoch >= 2)
        terms["loss"].sum().backward()
        assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in learns if p.requires_grad)
        assert all(p.grad is None for p in still)
    model.eval()  # evaluation runs both, whatever the stage
    with torch.no_grad():
        assert model(x, labels).m2 is not None


@pytest.mark.parametrize("n_samples", [1, 3])
def test_m2s_stage_skips_m1s_decoder_and_trains_what_the_full_forward_would(n_samples):
    """In M2's stage of training the frozen M1 only encodes (its decoding would feed constants): the codes, M2's
    terms and M2's gradients equal those of the full forward (the model never given an epoch) at the same seed,
    and the loss is the full loss less M1's constant part."""
    model = _tiny(m1_epochs=1).train()
    x, labels = _batch()
    decoded = []
    hook = model.m1.decoder.register_forward_hook(lambda *a: decoded.append(1))
    runs = {}
    for stage in ("m2", None):  # M2's stage; both models at once (the reference)
        model.stage = stage
        model.zero_grad(set_to_none=True)
        torch.manual_seed(5)
        out = model(x, labels, n_samples=n_samples)
        terms = model.loss(x, out)
        terms["loss"].sum().backward()
        runs[stage] = (out, terms, {n: p.grad.clone() for n, p in model.m2.named_parameters()})
        assert len(decoded) == (0 if stage else 1)
    hook.remove()
    (out, terms, grads), (ref_out, ref_terms, ref_grads) = runs["m2"], runs[None]
    assert out.m1.recon.numel() == 0 and out.recon.numel() == 0
    assert torch.equal(out.m1.z, ref_out.m1.z) and torch.equal(out.z, ref_out.z)
    assert set(terms) == {"loss", "m2_recon", "m2_kl", "entropy", "classifier_nll", "error"}
    for name in terms:
        if name != "loss":
            assert torch.equal(terms[name], ref_terms[name]), name
    if n_samples == 1:  # the full loss is M1's -ELBO plus M2's objective
        m1_part = ref_terms["recon"] + ref_terms["kl"]
        assert torch.allclose(terms["loss"] + m1_part, ref_terms["loss"], rtol=0, atol=1e-12)
    assert grads.keys() == ref_grads.keys()
    assert all(torch.allclose(grads[n], ref_grads[n], rtol=0, atol=1e-12) for n in grads)


def test_m1_epochs_must_leave_epochs_to_m2_and_settings_are_checked():
    digits = load_dataset("digits")
    model = build_model(model="m1m2", condition_dim=10, hidden=(16,), latent_dim=4, m2_hidden=(8,), m2_latent=2,
                        m1_epochs=3, input_shape=digits.train.sample_shape)
    with pytest.raises(ConfigError, match=r"m1_epochs=3 leaves none of the 3 epochs to M2"):
        fit(model, digits.train, None, epochs=3, labels=20, progress=False)
    with pytest.raises(ConfigError) as err:
        build_model(model="m1m2", condition_dim=10, m1_epochs=-1, m2_hidden=(0,), m2_latent=-1, input_shape=(64,))
    text = str(err.value)
    assert "m1_epochs=-1 must be an integer >= 0" in text and "m2_hidden=[0] must be a list of positive" in text
    assert "m2_latent=-1 must be an integer >= 1" in text


def test_uniform_order_shows_every_sample_equally_often():
    from vaelab.data.semisupervised import MixedBatches

    y = torch.arange(103) % 5
    semi = MixedBatches(y, torch.tensor([0, 1, 2, 3, 4]), batch_size=8)  # 5 labelled, 98 unlabelled: 2 a batch
    order = semi.uniform_order(torch.Generator().manual_seed(0))
    assert semi.epoch_length == 98 + 17 * 2 == len(order)  # 17 steps of 6 unlabelled + 2 labelled
    counts = torch.bincount(order, minlength=103)
    assert counts.min() >= 1 and counts.max() <= 2 and int((counts == 2).sum()) == 132 - 103
    assert torch.equal(order, semi.uniform_order(torch.Generator().manual_seed(0)))  # a function of the generator
    mixed = torch.bincount(semi.epoch_order(torch.Generator().manual_seed(0)), minlength=103)
    assert sorted(mixed[:5].tolist()) == [6, 7, 7, 7, 7]  # the mixed batches: each labelled sample ~7 times


def test_m1_batches_uniform_trains_m1_on_every_image_equally_and_m2_on_mixed_batches(monkeypatch):
    digits = load_dataset("digits")
    model = build_model("m1m2", input_shape=digits.train.sample_shape, condition_dim=10, hidden=(16,), latent_dim=4,
                        m2_hidden=(8,), m2_latent=2, m1_epochs=1, m1_batches="uniform")
    seen, forward = [], model.forward
    monkeypatch.setattr(model, "forward", lambda x, c=None, n_samples=1: seen.append(c.clone()) or forward(x, c))
    # fp32: precision auto's timed steps would pass through forward too
    fit(model, digits.train, None, epochs=2, batch_size=64, labels=20, seed=4, progress=False, precision="fp32")
    steps = len(seen) // 2
    m1, m2 = torch.cat(seen[:steps]), seen[steps:]
    assert all((c >= 0).sum() == 16 for c in m2[:-1])  # M2's stage: a quarter of every batch labelled
    assert int((m1 >= 0).sum()) <= 2 * 20  # M1's stage: the 20 labelled images at most twice each, as any image
    assert model.mixes_labels(0) is False and model.mixes_labels(1) is True
    default = build_model("m1m2", input_shape=digits.train.sample_shape, condition_dim=10, m1_epochs=1)
    assert default.mixes_labels(0) is False  # uniform unless asked (the measured recipe)
    mixed = build_model("m1m2", input_shape=digits.train.sample_shape, condition_dim=10, m1_epochs=1,
                        m1_batches="mixed")
    assert mixed.mixes_labels(0) is True and mixed.mixes_labels(1) is True
    with pytest.raises(ConfigError, match="m1_batches='even' is unknown; choose 'mixed' or 'uniform'"):
        build_model("m1m2", input_shape=digits.train.sample_shape, condition_dim=10, m1_batches="even")


@pytest.mark.parametrize("span", ["run", "stage"])
def test_lr_span_stage_restarts_the_cosine_schedule_for_m2(monkeypatch, span):
    """lr_span="stage": M1's epochs and M2's each run the whole cosine (as two models trained one after the
    other); "run": one cosine over both. The learning rates the optimizer stepped with, read at every step."""
    digits = load_dataset("digits")
    model = build_model("m1m2", input_shape=digits.train.sample_shape, condition_dim=10, hidden=(16,), latent_dim=4,
                        m2_hidden=(8,), m2_latent=2, m1_epochs=2, lr_span=span)
    rates, step = [], torch.optim.Adam.step
    monkeypatch.setattr(torch.optim.Adam, "step", lambda self, *a, **k: rates.append(self.param_groups[0]["lr"])
                        or step(self, *a, **k))
    fit(model, digits.train, None, epochs=5, batch_size=128, labels=20, seed=4, progress=False, precision="fp32",
        lr=1e-2, lr_schedule="cosine", lr_min=1e-4)
    steps = len(rates) // 5  # the mixed batches' epoch (the labelled images repeated)
    assert len(rates) == 5 * steps and steps > math.ceil(len(digits.train) / 128)
    cosine = lambda i, n: lr_at(i, lr=1e-2, schedule="cosine", total_steps=n * steps, lr_min=1e-4)  # noqa: E731
    if span == "run":
        assert rates == [cosine(i, 5) for i in range(5 * steps)]
    else:
        assert rates == [cosine(i, 2) for i in range(2 * steps)] + [cosine(i, 3) for i in range(3 * steps)]
        assert rates[2 * steps] == 1e-2  # M2's first step at the full rate
    assert model.schedule_span(1, 5) == ((0, 2) if span == "stage" else (0, 5))
    assert model.schedule_span(2, 5) == ((2, 5) if span == "stage" else (0, 5))
    with pytest.raises(ConfigError, match="lr_span='epoch' is unknown; choose 'run' or 'stage'"):
        build_model("m1m2", input_shape=digits.train.sample_shape, condition_dim=10, lr_span="epoch")


def test_code_dims_active_feeds_m2s_inference_networks_the_dimensions_m1_uses():
    """code_dims="active" (Kingma et al.'s code keeps M1's dimensions whose posterior mean varies, std > 0.1):
    measured once, on the first batch of M2's stage; the classifier and q(z2|z1,y) read the code with the others
    zeroed, p(z1|y,z2) still models every dimension; the mask is saved with the weights."""
    model = _tiny(m1_epochs=1, code_dims="active")
    last = [m for m in model.m1.encoder.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        last.weight[[0, 2]] = 0.0  # the means of dimensions 0 and 2 no longer depend on x: inactive
    x, labels = _batch()
    assert model.code_mask.tolist() == [0.0, 0.0, 0.0]  # not measured yet: M1 trains first
    model.train(), model.start_epoch(0)
    model(x, labels)
    assert model.code_mask.tolist() == [0.0, 0.0, 0.0]
    model.start_epoch(1)
    torch.manual_seed(5)
    out = model(x, labels)
    means = model.m1.encode(x).mean
    assert means.std(0).gt(0.1).tolist() == [False, True, False]
    assert model.code_mask.tolist() == [0.0, 1.0, 0.0]
    codes = out.m1.z
    assert codes[:, [0, 2]].abs().min() > 0  # M1's draws keep every dimension ...
    seen = codes * torch.tensor([0.0, 1.0, 0.0], dtype=codes.dtype)
    assert torch.equal(out.m2.class_logits, model.m2.classifier(seen))  # ... the classifier reads dimension 1
    terms = model.loss(x, out)
    m2 = m2_loss(codes, out.m2, likelihood=CODE_LIKELIHOOD, beta=1.3, alpha=0.7)  # p(z1|y,z2) of all 3
    assert torch.equal(terms["m2_recon"], m2["recon"])
    with torch.no_grad():
        last.weight[0] = 1.0  # M1 changes: the mask does not (measured once)
    model(x, labels)
    assert model.code_mask.tolist() == [0.0, 1.0, 0.0]
    model.eval()
    mask = torch.tensor([0.0, 1.0, 0.0], dtype=x.dtype)
    assert torch.allclose(model.classify(x), torch.softmax(model.m2.classifier(model.m1.encode(x).mean * mask), 1))
    loaded = _tiny(m1_epochs=1, code_dims="active")
    loaded.load_state_dict(model.state_dict())
    assert loaded.code_mask.tolist() == [0.0, 1.0, 0.0]
    none = _tiny(m1_epochs=1, code_dims="active")
    with torch.no_grad():
        [m for m in none.m1.encoder.modules() if isinstance(m, torch.nn.Linear)][-1].weight[:3] = 0.0
    none.train(), none.start_epoch(1)
    none(x, labels)
    assert none.code_mask.tolist() == [1.0, 1.0, 1.0]  # no dimension active: M2 reads them all
    assert "code_mask" not in _tiny(m1_epochs=1).state_dict()  # code_dims="all": nothing to keep
    with pytest.raises(ConfigError, match="code_dims='active' picks the dimensions M1 uses when M2's stage begins, "
                                          "so it needs two stages: set m1_epochs > 0"):
        _tiny(code_dims="active")


def _code_posterior_by_hand(model: M1M2, code, seen, samples: int) -> torch.Tensor:
    """log p(y) + log (1/S) sum_s p(z1|y,z2_s) p(z2_s) / q(z2_s|seen z1,y) per class: the encoder reads `seen`,
    the learned Gaussian scores the whole `code`, its density written out; the noise drawn as posterior_logits
    draws it, (S, B, L2) per class."""
    m2, columns = model.m2, []
    for y in range(K):
        c = torch.full((len(code),), y)
        post = m2.encode(seen, c)
        eps = torch.randn(samples, *post.mean.shape, dtype=code.dtype)
        z = post.mean + post.std * eps
        mean, log_scale = torch.stack([m2.decode_raw(z[s], c) for s in range(samples)]).chunk(2, dim=2)
        log_p = (-0.5 * ((code - mean) / log_scale.exp()) ** 2 - log_scale - 0.5 * math.log(2 * math.pi)).sum(2)
        log_pz = (-0.5 * z ** 2 - 0.5 * math.log(2 * math.pi)).sum(2)
        log_qz = (-0.5 * eps ** 2 - 0.5 * post.logvar - 0.5 * math.log(2 * math.pi)).sum(2)
        columns.append(torch.logsumexp(log_p + log_pz - log_qz, 0) - math.log(samples) - math.log(K))
    return torch.stack(columns, 1)


@pytest.mark.parametrize("code_dims", ["all", "active"])
def test_posterior_samples_classify_by_m2s_posterior_at_the_mean_code(code_dims):
    model = _tiny(m1_epochs=1, code_dims=code_dims, posterior_samples=3).eval()
    mask = torch.tensor([1.0, 0.0, 1.0], dtype=torch.float64)
    if code_dims == "active":
        model.code_mask.copy_(mask)
    x, labels = _batch()
    code = model.m1.encode(x).mean
    seen = code * mask if code_dims == "active" else code
    torch.manual_seed(2)
    expected = _code_posterior_by_hand(model, code, seen, 3)
    torch.manual_seed(2)
    torch.testing.assert_close(model.classify(x), torch.softmax(expected, 1))
    torch.manual_seed(4)
    out = model(x, labels)  # eval: M1's draw, M2's pairs' draw, then the posterior at the mean code
    torch.manual_seed(4)
    z1 = model.m1(x).z
    model.m2(z1 * mask if code_dims == "active" else z1, labels)
    posterior = out.m2.class_logits
    torch.testing.assert_close(posterior, _code_posterior_by_hand(model, code, seen, 3))
    torch.manual_seed(6)
    guess = model.classify(x).argmax(1)
    torch.manual_seed(6)
    assert torch.equal(model.reconstruct(x), model.reconstruct(x, guess))  # a hidden label: the posterior's class
    model.start_epoch(0)  # validation in M1's stage, where M2 is untrained, reads q(y|z1) at the mean code
    out = model(x, labels)
    assert torch.equal(out.m2.class_logits, model.m2.classifier(seen))
    model.start_epoch(1)  # and in M2's stage by the posterior, as after training
    torch.manual_seed(4)
    assert torch.equal(model(x, labels).m2.class_logits, posterior)
    model.train(), model.start_epoch(1)  # training reads q(y|z1) at the drawn code
    torch.manual_seed(4)
    out = model(x, labels)
    assert torch.equal(out.m2.class_logits, model.m2.classifier(model._seen(out.m1.z)))


def test_a_bad_label_tensor_is_a_clear_error():
    model = _tiny()
    x, _ = _batch()
    with pytest.raises(VaelabError, match=r"labels as a 1-D tensor of 4 class indices in \[0, 3\)"):
        model(x, torch.zeros(4, 2, dtype=torch.long))
    with pytest.raises(VaelabError, match=r"class indices in \[0, 3\), or -1 for a hidden label; got values \[-2"):
        model(x, torch.tensor([0, 1, 2, -2]))


# ------------------------------------------------------------------------------------------ real training


def test_a_run_on_digits_learns_the_classes_from_2_labels_per_class():
    digits = load_dataset("digits")
    torch.manual_seed(0)
    model = build_model(model="m1m2", condition_dim=10, arch="mlp", hidden=(128,), latent_dim=16, m2_hidden=(64,),
                        m2_latent=8, alpha=10.0, m1_epochs=15, input_shape=digits.train.sample_shape)
    history = fit(model, digits.train, digits.test, epochs=40, batch_size=64, labels=20, lr=3e-3, progress=False)
    stage1, stage2 = history[14], history[-1]
    assert "train_error" not in stage1 and "train_error" in stage2  # M2 trains from epoch 16
    assert stage1["val_error"] > 0.7  # M2's classifier is untrained until then: chance is 0.9
    assert stage2["val_error"] < 0.35, [round(r["val_error"], 3) for r in history]
    metrics = evaluate(model, digits.test)
    predicted = model.classify(digits.test.to_float()).argmax(1)
    assert metrics["error"] == pytest.approx((predicted != digits.test.y).double().mean().item())
    assert metrics["m1_active_units"] >= 1 and metrics["elbo"] < 0


def test_resume_across_the_stage_boundary_equals_the_uninterrupted_run(tmp_path):
    digits = load_dataset("digits")
    kw = dict(epochs=3, batch_size=64, labels=20, seed=3, checkpoint_every=10, progress=False)

    def model(seed=0):
        torch.manual_seed(seed)
        return build_model(model="m1m2", condition_dim=10, arch="mlp", hidden=(16,), latent_dim=4, m2_hidden=(8,),
                           m2_latent=2, m1_epochs=1, input_shape=digits.train.sample_shape)

    straight = model()
    fit(straight, digits.train, None, out=tmp_path / "a", **kw)
    crashed = model()
    calls = {"n": 0}

    def crash(module, args):  # dies at step 26 of epoch 1 (30 steps): the last checkpoint is step 20, in stage 1
        calls["n"] += 1
        if calls["n"] == 26:
            raise KeyboardInterrupt

    crashed.register_forward_pre_hook(crash)
    with pytest.raises(KeyboardInterrupt):
        fit(crashed, digits.train, None, out=tmp_path / "b", **kw)
    resumed = model(seed=123)
    fit(resumed, digits.train, None, out=tmp_path / "b", resume=True, **kw)
    for k, v in straight.state_dict().items():
        assert torch.equal(resumed.state_dict()[k], v), k
    a, b = load_file(str(tmp_path / "a" / "checkpoint.safetensors")), load_file(str(tmp_path / "b" /
                                                                                    "checkpoint.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_the_ddp_path_trains_both_stages(tmp_path):
    worker = tmp_path / "worker.py"
    worker.write_text(
        "import sys, torch\n"
        "from vaelab.data import load_dataset\nfrom vaelab.models import build_model\nfrom vaelab.training import fit\n"
        "torch.manual_seed(0)\ndigits = load_dataset('digits')\n"
        "model = build_model(model='m1m2', condition_dim=10, hidden=(16,), latent_dim=12, m2_hidden=(8,), "
        "m2_latent=2, m1_epochs=1, code_dims='active', input_shape=digits.train.sample_shape)\n"
        "fit(model, digits.train, digits.test, epochs=2, batch_size=64, labels=20, progress=False, out=sys.argv[1])\n"
        "import os, json\n"
        "open(sys.argv[1] + '/mask' + os.environ['RANK'], 'w').write(json.dumps(model.code_mask.tolist()))\n")
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           str(worker), str(tmp_path / "run")], env=torchrun_env(), capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and "train_error" not in rows[0] and 0 <= rows[1]["train_error"] <= 1
    assert all(math.isfinite(r["train_loss"]) for r in rows)
    # code_dims="active": the mask comes from the global batch's statistics, the same on both ranks
    masks = [json.loads((tmp_path / "run" / f"mask{rank}").read_text()) for rank in (0, 1)]
    assert masks[0] == masks[1] == load_file(str(tmp_path / "run" / "model.safetensors"))["code_mask"].tolist()
    assert set(masks[0]) <= {0.0, 1.0} and sum(masks[0]) >= 1


# ------------------------------------------------------------------------------------------ using it


def test_the_importance_sampled_likelihood_is_a_tighter_bound_than_the_elbo():
    model = _tiny().float().eval()
    digits_like = torch.rand(6, 1, 4, 4, generator=torch.Generator().manual_seed(2))
    y = torch.tensor([0, 1, 2, 0, 1, 2])
    with torch.no_grad():
        torch.manual_seed(0)
        elbo = torch.stack([model.loss(digits_like, model(digits_like, y))["elbo"] for _ in range(400)]).mean(0)
        # the bound above is on log p(x, y) = log p(x | y) + log p(y)
        one = log_likelihood(model, digits_like, 1, generator=torch.Generator().manual_seed(1), condition=y)
        many = log_likelihood(model, digits_like, 2000, generator=torch.Generator().manual_seed(1), condition=y)
    assert (many >= elbo + math.log(K) - 0.05).all(), (many, elbo + math.log(K))
    assert torch.isfinite(one).all()
    with pytest.raises(VaelabError, match="needs the labels"):
        model.importance_sampler(digits_like)


def test_sampling_decodes_through_m1_and_a_saved_model_reloads_exactly(tmp_path):
    model = _tiny().float().eval()
    images = model.sample(5, generator=torch.Generator().manual_seed(0))
    assert images.shape == (5, 1, 4, 4) and 0 <= images.min() and images.max() <= 1
    threes = model.sample(4, condition=torch.tensor(2), generator=torch.Generator().manual_seed(0))
    z2 = torch.randn((4, 2), generator=torch.Generator().manual_seed(0))
    z1 = model.m2.decode(z2, torch.full((4,), 2))  # the mean code of p(z1 | y, z2)
    assert torch.allclose(threes, model.m1.decode(z1))
    model.save_pretrained(tmp_path / "m")
    again = from_pretrained(tmp_path / "m")
    x, labels = _batch()
    x = x.float()
    assert torch.equal(again.classify(x), model.classify(x))
    assert torch.equal(again.embed(x, labels.clamp(min=0)), model.embed(x, labels.clamp(min=0)))
    assert again.settings == model.settings


def test_reconstruction_without_a_label_takes_the_classifiers_class():
    model = _tiny().float().eval()
    x, _ = _batch()
    x = x.float()
    guess = model.classify(x).argmax(1)
    assert torch.equal(model.reconstruct(x), model.reconstruct(x, guess))
    assert model.reconstruct(x).shape == x.shape


def test_the_preset_is_the_papers_architecture():
    preset = get_preset("m1m2")
    model = build_model(preset.model.replace(condition_dim=10), input_shape=(1, 28, 28))
    assert [m.out_features for m in model.m1.encoder if isinstance(m, torch.nn.Linear)] == [600, 600, 100]
    assert model.m2.config.input_shape == (50,) and model.m2.config.likelihood == "gaussian-learned"
    assert model.latent_shape == (50,) and model.settings.m1_epochs < preset.train.epochs
    assert model.settings.posterior_samples == 20 and model.m2.settings.posterior_samples == 0  # M1M2 asks M2


# ------------------------------------------------------------------------------------------ the CLI


@pytest.fixture(scope="module")
def m1m2_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("m1m2") / "run"
    vaelab("train", "--preset", "m1m2", "--labels", 20, "--epochs", 4, "--m1-epochs", 2, "--hidden", 32,
           "--latent-dim", 8, "--m2-hidden", 16, "--m2-latent", 4, "--out", out, *FAST, check=0)
    return out


def test_cli_train_writes_an_m1m2_run(m1m2_run):
    cfg = json.loads((m1m2_run / "config.json").read_text())
    assert cfg["model"]["model"] == "m1m2" and cfg["model"]["settings"]["m1_epochs"] == 2
    assert cfg["model"]["settings"]["m2_hidden"] == [16] and cfg["train"]["labels"] == 20
    assert cfg["model"]["settings"]["alpha"] == 10.0 and cfg["train"]["lr_schedule"] == "cosine"  # the preset's
    rows = [json.loads(line) for line in (m1m2_run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 4 and "train_error" not in rows[1] and "train_error" in rows[2] and "val_error" in rows[0]
    for name in ("samples.png", "analogies.png", "reconstructions.png"):
        assert_png(m1m2_run / name)


def test_cli_evaluate_reports_the_classifier_and_the_likelihood(m1m2_run, tmp_path):
    proc = vaelab("evaluate", m1m2_run, "--nll-samples", 20, "--out", tmp_path / "e.json", check=0)
    assert "accuracy" in proc.stdout and "m2_recon" in proc.stdout
    metrics = json.loads((tmp_path / "e.json").read_text())
    assert 0 <= metrics["error"] <= 1 and metrics["accuracy"] == pytest.approx(1 - metrics["error"])
    assert metrics["m1_latent_dims"] == 8 and metrics["latent_dims"] == 4 and math.isfinite(metrics["nll"])


def test_cli_evaluate_classifies_by_the_posterior_or_by_q_as_asked(m1m2_run, tmp_path):
    cfg = json.loads((m1m2_run / "config.json").read_text())
    assert cfg["model"]["settings"]["posterior_samples"] == 20  # the preset's
    model, test = from_pretrained(m1m2_run), load_dataset("digits").test
    for k in (0, 5):
        vaelab("evaluate", m1m2_run, "--posterior-samples", k, "--out", tmp_path / f"e{k}.json", check=0)
        metrics = json.loads((tmp_path / f"e{k}.json").read_text())
        judged = with_settings(model, posterior_samples=k)
        assert judged.settings.posterior_samples == k and not judged.training
        assert metrics["posterior_samples"] == k and metrics["error"] == evaluate(judged, test)["error"]
    assert json.loads((m1m2_run / "config.json").read_text()) == cfg  # the run itself is left as it was
    assert_clean_error(vaelab("evaluate", m1m2_run, "--posterior-samples", -2, "--out", tmp_path / "x.json"),
                       "--posterior-samples -2 must be >= 0 (0 classifies by q(y|x); K >= 1 by the model's "
                       "posterior from K importance samples per class, e.g. 20)")
    assert not (tmp_path / "x.json").exists()
    vae_run = tmp_path / "vae"
    vaelab("train", "--model", "vae", "--epochs", 1, "--hidden", 16, "--latent-dim", 2, "--out", vae_run, *FAST,
           check=0)
    assert_clean_error(vaelab("evaluate", vae_run, "--posterior-samples", 5),
                       "--posterior-samples applies to the models that classify by a posterior (m2, adgm, sdgm, "
                       "m1m2); this run's model is 'vae': drop the flag")
    with pytest.raises(ConfigError, match=r"m2_latent=3 changes the weights of model 'm1m2', so a trained model "
                                          r"cannot take it: train anew with it"):
        with_settings(model, m2_latent=3)


def test_cli_sample_draws_images_through_m1(m1m2_run, tmp_path):
    proc = vaelab("sample", m1m2_run, "--n", 6, "--out", tmp_path / "s.png", check=0)
    assert str(tmp_path / "s-analogies.png") in proc.stdout
    assert_png(tmp_path / "s.png")


def test_cli_refuses_too_few_epochs_for_both_stages(tmp_path):
    assert_clean_error(vaelab("train", "--model", "m1m2", "--labels", 20, "--epochs", 2, "--m1-epochs", 2,
                              "--out", tmp_path / "a", *FAST), "m1_epochs=2 leaves none of the 2 epochs to M2")


def test_by_default_both_models_train_together():
    assert M1M2.Settings().m1_epochs == 0  # by default both train together: any number of epochs trains both
