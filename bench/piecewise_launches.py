"""What piecewise CUDA graphs take off the host, counted on the CPU (issue 18).

One prefill step of 50 tokens (two prompts) on a random 30-layer tiny Llama (the default model's
layer count), our Triton path on CPU tensors under the interpreter, with prefill steps eager and
with piecewise graphs (the CPU seam, :class:`EagerCapture`). Counted outside graph replays: aten
ops dispatched (each a Python-to-C++ dispatch; most launch a kernel on a GPU) and Triton attention
launches; and the replays themselves. On a GPU each eager op costs host time (the H200's eager
prefill step of 2,048 tokens took ~30 ms, launch-bound), a replay costs one launch.
Prints a table and writes JSON (default bench/out/piecewise_launches.json).

    TRITON_INTERPRET=1 .venv/bin/python bench/piecewise_launches.py
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("TRITON_INTERPRET", "1")  # before any Triton kernel is defined
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests" / "engine"))  # tiny_llama

from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

from tiny_llama import make_tiny_llama  # noqa: E402
from nlora_serve.engine.runner import model_runner  # noqa: E402
from nlora_serve.engine.model.attention import cuda as triton_attention  # noqa: E402
from nlora_serve.engine.config import CacheConfig, EngineConfig, SchedulerConfig  # noqa: E402
from nlora_serve.engine.runner.cuda_graphs import EagerCapture  # noqa: E402
from nlora_serve.engine.llm_engine import LLMEngine  # noqa: E402
from nlora_serve.engine.sample.sampling import SamplingParams  # noqa: E402
from nlora_serve.models import resolve_model  # noqa: E402

COUNTS = {"aten_ops": 0, "triton_attention": 0, "graph_replays": 0}
_state = {"counting": False, "inside": 0}  # inside: nested in a replay or a Triton launch (not counted)


class _CountOps(TorchDispatchMode):
    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if _state["counting"] and not _state["inside"]:
            COUNTS["aten_ops"] += 1
        return func(*args, **(kwargs or {}))


def _counted(fn, kind: str):
    """``fn`` counted once as ``kind``; nothing it runs is counted."""
    def wrapped(*args, **kwargs):
        if _state["counting"] and not _state["inside"]:
            COUNTS[kind] += 1
        _state["inside"] += 1
        try:
            return fn(*args, **kwargs)
        finally:
            _state["inside"] -= 1
    return wrapped


class _Capture(EagerCapture):
    def capture(self, fn):
        replay, out = super().capture(fn)
        return _counted(replay, "graph_replays"), out


def _instrument() -> None:
    for name in ("paged_prefill_attention", "paged_decode_attention"):
        setattr(triton_attention, name, _counted(getattr(triton_attention, name), "triton_attention"))
    execute = model_runner.ModelRunner.execute

    def counted_execute(self, pairs, previous=None):
        _state["counting"] = True
        try:
            with _CountOps():
                return execute(self, pairs, previous)
        finally:
            _state["counting"] = False
    model_runner.ModelRunner.execute = counted_execute


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--layers", type=int, default=30)
    parser.add_argument("--out", default="bench/out/piecewise_launches.json")
    args = parser.parse_args()
    _instrument()
    rows = []
    with tempfile.TemporaryDirectory(prefix="nlora-launches-") as scratch:
        make_tiny_llama(Path(scratch) / "model", layers=args.layers)
        for piecewise in (False, True):
            config = EngineConfig(model=str(Path(scratch) / "model"), tokenizer=str(resolve_model("default")),
                                  device="cpu", kernel_backend="triton", async_scheduling=False,
                                  scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=64,
                                                            max_model_len=80),
                                  cache=CacheConfig(block_size=16, num_blocks=40))
            with LLMEngine(config) as engine:
                engine.core.runner.enable_graphs(8, _Capture(), capture_now=True,
                                                 piecewise_tokens=64 if piecewise else 0)
                COUNTS.update(dict.fromkeys(COUNTS, 0))
                engine.generate([[5] * 30, [7] * 20], SamplingParams(max_tokens=1, temperature=0.0))
            rows.append({"piecewise": piecewise, "layers": args.layers, **COUNTS})
    print(f"{'prefill step (50 tokens)':<26}{'eager aten ops':>15}{'Triton attention':>18}{'graph replays':>15}")
    for r in rows:
        print(f"{'piecewise' if r['piecewise'] else 'eager':<26}{r['aten_ops']:>15}{r['triton_attention']:>18}"
              f"{r['graph_replays']:>15}")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"rows": rows}, indent=2) + "\n")


if __name__ == "__main__":
    main()
