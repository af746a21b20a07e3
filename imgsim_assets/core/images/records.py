"""One row of the ``raw_images`` manifest per file, ``ok`` or ``rejected`` with a reason."""

from __future__ import annotations

from dataclasses import dataclass

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

    def reject(self, rejected: Rejected) -> "ImageRecord":
        """The record of a file that ``rejected`` stopped (its message replaces any remark)."""
        self.status, self.reason, self.message = REJECTED, rejected.reason, rejected.message
        return self

    def note(self, message: str) -> None:
        """Add a remark to an ``ok`` record (``"; "``-separated)."""
        self.message = "; ".join(m for m in (self.message, as_text(message)) if m)


def records_to_columns(records: list[ImageRecord]) -> dict[str, list]:
    keys = list(ImageRecord.__dataclass_fields__)
    return {k: [getattr(r, k) for r in records] for k in keys}
