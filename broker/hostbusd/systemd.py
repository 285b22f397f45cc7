"""The systemd interfaces hostbusd speaks, without libsystemd: notify, socket activation, journal.

* **Notify** (``sd_notify``): one datagram of ``KEY=VALUE`` lines to ``$NOTIFY_SOCKET`` (a path,
  or an abstract socket when it starts with ``@``). hostbusd sends ``READY=1`` once every
  listener accepts, ``STATUS=`` with counts, ``WATCHDOG=1`` from the event loop at half of
  ``$WATCHDOG_USEC`` (a stuck loop stops the pings and systemd restarts the service),
  ``RELOADING=1`` … ``READY=1`` around a reload, and ``STOPPING=1`` when it stops.
* **Socket activation** (``sd_listen_fds``): descriptors 3 … 3+``$LISTEN_FDS``-1, meant for us if
  ``$LISTEN_PID`` is our pid, named by ``$LISTEN_FDNAMES``. The caller matches them to the
  configuration by what they are (a listening socket's path, a FIFO's inode).
* **Journal**: when ``$JOURNAL_STREAM`` names our stderr, stderr goes to the journal; see
  :func:`stderr_is_journal`.

Only the daemon's outer layer (``main``) calls this module: the broker itself never reads the
environment.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import MutableMapping

SD_LISTEN_FDS_START = 3


class Notifier:
    """Sends notify datagrams; a no-op when there is no ``$NOTIFY_SOCKET``."""

    def __init__(self, env: MutableMapping[str, str]) -> None:
        addr = env.pop("NOTIFY_SOCKET", "")
        self.address = "\0" + addr[1:] if addr.startswith("@") else addr
        self._sock: socket.socket | None = None
        if self.address:
            self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        self.watchdog_interval: float | None = None
        if usec.isdigit() and int(usec) > 0 and (not pid or pid == str(os.getpid())):
            self.watchdog_interval = int(usec) / 1e6 / 2  # ping at half the timeout
        env.pop("WATCHDOG_USEC", None)
        env.pop("WATCHDOG_PID", None)

    @property
    def enabled(self) -> bool:
        return self._sock is not None

    def send(self, **fields: object) -> None:
        """``notify(READY=1, STATUS="...")`` sends ``READY=1\\nSTATUS=...``."""
        if self._sock is None:
            return
        text = "\n".join(f"{k}={str(v).replace(chr(10), ' ')}" for k, v in fields.items())
        with contextlib.suppress(OSError):  # systemd gone: nothing to tell, nothing to fail
            self._sock.sendto(text.encode(), self.address)

    def close(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None


def listen_fds(env: MutableMapping[str, str]) -> list[tuple[int, str]]:
    """The descriptors passed by socket activation, with their names; clears the variables."""
    pid = env.pop("LISTEN_PID", "")
    count = env.pop("LISTEN_FDS", "")
    names = env.pop("LISTEN_FDNAMES", "")
    if not pid or pid != str(os.getpid()) or not count.isdigit():
        return []
    n = int(count)
    labels = names.split(":") if names else []
    out = []
    for i in range(n):
        fd = SD_LISTEN_FDS_START + i
        os.set_inheritable(fd, False)
        out.append((fd, labels[i] if i < len(labels) else ""))
    return out


def stderr_is_journal(env: MutableMapping[str, str]) -> bool:
    """True if systemd connected our stderr to the journal (``$JOURNAL_STREAM`` is ``dev:inode``)."""
    stream = env.get("JOURNAL_STREAM", "")
    dev, _, ino = stream.partition(":")
    if not (dev.isdigit() and ino.isdigit()):
        return False
    try:
        st = os.fstat(2)
    except OSError:
        return False
    return st.st_dev == int(dev) and st.st_ino == int(ino)
