"""Data layer: real MNIST / Fashion-MNIST, digits, the user's own files, and every bad input -> DataError."""

from __future__ import annotations

import gzip
import os
import struct
import time
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.datasets import load_digits

from offline import closed_port, isolate
from vaelab.data import (DATASETS, ArrayDataset, DataSplits, cache_dir, default_data_dirs, load_dataset,
                         read_idx, standardize)
from vaelab.data import sources
from vaelab.errors import DataError

REPO = Path(__file__).resolve().parents[1]
MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
MNIST_TEST_COUNTS = [980, 1135, 1032, 1010, 982, 892, 958, 1028, 974, 1009]


def shared_data() -> Path:
    root = Path(os.environ.get("VAELAB_TEST_DATA") or REPO.parent / "shared" / "data")
    for name in ("mnist", "fashion-mnist"):
        for f in sources.FILENAMES:
            if not (root / name / f).is_file():
                pytest.skip(f"real dataset file {root / name / f} is absent (set VAELAB_TEST_DATA)")
    return root



@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """No test may see the user's cache or data, nor reach the internet."""
    isolate(tmp_path, monkeypatch)


def idx_bytes(arr: np.ndarray, code: int = 0x08) -> bytes:
    return bytes([0, 0, code, arr.ndim]) + struct.pack(f">{arr.ndim}I", *arr.shape) + arr.tobytes()


def write_set(folder: Path, n_train=6, n_test=4, size=28, gz=True, labels=None) -> Path:
    """A tiny fake MNIST folder (random pixels) in the real file layout."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("t10k", n_test)):
        imgs = rng.integers(0, 256, (n, size, size), dtype=np.uint8)
        lbls = np.arange(n, dtype=np.uint8) % 10 if labels is None else labels
        for kind, arr in (("images-idx3", imgs), ("labels-idx1", lbls)):
            data = idx_bytes(arr)
            name = f"{split}-{kind}-ubyte"
            if gz:
                (folder / (name + ".gz")).write_bytes(gzip.compress(data))
            else:
                (folder / name).write_bytes(data)
    return folder


def raises_naming(path, fn, *args, **kwargs) -> str:
    with pytest.raises(DataError) as info:
        fn(*args, **kwargs)
    msg = str(info.value)
    assert str(path) in msg, msg
    return msg


# ------------------------------------------------------------------------------ real MNIST / Fashion


@pytest.fixture(scope="module")
def mnist():
    return load_dataset("mnist", shared_data(), progress=False)


def test_mnist_from_data_dir(mnist):
    assert isinstance(mnist, DataSplits) and mnist.name == "mnist"
    assert mnist.train.x.shape == (60000, 1, 28, 28) and mnist.test.x.shape == (10000, 1, 28, 28)
    assert mnist.train.x.dtype == torch.uint8 and mnist.train.y.dtype == torch.int64
    assert mnist.train.scale == 255.0 and mnist.train.is_image and mnist.train.sample_shape == (1, 28, 28)
    assert np.bincount(mnist.train.y.numpy()).tolist() == MNIST_TRAIN_COUNTS
    assert np.bincount(mnist.test.y.numpy()).tolist() == MNIST_TEST_COUNTS
    assert mnist.train.classes == [str(i) for i in range(10)] and mnist.train.num_classes == 10
    # The first training image is a 5 whose brightest pixels are 255.
    assert int(mnist.train.y[0]) == 5 and int(mnist.train.x[0].max()) == 255
    # The well-known MNIST training mean, 0.1306604762738431 (as used in torchvision examples).
    total = int(mnist.train.x.sum())
    assert total == 1567298545 and abs(total / (60000 * 784 * 255) - 0.1306604762738431) < 1e-15


def test_mnist_batches(mnist):
    idx = torch.arange(256)
    b = mnist.train.batch(idx)
    assert b.dtype == torch.float32 and b.shape == (256, 1, 28, 28)
    assert float(b.min()) == 0.0 and float(b.max()) == 1.0
    torch.testing.assert_close(b, mnist.train.x[:256].float() / 255)
    b1 = mnist.train.batch(idx, binarize=True)
    b2 = mnist.train.batch(idx, binarize=True)
    assert set(b1.unique().tolist()) == {0.0, 1.0}
    assert not torch.equal(b1, b2)  # dynamic binarization: fresh each call
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    assert torch.equal(mnist.train.batch(idx, True, g1), mnist.train.batch(idx, True, g2))
    assert torch.equal(mnist.train.labels(idx), mnist.train.y[:256])


def test_mnist_via_env_and_dataset_folder(monkeypatch):
    root = shared_data()
    monkeypatch.setenv("VAELAB_DATA", str(root))
    s = load_dataset("mnist", download=False)
    assert len(s.train) == 60000 and len(s.test) == 10000
    # data_dir may also be the dataset's own folder.
    s2 = load_dataset("MNIST", root / "mnist", download=False)
    assert torch.equal(s.test.x, s2.test.x)


def test_fashion_mnist(monkeypatch):
    root = shared_data()
    monkeypatch.setenv("VAELAB_DATA", str(root))
    s = load_dataset("fashion-mnist", download=False)
    assert s.train.x.shape == (60000, 1, 28, 28) and s.test.x.shape == (10000, 1, 28, 28)
    assert s.train.x.dtype == torch.uint8
    assert np.bincount(s.train.y.numpy()).tolist() == [6000] * 10
    assert np.bincount(s.test.y.numpy()).tolist() == [1000] * 10
    assert s.train.classes[0] == "T-shirt/top" and s.train.classes[9] == "Ankle boot"
    via_arg = load_dataset("fashion-mnist", root, download=False)
    assert torch.equal(via_arg.test.y, s.test.y)
    assert int(s.train.y[0]) == 9  # the first Fashion-MNIST training image is an ankle boot


def test_fashion_mnist_from_system_dir(monkeypatch):
    monkeypatch.setattr(sources, "SYSTEM_DIRS", {"fashion-mnist": [shared_data() / "fashion-mnist"]})
    assert len(load_dataset("fashion-mnist", download=False).test) == 10000


def test_raw_uncompressed_files(tmp_path):
    src = shared_data() / "mnist"
    dst = tmp_path / "raw" / "mnist"
    dst.mkdir(parents=True)
    for f in sources.FILENAMES:
        (dst / f[:-3]).write_bytes(gzip.decompress((src / f).read_bytes()))
    s = load_dataset("mnist", tmp_path / "raw", download=False)
    assert s.train.x.shape == (60000, 1, 28, 28)
    assert np.bincount(s.train.y.numpy()).tolist() == MNIST_TRAIN_COUNTS


def test_lookup_order(tmp_path, monkeypatch):
    monkeypatch.setenv("VAELAB_DATA", str(tmp_path / "env"))
    monkeypatch.setattr(sources, "SYSTEM_DIRS", {"fashion-mnist": [tmp_path / "sys"]})
    given = tmp_path / "given"
    assert default_data_dirs("fashion-mnist", given) == [
        given / "fashion-mnist", given, tmp_path / "env" / "fashion-mnist", tmp_path / "env",
        tmp_path / "xdg-cache" / "vaelab" / "fashion-mnist", tmp_path / "sys"]
    assert default_data_dirs("mnist") == [tmp_path / "env" / "mnist", tmp_path / "env",
                                          tmp_path / "xdg-cache" / "vaelab" / "mnist"]
    assert cache_dir() == tmp_path / "xdg-cache" / "vaelab"
    monkeypatch.delenv("XDG_CACHE_HOME")
    assert cache_dir() == Path.home() / ".cache" / "vaelab"
    # The first complete folder wins: the env folder (6 training images) before the cache (8).
    write_set(tmp_path / "env" / "mnist", n_train=6)
    write_set(tmp_path / "xdg-cache" / "vaelab" / "mnist", n_train=8)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg-cache"))
    assert len(load_dataset("mnist", download=False).train) == 6
    write_set(tmp_path / "given", n_train=3, gz=False)  # files directly in data_dir, uncompressed
    assert len(load_dataset("mnist", tmp_path / "given", download=False).train) == 3
    # A folder named after the other dataset is never taken for this one (same file names).
    assert default_data_dirs("Fashion_MNIST", tmp_path / "x" / "mnist")[:2] == [
        tmp_path / "x" / "mnist" / "fashion-mnist", tmp_path / "env" / "fashion-mnist"]


def test_not_found_without_download_lists_places(tmp_path, monkeypatch):
    monkeypatch.setenv("VAELAB_DATA", str(tmp_path / "env"))
    partial = tmp_path / "given" / "mnist"
    write_set(partial)
    (partial / "t10k-labels-idx1-ubyte.gz").unlink()
    msg = str(pytest.raises(DataError, load_dataset, "mnist", tmp_path / "given", download=False).value)
    for place in default_data_dirs("mnist", tmp_path / "given"):
        assert str(place) in msg
    assert "missing t10k-labels-idx1-ubyte.gz" in msg and "VAELAB_DATA" in msg and "--data-dir" in msg


# ------------------------------------------------------------------------------ bad IDX files


def test_truncated_gzip(tmp_path):
    folder = write_set(tmp_path / "mnist")
    f = folder / "train-images-idx3-ubyte.gz"
    f.write_bytes(f.read_bytes()[:-20])
    msg = raises_naming(f, load_dataset, "mnist", tmp_path, download=False)
    assert "corrupt or truncated" in msg
    raises_naming(f, read_idx, f)


def test_corrupt_gzip_bytes(tmp_path):
    folder = write_set(tmp_path / "mnist")
    f = folder / "train-images-idx3-ubyte.gz"
    data = bytearray(f.read_bytes())
    for i in range(20, 60):
        data[i] ^= 0x5A
    f.write_bytes(bytes(data))
    raises_naming(f, load_dataset, "mnist", tmp_path, download=False)


def test_wrong_magic(tmp_path):
    folder = write_set(tmp_path / "mnist", gz=False)
    f = folder / "t10k-labels-idx1-ubyte"
    f.write_bytes(b"\x01\x02" + f.read_bytes()[2:])
    msg = raises_naming(f, load_dataset, "mnist", tmp_path, download=False)
    assert "not an IDX file" in msg


def test_wrong_image_shape(tmp_path):
    write_set(tmp_path / "mnist", size=27)
    msg = raises_naming(tmp_path / "mnist" / "train-images-idx3-ubyte.gz", load_dataset, "mnist", tmp_path,
                        download=False)
    assert "(6, 27, 27)" in msg and "(N, 28, 28)" in msg


def test_count_mismatch(tmp_path):
    folder = write_set(tmp_path / "mnist")
    (folder / "train-labels-idx1-ubyte.gz").write_bytes(gzip.compress(idx_bytes(np.zeros(5, np.uint8))))
    msg = raises_naming(folder / "train-labels-idx1-ubyte.gz", load_dataset, "mnist", tmp_path, download=False)
    assert "5 labels" in msg and "6 images" in msg


def test_label_out_of_range(tmp_path):
    write_set(tmp_path / "mnist", n_train=3, n_test=3, labels=np.array([1, 12, 3], np.uint8))
    msg = raises_naming(tmp_path / "mnist" / "train-labels-idx1-ubyte.gz", load_dataset, "mnist", tmp_path,
                        download=False)
    assert "label 12" in msg


def test_wrong_dtype_and_header_fields(tmp_path):
    f = tmp_path / "x.idx"
    f.write_bytes(idx_bytes(np.zeros((2, 3), ">i4"), code=0x0C))
    assert read_idx(f).tolist() == [[0, 0, 0], [0, 0, 0]]
    assert "expected" in raises_naming(f, read_idx, f, expected_dtype=np.uint8)
    f.write_bytes(bytes([0, 0, 0x07, 1, 0, 0, 0, 1, 0]))
    assert "type code 0x07" in raises_naming(f, read_idx, f)
    f.write_bytes(bytes([0, 0, 0x08, 0]))
    assert "0 dimensions" in raises_naming(f, read_idx, f)
    f.write_bytes(bytes([0, 0, 0x08, 5]) + b"\0" * 20)
    assert "5 dimensions" in raises_naming(f, read_idx, f)
    f.write_bytes(bytes([0, 0, 0x0E, 4]) + struct.pack(">4I", 0, 2**31, 2**31, 2**31))
    assert "impossible shape" in raises_naming(f, read_idx, f)
    f.write_bytes(bytes([0, 0, 0x08, 3, 0, 0]))
    assert "ends inside its IDX header" in raises_naming(f, read_idx, f)
    f.write_bytes(idx_bytes(np.arange(4, dtype=np.uint8)) + b"extra")
    raises_naming(f, read_idx, f)
    f.write_bytes(gzip.compress(idx_bytes(np.arange(4, dtype=np.uint8)) + b"extra"))
    assert "more data bytes" in raises_naming(f, read_idx, f)
    f.write_bytes(idx_bytes(np.array([1.5, -2.0], ">f4"), code=0x0D))
    assert read_idx(f).tolist() == [1.5, -2.0] and read_idx(f).dtype == np.float32


@pytest.mark.parametrize("gz", [False, True])
def test_huge_header_rejected_without_allocating(tmp_path, gz):
    # 10^4 x 10^4 x 10^4 = 10^12 claimed items followed by a few bytes.
    data = bytes([0, 0, 0x08, 3]) + struct.pack(">3I", 10_000, 10_000, 10_000) + b"\x00" * 1000
    f = tmp_path / ("huge.idx.gz" if gz else "huge.idx")
    f.write_bytes(gzip.compress(data) if gz else data)
    tracemalloc.start()
    t = time.perf_counter()
    try:
        msg = raises_naming(f, read_idx, f)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert time.perf_counter() - t < 1.0
    assert peak < 1_000_000
    assert "1000000000000" in msg


def test_gzip_bomb_is_bounded(tmp_path):
    # Header claims 10 bytes; the stream holds 50 MB of zeros. Only 11 bytes may be decompressed.
    f = tmp_path / "bomb.idx.gz"
    f.write_bytes(gzip.compress(bytes([0, 0, 8, 1, 0, 0, 0, 10]) + bytes(50_000_000), compresslevel=9))
    tracemalloc.start()
    try:
        raises_naming(f, read_idx, f)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 5_000_000


# ------------------------------------------------------------------------------ digits, ArrayDataset


def test_digits():
    s = load_dataset("digits")
    assert len(s.train) + len(s.test) == 1797 and len(s.test) == 180 and len(s.train) == 1617
    assert s.train.x.shape == (1617, 1, 8, 8) and s.train.x.dtype == torch.uint8 and s.train.scale == 16.0
    assert int(s.train.x.max()) == 16 and float(s.train.to_float().max()) == 1.0
    assert s.train.num_classes == 10 and s.train.classes == [str(i) for i in range(10)]
    again = load_dataset("digits")
    assert torch.equal(s.test.x, again.test.x) and torch.equal(s.test.y, again.test.y)
    other = load_dataset("digits", seed=1, test_fraction=0.25)
    assert len(other.test) == 449 and not torch.equal(other.test.y[:180], s.test.y)
    # The split is a partition of sklearn's 1797 images.
    full = torch.from_numpy(load_digits().images.astype(np.uint8)).unsqueeze(1)
    assert sorted(torch.cat([s.train.x, s.test.x]).flatten(1).tolist()) == sorted(full.flatten(1).tolist())


def test_array_dataset_api():
    x = torch.arange(24, dtype=torch.float32).reshape(6, 4)
    ds = ArrayDataset(x, torch.tensor([0, 1, 2, 0, 1, 2]), scale=1.0, name="t")
    assert len(ds) == 6 and ds.sample_shape == (4,) and not ds.is_image and ds.num_classes == 3
    sub = ds.subset(torch.tensor([1, 3]))
    assert sub.x.tolist() == [[4, 5, 6, 7], [12, 13, 14, 15]] and sub.y.tolist() == [1, 0]
    assert ds.labels(slice(0, 2)).tolist() == [0, 1] and torch.equal(ds.to_float(), x)
    with pytest.raises(DataError, match="binarize"):
        ds.batch(slice(None), binarize=True)
    assert ArrayDataset(x).labels(slice(None)) is None and ArrayDataset(x).num_classes is None
    with pytest.raises(DataError):
        ArrayDataset(x, torch.tensor([1, 2]))
    with pytest.raises(DataError):
        ArrayDataset(torch.zeros(3))
    a, b, mean, std = standardize(ds, ds.subset(slice(0, 2)))
    assert torch.allclose(a.x.mean(0), torch.zeros(4), atol=1e-6) and a.y is ds.y
    assert mean.tolist() == [10, 11, 12, 13] and b.x.shape == (2, 4)
    t1, t2, _, std2 = standardize(torch.ones(3, 2), torch.zeros(1, 2))  # constant columns: std 1
    assert std2.tolist() == [1, 1] and t1.tolist() == [[0, 0]] * 3 and t2.tolist() == [[-1, -1]]


def test_unknown_name(tmp_path):
    with pytest.raises(DataError) as info:
        load_dataset("imagenet")
    msg = str(info.value)
    assert "'imagenet'" in msg and all(n in msg for n in DATASETS) and ".npz" in msg and ".csv" in msg
    f = tmp_path / "data.json"
    f.write_text("{}")
    assert ".npy" in raises_naming(f, load_dataset, f)


# ------------------------------------------------------------------------------ .npy / .npz


def test_npy_images_and_tabular(tmp_path):
    f = tmp_path / "faces.npy"
    x = np.random.default_rng(0).integers(0, 256, (20, 5, 6, 3), dtype=np.uint8)  # NHWC
    np.save(f, x)
    s = load_dataset(f, test_fraction=0.25, seed=3)
    assert s.name == "faces" and len(s.train) == 15 and len(s.test) == 5 and s.train.y is None
    assert s.train.sample_shape == (3, 5, 6) and s.train.x.dtype == torch.uint8 and s.train.scale == 255
    whole = torch.cat([s.train.x, s.test.x])
    assert sorted(whole.sum((1, 2, 3)).tolist()) == sorted(x.transpose(0, 3, 1, 2).sum((1, 2, 3)).tolist())

    np.save(f, np.full((10, 4, 4), 0.5, np.float64))  # float images in [0, 1]
    s = load_dataset(f)
    assert s.train.sample_shape == (1, 4, 4) and s.train.scale == 1.0 and float(s.train.batch(0).max()) == 0.5
    np.save(f, np.ones((10, 2, 4, 4), np.float32) * 2)
    assert "divide" in raises_naming(f, load_dataset, f)
    np.save(f, np.arange(30, dtype=np.int64).reshape(10, 3) * 100)  # tabular keeps raw values
    s = load_dataset(f)
    assert s.train.x.dtype == torch.float32 and s.train.sample_shape == (3,) and float(s.train.x.max()) > 100
    np.save(f, np.asfortranarray(np.arange(40, dtype=">f8").reshape(10, 4)))
    s = load_dataset(f, test_fraction=0.5, seed=0)
    assert sorted(torch.cat([s.train.x, s.test.x]).sum(1).tolist()) == [6 + 16 * i for i in range(10)]


def test_npy_nan_and_object_and_corrupt(tmp_path):
    f = tmp_path / "bad.npy"
    x = np.zeros((10, 3), np.float32)
    x[4, 1] = np.nan
    x[7, 2] = np.inf
    np.save(f, x)
    msg = raises_naming(f, load_dataset, f)
    assert "2 NaN/Inf" in msg and "(4, 1)" in msg
    np.save(f, np.array([{"a": 1}, None], dtype=object), allow_pickle=True)
    assert "pickle" in raises_naming(f, load_dataset, f)
    np.save(f, np.zeros((10, 3), np.float32))
    f.write_bytes(f.read_bytes()[:-7])
    assert "truncated" in raises_naming(f, load_dataset, f)
    f.write_bytes(b"not an array at all")
    raises_naming(f, load_dataset, f)
    np.save(f, np.array(["a", "b"]))
    raises_naming(f, load_dataset, f)
    header = f"{{'descr': '<f8', 'fortran_order': False, 'shape': (0, {2**40}, {2**40}), }}".ljust(117) + "\n"
    f.write_bytes(b"\x93NUMPY\x01\x00" + struct.pack("<H", len(header)) + header.encode())
    assert "impossible shape" in raises_naming(f, load_dataset, f)
    np.save(f, np.zeros((3, 2, 2, 2, 2)))
    assert "shape" in raises_naming(f, load_dataset, f)


def test_npz(tmp_path):
    f = tmp_path / "d.npz"
    rng = np.random.default_rng(1)
    np.savez(f, x=rng.random((50, 7)), y=np.arange(50) % 4)
    s = load_dataset(f, test_fraction=0.2)
    assert len(s.train) == 40 and len(s.test) == 10 and s.train.num_classes == 4 and s.train.y.dtype == torch.int64
    np.savez_compressed(f, x_train=rng.integers(0, 256, (8, 6, 6), dtype=np.uint8), y_train=np.arange(8),
                        x_test=rng.integers(0, 256, (3, 6, 6), dtype=np.uint8), y_test=np.arange(3))
    s = load_dataset(f, test_fraction=0.9)  # explicit splits: test_fraction does not apply
    assert len(s.train) == 8 and len(s.test) == 3 and s.test.y.tolist() == [0, 1, 2]
    assert s.train.sample_shape == (1, 6, 6)
    np.savez(f, images=np.zeros((3, 3)))
    assert "'x'" in raises_naming(f, load_dataset, f)
    np.savez(f, x=np.zeros((3, 3)), y=np.array([0, -1, 2]))
    raises_naming(f, load_dataset, f)
    np.savez(f, x_train=np.zeros((3, 3)), x_test=np.zeros((3, 4)))
    raises_naming(f, load_dataset, f)
    np.savez(f, x=np.array([None, 1], dtype=object), allow_pickle=True)
    assert "pickle" in raises_naming(f, load_dataset, f)
    f.write_bytes(f.read_bytes()[:40])
    raises_naming(f, load_dataset, f)


# ------------------------------------------------------------------------------ image folders


def save(path: Path, arr: np.ndarray, mode=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr, mode).save(path)


def test_image_folder_with_classes(tmp_path):
    root = tmp_path / "shapes"
    for cls, n, value in (("dog", 2, 200), ("cat", 3, 50)):
        for i in range(n):
            save(root / cls / f"{i}.png", np.full((5, 7), value + i, np.uint8))
    (root / "notes.txt").write_text("ignored")  # non-image files next to class folders are ignored
    s = load_dataset(root, test_fraction=0.4, seed=0)
    assert s.train.classes == ["cat", "dog"] and s.train.sample_shape == (1, 5, 7)
    x = torch.cat([s.train.x, s.test.x])
    y = torch.cat([s.train.y, s.test.y])
    assert len(s.test) == 2 and x.dtype == torch.uint8
    got = sorted(zip(y.tolist(), x[:, 0, 0, 0].tolist()))
    assert got == [(0, 50), (0, 51), (0, 52), (1, 200), (1, 201)]


def test_image_folder_rgb_modes_and_splits(tmp_path):
    root = tmp_path / "pics"
    rgb = np.zeros((4, 4, 3), np.uint8)
    rgb[..., 0] = 255
    save(root / "train" / "a" / "0.png", rgb)
    rgba = np.zeros((4, 4, 4), np.uint8)
    rgba[..., 1] = 200
    rgba[..., 3] = 255
    rgba[0, 0, 3] = 0  # a transparent pixel is composited onto the background (white unless given)
    save(root / "train" / "b" / "1.png", rgba, "RGBA")
    save(root / "train" / "b" / "2.jpg", np.full((4, 4), 128, np.uint8))  # grayscale among colour
    save(root / "test" / "b" / "3.png", rgb)
    save(root / "test" / "loose.png", rgb)
    raises_naming(root / "test", load_dataset, root)  # loose images next to class folders
    (root / "test" / "loose.png").unlink()
    s = load_dataset(root)
    assert s.train.sample_shape == (3, 4, 4) and len(s.train) == 3 and len(s.test) == 1
    assert s.train.classes == ["a", "b"] and s.train.y.tolist() == [0, 1, 1] and s.test.y.tolist() == [1]
    assert s.train.x[0, :, 1, 1].tolist() == [255, 0, 0]
    assert s.train.x[1, :, 1, 1].tolist() == [0, 200, 0] and s.train.x[1, :, 0, 0].tolist() == [255, 255, 255]
    assert s.train.x[2, :, 1, 1].tolist() == [128, 128, 128]


def test_image_folder_unlabelled_palette(tmp_path):
    root = tmp_path / "flat"
    for i in range(4):
        img = Image.fromarray(np.full((3, 3), 10 * i, np.uint8)).convert("P")
        root.mkdir(exist_ok=True)
        img.save(root / f"{i}.png")
    s = load_dataset(root, test_fraction=0.25)
    assert s.train.y is None and s.train.sample_shape == (1, 3, 3) and len(s.test) == 1


def test_image_folder_errors(tmp_path):
    root = tmp_path / "mixed"
    save(root / "a.png", np.zeros((4, 4), np.uint8))
    save(root / "b.png", np.zeros((5, 4), np.uint8))
    msg = raises_naming(root / "a.png", load_dataset, root)
    assert str(root / "b.png") in msg and "4x4" in msg and "4x5" in msg
    (root / "b.png").write_bytes(b"\x89PNG garbage")
    assert "cannot read" in raises_naming(root / "b.png", load_dataset, root)
    empty = tmp_path / "empty"
    empty.mkdir()
    raises_naming(empty, load_dataset, empty)
    (empty / "cls").mkdir()
    raises_naming(empty / "cls", load_dataset, empty)


# ------------------------------------------------------------------------------ csv


def test_csv_with_header_and_labels(tmp_path):
    f = tmp_path / "iris.csv"
    f.write_text("a,b,Label,c\n" + "".join(f"{i},{i * 0.5},{i % 3},{-i}\n" for i in range(10)) + "\n")
    s = load_dataset(f, test_fraction=0.2, seed=0)
    assert s.train.sample_shape == (3,) and s.train.scale == 1.0 and s.train.x.dtype == torch.float32
    x = torch.cat([s.train.x, s.test.x])
    y = torch.cat([s.train.y, s.test.y])
    assert sorted(zip(x[:, 0].tolist(), y.tolist())) == [(i, i % 3) for i in range(10)]
    assert sorted(x[:, 2].tolist()) == [-i for i in range(9, -1, -1)]  # raw values, not standardized

    f.write_text("1,2\n3,4\n5,6\n")  # no header: all columns are features
    s = load_dataset(f, test_fraction=0.34)
    assert s.train.y is None and len(s.test) == 1
    f.write_text("x1,y\n1,cat\n2,dog\n3,cat\n")  # text labels become classes
    s = load_dataset(f, test_fraction=0.34)
    assert s.train.classes == ["cat", "dog"]


def test_csv_errors(tmp_path):
    f = tmp_path / "t.csv"
    f.write_text("a,b,c\n1,2,3\n4,five,6\n")
    msg = raises_naming(f, load_dataset, f)
    assert "row 3" in msg and "column 2 ('b')" in msg and "'five'" in msg
    f.write_text("1,2\n3,\n")
    assert "row 2" in raises_naming(f, load_dataset, f)
    f.write_text("1,2\nnan,4\n")
    assert "'nan'" in raises_naming(f, load_dataset, f)
    f.write_text("1,2\n3,4,5\n")
    assert "row 2 has 3 cells" in raises_naming(f, load_dataset, f)
    f.write_text("a,label\n1,0.5\n2,1\n")
    raises_naming(f, load_dataset, f)
    f.write_text("1,2\n3,1e300\n")  # finite as float64, not as float32
    assert "float32" in raises_naming(f, load_dataset, f)
    f.write_text("")
    raises_naming(f, load_dataset, f)
    f.write_bytes(b"1,2\n\xff\xfe,3\n")
    raises_naming(f, load_dataset, f)
