"""Decoding and embedding on a Ray cluster.

:func:`preprocess_files_on_ray` decodes a batch's files in Ray tasks on the cluster's CPUs (the
files must be at the same path on every node: a shared volume), the records and pixels coming
back in the files' order, as :func:`core.images.preprocess_files` gives them locally. The model
runs in encoder actors (one model load per actor, one GPU each where the cluster has GPUs);
pixel batches are sent to them as they are read and the vectors come back in the order the
batches went out.

:class:`RayEncoder` answers what the pipeline asks of :class:`core.encoder.Encoder`
(``embed_batches``, ``provenance``, the weights and model facts), so ``image_embeddings`` writes
the same Parquet with the same provenance whichever runs the model. An actor whose process dies
is restarted by Ray and its unfinished batches are sent again (``max_restarts``,
``max_task_retries``); each batch's vectors are taken once, in order, so nothing is lost or
written twice. When Ray gives up, the error names the batch and why.

Ray is an optional extra (``pip install 'imgsim[ray]'``); nothing here imports it until a
cluster is asked for.
"""

from __future__ import annotations

import os
import time
from collections import deque
from dataclasses import asdict
from typing import Callable, Iterable, Iterator

import numpy as np

from imgsim_assets.core.images import ImageRecord, Preprocess, preprocess_file
from imgsim_assets.core.models import EncoderSpec

RAY_MISSING = "Ray is not installed: pip install 'imgsim[ray]' (make RAY=1 install)"
IN_FLIGHT_PER_ACTOR = 2  # batches queued at each actor: the next one is there when the model is free
ACTOR_RESTARTS = 3  # an encoder actor whose process dies is started again this many times...
TASK_RETRIES = 3  # ... and a batch it was given is sent again this many times


def connect(address: str):
    """The ``ray`` module, connected to the cluster at ``address`` (``host:port`` of its head,
    ``ray://host:10001`` through Ray Client, or ``auto``: the cluster this machine belongs to,
    else a new local one)."""
    try:
        import ray
    except ImportError:
        raise RuntimeError(RAY_MISSING) from None
    if ray.is_initialized():
        return ray
    options = dict(namespace="imgsim", logging_level="WARNING", log_to_driver=False)
    if address == "auto":
        try:
            ray.init(address="auto", **options)
        except ConnectionError:  # no cluster running here: start one for this process
            ray.init(include_dashboard=False, **options)
    else:
        ray.init(address=address, **options)
    return ray


DECODE_CHUNK = 32  # files per decoding task
DECODE_TASKS_PER_CPU = 2  # decoding tasks queued per CPU of the cluster


def _decode_chunk(paths: list[str], root: str, pre: Preprocess) -> list[tuple[ImageRecord, np.ndarray | None]]:
    return [preprocess_file(p, root, pre) for p in paths]


def preprocess_files_on_ray(paths: Iterable[str | os.PathLike], root: str | os.PathLike, pre: Preprocess,
                            address: str, chunk: int = DECODE_CHUNK) -> Iterator[tuple[ImageRecord, np.ndarray | None]]:
    """``core.images.preprocess_files`` with the decoding in Ray tasks (one CPU each, retried by
    Ray when their worker dies): every file once, in order, rejected ones with their reason. At
    most ``DECODE_TASKS_PER_CPU`` chunks per CPU of the cluster are decoded ahead of the reader."""
    ray = connect(address)
    decode = ray.remote(num_cpus=1, max_retries=TASK_RETRIES)(_decode_chunk)
    paths, root = [os.fsdecode(p) for p in paths], os.fsdecode(root)
    chunks = (paths[i : i + chunk] for i in range(0, len(paths), chunk))
    ahead = max(1, int(ray.cluster_resources().get("CPU", 1)) * DECODE_TASKS_PER_CPU)
    pre_ref = ray.put(pre)
    submitted = ((part, decode.remote(part, root, pre_ref)) for part in chunks)
    for _, records in _in_order(ray, submitted, ahead, lambda part: f"decoding {len(part)} files from {part[0]}"):
        yield from records


def _in_order(ray, submitted: Iterable[tuple[object, object]], ahead: int,
              what: Callable[[object], str]) -> Iterator[tuple[object, object]]:
    """``(key, object ref or None)`` pairs → ``(key, result or None)``, in the order given, with at
    most ``ahead`` submitted and not yet taken (``submitted`` is drawn from only as results are
    taken). A ref Ray gave up on raises RuntimeError naming ``what(key)`` and why."""
    pending: deque = deque()

    def take():
        key, ref = pending.popleft()
        try:
            return key, None if ref is None else ray.get(ref)
        except Exception as e:  # noqa: BLE001 -- Ray gave up on the task or the actor
            raise RuntimeError(f"{what(key)} failed on Ray after {TASK_RETRIES} retries: {_cause(e)}") from e

    for item in submitted:
        pending.append(item)
        if len(pending) >= ahead:
            yield take()
    while pending:
        yield take()


class _EncoderActor:
    """One loaded model in a Ray worker process."""

    def __init__(self, spec: dict, device: str, dtype: str, batch_size: int, compile: bool, threads: int,
                 backend: str = "torch") -> None:
        import torch

        from imgsim_assets.core.encoder import Encoder

        if threads > 0:
            torch.set_num_threads(threads)
        self.encoder = Encoder(EncoderSpec(**spec), device=device, dtype=dtype, batch_size=batch_size,
                               compile=compile, backend=backend)

    def describe(self) -> dict:
        e = self.encoder
        return {"provenance": e.provenance(), "weights_file": e.weights_file,
                "weights_fingerprint": e.weights_fingerprint, "device": str(e.device), "dtype": str(e.dtype),
                "pid": os.getpid()}

    def embed(self, pixels: np.ndarray) -> tuple[np.ndarray, float]:
        """Vectors of a uint8 N×3×H×W batch, and the seconds the model took."""
        before = self.encoder.model_seconds
        vectors = self.encoder.embed(pixels)
        return vectors, self.encoder.model_seconds - before

    def pid(self) -> int:
        return os.getpid()


class RayEncoder:
    """The encoder's model in ``actors`` Ray actors on the cluster at ``address`` (0: one per
    GPU when the cluster has GPUs and ``device`` allows them, else one per node, each with that
    node's CPUs)."""

    def __init__(
        self,
        spec: EncoderSpec,
        address: str,
        device: str = "auto",
        dtype: str = "auto",
        batch_size: int = 64,
        compile: bool = False,
        actors: int = 0,
        progress: Callable[[str], None] | None = None,
        backend: str = "torch",
    ) -> None:
        import torch

        ray = connect(address)
        self._ray = ray
        self.spec = spec
        self.batch_size = batch_size
        self.model_seconds = 0.0
        gpus = int(ray.cluster_resources().get("GPU", 0)) if device != "cpu" else 0
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        if gpus:
            count, cpus, per_gpu = actors or gpus, 1, 1
        else:
            node_cpus = [int(n.get("Resources", {}).get("CPU", 0)) for n in nodes] or [1]
            count, per_gpu = actors or len(nodes), 0
            cpus = max(1, min(node_cpus) if not actors else sum(node_cpus) // actors)
        remote = ray.remote(max_restarts=ACTOR_RESTARTS, max_task_retries=TASK_RETRIES)(_EncoderActor)
        arguments = (asdict(spec), device, dtype, batch_size, compile, cpus, backend)
        self._actors = [remote.options(num_cpus=cpus, num_gpus=per_gpu).remote(*arguments) for _ in range(count)]
        if progress is not None:
            progress(f"Ray at {address}: {count} encoder actor(s), {cpus} CPU(s)"
                     f"{' and 1 GPU' if per_gpu else ''} each, on {len(nodes)} node(s)")
        try:
            described = ray.get([a.describe.remote() for a in self._actors])  # the models loaded
        except Exception as e:  # noqa: BLE001 -- an actor that cannot load the model says why
            self.close()
            raise RuntimeError(f"the Ray encoder actors could not load {spec.model}: {_cause(e)}") from e
        first = described[0]
        self.weights_file = first["weights_file"]
        self.weights_fingerprint = first["weights_fingerprint"]
        self.device = torch.device(first["device"])
        self.dtype = getattr(torch, first["dtype"].removeprefix("torch."))
        self._provenance = first["provenance"]
        fingerprints = {d["weights_fingerprint"] for d in described}
        if len(fingerprints) > 1:
            self.close()
            raise RuntimeError(f"the Ray encoder actors loaded different weights: {sorted(fingerprints)}")

    @property
    def random_weights(self) -> bool:
        return self.weights_file == "random"

    @property
    def actors(self) -> int:
        return len(self._actors)

    def provenance(self) -> dict:
        return dict(self._provenance)

    def actor_pids(self) -> list[int]:
        return self._ray.get([a.pid.remote() for a in self._actors])

    def embed_batches(
        self,
        batches: Iterable[tuple[np.ndarray, np.ndarray]],
        progress: Callable[[int, float], None] | None = None,
    ) -> Iterator[tuple[np.ndarray, np.ndarray]]:
        """``(ids, pixels)`` batches → ``(ids, vectors)``, in the order given; ``progress(done,
        seconds)`` after each. Up to ``IN_FLIGHT_PER_ACTOR`` batches wait at each actor."""
        actors = self._actors
        submitted = (((i, ids), actors[i % len(actors)].embed.remote(np.ascontiguousarray(pixels)) if len(pixels)
                      else None) for i, (ids, pixels) in enumerate(batches))
        done, start = 0, time.perf_counter()
        for (i, ids), result in _in_order(self._ray, submitted, IN_FLIGHT_PER_ACTOR * len(actors),
                                          lambda key: f"model batch {key[0]} ({len(key[1])} images)"):
            vectors = np.zeros((0, self.spec.dim), np.float32)
            if result is not None:
                vectors, seconds = result
                self.model_seconds += seconds
            done += len(ids)
            if progress is not None:
                progress(done, time.perf_counter() - start)
            yield ids, vectors

    def close(self) -> None:
        """Stop the actors (their GPUs and memory go back to the cluster)."""
        for actor in getattr(self, "_actors", []):
            try:
                self._ray.kill(actor, no_restart=True)
            except Exception:  # noqa: BLE001 -- already gone
                pass
        self._actors = []


def _cause(error: Exception) -> str:
    text = str(error).strip().splitlines()
    return text[-1] if text else type(error).__name__
