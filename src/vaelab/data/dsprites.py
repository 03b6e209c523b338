"""dSprites (Matthey et al. 2017), generated rather than downloaded: 737,280 binary 64x64 images of a square, an
ellipse or a heart at every combination of 6 scales, 40 orientations and 32 x 32 positions, with their factors.

The published set (github.com/deepmind/dsprites-dataset) varies six latents in a fixed order, color (always 1),
shape, scale, orientation, posX, posY, the last one fastest; image i of that file is image i here. The factors
here leave the constant color out: FACTOR_NAMES = (shape, scale, orientation, pos_x, pos_y), with the published
values except shape, which is 0, 1, 2 (square, ellipse, heart) where the published file says 1, 2, 3:

    shape        0, 1, 2                      (3)
    scale        linspace(0.5, 1, 6)          (6)
    orientation  linspace(0, 2 pi, 40)        (40: both ends, so orientation 39 draws the same image as 0)
    pos_x, pos_y linspace(0, 1, 32)           (32 each)

The rendering. A pixel is white when its centre lies inside the sprite (one sample a pixel, no anti-aliasing:
the published images are binary too). Pixel (row r, column c) has its centre at (x, y) =
(c + 0.5, r + 0.5), y pointing down the rows. A sprite is centred at (16 + 32 pos_x, 16 + 32 pos_y), so the
positions step by 32/31 pixel and sprites never leave the canvas; it is scaled by `scale` about that centre and
turned by `orientation` radians counterclockwise as the image is displayed (row 0 at the top). At scale 1:
  - the square has sides of 19.2 pixels (0.3 of the canvas);
  - the ellipse has semi-axes of ELLIPSE_SEMI_AXES = (12.766, 7.213) pixels, the long one along x at orientation 0;
  - the heart is the polygon of HEART_VERTICES = 150 points t = 2 pi k / 150 of the classic heart curve
    (16 sin^3 t, 13 cos t - 5 cos 2t - 2 cos 3t - cos 4t), scaled to 19.2/32 in x and 19.2/29 in y, its point
    down, and moved up 1.44 pixels (0.075 of the sprite size), upright at orientation 0.
Since positions are not whole pixels apart, a sprite cannot be drawn once and shifted: each image's rows are
computed exactly instead, as the spans of each pixel row inside the sprite (a quadratic for the ellipse, the
crossings of the polygon's edges otherwise), turned into 64-bit row masks; see `_row_words`.

How this was matched and checked. The published README and example notebook give the factor values, their
order and the index mapping, and say the images were rasterized with the LOVE framework. The published .npz was
not at hand, but the dataset repository's `dsprites.gif` holds 320 of its images at full resolution (for each
shape, sweeps of scale and orientation at position (0, 0); for the heart also of pos_y and pos_x at scale 1),
and they fix the geometry: the position sweeps, read as sub-pixel samples of the heart's outline, give the
position mapping and the heart (the heart curve; 150 vertices fit it, their neighbours do not); the rotation
sweeps give the direction and centre of rotation; the square's pixel counts at every scale and angle its size;
the ellipse's 58 frames its semi-axes. This renderer draws those 320 images with 12 of their 1,310,720 pixels
different, each a pixel centre less than 0.001 pixel from the outline, where a rasterizer's rounding decides.
tests/test_dsprites.py checks the rasterization against renderings computed independently (the square's box,
the ellipse's equation at pixel centres, point-in-polygon for the heart, symmetries), a few published images'
pixel counts and extents, and the factor grid and index mapping.

Cache. The images are generated once, in seconds, into the user cache, `cache_dir()/dsprites/`, bit-packed
(one bit a pixel, 8 bytes a row, 512 bytes an image: 377 MB), after a header that holds a format version and the
SHA-256 of the images and a fingerprint of the renderer (a hash of a few sprites drawn by it); the file is written
atomically. A truncated or corrupt file, or one drawn by another version of the renderer, is detected when it is
read and generated again, with a message saying why. Reading keeps the packed bits (`PackedImageDataset`)
and unpacks one batch at a time.

Splits: `load_dsprites` holds out a seeded random 10% as the test split (73,728 images), by the rule every
dataset without its own split follows (vaelab.data.arrays.split: torch.randperm(737,280) seeded with `seed`,
0 by default; the first 10% of the permutation, sorted, is the test split). Labels (y) are the shape, so a
conditional model can condition on it.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import time
from pathlib import Path

import numpy as np
import torch

from vaelab.data.arrays import DataSplits, PackedImageDataset, split
from vaelab.data.sources import cache_dir
from vaelab.errors import DataError, VaelabError
from vaelab.io import atomic_write_bytes

# ------------------------------------------------------------------------------------------- the factors

FACTOR_NAMES: tuple[str, ...] = ("shape", "scale", "orientation", "pos_x", "pos_y")
SHAPES: tuple[str, ...] = ("square", "ellipse", "heart")
FACTOR_VALUES: dict[str, np.ndarray] = {
    "shape": np.arange(3, dtype=np.float64),
    "scale": np.linspace(0.5, 1.0, 6),
    "orientation": np.linspace(0.0, 2 * np.pi, 40),
    "pos_x": np.linspace(0.0, 1.0, 32),
    "pos_y": np.linspace(0.0, 1.0, 32),
}
FACTOR_SIZES: tuple[int, ...] = tuple(len(v) for v in FACTOR_VALUES.values())  # (3, 6, 40, 32, 32)
NUM_IMAGES = int(np.prod(FACTOR_SIZES))  # 737,280
IMAGE_SIZE = 64
SAMPLE_SHAPE = (1, IMAGE_SIZE, IMAGE_SIZE)
BYTES_PER_IMAGE = IMAGE_SIZE * IMAGE_SIZE // 8  # 512: one bit a pixel

# ------------------------------------------------------------------------------------------ the geometry
# pixel units at scale 1 (see the module docstring for where each number comes from)

SPRITE_SIZE = 19.2  # 0.3 of the canvas: the square's side, the heart's width (and about its height)
CENTRE_MIN, CENTRE_SPAN = 16.0, 32.0  # a sprite's centre is CENTRE_MIN + CENTRE_SPAN * pos, in x and in y
ELLIPSE_SEMI_AXES = (12.766, 7.213)
HEART_VERTICES = 150
HEART_LIFT = 0.075 * SPRITE_SIZE  # how far the heart curve's origin sits above the sprite's centre


def _outline(shape: int) -> np.ndarray:
    """The polygon (V, 2) of the square (0) or the heart (2) at scale 1, orientation 0, around its centre; y down."""
    if shape == 0:
        h = SPRITE_SIZE / 2
        return np.array([[-h, -h], [h, -h], [h, h], [-h, h]])
    t = 2 * np.pi * np.arange(HEART_VERTICES) / HEART_VERTICES
    x = SPRITE_SIZE / 32 * 16 * np.sin(t) ** 3
    y = -SPRITE_SIZE / 29 * (13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t)) - HEART_LIFT
    return np.stack([x, y], axis=1)


_OUTLINES = {0: _outline(0), 2: _outline(2)}


def _spans(shape: int, scale: float, orientation: float, v: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Where each horizontal line y = v (offsets from the sprite's centre, (M,)) lies inside the sprite: (lo, hi),
    each (M, P), the x offsets of P spans [lo, hi] per line; an unused span has lo = +inf, hi = -inf."""
    c, s = np.cos(orientation), np.sin(orientation)
    v = np.asarray(v, dtype=np.float64)
    if shape == 1:
        # a point (u, v) of the image is (u c - v s, u s + v c) in the ellipse's own frame: inside when
        # A u^2 + B u + C <= 0, a quadratic in u for each line
        a, b = ELLIPSE_SEMI_AXES[0] * scale, ELLIPSE_SEMI_AXES[1] * scale
        qa = c * c / a ** 2 + s * s / b ** 2
        qb = 2 * v * c * s * (1 / b ** 2 - 1 / a ** 2)
        qc = v * v * (s * s / a ** 2 + c * c / b ** 2) - 1
        disc = qb * qb - 4 * qa * qc
        root = np.sqrt(np.maximum(disc, 0.0))
        lo = np.where(disc >= 0, (-qb - root) / (2 * qa), np.inf)
        hi = np.where(disc >= 0, (-qb + root) / (2 * qa), -np.inf)
        return lo[:, None], hi[:, None]
    body = _OUTLINES[shape] * scale
    # the sprite's frame to the image's: turned counterclockwise on screen (y down)
    xs = body[:, 0] * c + body[:, 1] * s
    ys = -body[:, 0] * s + body[:, 1] * c
    xe, ye = np.roll(xs, -1), np.roll(ys, -1)  # each edge runs from vertex k to vertex k + 1
    dy = np.where(ye != ys, ye - ys, 1.0)
    near = np.nonzero((v >= ys.min()) & (v <= ys.max()))[0]  # the lines that can meet the sprite
    if len(near) == 0:
        return np.full((len(v), 1), np.inf), np.full((len(v), 1), -np.inf)
    w = v[near, None]
    # an edge crosses the line when one end is on or above it and the other below (half-open, so a line through
    # a vertex counts one crossing); sorted crossings pair up into the spans inside (even-odd rule)
    crosses = (ys <= w) != (ye <= w)
    x = np.where(crosses, xs + (w - ys) * (xe - xs) / dy, np.inf)
    x.sort(axis=1)
    k = int(crosses.sum(axis=1).max())
    pairs = max(k // 2, 1)
    lo, hi = np.full((len(v), pairs), np.inf), np.full((len(v), pairs), -np.inf)
    lo[near], hi[near] = x[:, 0:2 * pairs:2], x[:, 1:2 * pairs:2]
    hi[np.isinf(lo)] = -np.inf  # a pair of +inf "crossings" is no span
    return lo, hi


# _LEFT[c]: the bits of columns c..63 of a row, column 0 being the top bit (np.packbits' order); _LEFT[64] = 0
_LEFT = np.array([(2 ** 64 - 1) >> c for c in range(64)] + [0], dtype=np.uint64)


def _row_words(lo: np.ndarray, hi: np.ndarray, cx) -> np.ndarray:
    """Rows as uint64 bit masks (column 0 the top bit): the pixels whose centre c + 0.5 lies in a span
    [cx + lo, cx + hi]. lo, hi (..., P) and cx broadcast; returns (...)."""
    first = np.clip(np.ceil(lo + cx - 0.5), 0, IMAGE_SIZE).astype(np.int64)
    last = np.clip(np.floor(hi + cx - 0.5), -1, IMAGE_SIZE - 1).astype(np.int64)
    words = np.where(first <= last, _LEFT[first] & ~_LEFT[last + 1], np.uint64(0))
    return np.bitwise_or.reduce(words, axis=-1)


def _as_bytes(words: np.ndarray) -> np.ndarray:
    """(..., 64) row words -> (..., 512) bytes, as np.packbits packs the image's pixels row by row."""
    return words.astype(">u8").view(np.uint8).reshape(*words.shape[:-1], BYTES_PER_IMAGE)


_ROW_CENTRES = np.arange(IMAGE_SIZE) + 0.5


def render_packed(shape, scale, orientation, pos_x, pos_y) -> np.ndarray:
    """Images of any factor values (arrays of one length n, or scalars; shape 0/1/2), packed: uint8 (n, 512)."""
    shape, scale, orientation, pos_x, pos_y = np.broadcast_arrays(
        *(np.atleast_1d(np.asarray(a, dtype=np.float64)) for a in (shape, scale, orientation, pos_x, pos_y)))
    if not np.isin(shape, (0, 1, 2)).all():
        raise DataError(f"dSprites shape must be 0, 1 or 2 ({', '.join(SHAPES)}), got {sorted(set(shape.tolist()))}")
    for name, values in (("scale", scale), ("orientation", orientation), ("pos_x", pos_x), ("pos_y", pos_y)):
        if not np.isfinite(values).all():
            raise DataError(f"dSprites {name} must be finite numbers")
    out = np.zeros((len(shape), BYTES_PER_IMAGE), dtype=np.uint8)
    sprites, which = np.unique(np.stack([shape, scale, orientation], axis=1), axis=0, return_inverse=True)
    which = which.reshape(-1)
    for k, (sh, sc, th) in enumerate(sprites):
        idx = np.nonzero(which == k)[0]
        cx = CENTRE_MIN + CENTRE_SPAN * pos_x[idx]
        cy = CENTRE_MIN + CENTRE_SPAN * pos_y[idx]
        lo, hi = _spans(int(sh), sc, th, (_ROW_CENTRES[None, :] - cy[:, None]).ravel())
        lo, hi = lo.reshape(len(idx), IMAGE_SIZE, -1), hi.reshape(len(idx), IMAGE_SIZE, -1)
        out[idx] = _as_bytes(_row_words(lo, hi, cx[:, None, None]))
    return out


def render(shape, scale: float, orientation: float, pos_x: float, pos_y: float) -> np.ndarray:
    """One image of any factor values (shape: 0/1/2 or its name), uint8 (64, 64) of 0 and 1."""
    if isinstance(shape, str):
        if shape not in SHAPES:
            raise DataError(f"dSprites shape {shape!r}: expected one of {', '.join(SHAPES)} (or 0, 1, 2)")
        shape = SHAPES.index(shape)
    return unpack(render_packed(shape, scale, orientation, pos_x, pos_y))[0]


def unpack(packed: np.ndarray) -> np.ndarray:
    """Packed images (n, 512) -> uint8 (n, 64, 64) of 0 and 1."""
    return np.unpackbits(packed, axis=-1).reshape(len(packed), IMAGE_SIZE, IMAGE_SIZE)


# ------------------------------------------------------------------------------- index <-> factor values


def _check_indices(indices) -> np.ndarray:
    idx = np.asarray(indices)
    if idx.ndim == 1 and idx.shape[0] == len(FACTOR_SIZES):
        idx = idx[None]
    if idx.ndim != 2 or idx.shape[1] != len(FACTOR_SIZES) or idx.dtype.kind not in "iu":
        raise DataError(f"dSprites factor indices have shape {idx.shape} and dtype {idx.dtype}; expected integers "
                        f"(n, {len(FACTOR_SIZES)}): one index per factor ({', '.join(FACTOR_NAMES)})")
    for j, (name, size) in enumerate(zip(FACTOR_NAMES, FACTOR_SIZES)):
        bad = (idx[:, j] < 0) | (idx[:, j] >= size)
        if bad.any():
            raise DataError(f"dSprites factor {name!r} index {int(idx[bad, j][0])} is out of range 0..{size - 1}")
    return idx.astype(np.int64)


def image_index(indices) -> np.ndarray:
    """The position in the set (and in the published file) of the images with these factor indices (n, 5)."""
    return np.ravel_multi_index(tuple(_check_indices(indices).T), FACTOR_SIZES).astype(np.int64)


def factor_indices(index) -> np.ndarray:
    """The factor indices (n, 5) of the images at these positions (n,)."""
    index = np.atleast_1d(np.asarray(index))
    if index.dtype.kind not in "iu" or index.ndim != 1 or (index.size and (index.min() < 0
                                                                            or index.max() >= NUM_IMAGES)):
        raise DataError(f"dSprites image indices must be integers 0..{NUM_IMAGES - 1} (1-D)")
    return np.stack(np.unravel_index(index, FACTOR_SIZES), axis=1).astype(np.int64)


def factor_values(indices) -> np.ndarray:
    """The factor values (n, 5) float64 of these factor indices (n, 5)."""
    idx = _check_indices(indices)
    return np.stack([FACTOR_VALUES[name][idx[:, j]] for j, name in enumerate(FACTOR_NAMES)], axis=1)


def all_factors() -> np.ndarray:
    """The factor values of every image, in the set's order: float64 (737,280, 5)."""
    grids = np.meshgrid(*FACTOR_VALUES.values(), indexing="ij")
    return np.stack([g.reshape(-1) for g in grids], axis=1)


def render_images(indices) -> np.ndarray:
    """The images of these factor index combinations (n, 5), without building the set: uint8 (n, 64, 64)."""
    values = factor_values(indices)
    return unpack(render_packed(*values.T))


# ---------------------------------------------------------------------------------------------- the set


def sprite_block(shape: int, scale: float, orientation: float) -> np.ndarray:
    """The 1,024 images of one sprite at every position, packed, in the set's order (pos_x, then pos_y): uint8
    (1024, 512). The row spans are computed once for the 32 y positions; the 32 x positions then only move the
    spans' ends, one vectorized step."""
    centres = CENTRE_MIN + CENTRE_SPAN * FACTOR_VALUES["pos_x"]  # the same 32 centres in x and in y
    v = (_ROW_CENTRES[None, :] - centres[:, None]).ravel()  # (32 y positions x 64 rows,)
    lo, hi = _spans(shape, scale, orientation, v)  # (2048, P)
    words = _row_words(lo[None], hi[None], centres[:, None, None])  # (32 x positions, 2048)
    return _as_bytes(words.reshape(-1, IMAGE_SIZE))


def generate(out: np.ndarray | None = None) -> np.ndarray:
    """Every image, packed, in the set's order: uint8 (737,280, 512) (written into `out` if given)."""
    if out is None:
        out = np.empty((NUM_IMAGES, BYTES_PER_IMAGE), dtype=np.uint8)
    elif out.shape != (NUM_IMAGES, BYTES_PER_IMAGE) or out.dtype != np.uint8:
        raise ValueError(f"out must be uint8 {(NUM_IMAGES, BYTES_PER_IMAGE)}, got {out.dtype} {out.shape}")
    block = FACTOR_SIZES[3] * FACTOR_SIZES[4]  # 1,024 positions
    i = 0
    for shape in range(FACTOR_SIZES[0]):
        for scale in FACTOR_VALUES["scale"]:
            for orientation in FACTOR_VALUES["orientation"]:
                out[i:i + block] = sprite_block(shape, scale, orientation)
                i += block
    return out


# ---------------------------------------------------------------------------------------------- the cache

FORMAT_VERSION = 1  # raise it whenever the images or the file layout change: old caches are then regenerated
MAGIC = b"vaelab dsprites\n"
HEADER_BYTES = 4096  # MAGIC, then a JSON header padded with spaces, then the packed images


def cache_path() -> Path:
    return cache_dir() / "dsprites" / "dsprites-64x64.bits"


class CacheProblem(Exception):
    """What is wrong with a cache file (the message completes "the dSprites cache PATH ...")."""


def new_buffer(images: int | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(the bytes of a cache file, its images (images, 512) as a view into them): generate into the view, then
    write_cache(path, buffer) writes the file without copying 377 MB. images: the full set's 737,280 unless given."""
    images = NUM_IMAGES if images is None else images
    buf = np.zeros(HEADER_BYTES + images * BYTES_PER_IMAGE, dtype=np.uint8)
    return buf, buf[HEADER_BYTES:].reshape(images, BYTES_PER_IMAGE)


def renderer_fingerprint() -> str:
    """A hash of a few sprites as this renderer draws them: a cache drawn by another version differs."""
    digest = hashlib.sha256()
    for shape, scale, orientation in ((0, 2, 7), (1, 4, 13), (2, 5, 29), (2, 0, 3)):
        digest.update(sprite_block(shape, FACTOR_VALUES["scale"][scale], FACTOR_VALUES["orientation"][orientation]))
    return digest.hexdigest()


def write_cache(path: str | os.PathLike, buf: np.ndarray) -> None:
    """Write a buffer of new_buffer() (images filled in) as a cache file, atomically, its header with the images'
    SHA-256 and the renderer's fingerprint; a VaelabError says why it could not be written."""
    payload = buf[HEADER_BYTES:]
    info = {"format_version": FORMAT_VERSION, "renderer": renderer_fingerprint(),
            "images": len(payload) // BYTES_PER_IMAGE,
            "sample_shape": list(SAMPLE_SHAPE), "packing": "np.packbits of each image's pixels, row by row",
            "factor_names": list(FACTOR_NAMES), "factor_sizes": list(FACTOR_SIZES),
            "sha256": hashlib.sha256(memoryview(payload)).hexdigest()}
    head = MAGIC + json.dumps(info).encode()
    buf[:HEADER_BYTES] = np.frombuffer(head + b" " * (HEADER_BYTES - 1 - len(head)) + b"\n", dtype=np.uint8)
    atomic_write_bytes(path, memoryview(buf))


def read_cache(path: str | os.PathLike, images: int | None = None) -> np.ndarray:
    """The packed images (images, 512; the full set's 737,280 unless given) of a cache file, checked: format
    version, image count, size, SHA-256. CacheProblem says what is wrong."""
    images = NUM_IMAGES if images is None else images
    expected = HEADER_BYTES + images * BYTES_PER_IMAGE
    try:
        with open(path, "rb") as f:
            head = f.read(HEADER_BYTES)
            if not head.startswith(MAGIC):
                raise CacheProblem("is not a vaelab dSprites cache (its first bytes differ)")
            try:
                info = json.loads(head[len(MAGIC):])
            except (UnicodeDecodeError, json.JSONDecodeError):
                raise CacheProblem("has an unreadable header (truncated or corrupt)") from None
            if not isinstance(info, dict) or info.get("format_version") != FORMAT_VERSION:
                version = info.get("format_version") if isinstance(info, dict) else None
                raise CacheProblem(f"has format version {version!r}; this vaelab writes version {FORMAT_VERSION}")
            if info.get("renderer") != renderer_fingerprint():
                raise CacheProblem("was drawn by another version of vaelab's dSprites renderer")
            if info.get("images") != images:
                raise CacheProblem(f"holds {info.get('images')!r} images; expected {images:,}")
            size = os.fstat(f.fileno()).st_size
            if size != expected:
                raise CacheProblem(f"holds {size:,} bytes where {expected:,} were expected (truncated or corrupt)")
            payload = np.empty((images, BYTES_PER_IMAGE), dtype=np.uint8)
            got = f.readinto(memoryview(payload).cast("B"))
    except OSError as e:
        raise CacheProblem(f"cannot be read ({e.strerror or e})") from None
    if got != payload.nbytes:  # the file shrank while it was read
        raise CacheProblem(f"ended after {HEADER_BYTES + got:,} bytes where {expected:,} were expected (truncated)")
    if hashlib.sha256(memoryview(payload).cast("B")).hexdigest() != info.get("sha256"):
        raise CacheProblem("fails its SHA-256 check: the images changed after they were written (corrupt)")
    return payload


def _note(message: str) -> None:
    print(f"vaelab: {message}", file=sys.stderr, flush=True)


def cached_images(path: str | os.PathLike | None = None) -> np.ndarray:
    """Every image, packed (737,280, 512): read from the cache file, or generated and written to it (also when
    the file is truncated, corrupt or of another format version, saying so)."""
    path = Path(path) if path is not None else cache_path()
    if path.exists():
        try:
            return read_cache(path)
        except CacheProblem as e:
            _note(f"the dSprites cache {path} {e}; generating it again")
    _note(f"generating dSprites ({NUM_IMAGES:,} images of 64x64) into {path}")
    t0 = time.perf_counter()
    buf, payload = new_buffer()
    generate(out=payload)
    try:
        write_cache(path, buf)
    except VaelabError as e:
        _note(f"could not cache dSprites ({e}); using the generated images without a cache")
    else:
        _note(f"dSprites generated in {time.perf_counter() - t0:.1f} s")
    return payload


def dsprites_dataset(bits: np.ndarray | None = None) -> PackedImageDataset:
    """All 737,280 images (from the cache unless `bits` are given) with their factors and shape labels."""
    bits = cached_images() if bits is None else bits
    shapes = np.repeat(np.arange(FACTOR_SIZES[0]), NUM_IMAGES // FACTOR_SIZES[0])
    return PackedImageDataset(bits, SAMPLE_SHAPE, torch.from_numpy(shapes), list(SHAPES), "dsprites",
                              factors=torch.from_numpy(all_factors()), factor_names=list(FACTOR_NAMES))


def load_dsprites(test_fraction: float = 0.1, seed: int = 0) -> DataSplits:
    """dSprites as train/test splits (a seeded random `test_fraction` to test; see the module docstring)."""
    return split(dsprites_dataset(), test_fraction, seed, source="dsprites")


__all__ = ["FACTOR_NAMES", "FACTOR_SIZES", "FACTOR_VALUES", "SHAPES", "NUM_IMAGES", "SPRITE_SIZE",
           "ELLIPSE_SEMI_AXES", "HEART_VERTICES", "render", "render_packed", "render_images", "unpack",
           "image_index", "factor_indices", "factor_values", "all_factors", "sprite_block", "generate", "cache_path",
           "renderer_fingerprint", "new_buffer", "write_cache", "read_cache", "CacheProblem", "cached_images", "dsprites_dataset",
           "load_dsprites"]
