"""``SamplingParams.structured_outputs`` over gRPC: each answer checked by json.loads and a hand check
of the schema, re.fullmatch, membership, for several seeds at temperature 1 on the base model and a
LoRA tenant; malformed and non-compiling specs are INVALID_ARGUMENT naming the field, before the
engine sees a prompt token."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from grpc_harness import ADMIN_KEY, TENANT_KEYS
from nlora_serve.client import InvalidArgument, NloraClient
from nlora_serve.proto import nlora_pb2 as pb

CASES = Path(__file__).parents[1] / "data" / "cases"
LORA = "lora-rslora"  # granted to lora-co
SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                            "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"]}
EMAIL = r"[a-z]{2,8}@[a-z]{2,6}\.(com|org)"


def _person(text: str) -> bool:
    value = json.loads(text)
    return (set(value) == {"name", "age"} and isinstance(value["name"], str) and len(value["name"]) <= 12
            and type(value["age"]) is int and 0 <= value["age"] <= 120)


SPECS = [(pb.StructuredOutputs(json_schema=json.dumps(SCHEMA), disable_any_whitespace=True), _person),
         (pb.StructuredOutputs(regex=EMAIL), lambda t: re.fullmatch(EMAIL, t) is not None),
         (pb.StructuredOutputs(choice=pb.Choices(choices=["north", "south"])), lambda t: t in ("north", "south"))]


@pytest.fixture(scope="module")
def server(make_module_server, tmp_path_factory):
    from grpc_harness import write_tenants_file

    running = make_module_server(write_tenants_file(tmp_path_factory.mktemp("keys") / "tenants.json"))
    with NloraClient(running.target, api_key=ADMIN_KEY) as admin:
        admin.upload_adapter(LORA, CASES / LORA, chunk_bytes=64 << 10)
    return running


@pytest.mark.parametrize("adapter", [None, LORA])
@pytest.mark.parametrize("spec", range(len(SPECS)), ids=["json_schema", "regex", "choice"])
def test_answers_follow_the_spec_for_several_seeds(server, adapter, spec):
    structured, check = SPECS[spec]
    key = TENANT_KEYS["lora-co" if adapter else "base-co"]
    with NloraClient(server.target, api_key=key, timeout=120) as client:
        for seed in range(3):
            text, deltas = client.complete(messages=[{"role": "user", "content": "Answer briefly."}], adapter=adapter,
                                           max_tokens=100, temperature=1.0, seed=seed, structured_outputs=structured)
            assert deltas[-1].finish_reason == "stop", text
            assert check(text), text


@pytest.mark.parametrize("structured, says", [
    (pb.StructuredOutputs(), "needs a constraint"),
    (pb.StructuredOutputs(json_object=False), "needs a constraint"),
    (pb.StructuredOutputs(regex="[a-"), "the regex does not compile"),
    (pb.StructuredOutputs(json_schema='{"type": "strnig"}'), "the json does not compile"),
    (pb.StructuredOutputs(choice=pb.Choices()), "choice must be 1 to"),
])
def test_bad_specs_are_invalid_argument_naming_the_field(server, structured, says):
    before = server.engine.stats()["prompt_tokens"]
    with NloraClient(server.target, api_key=TENANT_KEYS["base-co"], timeout=60) as client:
        with pytest.raises(InvalidArgument, match=f"SamplingParams.structured_outputs.*{says}"):
            client.complete("Hi", max_tokens=4, structured_outputs=structured)
    assert server.engine.stats()["prompt_tokens"] == before
