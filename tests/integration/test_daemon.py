"""The daemon's life: start, refuse what it must, configuration errors, graceful stop, cleanup."""

from __future__ import annotations

import json
import os
import signal
import socket
import stat
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path

import pytest

import hostbus
from hostbus import wire
from tests.conftest import HOSTBUSD, Daemon
from tests.helpers.raw import RawClient


def run_daemon(*args: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*HOSTBUSD, *args], capture_output=True, text=True, timeout=timeout)


def test_graceful_stop_delivers_queued_messages_and_removes_the_socket(daemon: Daemon) -> None:
    sub_bus = daemon.connect("subscriber")
    sub = sub_bus.subscribe("q", pending_limit=100_000)
    with daemon.connect("publisher") as pub:
        for i in range(20_000):
            pub.publish("q", i.to_bytes(4, "little") + b"\0" * 60)
        pub.flush(timeout=30)
        daemon.proc.send_signal(signal.SIGTERM)
        assert daemon.proc.wait(20) == 0
    got = []
    with pytest.raises(hostbus.ShuttingDownError):
        while True:
            got.append(int.from_bytes(sub.next(timeout=10).data[:4], "little"))
    sub_bus.close()
    assert got == list(range(20_000))  # everything routed before the stop was delivered
    assert not daemon.socket.exists()
    log = [json.loads(line) for line in daemon.log().splitlines() if line.startswith("{")]
    assert [rec["event"] for rec in log] == ["started", "stopped"]  # quiet in between
    assert log[1]["messages_in"] == 20_000


def test_sigint_stops_too(daemon: Daemon) -> None:
    daemon.proc.send_signal(signal.SIGINT)
    assert daemon.proc.wait(20) == 0
    assert not daemon.socket.exists()


def test_stale_socket_is_replaced(workdir: Path) -> None:
    # Leave a socket file with no listener where the daemon's socket goes.
    run_dir = workdir / "stale" / "run"
    run_dir.mkdir(parents=True, mode=0o700)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.bind(str(run_dir / "hostbus.sock"))
    s.close()
    assert (run_dir / "hostbus.sock").exists()
    d = Daemon(workdir / "stale", {})
    try:
        with d.connect() as bus:
            bus.flush()
        assert d.stop() == 0
    finally:
        d.kill()


def test_second_daemon_on_the_same_socket_refuses(daemon: Daemon) -> None:
    r = run_daemon("--runtime-dir", str(daemon.runtime_dir), "--state-dir", str(daemon.state_dir),
                   "--log-format", "console")
    assert r.returncode == 1
    assert "another hostbusd is already serving" in r.stderr
    with daemon.connect() as bus:  # the first one is untouched
        bus.flush()


def test_path_that_is_not_a_socket_is_refused(workdir: Path) -> None:
    run = workdir / "run"
    run.mkdir(mode=0o700)
    (run / "hostbus.sock").write_text("not a socket")
    r = run_daemon("--runtime-dir", str(run), "--state-dir", str(workdir / "state"), "--log-format", "json")
    assert r.returncode == 1
    assert "is not a socket" in r.stderr
    assert (run / "hostbus.sock").read_text() == "not a socket"


def test_insecure_runtime_dir_is_refused(workdir: Path) -> None:
    run = workdir / "run"
    run.mkdir()
    run.chmod(0o777)
    r = run_daemon("--runtime-dir", str(run), "--state-dir", str(workdir / "state"), "--log-format", "json")
    assert r.returncode == 1
    assert "writable by group or others" in r.stderr


def test_directory_and_socket_modes_are_set_before_the_socket_exists(start_daemon: Callable[..., Daemon]) -> None:
    d = start_daemon({"socket": {"dir_mode": 0o750, "mode": 0o660}})
    assert stat.S_IMODE(os.stat(d.runtime_dir).st_mode) == 0o750
    st = os.stat(d.socket)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o660
    assert stat.S_IMODE(os.stat(d.state_dir).st_mode) == 0o700


@pytest.mark.parametrize(("toml", "expected"), [
    ("[limits]\nmax_frame_bytes = 10\n", ["limits.max_frame_bytes = 10", "greater than or equal to 65536"]),
    ("[log]\nformat = \"xml\"\n", ["log.format = 'xml'", "'auto', 'console', 'json' or 'journal'"]),
    ("[limits]\nmax_connectoins = 5\n", ["limits.max_connectoins", "unknown key"]),
    ("[subscriptions]\npolicy = \"block\"\n", ["subscriptions.policy = 'block'", "drop-oldest"]),
    ("limits = 3\n", ["limits = 3"]),
    ("this is not toml", ["not valid TOML"]),
])
def test_invalid_configuration_exits_2_naming_key_value_and_allowed(workdir: Path, toml: str,
                                                                     expected: list[str]) -> None:
    cfg = workdir / "bad.toml"
    cfg.write_text(toml)
    r = run_daemon("--config", str(cfg), "--runtime-dir", str(workdir / "run"))
    assert r.returncode == 2
    for text in expected:
        assert text in r.stderr
    assert not (workdir / "run").exists()  # nothing was created


def test_missing_config_file_exits_2(workdir: Path) -> None:
    r = run_daemon("--config", str(workdir / "nope.toml"))
    assert r.returncode == 2
    assert "cannot read" in r.stderr


def test_check_config_validates_and_flags_override_the_file(workdir: Path) -> None:
    cfg = workdir / "c.toml"
    cfg.write_text('runtime_dir = "/from/file"\n[log]\nlevel = "debug"\nformat = "console"\n')
    r = run_daemon("--config", str(cfg), "--check-config", "--runtime-dir", "/from/flag", "--log-format", "json")
    assert r.returncode == 0, r.stderr
    effective = json.loads(r.stdout)
    assert effective["runtime_dir"] == "/from/flag"
    assert effective["log"] == {"format": "json", "level": "debug", "peer_error_interval": 10.0}
    assert "configuration OK" in r.stderr


def test_example_configuration_is_valid_and_complete() -> None:
    from hostbusd.config import Config, load

    example = Path(__file__).parents[2] / "config" / "hostbus.toml"
    loaded = load(example)
    assert loaded == Config()  # every key shown at its default

    import tomllib

    data = tomllib.loads(example.read_text())

    def keys(model: type, prefix: str = "") -> set[str]:
        out = set()
        for name, field in model.model_fields.items():  # type: ignore[attr-defined]
            ann = field.annotation
            item = getattr(ann, "__args__", (None,))[0] if getattr(ann, "__origin__", None) is list else None
            if isinstance(ann, type) and hasattr(ann, "model_fields"):
                out |= keys(ann, f"{prefix}{name}.")
            elif isinstance(item, type) and hasattr(item, "model_fields"):  # an array of tables
                assert f"[[{prefix}{name}]]" in example.read_text(), f"no [[{prefix}{name}]] example"
                out |= keys(item, f"{prefix}{name}[].")
            else:
                out.add(prefix + name)
        return out

    def present(d: dict[str, object], prefix: str = "") -> set[str]:
        out = set()
        for k, v in d.items():
            out |= present(v, f"{prefix}{k}.") if isinstance(v, dict) else {prefix + k}
        return out

    text = example.read_text()
    commented = {line.lstrip("# ").split(" =")[0] for line in text.splitlines() if " = " in line}
    missing = {k for k in keys(Config) if k not in present(data) and k.split(".")[-1] not in commented}
    assert not missing, f"keys not in config/hostbus.toml: {missing}"


def test_schema_file_is_current() -> None:
    from hostbusd.config import json_schema

    path = Path(__file__).parents[2] / "config" / "hostbus.schema.json"
    assert json.loads(path.read_text()) == json_schema(), "stale: run `make schema`"


def test_help_texts_describe_the_flags() -> None:
    r = run_daemon("--help")
    for flag in ("--config", "--runtime-dir", "--state-dir", "--log-format", "--log-level", "--check-config"):
        assert flag in r.stdout


def test_clients_connected_during_stop_get_a_clear_error(daemon: Daemon) -> None:
    bus = daemon.connect()
    errors: list[BaseException] = []

    def wait_for_stop() -> None:
        sub = bus.subscribe("never")
        try:
            sub.next(timeout=20)
        except BaseException as exc:
            errors.append(exc)

    t = threading.Thread(target=wait_for_stop)
    t.start()
    bus.flush()
    daemon.stop()
    t.join(20)
    assert len(errors) == 1 and isinstance(errors[0], hostbus.ShuttingDownError)
    with pytest.raises(hostbus.ConnectionLostError):
        bus.publish("x", b"")
    bus.close()


def test_nothing_is_left_after_stop(daemon: Daemon) -> None:
    with daemon.connect() as bus:
        bus.subscribe("x")
    assert daemon.stop() == 0
    assert not daemon.runtime_dir.exists()  # it created the directory, so it removed it
    assert daemon.state_dir.is_dir()  # state stays
    assert not Path(f"/proc/{daemon.pid}").exists()
    r = subprocess.run(["pgrep", "-f", "--", f"--runtime-dir {daemon.runtime_dir}"], capture_output=True)
    assert r.returncode == 1, r  # no such process


def test_module_entry_point_version() -> None:
    r = subprocess.run([sys.executable, "-m", "hostbusd", "--version"], capture_output=True, text=True)
    assert r.stdout.strip().startswith("hostbusd ")


def test_config_refuses_a_runtime_dir_mode_others_could_write(workdir: Path) -> None:
    cfg = workdir / "c.toml"
    cfg.write_text("[socket]\ndir_mode = 0o770\n")
    r = run_daemon("--config", str(cfg), "--check-config")
    assert r.returncode == 2
    assert "socket.dir_mode = 504" in r.stderr and "0o770 lets group or others write" in r.stderr


def test_a_value_where_a_table_belongs_is_a_config_error_with_flags_too(workdir: Path) -> None:
    cfg = workdir / "c.toml"
    cfg.write_text("log = 5\n")
    r = run_daemon("--config", str(cfg), "--log-level", "debug", "--check-config")
    assert r.returncode == 2
    assert "log = 5: must be a table" in r.stderr


def test_an_idle_connection_costs_the_broker_little_memory(daemon: Daemon) -> None:
    """Regression: a read buffer held per connection once made each idle one cost 264 KB."""
    n = 200
    before = daemon.status()["VmRSS"]
    conns = []
    for i in range(n):
        raw = RawClient(daemon.socket)
        raw.send(wire.encode_sub(1, {"pattern": f"idle.{i}"}))
        assert raw.read_until(wire.FrameType.OK) is not None
        conns.append(raw)
    per_conn_kb = (daemon.status()["VmRSS"] - before) / n
    for raw in conns:
        raw.sock.shutdown(socket.SHUT_RDWR)
        raw.close()
    print(f"{per_conn_kb:.1f} KB per idle connection with a subscription")
    assert per_conn_kb < 40, f"{per_conn_kb:.1f} KB per idle connection"
