"""Pretrained directories: config.json + model.safetensors, written and read without executing code.

Reading migrates a config.json written by an older vaelab (its `format_version`) before it builds the model, so
run directories of earlier releases keep loading. This module knows model classes only as arguments: the
registry (models/registry.py: load_pretrained) finds the class by the saved model's name.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path

from vaelab.config import FORMAT_VERSION, ModelConfig
from vaelab.errors import CheckpointError, ConfigError
from vaelab.io import (CONFIG_FILE, WEIGHTS_FILE, atomic_write_bytes, atomic_write_json, load_state, pack,
                       read_config, unpack)


def save_pretrained(model, directory: str | os.PathLike, extra: dict | None = None) -> None:
    """Write the model's config.json (keeping other sections already there) and model.safetensors.

    A model built with networks of the user's own saves when their classes and constructor arguments are
    recorded (models/networks.py); otherwise this refuses, saying how to make them savable, and writes nothing."""
    if model.config.networks is not None:
        from vaelab.models.networks import save_problems

        problems = save_problems(model)
        if problems:
            raise ConfigError(problems, f"model to save in {str(directory)!r}")
    directory = Path(directory)
    state = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    atomic_write_bytes(directory / WEIGHTS_FILE, pack(state))
    config_path = directory / CONFIG_FILE
    cfg = read_config(directory) if config_path.is_file() else {}
    cfg.update({"format_version": FORMAT_VERSION, "model": model.config.to_dict()})
    if extra:
        cfg.update(extra)
    atomic_write_json(config_path, cfg)


def config_of(cls: type, cfg: dict, where: str) -> ModelConfig:
    """The validated ModelConfig of a config.json's "model" section for model class `cls` (read_config has
    migrated the file), with every setting of the model spelled out."""
    try:
        section = dict(cfg["model"])
        if section.pop("v1_settings", False):  # a version-1 file: keep the settings its model declares
            own = {f.name for f in dataclasses.fields(cls.Settings)}
            section["settings"] = {k: v for k, v in (section.get("settings") or {}).items() if k in own}
        mc = ModelConfig.from_dict(section)
        mc.validate()
    except (KeyError, TypeError) as e:
        raise CheckpointError(f"{where}: no valid 'model' section ({e})") from None
    except ConfigError as e:
        raise CheckpointError(f"{where}: {e}") from None
    if mc.input_shape is None:
        raise CheckpointError(f"{where}: the model config has no input_shape")
    return complete_settings(cls, mc)


def complete_settings(cls: type, config: ModelConfig) -> ModelConfig:
    """The config with every setting of model class `cls` spelled out (the defaults filled in), as saved."""
    return config.replace(settings=cls.Settings(**config.settings).to_dict())


def load_as(cls: type, directory: str | os.PathLike, *, trust_code: bool = False):
    """The model of class `cls` saved in `directory` (save_pretrained's, or a run directory's final model), in
    eval mode. vaelab.from_pretrained finds the class by the saved model's name.

    A model with networks of its own imports their classes' module: a module inside vaelab freely, any other
    only with trust_code=True (importing runs the module's code; pass it for files you trust). Without it such
    a file is refused before anything is imported."""
    directory = Path(directory)
    where = str(directory / CONFIG_FILE)
    mc = config_of(cls, read_config(directory), where)
    networks = {}
    if mc.networks is not None:
        from vaelab.models.networks import instantiate

        networks = dict(zip(("encoder", "decoder"), instantiate(mc.networks, trust_code, where)))
    try:
        model = cls(mc, **networks)
    except ConfigError as e:
        if not networks:
            raise
        raise CheckpointError(f"{where}: {e}") from None
    state, _ = unpack(directory / WEIGHTS_FILE)
    load_state(model, state, directory / WEIGHTS_FILE)
    model.eval()
    return model
