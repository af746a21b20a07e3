"""Image files → uint8 tensors: listing, hashing, decoding, cropping, and reasons for rejection.

Every file handed to :func:`preprocess_file` comes back as exactly one :class:`ImageRecord`,
either ``ok`` with its pixels or ``rejected`` with a machine-readable reason and the
library's message. Nothing raises for a bad file, and nothing blocks on one: FIFOs, sockets
and devices are rejected without being read, and a file that changes while it is read is
read again (the hash and the pixels always come from the same bytes).
"""

from __future__ import annotations

import atexit
import collections
import concurrent.futures
import contextlib
import hashlib
import io
import itertools
import multiprocessing
import os
import re
import stat
import struct
import threading
import time
import warnings
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np
from PIL import Image, UnidentifiedImageError

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
NOT_A_FILE = "not_a_file"  # a FIFO, socket, device or directory: never read
TOO_LARGE = "too_large"  # more bytes than Preprocess.max_file_bytes: never read
CHANGED_WHILE_READING = "changed_while_reading"  # still being written after READ_ATTEMPTS reads
REASONS = (NOT_AN_IMAGE, EMPTY_FILE, TRUNCATED, DECOMPRESSION_BOMB, TOO_SMALL, UNSUPPORTED_MODE, UNREADABLE,
           DECODE_ERROR, OUTSIDE_ROOT, NOT_A_FILE, TOO_LARGE, CHANGED_WHILE_READING)  # fmt: skip

ORIENTATION_TAG = 0x0112
# How to turn the stored pixels upright for each EXIF orientation (EXIF 2.3, tag 0x0112: where
# the stored 0th row and 0th column lie in the displayed picture). 1 and absent: as stored.
UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,  # 0th row top, 0th column right: mirrored
    3: Image.Transpose.ROTATE_180,  # bottom, right
    4: Image.Transpose.FLIP_TOP_BOTTOM,  # bottom, left
    5: Image.Transpose.TRANSPOSE,  # left, top
    6: Image.Transpose.ROTATE_270,  # right, top: display rotates 90° clockwise
    7: Image.Transpose.TRANSVERSE,  # right, bottom
    8: Image.Transpose.ROTATE_90,  # left, bottom: display rotates 90° counter-clockwise
}

# Formats Pillow can open that are never decoded: Pillow renders EPS by running Ghostscript,
# an external PostScript interpreter, on the file (a program, not a picture).
EXCLUDED_FORMATS = frozenset({"EPS"})

# A file whose size or mtime moves while it is read is read again, this many times in all.
READ_ATTEMPTS = 3
READ_RETRY_DELAY = 0.05  # seconds between reads of a changing file

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
    max_file_bytes: int = 256 * 2**20  # a file is read whole into memory

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
    """One row of the ``raw_images`` manifest.

    ``path`` is relative to the images root, ``/``-separated, and always valid UTF-8 (Parquet
    and JSON need it): the file name's bytes decoded as UTF-8, with each byte that is not valid
    UTF-8 written as ``\\xNN`` (two lowercase hex digits, always ``80``-``ff``), e.g. the
    Latin-1 name ``b"caf\\xe9.png"`` is ``"caf\\xe9.png"``. UTF-8 names are unchanged.
    :func:`os_path` undoes it; the one ambiguity is a name that itself contains the four
    characters ``\\x`` + two such hex digits. ``message`` is made valid UTF-8 the same way.
    """

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
        self.status, self.reason, self.message = REJECTED, reason, as_text(message)
        return self

    def note(self, message: str) -> None:
        """Add a remark to an ``ok`` record (``"; "``-separated)."""
        self.message = "; ".join(m for m in (self.message, as_text(message)) if m)


# --- Names: every path in a manifest is UTF-8 text ----------------------------------------


def as_text(s: str) -> str:
    """``s`` (an OS name, or a message quoting one) as valid UTF-8 text: an undecodable byte
    of an OS name (which Python carries as a lone surrogate) becomes ``\\xNN``; any other
    lone surrogate becomes ``\\udNNN``."""
    try:
        raw = s.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raw = s.encode("utf-8", "backslashreplace")
    return raw.decode("utf-8", "backslashreplace")


def record_path(path: str | os.PathLike, root: str | os.PathLike) -> str:
    """``path`` relative to ``root`` as :attr:`ImageRecord.path` spells it."""
    return as_text(Path(os.path.relpath(os.fsdecode(path), os.fsdecode(root))).as_posix())


_ESCAPED_BYTE = re.compile(r"\\x([89a-f][0-9a-f])")


def os_path(path: str) -> str:
    """The OS path (relative to the images root) of an :attr:`ImageRecord.path`: ``\\xNN``
    escapes become the raw bytes again (as Python's surrogate escapes, usable with ``open``)."""
    return _ESCAPED_BYTE.sub(lambda m: chr(0xDC00 + int(m[1], 16)), path)


def source_path(root: str | os.PathLike, path: str) -> Path:
    """The file that :attr:`ImageRecord.path` ``path`` names under ``root``, for reading it
    again (thumbnails, queries). A path that would lead out of ``root`` is refused."""
    root = os.path.normpath(os.fsdecode(root))
    full = os.path.normpath(os.path.join(root, os_path(path)))
    if os.path.isabs(os_path(path)) or os.path.commonpath([root, full]) != root:
        raise ValueError(f"manifest path {path!r} leads outside {root}")
    return Path(full)


# --- Listing a batch folder ---------------------------------------------------------------


def list_batch_files(batch_dir: str | os.PathLike) -> list[Path]:
    """All files of a batch folder, recursively, in a stable order.

    Hidden entries (dot files) and the ``_SUCCESS`` completion marker are not images of the
    batch. A subfolder that cannot be listed, and a symlink to a folder (not followed), are
    listed themselves, so that each gets a rejected row saying why its files are missing.
    Raises a clear error for a missing, unreadable or empty folder.
    """
    batch_dir = Path(batch_dir)
    if not batch_dir.is_dir():
        raise FileNotFoundError(f"image batch folder {batch_dir} does not exist or is not a folder")
    files: list[Path] = []
    errors: list[OSError] = []
    for dirpath, dirnames, filenames in os.walk(batch_dir, onerror=errors.append, followlinks=False):
        subfolders = sorted(d for d in dirnames if not d.startswith("."))
        linked = {d for d in subfolders if os.path.islink(os.path.join(dirpath, d))}
        dirnames[:] = [d for d in subfolders if d not in linked]
        for name in sorted([*filenames, *linked]):
            if name.startswith(".") or name == DONE_MARKER:
                continue
            files.append(Path(dirpath) / name)
    if errors and errors[0].filename == str(batch_dir):
        raise PermissionError(f"image batch folder {batch_dir} cannot be read: {errors[0].strerror}")
    files += sorted(Path(e.filename) for e in errors if e.filename)  # subfolders that cannot be listed
    if not files:
        raise ValueError(f"image batch folder {batch_dir} contains no files")
    return files


# --- Decoding bytes into a fixed-size tensor ----------------------------------------------


class UnsupportedMode(ValueError):
    """Pillow decoded the pixels but cannot convert their mode to RGB."""


def _to_rgb(im: Image.Image) -> Image.Image:
    if im.mode in ("P", "L", "RGB") and "transparency" in im.info:
        # A palette entry's alpha or a colour key (PNG tRNS, GIF): transparent like alpha.
        im = im.convert("RGBA")
    if im.mode == "RGB":
        return im
    if im.mode.startswith("I;16") or im.mode in ("I", "F"):
        # 16/32-bit and float greyscale: scale to 8 bits instead of clipping above 255. 16-bit
        # data spans 0-65535; 32-bit integers and floats are scaled by their maximum (floats
        # in 0-1, the usual convention, by 1).
        a = np.asarray(im, dtype=np.float64)
        peak = float(np.nanmax(a)) if a.size else 0.0
        top = 65535.0 if im.mode.startswith("I;16") else (1.0 if im.mode == "F" and peak <= 1.0 else max(peak, 1.0))
        a = np.clip(np.nan_to_num(a / top * 255.0 + 0.5), 0, 255).astype(np.uint8)
        return Image.fromarray(a, "L").convert("RGB")
    try:
        if im.mode in ("RGBA", "LA", "PA", "RGBa", "La"):
            rgba = im.convert("RGBA")
            canvas = Image.new("RGB", rgba.size, BACKGROUND)
            canvas.paste(rgba, mask=rgba.getchannel("A"))
            return canvas
        return im.convert("RGB")
    except ValueError as e:  # Pillow: "conversion from X to Y not supported"
        raise UnsupportedMode(f"mode {im.mode}: {e}") from e


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


# What Pillow's readers raise for a corrupt file: OSError from the decoders, SyntaxError,
# struct.error and friends from the header parsers, zlib.error from a broken deflate stream.
_DECODER_ERRORS = (
    OSError, SyntaxError, ValueError, TypeError, KeyError, IndexError, EOFError,
    struct.error, zlib.error, ArithmeticError,
)  # fmt: skip
_BUFFER_REPR = re.compile(r" ?<_io\.BytesIO object at 0x[0-9a-fA-F]+>")
_TRUNCATION = re.compile(r"truncated|broken data stream|premature end|unexpected end", re.IGNORECASE)


def _open_formats() -> list[str]:
    """The formats :func:`decode` opens: all that Pillow knows but ``EXCLUDED_FORMATS``."""
    Image.init()
    return [f for f in Image.ID if f not in EXCLUDED_FORMATS]


def _orientation(im: Image.Image) -> tuple[int, str]:
    """The EXIF orientation, 1 to 8, and a remark when the tag or the EXIF block is unusable
    (then the picture is used as stored, orientation 1)."""
    try:
        value = im.getexif().get(ORIENTATION_TAG, 1)
    except _DECODER_ERRORS as e:
        return 1, f"EXIF ignored ({type(e).__name__}: {e})"
    if isinstance(value, int) and value in UPRIGHT:
        return value, ""
    return 1, "" if (isinstance(value, int) and value == 1) else f"EXIF orientation {value!r} ignored"


def _frame_count(im: Image.Image) -> tuple[int, str]:
    """How many frames (pages) the file has, and a remark when that cannot be told.

    Asked after the first frame is decoded: counting seeks through the whole file, and a
    corrupt later frame must not cost the first one.
    """
    try:
        return int(getattr(im, "n_frames", 1)), ""
    except _DECODER_ERRORS as e:
        return 1, f"first frame; frame count unknown ({type(e).__name__}: {e})"


def _cut_short(data: bytes) -> bool:
    """Whether the file ends before its container says it does (asked after a decode error)."""
    if data[:4] == b"RIFF" and len(data) >= 8:  # WebP: the RIFF header holds the length
        return int.from_bytes(data[4:8], "little") + 8 > len(data)
    if data[:8] == b"\x89PNG\r\n\x1a\n":
        return b"IEND" not in data[-12:]
    if data[:3] == b"GIF":
        return not data.endswith(b";")
    if data[:2] == b"\xff\xd8":  # JPEG: ends with EOI, sometimes padded with zeros
        return not data.rstrip(b"\0").endswith(b"\xff\xd9")
    return False


@contextlib.contextmanager
def _pixel_limit(max_pixels: int) -> Iterator[None]:
    """Pillow's own bomb limit (a module global) set to ``max_pixels`` for one decode, so
    that a limit above Pillow's default is honoured too."""
    previous, Image.MAX_IMAGE_PIXELS = Image.MAX_IMAGE_PIXELS, max_pixels
    try:
        yield
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def decode(data: bytes, pre: Preprocess, record: ImageRecord) -> np.ndarray | None:
    """Decode and preprocess one image to uint8 ``3×H×W``; on failure reject ``record``.

    Never raises for bad data: each failure becomes a reason (see the constants at the top).
    """
    if not data:
        record.reject(EMPTY_FILE, "file is empty")
        return None
    try:
        with warnings.catch_warnings(), _pixel_limit(pre.max_pixels):
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return _decode(data, pre, record)
    except UnidentifiedImageError as e:
        # Pillow names the in-memory buffer, address included: drop it, messages stay stable.
        record.reject(NOT_AN_IMAGE, _BUFFER_REPR.sub("", str(e)))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as e:
        record.reject(DECOMPRESSION_BOMB, str(e))
    except UnsupportedMode as e:
        record.reject(UNSUPPORTED_MODE, str(e))
    except _DECODER_ERRORS as e:
        message = str(e) if isinstance(e, OSError) else f"{type(e).__name__}: {e}"
        truncated = _TRUNCATION.search(message) or _cut_short(data)
        record.reject(TRUNCATED if truncated else DECODE_ERROR, message)
    except Exception as e:  # noqa: BLE001
        # Last resort: a decoder bug outside the errors above (MemoryError, an assertion in a
        # plugin) must cost one file, not the batch. The type name says what to map next.
        record.reject(DECODE_ERROR, f"unexpected {type(e).__name__}: {e}")
    return None


def _decode(data: bytes, pre: Preprocess, record: ImageRecord) -> np.ndarray | None:
    """:func:`decode` without the error handling."""
    im = Image.open(io.BytesIO(data), formats=_open_formats())
    record.format = im.format or ""
    width, height = im.size
    orientation, exif_remark = _orientation(im)
    transposed = orientation in (5, 6, 7, 8)
    # The manifest reports the size as displayed, i.e. after EXIF rotation.
    record.width, record.height = (height, width) if transposed else (width, height)
    if width * height > pre.max_pixels:
        record.reject(DECOMPRESSION_BOMB, f"{width}x{height} pixels exceeds the limit of {pre.max_pixels}")
        return None
    if width < PATCH_SIZE or height < PATCH_SIZE:
        record.reject(TOO_SMALL, f"{width}x{height} is smaller than one {PATCH_SIZE}px patch")
        return None
    if pre.draft and im.format == "JPEG":
        # DCT-domain downscale: decodes at 1/2, 1/4 or 1/8 size, never below the resize
        # target. The target is for the upright image; draft works before the rotation.
        target_w, target_h = pre.resized_size(*record.size)
        im.draft("RGB", (target_h, target_w) if transposed else (target_w, target_h))
    im.load()
    if orientation != 1 and _orientation(im)[0] != orientation:
        # The reader rotated the pixels itself while loading and dropped the tag; it reported
        # the upright size from the start (recent Pillows' TIFF reader does).
        orientation = 1
        record.width, record.height = width, height
    upright = im.transpose(UPRIGHT[orientation]) if orientation != 1 else im
    pixels = np.asarray(_resize_and_crop(_to_rgb(upright), pre), dtype=np.uint8).transpose(2, 0, 1).copy()
    frames, frames_remark = _frame_count(im)
    if frames > 1:
        record.note(f"first of {frames} frames")
    for remark in (frames_remark, exif_remark):
        if remark:
            record.note(remark)
    return pixels


# --- Reading a file: regular, inside the root, unchanged ----------------------------------


class _NotRegular(Exception):
    """The path is a FIFO, socket, device or directory (the message says which)."""


_KINDS = {stat.S_IFDIR: "a directory", stat.S_IFIFO: "a FIFO", stat.S_IFSOCK: "a socket",
          stat.S_IFCHR: "a character device", stat.S_IFBLK: "a block device"}  # fmt: skip
# Opening never blocks (a FIFO without a writer would) nor makes a terminal ours.
_OPEN_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_NOCTTY", 0) | getattr(os, "O_CLOEXEC", 0)


def _check_regular(st: os.stat_result) -> None:
    if not stat.S_ISREG(st.st_mode):
        raise _NotRegular(f"{_KINDS.get(stat.S_IFMT(st.st_mode), 'not a file')}, not a regular file")


def _read_fd(fd: int) -> bytes:
    """Everything from ``fd`` to its end. (Tests replace it to change a file mid-read.)"""
    with io.FileIO(fd, "rb", closefd=False) as f:
        return f.readall()


class _TooLarge(Exception):
    """The file has more bytes than the limit (the message says how many)."""


def _read_once(path: Path, max_bytes: int) -> tuple[bytes, str]:
    """The bytes of the regular file ``path``, and what changed while they were read ("" if
    nothing did)."""
    _check_regular(os.stat(path))  # before opening: opening a device can have effects
    fd = os.open(path, _OPEN_FLAGS)
    try:
        before = os.fstat(fd)
        _check_regular(before)  # what was opened, should the path have been replaced since
        if before.st_size > max_bytes:
            raise _TooLarge(f"{before.st_size} bytes exceeds the limit of {max_bytes}")
        data = _read_fd(fd)
        after = os.fstat(fd)
    finally:
        os.close(fd)
    if before.st_size != after.st_size:
        return data, f"size changed from {before.st_size} to {after.st_size} bytes while reading"
    if before.st_mtime_ns != after.st_mtime_ns:
        return data, "modified (mtime changed) while reading"
    if len(data) != after.st_size:
        return data, f"read {len(data)} bytes of a {after.st_size}-byte file"
    return data, ""


def read_file(
    path: str | os.PathLike, root: str | os.PathLike, record: ImageRecord, max_bytes: int = Preprocess.max_file_bytes
) -> bytes | None:
    """The bytes of ``path``, read whole and unchanged; on failure reject ``record``.

    Only regular files inside ``root`` (symlinks resolved) of at most ``max_bytes`` are read.
    A file that changes while it is read (still being copied in) is read again, up to
    ``READ_ATTEMPTS`` times. A folder gets here when :func:`list_batch_files` could not list
    it or found it behind a symlink: its row says which.
    """
    path = Path(os.fsdecode(path))
    try:
        real, real_root = path.resolve(), Path(os.fsdecode(root)).resolve()
    except (OSError, RuntimeError) as e:  # RuntimeError: a symlink loop, before Python 3.13
        record.reject(UNREADABLE, f"{type(e).__name__}: {getattr(e, 'strerror', None) or e}")
        return None
    if real != real_root and real_root not in real.parents:
        record.reject(OUTSIDE_ROOT, f"links to {real}, outside {real_root}")
        return None
    if real.is_dir():
        return _reject_folder(path, real, record)
    for attempt in range(READ_ATTEMPTS):
        if attempt:
            time.sleep(READ_RETRY_DELAY)
        try:
            data, changed = _read_once(real, max_bytes)
        except _NotRegular as e:
            record.reject(NOT_A_FILE, str(e))
            return None
        except _TooLarge as e:
            record.reject(TOO_LARGE, str(e))
            return None
        except (OSError, ValueError) as e:  # ValueError: a NUL byte in the path
            record.reject(UNREADABLE, f"{type(e).__name__}: {getattr(e, 'strerror', None) or e}")
            return None
        if not changed:
            return data
    record.reject(CHANGED_WHILE_READING, f"{changed} ({READ_ATTEMPTS} reads)")
    return None


def _reject_folder(path: Path, real: Path, record: ImageRecord) -> None:
    try:
        with os.scandir(real):
            pass
    except OSError as e:
        record.reject(UNREADABLE, f"folder cannot be listed ({type(e).__name__}: {e.strerror or e}); "
                                  "the files in it are not part of the batch")
        return None
    if path.is_symlink():
        record.reject(NOT_A_FILE, f"a symlink to the folder {real}: folders behind links are not followed")
    else:
        record.reject(NOT_A_FILE, "a directory, not a regular file")
    return None


# --- One file: read, hash, decode ---------------------------------------------------------


def preprocess_file(path: str | os.PathLike, root: str | os.PathLike, pre: Preprocess) -> tuple[ImageRecord, np.ndarray | None]:
    """Read, hash and preprocess one file. Never raises for a bad file."""
    path = Path(os.fsdecode(path))
    record = ImageRecord(path=record_path(path, root))
    data = read_file(path, root, record, pre.max_file_bytes)
    if data is None:
        return record, None
    digest = hashlib.sha256(data).hexdigest()
    record.sha256, record.image_id, record.bytes = digest, image_id_from_sha256(digest), len(data)
    pixels = decode(data, pre, record)
    return record, pixels


# --- Many files: decode worker processes --------------------------------------------------


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
    paths = [os.fsdecode(p) for p in paths]
    workers = workers or default_workers()
    if workers <= 1 or len(paths) <= chunk:
        for p in paths:
            yield preprocess_file(p, root, pre)
        return
    chunks = iter([(paths[i : i + chunk], os.fsdecode(root), pre) for i in range(0, len(paths), chunk)])
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
    """Changes when a file is added, removed, resized or touched: cheap staleness for a batch.

    A link is fingerprinted by its target, a dangling one by the link itself; an entry that
    vanished counts as such (the batch is then stale, which it is).
    """
    h = hashlib.sha256()
    for f in files:
        try:
            st = os.stat(f)
        except OSError:
            try:
                st = os.lstat(f)
            except OSError:
                h.update(f"{f}\0gone\n".encode("utf-8", "surrogateescape"))
                continue
        h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()[:16]
