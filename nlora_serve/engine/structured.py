"""Structured outputs (vLLM's guided decoding): a grammar masks a request's logits at every step.

xgrammar (vLLM 0.32's default backend) compiles a JSON schema, a regex, a choice list or an EBNF
grammar against the model's vocabulary, once per distinct spec (kept, bounded in count, and
timed: :class:`GrammarCompiler`); each request runs its own ``GrammarMatcher``, which fills the
row's token bitmask before the row is sampled and accepts the sampled token after. The rules are vLLM's
(v1/structured_output/backend_xgrammar.py): ``json_object`` is the schema ``{"type": "object"}``, a
choice is the grammar ``root ::= "a" | "b"``, JSON may hold any whitespace; the mask applies before
the sampler, so returned logprobs are those of the masked distribution (vLLM's too); the request
ends with finish_reason "stop" once its matcher terminates, i.e. has accepted a stop token (EOS)
where the grammar allows the output to end.
"""

from __future__ import annotations

import json
import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch

from nlora_serve.engine.sampling import RequestError

# a spec's characters at most (a schema's JSON text, a regex, a grammar, all choices together):
# compiling runs on the caller's thread, but a huge spec would still hold a tokenizer turn
MAX_SPEC_CHARS = 64 * 1024
MAX_CHOICES = 1024
# compiled grammars kept (a typical schema's is ~55 KB on a 49k vocabulary: ~14 MB at most)
MAX_CACHED = 256
COMPILE_TIMEOUT_S = 5.0  # a caller's wait for one compile (vLLM's regex compile timeout)
MAX_COMPILING = 2  # compiles running at once (those past their timeout included)
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

    A compile runs on a thread of its own, at most :data:`MAX_COMPILING` at once, and its caller
    waits ``timeout_s`` at most (vLLM's VLLM_REGEX_COMPILATION_TIMEOUT_S, 5 s, for every kind
    here): some short specs explode (``.{0,2000}`` takes ~4 s, and the time grows with the count),
    and the caller is the server's shared tokenizer thread. A compile that runs past it cannot be
    stopped (xgrammar's C++); it finishes in the background and lands in the cache. Compiled
    grammars are kept by spec, the :data:`MAX_CACHED` most recently used.
    """

    def __init__(self, tokenizer, vocab_size: int, stop_ids: set[int], timeout_s: float = COMPILE_TIMEOUT_S) -> None:
        self._tokenizer, self.vocab_size, self._stop_ids = tokenizer, vocab_size, sorted(stop_ids)
        self.timeout_s = timeout_s
        self._compiler = None
        self._lock = threading.Lock()
        self._cached: OrderedDict = OrderedDict()  # spec key -> xgrammar CompiledGrammar, least recent first
        self._compiling = threading.BoundedSemaphore(MAX_COMPILING)

    def _get(self):
        with self._lock:
            if self._compiler is None:
                import xgrammar as xgr

                info = xgr.TokenizerInfo.from_huggingface(self._tokenizer, vocab_size=self.vocab_size,
                                                          stop_token_ids=self._stop_ids)
                self._compiler = xgr.GrammarCompiler(info, max_threads=2, cache_enabled=False)
            return self._compiler

    def compile(self, spec: StructuredOutputs):
        """The compiled grammar of ``spec`` (a repeated spec costs a lookup).

        Raises:
            RequestError: the spec does not compile (a bad schema, regex or grammar), or not within
                ``timeout_s``; the message names the field and says why, ``param`` is ``spec.param``.
        """
        key = (spec.kind, spec.text, spec.disable_any_whitespace)
        with self._lock:
            if key in self._cached:
                self._cached.move_to_end(key)
                return self._cached[key]
        compiler = self._get()  # bounded work (the vocabulary), outside the timed part
        if not self._compiling.acquire(timeout=self.timeout_s):
            raise RequestError(f"{spec.param}: the server is busy compiling other specs; retry", spec.param)
        result: dict = {}
        done = threading.Event()

        def run() -> None:
            try:
                result["grammar"] = grammar = _compile(compiler, spec)
                with self._lock:
                    self._cached[key] = grammar
                    while len(self._cached) > MAX_CACHED:
                        self._cached.popitem(last=False)
            except (RuntimeError, ValueError) as exc:  # xgrammar's parse errors: "[time] file:line: why"
                result["error"] = exc
            finally:
                self._compiling.release()
                done.set()

        threading.Thread(target=run, name="nlora-grammar", daemon=True).start()
        if not done.wait(self.timeout_s):
            raise RequestError(f"{spec.param}: the {spec.kind} did not compile within {self.timeout_s:g} s (too "
                               "complex: a large repetition count or nesting)", spec.param)
        if "error" in result:
            text = str(result["error"]).strip()
            why = text.rsplit(": ", 1)[-1] if ": " in text else text
            raise RequestError(f"{spec.param}: the {spec.kind} does not compile: {why.strip()[:300]}", spec.param)
        return result["grammar"]

    def matcher(self, spec: StructuredOutputs):
        """A fresh ``xgrammar.GrammarMatcher`` of ``spec`` (raises as :meth:`compile`)."""
        import xgrammar as xgr

        return xgr.GrammarMatcher(self.compile(spec))


def _compile(compiler, spec: StructuredOutputs):
    if spec.kind in ("json", "json_object"):
        compact = spec.disable_any_whitespace
        return compiler.compile_json_schema(spec.text, any_whitespace=not compact,
                                            separators=(",", ":") if compact else None)
    if spec.kind == "regex":
        return compiler.compile_regex(spec.text)
    return compiler.compile_grammar(spec.text)


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
