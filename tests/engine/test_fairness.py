"""Fair scheduling (VTC) against hand-computed admission orders and counters (no model)."""

from __future__ import annotations

import random

import pytest

from nlora_serve.engine.scheduling.block_manager import BlockManager
from nlora_serve.engine.config import SchedulerConfig
from nlora_serve.engine.scheduling.prefix_cache import PrefixCachingBlockManager
from nlora_serve.engine.sample.sampling import SamplingParams
from nlora_serve.engine.scheduling.scheduler import Scheduler
from nlora_serve.engine.scheduling.sequence import Sequence

_arrival = iter(range(1_000_000))


def make(policy: str = "fair", weights=None, blocks=None, **cfg) -> Scheduler:
    config = SchedulerConfig(policy=policy, tenant_weights=weights or {}, **{"max_num_seqs": 1,
                             "max_num_batched_tokens": 64, "max_model_len": 64, **cfg})
    return Scheduler(config, blocks or BlockManager(64, 4))


def seq(tenant: str, prompt_len: int = 4, tokens=None) -> Sequence:
    arrival = next(_arrival)
    ids = list(tokens) if tokens is not None else [arrival % 1000] * prompt_len
    return Sequence(f"{tenant}{arrival}", arrival, ids, len(ids), SamplingParams(), tenant=tenant)


def serve_one(sched: Scheduler) -> Sequence:
    """Admit one sequence, run its prefill, finish it; returns it."""
    batch = sched.schedule()
    (s,) = batch.seqs
    s.num_computed_tokens += batch.num_tokens[0]
    sched.finish(s)
    return s


def test_least_served_tenant_goes_first_and_fcfs_inside_a_tenant():
    sched = make()
    heavy = [seq("heavy") for _ in range(4)]
    light = [seq("light") for _ in range(2)]
    for s in heavy + light:
        sched.add(s)
    order = [serve_one(sched) for _ in range(6)]
    # counters (prompt tokens x 1): heavy 0 -> 4, light 0 -> 4, tie -> earlier arrival (heavy) ...
    assert order == [heavy[0], light[0], heavy[1], light[1], heavy[2], heavy[3]]
    assert sched.fair.counters == {"heavy": 16.0, "light": 8.0}


def test_fcfs_ignores_tenants():
    sched = make("fcfs")
    seqs = [seq("heavy"), seq("heavy"), seq("light")]
    for s in seqs:
        sched.add(s)
    assert [serve_one(sched) for _ in range(3)] == seqs and sched.fair is None


def test_a_returning_tenant_is_lifted_to_the_least_waiting_counter():
    sched = make()
    for _ in range(3):
        sched.add(seq("busy", 10))
    serve_one(sched)
    serve_one(sched)  # busy: 20 served, one still waiting
    sched.add(seq("idle"))  # it banked nothing while away: starts at busy's 20, not 0
    assert sched.fair.counters == {"busy": 20.0, "idle": 20.0}
    serve_one(sched)  # a tie: the earlier arrival (busy) goes first
    serve_one(sched)
    sched.add(seq("late"))  # nobody waits: lifted to the counter of the tenant that left last (idle)
    assert sched.fair.counters["late"] == 24.0


def test_output_tokens_weigh_twice_and_tenant_weights_divide():
    sched = make(weights={"gold": 2.0}, max_num_seqs=2)
    gold, plain = seq("gold", 4), seq("plain", 4)
    sched.add(gold)
    sched.add(plain)
    for _ in range(3):  # prefill (4 prompt tokens), then two decodes (one output token each)
        batch = sched.schedule()
        for s, n in zip(batch.seqs, batch.num_tokens):
            s.num_computed_tokens += n
            if s.num_computed_tokens == s.num_tokens:
                s.token_ids.append(7)
    # gold: (4 x 1 + 2 x 2) / 2 = 4; plain: 4 x 1 + 2 x 2 = 8
    assert sched.fair.counters == {"gold": 4.0, "plain": 8.0}


def test_recompute_after_preemption_and_cached_tokens_are_not_billed():
    blocks = PrefixCachingBlockManager(64, 4)
    sched = make(blocks=blocks, max_num_seqs=2)
    first = seq("a", tokens=range(9))
    sched.add(first)
    serve_one(sched)  # 9 prompt tokens billed; blocks [0..3], [4..7] published
    again = seq("a", tokens=range(10))
    sched.add(again)
    batch = sched.schedule()
    assert batch.num_tokens == [2] and again.num_computed_tokens == 8  # 8 cached tokens, free
    again.num_computed_tokens += 2
    sched._preempt(again)
    batch = sched.schedule()  # recomputes its 2 uncached tokens: already billed
    assert batch.seqs == [again]
    assert sched.fair.counters == {"a": 11.0}


def test_weights_must_be_positive():
    with pytest.raises(ValueError, match=r"SchedulerConfig.tenant_weights\['x'\] must be a positive number"):
        SchedulerConfig(policy="fair", tenant_weights={"x": 0})
    for weight in (1e308, 5e-324, float("nan"), 1000.5, 0.0009):
        with pytest.raises(ValueError, match=r"tenant_weights\['x'\] must be a positive number from 0.001 to 1000"):
            SchedulerConfig(policy="fair", tenant_weights={"x": weight})
    assert SchedulerConfig(policy="fair", tenant_weights={"x": 1000, "y": 0.001}).tenant_weights["y"] == 0.001
    with pytest.raises(ValueError, match="SchedulerConfig.policy must be one of fcfs, fair; got 'lifo'"):
        SchedulerConfig(policy="lifo")



def step(sched: Scheduler):
    """One engine step without a model: every scheduled sequence computes its tokens and, once its
    prompt is done, samples token 7."""
    batch = sched.schedule()
    for s, n in zip(batch.seqs, batch.num_tokens):
        s.num_computed_tokens += n
        if s.num_computed_tokens == s.num_tokens:
            s.token_ids.append(7)
    return batch


def run_heavy(sched: Scheduler, requests: int, steps: int) -> list[Sequence]:
    """Queue ``requests`` 4-token requests of tenant "heavy" and run ``steps`` steps; returns them."""
    heavy = [seq("heavy") for _ in range(requests)]
    for s in heavy:
        sched.add(s)
    for _ in range(steps):
        step(sched)
    return heavy


def slots_sched(**cfg) -> Scheduler:
    return make(max_num_seqs=4, max_model_len=1024, blocks=BlockManager(2048, 4), **cfg)


def test_usage_is_a_decayed_mean_of_the_slots_held():
    sched = slots_sched()
    for s in [seq("a"), seq("a"), seq("a")]:
        sched.add(s)
    for _ in range(129):  # the first step admits: 128 observed steps with 3 slots held
        step(sched)
    assert sched.fair.slot_usage["a"] == pytest.approx(3 * (1 - 0.5), rel=1e-9)  # half-life 128 steps
    # bias-corrected: 129 observed steps (3 held in 128 of them) over 1 - 2^(-129/128)
    d = 0.5 ** (1 / 128)
    assert sched.fair.usage("a") == pytest.approx(3 * (1 - d ** 128) / (1 - d ** 129), rel=1e-9)


def test_a_tenant_below_its_slot_share_takes_a_slot_from_the_tenant_above_it():
    sched = slots_sched()
    heavy = run_heavy(sched, 6, 200)
    assert sched.running == heavy[:4]  # every slot held by the heavy tenant's decodes for 200 steps
    light = seq("light")
    sched.add(light)
    batch = step(sched)
    # 2 active tenants, 2 slots each: heavy used ~3.4 > 2, light 0: the newest heavy sequence goes
    assert batch.preempted == [heavy[3]] and light in batch.seqs and light in sched.running
    assert heavy[3].num_computed_tokens == 0 and heavy[3] in sched.waiting
    batch = step(sched)  # no hand-back: heavy is above its share, so its victim waits for a slot
    assert batch.preempted == [] and light in sched.running and heavy[3] in sched.waiting


def test_a_burst_with_nothing_waiting_is_not_preempted():
    sched = slots_sched()
    heavy = [seq("heavy") for _ in range(4)]
    for s in heavy:
        sched.add(s)
    step(sched)
    step(sched)  # heavy holds all 4 slots (usage 4, 2 above its share) but has nothing queued
    light = seq("light")
    sched.add(light)
    assert step(sched).preempted == [] and light in sched.waiting


def test_slot_shares_follow_tenant_weights():
    sched = slots_sched(weights={"gold": 3.0})
    for s in [seq("gold"), seq("gold"), seq("plain"), seq("plain")]:
        sched.add(s)
    for _ in range(300):  # each holds 2 of the 4 slots
        step(sched)
    newcomer = seq("new")
    for s in [seq("plain"), newcomer]:  # plain now has a request waiting (backlogged)
        sched.add(s)
    batch = step(sched)  # shares 4 · (3, 1, 1) / 5: gold below its 2.4 keeps its slots, plain 1.2
    # above its 0.8 gives one, to the newcomer (plain's own waiting request is over-served: no taker)
    assert [s.tenant for s in batch.preempted] == ["plain"] and newcomer in sched.running


def test_a_backlogged_tenant_less_than_a_slot_above_its_share_keeps_its_slots_till_one_starves():
    sched = slots_sched()
    for s in [seq("a"), seq("a"), seq("b"), seq("b"), seq("a"), seq("b")]:
        sched.add(s)
    step(sched)  # a and b hold 2 slots each and have one more request waiting
    c = seq("c")
    sched.add(c)  # shares 4/3 each: a and b are 2/3 of a slot above (over-served, not yielding)
    wait = sched.fair.STARVED_STEPS
    assert not any(step(sched).preempted for _ in range(wait)) and c in sched.waiting
    # c has waited STARVED_STEPS steps with no slot at all: one of the 2-slot tenants gives one
    (victim,) = step(sched).preempted
    assert victim.tenant in ("a", "b") and c in sched.running
    assert not any(step(sched).preempted for _ in range(1000))  # 2 / 1 / 1: nobody starves, no churn


def test_a_free_slot_is_taken_before_anyone_is_preempted():
    sched = slots_sched()
    heavy = run_heavy(sched, 5, 10)  # heavy holds the 4 slots, heavy[4] waits
    sched.finish(heavy[0])
    light = [seq("light"), seq("light")]
    for s in light:
        sched.add(s)
    batch = step(sched)  # one slot free: the first light request takes it (heavy is served last)
    assert batch.preempted == [] and light[0] in sched.running and light[1] in sched.waiting
    batch = step(sched)  # every slot taken: heavy (usage 4 - 3/10 per step, share 2) gives one
    assert batch.preempted == [heavy[3]] and light[1] in sched.running and heavy[4] in sched.waiting


def test_fcfs_never_preempts_for_slots():
    sched = make("fcfs", max_num_seqs=2, max_model_len=1024, blocks=BlockManager(2048, 4))
    for s in [seq("heavy"), seq("heavy")]:
        sched.add(s)
    for _ in range(200):
        step(sched)
    light = seq("light")
    sched.add(light)
    assert step(sched).preempted == [] and light in sched.waiting


def replay(policy: str, tenants: int, rate: float, num_steps: int, seed: int) -> tuple[int, list[int]]:
    """Poisson arrivals (``rate`` requests per step per tenant) of 64-token prompts that decode 32
    tokens, 16 slots, every step one unit of time. Returns (preemptions, admissions per step)."""
    rng = random.Random(seed)
    arrivals = sorted((t, f"t{k}") for k in range(tenants) for t in poisson(rng, rate, num_steps))
    sched = make(policy, max_num_seqs=16, max_num_batched_tokens=512, max_model_len=128,
                 blocks=BlockManager(4096, 16))
    preempted, admitted, i = 0, [], 0
    for now in range(num_steps):
        while i < len(arrivals) and arrivals[i][0] <= now:
            sched.add(seq(arrivals[i][1], 64))
            i += 1
        waiting = len(sched.waiting)
        batch = step(sched)
        preempted += len(batch.preempted)
        admitted.append(waiting + len(batch.preempted) - len(sched.waiting))
        for s in list(sched.running):
            if len(s.token_ids) - s.num_prompt_tokens >= 32:
                sched.finish(s)
    return preempted, admitted


def poisson(rng: random.Random, rate: float, horizon: float) -> list[float]:
    times, t = [], rng.expovariate(rate)
    while t < horizon:
        times.append(t)
        t += rng.expovariate(rate)
    return times


@pytest.mark.parametrize("seed", [5, 6, 7])
def test_a_load_where_no_tenant_is_heavy_preempts_nothing_and_admits_like_fcfs(seed):
    # nine tenants at 1/12 of the capacity (16 slots / 33 steps a request) each: every one below
    # its share of 1/9 and the server at 75% load, yet Poisson bursts fill every slot at times
    rate = 16 / 33 / 12
    fcfs_preempted, fcfs_admitted = replay("fcfs", 9, rate, 1500, seed)
    fair_preempted, fair_admitted = replay("fair", 9, rate, 1500, seed)
    assert fcfs_preempted == 0 and fair_preempted == 0
    assert fair_admitted == fcfs_admitted and sum(fcfs_admitted) > 300


def test_idle_tenants_counters_are_forgotten_and_a_return_is_lifted_as_before():
    """A server that has served thousands of tenant names keeps counters only for those in play (and
    idle ones served more than all of them); a forgotten tenant's return is lifted to the floor."""
    sched = make()
    for i in range(3 * sched.fair.FORGET_EVERY):  # each tenant sends one request, then goes idle
        sched.add(seq(f"t{i}"))
        serve_one(sched)
    # each new tenant was lifted to the last one's counter and served 4 prompt tokens: t_i ends at 4(i + 1)
    last = f"t{3 * sched.fair.FORGET_EVERY - 1}"
    assert sched.fair.counters[last] == 4.0 * 3 * sched.fair.FORGET_EVERY
    assert len(sched.fair.counters) <= sched.fair.FORGET_EVERY and "t0" not in sched.fair.counters
    sched.add(seq("t0"))  # remembered, it would be lifted from 4 to max(4, the last one's counter)
    assert sched.fair.counters["t0"] == sched.fair.counters[last]
