"""Benchmark: 64-byte lines published through one FIFO by 1 and 4 writers, received on the socket.

Starts its own hostbusd on a temporary runtime directory. Each writer is its own process and
writes whole lines in writes of at most PIPE_BUF (4096) bytes, as concurrent writers must; one
subscriber process (sync client) receives. The rate is lines per second received, measured at
the subscriber from its first to its last message; losses are the broker's drop count plus the
client's and must be 0.

    .venv/bin/python bench/fifo_publish.py [--count N] [--repeats R] [--writers 1 4]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).parent))

import hostbus
from pubsub_1to1 import peak_rss_kb, start_daemon, stop_daemon, subscriber

PIPE_BUF = 4096
LINE = 64


def line_for(writer: int) -> bytes:
    head = f"bench.fifo w{writer} ".encode()
    return head + b"x" * (LINE - len(head) - 1) + b"\n"


def writer(fifo: str, n: int, k: int) -> None:
    line = line_for(k)
    per_write = PIPE_BUF // len(line)
    chunk = line * per_write
    fd = os.open(fifo, os.O_WRONLY)
    try:
        full, rest = divmod(n, per_write)
        for _ in range(full):
            os.write(fd, chunk)
        if rest:
            os.write(fd, line * rest)
    finally:
        os.close(fd)


def one_run(count: int, writers: int) -> dict[str, Any]:
    import shutil
    import tempfile

    workdir = Path(tempfile.mkdtemp(prefix="hb-bench-"))
    proc, sock = start_daemon(workdir)
    fifo = str(sock.parent / "publish.fifo")
    try:
        ctx = mp.get_context("spawn")
        ready, q = ctx.Event(), ctx.Queue()
        sp = ctx.Process(target=subscriber, args=(str(sock), count, ready, q, "bench.fifo"))
        sp.start()
        if not ready.wait(30):
            raise RuntimeError("subscriber did not subscribe")
        share = count // writers
        ws = [ctx.Process(target=writer, args=(fifo, share + (count - share * writers if k == 0 else 0), k))
              for k in range(writers)]
        for w in ws:
            w.start()
        res = q.get(timeout=300)
        for w in ws:
            w.join(60)
        sp.join(30)
        with hostbus.connect(sock) as bus:
            st = bus.stats()
        rss = peak_rss_kb(proc.pid)
    finally:
        stop_daemon(proc)
        shutil.rmtree(workdir, ignore_errors=True)
    fifo_st = st["fifos"][fifo]
    return {"rate": res["received"] / res["seconds"], "received": res["received"],
            "losses": res["missed"] + st["messages"]["dropped"] + sum(fifo_st["errors"].values()),
            "rss_mib": rss / 1024}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--count", type=int, default=1_000_000)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--writers", type=int, nargs="+", default=[1, 4])
    args = ap.parse_args()
    print(f"# hostbus FIFO ingress: {LINE}-byte lines, {args.count:,} per run, {args.repeats} runs")
    print(f"# {platform.machine()} {os.cpu_count()} CPUs, Python {platform.python_version()}, "
          f"{platform.system()} {platform.release()}")
    print("| writers | received lines/s (median) | min - max | losses | broker peak RSS MiB |")
    print("|---|---|---|---|---|")
    bad = 0
    for w in args.writers:
        runs = [one_run(args.count, w) for _ in range(args.repeats)]
        rates = [r["rate"] for r in runs]
        losses = sum(r["losses"] for r in runs)
        bad += losses
        print(f"| {w} | {statistics.median(rates):,.0f} | {min(rates):,.0f} - {max(rates):,.0f} | {losses} | "
              f"{max(r['rss_mib'] for r in runs):.0f} |")
    return 0 if bad == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
