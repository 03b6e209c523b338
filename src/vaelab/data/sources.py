"""Datasets downloaded from their authors' sites: MNIST and Fashion-MNIST (four IDX files), CIFAR-10 (the binary
version: fixed-length records, never the pickled one), SVHN (MATLAB .mat files, read by scipy) and CelebA (a zip
of JPEGs and two text files, read by vaelab.data.celeba). Finding the files on disk, or downloading them into the
cache.

Lookup order (the first folder holding all the dataset's files wins): the `data_dir` argument, $VAELAB_DATA,
the user cache, system folders (Debian's package for Fashion-MNIST), then a download. Downloads are
verified against the canonical MD5s and only renamed into place once every file has arrived intact,
so the cache never holds a partial or corrupt set.
"""

from __future__ import annotations

import hashlib
import http.client
import os
import sys
import tempfile
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import torch

from vaelab.data import celeba
from vaelab.data.arrays import ArrayDataset, DataSplits
from vaelab.data.idx import read_idx
from vaelab.errors import DataError

IDX_DATASETS = ("mnist", "fashion-mnist")
DOWNLOADED = IDX_DATASETS + ("cifar10", "svhn", "celeba")  # every dataset this module finds or downloads
CIFAR_ARCHIVE = "cifar-10-binary.tar.gz"
CIFAR_FOLDER = "cifar-10-batches-bin"  # the archive's one folder
CIFAR_RECORD = 1 + 3 * 32 * 32  # a label byte, then the red, green and blue planes of 32x32 (row-major)
SVHN_FILES = {"train": "train_32x32.mat", "test": "test_32x32.mat"}

# split -> (images file, labels file)
FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FILENAMES = tuple(f for pair in FILES.values() for f in pair)

MD5 = {
    "mnist": {
        "train-images-idx3-ubyte.gz": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
        "train-labels-idx1-ubyte.gz": "d53e105ee54ea40749a09fcbcd1e9432",
        "t10k-images-idx3-ubyte.gz": "9fb629c4189551a2d022fa330f9573f3",
        "t10k-labels-idx1-ubyte.gz": "ec29112dd5afa0611ce80d1b7f02629c",
    },
    "fashion-mnist": {
        "train-images-idx3-ubyte.gz": "8d4fb7e6c68d591d4c3dfef9ec88bf0d",
        "train-labels-idx1-ubyte.gz": "25c81989df183df01b3e8a0aad5dffbe",
        "t10k-images-idx3-ubyte.gz": "bef4ecab320f06d8554ea6380940ec79",
        "t10k-labels-idx1-ubyte.gz": "bb300cfdad3c16e7a12a480ee83cd310",
    },
    "cifar10": {CIFAR_ARCHIVE: "c32a1d4ab5d03f1284b67883e8d87530"},
    "svhn": {"train_32x32.mat": "e26dedcc434d2e4c54c9b2d4a06d8373",
             "test_32x32.mat": "eb5a983be6a315427106f1b164d9cef3"},
    "celeba": {celeba.ARCHIVE: "00d2c5bc6d35e252742224ab0c1e8fcb",
               celeba.PARTITION_FILE: "d32c9cbf5e040fd4025c592c306e6668",
               celeba.ATTRIBUTE_FILE: "75e246fa4810816ffd6ee81facbd244c"},
}

# Folder URLs; a file's URL is the folder URL + file name.
MIRRORS = {
    "mnist": ["https://ossci-datasets.s3.amazonaws.com/mnist/", "http://yann.lecun.com/exdb/mnist/"],
    "fashion-mnist": ["http://fashion-mnist.s3-website.eu-central-1.amazonaws.com/"],
    "cifar10": ["https://www.cs.toronto.edu/~kriz/"],
    "svhn": ["http://ufldl.stanford.edu/housenumbers/"],
    # The authors share CelebA on Google Drive, which cannot be fetched as a plain folder; this mirror serves the
    # three files by name.
    "celeba": ["https://graal.ift.ulaval.ca/public/celeba/"],
}

# Read-only copies installed by the OS (Debian's dataset-fashion-mnist). Module-level so tests can
# monkeypatch it. Their gzip headers differ from the canonical files, so they are not MD5-checked.
SYSTEM_DIRS = {"fashion-mnist": [Path("/usr/share/datasets/fashion-mnist")]}

CLASSES = {
    "mnist": [str(i) for i in range(10)],
    "fashion-mnist": ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
                      "Sneaker", "Bag", "Ankle boot"],
    "cifar10": ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"],
    "svhn": [str(i) for i in range(10)],
}

DOWNLOAD_TIMEOUT = 30.0  # seconds per connect/read; a dead mirror must not hang the program
_CHUNK = 1 << 16


def cache_dir() -> Path:
    """$XDG_CACHE_HOME/vaelab, or ~/.cache/vaelab."""
    base = os.environ.get("XDG_CACHE_HOME")
    return (Path(base) if base else Path.home() / ".cache") / "vaelab"


def default_data_dirs(name, data_dir=None) -> list[Path]:
    """The folders searched for `name`'s files, in order (for messages and tests)."""
    name = str(name).strip().lower().replace("_", "-")
    if name not in DOWNLOADED:
        return []
    others = set(DOWNLOADED) - {name}
    dirs = []
    for base in (data_dir, os.environ.get("VAELAB_DATA") or None):
        if base is not None:
            base = Path(base).expanduser()
            # Either a folder with one sub-folder per dataset, or the dataset's folder itself. Both
            # datasets use the same file names, so .../mnist/ is never taken as fashion-mnist's folder.
            dirs += [base / name] + ([base] if base.name.lower() not in others else [])
    dirs.append(cache_dir() / name)
    dirs += [Path(d) for d in SYSTEM_DIRS.get(name, [])]
    return dirs


def _find_files(folder: Path, name: str = "mnist") -> tuple[dict[str, Path], list[str]]:
    """The dataset's files in `folder` (an IDX file as .gz or uncompressed), and the names of missing ones."""
    found, missing = {}, []
    for fname in MD5[name]:
        for candidate in (folder / fname, folder / fname[:-3]) if name in IDX_DATASETS else (folder / fname,):
            if candidate.is_file():
                found[fname] = candidate
                break
        else:
            missing.append(fname)
    return found, missing


def _mirror_urls(name: str) -> list[str]:
    env = os.environ.get("VAELAB_MIRROR", "")
    bases = [b.strip().rstrip("/") for b in env.split(",") if b.strip()]
    if bases:
        return [f"{b}/{name}/" for b in bases]
    return list(MIRRORS[name])


def load_idx_dataset(name: str, data_dir=None, *, download: bool = True, progress: bool = True) -> DataSplits:
    """Find (or download) and load mnist, fashion-mnist, cifar10, svhn or celeba."""
    looked = []
    filenames = list(MD5[name])
    for folder in default_data_dirs(name, data_dir):
        found, missing = _find_files(folder, name)
        if not missing:
            return READERS.get(name, _load_folder)(name, found, progress)
        if not folder.is_dir():
            looked.append(f"{folder} (no such folder)")
        elif found:
            looked.append(f"{folder} (missing {', '.join(missing)})")
        else:
            looked.append(f"{folder} (none of the files)")

    target = cache_dir() / name
    how = (f"To fix: download {'the four files ' if len(filenames) == 4 else ''}{', '.join(filenames)} (e.g. from "
           f"{MIRRORS[name][0]}) into "
           f"{target}/, or put them in FOLDER/{name}/ and pass --data-dir FOLDER (data_dir=FOLDER) or set "
           f"VAELAB_DATA=FOLDER; or set VAELAB_MIRROR to a reachable mirror.")
    places = "\n".join(f"  - {p}" for p in looked)
    if not download:
        raise DataError(f"{name}: the dataset files were not found and downloading is turned off. "
                        f"Looked in:\n{places}\n{how}")
    failures = _download(name, target, progress)
    if failures:
        try:
            target.rmdir()  # only if empty: do not leave a folder that looks like a (broken) cache
        except OSError:
            pass
        tried = "\n".join(f"  - {url}: {why}" for url, why in failures)
        raise DataError(f"{name}: the dataset files were not found locally and the download failed.\n"
                        f"Looked in:\n{places}\nTried to download:\n{tried}\n{how}")
    found, _ = _find_files(target, name)
    return READERS.get(name, _load_folder)(name, found, progress)


def _download(name: str, target: Path, progress: bool) -> list[tuple[str, str]]:
    """Download the files missing from `target`; return [(url, reason)] if some file could not be got.

    All-or-nothing: verified files wait as temporary files and are renamed into place together, so an
    interrupted download leaves no partial set behind.
    """
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        return [(str(target), f"cannot create the cache folder ({e}); set XDG_CACHE_HOME to a writable "
                              "folder or pass data_dir")]
    _, missing = _find_files(target, name)
    done: dict[str, str] = {}  # final name -> verified temp file
    try:
        for fname in missing:
            failures = []
            for base in _mirror_urls(name):
                url = base + fname
                try:
                    done[fname] = _fetch(url, target, MD5[name][fname], progress)
                    break
                except _DownloadFailed as e:
                    failures.append((url, str(e)))
            else:
                return failures
        for fname, tmp in done.items():
            os.replace(tmp, target / fname)
        done.clear()
        return []
    finally:
        for tmp in done.values():
            _remove(tmp)


class _DownloadFailed(Exception):
    pass


def _fetch(url: str, folder: Path, md5: str, progress: bool) -> str:
    """Stream `url` into a temp file in `folder`, check its length and MD5; return the temp path."""
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".download-", suffix=".part")
    ok = False
    try:
        with os.fdopen(fd, "wb") as out:
            digest, got, expected_len = _stream(url, out, progress)
        if expected_len is not None and got != expected_len:
            raise _DownloadFailed(f"short read: got {got} of {expected_len} bytes")
        if digest != md5:
            raise _DownloadFailed(f"MD5 mismatch: got {digest}, expected {md5} (corrupt or wrong file)")
        ok = True
        return tmp
    except (OSError, ValueError, http.client.HTTPException) as e:
        # OSError covers HTTPError/URLError, refused or reset connections and timeouts; HTTPException
        # covers a connection that broke off mid-file (IncompleteRead); ValueError a malformed URL.
        raise _DownloadFailed(_describe(e)) from e
    finally:
        if not ok:
            _remove(tmp)


def _stream(url, out, progress):
    from tqdm import tqdm

    req = urllib.request.Request(url, headers={"User-Agent": "vaelab"})
    with urllib.request.urlopen(req, timeout=DOWNLOAD_TIMEOUT) as resp:
        length = resp.headers.get("Content-Length")
        expected = int(length) if length and length.isdigit() else None
        md5 = hashlib.md5()
        got = 0
        show = progress and sys.stderr.isatty()
        with tqdm(total=expected, unit="B", unit_scale=True, desc=url.rsplit("/", 1)[-1],
                  disable=not show, leave=False) as bar:
            while True:
                chunk = resp.read(_CHUNK)
                if not chunk:
                    break
                out.write(chunk)
                md5.update(chunk)
                got += len(chunk)
                bar.update(len(chunk))
    return md5.hexdigest(), got, expected


def _describe(e: Exception) -> str:
    if isinstance(e, urllib.error.HTTPError):
        return f"HTTP {e.code} {e.reason}"
    if isinstance(e, urllib.error.URLError):
        return f"cannot connect ({e.reason})"
    if isinstance(e, http.client.IncompleteRead):
        return f"connection broke off before the end of the file ({e!r})"
    return f"{type(e).__name__}: {e}"


def _remove(path) -> None:
    try:
        os.remove(path)
    except FileNotFoundError:
        pass


def _load_folder(name: str, files: dict[str, Path], progress: bool = False) -> DataSplits:
    parts = {}
    for split, (img_name, lbl_name) in FILES.items():
        img_path, lbl_path = files[img_name], files[lbl_name]
        images = read_idx(img_path, expected_dtype=np.uint8)
        labels = read_idx(lbl_path, expected_dtype=np.uint8)
        if images.ndim != 3 or images.shape[1:] != (28, 28) or images.shape[0] == 0:
            raise DataError(f"{img_path}: images have shape {images.shape}; expected (N, 28, 28) with N > 0. "
                            f"Is this really a {name} file?")
        if labels.ndim != 1:
            raise DataError(f"{lbl_path}: labels have shape {labels.shape}; expected (N,). "
                            f"Is this really a {name} labels file?")
        if len(labels) != len(images):
            raise DataError(f"{lbl_path}: holds {len(labels)} labels but {img_path} holds {len(images)} "
                            "images; expected one label per image. One of the files is from another set")
        if labels.max() >= 10:
            raise DataError(f"{lbl_path}: contains label {int(labels.max())}; expected labels 0-9. "
                            "The file is corrupt; download it again")
        parts[split] = ArrayDataset(torch.from_numpy(images).unsqueeze(1),
                                    torch.from_numpy(labels.astype(np.int64)),
                                    scale=255.0, classes=CLASSES[name], name=name)
    return DataSplits(name, parts["train"], parts["test"])


def _load_cifar10(name: str, files: dict[str, Path], progress: bool = False) -> DataSplits:
    """CIFAR-10's binary version: five training batches and a test batch of 3,073-byte records, read from the
    archive's members (nothing is extracted, nothing unpickled)."""
    import tarfile

    archive = files[CIFAR_ARCHIVE]
    members = {"train": [f"data_batch_{i}.bin" for i in range(1, 6)], "test": ["test_batch.bin"]}
    try:
        with tarfile.open(archive, "r:gz") as tar:
            parts = {split: _cifar_records(b"".join(_member(tar, archive, m) for m in names), archive, split)
                     for split, names in members.items()}
    except (tarfile.TarError, OSError, EOFError) as e:
        raise DataError(f"{archive}: not a readable .tar.gz archive ({type(e).__name__}: {e}); expected "
                        f"CIFAR-10's binary version. Delete it and download it again") from e
    return DataSplits(name, *(ArrayDataset(x, y, 255.0, CLASSES[name], name) for x, y in
                              (parts["train"], parts["test"])))


def _member(tar, archive: Path, member: str) -> bytes:
    try:
        f = tar.extractfile(f"{CIFAR_FOLDER}/{member}")
    except KeyError:
        f = None
    if f is None:
        raise DataError(f"{archive}: has no file {CIFAR_FOLDER}/{member}; expected CIFAR-10's binary version "
                        f"({CIFAR_ARCHIVE}). Delete it and download it again")
    return f.read()


def _cifar_records(data: bytes, archive: Path, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    if not data or len(data) % CIFAR_RECORD:
        raise DataError(f"{archive}: the {split} batches hold {len(data)} bytes, not a whole number of "
                        f"{CIFAR_RECORD}-byte records (a label byte and 32x32x3 pixels); the archive is not "
                        "CIFAR-10's binary version or is corrupt. Delete it and download it again")
    records = np.frombuffer(data, dtype=np.uint8).reshape(-1, CIFAR_RECORD)
    labels = records[:, 0].astype(np.int64)
    if labels.max() >= 10:
        raise DataError(f"{archive}: a {split} record has label {int(labels.max())}; expected 0-9. The archive "
                        "is corrupt; delete it and download it again")
    x = records[:, 1:].reshape(-1, 3, 32, 32)  # (N, C, H, W): a record stores the colour planes in turn
    return torch.from_numpy(np.ascontiguousarray(x)), torch.from_numpy(labels)


def _load_svhn(name: str, files: dict[str, Path], progress: bool = False) -> DataSplits:
    """SVHN's cropped digits: MATLAB files of X (32, 32, 3, N) uint8 and y (N, 1), 10 standing for the digit 0."""
    from scipy.io import loadmat

    parts = []
    for fname in SVHN_FILES.values():
        path = files[fname]
        try:
            mat = loadmat(path, variable_names=("X", "y"))
        except (ValueError, OSError, TypeError, NotImplementedError) as e:
            raise DataError(f"{path}: not a readable MATLAB file ({type(e).__name__}: {e}); expected SVHN's "
                            f"{fname}. Delete it and download it again") from e
        x, y = mat.get("X"), mat.get("y")
        if not isinstance(x, np.ndarray) or not isinstance(y, np.ndarray) or x.ndim != 4 \
                or x.shape[:3] != (32, 32, 3) or x.dtype != np.uint8 or x.shape[3] == 0 or y.size != x.shape[3]:
            found = {k: (v.shape, str(v.dtype)) for k, v in mat.items() if isinstance(v, np.ndarray)}
            raise DataError(f"{path}: holds {found}; expected X of shape (32, 32, 3, N) uint8 and y of N labels "
                            f"(SVHN's {fname})")
        y = y.reshape(-1).astype(np.int64)
        if y.min() < 1 or y.max() > 10:
            raise DataError(f"{path}: holds labels {int(y.min())}..{int(y.max())}; expected 1-10 (10 for the digit "
                            "0). The file is corrupt; delete it and download it again")
        x = np.ascontiguousarray(x.transpose(3, 2, 0, 1))  # (32, 32, 3, N) -> (N, C, H, W)
        parts.append(ArrayDataset(torch.from_numpy(x), torch.from_numpy(y % 10), 255.0, CLASSES[name], name))
    return DataSplits(name, *parts)


def _load_celeba(name: str, files: dict[str, Path], progress: bool = True) -> DataSplits:
    """CelebA's 64x64 crops and 40 attributes; the decoded pixels are cached beside the files, or in the cache."""
    return celeba.load_celeba(files, cache_dir() / name, name=name, progress=progress)


# name -> reader(name, files, progress): the splits from the dataset's files (file name -> path). Only a reader that
# takes long (CelebA decodes 202,599 JPEGs once) shows progress. The others are IDX files (_load_folder).
READERS = {"cifar10": _load_cifar10, "svhn": _load_svhn, "celeba": _load_celeba}
