"""`vaelab train-prior RUN`: fit the autoregressive prior over a trained VQ-VAE's codes, so the run can generate.

    vaelab train --model vqvae --codebook-size 64 --dataset mnist --out runs/vq
    vaelab train-prior runs/vq
    vaelab sample runs/vq --n 64

The training set is encoded once to grids of code indices; a gated PixelCNN (models/prior.py) learns
p(codes | class) on them by maximum likelihood, class-conditional when the data has labels. The prior becomes part
of the model: its weights go into RUN/model.safetensors and its size into config.json's model section
(prior_layers, prior_channels, prior_classes), so `from_pretrained(RUN)` loads it with no extra step, and
RUN/prior_metrics.jsonl records its per-epoch negative log-likelihood in bits per code.

Building the argument parser imports neither torch nor numpy (`vaelab --help` stays instant).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

from vaelab.errors import VaelabError

PRIOR_METRICS_FILE = "prior_metrics.jsonl"
DEFAULTS = {"epochs": 10, "batch_size": 128, "lr": 1e-3, "layers": 8, "channels": 32}


def fit_prior(model, train, test=None, *, epochs: int = DEFAULTS["epochs"], batch_size: int = DEFAULTS["batch_size"],
              lr: float = DEFAULTS["lr"], layers: int = DEFAULTS["layers"], channels: int = DEFAULTS["channels"],
              conditional: bool = True, seed: int = 0, progress: bool = False) -> list[dict]:
    """Fit a code prior for `model` (a VQ-VAE) on the codes of `train` (an ArrayDataset), attach it to the model
    (model.prior, and prior_* in model.config) and return the per-epoch history: the training and test
    negative log-likelihood in bits per code. Class-conditional when `conditional` and the data has labels."""
    import torch
    import torch.nn.functional as F

    from vaelab.models.prior import CodePrior

    _check(epochs >= 1 and batch_size >= 1 and lr > 0 and layers >= 1 and channels >= 1,
           f"epochs={epochs}, batch_size={batch_size}, lr={lr}, layers={layers} and channels={channels} must all "
           "be positive")
    if getattr(model, "quantizer", None) is None:
        raise VaelabError(f"model {model.config.model!r} has no discrete codes; a code prior is for a VQ-VAE "
                          "(train one with --model vqvae)")
    if len(train) == 0:
        raise VaelabError("the training set is empty; the prior needs the codes of the training data")
    classes = (train.num_classes or int(train.y.max()) + 1) if conditional and train.y is not None else 0
    device = model._device()
    codes = encode_codes(model, train)  # (N, h, w) int64, on the CPU
    test_codes = encode_codes(model, test) if test is not None and len(test) else None
    labels = train.y.long() if classes else None
    positions = math.prod(codes.shape[1:])

    torch.manual_seed(seed)
    prior = CodePrior(model.config.codebook_size, codes.shape[1:], channels, layers, classes).to(device)
    optimizer = torch.optim.Adam(prior.parameters(), lr=lr)
    bits = lambda nats: nats / (positions * math.log(2))  # noqa: E731  (nats per map -> bits per code)
    history = []
    for epoch in range(epochs):
        t0 = time.perf_counter()
        prior.train()
        gen = torch.Generator().manual_seed(seed * 1_000_003 + epoch)
        perm = torch.randperm(len(codes), generator=gen)
        total = 0.0
        bar = _bar(progress, math.ceil(len(codes) / batch_size), f"prior epoch {epoch + 1}/{epochs}")
        for start in range(0, len(codes), batch_size):
            idx = perm[start:start + batch_size]
            k = codes[idx].to(device)  # (B, h, w)
            c = labels[idx].to(device) if classes else None
            nll = F.cross_entropy(prior(k, c), k, reduction="none").flatten(1).sum(1)  # (B,) nats per map
            optimizer.zero_grad(set_to_none=True)
            nll.mean().backward()
            optimizer.step()
            total += float(nll.detach().sum())
            if bar is not None:
                bar.update(1)
        if bar is not None:
            bar.close()
        row = {"epoch": epoch + 1, "train_bits_per_code": bits(total / len(codes))}
        if test_codes is not None:
            test_labels = test.y.long() if classes and test.y is not None else None
            if not classes or test_labels is not None:
                row["test_bits_per_code"] = bits(prior_nll(prior, test_codes, test_labels))
        row["time_s"] = round(time.perf_counter() - t0, 3)
        history.append(row)
    prior.eval()
    model.prior = prior
    model.config = model.config.replace(prior_layers=layers, prior_channels=channels, prior_classes=classes)
    return history


def encode_codes(model, data, batch_size: int = 512):
    """The code indices of every sample of `data`, (N, h, w) int64 on the CPU."""
    import torch

    was_training = model.training
    model.eval()
    parts = [model.encode_indices(data.batch(torch.arange(s, min(s + batch_size, len(data)))).to(model._device()))
             .cpu() for s in range(0, len(data), batch_size)]
    model.train(was_training)
    return torch.cat(parts) if parts else torch.zeros(0, *model.grid, dtype=torch.long)


def prior_nll(prior, codes, labels=None, batch_size: int = 1000) -> float:
    """Mean negative log-likelihood of code maps (N, h, w) under `prior`, nats per map."""
    import torch

    device = next(prior.parameters()).device
    total = 0.0
    with torch.inference_mode():
        for s in range(0, len(codes), batch_size):
            c = labels[s:s + batch_size].to(device) if labels is not None else None
            total -= float(prior.log_prob(codes[s:s + batch_size].to(device), c).sum())
    return total / max(len(codes), 1)


def train_prior(run_dir, *, dataset=None, data_dir=None, epochs: int = DEFAULTS["epochs"],
                batch_size: int = DEFAULTS["batch_size"], lr: float = DEFAULTS["lr"], layers: int = DEFAULTS["layers"],
                channels: int = DEFAULTS["channels"], conditional: bool = True, seed: int = 0, threads: int = 0,
                device: str = "auto", progress: bool = True) -> list[dict]:
    """Fit the code prior of the VQ-VAE in `run_dir` on the dataset it was trained on (or `dataset`), and save
    it into the run (model.safetensors, config.json, prior_metrics.jsonl). Returns the per-epoch history."""
    import torch

    from vaelab.data import load_dataset
    from vaelab.errors import DataError
    from vaelab.models import from_pretrained
    from vaelab.training.checkpoint import atomic_write_text, read_config, save_pretrained
    from vaelab.training.distributed import resolve_device

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise VaelabError(f"run directory {str(run_dir)!r} does not exist; give the --out directory of a "
                          "`vaelab train --model vqvae` run")
    cfg = read_config(run_dir)
    model = from_pretrained(run_dir)
    if getattr(model, "quantizer", None) is None:
        raise VaelabError(f"{str(run_dir)!r} holds a {model.config.model!r} model; a code prior is for a VQ-VAE "
                          "run (vaelab train --model vqvae)")
    saved = cfg.get("data") or {}
    dataset = dataset or saved.get("dataset")
    if not dataset:
        raise VaelabError(f"{str(run_dir / 'config.json')!r} names no dataset; pass --dataset NAME_OR_PATH")
    data = load_dataset(dataset, data_dir if data_dir is not None else saved.get("data_dir"), progress=progress)
    if tuple(data.train.sample_shape) != tuple(model.config.input_shape):
        raise DataError(f"dataset {dataset!r} holds samples of shape {tuple(data.train.sample_shape)}, but the "
                        f"model in {str(run_dir)!r} takes {tuple(model.config.input_shape)}; use the dataset it "
                        "was trained on")
    if threads:
        torch.set_num_threads(threads)
    model.to(resolve_device(device))
    t0 = time.perf_counter()
    history = fit_prior(model, data.train, data.test, epochs=epochs, batch_size=batch_size, lr=lr, layers=layers,
                        channels=channels, conditional=conditional, seed=seed, progress=progress)
    model.to("cpu")
    last = history[-1]
    record = {"epochs": epochs, "batch_size": batch_size, "lr": lr, "seed": seed,
              "train_bits_per_code": last["train_bits_per_code"], "seconds": round(time.perf_counter() - t0, 1)}
    if "test_bits_per_code" in last:
        record["test_bits_per_code"] = last["test_bits_per_code"]
    if model.config.prior_classes:
        record["classes"] = data.train.classes
    save_pretrained(model, run_dir, extra={"prior": record})
    atomic_write_text(run_dir / PRIOR_METRICS_FILE, "".join(json.dumps(r) + "\n" for r in history))
    return history


# ================================================================================================ the CLI


def add_train_prior_parser(subparsers) -> argparse.ArgumentParser:
    """Add `train-prior` to the `vaelab` subcommands (no torch import here)."""
    p = subparsers.add_parser(
        "train-prior", help="fit the code prior of a VQ-VAE run, so that `vaelab sample` can generate",
        description="Fit an autoregressive prior (a gated PixelCNN) over the code grids of a trained VQ-VAE run "
                    "and store it in the run directory (model.safetensors, config.json, prior_metrics.jsonl). "
                    "On labelled data the prior is class-conditional: `vaelab sample RUN --label 3`.")
    p.add_argument("run", help="the run directory of a `vaelab train --model vqvae` run")
    p.add_argument("--epochs", type=int, default=DEFAULTS["epochs"], help="passes over the training codes "
                   f"(default {DEFAULTS['epochs']})")
    p.add_argument("--batch-size", type=int, default=DEFAULTS["batch_size"],
                   help=f"code grids per optimizer step (default {DEFAULTS['batch_size']})")
    p.add_argument("--lr", type=float, default=DEFAULTS["lr"], help=f"Adam's learning rate (default {DEFAULTS['lr']})")
    p.add_argument("--layers", type=int, default=DEFAULTS["layers"],
                   help=f"gated PixelCNN layers (default {DEFAULTS['layers']})")
    p.add_argument("--channels", type=int, default=DEFAULTS["channels"],
                   help=f"channels of each layer (default {DEFAULTS['channels']})")
    p.add_argument("--unconditional", action="store_true",
                   help="ignore the data's labels: one prior for all classes")
    p.add_argument("--dataset", default=None, help="the data to encode (default: the run's training dataset)")
    p.add_argument("--data-dir", default=None, help="folder of the built-in datasets (default: the run's)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the prior's weights and data order")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = all cores)")
    p.add_argument("--device", default="auto", help="auto (a GPU when there is one), cpu, cuda or cuda:N")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=True, help="progress bars")
    p.set_defaults(func=run_train_prior)
    return p


def run_train_prior(args) -> int:
    for flag in ("epochs", "batch_size", "layers", "channels"):
        if getattr(args, flag) < 1:
            raise VaelabError(f"--{flag.replace('_', '-')} must be a positive integer, got {getattr(args, flag)}")
    if not (math.isfinite(args.lr) and args.lr > 0):
        raise VaelabError(f"--lr must be a positive number, got {args.lr}")
    history = train_prior(args.run, dataset=args.dataset, data_dir=args.data_dir, epochs=args.epochs,
                          batch_size=args.batch_size, lr=args.lr, layers=args.layers, channels=args.channels,
                          conditional=not args.unconditional, seed=args.seed, threads=args.threads,
                          device=args.device, progress=args.progress)
    for row in history:
        test = f", test {row['test_bits_per_code']:.4f}" if "test_bits_per_code" in row else ""
        print(f"epoch {row['epoch']}: train {row['train_bits_per_code']:.4f} bits per code{test} "
              f"({row['time_s']:.1f} s)")
    run = Path(args.run)
    print(f"wrote: {run / 'model.safetensors'}, {run / 'config.json'}, {run / PRIOR_METRICS_FILE}")
    print(f"sample with: vaelab sample {args.run} --n 64")
    return 0


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise VaelabError(message)


def _bar(progress: bool, total: int, desc: str):
    if not progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="batch", dynamic_ncols=True, leave=True)
