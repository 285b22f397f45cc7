"""hostbusd: the hostbus message broker daemon."""

import sys
import types

__version__ = "0.1.0"


def _no_pydantic_plugins() -> None:
    """hostbusd runs no pydantic plugins: validating its configuration must not run code that
    some installed distribution registered under pydantic's entry point (the daemon often runs
    as root), and must not scan every installed distribution's metadata to find out.

    ``PYDANTIC_DISABLE_PLUGINS`` would skip the scan but still import pydantic's plugin loader,
    and with it ``importlib.metadata`` (email, zipfile, csv, bz2, lzma, ...): 1.6 MiB of an idle
    daemon's 40. So the loader is provided here, answering "no plugins", before pydantic is
    imported. Nothing is done when pydantic's loader is already loaded (a process that used
    pydantic before importing hostbusd keeps what it chose). tests/unit/test_memory.py checks
    that pydantic still asks this loader, so an upgrade that moves it fails a test, not silently.
    """
    name = "pydantic.plugin._loader"
    if name in sys.modules:
        return
    loader = types.ModuleType(name, "hostbusd: no pydantic plugins (hostbusd._no_pydantic_plugins)")
    loader.get_plugins = lambda: ()  # type: ignore[attr-defined]
    sys.modules[name] = loader


_no_pydantic_plugins()
