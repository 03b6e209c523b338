"""The pictures the commands draw of a run (train draws them all; reconstruct, sample, manifold, interpolate,
traverse and encode one each): vaelab.generation computes them, vaelab.plotting writes them, and these functions
choose what to show and give it a title. Each imports torch when called.
"""

from __future__ import annotations

from pathlib import Path

from vaelab.errors import VaelabError
from vaelab.labels import class_names, label_text

GRID_CLASSES = 30  # rows of a conditional model's class-by-sample grid, at most


def run_title(name: str, what: str) -> str:
    return f"{name}: {what}" if name else what


def _conditions(model, ds, idx):
    """The labels of samples `idx` of `ds` for a conditional model (None for the others)."""
    if not model.capabilities.conditional:
        return None
    if ds.y is None:
        raise VaelabError(f"model {model.config.model!r} is conditional and needs each image's label, but dataset "
                          f"{ds.name!r} has none; use the labelled dataset it was trained on")
    return ds.labels(idx)


def run_pictures(model, data, out: Path, name: str) -> list[str]:
    """The pictures `train` draws; which ones depends on the model and the data."""
    test = data.test
    classes = class_names(data.train.classes, model.config.condition_dim) if model.capabilities.conditional else None
    written = []
    if test.is_image:
        written.append(draw_reconstructions(model, test, out / "reconstructions.png", n=10, name=name))
        if model.capabilities.samples:
            written += _prior_pictures(model, test, out, name, classes)
        if len(test) >= 2:
            written.append(draw_interpolation(model, test, out / "interpolation.png", name=name))
    written.append(draw_latents(model, test, out / "latents.png", name=name, split="test"))
    return written


def _prior_pictures(model, test, out: Path, name: str, classes) -> list[str]:
    """The pictures of a model that samples: samples (a conditional model's class-by-sample grid), analogies
    (semi-supervised), the manifold and the traversal (a vector latent)."""
    written = [draw_samples(model, out / "samples.png", seed=0, name=name, classes=classes)]
    if model.capabilities.semi_supervised and len(test):
        written.append(draw_analogies(model, test, out / "analogies.png", name=name, classes=classes))
    vector = len(model.latent_shape) == 1
    dims = (0, 1)
    if vector and model.latent_shape[0] > 2 and len(test):
        # a larger latent: the manifold spans the two dimensions the model uses most
        from vaelab.generation import traversal_order

        dims = tuple(traversal_order(model, test)[0][:2])
    if vector and model.latent_shape[0] >= 2:
        written.append(draw_manifold(model, test, out / "manifold.png", dims=dims, name=name,
                                     classes=classes, most_kl=dims != (0, 1)))
    if vector and model.latent_shape[0] > 2:  # a 2-D latent is shown whole by the manifold
        written.append(draw_traversal(model, test, out / "traversal.png", name=name, classes=classes))
    return written


def draw_reconstructions(model, ds, path, n: int = 10, name: str = "") -> str:
    import torch

    from vaelab.generation import reconstruction_pairs
    from vaelab.plotting import save_image_grid

    n = min(n, len(ds))
    idx = torch.arange(n)
    x, recon = reconstruction_pairs(model, ds.batch(idx), _conditions(model, ds, idx))
    what = "Test images and their reconstructions"
    if model.capabilities.conditional:
        what += " (each encoded and decoded with its label)"
    return save_image_grid(torch.cat([x, recon]).cpu(), path, nrow=n, title=run_title(name, what),
                           row_labels=["original", "reconstruction"])


def draw_samples(model, path, n: int | None = None, seed: int = 0, name: str = "", label: int | None = None,
                 classes: list[str] | None = None) -> str:
    """Prior samples in a square-ish grid; for a conditional model, those of class `label`, or without a
    label the class-by-sample grid (one row per class, n per row)."""
    import math

    from vaelab.generation import class_grid, prior_samples
    from vaelab.plotting import save_image_grid

    if model.capabilities.conditional and label is None:
        n = n or 10
        k = model.config.condition_dim
        rows = min(k, GRID_CLASSES)
        images = class_grid(model, n, seed, classes=range(rows))
        some = "" if rows == k else f" (the first {rows} of {k} classes; --label draws any)"
        return save_image_grid(
            images.cpu(), path, nrow=n, row_labels=[label_text(i, classes) for i in range(rows)],
            title=run_title(name, f"Samples of each class, one row per class{some}: column j decodes the "
                                  f"same z_j ~ N(0, I) with every label, seed {seed}"))
    n = n or 64
    images = prior_samples(model, n, seed, condition=label)
    what = "" if label is None else f" of class {label_text(label, classes)}"
    return save_image_grid(images.cpu(), path, nrow=math.ceil(math.sqrt(n)),
                           title=run_title(name, f"{n} samples{what} decoded from the prior N(0, I), seed {seed}"))


def draw_analogies(model, ds, path, n: int = 8, name: str = "", classes: list[str] | None = None) -> str:
    """The first n images of `ds` (left column), each one's style drawn as every class along its row: z fixed at
    the image's posterior mean under its own label (the classifier's guess where `ds` has none), the label
    varied (Kingma et al. 2014, fig. 1)."""
    import torch

    from vaelab.generation import analogies
    from vaelab.plotting import save_image_grid

    n = min(n, len(ds))
    idx = torch.arange(n)
    x = ds.batch(idx)
    k = model.config.condition_dim
    images = torch.cat([x[:, None], analogies(model, x, ds.labels(idx)).cpu()], dim=1)  # (n, 1 + K, ...)
    rows = [f"test {i}" + ("" if ds.y is None else f" ({label_text(int(ds.y[i]), classes)})") for i in range(n)]
    how = "its label" if ds.y is not None else "the classifier's most probable class"
    return save_image_grid(images.flatten(0, 1), path, nrow=k + 1, row_labels=rows,
                           col_labels=["input"] + [label_text(c, classes) for c in range(k)],
                           title=run_title(name, f"Analogies: each row keeps the style z of the test image on the "
                                                 f"left (its posterior mean under {how}) and decodes it as every "
                                                 "class"))


def draw_manifold(model, ds, path, n: int = 15, limit: float = 4.0, dims=(0, 1), name: str = "",
                  label: int | None = None, classes: list[str] | None = None, most_kl: bool = False) -> str:
    from vaelab.generation import encode_dataset, manifold_axes, manifold_grid
    from vaelab.plotting import save_manifold

    default_label = model.capabilities.conditional and label is None
    if default_label:
        label = 0  # one manifold per class; the title says which
    latents = None if model.capabilities.samples or ds is None else encode_dataset(model, ds)
    axes = manifold_axes(model, n, limit, dims, latents)  # validates before any work
    images = manifold_grid(model, n, limit, dims, latents, condition=label)
    if model.capabilities.samples:
        span = f"z[{axes.dims[0]}], z[{axes.dims[1]}] in [{-limit:g}, {limit:g}]"
        if most_kl:
            span += " (the two dimensions with the most KL)"
        if model.latent_shape[0] > 2:
            span += ", other dimensions 0"
    else:
        span = f"z[{axes.dims[0]}], z[{axes.dims[1]}] over the 1st-99th percentile of the test latents"
    if model.capabilities.conditional:
        which = " (the default; --label picks another)" if default_label else ""
        span = f"class {label_text(label, classes)}{which}; " + span
    return save_manifold(images.cpu(), axes.xs, axes.ys, path, dims=axes.dims,
                         title=run_title(name, f"Decoded latent grid: {span}"))


def draw_interpolation(model, ds, path, steps: int = 10, pairs: int = 4, method: str = "linear",
                       seed: int = 0, name: str = "") -> str:
    from vaelab.generation import interpolate
    from vaelab.plotting import save_image_grid

    a, b = _pick_pairs(ds, pairs, seed)
    # a conditional model: each end encoded with its own label, the one-hot label moving with z
    frames = interpolate(model, ds.batch(a), ds.batch(b), steps=steps, method=method,
                         condition_a=_conditions(model, ds, a), condition_b=_conditions(model, ds, b))
    labels = None
    if ds.y is not None:
        names = ds.classes or [str(i) for i in range(int(ds.y.max()) + 1)]
        labels = [f"{names[int(ds.y[i])]} → {names[int(ds.y[j])]}" for i, j in zip(a.tolist(), b.tolist())]
    what = {"linear": "linear", "slerp": "spherical (slerp)"}[method]
    extra = ", the one-hot label moving with z" if model.capabilities.conditional else ""
    return save_image_grid(frames.flatten(0, 1).cpu(), path, nrow=steps, row_labels=labels,
                           title=run_title(name, f"Latent interpolation ({what}) between test images: the end "
                                                 f"images are their reconstructions{extra}"))


def draw_traversal(model, ds, path, index: int = 0, limit: float = 3.0, steps: int = 11, top: int = 20,
                   name: str = "", classes: list[str] | None = None) -> str:
    """One row per latent dimension (the `top` with the most KL on `ds`, most first), each sweeping
    [-limit, limit] from the posterior mean of sample `index` of `ds`."""
    import numpy as np
    import torch

    from vaelab.generation import traversal, traversal_order
    from vaelab.plotting import save_image_grid

    if not 0 <= index < len(ds):
        raise VaelabError(f"--index {index} is out of range: the test split holds {len(ds)} samples, "
                          f"indices 0..{len(ds) - 1}")
    idx = torch.tensor([index])
    cond = _conditions(model, ds, idx)
    order, kl = traversal_order(model, ds)
    shown = order[:top] if top else order
    frames = traversal(model, ds.batch(idx)[0], dims=shown, limit=limit, steps=steps, condition=cond)
    values = np.linspace(-limit, limit, steps)
    col_labels = [f"{round(float(v), 2) + 0.0:g}" for v in values]  # + 0.0: no "-0"
    row_labels = [f"z[{d}]  KL {kl[d]:.2f}" for d in shown]
    image = f"test image {index}"
    if ds.y is not None:
        image += f" (class {label_text(int(ds.y[index]), classes or ds.classes)})"
    some = f"; the {len(shown)} of {len(order)} dimensions with the most KL" if len(shown) < len(order) else ""
    title = (f"Latent traversals of {image}: each row sweeps one dimension over [{-limit:g}, {limit:g}], the "
             f"others at the image's posterior mean; rows sorted by mean KL on the test set (nats){some}")
    return save_image_grid(frames.flatten(0, 1).cpu(), path, nrow=steps, title=run_title(name, title),
                           row_labels=row_labels, col_labels=col_labels, xlabel="value of the swept dimension")


def _pick_pairs(ds, pairs: int, seed: int):
    """`pairs` (a, b) index pairs of distinct samples, seeded; of different classes where labels allow."""
    import torch

    if len(ds) < 2:
        raise VaelabError(f"interpolation needs at least 2 samples; the split holds {len(ds)}")
    if pairs < 1:
        raise VaelabError(f"--pairs must be >= 1, got {pairs}")
    perm = torch.randperm(len(ds), generator=torch.Generator().manual_seed(seed)).tolist()
    y = ds.y.tolist() if ds.y is not None else None
    a = [perm[i % len(perm)] for i in range(pairs)]
    rest = perm[pairs:] or perm
    b, used = [], set()
    for i in a:
        # the first unused candidate of another class; else of any class; else any other sample
        pick = next((j for j in rest if j not in used and j != i and y is not None and y[j] != y[i]), None)
        if pick is None:
            pick = next((j for j in rest if j not in used and j != i), next(j for j in perm if j != i))
        used.add(pick)
        b.append(pick)
    return torch.tensor(a), torch.tensor(b)


def draw_latents(model, ds, path, name: str = "", split: str = "test", latents=None,
                 projection: str = "pca") -> str:
    from vaelab.generation import encode_dataset
    from vaelab.plotting import save_scatter

    z = encode_dataset(model, ds) if latents is None else latents
    what = "posterior means" if model.capabilities.stochastic else "codes"
    which = "all samples (train and test)" if split == "all" else f"the {split} split"
    title = f"Latent {what} of {which} ({len(z)} samples)"
    labels = None if ds.y is None else ds.y.numpy()
    if labels is not None:
        title += ", coloured by class"
    return save_scatter(z, labels, path, classes=ds.classes, title=run_title(name, title),
                        projection=projection)
