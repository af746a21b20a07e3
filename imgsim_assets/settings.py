"""The environment, read once: where data lives and which encoder to use by default. The
defaults themselves belong to the core (``EncoderSpec`` and the encoder's ``RUN_DEFAULTS``,
in :mod:`core.models`, which imports no torch)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping

from imgsim_assets.core.models import PRODUCT_BACKEND, RUN_DEFAULTS, EncoderSpec
from imgsim_assets.core.storage import DataLayout


@dataclass(frozen=True)
class Settings:
    data_dir: Path = Path("data")
    model: str = EncoderSpec.model
    weights: str = EncoderSpec.weights
    device: str = RUN_DEFAULTS["device"]
    milvus_uri: str = ""  # empty: a Milvus Lite file in the data root (DataLayout.milvus_lite)
    serve_token: str = ""  # the search service's token (prefer serve_token_file: the environment leaks less than argv)
    serve_token_file: str = ""
    review_db: str = ""  # SQLAlchemy URL of the duplicate decisions; empty: the instance's Postgres, else data/review.db
    keep_rules: str = ""  # the ordered keep rules, comma-separated (core.review.KeepRules); empty: the default
    executor: str = ""  # empty: Dagster's default (steps as processes); "k8s": one Kubernetes pod per step (deploy/)
    encoder_backend: str = PRODUCT_BACKEND  # where the model's forward pass runs (core.backends): auto, torch, ...
    encoder_dtype: str = RUN_DEFAULTS["dtype"]  # auto (bf16 on GPUs and on CPUs with native bf16 under auto), float32, ...
    ray_address: str = ""  # the Ray cluster image_embeddings runs the model on (host:port, ray://..., auto); empty: none

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> "Settings":
        return cls(
            data_dir=Path(environ.get("IMGSIM_DATA_DIR", cls.data_dir)).expanduser().resolve(),
            model=environ.get("IMGSIM_MODEL", cls.model),
            weights=environ.get("IMGSIM_WEIGHTS", cls.weights),
            device=environ.get("IMGSIM_DEVICE", cls.device),
            milvus_uri=environ.get("IMGSIM_MILVUS_URI", cls.milvus_uri),
            serve_token=environ.get("IMGSIM_SERVE_TOKEN", cls.serve_token),
            serve_token_file=environ.get("IMGSIM_SERVE_TOKEN_FILE", cls.serve_token_file),
            review_db=environ.get("IMGSIM_REVIEW_DB", cls.review_db),
            keep_rules=environ.get("IMGSIM_KEEP_RULES", cls.keep_rules),
            executor=environ.get("IMGSIM_EXECUTOR", cls.executor),
            ray_address=environ.get("IMGSIM_RAY_ADDRESS", cls.ray_address),
            encoder_backend=environ.get("IMGSIM_ENCODER_BACKEND", cls.encoder_backend),
            encoder_dtype=environ.get("IMGSIM_ENCODER_DTYPE", cls.encoder_dtype),
        )

    @property
    def layout(self) -> DataLayout:
        return DataLayout(self.data_dir)

    @property
    def images_dir(self) -> Path:
        return self.layout.images

    @property
    def assets_dir(self) -> Path:
        return self.layout.assets

    @property
    def dagster_home(self) -> Path:
        return self.layout.dagster_home

    @property
    def milvus(self) -> str:
        """The configured Milvus URI, else the data root's Milvus Lite file."""
        return self.milvus_uri or str(self.layout.milvus_lite)
