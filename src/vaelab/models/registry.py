"""The one model registry: a name maps to a model class and its loss. CLI, checkpoints and tests read it."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass(frozen=True)
class ModelSpec:
    name: str
    cls: type
    loss: Callable  # pure function (x, ModelOutput, **weights) -> dict of per-sample terms
    description: str


MODELS: dict[str, ModelSpec] = {}


def register(name: str, *, loss: Callable, description: str):
    def deco(cls):
        if name in MODELS:
            raise ValueError(f"model name {name!r} is registered twice")
        MODELS[name] = ModelSpec(name, cls, loss, description)
        cls.registry_name = name
        return cls

    return deco
