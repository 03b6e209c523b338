"""Hyperparameter search with Optuna (`vaelab tune`): a search file, the objectives, and the study loop.

    [space]                                   # what the search may change: any `vaelab train` setting
    beta = {low = 0.5, high = 8, log = true}
    latent_dim = {choices = [2, 8, 16]}
    lr = {low = 1e-4, high = 1e-2, log = true}
    [fixed]                                   # what it may not (the keys of `vaelab train --config`)
    model = "vae"
    epochs = 5
    [study]
    objective = "nll"                         # val_loss, nll, probe_accuracy or auroc (OBJECTIVES)
    n_trials = 16
    validation = 0.1                          # the held-out share of the training split ("test": the test split)

Model selection never sees the test split: every trial trains on the training split less a held-out validation
split (`validation`, a fraction of it, drawn with the study's seed, stratified by label where there are labels: the
same rows in every trial and every process), its per-epoch validation numbers (what the pruner judges) and its
objective are measured on that validation split, and only the best trial is then measured on the test split once,
for the report (best_test_value). `validation = "test"` selects on the test split instead (optimistic).

Each trial is one ordinary run directory (DIR/trials/trial-NNNN, made by `vaelab train`'s own plan, so `vaelab
evaluate` and the other commands read it). After every epoch the trial reports the epoch's validation number
to Optuna and stops early when the pruner says so. The study lives in an SQLite file (or any Optuna RDB URL):

- a killed search resumes: a trial whose process died stops sending heartbeats, and once they are older than the
  grace period it is marked FAIL and retried with the same settings, continuing its run from its checkpoint;
- several processes may work on one study: a trial is started only under a lock file in DIR, and only while
  fewer than n_trials trials are COMPLETE, PRUNED or RUNNING, so the study ends with exactly n_trials finished
  trials however many processes share it. A live trial of another process is never failed: it keeps beating.

Layers: this module sits just below the CLI and trains through a `Trainer` that the CLI hands in (vaelab.cli.tune
builds it on `vaelab train`'s plan: defaults < preset < config file < flags), so the settings of a trial and of
`vaelab train --config best.toml` are resolved by one code path. Optuna is an optional extra, imported lazily.
"""

from __future__ import annotations

import contextlib
import dataclasses
import difflib
import json
import math
import os
import threading
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Protocol

from vaelab.errors import ConfigError, DataError, TrainingError, VaelabError

# objective name -> (direction, what it is)
OBJECTIVES = {
    "val_loss": ("minimize", "the loss on the validation split of the last epoch, or of the best epoch with early "
                             "stopping"),
    "nll": ("minimize", "the importance-sampled negative log-likelihood -log p(x) of the validation split, nats "
                        "(nll_samples samples per image; models with a stochastic posterior)"),
    "probe_accuracy": ("maximize", "accuracy of a logistic-regression probe fitted on the latent means of the "
                                   "trial's training rows, on the validation split's (labelled data)"),
    "auroc": ("maximize", "one-class anomaly detection: train on the class normal_class only, score the "
                          "validation split with anomaly_score, AUROC with the other classes as anomalies "
                          "(labelled data)"),
}
MAX_VALIDATION = 0.5
SAMPLERS = ("tpe", "random")
PRUNERS = ("median", "hyperband", "none")
SPACE_KEYS = ("low", "high", "step", "log", "choices")
# settings a search may not vary: where the data and the runs live belong to the whole study
NOT_SEARCHED = ("out", "dataset", "data_dir", "factors", "pictures")
NOT_FIXED = ("out",)  # every trial has its own run directory under --out
# [study] keys: name -> (kind, default, help)
STUDY_KEYS = {
    "objective": ("str", "val_loss", f"what the search optimizes: one of {list(OBJECTIVES)}"),
    "validation": ("fraction", 0.1, "the share of the training split held out to validate and select on (the "
                                    "study's seed draws it, stratified by label), or \"test\" to select on the "
                                    "test split (optimistic: the reported value is no longer an unbiased estimate)"),
    "direction": ("str", None, "minimize or maximize; follows the objective (may be given, must agree)"),
    "n_trials": ("int", 20, "finished (COMPLETE or PRUNED) trials the study ends with, over all processes"),
    "sampler": ("str", "tpe", f"Optuna's sampler: one of {list(SAMPLERS)}"),
    "seed": ("int", 0, "the sampler's seed"),
    "pruner": ("str", "median", f"stops bad trials early from their per-epoch numbers: one of {list(PRUNERS)}"),
    "pruner_startup_trials": ("int", 5, "finished trials before the median pruner prunes"),
    "pruner_warmup_epochs": ("int", 1, "the first epochs of a trial, which are never pruned"),
    "prune_on": ("str", None, "the per-epoch history column the pruner judges (val_loss, val_elbo, ...) "
                              "[default val_elbo for models with an ELBO (beta-free), else val_loss]"),
    "nll_samples": ("int", 100, "importance samples per image of the nll objective"),
    "normal_class": ("int", 0, "the auroc objective's normal class (its index)"),
    "anomaly_score": ("str", None, "the auroc objective's score: recon, elbo, iwae or latent [default elbo for "
                                   "stochastic models, else recon]"),
    "heartbeat": ("int", 10, "seconds between a running trial's heartbeats; a trial silent for twice as long "
                             "belongs to a dead process and is failed (then retried)"),
    "max_retry": ("int", 1, "how often a trial of a dead process is retried with the same settings"),
}


class Trainer(Protocol):
    """What the search needs of `vaelab train` (vaelab.cli.tune implements it on train's plan)."""

    kinds: dict[str, str]  # every setting name a config file accepts -> bool, ints, int, float or str

    def coerce(self, values: dict, source: str) -> dict:
        """Config-file values checked and converted as `vaelab train --config` does (ConfigError otherwise)."""

    def model_name(self, settings: dict) -> str:
        """The registered model the settings train (ConfigError naming every problem of the settings)."""

    def data(self, settings: dict):
        """The dataset the settings name, loaded (a DataSplits: its train and test splits)."""

    def load(self, run_dir: Path):
        """The model a trial saved in its run directory."""

    def train(self, settings: dict, run_dir: Path, *, resume: bool, prepare: Callable, on_epoch: Callable,
              info: dict) -> tuple:
        """Train a run into run_dir (or continue it there) on prepare(data), validating on the prepared data's
        test split (the held-out validation rows); returns (model, prepared data, history)."""


# ======================================================================================== the search file


@dataclass(frozen=True)
class Param:
    """One searched setting: a float or int range (low..high, optionally log-spaced or stepped), or choices."""
    name: str
    kind: str  # float, int or choice
    low: float | None = None
    high: float | None = None
    step: float | None = None
    log: bool = False
    choices: tuple = ()  # the settings' values (tuples for list settings such as channels)

    @property
    def labels(self) -> list:
        """The choices as Optuna stores them (None, bool, int, float or str; a list setting as '32,64')."""
        return [",".join(map(str, c)) if isinstance(c, tuple) else c for c in self.choices]

    def suggest(self, trial):
        if self.kind == "float":
            return trial.suggest_float(self.name, self.low, self.high, step=self.step, log=self.log)
        if self.kind == "int":
            return trial.suggest_int(self.name, self.low, self.high, step=self.step or 1, log=self.log)
        return self.value(trial.suggest_categorical(self.name, self.labels))

    def value(self, stored):
        """The setting's value of what Optuna stored for it."""
        if self.kind == "choice":
            return self.choices[self.labels.index(stored)]
        return stored

    def describe(self) -> str:
        if self.kind == "choice":
            return "one of " + ", ".join(str(label) for label in self.labels)
        extra = " log" if self.log else (f" step {self.step}" if self.step else "")
        return f"{self.kind} {self.low}..{self.high}{extra}"

    def to_json(self) -> dict:
        if self.kind == "choice":
            return {"name": self.name, "choices": self.labels}
        return {"name": self.name, "kind": self.kind, "low": self.low, "high": self.high, "step": self.step,
                "log": self.log}


@dataclass(frozen=True)
class TuneSpec:
    """A checked search file: the space, the fixed settings and the study settings (STUDY_KEYS)."""
    source: str
    space: tuple[Param, ...]
    fixed: dict
    study: dict = field(default_factory=dict)
    models: tuple[str, ...] = ()  # the registered models the search may train
    stochastic: bool = True  # every one of them has a stochastic posterior (an ELBO)

    @property
    def objective(self) -> str:
        return self.study["objective"]

    @property
    def direction(self) -> str:
        return OBJECTIVES[self.objective][0]

    @property
    def prune_on(self) -> str:
        return self.study["prune_on"] or ("val_elbo" if self.stochastic else "val_loss")

    @property
    def anomaly_score(self) -> str:
        return self.study["anomaly_score"] or ("elbo" if self.stochastic else "recon")

    def fingerprint(self) -> dict:
        """What makes two searches the same study (n_trials and the process settings may differ)."""
        keep = ("objective", "validation", "seed", "sampler", "pruner", "nll_samples", "normal_class")
        return {"space": [p.to_json() for p in self.space], "fixed": _jsonable(self.fixed),
                "study": {k: self.study[k] for k in keep}, "prune_on": self.prune_on,
                "anomaly_score": self.anomaly_score if self.objective == "auroc" else None}

    def settings(self, values: dict) -> dict:
        """The `vaelab train` settings of a trial: the fixed ones and the trial's values of the space."""
        return {**self.fixed, **values}


def read_spec(path, trainer: Trainer, n_trials: int | None = None) -> TuneSpec:
    """Read and check a search file (TOML, YAML or JSON); every problem is reported at once."""
    from vaelab.config import load_config_file

    source = str(path)
    raw = load_config_file(path)
    problems = [f"unknown section {k!r}: a search file has the sections [space], [fixed] and [study]"
                + _close(k, ("space", "fixed", "study")) for k in raw if k not in ("space", "fixed", "study")]
    sections = {}
    for name in ("space", "fixed", "study"):
        value = raw.get(name, {})
        if not isinstance(value, dict):
            problems.append(f"[{name}] must be a table of settings, got {value!r}")
            value = {}
        sections[name] = {str(k).replace("-", "_"): v for k, v in value.items()}
    study = _check_study(sections["study"], problems)
    if n_trials is not None:
        study["n_trials"] = n_trials
    if study.get("n_trials", 1) < 1:
        problems.append(f"n_trials = {study['n_trials']} must be at least 1")
    fixed = _check_fixed(sections["fixed"], trainer, source, problems)
    space = _check_space(sections["space"], fixed, trainer, source, problems)
    if not space and not problems:
        problems.append("[space] is empty: give at least one setting to search, e.g. lr = {low = 1e-4, high = "
                        "1e-2, log = true}")
    if problems:
        raise ConfigError(problems, f"search file {source!r}")
    models = _models(space, fixed, trainer, source)
    spec = TuneSpec(source, tuple(space), fixed, study, models, all(_capabilities(m).stochastic for m in models))
    problems = _objective_problems(spec)
    if problems:
        raise ConfigError(problems, f"search file {source!r}")
    return spec


def _close(name: str, known) -> str:
    near = difflib.get_close_matches(name, list(known), n=3, cutoff=0.6)
    return f" (did you mean {' or '.join(repr(n) for n in near)}?)" if near else ""


def _check_study(given: dict, problems: list) -> dict:
    study = {k: default for k, (_, default, _) in STUDY_KEYS.items()}
    for key, value in given.items():
        if key not in STUDY_KEYS:
            problems.append(f"[study] {key!r} is not a study setting{_close(key, STUDY_KEYS)}; known: "
                            + ", ".join(STUDY_KEYS))
            continue
        kind = STUDY_KEYS[key][0]
        if kind == "fraction":
            if value == "test" or (isinstance(value, (int, float)) and not isinstance(value, bool)
                                   and 0 < value <= MAX_VALIDATION):
                study[key] = float(value) if value != "test" else value
            else:
                problems.append(f"[study] {key} = {value!r} must be a fraction of the training split in (0, "
                                f"{MAX_VALIDATION}] to hold out for validation (e.g. 0.1), or \"test\" to select "
                                "on the test split (optimistic)")
            continue
        ok = isinstance(value, str) if kind == "str" else (isinstance(value, int) and not isinstance(value, bool))
        if not ok:
            problems.append(f"[study] {key} = {value!r} must be {'a string' if kind == 'str' else 'an integer'}: "
                            f"{STUDY_KEYS[key][2]}")
            continue
        study[key] = value
    for key, allowed in (("objective", OBJECTIVES), ("sampler", SAMPLERS), ("pruner", PRUNERS)):
        if study[key] not in allowed:
            problems.append(f"[study] {key} = {study[key]!r} is unknown{_close(str(study[key]), allowed)}; choose "
                            f"one of {list(allowed)}")
    if study["objective"] in OBJECTIVES and study["direction"] is not None \
            and study["direction"] != OBJECTIVES[study["objective"]][0]:
        problems.append(f"[study] direction = {study['direction']!r} contradicts objective = "
                        f"{study['objective']!r}, which is {OBJECTIVES[study['objective']][0]}d; drop direction")
    for key, least in (("nll_samples", 1), ("heartbeat", 1), ("max_retry", 0), ("pruner_startup_trials", 0),
                       ("pruner_warmup_epochs", 0), ("normal_class", 0)):
        if isinstance(study[key], int) and study[key] < least:
            problems.append(f"[study] {key} = {study[key]} must be at least {least}: {STUDY_KEYS[key][2]}")
    if study["prune_on"] is not None and not study["prune_on"].startswith(("val_", "train_")):
        problems.append(f"[study] prune_on = {study['prune_on']!r} must name a per-epoch history column such as "
                        "'val_loss' or 'val_elbo' (the keys of a run's metrics.jsonl)")
    return study


def _check_fixed(given: dict, trainer: Trainer, source: str, problems: list) -> dict:
    unknown = [k for k in given if k not in trainer.kinds]
    for k in unknown:
        problems.append(f"[fixed] {k!r} is not a `vaelab train` setting{_close(k, trainer.kinds)}")
    for k in NOT_FIXED:
        if k in given:
            problems.append(f"[fixed] {k!r} cannot be fixed: every trial writes its own run directory under "
                            "`vaelab tune --out DIR` (DIR/trials/trial-NNNN)")
    rest = {k: v for k, v in given.items() if k not in unknown and k not in NOT_FIXED}
    try:
        return trainer.coerce(rest, f"{source} [fixed]")
    except ConfigError as e:
        problems.extend(e.problems)
        return {}


def _check_space(given: dict, fixed: dict, trainer: Trainer, source: str, problems: list) -> list[Param]:
    space = []
    for name, entry in given.items():
        where = f"[space] {name}"
        if name not in trainer.kinds:
            problems.append(f"{where}: not a `vaelab train` setting{_close(name, trainer.kinds)}")
            continue
        if name in NOT_SEARCHED:
            problems.append(f"{where}: {name} cannot be searched (it belongs to the whole study); put it in "
                            "[fixed]")
            continue
        if name in fixed:
            problems.append(f"{where}: also in [fixed]; a setting is either searched or fixed")
            continue
        if not isinstance(entry, dict):
            problems.append(f"{where} = {entry!r} must be a table: {{low = ..., high = ...}} (optionally "
                            "log = true or step = ...) or {choices = [...]}")
            continue
        entry = {str(k).replace("-", "_"): v for k, v in entry.items()}
        bad = [k for k in entry if k not in SPACE_KEYS]
        if bad:
            problems.append(f"{where}: unknown key(s) {bad}" + _close(bad[0], SPACE_KEYS)
                            + "; a range has low, high, step, log; a list has choices")
            continue
        param = _param(name, entry, trainer, source, where, problems)
        if param is not None:
            space.append(param)
    return space


def _param(name: str, entry: dict, trainer: Trainer, source: str, where: str, problems: list) -> Param | None:
    kind = trainer.kinds[name]
    if "choices" in entry:
        choices = entry["choices"]
        if set(entry) != {"choices"}:
            problems.append(f"{where}: choices cannot go with {sorted(set(entry) - {'choices'})}")
            return None
        if not isinstance(choices, list) or not choices:
            problems.append(f"{where}: choices = {choices!r} must be a non-empty list of values")
            return None
        values = []
        for c in choices:
            try:
                values.append(trainer.coerce({name: c}, f"{source} {where}")[name])
            except ConfigError as e:
                problems.extend(f"{where}: choice {c!r}: {p}" for p in e.problems)
        if len(values) < len(choices):
            return None
        if len(set(values)) < len(values):
            problems.append(f"{where}: choices = {choices!r} repeat a value")
            return None
        return Param(name, "choice", choices=tuple(values))
    if kind not in ("int", "float"):
        problems.append(f"{where}: {name} is a {'list' if kind == 'ints' else kind} setting: give it as "
                        f"{{choices = [...]}}, not a range")
        return None
    missing = [k for k in ("low", "high") if k not in entry]
    if missing:
        problems.append(f"{where}: a range needs low and high (missing {' and '.join(missing)}), or give "
                        "{choices = [...]}")
        return None
    low, high, step, log = entry["low"], entry["high"], entry.get("step"), entry.get("log", False)
    number = (lambda v: isinstance(v, int) and not isinstance(v, bool)) if kind == "int" else \
        (lambda v: isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v))
    want = "an integer" if kind == "int" else "a number"
    before = len(problems)
    for key, v in (("low", low), ("high", high)) + ((("step", step),) if step is not None else ()):
        if not number(v):
            what = "an integer" if kind == "int" else "a real"
            problems.append(f"{where}: {key} = {v!r} must be {want} ({name} is {what} setting)")
    if not isinstance(log, bool):
        problems.append(f"{where}: log = {log!r} must be true or false")
    if len(problems) > before:
        return None
    if low >= high:
        problems.append(f"{where}: low = {low!r} must be below high = {high!r}")
    if log and low <= 0:
        problems.append(f"{where}: log = true needs low > 0 (got low = {low!r})")
    if step is not None and (step <= 0 or (log and step)):
        problems.append(f"{where}: step = {step!r} must be positive and cannot go with log = true")
    if len(problems) > before:
        return None
    if kind == "float":
        return Param(name, "float", float(low), float(high), None if step is None else float(step), log)
    return Param(name, "int", low, high, step, log)


def _models(space: list[Param], fixed: dict, trainer: Trainer, source: str) -> tuple[str, ...]:
    """Plan the fixed settings with each end of every range and each choice (the rest fixed), so that a value
    `vaelab train` refuses fails now, naming the searched setting; returns the models the search may train."""
    corners = [{}]
    for p in space:
        corners += [{p.name: v} for v in ((p.low, p.high) if p.kind != "choice" else p.choices)]
    models, problems = [], []
    for corner in corners:
        try:
            models.append(trainer.model_name(fixed | corner))
        except ConfigError as e:
            what = ", ".join(f"{k} = {v!r}" for k, v in corner.items()) or "the fixed settings"
            problems.extend(f"with {what}: {p}" for p in e.problems)
    if problems:
        raise ConfigError(problems, f"search file {source!r}")
    return tuple(sorted(set(models)))


def _capabilities(model: str):
    from vaelab.models.registry import model_class

    return model_class(model).capabilities


def _objective_problems(spec: TuneSpec) -> list[str]:
    from vaelab.evaluation.scores import score_problems

    problems = []
    if spec.objective == "nll":
        for m in spec.models:
            if not _capabilities(m).stochastic:
                problems.append(f"objective 'nll' needs a model with a stochastic posterior and a prior, but the "
                                f"search may train {m!r}; use objective 'val_loss' or a VAE")
    if spec.objective == "auroc":
        for m in spec.models:
            problems += score_problems(m, spec.anomaly_score)
    return problems


def _jsonable(settings: dict) -> dict:
    return {k: list(v) if isinstance(v, tuple) else v for k, v in settings.items()}


# ========================================================================================= objectives


def holdout(train, fraction: float, seed: int) -> tuple:
    """(rest, held_out): sorted int64 indices into `train` (an ArrayDataset) that split it into the rows a trial
    trains on and a validation split of round(fraction * rows), drawn by a permutation seeded with `seed`;
    stratified by label where there are labels (each class gives its share, at least one row of a class with
    two or more), so the same data and seed give the same split in every process."""
    import torch

    n = len(train)
    gen = torch.Generator().manual_seed(int(seed))
    if train.y is None:
        if n < 2:
            raise DataError(f"dataset {train.name!r}: its training split holds {n} sample(s), too few to hold out a "
                            "validation split; use [study] validation = \"test\"")
        perm = torch.randperm(n, generator=gen)
        held = perm[:min(max(round(n * fraction), 1), n - 1)]
    else:
        y = train.y.long()
        parts = []
        for c in torch.unique(y).tolist():
            members = (y == c).nonzero().squeeze(1)
            perm = members[torch.randperm(len(members), generator=gen)]
            k = min(max(round(len(members) * fraction), 1), len(members) - 1) if len(members) > 1 else 0
            parts.append(perm[:k])
        held = torch.cat(parts)
        if len(held) == 0:
            raise DataError(f"dataset {train.name!r}: no class of its training split has two samples, so no "
                            "validation split can be held out; use [study] validation = \"test\"")
    mask = torch.ones(n, dtype=torch.bool)
    mask[held] = False
    return mask.nonzero().squeeze(1), held.sort().values


def index_digest(index) -> str:
    """A short fingerprint of an index tensor (sha256 of its int64 bytes, 16 hex digits)."""
    import hashlib

    return hashlib.sha256(index.long().contiguous().numpy().tobytes()).hexdigest()[:16]


def validation_split(spec: TuneSpec, data) -> tuple:
    """(data a trial trains and validates on, what config.json records of the split): the training split less
    the held-out rows, and those rows as its test split (which `fit` validates on); with validation = "test" the
    data as loaded."""
    fraction, seed = spec.study["validation"], spec.study["seed"]
    if fraction == "test":
        return data, {"split": "test", "note": "selected on the test split (optimistic)",
                      "train_rows": len(data.train), "validation_rows": len(data.test)}
    rest, held = holdout(data.train, fraction, seed)
    record = {"split": "train", "fraction": fraction, "seed": seed, "stratified": data.train.y is not None,
              "of": len(data.train), "train_rows": len(rest), "validation_rows": len(held),
              "validation_sha256": index_digest(held), "train_sha256": index_digest(rest),
              "test_rows": len(data.test)}
    return dataclasses.replace(data, train=data.train.subset(rest), test=data.train.subset(held),
                               source_index=None), record


def _prepare(spec: TuneSpec, info: dict | None = None):
    """The data a trial trains on, from the loaded data: the training split less the validation split (which
    becomes the split it validates on), and (auroc) of that only the normal class. The split is recorded in
    info["tune"]["validation"] (config.json)."""
    def prepare(data):
        if spec.objective in ("probe_accuracy", "auroc") and (data.train.y is None or data.test.y is None):
            raise DataError(f"objective {spec.objective!r} needs class labels, but dataset {data.name!r} has none; "
                            "use objective 'val_loss' or 'nll', or labelled data")
        if spec.objective == "auroc":
            c, k = spec.study["normal_class"], data.train.num_classes
            if c >= k:
                raise DataError(f"normal_class = {c} is not a class of {data.name!r}; choose 0..{k - 1}")
        data, record = validation_split(spec, data)
        if spec.objective == "auroc":
            c = spec.study["normal_class"]
            data = dataclasses.replace(data, train=data.train.subset((data.train.y == c).nonzero().squeeze(1)),
                                       source_index=None)
            record["trained_rows"] = len(data.train)  # the normal class of the training rows
        if info is not None:
            info.setdefault("tune", {})["validation"] = record
        return data
    return prepare


def objective_value(spec: TuneSpec, model, data, history: list[dict]) -> float:
    """The objective of a trained trial (see OBJECTIVES)."""
    if spec.objective == "val_loss":
        losses = [row["val_loss"] for row in history if "val_loss" in row]
        if not losses:
            raise DataError("objective 'val_loss' needs a split to validate on; the data has none")
        # with early stopping the run ends on its best epoch's weights, else on the last epoch's
        return float(min(losses)) if spec.fixed.get("early_stopping", 0) else float(losses[-1])
    if spec.objective == "nll":
        from vaelab.evaluation.nll import importance_nll

        return float(importance_nll(model, data.test, n_samples=spec.study["nll_samples"],
                                    binarize=bool(spec.fixed.get("binarize", False)))["nll"])
    from vaelab.evaluation.scores import latent_codes

    if spec.objective == "probe_accuracy":
        from vaelab.evaluation.metrics import probe_accuracy

        found = probe_accuracy(latent_codes(model, data.train), data.train.y.numpy(),
                               latent_codes(model, data.test), data.test.y.numpy())
        return found["linear_probe_accuracy"]
    from vaelab.evaluation.scores import anomaly_scores, auroc, latent_statistics

    kind = spec.anomaly_score
    stats = latent_statistics(latent_codes(model, data.train)) if kind == "latent" else None
    scores = anomaly_scores(model, data.test, (kind,), latent_stats=stats)[kind]
    return auroc(scores, data.test.y.numpy() != spec.study["normal_class"])


def test_value(spec: TuneSpec, trainer: Trainer, settings: dict, run_dir) -> float:
    """The objective of a trained trial measured on the dataset's test split (the trial's model as saved in its
    run directory; the probe and the latent statistics fitted on the trial's own training rows, as in selection;
    val_loss as the loss on the test split, computed as the training loop validates)."""
    from vaelab.io import read_config

    full = trainer.data(settings)
    data = dataclasses.replace(_prepare(spec)(full), test=full.test)
    model = trainer.load(Path(run_dir))
    if spec.objective != "val_loss":
        return float(objective_value(spec, model, data, []))
    from vaelab.training.validation import loss_terms

    tc = read_config(run_dir).get("train", {})
    return float(loss_terms(model, full.test, batch_size=max(int(tc.get("batch_size", 128)), 256),
                            binarize=bool(tc.get("binarize", False)),
                            precision=tc.get("precision") or "fp32")["loss"])


# ========================================================================================== the study


def optuna_module():
    """Optuna, or a ConfigError that says how to install it."""
    try:
        import optuna
    except ModuleNotFoundError:
        raise ConfigError('`vaelab tune` needs Optuna, an optional extra: pip install "vaelab[tune]"',
                          "installation") from None
    return optuna


def default_storage(out) -> str:
    return "sqlite:///" + os.path.abspath(os.path.join(out, "study.db"))


def open_study(spec: TuneSpec, out, study_name: str, storage_url: str | None = None):
    """Create the study, or load it when it exists (then it must be the same search)."""
    optuna = optuna_module()
    from optuna import storages

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # one line per trial is printed here instead
    url = storage_url or default_storage(out)
    kwargs = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}
    if url == default_storage(out):
        Path(out).mkdir(parents=True, exist_ok=True)
    try:  # under the lock: two processes creating the tables of one new SQLite file at once collide
        with _lock(out, study_name), _quiet():
            storage = storages.RDBStorage(url, engine_kwargs=kwargs, heartbeat_interval=spec.study["heartbeat"],
                                          grace_period=2 * spec.study["heartbeat"],
                                          heartbeat_stale_trial_callback=_retry_callback()(
                                              max_retry=spec.study["max_retry"]))
    except Exception as e:  # SQLAlchemy's errors for a bad URL or an unreadable file
        raise ConfigError(f"storage {url!r} cannot be opened ({type(e).__name__}: {e}); give an SQLAlchemy URL "
                          "such as sqlite:///study.db", "--storage") from None
    with _lock(out, study_name):
        study = optuna.create_study(study_name=study_name, storage=storage, direction=spec.direction,
                                    pruner=_pruner(spec, optuna),
                                    load_if_exists=True)
        saved = study.user_attrs.get("vaelab_search")
        if saved is None:
            study.set_user_attr("vaelab_search", spec.fingerprint())
            study.set_user_attr("vaelab_source", spec.source)
        elif saved != json.loads(json.dumps(spec.fingerprint())):
            raise ConfigError(f"study {study_name!r} in {url!r} was started from a different search "
                              f"({study.user_attrs.get('vaelab_source')!r}: its space, fixed settings, "
                              "objective, validation split or seed differ); use another --study name or --out, or the original file",
                              "study")
    return study, storage


def _retry_callback():
    """Optuna's callback that re-enqueues a trial failed for its stale heartbeat (renamed in Optuna 4.9)."""
    from optuna import storages

    return getattr(storages, "RetryHeartbeatStaleTrialCallback", None) or storages.RetryFailedTrialCallback


def _sampler(spec: TuneSpec, optuna, offset: int):
    seed = spec.study["seed"] + offset
    if spec.study["sampler"] == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=min(10, max(2, spec.study["n_trials"] // 3)))


def _pruner(spec: TuneSpec, optuna):
    if spec.study["pruner"] == "none":
        return optuna.pruners.NopPruner()
    if spec.study["pruner"] == "hyperband":
        return optuna.pruners.HyperbandPruner(min_resource=spec.study["pruner_warmup_epochs"] + 1,
                                              max_resource=spec.fixed.get("epochs", "auto"))
    # a trial reports epoch e as step e (1, 2, ...): the earliest step Optuna prunes at is n_warmup_steps
    return optuna.pruners.MedianPruner(n_startup_trials=spec.study["pruner_startup_trials"],
                                       n_warmup_steps=spec.study["pruner_warmup_epochs"] + 1)


@contextlib.contextmanager
def _quiet():
    """Without Optuna's warnings that the heartbeat and its retry are experimental, or meant for optimize()
    (the loop here is ask/tell, so that a trial starts only under the lock)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        yield


@contextlib.contextmanager
def _lock(out, study_name: str):
    """An exclusive lock on DIR/.tune-STUDY.lock (every process of a study shares --out DIR)."""
    import fcntl

    path = Path(out) / f".tune-{study_name}.lock"
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


class _Heartbeat:
    """A thread that records a running trial's heartbeat in the storage every `interval` seconds."""

    def __init__(self, storage, trial_id: int, interval: int):
        self.storage, self.trial_id, self.interval = storage, trial_id, interval
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._beat, daemon=True)

    def _beat(self):
        while not self.stop.wait(self.interval):
            self.storage.record_heartbeat(self.trial_id)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.stop.set()
        self.thread.join()


def _counts(study, optuna) -> tuple[int, int]:
    """(finished trials: COMPLETE or PRUNED, RUNNING trials) of the study."""
    states = [t.state for t in study.get_trials(deepcopy=False)]
    s = optuna.trial.TrialState
    return sum(st in (s.COMPLETE, s.PRUNED) for st in states), sum(st == s.RUNNING for st in states)


def _next_trial(study, storage, spec: TuneSpec, out, study_name: str, optuna):
    """Start the next trial, or None when the study has its n_trials finished trials. Runs under the lock, so
    two processes never both start the last trial; while the missing trials are running elsewhere it waits, as
    one of them may belong to a dead process and come back to be retried."""
    from optuna.storages import fail_stale_trials

    while True:
        with _lock(out, study_name), _quiet():
            fail_stale_trials(study)  # trials silent for longer than the grace period: FAIL, then retried
            finished, running = _counts(study, optuna)
            if finished >= spec.study["n_trials"]:
                return None
            if finished + running < spec.study["n_trials"]:
                # the sampler is seeded per trial, with the study's seed plus the trial's number: a search is
                # reproducible, yet two processes (or a resumed search) never propose the same settings again
                study.sampler = _sampler(spec, optuna, len(study.get_trials(deepcopy=False)))
                trial = study.ask()
                trial_id = storage.get_trial_id_from_study_id_trial_number(study._study_id, trial.number)
                storage.record_heartbeat(trial_id)  # a trial without a heartbeat is never seen as stale
                return trial, trial_id
        time.sleep(max(1.0, spec.study["heartbeat"] / 2))


def run_study(spec: TuneSpec, trainer: Trainer, out, *, study_name: str = "tune", storage_url: str | None = None,
              log: Callable[[str], None] = print, max_failures: int = 3) -> dict:
    """Work on the study until it has n_trials finished trials (with any other processes working on it), then
    write its summary (study.json), the best settings (best.toml) and the plots; returns the summary."""
    optuna = optuna_module()
    out = Path(out)
    study, storage = open_study(spec, out, study_name, storage_url)
    t0, failures = time.perf_counter(), 0
    log(f"study {study_name!r}: {spec.objective} ({spec.direction}), {spec.study['n_trials']} trials, space: "
        + "; ".join(f"{p.name} {p.describe()}" for p in spec.space))
    split = write_validation(spec, trainer.data(spec.fixed), out)
    log(_split_line(split))
    while (started := _next_trial(study, storage, spec, out, study_name, optuna)) is not None:
        trial, trial_id = started
        try:
            with _Heartbeat(storage, trial_id, spec.study["heartbeat"]):
                state, value, error = _run_trial(spec, trainer, out, study_name, trial, trial_id, storage,
                                                 optuna)
        except Exception:  # a wrong search: the trial fails and the error reaches the user
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            raise
        # (Ctrl-C leaves the trial RUNNING, as a killed process does: its heartbeat stops, and the next
        # `vaelab tune` fails it after the grace period and retries it from its run's checkpoint)
        if state == "fail":
            study.tell(trial, state=optuna.trial.TrialState.FAIL)
            failures += 1
            log(f"trial {trial.number} failed: {error}")
            if failures >= max_failures:
                raise TrainingError(f"{failures} trials of this process failed, the last with: {error}; fix the "
                                    "settings (the search file's ranges) and run `vaelab tune` again: the study "
                                    "resumes")
            continue
        failures = 0
        try:
            if state == "pruned":
                study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            else:
                study.tell(trial, value)
        except optuna.exceptions.UpdateFinishedTrialError:  # its heartbeat came too late for another process
            log(f"trial {trial.number} was failed by another process while it ran (its heartbeat was more than "
                f"{2 * spec.study['heartbeat']} s late: raise [study] heartbeat on a busy machine); it is retried")
            continue
        frozen = study.get_trials(deepcopy=False)[trial.number]
        log(_trial_line(spec, frozen))
    summary = write_results(spec, study, out, study_name, trainer=trainer, split=split)
    summary["wall_s"] = round(time.perf_counter() - t0, 1)
    return summary


def write_validation(spec: TuneSpec, data, out: Path) -> dict:
    """The study's validation split, recorded in DIR/validation.json (with its row indices into the dataset's
    training split); every process draws the same one. Returns the record (without the indices)."""
    from vaelab.io import atomic_write_json

    _, record = validation_split(spec, data)
    record = {"dataset": data.name, **record}
    if spec.study["validation"] != "test":
        _, held = holdout(data.train, spec.study["validation"], spec.study["seed"])
        atomic_write_json(out / "validation.json", {**record, "validation_index": held.tolist()})
    return record


def _split_line(split: dict) -> str:
    if split["split"] == "test":
        return (f"selecting on the test split ({split['validation_rows']} rows; validation = \"test\": the best "
                "value is optimistic)")
    return (f"selecting on a validation split of {split['validation_rows']} of the {split['of']} training rows "
            f"(fraction {split['fraction']:g}, seed {split['seed']}{', stratified' if split['stratified'] else ''}); "
            f"trials train on the other {split['train_rows']}; the test split ({split['test_rows']} rows) is used "
            "once, for the best trial")


def _run_trial(spec: TuneSpec, trainer: Trainer, out: Path, study_name: str, trial, trial_id: int, storage, optuna):
    """Train and score one trial: ('complete', value, None), ('pruned', None, None) or ('fail', None, error)."""
    values = {p.name: p.suggest(trial) for p in spec.space}
    with _quiet():
        # the trials this one retries, oldest first ([] for a fresh trial)
        history_of_retries = _retry_callback().retry_history(storage.get_trial(trial_id))
    number = history_of_retries[0] if history_of_retries else trial.number  # the run directory is the original's
    run_dir = out / "trials" / f"trial-{number:04d}"
    resume = bool(history_of_retries) and (run_dir / "checkpoint.safetensors").is_file()
    trial.set_user_attr("run_dir", str(run_dir))
    trial.set_user_attr("process", f"{os.uname().nodename}:{os.getpid()}")
    if resume:
        trial.set_user_attr("resumed_from_epoch", _epochs_in(run_dir))
    sign = 1.0 if _metric_direction(spec.prune_on) == spec.direction else -1.0
    reported = []

    def on_epoch(history: list[dict]) -> None:
        for step in range(len(reported), len(history)):  # a resumed run reports its earlier epochs too
            row = history[step]
            if spec.prune_on not in row:
                raise ConfigError(f"[study] prune_on = {spec.prune_on!r} is not a column of the run's history; "
                                  f"its columns: {sorted(k for k in row if k.startswith(('val_', 'train_')))}",
                                  f"search file {spec.source!r}")
            trial.report(sign * float(row[spec.prune_on]), step + 1)
            reported.append(row[spec.prune_on])
        trial.set_user_attr("epochs", len(history))
        if trial.should_prune():
            raise optuna.TrialPruned(f"pruned after epoch {len(history)}")

    info = {"tune": {"study": study_name, "trial": trial.number, "objective": spec.objective,
                     "params": _jsonable(values)}}
    try:
        model, data, history = trainer.train(spec.settings(values), run_dir, resume=resume,
                                             prepare=_prepare(spec, info), on_epoch=on_epoch, info=info)
        value = objective_value(spec, model, data, history)
    except optuna.TrialPruned:
        return "pruned", None, None
    except (ConfigError, DataError):
        raise  # the search itself is wrong (every trial would fail the same way): run_study stops and says so
    except VaelabError as e:  # a diverging trial (non-finite loss) and the like: this trial fails, the search goes on
        return "fail", None, str(e)
    if not math.isfinite(value):
        return "fail", None, f"the objective is {value}"
    trial.set_user_attr("epochs", len(history))
    return "complete", value, None


def _metric_direction(column: str) -> str:
    """Whether a history column is better low (losses) or high (an ELBO, an accuracy)."""
    return "maximize" if column.endswith(("elbo", "accuracy")) else "minimize"


def _epochs_in(run_dir: Path) -> int:
    path = run_dir / "metrics.jsonl"
    return sum(1 for line in path.read_text(encoding="utf-8").splitlines() if line.strip()) if path.is_file() else 0


def _trial_line(spec: TuneSpec, t) -> str:
    params = ", ".join(f"{k}={_fmt(v)}" for k, v in t.params.items())
    epochs = t.user_attrs.get("epochs", "?")
    if t.state.name == "COMPLETE":
        return f"trial {t.number}: {spec.objective} {_fmt(t.value)} after {epochs} epoch(s)  ({params})"
    return f"trial {t.number}: {t.state.name.lower()} after {epochs} epoch(s)  ({params})"


def _fmt(v) -> str:
    return f"{v:.4g}" if isinstance(v, float) else str(v)


# ============================================================================================ results


def best_settings(spec: TuneSpec, study) -> dict:
    """The settings of the best trial: the fixed ones and its values of the space (what best.toml holds)."""
    params = study.best_trial.params
    return spec.settings({p.name: p.value(params[p.name]) for p in spec.space if p.name in params})


def write_results(spec: TuneSpec, study, out: Path, study_name: str, *, trainer: Trainer | None = None,
                  split: dict | None = None) -> dict:
    """study.json (every trial), best.toml (`vaelab train --config` accepts it) and the plots, in `out`; with the
    trainer, the best trial measured on the test split too (best_test_value)."""
    from vaelab.io import atomic_write_json, atomic_write_text

    trials = study.get_trials(deepcopy=False)
    # (Optuna gives a pruned trial its last reported number as its value: that is a prune_on number, not the
    # objective, so only COMPLETE trials carry a value here)
    rows = [{"number": t.number, "state": t.state.name, "value": t.value if t.state.name == "COMPLETE" else None,
             "params": t.params,
             "epochs": t.user_attrs.get("epochs"), "run_dir": t.user_attrs.get("run_dir"),
             "seconds": None if t.datetime_complete is None or t.datetime_start is None
             else round((t.datetime_complete - t.datetime_start).total_seconds(), 2)} for t in trials]
    states = {}
    for t in trials:
        states[t.state.name] = states.get(t.state.name, 0) + 1
    summary = {"study": study_name, "objective": spec.objective, "direction": spec.direction,
               "n_trials": spec.study["n_trials"], "states": states, "space": [p.to_json() for p in spec.space],
               "fixed": _jsonable(spec.fixed), "prune_on": spec.prune_on, "validation": split, "trials": rows,
               "written": []}
    if states.get("COMPLETE"):
        best = study.best_trial
        settings = best_settings(spec, study)
        summary.update(best_value=best.value, best_trial=best.number, best_params=_jsonable(
            {p.name: p.value(best.params[p.name]) for p in spec.space}), best_run=best.user_attrs.get("run_dir"))
        on = "validation" if spec.study["validation"] != "test" else "test"
        summary["best_value_split"] = on
        if trainer is not None and best.user_attrs.get("run_dir"):
            summary["best_test_value"] = test_value(spec, trainer, settings, best.user_attrs["run_dir"])
        tested = f", test {summary['best_test_value']:.6g}" if "best_test_value" in summary else ""
        header = (f"# the best settings of study {study_name!r} ({spec.objective} {best.value:.6g} on the {on} "
                  f"split{tested}, trial {best.number});\n# train with: vaelab train --config "
                  f"{out / 'best.toml'} (it trains on the whole training split)")
        atomic_write_text(out / "best.toml", header + "\n" + to_toml(settings))
        summary["written"].append(str(out / "best.toml"))
        summary["written"] += save_plots(study, out)
    atomic_write_json(out / "study.json", summary)
    summary["written"].insert(0, str(out / "study.json"))
    if split is not None and split["split"] == "train":
        summary["written"].insert(1, str(out / "validation.json"))
    return summary


def to_toml(settings: dict) -> str:
    """Flat settings as TOML (strings, numbers, booleans, lists of integers)."""
    lines = []
    for k, v in settings.items():
        if isinstance(v, bool):
            text = "true" if v else "false"
        elif isinstance(v, (int, float)):
            text = repr(v) if not isinstance(v, float) or math.isfinite(v) else json.dumps(str(v))
        elif isinstance(v, (tuple, list)):
            text = "[" + ", ".join(str(i) for i in v) + "]"
        elif v is None:
            continue  # TOML has no null: the setting keeps its default
        else:
            text = json.dumps(str(v))  # a JSON string is a TOML basic string
        lines.append(f"{k.replace('_', '-')} = {text}")
    return "\n".join(lines) + "\n"


def save_plots(study, out: Path) -> list[str]:
    """Optuna's optimization history and parameter importances as PNG files (Agg, written atomically)."""
    import io

    import matplotlib

    matplotlib.use("Agg", force=False)  # file-only rendering; never opens a window
    import matplotlib.pyplot as plt
    from optuna.visualization import matplotlib as vis

    from vaelab.io import atomic_write_bytes

    written = []
    complete = [t for t in study.get_trials(deepcopy=False) if t.state.name == "COMPLETE"]
    plots = [("optimization_history.png", vis.plot_optimization_history)]
    if len(complete) >= 2 and any(len({repr(t.params.get(k)) for t in complete}) > 1 for k in complete[0].params):
        plots.append(("param_importances.png", vis.plot_param_importances))  # needs trials that differ
    for name, plot in plots:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # Optuna's matplotlib plots are marked experimental
            ax = plot(study)
        fig = ax.figure if hasattr(ax, "figure") else ax.flat[0].figure
        buf = io.BytesIO()
        fig.savefig(buf, format="png", bbox_inches="tight", facecolor="white")
        plt.close(fig)
        atomic_write_bytes(out / name, buf.getvalue())
        written.append(str(out / name))
    return written


__all__ = ["OBJECTIVES", "STUDY_KEYS", "Param", "TuneSpec", "Trainer", "read_spec", "open_study", "run_study",
           "objective_value", "best_settings", "write_results", "to_toml", "save_plots", "default_storage"]
