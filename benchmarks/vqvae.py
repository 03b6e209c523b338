"""The VQ-VAE on MNIST: codebook health, reconstruction against the seed conv AE, the collapse the fixes prevent,
and generation through the code prior judged by a digit classifier.

    python benchmarks/vqvae.py                          # everything (about 90 min on 1 busy CPU thread)
    python benchmarks/vqvae.py --parts vqvae,ablation   # just the codebook parts
    python benchmarks/vqvae.py --parts priors --prior-epochs 5

(a) vqvae: the VQ-VAE with K=64 codes of size 16 on a 7x7 grid (channels 32,64; every other setting its
    default: EMA decay 0.99, k-means init, restart after 20 unused steps, β 0.25), 10 epochs, batch 128,
    trained one epoch at a time through resume (so an interrupted benchmark continues where it stopped); the
    code usage of every epoch comes from the training loop's metrics rows. Against it the tutorial's conv AE (preset seed-conv-ae, a
    continuous 16x7x7 latent) with its own batch size (256), the same epochs. Test MSE per pixel, code usage on
    the test split.
(b) ablation: the same VQ-VAE without k-means init and without dead-code restarts (--no-vq-kmeans-init
    --vq-restart-after 0): the codebook collapse, in codes used per epoch and on the test split.
(c) priors: the gated PixelCNN (vaelab's prior: 32 channels, 8 layers) and a small decoder-only transformer
    (defined here, the candidate it was chosen over: 64 wide, 4 layers, about the same cost per epoch), both
    class-conditional, trained on the codes of (a): test NLL in bits per code after every epoch, seconds per
    epoch, seconds to sample 100 code grids.
(d) samples: 100 samples per class from (a) + its PixelCNN prior of (c), judged by a small conv net trained here on
    the MNIST training split (benchmarks/family.py's): mean max-softmax confidence, the fraction classified
    with confidence > 0.9, and the fraction classified as the class asked for; real test digits as reference.

Prints a table per part and writes benchmarks/results/vqvae.json (and vqvae-samples.png beside it).
Run it niced with --threads 1 on a shared machine.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))
sys.path.insert(0, str(REPO / "benchmarks"))

import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402
from torch import nn  # noqa: E402

from family import train_classifier  # noqa: E402
from vaelab.config import ModelConfig, get_preset  # noqa: E402
from vaelab.data import load_dataset  # noqa: E402
from vaelab.evaluation import loss_terms  # noqa: E402
from vaelab.models import build_model, from_pretrained  # noqa: E402
from vaelab.models.prior import CodePrior  # noqa: E402
from vaelab.models.vqvae import codebook_usage  # noqa: E402
from vaelab.plotting import save_image_grid  # noqa: E402
from vaelab.prior import encode_codes, fit_prior, prior_nll  # noqa: E402
from vaelab.training import fit  # noqa: E402
from vaelab.training.checkpoint import atomic_write_json, atomic_write_text  # noqa: E402

PARTS = ("vqvae", "ablation", "priors", "samples")
VQVAE = ModelConfig(model="vqvae", channels=(32, 64), latent_dim=16, codebook_size=64)
ABLATED = VQVAE.replace(vq_kmeans_init=False, vq_restart_after=0)
PRIOR = {"layers": 8, "channels": 32}  # vaelab.prior defaults
TRANSFORMER = {"layers": 4, "channels": 64, "heads": 4}


def _table(rows: list[list[str]]) -> None:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    for r in rows:
        print("  " + "  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths))))


def train_vqvae(cfg: ModelConfig, data, epochs: int, seed: int, threads: int, run: str | None = None,
                precision: str = "fp32") -> tuple:
    """(model, per-epoch rows with the quantizer's code usage, seconds): one epoch per fit call, resumed from
    the run directory's checkpoint, so the rows can read the quantizer between epochs. With a run directory
    that already holds some of these epochs (an interrupted benchmark), it continues after them."""
    torch.manual_seed(seed)
    model = build_model(cfg, input_shape=data.train.sample_shape)
    with tempfile.TemporaryDirectory() as tmp:
        run = Path(run or tmp)
        rows_file = run / "benchmark_rows.jsonl"
        rows = [json.loads(line) for line in rows_file.read_text().splitlines()] if rows_file.is_file() else []
        if rows and (json.loads((run / "config.json").read_text())["model"] != model.config.to_dict()
                     or not (run / "checkpoint.safetensors").is_file()):
            rows = []  # another model's run: start over
        seconds = sum(r["bench_s"] for r in rows)
        if rows:  # continue an interrupted benchmark: the model as it was after its last finished epoch
            fit(model, data.train, None, epochs=len(rows), batch_size=128, seed=seed, threads=threads,
                progress=False, out=run, resume=True, precision=precision)
            print(f"  continuing after epoch {len(rows)} in {run}", flush=True)
        for epoch in range(len(rows) + 1, epochs + 1):
            t0 = time.perf_counter()
            history = fit(model, data.train, None, epochs=epoch, batch_size=128, seed=seed, threads=threads,
                          progress=False, out=run, resume=epoch > 1, precision=precision)
            seconds += time.perf_counter() - t0
            # the loop's metrics row carries the epoch's code usage (train_perplexity, train_codes_used, ...)
            rows.append({**history[-1], "bench_s": round(time.perf_counter() - t0, 1)})
            atomic_write_text(rows_file, "".join(json.dumps(r) + "\n" for r in rows))
            print(f"  epoch {epoch}: train loss {rows[-1]['train_loss']:.2f}, mse {rows[-1]['train_mse']:.5f}, "
                  f"perplexity {rows[-1]['train_perplexity']:.1f}, codes used {rows[-1]['train_codes_used']:.2f}, "
                  f"restarts {rows[-1]['train_code_restarts']} ({seconds:.0f} s)", flush=True)
    model.eval()
    return model, rows, seconds


def _test_report(model, data) -> dict:
    terms = loss_terms(model, data.test)
    return {"test_mse": terms["mse"], "test_bce": terms["bce"], **{f"test_{k}": v for k, v in
                                                                   codebook_usage(model, data.test).items()}}


def run_vqvae(args, mnist) -> tuple[dict, object]:
    print(f"(a) VQ-VAE, K={VQVAE.codebook_size} codes of size {VQVAE.latent_dim} on a 7x7 grid, {args.epochs} "
          "epochs", flush=True)
    model, rows, seconds = train_vqvae(VQVAE, mnist, args.epochs, args.seed, args.threads, args.vqvae_run,
                                       args.precision)
    vq = {"model": VQVAE.to_dict(), "epochs": args.epochs, "batch_size": 128, "train_s": round(seconds, 1),
          "per_epoch": rows, **_test_report(model, mnist)}
    print(f"  seed-conv-ae, {args.epochs} epochs", flush=True)
    preset = get_preset("seed-conv-ae")
    torch.manual_seed(args.seed)
    ae = build_model(preset.model, input_shape=mnist.train.sample_shape)
    with tempfile.TemporaryDirectory() as tmp:  # a run directory, so an interrupted benchmark resumes
        run = Path(f"{args.vqvae_run}-seed-conv-ae" if args.vqvae_run else tmp)
        history = fit(ae, mnist.train, None, preset.train.replace(epochs=args.epochs, seed=args.seed,
                                                                  threads=args.threads, progress=False,
                                                                  precision=args.precision),
                      out=run, resume=(run / "checkpoint.safetensors").is_file())
    ae_s = sum(r["time_s"] for r in history)
    terms = loss_terms(ae, mnist.test)
    seed_ae = {"epochs": args.epochs, "batch_size": preset.train.batch_size, "train_s": round(ae_s, 1),
               "test_mse": terms["mse"], "test_bce": terms["bce"]}
    _table([["model", "test MSE", "test BCE", "perplexity", "codes used", "dead codes", "train s"],
            [f"vqvae K={VQVAE.codebook_size}", f"{vq['test_mse']:.5f}", f"{vq['test_bce']:.4f}",
             f"{vq['test_perplexity']:.1f}", f"{vq['test_codes_used']:.2f}", str(vq["test_dead_codes"]),
             f"{seconds:.0f}"],
            ["seed-conv-ae", f"{seed_ae['test_mse']:.5f}", f"{seed_ae['test_bce']:.4f}", "-", "-", "-", f"{ae_s:.0f}"]])
    ok = vq["test_dead_codes"] == 0 and vq["test_perplexity"] >= 30 and vq["test_mse"] < seed_ae["test_mse"]
    print(f"  acceptance (no dead codes, perplexity >= 30, MSE below seed-conv-ae): {'met' if ok else 'NOT met'}")
    return {"vqvae": vq, "seed_conv_ae": seed_ae, "acceptance_met": ok}, model


def run_ablation(args, mnist) -> dict:
    print(f"(b) the same VQ-VAE without k-means init and dead-code restarts, {args.epochs} epochs", flush=True)
    model, rows, seconds = train_vqvae(ABLATED, mnist, args.epochs, args.seed, args.threads,
                                       f"{args.vqvae_run}-ablated" if args.vqvae_run else None)
    out = {"model": ABLATED.to_dict(), "train_s": round(seconds, 1), "per_epoch": rows, **_test_report(model, mnist)}
    print(f"  test: codes used {out['test_codes_used']:.2f}, perplexity {out['test_perplexity']:.1f}, dead codes "
          f"{out['test_dead_codes']}, MSE {out['test_mse']:.5f}")
    return out


class TransformerPrior(nn.Module):
    """The candidate prior the PixelCNN was measured against: a small decoder-only transformer (pre-norm, causal
    self-attention) over the raster-ordered code sequence, the class embedding as the start token."""

    def __init__(self, codebook_size, grid, channels=64, layers=4, classes=0, heads=4):
        super().__init__()
        self.codebook_size, self.grid = codebook_size, tuple(grid)
        length = grid[0] * grid[1]
        self.embed = nn.Embedding(codebook_size, channels)
        self.start = nn.Embedding(max(classes, 1), channels)
        self.position = nn.Parameter(torch.randn(length, channels) * 0.02)
        block = nn.TransformerEncoderLayer(channels, heads, 4 * channels, dropout=0.0, batch_first=True,
                                           norm_first=True)
        self.blocks = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(channels)
        self.head = nn.Linear(channels, codebook_size)
        self.register_buffer("mask", nn.Transformer.generate_square_subsequent_mask(length), persistent=False)

    def forward(self, indices, labels=None):  # (B, h, w) -> logits (B, K, h, w)
        b, seq = len(indices), indices.flatten(1)
        labels = labels if labels is not None else torch.zeros(b, dtype=torch.long, device=seq.device)
        x = torch.cat([self.start(labels)[:, None], self.embed(seq[:, :-1])], 1) + self.position  # token i -> code i
        y = self.head(self.norm(self.blocks(x, mask=self.mask, is_causal=True)))  # (B, L, K)
        return y.transpose(1, 2).reshape(b, self.codebook_size, *self.grid)

    def log_prob(self, indices, labels=None):
        return -F.cross_entropy(self(indices, labels), indices, reduction="none").flatten(1).sum(1)

    sample = CodePrior.sample  # the same raster-order sampling loop


def _fit_candidate(prior, codes, labels, test_codes, test_labels, epochs: int, seed: int) -> tuple[list, float]:
    """A plain Adam loop (batch 128, lr 1e-3: fit_prior's settings) for a candidate network that is not a
    CodePrior, so both candidates train the same way: (test bits per code after each epoch, training seconds)."""
    opt = torch.optim.Adam(prior.parameters(), lr=1e-3)
    curve, seconds = [], 0.0
    for epoch in range(epochs):
        t0 = time.perf_counter()
        prior.train()
        perm = torch.randperm(len(codes), generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        for s in range(0, len(codes), 128):
            i = perm[s:s + 128]
            nll = F.cross_entropy(prior(codes[i], labels[i]), codes[i], reduction="none").flatten(1).sum(1)
            opt.zero_grad(set_to_none=True)
            nll.mean().backward()
            opt.step()
        seconds += time.perf_counter() - t0
        prior.eval()
        curve.append(prior_nll(prior, test_codes, test_labels) / (math.prod(codes.shape[1:]) * math.log(2)))
    return curve, seconds


def run_priors(args, mnist, model) -> dict:
    """The PixelCNN through vaelab.prior.fit_prior (it stays attached to `model` for part (d)), --prior-epochs;
    the transformer through the same loop, --candidate-epochs. Test NLL after every epoch of both."""
    print(f"(c) class-conditional code priors on the codes of (a): the gated PixelCNN {args.prior_epochs} epochs, "
          f"the transformer {args.candidate_epochs}", flush=True)
    codes, test_codes = encode_codes(model, mnist.train), encode_codes(model, mnist.test)
    k, grid = model.settings.codebook_size, tuple(codes.shape[1:])
    results = {}
    for name in ("gated-pixelcnn", "transformer"):
        torch.manual_seed(args.seed)
        if name == "gated-pixelcnn":
            history = fit_prior(model, mnist.train, mnist.test, epochs=args.prior_epochs, seed=args.seed, **PRIOR)
            seconds = sum(h["time_s"] for h in history)  # includes the per-epoch test NLL
            prior, curve, epochs = model.prior, [h["test_bits_per_code"] for h in history], args.prior_epochs
        else:
            prior = TransformerPrior(k, grid, classes=10, **TRANSFORMER)
            curve, seconds = _fit_candidate(prior, codes, mnist.train.y, test_codes, mnist.test.y,
                                            args.candidate_epochs, args.seed)
            epochs = args.candidate_epochs
        t0 = time.perf_counter()
        prior.sample(100, torch.arange(100) % 10, torch.Generator().manual_seed(args.seed))
        sample_s = time.perf_counter() - t0
        results[name] = {"params": sum(p.numel() for p in prior.parameters()), "epochs": epochs,
                         "test_bits_per_code": [round(b, 4) for b in curve],
                         "s_per_epoch": round(seconds / epochs, 1), "s_per_100_samples": round(sample_s, 2)}
        print(f"  {name} done", flush=True)
    shown = range(1, max(args.prior_epochs, args.candidate_epochs) + 1)
    rows = [["prior", "params", "s/epoch", "s/100 samples"] + [f"ep {e}" for e in shown]]
    for name, r in results.items():
        rows.append([name, f"{r['params']:,}", f"{r['s_per_epoch']:.0f}", f"{r['s_per_100_samples']:.1f}"]
                    + [f"{r['test_bits_per_code'][e - 1]:.3f}" if e <= r["epochs"] else "" for e in shown])
    print(f"  test NLL in bits per code after each epoch (a uniform prior: {math.log2(k):.2f}; the codes' "
          f"marginal entropy: {_entropy_bits(codes, k):.2f})")
    _table(rows)
    return {"pixelcnn": PRIOR, "transformer": TRANSFORMER, **results}


def _entropy_bits(codes: torch.Tensor, k: int) -> float:
    p = torch.bincount(codes.flatten(), minlength=k).double()
    p = p[p > 0] / p.sum()
    return float(-(p * p.log2()).sum())


@torch.inference_mode()
def _judge(clf, x: torch.Tensor, wanted: torch.Tensor | None = None) -> dict:
    clf.eval()
    probs = torch.cat([F.softmax(clf(x[i:i + 1000]), 1) for i in range(0, len(x), 1000)])
    conf, pred = probs.max(1)
    out = {"mean_confidence": float(conf.mean()), "confident_0.9": float((conf > 0.9).float().mean())}
    if wanted is not None:
        out["accuracy_vs_label"] = float((pred == wanted).float().mean())
    return out


def run_samples(args, mnist, model, out_dir: Path) -> dict:
    print(f"(d) samples from the PixelCNN prior ({args.prior_epochs} epochs), judged by a digit classifier",
          flush=True)
    if model.prior is None:  # part (c) fitted it otherwise
        fit_prior(model, mnist.train, None, epochs=args.prior_epochs, seed=args.seed, **PRIOR)
    test_codes = encode_codes(model, mnist.test)
    test_bits = prior_nll(model.prior, test_codes, mnist.test.y) / (math.prod(model.grid) * math.log(2))
    clf, clf_acc, clf_s = train_classifier(mnist, args.classifier_epochs, args.seed)
    n = args.samples_per_class
    wanted = torch.arange(10).repeat_interleave(n)
    gen = torch.Generator().manual_seed(args.seed)
    t0 = time.perf_counter()
    samples = model.sample(len(wanted), generator=gen, condition=wanted)
    sample_s = time.perf_counter() - t0
    unconditional = model.sample(len(wanted), generator=gen)  # classes drawn uniformly
    judged = {"conditional": _judge(clf, samples, wanted), "random_class": _judge(clf, unconditional),
              "real_test_digits": _judge(clf, mnist.test.to_float()[:len(wanted)])}
    grid = torch.cat([samples[wanted == c][:10] for c in range(10)])
    save_image_grid(grid, out_dir / "vqvae-samples.png", nrow=10, row_labels=[str(c) for c in range(10)],
                    title=f"VQ-VAE (K=64, 7x7) + class-conditional gated PixelCNN prior: one row per class")
    print(f"  prior: test {test_bits:.4f} bits per code; classifier "
          f"({args.classifier_epochs} epochs, {clf_s:.0f} s) test accuracy {100 * clf_acc:.2f}%; {len(wanted)} "
          f"samples in {sample_s:.1f} s")
    _table([["images", "mean confidence", "confidence > 0.9", "classified as asked"],
            *[[name, f"{r['mean_confidence']:.3f}", f"{r['confident_0.9']:.3f}",
               f"{r['accuracy_vs_label']:.3f}" if "accuracy_vs_label" in r else "-"] for name, r in judged.items()]])
    return {"prior": PRIOR, "prior_epochs": args.prior_epochs, "prior_test_bits_per_code": test_bits,
            "classifier": {"epochs": args.classifier_epochs,
                                                               "test_accuracy": clf_acc, "train_s": round(clf_s, 1)},
            "samples": len(wanted), "sample_s": round(sample_s, 2), **judged}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--parts", default=",".join(PARTS), help=f"comma-separated, from {','.join(PARTS)}")
    p.add_argument("--epochs", type=int, default=10, help="VQ-VAE and seed-conv-ae epochs")
    p.add_argument("--prior-epochs", type=int, default=10, help="epochs of the PixelCNN prior")
    p.add_argument("--candidate-epochs", type=int, default=3, help="epochs of the transformer it is compared to")
    p.add_argument("--classifier-epochs", type=int, default=2)
    p.add_argument("--samples-per-class", type=int, default=100)
    p.add_argument("--data-dir", default=os.environ.get("VAELAB_DATA", str(REPO.parent / "shared" / "data")))
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--precision", choices=("fp32", "bf16", "auto"), default="fp32",
                   help="training precision of (a)'s VQ-VAE and seed-conv-ae [default fp32]")
    p.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "vqvae.json"),
                   help="the JSON report; parts run now replace their entries, the others are kept")
    p.add_argument("--vqvae-run", default=None, help="run directory for (a)'s VQ-VAE (default: a temporary "
                   "one); later invocations with parts priors/samples reuse the model found there")
    args = p.parse_args()
    parts = [s.strip() for s in args.parts.split(",") if s.strip()]
    unknown = sorted(set(parts) - set(PARTS))
    if unknown:
        p.error(f"unknown parts {unknown}; choose from {list(PARTS)}")
    torch.set_num_threads(args.threads)
    out = Path(args.out)
    mnist = load_dataset("mnist", args.data_dir, progress=False)
    t0 = time.perf_counter()

    def save(part: str, result: dict) -> None:  # after every part, so an interrupted run keeps what it finished
        saved = json.loads(out.read_text()) if out.is_file() else {}  # read now: another invocation may write too
        saved[part] = result
        saved["machine"] = {"python": platform.python_version(), "torch": torch.__version__,
                            "cpus": os.cpu_count(), "threads": args.threads}
        atomic_write_json(out, saved)

    model = None
    if {"vqvae", "priors", "samples"} & set(parts):
        if "vqvae" in parts:
            result, model = run_vqvae(args, mnist)
            save("vqvae", result)
        elif args.vqvae_run and (Path(args.vqvae_run) / "model.safetensors").is_file():
            model = from_pretrained(args.vqvae_run)  # (a)'s model from an earlier invocation
        else:  # the priors and samples need a trained VQ-VAE
            model, _, _ = train_vqvae(VQVAE, mnist, args.epochs, args.seed, args.threads, args.vqvae_run,
                                       args.precision)
    if "ablation" in parts:
        save("ablation", run_ablation(args, mnist))
    if "priors" in parts:
        save("priors", run_priors(args, mnist, model))
    if "samples" in parts:
        save("samples", run_samples(args, mnist, model, out.parent))
    print(f"wrote {out} ({time.perf_counter() - t0:.0f} s)")


if __name__ == "__main__":
    main()
