"""The K=5000 likelihood with bf16 decodings against fp32 (issue 23, part 3): its speed and its shift.

    python benchmarks/nll_precision.py --data-dir DATA                  # train the seed VAE once, compare, time
    python benchmarks/nll_precision.py --data-dir DATA --compare-images 200 --full-images 0    # a short check
    python benchmarks/nll_precision.py --dataset digits --run /tmp/d --epochs 2 --compare-images 20 --full-images 20

1. The model: the seed VAE (`vaelab train --preset seed-vae --dataset mnist --epochs 10 --seed 0`, the tutorial's
   conv decoder), trained into --run unless its --epochs are there already (then it is reused: delete RUN to
   retrain; a run cut short is resumed).
2. Paired, on the first --compare-images test images: -log p(x) with K=5000 importance samples, once with fp32
   decodings and once with bf16 (`--nll-precision bf16`), the same images (dynamically binarized with seed 0, the
   literature's protocol: `vaelab evaluate --binarize dynamic`) and the same samples. Each image's difference
   bf16 - fp32, their mean and its standard error, and each precision's decoder passes per second.
3. The whole test split (--full-images, 10,000) with bf16 decodings, timed: the estimate with its standard error,
   against fp32's time for it at step 2's rate (fp32's full run takes over an hour: docs/results.md).
4. With --paths-images N: the two bf16 decoding paths alternated --paths-rounds times on the first N test images
   with the same samples: the seed VAE's decoder through oneDNN's transposed convolutions (nn.Sequential's forward,
   vaelab's bf16 path until ConvDecoder) and through ConvDecoder's sub-pixel convolutions (models/kernels.py, the
   path since): each one's passes per second, their ratio per round, and the paired difference of the estimates.

Prints a table and writes benchmarks/results/nll-precision.json. Run it on a quiet machine (the times are what it
measures); --threads is the NLL's thread count (training uses the CLI's default).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
K = 5000


def train(run: Path, args) -> None:
    """The seed VAE on MNIST, through the CLI as a user trains it."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO / "src")] + [p for p in [os.environ.get("PYTHONPATH")]
                                                                             if p]))
    cmd = [sys.executable, "-m", "vaelab", "train", "--preset", "seed-vae", "--dataset", args.dataset,
           *(["--data-dir", args.data_dir] if args.data_dir else []), "--epochs", str(args.epochs), "--seed", "0",
           "--no-pictures", "--no-progress", "--out", str(run)]
    cmd += ["--resume"] if (run / "checkpoint.safetensors").is_file() else []
    print(f"training the seed VAE into {run}", flush=True)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{proc.stderr[-2000:]}")


def _epochs_done(run: Path) -> int:
    metrics = run / "metrics.jsonl"
    return len(metrics.read_text().splitlines()) if (run / "model.safetensors").is_file() and metrics.is_file() else 0


def timed_nll(model, data, precision: str) -> dict:
    from vaelab.evaluation.nll import importance_nll

    t0 = time.perf_counter()
    out = importance_nll(model, data, n_samples=K, binarize=True, seed=0, precision=precision, per_sample=True)
    seconds = time.perf_counter() - t0
    return {**out, "seconds": round(seconds, 1), "passes_per_s": round(out["n"] * K / seconds)}


def decoding_paths(model, test, n: int, rounds: int) -> dict:
    """bf16 decodings through oneDNN's transposed convolutions against ConvDecoder's sub-pixel path, alternated."""
    import torch
    from torch import nn

    from vaelab.models.kernels import ConvDecoder

    data = test.subset(torch.arange(n))
    sub_pixel = ConvDecoder.forward
    runs: dict[str, list] = {"onednn": [], "sub_pixel": []}
    try:
        for _ in range(rounds):
            for name, forward in (("onednn", nn.Sequential.forward), ("sub_pixel", sub_pixel)):
                ConvDecoder.forward = forward  # the class's inference path for this run (restored below)
                runs[name].append(timed_nll(model, data, "bf16"))
    finally:
        ConvDecoder.forward = sub_pixel
    diff = runs["sub_pixel"][0]["nll_per_sample"] - runs["onednn"][0]["nll_per_sample"]
    rates = {name: [r["passes_per_s"] for r in rs] for name, rs in runs.items()}
    return {"images": n, "rounds": rounds, "passes_per_s": rates,
            "speedup_per_round": [round(a / b, 2) for a, b in zip(rates["sub_pixel"], rates["onednn"])],
            "nll": {name: rs[0]["nll"] for name, rs in runs.items()}, "diff_mean": float(diff.mean()),
            "diff_se": float(diff.std() / math.sqrt(n)), "diff_abs_max": float(diff.abs().max())}


def compare(model, test, n: int) -> dict:
    """fp32 and bf16 decodings of the same images and samples; the bf16 run first, then fp32."""
    import torch

    data = test.subset(torch.arange(n))
    bf16, fp32 = timed_nll(model, data, "bf16"), timed_nll(model, data, "fp32")
    diff = bf16.pop("nll_per_sample") - fp32.pop("nll_per_sample")
    return {"images": n, "fp32": fp32, "bf16": bf16, "speedup": round(bf16["passes_per_s"] / fp32["passes_per_s"], 2),
            "diff_mean": float(diff.mean()), "diff_se": float(diff.std() / math.sqrt(n)),
            "diff_abs_max": float(diff.abs().max())}


def main(argv=None) -> dict:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--dataset", default="mnist", help="the data (mnist; digits for a quick check)")
    p.add_argument("--data-dir", default=None, help="the folder holding MNIST's IDX files (or $VAELAB_DATA)")
    p.add_argument("--run", default=str(REPO / "runs" / "nll-precision-seed-vae"),
                   help="the seed VAE's run folder: trained there unless it holds a model")
    p.add_argument("--epochs", type=int, default=10, help="the seed VAE's training epochs (the tutorial's 10)")
    p.add_argument("--compare-images", type=int, default=500, help="test images scored in both precisions")
    p.add_argument("--full-images", type=int, default=10_000, help="test images scored in bf16 alone (0: skip)")
    p.add_argument("--paths-images", type=int, default=0,
                   help="test images on which to alternate the two bf16 decoding paths (0: skip)")
    p.add_argument("--paths-rounds", type=int, default=2, help="rounds of that alternation")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "nll-precision.json"))
    args = p.parse_args(argv)
    run = Path(args.run)
    if _epochs_done(run) < args.epochs:  # a fresh run, or one cut short: `vaelab train` resumes it
        train(run, args)
    import torch

    from vaelab.data import load_dataset
    from vaelab.models import from_pretrained
    from vaelab.io import atomic_write_json
    from vaelab.training.runtime import cpu_flags, cpu_name

    torch.set_num_threads(args.threads)
    model = from_pretrained(run).eval()
    test = load_dataset(args.dataset, args.data_dir, progress=False).test
    cfg = json.loads((run / "config.json").read_text())
    flags = cpu_flags()
    result = {"model": "seed-vae", "dataset": args.dataset, "trained_epochs": cfg["train"]["epochs"],
              "trained_in": cfg["train"]["precision"], "nll_samples": K, "threads": args.threads,
              "torch": torch.__version__, "cpus": os.cpu_count(), "cpu": cpu_name(),
              "bf16_native": "avx512_bf16" in flags, "amx_bf16": "amx_bf16" in flags,
              "compare": compare(model, test, args.compare_images)}
    if args.paths_images:
        result["paths"] = decoding_paths(model, test, args.paths_images, args.paths_rounds)
    if args.full_images:
        full = timed_nll(model, test.subset(torch.arange(min(args.full_images, len(test)))), "bf16")
        full.pop("nll_per_sample")
        fp32_rate = result["compare"]["fp32"]["passes_per_s"]
        result["full"] = {**full, "minutes": round(full["seconds"] / 60, 1),
                          "fp32_minutes_at_compare_rate": round(full["n"] * K / fp32_rate / 60, 1)}
    report(result)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, result)  # a result file is replaced whole or not at all
    print(f"wrote {args.out}")
    return result


def report(r: dict) -> None:
    c = r["compare"]
    print(f"seed VAE on {r.get('dataset', 'mnist')} ({r['trained_epochs']} epochs, trained in {r['trained_in']}), "
          f"K={r['nll_samples']}, {r['threads']} threads, native bf16: {r['bf16_native']}")
    print("| images | precision | -log p(x) (nats) | decoder passes/s | seconds |\n|---|---|---|---|---|")
    for name in ("fp32", "bf16"):
        s = c[name]
        print(f"| first {c['images']:,} | {name} | {s['nll']:.3f} ± {s['nll_se']:.3f} | {s['passes_per_s']:,} | "
              f"{s['seconds']} |")
    if "full" in r:
        f = r["full"]
        print(f"| all {f['n']:,} | bf16 | {f['nll']:.3f} ± {f['nll_se']:.3f} | {f['passes_per_s']:,} | "
              f"{f['seconds']} ({f['minutes']} min; fp32 at its rate above: {f['fp32_minutes_at_compare_rate']} min) |")
    print(f"bf16 - fp32 on the same images and samples: {c['diff_mean']:+.4f} ± {c['diff_se']:.4f} nats (largest "
          f"|difference| of one image {c['diff_abs_max']:.4f}); bf16 {c['speedup']}x the passes/s")
    if "paths" in r:
        d = r["paths"]
        print(f"bf16 decoding paths on the first {d['images']:,} images, alternated {d['rounds']} times: oneDNN's "
              f"transposed convolutions {d['passes_per_s']['onednn']} passes/s, ConvDecoder's sub-pixel "
              f"{d['passes_per_s']['sub_pixel']}: {d['speedup_per_round']}x per round; sub-pixel - oneDNN "
              f"{d['diff_mean']:+.4f} ± {d['diff_se']:.4f} nats (largest |difference| {d['diff_abs_max']:.4f})")


if __name__ == "__main__":
    main()
