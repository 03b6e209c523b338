"""Export a trained model for use outside vaelab: its encoder and its decoder as two files each, ONNX
(`encoder.onnx`, `decoder.onnx`, run them with onnxruntime) or torch.export programs (`encoder.pt2`,
`decoder.pt2`, run them with `torch.export.load(path).module()`), with a dynamic batch axis, and `export.json`
describing their inputs, outputs, preprocessing and versions.

    spec = export_run("runs/seed-vae-digits", "runs/seed-vae-digits/export-onnx")       # onnx by default
    spec = export_model(model, "vae-pt2", format="exported-program")
    files = open_export("runs/seed-vae-digits/export-onnx")
    files.encode(x=images)["mean"]; files.decode(z=codes)["x"]                           # numpy in, numpy out

What the files compute comes from the model's interface, never from its name:
- encoder: x (batch, *input_shape) float32, plus `condition` (batch, condition_dim) float32 (one-hot labels or
  condition vectors) for a conditional model. A stochastic model (capabilities.stochastic) gives the mean and
  log-variance of each of its Gaussian posteriors (`posteriors`: "mean"/"logvar" for the latent with the
  N(0, I) prior, "<layer>_mean"/"<layer>_logvar" for others); a discrete one (capabilities.discrete) its code
  indices (`encode_indices`), int64 (batch, *grid); any other its code `z` (`encode(x).mean`).
- decoder: `z` (batch, *latent_shape) float32 or, for a discrete model, `indices` (`decode_indices`), plus the
  condition; gives `x`, the likelihood's mean (`decode`): pixel probabilities in [0, 1] for a Bernoulli model.

The export runs on CPU in fp32 in eval mode. The torch.export program is traced once (its batch axis a
symbolic dimension) and serves both formats. `parity` measures how far the files are from PyTorch on a dataset.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import logging
import os
import shutil
import tempfile
import warnings
from pathlib import Path

import numpy as np
import torch
from torch import nn

from vaelab.errors import ConfigError, VaelabError
from vaelab.io import _umask

FORMATS = ("onnx", "exported-program")
SUFFIX = {"onnx": ".onnx", "exported-program": ".pt2"}
SPEC_FILE = "export.json"
BATCH = "batch"  # the name of the dynamic batch axis in export.json and in the ONNX files
# the example batch the programs are traced with: torch.export specializes sizes 0 and 1, so at least 2
EXAMPLE_BATCH = 2
EXTRA = 'pip install "vaelab[export]"'


# ============================================================================================ the modules


class _Encoder(nn.Module):
    """x (and a condition) -> the encoder's outputs, in the order of `encoder_outputs(model)`."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, x: torch.Tensor, condition: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        m = self.model
        if m.capabilities.discrete:
            return (m.encode_indices(x),)  # (B, *grid) int64
        if m.capabilities.stochastic:
            out = []
            for post in m.posteriors(x, condition).values():  # (B, *latent) each
                out += [post.mean, post.logvar]
            return tuple(out)
        return (m.encode(x, condition).mean,)


class _Decoder(nn.Module):
    """The latent (and a condition) -> the likelihood's mean, shaped like x."""

    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, latent: torch.Tensor, condition: torch.Tensor | None = None) -> torch.Tensor:
        m = self.model
        if m.capabilities.discrete:
            return m.decode_indices(latent)
        return m.decode(latent, condition)


def encoder_outputs(model) -> list[tuple[str, str]]:
    """(name, meaning) of each encoder output of `model`, in the order the encoder file gives them."""
    if model.capabilities.discrete:
        return [("indices", ("the code indices of each sample: which codebook entry each position of the code grid "
                             "is quantized to (the model's settings give the codebook's size); the decoder takes "
                             "them"))]
    if not model.capabilities.stochastic:
        return [("z", "the code (deterministic encoder); the decoder takes it")]
    x = torch.zeros(EXAMPLE_BATCH, *model.config.input_shape)
    out = []
    with torch.no_grad():
        names = list(model.posteriors(x, _example_condition(model)))
    for layer in names:
        prefix, which = (f"{layer}_", f"of the model's {layer!r} stochastic layer") if layer else \
            ("", "of the latent z, whose prior is N(0, I); the mean is the code the decoder takes")
        out += [(f"{prefix}mean", f"the mean of the Gaussian posterior q(z|x) {which}"),
                (f"{prefix}logvar", ("the log-variance of that posterior: a sample is mean + exp(logvar / 2) * eps, "
                                     "eps ~ N(0, I)"))]
    return out


def _example_condition(model) -> torch.Tensor | None:
    if not model.capabilities.conditional:
        return None
    k = model.config.condition_dim
    return torch.eye(k)[torch.arange(EXAMPLE_BATCH) % k]  # one-hot rows (B, K)


# ============================================================================================ exporting


def export_run(run, out=None, format: str = "onnx", *, trust_code: bool = False, data=None,
               batch_size: int = 256) -> dict:
    """Export the final model of run directory `run` into folder `out` (default RUN/export-FORMAT); returns the
    spec written to out/export.json. `data`: a dataset (an ArrayDataset, e.g. the run's test split) whose pixel
    scale is recorded and on which the files are checked against PyTorch (spec["parity"])."""
    from vaelab.io import read_config
    from vaelab.models import from_pretrained

    path = Path(run)
    if not path.is_dir():
        what = "is a file, not a run directory" if path.exists() else "does not exist"
        raise VaelabError(f"run directory {str(run)!r} {what}; give the --out directory of a `vaelab train` run")
    out = Path(out) if out is not None else path / f"export-{format}"
    check_export(out, format)
    cfg = read_config(path)
    model = from_pretrained(path, trust_code=trust_code)
    return export_model(model, out, format, data=data, batch_size=batch_size, run_config=cfg, run=str(path))


def export_model(model, out, format: str = "onnx", *, data=None, batch_size: int = 256,
                 run_config: dict | None = None, run: str | None = None) -> dict:
    """Export `model` (any registered model; a copy is exported on CPU, fp32, in eval mode) into folder `out` as
    FORMAT ("onnx" or "exported-program"); returns the spec written to out/export.json. The folder appears whole
    or not at all: the files are written into a temporary folder beside it, renamed at the end. An existing
    `out` is replaced only when it holds an earlier export (its export.json) or nothing."""
    out = Path(out)
    check_export(out, format)
    model = copy.deepcopy(model).to("cpu", torch.float32).eval()
    name = model.config.model
    x = torch.rand(EXAMPLE_BATCH, *model.config.input_shape)
    cond = _example_condition(model)
    enc, dec = _Encoder(model).eval(), _Decoder(model).eval()
    with torch.no_grad():
        latent = enc(x, cond)[0]  # what the decoder takes: the posterior mean, the code or the indices
    enc_names = [n for n, _ in encoder_outputs(model)]
    lat_name = "indices" if model.capabilities.discrete else "z"
    enc_in, dec_in = ("x", x), (lat_name, latent)
    extra = [("condition", cond)] if cond is not None else []

    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent))
    try:
        os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it 0700: give the export a folder's usual permissions
        written = {}
        for part, module, inputs, outputs in (("encoder", enc, [enc_in, *extra], enc_names),
                                              ("decoder", dec, [dec_in, *extra], ["x"])):
            program = _trace(module, inputs, name, part)
            file = tmp / f"{part}{SUFFIX[format]}"
            if format == "onnx":
                written[part] = _write_onnx(program, inputs, outputs, file, name, part)
            else:
                with _quiet():  # it warns about the weight groups of a CPU program
                    torch.export.save(program, file)
                written[part] = {}
        spec = _spec(model, format, written, run_config, run, data)
        (tmp / SPEC_FILE).write_text(json.dumps(spec, indent=2) + "\n")
        if data is not None:
            spec["parity"] = parity(model, tmp, data, batch_size)
            (tmp / SPEC_FILE).write_text(json.dumps(spec, indent=2) + "\n")
        _replace(tmp, out)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return spec


def check_export(out, format: str) -> None:
    """Refuse, before any work, an unknown format, ONNX without the export extra, and an output that is a file or
    a folder of other files."""
    _check_format(format)
    if format == "onnx":
        _need_onnx()
    _check_out(Path(out))


def _check_format(format: str) -> None:
    if format not in FORMATS:
        raise ConfigError(f"unknown export format {format!r}; expected one of {', '.join(FORMATS)}",
                          context="export")


def _need_onnx() -> None:
    missing = []
    for module in ("onnx", "onnxscript"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise ConfigError(f"--format onnx needs the packages onnx and onnxscript (missing here: "
                          f"{', '.join(missing)}); install the export extra: {EXTRA} (or use --format "
                          "exported-program, which needs torch only)", context="export")


def _check_out(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise ConfigError(f"output {str(out)!r} is a file, not a folder; give --out a folder (new or holding an "
                          "earlier export) to write the files into", context="export")
    if out.is_dir() and any(out.iterdir()) and not (out / SPEC_FILE).is_file():
        raise ConfigError(f"output folder {str(out)!r} holds files that are not an export (no {SPEC_FILE}); give "
                          "--out a new or empty folder, or one holding an earlier export (replaced)", context="export")


def _replace(tmp: Path, out: Path) -> None:
    """Move the finished folder `tmp` to `out`, replacing an earlier export there."""
    old = None
    if out.exists():
        old = Path(tempfile.mkdtemp(prefix=f".{out.name}.", suffix=".old", dir=out.parent))
        os.replace(out, old / out.name)
    os.replace(tmp, out)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _trace(module: nn.Module, inputs: list[tuple[str, torch.Tensor]], name: str, part: str):
    """The torch.export program of `module` at the example `inputs`, every input's first axis a dynamic batch.

    Why torch.export (which the dynamo ONNX exporter converts): it proves the batch axis symbolic or fails
    loudly, where the TorchScript exporter traces one concrete batch and only renames the axis (a reshape that
    read x.shape[0] is silently baked in). Non-strict tracing runs the model's Python as is; strict (Dynamo)
    also keeps `len(x)` symbolic (the M2's encoder uses it), so it is the fallback."""
    batch = torch.export.Dim(BATCH, min=1)
    shapes = tuple({0: batch} for _ in inputs)  # positional: the file's input names are set at conversion
    args = tuple(t for _, t in inputs)
    problems = []
    for strict in (False, True):
        try:
            with _quiet():
                return torch.export.export(module, args, dynamic_shapes=shapes, strict=strict)
        except Exception as e:  # torch.export raises many kinds; the user gets them as one ConfigError
            problems.append(f"{'strict' if strict else 'non-strict'} torch.export: {type(e).__name__}: "
                            f"{_first_line(e)}")
    raise ConfigError(
        [f"model {name!r} cannot be exported: its {part} does not trace as a program of a dynamic batch size"]
        + problems + ["supported: models whose encode and decode are tensor functions of the input (and of a "
                      "condition vector), without Python control flow on tensor values or sizes: every model "
                      "`vaelab models` lists, with vaelab's networks or networks of your own written that way"],
        context="export")


def _first_line(e: Exception) -> str:
    text = str(e).strip().splitlines()
    return text[0][:300] if text else ""


class _quiet:
    """Silence the exporters' progress lines and warnings (torchvision operators skipped, deprecations)."""

    def __enter__(self):
        self._warnings = warnings.catch_warnings()
        self._warnings.__enter__()
        warnings.simplefilter("ignore")
        self._loggers = [(lg, lg.level) for lg in (logging.getLogger("torch.onnx"), logging.getLogger("torch.export"),
                                                   logging.getLogger("torch._dynamo"))]
        for lg, _ in self._loggers:
            lg.setLevel(logging.ERROR)
        return self

    def __exit__(self, *exc):
        for lg, level in self._loggers:
            lg.setLevel(level)
        self._warnings.__exit__(*exc)
        return False


def _write_onnx(program, inputs, outputs: list[str], file: Path, name: str, part: str) -> dict:
    """Convert the torch.export `program` to ONNX at `file` (one self-contained file), its batch axis named
    BATCH; returns {"opset": N}."""
    try:
        with _quiet():
            onnx_program = torch.onnx.export(program, tuple(t for _, t in inputs), dynamo=True, verbose=False,
                                             input_names=[n for n, _ in inputs], output_names=outputs,
                                             external_data=False, optimize=True)
    except Exception as e:
        raise ConfigError(f"model {name!r} cannot be exported to ONNX: converting its {part} failed "
                          f"({type(e).__name__}: {_first_line(e)}); try --format exported-program", context="export")
    proto = onnx_program.model_proto
    symbol = proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param
    for value in [*proto.graph.input, *proto.graph.output, *proto.graph.value_info]:
        for dim in value.type.tensor_type.shape.dim:
            if symbol and dim.dim_param == symbol:
                dim.dim_param = BATCH
    file.write_bytes(proto.SerializeToString())
    opset = next(o.version for o in proto.opset_import if o.domain in ("", "ai.onnx"))
    return {"opset": int(opset)}


# ============================================================================================ export.json


def _dtype(t: torch.Tensor) -> str:
    return str(t.dtype).removeprefix("torch.")


def _spec(model, format: str, written: dict, run_config: dict | None, run: str | None, data) -> dict:
    import vaelab

    config = model.config
    x = torch.rand(EXAMPLE_BATCH, *config.input_shape)
    cond = _example_condition(model)
    with torch.no_grad():
        encoded = _Encoder(model)(x, cond)
        decoded = _Decoder(model)(encoded[0], cond)
    saved = run_config or {}
    cond_spec = []
    if cond is not None:
        from vaelab.labels import class_names

        classes = class_names((saved.get("data") or {}).get("classes"), config.condition_dim)
        cond_spec = [{"name": "condition", "dtype": "float32", "shape": [BATCH, config.condition_dim],
                      "meaning": "the condition of each sample: a one-hot class label (row y of the identity "
                                 f"matrix, np.eye({config.condition_dim})[y]) or a condition vector",
                      "classes": classes}]

    def io(name, t, meaning):
        return {"name": name, "dtype": _dtype(t), "shape": [BATCH, *t.shape[1:]], "meaning": meaning}

    latent_name = "indices" if model.capabilities.discrete else "z"
    likelihood = config.likelihood
    mean = model.likelihood.mean_meaning
    versions = {"vaelab": vaelab.__version__, "torch": torch.__version__}
    if format == "onnx":
        import onnx
        import onnxscript

        versions.update(onnx=onnx.__version__, onnxscript=onnxscript.__version__, opset=written["encoder"]["opset"])
    return {
        "format": format,
        "model": {"name": config.model, "preset": saved.get("preset"), "run": run,
                  "capabilities": dataclasses.asdict(model.capabilities), "likelihood": likelihood,
                  "input_shape": list(config.input_shape), "latent_shape": list(model.latent_shape),
                  "condition_dim": config.condition_dim, "settings": model.settings.to_dict()},
        "preprocessing": _preprocessing(model, saved, data),
        "encoder": {"file": f"encoder{SUFFIX[format]}",
                    "inputs": [io("x", x, "the input samples, preprocessed as `preprocessing` says"), *cond_spec],
                    "outputs": [io(n, t, meaning) for (n, meaning), t in zip(encoder_outputs(model), encoded)]},
        "decoder": {"file": f"decoder{SUFFIX[format]}",
                    "inputs": [io(latent_name, encoded[0], f"the encoder's {latent_name!r} output, or any value "
                                  "of that shape" + (" drawn from the prior N(0, I) to generate"
                                                     if model.capabilities.stochastic else "")), *cond_spec],
                    "outputs": [io("x", decoded, f"the reconstruction, shaped like the input: {mean}")]},
        "not_exported": "sampling: the files are deterministic (draw z = mean + exp(logvar / 2) * eps, or z from "
                        "the prior, yourself); a VQ-VAE's code prior (`vaelab train-prior`) stays in the run",
        "versions": versions,
    }


def _preprocessing(model, saved: dict, data) -> dict:
    shape = list(model.config.input_shape)
    scale = getattr(data, "scale", None)
    binarized = bool((saved.get("data") or {}).get("binarize") or (saved.get("train") or {}).get("binarize"))
    out = {"dtype": "float32", "dataset": (saved.get("data") or {}).get("dataset")}
    if len(shape) == 3:
        c, h, w = shape
        out.update(layout="NCHW", channels=c, height=h, width=w, value_range=[0.0, 1.0],
                   how="pixels divided by `pixel_scale`, channels first: x = pixels.astype(np.float32) / "
                       "pixel_scale, shape (batch, channels, height, width)",
                   pixel_scale=scale)
        if scale is None:
            out["how"] += " (pixel_scale: 255 for 8-bit images; the run's data was not read)"
    else:
        out.update(layout="(batch, features)", features=shape[0], value_range=None,
                   how="the feature values as the training data held them (vaelab train feeds tabular data "
                       "unscaled)")
    if binarized:
        out["binarized"] = "trained on pixels binarized at random with probability x; feed x in [0, 1] as above"
    return out


# ============================================================================================ using the files


class ExportedFiles:
    """The files of an export folder, runnable: `encode(**inputs)` and `decode(**inputs)` take numpy arrays by
    the input names of export.json and return {output name: numpy array}. ONNX files run in onnxruntime (CPU),
    exported programs through torch.export.load."""

    def __init__(self, directory):
        directory = Path(directory)
        path = directory / SPEC_FILE
        if not path.is_file():
            raise VaelabError(f"{str(directory)!r} holds no {SPEC_FILE}; give a folder written by `vaelab export`")
        self.spec = json.loads(path.read_text())
        self.format = self.spec["format"]
        self._parts = {part: self._load(directory / self.spec[part]["file"]) for part in ("encoder", "decoder")}

    def _load(self, file: Path):
        if self.format == "onnx":
            try:
                import onnxruntime
            except ImportError:
                raise ConfigError(f"running ONNX files needs onnxruntime; {EXTRA}", context="export") from None
            return onnxruntime.InferenceSession(str(file), providers=["CPUExecutionProvider"])
        with _quiet():  # torch.export.load warns about the weight groups of a CPU program
            return torch.export.load(str(file)).module()

    def _run(self, part: str, inputs: dict) -> dict[str, np.ndarray]:
        spec = self.spec[part]
        names = [i["name"] for i in spec["inputs"]]
        if sorted(inputs) != sorted(names):
            raise VaelabError(f"the {part} takes inputs {names}, got {sorted(inputs)}")
        outs = [o["name"] for o in spec["outputs"]]
        if self.format == "onnx":
            return dict(zip(outs, self._parts[part].run(outs, {n: np.asarray(inputs[n]) for n in names})))
        with torch.no_grad():
            got = self._parts[part](*(torch.as_tensor(np.asarray(inputs[n])) for n in names))
        got = got if isinstance(got, (tuple, list)) else (got,)
        return {n: t.numpy() for n, t in zip(outs, got)}

    def encode(self, **inputs) -> dict[str, np.ndarray]:
        return self._run("encoder", inputs)

    def decode(self, **inputs) -> dict[str, np.ndarray]:
        return self._run("decoder", inputs)


def open_export(directory) -> ExportedFiles:
    """The encoder and decoder files of an export folder, ready to run (see ExportedFiles)."""
    return ExportedFiles(directory)


def parity(model, directory, data, batch_size: int = 256) -> dict:
    """How far the exported files in `directory` are from `model` in PyTorch (CPU, fp32) on every sample of
    `data` (an ArrayDataset; a conditional model takes its labels as one-hot conditions), in batches of
    `batch_size`: the largest absolute difference of each float output, the number of differing entries of each
    integer one. The decoder is fed PyTorch's own latents, so its figures are the decoder's alone."""
    if batch_size < 1:
        raise VaelabError(f"batch_size must be a positive integer, got {batch_size}")
    model = copy.deepcopy(model).to("cpu", torch.float32).eval()
    files = open_export(directory)
    enc, dec = _Encoder(model), _Decoder(model)
    conditional = model.capabilities.conditional
    if conditional and data.y is None:
        raise VaelabError(f"model {model.config.model!r} is conditional, but the data to check it on has no labels")
    worst: dict[str, dict[str, float]] = {"encoder": {}, "decoder": {}}
    latent_name = files.spec["decoder"]["inputs"][0]["name"]
    for start in range(0, len(data), batch_size):
        idx = slice(start, min(start + batch_size, len(data)))
        x = data.batch(idx)
        cond = None
        if conditional:
            cond = torch.eye(model.config.condition_dim)[data.y[idx]]
        extra = {} if cond is None else {"condition": cond.numpy()}
        with torch.no_grad():
            ref_enc = enc(x, cond)
            ref_dec = dec(ref_enc[0], cond)
        got_enc = files.encode(x=x.numpy(), **extra)
        got_dec = files.decode(**{latent_name: ref_enc[0].numpy()}, **extra)
        for part, ref, got in (("encoder", ref_enc, got_enc), ("decoder", (ref_dec,), got_dec)):
            for (name, value), r in zip(got.items(), ref):
                r = r.numpy()
                d = float((value != r).sum()) if r.dtype.kind in "iu" else float(np.abs(value - r).max(initial=0))
                worst[part][name] = max(worst[part].get(name, 0.0), d)
    return {"samples": len(data), "batch_size": batch_size,
            "note": "largest |exported - PyTorch| per float output; differing entries per integer output",
            **worst}
