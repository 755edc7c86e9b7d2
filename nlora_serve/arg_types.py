"""argparse types the CLIs share: a bad number is a usage error (exit 2, naming the flag and the
range) before any work, never a traceback from deep inside (protobuf, torch); and the parser whose
usage errors name the word a missing option's value was meant to be (:class:`WordsParser`)."""

from __future__ import annotations

import argparse
import math
import re
import shlex
import sys

from nlora_serve import log_format

# --dtype's choices, vLLM's spellings (models/dtype.py resolves them; half and float16 are refused by
# check_dtype, which needs no torch: serve and generate refuse them before the engine's imports)
DTYPE_CHOICES = ("auto", "half", "float16", "bfloat16", "float", "float32")
# vLLM's ModelDType (vllm/config/model.py): "float" is float32, "half" is float16. The engine (CPU
# and CUDA, the vLLM backend's folds too) computes in float32 or bfloat16 only, so the float16
# spellings are refused with the choices that run, not mapped to another dtype silently.
HALF = ("half", "float16")


def check_dtype(name: str) -> None:
    """Refuse a ``--dtype`` value the engine cannot compute in (no torch needed).

    Raises:
        ValueError: ``half`` / ``float16`` (no float16 kernels here), or a name not in
            :data:`DTYPE_CHOICES`.
    """
    if name in HALF:
        raise ValueError(f"--dtype {name}: this engine computes in float32 or bfloat16 only (it has no float16 "
                         "kernels); use --dtype bfloat16 (2 bytes a value, as float16) or float32")
    if name not in DTYPE_CHOICES:
        raise ValueError(f"--dtype must be one of {', '.join(DTYPE_CHOICES)}; got {name!r}")


def integer_arg(low: int, high: int | None = None):
    """argparse type: an integer in [low, high] (no upper bound when ``high`` is None)."""
    def integer(text: str) -> int:
        value = int(text)  # a ValueError here is argparse's "invalid integer value"
        if value < low or (high is not None and value > high):
            expected = f"an integer >= {low}" if high is None else f"an integer in [{low}, {high}]"
            raise argparse.ArgumentTypeError(f"must be {expected}; got {value}")
        return value

    integer.__name__ = "integer"  # argparse's "invalid integer value: 'x'"
    return integer


_DECIMAL = {"k": 10**3, "m": 10**6, "g": 10**9, "t": 10**12}
_BINARY = {"K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40}


def human_readable_int(text: str) -> int:
    """argparse type of the size flags vLLM reads this way (``--max-model-len``,
    ``--max-num-batched-tokens``, ``--kv-cache-memory-bytes``; vllm/engine/arg_utils.py
    ``human_readable_int``): a plain integer, or a number with a decimal suffix k / m / g / t
    (``1k`` = 1,000, ``25.6k`` = 25,600) or a binary one K / M / G / T (``1K`` = 1,024, ``2G`` =
    2**31; a whole number only). The flag's range is checked where its config is built.

    Raises:
        argparse.ArgumentTypeError: a decimal before a binary suffix (``1.5K``: vLLM's refusal).
        ValueError: anything else that is no integer (argparse's "invalid int value").
    """
    value = text.strip()
    match = re.fullmatch(r"(\d+(?:\.\d+)?)([kKmMgGtT])", value)
    if match is None:
        return int(value)
    number, suffix = match.groups()
    if suffix in _DECIMAL:
        return int(float(number) * _DECIMAL[suffix])
    if "." in number:
        raise argparse.ArgumentTypeError(f"{text!r}: a binary suffix ({suffix}) takes a whole number; did you mean "
                                         f"{number}{suffix.lower()}?")
    return int(number) * _BINARY[suffix]


human_readable_int.__name__ = "int"  # argparse's "invalid int value: 'x'", as before


def unsigned_arg(bits: int):
    """argparse type: an integer in [0, 2**bits - 1] (a proto field's range, or torch's seeds')."""
    return integer_arg(0, (1 << bits) - 1)


def number_arg(low: float | None = None, *, above: bool = False):
    """argparse type: a finite float, at least ``low`` (greater than it with ``above``; no bound
    when None). nan and inf parse as floats, so a plain ``type=float`` let them through to fail
    late or silently (a --temperature of nan, an --lr of inf)."""
    def number(text: str) -> float:
        value = float(text)  # a ValueError here is argparse's "invalid number value"
        if not math.isfinite(value):
            raise argparse.ArgumentTypeError(f"must be a finite number; got {text}")
        if low is not None and (value <= low if above else value < low):
            raise argparse.ArgumentTypeError(f"must be a number {'>' if above else '>='} {low:g}; got {text}")
        return value

    number.__name__ = "number"  # argparse's "invalid number value: 'x'"
    return number


def out_dir_arg(text: str) -> str:
    """argparse type: an output folder's path, not empty (``Path('')`` is the current folder, so an
    unset shell variable in ``--out "$DIR"`` wrote an adapter or a family into the cwd)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("must name a folder; got an empty path")
    return text


out_dir_arg.__name__ = "folder"


def port_or_off_arg(text: str) -> int | None:
    """argparse type: a TCP port in [0, 65535] (0 = any free one), or ``off`` (None: no listener)."""
    if text.strip().lower() == "off":
        return None
    value = int(text)  # a ValueError here is argparse's "invalid port value"
    if not 0 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"must be a port in [0, 65535] or 'off'; got {value}")
    return value


port_or_off_arg.__name__ = "port"


# a usage error shows the full usage up to this many lines; past them one line that says where it is
LONG_USAGE_LINES = 10


class WordsParser(argparse.ArgumentParser):
    """argparse's parser, whose subcommands keep the words they were given, so that a missing
    option can name the word meant as its value: ``adapters unload acme`` said only "the following
    arguments are required: --name" (h117), ``client generate "hi"`` only "one of the arguments
    --prompt --message is required". Subcommand parsers are of this class too (argparse's
    ``add_subparsers`` makes them of the parent's class)."""

    words: list[str] = []

    def _loose_words(self) -> list[str]:
        """The words given that are no option and no option's value."""
        loose, words = [], iter(self.words)
        for word in words:
            action = self._option_string_actions.get(word)
            if action is not None and action.nargs != 0:
                next(words, None)
            elif not word.startswith("-"):
                loose.append(word)
        return loose

    def parse_known_args(self, args=None, namespace=None):
        self.words = list(sys.argv[1:] if args is None else args)
        return super().parse_known_args(args, namespace)

    def error(self, message: str):
        loose = self._loose_words()
        if loose and re.search(r"required: .*--name\b", message):
            if not any(not a.option_strings for a in self._actions):  # unload / load: the word is the name
                message += f"; the adapter's name goes after --name: --name {loose[0]}"
            else:  # upload / swap: the word is their folder or file
                message += "; the adapter's name on the server goes after --name, e.g. --name acme"
        elif loose and "--prompt --message is required" in message:  # client generate "hi"
            message += ("; the text goes after --message (one chat turn) or --prompt (raw text): "
                        f"--message {shlex.quote(loose[0])}")
        long = self.format_usage().count("\n") > LONG_USAGE_LINES
        if log_format.json_active():  # serve --log-format json: no plain line in a JSON log, usage included
            log_format.usage_error(self.prog, message, self.short_usage() if long else self.format_usage())
            self.exit(2)
        if not long:
            super().error(message)
        self._print_message(self.short_usage(), sys.stderr)
        self.exit(2, f"{self.prog}: error: {message}\n")

    def format_help(self) -> str:
        """The help, opened by the short usage line where the full one is long (serve's was 40
        lines above its first flag group; vLLM's is one line): the flags follow, by group."""
        if self.usage is not None or self.format_usage().count("\n") <= LONG_USAGE_LINES:
            return super().format_help()
        self.usage = self.short_usage().removeprefix("usage: ").split(" (all of them:")[0].replace("%", "%%")
        try:
            return super().format_help()
        finally:
            self.usage = None

    def short_usage(self) -> str:
        """The usage line of an error, for a command whose full usage is long (serve's was 40 lines
        above the one that said what was wrong, h130): what it requires, ``[options]``, and where
        the rest are, e.g. ``usage: nlora-serve serve [options] (all of them: nlora-serve serve --help)``."""
        required = [a for a in self._actions if not a.option_strings or a.required]
        required += [a for g in self._mutually_exclusive_groups if g.required for a in g._group_actions]
        formatter = self._get_formatter()
        formatter.add_usage(None, [a for a in self._actions if a in required], self._mutually_exclusive_groups,
                            prefix="")
        words = " ".join(formatter.format_help().split())[len(self.prog):].strip()
        return f"usage: {self.prog} {words + ' ' if words else ''}[options] (all of them: {self.prog} --help)\n"
