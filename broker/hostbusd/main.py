"""hostbusd's entry point: arguments, configuration, directories, the socket, signals, the loop."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import errno
import json
import os
import resource
import signal
import socket
import stat
import sys
from pathlib import Path
from typing import Any

from hostbus import paths
from hostbusd import __version__, logs
from hostbusd.broker import Broker
from hostbusd.config import Config, ConfigError, FifoIngressConfig, FifoSinkConfig, json_schema, load
from hostbusd.errors import StartupError
from hostbusd.net.fifo import DEFAULT_FIFO, OpenedFifo, open_ingress, prepare_fifo

EXIT_OK = 0
EXIT_STARTUP = 1  # could not start: another daemon, unusable directory, ...
EXIT_CONFIG = 2  # invalid configuration or arguments
EXIT_INTERNAL = 70  # a bug (EX_SOFTWARE): logged; systemd restarts the daemon


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hostbusd",
        description="The hostbus message broker daemon. Serves the Unix socket <runtime-dir>/hostbus.sock "
        "in the foreground until SIGTERM or SIGINT, then delivers what is queued and exits 0.",
        epilog="Exit status: 0 stopped normally, 1 could not start, 2 invalid configuration, "
        "70 internal error.",
    )
    p.add_argument("--config", type=Path, metavar="FILE",
                   help="TOML configuration file (default: none, built-in defaults; see config/hostbus.toml)")
    p.add_argument("--runtime-dir", metavar="DIR",
                   help="directory of the socket (default: /run/hostbus for root, else "
                   "$XDG_RUNTIME_DIR/hostbus, else /tmp/hostbus-<uid>)")
    p.add_argument("--state-dir", metavar="DIR",
                   help="directory of stored state (default: /var/lib/hostbus for root, else "
                   "$XDG_STATE_HOME/hostbus, else ~/.local/state/hostbus)")
    p.add_argument("--log-format", choices=["auto", "console", "json"],
                   help="console lines, JSON lines, or auto: console on a terminal, JSON otherwise")
    p.add_argument("--log-level", choices=["debug", "info", "warning", "error"], help="lowest level logged")
    p.add_argument("--check-config", action="store_true",
                   help="validate the configuration, print the effective one as JSON, and exit")
    p.add_argument("--print-schema", action="store_true",
                   help="print the JSON schema of the configuration file and exit")
    p.add_argument("--version", action="version", version=f"hostbusd {__version__}")
    return p


def overrides_from(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if args.runtime_dir:
        out["runtime_dir"] = args.runtime_dir
    if args.state_dir:
        out["state_dir"] = args.state_dir
    if args.log_format:
        out["log.format"] = args.log_format
    if args.log_level:
        out["log.level"] = args.log_level
    return out


def prepare_dir(path: Path, mode: int) -> bool:
    """Create ``path`` with ``mode`` if missing (True if created); refuse one others could tamper with."""
    uid = os.getuid()
    created = False
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            os.mkdir(path, mode)
            os.chmod(path, mode)  # the umask may have narrowed it; nothing is inside yet
            created = True
        except FileExistsError:
            pass
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise StartupError(f"{path} exists and is not a directory (a symlink is refused too)")
    if st.st_uid != uid:
        raise StartupError(f"{path} belongs to uid {st.st_uid}, not to this daemon's uid {uid}; "
                           "remove it or choose another directory")
    if st.st_mode & 0o022:
        raise StartupError(f"{path} is writable by group or others (mode {stat.S_IMODE(st.st_mode):o}); "
                           "others could replace the socket: chmod go-w it or choose another directory")
    return created


def bind_socket(path: Path, mode: int) -> socket.socket:
    """Bind a listening socket at ``path`` with ``mode``, replacing a stale one."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        pass
    else:
        if not stat.S_ISSOCK(st.st_mode):
            raise StartupError(f"{path} exists and is not a socket; remove it or choose another runtime dir")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(1.0)
        try:
            probe.connect(str(path))
        except (ConnectionRefusedError, FileNotFoundError):
            os.unlink(path)  # stale: nobody listens on it
        except OSError as exc:
            raise StartupError(f"cannot tell whether {path} is in use: {exc.strerror}") from None
        else:
            raise StartupError(f"another hostbusd is already serving {path}; stop it first, or start this "
                               "one with another --runtime-dir")
        finally:
            probe.close()
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    old = os.umask(0o777 & ~mode)  # the socket is born with its mode: no window, no chmod
    try:
        sock.bind(str(path))
    except OSError as exc:
        sock.close()
        raise StartupError(f"cannot bind {path}: {exc.strerror}") from None
    finally:
        os.umask(old)
    sock.listen(socket.SOMAXCONN)
    sock.setblocking(False)
    return sock


def ensure_fd_limit(max_connections: int, log: Any) -> None:
    """Raise the soft RLIMIT_NOFILE towards the hard one so max_connections can be served."""
    needed = max_connections + 64  # listeners, logs, and room for later transports
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != resource.RLIM_INFINITY and soft < needed:
        target = needed if hard == resource.RLIM_INFINITY else min(needed, hard)
        with contextlib.suppress(ValueError, OSError):
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    if soft != resource.RLIM_INFINITY and soft < needed:
        log.warning("fd_limit_low", rlimit_nofile=soft, max_connections=max_connections,
                    detail="past the file descriptor limit, new connections are accepted and closed at "
                    "once with no error frame; lower limits.max_connections or raise LimitNOFILE")


def resolve_dirs(config: Config) -> tuple[Path, Path]:
    runtime = Path(config.runtime_dir) if config.runtime_dir else paths.default_runtime_dir()
    state = Path(config.state_dir) if config.state_dir else paths.default_state_dir()
    return runtime.absolute(), state.absolute()


_early_signals: list[int] = []


def _catch_early_signals() -> None:
    """Until the event loop takes over, remember SIGTERM/SIGINT instead of dying uncleanly."""
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda signum, frame: _early_signals.append(signum))
    signal.signal(signal.SIGHUP, signal.SIG_IGN)


async def serve(config: Config, sock: socket.socket, sock_path: Path, fifos: list[OpenedFifo], log: Any) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    status = {"code": EXIT_OK}
    peer_log = logs.RateLimitedLog(config.log.peer_error_interval)

    def internal_error(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        log.error("internal_error", message=context.get("message"), exc_info=exc)
        status["code"] = EXIT_INTERNAL
        stop.set()

    loop.set_exception_handler(internal_error)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, lambda: log.warning(
        "reload_unsupported", detail="this version does not reload; the configuration is unchanged"))
    if _early_signals:
        stop.set()
    broker = Broker(config, [sock], fifos, on_peer_error=peer_log.warning)
    runner = asyncio.ensure_future(broker.run(stop))
    await asyncio.sleep(0)
    log.info("started", socket=str(sock_path), fifos=[str(f.path) for f in fifos], pid=os.getpid(),
             version=__version__)
    await runner
    st = broker.stats()
    log.info("stopped", messages_in=st["messages"]["in"], messages_out=st["messages"]["out"],
             dropped=st["messages"]["dropped"], connections_total=st["connections_total"])
    return status["code"]


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.print_schema:
        print(json.dumps(json_schema(), indent=2))
        return EXIT_OK
    try:
        config = load(args.config, overrides_from(args))
    except ConfigError as exc:
        print(f"hostbusd: invalid configuration: {exc}", file=sys.stderr)
        return EXIT_CONFIG
    if args.check_config:
        print(config.model_dump_json(indent=2))
        print("hostbusd: configuration OK", file=sys.stderr)
        return EXIT_OK
    logs.configure(config.log.format, config.log.level)
    log = logs.get_logger()
    root = os.getuid() == 0
    dir_mode = config.socket.dir_mode if config.socket.dir_mode is not None else (0o755 if root else 0o700)
    sock_mode = config.socket.mode if config.socket.mode is not None else (0o666 if root else 0o600)
    runtime_dir, state_dir = resolve_dirs(config)
    sock_path = runtime_dir / paths.SOCKET_NAME
    _catch_early_signals()
    ensure_fd_limit(config.limits.max_connections, log)
    owned: list[tuple[Path, int]] = []  # files this run made or took over: (path, inode), removed at exit
    created_runtime_dir = False
    fifos: list[OpenedFifo] = []
    try:
        try:
            created_runtime_dir = prepare_dir(runtime_dir, dir_mode)
            prepare_dir(state_dir, 0o700)
            sock = bind_socket(sock_path, sock_mode)
            owned.append((sock_path, os.stat(sock_path).st_ino))
            fifos = open_fifos(config, runtime_dir, owned)
        except StartupError as exc:
            log.error("cannot_start", reason=str(exc))
            return EXIT_STARTUP
        except OSError as exc:
            log.error("cannot_start", reason=f"{exc.filename}: {exc.strerror}")
            return EXIT_STARTUP
        try:
            import uvloop  # noqa: PLC0415 - only the running daemon needs it

            return uvloop.run(serve(config, sock, sock_path, fifos, log))
        finally:
            sock.close()
    finally:
        for f in fifos:
            if f.fd is not None:
                with contextlib.suppress(OSError):
                    os.close(f.fd)
        for path, inode in owned:
            try:
                if os.lstat(path).st_ino == inode:
                    os.unlink(path)
            except OSError as exc:
                if exc.errno != errno.ENOENT:
                    log.warning("cannot_remove", path=str(path), error=exc.strerror)
        if created_runtime_dir:
            with contextlib.suppress(OSError):  # only if empty: never remove what others put there
                runtime_dir.rmdir()


def open_fifos(config: Config, runtime_dir: Path, owned: list[tuple[Path, int]]) -> list[OpenedFifo]:
    """Create or check every configured FIFO and open the publish ones (reading starts later)."""
    cfg = config.fifo
    plan: list[tuple[Path, FifoIngressConfig | FifoSinkConfig]] = []
    if cfg.default_ingress:
        plan.append((runtime_dir / DEFAULT_FIFO, FifoIngressConfig(path=DEFAULT_FIFO)))
    specs: list[FifoIngressConfig | FifoSinkConfig] = [*cfg.ingress, *cfg.sink]
    plan += [(runtime_dir / spec.path, spec) for spec in specs]  # an absolute path stays as it is
    seen: set[Path] = set()
    opened: list[OpenedFifo] = []
    for path, spec in plan:
        if path in seen or path == runtime_dir / paths.SOCKET_NAME:
            raise StartupError(f"FIFO path {path} is used twice in the configuration")
        seen.add(path)
        prepare_fifo(path, spec.mode, spec.group)
        owned.append((path, os.lstat(path).st_ino))
        fd = open_ingress(path, cfg.pipe_bytes) if isinstance(spec, FifoIngressConfig) else None
        opened.append(OpenedFifo(path, fd, spec))
    return opened

if __name__ == "__main__":
    sys.exit(main())
