"""Training checkpoints: one safetensors file whose tensors are the model weights, the optimizer state (and that of
each auxiliary network's optimizer, models.base.Auxiliary) and the RNG states (with a step checkpoint, also the
epoch's partial metrics), and whose metadata holds the JSON trainer state. Written and verified through vaelab.io
(atomic writes, SHA-256 digests); nothing loads by executing code.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from vaelab.config import FORMAT_VERSION
from vaelab.errors import CheckpointError
from vaelab.io import (CONFIG_FILE, WEIGHTS_FILE, _data_section, atomic_write_bytes, atomic_write_json,  # noqa: F401
                       atomic_write_text, load_state, pack, read_config, unpack)
from vaelab.models.pretrained import save_pretrained  # noqa: F401
from vaelab.models.registry import load_pretrained, model_config_from  # noqa: F401

CHECKPOINT_FILE = "checkpoint.safetensors"
READABLE_CHECKPOINTS = (1, FORMAT_VERSION)  # the checkpoint layout did not change in version 2


# ---------------------------------------------------------------------------------- training checkpoints


def save_checkpoint(path: Path, model, optimizer, trainer_state: dict,
                    extra: dict[str, torch.Tensor] | None = None, *,
                    auxiliary: dict[str, torch.optim.Optimizer] | None = None) -> None:
    """model weights + optimizer state + trainer state (JSON) in one safetensors file, with `extra` tensors
    (RNG states, an epoch's partial sums, ...) stored under their own names, e.g. "rng.torch", and the state of
    each auxiliary network's optimizer (`auxiliary`, by the network's name) under "aux_optim.NAME.*".

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
    meta = {"format_version": FORMAT_VERSION, "trainer": trainer_state,
            "optimizer": _optimizer_entries(optimizer, "optim", tensors)}
    if auxiliary:  # absent for a model without auxiliary networks: its checkpoints stay as they were
        meta["auxiliary_optimizers"] = {name: _optimizer_entries(opt, f"aux_optim.{name}", tensors)
                                        for name, opt in auxiliary.items()}
    for k, v in (extra or {}).items():
        if k.split(".")[0] in _OWN_PREFIXES:
            raise ValueError(f"extra tensor {k!r}: names under {'.*, '.join(_OWN_PREFIXES)}.* are taken")
        tensors[k] = v.detach().contiguous().cpu()
    atomic_write_bytes(path, pack(tensors, {"vaelab": json.dumps(meta)}))


_OWN_PREFIXES = ("model", "buffers", "optim", "aux_optim")


def _optimizer_entries(optimizer, prefix: str, tensors: dict[str, torch.Tensor]) -> dict:
    """The JSON part of an optimizer's state dict; its tensors go into `tensors` as PREFIX.PARAM_ID.KEY."""
    opt = optimizer.state_dict()
    opt_meta = {"param_groups": opt["param_groups"], "state": {}}
    for pid, st in opt["state"].items():
        entry = {}
        for k, v in st.items():
            if torch.is_tensor(v):
                tensors[f"{prefix}.{pid}.{k}"] = v.detach().contiguous().cpu()
                entry[k] = None  # a tensor stored under its key
            else:
                entry[k] = v
        opt_meta["state"][str(pid)] = entry
    return opt_meta


def _like(param, v: torch.Tensor) -> torch.Tensor:
    """A moment buffer in its parameter's memory layout (channels-last conv weights): the fused Adam kernel walks
    parameter and buffers as flat memory, so a contiguous copy would pair the wrong entries."""
    if param is None or v.shape != param.shape:
        return v
    return torch.empty_like(param, dtype=v.dtype).copy_(v)


def load_checkpoint(path: Path, model, optimizer, *,
                    auxiliary: dict[str, torch.optim.Optimizer] | None = None) -> tuple[dict, dict[str, torch.Tensor]]:
    """Restore model (weights and non-persistent buffers), optimizer and the auxiliary networks' optimizers
    (`auxiliary`, by name) in place; returns (trainer_state, extra tensors by name)."""
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
    if meta.get("format_version") not in READABLE_CHECKPOINTS:
        raise CheckpointError(f"{str(path)!r} has format_version={meta.get('format_version')!r}; this vaelab "
                              f"reads versions {list(READABLE_CHECKPOINTS)}")
    load_state(model, {k[6:]: v for k, v in tensors.items() if k.startswith("model.")}, path)
    buffers = dict(model.named_buffers())
    for k, v in tensors.items():  # absent from older checkpoints: then the buffers keep their start values
        name = k[len("buffers."):]
        if k.startswith("buffers.") and name in buffers and buffers[name].shape == v.shape:
            buffers[name].copy_(v)
    _load_optimizer(optimizer, meta["optimizer"], tensors, "optim", path, "optimizer")
    saved_aux = meta.get("auxiliary_optimizers")
    saved_aux = saved_aux if isinstance(saved_aux, dict) else {}
    for name, opt in (auxiliary or {}).items():
        if name not in saved_aux:
            raise CheckpointError(f"{str(path)!r} holds no state of the optimizer of auxiliary network {name!r} "
                                  f"(it has {sorted(saved_aux) or 'none'}); it was not written by a run of this "
                                  "model, so the run cannot continue exactly: start without --resume")
        _load_optimizer(opt, saved_aux[name], tensors, f"aux_optim.{name}", path, f"optimizer of {name!r}")
    extra = {k: v for k, v in tensors.items() if k.split(".")[0] not in _OWN_PREFIXES}
    return meta["trainer"], extra


def _load_optimizer(optimizer, opt_meta: dict, tensors: dict[str, torch.Tensor], prefix: str, path: Path,
                    what: str) -> None:
    """Load the state `_optimizer_entries` wrote (its JSON part `opt_meta`, its tensors under `prefix`)."""
    params = [p for group in optimizer.param_groups for p in group["params"]]  # a state dict's ids, in order
    state = {}
    try:
        for pid, entry in opt_meta["state"].items():
            param = params[int(pid)] if int(pid) < len(params) else None
            state[int(pid)] = {k: (v if v is not None else _like(param, tensors[f"{prefix}.{pid}.{k}"]))
                               for k, v in entry.items()}
        optimizer.load_state_dict({"state": state, "param_groups": opt_meta["param_groups"]})
    except (ValueError, KeyError, TypeError, AttributeError) as e:  # a state of another model, or corrupt
        raise CheckpointError(f"{str(path)!r}: {what} state does not fit this model ({e})") from None
