"""The broker's semaphore hand for one shared-memory ring, in a process of its own.

A named POSIX semaphore is a small file the client must be able to open read-write, so the
client can also truncate it: a process that has it mapped then dies of SIGBUS at its next
touch. The broker therefore never maps a ring's semaphores itself: this helper creates them,
waits on one and posts the other, and talks to the broker through two pipes. If a client
breaks the semaphores, this process dies, and the broker ends that ring only.

    python -m hostbusd.ringhelper WAIT_NAME POST_NAME WAIT_INITIAL POST_INITIAL

Creates both semaphores (owner-only, O_EXCL), writes ``R`` to stdout, then:

* a thread waits on WAIT, takes every further post at once (up to a batch) and writes the
  count as ``u32`` to stdout: "this many slots are ready for you";
* the main thread reads commands from stdin: ``P`` + ``u32 n`` posts POST n times ("this many
  slots are yours again"), ``U`` unlinks both names if they are still there (both sides hold
  them now; the broker removes them itself before it answers ring_ready);
* stdin closing (the broker ended the ring, or died) ends the process; the names are unlinked
  on the way out if they were not already.
"""

from __future__ import annotations

import contextlib
import os
import struct
import sys
import threading

import posix_ipc

U32 = struct.Struct("<I")
#: Posts taken per report: bounds the broker's work per wake-up.
BATCH = 4096


def _read_exact(fd: int, n: int) -> bytes:
    out = b""
    while len(out) < n:
        chunk = os.read(fd, n - len(out))
        if not chunk:
            raise EOFError
        out += chunk
    return out


def main(argv: list[str]) -> int:
    wait_name, post_name, wait_initial, post_initial = argv[0], argv[1], int(argv[2]), int(argv[3])
    old = os.umask(0o077)
    try:
        wait = posix_ipc.Semaphore(wait_name, posix_ipc.O_CREX, 0o600, wait_initial)
        try:
            post = posix_ipc.Semaphore(post_name, posix_ipc.O_CREX, 0o600, post_initial)
        except BaseException:
            wait.unlink()
            raise
    finally:
        os.umask(old)
    names = [wait, post]

    def unlink() -> None:
        while names:
            sem = names.pop()
            with contextlib.suppress(posix_ipc.ExistentialError):
                sem.unlink()

    def waiter() -> None:
        try:
            while True:
                wait.acquire()
                n = 1
                while n < BATCH:
                    try:
                        wait.acquire(0)
                    except posix_ipc.BusyError:
                        break
                    n += 1
                os.write(1, U32.pack(n))
        except OSError:  # the broker is gone
            os._exit(0)

    try:
        os.write(1, b"R")
        threading.Thread(target=waiter, daemon=True).start()
        while True:
            cmd = _read_exact(0, 1)
            if cmd == b"P":
                for _ in range(U32.unpack(_read_exact(0, 4))[0]):
                    post.release()
            elif cmd == b"U":
                unlink()
            else:
                return 2
    except (EOFError, OSError):
        return 0
    finally:
        unlink()


if __name__ == "__main__":
    code = main(sys.argv[1:])
    sys.stdout.flush()
    os._exit(code)  # the waiter thread may be inside sem_wait
