"""Classify by the model's posterior instead of q(y|x): finished m2 / m1m2 / adgm runs re-judged (issue 25).

    python benchmarks/m2_posterior.py RUN [RUN ...] --validation --samples 0,1,5,20,50 --out FILE.json
    python benchmarks/m2_posterior.py RUN [RUN ...] --samples 0,20 --out m2-posterior-test.json
    python benchmarks/m2_posterior.py RUN [RUN ...] --samples 0 --confusion --out adgm-100-80-epochs-confusion.json

`posterior_samples` (a setting of m2, m1m2, adgm and sdgm) changes only how a trained model classifies: with
K >= 1 by its own posterior p(y|x), proportional to p(y) p(x|y), each log p(x|y) importance-sampled from K draws
of q(z|x,y) (for M1+M2, M2's p(y|z1) at the mean code; for the ADGM, of q(a|x) q(z|a,y,x)); with 0 by the
classifier q(y|x). Training never reads it, and the
loop's validation pass forks the random state, so a run trained with the setting has the weights of the same
run trained without it. This loads each run, sets posterior_samples to each K in turn
(vaelab.models.with_settings, as `vaelab evaluate --posterior-samples K`) and computes the error
exactly as the training loop's validation pass does (training.validation.loss_terms, its fixed seed, batch
max(the run's batch size, 256)): what the run would have reported with that setting. The held-out images are
the MNIST test images, or with --validation the last 10,000 training images (benchmarks/m2.py --validation).
Also the images each way gets right where the other errs (a paired comparison against K = 0), and with
--confusion where each K errs (evaluation.metrics.class_confusion, as `vaelab evaluate` reports it: the confusion
matrix, the error per class, the most confused pairs). With --elbo also each run's ELBO of its training images
with every label hidden (the bound of hidden labels, what a selection among runs without labels could read) and
with their true labels (log p(x, y)'s bound, which needs all the labels), to see which of them ranks the runs as
their errors do. One thread;
about 20 s per K = 20 evaluation of an M1+M2 run on 10,000 images on a quiet core.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

import torch  # noqa: E402

from vaelab import from_pretrained  # noqa: E402
from vaelab.data import ArrayDataset, load_dataset  # noqa: E402
from vaelab.evaluation.metrics import class_confusion  # noqa: E402
from vaelab.models import with_settings  # noqa: E402
from vaelab.training.checkpoint import atomic_write_json  # noqa: E402
from vaelab.training.validation import EVAL_SEED, loss_terms  # noqa: E402


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.split(",")]


def training_elbos(model, train, batch: int, binarize: bool) -> dict:
    """The run's mean ELBO (nats) over its training images (binarized as it trained): labels hidden, and with the
    true labels."""
    hidden = ArrayDataset(train.x, None, train.scale, train.classes, train.name)
    return {key: round(loss_terms(model, data, batch_size=batch, binarize=binarize)["elbo"], 3)
            for key, data in (("unlabelled", hidden), ("labelled", train))}


def judge(run: Path, held, ks: list[int], confusion: bool = False, train=None) -> dict:
    model = from_pretrained(run).eval()
    cfg = json.loads((run / "config.json").read_text())
    batch = max(cfg["train"]["batch_size"], 256)
    row = {"run": str(run), "model": cfg["model"]["model"], "labels": cfg["train"]["labels"],
           "seed": cfg["train"]["seed"], "errors": {}, "seconds": {}, "versus_q": {}}
    wrong = {}
    if train is not None:
        t0 = time.perf_counter()
        row["train_elbo"] = training_elbos(model, train, batch, bool(cfg["train"].get("binarize")))
        print(f"  {run.name:55s} ELBO of the {len(train)} training images: labels hidden "
              f"{row['train_elbo']['unlabelled']:.2f}, true labels {row['train_elbo']['labelled']:.2f} nats "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
    for k in ks:
        t0 = time.perf_counter()
        judged = with_settings(model, posterior_samples=k)
        terms = loss_terms(judged, held, batch_size=batch, per_sample=True)
        row["seconds"][k] = round(time.perf_counter() - t0, 1)
        wrong[k] = terms["error"] > 0
        row["errors"][k] = round(float(wrong[k].double().mean()), 5)
        if k and 0 in wrong:
            row["versus_q"][k] = {"right_where_q_errs": int((~wrong[k] & wrong[0]).sum()),
                                  "wrong_where_q_is_right": int((wrong[k] & ~wrong[0]).sum())}
        print(f"  {run.name:55s} K={k:3d} error {100 * row['errors'][k]:5.2f}%  {row['seconds'][k]:6.1f} s"
              + (f"  (right where q errs {row['versus_q'][k]['right_where_q_errs']}, wrong where q is right "
                 f"{row['versus_q'][k]['wrong_where_q_is_right']})" if k in row["versus_q"] else ""), flush=True)
        if confusion:
            where = row.setdefault("confusion", {})[k] = class_confusion(judged, held, batch, EVAL_SEED)
            print("    most confused (true -> predicted): " + ", ".join(
                f"{m['true']} -> {m['predicted']} {m['count']}" for m in where["most_confused"]), flush=True)
    return row


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("runs", nargs="+", help="run folders of m2, m1m2, adgm or sdgm trained on MNIST with --labels N")
    p.add_argument("--validation", action="store_true",
                   help="the runs trained on the first 50,000 training images; judge on the last 10,000")
    p.add_argument("--samples", type=_ints, default=[0, 20], help="values of posterior_samples [0,20]")
    p.add_argument("--confusion", action="store_true",
                   help="also each K's confusion matrix, error per class and most confused pairs")
    p.add_argument("--elbo", action="store_true",
                   help="also each run's ELBO of its training images, labels hidden and with the true labels")
    p.add_argument("--data-dir", default=os.environ.get("VAELAB_DATA") or str(REPO.parent / "shared" / "data"))
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "m2-posterior.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    mnist = load_dataset("mnist", args.data_dir, download=False)
    held = mnist.train.subset(torch.arange(50_000, 60_000)) if args.validation else mnist.test
    train = mnist.train.subset(torch.arange(50_000)) if args.validation else mnist.train
    rows = [judge(Path(r), held, args.samples, args.confusion, train if args.elbo else None) for r in args.runs]
    summary = {}
    models = sorted({r["model"] for r in rows})
    for model, labels in sorted({(r["model"], r["labels"]) for r in rows}):
        group = [r for r in rows if (r["model"], r["labels"]) == (model, labels)]
        for k in args.samples:
            values = [100 * r["errors"][k] for r in group]
            name = f"{model}, " if len(models) > 1 else ""  # one model: the key as the committed JSONs have it
            summary[f"{name}{labels} labels, K={k}"] = {
                "runs": len(values), "mean_error_pct": round(statistics.mean(values), 3),
                "std_error_pct": round(statistics.stdev(values), 3) if len(values) > 1 else None}
    for name, s in summary.items():
        print(f"{name:22s} {s['mean_error_pct']:.2f}%" + (f" ± {s['std_error_pct']:.2f}" if s["std_error_pct"]
                                                          else "") + f" ({s['runs']} runs)")
    protocol = ("validation: the last 10,000 MNIST training images" if args.validation else
                "test: the 10,000 MNIST test images")
    atomic_write_json(Path(args.out), {"protocol": protocol, "samples": args.samples, "threads": 1,
                                       "torch": torch.__version__, "runs": rows, "summary": summary})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
