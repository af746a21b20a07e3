"""A throwaway Milvus standalone server on loopback for the tests.

The server is PyPI's ``milvus`` package (the dev extra installs it on x86-64 Linux): the
Milvus 2.3 ``milvus run standalone`` binary with its embedded etcd, RocksMQ and local storage,
the same program the Milvus Docker image runs. It is started here as its own process group,
its binaries unpacked and its data kept in a temp folder, and reached over gRPC by URI.
"""

from __future__ import annotations

import importlib.util
import lzma
import os
import shutil
import signal
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

from imgsim_assets_tests.servers import free_port


def server_package() -> Path | None:
    """The installed ``milvus`` package's folder when it ships the server binary, or None."""
    spec = importlib.util.find_spec("milvus")
    if spec is None or not spec.origin:
        return None
    package = Path(spec.origin).parent
    return package if (package / "data" / "bin" / "milvus.lzma").is_file() else None


class MilvusServer:
    """``milvus run standalone`` in a temp folder, its proxy on a free loopback port."""

    def __init__(self, package: Path) -> None:
        self.package = package
        self.root = Path(tempfile.mkdtemp(prefix="imgsim-milvus-"))
        self.port = free_port()
        self.health_port = free_port()
        self.log = self.root / "server.log"
        self.process: subprocess.Popen | None = None

    @property
    def uri(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def _unpack_binaries(self) -> Path:
        """The package keeps the server and its libraries xz-compressed; unpacked into root/bin."""
        bin_dir = self.root / "bin"
        bin_dir.mkdir()
        for packed in (self.package / "data" / "bin").glob("*.lzma"):
            target = bin_dir / packed.name.removesuffix(".lzma")
            with lzma.open(packed) as src, open(target, "wb") as dst:
                shutil.copyfileobj(src, dst)
            target.chmod(0o755)
        return bin_dir

    def _write_config(self) -> None:
        """configs/milvus.yaml from the package's template: this proxy port, the data under root,
        and free ports for etcd and the coordinators (the package's own config writer)."""
        from milvus import MilvusServerConfig

        MilvusServerConfig(data_dir=str(self.root), proxy_port=self.port).resolve()

    def start(self, timeout: float = 180.0) -> str:
        """Start the server and wait until it answers health checks and a client; returns its URI."""
        self._write_config()
        bin_dir = self._unpack_binaries()
        env = {
            **os.environ,
            "DEPLOY_MODE": "STANDALONE",
            "METRICS_PORT": str(self.health_port),  # /healthz is served here
            "MILVUS_RUN_DIR": str(self.root / "run"),
            "LD_LIBRARY_PATH": ":".join(filter(None, [str(bin_dir), os.environ.get("LD_LIBRARY_PATH")])),
        }
        with open(self.log, "wb") as log:
            self.process = subprocess.Popen([str(bin_dir / "milvus"), "run", "standalone"], cwd=self.root, env=env,
                                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        deadline = time.monotonic() + timeout
        while not self._answers():
            if self.process.poll() is not None:
                raise RuntimeError(f"Milvus exited with {self.process.returncode} while starting:\n{self.log_tail()}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"Milvus did not answer on {self.uri} within {timeout:.0f} s:\n{self.log_tail()}")
            time.sleep(0.25)
        return self.uri

    def _answers(self) -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}/healthz", timeout=2) as response:
                if b"OK" not in response.read():
                    return False
        except OSError:
            return False
        from pymilvus import MilvusClient

        try:
            client = MilvusClient(uri=self.uri, timeout=5)
            client.list_collections()
            client.close()
            return True
        except Exception:  # healthy but the proxy not yet serving
            return False

    def log_tail(self, chars: int = 4000) -> str:
        return self.log.read_text(errors="replace")[-chars:] if self.log.exists() else ""

    def stop(self) -> None:
        """Stop the whole process group (SIGTERM, then SIGKILL after 2 s: its data is thrown away,
        and a graceful stop with loaded collections takes over 10 s) and remove the folder."""
        try:
            if self.process is not None and self.process.poll() is None:
                os.killpg(self.process.pid, signal.SIGTERM)
                try:
                    self.process.wait(timeout=2)
                except subprocess.TimeoutExpired:
                    os.killpg(self.process.pid, signal.SIGKILL)
                    self.process.wait(timeout=10)
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
