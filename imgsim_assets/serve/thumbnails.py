"""Indexed images for the page: originals and cached JPEG thumbnails, read only through the images root.

The path comes from the index's catalog (never from the request) and is resolved by
:func:`images.source_path`, which refuses anything outside the root; only regular files are
opened, with Pillow's pixel limit, so a FIFO or a bomb in a batch folder cannot hang or sink
the server. Thumbnails are drawn at a few fixed sizes and written atomically under
``<assets>/.thumbnails``, a cache of bounded size.
"""

from __future__ import annotations

import contextlib
import stat
import threading
from pathlib import Path

from PIL import Image, ImageOps

from imgsim_assets.core import images
from imgsim_assets.core.storage import atomic_path

THUMBNAIL_PIXELS = 64_000_000  # larger originals are not drawn


class Unavailable(Exception):
    """The image is indexed but cannot be shown (moved, unreadable, not a picture any more)."""

    def __init__(self, status: int, error: str, detail: str) -> None:
        super().__init__(detail)
        self.status, self.error = status, error


SIZES = (64, 128, 256, 512)  # a thumbnail request is drawn at the next of these sizes
CACHE_BYTES = 256 << 20  # thumbnails kept on disk; the least recently drawn go first


class Thumbnails:
    """Originals, served with the type of what they decode as, and thumbnails at :data:`SIZES`
    in a cache of at most ``max_bytes``."""

    def __init__(self, images_dir: Path, cache_dir: Path, max_bytes: int = CACHE_BYTES) -> None:
        self.images_dir, self.cache_dir, self.max_bytes = Path(images_dir), Path(cache_dir), max_bytes
        self._lock = threading.Lock()
        self._held: int | None = None  # bytes in the cache, counted on first use

    def file_for(self, image_id: int, path: str, size: int | None) -> tuple[Path, str]:
        """(file, media type) to send for an indexed image: the original, or its thumbnail."""
        source = _source(self.images_dir, path)
        if size is None:
            return source, _media_type(source, path)
        size = next((s for s in SIZES if s >= size), SIZES[-1])
        thumb = self.cache_dir / f"{image_id}-{size}.jpg"
        if not thumb.exists():
            _draw(source, path, thumb, size)
            self._account(thumb.stat().st_size)
        return thumb, "image/jpeg"

    def _account(self, added: int) -> None:
        with self._lock:
            if self._held is None:
                self._held = sum(f.stat().st_size for f in self.cache_dir.glob("*.jpg"))
            else:
                self._held += added
            if self._held <= self.max_bytes:
                return
            files = sorted(self.cache_dir.glob("*.jpg"), key=lambda f: f.stat().st_mtime)
            for f in files:  # oldest first, down to three quarters of the budget
                if self._held <= self.max_bytes * 3 // 4:
                    break
                with contextlib.suppress(OSError):
                    self._held -= f.stat().st_size
                    f.unlink()


def _source(images_dir: Path, path: str) -> Path:
    try:
        source = images.source_path(images_dir, path)
        mode = source.stat().st_mode
    except ValueError as e:
        raise Unavailable(403, "outside_root", str(e)) from None
    except OSError as e:
        raise Unavailable(404, "gone", f"{path}: {e.strerror}") from None
    if not stat.S_ISREG(mode) or not source.resolve().is_relative_to(Path(images_dir).resolve()):
        raise Unavailable(403, "not_a_file", f"{path} is not a regular file inside the images root")
    return source


def _media_type(source: Path, path: str) -> str:
    """The type of what the file decodes as, whatever its name says (a picture with HTML after
    it, named .html or .svg, is served as the picture it is, and never run as a page)."""
    try:
        with Image.open(source) as im:
            kind = Image.MIME.get(im.format or "")
    except Exception:  # noqa: BLE001  (whatever Pillow says of a file that changed since)
        kind = None
    if not kind or not kind.startswith("image/") or kind == "image/svg+xml":
        raise Unavailable(415, "not_an_image", f"{path} does not decode as an image any more")
    return kind


def _draw(source: Path, path: str, thumb: Path, size: int) -> None:
    try:
        with Image.open(source) as im:
            if im.width * im.height > THUMBNAIL_PIXELS:
                raise Unavailable(422, "too_large", f"{im.width}x{im.height} is too large to draw")
            im.draft("RGB", (size, size))
            picture = ImageOps.exif_transpose(im).convert("RGB")
            picture.thumbnail((size, size))
    except Unavailable:
        raise
    except Exception as e:  # whatever Pillow says about a file that changed since it was indexed
        message = str(e).replace(str(source), path)
        raise Unavailable(422, "cannot_draw", f"{type(e).__name__}: {message}") from None
    with atomic_path(thumb) as tmp:
        picture.save(tmp, format="JPEG", quality=85)
