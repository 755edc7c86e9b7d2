"""An operator's unload survives a restart, also when a start flag (--adapter, --example-tenants,
as `make serve` passes them) names the adapter; `client load` brings it back."""

from __future__ import annotations

import argparse
import gc
import logging

from nlora_serve.serving.commands import serve as serve_cli
from serving_check import CASES, TIED


def _build(*flags: str):
    """(engine, server, hint adapters): ``serve``'s build from flags, its store writes committed as
    serve's start commits them; a small KV cache (these engines generate nothing): five builds at
    the default 1 GiB each, with their own model weights, peaked at 14.6 GB in one test worker."""
    gc.collect()  # the engines shut down before this one: their cycles hold weights and KV cache
    parser = argparse.ArgumentParser()
    serve_cli.add_serve_arguments(parser)
    *built, batch = serve_cli.build(parser.parse_args(["--port", "0", "--http-port", "0", "--dtype", "float32",
                                                       "--max-model-len", "256", "--kv-cache-memory-bytes",
                                                       str(32 << 20), *flags]))
    batch.commit()
    return built


def _served(engine) -> dict[str, int]:
    return {v.name: v.version for v in engine.adapters.versions()}


def test_unloaded_adapters_stay_unloaded_when_restarted_with_the_same_flags(tmp_path, caplog):
    store = tmp_path / "store"
    flags = ("--adapter-dir", str(store), "--example-tenants", "2", "--adapter", f"upper={CASES / TIED}")
    with caplog.at_level(logging.INFO, logger="nlora_serve.serve"):
        engine, server, names = _build(*flags)
    try:
        assert names == ["upper", "tenant-000", "tenant-001"]  # the hint's first: the --adapter one
        # h117: a first start named none of what it registered (a restart's restore names what it serves)
        registered = [r.getMessage() for r in caplog.records if r.getMessage().startswith("registered ")]
        assert registered == [f"registered 3 adapters into the store {store} (3 inttune-tied): tenant-000 v1 "
                              "(inttune-tied, rank 16), tenant-001 v1 (inttune-tied, rank 16), upper v1 "
                              "(inttune-tied, rank 8)"], registered
        caplog.clear()
        first = _served(engine)
        engine.unload_adapter("tenant-001")
        engine.unload_adapter("upper")
    finally:
        engine.shutdown()

    with caplog.at_level(logging.WARNING, logger="nlora_serve.adapters.runtime.manager"):
        engine, server, names = _build(*flags)
    try:
        assert names == ["tenant-000"]  # the client hint names only served adapters
        assert _served(engine) == {"tenant-000": first["tenant-000"]}  # nothing re-registered
        for name in ("tenant-001", "upper"):
            assert f"adapter {name!r} was unloaded by an operator" in caplog.text
        stored = engine.adapters.registry.store  # the store keeps the versions
        assert [stored.versions(n) for n in ("tenant-001", "upper")] == [[1], [1]]
        # what `client load` does (grpc_admin._load): register the latest stored version again
        latest = stored.latest("upper")
        engine.adapters.register("upper", stored.read_files(latest.path))
        assert not stored.is_unloaded("upper")
    finally:
        engine.shutdown()

    engine, server, names = _build(*flags)
    try:
        assert names == ["upper", "tenant-000"]
        assert set(_served(engine)) == {"tenant-000", "upper"}
    finally:
        engine.shutdown()


def test_a_restart_warns_once_per_start_flag_the_store_overrides(tmp_path, caplog):
    store = tmp_path / "store"
    flags = ("--adapter-dir", str(store), "--adapter", f"upper={CASES / TIED}", "--adapter", f"other={CASES / TIED}")
    engine, server, names = _build(*flags)
    try:  # what a hot-swap or an upload does: a new version of "upper" with other weights
        assert engine.adapters.register_dir("upper", CASES / "lora-rslora").version == 2
    finally:
        engine.shutdown()
    with caplog.at_level(logging.WARNING, logger="nlora_serve.serve"):
        engine, server, names = _build(*flags)
    try:
        assert _served(engine) == {"upper": 2, "other": 1}
        warned = [r.getMessage() for r in caplog.records if r.name == "nlora_serve.serve"]
        assert len(warned) == 1  # "other" still serves its folder's weights: nothing to say
        assert f"--adapter upper={CASES / TIED}" in warned[0] and "serving upper v2 instead" in warned[0]
    finally:
        engine.shutdown()
