"""Training speed of the tutorial presets: vaelab's `fit` against a plain PyTorch loop and the tutorial's Keras.

    python benchmarks/speed.py                                   # both presets, 3 epochs, fp32 and bf16
    python benchmarks/speed.py --epochs 10 --tf-python /tmp/venv-tf/bin/python
    python benchmarks/speed.py --presets seed-vae --precisions fp32 --runs vaelab

Every run trains on MNIST (60,000 images) and validates on the 10,000 test images after each epoch, in its own
subprocess (so its peak RSS is its own):
- vaelab:    the preset through `vaelab.training.fit`, as `vaelab train` runs it: progress bar, metrics and a
             checkpoint + model written every epoch; --precisions fp32 (default) and bf16 (mixed precision).
- reference: the same network written as a plain PyTorch loop (kept below, DataLoader-free: the whole set as one
             float tensor, batches sliced from it; default PyTorch settings), the same batch size.
- keras:     with --tf-python, the tutorial's own Keras code (../shared/bench/tf_train.py, --inter-op 1).
- pythae:    (seed-vae only; `pip install --no-deps pythae==0.1.2` and its dependencies cloudpickle, imageio,
             pydantic) the plain loop's VAE layers as a pythae 0.1.2 `VAE` (custom BaseEncoder / BaseDecoder, the
             decoder ending in a sigmoid as its "bce" loss needs: the same objective, 784-pixel BCE sum + KL),
             trained through pythae's `TrainingPipeline` with its default trainer (Adam, lr 1e-3 set to match,
             batch 128, evaluation on the test images every epoch, its best model kept), as a pythae user runs it.

The table reports steady seconds per epoch (the median of the epochs after the first, training + validation as
Keras counts an epoch), images/s (70,000 per epoch), the fraction of the fp32 and of the bf16 peak (the epoch's
FLOPs at the peak over the measured time; the peaks are this machine's 2-thread matmul peaks, measured before the
sitting and again after it, `--no-measure-peaks`: the reference machine's 200 GFLOP/s fp32), the last epoch's test
loss, peak RSS, and the speed-up over Keras: over its run's steady epoch and over its run's fastest steady epoch
(the Keras VAE's epochs alternate between two speeds). `--loss-seeds 0,1,2` trains each vaelab run again on the
further seeds after the timed rounds and reports its test loss as the mean over the seeds (Keras's: over its
rounds). The sitting of issue 23's acceptance, vaelab's default settings (`--precisions auto`) against all three:

    python benchmarks/speed.py --presets seed-conv-ae,seed-vae --runs keras,reference,pythae,vaelab
        --precisions auto --epochs 10 --rounds 2 --loss-seeds 0,1,2 --nll-images 0 --tf-python /tmp/venv-tf/bin/python

(one command line). The last rows time encoding all 70,000 images with the trained VAE (`model.embed`) and
the K=5000 importance-sampled NLL of the fp32 VAE on the first 100 test images (`--nll-images`), in decoder
passes per second.
Results go to benchmarks/results/speed.json. The machine is shared and noisy: compare runs of one sitting, and with
`--rounds N` run Keras and vaelab alternately N times and read the median of the N per-round speed-ups:

    python benchmarks/speed.py --epochs 4 --rounds 3 --tf-python /tmp/venv-tf/bin/python
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TF_SCRIPT = REPO.parent / "shared" / "bench" / "tf_train.py"
PRESETS = ("seed-conv-ae", "seed-vae")
KERAS_MODEL = {"seed-conv-ae": "ae", "seed-vae": "vae"}
BATCH = {"seed-conv-ae": 256, "seed-vae": 128}  # the tutorial's batch sizes
# forward + backward FLOPs per training image (counted layer by layer; a validation image costs a third)
TRAIN_FLOPS = {"seed-conv-ae": 13.8e6, "seed-vae": 39.9e6}
PEAK_FLOPS = 200e9  # measured fp32 matmul peak of the 2-core reference machine
N_TRAIN, N_TEST = 60_000, 10_000
NLL_SAMPLES = 5000  # importance samples per image of the NLL timing


def epoch_bound_s(preset: str, peak: float = PEAK_FLOPS) -> float:
    """The lower bound of one epoch: 60,000 training + 10,000 validation images at `peak` FLOP/s (by default the
    reference machine's fp32 matmul peak; a sitting measures its own, fp32 and bf16: measure_peaks)."""
    return (N_TRAIN + N_TEST / 3) * TRAIN_FLOPS[preset] / peak


PEAK_SIZES = (1024, 2048)  # square matrix products timed for the peaks


def measure_peaks(blocks: int = 3, reps: int = 5) -> dict:
    """This machine's matmul peaks now, fp32 and bf16, in FLOP/s: square products of PEAK_SIZES on torch's
    default threads (the runs' own), the precisions alternated block by block, the fastest block of any size."""
    import torch

    best = {"fp32": 0.0, "bf16": 0.0}
    for n in PEAK_SIZES:
        x, w = torch.randn(n, n), torch.randn(n, n)
        for _ in range(blocks):
            for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
                a, b = x.to(dtype), w.to(dtype)
                a @ b
                t0 = time.perf_counter()
                for _ in range(reps):
                    a @ b
                best[name] = max(best[name], 2 * n**3 * reps / (time.perf_counter() - t0))
    return {k: float(round(v, -8)) for k, v in best.items()}  # to 0.1 GFLOP/s


# ------------------------------------------------------------------------------------ child: vaelab's fit


def child_vaelab(args) -> dict:
    sys.path.insert(0, str(REPO / "src"))
    import torch

    from vaelab.config import get_preset
    from vaelab.data import load_dataset
    from vaelab.models import build_model
    from vaelab.training import fit

    data = load_dataset("mnist", args.data_dir, progress=False)
    preset = get_preset(args.preset)
    torch.manual_seed(args.seed)
    model = build_model(preset.model, input_shape=data.train.sample_shape)
    cfg = preset.train.replace(epochs=args.epochs, seed=args.seed, precision=args.precision, progress=True)
    with tempfile.TemporaryDirectory() as run_dir:  # checkpoints and metrics written every epoch, as the CLI
        t0 = time.perf_counter()
        history = fit(model, data.train, data.test, cfg, out=run_dir)
        wall = time.perf_counter() - t0
        chosen = json.loads((Path(run_dir) / "config.json").read_text()).get("precision_auto")
    # the test loss in fp32 whatever the training precision (a bf16 run validates in bf16, as it trains)
    from vaelab.evaluation import loss_terms

    test = loss_terms(model, data.test, batch_size=max(cfg.batch_size, 256))
    result = {"epoch_s": [r["time_s"] for r in history], "fit_wall_s": wall,
              "test_loss": test["loss"], "test_bce": test["bce"], "val_loss_in_training": history[-1]["val_loss"]}
    if chosen:  # --precision auto: what it chose and why
        result["precision_auto"] = chosen
    if model.capabilities.stochastic:  # inference throughput: encode every image (train + test) to its latent mean
        images = torch.cat([data.train.x, data.test.x])
        t0 = time.perf_counter()
        for start in range(0, len(images), 1000):
            model.embed(images[start:start + 1000].float() / 255)
        result["encode_s"] = time.perf_counter() - t0
        result["encode_images"] = len(images)
    if model.capabilities.stochastic and args.nll_images and args.precision == "fp32":
        # the literature's NLL protocol (K=5000 importance samples, as `vaelab evaluate --nll-samples 5000`) on the
        # first test images: its throughput in decoder passes per second
        from vaelab.evaluation.nll import importance_nll

        test = data.test.subset(torch.arange(min(args.nll_images, len(data.test))))
        t0 = time.perf_counter()
        nll = importance_nll(model, test, n_samples=NLL_SAMPLES)
        result.update(nll_s=time.perf_counter() - t0, nll_images=nll["n"], nll_samples=NLL_SAMPLES, nll=nll["nll"])
    return result


# ------------------------------------------------------------------- child: the plain PyTorch reference


def reference_model(preset: str):
    """The tutorial's network as a PyTorch user would write it (default init, NCHW, logits out)."""
    from torch import nn

    if preset == "seed-conv-ae":
        return nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (B, 32, 14, 14)
            nn.Conv2d(32, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (B, 16, 7, 7)
            nn.Conv2d(16, 16, 3, padding=1), nn.ReLU(), nn.Upsample(scale_factor=2),  # (B, 16, 14, 14)
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.Upsample(scale_factor=2),  # (B, 32, 28, 28)
            nn.Conv2d(32, 1, 3, padding=1))  # logits (B, 1, 28, 28)

    class VAE(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = nn.Sequential(
                nn.Conv2d(1, 32, 3, stride=2, padding=1), nn.ReLU(),  # (B, 32, 14, 14)
                nn.Conv2d(32, 64, 3, stride=2, padding=1), nn.ReLU(),  # (B, 64, 7, 7)
                nn.Flatten(), nn.Linear(64 * 7 * 7, 16), nn.ReLU(), nn.Linear(16, 4))  # mean, log-variance
            self.decoder = nn.Sequential(
                nn.Linear(2, 64 * 7 * 7), nn.ReLU(), nn.Unflatten(1, (64, 7, 7)),
                nn.ConvTranspose2d(64, 64, 3, stride=2, padding=1, output_padding=1), nn.ReLU(),
                nn.ConvTranspose2d(64, 32, 3, stride=2, padding=1, output_padding=1), nn.ReLU(),
                nn.ConvTranspose2d(32, 1, 3, padding=1))  # logits (B, 1, 28, 28)

        def forward(self, x):
            import torch

            mean, logvar = self.encoder(x).chunk(2, dim=1)
            z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)
            return self.decoder(z), mean, logvar

    return VAE()


def child_reference(args) -> dict:
    import numpy as np
    import torch
    import torch.nn.functional as F

    sys.path.insert(0, str(REPO / "src"))
    from vaelab.data import load_dataset

    data = load_dataset("mnist", args.data_dir, progress=False)
    x_train = data.train.x.float() / 255  # (60000, 1, 28, 28), the whole set in memory
    x_test = data.test.x.float() / 255
    torch.manual_seed(args.seed)
    model = reference_model(args.preset)
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    vae = args.preset == "seed-vae"

    def loss_of(x):
        if vae:
            logits, mean, logvar = model(x)
            bce = F.binary_cross_entropy_with_logits(logits, x, reduction="none").flatten(1).sum(1)
            kl = -0.5 * (1 + logvar - mean.pow(2) - logvar.exp()).sum(1)
            return (bce + kl).mean()
        return F.binary_cross_entropy_with_logits(model(x), x)

    bs, epoch_s, test_loss = BATCH[args.preset], [], None
    for _ in range(args.epochs):
        t0 = time.perf_counter()
        model.train()
        for idx in torch.randperm(len(x_train)).split(bs):
            loss = loss_of(x_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            test_loss = float(np.mean([float(loss_of(x_test[i:i + bs])) for i in range(0, len(x_test), bs)]))
        epoch_s.append(time.perf_counter() - t0)
    return {"epoch_s": epoch_s, "test_loss": test_loss}


# ------------------------------------------------------------------------------------------- child: pythae


def child_pythae(args) -> dict:
    """The plain loop's seed VAE layers trained through pythae 0.1.2's TrainingPipeline."""
    import tempfile

    import torch
    from pythae.models import VAE, VAEConfig
    from pythae.models.base.base_utils import ModelOutput
    from pythae.models.nn import BaseDecoder, BaseEncoder
    from pythae.pipelines import TrainingPipeline
    from pythae.trainers import BaseTrainerConfig
    from pythae.trainers.training_callbacks import TrainingCallback

    sys.path.insert(0, str(REPO / "src"))
    from vaelab.data import load_dataset

    data = load_dataset("mnist", args.data_dir, progress=False)
    x_train, x_test = data.train.x.float() / 255, data.test.x.float() / 255
    torch.manual_seed(args.seed)
    ref = reference_model("seed-vae")

    class Encoder(BaseEncoder):
        def __init__(self):
            super().__init__()
            self.net = ref.encoder

        def forward(self, x):
            mean, logvar = self.net(x).chunk(2, dim=1)
            return ModelOutput(embedding=mean, log_covariance=logvar)

    class Decoder(BaseDecoder):
        def __init__(self):
            super().__init__()
            self.net = ref.decoder

        def forward(self, z):
            return ModelOutput(reconstruction=torch.sigmoid(self.net(z)))

    class Clock(TrainingCallback):  # an epoch: from its start to the next one's (training, evaluation, bookkeeping)
        def __init__(self):
            self.starts, self.losses = [], []

        def on_epoch_begin(self, training_config, **kwargs):
            self.starts.append(time.perf_counter())

        def on_log(self, training_config, logs, **kwargs):
            if "eval_epoch_loss" in logs:
                self.losses.append(float(logs["eval_epoch_loss"]))

        def on_train_end(self, training_config, **kwargs):
            self.starts.append(time.perf_counter())

    model = VAE(VAEConfig(input_dim=(1, 28, 28), latent_dim=2, reconstruction_loss="bce"),
                encoder=Encoder(), decoder=Decoder())
    clock = Clock()
    with tempfile.TemporaryDirectory() as out:
        config = BaseTrainerConfig(output_dir=out, num_epochs=args.epochs, learning_rate=1e-3,
                                   per_device_train_batch_size=BATCH["seed-vae"],
                                   per_device_eval_batch_size=BATCH["seed-vae"], no_cuda=True, seed=args.seed)
        TrainingPipeline(model=model, training_config=config)(train_data=x_train, eval_data=x_test,
                                                              callbacks=[clock])
    epoch_s = [b - a for a, b in zip(clock.starts, clock.starts[1:])]
    return {"epoch_s": epoch_s, "test_loss": clock.losses[-1] if clock.losses else None}


# --------------------------------------------------------------------------------- child: Keras (TF venv)


def run_keras(args, preset: str) -> dict:
    cmd = [args.tf_python, str(TF_SCRIPT), "--model", KERAS_MODEL[preset], "--dataset", "mnist",
           "--epochs", str(args.epochs), "--inter-op", "1"]
    env = dict(os.environ, ANCHORS_DATA=args.data_dir, TF_CPP_MIN_LOG_LEVEL="2")
    out, rss_mb = _run(cmd, env)
    line = next((ln for ln in out.splitlines() if ln.startswith("RESULT ")), None)
    if line is None:
        raise RuntimeError(f"tf_train.py printed no RESULT line:\n{out[-2000:]}")
    res = json.loads(line[len("RESULT "):])
    epochs = [r["total_s"] for r in map(json.loads, (ln for ln in out.splitlines() if ln.startswith('{"epoch"')))]
    loss_key = "final_val_loss"
    return {"epoch_s": epochs or [res["first_epoch_s"]] + [res["steady_epoch_s"]] * (args.epochs - 1),
            "test_loss": res[loss_key], "test_bce": res[loss_key] if preset == "seed-conv-ae" else None,
            "peak_rss_mb": rss_mb, "tf": res.get("tf")}


# ----------------------------------------------------------------------------------------------- parent


def _run(cmd: list[str], env=None) -> tuple[str, float]:
    """Run cmd, return (stdout, its peak RSS in MB) from the child's own rusage."""
    with tempfile.TemporaryFile("w+") as log:
        proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.DEVNULL, env=env, cwd=REPO)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        log.seek(0)
        out = log.read()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed with exit code {proc.returncode}:\n{out[-3000:]}")
    return out, usage.ru_maxrss / 1024  # Linux reports KiB


def run_child(args, kind: str, preset: str, precision: str = "fp32", seed: int | None = None) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, "--preset", preset, "--precision", precision,
           "--epochs", str(args.epochs), "--seed", str(args.seed if seed is None else seed), "--data-dir",
           args.data_dir, "--nll-images", str(args.nll_images)]
    out, rss_mb = _run(cmd)
    res = json.loads(out.strip().splitlines()[-1])
    res["peak_rss_mb"] = rss_mb
    return res


def peak_fractions(preset: str, steady_s: float, peaks: dict | None) -> dict:
    """The epoch's FLOP bound over its time: of the reference fp32 peak, or of each measured peak of the sitting."""
    if not peaks:
        return {"peak_fraction": round(epoch_bound_s(preset) / steady_s, 3)}
    out = {"peak_fraction": round(epoch_bound_s(preset, peaks["fp32"]) / steady_s, 3)}
    if peaks.get("bf16"):
        out["peak_fraction_bf16"] = round(epoch_bound_s(preset, peaks["bf16"]) / steady_s, 3)
    return out


def summarize(name: str, preset: str, res: dict, peaks: dict | None = None) -> dict:
    epochs = res["epoch_s"]
    steady = statistics.median(epochs[1:]) if len(epochs) > 1 else epochs[0]
    row = {"run": name, "preset": preset, "steady_epoch_s": round(steady, 2), "first_epoch_s": round(epochs[0], 2),
           "images_per_s": round((N_TRAIN + N_TEST) / steady), **peak_fractions(preset, steady, peaks),
           "test_loss": res.get("test_loss"), "test_bce": res.get("test_bce"),
           "peak_rss_mb": round(res["peak_rss_mb"]), "epoch_s": [round(e, 2) for e in epochs]}
    for k in ("val_loss_in_training", "fit_wall_s", "encode_s", "encode_images", "nll_s", "nll_images", "nll_samples",
              "nll", "tf", "precision_auto"):
        if k in res:
            row[k] = res[k]
    return row


def _loss(row: dict):
    """The loss a row reports: BCE per pixel for the AE, the negative ELBO for the VAE."""
    return row["test_bce"] if row["preset"] == "seed-conv-ae" and row.get("test_bce") is not None else row["test_loss"]


BASELINES = ("keras", "reference", "pythae")  # what a vaelab run's speed-up is taken over, round by round


def combine(raw: list[dict], peaks: dict | None = None) -> list[dict]:
    """One row per (preset, run) over the rounds: the median steady s/epoch, each round's speed-up over the
    Keras run, the plain loop and pythae of the same round (`vs_keras_by_round`, `vs_reference_by_round`,
    `vs_pythae_by_round`) and their medians (`vs_keras`, `vs_reference`, `vs_pythae`), and over the fastest
    steady epoch of that round's Keras run (`vs_keras_fastest_by_round`, `vs_keras_fastest`)."""
    base = {b: {(r["preset"], r["round"]): r["steady_epoch_s"] for r in raw if r["kind"] == b} for b in BASELINES}
    base["keras_fastest"] = {(r["preset"], r["round"]): min(r["epoch_s"][1:] or r["epoch_s"])
                             for r in raw if r["kind"] == "keras"}
    rows = []
    for name in dict.fromkeys(r["run"] for r in raw):
        runs = [r for r in raw if r["run"] == name]
        row = dict(runs[-1])  # the last round's losses, epochs, encode timing
        preset = row["preset"]
        steady = statistics.median(r["steady_epoch_s"] for r in runs)
        row.update(steady_epoch_s=round(steady, 2), images_per_s=round((N_TRAIN + N_TEST) / steady),
                   **peak_fractions(preset, steady, peaks),
                   peak_rss_mb=max(r["peak_rss_mb"] for r in runs), rounds=len(runs),
                   steady_by_round=[r["steady_epoch_s"] for r in runs])
        row.pop("round")
        for b in (*BASELINES, "keras_fastest"):
            ratios = [round(base[b][preset, r["round"]] / r["steady_epoch_s"], 2) for r in runs
                      if (preset, r["round"]) in base[b]]
            if ratios:
                row[f"vs_{b}_by_round"], row[f"vs_{b}"] = ratios, round(statistics.median(ratios), 2)
        rows.append(row)
    return rows


def print_table(rows: list[dict]) -> None:
    head = ["run", "s/epoch", "images/s", "% of fp32 peak"]
    bf16 = any("peak_fraction_bf16" in r for r in rows)
    head += ["% of bf16 peak"] * bf16 + ["test loss", "peak RSS MB", "vs Keras"]
    fastest = any("vs_keras_fastest" in r for r in rows)
    head += ["vs Keras's fastest epoch"] * fastest
    others = [b for b in ("reference", "pythae") if any(f"vs_{b}" in r for r in rows)]
    head += [{"reference": "vs plain loop", "pythae": "vs pythae"}[b] for b in others]
    table = [head]
    for r in rows:
        loss = _loss(r)
        line = [r["run"], f"{r['steady_epoch_s']:.2f}", f"{r['images_per_s']:,}", f"{100 * r['peak_fraction']:.0f}%"]
        line += [f"{100 * r['peak_fraction_bf16']:.0f}%" if "peak_fraction_bf16" in r else "-"] * bf16
        line += [f"{loss:.4g}" if loss is not None else "-", f"{r['peak_rss_mb']:,}"]
        line += [_ratios(r, b) for b in ("keras",) + ("keras_fastest",) * fastest + tuple(others)]
        table.append(line)
    widths = [max(len(row[i]) for row in table) for i in range(len(head))]
    for row in table:
        print("  " + "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(row, widths))))
    print("  (test loss: BCE per pixel for the AE, negative ELBO in nats for the VAE; vs Keras = Keras s/epoch / "
          "this run's, in the same round, and so for the plain loop and pythae; vs Keras's fastest epoch = the fastest "
          "steady epoch of the round's Keras run / this run's s/epoch; % of peak = the FLOP bound of an epoch at the "
          "peak / its time)")
    if any(len(r.get("vs_keras_by_round", ())) > 1 for r in rows):
        print("  (with --rounds: s/epoch is the median over the rounds, each ratio the median of the rounds' ratios, "
              "the rounds' own in brackets)")


def _ratios(row: dict, base: str) -> str:
    if f"vs_{base}" not in row:
        return "-"
    by_round = row[f"vs_{base}_by_round"]
    rounds = f" ({', '.join(f'{v:.2f}' for v in by_round)})" if len(by_round) > 1 else ""
    return f"{row[f'vs_{base}']:.2f}x{rounds}"


def run_sitting(args, presets: list[str], runs: list[str], peaks: dict | None) -> list[dict]:
    """Every run of every round, the contenders alternated within a round: the raw rows."""
    raw = []
    for preset in presets:
        for rnd in range(1, args.rounds + 1):
            jobs = [("keras", None)] * ("keras" in runs) + [("reference", None)] * ("reference" in runs) \
                + [("pythae", None)] * ("pythae" in runs and preset == "seed-vae") \
                + [("vaelab", prec) for prec in args.precisions.split(",") if prec] * ("vaelab" in runs)
            for kind, precision in jobs:
                name = {"keras": "Keras (tutorial)", "reference": "plain PyTorch loop",
                        "pythae": "pythae 0.1.2"}.get(kind, f"vaelab {precision}")
                print(f"{preset}: {name}, {args.epochs} epochs" + (f", round {rnd}" if args.rounds > 1 else "")
                      + " ...", flush=True)
                try:
                    res = run_keras(args, preset) if kind == "keras" else run_child(args, kind, preset,
                                                                                       precision or "fp32")
                except RuntimeError as e:  # one failed run (killed, out of memory) does not lose the others
                    print(f"  FAILED: {str(e)[:300]}", flush=True)
                    continue
                row = summarize(f"{preset} {_vaelab_name(name, res)}", preset, res, peaks)
                row["kind"], row["precision"], row["round"] = kind, precision, rnd
                raw.append(row)
                print(f"  {row['steady_epoch_s']:.2f} s/epoch (epochs {row['epoch_s']}), test loss {_loss(row):.4g}, "
                      f"peak RSS {row['peak_rss_mb']} MB", flush=True)
    return raw


def _vaelab_name(name: str, res: dict) -> str:
    """"vaelab auto" names what auto chose: "vaelab auto (bf16)"."""
    chose = (res.get("precision_auto") or {}).get("chose")
    return f"{name} ({chose})" if chose and name.endswith(" auto") else name


def run_seeds(args, rows: list[dict], raw: list[dict]) -> None:
    """--loss-seeds: each vaelab precision trained again on each further seed (the same epochs, after the timed
    rounds), so its test loss is a mean over seeds; Keras's is the mean over its rounds (its code takes no seed).
    Adds test_loss_by_seed (vaelab) and test_loss_mean (vaelab and Keras) to the rows."""
    seeds = [s for s in _ints(args.loss_seeds) if s != args.seed]
    for row in rows:
        rounds = [r for r in raw if r["run"] == row["run"]]
        if row["kind"] == "keras":
            row["test_loss_mean"] = statistics.mean(_loss(r) for r in rounds)
        if row["kind"] != "vaelab" or not seeds:
            continue
        losses = {args.seed: _loss(rounds[-1])}
        for seed in seeds:
            print(f"{row['run']}: seed {seed}, {args.epochs} epochs, for its test loss ...", flush=True)
            try:
                res = run_child(args, "vaelab", row["preset"], row["precision"], seed=seed)
            except RuntimeError as e:
                print(f"  FAILED: {str(e)[:300]}", flush=True)
                continue
            losses[seed] = _loss({**row, "test_loss": res["test_loss"], "test_bce": res.get("test_bce")})
        row["test_loss_by_seed"] = {str(k): v for k, v in losses.items()}
        row["test_loss_mean"] = statistics.mean(losses.values())
        print(f"  test loss by seed {row['test_loss_by_seed']}, mean {row['test_loss_mean']:.4g}", flush=True)


def _ints(text: str) -> list[int]:
    return [int(v) for v in text.replace(",", " ").split()]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--epochs", type=int, default=3, help="epochs per run [default 3; steady = epochs after the 1st]")
    p.add_argument("--presets", default=",".join(PRESETS))
    p.add_argument("--runs", default="keras,reference,vaelab",
                   help="comma-separated subset of keras,reference,pythae,vaelab [default keras,reference,vaelab]")
    p.add_argument("--precisions", default="fp32,bf16", help="vaelab precisions to run [default fp32,bf16]")
    p.add_argument("--tf-python", default=None, help="python of a venv with tensorflow-cpu: adds the Keras runs")
    p.add_argument("--data-dir", default=os.environ.get("VAELAB_DATA") or str(REPO.parent / "shared" / "data"))
    p.add_argument("--rounds", type=int, default=1,
                   help="repeat every run this many times, alternating, and compare each vaelab run with the Keras "
                        "run, the plain loop and pythae of its round [default 1]")
    p.add_argument("--nll-images", type=int, default=100,
                   help=f"time the K={NLL_SAMPLES} importance-sampled NLL of the fp32 VAE on this many test images "
                        "(0: skip) [default 100]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--loss-seeds", default="",
                   help="after the rounds, train each vaelab precision on these seeds too (e.g. 0,1,2) and report "
                        "its test loss as their mean [default: --seed alone]")
    p.add_argument("--measure-peaks", action=argparse.BooleanOptionalAction, default=True,
                   help="time this machine's fp32 and bf16 matmul peaks before and after the sitting and report each "
                        "run's fraction of both [default on]")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "speed.json"))
    p.add_argument("--child", choices=["vaelab", "reference", "pythae"], help=argparse.SUPPRESS)
    p.add_argument("--preset", help=argparse.SUPPRESS)
    p.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:  # one run inside its own process: print its result as the last line
        result = {"vaelab": child_vaelab, "reference": child_reference, "pythae": child_pythae}[args.child](args)
        print(json.dumps(result), flush=True)
        return 0

    presets = [s for s in args.presets.split(",") if s]
    runs = [s for s in args.runs.split(",") if s]
    if args.tf_python is None:
        runs = [r for r in runs if r != "keras"]
    elif not TF_SCRIPT.is_file():
        p.error(f"--tf-python needs {TF_SCRIPT}")
    if args.rounds < 1:
        p.error(f"--rounds {args.rounds}: give 1 or more")
    peaks = measure_peaks() if args.measure_peaks else None
    if peaks:
        print(f"matmul peaks now: fp32 {peaks['fp32'] / 1e9:.0f}, bf16 {peaks['bf16'] / 1e9:.0f} GFLOP/s", flush=True)
    raw = run_sitting(args, presets, runs, peaks)
    rows = combine(raw, peaks)
    payload = _payload(args, rows, raw, peaks)
    write_json(args.out, payload)
    if args.loss_seeds:
        run_seeds(args, rows, raw)
        write_json(args.out, payload)
    print()
    print_table(rows)
    print_extras(rows)
    if peaks:  # the peaks again at the end: how much the machine moved during the sitting
        payload["peaks_at_end"] = measure_peaks()
        write_json(args.out, payload)
    print(f"wrote {args.out}")
    return 0


def print_extras(rows: list[dict]) -> None:
    """Under the table: test losses over seeds, the encoding and the likelihood's throughput."""
    for r in rows:
        if "test_loss_mean" in r:
            print(f"  {r['run']}: test loss, mean over {'seeds' if r['kind'] == 'vaelab' else 'rounds'} "
                  f"{r['test_loss_mean']:.4g}" + (f" (by seed {r['test_loss_by_seed']})" if "test_loss_by_seed" in r
                                                   else ""))
        if "encode_s" in r:
            print(f"  {r['run']}: encoded {r['encode_images']:,} images in {r['encode_s']:.2f} s = "
                  f"{r['encode_images'] / r['encode_s']:,.0f} images/s (inference)")
        if "nll_s" in r:
            passes = r["nll_images"] * r["nll_samples"] / r["nll_s"]
            print(f"  {r['run']}: importance-sampled NLL, K={r['nll_samples']}, of {r['nll_images']} test images in "
                  f"{r['nll_s']:.1f} s = {passes:,.0f} decoder passes/s (the 10,000 test images: "
                  f"{N_TEST * r['nll_samples'] / passes / 60:.0f} min)")


def _payload(args, rows: list[dict], raw: list[dict], peaks: dict | None) -> dict:
    import torch

    sys.path.insert(0, str(REPO / "src"))
    from vaelab.training.runtime import cpu_flags, cpu_name

    return {"machine": {"python": platform.python_version(), "torch": torch.__version__, "cpus": os.cpu_count(),
                        "cpu": platform.processor() or platform.machine(), "cpu_model": cpu_name(),
                        "bf16_flags": sorted(cpu_flags() & {"avx512_bf16", "amx_bf16"})},
            "epochs": args.epochs, "rounds": args.rounds, "peak_flops": PEAK_FLOPS, "peaks_measured": peaks,
            "train_flops_per_image": TRAIN_FLOPS, "rows": rows, "runs": raw,
            "keras_steady_epoch_s": {r["preset"]: r["steady_epoch_s"] for r in rows if r["kind"] == "keras"},
            **{f"speedup_vs_{b}": {r["run"]: r[f"vs_{b}"] for r in rows if f"vs_{b}" in r}
               for b in (*BASELINES, "keras_fastest")}}


def write_json(path: str, payload: dict) -> None:
    sys.path.insert(0, str(REPO / "src"))
    from vaelab.io import atomic_write_json

    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(path, payload)


if __name__ == "__main__":
    raise SystemExit(main())
