"""Listing a batch folder."""

import pytest

from imgsim_assets.core.images import list_batch_files


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
