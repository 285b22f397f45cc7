"""Groups of the files the daemon creates (socket directory, socket, FIFOs)."""

from __future__ import annotations

import grp

from hostbusd.errors import StartupError


def lookup_gid(group: str, what: str) -> int:
    """The gid of ``group`` (a name), or StartupError naming ``what`` asked for it."""
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise StartupError(f"{what}: no such group {group!r}") from None
