"""Do M1's codes separate the classes better than the pixels? (issue 25: why M1+M2 does not beat M2 here.)

    python benchmarks/m1m2_codes.py benchmarks/results/semisupervised-runs/m1m2-100-s0-60ep-bf16

For a trained m1m2 run: the labelled images it was given (the run's --labels and --seed, drawn as the loop draws
them), and three classifiers fitted on them alone (1-NN, 5-NN, logistic regression, scikit-learn) on the pixels
and on the means of M1's q(z1|x); their error on the MNIST test images, and M1's active dimensions (mean KL over
the test images > 0.01 nats). Prints a table and writes benchmarks/results/m1m2-codes.json (--out).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

import torch  # noqa: E402
from sklearn.linear_model import LogisticRegression  # noqa: E402
from sklearn.neighbors import KNeighborsClassifier  # noqa: E402

from vaelab import from_pretrained  # noqa: E402
from vaelab.data import load_dataset  # noqa: E402
from vaelab.data.semisupervised import select_labels  # noqa: E402
from vaelab.training.checkpoint import atomic_write_json  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("run", help="an m1m2 run folder (trained on MNIST with --labels N)")
    p.add_argument("--data-dir", default=os.environ.get("VAELAB_DATA") or str(REPO.parent / "shared" / "data"))
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "m1m2-codes.json"))
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    cfg = json.loads((Path(args.run) / "config.json").read_text())
    labels, seed = cfg["train"]["labels"], cfg["train"]["seed"]
    model = from_pretrained(args.run).eval()
    mnist = load_dataset("mnist", args.data_dir, download=False)
    keep = select_labels(mnist.train.y, labels, seed, 10)
    test = mnist.test
    with torch.no_grad():
        posts = [model.m1.encode(test.batch(torch.arange(i, min(i + 1000, len(test)))))
                 for i in range(0, len(test), 1000)]
        features = {"pixels": (mnist.train.batch(keep).flatten(1), test.batch(torch.arange(len(test))).flatten(1)),
                    "M1 codes (means of q(z1|x))": (model.m1.encode(mnist.train.batch(keep)).mean,
                                                    torch.cat([q.mean for q in posts]))}
        kl = torch.cat([0.5 * (q.mean ** 2 + q.logvar.exp() - 1 - q.logvar) for q in posts]).mean(0)
    y_l, y_t = mnist.train.y[keep].numpy(), test.y.numpy()
    classifiers = {"1-NN": lambda: KNeighborsClassifier(1), "5-NN": lambda: KNeighborsClassifier(5),
                   "logistic regression": lambda: LogisticRegression(max_iter=3000)}
    rows = []
    for name, (a, b) in features.items():
        for cname, make in classifiers.items():
            err = 1.0 - make().fit(a.numpy(), y_l).score(b.numpy(), y_t)
            rows.append({"features": name, "classifier": cname, "test_error": round(err, 4)})
            print(f"  {name:30s} {cname:20s} {100 * err:6.2f}%", flush=True)
    active = int((kl > 0.01).sum())
    print(f"  M1: {active} of {len(kl)} latent dimensions active; run {args.run}: {labels} labels, seed {seed}")
    atomic_write_json(Path(args.out), {"run": str(args.run), "labels": labels, "seed": seed,
                                       "m1_active_dims": active, "m1_latent_dims": len(kl), "rows": rows})
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
