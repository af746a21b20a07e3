"""One file → one record: whatever reading or decoding rejects ends as exactly one rejected record."""

import os

import numpy as np
import pytest
from PIL import Image

from imgsim_assets.core import images
from imgsim_assets.core.images import Preprocess, Rejected, decode_pixels, list_batch_files, preprocess_file, read_file
from imgsim_assets_tests.pictures import jpeg, photo, png, within


SMALL = Preprocess(crop_size=56, resize_size=64)


@pytest.mark.parametrize(
    "data, reason",
    [
        (b"", images.EMPTY_FILE),
        (b"<html><body>not a picture</body></html>", images.NOT_AN_IMAGE),
        (None, images.TRUNCATED),
        (png(np.zeros((10, 300, 3), np.uint8)), images.TOO_SMALL),
    ],
    ids=["empty", "html", "truncated-jpeg", "too-small"],
)
def test_bad_files_are_rejected_with_a_reason(tmp_path, data, reason):
    if data is None:
        data = jpeg(Image.fromarray(photo(400, 400)))[:3000]
    path = tmp_path / "bad.jpg"
    path.write_bytes(data)
    record, pixels = preprocess_file(path, tmp_path, Preprocess())
    assert pixels is None
    assert (record.status, record.reason) == ("rejected", reason)
    assert record.message
    assert record.path == "bad.jpg"



def _cut_jpeg(path):
    path.write_bytes(jpeg(Image.fromarray(photo(400, 400)))[:3000])


def _fifo(path):
    os.mkfifo(path)


@pytest.mark.parametrize(
    "make, reason, hashed",
    [(_cut_jpeg, images.TRUNCATED, True), (_fifo, images.NOT_A_FILE, False)],
    ids=["truncated-while-decoding", "fifo-while-reading"],
)
def test_a_rejection_raised_inside_becomes_exactly_one_rejected_record(tmp_path, make, reason, hashed):
    (tmp_path / "real.png").write_bytes(png(photo(60, 80)))
    make(tmp_path / "bad.jpg")
    files = list_batch_files(tmp_path)
    results = within(10, lambda: list(images.preprocess_files(files, tmp_path, SMALL, workers=1)))
    assert [(r.path, r.status, r.reason) for r, _ in results] == [("bad.jpg", "rejected", reason), ("real.png", "ok", "")]
    (record, pixels), (_, real) = results
    assert pixels is None and real is not None
    assert bool(record.sha256) == hashed  # rejected after reading (decoding) or before (reading)
    # The record says exactly what was raised.
    with pytest.raises(Rejected) as raised:
        decode_pixels(read_file(tmp_path / "bad.jpg", tmp_path), SMALL, images.ImageRecord(path="bad.jpg"))
    assert (raised.value.reason, raised.value.message) == (record.reason, record.message)
