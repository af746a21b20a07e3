"""uint8 image tensors → L2-normalised DINOv2 vectors, in batches, on whatever device is there."""

from __future__ import annotations

import os
import queue
import threading
import time
from typing import Callable, Iterable, Iterator, TypeVar

import numpy as np
import torch

from imgsim_assets.core import backends, dinov2, weights
from imgsim_assets.core.models import RUN_DEFAULTS, EncoderSpec  # noqa: F401  (EncoderSpec re-exported)
from imgsim_assets.core.images import ImageRecord, Preprocess, preprocess_files
from imgsim_assets.core.images.protocol import LIMITS

T = TypeVar("T")
K = TypeVar("K")  # what identifies a batch: its ids, or its file records

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


IDENTITY_KEYS = ("model", "pooling", "depth", "preprocess")


def same_encoder(a: dict, b: dict) -> bool:
    """Whether vectors with provenance ``a`` and ``b`` are comparable: the same model, weights
    (by fingerprint; by file where one side predates fingerprints), pooling, depth and
    preprocessing. The dtype is recorded, not compared: an index built in bf16 on a GPU is
    searched in fp32 from CPUs."""
    if any(_meaning(a, k) != _meaning(b, k) for k in IDENTITY_KEYS):
        return False
    if a.get("weights_fingerprint") and b.get("weights_fingerprint"):
        return a["weights_fingerprint"] == b["weights_fingerprint"]
    return a.get("weights_file") == b.get("weights_file")


def _meaning(provenance: dict, key: str):
    """``provenance[key]``, for preprocessing without the limits (what is refused, not how)."""
    value = provenance.get(key)
    if key == "preprocess" and isinstance(value, dict):
        return {k: v for k, v in value.items() if k not in LIMITS}
    return value


def describe_encoder(provenance: dict) -> str:
    """One line naming an encoder: model, weights fingerprint and file, pooling, dtype."""
    weights_file = str(provenance.get("weights_file") or "?")
    return (f"{provenance.get('model')}{f' depth={d}' if (d := provenance.get('depth')) else ''}, weights "
            f"{weights.short(provenance.get('weights_fingerprint'))} ({weights_file.rsplit('/', 1)[-1]}), "
            f"pooling {provenance.get('pooling')}" + (f", {provenance['dtype']}" if provenance.get("dtype") else ""))


def resolve_device(device: str = "auto") -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device {device!r} was requested but CUDA is not available on this machine")
    return torch.device(device)


def resolve_dtype(dtype: str, device: torch.device, backend: str = "torch") -> torch.dtype:
    """``auto``: bf16 on a GPU, and on a CPU that computes bf16 natively when the backend is
    ``auto`` too (the product's default: the fastest path, judged on retrieval by
    ``bench.backends``); float32 otherwise, which a named backend keeps for the official
    numbers."""
    if dtype == "auto":
        if device.type == "cuda" or (device.type == "cpu" and backend == "auto" and backends.native_bf16()):
            return torch.bfloat16
        return torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"unknown dtype {dtype!r}; choose auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


class Encoder:
    """A loaded model plus the normalisation and pooling that turn pixels into vectors.

    Input pipelines (reading Parquet, decoding files) run ahead in a background thread, and
    on a GPU their batches are pinned there, so the model never waits for the next batch.
    ``compile=True`` wraps the forward pass in ``torch.compile`` (first batch is slow).
    """

    DEFAULTS = RUN_DEFAULTS  # how an encoder runs, not what it computes (that is the spec)

    def __init__(
        self,
        spec: EncoderSpec,
        device: str = DEFAULTS["device"],
        dtype: str = DEFAULTS["dtype"],
        batch_size: int = DEFAULTS["batch_size"],
        compile: bool = DEFAULTS["compile"],
        progress: weights.Progress | None = None,
        backend: str = DEFAULTS["backend"],
    ) -> None:
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1, got {batch_size}")
        self.spec = spec
        self.device = resolve_device(device)
        self.backend_requested = "compile" if compile else backend
        self.dtype = resolve_dtype(dtype, self.device, self.backend_requested)
        self.batch_size = batch_size
        self.weights_file = weights.resolve(spec.model, spec.weights, progress)
        self.weights_fingerprint = weights.fingerprint(self.weights_file, spec.model)
        self.model = dinov2.load_dinov2(spec.model, self.weights_file, depth=spec.depth).to(self.device)
        if backend not in backends.CHOICES:
            raise ValueError(f"unknown encoder backend {backend!r}; choose one of {', '.join(backends.CHOICES)}")
        if backend in ("onnxruntime", "openvino") and self.device.type != "cpu":
            raise ValueError(f"the {backend} backend runs on the CPU, not on {self.device}")
        self.backend: backends.Backend | None = None  # built on the first batch (auto measures on its size)
        self.backend_choice: dict | None = None  # what auto measured, when it chose
        self.model_seconds = 0.0  # spent in embed() so far: the model's share of a run

    @property
    def random_weights(self) -> bool:
        return self.weights_file == "random"

    def close(self) -> None:
        """Nothing to give back (a :class:`core.distributed.RayEncoder` stops its actors)."""

    def provenance(self) -> dict:
        return {**self.spec.describe(), "weights_file": self.weights_file,
                "weights_fingerprint": self.weights_fingerprint, "dtype": str(self.dtype).removeprefix("torch."),
                "dim": self.spec.dim}

    def _host_tensor(self, pixels: np.ndarray | torch.Tensor) -> torch.Tensor:
        x = torch.from_numpy(np.ascontiguousarray(pixels)) if isinstance(pixels, np.ndarray) else pixels
        if x.dtype != torch.uint8 or x.ndim != 4 or x.shape[1] != 3:
            raise ValueError(f"expected uint8 N×3×H×W pixels, got {x.dtype} {tuple(x.shape)}")
        if self.device.type == "cuda" and not x.is_cuda and not x.is_pinned():
            x = x.pin_memory()
        return x

    @torch.inference_mode()
    def embed(self, pixels: np.ndarray | torch.Tensor) -> np.ndarray:
        """uint8 ``N×3×H×W`` (host or device) → float32 ``N×D`` unit vectors."""
        return self._embed(pixels, patches=False)[0]

    @torch.inference_mode()
    def embed_with_patches(self, pixels: np.ndarray | torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`embed`, plus each image's patch tokens as float32 ``N×P×D`` unit vectors
        (``P`` = the patch grid's rows × columns, row by row), from the same model call."""
        return self._embed(pixels, patches=True)

    def _embed(self, pixels, patches: bool) -> tuple[np.ndarray, np.ndarray | None]:
        began = time.perf_counter()
        x = self._host_tensor(pixels).to(self.device, non_blocking=True)  # uint8: the backend normalises
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            feats = self._features(x)
        vectors = dinov2.pool(feats, self.spec.pooling).cpu().numpy().astype(np.float32, copy=False)
        tokens = None
        if patches:
            tokens = torch.nn.functional.normalize(feats["x_norm_patchtokens"].float(), dim=-1).cpu().numpy()
        self.model_seconds += time.perf_counter() - began  # .cpu() waited for the device
        return vectors, tokens

    def _features(self, x: torch.Tensor) -> dict[str, torch.Tensor]:
        if self.backend is None:
            name, measured = self.backend_requested, None
            if name == "auto":  # PyTorch off the CPU or in float16; else what measures fastest here
                name = "torch"
                if self.device.type == "cpu" and self.dtype in (torch.float32, torch.bfloat16):
                    self.backend_choice, measured = backends.choose(self.model, self.graph_identity(),
                                                                    tuple(x.shape[-2:]), self.dtype)
                    name = self.backend_choice["backend"]
            # The one auto measured is built already (a second OpenVINO compile or torch.compile saved).
            self.backend = measured or backends.Backend(name, self.model, self.graph_identity(), dtype=self.dtype)
        return self.backend(x)

    def graph_identity(self) -> dict:
        """What an exported graph of this model depends on (core.backends caches by it)."""
        return {"model": self.spec.model, "depth": self.spec.depth, "weights_fingerprint": self.weights_fingerprint}

    def embed_batches(
        self,
        batches: Iterable[tuple[np.ndarray, np.ndarray]],
        progress: Callable[[int, float], None] | None = None,
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """Stream ``(ids, pixels)`` batches to ``(ids, vectors)``; ``progress(done, seconds)`` after each.

        ``batches`` is consumed in a background thread, one batch ahead of the model.
        """
        return self._stream(batches, progress)

    def embed_files(
        self,
        paths: Iterable[str | os.PathLike],
        pre: Preprocess,
        root: str | os.PathLike,
        workers: int = 0,
        progress: Callable[[int, float], None] | None = None,
    ) -> Iterator[tuple[list[ImageRecord], np.ndarray]]:
        """Image files → ``(records, vectors)`` per model batch, decoding in worker processes.

        ``records`` are every file seen since the previous batch, rejected ones included;
        ``vectors`` belong to the ``ok`` ones, in order. Nothing is lost: each file ends up in
        exactly one ``records`` list.
        """
        batches = _pixel_batches(preprocess_files(paths, root, pre, workers=workers), self.batch_size)
        return self._stream(batches, progress)

    def _stream(self, batches: Iterable[tuple[K, np.ndarray]], progress) -> Iterator[tuple[K, np.ndarray]]:
        """``(key, pixels)`` → ``(key, vectors)``, the source read one batch ahead in a thread;
        ``progress(done, seconds)`` counts ``len(key)`` per batch."""
        host = ((key, self._host_tensor(pixels)) for key, pixels in batches)
        done, start = 0, time.perf_counter()
        for key, pixels in prefetch(host):
            vectors = self.embed(pixels) if len(pixels) else np.zeros((0, self.spec.dim), np.float32)
            done += len(key)
            if progress is not None:
                progress(done, time.perf_counter() - start)
            yield key, vectors


def _pixel_batches(
    results: Iterable[tuple[ImageRecord, np.ndarray | None]], batch_size: int
) -> Iterator[tuple[list[ImageRecord], np.ndarray]]:
    records: list[ImageRecord] = []
    pixels: list[np.ndarray] = []
    for record, px in results:
        records.append(record)
        if px is not None:
            pixels.append(px)
            if len(pixels) == batch_size:
                yield records, np.stack(pixels)
                records, pixels = [], []
    if records:
        yield records, (np.stack(pixels) if pixels else np.zeros((0, 3, 1, 1), np.uint8))


_DONE = object()


def prefetch(items: Iterable[T], depth: int = 2) -> Iterator[T]:
    """Iterate ``items`` in a background thread, up to ``depth`` items ahead of the consumer.

    Exceptions from ``items`` are re-raised in the consumer; stopping early stops the thread
    and closes ``items``.
    """
    buffer: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item) -> bool:
        while not stop.is_set():
            try:
                buffer.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        iterator = iter(items)
        try:
            for item in iterator:
                if not put((item, None)):
                    break
        except BaseException as e:  # handed to the consumer
            put((_DONE, e))
            return
        finally:
            close = getattr(iterator, "close", None)
            if close is not None:
                close()
        put((_DONE, None))

    thread = threading.Thread(target=produce, name="imgsim-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item, error = buffer.get()
            if item is _DONE:
                if error is not None:
                    raise error
                return
            yield item
    finally:
        stop.set()
        thread.join()


def check_same_encoder(provenances: dict[str, dict], expected: dict | None = None) -> dict:
    """The encoder every batch's embeddings were made with (``expected``, else the first
    batch's); batches made with another cannot share one index, and say so."""
    reference = expected if expected is not None else next(iter(provenances.values()), {})
    differing = sorted(b for b, p in provenances.items() if not same_encoder(p, reference))
    if differing:
        raise ValueError(
            "image_embeddings were made with different encoders and cannot share one index. "
            f"Expected {describe_encoder(reference)}; batches {differing} differ, e.g. "
            f"{describe_encoder(provenances[differing[0]])}. Re-embed them with one encoder "
            "(imgsim ingest --retrain)."
        )
    return reference
