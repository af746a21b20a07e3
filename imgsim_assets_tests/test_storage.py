import os
import time

import pytest

from imgsim_assets.core.storage import atomic_path, ensure_open_files, publish_dir, remove_stale_temporaries


def test_atomic_path_keeps_the_old_file_when_the_writer_fails(tmp_path):
    target = tmp_path / "a.txt"
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half of the new")
            raise RuntimeError("killed")
    assert target.read_text() == "old"
    assert os.listdir(tmp_path) == ["a.txt"]
    with atomic_path(target) as tmp:
        tmp.write_text("new")
    assert target.read_text() == "new"


def test_publish_dir_switches_versions_atomically(tmp_path):
    link = tmp_path / "index"
    publish_dir(link, lambda d: (d / "f").write_text("1"))
    first = link.resolve()
    with pytest.raises(RuntimeError):
        publish_dir(link, lambda d: (_ for _ in ()).throw(RuntimeError("killed")))
    assert (link / "f").read_text() == "1" and link.resolve() == first
    publish_dir(link, lambda d: (d / "f").write_text("2"))
    assert (link / "f").read_text() == "2"
    assert not first.exists()
    assert sorted(p.name.split(".v-")[0] for p in tmp_path.iterdir()) == ["index", "index"]


def test_only_old_leftovers_are_cleaned(tmp_path):
    old, fresh = tmp_path / ".x.tmp-old", tmp_path / ".x.tmp-fresh"
    old.write_text("")
    fresh.write_text("")
    (tmp_path / "keep.parquet").write_text("")
    hour_ago = time.time() - 7200
    os.utime(old, (hour_ago, hour_ago))
    assert remove_stale_temporaries(tmp_path) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [".x.tmp-fresh", "keep.parquet"]


def test_many_batch_files_can_stay_open_past_a_low_soft_limit(tmp_path, monkeypatch):
    import resource

    import pyarrow as pa
    import pyarrow.parquet as pq

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    open_now = len(os.listdir("/proc/self/fd"))
    resource.setrlimit(resource.RLIMIT_NOFILE, (open_now + 20, hard))  # as a 1,024 limit is to 1,000 batches
    try:
        pq.write_table(pa.table({"x": [1]}), tmp_path / "b.parquet")
        ensure_open_files(300)
        files = [pq.ParquetFile(tmp_path / "b.parquet", pre_buffer=False) for _ in range(300)]  # each holds its file open
        assert sum(f.metadata.num_rows for f in files) == 300
        assert resource.getrlimit(resource.RLIMIT_NOFILE)[0] >= open_now + 300
        del files
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    monkeypatch.setattr(resource, "getrlimit", lambda which: (100, 200))
    with pytest.raises(OSError, match="hard limit"):
        ensure_open_files(1000)
