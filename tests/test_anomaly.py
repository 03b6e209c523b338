"""Anomaly detection: the scores, the thresholds, images and tables, saving, and the detect command."""

import argparse
import csv
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from vaelab.anomaly import SCORES, AnomalyDetector, auroc, one_class
from vaelab.cli.anomaly import add_detect_parser, add_one_class_parser
from vaelab.data import ArrayDataset, load_dataset
from vaelab.errors import ConfigError, DataError
from vaelab.models import build_model
from vaelab.sklearn import torch_threads
from vaelab.training import fit

REPO = Path(__file__).resolve().parents[1]
TINY_CONV = dict(arch="conv", channels=(8, 16), hidden=(32,), latent_dim=4)


def _planted(n=600, d=8, frac=0.05, seed=0):
    """Rows near a 2-D curved manifold, and a known fraction of rows pushed off it: (X, is_anomaly)."""
    rng = np.random.RandomState(seed)
    x = np.tanh(rng.randn(n, 2) @ rng.randn(2, 8)) @ rng.randn(8, d) + 0.05 * rng.randn(n, d)
    bad = np.zeros(n, bool)
    bad[rng.choice(n, int(frac * n), replace=False)] = True
    x[bad] += rng.randn(int(bad.sum()), d) * x.std(0)  # off the manifold, inside the usual range
    return x, bad


@pytest.fixture(scope="module")
def planted():
    return _planted()


@pytest.fixture(scope="module")
def digits():
    return load_dataset("digits")


@pytest.mark.parametrize("score_type", SCORES)
def test_every_score_finds_planted_anomalies(planted, score_type):
    x, bad = planted
    # latent 4 (the default, 2, is the manifold's own dimension: an off-manifold row then gets an ordinary code,
    # which only the reconstruction scores see)
    det = AnomalyDetector(score_type=score_type, latent_dim=4).fit(x)
    # the off-manifold rows stay inside the usual range, so the latent density sees them least well
    assert auroc(-det.score_samples(x), bad) > (0.8 if score_type == "latent" else 0.9)
    assert det.predict(x).tolist().count(-1) == pytest.approx(0.1 * len(x), abs=1)  # contamination 0.1


def test_contamination_flags_that_fraction_of_the_training_rows(planted):
    x, bad = planted
    det = AnomalyDetector(model="ae", score_type="recon", contamination=0.05).fit(x)
    pred = det.predict(x)
    assert set(np.unique(pred)) == {-1, 1} and (pred == -1).sum() == 30
    assert (pred[bad] == -1).mean() > 0.8  # most flagged rows are the planted ones
    np.testing.assert_array_equal(det.decision_function(x), det.score_samples(x) - det.offset_)


def test_threshold_from_a_false_positive_rate_on_held_out_normal_rows():
    rows, _ = _planted(n=3000, frac=0.0)
    x, fresh = rows[:1000], rows[1000:]  # fresh: normal rows the detector never saw
    det = AnomalyDetector(model="ae", score_type="recon", fpr=0.05).fit(x)
    assert (det.predict(fresh) == -1).mean() == pytest.approx(0.05, abs=0.03)
    det.calibrate(fresh, fpr=0.2)
    assert (det.predict(fresh) == -1).mean() == pytest.approx(0.2, abs=0.001)


def test_a_row_scores_the_same_alone_or_in_a_batch(planted):
    # common random numbers: the K posterior draws are shared by every row, so a row's sampled score depends
    # on that row alone (up to float64 rounding: tabular models run in float64)
    x, _ = planted
    det = AnomalyDetector(score_type="iwae", n_samples=8).fit(x)
    full = det.score_samples(x)
    alone = np.array([det.score_samples(x[i:i + 1])[0] for i in range(0, 600, 50)])
    np.testing.assert_allclose(full[::50], alone, rtol=1e-12)
    np.testing.assert_array_equal(full, det.score_samples(x))


def test_importance_sampling_tightens_the_elbo(planted):
    # log mean_k w_k >= mean_k log w_k (Jensen): on average the IWAE estimate of -log p(x) is below the ELBO's
    x, _ = planted
    det = AnomalyDetector(n_samples=64).fit(x)
    s = det.anomaly_scores(x)
    assert s["iwae"].mean() < s["elbo"].mean()
    assert set(s) == set(SCORES)


def test_sampled_scores_need_a_vae():
    with pytest.raises(ConfigError, match="'elbo' needs a model with a posterior and a prior"):
        AnomalyDetector(model="ae", score_type="elbo").fit(np.zeros((10, 3)))
    with pytest.raises(ConfigError) as e:
        AnomalyDetector(score_type="nll", contamination=0.9, n_samples=0).fit(np.zeros((10, 3)))
    assert len(e.value.problems) == 3


def test_images_with_a_conv_model(digits):
    train = digits.train.subset((digits.train.y == 0).nonzero().squeeze(1))  # about 160 images of zeros
    det = AnomalyDetector(epochs=40, batch_size=32, threads=1, **TINY_CONV).fit(train)
    assert det.model_.arch == "conv" and det.model_.config.likelihood == "gaussian"
    found = det.anomaly_scores(digits.test)
    others = digits.test.y.numpy() != 0
    assert auroc(found["elbo"], others) > 0.9
    # numpy images in every layout give the same scores as the dataset: uint8 (N, H, W) and floats (N, C, H, W)
    x = digits.test.x[:20]
    s = det.score_samples(digits.test.subset(torch.arange(20)))
    as_uint8 = (x[:, 0].numpy().astype(np.int32) * 255 // 16).astype(np.uint8)  # 0-255, quantized again
    np.testing.assert_allclose(det.score_samples(as_uint8), s, rtol=0.05, atol=1.0)
    np.testing.assert_allclose(det.score_samples(x.float().numpy() / 16), s, rtol=1e-5)
    with pytest.raises(DataError, match="fitted on images"):
        det.score_samples(np.zeros((3, 64)))


def test_save_and_load_give_the_same_detector(planted, tmp_path):
    x, _ = planted
    det = AnomalyDetector(score_type="latent", contamination=0.05).fit(x)
    det.save(tmp_path / "det", note="planted")
    again = AnomalyDetector.load(tmp_path / "det")
    np.testing.assert_array_equal(again.score_samples(x), det.score_samples(x))
    assert again.offset_ == det.offset_ and again.get_params() == det.get_params()
    assert json.loads((tmp_path / "det" / "config.json").read_text())["detector"]["note"] == "planted"


def test_a_pretrained_run_is_scored_on_raw_columns(planted, tmp_path):
    x, bad = planted
    data = ArrayDataset(torch.tensor(x, dtype=torch.float32), scale=1.0)
    torch.manual_seed(0)
    model = build_model(model="ae", arch="mlp", hidden=(32,), latent_dim=2, likelihood="gaussian",
                        input_shape=(8,))
    with torch_threads(1):
        fit(model, data, None, epochs=30, batch_size=64, progress=False, out=tmp_path / "run")
    det = AnomalyDetector(pretrained=str(tmp_path / "run"), score_type="recon").fit(x)
    assert not det.history_ and np.all(det.scale_ == 1)
    assert auroc(-det.score_samples(x), bad) > 0.8


# ============================================================================================ the CLI


def _cli(argv):
    parser = argparse.ArgumentParser(prog="vaelab")
    subs = parser.add_subparsers(dest="command", required=True)
    add_detect_parser(subs)
    add_one_class_parser(subs)
    args = parser.parse_args([str(a) for a in argv])
    return args.func(args)


def test_building_the_parsers_imports_nothing_heavy():
    code = ("import argparse, sys; from vaelab.cli.anomaly import add_detect_parser, add_one_class_parser; "
            "s = argparse.ArgumentParser().add_subparsers(); add_detect_parser(s); add_one_class_parser(s); "
            "print(sorted(m for m in ('torch', 'numpy', 'sklearn', 'matplotlib') if m in sys.modules))")
    env = {**os.environ, "PYTHONPATH": str(REPO / "src")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True)
    assert out.stdout.strip() == "[]"


def _write_csv(path, x, labels=None):
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow([f"c{j}" for j in range(x.shape[1])] + (["label"] if labels is not None else []))
        for i, row in enumerate(x):
            w.writerow([f"{v:.6f}" for v in row] + ([int(labels[i])] if labels is not None else []))


def test_detect_with_a_saved_detector_writes_every_file(planted, tmp_path):
    x, bad = planted
    AnomalyDetector(contamination=0.05).fit(x).save(tmp_path / "det")
    _write_csv(tmp_path / "rows.csv", x, bad)
    assert _cli(["detect", tmp_path / "det", "--data", tmp_path / "rows.csv", "--out", tmp_path / "out"]) == 0
    out = tmp_path / "out"
    for name in ("scores.csv", "flagged.csv", "histogram.png", "roc.png", "detect.json"):
        assert (out / name).is_file(), name
    scores = list(csv.DictReader(open(out / "scores.csv")))
    assert len(scores) == 600 and scores[0].keys() == {"row", "anomaly_score", "flagged", "label"}
    summary = json.loads((out / "detect.json").read_text())
    assert summary["auroc"] > 90 and summary["flagged"] == sum(int(r["flagged"]) for r in scores)
    flagged = list(csv.DictReader(open(out / "flagged.csv")))
    assert len(flagged) == summary["flagged"] and "c7" in flagged[0]  # the flagged rows with their columns
    assert _cli(["detect", tmp_path / "det", "--data", tmp_path / "rows.csv", "--out", tmp_path / "o2",
                 "--contamination", "0.1"]) == 0
    assert json.loads((tmp_path / "o2" / "detect.json").read_text())["flagged"] == 60


def test_detect_with_a_plain_training_run_uses_its_held_out_split(planted, tmp_path):
    x, bad = planted
    _write_csv(tmp_path / "train.csv", x[~bad])
    splits = load_dataset(tmp_path / "train.csv")
    torch.manual_seed(0)
    model = build_model(model="vae", arch="mlp", hidden=(32,), latent_dim=2, likelihood="gaussian",
                        gaussian_sigma=0.1, input_shape=(8,))
    with torch_threads(1):
        fit(model, splits.train, splits.test, epochs=30, batch_size=64, progress=False, out=tmp_path / "run",
            run_info={"data": {"dataset": str(tmp_path / "train.csv"), "data_dir": None}})
    np.save(tmp_path / "rows.npy", x.astype(np.float32))
    assert _cli(["detect", tmp_path / "run", "--data", tmp_path / "rows.npy", "--score", "iwae"]) == 0
    summary = json.loads((tmp_path / "run" / "detect-rows" / "detect.json").read_text())
    assert "false-positive rate 0.05" in summary["threshold_from"] and "auroc" not in summary
    assert 10 < summary["flagged"] < 100  # about 5% of the normal rows and most of the 30 anomalies


def test_detect_errors_are_actionable(planted, tmp_path):
    x, _ = planted
    AnomalyDetector(model="ae", score_type="recon").fit(x).save(tmp_path / "det")
    np.save(tmp_path / "wide.npy", np.zeros((5, 9), np.float32))
    with pytest.raises(DataError, match="takes \\(8,\\)"):
        _cli(["detect", tmp_path / "det", "--data", tmp_path / "wide.npy"])
    with pytest.raises(Exception, match="does not exist"):
        _cli(["detect", tmp_path / "nowhere", "--data", tmp_path / "wide.npy"])


@pytest.fixture(scope="module")
def mnist_dir():
    root = Path(os.environ.get("VAELAB_TEST_DATA") or REPO.parent / "shared" / "data")
    if not (root / "mnist").is_dir():
        pytest.skip(f"real MNIST is absent from {root} (set VAELAB_TEST_DATA)")
    return root


def test_one_class_protocol_on_real_mnist(mnist_dir, tmp_path):
    table = one_class("mnist", 1, "vae", data_dir=mnist_dir, out=tmp_path, arch="mlp", hidden=(64,), epochs=1,
                      n_samples=2, threads=1, log=None)
    assert set(table["classes"]["1"]) >= set(SCORES) and table["classes"]["1"]["elbo"] > 90
    assert json.loads((tmp_path / "one-class.json").read_text())["mean"] == table["mean"]
    det = AnomalyDetector.load(tmp_path / "class-1")
    assert det.model_.config.input_shape == (1, 28, 28)
