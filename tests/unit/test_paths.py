"""Default directories and socket path: the rules the daemon and the clients share."""

from __future__ import annotations

from pathlib import Path

from hostbus import paths


def test_root_uses_the_system_directories() -> None:
    env = {"XDG_RUNTIME_DIR": "/run/user/0", "XDG_STATE_HOME": "/root/.state"}
    assert paths.default_runtime_dir(0, env) == Path("/run/hostbus")
    assert paths.default_state_dir(0, env) == Path("/var/lib/hostbus")


def test_users_use_xdg_directories() -> None:
    env = {"XDG_RUNTIME_DIR": "/run/user/1000", "XDG_STATE_HOME": "/home/u/.state"}
    assert paths.default_runtime_dir(1000, env) == Path("/run/user/1000/hostbus")
    assert paths.default_state_dir(1000, env) == Path("/home/u/.state/hostbus")


def test_fallbacks_without_xdg_or_with_relative_xdg() -> None:
    for env in ({}, {"XDG_RUNTIME_DIR": "relative", "XDG_STATE_HOME": ""}):
        assert paths.default_runtime_dir(1000, env) == Path("/tmp/hostbus-1000")
        assert paths.default_state_dir(1000, env) == Path.home() / ".local" / "state" / "hostbus"


def test_socket_from_environment_then_own_instance_then_system(tmp_path: Path) -> None:
    assert paths.default_socket({"HOSTBUS_SOCKET": "/x/y.sock"}) == Path("/x/y.sock")
    run = tmp_path / "hostbus"
    run.mkdir()
    env = {"XDG_RUNTIME_DIR": str(tmp_path)}
    if paths.default_runtime_dir(env=env) != paths.SYSTEM_RUNTIME_DIR:  # not root
        assert paths.default_socket(env) == paths.SYSTEM_RUNTIME_DIR / paths.SOCKET_NAME
        (run / paths.SOCKET_NAME).touch()
        assert paths.default_socket(env) == run / paths.SOCKET_NAME
    else:
        assert paths.default_socket(env) == paths.SYSTEM_RUNTIME_DIR / paths.SOCKET_NAME
