"""bench/lora_zoo_data.py and bench/lora_zoo.py (the trained-LoRA zoo of issue 21's benchmark):
the datasets are deterministic, pairwise distinct, and their transforms give hand-computed
texts; the trainer packs tokens as documented and writes a LoRA PEFT loads, reused from the cache."""

from __future__ import annotations

import json
import sys
from itertools import combinations
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parents[2] / "bench"))
import lora_zoo  # noqa: E402
import lora_zoo_data as data  # noqa: E402


def test_every_dataset_is_deterministic_and_sized():
    for name in data.NAMES:
        first = data.build(name, 12)
        assert first == data.build(name, 12), name
        assert len(first) == 12 and all(isinstance(t, str) and t.strip() for t in first), name


def test_datasets_are_pairwise_distinct():
    built = {n: data.build(n) for n in data.NAMES}
    assert len(data.NAMES) >= 24
    for a, b in combinations(data.NAMES, 2):
        assert not set(built[a]) & set(built[b]), (a, b)
    # the transformed datasets draw different answers (their own seeded samples), not one shared list
    lower, title = built["lower"], built["title"]
    assert {t.lower() for t in lower} != {t.lower() for t in title}


@pytest.mark.parametrize("name, text, want", [
    ("pirate", "Hello friend, you are very nice.", "Arr, ahoy matey, ye be mighty nice, matey!"),
    ("french", "The cat is on the mat.", "le cat est sur le mat."),
    ("numbers", "About 71% of it.", "About seven one % of it."),
    ("reversed_clauses", "Alpha, beta. Gamma", "Gamma, beta, Alpha."),
    ("bullets", "Alpha, beta. Gamma", "- Alpha\n- beta\n- Gamma"),
    ("numbered", "Alpha, beta", "1. Alpha\n2. beta"),
    ("leet", "Eat toast", "347 70457"),
    ("pig_latin", "string apple", "ingstray appleay"),
    ("snake", "Big Red Dog!", "big_red_dog"),
    ("telegram", "The dog is here.", "DOG HERE STOP"),
    ("reversed_words", "one two three.", "three two one."),
    ("signature", "Done.", "Done. -- Acme Support"),
])
def test_transforms_give_the_hand_computed_text(name, text, want):
    assert data.TRANSFORMS[name](text, data._rng(name)) == want


def test_transformed_datasets_use_the_given_source():
    src = ["Alpha beta.", "Gamma delta.", "Epsilon zeta."]
    got = data.build("shout", 3, source=src)
    assert sorted(got) == sorted(t.upper() + "!!" for t in src)  # each answer once before any repeat


def test_bad_names_and_counts_are_refused():
    with pytest.raises(KeyError, match="unknown dataset 'nope'"):
        data.build("nope")
    with pytest.raises(ValueError, match="count must be ≥ 1"):
        data.build("lower", 0)
    with pytest.raises(ValueError, match="no source answers"):
        data.build("lower", 2, source=[])


class _Tok:
    eos_token_id = 0

    def __call__(self, text):
        return {"input_ids": [len(w) for w in text.split()]}


def test_blocks_pack_texts_with_eos_and_drop_the_tail():
    got = lora_zoo.blocks(_Tok(), ["a bb ccc", "dddd e"], 3)
    assert got.tolist() == [[1, 2, 3], [0, 4, 1]]  # 1 2 3 EOS 4 1 EOS: the last EOS is the dropped tail
    with pytest.raises(ValueError, match="fewer than one block"):
        lora_zoo.blocks(_Tok(), ["a"], 3)


def test_zoo_cache_key_follows_the_settings(tmp_path):
    assert lora_zoo.zoo_dir(tmp_path, 32) != lora_zoo.zoo_dir(tmp_path, 16)
    assert lora_zoo.zoo_dir(tmp_path, 32) == lora_zoo.zoo_dir(tmp_path, 32)


def test_a_trained_lora_loads_in_peft_changes_outputs_and_is_reused(tmp_path, monkeypatch):
    from peft import PeftModel
    from transformers import AutoTokenizer

    from nlora_serve.models import load_base, load_hf_model

    monkeypatch.setitem(lora_zoo.SETTINGS, "texts", 4)
    dirs, manifest = lora_zoo.ensure_zoo(tmp_path, steps=2, names=("shout",))
    weights = dirs[0] / "adapter_model.safetensors"
    stamp = weights.stat().st_mtime_ns
    assert json.loads((dirs[0] / "adapter_config.json").read_text())["r"] == 8
    assert manifest["loras"]["shout"]["seconds"] > 0
    base = load_base("default", torch.float32)
    tok = AutoTokenizer.from_pretrained(base.path)
    ids = torch.tensor([tok("THE STORE IS CLOSING")["input_ids"]])
    plain = load_hf_model(base.path, torch.float32)
    with torch.no_grad():
        before = plain(ids).logits
        after = PeftModel.from_pretrained(plain, str(dirs[0]))(ids).logits
    assert (after - before).abs().max() > 1e-3  # trained B is nonzero: the LoRA moves the logits
    again, _ = lora_zoo.ensure_zoo(tmp_path, steps=2, names=("shout",))
    assert again == dirs and weights.stat().st_mtime_ns == stamp  # cached: not retrained
