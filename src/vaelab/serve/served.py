"""The model side of `vaelab serve`: one run directory loaded once, and every answer the HTTP API gives, as plain
Python (dicts of lists and numbers) with the request's checks. No web framework here: vaelab.serve.app wraps
these methods in routes, and anything that can be asked of a ServedRun can be tested without a socket.

Every array a client sends is checked before it reaches the model (shape, dtype, finite values, batch size,
labels); a bad one raises RequestError, which the app answers with its status code and the message. The model
is used through its interface only: `capabilities`, `encode` (posteriors), `decode`, `encode_indices` /
`decode_indices` for discrete codes, vaelab.generation's helpers and vaelab.evaluation.scores' anomaly scores.

Arrays travel in data space (the model's input scale: pixel intensities in [0, 1] for images), channels first.
"""

from __future__ import annotations

import base64
import io
import json
import math
import threading
from pathlib import Path

import numpy as np
import torch

from vaelab.errors import VaelabError

DEFAULT_MAX_BATCH = 1024
LATENT_MAP_DEFAULT = 10000


class RequestError(VaelabError):
    """A request the server refuses: `status` is the HTTP status of the answer (422 for a body it cannot use,
    404 for something that does not exist)."""

    def __init__(self, message: str, status: int = 422):
        super().__init__(message)
        self.status = status


def _shape(shape) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ("," if len(shape) == 1 else "") + ")"


class ServedRun:
    """A run directory opened for serving: its model (eval mode, fp32, on CPU), its config, its test split (when
    the data can be loaded) and a lock that serialises the model calls of concurrent requests."""

    def __init__(self, run_dir, *, trust_code: bool = False, max_batch: int = DEFAULT_MAX_BATCH,
                 data_dir: str | None = None, load_data: bool = True):
        from vaelab.io import read_config
        from vaelab.models import from_pretrained

        if not (isinstance(max_batch, int) and max_batch >= 1):
            raise VaelabError(f"max_batch={max_batch!r} must be a positive integer (the most rows one request "
                              "may carry)")
        self.run_dir = Path(run_dir)
        if not self.run_dir.is_dir():
            what = "is a file, not a run directory" if self.run_dir.exists() else "does not exist"
            raise VaelabError(f"run directory {str(run_dir)!r} {what}; give the --out directory of a `vaelab train` "
                              "run")
        self.config = read_config(self.run_dir)
        self.model = from_pretrained(self.run_dir, trust_code=trust_code).float().eval()
        self.caps = self.model.capabilities
        self.input_shape = tuple(int(s) for s in self.model.config.input_shape)
        self.latent_shape = tuple(int(s) for s in self.model.latent_shape)
        self.max_batch = max_batch
        self.lock = threading.RLock()
        self._cache: dict = {}
        self.data = None  # DataSplits, when the run's dataset can be loaded
        self.data_problem = None
        if load_data:
            self._load_data(data_dir)

    def _load_data(self, data_dir) -> None:
        from vaelab.data import load_dataset, pixel_options

        saved = self.config.get("data") or {}
        name = saved.get("dataset")
        if not name:
            self.data_problem = "the run's config.json names no dataset"
            return
        try:
            data = load_dataset(name, data_dir if data_dir is not None else saved.get("data_dir"), progress=False,
                                **pixel_options(saved, name))
        except VaelabError as e:
            self.data_problem = f"the run's dataset {name!r} could not be loaded ({e}); restart with --data-dir DIR"
            return
        if tuple(data.test.sample_shape) != self.input_shape:
            self.data_problem = (f"dataset {name!r} holds samples of shape {tuple(data.test.sample_shape)}, but the "
                                 f"model takes {self.input_shape}")
            return
        self.data = data

    # ---------------------------------------------------------------------------------------- metadata

    @property
    def is_image(self) -> bool:
        return len(self.input_shape) == 3

    @property
    def num_classes(self) -> int | None:
        if self.caps.conditional:
            return int(self.model.config.condition_dim)
        if self.data is not None and self.data.test.y is not None:
            return self.data.test.num_classes
        return None

    def classes(self) -> list[str] | None:
        from vaelab.labels import class_names

        k = self.num_classes
        if k is None:
            return None
        saved = (self.config.get("data") or {}).get("classes")
        known = saved or (self.data.test.classes if self.data is not None else None)
        return class_names(known, k)

    def info(self) -> dict:
        discrete = self.caps.discrete
        return {
            "model": self.model.config.model,
            "run": self.run_dir.resolve().name,
            "input_shape": list(self.input_shape),
            "latent_shape": list(self.latent_shape),
            "latent_dim": int(np.prod(self.latent_shape)),
            "capabilities": {"stochastic": self.caps.stochastic, "conditional": self.caps.conditional,
                             "discrete": discrete, "semi": self.caps.semi_supervised, "samples": self.caps.samples},
            "classes": self.classes(),
            "num_classes": self.num_classes,
            "code_grid": list(self.latent_shape[1:]) if discrete else None,
            "codebook_size": int(self.model.settings.codebook_size) if discrete else None,
            "max_batch": self.max_batch,
            "dataset": (self.config.get("data") or {}).get("dataset"),
            "epochs": self._epochs(),
            "image": self.is_image,
            "test_size": len(self.data.test) if self.data is not None else None,
            "score_kinds": self.score_kinds(),
            "default_score": self.default_score(),
        }

    def _epochs(self) -> int | None:
        rows = self.metrics()["rows"]
        epochs = [r["epoch"] for r in rows if isinstance(r.get("epoch"), int)]
        return max(epochs) if epochs else (self.config.get("train") or {}).get("epochs")

    def metrics(self) -> dict:
        """The rows of the run's metrics.jsonl (read on every call: a run still training grows); non-finite
        numbers become null, which JSON can carry."""
        path = self.run_dir / "metrics.jsonl"
        rows = []
        if path.is_file():
            for line in path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except ValueError:  # a line being written right now
                    continue
                if isinstance(row, dict):
                    rows.append({k: (None if isinstance(v, float) and not math.isfinite(v) else v)
                                 for k, v in row.items()})
        return {"rows": rows}

    def pictures(self) -> dict:
        return {"pictures": sorted(p.name for p in self.run_dir.glob("*.png") if p.is_file())}

    def picture_path(self, name: str) -> Path:
        """The PNG `name` of the run directory; only names that `pictures` lists (never a path elsewhere)."""
        if name not in self.pictures()["pictures"]:
            raise RequestError(f"no picture {name!r} in this run; GET /api/pictures lists them", 404)
        return self.run_dir / name

    # ------------------------------------------------------------------------------------ input checks

    def _array(self, value, what: str, tail: tuple[int, ...], *, ints: bool = False, batch: bool = True,
               low=None, high=None) -> np.ndarray:
        """`value` (nested lists) as a numpy array of shape (B, *tail) (or `tail` with batch=False), finite
        numbers (integers with ints=True, in [low, high) when given)."""
        want = _shape(("B", *tail) if batch else tail)
        limit = f" with 1 <= B <= {self.max_batch}" if batch else ""
        if not isinstance(value, list):
            raise RequestError(f"{what} must be an array of shape {want}{limit}, got {type(value).__name__}")
        try:
            a = np.asarray(value)
        except ValueError:
            raise RequestError(f"{what} is a ragged array (rows of different lengths); expected shape "
                               f"{want}{limit}") from None
        if a.dtype.kind not in ("i", "u", "f") or (ints and a.dtype.kind == "f"):
            kind = "integers" if ints else "numbers"
            got = "booleans" if a.dtype.kind == "b" else f"values of type {a.dtype}"
            raise RequestError(f"{what} must hold {kind} only (got {got}); expected {kind} in an array of shape "
                               f"{want}")
        if a.dtype.kind == "f" and not np.isfinite(a).all():
            bad = int((~np.isfinite(a)).sum())
            raise RequestError(f"{what} holds {bad} non-finite value(s) (NaN or infinity); send finite numbers")
        shape = tuple(a.shape)
        ok = (len(shape) == len(tail) + 1 and shape[1:] == tail and shape[0] >= 1) if batch else shape == tail
        if not ok:
            raise RequestError(f"{what} has shape {_shape(shape)}; expected {want}{limit}")
        if batch and shape[0] > self.max_batch:
            raise RequestError(f"{what} holds {shape[0]} rows; at most {self.max_batch} per request (the server's "
                               "--max-batch): send smaller batches")
        if low is not None and a.size and (a.min() < low or a.max() >= high):
            raise RequestError(f"{what} holds values in [{a.min()}, {a.max()}]; expected integers in "
                               f"[{low}, {high})")
        return a

    def _count(self, value, what: str, low: int, high: int) -> int:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise RequestError(f"{what}={value!r} must be an integer in [{low}, {high}]")
        return value

    def inputs(self, x=None, png=None) -> torch.Tensor:
        """The batch of a request: `x` (B, *input_shape) numbers, or `png` (B base64 PNG images of the input's
        size, images only); float32 (B, *input_shape)."""
        if (x is None) == (png is None):
            want = _shape(("B", *self.input_shape))
            raise RequestError(f"give the inputs as one of \"x\" (an array of shape {want}) or \"png\" (a list of "
                               "base64 PNG images)")
        if x is not None:
            return torch.from_numpy(self._array(x, "x", self.input_shape).astype(np.float32))
        if not self.is_image:
            raise RequestError(f"this model takes rows of {self.input_shape[0]} numbers, not images: send them as "
                               "\"x\"")
        if not isinstance(png, list) or not png or not all(isinstance(p, str) for p in png):
            raise RequestError("png must be a non-empty list of base64-encoded PNG images (strings)")
        if len(png) > self.max_batch:
            raise RequestError(f"png holds {len(png)} images; at most {self.max_batch} per request (the server's "
                               "--max-batch): send smaller batches")
        return torch.from_numpy(np.stack([self._png_image(p, i) for i, p in enumerate(png)]))

    def _png_image(self, text: str, i: int) -> np.ndarray:
        from PIL import Image

        c, h, w = self.input_shape
        try:
            img = Image.open(io.BytesIO(base64.b64decode(text, validate=True)))
            img.load()
        except Exception:  # binascii.Error, PIL's UnidentifiedImageError, truncated files, ...
            raise RequestError(f"png[{i}] is not a base64-encoded PNG image") from None
        if img.size != (w, h):
            raise RequestError(f"png[{i}] is {img.size[0]}x{img.size[1]} pixels; this model takes {w}x{h} images "
                               f"({c} channel{'s' if c > 1 else ''}): resize it first")
        a = np.asarray(img.convert("L" if c == 1 else "RGB"), dtype=np.float32) / 255.0
        return a[None] if c == 1 else a.transpose(2, 0, 1)

    def condition(self, label, n: int, *, optional: bool = False) -> torch.Tensor | None:
        """The condition of n inputs: None, one label for all, or n labels, checked against the model."""
        if label is None:
            if self.caps.conditional and not optional:
                raise RequestError(f"model {self.model.config.model!r} is conditional: give \"label\", a class "
                                   f"index in [0, {self.num_classes}) (one for all rows, or one per row)")
            return None
        if not self.caps.conditional:
            raise RequestError(f"model {self.model.config.model!r} takes no label; drop \"label\" (or send null)")
        k = self.num_classes
        labels = [label] * n if not isinstance(label, list) else label
        if len(labels) != n:
            raise RequestError(f"label holds {len(labels)} labels for {n} rows; give one per row, or a single one")
        for v in labels:
            if isinstance(v, bool) or not isinstance(v, int) or not 0 <= v < k:
                raise RequestError(f"label {v!r} is not a class index; expected integers in [0, {k})")
        return torch.tensor(labels, dtype=torch.long)

    def _need_data(self) -> None:
        if self.data is None:
            raise RequestError(f"this needs the run's test split, which is not available: {self.data_problem}", 409)

    def _test_row(self, index, what: str = "index") -> int:
        self._need_data()
        n = len(self.data.test)
        if isinstance(index, bool) or not isinstance(index, int):
            raise RequestError(f"{what}={index!r} must be an integer row number of the test split, in [0, {n})")
        if not 0 <= index < n:
            raise RequestError(f"{what}={index} is out of range: the test split has rows 0..{n - 1}", 404)
        return index

    def _need_vector_latent(self, what: str) -> None:
        if len(self.latent_shape) != 1:
            raise RequestError(f"{what} needs a vector latent, but this model's latent has shape "
                               f"{_shape(self.latent_shape)}")

    # ---------------------------------------------------------------------------------------- answers

    def encode(self, x=None, png=None, label=None) -> dict:
        xb = self.inputs(x, png)
        cond = self.condition(label, len(xb), optional=self.caps.semi_supervised)
        with self.lock, torch.no_grad():
            post = self.model.encode(xb, cond)
            out = {"mean": post.mean.tolist()}
            if self.caps.stochastic:
                out["logvar"] = post.logvar.tolist()
            if self.caps.discrete:
                out["indices"] = self.model.encode_indices(xb).tolist()
        return out

    def decode(self, z, label=None, format: str = "array") -> dict:
        zb = torch.from_numpy(self._array(z, "z", self.latent_shape).astype(np.float32))
        cond = self.condition(label, len(zb))
        with self.lock, torch.no_grad():
            x = self.model.decode(zb, cond)
        return self._images(x, format)

    def decode_codes(self, indices, format: str = "array") -> dict:
        if not self.caps.discrete:
            raise RequestError(f"model {self.model.config.model!r} has no discrete codes; /api/decode-codes is for "
                               "VQ-VAEs (use /api/decode with \"z\")")
        k = int(self.model.settings.codebook_size)
        idx = torch.from_numpy(self._array(indices, "indices", self.latent_shape[1:], ints=True, low=0,
                                           high=k).astype(np.int64))
        with self.lock, torch.no_grad():
            x = self.model.decode_indices(idx)
        return self._images(x, format)

    def reconstruct(self, x=None, png=None, label=None, format: str = "array") -> dict:
        xb = self.inputs(x, png)
        cond = self.condition(label, len(xb), optional=self.caps.semi_supervised)
        with self.lock, torch.no_grad():
            out = self.model.reconstruct(xb, cond)
        return self._images(out, format)

    def sample(self, n: int, seed: int = 0, label=None, format: str = "array") -> dict:
        from vaelab.generation import prior_samples

        n = self._count(n, "n", 1, self.max_batch)
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2 ** 63:
            raise RequestError(f"seed={seed!r} must be a non-negative integer")
        if not self.caps.samples:
            raise RequestError(f"model {self.model.config.model!r} has no prior to sample from"
                               + ("; run `vaelab train-prior RUN` first" if self.caps.discrete else
                                  " (a plain autoencoder's codes follow no known distribution); serve a VAE"))
        # a VQ-VAE's prior draws code grids (no z to give); a Gaussian prior's z is the draw model.sample makes
        cond = self.condition(label, n)
        with self.lock, torch.no_grad():
            if self.caps.discrete:
                x, z = prior_samples(self.model, n, seed=seed), None
            else:
                gen = torch.Generator().manual_seed(seed)
                z = torch.randn((n, *self.latent_shape), generator=gen)
                x = self.model.decode(z, cond)
        out = self._images(x, format)
        out["z"] = None if z is None else z.tolist()
        return out

    def _latent_of(self, value, index, what: str, label) -> tuple[torch.Tensor, torch.Tensor | None]:
        """A latent point given as an array (`value`) or as a test row (`index`, encoded to its posterior mean
        with its own label), and that row's label (None for a given point)."""
        if isinstance(label, list):
            raise RequestError(f"label={label!r}: give one class index for the whole path (or null)")
        if (value is None) == (index is None):
            raise RequestError(f"give the point as \"{what}\" (an array of shape {_shape(self.latent_shape)}) or as "
                               f"\"index{what[1:]}\" (a row of the test split), not both")
        if value is not None:
            return torch.from_numpy(self._array(value, what, self.latent_shape, batch=False).astype(np.float32)), None
        i = self._test_row(index, "index" + what[1:])
        x = self.data.test.batch(torch.tensor([i]))
        y = self.data.test.labels(torch.tensor([i])) if self.caps.conditional else None
        if self.caps.conditional and y is None:
            raise RequestError("the test split has no labels, which this conditional model encodes with")
        if label is not None:
            y = self.condition(label, 1)
        with self.lock, torch.no_grad():
            return self.model.encode(x, y).mean[0], y

    def interpolate(self, z0=None, z1=None, index0=None, index1=None, steps: int = 10, label=None,
                    format: str = "array") -> dict:
        from vaelab.generation import lerp

        steps = self._count(steps, "steps", 2, self.max_batch)
        a, ya = self._latent_of(z0, index0, "z0", label)
        b, yb = self._latent_of(z1, index1, "z1", label)
        t = torch.linspace(0.0, 1.0, steps)
        z = lerp(a.reshape(1, -1), b.reshape(1, -1), t)[0].reshape(steps, *self.latent_shape)  # (steps, *latent)
        if label is None and ya is not None and yb is not None:
            # two test rows of a conditional model: the condition travels with z, from one row's label to the
            # other's (as vaelab.generation.interpolate does), so both ends are the rows' reconstructions
            cond = lerp(self.model.condition_vector(ya).float(), self.model.condition_vector(yb).float(), t)[0]
        else:
            cond = self.condition(label, steps)
        with self.lock, torch.no_grad():
            x = self.model.decode(z, cond)
        out = self._images(x, format)
        out["z"] = z.tolist()
        return out

    def traverse(self, z=None, index=None, dim: int = 0, values=None, label=None, format: str = "array") -> dict:
        self._need_vector_latent("a traversal")
        d = self.latent_shape[0]
        dim = self._count(dim, "dim", 0, d - 1)
        if values is None:
            values = [float(v) for v in np.linspace(-3.0, 3.0, 11)]
        v = self._array(values, "values", ()).astype(np.float32)  # (V,) the values z[dim] takes
        base, y = self._latent_of(z, index, "z", label)
        zz = base.reshape(1, d).repeat(len(v), 1)
        zz[:, dim] = torch.from_numpy(v)
        cond = None
        if self.caps.conditional:
            cond = self.condition(label, len(v)) if label is not None or y is None else y.expand(len(v))
        with self.lock, torch.no_grad():
            x = self.model.decode(zz, cond)
        out = self._images(x, format)
        out["z"] = zz.tolist()
        return out

    # ------------------------------------------------------------------------------------ anomaly scores

    def score_kinds(self) -> list[str]:
        from vaelab.evaluation.scores import SCORES, score_problems

        if self.caps.conditional:
            return []
        return [k for k in SCORES if not score_problems(self.model.config.model, k)]

    def default_score(self) -> str | None:
        kinds = self.score_kinds()
        return "elbo" if "elbo" in kinds else (kinds[0] if kinds else None)

    def _kind(self, kind) -> str:
        from vaelab.evaluation.scores import SCORES, score_problems

        if self.caps.conditional:
            raise RequestError(f"anomaly scores are for unconditional models; model {self.model.config.model!r} "
                               "needs a label for every row")
        kind = self.default_score() if kind is None else kind
        if not isinstance(kind, str) or kind not in SCORES:
            raise RequestError(f"kind={kind!r} is not an anomaly score; choose one of {self.score_kinds()}")
        problems = score_problems(self.model.config.model, kind)
        if problems:
            raise RequestError(problems[0] + f" (this model's kinds: {self.score_kinds()})")
        return kind

    def _fitted(self, kind: str) -> dict:
        """What score `kind` needs besides the model, fitted once on the run's training rows and cached: the
        codes' statistics ("latent"), their Gaussian mixture ("gmm", "combined"), the standardisation of
        "combined" (on those rows too: a served run has no held-out normal split), the residual variances
        ("zrecon")."""
        from vaelab.evaluation import scores as sc

        if kind not in sc.FITTED:
            return {}
        if "fitted" not in self._cache:
            self._need_data()
            with self.lock:
                self._cache["fitted"] = sc.fit_score_statistics(self.model, self.data.train)
        return self._cache["fitted"]

    def _scores(self, xb: torch.Tensor, kind: str) -> np.ndarray:
        from vaelab.data import ArrayDataset
        from vaelab.evaluation.scores import anomaly_scores

        fitted = self._fitted(kind)
        data = ArrayDataset(xb, scale=1.0, name="request")
        with self.lock:
            return anomaly_scores(self.model, data, (kind,), **fitted)[kind]

    def score(self, x=None, png=None, kind=None) -> dict:
        kind = self._kind(kind)
        return {"score": self._scores(self.inputs(x, png), kind).tolist(), "kind": kind}

    def test_scores(self, kind=None) -> dict:
        """Anomaly scores of the whole test split (cached per kind), with its labels."""
        kind = self._kind(kind)
        self._need_data()
        key = ("scores", kind)
        if key not in self._cache:
            test = self.data.test
            self._cache[key] = self._scores(test.batch(slice(0, len(test))), kind).tolist()
        y = self.data.test.y
        return {"score": self._cache[key], "kind": kind, "labels": None if y is None else y.tolist()}

    # ------------------------------------------------------------------------------------ the test split

    def _test_codes(self) -> np.ndarray:
        from vaelab.generation import encode_dataset

        self._need_data()
        if "codes" not in self._cache:
            with self.lock:
                self._cache["codes"] = encode_dataset(self.model, self.data.test)  # (N, latent_size) float32
        return self._cache["codes"]

    def latent_map(self, n: int = LATENT_MAP_DEFAULT) -> dict:
        """The test split's first n codes (posterior means, flattened) as 2-D points: the codes themselves for a
        latent of 1 or 2 dimensions, else their projection on the first two principal components."""
        self._need_data()
        n = self._count(n, "n", 1, 10 ** 7)
        codes = self._test_codes()[:n]
        d = codes.shape[1]
        if d <= 2:
            mean = np.zeros(d)
            components = np.eye(2, d)  # (2, d): for d = 1 the second row is 0, so y is 0
            points = np.zeros((len(codes), 2), dtype=np.float32)
            points[:, :d] = codes
            kind = "identity"
        else:
            key = ("pca", n)
            if key not in self._cache:
                c = codes.astype(np.float64)
                mean = c.mean(0)
                _, _, vt = np.linalg.svd(c - mean, full_matrices=False)
                # a fixed sign per component (its largest entry positive), so the map does not flip
                vt = vt[:2] * np.sign(vt[:2][np.arange(2), np.abs(vt[:2]).argmax(1)])[:, None]
                self._cache[key] = (mean, vt, (c - mean) @ vt.T)
            mean, components, points = self._cache[key]
            kind = "pca"
        y = self.data.test.y
        return {"points": points.tolist(), "labels": None if y is None else y[:len(codes)].tolist(),
                "indices": list(range(len(codes))),
                "projection": {"kind": kind, "mean": mean.tolist(), "components": components.tolist()}}

    def kl(self) -> dict:
        """Every latent dimension's average KL(q(z_d|x) || N(0, 1)) on the test split, largest first."""
        from vaelab.generation import traversal_order

        if not self.caps.stochastic:
            raise RequestError(f"model {self.model.config.model!r} has no stochastic posterior, so no KL per "
                               "dimension; its dimensions have no informative-first order")
        self._need_vector_latent("the KL per dimension")
        self._need_data()
        if "kl" not in self._cache:
            with self.lock:
                order, kl = traversal_order(self.model, self.data.test)
            self._cache["kl"] = {"dims": order, "kl": [float(kl[d]) for d in order]}
        return self._cache["kl"]

    def test_image_png(self, index) -> bytes:
        if not self.is_image:
            raise RequestError(f"this run's data are rows of {self.input_shape[0]} numbers, not images", 404)
        i = self._test_row(index)
        return png_bytes(self.data.test.batch(torch.tensor([i]))[0])

    # ------------------------------------------------------------------------------------------ output

    def _images(self, x: torch.Tensor, format: str) -> dict:
        if format == "array":
            return {"x": x.tolist()}
        if format == "png":
            if not self.is_image:
                raise RequestError("format 'png' is for image models; this one gives rows of numbers: use 'array'")
            return {"png": [base64.b64encode(png_bytes(img)).decode("ascii") for img in x]}
        raise RequestError(f"format={format!r} is unknown; choose 'array' or 'png'")


def png_bytes(image: torch.Tensor) -> bytes:
    """A PNG file of one image (C, H, W) with values in [0, 1] (1 channel: grayscale, 3: RGB)."""
    from PIL import Image

    a = np.clip(np.rint(image.detach().float().cpu().numpy() * 255.0), 0, 255).astype(np.uint8)
    img = Image.fromarray(a[0], "L") if a.shape[0] == 1 else Image.fromarray(a.transpose(1, 2, 0), "RGB")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()
