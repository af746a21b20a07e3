"""A client of ``imgsim serve`` with the standard library only (no torch, no Dagster): what
``imgsim search --server URL`` uses, answering in milliseconds."""

from __future__ import annotations

import json
import mimetypes
import urllib.error
import urllib.parse
import urllib.request
import uuid
from pathlib import Path


class ServerError(Exception):
    """The server refused the query (its JSON error), or could not be reached."""


def _request(request: urllib.request.Request, timeout: float) -> dict:
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as e:
        try:
            body = json.loads(e.read())
            raise ServerError(f"{e.code} {body.get('error')}: {body.get('detail')}") from None
        except ValueError:
            raise ServerError(f"{e.code} {e.reason}") from None
    except urllib.error.URLError as e:
        raise ServerError(f"cannot reach {request.full_url}: {e.reason}") from None


def _url(server: str, path: str, params: list[tuple[str, object]]) -> str:
    query = urllib.parse.urlencode([(k, v) for k, v in params if v is not None])
    return f"{server.rstrip('/')}{path}" + (f"?{query}" if query else "")


def _headers(token: str | None) -> dict:
    return {"Authorization": f"Bearer {token}"} if token else {}


def search_file(server: str, image: str | Path, k: int = 10, nprobe: int | None = None, batches=None,
                token: str | None = None, timeout: float = 60.0, filters=(), box: str | None = None) -> dict:
    """POST /search with the file as multipart field ``image`` (only the region ``box``,
    ``"x0,y0,x1,y1"``, when given); ``filters``: more query parameters, (name, value) pairs
    (``Filters.params()``: taken_after, camera...)."""
    image = Path(image)
    boundary = uuid.uuid4().hex
    kind = mimetypes.guess_type(image.name)[0] or "application/octet-stream"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{image.name}\"\r\n"
            f"Content-Type: {kind}\r\n\r\n").encode() + image.read_bytes() + f"\r\n--{boundary}--\r\n".encode()
    params = [("k", k), ("nprobe", nprobe), ("box", box), *(("batch", b) for b in batches or []), *filters]
    request = urllib.request.Request(_url(server, "/search", params), data=body, method="POST", headers={
        **_headers(token), "Content-Type": f"multipart/form-data; boundary={boundary}"})
    return _request(request, timeout)


def search_id(server: str, image_id: int, k: int = 10, nprobe: int | None = None, batches=None,
              token: str | None = None, timeout: float = 60.0, filters=(), box: str | None = None) -> dict:
    """GET /search?image_id=ID (of the region ``box`` of it, when given; ``filters`` as for
    :func:`search_file`)."""
    params = [("image_id", image_id), ("k", k), ("nprobe", nprobe), ("box", box),
              *(("batch", b) for b in batches or []), *filters]
    return _request(urllib.request.Request(_url(server, "/search", params), headers=_headers(token)), timeout)
