"""What ``imgsim serve`` serves and how much it takes: the one place its defaults live (the CLI
takes its option defaults from here). Light to import: the CLI builds its parser from it."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ServeConfig:
    """What ``imgsim serve`` serves and how much it takes."""

    assets_dir: Path
    images_dir: Path
    host: str = "127.0.0.1"
    port: int = 8000
    token: str = ""  # required when binding to anything but loopback
    device: str = "auto"
    backend: str = "torch"  # where the query encoder's forward pass runs (core.backends; imgsim serve: the settings')
    dtype: str = "auto"  # the query encoder's precision (core.encoder.resolve_dtype; imgsim serve: the settings')
    max_upload_bytes: int = 32 << 20
    max_k: int = 1000
    reload_interval_s: float = 1.0
    allow_other_weights: bool = False  # serve even when this machine's weights differ from the index's
    batch_window_ms: float = 2.0
    max_batch: int = 16
    max_queue: int = 64  # image queries waiting for the model; more are answered 503
    max_in_flight: int = 256  # id queries being searched; more are answered 503
    max_decode_bytes: int = 256 << 20  # an upload's decoded pixels, read from its header; more is refused (422)
    decode_workers: int = 1  # threads decoding uploads, apart from everything else
    max_decoding: int = 16  # uploads decoding or waiting to; more are answered 503
    allowed_hosts: tuple[str, ...] = ()  # Host names accepted besides loopback's and the bound host; "*": any
    header_timeout_s: float = 10.0  # a connection must send a request's head within this
    body_timeout_s: float = 30.0  # and then its body without pausing longer than this
    max_connections: int = 1024  # connections beyond this are closed at once
    review_db: str = ""  # SQLAlchemy URL of the duplicate decisions; empty: review.db in the data folder
    keep_rules: str = ""  # the ordered keep rules (core.review.KeepRules), comma-separated; empty: the default
