"""vaelab: autoencoders, VAEs and friends on PyTorch.

The top-level names are imported lazily so that `vaelab --help` starts without importing torch.
"""

__version__ = "0.2.0.dev0"  # the one place the version lives (pyproject.toml reads it)

_LAZY = {
    "build_model": "vaelab.models",
    "from_pretrained": "vaelab.models",
    "list_models": "vaelab.models",
    "ModelConfig": "vaelab.config",
    "TrainConfig": "vaelab.config",
    "get_preset": "vaelab.config",
    "load_dataset": "vaelab.data",
    "fit": "vaelab.training",
    "evaluate": "vaelab.evaluation",
    "AnomalyDetector": "vaelab.sklearn",
    "SeriesDetector": "vaelab.timeseries",
    "VaelabError": "vaelab.errors",
    "ConfigError": "vaelab.errors",
    "DataError": "vaelab.errors",
    "CheckpointError": "vaelab.errors",
    "TrainingError": "vaelab.errors",
}

__all__ = sorted(_LAZY) + ["__version__"]


def __getattr__(name):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'vaelab' has no attribute {name!r}")


def __dir__():
    return __all__
