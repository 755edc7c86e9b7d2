"""api.prompt_ids: text refused above api.max_prompt_bytes without tokenizing; the bound is sound;
a text prompt takes the tokenizer's special tokens unless asked not to (vLLM's add_special_tokens),
in the vLLM backend's add_request too."""

from __future__ import annotations

import asyncio
import threading

import pytest

from nlora_serve.engine.api import PROMPT_BYTES_SLACK, RequestIds, bytes_per_token, max_prompt_bytes, prompt_ids
from nlora_serve.engine.config import EngineConfig, SchedulerConfig
from nlora_serve.engine.sample.sampling import RequestError, SamplingParams
from nlora_serve.engine.vllm_backend import engine as vllm_engine_module
from nlora_serve.engine.vllm_backend.engine import VllmEngine

TEXT = "The keeper of the lighthouse wrote"


class _Tokenizer:
    """A tokenizer whose vocabulary's longest entry has 3 characters and that records encodes."""

    def __init__(self) -> None:
        self.encoded: list[str] = []

    def get_vocab(self) -> dict[str, int]:
        return {"a": 0, "bc": 1, "def": 2}

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        self.encoded.append(text)
        return [0] * len(text)


def test_a_prompt_above_the_bound_is_refused_before_tokenizing():
    tok = _Tokenizer()
    bound = max_prompt_bytes(tok, max_model_len=10)
    assert bound == PROMPT_BYTES_SLACK * 3 * 10  # not byte-level: the longest entry's UTF-8 bytes
    assert len(prompt_ids("x" * bound, tok, threading.Lock(), bound)) == bound  # at the bound: tokenized
    with pytest.raises(RequestError, match=f"prompt is {bound + 1:,} bytes of UTF-8"):
        prompt_ids("x" * (bound + 1), tok, threading.Lock(), bound)
    # counted in bytes, not characters: a quarter of the bound in 4-byte emoji is one byte too many
    emoji = "\N{GRINNING FACE}" * (bound // 4) + "x"
    with pytest.raises(RequestError, match=f"prompt is {bound + 1:,} bytes of UTF-8"):
        prompt_ids(emoji, tok, threading.Lock(), bound)
    assert [len(t) for t in tok.encoded] == [bound]  # the refused ones never reached the tokenizer
    assert prompt_ids([5, 6], tok, threading.Lock(), 1) == [5, 6]  # token ids: no byte bound


def test_no_token_of_the_default_tokenizer_spells_more_bytes_than_the_bound(base_model_dir):
    """The bound's premise, checked on every token of the default model's vocabulary (byte-level
    BPE): a token's text is the bytes its entry's characters stand for under GPT-2's byte-to-unicode
    map, one byte a character, so no token spells more bytes than the longest entry has characters."""
    from transformers import AutoTokenizer
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    tok = AutoTokenizer.from_pretrained(base_model_dir)
    vocab = tok.get_vocab()
    byte_of = {c: b for b, c in bytes_to_unicode().items()}
    special = set(tok.all_special_tokens) | set(tok.added_tokens_encoder)
    for entry in vocab:
        if entry in special:
            continue
        spelled = bytes(byte_of[c] for c in entry)  # KeyError: a character that stands for no byte
        # the tokenizer agrees: the entry's id decodes to those bytes (partial UTF-8 as U+FFFD)
        assert tok.decode([vocab[entry]]) == spelled.decode("utf-8", "replace"), entry
    assert bytes_per_token(tok) == max(map(len, vocab))
    assert max_prompt_bytes(tok, 2048) == PROMPT_BYTES_SLACK * max(map(len, vocab)) * 2048


def test_text_takes_the_tokenizers_special_tokens_unless_asked_not_to(bos_tokenizer_dir):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(bos_tokenizer_dir)
    want = tok(TEXT).input_ids  # transformers' own: what HF generate and vLLM's completions are given
    assert want[0] == tok.bos_token_id and want[1:] == tok(TEXT, add_special_tokens=False).input_ids
    assert prompt_ids(TEXT, tok, threading.Lock()) == want
    assert prompt_ids(TEXT, tok, threading.Lock(), None, add_special_tokens=False) == want[1:]
    assert prompt_ids(want[1:], tok, threading.Lock(), None, add_special_tokens=True) == want[1:]  # ids as given


class _RecordingLLM:
    """vLLM's AsyncLLM as far as VllmEngine._run uses it: records the prompt it is given, ends at once."""

    errored = False

    def __init__(self) -> None:
        self.prompts: list[dict] = []

    async def generate(self, prompt, params, request_id, lora_request=None):
        self.prompts.append(prompt)
        for out in ():  # an async generator that yields nothing: the request ends at once
            yield out


def test_the_vllm_backend_sends_vllm_the_ids_with_special_tokens_by_default(bos_tokenizer_dir, monkeypatch):
    """VllmEngine tokenizes and sends vLLM ids (so vLLM's own default never applies): the flag must
    reach its tokenizing. A VllmEngine shell (as tests/engine/test_vllm_engine_paths.py builds one)
    with vLLM's AsyncLLM replaced by a recorder."""
    from transformers import AutoTokenizer

    monkeypatch.setattr(vllm_engine_module, "vllm_sampling_params", lambda params, tenant=None: params)  # no vllm here
    tok = AutoTokenizer.from_pretrained(bos_tokenizer_dir)
    engine = VllmEngine.__new__(VllmEngine)
    engine.config = EngineConfig(scheduler=SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=64,
                                                           max_model_len=64))
    engine.tokenizer, engine.vocab_size, engine._max_prompt_bytes = tok, len(tok), None
    engine._lock, engine._jobs, engine._ids, engine._counters = threading.Lock(), {}, RequestIds(), \
        {"prompt_tokens": 0, "generation_tokens": 0}
    engine._adapters, engine._stopping, engine._dead, engine._base_lora, engine._gate = None, False, None, None, None
    engine._llm = llm = _RecordingLLM()
    engine._loop = asyncio.new_event_loop()
    engine._thread = threading.Thread(target=engine._loop.run_forever, daemon=True)
    engine._thread.start()
    want = tok(TEXT).input_ids

    async def run(prompt, **flag):
        return [out async for out in engine.add_request(prompt, SamplingParams(max_tokens=4), **flag)]

    try:
        finals = [asyncio.run(run(TEXT))[-1], asyncio.run(run(TEXT, add_special_tokens=False))[-1],
                  asyncio.run(run(want[1:], add_special_tokens=True))[-1]]
    finally:
        engine._stop_loop()
    assert [p["prompt_token_ids"] for p in llm.prompts] == [want, want[1:], want[1:]]
    assert [out.prompt_tokens for out in finals] == [len(want), len(want) - 1, len(want) - 1]
    assert engine.prompt_ids(TEXT) == want and engine.prompt_ids(TEXT, add_special_tokens=False) == want[1:]
