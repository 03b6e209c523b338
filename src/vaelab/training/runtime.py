"""What every pass of a model over data shares, training or validating: the `Meter` of per-sample loss terms, the
forward pass's `autocast` context, and glibc's memory setting (`keep_freed_memory`).

It sits below the loop (training/loop.py) and the validation pass (training/validation.py), so that both take
these from here and neither imports the other's module for them.
"""

from __future__ import annotations

import functools
import hashlib
import itertools
import json
import os
import statistics
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import torch

from vaelab.data.sources import cache_dir
from vaelab.io import atomic_write_json
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


def _cpuinfo(field: str) -> str | None:
    """The value of `field` on the first line of /proc/cpuinfo that names it (None where there is none)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(field):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return None


def cpu_name() -> str:
    """The CPU's model name as Linux lists it in /proc/cpuinfo ("" elsewhere)."""
    return _cpuinfo("model name") or ""


def cpu_flags() -> set[str]:
    """The CPU's feature flags as Linux lists them in /proc/cpuinfo (empty elsewhere)."""
    return set((_cpuinfo("flags") or "").split())


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


BF16_GAIN = 0.9  # precision="auto" trains in bf16 when its measured step takes at most this share of fp32's
TIMED_ROUNDS = 5  # each precision's step is timed this many times, alternating, after its untimed warm-up
WARMUP_STEPS = 2  # untimed steps of each precision first: the first step of a shape is slow (allocation, kernels)
TIMED_SECONDS = 0.025  # a timed sample repeats the step until it lasts about this long (a small model's steps)


def time_precisions(step: Callable[[str], None], model: torch.nn.Module, device: torch.device,
                    rounds: int = TIMED_ROUNDS, agree: Callable[[int], int] = lambda n: n) -> dict[str, float]:
    """The median seconds of `step(precision)` (one training step's forward and backward pass) in fp32 and bf16,
    alternating the two, each warmed up first (WARMUP_STEPS); a timed sample repeats a short step to last about
    TIMED_SECONDS (at most 100 steps). Leaves no trace: the model's parameters and buffers (its
    non-persistent ones too: a quantizer's counts) are restored bit for bit, its gradients cleared, and the
    random streams of the CPU and `device` are those it found, so a run trains exactly as if never measured.
    `agree` makes the processes of a world take the same number of steps per sample (a model's forward pass
    may gather from every rank: a VQ-VAE's codebook), e.g. their mean; alone, the number itself."""
    state = {name: t.detach().clone() for name, t in itertools.chain(model.named_parameters(),
                                                                     model.named_buffers())}
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    times: dict[str, list[float]] = {"fp32": [], "bf16": []}
    repeats = {}  # steps per timed sample: enough to last TIMED_SECONDS, from the warm-up's time
    with torch.random.fork_rng(devices=[device] if device.type == "cuda" else []):
        for r in range(rounds + 1):  # round 0 warms each precision up; its times are not kept
            for precision in ("fp32", "bf16") if r % 2 else ("bf16", "fp32"):
                if not r:
                    for _ in range(WARMUP_STEPS - 1):
                        step(precision)
                sync()
                t0 = time.perf_counter()
                for _ in range(repeats.get(precision, 1)):
                    step(precision)
                sync()
                took = time.perf_counter() - t0
                if r:
                    times[precision].append(took / repeats[precision])
                else:  # the last warm-up step's time sets the steps per timed sample
                    repeats[precision] = agree(max(1, min(100, round(TIMED_SECONDS / max(took, 1e-6)))))
    with torch.no_grad():
        for name, t in itertools.chain(model.named_parameters(), model.named_buffers()):
            t.copy_(state[name])
    model.zero_grad(set_to_none=True)
    return {k: statistics.median(v) for k, v in times.items()}


def host_identity(device: torch.device) -> str:
    """What a measured step time depends on besides the model and its settings: the GPU's name, or the CPU's
    model name and instruction flags; and torch's version."""
    if device.type == "cuda":
        hardware = torch.cuda.get_device_name(device)
    else:
        flags = hashlib.sha256(" ".join(sorted(cpu_flags())).encode()).hexdigest()[:12]
        hardware = f"{cpu_name() or 'cpu'} (flags {flags})"
    return f"{hardware}, torch {torch.__version__}"


def step_times_file() -> Path:
    """Where precision="auto" keeps the step times it measured, so that later runs on this machine choose as the
    first did: precision-choices.json in vaelab's cache folder ($XDG_CACHE_HOME/vaelab or ~/.cache/vaelab)."""
    return cache_dir() / "precision-choices.json"


def _entry_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()[:24]


def stored_step_times(key: str) -> dict | None:
    """The step times measured earlier for `key` (host and model; see loop._Run._measure_key):
    {"fp32": s, "bf16": s, "measured": ISO time}, or None. A missing, unreadable or malformed file holds none."""
    try:
        entry = json.loads(step_times_file().read_text(encoding="utf-8")).get(_entry_key(key))
        times = {k: float(entry[k]) for k in ("fp32", "bf16")}
    except (OSError, ValueError, TypeError, KeyError, AttributeError):
        return None
    if not all(0 < v < float("inf") for v in times.values()):
        return None
    return {**times, "measured": str(entry.get("measured", ""))}


def store_step_times(key: str, step_s: dict[str, float], what: str) -> bool:
    """Add `key`'s measured step times (and `what` was measured, for a reader) to the file of step times,
    rewritten atomically; a malformed file is replaced. False where it cannot be written (a read-only cache): the
    choice then holds for this process only."""
    path = step_times_file()
    try:
        table = json.loads(path.read_text(encoding="utf-8"))
        if not isinstance(table, dict):
            table = {}
    except (OSError, ValueError):
        table = {}
    when = datetime.now(timezone.utc).isoformat(timespec="seconds")
    table[_entry_key(key)] = {"fp32": step_s["fp32"], "bf16": step_s["bf16"], "measured": when, "what": what}
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_json(path, table)
    except OSError:
        return False
    return True


def pick_measured(step_s: dict[str, float], why: str) -> tuple[str, str]:
    """precision="auto" from measured step times (time_precisions; `why`: the device's bf16 support): bf16 when its
    step takes at most BF16_GAIN of fp32's, else fp32; and why, in words."""
    fp32, bf16 = step_s["fp32"], step_s["bf16"]
    chosen = "bf16" if bf16 <= BF16_GAIN * fp32 else "fp32"
    measured = f"a training step took {1e3 * bf16:.3g} ms in bf16 against {1e3 * fp32:.3g} ms in fp32"
    if chosen == "bf16":
        return chosen, f"{why}, and {measured}"
    return chosen, (f"{why}, but {measured}: bf16 is chosen only at {BF16_GAIN:.0%} of fp32's step time or "
                    "less")


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


__all__ = ["BF16_GAIN", "Meter", "autocast", "choose_precision", "cpu_flags", "cpu_name", "host_identity",
           "keep_freed_memory", "pick_measured", "step_times_file", "store_step_times", "stored_step_times",
           "time_precisions"]
