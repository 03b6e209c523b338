"""A real `vaelab tune` search: an MLP VAE, tuning beta, the latent size and the learning rate.

    python benchmarks/tune_demo.py                         # digits: 20 trials of 30 epochs, 1 thread (minutes)
    python benchmarks/tune_demo.py --dataset mnist --trials 12 --epochs 3 --threads 2 --nll-samples 20

The objective is the importance-sampled negative log-likelihood (nats; --nll-samples importance samples per image:
fewer than the literature's 5000, so a somewhat looser upper bound of -log p(x)) of a validation split, 10 % of the
training split held out (stratified, seeded): unlike the validation loss, it does not depend on beta, so the search
can compare betas. Trials train on the other 90 % and are pruned on the per-epoch validation -ELBO (beta-free too)
by Optuna's median pruner. The best trial is then measured once on the untouched test split (best_test_value). The search runs as the CLI command in a subprocess,
writes its study into runs/tune-demo-<name>/, and this script prints the trials table and writes
benchmarks/results/tune-<name>.json (the space, the trials, the best value and settings, the wall time).
Run it niced on a shared machine; the data are read from --data-dir (or $VAELAB_DATA).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]

SEARCH = """\
[space]
beta = {{low = 0.25, high = 8, log = true}}
latent-dim = {{choices = [2, 8, 16, 32]}}
lr = {{low = 1e-4, high = 1e-2, log = true}}

[fixed]
model = "vae"
arch = "mlp"
hidden = [512]
dataset = "{dataset}"
data-dir = {data_dir}
epochs = {epochs}
batch-size = 128
threads = {threads}

[study]
objective = "nll"
nll_samples = {nll_samples}
n_trials = {trials}
seed = 0
validation = 0.1
pruner = "median"
pruner_startup_trials = 4
pruner_warmup_epochs = 1
"""


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dataset", default="digits", choices=("digits", "mnist", "fashion-mnist"))
    ap.add_argument("--trials", type=int, default=20)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--nll-samples", type=int, default=500)
    ap.add_argument("--data-dir", default=os.environ.get("VAELAB_DATA", "/work/shared/data"))
    ap.add_argument("--name", default=None, help="[default <dataset>-vae]")
    args = ap.parse_args()
    args.name = args.name or f"{args.dataset}-vae"

    out = REPO / "runs" / f"tune-demo-{args.name}"
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    search = out / "search.toml"
    search.write_text(SEARCH.format(data_dir=json.dumps(str(args.data_dir)), epochs=args.epochs,
                                    threads=args.threads, trials=args.trials, dataset=args.dataset,
                                    nll_samples=args.nll_samples), encoding="utf-8")
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "PYTHONPATH": str(REPO / "src")}
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-m", "vaelab", "tune", str(search), "--out", str(out), "--study", args.name],
                   check=True, env=env, cwd=REPO)
    wall = time.perf_counter() - t0
    study = json.loads((out / "study.json").read_text(encoding="utf-8"))

    print(f"\n{'trial':>5}  {'state':<8}  {'nll':>8}  {'epochs':>6}  {'beta':>7}  {'latent':>6}  {'lr':>9}")
    for t in study["trials"]:
        p = t["params"]
        value = "" if t["value"] is None else f"{t['value']:.2f}"
        print(f"{t['number']:>5}  {t['state'].lower():<8}  {value:>8}  {t['epochs'] or '':>6}  {p['beta']:>7.3f}  "
              f"{p['latent_dim']:>6}  {p['lr']:>9.2e}")
    print(f"\nbest validation nll {study['best_value']:.2f} nats, the same trial on the test split "
          f"{study['best_test_value']:.2f} nats (trial {study['best_trial']}): {study['best_params']}; "
          f"{study['states']}; wall {wall:.0f} s")

    result = {"name": args.name, "command": f"vaelab tune {search.relative_to(REPO)} --out {out.relative_to(REPO)}",
              "search_file": search.read_text(encoding="utf-8"), "objective": study["objective"],
              "direction": study["direction"], "space": study["space"], "fixed": study["fixed"],
              "prune_on": study["prune_on"], "validation": study["validation"], "states": study["states"],
              "best_value": study["best_value"], "best_value_split": study["best_value_split"],
              "best_test_value": study["best_test_value"],
              "best_trial": study["best_trial"], "best_params": study["best_params"],
              "trials": [{k: t[k] for k in ("number", "state", "value", "epochs", "seconds", "params")}
                         for t in study["trials"]],
              "wall_s": round(wall, 1), "threads": args.threads,
              "machine": {"python": platform.python_version(), "cpu_count": os.cpu_count()}}
    path = REPO / "benchmarks" / "results" / f"tune-{args.name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n", encoding="utf-8")
    print(f"wrote {path.relative_to(REPO)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
