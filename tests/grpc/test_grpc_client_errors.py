"""The client refuses bad local input before any call: one `error:` line naming what is wrong, exit 2.

The server address is a closed port, so a check that ran only after a call would show UNAVAILABLE.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from nlora_serve.client import InvalidArgument, InvalidInput, NloraClient
from nlora_serve.client.cli import main as client_main
from serving_check import CASES

NOWHERE = "127.0.0.1:1"
PICKLE_MARKER = Path("/tmp/nlora-pickle-marker")  # tests/data/cases/pickle-bin/case.json


@pytest.mark.parametrize("argv, message", [
    (["upload", "--name", "x", str(CASES / "pickle-bin")],
     f"adapter folder {CASES / 'pickle-bin'} has adapter_model.bin but no adapter_model.safetensors: pickle "
     "files are never sent or opened (unpickling can run code); safetensors is required, save the adapter as "
     "adapter_model.safetensors"),
    (["upload", "--name", "x", str(CASES / "missing-config")],
     f"adapter folder {CASES / 'missing-config'} has no adapter_config.json; an upload needs "
     "adapter_config.json and adapter_model.safetensors"),
    (["upload", "--name", "x", "/nonexistent"], "adapter folder /nonexistent does not exist"),
    (["upload", "--name", "x", str(CASES / "dora" / "case.json")],
     f"adapter folder {CASES / 'dora' / 'case.json'} is not a directory"),
    (["swap", "--name", "t", "/nonexistent.safetensors"],
     "swap file /nonexistent.safetensors does not exist; expected a .safetensors file of lora_N keys"),
    (["swap", "--name", "t", str(CASES)], f"swap file {CASES} is not a file; expected a .safetensors file of "
                                          "lora_N keys"),
])
def test_bad_local_files_print_one_error_line(capsys, argv, message):
    assert client_main(["--server", NOWHERE, "--timeout", "5", *argv]) == 2
    out = capsys.readouterr()
    assert (out.out, out.err) == ("", f"error: {message}\n")
    assert not PICKLE_MARKER.exists()


@pytest.mark.parametrize("argv, message", [
    (["--max-tokens", "-1"], "argument --max-tokens: must be an integer in [0, 4294967295]; got -1"),
    (["--max-tokens", "4294967296"], "argument --max-tokens: must be an integer in [0, 4294967295]; got 4294967296"),
    (["--seed", "-5"], "argument --seed: must be an integer in [0, 18446744073709551615]; got -5"),
])
def test_generate_flags_out_of_range_exit_2(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_:
        client_main(["--server", NOWHERE, "generate", "--prompt", "hi", *argv])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == f"nlora-serve client generate: error: {message}"


@pytest.mark.parametrize("sampling, message", [
    (dict(max_tokens=-1), "max_tokens must be an integer in [0, 4294967295]; got -1"),
    (dict(seed=-5), "seed must be an integer in [0, 18446744073709551615]; got -5"),
    (dict(top_k=1 << 32), "top_k must be an integer in [0, 4294967295]; got 4294967296"),
    (dict(stop_token_ids=[2, -1]), "every stop_token_ids entry must be an integer in [0, 4294967295]; got -1"),
])
def test_library_names_the_sampling_field_out_of_range(sampling, message):
    with NloraClient(NOWHERE, timeout=5) as client, pytest.raises(InvalidInput) as err:
        list(client.generate("hi", **sampling))
    assert str(err.value) == message and isinstance(err.value, InvalidArgument)
