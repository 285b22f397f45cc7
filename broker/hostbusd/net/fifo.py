"""Named pipes: publish FIFOs (ingress) and FIFO sinks (egress), as thin shells over the core.

Opening is separate from reading: :func:`prepare_fifo` and :func:`open_ingress` make or check the
file and return a descriptor, and the classes here take a descriptor, so FIFOs handed over by
systemd (socket activation) are read the same way.

Ingress: the daemon opens its FIFO read-write, so there is always a writer and it never sees
end-of-file between the processes that write to it; the descriptor is non-blocking and watched by
the event loop, and each wake-up reads everything available (up to a budget) before parsing it
as one batch. Writes of at most PIPE_BUF (4096) bytes are atomic in the kernel, so lines written
whole by concurrent writers never interleave.

Sinks: the daemon opens the FIFO write-only and non-blocking when it has something to write and
a reader is there (``ENXIO`` means nobody reads: the messages are dropped and counted). A full
pipe is never waited for: the rest of the line being written is kept so no line is torn, later
messages wait in the sink's bounded queue, and past it they are dropped and counted.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import fcntl
import os
import select
import stat
from dataclasses import dataclass
from pathlib import Path

from hostbus.errors import HostbusError
from hostbusd.config import FifoIngressConfig, FifoSinkConfig
from hostbusd.core.fifo import FifoCounters, FifoEntry, FifoFault, FifoParser, Parsed
from hostbusd.core.hub import Hub
from hostbusd.core.identity import Identity
from hostbusd.core.outbound import DROP_NEW
from hostbusd.core.router import SubscribeOptions
from hostbusd.core.sink import LineSession
from hostbusd.errors import StartupError
from hostbusd.net import LoopEgress
from hostbusd.ownership import lookup_gid

F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
#: The publish FIFO every daemon has unless fifo.default_ingress is false.
DEFAULT_FIFO = "publish.fifo"
#: Bytes read from one FIFO per event-loop wake-up before others get their turn.
READ_BUDGET = 1024 * 1024
#: uid/gid stamped on messages from a FIFO: no kernel identity (the kernel's "overflow" id).
NO_ID = 0xFFFFFFFF


@dataclass(slots=True)
class OpenedFifo:
    """A FIFO ready for the broker: a publish FIFO with its open descriptor, or a sink (fd None)."""

    path: Path
    fd: int | None
    spec: FifoIngressConfig | FifoSinkConfig


def prepare_fifo(path: Path, mode: int, group: str | None) -> bool:
    """Create the FIFO at ``path`` (True) or check the existing one (False); set mode and group.

    A new FIFO is created owner-only and gets its group and final mode after, so it is never
    open to more writers than configured. An existing one must be a FIFO owned by this user.
    """
    gid = lookup_gid(group, f"FIFO {path}") if group else -1
    created = False
    try:
        parent = os.stat(path.parent)
    except OSError as exc:
        raise StartupError(f"cannot create FIFO {path}: {exc.strerror}") from None
    if parent.st_mode & 0o002 and not parent.st_mode & stat.S_ISVTX:
        raise StartupError(f"FIFO {path}: its directory is writable by everyone (and not sticky), so others "
                           "could replace the FIFO; choose another directory")
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        old = os.umask(0o077)
        try:
            os.mkfifo(path, 0o600)
            created = True
        except OSError as exc:
            raise StartupError(f"cannot create FIFO {path}: {exc.strerror}") from None
        finally:
            os.umask(old)
    else:
        if not stat.S_ISFIFO(st.st_mode):
            raise StartupError(f"{path} exists and is not a FIFO; remove it or configure another path")
        if st.st_uid != os.getuid():
            raise StartupError(f"FIFO {path} belongs to uid {st.st_uid}, not to this daemon's uid {os.getuid()}")
    try:
        if gid != -1:
            os.chown(path, -1, gid)
        os.chmod(path, mode)
    except OSError as exc:
        raise StartupError(f"cannot set the group or mode of FIFO {path}: {exc.strerror}") from None
    return created


def open_fifo_fd(path: Path, flags: int) -> int:
    """Open ``path`` only if it is a FIFO (never through a symlink); OSError otherwise."""
    fd = os.open(path, flags | os.O_NONBLOCK | os.O_CLOEXEC | os.O_NOFOLLOW)
    if not stat.S_ISFIFO(os.fstat(fd).st_mode):
        os.close(fd)
        raise OSError(errno.EINVAL, "not a FIFO")
    return fd


def open_ingress(path: Path, pipe_bytes: int) -> int:
    """Open a publish FIFO read-write and non-blocking (no EOF between writers)."""
    try:
        fd = open_fifo_fd(path, os.O_RDWR)
    except OSError as exc:
        raise StartupError(f"cannot open FIFO {path}: {exc.strerror}") from None
    with contextlib.suppress(OSError):  # best effort: capped by /proc/sys/fs/pipe-max-size
        fcntl.fcntl(fd, F_SETPIPE_SZ, pipe_bytes)
    return fd


class FifoIngress:
    """Reads one publish FIFO and routes what it parses."""

    def __init__(self, hub: Hub, path: Path, fd: int, fmt: str, topic_prefix: str) -> None:
        self.hub = hub
        self.path = path
        self.fd = fd
        cfg = hub.config.fifo
        self.counters = FifoCounters()
        hub.fifos[str(path)] = FifoEntry("ingress", fmt, self.counters)
        self.ident = hub.identity(NO_ID, NO_ID, 0, f"fifo:{path}")
        self.parser = FifoParser(fmt, max_line_bytes=cfg.max_line_bytes,
                                 max_frame_bytes=hub.config.limits.max_frame_bytes, topic_prefix=topic_prefix,
                                 check_topic=hub.router.topic_from_wire, check_block=hub.router.check_block,
                                 on_fault=self._fault)
        self.partial_since: float | None = None
        self.loop = asyncio.get_running_loop()

    def start(self) -> None:
        self.loop.add_reader(self.fd, self._readable)

    def _fault(self, fault: FifoFault) -> None:
        self.counters.fault(fault.kind)
        self.hub.peer_error("fifo_bad_input", None, path=str(self.path), fault=fault.kind, error=str(fault))

    def _readable(self) -> None:
        chunks: list[bytes] = []
        total = 0
        while total < READ_BUDGET:
            try:
                data = os.read(self.fd, 65536)
            except BlockingIOError:
                break
            except OSError as exc:  # not expected from a pipe; keep serving the others
                self.hub.peer_error("fifo_read_error", None, path=str(self.path), error=exc.strerror)
                break
            if not data:
                break
            chunks.append(data)
            total += len(data)
        if not chunks:
            return
        parser = self.parser
        parsed = parser.feed(chunks[0] if len(chunks) == 1 else b"".join(chunks))
        if parsed:
            self._publish(parsed)
        if parser.broken:
            self._resync()
        # The partial-line timer measures silence: any byte of the line restarts it, so a slow
        # writer streaming a long line is never cut; only a writer that went quiet is.
        self.partial_since = self.loop.time() if parser.partial else None

    def _publish(self, parsed: list[Parsed]) -> None:
        router = self.hub.router
        ident = self.ident
        counters = self.counters
        for topic, block, flags, payload_len in parsed:
            try:
                router.publish(ident, topic, block, flags, "", payload_len, None)
            except HostbusError as exc:  # the retained store is full: delivered, not kept
                self._fault(FifoFault("retained_limit", str(exc)))
            counters.messages += 1
            counters.bytes += len(block)

    def _resync(self) -> None:
        """A broken frame stream: discard what is in the pipe now and start afresh.

        Reopening the FIFO would achieve no more (writers keep their end either way) and could
        fail if the path was removed; draining keeps the descriptor."""
        with contextlib.suppress(OSError):
            while os.read(self.fd, 65536):
                pass
        self.parser.reset()

    def check_timeouts(self, now: float) -> None:
        timeout = self.hub.config.fifo.partial_line_timeout
        if self.partial_since is not None and now - self.partial_since > timeout:
            self.parser.drop_partial()
            self.partial_since = None

    def close(self) -> None:
        self.loop.remove_reader(self.fd)
        os.close(self.fd)


class FifoSink(LoopEgress):
    """Writes the messages matching ``subjects`` to a FIFO as lines; an Egress for its session."""

    def __init__(self, hub: Hub, path: Path, subjects: list[str], fmt: str, max_queued_msgs: int) -> None:
        self.hub = hub
        self.path = path
        self.loop = asyncio.get_running_loop()
        self.fd: int | None = None
        self.pending = b""  # the rest of a line the full pipe did not take
        self.counters = FifoCounters()
        lim = hub.config.limits
        ident = Identity(0, os.getuid(), os.getgid(), os.getpid(), f"sink:{path}")
        self.session = LineSession(ident, fmt, batch_bytes=lim.write_batch_bytes,
                                   max_queued_bytes=lim.max_queued_bytes_per_connection)
        hub.fifos[str(path)] = FifoEntry("sink", fmt, self.counters, self.session)
        self.session.egress = self
        for sid, pattern in enumerate(subjects, start=1):
            hub.router.subscribe(self.session, sid, SubscribeOptions(
                pattern, policy=DROP_NEW, max_msgs=max_queued_msgs, max_bytes=lim.max_queued_bytes_per_connection))

    # Egress
    def flush(self) -> None:
        session = self.session
        session.flush_pending = False
        if session.paused or session.closing:
            return
        out = session.take_output()
        if not out:
            return
        if self.fd is None and not self._open():
            self._drop(len(out), "no_reader")
            return
        self._write(b"".join(out), len(out))

    def _open(self) -> bool:
        try:
            self.fd = open_fifo_fd(self.path, os.O_WRONLY)
        except OSError as exc:
            if exc.errno not in (errno.ENXIO, errno.ENOENT):
                self.hub.peer_error("fifo_sink_error", None, path=str(self.path), error=exc.strerror)
            return False
        with contextlib.suppress(OSError):
            fcntl.fcntl(self.fd, F_SETPIPE_SZ, self.hub.config.fifo.pipe_bytes)
        return True

    def _write(self, data: bytes, nmsgs: int) -> None:
        assert self.fd is not None
        try:
            n = os.write(self.fd, data)
        except BlockingIOError:
            n = 0
        except OSError:  # EPIPE: the reader went away
            self._reader_gone(nmsgs)
            return
        if n == len(data):
            self.counters.messages += nmsgs
            self.counters.bytes += n
            return
        # The pipe is full. Keep the rest of the line being written (a line is never torn); the
        # whole lines after it are dropped; new messages queue (bounded) until the pipe drains.
        rest = data[n:]
        cut = rest.find(b"\n") + 1
        self.pending = rest[:cut]
        dropped = rest.count(b"\n", cut)
        self.counters.messages += nmsgs - dropped - 1
        self.counters.bytes += n
        self._drop(dropped, "pipe_full")
        self.session.paused = True
        self.loop.add_writer(self.fd, self._writable)

    def _writable(self) -> None:
        assert self.fd is not None
        try:
            n = os.write(self.fd, self.pending)
        except BlockingIOError:
            return
        except OSError:
            self.loop.remove_writer(self.fd)
            self.pending = b""
            self._reader_gone(1)  # the line it was finishing
            return
        self.counters.bytes += n
        self.pending = self.pending[n:]
        if self.pending:
            return
        self.counters.messages += 1
        self.loop.remove_writer(self.fd)
        self.session.paused = False
        self.flush()

    def _reader_gone(self, nmsgs: int) -> None:
        assert self.fd is not None
        if self.pending:
            self.loop.remove_writer(self.fd)
            self.pending = b""
            nmsgs += 1  # the line that was half written
        os.close(self.fd)
        self.fd = None
        self.session.paused = False
        self._drop(nmsgs + self.session.discard_output(), "no_reader")

    def check_reader(self) -> None:
        """Housekeeping: if the reader left, let go of the pipe now (what it held is discarded
        with it), so a reader who comes next does not get the last one's leftovers."""
        if self.fd is None:
            return
        poller = select.poll()
        poller.register(self.fd, select.POLLOUT)
        for _, events in poller.poll(0):
            if events & select.POLLERR:
                self._reader_gone(0)

    def _drop(self, n: int, why: str) -> None:
        if n:
            self.counters.errors[why] = self.counters.errors.get(why, 0) + n
            self.session.dropped += n

    def stop(self) -> None:
        """Flush what the pipe takes now, then stop receiving and close."""
        self.flush()
        self.session.closing = True
        self.hub.router.detach(self.session)
        if self.fd is not None:
            if self.pending:
                self.loop.remove_writer(self.fd)
            os.close(self.fd)
            self.fd = None

