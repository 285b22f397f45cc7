"""``hostbus bench``: measure the running broker from this machine's point of view.

Two phases against the broker the client would use anyway (``--socket``, ``$HOSTBUS_SOCKET``,
or the default), each role in a process of its own:

1. **throughput**: ``--subscribers`` processes subscribe to a topic of their own, then
   ``--publishers`` processes publish ``--count`` messages of ``--size`` bytes in all; the
   publish rate is measured at the publishers, the delivery rate at the subscribers (from each
   one's first to its last message), and losses are counted;
2. **latency**: a responder answers requests; one client sends ``--requests`` requests one at
   a time and records each round trip (p50, p99, p99.9, max).

A progress bar goes to stderr while it runs (on a terminal); the summary table (or ``--json``) to stdout. The
topics are ``hostbus-bench.<pid>.*``: under access rules the caller needs publish and subscribe
rights there.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from typing import Any

from hostbus.client import connect
from hostbus.errors import HostbusError


def add_parser(sub: Any) -> None:
    b = sub.add_parser("bench", help="measure the running broker",
                       description="Measure the running broker: publish and delivery rates (publishers and "
                       "subscribers in processes of their own), then request/reply round trips. Topics used: "
                       "hostbus-bench.<pid>.* (under access rules you need publish and subscribe rights there).")
    b.add_argument("--size", type=int, default=64, metavar="B", help="payload bytes per message (default 64)")
    b.add_argument("--count", type=int, default=200_000, metavar="N", help="messages in all (default 200000)")
    b.add_argument("--publishers", type=int, default=1, metavar="P", help="publishing processes (default 1)")
    b.add_argument("--subscribers", type=int, default=1, metavar="S", help="subscribing processes (default 1)")
    b.add_argument("--requests", type=int, default=2000, metavar="R", help="round trips measured (default 2000)")
    b.add_argument("--json", action="store_true", help="print the results as JSON")


def _subscriber(sock: str, topic: str, count: int, ready: Any, progress: Any, result: Any) -> None:
    try:
        bus = connect(sock, name="bench-sub")
        sub = bus.subscribe(topic, pending_limit=count + 1, max_msgs=count + 1)
        ready.release()
        first = sub.next(timeout=60)
        t0 = time.perf_counter()
        n, nbytes = 1, len(first.data)
        while n + sub.missed < count:
            try:
                m = sub.next(timeout=5)
            except HostbusError:
                break
            n += 1
            nbytes += len(m.data)
            if n % 1000 == 0:
                with progress.get_lock():
                    progress.value += 1000
        dt = time.perf_counter() - t0
        result.put({"received": n, "missed": sub.missed, "seconds": dt, "bytes": nbytes})
        bus.close()
    except HostbusError as exc:
        result.put({"error": str(exc)})


def _publisher(sock: str, topic: str, count: int, size: int, result: Any) -> None:
    try:
        bus = connect(sock, name="bench-pub")
        payload = os.urandom(size)
        publish = bus.publish
        t0 = time.perf_counter()
        for _ in range(count):
            publish(topic, payload)
        bus.flush(timeout=300)
        result.put({"published": count, "seconds": time.perf_counter() - t0})
        bus.close()
    except HostbusError as exc:
        result.put({"error": str(exc)})


def _responder(sock: str, topic: str, ready: Any, stop: Any) -> None:
    bus = connect(sock, name="bench-echo")
    sub = bus.subscribe(topic)
    ready.release()
    while not stop.is_set():
        try:
            msg = sub.next(timeout=0.2)
        except HostbusError:
            continue
        msg.respond(msg.data)
    bus.close()


def _bar(done: int, total: int, label: str) -> None:
    if not sys.stderr.isatty():  # a progress bar is for a terminal, not for a log
        return
    width = 30
    filled = int(width * min(done, total) / max(total, 1))
    sys.stderr.write(f"\r{label} [{'#' * filled}{'.' * (width - filled)}] {min(done, total):,}/{total:,}")
    sys.stderr.flush()


def run(args: argparse.Namespace, sock: str) -> int:
    import multiprocessing as mp  # noqa: PLC0415 - only the bench needs it (importing it touches sys.modules)

    if min(args.count, args.publishers, args.subscribers, args.requests) < 1 or args.size < 0:
        print("hostbus: --count, --publishers, --subscribers and --requests must be at least 1, --size at least 0",
              file=sys.stderr)
        return 2
    ctx = mp.get_context("spawn")
    base = f"hostbus-bench.{os.getpid()}"
    topic = f"{base}.data"
    total = args.count
    per_pub = [total // args.publishers + (1 if i < total % args.publishers else 0) for i in range(args.publishers)]
    progress = ctx.Value("q", 0)
    ready = ctx.Semaphore(0)
    subq, pubq = ctx.Queue(), ctx.Queue()
    subs = [ctx.Process(target=_subscriber, args=(sock, topic, total, ready, progress, subq))
            for _ in range(args.subscribers)]
    for p in subs:
        p.start()
    for _ in subs:
        if not ready.acquire(timeout=30):
            print("hostbus: the subscribers did not subscribe within 30 s", file=sys.stderr)
            for p in subs:
                p.kill()
            return 1
    pubs = [ctx.Process(target=_publisher, args=(sock, topic, n, args.size, pubq)) for n in per_pub]
    for p in pubs:
        p.start()
    expected = total * args.subscribers
    while any(p.is_alive() for p in subs):
        _bar(progress.value, expected, "throughput")
        time.sleep(0.1)
    _bar(expected, expected, "throughput")
    if sys.stderr.isatty():
        sys.stderr.write("\n")
    pub_res = [pubq.get(timeout=60) for _ in pubs]
    sub_res = [subq.get(timeout=60) for _ in subs]
    for p in (*pubs, *subs):
        p.join(10)
    errors = [r["error"] for r in (*pub_res, *sub_res) if "error" in r]
    if errors:
        print(f"hostbus: {errors[0]}", file=sys.stderr)
        return 1

    # Latency: one request at a time.
    echo = f"{base}.echo"
    stop = ctx.Event()
    responder = ctx.Process(target=_responder, args=(sock, echo, ready, stop))
    responder.start()
    ready.acquire(timeout=30)
    rtts = []
    payload = os.urandom(args.size)
    with connect(sock, name="bench-req") as bus:
        for i in range(args.requests):
            t0 = time.perf_counter()
            bus.request(echo, payload, timeout=5)
            rtts.append((time.perf_counter() - t0) * 1e6)
            if i % 100 == 0:
                _bar(i, args.requests, "latency   ")
    _bar(args.requests, args.requests, "latency   ")
    if sys.stderr.isatty():
        sys.stderr.write("\n")
    stop.set()
    responder.join(5)
    rtts.sort()

    def pct(q: float) -> float:
        return rtts[min(len(rtts) - 1, int(q * len(rtts)))]

    received = sum(r["received"] for r in sub_res)
    results = {
        "size": args.size, "count": total, "publishers": args.publishers, "subscribers": args.subscribers,
        "publish_msgs_per_s": total / max(r["seconds"] for r in pub_res),
        "delivery_msgs_per_s": sum(r["received"] / r["seconds"] for r in sub_res if r["seconds"] > 0),
        "delivery_mb_per_s": sum(r["bytes"] / r["seconds"] for r in sub_res if r["seconds"] > 0) / 1e6,
        "lost": expected - received,
        "rtt_us": {"p50": pct(0.5), "p99": pct(0.99), "p99.9": pct(0.999), "max": rtts[-1],
                   "mean": statistics.fmean(rtts)},
        "requests": args.requests,
    }
    if args.json:
        print(json.dumps(results, indent=2))
        return 0
    r = results["rtt_us"]
    rows = [
        ("messages", f"{total:,} x {args.size} B, {args.publishers} publisher(s) -> {args.subscribers} subscriber(s)"),
        ("publish", f"{results['publish_msgs_per_s']:,.0f} msg/s"),
        ("delivery", f"{results['delivery_msgs_per_s']:,.0f} msg/s ({results['delivery_mb_per_s']:,.1f} MB/s) in all"),
        ("lost", f"{results['lost']:,}"),
        ("round trip", f"p50 {r['p50']:,.0f} us, p99 {r['p99']:,.0f} us, p99.9 {r['p99.9']:,.0f} us, "
                       f"max {r['max']:,.0f} us ({args.requests:,} requests)"),
    ]
    for key, value in rows:
        print(f"{key:<12}{value}")
    return 0 if results["lost"] == 0 else 1
