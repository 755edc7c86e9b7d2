"""The ``nlora-serve`` entry point: a command imports only its own modules."""

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


@pytest.mark.parametrize("argv", [["client", "--help"], ["keys", "--help"], ["--help"]])
def test_light_commands_do_not_import_the_engine(argv):
    # The client and key tools start in a fraction of a second: no torch / transformers / FastAPI.
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
    from nlora_serve.serving.generate_cli import _prompt_ids

    deep = tmp_path / "deep.json"
    deep.write_text("[" * 100_000 + "]" * 100_000)
    args = argparse.Namespace(prompt=None, chat_json=str(deep))
    with pytest.raises(NloraError, match="cannot read a JSON message list"):  # not a RecursionError traceback
        _prompt_ids(args, tokenizer=None)
