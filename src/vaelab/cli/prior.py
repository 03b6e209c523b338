"""`vaelab train-prior RUN`: fit the code prior of a VQ-VAE run (vaelab.prior.train_prior), so that `vaelab sample`
can generate. Building the parser imports neither torch nor numpy."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from vaelab.cli.common import Interrupted, summary
from vaelab.errors import VaelabError
from vaelab.prior import DEFAULTS, PRIOR_CHECKPOINT_FILE, PRIOR_METRICS_FILE


def add_train_prior_parser(subparsers) -> argparse.ArgumentParser:
    """Add `train-prior` to the `vaelab` subcommands (no torch import here)."""
    p = subparsers.add_parser(
        "train-prior", help=summary("train-prior"),
        description="Fit an autoregressive prior (a gated PixelCNN) over the code grids of a trained VQ-VAE run "
                    "and store it in the run directory (model.safetensors, config.json, prior_metrics.jsonl, "
                    "prior_checkpoint.safetensors), after every epoch. On labelled data the prior is "
                    "class-conditional: `vaelab sample RUN --label 3`. --resume continues an interrupted fit "
                    "(or extends a finished one to a larger --epochs) with its saved settings.")
    p.add_argument("run", help="the run directory of a `vaelab train --model vqvae` run")
    p.add_argument("--epochs", type=int, default=DEFAULTS["epochs"], help="passes over the training codes "
                   f"(default {DEFAULTS['epochs']})")
    p.add_argument("--batch-size", type=int, default=None,
                   help=f"code grids per optimizer step (default {DEFAULTS['batch_size']})")
    p.add_argument("--lr", type=float, default=None, help=f"Adam's learning rate (default {DEFAULTS['lr']})")
    p.add_argument("--layers", type=int, default=None,
                   help=f"gated PixelCNN layers (default {DEFAULTS['layers']})")
    p.add_argument("--channels", type=int, default=None,
                   help=f"channels of each layer (default {DEFAULTS['channels']})")
    p.add_argument("--unconditional", action="store_true",
                   help="ignore the data's labels: one prior for all classes")
    p.add_argument("--dataset", default=None, help="the data to encode (default: the run's training dataset)")
    p.add_argument("--data-dir", default=None, help="folder of the built-in datasets (default: the run's)")
    p.add_argument("--seed", type=int, default=None,
                   help=f"random seed of the prior's weights and data order (default {DEFAULTS['seed']})")
    p.add_argument("--resume", action="store_true",
                   help="continue the run's prior from prior_checkpoint.safetensors up to --epochs")
    p.add_argument("--overwrite", action="store_true", help="replace a prior the run already has")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = all cores)")
    p.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda or cuda:N")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bars")
    p.set_defaults(func=run_train_prior)
    return p


def run_train_prior(args) -> int:
    from vaelab.prior import train_prior

    _check_settings(args)
    run = Path(args.run)
    try:
        history = train_prior(args.run, dataset=args.dataset, data_dir=args.data_dir, epochs=args.epochs,
                              batch_size=args.batch_size, lr=args.lr, layers=args.layers, channels=args.channels,
                              conditional=not args.unconditional, seed=args.seed, threads=args.threads,
                              device=args.device, progress=args.progress, resume=args.resume,
                              overwrite=args.overwrite)
    except KeyboardInterrupt:
        if (run / PRIOR_CHECKPOINT_FILE).is_file():
            raise Interrupted(f"the prior's checkpoint of its last finished epoch is intact; continue with: "
                              f"vaelab train-prior {args.run} --resume") from None
        raise
    for row in history:
        test = f", test {row['test_bits_per_code']:.4f}" if "test_bits_per_code" in row else ""
        print(f"epoch {row['epoch']}: train {row['train_bits_per_code']:.4f} bits per code{test} "
              f"({row['time_s']:.1f} s)")
    print(f"wrote: {run / 'model.safetensors'}, {run / 'config.json'}, {run / PRIOR_METRICS_FILE}, "
          f"{run / PRIOR_CHECKPOINT_FILE}")
    print(f"sample with: vaelab sample {args.run} --n 64")
    return 0


def _check_settings(args) -> None:
    for flag in ("epochs", "batch_size", "layers", "channels"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise VaelabError(f"--{flag.replace('_', '-')} must be a positive integer, got {value}")
    if args.lr is not None and not (math.isfinite(args.lr) and args.lr > 0):
        raise VaelabError(f"--lr must be a positive number, got {args.lr}")
    if args.seed is not None and args.seed < 0:
        raise VaelabError(f"--seed must be an integer >= 0, got {args.seed}")
