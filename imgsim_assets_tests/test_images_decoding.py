"""Decoding good files: JPEG draft, EXIF orientation, modes and transparency to RGB, first frames."""

import io

import numpy as np
import pytest
from PIL import Image, TiffImagePlugin, TiffTags

from imgsim_assets.core import images
from imgsim_assets.core.images import Preprocess, decode, preprocess_file
from imgsim_assets_tests.pictures import encode, jpeg, photo, png


SMALL = Preprocess(crop_size=56, resize_size=64)


def _decoded(data: bytes, pre=SMALL, box=None) -> tuple[images.ImageRecord, np.ndarray | None]:
    record = images.ImageRecord(path="x")
    return record, decode(data, pre, record, box)


def test_jpeg_draft_is_close_to_full_decode():
    data = jpeg(Image.fromarray(photo(1200, 1600)))
    full = decode(data, Preprocess(draft=False), images.ImageRecord(path="x")).astype(float)
    fast = decode(data, Preprocess(draft=True), images.ImageRecord(path="x")).astype(float)
    assert np.abs(full - fast).mean() < 4.0


def test_jpeg_draft_never_decodes_below_the_target_of_a_rotated_image(monkeypatch):
    # Stored landscape 1200×300 with EXIF orientation 6: displayed portrait 300×1200.
    exif = Image.Exif()
    exif[images.ORIENTATION_TAG] = 6
    data = jpeg(Image.fromarray(photo(300, 1200)), exif=exif.tobytes())
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


def test_exif_orientation_is_applied():
    a = photo(200, 300)
    exif = Image.Exif()
    exif[images.ORIENTATION_TAG] = 6  # stored landscape, displayed portrait (rotate 90° clockwise)
    rec = images.ImageRecord(path="x.jpg")
    out = decode(jpeg(Image.fromarray(a), exif=exif.tobytes()), Preprocess(draft=False), rec)
    assert (rec.width, rec.height) == (200, 300)
    upright = decode(jpeg(Image.fromarray(a).transpose(Image.Transpose.ROTATE_270)), Preprocess(draft=False),
                     images.ImageRecord(path="y.jpg"))
    assert np.abs(out.astype(float) - upright.astype(float)).mean() < 3.0


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
    _, expected = _decoded(png(upright))
    diff = np.abs(out.astype(float) - expected.astype(float))
    if fmt == "JPEG":  # compression noise is about 3.5 levels; a wrong orientation is over 50
        assert diff.mean() < 6.0
    else:
        assert diff.max() == 0


@pytest.mark.parametrize("value", [9, 0, "6"], ids=["9", "0", "ascii"])
def test_tiff_with_a_bogus_orientation_is_used_as_stored(value):
    tags = TiffImagePlugin.ImageFileDirectory_v2()
    tags[images.ORIENTATION_TAG] = value
    tags.tagtype[images.ORIENTATION_TAG] = TiffTags.ASCII if isinstance(value, str) else TiffTags.SHORT
    picture = photo(60, 80)
    rec, out = _decoded(encode(Image.fromarray(picture), "TIFF", tiffinfo=tags))
    assert (rec.status, rec.size) == ("ok", (80, 60)), rec.message
    np.testing.assert_array_equal(out, _decoded(png(picture))[1])


def test_rgba_is_composited_on_white():
    a = np.zeros((64, 64, 4), np.uint8)
    a[..., 0] = 255  # red, fully transparent
    out = decode(png(a, "RGBA"), Preprocess(crop_size=56, resize_size=64), images.ImageRecord(path="x"))
    assert out.min() == 255


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


def test_float_greyscale_is_scaled_not_clipped(tmp_path):
    ramp = np.tile(np.linspace(0.0, 1.0, 80, dtype=np.float32), (60, 1))  # 0-1 floats, as usual
    path = tmp_path / "float.tiff"
    Image.fromarray(ramp, "F").save(path)
    record, px = preprocess_file(path, tmp_path, SMALL)
    assert record.status == "ok" and px.max() > 200 and px.std() > 30  # clipped, all would be 0 or 1


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
    _, expected = _decoded(png(on_white))
    assert rec.status == "ok", rec.message
    assert np.abs(out.astype(int) - expected.astype(int)).max() <= 2
    assert out[:, 0, 0].tolist() == [255, 255, 255]  # the transparent red corner is background


def test_animated_gif_uses_the_first_frame_and_says_so(tmp_path):
    frames = [Image.fromarray(photo(60, 80, seed=i)).convert("P") for i in range(3)]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50)
    record, px = preprocess_file(path, tmp_path, Preprocess(crop_size=56, resize_size=64))
    assert record.status == "ok" and record.message == "first of 3 frames" and px.shape == (3, 56, 56)


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


def _png(array: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(array).save(out, format="PNG", compress_level=1)
    return out.getvalue()


def test_the_decode_budget_is_read_from_the_header_before_decoding():
    deep = _png((np.arange(3000 * 2000, dtype=np.uint32) % 65536).astype(np.uint16).reshape(2000, 3000))
    budget = Preprocess(crop_size=56, resize_size=64, max_decode_bytes=16 << 20)  # 6 Mpx × 3 B = 17 MiB
    record, pixels = _decoded(deep, budget)
    assert pixels is None and record.reason == images.DECOMPRESSION_BOMB
    assert record.message == "decoding 3000x2000 I;16 takes about 17 MiB, over the budget of 16 MiB"
    assert (record.width, record.height) == (3000, 2000)
    record, pixels = _decoded(deep, Preprocess(crop_size=56, resize_size=64, max_decode_bytes=18 << 20))
    assert record.status == "ok" and pixels.shape == (3, 56, 56)
    # What each mode costs: the frame as Pillow holds it plus the copies on the way to RGB.
    assert [images.decoding.decode_bytes(m, 10, 10) for m in ("RGB", "L", "1", "I;16", "RGBA", "P", "CMYK")] == [
        400, 100, 200, 300, 800, 900, 800]
    assert images.decoding.decode_bytes("RGB", 10, 10, rotated=True) == 800


@pytest.mark.parametrize("mode", ["I;16", "I", "F"])
def test_deep_greyscale_is_scaled_as_before_without_a_float64_copy(mode):
    rng = np.random.default_rng(3)
    if mode == "I;16":
        a = rng.integers(0, 65536, (150, 200)).astype(np.uint16)
        expected_8 = np.floor(a.astype(np.float64) / 65535 * 255 + 0.5).astype(np.uint8)
        im = Image.fromarray(a)
    elif mode == "I":
        a = rng.integers(0, 5_000_000, (150, 200)).astype(np.int32)
        expected_8 = np.clip(a / a.max() * 255 + 0.5, 0, 255).astype(np.uint8)
        im = Image.fromarray(a, "I")
    else:
        a = rng.random((150, 200)).astype(np.float32)
        expected_8 = np.clip(a.astype(np.float64) * 255 + 0.5, 0, 255).astype(np.uint8)
        im = Image.fromarray(a, "F")
    got = images.decoding._to_8_bits(im, rows=64)  # several blocks
    assert np.abs(got.astype(int) - expected_8).max() <= (0 if mode == "I;16" else 1)
    # Resized as one band, then made RGB: the same pixels as resizing the RGB picture.
    pre = Preprocess(crop_size=56, resize_size=64)
    one_band = np.asarray(images.protocol.resize_and_crop(Image.fromarray(got, "L"), pre).convert("RGB"))
    three = np.asarray(images.protocol.resize_and_crop(Image.fromarray(got, "L").convert("RGB"), pre))
    assert np.array_equal(one_band, three)


@pytest.mark.parametrize("orientation", [1, 3, 6, 8])
def test_a_box_is_in_the_pixels_of_the_upright_picture(orientation):
    upright = photo(240, 320, seed=7)  # displayed landscape 320×240
    exif = Image.Exif()
    exif[images.ORIENTATION_TAG] = orientation
    data = encode(Image.fromarray(_as_stored(upright, orientation)), "PNG", exif=exif.tobytes())
    box = images.Box(200, 20, 300, 140)  # a region of the right half as displayed
    rec, out = _decoded(data, box=box)
    assert (rec.status, rec.size) == ("ok", (320, 240))
    np.testing.assert_array_equal(out, _decoded(png(upright[20:140, 200:300]))[1])


def test_a_box_in_a_drafted_jpeg_is_decoded_at_the_scale_the_box_needs(monkeypatch):
    picture = photo(1200, 1600, seed=8)
    data = jpeg(Image.fromarray(picture))
    resizes = []
    original = Image.Image.resize

    def spy(self, size, *args, **kwargs):
        resizes.append(self.size)
        return original(self, size, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", spy)
    _decoded(data, Preprocess())
    assert resizes[-1] == (400, 300)  # 1/4 scale covers 256 of the whole
    box = images.Box(400, 300, 1200, 900)  # 800×600: the whole picture's quarter draft leaves it 200×150
    _, boxed = _decoded(data, Preprocess(), box=box)
    assert resizes[-1] == (400, 300)  # cut from a half-scale draft: the smallest that still covers 256
    exact = decode(jpeg(Image.fromarray(picture[300:900, 400:1200])), Preprocess(draft=False), images.ImageRecord(path="y"))
    assert np.abs(boxed.astype(float) - exact.astype(float)).mean() < 4.0


def test_a_box_changes_no_limit():
    bomb = encode(Image.new("1", (20_000, 20_000)), "PNG")
    rec, out = _decoded(bomb, box=images.Box(0, 0, 100, 100))
    assert out is None and rec.reason == images.DECOMPRESSION_BOMB
    with pytest.raises(images.BadBox, match="lies outside the 80x60 image"):
        _decoded(png(photo(60, 80)), box=images.Box(100, 100, 200, 200))
    budget = Preprocess(crop_size=56, resize_size=64, max_decode_bytes=100 * 100 * 4 + 10 * 10 * 4 + 800)
    assert _decoded(png(photo(100, 100)), budget, box=images.Box(0, 0, 10, 10))[0].status == "ok"
    rec, _ = _decoded(png(photo(100, 100)), budget, box=images.Box(0, 0, 60, 60))  # the cut-out counts too
    assert rec.reason == images.DECOMPRESSION_BOMB
