"""Train a zoo of small real LoRAs with PEFT on CPU, one per dataset of bench/lora_zoo_data.py.

    OMP_NUM_THREADS=1 PYTHONPATH=. .venv/bin/python bench/lora_zoo.py [--steps 32] [--threads 1]

Each LoRA: PEFT ``LoraConfig(r=8, lora_alpha=16, target_modules=[q_proj, v_proj])`` on the default
base (SmolLM2-135M-Instruct, fp32), AdamW at 2e-3 for ``--steps`` steps; a step is one batch of
4 blocks of 32 tokens cut from the dataset's texts, tokenised and packed end to end (EOS between
texts), blocks taken in a seeded order. Saved by PEFT's own ``save_pretrained``.

The zoo is cached (not in the repo) under ``--cache`` (default ~/.cache/nlora-serve/bench-loras),
in a folder named by a hash of the training settings and of every dataset's texts; a LoRA already
there is reused, so a second run costs nothing. ``manifest.json`` records the settings, the PEFT
and torch versions, and each LoRA's training time and first / last loss.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
import lora_zoo_data  # noqa: E402  (bench/ is not a package)

DEFAULT_CACHE = Path("~/.cache/nlora-serve/bench-loras").expanduser()
SETTINGS = {"r": 8, "alpha": 16, "targets": ["q_proj", "v_proj"], "lr": 2e-3, "batch": 4, "block": 32,
            "texts": lora_zoo_data.TEXTS_PER_DATASET, "model": "default"}


def blocks(tokenizer, texts: list[str], block: int) -> torch.Tensor:
    """The texts tokenised, joined with EOS and cut into [n, block] int64 rows (the tail dropped)."""
    ids: list[int] = []
    for t in texts:
        ids += tokenizer(t)["input_ids"] + [tokenizer.eos_token_id]
    n = len(ids) // block
    if n == 0:
        raise ValueError(f"the texts hold {len(ids)} tokens, fewer than one block of {block}")
    return torch.tensor(ids[: n * block]).view(n, block)


def train_one(hf_model, tokenizer, texts: list[str], out: Path, *, steps: int, seed: int, settings: dict) -> dict:
    """Train one LoRA on ``texts`` and save it to ``out``; returns {seconds, loss_first, loss_last}."""
    from peft import LoraConfig, get_peft_model

    start = time.perf_counter()
    torch.manual_seed(seed)
    model = get_peft_model(copy.deepcopy(hf_model), LoraConfig(
        r=settings["r"], lora_alpha=settings["alpha"], target_modules=list(settings["targets"]),
        lora_dropout=0.0, task_type="CAUSAL_LM"))
    data = blocks(tokenizer, texts, settings["block"])
    order = torch.randperm(steps * settings["batch"], generator=torch.Generator().manual_seed(seed)) % len(data)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=settings["lr"])
    model.train()
    losses = []
    for step in range(steps):
        batch = data[order[step * settings["batch"]:(step + 1) * settings["batch"]]]
        loss = model(input_ids=batch, labels=batch).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
        losses.append(loss.item())
    tmp = out.with_name(out.name + ".partial")
    model.save_pretrained(str(tmp))
    tmp.rename(out)  # a LoRA folder exists only once it is complete
    return {"seconds": time.perf_counter() - start, "loss_first": losses[0], "loss_last": losses[-1]}


def zoo_dir(cache: Path, steps: int) -> Path:
    """The cache folder for these settings: a hash of them, the step count and every dataset's
    texts (so a changed dataset builder never reuses LoRAs trained on the old texts)."""
    texts = {n: lora_zoo_data.build(n, SETTINGS["texts"]) for n in lora_zoo_data.NAMES}
    key = json.dumps({**SETTINGS, "steps": steps, "texts": texts}, sort_keys=True)
    return cache / f"zoo-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def ensure_zoo(cache: Path = DEFAULT_CACHE, steps: int = 32, names=lora_zoo_data.NAMES) -> tuple[list[Path], dict]:
    """The trained LoRA folders (training those not cached yet) and the manifest."""
    root = zoo_dir(cache, steps)
    root.mkdir(parents=True, exist_ok=True)
    manifest_path = root / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else {}
    missing = [n for n in names if not (root / n / "adapter_model.safetensors").is_file()]
    if missing:
        import peft
        from transformers import AutoTokenizer

        from nlora_serve.models import load_base, load_hf_model

        base = load_base(SETTINGS["model"], torch.float32)
        tok = AutoTokenizer.from_pretrained(base.path)
        hf = load_hf_model(base.path, torch.float32)
        manifest.update({"settings": {**SETTINGS, "steps": steps}, "peft": peft.__version__,
                         "torch": torch.__version__, "threads": torch.get_num_threads()})
        manifest.setdefault("loras", {})
        for n in missing:
            seed = lora_zoo_data.NAMES.index(n)
            stats = train_one(hf, tok, lora_zoo_data.build(n, SETTINGS["texts"]), root / n, steps=steps, seed=seed, settings=SETTINGS)
            manifest["loras"][n] = stats
            manifest_path.write_text(json.dumps(manifest, indent=2) + "\n")
            print(f"trained {n:<18} {stats['seconds']:6.1f} s  loss {stats['loss_first']:.3f} -> {stats['loss_last']:.3f}",
                  flush=True)
    return [root / n for n in names], manifest


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=32, help="optimizer steps per LoRA (default: %(default)s)")
    p.add_argument("--cache", default=str(DEFAULT_CACHE), help="zoo cache folder (default: %(default)s)")
    p.add_argument("--only", nargs="+", default=None, help="train these datasets only (default: all)")
    p.add_argument("--threads", type=int, default=1, help="torch threads (default: %(default)s)")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    start = time.perf_counter()
    dirs, manifest = ensure_zoo(Path(args.cache), args.steps, tuple(args.only or lora_zoo_data.NAMES))
    total = sum(manifest.get("loras", {}).get(d.name, {}).get("seconds", 0.0) for d in dirs)
    print(f"{len(dirs)} LoRAs in {dirs[0].parent} (training time recorded: {total:.0f} s; this run {time.perf_counter() - start:.0f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
