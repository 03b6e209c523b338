"""M1+M2, the stacked semi-supervised model of Kingma, Rezende, Mohamed and Welling (2014), "Semi-supervised
learning with deep generative models", https://arxiv.org/abs/1406.5298, section 3.2.3 and Table 1.

M1 is a VAE of the images, p(x|z1) p(z1) with q(z1|x) (the networks of `arch`, `hidden`, `latent_dim` and the
`likelihood`, as `--model vae`). M2 (models/m2.py) is trained on M1's codes, as the paper does: each batch draws
z1 ~ q(z1|x) afresh and M2 models it, p(z1|y,z2) p(y) p(z2) with q(y|z1) and q(z2|z1,y), a Gaussian with a
learned scale per dimension on z1 (likelihood gaussian-learned), MLPs of `m2_hidden` units and latent `m2_latent`.
The classifier of the whole model is M2's q(y|z1) on M1's code.

With `m1_epochs` > 0 (the preset m1m2, as the paper) training runs in two stages in the one training loop, picked
by the epoch (`start_epoch`), so a run resumes in either: the first `m1_epochs` epochs train M1 alone (M1's
negative ELBO); the rest train M2 on codes of the frozen M1 (M1 runs without gradients; its weights stay as
stage 1 left them; only its encoder runs, since its decoding would feed only M1's terms, constants there, so
the loss and the logged training terms of that stage are M2's). With m1_epochs 0 (and outside the loop, a
model never given an epoch) both train at once: M1 on its ELBO, M2 on M1's codes, detached (M2's objective
never reaches M1).
The stages' other choices: `m1_batches` (M1's stage on the mixed batches of M2's or on uniform ones), `lr_span`
(one learning-rate schedule over the run, or one per stage as two models trained one after the other) and
`code_dims`: "active" feeds M2's inference networks (q(y|z1), q(z2|z1,y)) only the dimensions of the code that M1
uses, as Kingma et al.'s code does (the std of q(z1|x)'s mean over the images above 0.1, measured on the first
batch of M2's stage and kept in the weights as `code_mask`); the others are noise drawn from the prior, which the
classifier would otherwise see in training and not at test (where it reads the mean). p(z1|y,z2) still models
every dimension, so the stacked bound stays a bound on the whole code (any q is allowed).

Evaluation (eval mode) runs both: the terms of M1 (recon, kl, bce, mse of the images), M2's terms on the
sampled code (m2_recon, m2_kl, entropy, classifier_nll, error), and `elbo`, the bound of the stacked model
p(x|z1) p(z1|y,z2) p(y) p(z2) on log p(x, y) (log p(x) for a hidden label):
E[log p(x|z1) - log q(z1|x)] plus M2's bound on log p(z1, y). The classifier judges the mean of q(z1|x) in eval
mode (a sampled code in training): M2's q(y|z1), or with `posterior_samples` K M2's posterior p(y|z1). The model's
latent (`encode`, `embed`, `sample`, `decode`) is M2's z2; `decode(z2, y)` is M1's decoding of the mean of
p(z1|y,z2), so samples and analogies are images.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from vaelab.config import is_int, is_nonneg
from vaelab.errors import VaelabError
from vaelab.losses import (Likelihood, LearnedGaussian, Shaping, iwae_bound, log_normal_diag, recon_nll,
                           recon_nll_samples)
from vaelab.models.base import Autoencoder, Capabilities, DiagonalGaussian, ModelOutput, ModelSettings
from vaelab.models.collective import all_sum
from vaelab.models.m2 import M2, M2Output, m2_loss, posterior_samples_problems
from vaelab.models.registry import register
from vaelab.models.vae import VAE, vae_loss

CODE_LIKELIHOOD = LearnedGaussian()  # p(z1 | y, z2): M2's likelihood of M1's real-valued codes
M1_BATCHES = ("mixed", "uniform")  # M1's stage: the mixed batches of M2's, or uniform over the training images
LR_SPANS = ("run", "stage")  # the learning-rate schedule over the whole run, or afresh for each stage
CODE_DIMS = ("all", "active")  # the dimensions of M1's code M2's inference networks read
ACTIVE_STD = 0.1  # an active dimension: its mean under q(z1|x) varies over the images by more (Kingma et al.'s code)


@dataclass
class M1M2Output(ModelOutput):
    """The record of `M1M2.forward`. recon: M1's decoding of the images (K, B, ... with K samples), empty in M2's
    stage of training, where the frozen M1 is not decoded (m1.recon too); z and posterior:
    M2's z2 and q(z2|z1,y) over its (code, class) pairs, as in M2Output ((K, B, L2) with K samples and every label
    given), or M1's z1 and q(z1|x) while M1 trains alone; m1: M1's record (z = the codes z1 drawn from q(z1|x));
    m2: M2's record of those codes (None while M1 trains alone)."""

    m1: ModelOutput | None = None
    m2: M2Output | None = None

    def float(self) -> M1M2Output:
        return M1M2Output(recon=self.recon.float(), z=self.z.float(), posterior=self.posterior.float(),
                          m1=self.m1.float(), m2=None if self.m2 is None else self.m2.float())


@dataclass(frozen=True)
class M1M2Settings(ModelSettings):
    beta: float = field(default=1.0, metadata={"help": "weight of the KL term of M2's z2"})
    alpha: float = field(default=0.1, metadata={
        "help": "weight of the classifier's -log q(y|z1) on labelled images, in Kingma et al.'s units (see m2)"})
    m2_hidden: tuple[int, ...] = field(default=(500,), metadata={
        "help": "hidden layers of M2's networks (classifier, encoder, decoder), on M1's codes"})
    m2_latent: int = field(default=50, metadata={"help": "size of M2's latent z2"})
    m1_batches: str = field(default="uniform", metadata={"choices": M1_BATCHES,
        "help": "the batches of M1's stage with --labels N: uniform (every training image equally often, as the "
                "paper's M1, which sees no labels) or mixed (a quarter of every batch from the labelled images, "
                "as M2's stage)"})
    m1_epochs: int = field(default=0, metadata={
        "help": "epochs of the first stage, M1 alone; the others train M2 on the frozen M1's codes (0: both "
                "train together from the start, M2 on the codes of the M1 that learns beside it)"})
    code_dims: str = field(default="all", metadata={"choices": CODE_DIMS,
        "help": "the dimensions of M1's code that M2's inference networks (the classifier q(y|z1) and q(z2|z1,y)) "
                "read: all, or the active ones (with m1_epochs > 0: those whose mean under q(z1|x) has a standard "
                "deviation above 0.1 over the first batch of M2's stage, as Kingma et al.'s code keeps); "
                "p(z1|y,z2) models every dimension either way"})
    lr_span: str = field(default="run", metadata={"choices": LR_SPANS,
        "help": "the span of the learning-rate schedule (--lr-schedule) with m1_epochs > 0: the whole run, or "
                "each stage afresh (M1's epochs, then M2's, as two models trained one after the other)"})
    posterior_samples: int = field(default=0, metadata={
        "help": "how the trained model classifies an image, at the mean z1 of q(z1|x) (classify, the validation "
                "and evaluation error): 0 by M2's classifier q(y|z1); K >= 1 by M2's own posterior p(y|z1), "
                "proportional to p(y) p(z1|y), each log p(z1|y) importance-sampled from K draws of q(z2|z1,y)"})

    def problems(self, config) -> list[str]:
        out = []
        for name in ("beta", "alpha"):
            if not is_nonneg(getattr(self, name)):
                out.append(f"{name}={getattr(self, name)!r} must be a finite number >= 0")
        if not all(is_int(v) and v >= 1 for v in self.m2_hidden):
            out.append(f"m2_hidden={list(self.m2_hidden)!r} must be a list of positive integers")
        if not is_int(self.m2_latent) or self.m2_latent < 1:
            out.append(f"m2_latent={self.m2_latent!r} must be an integer >= 1 (the size of M2's latent z2)")
        if self.m1_batches not in M1_BATCHES:
            out.append(f"m1_batches={self.m1_batches!r} is unknown; choose 'mixed' or 'uniform' (the batches of "
                       "M1's stage)")
        if self.code_dims not in CODE_DIMS:
            out.append(f"code_dims={self.code_dims!r} is unknown; choose 'all' or 'active' (the dimensions of M1's "
                       "code M2's inference networks read)")
        elif self.code_dims == "active" and not self.m1_epochs:
            out.append("code_dims='active' picks the dimensions M1 uses when M2's stage begins, so it needs two "
                       "stages: set m1_epochs > 0")
        if self.lr_span not in LR_SPANS:
            out.append(f"lr_span={self.lr_span!r} is unknown; choose 'run' or 'stage' (the span of the "
                       "learning-rate schedule)")
        if not is_int(self.m1_epochs) or self.m1_epochs < 0:
            out.append(f"m1_epochs={self.m1_epochs!r} must be an integer >= 0 (the epochs M1 trains alone first; 0 "
                       "trains both together)")
        return out + posterior_samples_problems(self.posterior_samples)


def m1m2_loss(x, out: M1M2Output, *, likelihood: Likelihood | str = "bernoulli", sigma: float = 1.0,
              beta: float = 1.0, alpha: float = 0.1, labelled_weight: float = 1.0,
              target: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The objective of M1+M2, per sample: M1's negative ELBO (vae_loss), plus M2's semi-supervised objective
    (m2_loss) on the code z1 when M2 ran. Terms: M1's recon, kl, bce, mse; M2's m2_recon (-log p(z1|y,z2)),
    m2_kl, entropy, classifier_nll, error; elbo: the stacked model's bound (see the module's docstring), or
    M1's own where M2 did not run. In M2's stage of training M1 is frozen and not decoded (out.m1.recon is
    empty): its terms would be constants, so "loss" is M2's objective alone and M1's terms and `elbo` are left
    out. With K codes per image (out.m1.z is (K, B, L1)) M1's terms are its IWAE terms, M2's the means over the
    K codes, `elbo` the mean of the K stacked bounds and `iwae` their importance-weighted bound."""
    target = x if target is None else target
    decoded = out.m1.recon.numel() > 0
    m1 = vae_loss(x, out.m1, likelihood=likelihood, sigma=sigma, target=target) if decoded else {}
    if out.m2 is None:
        return m1
    z1, q1 = out.m1.z, out.m1.posterior
    k = z1.shape[0] if z1.dim() == q1.mean.dim() + 1 else None  # K codes per image, or one
    codes = z1.flatten(-len(q1.mean.shape[1:]))  # (B, L1) / (K, B, L1)
    m2 = m2_loss(codes.flatten(0, 1) if k else codes, out.m2, likelihood=CODE_LIKELIHOOD, beta=beta, alpha=alpha,
                 labelled_weight=labelled_weight)
    per_image = (lambda t: t.view(k, -1).mean(0)) if k else (lambda t: t)  # noqa: E731  the K codes' mean
    m2_terms = {"m2_recon": m2["recon"], "m2_kl": m2["kl"], "entropy": m2["entropy"],
                "classifier_nll": m2["classifier_nll"], "error": m2["error"]}
    if not decoded:
        return {name: per_image(t) for name, t in {"loss": m2["loss"], **m2_terms}.items()}
    log_q1 = log_normal_diag(codes, q1.mean.flatten(1), q1.logvar.flatten(1))  # (B,) / (K, B)
    recon1 = recon_nll_samples(target, out.m1.recon, likelihood, sigma) if k else m1["recon"]
    log_w = -recon1 - log_q1 + (m2["elbo"].view(k, -1) if k else m2["elbo"])  # the stacked bound of each code
    terms = {**m1, "loss": m1["loss"] + per_image(m2["loss"]), "elbo": log_w.mean(0) if k else log_w, **m2_terms}
    if k:
        terms["iwae"] = iwae_bound(log_w)
    return {name: per_image(t) if name in m2_terms and k else t for name, t in terms.items()}


@register("m1m2", description="Kingma et al. 2014's M1+M2: a VAE (M1) of the images, and the semi-supervised M2 "
                        "trained on its codes (--labels N keeps N labels); first M1 alone, then M2.")
class M1M2(Autoencoder):
    Settings = M1M2Settings
    capabilities = Capabilities(stochastic=True, samples=True, conditional=True, semi_supervised=True)
    objective = staticmethod(m1m2_loss)
    loss_options = frozenset({"labelled_bound"})  # M2's, on the codes
    term_meanings = {"m2_recon": "M2's -log p(z1|y,z2) of M1's code, nats",
                     "m2_kl": "M2's KL of q(z2|z1,y) to N(0, I), nats"}
    archs = tuple(a for a in VAE.archs if a != "conv-pool")
    custom_networks = False  # M1 is built here (models/nets.py's networks of arch), M2 is models/m2.py's
    partial_gradients = True  # a stage trains one of the two models: the other's parameters get no gradient

    def __init__(self, config):
        torch.nn.Module.__init__(self)
        self.config = config
        s = self.settings
        self.m1 = VAE(config.replace(model="vae", settings={}, condition_dim=0))
        codes = self.m1.latent_size
        self.m2 = M2(config.replace(model="m2", arch="mlp", input_shape=(codes,), hidden=tuple(s.m2_hidden),
                                    latent_dim=s.m2_latent, likelihood=CODE_LIKELIHOOD.name,
                                    settings={"beta": s.beta, "alpha": s.alpha}))
        self.latent_shape = (s.m2_latent,)
        # code_dims="active": 1 for a dimension M2's inference networks read, all 0 until measured; else None
        self.register_buffer("code_mask", torch.zeros(codes) if s.code_dims == "active" else None)
        self.stage: str | None = None  # "m1", "m2", or None: both (never given an epoch)

    def start_epoch(self, epoch: int) -> None:
        m1_epochs = self.settings.m1_epochs
        self.stage = None if not m1_epochs else "m1" if epoch < m1_epochs else "m2"

    def mixes_labels(self, epoch: int) -> bool:
        """M1's stage trains on uniform batches with m1_batches="uniform" (the default: it learns without labels)."""
        return not (self.settings.m1_batches == "uniform" and epoch < self.settings.m1_epochs)

    def schedule_span(self, epoch: int, epochs: int) -> tuple[int, int]:
        """With lr_span="stage", the learning-rate schedule runs over M1's epochs, then afresh over M2's."""
        m1_epochs = self.settings.m1_epochs
        if self.settings.lr_span == "run" or not m1_epochs:
            return 0, epochs
        return (0, m1_epochs) if epoch < m1_epochs else (m1_epochs, epochs)

    def training_problems(self, train) -> list[str]:
        out = super().training_problems(train)
        if self.settings.m1_epochs and self.settings.m1_epochs >= train.epochs:
            out.append(f"m1_epochs={self.settings.m1_epochs} leaves none of the {train.epochs} epochs to M2, which "
                       f"learns the classes; train for more epochs than m1_epochs (e.g. --epochs "
                       f"{2 * self.settings.m1_epochs})")
        return out

    def loss_weights(self, shaping: Shaping) -> dict:
        return {"likelihood": self.likelihood, "sigma": self.config.gaussian_sigma, "beta": self.settings.beta,
                "alpha": shaping.classifier_weight(self.settings.alpha), "labelled_weight": shaping.labelled_bound}

    @property
    def num_classes(self) -> int:
        return self.config.condition_dim

    # ----------------------------------------------------------------------------------------- training

    def forward(self, x: torch.Tensor, condition: torch.Tensor | None = None, n_samples: int = 1) -> M1M2Output:
        """M1 on x and, unless M1 trains alone, M2 on the code(s) it drew (n_samples codes per image).
        condition: (B,) class indices, -1 where a label is hidden; None = every label hidden."""
        labels = self.m2._labels(condition, len(x))
        if self.training and self.stage == "m1":
            out = self.m1(x, n_samples=n_samples)
            return M1M2Output(out.recon, out.z, out.posterior, m1=out)
        frozen = self.training and self.stage == "m2"
        if frozen:  # M1 without gradients: its code, drawn as its forward draws it; its decoding would only
            with torch.no_grad():  # feed M1's terms, constants in this stage (m1m2_loss leaves them out)
                q1 = self.m1.encode(x)
                z1 = q1.sample() if n_samples == 1 else q1.sample(n=n_samples)
            out = ModelOutput(recon=z1.new_empty(0), z=z1, posterior=q1)
        else:
            out = self.m1(x, n_samples=n_samples)
        codes = out.z.flatten(-len(self.m1.latent_shape)).detach()  # (B, L1) / (K, B, L1): M2's data
        if frozen and self.code_mask is not None and not self.code_mask.any():
            self._measure_active(out.posterior.mean.flatten(1))
        k = n_samples if n_samples > 1 else None
        seen = self._seen(codes)  # what M2's inference networks read; its p(z1|y,z2) models all of `codes`
        m2 = self.m2(seen.flatten(0, 1) if k else seen, labels.repeat(k) if k else labels)
        if not self.training:  # classify the code's mean, not a draw; in M1's stage (M2 untrained) by q(y|z1),
            mean = out.posterior.mean.flatten(1)  # which spares validation the posterior's K decodings per class
            logits = self.m2.class_logits(self._seen(mean), 0) if self.stage == "m1" else self._class_logits(mean)
            m2.class_logits = logits.repeat(k, 1) if k else logits
        z = m2.z.unflatten(0, (k, -1)) if k and len(m2.z) == len(codes.flatten(0, 1)) else m2.z
        return M1M2Output(out.recon, z, m2.posterior, m1=out, m2=m2)

    @torch.no_grad()
    def _measure_active(self, means: torch.Tensor) -> None:
        """Keep the dimensions of M1's code whose mean under q(z1|x) varies over the batch's images (`means`,
        (B, L1); the global batch under torchrun) with a standard deviation above ACTIVE_STD; every dimension
        when none does."""
        m = means.double()
        stats = all_sum(torch.cat([m.sum(0), m.pow(2).sum(0), m.new_tensor([len(m)])]))
        n = stats[-1]
        mean, square = stats[:m.shape[1]] / n, stats[m.shape[1]:-1] / n
        std = (square - mean.pow(2)).clamp(min=0).mul(n / (n - 1).clamp(min=1)).sqrt()
        active = std > ACTIVE_STD
        self.code_mask.copy_(active if active.any() else torch.ones_like(active))

    def _seen(self, codes: torch.Tensor) -> torch.Tensor:
        """M1's codes (..., L1) as M2's inference networks read them: the inactive dimensions zeroed with
        code_dims="active" once measured, else as they are."""
        if self.code_mask is None or not self.code_mask.any():
            return codes
        return codes * self.code_mask.to(codes.dtype)

    # -------------------------------------------------------------------------------------------- using

    def _mean_code(self, x: torch.Tensor) -> torch.Tensor:
        return self.m1.encode(x).mean.flatten(1)  # (B, L1) the mean of q(z1|x)

    def _class_logits(self, code: torch.Tensor) -> torch.Tensor:
        """The logits the model classifies by at M1's mean codes (B, L1): M2's q(y|z1), or with posterior_samples
        M2's posterior p(y|z1) (M2.posterior_logits: its encoder reads the code as `_seen`, p(z1|y,z2) all of it)."""
        return self.m2.class_logits(self._seen(code), self.settings.posterior_samples, target=code)

    def _classes(self, code: torch.Tensor, condition) -> torch.Tensor:
        """`condition` with every hidden label (-1; None: all) replaced by the class `classify` finds most probable
        at the mean codes `code`; (B, K) vectors as given."""
        if condition is not None and torch.as_tensor(condition).is_floating_point():
            return condition
        c = self.m2._labels(condition, len(code))
        if (c < 0).any():
            c = torch.where(c < 0, self._class_logits(code).argmax(1), c)
        return c

    def encode(self, x: torch.Tensor, condition: torch.Tensor | None = None) -> DiagonalGaussian:
        """q(z2 | z1, y) at the mean code z1 of x, y the given labels (or the most probable class, as `classify`
        judges it, where a label is hidden or none is given)."""
        code = self._mean_code(x)
        return self.m2.encode(self._seen(code), self._classes(code, condition))

    def posteriors(self, x: torch.Tensor, condition: torch.Tensor | None = None) -> dict[str, DiagonalGaussian]:
        return {"": self.encode(x, condition), "m1": self.m1.encode(x)}

    def decode_raw(self, z: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        """M1's decoder output of the mean code of p(z1 | y, z2)."""
        z1 = self.m2.decode(z, condition)
        return self.m1.decode_raw(z1.reshape(len(z1), *self.m1.latent_shape))

    def reconstruct_raw(self, x: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        """M1's decoder output through M2 at the posterior means, with the given labels or, where none is given,
        the most probable class, as `classify` judges it."""
        code = self._mean_code(x)
        condition = self._classes(code, condition)
        return self.decode_raw(self.m2.encode(self._seen(code), condition).mean, condition)

    def condition_vector(self, condition) -> torch.Tensor:
        """(B,) class indices -> one-hot (B, K); (B, K) vectors pass through (M2's condition)."""
        return self.m2.condition_vector(condition)

    @torch.no_grad()
    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """The class probabilities at the mean code of each input, (B, K): q(y|z1), or with posterior_samples
        M2's posterior p(y|z1)."""
        return torch.softmax(self._class_logits(self._mean_code(x.to(self._device()))), dim=1)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None,
               condition: torch.Tensor | None = None) -> torch.Tensor:
        """n images: y given (one class for all n, or n of them) or drawn from the uniform p(y), z2 ~ N(0, I),
        decoded by M1 at the mean code of p(z1|y,z2)."""
        if condition is None:
            device = generator.device if generator is not None else self._device()
            condition = torch.randint(self.num_classes, (n,), generator=generator, device=device)
        return super().sample(n, generator=generator, condition=condition)

    @property
    def noise_shape(self) -> tuple[int, ...]:
        return (self.m1.latent_size + self.latent_size,)

    def importance_sampler(self, x: torch.Tensor, condition: torch.Tensor | None = None):
        """Importance sampling of log p(x | y) through both models: z1 ~ q(z1|x), z2 ~ q(z2|z1,y), weights
        p(x|z1) p(z1|y,z2) p(z2) / (q(z1|x) q(z2|z1,y)). Needs the labels (evaluate passes the data's)."""
        if condition is None:
            raise VaelabError("model 'm1m2' scores log p(x | y): the importance-sampled likelihood needs the "
                              "labels of the data (evaluate a labelled split)")
        labels = self.m2._labels(condition, len(x))
        q1 = self.m1.encode(x)
        l1 = self.m1.latent_size

        def log_weights(eps: torch.Tensor) -> torch.Tensor:
            k, b = eps.shape[:2]
            z1 = q1.mean.flatten(1) + q1.std.flatten(1) * eps[..., :l1]  # (K, B, L1)
            y = labels.repeat(k)
            q2 = self.m2.encode(self._seen(z1.flatten(0, 1)), y)
            z2 = q2.mean + q2.std * eps[..., l1:].flatten(0, 1)  # (K*B, L2)
            log_p_z1 = -recon_nll(z1.flatten(0, 1), self.m2.decode_raw(z2, y), CODE_LIKELIHOOD)
            decoded = self.m1.decode_raw(z1.flatten(0, 1).view(k * b, *self.m1.latent_shape))
            log_p_x = -recon_nll(x.repeat(k, *[1] * (x.dim() - 1)), decoded, self.likelihood)
            log_w = (log_p_x + log_p_z1 + log_normal_diag(z2, event_dims=1) - log_normal_diag(z2, q2.mean, q2.logvar)
                     ).view(k, b)
            return log_w - log_normal_diag(z1, q1.mean.flatten(1), q1.logvar.flatten(1))

        return self.noise_shape, log_weights

    def anomaly_bounds(self, x: torch.Tensor, eps: torch.Tensor) -> dict[str, torch.Tensor]:
        raise VaelabError("model 'm1m2' has no anomaly scores of its bound; score anomalies with a model of the "
                          "images alone (--model vae)")


__all__ = ["M1M2", "M1M2Settings", "M1M2Output", "m1m2_loss"]
