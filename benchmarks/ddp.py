"""Throughput of distributed training on this machine: 2 `torchrun` processes (gloo, 1 thread each) against one
process with 2 threads and with 1 thread, through vaelab's one training loop, on the tutorial presets and MNIST.

    python benchmarks/ddp.py                                  # seed-conv-ae and seed-vae, 200 steps: ~2-3 min
    python benchmarks/ddp.py --steps 20 --warmup 2            # a smoke run
    python benchmarks/ddp.py --presets seed-vae --steps 400 --repeats 3

Every configuration runs in its own process tree (torchrun's for DDP): load MNIST, build the preset (seed 0),
train --warmup steps untimed (first-touch allocations; under DDP, the process group's first collectives), then
--steps optimizer steps timed, both through `vaelab.training.fit` on the first steps x batch training images,
with the preset's global batch (256 for seed-conv-ae, 128 for seed-vae) whatever the number of processes: under
DDP each rank computes half of every batch and the gradients are all-reduced. No validation, no files written.

images/s = steps x global batch / seconds; s/epoch-eq = 60,000 / (images/s), the training part of one MNIST
epoch. With --repeats R every configuration runs R times, round robin, and the best time is kept (the machine is
shared: the best run is the least disturbed one).

On a 2-core machine expect little gain from DDP: one process with 2 threads already uses both cores, and two
processes add an all-reduce of the gradients per step. The point is that the path to more processes and more
machines is the same loop (see tests/test_distributed.py for its correctness).

Prints a table and writes benchmarks/results/ddp.json. Run it on a quiet machine; each run reports the load
average it started under.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PRESETS = ("seed-conv-ae", "seed-vae")
EPOCH_IMAGES = 60_000
# (name, processes, threads per process)
CONFIGS = (("1 process, 1 thread", 1, 1), ("1 process, 2 threads", 1, 2), ("2 processes (DDP), 1 thread each", 2, 1))


# ============================================================================================== the worker


def worker(args) -> None:
    """One configuration, in this process (one rank of it under torchrun): warm up, then time the steps."""
    sys.path.insert(0, str(REPO / "src"))
    import torch

    from vaelab.config import get_preset
    from vaelab.data import load_dataset
    from vaelab.models import build_model
    from vaelab.training import fit

    torch.set_num_threads(args.threads)
    preset = get_preset(args.preset)
    bs = preset.train.batch_size
    mnist = load_dataset("mnist", args.data_dir, progress=False)
    n = len(mnist.train)
    images = lambda steps, offset=0: mnist.train.subset((torch.arange(steps * bs) + offset) % n)  # noqa: E731
    torch.manual_seed(0)
    model = build_model(preset.model, input_shape=mnist.train.sample_shape)
    cfg = preset.train.replace(epochs=1, threads=args.threads, progress=False, device="cpu")
    if args.warmup:
        fit(model, images(args.warmup), None, cfg)
    timed = images(args.steps, args.warmup * bs)
    t0 = time.perf_counter()
    fit(model, timed, None, cfg)  # ends with a barrier: every rank has finished its steps
    seconds = time.perf_counter() - t0
    if int(os.environ.get("RANK", "0")) == 0:
        Path(args.result).write_text(json.dumps({"seconds": seconds, "images": args.steps * bs, "batch": bs}))


# ============================================================================================ the launcher


def run_config(preset: str, processes: int, threads: int, args) -> dict:
    """Launch one configuration and return its timing (and the load average it started under)."""
    with tempfile.TemporaryDirectory() as tmp:
        result = Path(tmp) / "result.json"
        launcher = [sys.executable]
        if processes > 1:
            launcher += ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={processes}"]
        cmd = [*launcher, str(Path(__file__).resolve()), "--worker", "--preset", preset, "--threads", str(threads),
               "--steps", str(args.steps), "--warmup", str(args.warmup), "--data-dir", args.data_dir,
               "--result", str(result)]
        env = dict(os.environ, OMP_NUM_THREADS=str(threads))
        for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
            env.pop(k, None)
        load = os.getloadavg()[0]
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if proc.returncode != 0 or not result.is_file():
            sys.exit(f"{preset}, {processes} process(es) x {threads} thread(s) failed (exit {proc.returncode}):\n"
                     f"{proc.stdout[-3000:]}{proc.stderr[-3000:]}")
        out = json.loads(result.read_text())
    return {**out, "load_avg_1min": round(load, 2)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--presets", default=",".join(PRESETS), help=f"comma-separated, from {','.join(PRESETS)}")
    p.add_argument("--steps", type=int, default=200, help="timed optimizer steps per run (default 200)")
    p.add_argument("--warmup", type=int, default=10, help="untimed steps before them (default 10)")
    p.add_argument("--repeats", type=int, default=1, help="runs of every configuration; the best is kept")
    p.add_argument("--data-dir", default=os.environ.get("VAELAB_DATA", str(REPO.parent / "shared" / "data")),
                   help="folder holding MNIST (default $VAELAB_DATA, else ../shared/data)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "ddp.json"))
    # the worker's own flags (the launcher passes them)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--preset", help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=1, help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.worker:
        worker(args)
        return
    presets = [s.strip() for s in args.presets.split(",") if s.strip()]
    unknown = sorted(set(presets) - set(PRESETS))
    if unknown:
        p.error(f"unknown presets {unknown}; choose from {list(PRESETS)}")
    for flag in ("steps", "repeats"):
        if getattr(args, flag) < 1:
            p.error(f"--{flag} must be a positive integer, got {getattr(args, flag)}")
    if args.warmup < 0:
        p.error(f"--warmup must be >= 0, got {args.warmup}")
    if not (Path(args.data_dir) / "mnist").is_dir() and not list(Path(args.data_dir).glob("*ubyte*")):
        p.error(f"no MNIST in --data-dir {args.data_dir!r}; point it (or $VAELAB_DATA) at the folder holding mnist/")

    t_start = time.perf_counter()
    best: dict[tuple[str, str], dict] = {}
    for repeat in range(args.repeats):  # round robin: every configuration sees the same stretch of machine noise
        for preset in presets:
            for name, processes, threads in CONFIGS:
                r = run_config(preset, processes, threads, args)
                print(f"  {preset}, {name}: {r['seconds']:.2f} s for {args.steps} steps "
                      f"(load {r['load_avg_1min']:.2f}; run {repeat + 1}/{args.repeats})", flush=True)
                key = (preset, name)
                if key not in best or r["seconds"] < best[key]["seconds"]:
                    best[key] = {"preset": preset, "config": name, "processes": processes,
                                 "threads_per_process": threads, **r}

    rows = [["preset", "configuration", "images/s", "s/epoch-eq", "vs 1 process x 2 threads"]]
    runs = []
    for preset in presets:
        base = best[(preset, CONFIGS[1][0])]
        for name, _, _ in CONFIGS:
            r = best[(preset, name)]
            r["images_per_s"] = round(r["images"] / r["seconds"], 1)
            r["s_per_epoch_equivalent"] = round(EPOCH_IMAGES * r["seconds"] / r["images"], 2)
            r["speedup_vs_1_process_2_threads"] = round(base["seconds"] / r["seconds"], 3)
            runs.append(r)
            rows.append([preset, name, f"{r['images_per_s']:.0f}", f"{r['s_per_epoch_equivalent']:.1f}",
                         f"{r['speedup_vs_1_process_2_threads']:.2f}x"])
    print(f"\nMNIST training throughput, {args.steps} timed steps after {args.warmup} warm-up steps, best of "
          f"{args.repeats}:")
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  " + "  ".join(c.rjust(w) if i >= 2 else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))))

    import torch

    report = {"steps": args.steps, "warmup": args.warmup, "repeats": args.repeats, "runs": runs,
              "machine": {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
                          "platform": platform.platform()},
              "seconds": round(time.perf_counter() - t_start, 1)}
    sys.path.insert(0, str(REPO / "src"))
    from vaelab.training.checkpoint import atomic_write_json

    atomic_write_json(args.out, report)
    print(f"wrote {args.out} ({report['seconds']:.0f} s)")


if __name__ == "__main__":
    main()
