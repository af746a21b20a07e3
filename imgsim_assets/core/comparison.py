"""The copy-detection evaluation run once per encoder option, on the user's own images, so a
choice of pooling, resolution and reduction is made with numbers.

An option is written ``POOLING@SIZE[:REDUCTION]``:

- POOLING: one of :data:`dinov2.POOLINGS` (``cls``, ``mean``, ``cls+gem``);
- SIZE: ``224`` (resize the shorter side, centre crop, as DINOv2 evaluates) or ``1050x700``
  (height × width, resized straight, as the seed article does);
- REDUCTION: ``none`` (default), ``pca`` or ``whiten`` (PCA whitened), fitted on the database.

Every option embeds the same database (sampled sources plus distractors, read from their
files) and the same copies of the sources, and searches exactly, so the rows differ only by
the option.
"""

from __future__ import annotations

import copy
import time
from dataclasses import dataclass, replace
from typing import Callable, Sequence

import numpy as np

from imgsim_assets.core import dinov2
from imgsim_assets.core import evaluation as ev
from imgsim_assets.core import index as ix
from imgsim_assets.core.build import PcaSettings
from imgsim_assets.core.encoder import Encoder
from imgsim_assets.core.images import Preprocess

REDUCTIONS = ("none", "pca", "whiten")


@dataclass(frozen=True)
class ComparisonSettings:
    """``encoder_comparison``'s settings; its Dagster config, ``imgsim compare-encoders`` and the
    benchmarks take their defaults from here."""

    # The pipeline's default, its variations one at a time, and the seed article's choice.
    options: tuple[str, ...] = ("cls@224:pca", "cls@224", "cls@224:whiten", "mean@224:pca", "cls+gem@224:pca",
                                "cls@336:pca", "mean@1050x700")
    sample_size: int = 100  # images copied per option
    database_size: int = 1000  # images searched (the copied ones among them)
    families: tuple[str, ...] = ev.CopyDetectionSettings.families
    seed: int = ev.CopyDetectionSettings.seed
    duplicate_precision: float = ev.CopyDetectionSettings.duplicate_precision
    pca_dim: int = PcaSettings.dim  # dimension of the pca and whiten reductions


_DEFAULTS = ComparisonSettings()


@dataclass(frozen=True)
class Option:
    name: str
    pooling: str
    preprocess: Preprocess
    reduction: str


def parse_option(text: str, base: Preprocess = Preprocess()) -> Option:
    """``POOLING@SIZE[:REDUCTION]`` → :class:`Option`; ValueError saying what is wrong."""
    head, _, reduction = text.strip().partition(":")
    pooling, at, size = head.partition("@")
    reduction = reduction or "none"
    if not at or not size:
        raise ValueError(f"encoder option {text!r}: write POOLING@SIZE[:REDUCTION], e.g. cls@224:pca or mean@1050x700")
    if pooling not in dinov2.POOLINGS:
        raise ValueError(f"encoder option {text!r}: unknown pooling {pooling!r}; choose {', '.join(dinov2.POOLINGS)}")
    if reduction not in REDUCTIONS:
        raise ValueError(f"encoder option {text!r}: unknown reduction {reduction!r}; choose {', '.join(REDUCTIONS)}")
    try:
        if "x" in size:
            h, w = (int(v) for v in size.split("x"))
            pre = replace(base, protocol="grid", grid_size=(h, w))
        else:
            crop = int(size)
            pre = replace(base, protocol="dinov2_eval", crop_size=crop, resize_size=round(crop * 256 / 224))
    except ValueError as e:
        raise ValueError(f"encoder option {text!r}: {e}") from None
    return Option(text.strip(), pooling, pre, reduction)


def sample(index, images_dir, sample_size: int, database_size: int, seed: int) -> tuple[list[ev.Source], list[ev.Source]]:
    """(sources, database): ``database_size`` indexed images, and ``sample_size`` of them to copy."""
    database_ids = ev.sample_sources(index.catalog.column("image_id").to_numpy(), database_size, seed)
    database = ev.indexed_sources(index, images_dir, database_ids)
    source_ids = ev.sample_sources(np.array([s.image_id for s in database], dtype=np.int64), sample_size, seed + 1)
    return ev.indexed_sources(index, images_dir, source_ids), database


@dataclass
class OptionResult:
    option: str
    recall_at_1: float
    recall_at_10: float
    mean_average_precision: float
    threshold: float  # calibrated at the target precision
    recall_at_threshold: float
    ms_per_image: float  # decode + preprocess + model, database and copies together
    dim: int
    bytes_per_vector: int  # float32 as stored in image_embeddings / the reduced vector
    random_weights: bool

    def to_dict(self) -> dict:
        return dict(self.__dict__)


def compare(
    options: Sequence[Option],
    sources: Sequence[ev.Source],
    database: Sequence[ev.Source],
    encoder: Encoder,
    families: Sequence[str] = _DEFAULTS.families,
    seed: int = _DEFAULTS.seed,
    target_precision: float = _DEFAULTS.duplicate_precision,
    pca_dim: int = _DEFAULTS.pca_dim,
    workers: int = 1,
    scratch=None,
    log: Callable[[str], None] = lambda message: None,
) -> list[OptionResult]:
    """One row per option: the evaluation of :mod:`evaluation`, in an exact index of
    ``database`` embedded with that option (``sources`` must be part of ``database``).
    ``encoder``'s model is loaded once; the options change its pooling and preprocessing."""
    from imgsim_assets.core.search import embed_files

    ids = np.array([s.image_id for s in database], dtype=np.int64)
    if not set(s.image_id for s in sources) <= set(ids.tolist()):
        raise ValueError("every source must be in the database")
    root = _common_root(database)
    results = []
    for option in options:
        pooled = copy.copy(encoder)
        pooled.spec = replace(encoder.spec, pooling=option.pooling)

        def embed(paths, root, pooled=pooled, pre=option.preprocess):
            return embed_files(paths, pooled, pre, root=root, workers=workers)

        began = time.perf_counter()
        records, raw = embed([str(s.path) for s in database], str(root))
        db_seconds = time.perf_counter() - began
        ok = np.array([r.status == "ok" for r in records])
        db_ids = ids[ok]
        transform = _reduction(option.reduction, raw, pca_dim, seed)
        space = ev.FlatSpace(db_ids, raw, transform)
        embedded = set(db_ids.tolist())
        usable = [s for s in sources if s.image_id in embedded]
        copyset = ev.embed_copies(usable, families, seed, embed, scratch)
        scores = ev.score_copies(copyset, space, seed=seed)
        summary = ev.summarize(scores, target_precision, seed, {}, random_weights=pooled.random_weights)
        seconds = db_seconds + copyset.embed_seconds
        dim = space.stored.shape[1]
        results.append(OptionResult(
            option=option.name, recall_at_1=summary.overall.recall_at_1, recall_at_10=summary.overall.recall_at_10,
            mean_average_precision=summary.overall.mean_average_precision,
            threshold=summary.threshold.value, recall_at_threshold=summary.threshold.recall,
            ms_per_image=1000 * seconds / max(len(records) + len(copyset.source), 1),
            dim=int(dim), bytes_per_vector=int(4 * dim), random_weights=pooled.random_weights,
        ))
        log(f"{option.name}: recall@1 {results[-1].recall_at_1:.3f}, mAP {results[-1].mean_average_precision:.3f}, "
            f"{results[-1].ms_per_image:.1f} ms/image")
    return results


def _reduction(kind: str, raw: np.ndarray, dim: int, seed: int):
    if kind == "none":
        return None
    pca = ix.fit_pca(raw, dim=dim, whiten=kind == "whiten", seed=seed)
    return pca.transform


def _common_root(sources: Sequence[ev.Source]):
    import os
    from pathlib import Path

    return Path(os.path.commonpath([str(s.path.parent) for s in sources]))
