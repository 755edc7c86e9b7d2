"""A large parsed request body's objects, as the collector and the allocator see them: full
collections held off while the body is parsed, checked and validated, then the body freed in pieces
(http_api/body.py ``read_off_loop``).

A body of millions of small arrays (``"prompt": [[1], [1], ...]``, 3M of them in 15 MB) makes as
many containers the collector tracks. Each full collection walks every tracked object outside the
permanent generation (serve freezes the start-up heap there), so while such a body was parsed the
collector ran ~7-13 full passes over it, the last ones 0.15-0.6 s each, the GIL held throughout:
every stream and the engine's step thread stalled. Full passes find cycles; a parsed JSON body
has none, so holding them off while it lives costs nothing but their delay. Younger generations are
still collected (their passes walk only the young objects), and a refused body is freed before the
hold ends, so the full pass that follows finds it gone. What a served request keeps (its validated
model: 100k tools are ~400k objects) is walked by that pass, once, as by the last of the passes it
replaces (one ~0.35 s pass on the loaded box for 100k tools on /v1/responses, served).

The hold is process-wide (the collector is): :func:`full_collections_held` raises generation 2's
threshold while any holder is inside it (the body threads: two at most, each for one body's CPU
work) and puts the value back when the last leaves, whatever it raised.

Freeing is one C call too: the last reference to 3M small arrays dropped freed them all with the
GIL held ~0.15 s (on the event loop, where the refused request's frame ended). :func:`let_go`
frees a body :data:`FREE` items at a time.
"""

from __future__ import annotations

import contextlib
import gc
import sys
import threading

FREE = 4096  # items of a list freed at once (4096 small arrays: ~0.2 ms)
BIG = 1024  # bytes (sys.getsizeof) of an item freed on its own: a list of ~120 items, a dict of ~30 keys
HELD = 1 << 30  # generation 2's threshold while held: more generation-1 passes than any body makes

_lock = threading.Lock()
_holders = 0
_threshold2 = 0  # generation 2's own threshold, while held


@contextlib.contextmanager
def full_collections_held(hold: bool = True):
    """No automatic full collection while inside (``hold`` false: nothing changes). Nests and
    overlaps across threads; the threshold found on entry comes back when the last holder leaves,
    on an exception too."""
    global _holders, _threshold2
    if not hold:
        yield
        return
    with _lock:
        if _holders == 0:
            first, second, _threshold2 = gc.get_threshold()
            gc.set_threshold(first, second, HELD)
        _holders += 1
    try:
        yield
    finally:
        with _lock:
            _holders -= 1
            if _holders == 0:
                first, second, _ = gc.get_threshold()
                gc.set_threshold(first, second, _threshold2)


def let_go(box: list) -> None:
    """Free the parsed JSON in ``box`` (a one-item list: the caller's only reference, taken out of
    it) :data:`FREE` items at a time, the lists and dicts in it over :data:`BIG` bytes each on its own
    the same way, so that other threads run in between. A list or dict that something else holds
    too (a validated model's field, a validation error's input) is left whole to its holder. A small
    array or object holding a large one is freed with it, at once.
    """
    stack = [box.pop()]
    while stack:
        item = stack.pop()
        if sys.getrefcount(item) != 2:  # ``item`` and getrefcount's argument: held elsewhere (or a scalar)
            continue
        if type(item) is dict:
            stack += [list(item), list(item.values())]
            item.clear()
        elif type(item) is list:
            while item:
                chunk = item[-FREE:]
                del item[-FREE:]
                sizes = list(map(sys.getsizeof, chunk))
                if max(sizes) > BIG:
                    stack += [x for x, size in zip(chunk, sizes) if size > BIG]
                del chunk  # its items, the large ones on the stack left out
