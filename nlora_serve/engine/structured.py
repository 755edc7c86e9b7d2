"""Structured outputs (vLLM's guided decoding): a grammar masks a request's logits at every step.

xgrammar (vLLM 0.32's default backend) compiles a JSON schema, a regex, a choice list or an EBNF
grammar against the model's vocabulary, once per distinct spec (its compiler's cache, bounded in
bytes); each request runs its own ``GrammarMatcher``, which fills the row's token bitmask before the
row is sampled and accepts the sampled token after. The rules are vLLM's
(v1/structured_output/backend_xgrammar.py): ``json_object`` is the schema ``{"type": "object"}``, a
choice is the grammar ``root ::= "a" | "b"``, JSON may hold any whitespace; the mask applies before
the sampler, so returned logprobs are those of the masked distribution (vLLM's too); the request
ends with finish_reason "stop" once its matcher terminates, i.e. has accepted a stop token (EOS)
where the grammar allows the output to end.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass

import torch

from nlora_serve.engine.sampling import RequestError

# a spec's characters at most (a schema's JSON text, a regex, a grammar, all choices together):
# compiling runs on the caller's thread, but a huge spec would still hold a tokenizer turn
MAX_SPEC_CHARS = 64 * 1024
MAX_CHOICES = 1024
# the compiler's cache of compiled grammars, in bytes (a typical schema's is ~50 KiB on a 49k vocabulary)
CACHE_BYTES = 64 << 20
_KINDS = ("json", "json_object", "regex", "choice", "grammar")


@dataclass(frozen=True, slots=True)
class StructuredOutputs:
    """One constraint of a request's output: exactly one of the fields (vLLM's StructuredOutputsParams).

    Raises (in ``__post_init__``):
        RequestError: none or several set, a spec over MAX_SPEC_CHARS, an empty choice list;
            ``param`` is :attr:`param`.
    """

    json: str | None = None  # a JSON schema, as JSON text
    json_object: bool = False  # any JSON object
    regex: str | None = None  # the whole output matches it
    choice: tuple[str, ...] | None = None  # the output is one of these strings
    grammar: str | None = None  # an EBNF grammar (xgrammar's / GBNF), its rule ``root`` the output
    # vLLM's: JSON without whitespace outside its strings (separators "," and ":"); by default JSON
    # may hold any, and a model that likes newlines can fill max_tokens with them
    disable_any_whitespace: bool = False
    param: str = "structured_outputs"  # the request field to blame in errors (HTTP's OpenAI error param)

    def __post_init__(self) -> None:
        if self.choice is not None:
            object.__setattr__(self, "choice", tuple(self.choice))
        given = [k for k in _KINDS if getattr(self, k) not in (None, False)]
        if len(given) != 1:
            raise RequestError(f"{self.param} needs exactly one of {', '.join(_KINDS)}; got "
                               f"{', '.join(given) or 'none'}", self.param)
        if self.choice is not None:
            if not 0 < len(self.choice) <= MAX_CHOICES or not all(isinstance(c, str) and c for c in self.choice):
                raise RequestError(f"{self.param}.choice must be 1 to {MAX_CHOICES} non-empty strings", self.param)
        if len(self.text) > MAX_SPEC_CHARS:
            raise RequestError(f"{self.param}.{self.kind} is {len(self.text)} characters; at most "
                               f"{MAX_SPEC_CHARS}", self.param)

    @property
    def kind(self) -> str:
        return next(k for k in _KINDS if getattr(self, k) not in (None, False))

    @property
    def text(self) -> str:
        """The spec as the compiler reads it (a choice list as its EBNF grammar)."""
        kind = self.kind
        if kind == "json_object":
            return '{"type": "object"}'
        if kind == "choice":
            return "root ::= " + " | ".join(json.dumps(c, ensure_ascii=False) for c in self.choice)
        return getattr(self, kind)


class GrammarCompiler:
    """Compiles specs against one vocabulary; thread-safe (callers compile on their own threads).

    ``tokenizer``: the model's Hugging Face tokenizer; ``vocab_size``: the logits' width, which may
    exceed the tokenizer's (ids past it are never allowed); ``stop_ids``: the tokens that end a
    grammar's output (the engine's EOS ids). The vocabulary is read on the first compile (~0.5 s on
    a 49k vocabulary), not at start: engines that never see a grammar never pay it.
    """

    def __init__(self, tokenizer, vocab_size: int, stop_ids: set[int]) -> None:
        self._tokenizer, self.vocab_size, self._stop_ids = tokenizer, vocab_size, sorted(stop_ids)
        self._compiler = None
        self._lock = threading.Lock()

    def _get(self):
        with self._lock:
            if self._compiler is None:
                import xgrammar as xgr

                info = xgr.TokenizerInfo.from_huggingface(self._tokenizer, vocab_size=self.vocab_size,
                                                          stop_token_ids=self._stop_ids)
                self._compiler = xgr.GrammarCompiler(info, max_threads=2, cache_enabled=True,
                                                     cache_limit_bytes=CACHE_BYTES)
            return self._compiler

    def compile(self, spec: StructuredOutputs):
        """The compiled grammar of ``spec`` (cached: a repeated spec costs a lookup).

        Raises:
            RequestError: the spec does not compile (a bad schema, regex or grammar); the message
                names the field and says why, ``param`` is ``spec.param``.
        """
        compiler, kind = self._get(), spec.kind
        try:
            if kind in ("json", "json_object"):
                compact = spec.disable_any_whitespace
                return compiler.compile_json_schema(spec.text, any_whitespace=not compact,
                                                    separators=(",", ":") if compact else None)
            if kind == "regex":
                return compiler.compile_regex(spec.text)
            return compiler.compile_grammar(spec.text)
        except (RuntimeError, ValueError) as exc:  # xgrammar's parse errors: "[time] file:line: why"
            why = str(exc).strip().rsplit(": ", 1)[-1] if ": " in str(exc) else str(exc)
            raise RequestError(f"{spec.param}: the {kind} does not compile: {why.strip()[:300]}", spec.param) from None

    def matcher(self, spec: StructuredOutputs):
        """A fresh ``xgrammar.GrammarMatcher`` of ``spec`` (raises as :meth:`compile`)."""
        import xgrammar as xgr

        return xgr.GrammarMatcher(self.compile(spec))


def mask_rows(logits: torch.Tensor, rows: list[int], matchers: list) -> None:
    """Set ``logits[rows[j], t] = -inf`` for every token ``t`` that ``matchers[j]`` does not allow next.

    ``logits`` [B, V] float32 on the engine's device; the bitmask [B, ceil(V / 32)] int32 is filled
    on the host (by xgrammar, per row) and applied by xgrammar's kernel for that device, after one
    host-to-device copy on CUDA. Only called in steps that hold a grammar row.
    """
    import xgrammar as xgr

    bitmask = xgr.allocate_token_bitmask(logits.shape[0], logits.shape[1])
    for row, matcher in zip(rows, matchers):
        matcher.fill_next_token_bitmask(bitmask, row)
    if logits.device.type != "cpu":
        bitmask = bitmask.pin_memory().to(logits.device, non_blocking=True)
    xgr.apply_token_bitmask_inplace(logits, bitmask, indices=rows)
