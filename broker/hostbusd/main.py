"""hostbusd's entry point: arguments, configuration, directories, the socket, signals, the loop."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import errno
import gc
import json
import os
import resource
import signal
import socket
import stat
import sys
import time
from pathlib import Path
from typing import Any

from hostbus import paths
from hostbus._heap import keep_freed_buffers
from hostbusd import __version__, logs, systemd
from hostbusd.broker import Broker
from hostbusd.config import Config, ConfigError, FifoIngressConfig, FifoSinkConfig, json_schema, load
from hostbusd.errors import StartupError
from hostbusd.net.creds import unknown_names
from hostbusd.net.fifo import DEFAULT_FIFO, OpenedFifo, open_ingress, prepare_fifo
from hostbusd.net.ring import sweep_stale
from hostbusd.ownership import lookup_gid

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
    p.add_argument("--log-format", choices=["auto", "console", "json", "journal"],
                   help="console lines, JSON lines, journal (JSON with a <priority> prefix), or auto: journal when "
                   "stderr is the journal, console on a terminal, JSON otherwise")
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


def prepare_dir(path: Path, mode: int, gid: int = -1, group: str = "") -> bool:
    """Create ``path`` with ``mode`` (and group ``gid``) if missing (True if created); refuse one
    others could tamper with, or one whose group is not ``gid``.

    A new directory is made owner-only, given its group, and only then its mode: while it is
    empty, so nothing inside is ever reachable by more users than configured.
    """
    uid = os.getuid()
    created = False
    if not path.exists():
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            os.mkdir(path, 0o700)
            created = True
        except FileExistsError:
            pass
        except OSError as exc:
            raise StartupError(f"cannot create {path}: {exc.strerror}") from None
        if created:
            try:
                if gid != -1:
                    os.chown(path, -1, gid)
                os.chmod(path, mode)  # the umask may have narrowed it; nothing is inside yet
            except OSError as exc:
                with contextlib.suppress(OSError):
                    os.rmdir(path)  # not left half-made: the next start would refuse its group
                raise StartupError(f"cannot give {path} the group socket.group = {group!r}: {exc.strerror} (the "
                                   "daemon's user must be a member of that group)") from None
    st = os.lstat(path)
    if not stat.S_ISDIR(st.st_mode):
        raise StartupError(f"{path} exists and is not a directory (a symlink is refused too)")
    if st.st_uid != uid:
        raise StartupError(f"{path} belongs to uid {st.st_uid}, not to this daemon's uid {uid}; "
                           "remove it or choose another directory")
    if gid not in (-1, st.st_gid):
        raise StartupError(f"{path} exists with group {st.st_gid}, not socket.group's {gid}; the daemon never "
                           f"changes who may enter an existing directory: chgrp it, or remove it")
    if st.st_mode & 0o022:
        raise StartupError(f"{path} is writable by group or others (mode {stat.S_IMODE(st.st_mode):o}); "
                           "others could replace the socket: chmod go-w it or choose another directory")
    return created


def bind_socket(path: Path, mode: int, gid: int = -1, group: str = "") -> socket.socket:
    """Bind a listening socket at ``path`` with ``mode`` (and group ``gid``), replacing a stale one.

    With a group, the socket is bound owner-only under a temporary name, given its group and
    mode, and linked into place (which, like bind, fails if something took the path meanwhile):
    at its path it has its final group and mode from the start.
    """
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
    where = path if gid == -1 else path.with_name(f".{path.name}.{os.getpid()}.new")
    old = os.umask(0o777 & ~mode if gid == -1 else 0o177)  # born with its mode (or owner-only): no window
    step = "bind"
    try:
        sock.bind(str(where))
        if gid != -1:
            step = "group"
            os.chown(where, -1, gid)
            os.chmod(where, mode)
            step = "link"
            os.link(where, path)
    except OSError as exc:
        sock.close()
        if step == "group":
            message = (f"cannot give {path} the group socket.group = {group!r}: {exc.strerror} (the daemon's "
                       "user must be a member of that group)")
        elif step == "link" and exc.errno == errno.EEXIST:
            message = f"{path} appeared while this daemon was binding it: another hostbusd is starting there"
        else:
            message = f"cannot bind {path}: {exc.strerror}"
        raise StartupError(message) from None
    finally:
        os.umask(old)
        if where != path:
            with contextlib.suppress(OSError):
                os.unlink(where)
    sock.listen(socket.SOMAXCONN)
    sock.setblocking(False)
    return sock


def warn_unknown_names(config: Config, log: Any) -> None:
    """Say which rule entries name a user or group this host does not have (they match nobody)."""
    entries = [e for rule in config.acl for lst in (rule.publish, rule.subscribe, rule.manage) for e in lst or ()]
    unknown = unknown_names(entries)
    if unknown:
        log.warning("acl_unknown_names", entries=sorted(set(unknown)),
                    detail="no such user or group on this host: these entries match nobody")


def reachable_by_others(runtime_dir: Path, sock_path: Path) -> bool:
    """True if users other than the daemon's may connect (a shared instance, like the system one):
    the directory lets its group or others in and the socket lets the same class write."""
    try:
        d = os.stat(runtime_dir).st_mode
        s = os.stat(sock_path).st_mode
    except OSError:
        return True  # cannot tell: assume shared (access.default then denies)
    return bool((d & 0o010 and s & 0o020) or (d & 0o001 and s & 0o002))


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
    """Until the event loop takes over, remember SIGTERM/SIGINT/SIGHUP instead of dying uncleanly."""
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, lambda signum, frame: _early_signals.append(signum))


FifoSpec = FifoIngressConfig | FifoSinkConfig


class Runtime:
    """What the outer layer owns for the daemon's life: files, passed descriptors, systemd."""

    def __init__(self, args: argparse.Namespace, config: Config, log: Any, notifier: systemd.Notifier) -> None:
        self.args = args
        self.config = config
        self.log = log
        self.notifier = notifier
        self.runtime_dir, self.state_dir = resolve_dirs(config)
        self.sock_path = self.runtime_dir / paths.SOCKET_NAME
        self.owned: list[tuple[Path, int]] = []  # files this run made or took over: removed at exit
        self.created_runtime_dir = False
        self.passed_fifos: dict[tuple[int, int], int] = {}  # (dev, inode) -> fd, from socket activation
        self.systemd_fifos: dict[Path, int] = {}  # passed FIFOs matched to a path: kept open, never removed
        self.fifo_specs: dict[Path, FifoSpec] = {}
        self.fifo_fds: list[int] = []  # opened, not yet handed to the broker
        self.stopping = False
        self.zmq_endpoints: tuple[str, str] | None = None

    # ---- descriptors from systemd ------------------------------------------------------------------

    def adopt(self, passed: list[tuple[int, str]]) -> list[socket.socket]:
        """Sort passed descriptors: the configured socket, FIFOs (matched later), or a refusal."""
        listeners = []
        for fd, name in passed:
            label = f"descriptor {fd}" + (f" ({name})" if name else "")
            st = os.fstat(fd)
            if stat.S_ISSOCK(st.st_mode):
                sock = socket.socket(fileno=fd)
                where = sock.getsockname()
                if sock.family != socket.AF_UNIX or sock.type != socket.SOCK_STREAM or where != str(self.sock_path):
                    raise StartupError(f"passed {label} is the socket {where!r}, but the configured socket is "
                                       f"{self.sock_path}: make ListenStream= and --runtime-dir agree")
                if not sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN):
                    raise StartupError(f"passed {label} is not a listening socket")
                sock.setblocking(False)
                listeners.append(sock)
            elif stat.S_ISFIFO(st.st_mode):
                self.passed_fifos[(st.st_dev, st.st_ino)] = fd
            else:
                raise StartupError(f"passed {label} is neither a listening socket nor a FIFO")
        if len(listeners) > 1:
            raise StartupError("more than one listening socket was passed; hostbusd serves one")
        return listeners

    def plan_zmq(self) -> None:
        """The gateway's endpoints (defaults in the runtime directory), checked against the rules."""
        cfg = self.config.zmq
        if not cfg.enabled:
            return
        from hostbusd.net.zmq_gateway import check_endpoint  # noqa: PLC0415 - pyzmq only when the gateway is on

        xsub = cfg.xsub or f"ipc://{self.runtime_dir / 'zmq-publish.ipc'}"
        xpub = cfg.xpub or f"ipc://{self.runtime_dir / 'zmq-subscribe.ipc'}"
        for endpoint in (xsub, xpub):
            if check_endpoint(endpoint, cfg.allow_remote):
                self.log.warning("zmq_remote_endpoint", endpoint=endpoint,
                                 detail="peers on other hosts can publish and subscribe without identity")
        self.zmq_endpoints = (xsub, xpub)

    # ---- FIFOs ------------------------------------------------------------------------------------------

    def fifo_plan(self, config: Config) -> dict[Path, FifoSpec]:
        cfg = config.fifo
        plan: dict[Path, FifoSpec] = {}
        specs: list[FifoSpec] = [*cfg.ingress, *cfg.sink]
        if cfg.default_ingress:
            specs.insert(0, FifoIngressConfig(path=DEFAULT_FIFO))
        for spec in specs:
            path = Path(os.path.normpath(self.runtime_dir / spec.path))  # an absolute path stays as it is
            if path in plan or path == self.sock_path:
                raise StartupError(f"FIFO path {path} is used twice in the configuration")
            plan[path] = spec
        return plan

    def open_fifo(self, path: Path, spec: FifoSpec) -> OpenedFifo:
        """A FIFO systemd passed for this path, else create or check it.

        systemd's FIFOs are remembered for the process's life and handed out as duplicates, so a
        reload that changes one reopens the same pipe and never chmods or removes it. A FIFO this
        process creates, or finds in its own runtime directory, is its own: removed at exit.
        """
        with contextlib.suppress(FileNotFoundError):
            st = os.stat(path)
            fd = self.passed_fifos.pop((st.st_dev, st.st_ino), None)
            if fd is not None:
                self.systemd_fifos[path] = fd
            if path in self.systemd_fifos:
                if isinstance(spec, FifoSinkConfig):
                    raise StartupError(f"{path} was passed in by systemd (ListenFIFO=), which holds it open for "
                                       "reading: it cannot be a sink (a sink must see when nobody reads)")
                dup = os.dup(self.systemd_fifos[path])
                os.set_blocking(dup, False)
                self.fifo_fds.append(dup)
                return OpenedFifo(path, dup, spec)
        created = prepare_fifo(path, spec.mode, spec.group)
        if created or path.parent == self.runtime_dir:
            entry = (path, os.lstat(path).st_ino)
            if entry not in self.owned:
                self.owned.append(entry)
        if isinstance(spec, FifoSinkConfig):
            return OpenedFifo(path, None, spec)
        fd = open_ingress(path, self.config.fifo.pipe_bytes)
        self.fifo_fds.append(fd)
        return OpenedFifo(path, fd, spec)

    def open_all(self, plan: dict[Path, FifoSpec]) -> list[OpenedFifo]:
        """Open every FIFO of ``plan``; refuse two paths that are the same file (a sink feeding an
        ingress would loop for ever)."""
        opened: list[OpenedFifo] = []
        inodes: dict[tuple[int, int], Path] = {}
        try:
            for path, spec in plan.items():
                f = self.open_fifo(path, spec)
                opened.append(f)
                st = os.stat(path)
                other = inodes.setdefault((st.st_dev, st.st_ino), path)
                if other != path:
                    raise StartupError(f"FIFO paths {other} and {path} are the same file")
        except BaseException:
            self.close_unused(opened)
            raise
        return opened

    def close_unused(self, opened: list[OpenedFifo]) -> None:
        for f in opened:
            if f.fd is not None:
                with contextlib.suppress(OSError):
                    os.close(f.fd)
                if f.fd in self.fifo_fds:
                    self.fifo_fds.remove(f.fd)
                f.fd = None

    def open_fifos(self) -> list[OpenedFifo]:
        self.fifo_specs = self.fifo_plan(self.config)
        opened = self.open_all(self.fifo_specs)
        if self.passed_fifos:
            raise StartupError(f"{len(self.passed_fifos)} passed FIFO(s) match no configured FIFO: make "
                               "ListenFIFO= and the [fifo] configuration agree")
        return opened

    def forget(self, path: Path) -> None:
        """Remove a FIFO this run owns (it left the configuration, or changed)."""
        for entry in [e for e in self.owned if e[0] == path]:
            self.owned.remove(entry)
            with contextlib.suppress(OSError):
                if os.lstat(path).st_ino == entry[1]:
                    os.unlink(path)

    # ---- reload -----------------------------------------------------------------------------------------

    def reload(self, broker: Broker, peer_log: logs.RateLimitedLog) -> None:
        """SIGHUP: re-read the configuration file; apply it, or keep the running one and say why."""
        if self.stopping:
            return  # too late: the broker is draining
        self.notifier.send(RELOADING=1, MONOTONIC_USEC=time.monotonic_ns() // 1000)
        try:
            config = load(self.args.config, overrides_from(self.args))
            plan = self.fifo_plan(config)
            self._apply(broker, config, plan, peer_log)
        except Exception as exc:
            reason = str(exc) if isinstance(exc, ConfigError | StartupError | OSError) else repr(exc)
            self.log.error("reload_failed", reason=reason, detail="the running configuration is kept")
            self.notifier.send(READY=1, STATUS=f"reload failed, running configuration kept: {reason}"[:500])
            return
        self.notifier.send(READY=1, STATUS=status_line(broker))

    def _apply(self, broker: Broker, config: Config, plan: dict[Path, FifoSpec],
               peer_log: logs.RateLimitedLog) -> None:
        changed = [p for p, spec in self.fifo_specs.items() if plan.get(p) != spec]
        # First everything that can fail, touching nothing that runs: new FIFOs, and sinks' checks.
        new = {p: spec for p, spec in plan.items() if p not in self.fifo_specs}
        for path, spec in plan.items():
            if isinstance(spec, FifoSinkConfig) and (path in new or path in changed):
                broker.check_sink(spec.subjects, config)
        # A changed FIFO of ours gets a new inode, made beside it now and renamed over it at commit:
        # writers that opened the old one (maybe under a wider mode) are cut off, and the path
        # never goes missing.
        fresh: dict[Path, Path] = {}
        try:
            for path in changed:
                if path in plan and path not in self.systemd_fifos:
                    tmp = path.with_name(f".{path.name}.reload-{os.getpid()}")
                    spec = plan[path]
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(tmp)
                    prepare_fifo(tmp, spec.mode, spec.group)
                    fresh[path] = tmp
            added = self.open_all(new) if new else []
        except BaseException:
            for path in new:  # nothing of this reload stays behind
                self.forget(path)
            for tmp in fresh.values():
                with contextlib.suppress(OSError):
                    os.unlink(tmp)
            raise
        # Then commit: settings first, so FIFOs started below read with the new ones.
        needs_restart = broker.reload(config)
        self.config = config
        peer_log.interval = config.log.peer_error_interval
        self.log.info("reloaded", fifos=[str(p) for p in plan], needs_restart=needs_restart)
        warn_unknown_names(config, self.log)
        logs.configure(config.log.format, config.log.level, journal=systemd.stderr_is_journal(os.environ))
        self.log = logs.get_logger()
        for path in changed:
            broker.remove_fifo(path)
            if path not in plan:
                if path not in self.systemd_fifos:
                    self.forget(path)
                continue
            if path in fresh:
                self.forget(path)
                os.rename(fresh[path], path)
                self.owned.append((path, os.lstat(path).st_ino))
            added.append(self.open_fifo(path, plan[path]))
        for f in added:
            broker.add_fifo(f)
        self.fifo_fds.clear()
        self.fifo_specs = plan


#: The cyclic garbage collector's thresholds while the daemon runs. Routing allocates a few
#: container objects per message, almost all freed at once by reference counting; at the
#: default (700) a collection ran every few hundred messages and cost ~8% of the message rate
#: (more with many subscriptions held). Cyclic garbage is rare here, and 100,000 objects of it
#: at most is a few MB.
GC_THRESHOLDS = (100_000, 50, 100)


def release_startup_memory() -> None:
    """Give the C heap that start-up used and freed (reading the configuration, building its
    models) back to the system: an idle daemon should cost what it holds, not what it once did.
    Then the thresholds of a message broker apply (GC_THRESHOLDS); a closed connection leaves
    no cycle behind (PeerCore.forget), so what it held is freed at once, not at a collection."""
    gc.collect()
    gc.set_threshold(*GC_THRESHOLDS)
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None).malloc_trim(0)  # glibc; elsewhere there is nothing to call
    # Freed large buffers are kept for reuse, not returned to the kernel one by one: without it
    # every large message paid page faults and zeroing for each of its buffers (~0.8 ms of
    # broker time per 1 MiB message, against ~0.3 ms). hostbus._heap says what it costs.
    keep_freed_buffers()


def status_line(broker: Broker) -> str:
    st = broker.stats()
    m = st["messages"]
    return (f"{st['connections']} connections, {st['subscriptions']} subscriptions, {m['in']} messages in, "
            f"{m['out']} out, {m['dropped']} dropped")


async def serve(rt: Runtime, listeners: list[socket.socket], fifos: list[OpenedFifo]) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    status = {"code": EXIT_OK}
    peer_log = logs.RateLimitedLog(rt.config.log.peer_error_interval)

    def internal_error(loop: asyncio.AbstractEventLoop, context: dict[str, Any]) -> None:
        exc = context.get("exception")
        rt.log.error("internal_error", message=context.get("message"), exc_info=exc)
        status["code"] = EXIT_INTERNAL
        stop.set()

    loop.set_exception_handler(internal_error)
    broker = Broker(rt.config, listeners, fifos, on_peer_error=peer_log.warning,
                    zmq_endpoints=rt.zmq_endpoints, zmq_mode=rt.config.zmq.mode,
                    system=reachable_by_others(rt.runtime_dir, rt.sock_path), state_dir=rt.state_dir, log=rt.log)
    rt.fifo_fds.clear()  # the broker owns them now
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, rt.reload, broker, peer_log)
    if signal.SIGINT in _early_signals or signal.SIGTERM in _early_signals:
        stop.set()
    await broker.start()
    if signal.SIGHUP in _early_signals:  # the file may have changed after it was read: read it again
        loop.call_soon(rt.reload, broker, peer_log)
    notifier = rt.notifier
    release_startup_memory()
    notifier.send(READY=1, STATUS=status_line(broker))
    warn_unknown_names(rt.config, rt.log)
    sweep_stale(rt.log)  # semaphores of an earlier hostbusd that died while a client was attaching
    rt.log.info("started", socket=str(rt.sock_path), fifos=[str(p) for p in rt.fifo_specs], pid=os.getpid(),
                version=__version__, socket_activated=rt.sock_path not in {p for p, _ in rt.owned})

    def tick() -> None:
        # From the event loop itself: if the loop is stuck, the pings stop and systemd acts.
        notifier.send(WATCHDOG=1, STATUS=status_line(broker))
        handles[0] = loop.call_later(interval, tick)

    interval = notifier.watchdog_interval or 5.0
    handles = [loop.call_later(0 if notifier.watchdog_interval else interval, tick)] if notifier.enabled else []
    try:
        await broker.serve_until(stop)
    finally:
        for h in handles:
            h.cancel()
    rt.stopping = True  # a SIGHUP from now on is ignored
    notifier.send(STOPPING=1, STATUS="stopping: delivering queued messages")
    await broker.shutdown()
    st = broker.stats()
    rt.log.info("stopped", messages_in=st["messages"]["in"], messages_out=st["messages"]["out"],
                dropped=st["messages"]["dropped"], connections_total=st["connections_total"])
    return status["code"]


def main(argv: list[str] | None = None) -> int:
    _catch_early_signals()  # from the first moment: a stop or reload request is kept, never fatal
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
    logs.configure(config.log.format, config.log.level, journal=systemd.stderr_is_journal(os.environ))
    rt = Runtime(args, config, logs.get_logger(), systemd.Notifier(os.environ))
    root = os.getuid() == 0
    dir_mode = config.socket.dir_mode if config.socket.dir_mode is not None else (0o755 if root else 0o700)
    sock_mode = config.socket.mode if config.socket.mode is not None else (0o666 if root else 0o600)
    ensure_fd_limit(config.limits.max_connections, rt.log)
    listeners: list[socket.socket] = []
    try:
        try:
            listeners = rt.adopt(systemd.listen_fds(os.environ))
            gid = lookup_gid(config.socket.group, "socket.group") if config.socket.group else -1
            group = config.socket.group or ""
            rt.created_runtime_dir = prepare_dir(rt.runtime_dir, dir_mode, gid, group)
            prepare_dir(rt.state_dir, 0o700)
            if not listeners:
                listeners = [bind_socket(rt.sock_path, sock_mode, gid, group)]
                rt.owned.append((rt.sock_path, os.stat(rt.sock_path).st_ino))
            fifos = rt.open_fifos()
            rt.plan_zmq()
        except StartupError as exc:
            rt.log.error("cannot_start", reason=str(exc))
            return EXIT_STARTUP
        except OSError as exc:
            rt.log.error("cannot_start", reason=f"{exc.filename}: {exc.strerror}")
            return EXIT_STARTUP
        import uvloop  # noqa: PLC0415 - only the running daemon needs it

        try:
            return uvloop.run(serve(rt, listeners, fifos))
        except StartupError as exc:  # an endpoint that could only be opened inside the loop
            rt.log.error("cannot_start", reason=str(exc))
            return EXIT_STARTUP
    finally:
        for sock in listeners:
            sock.close()
        for fd in [*rt.fifo_fds, *rt.passed_fifos.values(), *rt.systemd_fifos.values()]:
            with contextlib.suppress(OSError):
                os.close(fd)
        for path, inode in rt.owned:
            try:
                if os.lstat(path).st_ino == inode:
                    os.unlink(path)
            except OSError as exc:
                if exc.errno != errno.ENOENT:
                    rt.log.warning("cannot_remove", path=str(path), error=exc.strerror)
        if rt.created_runtime_dir:
            with contextlib.suppress(OSError):  # only if empty: never remove what others put there
                rt.runtime_dir.rmdir()
        rt.notifier.close()


if __name__ == "__main__":
    sys.exit(main())
