"""The dependency rules of DESIGN.md, enforced: what each layer may import."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).parents[2]
CLIENT = ROOT / "clients" / "python" / "hostbus"
BROKER = ROOT / "broker" / "hostbusd"
IO_MODULES = {"asyncio", "socket", "selectors", "select", "ssl", "threading", "subprocess", "zmq",
              "posix_ipc", "uvloop", "signal", "mmap"}


def imported_modules(path: Path) -> set[str]:
    tree = ast.parse(path.read_text(), str(path))
    out: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            out.add(node.module)
    return out


def test_wire_and_core_import_no_io() -> None:
    files = [*sorted((CLIENT / "wire").glob("*.py")), CLIENT / "topics.py", CLIENT / "errors.py",
             *sorted((BROKER / "core").glob("*.py"))]
    assert len(files) > 10
    for path in files:
        bad = {m for m in imported_modules(path) if m.split(".")[0] in IO_MODULES}
        assert not bad, f"{path.relative_to(ROOT)} imports I/O modules {bad}"


def test_client_never_imports_the_daemon() -> None:
    for path in CLIENT.rglob("*.py"):
        bad = {m for m in imported_modules(path) if m.split(".")[0] == "hostbusd"}
        assert not bad, f"{path.relative_to(ROOT)} imports {bad}"


def test_client_library_uses_only_the_standard_library() -> None:
    code = (
        "import sys, hostbus, hostbus.aio, hostbus.cli, hostbus.wire, hostbus.paths\n"
        "std = sys.stdlib_module_names\n"
        "bad = sorted({m.split('.')[0] for m in sys.modules} - set(std) - {'hostbus', '__main__'})\n"
        "print(' '.join(bad))\n"
    )
    r = subprocess.run([sys.executable, "-S", "-c", code], capture_output=True, text=True,
                       env={"PYTHONPATH": str(ROOT / "clients" / "python")})
    assert r.returncode == 0, r.stderr
    assert r.stdout.split() == []


def _fresh_modules(code: str) -> list[str]:
    """Run ``code`` in a new interpreter and return the words it prints."""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return r.stdout.split()


#: Prints, when the process exits, whose pydantic plugin loader it has and which of these
#: modules it loaded.
_REPORT_AT_EXIT = (
    "import atexit, sys\n"
    "def report():\n"
    "    loader = sys.modules.get('pydantic.plugin._loader')\n"
    "    print('stub' if loader and (loader.__doc__ or '').startswith('hostbusd') else 'pydantic-loader')\n"
    "    print(*sorted(m for m in ('hostbus.client', 'hostbus._core', 'hostbus.shm', 'importlib.metadata',\n"
    "                               'email', 'zipfile', 'zmq') if m in sys.modules))\n"
    "atexit.register(report)\n"
)


def test_the_daemon_loads_neither_the_client_nor_pydantic_plugins(tmp_path: Path) -> None:
    # What an idle broker holds is mostly code it imported (docs/benchmarks.md, S5b): the daemon
    # must not load the client library, nor importlib.metadata through pydantic's plugin loader
    # (hostbusd.start.no_pydantic_plugins). The daemon runs through its entry point until its
    # socket is there, then stops on SIGTERM; a pydantic release that finds its plugins some
    # other way fails here.
    conf = tmp_path / "hostbus.toml"
    conf.write_text("[limits]\nmax_frame_bytes = 131072\n")
    run = tmp_path / "run"
    code = _REPORT_AT_EXIT + (
        "import os, runpy, signal, threading, time\n"
        "def stop():\n"
        f"    while not os.path.exists({str(run / 'hostbus.sock')!r}):\n"
        "        time.sleep(0.02)\n"
        "    os.kill(os.getpid(), signal.SIGTERM)\n"
        "threading.Thread(target=stop, daemon=True).start()\n"
        f"sys.argv = ['hostbusd', '--config', {str(conf)!r}, '--runtime-dir', {str(run)!r},\n"
        f"            '--state-dir', {str(tmp_path / 'state')!r}, '--log-level', 'warning']\n"
        "runpy.run_module('hostbusd', run_name='__main__')\n"
    )
    assert _fresh_modules(code) == ["stub"]
    assert not (run / "hostbus.sock").exists()


def test_hostbusd_as_a_library_leaves_pydantic_plugins_alone() -> None:
    # Tests and tools import hostbusd's modules: only the daemon's entry point changes pydantic.
    code = _REPORT_AT_EXIT + (
        "import hostbusd.main\n"
        "from hostbusd.config import Config\n"
        "assert Config.model_validate({}).limits.max_frame_bytes > 0\n"
    )
    assert _fresh_modules(code)[0] == "pydantic-loader"


def test_client_names_are_loaded_on_first_use() -> None:
    code = (
        "import sys, hostbus\n"
        "print('connect' in dir(hostbus), 'connect' in vars(hostbus), 'hostbus.client' in sys.modules)\n"
        "from hostbus import connect, Bus\n"
        "print(connect is sys.modules['hostbus.client'].connect, Bus.__module__)\n"
        "try:\n"
        "    hostbus.no_such_name\n"
        "except AttributeError as e:\n"
        "    print(type(e).__name__)\n"
    )
    assert _fresh_modules(code) == ["True", "False", "False", "True", "hostbus.client", "AttributeError"]
