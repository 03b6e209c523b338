"""A run trained on an image folder with --image-size / --background: every command that reads its data again
(serve, detect, train-prior, tune's trials) reads the folder the same way, not with the defaults (which refuse a
folder of mixed sizes)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from vaelab.cli import main
from vaelab.data import load_dataset, pixel_options

SIZE = 16


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    """Two classes of colour images in two sizes (20 and 24 px), some with transparent corners."""
    root = tmp_path_factory.mktemp("mixed") / "shapes"
    rng = np.random.default_rng(0)
    for label in ("a", "b"):
        (root / label).mkdir(parents=True)
        for i in range(24):
            side = 20 if i % 2 else 24
            rgba = np.zeros((side, side, 4), np.uint8)
            rgba[..., :3] = rng.integers(0, 256, (side, side, 3)) // (2 if label == "a" else 1)
            rgba[..., 3] = 255
            rgba[:4, :4, 3] = 0  # a transparent corner: the background shows there
            Image.fromarray(rgba, "RGBA").save(root / label / f"{i:02d}.png")
    return root


def _train(folder, out, *flags):
    assert main(["train", "--dataset", str(folder), "--image-size", str(SIZE), "--background", "black",
                 "--epochs", "1", "--batch-size", "16", "--out", str(out), "--no-pictures", "--no-progress",
                 *flags]) == 0
    return json.loads((out / "config.json").read_text())


@pytest.fixture(scope="module")
def vae_run(folder, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "vae"
    _train(folder, out, "--model", "vae", "--arch", "mlp", "--hidden", "32", "--latent-dim", "2")
    return out


def test_the_folder_needs_its_options(folder):
    with pytest.raises(Exception, match="--image-size"):
        load_dataset(folder, progress=False)


def test_pixel_options_are_the_runs_own(vae_run, folder):
    saved = json.loads((vae_run / "config.json").read_text())["data"]
    assert pixel_options(saved, saved["dataset"]) == {"image_size": SIZE, "background": "black"}
    assert pixel_options(saved) == {"image_size": SIZE, "background": "black"}  # any folder the model scores
    assert pixel_options(saved, "mnist") == {}  # another dataset has pixels of its own
    assert pixel_options(None, "mnist") == {} and pixel_options({}) == {}


def test_serve_loads_the_runs_folder_as_trained(vae_run, folder):
    pytest.importorskip("fastapi")
    from vaelab.serve.served import ServedRun

    served = ServedRun(vae_run)
    assert served.data_problem is None
    expected = load_dataset(folder, progress=False, image_size=SIZE, background="black").test
    assert torch.equal(served.data.test.batch(torch.arange(len(expected))), expected.batch(torch.arange(len(expected))))


def test_detect_scores_a_mixed_folder_at_the_runs_size(vae_run, folder, tmp_path, capsys):
    out = tmp_path / "detect"
    assert main(["detect", str(vae_run), "--data", str(folder), "--normal-label", "a", "--out", str(out)]) == 0
    report = json.loads((out / "detect.json").read_text())
    assert (report["rows"], report["anomalies_labelled"]) == (48, 24)  # every file, at the run's 16 x 16
    assert len((out / "scores.csv").read_text().splitlines()) == 48 + 1


def test_train_prior_reads_the_folder_as_trained(folder, tmp_path):
    run = tmp_path / "vq"
    _train(folder, run, "--model", "vqvae", "--codebook-size", "8")
    assert main(["train-prior", str(run), "--epochs", "1", "--layers", "2", "--channels", "8"]) == 0
    assert (run / "prior_metrics.jsonl").is_file()


def test_tune_trials_read_the_folder_as_train_does(folder):
    from vaelab.cli.tune import TrainTrainer

    data = TrainTrainer().data({"dataset": str(folder), "image_size": SIZE, "background": "black",
                                "model": "vae", "arch": "mlp"})
    expected = load_dataset(folder, progress=False, image_size=SIZE, background="black")
    assert data.train.sample_shape == (3, SIZE, SIZE)
    assert torch.equal(data.train.batch(torch.arange(8)), expected.train.batch(torch.arange(8)))
