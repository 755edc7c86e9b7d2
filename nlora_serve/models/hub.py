"""Hugging Face names (``ORG/NAME``, as vLLM and PEFT users type them) found in the Hugging Face cache.

``--model ORG/NAME`` and ``--adapter NAME=ORG/ADAPTER`` resolve to the cached snapshot of the repo's
``main`` revision, ``$HF_HUB_CACHE`` or ``$HF_HOME/hub`` (default ``~/.cache/huggingface/hub``):
``models--ORG--NAME/snapshots/<commit>/`` as ``hf download ORG/NAME`` leaves it. Nothing is
downloaded here (a server start should not pull gigabytes unasked, and it works with
``HF_HUB_OFFLINE=1`` as without); a name that is not cached gets the ``hf download`` command to run.
A local path of the same spelling wins over the name.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

from nlora_serve.errors import NloraError

_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[A-Za-z0-9][\w.-]*$")  # ORG/NAME, no ".." segments


def hub_cache_dir() -> Path:
    """The Hugging Face hub cache, read from the environment now (huggingface_hub's own constants
    are read once, at its import): ``$HF_HUB_CACHE``, ``$HF_HOME/hub``, ``$XDG_CACHE_HOME/huggingface/hub``
    or ``~/.cache/huggingface/hub``."""
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    home = os.environ.get("HF_HOME") or Path(os.environ.get("XDG_CACHE_HOME", "~/.cache")) / "huggingface"
    return Path(home).expanduser() / "hub"


def is_hub_name(text: str) -> bool:
    """Whether ``text`` reads as a Hugging Face repo id and names no local path."""
    return bool(_REPO_ID.match(text)) and ".." not in text and not Path(text).expanduser().exists()


def hub_snapshot(repo_id: str, error: type[NloraError], what: str) -> Path:
    """The cached snapshot directory of ``repo_id``'s main revision.

    Args:
        error: the class to raise (ModelError for a model, AdapterError for an adapter).
        what: "model" or "adapter", for the message.

    Raises:
        error: ``repo_id`` is not in the cache (the message names the cache and the ``hf download``
            command that fetches it).
    """
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError

    cache = hub_cache_dir()
    try:
        return Path(snapshot_download(repo_id, cache_dir=cache, local_files_only=True))
    except (LocalEntryNotFoundError, HFValidationError, OSError):
        raise error(f"{repo_id}: no such local path, and no {what} {repo_id!r} in the Hugging Face cache "
                    f"{cache}; fetch it with `hf download {repo_id}` (HF_HOME or HF_HUB_CACHE choose the "
                    "cache), or give a local directory") from None


def local_or_hub(text: str, error: type[NloraError], what: str) -> Path:
    """``text`` as a local path, or, when it names none and reads as ``ORG/NAME``, its cached
    snapshot (:func:`hub_snapshot`, which raises ``error`` when it is not cached)."""
    return hub_snapshot(text, error, what) if is_hub_name(text) else Path(text).expanduser()
