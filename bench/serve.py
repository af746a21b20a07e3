"""The search service under load: ``imgsim serve`` over a large index vs the same work in-process.

    python -m bench.serve [--vectors 1000000] [--dim 384] [--seconds 5] [--clients 16]

Index: ``--vectors`` synthetic embeddings (``bench.index.mixture``: Zipf-sized clusters in a
shared low-rank subspace, L2-normalised) under random 63-bit image_ids, in 1,000 batches
(``b0000/000000.jpg`` ...), built by the assets' own chain, ``core.build`` with its default
settings: ``train_pca`` (256 dimensions, 100,000 samples), ``train_centroids`` (about
4·sqrt(N) lists, 64 samples per list), ``train_template`` (4 GiB budget), ``build_shard`` per
100 batches, ``merge``, ``tune`` (nprobe raised until 1,000 indexed vectors, searched without
themselves, reach recall@10 0.95), ``publish``. Its info names a full-size ViT-S/14 (12 blocks, 224 px,
seeded random weights) as the encoder, so an image query costs what it costs in real use. The
index and a copy with 1% more vectors (one more batch) are cached in the temp dir, keyed by size:
the first run builds them (minutes at 1M).

Server: the real CLI, ``imgsim serve`` (uvicorn), as a subprocess on a free loopback port over a
temp data dir where the index is published with ``publish_dir``, as the pipeline does. Clients
are threads of this process, each with one persistent HTTP/1.1 connection (``http.client``):
they share the CPUs with the server, as a client on the same host would.

Measured, each beside an in-process baseline on the same index or encoder:
- cold start: launching ``imgsim serve`` → first answered id query and image query, vs loading
  the same index and encoder in-process (``ImageIndex.load``, id map, encoder) and answering;
- id queries, GET /search?image_id=ID&k=10 with random indexed ids, at 1 and ``--clients``
  clients, vs ``FaissSearcher.search_ids`` called by as many threads: p50, p99, queries/s,
  errors, and CPU per query (server, clients, rest of the machine);
- image queries, POST /search with a 12 MP camera JPEG one at a time, vs decode + preprocess +
  ``Encoder.embed`` of the same bytes in-process; then ``--clients`` at once (for twice
  ``--seconds``) vs one at a time, with the model batch sizes from /metrics, and the model alone
  on 16 images in one call vs 16 calls (what batching can gain on these CPUs);
- reload under load: 8 clients send id queries while the grown index is published: seconds
  until /healthz shows it, failed queries, p99 during the swap vs before it;
- filtered id queries (``--only filters`` runs this phase alone, without the server):
  ``FaissSearcher.search_ids`` with photo filters from a broad one (half the images) to one
  day's photos, vs the same queries unfiltered, taken in turn with them (so that the rest of
  the machine weighs on both alike): p50 with the filter used before (kept) and, in a run of
  its own, with a new filter every query (cold), the way the index held to it, and recall@10 against exact
  search over the images the filter allows. The synthetic images'
  photo metadata (``photo_table``) is drawn independently of their vectors.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import itertools
import json
import os
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable
from urllib.parse import urlencode

import numpy as np

from bench._common import PHOTO_SIZES, header, peak_rss_mb, ratio_line, write_photos

SEED = 0
BATCHES = 1000
SHARD_BATCHES = 100  # batches per shard (1,000 one-batch shards would make merge_shards quadratic here)
CACHE_VERSION = 2
RELOAD_CLIENTS = 8
MODELS_BY_DIM = {384: "dinov2_vits14", 768: "dinov2_vitb14", 1024: "dinov2_vitl14", 1536: "dinov2_vitg14"}

GOAL_ID_P50_MS = 2.0
GOAL_ID_QPS = 500.0
GOAL_IMAGE_FACTOR, GOAL_IMAGE_EXTRA_MS = 1.15, 5.0
GOAL_BATCHING = 1.5


def encoder_entry(dim: int) -> dict:
    """The index's ``encoder`` info: a full-size ViT (12 blocks at 224 px for ViT-S/14), random weights."""
    return {
        "model": MODELS_BY_DIM.get(dim, "dinov2_vits14"), "weights_file": "random", "weights": "random",
        "pooling": "cls", "depth": None, "dim": dim,
        "preprocess": {"protocol": "dinov2_eval", "crop_size": 224, "resize_size": 256, "draft": True,
                       "max_pixels": 178_956_970, "max_file_bytes": 268_435_456, "grid_size": [1050, 700]},
    }


# ---------------------------------------------------------------- the index, built once per size


def _log(message: str) -> None:
    print(f"  [{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# Photo metadata of the synthetic images: capture times spread over ten years, cameras drawn
# with Zipf weights (the first, an iPhone, takes a third), common sensor sizes, and no EXIF
# (no time, no camera) for one image in ten.
CAMERAS = (("Apple", "iPhone 12"), ("Canon", "Canon EOS 5D Mark IV"), ("Samsung", "SM-S911B"),
           ("NIKON CORPORATION", "NIKON D750"), ("SONY", "ILCE-7M3"), ("Google", "Pixel 7"), ("FUJIFILM", "X-T4"),
           ("Canon", "Canon EOS R5"), ("Apple", "iPhone 15 Pro"), ("OLYMPUS", "E-M10"), ("Panasonic", "DC-GH5"),
           ("NIKON CORPORATION", "NIKON Z 6"))
SENSORS = ((1280, 960), (2048, 1536), (4032, 3024), (6000, 4000), (8192, 5464))
PHOTO_YEARS = (2015, 2025)


def photo_table(rows: int):
    """The photo columns of the catalog's first ``rows`` rows (the same rows, the same values)."""
    import pyarrow as pa

    from imgsim_assets.core import build

    rng = np.random.default_rng(SEED + 5)
    missing = rng.random(rows) < 0.1
    start = np.datetime64(f"{PHOTO_YEARS[0]}-01-01", "us").astype(np.int64)
    end = np.datetime64(f"{PHOTO_YEARS[1]}-01-01", "us").astype(np.int64)
    captured = rng.integers(start, end, rows)
    weights = 1 / np.arange(1, len(CAMERAS) + 1)
    camera = rng.choice(len(CAMERAS), rows, p=weights / weights.sum())
    sensor = np.asarray(SENSORS)[rng.integers(0, len(SENSORS), rows)]
    makes, models = (pa.array(np.asarray([c[i] for c in CAMERAS], dtype=object)[camera], pa.string(), mask=missing)
                     for i in (0, 1))
    schema = build.catalog_schema()
    columns = {"captured_at": pa.array(captured, pa.timestamp("us"), mask=missing), "camera_make": makes,
               "camera_model": models, "width": pa.array(sensor[:, 0], pa.int32()),
               "height": pa.array(sensor[:, 1], pa.int32()),
               "pixels": pa.array(sensor[:, 0].astype(np.int64) * sensor[:, 1], pa.int64())}
    names = [f.name for f in schema][3:]
    return pa.table({n: columns.get(n, pa.nulls(rows, schema.field(n).type)) for n in names})


def _catalog(ids: np.ndarray, batch_of_row: np.ndarray, first_row: int = 0, photos=None):
    import pyarrow as pa

    names = [f"b{b:04d}" for b in range(int(batch_of_row.max()) + 1)] if len(batch_of_row) else []
    batches = pa.DictionaryArray.from_arrays(pa.array(batch_of_row.astype(np.int32)), pa.array(names))
    paths = [f"{names[b]}/{first_row + i:06d}.jpg" for i, b in enumerate(batch_of_row.tolist())]
    table = pa.table({"image_id": pa.array(ids, pa.int64()), "batch": batches.cast(pa.string()), "path": paths})
    return _with_photos(table, photos) if photos is not None else table


def _with_photos(catalog, photos):
    for name in photos.column_names:
        if name in catalog.column_names:
            catalog = catalog.drop_columns([name])
        catalog = catalog.append_column(name, photos[name])
    return catalog


def _photos_in_cache(cache: Path) -> None:
    """Give the catalogs of an index cached before the photo columns existed theirs (the
    vectors do not change, so the index is not built again)."""
    import pyarrow.parquet as pq

    from imgsim_assets.core.search import CATALOG_FILE
    from imgsim_assets.core.storage import atomic_path

    grown = pq.read_table(cache / "grown" / CATALOG_FILE)
    if "captured_at" in grown.column_names:
        return
    photos = photo_table(grown.num_rows)
    for part in ("index", "grown"):
        catalog = pq.read_table(cache / part / CATALOG_FILE)
        with atomic_path(cache / part / CATALOG_FILE) as tmp:
            pq.write_table(_with_photos(catalog, photos.slice(0, catalog.num_rows)), tmp)


def build_index(cache: Path, n: int, dim: int) -> dict:
    """Build the index and its grown copy into ``cache`` (``index/``, ``grown/``, ``build.json``)."""
    import pyarrow as pa

    from bench.index import mixture
    from imgsim_assets.core import build
    from imgsim_assets.core.vectors import Arrays

    work = cache.with_name(cache.name + f".tmp-{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    (work / "index").mkdir(parents=True)
    (work / "grown").mkdir()
    times = {}
    t0 = time.perf_counter()
    _log(f"building a {n:,} x {dim} index into {cache} (cached for later runs)")
    new_n = max(1, n // 100)
    rng = np.random.default_rng(SEED)
    while True:
        all_ids = rng.integers(1, 2**63 - 1, size=n + new_n, dtype=np.int64)
        if len(np.unique(all_ids)) == len(all_ids):
            break
    ids, new_ids = all_ids[:n], all_ids[n:]
    x = mixture(n, dim, seed=1)
    batches = min(BATCHES, n)
    batch_of_row = (np.arange(n, dtype=np.int64) * batches // n).astype(np.int32)
    times["data"] = time.perf_counter() - t0

    data = Arrays(ids, x)  # the assets' chain, with their default settings, one shard per SHARD_BATCHES batches
    groups = [(f"b{first:04d}", np.flatnonzero((batch_of_row >= first) & (batch_of_row < first + SHARD_BATCHES)))
              for first in range(0, batches, SHARD_BATCHES)]
    built = build.run(data, batches=[(name, rows) for name, rows in groups if len(rows)],
                      provenance=encoder_entry(dim), log=_log)
    times.update(built.seconds)
    del x, data
    names = [f"b{b:04d}" for b in range(batches)]
    info = built.info(names)
    photos = photo_table(n + new_n)
    catalog = _catalog(ids, batch_of_row, photos=photos.slice(0, n))
    build.publish(built.pca, built.merged, catalog, info).save(work / "index")
    _log("saved")

    # The next version: one more batch of 1% new vectors, a new shard merged with the index.
    new = mixture(new_n, dim, seed=4)
    grown = built.add_batch(f"b{batches:04d}", new_ids, new)
    grown_catalog = pa.concat_tables([catalog, _catalog(new_ids, np.full(new_n, batches, np.int32), n,
                                                        photos=photos.slice(n))])
    grown_info = {**info, "num_vectors": int(grown.ntotal), "batches": [*names, f"b{batches:04d}"]}
    build.publish(built.pca, grown, grown_catalog, grown_info).save(work / "grown")
    record = {"n": n, "dim": dim, "grown_n": int(grown.ntotal), "seconds": round(time.perf_counter() - t0, 1),
              **{k: round(v, 1) for k, v in times.items()}, "factory": info["factory"], "nprobe": built.chosen.nprobe,
              "recall_at_10": built.chosen.recall_at_10, "curve": [p.__dict__ for p in built.curve.curve]}
    (work / "build.json").write_text(json.dumps(record, indent=2))
    shutil.rmtree(cache, ignore_errors=True)
    os.replace(work, cache)
    _log(f"built in {record['seconds']:.0f} s")
    return record


def cached_index(n: int, dim: int) -> tuple[Path, dict, bool]:
    cache = Path(tempfile.gettempdir()) / f"imgsim-bench-serve-v{CACHE_VERSION}-{n}x{dim}"
    if (cache / "build.json").is_file():
        _photos_in_cache(cache)
        return cache, json.loads((cache / "build.json").read_text()), True
    return cache, build_index(cache, n, dim), False


def publish(link: Path, source: Path) -> Path:
    """Publish the saved index in ``source`` at ``link`` with ``publish_dir`` (files hard-linked
    from the cache, so that publishing costs what the pipeline's rename costs, not a 1 GB copy)."""
    from imgsim_assets.core.storage import publish_dir

    def populate(version: Path) -> None:
        for f in source.iterdir():
            try:
                os.link(f, version / f.name)
            except OSError:
                shutil.copy2(f, version / f.name)

    return publish_dir(link, populate)


# ---------------------------------------------------------------- clients and measurement


@dataclass
class Sample:
    start: float  # perf_counter when the request was sent
    seconds: float
    status: int  # HTTP status; 0: the connection failed
    took_ms: float = float("nan")  # the server's own handler time
    num_vectors: int = 0


@dataclass
class Run:
    samples: list[Sample]
    wall: float
    cpu: dict

    @property
    def ok(self) -> list[Sample]:
        return [s for s in self.samples if s.status == 200]

    @property
    def errors(self) -> int:
        return len(self.samples) - len(self.ok)

    @property
    def qps(self) -> float:
        return len(self.ok) / self.wall if self.wall else 0.0

    def ms(self, q: float) -> float:
        return float(np.percentile([s.seconds for s in self.ok], q) * 1000) if self.ok else float("nan")

    def took_ms(self, q: float) -> float:
        took = [s.took_ms for s in self.ok if s.took_ms == s.took_ms]
        return float(np.percentile(took, q)) if took else float("nan")

    def statuses(self) -> str:
        return ", ".join(f"{k or 'connection failed'}: {v}" for k, v in sorted(Counter(s.status for s in self.samples).items()))

    def cpu_per_query(self) -> str:
        """CPU milliseconds per answered query: the server, this process (clients, or the in-process
        work), everything else on the machine."""
        n = max(len(self.ok), 1)
        parts = [f"{who} {self.cpu[key] * 1000 / n:.2f}" for key, who in
                 (("server", "server"), ("self", "this process"), ("others", "others")) if key in self.cpu]
        return f"CPU ms/query: {', '.join(parts)} (machine busy {self.cpu['busy']:.0%} of {os.cpu_count()} cores)"


def _proc_cpu(pid: int | str) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _machine_cpu() -> tuple[float, float]:
    values = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
    total = sum(values[:8])
    return (total - values[3] - values[4]) / os.sysconf("SC_CLK_TCK"), total / os.sysconf("SC_CLK_TCK")


class CpuMeter:
    """CPU seconds spent by the server, by this process and by everything else during a phase."""

    def __init__(self, server_pid: int | None) -> None:
        self.server_pid = server_pid
        self.start = self._snap()

    def _snap(self) -> tuple[float, float, float, float]:
        server = _proc_cpu(self.server_pid) if self.server_pid else 0.0
        me = resource.getrusage(resource.RUSAGE_SELF)
        busy, total = _machine_cpu()
        return server, me.ru_utime + me.ru_stime, busy, total

    def stop(self) -> dict:
        end = self._snap()
        server, me, busy, total = (b - a for a, b in zip(self.start, end))
        out = {"self": me, "others": max(busy - server - me, 0.0), "busy": busy / total if total else 0.0}
        if self.server_pid:
            out["server"] = server
        return out


def drive(threads: int, seconds: float, make_call: Callable[[int], tuple[Callable[[], Sample], Callable[[], None]]],
          server_pid: int | None = None, stop: threading.Event | None = None, per_thread: int | None = None) -> Run:
    """``threads`` threads, each calling its own ``make_call(i)`` call until ``seconds`` are over
    (0: no limit), ``stop`` is set or it made ``per_thread`` calls; each finishes the call it is in.
    Wall time until the last one is done."""
    calls = [make_call(i) for i in range(threads)]
    results: list[list[Sample]] = [[] for _ in range(threads)]
    barrier = threading.Barrier(threads + 1)
    deadline = [0.0]

    def loop(i: int) -> None:
        call, _ = calls[i]
        barrier.wait()
        while time.perf_counter() < deadline[0] and not (stop and stop.is_set()):
            results[i].append(call())
            if per_thread is not None and len(results[i]) >= per_thread:
                break

    workers = [threading.Thread(target=loop, args=(i,), daemon=True) for i in range(threads)]
    for w in workers:
        w.start()
    meter = CpuMeter(server_pid)
    start = time.perf_counter()
    deadline[0] = start + seconds if seconds else float("inf")
    barrier.wait()
    for w in workers:
        w.join()
    wall = time.perf_counter() - start
    cpu = meter.stop()
    for _, close in calls:
        close()
    return Run([s for r in results for s in r], wall, cpu)


def http_call(port: int, request: Callable[[], tuple[str, str, bytes | None, dict]]):
    """A client with one keep-alive connection: returns (call, close). ``request()`` gives the
    next (method, path, body, headers)."""
    conn = [http.client.HTTPConnection("127.0.0.1", port, timeout=120)]

    def call() -> Sample:
        method, path, body, headers = request()
        start = time.perf_counter()
        try:
            conn[0].request(method, path, body=body, headers=headers)
            response = conn[0].getresponse()
            data = response.read()
            status = response.status
        except (OSError, http.client.HTTPException):
            conn[0].close()
            conn[0] = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
            return Sample(start, time.perf_counter() - start, 0)
        sample = Sample(start, time.perf_counter() - start, status)
        if status == 200:
            answer = json.loads(data)
            sample.took_ms, sample.num_vectors = answer.get("took_ms", float("nan")), answer.get("num_vectors", 0)
        return sample

    return call, lambda: conn[0].close()


def id_requests(ids: np.ndarray, seed: int) -> Callable[[], tuple[str, str, None, dict]]:
    order = itertools.cycle(np.random.default_rng(seed).permutation(ids).tolist())
    return lambda: ("GET", f"/search?{urlencode({'image_id': next(order), 'k': 10})}", None, {})


def multipart(data: bytes, name: str) -> tuple[bytes, dict]:
    boundary = "imgsimbenchboundary7f3a"
    body = (f"--{boundary}\r\nContent-Disposition: form-data; name=\"image\"; filename=\"{name}\"\r\n"
            "Content-Type: image/jpeg\r\n\r\n").encode() + data + f"\r\n--{boundary}--\r\n".encode()
    return body, {"Content-Type": f"multipart/form-data; boundary={boundary}"}


def get(port: int, path: str, timeout: float = 30) -> tuple[int, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def batch_histogram(port: int) -> dict[str, float]:
    """``imgsim_model_batch_size`` from /metrics: cumulative bucket counts by ``le``, ``count``, ``sum``."""
    _, text = get(port, "/metrics")
    out = {}
    for line in text.decode().splitlines():
        m = re.match(r'imgsim_model_batch_size_(bucket\{le="([^"]+)"\}|count|sum) ([0-9.e+]+)', line)
        if m:
            out[m.group(2) or m.group(1)] = float(m.group(3))
    return out


def describe_batches(before: dict, after: dict) -> str:
    delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    calls = int(delta.get("count", 0))
    if not calls:
        return "no model calls"
    parts, previous, low = [], 0.0, 1
    for le in sorted((k for k in delta if k not in ("count", "sum", "+Inf")), key=float):
        count = int(delta[le] - previous)
        high = int(float(le))
        if count:
            parts.append(f"{low if low == high else f'{low}-{high}'}: {count}")
        previous, low = delta[le], high + 1
    if delta.get("+Inf", previous) > previous:
        parts.append(f">{low - 1}: {int(delta['+Inf'] - previous)}")
    return f"{calls} model calls, mean batch {delta['sum'] / calls:.1f} (sizes {', '.join(parts)})"


# ---------------------------------------------------------------- the server


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_command() -> list[str]:
    script = Path(sys.executable).parent / "imgsim"
    return [str(script)] if script.exists() else [sys.executable, "-m", "imgsim_assets.cli"]


@contextlib.contextmanager
def server(data_dir: Path, port: int):
    """``imgsim serve`` on ``port`` over ``data_dir``; yields (process, its log file, start time)."""
    log = data_dir / "serve.log"
    env = {**os.environ, "IMGSIM_DATA_DIR": str(data_dir), "IMGSIM_DEVICE": "cpu"}
    env.pop("IMGSIM_SERVE_TOKEN", None)
    with open(log, "wb") as out:
        started = time.perf_counter()
        proc = subprocess.Popen([*serve_command(), "serve", "--host", "127.0.0.1", "--port", str(port)],
                                env=env, stdout=out, stderr=subprocess.STDOUT)
    try:
        yield proc, log, started
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def first_answer(port: int, proc, started: float, request: tuple[str, str, bytes | None, dict], log: Path,
                 timeout: float = 600) -> float:
    """Seconds from ``started`` until ``request`` is answered 200 (retried while the port is closed)."""
    method, path, body, headers = request
    while True:
        if proc.poll() is not None:
            sys.exit(f"imgsim serve exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        if time.perf_counter() - started > timeout:
            sys.exit(f"imgsim serve answered nothing in {timeout:.0f} s:\n{log.read_text()[-3000:]}")
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=120)
        try:
            conn.request(method, path, body=body, headers=headers)
            response = conn.getresponse()
            response.read()
            if response.status == 200:
                return time.perf_counter() - started
        except (OSError, http.client.HTTPException):
            pass
        finally:
            conn.close()
        time.sleep(0.02)


# ---------------------------------------------------------------- the benchmark


def verdict(what: str, value: str, target: str, ok: bool) -> None:
    print(f"{what}: {value} ({'meets' if ok else 'MISSES'} target {target})")


def _timed(fn: Callable[[], object]) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


@dataclass
class Bench:
    """One running server and what the phases share."""

    port: int
    proc: subprocess.Popen
    cache: Path
    build: dict
    link: Path  # the published faiss_index
    photo: Path
    query_ids: np.ndarray  # indexed image_ids to ask for, in random order
    seconds: float
    clients: int

    @property
    def upload(self) -> tuple[bytes, dict]:
        return multipart(self.photo.read_bytes(), self.photo.name)

    def http_ids(self, i: int):
        return http_call(self.port, id_requests(self.query_ids, i))

    def http_images(self, i: int):
        body, headers = self.upload
        return http_call(self.port, lambda: ("POST", "/search?k=10", body, headers))


class InProcess:
    """The baselines: the published index and its encoder loaded in this process, as the server
    loads them (index, id → vector map, encoder)."""

    def __init__(self, link: Path, photo: Path) -> None:
        from imgsim_assets.core.search import FaissSearcher, ImageIndex, encoder_from_info, preprocess_from_info

        self.searcher = FaissSearcher(ImageIndex.load(link.resolve()), device="cpu")
        self.searcher.index.stored_vectors([])
        self.encoder = encoder_from_info(self.searcher.info, device="cpu")
        self.pre = preprocess_from_info(self.searcher.info)
        self.photo, self.data = photo, photo.read_bytes()

    def decode(self):
        from imgsim_assets.core import images

        return images.decode(self.data, self.pre, images.ImageRecord(path=self.photo.name))

    def encode(self) -> tuple[float, float]:
        """A bare single-image encode of the photo's bytes: (decode + preprocess, embed) seconds."""
        t0 = time.perf_counter()
        pixels = self.decode()
        t1 = time.perf_counter()
        self.encoder.embed(pixels[None])
        return t1 - t0, time.perf_counter() - t1

    def ids(self, query_ids: np.ndarray):
        def make(i: int):
            order = itertools.cycle(np.random.default_rng(i).permutation(query_ids).tolist())

            def call() -> Sample:
                start = time.perf_counter()
                self.searcher.search_ids([next(order)], 10)
                return Sample(start, time.perf_counter() - start, 200)

            return call, lambda: None

        return make


def cold_start(b: Bench, log: Path, started: float) -> InProcess:
    """Seconds from launch to the first answered id and image queries, vs the same loading in-process."""
    body, headers = b.upload
    probe = int(b.query_ids[0])
    requests = {"id": ("GET", f"/search?image_id={probe}&k=10", None, {}), "image": ("POST", "/search?k=10", body, headers)}
    cold: dict[str, float] = {}
    pollers = [threading.Thread(target=lambda k=k, r=r: cold.__setitem__(k, first_answer(b.port, b.proc, started, r, log)))
               for k, r in requests.items()]
    for p in pollers:
        p.start()
    for p in pollers:
        p.join()
    if set(cold) != set(requests):
        sys.exit(f"imgsim serve did not answer:\n{log.read_text()[-3000:]}")
    t = time.perf_counter()
    local = InProcess(b.link, b.photo)
    local.searcher.search_ids([probe], 10)
    local_id = time.perf_counter() - t
    local.encode()
    local_image = time.perf_counter() - t
    print("cold start (seconds from launching imgsim serve to the first answer; page cache warm):")
    ratio_line("  first id query", f"imgsim serve {cold['id']:.1f} s", f"in-process load + search {local_id:.1f} s",
               cold["id"] / local_id)
    ratio_line("  first image query", f"imgsim serve {cold['image']:.1f} s",
               f"in-process load + encode {local_image:.1f} s", cold["image"] / local_image)
    return local


def id_queries(b: Bench, local: InProcess) -> None:
    print(f"id queries (GET /search?image_id=ID&k=10, random indexed ids; in-process: FaissSearcher.search_ids "
          f"in as many threads), {b.seconds:g} s each:")
    runs = {}
    warm = min(1.0, b.seconds / 5)
    for clients in (1, b.clients):
        for side, make in (("in-process", local.ids(b.query_ids)), ("HTTP", b.http_ids)):
            drive(clients, warm, make, b.proc.pid)
            runs[side, clients] = drive(clients, b.seconds, make, b.proc.pid)
    h1, l1, hn, ln = runs["HTTP", 1], runs["in-process", 1], runs["HTTP", b.clients], runs["in-process", b.clients]
    ratio_line("  p50 latency, 1 client", f"HTTP {h1.ms(50):.2f} ms", f"in-process {l1.ms(50):.2f} ms",
               h1.ms(50) / l1.ms(50), f"p50 <= {GOAL_ID_P50_MS:g} ms", h1.ms(50) <= GOAL_ID_P50_MS)
    ratio_line("  p99 latency, 1 client", f"HTTP {h1.ms(99):.2f} ms", f"in-process {l1.ms(99):.2f} ms",
               h1.ms(99) / l1.ms(99))
    ratio_line("  queries/s, 1 client", f"HTTP {h1.qps:.0f}", f"in-process {l1.qps:.0f}", h1.qps / l1.qps)
    ratio_line(f"  queries/s, {b.clients} clients", f"HTTP {hn.qps:.0f}", f"in-process {ln.qps:.0f}",
               hn.qps / ln.qps, f">= {GOAL_ID_QPS:g} queries/s", hn.qps >= GOAL_ID_QPS)
    ratio_line(f"  p50 / p99 latency, {b.clients} clients", f"HTTP {hn.ms(50):.1f} / {hn.ms(99):.1f} ms",
               f"in-process {ln.ms(50):.1f} / {ln.ms(99):.1f} ms", hn.ms(50) / ln.ms(50))
    errors = h1.errors + hn.errors
    verdict("  errors", f"{errors} of {len(h1.samples) + len(hn.samples)} HTTP queries (statuses at 1 client "
            f"{h1.statuses()}; at {b.clients} {hn.statuses()})", "0", errors == 0)
    for clients in (1, b.clients):
        h = runs["HTTP", clients]
        print(f"    {clients:>2} client(s): server handler (took_ms) p50 {h.took_ms(50):.2f} ms, p99 {h.took_ms(99):.2f} ms")
        print(f"       HTTP {h.cpu_per_query()}")
        print(f"       in-process {runs['in-process', clients].cpu_per_query()}")


def image_queries(b: Bench, local: InProcess) -> None:
    print(f"image queries (POST /search with {b.photo.name}; bare encode: decode + preprocess + Encoder.embed of one "
          "image in-process):")
    bare, decode_s, embed_s = [], [], []
    deadline = time.perf_counter() + b.seconds
    while time.perf_counter() < deadline or len(bare) < 5:
        d, e = local.encode()
        decode_s.append(d), embed_s.append(e), bare.append(d + e)
    bare_p50 = float(np.median(bare) * 1000)
    drive(1, 0, b.http_images, b.proc.pid, per_thread=2)  # warm
    one = drive(1, max(b.seconds, 1.0), b.http_images, b.proc.pid)
    if len(one.ok) < 5:  # fewer than 5 answers: measure longer
        one = drive(1, 5 * max(b.seconds, 1.0), b.http_images, b.proc.pid)
    goal = GOAL_IMAGE_FACTOR * bare_p50 + GOAL_IMAGE_EXTRA_MS
    ratio_line("  p50 latency, one at a time", f"HTTP {one.ms(50):.1f} ms", f"bare encode {bare_p50:.1f} ms",
               one.ms(50) / bare_p50, f"<= {GOAL_IMAGE_FACTOR:g}x + {GOAL_IMAGE_EXTRA_MS:g} ms = {goal:.1f} ms",
               one.ms(50) <= goal)
    print(f"    bare: decode + preprocess p50 {np.median(decode_s) * 1000:.1f} ms, embed p50 "
          f"{np.median(embed_s) * 1000:.1f} ms ({len(bare)} runs); HTTP: server handler (took_ms) p50 "
          f"{one.took_ms(50):.1f} ms ({len(one.ok)} queries, {one.errors} errors); {one.cpu_per_query()}")

    drive(b.clients, 0, b.http_images, b.proc.pid, per_thread=1)  # warm: the batch shapes
    before = batch_histogram(b.port)
    many = drive(b.clients, 2 * b.seconds, b.http_images, b.proc.pid)
    after = batch_histogram(b.port)
    ratio_line(f"  images/s, {b.clients} at once vs one at a time", f"{many.qps:.2f}", f"{one.qps:.2f}",
               many.qps / one.qps, f">= {GOAL_BATCHING:g}x", many.qps / one.qps >= GOAL_BATCHING)
    print(f"    {describe_batches(before, after)}; p50 latency {many.ms(50):.0f} ms, errors {many.errors} "
          f"({many.statuses()}); {many.cpu_per_query()}")
    pixels = local.decode()
    stack = np.stack([pixels] * 16)
    local.encoder.embed(stack)
    single = min(_timed(lambda: [local.encoder.embed(pixels[None]) for _ in range(16)]) for _ in range(2))
    batched = min(_timed(lambda: local.encoder.embed(stack)) for _ in range(2))
    ratio_line("  model alone, images/s: 16 in one call vs 16 calls (the most batching can gain here)",
               f"{16 / batched:.2f}", f"{16 / single:.2f}", single / batched)


def reload_under_load(b: Bench) -> None:
    grown_n = b.build["grown_n"]
    stop = threading.Event()
    result: list[Run] = []
    loader = threading.Thread(target=lambda: result.append(drive(RELOAD_CLIENTS, 0, b.http_ids, b.proc.pid, stop=stop)),
                              daemon=True)
    loader.start()
    time.sleep(max(1.0, b.seconds / 2))
    t_publish = time.perf_counter()
    publish(b.link, b.cache / "grown")
    published = time.perf_counter() - t_publish
    health = http.client.HTTPConnection("127.0.0.1", b.port, timeout=120)
    swapped = None
    while time.perf_counter() - t_publish < 300:
        health.request("GET", "/healthz")
        response = health.getresponse()
        body = response.read()
        if response.status == 200 and json.loads(body)["num_vectors"] == grown_n:
            swapped = time.perf_counter() - t_publish
            break
        time.sleep(0.05)
    health.close()
    time.sleep(max(1.0, b.seconds / 2))
    stop.set()
    loader.join()
    run = result[0]
    t_swap = t_publish + (swapped if swapped is not None else 300)
    before = Run([s for s in run.samples if s.start < t_publish], 1, {})
    during = Run([s for s in run.samples if t_publish <= s.start <= t_swap], 1, {})
    first = min((s.start for s in run.samples), default=t_publish)
    print(f"reload under load ({RELOAD_CLIENTS} clients sending id queries; {grown_n - b.build['n']:,} vectors more "
          f"published with publish_dir in {published * 1000:.0f} ms):")
    if swapped is None:
        verdict("  swap", "/healthz never showed the new index in 300 s", "swapped", False)
    else:
        print(f"  seconds from publishing to /healthz showing {grown_n:,} vectors: {swapped:.2f} s (reload interval 1 s)")
    verdict("  failed queries during the swap", f"{during.errors} of {len(during.samples)} ({run.errors} of "
            f"{len(run.samples)} in the whole phase; {run.statuses()})", "0", run.errors == 0)
    ratio_line("  p99 latency during the swap vs before it", f"{during.ms(99):.1f} ms (max "
               f"{max((s.seconds for s in during.ok), default=0) * 1000:.0f} ms)", f"{before.ms(99):.1f} ms",
               during.ms(99) / before.ms(99))
    print(f"    queries/s before {len(before.ok) / max(t_publish - first, 1e-9):.0f}, during "
          f"{len(during.ok) / max(t_swap - t_publish, 1e-9):.0f}; {sum(s.num_vectors == grown_n for s in run.ok)} "
          f"answers came from the new version; server peak RSS {peak_rss_mb(b.proc.pid):.0f} MB")


# Filters from broad to narrow: (what, Filters.parse arguments).
FILTERS = (
    ("taken 2020-2024", dict(taken_after="2020-01-01", taken_before="2025-01-01")),
    ("camera 'canon'", dict(camera="canon")),
    ("camera 'iphone 15', at least 24 MP", dict(camera="iphone 15", min_pixels=24_000_000)),
    ("taken in June 2019", dict(taken_after="2019-06-01", taken_before="2019-07-01")),
    ("batch b0001", dict(batches=["b0001"])),
    ("taken on 1 June 2019", dict(taken_after="2019-06-01", taken_before="2019-06-02")),
)
RECALL_QUERIES = 20


def exact_top(index, queries: np.ndarray, allowed: np.ndarray, k: int, chunk: int = 65_536) -> np.ndarray:
    """The ids of each query's ``k`` nearest among ``allowed`` (exhaustive, in the index's space,
    over the vectors it stores; ``chunk`` ids at a time)."""
    best_scores = np.full((len(queries), 0), -np.inf, np.float32)
    best_ids = np.zeros((len(queries), 0), np.int64)
    for start in range(0, len(allowed), chunk):
        part = allowed[start : start + chunk]
        scores = queries @ index.stored_vectors(part).T
        best_scores = np.concatenate([best_scores, scores], axis=1)
        best_ids = np.concatenate([best_ids, np.broadcast_to(part, scores.shape)], axis=1)
        keep = np.argsort(-best_scores, axis=1, kind="stable")[:, :k]
        best_scores, best_ids = np.take_along_axis(best_scores, keep, 1), np.take_along_axis(best_ids, keep, 1)
    return best_ids


def _interleaved(calls: dict[str, Callable[[int], object]], seconds: float, at_least: int = 20) -> dict[str, float]:
    """p50 milliseconds of each call, the calls taken in turn (query i of each, then i + 1), so
    that whatever else the machine does weighs on all of them alike."""
    times: dict[str, list[float]] = {name: [] for name in calls}
    i, deadline = 0, time.perf_counter() + seconds
    while time.perf_counter() < deadline or i < at_least:
        for name, call in calls.items():
            start = time.perf_counter()
            call(i)
            times[name].append(time.perf_counter() - start)
        i += 1
    return {name: float(np.median(t) * 1000) for name, t in times.items()}


def filtered_queries(searcher, query_ids: np.ndarray, seconds: float) -> None:
    """Filtered vs unfiltered id queries in-process, through ``FaissSearcher.search_ids``."""
    from dataclasses import replace

    from imgsim_assets.core.filters import Filters

    index = searcher.index
    ids = query_ids.tolist()

    def query(i: int, filters=None):
        return searcher.search_ids([ids[i % len(ids)]], 10, filters=filters)

    _interleaved({"warm": query}, min(1.0, seconds / 5))
    started = time.perf_counter()
    building = index.prepare_filters()  # as imgsim serve does once it has loaded the index
    if building is not None:
        building.result()
        print(f"codes for new narrow filters built in the background in {time.perf_counter() - started:.1f} s "
              f"({index.filter_codes_bytes / 2**20:.0f} MiB)")
    print(f"filtered id queries (FaissSearcher.search_ids, k=10, random indexed ids; warm: the filter used before; "
          f"cold: a new filter every query; each beside unfiltered queries taken in turn), {seconds:g} s per filter:")
    probes = np.asarray(ids[:RECALL_QUERIES], np.int64)
    for what, arguments in FILTERS:
        filters = Filters.parse(**arguments)
        allowed = index.image_ids[index.passes(filters)]
        way = index.strategy(filters)  # how a new filter is held
        query(0, filters)  # used again: a filter kept may read its images' vectors for exact search
        reading = index.allowed(filters).reading
        if reading is not None:
            reading.result()
        kept = index.strategy(filters)
        way = way if kept == way else f"{way}, {kept} once kept"
        def variant(i: int) -> Filters:
            """Another filter allowing the same images (a size bound moved between the sensors'
            sizes; every image's size is known), so that nothing kept is found."""
            bound = filters.min_pixels - 1 - i if filters.min_pixels else 1 + i
            return replace(filters, min_pixels=bound)

        sides = {"warm": lambda i: query(i, filters), "cold": lambda i: query(i, variant(i))}
        truth = exact_top(index, index.stored_vectors(probes), allowed, 10)

        def recall(variant: Filters) -> float:
            found = [[h.image_id for h in hits] for hits in searcher.search_ids(probes, 10, filters=variant)]
            return float(np.mean([len(set(f) & set(t.tolist())) / max(min(10, len(allowed)), 1)
                                  for f, t in zip(found, truth)]))

        # Each side in turn with unfiltered queries of its own: a cold query's new selector would
        # otherwise push out of the caches what the warm ones read.
        p50 = {"warm": _interleaved({"unfiltered": query, "warm": sides["warm"]}, seconds / 2)}
        kept_recall = recall(filters)
        p50["cold"] = _interleaved({"unfiltered": query, "cold": sides["cold"]}, seconds / 2)
        new_recall = recall(variant(10**6))
        recalls = f"{new_recall:.3f}" if new_recall == kept_recall else f"{new_recall:.3f} new, {kept_recall:.3f} kept"
        label = f"  {what} ({len(allowed) / len(index.image_ids):.2%} of the images, {way}, recall@10 {recalls})"
        for side, times in p50.items():
            ratio_line(f"{label}: p50 {side}", f"{times[side]:.3f} ms", f"unfiltered {times['unfiltered']:.3f} ms",
                       times[side] / times["unfiltered"], "<= 2x", times[side] <= 2 * times["unfiltered"])


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--vectors", type=int, default=1_000_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--seconds", type=float, default=5.0, help="per load phase")
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--only", choices=["filters"], default=None,
                        help="filters: the filtered queries alone, in-process (no server)")
    args = parser.parse_args(argv)
    if args.dim not in MODELS_BY_DIM:
        parser.error(f"--dim must be a DINOv2 width ({', '.join(map(str, MODELS_BY_DIM))}) for image queries")
    sys.stdout.reconfigure(line_buffering=True)
    signal.signal(signal.SIGTERM, lambda *_: sys.exit("bench.serve: terminated"))  # so the server is stopped too

    import pyarrow.parquet as pq
    import torch

    from imgsim_assets.core.search import CATALOG_FILE
    from imgsim_assets.core.storage import artifact_path

    cache, build, was_cached = cached_index(args.vectors, args.dim)
    photo = write_photos(cache / "photos", 1, sizes=(PHOTO_SIZES[-1],))[0]
    ids = pq.read_table(cache / "index" / CATALOG_FILE, columns=["image_id"]).column("image_id").to_numpy()
    query_ids = np.random.default_rng(SEED).choice(ids, size=min(len(ids), 200_000), replace=False)
    header(f"imgsim serve vs in-process: {build['n']:,} x {build['dim']} vectors ({build['factory']}, nprobe "
           f"{build['nprobe']}, recall@10 {build['recall_at_10']:.3f}), {args.seconds:g} s per phase")
    print(f"  index {'cached' if was_cached else 'built'} in {cache} (build {build['seconds']:.0f} s: data "
          f"{build['data']:.0f}, train {build['train']:.0f}, add {build['add']:.0f}, merge {build['merge']:.0f}, "
          f"tune {build['tune']:.0f}); encoder {encoder_entry(args.dim)['model']}, all blocks, 224 px, random "
          f"weights, CPU, torch {torch.get_num_threads()} threads; query photo {photo.name} "
          f"({photo.stat().st_size / 2**20:.1f} MB)")

    if args.only == "filters":
        from imgsim_assets.core.search import FaissSearcher, ImageIndex

        searcher = FaissSearcher(ImageIndex.load(cache / "index"), device="cpu")
        searcher.index.stored_vectors([])  # the id → vector map, as the server builds it before serving
        filtered_queries(searcher, query_ids, args.seconds)
        return

    data_dir = Path(tempfile.mkdtemp(prefix="imgsim-bench-serve-data-"))
    try:
        link = artifact_path(data_dir / "assets", "faiss_index")
        publish(link, cache / "index")
        port = free_port()
        with server(data_dir, port) as (proc, log, started):
            b = Bench(port, proc, cache, build, link, photo, query_ids, args.seconds, args.clients)
            local = cold_start(b, log, started)
            id_queries(b, local)
            filtered_queries(local.searcher, query_ids, b.seconds)
            image_queries(b, local)
            reload_under_load(b)
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)


if __name__ == "__main__":
    main()
