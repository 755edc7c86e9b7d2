"""A /v1/completions ``prompt`` of millions of token ids (a 16 MiB body: one prompt, or a batch of
1,024) is checked on the event loop, before any other tenant's request there goes on: its shape
check (serving/http_api/prompts.py) costs less than parsing the body it came in. Reference: the
same process's ``json.loads`` of that body, so the bound holds however loaded the machine is."""

from __future__ import annotations

import json
import time

import pytest

from nlora_serve.serving.http_api.prompts import check_prompt_shape


def _fastest(work, repeats: int = 3) -> float:
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        work()
        times.append(time.perf_counter() - started)
    return min(times)


@pytest.mark.parametrize("shape", ["batch", "one prompt"])
def test_checking_a_prompt_of_millions_of_ids_costs_less_than_parsing_it(shape):
    batch = [[(i * 7 + j) % 49152 for j in range(1000)] for i in range(1024)]
    prompt = batch if shape == "batch" else [t for ids in batch for t in ids]
    raw = json.dumps({"prompt": prompt})
    parsed = json.loads(raw)["prompt"]
    assert check_prompt_shape(parsed) is parsed
    parse, check = _fastest(lambda: json.loads(raw)), _fastest(lambda: check_prompt_shape(parsed))
    assert check < 0.75 * parse, (check, parse)  # a Python loop over the ids took ~2x the parse


@pytest.mark.parametrize("prompt, words", [
    ([[1, 2], [3, True]], "prompt[1][1] is a boolean"),
    ([[1, 2], [3, 1.5]], "prompt[1][1] is another value"),
    ([1, 2, None], "prompt holds an integer and null"),
])
def test_the_fast_check_still_names_the_first_bad_value(prompt, words):
    with pytest.raises(Exception) as refused:
        check_prompt_shape(prompt)
    assert words in str(refused.value)
