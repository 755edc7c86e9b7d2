"""``adapter_config.json``: parse, validate, and decide which modules an adapter adapts.

Target selection, ``rank_pattern`` / ``alpha_pattern`` and the scaling rule mirror PEFT 0.21
(``peft/tuners/tuners_utils.py:check_target_module_exists``, ``peft/utils/other.py:get_pattern_key``,
``peft/tuners/lora/layer.py:update_layer``), so an adapter means here what it means in PEFT.
Module names are the Hugging Face ones, e.g. ``model.layers.3.self_attn.q_proj``.
"""

from __future__ import annotations

import functools
import json
import math
import re
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import regex

from nlora_serve.adapters.file_read import CONFIG_FILE, read_file
from nlora_serve.adapters.limits import DEFAULT_MAX_ADAPTER_BYTES
from nlora_serve.errors import AdapterError
from nlora_serve.models.spec import PROJECTIONS, ModelSpec

CONFIG_NAME = CONFIG_FILE
PATTERN_TIMEOUT_S = 0.05  # per match of an adapter-supplied regex against one module name
# entries of target_modules, exclude_modules, layers_pattern, rank_pattern, alpha_pattern at most: each is
# matched against every module name (a 128-layer model's every projection named is 896)
MAX_PATTERN_ENTRIES = 8192
ALL_LINEAR = "all-linear"
TIED_FORMAT = "tied-n"  # the compact IntTune form: only lora_N on disk (DESIGN §3)
FAMILY_FORMAT = "family-n"  # a member of a compressed family (adapters/family.py)
# PEFT's TRANSFORMERS_MODELS_TO_LORA_TARGET_MODULES_MAPPING for llama, mistral and qwen2.
DEFAULT_TARGETS = ("q_proj", "v_proj")
# Config fields whose non-empty value changes the served maths in a way this server does not do.
REFUSED_FIELDS = {
    "use_dora": "DoRA (use_dora=true) rescales the merged weight by lora_magnitude_vector",
    "modules_to_save": "modules_to_save replaces whole base modules",
    "trainable_token_indices": "trainable_token_indices replaces embedding rows",
    "target_parameters": "target_parameters adapts raw parameters, not linear modules",
    "layer_replication": "layer_replication changes the layer stack",
    "alora_invocation_tokens": "aLoRA activates only after invocation tokens",
    "use_qalora": "QA-LoRA pools the input before lora_A",
    "use_bdlora": "BD-LoRA stores block-diagonal factors",
}
# init_lora_weights values whose PEFT init rewrites the base weight (W - s·B0·A0, or LoftQ's quantized W),
# which PEFT does again when it loads such an adapter (peft/tuners/lora/layer.py update_layer): trained
# against that residual, not against the shared base this server holds.
_BASE_REWRITING_INITS = {"pissa": "PiSSA", "corda": "CorDA", "olora": "OLoRA", "loftq": "LoftQ"}


@dataclass(frozen=True, slots=True)
class TiedHeader:
    """The ``nlora_serve`` object of a compact tied adapter's config (DESIGN §3)."""

    format: str  # always TIED_FORMAT
    family: str  # family key, 64 hex chars (see tied.family_key)
    base_fingerprint: str  # fingerprint of the base model the A/B slices come from
    init: str = "nystrom"  # how A and B relate to W: A = W[:r, :], B = W[:, :r]

    def __post_init__(self):
        if self.format != TIED_FORMAT:
            raise AdapterError(f"{CONFIG_NAME}: nlora_serve.format {self.format!r} is not supported; expected "
                               f"{TIED_FORMAT!r} (a tied IntTune tenant) or {FAMILY_FORMAT!r} (a family member)")
        for name in ("family", "base_fingerprint", "init"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise AdapterError(f"{CONFIG_NAME}: nlora_serve.{name} must be a non-empty string")


@dataclass(frozen=True, slots=True)
class FamilyHeader:
    """The ``nlora_serve`` object of a compressed family member (adapters/family.py)."""

    format: str  # always FAMILY_FORMAT
    family: str  # key of the shared factors, 64 hex chars (family.factors_key)
    base_fingerprint: str  # the base model the family was compressed for

    def __post_init__(self):
        for name in ("family", "base_fingerprint"):
            if not isinstance(getattr(self, name), str) or not getattr(self, name):
                raise AdapterError(f"{CONFIG_NAME}: nlora_serve.{name} must be a non-empty string")


@dataclass(slots=True)
class AdapterConfig:
    """The PEFT LoRA fields that change the maths, validated; ``raw`` keeps the JSON as read."""

    r: int  # default rank
    lora_alpha: float  # default alpha
    target_modules: tuple[str, ...] | str = DEFAULT_TARGETS  # names/suffixes, a regex, or "all-linear"
    exclude_modules: tuple[str, ...] | str | None = None
    layers_to_transform: tuple[int, ...] | int | None = None
    layers_pattern: tuple[str, ...] | None = None
    rank_pattern: dict[str, int] = field(default_factory=dict)  # regex on the name suffix -> r
    alpha_pattern: dict[str, float] = field(default_factory=dict)  # regex on the name suffix -> alpha
    use_rslora: bool = False  # scaling alpha / sqrt(r) instead of alpha / r
    lora_bias: bool = False  # lora_B carries a bias
    init_lora_weights: bool | str = True
    tied: TiedHeader | None = None  # set for the compact tied form
    family: FamilyHeader | None = None  # set for a compressed family member
    raw: dict = field(default_factory=dict, repr=False)

    def __post_init__(self):
        for name in ("target_modules", "exclude_modules", "layers_pattern", "rank_pattern", "alpha_pattern"):
            value = getattr(self, name)
            if not isinstance(value, str) and value is not None and len(value) > MAX_PATTERN_ENTRIES:
                raise AdapterError(f"{CONFIG_NAME}: {name} has {len(value)} entries, over the limit of "
                                   f"{MAX_PATTERN_ENTRIES} (each is matched against every module name)")
        _check_rank("r", self.r)
        _check_alpha("lora_alpha", self.lora_alpha)
        for key, r in self.rank_pattern.items():
            _check_rank(f"rank_pattern[{key!r}]", r)
        for key, a in self.alpha_pattern.items():
            _check_alpha(f"alpha_pattern[{key!r}]", a)
        for name in ("target_modules", "exclude_modules"):
            if isinstance(getattr(self, name), str):
                _check_regex(name, getattr(self, name))
        for name in ("rank_pattern", "alpha_pattern"):
            for key in getattr(self, name):
                _check_regex(f"{name} key", key)
        _check_layers(self)


def _check_rank(name: str, r) -> None:
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise AdapterError(f"{CONFIG_NAME}: {name} = {r!r}; expected a positive integer rank")


def _check_alpha(name: str, alpha) -> None:
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not _finite(alpha):
        raise AdapterError(f"{CONFIG_NAME}: {name} = {alpha!r:.80}; expected a finite number")


def _finite(value: int | float) -> bool:
    """Whether ``value`` is a finite float64: a JSON integer past it (10**400) raised OverflowError."""
    try:
        return math.isfinite(value)
    except OverflowError:
        return False


def _check_regex(name: str, pattern: str) -> None:
    try:
        regex.compile(pattern)
    except regex.error as exc:
        raise AdapterError(f"{CONFIG_NAME}: {name} {pattern!r} is not a valid regex ({exc})") from None


@functools.lru_cache(maxsize=4 * MAX_PATTERN_ENTRIES)
def _compiled(pattern: str):
    """``regex.compile(pattern)``, kept: a config's patterns are matched against every module name,
    and past the regex module's own cache (500) each match compiled its pattern again (20,000
    rank_pattern keys on this model's 210 modules: 104 s)."""
    return regex.compile(pattern)


def _user_match(field_name: str, pattern: str, name: str, full: bool = False):
    """``re.match`` / ``re.fullmatch`` of an adapter-supplied pattern, bounded in time.

    Patterns come from uploaded configs: a catastrophic one (e.g. ``(.*)*X``) would otherwise
    backtrack for minutes with the GIL held and stall every tenant. The ``regex`` package (the
    well-kept superset of ``re`` that transformers already uses) takes a timeout and, with
    ``concurrent``, releases the GIL while it matches.

    Raises:
        AdapterError: the match took longer than PATTERN_TIMEOUT_S; the message names the field.
    """
    try:
        compiled = _compiled(pattern)
        match = compiled.fullmatch if full else compiled.match
        return match(name, timeout=PATTERN_TIMEOUT_S, concurrent=True)
    except TimeoutError:
        raise AdapterError(f"{CONFIG_NAME}: {field_name} {pattern!r} took over {PATTERN_TIMEOUT_S * 1000:.0f} ms "
                           f"to match the module name {name!r} (catastrophic backtracking?); simplify "
                           "the pattern") from None


def _check_layers(cfg: AdapterConfig) -> None:
    layers = cfg.layers_to_transform
    items = (layers,) if isinstance(layers, int) else layers or ()
    if any(isinstance(i, bool) or not isinstance(i, int) or i < 0 for i in items):
        raise AdapterError(f"{CONFIG_NAME}: layers_to_transform = {layers!r}; expected layer indices >= 0")
    if isinstance(cfg.target_modules, str) and layers is not None:
        raise AdapterError(f"{CONFIG_NAME}: layers_to_transform cannot be used when target_modules is "
                           f"the string {cfg.target_modules!r} (PEFT refuses it too)")
    if cfg.layers_pattern and layers is None:
        raise AdapterError(f"{CONFIG_NAME}: layers_pattern {cfg.layers_pattern!r} needs layers_to_transform")


def _flag(raw: dict, name: str) -> bool:
    """A true/false field (absent or null: false). bool() of the string "false" is True: a hand-edited
    ``"use_rslora": "false"`` scaled by alpha / sqrt(r) (as PEFT and vLLM read it too), silently."""
    value = raw.get(name)
    if value is not None and not isinstance(value, bool):
        raise AdapterError(f"{CONFIG_NAME}: {name} = {value!r}; expected true or false (a JSON boolean)")
    return bool(value)


def _names(value, field_name: str) -> tuple[str, ...] | str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return tuple(value)
    raise AdapterError(f"{CONFIG_NAME}: {field_name} = {value!r}; expected a list of names or a regex string")


def _refuse_unsupported(raw: dict) -> None:
    peft_type = raw.get("peft_type")
    if peft_type != "LORA":
        raise AdapterError(f"{CONFIG_NAME}: peft_type {peft_type!r} is not supported; expected 'LORA' "
                           "(LoRA, SLoRA, NLoRA and IntTune adapters all use peft_type LORA)")
    for name, why in REFUSED_FIELDS.items():
        if raw.get(name) not in (None, False, [], {}, ""):
            raise AdapterError(f"{CONFIG_NAME}: {name} = {raw[name]!r} is not supported: {why}, "
                               "which this server does not serve; refusing rather than dropping it")
    _refuse_base_rewriting_init(raw.get("init_lora_weights"))


def _refuse_base_rewriting_init(init) -> None:
    """PEFT's own tests of an init name (``startswith`` for pissa / corda, ``lower()`` for olora)."""
    if not isinstance(init, str):
        return
    kind = next((k for k in ("pissa", "corda") if init.startswith(k)), None) or \
        ("olora" if init.lower() == "olora" else "loftq" if init == "loftq" else None)
    if kind is not None:
        what = _BASE_REWRITING_INITS[kind]
        raise AdapterError(f"{CONFIG_NAME}: init_lora_weights = {init!r} is not supported: {what} rewrites the "
                           "base weight this adapter was trained on (and PEFT rewrites it again when it loads the "
                           "adapter), but every adapter here runs on the one unmodified base; convert it to a plain "
                           "LoRA (PEFT's save_pretrained(..., path_initial_model_for_weight_conversion=...)), or "
                           "serve the rewritten base it was trained on with --model")


def parse_config(raw: dict) -> AdapterConfig:
    """Validate a parsed ``adapter_config.json`` (PEFT defaults for absent fields).

    Raises:
        AdapterError: unknown ``peft_type``, a field we cannot serve (DoRA, modules_to_save, ...),
            or a malformed value; the message names the field and its value.
    """
    if not isinstance(raw, dict):
        raise AdapterError(f"{CONFIG_NAME}: expected a JSON object, got {type(raw).__name__}")
    _refuse_unsupported(raw)
    if raw.get("fan_in_fan_out"):
        warnings.warn("fan_in_fan_out is set to True but the target modules are torch.nn.Linear; "
                      "ignoring it, as PEFT does", stacklevel=2)
    for name in ("rank_pattern", "alpha_pattern", "nlora_serve"):
        if raw.get(name) is not None and not isinstance(raw[name], dict):
            raise AdapterError(f"{CONFIG_NAME}: {name} must be a JSON object, got {type(raw[name]).__name__} "
                               f"{raw[name]!r:.40}")
    layers = raw.get("layers_to_transform")
    patterns = raw.get("layers_pattern")
    tied = raw.get("nlora_serve")
    try:
        return AdapterConfig(
            r=raw.get("r", 8), lora_alpha=raw.get("lora_alpha", 8),
            target_modules=DEFAULT_TARGETS if raw.get("target_modules") is None
            else _names(raw["target_modules"], "target_modules"),
            exclude_modules=_names(raw.get("exclude_modules"), "exclude_modules"),
            layers_to_transform=tuple(layers) if isinstance(layers, list) else layers,
            layers_pattern=(patterns,) if isinstance(patterns, str) else _names(patterns, "layers_pattern"),
            rank_pattern=dict(raw.get("rank_pattern") or {}), alpha_pattern=dict(raw.get("alpha_pattern") or {}),
            use_rslora=_flag(raw, "use_rslora"), lora_bias=_flag(raw, "lora_bias"),
            init_lora_weights=raw.get("init_lora_weights", True),
            tied=TiedHeader(**tied) if isinstance(tied, dict) and tied.get("format") != FAMILY_FORMAT else None,
            family=FamilyHeader(**tied) if isinstance(tied, dict) and tied.get("format") == FAMILY_FORMAT else None,
            raw=dict(raw))
    except (TypeError, ValueError) as exc:  # wrong field types inside nlora_serve or the patterns
        raise AdapterError(f"{CONFIG_NAME}: malformed field ({exc})") from None


def check_adapter_dir(adapter_dir: str | Path) -> Path:
    """``adapter_dir`` as a Path, once it is a directory (torch-free: the CLI checks a folder's
    name before it imports torch).

    Raises:
        AdapterError: naming ``adapter_dir``: it does not exist, or is a file.
    """
    adapter_dir = Path(adapter_dir)
    if not adapter_dir.is_dir():
        raise AdapterError(f"{adapter_dir}: " + ("is a file, not an adapter directory (a folder with adapter_config.json "
                                                 "and adapter_model.safetensors)" if adapter_dir.is_file()
                                                 else "no such adapter directory"))
    return adapter_dir


def read_config(adapter_dir: Path) -> AdapterConfig:
    """Read and validate ``adapter_dir/adapter_config.json``.

    Raises:
        AdapterError: the file is missing or not JSON, or :func:`parse_config` refuses it.
    """
    path = check_adapter_dir(adapter_dir) / CONFIG_NAME
    if not path.exists():
        raise AdapterError(f"{adapter_dir}: no {CONFIG_NAME}; a PEFT adapter directory needs "
                           f"{CONFIG_NAME} next to adapter_model.safetensors")
    # a sparse 1 TB file was a MemoryError, a FIFO blocked forever: read_file refuses both unread
    return parse_config_bytes(read_file(path, DEFAULT_MAX_ADAPTER_BYTES, expected="a JSON file"), str(path))


def parse_config_bytes(data: bytes, source: str = CONFIG_NAME) -> AdapterConfig:
    """:func:`parse_config` of ``adapter_config.json``'s bytes: UTF-8 JSON without a byte-order mark,
    as PEFT (``json.load`` on a text file) and the folder reader take it; an upload and a folder hold
    one rule (json.loads of bytes also took UTF-16 and a BOM, which the store then kept as a version
    that ``adapters inspect`` / ``convert`` and ``serve --adapter`` refuse).

    Raises:
        AdapterError: naming ``source``: empty, not UTF-8, a BOM, not JSON, not an object, or as
            :func:`parse_config`.
    """
    if not data.strip():
        raise AdapterError(f"{source} is empty; expected a JSON object (the PEFT adapter config: "
                           "peft_type, r, lora_alpha, target_modules, ...)")
    if data.startswith((b"\xef\xbb\xbf", b"\xff\xfe", b"\xfe\xff")):
        raise AdapterError(f"{source}: starts with a byte-order mark; expected UTF-8 JSON without one "
                           "(as PEFT reads it): save it again as plain UTF-8")
    try:
        raw = json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise AdapterError(f"{source}: not UTF-8 (byte {exc.start}); expected UTF-8 JSON") from None
    except (ValueError, RecursionError) as exc:  # RecursionError: nested past the parser
        raise AdapterError(f"{source}: not valid JSON ({exc})") from None
    if not isinstance(raw, dict):
        raise AdapterError(f"{source}: expected a JSON object, got {type(raw).__name__}")
    return parse_config(raw)


def lora_scaling(r: int, alpha: float, use_rslora: bool) -> float:
    """The scaling s of ``delta = s * B @ N @ A``: alpha / sqrt(r) with rsLoRA, else alpha / r.

    The one place the rule lives (PEFT ``LoraLayer.update_layer``; rsLoRA: Kalajdzievski 2023).
    """
    return alpha / math.sqrt(r) if use_rslora else alpha / r


def _pattern_value(patterns: dict, name: str, default):
    """PEFT ``get_pattern_key``: the first key K with ``re.match(rf"(.*\\.)?({K})$", name)`` wins."""
    for key, value in patterns.items():
        if _user_match("pattern key", rf"(.*\.)?({key})$", name):
            return value
    return default


def _is_excluded(cfg: AdapterConfig, name: str) -> bool:
    ex = cfg.exclude_modules
    if not ex:
        return False
    if isinstance(ex, str):
        return _user_match("exclude_modules", ex, name, full=True) is not None
    return _names_a_suffix(ex, name)


def _layer_selected(cfg: AdapterConfig, name: str) -> bool:
    layers = cfg.layers_to_transform
    if layers is None or (not isinstance(layers, int) and len(layers) == 0):
        return True
    match = None
    if not cfg.layers_pattern:
        match = re.match(r".*?\.[^.]*\.(?P<idx>\d+)\.", name)
    for pattern in cfg.layers_pattern or ():
        match = _user_match("layers_pattern", rf"(?:^|.*?\.){pattern}\.(?P<idx>\d+)\.", name)
        if match:
            break
    if match is None:
        return False
    idx = int(match.group("idx"))
    return idx == layers if isinstance(layers, int) else idx in layers


def is_targeted(cfg: AdapterConfig, name: str) -> bool:
    """Whether PEFT would put a LoRA on the linear module ``name`` (for "all-linear": any
    linear module but ``lm_head``, so pass only linear module names)."""
    if _is_excluded(cfg, name):
        return False
    targets = cfg.target_modules
    if isinstance(targets, str):
        if targets.lower() == ALL_LINEAR:
            return name != "lm_head"
        return _user_match("target_modules", targets, name, full=True) is not None
    if name in targets:
        return True  # a full name bypasses layers_to_transform, as in PEFT
    return _names_a_suffix(targets, name, whole=False) and _layer_selected(cfg, name)


def _names_a_suffix(names: tuple[str, ...], name: str, whole: bool = True) -> bool:
    """Whether ``names`` holds ``name`` itself (with ``whole``) or one of its dot-suffixes
    (``name.endswith("." + n)``), looked up in a set: not one ``endswith`` per entry per module."""
    wanted = _as_set(names)
    parts = name.split(".")
    return (whole and name in wanted) or any(".".join(parts[i:]) in wanted for i in range(1, len(parts)))


@functools.lru_cache(maxsize=64)
def _as_set(names: tuple[str, ...]) -> frozenset[str]:
    return frozenset(names)


@dataclass(frozen=True, slots=True)
class SitePlan:
    """What the config says about one adapted projection."""

    layer: int
    module: str  # one of PROJECTIONS
    rank: int
    alpha: float
    scaling: float  # lora_scaling(rank, alpha, use_rslora)


def plan_sites(cfg: AdapterConfig, spec: ModelSpec) -> dict[tuple[int, str], SitePlan]:
    """The projections the config adapts on this model, in (layer, PROJECTIONS) order.

    Raises:
        AdapterError: the config targets ``lm_head`` or ``model.embed_tokens`` (not served).
    """
    all_linear = isinstance(cfg.target_modules, str) and cfg.target_modules.lower() == ALL_LINEAR
    for other in () if all_linear else ("lm_head", "model.embed_tokens"):
        if is_targeted(cfg, other):
            raise AdapterError(f"{CONFIG_NAME}: target_modules {cfg.target_modules!r} selects {other}; "
                               "LoRA on the embeddings or lm_head is not served")
    plans = {}
    for layer in range(spec.num_layers):
        for module in PROJECTIONS:
            name = ModelSpec.module_path(layer, module)
            if is_targeted(cfg, name):
                r = _pattern_value(cfg.rank_pattern, name, cfg.r)
                alpha = _pattern_value(cfg.alpha_pattern, name, cfg.lora_alpha)
                plans[(layer, module)] = SitePlan(layer, module, r, alpha, lora_scaling(r, alpha, cfg.use_rslora))
    return plans
