"""Image files → uint8 tensors: listing, hashing, decoding, cropping, and reasons for rejection.

Every file handed to :func:`preprocess_file` comes back as exactly one :class:`ImageRecord`,
either ``ok`` with its pixels or ``rejected`` with a machine-readable reason and the
library's message. Nothing raises for a bad file.
"""

from __future__ import annotations

import atexit
import collections
import concurrent.futures
import hashlib
import io
import itertools
import multiprocessing
import os
import threading
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

PATCH_SIZE = 14
DONE_MARKER = "_SUCCESS"

# Reasons a file is rejected. Stable strings: they end up in Parquet and in dashboards.
NOT_AN_IMAGE = "not_an_image"
EMPTY_FILE = "empty_file"
TRUNCATED = "truncated"
DECOMPRESSION_BOMB = "decompression_bomb"
TOO_SMALL = "too_small"
UNSUPPORTED_MODE = "unsupported_mode"
UNREADABLE = "unreadable"
DECODE_ERROR = "decode_error"
OUTSIDE_ROOT = "outside_root"  # a symlink that leads out of the images root

ORIENTATION_TAG = 0x0112

OK = "ok"
REJECTED = "rejected"

# Transparent pixels are composited on this colour so that RGBA and RGB copies of the same
# picture land close together.
BACKGROUND = (255, 255, 255)


def image_id_from_sha256(hexdigest: str) -> int:
    """The content address of an image: the first 63 bits of its SHA-256, as int64."""
    return int(hexdigest[:16], 16) & 0x7FFF_FFFF_FFFF_FFFF


@dataclass(frozen=True)
class Preprocess:
    """How a decoded image becomes a fixed-size uint8 tensor.

    ``dinov2_eval`` (default): resize the shorter side to ``resize_size`` (bicubic), then
    center-crop ``crop_size`` -- the DINOv2 / ImageNet evaluation protocol.
    ``grid``: resize straight to ``grid_size`` (height, width) without cropping, as in the
    seed article (e.g. 75×50 patches = 1050×700 pixels).
    """

    protocol: str = "dinov2_eval"
    crop_size: int = 224
    resize_size: int = 256
    grid_size: tuple[int, int] = (1050, 700)
    draft: bool = True
    max_pixels: int = 178_956_970  # Pillow's own default limit

    def __post_init__(self) -> None:
        if self.protocol not in ("dinov2_eval", "grid"):
            raise ValueError(f"unknown preprocessing protocol {self.protocol!r}; use 'dinov2_eval' or 'grid'")
        h, w = self.output_size
        if h % PATCH_SIZE or w % PATCH_SIZE:
            raise ValueError(
                f"output size {h}x{w} is not a multiple of the patch size {PATCH_SIZE}; "
                f"use e.g. {round(h / PATCH_SIZE) * PATCH_SIZE}x{round(w / PATCH_SIZE) * PATCH_SIZE}"
            )
        if self.protocol == "dinov2_eval" and self.resize_size < self.crop_size:
            raise ValueError(f"resize_size {self.resize_size} is smaller than crop_size {self.crop_size}")

    @property
    def output_size(self) -> tuple[int, int]:
        if self.protocol == "grid":
            return (int(self.grid_size[0]), int(self.grid_size[1]))
        return (self.crop_size, self.crop_size)

    def resized_size(self, width: int, height: int) -> tuple[int, int]:
        """(width, height) after the resize step, computed like torchvision's Resize."""
        if self.protocol == "grid":
            return (self.output_size[1], self.output_size[0])
        short, long = (width, height) if width <= height else (height, width)
        new_short, new_long = self.resize_size, int(self.resize_size * long / short)
        return (new_short, new_long) if width <= height else (new_long, new_short)

    def describe(self) -> dict:
        d = asdict(self)
        d["output_size"] = list(self.output_size)
        return d


@dataclass
class ImageRecord:
    """One row of the ``raw_images`` manifest."""

    path: str
    image_id: int = -1
    sha256: str = ""
    bytes: int = 0
    width: int = 0
    height: int = 0
    format: str = ""
    status: str = OK
    reason: str = ""
    message: str = ""

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) as displayed, after EXIF rotation."""
        return (self.width, self.height)

    def reject(self, reason: str, message: str) -> "ImageRecord":
        self.status, self.reason, self.message = REJECTED, reason, message
        return self


def list_batch_files(batch_dir: str | os.PathLike) -> list[Path]:
    """All files of a batch folder, recursively, in a stable order.

    Hidden entries (dot files) and the ``_SUCCESS`` completion marker are not images of the
    batch. Raises a clear error for a missing, unreadable or empty folder.
    """
    batch_dir = Path(batch_dir)
    if not batch_dir.is_dir():
        raise FileNotFoundError(f"image batch folder {batch_dir} does not exist or is not a folder")
    files: list[Path] = []
    errors: list[OSError] = []
    for dirpath, dirnames, filenames in os.walk(batch_dir, onerror=errors.append, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        for name in sorted(filenames):
            if name.startswith(".") or name == DONE_MARKER:
                continue
            files.append(Path(dirpath) / name)
    if errors and errors[0].filename == str(batch_dir):
        raise PermissionError(f"image batch folder {batch_dir} cannot be read: {errors[0].strerror}")
    if not files:
        raise ValueError(f"image batch folder {batch_dir} contains no files")
    return files


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode == "RGB":
        return im
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):
        # 16/32-bit greyscale: scale to 8 bits instead of clipping everything above 255.
        a = np.asarray(im, dtype=np.float64)
        top = 65535.0 if im.mode.startswith("I;16") else max(float(a.max()), 1.0)
        a = np.clip(a / top * 255.0 + 0.5, 0, 255).astype(np.uint8)
        return Image.fromarray(a, "L").convert("RGB")
    if im.mode == "P" and "transparency" in im.info:
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
        rgba = im.convert("RGBA")
        canvas = Image.new("RGB", rgba.size, BACKGROUND)
        canvas.paste(rgba, mask=rgba.getchannel("A"))
        return canvas
    return im.convert("RGB")


def _resize_and_crop(im: Image.Image, pre: Preprocess) -> Image.Image:
    """torchvision's ``Resize`` (bicubic, antialiased) then ``CenterCrop``, in one step.

    Resampling only the source box that lands in the crop gives the same pixels as resizing
    everything and cropping afterwards (same filter scale and sample centres) for less work.
    """
    out_h, out_w = pre.output_size
    new_w, new_h = pre.resized_size(*im.size)
    # Same rounding as torchvision.transforms.functional.center_crop.
    top = int(round((new_h - out_h) / 2.0))
    left = int(round((new_w - out_w) / 2.0))
    sx, sy = im.width / new_w, im.height / new_h
    box = (left * sx, top * sy, (left + out_w) * sx, (top + out_h) * sy)
    return im.resize((out_w, out_h), Image.BICUBIC, box=box)


def decode(data: bytes, pre: Preprocess, record: ImageRecord) -> np.ndarray | None:
    """Decode and preprocess one image to uint8 ``3×H×W``; on failure reject ``record``."""
    if not data:
        record.reject(EMPTY_FILE, "file is empty")
        return None
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            im = Image.open(io.BytesIO(data))
            record.format = im.format or ""
            width, height = im.size
            # The manifest reports the size as displayed, i.e. after EXIF rotation.
            orientation = im.getexif().get(ORIENTATION_TAG, 1)
            transposed = orientation in (5, 6, 7, 8)
            record.width, record.height = (height, width) if transposed else (width, height)
            if width * height > pre.max_pixels:
                record.reject(DECOMPRESSION_BOMB, f"{width}x{height} pixels exceeds the limit of {pre.max_pixels}")
                return None
            if width < PATCH_SIZE or height < PATCH_SIZE:
                record.reject(TOO_SMALL, f"{width}x{height} is smaller than one {PATCH_SIZE}px patch")
                return None
            frames = getattr(im, "n_frames", 1)
            if pre.draft and im.format == "JPEG":
                # DCT-domain downscale: decodes at 1/2, 1/4 or 1/8 size, never below the resize
                # target. The target is for the upright image; draft works before the rotation.
                target_w, target_h = pre.resized_size(*record.size)
                im.draft("RGB", (target_h, target_w) if transposed else (target_w, target_h))
            im.load()
            if orientation in (2, 3, 4, 5, 6, 7, 8):
                im = ImageOps.exif_transpose(im)
            im = _resize_and_crop(_to_rgb(im), pre)
            if frames > 1:
                record.message = f"first of {frames} frames"
            return np.asarray(im, dtype=np.uint8).transpose(2, 0, 1).copy()
    except UnidentifiedImageError as e:
        record.reject(NOT_AN_IMAGE, str(e))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        record.reject(DECOMPRESSION_BOMB, str(e))
    except OSError as e:
        msg = str(e)
        reason = TRUNCATED if ("truncated" in msg or "broken data stream" in msg or "image file is" in msg) else DECODE_ERROR
        record.reject(reason, msg)
    except (ValueError, KeyError, IndexError, SyntaxError, TypeError, EOFError) as e:
        record.reject(DECODE_ERROR, f"{type(e).__name__}: {e}")
    return None


def preprocess_file(path: str | os.PathLike, root: str | os.PathLike, pre: Preprocess) -> tuple[ImageRecord, np.ndarray | None]:
    """Read, hash and preprocess one file. Never raises for a bad file."""
    path = Path(path)
    record = ImageRecord(path=Path(os.path.relpath(path, root)).as_posix())
    try:
        real, real_root = path.resolve(), Path(root).resolve()
        if real != real_root and real_root not in real.parents:
            return record.reject(OUTSIDE_ROOT, f"links to {real}, outside {real_root}"), None
        data = path.read_bytes()
    except OSError as e:
        return record.reject(UNREADABLE, f"{type(e).__name__}: {e.strerror or e}"), None
    digest = hashlib.sha256(data).hexdigest()
    record.sha256, record.image_id, record.bytes = digest, image_id_from_sha256(digest), len(data)
    pixels = decode(data, pre, record)
    return record, pixels


def _preprocess_chunk(args: tuple[list[str], str, Preprocess]) -> list[tuple[ImageRecord, np.ndarray | None]]:
    paths, root, pre = args
    return [preprocess_file(p, root, pre) for p in paths]


_pool_lock = threading.Lock()
_pool: tuple[int, concurrent.futures.ProcessPoolExecutor] | None = None


def default_workers() -> int:
    return min(os.cpu_count() or 1, 8)


def decode_pool(workers: int = 0) -> concurrent.futures.ProcessPoolExecutor:
    """The process-wide pool of ``workers`` (0: one per CPU, at most 8) decode processes,
    started on first use and reused.

    Starting workers costs seconds (each imports the interpreter's main module), so one pool
    serves every batch a process decodes. spawn, not fork: the caller may be a threaded
    server process (Dagster's run worker).
    """
    global _pool
    workers = workers or default_workers()
    with _pool_lock:
        if _pool is not None and (_pool[0] != workers or _pool[1]._broken):
            _pool[1].shutdown(wait=False, cancel_futures=True)
            _pool = None
        if _pool is None:
            ctx = multiprocessing.get_context("spawn")
            _pool = (workers, concurrent.futures.ProcessPoolExecutor(max_workers=workers, mp_context=ctx))
        return _pool[1]


def shutdown_decode_pool() -> None:
    """Stop the decode processes (they are started again on demand)."""
    global _pool
    with _pool_lock:
        if _pool is not None:
            _pool[1].shutdown(wait=True, cancel_futures=True)
            _pool = None


# Stop the pool before the interpreter tears modules down (its threads need them).
atexit.register(shutdown_decode_pool)


def preprocess_files(
    paths: Iterable[str | os.PathLike],
    root: str | os.PathLike,
    pre: Preprocess,
    workers: int = 0,
    chunk: int = 16,
    prefetch: int = 2,
) -> Iterator[tuple[ImageRecord, np.ndarray | None]]:
    """Preprocess files in order, decoding in ``workers`` processes (0: one per CPU, 1: inline).

    Results stream back in input order while the workers decode ahead. At most
    ``prefetch`` chunks per worker are in flight, so a slow consumer (a model on a CPU)
    holds a bounded number of decoded images however many files there are.
    """
    paths = [str(p) for p in paths]
    workers = workers or default_workers()
    if workers <= 1 or len(paths) <= chunk:
        for p in paths:
            yield preprocess_file(p, root, pre)
        return
    chunks = iter([(paths[i : i + chunk], str(root), pre) for i in range(0, len(paths), chunk)])
    pool = decode_pool(workers)
    in_flight = collections.deque(pool.submit(_preprocess_chunk, c) for c in itertools.islice(chunks, workers * prefetch))
    try:
        while in_flight:
            results = in_flight.popleft().result()
            for c in itertools.islice(chunks, 1):
                in_flight.append(pool.submit(_preprocess_chunk, c))
            yield from results
    finally:
        for future in in_flight:  # abandoned early: drop what has not started
            future.cancel()


def records_to_columns(records: list[ImageRecord]) -> dict[str, list]:
    keys = list(ImageRecord.__dataclass_fields__)
    return {k: [getattr(r, k) for r in records] for k in keys}


def folder_fingerprint(files: Iterable[Path]) -> str:
    """Changes when a file is added, removed, resized or touched: cheap staleness for a batch."""
    h = hashlib.sha256()
    for f in files:
        st = f.stat()
        h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()[:16]
