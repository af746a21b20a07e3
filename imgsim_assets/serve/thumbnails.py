"""Indexed images for the page: originals and cached JPEG thumbnails, read only through the images root.

The path comes from the index's catalog (never from the request) and is resolved by
:func:`images.source_path`, which refuses anything outside the root; only regular files are
opened, with Pillow's pixel limit, so a FIFO or a bomb in a batch folder cannot hang or sink
the server. Thumbnails are written atomically under ``<assets>/.thumbnails``.
"""

from __future__ import annotations

import stat
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


def file_for(images_dir: Path, assets_dir: Path, image_id: int, path: str, size: int | None) -> Path:
    """The file to send for an indexed image: the original, or its thumbnail of ``size`` px."""
    try:
        source = images.source_path(images_dir, path)
        mode = source.stat().st_mode
    except ValueError as e:
        raise Unavailable(403, "outside_root", str(e)) from None
    except OSError as e:
        raise Unavailable(404, "gone", f"{path}: {e.strerror}") from None
    if not stat.S_ISREG(mode) or not source.resolve().is_relative_to(Path(images_dir).resolve()):
        raise Unavailable(403, "not_a_file", f"{path} is not a regular file inside the images root")
    if size is None:
        return source
    thumb = Path(assets_dir) / ".thumbnails" / f"{image_id}-{size}.jpg"
    if not thumb.exists():
        _draw(source, thumb, size)
    return thumb


def _draw(source: Path, thumb: Path, size: int) -> None:
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
        raise Unavailable(422, "cannot_draw", f"{type(e).__name__}: {e}") from None
    with atomic_path(thumb) as tmp:
        picture.save(tmp, format="JPEG", quality=85)
