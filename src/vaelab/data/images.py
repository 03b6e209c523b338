"""Image files to uint8 pixels, and image folders read lazily.

One decoder (`ImageFiles.read`) serves both ways of holding a folder, so that they give the same pixels bit for
bit: decoded into memory up front (an ArrayDataset), or decoded on the fly one batch at a time (`LazyImageDataset`,
optionally with DataLoader worker processes and an on-disk uint8 cache that later epochs read).

Per file: PNG or JPEG only (by content); transparent pixels composited on `background` (white unless given);
with `image_size` N the centre square of the image (its short side) resized to N x N (bicubic, antialiased),
which is "resize the short side to N, then centre-crop"; grey files in a folder that holds any colour file are
repeated to RGB (lossless), so a folder is 1 channel (all grey) or 3 (any colour).
"""

from __future__ import annotations

import hashlib
import math
import os
import warnings
from collections.abc import Iterator, Sequence
from pathlib import Path

import numpy as np
import torch

from vaelab.data.arrays import ArrayDataset
from vaelab.errors import DataError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")
# Pillow decoders an image folder may use: by content, not by name, so an EPS file named .png never reaches
# the EPS plugin (which runs Ghostscript) nor a TIFF one libtiff
IMAGE_FORMATS = ("PNG", "JPEG")
# Pixels an image's header may claim (4096x4096): checked after the header is parsed and before the pixels are
# allocated, so a decompression bomb (a small file claiming a gigantic size) costs nothing. Pillow's own limit
# (89 million pixels, an error only past twice that) is far above any image an autoencoder trains on.
MAX_IMAGE_PIXELS = 2**24
BACKGROUNDS = {"white": (255, 255, 255), "black": (0, 0, 0)}
# Folders whose decoded pixels would take more than this are read lazily unless lazy= says otherwise
LAZY_BYTES = 2**30
GREY_MODES = ("1", "L", "I;16", "I;16B", "I;16L", "I;16N")
ALPHA_MODES = ("LA", "La", "RGBA", "RGBa", "PA")
COLOUR_MODES = ("RGB", "CMYK", "YCbCr", "LAB", "HSV", "RGBX")
CACHE_VERSION = "1"  # part of every cache key: a change of the decoder's arithmetic bumps it


def parse_background(value) -> tuple[int, int, int]:
    """'white', 'black' or '#rrggbb' (None: white) as an (r, g, b) triple."""
    if value is None:
        return BACKGROUNDS["white"]
    text = str(value).strip().lower()
    if text in BACKGROUNDS:
        return BACKGROUNDS[text]
    if len(text) == 7 and text[0] == "#":
        try:
            return tuple(int(text[i:i + 2], 16) for i in (1, 3, 5))  # type: ignore[return-value]
        except ValueError:
            pass
    raise DataError(f"background {value!r}: expected white, black or a colour #rrggbb (e.g. #808080), the colour "
                    "transparent pixels are composited on")


def _check_image_size(image_size) -> int | None:
    if image_size is None:
        return None
    if isinstance(image_size, bool) or not isinstance(image_size, int) or not 1 <= image_size <= 4096:
        raise DataError(f"image_size {image_size!r}: expected a whole number of pixels from 1 to 4096 (e.g. 64), "
                        "the side of the square images to make")
    return image_size


def _open(path):
    from PIL import Image

    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)  # refused below, by size
            img = Image.open(path, formats=IMAGE_FORMATS)
    except (OSError, ValueError, SyntaxError, EOFError, Image.DecompressionBombError) as e:
        raise _unreadable(path, e) from e
    w, h = img.size
    if w * h > MAX_IMAGE_PIXELS:
        img.close()
        raise DataError(f"{path}: its header claims {w}x{h} pixels, more than the {MAX_IMAGE_PIXELS:,} vaelab reads "
                        "(4096x4096): a decompression bomb, or an image far larger than an autoencoder trains on. "
                        "Resize it first (e.g. to 64x64)")
    return img


def _unreadable(path, e: Exception) -> DataError:
    # UnidentifiedImageError (an OSError) also covers other formats: IMAGE_FORMATS alone are tried
    return DataError(f"{path}: cannot read this image ({type(e).__name__}: {e}); expected a valid PNG or JPEG "
                     "file. Fix or remove it")


def _has_alpha(img) -> bool:
    return img.mode in ALPHA_MODES or (img.mode == "P" and "transparency" in img.info)


def _is_colour(img, background: tuple[int, int, int], path) -> bool:
    """Whether a file decodes to colour, from its header: its mode (a palette image: its palette's colours); a
    transparent one on a coloured background is colour."""
    mode = img.mode
    on_colour = _has_alpha(img) and len(set(background)) > 1
    if mode in GREY_MODES or mode in ("LA", "La"):
        return on_colour
    if mode in ("P", "PA"):
        palette = np.asarray(img.getpalette("RGB") or [], dtype=np.uint8).reshape(-1, 3)
        return on_colour or not bool((palette == palette[:, :1]).all())
    if mode in ("RGBA", "RGBa") or mode in COLOUR_MODES:
        return True
    raise DataError(f"{path}: image mode {mode!r} is not supported; expected 8-bit grayscale or colour "
                    "(L, RGB, RGBA, P). Convert it to 8-bit first")


def _pixels(img, path, channels: int, background: tuple[int, int, int]) -> np.ndarray:
    """A decoded image as uint8 (H, W, channels): alpha composited on `background`, grey repeated to colour."""
    mode = img.mode
    alpha = None
    if mode in ("P", "PA"):  # the palette resolved (greys stay grey: r = g = b)
        img = img.convert("RGBA" if _has_alpha(img) else "RGB")
        mode = img.mode
    if mode in ("1", "L"):
        a = np.asarray(img.convert("L"))[..., None]
    elif mode.startswith("I;16"):
        a = ((np.asarray(img).astype(np.uint32) * 255 + 32767) // 65535).astype(np.uint8)[..., None]  # rounded
    elif mode in ("LA", "La"):
        arr = np.asarray(img.convert("LA"))
        a, alpha = arr[..., :1], arr[..., 1:]
    elif mode in ("RGBA", "RGBa"):
        arr = np.asarray(img.convert("RGBA"))
        a, alpha = arr[..., :3], arr[..., 3:]
    elif mode in COLOUR_MODES:
        a = np.asarray(img.convert("RGB"))
    else:
        raise DataError(f"{path}: image mode {mode!r} is not supported; expected 8-bit grayscale or colour "
                        "(L, RGB, RGBA, P). Convert it to 8-bit first")
    if a.shape[-1] == 1 and channels == 3:
        a = np.repeat(a, 3, axis=-1)
    elif a.shape[-1] == 3 and channels == 1:  # a grey palette resolved to RGB
        a = a[..., :1]
    if alpha is not None:
        # Transparent pixels hold arbitrary colours; compositing makes them the background, exactly rounded
        bg = np.asarray(background[:channels], dtype=np.uint32)
        alpha = alpha.astype(np.uint32)
        a = ((a.astype(np.uint32) * alpha + bg * (255 - alpha) + 127) // 255).astype(np.uint8)
    return a


def _square(a: np.ndarray, size: int) -> np.ndarray:
    """The centre square of `a` (H, W, C), its side the short side, resized to size x size (bicubic, with
    Pillow's antialiasing when shrinking): "resize the short side to `size`, then centre-crop", in one resampling."""
    from PIL import Image

    h, w = a.shape[:2]
    if (h, w) == (size, size):
        return a
    side = min(h, w)
    box = ((w - side) / 2, (h - side) / 2, (w + side) / 2, (h + side) / 2)
    img = Image.fromarray(a[..., 0] if a.shape[-1] == 1 else a)
    out = np.asarray(img.resize((size, size), Image.Resampling.BICUBIC, box=box))
    return out[..., None] if out.ndim == 2 else out


class ImageFiles:
    """The files of an image folder and how they decode: `read(rows)` gives their pixels, uint8 (B, C, H, W).
    What DataLoader workers hold: paths and options, no pixels and no open files."""

    def __init__(self, paths: Sequence[str], shape: tuple[int, int, int], image_size: int | None,
                 background: tuple[int, int, int]):
        self.paths, self.shape, self.image_size, self.background = list(paths), tuple(shape), image_size, background

    def __len__(self) -> int:
        return len(self.paths)

    def read(self, rows) -> torch.Tensor:
        c, h, w = self.shape
        out = np.empty((len(rows), c, h, w), dtype=np.uint8)
        for k, r in enumerate(rows):
            path = self.paths[int(r)]
            img = _open(path)
            try:
                with img:
                    img.load()
                    a = _pixels(img, path, c, self.background)
            except DataError:
                raise
            except (OSError, ValueError, SyntaxError, EOFError) as e:
                raise _unreadable(path, e) from e
            if self.image_size is not None:
                a = _square(a, self.image_size)
            if a.shape != (h, w, c):  # the file changed since the folder was scanned
                raise DataError(f"{path}: decodes to {a.shape[1]}x{a.shape[0]} pixels with {a.shape[2]} channel(s), "
                                f"but the folder was read as {w}x{h} with {c}; the file changed while vaelab read "
                                "the folder. Load the folder again")
            out[k] = a.transpose(2, 0, 1)
        return torch.from_numpy(out)  # (B, C, H, W)

    # a DataLoader's dataset: one item is one batch of rows, decoded in a worker
    __getitem__ = read


def scan(paths: Sequence[Path], image_size: int | None, background) -> ImageFiles:
    """Read every file's header: its size (one size for all unless `image_size`) and whether it is colour."""
    image_size, background = _check_image_size(image_size), parse_background(background)
    sizes: dict[tuple[int, int], list] = {}
    colour = False
    for path in paths:
        img = _open(path)
        with img:
            colour = _is_colour(img, background, path) or colour
            found = sizes.setdefault(img.size, [0, path])
            found[0] += 1
    if image_size is None and len(sizes) > 1:
        listed = sorted(sizes.items(), key=lambda kv: -kv[1][0])
        shown = ", ".join(f"{w}x{h} ({n} file{'s' if n > 1 else ''}, e.g. {p})" for (w, h), (n, p) in listed[:6])
        more = f" and {len(listed) - 6} more sizes" if len(listed) > 6 else ""
        raise DataError(f"images differ in size: {shown}{more}; expected one size for all. Give --image-size N "
                        "(image_size=N in Python) to resize each image's short side to N and centre-crop N x N, "
                        "or resize the files first")
    (w, h), = sizes if image_size is None else {(image_size, image_size): None}
    return ImageFiles([str(p) for p in paths], (3 if colour else 1, h, w), image_size, background)


def images_dataset(files: ImageFiles, y: torch.Tensor | None, classes, name: str, *, lazy: bool | None,
                   workers: int = 0, cache: bool = False) -> ArrayDataset:
    """The folder's dataset: in memory, or a LazyImageDataset where `lazy` says so (None: where workers or a cache
    are asked for, or the decoded pixels would take more than LAZY_BYTES)."""
    c, h, w = files.shape
    if lazy is None:
        lazy = bool(workers) or cache or len(files) * c * h * w > LAZY_BYTES
    if not lazy:
        if cache or workers:
            raise DataError(f"dataset {name!r} is held in memory: workers={workers} and cache={cache} apply to "
                            "folders read lazily; give lazy=True (--lazy) with them, or leave them out")
        return ArrayDataset(files.read(range(len(files))), y, 255.0, classes, name)
    return LazyImageDataset(_Store(files, workers, cache), y, classes, name)


# ---------------------------------------------------------------------------------------- lazy reading


def cache_key(files: ImageFiles) -> str:
    """What a cache of decoded pixels depends on: each file's path, size and modification time, and the
    decoding options (image_size, background)."""
    h = hashlib.sha256(f"vaelab-images {CACHE_VERSION} {files.image_size} {files.background}\n".encode())
    for p in files.paths:
        st = os.stat(p)
        h.update(f"{p}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:32]


class _Store:
    """What the splits of one lazily read folder share: its files, the worker count, and the uint8 cache.

    The cache (cache=True) is `<user cache>/vaelab/images/<key>.npy` (an ordinary .npy, (N, C, H, W) uint8: numpy
    opens it with mmap_mode='r'). It is filled while the folder is read: every decoded batch is written into a
    temporary file, and once a pass over the training data has ended, the files not read yet (the test split's)
    are decoded too and the file is renamed into place, atomically. From then on the rows are read from the
    memory-mapped file, without decoding.
    """

    def __init__(self, files: ImageFiles, workers: int = 0, cache: bool = False):
        if isinstance(workers, bool) or not isinstance(workers, int) or workers < 0:
            raise DataError(f"workers {workers!r}: expected a whole number of worker processes >= 0 (0 decodes in "
                            "the training process)")
        self.files, self.workers = files, workers
        self.mapped = None  # the finished cache, memory-mapped (N, C, H, W)
        self.path = self._tmp = self._filled = self._fd = self._offset = None
        if cache:
            from vaelab.data.sources import cache_dir

            self.path = cache_dir() / "images" / f"{cache_key(files)}.npy"
            if self.path.is_file():
                self._map()

    def _map(self) -> None:
        mapped = np.load(self.path, mmap_mode="r")
        if mapped.shape != (len(self.files), *self.files.shape) or mapped.dtype != np.uint8:
            self.path.unlink(missing_ok=True)  # not this folder's pixels (a foreign or damaged file): rebuilt
            return
        self.mapped = mapped

    def read(self, rows: np.ndarray) -> torch.Tensor:
        """Rows' pixels, uint8 (B, C, H, W), decoded here (or from the cache)."""
        if self.mapped is not None:
            return torch.from_numpy(np.ascontiguousarray(self.mapped[rows]))
        pixels = self.files.read(rows)
        self._fill(rows, pixels)
        return pixels

    def stream(self, row_batches: list[np.ndarray]) -> Iterator[torch.Tensor]:
        """The pixels of each batch of rows in turn, decoded `workers` batches ahead by worker processes."""
        if self.mapped is not None or self.workers == 0 or not row_batches:
            for rows in row_batches:
                yield self.read(rows)
        else:
            for rows, pixels in zip(row_batches, self._loader(row_batches)):
                self._fill(rows, pixels)
                yield pixels
        self._complete()

    def _loader(self, row_batches: list[np.ndarray]) -> torch.utils.data.DataLoader:
        """A DataLoader whose workers decode the batches of rows, in order. Its generator is its own: a DataLoader
        draws its workers' base seed from the global RNG otherwise, and so would shift the model's noise."""
        return torch.utils.data.DataLoader(self.files, batch_size=None, sampler=row_batches, num_workers=self.workers,
                                           prefetch_factor=2, generator=torch.Generator().manual_seed(0))

    # ----- the cache being filled
    def _fill(self, rows, pixels: torch.Tensor) -> None:
        if self.path is None or self.mapped is not None:
            return
        if self._fd is None:
            self._start()
        data = pixels.numpy()
        size = data[0].nbytes if len(data) else 0
        for k, r in enumerate(rows):
            if not self._filled[r]:
                os.pwrite(self._fd, data[k].tobytes(), self._offset + int(r) * size)
                self._filled[r] = True

    def _start(self) -> None:
        folder = self.path.parent
        folder.mkdir(parents=True, exist_ok=True)
        for stale in folder.glob(f"{self.path.name}.*.tmp"):  # left by a process that died before finishing
            pid = stale.name.split(".")[-2]
            if pid.isdigit() and not _alive(int(pid)):
                stale.unlink(missing_ok=True)
        self._tmp = folder / f"{self.path.name}.{os.getpid()}.tmp"
        shape = (len(self.files), *self.files.shape)
        with open(self._tmp, "wb") as f:
            np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False, "shape": shape})
            self._offset = f.tell()
            f.truncate(self._offset + math.prod(shape))
        self._fd = os.open(self._tmp, os.O_WRONLY)
        self._filled = np.zeros(len(self.files), dtype=bool)
        self._owner = os.getpid()

    def _complete(self) -> None:
        """After a pass: decode what no pass has read yet, and put the finished cache in place."""
        if self._fd is None:
            return
        missing = np.flatnonzero(~self._filled)
        chunks = [missing[i:i + 256] for i in range(0, len(missing), 256)]
        if chunks and self.workers:
            for rows, pixels in zip(chunks, self._loader(chunks)):
                self._fill(rows, pixels)
        for rows in chunks if not self.workers else []:
            self._fill(rows, self.files.read(rows))
        os.fsync(self._fd)
        os.close(self._fd)
        self._fd = None
        os.replace(self._tmp, self.path)
        self._map()

    def __del__(self):
        # an unfinished cache is dropped, by the process that writes it (a forked worker holds a copy of this object)
        if getattr(self, "_fd", None) is not None and getattr(self, "_owner", None) == os.getpid():
            os.close(self._fd)
            self._tmp.unlink(missing_ok=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class LazyImageDataset(ArrayDataset):
    """An image folder decoded one batch at a time: only a batch's pixels are in memory (and, with workers, the
    few batches decoded ahead). `batch(idx)` equals the in-memory ArrayDataset's bit for bit. There is no `x`
    tensor: reading `x` raises a DataError that says to use batch()."""

    max_float_bytes = 2 ** 31  # to_float() refuses to make a float32 copy larger than this (2 GiB)

    def __init__(self, store: _Store, y: torch.Tensor | None = None, classes: list[str] | None = None,
                 name: str = "", *, rows: np.ndarray | None = None, factors=None,
                 factor_names: list[str] | None = None):
        self._store = store
        self._rows = np.arange(len(store.files), dtype=np.int64) if rows is None else np.asarray(rows, np.int64)
        n = len(self._rows)
        if y is not None and (not isinstance(y, torch.Tensor) or y.ndim != 1 or len(y) != n):
            raise DataError(f"LazyImageDataset {name!r}: y must be ({n},) class indices, one per image")
        self.y = None if y is None else y.to(torch.int64)
        self.scale = 255.0
        self.classes = list(classes) if classes is not None else None
        self.name = name
        from vaelab.data.arrays import check_factors

        self.factors, self.factor_names = check_factors(factors, factor_names, n, name)

    @property
    def x(self):
        raise DataError(f"dataset {self.name!r} reads its {len(self):,} images from their files one batch at a time "
                        "and has no `x` tensor; read samples with batch(idx), or subset(idx).to_float() for a few")

    @property
    def workers(self) -> int:
        return self._store.workers

    @property
    def cache_path(self) -> Path | None:
        """The uint8 cache file (cache=True), whether written yet or not; None without a cache."""
        return self._store.path

    def __len__(self) -> int:
        return len(self._rows)

    def __repr__(self) -> str:
        return (f"LazyImageDataset(name={self.name!r}, n={len(self)}, sample_shape={self.sample_shape}, "
                f"workers={self.workers}, {self._describe_labels()})")

    @property
    def sample_shape(self) -> tuple[int, ...]:
        return self._store.files.shape

    @property
    def is_image(self) -> bool:
        return True

    def _select(self, idx) -> np.ndarray:
        if isinstance(idx, torch.Tensor):
            idx = idx.cpu().numpy()
        return np.atleast_1d(self._rows[idx])

    def batch(self, idx, binarize: bool = False, generator: torch.Generator | None = None) -> torch.Tensor:
        single = isinstance(idx, (int, np.integer)) or (isinstance(idx, torch.Tensor) and idx.ndim == 0)
        p = self.scaled(self._store.read(self._select(idx)), binarize, generator)
        return p[0] if single else p

    def batches(self, indices: list, binarize: bool = False,
                generator: torch.Generator | None = None) -> Iterator[torch.Tensor]:
        """batch(i, binarize, generator) for each i of `indices`, in order, decoded ahead by the workers."""
        for pixels in self._store.stream([self._select(i) for i in indices]):
            yield self.scaled(pixels, binarize, generator)

    def subset(self, idx) -> "LazyImageDataset":
        return LazyImageDataset(self._store, None if self.y is None else self.y[idx], self.classes, self.name,
                                rows=self._select(idx), **self._factors_kw(idx))

    def to_float(self) -> torch.Tensor:
        size = len(self) * math.prod(self.sample_shape) * 4
        if size > self.max_float_bytes:
            raise DataError(f"dataset {self.name!r} reads its {len(self):,} images lazily; as one float32 tensor "
                            f"they would take {size / 2 ** 30:.1f} GiB: read them in batches with batch(idx), or "
                            "take a subset(idx) first")
        return self.batch(slice(None))
