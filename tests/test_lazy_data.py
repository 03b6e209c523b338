"""Image folders: --image-size, backgrounds, mixed folders, and lazy reading (workers, the uint8 cache), on real
files written here and on the real emoji folder. A lazy batch must equal the in-memory one bit for bit, and a
run resumed with workers must end on the uninterrupted run's weights exactly."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from vaelab.data import ArrayDataset, LazyImageDataset, load_dataset
from vaelab.data import images as images_module
from vaelab.errors import DataError
from vaelab.models import build_model
from vaelab.training import fit

REPO = Path(__file__).resolve().parents[1]
DATA = Path(os.environ.get("VAELAB_TEST_DATA", REPO.parent / "shared" / "data"))
EMOJI = DATA / "emoji"


def save(path: Path, arr: np.ndarray, mode=None) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, mode).save(path)
    return path


def noise_folder(root: Path, n: int, size: int = 12, seed: int = 0) -> Path:
    """n random RGB PNGs in two class folders: every pixel differs, so a wrong row shows."""
    rng = np.random.default_rng(seed)
    for i in range(n):
        save(root / ("a" if i % 3 else "b") / f"{i:04d}.png", rng.integers(0, 256, (size, size, 3), dtype=np.uint8))
    return root


def rgba_pixel(colour, alpha, **kw) -> list[int]:
    """The one pixel of a 1x1 RGBA file of `colour` and `alpha`, loaded with `kw` (two files: a split needs 2)."""
    root = Path(kw.pop("root"))
    for i in range(2):
        save(root / f"{i}.png", np.array([[[*colour, alpha]]], np.uint8), "RGBA")
    s = load_dataset(root, test_fraction=0.5, **kw)
    return s.train.x[0, :, 0, 0].tolist()


# ------------------------------------------------------------------------------ pixels


def test_transparent_pixels_are_composited_on_the_background_exactly(tmp_path):
    # (c * a + bg * (255 - a) + 127) // 255, per channel: (200*128 + 255*127 + 127) // 255 = 227, ...
    assert rgba_pixel((200, 100, 0), 128, root=tmp_path / "w") == [227, 177, 127]  # white, the default
    assert rgba_pixel((200, 100, 0), 128, root=tmp_path / "k", background="black") == [100, 50, 0]
    assert rgba_pixel((200, 100, 0), 128, root=tmp_path / "c", background="#102030") == [108, 66, 24]
    assert rgba_pixel((200, 100, 0), 0, root=tmp_path / "t", background="#102030") == [16, 32, 48]
    assert rgba_pixel((200, 100, 0), 255, root=tmp_path / "o", background="#102030") == [200, 100, 0]


def test_grey_and_colour_files_mixed_load_as_rgb_and_grey_folders_stay_grey(tmp_path):
    root = tmp_path / "mixed"
    save(root / "grey.png", np.full((4, 4), 77, np.uint8))
    save(root / "red.png", np.tile(np.array([250, 0, 0], np.uint8), (4, 4, 1)))
    s = load_dataset(root, test_fraction=0.5, seed=0)
    pixels = {tuple(x[:, 0, 0].tolist()) for x in (s.train.x[0], s.test.x[0])}
    assert s.train.sample_shape == (3, 4, 4) and pixels == {(77, 77, 77), (250, 0, 0)}

    grey = tmp_path / "grey"
    save(grey / "a.png", np.full((4, 4), 10, np.uint8))
    save(grey / "b.png", np.array([[[30, 255]] * 4] * 4, np.uint8), "LA")  # grey with alpha, on white: grey
    s = load_dataset(grey, test_fraction=0.5)
    assert s.train.sample_shape == (1, 4, 4)
    # on a coloured background a grey file with alpha is colour: (30*255 + bg*0 + 127) // 255 = 30 everywhere
    s = load_dataset(grey, test_fraction=0.5, background="#ff0000")
    assert s.train.sample_shape == (3, 4, 4)
    assert {tuple(x[:, 0, 0].tolist()) for x in (s.train.x[0], s.test.x[0])} == {(10, 10, 10), (30, 30, 30)}


def test_image_size_takes_the_centre_square_and_keeps_square_files_as_they_are(tmp_path):
    root = tmp_path / "sizes"
    wide = np.zeros((20, 60, 3), np.uint8)
    wide[:, :20] = (255, 0, 0)
    wide[:, 20:40] = (0, 255, 0)
    wide[:, 40:] = (0, 0, 255)
    save(root / "a_wide.png", wide)
    tall = np.zeros((60, 20, 3), np.uint8)
    tall[20:40] = (0, 255, 0)
    save(root / "b_tall.png", tall)
    square = np.random.default_rng(1).integers(0, 256, (10, 10, 3), dtype=np.uint8)
    save(root / "c_square.png", square)
    ds = load_dataset(root, test_fraction=0.34, seed=0, image_size=10)
    x = torch.cat([ds.train.x, ds.test.x])[torch.argsort(torch.cat(ds.source_index))]  # the files' order
    assert x.shape == (3, 3, 10, 10)
    green = torch.tensor([0, 255, 0], dtype=torch.uint8)[:, None, None]
    # the centre 20x20 of each is green; shrunk 2x with bicubic, the columns (rows) 2..7 see only green
    assert torch.equal(x[0, :, :, 2:8], green.expand(3, 10, 6))
    assert torch.equal(x[1, :, 2:8, :], green.expand(3, 6, 10))
    assert torch.equal(x[2], torch.from_numpy(square).permute(2, 0, 1))  # already 10x10: untouched


def test_mixed_sizes_without_image_size_name_the_option_and_the_sizes(tmp_path):
    root = tmp_path / "mixed"
    for name, (h, w) in (("a", (8, 8)), ("b", (8, 8)), ("c", (6, 10))):
        save(root / f"{name}.png", np.zeros((h, w), np.uint8))
    with pytest.raises(DataError) as e:
        load_dataset(root)
    assert str(e.value) == (
        f"images differ in size: 8x8 (2 files, e.g. {root / 'a.png'}), 10x6 (1 file, e.g. {root / 'c.png'}); "
        "expected one size for all. Give --image-size N (image_size=N in Python) to resize each image's short side "
        "to N and centre-crop N x N, or resize the files first")
    assert load_dataset(root, image_size=6, test_fraction=0.34).train.sample_shape == (1, 6, 6)


def test_option_errors_name_the_value(tmp_path):
    root = noise_folder(tmp_path / "f", 4)
    with pytest.raises(DataError) as e:
        load_dataset(root, background="grey")
    assert str(e.value) == ("background 'grey': expected white, black or a colour #rrggbb (e.g. #808080), the "
                            "colour transparent pixels are composited on")
    with pytest.raises(DataError) as e:
        load_dataset(root, image_size=0)
    assert str(e.value) == ("image_size 0: expected a whole number of pixels from 1 to 4096 (e.g. 64), the side of "
                            "the square images to make")
    with pytest.raises(DataError) as e:
        load_dataset("digits", image_size=32)
    assert str(e.value) == ("image_size=32: options of image folders, but dataset 'digits' is not a folder of "
                            "images; leave them out for this data")
    with pytest.raises(DataError) as e:
        load_dataset(root, lazy=False, workers=2)
    assert str(e.value) == ("dataset 'f' is held in memory: workers=2 and cache=False apply to folders read "
                            "lazily; give lazy=True (--lazy) with them, or leave them out")


# ------------------------------------------------------------------------------ lazy reading


@pytest.mark.skipif(not EMOJI.is_dir(), reason=f"the emoji folder is not in {DATA}")
def test_lazy_emoji_batches_equal_the_in_memory_batches_bit_for_bit():
    held = load_dataset(EMOJI)
    lazy = load_dataset(EMOJI, lazy=True, workers=2)
    assert isinstance(held.train, ArrayDataset) and isinstance(lazy.train, LazyImageDataset)
    assert (len(lazy.train), len(lazy.test), lazy.train.sample_shape) == (1716, 190, (3, 64, 64))
    assert torch.equal(lazy.train.y, held.train.y) and lazy.train.classes == held.train.classes
    order = torch.randperm(len(held.train), generator=torch.Generator().manual_seed(0))
    batches = [order[i:i + 128] for i in range(0, len(order), 128)]
    for got, idx in zip(lazy.train.batches(batches), batches, strict=True):  # decoded by the 2 workers
        assert torch.equal(got, held.train.batch(idx))
    assert torch.equal(lazy.test.batch(slice(None)), held.test.batch(slice(None)))  # decoded here
    gen_a, gen_b = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(lazy.test.batch(torch.arange(40), binarize=True, generator=gen_a),
                       held.test.batch(torch.arange(40), binarize=True, generator=gen_b))
    with pytest.raises(DataError, match="has no `x` tensor"):
        lazy.train.x


def test_lazy_is_chosen_by_the_decoded_size(tmp_path, monkeypatch):
    root = noise_folder(tmp_path / "f", 10, size=8)  # 10 * 3 * 8 * 8 = 1920 bytes decoded
    assert isinstance(load_dataset(root).train, ArrayDataset)
    monkeypatch.setattr(images_module, "LAZY_BYTES", 1919)
    assert isinstance(load_dataset(root).train, LazyImageDataset)
    assert isinstance(load_dataset(root, lazy=False).train, ArrayDataset)
    assert isinstance(load_dataset(root, workers=1).train, LazyImageDataset)  # workers ask for lazy reading
    monkeypatch.setattr(images_module, "LAZY_BYTES", 1920)
    assert isinstance(load_dataset(root).train, ArrayDataset)


def test_the_cache_fills_in_the_first_pass_and_later_loads_read_it(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    root = noise_folder(tmp_path / "f", 40)
    held = load_dataset(root)
    lazy = load_dataset(root, lazy=True, workers=2, cache=True)
    path = lazy.train.cache_path
    assert path.parent == tmp_path / "cache" / "vaelab" / "images" and not path.exists()
    batches = [torch.arange(i, min(i + 8, len(lazy.train))) for i in range(0, len(lazy.train), 8)]
    for got, idx in zip(lazy.train.batches(batches[:-1]), batches):  # a pass that leaves out a batch
        assert torch.equal(got, held.train.batch(idx))
    # the pass ended: the rows no pass had read (the last batch, the test split) were decoded and the file put in
    # place, in the folder's file order
    whole = torch.cat([held.train.x, held.test.x])[torch.argsort(torch.cat(held.source_index))]
    assert torch.equal(torch.from_numpy(np.load(path)), whole)
    assert sorted(p.name for p in path.parent.iterdir()) == [path.name]  # no temporary file left

    again = load_dataset(root, lazy=True, cache=True)
    assert again.train.cache_path == path and again.train._store.mapped is not None  # read, not decoded
    assert torch.equal(again.test.batch(slice(None)), held.test.batch(slice(None)))
    os.utime(root / "a" / "0001.png", ns=(1, 1))  # a changed file: another key, another cache
    assert load_dataset(root, lazy=True, cache=True).train.cache_path != path
    assert load_dataset(root, lazy=True, cache=True, image_size=6).train.cache_path != path


def _crash_at(n: int):
    calls = {"n": 0}

    def hook(module, args):
        calls["n"] += 1
        if calls["n"] == n:
            raise KeyboardInterrupt  # the process dies here, as after a kill

    return hook


def test_resume_with_workers_ends_on_the_uninterrupted_weights_exactly(tmp_path):
    root = noise_folder(tmp_path / "f", 150, size=8)
    held = load_dataset(root, seed=0)
    lazy = load_dataset(root, seed=0, lazy=True, workers=2)
    kw = dict(epochs=2, batch_size=16, progress=False, seed=3, checkpoint_every=5)  # 9 steps an epoch

    def build():
        torch.manual_seed(0)
        return build_model("seed-vae", input_shape=(3, 8, 8))

    straight = build()
    fit(straight, held.train, held.test, out=tmp_path / "a", **kw)
    crashed = build()
    crashed.register_forward_pre_hook(_crash_at(13))  # step 13 (epoch 2, its 4th); the last checkpoint: step 10
    with pytest.raises(KeyboardInterrupt):
        fit(crashed, lazy.train, lazy.test, out=tmp_path / "b", **kw)
    resumed = build()
    fit(resumed, lazy.train, lazy.test, out=tmp_path / "b", resume=True, **kw)
    a, b = straight.state_dict(), resumed.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_cli_mixed_folder_needs_image_size_then_trains_lazily(tmp_path):
    root = tmp_path / "mixed"
    for i, (h, w) in enumerate(((20, 30), (30, 20), (24, 24), (40, 16))):
        save(root / f"{i}.png", np.full((h, w, 3), 50 * i, np.uint8))
    env = dict(os.environ, PYTHONPATH=str(REPO / "src"))
    train = [sys.executable, "-m", "vaelab", "train", "--dataset", str(root), "--epochs", "1", "--no-progress",
             "--no-pictures", "--batch-size", "2", "--out", str(tmp_path / "run")]
    failed = subprocess.run(train, env=env, capture_output=True, text=True, timeout=120)
    assert failed.returncode == 1 and "Traceback" not in failed.stderr
    assert "images differ in size: " in failed.stderr and "Give --image-size N" in failed.stderr
    done = subprocess.run(train + ["--image-size", "16", "--lazy", "--workers", "2"], env=env, capture_output=True,
                          text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "3 train / 1 test samples of shape (3, 16, 16)" in done.stdout
