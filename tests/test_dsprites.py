"""The dSprites generator: the factor grid and index mapping, exact pixels against renderings computed here
independently, what the published images show, the bit-packed dataset, and the cache.

The full set (737,280 images) is generated only by the test marked slow.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from vaelab.data import DATASETS, DataSplits, PackedImageDataset, load_dataset
from vaelab.data import dsprites as D
from vaelab.data.arrays import split
from vaelab.errors import DataError

CENTRES = 16 + 32 * np.arange(32) / 31  # a sprite's centre in pixels, per position index
PIXEL = np.arange(64) + 0.5  # pixel centres
SCALES = [0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
SQUARE, ELLIPSE, HEART = 0, 1, 2


@pytest.fixture(autouse=True)
def isolated_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))


def offsets(px: int, py: int):
    """(u, v): each pixel centre's offset from the sprite's centre, (64, 64) indexed [row, column]."""
    return np.meshgrid(PIXEL - CENTRES[px], PIXEL - CENTRES[py])


def to_body(u, v, theta):
    """Image offsets -> the sprite's own frame, for a sprite turned by theta counterclockwise on screen."""
    return u * math.cos(theta) - v * math.sin(theta), u * math.sin(theta) + v * math.cos(theta)


def heart_polygon() -> np.ndarray:
    """The heart as the module docstring defines it (150 points of the heart curve), at scale 1."""
    t = 2 * np.pi * np.arange(150) / 150
    x = 19.2 / 32 * 16 * np.sin(t) ** 3
    y = -19.2 / 29 * (13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t)) - 0.075 * 19.2
    return np.stack([x, y], axis=1)


def inside_polygon(px, py, poly) -> np.ndarray:
    """Even-odd point-in-polygon test (a ray to the right), one point per element of px, py."""
    inside = np.zeros(px.shape, dtype=bool)
    xs, ys = poly[:, 0], poly[:, 1]
    for k in range(len(poly)):
        x0, y0, x1, y1 = xs[k - 1], ys[k - 1], xs[k], ys[k]
        straddles = (y0 > py) != (y1 > py)
        with np.errstate(divide="ignore", invalid="ignore"):
            x_at = x0 + (py - y0) * (x1 - x0) / (y1 - y0)
        inside ^= straddles & (px < x_at)
    return inside


def image(indices) -> np.ndarray:
    return D.render_images([indices])[0]


# ------------------------------------------------------------------------------------------- the factors


def test_the_factor_grid_is_the_published_one():
    assert D.FACTOR_NAMES == ("shape", "scale", "orientation", "pos_x", "pos_y")
    assert D.SHAPES == ("square", "ellipse", "heart")
    assert D.FACTOR_SIZES == (3, 6, 40, 32, 32) and D.NUM_IMAGES == 737_280 == 3 * 6 * 40 * 32 * 32
    values = D.FACTOR_VALUES
    assert values["shape"].tolist() == [0, 1, 2]
    np.testing.assert_allclose(values["scale"], SCALES, rtol=0, atol=1e-15)
    assert values["orientation"][0] == 0 and values["orientation"][-1] == 2 * math.pi
    np.testing.assert_allclose(np.diff(values["orientation"]), 2 * math.pi / 39, rtol=1e-13)
    # the published metadata's values, as printed in its example notebook
    np.testing.assert_allclose(values["orientation"][[1, 5, 13, 38]], [0.16110732, 0.80553658, 2.0943951, 6.12207799],
                               atol=5e-9)
    for name in ("pos_x", "pos_y"):
        np.testing.assert_allclose(values[name], np.arange(32) / 31, rtol=0, atol=1e-15)
    assert "dsprites" in DATASETS


def test_index_and_factors_map_both_ways_in_the_published_order():
    # posY varies fastest, then posX, orientation, scale, shape
    assert D.image_index([[0, 0, 0, 0, 1], [0, 0, 0, 1, 0], [0, 0, 1, 0, 0], [0, 1, 0, 0, 0],
                          [1, 0, 0, 0, 0]]).tolist() == [1, 32, 1024, 40960, 245760]
    assert D.factor_indices(737_279).tolist() == [[2, 5, 39, 31, 31]]
    rng = np.random.default_rng(0)
    index = rng.integers(0, D.NUM_IMAGES, 500)
    indices = D.factor_indices(index)
    assert np.array_equal(D.image_index(indices), index)
    values = D.factor_values(indices)
    assert np.array_equal(D.all_factors()[index], values)
    assert values[0].tolist() == [D.FACTOR_VALUES[n][i] for n, i in zip(D.FACTOR_NAMES, indices[0])]
    full = D.all_factors()
    assert full.shape == (737_280, 5) and full.dtype == np.float64
    assert [len(np.unique(full[:, j])) for j in range(5)] == [3, 6, 40, 32, 32]


def test_bad_factor_indices_are_errors():
    with pytest.raises(DataError) as e:
        D.image_index([[0, 6, 0, 0, 0]])
    assert str(e.value) == "dSprites factor 'scale' index 6 is out of range 0..5"
    with pytest.raises(DataError) as e:
        D.render_images([[0, 0, 0, 32]])
    assert str(e.value) == ("dSprites factor indices have shape (1, 4) and dtype int64; expected integers (n, 5): "
                            "one index per factor (shape, scale, orientation, pos_x, pos_y)")
    with pytest.raises(DataError, match=r"image indices must be integers 0\.\.737279"):
        D.factor_indices([737_280])
    with pytest.raises(DataError, match="shape 'star'"):
        D.render("star", 1, 0, 0.5, 0.5)


# ---------------------------------------------------------------------------- exact pixels, independently


@pytest.mark.parametrize("scale,px,py", [(5, 0, 0), (0, 0, 0), (3, 7, 30), (1, 31, 12), (4, 16, 16)])
def test_an_upright_square_is_the_box_of_its_side(scale, px, py):
    half = 9.6 * SCALES[scale]  # the square's side is 19.2 pixels (0.3 of the canvas) at scale 1
    rows = np.abs(PIXEL - CENTRES[py]) <= half
    cols = np.abs(PIXEL - CENTRES[px]) <= half
    assert np.array_equal(image([SQUARE, scale, 0, px, py]), np.outer(rows, cols).astype(np.uint8))
    if (scale, px, py) == (5, 0, 0):  # the published image: a 20 x 20 box at rows and columns 6..25
        assert np.array_equal(np.nonzero(rows)[0], np.arange(6, 26))


@pytest.mark.parametrize("scale,orientation,px,py", [(5, 1, 0, 0), (2, 7, 11, 3), (5, 17, 25, 29), (0, 33, 4, 20)])
def test_a_turned_square_holds_the_pixel_centres_inside_it(scale, orientation, px, py):
    theta = 2 * math.pi * orientation / 39
    bx, by = to_body(*offsets(px, py), theta)
    half = 9.6 * SCALES[scale]
    expected = (np.abs(bx) <= half) & (np.abs(by) <= half)
    assert np.array_equal(image([SQUARE, scale, orientation, px, py]), expected)


@pytest.mark.parametrize("scale,orientation,px,py", [(5, 0, 0, 0), (0, 0, 13, 2), (5, 5, 0, 0), (3, 12, 30, 9),
                                                     (1, 27, 6, 31), (4, 39, 19, 22)])
def test_an_ellipse_holds_the_pixel_centres_its_equation_says(scale, orientation, px, py):
    theta = 2 * math.pi * orientation / 39
    bx, by = to_body(*offsets(px, py), theta)
    a, b = 12.766 * SCALES[scale], 7.213 * SCALES[scale]
    q = (bx / a) ** 2 + (by / b) ** 2
    assert np.abs(q - 1).min() > 1e-9  # no pixel centre on the outline: the comparison is exact
    assert np.array_equal(image([ELLIPSE, scale, orientation, px, py]), q <= 1)


@pytest.mark.parametrize("scale,orientation,px,py", [(5, 0, 0, 0), (0, 0, 31, 31), (5, 10, 0, 0), (2, 21, 17, 5),
                                                     (4, 33, 8, 26)])
def test_a_heart_holds_the_pixel_centres_inside_its_polygon(scale, orientation, px, py):
    theta = 2 * math.pi * orientation / 39
    bx, by = to_body(*offsets(px, py), theta)
    expected = inside_polygon(bx, by, heart_polygon() * SCALES[scale])
    assert np.array_equal(image([HEART, scale, orientation, px, py]), expected)


def test_symmetries_of_the_shapes():
    for shape in range(3):  # orientation 2 pi is orientation 0, as in the published set
        assert np.array_equal(image([shape, 5, 39, 9, 20]), image([shape, 5, 0, 9, 20]))
    for scale in SCALES:  # centred on the canvas: the pixel grid is symmetric about the sprite's centre
        square = D.render("square", scale, 0, 0.5, 0.5)
        assert np.array_equal(D.render("square", scale, math.pi / 2, 0.5, 0.5), square)
        assert np.array_equal(D.render("square", scale, math.pi, 0.5, 0.5), square)
        ellipse = D.render("ellipse", scale, 0.7, 0.5, 0.5)
        assert np.array_equal(D.render("ellipse", scale, 0.7 + math.pi, 0.5, 0.5), ellipse)
        assert np.array_equal(D.render("ellipse", scale, math.pi / 2, 0.5, 0.5), np.rot90(D.render("ellipse", scale, 0,
                                                                                                    0.5, 0.5)))
        heart = D.render("heart", scale, 0, 0.5, 0.5)
        assert np.array_equal(heart, np.fliplr(heart))  # mirror-symmetric about its upright axis
        # a quarter turn counterclockwise on screen is np.rot90 of the image
        assert np.array_equal(D.render("heart", scale, math.pi / 2, 0.5, 0.5), np.rot90(heart))
        assert np.array_equal(D.render("heart", scale, math.pi, 0.5, 0.5), np.rot90(heart, 2))


def test_positions_move_the_sprite_across_the_centre_half_of_the_canvas():
    # centres 16 + 32 pos: x grows with pos_x along the columns, y with pos_y down the rows
    for px, py in [(0, 0), (31, 0), (0, 31), (31, 31)]:
        ys, xs = np.nonzero(image([SQUARE, 5, 0, px, py]))
        assert (xs.mean() + 0.5, ys.mean() + 0.5) == (CENTRES[px], CENTRES[py]) == (16 + 32 * px / 31, 16 + 32 * py / 31)
    # no sprite reaches the canvas's border pixels (the published set's density shows none either)
    corners = [[s, 5, o, px, py] for s in range(3) for o in range(40) for px in (0, 31) for py in (0, 31)]
    images = D.render_images(corners)
    assert images[:, [0, -1], :].sum() == 0 and images[:, :, [0, -1]].sum() == 0


# the published images: (factor indices), white pixels, (first, last row), (first, last column), as measured on
# frames of the dataset's own animation (dsprites.gif in github.com/deepmind/dsprites-dataset, 64x64 images)
PUBLISHED = [((2, 0, 0, 0, 0), 58, (11, 19), (11, 20)),
             ((2, 5, 10, 0, 0), 225, (7, 25), (6, 24)),
             ((2, 5, 0, 0, 10), 224, (17, 34), (6, 25)),
             ((2, 5, 0, 20, 31), 222, (39, 56), (27, 45)),
             ((1, 5, 0, 0, 0), 288, (9, 22), (3, 28)),
             ((1, 5, 20, 0, 0), 290, (9, 22), (3, 28)),
             ((0, 0, 0, 0, 0), 100, (11, 20), (11, 20)),
             ((0, 5, 1, 0, 0), 368, (5, 26), (5, 26)),
             ((0, 5, 5, 0, 0), 364, (3, 28), (3, 28)),
             ((0, 5, 26, 0, 0), 368, (3, 28), (3, 28))]


@pytest.mark.parametrize("indices,count,rows,cols", PUBLISHED)
def test_images_match_the_published_ones(indices, count, rows, cols):
    img = image(list(indices))
    ys, xs = np.nonzero(img)
    assert (int(img.sum()), (ys.min(), ys.max()), (xs.min(), xs.max())) == (count, rows, cols)


def test_a_sprites_block_is_its_1024_images_rendered_one_by_one():
    for shape, scale, orientation in [(0, 2, 3), (1, 5, 14), (2, 0, 29), (2, 5, 0)]:
        block = D.sprite_block(shape, D.FACTOR_VALUES["scale"][scale], D.FACTOR_VALUES["orientation"][orientation])
        grid = np.stack(np.meshgrid(np.arange(32), np.arange(32), indexing="ij"), -1).reshape(-1, 2)  # pos_x major
        indices = np.column_stack([np.full((1024, 3), [shape, scale, orientation]), grid])
        assert block.shape == (1024, 512) and block.dtype == np.uint8
        assert np.array_equal(D.unpack(block), D.render_images(indices))
        assert np.array_equal(np.packbits(D.render_images(indices).reshape(1024, -1), axis=1), block)


# --------------------------------------------------------------------------------------- the dataset


def small_packed(n=10, seed=0):
    pixels = (np.random.default_rng(seed).random((n, 1, 64, 64)) < 0.3).astype(np.uint8)
    return pixels, np.packbits(pixels.reshape(n, -1), axis=1)


def test_a_packed_dataset_reads_like_an_array_dataset():
    pixels, bits = small_packed()
    factors = np.arange(20.0).reshape(10, 2)
    ds = PackedImageDataset(bits, (1, 64, 64), torch.arange(10) % 3, ["a", "b", "c"], "toy", factors=factors,
                            factor_names=["f", "g"])
    assert len(ds) == 10 and ds.sample_shape == (1, 64, 64) and ds.is_image and ds.scale == 1.0
    assert ds.num_classes == 3
    idx = torch.tensor([7, 2, 2])
    x = ds.batch(idx)
    assert x.dtype == torch.float32 and torch.equal(x, torch.from_numpy(pixels[[7, 2, 2]]).float())
    assert torch.equal(ds.batch(slice(3, 5)), torch.from_numpy(pixels[3:5]).float())
    assert torch.equal(ds.batch(4), torch.from_numpy(pixels[4]).float())
    g1, g2 = torch.Generator().manual_seed(0), torch.Generator().manual_seed(0)
    assert torch.equal(ds.batch(idx, binarize=True, generator=g1), x)  # 0/1 pixels stay as they are
    torch.bernoulli(x, generator=g2)  # and the generator moves on as ArrayDataset's does
    assert torch.equal(torch.rand(3, generator=g1), torch.rand(3, generator=g2))
    sub = ds.subset(torch.tensor([9, 1, 4]))
    assert torch.equal(sub.batch(slice(None)), torch.from_numpy(pixels[[9, 1, 4]]).float())
    assert sub.factors.tolist() == [[18, 19], [2, 3], [8, 9]] and sub.factor_names == ["f", "g"]
    assert sub.y.tolist() == [0, 1, 1] and np.array_equal(sub.bits, bits[[9, 1, 4]])
    assert torch.equal(sub.subset([2, 0]).batch(slice(None)), torch.from_numpy(pixels[[4, 9]]).float())
    parts = split(ds, 0.3, seed=1)
    train_idx, test_idx = parts.source_index
    assert torch.equal(parts.test.batch(slice(None)), torch.from_numpy(pixels[test_idx.numpy()]).float())
    assert torch.equal(parts.train.factors, torch.from_numpy(factors[train_idx.numpy()]))
    assert torch.equal(ds.to_float(), torch.from_numpy(pixels).float())
    assert "1 bit a pixel" in repr(ds) and "factors f, g" in repr(ds)


def test_a_packed_dataset_has_no_x_and_refuses_a_giant_float_copy(monkeypatch):
    _, bits = small_packed()
    ds = PackedImageDataset(bits, (1, 64, 64), name="toy")
    with pytest.raises(DataError) as e:
        ds.x
    assert str(e.value) == ("dataset 'toy' keeps its 10 images bit-packed and has no `x` tensor; read samples with "
                            "batch(idx) (float32 0/1, one batch at a time), or subset(idx).to_float() for a few")
    monkeypatch.setattr(PackedImageDataset, "max_float_bytes", 100_000)
    with pytest.raises(DataError) as e:
        ds.to_float()
    assert str(e.value) == ("dataset 'toy' keeps its 10 images bit-packed; as one float32 tensor they would take "
                            "0.0 GiB: read them in batches with batch(idx), or take a subset(idx) first")
    assert ds.subset([0]).to_float().shape == (1, 1, 64, 64)
    with pytest.raises(DataError, match="rows of 511 bytes cannot hold images of shape"):
        PackedImageDataset(bits[:, :511], (1, 64, 64))
    with pytest.raises(DataError, match=r"factors have shape \(9, 1\); expected \(10, F\)"):
        PackedImageDataset(bits, (1, 64, 64), factors=np.zeros((9, 1)))


def test_load_dataset_dsprites_gives_splits_with_factors(monkeypatch):
    # the images themselves: the slow test; here the cache returns blank images (np.zeros costs no memory
    # until written), so the splits, labels and factors are checked in a moment
    monkeypatch.setattr(D, "cached_images", lambda: np.zeros((D.NUM_IMAGES, 512), dtype=np.uint8))
    data = load_dataset("dsprites")
    assert isinstance(data, DataSplits) and data.name == "dsprites"
    assert (len(data.train), len(data.test)) == (663_552, 73_728)  # a seeded 10% test split
    train_idx, test_idx = data.source_index
    assert torch.equal(test_idx, torch.randperm(737_280, generator=torch.Generator().manual_seed(0))[:73_728].sort()[0])
    full = torch.from_numpy(D.all_factors())
    assert torch.equal(data.test.factors, full[test_idx]) and torch.equal(data.train.factors, full[train_idx])
    assert data.train.factor_names == ["shape", "scale", "orientation", "pos_x", "pos_y"]
    assert torch.equal(data.test.y, full[test_idx, 0].long()) and data.test.classes == ["square", "ellipse", "heart"]
    assert isinstance(data.train, PackedImageDataset) and data.train.sample_shape == (1, 64, 64)
    assert load_dataset("dsprites", seed=3, test_fraction=0.5).test.factors.shape == (368_640, 5)


# ------------------------------------------------------------------------------------------ the cache


def test_the_cache_file_round_trips_and_detects_damage(tmp_path):
    path = tmp_path / "c.bits"
    buf, images = D.new_buffer(1024)
    images[:] = D.sprite_block(2, 1.0, 0.5)
    D.write_cache(path, buf)
    assert path.stat().st_size == D.HEADER_BYTES + 1024 * 512
    assert np.array_equal(D.read_cache(path, 1024), images)
    with pytest.raises(D.CacheProblem) as e:
        D.read_cache(path)  # the full set's count
    assert str(e.value) == "holds 1024 images; expected 737,280"
    data = path.read_bytes()
    damaged = bytearray(data)
    damaged[D.HEADER_BYTES + 1000] ^= 0x10  # one flipped bit
    path.write_bytes(bytes(damaged))
    with pytest.raises(D.CacheProblem) as e:
        D.read_cache(path, 1024)
    assert str(e.value) == "fails its SHA-256 check: the images changed after they were written (corrupt)"
    path.write_bytes(data[:-512])
    with pytest.raises(D.CacheProblem) as e:
        D.read_cache(path, 1024)
    assert str(e.value) == "holds 527,872 bytes where 528,384 were expected (truncated or corrupt)"
    path.write_bytes(data[:100])
    with pytest.raises(D.CacheProblem) as e:
        D.read_cache(path, 1024)
    assert str(e.value) == "has an unreadable header (truncated or corrupt)"
    path.write_bytes(data.replace(b'"format_version": 1', b'"format_version": 0', 1))
    with pytest.raises(D.CacheProblem) as e:
        D.read_cache(path, 1024)
    assert str(e.value) == "has format version 0; this vaelab writes version 1"
    fingerprint = D.renderer_fingerprint().encode()
    assert fingerprint in data
    path.write_bytes(data.replace(fingerprint, b"0" * len(fingerprint), 1))
    with pytest.raises(D.CacheProblem) as e:
        D.read_cache(path, 1024)
    assert str(e.value) == "was drawn by another version of vaelab's dSprites renderer"
    path.write_bytes(b"\x93NUMPY" + data[6:])
    with pytest.raises(D.CacheProblem, match="is not a vaelab dSprites cache"):
        D.read_cache(path, 1024)


def test_a_damaged_cache_is_generated_again_with_a_message(tmp_path, monkeypatch, capsys):
    # a small stand-in for the full set: 2 sprites' blocks
    monkeypatch.setattr(D, "NUM_IMAGES", 2048)

    def generate(out):
        out[:1024], out[1024:] = D.sprite_block(0, 1.0, 0.3), D.sprite_block(2, 0.5, 1.0)
        return out

    monkeypatch.setattr(D, "generate", generate)
    path = D.cache_path()
    assert str(path).startswith(str(tmp_path / "xdg-cache" / "vaelab" / "dsprites"))
    first = D.cached_images()
    assert "generating dSprites (2,048 images of 64x64) into" in capsys.readouterr().err
    assert np.array_equal(D.read_cache(path, 2048), first)
    again = D.cached_images()  # read, not generated
    assert np.array_equal(again, first) and capsys.readouterr().err == ""
    with open(path, "r+b") as f:
        f.truncate(D.HEADER_BYTES + 5000)
    third = D.cached_images()
    err = capsys.readouterr().err
    assert (f"vaelab: the dSprites cache {path} holds {D.HEADER_BYTES + 5000:,} bytes where "
            f"{D.HEADER_BYTES + 2048 * 512:,} were expected (truncated or corrupt); generating it again") in err
    assert np.array_equal(third, first) and np.array_equal(D.read_cache(path, 2048), first)


@pytest.mark.slow
def test_the_full_set_generates_caches_and_loads(capsys):
    """All 737,280 images: generated into the cache, read back bit-identical, their counts, a sample against
    the one-by-one renderer, a truncated cache regenerated, and load_dataset's splits."""
    images = D.cached_images()
    assert images.shape == (737_280, 512) and images.dtype == np.uint8
    assert "dSprites generated in" in capsys.readouterr().err
    path = D.cache_path()
    assert path.stat().st_size == D.HEADER_BYTES + 737_280 * 512
    assert np.array_equal(D.read_cache(path), images)
    rng = np.random.default_rng(1)
    index = rng.integers(0, D.NUM_IMAGES, 2000)
    assert np.array_equal(D.unpack(images[index]), D.render_images(D.factor_indices(index)))
    # white pixels per image: every image holds a sprite; the scale sets its size
    counts = np.unpackbits(images[::97], axis=1).sum(axis=1)
    assert counts.min() > 0
    with open(path, "r+b") as f:
        f.truncate(path.stat().st_size // 2)
    regenerated = D.cached_images()
    assert "generating it again" in capsys.readouterr().err
    assert np.array_equal(regenerated, images) and np.array_equal(D.read_cache(path), images)
    del regenerated, images
    data = load_dataset("dsprites")
    assert (len(data.train), len(data.test)) == (663_552, 73_728)
    some = torch.arange(0, 73_728, 4096)
    x = data.test.batch(some)
    expected = D.render_images(D.factor_indices(data.source_index[1][some].numpy()))
    assert torch.equal(x, torch.from_numpy(expected).float()[:, None])
    assert torch.equal(data.test.factors[some], torch.from_numpy(D.all_factors()[data.source_index[1][some].numpy()]))
