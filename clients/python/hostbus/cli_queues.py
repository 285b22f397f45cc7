"""The topic-queue commands of ``hostbus``: ``queue add|ls|info|rm|purge`` and ``consume``."""

from __future__ import annotations

import argparse
import datetime
import json
import sys
import time
from typing import Any

from hostbus.client import connect
from hostbus.errors import TimeoutError as HostbusTimeout
from hostbus.message import Message

EXIT_ERROR = 1

# queue add: flag -> (queue_add option, type, help)
_ADD_OPTIONS: dict[str, tuple[str, Any, str]] = {
    "--storage": ("storage", str, "file (default: segment files under the state directory) or memory"),
    "--durability": ("durability", str, "always (default: fsync before the confirm), interval or never"),
    "--sync-interval-ms": ("sync_interval_ms", int, "fsync period under --durability interval (default 100)"),
    "--max-msgs": ("max_msgs", int, "most messages kept"),
    "--max-bytes": ("max_bytes", int, "most bytes kept"),
    "--max-age": ("max_age", float, "seconds a message is kept at most"),
    "--max-msg-size": ("max_msg_size", int, "largest payload stored"),
    "--discard": ("discard", str, "at a limit: old (remove the oldest, default) or new (refuse: QUEUE_FULL)"),
    "--retention": ("retention", str, "limits (default) or acked (remove what every consumer acknowledged)"),
    "--dead-letter": ("dead_letter", str, "topic of messages past max_deliver (default $DLQ.NAME)"),
    "--duplicate-window": ("duplicate_window", float, "seconds a Hostbus-Msg-Id is remembered (0: off)"),
}


def add_parsers(sub: Any) -> None:
    q = sub.add_parser("queue", help="declare, list, inspect, delete or purge topic queues",
                       description="Topic queues store the messages published on their subjects until a consumer "
                       "acknowledges them (docs/queues.md).")
    qs = q.add_subparsers(dest="queue_command", required=True, metavar="ACTION")
    add = qs.add_parser("add", help="declare a queue", description="Declare queue NAME capturing the "
                        "--subjects patterns (or confirm one with the same properties).")
    add.add_argument("name")
    add.add_argument("--subjects", nargs="+", required=True, metavar="PATTERN", help="patterns the queue captures")
    for flag, (_, kind, text) in _ADD_OPTIONS.items():
        add.add_argument(flag, type=kind, help=text)
    add.add_argument("--json", action="store_true", help="print the queue's info as JSON")
    ls = qs.add_parser("ls", help="list queues", description="One line per queue: name, subjects, messages, "
                       "consumers, durability.")
    ls.add_argument("--json", action="store_true", help="print the list as JSON")
    info = qs.add_parser("info", help="show a queue", description="A queue's properties, counters and consumers.")
    info.add_argument("name")
    info.add_argument("--json", action="store_true", help="print the info as JSON")
    rm = qs.add_parser("rm", help="delete a queue and its messages", description="Delete queue NAME, its "
                       "stored messages and consumers.")
    rm.add_argument("name")
    purge = qs.add_parser("purge", help="remove every message of a queue",
                          description="Remove every stored message of queue NAME (its consumers stay).")
    purge.add_argument("name")
    crm = qs.add_parser("rm-consumer", help="delete a consumer of a queue",
                        description="Forget consumer CONSUMER of queue NAME: its position and unacknowledged "
                        "messages; its members are ended.")
    crm.add_argument("name")
    crm.add_argument("consumer")

    c = sub.add_parser("consume", help="print and acknowledge messages of a topic queue",
                       description="Consume QUEUE as (a member of) consumer --consumer: print each message as "
                       "'TOPIC DATA' (or JSON with seq and delivery_count) and acknowledge it.")
    c.add_argument("queue")
    c.add_argument("--consumer", required=True, metavar="NAME", help="the durable consumer's name")
    c.add_argument("--count", type=int, metavar="N", help="exit after N messages")
    c.add_argument("--timeout", type=float, metavar="S",
                   help="exit after S seconds without a message (status 1 if --count were not all received)")
    c.add_argument("--no-ack", action="store_true",
                   help="do not acknowledge: the messages are delivered again after ack_wait")
    c.add_argument("--json", action="store_true", help="one JSON object per line, with seq and delivery_count")
    c.add_argument("--start", metavar="WHERE", help="where a new consumer starts: all (default), new, last, "
                   "a sequence number, or a time (ISO 8601, e.g. 2026-11-27T10:00:00+00:00)")
    c.add_argument("--ack-wait", type=float, metavar="S", help="seconds before an unacknowledged message comes again")
    c.add_argument("--max-deliver", type=int, metavar="N", help="deliveries before the dead-letter topic")
    c.add_argument("--max-inflight", type=int, metavar="N", help="unacknowledged messages at once")
    c.add_argument("--filter", metavar="PATTERN", help="only messages whose topic matches (new consumers)")


def _start(text: str | None) -> Any:
    if text is None or text in ("all", "new", "last"):
        return text
    if text.isdigit():
        return int(text)
    try:
        when = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise SystemExit(f"hostbus: --start takes all, new, last, a sequence number or an ISO time, not {text!r}"
                         ) from None
    if when.tzinfo is None:
        when = when.astimezone()
    return when.timestamp()


def _describe(q: dict[str, Any]) -> str:
    seqs = f"seq {q['first_seq']}..{q['last_seq']}" if q["messages"] else f"next seq {q['last_seq'] + 1}"
    return (f"{q['name']}: {', '.join(q['subjects'])} -- {q['messages']} messages ({q['bytes']} bytes, {seqs}), "
            f"{len(q['consumers'])} consumers, pending {q['pending']}, "
            f"redelivered {q['redelivered']}, dead-lettered {q['dead_lettered']}; {q['storage']}, durability "
            f"{q['durability']}, loss window: {q['loss_window']}")


def describe_queue(q: dict[str, Any]) -> str:
    """One line for ``hostbus stats`` and ``queue ls``."""
    return _describe(q) + (f" -- BROKEN: {q['broken']}" if q.get("broken") else "")


def run(args: argparse.Namespace) -> int:
    if args.command == "consume":
        return _consume(args)
    with connect(args.socket, name="hostbus-cli") as bus:
        cmd = args.queue_command
        if cmd == "add":
            options = {opt: getattr(args, flag[2:].replace("-", "_")) for flag, (opt, _, _) in _ADD_OPTIONS.items()}
            info = bus.queue_add(args.name, args.subjects, **{k: v for k, v in options.items() if v is not None})
            print(json.dumps(info, indent=2) if args.json else describe_queue(info))
        elif cmd == "ls":
            queues = bus.queue_list()
            if args.json:
                print(json.dumps(queues, indent=2))
            for q in [] if args.json else queues:
                print(describe_queue(q))
        elif cmd == "info":
            info = bus.queue_info(args.name)
            if args.json:
                print(json.dumps(info, indent=2))
            else:
                print(describe_queue(info))
                for key, value in info["config"].items():
                    print(f"  {key:<18}{value}")
                for name, c in info["consumers"].items():
                    print(f"  consumer {name}: {c['members']} members, ack floor {c['ack_floor']}, next "
                          f"{c['next_seq']}, pending {c['pending']}, redelivered {c['redelivered']}, dead-lettered "
                          f"{c['dead_lettered']}")
        elif cmd == "rm":
            bus.queue_delete(args.name)
        elif cmd == "rm-consumer":
            bus.consumer_delete(args.name, args.consumer)
        else:
            print(f"purged {bus.queue_purge(args.name)} messages")
    return 0


def _format(msg: Message, as_json: bool) -> str:
    if not as_json:
        text = msg.data.decode(errors="replace")
        if text.endswith("\n"):
            text = text[:-1]
        return msg.topic + " " + text.replace("\r", "\\r").replace("\n", "\\n")
    obj: dict[str, Any] = {"topic": msg.topic, "data": msg.data.decode(errors="replace"), "headers": msg.headers,
                           "seq": msg.seq, "delivery_count": msg.delivery_count, "stored_at": msg.stored_at,
                           "sender": {"uid": msg.sender.uid, "gid": msg.sender.gid, "pid": msg.sender.pid}}
    if msg.sender.origin:
        obj["sender"]["origin"] = msg.sender.origin
    return json.dumps(obj, ensure_ascii=False)


def _consume(args: argparse.Namespace) -> int:
    count = 0
    with connect(args.socket, name="hostbus-cli") as bus:
        cons = bus.consume(args.queue, args.consumer, start=_start(args.start), ack_wait=args.ack_wait,
                           max_deliver=args.max_deliver, max_inflight=args.max_inflight, filter=args.filter)
        out = sys.stdout
        deadline = None if args.timeout is None else time.monotonic() + args.timeout
        while args.count is None or count < args.count:
            wait = None if deadline is None else deadline - time.monotonic()
            if wait is not None and wait <= 0:
                break
            try:
                msg = cons.next(timeout=wait)
            except HostbusTimeout:
                break
            out.write(_format(msg, args.json) + "\n")
            if cons.pending == 0:
                out.flush()
            if not args.no_ack:
                msg.ack()
            count += 1
        out.flush()
        bus.flush()  # the acknowledgements have reached the broker
    if args.count is not None and count < args.count:
        print(f"hostbus: timed out after {args.timeout} s with {count} of {args.count} messages", file=sys.stderr)
        return EXIT_ERROR
    return 0


def publish_confirmed(bus: Any, topic: str, payloads: Any, headers: dict[str, str] | None) -> int:
    """``hostbus pub --confirm``: many in flight, one line per message with where it was stored."""
    window: list[Any] = []

    def settle(fut: Any) -> None:
        seqs = fut.result(30)
        if not seqs:
            print("hostbus: stored in no queue (no topic queue captures this topic)", file=sys.stderr)
        print(" ".join(f"{name}={seq}" for name, seq in sorted(seqs.items())) or "-")

    for data in payloads:
        window.append(bus.publish_async(topic, data, headers))
        if len(window) >= 1024:
            settle(window.pop(0))
    for fut in window:
        settle(fut)
    return 0
