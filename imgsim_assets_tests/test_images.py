import hashlib
import io
import json
import os
import select
import shutil
import signal
import socket
import stat
import struct
import tempfile
import threading
import time
from dataclasses import asdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, TiffImagePlugin, TiffTags
from torchvision import transforms

from imgsim_assets.core import images
from imgsim_assets.core.images import Preprocess, decode, image_id_from_sha256, list_batch_files, preprocess_file
from imgsim_assets_tests.pictures import encode, photo, png_claiming


def _png(a: np.ndarray, mode=None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a, mode).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=95, **kw)
    return buf.getvalue()


def test_eval_protocol_matches_torchvision_resize_center_crop():
    a = photo()
    pre = Preprocess(draft=False)
    rec = images.ImageRecord(path="x.png")
    out = decode(_png(a), pre, rec)
    ref = transforms.Compose([transforms.Resize(256, interpolation=transforms.InterpolationMode.BICUBIC),
                              transforms.CenterCrop(224), transforms.PILToTensor()])(Image.fromarray(a))
    assert out.shape == (3, 224, 224) and out.dtype == np.uint8
    # Resampling only the cropped box uses the same filter and sample centres; float rounding
    # may move a handful of pixels by one level.
    diff = np.abs(out.astype(int) - ref.numpy().astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 1e-3
    assert (rec.status, rec.width, rec.height, rec.format) == ("ok", 400, 300, "PNG")


def test_grid_protocol_resizes_without_crop():
    out = decode(_png(photo()), Preprocess(protocol="grid", grid_size=(70, 98)), images.ImageRecord(path="x"))
    assert out.shape == (3, 70, 98)


def test_sizes_must_be_multiples_of_the_patch():
    with pytest.raises(ValueError, match="multiple of the patch size 14"):
        Preprocess(crop_size=225)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        Preprocess(protocol="grid", grid_size=(100, 70))


def test_jpeg_draft_is_close_to_full_decode():
    data = _jpeg(Image.fromarray(photo(1200, 1600)))
    full = decode(data, Preprocess(draft=False), images.ImageRecord(path="x")).astype(float)
    fast = decode(data, Preprocess(draft=True), images.ImageRecord(path="x")).astype(float)
    assert np.abs(full - fast).mean() < 4.0


def test_exif_orientation_is_applied():
    a = photo(200, 300)
    exif = Image.Exif()
    exif[images.ORIENTATION_TAG] = 6  # stored landscape, displayed portrait (rotate 90° clockwise)
    rec = images.ImageRecord(path="x.jpg")
    out = decode(_jpeg(Image.fromarray(a), exif=exif.tobytes()), Preprocess(draft=False), rec)
    assert (rec.width, rec.height) == (200, 300)
    upright = decode(_jpeg(Image.fromarray(a).transpose(Image.Transpose.ROTATE_270)), Preprocess(draft=False),
                     images.ImageRecord(path="y.jpg"))
    assert np.abs(out.astype(float) - upright.astype(float)).mean() < 3.0


def test_rgba_is_composited_on_white():
    a = np.zeros((64, 64, 4), np.uint8)
    a[..., 0] = 255  # red, fully transparent
    out = decode(_png(a, "RGBA"), Preprocess(crop_size=56, resize_size=64), images.ImageRecord(path="x"))
    assert out.min() == 255


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", images.EMPTY_FILE),
        (b"<html><body>not a picture</body></html>", images.NOT_AN_IMAGE),
        (None, images.TRUNCATED),
        (_png(np.zeros((10, 300, 3), np.uint8)), images.TOO_SMALL),
    ],
    ids=["empty", "html", "truncated-jpeg", "too-small"],
)
def test_bad_files_are_rejected_with_a_reason(tmp_path, data, reason):
    if data is None:
        data = _jpeg(Image.fromarray(photo(400, 400)))[:3000]
    path = tmp_path / "bad.jpg"
    path.write_bytes(data)
    record, pixels = preprocess_file(path, tmp_path, Preprocess())
    assert pixels is None
    assert (record.status, record.reason) == ("rejected", reason)
    assert record.message
    assert record.path == "bad.jpg"


def test_decompression_bomb_is_rejected_before_decoding(tmp_path):
    path = tmp_path / "big.png"
    path.write_bytes(_png(photo(300, 300)))
    record, pixels = preprocess_file(path, tmp_path, Preprocess(max_pixels=10_000))
    assert pixels is None and record.reason == images.DECOMPRESSION_BOMB


def test_unreadable_file_is_rejected(tmp_path):
    record, pixels = preprocess_file(tmp_path / "missing.png", tmp_path, Preprocess())
    assert pixels is None and record.reason == images.UNREADABLE


def test_image_id_is_content_addressed(tmp_path):
    data = _png(photo())
    (tmp_path / "a.png").write_bytes(data)
    (tmp_path / "b.png").write_bytes(data)
    ra, _ = preprocess_file(tmp_path / "a.png", tmp_path, Preprocess())
    rb, _ = preprocess_file(tmp_path / "b.png", tmp_path, Preprocess())
    assert ra.image_id == rb.image_id == image_id_from_sha256(ra.sha256)
    assert 0 <= ra.image_id < 2**63


def test_list_batch_files(tmp_path):
    (tmp_path / "sub").mkdir()
    for name in ("b.png", "a.jpg", "sub/c.png", ".hidden.png", "_SUCCESS"):
        (tmp_path / name).write_bytes(b"x")
    assert [p.relative_to(tmp_path).as_posix() for p in list_batch_files(tmp_path)] == ["a.jpg", "b.png", "sub/c.png"]


def test_empty_or_missing_batch_folder_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="contains no files"):
        list_batch_files(tmp_path)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        list_batch_files(tmp_path / "nope")


def test_parallel_decoding_keeps_order_and_results(tmp_path):
    paths = []
    for i in range(20):
        p = tmp_path / f"{i:02d}.png"
        p.write_bytes(_png(photo(60, 80, seed=i)))
        paths.append(p)
    pre = Preprocess(crop_size=56, resize_size=64)
    inline = list(images.preprocess_files(paths, tmp_path, pre, workers=1))
    pooled = list(images.preprocess_files(paths, tmp_path, pre, workers=2, chunk=4))
    assert [r.path for r, _ in pooled] == [r.path for r, _ in inline]
    for (_, a), (_, b) in zip(inline, pooled):
        np.testing.assert_array_equal(a, b)


def test_jpeg_draft_never_decodes_below_the_target_of_a_rotated_image(monkeypatch):
    # Stored landscape 1200×300 with EXIF orientation 6: displayed portrait 300×1200.
    exif = Image.Exif()
    exif[images.ORIENTATION_TAG] = 6
    data = _jpeg(Image.fromarray(photo(300, 1200)), exif=exif.tobytes())
    pre = Preprocess(protocol="grid", grid_size=(280, 70))  # (height, width) of the upright image
    resizes = []
    original = Image.Image.resize

    def spy(self, size, *args, **kwargs):
        resizes.append((self.size, tuple(size)))
        return original(self, size, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", spy)
    record = images.ImageRecord(path="x.jpg")
    out = decode(data, pre, record)
    assert out.shape == (3, 280, 70) and record.size == (300, 1200)
    (src_w, src_h), (dst_w, dst_h) = resizes[-1]
    assert src_w >= dst_w and src_h >= dst_h, f"decoded {src_w}x{src_h}, upsampled to {dst_w}x{dst_h}"
    assert (src_w, src_h) == (75, 300)  # 1/4 scale: the smallest that still covers 70×280


def test_pixel_tensors_stream_in_bounded_memory(tmp_path):
    import pyarrow as pa

    from imgsim_assets.core import tables

    path = tmp_path / "tensors.parquet"
    rng = np.random.default_rng(0)
    with tables.TensorWriter(path, 56, 56, {}, rows_per_group=8) as writer:
        for i in range(960):  # 120 row groups, 27 MB of pixels
            writer.add(i, rng.integers(0, 256, (3, 56, 56), dtype=np.uint8))
    before, peak, seen = pa.total_allocated_bytes(), 0, []
    for ids, pixels in tables.iter_tensor_batches(tables.open_stream(path), 8):
        peak = max(peak, pa.total_allocated_bytes() - before)
        seen.extend(ids.tolist())
    assert seen == list(range(960))
    assert peak < 2 * 2**20, f"reading held {peak / 2**20:.1f} MB"


def test_symlinks_are_followed_only_inside_the_root(tmp_path):
    root, outside = tmp_path / "images", tmp_path / "elsewhere"
    (root / "b1").mkdir(parents=True)
    outside.mkdir()
    picture = _png(photo(60, 80))
    (root / "b1" / "real.png").write_bytes(picture)
    (outside / "secret.png").write_bytes(picture)
    (root / "b1" / "inside.png").symlink_to(root / "b1" / "real.png")
    (root / "b1" / "escape.png").symlink_to(outside / "secret.png")
    pre = Preprocess(crop_size=56, resize_size=64)
    inside, px = preprocess_file(root / "b1" / "inside.png", root, pre)
    assert inside.status == "ok" and px is not None
    escape, px = preprocess_file(root / "b1" / "escape.png", root, pre)
    assert (escape.status, escape.reason, px) == ("rejected", images.OUTSIDE_ROOT, None)
    assert str(outside.resolve()) in escape.message


@pytest.mark.parametrize(
    "mode, convert",
    [("CMYK", "CMYK"), ("1", "1"), ("I;16", None), ("P", "P"), ("LA", "LA"), ("L", "L")],
)
def test_odd_modes_decode_to_rgb(tmp_path, mode, convert):
    rgb = Image.fromarray(photo(60, 80))
    if mode == "I;16":
        im = Image.fromarray(np.asarray(rgb.convert("L"), dtype=np.uint16) * 257)
    else:
        im = rgb.convert(convert)
    path = tmp_path / ("x.jpg" if mode == "CMYK" else "x.png")
    im.save(path)
    record, px = preprocess_file(path, tmp_path, Preprocess(crop_size=56, resize_size=64))
    assert record.status == "ok", record.message
    assert px.shape == (3, 56, 56) and px.dtype == np.uint8 and px.std() > 5


def test_animated_gif_uses_the_first_frame_and_says_so(tmp_path):
    frames = [Image.fromarray(photo(60, 80, seed=i)).convert("P") for i in range(3)]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50)
    record, px = preprocess_file(path, tmp_path, Preprocess(crop_size=56, resize_size=64))
    assert record.status == "ok" and record.message == "first of 3 frames" and px.shape == (3, 56, 56)


# --- Hostile files -------------------------------------------------------------------------

SMALL = Preprocess(crop_size=56, resize_size=64)
REASONS = set(images.REASONS)


def _decoded(data: bytes, pre=SMALL) -> tuple[images.ImageRecord, np.ndarray | None]:
    record = images.ImageRecord(path="x")
    return record, decode(data, pre, record)


def _within(seconds: float, fn, *args):
    """``fn(*args)``, failing (instead of hanging the suite) when it blocks for ``seconds``."""
    result = []
    worker = threading.Thread(target=lambda: result.append(fn(*args)), daemon=True)
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), f"{fn.__name__} blocked for more than {seconds}s"
    return result[0]


def test_ycck_jpeg_decodes_like_the_cmyk_original():
    rgb = photo(60, 80).astype(float)
    k = 255 - rgb.max(axis=-1)
    ink = np.dstack([255 - rgb - k[..., None], k])  # C, M, Y with black pulled out into K
    cmyk = Image.fromarray(np.clip(ink + 0.5, 0, 255).astype(np.uint8), "CMYK")
    plain = encode(cmyk, "JPEG", quality=95, subsampling=0)
    # libjpeg's YCCK is YCbCr of (255-C', 255-M', 255-Y') with K' as is, where C'M'Y'K' are the
    # file's components; Adobe files hold inverted ink (C' = 255-C), so that is YCbCr(C, M, Y)
    # and 255-K. Pillow's CMYK writer inverts whatever it is given: hand it the complement.
    c, m, y = ink[..., 0], ink[..., 1], ink[..., 2]
    components = np.dstack([
        0.299 * c + 0.587 * m + 0.114 * y,
        128 - 0.168736 * c - 0.331264 * m + 0.5 * y,
        128 + 0.5 * c - 0.418688 * m - 0.081312 * y,
        255 - ink[..., 3],
    ])  # fmt: skip
    written = np.clip(255 - components + 0.5, 0, 255).astype(np.uint8)
    ycck = bytearray(encode(Image.fromarray(written, "CMYK"), "JPEG", quality=95, subsampling=0))
    app14 = ycck.index(b"\xff\xee")
    assert ycck[app14 + 4 : app14 + 9] == b"Adobe" and ycck[app14 + 15] == 0  # transform: 0 = plain CMYK
    ycck[app14 + 15] = 2  # transform: 2 = YCCK
    ycck = bytes(ycck)
    assert Image.open(io.BytesIO(ycck)).info.get("adobe_transform") == 2

    rec, out = _decoded(ycck)
    ref_rec, ref = _decoded(plain)
    assert (rec.status, rec.format, rec.size) == ("ok", "JPEG", (80, 60)) and ref_rec.status == "ok"
    assert np.abs(out.astype(float) - ref.astype(float)).mean() < 3.0
    # The same bytes read as plain CMYK are far off: the comparison above does tell.
    _, misread = _decoded(ycck[: app14 + 15] + b"\x00" + ycck[app14 + 16 :])
    assert np.abs(misread.astype(float) - ref.astype(float)).mean() > 30


def _transparent_case(kind: str) -> tuple[Image.Image, np.ndarray]:
    """A picture with transparency held outside an alpha channel, and how it looks on white."""
    h, w = 60, 80
    index = np.zeros((h, w), np.uint8)
    index[:, 40:] = 1
    index[20:40, 10:30] = 2
    colours = np.array([[255, 0, 0], [0, 0, 255], [0, 255, 0]], np.uint8)
    alpha = {"palette-index": [0, 255, 255], "palette-alpha": [0, 255, 128]}.get(kind, [0, 255, 255])
    if kind.startswith("palette"):
        im = Image.fromarray(index, "P")
        im.putpalette(colours.tobytes())
        im.info["transparency"] = 0 if kind == "palette-index" else bytes(alpha)
    elif kind == "grey-key":
        colours = np.array([[50] * 3, [200] * 3, [120] * 3], np.uint8)
        im = Image.fromarray(colours[index][..., 0], "L")
        im.info["transparency"] = 50
    else:  # rgb-key
        im = Image.fromarray(colours[index], "RGB")
        im.info["transparency"] = (255, 0, 0)
    a = np.array(alpha, float)[index][..., None] / 255
    on_white = np.clip(colours[index] * a + 255 * (1 - a) + 0.5, 0, 255).astype(np.uint8)
    return im, on_white


@pytest.mark.parametrize("kind", ["palette-index", "palette-alpha", "grey-key", "rgb-key"])
def test_transparency_without_alpha_channel_is_composited_on_white(kind):
    im, on_white = _transparent_case(kind)
    data = encode(im, "PNG", transparency=im.info["transparency"])
    assert b"tRNS" in data
    rec, out = _decoded(data)
    _, expected = _decoded(_png(on_white))
    assert rec.status == "ok", rec.message
    assert np.abs(out.astype(int) - expected.astype(int)).max() <= 2
    assert out[:, 0, 0].tolist() == [255, 255, 255]  # the transparent red corner is background


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


@pytest.mark.parametrize("fmt", ["WEBP", "PNG", "TIFF"], ids=["animated-webp", "apng", "multipage-tiff"])
def test_multi_frame_files_use_the_first_frame_and_say_so(tmp_path, fmt):
    frames = [Image.fromarray(photo(60, 80, seed=i)) for i in range(3)]
    kw = {"lossless": True} if fmt == "WEBP" else {}
    path = tmp_path / f"anim.{fmt.lower()}"
    path.write_bytes(encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=50, **kw))
    record, px = preprocess_file(path, tmp_path, SMALL)
    assert (record.status, record.format, record.message) == ("ok", fmt, "first of 3 frames")
    _, first = _decoded(encode(frames[0], fmt, **kw))
    np.testing.assert_array_equal(px, first)


def _as_stored(upright: np.ndarray, orientation: int) -> np.ndarray:
    """The pixels a camera stores for an upright picture, per the EXIF 2.3 definition of the
    tag: where the stored 0th row and 0th column lie in the displayed picture."""
    u = upright
    return {
        1: lambda: u,  # top, left
        2: lambda: u[:, ::-1],  # top, right
        3: lambda: u[::-1, ::-1],  # bottom, right
        4: lambda: u[::-1, :],  # bottom, left
        5: lambda: u.transpose(1, 0, 2),  # left, top
        6: lambda: u.transpose(1, 0, 2)[::-1, :],  # right, top
        7: lambda: u.transpose(1, 0, 2)[::-1, ::-1],  # right, bottom
        8: lambda: u.transpose(1, 0, 2)[:, ::-1],  # left, bottom
    }[orientation]().copy()


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "TIFF"])
@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_exif_orientation_is_displayed_upright(fmt, orientation):
    upright = photo(60, 80)  # displayed landscape 80×60
    stored = Image.fromarray(_as_stored(upright, orientation))
    if fmt == "TIFF":  # the orientation is a tag of the TIFF itself
        data = encode(stored, fmt, tiffinfo={images.ORIENTATION_TAG: orientation})
    else:  # PNG: an eXIf chunk; JPEG: an APP1 Exif segment
        exif = Image.Exif()
        exif[images.ORIENTATION_TAG] = orientation
        data = encode(stored, fmt, exif=exif.tobytes(), **({"quality": 95} if fmt == "JPEG" else {}))
    rec, out = _decoded(data)
    assert (rec.status, rec.size, rec.message) == ("ok", (80, 60), "")
    _, expected = _decoded(_png(upright))
    diff = np.abs(out.astype(float) - expected.astype(float))
    if fmt == "JPEG":  # compression noise is about 3.5 levels; a wrong orientation is over 50
        assert diff.mean() < 6.0
    else:
        assert diff.max() == 0


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


@pytest.mark.parametrize("value", [9, 0, "6"], ids=["9", "0", "ascii"])
def test_tiff_with_a_bogus_orientation_is_used_as_stored(value):
    tags = TiffImagePlugin.ImageFileDirectory_v2()
    tags[images.ORIENTATION_TAG] = value
    tags.tagtype[images.ORIENTATION_TAG] = TiffTags.ASCII if isinstance(value, str) else TiffTags.SHORT
    picture = photo(60, 80)
    rec, out = _decoded(encode(Image.fromarray(picture), "TIFF", tiffinfo=tags))
    assert (rec.status, rec.size) == ("ok", (80, 60)), rec.message
    np.testing.assert_array_equal(out, _decoded(_png(picture))[1])


def _huge_jpeg() -> bytes:
    data = bytearray(_jpeg(Image.fromarray(photo(60, 80))))
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
        (_huge_jpeg(), SMALL),
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


def test_postscript_is_never_handed_to_ghostscript():
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 80 60\n0 0 moveto 80 60 lineto stroke\nshowpage\n%%EOF\n"
    rec, out = _decoded(eps)
    assert (out, rec.reason) == (None, images.NOT_AN_IMAGE)


def test_gif_without_frames_is_rejected():
    rec, out = _decoded(b"GIF89a" + struct.pack("<HHBBB", 80, 60, 0, 0, 0) + b";")
    assert (out, rec.status, rec.reason) == (None, "rejected", images.NOT_AN_IMAGE)


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


# --- Odd paths and files that are not plain files ---------------------------------------------


def test_odd_file_names_are_listed_and_recorded_as_valid_utf8(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from imgsim_assets.core import tables

    picture = _png(photo(60, 80))
    root = os.fsencode(tmp_path)
    latin1 = b"caf\xe9.png"  # not UTF-8: Python carries the byte as a lone surrogate
    long_name = ("é" * 125).encode() + b".png"  # 254 bytes of UTF-8
    longest = b"x" * 251 + b".png"  # NAME_MAX
    deep_dir = os.path.join(root, *[b"d%02d" % i + b"_" * 96 for i in range(30)])  # over 3000 bytes deep
    os.makedirs(deep_dir)
    assert len(longest) == 255 and len(deep_dir) > 3000
    for name in (os.path.join(root, latin1), os.path.join(root, long_name), os.path.join(root, longest),
                 os.path.join(deep_dir, b"deep.png")):
        fd = os.open(name, os.O_WRONLY | os.O_CREAT, 0o644)
        os.write(fd, picture)
        os.close(fd)

    files = list_batch_files(tmp_path)
    assert len(files) == 4
    results = [preprocess_file(f, tmp_path, SMALL) for f in files]
    records = [r for r, _ in results]
    assert all(r.status == "ok" and px is not None for r, px in results), records
    paths = {r.path for r in records}
    assert "caf\\xe9.png" in paths and long_name.decode() in paths and longest.decode() in paths
    assert any(p.endswith("/deep.png") and p.count("/") == 30 for p in paths)
    for record in records:
        record.path.encode("utf-8")  # no lone surrogates
        assert os.fsencode(images.os_path(record.path)) in (latin1, long_name, longest) or record.path.endswith("deep.png")
        assert (tmp_path / images.os_path(record.path)).read_bytes() == picture  # the escape is undone
        json.dumps(asdict(record), ensure_ascii=False).encode("utf-8")
    pa.array([r.path for r in records])
    manifest = pa.Table.from_pydict(images.records_to_columns(records), schema=tables.MANIFEST_SCHEMA)
    buf = io.BytesIO()
    pq.write_table(manifest, buf)
    assert set(pq.read_table(io.BytesIO(buf.getvalue())).column("path").to_pylist()) == paths
    # A path given as bytes is the same file.
    assert preprocess_file(os.path.join(root, latin1), root, SMALL)[0].path == "caf\\xe9.png"


def test_messages_naming_an_undecodable_path_are_valid_utf8(tmp_path):
    root, outside = tmp_path / "images", os.path.join(os.fsencode(tmp_path), b"\xff\xfe")
    root.mkdir()
    os.mkdir(outside)
    os.symlink(os.path.join(outside, b"x.png"), os.path.join(os.fsencode(root), b"escape.png"))
    record, _ = preprocess_file(root / "escape.png", root, SMALL)
    assert record.reason == images.OUTSIDE_ROOT and "\\xff\\xfe" in record.message
    record.message.encode("utf-8")


def _fifo(path):
    os.mkfifo(path)


def _socket(path):
    sock = socket.socket(socket.AF_UNIX)
    cwd = os.getcwd()
    os.chdir(path.parent)  # a socket's path is limited to 108 bytes: bind the bare name
    try:
        sock.bind(path.name)
    finally:
        os.chdir(cwd)
    sock.close()


def _dir_link(path):
    (path.parent / "album").mkdir()
    path.symlink_to(path.parent / "album")


def _device(path):
    if os.geteuid() != 0:
        pytest.skip("creating a device node needs root")
    try:
        os.mknod(path, stat.S_IFCHR | 0o600, os.makedev(1, 3))  # /dev/null's numbers
    except PermissionError:
        pytest.skip("this container may not create device nodes")


@pytest.mark.parametrize(
    "make, message",
    [(_fifo, "a FIFO, not a regular file"), (_socket, "a socket, not a regular file"),
     (_dir_link, "a symlink to the folder {album}: folders behind links are not followed"),
     (_device, "a character device, not a regular file")],
    ids=["fifo", "socket", "dir-link", "device"],
)  # fmt: skip
def test_non_regular_files_are_rejected_without_reading(tmp_path, make, message):
    (tmp_path / "real.png").write_bytes(_png(photo(60, 80)))
    odd = tmp_path / "odd.png"
    make(odd)
    # Listed, so that it gets its row (the files behind a linked folder are not listed).
    assert [p.name for p in list_batch_files(tmp_path)] == ["odd.png", "real.png"]
    record, px = _within(10, preprocess_file, odd, tmp_path, SMALL)
    assert (px, record.status, record.reason) == (None, "rejected", images.NOT_A_FILE)
    assert record.message == message.format(album=(tmp_path / "album").resolve()) and record.sha256 == ""


def test_a_subfolder_that_cannot_be_listed_gets_a_row(tmp_path):
    (tmp_path / "real.png").write_bytes(_png(photo(60, 80)))
    (tmp_path / "locked").mkdir()
    (tmp_path / "locked" / "inside.png").write_bytes(_png(photo(60, 80)))
    errors = [PermissionError(13, "Permission denied", str(tmp_path / "locked"))]
    real_scandir = os.scandir

    def scandir(path="."):  # what a folder without read permission does (root ignores modes)
        if os.fspath(path) == str(tmp_path / "locked"):
            raise errors[0]
        return real_scandir(path)

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(os, "scandir", scandir)
        listed = list_batch_files(tmp_path)
        record, px = preprocess_file(tmp_path / "locked", tmp_path, SMALL)
    assert [p.relative_to(tmp_path).as_posix() for p in listed] == ["real.png", "locked"]
    assert (px, record.status, record.reason, record.path) == (None, "rejected", images.UNREADABLE, "locked")
    assert "folder cannot be listed (PermissionError: Permission denied)" in record.message


def test_a_file_over_the_size_limit_is_rejected_unread(tmp_path, monkeypatch):
    path = tmp_path / "big.png"
    path.write_bytes(_png(photo(60, 80)))
    monkeypatch.setattr(images, "_read_fd", lambda fd: pytest.fail("read a file over the limit"))
    record, px = preprocess_file(path, tmp_path, Preprocess(crop_size=56, resize_size=64, max_file_bytes=1000))
    assert (px, record.reason) == (None, images.TOO_LARGE)
    assert record.message == f"{path.stat().st_size} bytes exceeds the limit of 1000"


def test_a_pixel_limit_above_pillows_own_is_honoured(tmp_path, monkeypatch):
    from PIL import Image as PILImage

    # Pillow's own limit (a module global, 89.5 Mpx by default) scaled down for a small file.
    monkeypatch.setattr(PILImage, "MAX_IMAGE_PIXELS", 10_000)
    path = tmp_path / "wide.png"
    path.write_bytes(_png(photo(120, 120)))  # 14,400 pixels
    assert preprocess_file(path, tmp_path, Preprocess(crop_size=56, resize_size=64, max_pixels=12_000))[0].reason \
        == images.DECOMPRESSION_BOMB
    record, px = preprocess_file(path, tmp_path, Preprocess(crop_size=56, resize_size=64, max_pixels=20_000))
    assert record.status == "ok" and px.shape == (3, 56, 56)
    assert PILImage.MAX_IMAGE_PIXELS == 10_000  # restored after the decode


def test_source_path_stays_inside_the_root(tmp_path):
    assert images.source_path(tmp_path, "b1/caf\\xe9.png") == Path(os.fsdecode(bytes(tmp_path) + b"/b1/caf\xe9.png"))
    for bad in ("../elsewhere.png", "b1/../../x.png", "/etc/passwd"):
        with pytest.raises(ValueError, match="leads outside"):
            images.source_path(tmp_path, bad)


def test_a_path_that_becomes_a_fifo_after_the_check_does_not_block(tmp_path, monkeypatch):
    # The path is checked before it is opened; should it be swapped for a FIFO in between, the
    # non-blocking open returns at once and the check of what was opened rejects it.
    os.mkfifo(tmp_path / "swapped.png")
    checks = []
    check = images._check_regular

    def first_check_misses(st):  # the check before opening still saw a regular file
        checks.append(st)
        if len(checks) > 1:
            check(st)

    monkeypatch.setattr(images, "_check_regular", first_check_misses)
    record, px = _within(10, preprocess_file, tmp_path / "swapped.png", tmp_path, SMALL)
    assert (px, record.reason, record.message) == (None, images.NOT_A_FILE, "a FIFO, not a regular file")
    assert len(checks) == 2


def test_dangling_and_looping_symlinks_are_unreadable(tmp_path):
    (tmp_path / "dangling.png").symlink_to(tmp_path / "gone.png")
    (tmp_path / "loop-a.png").symlink_to(tmp_path / "loop-b.png")
    (tmp_path / "loop-b.png").symlink_to(tmp_path / "loop-a.png")
    for name in ("dangling.png", "loop-a.png"):
        record, px = preprocess_file(tmp_path / name, tmp_path, SMALL)
        assert (px, record.status, record.reason) == (None, "rejected", images.UNREADABLE), record
        assert record.message


def _in_child_as_nobody(fn, timeout=20.0):
    """``fn()``'s JSON-able result, computed in a forked child that has dropped root to
    uid/gid 65534 (root reads any file whatever its mode). ``{"error": ...}`` if it could not."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: never returns into pytest
        code = 1
        try:
            os.close(read_end)
            os.setgroups([])
            os.setgid(65534)
            os.setuid(65534)
            payload, code = fn(), 0
        except BaseException as e:  # noqa: BLE001 -- reported to the parent
            payload = {"error": f"{type(e).__name__}: {e}"}
        try:
            os.write(write_end, json.dumps(payload).encode())
        finally:
            os._exit(code)
    os.close(write_end)
    chunks, deadline = [], time.monotonic() + timeout
    try:
        while True:
            ready, _, _ = select.select([read_end], [], [], max(0.0, deadline - time.monotonic()))
            if not ready:
                os.kill(pid, signal.SIGKILL)
                pytest.fail(f"the unprivileged child did not answer within {timeout}s")
            chunk = os.read(read_end, 65536)
            if not chunk:
                break
            chunks.append(chunk)
    finally:
        os.close(read_end)
        os.waitpid(pid, 0)
    return json.loads(b"".join(chunks) or b'{"error": "no answer"}')


def test_a_file_without_read_permission_is_unreadable():
    # Not tmp_path: pytest's temp folders are 0700, closed to the unprivileged child.
    folder = tempfile.mkdtemp(prefix="imgsim-perm-")
    try:
        os.chmod(folder, 0o755)
        data = _png(photo(60, 80))
        for name, mode in (("open.png", 0o644), ("closed.png", 0o000)):
            with open(os.path.join(folder, name), "wb") as f:
                f.write(data)
            os.chmod(os.path.join(folder, name), mode)

        def check():
            control = images.ImageRecord(path="open.png")
            readable = images.read_file(os.path.join(folder, "open.png"), folder, control)
            record, px = preprocess_file(os.path.join(folder, "closed.png"), folder, SMALL)
            return {"control": len(readable or b""), "record": asdict(record), "pixels": px is not None}

        if os.geteuid() == 0:
            result = _in_child_as_nobody(check)
            if "error" in result:
                pytest.skip(f"cannot drop root here: {result['error']}")
        else:
            if os.access(os.path.join(folder, "closed.png"), os.R_OK):
                pytest.skip("this process reads files whatever their mode")
            result = json.loads(json.dumps(check()))
        assert result["control"] == len(data), "the unprivileged reader cannot reach the folder at all"
        record = result["record"]
        assert (record["status"], record["reason"], result["pixels"]) == ("rejected", images.UNREADABLE, False)
        assert "PermissionError" in record["message"]
    finally:
        shutil.rmtree(folder, ignore_errors=True)


@pytest.mark.parametrize("change, times", [("append", "once"), ("append", "always"), ("touch", "always")])
def test_a_file_that_changes_while_read_is_read_again(tmp_path, monkeypatch, change, times):
    path = tmp_path / "copying.png"
    path.write_bytes(_png(photo(60, 80)))
    changes = []
    read_fd = images._read_fd

    def changing_read(fd):  # the file changes on disk between the first fstat and the read
        if times == "always" or not changes:
            if change == "append":
                with open(path, "ab") as f:
                    f.write(b"\0" * 16)  # trailing bytes after IEND: still a valid PNG
            else:
                st = os.stat(path)
                os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
            changes.append(change)
        return read_fd(fd)

    monkeypatch.setattr(images, "_read_fd", changing_read)
    monkeypatch.setattr(images, "READ_RETRY_DELAY", 0.0)
    record, px = preprocess_file(path, tmp_path, SMALL)
    final = path.read_bytes()
    if times == "once":
        assert (record.status, len(changes)) == ("ok", 1) and px is not None
        assert (record.sha256, record.bytes) == (hashlib.sha256(final).hexdigest(), len(final))
    else:
        assert (px, record.status, record.reason) == (None, "rejected", images.CHANGED_WHILE_READING)
        assert len(changes) == images.READ_ATTEMPTS
        assert ("size changed" if change == "append" else "mtime changed") in record.message
        assert record.sha256 == ""


def test_float_greyscale_is_scaled_not_clipped(tmp_path):
    ramp = np.tile(np.linspace(0.0, 1.0, 80, dtype=np.float32), (60, 1))  # 0-1 floats, as usual
    path = tmp_path / "float.tiff"
    Image.fromarray(ramp, "F").save(path)
    record, px = preprocess_file(path, tmp_path, SMALL)
    assert record.status == "ok" and px.max() > 200 and px.std() > 30  # clipped, all would be 0 or 1


def test_a_mode_without_an_rgb_conversion_is_rejected_as_unsupported(monkeypatch):
    with pytest.raises(images.UnsupportedMode, match="mode La"):
        images._to_rgb(Image.new("La", (60, 80)))
    to_rgb = images._to_rgb
    monkeypatch.setattr(images, "_to_rgb", lambda im: to_rgb(Image.new("La", im.size)))
    record = images.ImageRecord(path="x.png")
    assert decode(_png(photo(60, 80)), SMALL, record) is None
    assert (record.reason, record.message) == (images.UNSUPPORTED_MODE,
                                               "mode La: conversion from La to L not supported")


def test_every_reason_is_documented():
    readme = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    assert [r for r in images.REASONS if f"| `{r}` |" not in readme] == []
