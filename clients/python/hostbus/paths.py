"""Where hostbus lives on this host: default runtime and state directories and the socket path.

The daemon and the client share these rules, so a client started with no arguments finds the
daemon started with no arguments.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path

SOCKET_NAME = "hostbus.sock"
SYSTEM_RUNTIME_DIR = Path("/run/hostbus")
SYSTEM_STATE_DIR = Path("/var/lib/hostbus")


def _instance_dir(system: Path, xdg_var: str, fallback: Path | None, uid: int | None,
                  env: Mapping[str, str] | None) -> Path:
    uid = os.getuid() if uid is None else uid
    env = os.environ if env is None else env
    if uid == 0:
        return system
    xdg = env.get(xdg_var)
    if xdg and os.path.isabs(xdg):
        return Path(xdg) / "hostbus"
    return fallback if fallback is not None else Path.home() / ".local" / "state" / "hostbus"


def default_runtime_dir(uid: int | None = None, env: Mapping[str, str] | None = None) -> Path:
    """``/run/hostbus`` for root, else ``$XDG_RUNTIME_DIR/hostbus``, else ``/tmp/hostbus-<uid>``."""
    fallback = Path(f"/tmp/hostbus-{os.getuid() if uid is None else uid}")
    return _instance_dir(SYSTEM_RUNTIME_DIR, "XDG_RUNTIME_DIR", fallback, uid, env)


def default_state_dir(uid: int | None = None, env: Mapping[str, str] | None = None) -> Path:
    """``/var/lib/hostbus`` for root, else ``$XDG_STATE_HOME/hostbus``, else ``~/.local/state/hostbus``."""
    return _instance_dir(SYSTEM_STATE_DIR, "XDG_STATE_HOME", None, uid, env)


def default_socket(env: Mapping[str, str] | None = None) -> Path:
    """The socket a client connects to when none is given.

    ``$HOSTBUS_SOCKET`` if set; else this user's instance if its socket exists; else the system
    instance (``/run/hostbus/hostbus.sock``).
    """
    env = os.environ if env is None else env
    explicit = env.get("HOSTBUS_SOCKET")
    if explicit:
        return Path(explicit)
    mine = default_runtime_dir(env=env) / SOCKET_NAME
    if mine.exists():
        return mine
    return SYSTEM_RUNTIME_DIR / SOCKET_NAME
