"""The ``nlora-serve`` entry point: a command imports only its own modules."""

import argparse
import json
import os
import re
import subprocess
import sys

import pytest

from nlora_serve.cli import COMMANDS, _command_of, _serve_log_format, build_parser

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
    "adapters": ["inspect", "init", "convert", "tune", "compress", "list", "upload", "swap", "unload", "load",
                 "versions", "rollback"],
    "client": ["generate", "info", "list", "upload", "swap", "unload", "load"],
    "keys": ["new", "hash", "list"],
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


@pytest.mark.parametrize("argv, fmt", [
    (["serve", "--log-format", "json"], "json"), (["serve", "--log-format=json", "--port", "1"], "json"),
    (["serve"], "text"), (["serve", "--log-format", "xml"], "text"),  # argparse's error names it
    (["serve", "--log-format"], "text"),
    # abbreviations argparse takes: the log stayed text while args.log_format said json
    (["serve", "--log-f", "json"], "json"), (["serve", "--log-form=json"], "json"),
    (["serve", "--log", "json"], "json"),
])
def test_serve_log_format_is_read_before_the_parser(argv, fmt):
    assert _serve_log_format(argv) == fmt


def test_serve_log_format_flag_takes_text_or_json_and_a_refused_start_says_so_in_json(capsys):
    parser = build_parser(only="serve")
    assert parser.parse_args(["serve"]).log_format == "text"
    assert parser.parse_args(["serve", "--log-format", "json"]).log_format == "json"
    with pytest.raises(SystemExit):
        parser.parse_args(["serve", "--log-format", "xml"])
    assert "argument --log-format: invalid choice: 'xml' (choose from 'text', 'json')" in capsys.readouterr().err
    # a flag refused before the model loads: its one error line is a JSON object too
    run = subprocess.run([sys.executable, "-m", "nlora_serve.cli", "serve", "--log-format", "json", "--max-queue",
                          "0"], capture_output=True, text=True, timeout=120)
    assert run.returncode == 2
    [entry] = [json.loads(line) for line in run.stderr.splitlines()]
    assert (entry["level"], entry["logger"]) == ("ERROR", "nlora_serve")
    assert entry["message"] == "error: --max-queue 0: must be a positive integer; got 0"


@pytest.mark.parametrize("argv, error", [
    (["serve", "--log-format", "json", "--port", "x"], "argument --port: invalid int value: 'x'"),
    (["--log-level", "LOUD", "serve", "--log-format=json"], "argument --log-level: invalid choice: 'LOUD' (choose "
                                                            "from 'DEBUG', 'INFO', 'WARNING', 'ERROR')"),
    (["serve", "--bogus", "--log-format", "json"], "unrecognized arguments: --bogus"),
])
def test_a_usage_error_under_log_format_json_is_one_json_record(argv, error):
    """argparse printed its usage and ``PROG: error: ...`` as plain lines into a JSON log."""
    run = subprocess.run([sys.executable, "-m", "nlora_serve.cli", *argv], capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 2
    [entry] = [json.loads(line) for line in run.stderr.splitlines()]
    prog = "nlora-serve" if argv[0] == "--log-level" else "nlora-serve serve"
    assert (entry["level"], entry["logger"], entry["event"]) == ("ERROR", "nlora_serve", "usage_error")
    assert entry["message"] == f"error: {prog}: {error}" and entry["error"] == error
    assert entry["usage"].startswith(f"usage: {prog} ")


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


# every serve / generate flag's default, as before --help grouped them (h135): grouping moved no flag and
# changed no default (a default changed on purpose changes here too)
SERVE_DEFAULTS = {
    "adapter": [], "adapter_dir": "./nlora-adapters", "adapter_memory": None, "allow_runtime_lora_updating": False,
    "async_scheduling": None, "backend": "native", "cache_dir": argparse.SUPPRESS, "cpu_amx": None, "cpu_gemm": None,
    "device": None, "drain_seconds": 30.0, "dtype": "auto", "enable_auto_tool_choice": False,
    "enable_log_requests": False, "enable_prefix_caching": True, "enforce_eager": False, "engine_step_timeout": None,
    "example_tenants": 0,
    "generation_config": "auto", "gpu_memory_utilization": None, "host": "127.0.0.1", "http_port": 8000,
    "keep_versions": None, "kv_cache_memory_bytes": None, "load_format": "auto", "log_format": "text",
    "long_prefill_token_threshold": None, "long_prefill_token_threshold_adaptive": False,
    "max_adapter_bytes": 268435456, "max_fold_folders": None,
    "max_log_len": 0, "max_loras": 8, "max_model_len": 2048, "max_num_batched_tokens": 2048, "max_num_seqs": 64,
    "max_queue": 256, "max_rank": 64, "max_tokens": 2048, "metrics_port": None, "model": "default",
    "override_generation_config": {}, "piecewise_graphs": None, "pipeline_parallel_size": 1, "port": 50051,
    "scheduling_policy": None, "seed": 0, "served_model_name": None, "tenant_metrics": False, "tenants_file": None,
    "tensor_parallel_size": 1, "tokenizer": None, "tool_call_parser": None, "vllm_arg": []}
GENERATE_DEFAULTS = {
    "adapter": None, "adapter_dir": None, "add_special_tokens": True, "async_scheduling": None,
    "cache_dir": argparse.SUPPRESS, "chat_json": None, "cpu_amx": None, "cpu_gemm": None, "device": None,
    "dtype": "auto", "enforce_eager": False, "engine_step_timeout": None, "generation_config": "auto", "gpu_memory_utilization": None,
    "kv_cache_memory_bytes": None, "load_format": "auto", "long_prefill_token_threshold": None,
    "long_prefill_token_threshold_adaptive": False, "max_model_len": 2048, "max_num_batched_tokens": 2048,
    "max_num_seqs": 64, "max_rank": 64, "max_tokens": None, "message": None, "model": "default",
    "override_generation_config": {}, "piecewise_graphs": None, "prompt": None, "seed": None, "stop": [],
    "stream": True, "system": None, "temperature": None, "tokenizer": None, "top_k": None, "top_p": None}
SERVE_GROUP_TITLES = ["model and loading", "engine, device and parallelism", "KV cache", "scheduler", "LoRA adapters",
                      "tenants and auth", "front ends", "tool calling", "observability"]
GENERATE_GROUP_TITLES = ["model and loading", "adapter", "prompt", "sampling", "device", "KV cache", "scheduler",
                         "output"]


@pytest.mark.parametrize("command, defaults, titles", [("serve", SERVE_DEFAULTS, SERVE_GROUP_TITLES),
                                                       ("generate", GENERATE_DEFAULTS, GENERATE_GROUP_TITLES)])
def test_serve_and_generate_help_groups_the_flags_by_concern(monkeypatch, command, defaults, titles):
    """h130: ``serve --help`` was 264 flat lines; now its flags sit in groups by concern, each with a
    one-line description, as vLLM's ``serve --help`` (ModelConfig, CacheConfig, ...), none left loose
    under "options" but -h, with the same names and defaults as before."""
    monkeypatch.delenv("VLLM_ALLOW_RUNTIME_LORA_UPDATING", raising=False)
    leaf = _subparsers(build_parser(only=command)).choices[command]
    flags = [a for a in leaf._actions if a.dest != "help"]
    assert {a.dest: a.default for a in flags} == defaults
    assert all(a.option_strings[0] == "--" + a.dest.replace("_", "-") for a in flags)
    groups = [g for g in leaf._action_groups if g._group_actions]
    assert [g.title for g in groups] == ["options", *titles]
    assert [a.dest for a in groups[0]._group_actions] == ["help"]
    assert all(g.description for g in groups[1:])
    text = leaf.format_help()
    assert [t for t in titles if f"\n{t}:\n" not in text] == []
