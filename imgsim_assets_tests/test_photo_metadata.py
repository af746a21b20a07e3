"""Photo metadata in the raw_images manifest, read in the pass that decodes each file: capture
time and offset, camera, size as displayed, GPS, mtime; nulls, never rejections, for whatever is
missing or malformed; and manifests written before these columns still index and search."""

import io
import os
import struct
from datetime import datetime, timedelta, timezone

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from dagster import instance_for_test
from PIL import Image
from PIL.TiffImagePlugin import IFDRational

from imgsim_assets.core import build, images, tables
from imgsim_assets.core.filters import Filters
from imgsim_assets.core.images import metadata as md
from imgsim_assets.core.search import FaissSearcher
from imgsim_assets.ingest import ingest, run_job
from imgsim_assets_tests.pictures import encode, photo
from imgsim_assets_tests.run_processes import tiny_definitions

# The manifest as it was before the photo columns: what older runs left on disk.
OLD_MANIFEST_SCHEMA = pa.schema([
    ("path", pa.string()), ("image_id", pa.int64()), ("sha256", pa.string()), ("bytes", pa.int64()),
    ("width", pa.int32()), ("height", pa.int32()), ("format", pa.string()), ("status", pa.string()),
    ("reason", pa.string()), ("message", pa.string()),
])
MTIME_NS = 1_600_000_000_123_456_789  # 2020-09-13 12:26:40.123456789 UTC


def _exif(make=None, model=None, orientation=None, datetime_=None, detail=None, gps=None) -> Image.Exif:
    exif = Image.Exif()
    for tag, value in ((md.MAKE, make), (md.MODEL, model), (images.ORIENTATION_TAG, orientation),
                       (md.DATETIME, datetime_)):
        if value is not None:
            exif[tag] = value
    if detail:
        exif.get_ifd(md.EXIF_IFD).update(detail)
    if gps:
        exif.get_ifd(md.GPS_IFD).update(gps)
    return exif


def _with_app1(jpeg: bytes, payload: bytes) -> bytes:
    """``jpeg`` with an APP1 segment holding ``payload`` right after its SOI marker."""
    return jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + jpeg[2:]


def _picture(seed: int, h: int = 48, w: int = 64) -> Image.Image:
    return Image.fromarray(photo(h, w, seed))


def _photo_batch(folder):
    """Files carrying EXIF of every kind, well and badly formed; returns {name: expected row}."""
    folder.mkdir(parents=True)
    south, west = (IFDRational(33, 1), IFDRational(51, 1), IFDRational(109, 2)), (70, 40, 0)
    camera = _exif(
        make="Canon\0\0  ", model="  Canon EOS 5D Mark IV\0", orientation=6, datetime_="2022:01:01 00:00:00",
        detail={md.DATETIME_ORIGINAL: "2021:06:15 14:30:05", md.SUBSEC_TIME_ORIGINAL: "042",
                md.OFFSET_TIME_ORIGINAL: "+02:00", md.OFFSET_TIME: "+09:00"},
        gps={md.GPS_LATITUDE_REF: "S", md.GPS_LATITUDE: south, md.GPS_LONGITUDE_REF: "W", md.GPS_LONGITUDE: west})
    scan = _exif(make="EPSON", model="Perfection V600", datetime_="2019:12:31 23:59:59",
                 detail={md.OFFSET_TIME: "-05:30"})
    scan[md.DATETIME_ORIGINAL] = "2019:12:30 10:00:00"  # plain TIFF writers keep every tag in IFD0
    phone = _exif(detail={md.DATETIME_DIGITIZED: "2020-02-29T08:00:00", md.SUBSEC_TIME_DIGITIZED: "5",
                          md.OFFSET_TIME: "-03:00"})
    garbage = _exif(
        make="\0\0\0", model="\x01\x02", datetime_="    :  :     :  :  ",
        detail={md.DATETIME_ORIGINAL: "0000:00:00 00:00:00", md.DATETIME_DIGITIZED: "2021:02:30 12:00:00",
                md.OFFSET_TIME_ORIGINAL: "+99:00"},
        gps={md.GPS_LATITUDE_REF: "N", md.GPS_LATITUDE: (IFDRational(1, 0), IFDRational(0, 0), IFDRational(0, 1)),
             md.GPS_LONGITUDE_REF: "E", md.GPS_LONGITUDE: (IFDRational(10, 1), 0, 0)})
    out_of_range = _exif(model="X", gps={md.GPS_LATITUDE_REF: "N", md.GPS_LATITUDE: (91, 0, 0),
                                         md.GPS_LONGITUDE_REF: "E", md.GPS_LONGITUDE: (10, 0, 0)})
    # An EXIF block whose first directory lies far past its end, and one that is noise.
    lost = b"Exif\0\0II*\0" + struct.pack("<I", 0x7FFFFFF0) + b"\0" * 16
    noise = b"Exif\0\0" + np.random.default_rng(7).integers(0, 256, 4000, dtype=np.uint8).tobytes()
    files = {
        "camera.jpg": encode(_picture(1), "JPEG", exif=camera.tobytes()),
        "scan.tif": encode(_picture(2, 30, 40), "TIFF", exif=scan),
        "phone.png": encode(_picture(3), "PNG", exif=phone.tobytes()),
        "garbage.jpg": encode(_picture(4), "JPEG", exif=garbage.tobytes()),
        "out_of_range.webp": encode(_picture(5), "WEBP", exif=out_of_range.tobytes()),
        "lost.jpg": _with_app1(encode(_picture(6), "JPEG"), lost),
        "noise.jpg": _with_app1(encode(_picture(7), "JPEG"), noise),
        "plain.png": encode(_picture(8), "PNG"),
        "cut.jpg": encode(_picture(9, 300, 400), "JPEG", exif=camera.tobytes())[:3000],
    }
    for i, (name, data) in enumerate(files.items()):
        (folder / name).write_bytes(data)
        os.utime(folder / name, ns=(MTIME_NS + i * 10**9, MTIME_NS + i * 10**9))
    mtime = datetime(2020, 9, 13, 12, 26, 40, 123456, tzinfo=timezone.utc)
    nothing = dict(captured_at=None, capture_offset=None, camera_make=None, camera_model=None, gps_latitude=None,
                   gps_longitude=None)
    expected = {
        # Orientation 6: stored 64×48, displayed 48×64. DateTimeOriginal wins over DateTime, with
        # its own offset (not OffsetTime's) and sub-seconds; the NULs and spaces are gone.
        "camera.jpg": dict(status="ok", width=48, height=64, captured_at=datetime(2021, 6, 15, 14, 30, 5, 42000),
                           capture_offset="+02:00", camera_make="Canon", camera_model="Canon EOS 5D Mark IV",
                           gps_latitude=-(33 + 51 / 60 + 54.5 / 3600), gps_longitude=-(70 + 40 / 60)),
        # Pillow's TIFF writer keeps IFD0 only: DateTimeOriginal read from there, no offset tag.
        "scan.tif": dict(nothing, status="ok", width=40, height=30, captured_at=datetime(2019, 12, 30, 10, 0),
                         camera_make="EPSON", camera_model="Perfection V600"),
        # DateTimeDigitized alone (dashes and a T), its sub-seconds, OffsetTime standing in.
        "phone.png": dict(nothing, status="ok", width=64, height=48, captured_at=datetime(2020, 2, 29, 8, 0, 0, 500000),
                          capture_offset="-03:00"),
        "garbage.jpg": dict(nothing, status="ok", width=64, height=48),
        "out_of_range.webp": dict(nothing, status="ok", width=64, height=48, camera_model="X"),
        "lost.jpg": dict(nothing, status="ok", width=64, height=48),
        "noise.jpg": dict(nothing, status="ok", width=64, height=48),
        "plain.png": dict(nothing, status="ok", width=64, height=48),
        # Rejected: the header was read (size kept), the EXIF's contents are not kept.
        "cut.jpg": dict(nothing, status="rejected", width=300, height=400),  # its orientation 6 too
    }
    for i, name in enumerate(files):
        expected[name]["modified_at"] = mtime + timedelta(seconds=i)
        expected[name]["pixels"] = expected[name]["width"] * expected[name]["height"]
    return expected


def test_the_manifest_holds_each_files_photo_metadata_and_old_manifests_still_index(tmp_path):
    data = tmp_path / "data"
    expected = _photo_batch(data / "images" / "photos")
    for i, name in enumerate(("legacy_a.png", "legacy_b.png")):  # a second batch, later written in the old schema
        (data / "images" / "legacy").mkdir(exist_ok=True)
        _picture(20 + i, 150 * (i + 1), 200).save(data / "images" / "legacy" / name)
    defs = tiny_definitions(data)
    (tmp_path / "home").mkdir()
    with instance_for_test(temp_dir=str(tmp_path / "home")) as instance:
        assert ingest(defs, instance, data / "images", log=lambda m: None).ok
        manifest_file = data / "assets" / "raw_images" / "photos.parquet"
        manifest = pq.read_table(manifest_file)
        assert manifest.schema.remove_metadata() == tables.MANIFEST_SCHEMA
        rows = {r["path"].removeprefix("photos/"): r for r in manifest.to_pylist()}
        assert set(rows) == set(expected)
        for name, want in expected.items():
            got = {key: rows[name][key] for key in want}
            for key in ("gps_latitude", "gps_longitude"):
                assert got.pop(key) == pytest.approx(want[key], abs=1e-12), (name, key)
            assert got == {key: value for key, value in want.items() if not key.startswith("gps_")}, name
        assert rows["cut.jpg"]["reason"] == images.TRUNCATED
        assert rows["camera.jpg"]["modified_at"].tzinfo is not None  # UTC, not local time

        # The legacy batch's manifest as an older version wrote it, then the index built again.
        legacy_file = data / "assets" / "raw_images" / "legacy.parquet"
        legacy = pq.read_table(legacy_file)
        pq.write_table(legacy.select(OLD_MANIFEST_SCHEMA.names).cast(OLD_MANIFEST_SCHEMA), legacy_file)
        assert run_job(instance, defs.resolve_job_def("merge_index")) is None

    searcher = FaissSearcher.open(data / "assets", device="cpu")
    catalog = {r["path"]: r for r in searcher.index.catalog.to_pylist()}
    assert set(catalog) == {f"photos/{n}" for n, w in expected.items() if w["status"] == "ok"} | {
        "legacy/legacy_a.png", "legacy/legacy_b.png"}
    assert catalog["photos/camera.jpg"]["camera_model"] == "Canon EOS 5D Mark IV"
    assert catalog["photos/camera.jpg"]["captured_at"] == datetime(2021, 6, 15, 14, 30, 5, 42000)
    legacy_row = catalog["legacy/legacy_b.png"]
    assert legacy_row["captured_at"] is None and legacy_row["modified_at"] is None  # nulls until read again
    assert legacy_row["pixels"] == 300 * 200  # from the width and height old manifests hold

    camera_id = catalog["photos/camera.jpg"]["image_id"]
    paths = lambda hits: sorted(h.path for h in hits)  # noqa: E731
    assert paths(searcher.search_ids([camera_id], k=20, filters=Filters.parse(camera="eos 5d"))[0]) == [
        "photos/camera.jpg"]
    assert paths(searcher.search_ids([camera_id], k=20, filters=Filters.parse(min_pixels=30_000))[0]) == [
        "legacy/legacy_a.png", "legacy/legacy_b.png"]
    taken = Filters.parse(taken_after="2019-12-30", taken_before="2020-03-01")
    assert paths(searcher.search_ids([camera_id], k=20, filters=taken)[0]) == ["photos/phone.png", "photos/scan.tif"]


def test_photo_metadata_never_raises_and_keeps_only_sound_values():
    assert md.photo_metadata(None) == md.PhotoMetadata()
    exif = _exif(make=b"NIKON CORPORATION\0\0", model=12345, datetime_="2016:12:31 23:59:60",
                 detail={md.DATETIME_ORIGINAL: "2021:02:30 12:00:00", md.OFFSET_TIME: " +14:00 "},
                 gps={md.GPS_LATITUDE_REF: b"N\0", md.GPS_LATITUDE: ((51, 1), (30, 1), (0, 1)),
                      md.GPS_LONGITUDE_REF: "E", md.GPS_LONGITUDE: (-1.5,)})
    found = md.photo_metadata(exif)
    # A leap second is the next minute's first; an impossible original date falls back to DateTime.
    assert found.captured_at == datetime(2017, 1, 1) and found.capture_offset == "+14:00"
    assert (found.camera_make, found.camera_model) == ("NIKON CORPORATION", None)
    assert (found.gps_latitude, found.gps_longitude) == (None, None)  # a negative part: no position at all

    long_name = _exif(model="M" * 10_000, detail={md.DATETIME_ORIGINAL: "2020:01:01 00:00:00.25"})
    found = md.photo_metadata(long_name)
    assert found.camera_model == "M" * md.MAX_TEXT and found.captured_at == datetime(2020, 1, 1, 0, 0, 0, 250000)
    # A block too large to parse its sub-directories: IFD0 only.
    assert md.photo_metadata(long_name, md.MAX_EXIF_BYTES + 1).captured_at is None

    for value in ("", "2021:06:15", "2021:06:15 25:00:00", "not a date", b"\xff\xfe", 20210615, None):
        assert md.photo_metadata(_exif(detail={md.DATETIME_ORIGINAL: value})).captured_at is None, value
    for value in ("+2:00", "+02:60", "-15:00", "Z", "+14:30", "   :  "):
        exif = _exif(detail={md.DATETIME_ORIGINAL: "2021:06:15 14:30:05", md.OFFSET_TIME_ORIGINAL: value})
        assert md.photo_metadata(exif).capture_offset is None, value


def test_records_of_uploads_and_unreadable_files_have_no_mtime_and_files_too_large_do(tmp_path):
    big = tmp_path / "big.png"
    big.write_bytes(encode(_picture(1), "PNG"))
    os.utime(big, ns=(MTIME_NS, MTIME_NS))
    record, _ = images.preprocess_file(big, tmp_path, images.Preprocess(max_file_bytes=10))
    assert record.reason == images.TOO_LARGE and record.modified_at == datetime(2020, 9, 13, 12, 26, 40, 123456,
                                                                               tzinfo=timezone.utc)
    assert (record.width, record.height, record.pixels) == (None, None, None)
    (tmp_path / "gone.png").symlink_to(tmp_path / "nowhere.png")
    record, _ = images.preprocess_file(tmp_path / "gone.png", tmp_path, images.Preprocess())
    assert record.reason == images.UNREADABLE and record.modified_at is None
    record = images.ImageRecord(path="upload")
    images.decode(encode(_picture(1), "JPEG", exif=_exif(model="Pixel 7").tobytes()), images.Preprocess(), record)
    assert record.camera_model == "Pixel 7" and record.modified_at is None


def test_an_old_manifest_gives_a_catalog_with_null_photo_columns(tmp_path):
    path = tmp_path / "old.parquet"
    old = pa.table({"path": ["b/a.jpg", "b/bad.jpg"], "image_id": [5, 6], "sha256": ["x", "y"], "bytes": [10, 3],
                    "width": [40, 0], "height": [30, 0], "format": ["JPEG", ""], "status": ["ok", "rejected"],
                    "reason": ["", "truncated"], "message": ["", "cut"]}, schema=OLD_MANIFEST_SCHEMA)
    pq.write_table(old, path)
    catalog = build.catalog({"b": pq.ParquetFile(path)}, np.array([5, 6]))
    assert catalog.schema == build.catalog_schema()
    row = catalog.to_pylist()
    assert len(row) == 1 and row[0]["pixels"] == 1200 and row[0]["width"] == 40
    assert all(row[0][c] is None for c in ("captured_at", "camera_make", "camera_model", "gps_latitude", "modified_at"))
    columns = tables.manifest_columns(io_table(old), ["image_id", "captured_at", "pixels"])
    assert columns.to_pylist() == [{"image_id": 5, "captured_at": None, "pixels": 1200},
                                   {"image_id": 6, "captured_at": None, "pixels": 0}]


def io_table(table: pa.Table) -> pa.Table:
    """``table`` through Parquet and back, as an IO manager hands it to an asset."""
    buf = io.BytesIO()
    pq.write_table(table, buf)
    return pq.read_table(io.BytesIO(buf.getvalue()))
