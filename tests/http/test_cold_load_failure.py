"""An evicted untied adapter whose stored files cannot be read back (deleted, corrupt, a disk error)
is the server's fault: gRPC INTERNAL and HTTP 500 naming the adapter and version only (the store's
paths go to the server log), counted as ``adapter_load_failed``; its slot is free again and every
other tenant is served on (the transformers references)."""

from __future__ import annotations

import logging

import grpc
import openai
import pytest

from grpc_harness import TENANT_KEYS
from http_harness import CASES, client, scrape
from nlora_serve.client import NloraClient
from nlora_serve.client.types import NloraClientError
from serving_check import TIED, still_serves

LORA = "lora-rslora"  # granted to lora-co (grpc_harness.GRANTS)
MESSAGE = (f"adapter {LORA!r} v1 could not be loaded back from this server's adapter store (the server's log "
           "says why): an operator must upload or swap it again")


def test_a_failed_cold_load_is_a_500_naming_no_path_and_the_others_serve_on(make_http_server, caplog):
    server = make_http_server(metrics_port=0)
    manager = server.engine.adapters
    manager.register_dir(TIED, CASES / TIED)
    version = manager.register_dir(LORA, CASES / LORA)
    manager.residency.free(version)  # evicted, as the LRU evicts an idle adapter: its tensors dropped
    version.adapter = None
    (version.path / "adapter_model.safetensors").unlink()  # and its file is gone from the disk since
    slots_used = manager.residency.lora_pool.used

    with caplog.at_level(logging.ERROR, logger="nlora_serve.adapters.runtime.residency"):
        with pytest.raises(NloraClientError) as grpc_err:
            with NloraClient(server.target, api_key=TENANT_KEYS["lora-co"], timeout=60) as grpc_client:
                grpc_client.complete([1, 2, 3], adapter=LORA, max_tokens=2)
        with pytest.raises(openai.InternalServerError) as http_err:
            client(server, TENANT_KEYS["lora-co"]).completions.create(model=LORA, prompt=[1, 2, 3], max_tokens=2)
    assert grpc_err.value.code == grpc.StatusCode.INTERNAL and str(grpc_err.value) == f"INTERNAL: {MESSAGE}"
    body = http_err.value.body
    assert (body["message"], body["type"], body["code"]) == (MESSAGE, "server_error", "adapter_load_failed"), body
    assert str(version.path) in caplog.text and "adapter_model.safetensors" in caplog.text  # the operator's view
    assert manager.residency.lora_pool.used == slots_used and version.refcount == 0
    samples = scrape(server)
    for frontend in ("grpc", "http"):
        key = ("nlora_requests_rejected_total", (("frontend", frontend), ("reason", "adapter_load_failed")))
        assert samples[key] == 1, frontend
    still_serves(server.target, TIED, api_key=TENANT_KEYS["tied-co"])
    still_serves(server.target, None, api_key=TENANT_KEYS["base-co"])
