"""Large whole responses (a batch with ``prompt_logprobs``: up to 1,024 prompts x max_model_len
positions x 21 tokens) stay off the event loop: they are shaped and serialized on a worker thread,
one choice at a time (serving/http_api/generate.py's ``_whole``, responses.py's ``whole_json``), and
each logprob token is decoded once per server (token_bytes.py's ``TokenText``). References: the
tokenizer's own ``decode``, Starlette's JSONResponse rendering, a ticker on the event loop."""

from __future__ import annotations

import asyncio
import json
import math
import random
import time

import pytest
from starlette.responses import JSONResponse

from nlora_serve.engine.api import RequestOutput
from nlora_serve.engine.sample.prompt_logprobs import PromptLogprob
from nlora_serve.serving.http_api import generate
from nlora_serve.serving.http_api.responses import Shaper, whole_json


class _CountingTokenizer:
    """The tokenizer, counting its ``decode`` calls."""

    def __init__(self, tokenizer):
        self.tokenizer, self.decodes = tokenizer, 0

    def decode(self, ids, **kwargs):
        self.decodes += 1
        return self.tokenizer.decode(ids, **kwargs)


def _batch_outputs(tokenizer, num_prompts: int, length: int, top: int) -> tuple[list[list[int]], list[RequestOutput]]:
    """A batch's finished outputs with prompt logprobs: words of ordinary text (ids repeat, as in any text)."""
    rng = random.Random(0)
    words = tokenizer.encode("the a of to in and is was for on with as by at from it that this be are or an "
                             "sea ship wind log keeper light rocks birds evening colour", add_special_tokens=False)
    prompts = [[rng.choice(words) for _ in range(length)] for _ in range(num_prompts)]
    outs = []
    for index, prompt in enumerate(prompts):
        scored = [PromptLogprob({t: -1.5, **{u: -2.0 - k for k, u in enumerate(rng.sample(words, top))}}, 2)
                  for t in prompt[1:]]
        outs.append(RequestOutput("r", " the", [words[0]], "length", length, 1, logprobs=[{words[0]: -0.25}],
                                  prompt_logprobs=[None, *scored], index=index))
    return prompts, outs


def test_each_logprob_token_is_decoded_once_and_as_decode_decodes_it(tokenizer):
    counting = _CountingTokenizer(tokenizer)
    prompts, outs = _batch_outputs(tokenizer, num_prompts=6, length=40, top=5)
    body = Shaper("cmpl-1", "m", False, counting, 0, prompt_ids=prompts, prompt_logprobs=5).whole(outs)
    named = {int(t) for choice in body["choices"] for pos in choice["prompt_logprobs"] if pos for t in pos}
    assert counting.decodes == len(named | {outs[0].token_ids[0]})  # one decode per distinct id, not per entry
    for choice, prompt in zip(body["choices"], prompts):
        assert choice["prompt_logprobs"][0] is None
        for pos in choice["prompt_logprobs"][1:]:
            assert all(entry["decoded_token"] == tokenizer.decode([int(t)]) for t, entry in pos.items())
        assert choice["logprobs"]["tokens"] == [tokenizer.decode([outs[0].token_ids[0]])]


@pytest.mark.parametrize("body", [
    {"id": "cmpl-1", "object": "text_completion", "choices": [], "usage": {"prompt_tokens": 1}},
    {"id": "x", "choices": [{"index": 0, "text": "naïve café 東京 🌸 \" \\ \n \u2028", "logprobs": None},
                            {"index": 1, "text": "", "logprobs": {"token_logprobs": [None, -9999.0, -1e-300, 0.1]}}],
     "system_fingerprint": None, "usage": {"total_tokens": 10 ** 18}},
    {"id": "resp_1", "output": [{"type": "message", "content": [{"text": "é"}]}], "tools": [{"name": "f"}] * 3,
     "metadata": {"k": ["v"]}, "empty": []},
])
def test_whole_json_is_the_bytes_jsonresponse_renders(body):
    assert whole_json(body) == JSONResponse(body).body
    assert json.loads(whole_json(body)) == body


def test_whole_json_serializes_a_responses_tools_echo_a_tool_at_a_time(monkeypatch):
    """/v1/responses echoes the request's tools: 100k of them were 4 MB in one json.dumps (the GIL
    held ~0.18 s, every stream waiting)."""
    from nlora_serve.serving.http_api import responses

    sizes = []
    dumps = responses._dumps
    monkeypatch.setattr(responses, "_dumps", lambda value: sizes.append(len(dumps(value))) or dumps(value))
    body = {"id": "resp_1", "tools": [{"name": "f", "parameters": {"type": "object"}}] * 1000, "usage": None}
    assert whole_json(body) == JSONResponse(body).body
    assert max(sizes) < 100


def test_whole_json_refuses_what_jsonresponse_refuses():
    body = {"id": "x", "choices": [{"logprobs": {"token_logprobs": [math.nan]}}]}
    with pytest.raises(ValueError):
        JSONResponse(body)
    with pytest.raises(ValueError):
        whole_json(body)


class _NeverGone:
    """A request whose client stays connected."""

    async def receive(self):
        await asyncio.Event().wait()


class _SlowShaper(Shaper):
    """A Shaper whose whole response takes ``seconds`` of CPU (a large batch's prompt logprobs)."""

    seconds = 1.0

    def whole(self, outs):
        end = time.perf_counter() + self.seconds
        while time.perf_counter() < end:
            pass
        return super().whole(outs)


def test_the_event_loop_runs_while_a_whole_response_is_shaped(tokenizer):
    prompts, outs = _batch_outputs(tokenizer, num_prompts=2, length=8, top=1)
    shaper = _SlowShaper("cmpl-1", "m", False, tokenizer, 0, prompt_ids=prompts, prompt_logprobs=1)

    async def deltas():
        for out in outs:
            yield out

    async def scenario():
        ticks = 0

        async def ticker():
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        ticking = asyncio.create_task(ticker())
        await asyncio.sleep(0)
        started = time.perf_counter()
        response = await generate._whole(_NeverGone(), deltas(), shaper)
        took = time.perf_counter() - started
        ticking.cancel()
        return response, ticks, took

    response, ticks, took = asyncio.run(scenario())
    assert took >= _SlowShaper.seconds
    # the loop's other tasks kept running (on the loop they would not have run once; 9+ ticks of
    # 10 ms in 0.6 s on 2 loaded cores, the shaping thread contending for the GIL)
    assert ticks >= 5, ticks
    assert response.status_code == 200 and response.media_type == "application/json"
    body = json.loads(response.body)
    assert [c["index"] for c in body["choices"]] == [0, 1]
    assert [len(c["prompt_logprobs"]) for c in body["choices"]] == [8, 8]
