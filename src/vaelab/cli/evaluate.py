"""`vaelab evaluate RUN`: the loss terms (and optionally the NLL, probes and disentanglement metrics) of a run on a
split of its data."""

from __future__ import annotations

import argparse
from pathlib import Path

from vaelab.cli.common import (add_run_arg, fmt_number, open_run, out_path, positive, print_table, print_terms,
                               run_data, run_name, sub, write_evaluation)
from vaelab.errors import ConfigError, VaelabError

CODES = ("mean", "sampled")  # vaelab.evaluation.disentanglement.CODE_KINDS, named here so --help imports no numpy
NLL_PRECISIONS = ("fp32", "bf16")  # vaelab.evaluation.nll.NLL_PRECISIONS, named here so --help imports no torch
TRAVERSAL_IMAGES = 5  # test images per traversal picture
TRAVERSAL_ROWS = 20  # latent dimensions drawn, the most KL first
TRAVERSAL_STEPS = 11
TRAVERSAL_LIMIT = 3.0  # each dimension sweeps [-3, 3] in units of the N(0, I) prior


def add_evaluate_parser(subs) -> argparse.ArgumentParser:
    p = sub(subs, "evaluate", """
        Compute the loss terms of RUN's model on a split of its dataset, print them as a table, and write
        them to RUN/evaluation.json (RUN/evaluation-train.json for --split train).

        --disentanglement also compares the latent codes with the data's ground-truth factors of variation
        (--dataset dsprites, or any dataset with --factors FILE): the BetaVAE and FactorVAE scores, MIG, SAP,
        DCI disentanglement / completeness / informativeness, modularity and explicitness, each written to the
        JSON file with every protocol setting that moves its number (samples, bins, classifier, seed, mean or
        sampled codes, the factors used). It draws RUN/mi_matrix.png (the mutual information of each latent
        dimension with each factor) and, for a VAE on images, latent traversals sorted by KL:
        RUN/traversals/rank01-z3.png ... (one grid per dimension) and RUN/traversals.gif.""")
    add_run_arg(p)
    p.add_argument("--split", choices=("test", "train"), default="test", help="which split [default test]")
    p.add_argument("--batch-size", type=int, default=512, metavar="N", help="evaluation batch size [default 512]")
    p.add_argument("--out", metavar="FILE", default=None, help="JSON file to write instead")
    p.add_argument("--nll-samples", type=int, default=0, metavar="K",
                   help="add the importance-sampled negative log-likelihood with K samples per image (`nll`, "
                        "nats, with its standard error; the literature's MNIST protocol uses 5000) [default 0 = off]")
    p.add_argument("--nll-precision", choices=NLL_PRECISIONS, default="fp32",
                   help="precision of the NLL's K decodings, its whole cost: bf16 runs them under bf16 autocast, "
                        "3x as fast as fp32 on a CPU with native bf16 (AVX-512 BF16, AMX), and moved the seed VAE's "
                        "estimate by 0.007 nats, 1/70 of its standard error (docs/results.md#nll-sub-pixel); the "
                        "encoder and the likelihood's sums stay fp32 [default fp32]")
    p.add_argument("--posterior-samples", type=int, default=None, metavar="K",
                   help="semi-supervised models: classify by the model's own posterior p(y|x) from K importance "
                        "samples per class (0: by the classifier q(y|x)) for this evaluation [default: as the run "
                        "was set]")
    p.add_argument("--binarize", choices=("run", "dynamic", "none"), default="run",
                   help="binarize the split with a fixed seed (dynamic; the NLL protocol of the literature), or "
                        "not (none); run = as the run was trained [default run]")
    p.add_argument("--probes", action="store_true",
                   help="also fit a linear probe and 5-NN on the train split's latents and report their test "
                        "accuracy (labelled data)")
    p.add_argument("--disentanglement", action="store_true",
                   help="also compute the disentanglement metrics against the data's ground-truth factors "
                        "(needs factors: --dataset dsprites or --factors FILE) and draw their pictures")
    p.add_argument("--codes", choices=CODES, default="mean",
                   help="--disentanglement on posterior means or on one draw z ~ q(z|x) per sample [default mean]")
    p.add_argument("--seed", type=int, default=0, metavar="N",
                   help="seed of the disentanglement metrics' sampling and classifiers [default 0]")
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
    if args.disentanglement:
        _check_disentanglement(args, model, ds, data.name)
    if args.posterior_samples is not None:
        model = _classify_by(model, args.posterior_samples, args.trust_code)
    binarize = {"run": bool((cfg.get("train") or {}).get("binarize", False)), "dynamic": True,
                "none": False}[args.binarize]
    metrics = evaluate(model, ds, batch_size=args.batch_size, binarize=binarize, nll_samples=args.nll_samples,
                       nll_precision=args.nll_precision, train_data=data.train if args.probes else None)
    if args.posterior_samples is not None:
        metrics["posterior_samples"] = args.posterior_samples
    print_terms(metrics, f"{args.split} split of {data.name}, {metrics['n']} samples", model.term_meanings)
    written = []
    if args.disentanglement:
        from vaelab.evaluation.disentanglement import disentanglement_report

        report = disentanglement_report(model, ds, codes=args.codes, seed=args.seed, batch_size=args.batch_size)
        metrics["disentanglement"] = report
        _print_disentanglement(report, args.split)
        written = _draw_disentanglement(model, ds, report, Path(args.run), args.split, run_name(cfg, model))
    default = "evaluation.json" if args.split == "test" else f"evaluation-{args.split}.json"
    print(f"\nwrote: {write_evaluation(out_path(args, args.run, default), metrics, args.split, data.name)}")
    for path in written:
        print(f"wrote: {path}")
    return 0


def _classify_by(model, samples: int, trust_code: bool):
    """The run's model classifying by its posterior from `samples` importance samples per class (0: by q(y|x))."""
    from dataclasses import fields

    from vaelab.models import with_settings
    from vaelab.models.registry import MODELS

    def has_setting(cls) -> bool:
        return "posterior_samples" in {f.name for f in fields(cls.Settings)}

    if not has_setting(type(model)):
        able = ", ".join(name for name in MODELS if has_setting(MODELS[name].cls))
        raise ConfigError(f"--posterior-samples applies to the models that classify by a posterior ({able}); "
                          f"this run's model is {model.config.model!r}: drop the flag", "evaluate")
    if samples < 0:
        raise ConfigError(f"--posterior-samples {samples} must be >= 0 (0 classifies by q(y|x); K >= 1 by the "
                          "model's posterior from K importance samples per class, e.g. 20)", "evaluate")
    return with_settings(model, trust_code=trust_code, posterior_samples=samples)


def _check_disentanglement(args, model, ds, name: str) -> None:
    """The disentanglement flags' problems, before any slow work."""
    from vaelab.evaluation.disentanglement import no_factors_message

    if ds.factors is None:
        raise VaelabError(no_factors_message(f"the {args.split} split of dataset {name!r}"))
    if args.codes == "sampled" and not model.capabilities.stochastic:
        raise VaelabError(f"--codes sampled draws z ~ q(z|x), but model {model.config.model!r} has a deterministic "
                          "encoder (its codes are points); use --codes mean")
    if args.seed < 0:
        raise VaelabError(f"--seed must be >= 0, got {args.seed}")


def _print_disentanglement(report: dict, split: str) -> None:
    from vaelab.evaluation.disentanglement import SCORE_MEANINGS

    first = next(iter(report["metrics"].values()))["protocol"]
    codes = "posterior means" if report["codes"] == "mean" else "posterior samples"
    print(f"\ndisentanglement: {codes} of {report['n']} {split} samples, factors {', '.join(first['factors'])}, "
          f"seed {report['seed']}:")
    rows = [["metric", "value", "meaning"]]
    rows += [[k, fmt_number(v), SCORE_MEANINGS.get(k, "")] for k, v in report["scores"].items()]
    print_table(rows)
    for skipped in first["factors_skipped"]:
        print(f"  factor {skipped['factor']} left out: {skipped['reason']}")
    print("  (every metric's protocol is in the JSON file, under disentanglement.metrics.<metric>.protocol)")


def _draw_disentanglement(model, ds, report: dict, run: Path, split: str, name: str) -> list[str]:
    """RUN/mi_matrix.png, and for a VAE on images the traversals; returns the files written."""
    from vaelab.cli.drawing import run_title
    from vaelab.plotting import save_mi_matrix

    suffix = "" if split == "test" else f"-{split}"
    mi = report["mutual_information"]
    kl = report["kl_per_dim"]
    dims = len(mi["mutual_information"])
    labels = [f"z[{i}]" + (f"  KL {kl[i]:.2f}" if kl else "") for i in range(dims)]
    written = [save_mi_matrix(mi["mutual_information"], run / f"mi_matrix{suffix}.png", mi["factors"],
                              factor_entropy=list(mi["factor_entropy"].values()), dim_labels=labels,
                              title=run_title(name, f"mutual information of each latent dimension with each "
                                                    f"factor, as a fraction of the factor's entropy "
                                                    f"(MIG {report['scores'].get('mig', float('nan')):.3f})"))]
    if not (model.capabilities.stochastic and ds.is_image and len(model.latent_shape) == 1):
        print("note: no latent traversals: they need a VAE (a KL per dimension to sort by, a prior to sweep) "
              "with a vector latent, on images")
        return written
    return written + _draw_traversals(model, ds, kl, run, suffix, name)


def _draw_traversals(model, ds, kl: list, run: Path, suffix: str, name: str) -> list[str]:
    import numpy as np
    import torch

    from vaelab.cli.drawing import run_title
    from vaelab.generation import traversal
    from vaelab.plotting import gif_available, save_image_grid, save_traversal_gif

    order = sorted(range(len(kl)), key=lambda d: (-kl[d], d))[:TRAVERSAL_ROWS]
    picks = torch.randperm(len(ds), generator=torch.Generator().manual_seed(0))[:TRAVERSAL_IMAGES]
    cond = ds.labels(picks) if model.capabilities.conditional else None
    frames = torch.stack([traversal(model, ds.batch(picks[i:i + 1])[0], dims=order, limit=TRAVERSAL_LIMIT,
                                    steps=TRAVERSAL_STEPS, condition=None if cond is None else int(cond[i]))
                          for i in range(len(picks))], dim=1).cpu()  # (R, K, S, C, H, W)
    values = np.linspace(-TRAVERSAL_LIMIT, TRAVERSAL_LIMIT, TRAVERSAL_STEPS)
    folder = run / f"traversals{suffix}"
    folder.mkdir(parents=True, exist_ok=True)
    for old in folder.glob("rank*-z*.png"):  # a previous evaluation's pictures (perhaps of other dimensions)
        old.unlink()
    written = []
    for rank, d in enumerate(order):
        title = (f"z[{d}], KL {kl[d]:.2f} nats (rank {rank + 1} of {len(kl)} by KL): each row sweeps it over "
                 f"[{-TRAVERSAL_LIMIT:g}, {TRAVERSAL_LIMIT:g}] from a test image's posterior mean")
        written.append(save_image_grid(frames[rank].flatten(0, 1), folder / f"rank{rank + 1:02d}-z{d}.png",
                                       nrow=TRAVERSAL_STEPS, title=run_title(name, title),
                                       row_labels=[f"image {int(i)}" for i in picks],
                                       col_labels=[f"{round(float(v), 2) + 0.0:g}" for v in values],
                                       xlabel="value of the swept dimension"))
    if gif_available():
        written.append(save_traversal_gif(frames, run / f"traversals{suffix}.gif", values,
                                          row_labels=[f"z[{d}] KL {kl[d]:.2f}" for d in order],
                                          title=run_title(name, "latent traversals, rows sorted by KL")))
    else:
        print("note: no traversals.gif: animated GIFs need Pillow (pip install pillow)")
    return written
