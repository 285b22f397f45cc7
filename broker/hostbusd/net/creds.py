"""Who is at the other end of a Unix socket: kernel credentials and the names they map to.

uid, gid and pid come from SO_PEERCRED and the supplementary groups from SO_PEERGROUPS, both
recorded by the kernel when the peer connected; user and group names come from the user
database, and the systemd unit from ``/proc/PID/cgroup`` read right after accept.
"""

from __future__ import annotations

import errno
import functools
import grp
import pwd
import socket
import struct

from hostbusd.core.acl import Principals, unit_of_cgroup

_UCRED = struct.Struct("3i")  # struct ucred: pid, uid, gid
_SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux 4.13+


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end, as the kernel recorded it at connect."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(raw)
    return pid, uid, gid


def peer_groups(sock: socket.socket) -> tuple[int, ...]:
    """The peer's supplementary groups as the kernel recorded them at connect (SO_PEERGROUPS)."""
    size = 256
    while size <= 1 << 20:
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, _SO_PEERGROUPS, size)
        except OSError as exc:
            if exc.errno == errno.ERANGE:  # more groups than fit: try a larger buffer
                size *= 4
                continue
            return ()
        return struct.unpack(f"{len(raw) // 4}I", raw[: len(raw) // 4 * 4])
    return ()


@functools.lru_cache(maxsize=4096)  # the user database may be remote (NSS): once per uid until a reload
def _user_name(uid: int) -> str | None:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return None


@functools.lru_cache(maxsize=4096)
def _group_name(gid: int) -> str | None:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return None


def forget_names() -> None:
    """Look user and group names up again (a reload: the user database may have changed)."""
    _user_name.cache_clear()
    _group_name.cache_clear()


def unit_of_pid(pid: int) -> str | None:
    try:
        with open(f"/proc/{pid}/cgroup") as f:
            return unit_of_cgroup(f.read())
    except OSError:
        return None


def peer_principals(sock: socket.socket, uid: int, gid: int, pid: int) -> Principals:
    """The principals of the peer on ``sock`` (its credentials are passed in, already read)."""
    groups = peer_groups(sock)
    gids = dict.fromkeys([gid, *groups])
    names = [n for n in (_group_name(g) for g in gids) if n is not None]
    return Principals.of_peer(uid, gid, groups, _user_name(uid), names, unit_of_pid(pid) if pid > 0 else None)
