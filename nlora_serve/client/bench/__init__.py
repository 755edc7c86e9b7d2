"""``nlora-serve bench``: seeded multi-tenant workloads, open/closed-loop load against our gRPC
server or an OpenAI-compatible endpoint, and vLLM-style latency / throughput / goodput reports.

    cli.py            the ``bench`` command's flags, and the run they describe
    workload.py       seeded requests: arrivals, tenant popularity, prompt and output lengths
    runner.py         open loop (a rate) or closed loop (a concurrency) against a target
    targets.py        what one request records; the gRPC target (our server)
    keys.py           --keys-file: each tenant's requests sent with that tenant's own API key
    openai_target.py  the OpenAI-compatible HTTP target (ours, vLLM's): streamed completions or chats
    report.py         TTFT, TPOT, ITL, E2E, throughput, goodput as vLLM benchmarks/serve defines them
    plot.py           the PNG: latency CDFs and throughput over time
    compare.py        ``--compare A.json B.json``: B / A for every figure

    workload = Workload(WorkloadConfig(tenants=TenantMix(TenantMix.numbered("tenant-", 64), "zipf")))
    async with GrpcTarget("127.0.0.1:50051") as target:
        run = await run_load(workload, target, LoadShape("closed", concurrency=8, duration_s=30))
    print(table(summarize(run)))
"""

from nlora_serve.client.bench.report import Slo, summarize, table, to_json
from nlora_serve.client.bench.runner import LoadShape, RunRecord, run_load
from nlora_serve.client.bench.targets import GrpcTarget, RequestResult
from nlora_serve.client.bench.workload import BenchRequest, LengthDist, TenantMix, Workload, WorkloadConfig

__all__ = ["BenchRequest", "GrpcTarget", "LengthDist", "LoadShape", "RequestResult", "RunRecord", "Slo",
           "TenantMix", "Workload", "WorkloadConfig", "run_load", "summarize", "table", "to_json"]
