"""AdapterLimits: what adapters the server takes and holds (DESIGN §3), and the default rank and
byte bounds.

Kept free of torch: the ``serve`` and ``generate`` flags print these defaults in their ``--help``
without loading the engine.
"""

from __future__ import annotations

from dataclasses import dataclass

DEFAULT_MAX_RANK = 64  # --max-rank
DEFAULT_MAX_ADAPTER_BYTES = 256 << 20  # --max-adapter-bytes: one adapter's (one version's) files together, bytes
# keep_versions of a command that only reads the store (generate --adapter-dir): it prunes no version a
# server's --keep-versions kept to roll back to
KEEP_ALL_VERSIONS = 1 << 31


@dataclass(slots=True)
class AdapterLimits:
    """Limits on what adapters the server takes and holds (DESIGN §3)."""

    max_rank: int = DEFAULT_MAX_RANK  # --max-rank: refuse adapters of a higher rank
    max_loras: int = 8  # --max-loras: untied adapters resident at once (LRU beyond)
    adapter_memory: int = 4 << 30  # --adapter-memory: bytes all tied tenants' N may use
    max_adapter_bytes: int = DEFAULT_MAX_ADAPTER_BYTES  # --max-adapter-bytes: a store version's files, bytes
    # --keep-versions: the newest versions of each name kept in the store, the current one included
    # (1: only the current one; more: older ones to roll back to with `adapters rollback`); None (no
    # flag): what the store records from the last start that gave one (store/settings.py), 1 where none
    keep_versions: int | None = None

    def __post_init__(self):
        for name in ("max_rank", "max_loras", "adapter_memory", "max_adapter_bytes", "keep_versions"):
            value = getattr(self, name)
            if name == "keep_versions" and value is None:
                continue
            if not isinstance(value, int) or value <= 0:
                raise ValueError(f"AdapterLimits.{name} must be a positive integer; got {value!r}")
