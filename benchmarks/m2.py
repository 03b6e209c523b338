"""Semi-supervised MNIST with 100 and 1000 labels (issues 7 and 25): M2, M1+M2 and the auxiliary deep generative
model (ADGM), each with its preset's recipe, against the supervised-only baseline.

    python benchmarks/m2.py                                          # every model, 100 and 1000 labels, seeds 0 1 2
    python benchmarks/m2.py --models m1m2 --labels 100 --seeds 0     # one model, one label draw
    python benchmarks/m2.py --models m1m2 --validation --set alpha=1 --out m1m2-alpha1.json   # choosing a setting
    python benchmarks/m2.py --threads 2 --data-dir ../shared/data
    python benchmarks/m2.py --merge s0.json s1.json s2.json --out adgm-100.json   # draws run as separate processes

For every model, label count and seed (the seed draws the labelled images, balanced over the classes, and the
initial weights): the model trained with `vaelab.fit` on the kept labels and the other training images unlabelled,
with its preset's recipe (`vaelab models`; --set KEY=VALUE overrides a model setting or a training setting); its
test error after every epoch comes from the loop's metrics (val_error, the 10,000 test images). Against them the
supervised-only baseline: M2's classifier network (784-500-10) trained on the labelled images alone (Adam 1e-3,
batch 64, --baseline-steps steps, dynamic binarization as augmentation, none early-stopped: there is no
validation set in the labelled-only setting).

Settings are chosen with --validation, never on the test set: the last 10,000 training images are held out and
play the test set's part (their labels judge the classifier), the labels are drawn from the first 50,000, and the
test images are not read. A recipe's settings then go into its preset, and the benchmark's plain run measures it
on the test set.

Prints a table (labels, seed, model, test error, epochs, train seconds) and a summary (mean ± std over the
seeds), and writes benchmarks/results/semisupervised.json (--out) after every finished run. Rerun the same command
to continue an interrupted benchmark: finished runs of the same recipe are kept, and a run in progress resumes
from its checkpoint in --run-dir. Goals: issue 7, M2 <= 10% mean test error with 100 labels and <= 4% with 1000;
issue 25, M1+M2 <= 3.33% and ADGM < 2% with 100 labels, no draw above 5%, each run within 2 hours on 2 cores.
Run it on a quiet machine (niced, one thread per core) for timings that mean something.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

from vaelab.config import get_preset  # noqa: E402
from vaelab.data import load_dataset  # noqa: E402
from vaelab.data.semisupervised import select_labels  # noqa: E402
from vaelab.models import build_model  # noqa: E402
from vaelab.training import fit  # noqa: E402
from vaelab.training.checkpoint import atomic_write_json  # noqa: E402

RESULTS = REPO / "benchmarks" / "results"
# mean test error over the label draws: issue 7 (M2), issue 25 (M1+M2 and ADGM, 100 labels)
TARGETS = {("m2", 100): 0.10, ("m2", 1000): 0.04, ("m1m2", 100): 0.0333, ("adgm", 100): 0.02}
# published MNIST test errors (%), mean ± std where given: Kingma et al. 2014 Table 1, Maaløe et al. 2016 Table 1,
# Pyro's SS-VAE example (its README's 100-label figure)
PUBLISHED = {("m2", 100): "11.97 ± 1.71 (Kingma et al.); 6.81 (Pyro SS-VAE)", ("m2", 1000): "3.60 ± 0.56",
             ("m1m2", 100): "3.33 ± 0.14", ("m1m2", 1000): "2.40 ± 0.02",
             ("adgm", 100): "0.96 ± 0.02", ("sdgm", 100): "1.32 ± 0.07"}


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.replace(",", " ").split()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected integers such as 100,1000, got {text!r}") from None


def _table(rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  " + "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))), flush=True)


def train_model(name, train, test, model_cfg, train_cfg, labels: int, seed: int, args, run_dir: Path) -> dict:
    """Model `name` with the recipe's model and training configs on `labels` kept labels; resumes from run_dir's
    checkpoint."""
    cfg = train_cfg.replace(labels=labels, seed=seed, threads=args.threads, precision=args.precision, progress=False)
    torch.manual_seed(seed)
    model = build_model(model_cfg.replace(condition_dim=10), input_shape=train.sample_shape)
    resume = (run_dir / "checkpoint.safetensors").is_file()
    if resume:
        print(f"  resuming {run_dir}", flush=True)
    t0 = time.perf_counter()
    # what `vaelab evaluate RUN` / `vaelab sample RUN` read to find the data, as `vaelab train` records it
    info = {"data": {"dataset": "mnist", "data_dir": str(Path(args.data_dir).resolve()), "binarize": cfg.binarize},
            "preset": name}
    history = fit(model, train, test, cfg, out=run_dir, resume=resume, run_info=info)
    wall = time.perf_counter() - t0
    seconds = sum(r["time_s"] for r in history)  # every epoch's time, those of an interrupted session too
    chosen = json.loads((run_dir / "config.json").read_text()).get("precision_auto") or {}
    return {"labels": labels, "seed": seed, "model": name, "test_error": history[-1]["val_error"],
            "precision": chosen.get("chose", cfg.precision),  # what --precision auto chose
            "epochs": len(history), "train_s": round(seconds, 1), "wall_s_this_session": round(wall, 1),
            "s_per_epoch": round(statistics.median(r["time_s"] for r in history), 1),
            "per_epoch": [{"epoch": r["epoch"], "test_error": round(r["val_error"], 5),
                           "train_loss": round(r["train_loss"], 3), "time_s": r["time_s"]} for r in history],
            "config": {"model": model.config.to_dict(), "train": cfg.to_dict()}}


def train_baseline(train, test, labels: int, seed: int, args) -> dict:
    """The same classifier network as M2's q(y|x), trained on the kept labelled images alone."""
    preset = get_preset("m2")
    torch.manual_seed(seed)
    classifier = build_model(preset.model.replace(condition_dim=10), input_shape=train.sample_shape).classifier
    keep = select_labels(train.y, labels, seed, 10)  # the labelled images M2 gets with this seed
    y = train.y[keep]
    opt = torch.optim.Adam(classifier.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(seed)
    batch = min(64, labels)
    t0 = time.perf_counter()
    classifier.train()
    for _ in range(args.baseline_steps):
        i = torch.randint(len(keep), (batch,), generator=gen)
        x = train.batch(keep[i], binarize=True, generator=gen)  # a fresh binarization: augmentation
        loss = F.cross_entropy(classifier(x), y[i])
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    seconds = time.perf_counter() - t0
    classifier.eval()
    with torch.inference_mode():
        wrong = sum(int((classifier(test.batch(slice(s, s + 1000))).argmax(1) != test.y[s:s + 1000]).sum())
                    for s in range(0, len(test), 1000))
    return {"labels": labels, "seed": seed, "model": "supervised", "test_error": wrong / len(test),
            "steps": args.baseline_steps, "batch_size": batch, "train_s": round(seconds, 1)}


def _row(r: dict) -> list[str]:
    epochs = str(r["epochs"]) if "epochs" in r else f"{r['steps']} steps"
    return [str(r["labels"]), str(r["seed"]), r["model"], f"{100 * r['test_error']:.2f}%", epochs,
            f"{r['train_s']:.0f}"]


def summary(runs: list[dict]) -> list[dict]:
    out = []
    for labels in sorted({r["labels"] for r in runs}):
        for model in sorted({r["model"] for r in runs}, key=lambda m: (m == "supervised", m)):
            errs = [r["test_error"] for r in runs if r["labels"] == labels and r["model"] == model]
            if not errs:
                continue
            row = {"labels": labels, "model": model, "seeds": len(errs), "mean_error": statistics.mean(errs),
                   "std_error": statistics.stdev(errs) if len(errs) > 1 else 0.0, "max_error": max(errs),
                   "mean_train_s": statistics.mean(r["train_s"] for r in runs
                                                   if r["labels"] == labels and r["model"] == model)}
            if (model, labels) in PUBLISHED:
                row["published"] = PUBLISHED[(model, labels)]
            if (model, labels) in TARGETS:
                row["target"] = TARGETS[(model, labels)]
                row["met"] = row["mean_error"] <= row["target"]
            out.append(row)
    return out


def _setting(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected KEY=VALUE such as alpha=1 or epochs=80, got {text!r}")
    try:
        return key.replace("-", "_"), json.loads(value)
    except json.JSONDecodeError:
        return key.replace("-", "_"), value


def recipe_of(name: str, overrides: dict, epochs: int) -> tuple:
    """The preset `name`'s model and training configs with the overrides (training fields go to the TrainConfig,
    the others to the model)."""
    preset = get_preset(name)
    train_fields = set(preset.train.to_dict())
    model_cfg = preset.model.replace(**{k: (tuple(v) if isinstance(v, list) else v) for k, v in overrides.items()
                                        if k not in train_fields})
    train_cfg = preset.train.replace(**{k: v for k, v in overrides.items() if k in train_fields})
    if epochs:
        train_cfg = train_cfg.replace(epochs=epochs)
    return model_cfg, train_cfg


PROTOCOL = ("protocol", "precision", "baseline_steps")  # what runs of one result file share beside each recipe


def run_key(run: dict) -> tuple:
    """What names a run within a result file."""
    return run["labels"], run["seed"], run["model"]


def save(out: Path, recipe: dict, runs: list[dict]) -> None:
    machine = {"platform": platform.platform(), "cpus": os.cpu_count(), "threads": torch.get_num_threads(),
               "torch": torch.__version__}
    atomic_write_json(out, {"recipe": recipe, "machine": machine, "runs": runs, "summary": summary(runs)})


def finished_runs(out: Path, recipe: dict) -> list[dict]:
    """The runs `out` holds already that the benchmark continues with: those of the models whose recipe is
    `recipe`'s, where the protocol, precision and baseline steps are the same; none otherwise."""
    if not out.is_file():
        return []
    old = json.loads(out.read_text())
    if any(old.get("recipe", {}).get(k) != recipe[k] for k in PROTOCOL):
        return []
    kept = old["recipe"].get("models", {})
    return [r for r in old.get("runs", []) if r["model"] == "supervised" or
            kept.get(r["model"]) == recipe["models"].get(r["model"])]


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", default=os.environ.get("VAELAB_DATA") or str(REPO.parent / "shared" / "data"),
                   help="folder holding MNIST [default $VAELAB_DATA, else ../shared/data]")
    p.add_argument("--labels", type=_ints, default=[100, 1000], help="label counts [default 100,1000]")
    p.add_argument("--seeds", type=_ints, default=[0, 1, 2], help="seeds: label draws and weights [default 0,1,2]")
    p.add_argument("--models", type=lambda t: [m for m in t.replace(",", " ").split() if m], default=None,
                   help="models, each with its preset's recipe [default m2,m1m2,adgm: those registered]")
    p.add_argument("--epochs", type=int, default=0, help="epochs [default: each preset's]")
    p.add_argument("--set", dest="overrides", type=_setting, action="append", default=[], metavar="KEY=VALUE",
                   help="override a model or training setting of every model's recipe (repeatable), e.g. alpha=1")
    p.add_argument("--validation", action="store_true",
                   help="choose settings: hold out the last 10,000 training images as the test set (labels drawn "
                        "from the first 50,000); the test images are not read")
    p.add_argument("--threads", type=int, default=0, help="torch threads [default 0 = all cores]")
    p.add_argument("--precision", choices=("auto", "fp32", "bf16"), default="auto",
                   help="auto (vaelab's default): bf16 where a timed training step shows it faster, else fp32; "
                        "bf16: mixed precision [default auto]")
    p.add_argument("--baseline-steps", type=int, default=2000, help="optimizer steps of the supervised baseline")
    p.add_argument("--no-baseline", dest="baseline", action="store_false", help="skip the supervised baseline")
    p.add_argument("--run-dir", default=str(RESULTS / "semisupervised-runs"),
                   help="where the runs keep their checkpoints (to resume) [default "
                        "benchmarks/results/semisupervised-runs]")
    p.add_argument("--out", default=str(RESULTS / "semisupervised.json"),
                   help="JSON file [default benchmarks/results/semisupervised.json]")
    p.add_argument("--merge", nargs="+", type=Path, metavar="JSON", default=None,
                   help="instead of running: join the runs of these result files (label draws run in separate "
                        "processes) into --out")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    if args.merge:
        try:
            return merge(args.merge, Path(args.out))
        except MergeError as e:
            print(f"m2.py: {e}", file=sys.stderr)
            return 2
    from vaelab.models import MODELS

    models = args.models or [m for m in ("m2", "m1m2", "adgm") if m in MODELS]
    if args.threads:
        torch.set_num_threads(args.threads)
    mnist = load_dataset("mnist", args.data_dir, download=False)
    train, test = mnist.train, mnist.test
    if args.validation:
        train, test = mnist.train.subset(torch.arange(50_000)), mnist.train.subset(torch.arange(50_000, 60_000))
    overrides = dict(args.overrides)
    recipes = {name: recipe_of(name, overrides, args.epochs) for name in models}
    recipe = {"models": {name: {"preset": name, "model": m.to_dict(), "train": t.to_dict()}
                         for name, (m, t) in recipes.items()},
              "precision": args.precision, "baseline_steps": args.baseline_steps,
              "protocol": "validation: the last 10,000 training images" if args.validation else "test"}
    out = Path(args.out)
    done = finished_runs(out, recipe)
    print(f"semi-supervised MNIST ({recipe['protocol']}): models {', '.join(models)}, {args.precision}, "
          f"threads {args.threads or torch.get_num_threads()}"
          f"; labels {args.labels}, seeds {args.seeds}" + (f"; {len(done)} runs already done" if done else ""),
          flush=True)
    runs = list(done)
    tag = "-val" if args.validation else ""
    tag += "".join(f"-{k}{v}" for k, v in sorted(overrides.items())).replace(" ", "")
    for labels in args.labels:
        for seed in args.seeds:
            jobs = []
            for name, (model_cfg, train_cfg) in recipes.items():
                run_dir = Path(args.run_dir) / f"{name}-{labels}-s{seed}-{train_cfg.epochs}ep-{args.precision}{tag}"
                jobs.append((name, lambda name=name, m=model_cfg, t=train_cfg, d=run_dir:
                             train_model(name, train, test, m, t, labels, seed, args, d)))
            if args.baseline:
                jobs.append(("supervised", lambda: train_baseline(train, test, labels, seed, args)))
            for model, job in jobs:
                if any(run_key(r) == (labels, seed, model) for r in runs):
                    continue
                print(f"{model}, {labels} labels, seed {seed}", flush=True)
                r = job()
                runs.append(r)
                save(out, recipe, runs)
                curve = ", ".join(f"{100 * e['test_error']:.1f}" for e in r.get("per_epoch", []))
                print(f"  test error {100 * r['test_error']:.2f}% in {r['train_s']:.0f} s"
                      + (f" ({r['s_per_epoch']} s/epoch); per epoch (%): {curve}" if curve else ""), flush=True)
    save(out, recipe, runs)
    print_tables(runs)
    print(f"\nwrote {out}")
    return 0


def print_tables(runs: list[dict]) -> None:
    """The runs, one row each, then the summary over seeds."""
    print()
    _table([["labels", "seed", "model", "test error", "epochs", "train s"]]
           + [_row(r) for r in sorted(runs, key=lambda r: (r["labels"], r["seed"], r["model"]))])
    print()
    rows = [["labels", "model", "seeds", "mean test error", "std", "worst", "train s", "published", "goal"]]
    for s in summary(runs):
        target = f"<= {100 * s['target']:.2f}%: {'met' if s['met'] else 'NOT met'}" if "target" in s else ""
        rows.append([str(s["labels"]), s["model"], str(s["seeds"]), f"{100 * s['mean_error']:.2f}%",
                     f"{100 * s['std_error']:.2f}", f"{100 * s['max_error']:.2f}%", f"{s['mean_train_s']:.0f}",
                     s.get("published", ""), target])
    _table(rows)


class MergeError(Exception):
    """A result file that cannot join the others: unreadable, or made with another recipe."""


def _read_result(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise MergeError(f"{path}: cannot read it as a result file of benchmarks/m2.py ({e})") from None
    missing = [k for k in ("recipe", "runs") if not isinstance(data, dict) or k not in data]
    if missing:
        raise MergeError(f"{path}: has no {' or '.join(repr(k) for k in missing)}; expected a result file written "
                         "by benchmarks/m2.py --out")
    return data


def merge(files: list[Path], out: Path) -> int:
    """Join the runs of result files written by separate processes (a label draw each, say) into `out`: the files
    must share the protocol, precision and baseline steps, and each model's recipe wherever two files hold it; a
    run found twice (the same labels, seed and model) is kept once, the first file's."""
    recipe, runs, machines = None, [], []
    for path in files:
        data = _read_result(path)
        if recipe is None:
            recipe = {**data["recipe"], "models": dict(data["recipe"].get("models", {}))}
        for key in PROTOCOL:
            if data["recipe"].get(key) != recipe.get(key):
                raise MergeError(f"{path}: its {key} is {data['recipe'].get(key)!r} where {files[0]} has "
                                 f"{recipe.get(key)!r}; merge only runs made the same way")
        for name, model in data["recipe"].get("models", {}).items():
            kept = recipe["models"].setdefault(name, model)
            if kept != model:
                fields = sorted(f"{part}.{k}" for part in ("model", "train") for k in
                                set(kept[part]) | set(model[part]) if kept[part].get(k) != model[part].get(k))
                raise MergeError(f"{path}: its recipe of {name!r} differs from the first file's in "
                                 f"{', '.join(fields) or 'its preset'}; merge only runs of one recipe")
        seen = {run_key(d) for d in runs}
        runs += [r for r in data["runs"] if run_key(r) not in seen]
        if data.get("machine") and data["machine"] not in machines:
            machines.append(data["machine"])
    atomic_write_json(out, {"recipe": recipe, "machines": machines, "runs": runs, "summary": summary(runs),
                            "merged": [str(f) for f in files]})
    print_tables(runs)
    print(f"\nwrote {out} ({len(runs)} runs from {len(files)} files)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
