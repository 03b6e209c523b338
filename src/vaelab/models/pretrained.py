"""Pretrained directories: config.json + model.safetensors, written and read without executing code.

`load_pretrained` migrates a config.json written by an older vaelab (its `format_version`) before it builds
the model, so run directories of earlier releases keep loading.
"""

from __future__ import annotations

import os
from pathlib import Path

from vaelab.config import FORMAT_VERSION, ModelConfig
from vaelab.errors import CheckpointError, ConfigError
from vaelab.io import (CONFIG_FILE, WEIGHTS_FILE, atomic_write_bytes, atomic_write_json, load_state, pack,
                       read_config, unpack)


def save_pretrained(model, directory: str | os.PathLike, extra: dict | None = None) -> None:
    """Write the model's config.json (keeping other sections already there) and model.safetensors."""
    directory = Path(directory)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    atomic_write_bytes(directory / WEIGHTS_FILE, pack(state))
    config_path = directory / CONFIG_FILE
    cfg = read_config(directory) if config_path.is_file() else {}
    cfg.update({"format_version": FORMAT_VERSION, "model": model.config.to_dict()})
    if extra:
        cfg.update(extra)
    atomic_write_json(config_path, cfg)


def model_config_from(cfg: dict, where: str) -> ModelConfig:
    """The validated ModelConfig of a config.json's "model" section (read_config has migrated it)."""
    try:
        section = dict(cfg["model"])
        if section.pop("v1_settings", False):  # a version-1 file: keep the settings its model declares
            section["settings"] = _own_settings(section["model"], section.get("settings") or {})
        mc = ModelConfig.from_dict(section)
        mc.validate()
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"{where}: no valid 'model' section ({e})") from None
    except ConfigError as e:
        raise CheckpointError(f"{where}: {e}") from None
    if mc.input_shape is None:
        raise CheckpointError(f"{where}: the model config has no input_shape")
    return mc


def _own_settings(name: str, settings: dict) -> dict:
    """Of a version-1 model section's settings, those model `name` declares (the others had no effect)."""
    import dataclasses

    from vaelab.models.registry import MODELS

    if name not in MODELS:
        return settings  # validation names the unknown model
    own = {f.name for f in dataclasses.fields(MODELS[name].cls.Settings)}
    return {k: v for k, v in settings.items() if k in own}


def load_pretrained(directory: str | os.PathLike):
    """The model saved in `directory` (save_pretrained's, or a run directory's final model), in eval mode."""
    from vaelab.models.base import full_settings
    from vaelab.models.registry import MODELS

    directory = Path(directory)
    mc = model_config_from(read_config(directory), str(directory / CONFIG_FILE))
    model = MODELS[mc.model].cls(full_settings(mc))
    state, _ = unpack(directory / WEIGHTS_FILE)
    load_state(model, state, directory / WEIGHTS_FILE)
    model.eval()
    return model


