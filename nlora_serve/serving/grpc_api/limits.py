"""How large a gRPC request message may be: one server-wide receive limit, and a bound per method.

grpc has one receive limit for every method (``grpc.max_receive_message_length``) and takes a whole
message up to it before any of our code runs, and that limit must let SwapAdapter's one
``bytes n_safetensors`` message through. Were it the only bound, a tenant with a valid key could
send a Generate request of that size (a huge prompt or cache_salt) that grpc receives, Python
copies and protobuf parses before validation refuses it (a 200 MB one moved the server's memory by
GBs). So:

* the server-wide limit (:attr:`MessageLimits.receive_bytes`) is what the largest legal SwapAdapter
  carries (:func:`swap_payload_bytes`), never below gRPC's default 4 MiB or Generate's bound, and
  never above ``--max-adapter-bytes`` plus headroom: 6,586,376 bytes for the default model at
  ``--max-rank 64``;
* every method but SwapAdapter and UploadAdapter (client-streamed in 1 MiB chunks) has a bound of
  its own (:meth:`MessageLimits.bound`), checked on the raw bytes before protobuf parses them
  (decode.BoundedDecode): Generate the largest legal request (:func:`generate_request_bytes`,
  1,712,128 bytes for the default model at ``--max-model-len 2048``), the small RPCs and grpc's
  health and reflection services (which need no key) :data:`SMALL_REQUEST_BYTES`.
"""

from __future__ import annotations

from dataclasses import dataclass

from nlora_serve.adapters.format import MAX_HEADER_BYTES
from nlora_serve.models.spec import PROJECTIONS, ModelSpec
from nlora_serve.serving.grpc_api.auth import ADMIN_SERVICE
from nlora_serve.serving.grpc_api.decode import GENERATE
from nlora_serve.serving.server_config import MAX_GRPC_MESSAGE, MESSAGE_HEADROOM

# bounded by the server-wide limit only: a swap carries a whole N; an upload's messages are chunks
UNBOUNDED_METHODS = (ADMIN_SERVICE + "SwapAdapter", ADMIN_SERVICE + "UploadAdapter")
GRPC_DEFAULT_RECEIVE = 4 << 20  # gRPC's own default max_receive_message_length
# the other methods' requests hold a name and a flag, or nothing (ListAdapters, GetServerInfo,
# LoadAdapter, UnloadAdapter, grpc.health.v1 Check and Watch, reflection's symbol or file name)
SMALL_REQUEST_BYTES = 64 << 10
SAFETENSORS_LENGTH_BYTES = 8  # the header length that opens a safetensors file (little-endian u64)
F32_BYTES = 4  # the widest dtype a swap payload may hold (adapters.format.STORED_DTYPES)
VARINT_BYTES = 5  # a uint32 (a token id) at most, in protobuf's varint encoding
# Generate's fields besides the prompt, at most: 64 stop strings of 1024 characters (up to 4 bytes
# each in UTF-8: 256 KiB), 1024 stop token ids (5 KiB), cache_salt (1024 characters, 4 KiB),
# request_id (256 characters), the adapter name and the sampling scalars: under 270 KiB; 1 MiB also
# covers a chat's per-message framing (fewer bytes than the template adds per message)
REQUEST_FIELDS_BYTES = 1 << 20


def swap_payload_bytes(spec: ModelSpec, max_rank: int) -> int:
    """The largest N-only safetensors payload a SwapAdapter can legally carry for ``spec``, bytes:
    a tied (or family) tenant holds one N [r, r] per projection (7 per layer), r ≤ ``max_rank``
    (the loader refuses higher, ``--max-rank``), stored at most as F32; the reader takes a header of
    at most ``MAX_HEADER_BYTES`` (2 MiB) and checks that the tensors tile the data exactly, so
    nothing else fits. 5,537,800 for the default model (30 layers) at rank 64."""
    sites = len(PROJECTIONS) * spec.num_layers
    return SAFETENSORS_LENGTH_BYTES + MAX_HEADER_BYTES + sites * max_rank * max_rank * F32_BYTES


def generate_request_bytes(prompt_bytes: int, max_model_len: int) -> int:
    """The largest legal GenerateRequest, bytes: a text prompt of at most ``prompt_bytes`` of UTF-8
    (engine.api.max_prompt_bytes: more is refused as surely over ``max_model_len`` tokens) or
    ``max_model_len`` token ids of at most 5 bytes each, plus :data:`REQUEST_FIELDS_BYTES` for the
    other fields."""
    return max(prompt_bytes, VARINT_BYTES * max_model_len) + REQUEST_FIELDS_BYTES


@dataclass(frozen=True, slots=True)
class MessageLimits:
    """The server's request-size limits, bytes (see the module docstring)."""

    receive_bytes: int  # grpc.max_receive_message_length: every method; SwapAdapter's whole payload
    generate_bytes: int  # a GenerateRequest at most

    def bound(self, method: str) -> int | None:
        """A request message's bound for ``method`` (a full name, ``/pkg.Service/Method``), checked
        before parsing; None where only :attr:`receive_bytes` applies (SwapAdapter, UploadAdapter).
        A method not named here gets :data:`SMALL_REQUEST_BYTES`: a new RPC is small until it says
        otherwise."""
        if method == GENERATE:
            return self.generate_bytes
        return None if method in UNBOUNDED_METHODS else SMALL_REQUEST_BYTES


def message_limits(swap_shape: tuple[ModelSpec, int] | None, prompt_bytes: int, max_model_len: int,
                   max_adapter_bytes: int) -> MessageLimits:
    """The limits for a server of this model and these flags.

    Args:
        swap_shape: (the base model's spec, ``--max-rank``), or None for a server without an
            adapter store (no swap can succeed there).
        prompt_bytes: a text prompt's UTF-8 bound (engine.api.max_prompt_bytes).
        max_model_len: tokens of one sequence at most.
        max_adapter_bytes: ``--max-adapter-bytes``: a swap payload over it is refused by the server's
            own check (RESOURCE_EXHAUSTED naming the flag), so the limit is never above it plus
            headroom.
    """
    generate = generate_request_bytes(prompt_bytes, max_model_len)
    swap = 0
    if swap_shape is not None:
        swap = min(swap_payload_bytes(*swap_shape), max_adapter_bytes) + MESSAGE_HEADROOM
    return MessageLimits(min(max(GRPC_DEFAULT_RECEIVE, generate, swap), MAX_GRPC_MESSAGE), generate)
