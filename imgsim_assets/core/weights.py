"""Where DINOv2 weights come from, and which weights made a vector.

``weights="auto"`` looks, in order, in the Hugging Face cache (timm's copies of the official
weights), in torch hub's checkpoint folder (the official release files), and then fetches
timm's copy from the Hugging Face hub, or the mirror in ``HF_ENDPOINT``, into the Hugging Face
cache, where timm and every other tool find it too. With ``HF_HUB_OFFLINE=1`` or
``IMGSIM_OFFLINE=1`` nothing touches the network.

A fetch asks once for the file's commit, sha256 and size, without retries, so that no
network, a refusal (403), a missing file (404) or a failing server is one clear message within
seconds (huggingface_hub retries a dead network for half a minute). The transfer goes to a
temporary name under a lock, so a second fetcher of the same file waits for the first; a
dropped or stalled connection is resumed with a Range request a bounded number of times
(huggingface_hub's counter restarts with every chunk received, so a connection that keeps
dropping after a few bytes is retried forever). The file is renamed into the Hugging Face
cache layout only once its sha256 is the one the hub published (an LFS file's ETag), and
loaded only once its names and shapes fit the model.

The fingerprint of weights (:func:`fingerprint`) is the sha256 of the checkpoint, computed
once per file version and remembered; for seeded random weights it is the seed and the
torch and timm versions that turn the seed into a model.
"""

from __future__ import annotations

import hashlib
import http.client
import json
import os
import re
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Mapping

from imgsim_assets.core import models

HUB_FILENAME = "model.safetensors"
LICENSE = "Apache-2.0"  # DINOv2's code and weights
DEFAULT_ENDPOINT = "https://huggingface.co"
DEFAULT_TIMEOUT_S = 10.0
METADATA_TIMEOUT_S = 3.0  # the first question: a hub answers in well under a second; no answer means no network
_SHA256 = re.compile(r"^[0-9a-f]{64}$")
_TRUE = {"1", "true", "yes", "on"}

Progress = Callable[[str], None]  # receives progress lines ("fetching ...: 12.0/88.2 MB, ...")


class WeightsUnavailable(FileNotFoundError):
    """No checkpoint here, and none could be fetched; the message names the ways out."""


@dataclass(frozen=True)
class Hub:
    """How to reach the hub, from the environment: mirror, offline mode, cache, timeout."""

    endpoint: str = DEFAULT_ENDPOINT
    offline: bool = False
    cache_dir: Path = Path.home() / ".cache" / "huggingface" / "hub"
    torch_home: Path = Path.home() / ".cache" / "torch"
    timeout: float = DEFAULT_TIMEOUT_S  # seconds of silence before a request is given up (or a transfer resumed)
    revision: str = "main"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] = os.environ) -> "Hub":
        home = Path.home()
        hf_home = Path(environ.get("HF_HOME", home / ".cache" / "huggingface"))
        torch_home = environ.get("TORCH_HOME") or Path(environ.get("XDG_CACHE_HOME", home / ".cache")) / "torch"
        return cls(
            endpoint=(environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/"),
            offline=any(environ.get(v, "").strip().lower() in _TRUE for v in ("IMGSIM_OFFLINE", "HF_HUB_OFFLINE")),
            cache_dir=Path(environ.get("HF_HUB_CACHE") or hf_home / "hub"),
            torch_home=Path(torch_home),
            timeout=float(environ.get("IMGSIM_FETCH_TIMEOUT") or DEFAULT_TIMEOUT_S),
            revision=environ.get("IMGSIM_WEIGHTS_REVISION") or "main",
        )


def is_hub_repo(path: str | os.PathLike) -> bool:
    """A local clone of facebookresearch/dinov2 (or any folder with a ``hubconf.py``)."""
    return Path(path).expanduser().joinpath("hubconf.py").is_file()


def hub_repo(name: str) -> str:
    """The Hugging Face repository of ``name``'s official weights (timm's copy)."""
    return f"timm/{models.TIMM_HUB_NAMES[name]}"


def local_candidates(name: str, hub: Hub | None = None) -> list[Path]:
    """Where ``auto`` looks before fetching: the HF cache's snapshots, then torch hub's folder."""
    hub = hub or Hub.from_env()
    repo = hub.cache_dir / ("models--" + hub_repo(name).replace("/", "--"))
    snapshots = sorted((repo / "snapshots").glob(f"*/{HUB_FILENAME}"), key=lambda p: p.stat().st_mtime
                       if p.exists() else 0, reverse=True)
    return [*snapshots, hub.torch_home / "hub" / "checkpoints" / models.official_checkpoint_name(name)]


def find_local(name: str, hub: Hub | None = None) -> Path | None:
    return next((p for p in local_candidates(name, hub) if p.is_file()), None)


def _ways_out(name: str, hub: Hub) -> str:
    return (
        f"Ways out:\n"
        f"  - on a machine with network: `imgsim weights fetch {name}`, then copy {hub.cache_dir} here "
        f"(or point HF_HUB_CACHE at a copy)\n"
        f"  - IMGSIM_WEIGHTS=/path/to/{models.official_checkpoint_name(name)} (the official release file) or a "
        f"timm model.safetensors; or put the official file in {hub.torch_home}/hub/checkpoints/\n"
        f"  - `imgsim ingest --fallback-random` (or IMGSIM_WEIGHTS=random): seeded random weights, for trying "
        f"the pipeline only\n"
        f"  - a mirror: HF_ENDPOINT=https://your-mirror (proxies: HTTPS_PROXY)"
    )


def fetch(name: str, progress: Progress | None = None, hub: Hub | None = None) -> Path:
    """``name``'s official weights into the HF cache, verified; the cached file when it is there."""
    hub = hub or Hub.from_env()
    repo = hub_repo(name)
    url = f"{hub.endpoint}/{repo}/resolve/{hub.revision}/{HUB_FILENAME}"
    if hub.offline:
        raise WeightsUnavailable(f"no weights for {name} in the caches, and offline mode (HF_HUB_OFFLINE / "
                                 f"IMGSIM_OFFLINE) forbids fetching {url}.\n" + _ways_out(name, hub))
    meta = _metadata(name, url, hub)
    expected = parameter_bytes(name)
    if not expected // 2 <= meta.size <= expected * 2:  # a budget for the disk, from the architecture
        raise WeightsUnavailable(f"{url} announces {meta.size:,} bytes, but {name}'s weights take about "
                                 f"{expected:,}: not fetched.\n" + _ways_out(name, hub))
    repo_dir = hub.cache_dir / ("models--" + repo.replace("/", "--"))
    if progress is not None:
        progress(f"fetching {name} weights ({meta.size / 1e6:,.0f} MB, {LICENSE}) from {url} into {hub.cache_dir}")
    blob = _transfer(name, url, repo_dir / "blobs", meta, hub, progress)
    snapshot = repo_dir / "snapshots" / meta.commit / HUB_FILENAME
    snapshot.parent.mkdir(parents=True, exist_ok=True)
    if not snapshot.is_file():
        link = snapshot.with_name(f".{HUB_FILENAME}.{os.getpid()}.tmp")
        link.unlink(missing_ok=True)
        link.symlink_to(os.path.relpath(blob, snapshot.parent))
        os.replace(link, snapshot)
    if hub.revision != meta.commit:
        (repo_dir / "refs").mkdir(exist_ok=True)
        (repo_dir / "refs" / hub.revision).write_text(meta.commit)
    try:
        fits(name, snapshot)
    except ValueError as e:
        snapshot.unlink(missing_ok=True)
        blob.unlink(missing_ok=True)
        raise WeightsUnavailable(f"the file fetched from {url} does not hold {name}'s weights and was removed: {e}")
    if progress is not None:
        progress(f"{name} weights verified (sha256:{meta.etag}, commit {meta.commit[:12]}): {snapshot}")
    return snapshot


@dataclass(frozen=True)
class _Meta:
    commit: str
    etag: str  # the sha256 of an LFS file
    size: int


def _metadata(name: str, url: str, hub: Hub) -> _Meta:
    """One HEAD request, no retries, no redirects followed (the hub answers a LFS file with a
    redirect that carries its commit, sha256 and size): no network, a refusal, a missing file
    or a failing server is one clear message within seconds, not a retry loop."""
    class NoRedirect(urllib.request.HTTPRedirectHandler):
        def redirect_request(self, *args, **kwargs):
            return None

    request = urllib.request.Request(url, method="HEAD", headers=_headers())
    try:
        opener = urllib.request.build_opener(NoRedirect)
        with opener.open(request, timeout=min(hub.timeout, METADATA_TIMEOUT_S)) as response:
            headers = response.headers
    except urllib.error.HTTPError as e:
        if not 300 <= e.code < 400:
            why = {401: "authentication required (set HF_TOKEN)", 403: "refused (rate limit or access: set HF_TOKEN, "
                   "or use a mirror)", 404: "not found there (does the mirror carry it?)", 429: "rate limited"}
            reason = why.get(e.code, "the server failed" if e.code >= 500 else "refused")
            raise WeightsUnavailable(f"cannot fetch {name} weights: HTTP {e.code} from {url}: {reason}.\n"
                                     + _ways_out(name, hub)) from None
        headers = e.headers
    except (urllib.error.URLError, OSError) as e:
        reason = getattr(e, "reason", e)
        raise WeightsUnavailable(f"cannot fetch {name} weights: {hub.endpoint} is not reachable ({reason}).\n"
                                 + _ways_out(name, hub)) from None
    etag = (headers.get("X-Linked-Etag") or headers.get("ETag") or "").removeprefix("W/").strip('"')
    size = headers.get("X-Linked-Size") or headers.get("Content-Length")
    commit = headers.get("X-Repo-Commit") or ""
    if not (etag and size and re.fullmatch(r"[0-9a-f]{40}", commit)):
        raise WeightsUnavailable(f"{url} answered without the file's commit, ETag and size: is {hub.endpoint} a "
                                 "Hugging Face hub or mirror?\n" + _ways_out(name, hub))
    return _Meta(commit, etag, int(size))


RESUMES = 5  # dropped or stalled connections a fetch resumes from before it gives up


def _transfer(name: str, url: str, blobs: Path, meta: _Meta, hub: Hub, progress: Progress | None) -> Path:
    """The file into ``blobs/<etag>``: written to ``<etag>.incomplete``, resumed with a Range
    request after a dropped or stalled connection (at most :data:`RESUMES` times; a rerun
    resumes again), checked against the published sha256, then renamed. A second fetcher of
    the same file waits on the lock, then finds it there."""
    from filelock import FileLock

    blob = blobs / meta.etag
    blobs.mkdir(parents=True, exist_ok=True)
    with FileLock(str(blobs / f"{meta.etag}.lock")):
        if blob.is_file():
            return blob
        partial = blobs / f"{meta.etag}.incomplete"
        bar = _progress_bar(progress, f"fetching {hub_repo(name)}", meta.size)
        failures = 0
        try:
            while (have := partial.stat().st_size if partial.exists() else 0) != meta.size:
                if have > meta.size:
                    partial.unlink()
                    continue
                try:
                    _get(url, partial, have, meta.size, hub, bar)
                except WeightsUnavailable:
                    raise
                except (OSError, http.client.HTTPException) as e:  # dropped, stalled, reset
                    failures += 1
                    if failures > RESUMES:
                        raise WeightsUnavailable(
                            f"fetching {url} failed after {RESUMES} resumed attempts ({_first_line(e)}); "
                            f"{partial.stat().st_size if partial.exists() else 0} of {meta.size} bytes are kept "
                            "and a rerun resumes from there.\n" + _ways_out(name, hub)) from None
                    time.sleep(1.0)
        finally:
            bar.close()
        if _SHA256.match(meta.etag) and (digest := _sha256_file(partial)) != meta.etag:
            partial.unlink()
            raise WeightsUnavailable(f"the file fetched from {url} is corrupt and was removed: its sha256 is "
                                     f"{digest}, the hub published {meta.etag}. Run again.")
        os.replace(partial, blob)
    return blob


def _headers() -> dict[str, str]:
    """The user agent, and the Hugging Face token when one is configured (HF_TOKEN, or
    ``hf auth login``'s file): gated or rate-limited files need it."""
    from huggingface_hub import get_token

    headers = {"User-Agent": "imgsim"}
    if token := get_token():
        headers["Authorization"] = f"Bearer {token}"
    return headers


class _TokenStaysHome(urllib.request.HTTPRedirectHandler):
    """Follows the hub's redirect to its file storage without the token: that host signs its
    URLs itself and has no business seeing the token (huggingface_hub does the same)."""

    def redirect_request(self, req, fp, code, msg, headers, newurl):
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and urllib.parse.urlsplit(newurl).netloc != urllib.parse.urlsplit(req.full_url).netloc:
            new.remove_header("Authorization")
        return new


def _get(url: str, partial: Path, have: int, size: int, hub: Hub, bar) -> None:
    """Append the bytes after ``have`` to ``partial`` (all of them when the server ignores the range)."""
    headers = _headers()
    if have:
        headers["Range"] = f"bytes={have}-"
    request = urllib.request.Request(url, headers=headers)
    try:
        # A fresh opener reads the proxy variables now (urlopen's is built once per process).
        response = urllib.request.build_opener(_TokenStaysHome).open(request, timeout=hub.timeout)
    except urllib.error.HTTPError as e:
        if e.code >= 500 or e.code == 429:
            raise OSError(f"HTTP {e.code}") from None  # the server's trouble: worth resuming
        raise WeightsUnavailable(f"fetching {url} failed: HTTP {e.code}.") from None
    with response:
        if response.status != 206 and have:  # the range was ignored: start over
            bar.update(-have)
            have = 0
        expected = size - have
        received = 0
        with open(partial, "ab" if have else "wb") as out:  # never past the announced size
            while received < expected and (chunk := response.read(min(1 << 20, expected - received))):
                out.write(chunk)
                received += len(chunk)
                bar.update(len(chunk))
        if received < expected:
            raise OSError(f"the connection closed after {have + received} of {size} bytes")


def fits(name: str, path: str | os.PathLike, depth: int | None = None) -> None:
    """ValueError unless ``path`` holds ``name``'s weights (names and shapes, on the meta device)."""
    import torch

    from imgsim_assets.core import dinov2

    with torch.device("meta"):
        model = dinov2.DinoVisionTransformer(models.VARIANTS[name], depth=depth)
    dinov2.fitting_state(model, dinov2.read_checkpoint(Path(path), mmap=True), source=f"checkpoint {path}")


def resolve(name: str, weights: str | os.PathLike = "auto", progress: Progress | None = None) -> str:
    """What ``weights`` means for ``name``: ``random``, or an absolute checkpoint or repo path.
    ``auto`` is the local file or, failing that, a fetched one."""
    if str(weights) == "random":
        return "random"
    if str(weights) == "auto":  # absolute, not resolved: a cache's file names are its links' names
        return str((find_local(name) or fetch(name, progress)).absolute())
    return str(Path(weights).expanduser().resolve())


def check(name: str, weights: str | os.PathLike = "auto", depth: int | None = None,
          progress: Progress | None = None) -> str:
    """What loading would fail on, found without loading (an unknown name, nothing to fetch, a
    missing path, a checkpoint that does not fit). Returns the resolved weights."""
    if name not in models.VARIANTS:
        raise ValueError(f"unknown DINOv2 model {name!r}; choose one of {', '.join(models.VARIANTS)}")
    resolved = resolve(name, weights, progress)
    if resolved == "random" or is_hub_repo(resolved):
        return resolved
    if not Path(resolved).is_file():
        raise FileNotFoundError(f"DINOv2 checkpoint {resolved} does not exist")
    fits(name, resolved, depth)
    return resolved


def fingerprint(resolved: str, name: str | None = None) -> str:
    """Which weights these are: ``sha256:<hex>`` of the checkpoint, or for seeded random
    weights the seed and the versions that make the model from it."""
    if resolved == "random":
        import timm
        import torch

        return f"random:seed={models.RANDOM_SEED}:torch={torch.__version__}:timm={timm.__version__}"
    path = Path(resolved)
    if is_hub_repo(path):  # the official hubconf loads the release file from torch hub's folder
        release = Hub.from_env().torch_home / "hub" / "checkpoints" / models.official_checkpoint_name(name or "")
        path = release if name and release.is_file() else path / "hubconf.py"
    return "sha256:" + sha256_of(path)


def short(fingerprint_: str | None) -> str:
    """A fingerprint as people read it: ``sha256:3f2a9c1b…`` or the random one whole."""
    if not fingerprint_:
        return "unknown"
    return fingerprint_[:19] + "…" if fingerprint_.startswith("sha256:") else fingerprint_


def _sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _digest_cache() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "imgsim" / "sha256.json"


def sha256_of(path: str | os.PathLike) -> str:
    """The file's sha256, hashed once per (path, size, mtime) and remembered."""
    real = Path(path).resolve()
    stat = real.stat()
    key = f"{real}:{stat.st_size}:{stat.st_mtime_ns}"
    cache = _digest_cache()
    try:
        known = json.loads(cache.read_text())
    except (OSError, ValueError):
        known = {}
    if isinstance(known, dict) and isinstance(known.get(key), str):
        return known[key]
    digest = _sha256_file(real)
    known = {k: v for k, v in (known if isinstance(known, dict) else {}).items() if not k.startswith(f"{real}:")}
    known[key] = digest
    try:
        cache.parent.mkdir(parents=True, exist_ok=True)
        tmp = cache.with_name(f".{cache.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(known, indent=0, sort_keys=True))
        os.replace(tmp, cache)
    except OSError:  # a read-only home: hash again next time
        pass
    return digest


@dataclass
class Available:
    """One variant as ``imgsim weights list`` shows it."""

    model: str
    repo: str
    size_bytes: int
    license: str
    found: str  # the local path, or "" when not fetched


def parameter_bytes(name: str) -> int:
    """The fp32 checkpoint's size, from the architecture (built on the meta device)."""
    import torch

    from imgsim_assets.core import dinov2

    with torch.device("meta"):
        model = dinov2.DinoVisionTransformer(models.VARIANTS[name])
    return 4 * sum(p.numel() for p in model.parameters())


def available(hub: Hub | None = None) -> list[Available]:
    hub = hub or Hub.from_env()
    return [Available(name, hub_repo(name), parameter_bytes(name), LICENSE, str(find_local(name, hub) or ""))
            for name in models.VARIANTS]


def _first_line(e: BaseException) -> str:
    text = str(e).strip()
    return text.splitlines()[0] if text else type(e).__name__


def _progress_bar(progress: Progress | None, label: str, total: int):
    """A progress bar (bytes, rate, ETA) on the terminal, also reporting to ``progress`` every
    few seconds (the Dagster run log)."""
    from huggingface_hub.utils import tqdm as hub_tqdm

    class Reporting(hub_tqdm):
        # Counted here: a bar that is disabled (no terminal, HF_HUB_DISABLE_PROGRESS_BARS) counts nothing.
        def update(self, n=1):
            now = time.monotonic()
            if not hasattr(self, "_began"):
                self._began, self._done, self._reported = now, 0, now
            self._done += n or 0
            if progress is not None and (self._done >= total or now - self._reported >= 5.0):
                self._reported = now
                progress(_progress_line(label, self._done, total, now - self._began))
            return super().update(n)

    return Reporting(total=total, unit="B", unit_scale=True, unit_divisor=1000, desc=label, leave=False)


def _progress_line(label: str, done: int, total: int, seconds: float) -> str:
    rate = done / max(seconds, 1e-9)
    return (f"{label}: {done / 1e6:.1f}/{total / 1e6:.1f} MB ({100 * done / max(total, 1):.0f}%), "
            f"{rate / 1e6:.1f} MB/s, ETA {(total - done) / max(rate, 1e-9):.0f} s")
