"""Benchmark: 64-byte messages from a ZeroMQ PUB to a ZeroMQ SUB through the hostbus gateway,
side by side with a plain ``zmq.proxy(XSUB, XPUB)`` process, in the same run.

Every role is its own process: the PUB, the SUB, and the middle (hostbusd with its gateway, or
the proxy). Settings, the same for both middles: ipc:// endpoints; the PUB's send high-water
mark is unlimited and the middle's XPUB has XPUB_NODROP, so nothing is dropped silently; the
figure is messages per second received by the SUB, from its first to its last message.

    .venv/bin/python bench/zmq_gateway.py [--count N] [--repeats R]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import zmq

SIZE = 64


def proxy(xsub: str, xpub: str) -> None:
    ctx = zmq.Context()
    front = ctx.socket(zmq.XSUB)
    back = ctx.socket(zmq.XPUB)
    back.setsockopt(zmq.XPUB_NODROP, 1)
    front.bind(xsub)
    back.bind(xpub)
    zmq.proxy(front, back)


def subscriber(xpub: str, count: int, ready: Any, result: Any) -> None:
    ctx = zmq.Context()
    sub = ctx.socket(zmq.SUB)
    sub.setsockopt(zmq.RCVHWM, 0)
    sub.connect(xpub)
    sub.setsockopt(zmq.SUBSCRIBE, b"bench.")
    ready.set()
    sub.recv_multipart()
    t0 = time.perf_counter()
    n = 1
    while n < count and sub.poll(5000):
        sub.recv_multipart()
        n += 1
    result.put({"received": n, "seconds": time.perf_counter() - t0})


def publisher(xsub: str, count: int) -> None:
    ctx = zmq.Context()
    pub = ctx.socket(zmq.PUB)
    pub.setsockopt(zmq.SNDHWM, 0)
    pub.setsockopt(zmq.LINGER, -1)
    pub.connect(xsub)
    time.sleep(1.0)  # subscriptions propagate
    topic, payload = b"bench.zmq", b"x" * SIZE
    for _ in range(count):
        pub.send_multipart([topic, payload])
    pub.close()
    ctx.term()


def start_hostbusd(workdir: Path) -> tuple[subprocess.Popen[bytes], str, str]:
    (workdir / "c.toml").write_text('[zmq]\nenabled = true\nhwm = 100000\n'
                                    '[subscriptions]\nmax_queued_msgs = 100000000\nmax_queued_bytes = 536870912\n'
                                    '[limits]\nmax_queued_bytes_per_connection = 536870912\n'
                                    'max_queued_bytes_per_uid = 536870912\n'
                                    '[access]\ndefault = "allow"\n')
    run = workdir / "run"
    proc = subprocess.Popen([sys.executable, "-m", "hostbusd", "--config", str(workdir / "c.toml"), "--runtime-dir",
                             str(run), "--state-dir", str(workdir / "state"), "--log-level", "warning",
                             "--log-format", "json"])
    for _ in range(500):
        if (run / "zmq-subscribe.ipc").exists():
            break
        time.sleep(0.01)
    return proc, f"ipc://{run / 'zmq-publish.ipc'}", f"ipc://{run / 'zmq-subscribe.ipc'}"


def one_run(system: str, count: int) -> dict[str, Any]:
    workdir = Path(tempfile.mkdtemp(prefix="hb-bench-"))
    ctx = mp.get_context("spawn")
    middle: Any
    try:
        if system == "hostbus":
            middle, xsub, xpub = start_hostbusd(workdir)
        else:
            xsub, xpub = f"ipc://{workdir / 'xsub.ipc'}", f"ipc://{workdir / 'xpub.ipc'}"
            middle = ctx.Process(target=proxy, args=(xsub, xpub), daemon=True)
            middle.start()
            time.sleep(0.3)
        ready, q = ctx.Event(), ctx.Queue()
        sp = ctx.Process(target=subscriber, args=(xpub, count, ready, q))
        sp.start()
        ready.wait(30)
        time.sleep(0.3)
        pp = ctx.Process(target=publisher, args=(xsub, count))
        pp.start()
        res = q.get(timeout=600)
        pp.join(60)
        sp.join(60)
    finally:
        if isinstance(middle, subprocess.Popen):
            middle.send_signal(signal.SIGTERM)
            middle.wait(30)
        else:
            middle.terminate()
            middle.join(10)
        shutil.rmtree(workdir, ignore_errors=True)
    return {"rate": res["received"] / res["seconds"], "lost": count - res["received"]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=500_000)
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    print(f"# ZeroMQ PUB -> middle -> SUB, {SIZE}-byte messages, {args.count:,} per run, {args.repeats} runs")
    print(f"# {platform.machine()} {os.cpu_count()} CPUs, Python {platform.python_version()}, pyzmq {zmq.__version__}, "
          f"libzmq {zmq.zmq_version()}")
    print("| middle | received msg/s (median) | min - max | lost |")
    print("|---|---|---|---|")
    lost = 0
    for system in ("zmq.proxy", "hostbus"):
        runs = [one_run(system, args.count) for _ in range(args.repeats)]
        rates = [r["rate"] for r in runs]
        lost += sum(r["lost"] for r in runs)
        label = "hostbus gateway (XSUB -> route -> XPUB)" if system == "hostbus" else "zmq.proxy(XSUB, XPUB) process"
        print(f"| {label} | {statistics.median(rates):,.0f} | {min(rates):,.0f} - {max(rates):,.0f} | "
              f"{sum(r['lost'] for r in runs)} |")
    return 0 if lost == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
