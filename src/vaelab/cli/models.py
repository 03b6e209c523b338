"""`vaelab models`: the registered models and the named presets, each with its description."""

from __future__ import annotations

import argparse
import shutil
import sys
import textwrap

from vaelab.cli.common import sub
from vaelab.config import PRESETS


def add_models_parser(subs) -> argparse.ArgumentParser:
    p = sub(subs, "models", """
        List the registered models (train with --model NAME) and the named presets (--preset NAME).""")
    p.set_defaults(func=cmd_models)
    return p


def cmd_models(args) -> int:
    from vaelab.models import MODELS, list_models

    width = shutil.get_terminal_size((100, 24)).columns
    print("models (train with --model NAME):")
    _print_described([(m.name, m.description) for m in list_models()], width)
    print("\npresets (train with --preset NAME):")
    _print_described([(p.name, p.description) for p in sorted(PRESETS.values(), key=lambda p: p.name)], width)
    for problem in MODELS.broken.values():  # installed model plugins that gave no model
        print(f"vaelab: error: {problem}", file=sys.stderr)
    return 1 if MODELS.broken else 0


def _print_described(items: list[tuple[str, str]], width: int) -> None:
    col = max(len(n) for n, _ in items) + 4
    for name, text in items:
        lines = textwrap.wrap(text, max(30, width - col - 1)) or [""]
        print(f"  {name.ljust(col - 2)}{lines[0]}")
        for line in lines[1:]:
            print(" " * col + line)
