"""A stopped server's engine is freed: nothing process-wide (FastAPI's caches of endpoint and
dependency callables among them) keeps its weights and KV cache alive after the server stops."""

from __future__ import annotations

import gc
import weakref

from grpc_harness import ADMIN_KEY, server_factory, stop_all, write_tenants_file
from http_harness import client


def test_a_stopped_http_server_leaves_its_engine_collectable(base_fp32, tokenizer, tmp_path):
    make, running = server_factory(base_fp32, tokenizer, tmp_path)
    server = make(write_tenants_file(tmp_path / "tenants.json"), http_port=0)
    # every route and the key dependency run once, so FastAPI has seen each callable
    openai = client(server, ADMIN_KEY)
    base_model = openai.models.list().data[0].id  # the base model comes first
    assert openai.models.retrieve(base_model).id == base_model
    assert openai.completions.create(model=base_model, prompt="Hi", max_tokens=2).choices[0].text
    engine = weakref.ref(server.engine)
    stop_all(running)
    del server, running, make, openai
    gc.collect()
    assert engine() is None, [type(r).__name__ for r in gc.get_referrers(engine())]
