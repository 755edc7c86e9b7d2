"""Kernel launches per decoder layer for each path of the fixed-grid decode form (apply_triton_per_token),
counted under the interpreter by recording every Triton launch (the host code alone decides them,
so nothing needs to run). A layer has seven adapted projections (q, k, v, o, gate, up, down) on the
engine's four fused GEMMs. Documented counts (triton_path.apply_triton_per_token, DESIGN §4):
tied two-launch = mix + expand per site, tied tiled = mix + tiled expand per site (tied_expand.py),
tied fused = one launch per site, family/LoRA = shrink
(mix fused) + expand per site (group form "grouped": grouped_shrink.py + grouped_expand.py over
family-sorted token blocks, plus a memset of u when the shrink splits K; "bgmv": the per-token
kernels), base = nothing; the prefill form (apply_triton) alike, with SGMV expands in the "bgmv"
form."""

import pytest
import torch
from triton.runtime.interpreter import InterpretedFunction

from nlora_serve.kernels import TIED, KernelSiteWeights, build_adapter_batch
from nlora_serve.kernels.triton_ops.per_token_batch import derive_per_token_batch
from nlora_serve.kernels.triton_ops.triton_path import apply_triton, apply_triton_per_token

GROUPS = ((32, (32, 16, 16)), (32, (32,)), (32, (48, 48)), (48, (32,)))  # qkv, o, gate_up, down
R, S = 16, 8


def _layer_launches(kind: str, form: str, monkeypatch, prefill: bool = False,
                    group_form: str = "grouped") -> list[str]:
    gen = torch.Generator().manual_seed(0)
    slots = torch.tensor([0, 3, -1, 5, 1, 7], dtype=torch.int32)
    fams = {"base": torch.full((S,), TIED), "tied": torch.full((S,), TIED), "family": torch.zeros(S),
            "lora": torch.arange(S), "mixed": torch.tensor([TIED, 0] * (S // 2))}[kind].to(torch.int32)
    has_tied, has_group = kind in ("tied", "mixed"), kind in ("family", "lora", "mixed")
    batch = derive_per_token_batch(slots, fams, torch.ones(S), R, has_tied, has_group)
    if prefill:  # the sorted-runs form (apply_triton), as prefill chunks run
        batch = build_adapter_batch(slots.long(), torch.full((S,), R), torch.ones(S), fams.long())
    names: list[str] = []
    monkeypatch.setattr(InterpretedFunction, "run",
                        lambda self, *a, grid, warmup, **k: names.append(self.__name__))
    for dim_in, outs in GROUPS:
        w = torch.randn(sum(outs), dim_in, generator=gen)
        x, y = torch.randn(len(slots), dim_in, generator=gen), torch.zeros(len(slots), sum(outs))
        row = 0
        for width, view in zip(outs, y.split(list(outs), dim=1)):
            site = KernelSiteWeights(torch.randn(S, R, R, generator=gen), torch.randn(S, R, dim_in, generator=gen),
                               torch.randn(S, width, R, generator=gen), tied_b=w[row:row + width, :R],
                               tied_a=w[row:row + R])
            (apply_triton if prefill else apply_triton_per_token)(view, x, batch, site, tied_form=form,
                                                               group_form=group_form)
            row += width
    return names


GROUPED, BGMV = ["_grouped_shrink_kernel", "_grouped_expand_kernel"], ["_bgmv_shrink_kernel", "_bgmv_expand_kernel"]


@pytest.mark.parametrize("group_form", ("grouped", "bgmv"))
@pytest.mark.parametrize("kind,form,per_site", (
    ("base", "two_launch", []),
    ("tied", "two_launch", ["_mix_kernel", "_bgmv_expand_kernel"]),
    ("tied", "fused", ["_tied_fused_kernel"]),
    ("tied", "tiled", ["_mix_kernel", "_tied_expand_kernel"]),
    ("family", "two_launch", ["GROUP"]),
    ("lora", "fused", ["GROUP"]),
    ("mixed", "two_launch", ["_mix_kernel", "GROUP", "_bgmv_expand_kernel"]),
    ("mixed", "fused", ["_tied_fused_kernel", "GROUP"]),
    ("mixed", "tiled", ["_mix_kernel", "GROUP", "_tied_expand_kernel"]),
))
def test_launches_per_layer(kind, form, per_site, group_form, monkeypatch):
    names = _layer_launches(kind, form, monkeypatch, group_form=group_form)
    group = GROUPED if group_form == "grouped" else BGMV
    assert names == [k for name in per_site for k in (group if name == "GROUP" else [name])] * 7
    assert len(names) == {"base": 0, "tied": 7 if form == "fused" else 14, "family": 14, "lora": 14,
                          "mixed": 21 if form == "fused" else 28}[kind]


@pytest.mark.parametrize("kind,form,per_site", (
    ("tied", "two_launch", ["_mix_kernel", "_sgmv_expand_kernel"]),
    ("tied", "fused", ["_tied_fused_kernel"]),
    ("tied", "tiled", ["_mix_kernel", "_tied_expand_kernel"]),
    ("mixed", "fused", ["_tied_fused_kernel", "_grouped_shrink_kernel", "_grouped_expand_kernel"]),
    ("mixed", "tiled", ["_mix_kernel", "_grouped_shrink_kernel", "_grouped_expand_kernel", "_tied_expand_kernel"]),
))
def test_launches_per_layer_prefill_form(kind, form, per_site, monkeypatch):
    assert _layer_launches(kind, form, monkeypatch, prefill=True) == per_site * 7


@pytest.mark.parametrize("kind,form,per_site", (
    ("mixed", "fused", ["_tied_fused_kernel", "_bgmv_shrink_kernel", "_sgmv_expand_kernel"]),
    ("mixed", "tiled", ["_mix_kernel", "_bgmv_shrink_kernel", "_sgmv_expand_kernel", "_tied_expand_kernel"]),
))
def test_launches_per_layer_prefill_form_bgmv(kind, form, per_site, monkeypatch):
    # runs here are shorter than 16 tokens: the group shrink is the per-token (BGMV) one
    assert _layer_launches(kind, form, monkeypatch, prefill=True, group_form="bgmv") == per_site * 7
