"""Colour images: a VAE and a VQ-VAE with the residual networks (arch resnet) on the emoji set (64x64 RGB on
white, ../shared/data/emoji), each trained for a stated CPU budget, against what the files themselves cost.

    python benchmarks/colour.py                                # 30 min per model, the issue's budget
    python benchmarks/colour.py --budget-min 10 --models vae   # a shorter sitting (the JSON says which)

For each model: train with the preset's settings (resnet-64, vqvae-resnet-64; --width-scale narrows every level,
the presets are sized for more than a CPU) for as many epochs as the budget holds (timed on the second epoch of a
throwaway copy, whose two epochs count against the budget; the cosine schedule spans them); then on the test split:
  - bits/dim of the 8-bit test pixels: the VAE's K-sample importance estimate of -log p(x) (--nll-samples, default
    100; a lower bound on log p tightening with K) and its ELBO bound; for the VQ-VAE a two-part code: the test
    codes under its PixelCNN code prior (fitted on the training codes for --prior-epochs after the budget, timed)
    plus the reconstruction term -log p(x | codes), an upper bound on -log p(x);
  - PSNR and SSIM of the reconstructions (the likelihood's mean at the posterior mean / the quantized codes);
  - pictures beside the JSON: reconstructions (originals above), for the VAE prior samples and interpolations.
The anchor: the same test images, as they enter the model (RGB on white, 8 bits per sub-pixel), stored as the
smallest lossless PNG Pillow writes (optimize, level 9) and as lossless WebP (method 6), in bits per sub-pixel.

Writes benchmarks/results/colour.json and colour-<model>-*.png. Run it niced with --threads 2 on a quiet machine.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from PIL import Image, features  # noqa: E402

from vaelab.config import get_preset  # noqa: E402
from vaelab.data import load_dataset  # noqa: E402
from vaelab.evaluation import loss_terms  # noqa: E402
from vaelab.evaluation.metrics import psnr, ssim  # noqa: E402
from vaelab.evaluation.nll import importance_nll  # noqa: E402
from vaelab.generation import interpolate  # noqa: E402
from vaelab.models import build_model  # noqa: E402
from vaelab.plotting import save_image_grid  # noqa: E402
from vaelab.prior import encode_codes, fit_prior, prior_nll  # noqa: E402
from vaelab.training import fit  # noqa: E402
from vaelab.training.checkpoint import atomic_write_json  # noqa: E402

PRESETS = {"vae": "resnet-64", "vqvae": "vqvae-resnet-64"}
RESULTS = REPO / "benchmarks" / "results"


def file_bits(test) -> dict:
    """Bits per sub-pixel of the test images as lossless PNG and WebP files (the pixels the model sees)."""
    x = test.batch(torch.arange(len(test)))
    pixels = (x * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()  # (N, H, W, 3)
    dims = pixels[0].size
    out = {}
    for fmt, kwargs in (("png", {"format": "PNG", "optimize": True, "compress_level": 9}),
                        ("webp", {"format": "WEBP", "lossless": True, "quality": 100, "method": 6})):
        if fmt == "webp" and not features.check("webp"):
            continue
        sizes = []
        for img in pixels:
            buf = io.BytesIO()
            Image.fromarray(img, "RGB").save(buf, **kwargs)
            sizes.append(buf.tell())
        sizes = np.asarray(sizes, dtype=np.float64)
        out[fmt] = {"bits_per_dim": float((8 * sizes / dims).mean()), "bytes_mean": float(sizes.mean())}
    return out


def train_for(model, splits, budget_s: float, run_dir: Path, train_cfg, seed: int) -> dict:
    """As many epochs as the budget holds, planned up front so that the preset's cosine schedule spans them: two
    epochs of a throwaway copy time a steady epoch (their time counts against the budget), then one `fit`."""
    import copy

    t0 = time.perf_counter()
    trial = fit(copy.deepcopy(model), splits.train, None, train_cfg.replace(epochs=2), progress=False, seed=seed)
    epoch_s = trial[-1]["time_s"]  # the second epoch: the first carries one-off costs (up to 1.5x slower)
    epochs = max(1, int((budget_s - (time.perf_counter() - t0)) // epoch_s))
    print(f"  one epoch takes {epoch_s:.1f} s: {epochs} epochs", flush=True)
    history = fit(model, splits.train, None, train_cfg.replace(epochs=epochs), out=run_dir, progress=False,
                  seed=seed)
    spent = time.perf_counter() - t0
    print(f"  {epochs} epochs: train loss {history[0]['train_loss']:.1f} -> {history[-1]['train_loss']:.1f}, "
          f"{spent:.0f} s of {budget_s:.0f}", flush=True)
    return {"epochs": epochs, "train_s": round(spent, 1), "epoch_s": round(epoch_s, 1),
            "first_train_loss": history[0]["train_loss"], "last_train_loss": history[-1]["train_loss"]}


def quality(model, test) -> dict:
    x = test.batch(torch.arange(len(test)))
    model.eval()
    recon = torch.cat([model.reconstruct(x[i:i + 64]) for i in range(0, len(x), 64)])
    return {"psnr_db": float(psnr(x, recon).mean()), "ssim": float(ssim(x, recon).mean())}


def pictures(model, kind: str, test, out: Path) -> list[str]:
    x = test.batch(torch.arange(0, len(test), max(1, len(test) // 10))[:10])
    written = [save_image_grid(torch.cat([x, model.reconstruct(x)]), out / f"colour-{kind}-reconstructions.png",
                               nrow=len(x), row_labels=["test", "reconstruction"])]
    if kind == "vae":
        gen = torch.Generator().manual_seed(0)
        written.append(save_image_grid(model.sample(20, generator=gen), out / f"colour-{kind}-samples.png", nrow=10))
        strip = interpolate(model, x[:4], x[4:8], steps=8)  # (4, 8, C, H, W)
        written.append(save_image_grid(strip.flatten(0, 1), out / f"colour-{kind}-interpolations.png", nrow=8))
    return [Path(p).name for p in written]


def vqvae_bits(model, splits, recon_nats: float, to_bits: float, args) -> dict:
    """The VQ-VAE's bits/dim as a two-part code: -log p(x) <= -log p(codes) - log p(x | codes) for the encoder's
    codes, with p(codes) the unconditional PixelCNN prior (vaelab's `train-prior`) fitted on the training codes for
    --prior-epochs (outside the model's budget, timed); an upper bound on the NLL, comparable with the VAE's."""
    t = time.perf_counter()
    history = fit_prior(model, splits.train, splits.test, epochs=args.prior_epochs, conditional=False,
                        seed=args.seed)
    prior_s = time.perf_counter() - t
    prior_nats = prior_nll(model.prior, encode_codes(model, splits.test))
    print(f"  code prior: {args.prior_epochs} epochs in {prior_s:.0f} s, test {prior_nats:.1f} nats per code map",
          flush=True)
    return {"prior_epochs": args.prior_epochs, "prior_s": round(prior_s, 1),
            "prior_test_bits_per_code": history[-1].get("test_bits_per_code"),
            "prior_bits_per_dim": prior_nats * to_bits, "nll_bits_per_dim": (prior_nats + recon_nats) * to_bits,
            "nll_kind": "two-part code: prior NLL of the codes + reconstruction NLL given them (an upper bound)"}


def run_model(kind: str, splits, args, workdir: Path) -> dict:
    preset = get_preset(PRESETS[kind])
    channels = tuple(max(8, int(c * args.width_scale)) for c in preset.model.channels)
    model_cfg = preset.model.replace(channels=channels, input_shape=tuple(splits.train.sample_shape))
    torch.manual_seed(args.seed)
    model = build_model(model_cfg)
    train_cfg = preset.train.replace(epochs=1, threads=args.threads)
    print(f"{kind}: {PRESETS[kind]}, channels {list(channels)}, {sum(p.numel() for p in model.parameters()):,} "
          f"parameters, budget {args.budget_min} min", flush=True)
    row = {"model": kind, "preset": PRESETS[kind], "channels": list(channels),
           "parameters": sum(p.numel() for p in model.parameters()), "budget_min": args.budget_min}
    row.update(train_for(model, splits, args.budget_min * 60, workdir / kind, train_cfg, args.seed))
    terms = loss_terms(model, splits.test)
    dims = math.prod(splits.test.sample_shape)
    to_bits = 1 / (dims * math.log(2))
    if kind == "vae":
        t = time.perf_counter()
        nll = importance_nll(model, splits.test, n_samples=args.nll_samples, batch_size=16, seed=0)
        row.update({"elbo_bits_per_dim": terms["loss"] * to_bits, "nll_bits_per_dim": nll["nll_bits_per_dim"],
                    "nll_se_bits_per_dim": nll["nll_se"] * to_bits, "nll_samples": args.nll_samples,
                    "nll_s": round(time.perf_counter() - t, 1)})
    else:  # a two-part code: the codes under the fitted prior, then the pixels given the codes
        row["recon_bits_per_dim_given_codes"] = terms["recon"] * to_bits
        row.update(vqvae_bits(model, splits, terms["recon"], to_bits, args))
    row.update(quality(model, splits.test))
    row["pictures"] = pictures(model, kind, splits.test, args.out.parent)
    return row


def run(args, command: str) -> dict:
    torch.set_num_threads(args.threads)
    splits = load_dataset(args.data_dir / "emoji", progress=False)
    print(f"emoji: {len(splits.train)} train, {len(splits.test)} test, {tuple(splits.train.sample_shape)}", flush=True)
    anchors = file_bits(splits.test)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for kind in args.models.split(","):
            rows.append(run_model(kind, splits, args, Path(tmp)))
    return {"benchmark": "colour", "dataset": "emoji (64x64 RGB on white, the fixed test split)",
            "test_images": len(splits.test), "files": anchors, "rows": rows, "threads": args.threads,
            "width_scale": args.width_scale, "torch": torch.__version__, "python": platform.python_version(),
            "command": command}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data-dir", type=Path, default=REPO.parent / "shared" / "data")
    p.add_argument("--models", default="vae,vqvae")
    p.add_argument("--budget-min", type=float, default=30.0, help="training minutes per model")
    p.add_argument("--width-scale", type=float, default=0.5, help="multiply the presets' level widths")
    p.add_argument("--nll-samples", type=int, default=100)
    p.add_argument("--prior-epochs", type=int, default=20, help="epochs of the VQ-VAE's code prior [default 20]")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=RESULTS / "colour.json")
    p.add_argument("--merge", nargs="+", type=Path, metavar="JSON", default=None,
                   help="instead of running: merge the rows of these result files (models run in separate processes "
                        "side by side, e.g. --models vae --threads 1 and --models vqvae --threads 1) into --out")
    args = p.parse_args(argv)
    command = "python benchmarks/colour.py " + " ".join(map(str, sys.argv[1:] if argv is None else argv))
    if args.merge:
        parts = [json.loads(f.read_text()) for f in args.merge]
        rows = [{**r, "threads": part["threads"], "command": part["command"]} for part in parts for r in part["rows"]]
        result = {**parts[0], "rows": rows, "threads": sorted({part["threads"] for part in parts}),
                  "command": command, "merged": [part["command"] for part in parts]}
    else:
        result = run(args, command)
    anchors, rows = result["files"], result["rows"]
    args.out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(args.out, result)
    print(f"\nthe test images as files: " + ", ".join(f"{k} {v['bits_per_dim']:.3f} bits/dim" for k, v in anchors.items()))
    print(f"{'model':7} {'epochs':>6} {'train s':>8} {'bits/dim (IS)':>13} {'ELBO|recon':>10} {'PSNR':>6} {'SSIM':>6}")
    for r in rows:
        print(f"{r['model']:7} {r['epochs']:>6} {r['train_s']:>8.0f} {r.get('nll_bits_per_dim', float('nan')):>13.3f} "
              f"{r.get('elbo_bits_per_dim', r.get('recon_bits_per_dim_given_codes', float('nan'))):>10.3f} "
              f"{r['psnr_db']:>6.2f} {r['ssim']:>6.3f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
