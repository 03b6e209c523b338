"""The model family from the command line, as a user runs it: real subprocesses on the digits dataset.

A conditional VAE (class grid, --label), latent traversals of a VAE, and the training options that make a
denoising AE, an IWAE and a cyclically annealed β-VAE; each trains for an epoch or two.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from PIL import Image

from test_cli import FAST, assert_clean_error, assert_png, vaelab


@pytest.fixture(scope="module")
def cvae(tmp_path_factory):
    """A CVAE trained on digits for 2 epochs, with every picture."""
    out = tmp_path_factory.mktemp("family") / "cvae"
    proc = vaelab("train", "--model", "cvae", "--arch", "mlp", "--latent-dim", 4, "--epochs", 2, "--out", out,
                  *FAST, check=0)
    assert "conditioned on 10 classes" in proc.stdout
    return out


@pytest.fixture(scope="module")
def vae4(tmp_path_factory):
    """A VAE with a 4-D latent trained on digits for 2 epochs."""
    out = tmp_path_factory.mktemp("family") / "vae4"
    vaelab("train", "--model", "vae", "--arch", "mlp", "--latent-dim", 4, "--epochs", 2, "--out", out, *FAST,
           check=0)
    return out


def size(path) -> tuple[int, int]:
    with Image.open(path) as im:
        return im.size


def fails(capsys, *argv) -> str:
    """Run the CLI in this process (for errors found before any real work): exit 1, the message."""
    from vaelab.cli import main

    assert main([str(a) for a in argv]) == 1
    err = capsys.readouterr().err
    assert err.startswith("vaelab: error: "), err
    return err


# ------------------------------------------------------------------------------------------ the CVAE


def test_cvae_takes_its_condition_size_from_the_data(cvae):
    cfg = json.loads((cvae / "config.json").read_text())
    assert cfg["model"]["model"] == "cvae" and cfg["model"]["condition_dim"] == 10
    assert cfg["data"]["classes"] == [str(i) for i in range(10)]
    for name in ("reconstructions.png", "samples.png", "manifold.png", "interpolation.png", "traversal.png",
                 "latents.png"):
        assert_png(cvae / name)


def test_cvae_samples_png_is_a_class_grid(cvae):
    w, h = size(cvae / "samples.png")  # 10 classes x 10 samples: about square, below a one-line title
    assert 0.9 < h / w < 1.3
    vaelab("sample", cvae, "--n", 3, "--out", cvae / "grid3.png", check=0)
    w, h = size(cvae / "grid3.png")  # 10 rows of 3: three times taller than wide, give or take the labels
    assert h > 2 * w


def test_sample_a_label(cvae):
    proc = vaelab("sample", cvae, "--label", 3, "--n", 16, check=0)
    assert str(cvae / "samples.png") in proc.stdout
    w, h = assert_png(cvae / "samples.png")
    assert 0.8 < h / w < 1.4  # 4 x 4


def test_a_label_out_of_range_is_a_clean_error(cvae, capsys):
    assert_clean_error(vaelab("sample", cvae, "--label", 12), "--label 12", "0..9")
    assert "'seven'" in fails(capsys, "sample", cvae, "--label", "seven")


def test_every_run_command_conditions_on_the_labels(cvae, tmp_path):
    for command, extra in [("reconstruct", []), ("interpolate", ["--method", "slerp", "--steps", 5]),
                           ("manifold", ["--label", 7, "--n", 5]), ("traverse", ["--index", 3])]:
        out = tmp_path / f"{command}.png"
        vaelab(command, cvae, *extra, "--out", out, check=0)
        assert_png(out, min_w=60)
    vaelab("encode", cvae, "--out", tmp_path / "z.npy", check=0)
    assert np.load(tmp_path / "z.npy").shape == (180, 4)


def test_a_cvae_needs_labelled_data(tmp_path):
    np.save(tmp_path / "x.npy", np.random.default_rng(0).random((50, 6)).astype(np.float32))
    proc = vaelab("train", "--model", "cvae", "--dataset", tmp_path / "x.npy", "--out", tmp_path / "r",
                  "--no-progress")
    assert_clean_error(proc, "conditional", "labels")


def test_unconditional_models_refuse_a_label(vae4, capsys):
    err = fails(capsys, "sample", vae4, "--label", 3)
    assert "--label" in err and "--model cvae" in err


# ------------------------------------------------------------------------------------------ traversals


def test_traverse_draws_one_row_per_latent_dimension(vae4):
    assert_png(vae4 / "traversal.png")  # train draws it for a latent of more than 2 dimensions
    w, h = size(vae4 / "traversal.png")
    assert 0.3 < h / w < 0.6  # 4 rows of 11
    proc = vaelab("traverse", vae4, "--range", 2, "--steps", 5, "--index", 7, "--top", 2,
                  "--out", vae4 / "t.png", check=0)
    assert str(vae4 / "t.png") in proc.stdout
    w, h = size(vae4 / "t.png")
    assert 0.35 < h / w < 0.8  # 2 rows of 5


def test_traverse_refuses_what_it_cannot_draw(vae4, capsys):
    # (models without a prior or with a spatial latent: tests/test_generation.py)
    assert_clean_error(vaelab("traverse", vae4, "--index", 500), "--index 500", "0..179")
    assert "--steps" in fails(capsys, "traverse", vae4, "--steps", 1)
    assert "--range" in fails(capsys, "traverse", vae4, "--range", 0)


# ------------------------------------------------------------------------------------------ training options


def train(tmp_path, *args) -> dict:
    out = tmp_path / "run"
    vaelab("train", *args, "--epochs", 2, "--no-pictures", "--out", out, *FAST, check=0)
    ev = json.loads((out / "evaluation.json").read_text())
    assert np.isfinite(ev["loss"])
    return json.loads((out / "config.json").read_text())


def test_denoising_autoencoder(tmp_path):
    cfg = train(tmp_path, "--model", "ae", "--noise", "gaussian", "--noise-level", 0.5)
    assert cfg["train"]["noise"] == "gaussian" and cfg["train"]["noise_level"] == 0.5


def test_iwae(tmp_path):
    cfg = train(tmp_path, "--model", "vae", "--iw-samples", 5)
    assert cfg["train"]["iw_samples"] == 5


def test_cyclical_kl_annealing(tmp_path):
    cfg = train(tmp_path, "--model", "vae", "--beta", 4, "--kl-schedule", "cyclical", "--kl-warmup", 1)
    assert cfg["train"]["kl_schedule"] == "cyclical" and cfg["model"]["settings"]["beta"] == 4


def test_the_cli_lists_the_options_it_cannot_import():
    from vaelab import cli
    from vaelab.training.corruption import NOISES
    from vaelab.training.schedules import SCHEDULES

    assert cli.NOISES == NOISES and cli.KL_SCHEDULES == SCHEDULES
    text = vaelab("train", "--help", check=0).stdout
    assert "{none,gaussian,masking,salt-pepper}" in text and "IWAE" in text


def test_a_kl_schedule_without_its_length_gets_a_quarter_of_the_epochs(tmp_path):
    from vaelab.cli import _plan

    plan = _plan({"model": "vae", "kl_schedule": "cyclical", "epochs": 8, "out": str(tmp_path / "r")})
    assert plan["train"].kl_warmup == 2  # 4 cycles, as Fu et al. 2019
    plan = _plan({"model": "vae", "kl_schedule": "linear", "kl_warmup": 1.5, "out": str(tmp_path / "r")})
    assert plan["train"].kl_warmup == 1.5
    assert _plan({"model": "cvae", "out": str(tmp_path / "r")})["condition_from_data"]
