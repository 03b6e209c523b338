"""The scikit-learn estimators: scikit-learn's own estimator checks, then what a user relies on."""

import numpy as np
import pytest
import torch
from sklearn.exceptions import NotFittedError
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV
from sklearn.pipeline import make_pipeline
from sklearn.utils.estimator_checks import parametrize_with_checks

from vaelab.errors import ConfigError, DataError
from vaelab.sklearn import AnomalyDetector, AutoencoderTransformer, VAETransformer

ESTIMATORS = [AutoencoderTransformer(), VAETransformer(), AnomalyDetector(),
              AnomalyDetector(model="ae", score_type="latent", fpr=0.1)]


def expected_failed_checks(estimator) -> dict[str, str]:
    """The checks expected to fail for an estimator, each with the reason it cannot apply.

    Only an AnomalyDetector with `fpr` set has any: its threshold is, by design, the false-positive rate
    `fpr` on held-out normal rows, not the `contamination` fraction of the training rows that these two
    checks count (with fpr=None the same checks pass). Besides, scikit-learn skips a few checks itself:
    check_array_api_input (it runs only with SCIPY_ARRAY_API=1; the estimators hand numpy arrays to torch
    and declare no array-API support) and the pandas checks (pandas is not a vaelab dependency; they run
    wherever pandas is installed).
    """
    if isinstance(estimator, AnomalyDetector) and estimator.fpr is not None:
        reason = "with fpr set, the threshold flags a fraction fpr of held-out normal rows, not contamination"
        return {"check_outliers_train": reason, "check_outliers_fit_predict": reason}
    return {}


@parametrize_with_checks(ESTIMATORS, expected_failed_checks=expected_failed_checks)
def test_scikit_learn_estimator_checks(estimator, check):
    check(estimator)


def _manifold(n=300, d=10, k=2, seed=0):
    """Rows near a k-dimensional curved manifold in d dimensions, with columns of very different scales."""
    rng = np.random.RandomState(seed)
    z = rng.randn(n, k)
    x = np.tanh(z @ rng.randn(k, 8)) @ rng.randn(8, d) + 0.02 * rng.randn(n, d)
    return x * np.logspace(-2, 3, d)  # standardization must handle 1e-2 and 1e3 alike


@pytest.mark.parametrize("cls", [AutoencoderTransformer, VAETransformer])
def test_transform_and_inverse_transform(cls):
    x = _manifold()
    est = cls(latent_dim=2)
    z = est.fit_transform(x)
    assert z.shape == (300, 2) and z.dtype == np.float64
    x_hat = est.inverse_transform(z)
    assert x_hat.shape == x.shape
    # in standardized units, the reconstruction explains most of the variance (a 2-D manifold, 2-D code)
    residual = ((x_hat - x) / x.std(0)) ** 2
    assert residual.mean() < 0.25
    assert list(est.get_feature_names_out()) == [f"{cls.__name__.lower()}{i}" for i in range(2)]
    assert est.transform(x.astype(np.float32)).dtype == np.float32


@pytest.mark.parametrize("cls", [AutoencoderTransformer, VAETransformer, AnomalyDetector])
def test_not_fitted_error_before_fit(cls):
    est = cls()
    for method in ("transform", "inverse_transform", "score_samples", "predict", "decision_function"):
        if hasattr(est, method):
            with pytest.raises(NotFittedError, match="not fitted yet"):
                getattr(est, method)(np.zeros((2, 3)))


def test_same_random_state_same_model_and_callers_state_untouched():
    x = _manifold()
    torch.manual_seed(123)
    before, threads = torch.get_rng_state(), torch.get_num_threads()
    a = VAETransformer(random_state=3).fit(x).transform(x)
    assert torch.equal(torch.get_rng_state(), before) and torch.get_num_threads() == threads
    b = VAETransformer(random_state=3).fit(x).transform(x)
    c = VAETransformer(random_state=4).fit(x).transform(x)
    assert np.array_equal(a, b)
    assert not np.allclose(a, c)


def test_score_samples_is_a_log_density_in_the_units_of_x():
    # the model sees standardized columns, so scaling X by 10 gives the same model, and a density in X's
    # units drops by log(10) per column (change of variables)
    x = _manifold(d=6)
    s1 = VAETransformer().fit(x).score_samples(x)
    s10 = VAETransformer().fit(10 * x).score_samples(10 * x)
    np.testing.assert_allclose(s10, s1 - 6 * np.log(10), rtol=1e-5)
    est = AutoencoderTransformer().fit(x)
    assert est.score(x) == pytest.approx(est.score_samples(x).mean())


def test_pipeline_and_grid_search():
    x = _manifold()
    y = (x[:, 0] > np.median(x[:, 0])).astype(int)
    pipe = make_pipeline(VAETransformer(epochs=10), LogisticRegression())
    search = GridSearchCV(pipe, {"vaetransformer__latent_dim": [1, 2]}, cv=2).fit(x, y)
    assert search.best_params_["vaetransformer__latent_dim"] in (1, 2)
    assert search.score(x, y) > 0.7
    # without `scoring`, GridSearchCV ranks by the estimator's score: the held-out log-likelihood
    search = GridSearchCV(AutoencoderTransformer(epochs=10), {"latent_dim": [1, 3]}, cv=2).fit(x)
    assert np.isfinite(search.best_score_)


def test_all_parameter_problems_are_reported_together():
    with pytest.raises(ConfigError) as e:
        VAETransformer(latent_dim=0, epochs=0, lr=-1).fit(_manifold(n=20))
    assert len(e.value.problems) == 3
    assert "latent_dim=0" in str(e.value) and "epochs=0" in str(e.value)


def test_transformers_take_tables_only():
    with pytest.raises(DataError, match="2-D array"):
        AutoencoderTransformer().fit(np.zeros((4, 8, 8)))
