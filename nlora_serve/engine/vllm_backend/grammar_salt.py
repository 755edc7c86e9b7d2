"""A tenant's structured-output spec as vLLM gets it: a key of its own in vLLM's grammar cache.

vLLM compiles a request's spec with xgrammar, whose compiler cached compiled grammars for all requests,
by the spec's text and by the grammar that text parses to: a spec another tenant had sent started
sooner (a JSON schema of 250 properties: 0.2 ms for the same text, 18 ms for the same grammar, against
32 ms for a new one), so a tenant could test guesses of another's specs by its time to first token.
engine_args.py sets that cache's limit to 0 MB, where xgrammar still keeps the last grammar compiled
(the same text again: 0.13 ms against 76 ms); and here the text vLLM gets starts with a prefix from
the tenant's name that changes the key and nothing the grammar accepts, so that one entry answers only
its own tenant (another tenant right after: a full compile, measured in the commit):

* a JSON schema (and ``json_object``, sent as the schema ``{"type": "object"}`` that vLLM compiles
  for it, with the same options): 32 JSON whitespace characters before the schema, 2 bits each;
  the schema parses to the same document;
* a regex: 32 empty groups, ``(?:)`` or ``()``, 1 bit each: they match the empty string only;
* an EBNF grammar (and a choice, sent as the grammar the native engine compiles for it): a first line
  ``# nlora <16 hex digits>``, a comment (vLLM's Lark detection skips comment lines too).

Each prefix has a fixed length (in groups for a regex, whose two groups are a prefix-free code), so no
spec one tenant sends is keyed as another's. xgrammar compiles the prefixed text to the same grammar
(tests/vllm_backend/test_vllm_grammar_salt.py).
"""

from __future__ import annotations

import hashlib

from nlora_serve.engine.structured_output.structured import StructuredOutputs

SALT_BITS = 64  # bits of sha256(tenant) in a JSON schema's prefix (32 whitespace characters)
REGEX_SALT_BITS = 32  # bits in a regex's prefix (32 empty groups)
JSON_WHITESPACE = " \t\n\r"  # the four whitespace characters JSON allows between tokens
JSON_OBJECT_SCHEMA = '{"type": "object"}'  # what vLLM compiles for json_object (backend_xgrammar.py)


def _bits(tenant: str) -> int:
    return int.from_bytes(hashlib.sha256(tenant.encode("utf-8")).digest()[:8], "big")


def json_prefix(tenant: str) -> str:
    """32 JSON whitespace characters from ``tenant`` (:data:`SALT_BITS` bits of its sha256)."""
    h = _bits(tenant)
    return "".join(JSON_WHITESPACE[(h >> (2 * i)) & 3] for i in range(SALT_BITS // 2))


def regex_prefix(tenant: str) -> str:
    """32 empty groups from ``tenant``: ``()`` for a 1 bit, ``(?:)`` for a 0 bit."""
    h = _bits(tenant)
    return "".join("()" if (h >> i) & 1 else "(?:)" for i in range(REGEX_SALT_BITS))


def salted_fields(spec: StructuredOutputs, tenant: str | None) -> dict:
    """vLLM StructuredOutputsParams fields for ``spec`` sent by ``tenant`` (None: no tenant, no prefix).

    Returns: json / regex / grammar / choice / json_object (one set) and disable_any_whitespace.
    """
    fields = dict(json=spec.json, regex=spec.regex, grammar=spec.grammar,
                  choice=list(spec.choice) if spec.choice is not None else None,
                  json_object=True if spec.json_object else None, disable_any_whitespace=spec.disable_any_whitespace)
    if tenant is None:
        return fields
    if spec.json_object:
        fields.update(json_object=None, json=json_prefix(tenant) + JSON_OBJECT_SCHEMA)
    elif spec.json is not None:
        fields["json"] = json_prefix(tenant) + spec.json
    elif spec.regex is not None:
        fields["regex"] = regex_prefix(tenant) + spec.regex
    else:  # grammar or choice: spec.text is the EBNF grammar (a choice list's, as the native engine's)
        fields.update(choice=None, grammar=f"# nlora {_bits(tenant):016x}\n" + spec.text)
    return fields
