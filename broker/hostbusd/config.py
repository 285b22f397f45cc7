"""Configuration: the TOML file's schema as pydantic models, with every default and its reason.

``Config.model_json_schema()`` generates ``config/hostbus.schema.json``; ``config/hostbus.toml``
is the commented example. Every bound the broker enforces is a field here.
"""

from __future__ import annotations

import tomllib
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from hostbus import topics
from hostbusd.core.acl import principal_problem

MiB = 1024 * 1024

Policy = Literal["drop-oldest", "drop-new", "disconnect"]


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SocketConfig(_Section):
    dir_mode: int | None = Field(
        None, ge=0, le=0o777,
        description="Mode of the runtime directory when hostbusd creates it (TOML: 0o755). The socket's "
        "access is decided by this directory, set before the socket exists. Default: 0o700 for a user "
        "instance (only its owner may connect), 0o755 for root's system instance.",
    )
    mode: int | None = Field(
        None, ge=0, le=0o777,
        description="Mode of the socket file, applied through the umask at bind time (with socket.group: bound "
        "owner-only under a temporary name, given group and mode, then linked into place). "
        "Default: 0o600 for a user instance, 0o666 for root's system instance (any local user may connect; "
        "who may do what is decided per message from the kernel-verified identity).",
    )

    group: str | None = Field(
        None, min_length=1,
        description="Group (a name) of the runtime directory and the socket, set before either is reachable "
        "under its name: with dir_mode 0o750 and mode 0o660 only this group's members (and the daemon's "
        "user) may connect. Default: the daemon's primary group.",
    )

    @field_validator("dir_mode")
    @classmethod
    def _not_writable_by_others(cls, mode: int | None) -> int | None:
        if mode is not None and mode & 0o022:
            raise ValueError(f"0o{mode:o} lets group or others write the directory and replace the "
                             "socket; allowed: a mode without group/other write bits, such as 0o755 or 0o750")
        return mode


class LimitsConfig(_Section):
    max_frame_bytes: int = Field(
        8 * MiB, ge=64 * 1024, le=1024 * MiB,
        description="Largest frame (topic, headers and payload of one message) a client may send. Checked "
        "from the 6-byte header before the body is buffered; bounds the memory of one message. 8 MiB fits "
        "camera frames and file chunks; larger payloads belong in shared memory.",
    )
    max_connections: int = Field(
        1024, ge=1,
        description="Connections the daemon accepts at once; one more is told CONNECTION_LIMIT and closed. "
        "Keeps file descriptors and memory bounded (stay below the process's RLIMIT_NOFILE).",
    )
    max_connections_per_uid: int = Field(
        256, ge=1,
        description="Connections one uid may hold at once (root included); one more is told CONNECTION_LIMIT. "
        "A quarter of max_connections, so one user cannot take every slot.",
    )
    max_subscriptions_per_uid: int = Field(
        50000, ge=1,
        description="Subscriptions one uid may hold across all its connections; one more is refused with LIMIT.",
    )
    max_queued_bytes_per_uid: int = Field(
        256 * MiB, ge=64 * 1024,
        description="Bytes of messages held for all connections of one uid that are not reading; past it that "
        "uid's subscriptions apply their overflow policies, and other users' connections are unaffected.",
    )
    max_rings_per_uid: int = Field(
        8, ge=0,
        description="Shared-memory rings one uid may hold at once (each is memory, a helper process and two "
        "semaphores); one more is refused with LIMIT.",
    )
    max_consumers_per_uid: int = Field(
        256, ge=0,
        description="Topic-queue consumers one uid may attach at once across its connections (each connection "
        "consuming counts once); one more is refused with LIMIT.",
    )
    max_subscriptions_per_connection: int = Field(
        10000, ge=1,
        description="Subscriptions one connection may hold. Each costs an index entry and a queue.",
    )
    max_queued_bytes_per_connection: int = Field(
        64 * MiB, ge=64 * 1024,
        description="Bytes of messages held for one connection that is not reading, across all its "
        "subscriptions; past it each subscription's overflow policy applies. With the write batch and the "
        "transport buffer, this bounds what a stalled client can make the broker hold.",
    )
    write_batch_bytes: int = Field(
        256 * 1024, ge=4096,
        description="Output collected for a peer before it is written without waiting for the end of the "
        "loop iteration. Large enough to batch thousands of small messages per write.",
    )
    handshake_timeout: float = Field(
        5.0, gt=0,
        description="Seconds a new connection has to send HELLO; then it is closed with TIMEOUT.",
    )
    frame_timeout: float = Field(
        10.0, gt=0,
        description="Seconds a frame may stay partly received; a client that sends half a frame and "
        "stalls is closed with TIMEOUT so it cannot pin a buffer forever.",
    )
    close_timeout: float = Field(
        2.0, gt=0,
        description="Seconds a closing connection gets to take its final error frame before it is aborted.",
    )


class SubscriptionsConfig(_Section):
    policy: Policy = Field(
        "drop-oldest",
        description="Overflow policy of a subscription that does not ask for one: drop-oldest keeps the "
        "freshest data (telemetry), drop-new keeps order from the start, disconnect ends the slow client.",
    )
    max_queued_msgs: int = Field(
        65536, ge=1,
        description="Messages queued per subscription while its connection cannot take more (default for "
        "subscriptions that do not ask).",
    )
    max_queued_bytes: int = Field(
        16 * MiB, ge=1024,
        description="Bytes queued per subscription while its connection cannot take more (default for "
        "subscriptions that do not ask; a request above max_queued_bytes_per_connection is capped).",
    )


class RetainedConfig(_Section):
    max_topics: int = Field(
        10000, ge=0,
        description="Topics with a retained message. A subscribe scans them, so this bounds its cost too; "
        "past it a retained publish is delivered but not stored, and the publisher gets a LIMIT error.",
    )
    max_bytes: int = Field(64 * MiB, ge=0, description="Total bytes of retained messages.")
    max_topics_per_uid: int = Field(
        2500, ge=0,
        description="Retained topics the publishers of one uid may hold (a topic belongs to the uid that "
        "retained its current message): a quarter of max_topics, so one user cannot fill the store for the others.",
    )
    max_bytes_per_uid: int = Field(16 * MiB, ge=0, description="Retained bytes the publishers of one uid may hold.")


class FifoIngressConfig(_Section):
    path: str = Field(description="Path of the FIFO; relative paths are inside the runtime directory.")
    format: Literal["lines", "json", "auto", "frames"] = Field(
        "auto", description="lines: 'TOPIC PAYLOAD' per line; json: one object per line; auto: a line starting "
        "with '{' is JSON, others are lines; frames: native PUB frames.",
    )
    mode: int = Field(
        0o600, ge=0, le=0o777,
        description="File mode. FIFOs carry no peer identity: the mode, owner and group decide who may publish. "
        "Default: only the daemon's user.",
    )
    group: str | None = Field(
        None, description="Group of the FIFO (a name), e.g. to let that group write (mode 0o620).")
    topic_prefix: str = Field(
        "", description="If set, only topics starting with this prefix are accepted from this FIFO; others are "
        "skipped and counted as denied_topic.",
    )


class FifoSinkConfig(_Section):
    path: str = Field(description="Path of the FIFO; relative paths are inside the runtime directory.")
    subjects: list[str] = Field(min_length=1, description="Patterns whose messages are written to the FIFO.")
    format: Literal["lines", "json"] = Field(
        "lines", description="lines: 'TOPIC PAYLOAD' (newlines in the payload written as \\n); json: one object per "
        "line with topic, data, headers and sender.",
    )
    mode: int = Field(0o600, ge=0, le=0o777, description="File mode: who may read the FIFO.")
    group: str | None = Field(None, description="Group of the FIFO (a name), e.g. to let that group read (mode 0o640).")
    max_queued_msgs: int = Field(
        1024, ge=1,
        description="Messages held while the reader has not emptied the pipe; past it new ones are dropped and "
        "counted (the broker never waits for a sink's reader).",
    )

    @field_validator("subjects")
    @classmethod
    def _valid_patterns(cls, subjects: list[str]) -> list[str]:
        for pattern in subjects:
            problem = topics.pattern_problem(pattern)
            if problem is not None:
                raise ValueError(f"invalid pattern {pattern!r}: {problem}")
        return subjects


class FifoConfig(_Section):
    default_ingress: bool = Field(
        True, description="Create <runtime-dir>/publish.fifo (format auto, mode 0o600) besides the FIFOs listed "
        "in [[fifo.ingress]].",
    )
    ingress: list[FifoIngressConfig] = Field(default_factory=list, description="More publish FIFOs.")
    sink: list[FifoSinkConfig] = Field(default_factory=list, description="FIFOs the daemon writes messages to.")
    max_line_bytes: int = Field(
        65536, ge=256, le=64 * MiB,
        description="Longest line a publish FIFO accepts; a longer one is skipped and counted (too_long). Bounds the "
        "buffer of one FIFO. Lines up to PIPE_BUF (4096 bytes) are written atomically by concurrent writers; longer "
        "ones need a FIFO of their own.",
    )
    partial_line_timeout: float = Field(
        1.0, gt=0,
        description="Seconds a partial line may wait for its end. Then its writer is presumed dead and the fragment "
        "is dropped (counted as partial), so it cannot be glued to the next writer's line.",
    )
    pipe_bytes: int = Field(
        1024 * 1024, ge=4096,
        description="Kernel buffer requested for each FIFO (F_SETPIPE_SZ; capped by /proc/sys/fs/pipe-max-size): "
        "room for bursts while the daemon is busy.",
    )


class ZmqConfig(_Section):
    enabled: bool = Field(
        False, description="Run the ZeroMQ gateway. Off by default: every endpoint is a way in without a kernel "
        "identity, so it is opened only when asked for.",
    )
    name: str = Field(
        "zmq", min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_.-]+$",
        description="The gateway's name: its messages carry the origin zmq:<name>.",
    )
    xsub: str = Field(
        "", description="Endpoint ZeroMQ PUB sockets connect to (the gateway binds an XSUB socket). Default: "
        "ipc://<runtime-dir>/zmq-publish.ipc. tcp:// endpoints must be on a loopback address unless allow_remote.",
    )
    xpub: str = Field(
        "", description="Endpoint ZeroMQ SUB sockets connect to (the gateway binds an XPUB socket). Default: "
        "ipc://<runtime-dir>/zmq-subscribe.ipc.",
    )
    allow_remote: bool = Field(
        False, description="Allow tcp:// endpoints on non-loopback addresses (other hosts could then publish and "
        "subscribe without any identity); a warning is logged when used.",
    )
    topic_prefix: str = Field(
        "", pattern=r"^$|\.$",
        description="If set (ending with '.'), ZeroMQ peers may only publish, and only receive, topics under it.",
    )
    mode: int = Field(
        0o600, ge=0, le=0o777,
        description="Mode of the ipc:// endpoint files. ZeroMQ peers have no identity, so this (with the runtime "
        "directory) is the gateway's access control: only the daemon's user by default.",
    )
    max_message_bytes: int = Field(
        1024 * 1024, ge=1024, le=1024 * MiB,
        description="Largest ZeroMQ message (all frames) accepted from a PUB peer; larger ones are dropped and "
        "counted as too_large. Also set as ZMQ_MAXMSGSIZE, so ZeroMQ refuses them early.",
    )
    hwm: int = Field(
        10000, ge=1,
        description="ZeroMQ high-water mark (messages) of the gateway's sockets. The XPUB socket never drops at it "
        "(XPUB_NODROP): the gateway then queues in its bounded hostbus queue (subscriptions settings), so every "
        "loss is counted.",
    )


def _check_principals(entries: list[str] | None) -> list[str] | None:
    for entry in entries or ():
        problem = principal_problem(entry)
        if problem is not None:
            raise ValueError(f"principal {entry!r}: {problem}")
    return entries


class AccessConfig(_Section):
    default: Literal["allow", "deny"] | None = Field(
        None, description="What happens when no [[acl]] rule names an action for a topic. Default: deny when users "
        "other than the daemon's can reach the socket (the system instance, or any instance whose runtime "
        "directory and socket modes let a group or others in), allow when only the daemon's own user can "
        "(a user instance).",
    )


class AclRule(_Section):
    topic: str = Field(description="Topic pattern the rule is about (wildcards allowed). The most specific "
                       "matching rule that names an action decides it (docs/security.md).")
    publish: list[str] | None = Field(
        None, description="Who may publish: '*', uid:N, user:NAME, group:NAME, unit:NAME, zmq:NAME; '!' before an "
        "entry refuses it. Absent: this rule does not decide publishing. []: nobody.",
    )
    subscribe: list[str] | None = Field(
        None, description="Who may subscribe (also in queue groups and, later, consume topic queues on these "
        "subjects). Same form as publish.",
    )
    manage: list[str] | None = Field(None, description="Who may declare or delete topic queues on these subjects.")

    @field_validator("topic")
    @classmethod
    def _valid_topic(cls, pattern: str) -> str:
        problem = topics.pattern_problem(pattern)
        if problem is not None:
            raise ValueError(f"invalid pattern {pattern!r}: {problem}")
        if pattern.split(".", maxsplit=1)[0] == "_INBOX":
            raise ValueError("replies to inboxes need no rule and cannot be restricted; allowed: any other pattern")
        return pattern

    _principals = field_validator("publish", "subscribe", "manage")(_check_principals)


class StatsConfig(_Section):
    max_topics: int = Field(
        1000, ge=0,
        description="Topics with their own message counter in `hostbus stats`; further topics are "
        "counted together as '(other)', so the counters cannot grow without bound.",
    )


class LogConfig(_Section):
    format: Literal["auto", "console", "json", "journal"] = Field(
        "auto", description="auto: journal lines when stderr goes to the journal, readable console lines on a "
        "terminal, JSON lines otherwise. journal: JSON lines with a <priority> prefix that journald turns into "
        "the entry's PRIORITY.",
    )
    level: Literal["debug", "info", "warning", "error"] = Field("info", description="Lowest level logged.")
    peer_error_interval: float = Field(
        10.0, ge=0,
        description="Seconds between two log lines about misbehaving peers of the same kind; the lines "
        "between are counted and the count is logged with the next one, so a flood cannot fill the disk.",
    )


class ShmConfig(_Section):
    enabled: bool = Field(True, description="Let clients attach shared-memory rings (docs/shm.md).")
    max_slots: int = Field(4096, ge=2, le=65536, description="Most slots a ring may have.")
    max_slot_size: int = Field(
        4 * MiB, ge=4096, le=256 * MiB,
        description="Largest slot, in bytes. A message larger than a slot spans consecutive slots.",
    )
    max_ring_bytes: int = Field(
        256 * MiB, ge=64 * 1024,
        description="Largest ring (slots x slot_size): shared memory one ring may take.",
    )
    max_message_bytes: int = Field(
        8 * MiB, ge=1024, le=1024 * MiB,
        description="Largest message through a ring (topic, headers, payload). A client is told before it "
        "writes anything; the broker refuses a larger one from a broken client and ends that ring. The limit in "
        "force is the smaller of this and limits.max_frame_bytes: a message from a ring may go to socket "
        "subscribers too.",
    )
    attach_timeout: float = Field(
        5.0, gt=0,
        description="Seconds a client has to map a ring it asked for; then the ring is removed.",
    )


QUEUE_NAME = r"^[A-Za-z0-9_-]{1,64}$"


class QueueConfig(_Section):
    """A topic queue ([[queues]] in the file; the same fields at runtime through queue_add)."""

    name: str = Field(pattern=QUEUE_NAME, description="Name: letters, digits, '_' and '-', at most 64.")
    subjects: list[str] = Field(
        min_length=1, max_length=64,
        description="Patterns whose messages the queue stores (a publish on a matching topic is captured).",
    )
    storage: Literal["memory", "file"] = Field(
        "file", description="file: segment files under state_dir/queues/NAME; memory: nothing survives a restart.",
    )
    durability: Literal["always", "interval", "never"] = Field(
        "always",
        description="When stored messages reach the disk (file storage): always = fsync before the publisher's "
        "confirm and before delivery (group commit: one fsync for every message that arrived meanwhile); "
        "interval = fsync every sync_interval_ms (what is lost in a crash: up to that long); never = when the OS "
        "writes (a crash of the machine may lose anything not yet written; a crash of hostbusd loses nothing).",
    )
    sync_interval_ms: int = Field(100, ge=1, le=60_000, description="fsync period under durability = interval.")
    max_msgs: int = Field(1_000_000, ge=1, description="Most messages kept; past it, discard decides.")
    max_bytes: int = Field(
        1024 * MiB, ge=1024, description="Most bytes kept (records as stored); past it, discard decides.",
    )
    max_age: float = Field(
        0, ge=0, le=100 * 365 * 86400, allow_inf_nan=False,
        description="Seconds a message is kept at most (0: no limit).",
    )
    max_msg_size: int = Field(
        1 * MiB, ge=1, le=1024 * MiB,
        description="Largest message (payload) stored; a larger one is refused (its publisher is told).",
    )
    discard: Literal["old", "new"] = Field(
        "old", description="At a limit: old = remove the oldest messages; new = refuse the new one "
        "(a confirmed publisher gets QUEUE_FULL).",
    )
    retention: Literal["limits", "acked"] = Field(
        "limits", description="limits: messages stay until a limit removes them (replay sees them after they "
        "were acknowledged); acked: a message is removed once every consumer of the queue has acknowledged it.",
    )
    dead_letter: str | None = Field(
        None, description="Topic a message goes to after max_deliver deliveries (default: $DLQ.<name>).",
    )
    duplicate_window: float = Field(
        120.0, ge=0, le=7 * 86400, allow_inf_nan=False,
        description="Seconds during which a second message with the same Hostbus-Msg-Id header is not stored "
        "again (its publisher is confirmed with the first one's seq). 0: no duplicate detection.",
    )

    @field_validator("subjects")
    @classmethod
    def _patterns(cls, subjects: list[str]) -> list[str]:
        for p in subjects:
            problem = topics.pattern_problem(p)
            if problem is not None:
                raise ValueError(f"{p!r} is not a pattern: {problem}")
            if p.split(".")[0] == "_INBOX":
                raise ValueError(f"{p!r}: reply inboxes cannot be captured")
        return subjects

    @field_validator("dead_letter")
    @classmethod
    def _topic(cls, topic: str | None) -> str | None:
        if topic is not None:
            problem = topics.topic_problem(topic)
            if problem is not None:
                raise ValueError(f"{topic!r} is not a topic: {problem}")
            if topic.split(".")[0] == "_INBOX":
                raise ValueError(f"{topic!r}: dead letters cannot go to a reply inbox")
        return topic

    @model_validator(mode="after")
    def _own_broker_topic(self) -> QueueConfig:
        own = f"$DLQ.{self.name}"
        if self.dead_letter and self.dead_letter.startswith("$") and not (
                self.dead_letter == own or self.dead_letter.startswith(own + ".")):
            raise ValueError(f"dead_letter {self.dead_letter!r}: a broker topic ('$...') here must be {own!r} or "
                             f"under it; allowed: that, or a topic the declarer may publish on")
        return self

    @property
    def dead_letter_topic(self) -> str:
        return self.dead_letter or f"$DLQ.{self.name}"


class StoreConfig(_Section):
    max_queues: int = Field(
        256, ge=0, description="Topic queues the daemon holds (declared in the file or at runtime).",
    )
    max_consumers_per_queue: int = Field(256, ge=1, description="Named consumers one queue may have.")
    segment_bytes: int = Field(
        64 * MiB, ge=64 * 1024, le=1024 * MiB,
        description="Size at which a queue's segment file is closed and a new one begun; retention deletes "
        "whole segments (the memory index costs 16 bytes per stored message).",
    )
    state_interval: float = Field(
        1.0, gt=0, le=60,
        description="Seconds between saves of consumer positions (ack floor and pending set) when they changed; "
        "after a crash, acknowledgements of the last interval may be delivered again (at-least-once).",
    )
    max_pending_confirms: int = Field(
        65536, ge=1,
        description="Confirmed publishes one connection may have waiting for storage; one more is refused with "
        "LIMIT (bounds the memory a publisher that never reads can hold).",
    )
    deliver_batch: int = Field(
        256, ge=1, le=65536,
        description="Messages handed to a queue's consumers per turn of the loop (fairness with other peers).",
    )


class ShutdownConfig(_Section):
    drain_timeout: float = Field(
        5.0, ge=0,
        description="On SIGTERM/SIGINT: seconds to deliver what is queued before connections are closed.",
    )


class Config(_Section):
    """hostbusd configuration. Every key is optional; command-line flags override the file."""

    runtime_dir: str | None = Field(
        None, description="Directory of the socket. Default: /run/hostbus for root, else "
        "$XDG_RUNTIME_DIR/hostbus, else /tmp/hostbus-<uid>.",
    )
    state_dir: str | None = Field(
        None, description="Directory for stored state. Default: /var/lib/hostbus for root, else "
        "$XDG_STATE_HOME/hostbus, else ~/.local/state/hostbus.",
    )
    socket: SocketConfig = SocketConfig()
    limits: LimitsConfig = LimitsConfig()
    subscriptions: SubscriptionsConfig = SubscriptionsConfig()
    retained: RetainedConfig = RetainedConfig()
    fifo: FifoConfig = FifoConfig()
    zmq: ZmqConfig = ZmqConfig()
    shm: ShmConfig = ShmConfig()
    store: StoreConfig = StoreConfig()
    queues: list[QueueConfig] = Field(
        default_factory=list, description="Topic queues declared here ([[queues]] tables); more at runtime.",
    )
    access: AccessConfig = AccessConfig()
    acl: list[AclRule] = Field(default_factory=list, description="Access rules ([[acl]] tables), see access.default.")
    stats: StatsConfig = StatsConfig()
    log: LogConfig = LogConfig()
    shutdown: ShutdownConfig = ShutdownConfig()

    @model_validator(mode="after")
    def _sinks_can_subscribe(self) -> Config:
        for i, sink in enumerate(self.fifo.sink):
            if len(sink.subjects) > self.limits.max_subscriptions_per_connection:
                raise ValueError(f"fifo.sink.{i}.subjects has {len(sink.subjects)} patterns, more than "
                                 "limits.max_subscriptions_per_connection allows")
            for pattern in sink.subjects:
                if pattern.split(".")[0] == "_INBOX":
                    raise ValueError(f"fifo.sink.{i}.subjects: {pattern!r} names reply inboxes, which cannot be "
                                     "subscribed; allowed: any other pattern")
        return self

    @model_validator(mode="after")
    def _one_rule_per_pattern(self) -> Config:
        seen: dict[str, int] = {}
        for i, rule in enumerate(self.acl):
            if rule.topic in seen:
                raise ValueError(f"acl.{i}.topic {rule.topic!r} is also the topic of acl.{seen[rule.topic]}: "
                                 "allowed: one rule per pattern (merge their lists)")
            seen[rule.topic] = i
        return self

    @model_validator(mode="after")
    def _one_queue_per_name(self) -> Config:
        names = [q.name for q in self.queues]
        for i, name in enumerate(names):
            if name in names[:i]:
                raise ValueError(f"queues.{i}.name {name!r} is declared twice; allowed: one [[queues]] per name")
        return self

    @model_validator(mode="after")
    def _lines_fit_in_frames(self) -> Config:
        if self.fifo.max_line_bytes > self.limits.max_frame_bytes:
            raise ValueError(f"fifo.max_line_bytes ({self.fifo.max_line_bytes}) exceeds limits.max_frame_bytes "
                             f"({self.limits.max_frame_bytes}): a message from a FIFO must fit in a frame; "
                             "allowed: at most limits.max_frame_bytes")
        return self


class ConfigError(Exception):
    """The configuration cannot be used; the message names the key, the value and what is allowed."""


def _describe(error: dict[str, Any]) -> str:
    if not error["loc"]:  # a rule across keys: its message names them
        return str(error["msg"]).removeprefix("Value error, ")
    key = ".".join(str(p) for p in error["loc"])
    if error["type"] == "extra_forbidden":
        return f"{key}: unknown key (see config/hostbus.toml for the keys there are)"
    value = error.get("input")
    return f"{key} = {value!r}: {error['msg']}"


def parse(data: dict[str, Any], overrides: dict[str, Any] | None = None) -> Config:
    """Validate a parsed TOML document (plus flag overrides) into a :class:`Config`."""
    merged = dict(data)
    for key, value in (overrides or {}).items():
        section, _, name = key.partition(".")
        if name:
            table = merged.get(section, {})
            if not isinstance(table, dict):
                raise ConfigError(f"{section} = {table!r}: must be a table ([{section}]), not a value")
            merged[section] = {**table, name: value}
        else:
            merged[key] = value
    try:
        return Config.model_validate(merged)
    except ValidationError as exc:
        raise ConfigError("; ".join(_describe(e) for e in exc.errors())) from None  # type: ignore[arg-type]


def load(path: Path | None, overrides: dict[str, Any] | None = None) -> Config:
    """Read and validate the TOML file at ``path`` (None: defaults only)."""
    data: dict[str, Any] = {}
    if path is not None:
        try:
            with path.open("rb") as f:
                data = tomllib.load(f)
        except OSError as exc:
            raise ConfigError(f"cannot read {path}: {exc.strerror}") from None
        except tomllib.TOMLDecodeError as exc:
            raise ConfigError(f"{path} is not valid TOML: {exc}") from None
        except UnicodeDecodeError as exc:
            raise ConfigError(f"{path} is not UTF-8 text (byte {exc.start}): TOML files must be UTF-8") from None
    return parse(data, overrides)


def json_schema() -> dict[str, Any]:
    schema = Config.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    schema["title"] = "hostbusd configuration"
    return schema
