"""Host time per decode step with a stub model (no GEMMs): what the engine's Python does per step.

Times, per step of S decode sequences (context ~200 tokens, 16-token blocks, 7 of every 8 on an
adapter: half on an IntTune tied pool, half on a LoRA pool):
  inputs   ModelRunner.prepare: step inputs packed and copied once (engine/step_inputs.py)
  adapters AdapterHook.begin_step + the device-side derivation of each pool's decode layout
  total    the two; the model itself is a stub (nothing else runs)
and, for comparison, the host-built AdapterBatch (the prefill form, the only form before).

``--device meta`` stands for a GPU: every op is dispatched and every buffer packed and "copied",
but no data moves, so the numbers are the host's share of a GPU step. ``--device cpu``: the CPU
engine's layout (no copy, gather tables included).

    python bench/step_host.py [--device meta|cpu] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time
from types import SimpleNamespace

import torch

from nlora_serve.engine.adapter_layer import AdapterHook
from nlora_serve.engine.model_runner import ModelRunner
from nlora_serve.engine.sampling import SamplingParams
from nlora_serve.engine.sequence import Sequence
from nlora_serve.engine.step_inputs import StepInputs
from nlora_serve.kernels.decode_batch import derive_decode_batch
from nlora_serve.kernels.metadata import TIED, build_adapter_batch

SIZES = (32, 64, 128, 256)
CONTEXT, BLOCK = 200, 16


def _pool(family: int) -> SimpleNamespace:
    """A stand-in pool with the facts the hook reads (no weights: the model is a stub)."""
    return SimpleNamespace(generation=0, rank=16, bias={}, slot_ranks=torch.full((64,), 16, dtype=torch.int32),
                           slot_scalings=torch.ones(64), slot_families=torch.full((64,), family, dtype=torch.int32))


def _pairs(n: int) -> list[tuple[Sequence, int]]:
    pools = (_pool(TIED), _pool(0))
    pools[1].slot_families = torch.arange(64, dtype=torch.int32)
    out = []
    for i in range(n):
        adapter = None if i % 8 == 7 else SimpleNamespace(pool=pools[i % 2], slot=i % 64)
        seq = Sequence(str(i), i, list(range(CONTEXT)), CONTEXT - 1, SamplingParams(max_tokens=64), None,
                       adapter=adapter)
        seq.num_computed_tokens = CONTEXT - 1
        seq.block_table = list(range(i * 13, i * 13 + 13))
        out.append((seq, 1))
    return out


def _runner(device: torch.device, hook: AdapterHook) -> ModelRunner:
    runner = ModelRunner.__new__(ModelRunner)  # the stub: no model, only the step-input side
    runner.device, runner.block_size, runner.adapter_hook = device, BLOCK, hook
    runner.inputs = StepInputs(BLOCK, 4, device, gather_layout=device.type == "cpu")
    return runner


def _time(fn, iters: int = 100, repeats: int = 5) -> float:
    """Best of ``repeats`` means of this thread's CPU time, in microseconds: on a shared machine the
    wall clock counts other processes' turns; the host work itself is the thread's CPU time."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.thread_time()
        for _ in range(iters):
            fn()
        best = min(best, (time.thread_time() - start) / iters)
    return best * 1e6


def measure(n: int, device: torch.device) -> dict:
    pairs = _pairs(n)
    hook = AdapterHook(triton=True)
    runner = _runner(device, hook)
    versions, lens = [s.adapter for s, _ in pairs], [1] * n

    def adapters():
        hook.begin_step(versions, lens, device)
        hook.bind_rows([r.to(device) for r in hook.step_rows()])
        for e in hook._decode:
            facts = hook._pool_facts(e.pool, device)
            derive_decode_batch(e.slots, facts.families, facts.scalings, 16, facts.has_tied, facts.has_group)

    def inputs():
        runner.prepare(pairs)

    slots = torch.tensor([-1 if v is None else v.slot for v in versions], dtype=torch.int32)
    pool = versions[0].pool
    host = _time(lambda: build_adapter_batch(slots, pool.slot_ranks, pool.slot_scalings, pool.slot_families))
    hook.begin_step(versions, lens, device)
    t_in = _time(inputs)
    t_ad = _time(adapters)
    return {"seqs": n, "inputs_us": round(t_in), "adapters_us": round(t_ad), "total_us": round(t_in + t_ad),
            "host_adapter_batch_us": round(host)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="meta", choices=("meta", "cpu"))
    parser.add_argument("--json", help="also write the rows here")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rows = [measure(n, torch.device(args.device)) for n in SIZES]
    print(f"device {args.device}: host time per decode step (µs), stub model")
    print("| seqs | inputs | adapters (device-derived) | total | host AdapterBatch (old form, 1 pool) |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['seqs']} | {r['inputs_us']} | {r['adapters_us']} | {r['total_us']} | {r['host_adapter_batch_us']} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)


if __name__ == "__main__":
    main()
