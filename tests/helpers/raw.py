"""A raw protocol client for tests that must send what the library refuses to."""

from __future__ import annotations

import socket
import time
from pathlib import Path

from hostbus import wire


class RawClient:
    def __init__(self, path: Path, hello: bool = True, features: tuple[str, ...] = ()) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        self.sock.connect(str(path))
        self.decoder = wire.Decoder(wire.SERVER_FRAMES, 1 << 30)
        self.frames: list[wire.Frame] = []
        self.closed = False
        if hello:
            self.send(wire.encode_hello("raw", "raw-test", wire.PROTOCOL_VERSION, features))
            welcome = self.read_until(wire.FrameType.WELCOME)
            assert welcome is not None, "no WELCOME"

    def send(self, data: bytes) -> None:
        self.sock.sendall(data)

    def read_until(self, ftype: int | None = None, timeout: float = 10.0) -> wire.Frame | None:
        """Read frames until one of ``ftype`` arrives (returned) or the broker closes (None)."""
        self.sock.settimeout(timeout)
        while True:
            for i, f in enumerate(self.frames):
                if f.type == ftype:
                    del self.frames[: i + 1]
                    return f
            if self.closed:
                return None
            try:
                data = self.sock.recv(1 << 20)
            except ConnectionResetError:
                data = b""
            if not data:
                self.closed = True
                continue
            self.decoder.feed(data)
            self.frames += self.decoder.frames()

    def read_for(self, seconds: float) -> list[wire.Frame]:
        """Every frame that arrives within ``seconds`` (and those read before), taken."""
        end = time.monotonic() + seconds
        while not self.closed and (left := end - time.monotonic()) > 0:
            self.sock.settimeout(left)
            try:
                data = self.sock.recv(1 << 20)
            except TimeoutError:
                break
            if not data:
                self.closed = True
                break
            self.decoder.feed(data)
            self.frames += self.decoder.frames()
        frames, self.frames = self.frames, []
        return frames

    def read_to_close(self, timeout: float = 10.0) -> list[wire.Frame]:
        self.read_until(None, timeout)
        return self.frames

    def fatal_error(self, timeout: float = 10.0) -> tuple[int, str]:
        """The fatal ERR the broker sent before closing (asserts there was one and it closed)."""
        frames = self.read_to_close(timeout)
        errs = [f for f in frames if f.type == wire.FrameType.ERR and f.flags & wire.ERR_FATAL]
        assert errs, f"no fatal ERR among {frames}"
        code, _, message = wire.decode_err(errs[-1].body)
        return code, message

    def close(self) -> None:
        self.sock.close()
