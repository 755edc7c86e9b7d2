"""The request fields both front ends check alike: the cache salt and the max_tokens policy (with the
server's generation-config defaults: serving/generation_config.py)."""

from __future__ import annotations

import json

from nlora_serve.engine.sample.sampling import RequestError
from nlora_serve.serving.auth import Authenticator, Principal
from nlora_serve.serving.server_config import ServerConfig

# characters of a request's cache_salt: an identifier (vLLM suggests one per end user, or a random
# secret: 43 characters of base64 hold 256 bits), not a payload. Unbounded, a 15 MB salt was
# carried into the engine and hashed on its step thread, slowing every tenant's steps.
MAX_CACHE_SALT = 1024


def cache_salt_of(principal: Principal, requested: str | None, auth: Authenticator) -> str | None:
    """The engine's prefix-cache salt of a request: requests share KV blocks only under equal salts.

    With keys configured the salt is the pair (tenant name, the caller's ``cache_salt`` or none):
    a ``cache_salt`` chooses a sharing group within the caller's tenant (e.g. one per end user, as
    vLLM's field is meant), never across tenants, so no tenant can probe another's prompts by
    sending its salt (cached tokens and TTFT would tell). JSON makes the pair unambiguous for any
    name and salt. Without keys (auth off, one anonymous caller) vLLM's behaviour: the caller's
    salt, or None (one group).
    """
    if not auth.enabled:
        return f"salt:{requested}" if requested else None
    return "tenant:" + json.dumps([principal.name, requested or None])


def check_cache_salt(salt: str | None, field: str) -> None:
    """Refuse a ``cache_salt`` over :data:`MAX_CACHE_SALT` characters (``field`` names it).

    Raises:
        RequestError: the salt is too long.
    """
    if salt is not None and len(salt) > MAX_CACHE_SALT:
        raise RequestError(f"{field} must be at most {MAX_CACHE_SALT} characters; got {len(salt)} "
                           "(a salt names a sharing group, e.g. an end user's id or a random token)")


def max_tokens_of(requested: int | None, config: ServerConfig) -> int:
    """The request's max_tokens: ``requested`` lowered to the server's ``--max-tokens`` and the
    generation config's cap, silently, as vLLM 0.32 lowers it to its ``override_max_tokens`` (a
    client's max_tokens of 4,096 was refused by a default server's 2,048, where vLLM serves it), or
    when unset (None or 0) :func:`unset_max_tokens`; either way
    :func:`~nlora_serve.serving.stream.start_request` then lowers it to the rest of the context.
    """
    if not requested:
        return unset_max_tokens(config)
    return min(v for v in (requested, config.max_tokens, config.sampling_defaults.max_tokens_cap) if v is not None)


# /v1/completions' max_tokens when a request sends none (or null): OpenAI's documented default, and vLLM
# 0.32's (CompletionRequest.max_tokens = 16, null normalized to it); chat and gRPC take the rest of the context
COMPLETION_MAX_TOKENS = 16


def completion_unset_max_tokens(config: ServerConfig, min_tokens: int) -> int:
    """The max_tokens of a /v1/completions request that sends none: :data:`COMPLETION_MAX_TOKENS`,
    lowered to the server's ``--max-tokens`` and the generation config's cap (vLLM's
    ``override_max_tokens``; its default max_new_tokens does not apply, as in vLLM, where the field's
    16 is never unset), then by :func:`~nlora_serve.serving.stream.start_request` to the rest of the
    context (vLLM's ``get_max_tokens``).

    Raises:
        RequestError: ``min_tokens`` over that default (named, with the default explained).
    """
    cap = config.sampling_defaults.max_tokens_cap
    limit = min(v for v in (COMPLETION_MAX_TOKENS, config.max_tokens, cap) if v is not None)
    if not 0 <= min_tokens <= limit:
        raise RequestError(f"min_tokens must be an integer in [0, {limit}]; got {shown_int(min_tokens)} (max_tokens "
                           f"is unset: on /v1/completions it defaults to {limit}, as in vLLM and OpenAI; send "
                           "max_tokens for more)", param="min_tokens")
    return limit


def unset_max_tokens(config: ServerConfig) -> int:
    """The max_tokens of a request that sets none, before the rest of the context lowers it: the
    server's ``--max-tokens``, or the generation config's max_new_tokens (default or cap) when lower."""
    d = config.sampling_defaults
    return min(v for v in (config.max_tokens, d.max_tokens, d.max_tokens_cap) if v is not None)


def check_min_tokens_unset_max(min_tokens: int, config: ServerConfig, field: str) -> None:
    """With max_tokens unset, min_tokens in [0, :func:`unset_max_tokens`] (the most max_tokens
    can then be), refused in words that name no max_tokens the client never sent.

    Raises:
        RequestError: ``min_tokens`` outside that range (the message names ``field``).
    """
    limit = unset_max_tokens(config)
    if not 0 <= min_tokens <= limit:
        why = (f"the server's --max-tokens {limit}" if limit == config.max_tokens
               else f"{limit}, the max_new_tokens of the server's --generation-config")
        raise RequestError(f"{field} must be an integer in [0, {limit}]; got {shown_int(min_tokens)} "
                           f"(max_tokens is unset: it defaults to the rest of the context, capped at {why})",
                           param="min_tokens")


def shown_int(number: int) -> str:
    """``number`` as an error quotes it: a hostile 400-digit number is not echoed whole."""
    text = str(number)
    return text if len(text) <= 20 else f"{text[:8]}... ({len(text)} digits)"
