"""Fair scheduling against a backlogged heavy tenant (issue 20): light tenants below their share
are served as if it were absent. Hand-computed slot counts, and a model-free replay of the
issue's load in unit steps (no model; the scheduler alone decides who waits)."""

from __future__ import annotations

import random

from test_fairness import make, poisson, run_heavy, seq, slots_sched, step

from nlora_serve.engine.scheduling.block_manager import BlockManager


def run_finishing(sched, steps: int, outputs: int) -> list:
    """Run ``steps`` model-free steps, finishing each sequence once it has ``outputs`` output
    tokens; returns the finished ones in the order they finished."""
    finished = []
    for _ in range(steps):
        step(sched)
        for s in [s for s in sched.running if s.num_output_tokens >= outputs]:
            sched.finish(s)
            finished.append(s)
    return finished


def test_a_tenant_that_filled_every_slot_at_start_gives_one_at_once():
    sched = slots_sched()
    heavy = run_heavy(sched, 6, 5)  # heavy has held all 4 slots since the start, 2 more of its requests wait
    light = seq("light")
    sched.add(light)
    # usage 4 (1 - d^5) / (1 - d^6) = 3.3 >= s + 1 = 3 (the first step saw nothing run), not the
    # uncorrected 4 (1 - d^5) = 0.11 still rising; d = 2^(-1/128)
    batch = step(sched)
    assert batch.preempted == [heavy[3]] and light in sched.running


def test_a_tenant_that_keeps_every_slot_with_nothing_waiting_gives_one_to_a_starved_tenant():
    # A hostile tester's find: a tenant running exactly max_num_seqs long requests, never one
    # waiting, sits below both donor rules (with two tenants 2s + 1 = 5 > the 4 slots), so another
    # tenant's request waited for one of its whole generations.
    sched = slots_sched()
    heavy = run_heavy(sched, 4, 50)
    light = seq("light")
    sched.add(light)
    wait = sched.fair.STARVED_STEPS
    assert not any(step(sched).preempted for _ in range(wait)) and light in sched.waiting  # a burst may end
    batch = step(sched)  # light has waited STARVED_STEPS steps holding nothing: heavy's newest goes
    assert batch.preempted == [heavy[3]] and light in sched.running and heavy[3] in sched.waiting
    assert not any(step(sched).preempted for _ in range(500))  # no hand-back, and heavy keeps ceil(2) + 1
    assert sorted(s.tenant for s in sched.running) == ["heavy"] * 3 + ["light"]


def test_a_starved_tenant_takes_one_slot_from_the_tenant_furthest_over_its_share():
    sched = make(max_num_seqs=5, max_model_len=1024, blocks=BlockManager(2048, 4))
    a = [seq("a") for _ in range(3)]
    b = [seq("b") for _ in range(2)]
    for s in a + b:
        sched.add(s)
    for _ in range(100):
        step(sched)
    c = seq("c")  # shares 5/3: a holds 3 (usage 3, over-served), b holds 2 (usage 2 < 5/3 + 1/2)
    sched.add(c)
    preempted = [v for _ in range(40) for v in step(sched).preempted]
    assert preempted == [a[2]] and c in sched.running  # one slot: c is no longer starved
    assert not any(step(sched).preempted for _ in range(500))


def test_a_heavy_weight_holding_every_slot_gives_one_to_a_starved_tenant():
    # A hostile tester's find: weight 4 against 1 on 3 slots, so the heavy share is 2.4; it held all
    # 3 with nothing queued and the light request waited its whole generation (20.6 s): a donor had
    # to hold ceil(share) + 1 = 4 slots, and "over-served" (half a slot above 2.4) was near the top.
    sched = make(max_num_seqs=3, max_model_len=1024, blocks=BlockManager(2048, 4), weights={"heavy": 4.0})
    heavy = run_heavy(sched, 3, 50)
    light = seq("light")
    sched.add(light)
    wait = sched.fair.STARVED_STEPS
    assert not any(step(sched).preempted for _ in range(wait)) and light in sched.waiting
    assert step(sched).preempted == [heavy[2]] and light in sched.running
    assert not any(step(sched).preempted for _ in range(500))  # heavy keeps 2 = floor(2.4)
    assert sorted(s.tenant for s in sched.running) == ["heavy", "heavy", "light"]


def server_of_8(heavy: int, a: int, b: int) -> tuple:
    """8 slots taken by ``heavy``, ``a`` and ``b`` requests (nothing waits), then a light request."""
    sched = make(max_num_seqs=8, max_model_len=1024, blocks=BlockManager(2048, 4))
    held = [seq("heavy") for _ in range(heavy)] + [seq("a") for _ in range(a)] + [seq("b") for _ in range(b)]
    for s in held:
        sched.add(s)
    for _ in range(10):  # at the next step: usage held x (1 - d^10) / (1 - d^11), the first step empty
        step(sched)
    light = seq("light")
    sched.add(light)
    return sched, held, light


def test_a_tenant_with_nothing_waiting_gives_a_slot_only_beyond_twice_its_share():
    sched, held, light = server_of_8(4, 2, 2)  # shares 8/4 = 2: heavy's usage 3.65 < 2s + 1 = 5
    assert step(sched).preempted == [] and light in sched.waiting
    sched, held, light = server_of_8(6, 1, 1)  # heavy's usage 5.47 >= 5: it filled the server first
    assert step(sched).preempted == [held[5]] and light in sched.running


def test_a_light_burst_beyond_its_share_is_served_at_once():
    sched = slots_sched()
    heavy = run_heavy(sched, 8, 300)
    burst = [seq("light") for _ in range(3)]  # 3 requests against a share of 2 slots, usage 0
    for s in burst:
        sched.add(s)
    batch = step(sched)
    assert batch.preempted == [heavy[3], heavy[2], heavy[1]]  # newest first
    assert all(s in sched.running for s in burst)
    assert step(sched).preempted == [] and sched.running[0] is heavy[0]  # no hand-back


def test_an_over_served_tenants_prefill_chunk_waits_for_a_light_prompt():
    sched = make(max_num_seqs=5, max_num_batched_tokens=64, max_model_len=1024, blocks=BlockManager(2048, 4))
    heavy = [seq("heavy") for _ in range(3)] + [seq("heavy", 900)]
    for s in heavy:
        sched.add(s)
    for _ in range(4):  # 3 decode, the 900-token prompt is prefilled in chunks of what is left
        step(sched)
    assert heavy[3].num_uncomputed > 64
    light = seq("light", 16)
    sched.add(light)
    batch = step(sched)  # heavy holds 4 of 5 slots, share 2.5: over-served; its chunk goes last
    assert dict(zip(batch.seqs, batch.num_tokens)) == {heavy[0]: 1, heavy[1]: 1, heavy[2]: 1, light: 16,
                                                       heavy[3]: 64 - 3 - 16}


def ttft_replay(heavy: bool, seed: int, num_steps: int = 1500, divisor: float = 15) -> dict[str, list[int]]:
    """Issue 20's load in unit steps: nine light tenants at C/``divisor`` each (C = 16 slots / 33
    steps a request: 64-token prompts, 32 new tokens) and, with ``heavy``, one more at 10x that.
    Returns each light tenant's TTFTs in steps (a request never served waits to the end)."""
    rate = 16 / 33 / divisor
    rngs = {f"t{k}": random.Random(seed * 1000 + k) for k in range(10)}  # same light arrivals either way
    arrivals = sorted((t, name) for name, rng in rngs.items() if heavy or name != "t0"
                      for t in poisson(rng, rate * (10 if name == "t0" else 1), num_steps * 0.7))
    sched = make(max_num_seqs=16, max_num_batched_tokens=512, max_model_len=128, blocks=BlockManager(4096, 16))
    born, ttft, i = {}, {}, 0
    for now in range(num_steps):
        while i < len(arrivals) and arrivals[i][0] <= now:
            s = seq(arrivals[i][1], 64)
            born[s] = arrivals[i][0]
            sched.add(s)
            i += 1
        step(sched)
        for s in list(sched.running):
            if s.num_output_tokens and s not in ttft:
                ttft[s] = now + 1 - born[s]
            if s.num_output_tokens >= 32:
                sched.finish(s)
    waits: dict[str, list[int]] = {}
    for s, at in born.items():
        if s.tenant != "t0":
            waits.setdefault(s.tenant, []).append(ttft.get(s, num_steps - at))
    return waits


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))]


def test_light_tenants_wait_about_as_long_with_a_heavy_tenant_as_without():
    # pooled over 4 seeds, the light tenants' TTFT p99 with the heavy tenant present over their
    # own without it (the same light arrivals): the bound is 2x per tenant; VTC with
    # slot shares before this change gave a median tenant 1.5-6.8x here
    ratios = []
    for seed in range(1, 5):
        alone, mixed = ttft_replay(False, seed), ttft_replay(True, seed)
        ratios += [p99(mixed[t]) / p99(alone[t]) for t in alone]
    ratios.sort()
    assert ratios[len(ratios) // 2] <= 1.25 and ratios[int(0.75 * len(ratios))] <= 2.0


def test_near_saturation_a_light_burst_is_not_outranked_by_the_heavy_tenants_counter():
    # C/11: the nine light tenants alone hold ~13 of 16 slots, each near its 1.6-slot share, the
    # heavy one ~2.2. By VTC counter alone a light tenant in a burst (its counter lifted to the
    # heavy one's, then raised by the burst) lost the freed slots to the heavy tenant: median 1.61x,
    # 75th percentile 2.45x, 25 of 36 within 2x; ranked by usage above share first: 1.02x / 1.29x
    ratios = []
    for seed in range(1, 5):
        alone, mixed = ttft_replay(False, seed, divisor=11), ttft_replay(True, seed, divisor=11)
        ratios += [p99(mixed[t]) / p99(alone[t]) for t in alone]
    ratios.sort()
    assert ratios[len(ratios) // 2] <= 1.2 and ratios[int(0.75 * len(ratios))] <= 2.0


def test_the_fair_queue_is_split_per_tenant_so_a_pick_looks_once_per_tenant():
    # the heavy tenant's 5,000 queued requests: a pick compares the two tenants' oldest requests
    # (it scanned every waiting request before: ~4x the scheduler's time with 2,000 queued)
    sched = slots_sched()
    heavy = [seq("heavy") for _ in range(5000)]
    for s in heavy:
        sched.add(s)
    light = seq("light")
    sched.add(light)
    assert {t: len(q) for t, q in sched.fair.queues.items()} == {"heavy": 5000, "light": 1}
    step(sched)  # 4 slots, usage 0: the earlier arrival (heavy) first, then the least counter (light: 0 < 4)
    assert sched.running == [heavy[0], light, heavy[1], heavy[2]]
    assert "light" not in sched.fair.queues and sched.fair.queues["heavy"][:2] == heavy[3:5]
    sched._preempt(heavy[1])  # a preempted request goes back to its place by arrival
    assert sched.fair.queues["heavy"][:3] == [heavy[1], heavy[3], heavy[4]]


def test_ten_backlogged_tenants_get_equal_service():
    # issue 20's backlogged case in unit steps: 16 slots, ten tenants queued at once (the heavy one
    # 10x as many), until the first runs dry: Jain's index of the service (prompt + 2 x output
    # tokens) >= 0.98. Ranking by usage without the slots taken earlier in the same step gave the
    # first-ranked tenant every slot freed in a step (7 of 16): 0.87
    sched = make(max_num_seqs=16, max_num_batched_tokens=512, max_model_len=128, blocks=BlockManager(4096, 16))
    tenants = [f"t{k}" for k in range(10)]
    names = [t for t in tenants for _ in range(50 if t == "t0" else 5)]
    random.Random(0).shuffle(names)
    for name in names:
        sched.add(seq(name, 64))
    served = dict.fromkeys(tenants, 0)
    while all(t in sched.fair.queues for t in tenants):
        batch = step(sched)
        for s, n in zip(batch.seqs, batch.num_tokens):
            served[s.tenant] += n if n > 1 else 2  # a prompt chunk, or one output token
        for s in list(sched.running):
            if s.num_output_tokens >= 32:
                sched.finish(s)
    x = list(served.values())
    assert sum(x) ** 2 / (len(x) * sum(v * v for v in x)) >= 0.98, served


def test_a_backlogged_heavy_tenant_is_not_starved():
    # 4 slots, everyone queued at once (the heavy tenant 4x as many), 8 output tokens a request:
    # until the first light tenant runs dry each of the four gets a quarter of the service (103
    # tokens each, prompt + output, here; before this change the same)
    sched = slots_sched()
    for s in [seq("heavy") for _ in range(40)] + [seq(f"light{k}") for k in range(3) for _ in range(10)]:
        sched.add(s)  # the heavy tenant's requests arrived first
    served: dict[str, int] = {}
    while all(any(s.tenant == t for s in sched.waiting) for t in ("light0", "light1", "light2")):
        batch = step(sched)
        for s, n in zip(batch.seqs, batch.num_tokens):
            served[s.tenant] = served.get(s.tenant, 0) + n
        for s in list(sched.running):
            if s.num_output_tokens >= 8:
                sched.finish(s)
    light = [served[f"light{k}"] for k in range(3)]
    assert served["heavy"] >= 0.8 * sum(light) / 3, served


def test_a_deferred_prefill_holding_the_blocks_a_light_request_needs_is_preempted():
    # shares 2 · (0.2, 1) / 1.2: heavy (one 60-token prompt, 8 tokens a step) is over-served
    # (usage ~0.86 >= 1/3 + 1/2) once light waits, so its chunks come after light's; it holds 12
    # of the 16 blocks. Light's 16-token prompt (5 blocks once it samples) does not fit beside it.
    # Before: light preempted itself every other step (the newest) and was re-admitted into the
    # same 8-token budget, heavy's chunk never ran: neither finished (hand-traced; 300 steps).
    sched = make(weights={"heavy": 0.2}, max_num_seqs=2, max_num_batched_tokens=8, blocks=BlockManager(16, 4))
    heavy = seq("heavy", 60)
    sched.add(heavy)
    for _ in range(6):
        step(sched)
    assert heavy.num_computed_tokens == 48
    light = seq("light", 16)
    sched.add(light)
    finished = run_finishing(sched, 40, outputs=2)
    # light's 2 prefill steps + 2 decodes once heavy gave its blocks back; then heavy's 61 tokens
    # + 1 decode at 8 a step (8 steps): well within 40
    assert finished == [light, heavy] and heavy.num_preemptions == 1 and light.num_preemptions == 0
    assert sched.blocks.num_free_blocks == 16


def test_deferred_prefills_short_of_blocks_make_room_among_themselves():
    # shares 3 · (0.1, 1) / 1.1: heavy's 2 running prompts are deferred (over-served) once light
    # waits; light's 25-token prompt needs 16 blocks (budget 16) and 10 are free, so it is not
    # admitted; heavy's chunks need 15 and 14. Before: no one could preempt (nobody ran ahead of
    # the deferred chunks, and those never preempted), every later step was empty (hand-traced).
    sched = make(weights={"heavy": 0.1}, max_num_seqs=3, max_num_batched_tokens=16, max_model_len=128,
                 blocks=BlockManager(84, 1))
    big, small = seq("heavy", 79), seq("heavy", 24)
    for s in (big, small):
        sched.add(s)
    for _ in range(4):  # big alone: 16 tokens a step
        step(sched)
    burst = seq("other", 6)
    sched.add(burst)
    step(sched)  # burst's 6 tokens, then small (nobody else waits) takes the other 10
    assert (big.num_computed_tokens, small.num_computed_tokens) == (64, 10)
    sched.finish(burst)
    light = seq("light", 25)
    sched.add(light)
    assert sched.blocks.num_free_blocks == 10
    finished = run_finishing(sched, 60, outputs=1)
    # big (the older deferred prefill) takes small's blocks, finishes (1 step: 15 tokens), then
    # light is admitted (not over-served) before small recomputes
    assert finished == [big, light, small] and small.num_preemptions == 1
    assert sched.blocks.num_free_blocks == 84
