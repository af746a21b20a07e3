"""The API, declared once: each :class:`Endpoint` names its path, method, handler, parameters,
answer and refusals. The app's routes, the OpenAPI document at ``/openapi.json`` and the
metrics' endpoint labels are all derived from :data:`ENDPOINTS`."""

from __future__ import annotations

import dataclasses
import typing
from dataclasses import dataclass

from imgsim_assets.core.search import Hit


@dataclass(frozen=True)
class Param:
    name: str
    description: str
    kind: str = "integer"
    required: bool = False
    many: bool = False  # repeatable
    where: str = "query"

    def spec(self) -> dict:
        schema = {"type": "array", "items": {"type": self.kind}} if self.many else {"type": self.kind}
        return {"name": self.name, "in": self.where, "required": self.required or self.where == "path",
                "description": self.description, "schema": schema}


@dataclass(frozen=True)
class Endpoint:
    path: str
    handler: str  # the Service method that answers
    summary: str
    method: str = "GET"
    params: tuple[Param, ...] = ()
    answer: dict | None = None  # JSON schema of a 200; None: not JSON
    answer_description: str = "OK"
    refusals: tuple[int, ...] = ()  # statuses answered with an error body
    upload: bool = False  # a multipart body with the file field 'image'
    body: bool = False  # a JSON object body
    public: bool = False  # answered without the token (holds no data)
    documented: bool = True  # in the OpenAPI document


_SCHEMA_TYPES = {int: "integer", float: "number", str: "string", bool: "boolean"}


def schema_of(cls) -> dict:
    """JSON schema of a dataclass of plain fields, descriptions and formats from field metadata."""
    hints = typing.get_type_hints(cls)
    properties = {}
    for f in dataclasses.fields(cls):
        properties[f.name] = {"type": _SCHEMA_TYPES[hints[f.name]], **f.metadata}
    return {"type": "object", "properties": properties}


OBJECT = {"type": "object"}
ERROR = {"type": "object", "properties": {"error": {"type": "string"}, "detail": {"type": "string"}}}
ANSWER = {
    "type": "object",
    "properties": {"hits": {"type": "array", "items": schema_of(Hit)}, "num_vectors": {"type": "integer"},
                   "index_version": {"type": "string"}, "took_ms": {"type": "number"}, "query": OBJECT},
}
_SCORE = {"type": "number", "nullable": True, "description": "cosine similarity in the index's space (null: none found)"}
_FAMILY = {
    "type": "object",
    "properties": {
        "family": {"type": "string", "description": "edit family, or `all`"}, "copies": {"type": "integer"},
        "recall_at_1": {"type": "number"}, "recall_at_10": {"type": "number"},
        "mean_average_precision": {"type": "number"}, "median_copy_score": _SCORE, "median_nearest_non_copy": _SCORE,
    },
}
COPY_DETECTION = {
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

_BOX_PROPERTIES = {k: {"type": "number"} for k in ("x0", "y0", "x1", "y1")}
_GRID = {
    "type": "object",
    "description": "one image's DINOv2 patches, each with its best match in the other image",
    "properties": {
        "image_id": {"type": "integer", "format": "int64"}, "path": {"type": "string"}, "batch": {"type": "string"},
        "rows": {"type": "integer"}, "cols": {"type": "integer"}, "patch_size": {"type": "integer"},
        "width": {"type": "integer", "description": "the picture as displayed (after EXIF rotation)"},
        "height": {"type": "integer"},
        "crop": {"type": "object", "properties": _BOX_PROPERTIES, "description": "the region of the picture the "
                 "grid covers (after the resize and center crop), in its pixels: patch (r, c) spans 1/rows and "
                 "1/cols of it"},
        "similarity": {"type": "array", "items": {"type": "array", "items": {"type": "number"}},
                       "description": "rows × cols: cosine of each patch with its best match in the other image"},
        "match": {"type": "array", "items": {"type": "array", "items": {"type": "integer"}},
                  "description": "rows × cols: that match, as row × cols + col of the other image's grid"},
    },
}
COMPARISON = {
    "type": "object",
    "properties": {"a": _GRID, "b": _GRID, "inner_product": {"type": "number", "description": "of the two "
                   "images' vectors in the index's space, as search ranks them"},
                   "score": {"type": "number", "description": "(inner_product + 1) / 2"},
                   "index_version": {"type": "string"}, "took_ms": {"type": "number"}},
}

REFUSALS = {
    400: "bad request (unknown_batch; filter_unavailable: the index holds no photo metadata; bad_box: a box that "
         "is malformed or leaves under 8 px a side)", 401: "token missing or wrong",
    403: "a write from off loopback without a token, or from another site's page; or an image's file that is not "
         "a regular file inside the images root", 404: "unknown image", 408: "the body paused too long",
    413: "upload too large", 415: "the original no longer decodes as an image, or a write not sent as JSON",
    421: "a Host name this service does not answer to",
    422: "bad parameter, not a usable image, or over the decode budget", 503: "busy: retry after Retry-After seconds",
}

_K = Param("k", "neighbours to return (1 to max_k, default 10)")
_BATCH = Param("batch", "only answer from these batches (repeatable)", "string", many=True)
_NPROBE = Param("nprobe", "inverted lists to visit (default: as tuned at build)")
_BOX = Param("box", "only this region of the image is the query: x0,y0,x1,y1 in pixels of the picture as "
             "displayed (after EXIF rotation), right and bottom excluded; cut at the picture's edges, refused "
             "(400) when under 8 px a side is left", "string")
# Photo filters (core.filters.Filters); an image whose file does not say fails the filter.
_FILTERS = (
    Param("taken_after", "only images taken at or after this camera-local time (EXIF; ISO 8601 date or "
          "date-time without an offset, e.g. 2021-06-01)", "string"),
    Param("taken_before", "only images taken before this camera-local time (exclusive)", "string"),
    Param("camera", "only images whose camera make and model, joined by a space, contain this "
          "(case-insensitive: canon, iphone 12)", "string"),
    Param("min_pixels", "only images of at least this many pixels (width × height as displayed)"),
)
_PAGE = (Param("page", "1-based page"), Param("per_page", "items per page (at most 200)"))
_WRITE = (400, 401, 403, 415)

ENDPOINTS = (
    Endpoint("/", "page", "The search page", answer_description="HTML", public=True, documented=False),
    Endpoint("/search", "search_by_id", "Neighbours of an indexed image",
             params=(Param("image_id", "an indexed image", required=True), _K, _BATCH, *_FILTERS, _NPROBE, _BOX),
             answer=ANSWER, refusals=(400, 401, 403, 404, 421, 422, 503)),
    Endpoint("/search", "search_by_upload", "Neighbours of an uploaded image", method="POST",
             params=(_K, _BATCH, *_FILTERS, _NPROBE, _BOX), answer=ANSWER, upload=True,
             refusals=(400, 401, 408, 413, 421, 422, 503)),
    Endpoint("/compare", "compare", "Why two indexed images match: each one's patches with their best match "
             "in the other", params=(Param("a", "an indexed image", required=True),
                                     Param("b", "another indexed image", required=True)),
             answer=COMPARISON, refusals=(400, 401, 403, 404, 421, 422, 503)),
    Endpoint("/images/{image_id}", "image", "An indexed image: the original, or a JPEG thumbnail",
             params=(Param("image_id", "an indexed image", where="path"),
                     Param("size", "thumbnail box in pixels (16 to 1024; drawn at the next of 64, 128, 256, 512)")),
             answer_description="the image, typed by what it decodes as", refusals=(400, 401, 404, 415, 421, 422)),
    Endpoint("/batches", "batches", "Indexed batches and their file counts", answer=OBJECT),
    Endpoint("/duplicates", "review.groups", "Near-duplicate groups to review, largest first: members with their "
             "metadata, decisions and the suggested keeper",
             params=(*_PAGE, Param("min_score", "only groups whose every pair is at least this similar", "number")),
             answer=OBJECT),
    Endpoint("/duplicates/decisions", "review.decide", "Keep or set aside images: "
             '{"decisions": {"IMAGE_ID": "keep" | "set_aside" | null}}', method="POST", answer=OBJECT,
             body=True, refusals=_WRITE),
    Endpoint("/duplicates/separate", "review.separate", 'Not duplicates: {"image_ids": [...]} are never grouped '
             "again", method="POST", answer=OBJECT, body=True, refusals=_WRITE),
    Endpoint("/duplicates/accept", "review.accept", 'Accept the suggestion for every group at least {"min_score": S} '
             "similar (decided images keep their decision)", method="POST", answer=OBJECT, body=True,
             refusals=_WRITE),
    Endpoint("/duplicates/plan", "review.plan", "The files an apply would move now, and where", answer=OBJECT),
    Endpoint("/duplicates/apply", "review.apply", "Move every set-aside file to set-aside/<date>/ (journaled, "
             "never deleted)", method="POST", answer=OBJECT, body=True, refusals=_WRITE),
    Endpoint("/duplicates/undo", "review.undo", 'Put the files of {"apply_id": ID} (or {"all": true}) back',
             method="POST", answer=OBJECT, body=True, refusals=(*_WRITE, 404)),
    Endpoint("/duplicates/applies", "review.applies", "Every apply, newest first, with its files by state",
             answer=OBJECT),
    Endpoint("/duplicates/export", "review.export", "Groups, members, metadata and decisions",
             params=(Param("format", "csv or json (default)", "string"),), answer_description="CSV or JSON",
             refusals=(401, 422)),
    Endpoint("/clusters", "clusters", "k-means clusters, largest first, with sample images",
             params=(*_PAGE, Param("samples", "images per cluster (at most 64)")), answer=OBJECT),
    Endpoint("/evaluation", "evaluation", "How well the index finds edited copies: recall and mAP per edit family, "
             "the duplicate threshold, the grouping rules", answer=COPY_DETECTION, refusals=(401, 404)),
    Endpoint("/healthz", "healthz", "Status, index version and size, encoder, random-weights flag", answer=OBJECT),
    Endpoint("/metrics", "metrics", "Prometheus metrics", answer_description="text"),
    Endpoint("/openapi.json", "openapi", "This document", answer=OBJECT, documented=False),
)

_NOT_FOUND = {"/evaluation": "not_evaluated: run `imgsim evaluate` (or `imgsim ingest`)"}


def _json(schema: dict, description: str) -> dict:
    return {"description": description, "content": {"application/json": {"schema": schema}}}


def _operation(e: Endpoint) -> dict:
    responses = {"200": _json(e.answer, e.answer_description) if e.answer is not None
                 else {"description": e.answer_description}}
    for status in e.refusals:
        responses[str(status)] = _json(ERROR, _NOT_FOUND.get(e.path, REFUSALS[status]) if status == 404
                                       else REFUSALS[status])
    operation = {"summary": e.summary, "responses": responses}
    if e.params:
        operation["parameters"] = [p.spec() for p in e.params]
    if e.body:
        operation["requestBody"] = {"required": True, "content": {"application/json": {"schema": OBJECT}}}
    if e.upload:
        operation["requestBody"] = {"required": True, "content": {"multipart/form-data": {"schema": {
            "type": "object", "properties": {"image": {"type": "string", "format": "binary"}}}}}}
    return operation


def openapi(endpoints=ENDPOINTS) -> dict:
    """The OpenAPI 3 document of ``endpoints``."""
    paths: dict[str, dict] = {}
    for e in endpoints:
        if e.documented:
            paths.setdefault(e.path, {})[e.method.lower()] = _operation(e)
    return {
        "openapi": "3.0.3",
        "info": {"title": "imgsim", "version": "1",
                 "description": "Image similarity search over the materialized faiss_index. When the server has a "
                 "token, every request needs `Authorization: Bearer TOKEN` (or `?token=`)."},
        "paths": paths,
    }


PUBLIC_PATHS = frozenset(e.path for e in ENDPOINTS if e.public)
