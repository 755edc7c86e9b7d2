"""Hot-swap of a tied tenant uploaded in the full form: the new version's files on disk are a
complete adapter that a restart loads to the same content hash and the same N.

The full form with a lora_B bias cannot be compacted, so the new version keeps the full form with
its lora_N replaced; without a bias it is compacted. References: the upload's own tensors and the
payload, read with safetensors' reader, and the full adapter reader on the expected files.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import safetensors.torch
import torch

from nlora_serve.adapters.loader import read_adapter_bytes
from nlora_serve.adapters.runtime.manager import AdapterManager
from nlora_serve.adapters.store import CONFIG_FILE, WEIGHTS_FILE

TIED_CASE = Path(__file__).resolve().parents[1] / "data" / "cases" / "inttune-nystrom-tied"
SITE_KEY = re.compile(r"base_model\.model\.model\.layers\.(\d+)\.\w+\.(\w+)\.lora_(N\.weight|B\.bias)")


def full_form_upload(bias: bool) -> tuple[dict[str, bytes], dict[str, torch.Tensor]]:
    """The shared tied case in the full form (lora_A, lora_N, lora_B = the base's slices), with a
    seeded lora_B bias per site when ``bias``. Returns the files and their tensors."""
    config = json.loads((TIED_CASE / CONFIG_FILE).read_text())
    tensors = safetensors.torch.load_file(TIED_CASE / WEIGHTS_FILE)
    if bias:
        config["lora_bias"] = True
        gen = torch.Generator().manual_seed(0)
        for key, t in list(tensors.items()):
            if key.endswith("lora_B.weight"):
                tensors[key.replace(".weight", ".bias")] = 0.01 * torch.randn(t.shape[0], generator=gen)
    files = {CONFIG_FILE: json.dumps(config).encode(), WEIGHTS_FILE: safetensors.torch.save(tensors)}
    return files, tensors


def n_payload(tensors: dict[str, torch.Tensor], scale: float) -> dict[str, torch.Tensor]:
    return {k: (t * scale).contiguous() for k, t in tensors.items() if k.endswith("lora_N.weight")}


@pytest.fixture(scope="module")
def base_bf16(base_model_dir):
    from nlora_serve.models import load_base

    return load_base(str(base_model_dir), torch.bfloat16)


@pytest.mark.parametrize("base_name", ["base_fp32", "base_bf16"])  # bf16: the bias is hashed as stored
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no-bias"])
def test_restart_after_a_swap_of_a_full_form_tied_upload_serves_the_swapped_version(request, tmp_path, bias,
                                                                                    base_name):
    base = request.getfixturevalue(base_name)
    files, tensors = full_form_upload(bias)
    manager = AdapterManager(base, tmp_path / "store")
    v1 = manager.register("acme", files)
    assert v1.is_tied
    held = manager.acquire("acme")  # keeps v1's folder on disk, to compare the config's inode
    new_n = n_payload(tensors, 1.5)
    v2 = manager.swap("acme", safetensors.torch.save(new_n), if_version=1)
    expected = {**tensors, **new_n}  # the upload with its N replaced: what v2 serves
    want = read_adapter_bytes(files[CONFIG_FILE], safetensors.torch.save(expected), base)
    assert v2.content_hash == want.content_hash != v1.content_hash
    if bias:  # the config file is shared (checked before the restart below prunes v1's folder)
        assert (v2.path / CONFIG_FILE).stat().st_ino == (v1.path / CONFIG_FILE).stat().st_ino
    manager.release(held)

    restarted = AdapterManager(base, tmp_path / "store").registry.get("acme")
    assert (restarted.version, restarted.content_hash) == (2, v2.content_hash)
    by_site = {}
    for key, t in expected.items():
        if m := SITE_KEY.fullmatch(key):
            by_site.setdefault((int(m.group(1)), m.group(2)), {})[m.group(3)] = t
    assert set(restarted.adapter.sites) == set(by_site)
    for site, parts in by_site.items():
        for got in (v2.adapter.sites[site], restarted.adapter.sites[site]):  # served, then restarted
            assert torch.equal(got.N, parts["N.weight"].to(base.dtype))
            assert torch.equal(got.bias, parts["B.bias"].to(base.dtype)) if bias else got.bias is None

    on_disk = safetensors.torch.load_file(v2.path / WEIGHTS_FILE)
    if bias:  # not compactable: the full form, every tensor but N as uploaded
        assert set(on_disk) == set(expected)
        assert all(torch.equal(on_disk[k], t) for k, t in expected.items())
    else:  # compacted: N only
        assert set(on_disk) == set(new_n) and all(torch.equal(on_disk[k], t) for k, t in new_n.items())
