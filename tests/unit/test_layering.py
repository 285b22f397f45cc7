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
