"""``nlora-serve adapters compress``: many LoRAs into one family, with a quality report.

    nlora-serve adapters compress --rank 32 --out FAMILY LORA_DIR... (or a folder of them)
    nlora-serve adapters compress --add --out FAMILY LORA_DIR...      (project onto FAMILY's basis)

The output folder is a family (adapters/family.py): copy it into a store (``--adapter-dir``) or register its
member folders (``client load`` / ``adapters upload``); the server finds the factors next to them.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import warnings
from pathlib import Path

from nlora_serve.arg_types import integer_arg, number_arg, out_dir_arg
from nlora_serve.errors import AdapterError

DEFAULT_ADD_THRESHOLD = 0.5  # --add refuses a mean relative error above this unless --force


def adapter_dirs(paths: list[str]) -> list[Path]:
    """Each path, or each adapter folder directly inside a path that is not an adapter itself.

    Raises:
        AdapterError: a path is missing or holds no adapter.
    """
    found = []
    for p in map(Path, paths):
        if (p / "adapter_config.json").is_file():
            found.append(p)
            continue
        inner = sorted(d for d in p.iterdir() if (d / "adapter_config.json").is_file()) if p.is_dir() else []
        if not inner:
            raise AdapterError(f"{p}: not an adapter folder, nor a folder of adapter folders")
        found += inner
    names = [d.name for d in found]
    if len(set(names)) != len(names):
        raise AdapterError(f"two adapters share a folder name (member names come from them): {sorted(names)}")
    return found


def _device(choice: str) -> str:
    import torch  # here, not at the top: `adapters list` and the other server commands import this module

    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return choice


def _compress(args, adapters):
    from tqdm import tqdm

    from nlora_serve.adapters.compress.build import check_collection, check_rank, compress_adapters

    check_collection(adapters)
    for rank, flag in [(args.rank, "--rank"), *((r, "--sweep") for r in args.sweep or [])]:
        check_rank(adapters, rank, flag)  # before any work, the sweep's ranks included
    sites = len(next(iter(adapters.values())).sites)
    device = _device(args.device)
    with tqdm(total=sites, desc=f"compress R={args.rank} on {device}", unit="site") as bar:
        family = compress_adapters(adapters, args.rank, iters=args.iters, device=device,
                                   progress=lambda _: bar.update())
    tradeoff = []
    for rank in sorted(set(args.sweep or []) - {args.rank}):
        other = compress_adapters(adapters, rank, iters=args.iters, device=device)
        tradeoff.append((rank, _mean_error(other.errors)))
    tradeoff = sorted(tradeoff + [(args.rank, _mean_error(family.errors))])
    return family.factors, family.members, family.errors, family.seconds, tradeoff


def _mean_error(errors: dict) -> float:
    values = [e for per in errors.values() for e in per.values()]
    return sum(values) / len(values)


def _add(args, base, adapters, out: Path):
    from nlora_serve.adapters.compress.build import project_adapter
    from nlora_serve.adapters.family import FAMILIES_DIR, FamilyResolver

    keys = sorted(d.name for d in (out / FAMILIES_DIR).iterdir()) if (out / FAMILIES_DIR).is_dir() else []
    key = args.family or (keys[0] if len(keys) == 1 else None)
    if key is None:
        raise AdapterError(f"{out}: --add needs one family under {FAMILIES_DIR}/ (found {len(keys)}); name it with --family")
    factors = FamilyResolver(base.spec, (out,)).get(key)
    members, errors = {}, {}
    for name, adapter in adapters.items():
        members[name], errors[name] = project_adapter(adapter, factors)
        mean = sum(errors[name].values()) / len(errors[name])
        if mean > args.threshold and not args.force:
            raise AdapterError(f"adapter {name!r}: mean relative error {mean:.3f} on the family's basis is over "
                               f"--threshold {args.threshold}; it does not fit this family (recompress the "
                               "collection with it, or pass --force)")
    return factors, members, errors, 0.0, []


def _quality(args, base, dirs, adapters, factors, members, errors):
    from nlora_serve.adapters.compress import report as cr

    rows = {n: cr.weight_errors(n, errors[n]) for n in members}
    if args.no_eval:
        return list(rows.values())
    import torch
    from tqdm import tqdm
    from transformers import AutoTokenizer

    from nlora_serve.models import load_hf_model

    tok = AutoTokenizer.from_pretrained(base.path)
    texts = Path(args.prompts).read_text().splitlines() if args.prompts else list(cr.HELD_PROMPTS)
    prompts = [tok(t)["input_ids"] for t in texts if t.strip()]
    model = load_hf_model(base.path, torch.float32)
    names = [n for n in members if args.eval_names is None or n in args.eval_names]
    plain = [d for d in dirs if d.name in names and cr.is_plain_lora(d)]
    if plain:
        from peft import PeftModel

        with warnings.catch_warnings():
            # PEFT (0.21) reads transformers' deprecated is_gradient_checkpointing while wrapping the
            # model, and transformers (5.x) warns of it on every run; nothing of ours uses it
            warnings.filterwarnings("ignore", message="`is_gradient_checkpointing` is deprecated",
                                    category=FutureWarning)
            model = PeftModel.from_pretrained(model, str(plain[0]), adapter_name=plain[0].name)
        for d in plain[1:]:
            model.load_adapter(str(d), adapter_name=d.name)
    plain_names = {d.name for d in plain}
    # one step per prompt and pass (reference, compressed): the time left shows after the first
    # prompt, not after the first adapter (18 s to 205 s each on a busy 2-core box, see --no-eval)
    with tqdm(total=2 * len(prompts) * len(names), desc="quality", unit="prompt") as bar:
        for name in names:
            bar.set_postfix_str(name)
            fam = {s: b.double() @ members[name][s].double() @ a.double() for s, (a, b) in factors.sites.items()}
            if name in plain_names:
                reference = lambda n=name: _peft_active(model, n)  # noqa: E731
                compressed = lambda f=fam: _peft_off_merged(model, f, cr)  # noqa: E731
            else:
                full = {s: w.delta() for s, w in adapters[name].sites.items()}
                reference = lambda f=full: _off_merged(model, f, cr)  # noqa: E731
                compressed = lambda f=fam: _off_merged(model, f, cr)  # noqa: E731
            agree, kl, count = cr.output_quality(model, prompts, args.new_tokens, reference, compressed, bar.update)
            row = rows[name]
            row.agreement, row.kl, row.tokens = agree, kl, count
            row.reference = "peft" if name in plain_names else "merged"
    return list(rows.values())


@contextlib.contextmanager
def _peft_active(model, name: str):
    model.set_adapter(name)
    yield


@contextlib.contextmanager
def _peft_off_merged(model, deltas, cr):
    with model.disable_adapter(), cr.merged(model, deltas):
        yield


@contextlib.contextmanager
def _off_merged(model, deltas, cr):
    with (model.disable_adapter() if hasattr(model, "disable_adapter") else contextlib.nullcontext()), \
            cr.merged(model, deltas):
        yield


def run(args: argparse.Namespace) -> int:
    """The subcommand: compress (or --add), write the family, print and save the report.

    Nothing is written before the compression and the quality report are done; then the family,
    its members and the report are written all or nothing.

    Raises:
        AdapterError: checked before any work: ``--out`` is a file, an adapter or not writable, a
            member folder there already holds an adapter, ``--json`` or ``--prompts`` is unusable;
            or see the steps.
    """
    import torch

    from nlora_serve.adapters.writing import check_out_dir

    check_out_dir(Path(args.out), "--out")
    _check_file_args(args)
    threads = torch.get_num_threads()
    try:
        if args.threads:
            torch.set_num_threads(args.threads)
        return _run(args)
    finally:
        torch.set_num_threads(threads)


def _run(args: argparse.Namespace) -> int:
    import torch
    from tqdm import tqdm

    from nlora_serve.adapters.compress import report as cr
    from nlora_serve.adapters.compress.build import CompressedFamily, check_members, write_family
    from nlora_serve.adapters.writing import Undo, atomic_write
    from nlora_serve.models import load_base

    base = load_base(args.model, torch.float32, cache_dir=getattr(args, "cache_dir", None))
    dirs = adapter_dirs(args.dirs)
    out = Path(args.out)
    check_members(out, [d.name for d in dirs])
    with tqdm(dirs, desc="read", unit="adapter") as bar:  # closed (its line ended) before an error prints
        adapters = {d.name: _read(d, base, args.max_rank) for d in bar}
    if args.add:
        factors, members, errors, seconds, tradeoff = _add(args, base, adapters, out)
    else:
        factors, members, errors, seconds, tradeoff = _compress(args, adapters)
    rows = _quality(args, base, dirs, adapters, factors, members, errors)
    member_bytes = len(factors.sites) * factors.rank ** 2 * 4
    source = {n: a.full_bytes() for n, a in adapters.items()}
    print(cr.format_table(rows))
    print(f"family {factors.key[:16]}…: R={factors.rank}, {len(factors.sites)} sites, factors {factors.nbytes} bytes once; "
          f"per member {member_bytes} bytes (fp32) against {max(source.values())} bytes as a LoRA "
          f"({max(source.values()) / member_bytes:.1f}x); compression {seconds:.1f} s")
    if tradeoff:
        print("rank trade-off (mean relative error over every site and adapter):")
        for rank, err in tradeoff:
            print(f"  R={rank:<4} {err:.4f}")
    report = {"family": factors.key, "rank": factors.rank, "sites": len(factors.sites), "factor_bytes": factors.nbytes,
              "member_bytes": member_bytes, "source_bytes": source, "compress_seconds": seconds,
              "tradeoff": [{"rank": r, "mean_rel_error": e} for r, e in tradeoff], "adapters": cr.as_json(rows)}
    # a link is written through (its target is the report), as open() would
    path = Path(os.path.realpath(args.json)) if args.json else out / f"compress_report{'_add' if args.add else ''}.json"
    with Undo() as undo:
        write_family(out, CompressedFamily(factors, members, errors), full=args.full_form, undo=undo)
        try:
            earlier = os.path.lexists(path)  # an earlier run's report is replaced whole, or kept on a failure
            atomic_write(path, lambda p: Path(p).write_text(json.dumps(report, indent=2) + "\n"))
            if not earlier:
                undo.created(path)
        except OSError as exc:
            raise AdapterError(f"{path}: cannot write the report ({exc.strerror or exc})") from None
    print(f"wrote {out} and {path}")
    return 0


def _read(folder: Path, base, max_rank: int):
    """One input adapter, read as the server would; its errors name the folder.

    Raises:
        AdapterError: ``adapter 'NAME' (FOLDER): <the reader's reason>``.
    """
    from nlora_serve.adapters.loader import read_adapter

    try:
        return read_adapter(folder, base, max_rank=max_rank, max_bytes=None)
    except AdapterError as exc:
        raise AdapterError(f"adapter {folder.name!r} ({folder}): {exc}") from None


def _check_file_args(args) -> None:
    """``--json``'s folder exists and ``--prompts`` is a readable file, before any work.

    Raises:
        AdapterError: naming the option.
    """
    if args.json:
        report = Path(args.json)
        if report.is_dir() or not report.parent.is_dir():
            raise AdapterError(f"--json {report}: expected a file path in an existing folder")
    if args.prompts and not (Path(args.prompts).is_file() and os.access(args.prompts, os.R_OK)):
        raise AdapterError(f"--prompts {args.prompts}: not a readable file")


def add_compress_subcommand(subparsers: argparse._SubParsersAction) -> None:
    """Register ``compress`` on an ``adapters`` subparsers object."""
    p = subparsers.add_parser(
        "compress", help="compress many LoRAs into one family (shared A/B, one R×R N each)",
        description="Jointly compress LoRA / NLoRA adapters into shared A_f [R, in], B_f [out, R] per module and "
                    "one R×R N per adapter (Compress-then-Serve, Gabrielsson et al., ICML 2025), written as a "
                    "family the server holds at a tied tenant's cost. Prints a quality report (relative "
                    "reconstruction error per module; greedy token agreement and next-token KL against PEFT's "
                    "outputs of the uncompressed adapters on held prompts) and saves it as JSON.")
    p.add_argument("dirs", nargs="+", help="adapter folders, or folders of adapter folders (member name = folder name)")
    p.add_argument("--out", type=out_dir_arg, required=True,
                   help="the family folder (created; with --add, an existing family)")
    p.add_argument("--rank", type=integer_arg(1), default=32, help="family rank R (default: %(default)s)")
    p.add_argument("--sweep", type=integer_arg(1), nargs="*", default=None,
                   help="also compress at these ranks and print the error-vs-R trade-off (e.g. 8 16 64)")
    p.add_argument("--iters", type=integer_arg(0), default=2,
                   help="alternating refinement sweeps (default: %(default)s)")
    p.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto",
                   help="where the SVDs run (auto: CUDA when present; default: %(default)s)")
    p.add_argument("--add", action="store_true",
                   help="project the adapters onto the existing family in --out (its basis unchanged)")
    p.add_argument("--family", default=None, help="with --add: the family key when --out holds several")
    p.add_argument("--threshold", type=number_arg(0.0), default=DEFAULT_ADD_THRESHOLD,
                   help="with --add: refuse an adapter whose mean relative error is above this (default: %(default)s)")
    p.add_argument("--force", action="store_true", help="with --add: add even above --threshold")
    p.add_argument("--full-form", action="store_true",
                   help="members also hold lora_A = A_f, lora_B = B_f: self-contained folders for `adapters upload` "
                        "(the server stores them compact and keeps the factors once)")
    p.add_argument("--prompts", default=None, help="held prompts, one per line (default: four built-in prompts)")
    p.add_argument("--new-tokens", type=integer_arg(1), default=16,
                   help="greedy tokens per prompt (default: %(default)s)")
    p.add_argument("--eval-names", nargs="+", default=None,
                   help="compare outputs for these members only (default: all; the others get weight errors)")
    p.add_argument("--no-eval", action="store_true",
                   help="skip the output comparison (weights errors only). With the default prompts it took "
                        "18 s per member with --threads 1 on a busy 2-core box, 205 s there with torch's default "
                        "threads; --eval-names, --prompts and --new-tokens shorten it")
    p.add_argument("--json", default=None, help="report path (default: OUT/compress_report.json)")
    p.add_argument("--threads", type=integer_arg(1), default=None,
                   help="torch CPU threads for the run (default: torch's; 1 is much faster on an oversubscribed box)")
    p.add_argument("--model", default="default",
                   help="base model: 'default', a Hugging Face model directory, a .gguf file or a Hugging Face "
                        "ORG/NAME in the HF cache (default: %(default)s)")
    p.add_argument("--max-rank", type=integer_arg(1), default=64,
                   help="refuse input adapters above this rank (default: %(default)s)")
    p.set_defaults(func=run)
