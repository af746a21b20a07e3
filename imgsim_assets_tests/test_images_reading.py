"""Reading files safely: inside the root, regular files only, within the size limit, unchanged."""

import hashlib
import json
import os
import select
import shutil
import signal
import socket
import stat
import tempfile
import time
from dataclasses import asdict

import pytest

from imgsim_assets.core import images
from imgsim_assets.core.images import Preprocess, list_batch_files, preprocess_file, reading
from imgsim_assets_tests.pictures import photo, png, within


SMALL = Preprocess(crop_size=56, resize_size=64)


def test_unreadable_file_is_rejected(tmp_path):
    record, pixels = preprocess_file(tmp_path / "missing.png", tmp_path, Preprocess())
    assert pixels is None and record.reason == images.UNREADABLE


def test_dangling_and_looping_symlinks_are_unreadable(tmp_path):
    (tmp_path / "dangling.png").symlink_to(tmp_path / "gone.png")
    (tmp_path / "loop-a.png").symlink_to(tmp_path / "loop-b.png")
    (tmp_path / "loop-b.png").symlink_to(tmp_path / "loop-a.png")
    for name in ("dangling.png", "loop-a.png"):
        record, px = preprocess_file(tmp_path / name, tmp_path, SMALL)
        assert (px, record.status, record.reason) == (None, "rejected", images.UNREADABLE), record
        assert record.message


def test_symlinks_are_followed_only_inside_the_root(tmp_path):
    root, outside = tmp_path / "images", tmp_path / "elsewhere"
    (root / "b1").mkdir(parents=True)
    outside.mkdir()
    picture = png(photo(60, 80))
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
    (tmp_path / "real.png").write_bytes(png(photo(60, 80)))
    odd = tmp_path / "odd.png"
    make(odd)
    # Listed, so that it gets its row (the files behind a linked folder are not listed).
    assert [p.name for p in list_batch_files(tmp_path)] == ["odd.png", "real.png"]
    record, px = within(10, preprocess_file, odd, tmp_path, SMALL)
    assert (px, record.status, record.reason) == (None, "rejected", images.NOT_A_FILE)
    assert record.message == message.format(album=(tmp_path / "album").resolve()) and record.sha256 == ""


def test_a_path_that_becomes_a_fifo_after_the_check_does_not_block(tmp_path, monkeypatch):
    # The path is checked before it is opened; should it be swapped for a FIFO in between, the
    # non-blocking open returns at once and the check of what was opened rejects it.
    os.mkfifo(tmp_path / "swapped.png")
    checks = []
    check = reading._check_regular

    def first_check_misses(st):  # the check before opening still saw a regular file
        checks.append(st)
        if len(checks) > 1:
            check(st)

    monkeypatch.setattr(reading, "_check_regular", first_check_misses)
    record, px = within(10, preprocess_file, tmp_path / "swapped.png", tmp_path, SMALL)
    assert (px, record.reason, record.message) == (None, images.NOT_A_FILE, "a FIFO, not a regular file")
    assert len(checks) == 2


def test_a_subfolder_that_cannot_be_listed_gets_a_row(tmp_path):
    (tmp_path / "real.png").write_bytes(png(photo(60, 80)))
    (tmp_path / "locked").mkdir()
    (tmp_path / "locked" / "inside.png").write_bytes(png(photo(60, 80)))
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
    path.write_bytes(png(photo(60, 80)))
    monkeypatch.setattr(reading, "_read_fd", lambda fd: pytest.fail("read a file over the limit"))
    record, px = preprocess_file(path, tmp_path, Preprocess(crop_size=56, resize_size=64, max_file_bytes=1000))
    assert (px, record.reason) == (None, images.TOO_LARGE)
    assert record.message == f"{path.stat().st_size} bytes exceeds the limit of 1000"


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
        data = png(photo(60, 80))
        for name, mode in (("open.png", 0o644), ("closed.png", 0o000)):
            with open(os.path.join(folder, name), "wb") as f:
                f.write(data)
            os.chmod(os.path.join(folder, name), mode)

        def check():
            control, _ = preprocess_file(os.path.join(folder, "open.png"), folder, SMALL)
            record, px = preprocess_file(os.path.join(folder, "closed.png"), folder, SMALL)
            return {"control": control.bytes, "record": asdict(record), "pixels": px is not None}

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
    path.write_bytes(png(photo(60, 80)))
    changes = []
    read_fd = reading._read_fd

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

    monkeypatch.setattr(reading, "_read_fd", changing_read)
    monkeypatch.setattr(reading, "READ_RETRY_DELAY", 0.0)
    record, px = preprocess_file(path, tmp_path, SMALL)
    final = path.read_bytes()
    if times == "once":
        assert (record.status, len(changes)) == ("ok", 1) and px is not None
        assert (record.sha256, record.bytes) == (hashlib.sha256(final).hexdigest(), len(final))
    else:
        assert (px, record.status, record.reason) == (None, "rejected", images.CHANGED_WHILE_READING)
        assert len(changes) == reading.READ_ATTEMPTS
        assert ("size changed" if change == "append" else "mtime changed") in record.message
        assert record.sha256 == ""
