"""``adapters compress``: a collection of LoRA / NLoRA adapters into one family on disk.

Reads each adapter as the server would (so what is compressed is what would be served), runs
:func:`basis.compress_module` per site, and writes the family (layout in adapters/family.py): the
shared factors once under ``_families/<key>/`` and one N-only member folder per adapter, the
scaling folded into N (members have r = lora_alpha = R, so s = 1).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import torch

from nlora_serve.adapters.adapter import Adapter
from nlora_serve.adapters.compress.basis import LowRank, compress_module, project_module
from nlora_serve.adapters.config import CONFIG_NAME
from nlora_serve.adapters.family import FamilyFactors, make_factors, member_header, write_factors
from nlora_serve.adapters.writing import Undo, check_out_dir, write_dir
from nlora_serve.adapters.keys import PART_A, PART_B, PART_N, tensor_key
from nlora_serve.adapters.names import validate_name
from nlora_serve.errors import AdapterError
from nlora_serve.models.spec import PROJECTIONS, Site


@dataclass(slots=True)
class CompressedFamily:
    """A compressed collection in memory."""

    factors: FamilyFactors  # shared A_f, B_f per site (float32)
    members: dict[str, dict[Site, torch.Tensor]]  # name -> site -> N [R, R] float32 (s folded in)
    errors: dict[str, dict[Site, float]]  # name -> site -> ‖Δ − B_f N A_f‖_F / ‖Δ‖_F
    seconds: float = 0.0  # wall time of the compression itself (not the reads)
    source_bytes: dict[str, int] = field(default_factory=dict)  # name -> bytes of A, N, B as read

    def member_bytes(self, dtype_bytes: int = 4) -> int:
        """Bytes one member holds: sites · R² · dtype_bytes."""
        return len(self.factors.sites) * self.factors.rank ** 2 * dtype_bytes


def low_rank(adapter: Adapter, site: Site) -> LowRank:
    """One site's delta as factors: s · B @ (N @ A) (N folded into A: rank unchanged)."""
    w = adapter.sites[site]
    a = w.N.to(torch.float64) @ w.A.to(torch.float64)
    return LowRank(a, w.B.to(torch.float64), w.scaling)


def check_collection(adapters: dict[str, Adapter]) -> list[Site]:
    """The sites every adapter adapts (they must agree), in order.

    Raises:
        AdapterError: no adapters, sites differ, an adapter has a lora_B bias (not compressible
            into N), or a base differs.
    """
    if not adapters:
        raise AdapterError("compress needs at least one adapter")
    names = list(adapters)
    first = adapters[names[0]]
    for name, a in adapters.items():
        validate_name(name)
        if set(a.sites) != set(first.sites):
            raise AdapterError(f"adapter {name!r} adapts {len(a.sites)} sites, {names[0]!r} {len(first.sites)}; "
                               "a family needs the same target modules and layers in every member")
        if any(s.bias is not None for s in a.sites.values()):
            raise AdapterError(f"adapter {name!r} has a lora_B bias, which a family's N cannot hold")
        if a.base_fingerprint != first.base_fingerprint:
            raise AdapterError(f"adapter {name!r} was read against another base model than {names[0]!r}")
    return list(first.sites)


def check_rank(adapters: dict[str, Adapter], rank: int, flag: str = "rank") -> None:
    """Refuse a family rank above min(in, out) of every site: rows past it could only be zero, and
    an unbounded R allocated R x in factors (``--rank 100000``: a 160 GB allocation failed deep in torch).

    Raises:
        AdapterError: ``rank`` over that bound (``flag`` names the option).
    """
    first = next(iter(adapters.values()))
    limit = max(min(w.A.shape[1], w.B.shape[0]) for w in first.sites.values())
    if rank > limit:
        raise AdapterError(f"{flag} {rank} exceeds {limit}, the most any adapted module's shape can hold "
                           "(min(in, out) of the largest site)")


def compress_adapters(adapters: dict[str, Adapter], rank: int, *, iters: int = 2,
                      device: str | torch.device = "cpu", progress=None) -> CompressedFamily:
    """Compress ``adapters`` (name -> adapter, read against one base) into one family of rank R.

    Args:
        rank: R ≥ 1 (also bounded by each site's in / out dims: surplus rows are zero).
        iters: HOOI sweeps (see basis.py).
        device: where the SVDs run; float64 on the CPU, float32 on a GPU.
        progress: an optional callable(site) invoked after each site (a tqdm update).

    Raises:
        AdapterError: see :func:`check_collection` and :func:`check_rank`; ValueError for rank < 1.
    """
    sites = check_collection(adapters)
    check_rank(adapters, rank)
    on_cpu = torch.device(device).type == "cpu"
    dtype = torch.float64 if on_cpu else torch.float32
    threads = torch.get_num_threads()
    if on_cpu:  # tiny matrices: on a busy box OpenMP barriers cost 10-80x the maths (0.25 s vs 2-20 s a site)
        torch.set_num_threads(1)
    try:
        return _compress_sites(adapters, sites, rank, iters, dtype, device, progress)
    finally:
        torch.set_num_threads(threads)


def _compress_sites(adapters, sites, rank, iters, dtype, device, progress) -> CompressedFamily:
    start = time.perf_counter()
    shared, members, errors = {}, {n: {} for n in adapters}, {n: {} for n in adapters}
    for site in sites:
        items = [low_rank(a, site) for a in adapters.values()]
        fit = compress_module(items, rank, iters=iters, dtype=dtype, device=device)
        shared[site] = (fit.A, fit.B)
        for name, n, err in zip(adapters, fit.N, fit.rel_error):
            members[name][site], errors[name][site] = n.to(torch.float32), err
        if progress is not None:
            progress(site)
    seconds = time.perf_counter() - start
    base = next(iter(adapters.values())).base_fingerprint
    return CompressedFamily(make_factors(shared, base), members, errors, seconds,
                            {n: a.full_bytes() for n, a in adapters.items()})


def member_config(factors: FamilyFactors) -> dict:
    """adapter_config.json of a member: r = lora_alpha = R (s = 1), the family's modules and layers.

    Raises:
        AdapterError: the family's sites are not every (layer, module) pair of its layers and
            modules (a PEFT config could not name them).
    """
    layers = sorted({layer for layer, _ in factors.sites})
    modules = [m for m in PROJECTIONS if any(s[1] == m for s in factors.sites)]
    if len(factors.sites) != len(layers) * len(modules):
        raise AdapterError(f"family sites ({len(factors.sites)}) are not every pair of layers {layers} and modules "
                           f"{modules}; {CONFIG_NAME} cannot name them")
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": factors.rank, "lora_alpha": factors.rank,
            "target_modules": modules, "layers_to_transform": layers, "lora_dropout": 0.0, "bias": "none",
            "use_rslora": False, "use_dora": False, "init_lora_weights": True,
            "nlora_serve": member_header(factors.key, factors.base_fingerprint)}


def write_member(out: Path, name: str, factors: FamilyFactors, n: dict[Site, torch.Tensor], *,
                 full: bool = False, undo: Undo | None = None) -> Path:
    """``out/<name>/``: the member's config and its N-only weights (refuses to overwrite).

    ``full``: also lora_A = A_f and lora_B = B_f (the full form, self-contained: what ``adapters
    upload`` sends; the server stores it compact and writes the factors once). ``undo``: as
    :func:`~nlora_serve.adapters.writing.write_dir`.
    """
    validate_name(name)
    tensors = {tensor_key(layer, module, PART_N): n[(layer, module)].to(torch.float32) for layer, module in n}
    if full:
        for (layer, module), (a, b) in factors.sites.items():
            tensors[tensor_key(layer, module, PART_A)] = a
            tensors[tensor_key(layer, module, PART_B)] = b
    return write_dir(Path(out) / name, member_config(factors), tensors, undo=undo)


def check_members(out: Path, names) -> None:
    """Refuse, before any work, a member folder under ``out`` that already holds an adapter.

    Raises:
        AdapterError: as :func:`~nlora_serve.adapters.writing.check_out_dir`, naming the member.
    """
    for name in names:
        validate_name(name)
        check_out_dir(Path(out) / name, f"member {name!r} folder")


def write_family(out: Path, family: CompressedFamily, *, full: bool = False, undo: Undo | None = None) -> Path:
    """Write the factors once and every member under ``out``, all or nothing; returns the factors'
    file path.

    Raises:
        AdapterError: a member folder already holds an adapter (checked before anything is
            written), or a write failed (what this call wrote is removed again).
    """
    check_members(out, family.members)
    mine = Undo()
    try:
        with mine:
            path = write_factors(Path(out), family.factors, mine)
            for name, n in family.members.items():
                write_member(out, name, family.factors, n, full=full, undo=mine)
    except OSError as exc:
        raise AdapterError(f"{out}: cannot write the family ({exc.strerror or exc})") from None
    if undo is not None:
        undo.adopt(mine)
    return path


def project_adapter(adapter: Adapter, factors: FamilyFactors) -> tuple[dict[Site, torch.Tensor], dict[Site, float]]:
    """``compress --add``: a new adapter onto an existing family's basis (the basis is unchanged).

    Returns (site -> N [R, R] float32, site -> relative error).

    Raises:
        AdapterError: the adapter's sites are not the family's, or it has a lora_B bias.
    """
    if set(adapter.sites) != set(factors.sites):
        raise AdapterError(f"the adapter adapts {len(adapter.sites)} sites, the family {len(factors.sites)}; "
                           "--add needs the family's target modules and layers")
    if any(s.bias is not None for s in adapter.sites.values()):
        raise AdapterError("the adapter has a lora_B bias, which a family's N cannot hold")
    ns, errors = {}, {}
    for site, (a_f, b_f) in factors.sites.items():
        n, err = project_module(low_rank(adapter, site), a_f, b_f)
        ns[site], errors[site] = n.to(torch.float32), err
    return ns, errors
