"""Disentanglement metrics: how well the dimensions of a representation line up with known factors of variation.

Every metric is a function of (codes (N, D), factors (N, F)) and an integer seed, numpy arrays or torch tensors:

    beta_vae_score     Higgins et al. 2017, "beta-VAE", section 3 and appendix A.4
    factor_vae_score   Kim & Mnih 2018, "Disentangling by Factorising", section 4
    mig                Chen et al. 2018, "Isolating Sources of Disentanglement in VAEs", section 5 (MIG)
    sap                Kumar et al. 2018, "Variational Inference of Disentangled Latent Concepts", section 3 (SAP)
    dci                Eastwood & Williams 2018, "A Framework for the Quantitative Evaluation of Disentangled
                       Representations" (disentanglement, completeness, informativeness)
    modularity         Ridgeway & Mozer 2018, "Learning Deep Disentangled Embeddings with the F-Statistic Loss"
    explicitness       Ridgeway & Mozer 2018 (the same paper)

Each returns a JSON-ready dict: its score(s), per-factor or per-dimension detail, and `protocol`, every setting
that moves the number (sample counts, bins and binning rule, classifier and its settings, the seed, mean or
sampled codes, which factors were used and which skipped, library versions). `disentanglement_scores` runs them
all on one set of codes; `disentanglement_report(model, data)` encodes a dataset first. The numbers of two
people agree when their protocol dicts do.

Where these numbers come from
-----------------------------
The pool. A metric sees a finite pool of (code, factor) rows, usually the test split. The BetaVAE and FactorVAE
scores need groups of samples that share the value of one factor; the generative protocol of the papers (and of
disentanglement_lib) renders new images with that factor fixed and the others drawn at random. Here they are
drawn from the pool instead: i.i.d. (with replacement) among the pool's rows whose discretized factor k equals
the value v. On a full-factorial pool (every combination of factor values equally often, as dSprites) the rows
sharing f_k = v have the other factors independent and uniform, so this *is* the generative protocol. On other
pools it is the conditional distribution the data has, correlations included.

Factors. A factor with at most `FactorBinning.max_classes` (64) distinct values keeps them as classes
(dSprites: shape 3, scale 6, orientation 40, x 32, y 32); a factor with more is cut into `FactorBinning.bins`
(20) equal-width bins. The classifiers and the mutual information see these classes. A factor constant on the
pool carries no information and would divide by H(f) = 0: it is skipped, and `protocol["factors_skipped"]`
names it.

Codes. The caller says whether the codes are posterior means or samples (`codes="mean"`, the default of
disentanglement_lib and of Locatello et al. 2019, or "sampled"); it is recorded. The mutual-information
metrics (MIG, modularity) cut each code dimension into `CodeBinning.bins` (20) bins, by default of equal
frequency ("quantile": bin = floor(20 * rank / N) with tied values in one bin), which makes the estimate
invariant to any strictly monotone transform of a dimension, as mutual information itself is.
`CodeBinning(rule="equal_width")` is disentanglement_lib's histogram (np.histogram edges, np.digitize):
invariant to affine maps only, and one outlier can squeeze the rest of a dimension into a single bin; use it to
compare with numbers computed by disentanglement_lib or disent (`DISENTANGLEMENT_LIB` is that protocol set).

Mutual information is computed here from contingency tables, in nats, with the plug-in (maximum-likelihood)
estimate I = sum_ab p_ab log(p_ab / (p_a p_b)), not with sklearn's mutual_info_score, whose behaviour changed
between versions (disentanglement_lib issue #33). The plug-in estimate is biased upwards: for independent
variables with A and B occupied bins, E[I] ~ (A-1)(B-1) / (2N) nats (Miller 1955; Panzeri & Treves 1996), so
codes that know nothing of the factors score slightly above 0 on finite pools.

Degenerate codes. A constant dimension carries no information: its mutual information is 0, its DCI importance
0, the FactorVAE score prunes it (global standard deviation below `prune_std`), and modularity leaves it out of
its average (disentanglement_lib gives it modularity 0, which lowers the score of a perfect code with one
constant dimension from 1 to F/(F+1)). Standardization divides by 1 where a dimension has no spread. No metric
returns NaN. A duplicated dimension is scored as the metric defines it: MIG's gap for that factor becomes 0 (the
information is not in one dimension alone), the FactorVAE score is unchanged (ties go to the first dimension).

Deliberate differences from disentanglement_lib (the reference implementation of Locatello et al. 2019):
quantile code bins by default (above); the FactorVAE score maps the arg-min over the active dimensions back to
the dimension's own index (disentanglement_lib votes with the index into the pruned list, so pruning any
dimension shifts the votes of the ones after it); DCI's entropies use 0 log 0 = 0 instead of adding 1e-11 to
every importance (a difference below 1e-9); constant dimensions and factors are handled as above; explicitness
scores only the classes present in both splits (disentanglement_lib's MultiLabelBinarizer fails otherwise).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field

import numpy as np

from vaelab.errors import ConfigError, DataError, VaelabError

CODE_KINDS = ("mean", "sampled")
BINNING_RULES = ("quantile", "equal_width")
SAP_FACTOR_KINDS = ("discrete", "continuous")


# ============================================================================================ protocols


def _check(problems: list[str], context: str) -> None:
    if problems:
        raise ConfigError(problems, context)


def _positive_ints(obj, *names) -> list[str]:
    return [f"{n}={getattr(obj, n)!r} must be a positive integer" for n in names
            if not (isinstance(getattr(obj, n), int) and getattr(obj, n) >= 1)]


def _positive_floats(obj, *names) -> list[str]:
    out = []
    for n in names:
        v = getattr(obj, n)
        if not (isinstance(v, (int, float)) and math.isfinite(v) and v > 0):
            out.append(f"{n}={v!r} must be a positive number")
    return out


@dataclass(frozen=True)
class Protocol:
    """Base of the metrics' protocols: frozen, JSON-ready through `to_dict`."""

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass(frozen=True)
class FactorBinning(Protocol):
    """How factor values become classes: at most `max_classes` distinct values stay as they are; more are cut
    into `bins` equal-width bins between the factor's minimum and maximum."""

    max_classes: int = 64
    bins: int = 20

    def __post_init__(self):
        _check(_positive_ints(self, "max_classes", "bins"), "factor binning")


@dataclass(frozen=True)
class CodeBinning(Protocol):
    """How a code dimension becomes a discrete variable for mutual information: `bins` bins of equal frequency
    ("quantile", invariant to monotone transforms) or of equal width ("equal_width", disentanglement_lib's)."""

    bins: int = 20
    rule: str = "quantile"

    def __post_init__(self):
        problems = _positive_ints(self, "bins")
        if self.rule not in BINNING_RULES:
            problems.append(f"rule={self.rule!r} is unknown; choose one of {list(BINNING_RULES)}")
        _check(problems, "code binning")


@dataclass(frozen=True)
class BetaVAEProtocol(Protocol):
    """Higgins et al. 2017: a point picks a factor k at random and `batch_size` pairs of samples that share
    factor k's value; its feature is the mean |z_a - z_b| over the pairs, (D,). A logistic regression
    (sklearn, lbfgs, L2 with inverse strength C, on unscaled features) learns k from `num_train` points; the
    score is its accuracy on `num_eval` fresh points. Chance is 1/F. disentanglement_lib: 64, 10000, 5000."""

    batch_size: int = 64
    num_train: int = 10000
    num_eval: int = 5000
    C: float = 1.0
    max_iter: int = 1000

    def __post_init__(self):
        _check(_positive_ints(self, "batch_size", "num_train", "num_eval", "max_iter")
               + _positive_floats(self, "C"), "BetaVAE score protocol")


@dataclass(frozen=True)
class FactorVAEProtocol(Protocol):
    """Kim & Mnih 2018: codes are divided by their standard deviation over `num_variance_estimate` samples;
    dimensions whose standard deviation is below `prune_std` (collapsed to the prior) are left out. A point picks
    a factor k and `batch_size` samples sharing one value of it; the dimension of least normalized variance
    votes for k. A majority vote per dimension over `num_train` points is the classifier; the score is its
    accuracy on `num_eval` fresh points. disentanglement_lib: 64, 10000, 5000, 10000, 0.05."""

    batch_size: int = 64
    num_train: int = 10000
    num_eval: int = 5000
    num_variance_estimate: int = 10000
    prune_std: float = 0.05

    def __post_init__(self):
        problems = _positive_ints(self, "batch_size", "num_train", "num_eval", "num_variance_estimate")
        if self.batch_size < 2:
            problems.append(f"batch_size={self.batch_size} must be >= 2 (a variance needs two samples)")
        if not (isinstance(self.prune_std, (int, float)) and self.prune_std >= 0):
            problems.append(f"prune_std={self.prune_std!r} must be a number >= 0")
        _check(problems, "FactorVAE score protocol")


@dataclass(frozen=True)
class MIGProtocol(Protocol):
    """Chen et al. 2018: mean over factors of (I(z_top; f) - I(z_second; f)) / H(f), with the mutual
    information of the binned codes (`code_binning`) and the factor classes on `num_samples` samples (plug-in
    estimate, nats). With one code dimension the second is 0. A factor with more values than there are bins cannot
    be held whole by one binned dimension, so even codes equal to the factors score below 1 for it (dSprites'
    orientation and positions, 40 and 32 values, with 20 bins). disentanglement_lib: 10000, 20 equal-width bins."""

    num_samples: int = 10000
    code_binning: CodeBinning = field(default_factory=CodeBinning)

    def __post_init__(self):
        _check(_positive_ints(self, "num_samples"), "MIG protocol")


@dataclass(frozen=True)
class SAPProtocol(Protocol):
    """Kumar et al. 2018: a score matrix S (D, F) of how well each single dimension predicts each factor, and the
    mean over factors of the gap between its two best dimensions. factor_kind="discrete": S is the test accuracy
    of sklearn's LinearSVC(C=svc_C, class_weight="balanced") on the one dimension (train on `num_train`, test on
    `num_test` other samples), disentanglement_lib's setting for dSprites; "continuous": S is the squared
    correlation R^2 on the `num_train` samples. An uninformative dimension still scores about the accuracy of a
    guess, 1/k on a factor with k equally frequent values, so its discrete SAP stays near or below 1 - 1/k; and
    one-vs-rest linear classifiers on one axis do not learn to pick out a factor's middle values, so codes equal
    to the factors come near that bound only for binary factors."""

    num_train: int = 10000
    num_test: int = 5000
    factor_kind: str = "discrete"
    svc_C: float = 0.01
    max_iter: int = 1000

    def __post_init__(self):
        problems = _positive_ints(self, "num_train", "num_test", "max_iter") + _positive_floats(self, "svc_C")
        if self.factor_kind not in SAP_FACTOR_KINDS:
            problems.append(f"factor_kind={self.factor_kind!r} is unknown; choose one of {list(SAP_FACTOR_KINDS)}")
        _check(problems, "SAP protocol")


@dataclass(frozen=True)
class DCIProtocol(Protocol):
    """Eastwood & Williams 2018 with disentanglement_lib's predictor: one sklearn GradientBoostingClassifier per
    factor (n_estimators, learning_rate, max_depth; everything else sklearn's default; random_state = the seed)
    on `num_train` samples; R[i, j] = its impurity importance of dimension i for factor j. Disentanglement:
    sum_i rho_i (1 - H_F(R[i, :] / sum_j R[i, j])), rho_i = dimension i's share of all importance;
    completeness: sum_j rho_j (1 - H_D(R[:, j] / sum_i R[i, j])), entropies with logarithms of base F and D;
    informativeness: the mean test accuracy over factors on `num_test` other samples."""

    num_train: int = 10000
    num_test: int = 5000
    n_estimators: int = 100
    learning_rate: float = 0.1
    max_depth: int = 3

    def __post_init__(self):
        _check(_positive_ints(self, "num_train", "num_test", "n_estimators", "max_depth")
               + _positive_floats(self, "learning_rate"), "DCI protocol")


@dataclass(frozen=True)
class ModularityProtocol(Protocol):
    """Ridgeway & Mozer 2018: for each dimension i with mutual information m_ij (binned codes, `num_samples`
    samples), theta_i = max_j m_ij and modularity_i = 1 - (sum_j m_ij^2 - theta_i^2) / (theta_i^2 (F - 1));
    the score is the mean over dimensions with theta_i > 0 (with one factor every such dimension scores 1)."""

    num_samples: int = 10000
    code_binning: CodeBinning = field(default_factory=CodeBinning)

    def __post_init__(self):
        _check(_positive_ints(self, "num_samples"), "modularity protocol")


@dataclass(frozen=True)
class ExplicitnessProtocol(Protocol):
    """Ridgeway & Mozer 2018: per factor, a multinomial logistic regression (sklearn, lbfgs, C, max_iter) on all
    dimensions, standardized with the training samples' mean and standard deviation, trained on `num_train`
    samples; its score is the ROC AUC of each class against the rest on `num_test` other samples, averaged
    over the classes present in both splits. The explicitness is the mean over factors."""

    num_train: int = 10000
    num_test: int = 5000
    C: float = 1.0
    max_iter: int = 1000

    def __post_init__(self):
        _check(_positive_ints(self, "num_train", "num_test", "max_iter") + _positive_floats(self, "C"),
               "explicitness protocol")


@dataclass(frozen=True)
class Protocols:
    """One protocol per metric; `Protocols()` is vaelab's default, `DISENTANGLEMENT_LIB` disentanglement_lib's."""

    factors: FactorBinning = field(default_factory=FactorBinning)
    beta_vae: BetaVAEProtocol = field(default_factory=BetaVAEProtocol)
    factor_vae: FactorVAEProtocol = field(default_factory=FactorVAEProtocol)
    mig: MIGProtocol = field(default_factory=MIGProtocol)
    sap: SAPProtocol = field(default_factory=SAPProtocol)
    dci: DCIProtocol = field(default_factory=DCIProtocol)
    modularity: ModularityProtocol = field(default_factory=ModularityProtocol)
    explicitness: ExplicitnessProtocol = field(default_factory=ExplicitnessProtocol)

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# the settings of disentanglement_lib's unsupervised study (Locatello et al. 2019): equal-width code bins
DISENTANGLEMENT_LIB = Protocols(mig=MIGProtocol(code_binning=CodeBinning(rule="equal_width")),
                                modularity=ModularityProtocol(code_binning=CodeBinning(rule="equal_width")))

METRICS = ("beta_vae", "factor_vae", "mig", "sap", "dci", "modularity", "explicitness")


# ======================================================================= discretization and information


def _as_array(a, what: str) -> np.ndarray:
    if hasattr(a, "detach"):  # a torch tensor
        a = a.detach().cpu().double().numpy()
    try:
        return np.asarray(a, dtype=np.float64)
    except (TypeError, ValueError) as e:
        raise DataError(f"{what} must be numbers, (N, D) as a numpy array or torch tensor: {e}") from None


def _compact(labels: np.ndarray) -> np.ndarray:
    """Integer labels renumbered 0..k-1 in sorted order of their values, (N,) int64."""
    return np.unique(labels, return_inverse=True)[1].reshape(-1).astype(np.int64)


def _equal_width_bins(x: np.ndarray, bins: int) -> np.ndarray:
    # np.histogram's edges and np.digitize, as disentanglement_lib's histogram discretizer: bin i holds
    # edges[i] <= x < edges[i + 1], the last bin also the maximum; a constant x falls into one bin
    edges = np.histogram_bin_edges(x, bins)
    return (np.digitize(x, edges[:-1]) - 1).astype(np.int64)


def _quantile_bins(x: np.ndarray, bins: int) -> np.ndarray:
    # bin = floor(bins * (number of values strictly below x) / N): equal frequency, tied values in one bin, and a
    # function of the ranks alone (a strictly increasing transform of x gives the same bins)
    below = np.searchsorted(np.sort(x), x, side="left")
    return (below * bins) // len(x)


def discretize_codes(codes, binning: CodeBinning = CodeBinning()) -> np.ndarray:
    """Bin indices (N, D) int64 of codes (N, D), each dimension on its own (see CodeBinning)."""
    z = _as_array(codes, "codes")
    cut = _quantile_bins if binning.rule == "quantile" else _equal_width_bins
    out = np.zeros(z.shape, dtype=np.int64)
    for d in range(z.shape[1]):
        out[:, d] = cut(z[:, d], binning.bins)
    return out


def discretize_factor(values, binning: FactorBinning = FactorBinning()) -> np.ndarray:
    """Classes 0..k-1 (N,) int64 of one factor's values (N,): its distinct values in sorted order when there are
    at most binning.max_classes of them, else equal-width bins (see FactorBinning)."""
    v = _as_array(values, "factor values").reshape(-1)
    distinct = np.unique(v)
    if len(distinct) <= binning.max_classes:
        return np.searchsorted(distinct, v).astype(np.int64)
    return _compact(_equal_width_bins(v, binning.bins))


def entropy(labels) -> float:
    """Plug-in entropy of discrete labels (N,), in nats."""
    counts = np.bincount(_compact(np.asarray(labels)))
    counts = counts[counts > 0].astype(np.float64)
    n = counts.sum()
    return float(max(0.0, np.sum(counts / n * (math.log(n) - np.log(counts)))))


def mutual_information(a, b) -> float:
    """Plug-in mutual information of two discrete label arrays (N,) from their contingency table, in nats:
    sum_xy (n_xy / N) log(N n_xy / (n_x n_y)); >= 0, and exactly entropy(a) when b is a relabelling of a."""
    a, b = _compact(np.asarray(a)), _compact(np.asarray(b))
    if len(a) != len(b):
        raise DataError(f"mutual information of {len(a)} and {len(b)} labels: the two must pair up one to one")
    if len(a) == 0:
        return 0.0
    ka, kb = int(a.max()) + 1, int(b.max()) + 1
    if ka == 1 or kb == 1:  # a constant carries nothing: exactly 0, not a rounding error of either sign
        return 0.0
    joint = np.bincount(a * kb + b, minlength=ka * kb).reshape(ka, kb).astype(np.float64)
    n = float(len(a))
    row, col = np.nonzero(joint)
    nab = joint[row, col]
    log_na, log_nb = np.log(joint.sum(1)), np.log(joint.sum(0))
    mi = np.sum(nab / n * (np.log(nab) + math.log(n) - log_na[row] - log_nb[col]))
    return float(max(0.0, mi))  # rounding can leave -1e-17 for independent labels


def _mi_matrix(code_labels: np.ndarray, factor_labels: np.ndarray) -> np.ndarray:
    return np.array([[mutual_information(code_labels[:, i], factor_labels[:, j])
                      for j in range(factor_labels.shape[1])] for i in range(code_labels.shape[1])])


# ================================================================================== inputs and sampling


@dataclass
class _Pool:
    """The checked inputs of a metric: codes (N, D) float64; the included factors' classes (N, F) int64 and
    values (N, F) float64; their names; the skipped factors."""

    codes: np.ndarray
    labels: np.ndarray
    values: np.ndarray
    names: list
    skipped: list
    codes_kind: str
    binning: FactorBinning

    def groups(self) -> "_Groups":
        return _Groups(self.labels)

    def protocol(self, metric: str, paper: str, seed: int, settings: Protocol, **extra) -> dict:
        import sklearn

        return {"metric": metric, "paper": paper, "seed": seed, "codes": self.codes_kind,
                "pool_size": int(len(self.codes)), "code_dims": int(self.codes.shape[1]),
                "factors": list(self.names), "factors_skipped": list(self.skipped),
                "factor_classes": [int(self.labels[:, j].max()) + 1 for j in range(self.labels.shape[1])],
                "factor_binning": self.binning.to_dict(), **settings.to_dict(), **extra,
                "numpy": np.__version__, "sklearn": sklearn.__version__}


def _pool(codes, factors, factor_names, codes_kind: str, binning: FactorBinning) -> _Pool:
    z = _as_array(codes, "codes")
    f = _as_array(factors, "factors")
    if z.ndim == 1:
        z = z[:, None]
    if f.ndim == 1:
        f = f[:, None]
    problems = []
    if z.ndim != 2:
        problems.append(f"codes have shape {z.shape}; expected (N, D): one row of latent values per sample")
    if f.ndim != 2:
        problems.append(f"factors have shape {f.shape}; expected (N, F): one row of factor values per sample")
    if not problems and len(z) != len(f):
        problems.append(f"{len(z)} rows of codes but {len(f)} rows of factors; they must pair up, one row per sample")
    if not problems and len(z) < 2:
        problems.append(f"{len(z)} sample(s); the metrics need at least 2")
    if not problems and not np.isfinite(z).all():
        problems.append(f"the codes hold {int((~np.isfinite(z)).sum())} non-finite values (NaN or Inf); the "
                        "model is broken (retrain it)")
    if not problems and not np.isfinite(f).all():
        problems.append(f"the factors hold {int((~np.isfinite(f)).sum())} non-finite values (NaN or Inf)")
    if codes_kind not in CODE_KINDS:
        problems.append(f"codes={codes_kind!r} must be one of {list(CODE_KINDS)} (posterior means or samples)")
    if problems:
        raise DataError("disentanglement metrics: " + "; ".join(problems))
    names = [f"factor{j}" for j in range(f.shape[1])] if factor_names is None else [str(n) for n in factor_names]
    if len(names) != f.shape[1]:
        raise DataError(f"disentanglement metrics: {len(names)} factor names for {f.shape[1]} factors")
    keep, skipped = [], []
    for j in range(f.shape[1]):
        if np.ptp(f[:, j]) == 0:
            skipped.append({"factor": names[j], "reason": f"constant (every sample has value {f[0, j]:g})"})
        else:
            keep.append(j)
    if not keep:
        raise DataError(f"disentanglement metrics: every factor is constant over the {len(f)} samples "
                        f"({', '.join(names)}); there is no variation for the codes to explain")
    labels = np.stack([discretize_factor(f[:, j], binning) for j in keep], axis=1)
    return _Pool(z, labels, f[:, keep], [names[j] for j in keep], skipped, codes_kind, binning)


class _Groups:
    """Rows grouped by each factor's class, to draw samples that share one factor's value."""

    def __init__(self, labels: np.ndarray):
        n, n_factors = labels.shape
        width = int(labels.max()) + 1
        self.order = np.concatenate([np.argsort(labels[:, j], kind="stable") for j in range(n_factors)])
        self.counts = np.zeros((n_factors, width), dtype=np.int64)
        self.starts = np.zeros((n_factors, width), dtype=np.int64)
        for j in range(n_factors):
            c = np.bincount(labels[:, j], minlength=width)
            self.counts[j] = c
            self.starts[j] = j * n + np.cumsum(c) - c
        self.labels = labels

    def draw(self, rng: np.random.Generator, factor: np.ndarray, anchor: np.ndarray) -> np.ndarray:
        """Rows drawn uniformly (with replacement) among those whose class of `factor` equals the anchor row's;
        factor and anchor are index arrays of one shape."""
        cls = self.labels[anchor, factor]
        u = rng.random(anchor.shape)
        return self.order[self.starts[factor, cls] + (u * self.counts[factor, cls]).astype(np.int64)]


def _take(rng: np.random.Generator, n: int, k: int) -> np.ndarray:
    """k rows of n without replacement (all n, in order, when k >= n)."""
    return np.arange(n) if k >= n else np.sort(rng.choice(n, size=k, replace=False))


def _split(rng: np.random.Generator, n: int, n_train: int, n_test: int) -> tuple[np.ndarray, np.ndarray]:
    """Disjoint train and test rows: n_train and n_test of them, or, when the pool holds fewer than both, the
    pool divided in the same proportion (at least one row each)."""
    perm = rng.permutation(n)
    if n < n_train + n_test:
        n_train = min(max(1, (n * n_train) // (n_train + n_test)), n - 1)
        n_test = n - n_train
    return np.sort(perm[:n_train]), np.sort(perm[n_train:n_train + n_test])


def _seed(seed) -> int:
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise ConfigError(f"seed={seed!r} must be a non-negative integer (it is written into the protocol)",
                          "disentanglement metrics")
    return int(seed)


def _by_name(names, values) -> dict:
    return {n: float(v) for n, v in zip(names, values)}


# ============================================================================================= metrics


def beta_vae_score(codes, factors, *, seed: int = 0, protocol: BetaVAEProtocol = BetaVAEProtocol(),
                   factor_binning: FactorBinning = FactorBinning(), codes_kind: str = "mean",
                   factor_names=None) -> dict:
    """The BetaVAE score (Higgins et al. 2017): the accuracy with which a linear classifier tells which factor
    a batch of pairs shares from the mean absolute code differences (see BetaVAEProtocol). 1 when one dimension
    is constant across the pairs exactly for each factor; chance is 1/F."""
    from sklearn.linear_model import LogisticRegression

    seed = _seed(seed)
    pool = _pool(codes, factors, factor_names, codes_kind, factor_binning)
    rng = np.random.default_rng(seed)
    groups = pool.groups()
    x_train, y_train = _beta_vae_points(pool, groups, rng, protocol.num_train, protocol.batch_size)
    x_eval, y_eval = _beta_vae_points(pool, groups, rng, protocol.num_eval, protocol.batch_size)
    n_factors = pool.labels.shape[1]
    if n_factors == 1:  # one factor: every point's answer is that factor
        train_acc = eval_acc = 1.0
    else:
        clf = LogisticRegression(C=protocol.C, max_iter=protocol.max_iter, random_state=seed)
        clf.fit(x_train, y_train)
        train_acc, eval_acc = float(clf.score(x_train, y_train)), float(clf.score(x_eval, y_eval))
    return {"beta_vae_score": eval_acc, "beta_vae_train_accuracy": train_acc,
            "protocol": pool.protocol("beta_vae_score", "Higgins et al. 2017", seed, protocol,
                                      classifier="sklearn LogisticRegression(lbfgs, L2), unscaled features",
                                      chance=1.0 / n_factors)}


def _beta_vae_points(pool: _Pool, groups: _Groups, rng, num: int, batch: int, chunk: int = 512):
    n, n_factors = pool.labels.shape
    x = np.empty((num, pool.codes.shape[1]))
    y = rng.integers(n_factors, size=num)
    for start in range(0, num, chunk):
        k = y[start:start + chunk, None].repeat(batch, 1)  # (P, B): the shared factor of every pair
        a = rng.integers(n, size=k.shape)
        b = groups.draw(rng, k, a)
        x[start:start + chunk] = np.abs(pool.codes[a] - pool.codes[b]).mean(1)  # (P, B, D) -> (P, D)
    return x, y


def factor_vae_score(codes, factors, *, seed: int = 0, protocol: FactorVAEProtocol = FactorVAEProtocol(),
                     factor_binning: FactorBinning = FactorBinning(), codes_kind: str = "mean",
                     factor_names=None) -> dict:
    """The FactorVAE score (Kim & Mnih 2018): the accuracy of the majority-vote classifier from "the dimension
    of least normalized variance when factor k is fixed" to k (see FactorVAEProtocol). 1 when fixing each factor
    collapses one dimension of its own; 0 when every dimension is pruned."""
    seed = _seed(seed)
    pool = _pool(codes, factors, factor_names, codes_kind, factor_binning)
    rng = np.random.default_rng(seed)
    n, n_factors = pool.labels.shape
    dims = pool.codes.shape[1]
    rows = _take(rng, n, protocol.num_variance_estimate)
    global_var = pool.codes[rows].var(0, ddof=1)
    active = np.flatnonzero(np.sqrt(global_var) >= protocol.prune_std)
    active = active[global_var[active] > 0]  # prune_std=0 must still leave out constant dimensions
    record = dict(classifier="majority vote per dimension", active_dims=[int(d) for d in active],
                  chance=1.0 / n_factors)
    if len(active) == 0:
        return {"factor_vae_score": 0.0, "factor_vae_train_accuracy": 0.0,
                "protocol": pool.protocol("factor_vae_score", "Kim & Mnih 2018", seed, protocol, **record,
                                          note="every dimension was pruned (standard deviation below prune_std)")}
    groups = pool.groups()
    train_votes = _factor_vae_votes(pool, groups, rng, protocol, global_var, active, protocol.num_train)
    eval_votes = _factor_vae_votes(pool, groups, rng, protocol, global_var, active, protocol.num_eval)
    classifier = np.argmax(train_votes, axis=0)  # (D,): the factor each dimension votes for most
    cols = np.arange(dims)
    train_acc = train_votes[classifier, cols].sum() / train_votes.sum()
    eval_acc = eval_votes[classifier, cols].sum() / eval_votes.sum()
    return {"factor_vae_score": float(eval_acc), "factor_vae_train_accuracy": float(train_acc),
            "factor_vae_votes": train_votes.tolist(),
            "protocol": pool.protocol("factor_vae_score", "Kim & Mnih 2018", seed, protocol, **record)}


def _factor_vae_votes(pool: _Pool, groups: _Groups, rng, protocol: FactorVAEProtocol, global_var, active, num: int,
                      chunk: int = 512) -> np.ndarray:
    n, n_factors = pool.labels.shape
    votes = np.zeros((n_factors, pool.codes.shape[1]), dtype=np.int64)
    for start in range(0, num, chunk):
        p = min(chunk, num - start)
        k = rng.integers(n_factors, size=p)
        anchor = rng.integers(n, size=p)  # its value of factor k is the one the batch shares
        rows = groups.draw(rng, k[:, None].repeat(protocol.batch_size, 1), anchor[:, None].repeat(
            protocol.batch_size, 1))  # (P, B)
        local_var = pool.codes[rows][:, :, active].var(1, ddof=1)  # (P, A)
        winner = active[np.argmin(local_var / global_var[active], axis=1)]  # back to the dimension's own index
        np.add.at(votes, (k, winner), 1)
    return votes


def mig(codes, factors, *, seed: int = 0, protocol: MIGProtocol = MIGProtocol(),
        factor_binning: FactorBinning = FactorBinning(), codes_kind: str = "mean", factor_names=None) -> dict:
    """The mutual information gap (Chen et al. 2018): for each factor, the difference between the mutual
    information of its best and second-best code dimension, divided by its entropy; averaged over factors.
    1 when each factor is captured losslessly by one dimension and by no other; 0 when two dimensions tie."""
    seed = _seed(seed)
    pool = _pool(codes, factors, factor_names, codes_kind, factor_binning)
    rows = _take(np.random.default_rng(seed), len(pool.codes), protocol.num_samples)
    mi = _mi_matrix(discretize_codes(pool.codes[rows], protocol.code_binning), pool.labels[rows])  # (D, F)
    h = np.array([entropy(pool.labels[rows, j]) for j in range(pool.labels.shape[1])])
    ranked = np.sort(mi, axis=0)[::-1]
    second = ranked[1] if len(ranked) > 1 else np.zeros(mi.shape[1])
    scored = h > 0  # a factor constant on the subsample (not on the pool) has no entropy to normalize by
    gaps = np.where(scored, (ranked[0] - second) / np.where(scored, h, 1.0), 0.0)
    extra = {"samples_used": int(len(rows))}
    if not scored.all():
        extra["factors_unscored"] = [n for n, s in zip(pool.names, scored) if not s]
    return {"mig": float(gaps[scored].mean()) if scored.any() else 0.0,
            "mig_per_factor": _by_name(pool.names, gaps),
            "mutual_information": mi.tolist(), "factor_entropy": _by_name(pool.names, h),
            "protocol": pool.protocol("mig", "Chen et al. 2018", seed, protocol, units="nats", **extra)}


def sap(codes, factors, *, seed: int = 0, protocol: SAPProtocol = SAPProtocol(),
        factor_binning: FactorBinning = FactorBinning(), codes_kind: str = "mean", factor_names=None) -> dict:
    """The SAP score (Kumar et al. 2018): for each factor, the gap between the two code dimensions that predict
    it best on their own, averaged over factors (see SAPProtocol for the score of one dimension)."""
    seed = _seed(seed)
    pool = _pool(codes, factors, factor_names, codes_kind, factor_binning)
    rng = np.random.default_rng(seed)
    continuous = protocol.factor_kind == "continuous"
    if continuous:  # R^2 is a statistic of one sample, as disentanglement_lib's: no test rows
        train, test = _take(rng, len(pool.codes), protocol.num_train), np.zeros(0, dtype=np.int64)
    else:
        train, test = _split(rng, len(pool.codes), protocol.num_train, protocol.num_test)
    dims, n_factors = pool.codes.shape[1], pool.labels.shape[1]
    scores = np.zeros((dims, n_factors))
    for i in range(dims):
        for j in range(n_factors):
            if continuous:
                scores[i, j] = _r_squared(pool.codes[train, i], pool.values[train, j])
            else:
                scores[i, j] = _single_dim_accuracy(pool.codes[:, i], pool.labels[:, j], train, test, protocol, seed)
    ranked = np.sort(scores, axis=0)[::-1]
    gaps = ranked[0] - (ranked[1] if dims > 1 else 0.0)
    extra = {"classifier": "sklearn LinearSVC(class_weight='balanced') on one dimension, test accuracy"
             if not continuous else "R^2 of one dimension with the factor's values",
             "n_train_used": int(len(train)), "n_test_used": int(len(test))}
    return {"sap": float(gaps.mean()), "sap_per_factor": _by_name(pool.names, gaps), "sap_matrix": scores.tolist(),
            "protocol": pool.protocol("sap", "Kumar et al. 2018", seed, protocol, **extra)}


def _r_squared(z: np.ndarray, y: np.ndarray) -> float:
    var_z, var_y = z.var(ddof=1), y.var(ddof=1)
    if var_z <= 1e-12 or var_y <= 0:
        return 0.0
    cov = np.cov(z, y, ddof=1)[0, 1]
    return float(cov * cov / (var_z * var_y))


def _single_dim_accuracy(z, y, train, test, protocol: SAPProtocol, seed: int) -> float:
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.svm import LinearSVC

    classes = np.unique(y[train])
    if len(classes) < 2:  # one class to learn: the constant guess
        return float(np.mean(y[test] == classes[0]))
    clf = LinearSVC(C=protocol.svc_C, class_weight="balanced", max_iter=protocol.max_iter, random_state=seed)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)  # a dimension that cannot separate the classes
        clf.fit(z[train, None], y[train])
    return float(np.mean(clf.predict(z[test, None]) == y[test]))


def dci(codes, factors, *, seed: int = 0, protocol: DCIProtocol = DCIProtocol(),
        factor_binning: FactorBinning = FactorBinning(), codes_kind: str = "mean", factor_names=None) -> dict:
    """Disentanglement, completeness and informativeness (Eastwood & Williams 2018) from the importance matrix of
    gradient-boosted trees that predict each factor from all codes (see DCIProtocol and dci_from_importance)."""
    from sklearn.ensemble import GradientBoostingClassifier

    seed = _seed(seed)
    pool = _pool(codes, factors, factor_names, codes_kind, factor_binning)
    train, test = _split(np.random.default_rng(seed), len(pool.codes), protocol.num_train, protocol.num_test)
    dims, n_factors = pool.codes.shape[1], pool.labels.shape[1]
    importance = np.zeros((dims, n_factors))
    acc_train, acc_test = np.zeros(n_factors), np.zeros(n_factors)
    for j in range(n_factors):
        y = pool.labels[:, j]
        classes = np.unique(y[train])
        if len(classes) < 2:  # nothing to learn: no importance, the constant guess
            acc_train[j], acc_test[j] = np.mean(y[train] == classes[0]), np.mean(y[test] == classes[0])
            continue
        model = GradientBoostingClassifier(n_estimators=protocol.n_estimators, learning_rate=protocol.learning_rate,
                                           max_depth=protocol.max_depth, random_state=seed)
        model.fit(pool.codes[train], y[train])
        importance[:, j] = np.abs(model.feature_importances_)
        acc_train[j] = np.mean(model.predict(pool.codes[train]) == y[train])
        acc_test[j] = np.mean(model.predict(pool.codes[test]) == y[test])
    scores = dci_from_importance(importance)
    return {"dci_disentanglement": scores["disentanglement"], "dci_completeness": scores["completeness"],
            "dci_informativeness": float(acc_test.mean()), "dci_informativeness_train": float(acc_train.mean()),
            "dci_informativeness_per_factor": _by_name(pool.names, acc_test),
            "dci_disentanglement_per_dim": scores["disentanglement_per_dim"],
            "dci_completeness_per_factor": _by_name(pool.names, scores["completeness_per_factor"]),
            "importance": importance.tolist(),
            "protocol": pool.protocol("dci", "Eastwood & Williams 2018", seed, protocol,
                                      classifier="sklearn GradientBoostingClassifier (other settings sklearn's "
                                                 "defaults), impurity importances",
                                      n_train_used=int(len(train)), n_test_used=int(len(test)))}


def _normalized_entropy(p: np.ndarray, base: int) -> float:
    """Entropy of the distribution proportional to p >= 0, in logarithms of `base` (0 log 0 = 0); 0 for base 1."""
    if base < 2:
        return 0.0
    q = p[p > 0] / p.sum()
    return float(-np.sum(q * np.log(q)) / math.log(base))


def dci_from_importance(importance) -> dict:
    """DCI disentanglement and completeness of an importance matrix R (D, F) >= 0 (Eastwood & Williams 2018):

        disentanglement = sum_i rho_i (1 - H_F(P_i.)),  P_ij = R_ij / sum_k R_ik,  rho_i = sum_j R_ij / sum R
        completeness    = sum_j rho_j (1 - H_D(P~_.j)), P~_ij = R_ij / sum_k R_kj, rho_j = sum_i R_ij / sum R

    with entropies in logarithms of base F and D (so each term lies in [0, 1]). A dimension (factor) without
    importance has weight 0; with one factor (one dimension) every dimension (factor) scores 1; an all-zero
    matrix scores 0."""
    r = _as_array(importance, "importance")
    if r.ndim != 2 or (r < 0).any() or not np.isfinite(r).all():
        raise DataError(f"importance must be a finite, non-negative (D, F) matrix; got shape {r.shape}")
    dims, n_factors = r.shape
    total = r.sum()
    row, col = r.sum(1), r.sum(0)
    per_dim = np.array([1.0 - _normalized_entropy(r[i], n_factors) if row[i] > 0 else 0.0 for i in range(dims)])
    per_factor = np.array([1.0 - _normalized_entropy(r[:, j], dims) if col[j] > 0 else 0.0
                           for j in range(n_factors)])
    if total <= 0:
        return {"disentanglement": 0.0, "completeness": 0.0, "disentanglement_per_dim": per_dim.tolist(),
                "completeness_per_factor": per_factor.tolist()}
    return {"disentanglement": float(np.sum(per_dim * row / total)),
            "completeness": float(np.sum(per_factor * col / total)),
            "disentanglement_per_dim": per_dim.tolist(), "completeness_per_factor": per_factor.tolist()}


def modularity(codes, factors, *, seed: int = 0, protocol: ModularityProtocol = ModularityProtocol(),
               factor_binning: FactorBinning = FactorBinning(), codes_kind: str = "mean", factor_names=None) -> dict:
    """Modularity (Ridgeway & Mozer 2018): how much of each dimension's mutual information with the factors goes
    to a single factor, averaged over the dimensions that carry any (see ModularityProtocol and
    modularity_from_mi). 1 when every informative dimension depends on one factor only."""
    seed = _seed(seed)
    pool = _pool(codes, factors, factor_names, codes_kind, factor_binning)
    rows = _take(np.random.default_rng(seed), len(pool.codes), protocol.num_samples)
    mi = _mi_matrix(discretize_codes(pool.codes[rows], protocol.code_binning), pool.labels[rows])
    scores = modularity_from_mi(mi)
    return {"modularity": scores["modularity"], "modularity_per_dim": scores["modularity_per_dim"],
            "mutual_information": mi.tolist(),
            "protocol": pool.protocol("modularity", "Ridgeway & Mozer 2018", seed, protocol,
                                      samples_used=int(len(rows)), dims_scored=scores["dims_scored"])}


def modularity_from_mi(mi) -> dict:
    """Modularity of a mutual-information matrix m (D, F) >= 0: per dimension with theta_i = max_j m_ij > 0,
    1 - (sum_j m_ij^2 - theta_i^2) / (theta_i^2 (F - 1)) (1 with one factor); the mean over those dimensions
    (0 when there are none). Dimensions with theta_i = 0 have modularity None."""
    m = _as_array(mi, "mutual information")
    theta = m.max(1) if m.size else np.zeros(len(m))
    per_dim: list = []
    for i in range(len(m)):
        if theta[i] <= 0:
            per_dim.append(None)
        elif m.shape[1] == 1:
            per_dim.append(1.0)
        else:
            delta = (np.sum(m[i] ** 2) - theta[i] ** 2) / (theta[i] ** 2 * (m.shape[1] - 1))
            per_dim.append(float(1.0 - delta))
    scored = [v for v in per_dim if v is not None]
    return {"modularity": float(np.mean(scored)) if scored else 0.0, "modularity_per_dim": per_dim,
            "dims_scored": len(scored)}


def explicitness(codes, factors, *, seed: int = 0, protocol: ExplicitnessProtocol = ExplicitnessProtocol(),
                 factor_binning: FactorBinning = FactorBinning(), codes_kind: str = "mean", factor_names=None) -> dict:
    """Explicitness (Ridgeway & Mozer 2018): how well a linear classifier on the whole code ranks each factor's
    classes, as one-vs-rest ROC AUC averaged over classes and factors (see ExplicitnessProtocol). 1 for codes
    from which every class of every factor is linearly ranked apart; about 0.5 for codes without information."""
    import warnings

    from sklearn.exceptions import ConvergenceWarning
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score

    seed = _seed(seed)
    pool = _pool(codes, factors, factor_names, codes_kind, factor_binning)
    train, test = _split(np.random.default_rng(seed), len(pool.codes), protocol.num_train, protocol.num_test)
    mean, std = pool.codes[train].mean(0), pool.codes[train].std(0)
    std = np.where(std > 0, std, 1.0)  # a constant dimension becomes 0, not NaN
    x_train, x_test = (pool.codes[train] - mean) / std, (pool.codes[test] - mean) / std
    per_factor, per_factor_train, unscored = {}, {}, []
    for j, name in enumerate(pool.names):
        y_train, y_test = pool.labels[train, j], pool.labels[test, j]
        if len(np.unique(y_train)) < 2:
            unscored.append(name)
            continue
        clf = LogisticRegression(C=protocol.C, max_iter=protocol.max_iter, random_state=seed)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            clf.fit(x_train, y_train)
        aucs = []
        for x, y, out in ((x_test, y_test, per_factor), (x_train, y_train, per_factor_train)):
            proba = clf.predict_proba(x)
            aucs = [roc_auc_score(y == c, proba[:, k]) for k, c in enumerate(clf.classes_)
                    if 0 < np.sum(y == c) < len(y)]
            if aucs:
                out[name] = float(np.mean(aucs))
        if name not in per_factor:
            unscored.append(name)
    extra = {"classifier": "sklearn LogisticRegression(lbfgs, multinomial) on standardized codes; one-vs-rest "
                           "ROC AUC per class, macro average", "n_train_used": int(len(train)),
             "n_test_used": int(len(test))}
    if unscored:
        extra["factors_unscored"] = unscored
    return {"explicitness": float(np.mean(list(per_factor.values()))) if per_factor else 0.0,
            "explicitness_train": float(np.mean(list(per_factor_train.values()))) if per_factor_train else 0.0,
            "explicitness_per_factor": per_factor,
            "protocol": pool.protocol("explicitness", "Ridgeway & Mozer 2018", seed, protocol, **extra)}


def mutual_information_matrix(codes, factors, *, seed: int = 0, num_samples: int = 10000,
                              codes_binning: CodeBinning = CodeBinning(),
                              factor_binning: FactorBinning = FactorBinning(), codes_kind: str = "mean",
                              factor_names=None) -> dict:
    """The mutual information (D, F) between each binned code dimension and each factor, in nats, with each
    factor's entropy, on `num_samples` samples (all when fewer): what MIG and modularity are computed from, and
    what `vaelab.plotting.save_mi_matrix` draws. Constant factors are skipped (see the protocol)."""
    seed = _seed(seed)
    pool = _pool(codes, factors, factor_names, codes_kind, factor_binning)
    rows = _take(np.random.default_rng(seed), len(pool.codes), num_samples)
    mi = _mi_matrix(discretize_codes(pool.codes[rows], codes_binning), pool.labels[rows])
    h = [entropy(pool.labels[rows, j]) for j in range(pool.labels.shape[1])]
    settings = MIGProtocol(num_samples=num_samples, code_binning=codes_binning)
    return {"mutual_information": mi.tolist(), "factor_entropy": _by_name(pool.names, h),
            "factors": list(pool.names),
            "protocol": pool.protocol("mutual_information", "plug-in estimate from contingency tables", seed,
                                      settings, units="nats", samples_used=int(len(rows)))}


# ======================================================================================= all of them

SCORE_MEANINGS = {
    "beta_vae_score": "BetaVAE score: accuracy telling the fixed factor from |z_a - z_b| (Higgins et al. 2017)",
    "factor_vae_score": "FactorVAE score: majority-vote accuracy of the least-variance dimension (Kim & Mnih 2018)",
    "mig": "mutual information gap, normalized by the factor's entropy (Chen et al. 2018)",
    "sap": "SAP: gap between the two dimensions that best predict a factor alone (Kumar et al. 2018)",
    "dci_disentanglement": "DCI disentanglement: each dimension explains one factor (Eastwood & Williams 2018)",
    "dci_completeness": "DCI completeness: each factor is explained by one dimension",
    "dci_informativeness": "DCI informativeness: test accuracy of boosted trees predicting the factors",
    "modularity": "modularity: each dimension's information goes to one factor (Ridgeway & Mozer 2018)",
    "explicitness": "explicitness: ROC AUC of a linear classifier of the factors (Ridgeway & Mozer 2018)",
}

_FUNCTIONS = {"beta_vae": (beta_vae_score, ("beta_vae_score",)),
              "factor_vae": (factor_vae_score, ("factor_vae_score",)),
              "mig": (mig, ("mig",)), "sap": (sap, ("sap",)),
              "dci": (dci, ("dci_disentanglement", "dci_completeness", "dci_informativeness")),
              "modularity": (modularity, ("modularity",)), "explicitness": (explicitness, ("explicitness",))}


def disentanglement_scores(codes, factors, *, seed: int = 0, protocols: Protocols = Protocols(),
                           metrics=METRICS, codes_kind: str = "mean", factor_names=None) -> dict:
    """Every metric in `metrics` (default all of METRICS) on one set of codes: {"scores": {name: value},
    "metrics": {metric: its full result with its protocol}, "protocols": protocols.to_dict(), "seed", "codes"}."""
    unknown = [m for m in metrics if m not in _FUNCTIONS]
    if unknown:
        raise ConfigError(f"unknown metric(s) {unknown}; choose from {list(METRICS)}", "disentanglement metrics")
    scores, results = {}, {}
    for name in metrics:
        fn, keys = _FUNCTIONS[name]
        result = fn(codes, factors, seed=seed, protocol=getattr(protocols, name), factor_binning=protocols.factors,
                    codes_kind=codes_kind, factor_names=factor_names)
        results[name] = result
        scores.update({k: result[k] for k in keys})
    return {"scores": scores, "metrics": results, "protocols": protocols.to_dict(), "seed": _seed(seed),
            "codes": codes_kind}


# ============================================================================================ a model


def no_factors_message(what: str) -> str:
    """The error of a dataset without ground-truth factors (the CLI's `evaluate --disentanglement` raises it)."""
    return (f"{what} has no ground-truth factors of variation, which the disentanglement metrics compare the codes "
            "with; pass --factors FILE (an .npy (N, F), or a .csv with a header row of factor names: one row of "
            "factor values per sample, in the data's order) or use --dataset dsprites")


def encode_codes(model, data, *, codes: str = "mean", seed: int = 0, batch_size: int = 512) -> dict:
    """The codes of every sample of `data` (an ArrayDataset), flattened, (N, latent_size) float64 numpy:
    posterior means (codes="mean"; a deterministic model's codes), or one draw z ~ q(z|x) per sample
    (codes="sampled", seeded; a model with a stochastic encoder only). Returns {"codes", "kl_per_dim" (a
    stochastic model's mean KL per dimension in nats, else None)}. A conditional model encodes with the labels."""
    import torch

    from vaelab.evaluation.metrics import latent_health

    if codes not in CODE_KINDS:
        raise ConfigError(f"codes={codes!r} must be one of {list(CODE_KINDS)}", "disentanglement report")
    stochastic = model.capabilities.stochastic
    if codes == "sampled" and not stochastic:
        raise VaelabError(f"codes='sampled' draws z ~ q(z|x), but model {model.config.model!r} has a deterministic "
                          "encoder: its codes are points, not distributions; use codes='mean'")
    if model.capabilities.conditional and data.y is None:
        raise VaelabError(f"model {model.config.model!r} is conditional and encodes each sample with its label, but "
                          f"dataset {data.name!r} has no labels")
    gen = torch.Generator().manual_seed(_seed(seed))
    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    out, means, logvars = [], [], []
    was_training = model.training
    model.eval()
    with torch.inference_mode():
        for start in range(0, len(data), batch_size):
            idx = torch.arange(start, min(start + batch_size, len(data)))
            x = data.batch(idx).to(device=device, dtype=dtype)
            cond = data.labels(idx).to(device) if model.capabilities.conditional else None
            if not stochastic:
                out.append(model.embed(x, cond).flatten(1).double().cpu())
                continue
            post = model.posteriors(x, cond)[""]  # the latent with the N(0, I) prior
            mean, logvar = post.mean.flatten(1).double().cpu(), post.logvar.flatten(1).double().cpu()
            means.append(mean)
            logvars.append(logvar)
            # the noise is drawn on the CPU in float64, so the draws do not depend on the device or the batch size
            out.append(mean + torch.exp(0.5 * logvar) * torch.randn(mean.shape, generator=gen, dtype=torch.float64)
                       if codes == "sampled" else mean)
    model.train(was_training)
    z = torch.cat(out).numpy() if out else np.zeros((0, model.latent_size))
    kl = latent_health(torch.cat(means), torch.cat(logvars))["kl_per_dim"] if means else None
    return {"codes": z, "kl_per_dim": kl}


def disentanglement_report(model, data, *, codes: str = "mean", seed: int = 0, protocols: Protocols = Protocols(),
                           metrics=METRICS, factors=None, factor_names=None, batch_size: int = 512) -> dict:
    """Encode `data` (an ArrayDataset with ground-truth factors: data.factors (N, F), data.factor_names; or give
    `factors`) and run every disentanglement metric on the codes (see disentanglement_scores). The result is
    JSON-ready and also holds the mutual-information matrix and, for a stochastic model, the KL per dimension."""
    if factors is None:
        factors, factor_names = data.factors, factor_names or data.factor_names
    if factors is None:
        raise VaelabError(no_factors_message(f"dataset {data.name!r}"))
    if len(factors) != len(data):
        raise DataError(f"{len(factors)} rows of factors for the {len(data)} samples of dataset {data.name!r}")
    encoded = encode_codes(model, data, codes=codes, seed=seed, batch_size=batch_size)
    report = disentanglement_scores(encoded["codes"], factors, seed=seed, protocols=protocols, metrics=metrics,
                                    codes_kind=codes, factor_names=factor_names)
    mi = mutual_information_matrix(encoded["codes"], factors, seed=seed, num_samples=protocols.mig.num_samples,
                                   codes_binning=protocols.mig.code_binning, factor_binning=protocols.factors,
                                   codes_kind=codes, factor_names=factor_names)
    return {**report, "n": len(data), "dataset": data.name, "mutual_information": mi,
            "kl_per_dim": encoded["kl_per_dim"]}


__all__ = ["CODE_KINDS", "BINNING_RULES", "METRICS", "SCORE_MEANINGS", "Protocol", "FactorBinning", "CodeBinning",
           "BetaVAEProtocol", "FactorVAEProtocol", "MIGProtocol", "SAPProtocol", "DCIProtocol", "ModularityProtocol",
           "ExplicitnessProtocol", "Protocols", "DISENTANGLEMENT_LIB", "discretize_codes", "discretize_factor",
           "entropy", "mutual_information", "mutual_information_matrix", "beta_vae_score", "factor_vae_score", "mig",
           "sap", "dci", "dci_from_importance", "modularity", "modularity_from_mi", "explicitness",
           "disentanglement_scores", "encode_codes", "disentanglement_report", "no_factors_message"]
