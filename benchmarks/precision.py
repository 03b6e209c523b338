"""Does `--precision auto` move quality? (issue 23: shown before it becomes the default.)

    python benchmarks/precision.py                       # about 45 minutes on 2 cores (2 jobs of 1 thread)
    python benchmarks/precision.py --parts seed --seeds 0,1,2,3,4

Each job is one run of an existing quality benchmark in its own process (one torch thread), once with
--precision fp32 and once with --precision auto (what `vaelab train --precision auto` chooses on this machine,
printed in the table's title: bf16 mixed precision on CPUs with AVX-512 BF16 or AMX, else fp32):
  seed   benchmarks/quality.py --parts seed: the tutorial's two presets, 10 epochs each, over --seeds: the conv AE's
         test BCE per pixel and the VAE's test loss (784*BCE + KL).
  nll    benchmarks/quality.py --parts nll: the `mnist-vae` likelihood recipe shortened to --nll-epochs epochs
         (the full recipe is 230 epochs), then the K=5000 importance-sampled test NLL of the first --nll-images
         test images (binarized once, fixed seed), with its standard error.
  vqvae  benchmarks/vqvae.py --parts vqvae: the VQ-VAE (K=64) and the seed conv AE, 10 epochs: test MSE, perplexity.
  matmul (in this process, seconds) one-thread matrix products of the dense layers' shapes in fp32 and bf16,
         alternated over 5 rounds: GFLOP/s, the median round (why bf16 can lose on a CPU without AMX).

Evaluation is always fp32 (`vaelab evaluate`'s default), so the table compares the weights each precision trained.
The training seconds are one torch thread with another job beside it on the 2 cores: a rough ratio, not a speed
benchmark (benchmarks/speed.py is).
Prints one table (mean, and the standard deviation over seeds where there are several) and writes
benchmarks/results/precision-quality.json; each job's own JSON is kept in --work (a rerun skips finished jobs).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
PRECISIONS = ("fp32", "auto")


def jobs(args) -> list[dict]:
    """One dict per process to run: its name, command line and JSON file."""
    work, py = Path(args.work), [sys.executable]
    common = ["--data-dir", args.data_dir, "--threads", "1"]
    out = []
    if "seed" in args.parts:  # each seed under both precisions, one after the other: partial results pair up
        for seed in args.seeds:
            for prec in PRECISIONS:
                f = work / f"seed-{prec}-{seed}.json"
                out.append({"part": "seed", "precision": prec, "seed": seed, "file": f,
                            "cmd": py + [str(REPO / "benchmarks" / "quality.py"), "--parts", "seed", "--seed",
                                         str(seed), "--precision", prec, "--out", str(f), *common]})
    for prec in PRECISIONS * ("nll" in args.parts):
        f = work / f"nll-{prec}.json"
        out.append({"part": "nll", "precision": prec, "seed": 0, "file": f,
                    "cmd": py + [str(REPO / "benchmarks" / "quality.py"), "--parts", "nll", "--nll-epochs",
                                 str(args.nll_epochs), "--nll-test-size", str(args.nll_images),
                                 "--precision", prec, "--out", str(f), *common]})
    for prec in PRECISIONS * ("vqvae" in args.parts):
        f = work / f"vqvae-{prec}.json"
        out.append({"part": "vqvae", "precision": prec, "seed": 0, "file": f,
                    "cmd": py + [str(REPO / "benchmarks" / "vqvae.py"), "--parts", "vqvae", "--precision", prec,
                                 "--out", str(f), *common]})
    return out


def run_job(job: dict) -> dict:
    if job["file"].is_file() and _done(job):
        return job
    log = job["file"].with_suffix(".log")
    t0 = time.perf_counter()
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with open(log, "w") as f:
        rc = subprocess.run(job["cmd"], stdout=f, stderr=subprocess.STDOUT, env=env, cwd=REPO).returncode
    print(f"  {job['file'].name}: exit {rc} after {time.perf_counter() - t0:.0f} s", flush=True)
    if rc != 0:
        raise RuntimeError(f"{' '.join(job['cmd'])} failed ({rc}); see {log}")
    return job


def _done(job: dict) -> bool:
    data = json.loads(job["file"].read_text())
    return bool(data.get("rows") if job["part"] != "vqvae" else data.get("vqvae"))


def metrics(job: dict) -> dict[str, float]:
    """The numbers a job contributes to the table, by row name."""
    data = json.loads(job["file"].read_text())
    if job["part"] == "seed":
        rows = data["rows"]
        return {"seed-conv-ae: test BCE per pixel": rows["seed-conv-ae"]["value"],
                "seed-vae: test loss (784*BCE + KL)": rows["seed-vae"]["value"],
                "seed-conv-ae: training s (10 epochs)": rows["seed-conv-ae"]["train_s"],
                "seed-vae: training s (10 epochs)": rows["seed-vae"]["train_s"]}
    if job["part"] == "nll":
        row = next(iter(data["rows"].values()))
        return {f"mnist-vae {row['epochs']} epochs: test NLL, K={row['nll_samples']}, {row['test_images']} images":
                row["value"], f"mnist-vae {row['epochs']} epochs: NLL standard error": row["nll_se"],
                f"mnist-vae {row['epochs']} epochs: test -ELBO": row["test_neg_elbo"],
                f"mnist-vae {row['epochs']} epochs: training s": row["train_s"]}
    vq, ae = data["vqvae"]["vqvae"], data["vqvae"]["seed_conv_ae"]
    return {"vqvae K=64: test MSE per pixel": vq["test_mse"], "vqvae K=64: test perplexity": vq["test_perplexity"],
            "seed-conv-ae (vqvae.py's): test MSE per pixel": ae["test_mse"]}


MATMUL_SHAPES = ((100, 784, 512), (100, 512, 512), (128, 3136, 16), (512, 512, 512))  # (batch, in, out)


def matmul_rates(rounds: int = 5, reps: int = 200) -> list[dict]:
    """GFLOP/s of x (m, k) @ w (k, n) on one thread, fp32 against bf16 tensors, alternated over rounds."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    out = []
    for m, k, n in MATMUL_SHAPES:
        rates = {"fp32": [], "bf16": []}
        x, w = torch.randn(m, k), torch.randn(k, n)
        for _ in range(rounds):
            for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
                a, b = x.to(dtype), w.to(dtype)
                for _ in range(10):
                    a @ b
                t0 = time.perf_counter()
                for _ in range(reps):
                    a @ b
                rates[name].append(2 * m * k * n * reps / (time.perf_counter() - t0) / 1e9)
        fp32, bf16 = statistics.median(rates["fp32"]), statistics.median(rates["bf16"])
        out.append({"shape": [m, k, n], "fp32_gflops": round(fp32, 1), "bf16_gflops": round(bf16, 1),
                    "bf16_over_fp32": round(bf16 / fp32, 2)})
        print(f"  matmul {m}x{k} @ {k}x{n}: fp32 {fp32:.0f}, bf16 {bf16:.0f} GFLOP/s ({bf16 / fp32:.2f}x)", flush=True)
    torch.set_num_threads(threads)
    return out


def table(done: list[dict]) -> list[dict]:
    values: dict[str, dict[str, list[float]]] = {}
    for job in done:
        for name, v in metrics(job).items():
            values.setdefault(name, {p: [] for p in PRECISIONS})[job["precision"]].append(v)
    rows = []
    for name, by in values.items():
        row = {"metric": name}
        for p in PRECISIONS:
            row[p] = by[p]
            row[f"{p}_mean"] = statistics.fmean(by[p]) if by[p] else None
            row[f"{p}_sd"] = statistics.stdev(by[p]) if len(by[p]) > 1 else None
        if row["fp32_mean"] is not None and row["auto_mean"] is not None:
            row["auto_minus_fp32"] = row["auto_mean"] - row["fp32_mean"]
            row["relative"] = row["auto_minus_fp32"] / abs(row["fp32_mean"])
        rows.append(row)
    return rows


def print_table(rows: list[dict], chose: str) -> None:
    def cell(r, p):
        if r[f"{p}_mean"] is None:
            return "-"
        sd = f" ± {r[f'{p}_sd']:.3g}" if r[f"{p}_sd"] is not None else ""
        return f"{r[f'{p}_mean']:.5g}{sd} (n={len(r[p])})"

    lines = [["metric", "fp32", f"auto (= {chose})", "auto - fp32"]]
    for r in rows:
        diff = f"{r['auto_minus_fp32']:+.3g} ({100 * r['relative']:+.2f}%)" if "relative" in r else "-"
        lines.append([r["metric"], cell(r, "fp32"), cell(r, "auto"), diff])
    widths = [max(len(line[i]) for line in lines) for i in range(4)]
    for line in lines:
        print("  " + "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(line, widths))))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", default="seed,nll,vqvae,matmul")
    p.add_argument("--seeds", default="0,1,2", help="seeds of the seed part [default 0,1,2]")
    p.add_argument("--nll-epochs", type=int, default=30)
    p.add_argument("--nll-images", type=int, default=1000)
    p.add_argument("--jobs", type=int, default=2, help="processes at a time, one torch thread each [default 2]")
    p.add_argument("--data-dir", default=os.environ.get("VAELAB_DATA") or str(REPO.parent / "shared" / "data"))
    p.add_argument("--work", default="/tmp/vaelab-precision", help="the jobs' own JSON and logs")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "precision-quality.json"))
    args = p.parse_args(argv)
    args.parts = [s for s in args.parts.split(",") if s]
    args.seeds = [int(s) for s in args.seeds.split(",") if s]
    Path(args.work).mkdir(parents=True, exist_ok=True)
    import torch

    from vaelab.io import atomic_write_json
    from vaelab.training.runtime import choose_precision

    chose, why = choose_precision(torch.device("cpu"))
    matmul = matmul_rates() if "matmul" in args.parts else None
    todo = jobs(args)
    t0 = time.perf_counter()
    with ThreadPoolExecutor(args.jobs) as pool:
        futures = [pool.submit(run_job, j) for j in todo]
        done, failed = [], []
        for j, f in zip(todo, futures):
            try:
                done.append(f.result())
            except RuntimeError as e:  # one failed job does not lose the others
                failed.append(str(e))
    rows = table(done)
    print(f"\nquality under --precision fp32 and auto (auto chose {chose} here: {why}); evaluation in fp32")
    print_table(rows, chose)
    payload = {"machine": {"date": time.strftime("%Y-%m-%d"), "torch": torch.__version__, "cpus": os.cpu_count(),
                           "threads_per_job": 1}, "auto_chose": chose, "auto_why": why, "parts": args.parts,
               "seeds": args.seeds, "nll_epochs": args.nll_epochs, "nll_images": args.nll_images, "rows": rows,
               "matmul_one_thread": matmul,
               "failed": failed, "wall_s": round(time.perf_counter() - t0)}
    atomic_write_json(Path(args.out), payload)
    print(f"wrote {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
