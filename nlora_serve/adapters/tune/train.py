"""``adapters tune``: IntTune, i.e. NLoRA init then training of the r×r matrix N (M) alone.

Source: NLoRA / IntTune (Guo, Wu, Chang, arXiv 2502.14482) and DESIGN §1, §3. Every targeted
``nn.Linear`` (weight W [out, in]) of the transformers model becomes

    y = W x + s · B (N (A x))        A = W[:r, :], B = W[:, :r] (frozen views of W), N [r, r] trained

so the result is Nyström-tied: it is written in the compact tied form (only ``lora_N``) and joins
the family of every other tenant of the same base, r and targets. N starts from the reference
value W[:r, :r] (``nystrom``), from pinv(W[:r, :r]) (``pinv``), or from zeros (``zeros``: the
tenant starts exactly at the base model). Training runs on the CPU in float32, on the transformers
model (not the serving runner), with the loss on response tokens only; optionally plus a token-level
unlikelihood term on a fixed set of tokens the tenant should not say (``unlikelihood``).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from nlora_serve.adapters.adapter import Adapter, SiteWeights
from nlora_serve.adapters.loader import assemble_adapter
from nlora_serve.adapters.nystrom import init_adapter
from nlora_serve.adapters.save import write_adapter
from nlora_serve.adapters.tune.data import IGNORE, collate, encode, split
from nlora_serve.adapters.tune.unlikelihood import (compile_pattern, unlikelihood_sum, unlikely_mass,
                                               unlikely_token_mask)
from nlora_serve.adapters.writing import Undo, check_out_dir
from nlora_serve.errors import AdapterError
from nlora_serve.models.base import BaseModel, load_hf_model
from nlora_serve.models.spec import ModelSpec

N_INITS = ("nystrom", "pinv", "zeros")
_VARIANT = {"nystrom": "nlora", "pinv": "nlora-pinv", "zeros": "nlora"}  # A/B init is Nyström for all


@dataclass(slots=True)
class TuneConfig:
    """Hyper-parameters of one IntTune run. ``steps`` counts optimizer steps (each ``grad_accum``
    micro-batches of ``batch_size`` examples); when None, ``epochs`` passes over the training split."""

    rank: int = 16  # r of every site
    targets: list[str] | str = "all-linear"  # projection names or "all-linear"
    n_init: str = "nystrom"  # one of N_INITS
    alpha: float | None = None  # lora_alpha (None: r, so s = 1)
    lr: float = 2e-3  # AdamW peak learning rate
    epochs: int = 1
    steps: int | None = None
    batch_size: int = 4  # examples per micro-batch
    grad_accum: int = 1  # micro-batches per optimizer step
    warmup: int = 0  # linear warm-up steps before the cosine decay
    held_out: float = 0.1  # fraction of examples kept for the held-out loss
    seed: int = 0
    max_len: int = 512  # tokens per example (longer ones are cut)
    weight_decay: float = 0.0  # decoupled decay pulls N towards 0, i.e. towards the base model
    unlikely_tokens: str | None = None  # regex: tokens whose decoded text matches are negatives (unlikelihood)
    unlikelihood_weight: float | None = None  # λ of the unlikelihood term (None: 1.0 with a regex, else 0)

    def __post_init__(self):
        if self.unlikely_tokens is None and self.unlikelihood_weight:
            raise AdapterError("tune: an unlikelihood weight needs --unlikely-tokens (the tokens to penalise)")
        if self.unlikelihood_weight is None:
            self.unlikelihood_weight = 0.0 if self.unlikely_tokens is None else 1.0
        if not (self.unlikelihood_weight >= 0 and math.isfinite(self.unlikelihood_weight)):
            raise AdapterError(f"tune: unlikelihood weight {self.unlikelihood_weight} must be finite and >= 0")
        if self.unlikely_tokens is not None:
            compile_pattern(self.unlikely_tokens)  # a bad pattern fails here, before any model is loaded
        if self.n_init not in N_INITS:
            raise AdapterError(f"n_init {self.n_init!r} is not one of {', '.join(N_INITS)}")
        ints = {"rank": self.rank, "epochs": self.epochs, "batch_size": self.batch_size,
                "grad_accum": self.grad_accum, "max_len": self.max_len}
        if self.steps is not None:
            ints["steps"] = self.steps
        for name, value in ints.items():
            if not isinstance(value, int) or value < 1:
                raise AdapterError(f"tune: {name} = {value!r}; expected an integer >= 1")
        if self.alpha is not None and not (isinstance(self.alpha, (int, float)) and 0 < self.alpha < math.inf):
            raise AdapterError(f"tune: alpha = {self.alpha!r}; expected a finite number > 0 (at 0 the adapter's "
                               "delta is 0 whatever N is: nothing would be trained)")
        if not (self.lr > 0 and 0 <= self.held_out < 1 and self.warmup >= 0 and self.weight_decay >= 0):
            raise AdapterError(f"tune: need lr > 0 (got {self.lr}), 0 <= held_out < 1 (got {self.held_out}), "
                               f"warmup >= 0 (got {self.warmup}), weight_decay >= 0 (got {self.weight_decay})")


@dataclass(slots=True)
class TuneResult:
    """What a run did. Held-out losses are mean cross-entropy per response token, in nats; train
    losses add λ times the mean unlikelihood term when there is one."""

    held_out_before: float | None  # None when there is no held-out split
    held_out_after: float | None
    train_first: float  # loss of the first optimizer step
    train_last: float  # loss of the last optimizer step
    steps: int  # optimizer steps
    num_train: int  # training examples
    num_held_out: int
    seconds: float  # wall time of the training loop (evaluation excluded)
    adapter: Adapter = field(repr=False)
    unlikely_before: float | None = None  # held-out mean p_t(U) per response token (None: no regex/split)
    unlikely_after: float | None = None


class TunedLinear(nn.Module):
    """``base(x) + s · ((x Aᵀ) Nᵀ) Bᵀ`` with A = W[:r, :] and B = W[:, :r] frozen views of the base
    weight and N [r, r] float32 the only parameter. x [..., in] → y [..., out]."""

    def __init__(self, base: nn.Linear, rank: int, scaling: float, n0: torch.Tensor):
        super().__init__()
        self.base, self.scaling = base, scaling
        w = base.weight.detach()
        self.register_buffer("A", w[:rank, :], persistent=False)  # [r, in], shares W's storage
        self.register_buffer("B", w[:, :rank], persistent=False)  # [out, r]
        self.N = nn.Parameter(n0.detach().to(torch.float32).clone())  # [r, r]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + self.scaling * (x @ self.A.T @ self.N.T @ self.B.T)


def attach(model: nn.Module, adapter: Adapter, n_init: str = "nystrom") -> dict[tuple[int, str], TunedLinear]:
    """Freeze ``model`` and replace each of ``adapter``'s sites by a :class:`TunedLinear` whose N
    starts at the site's N (or zeros for ``n_init="zeros"``). Returns site → module.

    Raises:
        AdapterError: the model's weight at a site is not the base weight the adapter was made from.
    """
    model.requires_grad_(False)
    modules = {}
    for (layer, module), site in adapter.sites.items():
        parent_name, _, attr = ModelSpec.module_path(layer, module).rpartition(".")
        parent = model.get_submodule(parent_name)
        lin = getattr(parent, attr)
        if not torch.equal(lin.weight.detach()[: site.rank], site.A.to(lin.weight.dtype)):
            raise AdapterError(f"{parent_name}.{attr}: the model's weight differs from the base weight "
                               "the adapter was initialised from (another model or dtype?)")
        n0 = torch.zeros_like(site.N) if n_init == "zeros" else site.N
        modules[(layer, module)] = TunedLinear(lin, site.rank, site.scaling, n0)
        setattr(parent, attr, modules[(layer, module)])
    return modules


def num_targets(batch: dict[str, torch.Tensor]) -> int:
    """Tokens that carry loss: positions t whose next token t+1 is labelled."""
    return int((batch["labels"][:, 1:] != IGNORE).sum())


def labelled_logits(model: nn.Module, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """(float32 logits [K, vocab], targets [K]) of the K positions whose next token is labelled; the
    LM head runs only there, which saves its [T, vocab] product on prompt and padding positions."""
    hidden = model.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).last_hidden_state
    targets = batch["labels"][:, 1:]
    keep = targets != IGNORE
    return model.lm_head(hidden[:, :-1][keep]).float(), targets[keep]


def loss_sum(model: nn.Module, batch: dict[str, torch.Tensor], unlikely: torch.Tensor | None = None,
             weight: float = 0.0) -> torch.Tensor:
    """Summed next-token cross-entropy (nats) over labelled tokens, plus ``weight`` times the summed
    unlikelihood term of the negative set ``unlikely`` ([vocab] bool) when given."""
    logits, targets = labelled_logits(model, batch)
    loss = nn.functional.cross_entropy(logits, targets, reduction="sum")
    return loss + weight * unlikelihood_sum(logits, targets, unlikely) if unlikely is not None and weight else loss


@torch.no_grad()
def mean_loss(model: nn.Module, batches: list[dict[str, torch.Tensor]], desc: str | None = None) -> float | None:
    """Token-weighted mean loss over ``batches`` (None when there are none); ``desc`` shows a
    progress bar with that label (the held-out passes take a while on the CPU before training)."""
    total, count = 0.0, sum(num_targets(b) for b in batches)
    for b in tqdm(batches, desc=desc, unit="batch", disable=desc is None, leave=False):
        total += float(loss_sum(model, b))
    return total / count if count else None


@torch.no_grad()
def mean_unlikely_mass(model: nn.Module, batches: list[dict[str, torch.Tensor]], unlikely: torch.Tensor) -> float | None:
    """Mean p_t(U) over the labelled positions of ``batches`` (None when there are none)."""
    count = sum(num_targets(b) for b in batches)
    total = sum(float(unlikely_mass(labelled_logits(model, b)[0], unlikely).sum()) for b in batches)
    return total / count if count else None


def cosine_schedule(warmup: int, total: int):
    """LR multiplier per step: linear warm-up to 1 over ``warmup`` steps, then cosine to 0 at ``total``."""
    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, total - warmup)))
    return factor


def _micro_batches(data: list, size: int, gen: torch.Generator):
    """Endless micro-batches: each epoch a fresh permutation drawn from ``gen``."""
    while True:
        order = torch.randperm(len(data), generator=gen).tolist()
        for i in range(0, len(order), size):
            yield [data[j] for j in order[i: i + size]]


def train(model: nn.Module, params: list[nn.Parameter], data: list, cfg: TuneConfig, pad_id: int,
          gen: torch.Generator, progress: bool = True,
          unlikely: torch.Tensor | None = None) -> tuple[int, float, float]:
    """AdamW on ``params`` with the cosine schedule; each step's loss is the token-weighted mean over
    its ``grad_accum`` micro-batches (cross-entropy plus λ · unlikelihood on ``unlikely`` when given).
    Returns (steps, first loss, last loss)."""
    total = cfg.steps or cfg.epochs * math.ceil(len(data) / (cfg.batch_size * cfg.grad_accum))
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, cosine_schedule(cfg.warmup, total))
    stream, losses = _micro_batches(data, cfg.batch_size, gen), []
    bar = tqdm(range(total), desc="tune", unit="step", disable=not progress)
    for _ in bar:
        group = [collate(next(stream), pad_id) for _ in range(cfg.grad_accum)]
        count, step_loss = max(1, sum(num_targets(b) for b in group)), 0.0
        for batch in group:
            loss = loss_sum(model, batch, unlikely, cfg.unlikelihood_weight) / count
            loss.backward()
            step_loss += loss.item()
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(step_loss)
        bar.set_postfix(loss=f"{step_loss:.4f}", lr=f"{sched.get_last_lr()[0]:.2e}")
    return total, losses[0], losses[-1]


def trained_adapter(start: Adapter, modules: dict[tuple[int, str], TunedLinear], base: BaseModel) -> Adapter:
    """``start`` (the Nyström init) with each site's N replaced by the trained one: a tied adapter
    of the same family, hashed afresh."""
    sites = {k: SiteWeights(layer=s.layer, module=s.module, rank=s.rank, scaling=s.scaling, A=s.A,
                            N=modules[k].N.detach().clone(), B=s.B) for k, s in start.sites.items()}
    return assemble_adapter(start.config, sites, base, torch.float32, family=start.family_key, source="tune")


def _encoded(tok, examples: list[list[dict]], max_len: int) -> list:
    """The examples as (ids, labels), those cut to ``max_len`` tokens before any response token is
    trained on left out.

    Raises:
        AdapterError: ``max_len`` leaves no example a response token to train on.
    """
    encoded = [encode(tok, m, max_len) for m in examples]
    kept = [e for e in encoded if any(t != IGNORE for t in e[1][1:])]
    if examples and not kept:
        raise AdapterError(f"max_len {max_len} (--max-len) cuts every one of the {len(examples)} example(s) before "
                           f"its response: the shortest prompt is {min(_prompt_len(encode(tok, m, None)) for m in examples)} tokens "
                           "with the chat template; raise --max-len")
    return kept


def _prompt_len(example) -> int:
    """Tokens before the first trained label of an encoded (ids, labels) example."""
    labels = example[1]
    return next((i for i, t in enumerate(labels) if t != IGNORE), len(labels))


def check_outputs(out_dir: str | Path | None, full_out_dir: str | Path | None) -> None:
    """Both output folders writable and free of an adapter, and not one folder.

    Raises:
        AdapterError: as :func:`~nlora_serve.adapters.writing.check_out_dir`, or both name one folder.
    """
    for d, what in ((out_dir, "--out"), (full_out_dir, "--also-full-form")):
        if d is not None:
            check_out_dir(Path(d), what)
    if out_dir is not None and full_out_dir is not None and Path(out_dir).resolve() == Path(full_out_dir).resolve():
        raise AdapterError(f"--out and --also-full-form name one folder ({out_dir}); the two forms need a folder each")


def tune(base: BaseModel, examples: list[list[dict]], cfg: TuneConfig, *, out_dir: str | Path | None = None,
         full_out_dir: str | Path | None = None, model: nn.Module | None = None,
         progress: bool = True) -> TuneResult:
    """Run IntTune on ``examples`` (see :func:`read_examples`) and optionally write the result:
    the compact tied form to ``out_dir``, the full reference layout (lora_A/N/B) to ``full_out_dir``.

    Args:
        base: the base model in float32 (its weights give A, B and the init of N).
        model: the transformers model of ``base`` to train on, modified in place (default: a fresh
            load from ``base.path``); pass a deep copy to keep an original.

    Raises:
        AdapterError: a non-float32 base, bad config or data, an ``unlikely_tokens`` pattern that
            matches no token or every one, or an output directory that already holds an adapter
            (all checked before training).
    """
    if base.dtype != torch.float32:
        raise AdapterError(f"tune runs in float32; the base model was loaded as {base.dtype}")
    check_outputs(out_dir, full_out_dir)  # fail before training, not after it
    torch.manual_seed(cfg.seed)
    gen = torch.Generator().manual_seed(cfg.seed)
    tok = base.tokenizer()
    encoded = _encoded(tok, examples, cfg.max_len)  # before the model loads: a bad --max-len fails fast
    start = init_adapter(base, rank=cfg.rank, targets=cfg.targets, variant=_VARIANT[cfg.n_init], alpha=cfg.alpha)
    model = model if model is not None else load_hf_model(base.path, torch.float32)
    modules = attach(model, start, cfg.n_init)
    unlikely = (None if cfg.unlikely_tokens is None else
                unlikely_token_mask(tok, cfg.unlikely_tokens, model.get_output_embeddings().out_features))
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    train_set, held = split(encoded, cfg.held_out, gen)
    held_batches = [collate(held[i: i + cfg.batch_size], pad_id) for i in range(0, len(held), cfg.batch_size)]
    label = "held-out loss" if progress else None  # its bar: minutes on a busy CPU, before the first step
    before = mean_loss(model, held_batches, label)
    mass_before = None if unlikely is None else mean_unlikely_mass(model, held_batches, unlikely)
    t0 = time.perf_counter()
    steps, first, last = train(model, [m.N for m in modules.values()], train_set, cfg, pad_id, gen, progress,
                               unlikely)
    seconds = time.perf_counter() - t0
    adapter = trained_adapter(start, modules, base)
    with Undo() as undo:  # both forms or neither
        for d, tied_form in ((out_dir, True), (full_out_dir, False)):
            if d is not None:
                write_adapter(adapter, d, tied_form=tied_form, undo=undo)
    return TuneResult(held_out_before=before, held_out_after=mean_loss(model, held_batches, label), train_first=first,
                      train_last=last, steps=steps, num_train=len(train_set), num_held_out=len(held),
                      seconds=seconds, adapter=adapter, unlikely_before=mass_before,
                      unlikely_after=None if unlikely is None else mean_unlikely_mass(model, held_batches, unlikely))
