"""A registered adapter version and the registry's errors (DESIGN §3): what a request pins, the
residency layer places and the front ends report; :mod:`~nlora_serve.adapters.runtime.registry` owns the
versions and their counts."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from nlora_serve.adapters.adapter import Adapter
from nlora_serve.errors import AdapterError


class AdapterNotFound(AdapterError):
    """No adapter of that name is registered (gRPC NOT_FOUND; never the base model instead)."""


class VersionConflict(AdapterError):
    """A compare-and-swap named a version that is no longer current (gRPC FAILED_PRECONDITION)."""


class ConcurrentChange(AdapterError):
    """A concurrent change of the name won a race with this call (another admin's upload or
    rollback pruned the kept version it was reading): retrying may succeed (gRPC ABORTED, HTTP
    409, as gRPC's status guide asks of a concurrency conflict; NOT_FOUND told clients the
    version was gone for good)."""


@dataclass(eq=False, slots=True)
class AdapterVersion:
    """One registered version of a name. Identity, not value, equality: two versions are two.

    ``adapter`` is None while an untied adapter is evicted from memory (its folder stays in the
    store); the summary fields are captured at registration and stay valid throughout.
    """

    name: str  # the adapter's name in the store (names.validate_name), what requests ask for
    version: int  # per-name sequence number, starting at 1
    adapter: Adapter | None  # its validated weights in memory; None while evicted (see above)
    path: Path  # its folder in the store
    refcount: int = 0  # requests holding it
    holds: int = 0  # callers keeping it for requests they have still to queue (AdapterRegistry.hold); no request
    to_come: int = 0  # the requests those holds have still to queue on it (what an unload leaves to drain)
    current: bool = True  # what new requests of ``name`` get; False once superseded or unloaded
    freed: bool = False  # on_free has run
    unloaded: bool = False  # its name was force-unloaded while this was served or held: acquire_held refuses it
    pool: object | None = None  # the Residency pool holding it (None while not resident)
    slot: int | None = None  # its slot in that pool
    content_hash: str = ""  # sha256 of the adapter's maths (caches key on it)
    is_tied: bool = False  # Nyström-tied IntTune tenant: only N is held
    flavour: str = ""  # lora / nlora / inttune-tied / family (adapter.FLAVOURS)
    rank: int = 0  # largest rank over its modules
    targets: tuple[str, ...] = ()  # adapted module names
    held_bytes: int = 0  # bytes it owns in the compute dtype (N only when tied)
    family: str | None = None  # the compressed family's key (a member: only N is held, N is swappable)

    @property
    def swaps_n(self) -> bool:
        """A hot-swap may replace only N: a tied tenant or a compressed family member."""
        return self.is_tied or self.family is not None

    def __post_init__(self):
        a = self.adapter
        self.content_hash, self.is_tied, self.flavour = a.content_hash, a.is_tied, a.flavour
        self.family = getattr(a, "shared_family", None)
        self.rank, self.targets, self.held_bytes = max(a.ranks), tuple(a.targets), a.held_bytes()


@dataclass(eq=False, slots=True)
class Hold:
    """One response's hold on a version (AdapterRegistry.hold): its requests (OpenAI's ``n``, a
    batch of prompts) are queued on ``version`` one by one, each pinned through this hold."""

    version: AdapterVersion
    to_come: int  # its requests not pinned yet (AdapterRegistry.acquire_held); 0 once let go
    let_go: bool = False  # AdapterRegistry.let_go has run


RESTORE_LOG_SHOWN = 20  # adapters a restore's log line names; past that it counts the others


def restored_summary(versions: list[AdapterVersion], root: object, shown: int = RESTORE_LOG_SHOWN,
                     done: str = "restored", where: str = "from") -> str:
    """The log line of a restart's restore from the store at ``root``: the adapters' number by
    flavour, then the first ``shown`` as ``name vN (flavour, rank R)`` and a count of the rest (a
    1,000-adapter store's start log stays one readable line; ``client list`` names them all), e.g.
    ``restored 3 adapters from STORE (2 inttune-tied, 1 lora): lower v4 (inttune-tied, rank 16), ...``.
    ``done`` and ``where`` word another event: serve's start logs the adapters its flags registered
    as ``registered 3 adapters into the store STORE (...)``.
    """
    kinds = Counter(v.flavour for v in versions)
    by_kind = ", ".join(f"{count} {flavour}" for flavour, count in sorted(kinds.items()))
    named = ", ".join(f"{v.name} v{v.version} ({v.flavour}, rank {v.rank})" for v in versions[:shown])
    rest = len(versions) - shown
    more = f", and {rest} more (`client list` names all)" if rest > 0 else ""
    plural = "s" if len(versions) != 1 else ""
    return f"{done} {len(versions)} adapter{plural} {where} {root} ({by_kind}): {named}{more}"
