"""Client library behaviour under concurrency, cancellation, backpressure and broker errors."""

from __future__ import annotations

import asyncio
import signal
import threading
from collections.abc import Callable

import pytest

import hostbus
from hostbus import aio
from tests.conftest import Daemon


def test_two_threads_waiting_on_one_subscription_both_wake(bus: hostbus.Bus) -> None:
    # Regression: one shared "waiting" flag lost the second thread's wake-up.
    sub = bus.subscribe("w")
    got: dict[str, bytes] = {}
    ready = threading.Barrier(3)

    def take(name: str) -> None:
        ready.wait()
        got[name] = sub.next(timeout=5).data

    threads = [threading.Thread(target=take, args=(n,)) for n in ("a", "b")]
    for t in threads:
        t.start()
    ready.wait()
    threading.Event().wait(0.2)  # both are blocked in next()
    bus.publish("w", b"1")
    bus.flush()
    threading.Event().wait(0.1)
    bus.publish("w", b"2")
    for t in threads:
        t.join(10)
    assert sorted(got.values()) == [b"1", b"2"]


def test_two_tasks_waiting_on_one_async_subscription_both_wake(daemon: Daemon) -> None:
    async def main() -> list[bytes]:
        async with await aio.connect(daemon.socket) as bus:
            sub = await bus.subscribe("w")
            t1 = asyncio.create_task(sub.next(timeout=5))
            t2 = asyncio.create_task(sub.next(timeout=5))
            await asyncio.sleep(0.1)
            await bus.publish("w", b"1")
            await bus.flush()
            await asyncio.sleep(0.05)
            await bus.publish("w", b"2")
            return sorted([(await t1).data, (await t2).data])

    assert asyncio.run(main()) == [b"1", b"2"]


def test_async_publish_loop_hands_data_to_the_transport(daemon: Daemon) -> None:
    # Regression: a loop of publishes that never yielded buffered everything in the client.
    from hostbus.aio import _WRITE_BATCH

    async def main() -> int:
        async with await aio.connect(daemon.socket) as bus:
            sub = await bus.subscribe("flood", pending_limit=100_000)
            most = 0
            for _ in range(50_000):
                await bus.publish("flood", b"\0" * 1000)
                most = max(most, len(bus._out))
            await bus.flush(timeout=30)
            n = 0
            while n + sub.missed < 50_000:
                await sub.next(timeout=10)
                n += 1
            return most

    assert asyncio.run(main()) <= _WRITE_BATCH + 2000


def test_cancelled_async_subscribe_leaves_nothing_on_the_broker(daemon: Daemon) -> None:
    # Regression: the broker kept the subscription (and its queue-group share) of a cancelled call.
    async def main() -> None:
        async with await aio.connect(daemon.socket) as bus:
            daemon.proc.send_signal(signal.SIGSTOP)  # the SUB is sent, its answer cannot come
            try:
                with pytest.raises(TimeoutError):
                    await asyncio.wait_for(bus.subscribe("jobs", group="workers"), 0.3)
            finally:
                daemon.proc.send_signal(signal.SIGCONT)
            await bus.flush()
            st = await bus.stats()
            assert st["subscriptions"] == 0

    asyncio.run(main())


def test_broker_errors_about_earlier_publishes(start_daemon: Callable[..., Daemon]) -> None:
    # Regression: the error about a retained publish was raised by the *next* publish, unsent.
    d = start_daemon({"retained": {"max_topics": 1}})
    with d.connect("watch") as watch, d.connect("pub") as pub:
        sub = watch.subscribe("orders.>")
        pub.publish("state.a", b"1", retain=True)
        pub.publish("state.b", b"2", retain=True)  # the store is full: ERR LIMIT, ref 0
        threading.Event().wait(0.2)
        pub.publish("orders.new", b"order #1")  # not blocked by the earlier error
        with pytest.raises(hostbus.LimitExceededError, match=r"retained\.max_topics"):
            pub.flush()
        pub.flush()  # raised once
        assert sub.next(timeout=5).data == b"order #1"
    errors: list[hostbus.HostbusError] = []
    with d.connect("cb", error_cb=errors.append) as pub:
        pub.publish("state.c", b"3", retain=True)
        pub.flush()  # the callback took it
    assert len(errors) == 1 and isinstance(errors[0], hostbus.LimitExceededError)
