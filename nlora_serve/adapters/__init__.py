"""Adapters: read / validate / write PEFT-style LoRA, SLoRA, NLoRA and IntTune directories,
Nyström init, tied detection and the compact tied form, convert; the store and registry.

The engine-facing API: :func:`read_adapter` (validated, typed :class:`Adapter`), its
:class:`SiteWeights` per (layer, module), :func:`write_adapter`, :func:`init_adapter`,
:func:`to_lora` / :func:`to_nlora`, :func:`inspect_adapter`, :func:`lora_scaling`.
"""

from nlora_serve.adapters.adapter import Adapter, SiteWeights
from nlora_serve.adapters.config import AdapterConfig, lora_scaling, parse_config, plan_sites
from nlora_serve.adapters.convert import convert_dir, to_lora, to_nlora
from nlora_serve.adapters.inspect import InspectReport, format_report, inspect_adapter, report_for
from nlora_serve.adapters.loader import DEFAULT_MAX_RANK, read_adapter
from nlora_serve.adapters.names import validate_name
from nlora_serve.adapters.nystrom import init_adapter
from nlora_serve.adapters.save import write_adapter
from nlora_serve.adapters.tied import family_key

__all__ = [
    "DEFAULT_MAX_RANK", "Adapter", "AdapterConfig", "InspectReport", "SiteWeights", "convert_dir",
    "family_key", "format_report", "init_adapter", "inspect_adapter", "lora_scaling", "parse_config",
    "plan_sites", "read_adapter", "report_for", "to_lora", "to_nlora", "validate_name", "write_adapter",
]
