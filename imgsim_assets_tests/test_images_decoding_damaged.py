"""Decoding damaged and hostile files: each ends as one rejected record with a reason, none raises."""

import struct

import numpy as np
import pytest
from PIL import Image

from imgsim_assets.core import images
from imgsim_assets.core.images import Preprocess, Rejected, decode, decoding, preprocess_file
from imgsim_assets_tests.pictures import encode, jpeg, photo, png, png_claiming


SMALL = Preprocess(crop_size=56, resize_size=64)


REASONS = set(images.REASONS)


def _decoded(data: bytes, pre=SMALL) -> tuple[images.ImageRecord, np.ndarray | None]:
    record = images.ImageRecord(path="x")
    return record, decode(data, pre, record)


@pytest.mark.parametrize(
    "fmt, cut",
    [("PNG", 0.5), ("PNG", 20), ("WEBP", 0.5), ("GIF", 0.5), ("TIFF", 0.5), ("JPEG", 0.9)],
    ids=["png-half", "png-inside-ihdr", "webp-half", "gif-half", "tiff-half", "jpeg-no-eoi"],
)
def test_truncated_files_are_rejected_as_truncated(fmt, cut):
    rgb = Image.fromarray(photo(60, 80))
    data = encode(rgb.convert("P") if fmt == "GIF" else rgb, fmt)
    rec, out = _decoded(data[: int(len(data) * cut) if cut < 1 else cut])
    assert out is None and (rec.status, rec.reason) == ("rejected", images.TRUNCATED), rec.message


def test_decompression_bomb_is_rejected_before_decoding(tmp_path):
    path = tmp_path / "big.png"
    path.write_bytes(png(photo(300, 300)))
    record, pixels = preprocess_file(path, tmp_path, Preprocess(max_pixels=10_000))
    assert pixels is None and record.reason == images.DECOMPRESSION_BOMB


def _hugejpeg() -> bytes:
    data = bytearray(jpeg(Image.fromarray(photo(60, 80))))
    sof = data.index(b"\xff\xc0")
    data[sof + 5 : sof + 9] = struct.pack(">HH", 65000, 65000)
    return bytes(data)


def _huge_tiff() -> bytes:
    data = bytearray(encode(Image.fromarray(photo(60, 80)), "TIFF"))
    ifd = struct.unpack("<I", data[4:8])[0]
    for i in range(struct.unpack("<H", data[ifd : ifd + 2])[0]):
        at = ifd + 2 + 12 * i
        tag, kind = struct.unpack("<HH", data[at : at + 4])
        if tag in (256, 257):  # ImageWidth, ImageLength
            data[at + 8 : at + 12] = struct.pack("<I", 100_000) if kind == 4 else struct.pack("<HH", 60_000, 0)
    return bytes(data)


@pytest.mark.parametrize(
    "data, pre",
    [
        (png_claiming(100_000, 100_000), SMALL),  # beyond 2x the limit: Image.open refuses it
        (png_claiming(15_000, 15_000), SMALL),  # between 1x and 2x the limit: Pillow's warning, made an error
        (png_claiming(10_000, 10_000), Preprocess(crop_size=56, resize_size=64, max_pixels=1_000_000)),  # by ours
        (_hugejpeg(), SMALL),
        (_huge_tiff(), SMALL),
    ],
    ids=["png-1e10", "png-2.25e8", "png-1e8-over-our-limit", "jpeg-65000x65000", "tiff-1e10"],
)
def test_huge_dimensions_in_a_tiny_file_are_rejected_without_allocating(monkeypatch, data, pre):
    allocations = []
    new = Image.core.new
    monkeypatch.setattr(Image.core, "new", lambda mode, size, *a: allocations.append(size) or new(mode, size, *a))
    rec, out = _decoded(data, pre)
    assert len(data) < 20_000
    assert (out, rec.status, rec.reason) == (None, "rejected", images.DECOMPRESSION_BOMB), rec.message
    assert allocations == []


def test_a_pixel_limit_above_pillows_own_is_honoured(tmp_path, monkeypatch):
    from PIL import Image as PILImage

    # Pillow's own limit (a module global, 89.5 Mpx by default) scaled down for a small file.
    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 10_000)
    path = tmp_path / "wide.png"
    path.write_bytes(png(photo(120, 120)))  # 14,400 pixels
    assert preprocess_file(path, tmp_path, Preprocess(crop_size=56, resize_size=64, max_pixels=12_000))[0].reason \
        == images.DECOMPRESSION_BOMB
    record, px = preprocess_file(path, tmp_path, Preprocess(crop_size=56, resize_size=64, max_pixels=20_000))
    assert record.status == "ok" and px.shape == (3, 56, 56)
    assert PILImage.MAX_IMAGE_PIXELS == 10_000  # restored after the decode


def test_postscript_is_never_handed_to_ghostscript():
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 80 60\n0 0 moveto 80 60 lineto stroke\nshowpage\n%%EOF\n"
    rec, out = _decoded(eps)
    assert (out, rec.reason) == (None, images.NOT_AN_IMAGE)


def test_gif_without_frames_is_rejected():
    rec, out = _decoded(b"GIF89a" + struct.pack("<HHBBB", 80, 60, 0, 0, 0) + b";")
    assert (out, rec.status, rec.reason) == (None, "rejected", images.NOT_AN_IMAGE)


def test_a_mode_without_an_rgb_conversion_is_rejected_as_unsupported(monkeypatch):
    with pytest.raises(Rejected, match="mode La") as raised:
        decoding._to_rgb(Image.new("La", (60, 80)))
    assert raised.value.reason == images.UNSUPPORTED_MODE
    to_rgb = decoding._to_rgb
    monkeypatch.setattr(decoding, "_to_rgb", lambda im: to_rgb(Image.new("La", im.size)))
    record = images.ImageRecord(path="x.png")
    assert decode(png(photo(60, 80)), SMALL, record) is None
    assert (record.reason, record.message) == (images.UNSUPPORTED_MODE,
                                               "mode La: conversion from La to L not supported")


def _exif_with_orientation(kind: int, count: int, value: bytes) -> bytes:
    """A little-endian EXIF block whose IFD0 holds just the orientation, typed as given."""
    entry = struct.pack("<HHI", images.ORIENTATION_TAG, kind, count) + value.ljust(4, b"\0")
    return b"Exif\0\0II*\0" + struct.pack("<IH", 8, 1) + entry + struct.pack("<I", 0)


@pytest.mark.parametrize(
    "fmt, exif, remark",
    [
        ("JPEG", _exif_with_orientation(3, 1, struct.pack("<H", 9)), "EXIF orientation 9 ignored"),
        ("PNG", _exif_with_orientation(3, 1, struct.pack("<H", 0)), "EXIF orientation 0 ignored"),
        ("JPEG", _exif_with_orientation(2, 2, b"6\0"), "EXIF orientation '6' ignored"),
        ("WEBP", _exif_with_orientation(11, 1, struct.pack("<f", 6.0)), "EXIF orientation 6.0 ignored"),
        ("JPEG", b"Exif\0\0II*\0" + struct.pack("<I", 99999), ""),  # IFD offset past the end
        ("JPEG", b"Exif\0\0" + bytes(range(256)) * 2, ""),
        ("PNG", b"Exif\0\0" + bytes(range(256)) * 2, "EXIF ignored (SyntaxError"),
        ("WEBP", b"Exif\0\0II*\0\x08\0\0\0\x01\0\x12\x01\x03\0\x01\0", ""),  # the IFD entry is cut short
    ],
    ids=["jpeg-9", "png-0", "jpeg-ascii", "webp-float", "jpeg-bad-offset", "jpeg-garbage", "png-garbage",
         "webp-short-entry"],
)
@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow warns about the corrupt EXIF, rightly
def test_unusable_exif_is_ignored_not_fatal(fmt, exif, remark):
    picture = Image.fromarray(photo(60, 80))
    rec, out = _decoded(encode(picture, fmt, exif=exif, **({"lossless": True} if fmt == "WEBP" else {})))
    assert (rec.status, rec.size) == ("ok", (80, 60)), rec.message
    assert rec.message.startswith(remark) if remark else rec.message == ""
    _, plain = _decoded(encode(picture, fmt, **({"lossless": True} if fmt == "WEBP" else {})))
    assert np.abs(out.astype(float) - plain.astype(float)).mean() < 1.0  # used as stored


def _fuzz_seeds() -> dict[str, bytes]:
    rgb = Image.fromarray(photo(60, 80))
    exif = Image.Exif()
    exif[images.ORIENTATION_TAG] = 6
    return {
        "jpeg": encode(rgb, "JPEG", quality=90, exif=exif.tobytes()),
        "png": encode(rgb.convert("P"), "PNG", transparency=0, exif=exif.tobytes()),
        "gif": encode(rgb.convert("P"), "GIF", save_all=True, append_images=[rgb.convert("P")]),
        "webp": encode(rgb, "WEBP", quality=80, exif=exif.tobytes()),
        "tiff": encode(rgb, "TIFF", compression="tiff_lzw", tiffinfo={images.ORIENTATION_TAG: 6}),
    }


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow's warnings about corrupt metadata
def test_mutated_files_never_raise():
    rng = np.random.default_rng(20240607)
    seen = {}
    for name, original in _fuzz_seeds().items():
        for i in range(40):
            data = bytearray(original)
            how = ("truncate", "flip-anywhere", "flip-header")[i % 3]
            if how == "truncate":
                data = data[: rng.integers(1, len(data))]
            else:
                span = len(data) if how == "flip-anywhere" else min(len(data), 160)
                for _ in range(rng.integers(1, 6)):
                    data[rng.integers(0, span)] = rng.integers(0, 256)
            record = images.ImageRecord(path=f"{name}-{i}")
            out = decode(bytes(data), SMALL, record)  # must not raise
            assert record.status in ("ok", "rejected"), record
            if record.status == "rejected":
                assert out is None and record.reason in REASONS and record.message, record
            else:
                assert out.shape == (3, 56, 56) and out.dtype == np.uint8 and not record.reason
            seen[record.status, record.reason] = seen.get((record.status, record.reason), 0) + 1
    assert sum(seen.values()) == 200
    assert ("ok", "") in seen and len(seen) >= 4, seen  # the mutations do reach past the header
