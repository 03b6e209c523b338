"""M2, the semi-supervised VAE (Kingma et al. 2014): its objective against a hand-written sum over classes, the
balanced label selection, the mixed batches of the one training loop, a real run on digits, and the CLI."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest
import torch

from test_cli import FAST, assert_clean_error, assert_png, vaelab
from vaelab.config import ModelConfig, TrainConfig
from vaelab.data import ArrayDataset, load_dataset
from vaelab.data.semisupervised import MixedBatches, mixed_batches, select_labels
from vaelab.errors import ConfigError, DataError, VaelabError
from vaelab.evaluation import evaluate, loss_terms
from vaelab.generation import analogies
from vaelab.losses import recon_nll
from vaelab.models import build_model
from vaelab.models.m2 import m2_loss
from vaelab.models.m2 import M2
from vaelab.training import fit

REPO = Path(__file__).resolve().parents[1]
K = 3  # classes of the tiny models


def _tiny(**kw) -> M2:
    torch.manual_seed(0)
    return build_model(model="m2", input_shape=(1, 4, 4), condition_dim=K, hidden=(8,), latent_dim=2, **kw).double()


def _batch():
    g = torch.Generator().manual_seed(1)
    x = torch.rand(4, 1, 4, 4, generator=g, dtype=torch.float64)
    return x, torch.tensor([2, -1, 0, -1])  # two labelled samples, two with hidden labels


# ------------------------------------------------------------------------------------------ the objective


def _by_hand(model: M2, x, labels, out, alpha: float) -> torch.Tensor:
    """The M2 objective of Kingma et al. (eqs. 6, 7, 9) with a Python loop over the classes, one sample and one
    class at a time: each pair re-encoded and re-decoded on its own, reusing only the forward's noise eps."""
    eps = ((out.z - out.posterior.mean) / out.posterior.std).detach()  # (P, L) or (n, P, L)
    log_q = torch.log_softmax(model.classifier(x), dim=1)
    losses = []
    for i in range(len(x)):
        def neg_elbo(y: int) -> torch.Tensor:  # -ELBO(x_i, y) = recon + KL - log p(y), or the IWAE bound's
            j = int(((out.pair_row == i) & (out.pair_label == y)).nonzero())  # the pair (i, y) in the record
            post = model.encode(x[i:i + 1], torch.tensor([y]))
            e = eps[..., j, :]
            if e.dim() == 1:  # one sample: the ELBO with the closed-form KL
                z = post.mean[0] + post.std[0] * e
                recon = recon_nll(x[i:i + 1], model.decode_raw(z[None], torch.tensor([y])), "bernoulli")[0]
                return recon + post.kl()[0] + math.log(K)
            log_w = []
            for e_s in e:  # K importance samples: log p(x|z) + log p(z) - log q(z|x, y)
                z = post.mean[0] + post.std[0] * e_s
                recon = recon_nll(x[i:i + 1], model.decode_raw(z[None], torch.tensor([y])), "bernoulli")[0]
                log_pz = -0.5 * (z**2 + math.log(2 * math.pi)).sum()
                log_qz = -0.5 * (e_s**2 + math.log(2 * math.pi) + post.logvar[0]).sum()
                log_w.append(-recon + log_pz - log_qz)
            return -(torch.logsumexp(torch.stack(log_w), 0) - math.log(len(e))) + math.log(K)

        if labels[i] >= 0:
            y = int(labels[i])
            losses.append(neg_elbo(y) - alpha * log_q[i, y])
        else:
            q = log_q[i].exp()
            total = sum(q[y] * neg_elbo(y) for y in range(K))
            losses.append(total + (q * log_q[i]).sum())  # minus the entropy H(q(y|x))
    return torch.stack(losses)


@pytest.mark.parametrize("n_samples", [1, 3], ids=["elbo", "iwae3"])
def test_the_enumerated_objective_equals_a_loop_over_classes(n_samples):
    model = _tiny()
    x, labels = _batch()
    out = model(x, labels, n_samples=n_samples)
    terms = m2_loss(x, out, alpha=0.7)
    expected = _by_hand(model, x, labels, out, alpha=0.7)
    torch.testing.assert_close(terms["loss"], expected, rtol=1e-10, atol=1e-10)
    # and the gradients: the vectorized sum's autograd path (scatter-add, q-weights) is the loop's
    grads = torch.autograd.grad(terms["loss"].sum(), list(model.parameters()))
    ref = torch.autograd.grad(expected.sum(), list(model.parameters()))
    for a, b in zip(grads, ref):
        torch.testing.assert_close(a, b, rtol=1e-8, atol=1e-10)


@pytest.mark.parametrize("n_samples", [1, 3], ids=["elbo", "iwae3"])
def test_the_labelled_weight_scales_only_the_labelled_samples_bound(n_samples):
    """labelled_weight w: a labelled sample's loss is w * L(x, y) + alpha * (-log q(y|x)), a hidden label's U(x) is
    unchanged; w = 1 is the objective itself, bit for bit."""
    model = _tiny()
    x, labels = _batch()
    out = model(x, labels, n_samples=n_samples)
    plain, weighted = m2_loss(x, out, alpha=0.7), m2_loss(x, out, alpha=0.7, labelled_weight=0.25)
    assert torch.equal(m2_loss(x, out, alpha=0.7, labelled_weight=1.0)["loss"], plain["loss"])
    classifier = 0.7 * plain["classifier_nll"] / 2  # the reported term is scaled by B / labelled = 2
    expected = torch.where(labels >= 0, 0.25 * (plain["loss"] - classifier) + classifier, plain["loss"])
    torch.testing.assert_close(weighted["loss"], expected, rtol=0, atol=1e-12)
    for name in ("elbo", "recon", "kl", "entropy", "classifier_nll", "error"):  # what it reports is unweighted
        assert torch.equal(weighted[name], plain[name]), name


@pytest.mark.parametrize("name, extra", [("m2", {}), ("adgm", {"aux_dim": 2}), ("sdgm", {"aux_dim": 2}),
                                         ("m1m2", {"m2_hidden": (6,), "m2_latent": 2})])
def test_every_semi_supervised_model_weighs_its_labelled_bound_as_the_loop_asks(name, extra):
    """The Shaping's labelled_bound reaches each model's objective: hidden-label samples' losses unchanged, a
    labelled sample's lower by (1 - w) times its own -ELBO of the labelled pair (M2's, on M1's code in m1m2)."""
    from vaelab.losses import Shaping

    torch.manual_seed(0)
    model = build_model(model=name, input_shape=(1, 4, 4), condition_dim=K, hidden=(8,), latent_dim=2, beta=1.0,
                        **extra).double()
    x, labels = _batch()
    torch.manual_seed(3)
    out = model(x, labels)
    plain, weighted = model.loss(x, out), model.loss(x, out, shaping=Shaping(labelled_bound=0.25))
    own = plain["m2_recon"] + plain["m2_kl"] + math.log(K) if name == "m1m2" else -plain["elbo"]
    hidden = labels < 0
    assert torch.equal(weighted["loss"][hidden], plain["loss"][hidden])
    torch.testing.assert_close(weighted["loss"][~hidden], plain["loss"][~hidden] - 0.75 * own[~hidden],
                               rtol=0, atol=1e-12)


def test_the_reported_terms_of_a_mixed_batch():
    model = _tiny()
    x, labels = _batch()
    out = model(x, labels)
    t = m2_loss(x, out, alpha=0.0)
    q = model.classify(x)
    # elbo is -(loss) without the classifier term: the bound on log p(x, y), or on log p(x) for a hidden label
    torch.testing.assert_close(t["elbo"], -t["loss"])
    torch.testing.assert_close(t["entropy"], -(q * q.log()).sum(1))
    # error and classifier_nll count the 2 labelled samples only, scaled so the batch mean is their mean
    wrong = (q.argmax(1) != labels).double()
    assert t["error"].tolist() == [2 * wrong[0].item(), 0.0, 2 * wrong[2].item(), 0.0]
    assert t["error"].mean() == pytest.approx(wrong[[0, 2]].mean().item())
    nll = -q.log()[[0, 2], [2, 0]]
    assert t["classifier_nll"].mean() == pytest.approx(nll.mean().item())


def test_forward_makes_one_pair_per_label_and_one_per_class_for_a_hidden_label():
    model = _tiny()
    x, labels = _batch()
    out = model(x, labels)
    # the labelled samples 0 and 2 once, then samples 1 and 3 once per class, class-major
    assert out.pair_row.tolist() == [0, 2, 1, 3, 1, 3, 1, 3]
    assert out.pair_label.tolist() == [2, 0, 0, 0, 1, 1, 2, 2]
    assert out.recon.shape == (8, 1, 4, 4) and out.z.shape == (8, 2) and out.class_logits.shape == (4, K)
    # all labels given: the pairs are the batch in order, a conditional VAE's record; none: every class
    full = model(x, torch.tensor([2, 1, 0, 0]))
    assert full.pair_row.tolist() == [0, 1, 2, 3] and full.recon.shape == x.shape
    assert model(x).pair_row.tolist() == [0, 1, 2, 3] * K
    with pytest.raises(VaelabError, match=r"class indices in \[0, 3\), or -1"):
        model(x, torch.tensor([0, 1, 3, -1]))
    with pytest.raises(VaelabError, match="1-D tensor of 4 class indices"):
        model(x, torch.eye(K)[[0, 1, 2, 0]])


def test_encoding_without_a_label_uses_the_classifier():
    model = _tiny()
    x, _ = _batch()
    guess = model.classify(x).argmax(1).clone()  # a plain tensor (classify runs in inference mode)
    torch.testing.assert_close(model.embed(x), model.embed(x, guess))
    torch.testing.assert_close(model.embed(x, torch.tensor([-1, 0, -1, 1])),
                               model.embed(x, torch.tensor([guess[0], 0, guess[2], 1])))
    # the split first layer equals one linear layer on [x, one-hot y]
    enc = model.encoder
    y = torch.nn.functional.one_hot(guess, K).double()
    h = torch.cat([x.flatten(1), y], 1) @ torch.cat([enc.x.weight, enc.y.weight.t()], 1).t() + enc.x.bias
    torch.testing.assert_close(model.encode(x, guess).mean, enc.rest(h).chunk(2, 1)[0])
    torch.testing.assert_close(model.encode(x, y).mean, model.encode(x, guess).mean)  # vectors as well
    # reconstructing an unlabelled input decodes with the class it was encoded with
    assert torch.equal(model.reconstruct(x), model.reconstruct(x, guess))
    assert torch.equal(model.reconstruct(x, torch.tensor([-1, 0, -1, 1])),
                       model.reconstruct(x, torch.tensor([guess[0], 0, guess[2], 1])))


@pytest.mark.parametrize("name, extra", [("m2", {}), ("adgm", {"aux_dim": 2}), ("sdgm", {"aux_dim": 2}),
                                         ("m1m2", {"m2_hidden": (6,), "m2_latent": 2})])
def test_unlabelled_data_is_evaluated_with_every_label_hidden(name, extra):
    """evaluate on data without labels: the bound of hidden labels (as labels of -1 give it), no classifier
    error to report, the reconstructions of the classes the classifier picks."""
    digits = load_dataset("digits").test
    torch.manual_seed(0)
    model = build_model(model=name, input_shape=digits.sample_shape, condition_dim=10, hidden=(8,), latent_dim=2,
                        **extra)
    unlabelled = ArrayDataset(digits.x, None, digits.scale)
    hidden = ArrayDataset(digits.x, torch.full((len(digits),), -1), digits.scale)
    report = evaluate(model, unlabelled)
    assert report["elbo"] == loss_terms(model, hidden)["elbo"] and math.isfinite(report["psnr"])
    assert not {"error", "accuracy", "confusion", "classifier_nll"} & set(report)


def _posterior_by_hand(model: M2, x, samples: int) -> torch.Tensor:
    """log p(y) + log (1/S) sum_s p(x|y,z_s) p(z_s) / q(z_s|x,y) for each class, with Bernoulli pixels and the
    Gaussians written out, drawing the noise as posterior_logits does: (S, B, L) per class, class by class."""
    columns = []
    for y in range(K):
        c = torch.full((len(x),), y)
        post = model.encode(x, c)
        eps = torch.randn(samples, *post.mean.shape, dtype=x.dtype)
        z = post.mean + post.std * eps  # (S, B, L)
        logits = torch.stack([model.decode_raw(z[s], c) for s in range(samples)]).flatten(2)
        log_px = -torch.nn.functional.binary_cross_entropy_with_logits(
            logits, x.flatten(1).expand_as(logits), reduction="none").sum(2)
        log_pz = (-0.5 * z ** 2 - 0.5 * math.log(2 * math.pi)).sum(2)
        log_qz = (-0.5 * eps ** 2 - 0.5 * post.logvar - 0.5 * math.log(2 * math.pi)).sum(2)
        columns.append(torch.logsumexp(log_px + log_pz - log_qz, 0) - math.log(samples) - math.log(K))
    return torch.stack(columns, 1)


def check_posterior(model, x, by_hand, samples: int) -> None:
    """posterior_logits equal `by_hand`(model, x, samples) drawing the same noise, and classify is their softmax:
    what the trained model classifies by."""
    torch.manual_seed(3)
    logits = model.posterior_logits(x, samples)
    torch.manual_seed(3)
    torch.testing.assert_close(logits, by_hand(model, x, samples))
    assert logits.shape == (len(x), model.num_classes)
    torch.manual_seed(3)
    torch.testing.assert_close(model.classify(x), torch.softmax(logits, 1))


@pytest.mark.parametrize("samples", [1, 4])
def test_posterior_logits_are_bayes_rule_on_the_importance_sampled_likelihood(samples):
    model = _tiny(posterior_samples=samples).eval()
    x, labels = _batch()
    check_posterior(model, x, _posterior_by_hand, samples)
    # the eval forward's logits (after its pairs' one draw)
    torch.manual_seed(5)
    out = model(x, labels)
    torch.manual_seed(5)
    model._gaussian(model.encoder(x, out.pair_row, out.pair_label)).sample()
    torch.testing.assert_close(out.class_logits, _posterior_by_hand(model, x, samples))
    terms = m2_loss(x, out, alpha=0.1)
    wrong = (out.class_logits.argmax(1) != labels)[labels >= 0].double()
    assert terms["error"][labels >= 0].tolist() == (wrong * 2).tolist()  # scaled by B / labelled = 2
    # a hidden label's encoding takes the class the posterior finds most probable
    torch.manual_seed(7)
    guess = model.classify(x).argmax(1)
    torch.manual_seed(7)
    torch.testing.assert_close(model.encode(x).mean, model.encode(x, guess).mean)
    # training reads q(y|x): the classifier's logits, with or without the setting
    model.train()
    torch.testing.assert_close(model(x, labels).class_logits, model.classifier(x))
    plain = _tiny().eval()
    torch.testing.assert_close(plain(x, labels).class_logits, plain.classifier(x))
    torch.testing.assert_close(plain.classify(x), torch.softmax(plain.classifier(x), 1))


@pytest.mark.parametrize("name", ["m2", "m1m2", "adgm", "sdgm"])
def test_posterior_samples_is_checked(name):
    for bad in (-1, 2.5, "20"):
        with pytest.raises(ConfigError, match=rf"posterior_samples={bad!r} must be an integer >= 0 \(0 classifies "
                                              r"by q\(y\|x\); K >= 1 by the model's posterior"):
            build_model(model=name, input_shape=(1, 4, 4), condition_dim=K, posterior_samples=bad)
    assert build_model(model=name, input_shape=(1, 4, 4), condition_dim=K,
                       posterior_samples=5).settings.posterior_samples == 5
    with pytest.raises(ConfigError, match=r"posterior_samples=5 is not a setting of model 'cvae'; its settings are "
                                          r"\['beta'"):
        build_model(model="cvae", input_shape=(1, 4, 4), condition_dim=K, posterior_samples=5)


def test_sampling_draws_the_class_from_the_prior_or_takes_one():
    model = _tiny().float()
    g = lambda: torch.Generator().manual_seed(3)  # noqa: E731
    assert torch.equal(model.sample(5, g()), model.sample(5, g()))
    z = torch.randn(5, 2, generator=g())
    torch.testing.assert_close(model.sample(5, g(), condition=1), model.decode(z, torch.full((5,), 1)))
    frames = analogies(model, torch.rand(2, 1, 4, 4))  # no labels: the classifier's guesses
    assert frames.shape == (2, K, 1, 4, 4)


# ------------------------------------------------------------------------------------------ label selection


def _y(per_class: int = 30, k: int = 10) -> torch.Tensor:
    return torch.arange(k).repeat(per_class)[torch.randperm(per_class * k, generator=torch.Generator().manual_seed(0))]


def test_label_selection_is_balanced_and_reproducible():
    y = _y()
    keep = select_labels(y, 100, seed=0)
    assert len(keep) == 100 and len(set(keep.tolist())) == 100
    assert Counter(y[keep].tolist()) == {c: 10 for c in range(10)}  # exactly N/10 per class
    assert torch.equal(keep, select_labels(y, 100, seed=0))  # same seed, same indices
    assert not torch.equal(keep, select_labels(y, 100, seed=1))  # another seed, another draw
    odd = select_labels(y, 105, seed=0)  # N % K != 0: 5 classes get one more
    assert sorted(Counter(y[odd].tolist()).values()) == [10] * 5 + [11] * 5


def test_infeasible_label_counts_are_clear_errors():
    y = _y(per_class=3)
    with pytest.raises(DataError, match=r"labels=5 cannot be balanced over the 10 classes.*labels >= 10"):
        select_labels(y, 5, seed=0)
    with pytest.raises(DataError, match="labels=31 is more than the 30 samples"):
        select_labels(y, 31, seed=0)
    few_sevens = torch.tensor([c for c in range(10) for _ in range(2 if c == 7 else 5)])
    with pytest.raises(DataError, match=r"needs 3 labelled samples of class 7, but the training set holds 2"):
        select_labels(few_sevens, 30, seed=0)
    with pytest.raises(ConfigError, match="labels=0 must be a positive integer"):
        select_labels(y, 0, seed=0)
    with pytest.raises(ConfigError, match="labels=-1 must be an integer >= 0"):
        TrainConfig(labels=-1).validate()
    with pytest.raises(ConfigError, match="alpha=-1 must be a finite number >= 0"):
        ModelConfig(model="m2", condition_dim=10, alpha=-1).validate()


def test_mixed_batches_visit_every_unlabelled_sample_once_and_cycle_the_labelled():
    y = _y()  # 300 samples
    keep = select_labels(y, 20, seed=0)
    mb = MixedBatches(y, keep, batch_size=32, share=0.1)
    assert (mb.n_labelled, mb.n_unlabelled) == (3, 29)  # 10% of a batch labelled
    assert MixedBatches(y, keep, batch_size=32).n_labelled == 8  # by default a quarter
    assert MixedBatches(y, select_labels(y, 200, seed=0), batch_size=32).n_labelled == 21  # 2/3 are labelled
    assert torch.equal(mb.labels[keep], y[keep]) and (mb.labels >= 0).sum() == 20
    order = mb.epoch_order(torch.Generator().manual_seed(0))
    assert len(order) == mb.epoch_length == 280 + mb.steps * 3
    batches = order.split(32)
    assert len(batches) == mb.steps == math.ceil(280 / 29)
    for b in batches:  # each batch: its unlabelled samples, then 3 labelled ones
        assert (mb.labels[b[:-3]] == -1).all() and (mb.labels[b[-3:]] >= 0).all()
    unlabelled = torch.cat([b[:-3] for b in batches])
    assert sorted(unlabelled.tolist()) == mb.unlabelled.tolist()  # each exactly once
    assert set(torch.cat([b[-3:] for b in batches]).tolist()) == set(keep.tolist())  # cycled through all
    assert torch.equal(order, mb.epoch_order(torch.Generator().manual_seed(0)))
    # the per-sample classifier weight reproduces the paper's alpha * N over an epoch, in expectation:
    # steps * n_labelled draws of weight w equal alpha * N per labelled mean (up to the last batch's share)
    w = mb.classifier_weight(0.1)
    assert w * (280 / 29) * 3 == pytest.approx(0.1 * 300)
    # the weight of a labelled sample's bound with labelled_bound="paper": an epoch's 30 visits (10 steps of 3)
    # weigh as the 20 labelled samples once each
    assert mb.steps * mb.n_labelled == 30 and mb.labelled_bound_weight() == 20 / 30


def test_labels_need_a_semi_supervised_model_and_labelled_data():
    digits = load_dataset("digits")
    vae = build_model(model="vae", arch="mlp", input_shape=digits.train.sample_shape)
    with pytest.raises(ConfigError, match="model 'vae' cannot learn from unlabelled samples; use --model m2"):
        fit(vae, digits.train, None, epochs=1, labels=50, progress=False)
    m2 = build_model(model="m2", condition_dim=10, input_shape=(1, 4, 4))
    small = ArrayDataset(torch.zeros(30, 1, 4, 4, dtype=torch.uint8), _y(per_class=3))
    assert mixed_batches(m2, small, 0, 0, 8) is None  # labels=0: every label kept
    assert mixed_batches(m2, small, 30, 0, 8) is None  # all of them: nothing is hidden
    assert len(mixed_batches(m2, small, 10, 0, 8).unlabelled) == 20
    with pytest.raises(DataError, match="has none"):
        mixed_batches(m2, ArrayDataset(small.x), 10, 0, 8)


@pytest.mark.parametrize("share, per_batch, steps", [(None, 16, 33), (0.1, 6, 28)])
def test_the_training_loop_hides_all_but_the_kept_labels(monkeypatch, share, per_batch, steps):
    digits = load_dataset("digits")
    torch.manual_seed(0)
    model = build_model(model="m2", condition_dim=10, hidden=(16,), latent_dim=4, input_shape=digits.train.sample_shape)
    seen = []
    forward = model.forward
    monkeypatch.setattr(model, "forward", lambda x, c=None, n_samples=1: seen.append(c.clone()) or forward(x, c))
    # fp32: precision auto's timed steps would pass through forward too
    fit(model, digits.train, None, epochs=1, batch_size=64, labels=50, seed=4, progress=False, precision="fp32",
        **({} if share is None else {"labelled_share": share}))
    given = torch.cat(seen)
    assert all((c >= 0).sum() == per_batch and (c < 0).any() for c in seen)  # every step sees both kinds
    assert (given < 0).sum() == len(digits.train) - 50  # each unlabelled sample once
    # by default 16 labelled a batch (a quarter of 64), cycled through the 5 kept labels per class: 33 * 16 = 528
    # draws are 10 full passes over the 50 and 28 more, so every class comes 50 to 55 times; with a share of 0.1,
    # 6 a batch (64 * 0.1 rounded), 28 * 6 = 168 draws: 3 passes and 18 more, 15 to 20 times a class
    per_class = Counter(given[given >= 0].tolist())
    passes = steps * per_batch // 50
    assert len(seen) == steps and per_class.total() == steps * per_batch
    assert all(5 * passes <= v <= 5 * (passes + 1) for v in per_class.values())
    with pytest.raises(ConfigError, match=r"labelled_share=1 must be a number between 0 and 1, both excluded"):
        TrainConfig(labels=50, labelled_share=1).validate()


def test_labelled_bound_paper_gives_the_loss_the_weight_that_counts_each_labelled_bound_once_an_epoch():
    """labelled_bound="paper": the loop's Shaping carries MixedBatches' weight, and the model's loss applies it
    (the loss of a step equals the objective with that labelled_weight); refused without labels, and by a
    model whose loss has no labelled bound."""
    digits = load_dataset("digits")
    torch.manual_seed(0)
    model = build_model(model="m2", condition_dim=10, hidden=(16,), latent_dim=4, input_shape=digits.train.sample_shape)
    seen, loss = [], model.loss
    model.loss = lambda x, out, **kw: seen.append((x, out, kw["shaping"])) or loss(x, out, **kw)  # what the loop passes
    fit(model, digits.train, None, epochs=1, batch_size=64, labels=50, seed=4, progress=False, precision="fp32",
        labelled_share=0.1, labelled_bound="paper")
    # 1,567 unlabelled images, 58 a batch: 28 steps of 6 labelled, 168 visits of the 50 labelled images
    assert len(seen) == 28
    x, out, shaping = seen[-1]
    assert shaping.labelled_bound == 50 / 168
    terms = model.loss(x, out, shaping=shaping)
    expected = m2_loss(x, out, alpha=shaping.classifier_weight(0.1), labelled_weight=50 / 168)
    assert torch.equal(terms["loss"], expected["loss"])
    with pytest.raises(ConfigError, match=r"labelled_bound='paper' weighs the labelled samples among hidden-label "
                                          r"ones, but labels=0 keeps every label; set labels=N"):
        TrainConfig(labelled_bound="paper").validate()
    with pytest.raises(ConfigError, match=r"labelled_bound='epoch' is unknown; choose one of \['batch', 'paper'\]"):
        TrainConfig(labels=50, labelled_bound="epoch").validate()
    vae = build_model(model="vae", input_shape=(64,))
    assert vae.training_problems(TrainConfig(labels=50, labelled_bound="paper")) == [
        "labelled_bound='paper' does not apply to model 'vae': its loss (vae_loss) does not use it; drop it"]


# ------------------------------------------------------------------------------------------ real training


def test_a_short_run_on_digits_learns_the_classes_from_50_labels():
    digits = load_dataset("digits")
    torch.manual_seed(0)
    model = build_model(model="m2", condition_dim=10, hidden=(64,), latent_dim=8, input_shape=digits.train.sample_shape)
    history = fit(model, digits.train, digits.test, epochs=20, batch_size=64, labels=50, lr=3e-3, progress=False)
    errors = [row["val_error"] for row in history]
    assert errors[-1] < 0.35 and errors[-1] < errors[0] - 0.2, errors  # chance is 0.9
    metrics = evaluate(model, digits.test)
    predicted = model.classify(digits.test.to_float()).argmax(1)
    assert metrics["error"] == pytest.approx((predicted != digits.test.y).double().mean().item())
    assert metrics["accuracy"] == pytest.approx(1 - metrics["error"])
    assert metrics["elbo"] < 0 and math.isfinite(metrics["loss"])
    # where it errs: the confusion of the same predictions, counted by hand
    truth = digits.test.y.long()
    counts = [[int(((truth == t) & (predicted == p)).sum()) for p in range(10)] for t in range(10)]
    assert metrics["confusion"] == counts and sum(map(sum, counts)) == len(truth)
    assert metrics["class_error"] == [(sum(counts[c]) - counts[c][c]) / sum(counts[c]) for c in range(10)]
    off = sorted(((n, t, p) for t, row in enumerate(counts) for p, n in enumerate(row) if t != p and n),
                 key=lambda c: -c[0])[:3]
    assert [m["count"] for m in metrics["most_confused"]] == [n for n, _, _ in off]
    assert all(counts[m["true"]][m["predicted"]] == m["count"] and m["true"] != m["predicted"]
               for m in metrics["most_confused"])


def test_the_ddp_path_trains_m2_with_hidden_labels(tmp_path):
    worker = tmp_path / "worker.py"
    worker.write_text(
        "import sys, torch\n"
        "from vaelab.data import load_dataset\nfrom vaelab.models import build_model\nfrom vaelab.training import fit\n"
        "torch.manual_seed(0)\ndigits = load_dataset('digits')\n"
        "model = build_model(model='m2', condition_dim=10, hidden=(16,), latent_dim=4, "
        "input_shape=digits.train.sample_shape)\n"
        "fit(model, digits.train, digits.test, epochs=2, batch_size=64, labels=50, progress=False, out=sys.argv[1])\n")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(REPO / "src")] + [p for p in [env.get("PYTHONPATH")] if p])
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2",
                           str(worker), str(tmp_path / "run")], env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and 0 <= rows[-1]["val_error"] <= 1 and math.isfinite(rows[-1]["train_loss"])
    assert rows[-1]["step"] == 2 * math.ceil((len(load_dataset("digits").train) - 50) / 48)  # global batches


# ------------------------------------------------------------------------------------------ the CLI


@pytest.fixture(scope="module")
def m2_run(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("m2") / "run"
    vaelab("train", "--model", "m2", "--labels", 50, "--epochs", 3, "--hidden", 32, "--latent-dim", 4,
           "--out", out, *FAST, check=0)
    return out


def test_cli_train_writes_an_m2_run(m2_run):
    cfg = json.loads((m2_run / "config.json").read_text())
    assert cfg["model"]["model"] == "m2" and cfg["model"]["settings"]["alpha"] == 0.1 and cfg["train"]["labels"] == 50
    assert cfg["model"]["arch"] == "auto" and cfg["model"]["condition_dim"] == 10
    rows = [json.loads(line) for line in (m2_run / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and "val_error" in rows[-1] and "train_entropy" in rows[-1]
    for name in ("samples.png", "analogies.png", "reconstructions.png"):
        assert_png(m2_run / name)


def test_cli_evaluate_reports_the_classifier(m2_run, tmp_path):
    proc = vaelab("evaluate", m2_run, "--out", tmp_path / "e.json", check=0)
    assert "accuracy" in proc.stdout and "error" in proc.stdout
    metrics = json.loads((tmp_path / "e.json").read_text())
    assert 0 <= metrics["error"] <= 1 and metrics["accuracy"] == pytest.approx(1 - metrics["error"])
    counts = torch.tensor(metrics["confusion"])
    assert counts.shape == (10, 10) and int(counts.sum()) == metrics["n"]
    assert int(counts.sum() - counts.trace()) == round(metrics["error"] * metrics["n"])  # q(y|x) draws nothing
    worst = metrics["most_confused"][0]
    assert f"most confused (true -> predicted): {worst['true']} -> {worst['predicted']} {worst['count']} times" \
        in proc.stdout
    shares = ["-" if e is None else f"{100 * e:.2f}" for e in metrics["class_error"]]
    assert "  error per class (%): " + "  ".join(f"{c}: {e}" for c, e in enumerate(shares)) + "\n" in proc.stdout


def test_cli_sample_draws_the_class_grid_and_the_analogies(m2_run, tmp_path):
    proc = vaelab("sample", m2_run, "--n", 6, "--out", tmp_path / "s.png", check=0)
    assert str(tmp_path / "s.png") in proc.stdout and str(tmp_path / "s-analogies.png") in proc.stdout
    w, h = assert_png(tmp_path / "s.png")
    aw, ah = assert_png(tmp_path / "s-analogies.png")
    assert h > w * 1.2 and aw > ah  # 10 rows of 6 samples; 8 rows of input + 10 classes
    proc = vaelab("sample", m2_run, "--label", 3, "--n", 4, "--out", tmp_path / "three.png", check=0)
    assert "analogies" not in proc.stdout


def test_cli_refuses_impossible_label_counts(tmp_path):
    assert_clean_error(vaelab("train", "--model", "m2", "--labels", 5, "--epochs", 1, "--out", tmp_path / "a", *FAST),
                       "labels=5", ">= 10")
    assert_clean_error(vaelab("train", "--model", "vae", "--labels", 50, "--epochs", 1, "--out", tmp_path / "b",
                              *FAST), "cannot learn from unlabelled samples", "--model m2")
    assert_clean_error(vaelab("train", "--model", "m2", "--arch", "conv", "--out", tmp_path / "c", *FAST),
                       "supports arch auto / mlp")
