"""Resources: the encoder, the preprocessing, and where files live. All editable in the launchpad."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Optional

from dagster import ConfigurableResource
from pydantic import Field

from imgsim_assets import policies
from imgsim_assets.core import dinov2, milvus
from imgsim_assets.core.encoder import Encoder, EncoderSpec
from imgsim_assets.core.images import Preprocess
from imgsim_assets.core.storage import DataLayout, remove_stale_temporaries


class EncoderResource(ConfigurableResource):
    """The DINOv2 model that turns pixels into vectors, and the device it runs on."""

    model: str = Field(default=EncoderSpec.model, description="dinov2_vit{s,b,l,g}14, optionally with _reg")
    weights: str = Field(default=EncoderSpec.weights, description="checkpoint path, 'auto' (the HF or torch hub "
                         "cache, else fetched from the Hugging Face hub or HF_ENDPOINT on first use) or 'random'")
    device: str = Field(default=Encoder.DEFAULTS["device"], description="auto (GPU when present), cpu, cuda or cuda:N")
    dtype: str = Field(default=Encoder.DEFAULTS["dtype"], description="auto (bf16 on GPU, and on a CPU with native "
                       "bf16 when backend is auto; else fp32), float32, bfloat16, float16")
    batch_size: int = Field(default=Encoder.DEFAULTS["batch_size"], description="images per forward pass")
    pooling: str = Field(default=EncoderSpec.pooling, description="; ".join(
        f"{name}: {p.description}" for name, p in dinov2.POOLINGS.items()))
    depth: Optional[int] = Field(default=EncoderSpec.depth, description="build only this many blocks (tests, smoke runs)")
    compile: bool = Field(default=Encoder.DEFAULTS["compile"], description="torch.compile the forward pass (pays off "
                          "on long GPU runs)")
    backend: str = Field(default=Encoder.DEFAULTS["backend"], description="where the forward pass runs: torch, "
                         "compile (torch.compile), onnxruntime, openvino, or auto (the fastest of them whose vectors "
                         "stay close to torch fp32's -- within 1e-4 in fp32, cosine 0.999 in bf16 -- measured once "
                         "on this machine)")
    ray_address: str = Field(default="", description="run the model on a Ray cluster: its head's host:port, "
                             "ray://host:10001, or 'auto' (this machine's cluster, else a new local one); empty: "
                             "in this process. Needs the [ray] extra")
    ray_actors: int = Field(default=0, description="encoder actors on the Ray cluster; 0: one per GPU, or one per "
                            "node with its CPUs")

    def spec(self) -> EncoderSpec:
        return EncoderSpec(model=self.model, weights=self.weights, pooling=self.pooling, depth=self.depth)

    def load(self, progress=None) -> Encoder:
        """The encoder (its model in Ray actors when ``ray_address`` is set: close it after
        use); ``progress`` receives lines while a checkpoint is fetched."""
        if self.ray_address:
            from imgsim_assets.core.distributed import RayEncoder

            return RayEncoder(self.spec(), self.ray_address, device=self.device, dtype=self.dtype,
                              batch_size=self.batch_size, compile=self.compile, actors=self.ray_actors,
                              progress=progress, backend=self.backend)
        return Encoder(self.spec(), device=self.device, dtype=self.dtype, batch_size=self.batch_size,
                       compile=self.compile, progress=progress, backend=self.backend)


class PreprocessResource(ConfigurableResource):
    """How files become fixed-size uint8 tensors (decode, EXIF, resize, crop)."""

    protocol: str = Field(default=Preprocess.protocol, description="dinov2_eval (resize+center crop) or grid (resize only)")
    crop_size: int = Preprocess.crop_size
    resize_size: int = Preprocess.resize_size
    grid_height: int = Preprocess.grid_size[0]
    grid_width: int = Preprocess.grid_size[1]
    draft: bool = Field(default=Preprocess.draft, description="JPEG DCT-domain downscale before decoding")
    max_pixels: int = Field(default=Preprocess.max_pixels, description="larger images are rejected as decompression bombs")
    max_file_bytes: int = Field(default=Preprocess.max_file_bytes, description="larger files are rejected unread (too_large)")
    max_decode_bytes: int = Field(default=Preprocess.max_decode_bytes, description="an image whose decoded pixels "
                                  "would take more (read from its header) is rejected (decompression_bomb)")
    workers: int = Field(default=0, description="decoding processes; 0 = one per CPU, 1 = inline")
    ray_address: str = Field(default="", description="decode in Ray tasks on this cluster instead (host:port, "
                             "ray://..., auto); the files must be at the same path on every node")

    def preprocess(self) -> Preprocess:
        return Preprocess(
            protocol=self.protocol,
            crop_size=self.crop_size,
            resize_size=self.resize_size,
            grid_size=(self.grid_height, self.grid_width),
            draft=self.draft,
            max_pixels=self.max_pixels,
            max_file_bytes=self.max_file_bytes,
            max_decode_bytes=self.max_decode_bytes,
        )


class StorageResource(ConfigurableResource):
    """The data root: ``images/`` (inputs), ``assets/`` (artifacts), ``dagster_home/``."""

    data_dir: str
    review_db: str = Field(default="", description="SQLAlchemy URL of the duplicate decisions (keep, set aside, "
                           "not duplicates); empty: the instance's PostgreSQL when it runs on one, else review.db "
                           "in the data folder")

    def decisions_url(self, instance) -> str:
        from imgsim_assets.instance import review_database_url
        from imgsim_assets.settings import Settings

        return review_database_url(Settings(data_dir=Path(self.data_dir), review_db=self.review_db), instance)

    @property
    def layout(self) -> DataLayout:
        return DataLayout(Path(self.data_dir))

    @property
    def images_dir(self) -> Path:
        return self.layout.images

    @property
    def assets_dir(self) -> Path:
        return self.layout.assets

    def batch_dir(self, batch: str) -> Path:
        path = (self.images_dir / batch).resolve()
        if path.parent != self.images_dir.resolve():
            raise ValueError(f"batch name {batch!r} does not name a folder directly under {self.images_dir}")
        return path

    def scratch_dir(self) -> Path:
        """Where artifacts and temporary files are written before they move into place; what
        killed writers left there over an hour ago is removed first."""
        staging = self.assets_dir / ".staging"
        staging.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(staging)
        return staging

    def staging_path(self, suffix: str) -> Path:
        """A fresh path for an artifact being written; the IO manager renames it into place."""
        return self.scratch_dir() / f".staged{suffix}.tmp-{uuid.uuid4().hex}"


class WatchResource(ConfigurableResource):
    """How the ``new_image_batches`` sensor decides that a batch folder is complete."""

    quiet_seconds: float = Field(default=policies.QUIET_SECONDS, description="a folder without _SUCCESS is complete "
                                 "after this long without changes")
    max_batches_per_tick: int = Field(default=policies.MAX_BATCHES_PER_TICK, description="folders examined per sensor "
                                      "tick (round-robin)")
    time_budget_seconds: float = Field(default=policies.TIME_BUDGET_SECONDS, description="stop examining folders after "
                                       "this long")


class MilvusResource(ConfigurableResource):
    """Where ``milvus_collection`` puts the vectors: a Milvus Lite file or a server/cluster URI."""

    uri: str = Field(default="", description="http(s)://host:19530 for a server; a .db path for Milvus Lite; "
                     "empty: a Milvus Lite file in the data root, milvus.db")
    token: str = Field(default="", description="user:password or API token for a server")
    collection: str = milvus.COLLECTION
    index_type: str = Field(default="FLAT", description="Milvus index type (FLAT works everywhere; "
                            "HNSW, IVF_FLAT, AUTOINDEX on servers)")
    timeout_seconds: float = 10.0

    def resolved_uri(self, data_dir: str) -> str:
        return self.uri or str(DataLayout(Path(data_dir)).milvus_lite)
