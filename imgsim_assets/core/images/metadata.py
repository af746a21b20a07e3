"""What a photograph says about itself in its EXIF: when it was taken, by which camera, where.

Read from the :class:`PIL.Image.Exif` the decoder parses anyway for the orientation (for a JPEG,
the APP1 block already in memory), so no file is opened twice. Cameras and editors write all
sorts of things, and files arrive damaged or crafted: every value that is missing, malformed or
out of range is None, and nothing here raises. Metadata never costs a picture its place.
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass, fields
from datetime import datetime, timedelta
from numbers import Real

from PIL import Image

EXIF_IFD, GPS_IFD = 0x8769, 0x8825
MAKE, MODEL, DATETIME = 0x010F, 0x0110, 0x0132
DATETIME_ORIGINAL, DATETIME_DIGITIZED = 0x9003, 0x9004
OFFSET_TIME, OFFSET_TIME_ORIGINAL, OFFSET_TIME_DIGITIZED = 0x9010, 0x9011, 0x9012
SUBSEC_TIME, SUBSEC_TIME_ORIGINAL, SUBSEC_TIME_DIGITIZED = 0x9290, 0x9291, 0x9292
GPS_LATITUDE_REF, GPS_LATITUDE, GPS_LONGITUDE_REF, GPS_LONGITUDE = 1, 2, 3, 4

# The capture time is the first of these dates that parses, each with its own sub-second and
# UTC-offset tags (EXIF 2.31); OffsetTime stands in for a missing offset (some phones write
# only that one).
CAPTURE_TIMES = (
    (DATETIME_ORIGINAL, SUBSEC_TIME_ORIGINAL, OFFSET_TIME_ORIGINAL),
    (DATETIME_DIGITIZED, SUBSEC_TIME_DIGITIZED, OFFSET_TIME_DIGITIZED),
    (DATETIME, SUBSEC_TIME, OFFSET_TIME),
)
MAX_TEXT = 128  # characters kept of a camera's make or model: a crafted file may hold megabytes there
# Sub-IFDs (Exif, GPS) are parsed only from EXIF blocks up to this size: a block can make
# Pillow copy a slice of itself per entry, so parsing cost grows with its square. Cameras write
# tens of kilobytes; JPEG caps a block at 64 KiB.
MAX_EXIF_BYTES = 1 << 20

_DATE = re.compile(r"\s*(\d{4})[:-](\d{2})[:-](\d{2})[ T](\d{2}):(\d{2}):(\d{2})(?:\.(\d{1,9}))?\s*$")
_OFFSET = re.compile(r"\s*([+-])(\d{2}):(\d{2})\s*$")
_DIGITS = re.compile(r"\s*(\d{1,9})")


@dataclass
class PhotoMetadata:
    """The manifest's photo columns; None wherever the file does not say, or says nonsense."""

    captured_at: datetime | None = None  # the camera's local wall-clock time (naive)
    capture_offset: str | None = None  # that clock's UTC offset, "+HH:MM"
    camera_make: str | None = None
    camera_model: str | None = None
    gps_latitude: float | None = None  # decimal degrees, south negative
    gps_longitude: float | None = None  # decimal degrees, west negative

    @classmethod
    def names(cls) -> tuple[str, ...]:
        return tuple(f.name for f in fields(cls))


def photo_metadata(exif: Image.Exif | None, exif_bytes: int = 0) -> PhotoMetadata:
    """The photo metadata of a parsed EXIF block (``exif_bytes`` long, when known)."""
    found = PhotoMetadata()
    if exif is None:
        return found
    with warnings.catch_warnings():  # Pillow warns about corrupt EXIF: the None values say it
        warnings.simplefilter("ignore")
        base = _safe(lambda: dict(exif), {})
        deep = exif_bytes <= MAX_EXIF_BYTES
        detail = _safe(lambda: dict(exif.get_ifd(EXIF_IFD)), {}) if deep else {}
        gps = _safe(lambda: dict(exif.get_ifd(GPS_IFD)), {}) if deep else {}
    found.camera_make = _text(base.get(MAKE))
    found.camera_model = _text(base.get(MODEL))

    def lookup(tag):  # some writers put the Exif IFD's tags in IFD0 (plain TIFF writers only there)
        return detail.get(tag, base.get(tag))

    for date_tag, subsec_tag, offset_tag in CAPTURE_TIMES:
        when = _safe(lambda: _date(lookup(date_tag), lookup(subsec_tag)), None)
        if when is not None:
            found.captured_at = when
            found.capture_offset = _offset(lookup(offset_tag)) or _offset(lookup(OFFSET_TIME))
            break
    position = _safe(lambda: _position(gps), None)
    if position is not None:
        found.gps_latitude, found.gps_longitude = position
    return found


def _safe(read, default):
    try:
        return read()
    except Exception:  # noqa: BLE001 -- a crafted block can make Pillow raise anything; it is just absent
        return default


def _string(value) -> str | None:
    if isinstance(value, bytes):
        value = value.decode("latin-1")
    if not isinstance(value, str):
        return None
    return value.split("\0", 1)[0]  # C strings, often NUL-padded to a fixed width


def _text(value) -> str | None:
    text = _string(value)
    if text is None:
        return None
    text = "".join(c if c.isprintable() else " " for c in text[: 4 * MAX_TEXT]).strip()
    return text[:MAX_TEXT].rstrip() or None


def _date(value, subsec) -> datetime | None:
    """An EXIF date (``YYYY:MM:DD HH:MM:SS``; ``-`` and ``T`` tolerated) as a naive datetime, with
    its sub-second tag's fraction; None for blanks and impossible dates (``0000:00:00 ...``)."""
    text = _string(value)
    match = _DATE.match(text) if text else None
    if not match:
        return None
    year, month, day, hour, minute, second = (int(g) for g in match.groups()[:6])
    fraction = match.group(7)
    extra = _DIGITS.match(_string(subsec) or "")
    if extra:
        fraction = extra.group(1)
    micro = int((fraction or "0")[:6].ljust(6, "0"))
    try:
        if second == 60:  # a leap second: the next minute's first
            return datetime(year, month, day, hour, minute, 59, micro) + timedelta(seconds=1)
        return datetime(year, month, day, hour, minute, second, micro)
    except (ValueError, OverflowError):
        return None


def _offset(value) -> str | None:
    text = _string(value)
    match = _OFFSET.match(text) if text else None
    if not match:
        return None
    sign, hours, minutes = match.group(1), int(match.group(2)), int(match.group(3))
    if hours > 14 or minutes > 59 or (hours == 14 and minutes):  # UTC-12:00 to UTC+14:00 exist
        return None
    return f"{sign}{hours:02d}:{minutes:02d}"


def _position(gps: dict) -> tuple[float, float] | None:
    """(latitude, longitude) in signed decimal degrees, or None unless both are usable."""
    latitude = _coordinate(gps.get(GPS_LATITUDE), gps.get(GPS_LATITUDE_REF), "NS", 90.0)
    longitude = _coordinate(gps.get(GPS_LONGITUDE), gps.get(GPS_LONGITUDE_REF), "EW", 180.0)
    if latitude is None or longitude is None:
        return None
    return latitude, longitude


def _coordinate(value, ref, hemispheres: str, limit: float) -> float | None:
    ref = (_string(ref) or "").strip().upper()
    if ref not in hemispheres or len(ref) != 1 or not isinstance(value, tuple) or not 1 <= len(value) <= 3:
        return None
    parts = [_number(v) for v in value]
    if any(p is None or p < 0 for p in parts):
        return None
    degrees = sum(p / 60**i for i, p in enumerate(parts))
    if not degrees <= limit:
        return None
    return -degrees if ref == hemispheres[1] else degrees


def _number(value) -> float | None:
    """A finite EXIF number: a rational (zero denominators are no number), a (numerator,
    denominator) pair as older Pillows give, an int or a float."""
    if isinstance(value, tuple) and len(value) == 2:
        numerator, denominator = value
        if not (isinstance(numerator, int) and isinstance(denominator, int)) or denominator == 0:
            return None
        value = numerator / denominator
    denominator = getattr(value, "denominator", 1)
    if denominator == 0 or not isinstance(value, Real):
        return None
    number = float(value)
    return number if math.isfinite(number) else None
