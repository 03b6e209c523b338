"""Importance-sampled negative log-likelihood (Burda et al. 2015, eq. 7; Rezende et al. 2014):

    log p(x) ≈ log (1/K) Σ_k p(x, z_k) / q(z_k | x),   z_k ~ q(z | x)

The K samples are drawn in chunks and folded into a running log-sum-exp per image, so memory stays flat in K
(K = 5000 is the literature's MNIST protocol). The estimate is a lower bound on log p(x) for every K and
tightens as K grows.

Precision: fp32 unless asked. precision="bf16" runs the K decodings, the estimate's whole cost, under bf16
autocast (convolutions and matmuls in bf16 with fp32 sums, as bf16 training does): the encoder, the samples, the
likelihood of each decoding and the log-sum-exp stay fp32 (float64 for the running sum). On a CPU with native
bf16 the seed VAE's K = 5000 estimate then ran 3.0 times as fast (its conv decoder by sub-pixel convolutions:
models/kernels.py, ConvDecoder) and moved by +0.007 nats on average, image by image against fp32 with the same
samples (benchmarks/nll_precision.py, docs/results.md#nll-sub-pixel).
"""

from __future__ import annotations

import math

import torch

from vaelab.errors import VaelabError
from vaelab.training.runtime import autocast, keep_freed_memory

NLL_PRECISIONS = ("fp32", "bf16")


# values in the decoder's widest layer output per decode call (24 MB in fp32): decode batches that stay in cache.
# Measured on 2 threads (K=1000 for 100 images, passes per second): the seed VAE's conv decoder (widest layer 32 x 28
# x 28) 3,300 at the old 64 MB budget on the decoded images (decode batches of 21,400) -> 9,000-10,000 at 200-300;
# an MLP decoder 784-512-512-784 66,000 -> 112,000 at 5,000-8,000.
_DECODE_BUDGET = 6 * 2**20


def _decoder_width(model, z: torch.Tensor, condition: torch.Tensor | None) -> int:
    """The most values one layer of the decoder emits for one latent (probed with a batch of one)."""
    widest = 1

    def record(module, inputs, output):
        nonlocal widest
        if isinstance(output, torch.Tensor):
            widest = max(widest, output.numel())

    handle = torch.nn.modules.module.register_module_forward_hook(record)
    try:
        model.decode_raw(z[:1], None if condition is None else condition[:1])
    finally:
        handle.remove()
    return widest


def _chunk_size(batch: int, width: int, budget: int = _DECODE_BUDGET) -> int:
    # samples per decode call, so that the widest activation, (chunk * batch, width), holds about `budget` values
    return max(1, min(budget // max(batch * width, 1), 10_000))


@torch.inference_mode()
def log_likelihood(model, x: torch.Tensor, n_samples: int, generator: torch.Generator | None = None,
                   chunk: int | None = None, condition: torch.Tensor | None = None,
                   precision: str = "fp32") -> torch.Tensor:
    """Importance-sampled log p(x) per sample, (B,), in nats (log p(x | c) for a conditional model). The noise is
    drawn one sample of the batch's latents at a time, so the estimate does not depend on `chunk`. precision:
    "fp32", or "bf16" for the decodings (module doc)."""
    _check_precision(precision)
    noise_shape, log_weights = model.importance_sampler(x, condition)
    b = x.shape[0]
    if chunk is None:
        probe = torch.zeros((1, *model.latent_shape), dtype=x.dtype, device=x.device)
        chunk = _chunk_size(b, _decoder_width(model, probe, condition))
    running = torch.full((b,), -math.inf, dtype=torch.float64, device=x.device)
    done = 0
    while done < n_samples:
        k = min(chunk, n_samples - done)
        eps = x.new_empty((k, b, *noise_shape))
        for sample in eps:  # one (B, *noise) draw at a time: the same stream whatever the chunk
            sample.normal_(generator=generator)
        with autocast(precision, x):
            log_w = log_weights(eps)
        log_w = log_w.double()  # (k, B)
        running = torch.logaddexp(running, torch.logsumexp(log_w, dim=0))
        done += k
    return (running - math.log(n_samples)).to(x.dtype)


def _check_precision(precision: str) -> None:
    if precision not in NLL_PRECISIONS:
        raise VaelabError(f"precision={precision!r} is not a precision of the likelihood; choose one of "
                          f"{', '.join(NLL_PRECISIONS)} (fp32 is the default; bf16 decodes faster on a CPU with "
                          "native bf16)")


def importance_nll(model, data, *, n_samples: int = 5000, batch_size: int = 100, binarize: bool = False,
                   seed: int = 0, progress: bool = False, precision: str = "fp32", per_sample: bool = False) -> dict:
    """-log p(x) over a dataset: {"nll": mean nats, "nll_se": standard error, "nll_bits_per_dim", "n",
    "nll_samples", "nll_precision"}, and with per_sample=True "nll_per_sample", each sample's -log p(x) (a float64
    tensor, in the data's order). With binarize=True the data are dynamically binarized once, with `seed` (the
    MNIST protocol of the literature). precision: "fp32" (default) or "bf16" decodings (module doc)."""
    if n_samples < 1:
        raise VaelabError(f"n_samples={n_samples} must be >= 1 importance samples (the literature uses 5000)")
    _check_precision(precision)
    keep_freed_memory()  # no page faults per decode call (see there): the conv decoder's 6,300 -> 9,000+ passes/s
    gen = torch.Generator().manual_seed(seed)
    was_training = model.training
    model.eval()
    parts = []
    starts = range(0, len(data), batch_size)
    if progress:
        from tqdm.auto import tqdm

        starts = tqdm(starts, desc=f"NLL (K={n_samples})", unit="batch")
    for start in starts:
        idx = torch.arange(start, min(start + batch_size, len(data)))
        x = data.batch(idx, binarize=binarize, generator=gen)
        cond = data.labels(idx) if model.capabilities.conditional else None
        parts.append(-log_likelihood(model, x, n_samples, generator=gen, condition=cond, precision=precision).double())
    model.train(was_training)
    nll = torch.cat(parts)
    dims = math.prod(data.sample_shape)
    mean = float(nll.mean())
    se = float(nll.std(unbiased=True) / math.sqrt(len(nll))) if len(nll) > 1 else float("nan")
    out = {"nll": mean, "nll_se": se, "nll_bits_per_dim": mean / (dims * math.log(2)), "n": len(nll),
           "nll_samples": n_samples, "nll_precision": precision}
    return {**out, "nll_per_sample": nll} if per_sample else out
