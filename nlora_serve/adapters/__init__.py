"""Adapters: read / validate / write PEFT-style LoRA, SLoRA, NLoRA and IntTune directories,
Nyström init, tied detection and the compact tied form, convert; the on-disk store; and what a
running server holds of them (runtime/).

The engine-facing API: :func:`read_adapter` (validated, typed :class:`Adapter`), its
:class:`SiteWeights` per (layer, module), :func:`write_adapter`, :func:`init_adapter`,
:func:`to_lora` / :func:`to_nlora`, :func:`inspect_adapter`, :func:`lora_scaling`.

Modules, by concern::

    reading and writing an adapter folder
      keys.py          tensor key names <-> (layer, module, part)
      config.py        adapter_config.json: parse, validate, which modules are adapted, scaling
      file_read.py     an adapter folder's files (CONFIG_FILE, WEIGHTS_FILE) read whole (never mapped,
                       no FIFO or device opened), the folder checked before any read (check_folder)
      format.py        safetensors bytes in (reading only; never a pickle)
      bounds.py        the values an adapter may hold so that serving it stays finite
      limits.py        AdapterLimits, the default rank and byte bounds (torch-free, for the flags' --help)
      loader.py        read_adapter: one folder validated against a base model
      adapter.py       Adapter and SiteWeights, what every reader returns
      names.py         the adapter-name rule
      writing.py       atomic file writes (temp, fsync, rename) and Undo
      save.py          write_adapter: the full form or the compact tied (N-only) form
    kinds and tools (the ``adapters`` subcommands; cli.py wires inspect, init, convert)
      tied.py          Nyström-tied detection (A, B = slices of W) and the tied family key
      nystrom.py       init; convert.py; inspect.py
      family.py        compressed families on disk (shared factors, N-only members)
      compress/        ``adapters compress``: many LoRAs into one family (maths, build, report, cli)
      tune/            ``adapters tune``: IntTune training of N (train, data, unlikelihood, cli)
      history_cli.py   ``adapters versions`` / ``adapters rollback`` on a store folder (store/history.py)
    serving them
      store/           one folder per name, one per version, written atomically and durably:
                       AdapterStore (reads.py, writes.py), layout, durable file operations, SHA256SUMS,
                       the root's lock, a family's shared factors, the versions kept (--keep-versions)
                       and their offline rollback (its __init__ maps them)
      runtime/         what a running server holds (vLLM's runtime LoRA loading): the registry of
                       names, versions, pins and hot-swaps, the pools and which version sits in which
                       slot, and AdapterManager, the engine's one handle on them (its __init__ maps
                       them); engine/ and serving/ import it, nothing else here does
"""

from importlib import import_module

# name -> the module that defines it, imported on first use (PEP 562): the server commands of
# `nlora-serve adapters` (list, upload, swap, unload, load) import this package but need none of
# it, and its modules import torch (3-5 s on a small CPU, 10x those commands' own start)
_EXPORTS = {
    "Adapter": "adapter", "SiteWeights": "adapter",
    "AdapterConfig": "config", "lora_scaling": "config", "parse_config": "config", "plan_sites": "config",
    "convert_dir": "convert", "to_lora": "convert", "to_nlora": "convert",
    "InspectReport": "inspect", "format_report": "inspect", "inspect_adapter": "inspect", "report_for": "inspect",
    "DEFAULT_MAX_RANK": "loader", "read_adapter": "loader",
    "validate_name": "names",
    "init_adapter": "nystrom",
    "write_adapter": "save",
    "family_key": "tied",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(f"{__name__}.{_EXPORTS[name]}"), name)
    globals()[name] = value  # later lookups skip this function
    return value
