"""bench/gpu_check.sh's command lines still parse: a GPU session is lent 15 minutes, by chance, so a
flag renamed since the script was written must fail here, on the CPU, not there.

Every ``step NAME LIMIT ...`` line of the script (continuations joined) is checked without running
its work: a ``$PY bench/X.py ARGS`` step is run up to its argument parser (``parse_args`` is wrapped
to stop right after a successful parse, so an unknown flag or a bad choice fails as it would on the
GPU), and a pytest step must name test files that exist and a ``-k`` that selects at least one test
(``pytest --collect-only`` per step, all in one interpreter).
"""

from __future__ import annotations

import json
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).parents[2]
SCRIPT = ROOT / "bench" / "gpu_check.sh"

# Runs each [script, *args] of argv[1] (JSON) up to its parser, in one interpreter (imports once);
# prints one JSON line per script: "parsed", or the parser's exit code (2: bad arguments).
RUNNER = r"""
import argparse, json, os, runpy, sys
class Parsed(Exception):
    pass
original = argparse.ArgumentParser.parse_args
def parse_then_stop(self, *args, **kwargs):
    original(self, *args, **kwargs)
    raise Parsed
argparse.ArgumentParser.parse_args = parse_then_stop
for argv in json.loads(sys.argv[1]):
    sys.argv = argv
    sys.path.insert(0, os.path.dirname(os.path.abspath(argv[0])))  # as `python bench/X.py` puts it first
    try:
        runpy.run_path(argv[0], run_name="__main__")
        outcome = "ran without parsing"
    except Parsed:
        outcome = "parsed"
    except SystemExit as e:
        outcome = f"exit {e.code}"
    sys.path.pop(0)
    print(json.dumps([argv[0], outcome]), flush=True)
"""

# Runs ``pytest --collect-only`` for each argument list of argv[1] (JSON) in one interpreter
# (imports once); prints one JSON line per list: [pytest's exit code, the number of tests selected].
COLLECTOR = r"""
import json, sys
import pytest
class Count:
    selected = None
    def pytest_collection_finish(self, session):
        Count.selected = len(session.items)
for args in json.loads(sys.argv[1]):
    Count.selected = None
    code = pytest.main(["--collect-only", "-q", "-p", "no:cacheprovider", *args], plugins=[Count()])
    print("RESULT " + json.dumps([int(code), Count.selected]), flush=True)
"""

BAD_FLAG = ["bench/decode_step.py", "--device", "cuda", "--no-such-flag"]


def _steps(text: str) -> list[tuple[str, list[str]]]:
    """(name, command words) of every ``step`` call, with $OUT and $TMPDIR substituted."""
    joined = re.sub(r"\\\n\s*", " ", text)
    steps = []
    for line in joined.splitlines():
        line = line.strip()
        if not line.startswith("step ") or line.startswith("step()"):
            continue
        line = line.replace('"$OUT', '"/tmp/gpu_check_out').replace("${TMPDIR:-/tmp}", "/tmp")
        words = shlex.split(line)
        steps.append((words[1], words[3:]))
    return steps


def test_the_script_has_its_steps():
    names = [name for name, _ in _steps(SCRIPT.read_text())]
    for expected in ("smoke", "engine_check", "qwen3_check", "engine_bench", "decode_step", "adapter_kernels",
                     "kernels", "engine_8b", "prefix_8b", "fairness", "fuzz", "kv_budget"):
        assert expected in names, f"bench/gpu_check.sh lost its {expected} step: {names}"


def _python_steps() -> list[tuple[str, list[str]]]:
    return [(name, words[1:]) for name, words in _steps(SCRIPT.read_text())
            if words[0] == "$PY" and words[1].startswith("bench/")]


@pytest.fixture(scope="module")
def parsed():
    """{index: outcome} of RUNNER over every python step's argv and then BAD_FLAG, in one interpreter."""
    argvs = [argv for _, argv in _python_steps()] + [BAD_FLAG]
    out = subprocess.run([sys.executable, "-c", RUNNER, json.dumps(argvs)], cwd=ROOT, capture_output=True,
                         text=True, timeout=300)
    outcomes = [json.loads(line) for line in out.stdout.splitlines() if line.startswith("[")]
    assert len(outcomes) == len(argvs), out.stderr[-3000:]
    assert [script for script, _ in outcomes] == [argv[0] for argv in argvs], outcomes
    return argvs, [outcome for _, outcome in outcomes], out.stderr


def test_every_python_step_parses_its_arguments(parsed):
    for name, words in _python_steps():
        for i, w in enumerate(words):  # the model folders it reads must be in the tree
            if w in ("--model", "--tokenizer"):
                assert (ROOT / words[i + 1] / "config.json").is_file(), f"{name}: no {words[i + 1]}/config.json"
    argvs, outcomes, stderr = parsed
    argvs, outcomes = argvs[:-1], outcomes[:-1]  # the last is BAD_FLAG's
    assert len(argvs) >= 10, argvs
    bad = [(argv, outcome) for argv, outcome in zip(argvs, outcomes) if outcome != "parsed"]
    assert not bad, f"gpu_check.sh steps whose arguments do not parse: {bad}\n{stderr[-3000:]}"


def test_the_runner_catches_a_bad_flag(parsed):
    argvs, outcomes, stderr = parsed
    assert argvs[-1] == BAD_FLAG and outcomes[-1] == "exit 2", stderr[-2000:]


def test_every_pytest_step_selects_tests():
    steps = []
    for name, words in _steps(SCRIPT.read_text()):
        if "pytest" not in words:
            continue
        files = [w for w in words if w.startswith("tests/")]
        assert files, name
        for f in files:
            assert (ROOT / f).is_file(), f"{name}: no {f}"
        k = words[words.index("-k") + 1] if "-k" in words else None
        steps.append((name, k, files + (["-k", k] if k else [])))
    assert steps
    out = subprocess.run([sys.executable, "-c", COLLECTOR, json.dumps([args for _, _, args in steps])], cwd=ROOT,
                         capture_output=True, text=True, timeout=300)
    results = [json.loads(line[len("RESULT "):]) for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    assert len(results) == len(steps), f"{out.stdout[-2000:]}{out.stderr[-2000:]}"
    for (name, k, _), (code, selected) in zip(steps, results):
        assert code == 0 and selected, f"{name}: pytest selects nothing with -k {k!r}:\n{out.stdout[-3000:]}"
