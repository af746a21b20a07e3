"""Downstream use of the index: answer a folder of query images."""


from pathlib import Path

import pandas as pd
from dagster import AssetExecutionContext, AssetIn, Config, MetadataValue, asset
from pydantic import Field

from imgsim_assets.core import images, plots
from imgsim_assets.core.search import FaissSearcher, ImageIndex
from imgsim_assets.resources import EncoderResource, StorageResource


THUMBNAIL_QUERIES = 4


class QueryConfig(Config):
    query_dir: str = Field(default="", description="folder of query images; default <data>/queries")
    k: int = 10
    nprobe: int = Field(default=0, description="0: the nprobe chosen when the index was built")


@asset(
    ins={"faiss_index": AssetIn()},
    io_manager_key="parquet_io_manager",
    group_name="downstream",
    kinds={"faiss"},
)
def similar_images(
    context: AssetExecutionContext,
    config: QueryConfig,
    faiss_index: ImageIndex,
    encoder: EncoderResource,
    storage: StorageResource,
) -> pd.DataFrame:
    """The k nearest indexed images of every image in a query folder (query, rank, image_id, path,
    inner product, score = (s+1)/2). Queries are embedded exactly as the index's images were."""
    folder = Path(config.query_dir) if config.query_dir else Path(storage.data_dir) / "queries"
    searcher = FaissSearcher(faiss_index, storage.assets_dir / "image_embeddings", device=encoder.device,
                             dtype=encoder.dtype)
    answers = searcher.search_files(images.list_batch_files(folder), config.k, config.nprobe or None, root=folder)
    rows = []
    for answer in answers:
        rows += [{"query": answer.query, **hit.to_dict(), "rejected": ""} for hit in answer.hits]
        if not answer.ok:
            context.log.warning(f"query {answer.query} rejected: {answer.record.reason}: {answer.record.message}")
            rows.append({"query": answer.query, "rank": 0, "image_id": -1, "inner_product": float("nan"),
                         "score": float("nan"), "path": "", "batch": "", "copies": 0, "rejected": answer.record.reason})
    frame = pd.DataFrame(rows)
    top1 = frame[frame["rank"] == 1][["query", "path", "score"]] if len(frame) else frame
    # A few queries as thumbnails, each followed by its neighbours: easier to judge than scores.
    answered = [a for a in answers if a.ok]
    grid = [[plots.source_file(folder, a.query)] + [plots.source_file(storage.images_dir, h.path) for h in a.hits[:5]]
            for a in answered[:THUMBNAIL_QUERIES]]
    metadata = {
        "num_queries": len(answers),
        "num_rejected": len(answers) - len(answered),
        "top_hits": MetadataValue.md(top1.to_markdown(index=False) if len(top1) else "none"),
    }
    if grid:
        metadata["queries_and_neighbours"] = MetadataValue.md(
            plots.markdown_image(plots.thumbnail_grid(grid), "each row: a query, then its nearest images"))
    context.add_output_metadata(metadata)
    return frame
