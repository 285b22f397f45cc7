"""Access rules and per-uid limits on topic queues, with real users (docs/security.md).

``subscribe`` on a queue's subjects is what consuming it takes (every subject, or the filter of
the consumer); ``manage`` on every subject is what declaring, deleting and purging it takes.
"""

from __future__ import annotations

import os
import signal
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

import hostbus
from tests.conftest import Daemon, toml_dump
from tests.integration.test_acl import Held, People, open_daemon, wait_log

pytestmark = pytest.mark.needs_root

BASE: dict[str, Any] = {
    "access": {"default": "deny"},
    "queues": [{"name": "jobs", "subjects": ["jobs.>"]}, {"name": "open", "subjects": ["open.>"]}],
}
RULES: list[dict[str, Any]] = [
    {"topic": "jobs.>", "publish": ["*"], "subscribe": ["user:hb-alice"], "manage": ["user:hb-alice"]},
    {"topic": "jobs.secret.>", "subscribe": []},
    {"topic": "open.>", "publish": ["*"], "subscribe": ["*"]},
]


@pytest.fixture(scope="module")
def people() -> People:
    return People()


@pytest.fixture
def qdaemon(start_daemon: Callable[..., Daemon], workdir: Path, people: People) -> Daemon:
    return open_daemon(start_daemon, workdir, {**BASE, "acl": RULES})


def outcome(fn: Callable[[], Any]) -> str:
    try:
        fn()
    except hostbus.HostbusError as exc:
        return f"{type(exc).__name__}: {exc}"
    return "ok"


def run_as_user(people: People, who: str, socket_path: Path,
                fn: Callable[[hostbus.Bus], dict[str, str]]) -> dict[str, str]:
    uid, gid = people.alice if who == "alice" else people.bob
    groups = [people.sensors] if who == "alice" else []

    def setup(report: Callable[[str], None]) -> Any:
        bus = hostbus.connect(socket_path)
        for key, value in fn(bus).items():
            report(f"{key}={value}")
        return bus

    child = Held(uid, gid, setup, groups=groups)
    out: dict[str, str] = {}
    while True:
        line = child.line()
        if line == "ready":
            break
        key, _, value = line.partition("=")
        out[key] = value
    assert child.release() == 0
    return out


def test_consuming_takes_subscribe_rights_on_every_subject(qdaemon: Daemon, people: People) -> None:
    with qdaemon.connect() as root:  # root may publish (publish "*"), and is no one special otherwise
        for t in ("jobs.a", "jobs.secret.x", "open.a"):
            root.publish(t, b"x", confirm=True)
        assert "may not consume queue 'jobs'" in outcome(lambda: root.consume("jobs", "root"))

    def alice(bus: hostbus.Bus) -> dict[str, str]:
        whole = outcome(lambda: bus.consume("jobs", "all-of-it"))
        part = bus.consume("jobs", "public", filter="jobs.a")
        return {"whole": whole, "filtered": part.next(timeout=5).topic,
                "secret": outcome(lambda: bus.consume("jobs", "s", filter="jobs.secret.>")),
                "open": bus.consume("open", "a").next(timeout=5).topic}

    got = run_as_user(people, "alice", qdaemon.socket, alice)
    assert got["whole"] == ("PermissionDeniedError: may not consume queue 'jobs': subscribing to 'jobs.>' is allowed "
                            "only for some of its topics (acl rule 0 (topic 'jobs.>'): subscribe allowed to "
                            "user:hb-alice)")
    assert got["filtered"] == "jobs.a" and got["open"] == "open.a"
    assert got["secret"].startswith("PermissionDeniedError: may not consume queue 'jobs': subscribing to "
                                    "'jobs.secret.>' is refused (acl rule 1")

    def bob(bus: hostbus.Bus) -> dict[str, str]:
        return {"jobs": outcome(lambda: bus.consume("jobs", "b", filter="jobs.a")),
                "open": bus.consume("open", "b").next(timeout=5).topic}

    got = run_as_user(people, "bob", qdaemon.socket, bob)
    assert got["jobs"].startswith("PermissionDeniedError: may not consume queue 'jobs': subscribing to 'jobs.a' is "
                                  "refused")
    assert got["open"] == "open.a"


def test_managing_queues_takes_manage_rights_on_every_subject(qdaemon: Daemon, people: People) -> None:
    def alice(bus: hostbus.Bus) -> dict[str, str]:
        return {"add": outcome(lambda: bus.queue_add("alices", ["jobs.alice.>"])),
                "add_wide": outcome(lambda: bus.queue_add("wide", [">"])),
                "purge": outcome(lambda: bus.queue_purge("jobs")),
                "list": ",".join(q["name"] for q in bus.queue_list())}

    got = run_as_user(people, "alice", qdaemon.socket, alice)
    assert got["add"] == "ok" and got["purge"] == "ok"
    assert got["add_wide"].startswith("PermissionDeniedError: may not declare queue 'wide': managing queues on '>' "
                                      "is not allowed")
    assert got["list"] == "alices,jobs,open"

    def bob(bus: hostbus.Bus) -> dict[str, str]:
        return {"add": outcome(lambda: bus.queue_add("bobs", ["jobs.bob.>"])),
                "add_open": outcome(lambda: bus.queue_add("mine", ["open.bob"])),
                "delete": outcome(lambda: bus.queue_delete("alices")),
                "purge": outcome(lambda: bus.queue_purge("jobs")),
                "change": outcome(lambda: bus.queue_add("alices", ["open.x"])),
                "info": outcome(lambda: bus.queue_info("alices")),
                "consumer": outcome(lambda: bus.consumer_delete("open", "a")),
                "list": ",".join(q["name"] for q in bus.queue_list())}

    got = run_as_user(people, "bob", qdaemon.socket, bob)
    assert got["add"].startswith("PermissionDeniedError: may not declare queue 'bobs': managing queues on "
                                 "'jobs.bob.>' is not allowed (acl rule 0")
    assert got["add_open"].startswith("PermissionDeniedError: may not declare queue 'mine'")  # no manage on open.>
    assert got["delete"].startswith("PermissionDeniedError: may not delete queue 'alices'")
    assert got["purge"].startswith("PermissionDeniedError: may not purge queue 'jobs'")
    assert got["change"].startswith("PermissionDeniedError:")
    assert got["info"].startswith("PermissionDeniedError: may not see queue 'alices'")
    assert got["consumer"].startswith("PermissionDeniedError: may not delete a consumer of queue 'open'")
    assert got["list"] == "open"  # the queues bob may neither consume nor manage are not shown
    with qdaemon.connect() as root:
        assert {q["name"] for q in root.queue_list()} == {"open"}  # root: no rule names it
        names = {q["name"] for q in root.stats()["queues"].values()}
        assert names == {"open"}


def test_consumers_per_uid_are_bounded_and_a_reload_ends_refused_members(
        start_daemon: Callable[..., Daemon], workdir: Path, people: People) -> None:
    config = {**BASE, "acl": RULES, "limits": {"max_consumers_per_uid": 2}}
    d = open_daemon(start_daemon, workdir, config)
    sock = d.socket

    def alice(report: Callable[[str], None]) -> Any:
        bus = hostbus.connect(sock)
        one = bus.consume("open", "one")
        bus.consume("open", "two")
        report("third=" + outcome(lambda: bus.consume("open", "three")))
        report("jobs=" + outcome(lambda: bus.consume("jobs", "j", filter="jobs.a")))
        one.unsubscribe()
        bus.flush()
        jobs = bus.consume("jobs", "j", filter="jobs.a")  # room again
        report(f"subscribed, holding {bus.stats()['uids'][str(os.getuid())]['consumers']}")
        try:
            jobs.next(timeout=30)
            report("ended=no")
        except hostbus.PermissionDeniedError as exc:
            report(f"ended={exc}")
        return bus

    child = Held(*people.alice, alice, groups=[people.sensors])
    assert child.line() == (f"third=LimitExceededError: uid {people.alice[0]} already consumes 2 times, the limit "
                            "(limits.max_consumers_per_uid)")
    line = child.line()
    assert line.startswith("jobs=LimitExceededError"), line
    assert child.line() == "subscribed, holding 2"

    def bob(bus: hostbus.Bus) -> dict[str, str]:  # another uid is untouched by alice's limit
        return {"a": outcome(lambda: bus.consume("open", "b1")), "b": outcome(lambda: bus.consume("open", "b2"))}

    assert run_as_user(people, "bob", sock, bob) == {"a": "ok", "b": "ok"}
    # Alice loses the right to subscribe to jobs.>: her member is ended, with the reason.
    rules = [r for r in RULES if r["topic"] != "jobs.>"] + [{"topic": "jobs.>", "publish": ["*"]}]
    d.config_path.write_text(toml_dump({"socket": {"dir_mode": 0o755, "mode": 0o666}, **config, "acl": rules}))
    before = d.log().count('"event": "reloaded"')
    d.proc.send_signal(signal.SIGHUP)
    wait_log(d, "reloaded", before + 1)
    ended = child.line()
    assert ended.startswith("ended=consumer ended by new access rules: may not consume queue 'jobs': subscribing to "
                            "'jobs.a' is refused"), ended
    assert child.release() == 0
