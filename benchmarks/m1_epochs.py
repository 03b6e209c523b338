"""Do M1's codes classify better the longer M1 trains? (issue 25: M1+M2 with 100 labels.)

    nice -n 10 python benchmarks/m1_epochs.py --epochs-list 10,20,50,100,150,200 --data-dir ../shared/data
    python benchmarks/m1_epochs.py --epochs-list 1 --out /tmp/m1-smoke.json     # a quick check

The preset m1m2's M1 trains 20 epochs, and its codes classify worse than the pixels with 100 labels
(benchmarks/m1m2_codes.py). Kingma et al. (2014) trained M1 far longer. This trains the preset's M1 alone (the
preset's ModelConfig as model "vae": MLP 784-600-600, latent 50, Bernoulli likelihood) with `vaelab.fit`
(Adam 1e-3 constant, batch 128, fp32, --seed; the preset's binarization, none, unless --binarize), and at every
epoch of --epochs-list (through fit's on_epoch hook, so one uninterrupted run of vaelab's own loop) measures:

- the means of q(z1|x) (eval mode, fp32) of the training and held-out images;
- active units, both definitions: m1m2_codes.py's (mean KL of q(z1|x) to N(0, I) over the held-out images
  > 0.01 nats) and the variance over the held-out images of the mean code > 0.01 (Burda et al. 2016);
- logistic regression (scikit-learn, as m1m2_codes.py), 1-NN and 5-NN fitted on the --labels labelled images
  alone, on (a) the codes and (b) the codes standardized by the mean and std of all the training images' codes
  (unlabelled data); their error on the held-out images;
- the held-out negative ELBO (fit's validation loss: one posterior sample, fixed noise) and the training loss
  of every epoch.

Validation protocol, the real test set is never read: the training rows are the first 50,000 MNIST training
images, the held-out part the last 10,000; the labels are drawn from the first 50,000 by
vaelab.data.semisupervised.select_labels (balanced, --seed), as benchmarks/m2.py --validation does. The same
classifiers on the raw pixels are the baseline. The preset's own M1 stage differs in two ways: it sees the
labelled images oversampled in its batches (a quarter of each batch, as M2's mixed batches) and benchmarks/m2.py
runs it with bf16 and a cosine learning rate over 60 epochs; this measures M1 alone at a constant rate.

Prints a row per checkpoint and a table, and writes benchmarks/results/m1-epochs-validation.json (--out) after
every checkpoint (atomically: a killed run keeps what it measured). The run directory goes under /tmp. One
thread: 5.2 s an epoch on a quiet core (9-17 s with the other core busy); the committed result was stopped
after its epoch-300 checkpoint (its "note").
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch
from sklearn.linear_model import LogisticRegression
from sklearn.neighbors import KNeighborsClassifier

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))  # this checkout's vaelab

from vaelab.config import TrainConfig, get_preset
from vaelab.data import load_dataset
from vaelab.data.semisupervised import select_labels
from vaelab.models import build_model
from vaelab.training import fit
from vaelab.training.checkpoint import atomic_write_json

REPO = Path(__file__).resolve().parents[1]
CLASSIFIERS = {"logreg": lambda: LogisticRegression(max_iter=3000), "1-NN": lambda: KNeighborsClassifier(1),
               "5-NN": lambda: KNeighborsClassifier(5)}


def _ints(text: str) -> list[int]:
    try:
        return sorted({int(v) for v in text.replace(",", " ").split()})
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers such as 10,20,50, got {text!r}") from None


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=os.environ.get("VAELAB_DATA") or str(REPO.parent / "shared" / "data"),
                   help="folder holding MNIST [default $VAELAB_DATA, else ../shared/data]")
    p.add_argument("--epochs-list", type=_ints, default=[10, 20, 50, 100, 150, 200],
                   help="epochs at which to measure the codes; M1 trains to the largest [default 10,20,50,100,150,200]")
    p.add_argument("--threads", type=int, default=1, help="torch threads [default 1]")
    p.add_argument("--seed", type=int, default=0, help="weights, data order and the label draw [default 0]")
    p.add_argument("--labels", type=int, default=100, help="labelled images the classifiers see [default 100]")
    p.add_argument("--binarize", action="store_true",
                   help="dynamic binarization while training (the preset m1m2 trains on the intensities)")
    p.add_argument("--run-dir", default=None, help="fit's run directory [default: a new folder under /tmp]")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "m1-epochs-validation.json"))
    return p.parse_args(argv)


def classify(features: dict, y_l, y_t) -> dict:
    """{feature name: {classifier: held-out error}} for each (labelled, held-out) pair of feature arrays."""
    out = {}
    for name, (a, b) in features.items():
        out[name] = {c: round(1.0 - make().fit(a, y_l).score(b, y_t), 4) for c, make in CLASSIFIERS.items()}
    return out


@torch.no_grad()
def posterior(model, data) -> tuple[torch.Tensor, torch.Tensor]:
    """The means and log-variances of q(z1|x) of every image of `data` (its intensities), in eval mode."""
    was = model.training
    model.eval()
    means, logvars = [], []
    for s in range(0, len(data), 1000):
        q = model.encode(data.batch(torch.arange(s, min(s + 1000, len(data)))))
        means.append(q.mean.flatten(1).float())
        logvars.append(q.logvar.flatten(1).float())
    model.train(was)
    return torch.cat(means), torch.cat(logvars)


def measure_codes(model, train, held, keep: torch.Tensor) -> dict:
    """Active units and the classifiers' held-out errors on M1's mean codes, raw and standardized."""
    mu_train, _ = posterior(model, train)
    mu_held, lv_held = posterior(model, held)
    kl = (0.5 * (mu_held ** 2 + lv_held.exp() - 1 - lv_held)).mean(0)
    mean, std = mu_train.mean(0), mu_train.std(0).clamp_min(1e-8)

    def standard(t: torch.Tensor):
        return ((t - mean) / std).numpy()

    errors = classify({"codes": (mu_train[keep].numpy(), mu_held.numpy()),
                       "standardized": (standard(mu_train[keep]), standard(mu_held))},
                      train.y[keep].numpy(), held.y.numpy())
    return {"active_kl": int((kl > 0.01).sum()), "active_var": int((mu_held.var(0) > 0.01).sum()),
            "kl_nats": round(float(kl.sum()), 2), "errors": errors}


def pixel_baseline(train, held, keep: torch.Tensor) -> dict:
    x_l = train.batch(keep).flatten(1).numpy()
    x_t = held.batch(torch.arange(len(held))).flatten(1).numpy()
    return classify({"pixels": (x_l, x_t)}, train.y[keep].numpy(), held.y.numpy())["pixels"]


def recipe(args, model_cfg, train_cfg) -> dict:
    return {"protocol": "validation: train on MNIST training images 0-49,999, measure on 50,000-59,999 (the test "
                        "set is not read); labels drawn from the first 50,000 by select_labels",
            "labels": args.labels, "seed": args.seed, "epochs_list": args.epochs_list,
            "model": model_cfg.to_dict(), "train": train_cfg.to_dict(),
            "features": "means of q(z1|x) of the intensities, eval mode, fp32; standardized: by the mean/std over "
                        "the 50,000 training codes",
            "active_kl": "m1m2_codes.py's: mean KL over the held-out images > 0.01 nats",
            "active_var": "variance over the held-out images of the mean code > 0.01",
            "classifiers": "scikit-learn LogisticRegression(max_iter=3000), KNeighborsClassifier(1), (5), fitted "
                           "on the labelled images alone; held-out error",
            "held_out_neg_elbo": "fit's val_loss on the 10,000 held-out images (one posterior sample, fixed seed)"}


def checkpoint_row(history: list[dict], wall: float, codes: dict) -> dict:
    last = history[-1]
    return {"epoch": last["epoch"], "wall_s": round(wall, 1), "train_s": round(sum(r["time_s"] for r in history), 1),
            "train_loss": round(last["train_loss"], 3), "held_out_neg_elbo": round(last["val_loss"], 3),
            "held_out_recon": round(last["val_recon"], 3), "held_out_kl": round(last["val_kl"], 3), **codes}


def _fmt(r: dict) -> str:
    e = r["errors"]
    cells = " ".join(f"{100 * e[f][c]:6.2f}" for f in ("codes", "standardized") for c in CLASSIFIERS)
    return (f"  {r['epoch']:5d} {r['active_kl']:4d} {r['active_var']:4d}  {cells}  {r['held_out_neg_elbo']:8.2f}"
            f" {r['train_loss']:8.2f} {r['wall_s']:7.0f}")


def print_table(pixels: dict, rows: list[dict]) -> None:
    print("\n  held-out error (%) with the labelled images alone; active: KL>0.01 / var>0.01")
    print("  epoch  act  var  codes: logreg 1-NN 5-NN | standardized: logreg 1-NN 5-NN   -ELBO    train  wall s")
    for r in rows:
        print(_fmt(r))
    print("  pixels:", "  ".join(f"{c} {100 * v:.2f}" for c, v in pixels.items()), flush=True)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    mnist = load_dataset("mnist", args.data_dir, download=False)
    train, held = mnist.train.subset(torch.arange(50_000)), mnist.train.subset(torch.arange(50_000, 60_000))
    keep = select_labels(train.y, args.labels, args.seed, 10)
    model_cfg = get_preset("m1m2").model.replace(model="vae", settings={})
    train_cfg = TrainConfig(epochs=max(args.epochs_list), batch_size=128, lr=1e-3, lr_schedule="constant",
                            seed=args.seed, binarize=args.binarize, threads=args.threads, progress=False,
                            precision="fp32", device="cpu")
    out, run_dir = Path(args.out), Path(args.run_dir or tempfile.mkdtemp(prefix="m1-epochs-", dir="/tmp"))
    print(f"M1 of m1m2 for {args.epochs_list} epochs, {args.labels} labels, seed {args.seed}, threads "
          f"{args.threads}, binarize {args.binarize}; run {run_dir}", flush=True)
    pixels = pixel_baseline(train, held, keep)
    print("  pixels:", pixels, flush=True)
    torch.manual_seed(args.seed)
    model = build_model(model_cfg, input_shape=train.sample_shape)
    rows, t0 = [], time.perf_counter()
    result = {"recipe": recipe(args, model.config, train_cfg), "run_dir": str(run_dir), "pixels": pixels,
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": args.threads,
                          "torch": torch.__version__}}

    def save(history: list[dict]) -> None:
        result.update(checkpoints=rows, epochs_done=len(history),
                      s_per_epoch=round(statistics.median(r["time_s"] for r in history), 2),
                      train_loss_per_epoch=[round(r["train_loss"], 3) for r in history],
                      held_out_neg_elbo_per_epoch=[round(r["val_loss"], 3) for r in history])
        atomic_write_json(out, result)

    def on_epoch(history: list[dict]) -> None:
        if history[-1]["epoch"] in args.epochs_list:
            rows.append(checkpoint_row(history, time.perf_counter() - t0, measure_codes(model, train, held, keep)))
            print(_fmt(rows[-1]), flush=True)
            save(history)

    history = fit(model, train, held, train_cfg, out=run_dir, on_epoch=on_epoch)
    save(history)
    print_table(pixels, rows)
    print(f"  {result['s_per_epoch']} s/epoch (median); wrote {out}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
