"""Hot-swap validation: the fast N-only path gives exactly what a full read of the files gives."""

from __future__ import annotations

import logging
from pathlib import Path
from types import SimpleNamespace

import safetensors.torch
import pytest
import torch

from nlora_serve.adapters.loader import read_adapter, read_adapter_bytes
from nlora_serve.adapters.runtime.manager import AdapterManager
from nlora_serve.adapters.nystrom import init_adapter
from nlora_serve.adapters.save import write_adapter
from nlora_serve.adapters.runtime.swap import replace_n
from nlora_serve.adapters.runtime.version import restored_summary
from nlora_serve.errors import AdapterError

LORA_CASE = Path(__file__).resolve().parents[1] / "data" / "cases" / "lora-layers-subset"


@pytest.fixture
def tenant(base_fp32, tmp_path):
    adapter = init_adapter(base_fp32, rank=4, targets=["q_proj", "down_proj"], layers=[0, 7])
    path = write_adapter(adapter, tmp_path / "t", tied_form=True)
    return read_adapter(path, base_fp32), path


def n_payload(path, scale: float = 1.5, **overrides) -> bytes:
    n = safetensors.torch.load_file(path / "adapter_model.safetensors")
    n = {k: (t * scale).contiguous() for k, t in n.items()}
    n.update(overrides)
    return safetensors.torch.save({k: v for k, v in n.items() if v is not None})


def test_fast_swap_equals_a_full_read_of_the_same_files(base_fp32, tenant):
    current, path = tenant
    payload = n_payload(path)
    fast = replace_n(current, payload)
    full = read_adapter_bytes((path / "adapter_config.json").read_bytes(), payload, base_fp32)
    assert fast.content_hash == full.content_hash != current.content_hash
    for site, want in full.sites.items():
        got = fast.sites[site]
        assert torch.equal(got.N, want.N) and got.scaling == want.scaling
        assert got.A.data_ptr() == want.A.data_ptr()  # still views of the base weight


def test_swap_payload_refusals_name_the_key_and_numbers(tenant):
    current, path = tenant
    key = next(iter(safetensors.torch.load_file(path / "adapter_model.safetensors")))
    with pytest.raises(AdapterError, match=r"has shape \[5, 5\], expected \[4, 4\]"):
        replace_n(current, n_payload(path, **{key: torch.zeros(5, 5)}))
    with pytest.raises(AdapterError, match=r"exactly the tenant's 4 lora_N keys; it has 3: missing"):
        replace_n(current, n_payload(path, **{key: None}))
    with pytest.raises(AdapterError, match="unexpected"):
        replace_n(current, n_payload(path, **{key.replace("layers.0.", "layers.1."): torch.zeros(4, 4)}))
    nan = torch.zeros(4, 4)
    nan[1, 2] = float("nan")
    with pytest.raises(AdapterError, match=f"{key}.*non-finite"):
        replace_n(current, n_payload(path, **{key: nan}))
    with pytest.raises(AdapterError, match="not a readable safetensors file"):
        replace_n(current, b"\x10\x00\x00\x00\x00\x00\x00\x00{not json")
    deep = b"[" * 100_000 + b"]" * 100_000  # nested past the JSON parser: not a RecursionError (gRPC UNKNOWN)
    with pytest.raises(AdapterError, match="not a readable safetensors file"):
        replace_n(current, len(deep).to_bytes(8, "little") + deep)


def test_a_payloads_unexpected_keys_are_quoted_cut():
    """SwapN's refusal quoted the payload's unexpected keys whole: three 5,000-char tensor names
    made a 15,000-char message, cut to 1,000 in the status details. Each is cut to 80."""
    from nlora_serve.adapters.runtime.swap import _check_keys

    with pytest.raises(AdapterError) as err:
        _check_keys({"a", "k" * 5000, "m" * 5000, "z" * 5000}, {"a"})
    cut = ["k" * 80 + "...", "m" * 80 + "...", "z" * 80 + "..."]
    assert str(err.value) == f"swap payload must hold exactly the tenant's 1 lora_N keys; it has 4: unexpected {cut}"


def test_an_upload_config_nested_past_the_parser_is_refused(base_fp32, tenant):
    _, path = tenant
    with pytest.raises(AdapterError, match="adapter_config.json: not valid JSON"):
        read_adapter_bytes(b"[" * 100_000 + b"]" * 100_000, n_payload(path), base_fp32)


def test_untied_tenant_cannot_be_swapped_by_n(base_fp32, tmp_path):
    lora = init_adapter(base_fp32, rank=4, targets=["q_proj"], variant="slora", layers=[0])
    with pytest.raises(AdapterError, match="needs a tied .IntTune. tenant; this one is nlora"):
        replace_n(lora, b"")


def test_manager_swap_persists_and_serves_the_new_version(base_fp32, tenant, tmp_path):
    _, path = tenant
    manager = AdapterManager(base_fp32, tmp_path / "store")
    v1 = manager.register_dir("acme", path)
    v2 = manager.swap("acme", n_payload(path, 2.0), if_version=1)
    restarted = AdapterManager(base_fp32, tmp_path / "store").registry.get("acme")
    assert (restarted.version, restarted.content_hash) == (2, v2.content_hash)
    assert v1.freed and v1.slot is None and v2.pool.used == 1  # v1's slot given back at the switch


def test_a_restart_logs_each_restored_adapter_by_name_version_flavour_and_rank(base_fp32, tenant, tmp_path, caplog):
    _, path = tenant
    manager = AdapterManager(base_fp32, tmp_path / "store")
    manager.register_dir("acme", path)
    manager.swap("acme", n_payload(path, 2.0))
    manager.register_dir("zeta", LORA_CASE)  # r 8 in its adapter_config.json
    with caplog.at_level(logging.INFO, logger="nlora_serve.adapters.runtime.manager"):
        AdapterManager(base_fp32, tmp_path / "store")
    (line,) = [r.getMessage() for r in caplog.records if r.getMessage().startswith("restored")]
    assert line == (f"restored 2 adapters from {tmp_path / 'store'} (1 inttune-tied, 1 lora): "
                    "acme v2 (inttune-tied, rank 4), zeta v1 (lora, rank 8)")


def test_a_large_restore_names_the_first_twenty_and_counts_the_rest():
    versions = [SimpleNamespace(name=f"t{i:04d}", version=1, flavour="inttune-tied", rank=16) for i in range(1000)]
    line = restored_summary(versions, "STORE")
    assert line.startswith("restored 1000 adapters from STORE (1000 inttune-tied): t0000 v1 (inttune-tied, rank 16), t0001 v1")
    assert "t0019 v1 (inttune-tied, rank 16), and 980 more (`client list` names all)" in line
    assert "t0020" not in line and len(line) < 1000
