"""``nlora-serve bench``: load-test our gRPC server or any OpenAI-compatible endpoint.

    nlora-serve bench --server 127.0.0.1:50051 --num-tenants 64 --popularity zipf --duration 30
    nlora-serve bench --target openai --base-url http://127.0.0.1:8000 --tenants a,b --mode open --rate 4
    nlora-serve bench --compare base.json tied64.json

Prints a table, writes JSON (config, summary, per-request timings) and a PNG plot.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import math
import os
from pathlib import Path

from nlora_serve.client.bench.compare import compare_files
from nlora_serve.client.bench.keys import check_keys_cover, read_keys_file
from nlora_serve.client.cli import DEFAULT_SERVER, SERVER_ENV, default_server, server_address
from nlora_serve.client.bench.runner import MODES, LoadShape, run_load
from nlora_serve.client.bench.workload import POPULARITY, LengthDist, TenantMix, Workload, WorkloadConfig
from nlora_serve.errors import NloraError


class BenchError(NloraError):
    """A flag combination or input file the bench cannot use (printed as one ``error:`` line)."""

SECRET_FLAGS = ("api_key",)  # never written to the JSON file


def add_bench_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``nlora-serve bench``."""
    t = parser.add_argument_group("target")
    t.add_argument("--target", choices=["grpc", "openai"], default="grpc",
                   help="our gRPC server, or an OpenAI-compatible HTTP server such as vLLM's (default: %(default)s)")
    t.add_argument("--server", type=server_address, default=default_server(),
                   help=f"gRPC HOST:PORT (default: ${SERVER_ENV}, else {DEFAULT_SERVER})")
    t.add_argument("--base-url", default="http://127.0.0.1:8000",
                   help="OpenAI-compatible server; a trailing /v1, as the openai SDK's base_url has it, is taken too "
                        "(default: %(default)s)")
    t.add_argument("--endpoint", choices=["completions", "chat"], default="completions",
                   help="OpenAI target: /v1/completions or /v1/chat/completions (default: %(default)s)")
    t.add_argument("--base-model", default=None,
                   help="OpenAI target: the model name sent for base-model requests (default: the entry of "
                        "GET /v1/models without a parent, as ours and vLLM list the base model)")
    t.add_argument("--api-key", default=os.environ.get("NLORA_API_KEY"),
                   help="bearer key for every request that --keys-file does not name (default: $NLORA_API_KEY; "
                        "never written to the JSON)")
    t.add_argument("--keys-file", default=None,
                   help="JSON object of tenant (adapter) name -> API key: each request sends its tenant's key, "
                        "to load-test several tenants under auth as themselves (never written to the JSON)")
    t.add_argument("--tokenizer", default=None,
                   help="'default' or a Hugging Face directory: decode synthetic prompts to text "
                        "(needed for --endpoint chat; otherwise token ids are sent)")
    t.add_argument("--timeout", type=float, default=None, help="seconds per request (default: none)")
    w = parser.add_argument_group("workload")
    w.add_argument("--tenants", default=None, help="comma-separated tenant (adapter / model) names")
    w.add_argument("--num-tenants", type=int, default=0,
                   help="N tenants named --tenant-prefix + 000..N-1 (default: 0 = base model only)")
    w.add_argument("--tenant-prefix", default="tenant-", help="prefix of numbered tenants (default: %(default)s)")
    w.add_argument("--popularity", choices=POPULARITY, default="uniform",
                   help="how a request's tenant is drawn; zipf ranks tenants in the order named (default: %(default)s)")
    w.add_argument("--zipf-alpha", type=float, default=1.0, help="Zipf exponent α (default: %(default)s)")
    w.add_argument("--base-share", type=float, default=0.0,
                   help="probability a request uses the base model instead of a tenant (default: %(default)s)")
    w.add_argument("--prompt-len", type=_length, default=LengthDist(128, 128),
                   help="prompt tokens: N, or LOW:HIGH uniform (default: 128)")
    w.add_argument("--output-len", type=_length, default=LengthDist(64, 64),
                   help="max_tokens per request: N, or LOW:HIGH uniform (default: 64)")
    w.add_argument("--prompt-file", default=None,
                   help="JSONL of {\"prompt\": text} or {\"prompt_token_ids\": [...]}, optional \"output_len\"; "
                        "used in order, cycling (replaces --prompt-len)")
    w.add_argument("--seed", type=int, default=0, help="workload seed: same seed, same requests (default: 0)")
    w.add_argument("--temperature", type=float, default=0.0, help="sampling temperature, 0 = greedy (default: 0)")
    w.add_argument("--no-ignore-eos", dest="ignore_eos", action="store_false",
                   help="let EOS end a request early (default: generate exactly max_tokens)")
    _add_load_and_output(parser)


def _length(text: str) -> LengthDist:
    try:
        return LengthDist.parse(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected N or LOW:HIGH with 1 <= LOW <= HIGH, got {text!r}") from None


def _add_load_and_output(parser: argparse.ArgumentParser) -> None:
    lo = parser.add_argument_group("load")
    lo.add_argument("--mode", choices=MODES, default="closed",
                    help="open: send at --rate whatever the server does; closed: keep --concurrency in flight "
                         "(default: %(default)s)")
    lo.add_argument("--rate", type=float, default=math.inf,
                    help="open loop: mean requests/s (default: inf = all at once)")
    lo.add_argument("--burstiness", type=float, default=1.0,
                    help="open loop: Gamma shape of the gaps; 1 = Poisson, < 1 burstier (default: 1)")
    lo.add_argument("--concurrency", type=int, default=None,
                    help="closed loop: requests in flight (default 8); open loop: cap on them (default none)")
    bound = lo.add_mutually_exclusive_group()
    bound.add_argument("--num-requests", type=int, default=None, help="send this many requests (default: 100)")
    bound.add_argument("--duration", type=float, default=None,
                       help="start requests for this many seconds, then let in-flight ones finish")
    o = parser.add_argument_group("report")
    for name in ("ttft", "tpot", "e2el"):
        o.add_argument(f"--slo-{name}-ms", type=float, default=None,
                       help=f"goodput SLO on {name.upper()} in ms (goodput = requests meeting every SLO per second)")
    o.add_argument("--json", default="bench-result.json", help="result file (default: %(default)s)")
    o.add_argument("--plot", default=None, help="PNG plot path (default: the --json path with .png)")
    o.add_argument("--no-plot", action="store_true", help="skip the plot")
    o.add_argument("--no-progress", action="store_true", help="no live progress bar")
    o.add_argument("--compare", nargs=2, metavar=("A.json", "B.json"), default=None,
                   help="print B / A for two earlier results and exit (no load is sent)")


def workload_config(args: argparse.Namespace) -> WorkloadConfig:
    """The workload the flags describe (ValueError on a bad combination)."""
    names = tuple(n for n in (args.tenants or "").split(",") if n)
    names += TenantMix.numbered(args.tenant_prefix, args.num_tenants) if args.num_tenants else ()
    mix = TenantMix(names, args.popularity, args.zipf_alpha, args.base_share)
    return WorkloadConfig(seed=args.seed, tenants=mix, prompt_len=args.prompt_len, output_len=args.output_len,
                          prompt_file=args.prompt_file, rate=args.rate, burstiness=args.burstiness)


def make_target(args: argparse.Namespace, keys: dict[str, str] | None = None):
    """The target the flags name (not yet entered); ``keys``: the ``--keys-file``'s tenant -> key."""
    if args.target == "grpc":
        from nlora_serve.client.bench.targets import GrpcTarget

        return GrpcTarget(args.server, args.api_key, args.timeout, ignore_eos=args.ignore_eos, keys=keys,
                          temperature=args.temperature)
    from nlora_serve.client.bench.openai_target import OpenAITarget

    logging.getLogger("httpx2").setLevel(logging.WARNING)  # not one INFO line per request
    return OpenAITarget(args.base_url, args.api_key, args.endpoint, args.base_model, args.ignore_eos,
                        args.temperature, _detokenizer(args), args.timeout, keys)


def _keys(args: argparse.Namespace, config: WorkloadConfig) -> dict[str, str] | None:
    """The ``--keys-file``'s tenant -> key, checked to give every request of the workload a key."""
    if args.keys_file is None:
        return None
    keys = read_keys_file(args.keys_file)
    check_keys_cover(keys, config.tenants.names, config.tenants.base_share, args.api_key)
    return keys


def _detokenizer(args: argparse.Namespace):
    if args.tokenizer is None:
        if args.endpoint == "chat" and args.prompt_file is None:
            raise ValueError("--endpoint chat with synthetic prompts needs --tokenizer (or a text --prompt-file)")
        return None
    from transformers import AutoTokenizer

    from nlora_serve.models import resolve_model

    tok = AutoTokenizer.from_pretrained(str(resolve_model(args.tokenizer, getattr(args, "cache_dir", None))))
    return lambda ids: tok.decode(ids)


def load_shape(args: argparse.Namespace) -> LoadShape:
    concurrency = args.concurrency if args.concurrency is not None else (8 if args.mode == "closed" else 0)
    count = args.num_requests if args.num_requests is not None or args.duration is not None else 100
    return LoadShape(args.mode, concurrency, count, args.duration)


def run_bench(args: argparse.Namespace) -> int:
    """Run the benchmark (or ``--compare``); returns 0, or 1 when every request failed.

    Raises:
        BenchError: an invalid flag combination, an unreadable prompt or result file, a gRPC
            server that does not answer, or a run stopped early because its first requests all
            failed alike (the cause, once).
    """
    try:
        if args.compare:
            print(compare_files(*args.compare))
            return 0
        cfg = workload_config(args)
        keys = _keys(args, cfg)
        workload, shape, target = Workload(cfg), load_shape(args), make_target(args, keys)
    except (OSError, ValueError, KeyError) as exc:
        raise BenchError(str(exc)) from exc
    from nlora_serve.client.bench.report import Slo, summarize, table, to_json

    try:
        run = asyncio.run(_run(workload, target, shape, not args.no_progress))
    except ConnectionError as exc:  # the target could not reach its server: nothing was sent
        raise BenchError(str(exc)) from exc
    if run.stopped:
        raise BenchError(f"bench stopped early: {run.stopped}")
    summary = summarize(run, Slo(args.slo_ttft_ms, args.slo_tpot_ms, args.slo_e2el_ms))
    config = {k: _jsonable(v) for k, v in vars(args).items() if k not in SECRET_FLAGS and not callable(v)}
    print(table(summary))
    to_json(run, summary, config, args.json)
    written = [str(args.json)]
    if not args.no_plot:
        from nlora_serve.client.bench.plot import plot_run

        png = args.plot or Path(args.json).with_suffix(".png")
        plot_run(run, png, title=f"{args.target}: {args.json}")
        written.append(str(png))
    print(f"wrote {' and '.join(written)}")
    return 0 if summary["completed"] else 1


def _jsonable(value):
    """A flag value as strict JSON can hold it (inf as the string "inf", lengths as "64:256")."""
    if isinstance(value, LengthDist):
        return str(value)
    return "inf" if isinstance(value, float) and math.isinf(value) else value


async def _run(workload, target, shape, progress):
    async with target:
        return await run_load(workload, target, shape, progress)
