"""`vaelab train-prior RUN`: fit the autoregressive prior over a trained VQ-VAE's codes, so the run can generate.

    vaelab train --model vqvae --codebook-size 64 --dataset mnist --out runs/vq
    vaelab train-prior runs/vq                      # --resume continues an interrupted one
    vaelab sample runs/vq --n 64                    # --label 3: a class-conditional prior's digit 3

The training set is encoded once to grids of code indices (code_dataset: a data.arrays.CodeDataset); a gated
PixelCNN (models/prior.py, as the model models/code_prior.CodePriorModel) learns p(codes | class) on them by
maximum likelihood in the one training loop, vaelab.training.fit, class-conditional when the data has labels.
The prior becomes part of the model: its weights go into RUN/model.safetensors and its size into config.json's
model section (prior_layers, prior_channels, prior_classes), so `from_pretrained(RUN)` loads it with no extra
step, and RUN/prior_metrics.jsonl records its per-epoch negative log-likelihood in bits per code.

After every epoch the run directory is brought up to date (atomic writes): RUN/prior_checkpoint.safetensors
(the training loop's checkpoint of the prior: its weights, optimizer state, RNG states and history, with the
fit's settings), the model with the prior so far, and the metrics. `--resume` continues from the checkpoint
exactly as an uninterrupted fit would have gone on; the checkpoint records a fingerprint of the VQ-VAE's
weights, so a prior is never resumed on codes that changed since. A checkpoint of the first release's own
prior loop cannot be continued: refit with --overwrite.

Importing this module imports neither torch nor numpy: vaelab.cli.prior builds the `train-prior` parser
(and runs the command) with its names, and `vaelab train-prior --help` stays instant.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from vaelab.errors import VaelabError
from vaelab.labels import class_index, class_names, label_text

PRIOR_METRICS_FILE = "prior_metrics.jsonl"
PRIOR_CHECKPOINT_FILE = "prior_checkpoint.safetensors"
DEFAULTS = {"epochs": 10, "batch_size": 128, "lr": 1e-3, "layers": 8, "channels": 32, "seed": 0}
# the settings a resumed fit takes from its checkpoint (the network's size, and what the data order and the
# optimizer's steps depend on); only `epochs` may change
RESUMED = ("batch_size", "lr", "layers", "channels", "seed")


def fit_prior(model, train, test=None, *, epochs: int = DEFAULTS["epochs"], batch_size: int = DEFAULTS["batch_size"],
              lr: float = DEFAULTS["lr"], layers: int = DEFAULTS["layers"], channels: int = DEFAULTS["channels"],
              conditional: bool = True, seed: int = DEFAULTS["seed"], progress: bool = False,
              checkpoint: str | Path | None = None, resume: bool = False, on_epoch=None,
              checkpoint_every: int = 0) -> list[dict]:
    """Fit a code prior for `model` (a VQ-VAE) on the codes of `train` (an ArrayDataset), attach it to the model
    (model.prior, and prior_* in model.config) and return the per-epoch history: the training and test
    negative log-likelihood in bits per code. Class-conditional when `conditional` and the data has labels.

    The prior (models/code_prior.CodePriorModel) trains in the one training loop, vaelab.training.fit, on the
    codes of the data (code_dataset). `checkpoint`: the loop's checkpoint file (after every epoch, and every
    `checkpoint_every` optimizer steps: the prior, its optimizer, RNG states, history, and these settings);
    with resume=True the fit continues from it, up to `epochs` in all, with the checkpoint's settings, exactly
    as an uninterrupted fit goes on. `on_epoch(history)` is called after every epoch, with the prior attached
    to the model (train_prior saves the run there).
    """
    from vaelab.config import TrainConfig
    from vaelab.training import fit

    _check(epochs >= 1 and batch_size >= 1 and lr > 0 and layers >= 1 and channels >= 1,
           f"epochs={epochs}, batch_size={batch_size}, lr={lr}, layers={layers} and channels={channels} must all "
           "be positive")
    if not model.capabilities.discrete:
        raise VaelabError(f"model {model.config.model!r} has no discrete codes; a code prior is for a VQ-VAE "
                          "(train one with --model vqvae)")
    if len(train) == 0:
        raise VaelabError("the training set is empty; the prior needs the codes of the training data")
    settings = {"batch_size": batch_size, "lr": lr, "layers": layers, "channels": channels, "seed": seed}
    saved = _fit_to_resume(model, checkpoint) if resume else None
    if saved is not None:
        settings = {k: saved["settings"][k] for k in RESUMED}
        conditional = saved["settings"]["classes"] > 0
    classes = (train.num_classes or int(train.y.max()) + 1) if conditional and train.y is not None else 0
    if saved is not None and classes != saved["settings"]["classes"]:
        raise VaelabError(f"cannot resume the prior in {str(checkpoint)!r}: it models {saved['settings']['classes']} "
                          f"classes, but the training data has {classes}; resume on the data it was fitted to")
    device = model._device()
    codes = code_dataset(model, train, classes)
    test_codes = code_dataset(model, test, classes) if test is not None and len(test) and (
        not classes or test.y is not None) else None
    prior = _new_prior(model, codes.sample_shape[1:], classes, settings)
    # the prior is part of the model from now on: an interrupted fit leaves the prior of its last epoch
    model.set_prior(prior.prior, model.config.replace(prior_layers=settings["layers"],
                                                      prior_channels=settings["channels"], prior_classes=classes))
    cfg = TrainConfig(epochs=epochs, batch_size=settings["batch_size"], lr=settings["lr"], seed=settings["seed"],
                      progress=progress, device=str(device), checkpoint_every=checkpoint_every)
    run_info = {"settings": {**settings, "classes": classes}, "vqvae": vqvae_fingerprint(model)}
    report = None if on_epoch is None else (lambda history: on_epoch(prior_history(history)))
    out, files = _checkpoint_files(checkpoint)
    history = fit(prior, codes, test_codes, cfg, out=out, resume=saved is not None, run_info=run_info,
                  files=files, on_epoch=report)
    model.to(device)  # the loop ends with the prior on the CPU
    return prior_history(history)


def _new_prior(model, grid: tuple[int, int], classes: int, settings: dict):
    """A fresh prior model (models/code_prior.CodePriorModel) for the VQ-VAE's codes, its weights seeded with
    settings["seed"]."""
    import torch

    from vaelab.models.code_prior import CodePriorModel

    torch.manual_seed(settings["seed"])
    return CodePriorModel.for_codes(model.settings.codebook_size, grid, layers=settings["layers"],
                                    channels=settings["channels"], classes=classes)


def _checkpoint_files(checkpoint):
    """(out, files) for the training loop: the directory of `checkpoint`, and the loop writing only that file
    there (the prior lives in the VQ-VAE's files, its metrics in prior_metrics.jsonl); (None, default) without."""
    from vaelab.training.loop import RunFiles

    if checkpoint is None:
        return None, RunFiles()
    checkpoint = Path(checkpoint)
    return checkpoint.parent, RunFiles(checkpoint=checkpoint.name, config=None, model=False, metrics=None)


def prior_history(history: list[dict]) -> list[dict]:
    """The training loop's rows of a prior's fit as prior_metrics.jsonl records them: epoch, train and test
    bits per code (the loop's train_ and val_bits_per_code), and seconds."""
    rows = []
    for row in history:
        out = {"epoch": row["epoch"], "train_bits_per_code": row["train_bits_per_code"]}
        if "val_bits_per_code" in row:
            out["test_bits_per_code"] = row["val_bits_per_code"]
        rows.append({**out, "time_s": row["time_s"]})
    return rows


def _fit_to_resume(model, checkpoint) -> dict:
    """The trainer state of the prior checkpoint to resume, which must exist, be of this release and belong
    to the model's weights."""
    if checkpoint is None:
        raise VaelabError("resume=True needs the checkpoint file of the fit to continue (checkpoint=...)")
    saved = _read_prior_checkpoint(checkpoint)
    if saved is None:
        raise VaelabError(f"cannot resume: the prior checkpoint {str(checkpoint)!r} does not exist; fit without "
                          "resuming")
    if saved["vqvae"] != vqvae_fingerprint(model):
        raise VaelabError(f"cannot resume the prior in {str(checkpoint)!r}: it was fitted to the codes of other "
                          "VQ-VAE weights (the model was trained further since); fit a new prior without "
                          "resuming")
    if saved["first_release"]:
        raise VaelabError(_first_release(f"in {str(checkpoint)!r}", "fit a new prior without resuming"))
    return saved


def _first_release(where: str, refit: str) -> str:
    return (f"cannot resume the prior {where}: its checkpoint was written by the first release of vaelab, whose "
            f"fits of the prior this release cannot continue; {refit}")


def code_dataset(model, data, classes: int = 0):
    """The code grids of `data` under the VQ-VAE `model`, computed once, as a CodeDataset (N, 1, h, w) of int64
    code indices that the training loop batches; labelled with the data's labels when `classes` > 0."""
    from vaelab.data.arrays import CodeDataset

    labels = data.y if classes else None
    return CodeDataset(encode_codes(model, data)[:, None], labels, data.classes if classes else None,
                       f"{data.name} codes".strip())


def encode_codes(model, data, batch_size: int = 512):
    """The code indices of every sample of `data`, (N, h, w) int64 on the CPU."""
    import torch

    was_training = model.training
    model.eval()
    parts = [model.encode_indices(data.batch(torch.arange(s, min(s + batch_size, len(data)))).to(model._device()))
             .cpu() for s in range(0, len(data), batch_size)]
    model.train(was_training)
    return torch.cat(parts) if parts else torch.zeros(0, *model.grid, dtype=torch.long)


def prior_nll(prior, codes, labels=None, batch_size: int = 1000) -> float:
    """Mean negative log-likelihood of code maps (N, h, w) under `prior`, nats per map."""
    import torch

    device = next(prior.parameters()).device
    total = 0.0
    with torch.inference_mode():
        for s in range(0, len(codes), batch_size):
            c = labels[s:s + batch_size].to(device) if labels is not None else None
            total -= float(prior.log_prob(codes[s:s + batch_size].to(device), c).sum())
    return total / max(len(codes), 1)


def vqvae_fingerprint(model) -> str:
    """SHA-256 of the VQ-VAE's own weights (everything but the prior): what its codes depend on."""
    import hashlib

    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        if not name.startswith("prior."):
            digest.update(name.encode())
            digest.update(tensor.detach().cpu().contiguous().numpy().tobytes())
    return digest.hexdigest()


def _read_prior_checkpoint(path) -> dict | None:
    """What a prior checkpoint says of its fit: {"settings", "vqvae" (the fingerprint of its VQ-VAE's weights),
    "history" (prior_history's rows), "first_release" (written by the first release, which this one cannot
    resume)}, or None if there is none."""
    from vaelab.errors import CheckpointError
    from vaelab.io import unpack

    path = Path(path)
    if not path.is_file():
        return None
    _, metadata = unpack(path)
    try:
        state = json.loads(metadata["vaelab"])["trainer"]
        info = state.get("run_info")
        if isinstance(info, dict) and "settings" in info and "vqvae" in info:  # the training loop's checkpoint
            return {"settings": info["settings"], "vqvae": info["vqvae"], "history": prior_history(state["history"]),
                    "first_release": False}
        if all(k in state for k in ("settings", "vqvae", "history")):  # the first release's own loop
            return {**state, "first_release": True}
    except (KeyError, TypeError, AttributeError, json.JSONDecodeError):
        pass
    raise CheckpointError(f"{str(path)!r} is not a checkpoint of `vaelab train-prior`; move it away or fit "
                          "the prior with --overwrite")


def train_prior(run_dir, *, dataset=None, data_dir=None, epochs: int = DEFAULTS["epochs"],
                batch_size: int | None = None, lr: float | None = None, layers: int | None = None,
                channels: int | None = None, conditional: bool = True, seed: int | None = None, threads: int = 0,
                device: str = "auto", progress: bool = True, resume: bool = False,
                overwrite: bool = False, checkpoint_every: int = 0) -> list[dict]:
    """Fit the code prior of the VQ-VAE in `run_dir` on the dataset it was trained on (or `dataset`), and save
    it into the run (model.safetensors, config.json, prior_metrics.jsonl, prior_checkpoint.safetensors) after
    every epoch. Returns the per-epoch history.

    A run that already has a prior of its current weights keeps it unless `resume` (continue it up to `epochs`,
    with its saved settings; giving another value for one of them is an error) or `overwrite` (fit afresh).
    Settings left at None take the defaults (DEFAULTS), or on resume the checkpoint's. `checkpoint_every`:
    also checkpoint every this many optimizer steps, so that `resume` continues inside an epoch."""
    import torch

    from vaelab.io import read_config
    from vaelab.models import from_pretrained
    from vaelab.training.distributed import resolve_device

    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise VaelabError(f"run directory {str(run_dir)!r} does not exist; give the --out directory of a "
                          "`vaelab train --model vqvae` run")
    if resume and overwrite:
        raise VaelabError("--resume and --overwrite contradict each other: continue the prior, or fit a new one")
    cfg = read_config(run_dir)
    model = from_pretrained(run_dir)
    if not model.capabilities.discrete:
        raise VaelabError(f"{str(run_dir)!r} holds a {model.config.model!r} model; a code prior is for a VQ-VAE "
                          "run (vaelab train --model vqvae)")
    given = {"batch_size": batch_size, "lr": lr, "layers": layers, "channels": channels, "seed": seed}
    checkpoint = run_dir / PRIOR_CHECKPOINT_FILE
    saved = _read_prior_checkpoint(checkpoint)
    _check_refit(run_dir, model, saved, given, epochs=epochs, conditional=conditional, resume=resume,
                 overwrite=overwrite)
    settings = {k: DEFAULTS[k] if v is None else v for k, v in given.items()}
    data = _run_data(run_dir, cfg, model, dataset, data_dir, progress)
    if threads:
        torch.set_num_threads(threads)
    model.to(resolve_device(device))
    used = {k: saved["settings"][k] for k in RESUMED} if resume else settings  # what fit_prior uses
    history = fit_prior(model, data.train, data.test, epochs=epochs, conditional=conditional, progress=progress,
                        checkpoint=checkpoint, resume=resume, checkpoint_every=checkpoint_every,
                        on_epoch=_run_saver(run_dir, model, used, data.train.classes), **settings)
    model.to("cpu")
    return history


def _run_saver(run_dir: Path, model, settings: dict, classes: list[str] | None):
    """fit_prior's on_epoch for a run directory: after every epoch, the model with the prior so far (and a
    "prior" section in config.json) and prior_metrics.jsonl."""
    from vaelab.io import atomic_write_text
    from vaelab.models.pretrained import save_pretrained

    t0 = time.perf_counter()

    def save(history: list[dict]) -> None:
        last = history[-1]
        record = {"epochs": last["epoch"], "batch_size": settings["batch_size"], "lr": settings["lr"],
                  "seed": settings["seed"], "train_bits_per_code": last["train_bits_per_code"],
                  "seconds": round(time.perf_counter() - t0, 1)}
        if "test_bits_per_code" in last:
            record["test_bits_per_code"] = last["test_bits_per_code"]
        if model.config.prior_classes:
            record["classes"] = class_names(classes, model.config.prior_classes)
        save_pretrained(model, run_dir, extra={"prior": record})
        atomic_write_text(run_dir / PRIOR_METRICS_FILE, "".join(json.dumps(r) + "\n" for r in history))

    return save


def _check_refit(run_dir: Path, model, saved: dict | None, given: dict, *, epochs: int, conditional: bool,
                 resume: bool, overwrite: bool) -> None:
    """Refuse to fit the prior of a run that has one (unless `overwrite`), and to resume one that cannot be
    continued as asked: missing, of other weights, other settings `given`, or already `epochs` long."""
    from vaelab.errors import ConfigError

    current = saved is not None and saved["vqvae"] == vqvae_fingerprint(model)  # a prior of these weights
    if resume:
        if not current:
            why = ("it has no prior checkpoint" if saved is None else
                   "its prior checkpoint belongs to earlier VQ-VAE weights (the model was trained further since)")
            raise VaelabError(f"cannot resume the prior of {str(run_dir)!r}: {why}; fit one without --resume")
        if saved["first_release"]:
            raise VaelabError(_first_release(f"of {str(run_dir)!r}", "refit it with --overwrite "
                                             f"(vaelab train-prior {run_dir} --overwrite)"))
        clash = [f"{k}={v!r}: the prior was fitted with {k}={saved['settings'][k]!r}"
                 for k, v in given.items() if v is not None and v != saved["settings"][k]]
        if not conditional and saved["settings"]["classes"]:
            clash.append(f"unconditional: the prior is conditioned on {saved['settings']['classes']} classes")
        if clash:
            raise ConfigError(clash + ["drop these settings to resume, or fit a new prior with --overwrite"],
                              "settings for --resume")
        if len(saved["history"]) >= epochs:
            raise VaelabError(f"the prior of {str(run_dir)!r} already has {len(saved['history'])} epochs "
                              f"(--epochs {epochs}); raise --epochs to continue it")
    elif not overwrite and (current or model.config.prior_layers):
        done = f" ({len(saved['history'])} epoch{'s' * (len(saved['history']) != 1)})" if current else ""
        if current and saved["first_release"]:
            raise VaelabError(f"{str(run_dir)!r} already has a code prior{done}, fitted by the first release of "
                              "vaelab, which this release cannot continue; fit a new one with --overwrite")
        raise VaelabError(f"{str(run_dir)!r} already has a code prior{done}; continue it with --resume (and a "
                          "larger --epochs), or fit a new one with --overwrite")


def _run_data(run_dir: Path, cfg: dict, model, dataset, data_dir, progress: bool):
    """The data to fit the prior on: `dataset` or the run's training dataset, checked to fit the model."""
    from vaelab.data import load_dataset, pixel_options
    from vaelab.errors import DataError

    saved_data = cfg.get("data") or {}
    dataset = dataset or saved_data.get("dataset")
    if not dataset:
        raise VaelabError(f"{str(run_dir / 'config.json')!r} names no dataset; pass --dataset NAME_OR_PATH")
    data = load_dataset(dataset, data_dir if data_dir is not None else saved_data.get("data_dir"), progress=progress,
                        **pixel_options(saved_data, dataset))
    if tuple(data.train.sample_shape) != tuple(model.config.input_shape):
        raise DataError(f"dataset {dataset!r} holds samples of shape {tuple(data.train.sample_shape)}, but the "
                        f"model in {str(run_dir)!r} takes {tuple(model.config.input_shape)}; use the dataset it "
                        "was trained on")
    return data


# ============================================================================================ generation


def sample_run(run: str, cfg: dict, model, *, n: int | None = None, label: str | None = None, seed: int = 0,
               out: str | Path | None = None) -> str:
    """`vaelab sample RUN` for a VQ-VAE run: n code grids drawn from its prior and decoded, as a PNG grid
    (RUN/samples.png or `out`); returns the path. A class-conditional prior draws class `label` (an index or a
    class name), or without one the classes in order, an equal share each."""
    import torch

    from vaelab.plotting import save_image_grid

    if model.prior is None:
        raise VaelabError(f"the VQ-VAE of {run!r} has no code prior yet: a VQ-VAE generates by drawing code grids "
                          f"from an autoregressive prior fitted to its codes. Fit one with `vaelab train-prior "
                          f"{run}`, then sample again")
    n = 64 if n is None else n
    if n < 1:
        raise VaelabError(f"--n must be a positive integer, got {n}")
    k = model.config.prior_classes
    classes = class_names((cfg.get("prior") or {}).get("classes"), k)
    name = cfg.get("preset") or model.config.model
    if label is not None:
        wanted = _prior_label(label, k, classes, run)
        labels = torch.full((n,), wanted, dtype=torch.long)
        what = f"{n} samples of class {label_text(wanted, classes)}"
    elif k:
        labels = torch.arange(n) * k // n  # (n,) classes 0..k-1 in order, n/k each
        what = f"{n} samples, classes {classes[0]}..{classes[-1]} in reading order"
    else:
        labels, what = None, f"{n} samples"
    images = model.sample(n, generator=torch.Generator().manual_seed(int(seed)), condition=labels)
    title = f"{name}: {what} decoded from code grids drawn from the gated PixelCNN prior, seed {seed}"
    path = Path(out) if out else Path(run) / "samples.png"
    return save_image_grid(images.cpu(), path, nrow=math.ceil(math.sqrt(n)), title=title)


def _prior_label(text: str, k: int, classes: list[str], run: str) -> int:
    """--label as a class index of the prior: an integer in 0..k-1 or a class name (any case)."""
    if not k:
        raise VaelabError(f"--label needs a class-conditional prior, but the prior of {run!r} is unconditional "
                          "(fitted with --unconditional, or on unlabelled data); drop --label, or fit a "
                          f"conditional one on labelled data: `vaelab train-prior {run} --overwrite`")
    return class_index(text, k, classes, "this prior", "the prior")


def _check(ok: bool, message: str) -> None:
    if not ok:
        raise VaelabError(message)
