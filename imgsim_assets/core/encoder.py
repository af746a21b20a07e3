"""uint8 image tensors → L2-normalised DINOv2 vectors, in batches, on whatever device is there."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Callable, Iterable, Iterator

import numpy as np
import torch

from imgsim_assets.core import dinov2

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass(frozen=True)
class EncoderSpec:
    """Everything that decides what vector an image gets. Recorded with every vector."""

    model: str = "dinov2_vits14"
    weights: str = "auto"
    pooling: str = "cls"
    depth: int | None = None

    def __post_init__(self) -> None:
        if self.model not in dinov2.VARIANTS:
            raise ValueError(f"unknown DINOv2 model {self.model!r}; choose one of {', '.join(dinov2.VARIANTS)}")
        if self.pooling not in dinov2.POOLINGS:
            raise ValueError(f"unknown pooling {self.pooling!r}; choose one of {', '.join(dinov2.POOLINGS)}")

    @property
    def dim(self) -> int:
        return dinov2.pooled_dim(dinov2.VARIANTS[self.model].embed_dim, self.pooling)

    def describe(self) -> dict:
        return asdict(self)


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} was requested but CUDA is not available on this machine")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


class Encoder:
    """A loaded model plus the normalisation and pooling that turn pixels into vectors."""

    def __init__(self, spec: EncoderSpec, device: str = "auto", dtype: str = "auto", batch_size: int = 64) -> None:
        self.spec = spec
        self.device = resolve_device(device)
        self.dtype = resolve_dtype(dtype, self.device)
        self.batch_size = batch_size
        self.weights_file = dinov2.resolve_weights(spec.model, spec.weights)
        self.model = dinov2.load_dinov2(spec.model, self.weights_file, depth=spec.depth).to(self.device)
        self._mean = torch.tensor(dinov2.IMAGENET_MEAN, device=self.device).view(1, 3, 1, 1) * 255
        self._std = torch.tensor(dinov2.IMAGENET_STD, device=self.device).view(1, 3, 1, 1) * 255

    @property
    def random_weights(self) -> bool:
        return self.weights_file == "random"

    def provenance(self) -> dict:
        return {**self.spec.describe(), "weights_file": self.weights_file, "dim": self.spec.dim}

    @torch.inference_mode()
    def embed(self, pixels: np.ndarray | torch.Tensor) -> np.ndarray:
        """uint8 ``N×3×H×W`` → float32 ``N×D`` unit vectors."""
        x = torch.as_tensor(np.ascontiguousarray(pixels) if isinstance(pixels, np.ndarray) else pixels)
        if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected uint8 N×3×H×W pixels, got {x.dtype} {tuple(x.shape)}")
        if self.device.type == "cuda":
            x = x.pin_memory().to(self.device, non_blocking=True)
        x = (x.float() - self._mean) / self._std
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            feats = self.model.forward_features(x)
        return dinov2.pool(feats, self.spec.pooling).cpu().numpy().astype(np.float32, copy=False)

    def embed_batches(
        self,
        batches: Iterable[tuple[np.ndarray, np.ndarray]],
        progress: Callable[[int, float], None] | None = None,
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Stream ``(ids, pixels)`` batches to ``(ids, vectors)``; ``progress(done, seconds)`` after each."""
        done, start = 0, time.perf_counter()
        for ids, pixels in batches:
            vectors = self.embed(pixels)
            done += len(ids)
            if progress is not None:
                progress(done, time.perf_counter() - start)
            yield ids, vectors
