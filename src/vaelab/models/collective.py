"""The collectives a model's own training-mode arithmetic needs under `torchrun` (the VQ-VAE's codebook
updates, M1+M2's choice of active code dimensions), each a no-op in one process. The training loop's gradient
all-reduce is DistributedDataParallel's, not these."""

from __future__ import annotations

import torch
import torch.distributed as tdist


def distributed() -> bool:
    return tdist.is_available() and tdist.is_initialized() and tdist.get_world_size() > 1


def all_sum(t: torch.Tensor) -> torch.Tensor:
    if distributed():
        tdist.all_reduce(t, op=tdist.ReduceOp.SUM)
    return t


def global_batch(flat: torch.Tensor, per_sample: int) -> torch.Tensor:
    """The rows (N, D) of the whole global batch, in the order one process would see them, from this rank's
    shard flat (n, D) of them, per_sample rows per sample; flat itself when not distributed.

    The training loop gives rank r the samples r, r + W, r + 2W, ... of each global batch (Dist.shard), so
    sample j of the global batch is sample j // W of rank j % W. Every rank returns the same tensor."""
    if not distributed():
        return flat
    world, dim = tdist.get_world_size(), flat.shape[1]
    size = torch.tensor([len(flat) // per_sample], device=flat.device)
    sizes = [torch.zeros_like(size) for _ in range(world)]
    tdist.all_gather(sizes, size)  # samples per rank: the shards differ by one when W does not divide B
    sizes = [int(n) for n in sizes]
    padded = flat.new_zeros(max(sizes) * per_sample, dim)  # all_gather needs equal sizes
    padded[:len(flat)] = flat
    parts = [torch.empty_like(padded) for _ in range(world)]
    tdist.all_gather(parts, padded.contiguous())
    out = flat.new_empty(sum(sizes), per_sample, dim)
    for rank, (part, n) in enumerate(zip(parts, sizes)):
        out[rank::world] = part[:n * per_sample].view(n, per_sample, dim)
    return out.view(-1, dim)


def broadcast(t: torch.Tensor) -> torch.Tensor:
    if distributed():
        tdist.broadcast(t, src=0)
    return t


__all__ = ["all_sum", "broadcast", "distributed", "global_batch"]
