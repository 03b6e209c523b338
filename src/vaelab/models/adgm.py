"""The auxiliary deep generative model (ADGM) and the skip deep generative model (SDGM) of Maaløe, Sønderby,
Sønderby and Winther (2016), "Auxiliary Deep Generative Models", https://arxiv.org/abs/1602.05473.

M2 (models/m2.py) with an auxiliary latent variable a that makes the inference model richer:

    inference   q(a|x) q(y|a,x) q(z|a,y,x)
    ADGM        p(y) p(z) p(x|y,z) p(a|x,y,z)       (a is generated last: the decoder of x is M2's)
    SDGM        p(y) p(z) p(a|y,z) p(x|a,y,z)       (a is a stochastic layer between (y, z) and x)

Because q(y|a,x) and q(z|a,y,x) see a sample of a, the marginal q(y, z|x) = E_q(a|x)[q(y|a,x) q(z|a,y,x)] is
no longer a product of simple densities; the paper credits this for beating M2 by an order of magnitude on
MNIST with 100 labels (0.96% ADGM, 1.32% SDGM, its Table 1). The bounds (the paper's eqs. 13-16):

    labelled    -L(x,y) = E_{q(a|x) q(z|a,y,x)}[log p(x,y,a,z) - log q(a|x) - log q(z|a,y,x)]
    hidden      -U(x)   = E_{q(a|x)}[sum_y q(y|a,x) (-L(x,y,a)) + H(q(y|a,x))]

with y enumerated exactly, vectorized as in M2: every hidden-label sample once per class (M2Output's pairs), the
sample's a shared by its K pairs. A labelled sample adds alpha * (-log q(y|a,x)) at the same sampled a.

Use (classify, val_error, evaluate's error, encode / embed / reconstruct without a label): q(y|x) is taken as
q(y|a,x) at a = the mean of q(a|x), one deterministic pass (the paper's classifier draws a; the mean spares
the noise of one draw, and a test set's error needs no averaging over draws). With `posterior_samples` K >= 1
the trained model classifies instead by its generative model's own posterior p(y|x), proportional to p(y) p(x|y),
each p(x|y) importance-sampled from K draws of q(a|x) q(z|a,y,x) (`posterior_logits`), as M2 does; training
always reads q(y|a,x). The networks are MLPs with
`hidden` layers (the config's `activation`, ReLU by default), each first layer split per input as in M2's
PairEncoder, so a per-sample input (x, a) costs one product per sample and not one per class.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from vaelab.errors import VaelabError
from vaelab.losses import (Likelihood, iwae_bound, kl_standard_normal_dims, likelihood_of, log_importance_weights,
                           log_normal_diag, pixel_metrics, recon_nll_samples)
from vaelab.models.base import Capabilities, DiagonalGaussian
from vaelab.models.m2 import M2, M2Output, M2Settings, weigh_labelled
from vaelab.models.nets import _dense, _init_like_keras, activation
from vaelab.models.registry import register


@dataclass
class ADGMOutput(M2Output):
    """The record of `ADGM.forward`: M2's pairs (see M2Output) with the auxiliary variable.

    With n draws per sample (forward(..., n_samples=n > 1)) every draw-dependent tensor has a leading (n, ...)
    dim: a, class_logits, recon, z, the pairs' posterior and prior_a. `predict_logits` is q(y|a,x) at the mean
    of q(a|x), without gradient: what the model's classifier answers (the reported error); out of training with
    posterior_samples K, the posterior's logits (ADGM.posterior_logits)."""

    a: torch.Tensor  # (B, A) the draw of a ~ q(a|x) of each sample
    aux: DiagonalGaussian  # q(a|x), (B, A)
    prior_a: DiagonalGaussian  # p(a|x,y,z) (ADGM) or p(a|y,z) (SDGM) of each pair, (P, A)
    predict_logits: torch.Tensor  # (B, K) q(y|a,x) at a = the mean of q(a|x), or the posterior's

    def float(self) -> ADGMOutput:
        return ADGMOutput(recon=self.recon.float(), z=self.z.float(), posterior=self.posterior.float(),
                          class_logits=self.class_logits.float(), labels=self.labels, pair_row=self.pair_row,
                          pair_label=self.pair_label, a=self.a.float(), aux=self.aux.float(),
                          prior_a=self.prior_a.float(), predict_logits=self.predict_logits.float())


@dataclass(frozen=True)
class ADGMSettings(M2Settings):
    beta: float = field(default=1.0, metadata={"help": "weight of the KL terms of z and of a (a warm-up "
                                                       "schedule scales both)"})
    aux_dim: int = field(default=100, metadata={"help": "size of the auxiliary variable a (ADGM / SDGM; "
                                                        "Maaløe et al. use 100)"})

    def problems(self, config) -> list[str]:
        out = super().problems(config)
        if not (isinstance(self.aux_dim, int) and not isinstance(self.aux_dim, bool) and self.aux_dim >= 1):
            out.append(f"aux_dim={self.aux_dim!r} must be a positive integer (the size of the auxiliary variable "
                       "a; Maaløe et al. use 100)")
        return out


def adgm_loss(x, out: ADGMOutput, *, likelihood: Likelihood | str = "bernoulli", sigma: float = 1.0,
              beta: float = 1.0, alpha: float = 0.1, labelled_weight: float = 1.0,
              target: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """The semi-supervised bounds of the ADGM / SDGM (Maaløe et al. 2016, eqs. 13-16; see the module's
    docstring), per sample, from one draw of a and of z per pair (n draws: their mean, an n-sample Monte Carlo
    estimate of the same bound):

        labelled (x, y):   w * L(x, y, a) + alpha * (-log q(y|a,x))
        hidden label:      sum_y q(y|a,x) L(x, y, a) - H(q(y|a,x))
        L(x, y, a) = recon + beta * (KL(q(z|a,y,x) || p(z)) + log q(a|x) - log p(a|...)) - log p(y)

    The KL of z is in closed form given a; a's term is the one-draw estimate. `alpha`, `beta` and w =
    `labelled_weight` reach it as in m2_loss (the loop's Shaping). Terms (B,) as m2_loss's (loss, elbo, recon,
    kl (of z), bce, mse, entropy, classifier_nll, error), plus kl_a; entropy and classifier_nll at the drawn a,
    error at the mean of q(a|x).
    """
    target = x if target is None else target
    labels, row, cls = out.labels, out.pair_row, out.pair_label  # (B,) with -1 = hidden; (P,), (P,)
    draws = out.class_logits.dim() == 3

    def lead(t: torch.Tensor) -> torch.Tensor:  # a leading draw dim (n, ...) on every draw-dependent tensor
        return t if draws else t[None]

    log_q = F.log_softmax(lead(out.class_logits), dim=-1)  # (n, B, K) log q(y|a,x)
    q = log_q.exp()
    n, b, k = log_q.shape
    hidden = labels < 0
    xt = target[row]  # (P, ...) each pair's image
    recon_raw = lead(out.recon)  # (n, P, ...)
    recon = recon_nll_samples(xt, recon_raw, likelihood, sigma)  # (n, P) -log p(x | ...)
    post = out.posterior  # q(z|a,y,x) of each pair
    kl_z = lead(kl_standard_normal_dims(post.mean, post.logvar).sum(-1))  # (n, P)
    a = lead(out.a)  # (n, B, A)
    log_qa = log_normal_diag(a, out.aux.mean, out.aux.logvar, event_dims=1)  # (n, B) log q(a|x)
    log_pa = log_normal_diag(a[:, row], lead(out.prior_a.mean), lead(out.prior_a.logvar), event_dims=1)  # (n, P)
    kl_a = log_qa[:, row] - log_pa  # (n, P)
    # each pair's weight in its sample's sum: 1 for a labelled sample's pair, q(y|a,x) for a hidden label's
    weight = torch.where(hidden[row], q[:, row, cls], torch.ones_like(kl_a))  # (n, P)

    def per_sample(v: torch.Tensor) -> torch.Tensor:  # (n, P) -> (B,): the weighted sum over a sample's pairs,
        return torch.zeros(n, b, dtype=v.dtype, device=v.device).index_add(1, row, weight * v).mean(0)  # draw mean

    entropy = -(q * log_q).sum(-1)  # (n, B) H(q(y|a,x))
    h = torch.where(hidden, entropy, 0.0).mean(0)
    nll_y = torch.where(hidden, 0.0, -log_q.gather(-1, labels.clamp(min=0)[None, :, None].expand(n, b, 1))[..., 0])
    nll_y = nll_y.mean(0)  # (B,)
    log_py = -math.log(k)
    scale = b / (~hidden).sum().clamp(min=1)  # reported terms: a batch's mean = its labelled samples' mean
    wrong = (out.predict_logits.argmax(1) != labels) & ~hidden
    pixels = pixel_metrics(xt, recon_raw[0], likelihood)
    first = {key: torch.zeros(b, dtype=v.dtype, device=v.device).index_add(0, row, weight[0] * v)
             for key, v in pixels.items()}  # the first draw's, q-weighted over the classes
    kl, ka = per_sample(kl_z), per_sample(kl_a)
    rec = per_sample(recon)
    bound = rec + beta * (kl + ka) - log_py  # L(x, y, a) of a labelled sample; its q-weighted sum of a hidden one
    bound = weigh_labelled(bound, hidden, labelled_weight)
    return {"loss": bound - h + alpha * nll_y, "recon": rec, "kl": kl, "kl_a": ka,
            "elbo": -(rec + kl + ka) + log_py + h, "bce": first["bce"], "mse": first["mse"],
            "entropy": entropy.mean(0), "classifier_nll": nll_y.detach() * scale, "error": wrong.to(kl.dtype) * scale}


class PairNet(nn.Module):
    """An MLP over (sample, class) pairs whose first layer is a sum of linear maps, one per input: per-sample
    inputs (x, a: computed once per sample, then picked per pair), per-pair inputs (z) and the class (an
    embedding, as in M2's PairEncoder). Equal to one linear layer on the concatenation, at a hidden label's
    cost of one image-sized product per sample rather than K. Inputs may carry leading draw dims (n, ...)."""

    def __init__(self, sample_dims: list[int], pair_dims: list[int], k: int, hidden: list[int], out: int,
                 act: type[nn.Module]):
        super().__init__()
        sizes = [*hidden, out]
        first = sizes[0]
        # one bias, on the first map (a per-sample input's when there is one)
        self.sample = nn.ModuleList(nn.Linear(d, first, bias=i == 0) for i, d in enumerate(sample_dims))
        self.pair = nn.ModuleList(nn.Linear(d, first, bias=i == 0 and not sample_dims) for i, d in enumerate(pair_dims))
        self.y = nn.Embedding(k, first) if k else None  # W_y^T: one row per class
        self.rest = nn.Sequential(*[m for a, b in zip(sizes[:-1], sizes[1:]) for m in (act(), nn.Linear(a, b))])
        for m in (*self.sample, *self.pair, *([self.y] if k else [])):  # Glorot, as models/nets.py's layers
            nn.init.xavier_uniform_(m.weight)
            if getattr(m, "bias", None) is not None:
                nn.init.zeros_(m.bias)
        _init_like_keras(self.rest)

    def forward(self, per_sample: list[torch.Tensor], rows: torch.Tensor, per_pair: tuple = (),
                labels: torch.Tensor | None = None) -> torch.Tensor:
        """per_sample: (..., B, D_i) each; rows (P,) indices into B; per_pair (..., P, D_j) each; labels (P,)
        class indices or (P, K) vectors -> (..., P, out)."""
        h = sum(lin(t) for lin, t in zip(self.sample, per_sample))[..., rows, :] if per_sample else 0  # (..., P, H)
        for lin, t in zip(self.pair, per_pair):
            h = h + lin(t)
        if labels is not None:
            h = h + (labels.to(self.y.weight.dtype) @ self.y.weight if labels.is_floating_point() else self.y(labels))
        return self.rest(h)


@register("adgm", description="Auxiliary deep generative model (Maaløe et al. 2016): M2 with an auxiliary "
                              "variable a, q(a|x) q(y|a,x) q(z|a,y,x) and p(x|y,z) p(a|x,y,z); semi-supervised "
                              "(--labels N keeps N labels).")
class ADGM(M2):
    """The ADGM: a is generated from (x, y, z), the decoder of x is M2's p(x|y,z)."""

    Settings = ADGMSettings
    capabilities = Capabilities(stochastic=True, samples=True, conditional=True, semi_supervised=True)
    objective = staticmethod(adgm_loss)
    loss_options = frozenset({"kl_schedule", "labelled_bound"})  # no importance-weighted bound: iw_samples is refused
    term_meanings = {"kl_a": "the auxiliary variable's term of the bound, log q(a|x) - log p(a|...) at the drawn "
                             "a (one-draw estimate; its mean is a KL), nats; kl is z's"}
    archs = ("auto", "mlp")
    default_arch = "mlp"
    skip = False  # SDGM: x is generated from a as well, and a from (y, z)

    def __init__(self, config):
        nn.Module.__init__(self)  # its own networks
        self.config = config
        shape = tuple(config.input_shape)
        d, k, latent, aux = math.prod(shape), config.condition_dim, config.latent_dim, self.settings.aux_dim
        hidden = list(config.hidden)
        rev = hidden[::-1]
        self.latent_shape = (latent,)
        act = activation(config)
        self.aux_encoder = nn.Sequential(*_dense([d, *hidden], act), nn.Linear(hidden[-1] if hidden else d, 2 * aux))
        self.classifier = PairNet([d, aux], [], 0, hidden, k, act)  # q(y|a,x)
        self.encoder = PairNet([d, aux], [], k, hidden, 2 * latent, act)  # q(z|a,y,x): mean and log-variance
        raw = likelihood_of(config).raw_shape(shape)  # the likelihood's parameters per dimension
        into_x = latent + k + (aux if self.skip else 0)  # p(x|y,z) or p(x|a,y,z) on [z, one-hot y(, a)]
        self.decoder = nn.Sequential(*_dense([into_x, *rev], act),
                                     nn.Linear(rev[-1] if rev else into_x, math.prod(raw)), nn.Unflatten(1, raw))
        # p(a|y,z) (SDGM) or p(a|x,y,z) (ADGM)
        self.aux_decoder = PairNet([] if self.skip else [d], [latent], k, rev, 2 * aux, act)
        for net in (self.aux_encoder, self.decoder):
            _init_like_keras(net)

    # ----------------------------------------------------------------------------------------- training

    def forward(self, x: torch.Tensor, condition: torch.Tensor | None = None, n_samples: int = 1) -> ADGMOutput:
        """a ~ q(a|x) and q(y|a,x) for every sample; q(z|a,y,x), z, p(a|...) and p(x|...)'s raw output for every
        pair (M2's layout, see M2Output). condition: (B,) class indices, -1 where hidden; None = all hidden."""
        labels = self._labels(condition, len(x))
        xf = x.flatten(1)  # (B, D)
        aux = self._gaussian(self.aux_encoder(xf))  # q(a|x), (B, A)
        a = aux.sample() if n_samples == 1 else aux.sample(n=n_samples)  # (B, A) or (n, B, A)
        rows = torch.arange(len(x), device=x.device)
        logits = self.classifier([xf, a], rows)  # (..., B, K) q(y|a,x)
        k, hidden = self.num_classes, labels < 0
        known, unknown = rows[~hidden], rows[hidden]
        # the enumeration over y, vectorized: every hidden-label sample once per class, class-major (K * U,)
        pair_row = torch.cat([known, unknown.repeat(k)])
        pair_label = torch.cat([labels[known], torch.arange(k, device=x.device).repeat_interleave(len(unknown))])
        post = self._gaussian(self.encoder([xf, a], pair_row, labels=pair_label), dim=-1)  # (..., P, L)
        z = post.sample()
        prior_a = self._gaussian(self.aux_decoder([] if self.skip else [xf], pair_row, (z,), pair_label), dim=-1)
        recon = self._decode_pairs(z, pair_label, a[..., pair_row, :] if self.skip else None)  # (..., P, ...)
        with torch.no_grad():  # what `error` judges: q(y|a,x) at the mean of q(a|x); out of training with
            # posterior_samples K, the posterior (after the draws above, so they are the same either way)
            predict = self.class_logits(x, 0 if self.training else self.settings.posterior_samples, a=aux.mean)
        return ADGMOutput(recon=recon, z=z, posterior=post, class_logits=logits, labels=labels, pair_row=pair_row,
                          pair_label=pair_label, a=a, aux=aux, prior_a=prior_a, predict_logits=predict)

    def _decode_pairs(self, z: torch.Tensor, y: torch.Tensor, a: torch.Tensor | None) -> torch.Tensor:
        """p(x|y,z) (ADGM; a unused) or p(x|a,y,z) (SDGM): z (..., P, L), y (P,) indices or (P, K) vectors,
        a (..., P, A) -> raw (..., P, ...)."""
        lead = z.shape[:-2]
        c = self.condition_vector(y).to(z.dtype).expand(*lead, -1, -1)
        parts = [z, c, a] if self.skip else [z, c]
        raw = self.decoder(torch.cat(parts, -1).flatten(0, -2))
        return raw.unflatten(0, (*lead, z.shape[-2]))

    def _a_of(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(x flattened, the mean of q(a|x)): the a that use (classify, encode, reconstruct) takes."""
        xf = x.flatten(1)
        return xf, self._gaussian(self.aux_encoder(xf)).mean

    # -------------------------------------------------------------------------------------------- using

    def posterior_logits(self, x: torch.Tensor, samples: int, target: torch.Tensor | None = None) -> torch.Tensor:
        """log p(y) plus the importance-weighted bound on log p(x|y) for every class, (B, K): `samples` draws of
        a ~ q(a|x), shared by the classes, and for each class z ~ q(z|a,y,x), weighed by p(x|y,z) p(z) p(a|x,y,z)
        / (q(a|x) q(z|a,y,x)) (the SDGM's p(x|a,y,z) p(z) p(a|y,z) / ...): p(a|...) integrates to 1, so the
        weights' mean estimates p(x|y) itself. Their softmax is the model's own posterior p(y|x), as M2's."""
        target = x if target is None else target
        xf = x.flatten(1)
        b, k = len(x), self.num_classes
        aux = self._gaussian(self.aux_encoder(xf))
        a = aux.sample(n=samples)  # (S, B, A)
        log_qa = log_normal_diag(a, aux.mean, aux.logvar, event_dims=1)  # (S, B)
        rows = torch.arange(b, device=x.device)
        bounds = []
        for y in range(k):  # one class at a time: `samples` x B decodings in memory
            labels = torch.full((b,), y, dtype=torch.long, device=x.device)
            post = self._gaussian(self.encoder([xf, a], rows, labels=labels), dim=-1)  # (S, B, L)
            z = post.sample()
            prior_a = self._gaussian(self.aux_decoder([] if self.skip else [xf], rows, (z,), labels), dim=-1)
            recon = self._decode_pairs(z, labels, a if self.skip else None)  # (S, B, ...)
            log_w = log_importance_weights(target, recon, z, post.mean, post.logvar, self.likelihood,
                                           self.config.gaussian_sigma, event_dims=1)
            log_pa = log_normal_diag(a, prior_a.mean, prior_a.logvar, event_dims=1)
            bounds.append(iwae_bound(log_w + log_pa - log_qa))
        return torch.stack(bounds, 1) - math.log(k)

    def class_logits(self, x: torch.Tensor, samples: int, target: torch.Tensor | None = None,
                     a: torch.Tensor | None = None) -> torch.Tensor:
        """The logits the model classifies by, (B, K): q(y|a,x) at a = the mean of q(a|x) (given as `a` where the
        caller has it) with samples 0, else the posterior's from `samples` importance samples per class."""
        if samples:
            return self.posterior_logits(x, samples, target)
        xf, a = self._a_of(x) if a is None else (x.flatten(1), a)
        return self.classifier([xf, a], torch.arange(len(xf), device=xf.device))

    def _condition_of(self, x: torch.Tensor, xf: torch.Tensor, a: torch.Tensor, condition) -> torch.Tensor:
        """The class of each input for use: (B, K) vectors as given, (B,) labels as given, and for a hidden label
        (-1) or no condition the most probable class as `classify` judges it (a: the mean of q(a|x))."""
        if condition is not None and torch.as_tensor(condition).is_floating_point():
            return self.condition_vector(condition)  # (B, K) vectors
        c = self._labels(condition, len(xf))
        if (c < 0).any():
            c = torch.where(c < 0, self.class_logits(x, self.settings.posterior_samples, a=a).argmax(1), c)
        return c

    def encode(self, x: torch.Tensor, condition: torch.Tensor | None = None) -> DiagonalGaussian:
        """q(z | a, y, x) at a = the mean of q(a|x), y the given labels (or (B, K) vectors); a hidden label (-1)
        or no condition takes the classifier's most probable class."""
        xf, a = self._a_of(x)
        rows = torch.arange(len(x), device=x.device)
        return self._gaussian(self.encoder([xf, a], rows, labels=self._condition_of(x, xf, a, condition)))

    def decode_raw(self, z: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        """p(x|y,z)'s raw output; the SDGM's p(x|a,y,z) at a = the mean of p(a|y,z)."""
        y = self.condition_vector(condition)  # (B, K): labels one-hot, vectors as given
        a = None
        if self.skip:
            rows = torch.arange(len(z), device=z.device)
            a = self._gaussian(self.aux_decoder([], rows, (z,), y)).mean
        return self._decode_pairs(z, y, a)

    def reconstruct_raw(self, x: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        """The decoding of the posterior mean of z at a = the mean of q(a|x), y as in `encode`; the SDGM decodes
        with that a (the one the inference model saw) rather than p(a|y,z)'s."""
        xf, a = self._a_of(x)
        c = self._condition_of(x, xf, a, condition)
        z = self._gaussian(self.encoder([xf, a], torch.arange(len(x), device=x.device), labels=c)).mean
        return self._decode_pairs(z, c, a)

    @torch.no_grad()
    def classify(self, x: torch.Tensor) -> torch.Tensor:
        """The class probabilities of each input, (B, K): q(y|x) as q(y|a,x) at a = the mean of q(a|x), or with
        posterior_samples K the model's posterior p(y|x) (posterior_logits)."""
        x = x.to(self._device())
        xf, a = self._a_of(x)
        return torch.softmax(self.class_logits(x, self.settings.posterior_samples, a=a), dim=1)

    def anomaly_bounds(self, x, eps):
        raise VaelabError(f"model {self.config.model!r} has no anomaly bounds of a plain VAE (its bound samples "
                          "the auxiliary variable a and enumerates y); score anomalies with a VAE (--model vae)")

    def importance_sampler(self, x, condition=None):
        raise VaelabError(f"model {self.config.model!r} has no importance-sampled likelihood (it would sample the "
                          "auxiliary variable a as well); evaluate without --nll-samples and read its elbo")


@register("sdgm", description="Skip deep generative model (Maaløe et al. 2016): the ADGM with a as a stochastic "
                              "layer of the generative model, p(a|y,z) p(x|a,y,z); semi-supervised (--labels N).")
class SDGM(ADGM):
    """The SDGM: a is generated from (y, z), and x from (a, y, z)."""

    skip = True
