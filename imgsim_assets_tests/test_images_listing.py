"""Listing a batch folder."""

import hashlib
import os

import pytest

from imgsim_assets.core import images
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


def _fingerprint_file_by_file(files) -> str:
    """The fingerprint as recorded by earlier versions: one hash update per file."""
    h = hashlib.sha256()
    for f in files:
        try:
            st = os.stat(f)
        except OSError:
            try:
                st = os.lstat(f)
            except OSError:
                h.update(f"{f}\0gone\n".encode("utf-8", "surrogateescape"))
                continue
        h.update(f"{f}\0{st.st_size}\0{st.st_mtime_ns}\n".encode("utf-8", "surrogateescape"))
    return h.hexdigest()[:16]


def test_listing_and_fingerprint_keep_the_versions_already_recorded(tmp_path):
    """Consumed folder versions are stored in the event log: listing and fingerprint must give
    the same paths and the same value as they always did, or every batch would look changed."""
    batch = tmp_path / "b1"
    (batch / "sub").mkdir(parents=True)
    for i in range(5000):  # more than one hashing chunk
        (batch / f"img_{i:05d}.jpg").write_bytes(b"x" * (i % 7))
    (batch / "sub" / "b.jpg").write_bytes(b"y")
    (batch / "link.jpg").symlink_to(batch / "img_00001.jpg")
    (batch / "dangling.jpg").symlink_to(tmp_path / "nowhere.jpg")
    listed = images.list_batch_paths(batch)
    assert images.list_batch_paths(f"{batch}{os.sep}") == listed  # a trailing separator changes nothing
    assert listed[-1] == os.path.join(batch, "sub", "b.jpg") and os.path.join(batch, "link.jpg") in listed
    files = [*listed, str(batch / "vanished.jpg")]
    assert images.folder_fingerprint(files) == _fingerprint_file_by_file(files)


def _many_folders(root, count: int) -> list:
    folders = []
    for i in range(count):
        folder = root / f"b{i:03d}"
        folder.mkdir()
        (folder / "img.jpg").write_bytes(b"x" * i)
        folders.append(folder)
    folders[7] = root / "vanished"  # cannot be listed: None, wherever it is fingerprinted
    (folders[8] / "img.jpg").unlink()  # empty: None as well
    return folders


def test_many_folders_are_fingerprinted_in_helper_processes_with_the_same_result(tmp_path, caplog):
    folders = _many_folders(tmp_path, 3 * images.listing.FOLDERS_PER_PROCESS)
    one_by_one = [images.fingerprint_folder(f) for f in folders]
    assert one_by_one[7] is None and one_by_one[8] is None and len(set(one_by_one)) == len(folders) - 1
    assert images.fingerprint_folders(folders, processes=3) == one_by_one
    assert "in this process instead" not in caplog.text  # the helpers answered


@pytest.mark.parametrize("answer, why", [
    ("print('[1, 2]')", "2 answers for 50 folders"),
    ("print(5)", "a int instead of answers for 50 folders"),
    ("import sys; sys.exit(3)", "returned non-zero exit status 3"),
])
def test_a_failing_helper_process_leaves_its_share_to_this_one(tmp_path, monkeypatch, caplog, answer, why):
    folders = _many_folders(tmp_path, 2 * images.listing.FOLDERS_PER_PROCESS)
    monkeypatch.setattr(images.listing, "_HELPER", [images.listing.sys.executable, "-c", answer])
    assert images.fingerprint_folders(folders, processes=2) == [images.fingerprint_folder(f) for f in folders]
    assert "fingerprinting 50 folders in this process instead: " in caplog.text and why in caplog.text
