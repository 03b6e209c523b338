"""The `vaelab` command line: train a run, evaluate it, and draw pictures of it.

    vaelab train                                   # the tutorial's VAE (preset seed-vae) on digits
    vaelab train --preset seed-conv-ae --dataset mnist --epochs 5
    vaelab sample runs/seed-vae-digits --n 64

Start-up stays light: this module imports only the standard library and `vaelab.config` (itself stdlib
only); torch, numpy and matplotlib are imported inside the commands that use them, so `vaelab --help`
answers at once. The `train` flags are generated from the fields of ModelConfig and TrainConfig, so a new
field gets its flag (and its config-file key) without touching this file.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import sys
import textwrap
import time
from pathlib import Path

from vaelab.config import ARCHS, KL_SCHEDULES, LIKELIHOODS, LR_SCHEDULES, NOISES, PRESETS, ModelConfig, TrainConfig
from vaelab.errors import ConfigError, VaelabError

DEFAULT_PRESET = "seed-vae"
DEFAULT_DATASET = "digits"
BUILTIN_DATASETS = ("digits", "mnist", "fashion-mnist")  # as vaelab.data.DATASETS (importing it needs torch)

# Help for the generated flags, keyed by field name. A field missing here still gets a flag.
DIGITS_EPOCHS = 100  # the default --epochs on the small digits dataset

FIELD_HELP = {
    "model": "a registered model: vae, ae, cvae, hvae, m2 or vqvae (`vaelab models` lists them); without "
             "--preset it starts from the ModelConfig defaults",
    "arch": "network: conv (stride-2 convs, dense latent), conv-pool (conv + max-pool, spatial latent), "
            "mlp (dense layers), or auto (conv for images, mlp for vectors)",
    "latent_dim": "size of the latent vector (arch conv and mlp)",
    "channels": "conv channels, one per down-sampling layer, comma-separated (e.g. 32,64)",
    "hidden": "dense layer sizes before the latent, comma-separated (e.g. 256 or 512,256; '' for none)",
    "likelihood": "the decoder's output distribution: bernoulli (binary cross-entropy; data in [0, 1]) "
                  "or gaussian (squared error)",
    "gaussian_sigma": "fixed standard deviation of the gaussian likelihood",
    "logvar_min": "lower bound of the posterior's log-variance (VAE family; values inside the bounds pass "
                  "unchanged; may change on --resume)",
    "logvar_max": "upper bound of the posterior's log-variance: lower it (e.g. 10) when a run stops on a "
                  "non-finite loss (may change on --resume)",
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
    "precision": "floating-point precision of training and its validation (bf16: mixed precision, fp32 weights)",
    "labels": "semi-supervised training (--model m2): keep this many training labels, balanced over the "
              "classes and chosen with --seed, and hide the rest; every batch mixes both kinds (0 = keep all)",
}
FIELD_CHOICES = {"arch": ARCHS, "likelihood": LIKELIHOODS, "noise": NOISES, "kl_schedule": KL_SCHEDULES,
                 "lr_schedule": LR_SCHEDULES}
# model settings a resumed run may change: they bound values, they shape no weight
RESUMABLE_MODEL_FIELDS = ("logvar_min", "logvar_max")
NOT_FLAGS = {"input_shape", "settings"}  # set from the data, never by hand; the model's own settings get flags below
SETTINGS = "model's own settings"  # the group of the flags made from the registered models' Settings fields
# config-file keys besides the ModelConfig/TrainConfig fields (the same names as the flags)
RUN_KEYS = ("preset", "dataset", "data_dir", "out", "pictures")

TERM_MEANINGS = {
    "loss": "training objective per sample (recon + beta*KL for a VAE), nats",
    "recon": "reconstruction negative log-likelihood per sample, nats",
    "kl": "KL(q(z|x) || N(0, I)) per sample, nats (hvae: of both layers, KL(q(z1,z2|x) || p(z1,z2)))",
    "kl_top": "hvae: KL(q(z2|z1) || N(0, I)) of the top layer per sample, nats",
    "elbo": "evidence lower bound, -(recon + KL), nats",
    "bce": "binary cross-entropy per pixel (Keras' binary_crossentropy)",
    "mse": "squared error per pixel",
    "iwae": "importance-weighted bound log p(x) >= IWAE_K per sample, nats (training with --iw-samples K)",
    "elbo_bits_per_dim": "-ELBO in bits per dimension",
    "psnr": "peak signal-to-noise ratio of the posterior-mean reconstruction, dB",
    "nll": "importance-sampled -log p(x) per sample, nats",
    "nll_se": "standard error of nll, nats",
    "nll_bits_per_dim": "nll in bits per dimension",
    "active_units": "latent dimensions whose posterior mean varies with x (variance > 0.01)",
    "latent_dims": "latent dimensions in all",
    "bottom_active_units": "hvae: active dimensions of the bottom layer z1 (the rows above are the top layer z2's)",
    "bottom_latent_dims": "hvae: dimensions of the bottom layer z1",
    "commitment": "a VQ-VAE's ||z_e - e||^2 per sample: how far the encoder's outputs lie from their codes",
    "perplexity": "exp(entropy) of how often each code is chosen: K when all K codes are used equally, 1 when "
                  "one code takes everything",
    "codes_used": "fraction of the codebook chosen at least once",
    "dead_codes": "codes never chosen",
    "accuracy": "fraction of the split the classifier q(y|x) labels correctly (argmax)",
    "error": "fraction of the split the classifier q(y|x) labels wrongly (1 - accuracy)",
    "classifier_nll": "-log q(y|x) of the true label per sample, nats",
    "entropy": "entropy of the classifier's q(y|x) per sample, nats",
}

RUN_FILES = ("config.json", "metrics.jsonl", "checkpoint.safetensors", "model.safetensors")
TRAVERSE_ROWS = 20  # latent dimensions a traversal shows by default (the most informative ones)
GRID_CLASSES = 30  # rows of a conditional model's class-by-sample grid, at most


# ============================================================================================ the parser


def _settings_fields() -> list[dataclasses.Field]:
    """The fields of every registered model's Settings that get a flag (one flag per name: two models with a
    setting of the same name, such as beta, share it); a field's metadata may say flag=False."""
    from vaelab.models import MODELS

    seen: dict[str, dataclasses.Field] = {}
    for name in sorted(MODELS):
        for f in dataclasses.fields(MODELS[name].cls.Settings):
            if f.metadata.get("flag", True) and f.name not in seen and f.name not in NOT_FLAGS:
                seen[f.name] = f
    return list(seen.values())


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


def _int_list(text: str) -> tuple[int, ...]:
    """argparse type of tuple fields: '32,64' -> (32, 64); '' -> ()."""
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    try:
        return tuple(int(p) for p in parts)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers such as 32,64, got {text!r}") \
            from None


def _fmt_value(v) -> str:
    if isinstance(v, tuple):
        return ",".join(str(i) for i in v) or "''"
    if isinstance(v, bool):
        return "on" if v else "off"
    return str(v)


def _field_help(f: dataclasses.Field, cls: type) -> str:
    default = _field_default(f)
    parts = [f"default {_fmt_value(default)}"]
    for p in PRESETS.values():  # where a preset differs from the default, say so
        if cls is SETTINGS:
            v = p.model.settings.get(f.name, default)
        else:
            v = getattr(p.model if cls is ModelConfig else p.train, f.name)
        if v != default:
            parts.append(f"{p.name}: {_fmt_value(v)}")
    text = f.metadata.get("help") or FIELD_HELP.get(f.name, f.name.replace("_", " "))
    return f"{text} [{'; '.join(parts)}]".replace("%", "%%")


def _add_field_flags(parser: argparse.ArgumentParser) -> None:
    groups = {ModelConfig: parser.add_argument_group("model settings (ModelConfig; saved with the weights)"),
              SETTINGS: parser.add_argument_group("each model's own settings (saved with the weights; `vaelab models` "
                                                  "says which model has which)"),
              TrainConfig: parser.add_argument_group("training settings (TrainConfig)")}
    for f, cls in _fields():
        flag = "--" + f.name.replace("_", "-")
        kw = {"dest": f.name, "default": argparse.SUPPRESS, "help": _field_help(f, cls)}
        kind = _kind(f)
        if kind == "bool":
            kw["action"] = argparse.BooleanOptionalAction
        elif kind == "ints":
            kw.update(type=_int_list, metavar="N,N")
        elif kind == "int":
            kw.update(type=int, metavar="N")
        elif kind == "float":
            kw.update(type=float, metavar="X")
        elif f.name in FIELD_CHOICES:
            kw.update(choices=FIELD_CHOICES[f.name])
        else:
            kw.update(metavar="NAME")
        groups[cls].add_argument(flag, **kw)


class _Formatter(argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog):
        width = min(shutil.get_terminal_size((100, 24)).columns, 110)
        super().__init__(prog, max_help_position=30, width=width)

    def _split_lines(self, text, width):  # keep names like seed-conv-ae whole
        return textwrap.wrap(" ".join(text.split()), width, break_on_hyphens=False)


def _sub(subs, name: str, summary: str, description: str, epilog: str | None = None):
    return subs.add_parser(name, help=summary, description=textwrap.dedent(description).strip(),
                           epilog=textwrap.dedent(epilog).strip() if epilog else None,
                           formatter_class=_Formatter)


def _add_run_arg(p, dataset: bool = True) -> None:
    p.add_argument("run", metavar="RUN", help="a run directory written by `vaelab train` (its --out)")
    if dataset:
        p.add_argument("--dataset", metavar="NAME_OR_PATH", default=None,
                       help="use this dataset instead of the one the run was trained on")
    p.add_argument("--data-dir", metavar="DIR", default=None,
                   help="folder holding the dataset files, if they moved since training")


def build_parser() -> argparse.ArgumentParser:
    from vaelab import __version__

    parser = argparse.ArgumentParser(
        prog="vaelab", formatter_class=_Formatter,
        description="Train autoencoders and VAEs, evaluate them, and draw their latent spaces.",
        epilog=textwrap.dedent("""
            typical session:
              vaelab train                             # the tutorial's VAE (preset seed-vae) on digits
              vaelab train --preset seed-vae --dataset mnist --epochs 30 --out runs/vae-mnist
              vaelab sample runs/vae-mnist --n 100
              vaelab manifold runs/vae-mnist

            the model family (one loop, one run format):
              vaelab train --model vae --beta 4 --kl-schedule cyclical --kl-warmup 2 --dataset mnist --out runs/bvae
              vaelab traverse runs/bvae                # one row per latent dimension, most informative first
              vaelab train --model ae --noise gaussian --noise-level 0.5 --dataset fashion-mnist --out runs/dae
              vaelab train --model cvae --dataset mnist --out runs/cvae
              vaelab sample runs/cvae --label 3        # (without --label: one row per class)
              vaelab train --preset m2 --labels 100 --dataset mnist --out runs/m2   # semi-supervised: 100 labels
              vaelab train --model vae --iw-samples 5 --dataset mnist --out runs/iwae
              vaelab train --model vqvae --codebook-size 64 --dataset mnist --out runs/vq
              vaelab train-prior runs/vq               # a VQ-VAE generates through a prior over its codes
              vaelab sample runs/vq --n 64

            `vaelab COMMAND --help` says what each command does and writes.""").strip())
    parser.add_argument("--version", action="version", version=f"vaelab {__version__}")
    subs = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    # ------------------------------------------------------------------------------------------ train
    p = _sub(subs, "train", "train a model and write a run directory", """
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

        Models: vae (beta != 1 makes a beta-VAE; --kl-schedule, --capacity and --free-bits shape its KL
        term; --iw-samples K > 1 trains on the IWAE bound), ae (with --noise: a denoising autoencoder), and
        cvae (a VAE conditioned on the class label; its --condition-dim is the data's number of classes), and
        m2 (Kingma et al.'s semi-supervised VAE: a classifier q(y|x) beside a CVAE; --labels N hides all but
        N training labels, evaluation.json reports the classifier's test accuracy and error, and the pictures
        add analogies.png: test images' styles drawn as every class; --preset m2 is a recipe for MNIST).

        Settings, later ones winning: the ModelConfig/TrainConfig defaults < --preset < --config FILE
        < explicit flags. Without --preset and --model the preset is seed-vae; the dataset is digits
        (scikit-learn's 8x8 digits, offline).""", """
        examples:
          vaelab train --preset seed-conv-ae --dataset mnist --data-dir ~/data --epochs 10
          vaelab train --model vae --arch mlp --latent-dim 8 --hidden 512,256 --beta 4
          vaelab train --model cvae --dataset mnist --epochs 10 --out runs/cvae
          vaelab train --model ae --noise gaussian --noise-level 0.5 --dataset fashion-mnist
          vaelab train --config my.toml --epochs 3        # keys mirror the flags: latent-dim = 3
          vaelab train --out runs/x --resume --epochs 20  # continue runs/x up to epoch 20""")
    run = p.add_argument_group("run")
    run.add_argument("--preset", choices=sorted(PRESETS), default=argparse.SUPPRESS,
                     help="start from a named preset (`vaelab models` describes them) [default seed-vae "
                          "unless --model is given]")
    run.add_argument("--dataset", metavar="NAME_OR_PATH", default=argparse.SUPPRESS,
                     help="digits, mnist, fashion-mnist, or a path to a .npy/.npz/.csv file or an image "
                          "folder [default digits]")
    run.add_argument("--data-dir", metavar="DIR", default=argparse.SUPPRESS,
                     help="folder holding the mnist/fashion-mnist files (or one sub-folder per dataset) "
                          "[default $VAELAB_DATA, then the download cache]")
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
    run.add_argument("--no-pictures", dest="pictures", action="store_false", default=argparse.SUPPRESS,
                     help="skip the PNG pictures after training")
    _add_field_flags(p)
    p.set_defaults(func=cmd_train)

    # ------------------------------------------------------------------------------------- evaluate
    p = _sub(subs, "evaluate", "loss terms of a run on its test (or train) split", """
        Compute the loss terms of RUN's model on a split of its dataset, print them as a table, and write
        them to RUN/evaluation.json (RUN/evaluation-train.json for --split train).""")
    _add_run_arg(p)
    p.add_argument("--split", choices=("test", "train"), default="test", help="which split [default test]")
    p.add_argument("--batch-size", type=int, default=512, metavar="N", help="evaluation batch size [default 512]")
    p.add_argument("--out", metavar="FILE", default=None, help="JSON file to write instead")
    p.add_argument("--nll-samples", type=int, default=0, metavar="K",
                   help="add the importance-sampled negative log-likelihood with K samples per image (`nll`, "
                        "nats, with its standard error; the literature's MNIST protocol uses 5000) [default 0 = off]")
    p.add_argument("--binarize", choices=("run", "dynamic", "none"), default="run",
                   help="binarize the split with a fixed seed (dynamic; the NLL protocol of the literature), or "
                        "not (none); run = as the run was trained [default run]")
    p.add_argument("--probes", action="store_true",
                   help="also fit a linear probe and 5-NN on the train split's latents and report their test "
                        "accuracy (labelled data)")
    p.set_defaults(func=cmd_evaluate)

    # ---------------------------------------------------------------------------------- reconstruct
    p = _sub(subs, "reconstruct", "originals over their reconstructions (PNG)", """
        Draw the first N test images (top row) over their reconstructions (bottom row): each is decoded
        from its posterior mean. Writes RUN/reconstructions.png (or --out).""")
    _add_run_arg(p)
    p.add_argument("--n", type=int, default=10, metavar="N", help="how many images [default 10]")
    p.add_argument("--out", metavar="FILE", default=None, help="PNG file to write instead")
    p.set_defaults(func=cmd_reconstruct)

    # --------------------------------------------------------------------------------------- sample
    p = _sub(subs, "sample", "new images decoded from the prior (PNG; VAEs, VQ-VAEs after train-prior)", """
        Decode N draws z ~ N(0, I) from the prior into new images, in a square-ish grid. Needs a model
        with a prior (a VAE). Writes RUN/samples.png (or --out).

        A conditional model (cvae) draws N samples of class --label, or without --label a class-by-sample
        grid: one row per class, N samples per row, each column decoding the same z for every class. The
        semi-supervised m2 then also writes RUN/analogies.png: test images (left) with each one's style z
        decoded as every class along its row.

        A VQ-VAE draws code grids from the prior that `vaelab train-prior RUN` fitted to its codes; a
        class-conditional prior (labelled data) draws class --label, or without it the classes in order.""",
        """
        examples:
          vaelab sample runs/vae-mnist --n 100
          vaelab sample runs/cvae --label 3          # 64 samples of the digit 3
          vaelab sample runs/cvae-fashion --label Sneaker
          vaelab sample runs/cvae --n 8               # 10 rows (classes) of 8 samples
          vaelab train-prior runs/vq && vaelab sample runs/vq --label 7   # a VQ-VAE, through its code prior""")
    _add_run_arg(p, dataset=False)
    p.add_argument("--n", type=int, default=None, metavar="N",
                   help="how many samples [default 64; a conditional model's class grid: per class, default 10]")
    p.add_argument("--label", metavar="CLASS", default=None,
                   help="conditional models (and a VQ-VAE's class-conditional prior): the class to draw, by "
                        "index (0..K-1) or by name")
    p.add_argument("--seed", type=int, default=0, metavar="N", help="random seed of the draws [default 0]")
    p.add_argument("--out", metavar="FILE", default=None, help="PNG file to write instead")
    p.set_defaults(func=cmd_sample)

    # ------------------------------------------------------------------------------------- manifold
    p = _sub(subs, "manifold", "decoded grid over two latent dimensions (PNG)", """
        Decode an N x N grid of latent vectors and draw it as one picture whose axes give the latent values
        (the Keras tutorial's plot_latent_space). For a VAE the two dimensions run over [-LIMIT, LIMIT] and
        the others stay at 0; for an autoencoder they span the 1st..99th percentile of the test latents and
        the others sit at their mean. Needs a vector latent. Writes RUN/manifold.png (or --out).""")
    _add_run_arg(p)
    p.add_argument("--n", type=int, default=15, metavar="N", help="images per side [default 15]")
    p.add_argument("--limit", type=float, default=4.0, metavar="X",
                   help="a VAE's grid spans [-X, X] in both dimensions [default 4]")
    p.add_argument("--dims", type=_int_list, default=(0, 1), metavar="I,J",
                   help="the two latent dimensions to vary (x axis, y axis) [default 0,1]")
    p.add_argument("--label", metavar="CLASS", default=None,
                   help="conditional models: the class whose manifold to draw, by index or name [default 0; "
                        "the title names it]")
    p.add_argument("--out", metavar="FILE", default=None, help="PNG file to write instead")
    p.set_defaults(func=cmd_manifold)

    # ---------------------------------------------------------------------------------- interpolate
    p = _sub(subs, "interpolate", "latent walks between pairs of test images (PNG)", """
        Pick PAIRS pairs of test images (seeded; of different classes where labels exist) and decode
        STEPS points on the latent path between their posterior means, one pair per row: the first and
        last images of a row decode the two means themselves (the two reconstructions). Writes
        RUN/interpolation.png (or --out).

        --method linear walks the straight line; --method slerp the great circle between the two latents
        (spherical interpolation: the norm changes linearly along the arc, so the walk stays at the
        radius where a Gaussian prior's mass lies instead of cutting through its centre; White 2016).

        A conditional model (cvae) encodes each image with its own label, and the label's one-hot vector
        moves linearly from the first image's class to the second's along with z, so both ends are true
        reconstructions and the middle morphs the class as well as the style.""")
    _add_run_arg(p)
    p.add_argument("--steps", type=int, default=10, metavar="N", help="images per row, end points included "
                                                                       "[default 10]")
    p.add_argument("--pairs", type=int, default=4, metavar="N", help="rows [default 4]")
    p.add_argument("--method", choices=("linear", "slerp"), default="linear",
                   help="straight line or great circle (slerp) between the latents [default linear]")
    p.add_argument("--seed", type=int, default=0, metavar="N", help="which pairs [default 0]")
    p.add_argument("--out", metavar="FILE", default=None, help="PNG file to write instead")
    p.set_defaults(func=cmd_interpolate)

    # ------------------------------------------------------------------------------------- traverse
    p = _sub(subs, "traverse", "latent traversals, one row per latent dimension (PNG, VAEs)", """
        Encode one test image (--index) and sweep each latent dimension in turn over STEPS values in
        [-RANGE, RANGE] (in units of the N(0, I) prior) while the other dimensions stay at the image's
        posterior mean: one row per dimension, the picture of a beta-VAE paper (Higgins et al. 2017).
        Rows are sorted by the dimension's mean KL on the test set, most informative first, and labelled
        with the dimension and its KL in nats; dimensions with a KL near 0 are ones the model does not
        use (their rows do not change). Needs a VAE with a vector latent. A conditional model decodes
        with the image's label. Writes RUN/traversal.png (or --out).""")
    _add_run_arg(p)
    p.add_argument("--range", dest="limit", type=float, default=3.0, metavar="X",
                   help="each dimension sweeps [-X, X] [default 3]")
    p.add_argument("--steps", type=int, default=11, metavar="N", help="images per row [default 11]")
    p.add_argument("--index", type=int, default=0, metavar="I", help="which test image [default 0]")
    p.add_argument("--top", type=int, default=TRAVERSE_ROWS, metavar="N",
                   help=f"show the N dimensions with the most KL [default {TRAVERSE_ROWS}; 0 = all]")
    p.add_argument("--out", metavar="FILE", default=None, help="PNG file to write instead")
    p.set_defaults(func=cmd_traverse)

    # --------------------------------------------------------------------------------------- encode
    p = _sub(subs, "encode", "latent means of a split to .npy, with a scatter plot", """
        Encode every sample of a split and save the posterior means, flattened per sample, as a float32
        .npy array (N, latent_size): RUN/latents.npy for the test split, RUN/latents-SPLIT.npy otherwise
        (or --out). Beside it: the labels as FILE.labels.npy (int64, when the data has labels) and a 2-D
        scatter plot FILE.png coloured by label (latents of more than 2 dimensions are projected on their
        first two principal components, or embedded by t-SNE with --projection tsne).

        --indices (VQ-VAE runs): save the code indices instead, an int64 array (N, H, W) of the grid of
        codes each sample is quantized to, as RUN/codes.npy (RUN/codes-SPLIT.npy; or --out), with the labels
        beside it. model.decode_indices() decodes them to exactly the model's reconstructions.""")
    _add_run_arg(p)
    p.add_argument("--split", choices=("test", "train", "all"), default="test",
                   help="which samples; all = train then test [default test]")
    p.add_argument("--batch-size", type=int, default=512, metavar="N", help="encoding batch size [default 512]")
    p.add_argument("--out", metavar="FILE.npy", default=None, help=".npy file to write instead")
    p.add_argument("--indices", action="store_true", help="VQ-VAE runs: write the code indices (N, H, W)")
    p.add_argument("--projection", choices=("pca", "tsne"), default="pca",
                   help="how latents of more than 2 dimensions are drawn in 2-D: their first two principal "
                        "components, or a t-SNE embedding (slower: about a minute for 10,000 samples) [default pca]")
    p.set_defaults(func=cmd_encode)

    # --------------------------------------------------------------------------------------- models
    p = _sub(subs, "models", "list the registered models and presets", """
        List the registered models (train with --model NAME) and the named presets (--preset NAME).""")
    p.set_defaults(func=cmd_models)

    # ------------------------------------------------------------------------- anomaly detection
    from vaelab.anomaly import add_detect_parser, add_one_class_parser  # light: no torch at import

    add_detect_parser(subs)
    add_one_class_parser(subs)

    # ---------------------------------------------------------------------- a VQ-VAE's code prior
    from vaelab.prior import add_train_prior_parser  # light: no torch at import

    add_train_prior_parser(subs)
    return parser


# ========================================================================================= entry point


class _Interrupted(KeyboardInterrupt):
    """Ctrl-C during training, carrying a hint about the checkpoint."""


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as e:  # --help and --version (0), usage errors (2)
        return e.code if isinstance(e.code, int) else (0 if e.code is None else 2)
    try:
        return int(args.func(args) or 0)
    except VaelabError as e:
        sys.stdout.flush()
        print(f"vaelab: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt as e:
        sys.stdout.flush()
        hint = f" ({e.args[0]})" if isinstance(e, _Interrupted) and e.args else ""
        print(f"\nvaelab: interrupted{hint}", file=sys.stderr)
        return 130


# ============================================================================================== train


def _given(args) -> dict:
    """The options given on the command line (every train option defaults to SUPPRESS)."""
    return {k: v for k, v in vars(args).items() if k not in ("command", "func")}


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
        kind = kinds.get(key, "bool" if key == "pictures" else "str")
        try:
            if kind == "ints":
                if isinstance(v, str):
                    v = _int_list(v)
                elif isinstance(v, int) and not isinstance(v, bool):
                    v = (v,)
                elif isinstance(v, (list, tuple)) and all(isinstance(i, int) and not isinstance(i, bool)
                                                          for i in v):
                    v = tuple(v)
                else:
                    raise ValueError
            elif kind == "bool":
                if not isinstance(v, bool):
                    raise ValueError
            elif kind == "int":
                if isinstance(v, str):
                    v = int(v)
                elif isinstance(v, bool) or not isinstance(v, int):
                    raise ValueError
            elif kind == "float":
                if isinstance(v, str):  # YAML reads 1e-3 (no dot) as a string
                    v = float(v)
                elif isinstance(v, bool) or not isinstance(v, (int, float)):
                    raise ValueError
            elif key not in ("data_dir", "out", "dataset") and v is not None and not isinstance(v, str):
                raise ValueError
            elif v is not None:
                v = str(v)
        except (ValueError, argparse.ArgumentTypeError):
            want = {"ints": "a list of integers", "bool": "true or false", "int": "an integer",
                    "float": "a number"}.get(kind, "a string")
            problems.append(f"{key.replace('_', '-')} = {v!r} must be {want}")
            continue
        out[key] = v
    if problems:
        raise ConfigError(problems, f"config file {source!r}")
    return out


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
    from vaelab.config import get_preset, load_config_file

    settings = {}
    if "config" in given:
        settings = _coerce(load_config_file(given["config"]), given["config"])
    settings.update({k: v for k, v in given.items() if k not in ("config", "resume", "overwrite")})
    model_fields = {f.name for f, cls in _fields() if cls is not TrainConfig}
    train_fields = {f.name for f in dataclasses.fields(TrainConfig)}
    m_over = {k: v for k, v in settings.items() if k in model_fields}
    t_over = {k: v for k, v in settings.items() if k in train_fields}
    preset = settings.get("preset")
    resume = bool(given.get("resume"))
    dataset = settings.get("dataset")

    if resume:
        out = Path(settings.get("out") or _default_out(preset or m_over.get("model") or DEFAULT_PRESET,
                                                       dataset or DEFAULT_DATASET))
        saved, saved_m, saved_t = _saved_run(out)
        saved_data = saved.get("data") or {}
        conflicts = []
        if preset is not None and preset != saved.get("preset"):
            conflicts.append(f"preset {preset!r}: the run was trained with preset {saved.get('preset')!r}")
        for k, v in sorted(m_over.items()):
            if v != _model_value(saved_m, k) and k not in RESUMABLE_MODEL_FIELDS:
                conflicts.append(f"{k}={_fmt_value(v)}: the run has {k}={_fmt_value(_model_value(saved_m, k))}")
        if dataset is not None and saved_data.get("dataset") is not None \
                and _dataset_id(dataset) != saved_data["dataset"]:
            conflicts.append(f"dataset {dataset!r}: the run was trained on {saved_data['dataset']!r}")
        if conflicts:
            raise ConfigError(conflicts + [f"drop these settings to resume {str(out)!r}, or start a new run "
                                           "with another --out"], "settings for --resume")
        saved_m, note = _model_class(saved_m.model).config_for_training(saved_m)  # what further training voids
        if note and int(os.environ.get("RANK", "0")) == 0:
            print(f"note: training {str(out)!r} further {note}", file=sys.stderr)
        dataset = saved_data.get("dataset") or dataset or DEFAULT_DATASET
        data_dir = settings["data_dir"] if "data_dir" in settings else saved_data.get("data_dir")
        t_over.setdefault("progress", TrainConfig().progress)  # how this session looks, not a saved setting
        saved_m = saved_m.replace(**{k: v for k, v in m_over.items() if k in RESUMABLE_MODEL_FIELDS})
        model_cfg, train_cfg, preset = saved_m, saved_t.replace(**t_over), saved.get("preset")
    else:
        if preset is None and "model" not in m_over:
            preset = DEFAULT_PRESET
        base = get_preset(preset) if preset is not None else None
        model_cfg = (base.model if base else ModelConfig()).replace(**m_over)
        train_cfg = (base.train if base else TrainConfig()).replace(**t_over)
        dataset = dataset or DEFAULT_DATASET
        if dataset == "digits" and "epochs" not in t_over:
            # 1,617 training images are 13 steps an epoch at batch 128: the tutorial's 10 epochs are too few
            # steps for a latent-2 VAE to leave the prior, so a newcomer's first run would draw blurs
            train_cfg = train_cfg.replace(epochs=DIGITS_EPOCHS)
        if train_cfg.kl_schedule != "constant" and not train_cfg.kl_warmup and "kl_warmup" not in t_over:
            # a schedule without its length: a quarter of the run (cyclical: the 4 cycles of Fu et al.)
            train_cfg = train_cfg.replace(kl_warmup=train_cfg.epochs / 4)
        data_dir = settings.get("data_dir")
        out = Path(settings.get("out") or _default_out(preset or model_cfg.model, dataset))

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
    return {"model": model_cfg, "train": train_cfg, "preset": preset, "dataset": dataset,
            "data_dir": data_dir, "out": out, "resume": resume, "pictures": settings.get("pictures", True),
            "condition_from_data": condition_from_data}


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


def cmd_train(args) -> int:
    plan = _plan(_given(args))
    import torch

    from vaelab.data import load_dataset
    from vaelab.evaluation import evaluate
    from vaelab.models import build_model
    from vaelab.training import fit

    mc, tc, out = plan["model"], plan["train"], plan["out"]
    data = load_dataset(plan["dataset"], plan["data_dir"], progress=tc.progress)
    mc = _condition_dim(mc, data, plan["condition_from_data"])
    if tc.threads:
        torch.set_num_threads(tc.threads)
    torch.manual_seed(tc.seed)  # the initial weights
    model = build_model(mc, input_shape=data.train.sample_shape)
    name = plan["preset"] or mc.model
    epochs_before = _epochs_done(out) if plan["resume"] else 0
    verb = f"resuming {name} after epoch {epochs_before}" if plan["resume"] else f"training {name}"
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if int(os.environ.get("RANK", "0")) == 0:
        ranks = f" on {world} processes (global batch {tc.batch_size})" if world > 1 else ""
        print(f"{verb} ({_describe_model(model)}) on {data.name}: {len(data.train)} train / {len(data.test)} "
              f"test samples of shape {tuple(data.train.sample_shape)}, {_plural(tc.epochs, 'epoch')}{ranks} "
              f"-> {out}", flush=True)

    run_info = {"data": {"dataset": _dataset_id(plan["dataset"]),
                         "data_dir": None if plan["data_dir"] is None
                         else os.path.abspath(os.path.expanduser(str(plan["data_dir"]))),
                         "binarize": tc.binarize},
                "preset": plan["preset"]}
    if model.capabilities.conditional:  # what each label means, for the pictures and --label NAME of later commands
        run_info["data"]["classes"] = _class_names(data.train.classes, mc.condition_dim)
    t0 = time.perf_counter()
    try:
        history = fit(model, data.train, data.test, tc, out=out, resume=plan["resume"], run_info=run_info)
    except KeyboardInterrupt:
        if (out / "checkpoint.safetensors").is_file():
            raise _Interrupted(f"the last checkpoint (its epoch's end, or --checkpoint-every step) in "
                               f"{str(out)!r} is intact; continue with: vaelab train --resume --out {out}") \
                from None
        raise _Interrupted("no checkpoint had been written yet (at an epoch's end, or every --checkpoint-every "
                           "steps), so there is nothing to resume from") from None
    seconds = time.perf_counter() - t0
    if int(os.environ.get("RANK", "0")) != 0:
        return 0  # under torchrun, rank 0 alone reports, evaluates and draws; the other ranks are done
    if not tc.progress and len(history) > epochs_before:
        _print_history(history[epochs_before:])
    done = len(history)
    if done == epochs_before and plan["resume"]:
        print(f"the run already has {done} epochs (--epochs {tc.epochs}); nothing to train: raise --epochs "
              "to continue")
    else:
        stopped = f" (early stopping after {done})" if done < tc.epochs else ""
        print(f"trained epochs {epochs_before + 1}..{done}{stopped} in {seconds:.1f} s")

    metrics = evaluate(model, data.test, batch_size=max(tc.batch_size, 256), binarize=tc.binarize)
    written = [str(out / f) for f in RUN_FILES if (out / f).is_file()]
    written.append(_write_evaluation(out / "evaluation.json", metrics, "test", data.name))
    print()
    _print_terms(metrics, f"test split of {data.name}, {metrics['n']} samples")
    if plan["pictures"]:
        written += _run_pictures(model, data, out, name)
    print("\nwrote:")
    for path in written:
        print(f"  {path}")
    return 0


def _plural(n: int, word: str) -> str:
    return f"{n} {word}" + ("" if n == 1 else "s")


def _describe_model(model) -> str:
    c = model.config
    latent = "x".join(str(s) for s in model.latent_shape)
    cond = f", conditioned on {c.condition_dim} classes" if model.capabilities.conditional else ""
    return f"{c.model}, arch {model.arch}, latent {latent}, {c.likelihood}{cond}"


def _class_names(classes, k: int) -> list[str]:
    """Names of labels 0..k-1: the data's class names, or the indices themselves."""
    names = [str(c) for c in classes] if classes else []
    return (names + [str(i) for i in range(len(names), k)])[:k]


def _epochs_done(out: Path) -> int:
    path = out / "metrics.jsonl"
    if not path.is_file():
        return 0
    return sum(1 for line in path.read_text(encoding="utf-8").splitlines() if line.strip())


def _print_history(rows: list[dict]) -> None:
    keys = ["epoch"] + [k for k in ("train_loss", "val_loss", "time_s") if k in rows[0]]
    table = [[k.replace("val_", "test_") for k in keys]]
    table += [[str(r[k]) if k == "epoch" else _fmt_number(r[k]) for k in keys] for r in rows]
    _print_table(table)


def _run_pictures(model, data, out: Path, name: str) -> list[str]:
    """The pictures `train` draws; which ones depends on the model and the data."""
    test = data.test
    classes = _class_names(data.train.classes, model.config.condition_dim) if model.capabilities.conditional else None
    written = []
    if test.is_image:
        written.append(draw_reconstructions(model, test, out / "reconstructions.png", n=10, name=name))
        if model.capabilities.samples:
            # a conditional model's samples.png is the class-by-sample grid
            written.append(draw_samples(model, out / "samples.png", seed=0, name=name, classes=classes))
            if model.capabilities.semi_supervised and len(test):
                written.append(draw_analogies(model, test, out / "analogies.png", name=name, classes=classes))
            vector = len(model.latent_shape) == 1
            dims = (0, 1)
            if vector and model.latent_shape[0] > 2 and len(test):
                # a larger latent: the manifold spans the two dimensions the model uses most
                from vaelab.generation import traversal_order

                dims = tuple(traversal_order(model, test)[0][:2])
            if vector and model.latent_shape[0] >= 2:
                written.append(draw_manifold(model, test, out / "manifold.png", dims=dims, name=name,
                                             classes=classes, most_kl=dims != (0, 1)))
            if vector and model.latent_shape[0] > 2:  # a 2-D latent is shown whole by the manifold
                written.append(draw_traversal(model, test, out / "traversal.png", name=name, classes=classes))
        if len(test) >= 2:
            written.append(draw_interpolation(model, test, out / "interpolation.png", name=name))
    written.append(draw_latents(model, test, out / "latents.png", name=name, split="test"))
    return written


# ====================================================================== pictures (shared by commands)


def _run_title(name: str, what: str) -> str:
    return f"{name}: {what}" if name else what


def _label_text(label: int, classes) -> str:
    """'3' for digits, '7: Sneaker' where the class has a name besides its index."""
    name = str(classes[label]) if classes and 0 <= label < len(classes) else str(label)
    return name if name == str(label) else f"{label}: {name}"


def _conditions(model, ds, idx):
    """The labels of samples `idx` of `ds` for a conditional model (None for the others)."""
    if not model.capabilities.conditional:
        return None
    if ds.y is None:
        raise VaelabError(f"model {model.config.model!r} is conditional and needs each image's label, but dataset "
                          f"{ds.name!r} has none; use the labelled dataset it was trained on")
    return ds.labels(idx)


def draw_reconstructions(model, ds, path, n: int = 10, name: str = "") -> str:
    import torch

    from vaelab.generation import reconstruction_pairs
    from vaelab.plotting import save_image_grid

    n = min(n, len(ds))
    idx = torch.arange(n)
    x, recon = reconstruction_pairs(model, ds.batch(idx), _conditions(model, ds, idx))
    what = "Test images and their reconstructions"
    if model.capabilities.conditional:
        what += " (each encoded and decoded with its label)"
    return save_image_grid(torch.cat([x, recon]).cpu(), path, nrow=n, title=_run_title(name, what),
                           row_labels=["original", "reconstruction"])


def draw_samples(model, path, n: int | None = None, seed: int = 0, name: str = "", label: int | None = None,
                 classes: list[str] | None = None) -> str:
    """Prior samples in a square-ish grid; for a conditional model, those of class `label`, or without a
    label the class-by-sample grid (one row per class, n per row)."""
    import math

    from vaelab.generation import class_grid, prior_samples
    from vaelab.plotting import save_image_grid

    if model.capabilities.conditional and label is None:
        n = n or 10
        k = model.config.condition_dim
        rows = min(k, GRID_CLASSES)
        images = class_grid(model, n, seed, classes=range(rows))
        some = "" if rows == k else f" (the first {rows} of {k} classes; --label draws any)"
        return save_image_grid(
            images.cpu(), path, nrow=n, row_labels=[_label_text(i, classes) for i in range(rows)],
            title=_run_title(name, f"Samples of each class, one row per class{some}: column j decodes the "
                                   f"same z_j ~ N(0, I) with every label, seed {seed}"))
    n = n or 64
    images = prior_samples(model, n, seed, condition=label)
    what = "" if label is None else f" of class {_label_text(label, classes)}"
    return save_image_grid(images.cpu(), path, nrow=math.ceil(math.sqrt(n)),
                           title=_run_title(name, f"{n} samples{what} decoded from the prior N(0, I), seed {seed}"))


def draw_analogies(model, ds, path, n: int = 8, name: str = "", classes: list[str] | None = None) -> str:
    """The first n images of `ds` (left column), each one's style drawn as every class along its row: z fixed at
    the image's posterior mean under its own label (the classifier's guess where `ds` has none), the label
    varied (Kingma et al. 2014, fig. 1)."""
    import torch

    from vaelab.generation import analogies
    from vaelab.plotting import save_image_grid

    n = min(n, len(ds))
    idx = torch.arange(n)
    x = ds.batch(idx)
    k = model.config.condition_dim
    images = torch.cat([x[:, None], analogies(model, x, ds.labels(idx)).cpu()], dim=1)  # (n, 1 + K, ...)
    rows = [f"test {i}" + ("" if ds.y is None else f" ({_label_text(int(ds.y[i]), classes)})") for i in range(n)]
    how = "its label" if ds.y is not None else "the classifier's most probable class"
    return save_image_grid(images.flatten(0, 1), path, nrow=k + 1, row_labels=rows,
                           col_labels=["input"] + [_label_text(c, classes) for c in range(k)],
                           title=_run_title(name, f"Analogies: each row keeps the style z of the test image on the "
                                                  f"left (its posterior mean under {how}) and decodes it as every "
                                                  "class"))


def draw_manifold(model, ds, path, n: int = 15, limit: float = 4.0, dims=(0, 1), name: str = "",
                  label: int | None = None, classes: list[str] | None = None, most_kl: bool = False) -> str:
    from vaelab.generation import encode_dataset, manifold_axes, manifold_grid
    from vaelab.plotting import save_manifold

    default_label = model.capabilities.conditional and label is None
    if default_label:
        label = 0  # one manifold per class; the title says which
    latents = None if model.capabilities.samples or ds is None else encode_dataset(model, ds)
    axes = manifold_axes(model, n, limit, dims, latents)  # validates before any work
    images = manifold_grid(model, n, limit, dims, latents, condition=label)
    if model.capabilities.samples:
        span = f"z[{axes.dims[0]}], z[{axes.dims[1]}] in [{-limit:g}, {limit:g}]"
        if most_kl:
            span += " (the two dimensions with the most KL)"
        if model.latent_shape[0] > 2:
            span += ", other dimensions 0"
    else:
        span = f"z[{axes.dims[0]}], z[{axes.dims[1]}] over the 1st-99th percentile of the test latents"
    if model.capabilities.conditional:
        which = " (the default; --label picks another)" if default_label else ""
        span = f"class {_label_text(label, classes)}{which}; " + span
    return save_manifold(images.cpu(), axes.xs, axes.ys, path, dims=axes.dims,
                         title=_run_title(name, f"Decoded latent grid: {span}"))


def draw_interpolation(model, ds, path, steps: int = 10, pairs: int = 4, method: str = "linear",
                       seed: int = 0, name: str = "") -> str:
    from vaelab.generation import interpolate
    from vaelab.plotting import save_image_grid

    a, b = _pick_pairs(ds, pairs, seed)
    # a conditional model: each end encoded with its own label, the one-hot label moving with z
    frames = interpolate(model, ds.batch(a), ds.batch(b), steps=steps, method=method,
                         condition_a=_conditions(model, ds, a), condition_b=_conditions(model, ds, b))
    labels = None
    if ds.y is not None:
        names = ds.classes or [str(i) for i in range(int(ds.y.max()) + 1)]
        labels = [f"{names[int(ds.y[i])]} → {names[int(ds.y[j])]}" for i, j in zip(a.tolist(), b.tolist())]
    what = {"linear": "linear", "slerp": "spherical (slerp)"}[method]
    extra = ", the one-hot label moving with z" if model.capabilities.conditional else ""
    return save_image_grid(frames.flatten(0, 1).cpu(), path, nrow=steps, row_labels=labels,
                           title=_run_title(name, f"Latent interpolation ({what}) between test images: the end "
                                                  f"images are their reconstructions{extra}"))


def draw_traversal(model, ds, path, index: int = 0, limit: float = 3.0, steps: int = 11, top: int = 20,
                   name: str = "", classes: list[str] | None = None) -> str:
    """One row per latent dimension (the `top` with the most KL on `ds`, most first), each sweeping
    [-limit, limit] from the posterior mean of sample `index` of `ds`."""
    import numpy as np
    import torch

    from vaelab.generation import traversal, traversal_order
    from vaelab.plotting import save_image_grid

    if not 0 <= index < len(ds):
        raise VaelabError(f"--index {index} is out of range: the test split holds {len(ds)} samples, "
                          f"indices 0..{len(ds) - 1}")
    idx = torch.tensor([index])
    cond = _conditions(model, ds, idx)
    order, kl = traversal_order(model, ds)
    shown = order[:top] if top else order
    frames = traversal(model, ds.batch(idx)[0], dims=shown, limit=limit, steps=steps, condition=cond)
    values = np.linspace(-limit, limit, steps)
    col_labels = [f"{round(float(v), 2) + 0.0:g}" for v in values]  # + 0.0: no "-0"
    row_labels = [f"z[{d}]  KL {kl[d]:.2f}" for d in shown]
    image = f"test image {index}"
    if ds.y is not None:
        image += f" (class {_label_text(int(ds.y[index]), classes or ds.classes)})"
    some = f"; the {len(shown)} of {len(order)} dimensions with the most KL" if len(shown) < len(order) else ""
    title = (f"Latent traversals of {image}: each row sweeps one dimension over [{-limit:g}, {limit:g}], the "
             f"others at the image's posterior mean; rows sorted by mean KL on the test set (nats){some}")
    return save_image_grid(frames.flatten(0, 1).cpu(), path, nrow=steps, title=_run_title(name, title),
                           row_labels=row_labels, col_labels=col_labels, xlabel="value of the swept dimension")


def _pick_pairs(ds, pairs: int, seed: int):
    """`pairs` (a, b) index pairs of distinct samples, seeded; of different classes where labels allow."""
    import torch

    if len(ds) < 2:
        raise VaelabError(f"interpolation needs at least 2 samples; the split holds {len(ds)}")
    if pairs < 1:
        raise VaelabError(f"--pairs must be >= 1, got {pairs}")
    perm = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed)).tolist()
    y = ds.y.tolist() if ds.y is not None else None
    a = [perm[i % len(perm)] for i in range(pairs)]
    rest = perm[pairs:] or perm
    b, used = [], set()
    for i in a:
        # the first unused candidate of another class; else of any class; else any other sample
        pick = next((j for j in rest if j not in used and j != i and y is not None and y[j] != y[i]), None)
        if pick is None:
            pick = next((j for j in rest if j not in used and j != i), next(j for j in perm if j != i))
        used.add(pick)
        b.append(pick)
    return torch.tensor(a), torch.tensor(b)


def draw_latents(model, ds, path, name: str = "", split: str = "test", latents=None,
                 projection: str = "pca") -> str:
    from vaelab.generation import encode_dataset
    from vaelab.plotting import save_scatter

    z = encode_dataset(model, ds) if latents is None else latents
    what = "posterior means" if model.capabilities.stochastic else "codes"
    which = "all samples (train and test)" if split == "all" else f"the {split} split"
    title = f"Latent {what} of {which} ({len(z)} samples)"
    labels = None if ds.y is None else ds.y.numpy()
    if labels is not None:
        title += ", coloured by class"
    return save_scatter(z, labels, path, classes=ds.classes, title=_run_title(name, title),
                        projection=projection)


# ================================================================================== run-taking commands


def _open_run(run: str):
    """(config.json dict, model) of a run directory."""
    from vaelab.models import from_pretrained
    from vaelab.training.checkpoint import read_config

    path = Path(run)
    if not path.is_dir():
        what = "is a file, not a run directory" if path.exists() else "does not exist"
        raise VaelabError(f"run directory {run!r} {what}; give the --out directory of a `vaelab train` run")
    return read_config(path), from_pretrained(path)


def _run_data(cfg: dict, run: str, model, args):
    """The dataset RUN was trained on (or --dataset), with --data-dir overriding the saved folder."""
    from vaelab.data import load_dataset
    from vaelab.errors import DataError

    saved = cfg.get("data") or {}
    dataset = getattr(args, "dataset", None) or saved.get("dataset")
    if not dataset:
        raise VaelabError(f"{os.path.join(run, 'config.json')!r} names no dataset; pass --dataset NAME_OR_PATH")
    data_dir = args.data_dir if args.data_dir is not None else saved.get("data_dir")
    data = load_dataset(dataset, data_dir, progress=True)
    shape = tuple(model.config.input_shape)
    if tuple(data.train.sample_shape) != shape:
        raise DataError(f"dataset {dataset!r} holds samples of shape {tuple(data.train.sample_shape)}, but the "
                        f"model in {run!r} takes {shape}; use the dataset it was trained on")
    return data


def _run_name(cfg: dict, model) -> str:
    return cfg.get("preset") or model.config.model


def _need_images(model, command: str) -> None:
    shape = tuple(model.config.input_shape)
    if len(shape) != 3:
        raise VaelabError(f"`vaelab {command}` draws images, but this run's model takes vectors of {shape[0]} "
                          "numbers; `vaelab encode` works for any data")


def _out(args, run: str, default: str) -> Path:
    return Path(args.out) if args.out else Path(run) / default


def _positive(value: int, flag: str) -> None:
    if value < 1:
        raise VaelabError(f"{flag} must be a positive integer, got {value}")


def cmd_evaluate(args) -> int:
    from vaelab.evaluation import evaluate

    _positive(args.batch_size, "--batch-size")
    cfg, model = _open_run(args.run)
    data = _run_data(cfg, args.run, model, args)
    ds = data.test if args.split == "test" else data.train
    if args.nll_samples < 0:
        raise ConfigError(f"--nll-samples {args.nll_samples} must be >= 0 (0 turns the NLL off)", "evaluate")
    binarize = {"run": bool((cfg.get("train") or {}).get("binarize", False)), "dynamic": True,
                "none": False}[args.binarize]
    metrics = evaluate(model, ds, batch_size=args.batch_size, binarize=binarize, nll_samples=args.nll_samples,
                       train_data=data.train if args.probes else None)
    _print_terms(metrics, f"{args.split} split of {data.name}, {metrics['n']} samples")
    default = "evaluation.json" if args.split == "test" else f"evaluation-{args.split}.json"
    print(f"\nwrote: {_write_evaluation(_out(args, args.run, default), metrics, args.split, data.name)}")
    return 0


def cmd_reconstruct(args) -> int:
    _positive(args.n, "--n")
    cfg, model = _open_run(args.run)
    _need_images(model, "reconstruct")
    data = _run_data(cfg, args.run, model, args)
    path = draw_reconstructions(model, data.test, _out(args, args.run, "reconstructions.png"), n=args.n,
                                name=_run_name(cfg, model))
    print(f"wrote: {path}")
    return 0


def _run_classes(cfg: dict, model) -> list[str] | None:
    """The class names of a conditional run's labels (saved by train), else None."""
    if not model.capabilities.conditional:
        return None
    return _class_names((cfg.get("data") or {}).get("classes"), model.config.condition_dim)


def _parse_label(text: str | None, model, classes) -> int | None:
    """--label as a class index: an integer in 0..K-1 or a class name (any case)."""
    if text is None:
        return None
    if not model.capabilities.conditional:
        raise VaelabError(f"--label is for conditional models, but model {model.config.model!r} takes no "
                          "condition; train one with --model cvae")
    return _class_index(text, model.config.condition_dim, classes, "this model", "this model")


def _class_index(text, k: int, classes, this: str, the: str) -> int:
    """A --label given as an integer in 0..k-1 or a class name (any case), as a class index; `this` and `the`
    name the model or prior in the errors."""
    names = [c.lower() for c in classes or []]
    text = str(text).strip()
    if text.lower() in names:
        return names.index(text.lower())
    try:
        label = int(text)
    except ValueError:
        named = classes and any(c != str(i) for i, c in enumerate(classes))
        known = f" or a class name ({', '.join(classes)})" if named else ""
        raise VaelabError(f"--label {text!r} is not a class of {this}: give an index in 0..{k - 1}"
                          f"{known}") from None
    if not 0 <= label < k:
        raise VaelabError(f"--label {label} is out of range: {the} has {k} classes, labels 0..{k - 1}")
    return label


def cmd_sample(args) -> int:
    if args.n is not None:
        _positive(args.n, "--n")
    cfg, model = _open_run(args.run)
    _need_images(model, "sample")
    if model.capabilities.discrete:  # a VQ-VAE draws code grids from the prior `train-prior` fitted
        from vaelab.prior import sample_run

        print(f"wrote: {sample_run(args.run, cfg, model, n=args.n, label=args.label, seed=args.seed, out=args.out)}")
        return 0
    classes = _run_classes(cfg, model)
    label = _parse_label(args.label, model, classes)
    path = draw_samples(model, _out(args, args.run, "samples.png"), n=args.n, seed=args.seed,
                        name=_run_name(cfg, model), label=label, classes=classes)
    print(f"wrote: {path}")
    if model.capabilities.semi_supervised and label is None:  # m2: also test images' styles as every class
        if not (cfg.get("data") or {}).get("dataset"):  # a run of the Python API's fit: no dataset recorded
            print("note: no analogies.png, as the run names no dataset (vaelab.generation.analogies draws them)")
            return 0
        where = Path(args.run) / "analogies.png" if args.out is None else Path(path).with_name(
            f"{Path(path).stem}-analogies.png")
        test = _run_data(cfg, args.run, model, args).test
        print(f"wrote: {draw_analogies(model, test, where, name=_run_name(cfg, model), classes=classes)}")
    return 0


def cmd_manifold(args) -> int:
    cfg, model = _open_run(args.run)
    _need_images(model, "manifold")
    if len(args.dims) != 2:
        raise VaelabError(f"--dims takes two latent dimensions such as 0,1; got {_fmt_value(args.dims)}")
    classes = _run_classes(cfg, model)
    label = _parse_label(args.label, model, classes)
    ds = None
    if not model.capabilities.samples:  # an autoencoder's grid spans its data's latents
        ds = _run_data(cfg, args.run, model, args).test
    path = draw_manifold(model, ds, _out(args, args.run, "manifold.png"), n=args.n, limit=args.limit,
                         dims=args.dims, name=_run_name(cfg, model), label=label, classes=classes)
    print(f"wrote: {path}")
    return 0


def cmd_traverse(args) -> int:
    import math

    if args.steps < 2:
        raise VaelabError(f"--steps must be >= 2, got {args.steps}")
    if not (math.isfinite(args.limit) and args.limit > 0):
        raise VaelabError(f"--range must be a positive number (each dimension sweeps [-X, X]), got {args.limit}")
    if args.top < 0:
        raise VaelabError(f"--top must be >= 0 (0 shows every dimension), got {args.top}")
    cfg, model = _open_run(args.run)
    _need_images(model, "traverse")
    data = _run_data(cfg, args.run, model, args)
    path = draw_traversal(model, data.test, _out(args, args.run, "traversal.png"), index=args.index,
                          limit=args.limit, steps=args.steps, top=args.top, name=_run_name(cfg, model),
                          classes=_run_classes(cfg, model))
    print(f"wrote: {path}")
    return 0


def cmd_interpolate(args) -> int:
    _positive(args.pairs, "--pairs")
    if args.steps < 2:
        raise VaelabError(f"--steps must be >= 2 (the two end points included), got {args.steps}")
    cfg, model = _open_run(args.run)
    _need_images(model, "interpolate")
    data = _run_data(cfg, args.run, model, args)
    path = draw_interpolation(model, data.test, _out(args, args.run, "interpolation.png"), steps=args.steps,
                              pairs=args.pairs, method=args.method, seed=args.seed, name=_run_name(cfg, model))
    print(f"wrote: {path}")
    return 0


def cmd_encode(args) -> int:
    import numpy as np

    from vaelab.generation import encode_dataset

    _positive(args.batch_size, "--batch-size")
    cfg, model = _open_run(args.run)
    if args.indices and not model.capabilities.discrete:
        raise VaelabError(f"--indices writes the discrete codes of a VQ-VAE, but {args.run!r} holds a "
                          f"{model.config.model!r} model with continuous latents; drop --indices to save its latents")
    data = _run_data(cfg, args.run, model, args)
    parts = {"test": [data.test], "train": [data.train], "all": [data.train, data.test]}[args.split]
    has_labels = all(ds.y is not None for ds in parts)
    if args.indices:
        return _encode_indices(args, model, parts, has_labels)
    z = np.concatenate([encode_dataset(model, ds, args.batch_size) for ds in parts])
    labels = np.concatenate([ds.y.numpy() for ds in parts]) if has_labels else None

    out = _out(args, args.run, "latents.npy" if args.split == "test" else f"latents-{args.split}.npy")
    stem = out.name[:-4] if out.name.endswith(".npy") else out.name
    written = [_write_npy(out, z.astype(np.float32))]
    if labels is not None:
        written.append(_write_npy(out.with_name(f"{stem}.labels.npy"), labels.astype(np.int64)))
    scatter_ds = parts[0] if len(parts) == 1 else _Labelled(labels, data.test.classes)
    written.append(draw_latents(model, scatter_ds, out.with_name(f"{stem}.png"), name=_run_name(cfg, model),
                                split=args.split, latents=z, projection=args.projection))
    which = "all samples" if args.split == "all" else f"the {args.split} split"
    print(f"encoded {which} ({len(z)} samples) to latent means of size {z.shape[1]}")
    print("wrote:")
    for path in written:
        print(f"  {path}")
    return 0


def _encode_indices(args, model, parts, has_labels: bool) -> int:
    """`vaelab encode --indices`: a VQ-VAE's code indices (N, H, W) as int64 .npy, with the labels beside."""
    import numpy as np
    import torch

    from vaelab.prior import encode_codes

    codes = torch.cat([encode_codes(model, ds, args.batch_size) for ds in parts]).numpy()  # (N, H, W) int64
    out = _out(args, args.run, "codes.npy" if args.split == "test" else f"codes-{args.split}.npy")
    stem = out.name[:-4] if out.name.endswith(".npy") else out.name
    written = [_write_npy(out, codes)]
    if has_labels:
        labels = np.concatenate([ds.y.numpy() for ds in parts]).astype(np.int64)
        written.append(_write_npy(out.with_name(f"{stem}.labels.npy"), labels))
    which = "all samples" if args.split == "all" else f"the {args.split} split"
    print(f"encoded {which} ({len(codes)} samples) to code indices of shape {tuple(codes.shape[1:])}, in "
          f"0..{model.settings.codebook_size - 1}")
    print("wrote:")
    for path in written:
        print(f"  {path}")
    return 0


class _Labelled:
    """Just the labels and class names of a dataset (what draw_latents needs beside the latents)."""

    def __init__(self, labels, classes):
        import torch

        self.y = None if labels is None else torch.from_numpy(labels)
        self.classes = classes


def _write_npy(path: Path, array) -> str:
    import io

    import numpy as np

    from vaelab.training.checkpoint import atomic_write_bytes

    buf = io.BytesIO()
    np.save(buf, array, allow_pickle=False)
    atomic_write_bytes(path, buf.getvalue())
    return str(path)


def cmd_models(args) -> int:
    from vaelab.models import list_models

    width = shutil.get_terminal_size((100, 24)).columns
    print("models (train with --model NAME):")
    _print_described([(m.name, m.description) for m in list_models()], width)
    print("\npresets (train with --preset NAME):")
    _print_described([(p.name, p.description) for p in sorted(PRESETS.values(), key=lambda p: p.name)], width)
    return 0


# ============================================================================================ output


def _fmt_number(v) -> str:
    if isinstance(v, int):
        return str(v)
    return f"{v:.6g}"


def _print_table(rows: list[list[str]], indent: str = "  ") -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print(indent + "  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())


def _print_terms(metrics: dict, what: str) -> None:
    """The scalar terms as a table; per-dimension lists stay in the JSON file; a warning is printed last."""
    print(f"{what}:")
    rows = [["term", "value", "meaning"]]
    for k, v in metrics.items():
        if k != "n" and isinstance(v, (int, float)) and not isinstance(v, bool):
            rows.append([k, _fmt_number(v), TERM_MEANINGS.get(k, "")])
    _print_table(rows)
    if "kl_per_dim" in metrics:
        print("  KL per latent dimension (nats): " + " ".join(f"{v:.3g}" for v in metrics["kl_per_dim"]))
    if metrics.get("warning"):
        print(f"warning: {metrics['warning']}")


def _print_described(items: list[tuple[str, str]], width: int) -> None:
    col = max(len(n) for n, _ in items) + 4
    for name, text in items:
        lines = textwrap.wrap(text, max(30, width - col - 1)) or [""]
        print(f"  {name.ljust(col - 2)}{lines[0]}")
        for line in lines[1:]:
            print(" " * col + line)


def _write_evaluation(path: Path, metrics: dict, split: str, dataset: str) -> str:
    from vaelab.training.checkpoint import atomic_write_json

    atomic_write_json(path, {"split": split, "dataset": dataset, **metrics})
    return str(path)


__all__ = ["main", "build_parser"]
