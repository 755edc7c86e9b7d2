"""What structured outputs cost the engine: grammar compile time, and the sampling part of a decode
step (engine/sample/step_output.sample_step) with 0, 1 and every row under a grammar.

Rows are B greedy decode sequences on the default model's full vocabulary (random [B, V] logits: the
model itself is not run, its cost does not change); a constrained row's matcher sits inside a JSON
object of a typical schema (after ``{"name": "``), so each fill walks a string state. ``mask`` is
the grammar part alone (bitmask fill on the host + xgrammar's apply), ``sample`` the whole
sample_step; medians of ``--steps`` calls, milliseconds: on the CPU the calling thread's CPU time
with one torch thread (host cost, robust on a shared machine), on CUDA wall time. Compile times: the vocabulary read once
(``first_compile``, with a one-line regex), a typical schema cold and cached, a regex, a 4-way choice.

    python bench/structured_step.py [--device cpu|cuda] [--batch 1 16 64] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time

import torch

from nlora_serve.engine.eos import eos_tokens
from nlora_serve.engine.sample.sampling import SamplingParams
from nlora_serve.engine.scheduling.sequence import Sequence
from nlora_serve.engine.sample.step_output import sample_step
from nlora_serve.engine.structured_output.grammar_compiler import GrammarCompiler
from nlora_serve.engine.structured_output.structured import StructuredOutputs, mask_rows
from nlora_serve.models import load_base, resolve_model

SCHEMA = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"},
                                            "email": {"type": "string"}, "tags": {"type": "array",
                                                                                  "items": {"type": "string"}}},
          "required": ["name", "age"]}


def _ms(fn, steps: int, sync, clock) -> float:
    fn()  # warm: first calls allocate and build caches
    times = []
    for _ in range(steps):
        sync()
        start = clock()
        fn()
        sync()
        times.append((clock() - start) * 1e3)
    return statistics.median(times)


def compile_times(grammars: GrammarCompiler) -> dict[str, float]:
    out = {}
    for name, spec in [("first_compile", StructuredOutputs(regex="[0-9]+")),  # reads the vocabulary
                       ("schema_cold", StructuredOutputs(json=json.dumps(SCHEMA))),
                       ("schema_cached", StructuredOutputs(json=json.dumps(SCHEMA))),
                       ("regex", StructuredOutputs(regex=r"[a-z]{2,8}@[a-z]{2,6}\.(com|org)")),
                       ("choice", StructuredOutputs(choice=("Paris", "London", "Berlin", "Madrid")))]:
        start = time.perf_counter()
        grammars.compile(spec)
        out[name] = (time.perf_counter() - start) * 1e3
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--batch", type=int, nargs="+", default=[1, 16, 64])
    parser.add_argument("--steps", type=int, default=30)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    device = torch.device(args.device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    clock = time.perf_counter if device.type == "cuda" else time.thread_time
    if device.type == "cpu":
        torch.set_num_threads(1)
    base = load_base(str(resolve_model("default")), torch.float32)
    vocab = base.spec.vocab_size
    eos = eos_tokens(base.path, "auto", base.tokenizer().eos_token_id, vocab)
    grammars = GrammarCompiler(base.tokenizer(), vocab, set(eos.all))
    result = {"device": str(device), "clock": clock.__name__, "vocab": vocab, "compile_ms": compile_times(grammars), "steps": []}
    spec = StructuredOutputs(json=json.dumps(SCHEMA))
    prefix = base.tokenizer()('{"name": "')["input_ids"]
    shared = torch.Generator(device).manual_seed(0)
    print(f"device {device}, vocab {vocab}; compile (ms): "
          + ", ".join(f"{k} {v:.1f}" for k, v in result["compile_ms"].items()))
    print(f"{'batch':>5} {'constrained':>11} {'mask ms':>8} {'sample ms':>9}")
    for batch in args.batch:
        for constrained in sorted({0, 1, batch}):
            seqs = [Sequence(str(i), i, [1, 2, 3], 2, SamplingParams(max_tokens=64, temperature=0.0)) for i in range(batch)]
            for seq in seqs[:constrained]:
                seq.matcher = grammars.matcher(spec)
                assert all(seq.matcher.accept_token(t) for t in prefix)
            logits = torch.randn(batch, vocab, device=device)
            pairs = [(s, 1) for s in seqs]
            rows = list(range(constrained))
            mask = _ms(lambda: mask_rows(logits.clone(), rows, [s.matcher for s in seqs[:constrained]]),
                       args.steps, sync, clock) if constrained else 0.0

            def step():
                sample_step(logits.clone(), pairs, seqs, [set()] * batch, shared).read()
            whole = _ms(step, args.steps, sync, clock)
            result["steps"].append({"batch": batch, "constrained": constrained, "mask_ms": mask, "sample_ms": whole})
            print(f"{batch:>5} {constrained:>11} {mask:>8.2f} {whole:>9.2f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1)


if __name__ == "__main__":
    main()
