"""``adapters inspect``: what an adapter is and what it costs to hold, or why it is refused."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

from nlora_serve.adapters.adapter import Adapter
from nlora_serve.adapters.loader import DEFAULT_MAX_RANK, read_adapter
from nlora_serve.models.base import BaseModel


@dataclass(frozen=True, slots=True)
class InspectReport:
    """The facts ``adapters inspect`` prints. Bytes are in the compute dtype of the base model."""

    path: str
    flavour: str  # lora | nlora | inttune-tied | family (adapter.FLAVOURS)
    ranks: list[int]
    targets: list[str]  # projection names
    layers: list[int]
    num_sites: int  # adapted (layer, module) pairs
    scalings: list[float]  # distinct s, ascending
    has_bias: bool
    tied: bool
    family_key: str | None
    held_bytes: int  # what the server holds for this tenant (tied: N only)
    full_bytes: int  # A, N, B (+ bias): what an untied copy holds
    stored_dtype: str  # dtype on disk
    compute_dtype: str
    content_hash: str
    base_fingerprint: str
    # adapter_config.json's base_model_name_or_path as written (None: absent); never checked, as in vLLM:
    # the weights' shapes against the served model are
    config_base_model: str | None = None


def report_for(adapter: Adapter, path: str = "") -> InspectReport:
    """The :class:`InspectReport` of an already loaded adapter."""
    return InspectReport(
        path=path or adapter.source, flavour=adapter.flavour, ranks=adapter.ranks, targets=adapter.targets,
        layers=adapter.layers, num_sites=len(adapter.sites),
        scalings=sorted({float(s.scaling) for s in adapter.sites.values()}),
        has_bias=any(s.bias is not None for s in adapter.sites.values()), tied=adapter.is_tied,
        family_key=adapter.family_key, held_bytes=adapter.held_bytes(), full_bytes=adapter.full_bytes(),
        stored_dtype=str(adapter.stored_dtype).removeprefix("torch."),
        compute_dtype=str(adapter.dtype).removeprefix("torch."), content_hash=adapter.content_hash,
        base_fingerprint=adapter.base_fingerprint, config_base_model=_config_base_model(adapter))


def _config_base_model(adapter: Adapter) -> str | None:
    named = adapter.config.raw.get("base_model_name_or_path")
    return named if isinstance(named, str) and named else None


def inspect_adapter(path: str | Path, base: BaseModel, *, max_rank: int = DEFAULT_MAX_RANK) -> InspectReport:
    """Read and validate ``path`` for ``base`` and describe it.

    Raises:
        AdapterError: the adapter is refused (see :func:`~nlora_serve.adapters.loader.read_adapter`).
    """
    return report_for(read_adapter(path, base, max_rank=max_rank, max_bytes=None), str(path))


def _ranges(values: list[int]) -> str:
    """``[0, 1, 2, 5]`` -> ``0-2,5``."""
    parts, start = [], None
    for i, v in enumerate(values):
        start = v if start is None else start
        if i + 1 == len(values) or values[i + 1] != v + 1:
            parts.append(str(v) if start == v else f"{start}-{v}")
            start = None
    return ",".join(parts)


def format_report(report: InspectReport, *, as_json: bool = False) -> str:
    """Human-readable lines, or one JSON object with ``as_json``."""
    if as_json:
        return json.dumps(asdict(report), indent=2)
    ratio = report.full_bytes / report.held_bytes if report.held_bytes else float("inf")
    rows = [
        ("path", report.path),
        ("flavour", report.flavour),
        ("rank", ", ".join(map(str, report.ranks))),
        ("targets", ", ".join(report.targets)),
        ("layers", f"{_ranges(report.layers)} ({len(report.layers)} layers, {report.num_sites} modules)"),
        ("scaling", ", ".join(f"{s:g}" for s in report.scalings)),
        ("lora_B bias", "yes" if report.has_bias else "no"),
        ("tied", f"yes, family {report.family_key[:16]}" if report.tied else "no"),
        ("bytes held", f"{report.held_bytes:,} ({report.compute_dtype}); full A,N,B: {report.full_bytes:,}"
                       + (f", {ratio:.0f}x smaller" if report.tied else "")),
        ("stored dtype", report.stored_dtype),
        ("content hash", report.content_hash),
    ]
    if report.config_base_model is not None:  # a PEFT adapter of another model loads where its shapes fit
        rows.insert(1, ("trained on", f"{report.config_base_model} (adapter_config.json's base_model_name_or_path; "
                                      "not checked: the shapes are)"))
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k:<{width}}  {v}" for k, v in rows)
