"""Broker(config, listeners, fifos) built in-process from descriptors opened beforehand.

This is how descriptors handed over by a service manager are served: the broker never opens or
creates its endpoints itself, it reads what it is given.
"""

from __future__ import annotations

import asyncio
import os
import socket
from pathlib import Path

import uvloop

import hostbus
from hostbus import aio
from hostbusd.broker import Broker
from hostbusd.config import Config, FifoIngressConfig, FifoSinkConfig
from hostbusd.net.fifo import OpenedFifo


def write_line(path: Path) -> None:
    w = os.open(path, os.O_WRONLY)
    try:
        os.write(w, b"x.y hi\n")
    finally:
        os.close(w)


def test_broker_serves_pre_opened_socket_and_fifo(workdir: Path) -> None:
    sock_path, fifo_path, sink_path = workdir / "s.sock", workdir / "in.fifo", workdir / "out.fifo"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(sock_path))
    listener.listen()
    listener.setblocking(False)
    os.mkfifo(fifo_path, 0o600)
    os.mkfifo(sink_path, 0o600)
    fd = os.open(fifo_path, os.O_RDWR | os.O_NONBLOCK)
    fifos = [OpenedFifo(fifo_path, fd, FifoIngressConfig(path=str(fifo_path), format="lines")),
             OpenedFifo(sink_path, None, FifoSinkConfig(path=str(sink_path), subjects=["x.>"]))]

    async def main() -> tuple[hostbus.Message, bytes]:
        broker = Broker(Config(), [listener], fifos)
        stop = asyncio.Event()
        running = asyncio.ensure_future(broker.run(stop))
        reader = os.open(sink_path, os.O_RDONLY | os.O_NONBLOCK)
        try:
            bus = await aio.connect(sock_path)
            sub = await bus.subscribe("x.>")
            loop = asyncio.get_running_loop()
            await loop.run_in_executor(None, write_line, fifo_path)
            msg = await sub.next(timeout=5)
            await asyncio.sleep(0.1)
            line = os.read(reader, 4096)
            await bus.close()
        finally:
            os.close(reader)
            stop.set()
            await running
        return msg, line

    try:
        msg, line = uvloop.run(main())
    finally:
        listener.close()
    assert (msg.topic, msg.data, msg.sender.origin) == ("x.y", b"hi", f"fifo:{fifo_path}")
    assert line == b"x.y hi\n"
