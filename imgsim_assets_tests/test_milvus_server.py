"""The Milvus backend against a real Milvus server process over gRPC (``milvus_server_uri``):
the milvus_collection asset fills it batch by batch, MilvusSearcher answers as exact Faiss does,
a batch re-ingested adds and deletes rows, and a new client finds it all again."""

import time

import faiss
import numpy as np
import pytest
from dagster import build_asset_context

from imgsim_assets.assets.milvus import milvus_collection
from imgsim_assets.core import index as ix
from imgsim_assets.core import milvus, tables
from imgsim_assets.core.recall import tie_aware_recall
from imgsim_assets.core.search import MilvusSearcher
from imgsim_assets.resources import MilvusResource, StorageResource

DIM, PER_BATCH, K = 384, 100, 10
BATCHES = ("b1", "b2", "b3")
PROVENANCE = {"model": "dinov2_vits14", "pooling": "cls"}


@pytest.fixture(scope="module")
def corpus():
    """300 unit vectors with hash-like ids, 100 a batch; the last 10 of b3 copy the first 10 of b1
    (exact ties across batches, as byte-identical images in two folders give)."""
    rng = np.random.default_rng(7)
    vectors = ix.normalize_rows(rng.normal(size=(len(BATCHES) * PER_BATCH, DIM))).astype(np.float32)
    vectors[-10:] = vectors[:10]
    ids = rng.choice(2**62, size=len(vectors), replace=False).astype(np.int64)
    batches = np.repeat(BATCHES, PER_BATCH)
    paths = [f"{b}/img_{n:03d}.jpg" for b, n in zip(batches, np.tile(np.arange(PER_BATCH), len(BATCHES)))]
    return ids, vectors, batches, paths


def _materialize(uri, tmp_path, collection, batch, ids, vectors, paths) -> dict:
    """The milvus_collection asset, run for one batch partition; its metadata."""
    table = tables.embedding_table(tables.embedding_schema(DIM, PROVENANCE), ids, paths, [""] * len(ids), vectors)
    result = milvus_collection(
        context=build_asset_context(partition_key=batch), image_embeddings=table,
        milvus_db=MilvusResource(uri=uri, collection=collection), storage=StorageResource(data_dir=str(tmp_path)),
    )
    return {key: getattr(value, "value", value) for key, value in result.metadata.items()}


def _fill(uri, tmp_path, collection, corpus) -> None:
    ids, vectors, batches, paths = corpus
    for n, batch in enumerate(BATCHES, start=1):
        rows = batches == batch
        meta = _materialize(uri, tmp_path, collection, batch, ids[rows], vectors[rows], list(np.asarray(paths)[rows]))
        assert (meta["uri"], meta["upserted"], meta["removed"]) == (uri, PER_BATCH, 0)
        assert meta["collection_rows"] == n * PER_BATCH  # read back at once: no waiting for a flush


def _exact_faiss(ids, vectors) -> faiss.Index:
    exact = faiss.IndexIDMap(faiss.IndexFlatIP(DIM))
    exact.add_with_ids(vectors, ids)
    return exact


def _queries(vectors) -> np.ndarray:
    """40 stored vectors (the tied ones among them) and 20 new ones."""
    fresh = ix.normalize_rows(np.random.default_rng(8).normal(size=(20, DIM))).astype(np.float32)
    return np.concatenate([vectors[:10], vectors[150:180], fresh])


def _recall_against_faiss(hits, queries, ids, vectors) -> tuple[float, float]:
    """Tie-aware recall@K of the server's answers against exact Faiss, both scored exactly."""
    by_id = {int(i): v for i, v in zip(ids, vectors)}
    found = np.full((len(queries), K), -np.inf, dtype=np.float32)
    for row, (query, answer) in enumerate(zip(queries, hits)):
        found[row, : len(answer)] = [float(query @ by_id[h.image_id]) for h in answer]
    truth, _ = _exact_faiss(ids, vectors).search(queries, K)
    return tie_aware_recall(found, truth)


def test_the_asset_fills_a_server_that_answers_as_exact_faiss(milvus_server_uri, tmp_path, corpus):
    ids, vectors, batches, paths = corpus
    _fill(milvus_server_uri, tmp_path, "answers", corpus)
    # Strong: searched right after the writes (the default, Bounded, may lag them by up to 5 s).
    searcher = MilvusSearcher(milvus.connect(milvus_server_uri), "answers", consistency="Strong", device="cpu")
    assert searcher.encoder_info == PROVENANCE
    assert searcher.num_vectors == 300 and searcher.batch_sizes() == dict.fromkeys(BATCHES, PER_BATCH)

    queries = _queries(vectors)
    hits = searcher.search(queries, k=K)
    assert all(len(answer) == K for answer in hits)
    recall, first = _recall_against_faiss(hits, queries, ids, vectors)
    assert recall >= 0.99 and first == 1.0
    source = {int(i): (p, b, v) for i, p, b, v in zip(ids, paths, batches, vectors)}
    for query, answer in zip(queries, hits):
        for hit in answer:  # each row's batch and path as upserted, its score the exact inner product
            path, batch, vector = source[hit.image_id]
            assert (hit.path, hit.batch) == (path, batch)
            assert hit.inner_product == pytest.approx(float(query @ vector), abs=1e-4)
    # A stored vector finds itself first (or its tied copy in the other batch).
    assert {hits[3][0].image_id, hits[3][1].image_id} == {int(ids[3]), int(ids[-7])}
    assert hits[15][0].image_id == int(ids[155])

    only_b2 = searcher.search(queries, k=K, batches=["b2"])
    assert all(len(answer) == K and {h.batch for h in answer} == {"b2"} for answer in only_b2)
    in_b2 = batches == "b2"
    assert _recall_against_faiss(only_b2, queries, ids[in_b2], vectors[in_b2])[0] >= 0.99

    assert searcher.describe(int(ids[42])) == (paths[42], "b1", 1)
    np.testing.assert_allclose(searcher.vectors_of([int(ids[250]), int(ids[7])]), vectors[[250, 7]], atol=1e-6)


def test_a_batch_reingested_adds_and_deletes_rows_on_the_server(milvus_server_uri, tmp_path, corpus):
    ids, vectors, batches, paths = corpus
    _fill(milvus_server_uri, tmp_path, "increments", corpus)
    # b2 again: its first 60 images kept, 40 gone, 20 new ones.
    kept = np.flatnonzero(batches == "b2")[:60]
    gone = np.flatnonzero(batches == "b2")[60:]
    new_ids = np.arange(1, 21, dtype=np.int64)
    new_vectors = ix.normalize_rows(np.random.default_rng(9).normal(size=(20, DIM))).astype(np.float32)
    meta = _materialize(milvus_server_uri, tmp_path, "increments", "b2", np.concatenate([ids[kept], new_ids]),
                        np.concatenate([vectors[kept], new_vectors]),
                        [paths[i] for i in kept] + [f"b2/new_{i}.jpg" for i in new_ids])
    assert (meta["upserted"], meta["removed"], meta["collection_rows"]) == (80, 40, 280)

    searcher = MilvusSearcher(milvus.connect(milvus_server_uri), "increments", consistency="Strong", device="cpu")
    assert searcher.batch_sizes() == {"b1": 100, "b2": 80, "b3": 100}
    found_new = searcher.search(new_vectors, k=1)
    assert [(a[0].image_id, a[0].path) for a in found_new] == [(int(i), f"b2/new_{i}.jpg") for i in new_ids]
    after_gone = searcher.search(vectors[gone], k=K)
    assert not {h.image_id for answer in after_gone for h in answer} & set(ids[gone].tolist())
    assert searcher.describe(int(ids[gone[0]])) == ("", "", 0)

    now = np.concatenate([np.flatnonzero(batches != "b2"), kept])
    live_ids, live_vectors = np.concatenate([ids[now], new_ids]), np.concatenate([vectors[now], new_vectors])
    queries = _queries(vectors)
    assert _recall_against_faiss(searcher.search(queries, k=K), queries, live_ids, live_vectors)[0] >= 0.99


def test_a_new_client_finds_the_collection_again(milvus_server_uri, tmp_path, corpus):
    ids, vectors, _, _ = corpus
    _fill(milvus_server_uri, tmp_path, "reconnect", corpus)
    written = time.monotonic()
    queries = _queries(vectors)
    first = milvus.connect(milvus_server_uri)
    before = MilvusSearcher(first, "reconnect", consistency="Strong", device="cpu").search(queries, k=K)
    first.release_collection("reconnect")  # as a server restart or another client leaves it
    first.close()

    # The default consistency (Bounded) from here on: past the server's gracefulTime (5 s) after
    # the last write, it must see every row.
    time.sleep(max(0.0, written + 5.5 - time.monotonic()))
    again = MilvusSearcher(milvus.connect(milvus_server_uri), "reconnect", device="cpu")
    assert again.consistency == "Bounded"
    assert again.encoder_info == PROVENANCE and again.num_vectors == 300
    after = again.search(queries, k=K)
    assert [[(h.image_id, h.path) for h in a] for a in after] == [[(h.image_id, h.path) for h in a] for a in before]
    # The same collection checked by ensure_collection from the new client: same dimension passes, another fails.
    milvus.ensure_collection(again.client, "reconnect", DIM, PROVENANCE)
    with pytest.raises(ValueError, match="holds 384-d vectors, these embeddings are 8-d"):
        milvus.ensure_collection(again.client, "reconnect", 8, PROVENANCE)
