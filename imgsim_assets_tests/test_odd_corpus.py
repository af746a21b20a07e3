"""A batch folder of odd and hostile entries through the real chain, decoded in worker
processes: every entry is one row of raw_images (ok or rejected, with its reason), every ok
image is embedded exactly once, nothing crashes or hangs, and a rerun changes nothing."""

import os
import shutil
import socket

import numpy as np
import pyarrow.parquet as pq
from dagster import instance_for_test
from PIL import Image

from imgsim_assets.core import images
from imgsim_assets.definitions import build_definitions
from imgsim_assets.ingest import ingest
from imgsim_assets.resources import EncoderResource, PreprocessResource
from imgsim_assets.settings import Settings
from imgsim_assets_tests.pictures import encode, photo, png_claiming


def _picture(seed: int, h: int = 60, w: int = 80) -> Image.Image:
    return Image.fromarray(photo(h, w, seed))


def _hostile_batch(images_dir, outside):
    """Write the batch; returns {row path: expected reason ("" for ok)} and the duplicate pair."""
    batch = images_dir / "odd"
    (batch / "nested" / "deeper").mkdir(parents=True)
    outside.mkdir()
    frames = [_picture(20 + i).convert("P") for i in range(3)]
    exif = Image.Exif()
    exif[images.ORIENTATION_TAG] = 6
    palette = _picture(9).convert("P")
    palette.info["transparency"] = 0
    files = {
        "plain.jpg": (encode(_picture(1), "JPEG"), ""),
        "copy_of_plain.jpg": (encode(_picture(1), "JPEG"), ""),  # same bytes: one image_id
        "rotated.jpg": (encode(_picture(2), "JPEG", exif=exif.tobytes()), ""),
        "cmyk.jpg": (encode(_picture(3).convert("CMYK"), "JPEG"), ""),
        "sixteen.png": (encode(Image.fromarray(np.asarray(_picture(4).convert("L"), np.uint16) * 257), "PNG"), ""),
        "one_bit.png": (encode(_picture(5).convert("1"), "PNG"), ""),
        "palette_transparent.png": (encode(palette, "PNG"), ""),
        "animated.gif": (encode(frames[0], "GIF", save_all=True, append_images=frames[1:]), ""),
        "animated.webp": (encode(_picture(6), "WEBP", save_all=True, append_images=[_picture(7)]), ""),
        "pages.tiff": (encode(_picture(8), "TIFF", save_all=True, append_images=[_picture(9)]), ""),
        "nested/deeper/inside.png": (encode(_picture(10), "PNG"), ""),
        "empty.jpg": (b"", images.EMPTY_FILE),
        "page.jpg": (b"<!doctype html><html><body>404</body></html>", images.NOT_AN_IMAGE),
        "cut.jpg": (encode(_picture(11, 300, 400), "JPEG")[:2000], images.TRUNCATED),
        "cut.png": (encode(_picture(12), "PNG")[:300], images.TRUNCATED),
        "bomb.png": (png_claiming(100_000, 100_000), images.DECOMPRESSION_BOMB),
        "tiny.png": (encode(_picture(13, 8, 8), "PNG"), images.TOO_SMALL),
        "x" * 250 + ".png": (encode(_picture(14), "PNG"), ""),  # 254 bytes, near NAME_MAX
    }
    for name, (data, _) in files.items():
        (batch / name).write_bytes(data)
    expected = {f"odd/{name}": reason for name, (_, reason) in files.items()}

    latin1 = os.fsencode(batch) + b"/caf\xe9.png"  # a Latin-1 name, not valid UTF-8
    with open(latin1, "wb") as f:
        f.write(encode(_picture(15), "PNG"))
    expected["odd/caf\\xe9.png"] = ""

    (outside / "secret.png").write_bytes(encode(_picture(16), "PNG"))
    (batch / "escape.png").symlink_to(outside / "secret.png")
    (batch / "link_to_plain.jpg").symlink_to(batch / "plain.jpg")  # inside the root: followed
    (batch / "dangling.png").symlink_to(batch / "no_such_file.png")
    (batch / "loop.png").symlink_to(batch / "loop.png")
    (batch / "linked_folder").symlink_to(batch / "nested")
    os.mkfifo(batch / "pipe.jpg")
    cwd = os.getcwd()
    os.chdir(batch)  # a socket path is limited to 108 bytes: bind the bare name
    try:
        listener = socket.socket(socket.AF_UNIX)
        listener.bind("sock.png")
    finally:
        os.chdir(cwd)
    expected.update({
        "odd/escape.png": images.OUTSIDE_ROOT, "odd/link_to_plain.jpg": "", "odd/dangling.png": images.UNREADABLE,
        "odd/loop.png": images.UNREADABLE, "odd/linked_folder": images.NOT_A_FILE, "odd/pipe.jpg": images.NOT_A_FILE,
        "odd/sock.png": images.NOT_A_FILE,
    })  # fmt: skip
    (batch / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")  # hidden: not an input
    (batch / images.DONE_MARKER).write_bytes(b"")  # the completion marker: not an input
    return expected, listener


def test_a_hostile_batch_is_fully_accounted_for(tmp_path):
    settings = Settings(data_dir=tmp_path / "data")
    expected, listener = _hostile_batch(settings.images_dir, tmp_path / "outside")
    defs = build_definitions(
        settings,
        encoder=EncoderResource(weights="random", depth=1, batch_size=8, device="cpu"),
        preprocessing=PreprocessResource(crop_size=56, resize_size=64, workers=2),  # decoded in worker processes
    )
    (tmp_path / "home").mkdir()
    try:
        with instance_for_test(temp_dir=str(tmp_path / "home")) as instance:
            report = ingest(defs, instance, settings.images_dir, log=lambda m: None)
            assert report.ok and report.embedded == ["odd"], report.failed
            manifest = defs.load_asset_value("raw_images", instance=instance, partition_key="odd").to_pandas()
            again = ingest(defs, instance, settings.images_dir, log=lambda m: None)
            assert again.ok and again.embedded == [] and not again.merged  # nothing changed, nothing redone
    finally:
        listener.close()

    rows = manifest.set_index("path")
    assert manifest.path.is_unique and set(rows.index) == set(expected)
    got = {path: ("" if row.status == "ok" else row.reason) for path, row in rows.iterrows()}
    assert got == expected
    assert (rows[rows.status == "rejected"].message != "").all()
    assert rows.loc["odd/animated.gif", "message"] == "first of 3 frames"
    assert rows.loc["odd/pages.tiff", "message"] == "first of 2 frames"
    assert rows.loc["odd/rotated.jpg", ["width", "height"]].tolist() == [60, 80]

    same = rows.loc[["odd/plain.jpg", "odd/copy_of_plain.jpg", "odd/link_to_plain.jpg"], "image_id"]
    assert same.nunique() == 1
    embedded = pq.read_table(settings.assets_dir / "image_embeddings" / "odd.parquet").column("image_id").to_pylist()
    ok_ids = set(rows[rows.status == "ok"].image_id)
    assert len(embedded) == len(set(embedded)) and set(embedded) == ok_ids
    assert len(ok_ids) == sum(1 for r in expected.values() if not r) - 2  # two copies of plain.jpg
    shutil.rmtree(tmp_path / "outside")
