"""vaelab's disentanglement metrics against disent's (PyPI `disent`, nmichlo/disent) on the same codes (issue 19).

    /tmp/venv-disent/bin/python benchmarks/disent_compare.py [--n 5000] [--seed 0] [--run RUN]

disent implements MIG, SAP, DCI and the FactorVAE score after disentanglement_lib (it has no BetaVAE score,
modularity or explicitness). Both libraries are given the same rows of codes and factor classes:

- MIG: disent's `_compute_mig` (20 equal-width bins, sklearn's mutual_info_score) against vaelab's `mig` with
  disentanglement_lib's binning (`DISENTANGLEMENT_LIB.mig`) on the same N rows, and vaelab's default (quantile
  bins) beside it;
- SAP (discrete factors) and DCI: disent's `_compute_sap` / `_compute_dci` on the train and test rows that
  vaelab's own split of the pool picks (the same classifiers: LinearSVC(C=0.01, balanced), sklearn's default
  GradientBoostingClassifier; vaelab seeds the boosted trees, disent leaves random_state unset);
- FactorVAE score: disent's `metric_factor_vae` through a small adapter that draws its batches from the same pool
  (rows sharing the fixed factor's class, as vaelab does; disent's own datasets render the factor combinations
  instead), with its default prune threshold 0 (vaelab: std 0.05); the two draw
  different random batches, so their difference is sampling noise of the order 1/sqrt(5000) plus protocol.

The codes: `identity` (the 5 factors, standardized, plus 0.1 noise, and 5 dimensions of pure noise),
`mixed` (a random rotation of the same 10 dimensions), `noise` (10 dimensions of noise), all on N + N/2 rows
drawn from a coarsened dSprites factor grid, 3 shapes x 6 scales x 10 orientations x 8 x 8 positions (DCI fits
one boosted classifier per class and stage, so dSprites' 113 classes make it slow; these 35 keep the comparison
short); with --run, also the posterior means of that run's test split (a run trained on --dataset dsprites,
with its own factors).

disent's metric modules are loaded without its package __init__ (which imports its datasets, h5py and
torchvision): `disent.dataset` is stubbed, it is a type hint there. The venv: python3 -m venv /tmp/venv-disent;
echo <vaelab venv>/lib/python3.11/site-packages > /tmp/venv-disent/lib/python3.11/site-packages/vaelab.pth;
/tmp/venv-disent/bin/pip install --no-deps disent==0.8.0 (its newest release for Python 3.11).
Writes benchmarks/results/disent_compare.json.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import json
import sys
import time
import types
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

from vaelab.evaluation import disentanglement as dis  # noqa: E402

FACTOR_SIZES = (3, 6, 10, 8, 8)  # dSprites' shape and scale; orientation and position coarser


def load_disent():
    """disent's metric modules, or None where disent is not installed."""
    spec = importlib.util.find_spec("disent")
    if spec is None:
        return None
    root = Path(spec.submodule_search_locations[0])
    metrics = types.ModuleType("disent.metrics")  # the package without its __init__ (which imports every dataset)
    metrics.__path__ = [str(root / "metrics")]
    sys.modules["disent.metrics"] = metrics
    stub = types.ModuleType("disent.dataset")
    stub.DisentDataset = object  # only a type hint in the metric modules
    sys.modules["disent.dataset"] = stub
    mods = {m: importlib.import_module(f"disent.metrics.{m}") for m in ("_mig", "_sap", "_dci", "_factor_vae")}
    import disent  # noqa: F401  (for its version)

    from importlib.metadata import version

    mods["version"] = version("disent")
    return mods


class PoolData:
    """The part of disent's DisentDataset its FactorVAE score uses, drawing from a pool of (code, factor class)
    rows: an "observation" is a row index, and the representation function looks its code up."""

    def __init__(self, codes, labels, seed):
        self.codes, self.labels = codes, labels
        self.rng = np.random.default_rng(seed)
        self.gt_data = self
        self.num_factors = labels.shape[1]
        # rows by (factor, class): a batch of factor rows with one factor fixed becomes rows of the pool that share
        # that factor's class, the others as they come (vaelab's pool protocol; exact on a full-factorial pool)
        self._rows = {(j, c): np.flatnonzero(labels[:, j] == c) for j in range(self.num_factors)
                      for c in np.unique(labels[:, j])}

    def sample_factors(self, n):
        return self.labels[self.rng.integers(len(self.labels), size=n)].copy()

    def dataset_batch_from_factors(self, factors, mode="input"):
        fixed = int(np.flatnonzero((factors == factors[0]).all(0))[0])  # the factor disent fixed
        return self.rng.choice(self._rows[(fixed, factors[0, fixed])], size=len(factors))

    def dataset_sample_batch(self, n, mode="input"):
        return self.rng.integers(len(self.labels), size=n)

    def representation(self, rows):
        return self.codes[np.asarray(rows)]


def make_codes(labels: np.ndarray, rng: np.random.Generator) -> dict[str, np.ndarray]:
    z = (labels - labels.mean(0)) / labels.std(0)
    identity = np.column_stack([z + 0.1 * rng.normal(size=z.shape), rng.normal(size=z.shape)])
    q, _ = np.linalg.qr(rng.normal(size=(10, 10)))
    return {"identity": identity, "mixed": identity @ q, "noise": rng.normal(size=identity.shape)}


def run_codes(model_run: str, seed: int):
    from vaelab.data import load_dataset
    from vaelab.models import from_pretrained

    model = from_pretrained(model_run)
    cfg = json.loads((Path(model_run) / "config.json").read_text())
    data = load_dataset(cfg["data"]["dataset"]).test
    codes = dis.encode_codes(model, data, seed=seed)["codes"]
    labels = np.stack([dis.discretize_factor(data.factors[:, j]) for j in range(data.factors.shape[1])], 1)
    return codes, labels


def compare(name: str, codes: np.ndarray, labels: np.ndarray, n: int, seed: int, disent) -> dict:
    """Both libraries' MIG, SAP, DCI and FactorVAE score on one set of codes: {metric: {vaelab, disent, ...}}."""
    out = {}
    mig_rows = np.arange(min(n, len(codes)))
    ours_lib = dis.mig(codes[mig_rows], labels[mig_rows], seed=seed, protocol=dis.DISENTANGLEMENT_LIB.mig)["mig"]
    ours_q = dis.mig(codes[mig_rows], labels[mig_rows], seed=seed)["mig"]
    theirs = float(disent["_mig"]._compute_mig(codes[mig_rows].T, labels[mig_rows].T)["mig.discrete_score"])
    out["mig"] = {"vaelab": ours_lib, "disent": theirs, "difference": ours_lib - theirs, "vaelab_quantile": ours_q}
    train, test = dis._split(np.random.default_rng(seed), len(codes), n, n // 2)  # as vaelab's sap and dci split
    sap_p = dis.SAPProtocol(num_train=n, num_test=n // 2)
    ours = dis.sap(codes, labels, seed=seed, protocol=sap_p)["sap"]
    theirs = float(disent["_sap"]._compute_sap(codes[train].T, labels[train].T, codes[test].T, labels[test].T,
                                               continuous_factors=False)["sap.score"])
    out["sap"] = {"vaelab": ours, "disent": theirs, "difference": ours - theirs}
    t = time.perf_counter()
    d = dis.dci(codes, labels, seed=seed, protocol=dis.DCIProtocol(num_train=n, num_test=n // 2))
    ours_s = time.perf_counter() - t
    theirs = disent["_dci"]._compute_dci(codes[train].T, labels[train].T, codes[test].T, labels[test].T)
    for key, their_key in (("dci_disentanglement", "dci.disentanglement"), ("dci_completeness", "dci.completeness"),
                           ("dci_informativeness", "dci.informativeness_test")):
        value = float(theirs[their_key])
        out[key] = {"vaelab": d[key], "disent": value, "difference": d[key] - value}
    out["dci_disentanglement"]["vaelab_seconds"] = round(ours_s, 1)
    ours = dis.factor_vae_score(codes, labels, seed=seed)["factor_vae_score"]
    pool = PoolData(codes, labels, seed)
    np.random.seed(seed)  # disent picks the fixed factor with numpy's global generator
    theirs = disent["_factor_vae"].metric_factor_vae.unwrap(pool, pool.representation)
    theirs = float(theirs["factor_vae.eval_accuracy"])
    out["factor_vae_score"] = {"vaelab": ours, "disent": theirs, "difference": ours - theirs,
                               "note": "different random batches: the difference is sampling noise plus protocol"}
    print(f"\n{name}: {len(codes)} rows, {codes.shape[1]} dimensions")
    for metric, r in out.items():
        print(f"  {metric:22s} vaelab {r['vaelab']:.4f}   disent {r['disent']:.4f}   difference {r['difference']:+.2e}")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=5000, help="training rows (MIG rows; SAP/DCI test rows: n/2)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--run", default=None, help="also a run trained on dsprites: its test split's posterior means")
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "disent_compare.json"))
    args = ap.parse_args()
    disent = load_disent()
    if disent is None:
        print("disent is not importable here; see this script's docstring for the venv", file=sys.stderr)
        return 1
    rng = np.random.default_rng(args.seed)
    grid_rows = rng.choice(int(np.prod(FACTOR_SIZES)), size=args.n + args.n // 2, replace=False)
    labels = np.stack(np.unravel_index(grid_rows, FACTOR_SIZES), axis=1).astype(np.int64)
    results = {name: compare(name, codes, labels, args.n, args.seed, disent)
               for name, codes in make_codes(labels.astype(float), rng).items()}
    if args.run:
        codes, run_labels = run_codes(args.run, args.seed)
        results["run"] = compare(f"run {args.run}", codes, run_labels, min(args.n, 2 * len(codes) // 3), args.seed,
                                 disent)
    import sklearn

    record = {"n": args.n, "seed": args.seed, "disent": disent["version"], "sklearn": sklearn.__version__,
              "numpy": np.__version__, "results": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(record, indent=1) + "\n")
    print(f"\nwrote: {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
