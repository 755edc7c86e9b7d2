"""The native CPU adapter ops inside the engine, call by call (issue 22).

Runs bench/cpu_breakdown.py's workload (DESIGN §9: 64 requests × 128-token prompts × 64 new
tokens, greedy) for one tenant mix and times every call of the native tied and group ops and of
the adapter hook around them, by step kind (prefill / decode) and fused projection width (576: o
and down, 960: q/k/v, 3072: gate/up on the default model), and the layer ops that add a tied
delta deferred to them (SiLU · up, add + RMSNorm, add, RoPE; kernels/cpu/layer_ops.py) with and without one,
over the timed run only. ``--no-defer`` makes the tied op add every delta itself (the A/B of the
deferral; ``--mix none`` gives the layer ops' own times). In the engine
an op finds its inputs cold (the base GEMMs stream the weights between two calls), so its time
here is what a step pays, unlike an isolated loop over warm inputs. Wall-clock timers, ~1 µs a
call; run with the box quiet.

    .venv/bin/python bench/adapter_ops.py --mix lora8 --dtype bfloat16
    .venv/bin/python bench/adapter_ops.py --mix tied64 --dtype float32 [--no-defer]
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

import torch

import nlora_serve.engine.model.adapter_layer as adapter_layer
import nlora_serve.kernels.cpu.layer_ops as layer_ops
import nlora_serve.kernels.cpu.native as native
from nlora_serve.engine.llm_engine import LLMEngine
from nlora_serve.engine.threads import threads_for_engine

sys.path.insert(0, str(Path(__file__).parent))
import cpu_breakdown  # noqa: E402  (bench/cpu_breakdown.py)
import wall_timers  # noqa: E402
from tenants import MIXES  # noqa: E402

SECONDS: collections.Counter = collections.Counter()  # (kind, op, width) -> seconds
CALLS: collections.Counter = collections.Counter()
STATE = {"kind": "prefill", "on": False}


def timed(op: str, fn, width):
    """``fn`` timed under (step kind, op, width(args)) while the timed run is on."""
    def record(seconds: float, *args) -> None:
        if STATE["on"]:
            key = (STATE["kind"], op, width(*args))
            SECONDS[key] += seconds
            CALLS[key] += 1
    return wall_timers.timed(fn, record)


def instrument() -> None:
    ops = native.NativeOps
    init = ops.__init__

    def recording_init(self, lib):  # which bf16 path the engine's ops took (cpu/amx.h)
        init(self, lib)
        STATE["amx"] = self.amx

    ops.__init__ = recording_init
    ops.tied_apply = timed("tied op", ops.tied_apply, lambda self, y, batch, plan, *a: plan.width)
    ops.group_apply = timed("group op", ops.group_apply, lambda self, y, x, batch, plan: plan.width)
    hook = adapter_layer.AdapterHook
    hook.__call__ = timed("hook (op included)", hook.__call__, lambda self, x, y, *a, **k: y.shape[1])
    # the layer ops that add a deferred tied delta (kernels/cpu/layer_ops.py), by whether they got one
    layer = layer_ops.LayerOps
    for name, tied_at in (("silu_mul", 2), ("add_rms_norm", 6), ("add", 3), ("rope", 5)):
        setattr(layer, name, timed(name, getattr(layer, name),
                                   lambda self, *a, _at=tied_at: "+ tied delta" if len(a) >= _at and a[_at - 1] is not None
                                   else "-"))
    begin = timed("begin_step (metadata)", hook.begin_step, lambda *a: "-")

    def begin_step(self, versions, query_lens, device):
        STATE["kind"] = "decode" if all(n == 1 for n in query_lens) else "prefill"
        return begin(self, versions, query_lens, device)

    hook.begin_step = begin_step
    generate, calls = LLMEngine.generate, [0]

    def counted(self, *args, **kwargs):  # cpu_breakdown.run: a warm-up call, then the timed one
        calls[0] += 1
        STATE["on"] = calls[0] % 2 == 0
        return generate(self, *args, **kwargs)

    LLMEngine.generate = counted


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--dtype", choices=["float32", "bfloat16"], default="bfloat16")
    parser.add_argument("--mix", choices=MIXES, default="lora8")
    parser.add_argument("--no-defer", action="store_true",
                        help="tied deltas added by the tied op, not by the layer ops reading the output (A/B)")
    args = parser.parse_args()
    run_args = argparse.Namespace(num_requests=64, prompt_len=128, max_tokens=64, budget=2048, seed=0)
    instrument()
    if args.no_defer:
        adapter_layer.AdapterHook.defers_tied = property(lambda self: False)
    with threads_for_engine() as threads:
        result = cpu_breakdown.run("default", getattr(torch, args.dtype), args.mix, run_args)
    steps = result["steps"]
    print(f"{args.mix}, {args.dtype}, {threads} threads, AMX tiles {'on' if STATE.get('amx') else 'off'}: "
          f"{result['tok_per_s']:.1f} tok/s, "
          f"{steps.get('prefill', 0)} prefill / {steps.get('decode', 0)} decode steps")
    print("| step kind | part | width | calls | µs a call | ms a step |")
    print("|---|---|---|---|---|---|")
    for (kind, op, width), seconds in sorted(SECONDS.items()):
        n = CALLS[kind, op, width]
        print(f"| {kind} | {op} | {width} | {n} | {seconds / n * 1e6:.1f} | {seconds / max(steps.get(kind, 1), 1) * 1e3:.2f} |")


if __name__ == "__main__":
    main()
