import io

import numpy as np
import pytest
from PIL import Image
from torchvision import transforms

from imgsim_assets.core import images
from imgsim_assets.core.images import Preprocess, decode, image_id_from_sha256, list_batch_files, preprocess_file


def _png(a: np.ndarray, mode=None) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(a, mode).save(buf, format="PNG")
    return buf.getvalue()


def _jpeg(im: Image.Image, **kw) -> bytes:
    buf = io.BytesIO()
    im.save(buf, format="JPEG", quality=95, **kw)
    return buf.getvalue()


def _photo(h=300, w=400, seed=0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w]
    a = np.stack([(xx * 255 // w), (yy * 255 // h), ((xx + yy) % 256)], axis=-1).astype(np.uint8)
    return np.clip(a + rng.integers(0, 20, a.shape), 0, 255).astype(np.uint8)


def test_eval_protocol_matches_torchvision_resize_center_crop():
    a = _photo()
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
    out = decode(_png(_photo()), Preprocess(protocol="grid", grid_size=(70, 98)), images.ImageRecord(path="x"))
    assert out.shape == (3, 70, 98)


def test_sizes_must_be_multiples_of_the_patch():
    with pytest.raises(ValueError, match="multiple of the patch size 14"):
        Preprocess(crop_size=225)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        Preprocess(protocol="grid", grid_size=(100, 70))


def test_jpeg_draft_is_close_to_full_decode():
    data = _jpeg(Image.fromarray(_photo(1200, 1600)))
    full = decode(data, Preprocess(draft=False), images.ImageRecord(path="x")).astype(float)
    fast = decode(data, Preprocess(draft=True), images.ImageRecord(path="x")).astype(float)
    assert np.abs(full - fast).mean() < 4.0


def test_exif_orientation_is_applied():
    a = _photo(200, 300)
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
        data = _jpeg(Image.fromarray(_photo(400, 400)))[:3000]
    path = tmp_path / "bad.jpg"
    path.write_bytes(data)
    record, pixels = preprocess_file(path, tmp_path, Preprocess())
    assert pixels is None
    assert (record.status, record.reason) == ("rejected", reason)
    assert record.message
    assert record.path == "bad.jpg"


def test_decompression_bomb_is_rejected_before_decoding(tmp_path):
    path = tmp_path / "big.png"
    path.write_bytes(_png(_photo(300, 300)))
    record, pixels = preprocess_file(path, tmp_path, Preprocess(max_pixels=10_000))
    assert pixels is None and record.reason == images.DECOMPRESSION_BOMB


def test_unreadable_file_is_rejected(tmp_path):
    record, pixels = preprocess_file(tmp_path / "missing.png", tmp_path, Preprocess())
    assert pixels is None and record.reason == images.UNREADABLE


def test_image_id_is_content_addressed(tmp_path):
    data = _png(_photo())
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
        p.write_bytes(_png(_photo(60, 80, seed=i)))
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
    data = _jpeg(Image.fromarray(_photo(300, 1200)), exif=exif.tobytes())
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
    picture = _png(_photo(60, 80))
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
    rgb = Image.fromarray(_photo(60, 80))
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
    frames = [Image.fromarray(_photo(60, 80, seed=i)).convert("P") for i in range(3)]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=50)
    record, px = preprocess_file(path, tmp_path, Preprocess(crop_size=56, resize_size=64))
    assert record.status == "ok" and record.message == "first of 3 frames" and px.shape == (3, 56, 56)
