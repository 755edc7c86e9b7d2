"""The reference of the EOS tests (engine/eos.py): the default model's greedy answer to a question,
from transformers, that ends with the tokenizer's EOS after a token (STEP) no earlier step produced:
a generation config naming that token as an extra EOS ends the answer there."""

from __future__ import annotations

import json
from pathlib import Path

import torch

QUESTION = [{"role": "user", "content": "What is 2+2? Answer with one number."}]
STEP = 2  # the answer's token at this step is the tests' extra EOS (" is" of "The answer is 4.")
TOKENIZER_EOS = 2  # SmolLM2's <|im_end|>
MODEL_FILES = ("config.json", "model.safetensors", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja")


def greedy_answer(hf_model, tokenizer) -> tuple[list[int], list[int], torch.Tensor]:
    """(prompt ids, transformers' greedy answer up to and with the tokenizer's EOS, the float64
    logits of step STEP). Asserts the shape the tests rely on and that no step is a near-tie."""
    prompt = tokenizer(tokenizer.apply_chat_template(QUESTION, tokenize=False, add_generation_prompt=True),
                       add_special_tokens=False).input_ids
    ids, answer, logits = torch.tensor([prompt]), [], None
    with torch.no_grad():
        while not answer or answer[-1] != TOKENIZER_EOS:
            step_logits = hf_model(ids).logits[0, -1].double()
            logits = step_logits if len(answer) == STEP else logits
            top = step_logits.topk(2)
            assert top.values[0] - top.values[1] > 1e-3  # no near-tie: the engine's greedy must agree
            answer.append(int(top.indices[0]))
            ids = torch.cat([ids, top.indices[:1].view(1, 1)], 1)
            assert len(answer) < 24
    assert answer[STEP] not in answer[:STEP] and len(answer) > STEP + 2
    return prompt, answer, logits


def model_folder(out: Path, base_model_dir: Path, generation_config: dict | None) -> Path:
    """The default model's files linked into ``out`` beside a hand-written generation_config.json."""
    out.mkdir(parents=True)
    for name in MODEL_FILES:
        (out / name).symlink_to(base_model_dir / name)
    if generation_config is not None:
        (out / "generation_config.json").write_text(json.dumps(generation_config))
    return out
