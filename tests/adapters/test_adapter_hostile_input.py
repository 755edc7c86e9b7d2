"""Hostile adapter files (h100's attack on the adapter side): each one is refused with an
AdapterError naming what is wrong, never a bare TypeError / OverflowError / MemoryError, and never
served in a form that differs from what PEFT reads or that the engine cannot run."""

from __future__ import annotations

import json
import os
import re
import threading
from pathlib import Path

import pytest
import torch
from safetensors.torch import load, save

from nlora_serve.adapters.config import parse_config
from nlora_serve.adapters.family import factors_bytes, make_factors, parse_factors
from nlora_serve.adapters.format import read_header_bytes, read_stacked
from nlora_serve.adapters.keys import group_keys, tensor_key
from nlora_serve.adapters.loader import read_adapter, read_adapter_bytes
from nlora_serve.adapters.runtime.manager import AdapterManager
from nlora_serve.errors import AdapterError

CASE = Path(__file__).resolve().parents[1] / "data" / "cases" / "lora-layers-subset"


def _safetensors(meta: dict, data: bytes = b"") -> bytes:
    header = json.dumps(meta).encode()
    return len(header).to_bytes(8, "little") + header + data


@pytest.mark.parametrize("dtype", [["F32"], {"F32": 1}])
def test_a_dtype_that_is_no_string_is_refused_naming_the_key(dtype):
    """A list or object as a dtype was a TypeError ('unhashable type'): gRPC UNKNOWN, HTTP 500."""
    weights = _safetensors({"k": {"dtype": dtype, "shape": [1], "data_offsets": [0, 4]}}, b"\x00" * 4)
    for read in (read_header_bytes, lambda data: read_stacked(data, ["k"])):  # upload, hot-swap
        with pytest.raises(AdapterError, match=r"^tensor 'k' has dtype .*F32.*; expected one of F32, F16, BF16"):
            read(weights)


@pytest.mark.parametrize("meta, said", [
    ([1, 2], "the header is a JSON array; expected an object of tensor entries"),
    ({"k": 1}, "tensor 'k' has a JSON number as its entry; expected an object with dtype, shape and data_offsets"),
    ({"k": {"dtype": "F32", "data_offsets": [0, 4]}}, "tensor 'k' has no shape; expected an object with dtype"),
    ({"k": {"dtype": "F32", "shape": 1, "data_offsets": [0, 4]}},
     "tensor 'k' has a JSON number as its shape; expected an array of sizes"),
])
def test_a_header_entry_of_the_wrong_json_type_is_refused_naming_it(meta, said):
    """These were Python's own words ("'int' object is not subscriptable", "'list' object has no
    attribute 'items'", "'int' object is not iterable", "('shape')"), naming no key or field."""
    weights = _safetensors(meta, b"\x00" * 4)
    for read in (read_header_bytes, lambda data: read_stacked(data, ["k"])):  # upload, hot-swap
        with pytest.raises(AdapterError) as err:
            read(weights)
        assert str(err.value).startswith(f"adapter weights are not a readable safetensors file ({said}"), str(err.value)


@pytest.mark.parametrize("field", ["lora_alpha", "alpha_pattern"])
def test_an_alpha_integer_past_float64_is_refused_as_not_finite(field):
    """JSON 1e400 reads as inf and was refused; the integer 10**400 raised OverflowError."""
    alpha = 10 ** 400
    raw = {"peft_type": "LORA", "r": 8, **({"lora_alpha": alpha} if field == "lora_alpha"
                                           else {"alpha_pattern": {"q_proj": alpha}})}
    with pytest.raises(AdapterError, match=r"= 1000000000.*; expected a finite number") as err:
        parse_config(json.loads(json.dumps(raw)))
    assert len(str(err.value)) < 200  # the 401 digits are cut


@pytest.mark.parametrize("layer", ["00", "\u0660", "\uff10"])  # a leading zero, Arabic-Indic and fullwidth 0
def test_a_layer_index_not_written_as_peft_writes_it_is_refused(base_fp32, layer):
    """'layers.00' and 'layers.٠' were read as layer 0: next to PEFT's 'layers.0' key of the same
    tensor, one of the two was dropped silently (the served lora_A was the other key's zeros), and
    alone it served a module PEFT's loader does not find under that name."""
    tensors = load((CASE / "adapter_model.safetensors").read_bytes())
    canonical = tensor_key(0, "down_proj", "lora_A.weight")
    odd = canonical.replace("layers.0.", f"layers.{layer}.")
    assert group_keys([canonical], base_fp32.spec) == {(0, "down_proj"): {"lora_A.weight": canonical}}
    with pytest.raises(AdapterError, match=rf"^tensor {odd!r} maps to no adaptable module of this model: its "
                                           rf"layer index {layer!r} is not written as PEFT writes it \('0'\)"):
        group_keys([canonical, odd], base_fp32.spec)
    weights = save({**tensors, odd: torch.zeros_like(tensors[canonical])})
    with pytest.raises(AdapterError, match="is not written as PEFT writes it"):
        read_adapter_bytes((CASE / "adapter_config.json").read_bytes(), weights, base_fp32)


@pytest.mark.parametrize("wrong", ["a_in", "b_out", "rank"])
def test_family_factors_that_do_not_fit_the_models_projections_are_refused(base_fp32, wrong):
    """The family key hashes whatever the factors file holds, so shapes were never checked: a
    member whose A_f was [R, in + 3] registered, and its first step failed the engine ('engine step
    failed; ending every running request': every tenant's running requests with it)."""
    out, inp = base_fp32.spec.projection_shape("q_proj")
    gen = torch.Generator().manual_seed(0)
    shapes = {"a_in": ((4, inp + 3), (out, 4)), "b_out": ((4, inp), (out - 1, 4)), "rank": ((4, inp), (out, 5))}[wrong]
    factors = make_factors({(0, "q_proj"): tuple(torch.randn(*s, generator=gen) for s in shapes)}, "fp")
    with pytest.raises(AdapterError, match=rf"^F: family factors of model.layers.0.self_attn.q_proj have lora_A "
                                           rf"\[{shapes[0][0]}, {shapes[0][1]}\] and lora_B \[{shapes[1][0]}, "
                                           rf"{shapes[1][1]}\]; expected \[R, {inp}\] and \[{out}, R\]"):
        parse_factors(factors_bytes(factors), base_fp32.spec, factors.key, "F")
    good = make_factors({(0, "q_proj"): (torch.randn(4, inp, generator=gen), torch.randn(out, 4, generator=gen))},
                        "fp")
    assert parse_factors(factors_bytes(good), base_fp32.spec, good.key, "F").rank == 4


def test_an_adapter_folder_over_max_adapter_bytes_is_refused_before_it_is_read(base_fp32, tmp_path):
    """``serve --adapter NAME=DIR`` / ``generate --adapter DIR``: a sparse 1 TB weights file was
    read whole (a MemoryError traceback; a file under the machine's memory was read into it)."""
    folder = tmp_path / "big"
    folder.mkdir()
    (folder / "adapter_config.json").write_bytes((CASE / "adapter_config.json").read_bytes())
    with open(folder / "adapter_model.safetensors", "wb") as f:
        f.truncate(1 << 40)  # sparse: no disk used
    total = (1 << 40) + os.path.getsize(CASE / "adapter_config.json")
    manager = AdapterManager(base_fp32, tmp_path / "store")
    with pytest.raises(AdapterError, match=rf"^{folder}: adapter_config.json \+ adapter_model.safetensors are "
                                           rf"{total} bytes, over the server's --max-adapter-bytes 268435456$"):
        manager.register_dir("big", folder)
    assert manager.registry.store.names() == []


def test_a_fifo_config_in_an_adapter_folder_already_served_is_refused_not_waited_on(base_fp32, tmp_path):
    """``serve --adapter NAME=DIR`` for a NAME the store serves compares DIR with it
    (served_instead): a FIFO as DIR's adapter_config.json blocked that read, and the start, for good."""
    folder = tmp_path / "fifo"
    folder.mkdir()
    os.mkfifo(folder / "adapter_config.json")
    (folder / "adapter_model.safetensors").write_bytes((CASE / "adapter_model.safetensors").read_bytes())
    manager = AdapterManager(base_fp32, tmp_path / "store")
    manager.register_dir("acme", CASE)
    result = {}

    def compare():
        try:
            manager.served_instead("acme", folder)
        except AdapterError as exc:
            result["error"] = str(exc)

    thread = threading.Thread(target=compare, daemon=True)
    thread.start()
    thread.join(10)
    if thread.is_alive():  # blocked in the open: a writer lets it go
        os.close(os.open(folder / "adapter_config.json", os.O_WRONLY | os.O_NONBLOCK))
    assert result == {"error": f"{folder}: adapter_config.json is a FIFO, not a regular file; an adapter folder "
                               "holds adapter_config.json and adapter_model.safetensors as files (or links to files)"}


def test_a_huge_adapter_config_is_refused_from_its_size(base_fp32, tmp_path):
    """read_config read the file whole: a sparse 1 TB adapter_config.json was a MemoryError traceback
    (adapters inspect exited 1), one under the machine's memory was read into it."""
    from nlora_serve.adapters.loader import read_adapter

    folder = tmp_path / "cfg"
    folder.mkdir()
    with open(folder / "adapter_config.json", "wb") as f:
        f.truncate(1 << 40)
    with pytest.raises(AdapterError, match=rf"^{folder}/adapter_config.json: {1 << 40} bytes, over the 268435456 "
                                           "bytes an adapter's files may hold"):
        read_adapter(folder, base_fp32)


@pytest.mark.parametrize("encode, said", [
    (lambda text: b"\xef\xbb\xbf" + text.encode(), "starts with a byte-order mark"),
    (lambda text: text.encode("utf-16"), "starts with a byte-order mark"),
    (lambda text: text.encode("utf-16-le"), "not valid JSON"),  # ASCII in UTF-16-LE is UTF-8 with NULs
    (lambda text: text.encode("latin-1") + b"\xe9", "not UTF-8 (byte"),
])
def test_a_config_not_in_plain_utf8_is_refused_by_upload_and_folder_alike(base_fp32, tmp_path, encode, said):
    """json.loads of bytes took a BOM and UTF-16, so an upload of such a config was served and stored,
    while the same folder given to serve --adapter, adapters inspect / convert or PEFT
    (LoraConfig.from_pretrained: "Unexpected UTF-8 BOM") was refused."""
    config = encode((CASE / "adapter_config.json").read_text())
    weights = (CASE / "adapter_model.safetensors").read_bytes()
    with pytest.raises(AdapterError, match=rf"^adapter_config.json: {re.escape(said)}"):
        read_adapter_bytes(config, weights, base_fp32)
    folder = tmp_path / "a"
    folder.mkdir()
    (folder / "adapter_config.json").write_bytes(config)
    (folder / "adapter_model.safetensors").write_bytes(weights)
    with pytest.raises(AdapterError, match=rf"adapter_config.json: {re.escape(said)}"):
        read_adapter(folder, base_fp32)
