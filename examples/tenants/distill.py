"""Train the `upper` tenant by distillation from the base model: IntTune (only N, r = 16, N from
zeros) on the base model's own short answers in upper case, with soft targets from the base model.

Why: trained on the upper-cased answers alone (``adapters tune``), `upper` fits its 251 training
answers and loses the content on others (README.md: held-out 1.4-1.5 nats/token, answers whose
words drift). One upper-case answer tells the tenant one word per position; the base model's
distribution over the next word tells it what else it could have said. So each training token's
target is a mix of the upper-case token (weight 1 - λ) and the base model's distribution (λ),
mapped into upper case:

    X   the base model's answer (original case), U = X.upper() (same length, else the example is
        skipped), tokenised as x_1..x_n and u_1..u_m; character offsets align the two
    p   the base model's next-token distribution before x_i, on its own prompt + X (top 64 tokens)
    q   for the k-th upper-case piece u_j of x_i's span (k = 0 at x_i's first character):
        q(w) ∝ Σ_v p(v) [T(v)[:k] = u_{j-k..j-1}] [T(v)[k] = w],   T(v) = tokens of v's text upper-cased
        (the base model's choice of word, spelt in upper-case pieces; candidates whose spelling
        ended before piece k drop out). Tokens whose span T(x_i) does not tokenise as in U get no q.
    loss = Σ_labelled [(1 - λ) · CE(u_j) + λ · CE(q)] / #labelled   (hard CE alone where no q)

This is sequence data from the teacher plus its soft labels (Hinton et al. 2015, "Distilling the
knowledge in a neural network"; Kim & Rush 2016, sequence-level knowledge distillation), the
teacher being the base model itself; the tenant starts at the base model (N = 0).

    python examples/tenants/distill.py --out DIR [--steps 150] [--lam 0.7] [--lr 1e-2] [--seed 0]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path

import torch
from torch import nn

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from make_data import DATA, read_jsonl, short_answer  # noqa: E402

TOP_K = 64  # teacher candidates per position


def upper_pieces(tok, cache: dict, v: int) -> tuple[int, ...]:
    """T(v): the token ids of token ``v``'s text in upper case (cached)."""
    if v not in cache:
        cache[v] = tuple(tok(tok.decode([v]).upper(), add_special_tokens=False).input_ids)
    return cache[v]


def soft_targets(tok, cache, x: str, probs: torch.Tensor, ids: torch.Tensor) -> dict[int, dict[int, float]]:
    """{index j of U's token: {upper-case token: q}} for one answer ``x`` (see the module docstring).
    ``probs``/``ids`` [n, TOP_K]: the teacher's top candidates before each of x's n tokens."""
    xe = tok(x, add_special_tokens=False, return_offsets_mapping=True)
    ue = tok(x.upper(), add_special_tokens=False, return_offsets_mapping=True)
    u, u_start = ue.input_ids, {s: j for j, (s, _) in enumerate(ue.offset_mapping)}
    special = set(tok.all_special_ids)
    out = {}
    for i, (start, end) in enumerate(xe.offset_mapping):
        j0 = u_start.get(start)
        span = upper_pieces(tok, cache, xe.input_ids[i])
        if j0 is None or tuple(u[j0: j0 + len(span)]) != span or (j0 + len(span) < len(u) and
                                                                   ue.offset_mapping[j0 + len(span)][0] != end):
            continue  # x_i's span is not spelt in U as x_i alone upper-cased: no soft target
        for k in range(len(span)):
            q: dict[int, float] = {}
            for p, v in zip(probs[i].tolist(), ids[i].tolist()):
                t = () if v in special else upper_pieces(tok, cache, v)
                if len(t) > k and t[:k] == span[:k]:
                    q[t[k]] = q.get(t[k], 0.0) + p
            mass = sum(q.values())
            if mass > 1e-3:
                out[j0 + k] = {w: m / mass for w, m in q.items()}
    return out


@torch.no_grad()
def build_examples(base, model, tok, rows: list[dict], max_len: int) -> list[tuple]:
    """(ids, labels, soft) per usable row: the student's chat (prompt + U) and its soft targets
    keyed by label position."""
    from nlora_serve.adapters.tune import IGNORE, encode

    cache, out = {}, {}
    examples = []
    for r in rows:
        x = r["response"]
        if len(x.upper()) != len(x):
            continue
        msgs = [{"role": "user", "content": r["prompt"]}]
        ctx = tok(tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False),
                  add_special_tokens=False).input_ids
        xids = tok(x, add_special_tokens=False).input_ids
        logits = model(input_ids=torch.tensor([ctx + xids])).logits[0, len(ctx) - 1: len(ctx) + len(xids) - 1]
        top = torch.softmax(logits.float(), -1).topk(TOP_K, -1)
        soft = soft_targets(tok, cache, x, top.values, top.indices)
        ids, labels = encode(tok, msgs + [{"role": "assistant", "content": x.upper()}], max_len)
        r0 = labels.index(next(t for t in labels if t != IGNORE))
        u = tok(x.upper(), add_special_tokens=False).input_ids
        if ids[r0: r0 + len(u)] != u:
            continue  # U does not tokenise alone as in the chat: skip rather than misalign
        examples.append((ids, labels, {r0 + j: q for j, q in soft.items() if r0 + j < len(ids)}))
    return examples


def collate_soft(items, pad_id: int, width_c: int = TOP_K):
    """tune.collate plus ``soft_ids``/``soft_p`` [B, T, C] (zeros where a label has no q)."""
    from nlora_serve.adapters.tune import collate

    batch = collate([(i, l) for i, l, _ in items], pad_id)
    b, t = batch["labels"].shape
    batch["soft_ids"] = torch.zeros(b, t, width_c, dtype=torch.int64)
    batch["soft_p"] = torch.zeros(b, t, width_c)
    for row, (_, _, soft) in enumerate(items):
        for pos, q in soft.items():
            top = sorted(q.items(), key=lambda kv: -kv[1])[:width_c]
            batch["soft_ids"][row, pos, : len(top)] = torch.tensor([w for w, _ in top])
            batch["soft_p"][row, pos, : len(top)] = torch.tensor([m for _, m in top])
    return batch


def distill_loss_sum(model, batch, lam: float) -> torch.Tensor:
    """Σ over labelled tokens of (1 - λ)·CE(label) + λ·CE(q) (hard CE alone where there is no q)."""
    from nlora_serve.adapters.tune import IGNORE

    hidden = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE
    logp = torch.log_softmax(model.lm_head(hidden[:, :-1][keep]).float(), -1)  # [K, vocab]
    hard = -logp.gather(1, targets[keep][:, None])[:, 0]
    sp, sid = batch["soft_p"][:, 1:][keep], batch["soft_ids"][:, 1:][keep]
    soft = -(sp * logp.gather(1, sid)).sum(-1)
    has = sp.sum(-1) > 0
    return torch.where(has, (1 - lam) * hard + lam * soft, hard).sum()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--data", nargs="+", default=["base.jsonl", "base_extra.jsonl"],
                        help="files of data/ with the base model's answers (default: %(default)s)")
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--lam", type=float, default=0.7, help="weight λ of the soft targets (default: %(default)s)")
    parser.add_argument("--lr", type=float, default=1e-2)
    parser.add_argument("--weight-decay", type=float, default=0.0)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--held-out", type=float, default=0.1)
    parser.add_argument("--save-at", type=int, nargs="*", default=[],
                        help="also write the tenant after these steps, to OUT-stepN (to compare step counts)")
    parser.add_argument("--cache", type=Path, default=None,
                        help="JSON file of the built examples (teacher targets): read when there, else written")
    args = parser.parse_args()
    return run(args)


def run(args) -> int:
    from tqdm import tqdm

    from nlora_serve.adapters.nystrom import init_adapter
    from nlora_serve.adapters.save import write_adapter
    from nlora_serve.adapters.tune import attach, cosine_schedule, num_targets, split, trained_adapter
    from nlora_serve.models import load_base, load_hf_model

    if (args.out / "adapter_config.json").exists():
        raise SystemExit(f"{args.out} already holds an adapter")
    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    base = load_base("default")
    model, tok = load_hf_model(base.path, torch.float32), base.tokenizer()
    rows = [{"prompt": r["prompt"], "response": short_answer(r["response"])}
            for f in args.data for r in read_jsonl(DATA / f)]
    t0 = time.perf_counter()
    if args.cache is not None and args.cache.exists():
        examples = [(i, l, {int(k): {int(w): m for w, m in q.items()} for k, q in s.items()})
                    for i, l, s in json.loads(args.cache.read_text())]
    else:
        examples = build_examples(base, model, tok, [r for r in rows if r["response"]], 192)
        if args.cache is not None:
            args.cache.write_text(json.dumps(examples))
    n_soft = sum(len(s) for _, _, s in examples)
    n_tok = sum(sum(t != -100 for t in l) for _, l, _ in examples)
    print(f"{len(examples)} examples, soft targets on {n_soft}/{n_tok} labels ({time.perf_counter() - t0:.0f} s)")
    start = init_adapter(base, rank=16, targets="all-linear", variant="nlora")
    modules = attach(model, start, "zeros")
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    train_set, held = split(examples, args.held_out, gen)
    held_b = [collate_soft(held[i: i + 8], pad) for i in range(0, len(held), 8)]

    @torch.no_grad()
    def held_loss(lam):
        return sum(float(distill_loss_sum(model, b, lam)) for b in held_b) / sum(num_targets(b) for b in held_b)

    print(f"held-out hard loss before {held_loss(0.0):.4f}")
    params = [m.N for m in modules.values()]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=args.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine_schedule(args.warmup, args.steps))
    t0 = time.perf_counter()
    bar = tqdm(range(args.steps), desc="distill", unit="step")
    step = 0
    while step < args.steps:
        order = torch.randperm(len(train_set), generator=gen).tolist()
        for i in range(0, len(order) - args.batch_size + 1, args.batch_size):
            if step >= args.steps:
                break
            batch = collate_soft([train_set[j] for j in order[i: i + args.batch_size]], pad)
            loss = distill_loss_sum(model, batch, args.lam) / max(1, num_targets(batch))
            loss.backward()
            opt.step()
            sched.step()
            opt.zero_grad(set_to_none=True)
            bar.update(1)
            bar.set_postfix(loss=f"{loss.item():.4f}")
            step += 1
            if step in args.save_at:
                write_adapter(trained_adapter(start, modules, base), f"{args.out}-step{step}", tied_form=True)
    seconds = time.perf_counter() - t0
    print(f"held-out hard loss after {held_loss(0.0):.4f}, mixed {held_loss(args.lam):.4f}; {seconds:.0f} s")
    write_adapter(trained_adapter(start, modules, base), args.out, tied_form=True)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
