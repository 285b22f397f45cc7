"""The Unix-socket transport: an asyncio protocol around :class:`PeerCore`.

Reading: every ``data_received`` hands the whole chunk to the core, which handles every complete
frame in it before returning. Writing: the session collects frames; :meth:`UnixPeer.wake`
schedules one write at the end of the loop iteration (``call_soon``), so all messages routed to
a peer during one iteration leave in one ``write`` -- one syscall for many messages. The
transport's ``pause_writing``/``resume_writing`` switch the session between writing and queueing.
"""

from __future__ import annotations

import asyncio
import mmap
from typing import TYPE_CHECKING, cast

from hostbus.errors import ErrorCode
from hostbusd.core.peer import PeerCore, State
from hostbusd.net.creds import peer_credentials, peer_principals
from hostbusd.net.ring import send_fd

if TYPE_CHECKING:
    from hostbusd.core.hub import Hub

#: Output of a few large blocks goes to the transport as a list (one writev, no copy to join
#: them); many small frames are joined, which costs less than a long list of buffers.
_GATHER_MAX = 16
_GATHER_BYTES = 64 * 1024

#: Bytes one read takes; a frame of at least peer.BIG_FRAME is received straight into a buffer
#: of its own size instead (Decoder.reserve), not gathered from reads.
_READ_SIZE = 256 * 1024
#: What reads land in, shared by every connection: the loop reads one socket at a time and
#: buffer_updated copies what came out before the next read (no buffer held per connection).
#: Private anonymous pages: the kernel provides each on its first use, so a broker that has not
#: read much yet does not hold all of it.
_READ_BUFFER = memoryview(mmap.mmap(-1, _READ_SIZE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS))


class UnixPeer(asyncio.BufferedProtocol):
    def __init__(self, hub: Hub, peers: set[UnixPeer]) -> None:
        self.hub = hub
        self.peers = peers
        self.loop = asyncio.get_running_loop()
        self.transport: asyncio.Transport | None = None
        self.core: PeerCore | None = None
        self.since = self.loop.time()  # accepted at
        self.partial_since: float | None = None
        self._abort_handle: asyncio.TimerHandle | None = None
        self._reading_paused = False  # by us: this peer's turn's work budget ran out
        self._eof = False
        self._charged = 0  # bytes of the transport's buffer charged to the peer's uid
        self.closed = asyncio.Event()
        self._into_frame = False  # the last buffer handed out was a large frame's own

    # ---- asyncio.Protocol ----------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport = cast(asyncio.Transport, transport)  # uvloop's is not a subclass
        sock = transport.get_extra_info("socket")
        pid, uid, gid = peer_credentials(sock)
        hub = self.hub
        self.core = core = PeerCore(hub, hub.identity(uid, gid, pid))
        core.session.egress = self
        self.peers.add(self)
        if len(self.peers) > hub.config.limits.max_connections:  # counts handshakes in progress
            hub.rejected_connections += 1
            core.fail(ErrorCode.CONNECTION_LIMIT,
                      f"the broker is at its limit of {hub.config.limits.max_connections} connections "
                      "(limits.max_connections); try again later")
            return
        try:
            principals = peer_principals(sock, uid, gid, pid)
        except Exception as exc:
            hub.peer_error("identify_failed", core.session, error=repr(exc))
            core.fail(ErrorCode.INTERNAL, "the broker could not identify this connection's process", peer_fault=False)
            return
        refusal = hub.admit(core.session, principals)
        if refusal is not None:
            hub.rejected_connections += 1
            core.fail(ErrorCode.CONNECTION_LIMIT, refusal)

    def get_buffer(self, sizehint: int) -> memoryview:
        core = self.core
        target = core.decoder.reserve() if core is not None else None
        self._into_frame = target is not None
        return target if target is not None else _READ_BUFFER

    def buffer_updated(self, nbytes: int) -> None:
        core = self.core
        assert core is not None
        before = core.frames_done
        if self._into_frame:
            core.decoder.filled(nbytes)
            self._after_input(before, core.receive(b""))
        else:
            self._after_input(before, core.receive(_READ_BUFFER[:nbytes].tobytes()))

    def _continue(self) -> None:
        core = self.core
        if core is None or self.transport is None or self.transport.is_closing():
            return
        before = core.frames_done
        self._after_input(before, core.process())

    def _after_input(self, frames_before: int, more: bool) -> None:
        core = self.core
        transport = self.transport
        assert core is not None and transport is not None
        if more:  # out of budget: let the others have the loop, then go on
            if not self._reading_paused and not transport.is_closing():
                transport.pause_reading()
                self._reading_paused = True
            self.loop.call_soon(self._continue)
            return
        if self._eof:
            self._end()
            return
        if self._reading_paused and not transport.is_closing():
            transport.resume_reading()
            self._reading_paused = False
        # The frame timer measures how long the frame now being received has been incomplete.
        if core.partial:
            if self.partial_since is None or core.frames_done != frames_before:
                self.partial_since = self.loop.time()
        else:
            self.partial_since = None

    def eof_received(self) -> bool:
        """The peer closed its side: finish the frames it sent, then close ours."""
        self._eof = True
        if not self._reading_paused:  # no work left over from the budget
            self._end()
        return True  # we close the transport ourselves

    def _end(self) -> None:
        if self.core is not None:
            self.core.end()
        self.close()

    def pause_writing(self) -> None:
        if self.core is not None:
            self.core.session.paused = True
            self._charge()

    def _charge(self) -> None:
        """Charge what the transport still holds to the peer's uid (limits.max_queued_bytes_per_uid)."""
        acct = self.core.session.account if self.core is not None else None
        if acct is not None and self.transport is not None:
            n = self.transport.get_write_buffer_size()
            acct.written_bytes += n - self._charged
            self._charged = n

    def resume_writing(self) -> None:
        if self.core is not None:
            session = self.core.session
            session.paused = False
            self.flush()
            if session.members and self.hub.queues is not None:  # a consumer member can take more now
                self.hub.queues.resumed(session)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._abort_handle is not None:
            self._abort_handle.cancel()
        if self.core is not None:
            self.core.state = State.CLOSED
            self.core.session.closing = True
            self.hub.close(self.core.session)
            if self.core.session.account is not None:
                self.core.session.account.written_bytes -= self._charged
                self._charged = 0
            self.hub.release(self.core.session)
            self.core.forget()  # no cycle keeps its buffers alive until the next collection
        self.peers.discard(self)
        self.closed.set()

    # ---- Egress (called by the session) ---------------------------------------------------------

    def wake(self, urgent: bool) -> None:
        if urgent:
            self.flush()
        else:
            self.loop.call_soon(self.flush)

    def flush(self) -> None:
        transport = self.transport
        core = self.core
        if transport is None or core is None:
            return
        if transport.is_closing():
            if not core.session.closing:  # closed under us: route nothing more to it
                core.end()
            return
        session = core.session
        session.flush_pending = False
        before = session.bytes_out
        while True:
            out = session.take_output()
            if out:
                if len(out) == 1:
                    transport.write(out[0])
                elif len(out) <= _GATHER_MAX and session.bytes_out - before >= _GATHER_BYTES:
                    transport.writelines(out)  # large blocks: written from where they are (writev)
                else:
                    transport.write(b"".join(out))
                before = session.bytes_out
            if session.paused or not session.has_backlog or session.closing:
                break
        # Messages wait in bounded queues while paused, but replies (PONG, OK, ERR, NORESP) are
        # written at once: a peer that keeps asking and never reads must not grow this buffer.
        # Message bytes alone stay below one write batch plus one message past the transport's
        # high-water mark, so only replies can pass this bound.
        self._charge()
        lim = self.hub.config.limits
        bound = lim.max_queued_bytes_per_connection + lim.max_frame_bytes + lim.write_batch_bytes
        if transport.get_write_buffer_size() > bound and not session.closing:
            core.fail(ErrorCode.SLOW_CONSUMER,
                      f"the connection stopped reading: over {bound} bytes of replies are waiting "
                      "(limits.max_queued_bytes_per_connection + max_frame_bytes + write_batch_bytes)")

    def send_fd(self, fd: int) -> None:
        """Hand a ring's segment to the peer (a connection that has been sent nothing yet)."""
        if self.transport is not None and not self.transport.is_closing():
            try:
                send_fd(self.transport, fd)
            except OSError as exc:
                self.hub.peer_error("ring_fd_failed", self.core.session if self.core else None, error=str(exc))

    def close(self) -> None:
        """The session failed or the broker is stopping: write what is left, then close."""
        transport = self.transport
        if transport is None or transport.is_closing():
            return
        out = self.core.session.take_output() if self.core is not None else []
        if out:
            transport.write(b"".join(out))
        transport.close()
        # A peer that does not read would keep the close pending forever: abort after a grace period.
        self._abort_handle = self.loop.call_later(self.hub.config.limits.close_timeout, transport.abort)

    # ---- housekeeping -----------------------------------------------------------------------------

    def check_timeouts(self, now: float) -> None:
        core = self.core
        if core is None or core.state is State.CLOSED:
            return
        limits = self.hub.config.limits
        if core.state is State.HELLO and now - self.since > limits.handshake_timeout:
            core.fail(ErrorCode.TIMEOUT, f"no HELLO within {limits.handshake_timeout} s (limits.handshake_timeout)")
        elif self.partial_since is not None and now - self.partial_since > limits.frame_timeout:
            core.fail(ErrorCode.TIMEOUT,
                      f"a frame stayed incomplete for {limits.frame_timeout} s (limits.frame_timeout)")

    @property
    def write_buffer_size(self) -> int:
        return self.transport.get_write_buffer_size() if self.transport is not None else 0
