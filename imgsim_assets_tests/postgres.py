"""A throwaway PostgreSQL server on loopback for the tests (Debian's `postgresql` package)."""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

from imgsim_assets_tests.servers import free_port


def server_binaries() -> Path | None:
    """The newest installed PostgreSQL server's bin/ folder, or None."""
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"), key=lambda p: int(p.parent.parent.name))
    return found[-1].parent if found else None


class PostgresServer:
    """initdb + pg_ctl in a temp folder; as root, the server runs as the `postgres` user."""

    def __init__(self, bin_dir: Path) -> None:
        self.bin = bin_dir
        self.root = Path(tempfile.mkdtemp(prefix="imgsim-pg-"))
        self.port = free_port()
        self._as = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []
        if self._as:
            os.chmod(self.root, 0o755)
            shutil.chown(self.root, "postgres", "postgres")

    def _run(self, *args: str, as_server_user: bool = True) -> None:
        cmd = (self._as if as_server_user else []) + list(args)
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        if done.returncode != 0:
            raise RuntimeError(f"{' '.join(cmd)} failed: {done.stderr or done.stdout}")

    def start(self) -> str:
        data = self.root / "data"
        self._run(str(self.bin / "initdb"), "-D", str(data), "-U", "imgsim", "--auth=trust", "-E", "UTF8")
        options = f"-c listen_addresses=127.0.0.1 -p {self.port} -k {self.root}"
        self._run(str(self.bin / "pg_ctl"), "-D", str(data), "-o", options, "-l", str(self.root / "log"), "-w", "start")
        self._run(str(self.bin / "createdb"), "-h", "127.0.0.1", "-p", str(self.port), "-U", "imgsim", "dagster",
                  as_server_user=False)
        return f"postgresql://imgsim@127.0.0.1:{self.port}/dagster"

    def stop(self) -> None:
        try:
            self._run(str(self.bin / "pg_ctl"), "-D", str(self.root / "data"), "-m", "fast", "-w", "stop")
        finally:
            shutil.rmtree(self.root, ignore_errors=True)
