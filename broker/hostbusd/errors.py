"""Errors of the daemon's outer layer."""


class StartupError(Exception):
    """The daemon cannot start; the message says why and what to do."""
