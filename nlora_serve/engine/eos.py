"""A request's end-of-sequence tokens, as vLLM 0.32 takes them: ``SamplingParams.update_from_generation_config``
(sampling_params.py, called by ``InputProcessor.process_inputs`` with the tokenizer's ``eos_token_id``)
and ``check_stop`` (v1/core/sched/utils.py).

- The tokenizer's ``eos_token_id`` is the EOS: unless ``ignore_eos`` it ends a request, with no stop
  reason.
- The generation config's ``eos_token_id`` (an int or a list: Llama 3's ``<|eot_id|>`` and
  ``<|end_of_text|>``), less that one, are stop token ids: unless ``ignore_eos`` they end a request
  with the id as its stop reason.
- Until ``min_tokens`` every one of them and the request's ``stop_token_ids`` is banned, with
  ``ignore_eos`` or not (vLLM's ``all_stop_token_ids``, which its MinTokensLogitsProcessor bans).
- A structured output's grammar may end on the same set (vLLM's xgrammar matcher takes
  ``all_stop_token_ids`` as its ``override_stop_tokens``), masked until the grammar allows the end.

Tokens end requests by id alone: no text, a prompt's or a generated one, is compared with them.

The generation config is the model folder's under ``--generation-config auto`` and ``vllm`` (vLLM
reads its token ids even where it takes no sampling default from it), the named folder's otherwise:
its ``generation_config.json``, else its ``config.json`` (vLLM's fallback, transformers'
``GenerationConfig.from_model_config``, keeps the config's ``eos_token_id``), else none.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True, slots=True)
class EosTokens:
    """A model's end-of-sequence token ids (module docstring)."""

    eos_token_id: int | None  # the tokenizer's: ends a request with no stop reason (None: it has none)
    generation_eos_ids: frozenset[int]  # the generation config's others: stop token ids

    @property
    def all(self) -> frozenset[int]:
        """Every end-of-sequence id (a grammar's stop tokens)."""
        return self.generation_eos_ids | ({self.eos_token_id} if self.eos_token_id is not None else set())

    def stops(self, stop_token_ids: tuple[int, ...], ignore_eos: bool) -> frozenset[int]:
        """The tokens that end a request sending ``stop_token_ids`` and ``ignore_eos``."""
        return frozenset(stop_token_ids) | (frozenset() if ignore_eos else self.all)

    def banned_before_min_tokens(self, stop_token_ids: tuple[int, ...]) -> frozenset[int]:
        """The tokens a request may not sample before its ``min_tokens`` (``ignore_eos`` or not)."""
        return frozenset(stop_token_ids) | self.all

    def grammar_stops(self, stop_token_ids: tuple[int, ...]) -> frozenset[int]:
        """The tokens that end a request's structured-output grammar where it may end: the same set
        (vLLM's ``all_stop_token_ids``, its xgrammar matcher's ``override_stop_tokens``)."""
        return self.banned_before_min_tokens(stop_token_ids)

    def stop_reason(self, token: int, ignore_eos: bool) -> int | None:
        """The stop reason of a request ended by ``token``: None for the EOS, else the id."""
        return None if token == self.eos_token_id and not ignore_eos else token


def eos_tokens(model_dir: Path, generation_config: str, tokenizer_eos_id: int | None, vocab_size: int) -> EosTokens:
    """The EOS ids of a model in ``model_dir`` under ``--generation-config generation_config``
    ("auto", "vllm" or a folder), its tokenizer's ``tokenizer_eos_id`` and ``vocab_size`` tokens.

    Raises:
        ValueError: a file that is no JSON object, an ``eos_token_id`` that is not an id or a list
            of ids, or an id outside the vocabulary (its ban would index past the logits); the
            message names the file.
    """
    folder = model_dir if generation_config in ("auto", "vllm") else Path(generation_config).expanduser()
    ids: set[int] = set()
    for name in ("generation_config.json", "config.json"):
        path = folder / name
        if path.is_file():
            ids = _ids(path, vocab_size)
            break
    if tokenizer_eos_id is not None and not 0 <= tokenizer_eos_id < vocab_size:
        raise ValueError(f"the tokenizer's eos_token_id {tokenizer_eos_id} is outside the model's vocabulary "
                         f"[0, {vocab_size})")
    return EosTokens(tokenizer_eos_id, frozenset(ids - {tokenizer_eos_id}))


def _ids(path: Path, vocab_size: int) -> set[int]:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: cannot read it as JSON ({exc})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    value = data.get("eos_token_id")
    ids = [] if value is None else value if isinstance(value, list) else [value]
    for token in ids:
        if isinstance(token, bool) or not isinstance(token, int):
            raise ValueError(f"{path}: eos_token_id must be a token id or a list of them; got {value!r}")
        if not 0 <= token < vocab_size:
            raise ValueError(f"{path}: eos_token_id {token} is outside the model's vocabulary [0, {vocab_size})")
    return set(ids)
