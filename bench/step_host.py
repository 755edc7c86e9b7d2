"""Host time per decode step with a stub model (no GEMMs): what the engine's Python does per step.

Times, per step of S decode sequences (context ~200 tokens, 16-token blocks, 7 of every 8 on an
adapter: half on an IntTune tied pool, half on a LoRA pool):
  inputs   ModelRunner.prepare: step inputs packed and copied once (engine/runner/step_inputs.py)
  adapters AdapterHook.begin_step + the device-side derivation of each pool's decode layout
  total    the two; the model itself is a stub (nothing else runs)
and, for comparison, the host-built AdapterBatch (the prefill form, the only form before).

``--loop``: instead, the whole ``EngineCore.step()`` (scheduling, step inputs, sampling, read-back,
stop checks, detokenizing, emitting) with the model a stub that returns [R, 128] random logits (a
small vocabulary, so what the CPU computes in sampling stays small: on a GPU it is device work; ids
< 128 detokenize as real tokens), on the CPU, step by step and with async scheduling. Columns:
``step`` the thread's CPU time per call; ``read-back`` the part spent reading a step's tokens back
and emitting them (``_settle``: with async scheduling this part runs while the device computes the
next step, so only ``step - read-back`` is left on the critical path of a GPU step), and three
parts of that critical path: ``schedule`` (Scheduler.schedule), ``inputs`` (ModelRunner.prepare)
and ``sample`` (sample_step: sampling and starting the read-back).

``--policy fair`` (with ``--loop``): the fair scheduler and its per-tenant KV cache sharing
(engine/scheduling/cache_shares.py), the requests spread over 8 tenants.

``--device meta`` stands for a GPU: every op is dispatched and every buffer packed and "copied",
but no data moves, so the numbers are the host's share of a GPU step. ``--device cpu``: the CPU
engine's layout (no copy, gather tables included).

    python bench/step_host.py [--device meta|cpu] [--json out.json]
    python bench/step_host.py --loop [--policy fcfs|fair] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import time
from types import SimpleNamespace

import torch

from nlora_serve.engine.model.adapter_layer import AdapterHook
from nlora_serve.engine.runner.model_runner import ModelRunner
from nlora_serve.engine.sample.sampling import SamplingParams
from nlora_serve.engine.scheduling.sequence import Sequence
from nlora_serve.engine.runner.step_inputs import StepInputs
from nlora_serve.kernels.triton_ops.per_token_batch import derive_per_token_batch
from nlora_serve.kernels.metadata import TIED, build_adapter_batch

SIZES = (32, 64, 128, 256)
CONTEXT, BLOCK = 200, 16


class _StandInPool(SimpleNamespace):
    """A SimpleNamespace the hook can key its caches by, weakly, as it does a pool (by identity)."""

    __eq__ = object.__eq__
    __hash__ = object.__hash__


def _pool(family: int) -> SimpleNamespace:
    """A stand-in pool with the facts the hook reads (no weights: the model is a stub)."""
    return _StandInPool(generation=0, rank=16, bias={}, slot_ranks=torch.full((64,), 16, dtype=torch.int32),
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
        for e in hook._per_token:
            facts = hook._pool_facts(e.pool, device)
            derive_per_token_batch(e.slots, facts.families, facts.scalings, 16, facts.has_tied, facts.has_group,
                                   slot_ranks=facts.ranks if facts.has_group else None)

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


class _StubRunner(ModelRunner):
    """The model runner with the model cut out: real step inputs, random logits."""

    def __init__(self, vocab: int) -> None:  # noqa: D107 (no ModelRunner.__init__: no model)
        self.device, self.block_size, self.adapter_hook, self.graphs = torch.device("cpu"), BLOCK, None, None
        self.pieces = None
        self.inputs = StepInputs(BLOCK, 1, self.device, gather_layout=False)
        self.step_counts = {"graph_steps": 0, "piecewise_steps": 0, "eager_steps": 0}
        self.logits = torch.randn(4096, vocab, generator=torch.Generator().manual_seed(0))

    def execute(self, pairs, previous=None, scored=None):  # scored: prompt logprobs' rows, none here
        self.prepare(pairs, *([previous] if previous is not None else []))
        rows = sum(1 for s, n in pairs if s.num_computed_tokens + n == s.num_tokens)
        return self.logits[:rows].clone()


def _stub_core(n: int, overlap: bool | None, policy: str = "fcfs"):
    """An EngineCore around :class:`_StubRunner` with ``n`` requests decoding (``overlap`` None: a
    checkout from before async scheduling), 8 tenants' under ``policy`` "fair"."""
    from transformers import AutoTokenizer

    from nlora_serve.engine.config import CacheConfig, EngineConfig, SchedulerConfig
    from nlora_serve.engine.core import EngineCore
    from nlora_serve.engine.eos import EosTokens

    fields = {} if overlap is None else {"async_scheduling": overlap}
    core = EngineCore.__new__(EngineCore)
    core.config = EngineConfig(device="cpu", scheduler=SchedulerConfig(n, n * CONTEXT, 4096, policy=policy),
                               cache=CacheConfig(BLOCK, n * 20), **fields)
    core.device, core.vocab_size, core.eos_ids = torch.device("cpu"), 128, set()
    core.eos = EosTokens(None, frozenset())
    core.tokenizer = AutoTokenizer.from_pretrained("bench/models/smollm2-135m")
    core.runner, core.adapters, core.hook, core.requests = _StubRunner(128), None, AdapterHook(), {}
    core.reset_scheduling(n * 20)
    params = SamplingParams(max_tokens=90, min_tokens=90, temperature=0.0, ignore_eos=True)
    for i in range(n):
        core.add(f"r{i}", [(7 * i + j) % 120 + 1 for j in range(CONTEXT)], params,
                 tenant=f"t{i % 8}" if policy == "fair" else None)
    for _ in range(3):  # prefill, then the first decodes
        core.step()
    return core


def _timer(owner, name: str, spent: dict[str, float], label: str) -> None:
    """Wrap ``owner.name`` so its thread time adds up in ``spent[label]``."""
    inner = getattr(owner, name)

    def timed(*args, **kwargs):
        start = time.thread_time()
        try:
            return inner(*args, **kwargs)
        finally:
            spent[label] = spent.get(label, 0.0) + time.thread_time() - start

    setattr(owner, name, timed)


def measure_loop(n: int, overlap: bool | None, steps: int = 40, policy: str = "fcfs") -> dict:
    import nlora_serve.engine.core as core_module

    core, spent = _stub_core(n, overlap, policy), {}
    _timer(core, "_settle" if overlap is not None else "_emit", spent, "readback")
    _timer(core.scheduler, "schedule", spent, "schedule")
    _timer(core.runner, "prepare", spent, "inputs")
    sample_step = getattr(core_module, "sample_step", None)
    if sample_step is not None:  # a checkout from before engine/sample/step_output.py has none
        _timer(core_module, "sample_step", spent, "sample")
    try:
        start = time.thread_time()
        for _ in range(steps):
            core.step()
        total = (time.thread_time() - start) / steps * 1e6
    finally:
        if sample_step is not None:
            core_module.sample_step = sample_step
    part = {k: round(v / steps * 1e6) for k, v in spent.items()}
    mode = "before (main)" if overlap is None else ("async" if overlap else "step by step")
    return {"seqs": n, "mode": mode, "policy": policy, "step_us": round(total), "readback_us": part["readback"],
            "critical_us": round(total) - part["readback"], "schedule_us": part["schedule"],
            "inputs_us": part["inputs"], "sample_us": part.get("sample", 0)}


def main_loop(modes: list[bool | None], out: str | None, policy: str = "fcfs") -> None:
    rows = [measure_loop(n, m, policy=policy) for n in SIZES for m in modes]
    print(f"host CPU time per EngineCore.step() (µs), stub model, CPU, policy {policy}")
    print("| seqs | mode | step | read-back + emit | step − read-back | of which: schedule | inputs | sample |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['seqs']} | {r['mode']} | {r['step_us']} | {r['readback_us']} | {r['critical_us']} "
              f"| {r['schedule_us']} | {r['inputs_us']} | {r['sample_us']} |")
    if out:
        with open(out, "w") as f:
            json.dump(rows, f, indent=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="meta", choices=("meta", "cpu"))
    parser.add_argument("--json", help="also write the rows here")
    parser.add_argument("--loop", action="store_true", help="time the whole EngineCore.step (see above)")
    parser.add_argument("--policy", default="fcfs", choices=("fcfs", "fair"), help="--loop: the scheduling policy")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.loop:
        from nlora_serve.engine.config import EngineConfig
        before = "async_scheduling" not in EngineConfig.__dataclass_fields__
        return main_loop([None] if before else [False, True], args.json, args.policy)
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
