"""Who sent a message: the kernel-verified identity of a peer, announced to subscribers once."""

from __future__ import annotations

from dataclasses import dataclass

from hostbus import wire


@dataclass(frozen=True, slots=True)
class Identity:
    """A sender as subscribers see it. ``ref`` is unique for the daemon's lifetime.

    ``origin`` is empty for Unix-socket peers (uid/gid/pid from SO_PEERCRED); other ingress
    kinds name themselves there (``fifo:/run/hostbus/publish.fifo``) and carry the daemon's
    own credentials.
    """

    ref: int
    uid: int
    gid: int
    pid: int
    origin: str = ""

    def frame(self) -> bytes:
        """The SENDER frame that announces this identity on a subscriber's connection."""
        return wire.encode_sender(self.ref, self.uid, self.gid, self.pid, self.origin)
