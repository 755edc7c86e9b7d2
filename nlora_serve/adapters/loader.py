"""Read and validate one adapter directory against a base model (DESIGN §3).

Every check runs before the adapter exists, so a refused adapter disturbs nothing. Order:
config fields, file format, key names, config ↔ keys agreement, rank vs max rank, shapes,
finite values; then the magnitude bounds (bounds.py), tied detection, the content hash, and one
cast to the compute dtype.
"""

from __future__ import annotations

from pathlib import Path

import torch

from nlora_serve.adapters.adapter import Adapter, SiteWeights, content_hash, flavour_of, sort_sites
from nlora_serve.adapters.bounds import check_finite, site_limits, tied_norms
from nlora_serve.adapters.config import (CONFIG_NAME, AdapterConfig, SitePlan, parse_config_bytes, plan_sites,
                                         read_config)
from nlora_serve.adapters.file_read import read_file
from nlora_serve.adapters.format import STORED_DTYPES, read_bytes, read_header_bytes, weights_path
from nlora_serve.adapters.limits import DEFAULT_MAX_ADAPTER_BYTES, DEFAULT_MAX_RANK
from nlora_serve.adapters.keys import PART_A, PART_B, PART_BIAS, PART_N, group_keys
from nlora_serve.adapters.family import FamilyFactors, FamilyResolver, make_factors
from nlora_serve.adapters.tied import family_key, is_tied, tie_to_base
from nlora_serve.errors import AdapterError
from nlora_serve.models.base import BaseModel
from nlora_serve.models.spec import PROJECTIONS, ModelSpec


def _check_ranks(plans: dict[tuple[int, str], SitePlan], max_rank: int) -> None:
    worst = max(plans.values(), key=lambda p: p.rank)
    if worst.rank > max_rank:
        raise AdapterError(f"rank {worst.rank} of {ModelSpec.module_path(worst.layer, worst.module)} exceeds "
                           f"the server's max rank {max_rank} (--max-rank)")


def _check_coverage(grouped: dict, plans: dict, cfg: AdapterConfig) -> None:
    extra = [s for s in grouped if s not in plans]
    if extra:
        key = next(iter(grouped[extra[0]].values()))
        # h130: a typo'd entry ("q_prj") left only this tensor-level message, which does not name it
        unknown = [] if isinstance(cfg.target_modules, str) else \
            [t for t in cfg.target_modules if t.rsplit(".", 1)[-1] not in PROJECTIONS]
        typo = (f"; target_modules {', '.join(map(repr, unknown))} names no projection of this model "
                f"({', '.join(PROJECTIONS)})") if unknown else ""
        raise AdapterError(f"tensor {key!r} adapts {ModelSpec.module_path(*extra[0])}, which {CONFIG_NAME} "
                           f"does not target (target_modules={cfg.target_modules!r}, layers_to_transform="
                           f"{cfg.layers_to_transform!r}, exclude_modules={cfg.exclude_modules!r}){typo}")
    missing = [s for s in plans if s not in grouped]
    if missing:
        raise AdapterError(f"{CONFIG_NAME} targets {ModelSpec.module_path(*missing[0])} but the weights hold "
                           f"no tensors for it ({len(missing)} of {len(plans)} targeted modules missing)")


def _required_parts(cfg: AdapterConfig) -> tuple[set[str], set[str]]:
    """(required, allowed) parts of one site's tensors."""
    if cfg.tied is not None:
        return {PART_N}, {PART_N}
    if cfg.family is not None:  # compact (N only) or full (A_f, N, B_f) family member
        return {PART_N}, {PART_A, PART_N, PART_B}
    bias = {PART_BIAS} if cfg.lora_bias else set()
    return {PART_A, PART_B} | bias, {PART_A, PART_B, PART_N} | bias


def _check_parts(grouped: dict, cfg: AdapterConfig) -> None:
    for (layer, module), parts in grouped.items():
        required, allowed = _required_parts(cfg)
        name = ModelSpec.module_path(layer, module)
        if required - set(parts):
            lacking = ", ".join(sorted(required - set(parts)))
            why = " (lora_bias=true)" if lacking == PART_BIAS else ""
            form = "the compact tied form" if cfg.tied else "a LoRA site"
            raise AdapterError(f"{name}: {form} needs {lacking}{why}; the file has only {', '.join(sorted(parts))}")
        if set(parts) - allowed:
            key = parts[sorted(set(parts) - allowed)[0]]
            why = ("the compact tied form holds only lora_N" if cfg.tied else
                   f"{CONFIG_NAME} has lora_bias=false")
            raise AdapterError(f"tensor {key!r} is not expected: {why}")


def _expected_shape(part: str, plan: SitePlan, spec: ModelSpec) -> tuple[int, ...]:
    out, inp = spec.projection_shape(plan.module)
    return {PART_A: (plan.rank, inp), PART_N: (plan.rank, plan.rank), PART_B: (out, plan.rank),
            PART_BIAS: (out,)}[part]


def _check_shapes(grouped: dict, header: dict, plans: dict, spec: ModelSpec) -> None:
    for site, parts in grouped.items():
        plan = plans[site]
        out, inp = spec.projection_shape(plan.module)
        for part, key in parts.items():
            got, want = header[key][1], _expected_shape(part, plan, spec)
            if got != want:
                raise AdapterError(f"tensor {key!r} has shape {list(got)}, expected {list(want)} "
                                   f"(r={plan.rank} from {CONFIG_NAME}; {plan.module} of this model is "
                                   f"[out={out}, in={inp}])")


def _build_sites(grouped, tensors, plans, base: BaseModel,
                 factors: FamilyFactors | None = None) -> dict[tuple[int, str], SiteWeights]:
    """Sites in float32 (exact for the accepted stored dtypes); compact tied sites get base views,
    family members the family's shared factors."""
    sites = {}
    for site, parts in grouped.items():
        plan = plans[site]
        get = {p: tensors[k].to(torch.float32) for p, k in parts.items()}
        w = base.weight(*site)
        a, b = factors.sites[site] if factors is not None else (w[: plan.rank, :], w[:, : plan.rank])
        sites[site] = SiteWeights(
            layer=plan.layer, module=plan.module, rank=plan.rank, scaling=plan.scaling,
            A=a if factors is not None else get.get(PART_A, a), B=b if factors is not None else get.get(PART_B, b),
            N=get.get(PART_N, torch.eye(plan.rank, dtype=torch.float32)),
            bias=get.get(PART_BIAS), has_n=PART_N in get)
    return sort_sites(sites)


def _check_family(cfg: AdapterConfig, plans: dict, base: BaseModel) -> str:
    tied = cfg.tied
    if tied.base_fingerprint != base.fingerprint:
        raise AdapterError(f"{CONFIG_NAME}: this tied adapter's A and B are slices of base model "
                           f"{tied.base_fingerprint[:16]}…, not of the loaded base {base.fingerprint[:16]}…")
    key = family_key(base.fingerprint, {s: p.rank for s, p in plans.items()})
    if tied.family != key:
        raise AdapterError(f"{CONFIG_NAME}: nlora_serve.family {tied.family[:16]}… does not match the family "
                           f"{key[:16]}… of its own r / target_modules / layers on this base")
    return key


def _cast(sites: dict[tuple[int, str], SiteWeights], dtype: torch.dtype) -> None:
    for s in sites.values():
        s.A, s.N, s.B = s.A.to(dtype), s.N.to(dtype), s.B.to(dtype)
        s.bias = None if s.bias is None else s.bias.to(dtype)


def _family_factors(cfg: AdapterConfig, grouped: dict, tensors: dict, plans: dict, base: BaseModel,
                    families: FamilyResolver | None, near: Path | None, source: str) -> FamilyFactors:
    """The shared factors a family member names: from its own lora_A / lora_B (the full form,
    checked to hash to the family key) or found by key (the compact form).

    Raises:
        AdapterError: another base, A/B at some sites only, factors missing or not the named family,
            or factors whose sites / rank disagree with the member's config.
    """
    header = cfg.family
    if header.base_fingerprint != base.fingerprint:
        raise AdapterError(f"{CONFIG_NAME}: this family member was compressed for base model "
                           f"{header.base_fingerprint[:16]}…, not the loaded base {base.fingerprint[:16]}…")
    families = families if families is not None else FamilyResolver(base.spec)
    with_ab = [s for s, parts in grouped.items() if PART_A in parts and PART_B in parts]
    if with_ab and len(with_ab) != len(grouped):
        raise AdapterError(f"{source}: a family member holds lora_A and lora_B at every site (full form) or at "
                           f"none (compact form); this one has them at {len(with_ab)} of {len(grouped)}")
    if with_ab:
        own = make_factors({s: (tensors[grouped[s][PART_A]], tensors[grouped[s][PART_B]]) for s in grouped},
                           base.fingerprint)
        if own.key != header.family:
            raise AdapterError(f"{source}: its lora_A / lora_B hash to family {own.key[:16]}…, not to the "
                               f"family {header.family[:16]}… its {CONFIG_NAME} names")
        factors = families.known(own)  # cached by the manager once a member version is admitted
    else:
        factors = families.get(header.family, near)
    if set(factors.sites) != set(plans) or any(p.rank != factors.rank for p in plans.values()):
        raise AdapterError(f"{source}: family {header.family[:16]}… has rank {factors.rank} at "
                           f"{len(factors.sites)} sites; the member's {CONFIG_NAME} plans "
                           f"{len(plans)} sites of ranks {sorted({p.rank for p in plans.values()})}")
    return factors


def read_adapter_bytes(config: bytes, weights: bytes, base: BaseModel, *, max_rank: int = DEFAULT_MAX_RANK,
                       source: str = "upload", families: FamilyResolver | None = None) -> Adapter:
    """:func:`read_adapter` for an adapter held in memory (an upload or a hot-swap payload):
    ``adapter_config.json`` and ``adapter_model.safetensors`` bytes. Same checks, same result.

    Raises:
        AdapterError: as :func:`read_adapter`.
    """
    cfg = parse_config_bytes(config)
    header, tensors = read_bytes(weights)
    return _read(cfg, header, lambda: tensors, base, max_rank, source, families)


def read_adapter(adapter_dir: str | Path, base: BaseModel, *, max_rank: int = DEFAULT_MAX_RANK,
                 families: FamilyResolver | None = None,
                 max_bytes: int | None = DEFAULT_MAX_ADAPTER_BYTES) -> Adapter:
    """Read, validate and type one adapter directory for ``base``.

    Accepts the PEFT LoRA layout (lora_A / lora_B), the NLoRA reference layout (+ lora_N), and the
    compact tied form (lora_N only, ``nlora_serve.format = "tied-n"``), and compressed family
    members (``"family-n"``: lora_N only, the shared factors found by ``families`` or next to the
    folder; see family.py). Tensors (F32/F16/BF16) are
    cast once to ``base.dtype``; a tied adapter's A and B become views of the base weight.
    The weights file (at most ``max_bytes``, --max-adapter-bytes; None: any size, for the offline
    tools) is read whole into memory and
    parsed from there, never memory-mapped: a file truncated meanwhile is an AdapterError naming
    it, not a SIGBUS (file_read.read_file).

    Raises:
        AdapterError: anything that cannot be served exactly; the message names the key or field
            and the numbers (rank vs ``max_rank``, shape vs the model's shape, count of NaNs), or
            the file that cannot be read or parsed.
    """
    adapter_dir = Path(adapter_dir)
    cfg = read_config(adapter_dir)
    path = weights_path(adapter_dir)
    data = read_file(path, max_bytes)
    header = read_header_bytes(data, str(path))
    return _read(cfg, header, lambda: read_bytes(data, str(path))[1], base, max_rank, str(adapter_dir),
                 families, adapter_dir)


def _read(cfg: AdapterConfig, header: dict, tensors_of, base: BaseModel, max_rank: int, source: str,
          families: FamilyResolver | None = None, near: Path | None = None) -> Adapter:
    """The checks shared by both readers; ``tensors_of()`` reads the data once the header passed."""
    grouped = group_keys(list(header), base.spec)
    plans = plan_sites(cfg, base.spec)
    if not plans:
        raise AdapterError(f"{CONFIG_NAME}: target_modules {cfg.target_modules!r} selects no module of "
                           "this model: the adapter would adapt nothing")
    _check_scalings(plans, cfg)
    _check_ranks(plans, max_rank)
    _check_coverage(grouped, plans, cfg)
    _check_parts(grouped, cfg)
    _check_shapes(grouped, header, plans, base.spec)
    tensors = tensors_of()
    check_finite(tensors)
    stored = max((STORED_DTYPES[d] for d, _ in header.values()), key=lambda d: torch.finfo(d).eps)
    if cfg.family is not None:
        families = families if families is not None else FamilyResolver(base.spec)
        factors = _family_factors(cfg, grouped, tensors, plans, base, families, near, source)
        sites = _build_sites(grouped, tensors, plans, base, factors)
        # not cached here: a refused member's factors (up to 78 MB at rank 64) stayed cached; the
        # manager holds them while an admitted version uses them (FamilyResolver.hold / let_go)
        return assemble_adapter(cfg, sites, base, stored, shared=factors, source=source)
    sites = _build_sites(grouped, tensors, plans, base)
    family = _check_family(cfg, plans, base) if cfg.tied else None
    return assemble_adapter(cfg, sites, base, stored, family=family, source=source)


def _check_scalings(plans: dict, cfg: AdapterConfig) -> None:
    """Refuse a config whose scaling is 0 at every site it adapts (``lora_alpha`` 0, no
    ``alpha_pattern`` value other than 0 on a targeted module): its delta is 0 whatever its
    weights, so the name would answer as the base model (DESIGN: an adapter that would adapt
    nothing is never served as the base model), and a weights swap keeps the config, so no swap
    could make it adapt. Untrained weights (B = 0, PEFT's default init) are accepted: a swap of
    the trained weights makes those adapt. One module's alpha 0 among others is accepted.

    Raises:
        AdapterError: naming lora_alpha (and alpha_pattern where given) and the fix.
    """
    if any(plan.scaling != 0 for plan in plans.values()):
        return
    patterns = " and every alpha_pattern value matching a targeted module" if cfg.alpha_pattern else ""
    raise AdapterError(f"{CONFIG_NAME}: lora_alpha = {cfg.lora_alpha!r}{patterns} make the LoRA scaling "
                       f"(alpha / r) 0 at all {len(plans)} adapted modules: the adapter would adapt nothing "
                       "and answer as the base model, whatever its weights; set lora_alpha to the alpha it was "
                       "trained with (PEFT's default is 8)")


def assemble_adapter(cfg: AdapterConfig, sites: dict[tuple[int, str], SiteWeights], base: BaseModel,
                     stored_dtype: torch.dtype, *, family: str | None = None, shared: FamilyFactors | None = None,
                     source: str = "") -> Adapter:
    """Finish validated float32 ``sites`` into an :class:`Adapter`: detect tying (unless
    ``family`` is given), hash, cast once to ``base.dtype``, and make tied A/B base views.

    Used by the reader, the Nyström init and convert, so all three produce the same object.
    ``shared``: the sites belong to this compressed family; A and B become its factors, cast once
    per family, so members hold only N.
    """
    sites = sort_sites(sites)
    if shared is not None:
        limits = site_limits(sites)  # before the cast: a value the cast would make inf is named
        digest = content_hash(sites, shared.key)
        cast = shared.in_dtype(base.dtype)
        for key, s in sites.items():
            s.N, s.bias = s.N.to(base.dtype), None if s.bias is None else s.bias.to(base.dtype)
            s.A, s.B = cast[key]
        return Adapter(config=cfg, sites=sites, flavour="family", dtype=base.dtype, stored_dtype=stored_dtype,
                       content_hash=digest, shared_family=shared.key, family_factors=shared,
                       base_fingerprint=base.fingerprint, source=source, n_limits=limits)
    if family is None and is_tied(sites, base, stored_dtype):
        family = family_key(base.fingerprint, {s: w.rank for s, w in sites.items()})
    limits = site_limits(sites, tied_norms(base, family, sites) if family is not None else None)
    digest = content_hash(sites, family)
    _cast(sites, base.dtype)
    if family is not None:
        tie_to_base(sites, base)
    return Adapter(config=cfg, sites=sites, flavour=flavour_of(sites, family is not None), dtype=base.dtype,
                   stored_dtype=stored_dtype, content_hash=digest, family_key=family,
                   base_fingerprint=base.fingerprint, source=source, n_limits=limits)

__all__ = ["DEFAULT_MAX_RANK", "assemble_adapter", "read_adapter", "read_adapter_bytes"]
