"""The import rules of nlora_serve/adapters/ (DESIGN §2): runtime/ (what a running server holds) is
imported by the engine and the serving layer, never by the folder format, the tools or the store
beside it; and nothing under adapters/ imports engine/ or serving/. Read from the source (ast), so
an import inside a function counts too."""

from __future__ import annotations

import ast
from pathlib import Path

ADAPTERS = Path(__file__).resolve().parents[2] / "nlora_serve" / "adapters"
RUNTIME = "nlora_serve.adapters.runtime"


def imported(source: str) -> set[str]:
    """Every module ``source`` imports, dotted (``from a import b`` gives ``a`` and ``a.b``)."""
    names = set()
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
            names.update(f"{node.module}.{alias.name}" for alias in node.names)
    return names


def broken_rules(path: Path, source: str) -> list[str]:
    """What ``source`` (the file at ``path`` under adapters/) imports against the rules."""
    inside_runtime = path.relative_to(ADAPTERS).parts[0] == "runtime"
    wrong = []
    for name in sorted(imported(source)):
        if not inside_runtime and (name == RUNTIME or name.startswith(RUNTIME + ".")):
            wrong.append(f"{path.relative_to(ADAPTERS)} imports {name}")
        if name.split(".")[:2] in (["nlora_serve", "engine"], ["nlora_serve", "serving"]):
            wrong.append(f"{path.relative_to(ADAPTERS)} imports {name}")
    return wrong


def test_only_runtime_imports_runtime_and_nothing_imports_the_engine_or_serving():
    files = sorted(ADAPTERS.rglob("*.py"))
    assert any(f.parent.name == "runtime" for f in files) and len(files) > 30
    assert [w for f in files for w in broken_rules(f, f.read_text())] == []


def test_the_rules_catch_a_module_level_or_a_deferred_import():
    loader, manager = ADAPTERS / "loader.py", ADAPTERS / "runtime" / "manager.py"
    assert broken_rules(loader, "from nlora_serve.adapters.runtime.pool import Placement\n")
    assert broken_rules(loader, "def f():\n    from nlora_serve.adapters import runtime\n")
    assert broken_rules(manager, "import nlora_serve.serving.status\n")
    assert broken_rules(manager, "from nlora_serve.engine.api import Engine\n")
    assert not broken_rules(manager, "from nlora_serve.adapters.runtime.pool import Placement\n")
    assert not broken_rules(loader, "from nlora_serve.adapters.store import AdapterStore\n")
