"""The HTTP API over the live index (Starlette, run by uvicorn): JSON for applications, a web
page for people. Handlers parse and format; searching is :class:`core.search.Searcher`'s."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import math
import operator
import time
from pathlib import Path

import faiss
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Mount, Route, compile_path
from starlette.staticfiles import StaticFiles

from imgsim_assets.core import images
from imgsim_assets.core.compare import Picture
from imgsim_assets.core.evaluation import CopyDetectionReport
from imgsim_assets.core.filters import Filters, FilterUnavailable
from imgsim_assets.core.review import KeepRules
from imgsim_assets.core.search import UnknownImage
from imgsim_assets.serve import thumbnails
from imgsim_assets.serve import api
from imgsim_assets.serve.batching import ModelBatcher, Overloaded
from imgsim_assets.serve.http import LOOPBACK_NAMES, ApiError, Unguarded, _error, _int_param, is_loopback  # noqa: F401
from imgsim_assets.serve.config import ServeConfig
from imgsim_assets.serve.live import LiveIndex
from imgsim_assets.serve.review import ReviewService
from imgsim_assets.serve.uploads import UploadDecoder

STATIC = Path(__file__).parent / "static"


def _public_encoder(encoder_info: dict) -> dict:
    """The index's encoder as clients see it: the weights file by name, not by path."""
    out = dict(encoder_info)
    if out.get("weights_file") and out["weights_file"] != "random":
        out["weights_file"] = str(out["weights_file"]).rsplit("/", 1)[-1]
    return out


class Metrics:
    """Prometheus metrics of one app (its own registry, so several apps can live in one process)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("imgsim_requests", "HTTP requests", ["endpoint", "status"], registry=self.registry)
        self.latency = Histogram("imgsim_request_seconds", "request latency", ["endpoint"], registry=self.registry,
                                 buckets=(0.001, 0.002, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10))
        self.vectors = Gauge("imgsim_index_vectors", "vectors in the served index", registry=self.registry)
        self.reloads = Counter("imgsim_index_reloads", "index versions swapped in", registry=self.registry)
        self.version = Gauge("imgsim_index_info", "the served index version", ["version"], registry=self.registry)
        self.queue = Gauge("imgsim_queue_depth", "image queries waiting for the model", registry=self.registry)
        self.batch = Histogram("imgsim_model_batch_size", "queries per model call", registry=self.registry,
                               buckets=(1, 2, 4, 8, 16, 32, 64))


class Service:
    """State shared by the handlers: the live index, the model batcher, limits, metrics."""

    def __init__(self, config: ServeConfig, live: LiveIndex | None = None) -> None:
        self.config = config
        self.live = live or LiveIndex(config.assets_dir, config.device, config.reload_interval_s,
                                         allow_other_weights=config.allow_other_weights, backend=config.backend,
                                         dtype=config.dtype)
        self.meters = Metrics()
        self.batcher = ModelBatcher(config.batch_window_ms / 1000, config.max_batch, config.max_queue,
                                    on_batch=self.meters.batch.observe)
        self.uploads = UploadDecoder(config.decode_workers, config.max_decoding, config.max_decode_bytes)
        self.thumbnails = thumbnails.Thumbnails(config.images_dir, config.assets_dir / ".thumbnails")
        self.in_flight = 0
        self.started = time.time()
        self.review = ReviewService(self, config.review_db or f"sqlite:///{config.assets_dir.parent / 'review.db'}",
                                    KeepRules.parse(config.keep_rules))

    def _k(self, request: Request) -> int:
        return _int_param(request, "k", 10, 1, self.config.max_k)

    def _nprobe(self, request: Request) -> int | None:
        return _int_param(request, "nprobe", None, 1, 1 << 20)

    def _filters(self, request: Request, searcher) -> Filters:
        """The request's batches and photo filters, checked before any model work."""
        params = request.query_params
        try:
            filters = Filters.parse(params.getlist("batch"), params.get("taken_after"), params.get("taken_before"),
                                    params.get("camera"), params.get("min_pixels"))
        except ValueError as e:
            raise ApiError(422, "bad_parameter", str(e)) from None
        try:
            searcher.check_filters(filters)
        except FilterUnavailable as e:
            raise ApiError(400, "filter_unavailable", str(e)) from None
        except ValueError as e:
            raise ApiError(400, "unknown_batch", str(e)) from None
        return filters

    def _box(self, request: Request) -> images.Box | None:
        raw = request.query_params.get("box")
        if raw is None or raw == "":
            return None
        try:
            return images.Box.parse(raw)
        except images.BadBox as e:
            raise ApiError(400, "bad_box", str(e)) from None

    async def _decode(self, searcher, data: bytes, name: str, box: images.Box | None):
        """(record, pixels) of an image's bytes, on the upload decoders, within their budget;
        a refusal as the ApiError that says why."""
        self.batcher.decoding += 1
        try:
            record, pixels = await self.uploads.decode(searcher, data, name, box)
        except Overloaded as e:
            raise ApiError(503, "busy", str(e), {"Retry-After": str(e.retry_after)}) from None
        except images.BadBox as e:
            raise ApiError(400, "bad_box", str(e)) from None
        finally:
            self.batcher.decoding -= 1
        if pixels is None:
            raise ApiError(422, record.reason, record.message)
        return record, pixels

    async def _indexed(self, searcher, image_id: int, box: images.Box | None = None):
        """(record, pixels) of an indexed image decoded again from its file, as its query."""
        path, _, copies = searcher.describe(image_id)
        if not copies:
            raise ApiError(404, "unknown_image", f"image_id {image_id} is not in the index")
        data = await asyncio.to_thread(self._read_indexed, path, searcher.preprocess.max_file_bytes)
        return await self._decode(searcher, data, path, box)

    def _read_indexed(self, path: str, max_bytes: int) -> bytes:
        """An indexed file's bytes, read only through the images root."""
        root = self.config.images_dir
        try:
            return images.read_file(images.source_path(root, path), root, max_bytes=max_bytes)
        except ValueError:
            raise ApiError(403, images.OUTSIDE_ROOT, f"{path} leads outside the images root") from None
        except images.Rejected as e:
            if e.reason in (images.OUTSIDE_ROOT, images.NOT_A_FILE):
                raise ApiError(403, e.reason, f"{path} is not a regular file inside the images root") from None
            raise ApiError(404 if e.reason == images.UNREADABLE else 422, e.reason,
                           _relative(f"{path}: {e.message}", self.config)) from None

    async def _embed(self, searcher, pixels):
        try:
            return await self.batcher.embed(searcher, pixels)
        except Overloaded as e:
            raise ApiError(503, "busy", str(e), {"Retry-After": str(e.retry_after)}) from None

    @staticmethod
    def _query(record, box: images.Box | None, **named) -> dict:
        """What an answer says of its query: the picture's size, and the box cut from it."""
        query = {**named, "image_id": record.image_id, "width": record.width, "height": record.height}
        if box is not None:  # as used: cut at the picture's edges
            query["box"] = list(box.clip(record.width, record.height).coords)
        return query

    def _answer(self, loaded, hits, started: float, **extra) -> dict:
        return {"hits": [h.to_dict() for h in hits], "num_vectors": loaded.searcher.num_vectors,
                "index_version": loaded.version, "took_ms": round((time.perf_counter() - started) * 1000, 3), **extra}

    async def search_by_id(self, request: Request) -> JSONResponse:
        """Neighbours of an indexed image: GET /search?image_id=ID&k=K[&batch=B...][&taken_after=T]
        [&taken_before=T][&camera=C][&min_pixels=P][&nprobe=N][&box=X0,Y0,X1,Y1]."""
        started = time.perf_counter()
        loaded = self.live.current
        image_id = _int_param(request, "image_id", None, -(1 << 63), (1 << 63) - 1)
        if image_id is None:
            raise ApiError(400, "missing_parameter", "give image_id (GET) or upload an image (POST, field 'image')")
        k, nprobe, filters = self._k(request), self._nprobe(request), self._filters(request, loaded.searcher)
        box = self._box(request)
        if box is not None:  # a region of the image: its file is decoded and embedded again
            record, pixels = await self._indexed(loaded.searcher, image_id, box)
            vector = await self._embed(loaded.searcher, pixels)
            hits = (await asyncio.to_thread(loaded.searcher.search, vector, k, nprobe, None, filters))[0]
            return JSONResponse(self._answer(loaded, hits, started, query=self._query(record, box)))
        if self.in_flight >= self.config.max_in_flight:
            raise ApiError(503, "busy", f"{self.in_flight} queries in flight", {"Retry-After": "1"})
        self.in_flight += 1
        try:
            hits = (await asyncio.to_thread(loaded.searcher.search_ids, [image_id], k, nprobe, None, filters))[0]
        except UnknownImage as e:
            raise ApiError(404, "unknown_image", str(e)) from None
        finally:
            self.in_flight -= 1
        return JSONResponse(self._answer(loaded, hits, started, query={"image_id": image_id}))

    async def search_by_upload(self, request: Request) -> JSONResponse:
        """Neighbours of an uploaded image: POST /search?k=K[&batch=B...][&taken_after=T][&taken_before=T]
        [&camera=C][&min_pixels=P][&nprobe=N][&box=X0,Y0,X1,Y1], multipart field 'image'."""
        started = time.perf_counter()
        loaded = self.live.current
        k, nprobe, filters = self._k(request), self._nprobe(request), self._filters(request, loaded.searcher)
        data, name = await self._upload(request)
        box = self._box(request)  # after the body: a client still sending it could not read the refusal
        record, pixels = await self._decode(loaded.searcher, data, name, box)
        vector = await self._embed(loaded.searcher, pixels)
        hits = (await asyncio.to_thread(loaded.searcher.search, vector, k, nprobe, None, filters))[0]
        return JSONResponse(self._answer(loaded, hits, started, query=self._query(record, box, name=name)))

    async def compare(self, request: Request) -> JSONResponse:
        """Why two indexed images match: GET /compare?a=ID&b=ID. Both files are decoded again and
        run through the encoder; each patch of one is paired with its best match in the other."""
        started = time.perf_counter()
        loaded = self.live.current
        ids = [_int_param(request, name, None, -(1 << 63), (1 << 63) - 1) for name in ("a", "b")]
        if None in ids:
            raise ApiError(400, "missing_parameter", "give two indexed images: /compare?a=ID&b=ID")
        sides = [await self._indexed(loaded.searcher, image_id) for image_id in ids]
        pictures = [Picture(pixels, record.size) for record, pixels in sides]
        try:
            result = await self.batcher.run(loaded.searcher.compare, *pictures)
        except Overloaded as e:
            raise ApiError(503, "busy", str(e), {"Retry-After": str(e.retry_after)}) from None
        answer = result.to_dict()
        for key, image_id in zip("ab", ids):
            path, batch, _ = loaded.searcher.describe(image_id)
            answer[key].update(image_id=image_id, path=path, batch=batch)
        answer.update(index_version=loaded.version, took_ms=round((time.perf_counter() - started) * 1000, 3))
        return JSONResponse(answer)

    async def _upload(self, request: Request) -> tuple[bytes, str]:
        limit = self.config.max_upload_bytes
        if int(request.headers.get("content-length") or 0) > limit + 64 * 1024:
            raise ApiError(413, "too_large", f"uploads are limited to {limit} bytes", CLOSE)
        if not request.headers.get("content-type", "").startswith("multipart/form-data"):
            raise ApiError(400, "not_multipart", "upload the image as multipart/form-data, field 'image'")
        try:
            form = await request.form(max_files=1, max_fields=16)
        except ApiError:  # the body grew past the limit, or stalled, as it streamed
            raise
        except Exception as e:  # python-multipart's own errors: a malformed body
            raise ApiError(400, "bad_form", f"could not read the form: {e}") from None
        upload = form.get("image")
        if upload is None or isinstance(upload, str):
            raise ApiError(400, "missing_image", "the form has no file field 'image'")
        data = await upload.read(limit + 1)
        await form.close()
        if len(data) > limit:
            raise ApiError(413, "too_large", f"uploads are limited to {limit} bytes")
        return data, upload.filename or "upload"

    async def image(self, request: Request) -> Response:
        """An indexed image: GET /images/{image_id}[?size=N] (the original, or a JPEG thumbnail)."""
        try:
            image_id = int(request.path_params["image_id"])
        except ValueError:
            raise ApiError(400, "bad_parameter", "image_id must be an integer") from None
        size = _int_param(request, "size", None, 16, 1024)
        path, _, copies = self.live.current.searcher.describe(image_id)
        if not copies:
            raise ApiError(404, "unknown_image", f"image_id {image_id} is not in the index")
        try:
            file, media_type = await asyncio.to_thread(self.thumbnails.file_for, image_id, path, size)
        except thumbnails.Unavailable as e:
            raise ApiError(e.status, e.error, str(e)) from None
        return FileResponse(file, media_type=media_type, headers={"Cache-Control": "max-age=3600"})

    async def page(self, request: Request) -> Response:
        return FileResponse(STATIC / "index.html")

    async def openapi(self, request: Request) -> JSONResponse:
        return JSONResponse(OPENAPI)

    async def healthz(self, request: Request) -> JSONResponse:
        """Status, index version and size, encoder."""
        loaded = self.live.current
        searcher = loaded.searcher
        query_encoder = searcher.query_encoder
        return JSONResponse({
            "status": "ok", "num_vectors": searcher.num_vectors, "index_version": loaded.version,
            "loaded_at": loaded.loaded_at, "reloads": self.live.reloads, "encoder": _public_encoder(searcher.encoder_info),
            "weights_fingerprint": searcher.encoder_info.get("weights_fingerprint"),
            "query_encoder": {key: query_encoder[key] for key in ("weights_fingerprint", "dtype")},
            "random_weights": searcher.random_weights, "factory": searcher.info.get("factory"),
            "nprobe": searcher.info.get("nprobe"), "queue_depth": self.batcher.depth,
        })

    async def metrics(self, request: Request) -> Response:
        """Prometheus text: requests and latency by endpoint, index version, queue depth."""
        loaded = self.live.current
        self.meters.vectors.set(loaded.searcher.num_vectors)
        self.meters.version.clear()
        self.meters.version.labels(loaded.version).set(1)
        self.meters.queue.set(self.batcher.depth)
        return Response(generate_latest(self.meters.registry), media_type=CONTENT_TYPE_LATEST)

    async def batches(self, request: Request) -> JSONResponse:
        """Indexed batches and their file counts (for filters)."""
        sizes = self.live.current.searcher.batch_sizes()
        return JSONResponse({"batches": [{"name": b, "num_images": n} for b, n in sorted(sizes.items())]})

    async def clusters(self, request: Request) -> JSONResponse:
        """k-means clusters, largest first, with sample images: GET /clusters?page=P&per_page=N&samples=S."""
        page, per_page = _int_param(request, "page", 1, 1, 1 << 30), _int_param(request, "per_page", 20, 1, 200)
        samples = _int_param(request, "samples", 8, 1, 64)
        clusters = await asyncio.to_thread(self.live.table, "image_clusters", _clusters)
        describe = self.live.current.searcher.describe
        shown = [{"cluster": c["cluster"], "size": c["size"],
                  "samples": [_member(i, describe) for i in c["members"][:samples]]}
                 for c in clusters[(page - 1) * per_page : page * per_page]]
        return JSONResponse({"clusters": shown, "page": page, "per_page": per_page, "total_clusters": len(clusters)})

    async def evaluation(self, request: Request) -> JSONResponse:
        """How well the index finds edited copies (``retrieval_eval``): GET /evaluation."""
        found = await asyncio.to_thread(self.live.document, "retrieval_eval", _evaluation)
        if found is None:
            raise ApiError(404, "not_evaluated", "the index has not been evaluated yet: run `imgsim evaluate` "
                           "(or `imgsim ingest`, which evaluates a new index)")
        return JSONResponse(found)


def _member(image_id: int, describe) -> dict:
    path, batch, copies = describe(image_id)
    return {"image_id": image_id, "path": path, "batch": batch, "copies": copies}


def _clusters(table) -> list[dict]:
    """``image_clusters`` rows → clusters, largest first, with their members closest to the centroid first."""
    if table is None or not table.num_rows:
        return []
    by_cluster: dict[int, list[tuple[float, int]]] = {}
    for image_id, cluster, sim in zip(*(table.column(c).to_pylist() for c in ("image_id", "cluster", "similarity"))):
        by_cluster.setdefault(cluster, []).append((sim, image_id))
    clusters = [{"cluster": c, "size": len(rows), "members": [i for _, i in sorted(rows, reverse=True)]}
                for c, rows in by_cluster.items()]
    return sorted(clusters, key=lambda c: (-c["size"], c["cluster"]))


def _evaluation(stored: dict | None) -> dict | None:
    """``retrieval_eval``'s JSON → the answer of /evaluation: everything but the score histograms,
    with the per-family table (``all`` last); NaN (no non-copy found, say) as null."""
    if stored is None:
        return None
    try:
        evaluation = CopyDetectionReport.from_dict(stored)
    except (KeyError, TypeError, ValueError) as e:  # written by another version of imgsim
        raise ApiError(500, "unreadable_evaluation", f"retrieval_eval.json cannot be read ({type(e).__name__}: {e}); "
                       "run `imgsim evaluate` again") from None
    answer = evaluation.to_dict()
    del answer["histograms"]
    answer["table"] = evaluation.table()
    return _finite(answer)


def _finite(value):
    """``value`` with every NaN or infinite float replaced by None (JSON has neither)."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v) for v in value]
    return value


# On every response: no content sniffing, no framing, scripts and styles from this origin only.
SECURITY_HEADERS = [
    (b"x-content-type-options", b"nosniff"),
    (b"content-security-policy", b"default-src 'self'; img-src 'self' data: blob:; object-src 'none'; "
                                 b"base-uri 'none'; form-action 'self'; frame-ancestors 'none'"),
    (b"x-frame-options", b"DENY"),
    (b"referrer-policy", b"no-referrer"),
]
CLOSE = {"Connection": "close"}


class _Guard:
    """ASGI middleware: the Host allow-list, the token, the upload size and pace while the
    body streams, security headers, JSON errors, and metrics by endpoint."""

    def __init__(self, app, service: Service) -> None:
        self.app, self.service = app, service
        config = service.config
        self.token = config.token.encode()
        # A tokenless service on loopback is what DNS rebinding reaches: only its own names.
        self.hosts = None if "*" in config.allowed_hosts else {
            *LOOPBACK_NAMES, config.host.strip("[]").lower(), *(h.lower() for h in config.allowed_hosts)}

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        endpoint = _endpoint(scope["path"])
        started = time.perf_counter()
        status = [500]

        async def send_secured(message) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message = {**message, "headers": [*message.get("headers", []), *SECURITY_HEADERS]}
            await send(message)

        try:
            refusal = self._refusal(scope)
            if refusal is not None:
                await _error(refusal)(scope, receive, send_secured)
            else:
                await self.app(scope, self._paced(receive, scope), send_secured)
        finally:
            meters = self.service.meters
            meters.requests.labels(endpoint, str(status[0])).inc()
            meters.latency.labels(endpoint).observe(time.perf_counter() - started)

    def _refusal(self, scope) -> ApiError | None:
        headers = dict(scope.get("headers") or [])
        if self.hosts is not None and not self.token and _host_name(headers.get(b"host", b"")) not in self.hosts:
            return ApiError(421, "unknown_host", "this service answers to its own host names only "
                            "(imgsim serve --allowed-host NAME)")
        if self.token and not _public(scope["path"]) and not self._authorized(scope, headers):
            return ApiError(401, "unauthorized", "this server needs its token: 'Authorization: Bearer TOKEN' "
                            "or ?token=TOKEN", {"WWW-Authenticate": "Bearer"})
        return None

    def _paced(self, receive, scope):
        """``receive`` that refuses a body past the upload limit (413) or one that stalls (408),
        as it streams: chunked bodies carry no length to check beforehand."""
        config = self.service.config
        limit = config.max_upload_bytes + 64 * 1024  # the multipart envelope around the file
        received = 0

        async def paced():
            nonlocal received
            try:
                async with asyncio.timeout(config.body_timeout_s):  # no task per chunk, unlike wait_for
                    message = await receive()
            except TimeoutError:
                raise ApiError(408, "too_slow", f"the request body paused for over {config.body_timeout_s:g} s",
                               CLOSE) from None
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:  # answered, and the connection closed: the rest is never read
                    raise ApiError(413, "too_large", f"uploads are limited to {config.max_upload_bytes} bytes", CLOSE)
            return message

        return paced if scope.get("method") == "POST" else receive

    def _authorized(self, scope, headers) -> bool:
        scheme, _, given = headers.get(b"authorization", b"").partition(b" ")
        if scheme.lower() != b"bearer":
            from urllib.parse import parse_qs

            given = (parse_qs(scope.get("query_string", b"").decode()).get("token") or [""])[0].encode()
        return bool(given) and hmac.compare_digest(given.strip(), self.token)


def _relative(text: str, config: ServeConfig) -> str:
    """``text`` with the data directory's absolute paths made relative to it: clients learn
    nothing of the server's file system."""
    roots = {config.assets_dir.parent, config.images_dir.parent, config.assets_dir, config.images_dir}
    for root in sorted({str(r) for r in roots} | {str(Path(r).resolve()) for r in roots}, key=len, reverse=True):
        text = text.replace(root + "/", "").replace(root, ".")
    return text


def _host_name(host: bytes) -> str:
    """The name in a Host header, without its port: ``[::1]:8000`` → ``::1``."""
    text = host.decode("latin-1").strip().lower()
    if text.startswith("["):
        return text[1 : text.find("]")] if "]" in text else text
    return text.rsplit(":", 1)[0] if text.count(":") == 1 else text


OPENAPI = api.openapi()
_PATTERNS = [(compile_path(path)[0], path) for path in dict.fromkeys(e.path for e in api.ENDPOINTS)]


def _public(path: str) -> bool:
    """The page and its static files: they hold no data, and the page adds the token itself."""
    return path in api.PUBLIC_PATHS or path == "/favicon.ico" or path.startswith("/static/")


def _endpoint(path: str) -> str:
    """A path as its metric label, the endpoint's declared path: /images/123 → /images/{image_id}."""
    if path.startswith("/static/"):
        return "/static"
    return next((declared for pattern, declared in _PATTERNS if pattern.match(path)), "other")


def _routes(service: Service) -> list:
    """One route per declared path, each method answered by its endpoint's handler."""
    handlers: dict[str, dict[str, object]] = {}
    for e in api.ENDPOINTS:
        handlers.setdefault(e.path, {})[e.method] = operator.attrgetter(e.handler)(service)
    routes = []
    for path, by_method in handlers.items():
        async def answer(request: Request, by_method=by_method) -> Response:
            return await by_method[request.method if request.method in by_method else "GET"](request)
        routes.append(Route(path, answer, methods=list(by_method)))
    return [*routes, Mount("/static", StaticFiles(directory=STATIC, check_dir=False), name="static")]


def create_app(config: ServeConfig, live: LiveIndex | None = None) -> Starlette:
    """The ASGI app. Loads the index and its encoder now, and watches for new versions."""
    if not is_loopback(config.host) and not config.token:
        raise Unguarded(f"binding to {config.host} (not loopback) needs a token: --token-file, "
                        "IMGSIM_SERVE_TOKEN(_FILE) or --token")
    # One Faiss thread per search: concurrent requests already spread over the cores, and an
    # idle OpenMP helper spinning after each single-query search takes the event loop's core.
    faiss.omp_set_num_threads(1)
    service = Service(config, live)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        await service.batcher.start()
        service.live.start()
        yield
        service.live.stop()
        await service.batcher.stop()

    async def refused(request: Request, e: ApiError) -> Response:
        return _error(e)

    async def crashed(request: Request, e: Exception) -> Response:
        detail = _relative(f"{type(e).__name__}: {e}", config)
        return JSONResponse({"error": "internal", "detail": detail}, status_code=500)

    app = Starlette(routes=_routes(service), lifespan=lifespan, exception_handlers={ApiError: refused, Exception: crashed})
    app.state.service = service
    app.add_middleware(_Guard, service=service)
    return app
