"""``json.loads`` of a large request body in pieces short enough to let other threads run between them.

``json.loads`` is one C call: it holds the GIL for all of a body, ~0.15-0.4 s for 16 MiB on a loaded
2-core box, and every other tenant's stream (the event loop) and the engine's step thread wait that
long, even with the parse in a worker thread. :func:`loads_in_pieces` walks arrays and objects in
Python (copies of the pure-Python decoder's ``JSONObject`` and ``JSONArray``: the interpreter
hands the GIL over between their steps, every ``sys.getswitchinterval()`` when another thread asks)
and leaves the C scanner bounded pieces: one string, number or literal; a flat object (at most
:data:`FLAT_PAIRS` keys of such scalars, e.g. a chat message); a run of at most :data:`RUN` such
items of an array, or of an object's pairs of such scalars, parsed together. The value, and the
JSONDecodeError of a body that is not JSON (message and position), are ``json.loads``' own:
CPython checks its C and pure-Python decoders against each other.
"""

from __future__ import annotations

import json
import re
from json.decoder import WHITESPACE, JSONDecodeError, scanstring

RUN = 1024  # items of an array parsed in one C call (~1 ms of flat messages, less of numbers)
FLAT_PAIRS = 64  # keys of an object the C scanner parses whole (each value a string, number or literal)

_scan_c = json.JSONDecoder().scan_once  # the C scanner: (value, end) of the JSON value at an index
_whitespace = WHITESPACE.match
_WS = " \t\n\r"
_S = "[ \t\n\r]*"
# bounded, so that a failed match costs little (a 16 MiB string took the regex 0.2 s): longer numbers and
# strings, and strings with escapes or control characters (an error), go to the C scanner one by one
_NUMBER = r"-?(?:0|[1-9][0-9]{0,39})(?:\.[0-9]{1,40})?(?:[eE][-+]?[0-9]{1,5})?"
_STRING = r'"[^"\\\x00-\x1f]{0,256}"'
_SCALAR = rf"(?:{_NUMBER}|{_STRING}|true|false|null)"
_PAIR = rf"{_STRING}{_S}:{_S}{_SCALAR}"
_FLAT_OBJECT = rf"\{{{_S}(?:{_PAIR}{_S},{_S}){{0,{FLAT_PAIRS - 1}}}{_PAIR}{_S}\}}"
_FLAT = re.compile(_FLAT_OBJECT)
_RUN = re.compile(rf"(?:(?:{_SCALAR}|{_FLAT_OBJECT}){_S},{_S}){{2,{RUN}}}")  # items, each with its comma
_PAIRS = re.compile(rf"(?:{_PAIR}{_S},{_S}){{1,{RUN - 1}}}{_PAIR}(?={_S},)")  # an object's pairs, the comma after left


def loads_in_pieces(text: str, parse_int=None):
    """``json.loads(text, parse_int=parse_int)``, in pieces (see the module's docstring); ``parse_int``
    is called for each integer longer than the runs take (over 40 digits), as ``json.loads`` would.

    Raises:
        JSONDecodeError: as ``json.loads`` raises it (same message and position). ValueError: an
            integer of more digits than Python converts, as ``json.loads``. RecursionError:
            nested deeper than ``json.loads`` parses.
    """
    if text.startswith("\ufeff"):
        raise JSONDecodeError("Unexpected UTF-8 BOM (decode using utf-8-sig)", text, 0)
    scan_c = _scan_c if parse_int is None else json.JSONDecoder(parse_int=parse_int).scan_once
    try:
        value, end = _scan(text, _whitespace(text, 0).end(), scan_c)
    except StopIteration as err:
        raise JSONDecodeError("Expecting value", text, err.value) from None
    except RecursionError:  # this walk takes ~2 frames a level, the C scanner ~1: let it decide
        return json.loads(text, parse_int=parse_int)
    end = _whitespace(text, end).end()
    if end != len(text):
        raise JSONDecodeError("Extra data", text, end)
    return value


def _scan(s: str, idx: int, scan_c=None):
    """(the JSON value at ``idx``, its end); StopIteration(idx) when none starts there. ``scan_c``:
    the C scanner of a value (default :data:`_scan_c`)."""
    first = s[idx:idx + 1]
    if first == "[":
        return _array(s, idx + 1, scan_c)
    if first == "{" and not _FLAT.match(s, idx):
        return _object(s, idx + 1, scan_c)
    return (scan_c or _scan_c)(s, idx)


def _object(s: str, end: int, scan_c=None) -> tuple[dict, int]:
    """The pure-Python decoder's ``JSONObject`` (same errors at the same positions), filling the dict
    as it goes: its list of (key, value) tuples, a million of them for a large ``logit_bias``, made
    the collector walk them all, the GIL held."""
    pairs = {}
    nextchar = s[end:end + 1]
    if nextchar != '"':
        if nextchar in _WS:
            end = _whitespace(s, end).end()
            nextchar = s[end:end + 1]
        if nextchar == "}":
            return pairs, end + 1
        if nextchar != '"':
            raise JSONDecodeError("Expecting property name enclosed in double quotes", s, end)
    end += 1
    while True:
        run = _PAIRS.match(s, end - 1)  # from the key's quote: pairs of flat values, a comma after the last
        if run is not None:
            pairs.update(json.loads(f"{{{run.group()}}}"))  # a key sent twice: its last value, first place
            end = run.end()
        else:
            key, end = scanstring(s, end, True)
            if s[end:end + 1] != ":":
                end = _whitespace(s, end).end()
                if s[end:end + 1] != ":":
                    raise JSONDecodeError("Expecting ':' delimiter", s, end)
            end = _whitespace(s, end + 1).end()
            try:
                value, end = _scan(s, end, scan_c)
            except StopIteration as err:
                raise JSONDecodeError("Expecting value", s, err.value) from None
            pairs[key] = value
        nextchar = s[end:end + 1]
        if nextchar and nextchar in _WS:
            end = _whitespace(s, end + 1).end()
            nextchar = s[end:end + 1]
        end += 1
        if nextchar == "}":
            break
        if nextchar != ",":
            raise JSONDecodeError("Expecting ',' delimiter", s, end - 1)
        end = _whitespace(s, end).end()
        nextchar = s[end:end + 1]
        end += 1
        if nextchar != '"':
            raise JSONDecodeError("Expecting property name enclosed in double quotes", s, end - 1)
    return pairs, end


def _array(s: str, end: int, scan_c=None) -> tuple[list, int]:
    """The pure-Python decoder's ``JSONArray`` (same errors at the same positions), with runs of
    flat items parsed :data:`RUN` at a time."""
    values = []
    nextchar = s[end:end + 1]
    if nextchar in _WS:
        end = _whitespace(s, end + 1).end()
        nextchar = s[end:end + 1]
    if nextchar == "]":
        return values, end + 1
    while True:
        run = _RUN.match(s, end)
        if run is not None:  # whole items, each followed by its comma: valid JSON, then a value (or an error) next
            values += json.loads(f"[{run.group()}0]")[:-1]
            end = run.end()
            continue
        try:
            value, end = _scan(s, end, scan_c)
        except StopIteration as err:
            raise JSONDecodeError("Expecting value", s, err.value) from None
        values.append(value)
        nextchar = s[end:end + 1]
        if nextchar in _WS:
            end = _whitespace(s, end + 1).end()
            nextchar = s[end:end + 1]
        end += 1
        if nextchar == "]":
            break
        if nextchar != ",":
            raise JSONDecodeError("Expecting ',' delimiter", s, end - 1)
        end = _whitespace(s, end).end()
    return values, end
