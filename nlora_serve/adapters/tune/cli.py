"""``adapters tune``: train an IntTune tenant (only N) on a JSONL file of chat examples.

``add_tune_subcommand(subparsers)`` registers it on an ``adapters`` subparsers object (sets
``func(args) -> exit code``); ``nlora-serve adapters tune ...`` runs it.
"""

from __future__ import annotations

import argparse

from nlora_serve.arg_types import integer_arg, number_arg, out_dir_arg, unsigned_arg

DESCRIPTION = """\
IntTune (NLoRA, arXiv 2502.14482): Nystrom-initialise every targeted projection (A = W[:r,:],
B = W[:,:r], frozen views of the base weight) and train only the r x r matrix N on your chat
examples, on the CPU in float32 with the transformers model. The loss counts response tokens only.

Unlikelihood (Welleck et al., ICLR 2020, token-level, fixed negative set): --unlikely-tokens REGEX
makes every vocabulary token whose decoded text matches a negative candidate (special tokens such
as the chat template's end token never are); each response position's loss becomes
  cross-entropy + lambda * -log(1 - p(any negative token other than the target)),
so e.g. --unlikely-tokens '[A-Z]' teaches a lower-case tenant to put no mass on capitals.

Data: one JSON object per line, {"prompt": "...", "response": "..."} or
{"messages": [{"role": "user", "content": "..."}, {"role": "assistant", "content": "..."}, ...]},
rendered with the model's chat template (every assistant turn is trained on).

Output: --out gets the compact tied form (adapter_config.json with the family key +
adapter_model.safetensors holding only lora_N: r*r numbers per module), which any server with the
same base model serves, uploads or hot-swaps as a tenant of the Nystrom family of that r/targets.
"""


def _tune(args: argparse.Namespace) -> int:
    from nlora_serve.adapters.tune.train import TuneConfig, check_outputs, tune
    from nlora_serve.adapters.tune.data import read_examples
    from nlora_serve.models import load_base

    check_outputs(args.out, args.also_full_form)  # before the data and the model load (tune checks again)

    targets = args.targets[0] if args.targets == ["all-linear"] else args.targets
    cfg = TuneConfig(rank=args.rank, targets=targets, n_init=args.n_init, alpha=args.alpha, lr=args.lr,
                     epochs=args.epochs, steps=args.steps, batch_size=args.batch_size, grad_accum=args.grad_accum,
                     warmup=args.warmup, held_out=args.held_out, seed=args.seed, max_len=args.max_len,
                     weight_decay=args.weight_decay, unlikely_tokens=args.unlikely_tokens,
                     unlikelihood_weight=args.unlikelihood_weight)
    examples = read_examples(args.data)
    base = load_base(args.model, cache_dir=getattr(args, "cache_dir", None))
    result = tune(base, examples, cfg, out_dir=args.out, full_out_dir=args.also_full_form,
                  progress=not args.quiet)
    held = ("n/a" if result.held_out_before is None else
            f"{result.held_out_before:.4f} -> {result.held_out_after:.4f}")
    print(f"wrote {args.out} ({result.adapter.held_bytes()} bytes of N, family {result.adapter.family_key[:16]})")
    print(f"steps {result.steps}, {result.num_train} train / {result.num_held_out} held-out examples, "
          f"{result.seconds:.1f} s; train loss {result.train_first:.4f} -> {result.train_last:.4f}; "
          f"held-out loss {held} (nats/token)")
    if result.unlikely_before is not None:
        print(f"held-out probability of --unlikely-tokens per response token {result.unlikely_before:.5f} -> "
              f"{result.unlikely_after:.5f}")
    return 0


def _positive_fraction(text: str) -> float:
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"{text}: expected a fraction in [0, 1)")
    return value


def add_tune_subcommand(subparsers: argparse._SubParsersAction) -> None:
    """Register ``tune`` on an ``adapters`` subparsers object."""
    p = subparsers.add_parser("tune", help="IntTune: train only N after Nystrom init, on a JSONL chat file",
                              description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="default",
                   help="base model: 'default', a Hugging Face model directory, a .gguf file or a Hugging Face "
                        "ORG/NAME in the HF cache (default: %(default)s)")
    p.add_argument("--data", required=True, metavar="FILE.jsonl", help="training examples (see above)")
    p.add_argument("--out", type=out_dir_arg, required=True, metavar="DIR",
                   help="output directory for the compact tied form (created; must not hold an adapter)")
    p.add_argument("--also-full-form", type=out_dir_arg, default=None, metavar="DIR",
                   help="also write the full reference layout (lora_A, lora_N, lora_B) to DIR, for PEFT-style tools")
    p.add_argument("--rank", type=integer_arg(1), default=16,
                   help="rank r of every adapted projection (default: %(default)s)")
    p.add_argument("--targets", nargs="+", default=["all-linear"],
                   help="projections (q_proj k_proj v_proj o_proj gate_proj up_proj down_proj) or all-linear "
                        "(default: %(default)s)")
    p.add_argument("--n-init", choices=["nystrom", "pinv", "zeros"], default="nystrom",
                   help="start of N: nystrom = W[:r,:r] (the NLoRA reference code), pinv = pinv(W[:r,:r]) "
                        "(classical Nystrom), zeros = start exactly at the base model (default: %(default)s)")
    # > 0: at 0 the delta s * B N A is 0 whatever N is, so N's gradient is 0 and the run trains nothing
    # (and writes an adapter equal to the base model); a negative one only flips the sign N learns
    p.add_argument("--alpha", type=number_arg(0.0, above=True), default=None,
                   help="lora_alpha, > 0; scaling s = alpha/r (default: r, so s = 1)")
    p.add_argument("--lr", type=number_arg(0.0, above=True), default=2e-3, help="AdamW peak learning rate (default: %(default)s)")
    p.add_argument("--weight-decay", type=number_arg(0.0), default=0.0,
                   help="AdamW decoupled weight decay on N (pulls N towards 0) (default: %(default)s)")
    p.add_argument("--unlikely-tokens", default=None, metavar="REGEX",
                   help="unlikelihood training: every token whose decoded text matches REGEX (Python re.search, "
                        "e.g. '[A-Z]') is a negative candidate; special tokens never are")
    p.add_argument("--unlikelihood-weight", type=number_arg(0.0, above=True), default=None, metavar="LAMBDA",
                   help="weight of the unlikelihood term, > 0 (needs --unlikely-tokens; default: 1.0 with it; "
                        "to train without the term, leave out --unlikely-tokens)")
    length = p.add_mutually_exclusive_group()
    length.add_argument("--epochs", type=integer_arg(1), default=1,
                        help="passes over the training split (default: %(default)s)")
    length.add_argument("--steps", type=integer_arg(1), default=None,
                        help="optimizer steps instead of --epochs (each is --batch-size x --grad-accum examples)")
    p.add_argument("--batch-size", type=integer_arg(1), default=4,
                   help="examples per micro-batch (default: %(default)s)")
    p.add_argument("--grad-accum", type=integer_arg(1), default=1,
                   help="micro-batches per optimizer step; the loss is averaged over their tokens (default: %(default)s)")
    p.add_argument("--warmup", type=integer_arg(0), default=0,
                   help="optimizer steps of linear warm-up before the cosine decay to 0 (default: %(default)s)")
    p.add_argument("--held-out", type=_positive_fraction, default=0.1, metavar="FRACTION",
                   help="fraction of examples kept out of training; their loss is reported before and after "
                        "(default: %(default)s)")
    p.add_argument("--seed", type=unsigned_arg(64), default=0,
                   help="seed of the split, the shuffling and torch; same seed, data and flags give the same N "
                        "(default: %(default)s)")
    p.add_argument("--max-len", type=integer_arg(1), default=512,
                   help="tokens per example; longer ones are cut (default: %(default)s)")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_tune)

