"""Structured outputs (vLLM's guided decoding): a grammar masks a request's logits at every step.

xgrammar (vLLM 0.32's default backend) compiles a JSON schema, a regex, a choice list or an EBNF
grammar against the model's vocabulary, once per distinct spec (kept, bounded in count, and
timed: grammar_compiler.py); each request runs its own ``GrammarMatcher``, which fills the
row's token bitmask before the row is sampled and accepts the sampled token after. The rules are vLLM's
(v1/structured_output/backend_xgrammar.py): ``json_object`` is the schema ``{"type": "object"}``, a
choice is the grammar ``root ::= "a" | "b"``, JSON may hold any whitespace; the mask applies before
the sampler, so returned logprobs are those of the masked distribution (vLLM's too); the request
ends with finish_reason "stop" once its matcher terminates, i.e. has accepted a stop token where
the grammar allows the output to end. A request's stop tokens there are vLLM's: every EOS id and its
own ``stop_token_ids`` (``SamplingParams.all_stop_token_ids``, which vLLM's structured-output manager
hands its xgrammar backend as the matcher's ``override_stop_tokens``), masked until the grammar may end.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import torch

from nlora_serve.engine.sample.sampling import RequestError

# a spec's characters at most (a schema's JSON text, a regex, a grammar, all choices together):
# a huge spec would hold a compile slot for long
MAX_SPEC_CHARS = 64 * 1024
MAX_CHOICES = 1024
# vLLM 0.32's MAX_STRUCTURED_OUTPUT_JSON_NESTING: a schema's objects and arrays nest at most this deep
# (xgrammar's compile time grows ~ depth^3: 500 nested arrays took 4.8 s, 2000 would take minutes)
MAX_JSON_NESTING = 64
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
    # (the GrammarCompiler, its CompiledGrammar) once compiled: the request's later lookups (admission,
    # the step thread's matcher) use it even after the compiler's cache dropped the spec
    compiled: tuple | None = field(default=None, init=False, repr=False, compare=False)

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
        if self.kind in ("json", "grammar") and not self.text.strip():  # vLLM's words
            raise RequestError(f"{self.param}.{self.kind} cannot be an empty string", self.param)
        if self.kind == "json":
            self._check_json()

    def _check_json(self) -> None:
        """The schema is JSON and nests at most MAX_JSON_NESTING levels (vLLM's check and words)."""
        try:
            too_deep = nests_deeper(json.loads(self.json), MAX_JSON_NESTING)
        except RecursionError:  # nested past Python's parser
            too_deep = True
        except ValueError as exc:  # xgrammar's own words for it end in "...: . The JSON string is:{"
            raise RequestError(f"{self.param}.json is not JSON: {exc}", self.param) from None
        if too_deep:
            raise RequestError(f"{self.param}.json: the JSON schema is nested too deeply: objects and arrays may "
                               f"nest at most {MAX_JSON_NESTING} levels", self.param)

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


def nests_deeper(document, limit: int) -> bool:
    """Whether the parsed JSON ``document`` nests objects and arrays more than ``limit`` levels, its
    top one included (vLLM 0.32's ``_exceeds_json_nesting``: level by level, no recursion)."""
    level = [document]
    for _ in range(limit):
        level = [child for node in level if isinstance(node, (dict, list))
                 for child in (node.values() if isinstance(node, dict) else node) if isinstance(child, (dict, list))]
        if not level:
            return False
    return True


def allows_a_token(matcher, vocab_size: int) -> bool:
    """Whether ``matcher`` (an xgrammar GrammarMatcher) allows any token next, EOS included."""
    import xgrammar as xgr

    bitmask = xgr.allocate_token_bitmask(1, vocab_size)
    matcher.fill_next_token_bitmask(bitmask, 0)
    return bool(bitmask.any())


def mask_rows(logits: torch.Tensor, rows: list[int], matchers: list) -> None:
    """Set ``logits[rows[j], t] = -inf`` for every token ``t`` that ``matchers[j]`` does not allow next.

    ``logits`` [B, V] float32 on the engine's device; the bitmask [B, ceil(V / 32)] int32 is filled
    on the host (by xgrammar, per row) and applied by xgrammar's kernel for that device, after one
    host-to-device copy on CUDA. Only called in steps that hold a grammar row, and by the dummy
    sampler run (engine/runner/dummy_sampler.py), whose matchers are None: a None leaves its row's mask
    all ones (every token allowed) and the row unchanged.
    """
    import xgrammar as xgr

    bitmask = xgr.allocate_token_bitmask(logits.shape[0], logits.shape[1])  # all -1: every token allowed
    for row, matcher in zip(rows, matchers):
        if matcher is not None:
            matcher.fill_next_token_bitmask(bitmask, row)
    if logits.device.type != "cpu":
        bitmask = bitmask.pin_memory().to(logits.device, non_blocking=True)
    xgr.apply_token_bitmask_inplace(logits, bitmask, indices=rows)
