"""`vaelab train`: its flags, generated from the fields of ModelConfig, TrainConfig and every registered model's
Settings (so a new field gets its flag, and its config-file key, without touching this file); config files;
the plan that resolves every setting (defaults < preset < config file < flags); and the training run itself.

Building the parser imports the model registry (vaelab.models, hence torch): the models' own settings are flags.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import os
import sys
import time
from pathlib import Path

from vaelab.cli.common import (Interrupted, add_trust_code, fmt_number, fmt_value, int_list, print_table, print_terms,
                               print_written, sub, write_evaluation)
from vaelab.config import (ACTIVATIONS, ARCHS, KL_SCHEDULES, LABELLED_BOUNDS, LIKELIHOODS, LR_SCHEDULES, NOISES,
                           PRESETS, ModelConfig, TrainConfig)
from vaelab.errors import ConfigError, VaelabError
from vaelab.labels import class_names

DEFAULT_PRESET = "seed-vae"
DEFAULT_DATASET = "digits"
# as vaelab.data.DATASETS (that needs torch)
BUILTIN_DATASETS = ("digits", "mnist", "fashion-mnist", "cifar10", "svhn", "celeba", "dsprites")

# Help for the generated flags, keyed by field name. A field missing here still gets a flag.
DIGITS_EPOCHS = 100  # the default --epochs on the small digits dataset

FIELD_HELP = {
    "model": "a registered model: vae, ae, cvae, hvae, m2 or vqvae (`vaelab models` lists them); without "
             "--preset it starts from the ModelConfig defaults",
    "arch": "network: conv (stride-2 convs, dense latent), conv-pool (conv + max-pool, spatial latent), "
            "mlp (dense layers), resnet (residual blocks with GroupNorm and SiLU, one 2x downsampling per "
            "--channels entry; H and W multiples of 2^levels), or auto (conv for images, mlp for vectors)",
    "latent_dim": "size of the latent vector (arch conv and mlp)",
    "channels": "conv channels, one per down-sampling layer, comma-separated (e.g. 32,64)",
    "hidden": "dense layer sizes before the latent, comma-separated (e.g. 256 or 512,256; '' for none)",
    "blocks": "--arch resnet: residual blocks per level, comma-separated, one per --channels entry (e.g. 1,2,2) "
              "or one for every level (e.g. 2)",
    "likelihood": "the decoder's output distribution: bernoulli (binary cross-entropy; data in [0, 1]), "
                  "gaussian (squared error, fixed --gaussian-sigma), continuous-bernoulli (a normalized density on "
                  "[0, 1]), discretized-logistic (a mixture of --mixtures logistics per sub-pixel, PixelCNN++) or "
                  "discretized-gaussian (learned mean and scale per sub-pixel); the discretized ones model 8-bit "
                  "pixels and give exact bits/dim (docs: Likelihoods)",
    "mixtures": "logistics per sub-pixel of --likelihood discretized-logistic",
    "gaussian_sigma": "fixed standard deviation of the gaussian likelihood",
    "logvar_min": "lower bound of the posterior's log-variance (VAE family; values inside the bounds pass "
                  "unchanged; may change on --resume)",
    "logvar_max": "upper bound of the posterior's log-variance: lower it (e.g. 10) when a run stops on a "
                  "non-finite loss (may change on --resume)",
    "activation": "the nonlinearity of the hidden layers of the conv, conv-pool and mlp networks (and of the "
                  "semi-supervised models' MLPs): relu, softplus (Kingma et al.'s M1+M2), tanh (Kingma & Welling's "
                  "MNIST VAE) or elu; arch resnet keeps its SiLU",
    "condition_dim": "size of a conditional model's condition; for --model cvae it is the number of classes "
                     "of the training data unless given (0 for unconditional models)",
    "epochs": f"passes over the training set ({DIGITS_EPOCHS} on digits unless given)",
    "batch_size": "samples per optimizer step",
    "lr": "Adam's learning rate",
    "lr_schedule": "learning-rate schedule: constant, or cosine (anneals from --lr to --lr-min over the "
                   "run's --epochs; a resumed run continues on the same curve)",
    "lr_min": "the final learning rate of --lr-schedule cosine",
    "seed": "random seed of the weights, data order and sampling noise (same seed, same run)",
    "binarize": "dynamic binarization: every batch is a fresh Bernoulli draw of the pixel intensities",
    "early_stopping": "stop after this many epochs without a lower test loss and keep the best "
                      "weights (0 = off)",
    "grad_clip": "clip the global gradient norm to this value (0 = off)",
    "checkpoint_every": "also write the checkpoint every N optimizer steps, so a crash costs at most N steps; "
                        "--resume then continues inside the epoch exactly (0 = at the end of each epoch only)",
    "threads": "torch CPU threads (0 = all cores)",
    "progress": "progress bars while training and downloading",
    "noise": "denoising: corrupt the inputs and train to reconstruct the clean ones: gaussian (add "
             "noise of std --noise-level), masking (zero a fraction --noise-level of the pixels) or "
             "salt-pepper (set a fraction --noise-level to 0 or 1)",
    "noise_level": "strength of --noise: the std of gaussian noise (e.g. 0.5), or the fraction of pixels "
                   "masked / salted (0..1)",
    "kl_schedule": "how the KL weight reaches --beta: constant, linear (warm-up from 0 over --kl-warmup "
                   "epochs) or cyclical (restarts from 0 every --kl-warmup epochs, rising over the first "
                   "half of each cycle)",
    "kl_warmup": "epochs of the linear KL warm-up, or the length of one cycle of the cyclical schedule "
                 "(with a schedule but without this: a quarter of --epochs, so 4 cycles as in Fu et al. 2019)",
    "capacity": "Burgess et al.'s capacity objective: the loss becomes recon + beta*|KL - C| with the "
                "target KL C rising linearly to this many nats (use a large --beta, e.g. 100; 0 = off)",
    "capacity_epochs": "epochs over which the target KL C rises from 0 to --capacity",
    "free_bits": "nats per latent dimension below which its KL is not penalised, so no dimension is "
                 "pushed into collapse (e.g. 0.1; 0 = off)",
    "iw_samples": "importance samples K per input: K > 1 trains on the IWAE bound of Burda et al. "
                  "(tighter than the ELBO, K times the decoder cost); 1 = the ELBO",
    "precision": "floating-point precision of training and its validation (bf16: mixed precision, fp32 weights; "
                 "auto, the default: bf16 where the CPU or GPU computes it natively and a training step of the "
                 "model, timed in both before the first epoch, is faster in it; the choice is printed and written "
                 "into config.json)",
    "labels": "semi-supervised training (--model m2): keep this many training labels, balanced over the "
              "classes and chosen with --seed, and hide the rest; every batch mixes both kinds (0 = keep all)",
    "labelled_share": "with --labels N: the least share of every batch taken from the N labelled samples, cycled "
                      "through in a fresh order each pass (the rest: each unlabelled sample once an epoch); the "
                      "labelled set's own share of the data when that is larger",
    "labelled_bound": "with --labels N: the weight of a labelled sample's -ELBO in the loss: batch (1 at every "
                      "visit, so the few labelled samples, cycled through every batch, weigh as often as they are "
                      "shown) or paper (scaled so that an epoch counts each one's bound once, as Kingma et al.'s "
                      "objective, the sum of L(x,y) over the labelled set plus U(x) over the rest); the classifier's "
                      "weight is alpha either way",
}
FIELD_CHOICES = {"arch": ARCHS, "activation": ACTIVATIONS, "likelihood": LIKELIHOODS, "noise": NOISES,
                 "kl_schedule": KL_SCHEDULES, "lr_schedule": LR_SCHEDULES, "labelled_bound": LABELLED_BOUNDS}
# model settings a resumed run may change: they bound values, they shape no weight
RESUMABLE_MODEL_FIELDS = ("logvar_min", "logvar_max")
NOT_FLAGS = {"input_shape", "settings", "networks"}  # set from the data or in Python; own settings get flags below
SETTINGS = "model's own settings"  # the group of the flags made from the registered models' Settings fields
# config-file keys besides the ModelConfig/TrainConfig fields (the same names as the flags)
RUN_KEYS = ("preset", "dataset", "data_dir", "factors", "out", "pictures", "tracker", "mlflow_uri", "mlflow_experiment",
            "image_size", "background", "lazy", "workers", "cache")
# how an image folder is read (vaelab.data.load_dataset's keywords), saved in config.json's data section; the first
# two make the pixels, so a resumed run keeps them
DATA_OPTIONS = ("image_size", "background", "lazy", "workers", "cache")
PIXEL_OPTIONS = ("image_size", "background")
RUN_KINDS = {"pictures": "bool", "image_size": "int", "lazy": "bool", "workers": "int", "cache": "bool"}
TRACKER_CHOICES = ("none", "tensorboard", "mlflow")  # as vaelab.training.tracking.TRACKERS (that needs torch)
RUN_FILES = ("config.json", "metrics.jsonl", "checkpoint.safetensors", "model.safetensors")

DESCRIPTION = """
    Train a model and write a run directory (--out, default runs/<preset-or-model>-<dataset>):
      config.json             model, training and data settings (what the other commands read)
      metrics.jsonl           one JSON line of train and test loss terms per epoch
      checkpoint.safetensors  weights, optimizer and RNG state after the last finished epoch, or
                              the last --checkpoint-every step (--resume continues from it exactly)
      model.safetensors       the final weights (Python: vaelab.from_pretrained(RUN))
      evaluation.json         the test split's loss terms after training (also printed)
      reconstructions.png, samples.png, manifold.png, interpolation.png, traversal.png, latents.png
                              pictures (unless --no-pictures; samples, manifold and traversal need
                              a VAE, the traversal a latent of more than 2 dimensions, image pictures
                              image data; a conditional model's samples.png has one row per class)
      tracking.json, tensorboard/
                              with --tracker: the tracker the run uses (its MLflow run id), and
                              TensorBoard's event files (docs/tracking.md)

    Models: vae (beta != 1 makes a beta-VAE; --kl-schedule, --capacity and --free-bits shape its KL
    term; --iw-samples K > 1 trains on the IWAE bound), ae (with --noise: a denoising autoencoder), and
    cvae (a VAE conditioned on the class label; its --condition-dim is the data's number of classes), and
    m2 (Kingma et al.'s semi-supervised VAE: a classifier q(y|x) beside a CVAE; --labels N hides all but
    N training labels, evaluation.json reports the classifier's test accuracy and error, and the pictures
    add analogies.png: test images' styles drawn as every class; --preset m2 is a recipe for MNIST).

    Settings, later ones winning: the ModelConfig/TrainConfig defaults < --preset < --config FILE
    < explicit flags. Without --preset and --model the preset is seed-vae; the dataset is digits
    (scikit-learn's 8x8 digits, offline)."""
EPILOG = """
    examples:
      vaelab train --preset seed-conv-ae --dataset mnist --data-dir ~/data --epochs 10
      vaelab train --model vae --arch mlp --latent-dim 8 --hidden 512,256 --beta 4
      vaelab train --model cvae --dataset mnist --epochs 10 --out runs/cvae
      vaelab train --model ae --noise gaussian --noise-level 0.5 --dataset fashion-mnist
      vaelab train --config my.toml --epochs 3        # keys mirror the flags: latent-dim = 3
      vaelab train --out runs/x --resume --epochs 20  # continue runs/x up to epoch 20
      vaelab train --tracker mlflow --mlflow-uri http://127.0.0.1:5000 --mlflow-experiment vaes"""


# ============================================================================================ the parser


def add_train_parser(subs) -> argparse.ArgumentParser:
    p = sub(subs, "train", DESCRIPTION, EPILOG)
    _add_run_flags(p.add_argument_group("run"))
    _add_field_flags(p)
    p.set_defaults(func=cmd_train)
    return p


def _add_run_flags(run) -> None:
    run.add_argument("--preset", choices=sorted(PRESETS), default=argparse.SUPPRESS,
                     help="start from a named preset (`vaelab models` describes them) [default seed-vae "
                          "unless --model is given]")
    run.add_argument("--dataset", metavar="NAME_OR_PATH", default=argparse.SUPPRESS,
                     help="digits, mnist, fashion-mnist, cifar10, svhn, celeba (64x64, 40 attributes as factors), "
                          "dsprites (generated, with its factors), or "
                          "a path to a .npy/.npz/.csv file or an image folder [default digits]")
    run.add_argument("--factors", metavar="FILE", default=argparse.SUPPRESS,
                     help="ground-truth factors of the data, for `vaelab evaluate --disentanglement`: an .npy (N, F) "
                          "or a .csv with a header row of factor names, one row per sample in the data's order (the "
                          "train rows, then the test rows, for data with its own splits); the run remembers it")
    run.add_argument("--data-dir", metavar="DIR", default=argparse.SUPPRESS,
                     help="folder holding the mnist/fashion-mnist files (or one sub-folder per dataset) "
                          "[default $VAELAB_DATA, then the download cache]")
    run.add_argument("--image-size", metavar="N", type=int, default=argparse.SUPPRESS,
                     help="image folders: resize each image's short side to N and centre-crop N x N (needed when the "
                          "files differ in size) [default: the files' own size]")
    run.add_argument("--background", metavar="COLOUR", default=argparse.SUPPRESS,
                     help="image folders: white, black or #rrggbb, what transparent pixels are composited on "
                          "[default white]")
    run.add_argument("--lazy", action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                     help="image folders: decode the files one batch at a time instead of all up front [default: "
                          "lazily with --workers or --cache, or when the decoded pixels would take more than 1 GiB]")
    run.add_argument("--workers", metavar="N", type=int, default=argparse.SUPPRESS,
                     help="a lazily read image folder: worker processes that decode batches ahead [default 0: the "
                          "training process decodes]")
    run.add_argument("--cache", action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS,
                     help="a lazily read image folder: keep the decoded pixels in a uint8 .npy file in the user "
                          "cache (written during the first epoch; later epochs read it) [default off]")
    run.add_argument("--out", metavar="DIR", default=argparse.SUPPRESS,
                     help="run directory to write [default runs/<preset-or-model>-<dataset>]")
    run.add_argument("--config", metavar="FILE", default=argparse.SUPPRESS,
                     help="a .toml or .yaml file of settings whose keys mirror these flags "
                          "(latent-dim = 3); flags given here override it")
    run.add_argument("--resume", action="store_true", default=argparse.SUPPRESS,
                     help="continue the run in --out from its checkpoint, with its saved settings "
                          "(training settings such as --epochs may change; model settings may not)")
    run.add_argument("--overwrite", action="store_true", default=argparse.SUPPRESS,
                     help="start afresh in an --out that already holds a run, replacing its files")
    add_trust_code(run, default=argparse.SUPPRESS)
    run.add_argument("--no-pictures", dest="pictures", action="store_false", default=argparse.SUPPRESS,
                     help="skip the PNG pictures after training")
    run.add_argument("--tracker", choices=TRACKER_CHOICES, default=argparse.SUPPRESS,
                     help="log the run to an experiment tracker: tensorboard (event files in <out>/tensorboard) or "
                          "mlflow (settings, every epoch's metrics, pictures and model on an MLflow server); "
                          "--resume continues the run's own tracker unless given (none: stop tracking) "
                          "[default none]")
    run.add_argument("--mlflow-uri", metavar="URI", default=argparse.SUPPRESS,
                     help="the MLflow tracking server (http://host:port) or store [default $MLFLOW_TRACKING_URI, "
                          "then MLflow's default; --resume: the server of the run's MLflow run]")
    run.add_argument("--mlflow-experiment", metavar="NAME", default=argparse.SUPPRESS,
                     help="the MLflow experiment of a new run, created if missing [default "
                          "$MLFLOW_EXPERIMENT_NAME, then MLflow's 'Default']")


def _settings_fields() -> list[dataclasses.Field]:
    """The fields of every registered model's Settings that get a flag (one flag per name: two models with a
    setting of the same name, such as beta, share it); a field's metadata may say flag=False."""
    return [fields[0][1] for fields in _settings_owners().values()]


def _settings_owners() -> dict[str, list[tuple[str, dataclasses.Field]]]:
    """(model name, field) of every registered model's flagged Settings field, by field name."""
    from vaelab.models import MODELS

    owners: dict[str, list[tuple[str, dataclasses.Field]]] = {}
    for name in sorted(MODELS):
        for f in dataclasses.fields(MODELS[name].cls.Settings):
            if f.metadata.get("flag", True) and f.name not in NOT_FLAGS:
                owners.setdefault(f.name, []).append((name, f))
    for problem in MODELS.broken.values():  # a broken plugin names itself; the other models work on
        print(f"vaelab: warning: {problem}", file=sys.stderr)
    return owners


def _fields() -> list[tuple[dataclasses.Field, object]]:
    """(field, its dataclass, or SETTINGS) for every ModelConfig, model-settings and TrainConfig field that gets a
    flag."""
    common = [(f, ModelConfig) for f in dataclasses.fields(ModelConfig) if f.name not in NOT_FLAGS]
    return common + [(f, SETTINGS) for f in _settings_fields()] + [(f, TrainConfig) for f in dataclasses.fields(TrainConfig)]


def _model_value(mc: ModelConfig, name: str):
    """A common field or one of the model's own settings of `mc` (None where it has no such setting)."""
    if name in mc.settings:
        return mc.settings[name]
    return getattr(mc, name) if name in {f.name for f in dataclasses.fields(ModelConfig)} else None


def _field_default(f: dataclasses.Field):
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _kind(f: dataclasses.Field) -> str:
    """'bool', 'ints' (a tuple of ints), 'int', 'float' or 'str', from the default (or the annotation)."""
    default = _field_default(f)
    for kind, types in (("bool", bool), ("ints", tuple), ("int", int), ("float", float), ("str", str)):
        if isinstance(default, types):
            return kind
    annotation = str(f.type)
    for kind, word in (("bool", "bool"), ("ints", "tuple"), ("int", "int"), ("float", "float")):
        if word in annotation:
            return kind
    return "str"


def _field_help(f: dataclasses.Field, cls: type) -> str:
    if cls is SETTINGS:  # a setting several models have: each meaning once, with the models that mean it
        return "; ".join(_setting_help(f.name, fields) for fields in _setting_meanings(f.name)).replace("%", "%%")
    default = _field_default(f)
    parts = [f"default {fmt_value(default)}"]
    for p in PRESETS.values():  # where a preset differs from the default, say so
        v = getattr(p.model if cls is ModelConfig else p.train, f.name)
        if v != default:
            parts.append(f"{p.name}: {fmt_value(v)}")
    text = f.metadata.get("help") or FIELD_HELP.get(f.name, f.name.replace("_", " "))
    return f"{text} [{'; '.join(parts)}]".replace("%", "%%")


def _setting_meanings(name: str) -> list[list[tuple[str, dataclasses.Field]]]:
    """The (model, field) pairs of setting `name`, grouped by help text and default."""
    groups: dict[tuple, list] = {}
    for model, f in _settings_owners()[name]:
        groups.setdefault((f.metadata.get("help", ""), repr(_field_default(f))), []).append((model, f))
    return list(groups.values())


def _setting_help(name: str, fields: list[tuple[str, dataclasses.Field]]) -> str:
    """'model, model: help [default D; preset: V]' for models whose setting `name` means the same."""
    f = fields[0][1]
    default, models = _field_default(f), [m for m, _ in fields]
    parts = [f"default {fmt_value(default)}"]
    for p in PRESETS.values():  # where a preset of one of these models differs from the default, say so
        if p.model.model in models and p.model.settings.get(name, default) != default:
            parts.append(f"{p.name}: {fmt_value(p.model.settings[name])}")
    text = f.metadata.get("help") or FIELD_HELP.get(name, name.replace("_", " "))
    return f"{', '.join(models)}: {text} [{'; '.join(parts)}]"


def _add_field_flags(parser: argparse.ArgumentParser) -> None:
    groups = {ModelConfig: parser.add_argument_group("model settings (ModelConfig; saved with the weights)"),
              SETTINGS: parser.add_argument_group("each model's own settings (saved with the weights; `vaelab models` "
                                                  "says which model has which)"),
              TrainConfig: parser.add_argument_group("training settings (TrainConfig)")}
    for f, cls in _fields():
        groups[cls].add_argument("--" + f.name.replace("_", "-"), **_flag_options(f, cls))


def _flag_options(f: dataclasses.Field, cls) -> dict:
    """add_argument's keywords of the flag of field `f`: its type, or choices, from the field's kind."""
    kw = {"dest": f.name, "default": argparse.SUPPRESS, "help": _field_help(f, cls)}
    kind = _kind(f)
    if kind == "bool":
        kw["action"] = argparse.BooleanOptionalAction
    elif kind == "ints":
        kw.update(type=int_list, metavar="N,N")
    elif kind == "int":
        kw.update(type=int, metavar="N")
    elif kind == "float":
        kw.update(type=float, metavar="X")
    elif f.name in FIELD_CHOICES or f.metadata.get("choices"):  # a model's Settings field may name its choices
        kw.update(choices=FIELD_CHOICES.get(f.name) or f.metadata["choices"])
    else:
        kw.update(metavar="NAME")
    return kw


# ====================================================================================== config files


def _given(args) -> dict:
    """The options given on the command line (every train option defaults to SUPPRESS)."""
    return {k: v for k, v in vars(args).items() if k not in ("command", "func", "trust_code")}


def _coerce(values: dict, source: str) -> dict:
    """Type-check and convert config-file values to what the flags would give; report all problems."""
    kinds = {f.name: _kind(f) for f, _ in _fields()}
    known = set(kinds) | set(RUN_KEYS)
    problems = [f"unknown key {k!r}" for k in sorted(set(values) - known)]
    if problems:
        problems.append("known keys: " + ", ".join(k.replace("_", "-") for k in sorted(known)))
        raise ConfigError(problems, f"config file {source!r}")
    out = {}
    for key, v in values.items():
        kind = kinds.get(key, RUN_KINDS.get(key, "str"))
        try:
            out[key] = _coerce_value(key, kind, v)
        except (ValueError, argparse.ArgumentTypeError):
            want = {"ints": "a list of integers", "bool": "true or false", "int": "an integer",
                    "float": "a number"}.get(kind, "a string")
            problems.append(f"{key.replace('_', '-')} = {v!r} must be {want}")
    if problems:
        raise ConfigError(problems, f"config file {source!r}")
    return out


def _coerce_value(key: str, kind: str, v):
    """A config-file value as the flag of `kind` would give it; ValueError where it is not one."""
    if kind == "ints":
        if isinstance(v, str):
            return int_list(v)
        if isinstance(v, int) and not isinstance(v, bool):
            return (v,)
        if isinstance(v, (list, tuple)) and all(isinstance(i, int) and not isinstance(i, bool) for i in v):
            return tuple(v)
        raise ValueError
    if kind == "bool":
        if not isinstance(v, bool):
            raise ValueError
        return v
    if kind == "int":
        if isinstance(v, str):
            return int(v)
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError
        return v
    if kind == "float":
        if isinstance(v, str):  # YAML reads 1e-3 (no dot) as a string
            return float(v)
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise ValueError
        return v
    if key not in ("data_dir", "out", "dataset", "factors") and v is not None and not isinstance(v, str):
        raise ValueError
    return None if v is None else str(v)


# ============================================================================================== plan


def _is_builtin(dataset: str) -> bool:
    return str(dataset).strip().lower().replace("_", "-") in BUILTIN_DATASETS


def _dataset_id(dataset: str) -> str:
    """How a dataset is recorded in config.json: a built-in name, or an absolute path (so the run's
    commands work from any folder)."""
    if _is_builtin(dataset):
        return str(dataset).strip().lower().replace("_", "-")
    return os.path.abspath(os.path.expanduser(str(dataset)))


def _dataset_stem(dataset: str) -> str:
    return Path(str(dataset).rstrip("/\\")).stem or "data"


def _plan(given: dict) -> dict:
    """Resolve every setting of a `train` call: defaults < preset < config file < flags."""
    from vaelab.config import load_config_file

    settings = {}
    if "config" in given:
        settings = _coerce(load_config_file(given["config"]), given["config"])
    settings.update({k: v for k, v in given.items() if k not in ("config", "resume", "overwrite")})
    model_fields = {f.name for f, cls in _fields() if cls is not TrainConfig}
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    m_over = {k: v for k, v in settings.items() if k in model_fields}
    t_over = {k: v for k, v in settings.items() if k in train_fields}
    resume = bool(given.get("resume"))
    plan = (_plan_resume if resume else _plan_fresh)(settings, m_over, t_over)
    model_cfg, train_cfg, out = plan["model"], plan["train"], plan["out"]

    # a conditional model's condition_dim is the data's number of classes unless given: checked on the
    # data in cmd_train, so validate the rest here as if it were set
    condition_from_data = not resume and "condition_dim" not in m_over and model_cfg.condition_dim == 0 \
        and _is_conditional(model_cfg.model)
    checked = model_cfg.replace(condition_dim=1) if condition_from_data else model_cfg
    problems = checked.problems() + train_cfg.problems()  # every problem at once
    if problems:
        raise ConfigError(problems, "training settings")
    if not resume and _holds_run(out) and not given.get("overwrite"):
        raise VaelabError(f"{str(out)!r} already holds a run; continue it with --resume, start it afresh "
                          "with --overwrite, or choose another --out")
    return {**plan, "resume": resume, "pictures": settings.get("pictures", True),
            "condition_from_data": condition_from_data,
            **{k: settings.get(k) for k in ("tracker", "mlflow_uri", "mlflow_experiment")}}


def _plan_fresh(settings: dict, m_over: dict, t_over: dict) -> dict:
    """The settings of a new run: the preset's (or the defaults), overridden."""
    from vaelab.config import get_preset

    preset = settings.get("preset")
    if preset is None and "model" not in m_over:
        preset = DEFAULT_PRESET
    base = get_preset(preset) if preset is not None else None
    model_cfg = (base.model if base else ModelConfig()).replace(**m_over)
    train_cfg = (base.train if base else TrainConfig()).replace(**t_over)
    dataset = settings.get("dataset") or DEFAULT_DATASET
    if dataset == "digits" and "epochs" not in t_over:
        # 1,617 training images are 13 steps an epoch at batch 128: the tutorial's 10 epochs are too few
        # steps for a latent-2 VAE to leave the prior, so a newcomer's first run would draw blurs
        train_cfg = train_cfg.replace(epochs=DIGITS_EPOCHS)
    if train_cfg.kl_schedule != "constant" and not train_cfg.kl_warmup and "kl_warmup" not in t_over:
        # a schedule without its length: a quarter of the run (cyclical: the 4 cycles of Fu et al.)
        train_cfg = train_cfg.replace(kl_warmup=train_cfg.epochs / 4)
    out = Path(settings.get("out") or _default_out(preset or model_cfg.model, dataset))
    return {"model": model_cfg, "train": train_cfg, "preset": preset, "dataset": dataset,
            "data_dir": settings.get("data_dir"), "factors": settings.get("factors"), "out": out,
            "data_options": {k: settings[k] for k in DATA_OPTIONS if settings.get(k) is not None}}


def _plan_resume(settings: dict, m_over: dict, t_over: dict) -> dict:
    """The settings of a resumed run: its saved ones, where only the training settings (and the bounds of
    RESUMABLE_MODEL_FIELDS) may change."""
    preset, dataset = settings.get("preset"), settings.get("dataset")
    out = Path(settings.get("out") or _default_out(preset or m_over.get("model") or DEFAULT_PRESET,
                                                   dataset or DEFAULT_DATASET))
    saved, saved_m, saved_t = _saved_run(out)
    saved_data = saved.get("data") or {}
    conflicts = _resume_conflicts(saved, saved_m, preset, m_over, dataset, settings)
    if conflicts:
        raise ConfigError(conflicts + [f"drop these settings to resume {str(out)!r}, or start a new run "
                                       "with another --out"], "settings for --resume")
    saved_m, note = _model_class(saved_m.model).config_for_training(saved_m)  # what further training voids
    if note and int(os.environ.get("RANK", "0")) == 0:
        print(f"note: training {str(out)!r} further {note}", file=sys.stderr)
    t_over = {"progress": TrainConfig().progress, **t_over}  # how this session looks, not a saved setting
    saved_m = saved_m.replace(**{k: v for k, v in m_over.items() if k in RESUMABLE_MODEL_FIELDS})
    return {"model": saved_m, "train": saved_t.replace(**t_over), "preset": saved.get("preset"),
            "dataset": saved_data.get("dataset") or dataset or DEFAULT_DATASET,
            "data_dir": settings["data_dir"] if "data_dir" in settings else saved_data.get("data_dir"),
            "factors": settings["factors"] if "factors" in settings else saved_data.get("factors"),
            "saved_factors": "factors" not in settings, "out": out,
            "data_options": {k: settings[k] if k in settings else saved_data.get(k) for k in DATA_OPTIONS
                             if (settings[k] if k in settings else saved_data.get(k)) is not None}}


def _resume_conflicts(saved: dict, saved_m: ModelConfig, preset, m_over: dict, dataset, given: dict) -> list[str]:
    """The settings given to --resume that differ from the run's saved ones and may not change."""
    saved_data = saved.get("data") or {}
    conflicts = []
    if preset is not None and preset != saved.get("preset"):
        conflicts.append(f"preset {preset!r}: the run was trained with preset {saved.get('preset')!r}")
    for k, v in sorted(m_over.items()):
        if v != _model_value(saved_m, k) and k not in RESUMABLE_MODEL_FIELDS:
            conflicts.append(f"{k}={fmt_value(v)}: the run has {k}={fmt_value(_model_value(saved_m, k))}")
    if dataset is not None and saved_data.get("dataset") is not None \
            and _dataset_id(dataset) != saved_data["dataset"]:
        conflicts.append(f"dataset {dataset!r}: the run was trained on {saved_data['dataset']!r}")
    for k in PIXEL_OPTIONS:
        if k in given and given[k] != saved_data.get(k):
            conflicts.append(f"{k}={given[k]!r}: the run was trained with {k}={saved_data.get(k)!r}")
    return conflicts


def _model_class(name: str) -> type:
    from vaelab.models.registry import model_class

    return model_class(name)


def _is_conditional(model: str) -> bool:
    from vaelab.models import MODELS

    spec = MODELS.get(model)
    return spec is not None and spec.cls.capabilities.conditional


def _condition_dim(mc: ModelConfig, data, from_data: bool) -> ModelConfig:
    """A conditional model's condition_dim: the training data's number of classes unless given."""
    from vaelab.errors import DataError

    if not _is_conditional(mc.model):
        return mc
    train = data.train
    if train.y is None:
        raise DataError(f"model {mc.model!r} is conditional and trains on class labels, but dataset "
                        f"{data.name!r} has none; use a labelled dataset (digits, mnist, fashion-mnist, an "
                        "image folder with one sub-folder per class, an .npz with y, a .csv with a label "
                        "column) or an unconditional model (--model vae)")
    k = train.num_classes
    if from_data:
        return mc.replace(condition_dim=k)
    if k > mc.condition_dim:
        raise DataError(f"condition_dim={mc.condition_dim}, but dataset {data.name!r} has {k} classes; "
                        f"leave --condition-dim out (it is then {k}) or set it to at least {k}")
    return mc


def _default_out(name: str, dataset: str) -> str:
    return os.path.join("runs", f"{name}-{_dataset_stem(dataset)}")


def _holds_run(out: Path) -> bool:
    # config.json alone is what a run interrupted in its first epoch leaves: nothing worth keeping
    return (out / "checkpoint.safetensors").is_file() or (out / "model.safetensors").is_file()


def _saved_run(out: Path):
    """(config.json dict, ModelConfig, TrainConfig) of an existing run, for --resume."""
    from vaelab.training.checkpoint import model_config_from, read_config

    if not out.is_dir():
        raise VaelabError(f"cannot resume: run directory {str(out)!r} does not exist; start without --resume "
                          "(or pass the run's --out)")
    saved = read_config(out)
    model_cfg = model_config_from(saved, str(out / "config.json"))
    try:
        train_cfg = TrainConfig.from_dict(dict(saved.get("train") or {}))
    except (ConfigError, TypeError) as e:
        raise VaelabError(f"cannot resume {str(out)!r}: its saved training settings do not fit this vaelab "
                          f"({e})") from None
    return saved, model_cfg, train_cfg


# ============================================================================================== train


def cmd_train(args) -> int:
    plan = _plan(_given(args))
    tracker = _tracker(plan)  # before the data loads: a missing package or an unreachable server fails at once
    import torch

    from vaelab.data import load_dataset
    from vaelab.models import build_model

    mc, tc, out = plan["model"], plan["train"], plan["out"]
    data = _with_factors(load_dataset(plan["dataset"], plan["data_dir"], progress=tc.progress,
                                      **plan["data_options"]), plan)
    mc = _condition_dim(mc, data, plan["condition_from_data"])
    if tc.threads:
        torch.set_num_threads(tc.threads)
    torch.manual_seed(tc.seed)  # the initial weights
    model = build_model(mc, input_shape=data.train.sample_shape, trust_code=getattr(args, "trust_code", False))
    name = plan["preset"] or mc.model
    epochs_before = _epochs_done(out) if plan["resume"] else 0
    _announce(plan, model, data, name, epochs_before)
    with tracker if tracker is not None else contextlib.nullcontext():  # ends the tracked run, FAILED on errors
        t0 = time.perf_counter()
        history = _fit(model, data, plan, _run_info(plan, model, data), tracker)
        seconds = time.perf_counter() - t0
        if int(os.environ.get("RANK", "0")) != 0:
            return 0  # under torchrun, rank 0 alone reports, evaluates and draws; the other ranks are done
        _report_training(history, epochs_before, tc, plan["resume"], seconds)
        _finish(model, data, tc, out, name, plan["pictures"])
        if tracker is not None and tracker.started:  # the pictures and the test split's numbers, as files
            tracker.log_files(sorted(out.glob("*.png")), "pictures")
            tracker.log_files([out / "evaluation.json"])
            print(f"tracked in {tracker.name}: {tracker.where()}")
    return 0


def _tracker(plan: dict):
    """The tracker of --tracker, on rank 0 alone (the process that writes the files); on --resume without
    --tracker, the one the run uses (its tracking.json), on its MLflow server unless --mlflow-uri is given."""
    from vaelab.training.tracking import make_tracker, read_tracking

    if int(os.environ.get("RANK", "0")) != 0:
        return None
    name, uri = plan["tracker"], plan["mlflow_uri"]
    saved = (read_tracking(plan["out"]) or {}) if plan["resume"] else {}
    if name is None:
        name = saved.get("tracker")
    if name == "mlflow" and uri is None and saved.get("tracker") == "mlflow":
        uri = saved.get("tracking_uri")
    return make_tracker(name, mlflow_uri=uri, mlflow_experiment=plan["mlflow_experiment"])


def _with_factors(data, plan: dict):
    """The data with the factors of --factors, checked before training so that a wrong file fails at once. A
    resumed run's own factors file that is gone or broken is only a warning (training needs no factors): the run
    then forgets it."""
    from vaelab.data import attach_factors
    from vaelab.errors import DataError

    if plan["factors"] is None:
        return data
    try:
        return attach_factors(data, plan["factors"])
    except DataError as e:
        if not plan.get("saved_factors"):
            raise
        print(f"vaelab: warning: the run's factors file is not usable ({e}); training on without factors",
              file=sys.stderr)
        plan["factors"] = None
        return data


def _announce(plan: dict, model, data, name: str, epochs_before: int) -> None:
    """The line that says what is trained on what, and where it goes (rank 0 only)."""
    tc = plan["train"]
    verb = f"resuming {name} after epoch {epochs_before}" if plan["resume"] else f"training {name}"
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if int(os.environ.get("RANK", "0")) == 0:
        ranks = f" on {world} processes (global batch {tc.batch_size})" if world > 1 else ""
        print(f"{verb} ({_describe_model(model)}) on {data.name}: {len(data.train)} train / {len(data.test)} "
              f"test samples of shape {tuple(data.train.sample_shape)}, {_plural(tc.epochs, 'epoch')}{ranks} "
              f"-> {plan['out']}", flush=True)


def _run_info(plan: dict, model, data) -> dict:
    """What config.json records besides the model and training settings: the data, and the preset."""
    info = {"data": {"dataset": _dataset_id(plan["dataset"]),
                     "data_dir": None if plan["data_dir"] is None
                     else os.path.abspath(os.path.expanduser(str(plan["data_dir"]))),
                     "factors": None if plan["factors"] is None
                     else os.path.abspath(os.path.expanduser(str(plan["factors"]))),
                     "binarize": plan["train"].binarize, **plan["data_options"]},
            "preset": plan["preset"]}
    if model.capabilities.conditional:  # what each label means, for the pictures and --label NAME of later commands
        info["data"]["classes"] = class_names(data.train.classes, model.config.condition_dim)
    return info


def _fit(model, data, plan: dict, run_info: dict, tracker=None) -> list[dict]:
    """Train (fit), turning Ctrl-C into an Interrupted that says whether there is a checkpoint to resume."""
    from vaelab.training import fit

    out = plan["out"]
    try:
        return fit(model, data.train, data.test, plan["train"], out=out, resume=plan["resume"], run_info=run_info,
                   tracker=tracker)
    except KeyboardInterrupt:
        if (out / "checkpoint.safetensors").is_file():
            raise Interrupted(f"the last checkpoint (its epoch's end, or --checkpoint-every step) in "
                              f"{str(out)!r} is intact; continue with: vaelab train --resume --out {out}") \
                from None
        raise Interrupted("no checkpoint had been written yet (at an epoch's end, or every --checkpoint-every "
                          "steps), so there is nothing to resume from") from None


def _report_training(history: list[dict], epochs_before: int, tc: TrainConfig, resume: bool,
                     seconds: float) -> None:
    if not tc.progress and len(history) > epochs_before:
        _print_history(history[epochs_before:])
    done = len(history)
    if done == epochs_before and resume:
        print(f"the run already has {done} epochs (--epochs {tc.epochs}); nothing to train: raise --epochs "
              "to continue")
    else:
        stopped = f" (early stopping after {done})" if done < tc.epochs else ""
        print(f"trained epochs {epochs_before + 1}..{done}{stopped} in {seconds:.1f} s")


def _finish(model, data, tc: TrainConfig, out: Path, name: str, pictures: bool) -> None:
    """Evaluate the trained model on the test split, draw the pictures, and list what the run holds."""
    from vaelab.evaluation import evaluate

    metrics = evaluate(model, data.test, batch_size=max(tc.batch_size, 256), binarize=tc.binarize)
    written = [str(out / f) for f in RUN_FILES if (out / f).is_file()]
    written.append(write_evaluation(out / "evaluation.json", metrics, "test", data.name))
    print()
    print_terms(metrics, f"test split of {data.name}, {metrics['n']} samples", model.term_meanings)
    if pictures:
        from vaelab.cli.drawing import run_pictures

        written += run_pictures(model, data, out, name)
    print()
    print_written(written)


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _describe_model(model) -> str:
    c = model.config
    latent = "x".join(str(s) for s in model.latent_shape)
    cond = f", conditioned on {c.condition_dim} classes" if model.capabilities.conditional else ""
    return f"{c.model}, arch {model.arch}, latent {latent}, {c.likelihood}{cond}"


def _epochs_done(out: Path) -> int:
    path = out / "metrics.jsonl"
    if not path.is_file():
        return 0
    return sum(1 for line in path.read_text(encoding="utf-8").splitlines() if line.strip())


def _print_history(rows: list[dict]) -> None:
    keys = ["epoch"] + [k for k in ("train_loss", "val_loss", "time_s") if k in rows[0]]
    table = [[k.replace("val_", "test_") for k in keys]]
    table += [[str(r[k]) if k == "epoch" else fmt_number(r[k]) for k in keys] for r in rows]
    print_table(table)
