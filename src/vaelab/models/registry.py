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

from collections.abc import Iterator, Mapping
from dataclasses import dataclass

ENTRY_POINT_GROUP = "vaelab.models"


@dataclass(frozen=True)
class ModelSpec:
    name: str
    cls: type
    description: str
    source: str = "vaelab"  # "vaelab", or the distribution whose entry point registered it


class Registry(Mapping):
    """name -> ModelSpec: the built-in models, then those of installed `vaelab.models` entry points."""

    def __init__(self):
        self._specs: dict[str, ModelSpec] = {}
        self._plugins_loaded = False

    def add(self, spec: ModelSpec) -> None:
        if spec.name in self._specs:
            raise ValueError(f"model name {spec.name!r} is registered twice ({self._specs[spec.name].cls.__module__}"
                             f" and {spec.cls.__module__})")
        self._specs[spec.name] = spec

    def __getitem__(self, name: str) -> ModelSpec:
        if name not in self._specs:
            self.load_plugins()
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

        from vaelab.errors import ConfigError

        for ep in entry_points(group=ENTRY_POINT_GROUP):
            if ep.name in self._specs:
                continue  # a built-in name, or a model its own module registered on import
            try:
                cls = ep.load()
            except Exception as e:  # a broken plugin names itself instead of breaking every command
                raise ConfigError(f"the model {ep.name!r} of entry point {ep.value!r} (group {ENTRY_POINT_GROUP!r}) "
                                  f"could not be imported: {type(e).__name__}: {e}; fix or uninstall that "
                                  "package") from None
            if ep.name in self._specs:  # its module registered it with @register
                continue
            from vaelab.models.base import Autoencoder

            if not (isinstance(cls, type) and issubclass(cls, Autoencoder)):
                raise ConfigError(f"entry point {ep.name} = {ep.value!r} (group {ENTRY_POINT_GROUP!r}) must name a "
                                  f"subclass of vaelab.models.Autoencoder, got {cls!r}")
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
    from vaelab.errors import ConfigError

    if name not in MODELS:
        raise ConfigError(f"model={name!r} is not a registered model; choose one of {sorted(MODELS)}",
                          "model configuration")
    return MODELS[name].cls
