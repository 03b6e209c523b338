"""The resnet-64 preset's training step in vaelab against a plain PyTorch loop of the same network (issue 20).

Both sides train the preset's VAE (arch resnet, 4 levels, discretized logistic mixture) on the same 64x64 RGB
emoji batches, with the same Adam settings, from the same initial weights:

- vaelab: `vaelab.training.fit` for one epoch over `--steps` batches (its loop: shuffling, the NaN guard on the
  loss and the gradient norm, per-sample loss terms, the epoch's metrics), no validation, no run directory;
- plain: the loop a user would write around the same encoder and decoder: encode, reparameterize, decode,
  the likelihood's NLL (losses.recon_nll, the one formula) plus the closed-form Gaussian KL, mean over the
  batch, zero_grad, backward, Adam step.

Each round is a short run from a fresh Adam on both sides (a fit call makes its own optimizer, so the plain
loop makes one too, inside its timing): both pay the optimizer's state initialisation once per round, and vaelab
also its per-call checks (the likelihood's check of the data, the config's validation). The two are paired and
alternated in one process (vaelab first in odd rounds, plain first in even ones), so the
machine's fast and slow spells fall on both; each round's ratio compares the two runs of that round. Round 0 is
a warm-up and is not counted. The verdict reads the median of the per-round ratios (vaelab / plain seconds per
step; below 1 means vaelab is faster).

    python benchmarks/resnet_speed.py --data-dir ../shared/data --rounds 6 --steps 5 --threads 2

Prints a table and writes benchmarks/results/resnet-speed.json (`--out` for another file).
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

import torch  # noqa: E402

from vaelab.config import get_preset  # noqa: E402
from vaelab.data import load_dataset  # noqa: E402
from vaelab.losses import recon_nll  # noqa: E402
from vaelab.models import build_model  # noqa: E402
from vaelab.training import fit  # noqa: E402
from vaelab.io import atomic_write_json  # noqa: E402

PRESET = "resnet-64"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def plain_steps(encoder, decoder, optimizer, likelihood, data, order: torch.Tensor, batch_size: int,
                device: torch.device) -> None:
    """The plain PyTorch loop: one Adam step per batch of `order`."""
    encoder.train()
    decoder.train()
    for start in range(0, len(order), batch_size):
        x = data.batch(order[start:start + batch_size]).to(device)  # (B, 3, 64, 64) in [0, 1]
        mean, logvar = encoder(x).chunk(2, dim=1)  # (B, L) each
        z = mean + torch.exp(0.5 * logvar) * torch.randn_like(mean)
        raw = decoder(z)  # (B, 45, 64, 64): 5 logistics x 3 parameters per sub-pixel
        kl = 0.5 * (mean.pow(2) + logvar.exp() - 1 - logvar).sum(1)
        loss = (recon_nll(x, raw, likelihood) + kl).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data-dir", default=os.environ.get("VAELAB_DATA") or str(REPO.parent / "shared" / "data"),
                   help="the folder holding emoji/ (default $VAELAB_DATA, else ../shared/data)")
    p.add_argument("--rounds", type=int, default=6, help="paired rounds after the warm-up round")
    p.add_argument("--steps", type=int, default=5, help="training steps per side per round")
    p.add_argument("--batch-size", type=int, default=0, help="0: the preset's batch size")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads of both sides")
    p.add_argument("--device", default="cpu", help="cpu or cuda")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "resnet-speed.json"))
    args = p.parse_args(argv)

    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    folder = Path(args.data_dir) / "emoji"
    splits = load_dataset(folder)
    preset = get_preset(PRESET)
    bs = args.batch_size or preset.train.batch_size
    n = args.steps * bs
    if len(splits.train) < n:
        p.error(f"--steps {args.steps} x batch {bs} = {n} images, but {folder}/train holds {len(splits.train)}")
    data = splits.train.subset(torch.arange(n))

    torch.manual_seed(0)
    model = build_model(preset.model, input_shape=data.sample_shape).to(device)
    torch.manual_seed(0)
    twin = build_model(preset.model, input_shape=data.sample_shape).to(device)  # the plain loop's copy
    twin.load_state_dict(model.state_dict())
    params = sum(q.numel() for q in model.parameters())
    train_cfg = preset.train.replace(epochs=1, batch_size=bs, lr_schedule="constant", progress=False,
                                     threads=args.threads, device=str(device))
    likelihood = twin.likelihood
    gen = torch.Generator().manual_seed(1)

    def run_vaelab() -> float:
        _sync(device)
        t = time.perf_counter()
        fit(model, data, None, train_cfg)
        _sync(device)
        return (time.perf_counter() - t) / args.steps

    def run_plain() -> float:
        order = torch.randperm(n, generator=gen)
        _sync(device)
        t = time.perf_counter()
        # a fresh Adam at fit's lr (PyTorch's default implementation), as every fit call makes its own
        optimizer = torch.optim.Adam(twin.parameters(), lr=train_cfg.lr)
        plain_steps(twin.encoder, twin.decoder, optimizer, likelihood, data, order, bs, device)
        _sync(device)
        return (time.perf_counter() - t) / args.steps

    rows = []
    print(f"{PRESET} on {folder} ({tuple(data.sample_shape)}), {params:,} parameters, batch {bs}, {args.steps} "
          f"steps per side per round, device {device}, {args.threads} threads, torch {torch.__version__}")
    print(f"{'round':>5}  {'first':>6}  {'vaelab s/step':>13}  {'plain s/step':>12}  {'vaelab/plain':>12}")
    for r in range(args.rounds + 1):
        first = "vaelab" if r % 2 else "plain"
        if first == "vaelab":
            v = run_vaelab()
            pl = run_plain()
        else:
            pl = run_plain()
            v = run_vaelab()
        row = {"round": r, "first": first, "vaelab_s_per_step": round(v, 4), "plain_s_per_step": round(pl, 4),
               "ratio": round(v / pl, 4), "warmup": r == 0}
        rows.append(row)
        print(f"{r:>5}  {first:>6}  {v:>13.4f}  {pl:>12.4f}  {v / pl:>12.3f}{'  (warm-up)' if r == 0 else ''}",
              flush=True)
    counted = [row for row in rows if not row["warmup"]]
    ratios = [row["ratio"] for row in counted]
    summary = {
        "median_ratio": round(statistics.median(ratios), 4),
        "min_ratio": min(ratios), "max_ratio": max(ratios),
        "median_vaelab_s_per_step": round(statistics.median(r["vaelab_s_per_step"] for r in counted), 4),
        "median_plain_s_per_step": round(statistics.median(r["plain_s_per_step"] for r in counted), 4),
    }
    summary["vaelab_not_slower"] = summary["median_ratio"] <= 1.0
    print(f"median vaelab/plain over {len(ratios)} rounds: {summary['median_ratio']:.3f} (range "
          f"{summary['min_ratio']:.3f}-{summary['max_ratio']:.3f}); vaelab "
          f"{'is not slower' if summary['vaelab_not_slower'] else 'is SLOWER'}")
    result = {
        "benchmark": "resnet_speed", "preset": PRESET, "dataset": "emoji (64x64 RGB, train split)",
        "batch_size": bs, "steps_per_side_per_round": args.steps, "rounds": args.rounds, "parameters": params,
        "device": str(device), "device_name": (torch.cuda.get_device_name(device) if device.type == "cuda"
                                               else platform.processor() or platform.machine()),
        "threads": args.threads, "torch": torch.__version__, "python": platform.python_version(),
        "command": "python benchmarks/resnet_speed.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "rows": rows, "summary": summary,
    }
    atomic_write_json(Path(args.out), result)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
