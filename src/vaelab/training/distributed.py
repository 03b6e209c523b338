"""PyTorch DistributedDataParallel under `torchrun`, and the single-process case as the same object.

torchrun sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT; `Dist.from_env()` reads them and
joins the process group (gloo on CPU, NCCL on GPUs). Without them it is a world of one and every method is a
no-op, so the one training loop reads the same either way.

How a global batch is split: `--batch-size` is the global batch. Every rank draws the same permutation
(same seed), takes the same global batch, and keeps the samples at positions rank, rank + W, ...; each
rank's loss is its per-sample sum times W / (global batch size), so DDP's gradient average equals the
gradient of the global batch's mean loss exactly, whatever the split.
"""

from __future__ import annotations

import atexit
import datetime
import functools
import os
from dataclasses import dataclass

import torch
import torch.distributed as tdist

from vaelab.errors import ConfigError


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @classmethod
    def from_env(cls, device: str | None = None) -> "Dist":
        world = int(os.environ.get("WORLD_SIZE", "1"))
        if world <= 1:
            return cls(device=resolve_device(device))
        rank, local_rank = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
        dev = resolve_device(device, local_rank)
        if not tdist.is_initialized():
            backend = "nccl" if dev.type == "cuda" else "gloo"
            if dev.type == "cuda":
                torch.cuda.set_device(dev)
            tdist.init_process_group(backend=backend)
        _leave_at_exit()
        return cls(rank=rank, world=world, local_rank=local_rank, device=dev)

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, idx: torch.Tensor) -> torch.Tensor:
        """This rank's part of a global batch of indices."""
        return idx[self.rank::self.world] if self.active else idx

    def wrap(self, model: torch.nn.Module) -> torch.nn.Module:
        if not self.active:
            return model
        if any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in model.modules()):
            model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(model)
        ids = [self.device.index] if self.device.type == "cuda" else None
        # a model trained in stages leaves some parameters without a gradient in a step: DDP must look for them
        unused = bool(getattr(model, "partial_gradients", False))
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids, find_unused_parameters=unused)

    def all_sum(self, t: torch.Tensor) -> torch.Tensor:
        if self.active:
            t = t.clone()
            tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
        return t

    def any(self, flag: bool) -> bool:
        """True on every rank when `flag` is true on any rank (so all stop together, none hangs)."""
        if not self.active:
            return flag
        return bool(self.all_sum(torch.tensor([1.0 if flag else 0.0], device=self.device)).item() > 0)

    def barrier(self) -> None:
        if self.active:
            tdist.barrier()

    def broadcast_object(self, obj):
        if not self.active:
            return obj
        box = [obj]
        tdist.broadcast_object_list(box, src=0)
        return box[0]


@functools.cache  # once per process
def _leave_at_exit() -> None:
    """Leave the group before the interpreter tears down, also a group the caller created itself.

    A rank that exits with its gloo connections open can abort ("terminate called without an active
    exception") when its peer closes first."""
    atexit.register(_leave)


def _leave() -> None:
    """Leave the process group at exit, after the other ranks have arrived too (at most 10 s).

    A gloo rank whose peer tears its connections down first can still abort in a background thread (SIGABRT
    at exit, seen in 3 of about 40 two-rank test runs here without this barrier). A rank leaving after an
    error waits at most the timeout for the others, then leaves anyway. (NCCL has no bounded barrier: there
    the group is left at once.)"""
    if not tdist.is_initialized():
        return
    if tdist.get_backend() == "gloo":
        try:
            tdist.monitored_barrier(timeout=datetime.timedelta(seconds=10))
        except Exception:  # a peer gone or stuck: leave without it
            pass
    tdist.destroy_process_group()


def resolve_device(device: str | None = None, local_rank: int = 0) -> torch.device:
    """"auto"/None: the local rank's GPU when CUDA is available, else the CPU."""
    if device in (None, "auto"):
        return torch.device(f"cuda:{local_rank}") if torch.cuda.is_available() else torch.device("cpu")
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device(f"cuda:{local_rank}")
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={device!r} asks for a CUDA GPU, but torch {torch.__version__} sees none on this "
                          "machine (torch.cuda.is_available() is False); use --device cpu (or auto): a run trained "
                          "on a GPU resumes, evaluates and samples on a CPU", "training settings")
    if dev.type == "cuda" and dev.index >= torch.cuda.device_count():
        raise ConfigError(f"device={str(dev)!r}: this machine has {torch.cuda.device_count()} CUDA GPU(s), "
                          f"cuda:0..cuda:{torch.cuda.device_count() - 1}; choose one of them, or cpu or auto",
                          "training settings")
    return dev


def unwrap(model: torch.nn.Module) -> torch.nn.Module:
    return model.module if isinstance(model, torch.nn.parallel.DistributedDataParallel) else model
