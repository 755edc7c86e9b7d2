"""Engine warm-up before the first request (vLLM's dummy runs and graph captures at start-up).

Triton compiles a kernel once per specialisation (dtypes, constexprs, and each integer argument
sorted into == 1, divisible by 16, or neither), and the first use of a shape costs cuBLAS
heuristics and allocator growth. Serving must not pay these inside a request's TTFT, so on CUDA
the engine runs a few dummy requests through its real step loop first: prefills of 1, 16 and 17
tokens packed into one step; decodes of three sequences; a prompt longer than the chunked-prefill
budget (a full-budget chunk, then a chunk over cached context) beside a new short prompt (a mixed
decode + prefill step). Each request runs on the base model or, given adapter versions, on each
of them in turn (one per adapter pool kind covers that kind's kernels). The second request of each
round samples with every option at once (min-p, top-k, top-p, 20 logprobs, penalties, a logit bias:
:data:`SAMPLED`), the others are greedy, so a step's mixed greedy and sampled rows run once; then the
sampler's worst case runs on ``max_num_seqs`` rows (engine/runner/dummy_sampler.py, with the grammar bitmask
on CUDA), as vLLM's dummy sampler run after its captures, so neither the sampled path's kernels nor
the allocator's growth to its largest shapes fall on a live request. On adapters, every decode
graph size and piecewise bucket of each adapter's pool is captured too (:func:`capture_adapter_graphs`).
Then every other trace is removed: the dummy requests retire (their KV blocks are freed), the block
manager and scheduler are built anew (the prefix cache forgets the dummy prompts) and the counters
start at zero.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field

import torch

from nlora_serve.engine.runner.dummy_sampler import WORST_CASE, dummy_sampler_run
from nlora_serve.engine.sample.sampling import SamplingParams

log = logging.getLogger(__name__)

DUMMY_TOKEN = 100  # clear of the low ids where tokenizers keep their special tokens
GREEDY = SamplingParams(max_tokens=3, min_tokens=3, temperature=0.0, ignore_eos=True)
SAMPLED = SamplingParams(max_tokens=3, min_tokens=3, ignore_eos=True, seed=0, temperature=WORST_CASE.temperature,
                         top_k=WORST_CASE.top_k, top_p=WORST_CASE.top_p, min_p=WORST_CASE.min_p,
                         logprobs=WORST_CASE.logprobs, repetition_penalty=WORST_CASE.repetition_penalty,
                         presence_penalty=WORST_CASE.presence_penalty, frequency_penalty=WORST_CASE.frequency_penalty,
                         logit_bias=WORST_CASE.logit_bias)


@dataclass(slots=True)
class WarmupReport:
    """What a warm-up ran (for the start-up log line and the tests)."""

    seconds: float = 0.0  # wall time of the whole warm-up
    step_tokens: list[int] = field(default_factory=list)  # tokens computed in each step, in order
    graph_steps: int = 0  # steps that replayed a decode graph
    piecewise_steps: int = 0  # prefill and mixed steps that replayed piecewise graphs (EngineConfig.piecewise_graphs)
    eager_steps: int = 0  # steps that ran eagerly (prefill, mixed, or graphs off)
    sampler_rows: int = 0  # rows of the dummy sampler run (max_num_seqs)
    adapter_graphs: int = 0  # graphs captured for the adapters' pools beyond those the steps captured


def warmup_rounds(budget: int, max_model_len: int, num_blocks: int, block_size: int) -> list[list[int]]:
    """Prompt lengths of the dummy requests, one list per round (a round's requests run together).

    ``budget``: the per-step token budget; ``max_model_len``: tokens per sequence at most; the KV
    cache holds ``num_blocks`` blocks of ``block_size`` tokens (at least one whole sequence, see
    EngineConfig.check_capacity). Every request leaves room for 3 new tokens; a round that would
    not fit in the cache at once is cut down (no preemption during warm-up).
    """
    longest = max_model_len - 3

    def fits(lengths: list[int]) -> bool:
        return sum(-(-(n + 3) // block_size) for n in lengths) <= num_blocks

    short = [n for n in (1, 16, 17) if n <= longest]
    rounds = [short if fits(short) else [1]]
    if budget < longest:  # chunked prefill exists here: a full chunk, then one over cached context
        chunked = [min(longest, budget + 17), min(16, longest)]
        rounds.append(chunked if fits(chunked) else chunked[:1])
    return rounds


def adapter_kinds(versions) -> tuple[str, ...]:
    """One adapter name per kind among ``versions`` (AdapterVersion-like: ``name``, ``is_tied``,
    ``family``, ``flavour``), in first-seen order: a kind's requests run the same pool and kernels."""
    first: dict[tuple, str] = {}
    for v in versions:
        first.setdefault((v.is_tied, v.family is not None, v.flavour), v.name)
    return tuple(first.values())


def warm_up(core, adapters: tuple[str, ...] = (), grammar_mask: bool | None = None) -> WarmupReport:
    """Run the dummy requests of :func:`warmup_rounds` through ``core`` (an idle EngineCore) and, on
    the base model, the dummy sampler run at ``max_num_seqs`` rows; then reset its scheduling state.
    ``adapters``: registered adapter names; request i of a round runs on ``adapters[i % len]``
    (pinned for that request), or on the base model when empty. ``grammar_mask``: whether the
    sampler run applies a grammar bitmask (xgrammar's kernel); None: on CUDA only (importing
    xgrammar takes seconds in a cold process, and on the CPU there is nothing to compile).

    Raises:
        RuntimeError: ``core`` has requests (warm-up would disturb them).
        AdapterNotFound: a name is not registered.
    """
    while not core.requests and core.has_work():  # a step in flight for requests since ended (async scheduling)
        core.step()
    if core.requests or core.has_work():
        raise RuntimeError("warm-up needs an idle engine: requests are running or waiting")
    sched, cache = core.config.scheduler, core.config.cache
    report, start = WarmupReport(), time.perf_counter()
    choices = list(adapters) or [None]
    for name in set(adapters):  # an unknown name fails here, before any dummy request is queued
        core.adapters.release(core.adapters.acquire(name))
    rounds = warmup_rounds(sched.max_num_batched_tokens, sched.max_model_len, core.blocks.num_blocks,
                           cache.block_size)
    # the rounds again for every further group of adapters, so each kind runs in a mixed prefill step
    for p, offset in enumerate(range(0, len(choices), len(rounds[0]))):
        for r, lengths in enumerate(rounds):
            for i, n in enumerate(lengths):
                name = choices[(offset + i) % len(choices)]
                pinned = core.adapters.acquire(name) if name is not None else None
                # one token id per request: no dummy prompt shares a prefix-cache block with another
                token = (DUMMY_TOKEN + 16 * p + 8 * r + i) % core.vocab_size
                core.add(f"__warmup-{p}-{r}-{i}", [token] * n, SAMPLED if i == 1 else GREEDY, pinned)
            _run(core, report)
    if adapters and core.runner.graphs is not None:
        report.adapter_graphs = capture_adapter_graphs(core, adapters)
    if not adapters:  # the sampler does not depend on the adapter: once, at start, is enough
        rows = sched.max_num_seqs
        logits = torch.randn(rows, core.vocab_size, device=core.device,
                             generator=torch.Generator(core.device).manual_seed(0))
        dummy_sampler_run(logits, core.generator, core.device.type == "cuda" if grammar_mask is None else grammar_mask)
        report.sampler_rows = rows
    core.reset_scheduling()
    report.seconds = time.perf_counter() - start
    log.info("engine warm-up: %d steps (%d replayed a decode graph, %d piecewise graphs), step tokens %s, "
             "sampler run on %d rows, %.2f s", len(report.step_tokens), report.graph_steps, report.piecewise_steps,
             report.step_tokens, report.sampler_rows, report.seconds)
    return report


@torch.inference_mode()
def capture_adapter_graphs(core, names) -> int:
    """Capture every decode graph size (and piecewise bucket) of each named adapter's pool alone, as
    the engine captured the base model's at start, so a step of a new size on that pool replays
    instead of capturing mid-serving (a sync, a warm-up forward and a capture on the step thread).
    Steps mixing pools, and a pool that grows later (its generation bumps), still capture on first
    use. A pool over the cap on kept combinations (engine/runner/keyed_graphs.py) gets none. Returns the
    number of (size, pools) keys captured here. ``names``: registered adapters,
    each pinned (made resident) for its captures and released.
    """
    runner, hook, captured = core.runner, core.hook, 0
    for name in dict.fromkeys(names):
        version = core.adapters.acquire(name)
        try:
            hook.begin_step([version], [1], core.device)  # a decode: the per-token form, ranks on the device
            if not hook.graphable():
                continue
            pools = hook.per_token_pools()
            for graphs in (runner.graphs, runner.pieces):
                for size in reversed(graphs.sizes if graphs is not None else ()):
                    key = graphs.key(size, pools)
                    if key not in graphs.graphs:
                        graphs.graph_for(size, pools, hook)
                        if key not in graphs.graphs:
                            break  # over the cap on kept combinations (keyed_graphs.py): its steps run eagerly
                        captured += 1
        finally:
            hook.end_step()
            core.adapters.release(version)
    return captured


def _run(core, report: WarmupReport) -> None:
    """Step ``core`` until its queue is empty, recording each step's tokens and path."""
    while core.has_work():
        before = (core.counters["computed_tokens"], dict(core.runner.step_counts))
        core.step()
        report.step_tokens.append(core.counters["computed_tokens"] - before[0])
        report.graph_steps += core.runner.step_counts["graph_steps"] - before[1]["graph_steps"]
        report.piecewise_steps += core.runner.step_counts["piecewise_steps"] - before[1]["piecewise_steps"]
        report.eager_steps += core.runner.step_counts["eager_steps"] - before[1]["eager_steps"]
