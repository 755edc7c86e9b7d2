"""``--generation-config`` and ``--override-generation-config``: a request's sampling defaults from
the model's ``generation_config.json``, as vLLM 0.32 takes them (``ModelConfig.get_diff_sampling_param``,
``entrypoints/serve/utils/api_utils.get_max_tokens``).

vLLM's rules, kept here:

- ``auto`` (the default) reads the model folder's ``generation_config.json``; ``vllm`` reads nothing;
  a folder path reads that folder's. Where the file is missing, the folder's ``config.json`` stands in
  (vLLM's ``try_get_generation_config``: transformers' ``GenerationConfig.from_model_config``, which
  under transformers 5 keeps its ``max_new_tokens`` of the sampling fields); a folder path with
  neither, or that is no folder, is refused (vLLM fails there too, with a repository-id error).
- Only the sampling fields count: temperature, top_p, top_k, min_p, repetition_penalty,
  presence_penalty, frequency_penalty and max_new_tokens (a request's max_tokens). A null is unset.
- ``--override-generation-config`` (a JSON object) is merged over what was read (``vllm``: over
  nothing); its null unsets a field the file set; its keys that are no sampling field change nothing
  (vLLM ignores them; a warning names them).
- A request's field that is set always wins; the defaults fill only the unset ones (temperature 0
  sent stays greedy).
- max_new_tokens is the default max_tokens; it is also a cap on every request's max_tokens when it
  comes from a folder path (``--generation-config DIR``, after the override) or from the override
  itself (with ``auto`` or ``vllm``): vLLM's ``override_max_tokens``, which lowers a larger
  max_tokens silently.

The same source's ``eos_token_id`` (the model folder's under ``auto`` and ``vllm`` too) gives the
engine's stop tokens: ``EngineConfig.generation_config``, engine/eos.py. ``generate`` applies these
defaults to the sampling flags it is not given (commands/generate.py).

Where vLLM silently takes a bad value, start-up is refused here instead, naming the flag or file and
the field: a sampling field's value out of the request fields' ranges, a ``generation_config.json``
that is no JSON object.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from pathlib import Path

log = logging.getLogger(__name__)

# vLLM's get_diff_sampling_param's available_params (max_new_tokens is a request's max_tokens)
SAMPLING_FIELDS = ("repetition_penalty", "presence_penalty", "frequency_penalty", "temperature", "top_k", "top_p",
                   "min_p", "max_new_tokens")
_INTEGER_FIELDS = ("top_k", "max_new_tokens")
_FILE = "generation_config.json"
_MODEL_CONFIG = "config.json"  # the stand-in where _FILE is missing (vLLM's fallback)


@dataclass(frozen=True, slots=True)
class SamplingDefaults:
    """The server's defaults for a request's unset sampling fields; None: the API's own default."""

    temperature: float | None = None
    top_p: float | None = None
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None
    presence_penalty: float | None = None
    frequency_penalty: float | None = None
    max_tokens: int | None = None  # a request's max_tokens when unset (the file's max_new_tokens)
    max_tokens_cap: int | None = None  # every request's max_tokens at most (vLLM's override_max_tokens)

    def value(self, name: str, requested, api_default):
        """``requested`` when set (not None), else this default, else ``api_default``."""
        if requested is not None:
            return requested
        default = getattr(self, name)
        return api_default if default is None else default

    def as_dict(self) -> dict:
        """The fields set, in vLLM's log form (``max_tokens`` for max_new_tokens)."""
        return {k: v for k, v in asdict(self).items() if v is not None}


def parse_override(text: str) -> dict:
    """``--override-generation-config``'s JSON object, each sampling field's value in range (or null:
    unset the file's); a warning names the keys that are no sampling field, which change nothing (as
    vLLM's ``get_diff_sampling_param`` reads only the sampling fields of the merged config).

    Raises:
        ValueError: not a JSON object, a sampling field's value out of range; the message names the key.
    """
    try:
        values = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"not JSON ({exc}); expected an object such as '{{\"temperature\": 0.5}}'") from None
    except RecursionError:  # nested past the parser: was a traceback
        raise ValueError("nested too deeply to parse; expected an object such as '{\"temperature\": 0.5}'") from None
    if not isinstance(values, dict):
        raise ValueError(f"expected a JSON object such as '{{\"temperature\": 0.5}}'; got {text[:80]!r}")
    ignored = [key for key in values if key not in SAMPLING_FIELDS]
    if ignored:
        log.warning("--override-generation-config: %s no sampling field, ignored as vLLM ignores it (the sampling "
                    "fields are %s)", ", ".join(repr(k) for k in ignored) + (" is" if len(ignored) == 1 else " are"),
                    ", ".join(SAMPLING_FIELDS))
    check_values(values)
    return values


def check_values(values: dict) -> None:
    """Each sampling field of ``values`` set (not None) in the range a request's field has.

    Raises:
        ValueError: the first one out of range (``temperature=-1: must be in [0, 100]``).
    """
    # here, not with the module: ServerConfig holds SamplingDefaults, and the serve flags' --help
    # reads ServerConfig's defaults without loading torch (engine.sample.sampling's, and models')
    from nlora_serve.engine.sample.sampling import RequestError, SamplingParams

    for key in SAMPLING_FIELDS:
        value = values.get(key)
        if value is None:
            continue
        kind = int if key in _INTEGER_FIELDS else (int, float)
        if not isinstance(value, kind) or isinstance(value, bool):
            raise ValueError(f"{key}={value!r}: must be {'an integer' if kind is int else 'a number'}")
        if key == "max_new_tokens":
            if value < 1:
                raise ValueError(f"max_new_tokens={value!r}: must be an integer >= 1")
            continue
        try:
            SamplingParams(**{key: value})
        except RequestError as exc:  # "SamplingParams.temperature must be in [0, 100]; got -1"
            rule = str(exc).split(" must ", 1)[1].split("; got ", 1)[0]
            raise ValueError(f"{key}={value!r}: must be {rule.removeprefix('be ')}") from None


def read_generation_config(folder: Path) -> tuple[dict, Path | None]:
    """(the sampling fields a folder's ``generation_config.json`` sets, that file); without it those
    of its ``config.json`` as vLLM reads them, and that file; ({}, None) without either. Values are
    not range-checked here.

    vLLM's fallback (``try_get_generation_config``) is transformers'
    ``GenerationConfig.from_model_config(config).to_diff_dict()``, run here the same way: under
    transformers 5 it keeps a config.json's ``max_new_tokens`` and drops its ``temperature``,
    ``top_p``, ``top_k`` and penalties.

    Raises:
        ValueError: a file that is not a JSON object, a config.json transformers cannot read (the
            message names the file).
    """
    path = folder / _FILE
    if path.is_file():
        return {k: v for k, v in _json_object(path).items() if k in SAMPLING_FIELDS and v is not None}, path
    path = folder / _MODEL_CONFIG
    if not path.is_file():
        return {}, None
    _json_object(path)  # its own words for a file that is no JSON object
    from transformers import AutoConfig, GenerationConfig  # here: only for a folder without the file

    try:
        values = GenerationConfig.from_model_config(AutoConfig.from_pretrained(folder)).to_diff_dict()
    except (OSError, ValueError, KeyError) as exc:
        raise ValueError(f"{path}: cannot read it as a model config ({str(exc).splitlines()[0][:200]})") from None
    return {k: v for k, v in values.items() if k in SAMPLING_FIELDS and v is not None}, path


def _json_object(path: Path) -> dict:
    try:
        data = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"{path}: cannot read it as JSON ({exc})") from None
    except RecursionError:  # nested past the parser: was a traceback
        raise ValueError(f"{path}: cannot read it as JSON (nested too deeply)") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a JSON object")
    return data


def sampling_defaults(source: str, override: dict, model_dir: Path,
                      fallback: str = "vLLM's") -> tuple[SamplingDefaults, str]:
    """(the defaults, one log line saying where they came from) for ``--generation-config source``
    ("auto", "vllm" or a folder) and ``--override-generation-config override`` (checked by
    :func:`parse_override`) on the model folder ``model_dir``. ``fallback`` names, in the log line,
    whose defaults a field left unset by both takes: vLLM's for ``serve``, the flags' own for
    ``generate`` (greedy, 128 tokens).

    Raises:
        ValueError: the message starts with the flag or the file and names the field: a folder
            that is not one or holds neither generation_config.json nor config.json, a file value out
            of range.
    """
    read, path = {}, None
    if source != "vllm":
        folder = model_dir if source == "auto" else Path(source).expanduser()
        if source != "auto" and not folder.is_dir():
            raise ValueError(f"--generation-config {source}: not a folder; expected auto, vllm or a folder "
                             f"holding {_FILE}")
        read, path = read_generation_config(folder)
        if source != "auto" and path is None:
            raise ValueError(f"--generation-config {source}: neither {_FILE} nor {_MODEL_CONFIG} in that folder "
                             f"(vLLM reads the latter's generation fields where the former is missing)")
        try:
            check_values(read)
        except ValueError as exc:
            raise ValueError(f"{path}: {exc} (--generation-config {source}; override it with "
                             f"--override-generation-config, or use --generation-config vllm)") from None
    override = {k: v for k, v in override.items() if k in SAMPLING_FIELDS}  # the others change nothing
    merged = {k: v for k, v in {**read, **override}.items() if v is not None}
    cap = merged.get("max_new_tokens") if source not in ("auto", "vllm") else override.get("max_new_tokens")
    defaults = SamplingDefaults(**{k: v for k, v in merged.items() if k != "max_new_tokens"},
                                max_tokens=merged.get("max_new_tokens"), max_tokens_cap=cap)
    return defaults, _log_line(source, defaults, path if read else None, override, model_dir, fallback)


def _log_line(source: str, defaults: SamplingDefaults, file: Path | None, override: dict, model_dir: Path,
              fallback: str) -> str:
    """``file``: the generation_config.json whose fields were read, None when none was."""
    shown = {k: v for k, v in defaults.as_dict().items() if k != "max_tokens_cap"}
    limit = defaults.max_tokens_cap
    cap = "" if limit is None else f"; max_tokens capped at {limit} for every request"
    if shown and file is not None:  # vLLM's own warning, in its words
        where = "the model's `generation_config.json`" if source == "auto" else source
        extra = " and --override-generation-config" if override else ""
        return (f"Default sampling parameters have been overridden by {where}{extra} ({file}): `{shown}`{cap}. If this "
                "is not intended, relaunch with `--generation-config vllm`.")
    if shown:
        return f"Default sampling parameters from --override-generation-config: `{shown}`{cap}."
    defaults_are = f"the default sampling parameters are {fallback}."
    if source == "vllm":
        return f"--generation-config vllm: the model's generation config unread; {defaults_are}"
    if file is not None:
        return f"--override-generation-config unsets every sampling field of {file}; {defaults_are}"
    gguf = _gguf_source(model_dir)
    has_file = (model_dir / _FILE).is_file()
    why = f"{model_dir / _FILE} sets no sampling field" if has_file else f"{model_dir} has no {_FILE}"
    why += f" (converted from the GGUF file {gguf}, whose metadata carries no generation config)" if gguf else ""
    return f"--generation-config {source}: {why}; {defaults_are}"


def _gguf_source(model_dir: Path) -> str | None:
    """The GGUF file a prepared model folder was converted from (its nlora_model.json), else None."""
    from nlora_serve.models.resolve import MARKER  # here: the models package loads torch (check_values says why)

    try:
        source = json.loads((model_dir / MARKER).read_text()).get("source")
    except (OSError, ValueError):
        return None
    return source if isinstance(source, str) and source.endswith(".gguf") else None
