"""Who is at the other end of a Unix socket: kernel credentials and the names they map to.

uid, gid and pid come from SO_PEERCRED and the supplementary groups from SO_PEERGROUPS, both
recorded by the kernel when the peer connected; user and group names come from the user
database, and the systemd unit from ``/proc/PID/cgroup`` read right after accept.
"""

from __future__ import annotations

import errno
import grp
import pwd
import socket
import struct

from hostbusd.core.acl import Principals, unit_of_cgroup

_UCRED = struct.Struct("i2I")  # struct ucred: pid_t pid, uid_t uid, gid_t gid
_SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)  # Linux 4.13+


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """(pid, uid, gid) of the process at the other end, as the kernel recorded it at connect."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(raw)
    return pid, uid, gid


def peer_groups(sock: socket.socket) -> tuple[int, ...] | None:
    """The peer's supplementary groups as the kernel recorded them at connect (SO_PEERGROUPS);
    None if the kernel cannot tell."""
    size = 256
    while size <= 1 << 20:
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, _SO_PEERGROUPS, size)
        except OSError as exc:
            if exc.errno == errno.ERANGE:  # more groups than fit: try a larger buffer
                size *= 4
                continue
            return None
        return struct.unpack(f"{len(raw) // 4}I", raw[: len(raw) // 4 * 4])
    return None


# Names are looked up at every connect, not cached: a uid given to a new user must not keep the
# old user's name (and rights).
def _user_name(uid: int) -> str | None:
    try:
        return pwd.getpwuid(uid).pw_name
    except (KeyError, OverflowError):
        return None


def _group_name(gid: int) -> str | None:
    try:
        return grp.getgrgid(gid).gr_name
    except (KeyError, OverflowError):
        return None


def unit_of_pid(pid: int) -> tuple[bool, str | None]:
    """(known, unit): ``known`` is False when the process's cgroup could not be read (it exited)."""
    try:
        with open(f"/proc/{pid}/cgroup", "rb") as f:
            text = f.read().decode(errors="surrogateescape")
    except OSError:
        return False, None
    unit = unit_of_cgroup(text)
    if unit is not None and not unit.isprintable():  # a name the rules could never write: no unit
        return True, None
    return True, unit


def peer_principals(sock: socket.socket, uid: int, gid: int, pid: int) -> Principals:
    """The principals of the peer on ``sock`` (its credentials are passed in, already read).

    What cannot be found out is recorded as unknown, so that a rule refusing by that kind of
    name refuses this peer too (fail closed): groups when SO_PEERGROUPS fails, the unit when the
    process is gone, the user name when the user database has none.
    """
    unknown = set()
    groups = peer_groups(sock)
    if groups is None:
        unknown.add("group")
        groups = ()
    gids = dict.fromkeys([gid, *groups])
    names = [n for n in (_group_name(g) for g in gids) if n is not None]
    if len(names) < len(gids):
        unknown.add("group")
    user = _user_name(uid)
    if user is None:
        unknown.add("user")
    known, unit = unit_of_pid(pid) if pid > 0 else (False, None)
    if not known:
        unknown.add("unit")
    return Principals.of_peer(uid, gid, groups, user, names, unit, frozenset(unknown))


def unknown_names(entries: list[str]) -> list[str]:
    """The ``user:``/``group:`` entries of access rules (``!`` or not) naming no user or group here."""
    out = []
    for entry in entries:
        kind, _, name = entry.lstrip("!").partition(":")
        try:
            if kind == "user":
                pwd.getpwnam(name)
            elif kind == "group":
                grp.getgrnam(name)
        except KeyError:
            out.append(entry)
    return out
