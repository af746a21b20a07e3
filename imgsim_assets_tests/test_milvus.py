"""Milvus Lite as the vector store: upserts replace a batch's rows, search filters by batch."""

import numpy as np
import pytest

from imgsim_assets.core import index as ix
from imgsim_assets.core import milvus


def test_batches_upsert_replace_and_search(tmp_path):
    client = milvus.connect(str(tmp_path / "milvus.db"))
    vectors = ix.normalize_rows(np.random.default_rng(0).normal(size=(30, 16)))
    milvus.ensure_collection(client, "c", 16, {"model": "dinov2_vits14", "pooling": "cls"})
    assert milvus.provenance(client, "c") == {"model": "dinov2_vits14", "pooling": "cls"}

    assert milvus.upsert_batch(client, "c", "b1", np.arange(20), vectors[:20], [f"b1/{i}.png" for i in range(20)]) == (20, 0)
    assert milvus.upsert_batch(client, "c", "b2", np.arange(20, 30), vectors[20:], [f"b2/{i}.png" for i in range(10)]) == (10, 0)
    assert milvus.count(client, "c") == 30
    # b1 re-ingested without images 15..19: their rows go, nothing is duplicated.
    assert milvus.upsert_batch(client, "c", "b1", np.arange(15), vectors[:15], [f"b1/{i}.png" for i in range(15)]) == (15, 5)
    assert milvus.count(client, "c") == 25

    hits = milvus.search(client, "c", vectors[3:4], k=3)[0]
    assert hits[0]["image_id"] == 3 and hits[0]["path"] == "b1/3.png" and hits[0]["inner_product"] == pytest.approx(1.0, abs=1e-4)
    only_b2 = milvus.search(client, "c", vectors[3:4], k=5, batches=["b2"])[0]
    assert len(only_b2) == 5 and {h["batch"] for h in only_b2} == {"b2"}

    with pytest.raises(ValueError, match="holds 16-d vectors, these embeddings are 8-d"):
        milvus.ensure_collection(client, "c", 8, {})
    client.close()


def test_a_milvus_that_does_not_answer_is_a_clear_error():
    with pytest.raises(ConnectionError, match=r"Milvus at 'http://127.0.0.1:9' did not answer"):
        milvus.connect("http://127.0.0.1:9", timeout=2)
