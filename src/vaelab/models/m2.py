"""M2, the semi-supervised VAE of Kingma, Rezende, Mohamed and Welling (2014), "Semi-supervised learning with
deep generative models", https://arxiv.org/abs/1406.5298.

Generative model: y ~ Cat(1/K), z ~ N(0, I), x ~ p(x | y, z) (the decoder). Inference: the classifier q(y|x)
and the encoder q(z | x, y). A sample with a label trains the ELBO of (x, y) and the classifier's -log q(y|x);
a sample whose label is hidden sums the ELBO over every class, weighted by q(y|x), plus the entropy of q(y|x)
(losses.m2_loss). So the classifier learns from the unlabelled images too: through the generative model, it is
pulled toward the classes under which the decoder explains an image best.

Labels are class indices, -1 where a label is hidden; `forward(x)` without labels treats every label as hidden.
`encode`, `embed` and `reconstruct` without a label use the most probable class. A trained model classifies by
q(y|x), or with `posterior_samples` K by its generative model's own posterior p(y|x) ∝ p(y) p(x|y), each
log p(x|y) importance-sampled (`posterior_logits`); training never reads that setting. The networks are
MLPs with `hidden` layers (the config's `activation`, ReLU by default): the classifier, the encoder on [x, one-hot
y] and the decoder on [z, one-hot y], as in the paper and Pyro's SS-VAE example; with arch resnet, the residual
conv networks of models/resnet.py for the classifier, the encoder's image part and the decoder.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from vaelab.config import is_int, is_nonneg
from vaelab.errors import VaelabError
from vaelab.losses import (Likelihood, Shaping, iwae_bound, likelihood_of, log_importance_weights, pixel_metrics,
                           recon_nll, recon_nll_samples)
from vaelab.models.base import Capabilities, DiagonalGaussian, ModelOutput, ModelSettings
from vaelab.models import resnet
from vaelab.models.cvae import CVAE
from vaelab.models.nets import _dense, _init_like_keras, activation
from vaelab.models.registry import register


@dataclass
class M2Output(ModelOutput):
    """The record of `M2.forward`: the ModelOutput of every (sample, class) pair the objective needs, and the
    classifier's logits.

    A labelled sample makes one pair (itself, its label); a sample whose label is hidden makes K pairs, one per
    class. recon (P, ...) / (n, P, ...), z and posterior are over the P pairs: the labelled samples in batch
    order, then the hidden-label samples once per class, class-major. With every label given P = B and the
    pairs are the batch itself, in order: the record of any conditional VAE.
    """

    class_logits: torch.Tensor  # (B, K) logits of q(y|x)
    labels: torch.Tensor  # (B,) the class indices given, -1 where hidden
    pair_row: torch.Tensor  # (P,) the sample of each pair
    pair_label: torch.Tensor  # (P,) the class of each pair

    def float(self) -> M2Output:
        return M2Output(recon=self.recon.float(), z=self.z.float(), posterior=self.posterior.float(),
                        class_logits=self.class_logits.float(), labels=self.labels, pair_row=self.pair_row,
                        pair_label=self.pair_label)


@dataclass(frozen=True)
class M2Settings(ModelSettings):
    """M2's settings, which the auxiliary models (models/adgm.py) extend."""
    beta: float = field(default=1.0, metadata={"help": "weight of the KL term of z"})
    alpha: float = field(default=0.1, metadata={
        "help": "weight of the classifier's -log q(y|x) on labelled images, in Kingma et al.'s units (the term "
                "alpha * N * mean over the labelled images, N the training set's size; the paper uses 0.1)"})
    posterior_samples: int = field(default=0, metadata={
        "help": "how the trained model classifies (classify, the validation and evaluation error): 0 by the "
                "classifier q(y|x); K >= 1 by the model's own posterior p(y|x), proportional to p(y) p(x|y), "
                "each log p(x|y) importance-sampled from K draws of the inference model given y (q(z|x,y); the "
                "ADGM's q(a|x) q(z|a,y,x)), K decodings per input and class"})

    def problems(self, config) -> list[str]:
        out = []
        if not is_nonneg(self.beta):
            out.append(f"beta={self.beta!r} must be a finite number >= 0")
        if not is_nonneg(self.alpha):
            out.append(f"alpha={self.alpha!r} must be a finite number >= 0 (the classifier's weight in M2; "
                       "Kingma et al. use 0.1)")
        return out + posterior_samples_problems(self.posterior_samples)


def posterior_samples_problems(value) -> list[str]:
    if is_int(value) and value >= 0:
        return []
    return [f"posterior_samples={value!r} must be an integer >= 0 (0 classifies by q(y|x); K >= 1 by the model's "
            "posterior, from K importance samples per class, e.g. 20)"]


def weigh_labelled(bound: torch.Tensor, hidden: torch.Tensor, weight: float) -> torch.Tensor:
    """Each sample's -ELBO term (B,), the labelled samples' (hidden False) times `weight` (the loop's
    Shaping.labelled_bound); unchanged, the same tensor, for weight 1."""
    return bound if weight == 1.0 else torch.where(hidden, bound, weight * bound)


def m2_loss(x, out: M2Output, *, likelihood: Likelihood | str = "bernoulli",
            sigma: float = 1.0, beta: float = 1.0, alpha: float = 0.1, labelled_weight: float = 1.0,
            target: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The semi-supervised objective of M2 (Kingma et al. 2014, https://arxiv.org/abs/1406.5298, eqs. 6-9),
    per sample, with -ELBO(x, y) = L(x, y) = recon + KL - log p(y) and p(y) uniform over the K classes:

        labelled (x, y):   w * L(x, y) + alpha * (-log q(y|x))
        hidden label:      U(x) = sum_y q(y|x) L(x, y) - H(q(y|x))

    `out` (M2Output) holds the decoding of every (sample, class) pair these need: a labelled sample's
    once with its label, a hidden-label sample's once per class, with `pair_row` naming each pair's sample and
    `pair_label` its class. The sum over classes is then one weighted scatter-add over the pairs (index_add),
    not a loop over classes. `alpha` is the per-sample weight; the training loop derives it from the config's
    alpha in the paper's units (data/semisupervised.py, through the loop's Shaping). w = `labelled_weight`
    weighs a labelled sample's own bound: 1, or with TrainConfig.labelled_bound="paper" what makes an epoch count
    each labelled sample once (the loop's Shaping). `beta` weights the KL as in vae_loss; with K > 1 posterior
    samples per pair the IWAE bound replaces each pair's ELBO.

    Terms (B,): loss; elbo (the bound on log p(x, y), or on log p(x) for a hidden label); recon, kl, bce, mse
    (q-weighted over the classes for a hidden label); entropy of q(y|x); classifier_nll (-log q(y|x)) and error
    (1 when argmax q(y|x) is not y) of the labelled samples, scaled by B / (labelled samples in the batch) and 0
    for hidden labels, so that a batch's mean is the mean over its labelled samples: on a fully labelled split
    they are the plain per-sample values and the mean of `error` is the classifier's error rate.
    """
    target = x if target is None else target
    labels, row, cls = out.labels, out.pair_row, out.pair_label  # (B,) with -1 = hidden; (P,), (P,)
    log_q = F.log_softmax(out.class_logits, dim=1)  # (B, K) log q(y|x)
    q = log_q.exp()
    b, k = log_q.shape
    hidden = labels < 0
    post = out.posterior
    kl = post.kl()  # (P,)
    xt = target[row]  # (P, ...) each pair's image
    if out.recon.dim() == target.dim() + 1:  # K importance samples per pair: (K, P, ...)
        log_w = log_importance_weights(xt, out.recon, out.z, post.mean, post.logvar, likelihood, sigma)
        objective = -iwae_bound(log_w)
        recon = recon_nll_samples(xt, out.recon, likelihood, sigma).mean(0)
        first = out.recon[0]
    else:
        recon = recon_nll(xt, out.recon, likelihood, sigma)
        objective = recon + beta * kl
        first = out.recon
    log_py = -math.log(k)
    # each pair's weight in its sample's sum: 1 for a labelled sample's pair, q(y|x) for a hidden label's
    weight = torch.where(hidden[row], q[row, cls], torch.ones_like(kl))  # (P,)

    def per_sample(v: torch.Tensor) -> torch.Tensor:  # (P,) -> (B,), the weighted sum over a sample's pairs
        return torch.zeros(b, dtype=v.dtype, device=v.device).index_add(0, row, weight * v)

    entropy = -(q * log_q).sum(1)  # H(q(y|x))
    h = torch.where(hidden, entropy, 0.0)
    nll_y = torch.where(hidden, 0.0, -log_q.gather(1, labels.clamp(min=0)[:, None])[:, 0])
    scale = b / (~hidden).sum().clamp(min=1)  # reported terms: a batch's mean = its labelled samples' mean
    wrong = (out.class_logits.argmax(1) != labels) & ~hidden
    pixels = pixel_metrics(xt, first, likelihood)
    bound = per_sample(objective) - log_py  # L(x, y) of a labelled sample; sum_y q(y|x) L(x, y) of a hidden one
    bound = weigh_labelled(bound, hidden, labelled_weight)
    return {"loss": bound - h + alpha * nll_y, "recon": per_sample(recon),
            "kl": per_sample(kl), "elbo": -per_sample(recon + kl) + log_py + h, "bce": per_sample(pixels["bce"]),
            "mse": per_sample(pixels["mse"]), "entropy": entropy, "classifier_nll": nll_y.detach() * scale,
            "error": wrong.to(kl.dtype) * scale}


class PairEncoder(nn.Module):
    """The network of q(z | x, y) over (sample, class) pairs: an MLP on [x, one-hot y].

    Its first layer is linear in x and y, W [x; y] + b = (W_x x + b) + W_y y, so the image's part is computed
    once per sample and the class's column of W_y (an embedding of y) added per pair: a hidden label's K pairs
    cost one image-sized product, not K (on MNIST with 500 hidden units that is most of the encoder's work)."""

    def __init__(self, d: int, k: int, hidden: list[int], out: int, act: type[nn.Module],
                 x_net: nn.Module | None = None):
        super().__init__()
        sizes = [*hidden, out]
        # W_x x + b, or with arch resnet a residual trunk ending in that linear map (models/resnet.py)
        self.x = nn.Linear(d, sizes[0]) if x_net is None else x_net
        self.y = nn.Embedding(k, sizes[0])  # W_y^T: one row per class
        nn.init.xavier_uniform_(self.y.weight)  # Glorot, as the Linear layers (Keras' default)
        self.rest = nn.Sequential(*[m for a, b in zip(sizes[:-1], sizes[1:]) for m in (act(), nn.Linear(a, b))])

    def forward(self, x: torch.Tensor, rows: torch.Tensor, condition: torch.Tensor) -> torch.Tensor:
        """x (B, ...), rows (P,) indices into x, condition (P,) class indices or (P, K) vectors -> (P, out)."""
        h = self.x(x.flatten(1) if isinstance(self.x, nn.Linear) else x)[rows]  # (P, H)
        if condition.is_floating_point():  # (P, K) vectors: W_y c
            return self.rest(h + condition.to(self.y.weight.dtype) @ self.y.weight)
        return self.rest(h + self.y(condition))  # a one-hot y picks its class's row of the table


@register("m2", description="Semi-supervised VAE (Kingma et al. 2014's M2): a classifier q(y|x), q(z|x,y) and "
                      "p(x|y,z), trained on partly labelled data (--labels N keeps N labels).")
class M2(CVAE):
    Settings = M2Settings
    capabilities = Capabilities(stochastic=True, samples=True, conditional=True, semi_supervised=True)
    objective = staticmethod(m2_loss)
    loss_options = frozenset({"kl_schedule", "iw_samples", "labelled_bound"})
    iwae_options = frozenset({"labelled_bound"})  # the weight applies to a labelled sample's IWAE bound alike
    archs = ("auto", "mlp", "resnet")
    default_arch = "mlp"
    custom_networks = False  # builds its own networks (a classifier and a pair encoder)

    def __init__(self, config):
        nn.Module.__init__(self)  # its own networks (see PairEncoder), not models/nets.py's
        self.config = config
        shape = tuple(config.input_shape)
        d, k, latent = math.prod(shape), config.condition_dim, config.latent_dim
        hidden = list(config.hidden)
        self.latent_shape = (latent,)
        act = activation(config)
        if self.arch == "resnet":  # residual conv networks (models/resnet.py), initialised as PyTorch's defaults
            self.classifier = resnet.encoder(config, k)
            first = hidden[0] if hidden else 2 * latent  # the trunk's features, W_x x + b (see PairEncoder)
            self.encoder = PairEncoder(d, k, hidden, 2 * latent, act, x_net=resnet.encoder(config, first, hidden=()))
            self.decoder = resnet.decoder(config, latent + k)
            return
        self.classifier = nn.Sequential(nn.Flatten(), *_dense([d, *hidden], act),
                                        nn.Linear(hidden[-1] if hidden else d, k))
        self.encoder = PairEncoder(d, k, hidden, 2 * latent, act)  # mean and log-variance
        rev = hidden[::-1]
        raw = likelihood_of(config).raw_shape(shape)  # the likelihood's parameters per dimension
        self.decoder = nn.Sequential(*_dense([latent + k, *rev], act),
                                     nn.Linear(rev[-1] if rev else latent + k, math.prod(raw)), nn.Unflatten(1, raw))
        for net in (self.classifier, self.encoder, self.decoder):
            _init_like_keras(net)

    def loss_weights(self, shaping: Shaping) -> dict:
        return {"likelihood": self.likelihood, "sigma": self.config.gaussian_sigma,
                "beta": self.settings.beta * shaping.kl_scale, "alpha": shaping.classifier_weight(self.settings.alpha),
                "labelled_weight": shaping.labelled_bound}

    @property
    def num_classes(self) -> int:
        return self.config.condition_dim

    # ----------------------------------------------------------------------------------------- training

    def forward(self, x: torch.Tensor, condition: torch.Tensor | None = None, n_samples: int = 1) -> M2Output:
        """q(y|x) for every sample, and q(z|x,y), z and p(x|y,z)'s logits for every pair (see M2Output).
        condition: (B,) class indices, -1 where a label is hidden; None = every label hidden."""
        labels = self._labels(condition, len(x))
        logits = self.classifier(x)  # (B, K)
        k, hidden = self.num_classes, labels < 0
        rows = torch.arange(len(x), device=x.device)
        known, unknown = rows[~hidden], rows[hidden]
        # the enumeration over y, vectorized: every hidden-label sample once per class, class-major (K * U,)
        pair_row = torch.cat([known, unknown.repeat(k)])
        pair_label = torch.cat([labels[known], torch.arange(k, device=x.device).repeat_interleave(len(unknown))])
        post = self._gaussian(self.encoder(x, pair_row, pair_label))  # q(z|x,y) of every pair, (P, L)
        z, recon = self._sample_and_decode(post, pair_label, n_samples)
        if not self.training and self.settings.posterior_samples:  # the trained model classifies by its posterior
            logits = self.posterior_logits(x, self.settings.posterior_samples)
        return M2Output(recon=recon, z=z, posterior=post, class_logits=logits, labels=labels, pair_row=pair_row,
                        pair_label=pair_label)

    def _sample_and_decode(self, post: DiagonalGaussian, pair_label: torch.Tensor, n_samples: int):
        """z ~ q(z|x,y) and p(x|y,z)'s raw output for each pair: (P, L) and (P, ...), or (n, P, ...) with n > 1."""
        if n_samples == 1:
            z = post.sample()  # (P, L)
            return z, self.decode_raw(z, pair_label)
        z = post.sample(n=n_samples)  # (n, P, L): n importance samples per pair (the IWAE bound)
        recon = self.decode_raw(z.flatten(0, 1), pair_label.repeat(n_samples))
        return z, recon.unflatten(0, (n_samples, len(pair_label)))

    def posterior_logits(self, x: torch.Tensor, samples: int, target: torch.Tensor | None = None) -> torch.Tensor:
        """log p(y) plus the importance-weighted bound on log p(x|y) from `samples` draws of q(z|x,y), for every
        class: (B, K). Their softmax is the model's own posterior p(y|x) (Bayes' rule on its generative model,
        exact as `samples` grows), where q(y|x) is the network trained toward it. `target` (default x) is what
        p(x|y,z) scores, where the encoder reads another view of it (M1+M2's code with code_dims="active")."""
        target = x if target is None else target
        b, k = len(x), self.num_classes
        rows = torch.arange(b, device=x.device).repeat(k)
        classes = torch.arange(k, device=x.device).repeat_interleave(b)  # class-major pairs, (K * B,)
        post = self._gaussian(self.encoder(x, rows, classes))
        bounds = []
        for y in range(k):  # one class at a time: `samples` x B decodings in memory
            part = slice(y * b, (y + 1) * b)
            q = DiagonalGaussian(post.mean[part], post.logvar[part])
            z, recon = self._sample_and_decode(q, classes[part], samples)
            if samples == 1:
                z, recon = z[None], recon[None]
            log_w = log_importance_weights(target, recon, z, q.mean, q.logvar, self.likelihood,
                                           self.config.gaussian_sigma)
            bounds.append(iwae_bound(log_w))
        return torch.stack(bounds, 1) - math.log(k)

    def _labels(self, condition, n: int) -> torch.Tensor:
        """(n,) class indices, -1 where hidden, from None (all hidden) or a 1-D integer tensor."""
        k = self.num_classes
        if condition is None:
            return torch.full((n,), -1, dtype=torch.long, device=self._device())
        c = torch.as_tensor(condition, device=self._device())
        if c.is_floating_point() or c.dim() != 1 or len(c) != n:
            raise VaelabError(f"model {self.config.model!r} takes labels as a 1-D tensor of {n} class indices in "
                              f"[0, {k}) (-1 where a label is hidden); got shape {tuple(c.shape)} and dtype {c.dtype}")
        if len(c) and (c.min() < -1 or c.max() >= k):
            raise VaelabError(f"labels must be class indices in [0, {k}), or -1 for a hidden label; got values "
                              f"{c.unique()[:10].tolist()}")
        return c.long()

    # -------------------------------------------------------------------------------------------- using

    def _condition_of(self, x: torch.Tensor, condition) -> torch.Tensor:
        """The class of each input for use: (B, K) vectors as given, (B,) labels as given, and for a hidden label
        (-1) or no condition the most probable class, as `classify` judges it."""
        if condition is not None and torch.as_tensor(condition).is_floating_point():
            return self.condition_vector(condition)  # (B, K) vectors
        c = self._labels(condition, len(x))
        if (c < 0).any():
            c = torch.where(c < 0, self.class_logits(x, self.settings.posterior_samples).argmax(1), c)
        return c

    def encode(self, x: torch.Tensor, condition: torch.Tensor | None = None) -> DiagonalGaussian:
        """q(z | x, y) with y the given labels (or (B, K) vectors); a hidden label (-1) or no condition takes
        the most probable class, as `classify` judges it."""
        return self._gaussian(self.encoder(x, torch.arange(len(x), device=x.device), self._condition_of(x, condition)))

    def reconstruct_raw(self, x: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        """The decoding of the posterior mean of z, y as in `encode` (an unlabelled input: its most probable
        class, for both the encoder and the decoder)."""
        c = self._condition_of(x, condition)
        return self.decode_raw(self._gaussian(self.encoder(x, torch.arange(len(x), device=x.device), c)).mean, c)

    def condition_vector(self, condition) -> torch.Tensor:
        if condition is None:
            k = self.num_classes
            raise VaelabError(f"model {self.config.model!r} decodes a given class: pass labels in [0, {k}) or "
                              f"vectors of {k} values (e.g. `vaelab sample RUN --label 3`)")
        return super().condition_vector(condition)

    @torch.no_grad()
    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """The class probabilities of each input, (B, K): q(y|x), or with posterior_samples K the model's
        posterior p(y|x) from K importance samples per class (posterior_logits)."""
        return torch.softmax(self.class_logits(x.to(self._device()), self.settings.posterior_samples), dim=1)

    def class_logits(self, x: torch.Tensor, samples: int, target: torch.Tensor | None = None) -> torch.Tensor:
        """The logits a trained model classifies by, (B, K): q(y|x)'s with samples 0, else its posterior's from
        `samples` importance samples per class (posterior_logits; `target` as there)."""
        return self.posterior_logits(x, samples, target) if samples else self.classifier(x)

    @torch.no_grad()
    def sample(self, n: int, generator: torch.Generator | None = None,
               condition: torch.Tensor | None = None) -> torch.Tensor:
        """n draws of the generative model, decoded: y given (one class for all n, or n of them), or drawn from
        p(y) (uniform), and z ~ N(0, I)."""
        if condition is None:
            device = generator.device if generator is not None else self._device()
            condition = torch.randint(self.num_classes, (n,), generator=generator, device=device)
        return super().sample(n, generator=generator, condition=condition)
