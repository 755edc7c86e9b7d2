"""Incremental detokenization cost per decode step: the window path vs DecodeStream (engine/detokenizer.py).

B requests each get one new token per step, as in the engine's ``_emit_token`` (``add`` for every
sequence of the step), for K steps; the token streams are the default tokenizer's encoding of a
mixed English / CJK / emoji text, each request starting at its own offset. Reports microseconds
per token per sequence and per step of B, CPU thread time (the machine may be shared), best of R.

    python bench/detokenizer.py --batch 64 256 --steps 64 --out bench/out/detokenizer.json
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from transformers import AutoTokenizer

from nlora_serve.engine.detokenizer import DecodeStream, IncrementalDetokenizer
from nlora_serve.models import resolve_model

TEXT = ("The quick brown fox jumps over the lazy dog; serving many adapters on one base model needs a fast "
        "host loop. 東京の天気は晴れです 🌸🎉 naïve café — 你好，世界！ "
        "Numbers: 3.14159, 2718, 1e-6. ")


def per_step(tokenizer, streams: list[list[int]], steps: int, fast: bool) -> float:
    """CPU seconds of one step: ``add`` of one token to each of the B detokenizers."""
    detoks = [IncrementalDetokenizer(tokenizer, fast=fast) for _ in streams]
    start = time.thread_time()
    for k in range(steps):
        for detok, ids in zip(detoks, streams):
            detok.add(ids[k])
    return (time.thread_time() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default")
    parser.add_argument("--batch", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--steps", type=int, default=64, help="tokens per request")
    parser.add_argument("--rounds", type=int, default=3, help="best of this many runs")
    parser.add_argument("--out", default="bench/out/detokenizer.json")
    args = parser.parse_args()
    tokenizer = AutoTokenizer.from_pretrained(resolve_model(args.model))
    if DecodeStream is None:
        print("this tokenizers has no DecodeStream: both rows time the window path")
    ids = tokenizer.encode(TEXT * 8, add_special_tokens=False)
    rows = []
    for b in args.batch:
        streams = [(ids[i % 50:] + ids)[:args.steps] for i in range(b)]
        row = {"batch": b}
        for name, fast in (("window", False), ("decode_stream", True)):
            step_s = min(per_step(tokenizer, streams, args.steps, fast) for _ in range(args.rounds))
            row[name] = {"step_us": step_s * 1e6, "us_per_token": step_s * 1e6 / b}
        rows.append(row)
        print(f"B={b}: window {row['window']['us_per_token']:.1f} us/token ({row['window']['step_us'] / 1e3:.2f} "
              f"ms/step), DecodeStream {row['decode_stream']['us_per_token']:.1f} us/token "
              f"({row['decode_stream']['step_us'] / 1e3:.2f} ms/step)", flush=True)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"workload": vars(args), "results": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
