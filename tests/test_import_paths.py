"""Every module path of ours that the repository imports or runs exists, lazy imports included.

A module moved by a reorganisation breaks its top-level importers at once, but an import inside a
function (a test's, a CUDA-only or an optional path's) fails only when that function runs: after the
engine's split into subpackages, two tests cherry-picked from a branch older than the split still
imported ``nlora_serve.engine.adapter_layer`` and ``nlora_serve.engine.cuda_graphs`` (now under
``engine/model/`` and ``engine/runner/``) inside their bodies. Read statically: nothing is imported.
"""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

REPO = Path(__file__).parents[1]
# `from nlora_serve.x import ...`, `import nlora_serve.x`, and `python -m nlora_serve.<module>` in docs and scripts
MODULE = re.compile(r"(?:^\s*from\s+|^\s*import\s+|-m\s+)(nlora_serve(?:\.\w+)*)", re.M)


def _is_module(dotted: str) -> bool:
    path = REPO.joinpath(*dotted.split("."))
    return path.with_suffix(".py").is_file() or (path / "__init__.py").is_file()


def test_every_module_of_ours_that_the_repository_imports_or_runs_exists():
    listed = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout
    wrong = []
    for name in listed.split():
        if name.endswith((".py", ".md", ".sh")) and (REPO / name).is_file():
            for dotted in MODULE.findall((REPO / name).read_text(errors="replace")):
                if not _is_module(dotted):
                    wrong.append(f"{name}: {dotted}")
    assert wrong == []
