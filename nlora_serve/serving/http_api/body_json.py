"""``json.loads`` of a large request body in pieces short enough to let other threads run between them.

``json.loads`` is one C call: it holds the GIL for all of a body, ~0.15-0.4 s for 16 MiB on a loaded
2-core box, and every other tenant's stream (the event loop) and the engine's step thread wait that
long, even with the parse in a worker thread. :func:`loads_in_pieces` walks arrays and objects in
Python, on a stack of its own, not by recursion (the pure-Python decoder's ``JSONObject`` and
``JSONArray``, step for step: the interpreter hands the GIL over between their steps, every
``sys.getswitchinterval()`` when another thread asks) and leaves the C scanner bounded pieces: one string, number or literal; a flat object (at most
:data:`FLAT_PAIRS` keys of such scalars, e.g. a chat message); a run of at most :data:`RUN` such
items (or flat arrays of at most :data:`FLAT_PAIRS` scalars) of an array, or of an object's pairs
of such scalars, parsed together. The value, and the JSONDecodeError of a body that is not JSON
(message and position), are ``json.loads``' own: CPython checks its C and pure-Python decoders
against each other.
"""

from __future__ import annotations

import functools
import json
import re
from json.decoder import WHITESPACE, JSONDecodeError, scanstring

RUN = 1024  # items of an array parsed in one C call (~1 ms of flat messages, less of numbers)
FLAT_PAIRS = 64  # keys of an object (items of an array in a run) the C scanner parses whole, each a scalar

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
_FLAT_ARRAY = rf"\[{_S}(?:{_SCALAR}{_S},{_S}){{0,{FLAT_PAIRS - 1}}}{_SCALAR}{_S}\]"  # a few token ids: a prompt
# items, each with its comma (3M one-id prompts, each walked in Python, took 3-16 s of CPU per 15 MB body)
_RUN = re.compile(rf"(?:(?:{_SCALAR}|{_FLAT_OBJECT}|{_FLAT_ARRAY}){_S},{_S}){{2,{RUN}}}")
_PAIRS = re.compile(rf"(?:{_PAIR}{_S},{_S}){{1,{RUN - 1}}}{_PAIR}(?={_S},)")  # an object's pairs, the comma after left


def loads_in_pieces(text: str, parse_int=None):
    """``json.loads(text, parse_int=parse_int)``, in pieces (see the module's docstring); ``parse_int``
    is called for each integer longer than the runs take (over 40 digits), as ``json.loads`` would.

    Nesting: arrays and objects are walked with a stack of their own, not by recursion, so a body of
    any depth is parsed in pieces (a deep one fell back to one ``json.loads`` of all of it: ~0.2 s of
    GIL at 16 MiB). Where ``json.loads`` called in this function's place would stop with a
    RecursionError (~990 levels under Python's default recursion limit, fewer the deeper the caller's
    stack), this stops too, at the same array or object: nothing it refuses is accepted, nothing it
    accepts refused, and an error earlier in the text still comes first, as it would there.

    Raises:
        JSONDecodeError: as ``json.loads`` raises it (same message and position). ValueError: an
            integer of more digits than Python converts, as ``json.loads``. TooDeep (a
            RecursionError): nested deeper than ``json.loads`` would parse here; ``levels`` says
            how deep it would.
    """
    if text.startswith("\ufeff"):
        raise JSONDecodeError("Unexpected UTF-8 BOM (decode using utf-8-sig)", text, 0)
    scan_c = _scan_c if parse_int is None else json.JSONDecoder(parse_int=parse_int).scan_once
    value, end = _walk(text, _whitespace(text, 0).end(), scan_c)
    end = _whitespace(text, end).end()
    if end != len(text):
        raise JSONDecodeError("Extra data", text, end)
    return value


class TooDeep(RecursionError):
    """A body nested deeper than ``json.loads`` parses (``levels``: the arrays and objects it would
    parse, one inside the other, where it was called)."""

    def __init__(self, levels: int):
        super().__init__(f"nested deeper than {levels} levels of arrays and objects, the parser's limit")
        self.levels = levels


SHALLOW = 64  # levels walked before asking how deep json.loads would go (any caller's stack holds that many)
# frames between loads_in_pieces' caller and _parses' json.loads: loads_in_pieces, _walk, _room, _levels, _parses
_WALK_FRAMES = 5


def _walk(s: str, end: int, scan_c):
    """(the JSON value at ``end``, its end), its arrays and objects on a stack: the pure-Python
    decoder's ``JSONArray`` and ``JSONObject`` (same errors at the same positions), with runs of
    flat items or pairs parsed by the C scanner :data:`RUN` at a time."""
    stack: list = []  # the arrays and objects open around the value at ``end``, innermost last
    keys: list[str] = []  # of each open object, the key whose value comes next
    room = None  # levels json.loads would parse in loads_in_pieces' place, once deeper than SHALLOW
    while True:
        first = s[end:end + 1]
        if first == "[" or first == "{":  # a level deeper: json.loads counts flat objects too
            if room is None and len(stack) + 1 >= SHALLOW:
                room = _room()
            if room is not None and len(stack) >= room:
                raise TooDeep(room)
            end += 1
            nextchar = s[end:end + 1]
            if first == "[":
                if nextchar in _WS:
                    end = _whitespace(s, end + 1).end()
                    nextchar = s[end:end + 1]
                if nextchar != "]":
                    stack.append([])
                    end = _runs(stack[-1], s, end, room is None or len(stack) < room)
                    continue
                value, end = [], end + 1
            elif _FLAT.match(s, end - 1):  # a flat object: the C scanner's, whole
                value, end = scan_c(s, end - 1)
            else:
                if nextchar != '"':
                    if nextchar in _WS:
                        end = _whitespace(s, end).end()
                        nextchar = s[end:end + 1]
                    if nextchar != "}" and nextchar != '"':
                        raise JSONDecodeError("Expecting property name enclosed in double quotes", s, end)
                if nextchar == "}":
                    value, end = {}, end + 1
                else:
                    value = {}
                    key, end = _key(value, s, end + 1)
                    if key is not None:
                        stack.append(value)
                        keys.append(key)
                        continue
        else:
            try:
                value, end = scan_c(s, end)
            except StopIteration as err:
                raise JSONDecodeError("Expecting value", s, err.value) from None
        while stack:  # the value is whole: into the array or object around it, and close those it ends
            top = stack[-1]
            if type(top) is list:
                top.append(value)
                closed, end = _after_item(s, end)
                if not closed:
                    end = _runs(top, s, end, room is None or len(stack) < room)
                    break
            else:
                top[keys.pop()] = value
                closed, end = _after_pair(s, end)
                if not closed:
                    key, end = _key(top, s, end)
                    if key is not None:
                        keys.append(key)
                        break
            value = stack.pop()
        else:
            return value, end


def _runs(values: list, s: str, end: int, flat_fits: bool) -> int:
    """Where the next single item of an array starts, from ``end`` (an item's start): runs of flat
    items parsed :data:`RUN` at a time on the way, appended to ``values``; none where a flat
    object or array in them would be nested deeper than json.loads parses (``flat_fits`` false)."""
    while flat_fits:
        run = _RUN.match(s, end)
        if run is None:
            break
        values += json.loads(f"[{run.group()}0]")[:-1]  # whole items, each with its comma: valid JSON
        end = run.end()
    return end


def _after_item(s: str, end: int) -> tuple[bool, int]:
    """After an array's item: (True, past its ``]``) or (False, where the next item starts)."""
    nextchar = s[end:end + 1]
    if nextchar in _WS:
        end = _whitespace(s, end + 1).end()
        nextchar = s[end:end + 1]
    end += 1
    if nextchar == "]":
        return True, end
    if nextchar != ",":
        raise JSONDecodeError("Expecting ',' delimiter", s, end - 1)
    return False, _whitespace(s, end).end()


def _after_pair(s: str, end: int) -> tuple[bool, int]:
    """After an object's value: (True, past its ``}``) or (False, past the next key's opening quote)."""
    nextchar = s[end:end + 1]
    if nextchar and nextchar in _WS:
        end = _whitespace(s, end + 1).end()
        nextchar = s[end:end + 1]
    end += 1
    if nextchar == "}":
        return True, end
    if nextchar != ",":
        raise JSONDecodeError("Expecting ',' delimiter", s, end - 1)
    end = _whitespace(s, end).end()
    nextchar = s[end:end + 1]
    end += 1
    if nextchar != '"':
        raise JSONDecodeError("Expecting property name enclosed in double quotes", s, end - 1)
    return False, end


def _key(pairs: dict, s: str, end: int) -> tuple[str | None, int]:
    """From past a key's opening quote: (the key, where its value starts), runs of flat pairs put
    into ``pairs`` on the way; (None, past the ``}``) when a run ends the object. A key sent twice:
    its last value, in its first place, as ``json.loads``."""
    while True:
        run = _PAIRS.match(s, end - 1)  # from the key's quote: pairs of flat values, a comma after the last
        if run is None:
            key, end = scanstring(s, end, True)
            if s[end:end + 1] != ":":
                end = _whitespace(s, end).end()
                if s[end:end + 1] != ":":
                    raise JSONDecodeError("Expecting ':' delimiter", s, end)
            return key, _whitespace(s, end + 1).end()
        pairs.update(json.loads(f"{{{run.group()}}}"))
        closed, end = _after_pair(s, run.end())
        if closed:
            return None, end


def _room() -> int:
    """The levels of arrays and objects ``json.loads`` would parse if called in the place of
    :func:`loads_in_pieces` (its caller's stack, Python's recursion limit): measured, as it depends
    on both (and on how the interpreter counts frames against the limit), ~2 json.loads of 1 KB."""
    return _levels() + _WALK_FRAMES * _frame_cost()


@functools.cache
def _frame_cost() -> int:
    """Levels of json.loads that one more Python frame takes (1 where frames and C recursion share
    the limit, as in Python 3.11; 0 where they do not)."""
    return _levels() - _levels(1)


_hint = [0]  # the last answer of _levels: the callers' stacks are alike (the body threads)


def _levels(extra_frames: int = 0) -> int:
    """The most levels ``json.loads`` parses called from :func:`_parses` here (``extra_frames``
    deeper)."""
    if extra_frames:
        return _levels(extra_frames - 1)
    hint = _hint[0]
    if hint and _parses(hint) and not _parses(hint + 1):
        return hint
    good, bad = 0, 256
    while _parses(bad):
        good, bad = bad, bad * 2
    while bad - good > 1:
        mid = (good + bad) // 2
        good, bad = (mid, bad) if _parses(mid) else (good, mid)
    _hint[0] = good
    return good


def _parses(levels: int) -> bool:
    try:
        json.loads("[" * levels + "]" * levels)
    except RecursionError:
        return False
    return True
