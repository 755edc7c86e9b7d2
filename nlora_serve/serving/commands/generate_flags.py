"""The flags of ``nlora-serve generate``; commands/generate.py runs it. Nothing here imports torch:
``generate --help`` and a mistyped flag answer without loading the engine (tests/test_cli.py)."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

from nlora_serve.adapters import config as adapter_config
from nlora_serve.adapters.limits import DEFAULT_MAX_RANK
from nlora_serve.adapters.store import AdapterStore
from nlora_serve.adapters.store.lock import StoreInUse
from nlora_serve.arg_types import DTYPE_CHOICES, human_readable_int
from nlora_serve.engine.config import CacheConfig, SchedulerConfig
from nlora_serve.errors import AdapterError, NloraError
from nlora_serve.models.hub import local_or_hub
from nlora_serve.serving.commands.engine_flags import (add_device_arguments, add_generation_config_arguments,
                                                       engine_sizes, flag_groups, in_flag_words)


@dataclass(frozen=True, slots=True)
class GenerateFlags:
    """``generate``'s flags, checked (:func:`check_generate_flags`): what commands/generate.py builds on.

    ``sizes``: the scheduler's and the KV cache's (:func:`engine_sizes`). ``store``: the
    ``--adapter-dir`` store the run reads, opened by the check and held open while the flags are
    (its lock: the engine's store shares it), or None where the run reads none (no --adapter-dir,
    or an --adapter folder, registered in a scratch store).
    """

    sizes: tuple[SchedulerConfig, CacheConfig]
    store: AdapterStore | None


def check_generate_flags(args: argparse.Namespace) -> GenerateFlags:
    """``generate``'s engine sizes and --dtype checked without torch (:func:`engine_sizes`), an
    ``--adapter`` folder (:func:`check_adapter_folder`) and the ``--adapter-dir`` store it reads
    (:func:`open_generate_store`), so that a refused run answers before the engine's imports (3-8
    s); returns what commands/generate.py needs.

    Raises:
        NloraError: a flag out of range, in the flag's words (one ``error:`` line, exit 2), or a bad
            --adapter folder. AdapterError: the store is in use by another process (a server on it).
    """
    try:
        sizes = engine_sizes(args)
    except ValueError as exc:
        raise NloraError(in_flag_words(str(exc), args)) from None
    check_adapter_folder(args.adapter, args.adapter_dir)
    return GenerateFlags(sizes, open_generate_store(args.adapter, args.adapter_dir))


def open_generate_store(adapter: str | None, adapter_dir: str | None) -> AdapterStore | None:
    """The ``adapter_dir`` store a run with ``--adapter adapter`` reads (none where ``adapter`` is a
    folder: it is registered in a scratch store), opened (torch-free) so that a store another
    process holds is refused before the model and engine load; None without one.

    Raises:
        StoreInUse (an AdapterError): another process holds it (a server on it): the message says
            how to generate with one of its adapters anyway (:func:`held_store_hint`).
        AdapterError: it cannot be created or written.
    """
    if adapter_dir is None or (adapter is not None and Path(adapter).is_dir()):
        return None
    try:
        return AdapterStore(adapter_dir)
    except StoreInUse as exc:
        raise StoreInUse(f"{exc}{held_store_hint(Path(adapter_dir), adapter)}") from None


def held_store_hint(store: Path, name: str | None) -> str:
    """For a store a server holds: how ``generate`` reads one of its adapters anyway, without the
    store (its newest stored version folder, which is an adapter folder of its own)."""
    if name is None:
        return ""
    versions = sorted((p.name for p in (store / name).glob("[0-9]*") if p.name.isdigit()), key=int) \
        if (store / name).is_dir() else []
    folder = store / name / (versions[-1] if versions else "VERSION")
    return (f"; to generate with {name!r} while the server runs, give its stored folder without --adapter-dir: "
            f"--adapter {folder}")


def check_adapter_folder(adapter: str | None, adapter_dir: str | None) -> None:
    """Without ``--adapter-dir``, ``--adapter`` must be an adapter folder (or a cached Hugging Face
    ORG/ADAPTER) with a valid adapter_config.json (torch-free: adapters/config.py). With a store, a
    name that is no folder is looked up there once the engine runs.

    Raises:
        NloraError / AdapterError: ``--adapter X: <why>`` (not a folder: how to name a stored one).
    """
    if adapter is None or adapter_dir is not None:
        return
    folder = local_or_hub(adapter, AdapterError, "adapter")
    if not folder.is_dir():  # h130: a mistyped path got the by-name hint, as if it were a name
        if folder.exists():
            why = "is a file, not an adapter directory (a folder with adapter_config.json)"
        elif "/" in adapter or os.sep in adapter:  # a name has no '/'; an ORG/ADAPTER not cached was named above
            why = "no such adapter directory"
        else:
            why = "not a directory; to use a stored adapter by name, give its store with --adapter-dir"
        raise NloraError(f"--adapter {adapter}: {why}")
    try:
        adapter_config.read_config(folder)
    except AdapterError as exc:
        raise AdapterError(f"--adapter {adapter}: {exc}") from None
    except OSError as exc:  # EACCES on its config
        raise AdapterError(f"--adapter {adapter}: cannot read it ({exc.strerror or exc})") from None


# generate --help's groups, by concern as serve's (serve_flags.SERVE_GROUPS)
GENERATE_GROUPS = {
    "model": ("model and loading", "the base model, its weights, dtype and tokenizer"),
    "adapter": ("adapter", "the adapter to generate with (default: the base model)"),
    "prompt": ("prompt", "the text to continue, or the chat to answer (one of --prompt, --message, --chat-json)"),
    "sampling": ("sampling", "how the tokens are chosen, and when generation stops"),
    "device": ("device", "where the engine runs, and how"),
    "cache": ("KV cache", "the attention keys' and values' memory"),
    "scheduler": ("scheduler", "the engine's step sizes"),
    "output": ("output", "how the text is printed"),
}


def add_generate_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``nlora-serve generate``, in ``--help``'s groups (:data:`GENERATE_GROUPS`)."""
    groups = flag_groups(parser, GENERATE_GROUPS)
    model, adapter, prompt, sampling, output = (groups[k] for k in ("model", "adapter", "prompt", "sampling", "output"))
    model.add_argument("--model", default="default",
                       help="base model: 'default' (SmolLM2-135M-Instruct), a Hugging Face directory, a .gguf "
                            "file or a Hugging Face ORG/NAME in the HF cache (default: %(default)s)")
    # SUPPRESS: when omitted here, the top-level --cache-dir (or its default) stands
    model.add_argument("--cache-dir", default=argparse.SUPPRESS,
                       help="prepared-model cache root (default: $NLORA_SERVE_CACHE, else "
                            "$XDG_CACHE_HOME/nlora-serve)")
    adapter.add_argument("--adapter", default=None,
                         help="adapter to generate with: a name in --adapter-dir, an adapter directory, or a "
                              "Hugging Face ORG/ADAPTER in the HF cache (default: the base model)")
    adapter.add_argument("--adapter-dir", default=None, help="adapter store to look NAME up in")
    adapter.add_argument("--max-rank", type=int, default=DEFAULT_MAX_RANK,
                         help="refuse adapters above this rank (default: %(default)s)")
    source = prompt.add_mutually_exclusive_group(required=True)
    source.add_argument("--prompt", help="raw text prompt, sent as is (no chat template)")
    source.add_argument("--message", help="one user message, wrapped in the model's chat template")
    source.add_argument("--chat-json", metavar="FILE",
                        help='JSON list of {"role", "content"} messages, wrapped in the chat template')
    prompt.add_argument("--add-special-tokens", action=argparse.BooleanOptionalAction, default=True,
                        help="--prompt takes the tokenizer's special tokens, e.g. a BOS, as a vLLM completion "
                             "does (its add_special_tokens; default: on). Chats get the template's own")
    prompt.add_argument("--system", help="system message placed before --message")
    # default None: a flag not given takes --generation-config's value, else the default its help names
    sampling.add_argument("--max-tokens", type=int, default=None,
                          help="new tokens at most (default: the generation config's max_new_tokens, else 128)")
    sampling.add_argument("--temperature", type=float, default=None,
                          help="0 = greedy (default: the generation config's, else 0)")
    sampling.add_argument("--top-k", type=int, default=None,
                          help="sample from the k most likely tokens (0 or -1 = all) (default: the generation "
                               "config's, else 0)")
    sampling.add_argument("--top-p", type=float, default=None,
                          help="nucleus sampling mass (1 = off) (default: the generation config's, else 1)")
    sampling.add_argument("--seed", type=int, default=None, help="seed for reproducible sampling")
    sampling.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    add_generation_config_arguments(sampling, "the sampling flags not given and the sampling fields with no flag",
                                    "--max-tokens")
    model.add_argument("--dtype", choices=DTYPE_CHOICES, default="auto",
                       help="compute dtype, in vLLM's spellings: auto = bfloat16 where the CPU or GPU has fast "
                            "bf16, else float32; float = float32; half and float16 are refused (no float16 "
                            "kernels here) (default: %(default)s)")
    model.add_argument("--max-model-len", type=human_readable_int, default=2048, help="prompt + output tokens at most")
    add_device_arguments(parser, groups)
    output.add_argument("--stream", action=argparse.BooleanOptionalAction, default=True,
                        help="print text as it is generated (default: on)")
