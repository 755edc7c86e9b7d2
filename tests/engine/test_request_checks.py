"""The admission checks both engines share (engine/request_checks.py): their refusals' words."""

from __future__ import annotations

import pytest

from nlora_serve.engine.request_checks import check_request
from nlora_serve.engine.sample.sampling import RequestError


@pytest.mark.parametrize("ids, shown", [
    ((5, 49152, 10**6), "[49152, 1000000]"),  # vLLM 0.32's words, whole
    (tuple(range(1 << 62, (1 << 62) + 128)), str(list(range(1 << 62, (1 << 62) + 128)))[:200] + "..."),
])
def test_out_of_vocab_logprob_token_ids_are_listed_in_vllms_words_cut(ids, shown):
    """128 ids of 19 digits made a 2,700-character list, past the 1,000 characters an error keeps:
    the vocabulary size after it was lost. The list is cut at 200 characters."""
    with pytest.raises(RequestError) as err:
        check_request([1, 2], 49152, 64, logprob_token_ids=ids)
    assert (str(err.value), err.value.param) == (
        f"token_id(s) {shown} in logprob_token_ids contain out-of-vocab token ids. Vocabulary size: 49152",
        "logprob_token_ids")
