"""Benchmark: shared-memory rings against the socket path, in the same run.

Two shapes, each measured at the subscriber from its first to its last message, publisher and
subscriber in processes of their own, against one hostbusd started for the run (the CPU time
each of the three spent per message is reported with the rate):

* 64-byte messages, 1 publisher -> 1 subscriber: published through a publish ring (the
  subscriber on the socket) vs. published over the socket;
* 1 MiB messages: rings at both ends (publish ring, deliver ring) vs. the socket at both ends.

    .venv/bin/python bench/shm_rings.py [--count N] [--big-count N] [--repeats R] [--json]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

import hostbus
from pubsub_1to1 import peak_rss_kb, start_daemon, stop_daemon

MiB = 1024 * 1024


def subscriber(sock: str, via: str, count: int, size: int, ready: Any, result: Any) -> None:
    bus = hostbus.connect(sock, name="bench-sub")
    # Broker-side queues that hold the whole run, so a publisher that runs ahead loses nothing.
    kw: dict[str, Any] = {"pending_limit": count + 1, "max_msgs": count + 1, "max_bytes": 512 * MiB}
    if via == "shm":
        kw.update(via="shm", ring_slots=64 if size < 4096 else 8, ring_slot_size=256 * 1024 if size < 4096 else 4 * MiB)
    sub = bus.subscribe("bench.x", **kw)
    ready.set()
    sub.next(timeout=60)
    t0 = time.perf_counter()
    cpu0 = time.process_time()
    n = 1
    nbytes = size
    while n + sub.missed < count:
        try:
            m = sub.next(timeout=5)
        except hostbus.TimeoutError:
            break
        n += 1
        nbytes += len(m.data)
    dt = time.perf_counter() - t0
    result.put({"received": n, "missed": sub.missed, "seconds": dt, "bytes": nbytes,
                "cpu": time.process_time() - cpu0})
    bus.close()


def publisher(sock: str, via: str, count: int, size: int, result: Any) -> None:
    bus = hostbus.connect(sock, name="bench-pub")
    payload = os.urandom(size)
    t0 = time.perf_counter()
    cpu0 = time.process_time()
    if via == "shm":
        pub = bus.shm_publisher(slots=64 if size < 4096 else 8, slot_size=256 * 1024 if size < 4096 else 4 * MiB)
        publish = pub.publish
        for _ in range(count):
            publish("bench.x", payload)
        pub.flush(timeout=120)
        pub.close()
    else:
        publish = bus.publish
        for _ in range(count):
            publish("bench.x", payload)
        bus.flush(timeout=120)
    result.put({"publish_seconds": time.perf_counter() - t0, "cpu": time.process_time() - cpu0})
    bus.close()


def one_run(pub_via: str, sub_via: str, count: int, size: int) -> dict[str, Any]:
    import shutil
    import tempfile

    workdir = Path(tempfile.mkdtemp(prefix="hb-bench-"))
    proc, sock = start_daemon(workdir)
    try:
        ctx = mp.get_context("spawn")
        ready, subq, pubq = ctx.Event(), ctx.Queue(), ctx.Queue()
        sp = ctx.Process(target=subscriber, args=(str(sock), sub_via, count, size, ready, subq))
        sp.start()
        if not ready.wait(30):
            raise RuntimeError("subscriber did not subscribe")
        broker_cpu = cpu_seconds(proc.pid)
        pp = ctx.Process(target=publisher, args=(str(sock), pub_via, count, size, pubq))
        pp.start()
        sub_res = subq.get(timeout=600)
        pub_res = pubq.get(timeout=600)
        broker_cpu = cpu_seconds(proc.pid) - broker_cpu
        sp.join(30)
        pp.join(30)
        with hostbus.connect(sock) as bus:
            dropped = bus.stats()["messages"]["dropped"]
        rss = peak_rss_kb(proc.pid)
    finally:
        stop_daemon(proc)
        shutil.rmtree(workdir, ignore_errors=True)
    return {"msgs_per_s": sub_res["received"] / sub_res["seconds"],
            "mb_per_s": sub_res["bytes"] / sub_res["seconds"] / 1e6,
            "lost": count - sub_res["received"] + dropped, "broker_peak_rss_mib": rss / 1024,
            "cpu_us_per_msg": {"publisher": pub_res["cpu"] / count * 1e6, "broker": broker_cpu / count * 1e6,
                               "subscriber": sub_res["cpu"] / count * 1e6}}


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=1_000_000, help="64-byte messages per run")
    ap.add_argument("--big-count", type=int, default=400, help="1 MiB messages per run (a backlog of them fits "
                    "the raised 512 MiB queue bounds)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    shapes = [
        ("64 B, socket -> socket", "socket", "socket", args.count, 64, "msgs_per_s"),
        ("64 B, publish ring -> socket", "shm", "socket", args.count, 64, "msgs_per_s"),
        ("64 B, publish ring -> deliver ring", "shm", "shm", args.count, 64, "msgs_per_s"),
        ("1 MiB, socket -> socket", "socket", "socket", args.big_count, MiB, "mb_per_s"),
        ("1 MiB, publish ring -> deliver ring", "shm", "shm", args.big_count, MiB, "mb_per_s"),
    ]
    results: dict[str, list[dict[str, Any]]] = {}
    for name, pv, sv, count, size, _ in shapes:
        results[name] = [one_run(pv, sv, count, size) for _ in range(args.repeats)]
    print(f"# hostbus rings vs socket, {args.repeats} runs each, medians (min - max)")
    print(f"# {platform.machine()} {os.cpu_count()} CPUs, Python {platform.python_version()}, "
          f"{platform.system()} {platform.release()}")
    print("| path | received (median) | min - max | lost | broker peak RSS MiB | CPU us/msg: publisher, broker, "
          "subscriber |")
    print("|---|---|---|---|---|---|")
    medians = {}
    for name, *_, key in shapes:
        vals = [r[key] for r in results[name]]
        unit = "msg/s" if key == "msgs_per_s" else "MB/s"
        medians[name] = statistics.median(vals)
        print(f"| {name} | {medians[name]:,.0f} {unit} | {min(vals):,.0f} - {max(vals):,.0f} | "
              f"{sum(r['lost'] for r in results[name])} | "
              f"{max(r['broker_peak_rss_mib'] for r in results[name]):.0f} | "
              + ", ".join(f"{statistics.median(r['cpu_us_per_msg'][role] for r in results[name]):.2f}"
                          for role in ("publisher", "broker", "subscriber")) + " |")
    print(f"# 64 B ring -> socket / socket: {medians[shapes[1][0]] / medians[shapes[0][0]]:.2f}x; "
          f"64 B rings / socket: {medians[shapes[2][0]] / medians[shapes[0][0]]:.2f}x; "
          f"1 MiB rings / socket: {medians[shapes[4][0]] / medians[shapes[3][0]]:.2f}x")
    if args.json:
        print(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
