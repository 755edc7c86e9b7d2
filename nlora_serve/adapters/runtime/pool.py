"""Resident adapter weights, laid out as the kernels read them (DESIGN §3, §4).

Three kinds of pool, each with its own slot space (adapters/runtime/residency.py picks one per version):

- :class:`TiedPool`, one per IntTune family: every tenant of the family is one slot of a single
  tensor ``n [slots, sites, r, r]``; A and B are the base weight's own slices, so a tenant costs
  ``sites · r² · bytes`` and nothing else.
- :class:`~nlora_serve.adapters.runtime.family_pool.FamilyPool` (family_pool.py), one per compressed family:
  a TiedPool whose A and B are the family's shared factors, stored once.
- :class:`LoraPool`, for untied LoRA / NLoRA adapters: per site ``n [S, R, R]``, ``a [S, R, in]``,
  ``b [S, out, R]`` (each adapter is a family of one), R = the server's max rank.

The per-module scaling s (alpha / r, or rsLoRA's alpha / sqrt(r), per ``rank_pattern`` /
``alpha_pattern``) is folded into N when a slot is written, so every slot's kernel scaling is 1.
Entries beyond a slot's rank are zero; a site an adapter does not adapt has N = 0 there. A free
slot may hold anything: no token points at it.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable
from dataclasses import dataclass

import torch

from nlora_serve.adapters.adapter import Adapter, SiteWeights
from nlora_serve.errors import AdapterError
from nlora_serve.kernels import metadata
from nlora_serve.kernels.weights import KernelSiteWeights
from nlora_serve.models.base import BaseModel
from nlora_serve.models.spec import Site


# Torch spreads an op of at least at::internal::GRAIN_SIZE elements over its intra-op threads. A
# slot written from an admin thread (a hot-swap under load) would then compete with the engine's
# own parallel ops for the same cores, so the write runs in pieces below that size.
SERIAL_ELEMENTS = 32768

# Every pool's generations come from this one count, so (id(pool), generation) never names two
# pools: a pool dropped with its last adapter (residency.py) and one made later at its address
# would otherwise both start at 0, and views or CUDA graphs cached for the dead one would be read
# for the new one.
_GENERATIONS = itertools.count(1)


def serial_rows(row_elements: int) -> int:
    """Rows of ``row_elements`` elements each that one op may take and still run on the calling
    thread alone (at least 1)."""
    return max(1, (SERIAL_ELEMENTS - 1) // max(1, row_elements))


@dataclass(frozen=True, slots=True)
class Placement:
    """Where the pools live, and the base weights the tied path reads there.

    The engine places the base weights on its device (fused q/k/v and gate/up); the pools of a
    tied family read W[:, :r] (and the q/k/v bias) from those placed tensors, never from a copy.
    """

    device: torch.device
    weight: Callable[[int, str], torch.Tensor]  # (layer, module) -> W [out, in] on ``device``
    bias: Callable[[int, str], torch.Tensor | None]  # (layer, module) -> b [out] or None
    stream: torch.cuda.Stream | None = None  # CUDA: the side stream slot writes copy on (see copy_in)

    @staticmethod
    def host(base: BaseModel) -> Placement:
        """The base model's own (CPU) weights."""
        return Placement(torch.device("cpu"), base.weight,
                         lambda layer, module: base.weights.get(f"{base.spec.module_path(layer, module)}.bias"))


def copy_in(dst: torch.Tensor, src: torch.Tensor, stream: torch.cuda.Stream | None = None) -> None:
    """``dst.copy_(src)`` for slot writes from an admin thread.

    With a CUDA ``stream`` the copy runs from pinned memory on it and this thread waits for it
    alone: the engine's stream is never stalled (the slot being written is one no step reads).
    The side stream does not wait for the engine's stream here: a write into memory allocated or
    filled on that stream since (a new pool tensor, a grown one) must be ordered after it first
    (:meth:`_Pool._copy_in` does so).
    """
    if stream is None or not dst.is_cuda:
        dst.copy_(src)
        return
    with torch.cuda.stream(stream):
        dst.copy_(src.to(dst.dtype).pin_memory(), non_blocking=True)
    stream.synchronize()


def _scaled_n(site: SiteWeights, width: int, dtype: torch.dtype) -> torch.Tensor:
    """``s · N`` zero-padded to [width, width], folded in float64 then cast once.

    Raises:
        AdapterError: s · N does not fit ``dtype`` (e.g. lora_alpha = 1e39).
    """
    out = torch.zeros(width, width, dtype=torch.float64)
    out[: site.rank, : site.rank] = site.scaling * site.N.to(torch.float64)
    return _finite(out.to(dtype), site)


def _finite(scaled_n: torch.Tensor, site: SiteWeights) -> torch.Tensor:
    if not torch.isfinite(scaled_n).all():
        raise AdapterError(f"{site.module} of layer {site.layer}: scaling {site.scaling:g} times N overflows "
                           f"{scaled_n.dtype}; lower lora_alpha")
    return scaled_n


class _Pool:
    """Slot bookkeeping shared by both pool kinds: free list, ranks, and per-slot bias."""

    def __init__(self, base: BaseModel, capacity: int, placement: Placement | None = None):
        self.base = base
        self.placement = placement if placement is not None else Placement.host(base)
        self.device = self.placement.device
        self.capacity = capacity
        self._free = list(range(capacity - 1, -1, -1))
        self.slot_ranks = torch.zeros(capacity, dtype=torch.int32)  # [S]
        # [S]: always 1, the kernels' per-slot s: s can differ per module (rank_pattern /
        # alpha_pattern) and one number per slot cannot hold that, so write() folds it into N
        self.slot_scalings = torch.ones(capacity, dtype=torch.float32)
        self.bias: dict[Site, torch.Tensor] = {}  # site -> [S, out] s·b, allocated on first use
        self.generation = next(_GENERATIONS)  # a new one whenever a tensor is replaced: cached views go stale
        self._ordered: int | None = None  # the generation the side stream was last ordered after
        self.retired = False  # dropped by its Residency with its last adapter: no step reads it again

    def _copy_in(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        """:func:`copy_in` on the placement's side stream, ordered after the allocating stream's work
        whenever a pool tensor was allocated since the last write (a new pool, ``generation`` bumped).

        Pool tensors are allocated and zero-filled (grown, concatenated) on this thread's current
        stream, from memory the caching allocator may have just taken back from the engine's step
        still queued there. The side stream runs apart from it (torch's streams do not sync with
        the default one): unordered, a slot write could land before the zero fill (which then
        erases it) or while an in-flight step still writes that memory. Writes into a tensor that
        existed before need no wait: their slot is one no step reads (a step still in flight may read
        it for a request that has ended: that row's token is dropped).
        """
        stream = self.placement.stream
        if stream is not None and self._ordered != self.generation:
            stream.wait_stream(torch.cuda.current_stream(self.device))
            self._ordered = self.generation
        copy_in(dst, src, stream)

    @property
    def used(self) -> int:
        return self.capacity - len(self._free)

    def take_slot(self) -> int | None:
        """A free slot, or None when the pool is full."""
        return self._free.pop() if self._free else None

    def release_slot(self, slot: int) -> None:
        self._free.append(slot)

    def _write_bias(self, slot: int, adapter: Adapter) -> None:
        for key, site in adapter.sites.items():
            if site.bias is not None and key not in self.bias:
                out = site.bias.shape[0]
                self.bias[key] = torch.zeros(self.capacity, out, dtype=self.base.dtype, device=self.device)
                self.generation = next(_GENERATIONS)  # a new tensor: captured CUDA graphs must not keep reading without it
        for key, table in self.bias.items():
            site = adapter.sites.get(key)
            none = site is None or site.bias is None
            self._copy_in(table[slot], torch.zeros(table.shape[1:], dtype=table.dtype) if none
                          else site.bias_delta(self.base.dtype))

    def add_bias(self, y: torch.Tensor, batch: metadata.AdapterBatch, site: Site) -> None:
        """y[t] += s·b[slot(t)] for the adapted tokens, where some resident adapter has a bias."""
        table = self.bias.get(site)
        if table is None or batch.is_empty:
            return
        index = (batch.token_slots >= 0).nonzero().squeeze(1)
        y.index_add_(0, index, table.index_select(0, batch.token_slots[index].long()))


class TiedPool(_Pool):
    """The N pool of one IntTune family: ``n [capacity, sites, r, r]``, A/B = base slices.

    Grows by doubling (a new tensor; ``generation`` changes so the engine refreshes its views
    at the next step, while a running step keeps reading the old tensor, which stays valid).
    """

    def __init__(self, base: BaseModel, family: str, adapter: Adapter, capacity: int = 64,
                 placement: Placement | None = None):
        super().__init__(base, capacity, placement)
        self.family = family
        self.sites: list[Site] = list(adapter.sites)
        self.site_index = {s: i for i, s in enumerate(self.sites)}
        self.rank = max(s.rank for s in adapter.sites.values())
        self.n = torch.empty(capacity, len(self.sites), self.rank, self.rank, dtype=base.dtype, device=self.device)

    @property
    def slot_bytes(self) -> int:
        """Bytes one tenant occupies: sites · r² · element size."""
        return len(self.sites) * self.rank * self.rank * self.n.element_size()

    @property
    def slot_families(self) -> torch.Tensor:
        return torch.full((self.capacity,), metadata.TIED, dtype=torch.int32)

    def grow(self) -> None:
        """Double the capacity, copying the used slots."""
        new = torch.empty(2 * self.capacity, *self.n.shape[1:], dtype=self.n.dtype, device=self.device)
        new[: self.capacity] = self.n
        self._free = list(range(2 * self.capacity - 1, self.capacity - 1, -1)) + self._free
        self.slot_ranks = torch.cat([self.slot_ranks, torch.zeros_like(self.slot_ranks)])
        self.slot_scalings = torch.ones(2 * self.capacity, dtype=torch.float32)
        self.bias = {k: torch.cat([t, torch.zeros_like(t)]) for k, t in self.bias.items()}
        self.n, self.capacity = new, 2 * self.capacity
        self.generation = next(_GENERATIONS)

    def write(self, slot: int, adapter: Adapter) -> None:
        """Write ``adapter``'s scaled N into ``slot`` (a slot no token points at).

        Raises:
            AdapterError: s · N does not fit the pool's dtype (``slot`` may be partly written).
        """
        sites = [adapter.sites[s] for s in self.sites]
        if all(s.rank == self.rank for s in sites):  # a few stacked ops instead of one per site
            scale = torch.tensor([s.scaling for s in sites], dtype=torch.float64)
            step = serial_rows(self.rank * self.rank)
            for lo in range(0, len(sites), step):
                part = sites[lo:lo + step]
                n = torch.stack([s.N for s in part]).to(torch.float64)  # [part, r, r]
                scaled = (n * scale[lo:lo + step, None, None]).to(self.n.dtype)
                if not torch.isfinite(scaled).all():
                    bad = int((~torch.isfinite(scaled)).flatten(1).any(1).nonzero()[0])
                    _finite(scaled[bad], part[bad])
                self._copy_in(self.n[slot, lo:lo + step], scaled)
        else:  # rank_pattern: ranks differ per module; zero-pad each to r
            self._copy_in(self.n[slot], torch.stack([_scaled_n(s, self.rank, self.n.dtype) for s in sites]))
        self.slot_ranks[slot] = self.rank
        self._write_bias(slot, adapter)

    def kernel_site(self, site: Site) -> KernelSiteWeights | None:
        """The kernels' view of this pool at one projection, or None if the family skips it."""
        i = self.site_index.get(site)
        if i is None:
            return None
        layer, module = site
        w = self.placement.weight(layer, module)
        bias = self.placement.bias(layer, module)
        tied_bias = bias[: self.rank] if bias is not None else None
        tied_b = w[:, : self.rank]
        # A contiguous W[:, :r]^T (r · out elements) spares the CPU expand a strided read per call;
        # the caller caches this view per generation, so the copy is made once per site. The
        # Triton expand reads the strided view directly.
        tied_bt = None if tied_b.is_cuda else tied_b.t().contiguous()
        return KernelSiteWeights(n_pool=self.n[:, i], tied_b=tied_b, tied_a=w[: self.rank], tied_bias=tied_bias,
                                 tied_bt=tied_bt)


class LoraPool(_Pool):
    """Untied adapters: per site ``n [S, R, R]``, ``a [S, R, in]``, ``b [S, out, R]`` (slot = family).

    Site tensors are allocated on the first adapter that adapts the site.
    """

    def __init__(self, base: BaseModel, capacity: int, rank: int, placement: Placement | None = None):
        super().__init__(base, capacity, placement)
        self.rank = rank
        self.tables: dict[Site, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        # On the CPU, B^T [S, R, out] per site as well, written with each slot: the native group
        # op's expand reads it as is, where it would otherwise transpose every used slot's B on
        # every call (~40% of its decode time, bench/RESULTS.md). Costs B's bytes again.
        self.b_t: dict[Site, torch.Tensor] = {}

    @property
    def slot_families(self) -> torch.Tensor:
        return torch.arange(self.capacity, dtype=torch.int32)

    def _table(self, site: Site) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if site not in self.tables:
            out, inp = self.base.spec.projection_shape(site[1])
            S, R, kw = self.capacity, self.rank, {"dtype": self.base.dtype, "device": self.device}
            self.tables[site] = (torch.zeros(S, R, R, **kw), torch.zeros(S, R, inp, **kw),
                                 torch.zeros(S, out, R, **kw))
            if self.device.type == "cpu":
                self.b_t[site] = torch.zeros(S, R, out, **kw)
            self.generation = next(_GENERATIONS)
        return self.tables[site]

    def write(self, slot: int, adapter: Adapter) -> None:
        """Write ``adapter``'s A, scaled N and B into ``slot``; N = 0 at sites it does not adapt."""
        for key, site in adapter.sites.items():
            n, a, b = self._table(key)
            r = site.rank
            # whole zero-padded slot rows built on the host, so each is one copy in (see copy_in)
            a_slot = torch.zeros(a.shape[1:], dtype=a.dtype)
            a_slot[:r] = site.A
            b_slot = torch.zeros(b.shape[1:], dtype=b.dtype)
            b_slot[:, :r] = site.B
            self._copy_in(n[slot], _scaled_n(site, self.rank, n.dtype))
            self._copy_in(a[slot], a_slot)
            self._copy_in(b[slot], b_slot)
            if key in self.b_t:
                self.b_t[key][slot].copy_(b_slot.t())
        for key, (n, _, _) in self.tables.items():
            if key not in adapter.sites:
                self._copy_in(n[slot], torch.zeros(n.shape[1:], dtype=n.dtype))
        self.slot_ranks[slot] = max(s.rank for s in adapter.sites.values())
        self._write_bias(slot, adapter)

    def kernel_site(self, site: Site) -> KernelSiteWeights | None:
        """The kernels' view of this pool at one projection, or None if no adapter uses it."""
        table = self.tables.get(site)
        if table is None:
            return None
        n, a, b = table
        return KernelSiteWeights(n_pool=n, a_pool=a, b_pool=b, b_pool_t=self.b_t.get(site))