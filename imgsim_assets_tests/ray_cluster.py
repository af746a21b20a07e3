"""A Ray cluster of real processes on loopback for the tests: a head node and more worker nodes,
each started with ``ray start --block`` in its own session (so that stopping kills its raylet,
GCS and workers, and nothing else on the machine)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from imgsim_assets_tests.servers import free_port, unavailable

RAY_CLI = [sys.executable, "-c", "from ray.scripts.scripts import main; main()"]
OBJECT_STORE_BYTES = 200 * 2**20  # small machines' /dev/shm


def require_ray() -> None:
    """Skip (or, where CI sets IMGSIM_REQUIRE_RAY, fail) unless Ray is installed."""
    try:
        import ray  # noqa: F401
    except ImportError:
        unavailable("Ray is not installed (make RAY=1 install, or pip install 'imgsim[ray]')", "IMGSIM_REQUIRE_RAY")


class RayCluster:
    """``nodes`` nodes of ``cpus`` CPUs each; :meth:`start` returns the head's address."""

    def __init__(self, nodes: int = 2, cpus: int = 1) -> None:
        self.nodes, self.cpus = nodes, cpus
        self.processes: list[subprocess.Popen] = []
        # Short: Ray's unix sockets live under it (108 bytes at most).
        self.dir = Path(tempfile.mkdtemp(prefix="imgsim-ray-", dir="/tmp"))
        self.address = ""

    def _start(self, name: str, arguments: list[str]) -> subprocess.Popen:
        env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
        common = ["--block", f"--num-cpus={self.cpus}", "--num-gpus=0", "--node-ip-address=127.0.0.1",
                  f"--object-store-memory={OBJECT_STORE_BYTES}", "--disable-usage-stats"]
        log = open(self.dir / f"{name}.log", "w")
        process = subprocess.Popen([*RAY_CLI, "start", *common, *arguments], env=env, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        self.processes.append(process)
        return process

    def start(self, timeout: float = 120.0) -> str:
        port = free_port()
        self._start("head", ["--head", f"--port={port}", "--include-dashboard=false", f"--temp-dir={self.dir}"])
        self.address = f"127.0.0.1:{port}"
        for i in range(1, self.nodes):
            self._start(f"worker-{i}", [f"--address={self.address}"])
        deadline = time.monotonic() + timeout
        while self.alive_nodes() < self.nodes:
            if time.monotonic() > deadline or any(p.poll() is not None for p in self.processes):
                logs = "\n".join(f.read_text()[-2000:] for f in self.dir.glob("*.log"))
                self.stop()
                raise RuntimeError(f"the Ray cluster did not come up:\n{logs}")
            time.sleep(0.5)
        return self.address

    def alive_nodes(self) -> int:
        """Nodes the head counts alive (asked by a short-lived process: this one stays unconnected)."""
        probe = ("import ray, sys; ray.init(address=sys.argv[1], logging_level='ERROR'); "
                 "print(sum(n['Alive'] for n in ray.nodes()))")
        try:
            out = subprocess.run([sys.executable, "-c", probe, self.address], capture_output=True, text=True,
                                 timeout=60, env={**os.environ, "RAY_USAGE_STATS_ENABLED": "0"})
            return int(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 and out.stdout.strip() else 0
        except (subprocess.TimeoutExpired, ValueError):
            return 0

    def stop(self) -> None:
        for process in reversed(self.processes):
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            process.wait()
        self.processes = []
