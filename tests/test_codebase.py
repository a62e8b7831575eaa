"""The code base keeps its shape: lint-clean (ruff, configured in pyproject.toml), one job per
module (none past MAX_LINES), and no import cycle among fla_ds's modules at import time (a
function-level import is how a module reaches a later pipeline step lazily, and is allowed)."""
from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PACKAGE = ROOT / "fla_ds"
MAX_LINES = 500  # past this a module is doing more than one job: split it by job


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def top_level_imports(path: Path, modules: set[str]) -> set[str]:
    """The fla_ds modules ``path`` imports when it is imported (module body only, not inside
    functions or ``if TYPE_CHECKING``)."""
    found = set()
    for node in ast.parse(path.read_text("utf-8")).body:
        names = []
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
        found.update(n for n in names if n in modules)
    return found


def test_ruff_finds_nothing():
    proc = subprocess.run([sys.executable, "-m", "ruff", "check", "--no-cache", "--output-format", "concise", str(ROOT)],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


def test_no_module_does_several_jobs():
    long = {str(p.relative_to(ROOT)): n for p in PACKAGE.rglob("*.py") if (n := len(p.read_text("utf-8").splitlines())) > MAX_LINES}
    assert not long, f"split these by job: {long}"


def test_no_import_cycle_at_import_time():
    files = {module_name(p): p for p in PACKAGE.rglob("*.py")}
    graph = {name: top_level_imports(path, set(files)) - {name} for name, path in files.items()}
    cycles, state = [], {}

    def visit(node: str, trail: list[str]) -> None:
        state[node] = "open"
        for nxt in sorted(graph[node]):
            if state.get(nxt) == "open":
                cycles.append(trail[trail.index(nxt):] + [nxt] if nxt in trail else [node, nxt])
            elif nxt not in state:
                visit(nxt, trail + [nxt])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])
    # a package importing its own submodules (fla_ds.model -> fla_ds.model.llm) is not a cycle
    # unless the submodule imports the package back, which the graph records too.
    assert not cycles, "import cycles: " + "; ".join(" -> ".join(c) for c in cycles)
