"""compress_report.compare_outputs: agreement counts the model's argmax against the reference
model's argmax at the same position, not against the generated token (which differs where the
reference's argmax is EOS and generation forbade it)."""

from __future__ import annotations

from types import SimpleNamespace

import torch

from nlora_serve.adapters.compress.report import compare_outputs

EOS, VOCAB = 3, 5


class _FixedModel:
    """Next-token logits that depend on the position only: EOS first everywhere, token 1 second."""

    def __call__(self, seq: torch.Tensor) -> SimpleNamespace:
        logits = torch.zeros(1, seq.shape[1], VOCAB)
        logits[..., EOS], logits[..., 1] = 4.0, 2.0
        return SimpleNamespace(logits=logits)


def test_the_reference_model_agrees_with_itself_where_its_argmax_is_eos():
    model, prompt = _FixedModel(), [0, 2]
    tokens = [1, 1, 1, 1]  # generated with EOS suppressed: the runner-up at every position
    ref_lp = torch.log_softmax(model(torch.tensor([prompt + tokens[:-1]])).logits[0, 1:].double(), dim=-1)
    agreement, kl, positions = compare_outputs(model, [prompt], [(tokens, ref_lp)])
    assert (agreement, positions) == (1.0, 4) and abs(kl) < 1e-12
    other = ref_lp.clone()
    other[:2, 1] = 10.0  # a reference whose greedy choice is token 1 at the first two positions
    assert compare_outputs(model, [prompt], [(tokens, other)])[0] == 0.5
