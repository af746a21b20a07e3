"""Embeddings in Milvus: one collection, one row per image_id, for search beyond one machine.

Milvus Lite (a local file) locally and in tests; a server or cluster by ``http(s)://`` URI.
Raw DINOv2 vectors go in (Milvus builds its own index), compared by inner product.
"""

from __future__ import annotations

import json

import numpy as np

FIELDS = ("image_id", "embedding", "batch", "path")
PROVENANCE_PROPERTY = "imgsim.provenance"  # the encoder settings, so queries are embedded alike
CHUNK = 1_000
# Reads that decide writes (which rows leave a batch) and counts see every write acknowledged
# before them. A Milvus server's default, Bounded, lets a query miss rows upserted or deleted in the
# last few seconds (Milvus Lite is always up to date); Strong waits for the next time tick instead.
CONSISTENCY = "Strong"
# Searches take Bounded: a server answers at once from what it holds, which lags writes by at most
# its gracefulTime (5 s by default). Strong would add a time tick (about 200 ms) to every search.
SEARCH_CONSISTENCY = "Bounded"
COLLECTION = "imgsim"  # the collection milvus_collection fills and searches read, unless configured


def connect(uri: str, token: str = "", timeout: float = 10.0):
    """A client for ``uri`` (a ``.db`` file for Milvus Lite, or a server URL), or a clear error."""
    from pymilvus import MilvusClient

    try:
        return MilvusClient(uri=uri, token=token, timeout=timeout)
    except Exception as e:  # pymilvus raises several types for "nobody answers"
        raise ConnectionError(f"Milvus at {uri!r} did not answer: {type(e).__name__}: {e}") from e


def ensure_collection(client, name: str, dim: int, provenance: dict, index_type: str = "FLAT") -> None:
    """Create the collection, or check that the existing one holds vectors of this encoder."""
    from pymilvus import DataType, MilvusClient

    if client.has_collection(name):
        described = client.describe_collection(name)
        existing = next(f for f in described["fields"] if f["name"] == "embedding")["params"]["dim"]
        if int(existing) != dim:
            raise ValueError(f"Milvus collection {name!r} holds {existing}-d vectors, these embeddings are {dim}-d; "
                             "use another collection or drop it")
        return
    schema = MilvusClient.create_schema(auto_id=False)
    schema.add_field("image_id", DataType.INT64, is_primary=True)
    schema.add_field("embedding", DataType.FLOAT_VECTOR, dim=dim)
    schema.add_field("batch", DataType.VARCHAR, max_length=512)
    schema.add_field("path", DataType.VARCHAR, max_length=4096)
    index = client.prepare_index_params()
    index.add_index("embedding", metric_type="IP", index_type=index_type)
    client.create_collection(name, schema=schema, index_params=index, consistency_level=CONSISTENCY)
    client.alter_collection_properties(name, properties={PROVENANCE_PROPERTY: json.dumps(provenance, sort_keys=True)})


def provenance(client, name: str) -> dict:
    """The encoder settings recorded when the collection was created."""
    properties = client.describe_collection(name).get("properties") or {}
    return json.loads(properties.get(PROVENANCE_PROPERTY, "{}"))


def upsert_batch(client, name: str, batch: str, ids: np.ndarray, vectors: np.ndarray, paths: list[str]) -> tuple[int, int]:
    """Make the collection's rows of ``batch`` exactly these; returns (upserted, removed).

    An image_id is one row whatever batch it came from; ids that left the batch are deleted
    (when no other batch's upsert has claimed them since).
    """
    ids = np.asarray(ids, dtype=np.int64)
    client.load_collection(name)
    for start in range(0, len(ids), CHUNK):
        rows = [
            {"image_id": int(i), "embedding": v.tolist(), "batch": batch, "path": p}
            for i, v, p in zip(ids[start : start + CHUNK], vectors[start : start + CHUNK], paths[start : start + CHUNK])
        ]
        client.upsert(name, rows)
    before = client.query(name, filter=f"batch == {json.dumps(batch)}", output_fields=["image_id"],
                          consistency_level=CONSISTENCY)
    stale = sorted({int(r["image_id"]) for r in before} - set(ids.tolist()))
    for start in range(0, len(stale), CHUNK):
        client.delete(name, ids=stale[start : start + CHUNK])
    return len(ids), len(stale)


def search(client, name: str, vectors: np.ndarray, k: int = 10, batches: list[str] | None = None,
           consistency: str = SEARCH_CONSISTENCY) -> list[list[dict]]:
    """Top-``k`` rows for each query vector: image_id, inner product, batch, path."""
    expression = f"batch in {json.dumps(list(batches))}" if batches else ""
    client.load_collection(name)  # a collection reopened by a new client starts released
    results = client.search(
        name, data=[np.asarray(v, dtype=np.float32).tolist() for v in vectors], limit=k,
        output_fields=["batch", "path"], search_params={"metric_type": "IP"}, filter=expression,
        consistency_level=consistency,
    )
    out = []
    for hits in results:
        rows = []
        for hit in hits:
            image_id = hit["image_id"] if "image_id" in hit else hit["id"]
            rows.append({"image_id": int(image_id), "inner_product": float(hit["distance"]), **hit["entity"]})
        out.append(rows)
    return out


def batch_sizes(client, name: str, page: int = 10_000) -> dict[str, int]:
    """Rows per batch, read a page at a time."""
    client.load_collection(name)
    rows = client.query_iterator(name, batch_size=page, filter="", output_fields=["batch"],
                                 consistency_level=CONSISTENCY)
    sizes: dict[str, int] = {}
    try:
        while chunk := rows.next():
            for row in chunk:
                sizes[row["batch"]] = sizes.get(row["batch"], 0) + 1
    finally:
        rows.close()
    return sizes


def get(client, name: str, ids, output_fields: list[str]) -> list[dict]:
    """The rows of these image_ids (those that exist), with ``output_fields``."""
    client.load_collection(name)
    return client.get(name, ids=[int(i) for i in ids], output_fields=output_fields, consistency_level=CONSISTENCY)


def count(client, name: str) -> int:
    """Rows in the collection now. (A server's collection statistics count flushed segments
    only, so rows upserted since the last flush are counted here by a query.)"""
    client.load_collection(name)
    rows = client.query(name, filter="", output_fields=["count(*)"], consistency_level=CONSISTENCY)
    return int(rows[0]["count(*)"])
