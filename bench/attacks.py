"""`imgsim serve` as a hostile client meets it, measured on real server processes.

    python -m bench.hostile --service [--before REV] [--images N]

Builds the sample collection (tiny encoder; ``--images N``: N generated pictures instead),
starts ``imgsim serve`` on it, and measures each way a client can hurt the service: a bomb-like
PNG (memory, time), eight at once, heavy uploads against id queries (latency), a chunked body
far past the limit (bytes read), idle connections (how many stay open), a foreign Host,
security headers, a bare token, thumbnail sizes, paths in answers. With ``--before REV`` the
same attacks run against that revision's server too (a git worktree of it, on the same
collection), side by side.
"""

from __future__ import annotations

import contextlib
import http.client
import io
import json
import os
import socket
import struct
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
import zlib
from pathlib import Path

import numpy as np
from PIL import Image

from imgsim_assets.core.storage import DataLayout

ROOT = Path(__file__).resolve().parent.parent
TOKEN = "bench-token"


def png_bomb(side: int, bit_depth: int) -> bytes:
    """A real greyscale PNG of ``side``² zero pixels: a few hundred KB that decode to gigabytes."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    row = b"\0" + bytes((side * bit_depth + 7) // 8)
    packer = zlib.compressobj(9)
    idat = b"".join(packer.compress(row) for _ in range(side)) + packer.flush()
    header = struct.pack(">IIBBBBB", side, side, bit_depth, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def heavy_photo(width: int = 4000, height: int = 3000) -> bytes:
    y, x = np.mgrid[0:height, 0:width]
    out = io.BytesIO()
    Image.fromarray(np.stack([(x // 16) % 256, (y // 12) % 256, ((x + y) // 20) % 256], -1).astype(np.uint8)).save(
        out, format="PNG", compress_level=1)
    return out.getvalue()


BUILD = """
import sys
from pathlib import Path
from dagster import instance_for_test
from imgsim_assets.core.sample_data import write_sample_corpus, write_synthetic_batch
from imgsim_assets.definitions import build_definitions
from imgsim_assets.ingest import ingest
from imgsim_assets.resources import EncoderResource, PreprocessResource
from imgsim_assets.settings import Settings

root, images = Path(sys.argv[1]), int(sys.argv[2])
settings = Settings(data_dir=root / "data")
if images:
    write_synthetic_batch(settings.images_dir / "generated", images, seed=0)
else:
    write_sample_corpus(settings.data_dir)
defs = build_definitions(settings, encoder=EncoderResource(weights="random", depth=2, batch_size=16, device="cpu"),
                         preprocessing=PreprocessResource(crop_size=112, resize_size=128, workers=1))
(root / "dagster_home").mkdir(exist_ok=True)
with instance_for_test(temp_dir=str(root / "dagster_home")) as instance:
    report = ingest(defs, instance, settings.images_dir, log=lambda m: None)
    assert report.ok, report.failed
"""


def build_collection(code: Path, root: Path, images: int = 0) -> Path:
    """The sample corpus (or ``images`` generated pictures) ingested by the checkout ``code``
    with a 2-block ViT at 112 px (each revision reads what it wrote itself); returns the data dir."""
    subprocess.run([sys.executable, "-c", BUILD, str(root), str(images)], env={**os.environ, "PYTHONPATH": str(code)},
                   cwd=code, check=True, capture_output=True)
    return root / "data"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def served(code: Path, data_dir: Path, token: str = ""):
    """``imgsim serve`` from the checkout ``code`` over ``data_dir``: yields (base URL, pid)."""
    port = _free_port()
    env = {**os.environ, "IMGSIM_DATA_DIR": str(data_dir), "IMGSIM_DEVICE": "cpu", "PYTHONPATH": str(code),
           "IMGSIM_SERVE_TOKEN": token}
    proc = subprocess.Popen([sys.executable, "-m", "imgsim_assets.cli", "serve", "--port", str(port)], env=env,
                            cwd=code, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 180
    while request(base, "/healthz", token=token)[0] != 200:
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"imgsim serve from {code} did not start")
        time.sleep(0.3)
    try:
        yield base, proc.pid
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def request(base: str, path: str, body: bytes | None = None, headers: dict | None = None, token: str = "",
            timeout: float = 300) -> tuple[int, bytes, dict]:
    headers = dict(headers or {})
    if token:
        headers.setdefault("Authorization", f"Bearer {token}")
    req = urllib.request.Request(base + path, data=body, headers=headers, method="POST" if body else "GET")
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read(), {k.lower(): v for k, v in r.headers.items()}
    except urllib.error.HTTPError as e:
        return e.code, e.read(), {k.lower(): v for k, v in e.headers.items()}
    except OSError:
        return 0, b"", {}


def upload(base: str, data: bytes, name: str = "q.png") -> int:
    boundary = "benchboundary"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{name}\"\r\n"
            "Content-Type: application/octet-stream\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return request(base, "/search", body, {"Content-Type": f"multipart/form-data; boundary={boundary}"})[0]


def memory(pid: int, field: str) -> int:
    """VmRSS (now) or VmHWM (peak) of a process, in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) // 1024
    return 0


def _concurrently(n: int, target) -> list:
    results = [None] * n

    def run(i):
        results[i] = target()

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def attack(code: Path, data_dir: Path) -> dict[str, str]:
    """Every figure of one revision's server."""
    figures: dict[str, str] = {}
    bomb16, bomb1 = png_bomb(13376, 16), png_bomb(13376, 1)
    with served(code, data_dir) as (base, pid):
        rss0 = memory(pid, "VmRSS")
        began = time.perf_counter()
        status = upload(base, bomb16, "bomb16.png")
        figures["16-bit 13,376² PNG (340 KB): status, seconds"] = f"{status}, {time.perf_counter() - began:.1f} s"
        figures["  its peak RSS above idle"] = f"{memory(pid, 'VmHWM') - rss0:,} MiB"
        hwm = memory(pid, "VmHWM")
        statuses = _concurrently(8, lambda: upload(base, bomb1, "bomb1.png"))
        figures["eight 1-bit 13,376² PNGs at once: statuses"] = ",".join(sorted({str(s) for s in statuses}))
        figures["  peak RSS above idle (new peak)"] = f"{max(memory(pid, 'VmHWM'), hwm) - rss0:,} MiB"
        figures["  RSS above idle afterwards"] = f"{memory(pid, 'VmRSS') - rss0:,} MiB"

        some_id = _an_image_id(base)
        idle = [_timed(base, some_id) for _ in range(100)]
        figures["id query p99, idle"] = f"{np.percentile(idle, 99) * 1000:.1f} ms"
        for label, data in (("8 of those 1-bit PNGs", bomb1), ("8 heavy uploads (12 Mpx PNG, 2 each)", heavy_photo())):
            latencies = _during_uploads(base, some_id, data)
            figures[f"id query p50 / p99 / max during {label}"] = (
                f"{np.percentile(latencies, 50) * 1000:.1f} / {np.percentile(latencies, 99) * 1000:.1f} / "
                f"{max(latencies) * 1000:.0f} ms")

        status, sent, seconds = _chunked(base, 256 << 20)
        figures["chunked 256 MB upload (limit 32 MB): status, MB taken, s"] = f"{status}, {sent >> 20}, {seconds:.1f}"
        figures["idle connections still open after 12 s (of 200)"] = str(_idle_connections(base, 200, 12.0))
        figures["Host: rebound.example → status"] = str(_with_host(base, "rebound.example")[0])
        headers = _with_host(base, "127.0.0.1")[1]
        figures["nosniff / CSP frame-ancestors"] = (f"{headers.get('x-content-type-options', '-')} / "
                                                    f"{'yes' if 'frame-ancestors' in headers.get('content-security-policy', '') else 'no'}")
        thumbs = DataLayout(data_dir).assets / ".thumbnails"
        before = len(list(thumbs.glob("*.jpg"))) if thumbs.exists() else 0
        for size in range(16, 1025, 8):
            request(base, f"/images/{some_id}?size={size}")
        figures["thumbnail files for sizes 16..1024 (step 8)"] = str(len(list(thumbs.glob("*.jpg"))) - before)
        other = json.loads(request(base, f"/search?image_id={some_id}&k=2")[1])["hits"][1]
        original = DataLayout(data_dir).images / other["path"]
        saved = original.read_bytes()
        original.write_bytes(b"no longer a picture")
        try:
            body = request(base, f"/images/{other['image_id']}?size=200")[1].decode()
        finally:
            original.write_bytes(saved)
        figures["error body names the data dir"] = "yes" if str(data_dir.parent) in body else "no"
    with served(code, data_dir, token=TOKEN) as (base, _):
        status = request(base, "/healthz", headers={"Authorization": TOKEN})[0]
        figures["'Authorization: TOKEN' (no Bearer) → status"] = str(status)
    return figures


def _an_image_id(base: str) -> int:
    clusters = json.loads(request(base, "/clusters?per_page=1&samples=1")[1])
    return int(clusters["clusters"][0]["samples"][0]["image_id"])


def _during_uploads(base: str, image_id: int, data: bytes) -> list[float]:
    """Latencies of id queries asked one after another while 8 clients upload ``data`` twice each."""
    threads = [threading.Thread(target=lambda: [upload(base, data) for _ in range(2)]) for _ in range(8)]
    for t in threads:
        t.start()
    latencies = []
    while any(t.is_alive() for t in threads) or len(latencies) < 20:
        latencies.append(_timed(base, image_id))
        time.sleep(0.01)
    for t in threads:
        t.join()
    return latencies


def _timed(base: str, image_id: int) -> float:
    began = time.perf_counter()
    request(base, f"/search?image_id={image_id}&k=10")
    return time.perf_counter() - began


def _chunked(base: str, total: int, piece: int = 1 << 20) -> tuple[int, int, float]:
    """(status, bytes the server took, seconds) of a chunked multipart upload of ``total`` bytes."""
    host, port = base.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=120)
    began = time.perf_counter()
    conn.putrequest("POST", "/search")
    conn.putheader("Content-Type", "multipart/form-data; boundary=b")
    conn.putheader("Transfer-Encoding", "chunked")
    conn.endheaders()
    sent = 0
    head = b"--b\r\nContent-Disposition: form-data; name=\"image\"; filename=\"big.png\"\r\n\r\n"
    try:
        for part in [head] + [b"\0" * piece] * (total // piece):
            conn.send(b"%x\r\n%s\r\n" % (len(part), part))
            sent += len(part)
        conn.send(b"0\r\n\r\n")
        status = conn.getresponse().status
    except OSError:
        try:
            status = conn.getresponse().status
        except (OSError, http.client.HTTPException):
            status = 0
    return status, sent, time.perf_counter() - began


def _idle_connections(base: str, n: int, wait_s: float) -> int:
    host, port = base.removeprefix("http://").split(":")
    socks = [socket.create_connection((host, int(port))) for _ in range(n)]
    time.sleep(wait_s)
    open_ = 0
    for s in socks:
        s.setblocking(False)
        try:
            open_ += s.recv(1) != b""
        except BlockingIOError:
            open_ += 1  # nothing to read and not closed: still held
        except OSError:
            pass
        s.close()
    return open_


def _with_host(base: str, host_header: str) -> tuple[int, dict]:
    host, port = base.removeprefix("http://").split(":")
    conn = http.client.HTTPConnection(host, int(port), timeout=30)
    conn.putrequest("GET", "/", skip_host=True)
    conn.putheader("Host", host_header)
    conn.endheaders()
    response = conn.getresponse()
    response.read()
    return response.status, {k.lower(): v for k, v in response.getheaders()}


def run(before: str | None, images: int = 0) -> None:
    with tempfile.TemporaryDirectory(prefix="imgsim-attacks-") as tmp:
        tmp = Path(tmp)
        checkouts = {"now": ROOT}
        if before:
            checkouts[f"before ({before})"] = tmp / "before"
            subprocess.run(["git", "-C", str(ROOT), "worktree", "add", "--detach", str(tmp / "before"), before],
                           check=True, capture_output=True)
        columns = {}
        try:
            for label, code in sorted(checkouts.items(), key=lambda kv: kv[0] == "now"):
                columns[label] = attack(code, build_collection(code, tmp / label.split()[0], images))
        finally:
            if before:
                subprocess.run(["git", "-C", str(ROOT), "worktree", "remove", "--force", str(tmp / "before")],
                               capture_output=True)
    names = list(next(iter(columns.values())))
    width = max(map(len, names))
    print(f"{'':{width}}  " + "  ".join(f"{c:>24}" for c in columns))
    for name in names:
        print(f"{name:{width}}  " + "  ".join(f"{columns[c].get(name, '-'):>24}" for c in columns))
