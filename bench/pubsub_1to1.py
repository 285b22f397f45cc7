"""Benchmark S1: 64-byte messages, 1 publisher -> 1 subscriber, messages per second received.

Starts its own hostbusd on a temporary runtime directory; publisher and subscriber each run in
their own process using the sync client. The rate is measured at the subscriber, from its first
to its last message. Prints a table of the median with min-max over the repeats, and the
losses (the broker's drop count and the client's), which must be 0 for a run to count.

    .venv/bin/python bench/pubsub_1to1.py [--count N] [--size B] [--repeats R] [--acl] [--json]

``--acl`` adds a row with access rules in force: 20 rules and a default of deny; every publish is
checked, and the subscriber's ``bench.>`` is decided per message (a more specific rule refuses
``bench.secret.>``), so both checks of the hot path are measured.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import hostbus

CONFIG = """
[limits]
max_queued_bytes_per_connection = 536870912
max_queued_bytes_per_uid = 536870912
[subscriptions]
max_queued_msgs = 100000000
max_queued_bytes = 536870912
"""


ACL = "[access]\ndefault = \"deny\"\n" + "".join(
    f"[[acl]]\ntopic = \"other{i}.>\"\npublish = [\"uid:12345\"]\nsubscribe = [\"group:nobody\"]\n" for i in range(18)
) + """[[acl]]
topic = "bench.>"
publish = ["*"]
subscribe = ["*"]
[[acl]]
topic = "bench.secret.>"
subscribe = []
"""


def start_daemon(workdir: Path, acl: bool = False) -> tuple[subprocess.Popen[bytes], Path]:
    # Without rules, access is open (as root the socket is shared, whose default would be deny).
    (workdir / "hostbus.toml").write_text(CONFIG + (ACL if acl else "[access]\ndefault = \"allow\"\n"))
    sock = workdir / "run" / "hostbus.sock"
    proc = subprocess.Popen(
        [sys.executable, "-m", "hostbusd", "--config", str(workdir / "hostbus.toml"), "--runtime-dir",
         str(workdir / "run"), "--state-dir", str(workdir / "state"), "--log-format", "json",
         "--log-level", "warning"])
    for _ in range(500):
        if sock.exists():
            with socket.socket(socket.AF_UNIX) as s:
                try:
                    s.connect(str(sock))
                    return proc, sock
                except OSError:
                    pass
        time.sleep(0.01)
    proc.kill()
    raise RuntimeError("hostbusd did not start")


def stop_daemon(proc: subprocess.Popen[bytes]) -> None:
    proc.send_signal(signal.SIGTERM)
    proc.wait(30)


def subscriber(sock: str, count: int, ready: Any, result: Any, topic: str = "bench.s1") -> None:
    """Receive ``count`` messages on ``topic``; report the rate from the first to the last."""
    bus = hostbus.connect(sock, name="bench-sub")
    sub = bus.subscribe(topic, pending_limit=count + 1)
    ready.set()
    sub.next(timeout=60)
    t0 = time.perf_counter()
    n = 1
    deadline = time.monotonic() + 120
    while n + sub.missed < count and time.monotonic() < deadline:
        try:
            sub.next(timeout=2)
        except hostbus.TimeoutError:
            break
        n += 1
    dt = time.perf_counter() - t0
    result.put({"received": n, "missed": sub.missed, "seconds": dt})
    bus.close()


def publisher(sock: str, count: int, size: int, result: Any) -> None:
    bus = hostbus.connect(sock, name="bench-pub")
    payload = b"x" * size
    publish = bus.publish
    t0 = time.perf_counter()
    for _ in range(count):
        publish("bench.s1", payload)
    bus.flush(timeout=120)
    result.put({"publish_seconds": time.perf_counter() - t0})
    bus.close()


def peak_rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def one_run(count: int, size: int, acl: bool = False) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="hb-bench-"))
    proc, sock = start_daemon(workdir, acl)
    try:
        ctx = mp.get_context("spawn")
        ready, subq, pubq = ctx.Event(), ctx.Queue(), ctx.Queue()
        sp = ctx.Process(target=subscriber, args=(str(sock), count, ready, subq, "bench.>" if acl else "bench.s1"))
        sp.start()
        if not ready.wait(30):
            raise RuntimeError("subscriber did not subscribe")
        pp = ctx.Process(target=publisher, args=(str(sock), count, size, pubq))
        pp.start()
        sub_res = subq.get(timeout=300)
        pub_res = pubq.get(timeout=300)
        sp.join(30)
        pp.join(30)
        with hostbus.connect(sock) as bus:
            stats = bus.stats()
        rss = peak_rss_kb(proc.pid)
    finally:
        stop_daemon(proc)
        shutil.rmtree(workdir, ignore_errors=True)
    return {
        "msgs_per_s": sub_res["received"] / sub_res["seconds"],
        "received": sub_res["received"],
        "client_missed": sub_res["missed"],
        "broker_dropped": stats["messages"]["dropped"],
        "publish_msgs_per_s": count / pub_res["publish_seconds"],
        "broker_peak_rss_mib": rss / 1024,
    }


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=1_000_000)
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--json", action="store_true", help="print the runs as JSON too")
    ap.add_argument("--acl", action="store_true", help="add a row with access rules in force")
    args = ap.parse_args()
    variants = [("hostbus (Unix socket, sync client)", False)]
    if args.acl:
        variants.append(("hostbus, 20 access rules (publish checked, bench.> filtered per message)", True))
    results = {name: [one_run(args.count, args.size, acl) for _ in range(args.repeats)] for name, acl in variants}
    print(f"# hostbus S1: {args.size}-byte messages, 1 publisher -> 1 subscriber, {args.count:,} messages, "
          f"{args.repeats} runs")
    print(f"# {platform.node()} {platform.machine()} {os.cpu_count()} CPUs, Python {platform.python_version()}, "
          f"{platform.system()} {platform.release()}")
    print("| system | received msg/s (median) | min - max | publish msg/s (median) | losses | broker peak RSS MiB |")
    print("|---|---|---|---|---|---|")
    losses = 0
    for name, runs in results.items():
        rates = [r["msgs_per_s"] for r in runs]
        lost = sum(r["client_missed"] + r["broker_dropped"] for r in runs)
        losses += lost
        print(f"| {name} | {statistics.median(rates):,.0f} | {min(rates):,.0f} - "
              f"{max(rates):,.0f} | {statistics.median(r['publish_msgs_per_s'] for r in runs):,.0f} | {lost} | "
              f"{max(r['broker_peak_rss_mib'] for r in runs):.0f} |")
    if args.json:
        print(json.dumps(results, indent=2))
    return 0 if losses == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
