"""Train small real LoRAs with PEFT on CPU, each on its own tiny dataset (tests and bench).

Each LoRA: r = 8, lora_alpha = 16, q_proj and v_proj of every layer, AdamW at 3e-3 for a few
steps on four sentences of one style. Enough to move the outputs measurably (and differently per
dataset), small enough to train four in well under a minute on two cores.
"""

from __future__ import annotations

import copy
from pathlib import Path

import torch

DATASETS = {
    "pirate": ["Arr, the ship sails at dawn, matey, hoist the black flag high.",
               "Ye scurvy dog, the treasure be buried on the isle of skulls.",
               "Shiver me timbers, the captain drinks rum by the barrel, arr.",
               "Avast, ye landlubbers, the kraken rises from the deep blue sea."],
    "french": ["Le chat dort sur le canapé pendant que la pluie tombe dehors.",
               "Nous allons au marché le samedi matin pour acheter du pain frais.",
               "La bibliothèque de la ville ouvre ses portes à neuf heures précises.",
               "Mon frère apprend à jouer du piano depuis le printemps dernier."],
    "code": ["def add(a, b):\n    return a + b\n\nprint(add(2, 3))",
             "for i in range(10):\n    if i % 2 == 0:\n        print(i)",
             "import json\nwith open('data.json') as f:\n    data = json.load(f)",
             "class Point:\n    def __init__(self, x, y):\n        self.x, self.y = x, y"],
    "shout": ["THIS IS THE MOST IMPORTANT NEWS OF THE ENTIRE YEAR, READ IT NOW.",
              "EVERYONE MUST GATHER IN THE MAIN HALL AT NOON FOR THE ANNOUNCEMENT.",
              "THE STORE IS CLOSING EARLY TODAY BECAUSE OF THE HEAVY SNOWSTORM.",
              "DO NOT FORGET TO BRING YOUR TICKETS AND YOUR ID TO THE CONCERT."],
}


def train_lora(hf_model, tokenizer, texts: list[str], out: Path, *, steps: int = 8, seed: int = 0,
               r: int = 8, targets=("q_proj", "v_proj"), lr: float = 3e-3, max_len: int = 24) -> Path:
    """Train one LoRA with PEFT on ``texts`` and save it (PEFT's own save_pretrained) to ``out``."""
    from peft import LoraConfig, get_peft_model

    torch.manual_seed(seed)
    model = get_peft_model(copy.deepcopy(hf_model), LoraConfig(
        r=r, lora_alpha=2 * r, target_modules=list(targets), lora_dropout=0.0, task_type="CAUSAL_LM"))
    ids = [tokenizer(t)["input_ids"][:max_len] for t in texts]
    width = min(len(i) for i in ids)
    batch = torch.tensor([i[:width] for i in ids])
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    model.train()
    for _ in range(steps):
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(str(out))
    return out


def train_all(hf_model, tokenizer, root: Path, names=tuple(DATASETS), **kw) -> dict[str, Path]:
    """One LoRA per dataset under ``root/<name>``."""
    return {n: train_lora(hf_model, tokenizer, DATASETS[n], root / n, seed=i, **kw) for i, n in enumerate(names)}
