"""scikit-learn estimators on vaelab models: a nonlinear drop-in for PCA, and an outlier detector.

    from vaelab.sklearn import AnomalyDetector, AutoencoderTransformer, VAETransformer
    Z = VAETransformer(latent_dim=2).fit_transform(X)          # latent means, (N, 2)
    X_hat = est.inverse_transform(Z)                            # decoded, in X's units
    make_pipeline(VAETransformer(latent_dim=4), LogisticRegression())
    AnomalyDetector(contamination=0.05).fit(X).predict(X)       # +1 normal, -1 anomaly

They follow scikit-learn's rules (`__init__` only stores its arguments, learned state ends in `_`, `fit`
returns self, NotFittedError before fit) and pass its estimator checks (tests/test_sklearn.py).

Tabular data (N, D): the columns are standardized with the training statistics (`mean_`, `scale_`), and an
MLP model with a Gaussian likelihood is trained on them by the one training loop (`vaelab.training.fit`).
After training, a tabular model is kept in float64 (`model_`), so that a row's output does not depend on
the other rows of its batch beyond float64 rounding (float32 matrix products differ in the 7th digit, which
scikit-learn's subset-invariance checks catch). AnomalyDetector also takes
images: (N, H, W), (N, C, H, W) or (N, H, W, C) arrays (uint8 0-255 or floats in [0, 1]) or a
vaelab ArrayDataset, and trains a convolutional model (arch="auto") on them.

Everything random (initial weights, data order, posterior noise, scoring draws) is seeded from
`random_state` (an int gives the same model every time; None draws a fresh seed). The global torch random
state and thread count of the caller are left as they were.
"""

from __future__ import annotations

import contextlib
import numbers

import numpy as np
import torch
from sklearn.base import BaseEstimator, ClassNamePrefixFeaturesOutMixin, OutlierMixin, TransformerMixin
from sklearn.utils import check_random_state
from sklearn.utils.validation import check_array, check_is_fitted, validate_data

from vaelab.data import ArrayDataset, standardize
from vaelab.errors import CheckpointError, ConfigError, DataError
from vaelab.evaluation.scores import (AUTO, AUTO_CANDIDATES, SAMPLED, SCORE_CHOICES, SCORES, anomaly_scores,
                                      choose_score, fit_score_statistics, latent_codes, score_problems,
                                      shrink_variance)

__all__ = ["AutoencoderTransformer", "VAETransformer", "AnomalyDetector"]

SCORE_SAMPLES = 16  # posterior draws per row behind the transformers' score_samples (the ELBO estimate)


@contextlib.contextmanager
def torch_threads(n: int | None):
    """Run with `n` torch intra-op threads (None: leave torch's setting), restoring the caller's afterwards.
    One thread is fastest for the small networks of tabular data: more only add synchronization."""
    old = torch.get_num_threads()
    if n and n != old:
        torch.set_num_threads(n)
    try:
        yield
    finally:
        if n and n != old:
            torch.set_num_threads(old)


def seed_from(random_state) -> int:
    """An int seed >= 0 for vaelab from scikit-learn's random_state (None, an int, or a RandomState)."""
    if isinstance(random_state, numbers.Integral) and not isinstance(random_state, bool) and random_state >= 0:
        return int(random_state)
    return int(check_random_state(random_state).randint(np.iinfo(np.int32).max))


class _VaelabEstimator(BaseEstimator):
    """What the estimators share: arrays in, one registered model trained by `vaelab.training.fit`."""

    _model_name: str | None = None  # the transformers fix it; AnomalyDetector takes `model`

    # ------------------------------------------------------------------------------------------ input

    def _is_image_input(self, X) -> bool:
        if isinstance(X, ArrayDataset):
            return X.is_image
        return getattr(X, "ndim", 2) in (3, 4)

    def _dataset(self, X, *, reset: bool) -> ArrayDataset:
        """X as an ArrayDataset ready for the model: standardized float32 columns, or images in [0, 1]."""
        fitted_image = None if reset else len(self.model_.config.input_shape) == 3
        if self._is_image_input(X):
            if not self._accepts_images:
                raise DataError(f"{type(self).__name__} takes a 2-D array (n_samples, n_features); got an "
                                f"array of shape {tuple(getattr(X, 'shape', ()))}. Flatten the samples first")
            data = X if isinstance(X, ArrayDataset) else _image_dataset(X)
            if fitted_image is False:
                raise DataError(f"this {type(self).__name__} was fitted on tabular data with "
                                f"{self.n_features_in_} columns; got images of shape {data.sample_shape}")
            if not reset and data.sample_shape != tuple(self.model_.config.input_shape):
                raise DataError(f"this {type(self).__name__} was fitted on images of shape (C, H, W) = "
                                f"{tuple(self.model_.config.input_shape)}; got {data.sample_shape}")
            if len(data) == 0:
                raise DataError("got 0 images; at least one is needed")
            return data
        if isinstance(X, ArrayDataset):
            X = X.to_float().numpy()
        if fitted_image:
            raise DataError(f"this {type(self).__name__} was fitted on images of shape "
                            f"{tuple(self.model_.config.input_shape)}; got a 2-D array (n_samples, n_features). "
                            "Pass images as (N, H, W), (N, C, H, W) or an ArrayDataset")
        X = validate_data(self, X, reset=reset, dtype=[np.float64, np.float32])
        x = torch.tensor(X, dtype=torch.float64)
        if reset:
            if getattr(self, "pretrained", None) is not None:  # the run's model saw the raw columns
                mean, std = torch.zeros(x.shape[1], dtype=x.dtype), torch.ones(x.shape[1], dtype=x.dtype)
            else:
                _, _, mean, std = standardize(x, x[:0])  # constant columns get std 1
            self.mean_, self.scale_ = mean.double().numpy(), std.double().numpy()
        z = (x - torch.from_numpy(self.mean_)) / torch.from_numpy(self.scale_)
        return ArrayDataset(z.float(), None, 1.0)

    _accepts_images = False

    # ------------------------------------------------------------------------------------------ model

    def _settings(self, data: ArrayDataset) -> dict:
        """ModelConfig fields from the parameters, with data-dependent defaults resolved."""
        raise NotImplementedError

    def _train_settings(self, image: bool) -> dict:
        # fp32: an estimator's fit is the same for the same random_state on every machine (precision "auto" would
        # time the two precisions, and a small model's steps can fall on either side of its line)
        return {"epochs": self.epochs, "batch_size": self.batch_size, "lr": self.lr, "precision": "fp32"}

    def _problems(self, data: ArrayDataset) -> list[str]:
        from vaelab.config import ModelConfig, TrainConfig

        settings = self._settings(data)
        problems = []
        try:
            problems += ModelConfig(**settings).problems()
        except TypeError as e:  # a wrong type that dataclass construction itself rejects
            problems.append(str(e))
        problems += TrainConfig(**self._train_settings(data.is_image)).problems()
        if self.threads is not None and not (isinstance(self.threads, numbers.Integral) and self.threads >= 1):
            problems.append(f"threads={self.threads!r} must be None (torch's setting) or a positive integer")
        return problems

    def _threads(self, image: bool):
        return torch_threads(self.threads if self.threads is not None else (None if image else 1))

    def _train(self, data: ArrayDataset) -> None:
        """Build the model from the parameters and train it on `data`; sets model_, seed_, history_."""
        from vaelab.config import ModelConfig, TrainConfig
        from vaelab.models import build_model
        from vaelab.training import fit

        self.seed_ = seed_from(self.random_state)
        config = TrainConfig(seed=self.seed_, progress=bool(self.verbose), **self._train_settings(data.is_image))
        with torch.random.fork_rng(devices=[]):  # the caller's torch random state stays as it was
            torch.manual_seed(self.seed_)  # the initial weights
            model = build_model(ModelConfig(**self._settings(data)))
            self.history_ = fit(model, data, None, config)
        model.eval()
        if not data.is_image:
            model.double()  # row-exact outputs (see the module docstring); the networks are small
        self.model_ = model

    def _check_fitted(self) -> None:
        check_is_fitted(self, "model_")


# ================================================================================== the transformers


class AutoencoderTransformer(ClassNamePrefixFeaturesOutMixin, TransformerMixin, _VaelabEstimator):
    """A deterministic autoencoder as a scikit-learn transformer: a nonlinear PCA.

    `transform` gives the codes (N, latent_dim), `inverse_transform` decodes codes back to X's units,
    `score_samples` is the log-likelihood of each row under the decoded reconstruction (a Gaussian of
    standard deviation `gaussian_sigma` on the standardized columns, moved back to X's units) and `score`
    its mean, so a GridSearchCV without `scoring` ranks models by held-out reconstruction.

    Parameters: latent_dim (size of the code), hidden (dense layer sizes, mirrored by the decoder), epochs,
    batch_size, lr (Adam), gaussian_sigma (the likelihood's fixed noise on standardized columns),
    random_state, threads (torch threads while fitting and predicting; default 1, fastest for these
    small networks), verbose (progress bars).

    Fitted attributes: model_ (the vaelab model), mean_ and scale_ (the standardization), n_features_in_,
    seed_ (the seed drawn from random_state), history_ (per-epoch training metrics).
    """

    _model_name = "ae"

    def __init__(self, latent_dim=2, *, hidden=(64,), epochs=40, batch_size=64, lr=1e-3, gaussian_sigma=0.1,
                 random_state=0, threads=None, verbose=False):
        self.latent_dim = latent_dim
        self.hidden = hidden
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.gaussian_sigma = gaussian_sigma
        self.random_state = random_state
        self.threads = threads
        self.verbose = verbose

    def _settings(self, data):
        hidden = tuple(self.hidden) if isinstance(self.hidden, (tuple, list)) else self.hidden
        return {"model": self._model_name, "arch": "mlp", "input_shape": tuple(data.sample_shape),
                "latent_dim": self.latent_dim, "hidden": hidden, "likelihood": "gaussian",
                "gaussian_sigma": self.gaussian_sigma, **_beta(getattr(self, "beta", 1.0))}

    def fit(self, X, y=None):
        """Standardize X's columns and train the model on them. Returns self."""
        data = self._dataset(X, reset=True)
        problems = self._problems(data)
        if problems:
            raise ConfigError(problems, f"{type(self).__name__} parameters")
        with self._threads(False):
            self._train(data)
        return self

    def transform(self, X):
        """Latent means (N, latent_dim), in X's float dtype."""
        self._check_fitted()
        data = self._dataset(X, reset=False)
        with self._threads(False):
            z = latent_codes(self.model_, data)
        return z.astype(_float_dtype(X), copy=False)

    def inverse_transform(self, X):
        """Decode latent vectors (N, latent_dim) back to data space, in the original units of the columns."""
        self._check_fitted()
        Z = check_array(X, dtype=[np.float64, np.float32])
        if Z.shape[1] != self.model_.latent_size:
            raise ValueError(f"inverse_transform takes latent vectors of {self.model_.latent_size} values "
                             f"(latent_dim); got {Z.shape[1]} per row")
        with self._threads(False), torch.inference_mode():
            x = self.model_.decode(torch.tensor(Z, dtype=torch.float64)).numpy()
        return (x * self.scale_ + self.mean_).astype(Z.dtype, copy=False)

    def score_samples(self, X):
        """Log-likelihood of each row (higher = more typical), in nats, in X's units (N,)."""
        self._check_fitted()
        data = self._dataset(X, reset=False)
        kind = "elbo" if self.model_.capabilities.stochastic else "recon"
        with self._threads(False):
            nll = anomaly_scores(self.model_, data, (kind,), n_samples=SCORE_SAMPLES, seed=self.seed_)[kind]
        # the model's density is over standardized columns: change of variables back to X's units
        return -nll - float(np.log(self.scale_).sum())

    @property
    def _n_features_out(self) -> int:  # get_feature_names_out: <classname>0, <classname>1, ...
        return self.model_.latent_size

    def score(self, X, y=None):
        """Mean of score_samples: the average log-likelihood (ELBO for a VAE) per row; higher is better."""
        return float(np.mean(self.score_samples(X)))

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.transformer_tags.preserves_dtype = ["float64", "float32"]
        return tags


class VAETransformer(AutoencoderTransformer):
    """A variational autoencoder as a scikit-learn transformer. As AutoencoderTransformer, plus `beta` (the
    KL weight: a β-VAE when != 1); `transform` gives the posterior means and `score_samples` the ELBO of
    each row (a lower bound on its log-likelihood, estimated with 16 posterior draws) in X's units."""

    _model_name = "vae"

    def __init__(self, latent_dim=2, *, hidden=(64,), beta=1.0, epochs=40, batch_size=64, lr=1e-3,
                 gaussian_sigma=0.1, random_state=0, threads=None, verbose=False):
        super().__init__(latent_dim, hidden=hidden, epochs=epochs, batch_size=batch_size, lr=lr,
                         gaussian_sigma=gaussian_sigma, random_state=random_state, threads=threads,
                         verbose=verbose)
        self.beta = beta


# ================================================================================== the anomaly detector


class AnomalyDetector(OutlierMixin, _VaelabEstimator):
    """Anomaly detection with any registered model: fit on (mostly) normal data, score new rows.

    `score_samples(X)` is higher for more normal rows (scikit-learn's convention: the negated anomaly
    score of `vaelab.anomaly.SCORES`), `decision_function(X) = score_samples(X) - offset_` is negative for
    anomalies, and `predict(X)` gives +1 (normal) or -1 (anomaly). The threshold `offset_` comes from
    `contamination` (the expected fraction of anomalies in the training data: that fraction of the training
    rows is flagged) or, when `fpr` is set, from a false-positive rate on held-out normal data:
    `validation_fraction` of X is held out from training and `offset_` flags the fraction `fpr` of it.
    `calibrate(X_normal, fpr)` sets the threshold afterwards from other held-out normal data.

    score_type "combined" standardises its parts, and "auto" chooses its score, on held-out normal data: with
    either (or with fpr), `validation_fraction` of X is held out from training; otherwise the training rows
    themselves serve. "auto" picks, among the scores the model supports (recon, elbo, latent, gmm, zrecon, combined),
    the one that best separates at most 2000 held-out rows from pseudo-anomalies made of them (half of a row
    replaced by the same half of another row; see vaelab.evaluation.scores.choose_score); `auto_choice_` says
    which, and `auto_table_` gives each candidate's AUROC on that task.

    Parameters
      model           a registered model name ("vae", "ae", ...)
      score_type      "recon", "elbo", "iwae", "latent", "gmm", "zrecon", "combined" or "auto" (see
                      vaelab.anomaly);
                      elbo and iwae need a VAE
      contamination   in (0, 0.5]: expected fraction of anomalies in X [0.1, as PyOD]
      fpr             None, or in (0, 1): set the threshold from held-out normal data instead
      validation_fraction  the held-out part of X when fpr is set
      n_samples       K posterior draws per row for elbo and iwae
      arch, latent_dim, hidden, channels, likelihood, gaussian_sigma, beta: the ModelConfig fields; None
                      picks per data kind: images -> latent 16, hidden (256,); tabular -> latent
                      min(2, n_features // 2) (at least 1: a narrow bottleneck, whose codes' density the
                      default score uses; measured against latent min(8, n_features // 2): mean AUROC over
                      the tabular sets of benchmarks/anomaly_vs_pyod.py 94.3 against 92.5), hidden (64,).
                      The likelihood defaults to Gaussian
                      (sigma 0.1) for images too: a Bernoulli decoder scores images with little ink (a "1")
                      as normal whatever the normal class (measured: MNIST one-class mean AUROC 92.1 vs 97.0)
      epochs, batch_size, lr: training (epochs None: 30 for images, 60 for tabular data)
      standardize_pixels  images: standardize each pixel (and channel) by the training images' mean and
                      deviation before training and scoring, as tables' columns always are (the variances shrunk
                      10% towards their mean, so a pixel constant in training keeps a finite scale)
      pretrained      None, or a run directory: use its trained model instead of training (the columns are
                      then not standardized: the run's model saw them raw)
      trust_code      let a pretrained model whose networks are your own classes import their module from
                      outside vaelab (importing runs its code: only for runs you trust)
      random_state, threads (None: 1 for tabular data, torch's setting for images), verbose

    Fitted attributes: model_, offset_, latent_mean_ and latent_precision_ (the "latent" score), mixture_
    (the Gaussian mixture of the training codes: "gmm"), residual_var_ (each feature's residual variance on
    the training rows: "zrecon"), combination_ (the standardisation of "combined"),
    auto_choice_ and auto_table_ ("auto"), seed_, history_, for tabular data mean_, scale_, n_features_in_, and
    for images pixel_mean_ and pixel_scale_ (None unless standardize_pixels).
    """

    _accepts_images = True

    def __init__(self, model="vae", score_type="combined", *, contamination=0.1, fpr=None, validation_fraction=0.2,
                 n_samples=16, arch="auto", latent_dim=None, hidden=None, channels=(32, 64), likelihood=None,
                 gaussian_sigma=0.1, beta=1.0, epochs=None, batch_size=128, lr=1e-3, standardize_pixels=True,
                 pretrained=None, trust_code=False, random_state=0, threads=None, verbose=False):
        self.model = model
        self.score_type = score_type
        self.contamination = contamination
        self.fpr = fpr
        self.validation_fraction = validation_fraction
        self.n_samples = n_samples
        self.arch = arch
        self.latent_dim = latent_dim
        self.hidden = hidden
        self.channels = channels
        self.likelihood = likelihood
        self.gaussian_sigma = gaussian_sigma
        self.beta = beta
        self.epochs = epochs
        self.batch_size = batch_size
        self.lr = lr
        self.standardize_pixels = standardize_pixels
        self.pretrained = pretrained
        self.trust_code = trust_code
        self.random_state = random_state
        self.threads = threads
        self.verbose = verbose

    # ------------------------------------------------------------------------------------- settings

    def _dataset(self, X, *, reset: bool) -> ArrayDataset:
        """As the estimators' (standardized columns, or images in [0, 1]), and with standardize_pixels each
        pixel (and channel) of an image standardized by the training images' mean and deviation, its variance
        shrunk 10% towards the mean over pixels (`shrink_variance`): a pixel that is the same in every
        training image then keeps a finite scale."""
        data = super()._dataset(X, reset=reset)
        if not data.is_image or self.pretrained is not None:
            return data
        if reset:
            self.pixel_mean_ = self.pixel_scale_ = None
            if self.standardize_pixels:
                x = data.to_float().double()
                self.pixel_mean_ = x.mean(0).numpy()
                self.pixel_scale_ = np.sqrt(shrink_variance(x.var(0, unbiased=False).numpy()))
        if getattr(self, "pixel_mean_", None) is None:
            return data
        x = (data.to_float().double() - torch.from_numpy(self.pixel_mean_)) / torch.from_numpy(self.pixel_scale_)
        return ArrayDataset(x.float(), data.y, 1.0, data.classes, data.name)

    def _settings(self, data):
        image = data.is_image
        d = int(np.prod(data.sample_shape))

        def tup(v):
            return tuple(v) if isinstance(v, (tuple, list)) else v

        return {"model": self.model, "arch": self.arch, "input_shape": tuple(data.sample_shape),
                "latent_dim": self.latent_dim if self.latent_dim is not None
                else (16 if image else max(1, min(2, d // 2))),
                "hidden": tup(self.hidden) if self.hidden is not None else ((256,) if image else (64,)),
                "channels": tup(self.channels),
                "likelihood": self.likelihood or "gaussian",
                "gaussian_sigma": self.gaussian_sigma, **_beta(self.beta)}

    def _train_settings(self, image):
        return {"epochs": self.epochs if self.epochs is not None else (30 if image else 60),
                "batch_size": self.batch_size, "lr": self.lr, "precision": "fp32"}  # fp32: see the base class

    def _own_problems(self) -> list[str]:
        out = []
        if self.pretrained is None:
            out += score_problems(self.model, self.score_type)
        elif self.score_type not in SCORE_CHOICES:
            out += score_problems("", self.score_type)
        if not (_is_real(self.contamination) and 0 < self.contamination <= 0.5):
            out.append(f"contamination={self.contamination!r} must be a number in (0, 0.5]: the expected "
                       "fraction of anomalies in the training data")
        if self.fpr is not None and not (_is_real(self.fpr) and 0 < self.fpr < 1):
            out.append(f"fpr={self.fpr!r} must be None or a number in (0, 1): the false-positive rate on "
                       "held-out normal data")
        if (self.fpr is not None or self.score_type in ("combined", AUTO)) and not (
                _is_real(self.validation_fraction) and 0 < self.validation_fraction < 1):
            why = "set the threshold" if self.fpr is not None else f"fit score_type={self.score_type!r}"
            out.append(f"validation_fraction={self.validation_fraction!r} must be in (0, 1) when fpr is set or "
                       f"score_type is 'combined' or 'auto': the part of X held out to {why}")
        if not (isinstance(self.n_samples, numbers.Integral) and self.n_samples >= 1):
            out.append(f"n_samples={self.n_samples!r} must be a positive integer (posterior draws per row)")
        return out

    # -------------------------------------------------------------------------------------- fitting

    def fit(self, X, y=None):
        """Train the model on X (or load `pretrained`), then fit the latent statistics and the threshold."""
        problems = self._own_problems()
        if self.pretrained is not None:
            from vaelab.models import from_pretrained

            self.model_ = from_pretrained(self.pretrained, trust_code=bool(self.trust_code))
            self.seed_ = seed_from(self.random_state)
            self.history_ = []
            if self.score_type in SAMPLED and not self.model_.capabilities.stochastic:
                problems.append(f"score_type={self.score_type!r} needs a VAE, but {self.pretrained!r} holds a "
                                f"{self.model_.config.model!r} model; use score_type='recon' or 'latent'")
            if problems:
                raise ConfigError(problems, "AnomalyDetector parameters")
            data = self._dataset(X, reset=True)
            if data.sample_shape != tuple(self.model_.config.input_shape):
                raise DataError(f"X holds samples of shape {data.sample_shape}, but the model of "
                                f"{self.pretrained!r} takes {tuple(self.model_.config.input_shape)}")
            if not data.is_image:
                self.model_.double()
            train = held_out = data
        else:
            data = self._dataset(X, reset=True)
            problems += self._problems(data)
            if problems:
                raise ConfigError(problems, "AnomalyDetector parameters")
            train, held_out = data, data
            if self.fpr is not None or self.score_type in ("combined", AUTO):
                train, held_out = _split(data, self.validation_fraction, seed_from(self.random_state))
            with self._threads(data.is_image):
                self._train(train)
        with self._threads(data.is_image):
            self._fit_statistics(train, held_out)
            # contamination: that fraction of X (every row, held out or not) is flagged; fpr: of the held-out rows
            normal = self._score(held_out if self.fpr is not None else data)
        rate = self.fpr if self.fpr is not None else self.contamination
        self.offset_ = float(np.percentile(normal, 100.0 * rate))
        return self

    def _fit_statistics(self, train: ArrayDataset, held_out: ArrayDataset) -> None:
        """What the scores need besides the model: the latent statistics and the Gaussian mixture of the
        training codes, the standardisation of "combined" and the choice of "auto" on the held-out rows."""
        fitted = fit_score_statistics(self.model_, train, held_out, seed=self.seed_)
        self.latent_mean_, self.latent_precision_ = fitted["latent_stats"]
        self.mixture_, self.residual_var_ = fitted["mixture"], fitted["residual_var"]
        self.combination_ = fitted["combination"]
        candidates = [k for k in AUTO_CANDIDATES if self.model_.capabilities.stochastic or k not in SAMPLED]
        if self.score_type == AUTO:
            few = _first(held_out, 2000, self.seed_)
            self.auto_choice_, self.auto_table_ = choose_score(self.model_, few, candidates, seed=self.seed_,
                                                               **self._fitted_keywords())
        else:
            self.auto_choice_, self.auto_table_ = None, {}

    def _fitted_keywords(self, kinds=()) -> dict:
        if "zrecon" in kinds and getattr(self, "residual_var_", None) is None:
            raise ConfigError("score type 'zrecon' needs each feature's residual variance on the training rows, "
                              "which this detector (saved by an earlier vaelab) does not hold; fit it again "
                              "(AnomalyDetector.fit, or `vaelab one-class`)", "AnomalyDetector")
        return {"n_samples": self.n_samples, "latent_stats": (self.latent_mean_, self.latent_precision_),
                "mixture": getattr(self, "mixture_", None), "combination": getattr(self, "combination_", None),
                "residual_var": getattr(self, "residual_var_", None)}

    def _kind(self) -> str:
        """The score type in use: score_type, or the one `auto` chose when fitted."""
        if self.score_type != AUTO:
            return self.score_type
        if getattr(self, "auto_choice_", None) is None:
            raise ConfigError("score_type='auto' chooses its score when the detector is fitted, but this one was "
                              "fitted with another score type; fit it again with score_type='auto'",
                              "AnomalyDetector")
        return self.auto_choice_

    def calibrate(self, X, fpr=0.05):
        """Set the threshold from held-out normal data X: a fraction `fpr` of X is flagged. Returns self."""
        self._check_fitted()
        if not (_is_real(fpr) and 0 < fpr < 1):
            raise ConfigError(f"fpr={fpr!r} must be a number in (0, 1): the false-positive rate on X",
                              "calibrate")
        self.offset_ = float(np.percentile(self.score_samples(X), 100.0 * fpr))
        return self

    # ------------------------------------------------------------------------------------- scoring

    def _score(self, data: ArrayDataset) -> np.ndarray:
        kind = self._kind()
        return -anomaly_scores(self.model_, data, (kind,), seed=self.seed_, **self._fitted_keywords((kind,)))[kind]

    def score_samples(self, X):
        """Normality of each row (higher = more normal): the negated anomaly score, float64 (N,)."""
        self._check_fitted()
        data = self._dataset(X, reset=False)
        with self._threads(data.is_image):
            return self._score(data)

    def decision_function(self, X):
        """score_samples(X) - offset_: negative for anomalies, positive for normal rows."""
        return self.score_samples(X) - self.offset_

    def predict(self, X):
        """+1 for normal rows, -1 for anomalies."""
        return np.where(self.decision_function(X) < 0, -1, 1)

    def anomaly_scores(self, X, kinds=None) -> dict:
        """Every anomaly score kind (higher = more anomalous) of each row from the fitted model, as a dict
        kind -> float64 array (N,). kinds=None: all that the model supports. "auto" (when fitted with
        score_type="auto") is the chosen score's values under the name "auto"."""
        self._check_fitted()
        if kinds is None:
            kinds = [k for k in SCORES if self.model_.capabilities.stochastic or k not in SAMPLED]
        kinds = list(kinds)
        auto = self._kind() if AUTO in kinds else None
        plain = tuple(dict.fromkeys([auto if k == AUTO else k for k in kinds]))
        data = self._dataset(X, reset=False)
        with self._threads(data.is_image):
            found = anomaly_scores(self.model_, data, plain, seed=self.seed_, **self._fitted_keywords(plain))
        return {k: found[auto if k == AUTO else k] for k in kinds}

    # --------------------------------------------------------------------------------- save / load

    def save(self, directory, **extra) -> None:
        """Write the model and the fitted detector (threshold, standardization, latent statistics) into a
        run directory: config.json + model.safetensors. `extra` (JSON values) is stored with them."""
        from vaelab.models.pretrained import save_pretrained

        self._check_fitted()
        params = {k: (list(v) if isinstance(v, tuple) else v) for k, v in self.get_params().items()}
        if not (params["random_state"] is None or isinstance(params["random_state"], int)):
            params["random_state"] = None
        state = {"params": params, "seed": self.seed_, "offset": self.offset_,
                 "latent_mean": self.latent_mean_.tolist(), "latent_precision": self.latent_precision_.tolist(),
                 "mixture": {k: np.asarray(self.mixture_[k]).tolist() for k in ("weights", "means", "covariances")},
                 "combination": self.combination_, "residual_var": self.residual_var_.tolist(),
                 "auto_choice": self.auto_choice_, "auto_table": self.auto_table_,
                 "pixel_mean": None if getattr(self, "pixel_mean_", None) is None else self.pixel_mean_.tolist(),
                 "pixel_scale": None if getattr(self, "pixel_scale_", None) is None else self.pixel_scale_.tolist(),
                 "mean": None if getattr(self, "mean_", None) is None else self.mean_.tolist(),
                 "scale": None if getattr(self, "scale_", None) is None else self.scale_.tolist(),
                 **extra}
        save_pretrained(self.model_, directory, extra={"detector": state})

    @classmethod
    def load(cls, directory, *, trust_code: bool = False) -> AnomalyDetector:
        """A fitted detector from a directory written by `save` (or `vaelab one-class`). trust_code=True lets a
        model with networks of its own import their module from outside vaelab (see vaelab.from_pretrained)."""
        from vaelab.models import from_pretrained
        from vaelab.io import read_config

        cfg = read_config(directory)
        state = cfg.get("detector")
        try:
            det = cls(**{k: tuple(v) if isinstance(v, list) else v for k, v in state["params"].items()})
            model = from_pretrained(directory, trust_code=trust_code)
            det.seed_, det.offset_ = int(state["seed"]), float(state["offset"])
            det.latent_mean_ = np.asarray(state["latent_mean"], dtype=np.float64)
            det.latent_precision_ = np.asarray(state["latent_precision"], dtype=np.float64)
            if state.get("mixture") is not None:  # detectors saved before vaelab 0.2 have no mixture
                det.mixture_ = {k: np.asarray(v, dtype=np.float64) for k, v in state["mixture"].items()}
            det.combination_ = state.get("combination")
            if state.get("residual_var") is not None:  # detectors saved before zrecon existed have none
                det.residual_var_ = np.asarray(state["residual_var"], dtype=np.float64)
            det.auto_choice_, det.auto_table_ = state.get("auto_choice"), state.get("auto_table") or {}
            det.history_ = []
            det.pixel_mean_ = det.pixel_scale_ = None
            if state.get("pixel_mean") is not None:
                det.pixel_mean_ = np.asarray(state["pixel_mean"], dtype=np.float64)
                det.pixel_scale_ = np.asarray(state["pixel_scale"], dtype=np.float64)
            if state.get("mean") is not None:
                det.mean_ = np.asarray(state["mean"], dtype=np.float64)
                det.scale_ = np.asarray(state["scale"], dtype=np.float64)
                det.n_features_in_ = len(det.mean_)
                model.double()
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{directory}/config.json has no valid 'detector' section ({e}); it was not "
                                  "written by AnomalyDetector.save or `vaelab one-class`") from None
        det.model_ = model
        return det


# =========================================================================================== helpers


def _is_real(v) -> bool:
    return isinstance(v, numbers.Real) and not isinstance(v, bool) and np.isfinite(v)


def _float_dtype(X):
    dtype = getattr(X, "dtype", None)
    return np.float32 if dtype == np.float32 else np.float64


def _image_dataset(X) -> ArrayDataset:
    from vaelab.data.files import arrays_to_dataset

    arr = X.detach().cpu().numpy() if isinstance(X, torch.Tensor) else np.asarray(X)
    return arrays_to_dataset(arr, None, "X")


def _first(data: ArrayDataset, n: int, seed: int) -> ArrayDataset:
    """At most n rows of data: all of them, or a seeded random subset in their original order."""
    if len(data) <= n:
        return data
    return data.subset(torch.randperm(len(data), generator=torch.Generator().manual_seed(seed))[:n].sort().values)


def _split(data: ArrayDataset, fraction: float, seed: int):
    """(train, held-out) of a dataset by a seeded permutation; each part keeps at least one row."""
    n = len(data)
    if n < 2:
        raise DataError(f"fpr needs held-out normal rows to set the threshold, but X holds only {n} sample; give "
                        "at least 2 or use contamination")
    n_held = min(max(round(n * fraction), 1), n - 1)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 1))
    return data.subset(perm[n_held:].sort().values), data.subset(perm[:n_held].sort().values)


def _beta(beta) -> dict:
    """The KL weight as a model setting: only when it differs from 1 (models without a KL have no such setting,
    and the model's config then says so)."""
    return {} if beta == 1.0 else {"beta": beta}
