"""Downloading MNIST for real, from an HTTP server on 127.0.0.1 serving the canonical files."""

from __future__ import annotations

import functools
import hashlib
import http.server
import os
import shutil
import threading
from pathlib import Path

import numpy as np
import pytest

from offline import Quiet, closed_port, isolate
from vaelab.data import cache_dir, default_data_dirs, load_dataset
from vaelab.data import sources
from vaelab.errors import DataError

REPO = Path(__file__).resolve().parents[1]
MNIST_TRAIN_COUNTS = [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]


def shared_data() -> Path:
    root = Path(os.environ.get("VAELAB_TEST_DATA") or REPO.parent / "shared" / "data")
    for f in sources.FILENAMES:
        if not (root / "mnist" / f).is_file():
            pytest.skip(f"real dataset file {root / 'mnist' / f} is absent (set VAELAB_TEST_DATA)")
    return root



@pytest.fixture(autouse=True)
def isolated(tmp_path, monkeypatch):
    """The cache lives in tmp_path; no user data, no system folders, no internet."""
    isolate(tmp_path, monkeypatch)


class DropsMidFile(Quiet):
    """Announces the full Content-Length, sends half of the file, then hangs up."""

    def do_GET(self):
        path = Path(self.translate_path(self.path))
        if not path.is_file():
            self.send_error(404)
            return
        data = path.read_bytes()
        self.send_response(200)
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data[: len(data) // 2])
        self.wfile.flush()
        self.close_connection = True


@pytest.fixture
def serve():
    """serve(folder, handler=Quiet) -> base URL of a real HTTP server on 127.0.0.1."""
    servers = []

    def start(folder, handler=Quiet):
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0),
                                                 functools.partial(handler, directory=str(folder)))
        threading.Thread(target=server.serve_forever, daemon=True).start()
        servers.append(server)
        return f"http://127.0.0.1:{server.server_address[1]}"

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


def md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def cache_listing() -> list[str]:
    folder = cache_dir() / "mnist"
    return sorted(p.name for p in folder.iterdir()) if folder.exists() else []


def test_download_then_cache(serve, monkeypatch):
    url = serve(shared_data())  # serves <root>/mnist/<file>
    monkeypatch.setenv("VAELAB_MIRROR", url)
    s = load_dataset("mnist", progress=False)
    assert s.train.x.shape == (60000, 1, 28, 28)
    assert np.bincount(s.train.y.numpy()).tolist() == MNIST_TRAIN_COUNTS
    assert cache_listing() == sorted(sources.FILENAMES)  # no temp files left behind
    for f in sources.FILENAMES:
        assert md5(cache_dir() / "mnist" / f) == sources.MD5["mnist"][f]
    # Second load: the server is unreachable now, the cache alone must do.
    monkeypatch.setenv("VAELAB_MIRROR", f"http://127.0.0.1:{closed_port()}")
    again = load_dataset("mnist", progress=False, download=False)
    assert (again.test.x == s.test.x).all()


def test_first_mirror_404_second_mirror_good(serve, monkeypatch):
    url = serve(shared_data())
    monkeypatch.setenv("VAELAB_MIRROR", f"{url}/no-such-folder, {url}")
    assert len(load_dataset("mnist", progress=False).test) == 10000
    assert cache_listing() == sorted(sources.FILENAMES)


def test_md5_mismatch_leaves_nothing(serve, monkeypatch, tmp_path):
    site = tmp_path / "site" / "mnist"
    shutil.copytree(shared_data() / "mnist", site)
    bad = site / "t10k-labels-idx1-ubyte.gz"  # the last file fetched: three good ones come first
    data = bytearray(bad.read_bytes())
    data[100] ^= 0xFF
    bad.write_bytes(bytes(data))
    url = serve(tmp_path / "site")
    monkeypatch.setenv("VAELAB_MIRROR", url)
    with pytest.raises(DataError) as info:
        load_dataset("mnist", progress=False)
    msg = str(info.value)
    assert f"{url}/mnist/t10k-labels-idx1-ubyte.gz: MD5 mismatch" in msg
    assert sources.MD5["mnist"]["t10k-labels-idx1-ubyte.gz"] in msg
    assert cache_listing() == []  # all-or-nothing: not even the three good files, nor temp files


def test_connection_dropped_mid_file(serve, monkeypatch):
    url = serve(shared_data(), DropsMidFile)
    monkeypatch.setenv("VAELAB_MIRROR", url)
    with pytest.raises(DataError) as info:
        load_dataset("mnist", progress=False)
    msg = str(info.value)
    assert f"{url}/mnist/train-images-idx3-ubyte.gz" in msg
    assert "short read" in msg or "broke off" in msg
    assert cache_listing() == []


def test_offline_lists_every_place(tmp_path, monkeypatch):
    monkeypatch.setenv("VAELAB_DATA", str(tmp_path / "env"))
    monkeypatch.setattr(sources, "SYSTEM_DIRS", {"fashion-mnist": [tmp_path / "debian"]})
    mirror = f"http://127.0.0.1:{closed_port()}"
    monkeypatch.setenv("VAELAB_MIRROR", mirror)
    with pytest.raises(DataError) as info:
        load_dataset("fashion-mnist", tmp_path / "given", progress=False)
    msg = str(info.value)
    places = default_data_dirs("fashion-mnist", tmp_path / "given")
    assert len(places) == 6
    for place in places:
        assert f"  - {place} (" in msg
    assert f"{mirror}/fashion-mnist/train-images-idx3-ubyte.gz: cannot connect" in msg
    assert str(cache_dir() / "fashion-mnist") in msg and "VAELAB_DATA" in msg and "--data-dir" in msg
    assert not (cache_dir() / "fashion-mnist").exists()
