"""The model family on real data: CVAE samples judged by a classifier, a denoising AE's PSNR gain, IWAE vs VAE.

    python benchmarks/family.py                              # all three parts (about 25 min on 1 CPU thread)
    python benchmarks/family.py --parts cvae --cvae-epochs 20
    python benchmarks/family.py --parts iwae --nll-samples 5000   # the literature's K (slow on a CPU)

(a) CVAE on MNIST: a conditional VAE (MLP 512-256, latent 16, Bernoulli) trains on the training split; then
    100 samples per class are drawn from the prior (decoded means) and classified by a small conv net trained
    here on the MNIST training split (its own test accuracy is reported). The per-class accuracy of the
    samples says whether they are recognisably the digit they were asked for.
(b) Denoising on Fashion-MNIST: the tutorial's conv autoencoder (preset seed-conv-ae) trains on inputs with
    Gaussian noise of std 0.5 added (`--noise gaussian --noise-level 0.5`) and the clean image as target. On
    the test split, with fixed noise: PSNR(noisy, clean) against PSNR(model.reconstruct(noisy), clean).
    The noisy input is scored both as the model sees it (unclipped) and clipped to [0, 1] (what a viewer
    sees, and the stronger baseline); the gain is taken against the clipped one.
(c) IWAE vs VAE on dynamically binarized MNIST: the same MLP VAE trained with the ELBO and with the IWAE
    bound (K=5), the same epochs and steps; the test NLL is the importance-sampled -log p(x) with
    --nll-samples (vaelab.evaluation.nll.importance_nll through evaluate(nll_samples=K), on the test split
    binarized once with a fixed seed, the literature's protocol).

Prints a table per part and writes benchmarks/results/family.json (plus family-*.png pictures beside it).
Run it niced with --threads 1 on a shared machine.
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

import torch  # noqa: E402
from torch import nn  # noqa: E402

from vaelab.config import ModelConfig, TrainConfig, get_preset  # noqa: E402
from vaelab.data import load_dataset  # noqa: E402
from vaelab.evaluation import evaluate  # noqa: E402
from vaelab.evaluation.metrics import psnr  # noqa: E402
from vaelab.generation import class_grid  # noqa: E402
from vaelab.models import build_model  # noqa: E402
from vaelab.plotting import save_image_grid  # noqa: E402
from vaelab.training import fit  # noqa: E402
from vaelab.training.checkpoint import atomic_write_json  # noqa: E402
from vaelab.training.corruption import corrupt  # noqa: E402

PARTS = ("cvae", "denoise", "iwae")
CVAE = ModelConfig(model="cvae", arch="mlp", hidden=(512, 256), latent_dim=16, likelihood="bernoulli",
                   condition_dim=10)
IWAE_VAE = ModelConfig(model="vae", arch="mlp", hidden=(512, 256), latent_dim=32, likelihood="bernoulli")


def _train(model_cfg: ModelConfig, data, epochs: int, seed: int, threads: int, **train) -> tuple:
    """(model, seconds): build from model_cfg for the data, train with the one loop (no validation)."""
    torch.manual_seed(seed)
    model = build_model(model_cfg, input_shape=data.train.sample_shape)
    cfg = TrainConfig(epochs=epochs, seed=seed, threads=threads, progress=False).replace(**train)
    t0 = time.perf_counter()
    fit(model, data.train, None, cfg)
    return model, time.perf_counter() - t0


def _table(rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  " + "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))))


# ----------------------------------------------------------------------------------------- (a) the CVAE


class Classifier(nn.Module):
    """A small MNIST conv net (about 99% test accuracy after 2 epochs): the judge of the CVAE's samples."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (B, 32, 14, 14)
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # (B, 64, 7, 7)
            nn.Flatten(), nn.Linear(64 * 7 * 7, 128), nn.ReLU(), nn.Linear(128, 10))

    def forward(self, x):
        return self.net(x)


def train_classifier(data, epochs: int, seed: int) -> tuple[Classifier, float, float]:
    """(classifier, its test accuracy, seconds)."""
    torch.manual_seed(seed)
    clf = Classifier()
    opt = torch.optim.Adam(clf.parameters(), lr=1e-3)
    gen = torch.Generator().manual_seed(seed)
    t0 = time.perf_counter()
    clf.train()
    for _ in range(epochs):
        perm = torch.randperm(len(data.train), generator=gen)
        for i in range(0, len(perm), 128):
            idx = perm[i:i + 128]
            loss = nn.functional.cross_entropy(clf(data.train.batch(idx)), data.train.labels(idx))
            opt.zero_grad()
            loss.backward()
            opt.step()
    seconds = time.perf_counter() - t0
    return clf, _accuracy(clf, data.test.to_float(), data.test.y), seconds


@torch.inference_mode()
def _predict(clf: Classifier, x: torch.Tensor) -> torch.Tensor:
    clf.eval()
    return torch.cat([clf(x[i:i + 1000]).argmax(1) for i in range(0, len(x), 1000)])


def _accuracy(clf, x, y) -> float:
    return float((_predict(clf, x) == y).float().mean())


def run_cvae(args, out_dir: Path) -> dict:
    mnist = load_dataset("mnist", args.data_dir, progress=False)
    print(f"(a) CVAE on MNIST: {CVAE.arch} {CVAE.hidden}, latent {CVAE.latent_dim}, {args.cvae_epochs} epochs",
          flush=True)
    model, train_s = _train(CVAE, mnist, args.cvae_epochs, args.seed, args.threads)
    ev = evaluate(model, mnist.test, latent=False)
    clf, clf_acc, clf_s = train_classifier(mnist, args.classifier_epochs, args.seed)

    per_class = args.samples_per_class
    samples = class_grid(model, per_class, seed=args.seed)  # (10 * n, 1, 28, 28), class k in rows k*n..
    wanted = torch.arange(10).repeat_interleave(per_class)
    predicted = _predict(clf, samples)
    acc = [float((predicted[wanted == k] == k).float().mean()) for k in range(10)]
    save_image_grid(class_grid(model, 10, seed=args.seed), out_dir / "family-cvae-samples.png", nrow=10,
                    row_labels=[str(k) for k in range(10)],
                    title=f"CVAE on MNIST ({args.cvae_epochs} epochs): one row per class, the same z per column")

    print(f"  CVAE trained in {train_s:.0f} s; test -ELBO {-ev['elbo']:.2f} nats; classifier ({args.classifier_epochs} "
          f"epochs, {clf_s:.0f} s) test accuracy {100 * clf_acc:.2f}%")
    _table([["class"] + [str(k) for k in range(10)] + ["mean"],
            ["accuracy %"] + [f"{100 * a:.0f}" for a in acc] + [f"{100 * sum(acc) / 10:.1f}"]])
    return {"model": CVAE.to_dict(), "epochs": args.cvae_epochs, "train_s": round(train_s, 1),
            "test_neg_elbo": round(-ev["elbo"], 2), "classifier": {"epochs": args.classifier_epochs,
                                                                     "test_accuracy": round(clf_acc, 4),
                                                                     "train_s": round(clf_s, 1)},
            "samples_per_class": per_class, "sample_accuracy_per_class": [round(a, 4) for a in acc],
            "sample_accuracy_mean": round(sum(acc) / 10, 4)}


# ----------------------------------------------------------------------------------------- (b) denoising


def run_denoise(args, out_dir: Path) -> dict:
    fashion = load_dataset("fashion-mnist", args.data_dir, progress=False)
    preset = get_preset("seed-conv-ae")
    sigma = args.noise_level
    print(f"(b) denoising AE on Fashion-MNIST: seed-conv-ae, Gaussian noise sigma {sigma}, {args.dae_epochs} "
          "epochs", flush=True)
    model, train_s = _train(preset.model, fashion, args.dae_epochs, args.seed, args.threads,
                            batch_size=preset.train.batch_size, noise="gaussian", noise_level=sigma)
    gen = torch.Generator().manual_seed(args.seed + 1)  # the same noise for every model compared
    noisy_psnr, clipped_psnr, denoised_psnr, clean_psnr = [], [], [], []
    with torch.inference_mode():
        for start in range(0, len(fashion.test), 1000):
            x = fashion.test.batch(slice(start, start + 1000))
            noisy = corrupt(x, "gaussian", sigma, gen)
            noisy_psnr.append(psnr(x, noisy))
            clipped_psnr.append(psnr(x, noisy.clamp(0, 1)))
            denoised_psnr.append(psnr(x, model.reconstruct(noisy)))
            clean_psnr.append(psnr(x, model.reconstruct(x)))
            if start == 0:
                strip = torch.cat([x[:10], noisy[:10].clamp(0, 1), model.reconstruct(noisy[:10])])
    result = {name: round(float(torch.cat(v).mean()), 2) for name, v in
              (("psnr_noisy", noisy_psnr), ("psnr_noisy_clipped", clipped_psnr),
               ("psnr_denoised", denoised_psnr), ("psnr_reconstructed_clean", clean_psnr))}
    result["gain_db"] = round(result["psnr_denoised"] - result["psnr_noisy_clipped"], 2)
    result["gain_db_vs_unclipped"] = round(result["psnr_denoised"] - result["psnr_noisy"], 2)
    save_image_grid(strip, out_dir / "family-denoising.png", nrow=10, row_labels=["clean", "noisy", "denoised"],
                    title=f"Denoising AE on Fashion-MNIST test images, Gaussian noise sigma {sigma} "
                          f"(noisy shown clipped to [0, 1])")
    print(f"  trained in {train_s:.0f} s; PSNR on the {len(fashion.test)} test images (dB):")
    _table([["input", "PSNR dB"], ["noisy (as the model sees it)", f"{result['psnr_noisy']:.2f}"],
            ["noisy, clipped to [0, 1]", f"{result['psnr_noisy_clipped']:.2f}"],
            ["denoised", f"{result['psnr_denoised']:.2f}"],
            ["gain over clipped noisy", f"{result['gain_db']:+.2f}"],
            ["(clean input reconstructed)", f"{result['psnr_reconstructed_clean']:.2f}"]])
    return {"model": preset.model.to_dict(), "epochs": args.dae_epochs, "noise": "gaussian", "noise_level": sigma,
            "train_s": round(train_s, 1), **result}


# ----------------------------------------------------------------------------------------- (c) IWAE vs VAE


def run_iwae(args) -> dict:
    mnist = load_dataset("mnist", args.data_dir, progress=False)
    test = mnist.test if not args.nll_test_size else mnist.test.subset(torch.arange(args.nll_test_size))
    print(f"(c) IWAE (K={args.iw_samples}) vs VAE on binarized MNIST: {IWAE_VAE.arch} {IWAE_VAE.hidden}, latent "
          f"{IWAE_VAE.latent_dim}, {args.iwae_epochs} epochs each; NLL with K={args.nll_samples} on {len(test)} "
          "test images", flush=True)
    rows = {}
    for name, k in (("vae", 1), (f"iwae-k{args.iw_samples}", args.iw_samples)):
        model, train_s = _train(IWAE_VAE, mnist, args.iwae_epochs, args.seed, args.threads, binarize=True,
                                iw_samples=k)
        t0 = time.perf_counter()
        ev = evaluate(model, test, binarize=True, nll_samples=args.nll_samples)
        rows[name] = {"iw_samples": k, "train_s": round(train_s, 1), "nll": round(ev["nll"], 2),
                      "nll_se": round(ev["nll_se"], 2), "test_neg_elbo": round(-ev["elbo"], 2),
                      "active_units": ev["active_units"], "eval_s": round(time.perf_counter() - t0, 1)}
        print(f"  {name}: trained in {train_s:.0f} s, NLL {ev['nll']:.2f} nats", flush=True)
    _table([["objective", "test NLL", "± se", "test -ELBO", "active units", "train s"]] +
           [[n, f"{r['nll']:.2f}", f"{r['nll_se']:.2f}", f"{r['test_neg_elbo']:.2f}", str(r["active_units"]),
             f"{r['train_s']:.0f}"] for n, r in rows.items()])
    return {"model": IWAE_VAE.to_dict(), "epochs": args.iwae_epochs, "nll_samples": args.nll_samples,
            "test_images": len(test), "binarized": True, "runs": rows}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated subset of {','.join(PARTS)}")
    p.add_argument("--data-dir", default=os.environ.get("VAELAB_DATA") or str(REPO.parent / "shared" / "data"))
    p.add_argument("--threads", type=int, default=1, help="torch threads [default 1: fastest on a shared CPU]")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--cvae-epochs", type=int, default=10)
    p.add_argument("--classifier-epochs", type=int, default=2)
    p.add_argument("--samples-per-class", type=int, default=100)
    p.add_argument("--dae-epochs", type=int, default=10)
    p.add_argument("--noise-level", type=float, default=0.5)
    p.add_argument("--iwae-epochs", type=int, default=10)
    p.add_argument("--iw-samples", type=int, default=5)
    p.add_argument("--nll-samples", type=int, default=200, help="importance samples of the test NLL "
                   "[default 200; the literature uses 5000]")
    p.add_argument("--nll-test-size", type=int, default=0, help="score only the first N test images [default all]")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "family.json"))
    args = p.parse_args(argv)
    parts = [s.strip() for s in args.parts.split(",") if s.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        p.error(f"unknown parts {unknown}; choose from {list(PARTS)}")
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    # parts run earlier are kept, so one part can be rerun on its own
    result = {}
    if out.is_file():
        import json

        result = json.loads(out.read_text())
    result["machine"] = {"python": platform.python_version(), "torch": torch.__version__,
                         "cpus": os.cpu_count(), "threads": args.threads}
    t0 = time.perf_counter()
    for part in parts:
        started = time.perf_counter()
        if part == "cvae":
            result["cvae"] = run_cvae(args, out.parent)
        elif part == "denoise":
            result["denoise"] = run_denoise(args, out.parent)
        else:
            result["iwae"] = run_iwae(args)
        result[part]["total_s"] = round(time.perf_counter() - started, 1)
        atomic_write_json(out, result)
        print(flush=True)
    print(f"done in {(time.perf_counter() - t0) / 60:.1f} min; wrote {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
