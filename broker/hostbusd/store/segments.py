"""Append-only segment files: the on-disk form of one topic queue (the storage of issue-5 queues).

A queue's directory holds segment files named by the sequence number of their first record,
``00000000000000000001.seg``. A segment is a sequence of records::

    u32 length      bytes after this field: 20 + len(payload)
    u32 crc32       of everything after this field (seq, time, payload)
    u64 seq         1, 2, 3 ... without gaps within the log
    u64 time_ns     when it was stored (wall clock, for max_age and replay by time)
    payload

Appends go to the last segment until it holds ``max_segment_bytes``; then a new one starts.
Retention deletes whole segments, oldest first. ``sync()`` makes what was appended durable
(``fdatasync``); when to call it is the caller's policy (always / interval / never).

Recovery (:meth:`SegmentLog.open`) reads every segment and checks every record's length,
checksum and sequence. The first bad record of a segment ends what is kept of it: in the last
segment this is a torn tail (a crash during a write) and the file is truncated there; in an
earlier one it is corruption, and the segment is truncated too. What was discarded is reported
in :attr:`SegmentLog.recovery` (bytes and records per file) for the caller to log. A record
that fails its checksum is never returned.

No I/O happens outside the queue's directory, and nothing here knows about topics or consumers.
"""

from __future__ import annotations

import contextlib
import os
import struct
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

HEAD = struct.Struct("<II")  # length, crc32
META = struct.Struct("<QQ")  # seq, time_ns
SUFFIX = ".seg"
#: Largest record a log accepts (a queue's max_msg_size is checked before this).
MAX_RECORD = 1 << 30


class StorageError(Exception):
    """The log cannot do what was asked (disk full, I/O error, a record too large); the message
    says which file and why. What was stored before stays stored."""


@dataclass
class Segment:
    path: Path
    first: int  # seq of its first record (from the name)
    last: int  # seq of its last record (first - 1 when empty)
    size: int  # bytes
    first_time: int = 0  # time_ns of its first record
    last_time: int = 0


@dataclass
class Recovery:
    files: dict[str, tuple[int, int]] = field(default_factory=dict)  # name -> (bytes, records) discarded

    @property
    def discarded_bytes(self) -> int:
        return sum(b for b, _ in self.files.values())


def _name(first: int) -> str:
    return f"{first:020d}{SUFFIX}"


class SegmentLog:
    """One queue's records on disk. Not thread-safe: one owner (the broker's loop, or a writer)."""

    def __init__(self, directory: Path, max_segment_bytes: int = 64 * 1024 * 1024) -> None:
        self.dir = directory
        self.max_segment_bytes = max_segment_bytes
        self.segments: list[Segment] = []
        self.recovery = Recovery()
        self._fd = -1  # the last segment, open for appending
        self._dirty = False

    # ---- opening ------------------------------------------------------------------------------

    @classmethod
    def open(cls, directory: Path, max_segment_bytes: int = 64 * 1024 * 1024) -> SegmentLog:
        """Open (creating it if missing) and recover a log; see the module docstring."""
        log = cls(directory, max_segment_bytes)
        directory.mkdir(mode=0o700, parents=True, exist_ok=True)
        names = sorted(p for p in directory.iterdir() if p.name.endswith(SUFFIX))
        expected = None
        for path in names:
            try:
                first = int(path.name[:-len(SUFFIX)])
            except ValueError:
                continue
            if expected is not None and first != expected:
                # A gap between segments: a file was lost. Keep what follows, numbered as it is.
                log.recovery.files.setdefault(f"(gap before {path.name})", (0, first - expected))
            seg = log._scan(path, first)
            if seg.last < seg.first and log.segments and path != names[-1]:
                os.unlink(path)  # an empty segment in the middle: nothing to keep
                continue
            log.segments.append(seg)
            expected = seg.last + 1
        if not log.segments:
            log._new_segment(1)
        else:
            log._fd = os.open(log.segments[-1].path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        return log

    def _scan(self, path: Path, first: int) -> Segment:
        data = path.read_bytes()
        pos = 0
        seq = first - 1
        first_time = last_time = 0
        while pos < len(data):
            rec = self._record_at(data, pos, seq + 1)
            if rec is None:
                break
            length, _, t = rec
            if seq == first - 1:
                first_time = t
            last_time = t
            seq += 1
            pos += 4 + length
        if pos < len(data):
            dropped = self._count_tail(data, pos)
            self.recovery.files[path.name] = (len(data) - pos, dropped)
            with open(path, "r+b") as f:
                f.truncate(pos)
                os.fsync(f.fileno())
        return Segment(path, first, seq, pos, first_time, last_time)

    @staticmethod
    def _record_at(data: bytes, pos: int, want_seq: int) -> tuple[int, int, int] | None:
        """(length, seq, time_ns) of a whole, valid record at ``pos`` with seq ``want_seq``; else None."""
        if pos + HEAD.size + META.size > len(data):
            return None
        length, crc = HEAD.unpack_from(data, pos)
        if length < META.size or pos + 4 + length > len(data) or length > MAX_RECORD:
            return None
        body = memoryview(data)[pos + HEAD.size:pos + 4 + length]
        if zlib.crc32(body) != crc:
            return None
        seq, t = META.unpack_from(body, 0)
        if seq != want_seq:
            return None
        return length, seq, t

    @staticmethod
    def _count_tail(data: bytes, pos: int) -> int:
        """How many record heads seem to follow a bad one (for the report; best effort)."""
        n = 0
        while pos + HEAD.size <= len(data) and n < 1_000_000:
            length = HEAD.unpack_from(data, pos)[0]
            n += 1
            if length < META.size or length > len(data):
                break
            pos += 4 + length
        return n

    # ---- writing ------------------------------------------------------------------------------

    @property
    def first_seq(self) -> int:
        return self.segments[0].first

    @property
    def last_seq(self) -> int:
        return self.segments[-1].last

    def __len__(self) -> int:
        return self.last_seq - self.first_seq + 1

    @property
    def nbytes(self) -> int:
        return sum(s.size for s in self.segments)

    def append(self, payloads: list[bytes], now_ns: int | None = None) -> list[int]:
        """Append records; their sequence numbers. One write per segment touched; durable only
        after :meth:`sync`. Raises StorageError (nothing of the failed write is kept)."""
        t = time.time_ns() if now_ns is None else now_ns
        seqs = []
        buf = bytearray()
        seg = self.segments[-1]
        seq = seg.last
        for payload in payloads:
            if len(payload) + META.size > MAX_RECORD:
                raise StorageError(f"a record of {len(payload)} bytes is larger than the log accepts")
            if seg.size + len(buf) >= self.max_segment_bytes and (buf or seg.size):
                if buf:
                    self._write(seg, buf)
                    buf = bytearray()
                seg = self._new_segment(seq + 1)
            seq += 1
            body = META.pack(seq, t) + payload
            buf += HEAD.pack(len(body) + 4, zlib.crc32(body)) + body
            seqs.append(seq)
        if buf:
            self._write(seg, buf)
        return seqs

    def _write(self, seg: Segment, buf: bytearray) -> None:
        try:
            view = memoryview(buf)
            done = 0
            while done < len(buf):  # a short write is retried: the next one says why (ENOSPC, EFBIG)
                done += os.write(self._fd, view[done:])
        except OSError as exc:
            # Take back whatever part of the batch reached the file: the log stays as it was.
            with contextlib.suppress(OSError):
                os.ftruncate(self._fd, seg.size)
            raise StorageError(f"cannot append to {seg.path}: {exc.strerror or exc}") from None
        # The records of this write: count them from the buffer.
        pos = 0
        last = seg.last
        while pos < len(buf):
            length = HEAD.unpack_from(buf, pos)[0]
            last = META.unpack_from(buf, pos + HEAD.size)[0]
            pos += 4 + length
        t = META.unpack_from(buf, HEAD.size)[1]
        if seg.size == 0:
            seg.first_time = t
        seg.last = last
        seg.last_time = t
        seg.size += len(buf)
        self._dirty = True

    def _new_segment(self, first: int) -> Segment:
        if self._fd >= 0:
            self.sync()
            os.close(self._fd)
        path = self.dir / _name(first)
        self._fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        seg = Segment(path, first, first - 1, 0)
        self.segments.append(seg)
        self._sync_dir()
        return seg

    def sync(self) -> None:
        """Make every appended record durable (fdatasync of the open segment)."""
        if self._dirty and self._fd >= 0:
            try:
                os.fdatasync(self._fd)
            except OSError as exc:
                raise StorageError(f"cannot sync {self.segments[-1].path}: {exc.strerror}") from None
            self._dirty = False

    def _sync_dir(self) -> None:
        fd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    # ---- reading ------------------------------------------------------------------------------

    def read(self, start: int = 1, limit: int | None = None) -> Iterator[tuple[int, int, bytes]]:
        """(seq, time_ns, payload) from ``start`` on (at most ``limit``), checksums checked."""
        n = 0
        for seg in self.segments:
            if seg.last < start or seg.last < seg.first:
                continue
            data = seg.path.read_bytes()[:seg.size]
            pos = 0
            seq = seg.first - 1
            while pos < len(data):
                rec = self._record_at(data, pos, seq + 1)
                if rec is None:
                    raise StorageError(f"{seg.path} changed under the broker at byte {pos}")
                length, seq, t = rec
                if seq >= start:
                    yield seq, t, bytes(data[pos + HEAD.size + META.size:pos + 4 + length])
                    n += 1
                    if limit is not None and n >= limit:
                        return
                pos += 4 + length

    def seq_at_time(self, time_ns: int) -> int:
        """The first seq stored at or after ``time_ns`` (last_seq + 1 if none)."""
        for seg in self.segments:
            if seg.last >= seg.first and seg.last_time >= time_ns:
                for seq, t, _ in self.read(seg.first):
                    if t >= time_ns:
                        return seq
        return self.last_seq + 1

    # ---- retention ----------------------------------------------------------------------------

    def trim(self, *, max_msgs: int | None = None, max_bytes: int | None = None, max_age_ns: int | None = None,
             below_seq: int | None = None, now_ns: int | None = None) -> int:
        """Delete whole segments, oldest first, while a limit is exceeded (never the segment being
        appended to); returns the records deleted."""
        now = time.time_ns() if now_ns is None else now_ns
        deleted = 0
        while len(self.segments) > 1:
            seg = self.segments[0]
            count = seg.last - seg.first + 1
            over = ((max_msgs is not None and len(self) - count >= max_msgs)
                    or (max_bytes is not None and self.nbytes - seg.size >= max_bytes)
                    or (max_age_ns is not None and seg.last_time and now - seg.last_time > max_age_ns)
                    or (below_seq is not None and seg.last < below_seq))
            if not over:
                break
            os.unlink(seg.path)
            self.segments.pop(0)
            deleted += max(count, 0)
        if deleted:
            self._sync_dir()
        return deleted

    def close(self) -> None:
        if self._fd >= 0:
            self.sync()
            os.close(self._fd)
            self._fd = -1
