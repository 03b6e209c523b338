"""Pictures as PNG files: image grids, the latent manifold, latent scatter plots.

matplotlib draws on its Agg (file-only) backend through `Figure` objects, so it never opens a window and
never changes the backend of a notebook or script that imported pyplot. Every PNG is rendered to bytes
first and then written atomically: an interrupted run never leaves half a picture.
"""

from __future__ import annotations

import io
import os
import textwrap

import numpy as np

from vaelab.errors import VaelabError

DPI = 100


def _figure(width_in: float, height_in: float):
    import matplotlib

    matplotlib.use("Agg", force=False)  # a no-op where pyplot already runs another backend: we need none
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_in, height_in), dpi=DPI)
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path) -> str:
    from vaelab.training.checkpoint import atomic_write_bytes

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=DPI, bbox_inches="tight", pad_inches=0.08, facecolor="white")
    atomic_write_bytes(path, buf.getvalue())
    return os.fspath(path)


def _as_images(images) -> np.ndarray:
    """(N, C, H, W) float array clipped to [0, 1] from a tensor or array."""
    if hasattr(images, "detach"):
        images = images.detach().float().cpu().numpy()
    a = np.asarray(images, dtype=np.float32)
    if a.ndim == 3:  # (N, H, W): one channel
        a = a[:, None]
    if a.ndim != 4 or a.shape[0] == 0:
        raise VaelabError(f"expected a non-empty batch of images (N, C, H, W), got shape {a.shape}")
    return np.clip(np.nan_to_num(a, nan=0.0), 0.0, 1.0)


def _to_hwc(a: np.ndarray) -> np.ndarray:
    """(N, C, H, W) -> (N, H, W) for gray or (N, H, W, 3|4) for colour images."""
    c = a.shape[1]
    if c == 1:
        return a[:, 0]
    if c in (3, 4):
        return a.transpose(0, 2, 3, 1)
    return a.mean(axis=1)  # an unusual channel count: show the channel mean in gray


def _mosaic(a: np.ndarray, nrow: int, pad: int, fill: float) -> np.ndarray:
    """Tile (N, H, W[, C]) images into one array, `nrow` images per row, `pad` pixels of `fill` between."""
    n, h, w = a.shape[:3]
    ncol = min(nrow, n)
    rows = -(-n // ncol)
    out = np.full((rows * h + (rows - 1) * pad, ncol * w + (ncol - 1) * pad, *a.shape[3:]), fill,
                  dtype=np.float32)
    if out.ndim == 3 and out.shape[2] == 4:
        out[..., 3] = 1.0
    for i in range(n):
        r, c = divmod(i, ncol)
        out[r * (h + pad):r * (h + pad) + h, c * (w + pad):c * (w + pad) + w] = a[i]
    return out


def _scale(pixels_per_pixel: float) -> int:
    """Screen pixels per image pixel: a whole number, so that every image pixel is drawn as an equal square."""
    return max(1, round(pixels_per_pixel))


def _image_figure(shape_hw, scale: int, *, left: float, right: float, bottom: float, top: float):
    """A figure with one axes of exactly `scale` screen pixels per image pixel; margins in inches."""
    w_in, h_in = shape_hw[1] * scale / DPI, shape_hw[0] * scale / DPI
    fig_w, fig_h = left + w_in + right, bottom + h_in + top
    fig = _figure(fig_w, fig_h)
    ax = fig.add_axes((left / fig_w, bottom / fig_h, w_in / fig_w, h_in / fig_h))
    return fig, ax


def _cell_inches(ncol: int, h: int, w: int) -> float:
    # about 0.9 inch per image, smaller for wide grids (a figure stays under ~14 inches wide), and never
    # so small that an image gets fewer screen pixels than it has (28 px -> at least 0.28 inch)
    cell = min(0.9, 14.0 / max(ncol, 1))
    return max(cell, max(h, w) / DPI)


def save_image_grid(images, path, nrow: int, title: str | None = None,
                    row_labels: list[str] | None = None, col_labels: list[str] | None = None,
                    xlabel: str | None = None) -> str:
    """Save images (N, C, H, W) with values in [0, 1] as a grid of `nrow` images per row; returns the path.

    One channel is drawn in gray, three (four) as RGB(A). Pixels are shown as crisp squares (no smoothing).
    `row_labels` names the rows on the left (e.g. "original", "reconstruction"), `col_labels` the columns
    below the grid (e.g. the latent values of a traversal), with `xlabel` under them.
    """
    a = _to_hwc(_as_images(images))
    n, h, w = a.shape[:3]
    nrow = max(1, min(int(nrow), n))
    rows = -(-n // nrow)
    pad = max(1, round(max(h, w) / 14))  # a thin gap between images, ~2 px for 28x28
    mosaic = _mosaic(a, nrow, pad, fill=1.0)
    scale = _scale(_cell_inches(nrow, h, w) * DPI / max(h, w))
    below = (0.3 if col_labels else 0.0) + (0.3 if xlabel else 0.0)
    fig, ax = _image_figure(mosaic.shape[:2], scale, left=0.02, right=0.02, bottom=0.02 + below,
                            top=0.45 if title else 0.02)
    kw = {"cmap": "gray", "vmin": 0.0, "vmax": 1.0} if mosaic.ndim == 2 else {}
    ax.imshow(mosaic, interpolation="nearest", **kw)
    for side in ax.spines.values():
        side.set_visible(False)
    if col_labels:
        ax.set_xticks([c * (w + pad) + (w - 1) / 2 for c in range(min(nrow, len(col_labels)))])
        ax.set_xticklabels(list(col_labels)[:nrow], fontsize=10)
        ax.tick_params(axis="x", length=0)
    else:
        ax.set_xticks([])
    if xlabel:
        ax.set_xlabel(xlabel, fontsize=11)
    if row_labels:
        ax.set_yticks([r * (h + pad) + (h - 1) / 2 for r in range(min(rows, len(row_labels)))])
        ax.set_yticklabels(list(row_labels)[:rows], fontsize=11)
        ax.tick_params(axis="y", length=0)
    else:
        ax.set_yticks([])
    if title:
        ax.set_title(_wrap(title, fig.get_figwidth() + (1.3 if row_labels else 0.0)), fontsize=12)
    return _save(fig, path)


def save_manifold(images, xs, ys, path, dims=(0, 1), title: str | None = None) -> str:
    """Save a decoded latent grid (len(ys) * len(xs) images, row by row from the top left) as one picture
    whose axis ticks give the latent values, as the Keras tutorial's `plot_latent_space`."""
    a = _to_hwc(_as_images(images))
    xs, ys = np.asarray(xs, dtype=float), np.asarray(ys, dtype=float)
    n, h, w = a.shape[:3]
    if n != len(xs) * len(ys):
        raise VaelabError(f"{n} images do not fill a {len(ys)} x {len(xs)} grid")
    mosaic = _mosaic(a, len(xs), pad=0, fill=0.0)  # no gaps: the decoded images form one continuous map
    # about 6-12 inches (15 x 15 -> 6.75), rounded to a whole number of screen pixels per image pixel
    size = min(12.0, max(6.0, 0.45 * max(len(xs), len(ys))))
    fig, ax = _image_figure(mosaic.shape[:2], _scale(size * DPI / max(mosaic.shape[:2])), left=0.7,
                            bottom=0.6, top=0.45 if title else 0.1, right=0.1)
    kw = {"cmap": "Greys_r", "vmin": 0.0, "vmax": 1.0} if mosaic.ndim == 2 else {}
    ax.imshow(mosaic, interpolation="nearest", **kw)
    # a tick in the middle of each column (row) of images, labelled with the z value decoded there
    ax.set_xticks(np.arange(len(xs)) * w + (w - 1) / 2)
    ax.set_xticklabels(_tick_labels(xs), fontsize=8, rotation=90 if len(xs) > 20 else 0)
    ax.set_yticks(np.arange(len(ys)) * h + (h - 1) / 2)
    ax.set_yticklabels(_tick_labels(ys), fontsize=8)
    ax.set_xlabel(f"z[{dims[0]}]")
    ax.set_ylabel(f"z[{dims[1]}]")
    if title:
        ax.set_title(_wrap(title, fig.get_figwidth()), fontsize=12)
    return _save(fig, path)


PROJECTIONS = ("pca", "tsne")


def project_2d(z: np.ndarray, projection: str = "pca") -> tuple[np.ndarray, str, str]:
    """(N, 2) coordinates of latent vectors z (N, D) for a scatter plot, with the two axis labels (see
    `save_scatter`)."""
    if projection not in PROJECTIONS:
        raise VaelabError(f"projection={projection!r} is unknown; choose one of {list(PROJECTIONS)}")
    z = np.asarray(z, dtype=np.float64).reshape(len(z), -1)
    d = z.shape[1]
    if d == 2:
        xy, xlabel, ylabel = z, "z[0]", "z[1]"
    elif d == 1:
        jitter = np.random.default_rng(0).uniform(-1, 1, size=len(z))
        xy, xlabel, ylabel = np.column_stack([z[:, 0], jitter]), "z[0]", "random jitter (no meaning)"
    elif projection == "tsne" and len(z) > 3:
        from sklearn.manifold import TSNE

        tsne = TSNE(n_components=2, perplexity=min(30.0, (len(z) - 1) / 3), init="pca", random_state=0)
        xy = tsne.fit_transform(z)
        xlabel, ylabel = f"t-SNE 1 of the {d}-D latent", "t-SNE 2"
    else:
        from sklearn.decomposition import PCA

        k = min(2, len(z))
        pca = PCA(n_components=k, random_state=0).fit(z)
        xy = pca.transform(z)
        if k < 2:
            xy = np.column_stack([xy, np.zeros(len(z))])
        var = list(pca.explained_variance_ratio_) + [0.0] * (2 - k)
        xlabel = f"PC 1 of the {d}-D latent ({100 * var[0]:.0f}% of variance)"
        ylabel = f"PC 2 ({100 * var[1]:.0f}% of variance)"
    return xy, xlabel, ylabel


def save_scatter(z, labels, path, classes: list[str] | None = None, title: str = "Latent space",
                 projection: str = "pca") -> str:
    """Save a 2-D scatter plot of latent vectors z (N, D), coloured by integer `labels` (N,) when given.

    D = 2 is drawn as is; D > 2 is projected on its first two principal components (projection="pca"; the
    axes say so and give the share of variance each explains) or embedded by t-SNE (projection="tsne",
    scikit-learn's, perplexity 30, PCA-initialised, seed 0: neighbourhoods, not distances, are meaningful);
    D = 1 is drawn against a small random jitter.
    """
    z = np.asarray(z, dtype=np.float64).reshape(len(z), -1)
    if z.shape[0] == 0:
        raise VaelabError("no latent vectors to plot (the dataset is empty)")
    if not np.isfinite(z).all():
        raise VaelabError("the latent vectors hold non-finite values; the model is broken (retrain it)")
    d = z.shape[1]
    xy, xlabel, ylabel = project_2d(z, projection)

    fig = _figure(7.5, 6.2)
    ax = fig.add_subplot(1, 1, 1)
    n = len(z)
    size = float(np.clip(6000.0 / n, 3.0, 30.0))  # smaller, fainter dots for more points
    alpha = float(np.clip(600.0 / n ** 0.75, 0.35, 0.9))
    if labels is None:
        ax.scatter(xy[:, 0], xy[:, 1], s=size, alpha=alpha, color="tab:blue", linewidths=0)
    else:
        labels = np.asarray(labels).reshape(-1)
        if len(labels) != n:
            raise VaelabError(f"{len(labels)} labels for {n} latent vectors")
        k = int(labels.max()) + 1 if len(labels) else 0
        k = max(k, len(classes) if classes else 0)
        if k <= 20:
            import matplotlib

            cmap = matplotlib.colormaps["tab10" if k <= 10 else "tab20"]
            order = np.random.default_rng(0).permutation(n)  # no class is painted over all the others
            colors = cmap(labels[order] % cmap.N)
            ax.scatter(xy[order, 0], xy[order, 1], s=size, c=colors, alpha=alpha, linewidths=0)
            from matplotlib.lines import Line2D

            present = sorted(set(labels.tolist()))
            handles = [Line2D([], [], marker="o", linestyle="", color=cmap(c % cmap.N), markersize=7,
                              label=_class_name(c, classes)) for c in present]
            ax.legend(handles=handles, loc="center left", bbox_to_anchor=(1.01, 0.5), frameon=False,
                      fontsize=9, title="class")
        else:  # many classes: a continuous colour scale
            sc = ax.scatter(xy[:, 0], xy[:, 1], s=size, c=labels, cmap="viridis", alpha=alpha, linewidths=0)
            fig.colorbar(sc, ax=ax, label="label")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(_wrap(title, 7.5), fontsize=12)
    ax.grid(True, alpha=0.25)
    return _save(fig, path)


def _class_name(c: int, classes) -> str:
    if classes and 0 <= c < len(classes):
        name = str(classes[c])
        return name if name == str(c) else f"{c}: {name}"
    return str(c)


def _tick_labels(values) -> list[str]:
    # one decimal as in the tutorial, more where the range is small (an autoencoder's percentile span)
    span = float(np.max(values) - np.min(values)) if len(values) > 1 else 1.0
    step = span / max(len(values) - 1, 1)
    decimals = 1 if step >= 0.1 or step == 0 else min(4, int(np.ceil(-np.log10(step))) + 1)
    return [f"{round(float(v), decimals) + 0.0:.{decimals}f}" for v in values]  # + 0.0: no "-0.0"


def _wrap(text: str, width_in: float) -> str:
    # about 9 characters per inch at 12 pt
    return "\n".join(textwrap.wrap(text, max(20, int(width_in * 9)))) or text


# ================================================================================== disentanglement


def save_mi_matrix(mi, path, factor_names, factor_entropy=None, dim_labels: list[str] | None = None,
                   title: str | None = None) -> str:
    """Save a matrix plot of the mutual information between each latent dimension (rows) and each factor
    (columns), from `mi` (D, F) in nats. With `factor_entropy` (F,) each column is divided by its factor's
    entropy, so a cell reads "the fraction of what there is to know about factor j that dimension i holds"
    (0..1; MIG is the mean gap between the two largest fractions of a column); without, the cells are nats.
    `dim_labels` name the rows (default z[i]), e.g. with each dimension's KL."""
    m = np.asarray(mi, dtype=np.float64)
    if m.ndim != 2 or m.size == 0:
        raise VaelabError(f"expected a (latent dims, factors) matrix of mutual information, got shape {m.shape}")
    dims, n_factors = m.shape
    names = [str(n) for n in factor_names]
    if len(names) != n_factors:
        raise VaelabError(f"{len(names)} factor names for a matrix of {n_factors} factors")
    rows = list(dim_labels) if dim_labels is not None else [f"z[{i}]" for i in range(dims)]
    if len(rows) != dims:
        raise VaelabError(f"{len(rows)} row labels for a matrix of {dims} latent dimensions")
    if factor_entropy is not None:
        h = np.asarray(factor_entropy, dtype=np.float64).reshape(-1)
        shown = np.divide(m, h[None, :], out=np.zeros_like(m), where=h[None, :] > 0)
        vmax, label, fmt = 1.0, "I(z_i; f_j) / H(f_j)", "{:.2f}"
    else:
        shown = m
        vmax, label, fmt = max(float(m.max()), 1e-12), "I(z_i; f_j), nats", "{:.2g}"
    width = 1.6 + max(3.0, 0.95 * n_factors) + 1.2
    height = 0.9 + max(1.5, 0.36 * dims) + (0.5 if title else 0.0)
    fig = _figure(width, height)
    ax = fig.add_axes((1.6 / width, 0.9 / height, (width - 2.9) / width, (height - 1.0 - (0.5 if title else 0.0))
                       / height))
    im = ax.imshow(shown, cmap="viridis", vmin=0.0, vmax=vmax, aspect="auto", interpolation="nearest")
    for i in range(dims):
        for j in range(n_factors):
            v = shown[i, j]
            ax.text(j, i, fmt.format(v), ha="center", va="center", fontsize=8,
                    color="black" if v > 0.6 * vmax else "white")
    ax.set_xticks(range(n_factors))
    ax.set_xticklabels(names, fontsize=9, rotation=30 if max(map(len, names)) > 8 else 0, ha="right"
                       if max(map(len, names)) > 8 else "center")
    ax.set_yticks(range(dims))
    ax.set_yticklabels(rows, fontsize=8)
    ax.set_xlabel("ground-truth factor")
    cax = fig.add_axes(((width - 1.1) / width, 0.9 / height, 0.18 / width,
                        (height - 1.0 - (0.5 if title else 0.0)) / height))
    fig.colorbar(im, cax=cax).set_label(label, fontsize=9)
    if title:
        fig.suptitle(_wrap(title, width), fontsize=11, y=1.0 - 0.08 / height, va="top")
    return _save(fig, path)


def gif_available() -> bool:
    """Whether animated GIFs can be written (Pillow, which matplotlib depends on, is importable)."""
    import importlib.util

    return importlib.util.find_spec("PIL") is not None


def save_traversal_gif(frames, path, values, row_labels: list[str] | None = None,
                       col_labels: list[str] | None = None, title: str | None = None, duration_ms: int = 150) -> str:
    """Save latent traversals as an animated GIF: `frames` (R, K, S, C, H, W) holds R rows (one latent dimension
    each), K images per row (e.g. traversals of K test images) and S steps; frame s shows every row at the swept
    value values[s], and the animation runs forward and back, looping. Needs Pillow (see gif_available)."""
    if not gif_available():
        raise VaelabError("animated GIFs need Pillow (pip install pillow); the PNG traversals need only matplotlib")
    from PIL import Image

    if hasattr(frames, "detach"):
        frames = frames.detach().float().cpu().numpy()
    a = np.asarray(frames, dtype=np.float32)
    if a.ndim != 6 or 0 in a.shape[:3]:
        raise VaelabError(f"expected traversal frames (rows, images, steps, C, H, W), got shape {a.shape}")
    r, k, s = a.shape[:3]
    values = list(values)
    if len(values) != s:
        raise VaelabError(f"{len(values)} values for {s} steps of a traversal")
    images = [_to_hwc(_as_images(a[:, :, step].reshape(r * k, *a.shape[3:]))) for step in range(s)]
    h, w = images[0].shape[1:3]
    pad = max(1, round(max(h, w) / 14))
    mosaics = [_mosaic(im, k, pad, fill=1.0) for im in images]
    scale = _scale(_cell_inches(k, h, w) * DPI / max(h, w))
    pictures = []
    for step, mosaic in enumerate(mosaics):  # every frame the same figure size: the GIF's frames must agree
        fig, ax = _image_figure(mosaic.shape[:2], scale, left=1.5 if row_labels else 0.05, right=0.05,
                                bottom=0.3 if col_labels else 0.05, top=0.75)
        kw = {"cmap": "gray", "vmin": 0.0, "vmax": 1.0} if mosaic.ndim == 2 else {}
        ax.imshow(mosaic, interpolation="nearest", **kw)
        for side in ax.spines.values():
            side.set_visible(False)
        ax.set_yticks([i * (h + pad) + (h - 1) / 2 for i in range(r)] if row_labels else [])
        if row_labels:
            ax.set_yticklabels(list(row_labels)[:r], fontsize=9)
        ax.set_xticks([c * (w + pad) + (w - 1) / 2 for c in range(k)] if col_labels else [])
        if col_labels:
            ax.set_xticklabels(list(col_labels)[:k], fontsize=9)
        ax.tick_params(length=0)
        head = f"swept value {float(values[step]):+.2f}"
        ax.set_title(_wrap(f"{title}\n{head}" if title else head, fig.get_figwidth()), fontsize=10)
        fig.canvas.draw()
        pictures.append(Image.fromarray(np.asarray(fig.canvas.buffer_rgba())[..., :3].copy()))
    order = list(range(s)) + list(range(s - 2, 0, -1))  # forward and back: the loop has no jump
    palette = [pictures[i].convert("P", palette=Image.Palette.ADAPTIVE, colors=256) for i in order]
    from vaelab.training.checkpoint import atomic_write_bytes

    buf = io.BytesIO()
    palette[0].save(buf, format="GIF", save_all=True, append_images=palette[1:], duration=int(duration_ms), loop=0)
    atomic_write_bytes(path, buf.getvalue())
    return os.fspath(path)


def spans(mask: np.ndarray) -> list[tuple[int, int]]:
    """The [first, last + 1) row ranges where `mask` is True."""
    edges = np.flatnonzero(np.diff(np.concatenate(([0], np.asarray(mask, dtype=np.int8), [0]))))
    return list(zip(edges[::2].tolist(), edges[1::2].tolist()))


def save_series(values, columns: list[str], score, threshold: float, path, labels=None, max_channels: int = 8,
                title: str = "Anomaly scores of a series") -> str:
    """A multivariate series (T, C) over its per-timestamp anomaly score: one panel per channel (the first
    `max_channels`), then the score with the threshold; rows above it shaded red in every panel, rows labelled
    anomalous (labels, 0/1) shaded grey."""
    values = np.asarray(values, dtype=np.float64)
    score = np.asarray(score, dtype=np.float64)
    shown = min(values.shape[1], max_channels)
    fig = _figure(10.0, 1.3 * shown + 2.0)
    axes = fig.subplots(shown + 1, 1, sharex=True, gridspec_kw={"height_ratios": [1] * shown + [1.5]})
    flagged = spans(score > threshold)
    known = spans(np.asarray(labels) == 1) if labels is not None else []
    t = np.arange(len(score))
    for i, ax in enumerate(axes):
        for a, b in known:
            ax.axvspan(a - 0.5, b - 0.5, color="0.8", lw=0)
        for a, b in flagged:
            ax.axvspan(a - 0.5, b - 0.5, color="tab:red", alpha=0.25, lw=0)
        if i < shown:
            ax.plot(t, values[:, i], lw=0.7, color="tab:blue")
            ax.set_ylabel(columns[i], rotation=0, ha="right", va="center")
    axes[-1].plot(t, score, lw=0.7, color="black")
    axes[-1].axhline(threshold, color="tab:red", ls="--", lw=0.8, label=f"threshold {threshold:.4g}")
    axes[-1].set_ylabel("score", rotation=0, ha="right", va="center")
    axes[-1].set_xlabel("row (red: flagged" + ("; grey: labelled anomalies)" if labels is not None else ")"))
    axes[-1].legend(loc="upper right", fontsize=8)
    hidden = values.shape[1] - shown
    fig.suptitle(title + (f" (first {shown} of {values.shape[1]} channels)" if hidden else ""))
    return _save(fig, path)


__all__ = ["save_image_grid", "save_series", "spans", "save_manifold", "save_scatter", "save_mi_matrix",
           "gif_available", "save_traversal_gif"]
