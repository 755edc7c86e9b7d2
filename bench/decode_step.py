"""Our decode step against a lean plain-torch decode step of the same shape, timed in one run.

For each batch size B: B requests with P-token prompts go into one :class:`EngineCore`; once all are
decoding, K more ``core.step()`` calls are timed (wall clock, device synchronised at both ends): the
steady-state time per loop iteration with all host work included (scheduling, step inputs, graph
replay or eager forward, sampling, detokenization): ``ours`` with async scheduling (step n+1
launched before step n's tokens are read back; the default on CUDA) and ``ours_sync`` without it
(each step's tokens read back before the next is scheduled), side by side; ``eager`` with
``enforce_eager=True`` (and the device's default scheduling). The floor (issue 18): the same model
shape as plain torch, a static [B, P + K] KV cache per layer, SDPA, greedy argmax, the whole step in
one CUDA graph, timed by replaying it. Random (dummy) weights: timing only.

    python bench/decode_step.py --device cuda --model bench/models/smollm2-135m --batch 64 256 \
        --out bench/out/decode_step.json
    python bench/decode_step.py --device cpu --batch 4 --steps 3 --layers 2   # the logic, here
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from nlora_serve.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from nlora_serve.engine.core import EngineCore
from nlora_serve.engine.sample.sampling import SamplingParams

from step_profile import profile_steps  # bench/step_profile.py (run this script from the repo root)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
PROFILED_STEPS = 10  # steps under torch.profiler per measurement (after the timed ones)


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def ours(model: str, dtype: torch.dtype, device: str, batch: int, prompt: int, steps: int, eager: bool,
         profile: bool = False, overlap: bool | None = None) -> dict:
    """Seconds per ``core.step()`` with ``batch`` sequences decoding, and the graph-replayed share;
    ``profile``: then a profiler breakdown of a few more steps (bench/step_profile.py);
    ``overlap``: EngineConfig.async_scheduling (None: the device's default)."""
    max_len = prompt + steps + 8 + PROFILED_STEPS + 1
    config = EngineConfig(model=model, dtype=dtype, device=device, load_format="dummy", enforce_eager=eager,
                          async_scheduling=overlap,
                          scheduler=SchedulerConfig(max_num_seqs=batch, max_num_batched_tokens=max(2048, batch),
                                                    max_model_len=max_len),
                          cache=CacheConfig(block_size=16, num_blocks=batch * -(-max_len // 16)))
    core = EngineCore(config)
    gen = torch.Generator().manual_seed(0)
    new = steps + 6 + PROFILED_STEPS + 1
    params = SamplingParams(max_tokens=new, min_tokens=new, temperature=0.0, ignore_eos=True)
    for i in range(batch):
        core.add(f"r{i}", torch.randint(100, core.vocab_size, (prompt,), generator=gen).tolist(), params)
    while core.stats()["generation_tokens"] < 3 * batch:  # prefill done and a couple of decodes (captures)
        core.step()
    _sync(device)
    before = dict(core.stats())
    start = time.perf_counter()
    for _ in range(steps):
        core.step()
    _sync(device)
    seconds = (time.perf_counter() - start) / steps
    after = core.stats()
    graphed = after["graph_steps"] - before["graph_steps"]
    result = {"step_s": seconds, "tok_per_s": batch / seconds, "graph_share_timed": graphed / steps,
              "async_scheduling": config.async_scheduling,
              "graph_steps": after["graph_steps"], "eager_steps": after["eager_steps"]}
    if profile:  # after the timed steps: the profiler's overhead stays out of step_s
        result["profile"] = profile_steps(core.step, device, PROFILED_STEPS)
    return result


class LeanDecode:
    """A plain-torch Llama decode step over a static KV cache (the floor): one token per sequence."""

    def __init__(self, cfg: dict, batch: int, max_len: int, dtype: torch.dtype, device: str) -> None:
        g = torch.Generator(device=device).manual_seed(0)
        h, self.heads, self.kv = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"]
        self.hd = cfg.get("head_dim") or h // self.heads
        inter, vocab = cfg["intermediate_size"], cfg["vocab_size"]

        def w(*shape):
            return (torch.randn(*shape, generator=g, device=device) * 0.02).to(dtype)

        self.layers = [(w((self.heads + 2 * self.kv) * self.hd, h), w(h, self.heads * self.hd), w(2 * inter, h),
                        w(h, inter)) for _ in range(cfg["num_hidden_layers"])]
        self.embed = w(vocab, h)
        self.norm = torch.ones(h, device=device)
        self.cache = torch.zeros(cfg["num_hidden_layers"], 2, batch, self.kv, max_len, self.hd, dtype=dtype,
                                 device=device)
        self.ids = torch.zeros(batch, dtype=torch.long, device=device)
        self.pos = torch.zeros((), dtype=torch.long, device=device)
        self.keys = torch.arange(max_len, device=device)
        inv = 1.0 / 10000 ** (torch.arange(0, self.hd, 2, device=device).float() / self.hd)
        ang = torch.outer(torch.arange(max_len, device=device).float(), inv)
        self.cos, self.sin = torch.cat((ang, ang), -1).cos(), torch.cat((-ang.sin(), ang.sin()), -1)

    def _rope(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        return (x.float() * cos + torch.cat((x[..., half:], x[..., :half]), -1).float() * sin).to(x.dtype)

    def step(self) -> torch.Tensor:
        b, hd = self.ids.shape[0], self.hd
        x = F.embedding(self.ids, self.embed).float()
        cos, sin = self.cos.index_select(0, self.pos.view(1)), self.sin.index_select(0, self.pos.view(1))
        mask = (self.keys <= self.pos).view(1, 1, 1, -1)
        for (wqkv, wo, wgu, wd), kv in zip(self.layers, self.cache):
            qkv = F.linear(F.rms_norm(x, x.shape[-1:], self.norm).to(wqkv.dtype), wqkv)
            q = self._rope(qkv[:, : self.heads * hd].view(b, self.heads, hd), cos, sin)
            k = self._rope(qkv[:, self.heads * hd:(self.heads + self.kv) * hd].view(b, self.kv, hd), cos, sin)
            v = qkv[:, (self.heads + self.kv) * hd:].view(b, self.kv, hd)
            kv[0].index_copy_(2, self.pos.view(1), k.unsqueeze(2))
            kv[1].index_copy_(2, self.pos.view(1), v.unsqueeze(2))
            o = F.scaled_dot_product_attention(q.unsqueeze(2), kv[0], kv[1], attn_mask=mask, enable_gqa=True)
            x = x + F.linear(o.reshape(b, -1), wo)
            gate, up = F.linear(F.rms_norm(x, x.shape[-1:], self.norm).to(wgu.dtype), wgu).chunk(2, -1)
            x = x + F.linear(F.silu(gate) * up, wd)
        logits = F.linear(F.rms_norm(x, x.shape[-1:], self.norm).to(self.embed.dtype), self.embed)
        return logits.argmax(-1)


def lean(cfg: dict, dtype: torch.dtype, device: str, batch: int, ctx: int, steps: int, profile: bool = False) -> dict:
    """Seconds per replay of the lean step captured as one CUDA graph (eager off CUDA)."""
    model = LeanDecode(cfg, batch, ctx + 8, dtype, device)
    model.pos.fill_(ctx)
    run = model.step
    if device.startswith("cuda"):
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            for _ in range(2):
                model.step()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            model.step()
        run = graph.replay
    run()
    _sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        run()
    _sync(device)
    seconds = (time.perf_counter() - start) / steps
    result = {"step_s": seconds, "tok_per_s": batch / seconds}
    if profile:
        result["profile"] = profile_steps(run, device, PROFILED_STEPS)
    return result


def _print_profile(batch: int, row: dict) -> None:
    for name in ("lean", "ours"):
        p = row[name]["profile"]
        if "error" in p:
            print(f"B={batch} {name}: profiler failed: {p['error']}")
            continue
        dev = f"{p['device_ms_per_step']:.3f}" if p["device_ms_per_step"] is not None else "-"
        print(f"B={batch} {name}: wall {p['wall_ms_per_step']:.3f} ms/step (profiled), "
              f"host {p['host_ms_per_step']:.3f},"
              f" device busy {dev}")
        for k in p["top"]:
            print(f"    {k['share']:6.1%} {k['ms_per_step']:.4f} ms x{k['calls_per_step']:.0f}  {k['name'][:90]}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="bench/models/smollm2-135m", help="a model directory with config.json")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--dtype", choices=list(DTYPES), default="bfloat16")
    parser.add_argument("--batch", type=int, nargs="+", default=[64, 256])
    parser.add_argument("--prompt-len", type=int, default=128)
    parser.add_argument("--steps", type=int, default=50, help="timed steps per measurement")
    parser.add_argument("--layers", type=int, default=None, help="override num_hidden_layers (CPU logic runs)")
    parser.add_argument("--no-profile", dest="profile", action="store_false",
                        help="skip the torch.profiler breakdown of our graphed step and the lean one")
    parser.add_argument("--out", default="bench/out/decode_step.json")
    args = parser.parse_args()
    dtype = DTYPES[args.dtype]
    cfg = json.loads((Path(args.model) / "config.json").read_text())
    with tempfile.TemporaryDirectory(prefix="nlora-decode-") as scratch:
        model = args.model
        if args.layers is not None:
            cfg["num_hidden_layers"] = args.layers
            model = str(Path(scratch) / "model")
            Path(model).mkdir()
            for f in Path(args.model).iterdir():
                if f.is_file():
                    (Path(model) / f.name).write_bytes(f.read_bytes())
            (Path(model) / "config.json").write_text(json.dumps(cfg))
        rows = []
        for b in args.batch:
            row = {"batch": b, "lean": lean(cfg, dtype, args.device, b, args.prompt_len, args.steps, args.profile),
                   "ours": ours(model, dtype, args.device, b, args.prompt_len, args.steps, eager=False,
                                profile=args.profile, overlap=True),
                   "ours_sync": ours(model, dtype, args.device, b, args.prompt_len, args.steps, eager=False,
                                     overlap=False),
                   "eager": ours(model, dtype, args.device, b, args.prompt_len, args.steps, eager=True)}
            row["ours_vs_lean"] = row["ours"]["step_s"] / row["lean"]["step_s"]
            row["sync_vs_lean"] = row["ours_sync"]["step_s"] / row["lean"]["step_s"]
            row["eager_vs_lean"] = row["eager"]["step_s"] / row["lean"]["step_s"]
            rows.append(row)
            print(json.dumps(row), flush=True)
            if args.profile:
                _print_profile(b, row)
            _write(args, rows)  # after every batch: a run cut short by its time limit keeps what it measured
    print(f"\n{args.dtype}, prompt {args.prompt_len}, {args.steps} timed steps")
    print("| B | lean graph ms | ours ms (graphs) | ours / lean | async | ours ms, async off | off / lean "
          "| graph share | ours eager ms | eager / lean |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['batch']} | {r['lean']['step_s'] * 1e3:.3f} | {r['ours']['step_s'] * 1e3:.3f} | "
              f"{r['ours_vs_lean']:.2f}x | {r['ours']['async_scheduling']} | {r['ours_sync']['step_s'] * 1e3:.3f} | "
              f"{r['sync_vs_lean']:.2f}x | {r['ours']['graph_share_timed']:.2f} | {r['eager']['step_s'] * 1e3:.3f} | "
              f"{r['eager_vs_lean']:.2f}x |")


def _write(args: argparse.Namespace, rows: list[dict]) -> None:
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"workload": vars(args), "results": rows}, indent=1) + "\n")


if __name__ == "__main__":
    main()
