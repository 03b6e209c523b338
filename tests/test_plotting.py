"""Pictures (vaelab.plotting): valid PNGs of sensible sizes for gray, colour and odd inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from vaelab.errors import VaelabError
from vaelab.plotting import project_2d, save_image_grid, save_manifold, save_scatter


def png_size(path) -> tuple[int, int]:
    with Image.open(path) as im:
        assert im.format == "PNG"
        return im.size


def test_image_grid_gray_and_rgb(tmp_path):
    gray = torch.rand(20, 1, 28, 28)
    w, h = png_size(save_image_grid(gray, tmp_path / "gray.png", nrow=10, title="title",
                                    row_labels=["original", "reconstruction"]))
    assert w > 2 * h > 0  # two rows of ten: a wide picture
    assert w >= 10 * 28  # at least one screen pixel per image pixel
    rgb = np.random.default_rng(0).random((6, 3, 16, 16))
    w, h = png_size(save_image_grid(rgb, tmp_path / "rgb.png", nrow=3))
    with Image.open(tmp_path / "rgb.png") as im:
        px = np.asarray(im.convert("RGB"))
    assert (px[..., 0] != px[..., 1]).any()  # really in colour
    assert not list(tmp_path.glob(".*.tmp"))  # atomic writes leave no temporary files


def test_image_grid_clips_out_of_range_values_and_rejects_empty(tmp_path):
    x = torch.linspace(-1, 2, 64).reshape(1, 1, 8, 8)  # a Gaussian decoder's mean may leave [0, 1]
    save_image_grid(x, tmp_path / "clip.png", nrow=1)
    with pytest.raises(VaelabError, match="non-empty"):
        save_image_grid(torch.zeros(0, 1, 8, 8), tmp_path / "none.png", nrow=1)


def test_manifold_picture(tmp_path):
    n = 5
    path = save_manifold(torch.rand(n * n, 1, 8, 8), np.linspace(-4, 4, n), np.linspace(4, -4, n),
                         tmp_path / "m.png", dims=(0, 1), title="grid")
    w, h = png_size(path)
    assert 300 < w < 1400 and 300 < h < 1400
    with pytest.raises(VaelabError, match="grid"):
        save_manifold(torch.rand(7, 1, 8, 8), np.arange(3), np.arange(3), tmp_path / "bad.png")


@pytest.mark.parametrize("dim", [1, 2, 5])
@pytest.mark.parametrize("labelled", [True, False])
def test_scatter_of_any_latent_size(tmp_path, dim, labelled):
    rng = np.random.default_rng(0)
    z = rng.normal(size=(300, dim))
    labels = rng.integers(0, 10, 300) if labelled else None
    path = save_scatter(z, labels, tmp_path / "s.png", classes=[str(i) for i in range(10)], title="latents")
    w, h = png_size(path)
    assert w > 400 and h > 300


def test_projections_keep_clusters_apart():
    from sklearn.metrics import silhouette_score

    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 40)
    z = rng.normal(size=(120, 10)) + 8 * np.eye(10)[labels]  # three clusters, far apart in 10-D
    for projection in ("pca", "tsne"):
        xy, xlabel, _ = project_2d(z, projection)
        assert xy.shape == (120, 2) and xlabel.startswith("PC 1" if projection == "pca" else "t-SNE 1")
        assert silhouette_score(xy, labels) > 0.7  # the clusters stay separate in 2-D
    assert silhouette_score(z[:, 3:5], labels) < 0.1  # (two other coordinates would mix them)
    with pytest.raises(VaelabError, match=r"projection='umap' is unknown; choose one of \['pca', 'tsne'\]"):
        project_2d(z, "umap")


def test_scatter_with_many_classes_uses_a_colour_scale(tmp_path):
    rng = np.random.default_rng(0)
    save_scatter(rng.normal(size=(200, 2)), rng.integers(0, 50, 200), tmp_path / "s.png")
    with pytest.raises(VaelabError, match="non-finite"):
        save_scatter(np.full((3, 2), np.nan), None, tmp_path / "nan.png")
