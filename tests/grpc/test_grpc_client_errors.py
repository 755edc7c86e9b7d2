"""The client refuses bad local input before any call: one `error:` line naming what is wrong, exit 2.

The server address is a closed port, so a check that ran only after a call would show UNAVAILABLE.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nlora_serve.client import InvalidArgument, InvalidInput, NloraClient, NloraClientError
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
     f"adapter folder {CASES / 'dora' / 'case.json'} is not a directory (upload takes the folder that holds it: "
     f"{CASES / 'dora'})"),  # h130: the folder's safetensors file given, as `adapters swap` takes it
    (["swap", "--name", "t", "/nonexistent.safetensors"],
     "swap file /nonexistent.safetensors does not exist; expected a .safetensors file of lora_N keys"),
    (["swap", "--name", "t", str(CASES)], f"swap file {CASES} is not a file; expected a .safetensors file of "
                                          "lora_N keys"),
    # h130: the adapter folder given for its file, as `adapters upload` takes it
    (["swap", "--name", "t", str(CASES / "lora-rslora")],
     f"swap file {CASES / 'lora-rslora'} is not a file; expected a .safetensors file of lora_N keys (the adapter "
     f"folder's is {CASES / 'lora-rslora' / 'adapter_model.safetensors'})"),
    # A newcomer's find: a whole LoRA (19.6 MB) sent as a swap got gRPC's bare "Received message larger
    # than max (19593076 vs. 6586376)" from the server; under that size the server names the keys.
    (["swap", "--name", "t", str(CASES / "lora-rslora" / "adapter_model.safetensors")],
     f"swap file {CASES / 'lora-rslora' / 'adapter_model.safetensors'} holds lora_A / lora_B weights, a whole "
     "adapter: a swap sends only N (lora_N keys, e.g. the adapter_model.safetensors of `adapters tune` or "
     "`adapters init --tied-form`); send a whole adapter with `adapters upload`"),
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
    (["--temperature", "nan"], "argument --temperature: must be a finite number; got nan"),
    (["--temperature", "inf"], "argument --temperature: must be a finite number; got inf"),
    (["--temperature", "-0.5"], "argument --temperature: must be a number >= 0; got -0.5"),
    (["--temperature", "warm"], "argument --temperature: invalid number value: 'warm'"),
])
def test_generate_flags_out_of_range_exit_2(capsys, argv, message):
    with pytest.raises(SystemExit) as exit_:
        client_main(["--server", NOWHERE, "generate", "--prompt", "hi", *argv])
    assert exit_.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1] == f"nlora-serve client generate: error: {message}"


@pytest.mark.parametrize("sampling, message", [
    (dict(max_tokens=-1), "max_tokens must be an integer in [0, 4294967295]; got -1"),
    (dict(seed=-5), "seed must be an integer in [0, 18446744073709551615]; got -5"),
    (dict(top_k=1 << 32), "top_k must be an integer in [0, 4294967295] or -1 (off); got 4294967296"),
    (dict(top_k=-2), "top_k must be an integer in [0, 4294967295] or -1 (off); got -2"),
    (dict(stop_token_ids=[2, -1]), "every stop_token_ids entry must be an integer in [0, 4294967295]; got -1"),
])
def test_library_names_the_sampling_field_out_of_range(sampling, message):
    with NloraClient(NOWHERE, timeout=5) as client, pytest.raises(InvalidInput) as err:
        list(client.generate("hi", **sampling))
    assert str(err.value) == message and isinstance(err.value, InvalidArgument)


U64 = "18446744073709551615"


@pytest.mark.parametrize("before, argv, message", [
    ([], ["swap", "--name", "t", "n.safetensors", "--if-version", "-1"],
     f"argument --if-version: must be an integer in [0, {U64}]; got -1"),
    ([], ["swap", "--name", "t", "n.safetensors", "--if-version", "99999999999999999999"],
     f"argument --if-version: must be an integer in [0, {U64}]; got 99999999999999999999"),
    ([], ["info", "--timeout", "-1"], "argument --timeout: must be a finite number of seconds > 0; got -1"),
    ([], ["info", "--timeout", "0"], "argument --timeout: must be a finite number of seconds > 0; got 0"),
    ([], ["info", "--timeout", "nan"], "argument --timeout: must be a finite number of seconds > 0; got nan"),
    (["--timeout", "inf"], ["info"], "argument --timeout: must be a finite number of seconds > 0; got inf"),
    ([], ["info", "--timeout", "soon"], "argument --timeout: must be a finite number of seconds > 0; got soon"),
    # h130: an HTTP URL or a bare port got gRPC's "errors resolving ...: Misformatted domain name"
    ([], ["info", "--server", "http://127.0.0.1:8001/v1"], "argument --server: HOST:PORT of the gRPC port, not a URL "
                                                          "(as also $NLORA_SERVER): 127.0.0.1:8001; got "
                                                          "http://127.0.0.1:8001/v1"),
    ([], ["info", "--server", "50052"], "argument --server: HOST:PORT, not a port alone (as also $NLORA_SERVER): "
                                        "127.0.0.1:50052; got 50052"),
    ([], ["list", "--api-key", "sk-1\n"], "argument --api-key: API key must be printable ASCII "
                                          "(characters ' ' to '~'); character 5 of its 5 is U+000A"),
    ([], ["list", "--api-key", "clé"], "argument --api-key: API key must be printable ASCII "
                                       "(characters ' ' to '~'); character 3 of its 3 is U+00E9"),
    (["--api-key", "a\x7fb"], ["list"], "argument --api-key: API key must be printable ASCII "
                                        "(characters ' ' to '~'); character 2 of its 3 is U+007F"),
])
def test_bad_connection_and_swap_flags_are_argparse_errors(capsys, before, argv, message):
    with pytest.raises(SystemExit) as exit_:
        client_main(["--server", NOWHERE, *before, *argv])
    assert exit_.value.code == 2
    prog = "nlora-serve client" + ("" if before else f" {argv[0]}")
    assert capsys.readouterr().err.splitlines()[-1] == f"{prog}: error: {message}"


def test_a_bad_key_in_the_environment_is_refused_without_echoing_it(capsys, monkeypatch):
    monkeypatch.setenv("NLORA_API_KEY", "sk-secret\tkey")
    with pytest.raises(SystemExit) as exit_:
        client_main(["--server", NOWHERE, "list"])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.splitlines()[-1] == ("nlora-serve client: error: argument --api-key: API key must be printable "
                                    "ASCII (characters ' ' to '~'); character 10 of its 13 is U+0009")
    assert "secret" not in err


def test_library_refuses_a_bad_key_and_if_version_before_any_call():
    with pytest.raises(InvalidInput) as err:
        NloraClient(NOWHERE, api_key="k\n")
    assert str(err.value) == "API key must be printable ASCII (characters ' ' to '~'); character 2 of its 2 is U+000A"
    with NloraClient(NOWHERE, timeout=5) as client:
        for bad in (-1, 1 << 64):
            with pytest.raises(InvalidInput) as err:
                client.swap_adapter("t", b"", if_version=bad)
            assert str(err.value) == f"if_version must be an integer in [0, {U64}]; got {bad}"


def _safetensors(keys: list[str]) -> bytes:
    """A safetensors file of one F32 [1, 1] tensor per key, written out by hand (the format's spec:
    an 8-byte little-endian header length, the JSON header, the data)."""
    header = {key: {"dtype": "F32", "shape": [1, 1], "data_offsets": [4 * i, 4 * i + 4]}
              for i, key in enumerate(keys)}
    text = json.dumps(header).encode()
    return len(text).to_bytes(8, "little") + text + b"\0" * (4 * len(keys))


@pytest.mark.parametrize("keys, refused", [
    (["m.layers.0.q_proj.lora_N.weight"], ""),
    (["m.layers.0.q_proj.lora_A.weight", "m.layers.0.q_proj.lora_N.weight"], "lora_A"),
    (["m.layers.0.q_proj.lora_B.weight", "m.layers.0.q_proj.lora_A.weight"], "lora_A / lora_B"),
])
def test_library_refuses_a_whole_adapter_as_a_swap_before_any_call(keys, refused):
    with NloraClient(NOWHERE, timeout=5) as client:
        if not refused:  # an N-only payload goes out (and finds no server)
            with pytest.raises(NloraClientError) as err:
                client.swap_adapter("t", _safetensors(keys))
            assert not isinstance(err.value, InvalidInput)
            return
        with pytest.raises(InvalidInput) as err:
            client.swap_adapter("t", _safetensors(keys))
        assert str(err.value).startswith(f"swap payload holds {refused} weights, a whole adapter")


DEEP = b"[" * 100_000 + b"]" * 100_000  # nested past the JSON parser: the client's check raised RecursionError


@pytest.mark.parametrize("payload", [b"", b"x", b"not safetensors", b"\0" * 64, b"\xff" * 16,
                                     (4).to_bytes(8, "little") + b"[1]", len(DEEP).to_bytes(8, "little") + DEEP])
def test_payloads_that_are_not_safetensors_are_left_to_the_servers_check(payload):
    with NloraClient(NOWHERE, timeout=5) as client, pytest.raises(NloraClientError) as err:
        client.swap_adapter("t", payload)
    assert not isinstance(err.value, InvalidInput), err.value  # UNAVAILABLE: it was sent


@pytest.fixture
def http_only_port():
    """The port of a plain HTTP/1.1 server (as `serve --http-port` is), not gRPC."""
    import http.server
    import threading

    class Quiet(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):  # its request log would go to the stderr under test
            pass

    server = http.server.HTTPServer(("127.0.0.1", 0), Quiet)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server.server_address[1]
    server.shutdown()
    thread.join(10)


@pytest.mark.parametrize("target", ["closed", "http"])
def test_no_grpc_server_at_the_address_says_which_port_server_takes(capsys, http_only_port, target):
    # A newcomer's find: `client info --server 127.0.0.1:8000` (the HTTP port) or a server not started
    # printed only gRPC's "failed to connect to all addresses; ... Failed parsing HTTP/2 ...".
    address = NOWHERE if target == "closed" else f"127.0.0.1:{http_only_port}"
    assert client_main(["--server", address, "--timeout", "10", "info"]) == 2
    out = capsys.readouterr()
    assert out.out == "" and out.err.startswith("error: UNAVAILABLE: failed to connect to all addresses")
    assert out.err.endswith(f"; is an nlora-serve server running on {address}? --server (or $NLORA_SERVER) takes "
                            "its gRPC port (serve --port, 50051 by default), not its --http-port\n"), out.err


@pytest.mark.parametrize("message, hinted", [
    ("NOT_FOUND: adapter 'lowr' is not registered", True),  # h130: gRPC's 404 named no way to list them
    ("NOT_FOUND: adapter 'x' was unloaded by an operator (its files are kept: ...)", False),  # says what to do
])
def test_an_unknown_adapter_names_the_command_that_lists_them(message, hinted):
    from argparse import Namespace
    from nlora_serve.client import NotFound
    from nlora_serve.client.cli import _hint
    hint = _hint(NotFound(message), Namespace(server=NOWHERE, api_key=None))
    assert hint == ("; `nlora-serve client list` names the adapters this key may use" if hinted else "")


@pytest.mark.parametrize("kind, said", [("fifo", "a FIFO, socket or device"), ("dangling", "a link to nothing"),
                                        ("folder", "a folder")])
def test_an_upload_file_that_is_there_but_no_regular_file_is_named_as_what_it_is(tmp_path, kind, said):
    """A FIFO or a link to nothing as adapter_model.safetensors was 'has no adapter_model.safetensors',
    next to the file the operator could see in `ls`."""
    import os

    folder = tmp_path / "a"
    folder.mkdir()
    (folder / "adapter_config.json").write_text((CASES / "lora-rslora" / "adapter_config.json").read_text())
    weights = folder / "adapter_model.safetensors"
    {"fifo": lambda: os.mkfifo(weights), "dangling": lambda: weights.symlink_to(tmp_path / "gone"),
     "folder": weights.mkdir}[kind]()
    with pytest.raises(InvalidInput) as err:
        NloraClient(NOWHERE).upload_adapter("x", folder)
    assert str(err.value) == (f"{weights} is {said}, not a regular file; an upload needs adapter_config.json and "
                              "adapter_model.safetensors as files")
