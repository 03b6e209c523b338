"""The auxiliary deep generative models (Maaløe et al. 2016, models/adgm.py): their labelled and unlabelled bounds
against a hand-written loop over samples and classes, a real run that learns digits from 2 labels per class,
save and reload, bad labels, and the CLI."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from test_cli import FAST, assert_clean_error, assert_png, vaelab
from test_m2 import check_posterior
from vaelab.data import load_dataset
from vaelab.data.semisupervised import select_labels
from vaelab.errors import ConfigError, VaelabError
from vaelab.evaluation import evaluate
from vaelab.models import build_model, from_pretrained, with_settings
from vaelab.models.adgm import ADGM, adgm_loss
from vaelab.training import fit

K = 3  # classes of the tiny models
MODELS = ["adgm", "sdgm"]


def _tiny(name: str, **kw) -> ADGM:
    torch.manual_seed(0)
    return build_model(model=name, input_shape=(1, 4, 4), condition_dim=K, hidden=(8,), latent_dim=2, aux_dim=3,
                       **kw).double()


def _batch():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(4, 1, 4, 4, generator=g, dtype=torch.float64)
    return x, torch.tensor([2, -1, 0, -1])  # two labelled samples, two with hidden labels


# ------------------------------------------------------------------------------------------ the bounds


def _log_normal(v, mean, logvar) -> torch.Tensor:
    return (-0.5 * (math.log(2 * math.pi) + logvar + (v - mean) ** 2 / logvar.exp())).sum()


def _gaussian(h) -> tuple[torch.Tensor, torch.Tensor]:
    mean, logvar = h.chunk(2, dim=-1)
    return mean, logvar


def _pair_net(net, *inputs) -> torch.Tensor:
    """A PairNet on one sample: its first layer as one matrix on the concatenated inputs, W [x; a; z; y] + b."""
    weights = [lin.weight for lin in (*net.sample, *net.pair)] + ([net.y.weight.t()] if net.y is not None else [])
    bias = next(lin.bias for lin in (*net.sample, *net.pair) if lin.bias is not None)
    return net.rest(torch.cat(weights, 1) @ torch.cat(inputs) + bias)


def _by_hand(model: ADGM, x, labels, out, alpha: float, beta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(loss, elbo) of Maaløe et al.'s eqs. 13-16 with Python loops over draws, samples and classes: one sample,
    one class at a time through the model's networks, each first layer as one linear map of the concatenated
    inputs; only the forward's noise (of a and of z) is reused."""
    skip = model.skip
    draws = out.class_logits.dim() == 3
    a_all = out.a if draws else out.a[None]
    z_all = out.z if draws else out.z[None]
    mean_z = out.posterior.mean if draws else out.posterior.mean[None]
    std_z = out.posterior.std if draws else out.posterior.std[None]
    eps_a = ((a_all - out.aux.mean) / out.aux.std).detach()  # (n, B, A)
    eps_z = ((z_all - mean_z) / std_z).detach()  # (n, P, L)

    linear = _pair_net
    losses, elbos = [], []
    for i in range(len(x)):
        xi = x[i].flatten()
        per_draw_loss, per_draw_elbo = [], []
        for s in range(len(eps_a)):
            mu_a, lv_a = _gaussian(model.aux_encoder(xi[None])[0])
            a = mu_a + (0.5 * lv_a).exp() * eps_a[s, i]
            log_qa = _log_normal(a, mu_a, lv_a)
            log_q = torch.log_softmax(linear(model.classifier, xi, a), 0)

            def neg_bound(y: int) -> tuple[torch.Tensor, torch.Tensor]:  # (recon + KLs - log p(y), weighted)
                j = int(((out.pair_row == i) & (out.pair_label == y)).nonzero())  # the pair (i, y) in the record
                onehot = F.one_hot(torch.tensor(y), K).double()
                mu_z, lv_z = _gaussian(linear(model.encoder, xi, a, onehot))
                z = mu_z + (0.5 * lv_z).exp() * eps_z[s, j]
                kl_z = 0.5 * (mu_z**2 + lv_z.exp() - 1 - lv_z).sum()
                into_a = [z, onehot] if skip else [xi, z, onehot]  # p(a|y,z) or p(a|x,y,z)
                mu_pa, lv_pa = _gaussian(linear(model.aux_decoder, *into_a))
                kl_a = log_qa - _log_normal(a, mu_pa, lv_pa)
                logits = model.decoder(torch.cat([z, onehot, a] if skip else [z, onehot])[None])[0]
                recon = F.binary_cross_entropy_with_logits(logits, x[i], reduction="sum")
                return recon + beta * (kl_z + kl_a) + math.log(K), recon + kl_z + kl_a + math.log(K)

            if labels[i] >= 0:
                y = int(labels[i])
                loss, neg_elbo = neg_bound(y)
                per_draw_loss.append(loss - alpha * log_q[y])
                per_draw_elbo.append(-neg_elbo)
            else:
                q = log_q.exp()
                parts = [neg_bound(y) for y in range(K)]
                entropy = -(q * log_q).sum()
                per_draw_loss.append(sum(q[y] * parts[y][0] for y in range(K)) - entropy)
                per_draw_elbo.append(-sum(q[y] * parts[y][1] for y in range(K)) + entropy)
        losses.append(torch.stack(per_draw_loss).mean())
        elbos.append(torch.stack(per_draw_elbo).mean())
    return torch.stack(losses), torch.stack(elbos)


@pytest.mark.parametrize("n_samples", [1, 3], ids=["one-draw", "three-draws"])
@pytest.mark.parametrize("name", MODELS)
def test_the_bounds_equal_a_loop_over_samples_and_classes(name, n_samples):
    model = _tiny(name)
    x, labels = _batch()
    torch.manual_seed(5)
    out = model(x, labels, n_samples=n_samples)
    terms = adgm_loss(x, out, alpha=0.7, beta=1.3)
    loss, elbo = _by_hand(model, x, labels, out, alpha=0.7, beta=1.3)
    assert terms["loss"].tolist() == pytest.approx(loss.tolist(), rel=1e-10, abs=1e-10)
    assert terms["elbo"].tolist() == pytest.approx(elbo.tolist(), rel=1e-10, abs=1e-10)
    # the gradients too: the vectorized sum's autograd path (scatter-add, q-weights, shared a) is the loop's
    grads = torch.autograd.grad(terms["loss"].sum(), list(model.parameters()))
    ref = torch.autograd.grad(loss.sum(), list(model.parameters()), allow_unused=True)
    for (pname, _), g, r in zip(model.named_parameters(), grads, ref):
        torch.testing.assert_close(g, torch.zeros_like(g) if r is None else r, rtol=1e-8, atol=1e-10, msg=pname)


@pytest.mark.parametrize("name", MODELS)
def test_the_reported_terms_of_a_mixed_batch(name):
    model = _tiny(name)
    x, labels = _batch()
    out = model(x, labels)
    t = model.loss(x, out)
    assert set(t) == {"loss", "recon", "kl", "kl_a", "elbo", "bce", "mse", "entropy", "classifier_nll", "error"}
    # the error is the classifier's at the mean of q(a|x): what classify() answers
    q = model.classify(x)
    wrong = (q.argmax(1) != labels).double()
    assert t["error"].tolist() == [2 * wrong[0].item(), 0.0, 2 * wrong[2].item(), 0.0]
    # a labelled sample's elbo is -(recon + kl + kl_a) - log p(y); its loss adds alpha * (-log q(y|a,x))
    nll = torch.log_softmax(out.class_logits, 1)[[0, 2], [2, 0]]
    assert t["classifier_nll"][[0, 2]].tolist() == pytest.approx((-2 * nll).tolist())
    labelled = -(t["recon"] + t["kl"] + t["kl_a"] + math.log(K))
    assert t["elbo"][[0, 2]].tolist() == pytest.approx(labelled[[0, 2]].tolist())
    alpha = model.settings.alpha
    assert (t["loss"] + t["elbo"])[[0, 2]].tolist() == pytest.approx((alpha * -nll).tolist())


def test_the_models_differ_in_where_a_is_generated():
    adgm, sdgm = _tiny("adgm"), _tiny("sdgm")
    # ADGM: p(a|x,y,z) reads the image; SDGM: p(a|y,z) does not, and its decoder reads a
    assert [lin.in_features for lin in adgm.aux_decoder.sample] == [16]
    assert [lin.in_features for lin in sdgm.aux_decoder.sample] == []
    assert adgm.decoder[0].in_features == 2 + K and sdgm.decoder[0].in_features == 2 + K + 3
    # SDGM's sample decodes at the mean of p(a|y,z): the same draw twice gives the same images
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    sdgm = sdgm.float()
    assert torch.equal(sdgm.sample(5, g(), condition=1), sdgm.sample(5, g(), condition=1))


@pytest.mark.parametrize("name", MODELS)
def test_use_without_a_label_takes_the_classifiers_class_at_the_mean_of_a(name):
    model = _tiny(name)
    x, _ = _batch()
    guess = model.classify(x).argmax(1).clone()  # a plain tensor (classify runs without gradients)
    torch.testing.assert_close(model.embed(x), model.embed(x, guess))
    torch.testing.assert_close(model.reconstruct(x), model.reconstruct(x, guess))
    torch.testing.assert_close(model.reconstruct(x, torch.tensor([-1, 0, -1, 1])),
                               model.reconstruct(x, torch.tensor([guess[0], 0, guess[2], 1])))
    torch.testing.assert_close(model.embed(x, F.one_hot(guess, K).double()), model.embed(x, guess))  # vectors too
    # classify() is q(y|a,x) at a = the mean of q(a|x), the forward's predict_logits
    torch.testing.assert_close(model.classify(x), torch.softmax(model(x).predict_logits, 1))


def _posterior_by_hand(model: ADGM, x, samples: int) -> torch.Tensor:
    """log p(y) + log (1/S) sum_s p(x|y,z_s[,a_s]) p(z_s) p(a_s|...) / (q(a_s|x) q(z_s|a_s,y,x)) for each sample
    and class, by loops over samples, classes and draws with Bernoulli pixels and the Gaussians written out; the
    noise drawn as posterior_logits draws it: a's (S, B, A), then z's (S, B, L) class by class."""
    skip, b = model.skip, len(x)
    eps_a = torch.randn(samples, b, 3, dtype=x.dtype)
    eps_z = [torch.randn(samples, b, 2, dtype=x.dtype) for _ in range(K)]
    logits = torch.zeros(b, K, dtype=x.dtype)
    for i in range(b):
        xi = x[i].flatten()
        mu_a, lv_a = _gaussian(model.aux_encoder(xi[None])[0])
        for y in range(K):
            onehot = F.one_hot(torch.tensor(y), K).double()
            log_w = []
            for s in range(samples):
                a = mu_a + (0.5 * lv_a).exp() * eps_a[s, i]
                mu_z, lv_z = _gaussian(_pair_net(model.encoder, xi, a, onehot))
                z = mu_z + (0.5 * lv_z).exp() * eps_z[y][s, i]
                mu_pa, lv_pa = _gaussian(_pair_net(model.aux_decoder, *([z, onehot] if skip else [xi, z, onehot])))
                decoded = model.decoder(torch.cat([z, onehot, a] if skip else [z, onehot])[None])[0]
                log_px = -F.binary_cross_entropy_with_logits(decoded, x[i], reduction="sum")
                zero = torch.zeros_like(z)
                log_w.append(log_px + _log_normal(z, zero, zero) + _log_normal(a, mu_pa, lv_pa)
                             - _log_normal(a, mu_a, lv_a) - _log_normal(z, mu_z, lv_z))
            logits[i, y] = torch.logsumexp(torch.stack(log_w), 0) - math.log(samples) - math.log(K)
    return logits


@pytest.mark.parametrize("samples", [1, 4])
@pytest.mark.parametrize("name", MODELS)
def test_posterior_logits_are_bayes_rule_on_the_importance_sampled_likelihood(name, samples):
    model = _tiny(name, posterior_samples=samples).eval()
    plain = with_settings(model, posterior_samples=0)
    x, labels = _batch()
    check_posterior(model, x, _posterior_by_hand, samples)
    # the eval forward's predict_logits, after its own draws
    torch.manual_seed(5)
    out = model(x, labels)
    torch.manual_seed(5)
    ref = plain(x, labels)  # the same draws of a and z: the setting changes no bound
    assert torch.equal(out.z, ref.z) and torch.equal(out.class_logits, ref.class_logits)
    torch.testing.assert_close(out.predict_logits, _posterior_by_hand(model, x, samples))
    wrong = (out.predict_logits.argmax(1) != labels)[labels >= 0].double()
    assert adgm_loss(x, out)["error"][labels >= 0].tolist() == (wrong * 2).tolist()  # scaled by B / labelled = 2
    # a hidden label's encoding and reconstruction take the class the posterior finds most probable
    torch.manual_seed(7)
    guess = model.classify(x).argmax(1)
    torch.manual_seed(7)
    torch.testing.assert_close(model.encode(x).mean, model.encode(x, guess).mean)
    torch.manual_seed(7)
    torch.testing.assert_close(model.reconstruct(x), model.reconstruct(x, guess))
    # training reads q(y|a,x) at the mean of q(a|x); without the setting, so does use
    model.train()
    torch.testing.assert_close(torch.softmax(model(x, labels).predict_logits, 1), plain.classify(x))
    torch.testing.assert_close(plain(x, labels).predict_logits, plain.class_logits(x, 0))


# ------------------------------------------------------------------------------------------ errors, saving


def test_bad_labels_and_settings_are_clear_errors():
    model = _tiny("adgm")
    x, _ = _batch()
    with pytest.raises(VaelabError, match=r"model 'adgm' takes labels as a 1-D tensor of 4 class indices"):
        model(x, torch.eye(K)[[0, 1, 2, 0]])
    with pytest.raises(VaelabError, match=r"class indices in \[0, 3\), or -1 for a hidden label; got values"):
        model(x, torch.tensor([0, 1, 3, -1]))
    with pytest.raises(VaelabError, match="model 'sdgm' decodes a given class"):
        _tiny("sdgm").decode(torch.zeros(2, 2, dtype=torch.float64))
    with pytest.raises(ConfigError, match=r"aux_dim=0 must be a positive integer"):
        build_model(model="adgm", input_shape=(1, 4, 4), condition_dim=K, aux_dim=0)
    with pytest.raises(ConfigError, match=r"supports arch auto / mlp"):
        build_model(model="sdgm", input_shape=(1, 8, 8), condition_dim=K, arch="conv")


@pytest.mark.parametrize("name", MODELS)
def test_save_and_reload_give_identical_outputs(name, tmp_path):
    model = _tiny(name).float().eval()
    model.save_pretrained(tmp_path / "m")
    loaded = from_pretrained(tmp_path / "m")
    assert type(loaded) is type(model) and loaded.config == model.config and loaded.settings.aux_dim == 3
    x, _ = _batch()
    x = x.float()
    assert torch.equal(loaded.classify(x), model.classify(x))
    assert torch.equal(loaded.embed(x), model.embed(x))
    assert torch.equal(loaded.reconstruct(x, torch.tensor([0, 1, 2, 0])), model.reconstruct(x, torch.tensor([0, 1, 2, 0])))
    g = lambda: torch.Generator().manual_seed(4)  # noqa: E731
    assert torch.equal(loaded.sample(6, g()), model.sample(6, g()))
    torch.manual_seed(7)
    a = model.loss(x, model(x, torch.tensor([1, -1, 0, -1])))["loss"]
    torch.manual_seed(7)
    b = loaded.loss(x, loaded(x, torch.tensor([1, -1, 0, -1])))["loss"]
    assert torch.equal(a, b)


# ------------------------------------------------------------------------------------------ real training


@pytest.mark.parametrize("name", MODELS)
def test_a_short_run_on_digits_learns_the_classes_from_2_labels_per_class(name):
    """20 labels of 1,617 digits: well below chance (90%) and below a 1-nearest-neighbour classifier of the same
    20 labelled images (33% here), so the unlabelled images taught the classifier."""
    digits = load_dataset("digits")
    keep = select_labels(digits.train.y, 20, seed=0, num_classes=10)  # the labels fit keeps with seed 0
    train_x, test_x = digits.train.to_float().flatten(1), digits.test.to_float().flatten(1)
    nearest = torch.cdist(test_x, train_x[keep]).argmin(1)
    baseline = (digits.train.y[keep][nearest] != digits.test.y).double().mean().item()
    torch.manual_seed(0)
    model = build_model(model=name, condition_dim=10, hidden=(64,), latent_dim=8, aux_dim=8,
                        input_shape=digits.train.sample_shape)
    history = fit(model, digits.train, digits.test, epochs=20, batch_size=64, labels=20, lr=3e-3, seed=0,
                  progress=False)
    errors = [row["val_error"] for row in history]
    assert errors[-1] < 0.3 and errors[-1] < baseline - 0.05 and errors[-1] < errors[0] - 0.5, (errors, baseline)
    metrics = evaluate(model, digits.test)
    predicted = model.classify(digits.test.to_float()).argmax(1)
    assert metrics["error"] == pytest.approx((predicted != digits.test.y).double().mean().item())
    assert metrics["elbo"] < 0 and math.isfinite(metrics["loss"]) and metrics["kl_a"] == metrics["kl_a"]


# ------------------------------------------------------------------------------------------ the CLI


@pytest.fixture(scope="module")
def adgm_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("adgm") / "run"
    vaelab("train", "--model", "adgm", "--labels", 50, "--epochs", 2, "--hidden", 32, "--latent-dim", 4,
           "--aux-dim", 4, "--out", out, *FAST, check=0)
    return out


def test_cli_train_writes_an_adgm_run(adgm_run):
    cfg = json.loads((adgm_run / "config.json").read_text())
    assert cfg["model"]["model"] == "adgm" and cfg["model"]["settings"]["aux_dim"] == 4
    assert cfg["train"]["labels"] == 50 and cfg["model"]["condition_dim"] == 10
    rows = [json.loads(line) for line in (adgm_run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and 0 <= rows[-1]["val_error"] <= 1 and "train_kl_a" in rows[-1]
    for name in ("samples.png", "analogies.png", "reconstructions.png"):
        assert_png(adgm_run / name)


def test_cli_evaluate_and_sample_an_adgm_run(adgm_run, tmp_path):
    proc = vaelab("evaluate", adgm_run, "--out", tmp_path / "e.json", check=0)
    assert "accuracy" in proc.stdout and "kl_a" in proc.stdout
    metrics = json.loads((tmp_path / "e.json").read_text())
    assert 0 <= metrics["error"] <= 1 and metrics["accuracy"] == pytest.approx(1 - metrics["error"])
    vaelab("evaluate", adgm_run, "--posterior-samples", 3, "--out", tmp_path / "p.json", check=0)
    judged = with_settings(from_pretrained(adgm_run), posterior_samples=3)  # re-judged by the posterior
    by_posterior = json.loads((tmp_path / "p.json").read_text())
    assert by_posterior["posterior_samples"] == 3
    assert by_posterior["error"] == evaluate(judged, load_dataset("digits").test)["error"]
    assert by_posterior["elbo"] == metrics["elbo"]  # the bound is the same; only the classifier changed
    state = torch.get_rng_state()
    again = evaluate(judged, load_dataset("digits").test)  # the posterior's draws come from the evaluation seed
    assert again["confusion"] == by_posterior["confusion"] and torch.equal(torch.get_rng_state(), state)
    proc = vaelab("sample", adgm_run, "--n", 6, "--out", tmp_path / "s.png", check=0)
    assert str(tmp_path / "s-analogies.png") in proc.stdout
    w, h = assert_png(tmp_path / "s.png")
    assert h > w * 1.2  # 10 rows (classes) of 6 samples
    vaelab("sample", adgm_run, "--label", 3, "--n", 4, "--out", tmp_path / "three.png", check=0)
    assert_png(tmp_path / "three.png", min_h=10)


def test_cli_refuses_what_an_adgm_cannot_do(tmp_path):
    assert_clean_error(vaelab("train", "--model", "sdgm", "--labels", 50, "--iw-samples", 3, "--epochs", 1,
                              "--out", tmp_path / "a", *FAST), "iw_samples=3")
    assert_clean_error(vaelab("train", "--model", "adgm", "--aux-dim", 0, "--out", tmp_path / "b", *FAST),
                       "aux_dim=0")
