"""The GPU check (issue 23): one prepared script for a machine with a CUDA GPU.

    VAELAB_TEST_DATA=D python benchmarks/gpu.py --out DIR --data-dir D    # on the GPU machine (D holds mnist/), ~6 min
    python benchmarks/gpu.py --out /tmp/g --device cpu --train-images 2000 --epochs 2 --budget-s 200   # dry run

Sections, each written into DIR/gpu.json as soon as it ends (a failed one records its error, the others still run):
- env:      torch, CUDA, the GPU, what `--precision auto` chooses there, and the measured matrix-product peaks
            (bf16, tf32, fp32: the mean of 10 timed 8192^3 products after 3 warm-ups) that the fractions use.
- fixture:  `vaelab train --device cuda --precision auto` of the seed VAE on digits (10 epochs), its run directory
            packed as DIR/cuda-run.tar.gz, and its test loss computed on the GPU: unpacked into tests/fixtures/, it is
            the real GPU run for tests/test_gpu_run_on_cpu.py to open on a CPU-only machine (evaluate, sample,
            resume; that test fakes one today by editing config.json).
- speed:    the seed presets and mnist-vae on MNIST, vaelab's `fit` against a plain PyTorch loop of the same
            network on the same GPU (the whole set on the GPU as one float tensor, batches sliced from it), fp32
            and bf16, alternating, --epochs each: steady s/epoch (median after the first), images/s (70,000 an
            epoch: training + validation), the fraction of the measured peak, peak GPU memory, the test loss.
- torchrun: `torchrun --standalone --nproc_per_node 1 -m vaelab train --device cuda` (NCCL), one epoch of the seed
            VAE on MNIST, then `vaelab evaluate` of that run on the CPU.
- tests:    the model and training tests (`-m "not slow"`) with the GPU visible: `fit`'s default device is auto, so
            every test that trains, trains on the GPU; the log is DIR/gpu-tests.log.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import tempfile
import time
import traceback
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "benchmarks"))

PRESETS = ("seed-conv-ae", "seed-vae", "mnist-vae")
# forward + backward FLOPs per training image (speed.py counts the seed presets layer by layer; mnist-vae's MLP
# 784-512-512-64 | 32-512-512-784 is 1,376,256 multiply-adds forward, x2 FLOPs, x3 with the backward pass)
TRAIN_FLOPS = {"seed-conv-ae": 13.8e6, "seed-vae": 39.9e6, "mnist-vae": 3 * 2 * 1_376_256}
N_TRAIN, N_TEST = 60_000, 10_000
TEST_FILES = ("test_models.py", "test_training.py", "test_family.py", "test_checkpoint.py", "test_likelihoods.py",
              "test_vqvae.py", "test_hvae.py", "test_m2.py", "test_precision_auto.py", "test_schedules.py",
              "test_custom_networks.py", "test_plugin_model.py", "test_disentangling_models.py",
              "test_factorvae.py", "test_adgm.py", "test_resnet.py", "test_gpu_run_on_cpu.py")


def vaelab_cmd(*argv) -> list[str]:
    return [sys.executable, "-m", "vaelab", *map(str, argv)]


def child_env() -> dict:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO / "src"), os.environ.get("PYTHONPATH", "")])}


def sh(cmd: list[str], timeout: float, log: Path | None = None) -> dict:
    t0 = time.perf_counter()
    try:
        done = subprocess.run(cmd, cwd=REPO, env=child_env(), capture_output=True, text=True, timeout=timeout)
        rc, out = done.returncode, done.stdout + done.stderr
    except subprocess.TimeoutExpired as e:
        rc, out = "timeout", (e.stdout or b"").decode(errors="replace") + (e.stderr or b"").decode(errors="replace")
    if log is not None:
        log.write_text(out)
    return {"cmd": " ".join(cmd[1:]), "rc": rc, "wall_s": round(time.perf_counter() - t0, 1), "tail": out[-1500:]}


def sync(device) -> None:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------------------------------- sections


def section_env(args) -> dict:
    import torch

    from vaelab.training.runtime import choose_precision

    dev = torch.device(args.device)
    info = {"torch": torch.__version__, "cuda": torch.version.cuda, "python": sys.version.split()[0],
            "cpus": os.cpu_count()}
    if dev.type == "cuda":
        p = torch.cuda.get_device_properties(dev)
        info.update(gpu=p.name, capability=f"{p.major}.{p.minor}", multiprocessors=p.multi_processor_count,
                    memory_gib=round(p.total_memory / 2**30, 1), cudnn=torch.backends.cudnn.version())
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.max.sm", "--format=csv,noheader"],
                             capture_output=True, text=True)
        info["nvidia_smi"] = smi.stdout.strip()
    info["precision_auto"] = dict(zip(("chose", "why"), choose_precision(dev)))
    n = 8192 if dev.type == "cuda" else 1024
    peaks = {}
    for name, dtype, tf32 in (("bf16", torch.bfloat16, False), ("tf32", torch.float32, True),
                              ("fp32", torch.float32, False)):
        if dev.type == "cpu" and name == "tf32":
            continue
        torch.backends.cuda.matmul.allow_tf32 = tf32
        a = torch.randn(n, n, device=dev, dtype=dtype)
        b = torch.randn(n, n, device=dev, dtype=dtype)
        for _ in range(3):
            a @ b
        sync(dev)
        t0 = time.perf_counter()
        for _ in range(10):
            a @ b
        sync(dev)
        peaks[name] = round(10 * 2 * n**3 / (time.perf_counter() - t0) / 1e12, 2)
        del a, b
    torch.backends.cuda.matmul.allow_tf32 = False  # torch's default
    info["matmul_peak_tflops"] = peaks
    return info


def section_fixture(args) -> dict:
    """A run trained on the GPU, packed for tests/test_gpu_run_on_cpu.py."""
    import torch

    run = Path(tempfile.mkdtemp()) / "cuda-run"
    train = sh(vaelab_cmd("train", "--dataset", "digits", "--epochs", 10, "--seed", 0, "--device", args.device,
                          "--precision", "auto", "--no-pictures", "--no-progress", "--out", run), 300)
    if train["rc"] != 0:
        return {"train": train}
    from vaelab.data import load_dataset
    from vaelab.training.validation import loss_terms
    from vaelab.models import from_pretrained

    model = from_pretrained(run).to(args.device)
    data = load_dataset("digits", progress=False)
    on_gpu = loss_terms(model, data.test, batch_size=256)
    with tarfile.open(Path(args.out) / "cuda-run.tar.gz", "w:gz") as tar:
        for name in ("config.json", "metrics.jsonl", "checkpoint.safetensors", "model.safetensors",
                     "evaluation.json"):
            tar.add(run / name, arcname=f"cuda-run/{name}")
    cfg = json.loads((run / "config.json").read_text())
    return {"train": train, "config_train": cfg["train"], "precision_auto": cfg.get("precision_auto"),
            "evaluation_json": json.loads((run / "evaluation.json").read_text()),
            "loss_terms_on_device": {k: float(v) for k, v in on_gpu.items()},
            "torch": torch.__version__}


def reference_network(preset: str):
    """The preset's network as a plain PyTorch user writes it (speed.py's for the seed presets)."""
    from torch import nn

    if preset != "mnist-vae":
        from speed import reference_model

        return reference_model(preset)

    class MLPVAE(nn.Module):
        def __init__(self):
            super().__init__()
            self.encoder = nn.Sequential(nn.Flatten(), nn.Linear(784, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
                                         nn.Linear(512, 64))
            self.decoder = nn.Sequential(nn.Linear(32, 512), nn.ReLU(), nn.Linear(512, 512), nn.ReLU(),
                                         nn.Linear(512, 784), nn.Unflatten(1, (1, 28, 28)))

        def forward(self, x):
            import torch

            mean, logvar = self.encoder(x).chunk(2, dim=1)
            z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)
            return self.decoder(z), mean, logvar

    return MLPVAE()


def plain_loop(preset: str, precision: str, data, args) -> dict:
    import torch
    import torch.nn.functional as F

    from vaelab.config import get_preset

    dev = torch.device(args.device)
    cfg = get_preset(preset).train
    torch.manual_seed(0)
    model = reference_network(preset).to(dev)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    x_train = (data.train.x.float() / 255).to(dev)  # the whole set on the device
    x_test = (data.test.x.float() / 255).to(dev)
    vae, bs = preset != "seed-conv-ae", cfg.batch_size

    def loss_of(x):
        if cfg.binarize:
            x = torch.bernoulli(x)
        with torch.autocast(dev.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            out = model(x)
        if vae:
            logits, mean, logvar = (t.float() for t in out)
            bce = F.binary_cross_entropy_with_logits(logits, x, reduction="none").flatten(1).sum(1)
            kl = -0.5 * (1 + logvar - mean.pow(2) - logvar.exp()).sum(1)
            return (bce + kl).mean()
        return F.binary_cross_entropy_with_logits(out.float(), x)  # per pixel, as Keras and vaelab's val_bce

    epoch_s, test_loss = [], None
    for _ in range(args.epochs):
        sync(dev)
        t0 = time.perf_counter()
        model.train()
        for idx in torch.randperm(len(x_train), device=dev).split(bs):
            loss = loss_of(x_train[idx])
            opt.zero_grad()
            loss.backward()
            opt.step()
        model.eval()
        with torch.no_grad():
            losses = [loss_of(x_test[i:i + bs]) * len(x_test[i:i + bs]) for i in range(0, len(x_test), bs)]
            test_loss = float(torch.stack(losses).sum()) / len(x_test)
        sync(dev)
        epoch_s.append(time.perf_counter() - t0)
    return {"epoch_s": epoch_s, "test_loss": test_loss}


def vaelab_fit(preset: str, precision: str, data, args) -> dict:
    import torch

    from vaelab.config import get_preset
    from vaelab.models import build_model
    from vaelab.training import fit

    p = get_preset(preset)
    torch.manual_seed(0)
    model = build_model(p.model, input_shape=data.train.sample_shape)
    cfg = p.train.replace(epochs=args.epochs, seed=0, precision=precision, device=args.device, progress=False)
    with tempfile.TemporaryDirectory() as run_dir:  # checkpoints and metrics written every epoch, as the CLI
        history = fit(model, data.train, data.test, cfg, out=run_dir)
    loss = history[-1]["val_bce" if preset == "seed-conv-ae" else "val_loss"]  # the AE: BCE per pixel
    return {"epoch_s": [r["time_s"] for r in history], "test_loss": loss}


def section_speed(args, peaks: dict) -> dict:
    import torch

    from vaelab.data import load_dataset

    dev = torch.device(args.device)
    data = load_dataset("mnist", args.data_dir, progress=False)
    if args.train_images:
        data.train = data.train.subset(torch.arange(args.train_images))
        data.test = data.test.subset(torch.arange(args.train_images // 6))
    n_images = len(data.train) + len(data.test)
    rows = []
    for preset in PRESETS:
        for precision in ("fp32", "bf16"):
            for kind, run in (("vaelab", vaelab_fit), ("plain PyTorch loop", plain_loop)):
                if dev.type == "cuda":
                    torch.cuda.reset_peak_memory_stats(dev)
                res = run(preset, precision, data, args)
                steady = statistics.median(res["epoch_s"][1:]) if len(res["epoch_s"]) > 1 else res["epoch_s"][0]
                flops = (len(data.train) + len(data.test) / 3) * TRAIN_FLOPS[preset] / steady
                peak = peaks.get(precision) or peaks.get("fp32")
                row = {"preset": preset, "run": kind, "precision": precision, "steady_epoch_s": round(steady, 3),
                       "epoch_s": [round(e, 3) for e in res["epoch_s"]], "images_per_s": round(n_images / steady),
                       "tflops": round(flops / 1e12, 4), "peak_fraction": round(flops / 1e12 / peak, 6) if peak else None,
                       "test_loss": round(res["test_loss"], 4)}
                if dev.type == "cuda":
                    row["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated(dev) / 2**20)
                rows.append(row)
                print(f"  speed: {row}", flush=True)
    for row in rows:  # vaelab's speed against the plain loop of the same preset and precision
        if row["run"] == "vaelab":
            plain = next(r for r in rows if r["run"] != "vaelab" and r["preset"] == row["preset"]
                         and r["precision"] == row["precision"])
            row["vs_plain_loop"] = round(plain["steady_epoch_s"] / row["steady_epoch_s"], 2)
    return {"epochs": args.epochs, "images_per_epoch": n_images, "rows": rows}


def section_torchrun(args) -> dict:
    run = Path(tempfile.mkdtemp()) / "ddp-run"
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", "-m",
                "vaelab", "train", "--preset", "seed-vae", "--dataset", "mnist", "--data-dir", args.data_dir,
                "--epochs", "1", "--device", args.device, "--no-pictures", "--no-progress", "--out", str(run)]
    if args.train_images:
        torchrun[-1:] = [str(run), "--dataset", "digits"]
    out = {"train": sh(torchrun, 300)}
    if out["train"]["rc"] == 0:
        out["config_train"] = json.loads((run / "config.json").read_text())["train"]
        out["evaluation_json"] = json.loads((run / "evaluation.json").read_text())
        out["evaluate_on_cpu"] = sh(vaelab_cmd("evaluate", run), 300)  # evaluate runs on the CPU
        out["evaluation_json_on_cpu"] = json.loads((run / "evaluation.json").read_text())
    return out


def section_tests(args, seconds: float) -> dict:
    files = [f"tests/{f}" for f in TEST_FILES if (REPO / "tests" / f).is_file()]
    workers = ["-n", "8"] if args.device != "cpu" else []
    res = sh([sys.executable, "-m", "pytest", "-v", "-m", "not slow", "-p", "no:cacheprovider", *workers, *files],
             max(seconds, 30), Path(args.out) / "gpu-tests.log")
    log = (Path(args.out) / "gpu-tests.log").read_text().splitlines()
    counts = {w.lower(): sum(f" {w}" in ln for ln in log) for w in ("PASSED", "FAILED", "ERROR", "SKIPPED", "XFAIL")}
    failed = [ln for ln in log if ln.startswith(("FAILED", "ERROR"))]
    summary = [ln for ln in log if " passed" in ln or " failed" in ln]
    return {**res, "files": files, "counts": counts, "failed": failed[:40],
            "summary": summary[-1] if summary else None, "budget_s": round(seconds)}


# ---------------------------------------------------------------------------------------------------- main


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="folder for gpu.json, gpu-tests.log, cuda-run.tar.gz")
    p.add_argument("--data-dir", default=os.environ.get("VAELAB_DATA") or str(REPO.parent / "shared" / "data"))
    p.add_argument("--device", default="cuda")
    p.add_argument("--epochs", type=int, default=3, help="epochs per speed run [default 3: steady = the last 2]")
    p.add_argument("--train-images", type=int, default=0, help="a dry run on this many MNIST images (0: all)")
    p.add_argument("--sections", default="env,fixture,speed,torchrun,tests")
    p.add_argument("--budget-s", type=float, default=420, help="the tests get what is left of this [default 420]")
    args = p.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.perf_counter()
    report = {"script": "benchmarks/gpu.py", "argv": sys.argv[1:], "started": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    for name in args.sections.split(","):
        print(f"== {name}", flush=True)
        t0 = time.perf_counter()
        try:
            if name == "env":
                result = section_env(args)
            elif name == "fixture":
                result = section_fixture(args)
            elif name == "speed":
                result = section_speed(args, report.get("env", {}).get("matmul_peak_tflops", {}))
            elif name == "torchrun":
                result = section_torchrun(args)
            elif name == "tests":
                result = section_tests(args, args.budget_s - (time.perf_counter() - t_start))
            else:
                raise SystemExit(f"unknown section {name!r}")
        except Exception:  # noqa: BLE001 (recorded; the other sections still run)
            result = {"error": traceback.format_exc()[-3000:]}
        result["section_s"] = round(time.perf_counter() - t0, 1)
        report[name] = result
        (out / "gpu.json").write_text(json.dumps(report, indent=1) + "\n")
        print(json.dumps(result)[:3000], flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
