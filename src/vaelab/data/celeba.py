"""CelebA (Liu et al. 2015, https://mmlab.ie.cuhk.edu.hk/projects/CelebA.html), its aligned-and-cropped faces:
202,599 JPEGs of 178x218 in `img_align_celeba.zip`, the official split in `list_eval_partition.txt` and 40 binary
attributes per face in `list_attr_celeba.txt`.

The images become the usual 64x64 centre crop (the centre 148x148 square, resized with PIL's bilinear filter),
uint8 RGB (N, 3, 64, 64), unlabelled; the 40 attributes are every image's ground-truth factors (0 or 1, named as
the file names them). Train is partition 0 and test partition 2, each in the partition file's order; the
validation partition 1 is not used. The decoded pixels are kept in a uint8 .npy file per split, beside the files
(or in the user cache where that folder is read-only), named after the files' sizes and modification times so a
changed archive is decoded afresh; later loads map that file into memory rather than reading it.
"""

from __future__ import annotations

import hashlib
import os
import sys
import tempfile
import zipfile
import zlib
from pathlib import Path

import numpy as np
import torch

from vaelab.data.arrays import ArrayDataset, DataSplits
from vaelab.errors import DataError

ARCHIVE = "img_align_celeba.zip"
FOLDER = "img_align_celeba"  # the archive's one folder
PARTITION_FILE = "list_eval_partition.txt"
ATTRIBUTE_FILE = "list_attr_celeba.txt"
FILENAMES = (ARCHIVE, PARTITION_FILE, ATTRIBUTE_FILE)
N_ATTRIBUTES = 40
IMAGE_SIZE = (178, 218)  # (width, height) of an aligned-and-cropped image
CROP_BOX = (15, 35, 163, 183)  # (left, top, right, bottom): the centre 148x148 square
SIDE = 64
SPLITS = {"train": 0, "test": 2}  # split -> partition number; partition 1 (validation) is not used


def load_celeba(files: dict[str, Path], cache_folder: Path, *, name: str = "celeba",
                progress: bool = True) -> DataSplits:
    """CelebA's train (partition 0) and test (partition 2) splits from its three files (`files`: file name ->
    path). The pixels are decoded once into .npy files beside the archive, or in `cache_folder` where the
    archive's folder is read-only."""
    archive, partition_path, attribute_path = (Path(files[f]) for f in FILENAMES)
    partition = read_partition(partition_path)
    names, attributes = read_attributes(attribute_path)
    missing = [f for f in partition if f not in attributes]
    extra = [f for f in attributes if f not in partition]
    if missing or extra:
        def more(names: list[str]) -> str:
            return f"{names[0]}{f' (and {len(names) - 1} more)' if len(names) > 1 else ''}"

        which = (f"{more(missing)} has no row in {attribute_path}" if missing else
                 f"{attribute_path} has a row for {more(extra)}, which {partition_path} does not list")
        raise DataError(f"{attribute_path}: its rows do not match the file names of {partition_path}: {which}; "
                        "the two files are from different sets. Delete them and download them again")
    key = _cache_key(archive, partition_path)
    members = {split: [f for f, p in partition.items() if p == number] for split, number in SPLITS.items()}
    for split, number in SPLITS.items():
        if not members[split]:
            raise DataError(f"{partition_path}: lists no image of partition {number} ({split}); expected CelebA's "
                            "partition file, with partitions 0 (train), 1 (validation) and 2 (test)")
    pixels = _cached_pixels(archive, list(partition), members, key, cache_folder, progress)
    parts = []
    for split in SPLITS:
        factors = (np.stack([attributes[f] for f in members[split]]) + 1) // 2  # -1/1 -> 0/1
        parts.append(ArrayDataset(pixels[split], None, 255.0, None, name, factors=factors.astype(np.float64),
                                  factor_names=names))
    return DataSplits(name, *parts)


def read_partition(path: Path) -> dict[str, int]:
    """file name -> partition (0 train, 1 validation, 2 test), in the file's order."""
    partition: dict[str, int] = {}
    for number, line in enumerate(_lines(path), 1):
        fields = line.split()
        if not fields:
            continue
        if len(fields) != 2 or fields[1] not in ("0", "1", "2") or not fields[0].lower().endswith(".jpg"):
            raise DataError(f"{path}, line {number}: {line.strip()!r} is malformed; expected an image file name and "
                            "its partition 0, 1 or 2 (e.g. '000001.jpg 0'). Delete the file and download it again")
        if fields[0] in partition:
            raise DataError(f"{path}, line {number}: {fields[0]} is listed a second time; expected each image "
                            "once. Delete the file and download it again")
        partition[fields[0]] = int(fields[1])
    if not partition:
        raise DataError(f"{path}: lists no image; expected lines such as '000001.jpg 0'. Delete the file and "
                        "download it again")
    return partition


def read_attributes(path: Path) -> tuple[list[str], dict[str, np.ndarray]]:
    """The 40 attribute names, and file name -> its 40 values (int8, -1 or 1)."""
    lines = _lines(path)

    def bad(number: int, expected: str) -> DataError:
        text = lines[number - 1].strip() if number <= len(lines) else "(end of file)"
        if len(text) > 80:
            text = text[:77] + "..."
        return DataError(f"{path}, line {number}: {text!r} is malformed; expected {expected}. Delete the file and "
                         "download it again")

    if not lines or not lines[0].strip().isdigit():
        raise bad(1, "the number of images")
    if len(lines) < 2 or len(lines[1].split()) != N_ATTRIBUTES:
        raise bad(2, f"the {N_ATTRIBUTES} attribute names separated by spaces")
    names = lines[1].split()
    rows: dict[str, np.ndarray] = {}
    for number, line in enumerate(lines[2:], 3):
        fields = line.split()
        if not fields:
            continue
        values = fields[1:]
        if len(values) != N_ATTRIBUTES or not all(v in ("-1", "1") for v in values):
            raise bad(number, f"an image file name and {N_ATTRIBUTES} values, each -1 or 1")
        if fields[0] in rows:
            raise bad(number, "each image once (this one has a row already)")
        rows[fields[0]] = np.array(values, dtype=np.int8)
    if len(rows) != int(lines[0]):
        raise DataError(f"{path}: line 1 says {int(lines[0])} images but the file has {len(rows)} rows; the file "
                        "is truncated or corrupt. Delete it and download it again")
    return names, rows


def _lines(path: Path) -> list[str]:
    try:
        return path.read_text(encoding="ascii").splitlines()
    except (OSError, UnicodeDecodeError) as e:
        raise DataError(f"{path}: cannot be read as a text file ({type(e).__name__}: {e}); expected CelebA's "
                        f"{path.name}. Delete it and download it again") from e


def _cache_key(archive: Path, partition_path: Path) -> str:
    """Changes whenever the archive or the partition file does (their sizes and modification times), or the crop."""
    stats = [(p.stat().st_size, p.stat().st_mtime_ns) for p in (archive, partition_path)]
    return hashlib.sha256(repr((stats, CROP_BOX, SIDE)).encode()).hexdigest()[:16]


def cache_name(split: str, key: str) -> str:
    return f"{FOLDER}.{split}.{SIDE}x{SIDE}.{key}.npy"


def _cached_pixels(archive: Path, listed: list[str], members: dict[str, list[str]], key: str, cache_folder: Path,
                   progress: bool) -> dict[str, torch.Tensor]:
    """split -> its pixels (N, 3, 64, 64) uint8, memory-mapped from its cache file (decoded first if need be).
    `listed`: every image of the partition file, all of which the archive must hold."""
    shapes = {split: (len(names), 3, SIDE, SIDE) for split, names in members.items()}
    pixels = {}
    for split in members:
        for folder in (archive.parent, Path(cache_folder)):
            mapped = _open_cache(folder / cache_name(split, key), shapes[split])
            if mapped is not None:
                pixels[split] = mapped
                break
    if len(pixels) == len(members):
        return pixels
    folder = archive.parent if os.access(archive.parent, os.W_OK) else Path(cache_folder)
    with _open_zip(archive) as zf:
        names = set(zf.namelist())
        absent = [f for f in listed if f"{FOLDER}/{f}" not in names]
        if absent:
            raise DataError(f"{archive}: has no member {FOLDER}/{absent[0]}"
                            f"{f' (nor {len(absent) - 1} more)' if len(absent) > 1 else ''}, which "
                            f"{PARTITION_FILE} lists; expected CelebA's {ARCHIVE} with every image of the "
                            "partition file. Delete it and download it again")
        for split in members:
            if split in pixels:
                continue
            path = folder / cache_name(split, key)
            _decode(zf, archive, members[split], split, path, progress)
            for old in folder.glob(cache_name(split, "*")):  # the caches of earlier archives
                if old != path:
                    old.unlink(missing_ok=True)
            pixels[split] = _open_cache(path, shapes[split])
            if pixels[split] is None:
                raise DataError(f"{path}: the pixels just written cannot be read back as a {shapes[split]} uint8 "
                                "array; check the disk, delete the file and try again")
    return pixels


def _open_cache(path: Path, shape: tuple[int, ...]) -> torch.Tensor | None:
    """The cache file memory-mapped (copy-on-write: writes stay in this process), or None if absent or unfit."""
    if not path.is_file():
        return None
    try:
        x = np.load(path, mmap_mode="c")
    except (OSError, ValueError):
        return None
    if x.shape != shape or x.dtype != np.uint8:
        return None
    return torch.from_numpy(x)


def _decode(zf: zipfile.ZipFile, archive: Path, members: list[str], split: str, path: Path,
            progress: bool) -> None:
    """Decode `members` of the archive into the .npy file `path`, written whole or not at all."""
    from tqdm import tqdm

    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
    except OSError as e:
        raise DataError(f"{path}: cannot write the decoded CelebA pixels ({e.strerror or e}); set XDG_CACHE_HOME to "
                        "a writable folder or make the archive's folder writable") from None
    done = False
    try:
        # filled in place, so the 2 GB training split never has to fit in memory
        out = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.uint8, shape=(len(members), 3, SIDE, SIDE))
        show = progress and sys.stderr.isatty()
        with tqdm(members, desc=f"celeba: decoding {split}", unit="img", disable=not show, leave=False) as bar:
            for i, member in enumerate(bar):
                out[i] = _crop(zf, archive, f"{FOLDER}/{member}")
        out.flush()
        del out
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o644)  # mkstemp creates 0600
        os.replace(tmp, path)
        done = True
    except OSError as e:
        raise DataError(f"{path}: cannot write the decoded CelebA pixels ({e.strerror or e}; the {split} split takes "
                        f"{len(members) * 3 * SIDE * SIDE / 1e9:.2f} GB); free disk space or set XDG_CACHE_HOME to "
                        "another folder") from None
    finally:
        if not done:
            Path(tmp).unlink(missing_ok=True)


def _open_zip(archive: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(archive)
    except (zipfile.BadZipFile, OSError, EOFError) as e:
        raise DataError(f"{archive}: not a readable zip archive ({type(e).__name__}: {e}); expected CelebA's "
                        f"{ARCHIVE}. Delete it and download it again") from e


def _crop(zf: zipfile.ZipFile, archive: Path, member: str) -> np.ndarray:
    """One image's 64x64 centre crop, (3, 64, 64) uint8."""
    from PIL import Image

    try:
        with zf.open(member) as f, Image.open(f, formats=["JPEG"]) as img:
            if img.size != IMAGE_SIZE:
                raise DataError(f"{archive}: member {member} is {img.size[0]}x{img.size[1]} pixels; expected "
                                f"{IMAGE_SIZE[0]}x{IMAGE_SIZE[1]}, CelebA's aligned-and-cropped images "
                                f"({ARCHIVE}), not the in-the-wild originals")
            small = img.convert("RGB").crop(CROP_BOX).resize((SIDE, SIDE), Image.Resampling.BILINEAR)
            return np.asarray(small).transpose(2, 0, 1)  # (H, W, C) -> (C, H, W)
    except (OSError, SyntaxError, ValueError, EOFError, zipfile.BadZipFile, zlib.error,
            Image.DecompressionBombError) as e:
        raise DataError(f"{archive}: member {member} is not a readable JPEG ({type(e).__name__}: {e}); the archive "
                        "is corrupt. Delete it and download it again") from e
