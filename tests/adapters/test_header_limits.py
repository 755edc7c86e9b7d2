"""Caps on a safetensors header (hostile review): its length, read from the first 8 bytes, is
checked before the JSON is parsed, and its tensor count before any entry is looked at."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from nlora_serve.adapters.format import MAX_HEADER_BYTES, MAX_TENSORS, read_bytes, read_header_bytes
from nlora_serve.adapters.runtime.manager import AdapterManager
from nlora_serve.errors import AdapterError

CASE = Path(__file__).resolve().parents[1] / "data" / "cases" / "lora-layers-subset"


def _safetensors(meta: dict, data: bytes = b"") -> bytes:
    header = json.dumps(meta).encode()
    return len(header).to_bytes(8, "little") + header + data


def _entry(offset: int = 0) -> dict:
    return {"dtype": "F32", "shape": [1], "data_offsets": [offset, offset + 4]}


def test_the_caps_hold_the_largest_adapter_of_a_large_model():
    """Hand reference: a rank-64 LoRA with bias on every projection of a 128-layer model (PEFT
    key names, 11-digit offsets) has 3584 tensors and a header well under the caps."""
    meta = {"__metadata__": {"format": "pt"}}
    for layer in range(128):
        for module in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                       "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"):
            for part, shape in (("lora_A.weight", [64, 16384]), ("lora_B.weight", [16384, 64]),
                                ("lora_N.weight", [64, 64]), ("lora_B.bias", [16384])):
                meta[f"base_model.model.model.layers.{layer}.{module}.{part}"] = {
                    "dtype": "BF16", "shape": shape, "data_offsets": [10_000_000_000, 10_002_097_152]}
    assert len(meta) - 1 == 3584 <= MAX_TENSORS
    assert len(json.dumps(meta).encode()) < MAX_HEADER_BYTES / 3


def test_a_50_mb_metadata_is_refused_from_the_length_alone(base_fp32, tmp_path):
    weights = _safetensors({"__metadata__": {"x": "a" * 50_000_000}, "k": _entry()}, b"\x00" * 4)
    limit = f"header length over the {MAX_HEADER_BYTES}-byte limit on an adapter's header"
    with pytest.raises(AdapterError, match=limit):
        read_header_bytes(weights)
    manager = AdapterManager(base_fp32, tmp_path / "store")
    with pytest.raises(AdapterError, match=limit):  # an upload: nothing is stored
        manager.register("acme", {"adapter_config.json": (CASE / "adapter_config.json").read_bytes(),
                                  "adapter_model.safetensors": weights})
    assert manager.registry.store.names() == []


def test_a_length_over_the_cap_is_refused_before_the_json_is_read():
    with pytest.raises(AdapterError, match="header length over the"):
        read_bytes((MAX_HEADER_BYTES + 1).to_bytes(8, "little") + b"\xff" * (MAX_HEADER_BYTES + 1))
    with pytest.raises(AdapterError, match="header length over the"):  # 500,000 keys: 15 s to refuse before
        read_bytes(_safetensors({f"k{i}": _entry(4 * i) for i in range(500_000)}, b"\x00" * 2_000_000))


@pytest.mark.parametrize("count, refused", [(MAX_TENSORS, False), (MAX_TENSORS + 1, True)])
def test_more_tensors_than_the_cap_are_refused_before_any_entry_is_checked(count, refused):
    meta = {"__metadata__": {"format": "pt"}, **{f"k{i}": _entry(4 * i) for i in range(count)}}
    meta["k0"] = {"dtype": "I64"}  # a bad entry: reached only when the count passes
    with pytest.raises(AdapterError) as err:
        read_header_bytes(_safetensors(meta, b"\x00" * 4 * count))
    if refused:
        assert f"{count} tensors, over the limit of {MAX_TENSORS} on an adapter's tensors" in str(err.value)
    else:
        assert "tensors, over the limit" not in str(err.value)


def test_a_folders_weights_file_meets_the_same_caps_before_its_header_is_parsed(tmp_path):
    """read_header (serve --adapter for a stored name, --backend vllm's pre-start check, adapters
    inspect) parsed any header safetensors takes (100 MB): 500,000 keys took 6 s before the refusal."""
    from nlora_serve.adapters.format import read_header

    path = tmp_path / "adapter_model.safetensors"
    path.write_bytes((MAX_HEADER_BYTES + 8).to_bytes(8, "little") + b" " * (MAX_HEADER_BYTES + 8))
    with pytest.raises(AdapterError, match=f"^{path}: not a readable safetensors file \\(header length over the "):
        read_header(path)
    count = MAX_TENSORS + 1
    meta = {f"k{i}": _entry(4 * i) for i in range(count)}
    header = json.dumps(meta).encode()
    header += b" " * (-len(header) % 8)
    path.write_bytes(len(header).to_bytes(8, "little") + header + b"\x00" * 4 * count)
    with pytest.raises(AdapterError, match=f"{count} tensors, over the limit of {MAX_TENSORS} on an adapter's tensors"):
        read_header(path)
