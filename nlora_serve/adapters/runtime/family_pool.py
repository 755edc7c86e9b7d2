"""The pool of one compressed family: shared A_f, B_f once per site, one N slot per member.

Served through the kernels' group path (DESIGN §4): every slot of the pool has family row 0, so a
step does one dense shrink ``X A_fᵀ`` and one dense expand by ``B_f`` per projection, and gathers
each token's N [R, R] by its slot. A member costs ``sites · R² · bytes``, like a tied tenant; the
factors cost ``Σ_sites R · (in + out)`` once per family.
"""

from __future__ import annotations

import torch

from nlora_serve.adapters.adapter import Adapter
from nlora_serve.adapters.runtime.pool import Placement, TiedPool
from nlora_serve.errors import AdapterError
from nlora_serve.kernels.weights import KernelSiteWeights
from nlora_serve.models.base import BaseModel
from nlora_serve.models.spec import Site


class FamilyPool(TiedPool):
    """``n [capacity, sites, R, R]`` as a tied pool, plus per site ``a [1, R, in]`` and ``b [1, out, R]``.

    Slot bookkeeping, growth, N writes (the scaling folded into N) and bias are the tied pool's;
    only where A and B come from differs.
    """

    def __init__(self, base: BaseModel, family: str, adapter: Adapter, capacity: int = 64,
                 placement: Placement | None = None):
        if adapter.shared_family != family:
            raise AdapterError(f"adapter {adapter.source!r} is not a member of family {family[:16]}…")
        super().__init__(base, family, adapter, capacity, placement)
        self.factors: dict[Site, tuple[torch.Tensor, torch.Tensor]] = {}
        for site in self.sites:
            w = adapter.sites[site]
            a = torch.empty(1, *w.A.shape, dtype=base.dtype, device=self.device)
            b = torch.empty(1, *w.B.shape, dtype=base.dtype, device=self.device)
            self._copy_in(a[0], w.A)
            self._copy_in(b[0], w.B)
            self.factors[site] = (a, b)

    @property
    def slot_families(self) -> torch.Tensor:
        return torch.zeros(self.capacity, dtype=torch.int32)  # every member reads family row 0

    def write(self, slot: int, adapter: Adapter) -> None:
        """Write a member's scaled N into ``slot`` (see :meth:`TiedPool.write`).

        Raises:
            AdapterError: ``adapter`` belongs to another family or its s · N overflows the dtype.
        """
        if adapter.shared_family != self.family:
            raise AdapterError(f"adapter {adapter.source!r} is not a member of family {self.family[:16]}…")
        super().write(slot, adapter)

    def kernel_site(self, site: Site) -> KernelSiteWeights | None:
        """The group path's view at one projection, or None if the family skips it."""
        i = self.site_index.get(site)
        if i is None:
            return None
        a, b = self.factors[site]
        return KernelSiteWeights(n_pool=self.n[:, i], a_pool=a, b_pool=b)
