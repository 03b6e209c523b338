"""`vaelab export RUN`: the run's encoder and decoder as ONNX files (or torch.export programs) with export.json,
checked against PyTorch on the run's test split."""

from __future__ import annotations

import argparse
from pathlib import Path

from vaelab.cli.common import add_run_arg, open_run, positive, print_table, run_data, run_name, sub

FORMATS = ("onnx", "exported-program")  # vaelab.export.FORMATS, without importing torch for --help


def add_export_parser(subs) -> argparse.ArgumentParser:
    p = sub(subs, "export", """
        Write the run's encoder and decoder as two files each, with a dynamic batch axis, into a folder
        (--out, default RUN/export-FORMAT):
          encoder.onnx, decoder.onnx   --format onnx: run them with onnxruntime alone (pip install "vaelab[export]")
          encoder.pt2, decoder.pt2     --format exported-program: torch.export.load(path).module()
          export.json                  the inputs and outputs (names, dtypes, shapes), the preprocessing the
                                       model expects, what the encoder's outputs mean, the versions, and the
                                       check's figures

        The encoder takes x (batch, *input shape) float32, preprocessed as export.json says (images: pixels
        scaled to [0, 1], channels first), and a conditional model's `condition` (batch, classes) float32
        one-hot labels. It gives a VAE's posterior `mean` and `logvar`, an autoencoder's code `z`, a VQ-VAE's
        code `indices` (int64). The decoder takes `z` (or `indices`, and the condition) and gives `x`, the
        reconstruction (pixel probabilities for a Bernoulli model).

        The export runs on CPU in fp32. Unless --no-check, the files are then run on the whole test split in
        batches of --batch-size and compared with PyTorch; the largest differences are printed and saved in
        export.json. The folder appears whole or not at all; an earlier export in it is replaced.""")
    add_run_arg(p, dataset=False)
    p.add_argument("--format", choices=FORMATS, default="onnx",
                   help="onnx (the export extra) or exported-program (torch.export, torch only) [default onnx]")
    p.add_argument("--out", metavar="DIR", default=None, help="folder to write [default RUN/export-FORMAT]")
    p.add_argument("--check", action=argparse.BooleanOptionalAction, default=True,
                   help="run the files on the test split and compare them with PyTorch [default on]")
    p.add_argument("--batch-size", type=int, default=100, metavar="N", help="batch size of the check [default 100]")
    p.set_defaults(func=cmd_export)
    return p


def cmd_export(args) -> int:
    from vaelab.export import check_export, export_model

    positive(args.batch_size, "--batch-size")
    run = Path(args.run)
    out = Path(args.out) if args.out else run / f"export-{args.format}"
    cfg, model = open_run(args.run, trust_code=args.trust_code)
    check_export(out, args.format)
    data = run_data(cfg, args.run, model, args).test if args.check else None
    spec = export_model(model, out, args.format, data=data, batch_size=args.batch_size, run_config=cfg,
                        run=args.run)
    print(f"exported {run_name(cfg, model)} ({model.config.model}) as {args.format} to {out}:")
    rows = []
    for part in ("encoder", "decoder"):
        ins = ", ".join(_io(i) for i in spec[part]["inputs"])
        outs = ", ".join(_io(o) for o in spec[part]["outputs"])
        rows.append([spec[part]["file"], f"{ins} -> {outs}"])
    rows.append(["export.json", "what the files take and give, the preprocessing, the versions"])
    print_table(rows)
    if data is not None:
        check = spec["parity"]
        print(f"checked on the test split ({check['samples']} samples, batches of {check['batch_size']}): "
              f"largest |{args.format} - PyTorch|")
        rows = [["file", "output", "difference"]]
        for part in ("encoder", "decoder"):
            for name, value in check[part].items():
                integer = next(o for o in spec[part]["outputs"] if o["name"] == name)["dtype"].startswith("int")
                rows.append([spec[part]["file"], name, f"{int(value)} differing" if integer else f"{value:.3g}"])
        print_table(rows)
    return 0


def _io(entry: dict) -> str:
    shape = ", ".join(str(s) for s in entry["shape"])
    return f"{entry['name']} ({shape}) {entry['dtype']}"
