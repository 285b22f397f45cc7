"""The segment log of topic queues: appends, recovery of torn and corrupt files, retention, faults."""

from __future__ import annotations

import os
import resource
import signal
import struct
from pathlib import Path

import pytest

from hostbusd.store.segments import HEAD, META, SegmentLog, StorageError


def payloads(n: int, size: int = 10, start: int = 0) -> list[bytes]:
    return [struct.pack("<I", start + i) + b"x" * (size - 4) for i in range(n)]


def test_appends_come_back_in_order_across_segments_and_reopening(tmp_path: Path) -> None:
    log = SegmentLog.open(tmp_path / "q", max_segment_bytes=1000)
    assert log.append(payloads(50)) == list(range(1, 51))
    assert log.append(payloads(50, start=50)) == list(range(51, 101))
    log.sync()
    assert len(log.segments) > 3  # rolled over
    assert [p for _, _, p in log.read()] == payloads(100)
    log.close()
    again = SegmentLog.open(tmp_path / "q", max_segment_bytes=1000)
    assert (again.first_seq, again.last_seq, len(again)) == (1, 100, 100)
    assert again.recovery.files == {}
    assert [s for s, _, _ in again.read(97)] == [97, 98, 99, 100]
    assert again.append([b"next"]) == [101]  # appends go on where they stopped
    assert [p for _, _, p in again.read(101)] == [b"next"]
    again.close()


def test_a_torn_tail_is_cut_off_and_reported(tmp_path: Path) -> None:
    log = SegmentLog.open(tmp_path / "q")
    log.append(payloads(10))
    log.close()
    seg = next((tmp_path / "q").iterdir())
    whole = seg.stat().st_size
    with open(seg, "ab") as f:  # a crash in the middle of a write: half a record
        body = META.pack(11, 0) + b"half"
        f.write(HEAD.pack(len(body) + 4 + 100, 0) + body)
    torn = seg.stat().st_size
    log = SegmentLog.open(tmp_path / "q")
    assert log.last_seq == 10 and seg.stat().st_size == whole
    assert log.recovery.files == {seg.name: (torn - whole, 1)}
    assert log.recovery.discarded_bytes == torn - whole
    assert log.append([b"eleven"]) == [11]
    log.close()


@pytest.mark.parametrize("where", ["payload", "length", "seq"])
def test_a_flipped_byte_is_never_delivered(tmp_path: Path, where: str) -> None:
    log = SegmentLog.open(tmp_path / "q")
    log.append(payloads(10, size=20))
    log.close()
    seg = next((tmp_path / "q").iterdir())
    data = bytearray(seg.read_bytes())
    rec = HEAD.size + META.size + 20  # bytes per record
    fifth = 4 * rec  # the 5th record starts here
    offset = {"payload": fifth + HEAD.size + META.size + 3, "length": fifth, "seq": fifth + HEAD.size}[where]
    data[offset] ^= 0x40
    seg.write_bytes(bytes(data))
    log = SegmentLog.open(tmp_path / "q")
    got = list(log.read())
    assert [p for _, _, p in got] == payloads(4, size=20)  # the 4 before it, intact; nothing corrupt
    assert log.last_seq == 4
    assert log.recovery.files[seg.name][0] == len(data) - fifth
    assert log.append([b"after"]) == [5]  # the sequence goes on from what was kept
    log.close()


def test_retention_is_exact_to_the_record_and_deletes_whole_segments(tmp_path: Path) -> None:
    log = SegmentLog.open(tmp_path / "q", max_segment_bytes=500)
    t0 = 1_000_000_000_000
    for i in range(10):
        log.append(payloads(10, start=i * 10), now_ns=t0 + i * 1_000_000_000)
    assert len(log) == 100
    before = len(log.segments)
    rec = HEAD.size + META.size + 10  # bytes per record
    assert log.trim(max_msgs=60) == 40
    assert (len(log), log.first_seq, log.last_seq) == (60, 41, 100) and len(log.segments) < before
    assert [s for s, _, _ in log.read()][:2] == [41, 42]  # reading starts at what is left
    assert log.nbytes == 60 * rec
    assert log.trim(max_bytes=25 * rec + 5) == 35 and len(log) == 25 and log.nbytes == 25 * rec
    # By age: at t0 + 9.5 s, what is older than 2 s (stored at t0 + 7 s: seqs 76-80) goes.
    assert log.trim(max_age_ns=2_000_000_000, now_ns=t0 + 9_500_000_000) == 5
    assert log.first_seq == 81 and log.time_of(81) == t0 + 8_000_000_000
    log.trim(below_seq=log.last_seq)
    assert (log.first_seq, len(log)) == (100, 1)
    assert all(seg.last >= 100 for seg in log.segments)  # nothing wholly below the floor is kept
    assert log.drop_below(101) == 1 and len(log) == 0  # a purge: everything
    assert log.append([b"after the purge"]) == [101]
    log.close()
    again = SegmentLog.open(tmp_path / "q", max_segment_bytes=500, floor=101)
    assert [p for _, _, p in again.read()] == [b"after the purge"]
    again.close()
    assert len(list((tmp_path / "q").iterdir())) == 1


def test_reopening_with_a_stored_floor_hides_what_was_removed(tmp_path: Path) -> None:
    log = SegmentLog.open(tmp_path / "q")
    log.append(payloads(10))
    log.trim(max_msgs=4)
    assert log.first_seq == 7
    log.close()
    again = SegmentLog.open(tmp_path / "q", floor=7)
    assert [s for s, _, _ in again.read()] == [7, 8, 9, 10]
    again.close()


def test_replay_from_a_time(tmp_path: Path) -> None:
    log = SegmentLog.open(tmp_path / "q")
    for i in range(5):
        log.append([f"m{i}".encode()], now_ns=(i + 1) * 1000)
    assert log.seq_at_time(2500) == 3
    assert [p for _, _, p in log.read(log.seq_at_time(2500))] == [b"m2", b"m3", b"m4"]
    assert log.seq_at_time(10_000) == 6  # nothing yet: the next one
    log.close()


def test_a_write_the_filesystem_refuses_leaves_the_log_as_it_was(tmp_path: Path) -> None:
    """A file size limit stands in for a full disk: the append fails with a clear error, what
    was stored before stays, and the log takes appends again once there is room."""
    pid = os.fork()
    if pid == 0:
        code = 1
        try:
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # EFBIG instead of death
            log = SegmentLog.open(tmp_path / "q", max_segment_bytes=1 << 30)
            log.append(payloads(100))
            log.sync()
            size = log.nbytes
            resource.setrlimit(resource.RLIMIT_FSIZE, (size + 50, resource.RLIM_INFINITY))
            try:
                log.append(payloads(100, start=100))
            except StorageError as exc:
                assert "cannot append" in str(exc) and "File too large" in str(exc), exc
            else:
                raise AssertionError("the append should have failed")
            assert log.nbytes == size and log.last_seq == 100
            log.close()
            code = 0
        except BaseException:
            import traceback

            traceback.print_exc()
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
    log = SegmentLog.open(tmp_path / "q")
    assert log.recovery.files == {}  # the failed write left nothing half-written
    assert [p for _, _, p in log.read()] == payloads(100)
    assert log.append([b"room again"]) == [101]
    log.close()


def test_a_segment_cut_short_in_the_middle_leaves_a_gap_that_reads_skip(tmp_path: Path) -> None:
    log = SegmentLog.open(tmp_path / "q", max_segment_bytes=300)
    log.append(payloads(40))
    log.close()
    segs = sorted((tmp_path / "q").iterdir())
    assert len(segs) > 3
    second = segs[1]
    data = bytearray(second.read_bytes())
    data[HEAD.size + META.size + 2] ^= 0xFF  # the first record of the second segment
    second.write_bytes(bytes(data))
    log = SegmentLog.open(tmp_path / "q", max_segment_bytes=300)
    first_of_second = int(second.name[:-4])
    assert log.recovery.files[second.name][1] >= 1
    got = [s for s, _, _ in log.read()]
    after = int(segs[2].name[:-4])
    assert got == [*range(1, first_of_second), *range(after, 41)]  # the gap is skipped, nothing corrupt read
    assert [s for s, _, _ in log.read(first_of_second, 1)] == [after]  # asked inside the gap: what follows it
    assert log.append([b"next"]) == [41]
    log.close()
