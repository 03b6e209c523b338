"""The vector quantizer of the VQ-VAE (van den Oord et al. 2017, https://arxiv.org/abs/1711.00937).

A codebook of K vectors of size D. Every D-vector of the encoder's output map z_e (B, D, *grid) is replaced by
its nearest code: z_q = e_k with k = argmin_j ||z_e - e_j||^2. This module owns the codebook and how it moves;
the straight-through gradient and the commitment loss live in the model and the loss.

How the codebook moves, and what keeps it healthy:
- EMA updates (the paper's appendix A.1, the default): each code is the exponential moving average (decay
  0.99) of the encoder outputs assigned to it, kept as a running count N_k and a running sum m_k, e_k =
  m_k / N_k. Laplace smoothing of the counts (Sonnet's VQ-VAE) keeps an unused code's division finite.
  Alternatively (ema=False) the codebook is a parameter trained by the codebook loss ||sg(z_e) - e||^2.
- k-means initialization from the first training batch (Lloyd's algorithm), so every code starts where the
  encoder's outputs are rather than at a random point most outputs never come near (the collapse where a
  few codes take all the data; Jukebox, Dhariwal et al. 2020, and Lancucki et al. 2020 use the same fix).
- dead-code restart: a code no encoder output has chosen for `restart_after` consecutive training steps is
  moved onto a random encoder output of the current batch, so it takes part again (Jukebox's restarts,
  https://arxiv.org/abs/2005.00341).
- distances and the codebook in fp32 even inside a bf16 autocast region: bf16 keeps 8 bits of mantissa, too
  few to tell nearby codes apart or to accumulate a 0.99-decay average.
- distributed training: the per-step counts and sums are all-reduced before the EMA update; k-means and the
  restarts work on the global batch, gathered from every rank's shard back into its one-process order, and
  their result is broadcast from rank 0. So every rank holds the same codebook, and a run on W processes
  moves it as one process does on the same global batch (tests/test_distributed_vq.py checks both).

The codebook moves only in training mode; evaluation (model.eval()) reads it and changes nothing.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from vaelab.models.collective import all_sum, broadcast, global_batch

KMEANS_ITERS = 10  # Lloyd iterations of the initialization; the first batch is small, this is cheap


class VectorQuantizer(nn.Module):
    """Nearest-code quantization of (B, D, *grid) maps against a codebook of K codes of size D.

    forward(z_e) -> (z_q, indices): z_q (B, D, *grid) in fp32, the chosen codes (differentiable with respect
    to the codebook when ema=False), and indices (B, *grid) int64. An updating call (training mode) also
    initializes the codebook (k-means, first call), moves it (EMA) and restarts dead codes.
    """

    def __init__(self, codebook_size: int, dim: int, *, ema: bool = True, decay: float = 0.99, eps: float = 1e-5,
                 kmeans_init: bool = True, restart_after: int = 20):
        super().__init__()
        self.codebook_size, self.dim = codebook_size, dim
        self.ema, self.decay, self.eps = ema, decay, eps
        self.restart_after = restart_after
        # without k-means, the common nn.Embedding-style start: all codes in a tiny cube around the origin
        init = torch.empty(codebook_size, dim).uniform_(-1.0 / codebook_size, 1.0 / codebook_size)
        if ema:
            self.register_buffer("codebook", init)  # (K, D), e_k = embed_sum_k / cluster_size_k (smoothed)
            self.register_buffer("cluster_size", torch.ones(codebook_size))  # N_k, running count
            self.register_buffer("embed_sum", init.clone())  # m_k, running sum of the assigned outputs
        else:
            self.codebook = nn.Parameter(init)
        self.register_buffer("initialized", torch.tensor(not kmeans_init))
        self.register_buffer("unused_steps", torch.zeros(codebook_size, dtype=torch.int64))
        # usage since the last `usage()` call (the training epoch's), for the metrics; not saved
        self.register_buffer("counts", torch.zeros(codebook_size, dtype=torch.float64), persistent=False)
        self.register_buffer("restarts", torch.zeros((), dtype=torch.int64), persistent=False)

    def extra_repr(self) -> str:
        return (f"codebook_size={self.codebook_size}, dim={self.dim}, ema={self.ema}, "
                f"restart_after={self.restart_after}")

    def forward(self, z_e: torch.Tensor, update: bool | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """update: whether this call moves the codebook (k-means init, EMA, restarts); default: in training
        mode. The VQ-VAE passes `training and grad enabled`, so inference-mode calls never move it."""
        update = self.training if update is None else update
        grid = z_e.shape[2:]
        with torch.autocast(z_e.device.type, enabled=False):  # fp32 whatever the caller's precision
            flat = z_e.float().movedim(1, -1).reshape(-1, self.dim)  # (N, D), N = B * prod(grid)
            per_sample = math.prod(grid)  # rows of flat per sample
            if update and not bool(self.initialized):
                self._kmeans_init(global_batch(flat.detach(), per_sample))
            indices = self.nearest(flat.detach())  # (N,)
            z_q = F.embedding(indices, self.codebook.float())  # (N, D): gathered before any update below
            if update:
                self._update(flat.detach(), indices, per_sample)
        z_q = z_q.view(z_e.shape[0], *grid, self.dim).movedim(-1, 1)  # (B, D, *grid)
        return z_q, indices.view(z_e.shape[0], *grid)

    def nearest(self, flat: torch.Tensor) -> torch.Tensor:
        """Index of the nearest code of each row of flat (N, D) -> (N,), in fp32."""
        return _nearest(flat.float(), self.codebook.detach().float())

    def lookup(self, indices: torch.Tensor) -> torch.Tensor:
        """The code vectors of an index map (B, *grid) -> (B, D, *grid), fp32."""
        return F.embedding(indices, self.codebook.detach().float()).movedim(-1, 1)

    # ------------------------------------------------------------------------------------- training updates

    @torch.no_grad()
    def _kmeans_init(self, flat: torch.Tensor) -> None:
        centroids, counts = kmeans(flat, self.codebook_size)
        centroids, counts = broadcast(centroids), broadcast(counts)  # rank 0's result on every rank
        self.codebook.data.copy_(centroids)
        if self.ema:
            self.cluster_size.copy_(counts.clamp(min=1.0))  # e_k = m_k / N_k holds from the start
            self.embed_sum.copy_(centroids * self.cluster_size[:, None])
        self.initialized.fill_(True)

    @torch.no_grad()
    def _update(self, flat: torch.Tensor, indices: torch.Tensor, per_sample: int = 1) -> None:
        counts = torch.bincount(indices, minlength=self.codebook_size).float()  # (K,)
        if self.ema:
            sums = torch.zeros_like(self.embed_sum).index_add_(0, indices, flat)  # (K, D)
            both = all_sum(torch.cat([counts[:, None], sums], 1))  # one collective for both statistics
            counts, sums = both[:, 0], both[:, 1:]
            self.cluster_size.mul_(self.decay).add_(counts, alpha=1 - self.decay)
            self.embed_sum.mul_(self.decay).add_(sums, alpha=1 - self.decay)
            n = self.cluster_size.sum()
            # Laplace smoothing: (N_k + eps) / (n + K eps) * n keeps the total n and every count > 0
            smoothed = (self.cluster_size + self.eps) / (n + self.codebook_size * self.eps) * n
            self.codebook.copy_(self.embed_sum / smoothed[:, None])
        else:
            counts = all_sum(counts)
        self.counts += counts.double()
        self.unused_steps.add_(1).masked_fill_(counts > 0, 0)
        if self.restart_after:
            dead = self.unused_steps >= self.restart_after  # the same on every rank: global counts
            if bool(dead.any()):
                self._restart(dead, global_batch(flat, per_sample))

    def _restart(self, dead: torch.Tensor, flat: torch.Tensor) -> None:
        """Move the dead codes onto random encoder outputs of the (global) batch flat (N, D)."""
        picks = torch.randint(len(flat), (int(dead.sum()),), device=flat.device)
        fresh = broadcast(flat[picks].contiguous())  # (n_dead, D), rank 0's draw on every rank
        self.codebook.data[dead] = fresh
        if self.ema:
            self.cluster_size[dead] = 1.0  # a young code: its first assignments move it quickly
            self.embed_sum[dead] = fresh
        self.unused_steps[dead] = 0
        self.restarts += int(dead.sum())

    # ------------------------------------------------------------------------------------------- metrics

    def usage(self, reset: bool = True) -> dict:
        """Code-usage metrics of the training steps since the last call (one epoch, when the loop calls it
        once per epoch), from counts all-reduced over the ranks; reset=True starts a new count."""
        out = usage_metrics(self.counts)
        out["code_restarts"] = int(self.restarts)
        if reset:
            self.counts.zero_()
            self.restarts.zero_()
        return out


def usage_metrics(counts: torch.Tensor) -> dict:
    """Perplexity, fraction of codes used and dead codes from how often each code was chosen, (K,).

    perplexity = exp(H(p)) with p the codes' empirical frequencies: K when all are used equally, 1 when one
    code takes everything. dead_codes = codes chosen zero times."""
    counts = counts.double()
    total = float(counts.sum())
    if total == 0:
        return {"perplexity": 0.0, "codes_used": 0.0, "dead_codes": int(len(counts))}
    p = counts / total
    entropy = -float((p[p > 0] * p[p > 0].log()).sum())
    used = int((counts > 0).sum())
    return {"perplexity": math.exp(entropy), "codes_used": used / len(counts), "dead_codes": len(counts) - used}


def kmeans(x: torch.Tensor, k: int, iters: int = KMEANS_ITERS) -> tuple[torch.Tensor, torch.Tensor]:
    """Lloyd's k-means on x (N, D): (centroids (k, D), cluster sizes (k,)).

    The seeds are k random rows (with replacement when N < k), so codes start where the data is dense, in
    proportion to its density: what keeps a codebook's usage even. (k-means++ seeding spreads the seeds out
    instead; on MNIST's code grids it left more codes on rare outputs and a lower perplexity.) An empty
    cluster keeps its seed until a dead-code restart moves it."""
    n = len(x)
    seeds = torch.randperm(n, device=x.device)[:k] if n >= k else torch.randint(n, (k,), device=x.device)
    centroids = x[seeds].clone()
    counts = torch.zeros(k, device=x.device)
    for _ in range(iters):
        assign = _nearest(x, centroids)
        counts = torch.bincount(assign, minlength=k).float()
        sums = torch.zeros_like(centroids).index_add_(0, assign, x)
        filled = counts > 0
        centroids[filled] = sums[filled] / counts[filled, None]
    return centroids, counts


def _nearest(x: torch.Tensor, codebook: torch.Tensor) -> torch.Tensor:
    """argmin_k ||x - e_k||^2 for each row of x (N, D) -> (N,). ||x||^2 is the same for every code, so it is
    argmin_k (||e_k||^2 - 2 x.e_k): one matrix product."""
    return torch.addmm(codebook.pow(2).sum(1), x, codebook.t(), alpha=-2.0).argmin(1)
