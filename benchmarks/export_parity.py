"""How close the exported files are to PyTorch: every registered model kind, trained briefly on digits, exported
as ONNX (run by onnxruntime) and as torch.export programs (torch.export.load), then run on the whole test split
in batches of --batch-size (never the export's example batch) and compared with the model in PyTorch (CPU, fp32).

    python benchmarks/export_parity.py                 # every model kind below, 2 epochs each (a few minutes)
    python benchmarks/export_parity.py --kinds vae-conv,vqvae --epochs 1

The figures are vaelab.export.parity's: per output, the largest |exported - PyTorch| (float outputs) or the
number of differing entries (a VQ-VAE's integer code indices); the decoder is fed PyTorch's own latents, so its
figure is the decoder's alone. Prints a table and writes benchmarks/results/export-parity.json.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import platform
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "src"))

import onnxruntime  # noqa: E402
import torch  # noqa: E402

from vaelab.cli import main as vaelab  # noqa: E402
from vaelab.data import load_dataset  # noqa: E402
from vaelab.export import export_run  # noqa: E402
from vaelab.training.checkpoint import atomic_write_json  # noqa: E402

KINDS = {  # name in the table: `vaelab train` flags
    "ae-conv": ["--model", "ae"],
    "seed-conv-ae": ["--preset", "seed-conv-ae"],
    "vae-conv (seed-vae)": ["--preset", "seed-vae"],
    "vae-mlp": ["--model", "vae", "--arch", "mlp", "--latent-dim", "8"],
    "cvae": ["--model", "cvae", "--latent-dim", "4"],
    "vqvae": ["--model", "vqvae", "--codebook-size", "32"],
    "vqvae-mlp": ["--model", "vqvae", "--arch", "mlp", "--codebook-size", "32"],
    "hvae": ["--model", "hvae", "--latent-dim", "8"],
    "m2": ["--model", "m2", "--labels", "500"],
    "btcvae": ["--model", "btcvae"],
    "dipvae": ["--model", "dipvae"],
    "factorvae": ["--model", "factorvae"],
}
FORMATS = ("onnx", "exported-program")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--kinds", default=",".join(KINDS), help="comma-separated names of KINDS")
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=64, help="batch size of the comparison")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(REPO / "benchmarks" / "results" / "export-parity.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    kinds = [k.strip() for k in args.kinds.split(",") if k.strip()]
    test = load_dataset("digits", progress=False).test
    rows, versions = [], {"onnxruntime": onnxruntime.__version__, "python": platform.python_version()}
    with tempfile.TemporaryDirectory() as tmp:
        for kind in kinds:
            run = Path(tmp) / kind.split()[0]
            with contextlib.redirect_stdout(io.StringIO()):  # the table stays readable
                code = vaelab(["train", *KINDS[kind], "--epochs", str(args.epochs), "--out", str(run),
                               "--no-pictures", "--no-progress", "--threads", str(args.threads)])
            if code != 0:
                raise SystemExit(f"training {kind} failed")
            for fmt in FORMATS:
                spec = export_run(run, Path(tmp) / f"{run.name}-{fmt}", fmt, data=test, batch_size=args.batch_size)
                versions |= spec["versions"]  # the ONNX export's adds onnx, onnxscript and the opset
                check = spec["parity"]
                rows.append({"kind": kind, "model": spec["model"]["name"], "format": fmt,
                             "samples": check["samples"], "batch_size": check["batch_size"],
                             "encoder": check["encoder"], "decoder": check["decoder"]})
                print_row(rows[-1])
    result = {"what": "largest |exported - PyTorch| per output on the digits test split (integer outputs: "
                      "differing entries), CPU fp32", "epochs": args.epochs,
              "versions": versions,
              "host": {"machine": platform.machine(), "threads": args.threads, "cpus": os.cpu_count()},
              "rows": rows}
    atomic_write_json(args.out, result)
    print(f"wrote {args.out}")
    worst = max(v for r in rows for part in ("encoder", "decoder") for k, v in r[part].items() if k != "indices")
    print(f"largest float difference over every model kind and format: {worst:.3g}")
    return 0


def print_row(row: dict) -> None:
    def fmt(values: dict) -> str:
        return ", ".join(f"{k} {int(v)} differing" if k == "indices" else f"{k} {v:.2g}" for k, v in values.items())

    print(f"{row['kind']:<20} {row['format']:<17} n={row['samples']:<4} encoder: {fmt(row['encoder']):<62} "
          f"decoder: {fmt(row['decoder'])}", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
