"""The `vaelab` command line: train a run, evaluate it, and draw pictures of it.

    vaelab train                                   # the tutorial's VAE (preset seed-vae) on digits
    vaelab train --preset seed-conv-ae --dataset mnist --epochs 5
    vaelab sample runs/seed-vae-digits --n 64

One module per command group (COMMANDS says which holds which command): train, pictures (reconstruct,
sample, manifold, interpolate, traverse), evaluate, encode, models, anomaly (detect, one-class), series and prior
(train-prior); common holds what they share. Module M's function add_<command>_parser(subparsers) adds
its command, whose `func` default runs it.

Start-up stays light: the top-level parser lists every command with its one-line help from COMMANDS and
imports no command module; only the command named on the command line is imported and its parser built
(so `vaelab --help` imports no torch; `vaelab train --help` imports the model registry, whose Settings
fields become flags).
"""

from __future__ import annotations

import argparse
import importlib
import sys
import textwrap

from vaelab.cli.common import Formatter, Interrupted
from vaelab.errors import VaelabError

# (command, module of vaelab.cli that adds it, one-line help), in the order `vaelab --help` lists them
COMMANDS = (
    ("train", "train", "train a model and write a run directory"),
    ("evaluate", "evaluate", "loss terms of a run on its test (or train) split"),
    ("reconstruct", "pictures", "originals over their reconstructions (PNG)"),
    ("sample", "pictures", "new images decoded from the prior (PNG; VAEs, VQ-VAEs after train-prior)"),
    ("manifold", "pictures", "decoded grid over two latent dimensions (PNG)"),
    ("interpolate", "pictures", "latent walks between pairs of test images (PNG)"),
    ("traverse", "pictures", "latent traversals, one row per latent dimension (PNG, VAEs)"),
    ("encode", "encode", "latent means of a split to .npy, with a scatter plot"),
    ("models", "models", "list the registered models and presets"),
    ("detect", "anomaly", "score rows for anomalies and flag the anomalous ones"),
    ("one-class", "anomaly", "the one-class anomaly protocol on MNIST / Fashion-MNIST (AUROC)"),
    ("series", "series", "anomalies in a multivariate time series (CSV), from an autoencoder of its windows"),
    ("train-prior", "prior", "fit the code prior of a VQ-VAE run, so that `vaelab sample` can generate"),
    ("export", "export", "the encoder and decoder of a run as ONNX files or torch.export programs"),
    ("tune", "tune", "search hyperparameters with Optuna (resumable, several processes at once)"),
    ("serve", "serve", "serve a run's model over HTTP: a JSON API and the latent explorer page"),
    ("explore", "explore", "serve a run and open the latent explorer page in your browser"),
)

EPILOG = """
    typical session:
      vaelab train                             # the tutorial's VAE (preset seed-vae) on digits
      vaelab train --preset seed-vae --dataset mnist --epochs 30 --out runs/vae-mnist
      vaelab sample runs/vae-mnist --n 100
      vaelab manifold runs/vae-mnist

    the model family (one loop, one run format):
      vaelab train --model vae --beta 4 --kl-schedule cyclical --kl-warmup 2 --dataset mnist --out runs/bvae
      vaelab traverse runs/bvae                # one row per latent dimension, most informative first
      vaelab train --model ae --noise gaussian --noise-level 0.5 --dataset fashion-mnist --out runs/dae
      vaelab train --model cvae --dataset mnist --out runs/cvae
      vaelab sample runs/cvae --label 3        # (without --label: one row per class)
      vaelab train --preset m2 --labels 100 --dataset mnist --out runs/m2   # semi-supervised: 100 labels
      vaelab train --model vae --iw-samples 5 --dataset mnist --out runs/iwae
      vaelab train --model vqvae --codebook-size 64 --dataset mnist --out runs/vq
      vaelab train-prior runs/vq               # a VQ-VAE generates through a prior over its codes
      vaelab sample runs/vq --n 64

    `vaelab COMMAND --help` says what each command does and writes."""


def add_command(subparsers, name: str) -> argparse.ArgumentParser:
    """Import the module of command `name` and add the command's parser to `subparsers`."""
    module = next(m for command, m, _ in COMMANDS if command == name)
    adder = getattr(importlib.import_module(f"vaelab.cli.{module}"), f"add_{name.replace('-', '_')}_parser")
    return adder(subparsers)


class _LazyCommands(argparse._SubParsersAction):
    """Subparsers that hold a placeholder per command (its name and help, for `vaelab --help`) and build a
    command's real parser, importing its module, only when the command line names it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._placeholders: set[str] = set()

    def add_placeholder(self, name: str, help: str) -> None:
        super().add_parser(name, help=help)
        self._placeholders.add(name)

    def add_parser(self, name, **kwargs):
        if name in self._placeholders:  # the command's real parser replaces its placeholder (listed already)
            self._placeholders.discard(name)
            del self._name_parser_map[name]
            kwargs.pop("help", None)
        return super().add_parser(name, **kwargs)

    def build(self, name: str) -> None:
        if name in self._placeholders:
            add_command(self, name)

    def __call__(self, parser, namespace, values, option_string=None):
        self.build(values[0])
        super().__call__(parser, namespace, values, option_string)


def build_parser(lazy: bool = True) -> argparse.ArgumentParser:
    """The `vaelab` parser. lazy: a command's parser is built (its module imported) when it is parsed;
    otherwise every command's parser is built now."""
    from vaelab import __version__

    parser = argparse.ArgumentParser(
        prog="vaelab", formatter_class=Formatter,
        description="Train autoencoders and VAEs, evaluate them, and draw their latent spaces.",
        epilog=textwrap.dedent(EPILOG).strip())
    parser.add_argument("--version", action="version", version=f"vaelab {__version__}")
    subs = parser.add_subparsers(dest="command", metavar="COMMAND", required=True, action=_LazyCommands)
    for name, _, text in COMMANDS:
        subs.add_placeholder(name, text)
    if not lazy:
        for name, _, _ in COMMANDS:
            subs.build(name)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help and --version (0), usage errors (2)
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    try:
        return int(args.func(args) or 0)
    except VaelabError as e:
        sys.stdout.flush()
        print(f"vaelab: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        sys.stdout.flush()
        hint = f" ({e.args[0]})" if isinstance(e, Interrupted) and e.args else ""
        print(f"\nvaelab: interrupted{hint}", file=sys.stderr)
        return 130


# names that moved into the command modules, still importable from vaelab.cli (imported when asked for)
_MOVED = {"_plan": "train", "NOT_FLAGS": "train", "FIELD_HELP": "train", "NOISES": "train",
          "KL_SCHEDULES": "train", "cmd_train": "train"}


def __getattr__(name):
    if name in _MOVED:
        return getattr(importlib.import_module(f"vaelab.cli.{_MOVED[name]}"), name)
    raise AttributeError(f"module 'vaelab.cli' has no attribute {name!r}")


__all__ = ["main", "build_parser", "COMMANDS"]
