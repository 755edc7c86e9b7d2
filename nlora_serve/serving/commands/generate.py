"""``nlora-serve generate``: one prompt (or chat) through the native engine, streamed to stdout.

stdout holds the generated text alone; what the command is doing while it loads (the model, its
one-time conversion, the engine's start-up: seconds to a minute on a small CPU) goes to the log on
stderr (INFO, the CLI's default ``--log-level``), so a newcomer sees it working and a script that
reads stdout gets the text only. Its flags are generate_flags.py's, which load no torch.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import re
import sys
import tempfile
import time
from pathlib import Path

from nlora_serve.adapters.limits import KEEP_ALL_VERSIONS
from nlora_serve.adapters.runtime.manager import AdapterLimits
from nlora_serve.errors import AdapterError, NloraError
from nlora_serve.models import load_base, resolve_model
from nlora_serve.models.hub import local_or_hub
from nlora_serve.engine.llm_engine import LLMEngine
from nlora_serve.engine.threads import threads_for_engine
from nlora_serve.engine.api import EngineDead
from nlora_serve.engine.sample.sampling import RequestError, SamplingParams
from nlora_serve.serving.chat_template import encode_chat
from nlora_serve.serving.commands.engine_flags import device_config, in_flag_words
from nlora_serve.serving.commands.exit_now import STUCK_STEP_JOIN_SECONDS, exit_now
from nlora_serve.serving.commands.generate_flags import GenerateFlags, check_generate_flags
from nlora_serve.serving.generation_config import sampling_defaults

log = logging.getLogger("nlora_serve.generate")

DEFAULT_MAX_TOKENS = 128  # --max-tokens when neither it nor the generation config's max_new_tokens is given


def _prompt_ids(args: argparse.Namespace, tokenizer) -> list[int]:
    if args.prompt is not None:
        return tokenizer.encode(args.prompt, add_special_tokens=args.add_special_tokens)
    if args.chat_json is not None:
        try:
            messages = json.loads(Path(args.chat_json).read_text())
        except (OSError, ValueError, RecursionError) as exc:  # RecursionError: nested past the parser
            raise NloraError(f"--chat-json {args.chat_json}: cannot read a JSON message list ({exc})") from None
        if not isinstance(messages, list) or not all(isinstance(m, dict) and "role" in m and "content" in m
                                                     for m in messages):
            raise NloraError(f"--chat-json {args.chat_json}: expected a list of {{\"role\", \"content\"}} objects")
    else:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + \
                   [{"role": "user", "content": args.message}]
    return encode_chat(messages, tokenizer, "--chat-json" if args.chat_json else "--message")


def _adapter_store(args: argparse.Namespace, scratch: str) -> tuple[str | None, str | None]:
    """(store directory, adapter name) for ``--adapter``; a directory is registered in ``scratch``."""
    if args.adapter is None:
        return args.adapter_dir, None
    if args.adapter_dir is None:  # a folder, or a Hugging Face ORG/ADAPTER in the HF cache
        args.adapter = str(local_or_hub(args.adapter, AdapterError, "adapter"))
    path = Path(args.adapter)
    if path.is_dir():
        return scratch, None
    if args.adapter_dir is None:
        raise NloraError(f"--adapter {args.adapter}: not a directory; to use a stored adapter by name, "
                         "give its store with --adapter-dir")
    return args.adapter_dir, args.adapter


DEAD_POLL_SECONDS = 1.0  # how often a running generate looks for a dead engine (a hung step)


async def _stream(engine: LLMEngine, ids: list[int], params: SamplingParams, live: bool,
                  adapter: str | None) -> str:
    """The reply's text, printed as it comes where ``live``.

    Raises:
        EngineDead: the engine died meanwhile (:attr:`LLMEngine.dead_reason`: a step hung past its
            limit, whose stream waited for ever before).
    """
    text = []

    async def read() -> None:
        async for out in engine.add_request(ids, params, adapter=adapter):
            text.append(out.text)
            if live:
                sys.stdout.write(out.text)
                sys.stdout.flush()

    reading = asyncio.ensure_future(read())
    while not (await asyncio.wait({reading}, timeout=DEAD_POLL_SECONDS))[0]:
        if engine.dead_reason is not None:
            reading.cancel()
            raise EngineDead(f"the engine is dead: {engine.dead_reason}")  # (the server's message: a retry elsewhere)
    reading.result()  # its error, if any
    return "".join(text)


def sampling_params(args: argparse.Namespace, model_dir: Path) -> SamplingParams:
    """The request's SamplingParams: each sampling flag given, else ``--generation-config``'s value
    (with ``--override-generation-config``; the model's generation_config.json by default), else the
    flag's own default (greedy, 128 tokens), as vLLM's ``LLM.generate`` takes the generation config
    (``get_default_sampling_params``) and its server a request's unset fields. The fields with no
    flag (min_p, the penalties) take the generation config's. ``--max-tokens`` is lowered to the
    cap of a folder's or the override's max_new_tokens (vLLM's ``override_max_tokens``); not given,
    :func:`run_generate` lowers the default to the rest of the context once the prompt is known (as
    vLLM's server does). The defaults are logged as ``serve`` logs them.

    Raises:
        NloraError: a bad --generation-config folder or value (the message names it); RequestError: a
            flag out of range.
    """
    try:
        defaults, line = sampling_defaults(args.generation_config, args.override_generation_config, model_dir,
                                           fallback=f"generate's own (greedy, {DEFAULT_MAX_TOKENS} tokens)")
    except ValueError as exc:
        raise NloraError(str(exc)) from None
    (log.warning if defaults.as_dict() and args.generation_config != "vllm" else log.info)(line)
    value, cap = defaults.value, defaults.max_tokens_cap
    max_tokens = value("max_tokens", args.max_tokens, DEFAULT_MAX_TOKENS)
    try:
        return SamplingParams(max_tokens=max_tokens if cap is None else min(max_tokens, cap),
                              temperature=value("temperature", args.temperature, 0.0),
                              top_k=value("top_k", args.top_k, 0), top_p=value("top_p", args.top_p, 1.0),
                              min_p=value("min_p", None, 0.0),
                              repetition_penalty=value("repetition_penalty", None, 1.0),
                              presence_penalty=value("presence_penalty", None, 0.0),
                              frequency_penalty=value("frequency_penalty", None, 0.0), seed=args.seed,
                              stop=tuple(args.stop))
    except RequestError as exc:  # in the words of the flag the user typed (a generation config's value: as is)
        field = re.match(r"SamplingParams\.(\w+)", str(exc))
        given = field is not None and getattr(args, field.group(1), None) not in (None, [])
        raise NloraError(in_flag_words(str(exc), args) if given else str(exc)) from None


def run_generate(args: argparse.Namespace, flags: GenerateFlags | None = None) -> int:
    """Run ``generate``; returns the exit status. ``flags``: :func:`check_generate_flags`' answer
    for ``args`` where the caller ran it before this module's imports (None: run here); its store
    (a server's is refused there, before torch loads) is held until the run ends.

    Raises:
        NloraError: bad model, messages or parameters (the CLI prints the message).
    """
    flags = check_generate_flags(args) if flags is None else flags
    sizes = flags.sizes
    cache_dir = getattr(args, "cache_dir", None)
    # before the model loads: the step thread alone runs torch in parallel
    with threads_for_engine(), tempfile.TemporaryDirectory(prefix="nlora-generate-") as scratch:
        store, name = _adapter_store(args, scratch)
        try:
            config = device_config(args, sizes, cache_dir=cache_dir, adapter_dir=store,
                                   # it only reads the store: a version kept for a rollback stays
                                   adapter_limits=AdapterLimits(max_rank=args.max_rank,
                                                                keep_versions=KEEP_ALL_VERSIONS),
                                   generation_config=args.generation_config)
        except ValueError as exc:  # a flag out of range: one "error: ..." line, as for other bad input
            raise NloraError(in_flag_words(str(exc), args)) from None
        start = time.perf_counter()
        log.info("loading model %s (%s, %s)...", args.model, config.device, str(config.dtype).removeprefix("torch."))
        path = (Path(args.model).expanduser().resolve() if config.load_format == "dummy"
                else resolve_model(args.model, cache_dir))
        params = sampling_params(args, path)  # a bad --generation-config before the weights load
        base = load_base(str(path), config.dtype, cache_dir, config.load_format, config.tokenizer,
                         init_device=config.device)
        log.info("model loaded from %s in %.1f s; starting the engine (the first run also compiles its "
                 "CPU kernels)...", base.path, time.perf_counter() - start)
        start = time.perf_counter()
        try:
            engine = LLMEngine(config, base)
        except ValueError as exc:  # a flag the model refuses (--max-model-len over its positions, a bad eos id)
            raise NloraError(in_flag_words(str(exc), args)) from None
        try:
            with engine:
                log.info("engine started in %.1f s; generating", time.perf_counter() - start)
                if store == scratch:
                    name = engine.adapters.register_dir(Path(args.adapter).resolve().name, args.adapter).name
                ids = _prompt_ids(args, engine.tokenizer)
                if args.max_tokens is None:  # a default, as a server's unset max_tokens: at most the context left
                    params.max_tokens = max(1, min(params.max_tokens, config.scheduler.max_model_len - len(ids)))
                text = asyncio.run(_stream(engine, ids, params, args.stream, name))
        except EngineDead as exc:
            if engine.step_thread_alive(STUCK_STEP_JOIN_SECONDS):  # the exit could wait behind it (exit_now.py)
                print(f"error: {exc}", file=sys.stderr)  # as the CLI prints an expected failure
                exit_now(2, "the engine's step thread is still in its hung step", log)
            raise
    if not args.stream:
        sys.stdout.write(text)
    sys.stdout.write("\n")
    return 0
