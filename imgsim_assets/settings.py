"""The environment, read once: where data lives and which encoder to use by default. The
defaults themselves belong to the core (``EncoderSpec`` and the encoder's ``RUN_DEFAULTS``,
in :mod:`core.models`, which imports no torch)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from imgsim_assets.core.models import RUN_DEFAULTS, EncoderSpec


@dataclass(frozen=True)
class Settings:
    data_dir: Path = Path("data")
    model: str = EncoderSpec.model
    weights: str = EncoderSpec.weights
    device: str = RUN_DEFAULTS["device"]
    milvus_uri: str = ""  # empty: a Milvus Lite file, <data>/milvus.db

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> "Settings":
        return cls(
            data_dir=Path(environ.get("IMGSIM_DATA_DIR", cls.data_dir)).expanduser().resolve(),
            model=environ.get("IMGSIM_MODEL", cls.model),
            weights=environ.get("IMGSIM_WEIGHTS", cls.weights),
            device=environ.get("IMGSIM_DEVICE", cls.device),
            milvus_uri=environ.get("IMGSIM_MILVUS_URI", cls.milvus_uri),
        )

    @property
    def images_dir(self) -> Path:
        return self.data_dir / "images"

    @property
    def assets_dir(self) -> Path:
        return self.data_dir / "assets"

    @property
    def dagster_home(self) -> Path:
        return self.data_dir / "dagster_home"
