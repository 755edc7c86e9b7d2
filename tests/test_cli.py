"""The ``nlora-serve`` entry point: a command imports only its own modules."""

import os
import re
import subprocess
import sys

import pytest

from nlora_serve.cli import COMMANDS, _command_of, build_parser

PROBE = """
import sys
from nlora_serve.cli import main
try:
    main({argv!r})
except SystemExit:
    pass
print(sorted(m for m in ("torch", "transformers", "fastapi") if m in sys.modules))
"""


@pytest.mark.parametrize("argv,command", [
    (["client", "list"], "client"),
    (["--log-level", "DEBUG", "keys", "--count", "2"], "keys"),
    (["--cache-dir", "serve", "models", "list"], "models"),  # an option's value is not a command
    (["--log-level=DEBUG", "bench", "--help"], "bench"),
    (["--help"], None),
    (["nosuch"], None),
    ([], None),
])
def test_the_command_is_found_past_global_options(argv, command):
    assert _command_of(argv) == command


@pytest.mark.parametrize("argv", [["client", "--help"], ["keys", "--help"], ["--help"], ["adapters", "--help"],
                                  ["adapters", "list", "--server", "127.0.0.1:1", "--timeout", "2"],
                                  ["serve", "--help"], ["generate", "--help"], ["serve", "--no-such-flag"],
                                  ["generate", "--message", "Hi", "--max-tokns", "8"], ["models", "list"],
                                  ["models", "prepare", "--model", "no/such/model/dir"],
                                  ["adapters", "inspect", "no/such/adapter/dir"],
                                  ["adapters", "convert", "no/such/adapter/dir", "--to", "lora", "--out", "x"]])
def test_light_commands_do_not_import_the_engine(argv):
    # The client and key tools start in a fraction of a second: no torch / transformers / FastAPI.
    # So do the adapters group's server commands (h76: `adapters list`, `upload`, `swap` took 4-10 s,
    # their `client` twins 0.5 s: the adapters package imported torch on the way), and serve's and
    # generate's --help and a mistyped flag of theirs (h80: 2-10 s before argparse's answer, as their
    # flags' defaults came from modules that import torch), and `models list` or a --model that does not
    # exist (h110: 1.4 s of torch's import first, the models package imported all its modules), and
    # `adapters inspect` or `convert` of a folder that does not exist (1.7 s before naming it).
    out = subprocess.run([sys.executable, "-c", PROBE.format(argv=argv)], capture_output=True,
                         text=True, timeout=120, check=True).stdout
    assert out.strip().splitlines()[-1] == "[]"


def test_the_full_parser_still_has_every_command_with_its_arguments():
    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    assert set(sub.choices) == set(COMMANDS)
    args = parser.parse_args(["client", "--server", "h:1", "list"])
    assert args.server == "h:1" and callable(args.func)
    bare = build_parser(only="keys")
    with pytest.raises(SystemExit):  # a command registered bare takes no arguments
        bare.parse_args(["client", "--server", "h:1", "list"])


def test_generate_chat_json_nested_past_the_parser_is_one_error(tmp_path):
    import argparse

    from nlora_serve.errors import NloraError
    from nlora_serve.serving.commands.generate import _prompt_ids

    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    args = argparse.Namespace(prompt=None, chat_json=str(deep))
    with pytest.raises(NloraError, match="cannot read a JSON message list"):  # not a RecursionError traceback
        _prompt_ids(args, tokenizer=None)


@pytest.mark.parametrize("flag, special", [([], True), (["--add-special-tokens"], True),
                                           (["--no-add-special-tokens"], False)])
def test_generate_prompt_takes_the_tokenizers_special_tokens_unless_turned_off(bos_tokenizer_dir, flag, special):
    """As a vLLM completion of the text (and transformers' ``tokenizer(prompt)``); a chat gets only
    its template's, whatever the flag."""
    from transformers import AutoTokenizer

    from nlora_serve.serving.commands.generate import _prompt_ids

    tok = AutoTokenizer.from_pretrained(bos_tokenizer_dir)
    args = build_parser().parse_args(["generate", "--prompt", "Paris is the capital of", *flag])
    want = tok("Paris is the capital of", add_special_tokens=special).input_ids
    assert _prompt_ids(args, tok) == want and (want[0] == tok.bos_token_id) == special
    chat = build_parser().parse_args(["generate", "--message", "Hi", *flag])
    rendered = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True)
    assert _prompt_ids(chat, tok) == tok(rendered, add_special_tokens=False).input_ids


# Every subcommand a user can run, by group (README "Commands" and each group's --help), written out
# here rather than read from the parser, so a new subcommand must be added to this table too.
SUBCOMMANDS = {
    "models": ["prepare", "list"],
    "adapters": ["inspect", "init", "convert", "tune", "compress", "list", "upload", "swap", "unload", "load"],
    "client": ["generate", "info", "list", "upload", "swap", "unload", "load"],
    "keys": ["new", "hash"],
}


def _subparsers(parser):
    return next(a for a in parser._actions if a.dest and a.dest.endswith("command"))


@pytest.mark.parametrize("group", sorted(SUBCOMMANDS))
def test_each_group_help_lists_every_subcommand_in_its_usage_and_the_top_level_summary(group):
    # A newcomer's find: `adapters --help` listed `compress` below but not in its usage line, and the
    # top-level summaries of `adapters` and `client` left out compress / info / load.
    parser = build_parser(only=group)
    command = _subparsers(parser).choices[group]
    assert list(_subparsers(command).choices) == SUBCOMMANDS[group]
    usage = command.format_usage()
    assert "{" + ",".join(SUBCOMMANDS[group]) + "}" in usage, usage
    if len(SUBCOMMANDS[group]) > 2:  # "prepare and list", "make API keys and their hashes" say it in words
        summary = COMMANDS[group][0] + " " + (COMMANDS[group][1] or "")
        missing = [name for name in SUBCOMMANDS[group] if not re.search(rf"\b{name}\b", summary)]
        assert not missing, (group, summary)


def test_every_subcommand_help_opens_with_what_it_does():
    # A newcomer's find (h54): `client swap --help` and the other server commands had a usage line
    # and options but no sentence of what the command does
    parser = build_parser()
    for group, names in SUBCOMMANDS.items():
        for name in names:
            leaf = _subparsers(_subparsers(parser).choices[group]).choices[name]
            assert leaf.description and leaf.description.split("\n")[0][:20] in leaf.format_help(), (group, name)


def test_every_option_of_every_subcommand_has_help_text():
    parser = build_parser()
    for group, names in SUBCOMMANDS.items():
        for name in names:
            leaf = _subparsers(_subparsers(parser).choices[group]).choices[name]
            bare = [a.option_strings or [a.dest] for a in leaf._actions if not a.help]
            assert not bare, (group, name, bare)


@pytest.mark.parametrize("argv, unbuffered", [(["keys", "new"], "1"), (["keys", "new"], ""),
                                             (["adapters", "--help"], "")])
def test_a_closed_stdout_ends_quietly_with_sigpipes_status(argv, unbuffered):
    # A newcomer's find: `nlora-serve client list | head -5` ended in a BrokenPipeError traceback.
    # The reader of stdout is closed before the command writes, so its write (unbuffered) or the
    # last flush (buffered; argparse's --help swallows a failed write of its own) fails with EPIPE.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONUNBUFFERED"}
    env.update({"PYTHONUNBUFFERED": unbuffered} if unbuffered else {})
    proc = subprocess.Popen([sys.executable, "-m", "nlora_serve.cli", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=env)
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait(timeout=120) == 141 and err == ""


@pytest.mark.parametrize("argv, message", [
    (["tune", "--lr", "0"], "argument --lr: must be a number > 0; got 0"),
    (["tune", "--lr", "inf"], "argument --lr: must be a finite number; got inf"),
    (["tune", "--weight-decay", "-1"], "argument --weight-decay: must be a number >= 0; got -1"),
    (["tune", "--alpha", "nan"], "argument --alpha: must be a finite number; got nan"),
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


def test_generate_says_what_it_loads_on_stderr_and_prints_only_the_text_on_stdout(base_fp32, base_greedy):
    # A newcomer's find: `generate` sat silent for 12-40 s while it loaded the model and started the
    # engine. The log (stderr) now names each phase; stdout stays the generated text alone, here
    # the recorded transformers greedy reference (tests/data/cases/BASE_GREEDY.json).
    ref = base_greedy[0]
    tokenizer = base_fp32.tokenizer()
    prompt = tokenizer.decode(ref["prompt_token_ids"])
    num_tokens = 6
    proc = subprocess.run([sys.executable, "-m", "nlora_serve.cli", "generate", "--prompt", prompt,
                           "--no-add-special-tokens", "--dtype", "float32", "--max-tokens", str(num_tokens),
                           "--max-model-len", "256", "--kv-cache-memory-bytes", str(32 << 20)],  # not 1 GiB
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == tokenizer.decode(ref["greedy_token_ids"][:num_tokens]) + "\n"
    phases = [r"INFO nlora_serve\.generate: loading model default \(cpu, float32\)\.\.\.$",
              r"INFO nlora_serve\.generate: model loaded from \S+ in [\d.]+ s; starting the engine",
              r"INFO nlora_serve\.generate: engine started in [\d.]+ s; generating$"]
    lines = proc.stderr.splitlines()
    found = [[i for i, line in enumerate(lines) if re.search(phase, line)] for phase in phases]
    assert all(len(at) == 1 for at in found) and found == sorted(found), proc.stderr


@pytest.mark.parametrize("command", [["serve"], ["generate", "--message", "Hi"]])
@pytest.mark.parametrize("spelling, dtype", [("float32", "float32"), ("float", "float32"), ("bfloat16", "bfloat16"),
                                             ("half", None), ("float16", None)])
def test_dtype_takes_each_of_vllms_spellings_and_refuses_float16_by_name(command, spelling, dtype):
    # vLLM 0.32's --dtype choices (vllm/config/model.py ModelDType): auto, half, float16, bfloat16, float,
    # float32 ("float" is float32, "half" float16). The engine has no float16 kernels: half and float16
    # parse, then are refused naming the spelling given and what runs instead.
    import torch

    from nlora_serve.serving.commands.engine_flags import device_config

    args = build_parser().parse_args([*command, "--dtype", spelling])
    if dtype is None:
        with pytest.raises(ValueError, match=f"^--dtype {spelling}: this engine computes in float32 or bfloat16 only"):
            device_config(args)
    else:
        assert device_config(args).dtype is getattr(torch, dtype)


def test_dtype_choices_are_vllms(capsys):
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--dtype", "fp16"])
    assert "(choose from 'auto', 'half', 'float16', 'bfloat16', 'float', 'float32')" in capsys.readouterr().err


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


@pytest.mark.parametrize("argv", [["client", "list"], ["client", "generate", "--message", "hi"], ["adapters", "list"],
                                  ["adapters", "upload", "--name", "acme", "dir"], ["bench", "--num-requests", "1"]])
def test_nlora_server_is_the_default_server_of_every_grpc_client_command(monkeypatch, argv):
    """A newcomer on other ports (make serve GRPC_PORT=51085) typed --server on every client, adapters
    and bench command, and a forgotten one failed to connect to 50051; $NLORA_SERVER, as
    $NLORA_API_KEY for the key, is set once."""
    monkeypatch.setenv("NLORA_SERVER", "10.0.0.7:51085")
    assert build_parser(only=argv[0]).parse_args(argv).server == "10.0.0.7:51085"
    given = [*argv[:1], "--server", "h:2", *argv[1:]] if argv[0] == "client" else [*argv, "--server", "h:2"]
    assert build_parser(only=argv[0]).parse_args(given).server == "h:2"  # the flag wins
    monkeypatch.delenv("NLORA_SERVER")
    assert build_parser(only=argv[0]).parse_args(argv).server == "127.0.0.1:50051"
    monkeypatch.setenv("NLORA_SERVER", "")  # set but empty, as an unset variable pasted
    assert build_parser(only=argv[0]).parse_args(argv).server == "127.0.0.1:50051"


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
