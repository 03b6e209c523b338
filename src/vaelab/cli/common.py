"""What the command modules share: the help formatter, a run directory's opening and data, --label parsing,
output paths, and printing. Importing it imports the standard library and vaelab.errors only; the helpers that
need torch import it when called.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import textwrap
from pathlib import Path

from vaelab.errors import VaelabError
from vaelab.labels import class_index, class_names

TERM_MEANINGS = {
    "loss": "training objective per sample (recon + beta*KL for a VAE), nats",
    "recon": "reconstruction negative log-likelihood per sample, nats",
    "kl": "KL(q(z|x) || N(0, I)) per sample, nats (hvae: of both layers, KL(q(z1,z2|x) || p(z1,z2)))",
    "kl_top": "hvae: KL(q(z2|z1) || N(0, I)) of the top layer per sample, nats",
    "elbo": "evidence lower bound, -(recon + KL), nats",
    "bce": "binary cross-entropy per pixel (Keras' binary_crossentropy)",
    "mse": "squared error per pixel",
    "iwae": "importance-weighted bound log p(x) >= IWAE_K per sample, nats (training with --iw-samples K)",
    "elbo_bits_per_dim": "-ELBO in bits per dimension (the convention below)",
    "bits_per_dim": "bits per sub-pixel: nll_bits_per_dim with --nll-samples, else elbo_bits_per_dim",
    "psnr": "peak signal-to-noise ratio of the posterior-mean reconstruction, dB",
    "ssim": "structural similarity of the posterior-mean reconstruction (Wang et al. 2004; 1 = identical)",
    "nll": "importance-sampled -log p(x) per sample, nats",
    "nll_se": "standard error of nll, nats",
    "nll_bits_per_dim": "nll in bits per dimension (the convention below)",
    "active_units": "latent dimensions whose posterior mean varies with x (variance > 0.01)",
    "latent_dims": "latent dimensions in all",
    "bottom_active_units": "hvae: active dimensions of the bottom layer z1 (the rows above are the top layer z2's)",
    "bottom_latent_dims": "hvae: dimensions of the bottom layer z1",
    "commitment": "a VQ-VAE's ||z_e - e||^2 per sample: how far the encoder's outputs lie from their codes",
    "perplexity": "exp(entropy) of how often each code is chosen: K when all K codes are used equally, 1 when "
                  "one code takes everything",
    "codes_used": "fraction of the codebook chosen at least once",
    "dead_codes": "codes never chosen",
    "accuracy": "fraction of the split the classifier q(y|x) labels correctly (argmax)",
    "error": "fraction of the split the classifier q(y|x) labels wrongly (1 - accuracy)",
    "classifier_nll": "-log q(y|x) of the true label per sample, nats",
    "entropy": "entropy of the classifier's q(y|x) per sample, nats",
}


class Interrupted(KeyboardInterrupt):
    """Ctrl-C during training, carrying a hint about the checkpoint."""


# ============================================================================================ parsers


class Formatter(argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog):
        width = min(shutil.get_terminal_size((100, 24)).columns, 110)
        super().__init__(prog, max_help_position=30, width=width)

    def _split_lines(self, text, width):  # keep names like seed-conv-ae whole
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


def summary(name: str) -> str:
    """The one-line help of command `name`, as the top-level command list gives it."""
    from vaelab.cli import COMMANDS

    return next(text for command, _, text in COMMANDS if command == name)


def sub(subs, name: str, description: str, epilog: str | None = None, formatter_class=Formatter):
    """Add command `name` to the subparsers `subs`, with its one-line help from the command list."""
    return subs.add_parser(name, help=summary(name), description=textwrap.dedent(description).strip(),
                           epilog=textwrap.dedent(epilog).strip() if epilog else None,
                           formatter_class=formatter_class)


def add_run_arg(p, dataset: bool = True) -> None:
    p.add_argument("run", metavar="RUN", help="a run directory written by `vaelab train` (its --out)")
    if dataset:
        p.add_argument("--dataset", metavar="NAME_OR_PATH", default=None,
                       help="use this dataset instead of the one the run was trained on")
        p.add_argument("--factors", metavar="FILE", default=None,
                       help="ground-truth factors of the data: an .npy (N, F) or a .csv with a header row of factor "
                            "names, one row per sample in the data's order (the train rows, then the test rows, "
                            "for data with its own splits) [default: the run's --factors, if it used the same data]")
    p.add_argument("--data-dir", metavar="DIR", default=None,
                   help="folder holding the dataset files, if they moved since training")
    add_trust_code(p)


def add_trust_code(p, **kw) -> None:
    """--trust-code, on every command that opens a run directory."""
    p.add_argument("--trust-code", action="store_true",
                   help="let a run whose networks are your own classes (built in Python) import their module "
                        "from outside vaelab; importing runs that module's code, so only for runs you trust", **kw)


def int_list(text: str) -> tuple[int, ...]:
    """argparse type of tuple fields: '32,64' -> (32, 64); '' -> ()."""
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    try:
        return tuple(int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 32,64, got {text!r}") \
            from None


def fraction(text: str) -> float:
    """argparse type of a fraction strictly between 0 and 1 (a contamination, a false-positive rate)."""
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number between 0 and 1, got {text!r}") from None
    if not 0.0 < v < 1.0:
        raise argparse.ArgumentTypeError(f"expected a number strictly between 0 and 1, got {text!r}")
    return v


def positive(value: int, flag: str) -> None:
    if value < 1:
        raise VaelabError(f"{flag} must be a positive integer, got {value}")


# ================================================================================== a run directory


def open_run(run: str, *, trust_code: bool):
    """(config.json dict, model) of a run directory. trust_code: the command's --trust-code (add_run_arg)."""
    from vaelab.models import from_pretrained
    from vaelab.training.checkpoint import read_config

    path = Path(run)
    if not path.is_dir():
        what = "is a file, not a run directory" if path.exists() else "does not exist"
        raise VaelabError(f"run directory {run!r} {what}; give the --out directory of a `vaelab train` run")
    return read_config(path), from_pretrained(path, trust_code=trust_code)


def run_data(cfg: dict, run: str, model, args):
    """The dataset RUN was trained on (or --dataset), with --data-dir overriding the saved folder, and the factors
    of --factors (or of the run's own --factors file, when the data is the run's)."""
    from vaelab.data import attach_factors, load_dataset
    from vaelab.errors import DataError

    saved = cfg.get("data") or {}
    dataset = getattr(args, "dataset", None) or saved.get("dataset")
    if not dataset:
        raise VaelabError(f"{os.path.join(run, 'config.json')!r} names no dataset; pass --dataset NAME_OR_PATH")
    data_dir = args.data_dir if args.data_dir is not None else saved.get("data_dir")
    # how the run read its image folder (--image-size, --background, ...), where the data is the run's
    options = {k: saved[k] for k in ("image_size", "background", "lazy", "workers", "cache")
               if saved.get(k) is not None} if dataset == saved.get("dataset") else {}
    data = load_dataset(dataset, data_dir, progress=True, **options)
    factors = getattr(args, "factors", None)
    if factors is not None:
        data = attach_factors(data, factors)
    elif saved.get("factors") and dataset == saved.get("dataset"):  # the run's factors file belongs to its data
        try:
            data = attach_factors(data, saved["factors"])
        except DataError as e:  # only the disentanglement metrics need factors: the other commands go on
            print(f"vaelab: warning: the run's factors file is not usable ({e}); going on without factors "
                  "(pass --factors FILE to give them)", file=sys.stderr)
    shape = tuple(model.config.input_shape)
    if tuple(data.train.sample_shape) != shape:
        raise DataError(f"dataset {dataset!r} holds samples of shape {tuple(data.train.sample_shape)}, but the "
                        f"model in {run!r} takes {shape}; use the dataset it was trained on")
    return data


def run_name(cfg: dict, model) -> str:
    return cfg.get("preset") or model.config.model


def need_images(model, command: str) -> None:
    shape = tuple(model.config.input_shape)
    if len(shape) != 3:
        raise VaelabError(f"`vaelab {command}` draws images, but this run's model takes vectors of {shape[0]} "
                          "numbers; `vaelab encode` works for any data")


def out_path(args, run: str, default: str) -> Path:
    """--out, or the file `default` in the run directory."""
    return Path(args.out) if args.out else Path(run) / default


def run_classes(cfg: dict, model) -> list[str] | None:
    """The class names of a conditional run's labels (saved by train), else None."""
    if not model.capabilities.conditional:
        return None
    return class_names((cfg.get("data") or {}).get("classes"), model.config.condition_dim)


def parse_label(text: str | None, model, classes) -> int | None:
    """--label as a class index: an integer in 0..K-1 or a class name (any case)."""
    if text is None:
        return None
    if not model.capabilities.conditional:
        raise VaelabError(f"--label is for conditional models, but model {model.config.model!r} takes no "
                          "condition; train one with --model cvae")
    return class_index(text, model.config.condition_dim, classes, "this model", "this model")


# ============================================================================================ output


def fmt_value(v) -> str:
    if isinstance(v, tuple):
        return ",".join(str(i) for i in v) or "''"
    if isinstance(v, bool):
        return "on" if v else "off"
    return str(v)


def fmt_number(v) -> str:
    if isinstance(v, int):
        return str(v)
    return f"{v:.6g}"


def print_table(rows: list[list[str]], indent: str = "  ") -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print(indent + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


def print_terms(metrics: dict, what: str, meanings: dict | None = None) -> None:
    """The scalar terms as a table; per-dimension lists stay in the JSON file; a warning is printed last.
    `meanings`: the model's own terms' meanings (Autoencoder.term_meanings)."""
    meanings = {**TERM_MEANINGS, **(meanings or {})}
    print(f"{what}:")
    rows = [["term", "value", "meaning"]]
    for k, v in metrics.items():
        if k != "n" and isinstance(v, (int, float)) and not isinstance(v, bool):
            rows.append([k, fmt_number(v), meanings.get(k, "")])
    print_table(rows)
    if "kl_per_dim" in metrics:
        print("  KL per latent dimension (nats): " + " ".join(f"{v:.3g}" for v in metrics["kl_per_dim"]))
    if metrics.get("class_error"):
        print("  error per class (%): " + "  ".join(f"{c}: {'-' if e is None else f'{100 * e:.2f}'}"
                                                    for c, e in enumerate(metrics["class_error"])))
    if metrics.get("most_confused"):
        print("  most confused (true -> predicted): " + ", ".join(
            f"{m['true']} -> {m['predicted']} {m['count']} times" for m in metrics["most_confused"]))
    if metrics.get("bits_per_dim_convention"):
        print(f"  bits/dim: {metrics['bits_per_dim_convention']}")
    if metrics.get("warning"):
        print(f"warning: {metrics['warning']}")


def print_written(written) -> None:
    print("wrote:")
    for path in written:
        print(f"  {path}")


def write_evaluation(path: Path, metrics: dict, split: str, dataset: str) -> str:
    from vaelab.training.checkpoint import atomic_write_json

    atomic_write_json(path, {"split": split, "dataset": dataset, **metrics})
    return str(path)


def write_npy(path: Path, array) -> str:
    import io

    import numpy as np

    from vaelab.training.checkpoint import atomic_write_bytes

    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    atomic_write_bytes(path, buf.getvalue())
    return str(path)
