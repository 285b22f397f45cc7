"""The ``hostbus`` command: publish, subscribe, request and read statistics from the shell."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
from typing import Any

from hostbus import aio, bench, cli_queues, paths
from hostbus.client import connect
from hostbus.errors import HostbusError, NoRespondersError
from hostbus.errors import TimeoutError as HostbusTimeout
from hostbus.message import Message

EXIT_ERROR = 1


def _headers(pairs: list[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"hostbus: -H takes KEY=VALUE, not {pair!r}")
        out[key] = value
    return out


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="hostbus",
        description="Talk to the hostbus broker: publish, subscribe, request, topic queues, statistics, identity, "
        "benchmark.",
        epilog="The socket is --socket, else $HOSTBUS_SOCKET, else this user's instance "
        f"($XDG_RUNTIME_DIR/hostbus/{paths.SOCKET_NAME}) if it exists, else the system instance "
        f"({paths.SYSTEM_RUNTIME_DIR / paths.SOCKET_NAME}). Exit status: 0 success, 1 error, 2 usage.",
    )
    p.add_argument("--socket", metavar="PATH", help="the broker's socket")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    pub = sub.add_parser("pub", help="publish a message", description="Publish DATA (or stdin) on TOPIC.")
    pub.add_argument("topic")
    pub.add_argument("data", nargs="?", help="the payload; without it, all of stdin is one message")
    pub.add_argument("--lines", action="store_true", help="publish each line of stdin as a message")
    pub.add_argument("-H", "--header", action="append", default=[], metavar="K=V", help="a header (repeatable)")
    pub.add_argument("--retain", action="store_true", help="keep as the topic's retained message")
    pub.add_argument("--shm", action="store_true",
                     help="publish through a shared-memory ring instead of the socket (docs/shm.md)")
    pub.add_argument("--confirm", action="store_true",
                     help="wait until the topic queues capturing TOPIC stored each message; print QUEUE=SEQ per "
                     "message (status 1 if one was refused: queue full, too large, storage error, denied)")

    s = sub.add_parser("sub", help="print messages", description="Print messages matching PATTERN...: "
                       "one line per message, 'TOPIC DATA' (a final newline of DATA is dropped and inner "
                       "newlines are shown as \\n; --json gives the exact data).")
    s.add_argument("patterns", nargs="+", metavar="PATTERN", help="topic pattern; '*' one token, '>' the rest")
    s.add_argument("--group", metavar="G", help="join queue group G (each message to one member)")
    s.add_argument("--count", type=int, metavar="N", help="exit after N messages")
    s.add_argument("--timeout", type=float, metavar="S",
                   help="exit after S seconds (status 1 if --count messages did not all arrive)")
    s.add_argument("--json", action="store_true",
                   help="one JSON object per line: topic, data (text), headers, sender {uid, gid, pid, origin if any}, "
                   "reply_to and retained when set")
    s.add_argument("--shm", action="store_true",
                   help="receive through a shared-memory ring instead of the socket (docs/shm.md)")

    r = sub.add_parser("req", help="send a request, print the reply", description="Send DATA to TOPIC as a "
                       "request and print the reply's data.")
    r.add_argument("topic")
    r.add_argument("data", nargs="?", default="", help="the payload (default: empty)")
    r.add_argument("--timeout", type=float, default=5.0, metavar="S", help="seconds to wait (default 5)")
    r.add_argument("-H", "--header", action="append", default=[], metavar="K=V", help="a header (repeatable)")

    st = sub.add_parser("stats", help="print broker statistics",
                        description="Connections, subscriptions, messages in/out/dropped, FIFOs (messages, "
                        "skipped or dropped by kind), shared-memory rings and their fill, topic queues (messages, "
                        "consumers, pending, redelivered, dead-lettered, durability and its loss window), "
                        "per-topic counts.")
    st.add_argument("--json", action="store_true", help="print the statistics as JSON")

    w = sub.add_parser("whoami", help="print who the broker sees you as",
                       description="Print the identity the broker verified for this process (uid, user, groups, "
                       "systemd unit, the principals access rules name) and, with --topic, whether it may "
                       "publish, subscribe and manage queues there, with the rule that decides.")
    w.add_argument("--topic", metavar="TOPIC", help="a topic or pattern to ask about")
    w.add_argument("--json", action="store_true", help="print the answer as JSON")
    cli_queues.add_parsers(sub)
    bench.add_parser(sub)
    return p


def cmd_whoami(args: argparse.Namespace) -> int:
    with connect(args.socket, name="hostbus-cli") as bus:
        me = bus.whoami(args.topic)
    if args.json:
        print(json.dumps(me, indent=2))
        return 0
    ident = me["identity"]
    groups = ", ".join(ident.get("groups", [])) or "-"
    print(f"{'uid':<11}{ident['uid']} ({ident.get('user') or 'no user name'})")
    print(f"{'gid':<11}{ident['gid']}")
    print(f"{'groups':<11}{groups}")
    print(f"{'pid':<11}{ident['pid']}")
    print(f"{'unit':<11}{ident.get('unit') or '-'}")
    print(f"{'principals':<11}{' '.join(ident.get('principals', []))}")
    if ident.get("unknown"):  # rules refusing by these kinds of name refuse this process
        print(f"{'unknown':<11}{' '.join(ident['unknown'])}")
    for action, verdict in me.get("access", {}).items():
        allowed = verdict["allowed"]
        word = "yes" if allowed is True else "no" if allowed is False else str(allowed)
        print(f"{action:<11}{word:<12}{verdict['rule']}")
    return 0


def cmd_pub(args: argparse.Namespace) -> int:
    headers = _headers(args.header) or None
    if args.confirm:
        if args.shm or args.retain:
            raise SystemExit("hostbus: --confirm goes with neither --shm nor --retain")
        with connect(args.socket, name="hostbus-cli") as bus:
            payloads = ((line.rstrip(b"\n") for line in sys.stdin.buffer) if args.lines else
                        [args.data.encode() if args.data is not None else sys.stdin.buffer.read()])
            return cli_queues.publish_confirmed(bus, args.topic, payloads, headers)
    with connect(args.socket, name="hostbus-cli") as bus:
        target: Any = bus.shm_publisher() if args.shm else bus
        if args.lines:
            for line in sys.stdin.buffer:
                target.publish(args.topic, line.rstrip(b"\n"), headers, args.retain)
        else:
            data = args.data.encode() if args.data is not None else sys.stdin.buffer.read()
            target.publish(args.topic, data, headers, args.retain)
        target.flush()
        if args.shm:
            target.close()
    return 0


def _format(msg: Message, as_json: bool) -> str:
    if not as_json:  # one line per message: a final newline is dropped, inner ones shown as \n
        text = msg.data.decode(errors="replace")
        if text.endswith("\n"):
            text = text[:-1]
        return msg.topic + " " + text.replace("\r", "\\r").replace("\n", "\\n")
    obj: dict[str, Any] = {
        "topic": msg.topic,
        "data": msg.data.decode(errors="replace"),
        "headers": msg.headers,
        "sender": {"uid": msg.sender.uid, "gid": msg.sender.gid, "pid": msg.sender.pid},
    }
    if msg.sender.origin:
        obj["sender"]["origin"] = msg.sender.origin
    if msg.reply_to:
        obj["reply_to"] = msg.reply_to
    if msg.retained:
        obj["retained"] = True
    return json.dumps(obj, ensure_ascii=False)


async def _sub(args: argparse.Namespace) -> int:
    loop = asyncio.get_running_loop()
    done = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, done.set)
    queue: asyncio.Queue[Message | HostbusError] = asyncio.Queue(maxsize=4096)
    bus = await aio.connect(args.socket, name="hostbus-cli")
    failure: BaseException | None = None
    count = 0
    try:
        subs = [await bus.subscribe(p, args.group, via="shm" if args.shm else "socket") for p in args.patterns]

        async def pump(sub: aio.Subscription) -> None:
            try:
                async for msg in sub:
                    await queue.put(msg)
            except HostbusError as exc:
                await queue.put(exc)

        out = sys.stdout
        deadline = loop.time() + args.timeout if args.timeout is not None else None
        # Nothing below raises inside the task group: failures are kept and raised after it, so
        # they reach main() as themselves, not wrapped in an ExceptionGroup.
        async with asyncio.TaskGroup() as tg:
            tasks = [tg.create_task(pump(s)) for s in subs]
            stopper = tg.create_task(done.wait())
            try:
                while args.count is None or count < args.count:
                    remaining = None if deadline is None else deadline - loop.time()
                    if remaining is not None and remaining <= 0:
                        break
                    getter = asyncio.ensure_future(queue.get())
                    finished, _ = await asyncio.wait({getter, stopper}, timeout=remaining,
                                                     return_when=asyncio.FIRST_COMPLETED)
                    if getter not in finished:
                        getter.cancel()
                        break
                    item = getter.result()
                    if isinstance(item, HostbusError):
                        failure = item
                        break
                    out.write(_format(item, args.json) + "\n")
                    count += 1
                    if queue.empty():
                        out.flush()
                out.flush()
            except (BrokenPipeError, HostbusError) as exc:
                failure = exc
            finally:
                for t in [*tasks, stopper]:
                    t.cancel()
        if failure is not None:
            raise failure
        missed = sum(s.missed for s in subs)
        if missed:
            print(f"hostbus: {missed} messages were dropped before they reached this subscriber",
                  file=sys.stderr)
        if args.count is not None and count < args.count and not done.is_set():
            print(f"hostbus: timed out after {args.timeout} s with {count} of {args.count} messages",
                  file=sys.stderr)
            return EXIT_ERROR
        return 0
    finally:
        await bus.close()


def cmd_req(args: argparse.Namespace) -> int:
    with connect(args.socket, name="hostbus-cli") as bus:
        try:
            reply = bus.request(args.topic, args.data, timeout=args.timeout, headers=_headers(args.header) or None)
        except NoRespondersError:
            print(f"hostbus: no responders on {args.topic!r}", file=sys.stderr)
            return EXIT_ERROR
        except HostbusTimeout:
            print(f"hostbus: no reply on {args.topic!r} within {args.timeout} s", file=sys.stderr)
            return EXIT_ERROR
    sys.stdout.buffer.write(reply.data + (b"" if reply.data.endswith(b"\n") else b"\n"))
    return 0


def cmd_stats(args: argparse.Namespace) -> int:
    with connect(args.socket, name="hostbus-cli") as bus:
        st = bus.stats()
    if args.json:
        print(json.dumps(st, indent=2))
        return 0
    m = st["messages"]
    rows = [
        ("server", st["server"]),
        ("uptime", f"{st['uptime_s']:.1f} s"),
        ("connections", f"{st['connections']} (total {st['connections_total']}, "
                        f"rejected {st['connections_rejected']})"),
        ("subscriptions", f"{st['subscriptions']} (queue groups {st['queue_groups']})"),
        ("retained", f"{st['retained']['topics']} topics, {st['retained']['bytes']} bytes"),
        ("messages in", f"{m['in']} ({m['bytes_in']} bytes)"),
        ("messages out", f"{m['out']} ({m['bytes_out']} bytes)"),
        ("dropped", str(m["dropped"])),
        ("no responders", str(m["no_responders"])),
        ("queued bytes", str(st["queued_bytes"])),
        ("peer errors", str(st["peer_errors"])),
    ]
    access = st.get("access")
    if access is not None:
        denied = ", ".join(f"{k} {v}" for k, v in sorted(access["denied"].items())) or "none"
        rows.append(("access", f"default {access['default']}, {access['rules']} rules, denied: {denied}"))
    for key, value in rows:
        print(f"{key:<15}{value}")
    for uid, u in st.get("uids", {}).items():
        print(f"uid {uid:<11}{u['connections']} connections, {u['subscriptions']} subscriptions, "
              f"{u['queued_bytes']} bytes queued, {u.get('written_bytes', 0)} being written")
    for path, f in st.get("fifos", {}).items():
        problems = f.get("errors") or f.get("dropped") or {}
        detail = ", ".join(f"{k} {v}" for k, v in sorted(problems.items())) or "none"
        label = "skipped" if f["kind"] == "ingress" else "dropped"
        print(f"fifo {f['kind']:<8}{path}: {f['messages']} messages ({f['bytes']} bytes), {label}: {detail}")
    for name, z in st.get("zmq", {}).items():
        errors = ", ".join(f"{k} {v}" for k, v in sorted(z["errors"].items())) or "none"
        print(f"zmq {name}: in {z['in']}, out {z['out']}, dropped {z['dropped']}, skipped: {errors}, "
              f"prefixes {z['prefixes']}")
    for r in st.get("rings", []):
        flow = (f"{r['messages_in']} messages in, {r['slots_in']} slots" if r["direction"] == "publish" else
                f"{r['messages_out']} messages out, {r['filled']}/{r['slots']} slots filled, dropped {r['dropped']}")
        print(f"ring {r['direction']:<8}client {r['client']} (uid {r['uid']}): {r['slots']} x {r['slot_size']} bytes, "
              f"{r['state']}, {flow}")
    for q in st.get("queues", {}).values():
        print("queue " + cli_queues.describe_queue(q))
    if st["topics"]:
        print("topics:")
        width = max(len(t) for t in st["topics"])
        for topic, n in st["topics"].items():
            print(f"  {topic:<{width}}  {n}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.command == "pub":
            return cmd_pub(args)
        if args.command == "sub":
            return asyncio.run(_sub(args))
        if args.command == "req":
            return cmd_req(args)
        if args.command == "whoami":
            return cmd_whoami(args)
        if args.command == "bench":
            return bench.run(args, str(args.socket or paths.default_socket()))
        if args.command in ("queue", "consume"):
            return cli_queues.run(args)
        return cmd_stats(args)
    except HostbusError as exc:
        print(f"hostbus: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except BrokenPipeError:
        # The reader went away (| head): not an error. Point stdout at /dev/null so the
        # interpreter's final flush does not complain about the closed pipe.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
