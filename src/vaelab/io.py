"""Saving and loading without executing code: safetensors for tensors, JSON for everything else.

A pretrained directory (and every run directory) holds `config.json` ({"format_version", "model": {...}})
and `model.safetensors`. SHA-256 digests of the data and of the header make any bit flip an error on load.
Every write goes to a temporary file in the same directory, is fsynced, then renamed over the old file, so a
crash or a full disk leaves the previous file intact. This module is at the bottom of the house: it knows no
model (models/pretrained.py builds models from these files; training/checkpoint.py adds training state).
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

from vaelab.config import FORMAT_VERSION
from vaelab.errors import CheckpointError, VaelabError

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"


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
    if version not in READABLE_VERSIONS:
        raise CheckpointError(f"{str(path)!r} has format_version={version!r}, but this vaelab reads versions "
                              f"{list(READABLE_VERSIONS)}; use the vaelab version that wrote it, or retrain")
    return migrate(cfg)


READABLE_VERSIONS = (1, FORMAT_VERSION)
# the fields every model shares (ModelConfig's own); in version 1 the model's own settings sat beside them
_COMMON_MODEL_KEYS = ("model", "arch", "input_shape", "latent_dim", "channels", "hidden", "likelihood",
                      "gaussian_sigma", "mixtures", "logvar_min", "logvar_max", "condition_dim")


def migrate(cfg: dict) -> dict:
    """A config.json of any readable version in the current layout (a copy; the file is not rewritten).

    Version 1 kept every model's settings flat in "model", those of other models too (at their defaults); they
    move into "model"."settings" and the model keeps those its Settings declare (models/pretrained.py), as
    "v1_settings" marks."""
    if cfg.get("format_version") == FORMAT_VERSION or not isinstance(cfg.get("model"), dict):
        return cfg
    model = dict(cfg["model"])
    settings = {k: model.pop(k) for k in list(model) if k not in _COMMON_MODEL_KEYS}
    return {**cfg, "format_version": FORMAT_VERSION, "model": {**model, "settings": settings, "v1_settings": True}}





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
