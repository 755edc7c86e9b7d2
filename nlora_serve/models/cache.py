"""Where prepared models live: one cache root, chosen by flag, environment or XDG default."""

from __future__ import annotations

import os
from pathlib import Path

CACHE_ENV = "NLORA_SERVE_CACHE"


def cache_root(override: str | os.PathLike | None = None) -> Path:
    """The cache root directory (not created here).

    Precedence: ``override`` (the ``--cache-dir`` flag), then ``$NLORA_SERVE_CACHE``, then
    ``$XDG_CACHE_HOME/nlora-serve``, then ``~/.cache/nlora-serve``.
    """
    if override:
        return Path(override).expanduser().resolve()
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV]).expanduser().resolve()
    xdg = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return (Path(xdg).expanduser() / "nlora-serve").resolve()


def models_dir(root: Path) -> Path:
    """Folder of converted models under a cache root."""
    return root / "models"
