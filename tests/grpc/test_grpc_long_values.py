"""Client values of any length get the status they earn: an error message quotes at most 200
characters of a name (so the details fit the trailers; before, a 100k-character adapter name came
back as RESOURCE_EXHAUSTED "received metadata size exceeds hard limit"), and no status's details
exceed 1000 characters or 2048 bytes of UTF-8."""

from __future__ import annotations

import grpc
import pytest

from grpc_harness import ADMIN_KEY, TENANT_KEYS, write_tenants_file
from nlora_serve.client import NloraClient
from nlora_serve.proto import nlora_pb2 as pb
from nlora_serve.proto import nlora_pb2_grpc as pb_grpc
from nlora_serve.serving.status import details
from serving_check import CASES, TIED, still_serves

RULE = ("is not valid: expected [A-Za-z0-9][A-Za-z0-9._-]{0,127} "
        "(1-128 letters, digits, '.', '_', '-', starting with a letter or digit)")


@pytest.fixture(scope="module")
def server(make_module_server, tmp_path_factory):
    server = make_module_server(write_tenants_file(tmp_path_factory.mktemp("tenants") / "tenants.json"))
    with NloraClient(server.target, api_key=ADMIN_KEY) as admin:
        admin.upload_adapter(TIED, CASES / TIED)
    return server


def _md(key: str) -> tuple:
    return (("authorization", f"Bearer {key}"),)


def _generate_error(server, key: str, adapter: str) -> grpc.RpcError:
    request = pb.GenerateRequest(text="Hello", adapter=adapter, sampling=pb.SamplingParams(max_tokens=2))
    with grpc.insecure_channel(server.target) as channel, pytest.raises(grpc.RpcError) as err:
        list(pb_grpc.GenerationStub(channel).Generate(request, metadata=_md(key)))
    return err.value


def test_a_granted_but_invalid_long_adapter_name_is_invalid_argument(server):
    name = "inttune-" + "a" * 100_000  # tied-co is granted inttune-*
    err = _generate_error(server, TENANT_KEYS["tied-co"], name)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details() == f"adapter name '{name[:200]}...' (100,008 characters) {RULE}"
    assert server.server.admission.inflight == 0
    still_serves(server.target, api_key=TENANT_KEYS["tied-co"])


def test_an_ungranted_long_adapter_name_is_permission_denied(server):
    err = _generate_error(server, TENANT_KEYS["tied-co"], "z" * 20_000)
    assert err.code() == grpc.StatusCode.PERMISSION_DENIED
    assert err.details() == f"key of 'tied-co' is not granted adapter '{'z' * 200}...'"


def test_admin_generate_with_an_invalid_name_is_invalid_argument_and_a_valid_unknown_one_not_found(server):
    err = _generate_error(server, ADMIN_KEY, "b" * 5_000)
    assert err.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.details() == f"adapter name '{'b' * 200}...' (5,000 characters) {RULE}"
    err = _generate_error(server, ADMIN_KEY, "b" * 128)  # the longest valid name
    assert err.code() == grpc.StatusCode.NOT_FOUND
    assert err.details() == f"adapter '{'b' * 128}' is not registered"


@pytest.mark.parametrize("rpc", ["LoadAdapter", "UnloadAdapter"])
def test_admin_rpcs_with_a_long_name_are_invalid_argument(server, rpc):
    request = getattr(pb, f"{rpc}Request")(name="z" * 20_000)
    with grpc.insecure_channel(server.target) as channel, pytest.raises(grpc.RpcError) as err:
        getattr(pb_grpc.AdapterAdminStub(channel), rpc)(request, metadata=_md(ADMIN_KEY))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert err.value.details() == f"adapter name '{'z' * 200}...' (20,000 characters) {RULE}"


def test_an_upload_with_a_long_sha256_is_invalid_argument_quoting_64_characters(server):
    header = pb.UploadHeader(name="lora-x", adapter_config_json="{}", safetensors_bytes=1,
                             safetensors_sha256="f" * 100_000)
    parts = [pb.UploadAdapterRequest(header=header), pb.UploadAdapterRequest(chunk=b"\0")]
    with grpc.insecure_channel(server.target) as channel, pytest.raises(grpc.RpcError) as err:
        pb_grpc.AdapterAdminStub(channel).UploadAdapter(iter(parts), metadata=_md(ADMIN_KEY))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    digest = "6e340b9cffb37a989ca544e6bb780a2c78901d3fb33738768511a30617afa01d"  # sha256 of b"\0"
    assert err.value.details() == (f"upload of 'lora-x': adapter_model.safetensors has sha256 {digest}, "
                                   f"the header says '{'f' * 64}...'")


def test_details_are_bounded_in_characters_and_utf8_bytes():
    assert details("short") == "short"
    assert details("x" * 1000) == "x" * 1000
    assert details("x" * 5000) == "x" * 1000 + "... (message cut: 5000 characters)"
    # 4-byte characters: 512 of them are 2048 bytes, under 1000 characters
    assert details("\U0001F600" * 5000) == "\U0001F600" * 512 + "... (message cut: 5000 characters)"
    # a 3-byte character that would straddle the 2048th byte is left out, not split: 1 + 682 * 3 = 2047
    assert details("a" + "€" * 3000) == "a" + "€" * 682 + "... (message cut: 3001 characters)"
