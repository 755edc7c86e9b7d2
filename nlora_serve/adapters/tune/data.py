"""``adapters tune``'s training data: chat examples from JSONL, and masked token batches.

A line is ``{"prompt": str, "response": str}`` or ``{"messages": [{"role", "content"}, ...]}``
with an assistant turn; a chat becomes (input ids, labels) through the tokenizer's chat template,
with the loss on assistant turns only (``IGNORE`` elsewhere), then right-padded batches.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from nlora_serve.errors import AdapterError, shown

IGNORE = -100  # label of a token that carries no loss (prompt, template, padding)
# the largest training file read (bytes): tune holds every example in memory, and 1 GiB of chats is
# far beyond a CPU fine-tune of a few hundred steps; a device or pipe (`--data /dev/zero`) is refused
MAX_DATA_BYTES = 1 << 30


def read_examples(path: str | Path) -> list[list[dict]]:
    """Chat examples from a JSONL file, each line ``{"prompt": str, "response": str}`` or
    ``{"messages": [{"role": ..., "content": str}, ...]}`` with at least one assistant turn.

    Raises:
        AdapterError: not a regular file (a device, pipe or folder), larger than
            :data:`MAX_DATA_BYTES`, unreadable, or a line that is neither shape (named by line number).
    """
    try:
        source = Path(path)
        if not source.exists():
            raise AdapterError(f"{path}: no such training data file")
        if not source.is_file():
            kind = "a folder" if source.is_dir() else "a device, pipe or socket"
            raise AdapterError(f"{path}: training data must be a regular JSONL file, not {kind}")
        size = source.stat().st_size
        if size > MAX_DATA_BYTES:
            raise AdapterError(f"{path}: training data is {size:,} bytes; at most {MAX_DATA_BYTES:,} are read")
        lines = source.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:  # JSONL is UTF-8 text
        raise AdapterError(f"{path}: cannot read training data ({exc})") from None
    examples = [_messages(line, f"{path}:{no}") for no, line in enumerate(lines, 1) if line.strip()]
    if not examples:
        raise AdapterError(f"{path}: no examples")
    return examples


def _messages(line: str, where: str) -> list[dict]:
    try:
        obj = json.loads(line)
    except (ValueError, RecursionError) as exc:
        raise AdapterError(f"{where}: not JSON ({exc})") from None
    if isinstance(obj, dict) and isinstance(obj.get("prompt"), str) and isinstance(obj.get("response"), str):
        return [{"role": "user", "content": obj["prompt"]}, {"role": "assistant", "content": obj["response"]}]
    msgs = obj.get("messages") if isinstance(obj, dict) else None
    if (isinstance(msgs, list) and msgs and any(isinstance(m, dict) and m.get("role") == "assistant" for m in msgs)
            and all(isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
                    for m in msgs)):
        if msgs[0]["role"] == "assistant":  # encode() renders the turns before each assistant turn
            raise AdapterError(f"{where}: the first turn is the assistant's; a chat starts with a system or "
                               "user turn (each assistant turn is learned as the answer to the turns before it)")
        return [{"role": m["role"], "content": m["content"]} for m in msgs]
    got = f"; got keys {', '.join(repr(shown(k, 40)) for k in list(obj)[:8])}" if isinstance(obj, dict) else ""
    raise AdapterError(f"{where}: expected {{\"prompt\": str, \"response\": str}} or {{\"messages\": "
                       f"[{{\"role\": str, \"content\": str}}, ...]}} with an assistant turn{got}")


def encode(tokenizer, messages: list[dict], max_len: int) -> tuple[list[int], list[int]]:
    """(input ids, labels) of one chat rendered with the tokenizer's chat template; labels are the
    ids on assistant turns (their closing template tokens included, so the tenant learns to stop)
    and IGNORE elsewhere. Both cut to ``max_len``.

    Raises:
        AdapterError: the chat template is not prefix-stable (a turn re-renders earlier text).
    """
    ids, labels, done = [], [], ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(messages[:i], add_generation_prompt=True, tokenize=False)
        full = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not (prompt.startswith(done) and full.startswith(prompt)):
            raise AdapterError("the model's chat template re-renders earlier turns; cannot mask prompts")
        ctx = tokenizer(prompt[len(done):], add_special_tokens=False).input_ids
        resp = tokenizer(full[len(prompt):], add_special_tokens=False).input_ids
        ids += ctx + resp
        labels += [IGNORE] * len(ctx) + resp
        done = full
    return ids[:max_len], labels[:max_len]


def collate(items: list[tuple[list[int], list[int]]], pad_id: int) -> dict[str, torch.Tensor]:
    """Right-padded int64 ``input_ids``, ``attention_mask`` and ``labels`` [B, T] (T = longest)."""
    width = max(len(ids) for ids, _ in items)
    batch = {"input_ids": torch.full((len(items), width), pad_id), "labels": torch.full((len(items), width), IGNORE),
             "attention_mask": torch.zeros(len(items), width, dtype=torch.int64)}
    for row, (ids, labels) in enumerate(items):
        batch["input_ids"][row, : len(ids)] = torch.tensor(ids)
        batch["labels"][row, : len(ids)] = torch.tensor(labels)
        batch["attention_mask"][row, : len(ids)] = 1
    return batch


def split(examples: list, fraction: float, gen: torch.Generator) -> tuple[list, list]:
    """(train, held-out) after a seeded shuffle; held-out gets round(fraction·n), at least 1 when
    ``fraction`` > 0, and train keeps at least 1.

    Raises:
        AdapterError: too few examples for both splits.
    """
    n_held = 0 if fraction == 0 else max(1, round(fraction * len(examples)))
    if len(examples) - n_held < 1:
        raise AdapterError(f"{len(examples)} example(s) cannot give a held-out split of {fraction} and a "
                           "non-empty training split")
    order = torch.randperm(len(examples), generator=gen).tolist()
    return [examples[i] for i in order[n_held:]], [examples[i] for i in order[:n_held]]
