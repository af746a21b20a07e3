"""Names in the manifest: odd file names as valid UTF-8 and back, content addresses, source paths."""

import io
import json
import os
from dataclasses import asdict
from pathlib import Path

import pytest

from imgsim_assets.core import images
from imgsim_assets.core.images import Preprocess, image_id_from_sha256, list_batch_files, preprocess_file
from imgsim_assets_tests.pictures import photo, png


SMALL = Preprocess(crop_size=56, resize_size=64)


def test_image_id_is_content_addressed(tmp_path):
    data = png(photo())
    (tmp_path / "a.png").write_bytes(data)
    (tmp_path / "b.png").write_bytes(data)
    ra, _ = preprocess_file(tmp_path / "a.png", tmp_path, Preprocess())
    rb, _ = preprocess_file(tmp_path / "b.png", tmp_path, Preprocess())
    assert ra.image_id == rb.image_id == image_id_from_sha256(ra.sha256)
    assert 0 <= ra.image_id < 2**63


def test_odd_file_names_are_listed_and_recorded_as_valid_utf8(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    from imgsim_assets.core import tables

    picture = png(photo(60, 80))
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
        json.dumps(asdict(record), ensure_ascii=False, default=str).encode("utf-8")  # default: its times
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


def test_source_path_stays_inside_the_root(tmp_path):
    assert images.source_path(tmp_path, "b1/caf\\xe9.png") == Path(os.fsdecode(bytes(tmp_path) + b"/b1/caf\xe9.png"))
    for bad in ("../elsewhere.png", "b1/../../x.png", "/etc/passwd"):
        with pytest.raises(ValueError, match="leads outside"):
            images.source_path(tmp_path, bad)
