"""`vaelab tune FILE`: hyperparameter search with Optuna (vaelab.tune), each trial trained by `vaelab train`'s own
plan (defaults < preset < the search file's settings), so a trial, and `vaelab train --config best.toml`, resolve
their settings exactly as `vaelab train` does."""

from __future__ import annotations

import argparse
import os
from pathlib import Path

from vaelab.cli import train as train_cli
from vaelab.cli.common import add_trust_code, print_table, print_written, sub, write_evaluation

DESCRIPTION = """
    Search hyperparameters with Optuna. FILE (TOML or YAML) has three sections:

      [space]   the settings to search: any `vaelab train` setting (the keys of `vaelab train --config`)
                as a range, beta = {low = 0.5, high = 8, log = true}, epochs = {low = 2, high = 10, step = 2},
                or a list, latent-dim = {choices = [2, 8, 16]}
      [fixed]   the settings every trial shares: model = "vae", dataset = "mnist", epochs = 5, ...
      [study]   objective: val_loss (the validation split's loss), nll (importance-sampled -log p(x);
                stochastic models), probe_accuracy (a logistic-regression probe on the latent means;
                labelled data) or auroc (one-class anomaly detection of normal_class; labelled data); the
                direction follows it. validation (0.1: the share of the training split held out to select
                on, drawn with the seed, stratified by label; "test" selects on the test split, which makes
                the best value optimistic). n_trials (20), sampler (tpe, random), seed (0), pruner (median,
                hyperband, none), pruner_startup_trials (5), pruner_warmup_epochs (1), prune_on (the
                history column the pruner judges: val_elbo for models with an ELBO, else val_loss),
                nll_samples (100), normal_class (0), anomaly_score, heartbeat (10 s), max_retry (1).

    The test split stays out of the search: each trial trains on the training split less the held-out
    validation rows (the same rows in every trial and process), its per-epoch numbers and its objective
    are measured on them, and only the best trial is measured on the test split, once (best_test_value).

    It writes into --out DIR:
      study.db                the Optuna study (SQLite), unless --storage names another
      validation.json         the held-out rows (indices into the training split), fraction, seed, sizes
      trials/trial-NNNN/      one ordinary run directory per trial (`vaelab evaluate` etc. read it)
      study.json              every trial (state, value, settings, epochs), the best value and settings,
                              and best_test_value: the best trial's objective on the test split
      best.toml               the best settings: vaelab train --config DIR/best.toml --out runs/best
                              trains on the whole training split (validation rows included)
      optimization_history.png, param_importances.png   Optuna's plots

    Bad trials stop early: after every epoch the trial reports its validation number and the pruner
    compares it with the other trials' at that epoch. Run the same command again to resume a stopped
    search (a trial whose process died is failed once its heartbeat is 2 x heartbeat old, and retried from
    its run's checkpoint), or run it in several processes at once to share the work: the study ends with
    exactly n_trials finished (COMPLETE or PRUNED) trials."""
EPILOG = """
    example (search.toml):
      [space]
      beta = {low = 0.5, high = 8, log = true}
      latent-dim = {choices = [2, 8, 16]}
      lr = {low = 1e-4, high = 1e-2, log = true}
      [fixed]
      model = "vae"
      arch = "mlp"
      epochs = 5
      [study]
      objective = "nll"
      n_trials = 16

      vaelab tune search.toml --out runs/tune-vae
      vaelab train --config runs/tune-vae/best.toml --epochs 30 --out runs/best-vae"""


def add_tune_parser(subs) -> argparse.ArgumentParser:
    p = sub(subs, "tune", DESCRIPTION, EPILOG)
    p.add_argument("file", metavar="FILE", help="the search file (.toml or .yaml): [space], [fixed], [study]")
    p.add_argument("--out", metavar="DIR", default=None,
                   help="the study directory: trials, study.db, best.toml, plots [default runs/tune-<FILE's name>]")
    p.add_argument("--study", metavar="NAME", default="tune",
                   help="the study's name in the storage; the same name continues it [default tune]")
    p.add_argument("--storage", metavar="URL", default=None,
                   help="an Optuna RDB URL, e.g. sqlite:///path/study.db [default sqlite:///DIR/study.db]")
    p.add_argument("--n-trials", type=int, metavar="N", default=None,
                   help="finished trials the study ends with (overrides the file's n_trials)")
    add_trust_code(p)
    p.set_defaults(func=cmd_tune)
    return p


class TrainTrainer:
    """vaelab.tune.Trainer on `vaelab train`'s own plan, data loading and loop (one dataset load per process)."""

    def __init__(self, trust_code: bool = False):
        self.trust_code = trust_code
        self.kinds = {f.name: train_cli._kind(f) for f, _ in train_cli._fields()}
        self.kinds.update({k: "bool" if k == "pictures" else "str" for k in train_cli.RUN_KEYS})
        self._data: dict = {}

    def data(self, settings: dict):
        from vaelab.data import load_dataset

        plan = train_cli._plan({**settings, "out": Path(os.devnull) / "unused", "overwrite": True})
        options = plan["data_options"]  # an image folder read as `vaelab train` would (--image-size, ...)
        key = (plan["dataset"], plan["data_dir"], plan["factors"], tuple(sorted(options.items())))
        if key not in self._data:
            self._data[key] = train_cli._with_factors(load_dataset(plan["dataset"], plan["data_dir"], progress=False,
                                                                   **options), plan)
        return self._data[key]

    def load(self, run_dir: Path):
        from vaelab.models import from_pretrained

        return from_pretrained(run_dir, trust_code=self.trust_code)

    def coerce(self, values: dict, source: str) -> dict:
        return train_cli._coerce(values, source)

    def model_name(self, settings: dict) -> str:
        plan = train_cli._plan({**settings, "out": Path(os.devnull) / "unused", "overwrite": True})
        return plan["model"].model

    def train(self, settings: dict, run_dir: Path, *, resume: bool, prepare, on_epoch, info: dict):
        import torch

        from vaelab.evaluation import evaluate
        from vaelab.models import build_model
        from vaelab.training import fit

        given = {"progress": False, "pictures": False, **settings, "out": Path(run_dir),
                 ("resume" if resume else "overwrite"): True}
        plan = train_cli._plan(given)
        tc = plan["train"]
        data = prepare(self.data(settings))  # the training rows, and the held-out validation rows as `test`
        mc = train_cli._condition_dim(plan["model"], data, plan["condition_from_data"])
        if tc.threads:
            torch.set_num_threads(tc.threads)
        torch.manual_seed(tc.seed)  # the initial weights, as `vaelab train` seeds them
        model = build_model(mc, input_shape=data.train.sample_shape, trust_code=self.trust_code)
        run_info = {**train_cli._run_info(plan, model, data), **info}
        history = fit(model, data.train, data.test, tc, out=plan["out"], resume=plan["resume"], run_info=run_info,
                      on_epoch=on_epoch)
        metrics = evaluate(model, data.test, batch_size=max(tc.batch_size, 256), binarize=tc.binarize)
        split = info.get("tune", {}).get("validation", {}).get("split")
        write_evaluation(plan["out"] / "evaluation.json", metrics, "validation" if split == "train" else "test",
                         data.name)
        if plan["pictures"]:
            from vaelab.cli.drawing import run_pictures

            run_pictures(model, data, plan["out"], f"trial {info['tune']['trial']}")
        return model, data, history


def cmd_tune(args) -> int:
    from vaelab.errors import VaelabError
    from vaelab.tune import optuna_module, read_spec, run_study

    optuna_module()  # the extra is installed, or say how before anything else
    if args.n_trials is not None and args.n_trials < 1:
        raise VaelabError(f"--n-trials {args.n_trials} must be at least 1")
    trainer = TrainTrainer(trust_code=args.trust_code)
    spec = read_spec(args.file, trainer, n_trials=args.n_trials)
    out = Path(args.out or os.path.join("runs", f"tune-{Path(args.file).stem}"))
    summary = run_study(spec, trainer, out, study_name=args.study, storage_url=args.storage, log=_log)
    print()
    _print_summary(summary)
    print()
    print_written(summary["written"])
    return 0


def _log(line: str) -> None:
    print(line, flush=True)


def _print_summary(summary: dict) -> None:
    names = [p["name"] for p in summary["space"]]
    rows = [["trial", "state", summary["objective"], "epochs", "seconds", *names]]
    for t in summary["trials"]:
        rows.append([str(t["number"]), t["state"].lower(), "" if t["value"] is None else f"{t['value']:.6g}",
                     str(t["epochs"] or ""), "" if t["seconds"] is None else f"{t['seconds']:.1f}",
                     *(_cell(t["params"].get(n)) for n in names)])
    print_table(rows)
    states = ", ".join(f"{n} {s.lower()}" for s, n in sorted(summary["states"].items()))
    print(f"\n{summary['study']}: {states}; {summary['wall_s']} s in this process")
    if "best_value" in summary:
        params = ", ".join(f"{k}={_cell(v)}" for k, v in summary["best_params"].items())
        on = summary.get("best_value_split", "validation")
        print(f"best: {summary['objective']} {summary['best_value']:.6g} on the {on} split (trial "
              f"{summary['best_trial']}: {params}; run {summary['best_run']})")
        if "best_test_value" in summary:
            note = "  (the split it was selected on: optimistic)" if on == "test" else ""
            print(f"best trial on the test split: {summary['objective']} {summary['best_test_value']:.6g}{note}")
    else:
        print("no trial completed, so there are no best settings yet")


def _cell(v) -> str:
    if v is None:
        return ""
    return f"{v:.4g}" if isinstance(v, float) else str(v)
