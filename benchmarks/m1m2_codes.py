"""How well do an m1m2 run's M1 codes separate the classes, with its few labels and with all of them? (issue 25)

    python benchmarks/m1m2_codes.py RUN                                   # a run trained on all 60,000 images
    python benchmarks/m1m2_codes.py RUN --validation --out m1m2-codes-validation.json   # benchmarks/m2.py --validation

For a trained m1m2 run, on its training images (all 60,000 MNIST training images, or with --validation the first
50,000, as benchmarks/m2.py --validation trains on them) and its held-out images (the MNIST test images, or the
last 10,000 training images):

- classifiers fitted on the run's labelled images alone (its --labels and --seed, drawn as the loop draws them,
  vaelab.data.semisupervised.select_labels), on the pixels and on the means of M1's q(z1|x);
- the same classifiers fitted on every training image's label: what the features allow with full supervision,
  the bound a semi-supervised M2 on the codes works toward;
- the run's own classifier, M2's q(y|z1) at the mean code;
- M1's active dimensions (mean KL of q(z1|x) to N(0, I) over the held-out images > 0.01 nats).

The classifiers (scikit-learn): 1-NN, 5-NN, logistic regression (max_iter 3000) and an MLP of 500 ReLU units
(MLPClassifier, Adam, 30 epochs, random_state 0). Each row is the held-out error. Prints a table and writes
benchmarks/results/m1m2-codes.json (--out). One thread, about 3 minutes.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import warnings
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

import torch  # noqa: E402
from sklearn.exceptions import ConvergenceWarning  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402
from sklearn.neighbors import KNeighborsClassifier  # noqa: E402
from sklearn.neural_network import MLPClassifier  # noqa: E402

from vaelab import from_pretrained  # noqa: E402
from vaelab.data import load_dataset  # noqa: E402
from vaelab.data.semisupervised import select_labels  # noqa: E402
from vaelab.training.checkpoint import atomic_write_json  # noqa: E402

CLASSIFIERS = {"1-NN": lambda: KNeighborsClassifier(1), "5-NN": lambda: KNeighborsClassifier(5),
               "logistic regression": lambda: LogisticRegression(max_iter=3000),
               "MLP 500": lambda: MLPClassifier((500,), max_iter=30, random_state=0)}


def _in_batches(fn, x: torch.Tensor, size: int = 1000) -> list:
    return [fn(x[i:i + size]) for i in range(0, len(x), size)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="an m1m2 run folder (trained on MNIST with --labels N)")
    p.add_argument("--validation", action="store_true",
                   help="the run trained on the first 50,000 training images; hold out the last 10,000")
    p.add_argument("--data-dir", default=os.environ.get("VAELAB_DATA") or str(REPO.parent / "shared" / "data"))
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "m1m2-codes.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    cfg = json.loads((Path(args.run) / "config.json").read_text())
    labels, seed = cfg["train"]["labels"], cfg["train"]["seed"]
    model = from_pretrained(args.run).eval()
    mnist = load_dataset("mnist", args.data_dir, download=False)
    train, held = mnist.train, mnist.test
    if args.validation:
        train, held = mnist.train.subset(torch.arange(50_000)), mnist.train.subset(torch.arange(50_000, 60_000))
    keep = select_labels(train.y, labels, seed, 10)
    x_train, x_held = train.batch(torch.arange(len(train))), held.batch(torch.arange(len(held)))
    with torch.no_grad():
        posts = _in_batches(model.m1.encode, x_held)
        features = {"pixels": (x_train.flatten(1), x_held.flatten(1)),
                    "M1 codes (means of q(z1|x))": (torch.cat([q.mean.flatten(1) for q in
                                                               _in_batches(model.m1.encode, x_train)]),
                                                    torch.cat([q.mean.flatten(1) for q in posts]))}
        kl = torch.cat([0.5 * (q.mean ** 2 + q.logvar.exp() - 1 - q.logvar).flatten(1) for q in posts]).mean(0)
        own = torch.cat(_in_batches(model.classify, x_held)).argmax(1)
    y_train, y_held = train.y.numpy(), held.y.numpy()
    rows = [{"features": "M1 codes", "fitted_on": f"{labels} labelled images (the run's)", "classifier":
             "the run's M2, q(y|z1) at the mean code", "error": round(float((own.numpy() != y_held).mean()), 4)}]
    print(f"  {rows[0]['classifier']:58s} {100 * rows[0]['error']:6.2f}%", flush=True)
    for fitted_on, idx in ((f"{labels} labelled images (the run's)", keep.numpy()),
                           (f"all {len(train)} training labels", slice(None))):
        for name, (a, b) in features.items():
            for cname, make in CLASSIFIERS.items():
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", ConvergenceWarning)
                    err = 1.0 - make().fit(a.numpy()[idx], y_train[idx]).score(b.numpy(), y_held)
                rows.append({"features": name, "fitted_on": fitted_on, "classifier": cname, "error": round(err, 4)})
                print(f"  {fitted_on:34s} {name:30s} {cname:20s} {100 * err:6.2f}%", flush=True)
    active = int((kl > 0.01).sum())
    protocol = ("validation: trained on the first 50,000 MNIST training images, held out the last 10,000"
                if args.validation else
                "test: trained on the 60,000 MNIST training images, held out the 10,000 test images")
    print(f"  M1: {active} of {len(kl)} latent dimensions active; run {args.run}: {labels} labels, seed {seed}")
    atomic_write_json(Path(args.out), {"run": str(args.run), "protocol": protocol, "labels": labels, "seed": seed,
                                       "m1_active_dims": active, "m1_latent_dims": len(kl), "rows": rows})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
