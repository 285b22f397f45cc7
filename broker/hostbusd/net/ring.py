"""Shared-memory rings, the broker's side (docs/shm.md).

A client asks for a ring on its connection (CALL ``ring_attach``). The broker then

1. creates the segment as a sealed memfd (``F_SEAL_SHRINK | F_SEAL_GROW``: the client can write
   the slots but never shrink the segment under the broker's mapping) -- it has no name at all;
2. starts a helper process (:mod:`hostbusd.ringhelper`) that creates the two semaphores
   owner-only under random names; if the client runs as another uid, the broker grants that one
   uid access with a POSIX ACL on the semaphore files, so no other user can open them at any
   moment;
3. answers with the names, the geometry and a one-time token. The client fetches the segment's
   descriptor over a second connection (HELLO with ``ring_fd``: the broker sends it with
   SCM_RIGHTS and closes), opens the semaphores and calls ``ring_ready``; the helper then
   unlinks the names. If it does not within ``shm.attach_timeout``, the ring is removed.

The broker never maps a semaphore (a client could truncate the file and kill the mapper with
SIGBUS): the helper waits and posts, and reports counts through a pipe. A publish ring's slots
are copied out of the segment before they are parsed, so a client changing them meanwhile can
only hurt itself; a malformed slot ends that ring. A ring ends with its connection.
"""

from __future__ import annotations

import array
import asyncio
import collections
import contextlib
import fcntl
import mmap
import os
import re
import secrets
import socket
import struct
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, cast

from hostbus import ring as layout
from hostbus import wire
from hostbus.errors import ErrorCode, HostbusError, LimitExceededError
from hostbus.topics import show
from hostbusd.core.identity import Identity
from hostbusd.core.router import SubscribeOptions
from hostbusd.core.session import Session, Subscription
from hostbusd.net import LoopEgress

if TYPE_CHECKING:
    from hostbusd.core.hub import Hub

U32 = struct.Struct("<I")
#: Messages of a publish ring routed per loop iteration (whole slots, so at least one): about
#: what one read of a socket peer brings, so the subscribers' writes keep pace instead of
#: queueing (measured: 64 B ring -> socket went from 0.9x to 1.18x the socket path).
RING_TURN = 500
#: Bytes of message blocks a turn routes at most (whole slots, so at least one), as a socket
#: peer's read brings at most 256 KiB: without it a ring of large slots was emptied in one turn
#: (tens of MiB copied before any other peer or any delivery had the loop).
RING_TURN_BYTES = 256 * 1024
SHM_DIR = Path("/dev/shm")
#: Prefix of the semaphore names (``/dev/shm/sem.hostbus.<pid>.<token>.<free|filled>``).
NAME_PREFIX = "hostbus."

# POSIX ACL xattr (linux/posix_acl_xattr.h): version 2, entries (tag u16, perm u16, id u32).
_ACL_VERSION = 2
_ACL_USER_OBJ, _ACL_USER, _ACL_GROUP_OBJ, _ACL_MASK, _ACL_OTHER = 0x01, 0x02, 0x04, 0x10, 0x20
_ACL_UNDEFINED_ID = 0xFFFFFFFF


def sem_file(name: str) -> Path:
    """The file of the POSIX named semaphore ``name`` ("/x" is /dev/shm/sem.x)."""
    return SHM_DIR / ("sem." + name[1:])


def grant_uid(path: str, uid: int) -> None:
    """Let exactly ``uid`` (besides the owner) read and write ``path`` (mode stays 0600 for others)."""
    entries = [(_ACL_USER_OBJ, 6, _ACL_UNDEFINED_ID), (_ACL_USER, 6, uid), (_ACL_GROUP_OBJ, 0, _ACL_UNDEFINED_ID),
               (_ACL_MASK, 6, _ACL_UNDEFINED_ID), (_ACL_OTHER, 0, _ACL_UNDEFINED_ID)]
    data = struct.pack("<I", _ACL_VERSION) + b"".join(struct.pack("<HHI", *e) for e in entries)
    os.setxattr(path, "system.posix_acl_access", data, follow_symlinks=False)


#: Directory entries under /dev/shm looked at, at most, to remove a client's links to a ring's
#: semaphore files when the ring ends (only when such a link exists), and how deep the search
#: goes (one open directory per level).
LINK_SCAN_MAX = 10_000
LINK_SCAN_DEPTH = 32
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


_OCTAL_ESCAPE = re.compile(r"\\([0-7]{3})")


def _mount_points() -> set[str]:
    """The mount points of this process (/proc/self/mountinfo, field 5, whose space, tab,
    newline and backslash the kernel writes as octal escapes; other bytes are as they are)."""
    out: set[str] = set()
    with contextlib.suppress(OSError):
        for line in Path("/proc/self/mountinfo").read_text(errors="surrogateescape").splitlines():
            fields = line.split(" ")
            if len(fields) > 4:
                out.add(_OCTAL_ESCAPE.sub(lambda m: chr(int(m.group(1), 8)), fields[4]))
    return out


def _unlink_inodes(top: Path, inodes: set[tuple[int, int]]) -> tuple[int, int]:
    """Unlink the entries under ``top`` (subdirectories included) that are one of ``inodes``
    ((st_dev, st_ino) pairs); (entries removed, entries looked at).

    Depth first, one open directory per level, every step relative to an open directory
    (``dir_fd``), never through a path: a client that swaps one of its directories for a
    symbolic link meanwhile cannot point an unlink elsewhere. Symbolic links are not followed
    and other file systems mounted below ``top`` are not entered (nothing there can be a link
    to a file of ``top``'s, and a FUSE mount could block the loop); an entry is looked at
    closer only when the inode its directory lists is one of ``inodes``."""
    wanted = {ino for _, ino in inodes}
    mounts = _mount_points()
    removed = 0
    seen = 0
    try:
        root = os.open(top, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)  # /dev/shm may be a symlink
    except OSError:
        return 0, 0
    try:
        stack: list[tuple[int, str, Any]] = [(root, os.path.realpath(top), os.scandir(root))]
    except OSError:
        os.close(root)
        return 0, 0
    try:
        while stack and seen < LINK_SCAN_MAX:
            dfd, path, it = stack[-1]
            entry = next(it, None)
            if entry is None:
                it.close()
                os.close(dfd)
                stack.pop()
                continue
            seen += 1
            name = entry.name
            try:
                if entry.inode() in wanted:
                    st = os.stat(name, dir_fd=dfd, follow_symlinks=False)
                    if (st.st_dev, st.st_ino) in inodes:
                        os.unlink(name, dir_fd=dfd)
                        removed += 1
                elif (entry.is_dir(follow_symlinks=False) and len(stack) < LINK_SCAN_DEPTH
                      and f"{path}/{name}" not in mounts):
                    sub = os.open(name, _DIR_FLAGS, dir_fd=dfd)
                    try:
                        stack.append((sub, f"{path}/{name}", os.scandir(sub)))
                    except OSError:
                        os.close(sub)
            except OSError:  # gone meanwhile, or not ours to enter
                continue
    finally:
        for dfd, _, it in stack:
            it.close()
            os.close(dfd)
    return removed, seen


def sweep_stale(log: Any) -> int:
    """Remove semaphores an earlier hostbusd of this uid left (its pid is gone); the count removed."""
    removed = 0
    with contextlib.suppress(OSError):
        for entry in os.scandir(SHM_DIR):
            name = entry.name
            if not name.startswith("sem." + NAME_PREFIX):
                continue
            try:
                pid = int(name.split(".")[2])
                if entry.stat(follow_symlinks=False).st_uid != os.getuid():
                    continue
            except (ValueError, IndexError, OSError):
                continue
            if pid != os.getpid() and not Path(f"/proc/{pid}").exists():
                with contextlib.suppress(OSError):
                    os.unlink(entry.path)
                    removed += 1
    if removed:
        log.info("stale_rings_removed", semaphores=removed)
    return removed


class RingSession(Session):
    """The subscriber side of a deliver ring: one record per message and subscription (as on a
    socket), packed into slots. Its subscriptions' access filters are the owner's, computed on
    the owner's session (RingService.subscribe, Hub._recheck_subscriptions)."""

    __slots__ = ()

    def send(self, data: bytes) -> None:
        raise AssertionError("a ring carries messages only; control frames go to the owner's connection")

    def _emit_gap(self, sub: Subscription) -> None:
        """The client learns of drops as on a socket: a GAP record."""
        q = sub.queue
        self._out_pair(layout.DELIVER_RECORD.pack(0, layout.GAP_FLAG, sub.sid, min(q.missed, 0xFFFFFFFF), 0, 0, 0),
                       b"")
        q.missed = 0

    def _write_msg(self, sub: Subscription, ident: Identity, block: bytes, flags: int) -> None:
        """Two entries of ``out`` per record: its head (fixed part and origin), then the block
        (written into the slot from where it is, not copied into a record first)."""
        if sub.queue.missed:
            self._emit_gap(sub)
        origin = ident.origin.encode()
        self._out_pair(layout.DELIVER_RECORD.pack(len(block), flags, sub.sid, ident.uid & 0xFFFFFFFF,
                                                  ident.gid & 0xFFFFFFFF, ident.pid & 0xFFFFFFFF, len(origin)) + origin,
                       block)
        self.msgs_out += 1

    def _write_run(self, sub: Subscription, ident: Identity, run: bytes, count: int) -> None:
        """A run record: the run as it came, behind the same head as a message's record; a run
        larger than the ring's message limit (from a socket publisher: up to max_frame_bytes) as
        a record per message instead."""
        if len(run) > cast("Ring", self.egress).max_message_bytes:
            tlen, _, hlen = wire.frames.RUN_HEAD.unpack_from(run, 0)
            items_at = 8 + tlen + hlen
            for payload in wire.run_payloads(run, items_at):
                self._write_msg(sub, ident, run[:items_at] + payload, 0)
            return
        if sub.queue.missed:
            self._emit_gap(sub)
        origin = ident.origin.encode()
        self._out_pair(layout.DELIVER_RECORD.pack(len(run), layout.RUN_FLAG, sub.sid, ident.uid & 0xFFFFFFFF,
                                                  ident.gid & 0xFFFFFFFF, ident.pid & 0xFFFFFFFF, len(origin)) + origin,
                       run)
        self.msgs_out += count

    def _out_pair(self, head: bytes, block: bytes) -> None:
        self.out.append(head)
        self.out.append(block)
        n = len(head) + len(block)
        self.out_bytes += n
        if self.account is not None:
            self.account.written_bytes += n


class Ring(LoopEgress):
    """One ring: its segment, its helper, and what flows through it."""

    def __init__(self, service: RingService, owner: Session, ring_id: int, direction: str, slots: int,
                 slot_size: int) -> None:
        self.service = service
        self.hub = service.hub
        self.loop = service.loop
        self.owner = owner
        self.id = ring_id
        self.direction = direction
        self.slots = slots
        self.slot_size = slot_size
        self.size = slots * slot_size
        self.token = secrets.token_hex(16)
        base = f"/{NAME_PREFIX}{os.getpid()}.{secrets.token_hex(8)}"
        self.names = {"free": base + ".free", "filled": base + ".filled"}
        self.state = "starting"  # -> offered -> running -> closed
        self.fd = os.memfd_create("hostbus-ring", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(self.fd, self.size)
            fcntl.fcntl(self.fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SEAL)
            self.mm = mmap.mmap(self.fd, self.size)
        except OSError:
            os.close(self.fd)
            raise
        self.next = 0  # slots consumed (publish) or produced (deliver), counted from 0
        self.unread = 0  # publish: slots reported filled and not yet read
        self._turn_scheduled = False
        self.credits = 0  # deliver: free slots the helper reported and the broker has not filled
        self.report = b""  # a partial u32 count from the helper
        self.slots_in = 0
        self.msgs_in = 0
        # The message limit in force when the ring was made, told to the client: a reload that
        # changes shm.max_message_bytes applies to rings made after it.
        self.max_message_bytes = service.max_message_bytes
        self.reader = layout.SlotReader(slot_size, self.max_message_bytes + 64)
        self.writer = layout.SlotWriter(self.mm, slots, slot_size)  # deliver
        self.pending: collections.deque[tuple[bytes, bytes]] = collections.deque()  # deliver: waiting for slots
        self.session: RingSession | None = None
        # The semaphore files, open (never mapped) from their creation to the ring's end: a link
        # a client made to one keeps it from being freed, and is found and removed at the end.
        self.sem_fds: list[int] = []
        self.deadline: asyncio.TimerHandle | None = None
        self.call_id = 0
        # publish: the helper waits on "filled" (client's posts) and posts "free"; deliver: the reverse.
        wait, post = ("filled", "free") if direction == "publish" else ("free", "filled")
        initial = {"free": slots, "filled": 0}
        try:
            self.helper = subprocess.Popen(
                [sys.executable, "-m", "hostbusd.ringhelper", self.names[wait], self.names[post], str(initial[wait]),
                 str(initial[post])],
                stdin=subprocess.PIPE, stdout=subprocess.PIPE, close_fds=True)
        except OSError:
            self.mm.close()
            os.close(self.fd)
            raise
        assert self.helper.stdout is not None and self.helper.stdin is not None
        self.out_fd = self.helper.stdout.fileno()
        self.in_fd = self.helper.stdin.fileno()
        os.set_blocking(self.out_fd, False)
        self.loop.add_reader(self.out_fd, self._on_helper)

    # ---- set-up ---------------------------------------------------------------------------------------

    def _on_helper(self) -> None:
        try:
            data = os.read(self.out_fd, 65536)
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self.fail("the ring's semaphore helper ended (were the semaphores tampered with?)")
            return
        if self.state == "starting":
            if not data.startswith(b"R"):
                self.fail("the ring's semaphore helper did not start")
                return
            data = data[1:]
            self._offer()
            if self.state != "offered":
                return
        data = self.report + data
        whole = len(data) // 4 * 4
        self.report = data[whole:]
        n = sum(U32.unpack_from(data, i)[0] for i in range(0, whole, 4))
        if n:
            if self.direction == "publish":
                self._consume(n)
            else:
                self.credits += n
                if self.session is not None and self.state == "running":
                    self.session.paused = False
                    self.flush()

    def _offer(self) -> None:
        """The semaphores exist: let the client's uid in, then tell it where everything is."""
        try:  # before anyone else may open them: whatever links to them later, it is these files
            for name in self.names.values():
                self.sem_fds.append(os.open(sem_file(name), os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK))
        except OSError as exc:
            self.fail(f"cannot open the ring's semaphore files: {exc.strerror}", call=True)
            return
        uid = self.owner.ident.uid
        if uid not in (0, os.getuid()):
            try:
                for name in self.names.values():
                    grant_uid(str(sem_file(name)), uid)
            except OSError as exc:
                self.fail(f"cannot give uid {uid} access to the ring's semaphores: {exc.strerror} (does /dev/shm "
                          "support POSIX ACLs?)", call=True)
                return
        self.state = "offered"
        self.service.offers[self.token] = self
        self.deadline = self.loop.call_later(self.service.config.attach_timeout, self._expire)
        self.owner.send(wire.encode_json(wire.FrameType.RESULT, {
            "ring": self.id, "token": self.token, "direction": self.direction, "slots": self.slots,
            "slot_size": self.slot_size, "free": self.names["free"], "filled": self.names["filled"],
            "max_message_bytes": self.max_message_bytes,
        }, U32.pack(self.call_id)))

    def _expire(self) -> None:
        if self.state == "offered":
            self.fail(f"the client did not map ring {self.id} within {self.service.config.attach_timeout} s "
                      "(shm.attach_timeout)")

    def take_fd(self) -> int:
        self.service.offers.pop(self.token, None)
        return self.fd

    def ready(self) -> None:
        """The client holds the segment and both semaphores: remove the names, start."""
        if self.deadline is not None:
            self.deadline.cancel()
        self.service.offers.pop(self.token, None)
        # Removed here, before the answer, so no name is left once ring_ready returns (the
        # helper's own unlink, told with "U", then finds them gone).
        for name in self.names.values():
            with contextlib.suppress(OSError):
                os.unlink(sem_file(name))
        self._tell(b"U")
        if self.state == "closed":  # the helper is gone: fail() has told the client
            return
        self.state = "running"
        if self.direction == "deliver":
            hub = self.hub
            lim = hub.config.limits
            owner = self.owner
            self.session = RingSession(owner.ident, batch_bytes=self.slot_size,
                                       max_queued_bytes=lim.max_queued_bytes_per_connection)
            self.session.egress = self
            self.session.takes_runs = True  # run records (the client's DeliverRing reads them)
            # Charged to the owner's uid like its socket subscriptions: subscriptions and bytes held.
            self.session.account = owner.account
            self.session.account_max_queued = owner.account_max_queued
            self.session.paused = self.credits == 0
            if self.credits:
                self.flush()

    # ---- publish ring ---------------------------------------------------------------------------------

    def _consume(self, n: int) -> None:
        """``n`` more slots are filled: read them, a turn at a time."""
        if self.state != "running":  # posted before ring_ready: the client broke the protocol
            self.fail("slots were posted before ring_ready")
            return
        self.unread += n
        if not self._turn_scheduled:
            self._turn()

    def _turn(self) -> None:
        """Route the messages of filled slots, up to :data:`RING_TURN` of them or
        :data:`RING_TURN_BYTES` of their bytes (whole slots),
        give those slots back, and leave the rest for the next loop iteration: a ring takes
        turns with the other peers like a socket does."""
        self._turn_scheduled = False
        if self.state != "running":
            return
        router = self.hub.router
        owner = self.owner
        size = self.slot_size
        done = 0
        budget = RING_TURN
        budget_bytes = RING_TURN_BYTES
        try:
            while done < self.unread and budget > 0 and budget_bytes > 0 and self.state == "running":
                off = (self.next % self.slots) * size
                self.next += 1
                done += 1
                self.slots_in += 1
                for flags, block in self._records(off):
                    if self.state != "running":  # routing made the owner fail: the ring is gone
                        return
                    run = flags & layout.RUN_FLAG
                    if run and flags != layout.RUN_FLAG:
                        raise layout.RingFormatError(f"a run record with flags 0x{flags:02x}: a run takes no other")
                    topic, reply, h1 = router.check_block(block, flags & ~layout.RUN_FLAG)
                    if reply:
                        raise layout.RingFormatError("a message through a ring carries no reply subject")
                    count = wire.run_count(block, h1) if run else 1
                    budget -= count
                    budget_bytes -= len(block)
                    access = owner.access
                    if access is not None:
                        decision = access.publish(topic)
                        if not decision.allowed:
                            self.hub.denied["publish"] += count
                            self.hub.peer_error("publish_denied", owner, topic=topic, rule=decision.rule, ring=self.id)
                            owner.send(wire.encode_err(ErrorCode.PERMISSION_DENIED, 0, f"may not publish to "
                                                       f"{show(topic)}: {decision.rule}"
                                                       + (f" ({count} messages refused)" if run else ""), fatal=False))
                            continue
                    owner.msgs_in += count
                    owner.bytes_in += len(block)
                    self.msgs_in += count
                    try:
                        if run:
                            budget -= router.publish_run(owner.ident, topic, block, count, h1, owner)
                        else:
                            budget -= router.publish(owner.ident, topic, block, flags & ~wire.PUB_REQUEST, "",
                                                     len(block) - h1, owner)
                    except HostbusError as exc:  # the retained store is full: tell, go on
                        owner.send(wire.encode_err(exc.code or ErrorCode.LIMIT, 0, str(exc), fatal=False))
        except (layout.RingFormatError, HostbusError, struct.error, ValueError) as exc:
            self.fail(f"ring {self.id}: {exc}")
            return
        if self.state != "running":
            return
        self.unread -= done
        self._tell(b"P" + U32.pack(done))
        if self.unread and self.state == "running":
            self._turn_scheduled = True
            self.loop.call_soon(self._turn)

    def _records(self, off: int) -> Iterator[tuple[int, bytes]]:
        """(flags, message block) of each message the slot at ``off`` completes.

        A batch slot is read in place: each block is copied out of the mapping once, and every
        offset is checked against the slot's bounds, so a client rewriting the slot meanwhile
        can only produce a block that fails its checks. Pieces of a larger message go through
        :class:`SlotReader`, which copies the slot first.
        """
        mm = self.mm
        kind, _, count, used = layout.SLOT_HEAD.unpack_from(mm, off)
        if kind != layout.BATCH or self.reader.part is not None:
            slot = mm[off:off + layout.SLOT_HEAD.size + min(used, self.slot_size - layout.SLOT_HEAD.size)]
            for rec in self.reader.feed(slot, layout.PUB_RECORD):
                yield rec[4], rec[5:]
            return
        pos = off + layout.SLOT_HEAD.size
        end = pos + used
        if used > self.slot_size - layout.SLOT_HEAD.size:
            raise layout.RingFormatError(f"slot declares {used} bytes, more than it holds")
        fixed = layout.PUB_RECORD
        limit = self.max_message_bytes
        for _ in range(count):
            if pos + fixed.size > end:
                raise layout.RingFormatError("record head past the end of the slot")
            blen, flags = fixed.unpack_from(mm, pos)
            b0 = pos + fixed.size
            pos = b0 + blen
            if pos > end:
                raise layout.RingFormatError("record past the end of the slot")
            if blen > limit:
                raise layout.RingFormatError(f"record of {blen} bytes exceeds the ring's limit of {limit} "
                                             "(shm.max_message_bytes)")
            yield flags, mm[b0:pos]
        if pos != end:
            raise layout.RingFormatError(f"slot holds {end - pos} bytes after its {count} records")

    # ---- deliver ring ---------------------------------------------------------------------------------

    def flush(self) -> None:
        """Write what the ring session has for the client into free slots, post them.

        A record is written only when the slots it needs are free; until then it waits in
        ``pending`` (at most one write batch) and the session counts as paused, so further
        messages wait in their subscriptions' bounded queues under their overflow policies.
        """
        session = self.session
        if session is None or self.state != "running":
            return
        session.flush_pending = False
        pending = self.pending
        writer = self.writer
        posted = 0
        while True:
            if writer.span is not None:  # a message larger than a slot, as slots come free
                k = writer.write_span(self.credits)
                self.credits -= k
                posted += k
                if writer.span is not None:
                    break
            while pending:
                head, block = pending[0]
                n = len(head) + len(block)
                if writer.fits(n):
                    writer.add((head, block))
                    pending.popleft()
                    continue
                if writer.finish():  # full: hand it over
                    posted += 1
                if n > writer.cap:
                    writer.start_span((head, block))
                    pending.popleft()
                    break
                if self.credits <= 0:
                    break
                self.credits -= 1
                writer.add((head, block))
                pending.popleft()
            if writer.span is not None:
                continue
            if pending:
                break
            out = session.take_output()
            if not out:
                break
            pending.extend(zip(out[::2], out[1::2], strict=True))
        if writer.opened:  # what this loop iteration produced goes now
            writer.finish()
            posted += 1
        if posted:
            self._tell(b"P" + U32.pack(posted))
        session.paused = bool(pending) or writer.span is not None or self.credits <= 0

    def stop(self) -> None:
        """The ring session failed (a 'disconnect' overflow): end the ring and say why."""
        self.fail("a subscription through this ring overflowed its queue under the 'disconnect' policy "
                  "while the ring was full")

    # ---- ending ---------------------------------------------------------------------------------------

    def _tell(self, cmd: bytes) -> None:
        try:
            os.write(self.in_fd, cmd)
        except OSError:
            self.fail("the ring's semaphore helper is gone")

    def fail(self, reason: str, call: bool = False) -> None:
        """End the ring and tell its owner why (on the pending call, or as an error about it)."""
        if self.state == "closed":
            return
        was = self.state
        self.close_ring()
        self.hub.peer_error("ring_failed", self.owner, ring=self.id, reason=reason)
        if call or was == "starting":  # the client still waits for ring_attach's answer
            self.owner.send(wire.encode_err(ErrorCode.INTERNAL, self.call_id, f"ring_attach: {reason}", fatal=False))
        else:  # RING_ENDED's ref is the ring's id
            self.owner.send(wire.encode_err(ErrorCode.RING_ENDED, self.id, f"ring {self.id} ended: {reason}",
                                            fatal=False))

    def close_ring(self) -> None:
        if self.state == "closed":
            return
        self.state = "closed"
        if self.deadline is not None:
            self.deadline.cancel()
        self.service.offers.pop(self.token, None)
        self.service.rings.pop(self.id, None)
        with contextlib.suppress(Exception):
            self.loop.remove_reader(self.out_fd)
        owner = self.owner
        owner.rings.pop(self.id, None)
        for sid in [sid for sid, ring in owner.ring_sids.items() if ring is self]:
            del owner.ring_sids[sid]
        if self.session is not None:
            self.session.closing = True
            self.hub.router.detach(self.session)
            totals = self.hub.closed_totals
            totals["msgs_out"] += self.session.msgs_out
            totals["bytes_out"] += self.session.bytes_out
            totals["dropped"] += self.session.dropped
            self.session.release()  # what it held goes back to the uid's account
            self.session.account = None
        for name in self.names.values():  # gone already once ready; not if the helper died early
            with contextlib.suppress(OSError):
                os.unlink(sem_file(name))
        self._remove_links()
        assert self.helper.stdin is not None and self.helper.stdout is not None
        with contextlib.suppress(OSError):
            self.helper.stdin.close()
        with contextlib.suppress(OSError):
            self.helper.stdout.close()
        self.helper.kill()  # it holds nothing worth a goodbye; reaped now, so the uid's count is true
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.helper.wait(1.0)
        with contextlib.suppress(Exception):
            self.mm.close()
        with contextlib.suppress(OSError):
            os.close(self.fd)
        acct = owner.account
        if acct is not None:
            acct.rings -= 1

    def _remove_links(self) -> None:
        """Our names are gone: a semaphore file still linked somewhere was linked by a client
        (read-write access lets it, see docs/shm.md). Remove such links under /dev/shm, as far
        as :data:`LINK_SCAN_MAX` entries and the directories this process may enter reach, and
        say so; then let the files go."""
        fds, self.sem_fds = self.sem_fds, []
        try:
            linked = set()
            for fd in fds:
                st = os.fstat(fd)
                if st.st_nlink > 0:
                    linked.add((st.st_dev, st.st_ino))
            if not linked:
                return
            removed, looked_at = _unlink_inodes(SHM_DIR, linked)
            left = sum(os.fstat(fd).st_nlink for fd in fds)
            self.hub.peer_error("ring_semaphore_linked", self.owner, ring=self.id, removed=removed, left=left,
                                looked_at=looked_at)
        except OSError:
            pass
        finally:
            for fd in fds:
                os.close(fd)

    def describe(self) -> dict[str, Any]:
        out: dict[str, Any] = {"client": self.owner.ident.ref, "uid": self.owner.ident.uid, "direction": self.direction,
                               "slots": self.slots, "slot_size": self.slot_size, "state": self.state}
        if self.direction == "publish":
            out.update(slots_in=self.slots_in, messages_in=self.msgs_in)
        else:
            s = self.session
            out.update(filled=self.slots - self.credits if self.state == "running" else 0,
                       messages_out=s.msgs_out if s else 0, dropped=s.dropped if s else 0)
        return out


class RingService:
    """Every ring of the daemon, by id and by the token of its descriptor."""

    def __init__(self, hub: Hub, loop: asyncio.AbstractEventLoop) -> None:
        self.hub = hub
        self.loop = loop
        self.rings: dict[int, Ring] = {}
        self.offers: dict[str, Ring] = {}
        self.next_id = 1
        hub.rings = self

    @property
    def config(self) -> Any:
        return self.hub.config.shm

    @property
    def max_message_bytes(self) -> int:
        """The ring message limit in force: a message from a ring may go to socket subscribers."""
        return min(int(self.config.max_message_bytes), self.hub.config.limits.max_frame_bytes)

    def attach(self, session: Session, call_id: int, args: dict[str, Any]) -> None:
        cfg = self.config
        direction = args.get("direction")
        slots = args.get("slots")
        slot_size = args.get("slot_size")

        def refuse(message: str, code: int = ErrorCode.INVALID_ARGUMENT) -> None:
            session.send(wire.encode_err(code, call_id, message, False))

        if not cfg.enabled:
            return refuse("shared-memory rings are off (shm.enabled = false)")
        if direction not in ("publish", "deliver"):
            return refuse("ring_attach: 'direction' must be 'publish' or 'deliver'")
        if not isinstance(slots, int) or isinstance(slots, bool) or not 2 <= slots <= cfg.max_slots:
            return refuse(f"ring_attach: 'slots' must be an integer from 2 to {cfg.max_slots} (shm.max_slots)")
        if (not isinstance(slot_size, int) or isinstance(slot_size, bool)
                or not layout.MIN_SLOT_SIZE <= slot_size <= cfg.max_slot_size):
            return refuse(f"ring_attach: 'slot_size' must be an integer from {layout.MIN_SLOT_SIZE} to "
                          f"{cfg.max_slot_size} (shm.max_slot_size)")
        if slots * slot_size > cfg.max_ring_bytes:
            return refuse(f"ring_attach: {slots} x {slot_size} bytes exceeds shm.max_ring_bytes ({cfg.max_ring_bytes})")
        acct = session.account
        lim = self.hub.config.limits
        if acct is not None and acct.rings >= lim.max_rings_per_uid:
            return refuse(f"uid {acct.uid} already holds {acct.rings} rings, the limit (limits.max_rings_per_uid)",
                          ErrorCode.LIMIT)
        ring_id = self.next_id
        self.next_id += 1
        try:
            ring = Ring(self, session, ring_id, direction, slots, slot_size)
        except OSError as exc:
            return refuse(f"cannot create the ring: {exc.strerror}", ErrorCode.INTERNAL)
        ring.call_id = call_id
        self.rings[ring_id] = ring
        session.rings[ring_id] = ring
        if acct is not None:
            acct.rings += 1
        return None

    def ready(self, session: Session, call_id: int, ring_id: object) -> None:
        ring = self.rings.get(ring_id) if isinstance(ring_id, int) else None
        if ring is None or ring.owner is not session or ring.state != "offered":
            session.send(wire.encode_err(ErrorCode.INVALID_ARGUMENT, call_id,
                                         f"ring_ready: no ring {ring_id!r} waiting on this connection", False))
            return
        ring.ready()
        session.send(wire.encode_json(wire.FrameType.RESULT, {"ring": ring.id}, U32.pack(call_id)))

    def close(self, session: Session, call_id: int, ring_id: object) -> None:
        ring = session.rings.pop(ring_id, None) if isinstance(ring_id, int) else None
        if ring is None:
            session.send(wire.encode_err(ErrorCode.INVALID_ARGUMENT, call_id,
                                         f"ring_close: no ring {ring_id!r} on this connection", False))
            return
        ring.close_ring()
        session.send(wire.encode_json(wire.FrameType.RESULT, {"ring": ring.id}, U32.pack(call_id)))

    def take_fd(self, token: object, uid: int) -> int:
        """The descriptor of an offered ring, for a connection of the ring owner's uid."""
        ring = self.offers.get(token) if isinstance(token, str) else None
        if ring is None or ring.owner.ident.uid != uid:
            raise HostbusError("no ring is waiting for this token on this uid", code=ErrorCode.INVALID_ARGUMENT)
        return ring.take_fd()

    def subscribe(self, session: Session, sid: int, opts: SubscribeOptions, ring_id: object) -> int:
        ring = session.rings.get(ring_id) if isinstance(ring_id, int) else None
        if ring is None or ring.direction != "deliver" or ring.session is None:
            raise HostbusError(f"SUB: no ready deliver ring {ring_id!r} on this connection",
                               code=ErrorCode.INVALID_ARGUMENT)
        if opts.group is not None:
            raise HostbusError("SUB: a queue group cannot deliver through a ring", code=ErrorCode.INVALID_ARGUMENT)
        limit = self.hub.config.limits.max_subscriptions_per_connection
        if len(session.subs) + len(session.ring_sids) >= limit:  # one count for the connection and its rings
            raise LimitExceededError(
                f"connection already has {len(session.subs) + len(session.ring_sids)} subscriptions, the limit "
                "(limits.max_subscriptions_per_connection)", code=ErrorCode.LIMIT)
        _, delivered = self.hub.router.subscribe(ring.session, sid, opts, rules_of=session)  # the owner's rules
        session.ring_sids[sid] = ring
        return delivered

    def unsubscribe(self, session: Session, sid: int) -> bool:
        ring = session.ring_sids.pop(sid, None)
        if ring is None or ring.session is None:
            return False
        self.hub.router.unsubscribe(ring.session, sid)
        return True

    def close_session(self, session: Session) -> None:
        for ring in list(session.rings.values()):
            ring.close_ring()
        session.rings.clear()
        session.ring_sids.clear()

    def stop(self) -> None:
        for ring in list(self.rings.values()):
            ring.close_ring()

    def stats(self) -> list[dict[str, Any]]:
        return [ring.describe() for ring in self.rings.values()]


def send_fd(transport: asyncio.BaseTransport, fd: int) -> None:
    """Send ``fd`` with one byte on a Unix-socket transport that has written nothing yet."""
    sock = transport.get_extra_info("socket")
    # A duplicate of the descriptor (same open file: still non-blocking; one byte into an empty
    # buffer is sent at once). Closing the duplicate leaves the transport's own descriptor open.
    with socket.socket(fileno=os.dup(sock.fileno())) as raw:
        raw.sendmsg([b"\x00"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]))])

