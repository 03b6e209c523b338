"""The one model registry: a name maps to a model class. The CLI, checkpoints, evaluation and the tests read it.

Built-in models register with the `register` decorator in their own file. A model that lives outside vaelab
registers through the Python entry-point group `vaelab.models` (in its package's pyproject.toml):

    [project.entry-points."vaelab.models"]
    wae = "my_package.wae:WAE"

The entry point's name is the model's name and its object is the model class (a subclass of
vaelab.models.Autoencoder). Installed entry points are loaded the first time a name is looked up that no
built-in model has, or when every model is listed; from then on the model works in every command like a
built-in one.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass

from vaelab.config import ModelConfig
from vaelab.errors import CheckpointError, ConfigError
from vaelab.models.base import Autoencoder, settings_problems

ENTRY_POINT_GROUP = "vaelab.models"


@dataclass(frozen=True)
class ModelSpec:
    name: str
    cls: type
    description: str
    source: str = "vaelab"  # "vaelab", or the distribution whose entry point registered it


class Registry(Mapping):
    """name -> ModelSpec: the built-in models, then those of installed `vaelab.models` entry points.

    A plugin that cannot be imported, or that names no model class, is not registered: its name maps to the
    reason in `broken`, looking it up raises a ConfigError that says so, and every other model keeps working."""

    def __init__(self):
        self._specs: dict[str, ModelSpec] = {}
        self.broken: dict[str, str] = {}  # name -> why its entry point gave no model
        self._plugins_loaded = False

    def add(self, spec: ModelSpec) -> None:
        if spec.name in self._specs:
            raise ValueError(f"model name {spec.name!r} is registered twice ({self._specs[spec.name].cls.__module__}"
                             f" and {spec.cls.__module__})")
        self._specs[spec.name] = spec

    def __getitem__(self, name: str) -> ModelSpec:
        if name not in self._specs:
            self.load_plugins()
        if name not in self._specs and name in self.broken:
            raise ConfigError(self.broken[name], "model plugin")
        return self._specs[name]

    def __contains__(self, name) -> bool:
        if name not in self._specs:
            self.load_plugins()
        return name in self._specs

    def __iter__(self) -> Iterator[str]:
        self.load_plugins()
        return iter(dict(self._specs))

    def __len__(self) -> int:
        self.load_plugins()
        return len(self._specs)

    def load_plugins(self) -> None:
        """Register the models of installed `vaelab.models` entry points (once per process)."""
        if self._plugins_loaded:
            return
        self._plugins_loaded = True
        from importlib.metadata import entry_points

        for ep in entry_points(group=ENTRY_POINT_GROUP):
            if ep.name in self._specs:
                continue  # a built-in name, or a model its own module registered on import
            try:
                cls = ep.load()
            except Exception as e:  # a broken plugin names itself instead of breaking every command
                self.broken[ep.name] = (f"the model {ep.name!r} of entry point {ep.value!r} (group "
                                        f"{ENTRY_POINT_GROUP!r}) could not be imported: {type(e).__name__}: {e}; "
                                        "fix or uninstall that package")
                continue
            if ep.name in self._specs:  # its module registered it with @register
                continue
            if not (isinstance(cls, type) and issubclass(cls, Autoencoder)):
                self.broken[ep.name] = (f"entry point {ep.name} = {ep.value!r} (group {ENTRY_POINT_GROUP!r}) must "
                                        f"name a subclass of vaelab.models.Autoencoder, got {cls!r}; fix or "
                                        "uninstall that package")
                continue
            dist = getattr(ep, "dist", None)
            _register_class(ep.name, cls, (cls.__doc__ or ep.name).strip().split("\n")[0],
                            getattr(dist, "name", None) or ep.value)


MODELS = Registry()


def _register_class(name: str, cls: type, description: str, source: str) -> None:
    MODELS.add(ModelSpec(name, cls, description, source))
    cls.registry_name = name


def register(name: str, *, description: str):
    """Class decorator: register a model class under `name`."""

    def deco(cls):
        _register_class(name, cls, description, "vaelab" if cls.__module__.startswith("vaelab.") else cls.__module__)
        return cls

    return deco


def model_class(name: str) -> type:
    """The class registered as `name`, or a ConfigError that lists the registered models."""
    if name not in MODELS:
        raise ConfigError(MODELS.broken.get(name) or f"model={name!r} is not a registered model; choose one of "
                          f"{sorted(MODELS)}", "model configuration")
    return MODELS[name].cls


def check_config(config: ModelConfig, common_ok: bool = True) -> list[str]:
    """The registry's checks of a ModelConfig (installed into config.MODEL_CHECKS by vaelab.models): the model is
    registered; its settings; and, when the common fields are valid, the rest of the model's own checks."""
    if not isinstance(config.model, str) or config.model not in MODELS:
        return [MODELS.broken.get(config.model) or
                f"model={config.model!r} is not a registered model; choose one of {sorted(MODELS)}"]
    cls = MODELS[config.model].cls
    return cls.config_problems(config) if common_ok else settings_problems(cls, config)


def model_config_from(cfg: dict, where: str) -> ModelConfig:
    """The validated ModelConfig (every setting spelled out) of a config.json read with vaelab.io.read_config."""
    from vaelab.models.pretrained import config_of

    return config_of(_saved_class(cfg, where), cfg, where)


def load_pretrained(directory: str | os.PathLike, *, trust_code: bool = False) -> Autoencoder:
    """The model saved in `directory` (save_pretrained's, or a run directory's final model), whatever its class,
    in eval mode; see models/pretrained.load_as for trust_code."""
    from vaelab.io import CONFIG_FILE, read_config
    from vaelab.models.pretrained import load_as

    cls = _saved_class(read_config(directory), os.path.join(str(directory), CONFIG_FILE))
    return load_as(cls, directory, trust_code=trust_code)


def _saved_class(cfg: dict, where: str) -> type:
    name = (cfg.get("model") or {}).get("model") if isinstance(cfg.get("model"), dict) else None
    try:
        return model_class(name)
    except ConfigError as e:
        raise CheckpointError(f"{where}: {e}") from None
