"""Quality against published figures: named presets trained on MNIST under a fixed budget on this machine.

    python benchmarks/quality.py                          # seed, ae128 and nll (about 60 min on 2 cores)
    python benchmarks/quality.py --parts nll-long --runs /tmp/runs   # the longer recipe (about 2 h)
    python benchmarks/quality.py --parts nll --nll-samples 5000
    python benchmarks/quality.py --parts seed,ae128 --threads 2

Parts (each trains with `vaelab.training.fit`, the loop `vaelab train` runs, and scores the test split with
`vaelab.evaluation`, the code `vaelab evaluate` runs):
  seed   the tutorial's two presets after 10 epochs, against the test losses its Keras code reached on this
         machine (conv AE test BCE 0.0705 per pixel; VAE test loss 784*BCE + KL 154.7).
  ae128  preset `conv-ae-128` (a conv autoencoder with a 128-dim code), against the Keras blog's conv
         autoencoder (128-dim code 4x4x8, test BCE 0.094 after 50 epochs).
  nll    preset `mnist-vae` on dynamically binarized MNIST, then the test NLL by importance sampling with
         K = --nll-samples (the literature's protocol: K=5000 on the test split binarized once with a fixed
         seed), against the IWAE paper's Table 1 (Burda et al. 2016): VAE, one stochastic layer, 86.76 nats;
         IWAE, two stochastic layers, k=50, 82.90 nats. The preset's epochs are chosen so that its training
         fits in 30 minutes on 2 CPU cores; --nll-epochs changes them.
  nll-long  the longer recipe, preset `mnist-hvae` (two stochastic layers, trained on the IWAE bound with K=5;
         about 90 minutes on 2 cores), scored the same way, against the IWAE paper's two-layer model with k=5,
         83.89 nats; --long-epochs changes its epochs. Not in the default set of parts.

Prints one table with the published figure beside each measured one and writes benchmarks/results/quality.json
(parts run earlier are kept, so one part can be rerun on its own).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

import torch  # noqa: E402

from vaelab.config import get_preset  # noqa: E402
from vaelab.data import load_dataset  # noqa: E402
from vaelab.evaluation import evaluate, loss_terms  # noqa: E402
from vaelab.models import build_model  # noqa: E402
from vaelab.training import fit  # noqa: E402
from vaelab.training.checkpoint import atomic_write_json  # noqa: E402

PARTS = ("seed", "ae128", "nll", "nll-long")
PUBLISHED = {
    "seed-conv-ae": ("test BCE per pixel", 0.0705, "the tutorial's Keras code, 10 epochs, this machine"),
    "seed-vae": ("test loss 784*BCE + KL", 154.7, "the tutorial's Keras code, 10 epochs, this machine"),
    "conv-ae-128": ("test BCE per pixel", 0.094, "Keras blog conv AE, 128-dim code, 50 epochs"),
    "mnist-vae": ("test NLL, nats", 86.76, "IWAE paper Table 1: VAE, 1 stochastic layer (k=1)"),
    "mnist-hvae": ("test NLL, nats", 83.89, "IWAE paper Table 1: IWAE, 2 stochastic layers, k=5 (k=50: 82.90)"),
}


def _train(preset: str, mnist, args, run: Path | None, **train) -> tuple:
    """(model, history, training seconds) for a preset, resumable from `run` when it holds a checkpoint."""
    p = get_preset(preset)
    cfg = p.train.replace(seed=args.seed, threads=args.threads, progress=False, **train)
    if args.precision:
        cfg = cfg.replace(precision=args.precision)
    torch.manual_seed(cfg.seed)
    model = build_model(p.model, input_shape=mnist.train.sample_shape)
    resume = run is not None and (run / "checkpoint.safetensors").is_file()
    history = fit(model, mnist.train, mnist.test, cfg, out=run, resume=resume)
    return model, history, sum(r["time_s"] for r in history), cfg


def _run_dir(args, name: str) -> Path | None:
    return Path(args.runs) / name if args.runs else None


def run_seed(args, mnist) -> dict:
    out = {}
    for preset, key in (("seed-conv-ae", "bce"), ("seed-vae", "loss")):
        print(f"{preset}: 10 epochs", flush=True)
        model, history, train_s, cfg = _train(preset, mnist, args, _run_dir(args, preset), epochs=10)
        terms = loss_terms(model, mnist.test)
        out[preset] = {"metric": key, "value": terms[key], "epochs": 10, "batch_size": cfg.batch_size,
                       "train_s": round(train_s, 1), "test": terms}
        print(f"  test {key} {terms[key]:.5g} (published {PUBLISHED[preset][1]}), {train_s:.0f} s", flush=True)
    return out


def run_ae128(args, mnist) -> dict:
    print(f"conv-ae-128: {args.ae_epochs} epochs", flush=True)
    model, history, train_s, cfg = _train("conv-ae-128", mnist, args, _run_dir(args, "conv-ae-128"),
                                          epochs=args.ae_epochs)
    terms = loss_terms(model, mnist.test)
    print(f"  test BCE {terms['bce']:.5f} (Keras blog 0.094 after 50 epochs), {train_s:.0f} s", flush=True)
    return {"conv-ae-128": {"metric": "bce", "value": terms["bce"], "epochs": args.ae_epochs,
                            "batch_size": cfg.batch_size, "train_s": round(train_s, 1), "test": terms,
                            "per_epoch_bce": [round(r["val_bce"], 5) for r in history]}}


def run_nll(args, mnist, preset_name: str = "mnist-vae") -> dict:
    preset = get_preset(preset_name)
    epochs = (args.nll_epochs if preset_name == "mnist-vae" else args.long_epochs) or preset.train.epochs
    name = preset_name if epochs == preset.train.epochs else f"{preset_name}-{epochs}ep"
    print(f"{name}: {epochs} epochs on dynamically binarized MNIST, then the test NLL with K={args.nll_samples}",
          flush=True)
    model, history, train_s, cfg = _train(preset_name, mnist, args, _run_dir(args, name), epochs=epochs)
    test = mnist.test if not args.nll_test_size else mnist.test.subset(torch.arange(args.nll_test_size))
    t0 = time.perf_counter()
    ev = evaluate(model, test, binarize=True, nll_samples=args.nll_samples)
    eval_s = time.perf_counter() - t0
    row = {"metric": "nll", "value": round(ev["nll"], 3), "nll_se": round(ev["nll_se"], 3),
           "test_neg_elbo": round(-ev["elbo"], 3), "active_units": ev.get("active_units"),
           "bottom_active_units": ev.get("bottom_active_units"), "epochs": epochs,
           "batch_size": cfg.batch_size, "precision": cfg.precision, "threads": args.threads,
           "train_s": round(train_s, 1), "train_min": round(train_s / 60, 1),
           "nll_samples": args.nll_samples, "test_images": len(test), "eval_s": round(eval_s, 1),
           "eval_images_per_s": round(len(test) / eval_s, 1),
           "decoder_passes_per_s": round(len(test) * args.nll_samples / eval_s),
           "per_epoch_val_loss": [round(r["val_loss"], 2) for r in history]}
    print(f"  NLL {ev['nll']:.2f} ± {ev['nll_se']:.2f} nats (-ELBO {-ev['elbo']:.2f}) after {train_s / 60:.1f} min "
          f"of training; evaluation {eval_s:.0f} s ({row['decoder_passes_per_s']:,} decoder passes/s)", flush=True)
    return {name: row}


def print_table(result: dict) -> None:
    rows = [["preset", "epochs", "train min", "measured", "published", "what / protocol"]]
    for name, r in result.get("rows", {}).items():
        base = max((k for k in PUBLISHED if name.startswith(k)), key=len)  # mnist-vae-300ep: mnist-vae
        what, ref, source = PUBLISHED[base]
        value = f"{r['value']:.4f}" if r["metric"] == "bce" else f"{r['value']:.2f}"
        if r["metric"] == "nll":
            value += f" ± {r['nll_se']:.2f} (K={r['nll_samples']})"
        rows.append([name, str(r["epochs"]), f"{r['train_s'] / 60:.1f}", value, str(ref), f"{what}; {source}"])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  " + "  ".join(c.ljust(w) for c, w in zip(r, widths)))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", default="seed,ae128,nll", help=f"comma-separated subset of {','.join(PARTS)} "
                   "[default seed,ae128,nll]")
    p.add_argument("--data-dir", default=os.environ.get("VAELAB_DATA") or str(REPO.parent / "shared" / "data"))
    p.add_argument("--threads", type=int, default=2, help="torch threads [default 2]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", choices=("fp32", "bf16", "auto"), default="", help="override the presets' "
                   "precision (bf16: mixed precision, faster on CPUs with AVX-512 BF16; auto: bf16 where the device "
                   "computes it natively)")
    p.add_argument("--ae-epochs", type=int, default=10)
    p.add_argument("--nll-epochs", type=int, default=0, help="epochs of mnist-vae [default: the preset's]")
    p.add_argument("--long-epochs", type=int, default=0, help="epochs of mnist-hvae [default: the preset's]")
    p.add_argument("--nll-samples", type=int, default=5000)
    p.add_argument("--nll-test-size", type=int, default=0, help="score only the first N test images [all]")
    p.add_argument("--runs", default="", help="keep the run directories here (an interrupted part resumes)")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "quality.json"))
    args = p.parse_args(argv)
    parts = [s.strip() for s in args.parts.split(",") if s.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        p.error(f"unknown parts {unknown}; choose from {list(PARTS)}")
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result = json.loads(out.read_text()) if out.is_file() else {}
    result["machine"] = {"date": time.strftime("%Y-%m-%d"), "python": platform.python_version(),
                         "torch": torch.__version__, "cpus": os.cpu_count(), "threads": args.threads,
                         "cpu": platform.processor() or platform.machine()}
    mnist = load_dataset("mnist", args.data_dir, progress=False)
    for part in parts:
        run = {"seed": run_seed, "ae128": run_ae128, "nll": run_nll,
               "nll-long": lambda a, m: run_nll(a, m, "mnist-hvae")}[part]
        rows = run(args, mnist)
        result.setdefault("rows", {}).update(rows)
        atomic_write_json(out, result)
    print()
    print_table(result)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
