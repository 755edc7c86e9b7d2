"""Host cost of trying the requests that wait for a LoRA slot (engine/slot_wait.py), per step.

Every ``--max-loras`` slot is held by a running request (tenant t0); ``--waiters`` requests wait on
``--adapters`` other untied adapters (spread over 8 tenants), and none can be placed. The engine
calls ``SlotWaiters.admit`` between every two steps. Columns (µs per call, CPU time of this thread):
  quiet    nothing changed since the last call (the steady state between slot changes)
  changed  a change before each call (tenant shares set), so every waiting request is tried again
Before refusals were remembered every call was a full round of one try per (version, tenant):
4.4 ms (fcfs) and 12.6 ms (fair) for 1,000 requests on 1,000 adapters and 32 slots, here.
``fair`` orders by a tenant's service and shares the slots between tenants (residency's share rule).

    PYTHONPATH=. .venv/bin/python bench/slot_wait.py [--waiters 1000] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from types import SimpleNamespace

import torch

from nlora_serve.adapters.limits import AdapterLimits
from nlora_serve.adapters.runtime.manager import AdapterManager
from nlora_serve.adapters.nystrom import init_adapter
from nlora_serve.adapters.runtime.version import AdapterVersion
from nlora_serve.engine.slot_wait import SlotWaiters
from nlora_serve.models import load_base, resolve_model


def measure(base, adapter, store: str, *, max_loras: int, waiters: int, adapters: int, fair: bool,
            calls: int) -> dict:
    manager = AdapterManager(base, store, AdapterLimits(max_loras=max_loras), tenant_shares={} if fair else None)
    for i in range(max_loras):  # every slot held by a running request
        manager.place(AdapterVersion(f"busy-{i}", 1, adapter, None), "t0")
    versions = [AdapterVersion(f"wait-{i}", 1, adapter, None) for i in range(adapters)]
    queue = SlotWaiters(manager)
    for i in range(waiters):
        queue.park(SimpleNamespace(engine_id=f"req-{i}", pinned=versions[i % adapters], tenant=f"t{1 + i % 8}"))
    service = (lambda tenant: 0.0) if fair else None
    queue.admit(service)  # every request tried once
    row = {}
    for label, change in (("quiet", False), ("changed", True)):
        spent = 0.0
        for _ in range(calls):
            if change:  # the same weights again: changes nothing but counts as a change
                manager.set_tenant_shares({})
            start = time.thread_time()
            placed, failed = queue.admit(service)
            spent += time.thread_time() - start
            assert not placed and not failed and len(queue) == waiters
        row[label] = spent / calls * 1e6
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--waiters", type=int, default=1000)
    ap.add_argument("--calls", type=int, default=50)
    ap.add_argument("--json", default=None, help="write the rows here")
    args = ap.parse_args()
    logging.disable(logging.INFO)  # every refusal logs a line (rate-limited per tenant)
    base = load_base(str(resolve_model("default")), torch.float32)
    adapter = init_adapter(base, rank=4, targets=["q_proj"], variant="slora", seed=0)  # shared: only timing
    rows = []
    print(f"{'policy':>6} {'slots':>5} {'waiting':>7} {'adapters':>8} {'quiet us':>9} {'changed us':>10}")
    for fair in (False, True):
        for max_loras, adapters in ((32, args.waiters), (32, 10), (4, args.waiters)):
            with tempfile.TemporaryDirectory() as store:
                row = measure(base, adapter, store, max_loras=max_loras, waiters=args.waiters, adapters=adapters,
                              fair=fair, calls=args.calls)
            row.update(policy="fair" if fair else "fcfs", max_loras=max_loras, waiters=args.waiters, adapters=adapters)
            rows.append(row)
            print(f"{row['policy']:>6} {max_loras:>5} {args.waiters:>7} {adapters:>8} {row['quiet']:>9.1f} "
                  f"{row['changed']:>10.1f}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=2)


if __name__ == "__main__":
    main()
