"""Which indexed images a search may answer with: :class:`Filters` (batches, capture time,
camera, size), and :class:`PhotoColumns`, the catalog's photo metadata as one numpy array per
column over the indexed images, on which a filter is evaluated for every image at once or for a
search's candidates only. No Python loop runs per image."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc

FILTER_COLUMNS = ("captured_at", "camera_make", "camera_model", "pixels")
NO_TIME = np.iinfo(np.int64).min  # a null capture time: below every bound
NO_PIXELS = -1
MAX_CAMERA = 128  # characters of a camera filter (the manifest keeps 128 of make and of model)


class FilterUnavailable(ValueError):
    """The searched vectors carry no photo metadata to filter on."""


NO_PHOTO_METADATA = ("this index was built before photo metadata was recorded, so it cannot filter by capture "
                     "time, camera or size: materialize faiss_index again (imgsim ingest after a new batch, or the UI)")


@dataclass(frozen=True)
class Filters:
    """What an answer may hold; each field that is set narrows it, all of them together.

    ``taken_after`` ≤ captured_at < ``taken_before``, both on the camera's local clock (the one
    EXIF records, with no offset); ``camera``: a case-insensitive substring of the camera's
    make and model joined by a space ("canon", "iphone 12", "apple iphone"); ``min_pixels``: width ×
    height at least this. An image whose file does not say fails every filter on what it lacks.
    """

    batches: tuple[str, ...] = ()
    taken_after: datetime | None = None
    taken_before: datetime | None = None
    camera: str | None = None
    min_pixels: int | None = None

    @classmethod
    def parse(cls, batches=(), taken_after=None, taken_before=None, camera=None, min_pixels=None) -> "Filters":
        """Filters from text as the CLI and the API take it (ISO 8601 dates or date-times,
        without an offset); ValueError naming what is wrong."""
        after, before = _time("taken_after", taken_after), _time("taken_before", taken_before)
        if after is not None and before is not None and after >= before:
            raise ValueError(f"taken_after ({after.isoformat()}) must be earlier than taken_before "
                             f"({before.isoformat()})")
        camera = (camera or "").strip() or None
        if camera is not None and len(camera) > MAX_CAMERA:
            raise ValueError(f"camera must be at most {MAX_CAMERA} characters")
        pixels = None
        if min_pixels is not None and str(min_pixels).strip() != "":
            try:
                pixels = int(str(min_pixels).strip())
            except ValueError:
                raise ValueError(f"min_pixels must be an integer, got {min_pixels!r}") from None
            if not 0 <= pixels < 2**62:
                raise ValueError(f"min_pixels must be between 0 and 2^62, got {pixels}")
        return cls(tuple(dict.fromkeys(batches or ())), after, before, camera, pixels)

    def with_batches(self, batches) -> "Filters":
        """These filters, and only ``batches`` besides (None or empty: as they are)."""
        if not batches:
            return self
        return Filters(tuple(dict.fromkeys((*self.batches, *batches))), self.taken_after, self.taken_before,
                       self.camera, self.min_pixels)

    @property
    def photo(self) -> bool:
        """Whether a filter on photo metadata is set."""
        return any(v is not None for v in (self.taken_after, self.taken_before, self.camera, self.min_pixels))

    def __bool__(self) -> bool:
        return bool(self.batches) or self.photo

    def key(self) -> tuple:
        """The same for filters that allow the same images."""
        return (tuple(sorted(set(self.batches))), self.taken_after, self.taken_before,
                self.camera.lower() if self.camera else None, self.min_pixels)

    def params(self) -> list[tuple[str, str]]:
        """As query-string pairs, the API's names (for clients)."""
        pairs = [("batch", b) for b in self.batches]
        for name in ("taken_after", "taken_before"):
            value = getattr(self, name)
            if value is not None:
                pairs.append((name, value.isoformat()))
        if self.camera is not None:
            pairs.append(("camera", self.camera))
        if self.min_pixels is not None:
            pairs.append(("min_pixels", str(self.min_pixels)))
        return pairs


def _time(name: str, value) -> datetime | None:
    if value is None or isinstance(value, datetime):
        parsed = value
    elif not str(value).strip():
        return None
    else:
        try:
            parsed = datetime.fromisoformat(str(value).strip())
        except ValueError:
            raise ValueError(f"{name} must be an ISO 8601 date or date-time (2021-06-30 or 2021-06-30T18:00), "
                             f"got {value!r}") from None
    if parsed is not None and parsed.tzinfo is not None:
        raise ValueError(f"{name} is compared with the camera's own clock, which EXIF records without a time "
                         f"zone: give it without an offset, got {value!r}")
    return parsed


def _microseconds(when: datetime) -> int:
    return int(np.datetime64(when, "us").astype(np.int64))


class PhotoColumns:
    """The photo metadata of every indexed image, one array per column in the order of
    ``image_ids`` (sorted), taken from each image's first catalog row: an image_id is its bytes,
    so all its files hold the same EXIF. The images are also kept in capture-time order and by
    camera, so that a narrow filter finds its images without a pass over all of them."""

    def __init__(self, catalog: pa.Table, first_rows: np.ndarray) -> None:
        self.size = len(first_rows)
        self.available = all(c in catalog.column_names for c in FILTER_COLUMNS)
        if not self.available:
            return
        rows = catalog.select(list(FILTER_COLUMNS)).take(pa.array(first_rows, pa.int64()))
        self.captured = _int64(rows["captured_at"].cast(pa.timestamp("us")).cast(pa.int64()), NO_TIME)
        self.pixels = _int64(rows["pixels"].cast(pa.int64()), NO_PIXELS)
        camera = pc.utf8_lower(pc.binary_join_element_wise(
            pc.fill_null(rows["camera_make"], ""), pc.fill_null(rows["camera_model"], ""), " "))
        camera = pc.if_else(pc.equal(pc.utf8_trim_whitespace(camera), ""), pa.scalar(None, pa.string()), camera)
        encoded = camera.combine_chunks().dictionary_encode() if isinstance(camera, pa.ChunkedArray) \
            else camera.dictionary_encode()
        self.cameras: list[str] = encoded.dictionary.to_pylist()  # distinct "make model", lower case
        # Codes shifted by one, so that 0 is "no camera" and a filter is one lookup per image.
        self.camera_codes = _int64(encoded.indices.cast(pa.int64()), -1).astype(np.int32) + 1
        self.by_time = np.argsort(self.captured, kind="stable")
        self.times = self.captured[self.by_time]
        self.by_pixels = np.argsort(self.pixels, kind="stable")
        self.sizes = self.pixels[self.by_pixels]
        self.by_camera = np.argsort(self.camera_codes, kind="stable")
        self.camera_starts = np.searchsorted(self.camera_codes[self.by_camera], np.arange(len(self.cameras) + 2))

    def require(self) -> None:
        if not self.available:
            raise FilterUnavailable(NO_PHOTO_METADATA)

    def mask(self, filters: Filters, images: np.ndarray | None = None, known: str | None = None) -> np.ndarray:
        """Which images pass ``filters``' photo conditions (batches are not looked at): every
        indexed image, or the ones at positions ``images`` (which pass the condition ``known``
        already: ``time``, ``pixels`` or ``camera``, as :meth:`narrowest` names them)."""
        n = self.size if images is None else len(images)
        keep = np.ones(n, dtype=bool)
        if not filters.photo:
            return keep
        self.require()

        def column(values: np.ndarray) -> np.ndarray:
            return values if images is None else values[images]

        if (filters.taken_after is not None or filters.taken_before is not None) and known != "time":
            captured = column(self.captured)
            if filters.taken_after is not None:
                keep &= captured >= _microseconds(filters.taken_after)
            if filters.taken_before is not None:
                keep &= (captured < _microseconds(filters.taken_before)) & (captured != NO_TIME)
        if filters.min_pixels is not None and known != "pixels":
            keep &= column(self.pixels) >= filters.min_pixels
        if filters.camera is not None and known != "camera":
            keep &= self._camera_table(filters.camera)[column(self.camera_codes)]
        return keep

    def _camera_table(self, camera: str) -> np.ndarray:
        """Per camera code, whether ``camera`` is part of its name (tested per distinct camera,
        not per image)."""
        wanted = camera.lower()
        table = np.zeros(len(self.cameras) + 1, dtype=bool)
        table[1:] = [wanted in name for name in self.cameras]
        return table

    def narrowest(self, filters: Filters) -> tuple[np.ndarray, str] | None:
        """The positions of the images one condition of ``filters`` allows, and its name: the
        capture time range (``time``: a slice of the images in time order), the minimum size
        (``pixels``: a slice in size order) or the camera (``camera``: the images of each
        matching camera), whichever holds fewest; None when none is set. The other conditions
        still have to be tested on them (:meth:`mask`)."""
        if not filters.photo:
            return None
        self.require()
        found = []
        if filters.taken_after is not None or filters.taken_before is not None:
            low = NO_TIME + 1 if filters.taken_after is None else _microseconds(filters.taken_after)
            high = None if filters.taken_before is None else _microseconds(filters.taken_before)
            start = np.searchsorted(self.times, max(low, NO_TIME + 1), "left")
            end = len(self.times) if high is None else np.searchsorted(self.times, high, "left")
            found.append((self.by_time[start:max(start, end)], "time"))
        if filters.min_pixels is not None:
            found.append((self.by_pixels[np.searchsorted(self.sizes, max(filters.min_pixels, 0), "left"):], "pixels"))
        if filters.camera is not None:
            table = self._camera_table(filters.camera)
            codes = np.flatnonzero(table)
            if len(codes) > len(self.cameras) // 2:  # most cameras: cheaper as one pass
                found.append((np.flatnonzero(table[self.camera_codes]), "camera"))
            else:
                found.append((np.concatenate([self.by_camera[self.camera_starts[c]:self.camera_starts[c + 1]]
                                              for c in codes]) if len(codes) else np.zeros(0, np.int64), "camera"))
        return min(found, key=lambda f: len(f[0])) if found else None


def _int64(column, null: int) -> np.ndarray:
    return np.asarray(pc.fill_null(column, null).to_numpy(zero_copy_only=False), dtype=np.int64)
