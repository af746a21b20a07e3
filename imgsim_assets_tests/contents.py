"""What two runs of the pipeline are compared on: the stored index entry by entry, and the
embeddings batch by batch."""

from pathlib import Path

import faiss
import numpy as np
import pyarrow.parquet as pq

from imgsim_assets.core.search import ImageIndex


def index_contents(index: ImageIndex):
    """Inverted lists as {list: sorted [(id, stored code bytes)]}, and the sorted catalog rows."""
    ivf = faiss.extract_index_ivf(index.index)
    lists = {}
    for n in range(ivf.nlist):
        size = ivf.invlists.list_size(n)
        if size:
            ids = faiss.rev_swig_ptr(ivf.invlists.get_ids(n), size)
            codes = faiss.rev_swig_ptr(ivf.invlists.get_codes(n), size * ivf.code_size).reshape(size, -1)
            lists[n] = sorted(zip(ids.tolist(), (c.tobytes() for c in codes)))
    catalog = sorted(zip(*(index.catalog.column(c).to_pylist() for c in ("image_id", "batch", "path"))))
    return lists, catalog


def assert_same_index(actual: ImageIndex, expected: ImageIndex) -> None:
    actual_lists, actual_catalog = index_contents(actual)
    expected_lists, expected_catalog = index_contents(expected)
    assert actual_catalog == expected_catalog
    assert actual_lists.keys() == expected_lists.keys()
    for n in expected_lists:
        assert [i for i, _ in actual_lists[n]] == [i for i, _ in expected_lists[n]], f"list {n}: other ids"
        assert actual_lists[n] == expected_lists[n], f"list {n}: same ids, other stored vectors"


def embeddings(assets: Path, batch: str) -> dict[int, np.ndarray]:
    table = pq.read_table(assets / "image_embeddings" / f"{batch}.parquet")
    vectors = np.stack(table.column("embedding").to_numpy(zero_copy_only=False))
    return dict(zip(table.column("image_id").to_pylist(), vectors))


def assert_same_embeddings(actual_assets: Path, expected_assets: Path, batches) -> None:
    for batch in batches:
        a, b = embeddings(actual_assets, batch), embeddings(expected_assets, batch)
        assert a.keys() == b.keys(), f"batch {batch}: other image ids"
        for image_id in b:
            np.testing.assert_array_equal(a[image_id], b[image_id], err_msg=f"batch {batch}, image {image_id}")
