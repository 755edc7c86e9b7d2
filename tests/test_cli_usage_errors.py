"""Usage errors of the `nlora-serve` commands: each names what is wrong and, where it is clear, what to
type instead (a vLLM flag's counterpart, the closest option, the word meant as an option's value)."""

import re

import pytest

from nlora_serve.cli import build_parser
from test_cli import SUBCOMMANDS, _subparsers  # tests/, on sys.path as pytest puts it


@pytest.mark.parametrize("argv, message", [
    (["tune", "--lr", "0"], "argument --lr: must be a number > 0; got 0"),
    (["tune", "--lr", "inf"], "argument --lr: must be a finite number; got inf"),
    (["tune", "--weight-decay", "-1"], "argument --weight-decay: must be a number >= 0; got -1"),
    (["tune", "--alpha", "nan"], "argument --alpha: must be a finite number; got nan"),
    # h143: at alpha 0 the delta is 0 whatever N is: N's gradient is 0, the run trained nothing
    (["tune", "--alpha", "0"], "argument --alpha: must be a number > 0; got 0"),
    (["tune", "--alpha", "-16"], "argument --alpha: must be a number > 0; got -16"),
    (["tune", "--unlikelihood-weight", "0"], "argument --unlikelihood-weight: must be a number > 0; got 0"),
    (["init", "--alpha=-inf"], "argument --alpha: must be a finite number; got -inf"),
    (["compress", "--threshold", "nan"], "argument --threshold: must be a finite number; got nan"),
])
def test_adapters_float_flags_are_finite_and_in_range(capsys, argv, message):
    """nan and inf parse as floats: `type=float` let `--lr inf` or `--alpha nan` through to train or
    write a useless adapter; now a usage error (exit 2) naming the flag, before any work."""
    from nlora_serve.cli import main as cli_main

    with pytest.raises(SystemExit) as exit_:
        cli_main(["adapters", *argv])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].endswith(f"error: {message}")


@pytest.mark.parametrize("argv, message", [
    (["serve", "--tenant-file", "t.json"],
     "unrecognized arguments: --tenant-file t.json; did you mean --tenants-file?"),
    (["client", "generate", "--max_tokens", "5", "--message", "hi"],
     "unrecognized arguments: --max_tokens 5; did you mean --max-tokens?"),
    (["adapters", "tune", "--data", "d.jsonl", "--out", "o", "--stpes", "3"],
     "unrecognized arguments: --stpes 3; did you mean --steps?"),
    (["keys", "new", "--log-level", "DEBUG"],
     "unrecognized arguments: --log-level DEBUG; --log-level is an option of nlora-serve itself: put it "
     "before the command (nlora-serve --log-level ... keys)"),
    (["serve", "HuggingFaceTB/SmolLM2-135M-Instruct", "--port", "0"],
     "unrecognized arguments: HuggingFaceTB/SmolLM2-135M-Instruct; the model is an option here: "
     "--model HuggingFaceTB/SmolLM2-135M-Instruct"),
    (["serve", "--enable-lora", "--lora-modules", "a=b"],
     "unrecognized arguments: --enable-lora --lora-modules a=b; --enable-lora: adapters are always on here: "
     "drop it; --lora-modules: register adapters with --adapter NAME=DIR (repeatable)"),
    # vLLM has --max-loras too: "did you mean --max-loras?" read as a renamed flag
    (["serve", "--max-cpu-loras", "4"],
     "unrecognized arguments: --max-cpu-loras 4; --max-cpu-loras: the native engine keeps no CPU cache of LoRAs "
     "to size: --max-loras bounds the untied adapters resident at once and an evicted one is read again from "
     "--adapter-dir; with --backend vllm, pass --vllm-arg max_cpu_loras=N"),
    # vLLM flags a newcomer passes by habit (h76): each said only "unrecognized arguments"
    (["serve", "--trust-remote-code", "--disable-log-requests"],
     "unrecognized arguments: --trust-remote-code --disable-log-requests; --trust-remote-code: models run on this "
     "engine's own Llama-family code, never on code from the model folder: drop it; --disable-log-requests: "
     "requests are logged one by one only with --enable-log-requests (off by default): drop it"),
    (["serve", "--uvicorn-log-level", "debug"],
     "unrecognized arguments: --uvicorn-log-level debug; --uvicorn-log-level: the HTTP server logs only its "
     "warnings and errors, with no access log; this server's own level is nlora-serve --log-level LEVEL serve ..."),
    # vLLM engine flags that still said only "unrecognized arguments" (h85)
    (["serve", "--enable-chunked-prefill", "--kv-cache-dtype", "fp8"],
     "unrecognized arguments: --enable-chunked-prefill --kv-cache-dtype fp8; --enable-chunked-prefill: prefills "
     "are always chunked here, to --max-num-batched-tokens per step: drop it; --kv-cache-dtype: the native "
     "engine's KV cache is in --dtype (no fp8 cache); with --backend vllm, pass --vllm-arg kv_cache_dtype=fp8"),
    (["serve", "--swap-space", "4", "--block-size", "32"],
     "unrecognized arguments: --swap-space 4 --block-size 32; --swap-space: a preempted request's KV blocks are "
     "freed and recomputed (from the prefix cache where it holds them), never swapped to host memory: drop it; "
     "--block-size: the native engine's KV blocks are 16 tokens; with --backend vllm, pass "
     "--vllm-arg block_size=N"),
    (["serve", "--quantization", "awq", "--lora-dtype", "bfloat16", "--fully-sharded-loras"],
     "unrecognized arguments: --quantization awq --lora-dtype bfloat16 --fully-sharded-loras; --quantization: "
     "the native engine runs the weights in --dtype (a .gguf is de-quantized when prepared); with --backend "
     "vllm, pass --vllm-arg quantization=METHOD; --lora-dtype: adapters run in the model's --dtype: drop it; "
     "--fully-sharded-loras: the native engine runs on one device; with --backend vllm, pass "
     "--vllm-arg fully_sharded_loras=true"),
    (["serve", "--download-dir", "/d"],
     "unrecognized arguments: --download-dir /d; --download-dir: nothing is downloaded here: --model ORG/NAME "
     "is read from the Hugging Face cache ($HF_HUB_CACHE, else $HF_HOME/hub; fill it with "
     "`hf download ORG/NAME`)"),
    # h117: difflib's guesses misled (vLLM has --max-loras and --tensor-parallel-size too, meaning other things)
    (["serve", "--max-logprobs", "5"],
     "unrecognized arguments: --max-logprobs 5; --max-logprobs: a request asks at most 20 log-probabilities per "
     "token (top_logprobs, logprobs and prompt_logprobs: 0..20, vLLM's default max_logprobs), fixed here: drop it"),
    (["serve", "--data-parallel-size", "2"],
     "unrecognized arguments: --data-parallel-size 2; --data-parallel-size: one server is one engine replica: run a "
     "server per replica (each with its own --adapter-dir) behind a load balancer"),
    (["serve", "--ssl-certfile", "c.pem"],
     "unrecognized arguments: --ssl-certfile c.pem; --ssl-certfile: both servers speak plain HTTP and gRPC: "
     "terminate TLS in a proxy in front (nginx, Envoy)"),
    # h117: vLLM's --served-model-name takes several names; the second was read as a model given positionally
    (["serve", "--served-model-name", "a", "b", "c", "--port", "0"],
     "unrecognized arguments: b c; --served-model-name takes one name here (vLLM's takes several): the base model "
     "answers to that one"),
    (["serve", "--served-model-name=a", "b"],
     "unrecognized arguments: b; --served-model-name takes one name here (vLLM's takes several): the base model "
     "answers to that one"),
    (["serve", "Qwen/Qwen3-8B", "--served-model-name", "a"],
     "unrecognized arguments: Qwen/Qwen3-8B; the model is an option here: --model Qwen/Qwen3-8B"),
    (["client", "generate", "--model", "lower", "--message", "hi"],
     "unrecognized arguments: --model lower; an adapter is chosen with --adapter NAME here (the HTTP API's "
     "'model')"),
    (["client", "generate", "--message", "hi", "there"], "unrecognized arguments: there"),  # nothing to suggest
])
def test_an_unknown_argument_is_reported_by_its_subcommand_with_what_to_type_instead(capsys, argv, message):
    """A newcomer's find: `serve --tenant-file x` or `client generate --max_tokens 5` printed the top
    level's usage (`nlora-serve [-h] ... COMMAND ...`) and no hint; vLLM's `serve MODEL
    --lora-modules ...` the same."""
    from nlora_serve.cli import main as cli_main

    with pytest.raises(SystemExit) as exit_:
        cli_main(argv)
    assert exit_.value.code == 2
    err = capsys.readouterr().err.splitlines()
    command = " ".join(a for a in argv[:2] if a in SUBCOMMANDS.get(argv[0], []) or a == argv[0])
    assert err[0].startswith(f"usage: nlora-serve {command} "), err[0]
    assert err[-1] == f"nlora-serve {command}: error: {message}"


def test_the_vllm_serve_hints_name_options_that_serve_takes():
    from nlora_serve.cli import VLLM_SERVE_OPTIONS

    parser = build_parser(only="serve")
    serve = _subparsers(parser).choices["serve"]
    known = {s for a in serve._actions for s in a.option_strings}
    top = {s for a in parser._actions for s in a.option_strings}  # a hint may name --log-level
    for flag, hint in VLLM_SERVE_OPTIONS.items():
        assert flag not in known, flag  # else it is ours, and never reaches the hint
        assert set(re.findall(r"--[a-z-]+", hint)) <= known | top, (flag, hint)


@pytest.mark.parametrize("argv, message", [
    (["--max-model-len", "1"], "error: --max-model-len 1: must be >= 2 (one prompt token and one generated token); "
                               "got 1\n"),
    (["--max-num-seqs", "0"], "error: --max-num-seqs 0: must be a positive integer; got 0\n"),
    (["--dtype", "half"], "error: --dtype half: this engine computes in float32 or bfloat16 only (it has no float16 "
                          "kernels); use --dtype bfloat16 (2 bytes a value, as float16) or float32\n"),
])
def test_generate_names_a_bad_flag_as_typed_not_the_config_class_that_checked_it(capsys, argv, message):
    # It printed "error: SchedulerConfig.max_model_len must be >= 2 ...": a class a user never sees.
    from nlora_serve.cli import main as cli_main

    assert cli_main(["generate", "--message", "Hi", *argv]) == 2
    assert capsys.readouterr().err == message


@pytest.mark.parametrize("value, hint", [
    ("examples/tenants/lower", "; to serve that folder as 'lower': --adapter lower=examples/tenants/lower"),
    ("examples/tenants/lower/", "; to serve that folder as 'lower': --adapter lower=examples/tenants/lower/"),
    ('{"name": "x", "path": "/a"}', " (vLLM's JSON form of --lora-modules is not taken: give --adapter NAME=DIR)"),
    ("=x", ""),
])
def test_an_adapter_flag_without_a_name_says_what_to_type(capsys, value, hint):
    # h117: `serve --adapter examples/tenants/lower` said only "expected NAME=DIR"
    from nlora_serve.cli import main as cli_main

    with pytest.raises(SystemExit):
        cli_main(["serve", "--adapter", value])
    err = capsys.readouterr().err.splitlines()[-1]
    assert err == f"nlora-serve serve: error: argument --adapter: expected NAME=DIR, got {value!r}{hint}"


@pytest.mark.parametrize("text, value", [("2048", 2048), ("1k", 1000), ("25.6k", 25600), ("1K", 1024),
                                         ("8K", 8192), ("2G", 2 * 1024 ** 3), ("1m", 10 ** 6)])
@pytest.mark.parametrize("command", [["serve"], ["generate", "--message", "Hi"]])
def test_size_flags_take_vllms_human_readable_integers(command, text, value):
    # h117: vLLM reads --max-model-len, --max-num-batched-tokens and --kv-cache-memory-bytes with
    # human_readable_int (vllm/engine/arg_utils.py): `--max-model-len 8k` was "invalid int value: '8k'" here
    args = build_parser().parse_args([*command, "--max-model-len", text, "--max-num-batched-tokens", text,
                                      "--kv-cache-memory-bytes", text])
    assert (args.max_model_len, args.max_num_batched_tokens, args.kv_cache_memory_bytes) == (value, value, value)


def test_a_binary_size_suffix_takes_a_whole_number(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--max-model-len", "1.5K"])
    assert capsys.readouterr().err.splitlines()[-1] == ("nlora-serve serve: error: argument --max-model-len: '1.5K': "
                                                        "a binary suffix (K) takes a whole number; did you mean 1.5k?")


@pytest.mark.parametrize("argv, hint", [
    (["adapters", "unload", "acme"], "; the adapter's name goes after --name: --name acme"),
    (["client", "load", "--server=h:1", "acme"], "; the adapter's name goes after --name: --name acme"),
    (["client", "--server", "h:1", "unload", "--api-key", "k", "acme"],  # option values are no name
     "; the adapter's name goes after --name: --name acme"),
    (["adapters", "upload", "./my-tenant"], "; the adapter's name on the server goes after --name, e.g. --name acme"),
    (["adapters", "unload"], ""),
])
def test_a_missing_name_names_the_word_meant_as_one(capsys, argv, hint):
    # h117: `adapters unload acme` said only "the following arguments are required: --name"
    from nlora_serve.cli import main as cli_main

    with pytest.raises(SystemExit):
        cli_main(argv)
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.endswith(f"error: the following arguments are required: --name{hint}"), err


@pytest.mark.parametrize("argv, hint", [
    (["client", "generate", "--adapter", "lower", "hi there"],
     "; the text goes after --message (one chat turn) or --prompt (raw text): --message 'hi there'"),
    (["client", "generate", "--adapter", "lower"], ""),
])
def test_client_generate_names_the_text_meant_as_a_message(capsys, argv, hint):
    # h117: `client generate --adapter lower "hi"` said only "one of the arguments --prompt --message is required"
    from nlora_serve.cli import main as cli_main

    with pytest.raises(SystemExit):
        cli_main(argv)
    err = capsys.readouterr().err.splitlines()[-1]
    assert err.endswith(f"error: one of the arguments --prompt --message is required{hint}"), err


@pytest.mark.parametrize("argv, usage, message", [
    (["serve", "--enable-prefix-cachng"], "usage: nlora-serve serve [options] (all of them: nlora-serve serve --help)",
     "unrecognized arguments: --enable-prefix-cachng; did you mean --enable-prefix-caching?"),
    (["serve", "--lora-modules", "a=b"], "usage: nlora-serve serve [options] (all of them: nlora-serve serve --help)",
     "unrecognized arguments: --lora-modules a=b; --lora-modules: register adapters with --adapter NAME=DIR "
     "(repeatable)"),
    (["serve", "--port", "x"], "usage: nlora-serve serve [options] (all of them: nlora-serve serve --help)",
     "argument --port: invalid int value: 'x'"),
    (["generate", "--max-tokns", "3"], "usage: nlora-serve generate (--prompt PROMPT | --message MESSAGE | "
     "--chat-json FILE) [options] (all of them: nlora-serve generate --help)",
     "one of the arguments --prompt --message --chat-json is required"),
    (["adapters", "tune", "--stpes", "3"], "usage: nlora-serve adapters tune --data FILE.jsonl --out DIR [options] "
     "(all of them: nlora-serve adapters tune --help)", "the following arguments are required: --data, --out"),
])
def test_a_usage_error_of_a_long_command_is_two_lines_not_its_whole_usage(capsys, argv, usage, message):
    """h130: a vLLM flag or a typo given to serve printed its 40-line usage above the line that said
    what was wrong (generate 26, bench 21, adapters tune 14); now that line, below one usage line
    with what the command requires and where its options are listed."""
    from nlora_serve.cli import main as cli_main

    with pytest.raises(SystemExit) as exit_:
        cli_main(argv)
    assert exit_.value.code == 2
    command = " ".join(argv[:2] if argv[0] == "adapters" else argv[:1])
    assert capsys.readouterr().err.splitlines() == [usage, f"nlora-serve {command}: error: {message}"]


def test_a_usage_error_of_a_short_command_keeps_its_whole_usage(capsys):
    from nlora_serve.cli import main as cli_main

    with pytest.raises(SystemExit):
        cli_main(["client", "generate", "--max-tokens", "3"])
    err = capsys.readouterr().err.splitlines()
    assert err[0].startswith("usage: nlora-serve client generate [-h] (--prompt PROMPT | --message MESSAGE)")
    assert "[--timeout TIMEOUT]" in err[-2] and len(err) > 3


@pytest.mark.parametrize("argv, usage", [
    (["serve"], "usage: nlora-serve serve [options]"),
    (["generate"], "usage: nlora-serve generate (--prompt PROMPT | --message MESSAGE | --chat-json FILE) [options]"),
    (["adapters", "tune"], "usage: nlora-serve adapters tune --data FILE.jsonl --out DIR [options]"),
])
def test_the_help_of_a_long_command_opens_with_one_usage_line(capsys, argv, usage):
    """serve --help opened with 40 lines of usage before its first flag group (vLLM's is one line);
    now one line with what the command requires, every flag still listed below it by group."""
    from nlora_serve.cli import main as cli_main

    with pytest.raises(SystemExit) as exit_:
        cli_main([*argv, "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert out.splitlines()[:2] == [usage, ""]
    parser = build_parser()
    for word in argv:
        parser = _subparsers(parser).choices[word]
    # every flag is still in the help, and the parser's usage is its full one again (for errors)
    assert all(o in out for a in parser._actions for o in a.option_strings)
    assert parser.usage is None and parser.format_usage().count("\n") > 10


def test_the_help_of_a_short_command_keeps_its_whole_usage(capsys):
    from nlora_serve.cli import main as cli_main

    with pytest.raises(SystemExit):
        cli_main(["client", "generate", "--help"])
    assert capsys.readouterr().out.startswith("usage: nlora-serve client generate [-h] (--prompt PROMPT | --message")


@pytest.mark.parametrize("argv", [["adapters", "load", "--name", "lower", "--version", "0"],
                                  ["client", "load", "--name", "lower", "--version", "0"]])
def test_a_rollback_to_version_0_is_a_usage_error_not_a_plain_load(capsys, argv):
    """Versions start at 1 (`adapters rollback --to` takes >= 1): `adapters load --version 0` was taken,
    sent as the proto's unset 0, and ran a plain load, exit 0, rolling nothing back (s29-newcomer)."""
    from nlora_serve.cli import main as cli_main

    with pytest.raises(SystemExit) as exit_:
        cli_main(argv)
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].endswith(
        "error: argument --version: must be an integer in [1, 18446744073709551615]; got 0")
