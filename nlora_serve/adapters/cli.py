"""The ``adapters inspect | init | convert`` subcommands, ready to hang under ``nlora-serve``.

``add_adapter_subcommands(subparsers)`` registers them (each sets ``func(args) -> exit code``);
``python -m nlora_serve.adapters.cli ...`` runs them standalone. Expected failures raise
:class:`~nlora_serve.errors.NloraError`; :func:`main` prints them on one line and returns 2.
"""

from __future__ import annotations

import argparse
import sys

from nlora_serve.arg_types import integer_arg, number_arg, out_dir_arg, unsigned_arg
from nlora_serve.errors import AdapterError, NloraError


def _base(args: argparse.Namespace):
    from nlora_serve.models import load_base

    return load_base(args.model, cache_dir=getattr(args, "cache_dir", None))


def _inspect(args: argparse.Namespace) -> int:
    from nlora_serve.adapters.config import check_adapter_dir
    from nlora_serve.models.hub import local_or_hub

    folder = check_adapter_dir(local_or_hub(args.dir, AdapterError, "adapter"))  # named before torch loads

    from nlora_serve.adapters.inspect import format_report, inspect_adapter

    print(format_report(inspect_adapter(folder, _base(args), max_rank=args.max_rank), as_json=args.json))
    return 0


def _init(args: argparse.Namespace) -> int:
    from nlora_serve.adapters.inspect import format_report, report_for
    from nlora_serve.adapters.nystrom import init_adapter
    from nlora_serve.adapters.save import write_adapter
    from nlora_serve.adapters.writing import check_out_dir

    check_out_dir(args.out)  # before the base model loads
    targets = args.targets[0] if args.targets == ["all-linear"] else args.targets
    zero_n = args.variant != "slora" and not args.training_start
    adapter = init_adapter(_base(args), rank=args.rank, targets=targets, variant=args.variant,
                           layers=args.layers, alpha=args.alpha, seed=args.seed, use_rslora=args.rslora,
                           zero_n=zero_n)
    write_adapter(adapter, args.out, tied_form=args.tied_form)
    print(format_report(report_for(adapter, args.out)))
    if zero_n:
        print(f"N = 0: {args.out} leaves the model unchanged until trained (`adapters tune --n-init zeros`, "
              f"or `adapters swap` a trained N); --training-start writes the {args.variant} N instead")
    elif args.variant != "slora":
        print(f"N = {'pinv(W[:r,:r])' if args.variant == 'nlora-pinv' else 'W[:r,:r]'}: a training start; "
              "served as is it changes every answer")
    return 0


def _convert(args: argparse.Namespace) -> int:
    from nlora_serve.adapters.config import check_adapter_dir
    from nlora_serve.models.hub import local_or_hub

    src = check_adapter_dir(local_or_hub(args.src, AdapterError, "adapter"))  # named before torch loads

    from nlora_serve.adapters.convert import convert_dir
    from nlora_serve.adapters.inspect import format_report, report_for
    from nlora_serve.adapters.writing import check_out_dir

    check_out_dir(args.out)  # before the base model loads
    adapter = convert_dir(src, args.to, args.out, _base(args), max_rank=args.max_rank)
    print(format_report(report_for(adapter, args.out)))
    return 0


def _common(p: argparse.ArgumentParser, max_rank: bool = True) -> None:
    p.add_argument("--model", default="default",
                   help="base model: 'default', a Hugging Face model directory, a .gguf file or a Hugging Face "
                        "ORG/NAME in the HF cache (default: %(default)s)")
    if max_rank:
        p.add_argument("--max-rank", type=integer_arg(1), default=64,
                       help="refuse adapters whose rank exceeds this, as the server would (default: %(default)s)")


def add_adapter_subcommands(subparsers: argparse._SubParsersAction) -> None:
    """Register ``inspect``, ``init``, ``convert``, ``tune`` (local), ``list``, ``upload``,
    ``swap``, ``unload``, ``load`` (on a server, ``--server``) and ``versions``, ``rollback`` (on a
    store folder) on an ``adapters`` subparsers object."""
    from nlora_serve.adapters.tune.cli import add_tune_subcommand

    p = subparsers.add_parser("inspect", help="validate an adapter directory and describe it",
                              description="Validate DIR against the base model as the server would and print "
                                          "flavour, ranks, targets, layers, tied or not, bytes held and the "
                                          "content hash. Exit 0 when servable, 2 with the reason otherwise.")
    p.add_argument("dir", help="adapter directory (adapter_config.json + adapter_model.safetensors), or a "
                               "Hugging Face ORG/ADAPTER in the HF cache")
    _common(p)
    p.add_argument("--json", action="store_true", help="print one JSON object instead of lines")
    p.set_defaults(func=_inspect)

    p = subparsers.add_parser("init", help="create an NLoRA / SLoRA adapter from the base weights",
                              description="NLoRA (Nyström): A = W[:r,:], B = W[:,:r] and N = 0, so the adapter "
                                          "leaves the model unchanged until trained (as PEFT's default B = 0); "
                                          "with --training-start N = W[:r,:r] (nlora, the reference code's) or "
                                          "pinv(W[:r,:r]) (nlora-pinv). slora: random A and N, B = 0.")
    _common(p, max_rank=False)
    p.add_argument("--rank", type=integer_arg(1), required=True, help="rank r of every adapted projection")
    p.add_argument("--targets", nargs="+", required=True,
                   help="projections (q_proj k_proj v_proj o_proj gate_proj up_proj down_proj) or all-linear")
    p.add_argument("--variant", choices=["nlora", "nlora-pinv", "slora"], default="nlora",
                   help="initialisation (default: %(default)s, the NLoRA reference code's)")
    p.add_argument("--training-start", action="store_true",
                   help="write the variant's non-zero N (a start for training: served as is it changes every "
                        "answer); without it nlora variants get N = 0")
    p.add_argument("--layers", type=integer_arg(0), nargs="+", default=None,
                   help="layer indices to adapt (default: all)")
    p.add_argument("--alpha", type=number_arg(), default=None, help="lora_alpha (default: r, so scaling 1)")
    p.add_argument("--rslora", action="store_true", help="scaling alpha/sqrt(r) instead of alpha/r")
    p.add_argument("--seed", type=unsigned_arg(64), default=0,
                   help="RNG seed for slora, in [0, 2^64) as torch takes it (default: %(default)s)")
    p.add_argument("--tied-form", action="store_true",
                   help="write the compact tied form (lora_N only + family key); nlora variants only")
    p.add_argument("--out", type=out_dir_arg, required=True,
                   help="output directory (created; must not hold an adapter)")
    p.set_defaults(func=_init)

    p = subparsers.add_parser("convert", help="NLoRA -> plain LoRA (fold N into B) or LoRA -> NLoRA (N = I)",
                              description="Convert SRC exactly (up to float rounding) and write the full form.")
    p.add_argument("src", help="source adapter directory")
    p.add_argument("--to", choices=["lora", "nlora"], required=True, help="target form")
    p.add_argument("--out", type=out_dir_arg, required=True,
                   help="output directory (created; must not hold an adapter)")
    _common(p)
    p.set_defaults(func=_convert)

    add_tune_subcommand(subparsers)
    from nlora_serve.adapters.compress.cli import add_compress_subcommand

    add_compress_subcommand(subparsers)
    from nlora_serve.client.cli import add_server_adapter_subcommands

    add_server_adapter_subcommands(subparsers)
    from nlora_serve.adapters.history_cli import add_history_subcommands

    add_history_subcommands(subparsers)


def main(argv: list[str] | None = None) -> int:
    """Standalone entry: ``python -m nlora_serve.adapters.cli {inspect,init,convert} ...``."""
    parser = argparse.ArgumentParser(prog="nlora-serve adapters")
    parser.add_argument("--cache-dir", default=None, help="cache root for prepared models (default: "
                        "$NLORA_SERVE_CACHE, else $XDG_CACHE_HOME/nlora-serve)")
    add_adapter_subcommands(parser.add_subparsers(dest="adapters_command", required=True))
    args = parser.parse_args(argv)
    try:
        return args.func(args)
    except NloraError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
