"""One row of the ``raw_images`` manifest per file, ``ok`` or ``rejected`` with a reason."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from imgsim_assets.core.images.metadata import PhotoMetadata
from imgsim_assets.core.images.names import as_text
from imgsim_assets.core.images.reasons import Rejected

OK = "ok"
REJECTED = "rejected"


@dataclass
class ImageRecord:
    """One row of the ``raw_images`` manifest.

    ``path`` is relative to the images root, ``/``-separated, and always valid UTF-8 (Parquet
    and JSON need it): the file name's bytes decoded as UTF-8, with each byte that is not valid
    UTF-8 written as ``\\xNN`` (two lowercase hex digits, always ``80``-``ff``), e.g. the
    Latin-1 name ``b"caf\\xe9.png"`` is ``"caf\\xe9.png"``. UTF-8 names are unchanged.
    :func:`os_path` undoes it; the one ambiguity is a name that itself contains the four
    characters ``\\x`` + two such hex digits. ``message`` is made valid UTF-8 the same way.

    ``width`` and ``height`` are as displayed (after EXIF rotation), None until the header is
    read; the photo fields (:class:`PhotoMetadata`) are None unless the file says; ``modified_at``
    is the file's mtime (UTC) when it was read.
    """

    path: str
    image_id: int = -1
    sha256: str = ""
    bytes: int = 0
    width: int | None = None
    height: int | None = None
    format: str = ""
    status: str = OK
    reason: str = ""
    message: str = ""
    captured_at: datetime | None = None
    capture_offset: str | None = None
    camera_make: str | None = None
    camera_model: str | None = None
    gps_latitude: float | None = None
    gps_longitude: float | None = None
    modified_at: datetime | None = None

    @property
    def size(self) -> tuple[int, int]:
        """(width, height) as displayed, after EXIF rotation."""
        return (self.width, self.height)

    @property
    def pixels(self) -> int | None:
        return self.width * self.height if self.width is not None and self.height is not None else None

    def describe(self, photo: PhotoMetadata) -> None:
        """Take the photo metadata the file's EXIF holds."""
        for name in PhotoMetadata.names():
            setattr(self, name, getattr(photo, name))

    def reject(self, rejected: Rejected) -> "ImageRecord":
        """The record of a file that ``rejected`` stopped (its message replaces any remark).
        Photo metadata read before is dropped: nothing is indexed to be found by it."""
        self.status, self.reason, self.message = REJECTED, rejected.reason, rejected.message
        self.describe(PhotoMetadata())
        return self

    def note(self, message: str) -> None:
        """Add a remark to an ``ok`` record (``"; "``-separated)."""
        self.message = "; ".join(m for m in (self.message, as_text(message)) if m)


def records_to_columns(records: list[ImageRecord]) -> dict[str, list]:
    """The manifest's columns (``tables.MANIFEST_SCHEMA``): every field, and ``pixels``."""
    keys = [*ImageRecord.__dataclass_fields__, "pixels"]
    return {k: [getattr(r, k) for r in records] for k in keys}
