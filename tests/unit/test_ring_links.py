"""hostbusd.net.ring._unlink_inodes: removing links to a ring's semaphore files, on a real tree."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from hostbusd.net import ring


def test_links_are_removed_in_subdirectories_and_nothing_is_followed_or_touched_else(tmp_path: Path) -> None:
    top = tmp_path / "shm"
    (top / "sub" / "deeper").mkdir(parents=True)
    outside = tmp_path / "outside"
    outside.mkdir()
    sem = top / "sem.file"
    sem.write_bytes(b"x" * 32)
    os.link(sem, top / "sub" / "link1")
    os.link(sem, top / "sub" / "deeper" / "link2")
    os.link(sem, outside / "beyond-a-symlink")
    (top / "to-outside").symlink_to(outside)  # a directory symlink is not entered
    (top / "sym-to-sem").symlink_to(sem)  # a symlink is not the file
    (top / "other").write_bytes(b"y")
    st = sem.stat()

    removed, looked_at = ring._unlink_inodes(top, {(st.st_dev, st.st_ino)})

    assert removed == 3  # sem.file, link1, link2
    assert looked_at == 8  # 5 entries in shm, 2 in sub, 1 in deeper
    assert sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*")) == [
        "outside", "outside/beyond-a-symlink", "shm", "shm/other", "shm/sub", "shm/sub/deeper",
        "shm/sym-to-sem", "shm/to-outside"]


def test_the_scan_stops_at_its_bound(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A client may fill /dev/shm with entries: the search looks at LINK_SCAN_MAX of them at most.
    top = tmp_path / "shm"
    top.mkdir()
    sem = tmp_path / "sem.file"
    sem.write_bytes(b"")
    for i in range(40):
        (top / f"f{i:02}").write_bytes(b"")
    os.link(sem, top / "link")
    st = sem.stat()
    monkeypatch.setattr(ring, "LINK_SCAN_MAX", 20)
    removed, looked_at = ring._unlink_inodes(top, {(st.st_dev, st.st_ino)})
    assert looked_at == 20
    assert removed == (0 if (top / "link").exists() else 1)  # the link was among those 20, or not
    monkeypatch.setattr(ring, "LINK_SCAN_MAX", 10_000)
    assert ring._unlink_inodes(top, {(st.st_dev, st.st_ino)}) == (1 - removed, 41 - removed)
    assert not (top / "link").exists()


def test_many_directories_do_not_hide_a_link(tmp_path: Path) -> None:
    # Directories are walked one level open at a time, not dropped past a count.
    top = tmp_path / "shm"
    top.mkdir()
    for i in range(200):
        (top / f"d{i:03}").mkdir()
    sem = tmp_path / "sem.file"
    sem.write_bytes(b"")
    os.link(sem, top / "d150" / "link")
    st = sem.stat()
    assert ring._unlink_inodes(top, {(st.st_dev, st.st_ino)}) == (1, 201)


def test_the_depth_is_bounded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    top = tmp_path / "shm"
    deep = top / "a" / "b" / "c"
    deep.mkdir(parents=True)
    sem = tmp_path / "sem.file"
    sem.write_bytes(b"")
    os.link(sem, deep / "link")
    st = sem.stat()
    monkeypatch.setattr(ring, "LINK_SCAN_DEPTH", 3)  # shm, a, b open: c is not entered
    assert ring._unlink_inodes(top, {(st.st_dev, st.st_ino)}) == (0, 3)
    monkeypatch.setattr(ring, "LINK_SCAN_DEPTH", 4)
    assert ring._unlink_inodes(top, {(st.st_dev, st.st_ino)}) == (1, 4)


@pytest.mark.skipif(os.geteuid() != 0, reason="mounting a file system needs root")
@pytest.mark.parametrize("mount_name", ["mounted", "mounted déjà vu"])  # mountinfo escapes the space
def test_a_file_system_mounted_below_is_not_entered(tmp_path: Path, mount_name: str) -> None:
    top = tmp_path / "shm"
    mnt = top / mount_name
    mnt.mkdir(parents=True)
    sem = top / "sem.file"
    sem.write_bytes(b"")
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mnt)], check=True)
    try:
        for i in range(20):
            (mnt / f"f{i}").write_bytes(b"")
        st = sem.stat()
        assert ring._unlink_inodes(top, {(st.st_dev, st.st_ino)}) == (1, 2)  # sem.file and the mount point
    finally:
        subprocess.run(["umount", str(mnt)], check=True)
