"""Small PNG plots for asset metadata: people would rather look at these than read them."""

from __future__ import annotations

import base64
import io
import os

import numpy as np


def _figure(width: float = 5.0, height: float = 3.0):
    import matplotlib

    matplotlib.use("Agg")  # no display, no GUI toolkit
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(width, height), dpi=100)
    return plt, fig, ax


def _png(plt, fig) -> bytes:
    buf = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return buf.getvalue()


def markdown_image(png: bytes, alt: str) -> str:
    """Markdown that shows ``png`` inline (the Dagster UI renders data URIs)."""
    return f"![{alt}](data:image/png;base64,{base64.b64encode(png).decode()})"


def explained_variance(ratio: np.ndarray, kept: int) -> bytes:
    plt, fig, ax = _figure()
    cumulative = np.cumsum(ratio)
    ax.plot(np.arange(1, len(ratio) + 1), cumulative, lw=1.5)
    ax.axvline(kept, color="tab:red", ls="--", lw=1, label=f"kept {kept} ({cumulative[kept - 1]:.1%})")
    ax.set(xlabel="principal components", ylabel="cumulative explained variance", ylim=(0, 1.01))
    ax.legend(loc="lower right")
    return _png(plt, fig)


def cluster_sizes(sizes: np.ndarray) -> bytes:
    plt, fig, ax = _figure()
    ax.hist(sizes, bins=min(50, max(5, len(sizes) // 4)), color="tab:blue")
    ax.set(xlabel="vectors per cluster", ylabel="clusters", title=f"{len(sizes)} clusters, mean {sizes.mean():.0f}")
    return _png(plt, fig)


def recall_curve(nprobe, recall, ms, target: float, pca_recall: float = 1.0) -> bytes:
    """The index's recall@10 (ANN loss, against exact search after PCA) by latency, with the
    target and the ceiling PCA leaves (exact search after PCA against raw embeddings)."""
    plt, fig, ax = _figure()
    ax.plot(ms, recall, marker="o", label="index vs exact search after PCA")
    for x, y, p in zip(ms, recall, nprobe):
        ax.annotate(f"nprobe {p}", (x, y), textcoords="offset points", xytext=(4, -10), fontsize=7)
    ax.axhline(target, color="tab:red", ls="--", lw=1, label=f"target {target}")
    ax.axhline(pca_recall, color="tab:gray", ls=":", lw=1, label=f"PCA vs raw embeddings {pca_recall:.3f}")
    low = min(min(recall), target, pca_recall) - 0.05
    ax.set(xlabel="ms per single query", ylabel="recall@10 (tie-aware)", ylim=(low, 1.01))
    ax.legend(loc="lower right")
    return _png(plt, fig)


def source_file(root, path: str) -> str:
    """The file a manifest path names under ``root``, for a thumbnail ("" -- shown blank --
    for a path that would lead outside ``root``)."""
    from imgsim_assets.core.images import source_path

    try:
        return str(source_path(root, path))
    except ValueError:
        return ""


def thumbnail_grid(rows: list[list[str]], size: int = 96) -> bytes:
    """One row of thumbnails per group of image files. A file that is gone, not a regular
    file (a FIFO would block), or cannot be drawn, shows blank."""
    from PIL import Image

    width = max(len(r) for r in rows) if rows else 1
    canvas = Image.new("RGB", (width * (size + 4), max(len(rows), 1) * (size + 4)), (255, 255, 255))
    for y, row in enumerate(rows):
        for x, path in enumerate(row):
            if not path or not os.path.isfile(path):
                continue
            try:
                with Image.open(path) as im:
                    im.draft("RGB", (size, size))
                    thumb = im.convert("RGB")
                    thumb.thumbnail((size, size))
                canvas.paste(thumb, (x * (size + 4), y * (size + 4)))
            except Exception:  # noqa: BLE001 -- a picture in metadata must never fail the asset
                continue
    buf = io.BytesIO()
    canvas.save(buf, format="PNG")
    return buf.getvalue()


def family_bars(rows: list[dict], title: str = "") -> bytes:
    """recall@1, recall@10 and mAP per copy family (rows of ``CopyDetectionReport.table()``)."""
    plt, fig, ax = _figure(7.0, 3.2)
    names = [r["family"] for r in rows]
    x = np.arange(len(names))
    for i, (key, label) in enumerate((("recall_at_1", "recall@1"), ("recall_at_10", "recall@10"),
                                      ("mean_average_precision", "mAP"))):
        ax.bar(x + (i - 1) * 0.27, [r[key] for r in rows], width=0.27, label=label)
    ax.set_xticks(x, names, rotation=35, ha="right", fontsize=8)
    ax.set(ylim=(0, 1.05), ylabel="share of copies", title=title)
    ax.legend(loc="lower left", fontsize=7)
    return _png(plt, fig)


def precision_recall(curve: dict, threshold: float, target: float, title: str = "") -> bytes:
    """Precision and recall of "score ≥ t means same image" by t, with the calibrated threshold."""
    plt, fig, ax = _figure()
    ax.plot(curve["threshold"], curve["precision"], label="precision")
    ax.plot(curve["threshold"], curve["recall"], label="recall")
    ax.axvline(threshold, color="tab:red", ls="--", lw=1, label=f"threshold {threshold:.4f}")
    ax.axhline(target, color="tab:gray", ls=":", lw=1, label=f"target precision {target}")
    ax.set(xlabel="cosine similarity threshold", ylim=(0, 1.02), title=title)
    ax.legend(loc="lower left", fontsize=7)
    return _png(plt, fig)


def score_histograms(copy: list[float], nearest_non_copy: list[float], threshold: float, title: str = "") -> bytes:
    """Scores of true copies against their source vs the best-scoring non-copy of each."""
    plt, fig, ax = _figure()
    values = np.concatenate((np.asarray(copy, float), np.asarray(nearest_non_copy, float)))
    bins = np.linspace(values.min(initial=0.0), values.max(initial=1.0) + 1e-6, 40) if len(values) else 10
    ax.hist(copy, bins=bins, alpha=0.6, label="copy vs its source")
    ax.hist(nearest_non_copy, bins=bins, alpha=0.6, label="copy vs nearest non-copy")
    ax.axvline(threshold, color="tab:red", ls="--", lw=1, label="threshold")
    ax.set(xlabel="cosine similarity", ylabel="copies", title=title)
    ax.legend(loc="upper left", fontsize=7)
    return _png(plt, fig)


def option_bars(rows: list[dict], title: str = "") -> bytes:
    """recall@1 and mAP per encoder option, with ms per image written on each."""
    plt, fig, ax = _figure(7.0, 3.2)
    x = np.arange(len(rows))
    ax.bar(x - 0.2, [r["recall_at_1"] for r in rows], width=0.4, label="recall@1")
    ax.bar(x + 0.2, [r["mean_average_precision"] for r in rows], width=0.4, label="mAP")
    for i, r in enumerate(rows):
        ax.annotate(f"{r['ms_per_image']:.0f} ms", (i, 1.0), ha="center", fontsize=7)
    ax.set_xticks(x, [r["option"] for r in rows], rotation=30, ha="right", fontsize=8)
    ax.set(ylim=(0, 1.1), title=title)
    ax.legend(loc="lower left", fontsize=7)
    return _png(plt, fig)
