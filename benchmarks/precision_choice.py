"""Does `--precision auto` pick the faster precision? (issue 23: the measured choice.)

    python benchmarks/precision_choice.py                                  # 3 presets, 2 threads, 2 rounds
    python benchmarks/precision_choice.py --presets seed-vae --threads 1,2 --rounds 3 --epochs 2

Where the device computes bf16 natively, `auto` times one training step of the model in fp32 and in bf16 before
the first epoch and takes bf16 only at 90% of fp32's step time or less (src/vaelab/training/loop.py). This checks
that the few timed steps predict whole epochs: for every preset and thread count, `vaelab train` on MNIST for
--epochs epochs once with --precision fp32, once with bf16 and once with auto, each in its own process with a
fresh cache folder (so every auto run measures anew instead of reading the last one's times), the three in a
rotating order in every round. Per run: the median epoch seconds (the loop's time_s: training and validation);
per auto run: its choice and its measured step times.

Prints a table (fp32 and bf16 s/epoch as the median over rounds, the faster one, auto's choices, its step-time
ratio bf16/fp32 against the epoch-time ratio, and auto's epoch time against the faster precision's) and writes
benchmarks/results/precision-choice.json. Run it on a quiet machine: the ratios are what it measures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
PRECISIONS = ("fp32", "bf16", "auto")


def _csv(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def train(preset: str, precision: str, threads: int, args, work: Path, rnd: int) -> dict:
    """One `vaelab train` process, in a cache folder of its own (an auto run times the two precisions afresh); its
    epoch seconds and, for auto, its choice."""
    out = work / f"{preset}-{precision}-{threads}t"
    env = dict(os.environ, XDG_CACHE_HOME=str(work / f"cache-{out.name}-round{rnd}"), OMP_NUM_THREADS=str(threads),
               PYTHONPATH=os.pathsep.join([str(REPO / "src")] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    cmd = [sys.executable, "-m", "vaelab", "train", "--preset", preset, "--dataset", "mnist", "--data-dir",
           args.data_dir, "--epochs", str(args.epochs), "--precision", precision, "--threads", str(threads),
           "--seed", "0", "--no-pictures", "--no-progress", "--overwrite", "--out", str(out)]
    t0 = time.perf_counter()
    p = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if p.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{p.stderr[-2000:]}")
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    cfg = json.loads((out / "config.json").read_text())
    run = {"preset": preset, "precision": precision, "threads": threads, "trained_in": cfg["train"]["precision"],
           "epoch_s": statistics.median(r["time_s"] for r in rows), "process_s": round(time.perf_counter() - t0, 2),
           "val_loss": rows[-1].get("val_loss")}
    if precision == "auto":
        run["auto"] = cfg["precision_auto"]
    return run


def summarize(runs: list[dict]) -> list[dict]:
    """One row per preset and thread count."""
    rows = []
    for preset, threads in dict.fromkeys((r["preset"], r["threads"]) for r in runs):
        mine = [r for r in runs if (r["preset"], r["threads"]) == (preset, threads)]
        s = {p: statistics.median(r["epoch_s"] for r in mine if r["precision"] == p) for p in PRECISIONS}
        faster = "bf16" if s["bf16"] < s["fp32"] else "fp32"
        autos = [r["auto"] for r in mine if r["precision"] == "auto"]
        steps = [a["step_ms"]["bf16"] / a["step_ms"]["fp32"] for a in autos if "step_ms" in a]
        rows.append({"preset": preset, "threads": threads, "fp32_epoch_s": s["fp32"], "bf16_epoch_s": s["bf16"],
                     "auto_epoch_s": s["auto"], "faster": faster, "epoch_ratio_bf16_fp32": s["bf16"] / s["fp32"],
                     "auto_chose": [a["chose"] for a in autos],
                     "step_ratio_bf16_fp32": [round(v, 3) for v in steps],
                     "auto_vs_faster": s["auto"] / min(s["fp32"], s["bf16"]),
                     "auto_right": all(a["chose"] == faster for a in autos)})
    return rows


def print_table(rows: list[dict]) -> None:
    head = ["preset", "threads", "fp32 s/ep", "bf16 s/ep", "faster", "epoch bf16/fp32", "auto chose",
            "step bf16/fp32", "auto s/ep", "auto / faster"]
    body = [[r["preset"], str(r["threads"]), f"{r['fp32_epoch_s']:.2f}", f"{r['bf16_epoch_s']:.2f}", r["faster"],
             f"{r['epoch_ratio_bf16_fp32']:.2f}", ",".join(r["auto_chose"]),
             ",".join(f"{v:.2f}" for v in r["step_ratio_bf16_fp32"]) or "-", f"{r['auto_epoch_s']:.2f}",
             f"{r['auto_vs_faster']:.2f}"] for r in rows]
    widths = [max(len(x[i]) for x in [head] + body) for i in range(len(head))]
    for line in [head] + body:
        print("  ".join(c.ljust(w) for c, w in zip(line, widths)), flush=True)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--presets", type=_csv, default=["seed-conv-ae", "seed-vae", "mnist-vae"])
    p.add_argument("--threads", type=lambda t: [int(v) for v in _csv(t)], default=[2])
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--epochs", type=int, default=2, help="epochs per run; the median epoch counts [default 2]")
    p.add_argument("--data-dir", default=os.environ.get("VAELAB_DATA") or str(REPO.parent / "shared" / "data"))
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "precision-choice.json"))
    args = p.parse_args(argv)
    from vaelab.io import atomic_write_json
    from vaelab.training.runtime import BF16_GAIN, cpu_flags, cpu_name

    runs = []
    with tempfile.TemporaryDirectory(prefix="vaelab-precision-choice-") as tmp:
        for r in range(args.rounds):
            order = PRECISIONS[r % 3:] + PRECISIONS[:r % 3]  # each precision first in turn
            for preset in args.presets:
                for threads in args.threads:
                    for precision in order:
                        runs.append({"round": r, **train(preset, precision, threads, args, Path(tmp), r)})
                        print(json.dumps(runs[-1]), flush=True)
    rows = summarize(runs)
    print_table(rows)
    result = {"machine": {"cpu": cpu_name(), "bf16_flags": sorted(cpu_flags() & {"avx512_bf16", "amx_bf16"}),
                          "python": platform.python_version(), "host": platform.node()},
              "bf16_gain": BF16_GAIN, "epochs": args.epochs, "rounds": args.rounds,
              "date": time.strftime("%Y-%m-%d"), "rows": rows, "runs": runs}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, result)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
