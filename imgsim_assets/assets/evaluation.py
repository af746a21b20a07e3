"""How good the index is on the collection's own images: ``retrieval_eval`` (edited copies of a
sample, searched in the published index; the calibrated duplicate threshold) and
``encoder_comparison`` (the same benchmark for other poolings, resolutions and reductions)."""


import pyarrow as pa
from dagster import AssetExecutionContext, AssetIn, Config, MetadataValue, asset
from pydantic import Field

from imgsim_assets.core import comparison, plots
from imgsim_assets.core import copies as cp
from imgsim_assets.core import evaluation as ev
from imgsim_assets.core.search import FaissSearcher, ImageIndex, embed_files
from imgsim_assets.policies import TRAINED
from imgsim_assets.resources import EncoderResource, PreprocessResource, StorageResource

RANDOM = "RANDOM WEIGHTS: these figures describe an untrained model, not DINOv2"


_COPIES, _COMPARISON = ev.CopyDetectionSettings(), comparison.ComparisonSettings()


class RetrievalEvalConfig(Config):
    sample_size: int = Field(default=_COPIES.sample_size, description="indexed images copied (all of them if fewer)")
    families: list[str] = Field(default=list(_COPIES.families), description="edit families: " + ", ".join(cp.FAMILIES))
    seed: int = Field(default=_COPIES.seed, description="chooses the sample and every edit's strength")
    duplicate_precision: float = Field(default=_COPIES.duplicate_precision, description="precision the duplicate "
                                       "threshold must reach for 'copy of the same image'")
    k: int = Field(default=_COPIES.k, description="results per copy; non-copies are counted among these")


def searcher_for(index: ImageIndex, storage: StorageResource, encoder: EncoderResource,
                 preprocessing: PreprocessResource) -> FaissSearcher:
    """The index with the encoder it was built with, on the device the encoder resource names."""
    return FaissSearcher(index, storage.assets_dir / "image_embeddings", device=encoder.device, dtype=encoder.dtype,
                         workers=preprocessing.workers)


def _markdown(rows: list[dict], columns: list[str]) -> str:
    def cell(v):
        return f"{v:.3f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r[c]) for c in columns) + " |" for r in rows]
    return "\n".join(lines)


EVAL_COLUMNS = ["family", "copies", "recall_at_1", "recall_at_10", "mean_average_precision", "median_copy_score",
                "median_nearest_non_copy"]


@asset(
    ins={"faiss_index": AssetIn()},
    deps=["pca_model"],
    io_manager_key="json_io_manager",
    group_name="downstream",
    kinds={"faiss", "json"},
    automation_condition=TRAINED,
)
def retrieval_eval(
    context: AssetExecutionContext,
    config: RetrievalEvalConfig,
    faiss_index: ImageIndex,
    storage: StorageResource,
    encoder: EncoderResource,
    preprocessing: PreprocessResource,
) -> ev.CopyDetectionReport:
    """Edited copies (JPEG, resize, crop, flip, rotation, colour, greyscale, blur, border, overlay
    and combinations) of a seeded sample of indexed images, embedded with the index's own encoder
    and searched in it: recall@1, recall@10 and mAP per edit, the scores of copies against the
    nearest non-copy, and the duplicate threshold that reaches ``duplicate_precision``, which
    ``near_duplicates`` uses. The copies never enter the index; their folder is removed.
    Evaluated when missing and when the PCA is retrained (``imgsim evaluate`` at any time)."""
    searcher = searcher_for(faiss_index, storage, encoder, preprocessing)
    ids = ev.sample_sources(faiss_index.catalog.column("image_id").to_numpy(), config.sample_size, config.seed)
    sources = ev.indexed_sources(faiss_index, storage.images_dir, ids)
    model, pre = searcher.encoder, searcher.preprocess

    def embed(paths, root):
        return embed_files(paths, model, pre, root=root, workers=searcher.workers)

    result = ev.detect_copies(sources, embed, ev.IndexSpace(faiss_index), config.families, config.seed,
                         config.duplicate_precision, config.k, scratch=storage.scratch_dir(),
                         random_weights=searcher.random_weights)
    title = "RANDOM WEIGHTS" if result.random_weights else ""
    t = result.threshold
    metadata = {
        "sources": result.sources,
        "copies": result.overall.copies,
        "recall_at_1": result.overall.recall_at_1,
        "recall_at_10": result.overall.recall_at_10,
        "mean_average_precision": result.overall.mean_average_precision,
        "duplicate_threshold": t.value,
        "threshold_precision": t.precision,
        "threshold_recall": t.recall,
        "target_reached": t.reached,
        "held_out_precision": result.held_out_precision,
        "held_out_recall": result.held_out_recall,
        "grouping": result.grouping,
        "groupings": MetadataValue.md(_markdown([g.__dict__ for g in result.groupings],
                                                ["rule", "purity", "completeness", "f1"])),
        "unlabelled_results": result.unlabelled,
        "skipped": len(result.skipped),
        "embed_ms_per_copy": round(result.embed_ms_per_copy, 2),
        "table": MetadataValue.md(_markdown(result.table(), EVAL_COLUMNS)),
        "by_family": MetadataValue.md(plots.markdown_image(plots.family_bars(result.table(), title), "by family")),
        "precision_recall": MetadataValue.md(plots.markdown_image(
            plots.precision_recall(result.curve, t.value, result.target_precision, title), "precision-recall")),
        "scores": MetadataValue.md(plots.markdown_image(
            plots.score_histograms(result.histograms["copy"], result.histograms["nearest_non_copy"], t.value, title),
            "copy vs nearest non-copy scores")),
    }
    if result.random_weights:
        metadata["weights"] = RANDOM
        context.log.warning(RANDOM)
    for source, reason in result.skipped[:20]:
        context.log.warning(f"skipped {source}: {reason}")
    context.add_output_metadata(metadata)
    return result


class EncoderComparisonConfig(Config):
    options: list[str] = Field(default=list(_COMPARISON.options),
                               description="POOLING@SIZE[:REDUCTION], e.g. cls@224:pca, mean@1050x700, cls+gem@336:whiten")
    sample_size: int = Field(default=_COMPARISON.sample_size, description="images copied per option")
    database_size: int = Field(default=_COMPARISON.database_size, description="images searched (the copied ones "
                               "among them)")
    families: list[str] = Field(default=list(_COMPARISON.families))
    seed: int = _COMPARISON.seed
    duplicate_precision: float = _COMPARISON.duplicate_precision
    pca_dim: int = Field(default=_COMPARISON.pca_dim, description="dimension of the pca and whiten reductions")


COMPARISON_COLUMNS = ["option", "recall_at_1", "recall_at_10", "mean_average_precision", "threshold",
                      "recall_at_threshold", "ms_per_image", "dim", "bytes_per_vector"]


@asset(
    ins={"faiss_index": AssetIn()},
    io_manager_key="parquet_io_manager",
    group_name="downstream",
    kinds={"pytorch", "parquet"},
)
def encoder_comparison(
    context: AssetExecutionContext,
    config: EncoderComparisonConfig,
    faiss_index: ImageIndex,
    storage: StorageResource,
    encoder: EncoderResource,
    preprocessing: PreprocessResource,
) -> pa.Table:
    """The retrieval evaluation for each encoder option (pooling, resolution, PCA / whitening)
    with the index's model, on the collection's own images: recall@1, mAP, ms per image and bytes
    per vector, one row per option. Run it with the compare_encoders job; nothing else depends on it."""
    options = [comparison.parse_option(o) for o in config.options]
    searcher = searcher_for(faiss_index, storage, encoder, preprocessing)
    sources, database = comparison.sample(faiss_index, storage.images_dir, config.sample_size, config.database_size,
                                          config.seed)
    rows = comparison.compare(options, sources, database, searcher.encoder, config.families, config.seed,
                              config.duplicate_precision, config.pca_dim, workers=searcher.workers,
                              scratch=storage.scratch_dir(), log=context.log.info)
    table = [r.to_dict() for r in rows]
    random_weights = any(r.random_weights for r in rows)
    metadata = {
        "table": MetadataValue.md(_markdown(table, COMPARISON_COLUMNS)),
        "options": MetadataValue.md(plots.markdown_image(
            plots.option_bars(table, "RANDOM WEIGHTS" if random_weights else ""), "encoder options")),
        "sources": len(sources),
        "database": len(database),
    }
    if random_weights:
        metadata["weights"] = RANDOM
    context.add_output_metadata(metadata)
    return pa.Table.from_pylist(table)
