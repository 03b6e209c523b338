"""The picture commands of a run: `vaelab reconstruct`, `sample`, `manifold`, `interpolate` and `traverse`
(each writes one PNG; vaelab.cli.drawing draws it)."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from vaelab.cli.common import (add_run_arg, fmt_value, int_list, need_images, open_run, out_path, parse_label,
                               positive, run_classes, run_data, run_name, sub)
from vaelab.cli.drawing import (draw_analogies, draw_interpolation, draw_manifold, draw_reconstructions,
                                draw_samples, draw_traversal)
from vaelab.errors import VaelabError

TRAVERSE_ROWS = 20  # latent dimensions a traversal shows by default (the most informative ones)


# ======================================================================================== reconstruct


def add_reconstruct_parser(subs) -> argparse.ArgumentParser:
    p = sub(subs, "reconstruct", """
        Draw the first N test images (top row) over their reconstructions (bottom row): each is decoded
        from its posterior mean. Writes RUN/reconstructions.png (or --out).""")
    add_run_arg(p)
    p.add_argument("--n", type=int, default=10, metavar="N", help="how many images [default 10]")
    p.add_argument("--out", metavar="FILE", default=None, help="PNG file to write instead")
    p.set_defaults(func=cmd_reconstruct)
    return p


def cmd_reconstruct(args) -> int:
    positive(args.n, "--n")
    cfg, model = open_run(args.run, trust_code=args.trust_code)
    need_images(model, "reconstruct")
    data = run_data(cfg, args.run, model, args)
    path = draw_reconstructions(model, data.test, out_path(args, args.run, "reconstructions.png"), n=args.n,
                                name=run_name(cfg, model))
    print(f"wrote: {path}")
    return 0


# ============================================================================================= sample


def add_sample_parser(subs) -> argparse.ArgumentParser:
    p = sub(subs, "sample", """
        Decode N draws z ~ N(0, I) from the prior into new images, in a square-ish grid. Needs a model
        with a prior (a VAE). Writes RUN/samples.png (or --out).

        A conditional model (cvae) draws N samples of class --label, or without --label a class-by-sample
        grid: one row per class, N samples per row, each column decoding the same z for every class. The
        semi-supervised m2 then also writes RUN/analogies.png: test images (left) with each one's style z
        decoded as every class along its row.

        A VQ-VAE draws code grids from the prior that `vaelab train-prior RUN` fitted to its codes; a
        class-conditional prior (labelled data) draws class --label, or without it the classes in order.""",
        """
        examples:
          vaelab sample runs/vae-mnist --n 100
          vaelab sample runs/cvae --label 3          # 64 samples of the digit 3
          vaelab sample runs/cvae-fashion --label Sneaker
          vaelab sample runs/cvae --n 8               # 10 rows (classes) of 8 samples
          vaelab train-prior runs/vq && vaelab sample runs/vq --label 7   # a VQ-VAE, through its code prior""")
    add_run_arg(p, dataset=False)
    p.add_argument("--n", type=int, default=None, metavar="N",
                   help="how many samples [default 64; a conditional model's class grid: per class, default 10]")
    p.add_argument("--label", metavar="CLASS", default=None,
                   help="conditional models (and a VQ-VAE's class-conditional prior): the class to draw, by "
                        "index (0..K-1) or by name")
    p.add_argument("--seed", type=int, default=0, metavar="N", help="random seed of the draws [default 0]")
    p.add_argument("--out", metavar="FILE", default=None, help="PNG file to write instead")
    p.set_defaults(func=cmd_sample)
    return p


def cmd_sample(args) -> int:
    if args.n is not None:
        positive(args.n, "--n")
    cfg, model = open_run(args.run, trust_code=args.trust_code)
    need_images(model, "sample")
    if model.capabilities.discrete:  # a VQ-VAE draws code grids from the prior `train-prior` fitted
        from vaelab.prior import sample_run

        print(f"wrote: {sample_run(args.run, cfg, model, n=args.n, label=args.label, seed=args.seed, out=args.out)}")
        return 0
    classes = run_classes(cfg, model)
    label = parse_label(args.label, model, classes)
    path = draw_samples(model, out_path(args, args.run, "samples.png"), n=args.n, seed=args.seed,
                        name=run_name(cfg, model), label=label, classes=classes)
    print(f"wrote: {path}")
    if model.capabilities.semi_supervised and label is None:  # m2: also test images' styles as every class
        _sample_analogies(args, cfg, model, path, classes)
    return 0


def _sample_analogies(args, cfg: dict, model, path: str, classes) -> None:
    """m2's analogies.png beside its samples: test images' styles drawn as every class."""
    if not (cfg.get("data") or {}).get("dataset"):  # a run of the Python API's fit: no dataset recorded
        print("note: no analogies.png, as the run names no dataset (vaelab.generation.analogies draws them)")
        return
    where = Path(args.run) / "analogies.png" if args.out is None else Path(path).with_name(
        f"{Path(path).stem}-analogies.png")
    test = run_data(cfg, args.run, model, args).test
    print(f"wrote: {draw_analogies(model, test, where, name=run_name(cfg, model), classes=classes)}")


# =========================================================================================== manifold


def add_manifold_parser(subs) -> argparse.ArgumentParser:
    p = sub(subs, "manifold", """
        Decode an N x N grid of latent vectors and draw it as one picture whose axes give the latent values
        (the Keras tutorial's plot_latent_space). For a VAE the two dimensions run over [-LIMIT, LIMIT] and
        the others stay at 0; for an autoencoder they span the 1st..99th percentile of the test latents and
        the others sit at their mean. Needs a vector latent. Writes RUN/manifold.png (or --out).""")
    add_run_arg(p)
    p.add_argument("--n", type=int, default=15, metavar="N", help="images per side [default 15]")
    p.add_argument("--limit", type=float, default=4.0, metavar="X",
                   help="a VAE's grid spans [-X, X] in both dimensions [default 4]")
    p.add_argument("--dims", type=int_list, default=(0, 1), metavar="I,J",
                   help="the two latent dimensions to vary (x axis, y axis) [default 0,1]")
    p.add_argument("--label", metavar="CLASS", default=None,
                   help="conditional models: the class whose manifold to draw, by index or name [default 0; "
                        "the title names it]")
    p.add_argument("--out", metavar="FILE", default=None, help="PNG file to write instead")
    p.set_defaults(func=cmd_manifold)
    return p


def cmd_manifold(args) -> int:
    cfg, model = open_run(args.run, trust_code=args.trust_code)
    need_images(model, "manifold")
    if len(args.dims) != 2:
        raise VaelabError(f"--dims takes two latent dimensions such as 0,1; got {fmt_value(args.dims)}")
    classes = run_classes(cfg, model)
    label = parse_label(args.label, model, classes)
    ds = None
    if not model.capabilities.samples:  # an autoencoder's grid spans its data's latents
        ds = run_data(cfg, args.run, model, args).test
    path = draw_manifold(model, ds, out_path(args, args.run, "manifold.png"), n=args.n, limit=args.limit,
                         dims=args.dims, name=run_name(cfg, model), label=label, classes=classes)
    print(f"wrote: {path}")
    return 0


# ======================================================================================== interpolate


def add_interpolate_parser(subs) -> argparse.ArgumentParser:
    p = sub(subs, "interpolate", """
        Pick PAIRS pairs of test images (seeded; of different classes where labels exist) and decode
        STEPS points on the latent path between their posterior means, one pair per row: the first and
        last images of a row decode the two means themselves (the two reconstructions). Writes
        RUN/interpolation.png (or --out).

        --method linear walks the straight line; --method slerp the great circle between the two latents
        (spherical interpolation: the norm changes linearly along the arc, so the walk stays at the
        radius where a Gaussian prior's mass lies instead of cutting through its centre; White 2016).

        A conditional model (cvae) encodes each image with its own label, and the label's one-hot vector
        moves linearly from the first image's class to the second's along with z, so both ends are true
        reconstructions and the middle morphs the class as well as the style.""")
    add_run_arg(p)
    p.add_argument("--steps", type=int, default=10, metavar="N", help="images per row, end points included "
                                                                       "[default 10]")
    p.add_argument("--pairs", type=int, default=4, metavar="N", help="rows [default 4]")
    p.add_argument("--method", choices=("linear", "slerp"), default="linear",
                   help="straight line or great circle (slerp) between the latents [default linear]")
    p.add_argument("--seed", type=int, default=0, metavar="N", help="which pairs [default 0]")
    p.add_argument("--out", metavar="FILE", default=None, help="PNG file to write instead")
    p.set_defaults(func=cmd_interpolate)
    return p


def cmd_interpolate(args) -> int:
    positive(args.pairs, "--pairs")
    if args.steps < 2:
        raise VaelabError(f"--steps must be >= 2 (the two end points included), got {args.steps}")
    cfg, model = open_run(args.run, trust_code=args.trust_code)
    need_images(model, "interpolate")
    data = run_data(cfg, args.run, model, args)
    path = draw_interpolation(model, data.test, out_path(args, args.run, "interpolation.png"), steps=args.steps,
                              pairs=args.pairs, method=args.method, seed=args.seed, name=run_name(cfg, model))
    print(f"wrote: {path}")
    return 0


# =========================================================================================== traverse


def add_traverse_parser(subs) -> argparse.ArgumentParser:
    p = sub(subs, "traverse", """
        Encode one test image (--index) and sweep each latent dimension in turn over STEPS values in
        [-RANGE, RANGE] (in units of the N(0, I) prior) while the other dimensions stay at the image's
        posterior mean: one row per dimension, the picture of a beta-VAE paper (Higgins et al. 2017).
        Rows are sorted by the dimension's mean KL on the test set, most informative first, and labelled
        with the dimension and its KL in nats; dimensions with a KL near 0 are ones the model does not
        use (their rows do not change). Needs a VAE with a vector latent. A conditional model decodes
        with the image's label. Writes RUN/traversal.png (or --out).""")
    add_run_arg(p)
    p.add_argument("--range", dest="limit", type=float, default=3.0, metavar="X",
                   help="each dimension sweeps [-X, X] [default 3]")
    p.add_argument("--steps", type=int, default=11, metavar="N", help="images per row [default 11]")
    p.add_argument("--index", type=int, default=0, metavar="I", help="which test image [default 0]")
    p.add_argument("--top", type=int, default=TRAVERSE_ROWS, metavar="N",
                   help=f"show the N dimensions with the most KL [default {TRAVERSE_ROWS}; 0 = all]")
    p.add_argument("--out", metavar="FILE", default=None, help="PNG file to write instead")
    p.set_defaults(func=cmd_traverse)
    return p


def cmd_traverse(args) -> int:
    if args.steps < 2:
        raise VaelabError(f"--steps must be >= 2, got {args.steps}")
    if not (math.isfinite(args.limit) and args.limit > 0):
        raise VaelabError(f"--range must be a positive number (each dimension sweeps [-X, X]), got {args.limit}")
    if args.top < 0:
        raise VaelabError(f"--top must be >= 0 (0 shows every dimension), got {args.top}")
    cfg, model = open_run(args.run, trust_code=args.trust_code)
    need_images(model, "traverse")
    data = run_data(cfg, args.run, model, args)
    path = draw_traversal(model, data.test, out_path(args, args.run, "traversal.png"), index=args.index,
                          limit=args.limit, steps=args.steps, top=args.top, name=run_name(cfg, model),
                          classes=run_classes(cfg, model))
    print(f"wrote: {path}")
    return 0
