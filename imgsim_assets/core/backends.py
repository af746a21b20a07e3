"""Where the model's forward pass runs: PyTorch eager (``torch``), ``torch.compile`` (``compile``),
ONNX Runtime (``onnxruntime``) or OpenVINO (``openvino``), and ``auto``, the fastest of them on
this machine whose vectors stay close to PyTorch eager float32's: within :data:`FIDELITY_MAX_ABS`
per component in float32, at a cosine of at least :data:`BF16_MIN_COSINE` in bfloat16 (which the
encoder runs by default on CPUs that compute it natively, :func:`native_bf16`, as on GPUs).

Every backend runs the one model :func:`core.dinov2.load_dinov2` builds, with its weights: the
exported graphs are ``torch.onnx.export`` (dynamo) of that module, for a given input height ×
width with the batch size left free, cached under ``$XDG_CACHE_HOME/imgsim/graphs/`` by a key of
the model, its depth, the weights' fingerprint, the input size and the library versions (so a
change of any of them exports again; a written graph is renamed into place whole). ``auto``'s
choice is measured once per key on a batch of the real input size and remembered beside them.

A backend is a callable from uint8 ``N×3×H×W`` pixels to ``forward_features``'
``x_norm_clstoken`` and ``x_norm_patchtokens``: the ImageNet normalisation is its first step
(in PyTorch for ``torch`` and ``compile``, inside the exported graph for the others, so that
no PyTorch op, and none of its threads, runs between two of the runtime's calls); the encoder
pools and batches. ``dtype`` bfloat16 runs PyTorch under autocast, and OpenVINO at its bf16 inference
precision; ONNX Runtime has no bf16 CPU kernels and refuses it.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from imgsim_assets.core import dinov2

BACKENDS = ("torch", "compile", "onnxruntime", "openvino")
CHOICES = (*BACKENDS, "auto")
FIDELITY_MAX_ABS = 1e-4  # an fp32 backend's vectors against PyTorch eager's, per component
BF16_MIN_COSINE = 0.999  # a bf16 run's vectors against PyTorch eager fp32's, the lowest over images
AUTO_BATCH = 8  # images auto times each backend on
AUTO_ROUNDS = 3  # the fastest of this many passes counts

Features = dict[str, torch.Tensor]


def graphs_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "imgsim" / "graphs"


def available(backend: str) -> bool:
    """Whether ``backend``'s library is installed (torch's are always)."""
    module = {"onnxruntime": "onnxruntime", "openvino": "openvino"}.get(backend)
    if module is None:
        return backend in BACKENDS
    try:
        __import__(module)
    except ImportError:
        return False
    return True


BF16_ISAS = ("AVX512_CORE_BF16", "AVX512_CORE_FP16", "AVX10", "AVX512_CORE_AMX")  # oneDNN's names, and above


def native_bf16(cpuinfo: str | Path = "/proc/cpuinfo", environ=os.environ) -> bool:
    """Whether this CPU computes bf16 dot products in hardware (AVX-512 BF16 or AMX), where
    bf16 runs at up to twice the fp32 rate instead of being emulated more slowly, and oneDNN
    (PyTorch's and OpenVINO's kernels) is not held below them by ``ONEDNN_MAX_CPU_ISA``."""
    isa = environ.get("ONEDNN_MAX_CPU_ISA", "").upper()
    if isa not in ("", "ALL", "DEFAULT") and not isa.startswith(BF16_ISAS):
        return False
    try:
        flags = Path(cpuinfo).read_text()
    except OSError:
        return False
    return any(f" {flag}" in flags for flag in ("avx512_bf16", "amx_bf16"))


def normalize(pixels: torch.Tensor) -> torch.Tensor:
    """uint8 pixels → the model's float32 input (ImageNet mean and standard deviation)."""
    mean = torch.tensor(dinov2.IMAGENET_MEAN, device=pixels.device).view(1, 3, 1, 1) * 255
    std = torch.tensor(dinov2.IMAGENET_STD, device=pixels.device).view(1, 3, 1, 1) * 255
    return (pixels.float() - mean) / std


class _FeaturesModule(torch.nn.Module):
    """uint8 pixels → the model's ``forward_features`` as two tensor outputs (what an exporter takes)."""

    def __init__(self, model: torch.nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, pixels: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        features = self.model.forward_features(normalize(pixels))
        return features["x_norm_clstoken"], features["x_norm_patchtokens"]


class Backend:
    """One way of running ``model``: ``backend(x)`` → features. Exported graphs are built on the
    first batch of each input size (and read from the cache when they were built before)."""

    def __init__(self, name: str, model: torch.nn.Module, identity: dict, dtype: torch.dtype = torch.float32,
                 threads: int | None = None) -> None:
        if name not in BACKENDS:
            raise ValueError(f"unknown backend {name!r}; choose one of {', '.join(CHOICES)}")
        if name == "onnxruntime" and dtype != torch.float32:
            raise ValueError("the onnxruntime backend runs float32 only (it has no bf16 CPU kernels)")
        if not available(name):
            raise ValueError(f"the {name} backend needs its library, one of imgsim's dependencies: pip install {name}")
        self.name, self.model, self.identity, self.dtype = name, model, identity, dtype
        self.threads = threads or torch.get_num_threads()
        self._runners: dict[tuple[int, int], Callable[[torch.Tensor], Features]] = {}
        self._lock = threading.Lock()

    def __call__(self, x: torch.Tensor) -> Features:
        size = (int(x.shape[-2]), int(x.shape[-1]))
        runner = self._runners.get(size)
        if runner is None:
            with self._lock:
                runner = self._runners.get(size)
                if runner is None:
                    runner = self._runners[size] = self._build(size)
        return runner(x)

    def _build(self, size: tuple[int, int]) -> Callable[[torch.Tensor], Features]:
        if self.name == "torch":
            return lambda pixels: self.model.forward_features(normalize(pixels))
        if self.name == "compile":
            forward = torch.compile(self.model.forward_features)
            return lambda pixels: forward(normalize(pixels))
        graph = export_onnx(self.model, self.identity, size)
        if self.name == "onnxruntime":
            return _onnxruntime(graph, self.threads)
        return _OpenVINO(graph, self.threads, self.dtype)


def graph_key(identity: dict, size: tuple[int, int]) -> str:
    """The cache key of an exported graph: what the model computes, the input size, the versions."""
    import onnx

    described = {**identity, "size": list(size), "torch": torch.__version__, "onnx": onnx.__version__, "format": 2}
    return hashlib.sha256(json.dumps(described, sort_keys=True, default=str).encode()).hexdigest()[:20]


def export_onnx(model: torch.nn.Module, identity: dict, size: tuple[int, int]) -> Path:
    """``model.forward_features`` as an ONNX graph for ``size`` inputs (any batch size), from
    the cache or exported now and put there whole."""
    folder = graphs_dir() / graph_key(identity, size)
    graph = folder / "model.onnx"
    if graph.is_file():
        return graph
    folder.parent.mkdir(parents=True, exist_ok=True)
    work = folder.with_name(f"{folder.name}.tmp-{os.getpid()}-{threading.get_ident()}")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir()
    try:
        example = torch.zeros(2, 3, *size, dtype=torch.uint8)
        batch = torch.export.Dim("batch", min=1)
        # float32, whatever the caller runs under (the encoder's bf16 autocast): precision is the runtime's choice
        with torch.inference_mode(False), torch.no_grad(), torch.autocast("cpu", enabled=False):
            program = torch.onnx.export(_FeaturesModule(model).eval(), (example,), dynamo=True,
                                        dynamic_shapes=({0: batch},), input_names=["pixels"],
                                        output_names=["cls", "patches"], verbose=False)
        program.save(str(work / "model.onnx"))
        (work / "identity.json").write_text(json.dumps({**identity, "size": list(size)}, default=str))
        try:
            os.replace(work, folder)  # another process may have put the same graph there first
        except OSError:
            if not graph.is_file():
                raise
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return graph


def _onnxruntime(graph: Path, threads: int) -> Callable[[torch.Tensor], Features]:
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(str(graph), options, providers=["CPUExecutionProvider"])

    def run(x: torch.Tensor) -> Features:
        cls, patches = session.run(None, {"pixels": np.ascontiguousarray(x.cpu().numpy())})
        return {"x_norm_clstoken": torch.from_numpy(cls), "x_norm_patchtokens": torch.from_numpy(patches)}

    return run


class _OpenVINO:
    """The graph compiled by OpenVINO twice over, each version when first needed: for a batch
    of at least as many images as it has streams, in throughput mode (several streams, each
    on its own cores, running a share of the batch at once: on 2 cores 1.16× latency mode's
    images/s, which its threads spend waiting on each other between the many small ops of a
    ViT); for fewer images (a single query), in latency mode (every thread on one request)."""

    def __init__(self, graph: Path, threads: int, dtype: torch.dtype) -> None:
        import openvino as ov

        self.core = ov.Core()
        self.core.set_property({"CACHE_DIR": str(graph.parent / "openvino")})  # its compiled blobs, next time
        self.graph = graph
        # bf16 where the CPU computes it; elsewhere OpenVINO would run f32 anyway, or find no kernel
        # when oneDNN is held below the CPU's bf16 instructions
        bf16 = dtype == torch.bfloat16 and native_bf16()
        self.config = {"INFERENCE_PRECISION_HINT": "bf16" if bf16 else "f32",
                       "INFERENCE_NUM_THREADS": threads}
        self._compiled: dict[str, object] = {}
        self._streams: int | None = None
        self._lock = threading.Lock()
        self._local = threading.local()  # an infer request serves one call at a time: each thread has its own

    def compiled(self, hint: str):
        with self._lock:
            if hint not in self._compiled:
                self._compiled[hint] = self.core.compile_model(str(self.graph), "CPU",
                                                               {**self.config, "PERFORMANCE_HINT": hint})
            return self._compiled[hint]

    @property
    def streams(self) -> int:
        """How many requests throughput mode runs at once (OpenVINO's choice for these threads)."""
        if self._streams is None:
            self._streams = int(self.compiled("THROUGHPUT").get_property("OPTIMAL_NUMBER_OF_INFER_REQUESTS"))
        return self._streams

    def _requests(self, hint: str, count: int) -> list:
        """``count`` infer requests of ``hint``'s version, this thread's own."""
        mine = getattr(self._local, hint, None)
        if mine is None:
            mine = []
            setattr(self._local, hint, mine)
        while len(mine) < count:
            mine.append(self.compiled(hint).create_infer_request())
        return mine[:count]

    def __call__(self, x: torch.Tensor) -> Features:
        pixels = np.ascontiguousarray(x.cpu().numpy())
        # a single image never asks for the streams: a process that only answers single queries
        # compiles the latency version alone
        shared = len(pixels) > 1 and len(pixels) >= self.streams > 1
        hint = "THROUGHPUT" if shared else "LATENCY"
        parts = np.array_split(pixels, self.streams if shared else 1)
        requests = self._requests(hint, len(parts))
        for request, part in zip(requests, parts):
            request.start_async({0: np.ascontiguousarray(part)})
        outputs = []
        for request in requests:
            request.wait()
            outputs.append([np.array(request.get_output_tensor(i).data) for i in range(2)])  # copied: buffers are reused
        cls, patches = (np.concatenate([out[i] for out in outputs]) for i in range(2))
        return {"x_norm_clstoken": torch.from_numpy(cls), "x_norm_patchtokens": torch.from_numpy(patches)}


def choose(model: torch.nn.Module, identity: dict, size: tuple[int, int], dtype: torch.dtype = torch.float32,
           threads: int | None = None, candidates: tuple[str, ...] = BACKENDS) -> tuple[dict, Backend | None]:
    """``auto``: each installed backend that runs ``dtype`` timed on a batch of ``size`` inputs,
    and the fastest whose vectors stay close to PyTorch eager float32's (:func:`agreement`).
    The finding is remembered per graph key, dtype and thread count: ``{"backend", "measured":
    {name: {...}}}``; with it, the chosen backend as built for the measurement (None when the
    finding was read)."""
    threads = threads or torch.get_num_threads()
    label = str(dtype).removeprefix("torch.")
    record = graphs_dir() / f"auto-{graph_key(identity, size)}-{label}-{threads}.json"
    if record.is_file():
        return json.loads(record.read_text()), None
    x = torch.randint(0, 256, (AUTO_BATCH, 3, *size), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    with torch.inference_mode(), torch.autocast("cpu", enabled=False):
        reference = model.forward_features(normalize(x))
    measured, built = {}, {}
    for name in candidates:
        try:
            backend = Backend(name, model, identity, dtype=dtype, threads=threads)
        except ValueError as e:  # not installed, or not in this dtype
            measured[name] = {"skipped": str(e)}
            continue
        try:
            with torch.inference_mode(), torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
                started = time.perf_counter()
                out = backend(x)  # built, and the first pass
                first = time.perf_counter() - started
                times = []
                for _ in range(AUTO_ROUNDS):
                    started = time.perf_counter()
                    out = backend(x)
                    times.append(time.perf_counter() - started)
        except Exception as e:  # noqa: BLE001 -- a backend that cannot run this model is left out, with why
            measured[name] = {"skipped": f"{type(e).__name__}: {e}"[:300]}
            continue
        built[name] = backend
        measured[name] = {"images_per_second": round(AUTO_BATCH / min(times), 2), "first_call_s": round(first, 2),
                          **agreement(out, reference)}
    within = {n: m for n, m in measured.items() if "images_per_second" in m and close_enough(m, dtype)}
    if not within:
        raise RuntimeError(f"no encoder backend runs {label} within its fidelity bound here: {measured}")
    found = {"backend": max(within, key=lambda n: within[n]["images_per_second"]), "dtype": label,
             "measured": measured, "batch": AUTO_BATCH, "threads": threads}
    record.parent.mkdir(parents=True, exist_ok=True)
    temporary = record.with_name(record.name + f".tmp-{os.getpid()}")
    temporary.write_text(json.dumps(found, indent=1))
    os.replace(temporary, record)
    return found, built[found["backend"]]


def agreement(out: Features, reference: Features) -> dict:
    """How close ``out`` is to ``reference`` (PyTorch eager float32): the largest difference of a
    class-token component, and the lowest cosine over images of the class token and of the mean
    patch token (the two things every pooling is made of)."""
    lowest = 1.0
    for pick in (lambda f: f["x_norm_clstoken"], lambda f: f["x_norm_patchtokens"].mean(dim=1)):
        a, b = pick(out).float(), pick(reference).float()
        lowest = min(lowest, float(torch.nn.functional.cosine_similarity(a, b, dim=-1).min()))
    cls = (out["x_norm_clstoken"].float() - reference["x_norm_clstoken"].float()).abs().max()
    return {"max_abs_diff": float(cls), "lowest_cosine": round(lowest, 7)}


def close_enough(measured: dict, dtype: torch.dtype) -> bool:
    """Whether an :func:`agreement` is within ``dtype``'s bound."""
    if dtype == torch.float32:
        return measured["max_abs_diff"] <= FIDELITY_MAX_ABS
    return measured["lowest_cosine"] >= BF16_MIN_COSINE
