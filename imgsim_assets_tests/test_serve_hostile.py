"""`imgsim serve` under hostile clients: bombs within a decode budget and memory given back
(measured on a real server process), uploads that cannot starve id queries, bodies cut while
they stream, slow and idle connections, Host names, content types, thumbnails, paths, the token."""

import argparse
import http.client
import io
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bench.attacks import heavy_photo, png_bomb
from imgsim_assets.serve import thumbnails
from imgsim_assets.settings import Settings
from imgsim_assets.serve.uploads import UploadDecoder
from imgsim_assets_tests.serving import get, post_image, running_server, sample_collection
from imgsim_assets_tests.servers import free_port


def png(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, format="PNG", compress_level=1)
    return out.getvalue()


@pytest.fixture(scope="module")
def collection(tmp_path_factory):
    root = tmp_path_factory.mktemp("hostile")
    with sample_collection(root) as served:
        yield served


def _status(pid: int, field: str) -> int:
    """A memory figure of a process from /proc, in bytes (VmRSS now, VmHWM its peak)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


@pytest.fixture(scope="module")
def served_process(collection):
    """``imgsim serve`` as a process of its own on the sample collection."""
    settings, _, _ = collection
    port = free_port()
    env = {**os.environ, "IMGSIM_DATA_DIR": str(settings.data_dir), "IMGSIM_DEVICE": "cpu"}
    proc = subprocess.Popen([sys.executable, "-m", "imgsim_assets.cli", "serve", "--port", str(port)], env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:
        try:
            if get(base + "/healthz")[0] == 200:
                break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"imgsim serve did not start: {proc.stderr.read()[-2000:]}")
        time.sleep(0.2)
    yield base, proc.pid
    proc.terminate()
    proc.wait(timeout=30)


def test_bombs_are_refused_from_their_header_and_large_uploads_stay_within_budget(served_process):
    base, pid = served_process
    peak_before, rss_before = _status(pid, "VmHWM"), _status(pid, "VmRSS")
    for bit_depth in (16, 1):  # 13,376² pixels: 16-bit greyscale and 1-bit, a few hundred KB each
        bomb = png_bomb(13376, bit_depth)
        assert len(bomb) < 600_000
        began = time.monotonic()
        status, body, _ = post_image(base + "/search", bomb, "bomb.png")
        assert (status, body["error"]) == (422, "decompression_bomb"), body
        assert "MiB, over the budget of 256 MiB" in body["detail"] and time.monotonic() - began < 5
        status, body, _ = post_image(base + "/search?box=0,0,64,64", bomb, "bomb.png")  # a small box changes nothing
        assert (status, body["error"]) == (422, "decompression_bomb") and time.monotonic() - began < 10
    assert _status(pid, "VmHWM") - peak_before < 64 << 20  # refused before a single row was decoded

    # Within the budget: 36 Mpx of 16-bit greyscale decodes, one band at a time, to 3 bytes a pixel.
    deep = png((np.arange(6000 * 6000, dtype=np.uint32) % 65536).astype(np.uint16).reshape(6000, 6000))
    status, body, _ = post_image(base + "/search?k=3", deep, "deep.png")
    assert status == 200 and body["query"]["width"] == 6000, body
    grown = _status(pid, "VmHWM") - peak_before
    assert grown < 400 << 20, f"peak grew by {grown >> 20} MiB"  # a float64 copy alone was 288 MB

    burst = [threading.Thread(target=post_image, args=(base + "/search", heavy_photo(), "heavy.png"))
             for _ in range(4)]
    for t in burst:
        t.start()
    for t in burst:
        t.join()
    assert _status(pid, "VmRSS") - rss_before < 160 << 20  # given back after the burst


def test_id_queries_are_answered_while_heavy_uploads_decode(served_process):
    base, _ = served_process
    some_id = get(base + "/duplicates?per_page=1")[1]["groups"][0]["members"][0]["image_id"]
    photo = heavy_photo()
    uploads = [threading.Thread(target=lambda: [post_image(base + "/search", photo, "heavy.png") for _ in range(2)])
               for _ in range(8)]
    for t in uploads:
        t.start()
    latencies = []
    while any(t.is_alive() for t in uploads):
        began = time.perf_counter()
        status, _, _ = get(f"{base}/search?image_id={some_id}&k=10")
        latencies.append(time.perf_counter() - began)
        assert status == 200
        time.sleep(0.01)
    for t in uploads:
        t.join()
    assert len(latencies) >= 50
    p99 = float(np.percentile(latencies, 99))
    assert p99 <= 0.050, f"id-query p99 {p99 * 1000:.1f} ms during 8 concurrent heavy uploads"


def _chunked_upload(base: str, total: int, chunk: int = 1 << 20) -> tuple[int, int]:
    """(status, bytes sent before the server answered or closed) of a chunked multipart upload."""
    host, port = base.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    boundary = "hostile"
    conn.putrequest("POST", "/search")
    conn.putheader("Content-Type", f"multipart/form-data; boundary={boundary}")
    conn.putheader("Transfer-Encoding", "chunked")
    conn.endheaders()
    head = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"big.png\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode()
    sent = 0
    try:
        for piece in [head] + [b"\0" * chunk] * (total // chunk):
            conn.send(b"%x\r\n%s\r\n" % (len(piece), piece))
            sent += len(piece)
        conn.send(b"0\r\n\r\n")
    except (BrokenPipeError, ConnectionResetError):
        pass
    response = conn.getresponse()
    return response.status, sent


def test_a_chunked_upload_is_cut_at_the_limit_while_it_streams(collection, tmp_path):
    settings, _, _ = collection
    with running_server(settings, max_upload_bytes=1 << 20) as (base, _):
        began = time.monotonic()
        status, sent = _chunked_upload(base, 512 << 20)
        assert status == 413
        assert sent < 64 << 20 and time.monotonic() - began < 10  # not the 512 MB offered


def test_slow_idle_and_too_many_connections_are_closed(collection):
    settings, _, _ = collection
    with running_server(settings, header_timeout_s=1.0, max_connections=16) as (base, _):
        port = int(base.rsplit(":", 1)[1])
        idle = socket.create_connection(("127.0.0.1", port))
        slow = socket.create_connection(("127.0.0.1", port))
        began = time.monotonic()
        for byte in b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\n":  # a request head that never ends
            try:
                slow.send(bytes([byte]))
            except OSError:
                break
            time.sleep(0.05)
        for s in (idle, slow):
            s.settimeout(5)
            assert s.recv(1024) == b""  # closed by the server
        assert time.monotonic() - began < 5
        held = [socket.create_connection(("127.0.0.1", port)) for _ in range(40)]
        closed = 0
        for s in held:
            s.settimeout(2)
            try:
                closed += s.recv(1) == b""
            except socket.timeout:
                pass
        assert closed >= 40 - 16
        for s in held:
            s.close()
        assert get(base + "/healthz")[0] == 200  # and it still serves


def _raw_get(base: str, path: str, host: str) -> tuple[int, dict]:
    host_port = base.removeprefix("http://")
    conn = http.client.HTTPConnection(*host_port.split(":"), timeout=30)
    conn.putrequest("GET", path, skip_host=True)
    conn.putheader("Host", host)
    conn.endheaders()
    response = conn.getresponse()
    response.read()
    return response.status, {k.lower(): v for k, v in response.getheaders()}


def test_only_its_own_host_names_and_safe_content_types(collection):
    settings, _, _ = collection
    evil = settings.images_dir / "batch-0001" / "astronaut.png"
    with running_server(settings) as (base, _):
        port = base.rsplit(":", 1)[1]
        assert _raw_get(base, "/healthz", f"rebound.example:{port}")[0] == 421  # DNS rebinding
        for host in (f"127.0.0.1:{port}", f"localhost:{port}", "localhost"):
            assert _raw_get(base, "/healthz", host)[0] == 200
        status, headers = _raw_get(base, "/", f"localhost:{port}")
        assert status == 200 and headers["x-content-type-options"] == "nosniff"
        assert "frame-ancestors 'none'" in headers["content-security-policy"]
        assert "default-src 'self'" in headers["content-security-policy"]

        # An original is served as what it decodes to, whatever its name says.
        status, answer, _ = post_image(base + "/search?k=1", evil.read_bytes())
        image_id = answer["hits"][0]["image_id"]
        original = evil.read_bytes()
        evil.write_bytes(original + b"<html><script>alert(document.domain)</script></html>")
        try:
            status, body, headers = get(f"{base}/images/{image_id}")
            assert status == 200 and headers["content-type"] == "image/png"
        finally:
            evil.write_bytes(original)
    with running_server(settings, allowed_hosts=("photos.example",)) as (base, _):
        assert _raw_get(base, "/healthz", "photos.example")[0] == 200
        assert _raw_get(base, "/healthz", "other.example")[0] == 421


def test_regions_and_comparisons_read_indexed_files_only_through_the_images_root(collection, tmp_path):
    settings, _, _ = collection
    target = settings.images_dir / "batch-0001" / "camera.png"
    original = target.read_bytes()
    with running_server(settings) as (base, _):
        image_id = post_image(base + "/search?k=1", original)[1]["hits"][0]["image_id"]
        other = post_image(base + "/search?k=1", (settings.images_dir / "batch-0001" / "coins.png").read_bytes())[1]
        other_id = other["hits"][0]["image_id"]
        asks = (f"/search?image_id={image_id}&box=0,0,100,100", f"/compare?a={other_id}&b={image_id}")
        target.rename(tmp_path / "camera.png")
        try:
            target.symlink_to("/etc/passwd")  # a link out of the root
            for ask in asks:
                status, body, _ = get(base + ask)
                assert (status, body["error"]) == (403, "outside_root") and "/etc" not in body["detail"], body
            target.unlink()
            os.mkfifo(target)  # opened, it would block a reader forever
            for ask in asks:
                status, body, _ = get(base + ask)
                assert (status, body["error"]) == (403, "not_a_file"), body
            target.unlink()
            target.write_bytes(png_bomb(13376, 1))  # replaced since it was indexed: the decode budget holds
            for ask in asks:
                status, body, _ = get(base + ask)
                assert (status, body["error"]) == (422, "decompression_bomb"), body
            target.unlink()
            for ask in asks:
                status, body, _ = get(base + ask)
                assert (status, body["error"]) == (404, "unreadable") and str(settings.data_dir) not in body["detail"]
        finally:
            target.unlink(missing_ok=True)
            (tmp_path / "camera.png").rename(target)
        assert get(base + asks[1])[0] == 200


def test_thumbnails_come_in_a_few_sizes_from_a_bounded_cache(tmp_path):
    images = tmp_path / "images"
    (images / "b").mkdir(parents=True)
    for i in range(12):
        Image.fromarray(np.full((300, 400, 3), i * 20, np.uint8)).save(images / "b" / f"{i}.png")
    cache = thumbnails.Thumbnails(images, tmp_path / "thumbs", max_bytes=6_000)
    path, kind = cache.file_for(1, "b/1.png", 100)
    assert path.name == "1-128.jpg" and kind == "image/jpeg" and Image.open(path).size == (128, 96)
    assert cache.file_for(1, "b/1.png", 17)[0].name == "1-64.jpg"
    assert cache.file_for(1, "b/1.png", 1024)[0].name == "1-512.jpg"
    for i in range(12):
        cache.file_for(i, f"b/{i}.png", 256)
        assert sum(f.stat().st_size for f in (tmp_path / "thumbs").glob("*.jpg")) <= 6_000
    assert cache.file_for(3, "b/3.png", None) == (images / "b" / "3.png", "image/png")


def test_errors_name_no_absolute_path_and_the_token_is_a_bearer_token(collection, tmp_path, monkeypatch, capsys):
    from imgsim_assets.cli import main, serve_token

    settings, _, _ = collection
    duplicates = settings.assets_dir / "near_duplicates.parquet"
    saved = duplicates.read_bytes()
    with running_server(settings, token="s3cret") as (base, _):
        status, health, _ = get(base + "/healthz", token="s3cret")
        assert status == 200 and str(settings.data_dir) not in str(health)
        duplicates.write_bytes(b"PAR1 not really")
        try:
            status, body, _ = get(base + "/duplicates", token="s3cret")
        finally:
            duplicates.write_bytes(saved)
        assert status == 500 and "near_duplicates.parquet" in body["detail"]
        assert str(settings.data_dir) not in body["detail"] and str(tmp_path.parent) not in body["detail"]
        bare = http.client.HTTPConnection(*base.removeprefix("http://").split(":"), timeout=30)
        bare.request("GET", "/healthz", headers={"Authorization": "s3cret"})
        assert bare.getresponse().status == 401  # the scheme is part of the header

    token_file = tmp_path / "token"
    token_file.write_text("from-a-file\n")
    args = argparse.Namespace(token=None, token_file=str(token_file))
    assert serve_token(args, Settings()) == "from-a-file"
    environment = Settings.from_env({"IMGSIM_SERVE_TOKEN": "from-the-environment"})
    assert serve_token(argparse.Namespace(token=None, token_file=None), environment) == "from-the-environment"
    assert serve_token(args, Settings.from_env({"IMGSIM_SERVE_TOKEN_FILE": "/nowhere"})) == "from-a-file"
    for name in ("IMGSIM_SERVE_TOKEN", "IMGSIM_SERVE_TOKEN_FILE"):
        monkeypatch.delenv(name, raising=False)
    assert main(["serve", "--host", "0.0.0.0"]) == 2  # refused before anything is loaded
    assert "(not loopback) needs a token" in capsys.readouterr().err


def test_retry_after_comes_from_the_measured_decode_time():
    decoder = UploadDecoder(workers=2, max_pending=4, max_decode_bytes=1 << 20)
    decoder.pending, decoder._seconds = 4, 3.0
    assert decoder.retry_after() == 6  # 4 uploads × 3 s over 2 threads
    decoder.close()
