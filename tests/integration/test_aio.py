"""The asyncio client, on plain asyncio and on uvloop."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine
from typing import Any

import pytest
import uvloop

import hostbus
from hostbus import aio
from tests.conftest import Daemon

LOOPS = {"asyncio": asyncio.new_event_loop, "uvloop": uvloop.new_event_loop}


@pytest.fixture(params=sorted(LOOPS))
def run(request: pytest.FixtureRequest) -> Callable[[Coroutine[Any, Any, Any]], Any]:
    def runner(coro: Coroutine[Any, Any, Any]) -> Any:
        with asyncio.Runner(loop_factory=LOOPS[request.param]) as r:
            return r.run(coro)
    return runner


def test_publish_subscribe_iterate(daemon: Daemon, run: Any) -> None:
    async def main() -> list[bytes]:
        async with await aio.connect(daemon.socket, name="aio") as bus:
            sub = await bus.subscribe("a.*")
            for i in range(1000):
                await bus.publish("a.b", str(i))
            await bus.flush()
            got = []
            async for msg in sub:
                got.append(msg.data)
                if len(got) == 1000:
                    await sub.unsubscribe()
            return got

    assert run(main()) == [str(i).encode() for i in range(1000)]


def test_request_reply_and_no_responders(daemon: Daemon, run: Any) -> None:
    async def main() -> None:
        async with await aio.connect(daemon.socket) as a, await aio.connect(daemon.socket) as b:
            sub = await b.subscribe("echo")

            async def serve() -> None:
                async for msg in sub:
                    await msg.respond(b"re:" + msg.data)

            async with asyncio.TaskGroup() as tg:
                task = tg.create_task(serve())
                reply = await a.request("echo", b"x", timeout=5)
                assert reply.data == b"re:x"
                assert reply.sender.pid == b.identity["pid"]
                with pytest.raises(hostbus.NoRespondersError):
                    await a.request("nobody", b"x", timeout=5)
                await b.subscribe("silent")  # subscribed, never answers
                with pytest.raises(hostbus.TimeoutError):
                    await a.request("silent", b"", timeout=0.2)
                task.cancel()

    run(main())


def test_retained_headers_and_errors(daemon: Daemon, run: Any) -> None:
    async def main() -> None:
        async with await aio.connect(daemon.socket) as bus:
            await bus.publish("r", b"kept", headers={"k": "v"}, retain=True)
            await bus.flush()
            sub = await bus.subscribe("r")
            msg = await sub.next(timeout=5)
            assert (msg.data, msg.headers, msg.retained) == (b"kept", {"k": "v"}, True)
            with pytest.raises(hostbus.TimeoutError):
                await sub.next(timeout=0.05)
            with pytest.raises(hostbus.PermissionDeniedError):
                await bus.subscribe("_INBOX.x")
            with pytest.raises(hostbus.InvalidTopicError):
                await bus.publish("bad topic", b"")
            st = await bus.stats()
            assert st["retained"]["topics"] == 1
        with pytest.raises(hostbus.ClosedError):
            await bus.publish("r", b"")

    run(main())


def test_async_subscriber_learns_of_broker_stop(daemon: Daemon, run: Any) -> None:
    async def main() -> None:
        bus = await aio.connect(daemon.socket)
        sub = await bus.subscribe("x")
        await asyncio.get_running_loop().run_in_executor(None, daemon.stop)
        with pytest.raises(hostbus.ShuttingDownError):
            await sub.next(timeout=10)
        await bus.close()

    run(main())
