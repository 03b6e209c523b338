"""`vaelab evaluate RUN`: the loss terms (and optionally the NLL and probes) of a run on a split of its data."""

from __future__ import annotations

import argparse

from vaelab.cli.common import add_run_arg, open_run, out_path, positive, print_terms, run_data, sub, write_evaluation
from vaelab.errors import ConfigError


def add_evaluate_parser(subs) -> argparse.ArgumentParser:
    p = sub(subs, "evaluate", """
        Compute the loss terms of RUN's model on a split of its dataset, print them as a table, and write
        them to RUN/evaluation.json (RUN/evaluation-train.json for --split train).""")
    add_run_arg(p)
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
    return p


def cmd_evaluate(args) -> int:
    from vaelab.evaluation import evaluate

    positive(args.batch_size, "--batch-size")
    cfg, model = open_run(args.run, trust_code=args.trust_code)
    data = run_data(cfg, args.run, model, args)
    ds = data.test if args.split == "test" else data.train
    if args.nll_samples < 0:
        raise ConfigError(f"--nll-samples {args.nll_samples} must be >= 0 (0 turns the NLL off)", "evaluate")
    binarize = {"run": bool((cfg.get("train") or {}).get("binarize", False)), "dynamic": True,
                "none": False}[args.binarize]
    metrics = evaluate(model, ds, batch_size=args.batch_size, binarize=binarize, nll_samples=args.nll_samples,
                       train_data=data.train if args.probes else None)
    print_terms(metrics, f"{args.split} split of {data.name}, {metrics['n']} samples")
    default = "evaluation.json" if args.split == "test" else f"evaluation-{args.split}.json"
    print(f"\nwrote: {write_evaluation(out_path(args, args.run, default), metrics, args.split, data.name)}")
    return 0
