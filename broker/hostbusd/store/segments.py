"""Append-only segment files: the on-disk form of one topic queue (the storage of issue-5 queues).

A queue's directory holds segment files named by the sequence number of their first record,
``00000000000000000001.seg``. A segment is a sequence of records::

    u32 length      bytes after this field: 20 + len(payload)
    u32 crc32       of everything after this field (seq, time, payload)
    u64 seq         1, 2, 3 ... without gaps within the log
    u64 time_ns     when it was stored (wall clock, for max_age and replay by time)
    payload

Appends go to the last segment until it holds ``max_segment_bytes``; then a new one starts.
``sync()`` makes what was appended durable (``fdatasync``); when to call it is the caller's
policy (always / interval / never); :meth:`SegmentLog.sync_handle` lets the caller run the
``fdatasync`` on a thread of its own while appends go on.

The log has a **floor**: records below it are gone for readers (retention by count, bytes or
age, acknowledged records, a purge). A segment is deleted once all its records are below the
floor; the floor itself is the caller's to store (a restart re-applies retention).

Memory: an index of 16 bytes per record (offset and time) is kept, so any record is one
``pread`` and retention is exact to the record.

Recovery (:meth:`SegmentLog.open`) reads every segment and checks every record's length,
checksum and sequence. The first bad record of a segment ends what is kept of it: in the last
segment this is a torn tail (a crash during a write) and the file is truncated there; in an
earlier one it is corruption, and the segment is truncated too. What was discarded is reported
in :attr:`SegmentLog.recovery` (bytes and records per file) for the caller to log. A record
that fails its checksum is never returned.

No I/O happens outside the queue's directory, and nothing here knows about topics or consumers.
"""

from __future__ import annotations

import bisect
import contextlib
import os
import struct
import time
import zlib
from array import array
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


class SyncError(StorageError):
    """An fsync failed: what the kernel still holds of the file is unknown until a restart's
    recovery reads it (the caller stops trusting the log)."""


@dataclass
class Segment:
    path: Path
    first: int  # seq of its first record (from the name)
    last: int  # seq of its last record (first - 1 when empty)
    size: int  # bytes
    first_time: int = 0  # time_ns of its first record
    last_time: int = 0
    # The index kept in memory, 16 bytes per record: where each record starts, and when it was
    # stored. Reads of any seq are one pread; retention by bytes and age is exact to the record.
    offsets: array[int] = field(default_factory=lambda: array("Q"))
    times: array[int] = field(default_factory=lambda: array("q"))
    fd: int = -1  # opened for reading on first use


@dataclass
class Recovery:
    files: dict[str, tuple[int, int]] = field(default_factory=dict)  # name -> (bytes, records) discarded

    @property
    def discarded_bytes(self) -> int:
        return sum(b for b, _ in self.files.values())


def _name(first: int) -> str:
    return f"{first:020d}{SUFFIX}"


class SegmentLog:
    """One queue's records on disk. Not thread-safe: one owner (the broker's loop)."""

    def __init__(self, directory: Path, max_segment_bytes: int = 64 * 1024 * 1024) -> None:
        self.dir = directory
        self.max_segment_bytes = max_segment_bytes
        self.segments: list[Segment] = []
        self.recovery = Recovery()
        self.floor = 1  # the first seq readers see
        self._fd = -1  # the last segment, open for appending
        self._dirty = False

    # ---- opening ------------------------------------------------------------------------------

    @classmethod
    def open(cls, directory: Path, max_segment_bytes: int = 64 * 1024 * 1024, floor: int = 1) -> SegmentLog:
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
            log._new_segment(max(floor, 1))
        else:
            log._fd = os.open(log.segments[-1].path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        log.floor = max(log.segments[0].first, min(floor, log.last_seq + 1))
        log.drop_below(log.floor)
        return log

    def _scan(self, path: Path, first: int) -> Segment:
        data = path.read_bytes()
        seg = Segment(path, first, first - 1, 0)
        pos = 0
        while pos < len(data):
            rec = self._record_at(data, pos, seg.last + 1)
            if rec is None:
                break
            length, _, t = rec
            seg.offsets.append(pos)
            seg.times.append(t)
            seg.last += 1
            pos += 4 + length
        if seg.offsets:
            seg.first_time, seg.last_time = seg.times[0], seg.times[-1]
        if pos < len(data):
            dropped = self._count_tail(data, pos)
            self.recovery.files[path.name] = (len(data) - pos, dropped)
            with open(path, "r+b") as f:
                f.truncate(pos)
                os.fsync(f.fileno())
        seg.size = pos
        return seg

    @staticmethod
    def _record_at(data: bytes | memoryview, pos: int, want_seq: int) -> tuple[int, int, int] | None:
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

    # ---- size ---------------------------------------------------------------------------------

    @property
    def first_seq(self) -> int:
        return self.floor

    @property
    def last_seq(self) -> int:
        return self.segments[-1].last

    def __len__(self) -> int:
        return self.last_seq - self.floor + 1

    @property
    def nbytes(self) -> int:
        """Bytes of the records at or above the floor."""
        total = sum(s.size for s in self.segments)
        first = self.segments[0]
        if first.first <= self.floor <= first.last:
            total -= first.offsets[self.floor - first.first]
        return total

    # ---- writing ------------------------------------------------------------------------------

    def append(self, payloads: list[bytes], now_ns: int | None = None) -> list[int]:
        """Append records; their sequence numbers. One write per segment touched; durable only
        after :meth:`sync`. Raises StorageError, and then nothing of the batch is kept: a part
        written before a segment rollover that failed is taken back too."""
        t = time.time_ns() if now_ns is None else now_ns
        for payload in payloads:
            if len(payload) + META.size > MAX_RECORD:
                raise StorageError(f"a record of {len(payload)} bytes is larger than the log accepts")
        first = self.segments[-1]
        mark = (len(self.segments), first.size, first.last, first.first_time, first.last_time)
        try:
            return self._append(payloads, t)
        except (OSError, StorageError) as exc:
            self._take_back(mark)
            if isinstance(exc, StorageError):
                raise
            raise StorageError(f"cannot append in {self.dir}: {exc.strerror or exc}") from None

    def _append(self, payloads: list[bytes], t: int) -> list[int]:
        seqs = []
        buf = bytearray()
        seg = self.segments[-1]
        seq = seg.last
        starts: list[int] = []
        for payload in payloads:
            if seg.size + len(buf) >= self.max_segment_bytes and (buf or seg.size):
                if buf:
                    self._write(seg, buf, starts, t)
                    buf = bytearray()
                    starts = []
                seg = self._new_segment(seq + 1)
            seq += 1
            meta = META.pack(seq, t)
            starts.append(len(buf))
            buf += HEAD.pack(len(payload) + 20, zlib.crc32(payload, zlib.crc32(meta)))
            buf += meta
            buf += payload
            seqs.append(seq)
        if buf:
            self._write(seg, buf, starts, t)
        return seqs

    def _take_back(self, mark: tuple[int, int, int, int, int]) -> None:
        """Undo a failed append: segments it began are removed, the one it began in is cut back."""
        count, size, last, first_time, last_time = mark
        while len(self.segments) > count:
            seg = self.segments.pop()
            if self._fd >= 0:
                os.close(self._fd)
                self._fd = -1
            with contextlib.suppress(OSError):
                os.unlink(seg.path)
        seg = self.segments[-1]
        if self._fd < 0:
            with contextlib.suppress(OSError):
                self._fd = os.open(seg.path, os.O_WRONLY | os.O_APPEND | os.O_CLOEXEC)
        if seg.size != size:
            with contextlib.suppress(OSError):
                os.truncate(seg.path, size)
            del seg.offsets[last - seg.first + 1:]
            del seg.times[last - seg.first + 1:]
            seg.size, seg.last, seg.first_time, seg.last_time = size, last, first_time, last_time

    def _write(self, seg: Segment, buf: bytearray, starts: list[int], t: int) -> None:
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
        base = seg.size
        seg.offsets.extend(base + s for s in starts)
        seg.times.extend([t] * len(starts))
        if seg.last < seg.first:
            seg.first_time = t
        seg.last += len(starts)
        seg.last_time = t
        seg.size += len(buf)
        self._dirty = True

    def _new_segment(self, first: int) -> Segment:
        """Begin the segment whose first seq is ``first``; the one before is synced and closed
        only once the new file exists, so a failure leaves the log appending where it was."""
        path = self.dir / _name(first)
        try:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o600)
        except OSError as exc:
            raise StorageError(f"cannot begin a segment in {self.dir}: {exc.strerror or exc}") from None
        if self._fd >= 0:
            try:
                self.sync()
            except StorageError:
                os.close(fd)
                with contextlib.suppress(OSError):
                    os.unlink(path)
                raise
            os.close(self._fd)
        self._fd = fd
        seg = Segment(path, first, first - 1, 0)
        self.segments.append(seg)
        try:
            self._sync_dir()
        except OSError as exc:
            raise StorageError(f"cannot sync {self.dir}: {exc.strerror or exc}") from None
        return seg

    def sync(self) -> None:
        """Make every appended record durable (fdatasync of the open segment)."""
        if self._dirty and self._fd >= 0:
            try:
                os.fdatasync(self._fd)
            except OSError as exc:
                raise SyncError(f"cannot sync {self.segments[-1].path}: {exc.strerror}") from None
            self._dirty = False

    def sync_handle(self) -> int:
        """For a sync on another thread: a duplicate of the open segment's descriptor (the caller
        runs ``fdatasync`` on it, then closes it), or -1 if nothing was appended since the last
        sync. Everything appended before this call is durable once that ``fdatasync`` returns
        (records of earlier segments were synced when their segment was closed)."""
        if not self._dirty or self._fd < 0:
            return -1
        self._dirty = False
        return os.dup(self._fd)

    @property
    def dirty(self) -> bool:
        return self._dirty

    def _sync_dir(self) -> None:
        fd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    # ---- reading ------------------------------------------------------------------------------

    def read(self, start: int = 1, limit: int | None = None, stop: int | None = None,
             ) -> Iterator[tuple[int, int, bytes]]:
        """(seq, time_ns, payload) from ``start`` (at least the floor) to ``stop`` (exclusive;
        default: the end), at most ``limit`` records; checksums checked. One pread per segment
        touched. Seqs missing after a recovery (a gap) are skipped."""
        start = max(start, self.floor)
        end = self.last_seq + 1 if stop is None else min(stop, self.last_seq + 1)
        left = limit if limit is not None else end - start
        i = self._segment_of(start)
        while start < end and left > 0 and i < len(self.segments):
            seg = self.segments[i]
            i += 1
            if seg.last < start:
                continue
            start = max(start, seg.first)  # after a gap (a segment lost or cut short): what follows it
            hi = min(end, seg.last + 1, start + left)
            if start >= hi:
                break
            lo_off = seg.offsets[start - seg.first]
            hi_off = seg.offsets[hi - seg.first] if hi <= seg.last else seg.size
            if seg.fd < 0:
                seg.fd = os.open(seg.path, os.O_RDONLY | os.O_CLOEXEC)
            data = os.pread(seg.fd, hi_off - lo_off, lo_off)
            pos = 0
            for seq in range(start, hi):
                rec = self._record_at(data, pos, seq)
                if rec is None:
                    raise StorageError(f"{seg.path} changed under the broker at byte {lo_off + pos}")
                length = rec[0]
                yield seq, rec[2], data[pos + HEAD.size + META.size:pos + 4 + length]
                pos += 4 + length
            left -= hi - start
            start = hi

    def _segment_of(self, seq: int) -> int:
        """Index of the segment holding ``seq`` (or the first after it)."""
        firsts = [s.first for s in self.segments]
        return max(0, bisect.bisect_right(firsts, seq) - 1)

    def time_of(self, seq: int) -> int:
        seg = self.segments[self._segment_of(seq)]
        return seg.times[seq - seg.first]

    def seq_at_time(self, time_ns: int) -> int:
        """The first seq at or above the floor stored at or after ``time_ns`` (last_seq + 1 if none)."""
        for seg in self.segments:
            if seg.last >= max(seg.first, self.floor) and seg.last_time >= time_ns:
                lo = max(0, self.floor - seg.first)
                return seg.first + bisect.bisect_left(seg.times, time_ns, lo)
        return self.last_seq + 1

    # ---- retention ----------------------------------------------------------------------------

    def trim(self, *, max_msgs: int | None = None, max_bytes: int | None = None, max_age_ns: int | None = None,
             below_seq: int | None = None, now_ns: int | None = None) -> int:
        """Raise the floor while a limit is exceeded (oldest records first) and delete the
        segments left wholly below it; returns the records removed."""
        now = time.time_ns() if now_ns is None else now_ns
        floor = self.floor
        last = self.last_seq
        if max_msgs is not None:
            floor = max(floor, last - max_msgs + 1)
        if below_seq is not None:
            floor = max(floor, min(below_seq, last + 1))
        if max_age_ns is not None:
            floor = max(floor, self.seq_at_time(now - max_age_ns))
        if max_bytes is not None:
            total = self.nbytes
            if total > max_bytes:
                floor = max(floor, self._floor_for_bytes(max_bytes))
        return self.drop_below(floor)

    def _floor_for_bytes(self, max_bytes: int) -> int:
        """The lowest floor that leaves at most ``max_bytes`` above it."""
        keep = 0
        for seg in reversed(self.segments):
            n = seg.last - seg.first + 1
            if n <= 0:
                continue
            if keep + seg.size <= max_bytes:
                keep += seg.size
                continue
            # Within this segment: the first record k with size - offsets[k] + keep <= max_bytes.
            need = seg.size + keep - max_bytes  # bytes of this segment to drop at least
            k = bisect.bisect_left(seg.offsets, need)
            return seg.first + k
        return self.segments[0].first

    def drop_below(self, seq: int) -> int:
        """Records below ``seq`` are gone (retention, acknowledgement, purge); returns how many
        were removed. Segments wholly below are deleted; a purge of everything starts a new one
        (first, so a failure changes nothing)."""
        seq = min(seq, self.last_seq + 1)
        if seq <= self.floor:
            return 0
        last = self.segments[-1]
        if last.last < seq and last.last >= last.first:  # everything goes: appends go on in a new segment
            self._new_segment(seq)
        removed = seq - self.floor
        self.floor = seq
        deleted = False
        while len(self.segments) > 1 and self.segments[0].last < seq:
            seg = self.segments.pop(0)
            if seg.fd >= 0:
                os.close(seg.fd)
            with contextlib.suppress(FileNotFoundError):
                os.unlink(seg.path)
            deleted = True
        if deleted:
            with contextlib.suppress(OSError):  # the files are gone either way; a crash may bring some back
                self._sync_dir()
        return removed

    def holds(self, seq: int) -> bool:
        """Is ``seq`` a record readers can get (not below the floor, not lost in a gap)?"""
        return self.next_held(seq) == seq

    def next_held(self, seq: int) -> int:
        """The first seq at or after ``seq`` that readers can get (last_seq + 1 if none)."""
        seq = max(seq, self.floor)
        for seg in self.segments[self._segment_of(seq):]:
            if seg.last >= max(seq, seg.first):
                return max(seq, seg.first)
        return self.last_seq + 1

    def close(self) -> None:
        if self._fd >= 0:
            self.sync()
            os.close(self._fd)
            self._fd = -1
        for seg in self.segments:
            if seg.fd >= 0:
                os.close(seg.fd)
                seg.fd = -1
