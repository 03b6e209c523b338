"""Data bigger than memory: one epoch on a folder of generated 64x64 PNGs, read lazily with DataLoader workers,
against the same files decoded into memory up front.

    python benchmarks/memory.py                      # 200,000 PNGs (generated once, a few minutes), both runs
    python benchmarks/memory.py --count 20000        # a smaller folder
    python benchmarks/memory.py --compare-count 50000  # the in-memory comparison on the first 50,000 files
    python benchmarks/memory.py --parts speed --rounds 3  # 3 more speed rounds, added to those of memory.json

The folder (default: <user cache>/vaelab/bench-memory-<count>, outside the repo, kept for the next sitting) holds
`--count` RGB PNGs of 64x64: a few random discs on a white background, so that they decode like small photos or
icons rather than noise. Each run is a fresh Python process (`--child`) that loads the folder, trains a small conv
VAE (MODEL: channels 8,16, latent 8; batch 128) for one epoch without validation, and samples its memory every
0.1 s: the resident set (RSS) of the training process plus its worker processes, summed, and the proportional set
(PSS) which counts pages the processes share once. Reported:

- lazy: the whole folder read lazily with `--workers` (default 2) worker processes, no cache: peak RSS and PSS,
  the epoch's samples per second, and the seconds to scan the folder's headers before training;
- the speed comparison on `--compare-count` files (default: all of them): lazy with workers against the same
  files decoded into memory up front (its load time reported apart), in `--rounds` interleaved rounds (the
  machine has fast and slow spells); the ratio of each round and their median. `--parts speed` adds rounds to
  those already in the results file (each round is a pair run back to back, so rounds of several sittings mix);
- interleaved: one process holds the `--compare-count` files both ways and trains the same model on batches from
  each in turn, `--segments` rounds of `--steps` steps (after a warm-up segment each): samples per second of each
  segment, the ratio of each round and their median. Whole epochs in separate processes meet different spells
  of a shared machine (up to 2x apart here); segments of one process meet the same ones, so this median is the
  verdict (speed_ok).

Prints a table and writes benchmarks/results/memory.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import threading
import time
from multiprocessing import Pool
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

RESULTS = REPO / "benchmarks" / "results" / "memory.json"
SIZE = 64
# a small conv VAE: two stride-2 convs (8, 16 channels), a dense latent of 8; Bernoulli likelihood
MODEL = {"channels": (8, 16), "hidden": (), "latent_dim": 8}


# ---------------------------------------------------------------------------------------- the folder


def _write_png(args) -> None:
    import numpy as np
    from PIL import Image, ImageDraw

    path, seed = args
    rng = np.random.default_rng(seed)
    img = Image.new("RGB", (SIZE, SIZE), "white")
    draw = ImageDraw.Draw(img)
    for _ in range(int(rng.integers(1, 5))):
        x, y = rng.integers(0, SIZE, 2)
        r = int(rng.integers(6, 24))
        colour = tuple(int(v) for v in rng.integers(0, 256, 3))
        draw.ellipse((int(x) - r, int(y) - r, int(x) + r, int(y) + r), fill=colour)
    img.save(path)


def make_folder(folder: Path, count: int, processes: int) -> float:
    """`count` PNGs in `folder` (files already there are kept); returns the seconds spent writing."""
    folder.mkdir(parents=True, exist_ok=True)
    todo = [(str(folder / f"{i:06d}.png"), i) for i in range(count) if not (folder / f"{i:06d}.png").exists()]
    t0 = time.perf_counter()
    if todo:
        print(f"writing {len(todo):,} PNGs into {folder} ...", flush=True)
        with Pool(processes) as pool:
            for k, _ in enumerate(pool.imap_unordered(_write_png, todo, chunksize=256)):
                if k % 20000 == 0 and k:
                    print(f"  {k:,}", flush=True)
    return time.perf_counter() - t0


def subset_folder(folder: Path, count: int) -> Path:
    """A folder of hard links to the first `count` files of `folder` (the same files, no copy)."""
    sub = folder.parent / f"{folder.name}-first-{count}"
    sub.mkdir(exist_ok=True)
    for i in range(count):
        link = sub / f"{i:06d}.png"
        if not link.exists():
            os.link(folder / f"{i:06d}.png", link)
    return sub


# ---------------------------------------------------------------------------------------- one run (a child process)


def _proc_tree(pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        try:
            for task in os.listdir(f"/proc/{p}/task"):
                with open(f"/proc/{p}/task/{task}/children") as f:
                    todo += [int(c) for c in f.read().split()]
        except OSError:
            pass
    return out


def _memory(pids: list[int]) -> tuple[int, int]:
    """(RSS, PSS) in bytes, summed over `pids`."""
    rss = pss = 0
    for p in pids:
        try:
            with open(f"/proc/{p}/smaps_rollup") as f:
                for line in f:
                    if line.startswith("Rss:"):
                        rss += int(line.split()[1]) * 1024
                    elif line.startswith("Pss:"):
                        pss += int(line.split()[1]) * 1024
        except OSError:
            pass
    return rss, pss


class Sampler(threading.Thread):
    """The peak RSS and PSS of this process and its children, sampled every `every` seconds."""

    def __init__(self, every: float = 0.1):
        super().__init__(daemon=True)
        self.every, self.peak_rss, self.peak_pss, self.peak_procs, self.stop = every, 0, 0, 0, threading.Event()

    def run(self):
        while not self.stop.is_set():
            pids = _proc_tree(os.getpid())
            rss, pss = _memory(pids)
            self.peak_rss, self.peak_pss = max(self.peak_rss, rss), max(self.peak_pss, pss)
            self.peak_procs = max(self.peak_procs, len(pids))
            time.sleep(self.every)


def child(folder: str, lazy: bool, workers: int, threads: int, batch_size: int) -> dict:
    import torch

    from vaelab.config import ModelConfig
    from vaelab.data import load_dataset
    from vaelab.models import build_model
    from vaelab.training import fit

    torch.set_num_threads(threads)
    sampler = Sampler()
    sampler.start()
    t0 = time.perf_counter()
    data = load_dataset(folder, lazy=lazy, workers=workers if lazy else 0, test_fraction=0.01, progress=False)
    load_s = time.perf_counter() - t0
    torch.manual_seed(0)
    model = build_model(ModelConfig(model="vae", arch="conv", channels=MODEL["channels"], hidden=MODEL["hidden"],
                                    latent_dim=MODEL["latent_dim"], input_shape=data.train.sample_shape))
    t1 = time.perf_counter()
    history = fit(model, data.train, None, epochs=1, batch_size=batch_size, progress=False, threads=threads)
    epoch_s = time.perf_counter() - t1
    sampler.stop.set()
    sampler.join()
    return {"lazy": lazy, "workers": workers if lazy else 0, "train_samples": len(data.train),
            "load_s": round(load_s, 2), "epoch_s": round(epoch_s, 2),
            "samples_per_s": round(len(data.train) / epoch_s, 1),
            "train_loss": round(history[-1]["train_loss"], 3), "peak_rss_mb": round(sampler.peak_rss / 2**20),
            "peak_pss_mb": round(sampler.peak_pss / 2**20), "processes": sampler.peak_procs}


def child_interleaved(folder: str, workers: int, threads: int, batch_size: int, steps: int, rounds: int) -> dict:
    """The same training step fed from the files read lazily (workers) and from the same files in memory, in
    alternating segments of `steps` steps within one process, so that both see the same spells of the machine."""
    import math

    import torch

    from vaelab.config import ModelConfig
    from vaelab.data import load_dataset
    from vaelab.models import build_model

    torch.set_num_threads(threads)
    held = load_dataset(folder, lazy=False, test_fraction=0.01, progress=False).train
    lazy = load_dataset(folder, lazy=True, workers=workers, test_fraction=0.01, progress=False).train
    torch.manual_seed(0)
    model = build_model(ModelConfig(model="vae", arch="conv", channels=MODEL["channels"], hidden=MODEL["hidden"],
                                    latent_dim=MODEL["latent_dim"], input_shape=held.sample_shape))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    total, gen = (rounds + 1) * steps, torch.Generator().manual_seed(0)

    def order():
        idx = torch.cat([torch.randperm(len(held), generator=gen)
                         for _ in range(math.ceil(total * batch_size / len(held)))])
        return [idx[i * batch_size:(i + 1) * batch_size] for i in range(total)]

    feeds = {"in_memory": held.batches(order()), "lazy": lazy.batches(order())}

    def segment(kind: str) -> float:
        t0 = time.perf_counter()
        for _ in range(steps):
            x = next(feeds[kind])  # (B, 3, 64, 64)
            loss = model.loss(x, model(x))["loss"].mean()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        return steps * batch_size / (time.perf_counter() - t0)

    segment("in_memory"), segment("lazy")  # warm-up: the workers start, the allocator settles
    rows = []
    for r in range(rounds):
        kinds = ("in_memory", "lazy") if r % 2 == 0 else ("lazy", "in_memory")
        rate = {k: segment(k) for k in kinds}
        rows.append({"in_memory_per_s": round(rate["in_memory"], 1), "lazy_per_s": round(rate["lazy"], 1),
                     "ratio": round(rate["lazy"] / rate["in_memory"], 3)})
    return {"steps_per_segment": steps, "rounds": rows,
            "ratio_median": round(statistics.median(r["ratio"] for r in rows), 3)}


def run_child(folder: Path, lazy: bool, args) -> dict:
    cmd = [sys.executable, __file__, "--child", str(folder), "--child-lazy", str(int(lazy)), "--workers",
           str(args.workers), "--threads", str(args.threads), "--batch-size", str(args.batch_size)]
    env = dict(os.environ, OMP_NUM_THREADS=str(args.threads))
    done = subprocess.run(cmd, capture_output=True, text=True, env=env)
    if done.returncode != 0:
        raise SystemExit(f"the {'lazy' if lazy else 'in-memory'} run failed:\n{done.stderr}")
    row = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"  {'lazy' if lazy else 'in-memory':9s} {row['train_samples']:>7,} images: load {row['load_s']:7.1f} s, "
          f"epoch {row['epoch_s']:7.1f} s ({row['samples_per_s']:,.0f}/s), peak RSS {row['peak_rss_mb']:,} MB, "
          f"PSS {row['peak_pss_mb']:,} MB", flush=True)
    return row


# ---------------------------------------------------------------------------------------- main


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--count", type=int, default=200_000, help="PNGs in the folder [200,000]")
    p.add_argument("--folder", type=Path, default=None, help="where the PNGs go [<user cache>/vaelab/bench-memory-N]")
    p.add_argument("--compare-count", type=int, default=None, help="files of the in-memory comparison [--count]")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--threads", type=int, default=1, help="torch threads of the training process")
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--rounds", type=int, default=1, help="interleaved rounds of the speed comparison")
    p.add_argument("--limit-mb", type=int, default=2048, help="the peak RSS the lazy run must stay under")
    p.add_argument("--parts", default="memory,speed,interleaved",
                   help="memory (the lazy epoch on every file), speed (rounds of whole epochs), interleaved "
                        "(segments of training steps alternating between the two sources in one process)")
    p.add_argument("--steps", type=int, default=30, help="training steps per segment of the interleaved part")
    p.add_argument("--segments", type=int, default=10, help="rounds of the interleaved part")
    p.add_argument("--results", type=Path, default=RESULTS, help="the JSON file [benchmarks/results/memory.json]")
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--child-lazy", type=int, help=argparse.SUPPRESS)
    p.add_argument("--child-interleaved", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child_interleaved:
        print(json.dumps(child_interleaved(args.child_interleaved, args.workers, args.threads, args.batch_size,
                                           args.steps, args.segments)))
        return
    if args.child:
        print(json.dumps(child(args.child, bool(args.child_lazy), args.workers, args.threads, args.batch_size)))
        return

    from vaelab.data import cache_dir

    folder = args.folder or cache_dir() / f"bench-memory-{args.count}"
    gen_s = make_folder(folder, args.count, processes=max(os.cpu_count() or 1, 1))
    compare = min(args.compare_count or args.count, args.count)
    parts = set(args.parts.split(","))
    result = json.loads(args.results.read_text()) if args.results.is_file() and "memory" not in parts else {}
    if "memory" in parts:
        print(f"lazy, {args.workers} workers, {args.count:,} PNGs of {SIZE}x{SIZE}:")
        result.update({"count": args.count, "image": [3, SIZE, SIZE], "folder": str(folder),
                       "generate_s": round(gen_s, 1),
                       "model": {k: list(v) if isinstance(v, tuple) else v for k, v in MODEL.items()},
                       "batch_size": args.batch_size, "threads": args.threads, "workers": args.workers,
                       "cpus": os.cpu_count(), "python": platform.python_version(),
                       "lazy": run_child(folder, True, args), "peak_rss_limit_mb": args.limit_mb, "rounds": []})
        result["rss_ok"] = result["lazy"]["peak_rss_mb"] < args.limit_mb
    big = result["lazy"]
    rounds = result.setdefault("rounds", [])
    if "speed" in parts:
        if result.get("compare_count", compare) != compare:
            raise SystemExit(f"{args.results} holds rounds on {result['compare_count']:,} files; give --compare-count "
                             f"{result['compare_count']} to add rounds, or --parts memory,speed to start afresh")
        cfolder = folder if compare == args.count else subset_folder(folder, compare)
        print(f"speed, {compare:,} PNGs, {args.rounds} round(s):")
        for _ in range(args.rounds):
            mem, lazy = run_child(cfolder, False, args), run_child(cfolder, True, args)
            rounds.append({"in_memory": mem, "lazy": lazy,
                           "ratio": round(lazy["samples_per_s"] / mem["samples_per_s"], 3)})
        result["compare_count"] = compare
    if "interleaved" in parts:
        cfolder = folder if compare == args.count else subset_folder(folder, compare)
        print(f"interleaved, {compare:,} PNGs, {args.segments} rounds of {args.steps} steps each way:", flush=True)
        cmd = [sys.executable, __file__, "--child-interleaved", str(cfolder), "--workers", str(args.workers),
               "--threads", str(args.threads), "--batch-size", str(args.batch_size), "--steps", str(args.steps),
               "--segments", str(args.segments)]
        done = subprocess.run(cmd, capture_output=True, text=True,
                              env=dict(os.environ, OMP_NUM_THREADS=str(args.threads)))
        if done.returncode != 0:
            raise SystemExit(f"the interleaved run failed:\n{done.stderr}")
        result["interleaved"] = {"count": compare, **json.loads(done.stdout.strip().splitlines()[-1])}
        print("  lazy / in-memory per round: " + ", ".join(str(r["ratio"]) for r in result["interleaved"]["rounds"])
              + f"; median {result['interleaved']['ratio_median']}")
    ratio = round(statistics.median(r["ratio"] for r in rounds), 3) if rounds else None
    # the verdict: the interleaved median where there is one (both sources see the same spells of the machine)
    verdict = result["interleaved"]["ratio_median"] if "interleaved" in result else ratio
    result.update({"speed_ratio_median": ratio, "speed_ok": verdict is not None and verdict >= 0.9})
    args.results.parent.mkdir(parents=True, exist_ok=True)
    tmp = args.results.with_suffix(".json.tmp")
    tmp.write_text(json.dumps(result, indent=2) + "\n")
    os.replace(tmp, args.results)

    table = [("run", "images", "load s", "epoch s", "images/s", "peak RSS MB", "peak PSS MB", "lazy/in-memory")]
    table.append(("lazy", f"{big['train_samples']:,}", f"{big['load_s']:.1f}", f"{big['epoch_s']:.1f}",
                  f"{big['samples_per_s']:,.0f}", f"{big['peak_rss_mb']:,}", f"{big['peak_pss_mb']:,}", ""))
    for i, r in enumerate(rounds):
        for kind in ("in_memory", "lazy"):
            row = r[kind]
            table.append((f"round {i + 1} {kind.replace('_', '-')}", f"{row['train_samples']:,}",
                          f"{row['load_s']:.1f}", f"{row['epoch_s']:.1f}", f"{row['samples_per_s']:,.0f}",
                          f"{row['peak_rss_mb']:,}", f"{row['peak_pss_mb']:,}",
                          str(r["ratio"]) if kind == "lazy" else ""))
    widths = [max(len(str(row[i])) for row in table) for i in range(len(table[0]))]
    print()
    for row in table:
        print("  ".join(str(v).rjust(w) for v, w in zip(row, widths)))
    print(f"\npeak RSS of the lazy run (training process + {big['workers']} workers): {big['peak_rss_mb']:,} MB "
          f"(limit {result['peak_rss_limit_mb']:,}: {'ok' if result['rss_ok'] else 'OVER'}); lazy / in-memory speed "
          f"per round: {', '.join(str(r['ratio']) for r in rounds)}; median {ratio}; interleaved in one process: "
          f"median {result.get('interleaved', {}).get('ratio_median')} (goal >= 0.9: "
          f"{'ok' if result['speed_ok'] else 'NOT MET'})")
    print(f"wrote {args.results}")


if __name__ == "__main__":
    main()
