"""The API described as OpenAPI 3 (served at ``/openapi.json``)."""

from __future__ import annotations

_HIT = {
    "type": "object",
    "properties": {
        "rank": {"type": "integer"}, "image_id": {"type": "integer", "format": "int64"},
        "path": {"type": "string", "description": "relative to the images root"}, "batch": {"type": "string"},
        "score": {"type": "number", "description": "(inner_product + 1) / 2"}, "inner_product": {"type": "number"},
        "copies": {"type": "integer", "description": "files with these bytes"},
    },
}
_ANSWER = {
    "type": "object",
    "properties": {"hits": {"type": "array", "items": _HIT}, "num_vectors": {"type": "integer"},
                   "index_version": {"type": "string"}, "took_ms": {"type": "number"}, "query": {"type": "object"}},
}
_ERROR = {"type": "object", "properties": {"error": {"type": "string"}, "detail": {"type": "string"}}}
_SCORE = {"type": "number", "nullable": True,
          "description": "cosine similarity in the index's space (null: none found)"}
_FAMILY = {
    "type": "object",
    "properties": {
        "family": {"type": "string", "description": "edit family, or `all`"}, "copies": {"type": "integer"},
        "recall_at_1": {"type": "number"}, "recall_at_10": {"type": "number"},
        "mean_average_precision": {"type": "number"}, "median_copy_score": _SCORE, "median_nearest_non_copy": _SCORE,
    },
}
_EVALUATION = {
    "type": "object",
    "description": "retrieval_eval: edited copies of a seeded sample of indexed images, searched in the index",
    "properties": {
        "table": {"type": "array", "items": _FAMILY, "description": "one row per edit family, then `all`"},
        "families": {"type": "array", "items": _FAMILY}, "overall": _FAMILY,
        "threshold": {"type": "object", "description": "the duplicate threshold near_duplicates uses", "properties": {
            "value": {"type": "number"}, "precision": {"type": "number"}, "recall": {"type": "number"},
            "reached": {"type": "boolean", "description": "false: no threshold reaches target_precision"}}},
        "target_precision": {"type": "number"}, "held_out_precision": {"type": "number"},
        "held_out_recall": {"type": "number"},
        "groupings": {"type": "array", "items": {"type": "object", "properties": {
            "rule": {"type": "string"}, "purity": {"type": "number"}, "completeness": {"type": "number"},
            "f1": {"type": "number"}}}},
        "grouping": {"type": "string", "description": "the rule with the best F1"},
        "curve": {"type": "object", "description": "precision and recall by threshold (arrays)"},
        "sources": {"type": "integer", "description": "images copied"}, "unlabelled": {"type": "integer"},
        "complete_above": {"type": "number", "description": "every non-copy scoring above this was counted"},
        "skipped": {"type": "array", "items": {"type": "array"}}, "embed_ms_per_copy": {"type": "number"},
        "settings": {"type": "object"}, "random_weights": {"type": "boolean"},
    },
}


def _param(name: str, description: str, kind: str = "integer", required: bool = False, many: bool = False) -> dict:
    schema = {"type": "array", "items": {"type": kind}} if many else {"type": kind}
    return {"name": name, "in": "query", "required": required, "description": description, "schema": schema}


_K = _param("k", "neighbours to return (1 to max_k, default 10)")
_BATCH = _param("batch", "only answer from these batches (repeatable)", "string", many=True)
_NPROBE = _param("nprobe", "inverted lists to visit (default: as tuned at build)")
_PAGE = [_param("page", "1-based page"), _param("per_page", "items per page (at most 200)")]


def _json(schema: dict, description: str = "OK") -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _errors(*codes: int) -> dict:
    return {str(c): _json(_ERROR, d) for c, d in ((400, "bad request"), (401, "token missing or wrong"),
                                                  (404, "unknown image"), (408, "the body paused too long"),
                                                  (413, "upload too large"),
                                                  (415, "the original no longer decodes as an image"),
                                                  (421, "a Host name this service does not answer to"),
                                                  (422, "bad parameter, not a usable image, or over the decode "
                                                        "budget"),
                                                  (503, "busy: retry after Retry-After seconds")) if c in codes}


SPEC = {
    "openapi": "3.0.3",
    "info": {"title": "imgsim", "version": "1",
             "description": "Image similarity search over the materialized faiss_index. When the server has a "
             "token, every request needs `Authorization: Bearer TOKEN` (or `?token=`)."},
    "paths": {
        "/search": {
            "get": {"summary": "Neighbours of an indexed image",
                    "parameters": [_param("image_id", "an indexed image", required=True), _K, _BATCH, _NPROBE],
                    "responses": {"200": _json(_ANSWER), **_errors(400, 401, 404, 421, 422, 503)}},
            "post": {"summary": "Neighbours of an uploaded image", "parameters": [_K, _BATCH, _NPROBE],
                     "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": {
                         "type": "object", "properties": {"image": {"type": "string", "format": "binary"}}}}}},
                     "responses": {"200": _json(_ANSWER), **_errors(400, 401, 408, 413, 421, 422, 503)}},
        },
        "/images/{image_id}": {"get": {
            "summary": "An indexed image: the original, or a JPEG thumbnail",
            "parameters": [{"name": "image_id", "in": "path", "required": True, "schema": {"type": "integer"}},
                           _param("size", "thumbnail box in pixels (16 to 1024; drawn at the next of "
                                          "64, 128, 256, 512)")],
            "responses": {"200": {"description": "the image, typed by what it decodes as"},
                          **_errors(400, 401, 404, 415, 421, 422)}}},
        "/batches": {"get": {"summary": "Indexed batches and their file counts",
                             "responses": {"200": _json({"type": "object"})}}},
        "/duplicates": {"get": {"summary": "Near-duplicate groups, largest first", "parameters": _PAGE,
                                "responses": {"200": _json({"type": "object"})}}},
        "/clusters": {"get": {"summary": "k-means clusters, largest first, with sample images",
                              "parameters": [*_PAGE, _param("samples", "images per cluster (at most 64)")],
                              "responses": {"200": _json({"type": "object"})}}},
        "/evaluation": {"get": {
            "summary": "How well the index finds edited copies: recall and mAP per edit family, the duplicate "
                       "threshold, the grouping rules",
            "responses": {"200": _json(_EVALUATION), **_errors(401),
                          "404": _json(_ERROR, "not_evaluated: run `imgsim evaluate` (or `imgsim ingest`)")}}},
        "/healthz": {"get": {"summary": "Status, index version and size, encoder, random-weights flag",
                             "responses": {"200": _json({"type": "object"})}}},
        "/metrics": {"get": {"summary": "Prometheus metrics", "responses": {"200": {"description": "text"}}}},
    },
}
