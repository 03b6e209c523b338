"""Downloading CIFAR-10 (binary version) and SVHN (.mat) for real, from an HTTP server on 127.0.0.1 serving files
in the real formats, written here. The canonical MD5s are those of the authors' files; the tests put the MD5 of
the files they wrote in their place (and check that a file not matching is refused)."""

from __future__ import annotations

import functools
import hashlib
import http.server
import io
import tarfile
import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from scipy.io import savemat

from offline import Quiet, closed_port, isolate
from vaelab.data import cache_dir, load_dataset, sources
from vaelab.errors import DataError

CIFAR_COUNTS = {"train": (3, 2, 4, 1, 2), "test": 3}  # records per training batch file, and in the test file



@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """The cache lives in tmp_path; no user data, no internet."""
    isolate(tmp_path, monkeypatch)


@pytest.fixture
def serve():
    """serve(folder) -> base URL of a real HTTP server on 127.0.0.1 serving `folder`."""
    servers = []

    def start(folder):
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Quiet, directory=str(folder)))
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def write_cifar(path: Path, truncate: bool = False) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """A cifar-10-binary.tar.gz as the authors ship it: cifar-10-batches-bin/ with data_batch_1..5.bin and
    test_batch.bin of 3,073-byte records (label, then the R, G, B planes of 32x32), and batches.meta.txt.
    Returns the pixels (N, 3, 32, 32) and labels of each split."""
    rng = np.random.default_rng(0)
    files, splits = {}, {"train": ([], []), "test": ([], [])}
    for split, counts in (("train", CIFAR_COUNTS["train"]), ("test", (CIFAR_COUNTS["test"],))):
        for i, n in enumerate(counts):
            x = rng.integers(0, 256, (n, 3, 32, 32), dtype=np.uint8)
            y = rng.integers(0, 10, n, dtype=np.uint8)
            records = np.concatenate([y[:, None], x.reshape(n, -1)], axis=1).tobytes()
            files[f"data_batch_{i + 1}.bin" if split == "train" else "test_batch.bin"] = records
            splits[split][0].append(x)
            splits[split][1].append(y)
    if truncate:
        files["data_batch_3.bin"] = files["data_batch_3.bin"][:-5]
    files["batches.meta.txt"] = "\n".join(sources.CLASSES["cifar10"]).encode() + b"\n\n"
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, "w:gz") as tar:
        for name, data in files.items():
            info = tarfile.TarInfo(f"cifar-10-batches-bin/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return {k: (np.concatenate(v[0]), np.concatenate(v[1]).astype(np.int64)) for k, v in splits.items()}


def test_cifar10_downloads_checks_and_reads_the_binary_records(serve, tmp_path, monkeypatch):
    archive = tmp_path / "site" / "cifar10" / "cifar-10-binary.tar.gz"
    want = write_cifar(archive)
    monkeypatch.setitem(sources.MD5["cifar10"], "cifar-10-binary.tar.gz", md5(archive))
    monkeypatch.setenv("VAELAB_MIRROR", f"{serve(tmp_path / 'site')}/no-such-folder, {serve(tmp_path / 'site')}")
    s = load_dataset("cifar10", progress=False)
    assert (len(s.train), len(s.test), s.train.sample_shape) == (12, 3, (3, 32, 32))
    assert s.train.classes == ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship",
                               "truck"]
    for split, ds in (("train", s.train), ("test", s.test)):
        x, y = want[split]
        assert ds.x.dtype == torch.uint8 and torch.equal(ds.x, torch.from_numpy(x))
        assert ds.y.tolist() == y.tolist()
    assert sorted(p.name for p in (cache_dir() / "cifar10").iterdir()) == ["cifar-10-binary.tar.gz"]
    monkeypatch.setenv("VAELAB_MIRROR", f"http://127.0.0.1:{closed_port()}")  # the cache alone now
    assert torch.equal(load_dataset("cifar10", download=False).test.x, s.test.x)


def test_cifar10_with_the_wrong_checksum_or_broken_records_is_refused(serve, tmp_path, monkeypatch):
    archive = tmp_path / "site" / "cifar10" / "cifar-10-binary.tar.gz"
    write_cifar(archive)
    url = serve(tmp_path / "site")
    monkeypatch.setenv("VAELAB_MIRROR", url)
    with pytest.raises(DataError) as e:  # the authors' MD5, which a file written here cannot have
        load_dataset("cifar10", progress=False)
    assert (f"{url}/cifar10/cifar-10-binary.tar.gz: MD5 mismatch: got {md5(archive)}, expected "
            "c32a1d4ab5d03f1284b67883e8d87530") in str(e.value)
    assert not (cache_dir() / "cifar10").exists()  # nothing kept, not even a temporary file

    write_cifar(archive, truncate=True)
    monkeypatch.setitem(sources.MD5["cifar10"], "cifar-10-binary.tar.gz", md5(archive))
    with pytest.raises(DataError) as e:
        load_dataset("cifar10", progress=False)
    assert str(e.value) == (
        f"{cache_dir() / 'cifar10' / 'cifar-10-binary.tar.gz'}: the train batches hold 36871 bytes, not a whole "
        "number of 3073-byte records (a label byte and 32x32x3 pixels); the archive is not CIFAR-10's binary "
        "version or is corrupt. Delete it and download it again")


def test_svhn_downloads_and_reads_the_matlab_files(serve, tmp_path, monkeypatch):
    site = tmp_path / "site" / "svhn"
    site.mkdir(parents=True)
    rng = np.random.default_rng(1)
    want = {}
    for fname, n in (("train_32x32.mat", 5), ("test_32x32.mat", 2)):
        x = rng.integers(0, 256, (32, 32, 3, n), dtype=np.uint8)  # SVHN's layout: (H, W, C, N)
        y = np.array([[10], [1], [9], [10], [4]][:n], dtype=np.uint8)  # 10 is the digit 0
        savemat(site / fname, {"X": x, "y": y})
        monkeypatch.setitem(sources.MD5["svhn"], fname, md5(site / fname))
        want[fname] = (x, y)
    monkeypatch.setenv("VAELAB_MIRROR", serve(tmp_path / "site"))
    s = load_dataset("svhn", progress=False)
    x, y = want["train_32x32.mat"]
    assert s.train.sample_shape == (3, 32, 32) and (len(s.train), len(s.test)) == (5, 2)
    assert int(s.train.x[3, 2, 7, 11]) == int(x[7, 11, 2, 3])  # (N, C, H, W) from (H, W, C, N)
    assert torch.equal(s.train.x, torch.from_numpy(x).permute(3, 2, 0, 1))
    assert s.train.y.tolist() == [0, 1, 9, 0, 4] and s.test.y.tolist() == [0, 1]
    assert sorted(p.name for p in (cache_dir() / "svhn").iterdir()) == ["test_32x32.mat", "train_32x32.mat"]
