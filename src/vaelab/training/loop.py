"""The one training loop. Every registered model trains here; read it top to bottom.

Reproducibility: the data order and the model's noise of epoch e come from seeds derived from (seed, e),
and a checkpoint is written at the end of every epoch (and every `checkpoint_every` steps: then with the RNG
states, the step within the epoch and the epoch's partial metrics), so `resume=True` continues exactly where
an uninterrupted run would be: the same weights, bit for bit on a CPU.

A model may train networks beside itself with optimizers of their own (`model.auxiliaries()`, a FactorVAE's
discriminator): each step then updates the model, then each such network on its own loss at the same batch
(`_auxiliary_step`); their optimizers' states travel in every checkpoint with the model's.
"""

from __future__ import annotations

import copy
import json
import math
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from collections.abc import Callable

import torch

from vaelab.config import TrainConfig
from vaelab.data.semisupervised import mixed_batches
from vaelab.errors import ConfigError, DataError, TrainingError
from vaelab.losses import Shaping
from vaelab.models.networks import save_problems
from vaelab.training.checkpoint import (CHECKPOINT_FILE, WEIGHTS_FILE, atomic_write_json, atomic_write_text,
                                        load_checkpoint, save_checkpoint, save_pretrained)
from vaelab.training.corruption import corrupt
from vaelab.training.distributed import Dist
from vaelab.training.runtime import (Meter, autocast, choose_precision, host_identity,  # noqa: F401 (Meter also
                                     keep_freed_memory, pick_measured, step_times_file,  # for old importers)
                                     store_step_times, stored_step_times, time_precisions)
from vaelab.training.schedules import beta_at, capacity_at, lr_at
from vaelab.training.tracking import Tracker, make_tracker
from vaelab.training.validation import loss_terms

METRICS_FILE = "metrics.jsonl"


@dataclass(frozen=True)
class RunFiles:
    """What `fit` keeps in its run directory (`out`), by file name; a None (False) is not written. The defaults
    make a run directory; a caller that keeps the model and its records elsewhere names only the checkpoint
    (vaelab.prior: the code prior lives in its VQ-VAE's files, and its fit in prior_checkpoint.safetensors)."""

    checkpoint: str = CHECKPOINT_FILE  # weights, optimizer, RNG states, history: what resume=True continues
    config: str | None = "config.json"  # the model and training settings, with run_info
    model: bool = True  # save_pretrained: model.safetensors, and the model section of config.json
    metrics: str | None = METRICS_FILE  # the history, one JSON row per epoch


# precision="auto"'s step times (seconds, by precision) and when they were measured ("" = in this process), by what
# they depend on (_Run._measure_key): one measurement per model and setting in a process, so that fitting the same
# model twice (an estimator's refit, a benchmark's seeds) chooses alike even where the cache folder is read-only
_MEASURED: dict[str, tuple[dict[str, float], str]] = {}


def epoch_seed(seed: int, epoch: int) -> int:
    return (seed * 1_000_003 + epoch * 7919 + 17) % (2**63)


def shaping_at(cfg: TrainConfig, step: int, steps_per_epoch: int, dataset_size: int, semi=None) -> Shaping:
    """What the loop adds to the model's loss at optimizer step `step`: the KL schedule's factor on β, the
    capacity target, free bits; with hidden labels (`semi`, data.semisupervised.MixedBatches) the map from the
    classifier weight to its per-sample weight for the batch mix, and the labelled samples' weight on their
    -ELBO (cfg.labelled_bound). The model's loss takes what it honours."""
    epochs = lambda e: round(e * steps_per_epoch)  # noqa: E731  (schedules are set in epochs, run in steps)
    capacity = None
    if cfg.capacity:
        capacity = capacity_at(step, capacity_max=cfg.capacity, capacity_steps=epochs(cfg.capacity_epochs))
    return Shaping(kl_scale=beta_at(step, beta=1.0, schedule=cfg.kl_schedule, warmup_steps=epochs(cfg.kl_warmup),
                                    cycle_steps=epochs(cfg.kl_warmup)),
                   capacity=capacity, free_bits=cfg.free_bits,
                   label_weight=None if semi is None else semi.classifier_weight, dataset_size=dataset_size,
                   labelled_bound=semi.labelled_bound_weight() if semi is not None and cfg.labelled_bound == "paper"
                   else 1.0)


def fit(model, train, val=None, config: TrainConfig | None = None, *, out=None, resume: bool = False,
        run_info: dict | None = None, files: RunFiles = RunFiles(),
        on_epoch: Callable[[list[dict]], None] | None = None, tracker: Tracker | str | None = None,
        **overrides) -> list[dict]:
    """Train `model` on `train` (an ArrayDataset), validating on `val` after every epoch.

    `config` (or keyword overrides such as epochs=5, batch_size=64) sets the training options; `out` is a
    run directory that receives config.json, metrics.jsonl, checkpoint.safetensors and model.safetensors
    (`files` renames them or leaves some out). `run_info` (JSON: the data, the preset, ...) goes into
    config.json and every checkpoint. `on_epoch(history)` is called after every epoch, once its files are
    written (by the process that writes them). Returns the per-epoch metrics. With early stopping, the best
    validation weights are restored at the end.

    `tracker` ('tensorboard', 'mlflow' or a vaelab.training.tracking.Tracker; needs `out`) receives the
    settings, every epoch's row and the final model's files (see vaelab.training.tracking). A tracker given
    by name is fit's own and ends with it; one given as an object is ended by its owner (a `with` block),
    who may log more files first.
    """
    if isinstance(tracker, str):  # fit's own tracker: it ends with the run, FAILED if the run raises
        own = make_tracker(tracker)
        if own is not None:
            with own:
                return fit(model, train, val, config, out=out, resume=resume, run_info=run_info, files=files,
                           on_epoch=on_epoch, tracker=own, **overrides)
        tracker = None
    cfg = (config or TrainConfig()).replace(**overrides).validate()
    _check_fit(model, train, cfg, out)
    if tracker is not None and out is None:
        raise ConfigError(f"tracker {tracker.name} logs a run directory's run: give fit a run directory (out=...)",
                          "tracker")
    run = _Run(model, train, val, cfg, Path(out) if out is not None else None, files=files, run_info=run_info,
               on_epoch=on_epoch, tracker=tracker)
    if resume:
        run.resume()
    run.settle_precision()  # "auto" chooses here (a resumed run keeps its choice)
    if resume and run.start_epoch >= cfg.epochs:  # done already: end as the run did, on its best weights
        if run.best_state is not None:
            model.load_state_dict(run.best_state)
        run.catch_up_tracker()
        return run.history
    run.open()
    for epoch in range(run.start_epoch, cfg.epochs):
        row = run.train_epoch(epoch)
        if run.end_epoch(epoch, row):  # early stopping
            break
    run.close()
    return run.history


def _check_fit(model, train, cfg: TrainConfig, out=None) -> None:
    """Refuse data the model cannot take, options its loss would silently ignore, and (with a run directory) a
    model that could not be saved into it."""
    if tuple(train.sample_shape) != tuple(model.config.input_shape):
        raise DataError(f"the data's sample shape {tuple(train.sample_shape)} does not match the model's "
                        f"input_shape {tuple(model.config.input_shape)}; build the model for this data")
    if len(train) == 0:
        raise DataError("the training set is empty")
    if model.capabilities.conditional and train.y is None:
        raise DataError(f"model {model.config.model!r} is conditional and needs labelled data; the training "
                        "set has no labels (use a dataset with labels, or an unconditional model)")
    # the likelihood's domain (8-bit pixels, [0, 1]) on the first batch's worth of data; its own generator leaves
    # the run's random streams untouched
    probe = train.batch(torch.arange(min(len(train), 1024)), binarize=cfg.binarize,
                        generator=torch.Generator().manual_seed(0))
    problems = model.likelihood.data_problems(probe, "the training data")
    if problems:
        raise DataError(problems[0] + f" (dataset {getattr(train, 'name', '')!r})")
    problems = model.training_problems(cfg)
    if problems:
        raise ConfigError(problems, "training configuration")
    if out is not None:  # networks of the user's own that cannot be recorded: refuse before an epoch is spent
        problems = save_problems(model)
        if problems:
            raise ConfigError(problems, f"model to train into {str(out)!r}")


class _Run:
    """One call of `fit`: what it set up (the world of processes, the optimizer, the batches), and what it
    carries from epoch to epoch and saves in its checkpoints. Its methods are fit's steps, in order: `resume`,
    `open`, then per epoch `train_epoch` (its steps: `_step`, `_step_checkpoint`) and `end_epoch`, and `close`."""

    def __init__(self, model, train, val, cfg: TrainConfig, run_dir: Path | None, *, files: RunFiles = RunFiles(),
                 run_info: dict | None = None, on_epoch: Callable[[list[dict]], None] | None = None,
                 tracker: Tracker | None = None):
        self.model, self.train, self.val, self.cfg, self.run_dir = model, train, val, cfg, run_dir
        self.files, self.run_info, self.on_epoch = files, run_info, on_epoch
        self.checkpoint = run_dir / files.checkpoint if run_dir is not None else None
        # --labels N (semi-supervised): N labels kept, the rest hidden (-1), both kinds in every batch; else None
        self.semi = mixed_batches(model, train, cfg.labels, cfg.seed, cfg.batch_size, cfg.labelled_share)
        if cfg.threads:
            torch.set_num_threads(cfg.threads)
        keep_freed_memory()
        self.dist = Dist.from_env(cfg.device)  # a world of one unless launched by torchrun
        model.to(self.dist.device)
        self.precision_note = None  # what precision="auto" chose and why (settle_precision), printed once
        # the model's optimizer, and one per auxiliary network ({} for almost every model)
        self.optimizer, self.aux_optimizers = make_optimizers(model, cfg.lr)
        self.params = [p for group in self.optimizer.param_groups for p in group["params"]]
        self.main = self.dist.is_main  # only rank 0 writes files and shows progress
        self.n, self.bs = self.semi.epoch_length if self.semi else len(train), cfg.batch_size
        self.steps = math.ceil(self.n / self.bs)  # the last batch may be partial, as in Keras
        self.history: list[dict] = []
        self.start_epoch, self.step = 0, 0  # the first epoch to run (past 0 when resuming), optimizer steps done
        self.best_loss, self.best_state, self.bad_epochs = math.inf, None, 0
        self.position, self.saved = None, {}  # where a checkpoint written inside an epoch left off
        self.net, self.resumed, self.kept_precision = model, False, None
        self.tracker = tracker if run_dir is not None and self.main else None  # only the writing process logs

    def resume(self) -> None:
        """Take up the state of the run's checkpoint: weights, optimizer, history, and (written inside an
        epoch) the position there."""
        if self.run_dir is None:
            raise TrainingError("resume=True needs the run directory (out=...) holding the checkpoint")
        state, self.saved = load_checkpoint(self.checkpoint, self.model, self.optimizer,
                                            auxiliary=self.aux_optimizers)
        self.start_epoch, self.step, self.history = state["epoch"], state["step"], state["history"]
        self.resumed = True
        self.best_loss, self.bad_epochs = state.get("best_loss", math.inf), state.get("bad_epochs", 0)
        self.position = state.get("position")
        self.kept_precision = (state.get("run_info") or {}).get("precision_auto")  # what "auto" chose at the start
        if self.cfg.early_stopping and any(k.startswith("best.") for k in self.saved):
            self.best_state = {k[5:]: v for k, v in self.saved.items() if k.startswith("best.")}

    def settle_precision(self) -> None:
        """precision="auto", resolved once per run, before its files are written: config.json, the checkpoints and
        the tracker then hold the precision it trains in. Where the device computes bf16 natively
        (runtime.choose_precision) a training step of this model on a batch of this data is timed in both
        precisions (runtime.time_precisions, which leaves no trace) and bf16 taken only where it is faster
        (runtime.pick_measured); elsewhere fp32 without measuring. A resumed run keeps its first choice."""
        if self.cfg.precision != "auto":
            if self.kept_precision and self.kept_precision.get("chose") == self.cfg.precision:
                # resumed with the precision auto chose (the command line resumes with config.json's): keep the record
                self.run_info = {"precision_auto": self.kept_precision, **(self.run_info or {})}
            return
        when = ""
        if self.kept_precision:  # its reason kept as written when the run began, however often it resumes
            chosen, why, when = self.kept_precision["chose"], self.kept_precision["why"], " (chosen when the run began)"
            measured = self.kept_precision.get("step_ms")
        else:
            chosen, why = choose_precision(self.dist.device)
            measured = None
            if chosen == "bf16":
                step_s, measured_at = self._step_times()
                chosen, why = pick_measured(step_s, why)
                if measured_at:
                    why += f" (measured on this machine at {measured_at}, kept in {step_times_file()})"
                measured = {k: round(1e3 * v, 3) for k, v in step_s.items()}
        self.cfg = self.cfg.replace(precision=chosen)
        self.run_info = {**(self.run_info or {}),
                         "precision_auto": {"chose": chosen, "why": why, **({"step_ms": measured} if measured else {})}}
        self.precision_note = f"vaelab: --precision auto: {chosen} ({why}){when}"

    def _step_times(self) -> tuple[dict[str, float], str]:
        """The step times "auto" chooses by, and when they were measured ("" = now): this process's measurement
        of the same model and setting, else the one kept in the cache folder (runtime.stored_step_times), else
        measured now and kept there. Every rank ends with the same times: the ranks' mean, and measured afresh
        by all where any lacks a kept one."""
        key = self._measure_key()
        if key in _MEASURED:
            return _MEASURED[key]
        stored = stored_step_times(key)
        fresh = self.dist.any(stored is None)
        local = self._time_precisions() if fresh else stored
        summed = self.dist.all_sum(torch.tensor([local["fp32"], local["bf16"]], dtype=torch.float64,
                                                device=self.dist.device)).tolist()
        step_s = {"fp32": summed[0] / self.dist.world, "bf16": summed[1] / self.dist.world}
        if fresh and self.main:
            threads, world = torch.get_num_threads(), self.dist.world
            store_step_times(key, step_s, f"{self.model.config.model}, batch {self.bs}, {threads} thread"
                                          f"{'s' * (threads != 1)}, {world} process{'es' * (world != 1)}")
        _MEASURED[key] = step_s, "" if fresh else stored["measured"]
        return _MEASURED[key]

    def _measure_key(self) -> str:
        """What a measured step's time depends on: the machine (runtime.host_identity), the model and its
        settings, the batch, the threads and the world; `_MEASURED` and the cache folder hold measurements by it."""
        cfg = self.cfg
        return json.dumps([host_identity(self.dist.device), self.dist.world, type(self.model).__name__,
                           self.model.config.to_dict(), self.bs, torch.get_num_threads(), cfg.binarize,
                           cfg.iw_samples, cfg.noise, bool(self.semi)], sort_keys=True, default=str)

    def _time_precisions(self) -> dict[str, float]:
        """The median seconds of one training step's forward and backward pass in fp32 and in bf16, on a batch of
        the training data drawn with its own generator (this rank's shard of it); every rank takes the same
        number of steps (their mean), as the model's forward pass may gather from all of them."""
        gen = torch.Generator().manual_seed(self.cfg.seed)
        order = self.semi.epoch_order(gen) if self.semi else torch.randperm(self.n, generator=gen)
        batch = order[:self.bs]
        x = self.train.batch(self.dist.shard(batch), binarize=self.cfg.binarize, generator=gen)
        self.model.start_epoch(self.start_epoch)  # the stage it trains in (models/m1m2.py)
        self.model.train()
        dist = self.dist

        def mean(n: int) -> int:
            return round(float(dist.all_sum(torch.tensor([float(n)], device=dist.device))) / dist.world)

        return time_precisions(lambda precision: self._forward_backward(batch, x, gen, precision), self.model,
                               dist.device, agree=mean)

    def open(self) -> None:
        """Write the run's config.json, start the tracker, and wrap the model for the world of processes."""
        writes = self.run_dir is not None and self.main
        if self.precision_note and self.main:
            print(self.precision_note, file=sys.stderr, flush=True)
        settings = _run_config(self.model, self.cfg, self.run_info)
        failed = None
        if self.tracker is not None:  # one that cannot start stops the run here, before a file changes
            try:
                self.tracker.start(self.run_dir, settings, self.history, self.resumed)
            except Exception as e:  # noqa: BLE001 (raised below, once every rank knows)
                failed = e
        if self.dist.any(failed is not None):  # rank 0's tracker failed: every rank stops, none waits for it
            raise failed or TrainingError("rank 0's experiment tracker could not start (its error is on rank 0)")
        if writes and self.files.config:
            atomic_write_json(self.run_dir / self.files.config, settings)
        if self.aux_optimizers and self.dist.active:
            _keep_out_of_ddp(self.model, [a.module for a in self.model.auxiliaries().values()], self.dist)
        self.net = self.dist.wrap(self.model)  # DistributedDataParallel under torchrun: all-reduces the gradients

    def catch_up_tracker(self) -> None:
        """For a resumed run with nothing left to train: give the tracker the epochs and model it lacks (a run
        tracked only from now on, or one whose tracking server was down)."""
        if self.tracker is not None:
            self.tracker.start(self.run_dir, _run_config(self.model, self.cfg, self.run_info), self.history, True)
            self._track_model()

    def train_epoch(self, epoch: int) -> dict:
        """One pass over the training data, then validation: the epoch's row of metrics (appended to history)."""
        cfg, dist = self.cfg, self.dist
        t0 = time.perf_counter()
        torch.manual_seed(epoch_seed(cfg.seed, epoch))  # the model's noise (reparameterization) this epoch
        gen = torch.Generator().manual_seed(epoch_seed(cfg.seed, epoch) + 1)  # data order, binarization
        if self.semi:  # with hidden labels: mixed batches, or uniform ones for a stage that learns without labels
            perm = (self.semi.epoch_order if self.model.mixes_labels(epoch) else self.semi.uniform_order)(gen)
        else:
            perm = torch.randperm(self.n, generator=gen)
        self.model.start_epoch(epoch)
        self.model.train()
        meter = Meter()
        first = 0  # the epoch's first step: past 0 when resuming from a checkpoint written inside it
        if self.position is not None:
            first = _restore_position(self.position, self.saved, meter, gen, dist, self.steps, self.bs, self.n)
            self.position = None
        bar = _progress(cfg, self.steps, f"epoch {epoch + 1}/{cfg.epochs}", first) if self.main else None
        # the global batches' samples of this rank, in step order; a dataset read from files decodes them ahead
        # (workers), the binarization draws from `gen` as each batch is taken
        batches = [perm[i * self.bs:(i + 1) * self.bs] for i in range(first, self.steps)]  # the global batches
        shards = [dist.shard(b) for b in batches]  # this rank's samples of each, the same on every rank
        for i, x in enumerate(self.train.batches(shards, binarize=cfg.binarize, generator=gen), start=first):
            meter.add(self._step(epoch, batches[i - first], x, gen))
            if bar is not None:
                bar.update(1)
                if i % 20 == 0 or i == self.steps - 1:
                    bar.set_postfix({k: f"{v:.4g}" for k, v in meter.means().items() if k in _SHOWN})
            if self.run_dir is not None and cfg.checkpoint_every and self.step % cfg.checkpoint_every == 0 \
                    and i + 1 < self.steps:  # a step checkpoint (the epoch's last step writes the epoch's own)
                self._step_checkpoint(epoch, i + 1, meter, gen)
        row = {"epoch": epoch + 1, "step": self.step}
        row.update({f"train_{k}": v for k, v in meter.reduce(dist).means().items()})
        row.update({f"train_{k}": v for k, v in self.model.epoch_metrics().items()})
        if self.val is not None and len(self.val):
            row.update({f"val_{k}": v for k, v in
                        loss_terms(self.model, self.val, batch_size=max(self.bs, 256), binarize=cfg.binarize,
                                   dist=dist, precision=cfg.precision).items()})
        row["time_s"] = round(time.perf_counter() - t0, 3)
        self.history.append(row)
        if bar is not None:
            bar.set_postfix({k.replace("_", " "): f"{v:.4g}" for k, v in row.items()
                             if k in ("train_loss", "val_loss")})
            bar.close()
        return row

    def _step(self, epoch: int, batch_idx: torch.Tensor, x: torch.Tensor,
              gen: torch.Generator) -> dict[str, torch.Tensor]:
        """One optimizer step on the global batch `batch_idx`, of which this rank holds `x` (train.batch of its
        shard); returns this rank's per-sample loss terms."""
        model, cfg, dist = self.model, self.cfg, self.dist
        out, terms, loss = self._forward_backward(batch_idx, x, gen, cfg.precision)
        if cfg.lr_schedule != "constant":  # a pure function of the step: resumes exactly
            first, last = model.schedule_span(epoch, cfg.epochs)
            lr = lr_at(self.step - first * self.steps, lr=cfg.lr, schedule=cfg.lr_schedule,
                       total_steps=(last - first) * self.steps, lr_min=cfg.lr_min)
            for group in self.optimizer.param_groups:
                group["lr"] = lr
        # the gradients' global L2 norm in one fused pass, (); Inf/NaN when any entry is. One check (and one
        # sync) for loss and gradients, before the weights move; every rank stops together
        grads = [p.grad for p in self.params if p.grad is not None]
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        if dist.any(not bool(torch.isfinite(loss) & torch.isfinite(norm))):
            raise _nonfinite(terms, loss, norm, model, epoch, self.step, self.checkpoint)
        if cfg.grad_clip:  # torch.nn.utils.clip_grad_norm_'s arithmetic, on the norm already computed
            torch._foreach_mul_(grads, (cfg.grad_clip / (norm + 1e-6)).clamp(max=1.0))
        self.optimizer.step()
        if self.aux_optimizers:  # networks with optimizers of their own learn from this step's output
            terms = {**terms, **self._auxiliary_step(out.float(), len(batch_idx), epoch)}
        self.step += 1
        return terms

    def _forward_backward(self, batch_idx: torch.Tensor, x: torch.Tensor, gen: torch.Generator, precision: str):
        """The step's forward pass in `precision`, its per-sample loss terms and the backward pass of the global
        batch's mean loss (the gradients, set afresh): (the model's output, the terms, the loss)."""
        model, cfg, dist, train, semi = self.model, self.cfg, self.dist, self.train, self.semi
        idx = dist.shard(batch_idx)  # this rank's samples of the global batch, the same on every rank
        x = x.to(dist.device)  # (B, C, H, W) / (B, D)
        x_in = corrupt(x, cfg.noise, cfg.noise_level, gen)  # the input the model sees (denoising)
        cond = None
        if model.capabilities.conditional:
            cond = (semi.labels[idx] if semi else train.labels(idx)).to(dist.device)
        with autocast(precision, x):  # bf16 mixed precision when asked for; weights stay fp32
            out = self.net(x_in, cond, n_samples=cfg.iw_samples)
        # per-sample terms in fp32, (B,) each; the clean x is the target
        shaping = shaping_at(cfg, self.step, self.steps, len(train), semi)
        terms = model.loss(x_in, out.float(), target=x, shaping=shaping)
        # the global batch's mean loss: DDP averages the ranks' gradients, so each rank scales its sum
        # by world / global batch size (exact for any split; for one process this is the mean)
        loss = terms["loss"].sum() / len(batch_idx) * dist.world
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        return out, terms, loss

    def _auxiliary_step(self, out, global_batch: int, epoch: int) -> dict[str, torch.Tensor]:
        """One optimizer step of every auxiliary network on its loss at the step's output `out`; returns their
        per-sample terms as <name>_<term>."""
        dist, terms = self.dist, {}
        for name, optimizer in self.aux_optimizers.items():
            own = self.model.auxiliary_loss(name, out)
            loss = own["loss"].sum() / global_batch * dist.world  # the global batch's mean, as the model's
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            grads = [p.grad for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
            if dist.active:  # DDP leaves these networks out (_keep_out_of_ddp): average as it would, in one call
                flat = dist.all_sum(torch.cat([g.flatten() for g in grads])) / dist.world
                for g, v in zip(grads, flat.split([g.numel() for g in grads])):
                    g.copy_(v.view_as(g))
            norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
            if dist.any(not bool(torch.isfinite(loss) & torch.isfinite(norm))):  # before its weights move
                kept = f"; the last good checkpoint is kept in {str(self.checkpoint)!r}" if self.checkpoint else ""
                raise TrainingError(
                    f"non-finite loss or gradient of the model's auxiliary network {name!r} at epoch {epoch + 1}, "
                    f"step {self.step + 1}{kept}. It learns from the model's codes: the model's usual fixes apply "
                    "(a lower --lr, a tighter --logvar-max, data without extreme values)")
            optimizer.step()
            terms.update({f"{name}_{k}": v.detach() for k, v in own.items()})
        return terms

    def _trainer_state(self, epoch: int) -> dict:
        """The JSON part of a checkpoint; `epoch` is the epoch a resumed run starts in."""
        state = {"epoch": epoch, "step": self.step, "history": self.history, "best_loss": self.best_loss,
                 "bad_epochs": self.bad_epochs}
        if self.run_info is not None:  # what run the checkpoint belongs to (a caller reads it back before resuming)
            state["run_info"] = self.run_info
        return state

    def _step_checkpoint(self, epoch: int, epoch_step: int, meter: Meter, gen: torch.Generator) -> None:
        """A checkpoint inside epoch `epoch`, after its step `epoch_step`: with every rank's RNG states and
        partial sums (every rank takes part; rank 0 writes)."""
        state = self._trainer_state(epoch)
        state["position"], extra = _position(epoch_step, self.steps, self.bs, self.n, meter, gen, self.dist)
        if self.main:
            save_checkpoint(self.checkpoint, self.model, self.optimizer, state,
                            {**extra, **_prefixed("best.", self.best_state)}, auxiliary=self.aux_optimizers)

    def end_epoch(self, epoch: int, row: dict) -> bool:
        """The bookkeeping after epoch `epoch`: the best loss so far, the epoch's checkpoint, model and metrics
        files, the tracker. Returns whether early stopping ends the run here."""
        cfg = self.cfg
        monitored = row.get("val_loss", row["train_loss"])
        if monitored < self.best_loss:
            self.best_loss, self.bad_epochs = monitored, 0
            if cfg.early_stopping:
                self.best_state = copy.deepcopy(self.model.state_dict())
        else:
            self.bad_epochs += 1
        stop = bool(cfg.early_stopping) and self.bad_epochs >= cfg.early_stopping
        if self.run_dir is not None and self.main:
            save_checkpoint(self.checkpoint, self.model, self.optimizer, self._trainer_state(epoch + 1),
                            {"rng.torch": torch.get_rng_state(), **_prefixed("best.", self.best_state)},
                            auxiliary=self.aux_optimizers)
            if self.files.model:
                save_pretrained(self.model, self.run_dir)
            if self.files.metrics:
                atomic_write_text(self.run_dir / self.files.metrics,
                                  "".join(json.dumps(r) + "\n" for r in self.history))
        if self.on_epoch is not None and self.main:
            self.on_epoch(self.history)
        if self.tracker is not None:  # after the run's own files: a tracker's failure cannot cost them
            self.tracker.log_epoch(row)
        return stop

    def close(self) -> None:
        """End the run: the best weights under early stopping, the final model's files to the tracker, every rank
        waiting for rank 0's files, the model in eval mode on the CPU."""
        if self.best_state is not None:
            self.model.load_state_dict(self.best_state)  # early stopping: keep the best validation weights
            if self.run_dir is not None and self.main and self.files.model:
                save_pretrained(self.model, self.run_dir)
        self._track_model()
        self.dist.barrier()  # no rank returns before rank 0 has written the final files
        self.model.eval()
        self.model.to("cpu")  # the rest of vaelab (data, pictures, evaluation) works on the CPU

    def _track_model(self) -> None:
        if self.tracker is not None and self.files.model:
            names = [WEIGHTS_FILE] + ([self.files.config] if self.files.config else [])
            self.tracker.log_files([self.run_dir / n for n in names], "model")


_SHOWN = ("loss", "recon", "kl", "bce")


def make_adam(params, lr: float, betas: tuple[float, float] = (0.9, 0.999)) -> torch.optim.Adam:
    """Adam with its fused kernel where this PyTorch has one for the parameters' device (CPUs since 2.4):
    one pass over each parameter instead of a dozen foreach ops, so less time per step goes to the update;
    otherwise the foreach implementation. Same state dict either way, so checkpoints move between them."""
    params = list(params)
    try:
        return torch.optim.Adam(params, lr=lr, betas=betas, fused=True)
    except (RuntimeError, TypeError, ValueError):  # no fused kernel for this device or version
        return torch.optim.Adam(params, lr=lr, betas=betas, foreach=True)


def make_optimizers(model, lr: float) -> tuple[torch.optim.Adam, dict[str, torch.optim.Adam]]:
    """The model's Adam at `lr`, over every parameter but its auxiliary networks' (`model.auxiliaries()`), and
    one Adam per auxiliary network, over that network's parameters alone, with its own lr and betas."""
    aux = model.auxiliaries()
    if not aux:
        return make_adam(model.parameters(), lr), {}
    theirs = {id(p) for a in aux.values() for p in a.module.parameters()}
    main = make_adam([p for p in model.parameters() if id(p) not in theirs], lr)
    return main, {name: make_adam(a.module.parameters(), a.lr, a.betas) for name, a in aux.items()}


def _keep_out_of_ddp(model, modules: list, dist: Dist) -> None:
    """Under DDP: leave the auxiliary networks `modules` out of DistributedDataParallel, and start them on every
    rank from rank 0's weights (as DDP does for the rest). DDP expects a gradient for each of its parameters from
    the model's backward; theirs come from their own losses after it, and `_Run._auxiliary_step` averages them."""
    theirs = [t for m in modules for t in (*m.parameters(), *m.buffers())]
    ids = {id(t) for t in theirs}
    names = [n for n, t in (*model.named_parameters(), *model.named_buffers()) if id(t) in ids]
    torch.nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, names)
    with torch.no_grad():
        for t in theirs:  # rank 0's values, exactly (x + 0 + ... + 0)
            t.copy_(dist.all_sum(t if dist.is_main else torch.zeros_like(t)))


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
            "that epoch needs the same batch size (and labelled share), training data and number of processes "
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
               checkpoint: Path | None) -> TrainingError:
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
    kept = (f"; the last good checkpoint is kept in {str(checkpoint)!r} (resume with --resume "
            "after changing the settings)") if checkpoint is not None else ""
    return TrainingError(
        f"{what}{kept}. Usual fixes: lower the learning rate (--lr), clip gradients (--grad-clip 1.0), clamp "
        "the log-variance tighter (--logvar-max 10, --logvar-min -10), or check the data for extreme values")


def _run_config(model, cfg: TrainConfig, run_info: dict | None) -> dict:
    """What config.json holds (and a tracker gets as the run's settings)."""
    from vaelab.config import FORMAT_VERSION

    payload = {"format_version": FORMAT_VERSION, "model": model.config.to_dict(), "train": cfg.to_dict()}
    payload.update(run_info or {})
    return payload
