"""A served index for the service tests: the sample corpus ingested with a tiny encoder, and
``imgsim serve``'s app run by uvicorn on a free loopback port in a thread."""

from __future__ import annotations

import contextlib
import io
import json
import threading
import time
import urllib.error
import urllib.request
from dataclasses import replace
from pathlib import Path

import uvicorn
from dagster import instance_for_test
from PIL import Image

from imgsim_assets.core.sample_data import write_sample_corpus
from imgsim_assets.definitions import build_definitions
from imgsim_assets.ingest import ingest, run_job
from imgsim_assets.resources import EncoderResource, PreprocessResource
from imgsim_assets.serve.app import ServeConfig, create_app
from imgsim_assets.serve.connections import guarded_protocol
from imgsim_assets.settings import Settings
from imgsim_assets_tests.servers import free_port


def tiny_definitions(settings: Settings):
    """The code location with a 2-block ViT at 112 px: the whole chain in seconds."""
    return build_definitions(
        settings,
        encoder=EncoderResource(weights="random", depth=2, batch_size=16, device="cpu"),
        preprocessing=PreprocessResource(crop_size=112, resize_size=128, workers=1),
    )


@contextlib.contextmanager
def sample_collection(root: Path):
    """The sample corpus (23 photographs and 69 edited copies) ingested under ``root``:
    yields ``(settings, defs, instance)``; ``root/data/queries`` holds re-encoded queries."""
    settings = Settings(data_dir=root / "data")
    write_sample_corpus(settings.data_dir)
    defs = tiny_definitions(settings)
    (root / "dagster_home").mkdir(exist_ok=True)
    with instance_for_test(temp_dir=str(root / "dagster_home")) as instance:
        report = ingest(defs, instance, settings.images_dir, log=lambda m: None)
        assert report.ok, report.failed
        # Random weights calibrate to "no pair is surely a copy" (no groups); the pages under
        # test need groups, so these are made at a fixed threshold, connected.
        assert run_job(instance, defs.resolve_job_def("analyze_index"),
                       ops_config={"near_duplicates": {"config": {"threshold": 0.95, "grouping": "connected"}}}) is None
        yield settings, defs, instance


# An indexed photograph pasted into a canvas tiled with another one. With the tests' 2-block
# random-weight encoder the whole collage finds brick.png first and the pasted photograph only
# at rank 87 of 92; the box around it is the photograph's own pixels, and finds it first.
COLLAGE_PHOTO = "batch-0001/astronaut.png"
COLLAGE_FILL = "batch-0001/brick.png"


def collage(images_dir: Path) -> tuple[bytes, tuple[int, int, int, int]]:
    """A 1024² PNG: :data:`COLLAGE_PHOTO` (512²) pasted near its top-right corner, the rest
    tiled with :data:`COLLAGE_FILL`; and the pasted photograph's box (x0, y0, x1, y1)."""
    photo = Image.open(images_dir / COLLAGE_PHOTO).convert("RGB")
    fill = Image.open(images_dir / COLLAGE_FILL).convert("RGB")
    canvas = Image.new("RGB", (2 * photo.width, 2 * photo.height))
    for x in range(0, canvas.width, fill.width):
        for y in range(0, canvas.height, fill.height):
            canvas.paste(fill, (x, y))
    x0, y0 = canvas.width - photo.width - 10, 10
    canvas.paste(photo, (x0, y0))
    out = io.BytesIO()
    canvas.save(out, format="PNG")
    return out.getvalue(), (x0, y0, x0 + photo.width, y0 + photo.height)


@contextlib.contextmanager
def running_server(settings: Settings, **options):
    """``imgsim serve`` over ``settings``' data dir in a thread; yields ``(base_url, app)``."""
    config = ServeConfig(assets_dir=settings.assets_dir, images_dir=settings.images_dir, device="cpu",
                         port=free_port(), reload_interval_s=0.2)
    config = replace(config, **options)
    app = create_app(config)
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=config.port, log_level="warning",
                                           access_log=False, timeout_keep_alive=5,
                                           http=guarded_protocol(config.header_timeout_s, config.max_connections)))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{config.port}"
    deadline = time.monotonic() + 60
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise TimeoutError("the server did not start")
        time.sleep(0.05)
    try:
        yield base, app
    finally:
        server.should_exit = True
        thread.join(timeout=10)


def get(url: str, token: str | None = None) -> tuple[int, dict | bytes, dict]:
    """(status, JSON body or bytes, headers) of a GET, errors included."""
    request = urllib.request.Request(url, headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            return response.status, _body(response.read(), response.headers), dict(response.headers)
    except urllib.error.HTTPError as e:
        return e.code, _body(e.read(), e.headers), dict(e.headers)


def post_image(url: str, data: bytes, name: str = "query.jpg", token: str | None = None):
    """(status, JSON body, headers) of a multipart upload in field ``image``."""
    boundary = "imgsimtestboundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{name}\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    headers = {"Content-Type": f"multipart/form-data; boundary={boundary}"}
    if token:
        headers["Authorization"] = f"Bearer {token}"
    request = urllib.request.Request(url, data=body, method="POST", headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=120) as response:
            return response.status, _body(response.read(), response.headers), dict(response.headers)
    except urllib.error.HTTPError as e:
        return e.code, _body(e.read(), e.headers), dict(e.headers)


def _body(data: bytes, headers) -> dict | bytes:
    return json.loads(data) if "json" in (headers.get("Content-Type") or "") else data
