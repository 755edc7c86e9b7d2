"""Typed results of the client (plain dataclasses built from proto messages) and its errors."""

from __future__ import annotations

from dataclasses import dataclass

import grpc

from nlora_serve.proto import REASON_KEY
from nlora_serve.proto import nlora_pb2 as pb

_FINISH = {pb.FINISH_REASON_STOP: "stop", pb.FINISH_REASON_LENGTH: "length", pb.FINISH_REASON_ABORT: "abort"}


@dataclass(frozen=True, slots=True)
class Usage:
    prompt_tokens: int
    completion_tokens: int
    time_to_first_token_s: float  # seconds from the server's receipt to the first token
    duration_s: float  # seconds from the server's receipt to the end
    cached_tokens: int = 0  # prompt tokens the server found in its prefix cache


@dataclass(frozen=True, slots=True)
class TokenLogprob:
    """A token's log-probability (natural log, float32 on the wire) and the most likely tokens at
    its position."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...]  # (token id, log-probability), most likely first
    rank: int | None = None  # the token's vocabulary rank (1 = the most likely): prompt tokens only

    @classmethod
    def from_proto(cls, msg: pb.TokenLogprobs, ranked: bool = False) -> TokenLogprob:
        return cls(msg.token_id, msg.logprob, tuple(zip(msg.top_token_ids, msg.top_logprobs)),
                   msg.rank if ranked else None)


@dataclass(frozen=True, slots=True)
class Delta:
    """One streamed piece of a generation."""

    text: str  # text added since the previous delta (deltas join to the whole completion)
    token_ids: tuple[int, ...]  # tokens added since the previous delta
    adapter: str  # adapter the request runs on ("" = base model)
    adapter_version: int  # its version, pinned at admission (0 = base model)
    content_hash: str  # that version's content hash ("" = base model)
    request_id: str
    finish_reason: str | None = None  # "stop", "length" or "abort" on the last delta, else None
    usage: Usage | None = None  # on the last delta only
    logprobs: tuple[TokenLogprob, ...] = ()  # with top_logprobs: one per token in token_ids
    # with prompt_logprobs, on the first delta only (vLLM's shape): one per prompt token, None for
    # the first (nothing before it to score it), then each token's log-probability, rank and top-k
    prompt_logprobs: tuple[TokenLogprob | None, ...] | None = None

    @classmethod
    def from_proto(cls, msg: pb.GenerateResponse) -> Delta:
        usage = None
        if msg.finish_reason != pb.FINISH_REASON_UNSPECIFIED:
            u = msg.usage
            usage = Usage(u.prompt_tokens, u.completion_tokens, u.time_to_first_token_s, u.duration_s, u.cached_tokens)
        prompt = None
        if msg.prompt_logprobs:
            prompt = (None, *(TokenLogprob.from_proto(e, ranked=True) for e in msg.prompt_logprobs))
        return cls(msg.text, tuple(msg.token_ids), msg.adapter.name, msg.adapter.version,
                   msg.adapter.content_hash, msg.request_id, _FINISH.get(msg.finish_reason), usage,
                   tuple(TokenLogprob.from_proto(e) for e in msg.logprobs), prompt)


@dataclass(frozen=True, slots=True)
class AdapterInfo:
    """One adapter version as the server reports it."""

    name: str  # the adapter's name, what a request asks for
    version: int  # per-name sequence number, starting at 1
    content_hash: str  # sha256 hex of the version's content (equal hashes: equal outputs)
    flavour: str  # "lora", "nlora", "inttune-tied" or "family" (a compressed family's member)
    rank: int  # largest rank over its modules
    target_modules: tuple[str, ...]  # adapted module names, e.g. "q_proj"
    tied: bool  # A and B are the base weight's Nyström slices: the server holds only N
    resident_bytes: int  # bytes the server holds for it in the compute dtype (0 while not resident)
    active_requests: int  # requests running on this version now

    @classmethod
    def from_proto(cls, msg: pb.AdapterInfo) -> AdapterInfo:
        return cls(msg.ref.name, msg.ref.version, msg.ref.content_hash, msg.flavour, msg.rank,
                   tuple(msg.target_modules), msg.tied, msg.resident_bytes, msg.active_requests)


class NloraClientError(Exception):
    """A call failed; ``code`` is the gRPC status code, the message is the server's, ``reason`` the
    server's word for a refusal where it sent one (``queue_full``, ``tenant_quota`` or
    ``tenant_queue_share`` for RESOURCE_EXHAUSTED: the reasons of ``nlora_requests_rejected_total``),
    else None."""

    code: grpc.StatusCode = grpc.StatusCode.UNKNOWN
    reason: str | None = None

    def __init__(self, message: str, code: grpc.StatusCode | None = None, reason: str | None = None):
        super().__init__(message)
        if code is not None:
            self.code = code
        self.reason = reason


class InvalidArgument(NloraClientError):
    code = grpc.StatusCode.INVALID_ARGUMENT


class InvalidInput(InvalidArgument):
    """Refused by the client before any call: a missing or unsupported local file, or a value out
    of its field's range. An InvalidArgument, so one ``except`` covers both sides."""


class NotFound(NloraClientError):
    code = grpc.StatusCode.NOT_FOUND


class ResourceExhausted(NloraClientError):
    code = grpc.StatusCode.RESOURCE_EXHAUSTED


class Unauthenticated(NloraClientError):
    code = grpc.StatusCode.UNAUTHENTICATED


class PermissionDenied(NloraClientError):
    code = grpc.StatusCode.PERMISSION_DENIED


class FailedPrecondition(NloraClientError):
    code = grpc.StatusCode.FAILED_PRECONDITION


class Unavailable(NloraClientError):
    code = grpc.StatusCode.UNAVAILABLE


class DeadlineExceeded(NloraClientError):
    code = grpc.StatusCode.DEADLINE_EXCEEDED


class Aborted(NloraClientError):
    """The server ended the request: a forced unload of its adapter (the message names the
    version), or a shutdown past its drain deadline."""

    code = grpc.StatusCode.ABORTED


_BY_CODE = {cls.code: cls for cls in (InvalidArgument, NotFound, ResourceExhausted, Unauthenticated,
                                      PermissionDenied, FailedPrecondition, Unavailable, DeadlineExceeded, Aborted)}


def error_from(exc: grpc.RpcError) -> NloraClientError:
    """The typed exception for a failed call (NloraClientError for codes without their own class)."""
    code = exc.code()
    trailing = exc.trailing_metadata() if hasattr(exc, "trailing_metadata") else None
    reason = next((value for key, value in trailing or () if key == REASON_KEY and isinstance(value, str)
                   and value.isprintable() and len(value) <= 64), None)
    return _BY_CODE.get(code, NloraClientError)(f"{code.name}: {exc.details()}", code, reason)
