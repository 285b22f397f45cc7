"""Start hostbusd the way systemd's socket activation does: descriptors at 3, 4, ... and LISTEN_*.

Used as ``python tests/helpers/activate.py FD,FD NAMES -- COMMAND ARGS...``: it moves the given
descriptors to 3, 4, ..., sets LISTEN_FDS, LISTEN_FDNAMES and LISTEN_PID (its own pid, which
``exec`` keeps) and executes COMMAND (``hostbusd``, or ``systemd-socket-activate``, which passes
such descriptors on to its child together with its own socket).
"""

from __future__ import annotations

import fcntl
import os
import sys


def main() -> None:
    fds = [int(x) for x in sys.argv[1].split(",")]
    names = sys.argv[2]
    args = sys.argv[4:] if sys.argv[3] == "--" else sys.argv[3:]
    high = [fcntl.fcntl(fd, fcntl.F_DUPFD, 100) for fd in fds]  # out of the way of 3, 4, ...
    for fd in fds:
        os.close(fd)
    for i, fd in enumerate(high):
        os.dup2(fd, 3 + i, inheritable=True)
        os.close(fd)
    os.environ.update(LISTEN_FDS=str(len(fds)), LISTEN_FDNAMES=names, LISTEN_PID=str(os.getpid()))
    os.execvp(args[0], args)


if __name__ == "__main__":
    main()
