"""The latent-density, combined and auto anomaly scores, and one-class on any labelled dataset."""

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.stats import multivariate_normal

from vaelab.anomaly import AnomalyDetector, auroc, one_class
from vaelab.data import ArrayDataset
from vaelab.errors import ConfigError
from vaelab.evaluation.scores import (AUTO_CANDIDATES, SCORE_CHOICES, anomaly_scores, choose_score,
                                      combination_statistics, fit_latent_mixture, mixture_log_density,
                                      pseudo_anomalies, residual_nll, residual_variance, robust_standardization)

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("VAELAB_TEST_DATA") or REPO.parent / "shared" / "data")
TABLE = dict(hidden=(32,), latent_dim=2, epochs=20, threads=1)


def _planted(n=400, d=8, frac=0.05, seed=0):
    """Rows near a 2-D curved manifold and a known fraction pushed off it: (X, is_anomaly)."""
    rng = np.random.RandomState(seed)
    x = np.tanh(rng.randn(n, 2) @ rng.randn(2, 8)) @ rng.randn(8, d) + 0.05 * rng.randn(n, d)
    bad = np.zeros(n, bool)
    bad[rng.choice(n, int(frac * n), replace=False)] = True
    x[bad] += rng.randn(int(bad.sum()), d) * x.std(0)
    return x, bad


@pytest.fixture(scope="module")
def planted():
    return _planted()


# ============================================================================ the Gaussian mixture score


def test_mixture_log_density_is_the_gaussian_mixture_formula():
    rng = np.random.RandomState(0)
    means = np.array([[0.0, 1.0, -1.0], [3.0, -2.0, 0.5]])
    a = rng.randn(2, 3, 3)
    covs = a @ a.transpose(0, 2, 1) + 0.5 * np.eye(3)
    weights = np.array([0.3, 0.7])
    z = rng.randn(50, 3) * 2
    expected = np.log(weights[0] * multivariate_normal(means[0], covs[0]).pdf(z)
                      + weights[1] * multivariate_normal(means[1], covs[1]).pdf(z))
    found = mixture_log_density(z, {"weights": weights, "means": means, "covariances": covs})
    np.testing.assert_allclose(found, expected, rtol=1e-10, atol=1e-10)


def test_gmm_on_one_gaussian_chooses_one_component_and_its_density():
    rng = np.random.RandomState(1)
    mean, cov = np.array([1.0, -2.0, 0.5]), np.array([[2.0, 0.6, 0.0], [0.6, 1.0, 0.3], [0.0, 0.3, 0.5]])
    codes = rng.multivariate_normal(mean, cov, size=20000)
    mix = fit_latent_mixture(codes, max_components=3, seed=0)
    assert len(mix["weights"]) == 1 and list(mix["bic"]) == [1, 2, 3] and min(mix["bic"], key=mix["bic"].get) == 1
    z = rng.multivariate_normal(mean, cov, size=200)
    # the fitted density is the analytic one up to the sampling error of 20,000 rows (larger in the tails)
    error = np.abs(mixture_log_density(z, mix) - multivariate_normal(mean, cov).logpdf(z))
    assert error.mean() < 0.03 and error.max() < 0.15


def test_gmm_chooses_two_components_for_two_separated_clusters():
    rng = np.random.RandomState(2)
    codes = np.r_[rng.randn(1500, 2), rng.randn(500, 2) + [8.0, 0.0]]
    mix = fit_latent_mixture(codes, seed=0)
    assert len(mix["weights"]) == 2
    np.testing.assert_allclose(np.sort(mix["weights"]), [0.25, 0.75], atol=0.01)


def test_gmm_on_collapsed_codes_stays_finite():
    codes = np.c_[np.random.RandomState(3).randn(100, 1), np.zeros((100, 1))]  # the second dim collapsed
    mix = fit_latent_mixture(codes)
    assert np.isfinite(mixture_log_density(np.array([[0.0, 0.0], [0.0, 1.0]]), mix)).all()
    assert fit_latent_mixture(np.zeros((1, 2)))["weights"].tolist() == [1.0]


# ============================================================================ the combined score


def test_robust_standardization_is_the_median_and_the_iqr():
    centre, scale = robust_standardization(np.arange(101.0))  # quartiles 25, 75
    assert centre == 50.0 and scale == pytest.approx(50 / 1.349, rel=1e-12)
    assert robust_standardization([2.0, 2.0, 2.0, 2.0]) == (2.0, 1.0)  # constant: unit scale


def test_combined_is_the_sum_of_the_standardised_parts(planted):
    x, _ = planted
    det = AnomalyDetector(score_type="combined", **TABLE).fit(x)
    found = det.anomaly_scores(x, kinds=["recon", "gmm", "combined"])
    (cr, sr), (cg, sg) = det.combination_["recon"], det.combination_["gmm"]
    np.testing.assert_allclose(found["combined"], (found["recon"] - cr) / sr + (found["gmm"] - cg) / sg,
                               rtol=1e-12)
    # the standardisation comes from the held-out 20% of X (the model trained on the other 80%)
    from vaelab.sklearn import _split

    train, held = _split(det._dataset(x, reset=False), 0.2, det.seed_)
    assert (len(train), len(held)) == (320, 80)
    parts = anomaly_scores(det.model_, held, ("recon", "gmm"), mixture=det.mixture_)
    assert combination_statistics(parts) == det.combination_


def test_combination_statistics_of_known_scores():
    stats = combination_statistics({"recon": np.arange(101.0), "gmm": np.arange(101.0) * 2, "elbo": np.zeros(3)})
    assert stats == {"recon": [50.0, 50 / 1.349], "gmm": [100.0, 100 / 1.349]}


# ============================================================================ the zrecon score


def test_residual_nll_is_the_diagonal_gaussian_formula():
    rng = np.random.RandomState(4)
    var = rng.uniform(0.01, 2.0, size=5)
    r = rng.randn(30, 5) * np.sqrt(var) * 1.5
    expected = -multivariate_normal(np.zeros(5), np.diag(var)).logpdf(r)
    np.testing.assert_allclose(residual_nll(torch.from_numpy(r), var).numpy(), expected, rtol=1e-12)


def test_residual_variance_is_the_shrunk_mean_squared_residual(planted):
    x, _ = planted
    det = AnomalyDetector(score_type="zrecon", **TABLE).fit(x)
    data = det._dataset(x, reset=False)
    xx = data.to_float().double()
    with torch.inference_mode():
        r = (xx - det.model_.reconstruct(xx)).numpy()
    m = (r ** 2).mean(0)
    np.testing.assert_allclose(det.residual_var_, 0.9 * m + 0.1 * m.mean(), rtol=1e-10)
    np.testing.assert_allclose(residual_variance(det.model_, data, shrink=1.0), np.full(8, m.mean()), rtol=1e-10)
    found = det.anomaly_scores(x, kinds=["zrecon"])["zrecon"]
    np.testing.assert_allclose(found, residual_nll(torch.from_numpy(r), det.residual_var_).numpy(), rtol=1e-10)
    np.testing.assert_array_equal(-det.score_samples(x), found)
    with pytest.raises(ConfigError) as e:
        residual_variance(det.model_, data, shrink=0.0)
    assert "shrink=0.0 must be a number in (0, 1]" in str(e.value)
    with pytest.raises(ConfigError) as e:
        anomaly_scores(det.model_, data, ("zrecon",))
    assert "score type 'zrecon' needs each feature's residual variance on normal data" in str(e.value)
    with pytest.raises(ConfigError) as e:
        anomaly_scores(det.model_, data, ("zrecon",), residual_var=np.ones(3))
    assert "residual_var holds 3 variances, but the rows of" in str(e.value) and "have 8 features" in str(e.value)


def test_zrecon_sees_a_broken_dependency_that_noisy_columns_hide_from_recon():
    """Columns 0 and 1 are one value twice (the autoencoder's one latent dimension reconstructs them well);
    columns 2-5 are independent noise it cannot reconstruct. Anomalies move column 1 away from column 0: recon
    drowns that in the noise columns' residuals, zrecon weighs each column by its own residual scale."""
    rng = np.random.RandomState(5)
    n = 1000
    t = rng.randn(n)
    x = np.c_[t, t, rng.randn(n, 4)] + 0.05 * rng.randn(n, 6)
    bad = np.zeros(n, bool)
    bad[rng.choice(n, 30, replace=False)] = True
    x[bad, 1] += rng.choice([-1, 1], 30) * 1.0
    det = AnomalyDetector(model="ae", latent_dim=1, hidden=(32,), epochs=40, threads=1,
                          score_type="zrecon").fit(x[~bad])
    found = det.anomaly_scores(x, kinds=["recon", "zrecon"])
    assert auroc(found["zrecon"], bad) > 0.8 and auroc(found["recon"], bad) < 0.65
    assert det.residual_var_[2:].min() > 5 * det.residual_var_[:2].max()


def test_standardize_pixels_is_training_on_standardized_images(tmp_path):
    from sklearn.datasets import load_digits

    images, labels = load_digits(return_X_y=True)
    images = (images.reshape(-1, 1, 8, 8) / 16.0).astype(np.float32)  # (N, C, H, W) in [0, 1]
    normal, rest = images[labels == 0], images[labels != 0][:100]
    small = dict(hidden=(32,), latent_dim=4, epochs=5, threads=1, score_type="zrecon")
    det = AnomalyDetector(**small).fit(normal)  # standardize_pixels=True: the default
    x = torch.from_numpy(normal).double()
    v = x.var(0, unbiased=False).numpy()
    np.testing.assert_allclose(det.pixel_mean_, x.mean(0).numpy(), rtol=1e-12)
    np.testing.assert_allclose(det.pixel_scale_ ** 2, 0.9 * v + 0.1 * v.mean(), rtol=1e-12)
    assert det.pixel_mean_.shape == (1, 8, 8) and (v == 0).any()  # a border pixel never inked: finite scale
    # the same as a detector given the standardized images themselves, bit for bit
    def standardized(a):
        return ArrayDataset(((torch.from_numpy(a).double() - torch.from_numpy(det.pixel_mean_))
                             / torch.from_numpy(det.pixel_scale_)).float(), None, 1.0)
    plain = AnomalyDetector(standardize_pixels=False, **small).fit(standardized(normal))
    assert plain.pixel_mean_ is None
    np.testing.assert_array_equal(det.score_samples(rest), plain.score_samples(standardized(rest)))
    assert det.offset_ == plain.offset_
    det.save(tmp_path / "det")
    back = AnomalyDetector.load(tmp_path / "det")
    np.testing.assert_array_equal(back.pixel_scale_, det.pixel_scale_)
    np.testing.assert_array_equal(back.score_samples(rest), det.score_samples(rest))
    raw = AnomalyDetector(standardize_pixels=False, **small).fit(normal)  # pixels in [0, 1]
    assert raw.pixel_mean_ is None and raw.model_.config.input_shape == (1, 8, 8)


@pytest.mark.parametrize("score_type", ["gmm", "zrecon", "combined", "auto"])
def test_new_scores_find_planted_anomalies(planted, score_type):
    x, bad = planted
    det = AnomalyDetector(score_type=score_type, **TABLE).fit(x)
    # as the Mahalanobis score, the latent density sees rows pushed off the manifold least well
    assert auroc(-det.score_samples(x), bad) > (0.85 if score_type == "gmm" else 0.9)
    # contamination 0.1 flags 10% of X, held-out rows (combined, auto) included
    assert det.predict(x).tolist().count(-1) == pytest.approx(0.1 * len(x), abs=1)


# ============================================================================ the auto choice


def test_pseudo_anomalies_are_halves_of_two_normal_rows():
    x = torch.arange(60, dtype=torch.float32).reshape(6, 10)
    fake = pseudo_anomalies(ArrayDataset(x, None, 1.0), seed=0).to_float()
    for k, row in enumerate(fake):
        kept = (row == x[k]).nonzero().squeeze(1)
        block = (row != x[k]).nonzero().squeeze(1)
        assert len(kept) == len(block) == 5 and (block.diff() == 1).all()  # one contiguous half replaced
        other = int(row[block[0]]) // 10  # the values are unique: they name their source row
        assert other != k and (row[block] == x[other, block]).all()
    img = torch.zeros(4, 1, 8, 8, dtype=torch.uint8)
    img[torch.arange(4), :, :, :] = torch.tensor([0, 50, 100, 250], dtype=torch.uint8).view(4, 1, 1, 1)
    out = pseudo_anomalies(ArrayDataset(img, None, 255.0), seed=1).to_float()
    assert out.shape == (4, 1, 8, 8)
    for k in range(4):  # each image: 4 whole image rows from another image, 4 of its own
        per_row = out[k, 0, :, 0]
        assert (out[k, 0] == per_row[:, None]).all() and (per_row == img[k, 0, 0, 0] / 255.0).sum() == 4


def test_auto_chooses_the_best_candidate_on_held_out_rows_only(planted):
    x, bad = planted
    det = AnomalyDetector(score_type="auto", **TABLE).fit(x)
    assert set(det.auto_table_) == set(AUTO_CANDIDATES)
    assert det.auto_choice_ == max(AUTO_CANDIDATES, key=lambda k: det.auto_table_[k])
    found = det.anomaly_scores(x, kinds=["auto", det.auto_choice_])
    np.testing.assert_array_equal(found["auto"], found[det.auto_choice_])
    np.testing.assert_array_equal(-det.score_samples(x), found["auto"])
    # the choice is a function of the model and held-out normal rows: choose_score gives the same table
    held = det._dataset(x, reset=False).subset(torch.arange(50))
    choice, table = choose_score(det.model_, held, ["recon", "gmm"], seed=0, **det._fitted_keywords())
    assert choice in ("recon", "gmm") and set(table) == {"recon", "gmm"}


def test_auto_with_an_autoencoder_skips_the_sampled_scores(planted):
    x, _ = planted
    det = AnomalyDetector(model="ae", score_type="auto", **TABLE).fit(x)
    assert set(det.auto_table_) == {"recon", "latent", "gmm", "zrecon", "combined"}


def test_save_and_load_keep_the_new_scores(planted, tmp_path):
    x, _ = planted
    det = AnomalyDetector(score_type="auto", **TABLE).fit(x)
    det.save(tmp_path / "det")
    back = AnomalyDetector.load(tmp_path / "det")
    assert back.auto_choice_ == det.auto_choice_ and back.combination_ == det.combination_
    np.testing.assert_array_equal(back.residual_var_, det.residual_var_)
    for kinds in (["gmm", "zrecon", "combined", "auto"],):
        a, b = det.anomaly_scores(x, kinds=kinds), back.anomaly_scores(x, kinds=kinds)
        for k in kinds:
            np.testing.assert_allclose(a[k], b[k], rtol=1e-12)
    # a detector saved before zrecon existed has no residual variances: that score asks for a refit
    cfg = json.loads((tmp_path / "det" / "config.json").read_text())
    del cfg["detector"]["residual_var"]
    (tmp_path / "det" / "config.json").write_text(json.dumps(cfg))
    old = AnomalyDetector.load(tmp_path / "det")
    np.testing.assert_allclose(old.anomaly_scores(x, kinds=["gmm"])["gmm"], det.anomaly_scores(x, kinds=["gmm"])["gmm"],
                               rtol=1e-12)
    with pytest.raises(ConfigError) as e:
        old.anomaly_scores(x, kinds=["zrecon"])
    assert ("score type 'zrecon' needs each feature's residual variance on the training rows, which this detector "
            "(saved by an earlier vaelab) does not hold; fit it again") in str(e.value)


def test_score_errors_name_the_value_and_the_choices(planted):
    x, _ = planted
    with pytest.raises(ConfigError) as e:
        AnomalyDetector(score_type="density").fit(x)
    assert f"score type 'density' is unknown; choose one of {list(SCORE_CHOICES)}" in str(e.value)
    with pytest.raises(ConfigError) as e:
        AnomalyDetector(score_type="auto", validation_fraction=1.5).fit(x)
    assert ("validation_fraction=1.5 must be in (0, 1) when fpr is set or score_type is 'combined' or 'auto': "
            "the part of X held out to fit score_type='auto'") in str(e.value)
    det = AnomalyDetector(score_type="recon", **TABLE).fit(x)
    with pytest.raises(ConfigError) as e:
        anomaly_scores(det.model_, det._dataset(x, reset=False), ("auto",))
    assert "score type 'auto' is a detector's choice among the scores" in str(e.value)
    with pytest.raises(ConfigError) as e:
        anomaly_scores(det.model_, det._dataset(x, reset=False), ("gmm",))
    assert "need a Gaussian mixture of the training codes" in str(e.value)
    det.set_params(score_type="auto")
    with pytest.raises(ConfigError) as e:
        det.score_samples(x)
    assert "fit it again with score_type='auto'" in str(e.value)


# ============================================================================ the CLI


def _vaelab(capsys, *args):
    """Run the CLI in this process: (exit status, stdout, stderr)."""
    from vaelab.cli import main

    capsys.readouterr()
    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def _write_rows(path, x, labels=None):
    header = ",".join([f"c{j}" for j in range(x.shape[1])] + (["label"] if labels is not None else []))
    lines = [header] + [",".join([f"{v:.6f}" for v in row] + ([str(int(labels[i]))] if labels is not None else []))
                        for i, row in enumerate(x)]
    path.write_text("\n".join(lines) + "\n")


def test_detect_takes_the_new_score_types(planted, tmp_path, capsys):
    x, bad = planted
    AnomalyDetector(score_type="auto", **TABLE).fit(x).save(tmp_path / "det")
    _write_rows(tmp_path / "rows.csv", x, bad)
    code, _, err = _vaelab(capsys, "detect", tmp_path / "det", "--data", tmp_path / "rows.csv", "--out", tmp_path / "a")
    assert code == 0, err
    summary = json.loads((tmp_path / "a" / "detect.json").read_text())
    assert summary["score"] == "auto" and summary["auroc"] > 90
    code, _, err = _vaelab(capsys, "detect", tmp_path / "det", "--data", tmp_path / "rows.csv", "--score", "gmm",
                           "--contamination", "0.05", "--out", tmp_path / "g")
    assert code == 0, err
    assert json.loads((tmp_path / "g" / "detect.json").read_text())["flagged"] == 20
    code, _, err = _vaelab(capsys, "detect", tmp_path / "det", "--data", tmp_path / "rows.csv", "--score", "zrecon",
                           "--contamination", "0.05", "--out", tmp_path / "z")
    assert code == 0, err
    summary = json.loads((tmp_path / "z" / "detect.json").read_text())
    assert summary["score"] == "zrecon" and summary["auroc"] > 80  # 86: the model of a 2-D code, trained on 80% of X


def test_one_class_on_an_npz_with_labels(tmp_path):
    from sklearn.datasets import load_digits

    d = load_digits()
    np.savez(tmp_path / "digits.npz", x=(d.images * 15).astype(np.uint8), y=d.target)
    table = one_class(tmp_path / "digits.npz", [0, "7"], "vae", arch="mlp", hidden=(64,), latent_dim=4,
                      epochs=30, n_samples=2, threads=1, log=None, scores=("elbo", "gmm", "combined"))
    assert list(table["classes"]) == ["0", "7"] and table["class_names"] is None
    from vaelab.data import load_dataset

    train = load_dataset(tmp_path / "digits.npz").train  # load_dataset's seeded 90% of the rows
    assert table["classes"]["0"]["n_train"] == int((train.y == 0).sum())
    assert all(table["classes"][c][k] > 90 for c in ("0", "7") for k in ("elbo", "gmm", "combined"))


@pytest.fixture(scope="module")
def emoji():
    if not (DATA / "emoji" / "train").is_dir():
        pytest.skip(f"the emoji images are absent from {DATA} (set VAELAB_TEST_DATA)")
    return DATA / "emoji"


def test_one_class_cli_on_an_image_folder_by_class_name(emoji, tmp_path, capsys):
    code, out, err = _vaelab(capsys, "one-class", "--dataset", emoji, "--normal-class", "activities", "--epochs",
                             "1", "--latent-dim", "2", "--samples", "1", "--threads", "1", "--out", tmp_path / "oc")
    assert code == 0, err
    table = json.loads((tmp_path / "oc" / "one-class.json").read_text())
    assert table["class_names"][0] == "activities" and list(table["classes"]) == ["0"]
    row = table["classes"]["0"]
    assert row["n_train"] == 77 and set(row) >= {"elbo", "recon", "latent", "gmm", "zrecon", "combined"}
    assert "class 0 (activities): combined" in out  # the default score comes first
    det = AnomalyDetector.load(tmp_path / "oc" / "class-0")
    assert det.model_.config.input_shape == (3, 64, 64) and det.pixel_scale_.shape == (3, 64, 64)
    code, out, err = _vaelab(capsys, "one-class", "--dataset", emoji, "--normal-class", "0", "--epochs", "1",
                             "--latent-dim", "2", "--samples", "1", "--threads", "1", "--pixels", "raw",
                             "--score", "recon", "--out", tmp_path / "raw")
    assert code == 0, err
    assert "class 0 (activities): recon" in out
    assert AnomalyDetector.load(tmp_path / "raw" / "class-0").pixel_mean_ is None


def test_one_class_errors_are_exact(emoji, tmp_path, capsys):
    code, _, err = _vaelab(capsys, "one-class", "--dataset", emoji, "--normal-class", "cats", "--out", tmp_path / "x")
    assert code == 1 and err.startswith("vaelab: error: invalid one-class settings: ")
    assert ("normal_class='cats' is not a class of " + str(emoji) + "; choose one of ['activities', "
            "'animals-nature', 'flags', 'food-drink', 'objects', 'people-body', 'smileys-emotion', 'symbols', "
            "'travel-places']") in err
    code, _, err = _vaelab(capsys, "one-class", "--dataset", emoji / "train" / "flags", "--out", tmp_path / "x")
    assert code == 1 and (
        f"dataset='{emoji / 'train' / 'flags'}' has no labels, so no class can be the normal one; give a "
        "labelled dataset: an image folder with one sub-folder per class") in err
    with pytest.raises(ConfigError) as e:
        one_class(emoji, 9, log=None)
    assert "normal_class=9 is not a class of" in str(e.value)
