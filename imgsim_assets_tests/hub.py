"""A stand-in for the Hugging Face hub on loopback: ``/{repo}/resolve/{revision}/{file}`` with
the headers huggingface_hub reads (commit, sha256 ETag, size), ranges for resumed transfers,
a count of every request, and faults on demand."""

from __future__ import annotations

import hashlib
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

COMMIT = "0123456789abcdef0123456789abcdef01234567"
FAULTS = ("403", "404", "500", "truncate", "corrupt", "stall")


class Hub:
    """Serves ``files`` ({"timm/vit_…/model.safetensors": path}) until :meth:`close`."""

    def __init__(self, files: dict[str, Path]) -> None:
        self.files = {name: Path(path).read_bytes() for name, path in files.items()}
        self.sha256 = {name: hashlib.sha256(data).hexdigest() for name, data in self.files.items()}
        self.fault: str | None = None
        self.redirect = False  # answer resolve with a 302 to file storage on another host name, as the hub does
        self.authorization: list[tuple[str, str]] = []  # (path, Authorization header) of every request
        self.stall_s = 30.0
        self.requests: list[tuple[str, str]] = []  # (method, path)
        self.proxied = 0  # requests that came as to a proxy
        self._lock = threading.Lock()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_HEAD(self):
                hub._answer(self, body=False)

            def do_GET(self):
                hub._answer(self, body=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_port}"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def count(self, method: str | None = None) -> int:
        with self._lock:
            return sum(1 for m, _ in self.requests if method is None or m == method)

    def _answer(self, handler: BaseHTTPRequestHandler, body: bool) -> None:
        with self._lock:
            self.requests.append((handler.command, handler.path))
        path = handler.path.split("?")[0]
        with self._lock:
            self.authorization.append((path, handler.headers.get("Authorization") or ""))
        if not path.startswith("/"):  # asked as a forwarding proxy: http://host/path
            path = "/" + path.split("://", 1)[-1].split("/", 1)[-1]
            with self._lock:
                self.proxied += 1
        storage = path.startswith("/storage/")
        match = re.fullmatch(r"/(.+)/resolve/([^/]+)/(.+)", path)
        name = path.removeprefix("/storage/") if storage else f"{match.group(1)}/{match.group(3)}" if match else ""
        if self.redirect and not storage and name in self.files:  # the hub's answer for an LFS file
            handler.send_response(302)
            handler.send_header("Location", f"http://localhost:{self.server.server_port}/storage/{name}")
            handler.send_header("X-Repo-Commit", COMMIT)
            handler.send_header("X-Linked-Etag", f'"{self.sha256[name]}"')
            handler.send_header("X-Linked-Size", str(len(self.files[name])))
            handler.send_header("Content-Length", "0")
            handler.end_headers()
            return
        fault = self.fault
        if fault in ("403", "404", "500") or name not in self.files:
            code = int(fault) if fault in ("403", "404", "500") else 404
            handler.send_response(code)
            handler.send_header("Content-Length", "0")
            handler.send_header("X-Error-Code", "EntryNotFound" if code == 404 else "")
            handler.end_headers()
            return
        data = self.files[name]
        if fault == "corrupt":
            data = bytes(b ^ 0xFF for b in data[:64]) + data[64:]
        start = 0
        ranged = handler.headers.get("Range")
        if ranged and fault != "truncate" and (m := re.fullmatch(r"bytes=(\d+)-", ranged.strip())):
            start = int(m.group(1))
        handler.send_response(206 if start else 200)
        handler.send_header("X-Repo-Commit", COMMIT)
        handler.send_header("ETag", f'"{self.sha256[name]}"')
        handler.send_header("X-Linked-Etag", f'"{self.sha256[name]}"')
        handler.send_header("X-Linked-Size", str(len(data)))
        handler.send_header("Accept-Ranges", "bytes")
        handler.send_header("Content-Length", str(len(data) - start))
        if start:
            handler.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        handler.end_headers()
        if not body:
            return
        if fault == "truncate":  # half the promised bytes, then the connection drops
            handler.wfile.write(data[: len(data) // 2])
            handler.wfile.flush()
            handler.close_connection = True
            return
        if fault == "stall":  # a little, then silence
            handler.wfile.write(data[start : start + 1024])
            handler.wfile.flush()
            time.sleep(self.stall_s)
            handler.close_connection = True
            return
        handler.wfile.write(data[start:])
