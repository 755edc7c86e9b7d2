"""Structured outputs through ``serve --backend vllm``: our front end checks the spec (xgrammar, as
vLLM's default backend) and passes it to vLLM's StructuredOutputsParams; vLLM runs the grammar.
Answers checked by re.fullmatch, membership and json.loads; a bad spec is INVALID_ARGUMENT naming the
field. Runs only where vllm is importable (see conftest.py)."""

from __future__ import annotations

import json
import re

import pytest
import torch

from grpc_harness import TENANT_KEYS, RunningServer
from nlora_serve.client import InvalidArgument, NloraClient
from nlora_serve.engine.config import EngineConfig, SchedulerConfig
from nlora_serve.proto import nlora_pb2 as pb
from nlora_serve.serving.auth import Authenticator
from nlora_serve.serving.grpc_api.convert import server_info
from nlora_serve.serving.server_config import ServerConfig

EMAIL = r"[a-z]{2,8}@[a-z]{2,6}\.(com|org)"
SCHEMA = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                            "age": {"type": "integer", "minimum": 0, "maximum": 120}},
          "required": ["name", "age"]}


@pytest.fixture(scope="module")
def server(base_fp32, tenants_file):
    from nlora_serve.engine.vllm_backend.engine import VllmEngine

    config = EngineConfig(dtype=torch.float32,
                          scheduler=SchedulerConfig(max_num_seqs=8, max_num_batched_tokens=512, max_model_len=512))
    engine = VllmEngine(config, None, base_fp32)
    serve_config = ServerConfig(port=0, tenants_file=str(tenants_file))
    running = RunningServer(engine, serve_config, Authenticator.from_file(tenants_file),
                            server_info(base_fp32, config, serve_config, backend="vllm"), base_fp32.tokenizer())
    yield running
    running.stop()
    engine.shutdown()


@pytest.mark.parametrize("structured, check", [
    (pb.StructuredOutputs(regex=EMAIL), lambda t: re.fullmatch(EMAIL, t) is not None),
    (pb.StructuredOutputs(choice=pb.Choices(choices=["north", "south"])), lambda t: t in ("north", "south")),
    (pb.StructuredOutputs(json_schema=json.dumps(SCHEMA), disable_any_whitespace=True),
     lambda t: set(json.loads(t)) == {"name", "age"}),
], ids=["regex", "choice", "json_schema"])
def test_vllm_answers_follow_the_spec(server, structured, check):
    with NloraClient(server.target, api_key=TENANT_KEYS["base-co"], timeout=300) as client:
        for seed in range(2):
            text, deltas = client.complete(messages=[{"role": "user", "content": "Answer briefly."}], max_tokens=80,
                                           temperature=1.0, seed=seed, structured_outputs=structured)
            assert deltas[-1].finish_reason == "stop" and check(text), text


def test_vllm_backend_refuses_a_bad_spec_naming_the_field(server):
    with NloraClient(server.target, api_key=TENANT_KEYS["base-co"], timeout=60) as client:
        with pytest.raises(InvalidArgument, match="SamplingParams.structured_outputs: the regex does not compile"):
            client.complete("Hi", max_tokens=4, structured_outputs=pb.StructuredOutputs(regex="[a-"))
