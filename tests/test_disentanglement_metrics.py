"""The disentanglement metrics (vaelab.evaluation.disentanglement) against answers known in closed form.

Most pools are full-factorial grids: every combination of factor values equally often, as dSprites. On such a
pool two different factors are exactly independent, so the plug-in mutual information between them is 0 up to
rounding, and the maxima below are reached exactly. Transforms of the codes that each metric should not see:
a permutation of the dimensions, a scaling (positive or negative) and a strictly monotone map of each dimension.
"""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from test_cli import assert_png, vaelab

from vaelab.errors import ConfigError, DataError
from vaelab.evaluation import disentanglement as dis

FAST_BETA = dis.BetaVAEProtocol(num_train=600, num_eval=2000)
FAST_FACTOR = dis.FactorVAEProtocol(num_train=600, num_eval=2000, num_variance_estimate=2000)


def grid(*sizes: int, repeat: int = 1) -> np.ndarray:
    """Every combination of factor values 0..size-1, `repeat` times: (repeat * prod(sizes), len(sizes))."""
    return np.repeat(np.array(list(itertools.product(*map(range, sizes))), dtype=np.float64), repeat, axis=0)


F = grid(2, 3, 4, repeat=10)  # 240 rows, three independent factors with 2, 3 and 4 values


def transforms(f: np.ndarray) -> dict[str, np.ndarray]:
    """Codes that are the factors themselves, seen through maps no metric should notice."""
    return {
        "identity": f,
        "permuted": f[:, [2, 0, 1]],
        "scaled": f * np.array([3.0, -0.5, 10.0]),  # one negative: a flipped axis
        "monotone": np.column_stack([np.exp(f[:, 0]), -(f[:, 1] ** 3), np.arctan(f[:, 2] - 1.5) + 7.0]),
    }


# ============================================================================ information of discrete labels


def test_entropy_and_mutual_information_in_nats():
    k = np.repeat(np.arange(5), 7)
    assert dis.entropy(k) == pytest.approx(math.log(5), abs=1e-12)
    # a relabelling carries all the information: I(a; g(a)) = H(a) for any injective g
    assert dis.mutual_information(k, 10 - 3 * k) == pytest.approx(math.log(5), abs=1e-12)
    a, b = grid(3, 4).T  # independent on a full grid: exactly nothing in common
    assert dis.mutual_information(a, b) == pytest.approx(0.0, abs=1e-12)
    # a hand-computed table: y = x for x in {0, 1}, y = 1 for x = 2, x uniform: I = H(y) = h(1/3, 2/3)
    x, y = np.array([0, 1, 2]), np.array([0, 1, 1])
    assert dis.mutual_information(x, y) == pytest.approx(-(1 / 3) * math.log(1 / 3) - (2 / 3) * math.log(2 / 3))
    assert dis.mutual_information(y, x) == dis.mutual_information(x, y)


def test_quantile_bins_see_only_the_order_and_equal_width_bins_only_affine_maps():
    z = np.random.default_rng(0).normal(size=(500, 3))
    quantile = dis.discretize_codes(z)
    assert quantile.min() == 0 and quantile.max() == 19
    assert np.bincount(quantile[:, 0]).tolist() == [25] * 20  # equal frequency
    assert (dis.discretize_codes(np.exp(z) * 4 - 1) == quantile).all()  # any increasing map: the same bins
    width = dis.CodeBinning(rule="equal_width")
    assert (dis.discretize_codes(3 * z + 1, width) == dis.discretize_codes(z, width)).all()
    tied = np.repeat([0.0, 1.0, 5.0], [10, 30, 60])[:, None]  # tied values share one bin
    assert dis.discretize_codes(tied).ravel().tolist() == [0] * 10 + [2] * 30 + [8] * 60
    assert (dis.discretize_codes(np.ones((9, 1))) == 0).all()  # a constant dimension: one bin


def test_factor_classes_follow_the_pinned_rule():
    values = np.array([0.5, 1.0, 0.5, 0.75])
    assert dis.discretize_factor(values).tolist() == [0, 2, 0, 1]  # <= 64 distinct values: the values' order
    many = np.linspace(0.0, 1.0, 65)  # 65 distinct values: 20 equal-width bins
    assert dis.discretize_factor(many).max() == 19
    assert dis.discretize_factor(many, dis.FactorBinning(max_classes=65)).max() == 64


# ======================================================================================= maxima


@pytest.mark.parametrize("kind", ["identity", "permuted", "scaled", "monotone"])
def test_codes_equal_to_the_factors_score_the_maximum(kind):
    """MIG 1, FactorVAE 1, BetaVAE 1, modularity 1 (exactly, up to rounding), DCI informativeness 1 and
    disentanglement and completeness near 1 (the boosted trees' importances are not exactly one-hot),
    explicitness near 1 (a linear classifier ranking the classes of a multi-valued factor from one axis)."""
    z = transforms(F)[kind]
    assert dis.mig(z, F)["mig"] == pytest.approx(1.0, abs=1e-12)
    assert dis.modularity(z, F)["modularity"] == pytest.approx(1.0, abs=1e-12)
    assert dis.factor_vae_score(z, F, protocol=FAST_FACTOR)["factor_vae_score"] == 1.0
    assert dis.beta_vae_score(z, F, protocol=FAST_BETA)["beta_vae_score"] == 1.0
    d = dis.dci(z, F)
    assert d["dci_informativeness"] == 1.0
    assert d["dci_disentanglement"] > 0.99 and d["dci_completeness"] > 0.99
    assert dis.explicitness(z, F)["explicitness"] > 0.99


def test_mig_of_a_factor_with_more_values_than_bins():
    """20 quantile bins over 32 equally frequent values: bin floor(20 i / 32) holds 2 values 12 times and 1 value
    8 times, so the binned code keeps H = (8/32) log 32 + (24/32) log 16 = 4.25 log 2 of the factor's 5 log 2:
    0.85 of it. With 32 bins every value has its own bin again."""
    f = grid(32, 2, repeat=3)
    capped = dis.mig(f, f)
    assert capped["mig_per_factor"] == {"factor0": pytest.approx(0.85, abs=1e-12), "factor1": pytest.approx(1.0)}
    assert dis.mig(f, f, protocol=dis.MIGProtocol(code_binning=dis.CodeBinning(bins=32)))["mig"] == pytest.approx(1.0)


def test_dci_sees_only_the_order_of_each_dimension():
    # trees split on thresholds between sorted values: a monotone map gives the same trees, the same importances
    a, b = dis.dci(F, F), dis.dci(transforms(F)["monotone"], F)
    for key in ("dci_disentanglement", "dci_completeness", "dci_informativeness"):
        assert a[key] == pytest.approx(b[key], abs=1e-9)


def test_sap_maxima_depend_on_the_score_of_one_dimension():
    # continuous (R^2): identity, permuted and scaled codes score exactly 1 (R^2 is 1 with the own factor and 0
    # with the others on a full grid); R^2 is linear, so a monotone but curved map scores below 1
    cont = dis.SAPProtocol(factor_kind="continuous")
    for kind in ("identity", "permuted", "scaled"):
        assert dis.sap(transforms(F)[kind], F, protocol=cont)["sap"] == pytest.approx(1.0, abs=1e-12)
    assert dis.sap(transforms(F)["monotone"], F, protocol=cont)["sap"] < 0.99
    # discrete (disentanglement_lib's LinearSVC accuracy): an uninformative dimension still scores the accuracy
    # of a guess, 1/2 on a balanced binary factor, so identity codes of binary factors score 1 - 1/2 = 0.5,
    # up to the sampling noise of the 2 other dimensions' test accuracy (667 test rows: sd 0.02)
    binary = grid(2, 2, 2, repeat=250)
    for kind, z in transforms(binary).items():
        s = dis.sap(z, binary)
        assert s["sap"] == pytest.approx(0.5, abs=0.06), kind
        assert np.sort(np.array(s["sap_matrix"]), axis=0)[-1].tolist() == [1.0, 1.0, 1.0]


# ======================================================================= mixtures: predictable losses


def test_mig_of_mixed_codes():
    """Two independent uniform factors f1, f2 in {0..3} on a full grid, L = log 4 = H(f1) = H(f2):
    - rotated, z = (f1 + f2, f1 - f2): I(z1; f1) = I(z2; f1) = H(f1 + f2) - L by symmetry: every gap is 0, MIG 0;
    - sheared, z = (f1 + f2, f2): gap(f1) = (H(s) - L) / L, gap(f2) = (L - (H(s) - L)) / L: MIG = 1/2 exactly;
    - duplicated, z = (f1, f1, f2): the gap of f1 is 0, of f2 is 1: MIG = 1/2;
    - jointly encoded in one dimension, z = (4 f1 + f2, 0): MIG 1 (MIG only asks that each factor's information
      sit in one dimension; modularity sees the mix, below)."""
    f = grid(4, 4, repeat=5)
    f1, f2 = f.T
    assert dis.mig(np.column_stack([f1 + f2, f1 - f2]), f)["mig"] == pytest.approx(0.0, abs=1e-12)
    sheared = dis.mig(np.column_stack([f1 + f2, f2]), f)
    assert sheared["mig"] == pytest.approx(0.5, abs=1e-12)
    s = np.array([1, 2, 3, 4, 3, 2, 1]) / 16  # the distribution of f1 + f2
    h_sum, big_l = -np.sum(s * np.log(s)), math.log(4)
    assert sheared["mig_per_factor"]["factor0"] == pytest.approx((h_sum - big_l) / big_l, abs=1e-12)
    assert dis.mig(np.column_stack([f1, f1, f2]), f)["mig"] == pytest.approx(0.5, abs=1e-12)
    assert dis.mig(np.column_stack([4 * f1 + f2, np.zeros_like(f1)]), f)["mig"] == pytest.approx(1.0, abs=1e-12)


def test_modularity_of_mixed_codes():
    """A dimension with mutual information m_1, m_2 with two factors has modularity 1 - (m_min / m_max)^2:
    z = 4 f1 + f2 with f1 in {0, 1}, f2 in {0..3} holds log 2 about f1 and log 4 about f2: 1 - (1/2)^2 = 0.75.
    The rotation z = (f1 + f2, f1 - f2) of two 4-valued factors gives each dimension equal information about both:
    modularity 0."""
    f = grid(2, 4, repeat=5)
    assert dis.modularity((4 * f[:, 0] + f[:, 1])[:, None], f)["modularity"] == pytest.approx(0.75, abs=1e-12)
    g = grid(4, 4, repeat=5)
    rotated = np.column_stack([g[:, 0] + g[:, 1], g[:, 0] - g[:, 1]])
    assert dis.modularity(rotated, g)["modularity"] == pytest.approx(0.0, abs=1e-12)
    assert dis.modularity_from_mi([[1.0, 0.0], [0.0, 2.0]])["modularity"] == 1.0
    assert dis.modularity_from_mi([[0.3], [0.0]]) == {"modularity": 1.0, "modularity_per_dim": [1.0, None],
                                                      "dims_scored": 1}


def test_sap_continuous_of_mixed_codes():
    """R^2 of f1 + f2 with f1 (equal variances, independent) is 1/2. Rotated codes: both dimensions score 1/2 for
    both factors, SAP 0; sheared codes (f1 + f2, f2): gaps 1/2 - 0 and 1 - 1/2, SAP 1/2."""
    f = grid(4, 4, repeat=5)
    f1, f2 = f.T
    cont = dis.SAPProtocol(factor_kind="continuous")
    assert dis.sap(np.column_stack([f1 + f2, f1 - f2]), f, protocol=cont)["sap"] == pytest.approx(0.0, abs=1e-12)
    assert dis.sap(np.column_stack([f1 + f2, f2]), f, protocol=cont)["sap"] == pytest.approx(0.5, abs=1e-12)


def test_dci_from_an_importance_matrix():
    """Closed forms of the DCI scores of importance matrices R (dimensions x factors)."""
    assert dis.dci_from_importance(np.eye(3))["disentanglement"] == pytest.approx(1.0)
    uniform = dis.dci_from_importance(np.ones((3, 3)))
    assert uniform["disentanglement"] == pytest.approx(0.0, abs=1e-12)
    assert uniform["completeness"] == pytest.approx(0.0, abs=1e-12)
    # one dimension for both factors: not disentangled (its entropy over 2 factors is 1 bit), but complete
    one = dis.dci_from_importance([[1.0, 1.0], [0.0, 0.0]])
    assert (one["disentanglement"], one["completeness"]) == (pytest.approx(0.0, abs=1e-12), pytest.approx(1.0))
    # R = [[.5, .5], [0, 1]]: disentanglement = 1/2 * 0 + 1/2 * 1; completeness = 1/4 * 1 + 3/4 (1 - h2(1/3))
    r = dis.dci_from_importance([[0.5, 0.5], [0.0, 1.0]])
    h2 = -(1 / 3) * math.log2(1 / 3) - (2 / 3) * math.log2(2 / 3)
    assert r["disentanglement"] == pytest.approx(0.5, abs=1e-12)
    assert r["completeness"] == pytest.approx(0.25 + 0.75 * (1 - h2), abs=1e-12)
    assert dis.dci_from_importance(np.zeros((2, 2)))["disentanglement"] == 0.0  # nothing predicted: 0, not NaN
    assert dis.dci_from_importance([[0.2], [0.7]])["disentanglement"] == 1.0  # one factor: trivially 1


def test_dci_of_rotated_codes_is_low():
    # each factor needs both rotated dimensions about equally: the importances spread, disentanglement near 0
    f = grid(4, 4, repeat=10)
    d = dis.dci(np.column_stack([f[:, 0] + f[:, 1], f[:, 0] - f[:, 1]]), f)
    assert d["dci_disentanglement"] < 0.2 and d["dci_completeness"] < 0.2
    assert d["dci_informativeness"] == 1.0  # still all the information


def test_factor_vae_and_beta_vae_scores_of_codes_missing_a_factor():
    """Codes (f1, f3) and factors (f1, f2), f3 an independent copy-like factor the metric is not told about
    (8 values each, a full grid): fixing f1 zeroes dimension 0 (a correct vote); fixing f2 leaves both dimensions
    at their global variance, each the arg-min about half the time. The majority vote maps dimension 0 to f1 and
    dimension 1 to f2: accuracy 1/2 + 1/2 * 1/2 = 3/4.
    BetaVAE with factors (f1, f2, f4), codes (f1, f3): fixing f1 is seen (a zero feature); f2 and f4 give the same
    features: accuracy 1/3 + 2/3 * 1/2 = 2/3."""
    g = grid(8, 8, 8, repeat=2)
    z = g[:, [0, 2]]
    fv = dis.factor_vae_score(z, g[:, :2], protocol=FAST_FACTOR)
    assert fv["factor_vae_score"] == pytest.approx(0.75, abs=0.04)
    h = grid(4, 4, 4, 4, repeat=2)
    bv = dis.beta_vae_score(h[:, [0, 2]], h[:, [0, 1, 3]], protocol=FAST_BETA)
    assert bv["beta_vae_score"] == pytest.approx(2 / 3, abs=0.05)


# ============================================================================ codes knowing nothing


def test_independent_codes_score_near_zero_within_the_plug_in_bias():
    """Uniform noise (N = 10,000, 4 dimensions) against a 4-valued factor, 20 quantile bins: 2N I is about
    chi^2 with df = (20 - 1)(4 - 1) = 57 degrees of freedom (Miller 1955), so the plug-in MI of each pair has mean
    df / 2N = 0.00285 nats and standard deviation sqrt(2 df) / 2N = 0.00053; the largest of 8 such values stays
    below (df + 5 sqrt(2 df)) / 2N, and a MIG gap is smaller still, relative to H(f) = log 4."""
    rng = np.random.default_rng(0)
    f = rng.integers(0, 4, size=(10_000, 2)).astype(float)
    z = rng.random((10_000, 4))
    df, n2 = 19 * 3, 2 * 10_000
    result = dis.mig(z, f)
    mi = np.array(result["mutual_information"])
    assert mi.mean() == pytest.approx(df / n2, rel=0.25)
    assert mi.max() < (df + 5 * math.sqrt(2 * df)) / n2
    assert result["mig"] < (df + 5 * math.sqrt(2 * df)) / n2 / math.log(4)
    assert dis.factor_vae_score(z, f, protocol=FAST_FACTOR)["factor_vae_score"] == pytest.approx(0.5, abs=0.1)
    assert dis.explicitness(z, f)["explicitness"] == pytest.approx(0.5, abs=0.03)
    d = dis.dci(z[:3000], f[:3000], protocol=dis.DCIProtocol(n_estimators=20))
    assert d["dci_informativeness"] == pytest.approx(0.25, abs=0.05)  # chance for 4 classes


# ======================================================================= degenerate codes and factors


def test_constant_and_duplicated_dimensions_give_finite_documented_scores():
    z = np.column_stack([F, np.zeros(len(F)), F[:, 1]])  # a constant dimension and a copy of factor 1's
    result = dis.disentanglement_scores(z, F, protocols=dis.Protocols(beta_vae=FAST_BETA, factor_vae=FAST_FACTOR))
    assert all(np.isfinite(v) for v in result["scores"].values())
    s = result["scores"]
    assert s["mig"] == pytest.approx(2 / 3, abs=1e-12)  # factor 1 lives in two dimensions: its gap is 0
    assert s["modularity"] == pytest.approx(1.0, abs=1e-12)  # the constant dimension is left out, not scored 0
    assert result["metrics"]["modularity"]["protocol"]["dims_scored"] == 4
    assert s["factor_vae_score"] == 1.0  # ties go to the first dimension; the constant one is pruned
    assert 3 not in result["metrics"]["factor_vae"]["protocol"]["active_dims"]
    assert s["beta_vae_score"] == 1.0
    assert result["metrics"]["dci"]["importance"][3] == [0.0, 0.0, 0.0]  # a constant dimension is never used
    # every dimension constant: nothing to measure, and still numbers
    flat = np.zeros((len(F), 2))
    assert dis.factor_vae_score(flat, F, protocol=FAST_FACTOR)["factor_vae_score"] == 0.0
    assert dis.mig(flat, F)["mig"] == 0.0
    assert dis.modularity(flat, F)["modularity"] == 0.0


def test_constant_factors_are_skipped_and_named():
    f = np.column_stack([F, np.full(len(F), 0.7)])
    result = dis.mig(F, f, factor_names=["shape", "scale", "x", "colour"])
    assert result["mig"] == pytest.approx(1.0, abs=1e-12)
    assert result["protocol"]["factors"] == ["shape", "scale", "x"]
    assert result["protocol"]["factors_skipped"] == [{"factor": "colour",
                                                      "reason": "constant (every sample has value 0.7)"}]
    with pytest.raises(DataError, match="every factor is constant"):
        dis.mig(F, np.ones((len(F), 2)))


def test_bad_inputs_are_refused_with_their_reason():
    with pytest.raises(DataError, match="240 rows of codes but 10 rows of factors"):
        dis.mig(F, F[:10])
    bad = F.copy()
    bad[3, 1] = np.nan
    with pytest.raises(DataError, match="1 non-finite"):
        dis.sap(bad, F)
    with pytest.raises(DataError, match="codes='median'"):
        dis.mig(F, F, codes_kind="median")
    with pytest.raises(ConfigError, match="rule='kmeans'"):
        dis.CodeBinning(rule="kmeans")
    with pytest.raises(ConfigError, match="batch_size=1"):
        dis.FactorVAEProtocol(batch_size=1)
    with pytest.raises(ConfigError, match="seed=-1"):
        dis.mig(F, F, seed=-1)


# ============================================================================================ protocol


def test_every_result_carries_its_protocol_and_is_reproducible():
    protocols = dis.Protocols(beta_vae=FAST_BETA, factor_vae=FAST_FACTOR, dci=dis.DCIProtocol(n_estimators=10))
    a = dis.disentanglement_scores(F, F, seed=3, protocols=protocols, codes_kind="sampled",
                                   factor_names=["shape", "scale", "x"])
    assert json.loads(json.dumps(a)) == a  # JSON-ready as it is
    for name, result in a["metrics"].items():
        p = result["protocol"]
        assert p["seed"] == 3 and p["codes"] == "sampled" and p["factors"] == ["shape", "scale", "x"], name
        assert p["factor_binning"] == {"max_classes": 64, "bins": 20}
        assert p["pool_size"] == 240 and p["code_dims"] == 3 and p["sklearn"] and p["numpy"]
        settings = getattr(protocols, name).to_dict()
        assert {k: p[k] for k in settings} == settings  # every setting of the metric's protocol, as used
    assert a["metrics"]["mig"]["protocol"]["code_binning"] == {"bins": 20, "rule": "quantile"}
    assert a["metrics"]["dci"]["protocol"]["n_estimators"] == 10
    assert a == dis.disentanglement_scores(F, F, seed=3, protocols=protocols, codes_kind="sampled",
                                           factor_names=["shape", "scale", "x"])  # the same seed, the same numbers
    lib = dis.mig(F, F, protocol=dis.DISENTANGLEMENT_LIB.mig)
    assert lib["protocol"]["code_binning"]["rule"] == "equal_width"


def test_equal_width_bins_lose_information_that_quantile_bins_keep():
    # exp squeezes the low values of a 10-valued factor into one of 20 equal-width bins: MIG drops below 1 with
    # disentanglement_lib's binning, and stays 1 with the default quantile bins
    f = grid(10, 3, repeat=4)
    z = np.column_stack([np.exp(f[:, 0]), f[:, 1]])
    assert dis.mig(z, f)["mig"] == pytest.approx(1.0, abs=1e-12)
    assert dis.mig(z, f, protocol=dis.DISENTANGLEMENT_LIB.mig)["mig"] < 0.8


# ======================================================================== a model, and the command line


def squares(repeat: int) -> tuple[np.ndarray, np.ndarray]:
    """12 x 12 images of a bright square, factors (x, y, size): 4 x 4 x 2 combinations, `repeat` times each."""
    f = grid(4, 4, 2, repeat=repeat)
    x = np.zeros((len(f), 1, 12, 12), dtype=np.uint8)
    for i, (px, py, size) in enumerate(f.astype(int)):
        x[i, 0, 2 * py:2 * py + 3 + size, 2 * px:2 * px + 3 + size] = 255
    return x, f


def test_report_encodes_a_dataset_and_scores_it():
    import torch

    from vaelab.data.arrays import ArrayDataset
    from vaelab.errors import VaelabError
    from vaelab.models import build_model

    torch.manual_seed(0)
    x, f = squares(2)
    data = ArrayDataset(torch.from_numpy(x), name="squares", factors=torch.from_numpy(f),
                        factor_names=["x", "y", "size"])
    vae = build_model(model="vae", arch="mlp", latent_dim=3, hidden=(16,), input_shape=(1, 12, 12))
    quick = dis.Protocols(beta_vae=FAST_BETA, factor_vae=FAST_FACTOR, dci=dis.DCIProtocol(n_estimators=5))
    report = dis.disentanglement_report(vae, data, protocols=quick, metrics=("mig", "dci", "factor_vae"))
    assert set(report["scores"]) == {"mig", "dci_disentanglement", "dci_completeness", "dci_informativeness",
                                     "factor_vae_score"}
    assert report["codes"] == "mean" and report["n"] == 64 and len(report["kl_per_dim"]) == 3
    assert report["metrics"]["mig"]["protocol"]["factors"] == ["x", "y", "size"]
    assert np.array(report["mutual_information"]["mutual_information"]).shape == (3, 3)
    sampled = dis.disentanglement_report(vae, data, codes="sampled", protocols=quick, metrics=("mig",))
    assert sampled["metrics"]["mig"]["protocol"]["codes"] == "sampled"
    assert sampled["scores"] != report["scores"] or sampled["mutual_information"] != report["mutual_information"]
    ae = build_model(model="ae", arch="mlp", latent_dim=3, hidden=(16,), input_shape=(1, 12, 12))
    assert dis.disentanglement_report(ae, data, protocols=quick, metrics=("mig",))["kl_per_dim"] is None
    with pytest.raises(VaelabError, match="deterministic encoder"):
        dis.disentanglement_report(ae, data, codes="sampled", metrics=("mig",))
    with pytest.raises(VaelabError, match="--factors FILE"):
        dis.disentanglement_report(vae, ArrayDataset(torch.from_numpy(x), name="plain"))


@pytest.fixture(scope="module")
def squares_run(tmp_path_factory):
    """A VAE trained for one epoch on the squares (own train and test splits) without factors, and the factors
    as a .csv file (the train rows, then the test rows)."""
    root = tmp_path_factory.mktemp("squares")
    (x_train, f_train), (x_test, f_test) = squares(6), squares(2)
    np.savez(root / "squares.npz", x_train=x_train, x_test=x_test)
    rows = np.concatenate([f_train, f_test]).astype(int)
    (root / "factors.csv").write_text("x,y,size\n" + "\n".join(",".join(map(str, r)) for r in rows) + "\n")
    run = root / "run"
    vaelab("train", "--model", "vae", "--arch", "mlp", "--latent-dim", 4, "--hidden", 32, "--epochs", 1,
           "--batch-size", 32, "--dataset", root / "squares.npz", "--out", run, "--no-pictures", "--no-progress",
           check=0)
    return run, root / "factors.csv"


def test_evaluate_disentanglement_without_factors_names_the_flag(squares_run):
    run, _ = squares_run
    proc = vaelab("evaluate", run, "--disentanglement", check=1)
    assert proc.stderr == (
        "vaelab: error: the test split of dataset 'squares' has no ground-truth factors of variation, which the "
        "disentanglement metrics compare the codes with; pass --factors FILE (an .npy (N, F), or a .csv with a "
        "header row of factor names: one row of factor values per sample, in the data's order) or use --dataset "
        "dsprites\n")
    assert not (run / "mi_matrix.png").exists()


def test_evaluate_disentanglement_writes_scores_protocols_and_pictures(squares_run):
    run, factors = squares_run
    proc = vaelab("evaluate", run, "--disentanglement", "--factors", factors, check=0)
    ev = json.loads((run / "evaluation.json").read_text())
    report = ev["disentanglement"]
    assert set(report["scores"]) == set(dis.SCORE_MEANINGS)
    assert all(0.0 <= v <= 1.0 for v in report["scores"].values())
    for name, result in report["metrics"].items():
        p = result["protocol"]
        assert p["factors"] == ["x", "y", "size"] and p["codes"] == "mean" and p["seed"] == 0, name
        assert p["pool_size"] == 64 and p["code_dims"] == 4
    assert report["metrics"]["mig"]["protocol"]["code_binning"] == {"bins": 20, "rule": "quantile"}
    assert "loss" in ev and ev["n"] == 64  # the usual report is still there
    for key in ("mig", "dci_disentanglement", "factor_vae_score"):
        assert key in proc.stdout
    assert_png(run / "mi_matrix.png")
    pngs = sorted((run / "traversals").glob("rank*-z*.png"))
    assert [p.name[:6] for p in pngs] == ["rank01", "rank02", "rank03", "rank04"]  # every dimension, by KL
    kl = report["kl_per_dim"]
    assert int(pngs[0].stem.split("-z")[1]) == max(range(4), key=lambda d: kl[d])
    with Image.open(run / "traversals.gif") as gif:
        assert gif.format == "GIF" and gif.n_frames == 2 * 11 - 2  # forward and back


def test_mi_matrix_and_traversal_gif_pictures(tmp_path):
    from vaelab.errors import VaelabError
    from vaelab.plotting import save_mi_matrix, save_traversal_gif

    mi = np.array([[0.69, 0.01], [0.0, 1.2], [0.02, 0.03]])
    assert_png(Path(save_mi_matrix(mi, tmp_path / "mi.png", ["shape", "scale"], factor_entropy=[0.69, 1.4],
                                   title="a title")))
    assert_png(Path(save_mi_matrix(mi, tmp_path / "nats.png", ["shape", "scale"])))  # in nats: no entropies
    with pytest.raises(VaelabError, match="3 factor names for a matrix of 2 factors"):
        save_mi_matrix(mi, tmp_path / "bad.png", ["a", "b", "c"])
    frames = np.random.default_rng(0).random((2, 3, 4, 1, 8, 8))  # 2 dimensions x 3 images x 4 steps
    save_traversal_gif(frames, tmp_path / "t.gif", [-1, 0, 1, 2], row_labels=["z[0]", "z[1]"], title="t")
    with Image.open(tmp_path / "t.gif") as gif:
        assert gif.n_frames == 6  # 0 1 2 3 2 1, then it loops
        sizes = set()
        for i in range(gif.n_frames):
            gif.seek(i)
            sizes.add(gif.size)
        assert len(sizes) == 1
    with pytest.raises(VaelabError, match="3 values for 4 steps"):
        save_traversal_gif(frames, tmp_path / "u.gif", [0, 1, 2])
