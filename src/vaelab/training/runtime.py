"""What every pass of a model over data shares, training or validating: the `Meter` of per-sample loss terms, the
forward pass's `autocast` context, and glibc's memory setting (`keep_freed_memory`).

It sits below the loop (training/loop.py) and the validation pass (training/validation.py), so that both take
these from here and neither imports the other's module for them.
"""

from __future__ import annotations

import functools
import os

import torch

from vaelab.training.distributed import Dist


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


def cpu_flags() -> set[str]:
    """The CPU's feature flags as Linux lists them in /proc/cpuinfo (empty elsewhere)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def choose_precision(device: torch.device, flags: set[str] | None = None) -> tuple[str, str]:
    """precision="auto": ("bf16", why) where `device` computes bf16 natively, else ("fp32", why). A CPU
    computes it natively with AVX-512 BF16 or AMX (their dot-product instructions); without them oneDNN
    emulates bf16 by converting to fp32, slower than fp32 itself. A CUDA GPU: where torch says it supports
    bf16 (compute capability 8.0 and up)."""
    if device.type == "cuda":
        name = torch.cuda.get_device_name(device)
        if torch.cuda.is_bf16_supported(including_emulation=False):
            return "bf16", f"the GPU ({name}) computes bf16 natively"
        return "fp32", f"the GPU ({name}) has no native bf16"
    if device.type == "cpu":
        flags = cpu_flags() if flags is None else flags
        native = sorted(flags & {"avx512_bf16", "amx_bf16"})
        if native:
            return "bf16", f"the CPU computes bf16 natively ({', '.join(native)})"
        return "fp32", "the CPU has no native bf16 (neither avx512_bf16 nor amx_bf16)"
    return "fp32", f"bf16 is not chosen automatically on {device.type}"


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


__all__ = ["Meter", "autocast", "choose_precision", "cpu_flags", "keep_freed_memory"]
