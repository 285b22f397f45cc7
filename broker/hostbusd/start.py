"""The daemon's entry point: the ``hostbusd`` command and ``python -m hostbusd``.

Before anything imports pydantic, the daemon's process is given a pydantic plugin loader that
finds no plugins (:func:`no_pydantic_plugins`); then :func:`hostbusd.main.main` runs. Importing
``hostbusd`` or its modules as a library (tests, tools) changes nothing of pydantic's.
"""

from __future__ import annotations

import sys
import types
from importlib.machinery import ModuleSpec

_PYDANTIC_LOADER = "pydantic.plugin._loader"


def no_pydantic_plugins() -> None:
    """hostbusd runs no pydantic plugins: validating its configuration must not run code that
    some installed distribution registered under pydantic's entry point (the daemon often runs
    as root), and must not scan every installed distribution's metadata to find out.

    ``PYDANTIC_DISABLE_PLUGINS`` would skip the scan but still import pydantic's plugin loader,
    and with it ``importlib.metadata`` (email, zipfile, csv, bz2, lzma, ...): 1.6 MiB of an idle
    daemon's 38. So the daemon provides the loader, answering "no plugins", before pydantic
    loads its own. Nothing is done when pydantic's loader is already loaded.
    tests/unit/test_layering.py checks, through the daemon's entry point, that pydantic still
    asks this loader: a pydantic release that finds its plugins another way fails that test.
    """
    if _PYDANTIC_LOADER in sys.modules:
        return
    loader = types.ModuleType(_PYDANTIC_LOADER, "hostbusd: no pydantic plugins (hostbusd.start.no_pydantic_plugins)")
    loader.__spec__ = ModuleSpec(_PYDANTIC_LOADER, None)
    loader.PYDANTIC_ENTRY_POINT_GROUP = "pydantic"  # type: ignore[attr-defined]  # as pydantic's loader has
    loader._plugins = {}  # type: ignore[attr-defined]
    loader.get_plugins = lambda: ()  # type: ignore[attr-defined]
    sys.modules[_PYDANTIC_LOADER] = loader


def main() -> int:
    no_pydantic_plugins()
    from hostbusd.main import main as run  # noqa: PLC0415 - after the loader is in place

    return run()
