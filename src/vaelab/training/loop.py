"""The one training loop. Every registered model trains here; read it top to bottom.

Reproducibility: the data order and the model's noise of epoch e come from seeds derived from (seed, e),
and a checkpoint is written at the end of every epoch (and every `checkpoint_every` steps: then with the RNG
states, the step within the epoch and the epoch's partial metrics), so `resume=True` continues exactly where
an uninterrupted run would be: the same weights, bit for bit on a CPU.
"""

from __future__ import annotations

import copy
import functools
import json
import math
import os
import time
from pathlib import Path

import torch

from vaelab.config import TrainConfig
from vaelab.data.semisupervised import mixed_batches
from vaelab.errors import ConfigError, DataError, TrainingError
from vaelab.training.checkpoint import (CHECKPOINT_FILE, atomic_write_json, atomic_write_text,
                                        load_checkpoint, save_checkpoint, save_pretrained)
from vaelab.training.corruption import corrupt
from vaelab.training.distributed import Dist
from vaelab.losses import Shaping
from vaelab.training.schedules import beta_at, capacity_at, lr_at

METRICS_FILE = "metrics.jsonl"


def epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch * 7919 + 17) % (2**63)


def shaping_at(cfg: TrainConfig, step: int, steps_per_epoch: int, dataset_size: int, semi=None) -> Shaping:
    """What the loop adds to the model's loss at optimizer step `step`: the KL schedule's factor on β, the
    capacity target, free bits; with hidden labels (`semi`, data.semisupervised.MixedBatches) the map from the
    classifier weight to its per-sample weight for the batch mix. The model's loss takes what it honours."""
    epochs = lambda e: round(e * steps_per_epoch)  # noqa: E731  (schedules are set in epochs, run in steps)
    capacity = None
    if cfg.capacity:
        capacity = capacity_at(step, capacity_max=cfg.capacity, capacity_steps=epochs(cfg.capacity_epochs))
    return Shaping(kl_scale=beta_at(step, beta=1.0, schedule=cfg.kl_schedule, warmup_steps=epochs(cfg.kl_warmup),
                                    cycle_steps=epochs(cfg.kl_warmup)),
                   capacity=capacity, free_bits=cfg.free_bits,
                   label_weight=None if semi is None else semi.classifier_weight, dataset_size=dataset_size)


class Meter:
    """Sums of per-sample loss terms, kept as tensors so the hot loop never waits on `.item()`."""

    def __init__(self):
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0

    def add(self, terms: dict[str, torch.Tensor]) -> None:
        for k, v in terms.items():
            s = v.detach().sum()
            self.sums[k] = self.sums[k] + s if k in self.sums else s
        self.count += next(iter(terms.values())).shape[0]

    def means(self) -> dict[str, float]:
        return {k: float(v) / max(self.count, 1) for k, v in self.sums.items()}

    def reduce(self, dist: Dist) -> "Meter":
        """Sum over all ranks (in place), so every rank reports the global means."""
        if dist.active and self.sums:
            keys = sorted(self.sums)
            total = dist.all_sum(torch.stack([self.sums[k].double() for k in keys]
                                             + [torch.tensor(float(self.count), dtype=torch.float64)]))
            self.sums = dict(zip(keys, total[:-1]))
            self.count = int(total[-1])
        return self


def fit(model, train, val=None, config: TrainConfig | None = None, *, out=None, resume: bool = False,
        run_info: dict | None = None, **overrides) -> list[dict]:
    """Train `model` on `train` (an ArrayDataset), validating on `val` after every epoch.

    `config` (or keyword overrides such as epochs=5, batch_size=64) sets the training options; `out` is a
    run directory that receives config.json, metrics.jsonl, checkpoint.safetensors and model.safetensors.
    Returns the per-epoch metrics. With early stopping, the best validation weights are restored at the end.
    """
    from vaelab.evaluation import loss_terms

    cfg = (config or TrainConfig()).replace(**overrides).validate()
    if tuple(train.sample_shape) != tuple(model.config.input_shape):
        raise DataError(f"the data's sample shape {tuple(train.sample_shape)} does not match the model's "
                        f"input_shape {tuple(model.config.input_shape)}; build the model for this data")
    if len(train) == 0:
        raise DataError("the training set is empty")
    if model.capabilities.conditional and train.y is None:
        raise DataError(f"model {model.config.model!r} is conditional and needs labelled data; the training "
                        "set has no labels (use a dataset with labels, or an unconditional model)")
    problems = model.training_problems(cfg)  # options its loss would silently ignore are refused
    if problems:
        raise ConfigError(problems, "training configuration")
    # --labels N (semi-supervised): N labels kept, the rest hidden (-1), both kinds in every batch; else None
    semi = mixed_batches(model, train, cfg.labels, cfg.seed, cfg.batch_size)
    if cfg.threads:
        torch.set_num_threads(cfg.threads)
    keep_freed_memory()
    dist = Dist.from_env(cfg.device)  # a world of one unless launched by torchrun
    model.to(dist.device)
    optimizer = make_adam(model.parameters(), cfg.lr)
    params = list(model.parameters())
    run_dir = Path(out) if out is not None else None
    main = dist.is_main  # only rank 0 writes files and shows progress

    history: list[dict] = []
    start_epoch, global_step = 0, 0
    best_loss, best_state, bad_epochs = math.inf, None, 0
    position, saved = None, {}  # where a checkpoint written inside an epoch left off
    if resume:
        if run_dir is None:
            raise TrainingError("resume=True needs the run directory (out=...) holding the checkpoint")
        state, saved = load_checkpoint(run_dir / CHECKPOINT_FILE, model, optimizer)
        start_epoch, global_step, history = state["epoch"], state["step"], state["history"]
        best_loss, bad_epochs = state.get("best_loss", math.inf), state.get("bad_epochs", 0)
        position = state.get("position")
        if cfg.early_stopping and any(k.startswith("best.") for k in saved):
            best_state = {k[5:]: v for k, v in saved.items() if k.startswith("best.")}
        if start_epoch >= cfg.epochs:
            if best_state is not None:  # done already: end as the run did, on its best weights
                model.load_state_dict(best_state)
            return history
    if run_dir is not None and main:
        _write_run_config(run_dir, model, cfg, run_info)
    writer = _tensorboard(run_dir) if main else None
    net = dist.wrap(model)  # DistributedDataParallel under torchrun: all-reduces the gradients

    n, bs = semi.epoch_length if semi else len(train), cfg.batch_size
    steps = math.ceil(n / bs)  # the last batch may be partial, as in Keras
    for epoch in range(start_epoch, cfg.epochs):
        t0 = time.perf_counter()
        torch.manual_seed(epoch_seed(cfg.seed, epoch))  # the model's noise (reparameterization) this epoch
        gen = torch.Generator().manual_seed(epoch_seed(cfg.seed, epoch) + 1)  # data order, binarization
        perm = semi.epoch_order(gen) if semi else torch.randperm(n, generator=gen)
        model.train()
        meter = Meter()
        first = 0  # the epoch's first step: past 0 when resuming from a checkpoint written inside it
        if position is not None:
            first = _restore_position(position, saved, meter, gen, dist, steps, bs, n)
            position = None
        bar = _progress(cfg, steps, f"epoch {epoch + 1}/{cfg.epochs}", first) if main else None
        for i in range(first, steps):
            batch_idx = perm[i * bs:(i + 1) * bs]  # the global batch, the same on every rank
            idx = dist.shard(batch_idx)  # this rank's samples of it
            x = train.batch(idx, binarize=cfg.binarize, generator=gen).to(dist.device)  # (B, C, H, W) / (B, D)
            x_in = corrupt(x, cfg.noise, cfg.noise_level, gen)  # the input the model sees (denoising)
            cond = (semi.labels[idx] if semi else train.labels(idx)).to(dist.device) if model.capabilities.conditional else None
            with autocast(cfg.precision, x):  # bf16 mixed precision when asked for; weights stay fp32
                out = net(x_in, cond, n_samples=cfg.iw_samples)
            # per-sample terms in fp32, (B,) each; the clean x is the target
            terms = model.loss(x_in, out.float(), target=x, shaping=shaping_at(cfg, global_step, steps, len(train), semi))
            # the global batch's mean loss: DDP averages the ranks' gradients, so each rank scales its sum
            # by world / global batch size (exact for any split; for one process this is the mean)
            loss = terms["loss"].sum() / len(batch_idx) * dist.world
            optimizer.zero_grad(set_to_none=True)
            if cfg.lr_schedule != "constant":  # a pure function of the step: resumes exactly
                lr = lr_at(global_step, lr=cfg.lr, schedule=cfg.lr_schedule, total_steps=cfg.epochs * steps,
                           lr_min=cfg.lr_min)
                for group in optimizer.param_groups:
                    group["lr"] = lr
            loss.backward()
            # the gradients' global L2 norm in one fused pass, (); Inf/NaN when any entry is. One check (and one
            # sync) for loss and gradients, before the weights move; every rank stops together
            grads = [p.grad for p in params if p.grad is not None]
            norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
            if dist.any(not bool(torch.isfinite(loss) & torch.isfinite(norm))):
                raise _nonfinite(terms, loss, norm, model, epoch, global_step, run_dir)
            if cfg.grad_clip:  # torch.nn.utils.clip_grad_norm_'s arithmetic, on the norm already computed
                torch._foreach_mul_(grads, (cfg.grad_clip / (norm + 1e-6)).clamp(max=1.0))
            optimizer.step()
            global_step += 1
            meter.add(terms)
            if bar is not None:
                bar.update(1)
                if i % 20 == 0 or i == steps - 1:
                    bar.set_postfix({k: f"{v:.4g}" for k, v in meter.means().items() if k in _SHOWN})
            if run_dir is not None and cfg.checkpoint_every and global_step % cfg.checkpoint_every == 0 \
                    and i + 1 < steps:  # a step checkpoint (the epoch's last step writes the epoch's own)
                state = {"epoch": epoch, "step": global_step, "history": history, "best_loss": best_loss,
                         "bad_epochs": bad_epochs}
                state["position"], extra = _position(i + 1, steps, bs, n, meter, gen, dist)
                if main:
                    save_checkpoint(run_dir / CHECKPOINT_FILE, model, optimizer, state,
                                    {**extra, **_prefixed("best.", best_state)})
        row = {"epoch": epoch + 1, "step": global_step}
        row.update({f"train_{k}": v for k, v in meter.reduce(dist).means().items()})
        row.update({f"train_{k}": v for k, v in model.epoch_metrics().items()})
        if val is not None and len(val):
            row.update({f"val_{k}": v for k, v in
                        loss_terms(model, val, batch_size=max(bs, 256), binarize=cfg.binarize, dist=dist,
                                   precision=cfg.precision).items()})
        row["time_s"] = round(time.perf_counter() - t0, 3)
        history.append(row)
        if bar is not None:
            bar.set_postfix({k.replace("_", " "): f"{v:.4g}" for k, v in row.items()
                             if k in ("train_loss", "val_loss")})
            bar.close()

        monitored = row.get("val_loss", row["train_loss"])
        if monitored < best_loss:
            best_loss, bad_epochs = monitored, 0
            if cfg.early_stopping:
                best_state = copy.deepcopy(model.state_dict())
        else:
            bad_epochs += 1
        stop = bool(cfg.early_stopping) and bad_epochs >= cfg.early_stopping
        if run_dir is not None and main:
            state = {"epoch": epoch + 1, "step": global_step, "history": history, "best_loss": best_loss,
                     "bad_epochs": bad_epochs}
            save_checkpoint(run_dir / CHECKPOINT_FILE, model, optimizer, state,
                            {"rng.torch": torch.get_rng_state(), **_prefixed("best.", best_state)})
            save_pretrained(model, run_dir)
            atomic_write_text(run_dir / METRICS_FILE, "".join(json.dumps(r) + "\n" for r in history))
        if writer is not None:
            for k, v in row.items():
                if k not in ("epoch", "step"):
                    writer.add_scalar(k.replace("_", "/", 1), v, epoch + 1)
            writer.flush()
        if stop:
            break

    if best_state is not None:
        model.load_state_dict(best_state)  # early stopping: keep the best validation weights
        if run_dir is not None and main:
            save_pretrained(model, run_dir)
    if writer is not None:
        writer.close()
    dist.barrier()  # no rank returns before rank 0 has written the final files
    model.eval()
    model.to("cpu")  # the rest of vaelab (data, pictures, evaluation) works on the CPU
    return history


_SHOWN = ("loss", "recon", "kl", "bce")


def make_adam(params, lr: float) -> torch.optim.Adam:
    """Adam with its fused kernel where this PyTorch has one for the parameters' device (CPUs since 2.4):
    one pass over each parameter instead of a dozen foreach ops, so less time per step goes to the update;
    otherwise the foreach implementation. Same state dict either way, so checkpoints move between them."""
    params = list(params)
    try:
        return torch.optim.Adam(params, lr=lr, fused=True)
    except (RuntimeError, TypeError, ValueError):  # no fused kernel for this device or version
        return torch.optim.Adam(params, lr=lr, foreach=True)


def autocast(precision: str, x: torch.Tensor):
    """The forward pass's autocast context: bf16 matmuls and convolutions for precision="bf16" (faster on a
    CPU with AVX-512 BF16); a no-op for "fp32"."""
    return torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


@functools.cache
def keep_freed_memory() -> bool:
    """Make glibc keep freed memory for reuse instead of returning it to the OS (once per process).

    A training step allocates and frees the same multi-MB activation tensors every time. glibc serves
    such sizes with fresh mmap()s and trims its heap on free, so each step page-faults its activations in
    again, which can take a large share of a small model's step on a CPU (PyTorch's CPU tuning guide
    recommends jemalloc/tcmalloc for the same reason). Raising the mmap threshold to glibc's maximum
    (32 MiB) and turning off heap trimming keeps the pages mapped; the process's memory then stays at its
    peak. A no-op on other C libraries.
    """
    try:
        if not os.confstr("CS_GNU_LIBC_VERSION").startswith("glibc"):
            return False
        import ctypes

        libc = ctypes.CDLL("libc.so.6")
        m_trim_threshold, m_mmap_threshold = -1, -3  # mallopt parameter numbers from <malloc.h>
        return bool(libc.mallopt(m_mmap_threshold, 32 * 2**20) and libc.mallopt(m_trim_threshold, 2**31 - 1))
    except (ValueError, OSError, AttributeError):  # no confstr name, no glibc, no mallopt
        return False


def _progress(cfg: TrainConfig, total: int, desc: str, initial: int = 0):
    if not cfg.progress:
        return None
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="batch", dynamic_ncols=True, leave=True, initial=initial)


def _prefixed(prefix: str, tensors: dict | None) -> dict:
    return {prefix + k: v for k, v in (tensors or {}).items()}


def _gather(dist: Dist, t: torch.Tensor) -> torch.Tensor:
    """Every rank's `t` stacked, (world, *t.shape), on every rank, in t's dtype. A sum of zero-padded float64
    rows, so it works on any backend and is exact for bytes (RNG states), counts and float32/64 sums."""
    rows = torch.zeros(dist.world, t.numel(), dtype=torch.float64, device=dist.device)
    rows[dist.rank] = t.detach().flatten().to(dist.device, torch.float64)
    return dist.all_sum(rows).cpu().to(t.dtype).view(dist.world, *t.shape)


def _position(epoch_step: int, steps: int, batch_size: int, samples: int, meter: Meter, gen: torch.Generator,
              dist: Dist) -> tuple[dict, dict[str, torch.Tensor]]:
    """Where the run stands inside an epoch, for a step checkpoint: (JSON part, tensors). The tensors hold
    every rank's RNG states (the model's noise, and the data generator's: order, binarization, corruption)
    and its partial sums of the epoch's metrics, (world, ...) each. Every rank calls it at the same step."""
    keys = list(meter.sums)  # in the order the loss returns them (the same on every rank)
    mine = {"rng.torch": torch.get_rng_state(), "rng.data": gen.get_state(),
            "meter.sums": torch.stack([meter.sums[k].detach() for k in keys]),
            "meter.count": torch.tensor([meter.count], dtype=torch.int64)}
    if dist.device.type == "cuda":
        mine["rng.cuda"] = torch.cuda.get_rng_state(dist.device)
    position = {"epoch_step": epoch_step, "steps": steps, "batch_size": batch_size, "samples": samples,
                "world": dist.world, "meter_keys": keys}
    return position, {k: _gather(dist, v) for k, v in mine.items()}


def _restore_position(position: dict, saved: dict[str, torch.Tensor], meter: Meter, gen: torch.Generator,
                      dist: Dist, steps: int, batch_size: int, samples: int) -> int:
    """Put this rank back where a step checkpoint left it (see `_position`); returns the next step."""
    now = {"batch_size": batch_size, "samples": samples, "steps": steps, "world": dist.world}
    changed = [f"{k}={position.get(k)!r} then, {v!r} now" for k, v in now.items() if position.get(k) != v]
    if changed:
        raise TrainingError(
            f"the checkpoint was written after step {position.get('epoch_step')} of an epoch, and continuing "
            "that epoch needs the same batch size, training data and number of processes "
            f"({'; '.join(changed)}); resume with --batch-size {position.get('batch_size')} on the same data "
            f"and {position.get('world')} process(es)")
    r = dist.rank
    torch.set_rng_state(saved["rng.torch"][r].clone())
    gen.set_state(saved["rng.data"][r].clone())
    if dist.device.type == "cuda" and "rng.cuda" in saved:
        torch.cuda.set_rng_state(saved["rng.cuda"][r].clone(), dist.device)
    meter.sums = {k: v.to(dist.device) for k, v in zip(position["meter_keys"], saved["meter.sums"][r])}
    meter.count = int(saved["meter.count"][r, 0])
    return position["epoch_step"]


def _nonfinite(terms: dict, loss: torch.Tensor, norm: torch.Tensor, model, epoch: int, step: int,
               run_dir) -> TrainingError:
    """The error for a non-finite loss or gradient: which step, which terms or parameters, and what to do."""
    where = f"epoch {epoch + 1}, step {step + 1}"
    if not torch.isfinite(loss):
        bad = [k for k, v in terms.items() if not torch.isfinite(v).all()]
        what = f"non-finite loss at {where} (terms: {', '.join(bad) or 'loss'})"
    else:
        bad = [name for name, p in model.named_parameters()
               if p.grad is not None and not torch.isfinite(p.grad).all()]
        if bad:
            what = (f"non-finite gradient at {where}: NaN/Inf in the gradient of {len(bad)} parameter(s) "
                    f"({', '.join(bad[:6])}{', ...' if len(bad) > 6 else ''}), with a finite loss "
                    f"{float(loss.detach()):.6g}")
        elif not torch.isfinite(norm):
            what = (f"gradient norm overflow at {where}: every gradient entry is finite but their norm "
                    "exceeds float32's range (about 3.4e38)")
        else:
            what = f"non-finite loss or gradient on another process at {where}"
    kept = (f"; the last good checkpoint is kept in {str(run_dir / CHECKPOINT_FILE)!r} (resume with --resume "
            "after changing the settings)") if run_dir is not None else ""
    return TrainingError(
        f"{what}{kept}. Usual fixes: lower the learning rate (--lr), clip gradients (--grad-clip 1.0), clamp "
        "the log-variance tighter (--logvar-max 10, --logvar-min -10), or check the data for extreme values")


def _write_run_config(run_dir: Path, model, cfg: TrainConfig, run_info: dict | None) -> None:
    from vaelab.config import FORMAT_VERSION

    payload = {"format_version": FORMAT_VERSION, "model": model.config.to_dict(), "train": cfg.to_dict()}
    payload.update(run_info or {})
    atomic_write_json(run_dir / "config.json", payload)


def _tensorboard(run_dir):
    if run_dir is None:
        return None
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:  # TensorBoard is optional: not installed means no event files
        return None
    return SummaryWriter(log_dir=str(run_dir / "tensorboard"))
