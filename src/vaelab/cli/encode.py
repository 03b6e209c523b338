"""`vaelab encode RUN`: the latent means of a split as .npy (or a VQ-VAE's code indices), with the labels and a
scatter plot beside them."""

from __future__ import annotations

import argparse

from vaelab.cli.common import add_run_arg, open_run, out_path, positive, print_written, run_data, run_name, sub, \
    write_npy
from vaelab.errors import VaelabError


def add_encode_parser(subs) -> argparse.ArgumentParser:
    p = sub(subs, "encode", """
        Encode every sample of a split and save the posterior means, flattened per sample, as a float32
        .npy array (N, latent_size): RUN/latents.npy for the test split, RUN/latents-SPLIT.npy otherwise
        (or --out). Beside it: the labels as FILE.labels.npy (int64, when the data has labels) and a 2-D
        scatter plot FILE.png coloured by label (latents of more than 2 dimensions are projected on their
        first two principal components, or embedded by t-SNE with --projection tsne).

        --indices (VQ-VAE runs): save the code indices instead, an int64 array (N, H, W) of the grid of
        codes each sample is quantized to, as RUN/codes.npy (RUN/codes-SPLIT.npy; or --out), with the labels
        beside it. model.decode_indices() decodes them to exactly the model's reconstructions.""")
    add_run_arg(p)
    p.add_argument("--split", choices=("test", "train", "all"), default="test",
                   help="which samples; all = train then test [default test]")
    p.add_argument("--batch-size", type=int, default=512, metavar="N", help="encoding batch size [default 512]")
    p.add_argument("--out", metavar="FILE.npy", default=None, help=".npy file to write instead")
    p.add_argument("--indices", action="store_true", help="VQ-VAE runs: write the code indices (N, H, W)")
    p.add_argument("--projection", choices=("pca", "tsne"), default="pca",
                   help="how latents of more than 2 dimensions are drawn in 2-D: their first two principal "
                        "components, or a t-SNE embedding (slower: about a minute for 10,000 samples) [default pca]")
    p.set_defaults(func=cmd_encode)
    return p


def cmd_encode(args) -> int:
    import numpy as np

    from vaelab.cli.drawing import draw_latents
    from vaelab.generation import encode_dataset

    positive(args.batch_size, "--batch-size")
    cfg, model = open_run(args.run, trust_code=args.trust_code)
    if args.indices and not model.capabilities.discrete:
        raise VaelabError(f"--indices writes the discrete codes of a VQ-VAE, but {args.run!r} holds a "
                          f"{model.config.model!r} model with continuous latents; drop --indices to save its latents")
    data = run_data(cfg, args.run, model, args)
    parts = {"test": [data.test], "train": [data.train], "all": [data.train, data.test]}[args.split]
    has_labels = all(ds.y is not None for ds in parts)
    if args.indices:
        return _encode_indices(args, model, parts, has_labels)
    z = np.concatenate([encode_dataset(model, ds, args.batch_size) for ds in parts])
    labels = np.concatenate([ds.y.numpy() for ds in parts]) if has_labels else None

    out = out_path(args, args.run, "latents.npy" if args.split == "test" else f"latents-{args.split}.npy")
    stem = out.name[:-4] if out.name.endswith(".npy") else out.name
    written = [write_npy(out, z.astype(np.float32))]
    if labels is not None:
        written.append(write_npy(out.with_name(f"{stem}.labels.npy"), labels.astype(np.int64)))
    scatter_ds = parts[0] if len(parts) == 1 else _Labelled(labels, data.test.classes)
    written.append(draw_latents(model, scatter_ds, out.with_name(f"{stem}.png"), name=run_name(cfg, model),
                                split=args.split, latents=z, projection=args.projection))
    which = "all samples" if args.split == "all" else f"the {args.split} split"
    print(f"encoded {which} ({len(z)} samples) to latent means of size {z.shape[1]}")
    print_written(written)
    return 0


def _encode_indices(args, model, parts, has_labels: bool) -> int:
    """`vaelab encode --indices`: a VQ-VAE's code indices (N, H, W) as int64 .npy, with the labels beside."""
    import numpy as np
    import torch

    from vaelab.prior import encode_codes

    codes = torch.cat([encode_codes(model, ds, args.batch_size) for ds in parts]).numpy()  # (N, H, W) int64
    out = out_path(args, args.run, "codes.npy" if args.split == "test" else f"codes-{args.split}.npy")
    stem = out.name[:-4] if out.name.endswith(".npy") else out.name
    written = [write_npy(out, codes)]
    if has_labels:
        labels = np.concatenate([ds.y.numpy() for ds in parts]).astype(np.int64)
        written.append(write_npy(out.with_name(f"{stem}.labels.npy"), labels))
    which = "all samples" if args.split == "all" else f"the {args.split} split"
    print(f"encoded {which} ({len(codes)} samples) to code indices of shape {tuple(codes.shape[1:])}, in "
          f"0..{model.settings.codebook_size - 1}")
    print_written(written)
    return 0


class _Labelled:
    """Just the labels and class names of a dataset (what draw_latents needs beside the latents)."""

    def __init__(self, labels, classes):
        import torch

        self.y = None if labels is None else torch.from_numpy(labels)
        self.classes = classes
