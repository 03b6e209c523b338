"""Saving and loading without executing code: safetensors for tensors, JSON for everything else.

A pretrained directory (and every run directory) holds `config.json` ({"format_version", "model": {...}})
and `model.safetensors`. A training checkpoint is one safetensors file whose tensors are the model weights,
the optimizer state and the RNG states (with a step checkpoint, also the epoch's partial metrics), and whose
metadata holds the JSON trainer state. SHA-256 digests of the data and of the header make any bit flip an
error on load. Every write goes to a temporary file in the same directory, is fsynced, then renamed over the
old file, so a crash or a full disk leaves the previous file intact.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from vaelab.config import FORMAT_VERSION, ModelConfig
from vaelab.errors import CheckpointError, ConfigError, VaelabError

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
CHECKPOINT_FILE = "checkpoint.safetensors"


# ------------------------------------------------------------------------------------------ atomic I/O


def atomic_write_bytes(path: str | os.PathLike, data: bytes) -> None:
    """Write `data` to `path` so that readers see the old file or the whole new one, never half of it."""
    path = Path(path)
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    except OSError as e:
        raise VaelabError(f"cannot write {str(path)!r}: {e.strerror or e}; check that the output directory "
                          "exists, is writable and has free space") from None
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp creates 0600; give the file the usual permissions
        os.replace(tmp, path)
    except OSError as e:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise VaelabError(f"cannot write {str(path)!r}: {e.strerror or e} (the previous version, if any, is "
                          "intact); free disk space or choose another output directory") from None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_text(path: str | os.PathLike, text: str) -> None:
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | os.PathLike, obj) -> None:
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


# ------------------------------------------------------------------------------- verified safetensors


def pack(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> bytes:
    """safetensors bytes whose metadata carries two SHA-256 digests: "sha256" of the data section (the
    tensors' bytes) and "header_sha256" of the header (tensor names, dtypes, shapes, offsets and the other
    metadata, such as a checkpoint's trainer state), so that a bit flip anywhere is detected on load."""
    if set(metadata or {}) - {"vaelab"}:
        raise ValueError(f"metadata keys {sorted(metadata)}: vaelab files carry 'vaelab' (and the digests)")
    plain = st_save(tensors, metadata=metadata)
    digests = {"sha256": hashlib.sha256(_data_section(plain)).hexdigest(),
               "header_sha256": _header_digest(_header(plain))}
    return st_save(tensors, metadata={**(metadata or {}), **digests})


def _header(blob: bytes) -> dict:
    (n,) = struct.unpack("<Q", blob[:8])
    return json.loads(blob[8:8 + n])


def _data_section(blob: bytes) -> bytes:
    (n,) = struct.unpack("<Q", blob[:8])
    return blob[8 + n:]


def _header_digest(header: dict) -> str:
    """SHA-256 of the header in a canonical form, without the digests themselves."""
    meta = {k: v for k, v in (header.get("__metadata__") or {}).items() if k not in ("sha256", "header_sha256")}
    canonical = {**header, "__metadata__": meta}
    return hashlib.sha256(json.dumps(canonical, sort_keys=True, separators=(",", ":")).encode()).hexdigest()


def unpack(path: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """Read and verify a file written by `pack`: (tensors, metadata)."""
    if not path.is_file():
        raise CheckpointError(f"{str(path)!r} not found; the run has no saved weights yet (did training finish? "
                              "a run in progress keeps its latest state in checkpoint.safetensors)")
    blob = path.read_bytes()
    try:
        tensors = st_load(blob)
        header = _header(blob)
        metadata = header.get("__metadata__") or {}
    except (SafetensorError, ValueError, OSError, RuntimeError, struct.error, AttributeError) as e:
        raise CheckpointError(f"{str(path)!r} is not a readable safetensors file ({e}); it is truncated or "
                              "corrupt: restore it or retrain") from None
    expected = metadata.get("sha256")
    if expected is None:
        raise CheckpointError(f"{str(path)!r} carries no checksum; it was not written by vaelab")
    unknown = sorted(set(metadata) - {"sha256", "header_sha256", "vaelab"})
    if unknown:  # e.g. a digest's name with a flipped bit, which would otherwise skip its check
        raise CheckpointError(f"{str(path)!r} has unexpected metadata {unknown[:3]}; it changed after it was "
                              "written or was not written by vaelab: restore it or retrain")
    if hashlib.sha256(_data_section(blob)).hexdigest() != expected:
        raise CheckpointError(f"{str(path)!r} fails its SHA-256 check: the tensor data changed after it was "
                              "written (a bit flip or a partial copy); restore it or retrain")
    # files written before the header got its digest carry none: their header is checked by its parse alone
    if "header_sha256" in metadata and _header_digest(header) != metadata["header_sha256"]:
        raise CheckpointError(f"{str(path)!r} fails its SHA-256 check: its header (tensor names, shapes or "
                              "saved state) changed after it was written (a bit flip); restore it or retrain")
    return tensors, metadata


# ------------------------------------------------------------------------------------ pretrained models


def save_pretrained(model, directory: str | os.PathLike, extra: dict | None = None) -> None:
    directory = Path(directory)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    atomic_write_bytes(directory / WEIGHTS_FILE, pack(state))
    config_path = directory / CONFIG_FILE
    cfg = read_config(directory) if config_path.is_file() else {}
    cfg.update({"format_version": FORMAT_VERSION, "model": model.config.to_dict()})
    if extra:
        cfg.update(extra)
    atomic_write_json(config_path, cfg)


def read_config(directory: str | os.PathLike) -> dict:
    path = Path(directory) / CONFIG_FILE
    if not path.is_file():
        raise CheckpointError(f"{str(path)!r} not found: {str(directory)!r} is not a vaelab run or pretrained "
                              "directory (train one with `vaelab train --out DIR`)")
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{str(path)!r} is not valid JSON ({e}); the file is corrupt") from None
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{str(path)!r} must hold a JSON object, got {type(cfg).__name__}")
    version = cfg.get("format_version")
    if version != FORMAT_VERSION:
        raise CheckpointError(f"{str(path)!r} has format_version={version!r}, but this vaelab reads version "
                              f"{FORMAT_VERSION}; use the vaelab version that wrote it, or retrain")
    return cfg


def model_config_from(cfg: dict, where: str) -> ModelConfig:
    try:
        mc = ModelConfig.from_dict(dict(cfg["model"]))
        mc.validate()
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"{where}: no valid 'model' section ({e})") from None
    except ConfigError as e:
        raise CheckpointError(f"{where}: {e}") from None
    if mc.input_shape is None:
        raise CheckpointError(f"{where}: the model config has no input_shape")
    return mc


def load_pretrained(directory: str | os.PathLike):
    from vaelab.models import MODELS

    directory = Path(directory)
    mc = model_config_from(read_config(directory), str(directory / CONFIG_FILE))
    model = MODELS[mc.model].cls(mc)
    state, _ = unpack(directory / WEIGHTS_FILE)
    load_state(model, state, directory / WEIGHTS_FILE)
    model.eval()
    return model


def load_state(model: torch.nn.Module, state: dict[str, torch.Tensor], where) -> None:
    expected = model.state_dict()
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    wrong = [f"{k}: file {tuple(state[k].shape)} vs model {tuple(v.shape)}"
             for k, v in expected.items() if k in state and state[k].shape != v.shape]
    if missing or unexpected or wrong:
        parts = []
        if missing:
            parts.append(f"missing tensors {missing[:5]}")
        if unexpected:
            parts.append(f"unexpected tensors {unexpected[:5]}")
        if wrong:
            parts.append("shape mismatches " + "; ".join(wrong[:5]))
        raise CheckpointError(f"{str(where)!r} does not match its model config: " + ", ".join(parts)
                              + "; the weights belong to another model or config")
    bad = [k for k, v in state.items() if v.is_floating_point() and not torch.isfinite(v).all()]
    if bad:
        raise CheckpointError(f"{str(where)!r} holds non-finite values in {bad[:5]}; the file is corrupt")
    model.load_state_dict(state)


# ---------------------------------------------------------------------------------- training checkpoints


def save_checkpoint(path: Path, model, optimizer, trainer_state: dict,
                    extra: dict[str, torch.Tensor] | None = None) -> None:
    """model weights + optimizer state + trainer state (JSON) in one safetensors file, with `extra` tensors
    (RNG states, an epoch's partial sums, ...) stored under their own names, e.g. "rng.torch".

    The model's non-persistent buffers are saved too ("buffers.NAME"): state a model keeps for itself across
    training steps but not in its weights (a VQ-VAE's code counts of the running epoch), so that a run resumed
    inside an epoch reports what an uninterrupted one would."""
    tensors: dict[str, torch.Tensor] = {}
    state = model.state_dict()
    for k, v in state.items():
        tensors["model." + k] = v.detach().contiguous().cpu()
    for k, v in model.named_buffers():
        if k not in state:
            tensors["buffers." + k] = v.detach().contiguous().cpu()
    opt = optimizer.state_dict()
    opt_meta = {"param_groups": opt["param_groups"], "state": {}}
    for pid, st in opt["state"].items():
        entry = {}
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"optim.{pid}.{k}"] = v.detach().contiguous().cpu()
                entry[k] = None  # a tensor stored under its key
            else:
                entry[k] = v
        opt_meta["state"][str(pid)] = entry
    for k, v in (extra or {}).items():
        if k.split(".")[0] in _OWN_PREFIXES:
            raise ValueError(f"extra tensor {k!r}: names under {'.*, '.join(_OWN_PREFIXES)}.* are taken")
        tensors[k] = v.detach().contiguous().cpu()
    meta = {"format_version": FORMAT_VERSION, "trainer": trainer_state, "optimizer": opt_meta}
    atomic_write_bytes(path, pack(tensors, {"vaelab": json.dumps(meta)}))


_OWN_PREFIXES = ("model", "buffers", "optim")


def _like(param, v: torch.Tensor) -> torch.Tensor:
    """A moment buffer in its parameter's memory layout (channels-last conv weights): the fused Adam kernel walks
    parameter and buffers as flat memory, so a contiguous copy would pair the wrong entries."""
    if param is None or v.shape != param.shape:
        return v
    return torch.empty_like(param, dtype=v.dtype).copy_(v)


def load_checkpoint(path: Path, model, optimizer) -> tuple[dict, dict[str, torch.Tensor]]:
    """Restore model (weights and non-persistent buffers) and optimizer in place; returns (trainer_state,
    extra tensors by name)."""
    if not path.is_file():
        raise CheckpointError(f"cannot resume: {str(path)!r} not found (the run wrote no checkpoint yet); "
                              "start without --resume")
    tensors, metadata = unpack(path)
    try:
        meta = json.loads(metadata["vaelab"])
        if not (isinstance(meta, dict) and isinstance(meta.get("trainer"), dict)
                and isinstance(meta.get("optimizer"), dict)):
            raise ValueError("expected an object with 'trainer' and 'optimizer'")
    except (KeyError, ValueError) as e:  # json.JSONDecodeError is a ValueError
        raise CheckpointError(f"{str(path)!r} has no valid vaelab metadata ({e}); it is not a vaelab "
                              "checkpoint or it is corrupt") from None
    if meta.get("format_version") != FORMAT_VERSION:
        raise CheckpointError(f"{str(path)!r} has format_version={meta.get('format_version')!r}; this vaelab "
                              f"reads version {FORMAT_VERSION}")
    load_state(model, {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, path)
    buffers = dict(model.named_buffers())
    for k, v in tensors.items():  # absent from older checkpoints: then the buffers keep their start values
        name = k[len("buffers."):]
        if k.startswith("buffers.") and name in buffers and buffers[name].shape == v.shape:
            buffers[name].copy_(v)
    opt_meta = meta["optimizer"]
    params = [p for group in optimizer.param_groups for p in group["params"]]  # a state dict's ids, in order
    state = {}
    for pid, entry in opt_meta["state"].items():
        param = params[int(pid)] if int(pid) < len(params) else None
        state[int(pid)] = {k: (v if v is not None else _like(param, tensors[f"optim.{pid}.{k}"]))
                           for k, v in entry.items()}
    try:
        optimizer.load_state_dict({"state": state, "param_groups": opt_meta["param_groups"]})
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"{str(path)!r}: optimizer state does not fit this model ({e})") from None
    extra = {k: v for k, v in tensors.items() if k.split(".")[0] not in _OWN_PREFIXES}
    return meta["trainer"], extra
