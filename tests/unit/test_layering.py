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
    """Run ``code`` in a new interpreter and return the names it prints (one per line)."""
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return r.stdout.split()


def test_daemon_loads_neither_the_client_nor_pydantic_plugins() -> None:
    # What an idle broker holds is mostly code it imported (docs/benchmarks.md, S5): the daemon
    # must not load the client library, nor importlib.metadata through pydantic's plugin loader
    # (hostbusd._no_pydantic_plugins). The configuration is validated here, as at start, so a
    # pydantic release that finds its plugins some other way fails this test.
    code = (
        "import sys, hostbusd.main\n"
        "from hostbusd.config import Config\n"
        "cfg = Config.model_validate({'limits': {'max_frame_bytes': 128 * 1024}})\n"
        "assert cfg.limits.max_frame_bytes == 128 * 1024\n"
        "loader = sys.modules['pydantic.plugin._loader']\n"
        "print('stub' if (loader.__doc__ or '').startswith('hostbusd') else 'pydantic-loader')\n"
        "print(*sorted(m for m in ('hostbus.client', 'hostbus._core', 'hostbus.shm', 'importlib.metadata',\n"
        "                           'email', 'zipfile', 'shutil', 'zmq') if m in sys.modules))\n"
    )
    assert _fresh_modules(code) == ["stub"]


def test_client_names_are_loaded_on_first_use() -> None:
    code = (
        "import sys, hostbus\n"
        "print('client' in dir(hostbus) or 'connect' in dir(hostbus), 'hostbus.client' in sys.modules)\n"
        "from hostbus import connect, Bus\n"
        "print(connect is sys.modules['hostbus.client'].connect, Bus.__module__)\n"
        "try:\n"
        "    hostbus.no_such_name\n"
        "except AttributeError as e:\n"
        "    print(type(e).__name__)\n"
    )
    assert _fresh_modules(code) == ["True", "False", "True", "hostbus.client", "AttributeError"]
